//! `make bench-e2e`: sustained throughput and acknowledgement latency through the whole
//! pipeline (gateway → engine → RabbitMQ → persistence → PostgreSQL) on this machine, and in the
//! same run the pipeline's ceiling: raw RabbitMQ publish-with-confirm throughput and raw
//! PostgreSQL batched-insert throughput. Writes `target/bench/e2e.json`.
//!
//! It starts its own lab (release binaries next to this one, free ports, loopback), so it does
//! not disturb a running `make demo`.

use anyhow::Context;
use clap::Parser;
use e2e::lab_root;
use lab::{Component, Lab, LabConfig};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use loadgen::capacity::{CapacitySpec, Step, search};
use loadgen::flow::FlowSpec;
use loadgen::run::RunSpec;
use serde::Serialize;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// jemalloc, as `loadgen` uses: the generator shares the two cores with the exchange.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    about = "End-to-end throughput and latency of the exchange, against the pipeline's ceiling"
)]
struct Args {
    /// p99 acknowledgement latency the sustained rate must stay under.
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    max_p99: Duration,
    /// First rate of the capacity search.
    #[arg(long, default_value_t = 500.0)]
    start_rate: f64,
    /// How long each rate is held.
    #[arg(long, default_value = "6s", value_parser = humantime::parse_duration)]
    step: Duration,
    /// Messages / rows for each ceiling measurement.
    #[arg(long, default_value_t = 50_000)]
    ceiling_items: usize,
    /// After the search with one order per request, a second with up to this many orders per
    /// `POST /v1/orders/batch` (the orders that come due together); 1: skip it.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u16).range(1..=100))]
    batch: u16,
    #[arg(long, default_value = "target/bench/e2e.json")]
    out: PathBuf,
}

/// One capacity search and where its CPU went.
struct CapacityRun {
    report: loadgen::capacity::CapacityReport,
    /// The highest rate that held.
    best: Option<Step>,
    cpu_at_best: Option<StepCpu>,
    cpu_by_step: Vec<StepCpu>,
}

impl CapacityRun {
    /// Its results for the JSON: the sustained rate, latency at it, its ratio to `ceiling`,
    /// the whole search and where the CPU went.
    fn json(&self, ceiling: f64) -> serde_json::Map<String, serde_json::Value> {
        let rate = self.report.sustainable_rate_per_sec;
        let best = self.best.as_ref();
        let value = json!({
            "orders_per_sec": rate,
            "achieved_orders_per_sec": best.map(|s| s.achieved_rate_per_sec),
            "p50_ms": best.map(|s| s.ack_p50_ms),
            "p99_ms": best.map(|s| s.ack_p99_ms),
            "ratio_to_ceiling": if ceiling > 0.0 { (rate / ceiling * 1000.0).round() / 1000.0 } else { 0.0 },
            "capacity": self.report,
            "cpu_at_sustained": self.cpu_at_best,
            "cpu_by_step": self.cpu_by_step,
        });
        match value {
            serde_json::Value::Object(map) => map,
            _ => serde_json::Map::new(),
        }
    }

    /// The latency and CPU lines under its result.
    fn print_details(&self) {
        if let Some(s) = &self.best {
            println!(
                "    at that rate: p50 {:.2} ms, p99 {:.2} ms",
                s.ack_p50_ms, s.ack_p99_ms
            );
        }
        if let Some(c) = &self.cpu_at_best {
            println!("    {}", c.line());
        }
    }
}

