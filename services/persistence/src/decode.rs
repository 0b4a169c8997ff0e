//! Turning one AMQP message body into events, or into a [`Poison`] verdict.
//!
//! A body is poison when it is not JSON, carries a wire version this build does not know,
//! does not match the `EventBatch` schema, or holds values PostgreSQL could not store as they
//! are (numbers beyond `bigint`, text that is not a valid token). Such a message is stored in
//! `poison_messages` and acked; it never blocks the queue, and it never reaches the tables a
//! good message writes to. Everything that passes here can be inserted.

use domain::{Account, ClientOrderId, Event, EventBatch, EventKind, Symbol, WIRE_VERSION};
use serde::Deserialize;

/// Why a message could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Poison {
    pub reason: PoisonReason,
    /// A sentence for the log and the `poison_messages.error` column.
    pub error: String,
}

/// The class of a poison message (the `reason` label of `persistence_poison_messages_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoisonReason {
    /// Not a JSON object.
    NotJson,
    /// A `v` other than [`WIRE_VERSION`], or none.
    UnsupportedVersion,
    /// JSON of the right version that is not an `EventBatch`.
    Schema,
    /// An `EventBatch` whose values cannot be stored (seq 0, numbers beyond `bigint`, ...).
    OutOfRange,
    /// The database refused the message's events on their own (not an outage).
    Refused,
}

impl PoisonReason {
    pub fn as_str(self) -> &'static str {
        match self {
            PoisonReason::NotJson => "not_json",
            PoisonReason::UnsupportedVersion => "unsupported_version",
            PoisonReason::Schema => "schema",
            PoisonReason::OutOfRange => "out_of_range",
            PoisonReason::Refused => "refused",
        }
    }
}

fn poison(reason: PoisonReason, error: impl Into<String>) -> Poison {
    Poison {
        reason,
        error: error.into(),
    }
}

/// Only the version, so that a batch of a future version is told apart from garbage.
#[derive(Deserialize)]
struct VersionProbe {
    v: Option<serde_json::Value>,
}

/// Decodes and checks one message body.
pub fn decode(body: &[u8]) -> Result<Vec<Event>, Poison> {
    let probe: VersionProbe = serde_json::from_slice(body).map_err(|e| {
        poison(
            PoisonReason::NotJson,
            format!("body is not a JSON object: {e}"),
        )
    })?;
    match probe.v {
        Some(serde_json::Value::Number(n)) if n.as_u64() == Some(u64::from(WIRE_VERSION)) => {}
        Some(other) => {
            return Err(poison(
                PoisonReason::UnsupportedVersion,
                format!(
                    "wire version {other} is not supported (this build reads v={WIRE_VERSION})"
                ),
            ));
        }
        None => {
            return Err(poison(
                PoisonReason::UnsupportedVersion,
                "no wire version \"v\"",
            ));
        }
    }
    let batch: EventBatch = serde_json::from_slice(body).map_err(|e| {
        poison(
            PoisonReason::Schema,
            format!("not an EventBatch of v={WIRE_VERSION}: {e}"),
        )
    })?;
    for event in &batch.events {
        check_event(event).map_err(|e| {
            poison(
                PoisonReason::OutOfRange,
                format!("event seq {}: {e}", event.seq),
            )
        })?;
    }
    Ok(batch.events)
}

/// Largest value of a PostgreSQL `bigint`.
const BIGINT_MAX: u64 = i64::MAX as u64;

fn check_u64(what: &str, v: u64, min: u64) -> Result<(), String> {
    if v < min || v > BIGINT_MAX {
        Err(format!("{what} {v} is outside {min}..={BIGINT_MAX}"))
    } else {
        Ok(())
    }
}

