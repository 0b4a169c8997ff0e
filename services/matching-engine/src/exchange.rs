//! The engine's state machine: every symbol's book plus what the engine remembers about every
//! order, turning commands into numbered events and outcomes.
//!
//! Like the book, this module is pure and deterministic (no I/O, no clock): the journal
//! replays commands through [`Exchange::apply`] after a crash and checks that it produces the
//! very events it journaled.
//!
//! Idempotency lives here. A command whose order id the engine already processed, or a new
//! order whose `client_order_id` it already saw, with the same content, is answered with the
//! original [`OrderOutcome`] and changes nothing ([`Applied::Replay`]); with different content
//! it is refused ([`Applied::Conflict`]). Neither is journaled.

use crate::book::{BookEvent, BookOrder, OrderBook};
use domain::{
    AccountKey, CancelOrder, Catalog, ClientOrderId, Command, Event, EventKind, Fill, NewOrder,
    OrderId, OrderOutcome, OrderStatus, OrderType, Price, Quantity, RejectReason, SymbolSpec,
    TimeInForce,
};
use rustc_hash::FxHashMap;
use std::collections::HashMap;
use std::sync::Arc;

/// What applying one command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// A new command: its events (to journal and publish) and its outcome.
    New {
        events: Vec<Event>,
        outcome: Arc<OrderOutcome>,
    },
    /// Already processed: the original outcome. Nothing changed.
    Replay(Arc<OrderOutcome>),
    /// An id reused with different content. Nothing changed.
    Conflict {
        field: &'static str,
        message: String,
    },
}

#[derive(Debug)]
struct OrderState {
    book: usize,
    /// Digest of the order's content without its order id, to tell a retry from a conflict.
    fingerprint: u64,
    quantity: u64,
    filled: u64,
    status: OrderStatus,
    /// The answer given when the order was processed; replayed to retries.
    outcome: Arc<OrderOutcome>,
}

/// All books and the engine's memory of every order.
#[derive(Debug)]
pub struct Exchange {
    books: Vec<(SymbolSpec, OrderBook)>,
    by_symbol: HashMap<String, usize>,
    orders: FxHashMap<OrderId, OrderState>,
    client_ids: HashMap<ClientOrderId, OrderId>,
    next_seq: u64,
    scratch: Vec<BookEvent>,
}

impl Exchange {
    pub fn new(catalog: &Catalog) -> Exchange {
        let books: Vec<_> = catalog
            .specs()
            .iter()
            .map(|s| (s.clone(), OrderBook::new()))
            .collect();
        let by_symbol = books
            .iter()
            .enumerate()
            .map(|(i, (s, _))| (s.symbol.as_str().to_owned(), i))
            .collect();
        Exchange {
            books,
            by_symbol,
            orders: FxHashMap::default(),
            client_ids: HashMap::new(),
            next_seq: 1,
            scratch: Vec::with_capacity(64),
        }
    }

    /// Sequence number of the last event emitted (0 before the first).
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Orders the engine remembers (for idempotency).
    pub fn orders_known(&self) -> usize {
        self.orders.len()
    }

    pub fn book(&self, symbol: &str) -> Option<(&SymbolSpec, &OrderBook)> {
        self.by_symbol
            .get(symbol)
            .map(|&i| (&self.books[i].0, &self.books[i].1))
    }

    /// Every book, in catalog order.
    pub fn books(&self) -> impl Iterator<Item = (&SymbolSpec, &OrderBook)> {
        self.books.iter().map(|(s, b)| (s, b))
    }

    /// Applies one command.
    pub fn apply(&mut self, command: &Command) -> Applied {
        match command {
            Command::NewOrder(o) => self.new_order(o),
            Command::Cancel(c) => self.cancel(c),
        }
    }

