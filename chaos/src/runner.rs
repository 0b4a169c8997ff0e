//! The runner: one experiment through fixed phases — preflight, baseline, inject, hold, heal,
//! recover, drain, audit, verify cleanup, report — each stamped on the timeline.
//!
//! The load runs from the start of the baseline to the end of the recovery window; the monitor
//! samples the stack every 200 ms throughout; faults are applied at their offsets after the
//! injection and ticked every 100 ms; the heal reverts them in reverse order. Whatever
//! happens — an injection error, an abort condition, SIGINT — the faults are healed, the audit
//! runs and a report is written.

use crate::analysis::{self, Marks};
use crate::experiment::{Experiment, Hypothesis};
use crate::exporter::Exporter;
use crate::inject::{self, Env, Injector, Tick};
use crate::journal::Journal;
use crate::monitor::{self, Sample};
use crate::report::{Check, FaultRecord, KernelEvidence, Phase, Report, Verdict};
use crate::snapshot;
use crate::target::Stack;
use crate::{now_ms, timestamp};
use anyhow::Context;
use lab::Component;
use loadgen::flow::FlowSpec;
use loadgen::run::{Live, RunSpec};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How to run.
#[derive(Debug, Clone)]
pub struct Options {
    pub lab_state: PathBuf,
    pub quick: bool,
    pub hold_s: Option<f64>,
    pub rate: Option<f64>,
    /// Reports go to `<reports_dir>/<time>-<experiment>/`.
    pub reports_dir: PathBuf,
    /// Where `chaos_fault_active` and `chaos_phase` are served for Prometheus.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// A finished run.
#[derive(Debug)]
pub struct Finished {
    pub dir: PathBuf,
    pub report: Report,
}

struct Timeline {
    phases: Vec<Phase>,
    current: Option<(String, u64)>,
    exporter: Option<Exporter>,
}

impl Timeline {
    fn enter(&mut self, name: &str) {
        let now = now_ms();
        if let Some((n, start)) = self.current.take() {
            self.phases.push(Phase {
                name: n,
                start_ms: start,
                end_ms: now,
            });
        }
        tracing::info!(phase = name, "chaos phase");
        eprintln!(
            "[{:>8}] {name}",
            timestamp(now).split('T').nth(1).unwrap_or_default()
        );
        if let Some(e) = &self.exporter {
            e.phase(name);
        }
        self.current = Some((name.to_owned(), now));
    }

    fn close(&mut self) {
        if let Some((n, start)) = self.current.take() {
            self.phases.push(Phase {
                name: n,
                start_ms: start,
                end_ms: now_ms(),
            });
        }
    }
}

/// Waits `secs`, or less if `cancel` flips to true. Returns false when cancelled.
async fn wait(secs: f64, cancel: &mut watch::Receiver<bool>) -> bool {
    if *cancel.borrow() {
        return false;
    }
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs_f64(secs.max(0.0))) => true,
        _ = cancel.wait_for(|c| *c) => false,
    }
}

async fn ready(client: &reqwest::Client, url: &str) -> Result<(), String> {
    match client.get(format!("{url}/readyz")).send().await {
        Ok(r) if r.status().is_success() => Ok(()),
        Ok(r) => Err(format!("answered {}", r.status())),
        Err(e) => Err(e.to_string()),
    }
}

