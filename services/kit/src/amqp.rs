//! The RabbitMQ topology the engine publishes to and persistence consumes from, declared in
//! one place so that the names cannot drift apart.
//!
//! Events travel as `domain::EventBatch` JSON bodies, persistent (delivery mode 2), published
//! `mandatory` with publisher confirms to the durable direct exchange [`EVENTS_EXCHANGE`] and
//! routed with [`EVENTS_ROUTING_KEY`] to the durable queue [`EVENTS_QUEUE`].

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

/// Durable direct exchange of engine events.
pub const EVENTS_EXCHANGE: &str = "exchange.events";
/// Durable queue persistence consumes.
pub const EVENTS_QUEUE: &str = "persistence.events";
/// Routing key binding the two.
pub const EVENTS_ROUTING_KEY: &str = "events";

/// Opens a connection, naming the service in the broker's connection list.
pub async fn connect(url: &str, service: &str) -> lapin::Result<Connection> {
    let props = ConnectionProperties::default().with_connection_name(service.into());
    Connection::connect(url, props).await
}

/// Declares the exchange, the queue and their binding (idempotent; both sides call it, so
/// either may start first).
pub async fn declare_topology(channel: &Channel) -> lapin::Result<()> {
    channel
        .exchange_declare(
            EVENTS_EXCHANGE.into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            EVENTS_QUEUE.into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            EVENTS_QUEUE.into(),
            EVENTS_EXCHANGE.into(),
            EVENTS_ROUTING_KEY.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}
