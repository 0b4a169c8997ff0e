//! The supervisor: one tokio task per component, plus the state they share.
//!
//! A component task owns its child process and is the only one that waits on it. It reacts to
//! three things: the child exiting, its readiness check finishing, and control messages
//! ([`Ctl`]) from the [`crate::Lab`] handle. Unexpected exits are restarted with exponential
//! backoff (bounded, see [`crate::RestartPolicy`]); exit code 64 (bad configuration) is never
//! restarted; a component stopped on request is `held` until started again.
//!
//! [`Shared`] holds the state file contents behind a mutex, rewrites `state.json` on every
//! change and wakes waiters through a watch channel. Processes are spawned while holding that
//! mutex, so a process is recorded before anyone can look, and once the lab is closing (its
//! handle dropped) nothing new is spawned.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use nix::sys::signal::Signal;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::component::Component;
use crate::config::{Backoff, LabConfig};
use crate::error::{LabError, Result};
use crate::launch::{Ctx, Readiness, Recipe};
use crate::process::{self, now_ms};
use crate::state::{ComponentState, ExitRecord, LabState, ProcessRecord, Status};

/// Control messages to a component task; each is answered on its oneshot.
#[derive(Debug)]
pub(crate) enum Ctl {
    /// Start unless running (answered once spawned, not once ready).
    Start(oneshot::Sender<Result<()>>),
    /// Stop gracefully and hold down (answered once stopped).
    Stop(oneshot::Sender<Result<()>>),
    /// Stop gracefully, then start (answered once spawned again).
    Restart(oneshot::Sender<Result<()>>),
    /// Stop gracefully and end the task.
    Shutdown(oneshot::Sender<()>),
}

/// Capacity of a component's control queue: control is rare and every sender awaits its reply.
const CONTROL_QUEUE: usize = 16;

/// Extra time the readiness check gets past its own deadline before it is cut off.
const READINESS_GRACE: Duration = Duration::from_secs(2);

/// How long a port the plan held for a component may stay taken after the plan let go of it
/// (see `Task::spawn`).
const RELEASE_GRACE: Duration = Duration::from_secs(2);

/// How long to wait for the leftovers of a component killed through its cgroups to be gone.
const SWEEP_WAIT: Duration = Duration::from_secs(5);

struct Guarded {
    state: LabState,
    /// Set when the lab handle is dropped: spawn nothing more.
    closing: bool,
}

/// State shared by the lab handle and the component tasks.
pub(crate) struct Shared {
    pub(crate) cfg: Arc<LabConfig>,
    guarded: Mutex<Guarded>,
    changed: watch::Sender<u64>,
}

impl Shared {
    pub(crate) fn new(cfg: Arc<LabConfig>, state: LabState) -> Arc<Self> {
        let shared = Arc::new(Shared {
            cfg,
            guarded: Mutex::new(Guarded {
                state,
                closing: false,
            }),
            changed: watch::channel(0).0,
        });
        let mut g = shared.lock();
        shared.persist(&mut g);
        drop(g);
        shared
    }

    fn lock(&self) -> MutexGuard<'_, Guarded> {
        // A panic while holding the lock leaves consistent-enough data (plain fields): go on.
        self.guarded.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes the state file and wakes waiters; called with the lock held so writes are ordered.
    fn persist(&self, g: &mut Guarded) {
        g.state.updated_at = now_ms();
        let path = self.cfg.state_file();
        if let Err(e) = g.state.write_atomic(&path) {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the state file");
        }
        self.changed.send_modify(|v| *v += 1);
    }

    /// A copy of the current state.
    pub(crate) fn snapshot(&self) -> LabState {
        self.lock().state.clone()
    }

    /// A copy of one component's state.
    pub(crate) fn component(&self, c: Component) -> Result<ComponentState> {
        self.lock()
            .state
            .component(c)
            .cloned()
            .ok_or(LabError::NotInLab(c))
    }

    /// Wakes on every state change.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Changes the state, rewrites the file, wakes waiters.
    pub(crate) fn update(&self, f: impl FnOnce(&mut LabState)) {
        let mut g = self.lock();
        f(&mut g.state);
        self.persist(&mut g);
    }

