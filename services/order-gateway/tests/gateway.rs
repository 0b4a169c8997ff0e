//! Tests of the order gateway at its boundary, in one binary:
//!
//! * [`malformed`]: a table of bad requests, each a 4xx naming its field (no engine needed).
//! * [`orders`]: the gateway served on port 0 against a fake matching engine and a fake
//!   persistence read API (small axum servers following those services' HTTP contracts; the
//!   real engine is tested end to end elsewhere): 201 with fills, idempotency, the retry
//!   queue (engine down, stalled, draining), load shedding, restarts, unique ids, cancels.
//! * [`openapi`]: the OpenAPI description parses and matches the routes served.
//!
//! Nothing sleeps to wait: everything is polled with a deadline ([`support::eventually`]).

#[path = "gateway/malformed.rs"]
mod malformed;
#[path = "gateway/openapi.rs"]
mod openapi;
#[path = "gateway/orders.rs"]
mod orders;
#[path = "gateway/support.rs"]
mod support;
