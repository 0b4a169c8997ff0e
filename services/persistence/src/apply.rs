//! The pure part of a batch: from the events that were newly inserted (in seq order) and the
//! current rows of the orders they touch, compute the order rows to write and the trades to
//! insert. No I/O, no clock: the same input always gives the same rows, which the unit tests
//! below pin down table by table.
//!
//! Rules (docs/persistence.md):
//! * `accepted` inserts the order with status `new`.
//! * `trade` inserts the trade and adds its quantity to both orders' `filled_quantity`; an
//!   order becomes `filled` when filled equals its quantity, `partially_filled` while it is
//!   still open and partly filled.
//! * `cancelled` adds to `cancelled_quantity`, status `cancelled`.
//! * `expired` adds to `expired_quantity`, records the reason, status `expired` unless the
//!   order is fully filled.
//! * `rejected` with a `client_order_id` inserts a `rejected` order if no row exists for that
//!   order id (a `duplicate_order_id` rejection leaves the original untouched); without one it
//!   is a rejected cancel and only the event is stored.
//!
//! Anything inconsistent (a trade on an order never accepted, an overfill) is reported as an
//! [`Anomaly`]: logged and counted, never a reason to stop.

use domain::{Catalog, Event, EventKind, OrderStatus, Price, Symbol};
use std::collections::{BTreeMap, HashMap};

/// One row of `orders`, as read and as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderRow {
    pub order_id: i64,
    pub client_order_id: String,
    pub account: Option<String>,
    pub symbol: Option<String>,
    pub side: Option<String>,
    pub order_type: Option<String>,
    pub price_ticks: Option<i64>,
    /// Decimal text (`"101.25"`), from the symbol's spec.
    pub price: Option<String>,
    /// 0 for a rejected order (the rejection does not carry it).
    pub quantity: i64,
    pub time_in_force: Option<String>,
    pub status: OrderStatus,
    pub filled_quantity: i64,
    pub cancelled_quantity: i64,
    pub expired_quantity: i64,
    pub reject_reason: Option<String>,
    pub expire_reason: Option<String>,
    pub accepted_seq: Option<i64>,
    pub last_seq: i64,
}

/// One row of `trades`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TradeRow {
    pub seq: i64,
    pub symbol: String,
    pub maker_order_id: i64,
    pub taker_order_id: i64,
    pub taker_side: &'static str,
    pub price_ticks: i64,
    pub price: Option<String>,
    pub quantity: i64,
}

/// Something in the event stream that the rules cannot make sense of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anomaly {
    /// Label of `persistence_anomalies_total{kind}`.
    pub kind: &'static str,
    pub seq: u64,
    pub order_id: u64,
    pub message: String,
}

/// What a batch changes besides `events`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Every order row inserted or changed, by order id.
    pub orders: Vec<OrderRow>,
    pub trades: Vec<TradeRow>,
    pub anomalies: Vec<Anomaly>,
}

