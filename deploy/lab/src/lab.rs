//! [`Lab`]: the in-process handle on a running stack, used by the end-to-end tests, the chaos
//! runner and the `lab supervise` daemon.
//!
//! `Lab::start(config)` checks everything it can before starting anything (binaries, users,
//! ports, another lab on the same root), sets up the isolation when there is one (bridge,
//! namespaces, cgroups: recorded in the state file first), then starts the components in
//! dependency order — independent ones in parallel — each gated on its readiness. Control
//! operations go to the component tasks of [`crate::supervisor`]. Dropping a `Lab` that was
//! not shut down kills every process group it started and removes its isolation,
//! synchronously, so a panicking test leaves nothing behind.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use nix::sys::signal::Signal;
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::component::Component;
use crate::config::LabConfig;
use crate::error::{LabError, Result};
use crate::isolation::{self, Claim, Decision, IsolationPlan, Leftovers};
use crate::launch::Recipe;
use crate::process;
use crate::state::{
    ComponentState, IsolationMode, IsolationState, LabState, Phase, STATE_VERSION, Status,
};
use crate::supervisor::{self, Ctl, Shared};

/// Extra time a caller waits past a component's own readiness deadline, so the component's
/// verdict (and its reason) arrives first.
const WAIT_GRACE: Duration = Duration::from_secs(3);

/// How many times [`Lab::start`] replaces a picked port that was taken meanwhile.
pub const PORT_REPICKS: usize = 3;

/// Who holds a local TCP port, for the log: `ss`'s lines for it (best effort).
fn port_holder(port: u16) -> String {
    std::process::Command::new("ss")
        .args(["-Htanp", &format!("sport = :{port}")])
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}

/// A running lab. See the module documentation.
pub struct Lab {
    shared: Arc<Shared>,
    controls: BTreeMap<Component, mpsc::Sender<Ctl>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Set once `shutdown` finished: `Drop` has nothing left to do.
    shut_down: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab")
            .field("root", &self.shared.cfg.root)
            .field("components", &self.shared.cfg.components)
            .finish()
    }
}

impl Lab {
    /// Checks, then starts every component of `config` in dependency order and waits until all
    /// are ready. On failure, whatever was started is stopped again and the error names the
    /// component, its deadline and the last lines of its log.
    ///
    /// A port picked as free ([`LabConfig::ephemeral`]) that something else took between
    /// the pick and the check is replaced by another free port, up to [`PORT_REPICKS`] times;
    /// a fixed or caller-set port that is taken is an error at once.
    pub async fn start(mut config: LabConfig) -> Result<Lab> {
        let mut repicks = 0;
        let lab = loop {
            match Lab::new(config.clone()) {
                Err(LabError::PortInUse {
                    component,
                    name,
                    port,
                }) if repicks < PORT_REPICKS && config.ports.is_picked(component, &name) => {
                    repicks += 1;
                    let new = config.ports.repick(component, &name)?;
                    tracing::warn!(%component, port_name = %name, taken = port, new, holder = %port_holder(port), "a picked port was taken before the lab started; using another");
                }
                other => break other?,
            }
        };
        if let Err(e) = lab.start_all().await {
            lab.fail_start(&e).await;
            return Err(e);
        }
        Ok(lab)
    }