/// Runs `exp` against the lab named in `opts`, until done or `cancel` becomes true (then it
/// heals, audits and reports early).
pub async fn run(
    exp: &Experiment,
    opts: &Options,
    mut cancel: watch::Receiver<bool>,
) -> anyhow::Result<Finished> {
    let started = now_ms();
    let timing = exp.timing(opts.quick, opts.hold_s);
    let rate = opts.rate.unwrap_or(exp.load.rate);
    let dir = opts.reports_dir.join(format!(
        "{}-{}",
        timestamp(started).replace([':', '-'], "").replace('T', "-"),
        exp.name
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let exporter =
        opts.metrics_addr
            .and_then(|addr| match Exporter::start(addr, &exp.name, &exp.faults) {
                Ok(e) => Some(e),
                Err(e) => {
                    tracing::warn!(error = %e, "not exporting chaos metrics");
                    None
                }
            });
    let mut t = Timeline {
        phases: Vec::new(),
        current: None,
        exporter,
    };
    let mut report = Report {
        schema: crate::report::REPORT_SCHEMA.into(),
        experiment: exp.name.clone(),
        description: exp.description.clone(),
        quick: opts.quick,
        started_unix_ms: started,
        verdict: Verdict::Held,
        exit_code: 0,
        reasons: Vec::new(),
        rate_per_sec: rate,
        faults: exp
            .faults
            .iter()
            .map(|f| FaultRecord {
                kind: f.kind().into(),
                target: f.target(),
                description: f.describe(),
                applied_ms: None,
                ended_ms: None,
                note: None,
            })
            .collect(),
        phases: Vec::new(),
        hypothesis: Vec::new(),
        measurements: Default::default(),
        audit: None,
        kernel: KernelEvidence::default(),
        capacity_before: None,
        capacity_during: None,
        profiles: None,
        reverted: Vec::new(),
        leftovers: Vec::new(),
        load_summary: None,
    };

    // ---- preflight
    t.enter("preflight");
    let stack = Stack::open(&opts.lab_state)?;
    let mut journal = Journal::open(&stack.state.root.join("chaos").join("journal.jsonl"))?;
    let leftovers =
        inject::cleanup(&stack, &mut journal).context("reverting what an earlier run left")?;
    for l in leftovers {
        report.reasons.push(format!(
            "reverted a change an earlier, interrupted run left: {l}"
        ));
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .context("HTTP client")?;
    let mut problem = if !stack.state.is_running() {
        Some(format!(
            "the lab at {} is not running: start it with `make demo` (or `target/release/lab up`)",
            stack.state.root.display()
        ))
    } else if exp.needs_root() {
        stack.isolation_problem()
    } else {
        None
    };
    if problem.is_none() {
        for c in [
            Component::OrderGateway,
            Component::MatchingEngine,
            Component::Persistence,
        ] {
            let url = stack.url(c)?;
            if let Err(e) = ready(&client, &url).await {
                problem = Some(format!("the stack is not healthy: {c} /readyz {e}"));
                break;
            }
        }
    }
    if let Some(problem) = problem {
        t.close();
        report.phases = t.phases;
        report.verdict = Verdict::NotInjected;
        report.exit_code = Verdict::NotInjected.exit_code();
        report.reasons.push(problem);
        report.write(&dir)?;
        return Ok(Finished { dir, report });
    }
    let before = snapshot::capture(&stack);

    // Full runs with capacity evidence: the headroom before the fault.
    let capacity_spec = |prefix: &str| loadgen::capacity::CapacitySpec {
        target: stack.url(Component::OrderGateway).unwrap_or_default(),
        start_rate: rate,
        factor: 2.0,
        max_rate: 20_000.0,
        step: Duration::from_secs(3),
        max_p99: Duration::from_millis(100),
        max_error_rate: 0.01,
        baseline_rate: rate,
        refine: 1,
        // Evidence only, next to the fault's own numbers: one quick pass.
        confirm: 0,
        symbols: exp.load.symbols.clone(),
        seed: 7,
        request_timeout: Duration::from_secs(5),
        max_in_flight: 10_000,
        batch: 1,
        client_id_prefix: format!("chaos-cap-{prefix}-{started}"),
    };
    let capacity = exp.evidence.capacity && !opts.quick;
    if capacity {
        t.enter("capacity-before");
        report.capacity_before = loadgen::capacity::search(&capacity_spec("before"), |_| {})
            .await
            .ok();
    }

    // ---- baseline: load and monitor start
    t.enter("baseline");
    let load_secs = timing.baseline_s + timing.hold_s + timing.recovery_s;
    let ledger = dir.join("ledger.jsonl");
    let live = Arc::new(Live::default());
    let (stop_load_tx, mut stop_load_rx) = watch::channel(false);
    let load_spec = RunSpec {
        target: stack.url(Component::OrderGateway)?,
        rate_per_sec: rate,
        duration: Duration::from_secs_f64(load_secs),
        flow: FlowSpec {
            seed: started,
            symbols: exp.load.symbols.clone(),
            cancel_share: 0.1,
            accounts: 50,
            client_id_prefix: format!("chaos-{}-{started}", exp.name),
        },
        ledger: Some(ledger.clone()),
        summary: Some(dir.join("load-summary.json")),
        request_timeout: Duration::from_secs(10),
        max_in_flight: 10_000,
        batch: 1,
        progress: false,
    };
    let load_start_ms = now_ms();
    let load = tokio::spawn(loadgen::run::run_watched(
        load_spec,
        async move {
            let _ = stop_load_rx.wait_for(|s| *s).await;
        },
        live.clone(),
    ));
    // Outside experiments the agent attaches its run-queue and block I/O programs only part
    // of the time (docs/probes.md, "Sampling"); hold them for the whole run so the kernel
    // evidence covers every second of it. The hold outlives a run that fails on the way.
    let sampling_hold_s = (timing.baseline_s + timing.hold_s + timing.recovery_s + 120.0).ceil();
    monitor::hold_kernel_sampling(&stack, sampling_hold_s as u64).await;
    let (stop_monitor_tx, mut stop_monitor_rx) = watch::channel(false);
    let monitor = tokio::spawn(monitor::watch(
        stack.clone(),
        Duration::from_millis(200),
        async move {
            let _ = stop_monitor_rx.wait_for(|s| *s).await;
        },
    ));
    let cpu_target = exp
        .evidence
        .profile
        .as_ref()
        .and_then(|p| p.parse::<Component>().ok());
    // Off-CPU stacks (eBPF agent) over the same windows: the named component, else the
    // profiled one, when the experiment asks for kernel evidence.
    let offcpu_target = exp
        .evidence
        .offcpu
        .as_ref()
        .and_then(|p| p.parse::<Component>().ok())
        .or(cpu_target)
        .filter(|_| exp.evidence.probes);
    let profile_target = cpu_target.or(offcpu_target);
    let profile_secs = (timing.baseline_s - 2.0)
        .min(timing.hold_s - 2.0)
        .clamp(1.0, 10.0);
    let spawn_profiles = |c: Component, phase: &'static str| {
        let cpu = cpu_target.map(|_| {
            let (stack, dir) = (stack.clone(), dir.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                crate::profile::capture(&stack, c, profile_secs, &dir.join(phase)).await
            })
        });
        let off_cpu = offcpu_target.map(|_| {
            let (stack, dir) = (stack.clone(), dir.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                crate::profile::capture_offcpu(&stack, c, profile_secs, &dir.join(phase)).await
            })
        });
        (cpu, off_cpu)
    };
    let baseline_profile = profile_target.map(|c| spawn_profiles(c, "baseline"));
    let mut interrupted = !wait(timing.baseline_s, &mut cancel).await;

    // ---- inject and hold
    let mut injectors: Vec<(usize, Box<dyn Injector>)> = Vec::new();
    for (i, f) in exp.faults.iter().enumerate() {
        injectors.push((i, inject::local(f, i)?));
    }
    let mut applied = vec![false; injectors.len()];
    let mut ended: Vec<Option<u64>> = vec![None; injectors.len()];
    let mut injection_failed = None;
    let inject_ms = now_ms();
    let fault_profile = profile_target
        .filter(|_| !interrupted)
        .map(|c| spawn_profiles(c, "fault"));
    let capacity_during = (capacity && !interrupted).then(|| {
        let spec = capacity_spec("during");
        tokio::spawn(async move { loadgen::capacity::search(&spec, |_| {}).await })
    });
    if !interrupted {
        t.enter("inject");
        if let Some(e) = &t.exporter {
            e.faults_active(true);
        }
        t.enter("hold");
        let hold_start = Instant::now();
        let mut last_check = (
            Instant::now(),
            live.done.load(Ordering::Relaxed),
            live.errors.load(Ordering::Relaxed),
        );
        let mut bad_since: Option<Instant> = None;
        loop {
            let elapsed = hold_start.elapsed().as_secs_f64();
            let mut env = Env {
                stack: &stack,
                journal: &mut journal,
            };
            for (k, (i, inj)) in injectors.iter_mut().enumerate() {
                let f = &exp.faults[*i];
                if !applied[k] && injection_failed.is_none() && elapsed >= f.at_s() {
                    applied[k] = true;
                    let at = now_ms();
                    report.faults[*i].applied_ms = Some(at);
                    eprintln!("  inject: {}", inj.describe());
                    match inj.apply(&mut env) {
                        Ok(()) => {
                            if matches!(f, crate::experiment::FaultSpec::Signal { signal, .. } if signal != "STOP")
                            {
                                // A kill is over the moment it lands; the lab restarts the target.
                                ended[k] = Some(at);
                                report.faults[*i].ended_ms = Some(at);
                            }
                        }
                        Err(e) => {
                            report.faults[*i].note = Some(format!("could not inject: {e:#}"));
                            injection_failed = Some(format!("{}: {e:#}", inj.describe()));
                        }
                    }
                } else if applied[k] && ended[k].is_none() {
                    match inj.tick(&mut env) {
                        Ok(Tick::Holding) => {}
                        Ok(Tick::Done(note)) => {
                            let at = now_ms();
                            ended[k] = Some(at);
                            report.faults[*i].ended_ms = Some(at);
                            report.faults[*i].note = Some(note.clone());
                            eprintln!("  {note}");
                        }
                        Err(e) => tracing::warn!(error = %e, "fault tick failed"),
                    }
                }
            }
            if injection_failed.is_some() || elapsed >= timing.hold_s {
                break;
            }
            // Abort condition: error rate above the bound for `for_s` seconds.
            if let Some(abort) = &exp.abort
                && last_check.0.elapsed() >= Duration::from_millis(500)
            {
                let (done, errors) = (
                    live.done.load(Ordering::Relaxed),
                    live.errors.load(Ordering::Relaxed),
                );
                let rate_now = if done > last_check.1 {
                    (errors - last_check.2) as f64 / (done - last_check.1) as f64
                } else {
                    0.0
                };
                last_check = (Instant::now(), done, errors);
                if rate_now > abort.max_error_rate {
                    let since = *bad_since.get_or_insert_with(Instant::now);
                    if since.elapsed().as_secs_f64() >= abort.for_s {
                        report.reasons.push(format!(
                            "aborted: error rate {:.0}% above {:.0}% for {} s; healed early",
                            rate_now * 100.0,
                            abort.max_error_rate * 100.0,
                            abort.for_s
                        ));
                        break;
                    }
                } else {
                    bad_since = None;
                }
            }
            if !wait(0.1, &mut cancel).await {
                interrupted = true;
                break;
            }
        }
    }

    // ---- heal (always)
    t.enter("heal");
    let heal_ms = now_ms();
    {
        let mut env = Env {
            stack: &stack,
            journal: &mut journal,
        };
        for (k, (i, inj)) in injectors.iter_mut().enumerate().rev() {
            if !applied[k] {
                continue;
            }
            match inj.heal(&mut env) {
                Ok(()) => eprintln!("  healed: {}", inj.describe()),
                Err(e) => report
                    .reasons
                    .push(format!("healing {} failed: {e:#}", inj.describe())),
            }
            if ended[k].is_none() {
                ended[k] = Some(now_ms());
                report.faults[*i].ended_ms = ended[k];
            }
        }
    }
    if let Some(e) = &t.exporter {
        e.faults_active(false);
    }
    let fault_end_ms = ended.iter().flatten().copied().max().unwrap_or_else(now_ms);

    // ---- recover: the load keeps running to the end of its planned window
    t.enter("recover");
    let planned_end = load_start_ms + (load_secs * 1000.0) as u64;
    let remaining = planned_end.saturating_sub(now_ms()) as f64 / 1000.0;
    if !interrupted && !wait(remaining, &mut cancel).await {
        interrupted = true;
    }
    if interrupted {
        report
            .reasons
            .push("interrupted: faults healed, the run cut short".into());
        let _ = stop_load_tx.send(true);
    }

    // ---- drain: the load finishes its last requests; queues empty out
    t.enter("drain");
    let summary = load.await.context("load task")??;
    let load_end_ms = now_ms();
    // Keep sampling briefly so the charts show the queues emptying.
    let _ = wait(1.0, &mut cancel).await;
    let _ = stop_monitor_tx.send(true);
    let samples = monitor.await.unwrap_or_default();
    monitor::hold_kernel_sampling(&stack, 0).await;
    if let Some(task) = capacity_during {
        report.capacity_during = task.await.ok().and_then(Result::ok);
    }
    let profiles = match (baseline_profile, fault_profile, profile_target) {
        (Some((base_cpu, base_off)), fault, Some(c)) => {
            let (fault_cpu, fault_off) = fault.unzip();
            let (fault_cpu, fault_off) = (fault_cpu.flatten(), fault_off.flatten());
            let off_cpu = match offcpu_target {
                Some(_) => Some((joined(base_off).await, joined(fault_off).await)),
                None => None,
            };
            Some(crate::profile::assemble(
                &dir,
                c,
                joined(base_cpu).await,
                joined(fault_cpu).await,
                off_cpu,
            ))
        }
        _ => None,
    };
    report.profiles = profiles;
    report.load_summary = Some(summary);

    // ---- audit
    t.enter("audit");
    let database = stack.url(Component::Postgres)?;
    match loadgen::audit::audit(&ledger, &database, Duration::from_secs(60)).await {
        Ok(a) => {
            std::fs::write(
                dir.join("audit.json"),
                serde_json::to_string_pretty(&a)? + "\n",
            )?;
            report.audit = Some(a);
        }
        Err(e) => report
            .reasons
            .push(format!("the audit could not run: {e:#}")),
    }

    // ---- verify cleanup
    t.enter("verify-cleanup");
    for (_, c) in journal.pending() {
        report.leftovers.push(format!("journal still lists {c:?}"));
    }
    let mut after_stack = stack.clone();
    let _ = after_stack.refresh();
    report
        .leftovers
        .extend(before.diff(&snapshot::capture(&after_stack)));

    // ---- report
    t.enter("report");
    let entries = loadgen::ledger::read(&ledger)
        .map(|l| l.entries)
        .unwrap_or_default();
    let marks = Marks {
        load_start_ms,
        inject_ms,
        fault_end_ms,
        heal_ms,
        load_end_ms,
    };
    report.measurements = analysis::analyse(&entries, &samples, &marks, rate);
    report.kernel = kernel_evidence(&stack, exp, &samples, &marks).await;
    t.close();
    report.phases = t.phases;
    report.hypothesis = checks(&exp.hypothesis, &report);
    report.verdict = if let Some(why) = injection_failed {
        report
            .reasons
            .push(format!("the fault could not be injected: {why}"));
        Verdict::NotInjected
    } else if !report.leftovers.is_empty() {
        report
            .reasons
            .push("the run left kernel state behind (see Cleanup)".into());
        Verdict::CleanupFailed
    } else if interrupted || report.hypothesis.iter().any(|c| !c.passed) {
        for c in report.hypothesis.iter().filter(|c| !c.passed) {
            report.reasons.push(format!(
                "{}: measured {}, bound {}",
                c.name, c.measured, c.bound
            ));
        }
        Verdict::NotHeld
    } else {
        report
            .reasons
            .push("every check of the hypothesis held".into());
        Verdict::Held
    };
    report.exit_code = report.verdict.exit_code();
    write_samples(&dir, &samples)?;
    report.write(&dir)?;
    Ok(Finished { dir, report })
}

