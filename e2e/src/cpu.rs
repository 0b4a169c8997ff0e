//! CPU time of whole process trees and of the host, from `/proc`, for benchmarks that want to
//! say where a run's CPU went: PostgreSQL runs one process per connection and RabbitMQ starts
//! helpers, so a component's CPU is its process's and every descendant's.

use std::collections::{BTreeMap, HashMap};

use lab::process::TICKS_PER_SEC;

/// CPU seconds (user + system) so far of each named process tree: the process and everything
/// descended from it that is alive now. A descendant that exited since the last reading takes
/// its CPU with it (short-lived helpers are undercounted; the lab's are long-lived).
pub fn tree_seconds(roots: &[(String, i32)]) -> BTreeMap<String, f64> {
    let mut parent: HashMap<i32, i32> = HashMap::new();
    let mut cpu: HashMap<i32, f64> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            if let Some((ppid, seconds)) = stat(pid) {
                parent.insert(pid, ppid);
                cpu.insert(pid, seconds);
            }
        }
    }
    let mut out: BTreeMap<String, f64> = roots.iter().map(|(n, _)| (n.clone(), 0.0)).collect();
    for (&pid, &seconds) in &cpu {
        // Walk up to a root (bounded: a pid's ancestry ends at 1 or 0; the bound guards a
        // table read while processes come and go).
        let mut p = pid;
        for _ in 0..64 {
            if let Some((name, _)) = roots.iter().find(|(_, r)| *r == p) {
                *out.entry(name.clone()).or_default() += seconds;
                break;
            }
            match parent.get(&p) {
                Some(&pp) if pp > 0 && pp != p => p = pp,
                _ => break,
            }
        }
    }
    out
}

/// CPU seconds so far of this process (all its threads).
pub fn own_seconds() -> f64 {
    stat(std::process::id() as i32).map_or(0.0, |(_, s)| s)
}

/// `(ppid, utime + stime in seconds)` of `pid`.
fn stat(pid: i32) -> Option<(i32, f64)> {
    let s = lab::process::stat(pid)?;
    Some((s.ppid, s.cpu_ticks as f64 / TICKS_PER_SEC))
}

/// The host's CPU seconds so far, all CPUs together: `(busy, total)`, where busy is everything
/// but idle and iowait (`/proc/stat`, first line).
pub fn host_seconds() -> Option<(f64, f64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<f64> = line
        .split_whitespace()
        .take(8) // user nice system idle iowait irq softirq steal (guest time is in user)
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    if v.len() < 8 {
        return None;
    }
    let total: f64 = v.iter().sum();
    let idle = v[3] + v[4];
    Some(((total - idle) / TICKS_PER_SEC, total / TICKS_PER_SEC))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_busy_child_counts_for_its_parents_tree() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .expect("spawning sh");
        let me = std::process::id() as i32;
        let kid = child.id() as i32;
        let deadline = Instant::now() + Duration::from_secs(20);
        let (mut mine, mut its) = (0.0, 0.0);
        while Instant::now() < deadline {
            // Two roots: the child's CPU goes to the nearest, not to both.
            let t = tree_seconds(&[("me".into(), me), ("kid".into(), kid)]);
            (mine, its) = (t["me"] - own_seconds(), t["kid"]);
            if its >= 0.2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let alone = tree_seconds(&[("me".into(), me)])["me"] - own_seconds();
        child.kill().expect("killing sh");
        child.wait().expect("reaping sh");
        assert!(its >= 0.2, "the child's tree saw {its} s");
        assert!(
            mine < 0.05,
            "the child was counted for its parent too: {mine} s"
        );
        assert!(
            alone >= its,
            "as the only root, the parent's tree has the child: {alone} < {its}"
        );
        let (busy, total) = host_seconds().expect("/proc/stat");
        assert!(busy >= its && total >= busy, "host {busy} / {total}");
    }
}
