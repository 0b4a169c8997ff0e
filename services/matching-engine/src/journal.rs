//! The command journal: the engine's write-ahead log and its event outbox in one file.
//!
//! Every command that changed something is appended, with the events it produced, as one
//! record ([`kit::record`] framing, the header's sequence number being the record's first event
//! sequence number, the payload a [`JournalRecord`] in JSON) and made durable with
//! `fdatasync` **before** the engine answers it. Commands arriving while a sync runs are
//! written and synced together (group commit, see `server`).
//!
//! On start the engine replays the journal through [`Exchange::apply`] and checks that every
//! command yields exactly the events journaled with it; the rebuilt books therefore have the
//! same hashes as before the crash. A record torn by a crash at the end of the file (written,
//! never synced, never answered) is cut off.
//!
//! The outbox publisher reads events back from the journal ([`read_events`]) from its last
//! confirmed offset, so events wait here while RabbitMQ is away.
//!
//! The file is written with zeros ahead of the records (`journal.preallocate_kb` at a time, as
//! PostgreSQL zero-fills its WAL segments), and records then overwrite the zeros. A sync of
//! records inside space already written changes neither the file's size nor its block map,
//! so `fdatasync` writes the data alone: on this lab's ext4 an appending sync also wrote the
//! inode (and block bitmaps) as separate I/Os. The zeros are written in the same sync as the
//! records that first need them. Replay stops at the zeros (no record starts with a zero
//! length and a zero checksum) and keeps them.

use crate::exchange::{Applied, Exchange};
use domain::{Command, Event};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// File name of the journal inside the engine's data directory.
pub const JOURNAL_FILE: &str = "journal.log";

/// The default zero-fill step (`journal.preallocate_kb`).
pub const PREALLOCATE: u64 = 256 << 10;

/// One journaled command and the events it produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalRecord {
    pub command: Command,
    pub events: Vec<Event>,
}

/// The same record, with its events left as raw JSON for the outbox to forward unparsed.
#[derive(Deserialize)]
struct RawRecord<'a> {
    #[serde(borrow)]
    events: Vec<&'a RawValue>,
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("journal {path}: record at byte {offset} is not a journal record: {message}")]
    Decode {
        path: PathBuf,
        offset: u64,
        message: String,
    },
    #[error(
        "journal replay diverged at event {seq}: the engine no longer produces the events it journaled (a determinism bug or a changed catalog); refusing to start"
    )]
    Diverged { seq: u64 },
}

/// What replay found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayStats {
    pub records: u64,
    pub events: u64,
    /// Bytes of a torn tail that were cut off.
    pub truncated_bytes: u64,
}

/// The open journal, positioned at its end.
#[derive(Debug)]
pub struct Journal {
    file: File,
    path: PathBuf,
    end: u64,
    /// The file's size: records end at `end`, zeros follow up to here.
    written: u64,
    /// Zero-fill step in bytes; 0: the file grows with each write, as an appended file does.
    step: u64,
}

