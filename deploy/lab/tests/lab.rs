//! End-to-end tests of the lab against this machine's real PostgreSQL 15, RabbitMQ and
//! Prometheus, each lab in its own temporary root with ephemeral ports so tests run in parallel.
//!
//! The services do not exist yet, so `matching-engine` is played by this very test binary: a
//! shell script in a temporary bin dir re-runs it with `--ignored --exact fake_service`, and
//! that test function then behaves like a service (env contract, `/readyz`, `/metrics`, and an
//! exit code chosen through a file in its data dir).
//!
//! If PostgreSQL, RabbitMQ or Prometheus is missing the tests fail and say what to install;
//! with `LAB_SKIP_MISSING=1` they print why and skip instead.
//!
//! These labs run on loopback; the isolation tests (namespaces, cgroups, as root) are in
//! `lab/isolation.rs`, part of this same test binary.

#[path = "lab/isolation.rs"]
mod isolation;

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lab::process::{self, ProcStat};
use lab::state::ProcessRecord;
use lab::{Component, Lab, LabConfig, LabError, LabState, Phase, RestartPolicy, Signal, Status};

const PSQL: &str = "/usr/lib/postgresql/15/bin/psql";
const RABBITMQCTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";

/// `Ok(())` when the system packages the lab runs are installed; otherwise fails the test with
/// what to install, or (with `LAB_SKIP_MISSING=1`) prints why it is skipped and returns `Err`.
fn require_infra(test: &str) -> Result<(), ()> {
    let mut missing = Vec::new();
    for (path, package) in [
        ("/usr/lib/postgresql/15/bin/postgres", "postgresql-15"),
        (PSQL, "postgresql-15"),
        ("/usr/lib/rabbitmq/bin/rabbitmq-server", "rabbitmq-server"),
        ("/usr/bin/epmd", "erlang-base"),
        ("/usr/bin/prometheus", "prometheus"),
    ] {
        if !Path::new(path).exists() {
            missing.push(format!("{path} ({package})"));
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let why = format!(
        "{test}: missing {}; install with scripts/ensure-deps test",
        missing.join(", ")
    );
    if std::env::var_os("LAB_SKIP_MISSING").is_some() {
        println!("SKIPPED {why}");
        eprintln!("SKIPPED {why}");
        return Err(());
    }
    panic!("{why} (or set LAB_SKIP_MISSING=1 to skip)");
}

fn temp_root(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("lab-{name}-"))
        .tempdir()
        .expect("creating a temporary lab root")
}

/// A bin dir whose `matching-engine` is this test binary running [`fake_service`].
fn fake_bin_dir(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("creating the fake bin dir");
    let exe = std::env::current_exe().expect("finding the test binary");
    let script = format!(
        "#!/bin/sh\nLAB_FAKE_SERVICE=1 exec '{}' fake_service --exact --ignored --nocapture --test-threads=1 --quiet\n",
        exe.display()
    );
    let path = bin.join("matching-engine");
    std::fs::write(&path, script).expect("writing the fake service script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
        .expect("chmod the fake service");
    bin
}

/// Every process of a component right now: main process, its descendants and its helpers.
fn processes_of(state: &LabState) -> Vec<ProcessRecord> {
    let mut out = Vec::new();
    for (_, rec) in state.recorded_processes() {
        for pid in process::tree(rec.pid) {
            out.push(process::record_existing(pid));
        }
    }
    out
}

fn assert_all_gone(seen: &[ProcessRecord], context: &str) {
    let alive: Vec<String> = seen
        .iter()
        .filter(|r| process::is_alive(r))
        .map(|r| {
            format!(
                "{} ({})",
                r.pid,
                std::fs::read_to_string(format!("/proc/{}/cmdline", r.pid))
                    .unwrap_or_default()
                    .replace('\0', " ")
            )
        })
        .collect();
    assert!(alive.is_empty(), "{context}: still alive: {alive:?}");
    let groups: BTreeSet<i32> = seen.iter().map(|r| r.pid).collect();
    for pgid in groups {
        // Only groups we led: a descendant's pid is its own group only if it called setsid.
        let members = process::group_members(pgid);
        assert!(
            members.is_empty() || !seen.iter().any(|r| r.pid == pgid && process::is_alive(r)),
            "{context}: group {pgid} has members {members:?}"
        );
    }
}

/// Polls `check` every 50 ms until it holds or `timeout` passes.
async fn eventually(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn psql(port: u16, db: &str, sql: &str) -> Result<String, String> {
    let out = Command::new(PSQL)
        .args([
            "-X",
            "-t",
            "-A",
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "-d",
            db,
            "-c",
            sql,
        ])
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    )
    .is_ok()
}

fn fast_restarts() -> RestartPolicy {
    RestartPolicy {
        backoff_initial: Duration::from_millis(50),
        backoff_max: Duration::from_millis(200),
        max_restarts: 3,
        window: Duration::from_secs(60),
        reset_after: Duration::from_secs(10),
    }
}

/// The big one: one lab with postgres, rabbitmq, prometheus and a stand-in matching-engine,
/// shared across every assertion because RabbitMQ takes seconds to boot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infra_stack_lifecycle() {
    if require_infra("infra_stack_lifecycle").is_err() {
        return;
    }
    let tmp = temp_root("infra");
    let bin = fake_bin_dir(tmp.path());
    let mut config = LabConfig::ephemeral(
        tmp.path().join("root"),
        [
            Component::MatchingEngine,
            Component::Postgres,
            Component::Prometheus,
        ],
    )
    .expect("ephemeral ports")
    .with_bin_dir(&bin);
    config.restart = fast_restarts();
    config.repo = Some(tmp.path().join("no-repo"));
    assert_eq!(
        config.components.to_string(),
        "postgres,rabbitmq,matching-engine,prometheus"
    );

    let t0 = Instant::now();
    let lab = match Lab::start(config).await {
        Ok(lab) => lab,
        Err(e) => panic!("lab start failed: {e}"),
    };
    println!(
        "postgres + rabbitmq + matching-engine (fake) + prometheus ready in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    let mut seen = processes_of(&lab.status());

    // Everything ready, and the state file says so.
    let state = LabState::read(&lab.root().join("state.json")).expect("reading state.json");
    assert_eq!(state.phase, Phase::Running);
    assert_eq!(state.supervisor.pid, std::process::id() as i32);
    for cs in &state.components {
        assert_eq!(cs.status, Status::Ready, "{}", cs.name);
        assert!(cs.pid.is_some_and(|p| p > 0), "{} has a pid", cs.name);
    }
    let rabbit = state
        .component(Component::Rabbitmq)
        .expect("rabbitmq state");
    assert!(rabbit.aux.contains_key("epmd"), "epmd is recorded");
    assert_eq!(rabbit.ports.len(), 3);

    // PostgreSQL: the exchange database exists and answers.
    let pg_port = lab.port(Component::Postgres, "postgres").expect("pg port");
    assert_eq!(
        lab.url(Component::Postgres).ok(),
        Some(format!("postgres://postgres@127.0.0.1:{pg_port}/exchange"))
    );
    assert_eq!(psql(pg_port, "exchange", "SELECT 1").as_deref(), Ok("1"));
    assert_eq!(psql(pg_port, "exchange", "SHOW fsync").as_deref(), Ok("on"));
    psql(
        pg_port,
        "exchange",
        "CREATE TABLE survives (x int); INSERT INTO survives VALUES (42)",
    )
    .expect("create a table");

    // RabbitMQ: AMQP answers; the dedicated user logs in and loopback_users is empty, so
    // clients outside loopback (network namespaces) can log in too.
    let amqp_port = lab.port(Component::Rabbitmq, "amqp").expect("amqp port");
    assert_eq!(
        lab.url(Component::Rabbitmq).ok(),
        Some(format!(
            "amqp://exchange:exchange@127.0.0.1:{amqp_port}/%2f"
        ))
    );
    let amqp = SocketAddr::from(([127, 0, 0, 1], amqp_port));
    lab::probe::amqp_login(amqp, "exchange", "exchange", "/")
        .await
        .expect("AMQP login as the lab user");
    let refused = lab::probe::amqp_login(amqp, "exchange", "wrong", "/").await;
    assert!(refused.is_err(), "a wrong password is refused");
    let root = lab.root().to_path_buf();
    let epmd_port = lab.port(Component::Rabbitmq, "epmd").expect("epmd port");
    let eval = Command::new(RABBITMQCTL)
        .env("HOME", root.join("rabbitmq/home"))
        .env("ERL_EPMD_PORT", epmd_port.to_string())
        .args(["-n", "lab@localhost", "eval"])
        .arg("{application:get_env(rabbit, loopback_users), element(1, rabbit_access_control:check_user_pass_login(<<\"exchange\">>, <<\"exchange\">>))}.")
        .output()
        .expect("running rabbitmqctl eval");
    let answer = String::from_utf8_lossy(&eval.stdout);
    assert!(
        answer.contains("{{ok,[]},ok}"),
        "rabbitmqctl eval: {answer} {}",
        String::from_utf8_lossy(&eval.stderr)
    );

    // The stand-in service got exactly the contract's environment.
    let engine_dir = lab
        .component(Component::MatchingEngine)
        .expect("engine")
        .data_dir;
    let env: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(engine_dir.join("env.json"))
            .expect("env.json of the fake service"),
    )
    .expect("env json");
    let http_port = lab
        .port(Component::MatchingEngine, "http")
        .expect("engine port");
    assert_eq!(env["APP__HTTP__ADDR"], format!("127.0.0.1:{http_port}"));
    assert_eq!(env["APP__LOG__FORMAT"], "json");
    assert_eq!(env["APP__DATA__DIR"], engine_dir.display().to_string());
    assert_eq!(
        env["APP__AMQP__URL"],
        lab.url(Component::Rabbitmq).expect("amqp url")
    );
    // The bearer token of /debug/pprof, shared with the lab's tools through <root>/debug-token.
    let token = std::fs::read_to_string(lab.root().join("debug-token")).expect("debug-token");
    assert_eq!(env["APP__DEBUG__TOKEN"], token.trim());
    assert_eq!(
        env.as_object().map(|o| o.len()),
        Some(5),
        "nothing else from APP__*: {env}"
    );

    // Prometheus: ready, and scraping the service.
    let prom = SocketAddr::from((
        [127, 0, 0, 1],
        lab.port(Component::Prometheus, "http").expect("prom port"),
    ));
    lab::probe::http_ok(prom, "/-/ready")
        .await
        .expect("prometheus ready");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = lab::probe::http_get(
            prom,
            "/api/v1/query?query=up%7Bjob%3D%22matching-engine%22%7D",
        )
        .await
        .expect("query");
        let answer: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        if answer["data"]["result"][0]["value"][1] == "1" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "prometheus never saw the engine up: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // kill -9 rabbitmq: restarted by the supervisor, restart counted, last exit is signal 9,
    // epmd kept.
    let old = lab.component(Component::Rabbitmq).expect("rabbitmq");
    let old_pid = old.pid.expect("rabbitmq pid");
    let epmd_before = old.aux.get("epmd").map(|r| r.pid);
    let t_kill = Instant::now();
    lab.kill(Component::Rabbitmq, Signal::SIGKILL)
        .expect("kill -9 rabbitmq");
    let state = lab
        .wait_until(
            Duration::from_secs(150),
            "rabbitmq restarted and ready",
            |s| {
                s.component(Component::Rabbitmq).is_some_and(|c| {
                    c.restarts == 1 && c.status == Status::Ready && c.pid != Some(old_pid)
                })
            },
        )
        .await
        .expect("rabbitmq comes back");
    println!(
        "rabbitmq back {:.1}s after kill -9",
        t_kill.elapsed().as_secs_f64()
    );
    let rabbit = state.component(Component::Rabbitmq).expect("rabbitmq");
    let exit = rabbit.last_exit.as_ref().expect("last exit recorded");
    assert_eq!((exit.signal, exit.expected), (Some(9), false));
    assert_eq!(
        rabbit.aux.get("epmd").map(|r| r.pid),
        epmd_before,
        "epmd survives a node crash"
    );
    assert!(!process::is_alive(&ProcessRecord {
        pid: old_pid,
        start_ticks: old.pid_start_ticks.unwrap_or(0),
        started_at: 0
    }));
    lab::probe::amqp_login(amqp, "exchange", "exchange", "/")
        .await
        .expect("AMQP login after the restart");
    seen.extend(processes_of(&state));

    // SIGSTOP freezes prometheus (no restart), SIGCONT thaws it.
    let prom_pid = lab.pid(Component::Prometheus).expect("prometheus pid");
    lab.kill(Component::Prometheus, Signal::SIGSTOP)
        .expect("SIGSTOP");
    eventually("prometheus stopped", Duration::from_secs(5), || {
        process::stat(prom_pid).is_some_and(|s: ProcStat| s.state == 'T')
    })
    .await;
    assert!(
        lab::probe::http_ok(prom, "/-/ready").await.is_err(),
        "a frozen prometheus does not answer"
    );
    lab.kill(Component::Prometheus, Signal::SIGCONT)
        .expect("SIGCONT");
    lab::probe::poll_until(
        "prometheus after SIGCONT",
        tokio::time::Instant::now() + Duration::from_secs(10),
        || lab::probe::http_ok(prom, "/-/ready"),
    )
    .await
    .expect("prometheus answers again");
    assert_eq!(lab.pid(Component::Prometheus), Some(prom_pid));

    // Stop postgres and hold it down.
    let pg_pid = lab.pid(Component::Postgres).expect("postgres pid");
    lab.stop(Component::Postgres).await.expect("stop postgres");
    let pg = lab.component(Component::Postgres).expect("postgres");
    assert_eq!((pg.status, pg.pid), (Status::Held, None));
    assert_eq!(
        pg.last_exit.as_ref().map(|e| (e.code, e.expected)),
        Some((Some(0), true)),
        "fast shutdown exits 0"
    );
    assert!(process::stat(pg_pid).is_none_or(|s| s.state == 'Z'));
    assert!(!port_open(pg_port), "postgres port closed while held");
    assert!(matches!(
        lab.wait_ready(Component::Postgres, Duration::from_secs(1))
            .await,
        Err(LabError::NotRunning { .. })
    ));

    // Exit code 64 is a configuration error: failed, never restarted.
    std::fs::write(engine_dir.join("exit-code"), "64").expect("arming exit 64");
    let engine_pid = lab.pid(Component::MatchingEngine).expect("engine pid");
    lab.kill(Component::MatchingEngine, Signal::SIGKILL)
        .expect("kill engine");
    let state = lab
        .wait_until(Duration::from_secs(20), "engine failed", |s| {
            s.component(Component::MatchingEngine)
                .is_some_and(|c| c.status == Status::Failed)
        })
        .await
        .expect("engine marked failed");
    let engine = state.component(Component::MatchingEngine).expect("engine");
    assert_eq!(engine.last_exit.as_ref().and_then(|e| e.code), Some(64));
    assert_eq!(
        engine.restarts, 1,
        "one restart after the kill, none after the 64"
    );
    assert!(engine.error.as_deref().is_some_and(|e| e.contains("64")));
    match lab
        .wait_ready(Component::MatchingEngine, Duration::from_secs(1))
        .await
    {
        Err(LabError::Failed { tail, .. }) => assert!(
            tail.contains("fake service exiting with 64"),
            "log tail: {tail}"
        ),
        other => panic!("expected Failed, got {other:?}"),
    }
    assert_ne!(lab.pid(Component::MatchingEngine), Some(engine_pid));

    // A crash loop is bounded: 3 restarts within the window, then failed.
    std::fs::write(engine_dir.join("exit-code"), "3").expect("arming exit 3");
    match lab.start_component(Component::MatchingEngine).await {
        Err(LabError::Failed { reason, .. }) => {
            assert!(reason.contains("gave up after 3 restarts"), "{reason}")
        }
        other => panic!("expected a bounded crash loop, got {other:?}"),
    }
    let engine = lab.component(Component::MatchingEngine).expect("engine");
    assert_eq!(
        (
            engine.restarts,
            engine.last_exit.as_ref().and_then(|e| e.code)
        ),
        (4, Some(3))
    );

    // Fixed: start it again.
    std::fs::remove_file(engine_dir.join("exit-code")).expect("disarming");
    lab.start_component(Component::MatchingEngine)
        .await
        .expect("engine starts again");

    // Postgres stayed held through all that; start it, the data survived.
    let pg = lab.component(Component::Postgres).expect("postgres");
    assert_eq!((pg.status, pg.restarts), (Status::Held, 0));
    lab.start_component(Component::Postgres)
        .await
        .expect("start postgres");
    assert_eq!(
        psql(pg_port, "exchange", "SELECT x FROM survives").as_deref(),
        Ok("42")
    );

    // A requested restart is not counted as a crash.
    let prom_pid = lab.pid(Component::Prometheus).expect("prometheus pid");
    lab.restart(Component::Prometheus)
        .await
        .expect("restart prometheus");
    let prom_state = lab.component(Component::Prometheus).expect("prometheus");
    assert!(prom_state.pid.is_some_and(|p| p != prom_pid));
    assert_eq!(prom_state.restarts, 0);

    // Shutdown leaves nothing behind: every process ever recorded (and their children) is gone.
    seen.extend(processes_of(&lab.status()));
    let t_down = Instant::now();
    lab.shutdown().await.expect("graceful shutdown");
    println!("shutdown in {:.1}s", t_down.elapsed().as_secs_f64());
    assert_all_gone(&seen, "after shutdown");
    let state = LabState::read(&root.join("state.json")).expect("state after shutdown");
    assert_eq!(state.phase, Phase::Stopped);
    assert!(state.recorded_processes().is_empty());
    assert!(state.components.iter().all(|c| c.status == Status::Stopped));
    assert!(!port_open(epmd_port), "epmd is gone");
}

/// A lab dropped without `shutdown` (a panicking test) kills what it started, at once.
#[tokio::test]
async fn dropping_the_lab_kills_everything() {
    if require_infra("dropping_the_lab_kills_everything").is_err() {
        return;
    }
    let tmp = temp_root("drop");
    // A private root (0700): as root, the lab must open it up for the postgres user.
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o700))
        .expect("chmod 700");
    let config = LabConfig::ephemeral(tmp.path(), [Component::Postgres]).expect("ports");
    let lab = Lab::start(config).await.expect("postgres starts");
    let seen = processes_of(&lab.status());
    assert!(seen.len() > 1, "postmaster and its children: {seen:?}");
    drop(lab);
    let deadline = Instant::now() + Duration::from_secs(5);
    while seen.iter().any(process::is_alive) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_all_gone(&seen, "after drop");
}

