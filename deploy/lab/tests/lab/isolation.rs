//! Isolation (as root): every component in its own network namespace on the lab bridge and in
//! its own cgroups, faults that hit one edge, parallel labs, and nothing left behind after a
//! shutdown, a drop during a panic, or a killed supervisor (`lab cleanup`).
//!
//! These tests need root; otherwise each prints `SKIPPED: not root` and passes. The exchange
//! test runs the real services from the folder this test binary was built into
//! (`target/debug`): build them first with `cargo build --bins`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lab::isolation::Leftovers;
use lab::state::ProcessRecord;
use lab::{Component, Isolation, IsolationMode, Lab, LabConfig, LabState, Phase, Status};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::{assert_all_gone, lab_cli, processes_of, require_infra, temp_root};

const PSQL: &str = "/usr/lib/postgresql/15/bin/psql";

/// `Ok(())` as root; otherwise prints why the test is skipped.
fn require_root(test: &str) -> Result<(), ()> {
    if nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    println!("SKIPPED: not root ({test} needs network namespaces and cgroups)");
    eprintln!("SKIPPED: not root ({test} needs network namespaces and cgroups)");
    Err(())
}

/// `target/debug` with the three services, or a failure saying how to build them (a skip with
/// `LAB_SKIP_MISSING=1`).
fn service_bin_dir(test: &str) -> Result<PathBuf, ()> {
    let exe = std::env::current_exe().expect("locating the test binary");
    // target/debug/deps/lab-xxxx -> target/debug
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary lives in target/<profile>/deps")
        .to_path_buf();
    let missing: Vec<String> = ["matching-engine", "persistence", "order-gateway"]
        .iter()
        .map(|b| dir.join(b))
        .filter(|p| !p.is_file())
        .map(|p| p.display().to_string())
        .collect();
    if missing.is_empty() {
        return Ok(dir);
    }
    let why = format!(
        "{test}: missing {}: build the services with `cargo build --bins`",
        missing.join(", ")
    );
    if std::env::var_os("LAB_SKIP_MISSING").is_some() {
        println!("SKIPPED {why}");
        return Err(());
    }
    panic!("{why} (or set LAB_SKIP_MISSING=1 to skip)");
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Pids in a cgroup folder.
fn cgroup_procs(dir: &Path) -> Vec<i32> {
    lab::cgroup::members(dir)
}

/// Everything a lab could leave in the kernel is gone: namespaces, links, cgroup folders,
/// the host FORWARD rule — checked both through the state file and independently.
fn assert_isolation_gone(state: &LabState, context: &str) {
    let bridge = state
        .bridge
        .clone()
        .expect("an isolated lab records its bridge");
    let left = Leftovers::from_state(state).existing();
    assert!(left.is_empty(), "{context}: still there: {left:?}");
    let netns = run("ip", &["netns", "list"]);
    assert!(
        !netns.contains(&bridge),
        "{context}: ip netns list: {netns}"
    );
    let links = run("ip", &["-o", "link", "show"]);
    assert!(!links.contains(&bridge), "{context}: ip link: {links}");
    for ctl in ["cpu", "memory", "blkio"] {
        let dir = Path::new("/sys/fs/cgroup").join(ctl).join(&bridge);
        assert!(!dir.exists(), "{context}: {} still exists", dir.display());
    }
    let rules = run("iptables", &["-w", "-S", "FORWARD"]);
    assert!(!rules.contains(&bridge), "{context}: iptables: {rules}");
}

/// Every process of the lab right now, including everything in its cgroups.
fn every_process(state: &LabState) -> Vec<ProcessRecord> {
    let mut out = processes_of(state);
    for cs in &state.components {
        for dir in cs.cgroup.values() {
            out.extend(
                cgroup_procs(dir)
                    .into_iter()
                    .map(lab::process::record_existing),
            );
        }
    }
    out
}

/// One HTTP/1.0 request; returns the status code and the body.
async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let request = format!(
            "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await?;
        std::io::Result::Ok(String::from_utf8_lossy(&raw).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(15), attempt)
        .await
        .unwrap_or_else(|_| panic!("{method} http://{addr}{path} timed out"))
        .unwrap_or_else(|e| panic!("{method} http://{addr}{path}: {e}"));
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

fn order(client_order_id: &str) -> String {
    serde_json::json!({
        "client_order_id": client_order_id, "account": "acct-iso", "symbol": "AAPL",
        "side": "buy", "type": "limit", "price": "100.00", "quantity": 5,
        "time_in_force": "gtc",
    })
    .to_string()
}

/// iptables inside a component's namespace.
fn iptables_in(lab: &Lab, c: Component, args: &[&str]) {
    let out = lab
        .netns_command(c, "iptables")
        .expect("a namespace command")
        .arg("-w")
        .args(args)
        .output()
        .expect("running iptables in the namespace");
    assert!(
        out.status.success(),
        "iptables {args:?} in {c}'s namespace: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The whole exchange with isolation: each component in its namespace and cgroups, reachable
/// through the bridge from the host and from each other; a DROP rule in the gateway's
/// namespace towards the engine cuts exactly that edge (202 queued) and removing it heals it
/// (201); shutdown leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_exchange_end_to_end() {
    let test = "isolated_exchange_end_to_end";
    if require_root(test).is_err() || require_infra(test).is_err() {
        return;
    }
    let Ok(bin) = service_bin_dir(test) else {
        return;
    };
    let tmp = temp_root("iso");
    let mut config = LabConfig::ephemeral(
        tmp.path().join("root"),
        [Component::OrderGateway, Component::Prometheus],
    )
    .expect("ephemeral ports")
    .with_bin_dir(&bin)
    .with_isolation(Isolation::Netns);
    config.repo = Some(tmp.path().join("no-repo"));
    let t0 = Instant::now();
    let lab = match Lab::start(config).await {
        Ok(lab) => lab,
        Err(e) => panic!("isolated lab start failed: {e}"),
    };
    println!(
        "isolated exchange (5 namespaces + prometheus) ready in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    let state = LabState::read(&lab.root().join("state.json")).expect("state.json");
    assert_eq!(state.phase, Phase::Running);
    assert_eq!(state.isolation.mode, IsolationMode::Netns);
    let bridge = lab.bridge().expect("a bridge").to_string();
    assert_eq!(state.bridge.as_deref(), Some(bridge.as_str()));
    assert_eq!(state.subnet, lab.subnet());
    let gateway = lab.gateway_address().expect("a gateway address");
    assert_eq!(state.gateway_address, Some(gateway));
    assert!(
        lab.subnet()
            .is_some_and(|s| s.starts_with("198.18.") && s.ends_with(".0/24")),
        "{:?}",
        lab.subnet()
    );
    if lab::isolation::bridged_traffic_hits_iptables() {
        assert_eq!(state.host_rules.len(), 1, "FORWARD rule recorded");
        assert!(run("iptables", &["-w", "-S", "FORWARD"]).contains(&bridge));
    }

    // Each of the five in its own namespace, at its address, in its cgroups.
    let netns_list = run("ip", &["netns", "list"]);
    let host_ns = lab::netns::of_process(std::process::id() as i32).expect("our netns");
    let mut namespaces = Vec::new();
    for c in [
        Component::Postgres,
        Component::Rabbitmq,
        Component::MatchingEngine,
        Component::Persistence,
        Component::OrderGateway,
    ] {
        let cs = state.component(c).expect("component state");
        assert_eq!(cs.status, Status::Ready, "{c}");
        let ns = lab.netns(c).expect("a namespace");
        assert_eq!(cs.netns.as_deref(), Some(ns.as_str()), "{c}");
        assert!(
            netns_list.contains(&ns),
            "{ns} in `ip netns list`: {netns_list}"
        );
        assert_eq!(cs.veth.as_deref(), Some(ns.as_str()), "{c} veth");
        let addr = lab.address(c).expect("an address");
        assert_eq!(cs.address.map(IpAddr::V4), Some(addr), "{c}");
        assert!(
            lab.url(c).expect("url").contains(&addr.to_string()),
            "{c} is reached at its address"
        );
        let pid = cs.pid.expect("a pid");
        let its_ns = lab::netns::of_process(pid).expect("its netns");
        assert_ne!(its_ns, host_ns, "{c} is not in the host namespace");
        assert_eq!(
            Some(its_ns),
            lab::netns::identity(&lab::netns::path(&ns)),
            "{c} is in {ns}"
        );
        namespaces.push(its_ns);
        for ctl in ["cpu", "memory", "blkio"] {
            let dir = lab.cgroup(c, ctl).expect("a cgroup");
            assert_eq!(cs.cgroup.get(ctl), Some(&dir), "{c} {ctl}");
            let procs = cgroup_procs(&dir);
            // The main process and every descendant (PostgreSQL backends, Erlang helpers).
            for p in lab::process::tree(pid) {
                assert!(procs.contains(&p), "{c}: pid {p} not in {}", dir.display());
            }
        }
        let eth0 = lab
            .netns_command(c, "ip")
            .expect("a namespace command")
            .args(["-4", "-o", "addr", "show", "eth0"])
            .output()
            .expect("ip in the namespace");
        assert!(
            String::from_utf8_lossy(&eth0.stdout).contains(&format!("{addr}/24")),
            "{c}: {}",
            String::from_utf8_lossy(&eth0.stdout)
        );
    }
    namespaces.sort_unstable();
    namespaces.dedup();
    assert_eq!(namespaces.len(), 5, "five distinct namespaces");
    // Prometheus stays in the host namespace, in its own cgroups.
    let prom_pid = lab.pid(Component::Prometheus).expect("prometheus pid");
    assert_eq!(lab::netns::of_process(prom_pid), Some(host_ns));
    assert!(lab.netns(Component::Prometheus).is_none());
    let prom_cpu = lab.cgroup(Component::Prometheus, "cpu").expect("cgroup");
    assert!(cgroup_procs(&prom_cpu).contains(&prom_pid));

    // Reachable from the host through the bridge; Prometheus scrapes through it.
    let gw = lab
        .config()
        .addr(Component::OrderGateway)
        .expect("gateway addr");
    let engine = lab
        .config()
        .addr(Component::MatchingEngine)
        .expect("engine addr");
    assert_eq!(http(gw, "GET", "/readyz", "").await.0, 200);
    let prom = lab.config().addr(Component::Prometheus).expect("prom addr");
    lab::probe::poll_until(
        "prometheus sees the gateway up",
        tokio::time::Instant::now() + Duration::from_secs(30),
        || async move {
            let (_, body) = lab::probe::http_get(
                prom,
                "/api/v1/query?query=up%7Bjob%3D%22order-gateway%22%7D",
            )
            .await?;
            let v: serde_json::Value = serde_json::from_str(&body)?;
            let r = &v["data"]["result"][0];
            anyhow::ensure!(r["value"][1] == "1", "not up yet: {body}");
            anyhow::ensure!(r["metric"]["instance"] == gw.to_string(), "{body}");
            Ok(())
        },
    )
    .await
    .expect("prometheus scrapes the gateway at its bridge address");

    // The components reach each other: gateway -> engine -> rabbitmq -> persistence -> postgres.
    let (code, body) = http(gw, "POST", "/v1/orders", &order("iso-1")).await;
    assert_eq!(code, 201, "{body}");
    let order_id =
        serde_json::from_str::<serde_json::Value>(&body).expect("json")["order_id"].to_string();
    let path = format!("/v1/orders/{order_id}");
    lab::probe::poll_until(
        "the order reaches PostgreSQL and the gateway reads it back from persistence",
        tokio::time::Instant::now() + Duration::from_secs(30),
        || {
            let path = path.clone();
            async move {
                let (code, body) = http(gw, "GET", &path, "").await;
                anyhow::ensure!(code == 200, "GET {path}: {code} {body}");
                Ok(())
            }
        },
    )
    .await
    .expect("order status through persistence");

    // A fault on one edge: the gateway can no longer reach the engine ...
    let engine_ip = engine.ip().to_string();
    let drop_rule = ["OUTPUT", "-d", &engine_ip, "-j", "DROP"];
    iptables_in(
        &lab,
        Component::OrderGateway,
        &[&["-I"][..], &drop_rule[..]].concat(),
    );
    let t_fault = Instant::now();
    let (code, body) = http(gw, "POST", "/v1/orders", &order("iso-2")).await;
    assert_eq!(code, 202, "queued while the engine is cut off: {body}");
    assert!(body.contains("queued"), "{body}");
    println!(
        "202 queued {:.1}s after the DROP rule",
        t_fault.elapsed().as_secs_f64()
    );
    // ... but everything else still works: the host reaches the engine, the gateway reaches
    // persistence.
    assert_eq!(http(engine, "GET", "/readyz", "").await.0, 200);
    assert_eq!(http(gw, "GET", &path, "").await.0, 200);
    // Healing the edge: the queue drains and new orders are accepted again.
    iptables_in(
        &lab,
        Component::OrderGateway,
        &[&["-D"][..], &drop_rule[..]].concat(),
    );
    let t_heal = Instant::now();
    let mut n = 0;
    lab::probe::poll_until(
        "201 after removing the DROP rule",
        tokio::time::Instant::now() + Duration::from_secs(30),
        || {
            n += 1;
            let body = order(&format!("iso-3-{n}"));
            async move {
                let (code, body) = http(gw, "POST", "/v1/orders", &body).await;
                anyhow::ensure!(code == 201, "{code} {body}");
                Ok(())
            }
        },
    )
    .await
    .expect("the edge heals");
    println!(
        "201 again {:.1}s after removing the rule",
        t_heal.elapsed().as_secs_f64()
    );

    // kill -9 of PostgreSQL: everything left of it in its cgroups (backends) is killed with it,
    // the restart passes the port check inside its namespace, and it is back in its cgroups.
    let pg_cpu = lab.cgroup(Component::Postgres, "cpu").expect("cgroup");
    let old_pg: Vec<ProcessRecord> = cgroup_procs(&pg_cpu)
        .into_iter()
        .map(lab::process::record_existing)
        .collect();
    assert!(old_pg.len() > 1, "postmaster and backends: {old_pg:?}");
    let mut seen = every_process(&lab.status());
    lab.kill(Component::Postgres, nix::sys::signal::Signal::SIGKILL)
        .expect("kill -9 postgres");
    let state = lab
        .wait_until(Duration::from_secs(60), "postgres restarted", |s| {
            s.component(Component::Postgres)
                .is_some_and(|c| c.restarts == 1 && c.status == Status::Ready)
        })
        .await
        .expect("postgres comes back");
    assert_all_gone(&old_pg, "postgres processes after kill -9");
    let new_pid = state
        .component(Component::Postgres)
        .and_then(|c| c.pid)
        .expect("new postmaster");
    assert!(cgroup_procs(&pg_cpu).contains(&new_pid));
    assert_eq!(
        lab::netns::of_process(new_pid),
        lab::netns::identity(&lab::netns::path(
            &lab.netns(Component::Postgres).expect("netns")
        ))
    );

    // Shutdown leaves nothing: no process, namespace, veth, bridge, cgroup or rule.
    seen.extend(every_process(&lab.status()));
    let t_down = Instant::now();
    lab.shutdown().await.expect("graceful shutdown");
    println!("shutdown in {:.1}s", t_down.elapsed().as_secs_f64());
    assert_all_gone(&seen, "after shutdown");
    let state = LabState::read(&lab.root().join("state.json")).expect("state");
    assert_eq!(state.phase, Phase::Stopped);
    assert_isolation_gone(&state, "after shutdown");
}

/// Two isolated labs at once get distinct names and subnets and each works; one shut down
/// and one dropped while its task panics both leave nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_labs_and_drop_after_panic() {
    let test = "parallel_labs_and_drop_after_panic";
    if require_root(test).is_err() || require_infra(test).is_err() {
        return;
    }
    let tmp = temp_root("iso-par");
    let config = |name: &str| {
        LabConfig::ephemeral(tmp.path().join(name), [Component::Postgres])
            .expect("ephemeral ports")
            .with_isolation(Isolation::Netns)
    };
    let (a, b) = tokio::join!(Lab::start(config("a")), Lab::start(config("b")));
    let a = a.unwrap_or_else(|e| panic!("lab a: {e}"));
    let b = b.unwrap_or_else(|e| panic!("lab b: {e}"));
    assert_ne!(a.bridge(), b.bridge(), "distinct bridges");
    assert_ne!(a.subnet(), b.subnet(), "distinct subnets");
    assert_ne!(
        a.netns(Component::Postgres),
        b.netns(Component::Postgres),
        "distinct namespaces"
    );
    assert_ne!(
        a.cgroup(Component::Postgres, "memory"),
        b.cgroup(Component::Postgres, "memory")
    );
    for lab in [&a, &b] {
        let addr = lab
            .address(Component::Postgres)
            .expect("address")
            .to_string();
        let port = lab
            .port(Component::Postgres, "postgres")
            .expect("port")
            .to_string();
        let answer = run(
            PSQL,
            &[
                "-X", "-t", "-A", "-h", &addr, "-p", &port, "-U", "postgres", "-d", "exchange",
                "-c", "SELECT 1",
            ],
        );
        assert_eq!(
            answer.trim(),
            "1",
            "postgres of {:?} at {addr}",
            lab.bridge()
        );
    }

    let state_a = a.status();
    let seen_a = every_process(&state_a);
    a.shutdown().await.expect("shutdown a");
    assert_all_gone(&seen_a, "lab a after shutdown");
    assert_isolation_gone(&a.status(), "lab a after shutdown");

    let state_b = b.status();
    let seen_b = every_process(&state_b);
    assert!(seen_b.len() > 1, "postmaster and its children: {seen_b:?}");
    let panicked = tokio::spawn(async move {
        let _lab = b;
        panic!("a test failing while it holds a lab");
    })
    .await;
    assert!(panicked.is_err_and(|e| e.is_panic()));
    // Drop already waited for the cgroups to empty before removing them.
    assert_all_gone(&seen_b, "lab b after a panic");
    assert_isolation_gone(&state_b, "lab b after a panic");
}

/// The CLI as root: `up` isolates by default and `status` shows where everything lives; after
/// the supervisor is SIGKILLed, `cleanup` stops the leftovers and removes the namespaces,
/// bridge, cgroups and rule (twice: it is idempotent); `up` + `down` work again on the root.
#[test]
fn cli_cleanup_after_a_killed_isolated_supervisor() {
    let test = "cli_cleanup_after_a_killed_isolated_supervisor";
    if require_root(test).is_err() || require_infra(test).is_err() {
        return;
    }
    let tmp = temp_root("iso-cli");
    let root = tmp.path().join("root");
    let up = ["up", "--ports", "ephemeral", "--only", "postgres"];
    let t0 = Instant::now();
    let (ok, out) = lab_cli(&root, &up);
    assert!(ok, "lab up: {out}");
    println!(
        "lab up --only postgres (isolated) in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    assert!(out.contains("isolation: netns, bridge sxl"), "{out}");
    let (ok, out) = lab_cli(&root, &["status"]);
    assert!(ok, "{out}");
    let state = LabState::read(&root.join("state.json")).expect("state");
    let ns = state
        .component(Component::Postgres)
        .and_then(|c| c.netns.clone())
        .expect("postgres has a namespace");
    assert!(
        out.contains(&ns) && out.contains("/sys/fs/cgroup/{blkio,cpu,memory}/"),
        "{out}"
    );
    assert_eq!(state.isolation.mode, IsolationMode::Netns);

    let seen = every_process(&state);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(state.supervisor.pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9 the supervisor");
    let deadline = Instant::now() + Duration::from_secs(5);
    while lab::process::is_alive(&state.supervisor) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let (ok, out) = lab_cli(&root, &["cleanup"]);
    assert!(ok, "cleanup: {out}");
    assert!(
        out.contains("stopped leftover postgres")
            && out.contains(&format!("removed netns {ns}"))
            && out.contains("removed bridge"),
        "{out}"
    );
    assert_all_gone(&seen, "after cleanup");
    assert_isolation_gone(&state, "after cleanup");
    let (ok, out) = lab_cli(&root, &["cleanup"]);
    assert!(
        ok && out.contains("nothing of the lab"),
        "second cleanup: {out}"
    );
    let after = LabState::read(&root.join("state.json")).expect("state");
    assert_eq!(after.phase, Phase::Stopped);

    let (ok, out) = lab_cli(&root, &up);
    assert!(ok, "up again: {out}");
    let state = LabState::read(&root.join("state.json")).expect("state");
    let seen = every_process(&state);
    let (ok, out) = lab_cli(&root, &["down"]);
    assert!(ok && out.contains("is down"), "{out}");
    assert_all_gone(&seen, "after down");
    assert_isolation_gone(&state, "after down");
}

/// Without root the lab stays on loopback and says why; `--isolation netns` refuses clearly.
/// As root, this runs the CLI as the `nobody` user.
#[test]
fn without_root_the_lab_stays_on_loopback() {
    let test = "without_root_the_lab_stays_on_loopback";
    if require_infra(test).is_err() {
        return;
    }
    let tmp = temp_root("noroot");
    let as_root = nix::unistd::geteuid().is_root();
    if as_root {
        use std::os::unix::fs::PermissionsExt as _;
        let nobody = nix::unistd::User::from_name("nobody")
            .ok()
            .flatten()
            .expect("a nobody user");
        nix::unistd::chown(tmp.path(), Some(nobody.uid), Some(nobody.gid)).expect("chown");
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
    }
    let lab_cli_unprivileged = |root: &Path, args: &[&str]| -> (bool, String) {
        let lab = env!("CARGO_BIN_EXE_lab");
        let mut cmd = if as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "nobody", "--", lab]);
            c
        } else {
            Command::new(lab)
        };
        let out = cmd
            .arg("--root")
            .arg(root)
            .args(args)
            .output()
            .expect("running lab");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let root = tmp.path().join("root");
    let up = ["up", "--ports", "ephemeral", "--only", "prometheus"];
    let (ok, out) = lab_cli_unprivileged(&root, &up);
    assert!(ok, "lab up without root: {out}");
    let (ok, out) = lab_cli_unprivileged(&root, &["status"]);
    assert!(
        ok && out.contains("isolation: off (not running as root"),
        "{out}"
    );
    assert!(out.contains("http://127.0.0.1:"), "{out}");
    let state = LabState::read(&root.join("state.json")).expect("state");
    assert_eq!(state.isolation.mode, IsolationMode::None);
    assert!(state.bridge.is_none() && state.components.iter().all(|c| c.netns.is_none()));
    let (ok, out) = lab_cli_unprivileged(&root, &["down"]);
    assert!(ok, "{out}");

    let (ok, out) = lab_cli_unprivileged(
        &tmp.path().join("forced"),
        &[&up[..], &["--isolation", "netns"]].concat(),
    );
    assert!(!ok, "--isolation netns without root must fail: {out}");
    assert!(out.contains("--isolation netns needs root"), "{out}");
}