fn write_samples(dir: &Path, samples: &[Sample]) -> anyhow::Result<()> {
    std::fs::write(
        dir.join("samples.json"),
        serde_json::to_string(samples)? + "\n",
    )
    .with_context(|| format!("writing {}", dir.join("samples.json").display()))
}

/// The hypothesis, checked against what was measured.
pub fn checks(h: &Hypothesis, r: &Report) -> Vec<Check> {
    let m = &r.measurements;
    let mut out = vec![
        Check {
            name: "p99 latency of acknowledged orders".into(),
            bound: format!("≤ {} ms", h.max_p99_ms),
            measured: format!("{:.2} ms", m.overall.p99_ms),
            passed: m.overall.p99_ms <= h.max_p99_ms,
        },
        Check {
            name: "error rate".into(),
            bound: format!("≤ {:.2}%", h.max_error_rate * 100.0),
            measured: format!(
                "{:.2}% ({} of {})",
                m.overall.error_rate * 100.0,
                m.overall.errors,
                m.overall.orders
            ),
            passed: m.overall.error_rate <= h.max_error_rate,
        },
    ];
    match &r.audit {
        Some(a) => {
            out.push(Check {
                name: "acknowledged orders lost".into(),
                bound: format!("≤ {}", h.max_lost),
                measured: format!("{} of {}", a.lost.count, a.acknowledged),
                passed: a.lost.count <= h.max_lost && a.drained,
            });
            out.push(Check {
                name: "orders duplicated".into(),
                bound: format!("≤ {}", h.max_duplicated),
                measured: a.duplicated.count.to_string(),
                passed: a.duplicated.count <= h.max_duplicated,
            });
            out.push(Check {
                name: "audit: unexpected orders, trade conservation, sequence gaps".into(),
                bound: "0, 0, 0".into(),
                measured: format!(
                    "{}, {}, {}",
                    a.unexpected.count, a.trade_violations.count, a.sequence.gaps
                ),
                passed: a.unexpected.count == 0
                    && a.trade_violations.count == 0
                    && a.sequence.gaps == 0,
            });
        }
        None => out.push(Check {
            name: "audit".into(),
            bound: "ran".into(),
            measured: "did not run".into(),
            passed: false,
        }),
    }
    let opt = |name: &str, bound: Option<f64>, v: Option<f64>, missing: &str| {
        bound.map(|b| Check {
            name: name.into(),
            bound: format!("≤ {b} s"),
            measured: v.map_or_else(|| missing.to_owned(), |v| format!("{v:.3} s")),
            passed: v.is_some_and(|v| v <= b),
        })
    };
    out.extend(opt(
        "time to detect",
        h.max_detection_s,
        m.detection_s,
        "no order showed the fault",
    ));
    out.extend(opt(
        "time to first success after the fault",
        h.max_first_success_s,
        m.first_success_s,
        "no 201 after the fault",
    ));
    out.extend(opt(
        "time to full recovery",
        h.max_recovery_s,
        m.full_recovery_s,
        "not recovered within the recovery window",
    ));
    if h.expect_queued {
        out.push(Check {
            name: "orders queued (202) during the fault".into(),
            bound: "> 0".into(),
            measured: m.during.queued.to_string(),
            passed: m.during.queued > 0,
        });
    }
    out
}

