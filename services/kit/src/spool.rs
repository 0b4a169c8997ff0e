//! The durable retry queue: an append-only, fsync'ed spool on disk, bounded in entries and
//! bytes, delivered in order with backoff, surviving a restart of its process.
//!
//! A service that must not lose what it acknowledged (the gateway, while the engine is away)
//! appends the work here and answers only once [`Spool::append`] returned, which is after the
//! entry reached the disk (`fdatasync`). A delivery task ([`deliver`]) hands entries, oldest
//! first, to a callback until it succeeds, backing off between attempts, and then acknowledges
//! them ([`Spool::ack_through`]).
//!
//! On disk (`dir/`):
//! * `NNNNNNNNNNNNNNNNNNNN.seg` segments named by their first sequence number, each a run of
//!   records framed by [`crate::record`];
//! * `ack`, a [`Checkpoint`] of the highest delivered sequence number;
//! * `dead-letter.jsonl`, entries the receiver refused for good, with the reason.
//!
//! Guarantees and bounds: appends are group-committed (one `fdatasync` for every append that
//! arrived while the previous sync ran); a full spool refuses with [`SpoolError::Full`] instead
//! of growing; a torn record at the end of the last segment (a crash mid-write, never
//! acknowledged) is cut off on open; delivery is at-least-once (an ack not yet synced when the
//! process dies means redelivery), so receivers must be idempotent.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::checkpoint::Checkpoint;
use crate::record;
use crate::shutdown::Shutdown;

/// Limits of one spool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolLimits {
    /// Entries waiting for delivery; beyond it appends fail with `Full`.
    pub max_entries: usize,
    /// Payload bytes waiting for delivery; beyond it appends fail with `Full`.
    pub max_bytes: u64,
    /// Largest single payload accepted.
    pub max_entry_bytes: usize,
    /// A segment file is closed and a new one started past this size.
    pub segment_bytes: u64,
}

impl Default for SpoolLimits {
    fn default() -> Self {
        SpoolLimits {
            max_entries: 100_000,
            max_bytes: 64 << 20,
            max_entry_bytes: 64 << 10,
            segment_bytes: 8 << 20,
        }
    }
}

/// Why an append or an open failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The spool holds its maximum; shed load (the gateway answers 503 + Retry-After).
    #[error("retry queue full: {entries} entries, {bytes} bytes waiting")]
    Full { entries: usize, bytes: u64 },
    #[error("entry of {0} bytes exceeds the spool's per-entry limit")]
    TooLarge(usize),
    #[error("spool {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("spool {path}: corrupt record at byte {offset} of a sealed segment")]
    Corrupt { path: PathBuf, offset: u64 },
    #[error("spool writer stopped")]
    Closed,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_owned(),
        source,
    }
}

/// One spooled payload and its sequence number (1, 2, 3, ... for the life of the spool).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub payload: Vec<u8>,
}

#[derive(Debug)]
struct Segment {
    last_seq: u64,
    path: PathBuf,
}

#[derive(Debug)]
struct State {
    pending: VecDeque<Arc<Entry>>,
    pending_bytes: u64,
    next_seq: u64,
    acked: u64,
    /// Sealed and current segments, oldest first.
    segments: Vec<Segment>,
    ack: Checkpoint,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    name: &'static str,
    limits: SpoolLimits,
    state: Mutex<State>,
    /// Wakes the delivery task when entries arrive.
    arrived: Notify,
}

type AppendReply = oneshot::Sender<Result<u64, SpoolError>>;

