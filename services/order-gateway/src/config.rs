//! The gateway's typed configuration: kit's `[http]`, `[log]`, `[data]` and the spool limits,
//! plus where the engine and persistence live and how long to wait for them.
//!
//! Every key has a default, so an empty file (or none) is a working lab gateway; the lab
//! overrides `APP__HTTP__ADDR`, `APP__LOG__FORMAT`, `APP__DATA__DIR`, `APP__ENGINE__URL`,
//! `APP__PERSISTENCE__URL` and `APP__DEBUG__TOKEN`. [`GatewayConfig::validate`] runs before any port is bound.

use kit::config::{
    ConfigError, DataConfig, DebugConfig, HttpConfig, LogConfig, Validate, check_url,
};
use kit::spool::{Backoff, SpoolLimits};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The kernel's default TCP connect timeout is about this long (SYN retries); every timeout
/// of the gateway toward its dependencies stays far below it so an outage shows in ~1 s.
pub const KERNEL_CONNECT_TIMEOUT_MS: u64 = 25_000;

/// The whole configuration of the gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// `<dir>/spool` holds the retry queue, `<dir>/generation` the order-id generation.
    #[serde(default)]
    pub data: DataConfig,
    #[serde(default)]
    pub engine: UpstreamConfig,
    #[serde(default = "UpstreamConfig::persistence")]
    pub persistence: UpstreamConfig,
    #[serde(default)]
    pub spool: SpoolLimits,
    #[serde(default)]
    pub delivery: DeliveryConfig,
    #[serde(default)]
    pub batching: BatchingConfig,
    #[serde(default)]
    pub idempotency: IdempotencyConfig,
    /// `/debug/pprof` access beyond loopback (kit::debug).
    #[serde(default)]
    pub debug: DebugConfig,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            http: HttpConfig::default(),
            log: LogConfig::default(),
            data: DataConfig::default(),
            engine: UpstreamConfig::default(),
            persistence: UpstreamConfig::persistence(),
            spool: SpoolLimits::default(),
            delivery: DeliveryConfig::default(),
            batching: BatchingConfig::default(),
            idempotency: IdempotencyConfig::default(),
            debug: DebugConfig::default(),
        }
    }
}

/// `[engine]` and `[persistence]`: one HTTP dependency.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Base URL, `http://host:port` (no trailing path).
    pub url: String,
    /// Time allowed to establish the TCP connection.
    pub connect_timeout_ms: u64,
    /// Time allowed for the whole call (connect, send, answer); below the kernel's 25 s.
    pub request_timeout_ms: u64,
    /// How often the reachability probe (`GET {url}/healthz`) runs, feeding
    /// `dependency_up`; real calls update it too.
    pub probe_interval_ms: u64,
}

impl Default for UpstreamConfig {
    /// The engine's defaults.
    fn default() -> Self {
        UpstreamConfig {
            url: "http://127.0.0.1:8081".into(),
            // An outage is noticed within 0.8 s (the chaos experiments' detection budget is
            // 1 s); a healthy engine answers in milliseconds, so this leaves a wide margin.
            connect_timeout_ms: 500,
            request_timeout_ms: 800,
            probe_interval_ms: 1_000,
        }
    }
}

impl UpstreamConfig {
    /// Persistence's defaults.
    pub fn persistence() -> Self {
        UpstreamConfig {
            url: "http://127.0.0.1:8082".into(),
            ..UpstreamConfig::default()
        }
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    pub fn probe_interval(&self) -> Duration {
        Duration::from_millis(self.probe_interval_ms)
    }

    /// The URL without a trailing `/`, ready to have a path appended.
    pub fn base_url(&self) -> &str {
        self.url.trim_end_matches('/')
    }

    fn validate(&self, section: &str) -> Result<(), ConfigError> {
        check_url(&format!("{section}.url"), &self.url, &["http"])?;
        if self.request_timeout_ms == 0 || self.request_timeout_ms >= KERNEL_CONNECT_TIMEOUT_MS {
            return Err(ConfigError::invalid(
                &format!("{section}.request_timeout_ms"),
                format!(
                    "must be between 1 and {} (well below the kernel's {KERNEL_CONNECT_TIMEOUT_MS} ms connect timeout)",
                    KERNEL_CONNECT_TIMEOUT_MS - 1
                ),
            ));
        }
        if self.connect_timeout_ms == 0 || self.connect_timeout_ms > self.request_timeout_ms {
            return Err(ConfigError::invalid(
                &format!("{section}.connect_timeout_ms"),
                format!(
                    "must be between 1 and {section}.request_timeout_ms ({})",
                    self.request_timeout_ms
                ),
            ));
        }
        if !(10..=60_000).contains(&self.probe_interval_ms) {
            return Err(ConfigError::invalid(
                &format!("{section}.probe_interval_ms"),
                "must be between 10 and 60000",
            ));
        }
        Ok(())
    }
}

/// `[delivery]`: the task that drains the retry queue into the engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    /// First wait after a failed delivery; doubles on each further failure.
    pub backoff_initial_ms: u64,
    /// Cap of the wait between attempts.
    pub backoff_max_ms: u64,
    /// Connect timeout of delivery attempts. While the engine is unreachable every attempt
    /// waits this long; a short one means an attempt in flight when the network heals gives
    /// up quickly and the next one (a fresh connect) gets through. The engine is on the same
    /// host or bridge: a connect that takes longer than this is not going to succeed.
    pub connect_timeout_ms: u64,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            backoff_initial_ms: 50,
            // Retries at most every 100 ms: with the 200 ms connect timeout a healed engine is
            // found within about 0.3 s.
            backoff_max_ms: 100,
            connect_timeout_ms: 200,
        }
    }
}

