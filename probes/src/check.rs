//! `probes check`: what this host offers the agent, and why not when it does not.
//!
//! Checks privileges (root or CAP_BPF + CAP_PERFMON), BTF, tracefs, each tracepoint (exists,
//! and its fields sit where the programs expect them), the BPF statistics switch, and, when
//! privileged, a real load and attach of every probe (the verifier's verdict).

use std::path::Path;

use serde::Serialize;

use crate::kernel::{Kernel, LoadError, PROBES};
use crate::tracefs::Tracefs;

/// Exit code when privileges are missing (`EX_NOPERM` from sysexits.h).
pub const EXIT_NO_PERMISSION: i32 = 77;

const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
    /// Privileges allow loading eBPF.
    pub privileged: bool,
    /// The agent would run (possibly with fewer probes).
    pub can_run: bool,
}

impl Report {
    /// 0 when everything is available, 77 without privileges, 1 when something else is not.
    pub fn exit_code(&self) -> i32 {
        if !self.privileged {
            EXIT_NO_PERMISSION
        } else if self.checks.iter().all(|c| c.ok) {
            0
        } else {
            1
        }
    }

    /// Human-readable lines: `ok   name   detail` / `FAIL name   detail`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for c in &self.checks {
            let mark = if c.ok { "ok  " } else { "FAIL" };
            out.push_str(&format!("{mark} {:<36} {}\n", c.name, c.detail));
        }
        out.push_str(if self.can_run && self.checks.iter().all(|c| c.ok) {
            "result: every probe is available\n"
        } else if self.can_run {
            "result: the agent can run, without the probes marked FAIL\n"
        } else {
            "result: the agent cannot run here; the lab runs without kernel probes\n"
        });
        out
    }
}

/// Effective capabilities from `/proc/self/status`.
pub fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

fn has(caps: u64, cap: u32) -> bool {
    caps & (1u64 << cap) != 0
}

/// `None` when this process may load and attach tracepoint programs, else why not (one line).
pub fn privilege_problem() -> Option<String> {
    let uid = nix::unistd::geteuid();
    let caps = effective_caps();
    let bpf = has(caps, CAP_SYS_ADMIN) || (has(caps, CAP_BPF) && has(caps, CAP_PERFMON));
    if bpf {
        return None;
    }
    let mut missing = Vec::new();
    if !has(caps, CAP_BPF) {
        missing.push("CAP_BPF");
    }
    if !has(caps, CAP_PERFMON) {
        missing.push("CAP_PERFMON");
    }
    Some(format!(
        "cannot load eBPF programs: running as uid {uid} without {} (run as root, or grant CAP_BPF, CAP_PERFMON and CAP_DAC_READ_SEARCH)",
        missing.join(" and ")
    ))
}

fn describe_caps(caps: u64) -> String {
    let names: Vec<&str> = [
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
        (CAP_BPF, "CAP_BPF"),
        (CAP_PERFMON, "CAP_PERFMON"),
        (CAP_DAC_READ_SEARCH, "CAP_DAC_READ_SEARCH"),
    ]
    .iter()
    .filter(|(c, _)| has(caps, *c))
    .map(|(_, n)| *n)
    .collect();
    if names.is_empty() {
        "none of CAP_SYS_ADMIN, CAP_BPF, CAP_PERFMON".into()
    } else {
        names.join(" ")
    }
}