    /// Changes one component's state.
    pub(crate) fn update_component(&self, c: Component, f: impl FnOnce(&mut ComponentState)) {
        self.update(|s| {
            if let Some(cs) = s.component_mut(c) {
                f(cs);
            }
        });
    }

    /// Spawns the main process of `c` and records it (status `starting`).
    pub(crate) fn spawn_main(
        &self,
        c: Component,
        cmd: &mut Command,
    ) -> anyhow::Result<(Child, i32)> {
        let mut g = self.lock();
        anyhow::ensure!(!g.closing, "the lab is shutting down");
        let child = cmd.spawn().with_context(|| format!("spawning {c}"))?;
        let pid = child.id().context("the spawned process has no pid")? as i32;
        let rec = process::record(pid);
        if let Some(cs) = g.state.component_mut(c) {
            cs.pid = Some(pid);
            cs.pid_start_ticks = Some(rec.start_ticks);
            cs.started_at = Some(rec.started_at);
            cs.ready_at = None;
            cs.status = Status::Starting;
        }
        self.persist(&mut g);
        Ok((child, pid))
    }

    /// Spawns a helper process of `c` (RabbitMQ's epmd) and records it under `name`.
    pub(crate) fn spawn_aux(
        &self,
        c: Component,
        name: &str,
        cmd: &mut Command,
    ) -> anyhow::Result<Child> {
        let mut g = self.lock();
        anyhow::ensure!(!g.closing, "the lab is shutting down");
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {c}'s {name}"))?;
        let pid = child.id().context("the spawned process has no pid")? as i32;
        if let Some(cs) = g.state.component_mut(c) {
            cs.aux.insert(name.to_string(), process::record(pid));
        }
        self.persist(&mut g);
        Ok(child)
    }

    /// Forgets a helper process after stopping it.
    pub(crate) fn clear_aux(&self, c: Component, name: &str) {
        self.update_component(c, |cs| {
            cs.aux.remove(name);
        });
    }

    /// Synchronously SIGKILLs the process group of every recorded process, and everything in
    /// the components' cgroups, and stops all future spawns. Returns what was still alive.
    pub(crate) fn kill_all_now(&self) -> Vec<(String, ProcessRecord)> {
        let mut g = self.lock();
        g.closing = true;
        let mut alive = Vec::new();
        for (name, rec) in g.state.recorded_processes() {
            if process::is_alive(&rec) {
                let _ = process::signal_tree(rec.pid, Signal::SIGKILL);
                alive.push((name, rec));
            } else if !process::group_members(rec.pid).is_empty() {
                let _ = process::signal_group(rec.pid, Signal::SIGKILL);
                alive.push((name, rec));
            }
        }
        if let Some(plan) = &self.cfg.isolation_plan {
            for c in self.cfg.components.iter() {
                for pid in plan.placement(c).members() {
                    let _ = process::signal_process(pid, Signal::SIGKILL);
                    alive.push((c.to_string(), process::record_existing(pid)));
                }
            }
        }
        alive
    }

    /// Pids in `c`'s cgroups other than its helpers (epmd): what a signal to the whole
    /// component reaches besides its process tree. Empty without isolation.
    pub(crate) fn cgroup_members(&self, c: Component) -> Vec<i32> {
        let Some(plan) = &self.cfg.isolation_plan else {
            return Vec::new();
        };
        let helpers: Vec<i32> = self
            .lock()
            .state
            .component(c)
            .map(|cs| cs.aux.values().map(|p| p.pid).collect())
            .unwrap_or_default();
        plan.placement(c)
            .members()
            .into_iter()
            .filter(|pid| !helpers.contains(pid))
            .collect()
    }