    /// Checks the configuration and prepares the supervisor without starting anything; call
    /// [`Lab::start_all`] next. Must be called inside a tokio runtime.
    ///
    /// When the lab isolates, this also creates its bridge, namespaces and cgroups (each
    /// recorded in the state file before it is created), after removing whatever an earlier
    /// lab in the same root left behind.
    pub fn new(config: LabConfig) -> Result<Lab> {
        tokio::runtime::Handle::try_current()
            .context("Lab::new must be called inside a tokio runtime")?;
        let mut config = normalise(config)?;
        for c in Component::ALL {
            if !config.components.contains(c) {
                let _ = config.ports.release(c);
            }
        }
        let old = refuse_busy_root(&config)?;
        let mut problems: Vec<String> = config
            .components
            .iter()
            .flat_map(|c| Recipe::preflight(c, &config))
            .collect();
        let is_root = nix::unistd::geteuid().is_root();
        let host_problems = if is_root && config.isolation != isolation::Isolation::None {
            isolation::host_problems()
        } else {
            Vec::new()
        };
        let decision = match isolation::decide(config.isolation, is_root, &host_problems) {
            Ok(decision) => decision,
            Err(refused) => {
                problems.extend(refused);
                Decision::Off(String::new())
            }
        };
        if !problems.is_empty() {
            return Err(LabError::Preflight(problems));
        }
        for c in config.components.iter() {
            // A component with its own namespace is checked in it, before each start.
            if decision == Decision::On && c.spec().netns {
                continue;
            }
            config.ports.check_free(c)?;
        }
        if let Some(old) = &old {
            remove_leftovers(old)?;
        }
        let state = match decision {
            Decision::Off(reason) => initial_state(
                &config,
                IsolationState {
                    mode: IsolationMode::None,
                    reason: Some(reason),
                },
            )?,
            Decision::On => isolate(&mut config)?,
        };
        let shared = Shared::new(Arc::new(config), state);
        let mut controls = BTreeMap::new();
        let mut tasks = Vec::new();
        for c in shared.cfg.components.iter() {
            let (tx, task) = supervisor::spawn_task(shared.clone(), c);
            controls.insert(c, tx);
            tasks.push(task);
        }
        Ok(Lab {
            shared,
            controls,
            tasks: Mutex::new(tasks),
            shut_down: false.into(),
        })
    }

    /// Starts every component in dependency order, each once all it needs is ready (so
    /// independent components start in parallel), and waits until all are ready.
    pub async fn start_all(&self) -> Result<()> {
        self.shared.update(|s| {
            s.phase = Phase::Starting;
            s.error = None;
        });
        let set = self.shared.cfg.components.clone();
        let mut launched = BTreeSet::new();
        let mut ready = BTreeSet::new();
        let mut waits = JoinSet::new();
        loop {
            for c in set.iter() {
                let needs_ready = c
                    .spec()
                    .needs
                    .iter()
                    .filter(|n| set.contains(**n))
                    .all(|n| ready.contains(n));
                if launched.contains(&c) || !needs_ready {
                    continue;
                }
                launched.insert(c);
                tracing::info!(component = %c, "starting");
                let tx = self
                    .controls
                    .get(&c)
                    .cloned()
                    .ok_or(LabError::NotInLab(c))?;
                let shared = self.shared.clone();
                let timeout = self.shared.cfg.ready_timeout(c) + WAIT_GRACE;
                waits.spawn(async move {
                    let result = match request(&tx, Ctl::Start).await {
                        Ok(()) => wait_ready(&shared, c, timeout).await,
                        Err(e) => Err(e),
                    };
                    (c, result)
                });
            }
            match waits.join_next().await {
                None => break,
                Some(Ok((c, Ok(())))) => {
                    ready.insert(c);
                }
                Some(Ok((_, Err(e)))) => return Err(e),
                Some(Err(e)) => {
                    return Err(anyhow::Error::new(e)
                        .context("waiting for readiness")
                        .into());
                }
            }
        }
        self.shared.update(|s| s.phase = Phase::Running);
        Ok(())
    }

    /// After a failed [`Lab::start_all`]: stops what was started and records the error in the
    /// state (phase `failed`).
    pub async fn fail_start(&self, error: &LabError) {
        tracing::error!(error = %error, "start failed; stopping what was started");
        let message = error.to_string();
        if let Err(e) = self.shutdown().await {
            tracing::warn!(error = %e, "stopping after a failed start");
        }
        self.shared.update(|s| {
            s.phase = Phase::Failed;
            s.error = Some(message);
        });
    }

    async fn request(
        &self,
        c: Component,
        make: impl FnOnce(oneshot::Sender<Result<()>>) -> Ctl,
    ) -> Result<()> {
        request(self.controls.get(&c).ok_or(LabError::NotInLab(c))?, make).await
    }

    /// The configuration (with absolute paths).
    pub fn config(&self) -> &LabConfig {
        &self.shared.cfg
    }

    /// The lab's root folder.
    pub fn root(&self) -> &Path {
        &self.shared.cfg.root
    }

    /// The URL other components use to reach `c` (`postgres://...`, `amqp://...`, `http://...`).
    pub fn url(&self, c: Component) -> Result<String> {
        self.check_member(c)?;
        self.shared.cfg.primary_url(c)
    }

