//! The agent's configuration: kit's defaults -> optional TOML file -> `APP__SECTION__KEY`
//! environment (how the lab configures it: `APP__HTTP__ADDR`, `APP__LOG__FORMAT`,
//! `APP__DATA__DIR`), then command-line flags on top.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use kit::config::{ConfigError, DataConfig, DebugConfig, HttpConfig, LogConfig, Validate};
use serde::{Deserialize, Serialize};

use crate::agent::AgentOptions;

/// Service name in logs.
pub const SERVICE: &str = "probes";

/// The agent's default port (the lab's port plan uses it too).
pub const DEFAULT_PORT: u16 = 9435;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbesConfig {
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// Accepted because the lab hands it to every service; the agent keeps no durable state.
    #[serde(default)]
    pub data: DataConfig,
    #[serde(default)]
    pub agent: AgentConfig,
    /// `[debug] token`: opens `/debug/offcpu` to non-loopback clients (default: loopback only).
    #[serde(default)]
    pub debug: DebugConfig,
}

impl Default for ProbesConfig {
    fn default() -> Self {
        ProbesConfig {
            http: HttpConfig {
                addr: SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)),
                ..HttpConfig::default()
            },
            log: LogConfig::default(),
            data: DataConfig::default(),
            agent: AgentConfig::default(),
            debug: DebugConfig::default(),
        }
    }
}

/// `[agent]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// The lab's `state.json`; unset: `.lab/state.json`, then `../state.json`.
    pub lab_state: Option<PathBuf>,
    /// Enable BPF run-time statistics while running.
    pub bpf_stats: bool,
    /// Capacity of the `/events` ring.
    pub events_capacity: usize,
    pub poll_interval_ms: u64,
    /// How often the lab state file is checked for changes (a change triggers a rescan) when
    /// its directory cannot be watched (inotify wakes the agent otherwise).
    pub refresh_interval_ms: u64,
    /// Longest time between two rescans of `/proc` when the lab state does not change.
    pub rescan_interval_ms: u64,
    /// Attribute sockets by scanning lab processes' file descriptors.
    pub scan_sockets: bool,
    /// Time block requests from the kernel's own issue stamp where the queue keeps one;
    /// `false`: the programs time every request themselves (a map entry per request).
    pub kernel_block_stamps: bool,
    /// Attach only these probes (names as `probes check` lists them: `tcp_retransmit`,
    /// `tcp_lifecycle`, `tcp_resets`, `runqueue`, `block_io`, `oom`); unset: all of them. Leaving out
    /// `runqueue` removes the one program that runs on every context switch of the machine,
    /// most of the agent's cost (docs/probes.md).
    pub probes: Option<Vec<String>>,
    /// Sampling of the hot-path probes (`runqueue`: a program on every context switch;
    /// `block_io`: on every block request): attached `sample_window_ms` out of every
    /// `sample_period_ms`, and continuously while held (`POST /debug/sampling/hold`, as the
    /// chaos experiments do). `sample_period_ms = 0`: always attached.
    pub sample_window_ms: u64,
    pub sample_period_ms: u64,
}

impl Default for AgentConfig {
    fn default() -> Self {
        let d = AgentOptions::default();
        AgentConfig {
            lab_state: None,
            bpf_stats: false,
            events_capacity: d.events_capacity,
            poll_interval_ms: d.poll_interval.as_millis() as u64,
            refresh_interval_ms: d.refresh_interval.as_millis() as u64,
            rescan_interval_ms: d.rescan_interval.as_millis() as u64,
            scan_sockets: true,
            kernel_block_stamps: d.kernel_block_stamps,
            probes: None,
            sample_window_ms: d.sample_window.as_millis() as u64,
            sample_period_ms: d.sample_period.as_millis() as u64,
        }
    }
}

