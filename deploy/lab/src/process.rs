//! Processes and their logs, at the level of the operating system.
//!
//! Liveness is read from `/proc/PID/stat` and always compared with the recorded start time, so
//! a recycled pid is never mistaken for ours; zombies count as dead (PID 1 on this machine does
//! not reap orphans, so a dead orphan can stay a zombie forever). Signals go to whole process
//! groups: every child of the lab leads its own group. Component logs are append-only files
//! shared by the component and the lab, whose own lines are marked `=== lab <time>: ... ===`.

use std::fs::{self, File, OpenOptions};
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

use crate::state::ProcessRecord;

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The fields of `/proc/PID/stat` the lab needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcStat {
    /// `R`, `S`, `D`, `T` (stopped), `Z` (zombie), ...
    pub state: char,
    pub ppid: i32,
    pub pgid: i32,
    /// Clock ticks since boot when it started.
    pub start_ticks: u64,
    /// CPU time used so far, user + system, in clock ticks (`USER_HZ`: 100 a second).
    pub cpu_ticks: u64,
}

/// Clock ticks per second of `/proc`'s times (`USER_HZ`, 100 on Linux).
pub const TICKS_PER_SEC: f64 = 100.0;

/// Parses the contents of `/proc/PID/stat`.
fn parse_stat(text: &str) -> Option<ProcStat> {
    // The command name is in parentheses and may contain spaces or ')': split at the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        pgid: fields.get(2)?.parse().ok()?,
        // Field 22 of the file; `fields[0]` is field 3.
        start_ticks: fields.get(19)?.parse().ok()?,
        // Fields 14 (utime) and 15 (stime).
        cpu_ticks: fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?,
    })
}

/// `/proc/PID/stat` of a process, if it exists.
pub fn stat(pid: i32) -> Option<ProcStat> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Record for a process we just spawned.
pub fn record(pid: i32) -> ProcessRecord {
    ProcessRecord {
        pid,
        start_ticks: stat(pid).map(|s| s.start_ticks).unwrap_or(0),
        started_at: now_ms(),
    }
}

/// The recorded process still runs (same start time, not a zombie).
pub fn is_alive(rec: &ProcessRecord) -> bool {
    match stat(rec.pid) {
        Some(s) => s.state != 'Z' && (rec.start_ticks == 0 || s.start_ticks == rec.start_ticks),
        None => false,
    }
}

/// Live (non-zombie) members of a process group.
pub fn group_members(pgid: i32) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| stat(*pid).is_some_and(|s| s.pgid == pgid && s.state != 'Z'))
        .collect()
}

/// `pid` and all its descendants that are alive now (children are found through their parent
/// pid, so a process that was already orphaned is not found).
pub fn tree(pid: i32) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return vec![pid];
    };
    let mut children: std::collections::HashMap<i32, Vec<i32>> = std::collections::HashMap::new();
    for p in entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()) {
        if let Some(s) = stat(p).filter(|s| s.state != 'Z') {
            children.entry(s.ppid).or_default().push(p);
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        out.extend(children.get(&out[i]).into_iter().flatten().copied());
        i += 1;
    }
    out
}

/// Sends `sig` to a component's processes: the process group led by `pid` and every
/// descendant of `pid` (PostgreSQL backends and Erlang port programs leave the group through
/// setsid, so the group alone is not enough).
pub fn signal_tree(pid: i32, sig: Signal) -> nix::Result<()> {
    let members = tree(pid);
    signal_group(pid, sig)?;
    for p in members.into_iter().skip(1) {
        signal_process(p, sig)?;
    }
    Ok(())
}

/// Sends `sig` to process group `pgid`. A group that no longer exists is not an error.
pub fn signal_group(pgid: i32, sig: Signal) -> nix::Result<()> {
    match signal::killpg(Pid::from_raw(pgid), sig) {
        Err(nix::errno::Errno::ESRCH) => Ok(()),
        other => other,
    }
}

/// Sends `sig` to one process. A process that no longer exists is not an error.
pub fn signal_process(pid: i32, sig: Signal) -> nix::Result<()> {
    match signal::kill(Pid::from_raw(pid), sig) {
        Err(nix::errno::Errno::ESRCH) => Ok(()),
        other => other,
    }
}

