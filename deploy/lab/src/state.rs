//! The state file `<root>/state.json`: what runs, where, and how it has been doing.
//!
//! It is the lab's contract with everything outside the supervisor process: `lab status`,
//! `lab down` after the supervisor was SIGKILLed, chaos experiments that need a pid or a port.
//! It is rewritten atomically (write `state.json.tmp`, then rename) on every change, carries
//! `"version": 1`, and grows by adding optional fields (readers ignore unknown fields): the
//! isolation fields (lab: `isolation`, `bridge`, `subnet`, `gateway_address`, `cgroup`,
//! `host_rules`; component: `netns`, `address`, `veth`, `cgroup`) were added that way, and are
//! written *before* the things they name are created, so a cleanup after a crash finds them.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::component::Component;
use crate::error::Result;

/// Schema version written in every state file.
pub const STATE_VERSION: u32 = 1;

/// The whole state file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabState {
    /// Always [`STATE_VERSION`].
    pub version: u32,
    /// Where the lab as a whole is.
    pub phase: Phase,
    /// Why the lab failed to start, when `phase` is `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The process that supervises the components (the `lab supervise` daemon, or the test
    /// process when the library is used in-process).
    pub supervisor: ProcessRecord,
    /// The lab's runtime folder.
    pub root: PathBuf,
    /// Where the service binaries come from.
    pub bin_dir: PathBuf,
    /// The repository checkout used for Prometheus rules, if one was found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<PathBuf>,
    /// Unix socket of the supervisor's control channel (daemon mode only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_socket: Option<PathBuf>,
    /// Whether the components are isolated (own network namespace and cgroups) and, if not,
    /// why. Absent in state files of older labs: `none`.
    #[serde(default)]
    pub isolation: IsolationState,
    /// The lab bridge in the host namespace (`sxl1a2b3c`), when isolated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// The lab's subnet on the bridge (`198.18.N.0/24`), when isolated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    /// The bridge's own address (`198.18.N.1`): the components' default route, and the source
    /// address of the host's traffic to them (Prometheus, tests, loadgen).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_address: Option<Ipv4Addr>,
    /// The lab's own cgroup folder per v1 controller (`cpu`, `memory`, `blkio`): the parent of
    /// the components' cgroups.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub cgroup: BTreeMap<String, PathBuf>,
    /// iptables rules the lab added in the host namespace, removed again on cleanup.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_rules: Vec<HostRule>,
    /// Unix time in ms of the last rewrite.
    pub updated_at: u64,
    /// One entry per component of the lab, in start order.
    pub components: Vec<ComponentState>,
}

/// Lab-level isolation: on (`netns`) or off (`none`, with the reason).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IsolationState {
    pub mode: IsolationMode,
    /// Why isolation is off: not root, disabled by configuration, or missing kernel support.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// How the components are isolated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IsolationMode {
    /// Everything in the host namespace on 127.0.0.1, no cgroups of the lab's own.
    #[default]
    None,
    /// Own network namespace on the lab bridge (databases and services) and own cgroups
    /// (every component).
    Netns,
}

/// An iptables rule the lab added in the host namespace: `iptables -w -t TABLE -I CHAIN RULE..`
/// to add, the same with `-C` to check and `-D` to delete.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRule {
    pub table: String,
    pub chain: String,
    /// The rule specification (`-i`, `sxl1a2b3c`, `-o`, ..., `-j`, `ACCEPT`).
    pub rule: Vec<String>,
}

/// Phase of the lab as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Components are being started in dependency order.
    Starting,
    /// Every component became ready once (some may have failed or be held since).
    Running,
    /// Shutdown in progress.
    Stopping,
    /// Everything was stopped.
    Stopped,
    /// The start failed; `error` says why. What was started has been stopped again.
    Failed,
}

