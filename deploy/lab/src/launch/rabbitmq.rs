//! A private RabbitMQ node with its own epmd.
//!
//! Everything that could leak between nodes is private: HOME (and so the Erlang cookie), node
//! name, ports (AMQP, distribution, epmd), Mnesia and log folders, config, plugins and
//! `rabbitmq-env.conf`. The lab starts the node's epmd itself (`epmd -port P`, its own process
//! group, recorded as the helper `epmd`) so it knows the pid to stop: epmd outlives the node.
//!
//! `NOTIFY_SOCKET` points at a datagram socket owned by the lab. That makes
//! `rabbitmq-server` exec the VM directly (the pid we spawn is `beam.smp`, so a kill or an OOM
//! shows up as the real exit status, not the shell wrapper's 0) and makes RabbitMQ send the
//! systemd `READY=1` notification when it has booted, which is the readiness signal (no second
//! Erlang VM for `rabbitmqctl wait`); an AMQP login as the lab's user then confirms the
//! listener, the user and its permissions.
//! AMQP logins use a dedicated user and `loopback_users = none`, so clients in network
//! namespaces can log in too.
//!
//! When the lab isolates, the node, its epmd and everything they start run in RabbitMQ's own
//! network namespace: AMQP listens on its bridge address, Erlang distribution and epmd on that
//! namespace's loopback (epmd also on the bridge address, so the lab can check it from the
//! host). `rabbitmqctl` must then run inside the namespace: see [`crate::netns::command`].

use std::io::Read as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use nix::sys::signal::Signal;
use tokio::net::UnixDatagram;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use super::{Ctx, Readiness, base_command, check_executable, check_socket_path};
use crate::config::{AMQP_PASSWORD, AMQP_USER};
use crate::ports::LOOPBACK;
use crate::{probe, process};

const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
const EPMD: &str = "/usr/bin/epmd";

/// Name of the epmd helper in the state file.
const EPMD_AUX: &str = "epmd";

fn notify_socket(ctx: &Ctx) -> PathBuf {
    ctx.dir.join("notify.sock")
}

fn home(ctx: &Ctx) -> PathBuf {
    ctx.dir.join("home")
}

fn pid_file(ctx: &Ctx) -> PathBuf {
    ctx.dir.join("rabbitmq.pid")
}

/// Node name. The same for every lab: each lab has its own epmd (names are registered per
/// epmd), and a fixed name keeps the Mnesia folder (`<data>/NODE`) across port changes.
pub const NODE_NAME: &str = "lab@localhost";

pub(super) fn preflight(ctx: &Ctx) -> Vec<String> {
    let hint = "install rabbitmq-server (scripts/ensure-deps)";
    let mut problems: Vec<String> = [SERVER, EPMD]
        .iter()
        .filter_map(|p| check_executable(Path::new(p), hint))
        .collect();
    problems.extend(check_socket_path(
        &notify_socket(ctx),
        "the RabbitMQ notify socket",
    ));
    problems
}

/// The rendered `rabbitmq.conf`.
fn config_text() -> String {
    format!(
        "# Rendered by `lab` on every start; edit deploy/lab/src/launch/rabbitmq.rs instead.\n\
         # A dedicated user that may log in from any address (clients in network namespaces).\n\
         loopback_users = none\n\
         default_user = {AMQP_USER}\n\
         default_pass = {AMQP_PASSWORD}\n\
         default_vhost = /\n\
         default_permissions.configure = .*\n\
         default_permissions.read = .*\n\
         default_permissions.write = .*\n\
         log.console = true\n\
         log.console.level = info\n\
         log.file = false\n"
    )
}

/// An Erlang cookie: 20 upper-case letters from the kernel's random source.
fn new_cookie() -> anyhow::Result<String> {
    let mut bytes = [0u8; 20];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom for the Erlang cookie")?;
    Ok(bytes.iter().map(|b| char::from(b'A' + b % 26)).collect())
}

/// Where epmd listens: loopback (where the node looks for it), plus the bridge address when
/// the node has its own namespace (so the lab can check it from the host).
fn epmd_addresses(ctx: &Ctx) -> String {
    let host = ctx.host();
    if host == LOOPBACK {
        LOOPBACK.to_string()
    } else {
        format!("{LOOPBACK},{host}")
    }
}

#[derive(Default)]
pub(crate) struct Rabbitmq {
    /// The node's epmd, kept across restarts of the node.
    epmd: Option<Child>,
    /// Bound before each spawn; taken by the readiness check.
    notify: Option<UnixDatagram>,
}

impl Rabbitmq {
    pub(super) fn prepare(&mut self, ctx: &Ctx) -> anyhow::Result<()> {
        let home = home(ctx);
        for dir in [&home, &ctx.dir.join("log")] {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let cookie = home.join(".erlang.cookie");
        if !cookie.is_file() {
            // Written before any Erlang VM runs with this HOME, so the node and its tools agree.
            std::fs::write(&cookie, new_cookie()?)
                .with_context(|| format!("writing {}", cookie.display()))?;
            std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o400))
                .with_context(|| format!("chmod 400 {}", cookie.display()))?;
        }
        let files = [
            (ctx.dir.join("rabbitmq.conf"), config_text()),
            (ctx.dir.join("enabled_plugins"), "[].\n".to_string()),
            (
                ctx.dir.join("rabbitmq-env.conf"),
                "# Private and empty: nothing from /etc/rabbitmq.\n".to_string(),
            ),
        ];
        for (path, text) in files {
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }

