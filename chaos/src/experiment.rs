//! Experiments as data: the TOML schema of `chaos/experiments/*.toml` and its validation.
//!
//! ```toml
//! name = "network-partition"
//! description = "Cut order-gateway <-> matching-engine under load."
//! hold_s = 30                       # how long the fault stays
//!
//! [hypothesis]                      # what must hold for the verdict "held"
//! max_p99_ms = 1500                 # acknowledged-order p99 over the whole run
//! max_error_rate = 0.0              # errors (5xx, shed, timeouts) / orders
//! max_lost = 0
//! max_duplicated = 0
//! max_detection_s = 1.0             # optional: injection -> first order queued or failing
//! max_first_success_s = 0.5         # optional: heal -> first order answered 201
//! max_recovery_s = 2.0              # optional: heal -> p99 back near baseline, queues drained
//! expect_queued = true              # optional: orders were answered 202 during the fault
//!
//! [load]
//! rate = 30                         # orders/s, open model
//! baseline_s = 10
//! recovery_s = 15                   # load keeps running this long after the heal
//!
//! [quick]                           # `--quick` overrides (CI)
//! hold_s = 10
//! baseline_s = 5
//! recovery_s = 8
//!
//! [[faults]]
//! kind = "partition"                # see FaultSpec
//! from = "order-gateway"
//! to = "matching-engine"
//! direction = "both"
//!
//! [abort]                           # heal early when the run goes too far
//! max_error_rate = 0.5
//! for_s = 5
//!
//! [evidence]
//! probes = true                     # kernel evidence from the eBPF agent, when it runs
//! profile = "matching-engine"       # CPU profile before vs during the fault
//! offcpu = "matching-engine"        # off-CPU stacks (eBPF) before vs during; default: `profile`
//! capacity = true                   # full runs: capacity search before and during the fault
//! ```

use lab::Component;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    pub name: String,
    pub description: String,
    /// How long the faults stay applied, in seconds (a fault may end earlier by itself, e.g.
    /// an OOM kill or a crash).
    pub hold_s: f64,
    pub hypothesis: Hypothesis,
    pub load: LoadSpec,
    #[serde(default)]
    pub quick: Option<Quick>,
    pub faults: Vec<FaultSpec>,
    #[serde(default)]
    pub abort: Option<Abort>,
    #[serde(default)]
    pub evidence: Evidence,
}

/// What must hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hypothesis {
    pub max_p99_ms: f64,
    pub max_error_rate: f64,
    #[serde(default)]
    pub max_lost: u64,
    #[serde(default)]
    pub max_duplicated: u64,
    #[serde(default)]
    pub max_detection_s: Option<f64>,
    #[serde(default)]
    pub max_first_success_s: Option<f64>,
    #[serde(default)]
    pub max_recovery_s: Option<f64>,
    #[serde(default)]
    pub expect_queued: bool,
}

/// The load the experiment runs under.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadSpec {
    pub rate: f64,
    pub baseline_s: f64,
    pub recovery_s: f64,
    #[serde(default = "default_symbols")]
    pub symbols: Vec<String>,
}

fn default_symbols() -> Vec<String> {
    ["AAPL", "MSFT", "GOOG", "AMZN", "TSLA"]
        .map(String::from)
        .to_vec()
}

/// Shorter phases for `--quick` (CI).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quick {
    pub hold_s: Option<f64>,
    pub baseline_s: Option<f64>,
    pub recovery_s: Option<f64>,
}

/// Heal early when the errors pass a bound for a while.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Abort {
    pub max_error_rate: f64,
    pub for_s: f64,
}

/// What evidence to capture.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Evidence {
    /// Kernel evidence from the probes agent, when it runs.
    #[serde(default = "yes")]
    pub probes: bool,
    /// A component to CPU-profile during the baseline and during the fault.
    #[serde(default)]
    pub profile: Option<String>,
    /// A component whose off-CPU stacks the eBPF agent records during the baseline and during
    /// the fault (needs `probes`); unset: the `profile` component. Unlike a CPU profile, this
    /// costs the component nothing (the work is in the kernel and the agent), so it suits a
    /// component whose CPU the fault takes away.
    #[serde(default)]
    pub offcpu: Option<String>,
    /// Full runs only: search the highest sustainable rate (`loadgen capacity`) before the
    /// fault and while it holds, to show the headroom the fault takes away.
    #[serde(default)]
    pub capacity: bool,
}

fn yes() -> bool {
    true
}