impl Journal {
    /// Opens (or creates) the journal in `dir` and replays it into `exchange`; the file is
    /// then zero-filled `preallocate` bytes ahead of the records (0: no zero-fill).
    pub fn open_and_replay(
        dir: &Path,
        exchange: &mut Exchange,
        preallocate: u64,
    ) -> Result<(Journal, ReplayStats), JournalError> {
        let path = dir.join(JOURNAL_FILE);
        let io_err = |source| JournalError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io_err)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err)?;
        let mut data = Vec::new();
        file.read_to_end(&mut data).map_err(io_err)?;
        let mut stats = ReplayStats::default();
        let mut off = 0usize;
        while let Some((_, payload, used)) = kit::record::decode(&data[off..]) {
            let record: JournalRecord =
                serde_json::from_slice(payload).map_err(|e| JournalError::Decode {
                    path: path.clone(),
                    offset: off as u64,
                    message: e.to_string(),
                })?;
            let seq = record.events.first().map_or(0, |e| e.seq);
            match exchange.apply(&record.command) {
                Applied::New { events, .. } if events == record.events => {}
                _ => return Err(JournalError::Diverged { seq }),
            }
            stats.records += 1;
            stats.events += record.events.len() as u64;
            off += used;
        }
        // After the last record: nothing, zeros written ahead, or a record torn by a crash
        // (written, never synced, never answered), which is cut off with the zeros after it.
        // With zero-fill turned off the zeros go too: the file grows write by write.
        let torn = data[off..].iter().rposition(|b| *b != 0);
        if let Some(last) = torn {
            stats.truncated_bytes = (last + 1) as u64;
            tracing::warn!(path = %path.display(), offset = off, bytes = stats.truncated_bytes, "cutting off a torn record at the end of the journal");
        }
        let mut written = data.len() as u64;
        if written > off as u64 && (torn.is_some() || preallocate == 0) {
            file.set_len(off as u64).map_err(io_err)?;
            if torn.is_some() {
                file.sync_all().map_err(io_err)?;
            }
            written = off as u64;
        }
        // Make the file's directory entry durable on first creation.
        File::open(dir).and_then(|d| d.sync_all()).map_err(io_err)?;
        Ok((
            Journal {
                file,
                path,
                end: off as u64,
                written,
                step: preallocate,
            },
            stats,
        ))
    }

    /// Appends framed records (built with [`encode`]) and syncs them to disk. When they do
    /// not fit in the zeros written ahead, zeros up to the next step boundary past them are
    /// written first, in the same sync.
    pub fn append(&mut self, records: &[u8]) -> Result<(), JournalError> {
        let need = self.end + records.len() as u64;
        let target = if self.step > 0 && need > self.written {
            need.div_ceil(self.step) * self.step
        } else {
            self.written
        };
        let synced = self
            .zero_fill(target)
            .and_then(|()| self.file.write_all_at(records, self.end))
            .and_then(|()| self.file.sync_data());
        if let Err(source) = synced {
            return Err(JournalError::Io {
                path: self.path.clone(),
                source,
            });
        }
        self.end = need;
        // `target` is the file's size already or the new zero-filled one; without zero-fill
        // the records themselves extend the file.
        self.written = target.max(need);
        Ok(())
    }

    /// Writes zeros from the end of the file up to `target` (not synced).
    fn zero_fill(&self, target: u64) -> io::Result<()> {
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        let mut at = self.written;
        while at < target {
            let n = (target - at).min(ZEROS.len() as u64) as usize;
            self.file.write_all_at(&ZEROS[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }

    /// Byte offset of the end of the durable journal.
    pub fn end(&self) -> u64 {
        self.end
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Frames one record into `buf`.
pub fn encode(buf: &mut Vec<u8>, command: &Command, events: &[Event]) {
    #[derive(Serialize)]
    struct Ref<'a> {
        command: &'a Command,
        events: &'a [Event],
    }
    let first = events.first().map_or(0, |e| e.seq);
    // Serializing plain data structs to a Vec cannot fail.
    let payload = serde_json::to_vec(&Ref { command, events }).expect("journal record serializes");
    kit::record::encode(buf, first, &payload);
}

/// Events read back from the journal for publishing.
#[derive(Debug, Default)]
pub struct EventChunk {
    /// The events as a JSON array body (`[{...},{...}]`).
    pub events_json: Vec<u8>,
    pub first_seq: u64,
    pub last_seq: u64,
    pub events: usize,
    /// Journal offset just past the last record included.
    pub end_offset: u64,
}

/// Reads whole records from `from` up to `to` (a durable offset), stopping after about
/// `max_events` events, and returns their events spliced into one JSON array, unparsed.
pub fn read_events(file: &File, from: u64, to: u64, max_events: usize) -> io::Result<EventChunk> {
    let mut chunk = EventChunk {
        end_offset: from,
        ..EventChunk::default()
    };
    if from >= to {
        return Ok(chunk);
    }
    let len = (to - from).min(4 << 20) as usize;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, from)?;
    let mut off = 0usize;
    chunk.events_json.push(b'[');
    while chunk.events < max_events {
        let Some((seq, payload, used)) = kit::record::decode(&buf[off..]) else {
            break;
        };
        let raw: RawRecord<'_> = serde_json::from_slice(payload).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("journal record at byte {}: {e}", from + off as u64),
            )
        })?;
        if chunk.events == 0 {
            chunk.first_seq = seq;
        }
        for event in &raw.events {
            if chunk.events > 0 {
                chunk.events_json.push(b',');
            }
            chunk.events_json.extend_from_slice(event.get().as_bytes());
            chunk.events += 1;
        }
        // A record's events are numbered consecutively from the header's sequence number.
        chunk.last_seq = seq + raw.events.len() as u64 - 1;
        off += used;
        chunk.end_offset = from + off as u64;
    }
    chunk.events_json.push(b']');
    if off == 0 {
        // `from < to`, so an intact record must start here: anything else is corruption.
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("no intact journal record at byte {from}"),
        ));
    }
    Ok(chunk)
}

