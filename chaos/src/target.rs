//! The stack under test, as the runner sees it: the lab's state file (addresses, namespaces,
//! cgroups, pids) and the supervisor's control socket (stop, start, signal a component).

use anyhow::Context;
use lab::control::{Request, Response, request_ok};
use lab::{Component, ComponentState, LabState};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A running lab, found through its state file.
#[derive(Debug, Clone)]
pub struct Stack {
    pub state_file: PathBuf,
    pub state: LabState,
}

impl Stack {
    /// Reads the lab's state file; the lab must be up (`make demo` or `lab up`).
    pub fn open(state_file: &Path) -> anyhow::Result<Stack> {
        let state = LabState::read(state_file).with_context(|| {
            format!(
                "reading {} — is the lab up? (`make demo` or `target/release/lab up`)",
                state_file.display()
            )
        })?;
        Ok(Stack {
            state_file: state_file.to_owned(),
            state,
        })
    }

    /// Reads the state file again (pids change when components restart).
    pub fn refresh(&mut self) -> anyhow::Result<()> {
        self.state = LabState::read(&self.state_file)
            .with_context(|| format!("re-reading {}", self.state_file.display()))?;
        Ok(())
    }

    pub fn component(&self, c: Component) -> anyhow::Result<&ComponentState> {
        self.state
            .component(c)
            .with_context(|| format!("{c} is not part of this lab"))
    }

    /// A component's base URL (`http://…`, `postgres://…`, `amqp://…`).
    pub fn url(&self, c: Component) -> anyhow::Result<String> {
        self.component(c)?
            .primary_url()
            .map(str::to_owned)
            .with_context(|| format!("{c} has no URL in the state file"))
    }

    /// Whether components have their own namespaces and cgroups.
    pub fn isolated(&self) -> bool {
        self.state.components.iter().any(|c| c.netns.is_some())
    }

    /// Explains why root-only faults cannot run, or `None` if they can.
    pub fn isolation_problem(&self) -> Option<String> {
        // The effective uid is the second field of `Uid:` in our own status.
        let root = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
            })
            .unwrap_or(false);
        if !root {
            return Some("this experiment injects faults with iptables and cgroups, which needs root: run it with sudo".into());
        }
        if !self.isolated() {
            return Some(format!(
                "the lab is not isolated (components share the host network and cgroups): {}; restart it as root with isolation (`lab down && lab up`)",
                self.state
                    .isolation
                    .reason
                    .clone()
                    .unwrap_or_else(|| "isolation is off".into())
            ));
        }
        None
    }

    /// The control socket of the supervisor.
    fn socket(&self) -> anyhow::Result<PathBuf> {
        self.state
            .control_socket
            .clone()
            .context("the lab has no control socket (it was not started with `lab up`)")
    }

    fn control(&self, req: Request, timeout: Duration) -> anyhow::Result<Response> {
        request_ok(&self.socket()?, &req, timeout)
    }

    /// Stops a component and holds it down.
    pub fn stop(&self, c: Component) -> anyhow::Result<()> {
        self.control(Request::Stop { component: c }, Duration::from_secs(30))
            .map(|_| ())
    }

    /// Starts a held component and waits until it is ready.
    pub fn start(&self, c: Component) -> anyhow::Result<()> {
        self.control(Request::Start { component: c }, Duration::from_secs(180))
            .map(|_| ())
    }

    /// Sends a signal (`KILL`, `STOP`, `CONT`, `TERM`) to every process of a component.
    pub fn signal(&self, c: Component, signal: &str) -> anyhow::Result<()> {
        self.control(
            Request::Kill {
                component: c,
                signal: signal.to_owned(),
            },
            Duration::from_secs(10),
        )
        .map(|_| ())
    }

    /// The lab's current state from the supervisor itself.
    pub fn live_state(&self) -> anyhow::Result<LabState> {
        self.control(Request::Status, Duration::from_secs(10))?
            .state
            .context("the supervisor answered without a state")
    }
}
