//! [`Lab`]: the in-process handle on a running stack, used by the end-to-end tests, the chaos
//! runner and the `lab supervise` daemon.
//!
//! `Lab::start(config)` checks everything it can before starting anything (binaries, users,
//! ports, another lab on the same root), then starts the components in dependency order —
//! independent ones in parallel — each gated on its readiness. Control operations go to the
//! component tasks of [`crate::supervisor`]. Dropping a `Lab` that was not shut down kills
//! every process group it started, synchronously, so a panicking test leaves nothing behind.

use std::collections::{BTreeMap, BTreeSet};
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
use crate::launch::Recipe;
use crate::process;
use crate::state::{ComponentState, LabState, Phase, STATE_VERSION, Status};
use crate::supervisor::{self, Ctl, Shared};

/// Extra time a caller waits past a component's own readiness deadline, so the component's
/// verdict (and its reason) arrives first.
const WAIT_GRACE: Duration = Duration::from_secs(3);

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
    pub async fn start(config: LabConfig) -> Result<Lab> {
        let lab = Lab::new(config)?;
        if let Err(e) = lab.start_all().await {
            lab.fail_start(&e).await;
            return Err(e);
        }
        Ok(lab)
    }

    /// Checks the configuration and prepares the supervisor without starting anything; call
    /// [`Lab::start_all`] next. Must be called inside a tokio runtime.
    pub fn new(config: LabConfig) -> Result<Lab> {
        tokio::runtime::Handle::try_current()
            .context("Lab::new must be called inside a tokio runtime")?;
        let config = normalise(config)?;
        refuse_busy_root(&config)?;
        let problems: Vec<String> = config
            .components
            .iter()
            .flat_map(|c| Recipe::preflight(c, &config))
            .collect();
        if !problems.is_empty() {
            return Err(LabError::Preflight(problems));
        }
        for c in config.components.iter() {
            config.ports.check_free(c)?;
        }
        let state = initial_state(&config)?;
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
/// supervisor that died.
fn refuse_busy_root(config: &LabConfig) -> Result<()> {
    let path = config.state_file();
    if !path.exists() {
        return Ok(());
    }
    let old = match LabState::read(&path) {
        Ok(old) => old,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring an unreadable state file");
            return Ok(());
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
    Ok(())
}

fn initial_state(config: &LabConfig) -> Result<LabState> {
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
        updated_at: process::now_ms(),
        components,
    })
}
