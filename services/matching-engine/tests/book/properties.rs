//! Property tests: random command sequences through the real book and the reference book.
//!
//! The generator keeps prices in a band of nine ticks around a mid price so that orders cross
//! often and levels still fill up, uses three accounts plus `AccountKey::NONE` so that
//! self-trade prevention triggers, sizes some orders to exactly what they could fill (plus or
//! minus one share) so that FOK orders land on "just fits" and "one share short", gives market
//! orders a random price (which the book must ignore), and aims cancels and a few new orders
//! at ids that are resting, that have left the book, or that were never used.
//!
//! After every command: the events equal the reference's; the resting orders equal the
//! reference's; the book's views agree and it is not crossed ([`crate::check_views`]); every
//! order's quantity is accounted for (filled + resting + cancelled + expired = submitted);
//! orders of one price and side rest in arrival order; no event carries zero shares; the hash
//! moves exactly when the resting orders change. After the sequence: replaying it on a fresh
//! book gives the same events and hash, and rebuilding the book from its resting orders gives
//! the same hash.
//!
//! Cases default to proptest's 256 (each up to 200 commands); set `PROPTEST_CASES` to run more.

use crate::reference::ReferenceBook;
use crate::scenarios::{parse_command, render_command, render_event};
use crate::{Book, changes_book, check_views};
use domain::{AccountKey, OrderId, OrderType, Price, Side, TimeInForce};
use matching_engine::book::{BookEvent, BookOrder, OrderBook};
use matching_engine::workload::BookCommand;
use proptest::prelude::*;
use proptest::sample::Index;
use std::collections::HashMap;

/// A GTC order sits this many ticks from the mid price, on its passive side when positive:
/// buys at 96..=101 and sells at 99..=104. IOC and FOK orders sit 3 ticks more aggressively
/// (buys at 99..=104, sells at 96..=101), since they exist to trade.
const MID_PRICE: i64 = 100;
const PASSIVE_TICKS_MIN: i64 = -1;
const PASSIVE_TICKS_MAX: i64 = 4;
const AGGRESSIVE_SHIFT_TICKS: i64 = 3;
const QUANTITY_MAX: u64 = 12;
const COMMANDS_MAX: usize = 200;
/// Ids from here up are never issued, so cancels of them name unknown orders.
const UNKNOWN_ID_BASE: u64 = 1_000_000;

/// Which id a generated command uses; resolved against the state when the command runs.
#[derive(Debug, Clone, Copy)]
enum Pick {
    /// The next unused id.
    Fresh,
    /// One of the orders resting right now.
    Resting(Index),
    /// Any id used so far: resting, filled, cancelled, expired or rejected.
    Issued(Index),
    /// An id never used.
    Unknown(u64),
}

/// How many shares a generated order asks for.
#[derive(Debug, Clone, Copy)]
enum Quantity {
    Exactly(u64),
    /// What the order could fill right now (per the reference book), plus or minus one: aims
    /// FOK orders at "just fits" and "one share short", and GTC orders at "fills exactly".
    FillablePlus(i64),
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Submit {
        id: Pick,
        side: Side,
        order_type: OrderType,
        time_in_force: TimeInForce,
        price: i64,
        quantity: Quantity,
        account: u64,
    },
    Cancel(Pick),
}

fn op() -> impl Strategy<Value = Op> {
    let submit_id = prop_oneof![
        18 => Just(Pick::Fresh),
        1 => any::<Index>().prop_map(Pick::Resting),
        1 => any::<Index>().prop_map(Pick::Issued),
    ];
    let kind = prop_oneof![
        10 => Just((OrderType::Limit, TimeInForce::Gtc)),
        3 => Just((OrderType::Limit, TimeInForce::Ioc)),
        3 => Just((OrderType::Limit, TimeInForce::Fok)),
        2 => Just((OrderType::Market, TimeInForce::Ioc)),
        2 => Just((OrderType::Market, TimeInForce::Fok)),
    ];
    let side = prop_oneof![Just(Side::Buy), Just(Side::Sell)];
    let quantity = prop_oneof![
        3 => (1..=QUANTITY_MAX).prop_map(Quantity::Exactly),
        1 => (-1i64..=1).prop_map(Quantity::FillablePlus),
    ];
    let submit = (
        submit_id,
        side,
        kind,
        PASSIVE_TICKS_MIN..=PASSIVE_TICKS_MAX,
        quantity,
        0u64..=3,
    )
        .prop_map(
            |(id, side, (order_type, time_in_force), passive_ticks, quantity, account)| {
                let passive_ticks = match time_in_force {
                    TimeInForce::Gtc => passive_ticks,
                    TimeInForce::Ioc | TimeInForce::Fok => passive_ticks - AGGRESSIVE_SHIFT_TICKS,
                };
                Op::Submit {
                    id,
                    side,
                    order_type,
                    time_in_force,
                    price: match side {
                        Side::Buy => MID_PRICE - passive_ticks,
                        Side::Sell => MID_PRICE + passive_ticks,
                    },
                    quantity,
                    account,
                }
            },
        );
    let cancel_id = prop_oneof![
        6 => any::<Index>().prop_map(Pick::Resting),
        3 => any::<Index>().prop_map(Pick::Issued),
        1 => (0u64..4).prop_map(Pick::Unknown),
    ];
    prop_oneof![
        5 => submit,
        1 => cancel_id.prop_map(Op::Cancel),
    ]
}