    fn seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    fn new_order(&mut self, order: &NewOrder) -> Applied {
        let fingerprint = fingerprint(order);
        if let Some(st) = self.orders.get(&order.order_id) {
            return if st.fingerprint == fingerprint {
                Applied::Replay(st.outcome.clone())
            } else {
                Applied::Conflict {
                    field: "order_id",
                    message: format!(
                        "order id {} was already used for a different order",
                        order.order_id
                    ),
                }
            };
        }
        if let Some(first) = self.client_ids.get(&order.client_order_id) {
            let st = &self.orders[first];
            return if st.fingerprint == fingerprint {
                Applied::Replay(st.outcome.clone())
            } else {
                Applied::Conflict {
                    field: "client_order_id",
                    message: format!(
                        "client_order_id {:?} was already used for a different order",
                        order.client_order_id.as_str()
                    ),
                }
            };
        }
        let book = match self.check(order) {
            Ok(b) => b,
            Err(reason) => {
                let seq = self.seq();
                let outcome = Arc::new(OrderOutcome {
                    order_id: order.order_id,
                    status: OrderStatus::Rejected,
                    filled_quantity: Quantity(0),
                    resting_quantity: Quantity(0),
                    fills: Vec::new(),
                    reject_reason: Some(reason),
                    expire_reason: None,
                    first_seq: seq,
                    last_seq: seq,
                });
                self.remember(
                    order,
                    usize::MAX,
                    fingerprint,
                    OrderStatus::Rejected,
                    outcome.clone(),
                );
                return Applied::New {
                    events: vec![Event {
                        seq,
                        kind: EventKind::Rejected {
                            order_id: order.order_id,
                            client_order_id: Some(order.client_order_id.clone()),
                            reason,
                        },
                    }],
                    outcome,
                };
            }
        };
        let first_seq = self.seq();
        let mut events = vec![Event {
            seq: first_seq,
            kind: EventKind::Accepted {
                order: order.clone(),
            },
        }];
        let book_order = BookOrder {
            id: order.order_id,
            side: order.side,
            order_type: order.order_type,
            time_in_force: order.time_in_force,
            price: order.price.unwrap_or(Price(0)),
            quantity: order.quantity.0,
            account: order.account.as_ref().map_or(AccountKey::NONE, |a| a.key()),
        };
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        self.books[book].1.submit(book_order, &mut scratch);
        let symbol = self.books[book].0.symbol.clone();
        let mut fills = Vec::new();
        let mut filled = 0u64;
        let mut resting = 0u64;
        let mut expire_reason = None;
        for e in scratch.drain(..) {
            match e {
                BookEvent::Trade {
                    maker,
                    taker,
                    price,
                    quantity,
                } => {
                    let seq = self.seq();
                    filled += quantity;
                    fills.push(Fill {
                        trade_seq: seq,
                        price,
                        quantity: Quantity(quantity),
                        counterparty_order_id: maker,
                        maker: false,
                    });
                    if let Some(m) = self.orders.get_mut(&maker) {
                        m.filled += quantity;
                        m.status = if m.filled == m.quantity {
                            OrderStatus::Filled
                        } else {
                            OrderStatus::PartiallyFilled
                        };
                    }
                    events.push(Event {
                        seq,
                        kind: EventKind::Trade {
                            symbol: symbol.clone(),
                            maker_order_id: maker,
                            taker_order_id: taker,
                            taker_side: order.side,
                            price,
                            quantity: Quantity(quantity),
                        },
                    });
                }
                BookEvent::Rested { quantity, .. } => resting = quantity,
                BookEvent::Expired {
                    quantity, reason, ..
                } => {
                    let seq = self.seq();
                    expire_reason = Some(reason);
                    events.push(Event {
                        seq,
                        kind: EventKind::Expired {
                            symbol: symbol.clone(),
                            order_id: order.order_id,
                            quantity: Quantity(quantity),
                            reason,
                        },
                    });
                }
                // The order map catches reused ids before the book sees them, and a new
                // order does not cancel.
                BookEvent::DuplicateRejected { .. }
                | BookEvent::Cancelled { .. }
                | BookEvent::CancelRejected { .. } => {
                    debug_assert!(false, "unexpected book event {e:?} for a new order")
                }
            }
        }
        self.scratch = scratch;
        let status = if filled == order.quantity.0 {
            OrderStatus::Filled
        } else if expire_reason.is_some() {
            OrderStatus::Expired
        } else if filled > 0 {
            OrderStatus::PartiallyFilled
        } else {
            OrderStatus::New
        };
        let outcome = Arc::new(OrderOutcome {
            order_id: order.order_id,
            status,
            filled_quantity: Quantity(filled),
            resting_quantity: Quantity(resting),
            fills,
            reject_reason: None,
            expire_reason,
            first_seq,
            last_seq: self.last_seq(),
        });
        self.remember(order, book, fingerprint, status, outcome.clone());
        if let Some(st) = self.orders.get_mut(&order.order_id) {
            st.filled = filled;
        }
        Applied::New { events, outcome }
    }

    fn remember(
        &mut self,
        order: &NewOrder,
        book: usize,
        fingerprint: u64,
        status: OrderStatus,
        outcome: Arc<OrderOutcome>,
    ) {
        self.orders.insert(
            order.order_id,
            OrderState {
                book,
                fingerprint,
                quantity: order.quantity.0,
                filled: 0,
                status,
                outcome,
            },
        );
        self.client_ids
            .insert(order.client_order_id.clone(), order.order_id);
    }

