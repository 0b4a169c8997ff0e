//! Observability end to end.
//!
//! * The Prometheus rules pass `promtool check rules` and their unit tests (`promtool test
//!   rules`), and the compose Prometheus configuration passes `promtool check config`.
//! * The Grafana dashboards are valid Grafana JSON that the provisioning files load.
//! * The container deployment (`docker-compose.yml`, `deploy/docker/`) runs the lab's
//!   components with the environment the lab gives them.
//! * On a real lab with Prometheus (and the eBPF agent when root) under load: every panel query
//!   of every dashboard returns data — except the chaos row (no experiment runs: the queries
//!   must only be valid) and, when not root, the kernel row (reported as SKIPPED) — every
//!   service's `/metrics` passes `promtool check metrics`, and every rule evaluates cleanly.
//!
//! Without `promtool`/`prometheus` (installed by `make test` through `scripts/ensure-deps`) the
//! tests that need them print SKIPPED and pass.

use e2e::{Http, bin_dir, lab_root};
use lab::{Component, Lab, LabConfig};
use loadgen::flow::FlowSpec;
use loadgen::run::RunSpec;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// What `$__rate_interval` becomes: Grafana's value for a 1 s scrape interval is 4 s; 15 s
/// gives each rate several samples and is what a person would see zoomed out a little.
const RATE_INTERVAL_S: u64 = 15;

/// `$__rate_interval` for a panel: Grafana makes it at least four times the panel's minimum
/// interval (`"interval": "15s"` on the kernel panels, whose agent is scraped every 15 s).
fn rate_interval(panel: &Value) -> String {
    let min = panel["interval"]
        .as_str()
        .and_then(|s| s.strip_suffix('s'))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    format!("{}s", RATE_INTERVAL_S.max(4 * min))
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e sits inside the workspace")
        .to_owned()
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// `promtool`, or `None` after printing why the caller is skipped.
fn promtool(test: &str) -> Option<PathBuf> {
    let found = which("promtool");
    if found.is_none() {
        println!(
            "SKIPPED {test}: promtool not found (apt-get install prometheus; `make test` installs it)"
        );
    }
    found
}

/// Runs promtool with `args` (and `stdin`), returning success and everything it printed.
fn run_promtool(promtool: &Path, args: &[&str], stdin: Option<&str>) -> (bool, String) {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let mut child = Command::new(promtool)
        .args(args)
        .current_dir(repo())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool starts");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(text.as_bytes())
            .expect("writing to promtool");
    }
    let out = child.wait_with_output().expect("promtool finishes");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn files(dir: &str, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(repo().join(dir))
        .unwrap_or_else(|e| panic!("reading {dir}: {e}"))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no *.{ext} in {dir}");
    v
}

fn rel(p: &Path) -> String {
    p.strip_prefix(repo()).unwrap_or(p).display().to_string()
}

fn read_yaml(path: &str) -> serde_yaml::Value {
    let text = std::fs::read_to_string(repo().join(path))
        .unwrap_or_else(|e| panic!("reading {path}: {e}"));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{path} is not YAML: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Rules and configuration
// ---------------------------------------------------------------------------------------------

#[test]
fn prometheus_rules_and_configs_pass_promtool() {
    let Some(promtool) = promtool("prometheus_rules_and_configs_pass_promtool") else {
        return;
    };
    let rules: Vec<String> = files("deploy/prometheus/rules", "yml")
        .iter()
        .map(|p| rel(p))
        .collect();
    let tests: Vec<String> = files("deploy/prometheus/tests", "yml")
        .iter()
        .map(|p| rel(p))
        .collect();
    let mut check_rules = vec!["check", "rules"];
    check_rules.extend(rules.iter().map(String::as_str));
    let mut test_rules = vec!["test", "rules"];
    test_rules.extend(tests.iter().map(String::as_str));
    // The compose Prometheus (its rule_files resolve to deploy/prometheus/rules).
    let checks = [
        check_rules,
        test_rules,
        vec!["check", "config", "deploy/prometheus/prometheus.yml"],
    ];
    for args in checks {
        let (ok, out) = run_promtool(&promtool, &args, None);
        eprintln!("promtool {}:\n{out}", args.join(" "));
        assert!(ok, "promtool {} failed:\n{out}", args.join(" "));
    }
    // Every alert has at least one unit test.
    let tested: String = tests
        .iter()
        .map(|t| std::fs::read_to_string(repo().join(t)).expect("test file"))
        .collect();
    for alert in alert_names() {
        assert!(
            tested.contains(&format!("alertname: {alert}\n")),
            "alert {alert} has no test in deploy/prometheus/tests"
        );
    }
}

fn alert_names() -> Vec<String> {
    let doc = read_yaml("deploy/prometheus/rules/alerts.yml");
    doc["groups"]
        .as_sequence()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_sequence().expect("rules").iter())
        .filter_map(|r| r["alert"].as_str().map(str::to_owned))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Dashboards
// ---------------------------------------------------------------------------------------------

/// Which row a panel sits in decides what its queries must show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RowKind {
    Normal,
    /// The chaos runner's metrics: valid PromQL, empty while no experiment runs.
    Chaos,
    /// The eBPF agent's metrics: data only while the agent runs (as root).
    Kernel,
}

#[derive(Debug, Clone)]
struct PanelQuery {
    dashboard: String,
    row: String,
    kind: RowKind,
    panel: String,
    ref_id: String,
    expr: String,
    /// What `$__rate_interval` becomes in this panel.
    rate_interval: String,
}

fn dashboards() -> Vec<(String, Value)> {
    files("grafana/dashboards", "json")
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("dashboard file");
            let v: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not JSON: {e}", rel(&p)));
            (rel(&p), v)
        })
        .collect()
}

