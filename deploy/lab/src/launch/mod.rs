//! Launch recipes: how each kind of component is prepared, spawned, checked for readiness and
//! stopped. The supervisor ([`crate::supervisor`]) is the same for every component; only the
//! recipe differs.
//!
//! Architecture invariant: every process a recipe starts for the long run is spawned through
//! [`crate::supervisor::Shared`] (so it is recorded before anything else can happen), leads
//! its own process group, and — when the lab isolates — starts inside its component's network
//! namespace and cgroups ([`base_command`]); short helper commands (initdb, pg_isready, psql)
//! run in the host namespace, reach the component at its address, and are killed when the
//! future running them is dropped.

mod postgres;
mod prometheus;
mod rabbitmq;
mod service;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use nix::sys::signal::Signal;
use tokio::process::Command;
use tokio::time::Instant;

use crate::component::{Component, Kind};
use crate::config::LabConfig;
use crate::isolation::Placement;
use crate::process;
use crate::supervisor::Shared;

pub use prometheus::PROBES_SCRAPE_INTERVAL;
pub use prometheus::render_config as render_prometheus_config;

/// Readiness check of one spawned process: resolves once it is ready (and any post-start work
/// such as creating the database is done), or fails at the deadline with the last reason.
pub(crate) type Readiness = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

/// What a recipe knows about its component.
#[derive(Clone, Debug)]
pub(crate) struct Ctx {
    pub comp: Component,
    pub cfg: Arc<LabConfig>,
    /// `<root>/<component>`.
    pub dir: PathBuf,
    /// `<root>/<component>/data`.
    pub data_dir: PathBuf,
    /// `<root>/logs/<component>.log`.
    pub log: PathBuf,
    /// Its network namespace and cgroups, when the lab isolates.
    pub placement: Option<Placement>,
}

impl Ctx {
    pub(crate) fn new(comp: Component, cfg: Arc<LabConfig>) -> Self {
        Ctx {
            comp,
            dir: cfg.component_dir(comp),
            data_dir: cfg.data_dir(comp),
            log: cfg.log_file(comp),
            placement: cfg.isolation_plan.as_ref().map(|p| p.placement(comp)),
            cfg,
        }
    }

    /// The address this component listens on (its bridge address, or 127.0.0.1).
    pub(crate) fn host(&self) -> std::net::Ipv4Addr {
        self.cfg.host(self.comp)
    }

    /// A port of this component from the plan.
    pub(crate) fn port(&self, name: &str) -> anyhow::Result<u16> {
        self.cfg
            .ports
            .port(self.comp, name)
            .map_err(|e| anyhow::anyhow!("{e}"))
    }
}

/// The recipe of one component.
pub(crate) enum Recipe {
    Postgres(postgres::Postgres),
    Rabbitmq(rabbitmq::Rabbitmq),
    Prometheus(prometheus::Prometheus),
    Service(service::Service),
}

impl Recipe {
    pub(crate) fn new(comp: Component) -> Self {
        match comp.spec().kind {
            Kind::Postgres => Recipe::Postgres(postgres::Postgres::default()),
            Kind::Rabbitmq => Recipe::Rabbitmq(rabbitmq::Rabbitmq::default()),
            Kind::Prometheus => Recipe::Prometheus(prometheus::Prometheus),
            Kind::Service { binary } => Recipe::Service(service::Service { binary }),
        }
    }

    /// Problems that prevent starting this component at all (missing binaries, users, paths
    /// too long), checked before anything is started.
    pub(crate) fn preflight(comp: Component, cfg: &LabConfig) -> Vec<String> {
        let ctx = Ctx::new(comp, Arc::new(cfg.clone()));
        match comp.spec().kind {
            Kind::Postgres => postgres::preflight(&ctx),
            Kind::Rabbitmq => rabbitmq::preflight(&ctx),
            Kind::Prometheus => prometheus::preflight(),
            Kind::Service { binary } => service::preflight(&ctx, binary),
        }
    }

    /// One-time preparation before the first start (folders, configuration, initdb).
    pub(crate) async fn prepare(&mut self, ctx: &Ctx) -> anyhow::Result<()> {
        std::fs::create_dir_all(&ctx.data_dir)
            .with_context(|| format!("creating {}", ctx.data_dir.display()))?;
        match self {
            Recipe::Postgres(r) => r.prepare(ctx).await,
            Recipe::Rabbitmq(r) => r.prepare(ctx),
            Recipe::Prometheus(r) => r.prepare(ctx),
            Recipe::Service(_) => Ok(()),
        }
    }

    /// Work before every spawn (RabbitMQ: make sure its epmd runs, open the notify socket).
    pub(crate) async fn before_spawn(&mut self, ctx: &Ctx, shared: &Shared) -> anyhow::Result<()> {
        match self {
            Recipe::Rabbitmq(r) => r.before_spawn(ctx, shared).await,
            _ => Ok(()),
        }
    }

    /// The command of the main process.
    pub(crate) fn command(&self, ctx: &Ctx) -> anyhow::Result<Command> {
        match self {
            Recipe::Postgres(r) => r.command(ctx),
            Recipe::Rabbitmq(r) => r.command(ctx),
            Recipe::Prometheus(r) => r.command(ctx),
            Recipe::Service(r) => r.command(ctx),
        }
    }