    /// A named port of `c` (`http`, `amqp`, `dist`, `epmd`, `postgres`).
    pub fn port(&self, c: Component, name: &str) -> Result<u16> {
        self.check_member(c)?;
        self.shared.cfg.ports.port(c, name)
    }

    /// `<root>/logs/<component>.log`.
    pub fn log_file(&self, c: Component) -> PathBuf {
        self.shared.cfg.log_file(c)
    }

    /// A copy of the state (what `state.json` holds).
    pub fn status(&self) -> LabState {
        self.shared.snapshot()
    }

    /// The state of one component.
    pub fn component(&self, c: Component) -> Result<ComponentState> {
        self.shared.component(c)
    }

    /// The pid (and process group) of `c`'s main process, if it runs.
    pub fn pid(&self, c: Component) -> Option<i32> {
        self.shared.component(c).ok().and_then(|cs| cs.pid)
    }

    /// The isolation in effect (names, addresses, cgroup folders); `None` on loopback.
    pub fn isolation(&self) -> Option<&IsolationPlan> {
        self.shared.cfg.isolation_plan.as_ref()
    }

    /// `c`'s network namespace (`ip netns` name), if it has one.
    pub fn netns(&self, c: Component) -> Option<String> {
        self.isolation()?.member(c).map(|m| m.netns.clone())
    }

    /// `c`'s address on the lab bridge, if it has its own namespace (`None` on loopback, and
    /// for Prometheus and the probe agent, which stay in the host namespace).
    pub fn address(&self, c: Component) -> Option<IpAddr> {
        self.isolation()?.member(c).map(|m| IpAddr::V4(m.address))
    }

    /// Host side of `c`'s veth pair, if it has its own namespace.
    pub fn veth(&self, c: Component) -> Option<String> {
        self.isolation()?.member(c).map(|m| m.veth.clone())
    }

    /// `c`'s cgroup folder for `controller` (`cpu`, `memory`, `blkio`), when the lab isolates:
    /// write limits there (`cpu.cfs_quota_us`, `memory.limit_in_bytes`,
    /// `blkio.throttle.*`), read `cgroup.procs` for every process of the component.
    pub fn cgroup(&self, c: Component, controller: &str) -> Option<PathBuf> {
        self.isolation()?
            .cgroup(c, controller)
            .map(Path::to_path_buf)
    }

    /// The lab bridge (`sxl1a2b3c`), when the lab isolates.
    pub fn bridge(&self) -> Option<&str> {
        self.isolation().map(IsolationPlan::bridge)
    }

    /// The lab's subnet (`198.18.N.0/24`), when the lab isolates.
    pub fn subnet(&self) -> Option<String> {
        self.isolation().map(IsolationPlan::subnet)
    }

    /// The bridge's own address (`198.18.N.1`): where the host's traffic to the components
    /// comes from.
    pub fn gateway_address(&self) -> Option<Ipv4Addr> {
        self.isolation().map(|p| p.gateway)
    }

