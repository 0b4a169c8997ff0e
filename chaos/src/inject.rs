//! Fault injectors behind one trait. The local backend works on the native lab: iptables
//! inside a component's network namespace, cgroup v1 files, and the lab supervisor's control
//! socket for stops and signals. (A Docker backend would implement the same trait with
//! `docker network disconnect`, `docker update --cpus`, ...)
//!
//! Every injector records each change in the [`Journal`] before making it and marks it
//! reverted after undoing it, so an interrupted run can always be cleaned up.

use crate::experiment::{Direction, FaultSpec};
use crate::journal::{Change, Journal};
use crate::target::Stack;
use anyhow::{Context, bail};
use lab::Component;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What an injector needs from the world.
pub struct Env<'a> {
    pub stack: &'a Stack,
    pub journal: &'a mut Journal,
}

/// What happened on a tick of a running fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tick {
    /// Still in effect.
    Holding,
    /// The fault did what it came for and healed itself (e.g. the OOM kill happened and the
    /// memory limit is lifted again so the restart can succeed).
    Done(String),
}

/// A fault: applied at injection, ticked while it holds, healed at the end.
pub trait Injector: Send {
    /// One line for people and reports.
    fn describe(&self) -> String;
    /// Applies the fault. On error, whatever was applied is journaled and healed by `heal`.
    fn apply(&mut self, env: &mut Env<'_>) -> anyhow::Result<()>;
    /// Called about every 100 ms while the fault holds.
    fn tick(&mut self, _env: &mut Env<'_>) -> anyhow::Result<Tick> {
        Ok(Tick::Holding)
    }
    /// Undoes the fault (idempotent).
    fn heal(&mut self, env: &mut Env<'_>) -> anyhow::Result<()>;
}

/// The local backend's injector for a fault spec; `index` keeps chain names apart.
pub fn local(spec: &FaultSpec, index: usize) -> anyhow::Result<Box<dyn Injector>> {
    let comp = |name: &str| -> anyhow::Result<Component> {
        name.parse::<Component>()
            .map_err(|_| anyhow::anyhow!("unknown component {name:?}"))
    };
    Ok(match spec {
        FaultSpec::Partition {
            from,
            to,
            direction,
            ..
        } => Box::new(Iptables {
            from: comp(from)?,
            to: comp(to)?,
            both_ends: *direction == Direction::Both,
            probability: None,
            chain: format!("SXCHAOS{index}"),
            ids: Vec::new(),
        }),
        FaultSpec::PacketLoss {
            from,
            to,
            probability,
            ..
        } => Box::new(Iptables {
            from: comp(from)?,
            to: comp(to)?,
            both_ends: false,
            probability: Some(*probability),
            chain: format!("SXCHAOS{index}"),
            ids: Vec::new(),
        }),
        FaultSpec::CpuLimit {
            target,
            cpu_percent,
            ..
        } => Box::new(CpuLimit {
            target: comp(target)?,
            percent: *cpu_percent,
            id: None,
        }),
        FaultSpec::MemorySqueeze { target, .. } => Box::new(MemorySqueeze {
            target: comp(target)?,
            id: None,
            path: None,
            kills_before: 0,
            done: false,
        }),
        FaultSpec::DiskIo {
            target,
            read_bps,
            write_bps,
            read_iops,
            write_iops,
            ..
        } => Box::new(DiskIo {
            target: comp(target)?,
            limits: [
                ("blkio.throttle.read_bps_device", *read_bps),
                ("blkio.throttle.write_bps_device", *write_bps),
                ("blkio.throttle.read_iops_device", *read_iops),
                ("blkio.throttle.write_iops_device", *write_iops),
            ]
            .into_iter()
            .filter_map(|(f, v)| v.map(|v| (f, v)))
            .collect(),
            ids: Vec::new(),
        }),
        FaultSpec::Stop { target, .. } => Box::new(Stop {
            target: comp(target)?,
            id: None,
        }),
        FaultSpec::Signal { target, signal, .. } => Box::new(Signal {
            target: comp(target)?,
            signal: signal.clone(),
            id: None,
        }),
    })
}

/// Runs `ip netns exec <ns> <args...>`, naming the command in any error.
pub fn netns_exec(ns: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .with_context(|| format!("running ip netns exec {ns} {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "ip netns exec {ns} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Removes a chain and its jumps (idempotent: missing pieces are fine).
pub fn remove_chain(ns: &str, chain: &str) {
    for hook in ["INPUT", "OUTPUT"] {
        while netns_exec(ns, &["iptables", "-w", "-D", hook, "-j", chain]).is_ok() {}
    }
    let _ = netns_exec(ns, &["iptables", "-w", "-F", chain]);
    let _ = netns_exec(ns, &["iptables", "-w", "-X", chain]);
}

fn netns_and_address(stack: &Stack, c: Component) -> anyhow::Result<(String, String)> {
    let s = stack.component(c)?;
    let ns = s
        .netns
        .clone()
        .with_context(|| format!("{c} has no network namespace (is the lab isolated?)"))?;
    let addr = s
        .address
        .with_context(|| format!("{c} has no lab address"))?
        .to_string();
    Ok((ns, addr))
}

/// Partition and packet loss: a chain in a component's namespace, hooked from INPUT and
/// OUTPUT, dropping (all or a random share of) the packets to and from the peer.
struct Iptables {
    from: Component,
    to: Component,
    /// Also cut at the peer's end (a two-way partition).
    both_ends: bool,
    probability: Option<f64>,
    chain: String,
    ids: Vec<(u64, String)>,
}

impl Iptables {
    fn cut(
        &mut self,
        env: &mut Env<'_>,
        at: Component,
        peer: Component,
        inbound: bool,
    ) -> anyhow::Result<()> {
        let (ns, _) = netns_and_address(env.stack, at)?;
        let (_, peer_addr) = netns_and_address(env.stack, peer)?;
        let id = env.journal.record(Change::IptablesChain {
            netns: ns.clone(),
            chain: self.chain.clone(),
        })?;
        self.ids.push((id, ns.clone()));
        netns_exec(&ns, &["iptables", "-w", "-N", &self.chain])?;
        let p = self.probability.map(|p| format!("{p:.4}"));
        let rule = |addr_flag: &str| -> anyhow::Result<()> {
            let mut args = vec!["iptables", "-w", "-A", &self.chain, addr_flag, &peer_addr];
            if let Some(p) = &p {
                args.extend(["-m", "statistic", "--mode", "random", "--probability", p]);
            }
            args.extend(["-j", "DROP"]);
            netns_exec(&ns, &args).map(|_| ())
        };
        rule("-d")?;
        if inbound {
            rule("-s")?;
        }
        netns_exec(
            &ns,
            &["iptables", "-w", "-I", "OUTPUT", "1", "-j", &self.chain],
        )?;
        if inbound {
            netns_exec(
                &ns,
                &["iptables", "-w", "-I", "INPUT", "1", "-j", &self.chain],
            )?;
        }
        Ok(())
    }
}

impl Injector for Iptables {
    fn describe(&self) -> String {
        match self.probability {
            Some(p) => format!(
                "drop {:.0}% of packets {} <-> {}",
                p * 100.0,
                self.from,
                self.to
            ),
            None if self.both_ends => format!("partition {} <-> {}", self.from, self.to),
            None => format!("partition {} -> {}", self.from, self.to),
        }
    }

    fn apply(&mut self, env: &mut Env<'_>) -> anyhow::Result<()> {
        let (from, to) = (self.from, self.to);
        // Packet loss and two-way partitions cut both directions at `from`; a two-way
        // partition also cuts at `to`, so neither side hears the other.
        let inbound = self.both_ends || self.probability.is_some();
        self.cut(env, from, to, inbound)?;
        if self.both_ends {
            self.cut(env, to, from, true)?;
        }
        Ok(())
    }

    fn heal(&mut self, env: &mut Env<'_>) -> anyhow::Result<()> {
        for (id, ns) in self.ids.drain(..).rev() {
            remove_chain(&ns, &self.chain);
            env.journal.reverted(id)?;
        }
        Ok(())
    }
}

fn cgroup_dir(stack: &Stack, c: Component, controller: &str) -> anyhow::Result<PathBuf> {
    stack
        .component(c)?
        .cgroup
        .get(controller)
        .cloned()
        .with_context(|| format!("{c} has no {controller} cgroup (is the lab isolated?)"))
}

fn read_trim(path: &Path) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .to_owned())
}

fn write(path: &Path, value: &str) -> anyhow::Result<()> {
    std::fs::write(path, value).with_context(|| format!("writing {value:?} to {}", path.display()))
}

/// Records and writes one cgroup file; returns the journal id.
fn cgroup_set(env: &mut Env<'_>, path: &Path, value: &str, restore: String) -> anyhow::Result<u64> {
    let id = env.journal.record(Change::CgroupWrite {
        path: path.to_owned(),
        restore,
    })?;
    write(path, value)?;
    Ok(id)
}

fn cgroup_restore(env: &mut Env<'_>, id: u64) -> anyhow::Result<()> {
    if let Some((_, Change::CgroupWrite { path, restore })) =
        env.journal.pending().into_iter().find(|(i, _)| *i == id)
    {
        write(&path, &restore)?;
        env.journal.reverted(id)?;
    }
    Ok(())
}

/// CPU: `cpu.cfs_quota_us = period × percent / 100`.
struct CpuLimit {
    target: Component,
    percent: f64,
    id: Option<u64>,
}

impl Injector for CpuLimit {
    fn describe(&self) -> String {
        format!("limit {} to {}% of a CPU", self.target, self.percent)
    }

    fn apply(&mut self, env: &mut Env<'_>) -> anyhow::Result<()> {
        let dir = cgroup_dir(env.stack, self.target, "cpu")?;
        let period: f64 = read_trim(&dir.join("cpu.cfs_period_us"))?
            .parse()
            .unwrap_or(100_000.0);
        let quota = ((period * self.percent / 100.0) as u64).max(1000);
        let file = dir.join("cpu.cfs_quota_us");
        let previous = read_trim(&file)?;
        self.id = Some(cgroup_set(env, &file, &quota.to_string(), previous)?);
        Ok(())
    }

    fn heal(&mut self, env: &mut Env<'_>) -> anyhow::Result<()> {
        if let Some(id) = self.id.take() {
            cgroup_restore(env, id)?;
        }
        Ok(())
    }
}

/// Memory: the limit follows usage down until the kernel OOM-kills the target; then the limit
/// is lifted at once so that the lab's restart succeeds.
struct MemorySqueeze {
    target: Component,
    id: Option<u64>,
    path: Option<PathBuf>,
    kills_before: u64,
    done: bool,
}

fn oom_kills(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("memory.oom_control"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("oom_kill "))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

impl Injector for MemorySqueeze {
    fn describe(&self) -> String {
        format!(
            "squeeze {}'s memory limit until the kernel OOM-kills it",
            self.target
        )
    }

    fn apply(&mut self, env: &mut Env<'_>) -> anyhow::Result<()> {
        let dir = cgroup_dir(env.stack, self.target, "memory")?;
        self.kills_before = oom_kills(&dir);
        let file = dir.join("memory.limit_in_bytes");
        let previous = read_trim(&file)?;
        let usage: u64 = read_trim(&dir.join("memory.usage_in_bytes"))?
            .parse()
            .unwrap_or(0);
        self.id = Some(cgroup_set(
            env,
            &file,
            &(usage + (1 << 20)).to_string(),
            previous,
        )?);
        self.path = Some(dir);
        Ok(())
    }

    fn tick(&mut self, env: &mut Env<'_>) -> anyhow::Result<Tick> {
        let Some(dir) = self.path.clone() else {
            return Ok(Tick::Holding);
        };
        if self.done {
            return Ok(Tick::Done("OOM kill".into()));
        }
        let kills = oom_kills(&dir);
        if kills > self.kills_before {
            self.heal(env)?;
            self.done = true;
            return Ok(Tick::Done(format!(
                "the kernel OOM-killed {} ({} kill(s) in its cgroup); limit lifted",
                self.target,
                kills - self.kills_before
            )));
        }
        // Follow usage down: 1 MiB below it (the kernel reclaims what it can, EBUSY when it
        // cannot), else exactly at it, so the next allocation of anonymous memory has nowhere
        // to go.
        let usage: u64 = read_trim(&dir.join("memory.usage_in_bytes"))?
            .parse()
            .unwrap_or(0);
        let file = dir.join("memory.limit_in_bytes");
        if write(
            &file,
            &usage.saturating_sub(1 << 20).max(1 << 20).to_string(),
        )
        .is_err()
        {
            let _ = write(&file, &usage.to_string());
        }
        Ok(Tick::Holding)
    }

    fn heal(&mut self, env: &mut Env<'_>) -> anyhow::Result<()> {
        if let Some(id) = self.id.take() {
            cgroup_restore(env, id)?;
        }
        Ok(())
    }
}

/// The `MAJ:MIN` of the whole disk holding `path` (blkio throttles whole devices).
pub fn disk_of(path: &Path) -> anyhow::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .dev();
    let major = ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff);
    let minor = ((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff);
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    if sys.join("partition").exists() {
        // A partition: throttle its disk.
        if let Ok(parent) = std::fs::canonicalize(sys.join("..")) {
            return read_trim(&parent.join("dev"));
        }
    }
    if !sys.exists() {
        bail!(
            "{} is on device {major}:{minor}, which is not a block device (tmpfs or overlay?): blkio cannot throttle it",
            path.display()
        );
    }
    Ok(format!("{major}:{minor}"))
}

/// Disk: blkio throttle rules for the disk holding the target's data directory.
struct DiskIo {
    target: Component,
    limits: Vec<(&'static str, u64)>,
    ids: Vec<u64>,
}

impl Injector for DiskIo {
    fn describe(&self) -> String {
        let parts: Vec<String> = self
            .limits
            .iter()
            .map(|(f, v)| {
                format!(
                    "{}={v}",
                    f.trim_start_matches("blkio.throttle.")
                        .trim_end_matches("_device")
                )
            })
            .collect();
        format!("throttle {}'s disk ({})", self.target, parts.join(", "))
    }

    fn apply(&mut self, env: &mut Env<'_>) -> anyhow::Result<()> {
        let dir = cgroup_dir(env.stack, self.target, "blkio")?;
        let data = env.stack.component(self.target)?.data_dir.clone();
        let disk = disk_of(&data)?;
        for (file, value) in self.limits.clone() {
            let path = dir.join(file);
            // Writing `MAJ:MIN 0` removes the rule again.
            let id = cgroup_set(env, &path, &format!("{disk} {value}"), format!("{disk} 0"))?;
            self.ids.push(id);
        }
        Ok(())
    }

    fn heal(&mut self, env: &mut Env<'_>) -> anyhow::Result<()> {
        for id in self.ids.drain(..).rev() {
            cgroup_restore(env, id)?;
        }
        Ok(())
    }
}

/// Stop: the lab stops the component and holds it down; the heal starts it and waits until
/// it is ready.
struct Stop {
    target: Component,
    id: Option<u64>,
}

impl Injector for Stop {
    fn describe(&self) -> String {
        format!("stop {} and hold it down", self.target)
    }

    fn apply(&mut self, env: &mut Env<'_>) -> anyhow::Result<()> {
        self.id = Some(env.journal.record(Change::ComponentHeld {
            component: self.target,
        })?);
        env.stack.stop(self.target)
    }

    fn heal(&mut self, env: &mut Env<'_>) -> anyhow::Result<()> {
        if let Some(id) = self.id.take() {
            env.stack.start(self.target)?;
            env.journal.reverted(id)?;
        }
        Ok(())
    }
}

/// Signal: KILL (the lab restarts the component: nothing to heal) or STOP (healed with CONT).
struct Signal {
    target: Component,
    signal: String,
    id: Option<u64>,
}

impl Injector for Signal {
    fn describe(&self) -> String {
        format!("SIG{} {}", self.signal, self.target)
    }

    fn apply(&mut self, env: &mut Env<'_>) -> anyhow::Result<()> {
        if self.signal == "STOP" {
            self.id = Some(env.journal.record(Change::ComponentFrozen {
                component: self.target,
            })?);
        }
        env.stack.signal(self.target, &self.signal)
    }

    fn heal(&mut self, env: &mut Env<'_>) -> anyhow::Result<()> {
        if let Some(id) = self.id.take() {
            env.stack.signal(self.target, "CONT")?;
            env.journal.reverted(id)?;
        }
        Ok(())
    }
}

/// Undoes one journaled change (used by `chaos cleanup` and before every run).
pub fn revert(stack: &Stack, change: &Change) -> anyhow::Result<()> {
    match change {
        Change::IptablesChain { netns, chain } => {
            if Path::new("/run/netns").join(netns).exists() {
                remove_chain(netns, chain);
            }
            Ok(())
        }
        Change::CgroupWrite { path, restore } => {
            if path.exists() {
                write(path, restore)?;
            }
            Ok(())
        }
        Change::ComponentHeld { component } => stack.start(*component),
        Change::ComponentFrozen { component } => stack.signal(*component, "CONT"),
    }
}

/// Reverts everything the journal still lists, newest first; returns what was reverted.
pub fn cleanup(stack: &Stack, journal: &mut Journal) -> anyhow::Result<Vec<String>> {
    let mut done = Vec::new();
    for (id, change) in journal.pending().into_iter().rev() {
        revert(stack, &change).with_context(|| format!("reverting {change:?}"))?;
        journal.reverted(id)?;
        done.push(format!("{change:?}"));
    }
    Ok(done)
}