    /// After `c`'s main process is gone: SIGKILLs whatever else of it is left in its cgroups
    /// (helpers excepted), the way a container's processes die with it, and waits (bounded)
    /// until they are gone. Returns how many there were.
    pub(crate) async fn sweep_cgroup(&self, c: Component) -> usize {
        let left = self.cgroup_members(c);
        if left.is_empty() {
            return 0;
        }
        let recs: Vec<ProcessRecord> = left.iter().map(|p| process::record_existing(*p)).collect();
        for pid in &left {
            let _ = process::signal_process(*pid, Signal::SIGKILL);
        }
        let deadline = Instant::now() + SWEEP_WAIT;
        while recs.iter().any(process::is_alive) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        left.len()
    }
}

/// A running main process.
struct Run {
    child: Child,
    pid: i32,
    spawned: Instant,
    /// When readiness was confirmed.
    ready_since: Option<Instant>,
    /// Pending readiness check; `pending()` forever once ready.
    readiness: Readiness,
}

enum Phase {
    /// No process and none scheduled: not started, held, failed.
    Idle,
    /// Exited unexpectedly; restart at this instant.
    Waiting(Instant),
    Running(Run),
}

enum Event {
    Exited(std::io::Result<std::process::ExitStatus>),
    Readiness(anyhow::Result<()>),
    Control(Option<Ctl>),
}

/// Starts the task of one component; it idles until told to start.
pub(crate) fn spawn_task(
    shared: Arc<Shared>,
    comp: Component,
) -> (mpsc::Sender<Ctl>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(CONTROL_QUEUE);
    let task = Task {
        comp,
        ctx: Ctx::new(comp, shared.cfg.clone()),
        recipe: Recipe::new(comp),
        backoff: Backoff::new(shared.cfg.restart.clone()),
        shared,
        rx,
        prepared: false,
    };
    (tx, tokio::spawn(task.run()))
}

struct Task {
    comp: Component,
    shared: Arc<Shared>,
    ctx: Ctx,
    recipe: Recipe,
    rx: mpsc::Receiver<Ctl>,
    backoff: Backoff,
    prepared: bool,
}

impl Task {
    async fn run(mut self) {
        let mut phase = Phase::Idle;
        loop {
            phase = match phase {
                Phase::Idle => match self.rx.recv().await {
                    Some(Ctl::Start(reply)) | Some(Ctl::Restart(reply)) => {
                        self.backoff.reset();
                        let (next, result) = self.attempt().await;
                        let _ = reply.send(result);
                        next
                    }
                    Some(Ctl::Stop(reply)) => {
                        self.recipe.after_stop(&self.ctx, &self.shared).await;
                        self.shared
                            .update_component(self.comp, |cs| cs.status = Status::Held);
                        let _ = reply.send(Ok(()));
                        Phase::Idle
                    }
                    Some(Ctl::Shutdown(reply)) => return self.finish(Some(reply)).await,
                    None => return self.finish(None).await,
                },
                Phase::Waiting(at) => {
                    let cmd = tokio::select! {
                        _ = tokio::time::sleep_until(at) => None,
                        cmd = self.rx.recv() => Some(cmd),
                    };
                    match cmd {
                        None => self.attempt().await.0,
                        Some(Some(Ctl::Start(reply))) | Some(Some(Ctl::Restart(reply))) => {
                            self.backoff.reset();
                            let (next, result) = self.attempt().await;
                            let _ = reply.send(result);
                            next
                        }
                        Some(Some(Ctl::Stop(reply))) => {
                            self.recipe.after_stop(&self.ctx, &self.shared).await;
                            self.shared
                                .update_component(self.comp, |cs| cs.status = Status::Held);
                            process::mark(
                                &self.ctx.log,
                                &format!("{} held down (restart cancelled)", self.comp),
                            );
                            let _ = reply.send(Ok(()));
                            Phase::Idle
                        }
                        Some(Some(Ctl::Shutdown(reply))) => return self.finish(Some(reply)).await,
                        Some(None) => return self.finish(None).await,
                    }
                }
                Phase::Running(mut run) => {
                    let event = tokio::select! {
                        status = run.child.wait() => Event::Exited(status),
                        result = &mut run.readiness => Event::Readiness(result),
                        cmd = self.rx.recv() => Event::Control(cmd),
                    };
                    match event {
                        Event::Exited(status) => self.on_exit(run, status, None).await,
                        Event::Readiness(Ok(())) => {
                            self.on_ready(&mut run);
                            Phase::Running(run)
                        }
                        Event::Readiness(Err(e)) => {
                            let deadline = humantime::format_duration(
                                self.shared.cfg.ready_timeout(self.comp),
                            );
                            let reason = format!("not ready within {deadline}: {e:#}");
                            process::mark(
                                &self.ctx.log,
                                &format!("{}: {reason}; killing pid {}", self.comp, run.pid),
                            );
                            let _ = process::signal_tree(run.pid, Signal::SIGKILL);
                            let status = run.child.wait().await;
                            self.on_exit(run, status, Some(reason)).await
                        }
                        Event::Control(Some(Ctl::Start(reply))) => {
                            let _ = reply.send(Ok(()));
                            Phase::Running(run)
                        }
                        Event::Control(Some(Ctl::Stop(reply))) => {
                            self.stop_running(run, "stop requested").await;
                            self.recipe.after_stop(&self.ctx, &self.shared).await;
                            self.shared
                                .update_component(self.comp, |cs| cs.status = Status::Held);
                            process::mark(&self.ctx.log, &format!("{} held down", self.comp));
                            let _ = reply.send(Ok(()));
                            Phase::Idle
                        }
                        Event::Control(Some(Ctl::Restart(reply))) => {
                            self.stop_running(run, "restart requested").await;
                            self.backoff.reset();
                            let (next, result) = self.attempt().await;
                            let _ = reply.send(result);
                            next
                        }
                        Event::Control(Some(Ctl::Shutdown(reply))) => {
                            self.stop_running(run, "lab shutdown").await;
                            return self.finish(Some(reply)).await;
                        }
                        Event::Control(None) => {
                            self.stop_running(run, "lab handle dropped").await;
                            return self.finish(None).await;
                        }
                    }
                }
            };
        }
    }