/// Which way a partition cuts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    /// Neither side hears the other.
    Both,
    /// `from` cannot reach `to` (its packets to `to` are dropped); `to`'s packets still arrive.
    OneWay,
}

/// One fault.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum FaultSpec {
    /// iptables DROP between two components, inside their network namespaces.
    Partition {
        from: String,
        to: String,
        #[serde(default = "both")]
        direction: Direction,
        #[serde(default)]
        at_s: f64,
    },
    /// iptables random DROP (`-m statistic --probability`) between two components.
    PacketLoss {
        from: String,
        to: String,
        probability: f64,
        #[serde(default)]
        at_s: f64,
    },
    /// cgroup v1 CFS quota: the target gets `cpu_percent` % of one CPU.
    CpuLimit {
        target: String,
        cpu_percent: f64,
        #[serde(default)]
        at_s: f64,
    },
    /// cgroup v1 memory limit lowered towards current usage until the kernel OOM-kills the
    /// target; healed (limit removed) as soon as the kill happens so the restart succeeds.
    MemorySqueeze {
        target: String,
        #[serde(default)]
        at_s: f64,
    },
    /// cgroup v1 blkio throttle on the disk holding the target's data.
    DiskIo {
        target: String,
        #[serde(default)]
        read_bps: Option<u64>,
        #[serde(default)]
        write_bps: Option<u64>,
        #[serde(default)]
        read_iops: Option<u64>,
        #[serde(default)]
        write_iops: Option<u64>,
        #[serde(default)]
        at_s: f64,
    },
    /// The lab stops the target and holds it down; the heal starts it again.
    Stop {
        target: String,
        #[serde(default)]
        at_s: f64,
    },
    /// A signal to the target: `KILL` (the lab restarts it), or `STOP` (healed with `CONT`).
    Signal {
        target: String,
        signal: String,
        #[serde(default)]
        at_s: f64,
    },
}

fn both() -> Direction {
    Direction::Both
}

impl FaultSpec {
    /// Seconds after injection at which this fault is applied.
    pub fn at_s(&self) -> f64 {
        match self {
            FaultSpec::Partition { at_s, .. }
            | FaultSpec::PacketLoss { at_s, .. }
            | FaultSpec::CpuLimit { at_s, .. }
            | FaultSpec::MemorySqueeze { at_s, .. }
            | FaultSpec::DiskIo { at_s, .. }
            | FaultSpec::Stop { at_s, .. }
            | FaultSpec::Signal { at_s, .. } => *at_s,
        }
    }

    /// The `fault` label of `chaos_fault_active`.
    pub fn kind(&self) -> &'static str {
        match self {
            FaultSpec::Partition { .. } => "partition",
            FaultSpec::PacketLoss { .. } => "packet_loss",
            FaultSpec::CpuLimit { .. } => "cpu_limit",
            FaultSpec::MemorySqueeze { .. } => "memory_squeeze",
            FaultSpec::DiskIo { .. } => "disk_io",
            FaultSpec::Stop { .. } => "stop",
            FaultSpec::Signal { .. } => "signal",
        }
    }

    /// The `target` label: a component, or an edge `a->b`.
    pub fn target(&self) -> String {
        match self {
            FaultSpec::Partition { from, to, .. } | FaultSpec::PacketLoss { from, to, .. } => {
                format!("{from}->{to}")
            }
            FaultSpec::CpuLimit { target, .. }
            | FaultSpec::MemorySqueeze { target, .. }
            | FaultSpec::DiskIo { target, .. }
            | FaultSpec::Stop { target, .. }
            | FaultSpec::Signal { target, .. } => target.clone(),
        }
    }

    /// Whether the fault needs root (namespaces, iptables, cgroups).
    pub fn needs_root(&self) -> bool {
        !matches!(self, FaultSpec::Stop { .. } | FaultSpec::Signal { .. })
    }

    /// One line for people.
    pub fn describe(&self) -> String {
        match self {
            FaultSpec::Partition {
                from,
                to,
                direction,
                ..
            } => format!(
                "partition {from} {} {to} (iptables DROP)",
                if *direction == Direction::Both {
                    "<->"
                } else {
                    "->"
                }
            ),
            FaultSpec::PacketLoss {
                from,
                to,
                probability,
                ..
            } => {
                format!(
                    "drop {:.0}% of packets {from} <-> {to}",
                    probability * 100.0
                )
            }
            FaultSpec::CpuLimit {
                target,
                cpu_percent,
                ..
            } => {
                format!("limit {target} to {cpu_percent}% of a CPU (cfs quota)")
            }
            FaultSpec::MemorySqueeze { target, .. } => {
                format!("lower {target}'s memory limit until the kernel OOM-kills it")
            }
            FaultSpec::DiskIo {
                target,
                read_bps,
                write_bps,
                read_iops,
                write_iops,
                ..
            } => {
                let mut parts = Vec::new();
                if let Some(b) = write_bps {
                    parts.push(format!("writes {b} B/s"));
                }
                if let Some(b) = read_bps {
                    parts.push(format!("reads {b} B/s"));
                }
                if let Some(n) = write_iops {
                    parts.push(format!("{n} write IOPS"));
                }
                if let Some(n) = read_iops {
                    parts.push(format!("{n} read IOPS"));
                }
                format!("throttle {target}'s disk: {} (blkio)", parts.join(", "))
            }
            FaultSpec::Stop { target, .. } => format!("stop {target} and hold it down"),
            FaultSpec::Signal { target, signal, .. } => format!("send SIG{signal} to {target}"),
        }
    }

    fn components(&self) -> Vec<&str> {
        match self {
            FaultSpec::Partition { from, to, .. } | FaultSpec::PacketLoss { from, to, .. } => {
                vec![from, to]
            }
            FaultSpec::CpuLimit { target, .. }
            | FaultSpec::MemorySqueeze { target, .. }
            | FaultSpec::DiskIo { target, .. }
            | FaultSpec::Stop { target, .. }
            | FaultSpec::Signal { target, .. } => vec![target],
        }
    }
}

