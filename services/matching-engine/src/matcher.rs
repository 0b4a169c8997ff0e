//! The matching thread: the only owner of the books. It takes requests from a bounded
//! channel, applies every command waiting (up to `group_commit_max`), journals and syncs them
//! with **one** `fdatasync` (group commit), and only then answers them. Nothing on this path
//! logs; it counts.
//!
//! If a journal write or sync fails the engine cannot know what is on disk, while its memory
//! already holds the batch: it exits (code 70) without answering, and the supervisor's restart
//! replays the journal, the one source of truth.

use crate::exchange::{Applied, Exchange};
use crate::journal::{self, Journal};
use domain::{Command, Side};
use serde::Serialize;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot, watch};

/// Exit code when the journal cannot be written (`EX_SOFTWARE`).
pub const EXIT_JOURNAL_FAILED: i32 = 70;

/// The durable end of the journal, for the outbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Durable {
    pub offset: u64,
    pub last_seq: u64,
}

/// One price level as `GET /v1/book` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct LevelView {
    /// Decimal price, as clients write it.
    pub price: String,
    pub quantity: u64,
    pub orders: u32,
}

/// `GET /v1/book/{symbol}`.
#[derive(Debug, Clone, Serialize)]
pub struct BookView {
    pub symbol: String,
    /// Last event sequence number applied when the view was taken.
    pub seq: u64,
    pub bids: Vec<LevelView>,
    pub asks: Vec<LevelView>,
}

/// One book's digest in `GET /v1/state`.
#[derive(Debug, Clone, Serialize)]
pub struct BookState {
    pub symbol: String,
    pub hash: String,
    pub resting_orders: usize,
    pub best_bid: Option<String>,
    pub best_ask: Option<String>,
}

/// `GET /v1/state`: what crash-recovery tests compare before and after a kill.
#[derive(Debug, Clone, Serialize)]
pub struct StateView {
    pub last_seq: u64,
    pub journal_bytes: u64,
    pub orders_known: usize,
    pub books: Vec<BookState>,
}

/// A request to the matching thread.
#[derive(Debug)]
pub enum Request {
    Command {
        command: Command,
        reply: oneshot::Sender<Applied>,
    },
    /// Several commands, applied in order and answered together.
    Commands {
        commands: Vec<Command>,
        reply: oneshot::Sender<Vec<Applied>>,
    },
    Book {
        symbol: String,
        depth: usize,
        reply: oneshot::Sender<Option<BookView>>,
    },
    State {
        reply: oneshot::Sender<StateView>,
    },
}

/// Why a request could not be handed to the matching thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Busy {
    #[error("the matching queue is full")]
    Full,
    #[error("the engine is shutting down")]
    Closed,
}

/// The handle request handlers use; cheap to clone.
#[derive(Debug, Clone)]
pub struct Matcher {
    tx: mpsc::Sender<Request>,
}

impl Matcher {
    /// Starts the matching thread over an exchange already replayed from `journal`.
    pub fn spawn(
        exchange: Exchange,
        journal: Journal,
        group_commit_max: usize,
        queue_max: usize,
        durable: watch::Sender<Durable>,
    ) -> std::io::Result<(Matcher, std::thread::JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel(queue_max);
        let handle = std::thread::Builder::new()
            .name("matcher".into())
            .spawn(move || run(exchange, journal, rx, group_commit_max, durable))?;
        Ok((Matcher { tx }, handle))
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Request) -> Result<T, Busy> {
        let (reply, rx) = oneshot::channel();
        self.tx.try_send(make(reply)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Busy::Full,
            mpsc::error::TrySendError::Closed(_) => Busy::Closed,
        })?;
        rx.await.map_err(|_| Busy::Closed)
    }

    /// Applies a command; answers once it is journaled.
    pub async fn command(&self, command: Command) -> Result<Applied, Busy> {
        self.ask(|reply| Request::Command { command, reply }).await
    }

    /// Applies several commands in the given order, as one request to the matching thread:
    /// one wake-up, one place in the queue, journaled with the commands around it in one
    /// `fdatasync`. All or nothing is enqueued: when the queue is full every command comes
    /// back `Busy` (the caller retries them, in order).
    pub async fn commands(&self, commands: Vec<Command>) -> Vec<Result<Applied, Busy>> {
        let n = commands.len();
        match self
            .ask(|reply| Request::Commands { commands, reply })
            .await
        {
            Ok(applied) => applied.into_iter().map(Ok).collect(),
            Err(b) => (0..n).map(|_| Err(b)).collect(),
        }
    }

    pub async fn book(&self, symbol: String, depth: usize) -> Result<Option<BookView>, Busy> {
        self.ask(|reply| Request::Book {
            symbol,
            depth,
            reply,
        })
        .await
    }

    pub async fn state(&self) -> Result<StateView, Busy> {
        self.ask(|reply| Request::State { reply }).await
    }
}

enum Pending {
    Applied(oneshot::Sender<Applied>, Applied),
    Batch(oneshot::Sender<Vec<Applied>>, Vec<Applied>),
    Book(oneshot::Sender<Option<BookView>>, Option<BookView>),
    State(oneshot::Sender<StateView>, StateView),
}

