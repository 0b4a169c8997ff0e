//! Events the matching engine emits, and the outcome of one order as the gateway reports it.
//!
//! Every event carries the engine's sequence number: gap-free from 1, one number per event, in
//! the order the engine produced them. Persistence is idempotent on it and the audit checks it
//! for gaps.

use crate::ids::{ClientOrderId, OrderId};
use crate::order::{NewOrder, Quantity, Side};
use crate::price::{Price, Symbol};
use serde::{Deserialize, Serialize};

/// Version of the JSON wire format of commands, events and batches (`docs/wire-format.md`).
/// Bumped on any change a reader written for the previous version could misread.
pub const WIRE_VERSION: u32 = 1;

/// One engine event with its sequence number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Engine sequence number: 1, 2, 3, ... with no gaps, across all symbols.
    pub seq: u64,
    #[serde(flatten)]
    pub kind: EventKind,
}

/// One AMQP message of the engine's event stream: consecutive events in sequence order.
/// Batch boundaries carry no meaning (a republish after a restart may cut them differently);
/// readers key on each event's `seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventBatch {
    /// [`WIRE_VERSION`] of the writer; readers refuse versions they do not know.
    pub v: u32,
    pub events: Vec<Event>,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// The order passed the engine's checks. Always the first event of an order that is not
    /// rejected; its trades, expiry or resting follow.
    Accepted { order: NewOrder },
    /// The command was refused; nothing in any book changed.
    Rejected {
        order_id: OrderId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_order_id: Option<ClientOrderId>,
        reason: RejectReason,
    },
    /// A match: `quantity` shares at the maker's `price`.
    Trade {
        symbol: Symbol,
        maker_order_id: OrderId,
        taker_order_id: OrderId,
        /// The taker's side (a buy taker lifts offers).
        taker_side: Side,
        price: Price,
        quantity: Quantity,
    },
    /// The resting remainder (`quantity`) was cancelled on request.
    Cancelled {
        symbol: Symbol,
        order_id: OrderId,
        quantity: Quantity,
    },
    /// The remainder (`quantity`) of an order ended without resting, for `reason`.
    Expired {
        symbol: Symbol,
        order_id: OrderId,
        quantity: Quantity,
        reason: ExpireReason,
    },
}

impl EventKind {
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Accepted { .. } => "accepted",
            EventKind::Rejected { .. } => "rejected",
            EventKind::Trade { .. } => "trade",
            EventKind::Cancelled { .. } => "cancelled",
            EventKind::Expired { .. } => "expired",
        }
    }
}

/// Why the engine refused a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// The symbol is not listed.
    UnknownSymbol,
    /// A new order reused an order id with different contents.
    DuplicateOrderId,
    /// Cancel of an order id the engine never saw.
    UnknownOrder,
    /// Cancel of an order that is already filled, cancelled or expired.
    OrderNotOpen,
    /// The order broke a rule the gateway should have caught (price off grid, ...).
    Invalid,
}

impl RejectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::UnknownSymbol => "unknown_symbol",
            RejectReason::DuplicateOrderId => "duplicate_order_id",
            RejectReason::UnknownOrder => "unknown_order",
            RejectReason::OrderNotOpen => "order_not_open",
            RejectReason::Invalid => "invalid",
        }
    }
}

/// Why the remainder of an order expired instead of resting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpireReason {
    /// IOC: the unfilled remainder.
    ImmediateOrCancel,
    /// FOK that could not fill entirely: nothing traded.
    FillOrKill,
    /// Market order: no more liquidity on the other side.
    NoLiquidity,
    /// The next match would have been against the same account (self-trade prevention
    /// cancels the aggressor's remainder).
    SelfTrade,
}

impl ExpireReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ExpireReason::ImmediateOrCancel => "immediate_or_cancel",
            ExpireReason::FillOrKill => "fill_or_kill",
            ExpireReason::NoLiquidity => "no_liquidity",
            ExpireReason::SelfTrade => "self_trade",
        }
    }
}

/// Where an order stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    /// Resting, nothing filled yet.
    New,
    /// Resting, partly filled.
    PartiallyFilled,
    Filled,
    /// The resting remainder was cancelled on request.
    Cancelled,
    /// The remainder expired (IOC, FOK, market without liquidity, self-trade).
    Expired,
    Rejected,
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::New => "new",
            OrderStatus::PartiallyFilled => "partially_filled",
            OrderStatus::Filled => "filled",
            OrderStatus::Cancelled => "cancelled",
            OrderStatus::Expired => "expired",
            OrderStatus::Rejected => "rejected",
        }
    }

    /// Whether the order can still trade.
    pub fn is_open(self) -> bool {
        matches!(self, OrderStatus::New | OrderStatus::PartiallyFilled)
    }
}

/// One fill of an order, from that order's point of view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fill {
    /// Sequence number of the trade event (also the trade's id).
    pub trade_seq: u64,
    pub price: Price,
    pub quantity: Quantity,
    /// The other order of the trade.
    pub counterparty_order_id: OrderId,
    /// Whether this order was resting (maker) or arriving (taker).
    pub maker: bool,
}

/// The engine's answer to one command, as journaled and as replayed to a retry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderOutcome {
    pub order_id: OrderId,
    pub status: OrderStatus,
    pub filled_quantity: Quantity,
    /// Quantity still resting in the book after this command.
    pub resting_quantity: Quantity,
    pub fills: Vec<Fill>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reject_reason: Option<RejectReason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire_reason: Option<ExpireReason>,
    /// Sequence numbers of the first and last event this command produced.
    pub first_seq: u64,
    pub last_seq: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Catalog, NewOrderRequest};

    #[test]
    fn events_have_a_stable_json_shape() {
        let order = NewOrderRequest {
            client_order_id: Some("c-1".into()),
            account: None,
            symbol: Some("AAPL".into()),
            side: Some("buy".into()),
            order_type: Some("limit".into()),
            price: Some("101.25".into()),
            quantity: Some(10),
            time_in_force: None,
        }
        .validate(&Catalog::lab(), OrderId(42))
        .unwrap();
        let e = Event {
            seq: 1,
            kind: EventKind::Accepted { order },
        };
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(
            json,
            r#"{"seq":1,"type":"accepted","order":{"order_id":42,"client_order_id":"c-1","symbol":"AAPL","side":"buy","type":"limit","price":10125,"quantity":10,"time_in_force":"gtc"}}"#
        );
        let back: Event = serde_json::from_str(&json).unwrap();
        assert_eq!(back, e);

        let t = Event {
            seq: 2,
            kind: EventKind::Trade {
                symbol: crate::Symbol::parse("symbol", "AAPL").unwrap(),
                maker_order_id: OrderId(1),
                taker_order_id: OrderId(42),
                taker_side: Side::Buy,
                price: Price(10125),
                quantity: Quantity(5),
            },
        };
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(
            json,
            r#"{"seq":2,"type":"trade","symbol":"AAPL","maker_order_id":1,"taker_order_id":42,"taker_side":"buy","price":10125,"quantity":5}"#
        );
        assert_eq!(serde_json::from_str::<Event>(&json).unwrap(), t);
    }
}
