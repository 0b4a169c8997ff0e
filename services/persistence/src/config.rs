//! The persistence service's settings: `[http]`, `[log]`, `[data]` (accepted, unused),
//! `[database]` (PostgreSQL, batching, retry backoff), `[amqp]` (RabbitMQ, prefetch,
//! reconnect backoff) and `[debug]` (`/debug/pprof` token). Loaded by `kit::config::load_or_exit`; every check names its key.

use kit::config::{
    ConfigError, DataConfig, DebugConfig, HttpConfig, LogConfig, Validate, check_url,
};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgConnectOptions;
use std::str::FromStr;
use std::time::Duration;

/// Name of the service in logs, the broker's connection list and the exit message.
pub const SERVICE: &str = "persistence";

/// The whole configuration tree.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// Accepted so that the lab can give every service the same variables; persistence keeps
    /// all of its state in PostgreSQL.
    #[serde(default)]
    pub data: DataConfig,
    #[serde(default)]
    pub database: DatabaseConfig,
    #[serde(default)]
    pub amqp: AmqpConfig,
    /// `/debug/pprof` access beyond loopback (kit::debug).
    #[serde(default)]
    pub debug: DebugConfig,
}

impl Validate for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        self.http.validate()?;
        self.log.validate()?;
        self.debug.validate()?;
        self.database.validate()?;
        self.amqp.validate()
    }
}

/// `[database]`: where events are stored and how they are batched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `postgres://user@host:port/db`.
    pub url: String,
    /// Pool size. The writer uses one connection; the rest serve the read API.
    pub max_connections: u32,
    /// Waiting longer than this for a pooled connection counts as "database unavailable".
    pub acquire_timeout_ms: u64,
    /// A batch transaction taking longer is abandoned (its connection dropped) and retried:
    /// bounds the stall when the network to PostgreSQL is cut rather than refused.
    pub transaction_timeout_ms: u64,
    /// A batch is written once it holds this many events ...
    pub batch_max_events: usize,
    /// ... or this long after its first delivery arrived, whichever comes first.
    pub batch_max_wait_ms: u64,
    /// First retry delay after a failed batch; doubles up to `retry_backoff_max_ms`.
    pub retry_backoff_min_ms: u64,
    pub retry_backoff_max_ms: u64,
    /// A batch the database refuses for a reason that is not an outage (a constraint the
    /// data breaks) is retried this many times, then split message by message so that only
    /// the offending message lands in `poison_messages`.
    pub permanent_error_retries_max: u32,
    /// On shutdown, how long to keep retrying the batch in hand before leaving it unacked
    /// (the broker redelivers it to the next consumer).
    pub shutdown_flush_timeout_ms: u64,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: "postgres://postgres@127.0.0.1:5432/exchange".into(),
            max_connections: 8,
            acquire_timeout_ms: 2_000,
            transaction_timeout_ms: 10_000,
            batch_max_events: 2_000,
            batch_max_wait_ms: 5,
            retry_backoff_min_ms: 50,
            retry_backoff_max_ms: 2_000,
            permanent_error_retries_max: 3,
            shutdown_flush_timeout_ms: 5_000,
        }
    }
}

fn in_range<T: PartialOrd + std::fmt::Display + Copy>(
    key: &str,
    v: T,
    min: T,
    max: T,
) -> Result<(), ConfigError> {
    if v < min || v > max {
        Err(ConfigError::invalid(
            key,
            format!("{v} must be between {min} and {max}"),
        ))
    } else {
        Ok(())
    }
}

impl DatabaseConfig {
    /// Connection options parsed from `url` (validated by [`Validate`]).
    pub fn connect_options(&self) -> Result<PgConnectOptions, ConfigError> {
        PgConnectOptions::from_str(&self.url)
            .map(|o| o.application_name(SERVICE))
            .map_err(|e| ConfigError::invalid("database.url", format!("{e}")))
    }

    pub fn batch_max_wait(&self) -> Duration {
        Duration::from_millis(self.batch_max_wait_ms)
    }
}

