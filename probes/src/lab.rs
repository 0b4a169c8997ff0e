//! The lab's state file (`<root>/state.json`, written by `deploy/lab`), read for attribution.
//!
//! Only what the agent needs is decoded, and every field is optional except the component name,
//! so the file can grow (netns, address, cgroup paths) without breaking the agent: unknown
//! fields are ignored, as the lab's own schema promises.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Schema version the agent understands (the lab's `STATE_VERSION`).
pub const STATE_VERSION: u64 = 1;

/// The parts of the state file used for attribution.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabState {
    pub components: Vec<LabComponent>,
}

/// One component: who it is, and everything that identifies its processes and sockets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabComponent {
    pub name: String,
    /// Main process (also its process group leader); children are found from it.
    pub pid: Option<u32>,
    /// Helper processes (RabbitMQ's epmd).
    pub aux_pids: Vec<u32>,
    /// Named listening ports.
    pub ports: Vec<u16>,
    /// Its address on the lab bridge (198.18.0.x) when it has its own network namespace.
    pub address: Option<IpAddr>,
    /// Network namespace name, informational.
    pub netns: Option<String>,
    /// Cgroup directories (absolute, or relative to each v1 hierarchy under /sys/fs/cgroup).
    pub cgroups: Vec<String>,
}

#[derive(Deserialize)]
struct RawState {
    version: Option<u64>,
    #[serde(default)]
    components: Vec<RawComponent>,
}

#[derive(Deserialize)]
struct RawComponent {
    name: String,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    pid: Option<i64>,
    #[serde(default)]
    ports: BTreeMap<String, u16>,
    #[serde(default)]
    aux: BTreeMap<String, RawProcess>,
    #[serde(default)]
    address: Option<String>,
    #[serde(default)]
    netns: Option<String>,
    #[serde(default)]
    cgroup: Option<CgroupField>,
    #[serde(default)]
    cgroups: Option<CgroupField>,
}

#[derive(Deserialize)]
struct RawProcess {
    pid: i64,
}

/// A cgroup path, a list of them, or a map controller -> path.
#[derive(Deserialize)]
#[serde(untagged)]
enum CgroupField {
    One(String),
    Many(Vec<String>),
    ByController(BTreeMap<String, String>),
}

impl CgroupField {
    fn into_paths(self) -> Vec<String> {
        match self {
            CgroupField::One(p) => vec![p],
            CgroupField::Many(v) => v,
            CgroupField::ByController(m) => m.into_values().collect(),
        }
    }
}

/// Why the state file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "{path} has state version {found:?}; the probes agent understands version {STATE_VERSION}"
    )]
    Version { path: PathBuf, found: Option<u64> },
}

fn positive_pid(p: Option<i64>) -> Option<u32> {
    p.filter(|p| *p > 0).and_then(|p| u32::try_from(p).ok())
}

impl LabState {
    /// Parses state file text; `path` is only used in errors.
    pub fn parse(text: &str, path: &Path) -> Result<LabState, LabError> {
        let raw: RawState = serde_json::from_str(text).map_err(|source| LabError::Parse {
            path: path.to_owned(),
            source,
        })?;
        if raw.version != Some(STATE_VERSION) {
            return Err(LabError::Version {
                path: path.to_owned(),
                found: raw.version,
            });
        }
        let components = raw
            .components
            .into_iter()
            .map(|c| {
                // A component the lab does not run has no live process to attribute.
                let active = !matches!(c.status.as_deref(), Some("stopped" | "failed" | "held"));
                let mut paths = Vec::new();
                paths.extend(c.cgroup.map(CgroupField::into_paths).unwrap_or_default());
                paths.extend(c.cgroups.map(CgroupField::into_paths).unwrap_or_default());
                LabComponent {
                    name: c.name,
                    pid: if active { positive_pid(c.pid) } else { None },
                    aux_pids: c
                        .aux
                        .into_values()
                        .filter_map(|p| positive_pid(Some(p.pid)))
                        .collect(),
                    ports: c.ports.into_values().filter(|p| *p != 0).collect(),
                    address: c.address.and_then(|a| a.parse().ok()),
                    netns: c.netns,
                    cgroups: paths,
                }
            })
            .collect();
        Ok(LabState { components })
    }

    /// Reads the state file at `path`.
    pub fn read(path: &Path) -> Result<LabState, LabError> {
        let text = std::fs::read_to_string(path).map_err(|source| LabError::Read {
            path: path.to_owned(),
            source,
        })?;
        LabState::parse(&text, path)
    }
}

/// Where to look for the state file when none was given: `.lab/state.json` (the default
/// runtime folder seen from the repository), then `../state.json` (the lab starts the agent
/// with its component folder `<root>/probes` as working directory).
pub fn default_paths() -> Vec<PathBuf> {
    vec![
        PathBuf::from(".lab/state.json"),
        PathBuf::from("../state.json"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_todays_schema_and_tomorrows_fields() {
        let text = r#"{
          "version": 1, "phase": "running", "updated_at": 1,
          "components": [
            {"name": "rabbitmq", "status": "ready", "pid": 200, "pid_start_ticks": 7,
             "ports": {"amqp": 5673, "dist": 25673, "epmd": 4370},
             "aux": {"epmd": {"pid": 199, "start_ticks": 6, "started_at": 0}}},
            {"name": "matching-engine", "status": "ready", "pid": 300, "ports": {"http": 8081},
             "netns": "lab-matching-engine", "address": "198.18.0.3",
             "cgroup": {"cpu": "/sys/fs/cgroup/cpu/lab/matching-engine", "memory": "lab/matching-engine"}},
            {"name": "persistence", "status": "stopped", "pid": 400, "ports": {"http": 8082},
             "cgroup": "lab/persistence", "future_field": [1, 2]}
          ]
        }"#;
        let s = LabState::parse(text, Path::new("state.json")).unwrap();
        assert_eq!(s.components.len(), 3);
        let r = &s.components[0];
        assert_eq!((r.pid, r.aux_pids.clone()), (Some(200), vec![199]));
        assert_eq!(r.ports, vec![5673, 25673, 4370]);
        let m = &s.components[1];
        assert_eq!(m.address, Some("198.18.0.3".parse().unwrap()));
        assert_eq!(m.cgroups.len(), 2);
        let p = &s.components[2];
        assert_eq!(p.pid, None, "a stopped component's pid is not attributed");
        assert_eq!(p.cgroups, vec!["lab/persistence".to_string()]);
    }

    #[test]
    fn other_versions_and_garbage_are_refused_with_the_path() {
        let e = LabState::parse(
            r#"{"version": 2, "components": []}"#,
            Path::new("/x/state.json"),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("/x/state.json has state version Some(2)"),
            "{e}"
        );
        let e = LabState::parse("{", Path::new("/x/state.json")).unwrap_err();
        assert!(e.to_string().starts_with("parsing /x/state.json"), "{e}");
    }
}
