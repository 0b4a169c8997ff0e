//! A deliberately naive reference order book, written from the semantics in the module doc of
//! `book.rs` and nothing else: a `Vec` of resting orders, each stamped with its arrival
//! sequence; "the best resting order" is found by sorting on (price priority, arrival) every
//! time it is needed. Slow and obviously right is the point; it shares no code with the book.
//!
//! Fill-or-kill is modelled the plainest way: match on a scratch copy of the book, and keep the
//! copy only if the order filled completely.

use crate::Book;
use domain::{AccountKey, ExpireReason, OrderId, OrderType, Price, Side, TimeInForce};
use matching_engine::book::{BookEvent, BookOrder, RestingOrder};
use matching_engine::workload::BookCommand;
use std::cmp::Reverse;

#[derive(Debug, Clone, Copy)]
struct Resting {
    id: OrderId,
    side: Side,
    price: Price,
    quantity: u64,
    account: AccountKey,
    /// Arrival sequence: earlier orders have priority within a price.
    arrival: u64,
}

#[derive(Debug, Default)]
pub struct ReferenceBook {
    orders: Vec<Resting>,
    arrivals: u64,
}

/// Sort key of priority on one side: better price first, then earlier arrival.
fn priority(o: &Resting) -> (Reverse<i64>, u64) {
    let price = match o.side {
        Side::Buy => o.price.0,
        Side::Sell => -o.price.0,
    };
    (Reverse(price), o.arrival)
}

impl ReferenceBook {
    pub fn new() -> ReferenceBook {
        ReferenceBook::default()
    }

    /// Ids of the resting orders, in `resting()` order.
    pub fn resting_ids(&self) -> Vec<OrderId> {
        self.resting().iter().map(|o| o.id).collect()
    }

    /// How many shares `order` could trade right now: what an IOC for every share would fill.
    pub fn fillable(&self, order: &BookOrder) -> u64 {
        let mut scratch = ReferenceBook {
            orders: self.orders.clone(),
            arrivals: self.arrivals,
        };
        let ioc = BookOrder {
            time_in_force: TimeInForce::Ioc,
            quantity: u64::MAX / 2,
            ..*order
        };
        scratch
            .submit(ioc)
            .iter()
            .map(|e| match e {
                BookEvent::Trade { quantity, .. } => *quantity,
                _ => 0,
            })
            .sum()
    }

    fn submit(&mut self, order: BookOrder) -> Vec<BookEvent> {
        if self.orders.iter().any(|o| o.id == order.id) {
            return vec![BookEvent::DuplicateRejected { order: order.id }];
        }
        let mut book = self.orders.clone();
        let mut events = Vec::new();
        let mut remaining = order.quantity;
        let mut self_trade = false;
        while remaining > 0 {
            book.sort_by_key(priority);
            let Some(i) = book.iter().position(|o| o.side != order.side) else {
                break;
            };
            let maker = &mut book[i];
            let crosses = match (order.order_type, order.side) {
                (OrderType::Market, _) => true,
                (OrderType::Limit, Side::Buy) => maker.price <= order.price,
                (OrderType::Limit, Side::Sell) => maker.price >= order.price,
            };
            if !crosses {
                break;
            }
            if order.account != AccountKey::NONE && maker.account == order.account {
                self_trade = true;
                break;
            }
            let quantity = remaining.min(maker.quantity);
            events.push(BookEvent::Trade {
                maker: maker.id,
                taker: order.id,
                price: maker.price,
                quantity,
            });
            remaining -= quantity;
            maker.quantity -= quantity;
            if maker.quantity == 0 {
                book.remove(i);
            }
        }
        if order.time_in_force == TimeInForce::Fok && remaining > 0 {
            // Throw the scratch copy away: nothing happened.
            return vec![BookEvent::Expired {
                order: order.id,
                quantity: order.quantity,
                reason: ExpireReason::FillOrKill,
            }];
        }
        self.orders = book;
        if remaining == 0 {
            return events;
        }
        let reason = if self_trade {
            Some(ExpireReason::SelfTrade)
        } else if order.order_type == OrderType::Market {
            Some(ExpireReason::NoLiquidity)
        } else if order.time_in_force == TimeInForce::Ioc {
            Some(ExpireReason::ImmediateOrCancel)
        } else {
            None
        };
        match reason {
            Some(reason) => events.push(BookEvent::Expired {
                order: order.id,
                quantity: remaining,
                reason,
            }),
            None => {
                self.arrivals += 1;
                self.orders.push(Resting {
                    id: order.id,
                    side: order.side,
                    price: order.price,
                    quantity: remaining,
                    account: order.account,
                    arrival: self.arrivals,
                });
                events.push(BookEvent::Rested {
                    order: order.id,
                    quantity: remaining,
                });
            }
        }
        events
    }

    fn cancel(&mut self, id: OrderId) -> Vec<BookEvent> {
        match self.orders.iter().position(|o| o.id == id) {
            Some(i) => {
                let o = self.orders.remove(i);
                vec![BookEvent::Cancelled {
                    order: id,
                    quantity: o.quantity,
                }]
            }
            None => vec![BookEvent::CancelRejected { order: id }],
        }
    }
}

impl Book for ReferenceBook {
    fn execute(&mut self, cmd: BookCommand) -> Vec<BookEvent> {
        match cmd {
            BookCommand::Submit(order) => self.submit(order),
            BookCommand::Cancel(id) => self.cancel(id),
        }
    }

    fn resting(&self) -> Vec<RestingOrder> {
        let mut sorted = self.orders.clone();
        // Bids before asks, each side best first.
        sorted.sort_by_key(|o| (o.side == Side::Sell, priority(o)));
        sorted
            .iter()
            .map(|o| RestingOrder {
                id: o.id,
                side: o.side,
                price: o.price,
                quantity: o.quantity,
                account: o.account,
            })
            .collect()
    }
}