/// The order ids whose current rows [`plan`] needs.
pub fn referenced_orders(events: &[Event]) -> Vec<i64> {
    let mut ids: Vec<i64> = Vec::new();
    for e in events {
        match &e.kind {
            EventKind::Accepted { order } => ids.push(order.order_id.0 as i64),
            EventKind::Rejected {
                order_id,
                client_order_id: Some(_),
                ..
            } => ids.push(order_id.0 as i64),
            EventKind::Rejected { .. } => {}
            EventKind::Trade {
                maker_order_id,
                taker_order_id,
                ..
            } => {
                ids.push(maker_order_id.0 as i64);
                ids.push(taker_order_id.0 as i64);
            }
            EventKind::Cancelled { order_id, .. } | EventKind::Expired { order_id, .. } => {
                ids.push(order_id.0 as i64)
            }
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Decimal text of `price` for `symbol`, or `None` for a symbol the catalog does not list.
pub fn format_price(catalog: &Catalog, symbol: &Symbol, price: Price) -> Option<String> {
    catalog
        .get("symbol", symbol.as_str())
        .ok()
        .map(|spec| spec.format_price(price))
}

/// Applies `events` (newly inserted, ascending seq; values checked by `decode`) to the
/// `existing` rows of the orders they reference.
pub fn plan(catalog: &Catalog, events: &[Event], existing: HashMap<i64, OrderRow>) -> Plan {
    let mut rows: HashMap<i64, OrderRow> = existing;
    let mut changed: BTreeMap<i64, ()> = BTreeMap::new();
    let mut out = Plan::default();
    let mut anomaly = |kind: &'static str, seq: u64, order_id: u64, message: String| {
        out.anomalies.push(Anomaly {
            kind,
            seq,
            order_id,
            message,
        })
    };
    let mut trades = Vec::new();
    for event in events {
        let seq = event.seq as i64;
        match &event.kind {
            EventKind::Accepted { order } => {
                let id = order.order_id.0 as i64;
                if rows.contains_key(&id) {
                    anomaly(
                        "accepted_twice",
                        event.seq,
                        order.order_id.0,
                        "an order row already exists for an accepted order id; kept the first"
                            .into(),
                    );
                    continue;
                }
                rows.insert(
                    id,
                    OrderRow {
                        order_id: id,
                        client_order_id: order.client_order_id.as_str().to_owned(),
                        account: order.account.as_ref().map(|a| a.as_str().to_owned()),
                        symbol: Some(order.symbol.as_str().to_owned()),
                        side: Some(order.side.as_str().to_owned()),
                        order_type: Some(order.order_type.as_str().to_owned()),
                        price_ticks: order.price.map(Price::ticks),
                        price: order
                            .price
                            .and_then(|p| format_price(catalog, &order.symbol, p)),
                        quantity: order.quantity.0 as i64,
                        time_in_force: Some(order.time_in_force.as_str().to_owned()),
                        status: OrderStatus::New,
                        filled_quantity: 0,
                        cancelled_quantity: 0,
                        expired_quantity: 0,
                        reject_reason: None,
                        expire_reason: None,
                        accepted_seq: Some(seq),
                        last_seq: seq,
                    },
                );
                changed.insert(id, ());
            }
            EventKind::Rejected {
                order_id,
                client_order_id: Some(client_order_id),
                reason,
            } => {
                let id = order_id.0 as i64;
                if rows.contains_key(&id) {
                    // E.g. duplicate_order_id: the original order stays as it is.
                    continue;
                }
                rows.insert(
                    id,
                    OrderRow {
                        order_id: id,
                        client_order_id: client_order_id.as_str().to_owned(),
                        account: None,
                        symbol: None,
                        side: None,
                        order_type: None,
                        price_ticks: None,
                        price: None,
                        quantity: 0,
                        time_in_force: None,
                        status: OrderStatus::Rejected,
                        filled_quantity: 0,
                        cancelled_quantity: 0,
                        expired_quantity: 0,
                        reject_reason: Some(reason.as_str().to_owned()),
                        expire_reason: None,
                        accepted_seq: None,
                        last_seq: seq,
                    },
                );
                changed.insert(id, ());
            }
            // A rejected cancel: the event row is all there is.
            EventKind::Rejected { .. } => {}
            EventKind::Trade {
                symbol,
                maker_order_id,
                taker_order_id,
                taker_side,
                price,
                quantity,
            } => {
                trades.push(TradeRow {
                    seq,
                    symbol: symbol.as_str().to_owned(),
                    maker_order_id: maker_order_id.0 as i64,
                    taker_order_id: taker_order_id.0 as i64,
                    taker_side: taker_side.as_str(),
                    price_ticks: price.ticks(),
                    price: format_price(catalog, symbol, *price),
                    quantity: quantity.0 as i64,
                });
                for id in [maker_order_id.0, taker_order_id.0] {
                    let Some(row) = rows.get_mut(&(id as i64)) else {
                        anomaly(
                            "trade_on_unknown_order",
                            event.seq,
                            id,
                            "trade on an order that was never accepted".into(),
                        );
                        continue;
                    };
                    row.filled_quantity = row.filled_quantity.saturating_add(quantity.0 as i64);
                    row.last_seq = seq;
                    let total = row.quantity;
                    if row.filled_quantity > total {
                        anomaly(
                            "overfill",
                            event.seq,
                            id,
                            format!(
                                "filled {} exceeds the order quantity {total}",
                                row.filled_quantity
                            ),
                        );
                    }
                    if row.filled_quantity >= total && row.status != OrderStatus::Rejected {
                        row.status = OrderStatus::Filled;
                    } else if row.status.is_open() && row.filled_quantity > 0 {
                        row.status = OrderStatus::PartiallyFilled;
                    }
                    changed.insert(id as i64, ());
                }
            }
            EventKind::Cancelled {
                order_id, quantity, ..
            } => {
                let Some(row) = rows.get_mut(&(order_id.0 as i64)) else {
                    anomaly(
                        "cancel_of_unknown_order",
                        event.seq,
                        order_id.0,
                        "cancelled event for an order that was never accepted".into(),
                    );
                    continue;
                };
                row.cancelled_quantity = row.cancelled_quantity.saturating_add(quantity.0 as i64);
                row.status = OrderStatus::Cancelled;
                row.last_seq = seq;
                changed.insert(row.order_id, ());
            }
            EventKind::Expired {
                order_id,
                quantity,
                reason,
                ..
            } => {
                let Some(row) = rows.get_mut(&(order_id.0 as i64)) else {
                    anomaly(
                        "expiry_of_unknown_order",
                        event.seq,
                        order_id.0,
                        "expired event for an order that was never accepted".into(),
                    );
                    continue;
                };
                row.expired_quantity = row.expired_quantity.saturating_add(quantity.0 as i64);
                row.expire_reason = Some(reason.as_str().to_owned());
                if row.filled_quantity < row.quantity {
                    row.status = OrderStatus::Expired;
                }
                row.last_seq = seq;
                changed.insert(row.order_id, ());
            }
        }
    }
    out.orders = changed
        .into_keys()
        .filter_map(|id| rows.remove(&id))
        .collect();
    out.trades = trades;
    out
}

/// Parses the `orders.status` text written by [`OrderStatus::as_str`].
pub fn parse_status(s: &str) -> Option<OrderStatus> {
    [
        OrderStatus::New,
        OrderStatus::PartiallyFilled,
        OrderStatus::Filled,
        OrderStatus::Cancelled,
        OrderStatus::Expired,
        OrderStatus::Rejected,
    ]
    .into_iter()
    .find(|st| st.as_str() == s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use domain::{
        ClientOrderId, ExpireReason, NewOrder, OrderId, OrderType, Quantity, RejectReason, Side,
        TimeInForce,
    };

    fn sym(s: &str) -> Symbol {
        Symbol::parse("symbol", s).unwrap()
    }

    fn accepted(seq: u64, id: u64, side: Side, price: Option<i64>, qty: u64) -> Event {
        Event {
            seq,
            kind: EventKind::Accepted {
                order: NewOrder {
                    order_id: OrderId(id),
                    client_order_id: ClientOrderId::parse("c", &format!("c-{id}")).unwrap(),
                    account: None,
                    symbol: sym("AAPL"),
                    side,
                    order_type: if price.is_some() {
                        OrderType::Limit
                    } else {
                        OrderType::Market
                    },
                    price: price.map(Price),
                    quantity: Quantity(qty),
                    time_in_force: if price.is_some() {
                        TimeInForce::Gtc
                    } else {
                        TimeInForce::Ioc
                    },
                },
            },
        }
    }

    fn trade(seq: u64, maker: u64, taker: u64, qty: u64) -> Event {
        Event {
            seq,
            kind: EventKind::Trade {
                symbol: sym("AAPL"),
                maker_order_id: OrderId(maker),
                taker_order_id: OrderId(taker),
                taker_side: Side::Buy,
                price: Price(10125),
                quantity: Quantity(qty),
            },
        }
    }

    fn expired(seq: u64, id: u64, qty: u64) -> Event {
        Event {
            seq,
            kind: EventKind::Expired {
                symbol: sym("AAPL"),
                order_id: OrderId(id),
                quantity: Quantity(qty),
                reason: ExpireReason::ImmediateOrCancel,
            },
        }
    }

    fn cancelled(seq: u64, id: u64, qty: u64) -> Event {
        Event {
            seq,
            kind: EventKind::Cancelled {
                symbol: sym("AAPL"),
                order_id: OrderId(id),
                quantity: Quantity(qty),
            },
        }
    }

    fn rejected(seq: u64, id: u64, client: Option<&str>, reason: RejectReason) -> Event {
        Event {
            seq,
            kind: EventKind::Rejected {
                order_id: OrderId(id),
                client_order_id: client.map(|c| ClientOrderId::parse("c", c).unwrap()),
                reason,
            },
        }
    }

    /// (order_id, status, filled, cancelled, expired, last_seq) of every changed row.
    fn summary(p: &Plan) -> Vec<(i64, &'static str, i64, i64, i64, i64)> {
        p.orders
            .iter()
            .map(|o| {
                (
                    o.order_id,
                    o.status.as_str(),
                    o.filled_quantity,
                    o.cancelled_quantity,
                    o.expired_quantity,
                    o.last_seq,
                )
            })
            .collect()
    }

    #[test]
    fn order_lifecycles() {
        type Case = (
            &'static str,
            Vec<Event>,
            Vec<(i64, &'static str, i64, i64, i64, i64)>,
        );
        let table: Vec<Case> = vec![
            (
                "resting order",
                vec![accepted(1, 1, Side::Sell, Some(10125), 100)],
                vec![(1, "new", 0, 0, 0, 1)],
            ),
            (
                "partial and full fill",
                vec![
                    accepted(1, 1, Side::Sell, Some(10125), 100),
                    accepted(2, 2, Side::Buy, Some(10130), 60),
                    trade(3, 1, 2, 60),
                ],
                vec![
                    (1, "partially_filled", 60, 0, 0, 3),
                    (2, "filled", 60, 0, 0, 3),
                ],
            ),
            (
                "ioc remainder expires",
                vec![
                    accepted(1, 1, Side::Sell, Some(10125), 40),
                    accepted(2, 2, Side::Buy, None, 50),
                    trade(3, 1, 2, 40),
                    expired(4, 2, 10),
                ],
                vec![(1, "filled", 40, 0, 0, 3), (2, "expired", 40, 0, 10, 4)],
            ),
            (
                "cancel after a partial fill",
                vec![
                    accepted(1, 1, Side::Sell, Some(10125), 100),
                    accepted(2, 2, Side::Buy, None, 30),
                    trade(3, 1, 2, 30),
                    cancelled(4, 1, 70),
                ],
                vec![(1, "cancelled", 30, 70, 0, 4), (2, "filled", 30, 0, 0, 3)],
            ),
            (
                "rejected new order, rejected cancel, duplicate id",
                vec![
                    accepted(1, 1, Side::Sell, Some(10125), 100),
                    rejected(2, 2, Some("c-2"), RejectReason::UnknownSymbol),
                    rejected(3, 1, None, RejectReason::UnknownOrder),
                    rejected(4, 1, Some("c-1"), RejectReason::DuplicateOrderId),
                ],
                vec![(1, "new", 0, 0, 0, 1), (2, "rejected", 0, 0, 0, 2)],
            ),
        ];
        for (name, events, want) in table {
            let p = plan(&Catalog::lab(), &events, HashMap::new());
            assert_eq!(summary(&p), want, "{name}");
            assert!(p.anomalies.is_empty(), "{name}: {:?}", p.anomalies);
        }
    }

    #[test]
    fn existing_rows_are_updated_and_unknown_orders_reported() {
        let first = plan(
            &Catalog::lab(),
            &[accepted(1, 1, Side::Sell, Some(10125), 100)],
            HashMap::new(),
        );
        let existing: HashMap<i64, OrderRow> =
            first.orders.into_iter().map(|o| (o.order_id, o)).collect();
        let p = plan(&Catalog::lab(), &[trade(2, 1, 9, 100)], existing);
        assert_eq!(summary(&p), vec![(1, "filled", 100, 0, 0, 2)]);
        assert_eq!(p.trades.len(), 1);
        assert_eq!(p.trades[0].price.as_deref(), Some("101.25"));
        assert_eq!(p.anomalies.len(), 1);
        assert_eq!(p.anomalies[0].kind, "trade_on_unknown_order");
        assert_eq!(p.anomalies[0].order_id, 9);
    }

    #[test]
    fn prices_use_the_symbol_spec() {
        let p = plan(
            &Catalog::lab(),
            &[accepted(1, 1, Side::Sell, Some(10125), 100)],
            HashMap::new(),
        );
        assert_eq!(p.orders[0].price.as_deref(), Some("101.25"));
        assert_eq!(
            referenced_orders(&[trade(5, 3, 2, 1), cancelled(6, 3, 1)]),
            vec![2, 3]
        );
        for s in [
            "new",
            "partially_filled",
            "filled",
            "cancelled",
            "expired",
            "rejected",
        ] {
            assert_eq!(parse_status(s).map(OrderStatus::as_str), Some(s));
        }
        assert_eq!(parse_status("open"), None);
    }
}
