//! The ledger: one JSON line per order the generator sent and what came of it, written as it
//! goes (flushed at least every 100 ms), so it survives the generator being stopped.
//!
//! The first line is a [`LedgerHeader`] (`"kind": "run"`); every other line is a
//! [`LedgerEntry`]. Orders still in flight when the generator is interrupted get an entry with
//! outcome `interrupted`: they may or may not have reached the exchange, and the audit treats
//! them as in flight (neither lost nor unexpected).

use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;
use std::time::{Duration, Instant};

/// The first line of a ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LedgerHeader {
    /// Always `"run"`.
    pub kind: String,
    /// Every client order id of this run starts with this prefix followed by `-`.
    pub client_id_prefix: String,
    pub target: String,
    pub rate_per_sec: f64,
    pub duration_ms: u64,
    pub seed: u64,
    pub started_unix_us: u64,
}

/// What came of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// 201/200: the engine answered.
    Accepted,
    /// 202: the gateway spooled it durably; it will be delivered.
    Queued,
    /// 400/404/409/413/422: refused; must not be persisted.
    Rejected,
    /// 503: load shed; must not be persisted.
    Shed,
    /// Another 5xx.
    ServerError,
    /// No answer within the request timeout: may or may not have been processed.
    Timeout,
    /// Could not connect: never reached the gateway.
    ConnectError,
    /// Another transport error mid-request: may or may not have been processed.
    TransportError,
    /// Still in flight when the generator stopped: may or may not have been processed.
    Interrupted,
    /// Not sent: the generator had too many requests in flight (it could not keep up).
    Dropped,
}

impl Outcome {
    /// The exchange promised to keep it: it must be persisted exactly once.
    pub fn acknowledged(self) -> bool {
        matches!(self, Outcome::Accepted | Outcome::Queued)
    }

    /// The exchange may or may not have it.
    pub fn uncertain(self) -> bool {
        matches!(
            self,
            Outcome::Timeout
                | Outcome::TransportError
                | Outcome::Interrupted
                | Outcome::ServerError
        )
    }

    pub fn is_error(self) -> bool {
        !matches!(
            self,
            Outcome::Accepted | Outcome::Queued | Outcome::Rejected
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Queued => "queued",
            Outcome::Rejected => "rejected",
            Outcome::Shed => "shed",
            Outcome::ServerError => "server_error",
            Outcome::Timeout => "timeout",
            Outcome::ConnectError => "connect_error",
            Outcome::TransportError => "transport_error",
            Outcome::Interrupted => "interrupted",
            Outcome::Dropped => "dropped",
        }
    }
}

/// One order (or cancel) and its fate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// `"new"` or `"cancel"`.
    pub kind: String,
    /// For new orders; cancels name the order they cancel in `order_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_order_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symbol: Option<String>,
    /// When the open model meant to send it (µs since the Unix epoch).
    pub intended_us: u64,
    /// When it was actually sent.
    pub sent_us: u64,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// Order status the exchange answered (`new`, `filled`, `queued`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// From the intended send time to the answer.
    pub latency_us: u64,
    /// Error code or field for refusals and failures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Appends lines to a ledger file.
#[derive(Debug)]
pub struct LedgerWriter {
    out: BufWriter<File>,
    last_flush: Instant,
}

impl LedgerWriter {
    pub fn create(path: &Path, header: &LedgerHeader) -> std::io::Result<LedgerWriter> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut w = LedgerWriter {
            out: BufWriter::new(File::create(path)?),
            last_flush: Instant::now(),
        };
        serde_json::to_writer(&mut w.out, header)?;
        w.out.write_all(b"\n")?;
        w.out.flush()?;
        Ok(w)
    }

    pub fn write(&mut self, e: &LedgerEntry) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.out, e)?;
        self.out.write_all(b"\n")?;
        if self.last_flush.elapsed() >= Duration::from_millis(100) {
            self.flush()?;
        }
        Ok(())
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.last_flush = Instant::now();
        self.out.flush()
    }
}

/// A ledger read back.
#[derive(Debug, Clone)]
pub struct Ledger {
    pub header: LedgerHeader,
    pub entries: Vec<LedgerEntry>,
    /// A last line cut short by a hard kill, ignored.
    pub torn_lines: usize,
}

/// Reads a ledger, naming the line of any problem.
pub fn read(path: &Path) -> anyhow::Result<Ledger> {
    use anyhow::Context;
    let f = File::open(path).with_context(|| format!("opening ledger {}", path.display()))?;
    let mut lines = BufReader::new(f).lines();
    let first = lines
        .next()
        .with_context(|| format!("ledger {} is empty", path.display()))??;
    let header: LedgerHeader = serde_json::from_str(&first)
        .with_context(|| format!("ledger {} line 1 is not a run header", path.display()))?;
    let mut entries = Vec::new();
    let mut torn_lines = 0;
    let all: Vec<String> = lines.collect::<Result<_, _>>()?;
    let n = all.len();
    for (i, line) in all.into_iter().enumerate() {
        match serde_json::from_str::<LedgerEntry>(&line) {
            Ok(e) => entries.push(e),
            // Only the very last line may be torn (a hard kill mid-write).
            Err(_) if i + 1 == n => torn_lines += 1,
            Err(e) => anyhow::bail!("ledger {} line {}: {e}", path.display(), i + 2),
        }
    }
    Ok(Ledger {
        header,
        entries,
        torn_lines,
    })
}
