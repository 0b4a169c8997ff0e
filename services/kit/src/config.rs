//! Typed configuration: defaults, then an optional TOML file, then `APP__SECTION__KEY`
//! environment variables (`APP__HTTP__ADDR=127.0.0.1:8080` sets `http.addr`).
//!
//! A service describes its settings as a `serde` struct with a `Default` and a
//! [`Validate`] impl; [`load_or_exit`] builds it and, on any problem, prints one clear message
//! naming the key and exits with code 64 (`EX_CONFIG`) before a port is bound.

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Exit code for bad configuration (`EX_CONFIG` from sysexits.h); supervisors do not restart
/// a service that exits with it.
pub const EXIT_BAD_CONFIG: i32 = 64;

/// Prefix of the environment variables that configure a service.
pub const ENV_PREFIX: &str = "APP__";

/// A configuration problem, naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Parse(Box<figment::Error>),
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
    #[error("config file {path}: {message}")]
    File { path: PathBuf, message: String },
}

impl ConfigError {
    pub fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            key: key.to_owned(),
            message: message.into(),
        }
    }
}

/// Checks that go beyond types: ranges, relations between keys.
pub trait Validate {
    fn validate(&self) -> Result<(), ConfigError>;
}

/// Builds `T` from its defaults, the optional file and the environment, then validates it.
pub fn load<T>(file: Option<&Path>) -> Result<T, ConfigError>
where
    T: Serialize + DeserializeOwned + Default + Validate,
{
    load_from(file, Env::prefixed(ENV_PREFIX).split("__"))
}

fn load_from<T>(file: Option<&Path>, env: Env) -> Result<T, ConfigError>
where
    T: Serialize + DeserializeOwned + Default + Validate,
{
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    if let Some(path) = file {
        if !path.is_file() {
            return Err(ConfigError::File {
                path: path.to_owned(),
                message: "does not exist or is not a file".into(),
            });
        }
        figment = figment.merge(Toml::file(path));
    }
    let value: T = figment
        .merge(env)
        .extract()
        .map_err(|e| ConfigError::Parse(Box::new(e)))?;
    value.validate()?;
    Ok(value)
}

/// [`load`], or print the problem and exit with [`EXIT_BAD_CONFIG`].
pub fn load_or_exit<T>(service: &str, file: Option<&Path>) -> T
where
    T: Serialize + DeserializeOwned + Default + Validate,
{
    match load(file) {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "{service}: bad configuration: {e}\n(settings come from defaults, --config FILE, and {ENV_PREFIX}SECTION__KEY environment variables)"
            );
            std::process::exit(EXIT_BAD_CONFIG);
        }
    }
}

/// `[http]`: where a service listens and how it treats requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Listen address, e.g. `127.0.0.1:8080` (port 0 picks a free port).
    pub addr: SocketAddr,
    /// Requests taking longer are answered 408 (tower-http timeout).
    pub request_timeout_ms: u64,
    /// Larger request bodies are answered 413.
    pub body_limit_bytes: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            request_timeout_ms: 10_000,
            body_limit_bytes: 64 * 1024,
        }
    }
}

impl Validate for HttpConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.request_timeout_ms == 0 || self.request_timeout_ms > 600_000 {
            return Err(ConfigError::invalid(
                "http.request_timeout_ms",
                "must be between 1 and 600000",
            ));
        }
        if self.body_limit_bytes < 256 || self.body_limit_bytes > 16 << 20 {
            return Err(ConfigError::invalid(
                "http.body_limit_bytes",
                "must be between 256 and 16777216",
            ));
        }
        Ok(())
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter: `info`, `debug`, `info,sqlx=warn`, ...
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Human,
            level: "info".into(),
        }
    }
}

impl Validate for LogConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        tracing_subscriber::EnvFilter::try_new(&self.level)
            .map(|_| ())
            .map_err(|e| ConfigError::invalid("log.level", format!("{e}")))
    }
}