/// Status of one component.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Spawned, readiness not yet confirmed.
    Starting,
    /// Readiness confirmed.
    Ready,
    /// Not running and not wanted: not started yet, or the lab shut down.
    Stopped,
    /// Stopped on request and held down: the supervisor does not restart it.
    Held,
    /// Given up: exit code 64 (bad configuration), too many restarts, or a failed preparation.
    Failed,
    /// Exited unexpectedly; waiting for its backoff delay before the next start.
    Restarting,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Starting => "starting",
            Status::Ready => "ready",
            Status::Stopped => "stopped",
            Status::Held => "held",
            Status::Failed => "failed",
            Status::Restarting => "restarting",
        }
    }

    /// A process is (or is about to be) running for this status.
    pub fn is_active(self) -> bool {
        matches!(self, Status::Starting | Status::Ready | Status::Restarting)
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A process identified robustly: pid plus its start time, so a recycled pid is never taken
/// for ours.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    pub pid: i32,
    /// Field 22 of `/proc/PID/stat` (clock ticks since boot).
    pub start_ticks: u64,
    /// Unix time in ms when we started it (or when it was recorded).
    pub started_at: u64,
}

/// How a process ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// Exit code, when it exited by itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// Signal number, when a signal ended it (an OOM kill is 9).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// `SIGKILL`, ... for `signal`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal_name: Option<String>,
    /// Unix time in ms.
    pub at: u64,
    /// The lab asked for it (stop, restart, shutdown); otherwise it was a crash or a kill.
    pub expected: bool,
    /// Extra explanation (e.g. "not ready within 30s").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl ExitRecord {
    /// From a wait status.
    pub fn from_status(status: std::process::ExitStatus, at: u64, expected: bool) -> Self {
        use std::os::unix::process::ExitStatusExt as _;
        let signal = status.signal();
        let signal_name = signal.map(|s| {
            nix::sys::signal::Signal::try_from(s)
                .map(|s| s.as_str().to_string())
                .unwrap_or_else(|_| format!("signal {s}"))
        });
        ExitRecord {
            code: status.code(),
            signal,
            signal_name,
            at,
            expected,
            reason: None,
        }
    }

    /// "code 1", "signal 9 (SIGKILL)".
    pub fn describe(&self) -> String {
        let mut s = match (self.code, self.signal, &self.signal_name) {
            (Some(code), _, _) => format!("code {code}"),
            (None, Some(sig), Some(name)) => format!("signal {sig} ({name})"),
            (None, Some(sig), None) => format!("signal {sig}"),
            (None, None, _) => "unknown".to_string(),
        };
        if let Some(reason) = &self.reason {
            s.push_str(&format!(", {reason}"));
        }
        s
    }
}

/// Everything about one component.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentState {
    pub name: Component,
    pub status: Status,
    /// Main process; also its process group id (every child leads its own group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// Start time of `pid` (see [`ProcessRecord::start_ticks`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_start_ticks: Option<u64>,
    /// Named ports (`http`, `amqp`, `dist`, `epmd`, `postgres`).
    pub ports: BTreeMap<String, u16>,
    /// URLs handed to other components (`http`, `amqp`, `postgres`).
    pub urls: BTreeMap<String, String>,
    /// Durable state of the component.
    pub data_dir: PathBuf,
    /// stdout/stderr of every run, with the lab's own lines marked `=== lab ...`.
    pub log_file: PathBuf,
    /// Automatic restarts after unexpected exits (requested restarts do not count).
    pub restarts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<ExitRecord>,
    /// Unix time in ms when the current (or last) process was spawned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<u64>,
    /// Unix time in ms when the current process was confirmed ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_at: Option<u64>,
    /// Helper processes that belong to the component (RabbitMQ's `epmd`), each leading its
    /// own process group.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub aux: BTreeMap<String, ProcessRecord>,
    /// Its network namespace (`ip netns` name, `sxl1a2b3c-gw`), when isolated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// Its address on the lab bridge (`198.18.N.x`), when isolated; it listens there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Ipv4Addr>,
    /// Host side of its veth pair (on the bridge; the namespace side is `eth0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub veth: Option<String>,
    /// Its cgroup folder per v1 controller (`cpu`, `memory`, `blkio`), when isolated. Every
    /// process of the component (and its descendants) is in them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub cgroup: BTreeMap<String, PathBuf>,
    /// Why it is `failed` (or why the last start attempt went wrong).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ComponentState {
    /// The URL other components use to reach it.
    pub fn primary_url(&self) -> Option<&str> {
        self.urls
            .get(self.name.primary_port_name())
            .map(String::as_str)
            .or_else(|| self.urls.values().next().map(String::as_str))
    }

    /// The main process as a record, if running.
    pub fn process(&self) -> Option<ProcessRecord> {
        Some(ProcessRecord {
            pid: self.pid?,
            start_ticks: self.pid_start_ticks?,
            started_at: self.started_at.unwrap_or(0),
        })
    }
}