/// Phase lengths after `--quick` and overrides.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    pub baseline_s: f64,
    pub hold_s: f64,
    pub recovery_s: f64,
}

impl Experiment {
    /// Parses and validates an experiment file, naming the file and the problem.
    pub fn load(path: &Path) -> anyhow::Result<Experiment> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading experiment {}: {e}", path.display()))?;
        Experiment::parse(&text).map_err(|e| anyhow::anyhow!("experiment {}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Experiment> {
        let e: Experiment = toml::from_str(text)?;
        e.validate()?;
        Ok(e)
    }

    /// Checks ranges and that every component named exists.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.faults.is_empty(),
            "faults: at least one fault is needed"
        );
        anyhow::ensure!(self.hold_s > 0.0, "hold_s must be positive");
        anyhow::ensure!(self.load.rate > 0.0, "load.rate must be positive");
        anyhow::ensure!(
            self.load.baseline_s >= 1.0,
            "load.baseline_s must be at least 1"
        );
        anyhow::ensure!(
            self.load.recovery_s >= 1.0,
            "load.recovery_s must be at least 1"
        );
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.hypothesis.max_error_rate),
            "hypothesis.max_error_rate must be between 0 and 1"
        );
        for f in &self.faults {
            for c in f.components() {
                c.parse::<Component>().map_err(|_| {
                    anyhow::anyhow!(
                        "faults: unknown component {c:?} (known: postgres, rabbitmq, matching-engine, persistence, order-gateway)"
                    )
                })?;
            }
            anyhow::ensure!(
                f.at_s() >= 0.0 && f.at_s() < self.hold_s,
                "faults: at_s must be within hold_s"
            );
            if let FaultSpec::PacketLoss { probability, .. } = f {
                anyhow::ensure!(
                    (0.0..=1.0).contains(probability),
                    "faults: probability must be between 0 and 1"
                );
            }
            if let FaultSpec::CpuLimit { cpu_percent, .. } = f {
                anyhow::ensure!(
                    *cpu_percent >= 1.0 && *cpu_percent <= 200.0,
                    "faults: cpu_percent must be between 1 and 200"
                );
            }
            if let FaultSpec::Signal { signal, .. } = f {
                anyhow::ensure!(
                    matches!(signal.as_str(), "KILL" | "STOP" | "TERM"),
                    "faults: signal must be KILL, STOP or TERM"
                );
            }
        }
        if let Some(p) = &self.evidence.profile {
            p.parse::<Component>()
                .map_err(|_| anyhow::anyhow!("evidence.profile: unknown component {p:?}"))?;
        }
        if let Some(o) = &self.evidence.offcpu {
            o.parse::<Component>()
                .map_err(|_| anyhow::anyhow!("evidence.offcpu: unknown component {o:?}"))?;
            anyhow::ensure!(
                self.evidence.probes,
                "evidence.offcpu needs evidence.probes = true (the eBPF agent records it)"
            );
            if let Some(p) = &self.evidence.profile {
                anyhow::ensure!(
                    p == o,
                    "evidence.offcpu ({o}) and evidence.profile ({p}) must name the same component"
                );
            }
        }
        Ok(())
    }

    /// Phase lengths for a run.
    pub fn timing(&self, quick: bool, hold_override: Option<f64>) -> Timing {
        let q = self.quick.as_ref().filter(|_| quick);
        Timing {
            baseline_s: q.and_then(|q| q.baseline_s).unwrap_or(self.load.baseline_s),
            hold_s: hold_override
                .or_else(|| q.and_then(|q| q.hold_s))
                .unwrap_or(self.hold_s),
            recovery_s: q.and_then(|q| q.recovery_s).unwrap_or(self.load.recovery_s),
        }
    }

    /// Whether any fault needs root.
    pub fn needs_root(&self) -> bool {
        self.faults.iter().any(FaultSpec::needs_root)
    }
}