    /// Prepares (once) and spawns. Spawn failures go through the restart policy like crashes;
    /// a failed preparation marks the component failed.
    async fn attempt(&mut self) -> (Phase, Result<()>) {
        self.shared.update_component(self.comp, |cs| {
            cs.status = Status::Starting;
            cs.error = None;
        });
        if !self.prepared {
            if let Err(e) = self.recipe.prepare(&self.ctx).await {
                let reason = format!("preparing {} failed: {e:#}", self.comp);
                return (Phase::Idle, Err(self.fail(reason)));
            }
            self.prepared = true;
        }
        match self.spawn().await {
            Ok(run) => (Phase::Running(run), Ok(())),
            Err(e) => {
                let reason = format!("starting {} failed: {e:#}", self.comp);
                process::mark(&self.ctx.log, &reason);
                tracing::warn!(component = %self.comp, error = %reason, "start failed");
                if self.shared.lock().closing {
                    return (Phase::Idle, Err(LabError::ShuttingDown));
                }
                self.shared
                    .update_component(self.comp, |cs| cs.error = Some(reason.clone()));
                (self.schedule_restart(Duration::ZERO, &reason), Ok(()))
            }
        }
    }

    async fn spawn(&mut self) -> anyhow::Result<Run> {
        let cfg = &self.shared.cfg;
        // Picked ports are held by the plan until now, so that nobody takes them meanwhile.
        let released = cfg.ports.release(self.comp);
        let deadline = Instant::now() + RELEASE_GRACE;
        loop {
            // Helper ports (epmd) are held by our own helper across restarts.
            match cfg.check_ports_free(self.comp, self.recipe.helper_ports()) {
                Ok(()) => break,
                // A child that another component's start forked this very moment holds a copy
                // of the listener just closed, until it executes its program.
                Err(LabError::PortInUse { name, .. })
                    if released.contains(&name) && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(e) => return Err(anyhow::anyhow!("{e}")),
            }
        }
        self.recipe.before_spawn(&self.ctx, &self.shared).await?;
        let deadline = Instant::now() + cfg.ready_timeout(self.comp);
        let check = self.recipe.readiness(&self.ctx, deadline)?;
        let readiness: Readiness = Box::pin(async move {
            match tokio::time::timeout_at(deadline + READINESS_GRACE, check).await {
                Ok(result) => result,
                Err(_) => anyhow::bail!("the readiness check was still running at the deadline"),
            }
        });
        let mut cmd = self.recipe.command(&self.ctx)?;
        let (child, pid) = self.shared.spawn_main(self.comp, &mut cmd)?;
        let restarts = self
            .shared
            .component(self.comp)
            .map(|c| c.restarts)
            .unwrap_or(0);
        process::mark(
            &self.ctx.log,
            &format!(
                "{} started, pid {pid} (restarts so far: {restarts})",
                self.comp
            ),
        );
        tracing::info!(component = %self.comp, pid, "started");
        Ok(Run {
            child,
            pid,
            spawned: Instant::now(),
            ready_since: None,
            readiness,
        })
    }