    /// The readiness check of the process just spawned.
    pub(crate) fn readiness(&mut self, ctx: &Ctx, deadline: Instant) -> anyhow::Result<Readiness> {
        match self {
            Recipe::Postgres(r) => r.readiness(ctx, deadline),
            Recipe::Rabbitmq(r) => r.readiness(ctx, deadline),
            Recipe::Prometheus(_) => service::http_readiness(ctx, "/-/ready", deadline),
            Recipe::Service(_) => service::http_readiness(ctx, "/readyz", deadline),
        }
    }

    /// Ports held by the component's helpers rather than its main process (not checked before
    /// a restart: the helper keeps them).
    pub(crate) fn helper_ports(&self) -> &'static [&'static str] {
        match self {
            Recipe::Rabbitmq(_) => &["epmd"],
            _ => &[],
        }
    }

    /// The signal that asks the main process to stop gracefully.
    pub(crate) fn stop_signal(&self) -> Signal {
        match self {
            // PostgreSQL's "fast" shutdown (what `pg_ctl stop -m fast` sends): SIGTERM would be
            // "smart" and wait for every client to disconnect.
            Recipe::Postgres(_) => Signal::SIGINT,
            _ => Signal::SIGTERM,
        }
    }

    /// After the main process was stopped on request (hold or shutdown): stop helpers.
    pub(crate) async fn after_stop(&mut self, ctx: &Ctx, shared: &Shared) {
        if let Recipe::Rabbitmq(r) = self {
            r.stop_epmd(ctx, shared).await;
        }
    }
}

/// A command for a long-running process: its own process group, stdin from /dev/null,
/// stdout+stderr appended to the component log, the component folder as working directory,
/// none of the `APP__*` / `NOTIFY_SOCKET` variables the lab itself may have inherited (a
/// service is configured only by what the lab sets), and — when the lab isolates — started
/// inside the component's network namespace and cgroups.
pub(crate) fn base_command(
    program: impl AsRef<std::ffi::OsStr>,
    ctx: &Ctx,
) -> anyhow::Result<Command> {
    base_command_as(program, ctx, None)
}

/// [`base_command`] run as `user` (uid, gid) instead of ourselves. With isolation the switch
/// happens after entering the namespace and cgroups (which needs root).
pub(crate) fn base_command_as(
    program: impl AsRef<std::ffi::OsStr>,
    ctx: &Ctx,
    user: Option<(nix::unistd::Uid, nix::unistd::Gid)>,
) -> anyhow::Result<Command> {
    let log = process::open_log(&ctx.log)?;
    let log2 = log.try_clone().context("duplicating the log file handle")?;
    let mut cmd = Command::new(program);
    cmd.process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        .current_dir(&ctx.dir)
        .kill_on_drop(false);
    for (key, _) in std::env::vars_os() {
        if key
            .to_str()
            .is_some_and(|k| k.starts_with("APP__") || k == "NOTIFY_SOCKET")
        {
            cmd.env_remove(key);
        }
    }
    match (&ctx.placement, user) {
        (Some(placement), user) => placement.apply(cmd.as_std_mut(), user)?,
        (None, Some((uid, gid))) => {
            cmd.uid(uid.as_raw()).gid(gid.as_raw());
        }
        (None, None) => {}
    }
    Ok(cmd)
}

/// Runs a short helper command to completion with its output appended to the component log.
pub(crate) async fn run_logged(mut cmd: Command, log: &Path, what: &str) -> anyhow::Result<()> {
    let out = process::open_log(log)?;
    let err = out.try_clone().context("duplicating the log file handle")?;
    // Own process group (a Ctrl-C meant for the lab does not hit it), killed if abandoned.
    cmd.process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .kill_on_drop(true);
    let status = cmd
        .status()
        .await
        .with_context(|| format!("running {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// Runs a short helper command and returns its stdout; a failure carries its stderr.
pub(crate) async fn run_captured(mut cmd: Command, what: &str) -> anyhow::Result<String> {
    cmd.process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = cmd
        .output()
        .await
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Checks that `path` is an executable file.
pub(crate) fn check_executable(path: &Path, hint: &str) -> Option<String> {
    use std::os::unix::fs::PermissionsExt as _;
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => None,
        Ok(_) => Some(format!(
            "{} is not an executable file ({hint})",
            path.display()
        )),
        Err(_) => Some(format!("{} not found ({hint})", path.display())),
    }
}

/// Longest path a Unix socket address can hold (sun_path minus the terminating NUL).
pub(crate) const UNIX_SOCKET_PATH_MAX: usize = 107;

/// A problem if a Unix socket at `path` would have too long an address.
pub(crate) fn check_socket_path(path: &Path, what: &str) -> Option<String> {
    let len = path.as_os_str().len();
    (len > UNIX_SOCKET_PATH_MAX).then(|| {
        format!(
            "{what} {} is {len} bytes long, more than a Unix socket allows ({UNIX_SOCKET_PATH_MAX}): use a shorter --root",
            path.display()
        )
    })
}