    /// `program` as a command that runs inside `c`'s network namespace (`iptables`, `ss`,
    /// `rabbitmqctl`, ...); an error if `c` has none.
    pub fn netns_command(
        &self,
        c: Component,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> Result<std::process::Command> {
        self.check_member(c)?;
        let ns = self.netns(c).ok_or_else(|| {
            anyhow::anyhow!("{c} has no network namespace (the lab is not isolated, or {c} stays in the host namespace)")
        })?;
        Ok(crate::netns::command(&ns, program)?)
    }

    fn check_member(&self, c: Component) -> Result<()> {
        if self.shared.cfg.components.contains(c) {
            Ok(())
        } else {
            Err(LabError::NotInLab(c))
        }
    }

    /// Stops `c` gracefully and holds it down: no restart until [`Lab::start_component`].
    pub async fn stop(&self, c: Component) -> Result<()> {
        self.request(c, Ctl::Stop).await
    }

    /// Starts `c` (held, failed or stopped) and waits until it is ready. Its dependencies are
    /// not started for it.
    pub async fn start_component(&self, c: Component) -> Result<()> {
        self.request(c, Ctl::Start).await?;
        self.wait_ready(c, self.shared.cfg.ready_timeout(c) + WAIT_GRACE)
            .await
    }

    /// Stops `c` gracefully, starts it again and waits until it is ready. Requested restarts
    /// do not count in `restarts`.
    pub async fn restart(&self, c: Component) -> Result<()> {
        self.request(c, Ctl::Restart).await?;
        self.wait_ready(c, self.shared.cfg.ready_timeout(c) + WAIT_GRACE)
            .await
    }

    /// Sends `signal` to all of `c`'s processes (its process group and every descendant, like
    /// a signal to a whole container). A component killed this way is restarted by the
    /// supervisor like any crash (unless held); SIGSTOP freezes it until SIGCONT.
    pub fn kill(&self, c: Component, signal: Signal) -> Result<()> {
        let cs = self.shared.component(c)?;
        let pid = cs.pid.ok_or_else(|| LabError::NotRunning {
            component: c,
            status: cs.status.to_string(),
        })?;
        tracing::info!(component = %c, pid, signal = signal.as_str(), "sending signal");
        process::mark(
            &self.log_file(c),
            &format!("{} to process group {pid} (requested)", signal.as_str()),
        );
        process::signal_tree(pid, signal)
            .with_context(|| format!("sending {} to {c} (pid {pid})", signal.as_str()))?;
        // With isolation, also whatever else of it is in its cgroups (helpers excepted).
        for other in self.shared.cgroup_members(c) {
            process::signal_process(other, signal)
                .with_context(|| format!("sending {} to {c}'s pid {other}", signal.as_str()))?;
        }
        Ok(())
    }

    /// Waits until `c` is ready; fails at once if it is failed, held or stopped, and after
    /// `timeout` with its last lines of log.
    pub async fn wait_ready(&self, c: Component, timeout: Duration) -> Result<()> {
        wait_ready(&self.shared, c, timeout).await
    }

    /// Waits until `predicate` holds for the state (re-checked on every change); returns that
    /// state. For tests and chaos: "rabbitmq was restarted", "postgres is held".
    pub async fn wait_until(
        &self,
        timeout: Duration,
        what: &str,
        predicate: impl Fn(&LabState) -> bool,
    ) -> Result<LabState> {
        let deadline = Instant::now() + timeout;
        let mut changes = self.shared.subscribe();
        loop {
            changes.borrow_and_update();
            let state = self.shared.snapshot();
            if predicate(&state) {
                return Ok(state);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(LabError::ShuttingDown),
                Err(_) => {
                    let t = humantime::format_duration(timeout);
                    return Err(anyhow::anyhow!("timed out after {t} waiting for {what}").into());
                }
            }
        }
    }

    /// Stops every component gracefully in reverse start order (helpers such as epmd last),
    /// then checks that no recorded process survived (and kills any that did).
    pub async fn shutdown(&self) -> Result<()> {
        if self.shut_down.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        self.shared.update(|s| s.phase = Phase::Stopping);
        for c in self.shared.cfg.components.iter().rev() {
            let Some(tx) = self.controls.get(&c) else {
                continue;
            };
            let (reply, done) = oneshot::channel();
            if tx.send(Ctl::Shutdown(reply)).await.is_ok() {
                let _ = done.await;
            }
        }
        let tasks: Vec<JoinHandle<()>> =
            std::mem::take(&mut *self.tasks.lock().unwrap_or_else(PoisonError::into_inner));
        for task in tasks {
            if let Err(e) = task.await {
                tracing::warn!(error = %e, "a component task ended abnormally");
            }
        }
        let survivors = self.shared.kill_all_now();
        for (name, rec) in &survivors {
            tracing::warn!(process = %name, pid = rec.pid, "still alive after shutdown: killed");
        }
        let torn_down = match self.shared.cfg.isolation_plan.clone() {
            Some(plan) => {
                let left = Leftovers::from_plan(&plan);
                tokio::task::spawn_blocking(move || isolation::teardown(&left))
                    .await
                    .map_err(|e| anyhow::anyhow!("the isolation teardown panicked: {e}"))
                    .and_then(|r| r)
            }
            None => Ok(Vec::new()),
        };
        self.shared.update(|s| {
            s.phase = Phase::Stopped;
            for cs in &mut s.components {
                cs.pid = None;
                cs.pid_start_ticks = None;
                cs.aux.clear();
            }
        });
        self.shut_down
            .store(true, std::sync::atomic::Ordering::SeqCst);
        match &torn_down {
            Ok(removed) => tracing::info!(removed = %removed.join(", "), "isolation removed"),
            Err(e) => tracing::error!(error = %format!("{e:#}"), "removing the isolation"),
        }
        torn_down?;
        if survivors.is_empty() {
            Ok(())
        } else {
            let names: Vec<String> = survivors
                .iter()
                .map(|(n, r)| format!("{n} (pid {})", r.pid))
                .collect();
            Err(anyhow::anyhow!(
                "processes survived the graceful stop and were killed: {}",
                names.join(", ")
            )
            .into())
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.shut_down.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let killed = self.shared.kill_all_now();
        for task in self
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            task.abort();
        }
        if !killed.is_empty() {
            let names: Vec<String> = killed
                .iter()
                .map(|(n, r)| format!("{n}={}", r.pid))
                .collect();
            tracing::warn!(processes = %names.join(" "), "lab dropped without shutdown: killed its process groups");
        }
        // Blocking, bounded: waits for the killed processes to leave the cgroups.
        if let Some(plan) = &self.shared.cfg.isolation_plan
            && let Err(e) = isolation::teardown(&Leftovers::from_plan(plan))
        {
            tracing::error!(error = %format!("{e:#}"), "lab dropped: removing its isolation failed; run `lab cleanup --root {}`", self.shared.cfg.root.display());
        }
    }
}

/// Sends a control message to a component task and waits for its answer.
async fn request(
    tx: &mpsc::Sender<Ctl>,
    make: impl FnOnce(oneshot::Sender<Result<()>>) -> Ctl,
) -> Result<()> {
    let (reply, answer) = oneshot::channel();
    tx.send(make(reply))
        .await
        .map_err(|_| LabError::ShuttingDown)?;
    answer.await.map_err(|_| LabError::ShuttingDown)?
}

/// Waits until `c` is ready (see [`Lab::wait_ready`]).
pub(crate) async fn wait_ready(shared: &Shared, c: Component, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut changes = shared.subscribe();
    loop {
        changes.borrow_and_update();
        let cs = shared.component(c)?;
        let log = shared.cfg.log_file(c);
        match cs.status {
            Status::Ready => return Ok(()),
            Status::Failed => {
                let reason = cs.error.unwrap_or_else(|| "failed".to_string());
                let tail = process::tail(&log, crate::LOG_TAIL_LINES);
                return Err(LabError::Failed {
                    component: c,
                    reason,
                    log,
                    tail,
                });
            }
            Status::Held | Status::Stopped => {
                return Err(LabError::NotRunning {
                    component: c,
                    status: cs.status.to_string(),
                });
            }
            Status::Starting | Status::Restarting => {}
        }
        match tokio::time::timeout_at(deadline, changes.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(LabError::ShuttingDown),
            Err(_) => {
                let mut detail = format!("status {}, {} restarts", cs.status, cs.restarts);
                if let Some(exit) = &cs.last_exit {
                    detail.push_str(&format!(", last exit {}", exit.describe()));
                }
                if let Some(error) = &cs.error {
                    detail.push_str(&format!("; {error}"));
                }
                let tail = process::tail(&log, crate::LOG_TAIL_LINES);
                return Err(LabError::NotReady {
                    component: c,
                    deadline: timeout,
                    detail,
                    log,
                    tail,
                });
            }
        }
    }
}

/// Absolute paths, folders created.
fn normalise(mut config: LabConfig) -> Result<LabConfig> {
    if config.components.is_empty() {
        return Err(anyhow::anyhow!("no components selected").into());
    }
    let root = &config.root;
    std::fs::create_dir_all(root)
        .with_context(|| format!("creating the lab root {}", root.display()))?;
    config.root = root
        .canonicalize()
        .with_context(|| format!("resolving {}", root.display()))?;
    if config.bin_dir.is_relative() {
        let cwd = std::env::current_dir().context("reading the current directory")?;
        config.bin_dir = cwd.join(&config.bin_dir);
    }
    let logs = config.log_dir();
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    for c in config.components.iter() {
        let dir = config.component_dir(c);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if config.repo.is_none() {
        config.repo = config.find_repo();
    }
    Ok(config)
}

/// Refuses a root whose state file names another live supervisor, or live processes of a
/// supervisor that died. Returns the earlier state, if any.
fn refuse_busy_root(config: &LabConfig) -> Result<Option<LabState>> {
    let path = config.state_file();
    if !path.exists() {
        return Ok(None);
    }
    let old = match LabState::read(&path) {
        Ok(old) => old,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring an unreadable state file");
            return Ok(None);
        }
    };
    let me = std::process::id() as i32;
    if old.supervisor.pid != me
        && process::is_alive(&old.supervisor)
        && !matches!(old.phase, Phase::Stopped | Phase::Failed)
    {
        return Err(anyhow::anyhow!(
            "{} is in use by the lab supervisor pid {} (stop it with `lab down --root {}`)",
            config.root.display(),
            old.supervisor.pid,
            config.root.display()
        )
        .into());
    }
    let alive: Vec<String> = old
        .recorded_processes()
        .into_iter()
        .filter(|(_, rec)| process::is_alive(rec))
        .map(|(name, rec)| format!("{name} (pid {})", rec.pid))
        .collect();
    if !alive.is_empty() {
        return Err(anyhow::anyhow!(
            "processes of an earlier lab in {} are still running: {}; stop them with `lab down --root {}`",
            config.root.display(),
            alive.join(", "),
            config.root.display()
        )
        .into());
    }
    Ok(Some(old))
}

/// Removes what an earlier lab in this root left in the kernel (its supervisor died before
/// cleaning up; its processes are gone, [`refuse_busy_root`] checked).
fn remove_leftovers(old: &LabState) -> Result<()> {
    let left = Leftovers::from_state(old);
    if left.is_empty() || left.existing().is_empty() {
        return Ok(());
    }
    let removed = isolation::teardown(&left)
        .context("removing what an earlier lab in this root left behind (try `lab cleanup`)")?;
    tracing::warn!(removed = %removed.join(", "), "removed leftovers of an earlier lab in this root");
    Ok(())
}

/// Allocates the lab's subnet, records the plan in the state file, then creates it.
fn isolate(config: &mut LabConfig) -> Result<LabState> {
    let started = std::time::Instant::now();
    let name = isolation::lab_name(&config.root);
    let claim = Claim::allocate(&name, &config.components)?;
    config.isolation_plan = Some(claim.plan().clone());
    let mut state = initial_state(
        config,
        IsolationState {
            mode: IsolationMode::Netns,
            reason: None,
        },
    )?;
    claim.plan().record(&mut state);
    // Recorded before anything exists, so a crash at any point leaves a cleanable state file.
    state.write_atomic(&config.state_file())?;
    match claim.create() {
        Ok(plan) => {
            let took_ms = started.elapsed().as_millis() as u64;
            tracing::info!(bridge = plan.bridge(), subnet = %plan.subnet(), took_ms, "isolation ready");
            Ok(state)
        }
        Err(e) => {
            state.phase = Phase::Failed;
            state.error = Some(format!("{e:#}"));
            let _ = state.write_atomic(&config.state_file());
            Err(e.into())
        }
    }
}

fn initial_state(config: &LabConfig, isolation: IsolationState) -> Result<LabState> {
    let me = std::process::id() as i32;
    let mut components = Vec::new();
    for c in config.components.iter() {
        components.push(ComponentState {
            name: c,
            status: Status::Stopped,
            pid: None,
            pid_start_ticks: None,
            ports: config.ports.of(c),
            urls: config.urls(c)?,
            data_dir: config.data_dir(c),
            log_file: config.log_file(c),
            restarts: 0,
            last_exit: None,
            started_at: None,
            ready_at: None,
            aux: BTreeMap::new(),
            netns: None,
            address: None,
            veth: None,
            cgroup: BTreeMap::new(),
            error: None,
        });
    }
    Ok(LabState {
        version: STATE_VERSION,
        phase: Phase::Starting,
        error: None,
        supervisor: process::record(me),
        root: config.root.clone(),
        bin_dir: config.bin_dir.clone(),
        repo: config.repo.clone(),
        control_socket: config.control_socket.clone(),
        isolation,
        bridge: None,
        subnet: None,
        gateway_address: None,
        cgroup: BTreeMap::new(),
        host_rules: Vec::new(),
        updated_at: process::now_ms(),
        components,
    })
}