/// Where each share of one order went, from the events.
#[derive(Debug, Clone, Copy, Default)]
struct Ledger {
    submitted: u64,
    filled: u64,
    cancelled: u64,
    expired: u64,
}

/// One random run: both books and what the test tracks alongside them.
struct Run {
    book: OrderBook,
    reference: ReferenceBook,
    next_id: u64,
    issued: Vec<OrderId>,
    /// Per order id, its latest accepted submission (an id may come back after it left).
    ledgers: HashMap<OrderId, Ledger>,
    /// Per order id, the step at which its latest accepted submission arrived.
    arrivals: HashMap<OrderId, usize>,
    commands: Vec<BookCommand>,
    events: Vec<Vec<BookEvent>>,
    hash: String,
}

impl Run {
    fn new() -> Run {
        let book = OrderBook::new();
        let hash = book.hash();
        Run {
            book,
            reference: ReferenceBook::new(),
            next_id: 1,
            issued: Vec::new(),
            ledgers: HashMap::new(),
            arrivals: HashMap::new(),
            commands: Vec::new(),
            events: Vec::new(),
            hash,
        }
    }

    /// The commands so far, in the scenario notation, for failure messages.
    fn history(&self) -> String {
        self.commands
            .iter()
            .map(|c| format!("\n    {}", render_command(c)))
            .collect()
    }

    fn resolve(&mut self, pick: Pick, for_submit: bool) -> OrderId {
        match pick {
            Pick::Resting(ix) => {
                let resting = self.reference.resting_ids();
                if !resting.is_empty() {
                    return *ix.get(&resting);
                }
            }
            Pick::Issued(ix) if !self.issued.is_empty() => return *ix.get(&self.issued),
            Pick::Unknown(n) if !for_submit => return OrderId(UNKNOWN_ID_BASE + n),
            _ => {}
        }
        if !for_submit {
            return OrderId(UNKNOWN_ID_BASE);
        }
        let id = OrderId(self.next_id);
        self.next_id += 1;
        assert!(
            id.0 < UNKNOWN_ID_BASE,
            "fresh ids stay below the unknown ones"
        );
        self.issued.push(id);
        id
    }

    fn command(&mut self, op: Op) -> BookCommand {
        match op {
            Op::Submit {
                id,
                side,
                order_type,
                time_in_force,
                price,
                quantity,
                account,
            } => {
                let mut order = BookOrder {
                    id: self.resolve(id, true),
                    side,
                    order_type,
                    time_in_force,
                    price: Price(price),
                    quantity: 1,
                    account: AccountKey(account),
                };
                order.quantity = match quantity {
                    Quantity::Exactly(q) => q,
                    Quantity::FillablePlus(delta) => {
                        let fillable = self.reference.fillable(&order);
                        fillable.saturating_add_signed(delta).max(1)
                    }
                };
                BookCommand::Submit(order)
            }
            Op::Cancel(pick) => BookCommand::Cancel(self.resolve(pick, false)),
        }
    }

    fn step(&mut self, op: Op) -> Result<(), TestCaseError> {
        let cmd = self.command(op);
        // Failure messages print commands in the table notation: make sure it reads back.
        prop_assert_eq!(parse_command(&render_command(&cmd)), cmd);
        self.commands.push(cmd);
        let step = self.commands.len() - 1;
        let got = self.book.execute(cmd);
        let want = self.reference.execute(cmd);
        let render = |events: &[BookEvent]| events.iter().map(render_event).collect::<Vec<_>>();
        prop_assert_eq!(
            render(&got),
            render(&want),
            "events of the last command differ; commands:{}",
            self.history()
        );
        prop_assert_eq!(
            self.book.resting_orders(),
            self.reference.resting(),
            "resting orders differ; commands:{}",
            self.history()
        );
        if let Err(e) = check_views(&self.book) {
            return Err(TestCaseError::fail(format!(
                "{e}; commands:{}",
                self.history()
            )));
        }

        self.account(cmd, &got, step)?;
        self.check_priority()?;

        let hash = self.book.hash();
        let changed = got.iter().any(changes_book);
        prop_assert_eq!(
            hash != self.hash,
            changed,
            "the hash must move exactly when the resting orders change; commands:{}",
            self.history()
        );
        self.hash = hash;
        self.events.push(got);
        Ok(())
    }

