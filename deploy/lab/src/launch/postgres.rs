//! A private PostgreSQL 15 cluster.
//!
//! `initdb` runs once (as the `postgres` user when the lab runs as root: PostgreSQL refuses to
//! run as root), then the `postmaster` runs in the foreground as the supervised process,
//! listening on 127.0.0.1 (or, when the lab isolates, on its bridge address inside its own
//! network namespace) with its socket in `<root>/postgres/run` (never /var/run/postgresql).
//! `pg_hba.conf` trusts the lab bridge range 198.18.0.0/15 besides loopback. fsync stays on:
//! the lab demonstrates durability. Ready means `pg_isready` (from the host, at its address)
//! succeeds and the `exchange` database exists (created on the first start).

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use nix::unistd::{Gid, Uid, User};
use tokio::process::Command;
use tokio::time::Instant;

use super::{
    Ctx, Readiness, base_command_as, check_executable, check_socket_path, run_captured, run_logged,
};
use crate::config::DATABASE;
use crate::probe;

/// Debian's PostgreSQL 15 binaries.
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// The OS user PostgreSQL runs as when the lab is root.
const PG_USER: &str = "postgres";

/// Appended once to `pg_hba.conf`: clients on lab bridges (components in their own network
/// namespaces, and the host through the bridge address) may connect like local ones.
const HBA_LAB_LINE: &str = "host all all 198.18.0.0/15 trust # added by lab: the lab bridges";

fn bin(name: &str) -> PathBuf {
    Path::new(PG_BIN).join(name)
}

fn socket_dir(ctx: &Ctx) -> PathBuf {
    ctx.dir.join("run")
}

/// Whom to run PostgreSQL as: `Some` when we are root (the `postgres` user), `None` to run as
/// ourselves.
fn run_as() -> anyhow::Result<Option<(Uid, Gid)>> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let user = User::from_name(PG_USER)
        .context("looking up the postgres user")?
        .with_context(|| format!("user {PG_USER} does not exist (install postgresql-15)"))?;
    Ok(Some((user.uid, user.gid)))
}

pub(super) fn preflight(ctx: &Ctx) -> Vec<String> {
    let hint = "install postgresql-15 (scripts/ensure-deps)";
    let mut problems: Vec<String> = ["initdb", "postgres", "pg_isready", "psql"]
        .iter()
        .filter_map(|b| check_executable(&bin(b), hint))
        .collect();
    if let Err(e) = run_as() {
        problems.push(format!("{e:#}"));
    }
    if let Ok(port) = ctx.port("postgres") {
        let socket = socket_dir(ctx).join(format!(".s.PGSQL.{port}"));
        problems.extend(check_socket_path(&socket, "the PostgreSQL socket"));
    }
    problems
}

/// Makes `dir` usable by `uid`: owned by it; and every folder above it searchable by others,
/// adding o+x to the ones the lab created (the root) and refusing otherwise.
fn hand_over(dir: &Path, uid: Uid, gid: Gid, lab_root: &Path) -> anyhow::Result<()> {
    nix::unistd::chown(dir, Some(uid), Some(gid))
        .with_context(|| format!("chown {} to {PG_USER}", dir.display()))?;
    for ancestor in dir.ancestors().skip(1) {
        let meta = std::fs::metadata(ancestor)
            .with_context(|| format!("reading {}", ancestor.display()))?;
        let mode = meta.permissions().mode();
        if mode & 0o001 != 0 {
            continue;
        }
        if ancestor.starts_with(lab_root) {
            let perms = std::fs::Permissions::from_mode(mode | 0o711);
            std::fs::set_permissions(ancestor, perms)
                .with_context(|| format!("chmod o+x {}", ancestor.display()))?;
        } else {
            bail!(
                "{} (mode {:o}) is not searchable by the {PG_USER} user, so PostgreSQL cannot reach its data: \
                 choose a --root outside it",
                ancestor.display(),
                mode & 0o7777
            );
        }
    }
    Ok(())
}

#[derive(Default)]
pub(crate) struct Postgres {
    user: Option<(Uid, Gid)>,
}

impl Postgres {
    fn as_user(&self, cmd: &mut Command) {
        if let Some((uid, gid)) = self.user {
            cmd.uid(uid.as_raw()).gid(gid.as_raw());
        }
    }

