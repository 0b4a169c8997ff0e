//! The end-to-end harness: a whole lab (real PostgreSQL, RabbitMQ and the three services) on
//! free ports in a folder under `target/e2e/`, and helpers to talk to it.
//!
//! The services' binaries come from the `target/<profile>` folder this test binary was built
//! into; `cargo test --workspace` (what `make test` runs) builds them with the tests.

pub mod cpu;

use anyhow::{Context, bail};
use lab::{Component, Lab, LabConfig};
use serde_json::Value;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The folder holding the services' binaries: `target/<profile>` for a test binary
/// (`target/<profile>/deps/e2e-xxxx`) and for a binary like `bench-e2e` itself.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the running binary")?;
    let mut dir = exe.parent().context("the binary has no folder")?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().context("deps has no parent folder")?;
    }
    let dir = dir.to_owned();
    for bin in ["matching-engine", "persistence", "order-gateway"] {
        if !dir.join(bin).is_file() {
            bail!(
                "{} is missing: build the services first (`cargo build --workspace --bins`; `cargo test --workspace` and `make test` build them)",
                dir.join(bin).display()
            );
        }
    }
    Ok(dir)
}

/// A fresh lab root under `target/e2e/`, readable by the `postgres` user (it runs the cluster
/// when we are root).
///
/// Roots named `<name>-<pid>` whose process has exited are removed first: the last run's data
/// stays for inspection until the next run of the same name, and repeated runs do not pile up
/// (each root holds a PostgreSQL cluster and a RabbitMQ node, ~150 MB).
pub fn lab_root(name: &str) -> anyhow::Result<PathBuf> {
    let target = bin_dir()?.parent().context("no target folder")?.to_owned();
    let parent = target.join("e2e");
    remove_stale_roots(&parent, name);
    let root = parent.join(format!("{name}-{}", std::process::id()));
    if root.exists() {
        std::fs::remove_dir_all(&root).with_context(|| format!("clearing {}", root.display()))?;
    }
    std::fs::create_dir_all(&root)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for dir in [root.as_path(), root.parent().unwrap_or(&root)] {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    Ok(root)
}

/// Removes `<parent>/<name>-<pid>` folders whose process no longer runs (best effort: a folder
/// that cannot be removed is left, with a warning).
fn remove_stale_roots(parent: &std::path::Path, name: &str) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(pid) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(name)?.strip_prefix('-'))
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let alive = std::path::Path::new(&format!("/proc/{pid}")).exists();
        if !alive && let Err(e) = std::fs::remove_dir_all(entry.path()) {
            eprintln!(
                "warning: could not remove old lab root {}: {e}",
                entry.path().display()
            );
        }
    }
}

/// Starts the exchange (PostgreSQL, RabbitMQ, engine, persistence, gateway) on free ports.
pub async fn start_exchange(name: &str) -> anyhow::Result<Lab> {
    let config =
        LabConfig::ephemeral(lab_root(name)?, [Component::OrderGateway])?.with_bin_dir(bin_dir()?);
    let started = Instant::now();
    let lab = Lab::start(config).await.context("starting the lab")?;
    eprintln!("lab up in {:.1} s", started.elapsed().as_secs_f64());
    Ok(lab)
}

/// What a failed check should show beside its own message, since CI keeps only the test's
/// output: for each component, the last `lines` lines of its log that are warnings or errors
/// (services log JSON with a `level`) or, for PostgreSQL and RabbitMQ, its last `lines` lines.
pub fn log_tails(lab: &Lab, components: &[Component], lines: usize) -> String {
    let mut out = String::new();
    for &c in components {
        let path = lab.log_file(c);
        let text = match std::fs::read(&path) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) => {
                out.push_str(&format!("--- {}: cannot read: {e}\n", path.display()));
                continue;
            }
        };
        let service = matches!(
            c,
            Component::MatchingEngine | Component::Persistence | Component::OrderGateway
        );
        let picked: Vec<&str> = text
            .lines()
            .filter(|l| {
                !service
                    || l.contains(r#""level":"WARN""#)
                    || l.contains(r#""level":"ERROR""#)
                    || l.starts_with("=== lab")
            })
            .collect();
        let what = if service {
            "warnings and errors"
        } else {
            "lines"
        };
        out.push_str(&format!(
            "--- {} (last {} {what} of {}):\n",
            c.name(),
            lines.min(picked.len()),
            path.display()
        ));
        for l in &picked[picked.len().saturating_sub(lines)..] {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

/// Polls `check` every 20 ms until it returns `Some`, or fails after `deadline` naming `what`.
pub async fn eventually<T, F, Fut>(
    what: &str,
    deadline: Duration,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if start.elapsed() > deadline {
            bail!("{what}: not true after {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A small JSON-over-HTTP client.
#[derive(Debug, Clone)]
pub struct Http {
    client: reqwest::Client,
}

impl Default for Http {
    fn default() -> Self {
        Http::new()
    }
}

impl Http {
    pub fn new() -> Http {
        Http {
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("a default reqwest client builds"),
        }
    }

    pub async fn get(&self, url: &str) -> anyhow::Result<(u16, Value)> {
        let r = self
            .client
            .get(url)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        let code = r.status().as_u16();
        Ok((code, r.json().await.unwrap_or(Value::Null)))
    }

    pub async fn post(&self, url: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
        let r = self
            .client
            .post(url)
            .json(body)
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let code = r.status().as_u16();
        Ok((code, r.json().await.unwrap_or(Value::Null)))
    }

    /// POST raw bytes with a content type.
    pub async fn post_raw(&self, url: &str, body: Vec<u8>) -> anyhow::Result<(u16, Value)> {
        let r = self
            .client
            .post(url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let code = r.status().as_u16();
        Ok((code, r.json().await.unwrap_or(Value::Null)))
    }

    pub async fn delete(&self, url: &str) -> anyhow::Result<(u16, Value)> {
        let r = self
            .client
            .delete(url)
            .send()
            .await
            .with_context(|| format!("DELETE {url}"))?;
        let code = r.status().as_u16();
        Ok((code, r.json().await.unwrap_or(Value::Null)))
    }
}