impl DeliveryConfig {
    pub fn backoff(&self) -> Backoff {
        Backoff {
            initial: Duration::from_millis(self.backoff_initial_ms),
            max: Duration::from_millis(self.backoff_max_ms),
        }
    }
}

/// `[batching]`: how client commands travel to the engine (see [`crate::batcher`]). A command
/// that finds a free call slot leaves at once; those that arrive while every slot is busy
/// leave together in one `POST /v1/commands`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchingConfig {
    /// Most commands in one call (the engine takes at most 1024); 1 turns batching off.
    pub max_commands: usize,
    /// Calls to the engine out at the same time.
    pub in_flight: usize,
}

/// The engine's limit on commands per `POST /v1/commands`.
pub const ENGINE_MAX_BATCH: usize = 1024;

impl Default for BatchingConfig {
    fn default() -> Self {
        BatchingConfig {
            max_commands: 256,
            in_flight: 2,
        }
    }
}

impl BatchingConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=ENGINE_MAX_BATCH).contains(&self.max_commands) {
            return Err(ConfigError::invalid(
                "batching.max_commands",
                format!("must be between 1 and {ENGINE_MAX_BATCH} (the engine's limit per call)"),
            ));
        }
        if !(1..=256).contains(&self.in_flight) {
            return Err(ConfigError::invalid(
                "batching.in_flight",
                "must be between 1 and 256",
            ));
        }
        Ok(())
    }
}

/// `[idempotency]`: the bounded memory of answers given, keyed by `client_order_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdempotencyConfig {
    /// Answers remembered; the oldest is forgotten beyond it (the engine is the backstop).
    pub max_entries: usize,
    /// Bytes of remembered answers (keys and bodies); the oldest is forgotten beyond it.
    pub max_bytes: usize,
    /// Engine answers kept per order id for `GET /v1/orders/{id}` while persistence catches
    /// up (FIFO); 0 turns that fallback off.
    pub recent_orders_max_entries: usize,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        IdempotencyConfig {
            max_entries: 1_000_000,
            max_bytes: 256 << 20,
            recent_orders_max_entries: 100_000,
        }
    }
}

impl Validate for GatewayConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.http.validate()?;
        self.log.validate()?;
        self.debug.validate()?;
        if self.data.dir.as_os_str().is_empty() {
            return Err(ConfigError::invalid("data.dir", "must not be empty"));
        }
        self.engine.validate("engine")?;
        self.persistence.validate("persistence")?;
        self.batching.validate()?;
        // A request must be able to wait out the engine's timeout and still be spooled and
        // answered 202 before kit's request timeout answers 408.
        if self.delivery.connect_timeout_ms == 0
            || self.delivery.connect_timeout_ms > self.engine.request_timeout_ms
        {
            return Err(ConfigError::invalid(
                "delivery.connect_timeout_ms",
                format!(
                    "must be between 1 and engine.request_timeout_ms ({})",
                    self.engine.request_timeout_ms
                ),
            ));
        }
        let slowest = self
            .engine
            .request_timeout_ms
            .max(self.persistence.request_timeout_ms);
        if self.http.request_timeout_ms <= slowest + 500 {
            return Err(ConfigError::invalid(
                "http.request_timeout_ms",
                format!(
                    "must exceed engine/persistence request_timeout_ms ({slowest}) by more than 500 ms, or a slow dependency turns into 408 instead of 202"
                ),
            ));
        }
        let s = &self.spool;
        if s.max_entries == 0 || s.max_bytes == 0 || s.segment_bytes == 0 {
            return Err(ConfigError::invalid(
                "spool",
                "max_entries, max_bytes and segment_bytes must be positive",
            ));
        }
        if s.max_entry_bytes < 1024 {
            return Err(ConfigError::invalid(
                "spool.max_entry_bytes",
                "must be at least 1024 (one order command)",
            ));
        }
        let d = &self.delivery;
        if d.backoff_initial_ms == 0 || d.backoff_max_ms < d.backoff_initial_ms {
            return Err(ConfigError::invalid(
                "delivery.backoff_max_ms",
                "backoff_initial_ms must be positive and backoff_max_ms at least backoff_initial_ms",
            ));
        }
        if d.backoff_max_ms > 60_000 {
            return Err(ConfigError::invalid(
                "delivery.backoff_max_ms",
                "must be at most 60000",
            ));
        }
        if self.idempotency.max_entries == 0 || self.idempotency.max_bytes == 0 {
            return Err(ConfigError::invalid(
                "idempotency.max_entries",
                "max_entries and max_bytes must be positive",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        let c = GatewayConfig::default();
        c.validate().unwrap();
        assert_eq!(c.engine.url, "http://127.0.0.1:8081");
        assert_eq!(c.persistence.url, "http://127.0.0.1:8082");
    }

    #[test]
    fn bad_values_name_their_key() {
        type Edit = fn(&mut GatewayConfig);
        let table: &[(&str, Edit)] = &[
            ("engine.url", |c| c.engine.url = "ftp://x".into()),
            ("engine.request_timeout_ms", |c| {
                c.engine.request_timeout_ms = 25_000
            }),
            ("engine.connect_timeout_ms", |c| {
                c.engine.connect_timeout_ms = 5_000
            }),
            ("persistence.url", |c| c.persistence.url = "".into()),
            ("http.request_timeout_ms", |c| {
                c.http.request_timeout_ms = 1_000
            }),
            ("delivery.backoff_max_ms", |c| c.delivery.backoff_max_ms = 1),
            ("idempotency.max_entries", |c| c.idempotency.max_entries = 0),
            ("spool.max_entry_bytes", |c| c.spool.max_entry_bytes = 10),
        ];
        for (key, edit) in table {
            let mut c = GatewayConfig::default();
            edit(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
    }
}
