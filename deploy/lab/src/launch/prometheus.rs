//! Prometheus with a configuration rendered by the lab.
//!
//! `<root>/prometheus/prometheus.yml` scrapes every scraped component of the lab (one job per
//! component, named after it, label `component`; at its bridge address when the lab isolates:
//! Prometheus itself stays in the host namespace) and Prometheus itself every second, and loads
//! `deploy/prometheus/rules/*.yml` from the repository checkout when that folder exists.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use tokio::process::Command;

use super::{Ctx, base_command, check_executable};
use crate::component::Component;
use crate::config::LabConfig;

/// Where the rule files live inside the repository checkout.
pub const RULES_DIR: &str = "deploy/prometheus/rules";

/// Finds `prometheus` on PATH (Debian installs it in /usr/bin).
fn binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("prometheus"))
        .find(|p| p.is_file())
}

pub(super) fn preflight() -> Vec<String> {
    match binary() {
        Some(p) => check_executable(&p, "install prometheus")
            .into_iter()
            .collect(),
        None => vec![
            "prometheus not found on PATH (install prometheus: scripts/ensure-deps)".to_string(),
        ],
    }
}

/// The `prometheus.yml` for a lab.
pub fn render_config(cfg: &LabConfig) -> anyhow::Result<String> {
    let mut out = String::new();
    let w = &mut out;
    writeln!(
        w,
        "# Rendered by `lab` on every start; edit deploy/lab/src/launch/prometheus.rs instead."
    )?;
    writeln!(
        w,
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s"
    )?;
    let rules = cfg
        .find_repo()
        .map(|r| r.join(RULES_DIR))
        .filter(|d| d.is_dir());
    match rules {
        Some(dir) => writeln!(
            w,
            "rule_files:\n  - {}",
            yaml_string(&format!("{}/*.yml", dir.display()))
        )?,
        None => writeln!(w, "rule_files: []")?,
    }
    writeln!(w, "scrape_configs:")?;
    let mut jobs = vec![(
        Component::Prometheus.name(),
        cfg.host(Component::Prometheus),
        cfg.ports.primary(Component::Prometheus)?,
    )];
    for c in cfg.components.iter().filter(|c| c.spec().scraped) {
        // Through the lab bridge for components in their own namespace.
        jobs.push((c.name(), cfg.host(c), cfg.ports.port(c, "http")?));
    }
    for (job, host, port) in jobs {
        writeln!(w, "  - job_name: {job}")?;
        writeln!(w, "    metrics_path: /metrics")?;
        if job == Component::Probes.name() {
            // The agent's own `component` label (whose kernel event it is) must win over the
            // target's; otherwise Prometheus renames it to `exported_component`.
            writeln!(w, "    honor_labels: true")?;
            // Its kernel histograms and counters every 15 s: a scrape (draining the ring,
            // reading every map, rendering 80 KB) was two fifths of the agent's own CPU at a
            // 5 s interval (docs/probes.md, "Cost"). The kernel panels ask for a 15 s minimum
            // interval to match. The services stay at 1 s (recovery times to the second);
            // chaos reports read the agent directly, not through Prometheus.
            writeln!(w, "    scrape_interval: {PROBES_SCRAPE_INTERVAL}")?;
        }
        writeln!(w, "    static_configs:")?;
        writeln!(w, "      - targets: ['{host}:{port}']")?;
        writeln!(w, "        labels:\n          component: {job}")?;
    }
    // The chaos runner's exporter (`chaos run`, default 127.0.0.1:9436): the fault and phase
    // annotations of the dashboards. Down between experiments; TargetDown ignores it.
    writeln!(
        w,
        "  - job_name: chaos\n    metrics_path: /metrics\n    static_configs:\n      - targets: ['127.0.0.1:{CHAOS_EXPORTER_PORT}']\n        labels:\n          component: chaos"
    )?;
    Ok(out)
}

/// How often the lab's Prometheus scrapes the eBPF agent.
pub const PROBES_SCRAPE_INTERVAL: &str = "15s";

/// Port of the chaos runner's exporter (`chaos run --exporter`).
pub const CHAOS_EXPORTER_PORT: u16 = 9436;

/// A double-quoted YAML scalar.
fn yaml_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

pub(crate) struct Prometheus;

