//! The client that judges the exchange: open-model load ([`run`]), a ledger of every order
//! ([`ledger`]), the zero-loss audit ([`audit`]), the capacity search ([`capacity`]) and their
//! statistics ([`stats`]).
//!
//! Chaos experiments and end-to-end tests use this library directly; the `loadgen` binary is
//! its command line.

pub mod audit;
pub mod capacity;
pub mod flow;
pub mod ledger;
pub mod run;
pub mod stats;