/// The capacity search against `gateway`, `batch` orders at most per request, reading each
/// step's CPU (every component's process tree, this process — the load generator — and the
/// host) before and after.
async fn capacity_run(
    args: &Args,
    lab: &Lab,
    gateway: &str,
    symbols: &[String],
    batch: usize,
) -> anyhow::Result<CapacityRun> {
    let roots: Vec<(String, i32)> = Component::ALL
        .iter()
        .filter_map(|c| lab.pid(*c).map(|p| (c.name().to_string(), p)))
        .collect();
    let mut last = CpuReading::now(&roots);
    let mut cpu_by_step: Vec<StepCpu> = Vec::new();
    let step_s = args.step.as_secs_f64();
    let report = search(
        &CapacitySpec {
            target: gateway.to_string(),
            start_rate: args.start_rate,
            factor: 1.6,
            max_rate: 100_000.0,
            step: args.step,
            max_p99: args.max_p99,
            max_error_rate: 0.001,
            baseline_rate: 30.0,
            refine: 3,
            confirm: 1,
            symbols: symbols.to_vec(),
            seed: 2,
            request_timeout: Duration::from_secs(10),
            max_in_flight: 20_000,
            batch,
            client_id_prefix: format!("bench-cap{batch}-{}", std::process::id()),
        },
        |s| {
            let now = CpuReading::now(&roots);
            let cpu = StepCpu::between(&last, &now, s, step_s);
            last = now;
            eprintln!(
                "  {:>8.0}/s  achieved {:>8.1}/s  p99 {:>8.2} ms  errors {:.2}%  host {:>3.0}% busy  {}",
                s.rate_per_sec,
                s.achieved_rate_per_sec,
                s.ack_p99_ms,
                s.error_rate * 100.0,
                cpu.host_busy_pct,
                s.verdict()
            );
            cpu_by_step.push(cpu);
        },
    )
    .await?;
    let best = report
        .steps
        .iter()
        .filter(|s| s.sustained)
        .max_by(|a, b| a.rate_per_sec.total_cmp(&b.rate_per_sec))
        .cloned();
    let cpu_at_best = best.as_ref().and_then(|b| {
        cpu_by_step
            .iter()
            .rev()
            .find(|c| c.sustained && c.rate_per_sec == b.rate_per_sec)
            .cloned()
    });
    Ok(CapacityRun {
        report,
        best,
        cpu_at_best,
        cpu_by_step,
    })
}

/// CPU seconds so far: each component's process tree, this process, the host.
struct CpuReading {
    trees: BTreeMap<String, f64>,
    own: f64,
    host: Option<(f64, f64)>,
}

impl CpuReading {
    fn now(roots: &[(String, i32)]) -> CpuReading {
        CpuReading {
            trees: e2e::cpu::tree_seconds(roots),
            own: e2e::cpu::own_seconds(),
            host: e2e::cpu::host_seconds(),
        }
    }
}

/// Where one capacity step's CPU went (the readings bracket the step and the moment between it
/// and the previous one).
#[derive(Clone, Serialize)]
struct StepCpu {
    rate_per_sec: f64,
    attempt: u32,
    sustained: bool,
    /// Busy share of all the host's CPUs.
    host_busy_pct: f64,
    /// CPU per acknowledged order, µs: each component, `load generator` (this process),
    /// `other` (the host's busy time no listed process accounts for: kernel threads, softirqs
    /// charged to no one, anything else running) and `total`.
    us_per_order: BTreeMap<String, f64>,
}

impl StepCpu {
    fn between(a: &CpuReading, b: &CpuReading, step: &Step, step_s: f64) -> StepCpu {
        let orders = (step.achieved_rate_per_sec * step_s).max(1.0);
        let per_order = |seconds: f64| (seconds / orders * 1e6 * 10.0).round() / 10.0;
        let mut us: BTreeMap<String, f64> = BTreeMap::new();
        let mut listed = 0.0;
        for (name, after) in &b.trees {
            let d = (after - a.trees.get(name).copied().unwrap_or(0.0)).max(0.0);
            listed += d;
            us.insert(name.clone(), per_order(d));
        }
        let own = (b.own - a.own).max(0.0);
        listed += own;
        us.insert("load generator".into(), per_order(own));
        let mut host_busy_pct = 0.0;
        if let (Some((busy0, total0)), Some((busy1, total1))) = (a.host, b.host) {
            let busy = busy1 - busy0;
            host_busy_pct = (busy / (total1 - total0).max(1e-9) * 1000.0).round() / 10.0;
            us.insert("other".into(), per_order((busy - listed).max(0.0)));
            us.insert("total".into(), per_order(busy));
        }
        StepCpu {
            rate_per_sec: step.rate_per_sec,
            attempt: step.attempt,
            sustained: step.sustained,
            host_busy_pct,
            us_per_order: us,
        }
    }

    /// `CPU per order at R/s (host B % busy): a 70 µs, b 62, ..., 287 µs in all`, largest first.
    fn line(&self) -> String {
        let mut parts: Vec<(&String, &f64)> = self
            .us_per_order
            .iter()
            .filter(|(k, _)| k.as_str() != "total")
            .collect();
        parts.sort_by(|x, y| y.1.total_cmp(x.1));
        let list: Vec<String> = parts
            .iter()
            .enumerate()
            .map(|(i, (k, v))| {
                if i == 0 {
                    format!("{k} {v:.0} µs")
                } else {
                    format!("{k} {v:.0}")
                }
            })
            .collect();
        format!(
            "CPU per order at {:.0}/s (host {:.0} % busy): {}; {:.0} µs in all",
            self.rate_per_sec,
            self.host_busy_pct,
            list.join(", "),
            self.us_per_order.get("total").copied().unwrap_or(0.0)
        )
    }
}