impl LabState {
    /// The entry of `component`.
    pub fn component(&self, component: Component) -> Option<&ComponentState> {
        self.components.iter().find(|c| c.name == component)
    }

    pub(crate) fn component_mut(&mut self, component: Component) -> Option<&mut ComponentState> {
        self.components.iter_mut().find(|c| c.name == component)
    }

    /// Every process the state knows about (main processes and helpers), labelled.
    pub fn recorded_processes(&self) -> Vec<(String, ProcessRecord)> {
        let mut out = Vec::new();
        for c in &self.components {
            if let Some(p) = c.process() {
                out.push((c.name.to_string(), p));
            }
            for (name, p) in &c.aux {
                out.push((format!("{}/{name}", c.name), *p));
            }
        }
        out
    }

    /// Whether the lab this file describes is up: its supervisor is alive and it has not
    /// stopped or failed. (The addresses of a stopped lab may answer something else entirely.)
    pub fn is_running(&self) -> bool {
        crate::process::is_alive(&self.supervisor)
            && !matches!(self.phase, Phase::Stopped | Phase::Failed)
    }

    /// Reads and checks a state file.
    pub fn read(path: &Path) -> Result<Self> {
        let text =
            fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let version = value.get("version").and_then(serde_json::Value::as_u64);
        if version != Some(u64::from(STATE_VERSION)) {
            return Err(anyhow::anyhow!(
                "{} has state version {version:?}; this lab understands version {STATE_VERSION}",
                path.display()
            )
            .into());
        }
        let state = serde_json::from_value(value)
            .with_context(|| format!("decoding {}", path.display()))?;
        Ok(state)
    }

    /// Writes `path` atomically: a temporary file next to it, then a rename.
    pub fn write_atomic(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("json.tmp");
        let mut text = serde_json::to_string_pretty(self).context("encoding the state")?;
        text.push('\n');
        let mut file =
            fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        file.write_all(text.as_bytes())
            .with_context(|| format!("writing {}", tmp.display()))?;
        drop(file);
        fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> LabState {
        LabState {
            version: STATE_VERSION,
            phase: Phase::Running,
            error: None,
            supervisor: ProcessRecord {
                pid: 100,
                start_ticks: 5,
                started_at: 1_700_000_000_000,
            },
            root: PathBuf::from("/work/main/.lab"),
            bin_dir: PathBuf::from("/work/main/target/release"),
            repo: Some(PathBuf::from("/work/main")),
            control_socket: Some(PathBuf::from("/work/main/.lab/control.sock")),
            isolation: IsolationState {
                mode: IsolationMode::Netns,
                reason: None,
            },
            bridge: Some("sxl0a1b2c".to_string()),
            subnet: Some("198.18.0.0/24".to_string()),
            gateway_address: Some(Ipv4Addr::new(198, 18, 0, 1)),
            cgroup: [(
                "cpu".to_string(),
                PathBuf::from("/sys/fs/cgroup/cpu/sxl0a1b2c"),
            )]
            .into_iter()
            .collect(),
            host_rules: vec![HostRule {
                table: "filter".to_string(),
                chain: "FORWARD".to_string(),
                rule: ["-i", "sxl0a1b2c", "-o", "sxl0a1b2c", "-j", "ACCEPT"]
                    .map(String::from)
                    .to_vec(),
            }],
            updated_at: 1_700_000_001_000,
            components: vec![ComponentState {
                name: Component::Rabbitmq,
                status: Status::Ready,
                pid: Some(200),
                pid_start_ticks: Some(7),
                ports: [
                    ("amqp".to_string(), 5673),
                    ("dist".to_string(), 25673),
                    ("epmd".to_string(), 4370),
                ]
                .into_iter()
                .collect(),
                urls: [(
                    "amqp".to_string(),
                    "amqp://exchange:exchange@127.0.0.1:5673/%2f".to_string(),
                )]
                .into_iter()
                .collect(),
                data_dir: PathBuf::from("/work/main/.lab/rabbitmq/data"),
                log_file: PathBuf::from("/work/main/.lab/logs/rabbitmq.log"),
                restarts: 1,
                last_exit: Some(ExitRecord {
                    code: None,
                    signal: Some(9),
                    signal_name: Some("SIGKILL".to_string()),
                    at: 1_700_000_000_500,
                    expected: false,
                    reason: None,
                }),
                started_at: Some(1_700_000_000_600),
                ready_at: Some(1_700_000_000_900),
                aux: [(
                    "epmd".to_string(),
                    ProcessRecord {
                        pid: 199,
                        start_ticks: 6,
                        started_at: 1_700_000_000_000,
                    },
                )]
                .into_iter()
                .collect(),
                netns: Some("sxl0a1b2c-mq".to_string()),
                address: Some(Ipv4Addr::new(198, 18, 0, 11)),
                veth: Some("sxl0a1b2c-mq".to_string()),
                cgroup: [(
                    "memory".to_string(),
                    PathBuf::from("/sys/fs/cgroup/memory/sxl0a1b2c/rabbitmq"),
                )]
                .into_iter()
                .collect(),
                error: None,
            }],
        }
    }

    #[test]
    fn round_trips_and_lists_every_process() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        let state = sample();
        state.write_atomic(&path).expect("write");
        let back = LabState::read(&path).expect("read");
        assert_eq!(back, state);
        let procs: Vec<String> = back
            .recorded_processes()
            .into_iter()
            .map(|(n, p)| format!("{n}={}", p.pid))
            .collect();
        assert_eq!(procs, vec!["rabbitmq=200", "rabbitmq/epmd=199"]);
        assert_eq!(
            back.components[0].primary_url(),
            Some("amqp://exchange:exchange@127.0.0.1:5673/%2f")
        );
        assert_eq!(
            back.components[0]
                .last_exit
                .as_ref()
                .map(ExitRecord::describe)
                .as_deref(),
            Some("signal 9 (SIGKILL)")
        );
    }

