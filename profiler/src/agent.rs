//! The lab's eBPF agent (`probes`) as the subject of `make bench-probes-overhead`: switched on
//! and off through the lab's control socket, its own CPU read from `/proc/<pid>/stat`, and
//! each eBPF program's kernel run time read from its `/metrics`
//! (`probes_program_run_seconds_total`, exported while `kernel.bpf_stats_enabled` is 1).

use anyhow::Context as _;
use lab::control::{Request, request_ok};
use lab::{Component, LabState};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// The agent of one running lab.
#[derive(Debug, Clone)]
pub struct Agent {
    state_file: PathBuf,
    socket: PathBuf,
    client: reqwest::Client,
}

/// What the agent had used so far, read at the edges of a window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentReading {
    /// User + system CPU seconds of the agent process (None while it is stopped), in the
    /// kernel's 10 ms ticks.
    pub cpu_seconds: Option<f64>,
    /// The same from its live threads' nanosecond clocks
    /// ([`crate::overhead::live_threads_cpu_seconds`]): the agent uses a few tens of
    /// milliseconds in a window, a few ticks, so the ticks alone are too coarse.
    pub cpu_live_threads: Option<f64>,
    /// Kernel run time per eBPF program, seconds since the agent loaded them.
    pub programs: BTreeMap<String, f64>,
    /// Runs per eBPF program since the agent loaded them.
    pub runs: BTreeMap<String, f64>,
}

impl Agent {
    /// The agent of the lab whose state file is `state_file`; refuses when the lab has no
    /// agent (not root, or started without it), saying how to get one.
    pub fn from_state(state_file: &Path) -> anyhow::Result<Agent> {
        let state = LabState::read(state_file)
            .map_err(|e| anyhow::anyhow!("{e}\nIs the lab running? Start it with `make demo`."))?;
        state.component(Component::Probes).with_context(|| {
            "the lab runs no eBPF agent (it needs root and eBPF: see `target/release/probes check`); \
             start the lab as root with `make demo`"
        })?;
        let socket = state
            .control_socket
            .clone()
            .context("the lab has no control socket (it was not started with `lab up`)")?;
        Ok(Agent {
            state_file: state_file.to_owned(),
            socket,
            client: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(2))
                .build()
                .context("building the HTTP client")?,
        })
    }

    /// Starts (and waits until ready) or stops (and holds down) the agent.
    pub async fn set(&self, on: bool) -> anyhow::Result<()> {
        let req = if on {
            Request::Start {
                component: Component::Probes,
            }
        } else {
            Request::Stop {
                component: Component::Probes,
            }
        };
        let socket = self.socket.clone();
        tokio::task::spawn_blocking(move || request_ok(&socket, &req, Duration::from_secs(120)))
            .await
            .context("control request task")??;
        Ok(())
    }

    /// Starts or stops the agent unless it already is as asked; after a switch, waits `settle`
    /// so that what is measured next is a settled agent (or a finished exit), not the switch.
    pub async fn switch_settled(&self, on: bool, settle: Duration) -> anyhow::Result<()> {
        if self.running()? != on {
            self.set(on).await?;
            tokio::time::sleep(settle).await;
        }
        Ok(())
    }

    /// Whether the agent is running now.
    pub fn running(&self) -> anyhow::Result<bool> {
        let state = LabState::read(&self.state_file)?;
        Ok(state
            .component(Component::Probes)
            .is_some_and(|c| c.status.is_active() && c.pid.is_some()))
    }

    /// The agent's CPU and its programs' run time so far (empty while it is stopped).
    pub async fn read(&self) -> anyhow::Result<AgentReading> {
        let state = LabState::read(&self.state_file)?;
        let Some(entry) = state.component(Component::Probes) else {
            return Ok(AgentReading::default());
        };
        if !entry.status.is_active() {
            return Ok(AgentReading::default());
        }
        let cpu_seconds = entry.pid.and_then(crate::overhead::cpu_seconds_proc);
        let cpu_live_threads = entry
            .pid
            .and_then(crate::overhead::live_threads_cpu_seconds);
        let Some(url) = entry
            .urls
            .get("http")
            .or_else(|| entry.urls.values().next())
        else {
            return Ok(AgentReading {
                cpu_seconds,
                cpu_live_threads,
                ..AgentReading::default()
            });
        };
        let url = format!("{}/metrics", url.trim_end_matches('/'));
        let text = self
            .client
            .get(&url)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .with_context(|| format!("GET {url}"))?
            .text()
            .await
            .with_context(|| format!("reading {url}"))?;
        Ok(AgentReading {
            cpu_seconds,
            cpu_live_threads,
            programs: per_program(&text, "probes_program_run_seconds_total"),
            runs: per_program(&text, "probes_program_runs_total"),
        })
    }
}

/// `<metric>{program="p"} v` lines, by program.
pub fn per_program(text: &str, metric: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let prefix = format!("{metric}{{");
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(prefix.as_str()) else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once('}') else {
            continue;
        };
        let Some(name) = labels
            .split(',')
            .find_map(|l| l.trim().strip_prefix("program=\""))
            .and_then(|v| v.strip_suffix('"'))
        else {
            continue;
        };
        if let Ok(v) = value.trim().parse::<f64>() {
            out.insert(name.to_string(), v);
        }
    }
    out
}

/// Turns on `kernel.bpf_stats_enabled` for as long as it lives and restores the value it found.
#[derive(Debug)]
pub struct BpfStats {
    previous: String,
}

impl BpfStats {
    pub fn enable() -> anyhow::Result<BpfStats> {
        let previous = std::fs::read_to_string(SYSCTL)
            .with_context(|| format!("reading {SYSCTL} (is this Linux with eBPF?)"))?;
        std::fs::write(SYSCTL, "1")
            .with_context(|| format!("writing 1 to {SYSCTL} (needs root)"))?;
        Ok(BpfStats {
            previous: previous.trim().to_string(),
        })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(SYSCTL, &self.previous) {
            eprintln!("could not restore {SYSCTL} to {}: {e}", self.previous);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_run_seconds_are_parsed() {
        let text = "# HELP probes_program_run_seconds_total CPU time\n\
            # TYPE probes_program_run_seconds_total counter\n\
            probes_program_run_seconds_total{program=\"sched_switch\"} 0.125\n\
            probes_program_run_seconds_total{program=\"tcp_retransmit\"} 0\n\
            probes_program_runs_total{program=\"sched_switch\"} 1000\n";
        let p = per_program(text, "probes_program_run_seconds_total");
        assert_eq!(p.len(), 2);
        assert_eq!(p["sched_switch"], 0.125);
        assert_eq!(p["tcp_retransmit"], 0.0);
        let runs = per_program(text, "probes_program_runs_total");
        assert_eq!(runs.len(), 1);
        assert_eq!(runs["sched_switch"], 1000.0);
        assert!(per_program("garbage{", "garbage").is_empty());
    }
}
