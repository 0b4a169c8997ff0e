//! Table-driven scenarios: each step is a command and the exact events it must produce; each
//! case ends with the whole book drawn as a ladder. Written in a small text notation so a table
//! reads like a trading blotter.
//!
//! Commands:
//! * `buy #7 10 @101` — limit buy, id 7, 10 shares at 101 ticks, GTC;
//! * `sell #8 5 mkt` — market sell (IOC unless a time in force follows); `mkt@97` gives the
//!   market order a price, which the book must ignore;
//! * optional `gtc` | `ioc` | `fok`, and `acct=a` (accounts `a`, `b`, `c`; none means
//!   `AccountKey::NONE`);
//! * `cancel #7`.
//!
//! Events: `trade m#1 t#2 4@101` (maker 1, taker 2, 4 shares at 101), `rest #2 6`,
//! `expire #2 6 ioc|fok|no-liquidity|self-trade`, `cancel #1 6`, `cancel-rejected #9`,
//! `duplicate #1`.
//!
//! Ladder lines: `S 102: #3:2 #5:1/a` is an ask level at 102 holding order 3 (2 shares) then
//! order 5 (1 share, account `a`), FIFO. Asks come first from the worst price down to the best,
//! then bids from the best down, as on a trading screen.
//!
//! Besides the events and the ladder, the runner checks after every step that the real book's
//! views agree ([`crate::check_views`]) and that a command which neither traded, rested nor
//! cancelled (FOK kills, rejections, expiries) left the resting orders and
//! [`OrderBook::hash`] exactly as they were.

use crate::reference::ReferenceBook;
use crate::{Book, changes_book, check_views};
use domain::{AccountKey, ExpireReason, OrderId, OrderType, Price, Side, TimeInForce};
use matching_engine::book::{BookEvent, BookOrder, DepthLevel, OrderBook, RestingOrder};
use matching_engine::workload::BookCommand;

/// A market order is given a limit price that would never cross (0 for a buy, a huge price
/// for a sell), so a book that wrongly read the price of a market order fails the tables.
const NEVER_CROSSING_BUY: Price = Price(0);
const NEVER_CROSSING_SELL: Price = Price(1_000_000_000);

/// The accounts of the notation; `AccountKey::NONE` has no name.
const ACCOUNTS: [(&str, AccountKey); 3] = [
    ("a", AccountKey(1)),
    ("b", AccountKey(2)),
    ("c", AccountKey(3)),
];

fn account_key(name: &str) -> AccountKey {
    ACCOUNTS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, key)| *key)
        .unwrap_or_else(|| panic!("unknown account {name:?}: use a, b or c"))
}

/// The account's name in the notation; `None` for `AccountKey::NONE`.
fn account_name(key: AccountKey) -> Option<&'static str> {
    if key == AccountKey::NONE {
        return None;
    }
    let name = ACCOUNTS.iter().find(|(_, k)| *k == key).map(|(n, _)| *n);
    Some(name.unwrap_or_else(|| panic!("account key {} has no name", key.0)))
}

fn parse_id(word: Option<&str>, line: &str) -> OrderId {
    word.and_then(|w| w.strip_prefix('#'))
        .and_then(|n| n.parse().ok())
        .map(OrderId)
        .unwrap_or_else(|| panic!("expected `#<id>` in {line:?}"))
}

/// Parses one command of the notation above; panics (naming the line) on anything else.
pub fn parse_command(line: &str) -> BookCommand {
    let mut words = line.split_whitespace();
    let verb = words.next().unwrap_or_default();
    let id = parse_id(words.next(), line);
    let side = match verb {
        "cancel" => {
            assert!(words.next().is_none(), "trailing words in {line:?}");
            return BookCommand::Cancel(id);
        }
        "buy" => Side::Buy,
        "sell" => Side::Sell,
        _ => panic!("unknown verb in {line:?}"),
    };
    let quantity: u64 = words
        .next()
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("expected a quantity in {line:?}"));
    let (order_type, price, mut time_in_force) = match words.next() {
        Some("mkt") => {
            let never = match side {
                Side::Buy => NEVER_CROSSING_BUY,
                Side::Sell => NEVER_CROSSING_SELL,
            };
            (OrderType::Market, never, TimeInForce::Ioc)
        }
        Some(w) if w.starts_with("mkt@") => {
            let ticks = w["mkt@".len()..]
                .parse()
                .unwrap_or_else(|_| panic!("expected `mkt@<price>` in {line:?}"));
            (OrderType::Market, Price(ticks), TimeInForce::Ioc)
        }
        Some(w) => {
            let ticks = w
                .strip_prefix('@')
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("expected `@<price>` or `mkt` in {line:?}"));
            (OrderType::Limit, Price(ticks), TimeInForce::Gtc)
        }
        None => panic!("expected `@<price>` or `mkt` in {line:?}"),
    };
    let mut account = AccountKey::NONE;
    for w in words {
        match w {
            "gtc" => time_in_force = TimeInForce::Gtc,
            "ioc" => time_in_force = TimeInForce::Ioc,
            "fok" => time_in_force = TimeInForce::Fok,
            _ => {
                let name = w
                    .strip_prefix("acct=")
                    .unwrap_or_else(|| panic!("unknown word {w:?} in {line:?}"));
                account = account_key(name);
            }
        }
    }
    BookCommand::Submit(BookOrder {
        id,
        side,
        order_type,
        time_in_force,
        price,
        quantity,
        account,
    })
}