    #[test]
    fn schema_is_stable() {
        let json = serde_json::to_value(sample()).expect("encode");
        let c = &json["components"][0];
        assert_eq!(json["version"], 1);
        assert_eq!(json["phase"], "running");
        assert_eq!(c["name"], "rabbitmq");
        assert_eq!(c["status"], "ready");
        assert_eq!(c["ports"]["dist"], 25673);
        assert_eq!(c["last_exit"]["signal"], 9);
        assert_eq!(c["aux"]["epmd"]["pid"], 199);
        assert_eq!(json["isolation"]["mode"], "netns");
        assert_eq!(json["bridge"], "sxl0a1b2c");
        assert_eq!(json["subnet"], "198.18.0.0/24");
        assert_eq!(json["gateway_address"], "198.18.0.1");
        assert_eq!(json["cgroup"]["cpu"], "/sys/fs/cgroup/cpu/sxl0a1b2c");
        assert_eq!(json["host_rules"][0]["chain"], "FORWARD");
        assert_eq!(c["netns"], "sxl0a1b2c-mq");
        assert_eq!(c["address"], "198.18.0.11");
        assert_eq!(c["veth"], "sxl0a1b2c-mq");
        assert_eq!(
            c["cgroup"]["memory"],
            "/sys/fs/cgroup/memory/sxl0a1b2c/rabbitmq"
        );
    }

    #[test]
    fn state_files_from_before_isolation_still_read() {
        let mut json = serde_json::to_value(sample()).expect("encode");
        let obj = json.as_object_mut().expect("object");
        for key in [
            "isolation",
            "bridge",
            "subnet",
            "gateway_address",
            "cgroup",
            "host_rules",
        ] {
            obj.remove(key);
        }
        let old: LabState = serde_json::from_value(json).expect("decode");
        assert_eq!(old.isolation, IsolationState::default());
        assert_eq!(old.isolation.mode, IsolationMode::None);
        assert!(old.bridge.is_none() && old.host_rules.is_empty());
    }

    #[test]
    fn unknown_fields_are_ignored_and_other_versions_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        let mut json = serde_json::to_value(sample()).expect("encode");
        json["components"][0]["netns"] = serde_json::json!("lab-rabbitmq");
        fs::write(&path, json.to_string()).expect("write");
        assert!(LabState::read(&path).is_ok());
        json["version"] = serde_json::json!(2);
        fs::write(&path, json.to_string()).expect("write");
        let err = LabState::read(&path)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("version"), "{err}");
    }
}