/// Every panel, in order, with the title of the row it belongs to (collapsed rows keep their
/// panels inside the row).
fn panels_with_rows(dash: &Value) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut row = String::new();
    for p in dash["panels"].as_array().expect("panels") {
        if p["type"] == "row" {
            row = p["title"].as_str().unwrap_or_default().to_owned();
            for inner in p["panels"].as_array().into_iter().flatten() {
                out.push((row.clone(), inner.clone()));
            }
        } else {
            out.push((row.clone(), p.clone()));
        }
    }
    out
}

fn row_kind(title: &str) -> RowKind {
    if title.starts_with("Chaos") {
        RowKind::Chaos
    } else if title.starts_with("Kernel") {
        RowKind::Kernel
    } else {
        RowKind::Normal
    }
}

fn panel_queries() -> Vec<PanelQuery> {
    let mut out = Vec::new();
    for (file, dash) in dashboards() {
        for (row, p) in panels_with_rows(&dash) {
            for t in p["targets"].as_array().into_iter().flatten() {
                out.push(PanelQuery {
                    dashboard: file.clone(),
                    kind: row_kind(&row),
                    row: row.clone(),
                    panel: p["title"].as_str().unwrap_or_default().to_owned(),
                    ref_id: t["refId"].as_str().unwrap_or_default().to_owned(),
                    expr: t["expr"].as_str().unwrap_or_default().to_owned(),
                    rate_interval: rate_interval(&p),
                });
            }
        }
    }
    out
}

/// The dashboard's template variables: name → `label_values(...)` query.
fn variables(dash: &Value) -> BTreeMap<String, String> {
    dash["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| {
            let q = v["query"]["query"]
                .as_str()
                .or_else(|| v["query"].as_str())
                .or_else(|| v["definition"].as_str())
                .unwrap_or_default();
            (
                v["name"].as_str().unwrap_or_default().to_owned(),
                q.to_owned(),
            )
        })
        .collect()
}

/// Names of the variables `expr` uses (`$name` or `${name}`), Grafana's built-ins aside.
fn used_variables(expr: &str, known: &BTreeMap<String, String>) -> Vec<String> {
    known
        .keys()
        .filter(|name| {
            expr.contains(&format!("${{{name}}}"))
                || expr.match_indices(&format!("${name}")).any(|(i, m)| {
                    !expr[i + m.len()..]
                        .chars()
                        .next()
                        .is_some_and(|c| c.is_alphanumeric() || c == '_')
                })
        })
        .cloned()
        .collect()
}

/// `expr` with Grafana's built-in intervals and the given variable values substituted.
fn substitute(expr: &str, rate_interval: &str, values: &BTreeMap<String, String>) -> String {
    let mut s = expr
        .replace("${__rate_interval}", rate_interval)
        .replace("$__rate_interval", rate_interval)
        .replace("$__interval", "5s")
        .replace("$__range", "5m");
    // Longest names first, so that `$job` does not eat into `$jobs`.
    let mut names: Vec<&String> = values.keys().collect();
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for name in names {
        let v = &values[name];
        s = s.replace(&format!("${{{name}}}"), v);
        s = s.replace(&format!("${name}"), v);
    }
    s
}

