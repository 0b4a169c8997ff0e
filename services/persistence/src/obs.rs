//! Observability vocabulary: metric names (Prometheus conventions, base units), their help
//! texts, and [`Dependency`], which keeps a readiness flag and counts recoveries.

use kit::health::Readiness;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

/// Readiness name of PostgreSQL.
pub const POSTGRES: &str = "postgres";
/// Readiness name of RabbitMQ.
pub const RABBITMQ: &str = "rabbitmq";

pub const EVENTS_PERSISTED: &str = "persistence_events_persisted_total";
pub const REDELIVERED: &str = "persistence_redelivered_total";
pub const BATCH_SIZE: &str = "persistence_batch_size";
pub const TRANSACTION_DURATION: &str = "persistence_transaction_duration_seconds";
pub const SEQUENCE_GAPS: &str = "persistence_sequence_gaps_total";
pub const MISSING_EVENTS: &str = "persistence_sequence_gap_events_total";
pub const POISON_MESSAGES: &str = "persistence_poison_messages_total";
pub const DB_ERRORS: &str = "persistence_db_errors_total";
pub const AMQP_ERRORS: &str = "persistence_amqp_errors_total";
pub const RECONNECTS: &str = "persistence_reconnects_total";
pub const LAST_SEQ: &str = "persistence_last_seq";
pub const CONTIGUOUS_SEQ: &str = "persistence_contiguous_seq";
pub const TRADES_PERSISTED: &str = "persistence_trades_persisted_total";
pub const ANOMALIES: &str = "persistence_anomalies_total";
pub const MESSAGES_ACKED: &str = "persistence_messages_acked_total";
pub const CONSUMER_LAG: &str = "persistence_consumer_lag_seconds";

/// Registers help texts (shown on `/metrics`) and makes the unlabelled counters visible at 0
/// from the start, so that `rate()` and absence alerts work before the first event.
pub fn describe() {
    for name in [
        EVENTS_PERSISTED,
        REDELIVERED,
        SEQUENCE_GAPS,
        MISSING_EVENTS,
        AMQP_ERRORS,
        TRADES_PERSISTED,
        MESSAGES_ACKED,
    ] {
        metrics::counter!(name).increment(0);
    }
    for kind in ["transient", "permanent"] {
        metrics::counter!(DB_ERRORS, "kind" => kind).increment(0);
    }
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        EVENTS_PERSISTED,
        Unit::Count,
        "Events newly inserted into PostgreSQL."
    );
    describe_counter!(
        REDELIVERED,
        Unit::Count,
        "Events received again that were already stored (no-ops)."
    );
    describe_histogram!(BATCH_SIZE, Unit::Count, "Events per batch transaction.");
    describe_histogram!(
        TRANSACTION_DURATION,
        Unit::Seconds,
        "Duration of committed batch transactions."
    );
    describe_counter!(
        SEQUENCE_GAPS,
        Unit::Count,
        "Times a batch jumped past the highest persisted seq."
    );
    describe_counter!(
        MISSING_EVENTS,
        Unit::Count,
        "Seqs jumped over by sequence gaps."
    );
    describe_counter!(
        POISON_MESSAGES,
        Unit::Count,
        "Unreadable messages stored in poison_messages and acked, by reason."
    );
    describe_counter!(
        DB_ERRORS,
        Unit::Count,
        "Failed batch attempts, by kind (transient = outage, permanent = refused)."
    );
    describe_counter!(
        AMQP_ERRORS,
        Unit::Count,
        "Lost or failed RabbitMQ sessions."
    );
    describe_counter!(
        RECONNECTS,
        Unit::Count,
        "Recoveries of a dependency after it was lost."
    );
    describe_gauge!(LAST_SEQ, "Highest event seq persisted.");
    describe_gauge!(
        CONTIGUOUS_SEQ,
        "Highest seq such that every seq from 1 to it is persisted."
    );
    describe_counter!(TRADES_PERSISTED, Unit::Count, "Trades inserted.");
    describe_counter!(
        ANOMALIES,
        Unit::Count,
        "Events the order rules could not apply (trade on unknown order, ...), by kind."
    );
    describe_counter!(
        MESSAGES_ACKED,
        Unit::Count,
        "AMQP messages acknowledged after commit."
    );
    describe_gauge!(
        CONSUMER_LAG,
        Unit::Seconds,
        "Age of the newest committed message (from its AMQP timestamp, when the publisher sets one)."
    );
}

const NEVER_UP: u8 = 0;
const UP: u8 = 1;
const LOST: u8 = 2;

/// One dependency's readiness flag plus the memory of whether it was ever up, so that a
/// return after a loss counts as `persistence_reconnects_total{dependency}`.
#[derive(Debug, Clone)]
pub struct Dependency {
    name: &'static str,
    readiness: Readiness,
    state: Arc<AtomicU8>,
}

impl Dependency {
    pub fn new(name: &'static str, readiness: Readiness) -> Dependency {
        Dependency {
            name,
            readiness,
            state: Arc::new(AtomicU8::new(NEVER_UP)),
        }
    }

    pub fn up(&self) {
        if self.state.swap(UP, Ordering::Relaxed) == LOST {
            metrics::counter!(RECONNECTS, "dependency" => self.name).increment(1);
            tracing::info!(dependency = self.name, "dependency recovered");
        }
        self.readiness.set(self.name, true);
    }

    pub fn down(&self) {
        let _ = self
            .state
            .compare_exchange(UP, LOST, Ordering::Relaxed, Ordering::Relaxed);
        self.readiness.set(self.name, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_follow_up_and_down() {
        let r = Readiness::new(&[POSTGRES]);
        let d = Dependency::new(POSTGRES, r.clone());
        d.down();
        assert!(!r.is_ready());
        d.up();
        assert!(r.is_ready());
        d.down();
        assert!(!r.is_ready());
        d.up();
        assert!(r.is_ready());
    }
}
