//! The engine's metric vocabulary: help texts for its own families, and the counters created
//! at 0 so that `rate()` and alerts see them from the start. (kit describes `http_server_*`,
//! `dependency_*`.)

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

/// Registers help texts and creates the unlabelled counters at 0. Idempotent.
pub fn describe() {
    describe_counter!(
        "engine_commands_total",
        Unit::Count,
        "Commands applied, by command (new_order, cancel) and result (new, replay of a known order id, conflict)."
    );
    describe_histogram!(
        "engine_matching_duration_seconds",
        Unit::Seconds,
        "Time the matching thread spent applying one group of commands to the books (before the journal sync)."
    );
    describe_histogram!(
        "engine_journal_fsync_duration_seconds",
        Unit::Seconds,
        "Time to write and fsync one group commit of the journal."
    );
    describe_histogram!(
        "engine_journal_batch_size",
        Unit::Count,
        "Commands per journal group commit."
    );
    describe_counter!(
        "engine_journal_bytes_total",
        Unit::Bytes,
        "Bytes appended to the journal."
    );
    describe_gauge!(
        "engine_last_seq",
        "Sequence number of the last journaled event."
    );
    describe_gauge!(
        "engine_book_orders",
        "Resting orders in the book, per symbol."
    );
    describe_gauge!(
        "engine_book_price_levels",
        "Price levels in the book, per symbol and side."
    );
    describe_gauge!(
        "engine_orders_known",
        "Order ids the engine remembers for idempotent answers."
    );
    describe_gauge!(
        "engine_outbox_confirmed_seq",
        "Last event sequence number RabbitMQ confirmed."
    );
    describe_gauge!(
        "engine_outbox_lag_events",
        "Events journaled but not yet confirmed by RabbitMQ (last seq minus confirmed seq)."
    );
    describe_gauge!(
        "engine_outbox_lag_bytes",
        Unit::Bytes,
        "Journal bytes not yet published and confirmed (durable journal offset minus confirmed offset)."
    );
    describe_counter!(
        "engine_amqp_reconnects_total",
        Unit::Count,
        "Connection attempts to RabbitMQ after the first one (failed attempts included)."
    );
    describe_histogram!(
        "engine_outbox_publish_duration_seconds",
        Unit::Seconds,
        "Time from publishing an event batch to RabbitMQ's confirm."
    );
    describe_histogram!(
        "engine_outbox_batch_size",
        Unit::Count,
        "Events per published batch."
    );
    describe_counter!(
        "engine_outbox_published_events_total",
        Unit::Count,
        "Events published and confirmed by RabbitMQ."
    );
    for counter in [
        "engine_amqp_reconnects_total",
        "engine_outbox_published_events_total",
        "engine_journal_bytes_total",
    ] {
        metrics::counter!(counter).increment(0);
    }
}