/// `[data]`: where a service keeps its durable state (journal, spool).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    pub dir: PathBuf,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            dir: PathBuf::from("data"),
        }
    }
}

/// `[debug]`: access to `/debug/pprof` from outside loopback.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DebugConfig {
    /// Bearer token that opens the debug endpoints to non-loopback clients; none = loopback only.
    pub token: Option<String>,
}

/// Checks that a URL has one of the given schemes, naming `key` if not.
pub fn check_url(key: &str, url: &str, schemes: &[&str]) -> Result<(), ConfigError> {
    let ok = schemes.iter().any(|s| {
        url.strip_prefix(s)
            .and_then(|rest| rest.strip_prefix("://"))
            .is_some_and(|rest| !rest.is_empty())
    });
    if ok {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            key,
            format!(
                "{url:?} must be a URL starting with {}://",
                schemes.join("://, ")
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        #[serde(default)]
        http: HttpConfig,
        #[serde(default)]
        log: LogConfig,
    }

    impl Validate for Sample {
        fn validate(&self) -> Result<(), ConfigError> {
            self.http.validate()?;
            self.log.validate()
        }
    }

    /// Loads `Sample` with exactly `vars` in the environment (figment's `Jail` serialises
    /// tests that touch the process environment and restores it afterwards).
    #[allow(clippy::result_large_err)] // figment's Jail API fixes the closure's error type
    fn from_env(vars: &[(&str, &str)]) -> Result<Sample, String> {
        let mut out = Err(String::new());
        figment::Jail::expect_with(|jail| {
            for (k, v) in vars {
                jail.set_env(k, v);
            }
            out = load::<Sample>(None).map_err(|e| e.to_string());
            Ok(())
        });
        out
    }

    #[test]
    fn defaults_validate() {
        let s = load_from::<Sample>(None, Env::prefixed("KIT_TEST_NOTHING__").split("__")).unwrap();
        assert_eq!(s.log.format, LogFormat::Human);
    }

    #[test]
    fn bad_values_name_their_key() {
        let ok = from_env(&[("APP__HTTP__ADDR", "127.0.0.1:7777")]).unwrap();
        assert_eq!(ok.http.addr.port(), 7777);
        let e = from_env(&[("APP__HTTP__ADDR", "not-an-address")]).unwrap_err();
        assert!(e.to_lowercase().contains("http.addr"), "{e}");
        let e = from_env(&[("APP__LOG__FORMAT", "xml")]).unwrap_err();
        assert!(e.to_lowercase().contains("log.format"), "{e}");
        let e = from_env(&[("APP__HTTP__REQUEST_TIMEOUT_MS", "0")]).unwrap_err();
        assert!(e.to_string().contains("http.request_timeout_ms"), "{e}");
        let e = from_env(&[("APP__LOG__LEVEL", "info,[[[")]).unwrap_err();
        assert!(e.to_string().contains("log.level"), "{e}");
    }

    #[test]
    fn a_missing_file_is_an_error() {
        let e = load_from::<Sample>(Some(Path::new("/nonexistent.toml")), Env::raw().only(&[]))
            .unwrap_err();
        assert!(e.to_string().contains("/nonexistent.toml"), "{e}");
    }

    #[test]
    fn file_then_env() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[http]\naddr = \"127.0.0.1:9999\"\n").unwrap();
        let s = load_from::<Sample>(Some(&path), Env::raw().only(&[])).unwrap();
        assert_eq!(s.http.addr.port(), 9999);
        std::fs::write(&path, "[htp]\naddr = \"127.0.0.1:9999\"\n").unwrap();
        let e = load_from::<Sample>(Some(&path), Env::raw().only(&[])).unwrap_err();
        assert!(e.to_string().contains("htp"), "{e}");
    }

    #[test]
    fn urls() {
        assert!(check_url("amqp.url", "amqp://h:5672/%2f", &["amqp"]).is_ok());
        assert!(check_url("amqp.url", "http://h", &["amqp"]).is_err());
        assert!(check_url("amqp.url", "amqp://", &["amqp"]).is_err());
    }
}