#[test]
fn dashboards_are_valid_grafana_json_and_provisioned() {
    let mut uids = BTreeSet::new();
    for (file, d) in dashboards() {
        let uid = d["uid"].as_str().unwrap_or_default();
        assert!(
            !uid.is_empty() && uid.len() <= 40,
            "{file}: uid missing or too long"
        );
        assert!(uids.insert(uid.to_owned()), "{file}: uid {uid} used twice");
        assert!(
            d["title"].as_str().is_some_and(|t| !t.is_empty()),
            "{file}: title"
        );
        let schema = d["schemaVersion"].as_u64().unwrap_or(0);
        assert!(
            (36..=41).contains(&schema),
            "{file}: schemaVersion {schema}"
        );
        assert!(
            d["id"].is_null(),
            "{file}: provisioned dashboards carry no id"
        );
        let mut ids = BTreeSet::new();
        let mut boxes: Vec<(String, [u64; 4])> = Vec::new();
        let mut rows = BTreeSet::new();
        let all: Vec<Value> = d["panels"]
            .as_array()
            .expect("panels")
            .iter()
            .flat_map(|p| {
                std::iter::once(p.clone())
                    .chain(p["panels"].as_array().into_iter().flatten().cloned())
            })
            .collect();
        for p in &all {
            let title = p["title"].as_str().unwrap_or_default().to_owned();
            let id = p["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("{file}: {title}: id"));
            assert!(ids.insert(id), "{file}: panel id {id} used twice");
            let g = &p["gridPos"];
            let b = ["x", "y", "w", "h"].map(|k| {
                g[k].as_u64()
                    .unwrap_or_else(|| panic!("{file}: {title}: gridPos.{k}"))
            });
            assert!(
                b[2] >= 1 && b[0] + b[2] <= 24 && b[3] >= 1,
                "{file}: {title}: gridPos {g}"
            );
            if p["type"] == "row" {
                rows.insert(title.clone());
                assert_eq!(b[2], 24, "{file}: row {title} spans the width");
            } else {
                assert_eq!(
                    p["datasource"]["uid"], "prometheus",
                    "{file}: {title}: datasource"
                );
                assert!(
                    [
                        "timeseries",
                        "stat",
                        "heatmap",
                        "gauge",
                        "table",
                        "bargauge"
                    ]
                    .contains(&p["type"].as_str().unwrap_or_default()),
                    "{file}: {title}: panel type {}",
                    p["type"]
                );
                let targets = p["targets"].as_array().expect("targets");
                assert!(!targets.is_empty(), "{file}: {title}: no query");
                // The agent is scraped less often than the services: a rate over a window
                // shorter than two of its scrapes would show gaps.
                if targets
                    .iter()
                    .any(|t| t["expr"].as_str().is_some_and(|e| e.contains("probes_")))
                {
                    assert_eq!(
                        p["interval"].as_str(),
                        Some(lab::launch::PROBES_SCRAPE_INTERVAL),
                        "{file}: {title}: a kernel panel's minimum interval is the agent's scrape interval"
                    );
                }
                let mut refs = BTreeSet::new();
                for t in targets {
                    assert!(
                        t["expr"].as_str().is_some_and(|e| !e.trim().is_empty()),
                        "{file}: {title}: empty expr"
                    );
                    assert_eq!(t["datasource"]["uid"], "prometheus", "{file}: {title}");
                    assert!(
                        refs.insert(t["refId"].as_str().unwrap_or_default().to_owned()),
                        "{file}: {title}: refId twice"
                    );
                }
            }
            for (other, ob) in &boxes {
                let overlap = b[0] < ob[0] + ob[2]
                    && ob[0] < b[0] + b[2]
                    && b[1] < ob[1] + ob[3]
                    && ob[1] < b[1] + b[3];
                assert!(!overlap, "{file}: panels {title} and {other} overlap");
            }
            boxes.push((title, b));
        }
        for marked in ["Chaos", "Kernel"] {
            assert!(
                rows.iter().any(|r| r.starts_with(marked)),
                "{file}: no {marked} row"
            );
        }
        for (name, query) in variables(&d) {
            assert!(
                query.starts_with("label_values("),
                "{file}: variable {name}: only label_values() is supported here: {query}"
            );
        }
    }
    assert!(uids.contains("exchange-overview") && uids.contains("service-drilldown"));

    // Provisioning: the datasource the dashboards name, and a provider for their folder.
    let ds = read_yaml("grafana/provisioning/datasources/prometheus.yml");
    let sources = ds["datasources"].as_sequence().expect("datasources");
    assert!(
        sources
            .iter()
            .any(|s| s["uid"] == "prometheus" && s["type"] == "prometheus"),
        "datasource uid prometheus"
    );
    let prov = read_yaml("grafana/provisioning/dashboards/dashboards.yml");
    let path = prov["providers"][0]["options"]["path"]
        .as_str()
        .expect("provider path")
        .to_owned();
    let compose = read_yaml("docker-compose.yml");
    let mounts: Vec<&str> = compose["services"]["grafana"]["volumes"]
        .as_sequence()
        .expect("grafana volumes")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(
        mounts
            .iter()
            .any(|m| m.starts_with("./grafana/dashboards:") && m.contains(&path)),
        "compose mounts grafana/dashboards where the provider reads ({path}): {mounts:?}"
    );
    assert!(
        mounts
            .iter()
            .any(|m| m.starts_with("./grafana/provisioning:/etc/grafana/provisioning")),
        "compose mounts the provisioning: {mounts:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// The container deployment
// ---------------------------------------------------------------------------------------------

/// The compose file has a service per lab component, each service gets the environment the
/// lab gives it (with the compose host names), a `/readyz` healthcheck, restart on failure and
/// a volume for its data directory; the Dockerfiles build binaries that exist.
#[test]
fn compose_matches_the_lab_components() {
    let compose = read_yaml("docker-compose.yml");
    let services = compose["services"].as_mapping().expect("services");
    let svc = |name: &str| -> &serde_yaml::Value {
        services
            .get(name)
            .unwrap_or_else(|| panic!("docker-compose.yml has no service {name}"))
    };
    let env = |name: &str| -> BTreeMap<String, String> {
        let e = &svc(name)["environment"];
        match e {
            serde_yaml::Value::Mapping(m) => m
                .iter()
                .map(|(k, v)| {
                    let v = match v {
                        serde_yaml::Value::String(s) => s.clone(),
                        other => serde_yaml::to_string(other).unwrap_or_default(),
                    };
                    (k.as_str().unwrap_or_default().to_owned(), v)
                })
                .collect(),
            serde_yaml::Value::Sequence(s) => s
                .iter()
                .filter_map(|kv| kv.as_str()?.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            _ => BTreeMap::new(),
        }
    };
    for infra in ["postgres", "rabbitmq", "prometheus", "grafana"] {
        svc(infra);
    }
    let workspace_bins = workspace_binaries();
    let scrape = read_yaml("deploy/prometheus/prometheus.yml");
    for c in Component::ALL {
        let spec = c.spec();
        let lab::component::Kind::Service { binary } = spec.kind else {
            continue;
        };
        let name = c.name();
        let s = svc(name);
        let e = env(name);
        let addr = e
            .get("APP__HTTP__ADDR")
            .unwrap_or_else(|| panic!("{name}: APP__HTTP__ADDR"));
        let port = addr
            .rsplit_once(':')
            .map(|(_, p)| p.to_owned())
            .unwrap_or_default();
        assert!(
            addr.starts_with("0.0.0.0:"),
            "{name}: listens on every interface of its container: {addr}"
        );
        let data = e
            .get("APP__DATA__DIR")
            .unwrap_or_else(|| panic!("{name}: APP__DATA__DIR"));
        assert_eq!(
            e.get("APP__LOG__FORMAT").map(String::as_str),
            Some("json"),
            "{name}: APP__LOG__FORMAT"
        );
        for link in spec.links {
            let target = link.target.name();
            let url = e
                .get(link.env)
                .unwrap_or_else(|| panic!("{name}: {} (the lab sets it)", link.env));
            assert!(
                url.contains(&format!("@{target}:")) || url.contains(&format!("//{target}:")),
                "{name}: {} = {url} points at the {target} service",
                link.env
            );
            let dep = &s["depends_on"][target];
            assert_eq!(
                dep["condition"], "service_healthy",
                "{name} waits for {target} to be healthy"
            );
        }
        let health: Vec<&str> = s["healthcheck"]["test"]
            .as_sequence()
            .unwrap_or_else(|| panic!("{name}: healthcheck.test"))
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert!(
            health
                .iter()
                .any(|a| a.contains(&format!(":{port}/readyz"))),
            "{name}: healthcheck on /readyz at port {port}: {health:?}"
        );
        assert_eq!(s["restart"], "on-failure", "{name}: restart");
        let vols: Vec<&str> = s["volumes"]
            .as_sequence()
            .unwrap_or_else(|| panic!("{name}: volumes"))
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert!(
            vols.iter().any(|v| v.ends_with(&format!(":{data}"))),
            "{name}: a volume at its data dir {data}: {vols:?}"
        );
        // Built from a Dockerfile under deploy/docker that exists, for a binary that exists.
        let build = &s["build"];
        let dockerfile = build["dockerfile"].as_str().expect("build.dockerfile");
        assert!(
            dockerfile.starts_with("deploy/docker/") && repo().join(dockerfile).is_file(),
            "{name}: dockerfile {dockerfile}"
        );
        let built = build["args"]["BIN"].as_str().expect("build.args.BIN");
        assert_eq!(built, binary, "{name}: builds the lab's binary");
        assert!(
            workspace_bins.contains(built),
            "{name}: {built} is not a binary of the workspace ({workspace_bins:?})"
        );
        // Prometheus scrapes it under the lab's job name, at its port.
        if spec.scraped {
            let job = scrape["scrape_configs"]
                .as_sequence()
                .expect("scrape_configs")
                .iter()
                .find(|j| j["job_name"] == name)
                .unwrap_or_else(|| panic!("prometheus.yml: no job {name}"));
            let target = job["static_configs"][0]["targets"][0]
                .as_str()
                .unwrap_or_default();
            assert_eq!(target, format!("{name}:{port}"), "prometheus.yml: {name}");
        }
    }
    // Every path a Dockerfile copies from the build context exists.
    for file in files("deploy/docker", "Dockerfile") {
        let text = std::fs::read_to_string(&file).expect("Dockerfile");
        for line in text.lines() {
            let line = line.trim();
            let Some(rest) = line.strip_prefix("COPY ") else {
                continue;
            };
            if rest.starts_with("--from") {
                continue;
            }
            let parts: Vec<&str> = rest.split_whitespace().collect();
            for src in &parts[..parts.len().saturating_sub(1)] {
                if src.starts_with("--") {
                    continue;
                }
                assert!(
                    repo().join(src).exists(),
                    "{}: COPY {src}: no such path in the repository",
                    rel(&file)
                );
            }
        }
    }
}

/// Binary names of the workspace: packages with `src/main.rs` and every `src/bin/*.rs`.
fn workspace_binaries() -> BTreeSet<String> {
    let mut bins = BTreeSet::new();
    for member in workspace_members() {
        let dir = repo().join(&member);
        let cargo = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap_or_default();
        let name = cargo
            .lines()
            .find_map(|l| l.trim().strip_prefix("name = "))
            .map(|n| n.trim_matches('"').to_owned());
        if let Some(name) = name
            && dir.join("src/main.rs").is_file()
        {
            bins.insert(name);
        }
        if let Ok(entries) = std::fs::read_dir(dir.join("src/bin")) {
            for e in entries.flatten() {
                if let Some(stem) = e.path().file_stem().and_then(|s| s.to_str()) {
                    bins.insert(stem.to_owned());
                }
            }
        }
    }
    bins
}

/// The `members` list of the workspace manifest (one quoted path per line).
fn workspace_members() -> Vec<String> {
    let text = std::fs::read_to_string(repo().join("Cargo.toml")).expect("workspace Cargo.toml");
    let start = text.find("members = [").expect("workspace members");
    let list = &text[start..];
    let end = list.find(']').expect("end of members");
    list[..end]
        .lines()
        .skip(1)
        .filter_map(|l| {
            let l = l.trim().trim_end_matches(',');
            l.strip_prefix('"')?.strip_suffix('"').map(str::to_owned)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The stack under load
// ---------------------------------------------------------------------------------------------

/// A Prometheus HTTP API client.
struct Prom {
    http: reqwest::Client,
    base: String,
}

/// What one instant query gave.
#[derive(Debug)]
enum Answer {
    /// At least one sample that is a number (not NaN).
    Data(usize),
    /// The query ran; nothing (or only NaN) came back.
    Empty,
    /// Prometheus refused the query or could not be reached.
    Error(String),
}

impl Prom {
    async fn query(&self, promql: &str) -> Answer {
        let resp = self
            .http
            .get(format!(
                "{}/api/v1/query?query={}",
                self.base,
                urlencode(promql)
            ))
            .send()
            .await;
        let body: Value = match resp {
            Ok(r) => match r.json().await {
                Ok(v) => v,
                Err(e) => return Answer::Error(format!("unreadable answer: {e}")),
            },
            Err(e) => return Answer::Error(e.to_string()),
        };
        if body["status"] != "success" {
            return Answer::Error(format!("{}: {}", body["errorType"], body["error"]));
        }
        let data = &body["data"];
        let values: Vec<&Value> = match data["resultType"].as_str() {
            Some("vector") => data["result"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| &s["value"][1])
                .collect(),
            Some("scalar") => vec![&data["result"][1]],
            Some("matrix") => data["result"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|s| s["values"].as_array().into_iter().flatten().map(|v| &v[1]))
                .collect(),
            _ => Vec::new(),
        };
        let numbers = values
            .iter()
            .filter(|v| v.as_str().is_some_and(|s| s != "NaN"))
            .count();
        if numbers > 0 {
            Answer::Data(numbers)
        } else {
            Answer::Empty
        }
    }

    /// Polls until every query in `all` returns data, or panics after `deadline` naming the
    /// ones that did not.
    async fn wait_for_all(&self, what: &str, all: &[&str], deadline: Duration) {
        let started = Instant::now();
        loop {
            let mut missing = Vec::new();
            for q in all {
                if !matches!(self.query(q).await, Answer::Data(_)) {
                    missing.push(*q);
                }
            }
            if missing.is_empty() {
                eprintln!(
                    "{what}: seen after {:.1} s",
                    started.elapsed().as_secs_f64()
                );
                return;
            }
            assert!(
                started.elapsed() < deadline,
                "{what}: not seen within {deadline:?}: {missing:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Values of `label` on the series `label_values(selector, label)` names.
    async fn label_values(&self, query: &str) -> Result<Vec<String>, String> {
        let inner = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .ok_or_else(|| format!("not label_values(): {query}"))?;
        let (selector, label) = match inner.rsplit_once(',') {
            Some((s, l)) => (Some(s.trim()), l.trim()),
            None => (None, inner.trim()),
        };
        let mut url = format!("{}/api/v1/label/{label}/values", self.base);
        if let Some(s) = selector {
            url.push_str(&format!("?match[]={}", urlencode(s)));
        }
        let body: Value = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        Ok(body["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect())
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One query to run: a panel target with its variables filled in.
#[derive(Debug, Clone)]
struct Check {
    query: PanelQuery,
    /// Variable values used, for the report.
    with: String,
    promql: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_returns_data_under_load() {
    let test = "every_dashboard_query_returns_data_under_load";
    let Some(promtool) = promtool(test) else {
        return;
    };
    if which("prometheus").is_none() {
        println!("SKIPPED {test}: prometheus not found (apt-get install prometheus)");
        return;
    }
    let bins = bin_dir().expect("service binaries are built");
    let root = is_root();
    let with_probes = root && bins.join("probes").is_file();
    let profiler = bins.join("profiler");
    let mut components = vec![Component::OrderGateway, Component::Prometheus];
    if with_probes {
        components.push(Component::Probes);
    } else if root {
        println!(
            "kernel panels will be SKIPPED: {} is missing (cargo build --workspace --bins)",
            bins.join("probes").display()
        );
    } else {
        println!("kernel panels will be SKIPPED: the eBPF agent needs root");
    }
    let mut config = LabConfig::ephemeral(lab_root("observability").unwrap(), components)
        .unwrap()
        .with_bin_dir(bins);
    config.repo = Some(repo());
    let started = Instant::now();
    let lab = Lab::start(config).await.expect("lab starts");
    eprintln!(
        "lab up in {:.1} s (probes agent: {})",
        started.elapsed().as_secs_f64(),
        if with_probes {
            "running"
        } else {
            "not running"
        }
    );
    let gateway = lab.url(Component::OrderGateway).unwrap();
    let prom = Prom {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap(),
        base: lab.url(Component::Prometheus).unwrap(),
    };

    // Load: orders at a constant rate, plus reads of order status and books (the gateway's
    // calls to persistence and the engine's book route), until the queries are answered.
    let dir = lab.root().join("loadgen");
    std::fs::create_dir_all(&dir).unwrap();
    let (stop_load, load_stopped) = tokio::sync::oneshot::channel::<()>();
    let load = tokio::spawn(loadgen::run::run(
        RunSpec {
            target: gateway.clone(),
            rate_per_sec: 200.0,
            duration: Duration::from_secs(240),
            flow: FlowSpec {
                seed: 7,
                symbols: vec!["AAPL".into(), "MSFT".into(), "GOOG".into()],
                cancel_share: 0.1,
                accounts: 10,
                client_id_prefix: "obs".into(),
            },
            ledger: Some(dir.join("obs.ledger.jsonl")),
            summary: Some(dir.join("obs.summary.json")),
            request_timeout: Duration::from_secs(10),
            max_in_flight: 2_000,
            batch: 1,
            progress: false,
        },
        async move {
            let _ = load_stopped.await;
        },
    ));
    let reading = Arc::new(AtomicBool::new(true));
    let reader = tokio::spawn(read_load(gateway.clone(), reading.clone()));

    // Prometheus has seen orders flow for 20 s: every rate window of the panels is full.
    let flowing = "count_over_time((sum(rate(gateway_orders_total{outcome=\"accepted\"}[5s])) > 0)[20s:1s]) >= 19";
    let warmup = Instant::now();
    loop {
        if let Answer::Data(_) = prom.query(flowing).await {
            break;
        }
        assert!(
            warmup.elapsed() < Duration::from_secs(120),
            "Prometheus never saw 20 s of accepted orders"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "Prometheus has 20 s of load after {:.1} s",
        warmup.elapsed().as_secs_f64()
    );

    // Every check, with variables resolved against the live Prometheus.
    let queries = panel_queries();
    let panels: BTreeSet<(String, String)> = queries
        .iter()
        .map(|q| (q.dashboard.clone(), q.panel.clone()))
        .collect();
    eprintln!(
        "{} panels, {} queries in {} dashboards",
        panels.len(),
        queries.len(),
        dashboards().len()
    );
    let deadline = Instant::now() + Duration::from_secs(150);
    let mut pending: Vec<Check> = Vec::new();
    let mut passed: Vec<(Check, usize)> = Vec::new();
    let mut chaos_valid: Vec<Check> = Vec::new();
    let mut skipped: Vec<Check> = Vec::new();
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    let mut resolved = false;
    loop {
        if !resolved {
            match resolve_checks(&prom, &queries, with_probes).await {
                Ok(checks) => {
                    resolved = true;
                    for c in checks {
                        let skip = c.query.kind == RowKind::Kernel && !with_probes;
                        match (skip, c.query.kind) {
                            (true, _) => skipped.push(c),
                            (false, RowKind::Chaos) => chaos_valid.push(c),
                            _ => pending.push(c),
                        }
                    }
                    // Chaos and skipped kernel queries: valid PromQL is all they can show.
                    for c in chaos_valid.iter().chain(skipped.iter()) {
                        if let Answer::Error(e) = prom.query(&c.promql).await {
                            panic!(
                                "{} / {} / {}: invalid query {}: {e}",
                                c.query.dashboard, c.query.row, c.query.panel, c.promql
                            );
                        }
                    }
                }
                Err(why) => {
                    last.insert("variables".into(), why);
                }
            }
        }
        if resolved {
            let mut still = Vec::new();
            for c in pending.drain(..) {
                match prom.query(&c.promql).await {
                    Answer::Data(n) => passed.push((c, n)),
                    Answer::Error(e) if e.contains("bad_data") => panic!(
                        "{} / {} / {}: invalid query {}: {e}",
                        c.query.dashboard, c.query.row, c.query.panel, c.promql
                    ),
                    other => {
                        last.insert(c.promql.clone(), format!("{other:?}"));
                        still.push(c);
                    }
                }
            }
            pending = still;
            if pending.is_empty() {
                break;
            }
        }
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let loaded_for = started.elapsed();
    let report: Vec<String> = pending
        .iter()
        .map(|c| {
            format!(
                "  {} / {} / {} [{}]{}: {}  -> {}",
                c.query.dashboard,
                c.query.row,
                c.query.panel,
                c.query.ref_id,
                c.with,
                c.promql,
                last.get(&c.promql).map(String::as_str).unwrap_or("?")
            )
        })
        .collect();
    assert!(
        resolved,
        "template variables never resolved: {:?}",
        last.get("variables")
    );

    // While the load still runs: every service's /metrics passes promtool, and carries the
    // families the dashboards and alerts are built on.
    let mut scraped = String::new();
    let mut targets = vec![
        Component::OrderGateway,
        Component::MatchingEngine,
        Component::Persistence,
    ];
    if with_probes {
        targets.push(Component::Probes);
    }
    for c in targets {
        let url = format!("{}/metrics", lab.url(c).unwrap());
        let text = http_text(&url).await;
        let (ok, out) = run_promtool(&promtool, &["check", "metrics"], Some(&text));
        assert!(ok, "promtool check metrics on {c} /metrics:\n{out}");
        eprintln!(
            "promtool check metrics: {c} /metrics OK ({} lines)",
            text.lines().count()
        );
        scraped.push_str(&text);
    }
    for family in REQUIRED_FAMILIES {
        assert!(
            scraped.contains(family),
            "{family} is missing from the services' /metrics"
        );
    }

    // Every rule of deploy/prometheus/rules loaded and evaluates without error on real data.
    let rules: Value = prom
        .http
        .get(format!("{}/api/v1/rules", prom.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let groups = rules["data"]["groups"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let names: BTreeSet<&str> = groups.iter().filter_map(|g| g["name"].as_str()).collect();
    for g in [
        "exchange-red",
        "exchange-slo",
        "exchange-slo-alerts",
        "exchange-symptom-alerts",
    ] {
        assert!(names.contains(g), "rule group {g} not loaded: {names:?}");
    }
    for r in groups
        .iter()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
    {
        assert_ne!(
            r["health"], "err",
            "rule {} fails: {}",
            r["name"], r["lastError"]
        );
    }
    let firing: Vec<String> = groups
        .iter()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .filter(|r| r["type"] == "alerting" && r["state"] != "inactive")
        .map(|r| format!("{} ({})", r["name"], r["state"]))
        .collect();
    eprintln!("alerts pending or firing during the run: {firing:?}");

    // `make profile-all` against this lab while the load runs: CPU, heap and, from the eBPF
    // agent, off-CPU stacks of every service.
    let state = lab.root().join("state.json");
    tokio::task::spawn_blocking(move || profile_all(&profiler, &state, with_probes))
        .await
        .expect("profile-all check");

    // A broker outage under load, seen through the metrics: the outbox lag grows while the
    // publisher is disconnected (the publish loop is not running then), the engine reports
    // RabbitMQ down and DependencyDown goes pending, and the return is counted as a reconnect.
    eprintln!("== broker outage under load");
    lab.stop(Component::Rabbitmq).await.expect("stop rabbitmq");
    let outage = [
        "engine_outbox_lag_events > 0 and engine_outbox_lag_bytes > 0",
        "dependency_up{job=\"matching-engine\", dependency=\"rabbitmq\"} == 0",
        "ALERTS{alertname=\"DependencyDown\", job=\"matching-engine\", dependency=\"rabbitmq\"}",
    ];
    prom.wait_for_all("broker away", &outage, Duration::from_secs(60))
        .await;
    lab.start_component(Component::Rabbitmq)
        .await
        .expect("start rabbitmq");
    let back = [
        "dependency_reconnects_total{job=\"matching-engine\", dependency=\"rabbitmq\"} >= 1",
        "dependency_up{job=\"matching-engine\", dependency=\"rabbitmq\"} == 1",
        "engine_outbox_lag_events < 100",
    ];
    prom.wait_for_all("broker back", &back, Duration::from_secs(120))
        .await;

    reading.store(false, Ordering::Relaxed);
    let _ = stop_load.send(());
    let summary = load.await.unwrap().unwrap();
    eprint!("{}", summary.table());
    let reads = reader.await.unwrap();
    eprintln!("{reads} status and book reads");

    eprintln!("== dashboard queries");
    for (c, n) in &passed {
        eprintln!(
            "  data ({n} series)  {} / {} [{}]{}",
            c.query.dashboard, c.query.panel, c.query.ref_id, c.with
        );
    }
    for c in &chaos_valid {
        eprintln!(
            "  valid, empty (no experiment runs)  {} / {} [{}]{}",
            c.query.dashboard, c.query.panel, c.query.ref_id, c.with
        );
    }
    for c in &skipped {
        println!(
            "SKIPPED (the eBPF agent needs root)  {} / {} [{}]: {}",
            c.query.dashboard, c.query.panel, c.query.ref_id, c.promql
        );
    }
    let data_panels: BTreeSet<(&str, &str)> = passed
        .iter()
        .map(|(c, _)| (c.query.dashboard.as_str(), c.query.panel.as_str()))
        .collect();
    println!(
        "dashboard queries: {} returned data ({} panels), {} chaos queries valid and empty, {} kernel queries skipped, {} without data; after {:.0} s",
        passed.len(),
        data_panels.len(),
        chaos_valid.len(),
        skipped.len(),
        pending.len(),
        loaded_for.as_secs_f64()
    );
    lab.shutdown().await.expect("lab shuts down");
    assert!(
        pending.is_empty(),
        "{} dashboard queries returned no data:\n{}",
        pending.len(),
        report.join("\n")
    );
    if with_probes {
        assert!(
            passed.iter().any(|(c, _)| c.query.kind == RowKind::Kernel),
            "kernel panels were checked"
        );
    }
}

/// Families every `/metrics` together must carry: the catalogue.
const REQUIRED_FAMILIES: &[&str] = &[
    "http_server_requests_total{",
    "http_server_request_duration_seconds_bucket{",
    "dependency_request_duration_seconds_bucket{dependency=\"engine\"",
    "dependency_request_duration_seconds_bucket{dependency=\"persistence\"",
    "dependency_request_duration_seconds_bucket{dependency=\"rabbitmq\"",
    "dependency_request_duration_seconds_bucket{dependency=\"postgres\"",
    "dependency_up{",
    "dependency_reconnects_total{",
    "gateway_orders_total{outcome=\"accepted\"}",
    "gateway_orders_total{outcome=\"queued\"}",
    "gateway_orders_total{outcome=\"shed\"}",
    "gateway_orders_rejected_total{reason=",
    "spool_entries{",
    "spool_bytes{",
    "engine_book_orders{symbol=",
    "engine_book_price_levels{",
    "engine_matching_duration_seconds_bucket",
    "engine_journal_fsync_duration_seconds_bucket",
    "engine_journal_batch_size_bucket",
    "engine_outbox_lag_events",
    "engine_outbox_lag_bytes",
    "persistence_consumer_lag_seconds",
    "persistence_batch_size_bucket",
    "persistence_transaction_duration_seconds_bucket",
    "persistence_redelivered_total",
    "persistence_sequence_gaps_total",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_open_fds",
];

/// Expands every panel query over the values of the variables it uses.
/// Runs `profiler all` for 2 s on the lab of `state` and checks what it wrote: with the agent,
/// every service's off-CPU flamegraph and folded stacks (their runtime workers park in
/// `epoll_wait`); without, a manifest that says why there are none.
fn profile_all(profiler: &Path, state: &Path, with_probes: bool) {
    if !profiler.is_file() {
        println!(
            "profile-all check SKIPPED: {} is missing (cargo build --workspace --bins)",
            profiler.display()
        );
        return;
    }
    let out_dir = state.with_file_name("profiles");
    let out = std::process::Command::new(profiler)
        .args(["all", "--seconds", "2", "--rate", "0", "--warmup", "0s"])
        .arg("--state")
        .arg(state)
        .arg("--out")
        .arg(&out_dir)
        .output()
        .expect("running profiler all");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "profiler all failed:\n{stderr}");
    let dir = PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .lines()
            .last()
            .unwrap_or_default(),
    );
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).expect("manifest.json"))
            .expect("manifest JSON");
    if !with_probes {
        let why = manifest["off_cpu"].as_str().unwrap_or_default();
        assert!(
            why.contains("no eBPF agent"),
            "manifest off_cpu: {why:?}\n{stderr}"
        );
        return;
    }
    for s in manifest["services"].as_array().expect("services") {
        let name = s["name"].as_str().unwrap_or("?");
        let o = &s["off_cpu"];
        assert!(
            o["error"].is_null() && !o.is_null(),
            "{name} off-CPU: {o}\n{stderr}"
        );
        let folded = std::fs::read_to_string(dir.join(o["collapsed"].as_str().unwrap_or_default()))
            .expect("off-CPU folded stacks");
        assert!(
            folded.lines().any(|l| l.contains("epoll_wait")),
            "{name}: no runtime worker parked in epoll_wait among {} off-CPU stacks",
            folded.lines().count()
        );
        let pb = std::fs::read(dir.join(o["pprof"].as_str().unwrap_or_default()))
            .expect("off-CPU pprof profile");
        assert!(
            pb.starts_with(&[0x1f, 0x8b]),
            "{name}: the off-CPU profile is not gzipped"
        );
        let svg = std::fs::read_to_string(dir.join(o["svg"].as_str().unwrap_or_default()))
            .expect("off-CPU flamegraph");
        assert!(
            svg.starts_with("<?xml") && svg.contains("off-CPU"),
            "{name}: not an SVG flamegraph"
        );
        eprintln!(
            "profile-all: {name} {:.1} thread-seconds off-CPU in {} stacks",
            o["off_cpu_seconds"].as_f64().unwrap_or(0.0),
            o["stacks"]
        );
    }
}

async fn resolve_checks(
    prom: &Prom,
    queries: &[PanelQuery],
    with_probes: bool,
) -> Result<Vec<Check>, String> {
    let dashes: BTreeMap<String, Value> = dashboards().into_iter().collect();
    let mut checks = Vec::new();
    for q in queries {
        let vars = variables(&dashes[&q.dashboard]);
        let used = used_variables(&q.expr, &vars);
        let mut combos: Vec<BTreeMap<String, String>> = vec![BTreeMap::new()];
        for name in &used {
            let mut values = prom.label_values(&vars[name]).await?;
            let kernel_unchecked = q.kind == RowKind::Kernel && !with_probes;
            if values.is_empty() {
                if kernel_unchecked || q.kind == RowKind::Chaos {
                    values.push("none".into());
                } else {
                    return Err(format!(
                        "variable {name} ({}) has no values yet",
                        vars[name]
                    ));
                }
            }
            if name == "job" {
                for service in ["order-gateway", "matching-engine", "persistence"] {
                    if !values.iter().any(|v| v == service) {
                        return Err(format!("variable job lacks {service} yet: {values:?}"));
                    }
                }
            }
            combos = combos
                .into_iter()
                .flat_map(|c| {
                    values.iter().map(move |v| {
                        let mut c = c.clone();
                        c.insert(name.clone(), v.clone());
                        c
                    })
                })
                .collect();
        }
        for combo in combos {
            let promql = substitute(&q.expr, &q.rate_interval, &combo);
            assert!(
                !promql.contains('$'),
                "{} / {}: unsubstituted variable in {promql}",
                q.dashboard,
                q.panel
            );
            let with = if combo.is_empty() {
                String::new()
            } else {
                format!(
                    " {}",
                    combo
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(",")
                )
            };
            checks.push(Check {
                query: q.clone(),
                with,
                promql,
            });
        }
    }
    Ok(checks)
}

/// Reads order status (gateway → persistence) and books (gateway → engine) every 100 ms while
/// `go` holds; returns how many reads it made.
async fn read_load(gateway: String, go: Arc<AtomicBool>) -> u64 {
    let http = Http::new();
    let mut ids = Vec::new();
    for i in 0..5 {
        let order = serde_json::json!({
            "client_order_id": format!("obs-read-{i}"), "account": "acct-obs", "symbol": "AAPL",
            "side": "buy", "type": "limit", "price": "1.00", "quantity": 1 + i,
            "time_in_force": "gtc",
        });
        if let Ok((code, body)) = http.post(&format!("{gateway}/v1/orders"), &order).await
            && (200..300).contains(&code)
            && let Some(id) = body["order_id"].as_u64()
        {
            ids.push(id);
        }
    }
    let mut reads = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while go.load(Ordering::Relaxed) {
        tick.tick().await;
        let url = match ids.get(reads as usize % ids.len().max(1)) {
            Some(id) if reads.is_multiple_of(2) => format!("{gateway}/v1/orders/{id}"),
            _ => format!("{gateway}/v1/book/AAPL"),
        };
        let _ = http.get(&url).await;
        reads += 1;
    }
    reads
}

async fn http_text(url: &str) -> String {
    reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .text()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

/// Whether the effective uid is 0, from `/proc/self/status` (e2e has no libc binding).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}
