//! Reports render and validate without a lab: a synthetic partition story goes through the
//! analysis, the checks and every output format.

use chaos::analysis::{Marks, analyse};
use chaos::experiment::{Experiment, find};
use chaos::monitor::Sample;
use chaos::report::{FaultRecord, KernelEvidence, Phase, Report, Verdict};
use chaos::runner::checks;
use loadgen::ledger::{LedgerEntry, Outcome};

fn entry(t_ms: u64, latency_ms: u64, outcome: Outcome) -> LedgerEntry {
    LedgerEntry {
        kind: "new".into(),
        client_order_id: Some(format!("c{t_ms}")),
        order_id: Some(t_ms),
        symbol: Some("AAPL".into()),
        intended_us: t_ms * 1000,
        sent_us: t_ms * 1000,
        outcome,
        http_status: Some(if outcome == Outcome::Queued { 202 } else { 201 }),
        status: None,
        latency_us: latency_ms * 1000,
        detail: None,
    }
}

/// A partition at 5 s healed at 15 s, at 10 orders/s, starting at unix time 1 000 000 s.
fn story(exp: &Experiment) -> Report {
    let t0 = 1_000_000_000u64;
    let mut ledger = Vec::new();
    for t in (0..5_000).step_by(100) {
        ledger.push(entry(t0 + t, 2, Outcome::Accepted));
    }
    for t in (5_000..5_800).step_by(100) {
        ledger.push(entry(t0 + t, 800, Outcome::Queued));
    }
    for t in (5_800..15_200).step_by(100) {
        ledger.push(entry(t0 + t, 1, Outcome::Queued));
    }
    for t in (15_200..25_000).step_by(100) {
        ledger.push(entry(t0 + t, 2, Outcome::Accepted));
    }
    let samples: Vec<Sample> = (0..25_000)
        .step_by(200)
        .map(|t| Sample {
            t_ms: t0 + t,
            spool: Some(if (5_000..15_200).contains(&t) {
                (t - 5_000) as f64 / 100.0
            } else {
                0.0
            }),
            outbox_lag: Some(1.0),
            engine_seq: Some(100.0),
            persisted_seq: Some(99.0),
            ..Sample::default()
        })
        .collect();
    let marks = Marks {
        load_start_ms: t0,
        inject_ms: t0 + 5_000,
        fault_end_ms: t0 + 15_000,
        heal_ms: t0 + 15_000,
        load_end_ms: t0 + 25_000,
    };
    let phase = |name: &str, a: u64, b: u64| Phase {
        name: name.into(),
        start_ms: t0 + a,
        end_ms: t0 + b,
    };
    let mut r = Report {
        schema: chaos::report::REPORT_SCHEMA.into(),
        experiment: exp.name.clone(),
        description: exp.description.clone(),
        quick: true,
        started_unix_ms: t0,
        verdict: Verdict::Held,
        exit_code: 0,
        reasons: vec![],
        rate_per_sec: 10.0,
        faults: vec![FaultRecord {
            kind: "partition".into(),
            target: "order-gateway->matching-engine".into(),
            description: exp.faults[0].describe(),
            applied_ms: Some(t0 + 5_000),
            ended_ms: Some(t0 + 15_000),
            note: None,
        }],
        phases: vec![
            phase("preflight", 0, 0),
            phase("baseline", 0, 5_000),
            phase("inject", 5_000, 5_000),
            phase("hold", 5_000, 15_000),
            phase("heal", 15_000, 15_000),
            phase("recover", 15_000, 25_000),
            phase("report", 25_000, 25_001),
        ],
        hypothesis: vec![],
        measurements: analyse(&ledger, &samples, &marks, 10.0),
        audit: None,
        kernel: KernelEvidence::default(),
        capacity_before: None,
        capacity_during: None,
        profiles: Some(chaos::report::Profiles {
            component: "order-gateway".into(),
            baseline_svg: Some("baseline.svg".into()),
            fault_svg: Some("fault.svg".into()),
            differential_svg: Some("differential.svg".into()),
            offcpu_baseline_svg: Some("offcpu-baseline.svg".into()),
            offcpu_fault_svg: Some("offcpu-fault.svg".into()),
            offcpu_differential_svg: None,
            note: Some("differential off-CPU time flamegraph: nothing to compare".into()),
        }),
        reverted: vec![],
        leftovers: vec![],
        load_summary: None,
    };
    r.hypothesis = checks(&exp.hypothesis, &r);
    r
}

#[test]
fn reports_render_self_contained_and_validate_against_the_schema() {
    let exp = find("network-partition").unwrap();
    let r = story(&exp);
    let m = &r.measurements;
    assert_eq!(m.system_detection_s, Some(0.8));
    assert_eq!(m.first_success_s, Some(0.202));
    assert!(m.full_recovery_s.unwrap() <= 0.4, "{:?}", m.full_recovery_s);
    // No audit ran in this story: that check fails, the others hold.
    let failed: Vec<&str> = r
        .hypothesis
        .iter()
        .filter(|c| !c.passed)
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(failed, vec!["audit"], "{:#?}", r.hypothesis);

    let dir = tempfile::tempdir().unwrap();
    r.write(dir.path()).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("report.json")).unwrap())
            .unwrap();
    let schema: serde_json::Value =
        serde_json::from_str(include_str!("../report.schema.json")).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(&json)
        .map(|e| format!("{e} at {}", e.instance_path))
        .collect();
    assert!(
        errors.is_empty(),
        "report.json does not match its schema: {errors:#?}"
    );

    let html = std::fs::read_to_string(dir.path().join("report.html")).unwrap();
    assert!(html.contains("<svg"), "charts are inline");
    assert_eq!(
        html.matches("<svg").count(),
        3,
        "throughput, latency, queues (no kernel data here)"
    );
    for external in [
        "http://", "https://", " src=\"", " href=\"", "@import", "url(",
    ] {
        assert!(
            !html.contains(external),
            "report.html refers to something outside itself: {external}"
        );
    }
    let junit = std::fs::read_to_string(dir.path().join("junit.xml")).unwrap();
    assert!(junit.contains("<testsuite name=\"chaos.network-partition\""));
    assert!(
        junit.contains("<failure"),
        "the failed audit check is a failure"
    );
    assert!(
        html.contains("off-CPU, during the fault: <code>offcpu-fault.svg</code>"),
        "the flamegraphs are named in report.html"
    );
    let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
    assert!(md.contains("time to full recovery"));
    assert!(md.contains("- off-CPU, baseline: [offcpu-baseline.svg](offcpu-baseline.svg)"));
    assert!(
        !md.contains("off-CPU, differential"),
        "absent files are not listed"
    );

    // `chaos report DIR` re-renders from report.json alone.
    std::fs::remove_file(dir.path().join("report.html")).unwrap();
    let back = chaos::runner::rerender(dir.path()).unwrap();
    assert_eq!(back, r);
    assert!(dir.path().join("report.html").exists());

    // A report that does not match the schema is caught by the validator.
    let mut broken = json.clone();
    broken["verdict"] = serde_json::json!("maybe");
    assert!(!validator.is_valid(&broken));
}