impl Prometheus {
    pub(super) fn prepare(&mut self, ctx: &Ctx) -> anyhow::Result<()> {
        let path = ctx.dir.join("prometheus.yml");
        let text = render_config(&ctx.cfg)?;
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    pub(super) fn command(&self, ctx: &Ctx) -> anyhow::Result<Command> {
        let bin = binary().context("prometheus not found on PATH")?;
        let port = ctx.port("http")?;
        let mut cmd = base_command(bin, ctx)?;
        cmd.arg(format!(
            "--config.file={}",
            ctx.dir.join("prometheus.yml").display()
        ))
        .arg(format!("--storage.tsdb.path={}", ctx.data_dir.display()))
        .arg(format!("--web.listen-address={}:{port}", ctx.host()))
        .arg("--web.enable-lifecycle");
        Ok(cmd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_of<const N: usize>(repo: &std::path::Path, components: [Component; N]) -> LabConfig {
        let mut cfg = LabConfig::new("/tmp/lab", components);
        cfg.repo = Some(repo.to_path_buf());
        cfg
    }

    fn config_with_rules(repo: &std::path::Path) -> LabConfig {
        config_of(repo, [Component::OrderGateway, Component::Prometheus])
    }

    fn config_with_agent(repo: &std::path::Path) -> LabConfig {
        config_of(
            repo,
            [
                Component::OrderGateway,
                Component::Prometheus,
                Component::Probes,
            ],
        )
    }

    #[test]
    fn renders_every_scraped_component_and_the_rules() {
        let repo = tempfile::tempdir().expect("tempdir");
        let rules = repo.path().join(RULES_DIR);
        std::fs::create_dir_all(&rules).expect("rules dir");
        let text = render_config(&config_with_rules(repo.path())).expect("render");
        let expected = format!(
            "# Rendered by `lab` on every start; edit deploy/lab/src/launch/prometheus.rs instead.
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - \"{}/*.yml\"
scrape_configs:
{}",
            rules.display(),
            [("prometheus", 9090), ("matching-engine", 8081), ("persistence", 8082), ("order-gateway", 8080)]
                .iter()
                .map(|(job, port)| format!(
                    "  - job_name: {job}\n    metrics_path: /metrics\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n        labels:\n          component: {job}\n"
                ))
                .collect::<String>()
                + "  - job_name: chaos\n    metrics_path: /metrics\n    static_configs:\n      - targets: ['127.0.0.1:9436']\n        labels:\n          component: chaos\n"
        );
        assert_eq!(text, expected);
    }

    #[test]
    fn no_rules_folder_means_no_rule_files() {
        let repo = tempfile::tempdir().expect("tempdir");
        let text = render_config(&config_with_rules(repo.path())).expect("render");
        assert!(text.contains("rule_files: []\n"), "{text}");
    }

    #[test]
    fn the_agent_keeps_its_labels_and_is_scraped_every_5s() {
        let repo = tempfile::tempdir().expect("tempdir");
        let text = render_config(&config_with_agent(repo.path())).expect("render");
        let job = text
            .split("  - job_name: ")
            .find(|j| j.starts_with("probes\n"))
            .unwrap_or_else(|| panic!("no probes job in:\n{text}"));
        assert!(job.contains("    honor_labels: true\n"), "{job}");
        assert!(
            job.contains(&format!("    scrape_interval: {PROBES_SCRAPE_INTERVAL}\n")),
            "{job}"
        );
        let gateway = text
            .split("  - job_name: ")
            .find(|j| j.starts_with("order-gateway\n"))
            .expect("gateway job");
        assert!(!gateway.contains("scrape_interval"), "{gateway}");
    }

    #[test]
    fn promtool_accepts_the_config() {
        let Ok(promtool) = which("promtool") else {
            let why = "promtool_accepts_the_config: promtool not found (install prometheus)";
            assert!(
                std::env::var_os("LAB_SKIP_MISSING").is_some(),
                "{why}; or set LAB_SKIP_MISSING=1"
            );
            println!("SKIPPED {why}");
            return;
        };
        let repo = tempfile::tempdir().expect("tempdir");
        let rules = repo.path().join(RULES_DIR);
        std::fs::create_dir_all(&rules).expect("rules dir");
        let rule = "groups:\n  - name: lab\n    rules:\n      - record: job:up:sum\n        expr: sum by (job) (up)\n";
        std::fs::write(rules.join("lab.yml"), rule).expect("rule file");
        let path = repo.path().join("prometheus.yml");
        // With the agent: its job has settings of its own.
        std::fs::write(
            &path,
            render_config(&config_with_agent(repo.path())).expect("render"),
        )
        .expect("write");
        let out = std::process::Command::new(promtool)
            .args(["check", "config"])
            .arg(&path)
            .output()
            .expect("promtool");
        assert!(
            out.status.success(),
            "promtool: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn which(name: &str) -> Result<PathBuf, ()> {
        let path = std::env::var_os("PATH").ok_or(())?;
        std::env::split_paths(&path)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
            .ok_or(())
    }
}
