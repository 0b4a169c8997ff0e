//! The gateway's metric vocabulary: help texts for its own families, and the label values
//! known in advance created at 0, so that `rate()`, ratios and alerts see them before the
//! first shed or rejected order. (kit describes `http_server_*`, `dependency_*`, `spool_*`.)

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

/// Every `outcome` of `gateway_orders_total`.
pub const ORDER_OUTCOMES: &[&str] = &[
    "accepted", "queued", "rejected", "shed", "conflict", "replayed", "error",
];

/// Every `reason` of `gateway_orders_rejected_total`: `validation` (the gateway refused the
/// input, see `gateway_validation_errors_total{field,code}`), the engine's reject reasons,
/// and `engine_refused` (a 422 from the engine).
pub const REJECT_REASONS: &[&str] = &[
    "validation",
    "unknown_symbol",
    "duplicate_order_id",
    "invalid",
    "engine_refused",
];

/// Registers help texts and creates the known series at 0. Idempotent.
pub fn describe() {
    describe_counter!(
        "gateway_orders_total",
        Unit::Count,
        "Answers to POST /v1/orders by outcome: accepted (201), queued (202, retry queue), rejected (4xx or engine reject), shed (503, queue full), conflict, replayed, error."
    );
    describe_counter!(
        "gateway_orders_rejected_total",
        Unit::Count,
        "Orders rejected, by reason (validation, or the engine's reject reason)."
    );
    describe_counter!(
        "gateway_cancels_total",
        Unit::Count,
        "Answers to DELETE /v1/orders/{id} by outcome."
    );
    describe_counter!(
        "gateway_validation_errors_total",
        Unit::Count,
        "Requests refused for bad input, by field and error code."
    );
    describe_gauge!(
        "gateway_queued_orders",
        "Orders answered 202 queued and not yet delivered to the engine."
    );
    describe_gauge!(
        "gateway_idempotency_entries",
        "Client order ids remembered for idempotent replays."
    );
    describe_counter!(
        "gateway_engine_errors_total",
        Unit::Count,
        "Failed calls to the matching engine, by kind (connect, timeout, io, status, protocol)."
    );
    describe_counter!(
        "gateway_persistence_errors_total",
        Unit::Count,
        "Failed calls to persistence, by kind (connect, timeout, io, status, protocol)."
    );
    describe_histogram!(
        "gateway_engine_batch_size",
        Unit::Count,
        "Client commands per call to the matching engine (1: alone on its own route; more: one POST /v1/commands)."
    );
    for outcome in ORDER_OUTCOMES {
        metrics::counter!("gateway_orders_total", "outcome" => *outcome).increment(0);
    }
    for reason in REJECT_REASONS {
        metrics::counter!("gateway_orders_rejected_total", "reason" => *reason).increment(0);
    }
}