impl Validate for ProbesConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.http.validate()?;
        self.log.validate()?;
        let a = &self.agent;
        if !(1..=1_000_000).contains(&a.events_capacity) {
            return Err(ConfigError::invalid(
                "agent.events_capacity",
                "must be between 1 and 1000000",
            ));
        }
        if !(50..=60_000).contains(&a.poll_interval_ms) {
            return Err(ConfigError::invalid(
                "agent.poll_interval_ms",
                "must be between 50 and 60000",
            ));
        }
        if !(100..=600_000).contains(&a.refresh_interval_ms) {
            return Err(ConfigError::invalid(
                "agent.refresh_interval_ms",
                "must be between 100 and 600000",
            ));
        }
        if !(a.refresh_interval_ms..=600_000).contains(&a.rescan_interval_ms) {
            return Err(ConfigError::invalid(
                "agent.rescan_interval_ms",
                "must be between agent.refresh_interval_ms and 600000",
            ));
        }
        if a.sample_period_ms != 0 && !(1_000..=3_600_000).contains(&a.sample_period_ms) {
            return Err(ConfigError::invalid(
                "agent.sample_period_ms",
                "must be 0 (always attached) or between 1000 and 3600000",
            ));
        }
        if a.sample_period_ms != 0 && !(100..=a.sample_period_ms).contains(&a.sample_window_ms) {
            return Err(ConfigError::invalid(
                "agent.sample_window_ms",
                "must be between 100 and agent.sample_period_ms",
            ));
        }
        if let Some(list) = &a.probes {
            let known: Vec<&str> = crate::kernel::PROBES.iter().map(|p| p.name).collect();
            if list.is_empty() {
                return Err(ConfigError::invalid(
                    "agent.probes",
                    format!("is empty: name at least one of {}", known.join(", ")),
                ));
            }
            if let Some(bad) = list.iter().find(|n| !known.contains(&n.as_str())) {
                return Err(ConfigError::invalid(
                    "agent.probes",
                    format!("unknown probe {bad:?}: the probes are {}", known.join(", ")),
                ));
            }
        }
        Ok(())
    }
}

impl ProbesConfig {
    /// The agent's options from this configuration.
    pub fn agent_options(&self) -> AgentOptions {
        AgentOptions {
            lab_state: self.agent.lab_state.clone(),
            bpf_stats: self.agent.bpf_stats,
            events_capacity: self.agent.events_capacity,
            poll_interval: Duration::from_millis(self.agent.poll_interval_ms),
            refresh_interval: Duration::from_millis(self.agent.refresh_interval_ms),
            rescan_interval: Duration::from_millis(self.agent.rescan_interval_ms),
            scan_sockets: self.agent.scan_sockets,
            kernel_block_stamps: self.agent.kernel_block_stamps,
            probes: self.agent.probes.clone(),
            sample_window: Duration::from_millis(self.agent.sample_window_ms),
            sample_period: Duration::from_millis(self.agent.sample_period_ms),
            ..AgentOptions::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_listen_on_the_agent_port() {
        let c = ProbesConfig::default();
        assert!(c.validate().is_ok());
        assert_eq!(c.http.addr.port(), DEFAULT_PORT);
        let o = c.agent_options();
        assert_eq!(o.poll_interval, Duration::from_secs(20));
        let mut bad = c.clone();
        bad.agent.poll_interval_ms = 0;
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("agent.poll_interval_ms")
        );
        assert_eq!(o.probes, None);
        let mut some = c.clone();
        some.agent.probes = Some(vec!["tcp_retransmit".into(), "oom".into()]);
        assert!(some.validate().is_ok());
        assert_eq!(
            some.agent_options().probes,
            Some(vec!["tcp_retransmit".to_string(), "oom".to_string()])
        );
        some.agent.probes = Some(vec!["runq".into()]);
        let why = some.validate().unwrap_err().to_string();
        assert!(
            why.contains("agent.probes") && why.contains("\"runq\""),
            "{why}"
        );
        some.agent.probes = Some(vec![]);
        assert!(some.validate().unwrap_err().to_string().contains("empty"));
        assert_eq!(o.rescan_interval, Duration::from_secs(120));
        assert_eq!(o.sample_window, Duration::from_secs(3));
        assert_eq!(o.sample_period, Duration::from_secs(30));
        let mut always = c.clone();
        always.agent.sample_period_ms = 0;
        assert!(always.validate().is_ok());
        assert_eq!(always.agent_options().sample_period, Duration::ZERO);
        let mut bad = c.clone();
        bad.agent.sample_window_ms = bad.agent.sample_period_ms + 1;
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("agent.sample_window_ms")
        );
        bad.agent.sample_window_ms = 1_000;
        bad.agent.sample_period_ms = 500;
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("agent.sample_period_ms")
        );
        let mut bad = c.clone();
        bad.agent.rescan_interval_ms = bad.agent.refresh_interval_ms - 1;
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("agent.rescan_interval_ms")
        );
    }
}