fn check_symbol(s: &Symbol) -> Result<(), String> {
    Symbol::parse("symbol", s.as_str())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn check_event(event: &Event) -> Result<(), String> {
    check_u64("seq", event.seq, 1)?;
    match &event.kind {
        EventKind::Accepted { order } => {
            check_u64("order_id", order.order_id.0, 0)?;
            ClientOrderId::parse("client_order_id", order.client_order_id.as_str())
                .map_err(|e| e.to_string())?;
            if let Some(a) = &order.account {
                Account::parse("account", a.as_str()).map_err(|e| e.to_string())?;
            }
            check_symbol(&order.symbol)?;
            check_u64("quantity", order.quantity.0, 1)?;
        }
        EventKind::Rejected {
            order_id,
            client_order_id,
            ..
        } => {
            check_u64("order_id", order_id.0, 0)?;
            if let Some(c) = client_order_id {
                ClientOrderId::parse("client_order_id", c.as_str()).map_err(|e| e.to_string())?;
            }
        }
        EventKind::Trade {
            symbol,
            maker_order_id,
            taker_order_id,
            quantity,
            ..
        } => {
            check_symbol(symbol)?;
            check_u64("maker_order_id", maker_order_id.0, 0)?;
            check_u64("taker_order_id", taker_order_id.0, 0)?;
            check_u64("quantity", quantity.0, 1)?;
        }
        EventKind::Cancelled {
            symbol,
            order_id,
            quantity,
        }
        | EventKind::Expired {
            symbol,
            order_id,
            quantity,
            ..
        } => {
            check_symbol(symbol)?;
            check_u64("order_id", order_id.0, 0)?;
            check_u64("quantity", quantity.0, 0)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_batches_decode() {
        let body = br#"{"v":1,"events":[{"seq":1,"type":"accepted","order":{"order_id":42,"client_order_id":"c-1","symbol":"AAPL","side":"buy","type":"limit","price":10125,"quantity":10,"time_in_force":"gtc"}},{"seq":2,"type":"cancelled","symbol":"AAPL","order_id":42,"quantity":10}]}"#;
        let events = decode(body).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(decode(br#"{"v":1,"events":[]}"#).unwrap(), vec![]);
    }

    #[test]
    fn poison_is_classified() {
        let table: &[(&[u8], PoisonReason)] = &[
            (b"", PoisonReason::NotJson),
            (b"not json", PoisonReason::NotJson),
            (b"[1,2]", PoisonReason::NotJson),
            (b"\xff\xfe", PoisonReason::NotJson),
            (br#"{"events":[]}"#, PoisonReason::UnsupportedVersion),
            (br#"{"v":2,"events":[]}"#, PoisonReason::UnsupportedVersion),
            (br#"{"v":"1","events":[]}"#, PoisonReason::UnsupportedVersion),
            (br#"{"v":1}"#, PoisonReason::Schema),
            (
                br#"{"v":1,"events":[{"seq":1,"type":"exploded"}]}"#,
                PoisonReason::Schema,
            ),
            (
                br#"{"v":1,"events":[{"seq":0,"type":"cancelled","symbol":"AAPL","order_id":1,"quantity":1}]}"#,
                PoisonReason::OutOfRange,
            ),
            (
                br#"{"v":1,"events":[{"seq":18446744073709551615,"type":"cancelled","symbol":"AAPL","order_id":1,"quantity":1}]}"#,
                PoisonReason::OutOfRange,
            ),
            (
                br#"{"v":1,"events":[{"seq":3,"type":"rejected","order_id":1,"client_order_id":"a\u0000b","reason":"invalid"}]}"#,
                PoisonReason::OutOfRange,
            ),
            (
                br#"{"v":1,"events":[{"seq":3,"type":"trade","symbol":"aapl","maker_order_id":1,"taker_order_id":2,"taker_side":"buy","price":1,"quantity":1}]}"#,
                PoisonReason::OutOfRange,
            ),
        ];
        for (body, reason) in table {
            let p = decode(body).unwrap_err();
            assert_eq!(
                p.reason,
                *reason,
                "{:?}: {}",
                String::from_utf8_lossy(body),
                p.error
            );
        }
    }
}
