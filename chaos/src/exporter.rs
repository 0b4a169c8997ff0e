//! `chaos_fault_active{experiment,fault,target}` and `chaos_phase{experiment,phase}` on a
//! small HTTP endpoint while an experiment runs, so Prometheus (the lab scrapes it as job
//! `chaos`) and the dashboards can shade fault windows.

use crate::experiment::FaultSpec;
use axum::Router;
use axum::routing::get;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

#[derive(Debug, Default)]
struct State {
    experiment: String,
    faults: Vec<(String, String)>,
    active: bool,
    phase: String,
}

/// A running exporter; stops when dropped.
#[derive(Debug)]
pub struct Exporter {
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn render(s: &State) -> String {
    let mut out = String::from(
        "# HELP chaos_fault_active 1 while the fault is applied.\n# TYPE chaos_fault_active gauge\n",
    );
    for (fault, target) in &s.faults {
        let _ = writeln!(
            out,
            "chaos_fault_active{{experiment=\"{}\",fault=\"{fault}\",target=\"{target}\"}} {}",
            s.experiment,
            u8::from(s.active)
        );
    }
    out.push_str(
        "# HELP chaos_phase 1 for the phase the experiment is in.\n# TYPE chaos_phase gauge\n",
    );
    if !s.phase.is_empty() {
        let _ = writeln!(
            out,
            "chaos_phase{{experiment=\"{}\",phase=\"{}\"}} 1",
            s.experiment, s.phase
        );
    }
    out
}

impl Exporter {
    /// Binds `addr` and serves `/metrics`.
    pub fn start(
        addr: SocketAddr,
        experiment: &str,
        faults: &[FaultSpec],
    ) -> anyhow::Result<Exporter> {
        let state = Arc::new(Mutex::new(State {
            experiment: experiment.to_owned(),
            faults: faults
                .iter()
                .map(|f| (f.kind().to_owned(), f.target()))
                .collect(),
            ..State::default()
        }));
        let std_listener = std::net::TcpListener::bind(addr)
            .map_err(|e| anyhow::anyhow!("binding the chaos metrics endpoint {addr}: {e}"))?;
        std_listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(std_listener)?;
        let s = state.clone();
        let app = Router::new().route(
            "/metrics",
            get(move || {
                let s = s.clone();
                async move { render(&s.lock().unwrap_or_else(|p| p.into_inner())) }
            }),
        );
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Exporter { state, task })
    }

    pub fn phase(&self, phase: &str) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).phase = phase.to_owned();
    }

    pub fn faults_active(&self, active: bool) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).active = active;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_gauges() {
        let s = State {
            experiment: "x".into(),
            faults: vec![("partition".into(), "a->b".into())],
            active: true,
            phase: "hold".into(),
        };
        let text = render(&s);
        assert!(text.contains(
            "chaos_fault_active{experiment=\"x\",fault=\"partition\",target=\"a->b\"} 1"
        ));
        assert!(text.contains("chaos_phase{experiment=\"x\",phase=\"hold\"} 1"));
    }
}
