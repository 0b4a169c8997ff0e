//! Who is who: mapping processes, threads and TCP endpoints to lab components.
//!
//! Built from the lab's state file plus a scan of `/proc`, rebuilt every refresh:
//!
//! * processes: each component's main and helper pids and the members of its cgroups
//!   (explicit), then every descendant of those (so PostgreSQL backends and RabbitMQ's children
//!   count); explicit membership wins over ancestry;
//! * threads: every thread of those processes, which is what the kernel-side run-queue filter
//!   (`tracked` map) is keyed by;
//! * TCP endpoints: the component's listening ports (and its lab address when it has one), plus
//!   the local endpoint of every TCP socket its processes hold, found through `/proc/PID/fd`
//!   and `/proc/PID/net/tcp{,6}` in the process's own network namespace.
//!
//! TCP events are attributed by the process that opened the socket when the kernel saw it
//! connect, else by their local endpoint: retransmits and SYN-ACKs arrive in softirq context,
//! where the current task says nothing about who owns the connection.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::Path;

use crate::lab::LabState;
use crate::procfs;
use crate::wire::MAX_COMPONENTS;

/// Label for anything the agent cannot attribute.
pub const UNKNOWN: &str = "unknown";

/// Stable component indices, shared with the kernel (`tracked` values, `runq` keys). Index 0
/// is [`UNKNOWN`]; names are never removed, so an index keeps its meaning for the agent's life.
#[derive(Debug, Clone)]
pub struct Registry {
    names: Vec<String>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            names: vec![UNKNOWN.to_string()],
        }
    }
}

impl Registry {
    /// The index of `name`, registering it; [`UNKNOWN`]'s index when the table is full.
    pub fn index(&mut self, name: &str) -> u32 {
        if let Some(i) = self.names.iter().position(|n| n == name) {
            return i as u32;
        }
        if self.names.len() as u32 >= MAX_COMPONENTS {
            tracing::warn!(
                component = name,
                "too many components; counting it as unknown"
            );
            return 0;
        }
        self.names.push(name.to_string());
        (self.names.len() - 1) as u32
    }

    pub fn name(&self, index: u32) -> &str {
        self.names
            .get(index as usize)
            .map(String::as_str)
            .unwrap_or(UNKNOWN)
    }

    /// Every (index, name), unknown first.
    pub fn all(&self) -> impl Iterator<Item = (u32, &str)> {
        self.names
            .iter()
            .enumerate()
            .map(|(i, n)| (i as u32, n.as_str()))
    }
}

/// One refresh's view of the lab.
#[derive(Debug, Clone, Default)]
pub struct Attribution {
    /// A lab state was read (otherwise everything is unknown and the scheduler probes track
    /// all tasks).
    pub has_lab: bool,
    /// Process (tgid) -> component index.
    pub by_tgid: HashMap<u32, u32>,
    /// Thread id -> component index, for the kernel's `tracked` map.
    pub by_tid: HashMap<u32, u32>,
    /// Listening port -> (lab address if any, component).
    pub by_port: HashMap<u16, Vec<(Option<IpAddr>, u32)>>,
    /// Local endpoint of a socket held by a component's process.
    pub by_socket: HashMap<(IpAddr, u16), u32>,
    /// Lab address -> component.
    pub by_address: HashMap<IpAddr, u32>,
}

impl Attribution {
    /// Builds the view from a state file and `/proc`; `scan_sockets` enables the socket scan.
    pub fn build(
        state: &LabState,
        registry: &mut Registry,
        cgroup_root: &Path,
        scan_sockets: bool,
    ) -> Attribution {
        let mut a = Attribution {
            has_lab: true,
            ..Attribution::default()
        };
        // Processes whose children must be found through the host's process tree: those the
        // state names that are not in one of their component's cgroups (a cgroup already lists
        // every process in it, children included, so the walk over every /proc/PID/stat on
        // the host is skipped when each named process is in its cgroup).
        let mut outside_cgroups: Vec<(u32, Vec<u32>)> = Vec::new();
        for c in &state.components {
            let idx = registry.index(&c.name);
            let named: Vec<u32> = c
                .pid
                .into_iter()
                .chain(c.aux_pids.iter().copied())
                .collect();
            let mut in_cgroups: HashSet<u32> = HashSet::new();
            for path in &c.cgroups {
                for dir in procfs::cgroup_dirs(path, cgroup_root) {
                    in_cgroups.extend(procfs::cgroup_procs(&dir));
                }
            }
            for &pid in named.iter().chain(&in_cgroups) {
                a.by_tgid.entry(pid).or_insert(idx);
            }
            let outside: Vec<u32> = named
                .into_iter()
                .filter(|p| !in_cgroups.contains(p))
                .collect();
            if !outside.is_empty() {
                outside_cgroups.push((idx, outside));
            }
            for &port in &c.ports {
                a.by_port.entry(port).or_default().push((c.address, idx));
            }
            if let Some(addr) = c.address {
                a.by_address.insert(addr, idx);
            }
        }
        if !outside_cgroups.is_empty() {
            let parents = procfs::parents();
            for (idx, roots) in &outside_cgroups {
                for pid in procfs::with_descendants(roots, &parents) {
                    a.by_tgid.entry(pid).or_insert(*idx);
                }
            }
        }
        for (&tgid, &idx) in &a.by_tgid {
            for tid in procfs::threads(tgid) {
                a.by_tid.insert(tid, idx);
            }
        }
        if scan_sockets {
            a.scan_sockets();
        }
        a
    }

