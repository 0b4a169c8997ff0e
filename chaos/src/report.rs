//! The experiment report: `report.json` (schema `chaos.report/v1`, documented in
//! `docs/chaos.md`), `report.md`, a self-contained `report.html` with the charts inline, and
//! `junit.xml` (one test case per hypothesis check) for CI.

use crate::analysis::Measurements;
use crate::charts::{self, Frame, Mark};
use loadgen::audit::AuditReport;
use loadgen::capacity::CapacityReport;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::Path;

/// Schema name and version of `report.json`.
pub const REPORT_SCHEMA: &str = "chaos.report/v1";

/// How the run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Every check of the hypothesis held (exit 0).
    Held,
    /// At least one check failed (exit 1).
    NotHeld,
    /// The fault could not be injected (exit 2).
    NotInjected,
    /// The run left kernel state behind (exit 3).
    CleanupFailed,
}

impl Verdict {
    pub fn exit_code(self) -> i32 {
        match self {
            Verdict::Held => 0,
            Verdict::NotHeld => 1,
            Verdict::NotInjected => 2,
            Verdict::CleanupFailed => 3,
        }
    }

    pub fn headline(self) -> &'static str {
        match self {
            Verdict::Held => "HYPOTHESIS HELD",
            Verdict::NotHeld => "HYPOTHESIS DID NOT HOLD",
            Verdict::NotInjected => "FAULT COULD NOT BE INJECTED",
            Verdict::CleanupFailed => "CLEANUP LEFT STATE BEHIND",
        }
    }
}

/// One check of the hypothesis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub bound: String,
    pub measured: String,
    pub passed: bool,
}

/// A phase of the run, in unix ms.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Phase {
    pub name: String,
    pub start_ms: u64,
    pub end_ms: u64,
}

/// A fault as it happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultRecord {
    pub kind: String,
    pub target: String,
    pub description: String,
    pub applied_ms: Option<u64>,
    pub ended_ms: Option<u64>,
    /// What happened (e.g. "the kernel OOM-killed persistence"), or why it failed.
    pub note: Option<String>,
}

/// What the kernel showed, from the eBPF agent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KernelEvidence {
    pub available: bool,
    /// Why not, or what it covers.
    pub note: String,
    /// Counter increases during the fault window, by series (`metric{labels}`).
    pub during: Vec<(String, f64)>,
    /// Run-queue wait p99 (ms) of each fault target, before and during the fault.
    pub runqueue_p99_ms: Vec<(String, f64, f64)>,
    /// Events (`connect_failed`, `retransmit_burst`, `reset`, `oom_kill`) from the fault window.
    pub events: Vec<serde_json::Value>,
}

/// Flamegraphs captured before and during the fault.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Profiles {
    pub component: String,
    pub baseline_svg: Option<String>,
    pub fault_svg: Option<String>,
    pub differential_svg: Option<String>,
    /// Off-CPU flamegraphs (the eBPF agent's `/debug/offcpu`), when the lab runs the agent.
    #[serde(default)]
    pub offcpu_baseline_svg: Option<String>,
    #[serde(default)]
    pub offcpu_fault_svg: Option<String>,
    #[serde(default)]
    pub offcpu_differential_svg: Option<String>,
    pub note: Option<String>,
}

impl Profiles {
    /// (what, file) of every flamegraph that was drawn.
    pub fn files(&self) -> Vec<(&'static str, &str)> {
        [
            ("CPU, baseline", &self.baseline_svg),
            ("CPU, during the fault", &self.fault_svg),
            ("CPU, differential", &self.differential_svg),
            ("off-CPU, baseline", &self.offcpu_baseline_svg),
            ("off-CPU, during the fault", &self.offcpu_fault_svg),
            ("off-CPU, differential", &self.offcpu_differential_svg),
        ]
        .into_iter()
        .filter_map(|(what, f)| Some((what, f.as_deref()?)))
        .collect()
    }
}