/// Writes a command in the notation [`parse_command`] reads (a market order keeps its ignored
/// price as `mkt@<price>`), so a failing random sequence can be pasted into a table.
pub fn render_command(cmd: &BookCommand) -> String {
    let o = match cmd {
        BookCommand::Cancel(id) => return format!("cancel #{id}"),
        BookCommand::Submit(o) => o,
    };
    let side = match o.side {
        Side::Buy => "buy",
        Side::Sell => "sell",
    };
    let price = match o.order_type {
        OrderType::Limit => format!("@{}", o.price.0),
        OrderType::Market => format!("mkt@{}", o.price.0),
    };
    let tif = match o.time_in_force {
        TimeInForce::Gtc => "gtc",
        TimeInForce::Ioc => "ioc",
        TimeInForce::Fok => "fok",
    };
    let account = account_name(o.account).map_or(String::new(), |a| format!(" acct={a}"));
    format!("{side} #{} {} {price} {tif}{account}", o.id, o.quantity)
}

pub fn render_event(e: &BookEvent) -> String {
    match *e {
        BookEvent::Trade {
            maker,
            taker,
            price,
            quantity,
        } => format!("trade m#{maker} t#{taker} {quantity}@{}", price.0),
        BookEvent::Rested { order, quantity } => format!("rest #{order} {quantity}"),
        BookEvent::Expired {
            order,
            quantity,
            reason,
        } => {
            let reason = match reason {
                ExpireReason::ImmediateOrCancel => "ioc",
                ExpireReason::FillOrKill => "fok",
                ExpireReason::NoLiquidity => "no-liquidity",
                ExpireReason::SelfTrade => "self-trade",
            };
            format!("expire #{order} {quantity} {reason}")
        }
        BookEvent::Cancelled { order, quantity } => format!("cancel #{order} {quantity}"),
        BookEvent::CancelRejected { order } => format!("cancel-rejected #{order}"),
        BookEvent::DuplicateRejected { order } => format!("duplicate #{order}"),
    }
}

/// Draws resting orders (in `resting_orders()` order) as ladder lines.
pub fn ladder(resting: &[RestingOrder]) -> Vec<String> {
    let mut levels: Vec<(Side, Price, Vec<String>)> = Vec::new();
    for o in resting {
        let account = account_name(o.account).map_or(String::new(), |a| format!("/{a}"));
        let order = format!("#{}:{}{account}", o.id, o.quantity);
        match levels.last_mut() {
            Some((side, price, orders)) if *side == o.side && *price == o.price => {
                orders.push(order);
            }
            _ => levels.push((o.side, o.price, vec![order])),
        }
    }
    let line = |(side, price, orders): &(Side, Price, Vec<String>)| {
        let s = match side {
            Side::Buy => "B",
            Side::Sell => "S",
        };
        format!("{s} {}: {}", price.0, orders.join(" "))
    };
    let asks = levels.iter().filter(|l| l.0 == Side::Sell).rev().map(line);
    let bids = levels.iter().filter(|l| l.0 == Side::Buy).map(line);
    asks.chain(bids).collect()
}

/// One scenario.
struct Case {
    name: &'static str,
    /// Commands in order, each with every event it must produce, in order.
    steps: &'static [(&'static str, &'static [&'static str])],
    /// The book afterwards, as ladder lines.
    book: &'static [&'static str],
}

/// Runs `case` on `book`, checking after every step the events, [`Book::check`], and that a
/// command without a trade, rest or cancel left [`Book::fingerprint`] alone; then the ladder.
fn run_case(case: &Case, book: &mut impl Book) -> Result<(), String> {
    for (i, (cmd, want)) in case.steps.iter().enumerate() {
        let before = book.fingerprint();
        let events = book.execute(parse_command(cmd));
        let got: Vec<String> = events.iter().map(render_event).collect();
        if got != *want {
            return Err(format!(
                "step {i} `{cmd}`:\n    got  {got:?}\n    want {want:?}"
            ));
        }
        book.check().map_err(|e| format!("step {i} `{cmd}`: {e}"))?;
        if !events.iter().any(changes_book) && book.fingerprint() != before {
            return Err(format!(
                "step {i} `{cmd}` neither traded, rested nor cancelled, yet changed the book"
            ));
        }
    }
    let got = ladder(&book.resting());
    if got != case.book {
        return Err(format!(
            "final book:\n    got  {got:?}\n    want {:?}",
            case.book
        ));
    }
    Ok(())
}

