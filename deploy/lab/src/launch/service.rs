//! Our own services (`matching-engine`, `persistence`, `order-gateway`, and the `probes`
//! agent), configured only through environment variables:
//!
//! - all: `APP__HTTP__ADDR=HOST:PORT` (serves `/healthz`, `/readyz`, `/metrics`), HOST being
//!   127.0.0.1 or, when the lab isolates, the component's bridge address,
//!   `APP__LOG__FORMAT=json`, `APP__DATA__DIR=<root>/<component>/data`;
//! - plus the primary URL of each linked component (`APP__AMQP__URL`, `APP__DATABASE__URL`,
//!   `APP__ENGINE__URL`, `APP__PERSISTENCE__URL`), from the component table;
//! - the exchange's services (not the probes agent): `APP__DEBUG__TOKEN`, the bearer token of
//!   their `/debug/pprof` endpoints, random per supervisor and kept in `<root>/debug-token`
//!   (mode 0600) for `make profile-*` and the chaos runner.
//!
//! Ready means `GET /readyz` answers 200. Exit code 64 means bad configuration: the supervisor
//! does not restart it.

use tokio::process::Command;
use tokio::time::Instant;

use super::{Ctx, Readiness, base_command, check_executable};
use crate::probe;

pub(crate) struct Service {
    pub binary: &'static str,
}

pub(super) fn preflight(ctx: &Ctx, binary: &str) -> Vec<String> {
    let path = ctx.cfg.bin_dir.join(binary);
    let hint = format!(
        "build it with `cargo build --release -p {}`, pass --bin-dir, or leave {} out with --only",
        ctx.comp.name(),
        ctx.comp
    );
    check_executable(&path, &hint).into_iter().collect()
}

impl Service {
    pub(super) fn command(&self, ctx: &Ctx) -> anyhow::Result<Command> {
        let mut cmd = base_command(ctx.cfg.bin_dir.join(self.binary), ctx)?;
        cmd.env(
            "APP__HTTP__ADDR",
            format!("{}:{}", ctx.host(), ctx.port("http")?),
        )
        .env("APP__LOG__FORMAT", "json")
        .env("APP__DATA__DIR", &ctx.data_dir);
        for link in ctx.comp.spec().links {
            let url = ctx
                .cfg
                .primary_url(link.target)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            cmd.env(link.env, url);
        }
        if ctx.comp != crate::Component::Probes {
            cmd.env("APP__DEBUG__TOKEN", debug_token(&ctx.cfg.root)?);
        }
        Ok(cmd)
    }
}

/// `<root>/debug-token`: the bearer token of the services' `/debug/pprof` endpoints.
pub const DEBUG_TOKEN_FILE: &str = "debug-token";

/// The lab's debug token: 32 random bytes in hex, made the first time this process starts a
/// service of the lab at `root` (so every `lab up` gets a new one) and written to
/// [`DEBUG_TOKEN_FILE`] with mode 0600; restarts reuse it.
fn debug_token(root: &std::path::Path) -> anyhow::Result<String> {
    use anyhow::Context as _;
    use std::io::{Read as _, Write as _};
    use std::os::unix::fs::OpenOptionsExt as _;
    static MADE: std::sync::Mutex<std::collections::BTreeMap<std::path::PathBuf, String>> =
        std::sync::Mutex::new(std::collections::BTreeMap::new());
    let mut made = MADE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(token) = made.get(root) {
        return Ok(token.clone());
    }
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom for the debug token")?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let path = root.join(DEBUG_TOKEN_FILE);
    let tmp = root.join(format!("{DEBUG_TOKEN_FILE}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(format!("{token}\n").as_bytes()))
        .and_then(|()| std::fs::rename(&tmp, &path))
        .with_context(|| format!("writing {}", path.display()))?;
    made.insert(root.to_owned(), token.clone());
    Ok(token)
}

/// Ready when `GET path` on the component's `http` port answers 200 (asked from the host, at
/// the component's address).
pub(super) fn http_readiness(
    ctx: &Ctx,
    path: &'static str,
    deadline: Instant,
) -> anyhow::Result<Readiness> {
    let addr = std::net::SocketAddr::from((ctx.host(), ctx.port("http")?));
    let what = format!("{} {path}", ctx.comp);
    Ok(Box::pin(async move {
        probe::poll_until(&what, deadline, || probe::http_ok(addr, path)).await
    }))
}