/// A payload the size of one order's events on the wire (accepted + a trade, ~400 bytes).
fn event_payload(i: usize) -> Vec<u8> {
    format!(
        "{{\"v\":1,\"events\":[{{\"seq\":{i},\"type\":\"accepted\",\"order\":{{\"order_id\":{i},\"client_order_id\":\"bench-{i}\",\"account\":\"acct-7\",\"symbol\":\"AAPL\",\"side\":\"buy\",\"type\":\"limit\",\"price\":10125,\"quantity\":10,\"time_in_force\":\"gtc\"}}}},{{\"seq\":{},\"type\":\"trade\",\"symbol\":\"AAPL\",\"maker_order_id\":1,\"taker_order_id\":{i},\"taker_side\":\"buy\",\"price\":10125,\"quantity\":10}}]}}",
        i + 1
    )
    .into_bytes()
}

/// Persistent messages published with confirms, 1,000 outstanding at a time, to a scratch
/// durable queue: messages per second.
async fn rabbitmq_ceiling(url: &str, n: usize) -> anyhow::Result<f64> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let queue = "bench.ceiling";
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await?;
    let start = Instant::now();
    let mut pending = std::collections::VecDeque::new();
    for i in 0..n {
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &event_payload(i),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?;
        pending.push_back(confirm);
        if pending.len() >= 1000
            && let Some(c) = pending.pop_front()
        {
            anyhow::ensure!(c.await?.is_ack(), "broker nacked a message");
        }
    }
    while let Some(c) = pending.pop_front() {
        anyhow::ensure!(c.await?.is_ack(), "broker nacked a message");
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    ch.queue_delete(queue.into(), QueueDeleteOptions::default())
        .await?;
    conn.close(200, "done".into()).await?;
    Ok(rate)
}