    /// The engine's own checks (the gateway checks the same and more): a listed symbol, a
    /// price on the grid for limit orders and none for market orders, a whole number of lots.
    fn check(&self, o: &NewOrder) -> Result<usize, RejectReason> {
        let &book = self
            .by_symbol
            .get(o.symbol.as_str())
            .ok_or(RejectReason::UnknownSymbol)?;
        let spec = &self.books[book].0;
        let q = o.quantity.0;
        let price_ok = match (o.order_type, o.price) {
            (OrderType::Limit, Some(p)) => p.0 > 0,
            (OrderType::Market, None) => o.time_in_force != TimeInForce::Gtc,
            _ => false,
        };
        if !price_ok || q == 0 || q > domain::MAX_QUANTITY || !q.is_multiple_of(spec.lot_size) {
            return Err(RejectReason::Invalid);
        }
        Ok(book)
    }

    fn cancel(&mut self, c: &CancelOrder) -> Applied {
        let reject =
            |this: &mut Exchange, reason: RejectReason, status: OrderStatus, filled: u64| {
                let seq = this.seq();
                let outcome = Arc::new(OrderOutcome {
                    order_id: c.order_id,
                    status,
                    filled_quantity: Quantity(filled),
                    resting_quantity: Quantity(0),
                    fills: Vec::new(),
                    reject_reason: Some(reason),
                    expire_reason: None,
                    first_seq: seq,
                    last_seq: seq,
                });
                Applied::New {
                    events: vec![Event {
                        seq,
                        kind: EventKind::Rejected {
                            order_id: c.order_id,
                            client_order_id: None,
                            reason,
                        },
                    }],
                    outcome,
                }
            };
        let Some(st) = self.orders.get(&c.order_id) else {
            return reject(self, RejectReason::UnknownOrder, OrderStatus::Rejected, 0);
        };
        if !st.status.is_open() {
            let (status, filled) = (st.status, st.filled);
            return reject(self, RejectReason::OrderNotOpen, status, filled);
        }
        let book = st.book;
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        self.books[book].1.cancel(c.order_id, &mut scratch);
        let cancelled = scratch.iter().find_map(|e| match e {
            BookEvent::Cancelled { quantity, .. } => Some(*quantity),
            _ => None,
        });
        self.scratch = scratch;
        let Some(quantity) = cancelled else {
            // The engine's status said open but the book disagrees: refuse without change.
            debug_assert!(false, "open order {} not in its book", c.order_id);
            return reject(self, RejectReason::OrderNotOpen, OrderStatus::Rejected, 0);
        };
        let seq = self.seq();
        let symbol = self.books[book].0.symbol.clone();
        let st = self
            .orders
            .get_mut(&c.order_id)
            .expect("looked up above and never removed");
        st.status = OrderStatus::Cancelled;
        let outcome = Arc::new(OrderOutcome {
            order_id: c.order_id,
            status: OrderStatus::Cancelled,
            filled_quantity: Quantity(st.filled),
            resting_quantity: Quantity(0),
            fills: Vec::new(),
            reject_reason: None,
            expire_reason: None,
            first_seq: seq,
            last_seq: seq,
        });
        Applied::New {
            events: vec![Event {
                seq,
                kind: EventKind::Cancelled {
                    symbol,
                    order_id: c.order_id,
                    quantity: Quantity(quantity),
                },
            }],
            outcome,
        }
    }
}