fn sysctl(name: &str) -> Option<String> {
    let path = format!("/proc/sys/{}", name.replace('.', "/"));
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// Runs every check; `load` also loads and attaches the programs when privileged.
pub fn run(load: bool) -> Report {
    let mut checks = Vec::new();
    let mut push = |name: &str, ok: bool, detail: String| {
        checks.push(Check {
            name: name.to_string(),
            ok,
            detail,
        })
    };

    let problem = privilege_problem();
    let privileged = problem.is_none();
    let uid = nix::unistd::geteuid();
    push(
        "privileges",
        privileged,
        match &problem {
            None => format!("uid {uid}, effective {}", describe_caps(effective_caps())),
            Some(why) => why.clone(),
        },
    );

    let release = sysctl("kernel.osrelease").unwrap_or_else(|| "unknown".into());
    push("kernel", true, format!("Linux {release}"));

    let btf = Path::new(crate::kernel::BTF_PATH);
    match std::fs::metadata(btf) {
        Ok(m) => push(
            "btf",
            true,
            format!("{} ({} KiB)", btf.display(), m.len() / 1024),
        ),
        Err(e) => push(
            "btf",
            false,
            format!(
                "{}: {e} (without it retransmits are counted per packet, not per segment)",
                btf.display()
            ),
        ),
    }

    let tracefs = match Tracefs::find() {
        Some(t) => {
            push("tracefs", true, format!("mounted at {}", t.root.display()));
            Some(t)
        }
        None if uid.is_root() => match Tracefs::find_or_mount() {
            Ok(t) => {
                push(
                    "tracefs",
                    true,
                    format!("was not mounted; mounted it at {}", t.root.display()),
                );
                Some(t)
            }
            Err(e) => {
                push("tracefs", false, e);
                None
            }
        },
        None => {
            let why = Tracefs::why_missing();
            let hint = if why.contains("not mounted") {
                ", and mounting it needs root"
            } else {
                ""
            };
            push("tracefs", false, format!("{why}{hint}"));
            None
        }
    };

    let mut any_tracepoint = false;
    for probe in PROBES {
        for (_, tp) in probe.programs {
            let name = format!("tracepoint {}", tp.id());
            let Some(t) = &tracefs else {
                push(&name, false, "tracefs unavailable".into());
                continue;
            };
            match (t.id(tp), t.verify(tp)) {
                (Ok(id), Ok(found)) => {
                    any_tracepoint = true;
                    let extra = if found.absent_optional.is_empty() {
                        String::new()
                    } else {
                        format!(
                            ", optional fields absent: {}",
                            found.absent_optional.join(", ")
                        )
                    };
                    push(
                        &name,
                        true,
                        format!(
                            "id {id}, layout matches ({} fields checked{extra}) [{}]",
                            tp.fields.len(),
                            probe.name
                        ),
                    );
                }
                (Err(e), _) | (_, Err(e)) => push(&name, false, format!("{e} [{}]", probe.name)),
            }
        }
    }

    match sysctl("kernel.bpf_stats_enabled") {
        Some(v) => push(
            "kernel.bpf_stats_enabled",
            true,
            format!("{v} (`probes run --bpf-stats` turns run-time statistics on while it runs)"),
        ),
        None => push(
            "kernel.bpf_stats_enabled",
            false,
            "not present: probes_program_run_seconds_total is unavailable".into(),
        ),
    }

    let mut loaded_any = !load;
    if load && privileged && tracefs.is_some() {
        match Kernel::load(None, false, true) {
            Ok(k) => {
                for s in k.status() {
                    loaded_any |= s.attached;
                    push(
                        &format!("probe {}", s.probe),
                        s.attached,
                        if s.attached {
                            format!("loads, passes the verifier and attaches ({})", s.detail)
                        } else {
                            s.detail.clone()
                        },
                    );
                }
            }
            Err(LoadError::Permission(why)) => push("probes", false, why),
            Err(LoadError::Other(e)) => push("probes", false, format!("{e:#}")),
        }
    } else if load {
        push(
            "probes",
            false,
            "not loaded: needs privileges and tracefs (see above)".into(),
        );
    }

    if load && privileged {
        match crate::offcpu::check() {
            Ok(()) => push(
                "offcpu",
                true,
                "loads and passes the verifier (tp_btf/sched_switch, attached only during a capture: probes offcpu, GET /debug/offcpu)".into(),
            ),
            Err(e) => push("offcpu", false, format!("off-CPU stacks unavailable: {e}")),
        }
    }

    let can_run = privileged && tracefs.is_some() && any_tracepoint && loaded_any;
    Report {
        checks,
        privileged,
        can_run,
    }
}