/// A handle to an open spool; cheap to clone.
#[derive(Debug, Clone)]
pub struct Spool {
    inner: Arc<Inner>,
    writer: mpsc::Sender<(Vec<u8>, AppendReply)>,
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, recovering what is on disk, and starts its
    /// writer thread. `name` labels its metrics.
    pub fn open(dir: &Path, name: &'static str, limits: SpoolLimits) -> Result<Spool, SpoolError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let ack_path = dir.join("ack");
        let ack = Checkpoint::open(&ack_path).map_err(io_err(&ack_path))?;
        let acked = ack.get().0;

        let mut seg_paths: Vec<(u64, PathBuf)> = Vec::new();
        for e in fs::read_dir(dir).map_err(io_err(dir))? {
            let path = e.map_err(io_err(dir))?.path();
            if path.extension().is_some_and(|x| x == "seg")
                && let Some(first) = path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .and_then(|s| s.parse::<u64>().ok())
            {
                seg_paths.push((first, path));
            }
        }
        seg_paths.sort();
        let mut pending = VecDeque::new();
        let mut pending_bytes = 0u64;
        let mut segments = Vec::new();
        let mut max_seq = acked;
        let n = seg_paths.len();
        for (i, (first, path)) in seg_paths.into_iter().enumerate() {
            let entries = read_segment(&path, i + 1 == n)?;
            let last = entries.last().map_or(first.saturating_sub(1), |e| e.seq);
            for e in entries {
                max_seq = max_seq.max(e.seq);
                if e.seq > acked {
                    pending_bytes += e.payload.len() as u64;
                    pending.push_back(Arc::new(e));
                }
            }
            if last <= acked {
                // Fully delivered before the restart; its deletion may not have happened.
                let _ = fs::remove_file(&path);
            } else {
                segments.push(Segment {
                    last_seq: last,
                    path,
                });
            }
        }
        let next_seq = max_seq + 1;
        if !pending.is_empty() {
            tracing::info!(
                spool = name,
                entries = pending.len(),
                bytes = pending_bytes,
                "recovered spooled entries"
            );
        }
        let inner = Arc::new(Inner {
            dir: dir.to_owned(),
            name,
            limits,
            state: Mutex::new(State {
                pending,
                pending_bytes,
                next_seq,
                acked,
                segments,
                ack,
            }),
            arrived: Notify::new(),
        });
        inner.publish_gauges(&inner.lock());
        // Limits, so that dashboards and alerts can show how full the queue is.
        metrics::gauge!("spool_limit_entries", "spool" => name)
            .set(inner.limits.max_entries as f64);
        metrics::gauge!("spool_limit_bytes", "spool" => name).set(inner.limits.max_bytes as f64);
        // Counters exist at 0 from the start, so that rate() and alerts see them.
        for counter in [
            "spool_appends_total",
            "spool_delivered_total",
            "spool_delivery_failures_total",
            "spool_full_total",
            "spool_dead_letters_total",
        ] {
            metrics::counter!(counter, "spool" => name).increment(0);
        }
        let (tx, rx) = mpsc::channel(4096);
        let writer_inner = inner.clone();
        std::thread::Builder::new()
            .name(format!("spool-{name}"))
            .spawn(move || writer_loop(writer_inner, rx))
            .map_err(io_err(dir))?;
        Ok(Spool { inner, writer: tx })
    }

    /// Appends `payload` durably and returns its sequence number once it is on disk.
    pub async fn append(&self, payload: Vec<u8>) -> Result<u64, SpoolError> {
        if payload.len() > self.inner.limits.max_entry_bytes {
            return Err(SpoolError::TooLarge(payload.len()));
        }
        let (tx, rx) = oneshot::channel();
        self.writer
            .send((payload, tx))
            .await
            .map_err(|_| SpoolError::Closed)?;
        rx.await.map_err(|_| SpoolError::Closed)?
    }