/// Kernel evidence from the probe agent, if it ran.
async fn kernel_evidence(
    stack: &Stack,
    exp: &Experiment,
    samples: &[Sample],
    marks: &Marks,
) -> KernelEvidence {
    let Some(url) = stack
        .url(Component::Probes)
        .ok()
        .filter(|u| u.starts_with("http"))
    else {
        return KernelEvidence {
            available: false,
            note: "The eBPF agent was not running (it needs root; see docs/probes.md), so there is no kernel evidence.".into(),
            ..KernelEvidence::default()
        };
    };
    let at = |t: u64| {
        samples
            .iter()
            .rev()
            .find(|s| s.t_ms <= t)
            .or(samples.first())
    };
    let (Some(a), Some(b), Some(z)) =
        (at(marks.inject_ms), at(marks.fault_end_ms), samples.first())
    else {
        return KernelEvidence {
            available: false,
            note: "The eBPF agent ran but no samples were taken.".into(),
            ..KernelEvidence::default()
        };
    };
    let mut during: Vec<(String, f64)> = b
        .kernel
        .iter()
        .filter(|(k, _)| !k.contains("_bucket"))
        .map(|(k, v)| (k.clone(), v - a.kernel.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d > 0.0)
        .collect();
    during.sort_by(|x, y| y.1.total_cmp(&x.1));
    during.truncate(15);
    let targets: Vec<String> = exp
        .faults
        .iter()
        .map(|f| f.target())
        .filter(|t| !t.contains("->"))
        .collect();
    let mut runqueue_p99_ms = Vec::new();
    for c in &targets {
        let p99 = |from: &Sample, to: &Sample| -> Option<f64> {
            let prefix = format!("probes_runqueue_latency_seconds_bucket{{component={c},");
            let mut buckets: Vec<(f64, f64)> = to
                .kernel
                .iter()
                .filter(|(k, _)| k.starts_with(&prefix))
                .filter_map(|(k, v)| {
                    let le = k.split("le=").nth(1)?.trim_end_matches('}');
                    let le = if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().ok()?
                    };
                    Some((le, v - from.kernel.get(k).copied().unwrap_or(0.0)))
                })
                .collect();
            buckets.sort_by(|x, y| x.0.total_cmp(&y.0));
            let total = buckets.last()?.1;
            (total > 0.0).then(|| {
                buckets
                    .iter()
                    .find(|(_, n)| *n >= 0.99 * total)
                    .map_or(f64::NAN, |(le, _)| le * 1000.0)
            })
        };
        if let (Some(before), Some(dur)) = (p99(z, a), p99(a, b)) {
            runqueue_p99_ms.push((c.clone(), before, dur));
        }
    }
    let events = match reqwest::Client::new()
        .get(format!("{url}/events?since={}", marks.inject_ms))
        .timeout(Duration::from_secs(3))
        .send()
        .await
    {
        Ok(r) => r
            .json::<serde_json::Value>()
            .await
            .ok()
            .and_then(|v| v["events"].as_array().cloned())
            .unwrap_or_default()
            .into_iter()
            .filter(|e| {
                e["ts_ms"]
                    .as_u64()
                    .is_some_and(|t| t <= marks.fault_end_ms + 2000)
            })
            .take(50)
            .collect(),
        Err(_) => Vec::new(),
    };
    KernelEvidence {
        available: true,
        note: "From the eBPF agent (tracepoints, no change to the application): counter increases during the fault window, run-queue wait of the fault targets, and kernel events.".into(),
        during,
        runqueue_p99_ms,
        events,
    }
}

/// For `chaos report DIR`: re-renders the markdown, HTML and JUnit from `report.json`.
pub fn rerender(dir: &Path) -> anyhow::Result<Report> {
    let r = Report::read(dir)?;
    r.write(dir)?;
    Ok(r)
}

/// The result of a profile capture task, if one was started and did not panic.
async fn joined(
    task: Option<tokio::task::JoinHandle<Result<std::path::PathBuf, String>>>,
) -> crate::profile::Captured {
    match task {
        Some(t) => t.await.ok(),
        None => None,
    }
}