/// FNV-1a over an order's content without its order id.
fn fingerprint(o: &NewOrder) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Field separator, so ("ab","c") and ("a","bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    };
    eat(o.client_order_id.as_str().as_bytes());
    eat(o
        .account
        .as_ref()
        .map_or(&b"\x00"[..], |a| a.as_str().as_bytes()));
    eat(o.symbol.as_str().as_bytes());
    eat(o.side.as_str().as_bytes());
    eat(o.order_type.as_str().as_bytes());
    eat(&o.price.map_or(-1, |p| p.0).to_le_bytes());
    eat(&o.quantity.0.to_le_bytes());
    eat(o.time_in_force.as_str().as_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use domain::{ExpireReason, NewOrderRequest};

    fn order(
        id: u64,
        client: &str,
        side: &str,
        price: Option<&str>,
        qty: i64,
        tif: &str,
    ) -> NewOrder {
        NewOrderRequest {
            client_order_id: Some(client.into()),
            account: Some(format!("acct-{id}")),
            symbol: Some("AAPL".into()),
            side: Some(side.into()),
            order_type: Some(if price.is_some() { "limit" } else { "market" }.into()),
            price: price.map(Into::into),
            quantity: Some(qty),
            time_in_force: Some(tif.into()),
        }
        .validate(&Catalog::lab(), OrderId(id))
        .unwrap()
    }

    fn new(x: &mut Exchange, o: NewOrder) -> (Vec<Event>, Arc<OrderOutcome>) {
        match x.apply(&Command::NewOrder(o)) {
            Applied::New { events, outcome } => (events, outcome),
            other => panic!("expected a new command, got {other:?}"),
        }
    }

    #[test]
    fn events_are_numbered_and_outcomes_tell_the_story() {
        let mut x = Exchange::new(&Catalog::lab());
        let (ev, out) = new(&mut x, order(1, "a", "sell", Some("100.00"), 10, "gtc"));
        assert_eq!(ev.len(), 1);
        assert_eq!(out.status, OrderStatus::New);
        assert_eq!(out.resting_quantity, Quantity(10));
        let (ev, out) = new(&mut x, order(2, "b", "buy", Some("100.00"), 4, "gtc"));
        assert_eq!(ev.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(ev[1].kind.name(), "trade");
        assert_eq!(out.status, OrderStatus::Filled);
        assert_eq!(out.fills[0].trade_seq, 3);
        let (ev, out) = new(&mut x, order(3, "c", "buy", None, 10, "ioc"));
        assert_eq!(ev.len(), 3, "accepted, trade of the 6 left, expired 4");
        assert_eq!(out.status, OrderStatus::Expired);
        assert_eq!(out.filled_quantity, Quantity(6));
        assert_eq!(out.expire_reason, Some(ExpireReason::NoLiquidity));
        assert_eq!(x.last_seq(), 6);
    }

    #[test]
    fn retries_replay_and_conflicts_change_nothing() {
        let mut x = Exchange::new(&Catalog::lab());
        let o = order(1, "a", "sell", Some("100.00"), 10, "gtc");
        let (_, first) = new(&mut x, o.clone());
        assert_eq!(
            x.apply(&Command::NewOrder(o.clone())),
            Applied::Replay(first.clone())
        );
        // Same client id and content under a new order id (a gateway that lost its cache).
        let mut again = o.clone();
        again.order_id = OrderId(99);
        assert_eq!(x.apply(&Command::NewOrder(again)), Applied::Replay(first));
        let mut other = o.clone();
        other.quantity = Quantity(11);
        assert!(matches!(
            x.apply(&Command::NewOrder(other.clone())),
            Applied::Conflict {
                field: "order_id",
                ..
            }
        ));
        other.order_id = OrderId(100);
        assert!(matches!(
            x.apply(&Command::NewOrder(other)),
            Applied::Conflict {
                field: "client_order_id",
                ..
            }
        ));
        assert_eq!(x.last_seq(), 1);
    }

    #[test]
    fn cancels() {
        let mut x = Exchange::new(&Catalog::lab());
        new(&mut x, order(1, "a", "sell", Some("100.00"), 10, "gtc"));
        new(&mut x, order(2, "b", "buy", Some("100.00"), 3, "gtc"));
        let c = |id| {
            Command::Cancel(CancelOrder {
                order_id: OrderId(id),
            })
        };
        let Applied::New { events, outcome } = x.apply(&c(1)) else {
            panic!()
        };
        assert_eq!(outcome.status, OrderStatus::Cancelled);
        assert_eq!(outcome.filled_quantity, Quantity(3));
        assert!(matches!(
            events[0].kind,
            EventKind::Cancelled {
                quantity: Quantity(7),
                ..
            }
        ));
        let Applied::New { outcome, .. } = x.apply(&c(1)) else {
            panic!()
        };
        assert_eq!(outcome.reject_reason, Some(RejectReason::OrderNotOpen));
        let Applied::New { outcome, .. } = x.apply(&c(2)) else {
            panic!()
        };
        assert_eq!(
            outcome.reject_reason,
            Some(RejectReason::OrderNotOpen),
            "filled"
        );
        let Applied::New { outcome, .. } = x.apply(&c(77)) else {
            panic!()
        };
        assert_eq!(outcome.reject_reason, Some(RejectReason::UnknownOrder));
    }

    #[test]
    fn the_engine_rejects_what_the_gateway_should_have() {
        let mut x = Exchange::new(&Catalog::lab());
        let mut o = order(1, "a", "sell", Some("100.00"), 10, "gtc");
        o.quantity = Quantity(0);
        let (ev, out) = new(&mut x, o);
        assert_eq!(out.reject_reason, Some(RejectReason::Invalid));
        assert_eq!(ev[0].kind.name(), "rejected");
    }
}