/// Problems are reported before anything starts: a taken port names port and component, a
/// missing service binary says how to build it.
#[tokio::test]
async fn preflight_errors_are_clear() {
    let tmp = temp_root("preflight");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let mut config =
        LabConfig::ephemeral(tmp.path().join("a"), [Component::Prometheus]).expect("ports");
    config.ports.set(Component::Prometheus, "http", port);
    match Lab::start(config).await {
        Err(e @ LabError::PortInUse { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains(&port.to_string()) && msg.contains("prometheus"),
                "{msg}"
            );
        }
        other => panic!("expected PortInUse, got {other:?}"),
    }

    let config = LabConfig::ephemeral(tmp.path().join("b"), [Component::OrderGateway])
        .expect("ports")
        .with_bin_dir(tmp.path().join("no-bins"));
    match Lab::start(config).await {
        Err(e @ LabError::Preflight(_)) => {
            let msg = e.to_string();
            for binary in ["order-gateway", "matching-engine", "persistence"] {
                assert!(
                    msg.contains(&format!("no-bins/{binary} not found")),
                    "{msg}"
                );
            }
            assert!(
                msg.contains("cargo build --release -p order-gateway"),
                "{msg}"
            );
        }
        other => panic!("expected Preflight, got {other:?}"),
    }
}

