//! Kernel state the experiments touch, captured before the fault and compared after the run:
//! each component namespace's iptables rules and each component cgroup's limits. Anything that
//! differs at the end is state the run left behind (exit code 3).

use crate::inject::netns_exec;
use crate::target::Stack;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Files compared in every component cgroup.
const CGROUP_FILES: &[(&str, &str)] = &[
    ("cpu", "cpu.cfs_quota_us"),
    ("memory", "memory.limit_in_bytes"),
    ("blkio", "blkio.throttle.read_bps_device"),
    ("blkio", "blkio.throttle.write_bps_device"),
    ("blkio", "blkio.throttle.read_iops_device"),
    ("blkio", "blkio.throttle.write_iops_device"),
];

/// Key → value of everything captured.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot(pub BTreeMap<String, String>);

/// The rules of a namespace's filter table, without packet counters.
fn iptables_rules(ns: &str) -> String {
    match netns_exec(ns, &["iptables-save", "-t", "filter"]) {
        Ok(text) => text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| match l.find(" [") {
                // ":INPUT ACCEPT [12:345]" → ":INPUT ACCEPT"
                Some(i) if l.starts_with(':') => l[..i].to_owned(),
                _ => l.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n"),
        Err(e) => format!("(unreadable: {e})"),
    }
}

/// Captures the state of every isolated component.
pub fn capture(stack: &Stack) -> Snapshot {
    let mut out = BTreeMap::new();
    for c in &stack.state.components {
        if let Some(ns) = &c.netns {
            out.insert(format!("{}: iptables", c.name), iptables_rules(ns));
        }
        for (controller, file) in CGROUP_FILES {
            if let Some(dir) = c.cgroup.get(*controller) {
                let path = dir.join(file);
                let value = std::fs::read_to_string(&path)
                    .map(|v| v.trim().to_owned())
                    .unwrap_or_else(|e| format!("(unreadable: {e})"));
                out.insert(format!("{}: {file}", c.name), value);
            }
        }
    }
    Snapshot(out)
}

impl Snapshot {
    /// What changed between `self` (before) and `after`, one line each.
    pub fn diff(&self, after: &Snapshot) -> Vec<String> {
        let mut out = Vec::new();
        for (k, before) in &self.0 {
            match after.0.get(k) {
                Some(now) if now == before => {}
                Some(now) => out.push(format!("{k}: was {before:?}, now {now:?}")),
                None => out.push(format!("{k}: was {before:?}, now gone")),
            }
        }
        for (k, now) in &after.0 {
            if !self.0.contains_key(k) {
                out.push(format!("{k}: new {now:?}"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_names_what_changed() {
        let a = Snapshot(BTreeMap::from([
            ("x: cpu.cfs_quota_us".to_string(), "-1".to_string()),
            ("y: iptables".to_string(), "*filter".to_string()),
        ]));
        let mut b = a.clone();
        assert!(a.diff(&b).is_empty());
        b.0.insert("x: cpu.cfs_quota_us".into(), "10000".into());
        b.0.insert("z: new".into(), "1".into());
        let d = a.diff(&b);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d[0].contains("was \"-1\", now \"10000\""));
    }
}
