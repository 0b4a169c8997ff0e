//! The order gateway: the simulated exchange's public HTTP API.
//!
//! A client's order is parsed and validated here ([`parse`]), given an exchange-wide unique
//! id ([`ids`]), checked against the idempotency memory ([`idempotency`]), and forwarded to
//! the matching engine ([`upstream`]). When the engine cannot be reached the order goes into a
//! durable retry queue (kit's spool) and the client gets `202 queued`; the queue is drained in
//! order when the engine returns ([`background`]); when it is full the gateway sheds load with
//! `503` + `Retry-After`. Order status comes from persistence, with what the gateway itself
//! knows as a fallback ([`known`]).
//!
//! * [`config`]: typed settings (kit's loader, `APP__SECTION__KEY`).
//! * [`api`]: routes, handlers, layers; [`app`] builds the router without a socket.
//! * [`batcher`]: commands to the engine, batched under load.
//! * [`gateway`]: the state and the decisions (engine or queue, what to answer).
//! * [`answers`]: the JSON answers (prices as decimal strings on the symbol's grid).
//! * [`error`]: [`AppError`], the one place errors become JSON answers.
//! * [`obs`]: help texts of the gateway's metrics.
//!
//! [`run`] ties it together for `main`: open, spawn background work, serve until shutdown.

pub mod answers;
pub mod api;
pub mod background;
pub mod batcher;
pub mod config;
pub mod error;
pub mod gateway;
pub mod idempotency;
pub mod ids;
pub mod known;
pub mod obs;
pub mod parse;
pub mod upstream;

pub use api::app;
pub use config::GatewayConfig;
pub use error::AppError;
pub use gateway::{Gateway, StartError};

use kit::shutdown::Shutdown;
use tokio::net::TcpListener;

/// Service name in logs.
pub const SERVICE: &str = "order-gateway";

/// Runs the gateway on an already-bound `listener` until `shutdown` triggers: opens its data
/// directory, starts delivery and probes, serves, then drains (stops accepting, finishes
/// in-flight requests, lets the delivery in progress finish) and returns.
pub async fn run(
    config: GatewayConfig,
    listener: TcpListener,
    shutdown: Shutdown,
) -> Result<(), StartError> {
    let gw = Gateway::open(config)?;
    let background = gw.spawn_background(shutdown.clone());
    let served = kit::http::serve(listener, app(gw.clone()), shutdown.clone()).await;
    // If serving failed on its own, stop the background work too.
    shutdown.trigger();
    if let Err(e) = background.await {
        tracing::error!(error = %e, "background task failed");
    }
    served?;
    Ok(())
}