    /// Entries waiting for delivery.
    pub fn len(&self) -> usize {
        self.inner.lock().pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Payload bytes waiting for delivery.
    pub fn bytes(&self) -> u64 {
        self.inner.lock().pending_bytes
    }

    /// The oldest undelivered entries, up to `n`, in order.
    pub fn peek(&self, n: usize) -> Vec<Arc<Entry>> {
        self.inner.lock().pending.iter().take(n).cloned().collect()
    }

    /// Every undelivered entry, in order (the gateway rebuilds its idempotency index from it).
    pub fn pending(&self) -> Vec<Arc<Entry>> {
        self.peek(usize::MAX)
    }

    /// Marks every entry up to and including `seq` delivered, durably, and deletes segments
    /// that hold nothing undelivered.
    pub fn ack_through(&self, seq: u64) -> Result<(), SpoolError> {
        let inner = &self.inner;
        let mut st = inner.lock();
        if seq <= st.acked {
            return Ok(());
        }
        while st.pending.front().is_some_and(|e| e.seq <= seq) {
            if let Some(e) = st.pending.pop_front() {
                st.pending_bytes -= e.payload.len() as u64;
            }
        }
        st.acked = seq;
        let ack_path = inner.dir.join("ack");
        st.ack.set(seq, 0).map_err(io_err(&ack_path))?;
        // Never delete the newest segment: the writer appends to it.
        while st.segments.len() > 1 && st.segments[0].last_seq <= seq {
            let s = st.segments.remove(0);
            if let Err(e) = fs::remove_file(&s.path) {
                tracing::warn!(spool = inner.name, path = %s.path.display(), error = %e, "could not delete delivered segment");
            }
        }
        inner.publish_gauges(&st);
        Ok(())
    }

    /// Records an entry the receiver refused for good in `dead-letter.jsonl` and acks it.
    pub fn dead_letter(&self, entry: &Entry, reason: &str) -> Result<(), SpoolError> {
        let path = self.inner.dir.join("dead-letter.jsonl");
        let line = serde_json::json!({
            "seq": entry.seq,
            "reason": reason,
            "payload": String::from_utf8_lossy(&entry.payload),
        });
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        writeln!(f, "{line}").map_err(io_err(&path))?;
        f.sync_data().map_err(io_err(&path))?;
        metrics::counter!("spool_dead_letters_total", "spool" => self.inner.name).increment(1);
        tracing::error!(
            spool = self.inner.name,
            seq = entry.seq,
            reason,
            "entry dead-lettered"
        );
        self.ack_through(entry.seq)
    }

    /// Resolves when an append may have made new entries available.
    pub async fn wait_for_entries(&self) {
        let notified = self.inner.arrived.notified();
        if !self.is_empty() {
            return;
        }
        notified.await;
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means a panic while holding it; the state is still consistent
        // because every mutation completes before anything that can panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish_gauges(&self, st: &State) {
        metrics::gauge!("spool_entries", "spool" => self.name).set(st.pending.len() as f64);
        metrics::gauge!("spool_bytes", "spool" => self.name).set(st.pending_bytes as f64);
    }
}

/// The writer thread: takes every append that is waiting, writes them in one go, syncs once,
/// then answers them all (group commit).
fn writer_loop(inner: Arc<Inner>, mut rx: mpsc::Receiver<(Vec<u8>, AppendReply)>) {
    let mut current: Option<(File, u64)> = None;
    let mut batch: Vec<(Vec<u8>, AppendReply)> = Vec::new();
    // After a failed write or sync the file's state is unknown (Linux may have dropped the
    // dirty pages), so the spool refuses every later append until the process restarts and
    // recovers from what is really on disk.
    let mut broken: Option<String> = None;
    while let Some(first) = rx.blocking_recv() {
        if let Some(why) = &broken {
            let _ = first.1.send(Err(SpoolError::Io {
                path: inner.dir.clone(),
                source: io::Error::other(format!("spool disabled after an earlier failure: {why}")),
            }));
            continue;
        }
        batch.push(first);
        while batch.len() < 1024 {
            match rx.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let result = write_batch(&inner, &mut current, &mut batch);
        metrics::histogram!("spool_fsync_seconds", "spool" => inner.name)
            .record(started.elapsed().as_secs_f64());
        if let Err(e) = result {
            tracing::error!(spool = inner.name, error = %e, "spool write failed; refusing appends until restart");
            broken = Some(e.to_string());
            current = None;
            for (_, reply) in batch.drain(..) {
                let _ = reply.send(Err(SpoolError::Io {
                    path: inner.dir.clone(),
                    source: io::Error::other(e.to_string()),
                }));
            }
        }
    }
}

fn write_batch(
    inner: &Inner,
    current: &mut Option<(File, u64)>,
    batch: &mut Vec<(Vec<u8>, AppendReply)>,
) -> Result<(), SpoolError> {
    // Decide admission and sequence numbers under the lock, but write outside it.
    let mut accepted: Vec<(Entry, AppendReply)> = Vec::with_capacity(batch.len());
    {
        let st = inner.lock();
        let mut entries = st.pending.len();
        let mut bytes = st.pending_bytes;
        let mut seq = st.next_seq;
        for (payload, reply) in batch.drain(..) {
            let len = payload.len() as u64;
            if entries + 1 > inner.limits.max_entries || bytes + len > inner.limits.max_bytes {
                metrics::counter!("spool_full_total", "spool" => inner.name).increment(1);
                let _ = reply.send(Err(SpoolError::Full { entries, bytes }));
                continue;
            }
            entries += 1;
            bytes += len;
            accepted.push((Entry { seq, payload }, reply));
            seq += 1;
        }
    }
    if accepted.is_empty() {
        return Ok(());
    }
    let first_seq = accepted[0].0.seq;
    let last_seq = accepted[accepted.len() - 1].0.seq;
    if current
        .as_ref()
        .is_none_or(|(_, size)| *size >= inner.limits.segment_bytes)
    {
        let path = inner.dir.join(format!("{first_seq:020}.seg"));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        // Make the new file's directory entry durable too.
        File::open(&inner.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&inner.dir))?;
        inner.lock().segments.push(Segment {
            last_seq: first_seq - 1,
            path,
        });
        *current = Some((file, 0));
    }
    let (file, size) = current.as_mut().expect("set just above");
    let mut buf = Vec::with_capacity(
        accepted
            .iter()
            .map(|(e, _)| record::HEADER + e.payload.len())
            .sum(),
    );
    for (e, _) in &accepted {
        record::encode(&mut buf, e.seq, &e.payload);
    }
    let path = inner.dir.join(format!("{first_seq:020}.seg"));
    file.write_all(&buf).map_err(io_err(&path))?;
    file.sync_data().map_err(io_err(&path))?;
    *size += buf.len() as u64;
    {
        let mut st = inner.lock();
        st.next_seq = last_seq + 1;
        if let Some(seg) = st.segments.last_mut() {
            seg.last_seq = last_seq;
        }
        for (e, _) in &accepted {
            st.pending_bytes += e.payload.len() as u64;
        }
        st.pending
            .extend(accepted.iter().map(|(e, _)| Arc::new(e.clone())));
        inner.publish_gauges(&st);
    }
    metrics::counter!("spool_appends_total", "spool" => inner.name)
        .increment(accepted.len() as u64);
    for (e, reply) in accepted {
        let _ = reply.send(Ok(e.seq));
    }
    inner.arrived.notify_waiters();
    inner.arrived.notify_one();
    Ok(())
}

/// Reads every record of a segment. A bad record at the tail of the newest segment is a torn
/// write from a crash (never acknowledged) and is cut off; anywhere else it is corruption.
fn read_segment(path: &Path, is_last: bool) -> Result<Vec<Entry>, SpoolError> {
    let mut data = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut data))
        .map_err(io_err(path))?;
    let (records, end) = record::decode_all(&data);
    if end < data.len() {
        if !is_last {
            return Err(SpoolError::Corrupt {
                path: path.to_owned(),
                offset: end as u64,
            });
        }
        tracing::warn!(path = %path.display(), offset = end, "cutting off a torn record at the end of the spool");
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io_err(path))?;
        f.set_len(end as u64).map_err(io_err(path))?;
        f.sync_all().map_err(io_err(path))?;
    }
    Ok(records
        .into_iter()
        .map(|(seq, payload)| Entry {
            seq,
            payload: payload.to_vec(),
        })
        .collect())
}

