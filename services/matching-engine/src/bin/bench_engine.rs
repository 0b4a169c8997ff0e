//! `make bench-engine`: single-threaded, in-process throughput and latency of one order book
//! on an exchange-core-like command mix. Prints a table and writes `target/bench/engine.json`.
//!
//! Two passes over the same pre-generated stream, each on a fresh book:
//! * throughput: the whole stream, timed once (no per-command clock reads);
//! * latency: every command timed on its own with `Instant` (the clock read's own cost,
//!   measured and reported as `timer_overhead_ns`, is included in these numbers).

use anyhow::Context;
use clap::Parser;
use hdrhistogram::Histogram;
use matching_engine::book::OrderBook;
use matching_engine::workload::{WorkloadSpec, apply, generate};
use std::hint::black_box;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser)]
#[command(about = "Benchmark one order book on an exchange-core-like command mix")]
struct Args {
    /// Commands in the stream.
    #[arg(long, default_value_t = 3_000_000)]
    commands: usize,
    /// Timed repetitions of each pass (the best throughput and the merged latency are kept).
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where to write the JSON result.
    #[arg(long, default_value = "target/bench/engine.json")]
    out: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let spec = WorkloadSpec {
        commands: args.commands,
        seed: args.seed,
        ..WorkloadSpec::default()
    };
    eprintln!(
        "generating {} commands (seed {})...",
        spec.commands, spec.seed
    );
    let (stream, mix) = generate(&spec);
    let mut events = Vec::with_capacity(256);

    // Book shape at the end of the stream, to show the workload is what it claims.
    let mut book = OrderBook::new();
    for &c in &stream {
        events.clear();
        apply(&mut book, c, &mut events);
    }
    let resting = book.len();
    let levels = book.depth(domain::Side::Buy, usize::MAX).len()
        + book.depth(domain::Side::Sell, usize::MAX).len();

    let mut best_ops = 0f64;
    let mut rates = Vec::new();
    for _ in 0..args.rounds {
        let mut book = OrderBook::new();
        let start = Instant::now();
        for &c in &stream {
            events.clear();
            apply(&mut book, c, &mut events);
            black_box(&events);
        }
        let secs = start.elapsed().as_secs_f64();
        let rate = stream.len() as f64 / secs;
        rates.push(rate);
        best_ops = best_ops.max(rate);
    }
    rates.sort_by(f64::total_cmp);
    let median_ops = rates[rates.len() / 2];

    // Cost of one clock read, so readers can subtract it.
    let timer_overhead_ns = {
        let n = 1_000_000;
        let start = Instant::now();
        for _ in 0..n {
            black_box(Instant::now());
        }
        start.elapsed().as_nanos() as f64 / n as f64
    };

    let mut hist = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3).context("histogram")?;
    for _ in 0..args.rounds {
        let mut book = OrderBook::new();
        for &c in &stream {
            events.clear();
            let t = Instant::now();
            apply(&mut book, c, &mut events);
            let ns = t.elapsed().as_nanos() as u64;
            black_box(&events);
            hist.saturating_record(ns.max(1));
        }
    }

    let result = serde_json::json!({
        "benchmark": "engine",
        "commands": stream.len(),
        "rounds": args.rounds,
        "seed": args.seed,
        "ops_per_sec": best_ops.round(),
        "ops_per_sec_median": median_ops.round(),
        "p50_ns": hist.value_at_quantile(0.50),
        "p90_ns": hist.value_at_quantile(0.90),
        "p99_ns": hist.value_at_quantile(0.99),
        "p999_ns": hist.value_at_quantile(0.999),
        "max_ns": hist.max(),
        "mean_ns": hist.mean().round(),
        "timer_overhead_ns": (timer_overhead_ns * 10.0).round() / 10.0,
        "resting_orders_at_end": resting,
        "price_levels_at_end": levels,
        "mix": mix,
        "targets": {"ops_per_sec": 10_000_000, "p99_ns": 1_000},
    });
    println!(
        "engine benchmark: {} commands x {} rounds, one thread",
        stream.len(),
        args.rounds
    );
    println!(
        "  mix: {} passive limit, {} marketable limit, {} ioc, {} fok, {} market, {} cancel; {} commands traded",
        mix.passive_limit,
        mix.marketable_limit,
        mix.ioc,
        mix.fok,
        mix.market,
        mix.cancel,
        mix.trading_commands
    );
    println!("  book at end: {resting} resting orders on {levels} price levels");
    println!(
        "  throughput: {:>12.0} ops/s (best)  {:>12.0} ops/s (median)",
        best_ops, median_ops
    );
    println!(
        "  latency ns: p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (clock read {:.1} ns included)",
        hist.value_at_quantile(0.50),
        hist.value_at_quantile(0.90),
        hist.value_at_quantile(0.99),
        hist.value_at_quantile(0.999),
        hist.max(),
        timer_overhead_ns
    );
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&result)? + "\n")
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!("  wrote {}", args.out.display());
    Ok(())
}