/// `report.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub schema: String,
    pub experiment: String,
    pub description: String,
    pub quick: bool,
    pub started_unix_ms: u64,
    pub verdict: Verdict,
    pub exit_code: i32,
    /// Why the verdict is what it is, in sentences.
    pub reasons: Vec<String>,
    pub rate_per_sec: f64,
    pub faults: Vec<FaultRecord>,
    pub phases: Vec<Phase>,
    pub hypothesis: Vec<Check>,
    pub measurements: Measurements,
    pub audit: Option<AuditReport>,
    pub kernel: KernelEvidence,
    pub capacity_before: Option<CapacityReport>,
    pub capacity_during: Option<CapacityReport>,
    pub profiles: Option<Profiles>,
    /// Changes reverted at the end, and kernel state that differs from the preflight snapshot.
    pub reverted: Vec<String>,
    pub leftovers: Vec<String>,
    pub load_summary: Option<loadgen::stats::Summary>,
}

fn fmt_opt(v: Option<f64>, unit: &str) -> String {
    v.map_or_else(|| "—".to_owned(), |v| format!("{v:.3} {unit}"))
}

impl Report {
    fn frame(&self) -> Frame {
        let start = self
            .phases
            .iter()
            .find(|p| p.name == "baseline")
            .map_or(self.started_unix_ms, |p| p.start_ms);
        let rel = |ms: u64| ms.saturating_sub(start) as f64 / 1000.0;
        let fault = self
            .phases
            .iter()
            .find(|p| p.name == "hold")
            .map_or((0.0, 0.0), |p| (rel(p.start_ms), rel(p.end_ms)));
        let end = self
            .phases
            .iter()
            .find(|p| p.name == "recover")
            .map_or(fault.1 + 1.0, |p| rel(p.end_ms));
        Frame {
            end_s: end,
            fault,
            marks: self
                .phases
                .iter()
                .filter(|p| matches!(p.name.as_str(), "inject" | "heal"))
                .map(|p| Mark {
                    t_s: rel(p.start_ms),
                    label: p.name.clone(),
                })
                .collect(),
        }
    }

    /// The charts as SVG strings (empty on a drawing error, which the HTML then says).
    pub fn charts(&self) -> Vec<(String, Result<String, String>)> {
        let f = self.frame();
        let m = &self.measurements;
        let mut out = vec![
            (
                "throughput".to_owned(),
                charts::throughput(&f, &m.per_second),
            ),
            ("latency".to_owned(), charts::latency(&f, &m.per_second)),
            ("queues".to_owned(), charts::queues(&f, &m.queues)),
        ];
        if let Some(k) = charts::kernel(&f, &m.queues) {
            out.push(("kernel".to_owned(), k));
        }
        out
    }

