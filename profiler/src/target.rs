//! Where the services are: the lab's state file (`lab::LabState`) gives each service's URL and
//! pid, and `<root>/debug-token` the bearer token of their `/debug/pprof` endpoints (loopback
//! needs none; a lab that puts services in network namespaces reaches them over its bridge,
//! where the token is required).

use anyhow::Context as _;
use lab::{Component, LabState};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The services `make profile-*` profiles, in the order they are reported.
pub const SERVICES: [Component; 3] = [
    Component::OrderGateway,
    Component::MatchingEngine,
    Component::Persistence,
];

/// File under the lab root holding the debug token (written by `lab up`).
pub const DEBUG_TOKEN_FILE: &str = "debug-token";

/// One service to profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    /// `http://host:port`, no trailing slash.
    pub url: String,
    /// Main process, when the state file has it (for CPU accounting from `/proc`).
    pub pid: Option<i32>,
}

/// A component the services depend on (PostgreSQL, RabbitMQ): not profiled, but part of
/// what every order costs end to end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub name: String,
    /// Main process (its descendants are found from it when there is no cgroup).
    pub pid: Option<i32>,
    /// Its folder in the lab's `cpu` cgroup, when the lab isolates components: every process
    /// of the component is listed there.
    pub cgroup: Option<PathBuf>,
}

impl Backend {
    /// The processes of the component alive now: its cgroup's members, else its main
    /// process and that process's descendants.
    pub fn pids(&self) -> Vec<i32> {
        match (&self.cgroup, self.pid) {
            (Some(dir), _) if dir.is_dir() => lab::cgroup::members(dir),
            (_, Some(pid)) => lab::process::tree(pid),
            _ => Vec::new(),
        }
    }
}

/// The running lab as the profiler sees it.
#[derive(Debug, Clone)]
pub struct Stack {
    pub state_file: PathBuf,
    pub services: Vec<Service>,
    /// PostgreSQL and RabbitMQ, where the lab runs them.
    pub backends: Vec<Backend>,
    /// The gateway's URL, where the load goes.
    pub gateway: String,
    /// The lab's eBPF agent (`probes`), when it runs: its URL (loopback), or why not.
    pub probes: Result<String, String>,
    token: Option<String>,
    pub client: reqwest::Client,
}

impl Stack {
    /// Reads the state file; every service in `wanted` must be in it.
    pub fn from_state(state_file: &Path, wanted: &[Component]) -> anyhow::Result<Stack> {
        let state = LabState::read(state_file).map_err(|e| {
            anyhow::anyhow!(
                "{e}\nIs the lab running? Start it with `make demo` (or pass --state FILE)."
            )
        })?;
        if !state.is_running() {
            anyhow::bail!(
                "the lab in {} is not running: start it with `make demo` (or pass --state FILE)",
                state_file.display()
            );
        }
        let mut services = Vec::new();
        for &c in wanted {
            let entry = state.component(c).with_context(|| {
                format!("{c} is not part of the lab in {}", state_file.display())
            })?;
            let url = entry
                .urls
                .get("http")
                .map(String::as_str)
                .or_else(|| entry.primary_url())
                .with_context(|| format!("{c} has no http URL in {}", state_file.display()))?;
            if !entry.status.is_active() {
                tracing::warn!(service = %c, status = %entry.status, "service is not running");
            }
            services.push(Service {
                name: c.to_string(),
                url: url.trim_end_matches('/').to_string(),
                pid: entry.pid,
            });
        }
        let backends = [Component::Postgres, Component::Rabbitmq]
            .into_iter()
            .filter_map(|c| state.component(c))
            .map(|entry| Backend {
                name: entry.name.to_string(),
                pid: entry.pid,
                cgroup: entry.cgroup.get("cpu").cloned(),
            })
            .collect();
        let gateway = state
            .component(Component::OrderGateway)
            .and_then(|g| g.urls.get("http"))
            .map(|u| u.trim_end_matches('/').to_string())
            .unwrap_or_else(|| "http://127.0.0.1:8080".into());
        let probes = match state.component(Component::Probes) {
            None => Err("the lab runs no eBPF agent (it needs root and eBPF: see `target/release/probes check`)".to_string()),
            Some(p) if !p.status.is_active() => Err(format!("the lab's eBPF agent is {}", p.status)),
            Some(p) => p
                .urls
                .get("http")
                .or_else(|| p.urls.values().next())
                .map(|u| u.trim_end_matches('/').to_string())
                .ok_or_else(|| "the lab's eBPF agent has no URL in the state file".to_string()),
        };
        let token = std::fs::read_to_string(state.root.join(DEBUG_TOKEN_FILE))
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .build()
            .context("building the HTTP client")?;
        Ok(Stack {
            state_file: state_file.to_owned(),
            services,
            backends,
            gateway,
            probes,
            token,
            client,
        })
    }

    /// Whether a debug token was found (needed when the services are not on loopback).
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// `GET {service}{path}` with the bearer token; the body on 200, else an error that says
    /// what to do about the status.
    pub async fn get(
        &self,
        service: &Service,
        path_and_query: &str,
        timeout: Duration,
    ) -> anyhow::Result<Vec<u8>> {
        self.get_with_headers(service, path_and_query, timeout)
            .await
            .map(|(body, _)| body)
    }

    /// [`Stack::get`], with the answer's headers.
    pub async fn get_with_headers(
        &self,
        service: &Service,
        path_and_query: &str,
        timeout: Duration,
    ) -> anyhow::Result<(Vec<u8>, reqwest::header::HeaderMap)> {
        let url = format!("{}{path_and_query}", service.url);
        let mut req = self.client.get(&url).timeout(timeout);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("GET {url} ({} unreachable?)", service.name))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp
            .bytes()
            .await
            .with_context(|| format!("reading the answer of GET {url}"))?;
        if status.is_success() {
            return Ok((body.to_vec(), headers));
        }
        let text = String::from_utf8_lossy(&body).trim().to_string();
        let hint = match status.as_u16() {
            401 => "the bearer token was refused: is <lab root>/debug-token from the running lab?",
            403 => {
                "the service only answers loopback and has no token configured (APP__DEBUG__TOKEN)"
            }
            409 => "another profile of this service is running (one at a time); retry when it ends",
            501 => "the service cannot produce this profile (see the message)",
            _ => "",
        };
        anyhow::bail!(
            "GET {url}: {status}: {text}{}",
            if hint.is_empty() {
                String::new()
            } else {
                format!(" — {hint}")
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backend_without_a_cgroup_is_its_process_tree() {
        let me = std::process::id() as i32;
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawning sleep");
        let b = Backend {
            name: "postgres".into(),
            pid: Some(me),
            cgroup: Some(PathBuf::from("/nonexistent/cgroup/postgres")),
        };
        let pids = b.pids();
        let _ = child.kill();
        let _ = child.wait();
        assert!(pids.contains(&me), "{pids:?}");
        assert!(pids.contains(&(child.id() as i32)), "{pids:?}");
        let none = Backend {
            name: "rabbitmq".into(),
            pid: None,
            cgroup: None,
        };
        assert!(none.pids().is_empty());
    }
}