    /// Books the events of one command and checks that every order's shares add up.
    fn account(
        &mut self,
        cmd: BookCommand,
        events: &[BookEvent],
        step: usize,
    ) -> Result<(), TestCaseError> {
        prop_assert!(!events.is_empty(), "every command produces an event");
        if let BookCommand::Submit(o) = cmd
            && events != [BookEvent::DuplicateRejected { order: o.id }]
        {
            self.ledgers.insert(
                o.id,
                Ledger {
                    submitted: o.quantity,
                    ..Ledger::default()
                },
            );
            self.arrivals.insert(o.id, step);
        }
        for e in events {
            match *e {
                BookEvent::Trade {
                    maker,
                    taker,
                    quantity,
                    ..
                } => {
                    self.ledger(maker, quantity, e)?.filled += quantity;
                    self.ledger(taker, quantity, e)?.filled += quantity;
                }
                BookEvent::Expired {
                    order, quantity, ..
                } => self.ledger(order, quantity, e)?.expired += quantity,
                BookEvent::Cancelled { order, quantity } => {
                    self.ledger(order, quantity, e)?.cancelled += quantity;
                }
                // What rests is read from the book below.
                BookEvent::Rested { order, quantity } => {
                    self.ledger(order, quantity, e)?;
                }
                BookEvent::CancelRejected { .. } | BookEvent::DuplicateRejected { .. } => {}
            }
        }
        for (id, l) in &self.ledgers {
            let resting = self.book.resting_quantity(*id).unwrap_or(0);
            prop_assert_eq!(
                l.filled + resting + l.cancelled + l.expired,
                l.submitted,
                "shares of #{} do not add up ({:?}, resting {}); commands:{}",
                id,
                l,
                resting,
                self.history()
            );
        }
        Ok(())
    }

    /// The ledger of the accepted order an event with `quantity` shares names.
    fn ledger(
        &mut self,
        id: OrderId,
        quantity: u64,
        event: &BookEvent,
    ) -> Result<&mut Ledger, TestCaseError> {
        prop_assert!(quantity > 0, "zero-quantity event {:?}", event);
        match self.ledgers.get_mut(&id) {
            Some(ledger) => Ok(ledger),
            None => Err(TestCaseError::fail(format!(
                "{event:?} names #{id}, which was never accepted"
            ))),
        }
    }

    /// Within one side and price, resting orders are listed in arrival order.
    fn check_priority(&self) -> Result<(), TestCaseError> {
        for pair in self.book.resting_orders().windows(2) {
            let [a, b] = pair else { unreachable!() };
            if a.side == b.side && a.price == b.price {
                prop_assert!(
                    self.arrivals[&a.id] < self.arrivals[&b.id],
                    "#{} is ahead of #{} at {:?} but arrived later; commands:{}",
                    a.id,
                    b.id,
                    a.price,
                    self.history()
                );
            }
        }
        Ok(())
    }

    /// Determinism: a replay on a fresh book, and a rebuild from the resting orders alone.
    fn finish(&self) -> Result<(), TestCaseError> {
        let mut replay = OrderBook::new();
        for (i, cmd) in self.commands.iter().enumerate() {
            let events = replay.execute(*cmd);
            prop_assert_eq!(&events, &self.events[i], "replay differs at command {}", i);
        }
        prop_assert_eq!(replay.hash(), self.book.hash());

        // Resting orders never cross each other, so submitting them as GTC limits in arrival
        // order rebuilds the same book (in a different slab layout): the hash must agree.
        let mut resting = self.book.resting_orders();
        resting.sort_by_key(|o| self.arrivals[&o.id]);
        let mut rebuilt = OrderBook::new();
        for o in resting {
            let events = rebuilt.execute(BookCommand::Submit(BookOrder {
                id: o.id,
                side: o.side,
                order_type: OrderType::Limit,
                time_in_force: TimeInForce::Gtc,
                price: o.price,
                quantity: o.quantity,
                account: o.account,
            }));
            prop_assert_eq!(
                events,
                vec![BookEvent::Rested {
                    order: o.id,
                    quantity: o.quantity
                }]
            );
        }
        prop_assert_eq!(rebuilt.resting_orders(), self.book.resting_orders());
        prop_assert_eq!(rebuilt.hash(), self.book.hash());
        Ok(())
    }
}

proptest! {
    #[test]
    fn book_matches_reference_and_keeps_invariants(
        ops in prop::collection::vec(op(), 1..=COMMANDS_MAX)
    ) {
        let mut run = Run::new();
        for op in ops {
            run.step(op)?;
        }
        run.finish()?;
    }
}