/// A port picked as free that something else takes before the lab starts is replaced by
/// another free one (a caller-set port is not: see `preflight_errors_are_clear`).
#[tokio::test]
async fn a_picked_port_taken_meanwhile_is_replaced() {
    if require_infra("a_picked_port_taken_meanwhile_is_replaced").is_err() {
        return;
    }
    let tmp = temp_root("repick");
    // Tests of this binary run in parallel and pick free ports too: one may take the port
    // picked here before this test does. Pick again then (bounded).
    let (config, picked, _thief) = (0..20)
        .find_map(|_| {
            let config = LabConfig::ephemeral(tmp.path(), [Component::Prometheus]).expect("ports");
            let picked = config.ports.primary(Component::Prometheus).expect("port");
            // The plan holds its picked ports until their component starts; let go of this
            // one early, as if something had taken it while another component started.
            config.ports.release(Component::Prometheus);
            let thief = std::net::TcpListener::bind(("127.0.0.1", picked)).ok()?;
            Some((config, picked, thief))
        })
        .expect("a picked port this test can take itself, in 20 tries");
    let lab = Lab::start(config).await.expect("starts on another port");
    let used = lab
        .config()
        .ports
        .primary(Component::Prometheus)
        .expect("port");
    assert_ne!(used, picked);
    assert!(port_open(used), "prometheus listens on {used}");
    lab.shutdown().await.expect("shutdown");
}

