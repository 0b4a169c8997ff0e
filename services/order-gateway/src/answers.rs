//! The JSON the gateway answers with: the engine's outcome as a client reads it (prices as
//! decimal strings of the symbol's grid, fills with maker/taker liquidity), the `queued`
//! answer, and the order views the gateway can give when persistence has not caught up.

use domain::{
    ClientOrderId, Command, ExpireReason, Fill, NewOrder, OrderId, OrderOutcome, Price, Quantity,
    RejectReason, SymbolSpec,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The status of an order that waits in the retry queue.
pub const QUEUED: &str = "queued";

/// Whether an order's side of a trade rested (maker) or arrived (taker).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Liquidity {
    Maker,
    Taker,
}

/// One fill, as a client reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FillView {
    /// Decimal string on the symbol's grid (`"101.25"`).
    pub price: String,
    pub quantity: Quantity,
    pub trade_seq: u64,
    pub counterparty_order_id: OrderId,
    pub liquidity: Liquidity,
}

/// The answer to a command the engine executed: `201` for a new order, `200` for a cancel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderAnswer {
    pub order_id: OrderId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_order_id: Option<ClientOrderId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symbol: Option<String>,
    /// `new`, `partially_filled`, `filled`, `cancelled`, `expired` or `rejected`.
    pub status: String,
    pub filled_quantity: Quantity,
    pub resting_quantity: Quantity,
    pub fills: Vec<FillView>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reject_reason: Option<RejectReason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire_reason: Option<ExpireReason>,
}

impl OrderAnswer {
    /// Formats `outcome` for a client. `spec` formats fill prices; without it (a cancel of an
    /// order the gateway no longer remembers, whose outcome carries no fills in practice)
    /// prices are given in ticks.
    pub fn from_outcome(
        outcome: &OrderOutcome,
        client_order_id: Option<&ClientOrderId>,
        spec: Option<&SymbolSpec>,
    ) -> OrderAnswer {
        OrderAnswer {
            order_id: outcome.order_id,
            client_order_id: client_order_id.cloned(),
            symbol: spec.map(|s| s.symbol.as_str().to_owned()),
            status: outcome.status.as_str().to_owned(),
            filled_quantity: outcome.filled_quantity,
            resting_quantity: outcome.resting_quantity,
            fills: outcome.fills.iter().map(|f| fill_view(f, spec)).collect(),
            reject_reason: outcome.reject_reason,
            expire_reason: outcome.expire_reason,
        }
    }
}

fn fill_view(f: &Fill, spec: Option<&SymbolSpec>) -> FillView {
    FillView {
        price: format_price(spec, f.price),
        quantity: f.quantity,
        trade_seq: f.trade_seq,
        counterparty_order_id: f.counterparty_order_id,
        liquidity: if f.maker {
            Liquidity::Maker
        } else {
            Liquidity::Taker
        },
    }
}

fn format_price(spec: Option<&SymbolSpec>, p: Price) -> String {
    match spec {
        Some(s) => s.format_price(p),
        None => p.ticks().to_string(),
    }
}

/// The answer to a command that went into the retry queue: `202`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedAnswer {
    pub order_id: OrderId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_order_id: Option<ClientOrderId>,
    /// Always `queued`.
    pub status: String,
}

impl QueuedAnswer {
    pub fn for_command(command: &Command) -> QueuedAnswer {
        let (order_id, client_order_id) = match command {
            Command::NewOrder(o) => (o.order_id, Some(o.client_order_id.clone())),
            Command::Cancel(c) => (c.order_id, None),
        };
        QueuedAnswer {
            order_id,
            client_order_id,
            status: QUEUED.into(),
        }
    }
}

/// What the gateway can say about a queued order, in the shape of persistence's order view
/// (fields it cannot know yet are left out), marked `"source": "gateway"`.
pub fn queued_view(order: &NewOrder, spec: Option<&SymbolSpec>) -> Value {
    let mut v = serde_json::json!({
        "order_id": order.order_id,
        "client_order_id": order.client_order_id,
        "symbol": order.symbol,
        "side": order.side,
        "type": order.order_type,
        "quantity": order.quantity,
        "time_in_force": order.time_in_force,
        "status": QUEUED,
        "filled_quantity": 0,
        "fills": [],
        "source": "gateway",
    });
    if let Some(a) = &order.account {
        v["account"] = serde_json::json!(a);
    }
    if let Some(p) = order.price {
        v["price"] = Value::String(format_price(spec, p));
    }
    v
}

/// The gateway's view of an order the engine answered but persistence may not have yet.
pub fn answered_view(answer: &OrderAnswer) -> Value {
    let mut v = serde_json::to_value(answer).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        m.insert("source".into(), Value::String("gateway".into()));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use domain::{Catalog, OrderStatus};

    #[test]
    fn fills_are_formatted_on_the_symbols_grid() {
        let cat = Catalog::lab();
        let spec = cat.get("symbol", "IDX").unwrap();
        let outcome = OrderOutcome {
            order_id: OrderId(5),
            status: OrderStatus::PartiallyFilled,
            filled_quantity: Quantity(10),
            resting_quantity: Quantity(10),
            fills: vec![Fill {
                trade_seq: 9,
                price: Price(2025),
                quantity: Quantity(10),
                counterparty_order_id: OrderId(3),
                maker: false,
            }],
            reject_reason: None,
            expire_reason: None,
            first_seq: 8,
            last_seq: 9,
        };
        let a = OrderAnswer::from_outcome(&outcome, None, Some(spec));
        let j = serde_json::to_value(&a).unwrap();
        assert_eq!(j["fills"][0]["price"], "101.25");
        assert_eq!(j["fills"][0]["liquidity"], "taker");
        assert_eq!(j["status"], "partially_filled");
        assert!(j.get("reject_reason").is_none());
    }
}
