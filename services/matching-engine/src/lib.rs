//! The matching engine: one price-time order book per symbol ([`book`]), and around it the
//! journal, the idempotent command processor and the event outbox that make it crash-safe.

pub mod book;
pub mod workload;