/// The built-in experiments, compiled in (the files under `chaos/experiments/`).
pub const BUILT_IN: &[(&str, &str)] = &[
    (
        "network-partition",
        include_str!("../experiments/network-partition.toml"),
    ),
    (
        "cpu-throttle",
        include_str!("../experiments/cpu-throttle.toml"),
    ),
    ("oom-kill", include_str!("../experiments/oom-kill.toml")),
    ("disk-io", include_str!("../experiments/disk-io.toml")),
    ("cascade", include_str!("../experiments/cascade.toml")),
    ("flamegraph", include_str!("../experiments/flamegraph.toml")),
    (
        "packet-loss",
        include_str!("../experiments/packet-loss.toml"),
    ),
    ("db-outage", include_str!("../experiments/db-outage.toml")),
    (
        "broker-outage",
        include_str!("../experiments/broker-outage.toml"),
    ),
    (
        "engine-crash",
        include_str!("../experiments/engine-crash.toml"),
    ),
];

/// A built-in experiment by name, or a file path.
pub fn find(name_or_path: &str) -> anyhow::Result<Experiment> {
    if let Some((_, text)) = BUILT_IN.iter().find(|(n, _)| *n == name_or_path) {
        return Experiment::parse(text)
            .map_err(|e| anyhow::anyhow!("built-in experiment {name_or_path}: {e}"));
    }
    let path = Path::new(name_or_path);
    if path.exists() {
        return Experiment::load(path);
    }
    anyhow::bail!(
        "no experiment {name_or_path:?}: not a built-in ({}) nor a file",
        BUILT_IN
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_built_in_parses_and_is_named_after_its_file() {
        for (name, text) in BUILT_IN {
            let e = Experiment::parse(text).unwrap_or_else(|err| panic!("{name}: {err}"));
            assert_eq!(&e.name, name);
            let q = e.timing(true, None);
            assert!(
                q.hold_s <= e.hold_s && q.baseline_s <= e.load.baseline_s,
                "{name}"
            );
        }
        assert_eq!(BUILT_IN.len(), 10);
    }

    #[test]
    fn bad_experiments_are_refused_with_the_reason() {
        let base = BUILT_IN[0].1;
        let e = Experiment::parse(&base.replace("order-gateway", "gatewya")).unwrap_err();
        assert!(e.to_string().contains("gatewya"), "{e}");
        let e = Experiment::parse(&format!("{base}\nsurprise = 1\n")).unwrap_err();
        assert!(e.to_string().contains("surprise"), "{e}");
        assert!(find("no-such-experiment").is_err());
    }

    #[test]
    fn offcpu_evidence_needs_the_probes_and_the_profiled_component() {
        let throttle = BUILT_IN
            .iter()
            .find(|(n, _)| *n == "cpu-throttle")
            .expect("cpu-throttle")
            .1;
        let e = Experiment::parse(throttle).expect("parses");
        assert_eq!(e.evidence.offcpu.as_deref(), Some("matching-engine"));
        let no_probes = throttle.replace("probes = true", "probes = false");
        let err = Experiment::parse(&no_probes).unwrap_err();
        assert!(err.to_string().contains("evidence.probes"), "{err}");
        let other = throttle.replace(
            "offcpu = \"matching-engine\"",
            "offcpu = \"matching-engine\"\nprofile = \"order-gateway\"",
        );
        let err = Experiment::parse(&other).unwrap_err();
        assert!(err.to_string().contains("same component"), "{err}");
        let unknown = throttle.replace("offcpu = \"matching-engine\"", "offcpu = \"engin\"");
        let err = Experiment::parse(&unknown).unwrap_err();
        assert!(err.to_string().contains("engin"), "{err}");
    }
}
