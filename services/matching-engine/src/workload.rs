//! A seeded, realistic command stream for one book, modelled on exchange-core's published
//! single-symbol benchmark (about a thousand resting orders over several hundred price levels;
//! mostly passive limit orders and cancels, a minority of marketable orders).
//!
//! The stream is generated against a real [`OrderBook`] so that every cancel names an order
//! that is resting at that point and marketable orders find liquidity; replaying the stream on
//! a fresh book reproduces the same states exactly (the book is deterministic).

use crate::book::{BookEvent, BookOrder, OrderBook};
use domain::{AccountKey, OrderId, OrderType, Price, Side, TimeInForce};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// One command of the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BookCommand {
    Submit(BookOrder),
    Cancel(OrderId),
}

/// Shape of the generated stream.
#[derive(Debug, Clone, Copy)]
pub struct WorkloadSpec {
    pub commands: usize,
    pub seed: u64,
    /// The generator steers towards this many resting orders.
    pub target_resting: usize,
    /// Passive orders rest up to this many ticks away from the mid price.
    pub price_spread_ticks: i64,
    /// Number of distinct accounts (self-trade prevention applies between equal accounts).
    pub accounts: u64,
}

impl Default for WorkloadSpec {
    fn default() -> Self {
        WorkloadSpec {
            commands: 1_000_000,
            seed: 1,
            target_resting: 1_000,
            price_spread_ticks: 400,
            accounts: 1_000,
        }
    }
}

/// Counts of each kind of command in a stream, for the benchmark's report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct WorkloadMix {
    pub passive_limit: u64,
    pub marketable_limit: u64,
    pub ioc: u64,
    pub fok: u64,
    pub market: u64,
    pub cancel: u64,
    /// Commands that produced at least one trade.
    pub trading_commands: u64,
}

/// Generates the command stream; also returns its mix and the resting-order and price-level
/// counts at the end.
pub fn generate(spec: &WorkloadSpec) -> (Vec<BookCommand>, WorkloadMix) {
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let mut book = OrderBook::new();
    let mut resting: Vec<OrderId> = Vec::with_capacity(spec.target_resting * 2);
    let mut out = Vec::with_capacity(spec.commands);
    let mut events = Vec::with_capacity(64);
    let mut mix = WorkloadMix::default();
    let mut mid: i64 = 100_000;
    let mut next_id: u64 = 1;

    // While the book holds less than half its target, every new order is passive, so the
    // stream starts by filling the book (as exchange-core's does) and then keeps it near size.
    while out.len() < spec.commands {
        events.clear();
        if rng.random_ratio(1, 50) {
            mid += if rng.random_bool(0.5) { 1 } else { -1 };
        }
        let fill = resting.len() as f64 / spec.target_resting as f64;
        let roll: f64 = rng.random();
        // Cancel probability rises as the book grows past its target.
        let cancel_p = (0.35 * fill * fill).min(0.8);
        let cmd = if !resting.is_empty() && roll < cancel_p {
            let i = rng.random_range(0..resting.len());
            let id = resting.swap_remove(i);
            mix.cancel += 1;
            BookCommand::Cancel(id)
        } else {
            let side = if rng.random_bool(0.5) {
                Side::Buy
            } else {
                Side::Sell
            };
            let sign = match side {
                Side::Buy => -1,
                Side::Sell => 1,
            };
            let account = AccountKey(rng.random_range(1..=spec.accounts));
            let id = OrderId(next_id);
            next_id += 1;
            let kind: f64 = rng.random();
            let (order_type, tif, price, qty) = if kind < 0.85 || fill < 0.5 {
                // Passive limit order on its own side of the mid.
                mix.passive_limit += 1;
                let off = rng.random_range(1..=spec.price_spread_ticks);
                (
                    OrderType::Limit,
                    TimeInForce::Gtc,
                    mid + sign * off,
                    rng.random_range(1..=100),
                )
            } else if kind < 0.91 {
                mix.ioc += 1;
                let through = rng.random_range(0..=8);
                (
                    OrderType::Limit,
                    TimeInForce::Ioc,
                    mid - sign * through,
                    rng.random_range(1..=150),
                )
            } else if kind < 0.95 {
                mix.marketable_limit += 1;
                let through = rng.random_range(0..=5);
                (
                    OrderType::Limit,
                    TimeInForce::Gtc,
                    mid - sign * through,
                    rng.random_range(1..=100),
                )
            } else if kind < 0.98 {
                mix.market += 1;
                (
                    OrderType::Market,
                    TimeInForce::Ioc,
                    0,
                    rng.random_range(1..=100),
                )
            } else {
                mix.fok += 1;
                let through = rng.random_range(0..=10);
                (
                    OrderType::Limit,
                    TimeInForce::Fok,
                    mid - sign * through,
                    rng.random_range(1..=200),
                )
            };
            BookCommand::Submit(BookOrder {
                id,
                side,
                order_type,
                time_in_force: tif,
                price: Price(price.max(1)),
                quantity: qty,
                account,
            })
        };
        apply(&mut book, cmd, &mut events);
        let mut traded = false;
        for e in &events {
            match *e {
                BookEvent::Rested { order, .. } => resting.push(order),
                BookEvent::Trade { maker, .. } => {
                    traded = true;
                    if book.resting_quantity(maker).is_none()
                        && let Some(i) = resting.iter().rposition(|&r| r == maker)
                    {
                        resting.swap_remove(i);
                    }
                }
                _ => {}
            }
        }
        mix.trading_commands += u64::from(traded);
        out.push(cmd);
    }
    (out, mix)
}

/// Applies one command to a book.
#[inline]
pub fn apply(book: &mut OrderBook, cmd: BookCommand, events: &mut Vec<BookEvent>) {
    match cmd {
        BookCommand::Submit(o) => book.submit(o, events),
        BookCommand::Cancel(id) => book.cancel(id, events),
    }
}