/// Rows like persistence's events, inserted 1,000 per transaction with UNNEST: rows per second.
async fn postgres_ceiling(url: &str, n: usize) -> anyhow::Result<f64> {
    let pool = sqlx::PgPool::connect(url).await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS bench_ceiling (seq bigint primary key, type text, order_id bigint, payload jsonb, at timestamptz default now())")
        .execute(&pool)
        .await?;
    sqlx::query("TRUNCATE bench_ceiling").execute(&pool).await?;
    let start = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let seqs: Vec<i64> = chunk.iter().map(|&i| i as i64).collect();
        let types: Vec<String> = chunk.iter().map(|_| "accepted".to_owned()).collect();
        let payloads: Vec<String> = chunk
            .iter()
            .map(|&i| String::from_utf8_lossy(&event_payload(i)).into_owned())
            .collect();
        let mut tx = pool.begin().await?;
        sqlx::query("INSERT INTO bench_ceiling (seq, type, order_id, payload) SELECT s, t, s, p::jsonb FROM UNNEST($1::bigint[], $2::text[], $3::text[]) AS x(s, t, p)")
            .bind(&seqs)
            .bind(&types)
            .bind(&payloads)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    sqlx::query("DROP TABLE bench_ceiling")
        .execute(&pool)
        .await?;
    pool.close().await;
    Ok(rate)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin_dir = std::env::current_exe()?
        .parent()
        .context("no folder for this binary")?
        .to_owned();
    let config = LabConfig::ephemeral(lab_root("bench-e2e")?, [Component::OrderGateway])?
        .with_bin_dir(&bin_dir);
    eprintln!("starting a lab from {} ...", bin_dir.display());
    let lab = Lab::start(config).await.context("starting the lab")?;
    let gateway = lab.url(Component::OrderGateway)?;
    let database = lab.url(Component::Postgres)?;
    let amqp = lab.url(Component::Rabbitmq)?;
    let symbols: Vec<String> = ["AAPL", "MSFT", "GOOG", "AMZN", "TSLA", "NVDA"]
        .map(String::from)
        .to_vec();

    eprintln!("demo load: 30 orders/s for 20 s ...");
    let demo = loadgen::run::run(
        RunSpec {
            target: gateway.clone(),
            rate_per_sec: 30.0,
            duration: Duration::from_secs(20),
            flow: FlowSpec {
                seed: 1,
                symbols: symbols.clone(),
                cancel_share: 0.1,
                accounts: 50,
                client_id_prefix: format!("bench-demo-{}", std::process::id()),
            },
            ledger: None,
            summary: None,
            request_timeout: Duration::from_secs(10),
            max_in_flight: 10_000,
            batch: 1,
            progress: false,
        },
        std::future::pending(),
    )
    .await?;
    eprint!("{}", demo.table());

    eprintln!(
        "capacity search: highest rate with ack p99 < {:?}, one order per request ...",
        args.max_p99
    );
    let single = capacity_run(&args, &lab, &gateway, &symbols, 1).await?;
    let batched = if args.batch > 1 {
        eprintln!(
            "capacity search: the same, up to {} orders per POST /v1/orders/batch ...",
            args.batch
        );
        Some(capacity_run(&args, &lab, &gateway, &symbols, usize::from(args.batch)).await?)
    } else {
        None
    };

    // Rows written per acknowledged order, to turn PostgreSQL rows/s into orders/s.
    let pool = sqlx::PgPool::connect(&database).await?;
    let (events, orders, trades): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM orders), (SELECT count(*) FROM trades)",
    )
    .fetch_one(&pool)
    .await?;
    pool.close().await;
    let rows_per_order = (events + orders + trades) as f64 / orders.max(1) as f64;

    eprintln!(
        "ceilings: RabbitMQ publish with confirms, PostgreSQL batched inserts ({} each, best of two runs) ...",
        args.ceiling_items
    );
    // Each ceiling is the best of two runs: the host's noise only ever lowers a throughput, so
    // the higher run is the better estimate of what the component can do here (and the ratio
    // below the more conservative).
    let rabbit_runs = [
        rabbitmq_ceiling(&amqp, args.ceiling_items).await?,
        rabbitmq_ceiling(&amqp, args.ceiling_items).await?,
    ];
    let pg_runs = [
        postgres_ceiling(&database, args.ceiling_items).await?,
        postgres_ceiling(&database, args.ceiling_items).await?,
    ];
    let rabbit = rabbit_runs[0].max(rabbit_runs[1]);
    let pg_rows = pg_runs[0].max(pg_runs[1]);
    let pg_orders = pg_rows / rows_per_order;
    let ceiling = rabbit.min(pg_orders);
    let sustained = single.report.sustainable_rate_per_sec;
    let mut result = json!({
        "benchmark": "e2e",
        "machine": {"cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)},
        "p99_bound_ms": args.max_p99.as_secs_f64() * 1000.0,
        "demo_rate": 30,
        "demo_p50_ms": demo.ack_latency.p50_ms,
        "demo_p99_ms": demo.ack_latency.p99_ms,
        "demo_p999_ms": demo.ack_latency.p999_ms,
        "ceiling": {
            "rabbitmq_publish_confirm_msgs_per_sec": rabbit.round(),
            "rabbitmq_runs": rabbit_runs.map(f64::round),
            "postgres_batched_insert_rows_per_sec": pg_rows.round(),
            "postgres_runs": pg_runs.map(f64::round),
            "rows_per_order": (rows_per_order * 100.0).round() / 100.0,
            "postgres_orders_per_sec": pg_orders.round(),
            "orders_per_sec": ceiling.round(),
        },
        "batched": batched.as_ref().map(|b| {
            let mut fields = b.json(ceiling);
            fields.insert("max_orders_per_request".into(), json!(args.batch));
            fields
        }),
        "targets": {"orders_per_sec": 20_000, "p99_ms": 20, "ratio_to_ceiling": 0.5, "demo_p99_ms": 5},
    });
    // The search with one order per request is the headline: its fields are top-level.
    if let serde_json::Value::Object(top) = &mut result {
        top.extend(single.json(ceiling));
    }
    println!("end-to-end benchmark (whole pipeline on this machine, load generator included):");
    println!(
        "  sustained: {sustained:.0} orders/s with ack p99 < {:?}",
        args.max_p99
    );
    single.print_details();
    if let Some(b) = &batched {
        println!(
            "  sustained with up to {} orders per request (POST /v1/orders/batch): {:.0} orders/s ({:.1}% of the ceiling)",
            args.batch,
            b.report.sustainable_rate_per_sec,
            b.report.sustainable_rate_per_sec / ceiling.max(1.0) * 100.0
        );
        b.print_details();
    }
    println!(
        "  demo load 30/s: p50 {:.2} ms, p99 {:.2} ms",
        demo.ack_latency.p50_ms, demo.ack_latency.p99_ms
    );
    println!(
        "  ceiling: RabbitMQ {:.0} msgs/s, PostgreSQL {:.0} rows/s = {:.0} orders/s ({:.2} rows per order) -> {:.0} orders/s",
        rabbit, pg_rows, pg_orders, rows_per_order, ceiling
    );
    println!(
        "  ratio to the ceiling: {:.1}%",
        sustained / ceiling.max(1.0) * 100.0
    );
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&result)? + "\n")?;
    println!("  wrote {}", args.out.display());
    lab.shutdown().await?;
    Ok(())
}
