//! The fault journal: every change to the system is written (and synced) here **before** it is
//! made, and marked reverted after it is undone. If the runner dies mid-fault — even by
//! SIGKILL — `chaos cleanup` (and the next `chaos run`) reverts what the journal still lists.
//!
//! The journal is a JSON-lines file, `<lab root>/chaos/journal.jsonl`: `{"id", "change"}`
//! when a change is recorded, `{"id", "reverted": true}` when it is undone.

use anyhow::Context;
use lab::Component;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

/// A change the runner makes to the system, with what it takes to undo it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    /// An iptables chain created in a namespace and jumped to from INPUT and OUTPUT; undone by
    /// unhooking, flushing and deleting it.
    IptablesChain { netns: String, chain: String },
    /// A cgroup file written; undone by writing `restore` back.
    CgroupWrite { path: PathBuf, restore: String },
    /// A component stopped and held down by the lab; undone by starting it.
    ComponentHeld { component: Component },
    /// A component frozen with SIGSTOP; undone with SIGCONT.
    ComponentFrozen { component: Component },
}

#[derive(Debug, Serialize, Deserialize)]
struct Line {
    id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    change: Option<Change>,
    #[serde(default)]
    reverted: bool,
}

/// The open journal.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    next_id: u64,
    pending: BTreeMap<u64, Change>,
}

impl Journal {
    /// Opens (or creates) the journal at `path` and reads what is still pending.
    pub fn open(path: &Path) -> anyhow::Result<Journal> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut pending = BTreeMap::new();
        let mut next_id = 1;
        if path.exists() {
            let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
            for (i, line) in BufReader::new(f).lines().enumerate() {
                let line = line?;
                if line.trim().is_empty() {
                    continue;
                }
                let Ok(l) = serde_json::from_str::<Line>(&line) else {
                    // A torn last line (the runner was killed mid-write): the change it
                    // described was never applied, because we apply only after the sync.
                    tracing::warn!(line = i + 1, "ignoring an unreadable journal line");
                    continue;
                };
                next_id = next_id.max(l.id + 1);
                match (l.change, l.reverted) {
                    (Some(c), false) => {
                        pending.insert(l.id, c);
                    }
                    (_, true) => {
                        pending.remove(&l.id);
                    }
                    (None, false) => {}
                }
            }
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        // After a torn last line, start the next record on a line of its own.
        let text = std::fs::read(path).unwrap_or_default();
        if text.last().is_some_and(|b| *b != b'\n') {
            file.write_all(b"\n")?;
        }
        Ok(Journal {
            path: path.to_owned(),
            file,
            next_id,
            pending,
        })
    }

    fn append(&mut self, line: &Line) -> anyhow::Result<()> {
        let mut text = serde_json::to_string(line)?;
        text.push('\n');
        self.file
            .write_all(text.as_bytes())
            .and_then(|()| self.file.sync_data())
            .with_context(|| format!("writing the fault journal {}", self.path.display()))
    }

    /// Records a change before it is made; returns its id.
    pub fn record(&mut self, change: Change) -> anyhow::Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        self.append(&Line {
            id,
            change: Some(change.clone()),
            reverted: false,
        })?;
        self.pending.insert(id, change);
        Ok(id)
    }

    /// Marks a change undone.
    pub fn reverted(&mut self, id: u64) -> anyhow::Result<()> {
        self.append(&Line {
            id,
            change: None,
            reverted: true,
        })?;
        self.pending.remove(&id);
        Ok(())
    }

    /// Changes recorded and not yet undone, oldest first.
    pub fn pending(&self) -> Vec<(u64, Change)> {
        self.pending.iter().map(|(k, v)| (*k, v.clone())).collect()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_changes_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chaos/journal.jsonl");
        let mut j = Journal::open(&path).unwrap();
        let a = j
            .record(Change::CgroupWrite {
                path: "/x".into(),
                restore: "-1".into(),
            })
            .unwrap();
        let b = j
            .record(Change::ComponentHeld {
                component: Component::Postgres,
            })
            .unwrap();
        j.reverted(a).unwrap();
        drop(j);
        // A line torn by a kill is ignored.
        OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"id\": 9, \"cha")
            .unwrap();
        let mut j = Journal::open(&path).unwrap();
        let c = j
            .record(Change::ComponentFrozen {
                component: Component::Rabbitmq,
            })
            .unwrap();
        j.reverted(c).unwrap();
        drop(j);
        let j = Journal::open(&path).unwrap();
        assert_eq!(
            j.pending(),
            vec![(
                b,
                Change::ComponentHeld {
                    component: Component::Postgres
                }
            )]
        );
    }
}