    fn on_ready(&mut self, run: &mut Run) {
        let took = run.spawned.elapsed();
        run.ready_since = Some(Instant::now());
        run.readiness = Box::pin(std::future::pending());
        self.shared.update_component(self.comp, |cs| {
            cs.status = Status::Ready;
            cs.ready_at = Some(now_ms());
            cs.error = None;
        });
        let took = humantime::format_duration(Duration::from_millis(took.as_millis() as u64));
        process::mark(
            &self.ctx.log,
            &format!("{} ready, pid {} (after {took})", self.comp, run.pid),
        );
        tracing::info!(component = %self.comp, pid = run.pid, %took, "ready");
    }

    /// The main process exited without being asked to.
    async fn on_exit(
        &mut self,
        run: Run,
        status: std::io::Result<std::process::ExitStatus>,
        reason: Option<String>,
    ) -> Phase {
        let now = Instant::now();
        // The rest of its process group (PostgreSQL backends, ...) goes with it, like a container;
        // with isolation, so does everything else in its cgroups.
        let _ = process::signal_group(run.pid, Signal::SIGKILL);
        let swept = self.shared.sweep_cgroup(self.comp).await;
        if swept > 0 {
            process::mark(
                &self.ctx.log,
                &format!(
                    "killed {swept} leftover process(es) in {}'s cgroups",
                    self.comp
                ),
            );
        }
        let mut exit = match status {
            Ok(s) => ExitRecord::from_status(s, now_ms(), false),
            Err(e) => ExitRecord {
                code: None,
                signal: None,
                signal_name: None,
                at: now_ms(),
                expected: false,
                reason: Some(format!("waiting for it failed: {e}")),
            },
        };
        if reason.is_some() {
            exit.reason = reason;
        }
        let ran = humantime::format_duration(Duration::from_millis(
            run.spawned.elapsed().as_millis() as u64,
        ));
        let what = exit.describe();
        process::mark(
            &self.ctx.log,
            &format!(
                "{} pid {} exited unexpectedly ({what}) after {ran}",
                self.comp, run.pid
            ),
        );
        tracing::warn!(component = %self.comp, pid = run.pid, exit = %what, "exited unexpectedly");
        let code = exit.code;
        self.shared.update_component(self.comp, |cs| {
            cs.pid = None;
            cs.pid_start_ticks = None;
            cs.ready_at = None;
            cs.last_exit = Some(exit);
        });
        if code == Some(crate::EXIT_CONFIG) {
            let reason = format!(
                "exited with code {} (bad configuration); not restarted: fix it, then `lab start {}`",
                crate::EXIT_CONFIG,
                self.comp
            );
            let _ = self.fail(reason);
            return Phase::Idle;
        }
        let ready_for = run
            .ready_since
            .map(|t| now.duration_since(t))
            .unwrap_or_default();
        self.schedule_restart(ready_for, &what)
    }