impl Validate for DatabaseConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        check_url("database.url", &self.url, &["postgres", "postgresql"])?;
        self.connect_options()?;
        in_range("database.max_connections", self.max_connections, 2, 256)?;
        in_range(
            "database.acquire_timeout_ms",
            self.acquire_timeout_ms,
            10,
            600_000,
        )?;
        in_range(
            "database.transaction_timeout_ms",
            self.transaction_timeout_ms,
            100,
            600_000,
        )?;
        in_range(
            "database.batch_max_events",
            self.batch_max_events,
            1,
            100_000,
        )?;
        in_range(
            "database.batch_max_wait_ms",
            self.batch_max_wait_ms,
            0,
            60_000,
        )?;
        in_range(
            "database.retry_backoff_min_ms",
            self.retry_backoff_min_ms,
            1,
            60_000,
        )?;
        in_range(
            "database.retry_backoff_max_ms",
            self.retry_backoff_max_ms,
            self.retry_backoff_min_ms,
            600_000,
        )?;
        in_range(
            "database.permanent_error_retries_max",
            self.permanent_error_retries_max,
            0,
            100,
        )?;
        in_range(
            "database.shutdown_flush_timeout_ms",
            self.shutdown_flush_timeout_ms,
            0,
            600_000,
        )
    }
}

/// `[amqp]`: where events come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpConfig {
    /// `amqp://user:pass@host:port/vhost`.
    pub url: String,
    /// Most unacknowledged messages the broker hands out (`basic.qos`): the bound on what
    /// this process holds in memory while PostgreSQL is away; the rest waits in the queue.
    pub prefetch: u16,
    /// Connecting (TCP + handshake) taking longer than this counts as a failed attempt.
    pub connect_timeout_ms: u64,
    /// First reconnect delay; doubles up to `reconnect_backoff_max_ms`.
    pub reconnect_backoff_min_ms: u64,
    pub reconnect_backoff_max_ms: u64,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        AmqpConfig {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            prefetch: 1_000,
            connect_timeout_ms: 5_000,
            reconnect_backoff_min_ms: 100,
            reconnect_backoff_max_ms: 5_000,
        }
    }
}

impl Validate for AmqpConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        check_url("amqp.url", &self.url, &["amqp", "amqps"])?;
        in_range("amqp.prefetch", self.prefetch, 1, u16::MAX)?;
        in_range(
            "amqp.connect_timeout_ms",
            self.connect_timeout_ms,
            100,
            600_000,
        )?;
        in_range(
            "amqp.reconnect_backoff_min_ms",
            self.reconnect_backoff_min_ms,
            1,
            60_000,
        )?;
        in_range(
            "amqp.reconnect_backoff_max_ms",
            self.reconnect_backoff_max_ms,
            self.reconnect_backoff_min_ms,
            600_000,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn bad_values_name_their_key() {
        type Edit = fn(&mut Config);
        let table: &[(Edit, &str)] = &[
            (|c| c.database.url = "mysql://x".into(), "database.url"),
            (
                |c| c.database.url = "postgres://h:notaport/db".into(),
                "database.url",
            ),
            (
                |c| c.database.max_connections = 1,
                "database.max_connections",
            ),
            (
                |c| c.database.batch_max_events = 0,
                "database.batch_max_events",
            ),
            (
                |c| c.database.retry_backoff_max_ms = 1,
                "database.retry_backoff_max_ms",
            ),
            (|c| c.amqp.url = "http://x".into(), "amqp.url"),
            (|c| c.amqp.prefetch = 0, "amqp.prefetch"),
            (
                |c| c.amqp.reconnect_backoff_min_ms = 0,
                "amqp.reconnect_backoff_min_ms",
            ),
            (|c| c.http.request_timeout_ms = 0, "http.request_timeout_ms"),
        ];
        for (edit, key) in table {
            let mut c = Config::default();
            edit(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.starts_with(key), "{key}: {e}");
        }
    }
}
