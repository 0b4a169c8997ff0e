//! The vocabulary of the simulated exchange: symbols, prices, quantities, ids, orders, the
//! commands the matching engine accepts and the events it emits.
//!
//! This crate depends on nothing but `serde` and does no I/O (an architecture invariant, see
//! `ARCHITECTURE.md`). Every service speaks these types, so an order is defined exactly once.
//!
//! * Prices are integer **ticks** of their symbol ([`Price`]), never floats. A [`SymbolSpec`]
//!   turns decimal strings such as `"101.25"` into ticks and back, and rejects prices that are
//!   off the tick grid.
//! * Validation ([`NewOrderRequest::validate`]) returns a [`ValidationError`] that names the
//!   offending field, so the gateway can answer `422 {"error": {"field": ...}}`.
//! * The JSON wire format of commands and events is versioned by [`WIRE_VERSION`] and
//!   documented in `docs/wire-format.md`.

mod error;
mod event;
mod ids;
mod order;
mod price;

pub use error::{ErrorCode, ValidationError};
pub use event::{
    Event, EventBatch, EventKind, ExpireReason, Fill, OrderOutcome, OrderStatus, RejectReason,
    WIRE_VERSION,
};
pub use ids::{Account, AccountKey, ClientOrderId, OrderId};
pub use order::{
    CancelOrder, Command, MAX_QUANTITY, NewOrder, NewOrderRequest, OrderType, Quantity, Side,
    TimeInForce,
};
pub use price::{Catalog, Price, Symbol, SymbolSpec};