    /// `report.md`.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let m = &self.measurements;
        let _ = writeln!(
            s,
            "# Chaos experiment `{}`: {}\n",
            self.experiment,
            self.verdict.headline()
        );
        let _ = writeln!(s, "{}\n", self.description);
        let _ = writeln!(
            s,
            "Mode: {} · load {} orders/s · exit code {}\n",
            if self.quick { "quick" } else { "full" },
            self.rate_per_sec,
            self.exit_code
        );
        for r in &self.reasons {
            let _ = writeln!(s, "- {r}");
        }
        let _ = writeln!(
            s,
            "\n## Hypothesis\n\n| check | bound | measured | |\n|---|---|---|---|"
        );
        for c in &self.hypothesis {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} |",
                c.name,
                c.bound,
                c.measured,
                if c.passed { "✅" } else { "❌" }
            );
        }
        let _ = writeln!(s, "\n## Faults\n");
        for f in &self.faults {
            let _ = writeln!(
                s,
                "- **{}** on `{}`: {}{}",
                f.kind,
                f.target,
                f.description,
                f.note
                    .as_ref()
                    .map(|n| format!(" — {n}"))
                    .unwrap_or_default()
            );
        }
        let _ = writeln!(
            s,
            "\n## Measurements\n\n| | before | during | after |\n|---|---|---|---|"
        );
        let row = |s: &mut String, name: &str, f: &dyn Fn(&crate::analysis::Window) -> String| {
            let _ = writeln!(
                s,
                "| {name} | {} | {} | {} |",
                f(&m.baseline),
                f(&m.during),
                f(&m.after)
            );
        };
        row(&mut s, "orders", &|w| w.orders.to_string());
        row(&mut s, "p50 (ms)", &|w| format!("{:.2}", w.p50_ms));
        row(&mut s, "p99 (ms)", &|w| format!("{:.2}", w.p99_ms));
        row(&mut s, "max (ms)", &|w| format!("{:.2}", w.max_ms));
        row(&mut s, "201 / 202", &|w| {
            format!("{} / {}", w.accepted, w.queued)
        });
        row(&mut s, "errors", &|w| {
            format!("{} ({:.2}%)", w.errors, w.error_rate * 100.0)
        });
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "- time to detect (first order a client saw fail, queue or slow down): {}",
            fmt_opt(m.detection_s, "s")
        );
        let _ = writeln!(
            s,
            "- time for the system to detect (first order queued by the gateway): {}",
            fmt_opt(m.system_detection_s, "s")
        );
        let _ = writeln!(
            s,
            "- time to first success after the fault ended: {}",
            fmt_opt(m.first_success_s, "s")
        );
        let _ = writeln!(
            s,
            "- time to full recovery (p99 ≤ {:.2} ms, queues drained): {}",
            m.recovery_bound_ms,
            fmt_opt(m.full_recovery_s, "s")
        );
        let _ = writeln!(
            s,
            "- latency inflation (p99 during / before): {:.1}×",
            m.latency_inflation
        );
        let _ = writeln!(
            s,
            "- peaks: retry queue {:.0}, outbox lag {:.0} events, persistence lag {:.0} events; shed {}",
            m.peak_spool, m.peak_outbox_lag, m.peak_persistence_lag, m.shed
        );
        if let Some(a) = &self.audit {
            let _ = writeln!(s, "\n## Audit\n\n```\n{}```", a.table());
        }
        let _ = writeln!(s, "\n## Kernel evidence (eBPF)\n\n{}", self.kernel.note);
        for (k, v) in &self.kernel.during {
            let _ = writeln!(s, "- {k}: +{v}");
        }
        for (c, before, during) in &self.kernel.runqueue_p99_ms {
            let _ = writeln!(
                s,
                "- run-queue wait p99 of {c}: {before:.2} ms before, {during:.2} ms during"
            );
        }
        for e in self.kernel.events.iter().take(10) {
            let _ = writeln!(s, "- event: {e}");
        }
        for (name, cap) in [
            ("before", &self.capacity_before),
            ("during", &self.capacity_during),
        ] {
            if let Some(c) = cap {
                let _ = writeln!(
                    s,
                    "\nCapacity {name} the fault: {:.0} orders/s ({:.1}× the {} orders/s baseline)",
                    c.sustainable_rate_per_sec, c.headroom, c.baseline_rate_per_sec
                );
            }
        }
        if let Some(p) = &self.profiles {
            let _ = writeln!(s, "\n## Profiles of {}\n", p.component);
            for (n, f) in p.files() {
                let _ = writeln!(s, "- {n}: [{f}]({f})");
            }
            if let Some(n) = &p.note {
                let _ = writeln!(s, "- {n}");
            }
        }
        let _ = writeln!(s, "\n## Timeline\n");
        let t0 = self.phases.first().map_or(0, |p| p.start_ms);
        for p in &self.phases {
            let _ = writeln!(
                s,
                "- {:>7.2} s → {:>7.2} s  {}",
                p.start_ms.saturating_sub(t0) as f64 / 1000.0,
                p.end_ms.saturating_sub(t0) as f64 / 1000.0,
                p.name
            );
        }
        let _ = writeln!(s, "\n## Cleanup\n");
        if self.leftovers.is_empty() {
            let _ = writeln!(
                s,
                "Kernel state matches the preflight snapshot (iptables rules and cgroup limits of every component)."
            );
        } else {
            for l in &self.leftovers {
                let _ = writeln!(s, "- LEFT BEHIND: {l}");
            }
        }
        s
    }

    /// `report.html`: self-contained (inline CSS and SVG, no external resources).
    pub fn html(&self) -> String {
        let esc = |t: &str| {
            t.replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;")
        };
        let mut h = String::new();
        let color = if self.verdict == Verdict::Held {
            "#2e8b57"
        } else {
            "#c81e1e"
        };
        let _ = write!(
            h,
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>chaos: {name}</title><style>\
             body{{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}}\
             .verdict{{font-size:1.6em;font-weight:bold;color:#fff;background:{color};padding:.5em 1em;border-radius:6px}}\
             table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}\
             .pass{{color:#2e8b57}}.fail{{color:#c81e1e;font-weight:bold}}pre{{background:#f6f6f6;padding:1em;overflow-x:auto}}\
             </style></head><body>",
            name = esc(&self.experiment)
        );
        let _ = write!(
            h,
            "<div class=\"verdict\">{} — {}</div>",
            esc(&self.experiment),
            self.verdict.headline()
        );
        let _ = write!(h, "<p>{}</p><ul>", esc(&self.description));
        for r in &self.reasons {
            let _ = write!(h, "<li>{}</li>", esc(r));
        }
        let _ = write!(
            h,
            "</ul><h2>Hypothesis</h2><table><tr><th>check</th><th>bound</th><th>measured</th><th></th></tr>"
        );
        for c in &self.hypothesis {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"{}\">{}</td></tr>",
                esc(&c.name),
                esc(&c.bound),
                esc(&c.measured),
                if c.passed { "pass" } else { "fail" },
                if c.passed { "held" } else { "FAILED" }
            );
        }
        let _ = write!(h, "</table><h2>Timeline</h2>");
        for (name, chart) in self.charts() {
            match chart {
                Ok(svg) => {
                    let _ = write!(h, "<figure id=\"{name}\">{svg}</figure>");
                }
                Err(e) => {
                    let _ = write!(h, "<p>chart {name} could not be drawn: {}</p>", esc(&e));
                }
            }
        }
        if let Some(p) = &self.profiles {
            let links: Vec<String> = p
                .files()
                .iter()
                .map(|(n, f)| format!("{}: <code>{}</code>", esc(n), esc(f)))
                .collect();
            // Named, not linked: the report stays self-contained; the files sit next to it.
            let _ = write!(
                h,
                "<h2>Flamegraphs of {}</h2><p>In this report's folder: {}</p>",
                esc(&p.component),
                links.join(" · ")
            );
            if let Some(n) = &p.note {
                let _ = write!(h, "<p>{}</p>", esc(n));
            }
        }
        let _ = write!(h, "<h2>Details</h2><pre>{}</pre>", esc(&self.markdown()));
        h.push_str("</body></html>\n");
        h
    }

    /// `junit.xml`: one test case per check.
    pub fn junit(&self) -> String {
        let esc = |t: &str| {
            t.replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;")
                .replace('"', "&quot;")
        };
        let failures = self.hypothesis.iter().filter(|c| !c.passed).count()
            + usize::from(matches!(
                self.verdict,
                Verdict::NotInjected | Verdict::CleanupFailed
            ));
        let mut x = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuite name=\"chaos.{}\" tests=\"{}\" failures=\"{}\">\n",
            esc(&self.experiment),
            self.hypothesis.len() + 1,
            failures
        );
        for c in &self.hypothesis {
            let _ = write!(
                x,
                "  <testcase classname=\"chaos.{}\" name=\"{}\">",
                esc(&self.experiment),
                esc(&c.name)
            );
            if !c.passed {
                let _ = write!(
                    x,
                    "<failure message=\"measured {} (bound {})\"/>",
                    esc(&c.measured),
                    esc(&c.bound)
                );
            }
            x.push_str("</testcase>\n");
        }
        let _ = write!(
            x,
            "  <testcase classname=\"chaos.{}\" name=\"injection and cleanup\">",
            esc(&self.experiment)
        );
        if matches!(self.verdict, Verdict::NotInjected | Verdict::CleanupFailed) {
            let _ = write!(
                x,
                "<failure message=\"{}\"/>",
                esc(&self.reasons.join("; "))
            );
        }
        x.push_str("</testcase>\n</testsuite>\n");
        x
    }

    /// Writes `report.json`, `report.md`, `report.html` and `junit.xml` into `dir`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        use anyhow::Context;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let put = |name: &str, text: String| {
            std::fs::write(dir.join(name), text)
                .with_context(|| format!("writing {}", dir.join(name).display()))
        };
        put("report.json", serde_json::to_string_pretty(self)? + "\n")?;
        put("report.md", self.markdown())?;
        put("report.html", self.html())?;
        put("junit.xml", self.junit())?;
        Ok(())
    }

    /// Reads `report.json` back (for `chaos report DIR`).
    pub fn read(dir: &Path) -> anyhow::Result<Report> {
        use anyhow::Context;
        let path = dir.join("report.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let r: Report = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a chaos report", path.display()))?;
        anyhow::ensure!(
            r.schema == REPORT_SCHEMA,
            "{}: schema {:?}, expected {REPORT_SCHEMA}",
            path.display(),
            r.schema
        );
        Ok(r)
    }
}