    /// Backoff decision after an unexpected exit or a failed spawn.
    fn schedule_restart(&mut self, ready_for: Duration, what: &str) -> Phase {
        let now = Instant::now();
        match self.backoff.on_exit(now.into_std(), ready_for) {
            Some(delay) => {
                self.shared.update_component(self.comp, |cs| {
                    cs.status = Status::Restarting;
                    cs.restarts += 1;
                });
                let delay_h = humantime::format_duration(delay);
                process::mark(
                    &self.ctx.log,
                    &format!("{} restarting in {delay_h}", self.comp),
                );
                Phase::Waiting(now + delay)
            }
            None => {
                let policy = &self.shared.cfg.restart;
                let reason = format!(
                    "gave up after {} restarts within {} (last: {what})",
                    self.backoff.recent(),
                    humantime::format_duration(policy.window)
                );
                let _ = self.fail(reason);
                Phase::Idle
            }
        }
    }

    /// Marks the component failed; returns the error to hand to whoever waits for it.
    fn fail(&mut self, reason: String) -> LabError {
        process::mark(&self.ctx.log, &format!("{} FAILED: {reason}", self.comp));
        tracing::error!(component = %self.comp, %reason, "failed");
        self.shared.update_component(self.comp, |cs| {
            cs.status = Status::Failed;
            cs.error = Some(reason.clone());
        });
        LabError::Failed {
            component: self.comp,
            reason,
            log: self.ctx.log.clone(),
            tail: process::tail(&self.ctx.log, crate::LOG_TAIL_LINES),
        }
    }

    /// Graceful stop: the recipe's stop signal (and SIGCONT, in case it is paused), then
    /// SIGKILL to the group after the stop timeout.
    async fn stop_running(&mut self, mut run: Run, why: &str) {
        let sig = self.recipe.stop_signal();
        let pid = run.pid;
        process::mark(
            &self.ctx.log,
            &format!(
                "stopping {} pid {pid} with {} ({why})",
                self.comp,
                sig.as_str()
            ),
        );
        let started = Instant::now();
        // Its descendants now, to clean up any that outlive it (a pid reused since then has
        // another start time and is left alone).
        let descendants: Vec<ProcessRecord> = process::tree(pid)
            .into_iter()
            .skip(1)
            .map(process::record_existing)
            .collect();
        let _ = process::signal_process(pid, sig);
        let _ = process::signal_group(pid, Signal::SIGCONT);
        let timeout = self.shared.cfg.stop_timeout;
        let status = match tokio::time::timeout(timeout, run.child.wait()).await {
            Ok(status) => status,
            Err(_) => {
                let t = humantime::format_duration(timeout);
                process::mark(
                    &self.ctx.log,
                    &format!("{} did not stop within {t}: SIGKILL", self.comp),
                );
                let _ = process::signal_tree(pid, Signal::SIGKILL);
                run.child.wait().await
            }
        };
        let _ = process::signal_group(pid, Signal::SIGKILL);
        for d in descendants.iter().filter(|d| process::is_alive(d)) {
            let _ = process::signal_process(d.pid, Signal::SIGKILL);
        }
        self.shared.sweep_cgroup(self.comp).await;
        let exit = match status {
            Ok(s) => ExitRecord::from_status(s, now_ms(), true),
            Err(e) => ExitRecord {
                code: None,
                signal: None,
                signal_name: None,
                at: now_ms(),
                expected: true,
                reason: Some(format!("waiting for it failed: {e}")),
            },
        };
        let took =
            humantime::format_duration(Duration::from_millis(started.elapsed().as_millis() as u64));
        process::mark(
            &self.ctx.log,
            &format!(
                "{} pid {pid} stopped ({}) in {took}",
                self.comp,
                exit.describe()
            ),
        );
        tracing::info!(component = %self.comp, pid, %took, "stopped");
        self.shared.update_component(self.comp, |cs| {
            cs.pid = None;
            cs.pid_start_ticks = None;
            cs.ready_at = None;
            cs.last_exit = Some(exit);
        });
    }

    /// End of the task: helpers stopped, status `stopped`.
    async fn finish(mut self, reply: Option<oneshot::Sender<()>>) {
        self.recipe.after_stop(&self.ctx, &self.shared).await;
        // A failed component stays `failed` (with its reason) so the reason survives shutdown.
        self.shared.update_component(self.comp, |cs| {
            if cs.status != Status::Failed {
                cs.status = Status::Stopped;
            }
        });
        if let Some(reply) = reply {
            let _ = reply.send(());
        }
    }
}
