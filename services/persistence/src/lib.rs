//! The persistence service: consumes the matching engine's events from RabbitMQ and stores
//! them in PostgreSQL, then answers the read API (order status, trades, drain statistics).
//!
//! Guarantees (docs/persistence.md):
//! * **Idempotent on `seq`.** Events are inserted with `ON CONFLICT (seq) DO NOTHING` and only
//!   the newly inserted ones change `orders` and `trades`, so a redelivery changes nothing.
//! * **Ack after commit.** A delivery is acknowledged only after the transaction holding its
//!   events committed; a crash at any point leads to redelivery, never to loss.
//! * **Bounded while a dependency is away.** Without PostgreSQL the batch in hand is retried
//!   with capped backoff and the prefetch bound leaves the backlog in RabbitMQ; without
//!   RabbitMQ the consumer reconnects with capped backoff. Readiness shows both.
//! * **Nothing wedges the queue.** A message that cannot be read is stored in
//!   `poison_messages` and acked (there is no dead-letter exchange to reject it to).
//!
//! Code map: [`config`] (settings), [`decode`] (message → events or poison), [`apply`]
//! (events → order and trade rows, pure), [`seq`] (contiguous seq and gaps), [`store`] (all
//! SQL), [`pipeline`] (consume, batch, commit, ack), [`api`] (read API), [`obs`] (metrics
//! names, readiness), [`error`].

pub mod api;
pub mod apply;
pub mod config;
pub mod decode;
pub mod error;
pub mod obs;
pub mod pipeline;
pub mod seq;
pub mod store;

pub use config::{Config, SERVICE};
pub use error::Error;

use axum::Router;
use domain::Catalog;
use kit::config::Validate;
use kit::health::Readiness;
use kit::shutdown::Shutdown;
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::Arc;
use tokio::net::TcpListener;

/// The whole HTTP surface: the read API plus `/healthz`, `/readyz`, `/metrics`, with the
/// standard layers.
pub fn app(
    state: api::ApiState,
    metrics: PrometheusHandle,
    readiness: Readiness,
    config: &Config,
) -> Router {
    let app = kit::http::with_standard_layers(
        api::routes(state).merge(kit::http::admin_routes(metrics, readiness)),
        &config.http,
    );
    // Outside the layers: a 30 s profile must not meet the request timeout.
    kit::debug::with_debug_routes(app, SERVICE, &config.debug)
}

/// Runs the service on an already-bound `listener` until `shutdown` triggers: serves HTTP,
/// consumes and persists events, then drains (commits and acks the batch in hand) and
/// returns.
pub async fn run(config: Config, listener: TcpListener, shutdown: Shutdown) -> Result<(), Error> {
    config.validate()?;
    let config = Arc::new(config);
    let metrics = kit::metrics::install();
    obs::describe();
    let readiness = Readiness::new(&[obs::POSTGRES, obs::RABBITMQ]);
    let postgres = obs::Dependency::new(obs::POSTGRES, readiness.clone());
    let rabbitmq = obs::Dependency::new(obs::RABBITMQ, readiness.clone());
    postgres.down();
    rabbitmq.down();
    let pool = store::pool(&config.database)?;
    let catalog = Arc::new(Catalog::lab());

    let router = app(
        api::ApiState {
            pool: pool.clone(),
            catalog: catalog.clone(),
        },
        metrics,
        readiness,
        &config,
    );
    let server = tokio::spawn(kit::http::serve(listener, router, shutdown.clone()));

    let pipeline = pipeline::Pipeline::new(
        config.clone(),
        pool.clone(),
        catalog,
        postgres,
        rabbitmq,
        shutdown.clone(),
    );
    let pipeline_result = pipeline.run().await;
    if pipeline_result.is_err() {
        // Stop serving too: a service that cannot persist must not look alive.
        shutdown.trigger();
    }
    let server_result = server.await;
    pool.close().await;
    pipeline_result?;
    match server_result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(Error::Http(e)),
        Err(e) => return Err(Error::Task("http server", e.to_string())),
    }
    tracing::info!("stopped");
    Ok(())
}
