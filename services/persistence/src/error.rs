//! Typed errors of the service, and the one question the retry loops ask of a database
//! error: is this an outage to wait out ([`StoreError::is_transient`]), or a refusal that
//! retrying cannot fix?

use kit::config::ConfigError;

/// A database operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Db(#[from] sqlx::Error),
    #[error("running migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The operation took longer than its budget; its connection was dropped.
    #[error("timed out after {0} ms")]
    Timeout(u64),
    /// A row that this service could not have written (an unknown status, ...).
    #[error("unexpected data in the database: {0}")]
    Corrupt(String),
}

/// SQLSTATE classes that mean "the database is (temporarily) not able to serve":
/// 08 connection exception, 40 transaction rollback (serialization, deadlock), 53 insufficient
/// resources, 57 operator intervention (shutdown, cancel, cannot connect now), 58 system error.
const TRANSIENT_SQLSTATE_CLASSES: &[&str] = &["08", "40", "53", "57", "58"];

fn sqlx_is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::BeginFailed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            TRANSIENT_SQLSTATE_CLASSES
                .iter()
                .any(|class| code.starts_with(class))
        }),
        _ => false,
    }
}

impl StoreError {
    /// Whether waiting and retrying can make the same operation succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Db(e) => sqlx_is_transient(e),
            StoreError::Migrate(sqlx::migrate::MigrateError::Execute(e)) => sqlx_is_transient(e),
            StoreError::Migrate(sqlx::migrate::MigrateError::ExecuteMigration(e, _)) => {
                sqlx_is_transient(e)
            }
            StoreError::Migrate(_) => false,
            StoreError::Timeout(_) => true,
            StoreError::Corrupt(_) => false,
        }
    }

    /// Label for `persistence_db_errors_total{kind}`.
    pub fn kind(&self) -> &'static str {
        if self.is_transient() {
            "transient"
        } else {
            "permanent"
        }
    }
}

/// Why [`crate::run`] stopped with a failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("database: {0}")]
    Store(#[from] StoreError),
    #[error("http server: {0}")]
    Http(#[source] std::io::Error),
    #[error("{0} task ended abnormally: {1}")]
    Task(&'static str, String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outages_are_transient_refusals_are_not() {
        let io = StoreError::Db(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        )));
        assert!(io.is_transient());
        assert_eq!(io.kind(), "transient");
        assert!(StoreError::Db(sqlx::Error::PoolTimedOut).is_transient());
        assert!(StoreError::Timeout(5).is_transient());
        assert!(!StoreError::Corrupt("x".into()).is_transient());
        assert!(!StoreError::Db(sqlx::Error::RowNotFound).is_transient());
        assert_eq!(StoreError::Corrupt("x".into()).kind(), "permanent");
    }
}