/// The outcome of one delivery attempt.
#[derive(Debug)]
pub enum Delivery {
    /// Delivered; the entry is acknowledged.
    Done,
    /// The receiver is unavailable; try again after a backoff.
    Retry(String),
    /// The receiver refused this entry for good; it goes to the dead-letter file.
    Reject(String),
}

/// Exponential backoff between delivery attempts: `initial`, doubling, capped at `max`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(1),
        }
    }
}

/// Delivers the spool's entries in order, in batches of up to `max_batch`, with `deliver`,
/// until `shutdown`.
///
/// `deliver` gets the oldest undelivered entries and returns one [`Delivery`] per entry it
/// attempted, in order; it may return fewer than it was given (the rest are offered again). A
/// `Retry` ends the batch there: that entry and the ones after it are retried after a growing,
/// capped backoff, for as long as it takes, because giving up would lose an acknowledged order.
/// What bounds this loop is the spool itself (appends beyond its limits are refused) and the
/// backoff cap. Acks are made durable in groups (every 64 deliveries, or when the queue runs
/// empty), so a crash redelivers at most that many entries.
pub async fn deliver<F, Fut>(
    spool: Spool,
    shutdown: Shutdown,
    backoff: Backoff,
    max_batch: usize,
    mut deliver: F,
) where
    F: FnMut(Vec<Arc<Entry>>) -> Fut,
    Fut: std::future::Future<Output = Vec<Delivery>>,
{
    let name = spool.inner.name;
    let mut delay = backoff.initial;
    let mut unacked: Option<u64> = None;
    let mut since_ack = 0u32;
    let flush = |unacked: &mut Option<u64>, since_ack: &mut u32| {
        if let Some(seq) = unacked.take() {
            ack_or_log(&spool, seq);
        }
        *since_ack = 0;
    };
    loop {
        if shutdown.is_triggered() {
            break;
        }
        let batch = spool.peek(max_batch.max(1));
        if batch.is_empty() {
            flush(&mut unacked, &mut since_ack);
            tokio::select! {
                _ = spool.wait_for_entries() => {}
                _ = shutdown.wait() => break,
            }
            continue;
        }
        let results = deliver(batch.clone()).await;
        let mut failure: Option<String> = None;
        let mut progressed = false;
        for (entry, result) in batch.iter().zip(results) {
            match result {
                Delivery::Done => {
                    metrics::counter!("spool_delivered_total", "spool" => name).increment(1);
                    // Ack in memory at once so the next peek moves on; durably in groups.
                    spool.ack_in_memory(entry.seq);
                    unacked = Some(entry.seq);
                    since_ack += 1;
                    progressed = true;
                }
                Delivery::Reject(reason) => {
                    flush(&mut unacked, &mut since_ack);
                    if let Err(e) = spool.dead_letter(entry, &reason) {
                        tracing::error!(spool = name, error = %e, "dead-lettering failed; will retry");
                        failure = Some(e.to_string());
                        break;
                    }
                    progressed = true;
                }
                Delivery::Retry(reason) => {
                    metrics::counter!("spool_delivery_failures_total", "spool" => name)
                        .increment(1);
                    tracing::debug!(
                        spool = name,
                        seq = entry.seq,
                        reason,
                        delay_ms = delay.as_millis() as u64,
                        "delivery failed; backing off"
                    );
                    failure = Some(reason);
                    break;
                }
            }
        }
        if since_ack >= 64 {
            flush(&mut unacked, &mut since_ack);
        }
        if failure.is_none() && progressed {
            delay = backoff.initial;
            continue;
        }
        // A failure, or a callback that attempted nothing: back off before the next try.
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.wait() => break,
        }
        delay = (delay * 2).min(backoff.max);
    }
    flush(&mut unacked, &mut since_ack);
}