#[cfg(test)]
mod tests {
    use super::*;
    use domain::{Catalog, NewOrderRequest, OrderId};

    fn cmd(id: u64, side: &str) -> Command {
        Command::NewOrder(
            NewOrderRequest {
                client_order_id: Some(format!("c{id}")),
                symbol: Some("AAPL".into()),
                side: Some(side.into()),
                order_type: Some("limit".into()),
                price: Some("10.00".into()),
                quantity: Some(5),
                ..NewOrderRequest::default()
            }
            .validate(&Catalog::lab(), OrderId(id))
            .unwrap(),
        )
    }

    #[test]
    fn replay_rebuilds_the_same_state_and_reads_back_events() {
        let dir = tempfile::tempdir().unwrap();
        let mut x = Exchange::new(&Catalog::lab());
        let (mut j, stats) = Journal::open_and_replay(dir.path(), &mut x, PREALLOCATE).unwrap();
        assert_eq!(stats.records, 0);
        let mut buf = Vec::new();
        for (id, side) in [(1, "sell"), (2, "sell"), (3, "buy")] {
            let c = cmd(id, side);
            let Applied::New { events, .. } = x.apply(&c) else {
                panic!()
            };
            encode(&mut buf, &c, &events);
        }
        j.append(&buf).unwrap();
        let hash = x.book("AAPL").unwrap().1.hash();
        let end = j.end();
        drop(j);

        let mut y = Exchange::new(&Catalog::lab());
        let (j, stats) = Journal::open_and_replay(dir.path(), &mut y, PREALLOCATE).unwrap();
        assert_eq!((stats.records, stats.events), (3, 4));
        assert_eq!(y.book("AAPL").unwrap().1.hash(), hash);
        assert_eq!(y.last_seq(), 4);

        let f = File::open(j.path()).unwrap();
        let chunk = read_events(&f, 0, end, 100).unwrap();
        assert_eq!((chunk.first_seq, chunk.last_seq, chunk.events), (1, 4, 4));
        assert_eq!(chunk.end_offset, end);
        let events: Vec<Event> = serde_json::from_slice(&chunk.events_json).unwrap();
        assert_eq!(
            events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        // A small budget stops at record boundaries.
        let part = read_events(&f, 0, end, 1).unwrap();
        assert_eq!((part.first_seq, part.last_seq), (1, 1));
        let rest = read_events(&f, part.end_offset, end, 100).unwrap();
        assert_eq!((rest.first_seq, rest.last_seq), (2, 4));
    }

    /// Applies `n` alternating orders to `x` and frames them.
    fn orders(x: &mut Exchange, first: u64, n: u64) -> Vec<u8> {
        let mut buf = Vec::new();
        for id in first..first + n {
            let c = cmd(id, if id % 2 == 0 { "buy" } else { "sell" });
            let Applied::New { events, .. } = x.apply(&c) else {
                panic!()
            };
            encode(&mut buf, &c, &events);
        }
        buf
    }

    #[test]
    fn zeros_are_written_ahead_of_the_records_and_are_not_records() {
        let dir = tempfile::tempdir().unwrap();
        let mut x = Exchange::new(&Catalog::lab());
        let (mut j, _) = Journal::open_and_replay(dir.path(), &mut x, 4096).unwrap();
        let size = || {
            std::fs::metadata(dir.path().join(JOURNAL_FILE))
                .unwrap()
                .len()
        };
        assert_eq!(size(), 0, "nothing is written before the first record");
        let mut next = 1;
        let mut sizes = Vec::new();
        while j.end() < 5 * 4096 {
            let buf = orders(&mut x, next, 3);
            next += 3;
            j.append(&buf).unwrap();
            // Whole steps, ahead of the records, by less than a step.
            assert_eq!(size() % 4096, 0);
            assert!(size() >= j.end() && size() < j.end() + 4096);
            sizes.push(size());
        }
        sizes.dedup();
        assert!(
            sizes.len() >= 5,
            "the zeros were extended step by step: {sizes:?}"
        );
        let (end, last_seq, hash) = (j.end(), x.last_seq(), x.book("AAPL").unwrap().1.hash());
        drop(j);
        let mut y = Exchange::new(&Catalog::lab());
        let (mut j, stats) = Journal::open_and_replay(dir.path(), &mut y, 4096).unwrap();
        assert_eq!((stats.records, stats.truncated_bytes), (next - 1, 0));
        assert_eq!(j.end(), end);
        assert_eq!(
            (y.last_seq(), y.book("AAPL").unwrap().1.hash()),
            (last_seq, hash)
        );
        // Appending after a restart overwrites the zeros, not the records before them.
        let size_before = size();
        let buf = orders(&mut y, next, 1);
        j.append(&buf).unwrap();
        assert_eq!(size(), size_before);
        let f = File::open(j.path()).unwrap();
        let all = read_events(&f, 0, j.end(), usize::MAX).unwrap();
        assert_eq!((all.first_seq, all.last_seq), (1, y.last_seq()));
        assert!(
            read_events(&f, j.end(), j.end() + 100, 10).is_err(),
            "the zeros are not an intact record"
        );
    }

    #[test]
    fn without_zero_fill_the_file_grows_with_each_write() {
        let dir = tempfile::tempdir().unwrap();
        let mut x = Exchange::new(&Catalog::lab());
        let (mut j, _) = Journal::open_and_replay(dir.path(), &mut x, 0).unwrap();
        let buf = orders(&mut x, 1, 2);
        j.append(&buf).unwrap();
        let size = || {
            std::fs::metadata(dir.path().join(JOURNAL_FILE))
                .unwrap()
                .len()
        };
        assert_eq!((size(), j.end()), (buf.len() as u64, buf.len() as u64));
        drop(j);
        // Zeros written ahead by an earlier run are cut when zero-fill is turned off.
        let mut y = Exchange::new(&Catalog::lab());
        let (mut j, _) = Journal::open_and_replay(dir.path(), &mut y, 4096).unwrap();
        j.append(&orders(&mut y, 3, 1)).unwrap();
        assert!(size() > j.end());
        let end = j.end();
        drop(j);
        let mut z = Exchange::new(&Catalog::lab());
        let (j, stats) = Journal::open_and_replay(dir.path(), &mut z, 0).unwrap();
        assert_eq!(
            (stats.records, stats.truncated_bytes, j.end(), size()),
            (3, 0, end, end)
        );
    }

    #[test]
    fn a_torn_tail_is_cut_and_divergence_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut x = Exchange::new(&Catalog::lab());
        let (mut j, _) = Journal::open_and_replay(dir.path(), &mut x, PREALLOCATE).unwrap();
        let c = cmd(1, "sell");
        let Applied::New { events, .. } = x.apply(&c) else {
            panic!()
        };
        let mut buf = Vec::new();
        encode(&mut buf, &c, &events);
        j.append(&buf).unwrap();
        j.append(&buf[..buf.len() / 2]).unwrap();
        drop(j);
        let mut y = Exchange::new(&Catalog::lab());
        let (j, stats) = Journal::open_and_replay(dir.path(), &mut y, PREALLOCATE).unwrap();
        assert_eq!(stats.records, 1);
        assert_eq!(stats.truncated_bytes, (buf.len() / 2) as u64);
        let end = j.end();
        drop(j);

        // A journal whose events do not match what the engine produces is refused.
        let mut forged = events.clone();
        forged[0].seq = 42;
        let mut bad = Vec::new();
        encode(&mut bad, &cmd(2, "buy"), &forged);
        std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join(JOURNAL_FILE))
            .unwrap()
            .write_all_at(&bad, end)
            .unwrap();
        let mut z = Exchange::new(&Catalog::lab());
        assert!(matches!(
            Journal::open_and_replay(dir.path(), &mut z, PREALLOCATE),
            Err(JournalError::Diverged { .. })
        ));
    }
}
