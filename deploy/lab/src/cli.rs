//! The `lab` commands.
//!
//! `up` spawns `lab supervise` as a detached daemon (new session, stdin closed, output in
//! `<root>/logs/lab.log`) and follows `state.json` until every component is ready or the daemon
//! gives up. The daemon owns a [`lab::Lab`] and serves the control socket; `stop`, `start`,
//! `restart`, `kill` and `down` talk to it. `down` also works when the daemon was SIGKILLed:
//! it then stops the process groups recorded in the state file itself, and removes the
//! namespaces, bridge, cgroups and rules the state file records (`cleanup` does only that
//! part, for a lab whose supervisor is gone).

use std::collections::BTreeMap;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use lab::config::{control_socket, state_file};
use lab::control::{self, Request};
use lab::isolation::{self, Isolation, Leftovers};
use lab::process;
use lab::state::{IsolationMode, LabState, Phase, ProcessRecord, Status};
use lab::{Component, ComponentSet, Lab, LabConfig, PortPlan, PortsMode, Signal};

/// `println!` that ignores a closed stdout (`lab status | head`) instead of panicking: the
/// command still finishes its work.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// Start and supervise the native stack (PostgreSQL, RabbitMQ, the services, Prometheus).
#[derive(Debug, Parser)]
#[command(name = "lab", version, about)]
pub struct Cli {
    /// The lab's runtime folder.
    #[arg(long, global = true, default_value = ".lab")]
    root: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the stack in the background and wait until every component is ready.
    Up(UpArgs),
    /// Stop everything the lab started (also after the supervisor was killed) and remove its
    /// namespaces, bridge, cgroups and rules.
    Down {
        /// Delete the root folder afterwards (data, logs, state).
        #[arg(long)]
        purge: bool,
    },
    /// Remove what a lab whose supervisor died left behind (processes, namespaces, veths,
    /// bridge, cgroups, iptables rules), from its state file. Safe to run more than once.
    Cleanup,
    /// Where to look: the gateway, Prometheus, an example order, the chaos and profiling
    /// targets, and how to stop.
    Where,
    /// Show every component: status, pid, address, restarts, last exit.
    Status {
        /// Print the state file as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show logs: one component's, or (without one) every log with a prefix.
    Logs {
        /// A component, or `lab` for the supervisor's own log.
        component: Option<String>,
        /// Keep printing new lines.
        #[arg(short, long)]
        follow: bool,
        /// Lines of history per log.
        #[arg(short = 'n', long, default_value_t = 50)]
        lines: usize,
    },
    /// Stop a component and hold it down (no restart until `lab start`).
    Stop { component: Component },
    /// Start a held or failed component and wait until it is ready.
    Start { component: Component },
    /// Stop a component gracefully, start it again, wait until it is ready.
    Restart { component: Component },
    /// Send a signal to a component's process group (restarted as usual unless held).
    Kill {
        component: Component,
        /// KILL, TERM, STOP, CONT, ... or a number.
        #[arg(long, short, default_value = "KILL")]
        signal: String,
    },
    /// Run the supervisor in the foreground (what `lab up` starts in the background).
    Supervise(UpArgs),
}

#[derive(Debug, Clone, clap::Args)]
struct UpArgs {
    /// Where the service binaries are.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// `default` (8080.., 5433, 5673, 9090) or `ephemeral` (free ports).
    #[arg(long, default_value = "default")]
    ports: PortsMode,
    /// Only these components (comma-separated); what they need is added.
    #[arg(long)]
    only: Option<String>,
    /// Repository checkout (for deploy/prometheus/rules); found automatically if omitted.
    #[arg(long)]
    repo: Option<PathBuf>,
    /// Give up on `up` after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// `auto` (own network namespace and cgroups per component when root, loopback
    /// otherwise), `netns` (isolate or refuse), `none` (loopback).
    #[arg(long, default_value = "auto")]
    isolation: Isolation,
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let root = absolute(&cli.root)?;
    let level = if matches!(cli.command, Command::Supervise(_)) {
        "info"
    } else {
        "warn"
    };
    init_tracing(level);
    match cli.command {
        Command::Up(args) => up(&root, &args),
        Command::Down { purge } => down(&root, purge),
        Command::Cleanup => cleanup(&root),
        Command::Status { json } => status(&root, json),
        Command::Where => where_to_look(&root),
        Command::Logs {
            component,
            follow,
            lines,
        } => logs(&root, component.as_deref(), follow, lines),
        Command::Stop { component } => send(&root, Request::Stop { component }),
        Command::Start { component } => send(&root, Request::Start { component }),
        Command::Restart { component } => send(&root, Request::Restart { component }),
        Command::Kill { component, signal } => {
            process::parse_signal(&signal)?;
            send(&root, Request::Kill { component, signal })
        }
        Command::Supervise(args) => supervise(&root, &args),
    }
}

fn init_tracing(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .try_init();
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    Ok(std::env::current_dir()
        .context("reading the current directory")?
        .join(path))
}

fn lab_log(root: &Path) -> PathBuf {
    root.join("logs").join("lab.log")
}

/// The state file, if there is one.
fn read_state(root: &Path) -> anyhow::Result<Option<LabState>> {
    let path = state_file(root);
    if !path.exists() {
        return Ok(None);
    }
    Ok(Some(LabState::read(&path)?))
}

// ---------------------------------------------------------------------------------------------
// up

fn up(root: &Path, args: &UpArgs) -> anyhow::Result<ExitCode> {
    if let Some(state) = read_state(root)?
        && state.is_running()
    {
        say!(
            "a lab supervisor is already running for {} (pid {})",
            root.display(),
            state.supervisor.pid
        );
        print_summary(&state);
        return Ok(ExitCode::SUCCESS);
    }
    std::fs::create_dir_all(root.join("logs"))
        .with_context(|| format!("creating {}", root.display()))?;
    let log = process::open_log(&lab_log(root))?;
    let log2 = log.try_clone().context("duplicating the log handle")?;
    process::mark(&lab_log(root), "lab up: starting the supervisor daemon");
    let exe = std::env::current_exe().context("finding the lab executable")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--root").arg(root).arg("supervise");
    cmd.arg("--bin-dir").arg(absolute(&args.bin_dir)?);
    cmd.arg("--ports").arg(match args.ports {
        PortsMode::Default => "default",
        PortsMode::Ephemeral => "ephemeral",
    });
    if let Some(only) = &args.only {
        cmd.arg("--only").arg(only);
    }
    if let Some(repo) = &args.repo {
        cmd.arg("--repo").arg(absolute(repo)?);
    }
    cmd.arg("--isolation").arg(args.isolation.to_string());
    // Not a process-group leader, so the daemon's setsid() succeeds and detaches it.
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2));
    let mut daemon = cmd.spawn().context("spawning `lab supervise`")?;
    let daemon_pid = daemon.id() as i32;
    say!(
        "supervisor pid {daemon_pid}; log {}",
        lab_log(root).display()
    );

    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout);
    let mut reported: BTreeMap<Component, Status> = BTreeMap::new();
    loop {
        if let Some(exit) = daemon.try_wait().context("checking the supervisor")? {
            eprintln!("lab up failed: the supervisor exited ({exit})");
            match read_state(root)
                .ok()
                .flatten()
                .filter(|s| s.supervisor.pid == daemon_pid)
            {
                Some(state) => {
                    print_summary(&state);
                    if let Some(error) = &state.error {
                        eprintln!("\n{error}");
                    }
                }
                None => eprintln!(
                    "--- last lines of {} ---\n{}",
                    lab_log(root).display(),
                    process::tail(&lab_log(root), 20)
                ),
            }
            return Ok(ExitCode::FAILURE);
        }
        if let Some(state) = read_state(root)
            .ok()
            .flatten()
            .filter(|s| s.supervisor.pid == daemon_pid)
        {
            // Components not started yet are `stopped`: only report what happens to them.
            for cs in state
                .components
                .iter()
                .filter(|cs| cs.status != Status::Stopped)
            {
                if reported.get(&cs.name) != Some(&cs.status) {
                    let at = started.elapsed().as_secs_f64();
                    say!("  [{at:6.1}s] {:<16} {}", cs.name.name(), cs.status);
                    reported.insert(cs.name, cs.status);
                }
            }
            if state.phase == Phase::Running {
                say!();
                print_summary(&state);
                say!(
                    "\nlab is up in {:.1}s (root {})",
                    started.elapsed().as_secs_f64(),
                    root.display()
                );
                return Ok(ExitCode::SUCCESS);
            }
        }
        if Instant::now() > deadline {
            eprintln!(
                "lab up: not ready after {}s; stopping what was started",
                args.timeout
            );
            let _ = control::request(
                &control_socket(root),
                &Request::Shutdown,
                Duration::from_secs(5),
            );
            let gone = Instant::now() + Duration::from_secs(60);
            while daemon.try_wait().ok().flatten().is_none() && Instant::now() < gone {
                std::thread::sleep(Duration::from_millis(100));
            }
            if let Some(state) = read_state(root).ok().flatten() {
                print_summary(&state);
            }
            return Ok(ExitCode::FAILURE);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn print_summary(state: &LabState) {
    print_isolation(state);
    say!(
        "{:<16} {:<10} {:>8}  {:<44} {:>8}  LAST EXIT",
        "COMPONENT",
        "STATUS",
        "PID",
        "ADDRESS",
        "RESTARTS"
    );
    for cs in &state.components {
        let pid = match cs.process() {
            Some(rec) if process::is_alive(&rec) => rec.pid.to_string(),
            Some(rec) => format!("{}(gone)", rec.pid),
            None => "-".to_string(),
        };
        let last = cs
            .last_exit
            .as_ref()
            .map(|e| e.describe())
            .unwrap_or_else(|| "-".to_string());
        let addr = cs.primary_url().unwrap_or("-");
        say!(
            "{:<16} {:<10} {:>8}  {:<44} {:>8}  {last}",
            cs.name.name(),
            cs.status.as_str(),
            pid,
            addr,
            cs.restarts
        );
        if let Some(error) = &cs.error {
            say!("{:<16} {}", "", error.lines().next().unwrap_or_default());
        }
    }
}

/// One line on the isolation, then (when on) where each component lives.
fn print_isolation(state: &LabState) {
    match state.isolation.mode {
        IsolationMode::None => say!(
            "isolation: off ({})",
            state
                .isolation
                .reason
                .as_deref()
                .unwrap_or("a lab from before isolation existed")
        ),
        IsolationMode::Netns => say!(
            "isolation: netns, bridge {} {} (host side {}); look inside: ip netns exec <netns> ss -tnp",
            state.bridge.as_deref().unwrap_or("?"),
            state.subnet.as_deref().unwrap_or("?"),
            state
                .gateway_address
                .map(|a| a.to_string())
                .unwrap_or_else(|| "?".to_string()),
        ),
    }
    if state.isolation.mode == IsolationMode::Netns {
        for cs in &state.components {
            let cgroup = match (cs.cgroup.get("cpu"), cs.cgroup.len()) {
                (Some(cpu), n) if n > 1 => {
                    let names: Vec<&str> = cs.cgroup.keys().map(String::as_str).collect();
                    cpu.display().to_string().replacen(
                        "/cpu/",
                        &format!("/{{{}}}/", names.join(",")),
                        1,
                    )
                }
                (Some(cpu), _) => cpu.display().to_string(),
                (None, _) => "-".to_string(),
            };
            say!(
                "  {:<16} netns {:<14} {:<15} cgroup {cgroup}",
                cs.name.name(),
                cs.netns.as_deref().unwrap_or("(host)"),
                cs.address.map(|a| a.to_string()).unwrap_or_default(),
            );
        }
    }
    say!();
}

// ---------------------------------------------------------------------------------------------
// supervise

fn supervise(root: &Path, args: &UpArgs) -> anyhow::Result<ExitCode> {
    // Leave the session of whoever started us, so closing their terminal does not reach us.
    // Fails only if we already lead a process group (run by hand with `setsid`): fine.
    let _ = nix::unistd::setsid();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    runtime.block_on(supervise_async(root, args))
}

async fn supervise_async(root: &Path, args: &UpArgs) -> anyhow::Result<ExitCode> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    let components = match &args.only {
        Some(list) => ComponentSet::parse_list(list)?,
        None => ComponentSet::default_for_host(&absolute(&args.bin_dir)?),
    };
    let mut config = LabConfig::new(root, components.iter()).with_bin_dir(&args.bin_dir);
    config.components = components;
    config.ports = PortPlan::for_mode(args.ports)?;
    config.repo = args.repo.clone();
    config.isolation = args.isolation;
    let socket = control_socket(root);
    config.control_socket = Some(socket.clone());
    tracing::info!(root = %root.display(), components = %config.components, pid = std::process::id(), "supervisor starting");

    let lab = match Lab::new(config) {
        Ok(lab) => Arc::new(lab),
        Err(e) => {
            tracing::error!("cannot start: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let shutdown = Arc::new(tokio::sync::Notify::new());
    let listener = control::bind(&socket)?;
    let server = tokio::spawn(control::serve(listener, lab.clone(), shutdown.clone()));

    let started = tokio::select! {
        result = lab.start_all() => Some(result),
        _ = shutdown.notified() => None,
        _ = term.recv() => None,
        _ = int.recv() => None,
    };
    let code = match started {
        Some(Err(e)) => {
            lab.fail_start(&e).await;
            tracing::error!("start failed: {e}");
            ExitCode::FAILURE
        }
        Some(Ok(())) => {
            tracing::info!("every component is ready");
            tokio::select! {
                _ = shutdown.notified() => tracing::info!("shutdown requested"),
                _ = term.recv() => tracing::info!("SIGTERM"),
                _ = int.recv() => tracing::info!("SIGINT"),
            }
            stop_lab(&lab).await
        }
        None => {
            tracing::info!("shutdown requested during start");
            stop_lab(&lab).await
        }
    };
    server.abort();
    let _ = std::fs::remove_file(&socket);
    tracing::info!("supervisor exiting");
    Ok(code)
}

async fn stop_lab(lab: &Lab) -> ExitCode {
    match lab.shutdown().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("shutdown: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// down

fn down(root: &Path, purge: bool) -> anyhow::Result<ExitCode> {
    let Some(before) = read_state(root)? else {
        say!("no lab state in {}: nothing to stop", root.display());
        return purge_root(root, purge);
    };
    if process::is_alive(&before.supervisor) {
        let pid = before.supervisor.pid;
        say!("asking the supervisor (pid {pid}) to stop everything");
        let asked = control::request(
            &control_socket(root),
            &Request::Shutdown,
            Duration::from_secs(10),
        );
        if !asked.as_ref().is_ok_and(|r| r.ok) {
            say!(
                "control socket did not answer ({}): sending SIGTERM",
                describe_err(asked)
            );
            process::signal_process(pid, Signal::SIGTERM).context("signalling the supervisor")?;
        }
        if !wait_gone(&before.supervisor, Duration::from_secs(120)) {
            say!("supervisor still running after 120s: SIGKILL");
            process::signal_process(pid, Signal::SIGKILL).context("killing the supervisor")?;
            wait_gone(&before.supervisor, Duration::from_secs(5));
        }
    } else {
        say!(
            "the supervisor (pid {}) is not running: stopping what the state file records",
            before.supervisor.pid
        );
    }
    // Everything either state file version knows about: the one before (pids of a killed
    // supervisor) and the one after (what a graceful shutdown saw last), in stop order.
    let after = read_state(root).ok().flatten();
    let mut recorded = stop_order(&before);
    if let Some(after) = &after {
        for entry in stop_order(after) {
            if !recorded.iter().any(|(_, r)| r.pid == entry.1.pid) {
                recorded.push(entry);
            }
        }
    }
    stop_leftovers(&recorded);
    let survivors: Vec<String> = recorded
        .iter()
        .filter(|(_, rec)| process::is_alive(rec) || !process::group_members(rec.pid).is_empty())
        .map(|(name, rec)| format!("{name} (pid {})", rec.pid))
        .collect();
    if !survivors.is_empty() {
        bail!("still alive after SIGKILL: {}", survivors.join(", "));
    }
    // The supervisor removes its isolation on a graceful stop; a killed one could not. Either
    // way: whatever the state file records and still exists goes now.
    let state = after.unwrap_or(before);
    remove_isolation(&state)?;
    // Nobody else will update the state file: record that everything is stopped.
    if !process::is_alive(&state.supervisor) {
        mark_stopped(state, root)?;
    }
    say!(
        "lab at {} is down; no recorded process is alive",
        root.display()
    );
    purge_root(root, purge)
}

/// Removes what `state` records of the isolation and still exists (processes left in the
/// cgroups are SIGKILLed first), saying what went.
fn remove_isolation(state: &LabState) -> anyhow::Result<()> {
    let left = Leftovers::from_state(state);
    if left.is_empty() {
        return Ok(());
    }
    for what in isolation::teardown(&left)? {
        say!("removed {what}");
    }
    Ok(())
}

/// `lab cleanup`: what `down` does after a dead supervisor, refusing while one runs.
fn cleanup(root: &Path) -> anyhow::Result<ExitCode> {
    let Some(state) = read_state(root)? else {
        say!("no lab state in {}: nothing to clean up", root.display());
        return Ok(ExitCode::SUCCESS);
    };
    if state.is_running() {
        bail!(
            "the supervisor of {} (pid {}) is running: stop the lab with `lab down --root {}`",
            root.display(),
            state.supervisor.pid,
            root.display()
        );
    }
    let recorded = stop_order(&state);
    stop_leftovers(&recorded);
    remove_isolation(&state)?;
    let left = Leftovers::from_state(&state).existing();
    if !left.is_empty() {
        bail!("still present after cleanup: {}", left.join(", "));
    }
    mark_stopped(state, root)?;
    say!("nothing of the lab at {} is left", root.display());
    Ok(ExitCode::SUCCESS)
}

/// Stops each recorded process (in the order given) that is still running, escalating to
/// SIGKILL after 10 s, and says which ones it stopped.
fn stop_leftovers(recorded: &[(String, ProcessRecord)]) {
    for (name, rec) in recorded {
        // PostgreSQL's fast shutdown is SIGINT; SIGTERM would wait for its clients.
        let stop = if name == "postgres" {
            Signal::SIGINT
        } else {
            Signal::SIGTERM
        };
        if process::terminate_recorded(rec, stop, Duration::from_secs(10)) {
            say!("stopped leftover {name} (pid {})", rec.pid);
        }
    }
}

/// Records in the state file that nothing runs any more (nobody else will).
fn mark_stopped(mut state: LabState, root: &Path) -> anyhow::Result<()> {
    state.phase = Phase::Stopped;
    for cs in &mut state.components {
        cs.pid = None;
        cs.pid_start_ticks = None;
        cs.aux.clear();
        if cs.status.is_active() {
            cs.status = Status::Stopped;
        }
    }
    state.updated_at = process::now_ms();
    state.write_atomic(&state_file(root))?;
    Ok(())
}

/// Recorded processes in reverse start order, each component before its helpers.
fn stop_order(state: &LabState) -> Vec<(String, ProcessRecord)> {
    let mut out = Vec::new();
    for cs in state.components.iter().rev() {
        out.extend(cs.process().map(|p| (cs.name.to_string(), p)));
        out.extend(
            cs.aux
                .iter()
                .map(|(name, p)| (format!("{}/{name}", cs.name), *p)),
        );
    }
    out
}

fn describe_err<T>(result: anyhow::Result<T>) -> String {
    match result {
        Ok(_) => "refused".to_string(),
        Err(e) => format!("{e:#}"),
    }
}

/// Polls until the recorded process is gone; false at the timeout.
fn wait_gone(rec: &ProcessRecord, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !process::is_alive(rec) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    !process::is_alive(rec)
}

fn purge_root(root: &Path, purge: bool) -> anyhow::Result<ExitCode> {
    if purge && root.exists() {
        std::fs::remove_dir_all(root).with_context(|| format!("removing {}", root.display()))?;
        say!("removed {}", root.display());
    }
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------------------------
// status, control

fn status(root: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let Some(state) = read_state(root)? else {
        say!("no lab at {}", root.display());
        return Ok(ExitCode::FAILURE);
    };
    if json {
        say!(
            "{}",
            serde_json::to_string_pretty(&state).context("encoding the state")?
        );
        return Ok(ExitCode::SUCCESS);
    }
    let sup = if process::is_alive(&state.supervisor) {
        "running"
    } else {
        "not running"
    };
    let phase = serde_json::to_value(state.phase)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    say!(
        "lab at {}: {phase}; supervisor pid {} {sup}",
        root.display(),
        state.supervisor.pid
    );
    print_summary(&state);
    if let Some(error) = &state.error {
        say!("\n{error}");
    }
    Ok(ExitCode::SUCCESS)
}

fn where_to_look(root: &Path) -> anyhow::Result<ExitCode> {
    let Some(state) = read_state(root)? else {
        say!("no lab at {} (start one with `make demo`)", root.display());
        return Ok(ExitCode::FAILURE);
    };
    if !state.is_running() {
        say!(
            "the lab at {} is not running (start it with `make demo`)",
            root.display()
        );
        return Ok(ExitCode::FAILURE);
    }
    let url = |c: Component| {
        state
            .component(c)
            .and_then(|s| s.primary_url())
            .unwrap_or("(not running)")
            .to_owned()
    };
    let gateway = url(Component::OrderGateway);
    say!("\nThe exchange is running (root {}).\n", root.display());
    say!("  order gateway   {gateway}   (API: {gateway}/openapi.json)");
    say!("  prometheus      {}", url(Component::Prometheus));
    say!("  postgres        {}", url(Component::Postgres));
    if state.component(Component::Probes).is_some() {
        say!(
            "  eBPF agent      {}/metrics  {}/events",
            url(Component::Probes),
            url(Component::Probes)
        );
    }
    say!("\nPlace an order:");
    say!(
        "  curl -s -XPOST {gateway}/v1/orders -H 'content-type: application/json' \\\n    -d '{{\"client_order_id\":\"c-1\",\"account\":\"acct-1\",\"symbol\":\"AAPL\",\"side\":\"buy\",\"type\":\"limit\",\"price\":\"101.25\",\"quantity\":10,\"time_in_force\":\"gtc\"}}'"
    );
    say!("  curl -s {gateway}/v1/orders/<order_id>      curl -s '{gateway}/v1/book/AAPL?depth=5'");
    say!("\nNext:");
    say!("  make load                       60 s at 30 orders/s, then the zero-loss audit");
    say!(
        "  make chaos-network-partition    (make help lists all ten experiments; reports/ has the reports)"
    );
    say!("  make profile-cpu                flamegraphs of every service under load");
    say!("  target/release/lab status       components, pids, addresses, restarts");
    say!("  make down                       stop everything");
    Ok(ExitCode::SUCCESS)
}

fn send(root: &Path, request: Request) -> anyhow::Result<ExitCode> {
    let state = read_state(root)?
        .with_context(|| format!("no lab at {} (start one with `lab up`)", root.display()))?;
    if !state.is_running() {
        bail!(
            "no supervisor is running for {} (start one with `lab up`)",
            root.display()
        );
    }
    // start/restart answer once ready: allow the longest readiness deadline.
    let timeout = Duration::from_secs(180);
    let response = control::request(&control_socket(root), &request, timeout)?;
    if response.ok {
        say!("{}", response.message);
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("{}", response.message);
        Ok(ExitCode::FAILURE)
    }
}

// ---------------------------------------------------------------------------------------------
// logs

fn logs(
    root: &Path,
    component: Option<&str>,
    follow: bool,
    lines: usize,
) -> anyhow::Result<ExitCode> {
    let dir = root.join("logs");
    let files: Vec<(String, PathBuf)> = match component {
        Some("lab") => vec![("lab".to_string(), lab_log(root))],
        Some(name) => {
            let c: Component = name.parse()?;
            vec![(c.name().to_string(), dir.join(format!("{}.log", c.name())))]
        }
        None => {
            let mut all: Vec<(String, PathBuf)> = std::fs::read_dir(&dir)
                .with_context(|| format!("reading {}", dir.display()))?
                .filter_map(|e| {
                    let path = e.ok()?.path();
                    let stem = path.file_stem()?.to_str()?.to_string();
                    (path.extension()? == "log").then_some((stem, path))
                })
                .collect();
            all.sort();
            all
        }
    };
    let prefix = files.len() > 1;
    let width = files.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    // False once stdout is closed (`lab logs -f | head`): stop then.
    let show = |name: &str, text: &str| -> bool {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        text.lines().all(|line| {
            if prefix {
                writeln!(out, "{name:<width$} | {line}")
            } else {
                writeln!(out, "{line}")
            }
            .is_ok()
        }) && out.flush().is_ok()
    };
    let mut offsets = Vec::new();
    for (name, path) in &files {
        if !show(name, &process::tail(path, lines)) {
            return Ok(ExitCode::SUCCESS);
        }
        offsets.push(std::fs::metadata(path).map(|m| m.len()).unwrap_or(0));
    }
    if !follow {
        return Ok(ExitCode::SUCCESS);
    }
    let mut partial = vec![String::new(); files.len()];
    loop {
        for (i, (name, path)) in files.iter().enumerate() {
            let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            if len < offsets[i] {
                offsets[i] = 0; // truncated or recreated
            }
            if len == offsets[i] {
                continue;
            }
            let mut f =
                std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
            f.seek(SeekFrom::Start(offsets[i]))
                .context("seeking in the log")?;
            let mut buf = Vec::new();
            f.read_to_end(&mut buf).context("reading the log")?;
            offsets[i] += buf.len() as u64;
            partial[i].push_str(&String::from_utf8_lossy(&buf));
            if let Some(end) = partial[i].rfind('\n') {
                let complete: String = partial[i].drain(..=end).collect();
                if !show(name, &complete) {
                    return Ok(ExitCode::SUCCESS);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