fn ack_or_log(spool: &Spool, seq: u64) {
    if let Err(e) = spool.ack_through(seq) {
        tracing::error!(spool = spool.inner.name, seq, error = %e, "could not persist the delivery ack; entries may be redelivered");
    }
}

impl Spool {
    /// Removes delivered entries up to `seq` from memory without syncing the ack (the next
    /// durable [`Spool::ack_through`] covers them).
    fn ack_in_memory(&self, seq: u64) {
        let mut st = self.inner.lock();
        while st.pending.front().is_some_and(|e| e.seq <= seq) {
            if let Some(e) = st.pending.pop_front() {
                st.pending_bytes -= e.payload.len() as u64;
            }
        }
        self.inner.publish_gauges(&st);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> SpoolLimits {
        SpoolLimits {
            max_entries: 100,
            max_bytes: 10_000,
            max_entry_bytes: 1_000,
            segment_bytes: 256,
        }
    }

    #[tokio::test]
    async fn appends_survive_reopen_in_order() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Spool::open(dir.path(), "t", limits()).unwrap();
            for i in 0..30u32 {
                assert_eq!(
                    s.append(format!("m{i}").into_bytes()).await.unwrap(),
                    u64::from(i) + 1
                );
            }
            s.ack_through(10).unwrap();
        }
        let s = Spool::open(dir.path(), "t", limits()).unwrap();
        let got: Vec<String> = s
            .pending()
            .iter()
            .map(|e| String::from_utf8(e.payload.clone()).unwrap())
            .collect();
        assert_eq!(got, (10..30).map(|i| format!("m{i}")).collect::<Vec<_>>());
        assert_eq!(s.append(b"next".to_vec()).await.unwrap(), 31);
        // Small segments rotate; delivered ones are deleted.
        s.ack_through(31).unwrap();
        let segs = fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "seg")
            })
            .count();
        assert_eq!(segs, 1, "only the current segment remains");
        assert!(s.is_empty());
    }

    #[tokio::test]
    async fn full_spool_refuses_instead_of_growing() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(
            dir.path(),
            "t",
            SpoolLimits {
                max_entries: 3,
                ..limits()
            },
        )
        .unwrap();
        for _ in 0..3 {
            s.append(b"x".to_vec()).await.unwrap();
        }
        assert!(matches!(
            s.append(b"x".to_vec()).await,
            Err(SpoolError::Full { entries: 3, .. })
        ));
        assert!(matches!(
            s.append(vec![0; 2000]).await,
            Err(SpoolError::TooLarge(2000))
        ));
        s.ack_through(1).unwrap();
        s.append(b"y".to_vec()).await.unwrap();
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Spool::open(dir.path(), "t", SpoolLimits::default()).unwrap();
            s.append(b"one".to_vec()).await.unwrap();
            s.append(b"two".to_vec()).await.unwrap();
        }
        let seg = dir.path().join(format!("{:020}.seg", 1));
        let len = fs::metadata(&seg).unwrap().len();
        // Simulate a crash halfway through writing a third record.
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[9, 0, 0, 0, 1, 2, 3]).unwrap();
        drop(f);
        let s = Spool::open(dir.path(), "t", SpoolLimits::default()).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(fs::metadata(&seg).unwrap().len(), len);
        assert_eq!(s.append(b"three".to_vec()).await.unwrap(), 3);
    }

    #[tokio::test]
    async fn deliver_retries_in_order_then_acks() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), "t", limits()).unwrap();
        for i in 0..5u8 {
            s.append(vec![i]).await.unwrap();
        }
        let shutdown = Shutdown::new();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let fails = Arc::new(std::sync::atomic::AtomicU32::new(3));
        let task = {
            let (s, shutdown, seen, fails) =
                (s.clone(), shutdown.clone(), seen.clone(), fails.clone());
            tokio::spawn(deliver(
                s,
                shutdown,
                Backoff {
                    initial: Duration::from_millis(1),
                    max: Duration::from_millis(4),
                },
                2,
                move |batch| {
                    let seen = seen.clone();
                    let fails = fails.clone();
                    async move {
                        assert!(batch.len() <= 2);
                        let mut out = Vec::new();
                        for e in batch {
                            if fails.load(std::sync::atomic::Ordering::SeqCst) > 0 {
                                fails.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                                out.push(Delivery::Retry("down".into()));
                                break;
                            }
                            if e.payload == [3] {
                                out.push(Delivery::Reject("bad".into()));
                                continue;
                            }
                            seen.lock().unwrap().push(e.payload[0]);
                            out.push(Delivery::Done);
                        }
                        out
                    }
                },
            ))
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !s.is_empty() {
            assert!(Instant::now() < deadline, "spool did not drain");
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        shutdown.trigger();
        task.await.unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![0, 1, 2, 4]);
        let dead = fs::read_to_string(dir.path().join("dead-letter.jsonl")).unwrap();
        assert!(dead.contains("\"reason\":\"bad\""), "{dead}");
        drop(s);
        let again = Spool::open(dir.path(), "t", limits()).unwrap();
        assert!(again.is_empty(), "acks were persisted");
    }
}