fn lab_cli(root: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lab"))
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
}

/// The CLI on loopback: `up` (detached daemon), idempotent `up`, `status --json`,
/// `stop`/`start`, then `down` after the daemon was SIGKILLed (from the state file), then
/// `up` + `down --purge`.
#[test]
fn cli_up_down_survives_a_killed_supervisor() {
    if require_infra("cli_up_down_survives_a_killed_supervisor").is_err() {
        return;
    }
    let tmp = temp_root("cli");
    let root = tmp.path().join("root");
    let up = [
        "up",
        "--ports",
        "ephemeral",
        "--only",
        "postgres",
        "--isolation",
        "none",
    ];
    let (ok, out) = lab_cli(&root, &up);
    assert!(ok, "lab up: {out}");
    assert!(out.contains("lab is up"), "{out}");
    assert!(
        out.contains("isolation: off (disabled by configuration (--isolation none))"),
        "{out}"
    );
    let (ok, out) = lab_cli(&root, &up);
    assert!(ok && out.contains("already running"), "second up: {out}");

    let (ok, json) = lab_cli(&root, &["status", "--json"]);
    assert!(ok, "{json}");
    let state: LabState = serde_json::from_str(&json).expect("status --json is the state");
    assert_eq!(state.phase, Phase::Running);
    assert!(state.control_socket.is_some());

    let (ok, out) = lab_cli(&root, &["stop", "postgres"]);
    assert!(ok && out.contains("held"), "{out}");
    let (ok, out) = lab_cli(&root, &["start", "postgres"]);
    assert!(ok && out.contains("ready"), "{out}");
    let (ok, out) = lab_cli(&root, &["kill", "postgres", "--signal", "NOPE"]);
    assert!(!ok && out.contains("unknown signal"), "{out}");

    let state = LabState::read(&root.join("state.json")).expect("state");
    let seen = processes_of(&state);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(state.supervisor.pid),
        Signal::SIGKILL,
    )
    .expect("kill -9 the supervisor");
    let sup = state.supervisor;
    let deadline = Instant::now() + Duration::from_secs(5);
    while process::is_alive(&sup) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        seen.iter().any(process::is_alive),
        "postgres outlives its supervisor (own process group)"
    );
    let (ok, out) = lab_cli(&root, &["down"]);
    assert!(ok, "down after SIGKILL: {out}");
    assert!(
        out.contains("not running") && out.contains("stopped leftover postgres"),
        "{out}"
    );
    assert_all_gone(&seen, "down without a supervisor");

    let (ok, out) = lab_cli(&root, &up);
    assert!(ok, "up again on the same root: {out}");
    let seen = processes_of(&LabState::read(&root.join("state.json")).expect("state"));
    let (ok, out) = lab_cli(&root, &["down", "--purge"]);
    assert!(ok && out.contains("is down"), "{out}");
    assert_all_gone(&seen, "down --purge");
    assert!(!root.exists(), "purged");
}

