//! Our own services (`matching-engine`, `persistence`, `order-gateway`, and the `probes`
//! agent), configured only through environment variables:
//!
//! - all: `APP__HTTP__ADDR=127.0.0.1:PORT` (serves `/healthz`, `/readyz`, `/metrics`),
//!   `APP__LOG__FORMAT=json`, `APP__DATA__DIR=<root>/<component>/data`;
//! - plus the primary URL of each linked component (`APP__AMQP__URL`, `APP__DATABASE__URL`,
//!   `APP__ENGINE__URL`, `APP__PERSISTENCE__URL`), from the component table.
//!
//! Ready means `GET /readyz` answers 200. Exit code 64 means bad configuration: the supervisor
//! does not restart it.

use tokio::process::Command;
use tokio::time::Instant;

use super::{Ctx, Readiness, base_command, check_executable};
use crate::ports::LOOPBACK;
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
            format!("{LOOPBACK}:{}", ctx.port("http")?),
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
        Ok(cmd)
    }
}

/// Ready when `GET path` on the component's `http` port answers 200.
pub(super) fn http_readiness(
    ctx: &Ctx,
    path: &'static str,
    deadline: Instant,
) -> anyhow::Result<Readiness> {
    let addr = std::net::SocketAddr::from((LOOPBACK, ctx.port("http")?));
    let what = format!("{} {path}", ctx.comp);
    Ok(Box::pin(async move {
        probe::poll_until(&what, deadline, || probe::http_ok(addr, path)).await
    }))
}