    /// Lets clients on the lab bridges in (idempotent: the line is added once).
    fn trust_lab_bridges(&self, ctx: &Ctx) -> anyhow::Result<()> {
        let hba = ctx.data_dir.join("pg_hba.conf");
        let text =
            std::fs::read_to_string(&hba).with_context(|| format!("reading {}", hba.display()))?;
        if text.lines().any(|l| l.trim() == HBA_LAB_LINE) {
            return Ok(());
        }
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&hba)
            .with_context(|| format!("opening {}", hba.display()))?;
        use std::io::Write as _;
        let sep = if text.ends_with('\n') || text.is_empty() {
            ""
        } else {
            "\n"
        };
        writeln!(file, "{sep}{HBA_LAB_LINE}")
            .with_context(|| format!("appending to {}", hba.display()))?;
        Ok(())
    }

    pub(super) async fn prepare(&mut self, ctx: &Ctx) -> anyhow::Result<()> {
        self.user = run_as()?;
        let run = socket_dir(ctx);
        std::fs::create_dir_all(&run).with_context(|| format!("creating {}", run.display()))?;
        if let Some((uid, gid)) = self.user {
            for dir in [&ctx.dir, &run, &ctx.data_dir] {
                hand_over(dir, uid, gid, &ctx.cfg.root)?;
            }
        }
        std::fs::set_permissions(&ctx.data_dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod 700 {}", ctx.data_dir.display()))?;
        if ctx.data_dir.join("PG_VERSION").is_file() {
            return self.trust_lab_bridges(ctx);
        }
        crate::process::mark(&ctx.log, &format!("initdb {}", ctx.data_dir.display()));
        let mut cmd = Command::new(bin("initdb"));
        cmd.arg("-D")
            .arg(&ctx.data_dir)
            .args([
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--username=postgres",
                "--no-instructions",
            ])
            .current_dir(&ctx.dir);
        self.as_user(&mut cmd);
        run_logged(cmd, &ctx.log, "initdb").await?;
        self.trust_lab_bridges(ctx)
    }

    pub(super) fn command(&self, ctx: &Ctx) -> anyhow::Result<Command> {
        let port = ctx.port("postgres")?;
        let host = ctx.host().to_string();
        let mut cmd = base_command_as(bin("postgres"), ctx, self.user)?;
        cmd.arg("-D")
            .arg(&ctx.data_dir)
            .args(["-p", &port.to_string(), "-h", &host, "-k"])
            .arg(socket_dir(ctx))
            .args([
                "-c",
                "max_connections=100",
                "-c",
                "fsync=on",
                "-c",
                "logging_collector=off",
            ]);
        Ok(cmd)
    }

    pub(super) fn readiness(&self, ctx: &Ctx, deadline: Instant) -> anyhow::Result<Readiness> {
        let port = ctx.port("postgres")?.to_string();
        let host = ctx.host().to_string();
        Ok(Box::pin(async move {
            probe::poll_until("postgres", deadline, || {
                let mut cmd = Command::new(bin("pg_isready"));
                cmd.args([
                    "-q", "-h", &host, "-p", &port, "-U", "postgres", "-d", "postgres", "-t", "2",
                ]);
                run_captured(cmd, "pg_isready")
            })
            .await?;
            ensure_database(&host, &port).await
        }))
    }
}

fn psql(host: &str, port: &str, sql: &str) -> Command {
    let mut cmd = Command::new(bin("psql"));
    cmd.args([
        "-X",
        "-q",
        "-t",
        "-A",
        "-v",
        "ON_ERROR_STOP=1",
        "-h",
        host,
        "-p",
        port,
    ])
    .args(["-U", "postgres", "-d", "postgres", "-c", sql]);
    cmd
}

/// Creates the `exchange` database unless it exists.
async fn ensure_database(host: &str, port: &str) -> anyhow::Result<()> {
    let exists = run_captured(
        psql(
            host,
            port,
            &format!("SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"),
        ),
        "psql",
    )
    .await
    .context("checking for the exchange database")?;
    if exists.trim() != "1" {
        run_captured(
            psql(host, port, &format!("CREATE DATABASE {DATABASE}")),
            "psql",
        )
        .await
        .context("creating the exchange database")?;
        tracing::info!(database = DATABASE, "created database");
    }
    Ok(())
}