    /// Environment shared by the node and any `rabbitmqctl` run against it.
    fn erlang_env(&self, ctx: &Ctx, cmd: &mut Command) -> anyhow::Result<()> {
        cmd.env("HOME", home(ctx))
            .env("ERL_EPMD_PORT", ctx.port("epmd")?.to_string())
            .env("ERL_EPMD_ADDRESS", LOOPBACK.to_string());
        Ok(())
    }

    pub(super) async fn before_spawn(
        &mut self,
        ctx: &Ctx,
        shared: &crate::supervisor::Shared,
    ) -> anyhow::Result<()> {
        self.ensure_epmd(ctx, shared).await?;
        let pid_file = pid_file(ctx);
        if pid_file.exists() {
            std::fs::remove_file(&pid_file)
                .with_context(|| format!("removing stale {}", pid_file.display()))?;
        }
        let path = notify_socket(ctx);
        if path.exists() {
            std::fs::remove_file(&path)
                .with_context(|| format!("removing stale {}", path.display()))?;
        }
        self.notify =
            Some(UnixDatagram::bind(&path).with_context(|| format!("binding {}", path.display()))?);
        Ok(())
    }

    async fn ensure_epmd(
        &mut self,
        ctx: &Ctx,
        shared: &crate::supervisor::Shared,
    ) -> anyhow::Result<()> {
        if let Some(child) = &mut self.epmd {
            if child.try_wait().context("checking epmd")?.is_none() {
                return Ok(());
            }
            self.epmd = None;
        }
        let port = ctx.port("epmd")?;
        let mut cmd = base_command(EPMD, ctx)?;
        cmd.args(["-port", &port.to_string(), "-address", &epmd_addresses(ctx)]);
        self.erlang_env(ctx, &mut cmd)?;
        let child = shared.spawn_aux(ctx.comp, EPMD_AUX, &mut cmd)?;
        self.epmd = Some(child);
        let addr = std::net::SocketAddr::from((ctx.host(), port));
        let deadline = Instant::now() + Duration::from_secs(10);
        probe::poll_until("epmd", deadline, || probe::epmd_names(addr)).await?;
        Ok(())
    }

    pub(super) fn command(&self, ctx: &Ctx) -> anyhow::Result<Command> {
        let mut cmd = base_command(SERVER, ctx)?;
        self.erlang_env(ctx, &mut cmd)?;
        let dir = &ctx.dir;
        cmd.env("RABBITMQ_NODENAME", NODE_NAME)
            .env("RABBITMQ_NODE_IP_ADDRESS", ctx.host().to_string())
            .env("RABBITMQ_NODE_PORT", ctx.port("amqp")?.to_string())
            // Explicit: the default (node port + 20000) overflows for high ports.
            .env("RABBITMQ_DIST_PORT", ctx.port("dist")?.to_string())
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .env("RABBITMQ_MNESIA_BASE", &ctx.data_dir)
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            // Log to stdout, which is the component log.
            .env("RABBITMQ_LOGS", "-")
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
            .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
            .env("RABBITMQ_PID_FILE", pid_file(ctx))
            .env("NOTIFY_SOCKET", notify_socket(ctx));
        Ok(cmd)
    }

    pub(super) fn readiness(&mut self, ctx: &Ctx, deadline: Instant) -> anyhow::Result<Readiness> {
        let notify = self
            .notify
            .take()
            .context("the notify socket was not bound before the spawn")?;
        let addr = std::net::SocketAddr::from((ctx.host(), ctx.port("amqp")?));
        Ok(Box::pin(async move {
            let mut buf = vec![0u8; 4096];
            let mut last_status = String::from("no notification yet");
            loop {
                let n = match tokio::time::timeout_at(deadline, notify.recv(&mut buf)).await {
                    Ok(received) => received.context("reading the notify socket")?,
                    Err(_) => bail!("no READY=1 notification from the node (last: {last_status})"),
                };
                let msg = String::from_utf8_lossy(&buf[..n]);
                if msg.lines().any(|l| l == "READY=1") {
                    break;
                }
                if let Some(status) = msg.lines().find_map(|l| l.strip_prefix("STATUS=")) {
                    tracing::debug!(status, "rabbitmq boot");
                    last_status = status.to_string();
                }
            }
            probe::poll_until("rabbitmq AMQP login", deadline, || {
                probe::amqp_login(addr, AMQP_USER, AMQP_PASSWORD, "/")
            })
            .await
        }))
    }

    /// Stops the node's epmd (graceful, then SIGKILL) and forgets it.
    pub(super) async fn stop_epmd(&mut self, ctx: &Ctx, shared: &crate::supervisor::Shared) {
        let Some(mut child) = self.epmd.take() else {
            return;
        };
        if let Some(pid) = child.id() {
            let pid = pid as i32;
            let _ = process::signal_group(pid, Signal::SIGTERM);
            match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
                Ok(_) => {}
                Err(_) => {
                    let _ = process::signal_group(pid, Signal::SIGKILL);
                    let _ = child.wait().await;
                }
            }
            // Anything left in its group goes too.
            let _ = process::signal_group(pid, Signal::SIGKILL);
            process::mark(&ctx.log, &format!("epmd (pid {pid}) stopped"));
        }
        shared.clear_aux(ctx.comp, EPMD_AUX);
    }
}
