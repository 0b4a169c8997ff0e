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

/// Heartbeat interval (seconds) asked for unless the URL sets one (`?heartbeat=N`). The
/// broker's default, 60 s, lets a dead peer go unnoticed for two minutes: among other things
/// the broker would keep a vanished persistence's *exclusive* consumer, refusing the
/// reconnected one, that long. 10 s is within RabbitMQ's advice (5 to 20 s).
pub const HEARTBEAT_S: u16 = 10;

/// `url` parsed, with [`HEARTBEAT_S`] unless it names a heartbeat; `None` if it does not parse
/// (lapin then says why).
pub fn uri(url: &str) -> Option<lapin::uri::AMQPUri> {
    let mut uri: lapin::uri::AMQPUri = url.parse().ok()?;
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = Some(HEARTBEAT_S);
    }
    Some(uri)
}

/// Opens a connection, naming the service in the broker's connection list.
pub async fn connect(url: &str, service: &str) -> lapin::Result<Connection> {
    let props = ConnectionProperties::default().with_connection_name(service.into());
    match uri(url) {
        Some(uri) => Connection::connect_uri(uri, props).await,
        None => Connection::connect(url, props).await,
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_is_ten_seconds_unless_the_url_names_one() {
        let default = uri("amqp://u:p@127.0.0.1:5672/%2f").unwrap();
        assert_eq!(default.query.heartbeat, Some(HEARTBEAT_S));
        assert_eq!(default.vhost, "/");
        let named = uri("amqp://u:p@127.0.0.1:5672/%2f?heartbeat=30").unwrap();
        assert_eq!(named.query.heartbeat, Some(30));
        assert!(uri("http://127.0.0.1/").is_none());
    }
}