/// Not a test: the stand-in service that [`fake_bin_dir`]'s script runs. Follows the service
/// contract: configured only by `APP__*`, serves `/readyz`, `/healthz`, `/metrics` on
/// `APP__HTTP__ADDR`; exits with the code in `<data dir>/exit-code` if that file exists.
#[test]
#[ignore = "stand-in service binary started by the supervisor tests"]
fn fake_service() {
    use std::io::{BufRead as _, BufReader, Write as _};
    if std::env::var_os("LAB_FAKE_SERVICE").is_none() {
        println!("fake_service only runs as a stand-in service (LAB_FAKE_SERVICE=1)");
        return;
    }
    let (Ok(addr), Ok(data)) = (
        std::env::var("APP__HTTP__ADDR"),
        std::env::var("APP__DATA__DIR"),
    ) else {
        eprintln!("fake service: APP__HTTP__ADDR and APP__DATA__DIR are required");
        std::process::exit(64);
    };
    let data = PathBuf::from(data);
    if let Ok(code) = std::fs::read_to_string(data.join("exit-code")) {
        let code: i32 = code.trim().parse().unwrap_or(1);
        eprintln!("fake service exiting with {code}");
        std::process::exit(code);
    }
    let env: serde_json::Map<String, serde_json::Value> = std::env::vars()
        .filter(|(k, _)| k.starts_with("APP__"))
        .map(|(k, v)| (k, serde_json::Value::String(v)))
        .collect();
    std::fs::write(
        data.join("env.json"),
        serde_json::Value::Object(env).to_string(),
    )
    .expect("writing env.json");
    let listener = std::net::TcpListener::bind(&addr).expect("binding APP__HTTP__ADDR");
    eprintln!("fake service listening on {addr}");
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        // Read the whole request head, so closing does not reset the connection.
        let mut reader = BufReader::new(&stream);
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() {
            continue;
        }
        let mut header = String::new();
        while reader.read_line(&mut header).is_ok_and(|n| n > 2) {
            header.clear();
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/");
        let (status, body) = match path {
            "/readyz" | "/healthz" => ("200 OK", "ok\n"),
            "/metrics" => ("200 OK", "# TYPE fake_up gauge\nfake_up 1\n"),
            _ => ("404 Not Found", "not found\n"),
        };
        let _ = write!(
            stream,
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
}
