//! Small readers of `/proc` and `/sys` for attribution: the process tree, threads, cgroup
//! membership, sockets owned by a process, block device names.
//!
//! Every reader tolerates processes vanishing mid-scan (they return what they could read).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

/// Where the cgroup v1 hierarchies are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

fn numeric_entries(dir: &Path) -> Vec<u32> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Parent pid of every process: pid -> ppid.
pub fn parents() -> HashMap<u32, u32> {
    let mut out = HashMap::new();
    for pid in numeric_entries(Path::new("/proc")) {
        if let Some(ppid) = read_ppid(pid) {
            out.insert(pid, ppid);
        }
    }
    out
}

/// Field 4 of `/proc/PID/stat`.
pub fn read_ppid(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_ppid(&stat)
}

fn parse_stat_ppid(stat: &str) -> Option<u32> {
    // The command name is in parentheses and may contain anything, so split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// `roots` and all their descendants, from a `parents()` table.
pub fn with_descendants(roots: &[u32], parents: &HashMap<u32, u32>) -> HashSet<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for (&pid, &ppid) in parents {
        children.entry(ppid).or_default().push(pid);
    }
    let mut out = HashSet::new();
    let mut todo: Vec<u32> = roots.to_vec();
    while let Some(p) = todo.pop() {
        if out.insert(p)
            && let Some(c) = children.get(&p)
        {
            todo.extend(c);
        }
    }
    out
}

/// Thread ids of a process (empty if it is gone).
pub fn threads(pid: u32) -> Vec<u32> {
    numeric_entries(&PathBuf::from(format!("/proc/{pid}/task")))
}

/// Whether a task (thread or process) exists.
pub fn task_exists(tid: u32) -> bool {
    Path::new(&format!("/proc/{tid}")).exists()
}

/// The thread group of a task: `Tgid:` of `/proc/TID/status`.
pub fn tgid_of(tid: u32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// `/proc/PID/comm` without the newline.
pub fn comm(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_string())
}

/// The directories a lab cgroup path names: itself if absolute, else the path under every
/// mounted hierarchy of `root` that has it.
pub fn cgroup_dirs(path: &str, root: &Path) -> Vec<PathBuf> {
    let p = Path::new(path);
    if p.is_absolute() {
        return if p.is_dir() {
            vec![p.to_owned()]
        } else {
            Vec::new()
        };
    }
    let Ok(rd) = fs::read_dir(root) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path().join(p))
        .filter(|d| d.is_dir())
        .collect();
    out.sort();
    out
}

/// Processes in a cgroup directory (`cgroup.procs`).
pub fn cgroup_procs(dir: &Path) -> Vec<u32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Socket inodes among a process's file descriptors.
pub fn socket_inodes(pid: u32) -> Vec<u64> {
    let Ok(rd) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    rd.filter_map(|e| {
        let target = fs::read_link(e.ok()?.path()).ok()?;
        let t = target.to_str()?;
        t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
    })
    .collect()
}

/// The network namespace of a process, as the inode `/proc/PID/ns/net` points to.
pub fn netns_inode(pid: u32) -> Option<u64> {
    let target = fs::read_link(format!("/proc/{pid}/ns/net")).ok()?;
    target
        .to_str()?
        .strip_prefix("net:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// TCP sockets of the network namespace `pid` lives in: inode -> local address and port.
pub fn tcp_sockets(pid: u32) -> HashMap<u64, (IpAddr, u16)> {
    let mut out = HashMap::new();
    for file in ["tcp", "tcp6"] {
        if let Ok(text) = fs::read_to_string(format!("/proc/{pid}/net/{file}")) {
            out.extend(parse_proc_net_tcp(&text));
        }
    }
    out
}

/// Parses `/proc/net/tcp` or `tcp6`: inode -> local endpoint.
pub fn parse_proc_net_tcp(text: &str) -> HashMap<u64, (IpAddr, u16)> {
    let mut out = HashMap::new();
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 10 {
            continue;
        }
        let Some((addr_hex, port_hex)) = cols[1].split_once(':') else {
            continue;
        };
        let (Some(addr), Ok(port), Ok(inode)) = (
            parse_hex_addr(addr_hex),
            u16::from_str_radix(port_hex, 16),
            cols[9].parse::<u64>(),
        ) else {
            continue;
        };
        if inode != 0 {
            out.insert(inode, (addr, port));
        }
    }
    out
}

/// `/proc/net/tcp` prints addresses as 32-bit words in host (little-endian) order.
fn parse_hex_addr(hex: &str) -> Option<IpAddr> {
    let word = |s: &str| u32::from_str_radix(s, 16).ok().map(u32::to_le_bytes);
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(hex)?))),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(&hex[i * 8..i * 8 + 8])?);
            }
            let v6 = Ipv6Addr::from(b);
            Some(
                v6.to_ipv4_mapped()
                    .map(IpAddr::V4)
                    .unwrap_or(IpAddr::V6(v6)),
            )
        }
        _ => None,
    }
}

/// A block device's name (`vda`, `nvme0n1`) from `/sys/dev/block/MAJ:MIN`, else `MAJ:MIN`.
pub fn block_device_name(major: u32, minor: u32) -> String {
    let uevent = fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/uevent"));
    uevent
        .ok()
        .and_then(|u| {
            u.lines()
                .find_map(|l| l.strip_prefix("DEVNAME="))
                .map(str::to_string)
        })
        .unwrap_or_else(|| format!("{major}:{minor}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ppid_survives_odd_command_names() {
        assert_eq!(
            parse_stat_ppid("123 (a) b (c)) S 77 123 123 0 -1"),
            Some(77)
        );
        let me = std::process::id();
        assert!(read_ppid(me).is_some());
        assert!(threads(me).contains(&me));
        assert_eq!(tgid_of(me), Some(me));
    }

    #[test]
    fn descendants_follow_the_tree() {
        let parents: HashMap<u32, u32> = [(2, 1), (3, 2), (4, 2), (5, 9)].into_iter().collect();
        let mut d: Vec<u32> = with_descendants(&[2], &parents).into_iter().collect();
        d.sort();
        assert_eq!(d, vec![2, 3, 4]);
    }

    #[test]
    fn parses_proc_net_tcp() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0
   1: F00012C6:9C40 F10012C6:1538 01 00000000:00000000 00:00000000 00000000     0        0 777 1 0000000000000000 100 0 0 10 0";
        let t = parse_proc_net_tcp(v4);
        assert_eq!(t[&12345], ("127.0.0.1".parse().unwrap(), 8080));
        assert_eq!(t[&777], ("198.18.0.240".parse().unwrap(), 40000));
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 999 1 0000000000000000 100 0 0 10 0
   1: 0000000000000000FFFF00000100007F:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 998 1 0000000000000000 100 0 0 10 0";
        let t = parse_proc_net_tcp(v6);
        assert_eq!(t[&999], ("::1".parse().unwrap(), 8080));
        assert_eq!(t[&998], ("127.0.0.1".parse().unwrap(), 80));
    }
}