/// Parses `KILL`, `SIGKILL`, `kill` or `9`.
pub fn parse_signal(s: &str) -> anyhow::Result<Signal> {
    let s = s.trim();
    if let Ok(n) = s.parse::<i32>() {
        return Signal::try_from(n).with_context(|| format!("{n} is not a signal number"));
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse::<Signal>()
        .with_context(|| format!("unknown signal {s:?} (try KILL, TERM, STOP, CONT)"))
}

/// Stops what is left of a recorded process without a supervisor: `stop` to it (and SIGCONT to
/// its group, in case it is paused), up to `grace` for it and its group to go, then SIGKILL to
/// its group and descendants. Returns whether anything of it was still alive.
pub fn terminate_recorded(rec: &ProcessRecord, stop: Signal, grace: Duration) -> bool {
    let leader_alive = is_alive(rec);
    // A pgid is not recycled while its group has members, so leftovers of the group are ours.
    if !leader_alive && group_members(rec.pid).is_empty() {
        return false;
    }
    let descendants = if leader_alive {
        tree(rec.pid)
            .into_iter()
            .skip(1)
            .map(record_existing)
            .collect()
    } else {
        Vec::new()
    };
    if leader_alive {
        let _ = signal_process(rec.pid, stop);
    } else {
        let _ = signal_group(rec.pid, stop);
    }
    let _ = signal_group(rec.pid, Signal::SIGCONT);
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        if !is_alive(rec) && group_members(rec.pid).is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = signal_group(rec.pid, Signal::SIGKILL);
    for d in descendants.iter().filter(|d| is_alive(d)) {
        let _ = signal_process(d.pid, Signal::SIGKILL);
    }
    true
}

/// Record of a process that already runs (its real start time).
pub fn record_existing(pid: i32) -> ProcessRecord {
    ProcessRecord {
        pid,
        start_ticks: stat(pid).map(|s| s.start_ticks).unwrap_or(u64::MAX),
        started_at: 0,
    }
}

/// Opens a log file for appending, creating it.
pub fn open_log(path: &Path) -> anyhow::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening log {}", path.display()))
}

/// Appends one clearly marked line from the lab to a component log. Failing to write a log
/// line is reported through tracing, never fatal.
pub fn mark(path: &Path, message: &str) {
    let stamp = humantime::format_rfc3339_millis(SystemTime::now());
    let line = format!("=== lab {stamp}: {message} ===\n");
    if let Err(e) =
        open_log(path).and_then(|mut f| f.write_all(line.as_bytes()).context("appending"))
    {
        tracing::warn!(log = %path.display(), error = %format!("{e:#}"), "cannot write to component log");
    }
}

/// The last `n` lines of a file (at most the last 64 KiB), or a note saying why there are none.
pub fn tail(path: &Path, n: usize) -> String {
    let read = || -> anyhow::Result<String> {
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        let start = len.saturating_sub(64 * 1024);
        f.seek(SeekFrom::Start(start))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        let text = String::from_utf8_lossy(&buf);
        let lines: Vec<&str> = text.lines().collect();
        let skip = lines.len().saturating_sub(n);
        Ok(lines[skip..].join("\n"))
    };
    match read() {
        Ok(t) if t.trim().is_empty() => "(log is empty)".to_string(),
        Ok(t) => t,
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_command_names() {
        let line = "1234 (post gres: (x)) S 1 1234 1234 0 -1 4194560 101 0 0 0 7 5 0 0 20 0 1 0 98765 1000 10";
        let s = parse_stat(line).expect("parse");
        assert_eq!(
            s,
            ProcStat {
                state: 'S',
                ppid: 1,
                pgid: 1234,
                start_ticks: 98765,
                cpu_ticks: 12,
            }
        );
    }

    #[test]
    fn our_own_process_is_alive_and_a_recycled_pid_is_not() {
        let me = std::process::id() as i32;
        let rec = record(me);
        assert!(is_alive(&rec));
        assert!(!is_alive(&ProcessRecord {
            start_ticks: rec.start_ticks + 1,
            ..rec
        }));
    }

    #[test]
    fn signals_parse_in_every_spelling() {
        for s in ["KILL", "SIGKILL", "kill", "9"] {
            assert_eq!(parse_signal(s).ok(), Some(Signal::SIGKILL), "{s}");
        }
        assert_eq!(parse_signal("stop").ok(), Some(Signal::SIGSTOP));
        assert!(parse_signal("NOPE").is_err());
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.log");
        fs::write(&path, "a\nb\nc\nd\n").expect("write");
        assert_eq!(tail(&path, 2), "c\nd");
        mark(&path, "hello");
        assert!(tail(&path, 1).starts_with("=== lab ") && tail(&path, 1).ends_with("hello ==="));
        assert!(tail(&dir.path().join("missing"), 3).contains("cannot read"));
    }
}
