//! The engine's settings (`[http]`, `[log]`, `[data]`, `[amqp]`, `[journal]`, `[debug]`).

use kit::config::{
    ConfigError, DataConfig, DebugConfig, HttpConfig, LogConfig, Validate, check_url,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    pub http: HttpConfig,
    pub log: LogConfig,
    /// Holds the journal and the outbox checkpoint.
    pub data: DataConfig,
    pub amqp: AmqpConfig,
    pub journal: JournalConfig,
    pub debug: DebugConfig,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            // Room for a batch of queued commands from the gateway (`POST /v1/commands`).
            http: HttpConfig {
                body_limit_bytes: 1 << 20,
                ..HttpConfig::default()
            },
            log: LogConfig::default(),
            data: DataConfig::default(),
            amqp: AmqpConfig::default(),
            journal: JournalConfig::default(),
            debug: DebugConfig::default(),
        }
    }
}

/// `[amqp]`: where events go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpConfig {
    pub url: String,
    /// Connecting (TCP, AMQP handshake, channel, topology) must finish within this time, or
    /// the attempt is dropped and retried.
    pub connect_timeout_ms: u64,
    /// Most events in one published message.
    pub batch_events_max: usize,
    /// A publish not sent and confirmed within this time counts as failed: the connection is
    /// dropped and the batch is published again on a new one.
    pub confirm_timeout_ms: u64,
    /// Reconnect backoff cap.
    pub reconnect_max_ms: u64,
    /// Least time between the starts of two publishes. Under load the outbox would otherwise
    /// publish as soon as the previous confirm arrives (every ~2–3 ms, about 10 events a message
    /// at 3,000 orders/s); waiting makes fewer, larger messages, and RabbitMQ's cost is per
    /// message. Events wait at most this long more before they leave; acknowledgements do not
    /// wait (they come from the journal). At low rates, where publishes are further apart
    /// than this, nothing waits. 0 publishes as fast as confirms come back.
    pub publish_interval_ms: u64,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        AmqpConfig {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            connect_timeout_ms: 5_000,
            batch_events_max: 1000,
            confirm_timeout_ms: 5_000,
            reconnect_max_ms: 2_000,
            publish_interval_ms: 10,
        }
    }
}

/// `[journal]`: group commit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JournalConfig {
    /// Most commands synced together in one `fdatasync`.
    pub group_commit_max: usize,
    /// Commands waiting for the matching thread; beyond it requests get 503.
    pub queue_max: usize,
    /// KiB of zeros written ahead of the records, so that a sync writes the records alone
    /// (no new file size or blocks to record); 0: the file grows with each write.
    pub preallocate_kb: u64,
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig {
            group_commit_max: 1024,
            queue_max: 16_384,
            preallocate_kb: 256,
        }
    }
}

impl Validate for EngineConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.http.validate()?;
        self.log.validate()?;
        self.debug.validate()?;
        check_url("amqp.url", &self.amqp.url, &["amqp"])?;
        if !(1..=10_000).contains(&self.amqp.batch_events_max) {
            return Err(ConfigError::invalid(
                "amqp.batch_events_max",
                "must be between 1 and 10000",
            ));
        }
        if !(100..=60_000).contains(&self.amqp.connect_timeout_ms) {
            return Err(ConfigError::invalid(
                "amqp.connect_timeout_ms",
                "must be between 100 and 60000",
            ));
        }
        if !(100..=60_000).contains(&self.amqp.confirm_timeout_ms) {
            return Err(ConfigError::invalid(
                "amqp.confirm_timeout_ms",
                "must be between 100 and 60000",
            ));
        }
        if !(10..=60_000).contains(&self.amqp.reconnect_max_ms) {
            return Err(ConfigError::invalid(
                "amqp.reconnect_max_ms",
                "must be between 10 and 60000",
            ));
        }
        if self.amqp.publish_interval_ms > 1_000 {
            return Err(ConfigError::invalid(
                "amqp.publish_interval_ms",
                "must be between 0 and 1000",
            ));
        }
        if !(1..=65_536).contains(&self.journal.group_commit_max) {
            return Err(ConfigError::invalid(
                "journal.group_commit_max",
                "must be between 1 and 65536",
            ));
        }
        if !(1..=1_000_000).contains(&self.journal.queue_max) {
            return Err(ConfigError::invalid(
                "journal.queue_max",
                "must be between 1 and 1000000",
            ));
        }
        if self.journal.preallocate_kb > 1 << 20 {
            return Err(ConfigError::invalid(
                "journal.preallocate_kb",
                "must be between 0 and 1048576 (1 GiB)",
            ));
        }
        Ok(())
    }
}