/// Runs every case on the real book and on the reference book, and fails with every mismatch.
fn run(cases: &[Case]) {
    let mut failures = Vec::new();
    for case in cases {
        if let Err(e) = run_case(case, &mut OrderBook::new()) {
            failures.push(format!("[book] {}: {e}", case.name));
        }
        if let Err(e) = run_case(case, &mut ReferenceBook::new()) {
            failures.push(format!("[reference] {}: {e}", case.name));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn limit_orders() {
    run(&[
        Case {
            name: "a limit buy rests on an empty book",
            steps: &[("buy #1 10 @100", &["rest #1 10"])],
            book: &["B 100: #1:10"],
        },
        Case {
            name: "orders that do not cross rest on both sides",
            steps: &[
                ("sell #1 10 @101", &["rest #1 10"]),
                ("buy #2 5 @100", &["rest #2 5"]),
                ("sell #3 7 @102", &["rest #3 7"]),
                ("buy #4 1 @99", &["rest #4 1"]),
            ],
            book: &["S 102: #3:7", "S 101: #1:10", "B 100: #2:5", "B 99: #4:1"],
        },
        Case {
            name: "a crossing limit buy fills at the maker's (lower) price",
            steps: &[
                ("sell #1 10 @101", &["rest #1 10"]),
                ("buy #2 4 @103", &["trade m#1 t#2 4@101"]),
            ],
            book: &["S 101: #1:6"],
        },
        Case {
            name: "a crossing limit sell fills at the maker's (higher) price",
            steps: &[
                ("buy #1 10 @101", &["rest #1 10"]),
                ("sell #2 10 @99", &["trade m#1 t#2 10@101"]),
            ],
            book: &[],
        },
        Case {
            name: "a limit exactly at the best opposite price crosses",
            steps: &[
                ("buy #1 3 @100", &["rest #1 3"]),
                ("sell #2 3 @100", &["trade m#1 t#2 3@100"]),
            ],
            book: &[],
        },
        Case {
            name: "a limit one tick away does not cross",
            steps: &[
                ("buy #1 3 @100", &["rest #1 3"]),
                ("sell #2 3 @101", &["rest #2 3"]),
            ],
            book: &["S 101: #2:3", "B 100: #1:3"],
        },
        Case {
            name: "the remainder of a crossing GTC rests at its own limit",
            steps: &[
                ("sell #1 5 @101", &["rest #1 5"]),
                ("buy #2 8 @102", &["trade m#1 t#2 5@101", "rest #2 3"]),
            ],
            book: &["B 102: #2:3"],
        },
        Case {
            name: "partial fills across levels and orders, FIFO within a level",
            steps: &[
                ("sell #1 3 @101", &["rest #1 3"]),
                ("sell #2 4 @101", &["rest #2 4"]),
                ("sell #3 5 @102", &["rest #3 5"]),
                ("sell #4 2 @101", &["rest #4 2"]),
                ("sell #5 6 @103", &["rest #5 6"]),
                (
                    "buy #6 12 @102",
                    &[
                        "trade m#1 t#6 3@101",
                        "trade m#2 t#6 4@101",
                        "trade m#4 t#6 2@101",
                        "trade m#3 t#6 3@102",
                    ],
                ),
            ],
            book: &["S 103: #5:6", "S 102: #3:2"],
        },
        Case {
            name: "a partly filled maker keeps its place at the head of its level",
            steps: &[
                ("buy #1 5 @100", &["rest #1 5"]),
                ("buy #2 5 @100", &["rest #2 5"]),
                ("sell #3 2 @100", &["trade m#1 t#3 2@100"]),
                ("buy #4 5 @100", &["rest #4 5"]),
                (
                    "sell #5 4 @100",
                    &["trade m#1 t#5 3@100", "trade m#2 t#5 1@100"],
                ),
            ],
            book: &["B 100: #2:4 #4:5"],
        },
        Case {
            name: "price priority beats time priority (asks)",
            steps: &[
                ("sell #1 5 @102", &["rest #1 5"]),
                ("sell #2 5 @101", &["rest #2 5"]),
                ("buy #3 5 @102", &["trade m#2 t#3 5@101"]),
            ],
            book: &["S 102: #1:5"],
        },
        Case {
            name: "price priority beats time priority (bids)",
            steps: &[
                ("buy #1 5 @99", &["rest #1 5"]),
                ("buy #2 5 @100", &["rest #2 5"]),
                ("buy #3 5 @100", &["rest #3 5"]),
                (
                    "sell #4 7 @99",
                    &["trade m#2 t#4 5@100", "trade m#3 t#4 2@100"],
                ),
            ],
            book: &["B 100: #3:3", "B 99: #1:5"],
        },
        Case {
            name: "a new best level inserted between existing ones is traded first",
            steps: &[
                ("sell #1 1 @105", &["rest #1 1"]),
                ("sell #2 1 @101", &["rest #2 1"]),
                ("sell #3 1 @103", &["rest #3 1"]),
                ("sell #4 1 @102", &["rest #4 1"]),
                (
                    "buy #5 3 @110",
                    &[
                        "trade m#2 t#5 1@101",
                        "trade m#4 t#5 1@102",
                        "trade m#3 t#5 1@103",
                    ],
                ),
            ],
            book: &["S 105: #1:1"],
        },
        Case {
            name: "a sweep that empties the other side rests its remainder",
            steps: &[
                ("buy #1 2 @100", &["rest #1 2"]),
                ("buy #2 2 @99", &["rest #2 2"]),
                (
                    "sell #3 6 @98",
                    &["trade m#1 t#3 2@100", "trade m#2 t#3 2@99", "rest #3 2"],
                ),
            ],
            book: &["S 98: #3:2"],
        },
    ]);
}

#[test]
fn ioc_and_market_orders() {
    run(&[
        Case {
            name: "IOC fills what crosses, then expires the rest",
            steps: &[
                ("sell #1 3 @101", &["rest #1 3"]),
                ("sell #2 3 @102", &["rest #2 3"]),
                (
                    "buy #3 10 @101 ioc",
                    &["trade m#1 t#3 3@101", "expire #3 7 ioc"],
                ),
            ],
            book: &["S 102: #2:3"],
        },
        Case {
            name: "IOC that fills completely emits no expiry",
            steps: &[
                ("buy #1 5 @100", &["rest #1 5"]),
                ("sell #2 5 @100 ioc", &["trade m#1 t#2 5@100"]),
            ],
            book: &[],
        },
        Case {
            name: "IOC that crosses nothing expires whole and never rests",
            steps: &[
                ("sell #1 5 @101", &["rest #1 5"]),
                ("buy #2 5 @100 ioc", &["expire #2 5 ioc"]),
                ("sell #3 4 @99 ioc", &["expire #3 4 ioc"]),
            ],
            book: &["S 101: #1:5"],
        },
        Case {
            name: "market buy sweeps every level, then expires the rest for no liquidity",
            steps: &[
                ("sell #1 3 @101", &["rest #1 3"]),
                ("sell #2 4 @105", &["rest #2 4"]),
                ("buy #9 1 @90", &["rest #9 1"]),
                (
                    "buy #3 10 mkt",
                    &[
                        "trade m#1 t#3 3@101",
                        "trade m#2 t#3 4@105",
                        "expire #3 3 no-liquidity",
                    ],
                ),
            ],
            book: &["B 90: #9:1"],
        },
        Case {
            name: "market sell sweeps bids best first and fills completely",
            steps: &[
                ("buy #1 3 @100", &["rest #1 3"]),
                ("buy #2 4 @98", &["rest #2 4"]),
                ("buy #3 4 @100", &["rest #3 4"]),
                (
                    "sell #4 9 mkt",
                    &[
                        "trade m#1 t#4 3@100",
                        "trade m#3 t#4 4@100",
                        "trade m#2 t#4 2@98",
                    ],
                ),
            ],
            book: &["B 98: #2:2"],
        },
        Case {
            name: "market order on an empty side expires whole, nothing else happens",
            steps: &[
                ("buy #1 10 @100", &["rest #1 10"]),
                ("buy #2 5 mkt", &["expire #2 5 no-liquidity"]),
                ("sell #3 7 @101", &["rest #3 7"]),
                ("sell #4 3 mkt", &["trade m#1 t#4 3@100"]),
            ],
            book: &["S 101: #3:7", "B 100: #1:7"],
        },
        Case {
            name: "market order on an empty book",
            steps: &[
                ("sell #1 5 mkt", &["expire #1 5 no-liquidity"]),
                ("buy #2 5 mkt fok", &["expire #2 5 fok"]),
            ],
            book: &[],
        },
        Case {
            name: "market FOK fills when the whole side is just enough",
            steps: &[
                ("sell #1 3 @101", &["rest #1 3"]),
                ("sell #2 4 @150", &["rest #2 4"]),
                ("buy #3 8 mkt fok", &["expire #3 8 fok"]),
                (
                    "buy #4 7 mkt fok",
                    &["trade m#1 t#4 3@101", "trade m#2 t#4 4@150"],
                ),
            ],
            book: &[],
        },
    ]);
}

#[test]
fn fill_or_kill() {
    run(&[
        Case {
            name: "FOK that just fits (exact quantity over two levels) fills fully",
            steps: &[
                ("sell #1 4 @101", &["rest #1 4"]),
                ("sell #2 6 @102", &["rest #2 6"]),
                (
                    "buy #3 10 @102 fok",
                    &["trade m#1 t#3 4@101", "trade m#2 t#3 6@102"],
                ),
            ],
            book: &[],
        },
        Case {
            name: "FOK one share short expires whole and changes nothing",
            steps: &[
                ("sell #1 4 @101", &["rest #1 4"]),
                ("sell #2 6 @102", &["rest #2 6"]),
                ("buy #3 11 @102 fok", &["expire #3 11 fok"]),
            ],
            book: &["S 102: #2:6", "S 101: #1:4"],
        },
        Case {
            name: "FOK limited by its price: liquidity beyond the limit does not count",
            steps: &[
                ("sell #1 4 @101", &["rest #1 4"]),
                ("sell #2 6 @103", &["rest #2 6"]),
                ("buy #3 10 @102 fok", &["expire #3 10 fok"]),
                ("buy #4 4 @102 fok", &["trade m#1 t#4 4@101"]),
            ],
            book: &["S 103: #2:6"],
        },
        Case {
            name: "sell FOK: just fits, then one short",
            steps: &[
                ("buy #1 2 @100", &["rest #1 2"]),
                ("buy #2 3 @100", &["rest #2 3"]),
                ("buy #3 5 @99", &["rest #3 5"]),
                ("sell #4 6 @100 fok", &["expire #4 6 fok"]),
                (
                    "sell #5 6 @99 fok",
                    &[
                        "trade m#1 t#5 2@100",
                        "trade m#2 t#5 3@100",
                        "trade m#3 t#5 1@99",
                    ],
                ),
                ("sell #6 5 @99 fok", &["expire #6 5 fok"]),
            ],
            book: &["B 99: #3:4"],
        },
        Case {
            name: "FOK smaller than the first maker partly fills it",
            steps: &[
                ("sell #1 10 @101", &["rest #1 10"]),
                ("buy #2 3 @101 fok", &["trade m#1 t#2 3@101"]),
            ],
            book: &["S 101: #1:7"],
        },
        Case {
            name: "FOK on an empty side expires whole",
            steps: &[
                ("buy #1 10 @100", &["rest #1 10"]),
                ("buy #2 1 @200 fok", &["expire #2 1 fok"]),
            ],
            book: &["B 100: #1:10"],
        },
    ]);
}

#[test]
fn cancels_and_duplicates() {
    run(&[
        Case {
            name: "cancel a resting order",
            steps: &[
                ("buy #1 10 @100", &["rest #1 10"]),
                ("cancel #1", &["cancel #1 10"]),
            ],
            book: &[],
        },
        Case {
            name: "cancel in the middle of a level keeps FIFO of the others",
            steps: &[
                ("buy #1 1 @100", &["rest #1 1"]),
                ("buy #2 2 @100", &["rest #2 2"]),
                ("buy #3 3 @100", &["rest #3 3"]),
                ("buy #4 4 @100", &["rest #4 4"]),
                ("cancel #2", &["cancel #2 2"]),
                ("cancel #4", &["cancel #4 4"]),
                ("buy #5 5 @100", &["rest #5 5"]),
                (
                    "sell #6 5 @100",
                    &[
                        "trade m#1 t#6 1@100",
                        "trade m#3 t#6 3@100",
                        "trade m#5 t#6 1@100",
                    ],
                ),
            ],
            book: &["B 100: #5:4"],
        },
        Case {
            name: "cancelling the only order of the best level uncovers the next",
            steps: &[
                ("sell #1 1 @101", &["rest #1 1"]),
                ("sell #2 2 @102", &["rest #2 2"]),
                ("cancel #1", &["cancel #1 1"]),
                ("buy #3 1 @102", &["trade m#2 t#3 1@102"]),
            ],
            book: &["S 102: #2:1"],
        },
        Case {
            name: "cancel of a partly filled order cancels the remaining quantity only",
            steps: &[
                ("sell #1 10 @101", &["rest #1 10"]),
                ("buy #2 4 @101", &["trade m#1 t#2 4@101"]),
                ("cancel #1", &["cancel #1 6"]),
            ],
            book: &[],
        },
        Case {
            name: "cancel of a resting remainder of a taker cancels what rested",
            steps: &[
                ("sell #1 3 @101", &["rest #1 3"]),
                ("buy #2 5 @101", &["trade m#1 t#2 3@101", "rest #2 2"]),
                ("cancel #2", &["cancel #2 2"]),
            ],
            book: &[],
        },
        Case {
            name: "cancel of filled, expired, cancelled and unknown orders is rejected",
            steps: &[
                ("sell #1 5 @101", &["rest #1 5"]),
                ("buy #2 5 @101", &["trade m#1 t#2 5@101"]),
                ("cancel #1", &["cancel-rejected #1"]),
                ("cancel #2", &["cancel-rejected #2"]),
                ("buy #3 5 @100 ioc", &["expire #3 5 ioc"]),
                ("cancel #3", &["cancel-rejected #3"]),
                ("buy #4 5 @100", &["rest #4 5"]),
                ("cancel #4", &["cancel #4 5"]),
                ("cancel #4", &["cancel-rejected #4"]),
                ("cancel #99", &["cancel-rejected #99"]),
                ("buy #5 1 @99", &["rest #5 1"]),
                ("cancel #98", &["cancel-rejected #98"]),
            ],
            book: &["B 99: #5:1"],
        },
        Case {
            name: "an arriving order with the id of a resting order is rejected, even if it crosses",
            steps: &[
                ("buy #1 10 @100", &["rest #1 10"]),
                ("sell #1 5 @99", &["duplicate #1"]),
                ("buy #1 5 @100", &["duplicate #1"]),
                ("sell #2 5 @101", &["rest #2 5"]),
                ("buy #2 5 mkt fok", &["duplicate #2"]),
            ],
            book: &["S 101: #2:5", "B 100: #1:10"],
        },
        Case {
            name: "a duplicate of a partly filled order is still rejected",
            steps: &[
                ("buy #1 10 @100", &["rest #1 10"]),
                ("sell #2 4 @100", &["trade m#1 t#2 4@100"]),
                ("buy #1 1 @90", &["duplicate #1"]),
            ],
            book: &["B 100: #1:6"],
        },
        Case {
            // The book knows only resting orders; the engine owns id uniqueness over time.
            name: "an id no longer in the book is not a duplicate to the book",
            steps: &[
                ("buy #1 10 @100", &["rest #1 10"]),
                ("cancel #1", &["cancel #1 10"]),
                ("buy #1 3 @99", &["rest #1 3"]),
            ],
            book: &["B 99: #1:3"],
        },
    ]);
}

#[test]
fn self_trade_prevention() {
    run(&[
        Case {
            name: "aggressor meets its own account first: it expires, the maker is untouched",
            steps: &[
                ("sell #1 5 @101 acct=a", &["rest #1 5"]),
                ("buy #2 5 @101 acct=a", &["expire #2 5 self-trade"]),
            ],
            book: &["S 101: #1:5/a"],
        },
        Case {
            name: "fills before the self-trade point stand; orders behind it are not reached",
            steps: &[
                ("sell #1 3 @101 acct=b", &["rest #1 3"]),
                ("sell #2 4 @101 acct=a", &["rest #2 4"]),
                ("sell #3 5 @101 acct=b", &["rest #3 5"]),
                (
                    "buy #4 10 @102 acct=a",
                    &["trade m#1 t#4 3@101", "expire #4 7 self-trade"],
                ),
            ],
            book: &["S 101: #2:4/a #3:5/b"],
        },
        Case {
            name: "self-trade at a later level, after a full level was taken",
            steps: &[
                ("buy #1 3 @100 acct=b", &["rest #1 3"]),
                ("buy #2 4 @99 acct=a", &["rest #2 4"]),
                (
                    "sell #3 10 @98 acct=a",
                    &["trade m#1 t#3 3@100", "expire #3 7 self-trade"],
                ),
            ],
            book: &["B 99: #2:4/a"],
        },
        Case {
            name: "own order beyond the limit is not reached: no self-trade, remainder rests",
            steps: &[
                ("sell #1 3 @101 acct=b", &["rest #1 3"]),
                ("sell #2 4 @103 acct=a", &["rest #2 4"]),
                (
                    "buy #3 10 @102 acct=a",
                    &["trade m#1 t#3 3@101", "rest #3 7"],
                ),
            ],
            book: &["S 103: #2:4/a", "B 102: #3:7/a"],
        },
        Case {
            name: "own order exactly filled before is gone; a later own order stops",
            steps: &[
                ("sell #1 2 @101 acct=b", &["rest #1 2"]),
                ("sell #2 2 @101 acct=a", &["rest #2 2"]),
                ("buy #3 2 @101 acct=c", &["trade m#1 t#3 2@101"]),
                ("buy #4 1 @101 acct=c", &["trade m#2 t#4 1@101"]),
                ("buy #5 1 @101 acct=a", &["expire #5 1 self-trade"]),
            ],
            book: &["S 101: #2:1/a"],
        },
        Case {
            name: "self-trade beats the IOC and market expiry reasons",
            steps: &[
                ("buy #1 5 @100 acct=c", &["rest #1 5"]),
                ("sell #2 5 @100 ioc acct=c", &["expire #2 5 self-trade"]),
                ("sell #3 5 mkt acct=c", &["expire #3 5 self-trade"]),
            ],
            book: &["B 100: #1:5/c"],
        },
        Case {
            name: "AccountKey::NONE never self-trades, with NONE or with an account",
            steps: &[
                ("sell #1 5 @101", &["rest #1 5"]),
                ("buy #2 2 @101", &["trade m#1 t#2 2@101"]),
                ("sell #3 5 @101 acct=a", &["rest #3 5"]),
                (
                    "buy #4 5 @101",
                    &["trade m#1 t#4 3@101", "trade m#3 t#4 2@101"],
                ),
                ("buy #5 1 @100", &["rest #5 1"]),
                ("sell #6 1 @100 acct=a", &["trade m#5 t#6 1@100"]),
            ],
            book: &["S 101: #3:3/a"],
        },
        Case {
            name: "different accounts trade with each other",
            steps: &[
                ("sell #1 5 @101 acct=a", &["rest #1 5"]),
                ("buy #2 5 @101 acct=b", &["trade m#1 t#2 5@101"]),
            ],
            book: &[],
        },
        Case {
            name: "FOK that would run into its own account expires whole, book unchanged",
            steps: &[
                ("sell #1 3 @101 acct=b", &["rest #1 3"]),
                ("sell #2 4 @101 acct=a", &["rest #2 4"]),
                ("sell #3 5 @101 acct=b", &["rest #3 5"]),
                ("buy #4 4 @101 fok acct=a", &["expire #4 4 fok"]),
                ("buy #5 4 mkt fok acct=a", &["expire #5 4 fok"]),
                ("buy #6 3 @101 fok acct=a", &["trade m#1 t#6 3@101"]),
            ],
            book: &["S 101: #2:4/a #3:5/b"],
        },
        Case {
            name: "FOK whose own order sits behind enough liquidity fills",
            steps: &[
                ("buy #1 3 @100 acct=b", &["rest #1 3"]),
                ("buy #2 3 @99 acct=c", &["rest #2 3"]),
                ("buy #3 3 @99 acct=a", &["rest #3 3"]),
                (
                    "sell #4 6 @99 fok acct=a",
                    &["trade m#1 t#4 3@100", "trade m#2 t#4 3@99"],
                ),
            ],
            book: &["B 99: #3:3/a"],
        },
    ]);
}

#[test]
fn fok_kill_leaves_the_book_hash_unchanged() {
    let mut book = OrderBook::new();
    for cmd in ["sell #1 4 @101", "sell #2 6 @102 acct=b", "buy #3 2 @99"] {
        book.execute(parse_command(cmd));
    }
    let before = (book.hash(), book.resting_orders());
    let kills = [
        // One share more than the 10 offered at or below 102.
        ("buy #4 11 @102 fok", OrderId(4), 11),
        // Plenty offered, but only 4 within the limit.
        ("buy #5 5 @101 fok", OrderId(5), 5),
        // Market FOK one share more than the whole side.
        ("buy #6 11 mkt fok", OrderId(6), 11),
        // Account b's own order stops it after 4 shares.
        ("buy #7 5 @102 fok acct=b", OrderId(7), 5),
        ("sell #8 3 @99 fok", OrderId(8), 3),
    ];
    for (cmd, order, quantity) in kills {
        assert_eq!(
            book.execute(parse_command(cmd)),
            [BookEvent::Expired {
                order,
                quantity,
                reason: ExpireReason::FillOrKill
            }],
            "{cmd}"
        );
        assert_eq!((book.hash(), book.resting_orders()), before, "{cmd}");
    }
    // The same book lets the order that just fits through.
    let fits = book.execute(parse_command("buy #9 10 @102 fok"));
    assert_eq!(fits.len(), 2, "{fits:?}");
    assert_ne!(book.hash(), before.0);
}

#[test]
fn depth_and_best_prices_aggregate_levels() {
    let mut book = OrderBook::new();
    assert_eq!((book.best_bid(), book.best_ask()), (None, None));
    assert!(book.depth(Side::Buy, 10).is_empty() && book.is_empty());
    let empty_hash = book.hash();
    assert_eq!(empty_hash, OrderBook::new().hash());

    for cmd in [
        "sell #1 3 @101",
        "sell #2 4 @101",
        "sell #3 5 @103",
        "buy #4 2 @99",
        "buy #5 7 @100",
        "buy #6 1 @100",
        "buy #7 9 @97",
    ] {
        book.execute(parse_command(cmd));
    }
    let lvl = |price, quantity, orders| DepthLevel {
        price: Price(price),
        quantity,
        orders,
    };
    assert_eq!(book.depth(Side::Sell, 10), [lvl(101, 7, 2), lvl(103, 5, 1)]);
    assert_eq!(
        book.depth(Side::Buy, 10),
        [lvl(100, 8, 2), lvl(99, 2, 1), lvl(97, 9, 1)]
    );
    assert_eq!(book.depth(Side::Buy, 2), [lvl(100, 8, 2), lvl(99, 2, 1)]);
    assert_eq!(book.depth(Side::Buy, 0), []);
    assert_eq!(
        (book.best_bid(), book.best_ask()),
        (Some(Price(100)), Some(Price(101)))
    );
    assert_eq!(book.len(), 7);
    assert_ne!(book.hash(), empty_hash);

    // A partial fill takes quantity off the level but keeps the order count.
    book.execute(parse_command("buy #8 2 @101"));
    assert_eq!(book.depth(Side::Sell, 1), [lvl(101, 5, 2)]);
    assert_eq!(book.resting_quantity(OrderId(1)), Some(1));
    // A cancel takes the order and its quantity off.
    book.execute(parse_command("cancel #2"));
    assert_eq!(book.depth(Side::Sell, 1), [lvl(101, 1, 1)]);
    assert_eq!(book.resting_quantity(OrderId(2)), None);
    // The last order of the best level leaves: the next level becomes best.
    book.execute(parse_command("cancel #1"));
    assert_eq!(book.best_ask(), Some(Price(103)));
    assert_eq!(book.depth(Side::Sell, 10), [lvl(103, 5, 1)]);
    // A sell sweeping two bid levels.
    book.execute(parse_command("sell #9 10 @99"));
    assert_eq!(book.best_bid(), Some(Price(97)));
    assert_eq!(book.depth(Side::Buy, 10), [lvl(97, 9, 1)]);
    assert_eq!(book.depth(Side::Sell, 10), [lvl(103, 5, 1)]);
    assert_eq!(
        book.resting_quantity(OrderId(9)),
        None,
        "filled takers never rest"
    );
    check_views(&book).unwrap();
}

#[test]
fn hash_depends_only_on_resting_orders() {
    // Same resting orders reached by different histories (different slab slots and free
    // lists) hash the same; any difference in priority, quantity or account changes it.
    let build = |cmds: &[&str]| {
        let mut book = OrderBook::new();
        for cmd in cmds {
            book.execute(parse_command(cmd));
        }
        book
    };
    let direct = build(&["buy #1 5 @100", "buy #2 3 @100", "sell #3 4 @102 acct=a"]);
    let via_churn = build(&[
        "buy #9 1 @95",
        "sell #8 2 @110",
        "buy #1 5 @100",
        "cancel #9",
        "buy #2 3 @100",
        "sell #7 6 @101",
        "buy #6 6 @101",
        "cancel #8",
        "sell #3 4 @102 acct=a",
    ]);
    assert_eq!(direct.resting_orders(), via_churn.resting_orders());
    assert_eq!(direct.hash(), via_churn.hash());

    let swapped = build(&["buy #2 3 @100", "buy #1 5 @100", "sell #3 4 @102 acct=a"]);
    let other_qty = build(&["buy #1 5 @100", "buy #2 2 @100", "sell #3 4 @102 acct=a"]);
    let other_acct = build(&["buy #1 5 @100", "buy #2 3 @100", "sell #3 4 @102 acct=b"]);
    let other_price = build(&["buy #1 5 @100", "buy #2 3 @99", "sell #3 4 @102 acct=a"]);
    for (name, book) in [
        ("swapped priority", &swapped),
        ("other quantity", &other_qty),
        ("other account", &other_acct),
        ("other price", &other_price),
    ] {
        assert_ne!(book.hash(), direct.hash(), "{name}");
    }

    let empty = OrderBook::new().hash();
    let drained = build(&[
        "buy #1 5 @100",
        "sell #2 5 @100",
        "sell #3 1 @101",
        "cancel #3",
    ]);
    assert!(drained.is_empty());
    assert_eq!(drained.hash(), empty);
    assert_eq!(empty.len(), 64, "hex SHA-256");
    assert!(
        empty
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );
}
