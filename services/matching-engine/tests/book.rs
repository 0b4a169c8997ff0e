//! Tests of the order book ([`matching_engine::book`]) at its boundary: commands in, events and
//! book state out. One test binary, three parts:
//!
//! * [`scenarios`]: hand-written tables, one per order type or rule, each step a command with
//!   the exact events it must produce and each case ending with the whole book drawn as a
//!   price ladder. Every table runs against the real book **and** against the reference book,
//!   so the reference is itself checked against hand-written expectations.
//! * [`reference`]: a deliberately naive order book written straight from the semantics in the
//!   module doc of `book.rs` (a `Vec` of resting orders, scanned for the best one every time).
//! * [`properties`]: proptest runs random command sequences through both books and compares
//!   every event, plus invariants that hold whatever the expected events are (never crossed,
//!   quantity conservation, FIFO within a level, determinism of events and hash).
//!
//! The checks shared by both kinds of test (depth and best prices agree with the resting
//! orders, and so on) live here.

#[path = "book/properties.rs"]
mod properties;
#[path = "book/reference.rs"]
mod reference;
#[path = "book/scenarios.rs"]
mod scenarios;

use domain::{OrderId, Side};
use matching_engine::book::{BookEvent, DepthLevel, OrderBook, RestingOrder};
use matching_engine::workload::{BookCommand, apply};

/// Something that takes book commands: the real [`OrderBook`] or the reference book.
pub trait Book {
    /// Applies one command and returns the events it produced, in order.
    fn execute(&mut self, cmd: BookCommand) -> Vec<BookEvent>;
    /// Every resting order: bids best first, then asks best first, FIFO within a level.
    fn resting(&self) -> Vec<RestingOrder>;
    /// Everything observable about what rests, to compare before and after a command.
    fn fingerprint(&self) -> String {
        format!("{:?}", self.resting())
    }
    /// Consistency checks of the book's own views.
    fn check(&self) -> Result<(), String> {
        Ok(())
    }
}

impl Book for OrderBook {
    fn execute(&mut self, cmd: BookCommand) -> Vec<BookEvent> {
        let mut out = Vec::new();
        apply(self, cmd, &mut out);
        out
    }

    fn resting(&self) -> Vec<RestingOrder> {
        self.resting_orders()
    }

    fn fingerprint(&self) -> String {
        format!("{:?} {}", self.resting_orders(), self.hash())
    }

    fn check(&self) -> Result<(), String> {
        check_views(self)
    }
}

/// Whether an event changes what rests in the book.
pub fn changes_book(e: &BookEvent) -> bool {
    matches!(
        e,
        BookEvent::Trade { .. } | BookEvent::Rested { .. } | BookEvent::Cancelled { .. }
    )
}

/// Checks that the real book's views agree with each other: [`OrderBook::depth`] is exactly the
/// per-level aggregation of [`OrderBook::resting_orders`], `best_bid`/`best_ask` are the first
/// levels, `len`, `is_empty` and `resting_quantity` match, levels are strictly ordered best
/// first, and no order rests with zero quantity.
pub fn check_views(book: &OrderBook) -> Result<(), String> {
    let resting = book.resting_orders();
    for o in &resting {
        if o.quantity == 0 {
            return Err(format!("order #{} rests with zero quantity", o.id));
        }
        if book.resting_quantity(o.id) != Some(o.quantity) {
            return Err(format!(
                "resting_quantity(#{}) = {:?}, resting_orders() says {}",
                o.id,
                book.resting_quantity(o.id),
                o.quantity
            ));
        }
    }
    if book.len() != resting.len() || book.is_empty() != resting.is_empty() {
        return Err(format!(
            "len() = {}, is_empty() = {}, but {} orders rest",
            book.len(),
            book.is_empty(),
            resting.len()
        ));
    }
    let mut ids: Vec<OrderId> = resting.iter().map(|o| o.id).collect();
    ids.sort_unstable();
    ids.dedup();
    if ids.len() != resting.len() {
        return Err("an order id rests twice".to_owned());
    }
    for side in [Side::Buy, Side::Sell] {
        let want = aggregate(&resting, side);
        let got = book.depth(side, usize::MAX);
        if got != want {
            return Err(format!(
                "depth({side:?}) = {got:?}, resting orders aggregate to {want:?}"
            ));
        }
        for n in [0, 1, 2] {
            let top = book.depth(side, n);
            if top.as_slice() != &want[..n.min(want.len())] {
                return Err(format!(
                    "depth({side:?}, {n}) = {top:?}, want a prefix of {want:?}"
                ));
            }
        }
        let better = |a: &DepthLevel, b: &DepthLevel| match side {
            Side::Buy => a.price > b.price,
            Side::Sell => a.price < b.price,
        };
        if !want.windows(2).all(|w| better(&w[0], &w[1])) {
            return Err(format!(
                "{side:?} levels are not strictly best first: {want:?}"
            ));
        }
        let best = match side {
            Side::Buy => book.best_bid(),
            Side::Sell => book.best_ask(),
        };
        if best != want.first().map(|l| l.price) {
            return Err(format!(
                "best price of {side:?} is {best:?}, top level is {:?}",
                want.first()
            ));
        }
    }
    if let (Some(bid), Some(ask)) = (book.best_bid(), book.best_ask())
        && bid >= ask
    {
        return Err(format!(
            "book is crossed: best bid {bid:?} >= best ask {ask:?}"
        ));
    }
    Ok(())
}

/// Groups one side of `resting` (already in priority order) into depth levels.
fn aggregate(resting: &[RestingOrder], side: Side) -> Vec<DepthLevel> {
    let mut levels: Vec<DepthLevel> = Vec::new();
    for o in resting.iter().filter(|o| o.side == side) {
        match levels.last_mut() {
            Some(l) if l.price == o.price => {
                l.quantity += o.quantity;
                l.orders += 1;
            }
            _ => levels.push(DepthLevel {
                price: o.price,
                quantity: o.quantity,
                orders: 1,
            }),
        }
    }
    levels
}