fn run(
    mut exchange: Exchange,
    mut journal: Journal,
    mut rx: mpsc::Receiver<Request>,
    group_commit_max: usize,
    durable: watch::Sender<Durable>,
) {
    let mut batch = Vec::with_capacity(group_commit_max);
    let mut pending = Vec::with_capacity(group_commit_max);
    let mut buf = Vec::with_capacity(1 << 20);
    publish_book_gauges(&exchange);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < group_commit_max {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let started = Instant::now();
        buf.clear();
        let mut commands = 0u64;
        for req in batch.drain(..) {
            match req {
                Request::Command { command, reply } => {
                    let applied = apply(&mut exchange, &command, &mut buf, &mut commands);
                    pending.push(Pending::Applied(reply, applied));
                }
                Request::Commands {
                    commands: list,
                    reply,
                } => {
                    let applied = list
                        .iter()
                        .map(|c| apply(&mut exchange, c, &mut buf, &mut commands))
                        .collect();
                    pending.push(Pending::Batch(reply, applied));
                }
                Request::Book {
                    symbol,
                    depth,
                    reply,
                } => {
                    let view = book_view(&exchange, &symbol, depth);
                    pending.push(Pending::Book(reply, view));
                }
                Request::State { reply } => {
                    pending.push(Pending::State(reply, state_view(&exchange, journal.end())));
                }
            }
        }
        metrics::histogram!("engine_matching_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        if !buf.is_empty() {
            let synced = Instant::now();
            if let Err(e) = journal.append(&buf) {
                tracing::error!(error = %e, "journal write failed; exiting so a restart replays what is on disk");
                std::process::exit(EXIT_JOURNAL_FAILED);
            }
            metrics::histogram!("engine_journal_fsync_duration_seconds")
                .record(synced.elapsed().as_secs_f64());
            metrics::histogram!("engine_journal_batch_size").record(commands as f64);
            metrics::counter!("engine_journal_bytes_total").increment(buf.len() as u64);
            durable.send_replace(Durable {
                offset: journal.end(),
                last_seq: exchange.last_seq(),
            });
            metrics::gauge!("engine_last_seq").set(exchange.last_seq() as f64);
            publish_book_gauges(&exchange);
        }
        for p in pending.drain(..) {
            // A receiver that went away (client timed out) is fine: the command is journaled
            // and a retry will get the same outcome.
            let _ = match p {
                Pending::Applied(tx, a) => tx.send(a).map_err(|_| ()),
                Pending::Batch(tx, a) => tx.send(a).map_err(|_| ()),
                Pending::Book(tx, v) => tx.send(v).map_err(|_| ()),
                Pending::State(tx, v) => tx.send(v).map_err(|_| ()),
            };
        }
    }
    tracing::info!(
        last_seq = exchange.last_seq(),
        "matching thread stopped; journal is synced"
    );
}

/// Applies one command, appends it to the journal buffer when it changed the books, counts it.
fn apply(exchange: &mut Exchange, command: &Command, buf: &mut Vec<u8>, new: &mut u64) -> Applied {
    let applied = exchange.apply(command);
    let kind = match command {
        Command::NewOrder(_) => "new_order",
        Command::Cancel(_) => "cancel",
    };
    let result = match &applied {
        Applied::New { events, .. } => {
            journal::encode(buf, command, events);
            *new += 1;
            "new"
        }
        Applied::Replay(_) => "replay",
        Applied::Conflict { .. } => "conflict",
    };
    metrics::counter!("engine_commands_total", "command" => kind, "result" => result).increment(1);
    applied
}

fn publish_book_gauges(exchange: &Exchange) {
    for (spec, book) in exchange.books() {
        let symbol = spec.symbol.as_str();
        metrics::gauge!("engine_book_orders", "symbol" => symbol.to_owned()).set(book.len() as f64);
        for (side, label) in [(Side::Buy, "buy"), (Side::Sell, "sell")] {
            metrics::gauge!("engine_book_price_levels", "symbol" => symbol.to_owned(), "side" => label)
                .set(book.price_levels(side) as f64);
        }
    }
    metrics::gauge!("engine_orders_known").set(exchange.orders_known() as f64);
    metrics::gauge!("engine_last_seq").set(exchange.last_seq() as f64);
}

fn book_view(exchange: &Exchange, symbol: &str, depth: usize) -> Option<BookView> {
    let (spec, book) = exchange.book(symbol)?;
    let levels = |side| {
        book.depth(side, depth)
            .into_iter()
            .map(|l| LevelView {
                price: spec.format_price(l.price),
                quantity: l.quantity,
                orders: l.orders,
            })
            .collect()
    };
    Some(BookView {
        symbol: symbol.to_owned(),
        seq: exchange.last_seq(),
        bids: levels(Side::Buy),
        asks: levels(Side::Sell),
    })
}

fn state_view(exchange: &Exchange, journal_bytes: u64) -> StateView {
    StateView {
        last_seq: exchange.last_seq(),
        journal_bytes,
        orders_known: exchange.orders_known(),
        books: exchange
            .books()
            .map(|(spec, book)| BookState {
                symbol: spec.symbol.as_str().to_owned(),
                hash: book.hash(),
                resting_orders: book.len(),
                best_bid: book.best_bid().map(|p| spec.format_price(p)),
                best_ask: book.best_ask().map(|p| spec.format_price(p)),
            })
            .collect(),
    }
}