    fn scan_sockets(&mut self) {
        let mut tables: HashMap<u64, HashMap<u64, (IpAddr, u16)>> = HashMap::new();
        let mut found = Vec::new();
        // A component with its own lab address (its own network namespace) is found by
        // address: its sockets need no scan.
        let addressed: HashSet<u32> = self
            .by_address
            .iter()
            .filter(|(a, _)| !a.is_loopback() && !a.is_unspecified())
            .map(|(_, &idx)| idx)
            .collect();
        for (&tgid, &idx) in &self.by_tgid {
            if addressed.contains(&idx) {
                continue;
            }
            let inodes = procfs::socket_inodes(tgid);
            if inodes.is_empty() {
                continue;
            }
            let Some(ns) = procfs::netns_inode(tgid) else {
                continue;
            };
            let table = tables
                .entry(ns)
                .or_insert_with(|| procfs::tcp_sockets(tgid));
            for inode in inodes {
                if let Some(ep) = table.get(&inode) {
                    found.push((*ep, idx));
                }
            }
        }
        for (ep, idx) in found {
            self.by_socket.entry(ep).or_insert(idx);
        }
    }

    pub fn component_of_tgid(&self, tgid: u32) -> Option<u32> {
        (tgid != 0)
            .then(|| self.by_tgid.get(&tgid).copied())
            .flatten()
    }

    /// The component that owns a local TCP endpoint.
    pub fn component_of_local(&self, addr: Option<IpAddr>, port: u16) -> Option<u32> {
        if port != 0 {
            if let Some(owners) = self.by_port.get(&port) {
                let hit = owners.iter().find(|(a, _)| match (a, addr) {
                    (None, _) | (_, None) => true,
                    (Some(want), Some(have)) => {
                        *want == have || have.is_loopback() || have.is_unspecified()
                    }
                });
                if let Some((_, idx)) = hit {
                    return Some(*idx);
                }
            }
            if let Some(addr) = addr {
                if let Some(idx) = self.by_socket.get(&(addr, port)) {
                    return Some(*idx);
                }
                let any = if addr.is_ipv4() {
                    IpAddr::from([0u8; 4])
                } else {
                    IpAddr::from([0u16; 8])
                };
                if let Some(idx) = self.by_socket.get(&(any, port)) {
                    return Some(*idx);
                }
            }
        }
        addr.and_then(|a| self.by_address.get(&a).copied())
    }

    /// A TCP event: by the socket's process when known, else by the local endpoint, else by
    /// the kernel-side component (0 = unknown).
    pub fn tcp(&self, tgid: u32, local: Option<IpAddr>, local_port: u16) -> u32 {
        self.component_of_tgid(tgid)
            .or_else(|| self.component_of_local(local, local_port))
            .unwrap_or(0)
    }

    /// Every process the view attributes (for the kernel filter's bookkeeping).
    pub fn tgids(&self) -> HashSet<u32> {
        self.by_tgid.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::LabComponent;

    #[test]
    fn registry_indices_are_stable_and_bounded() {
        let mut r = Registry::default();
        assert_eq!(r.index("postgres"), 1);
        assert_eq!(r.index("rabbitmq"), 2);
        assert_eq!(r.index("postgres"), 1);
        assert_eq!(r.name(2), "rabbitmq");
        assert_eq!(r.name(99), UNKNOWN);
        for i in 0..100 {
            r.index(&format!("c{i}"));
        }
        assert_eq!(r.index("one-too-many"), 0);
    }

    #[test]
    fn processes_threads_and_endpoints_are_attributed() {
        let me = std::process::id();
        let state = LabState {
            components: vec![
                LabComponent {
                    name: "order-gateway".into(),
                    pid: Some(me),
                    ports: vec![8080],
                    ..LabComponent::default()
                },
                LabComponent {
                    name: "matching-engine".into(),
                    ports: vec![8081],
                    address: Some("198.18.0.3".parse().unwrap()),
                    ..LabComponent::default()
                },
            ],
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut reg = Registry::default();
        let a = Attribution::build(&state, &mut reg, Path::new("/nonexistent"), true);
        let gw = reg.index("order-gateway");
        let me_idx = reg.index("matching-engine");
        assert_eq!(a.component_of_tgid(me), Some(gw));
        assert!(!a.by_tid.is_empty() && a.by_tid.values().all(|&c| c == gw));
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(a.component_of_local(Some(lo), 8080), Some(gw));
        assert_eq!(
            a.component_of_local(Some("198.18.0.3".parse().unwrap()), 8081),
            Some(me_idx)
        );
        assert_eq!(
            a.component_of_local(Some("198.18.0.3".parse().unwrap()), 40000),
            Some(me_idx),
            "by lab address"
        );
        assert_eq!(
            a.component_of_local(Some(lo), port),
            Some(gw),
            "by socket scan"
        );
        assert_eq!(a.tcp(0, Some("10.0.0.1".parse().unwrap()), 1), 0);
        drop(listener);
    }
}
