//! `profiler cpu` and `profiler all`: profile every service of the running lab while the demo
//! load runs, into `profiles/<time>/`.
//!
//! Per service: `<service>.pb.gz` (the gzipped pprof protobuf exactly as the service served it),
//! `<service>.svg` (its flamegraph) and `<service>.collapsed` (folded stacks), all from that one
//! profile. `all` adds `<service>.heap.pb.gz` and `<service>.heap.svg` (jemalloc in-use heap),
//! `<service>.metrics.txt` (a `/metrics` snapshot) and, when the lab runs the eBPF agent,
//! `<service>.offcpu.svg`, `.offcpu.collapsed` and `.offcpu.pb.gz` (where its threads waited, recorded
//! by the agent during the same window as the CPU profile). `manifest.json` records what was asked, what
//! was captured and what failed, and the load generator's summary; `load.json` is that summary.

use crate::target::{Service, Stack};
use anyhow::Context as _;
use kit::debug::{collapsed, decode_pprof, flamegraph_svg, stacks};
use loadgen::flow::FlowSpec;
use loadgen::run::RunSpec;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What to capture.
#[derive(Debug, Clone)]
pub struct CaptureOptions {
    /// Parent of the `<time>` folders (`profiles`).
    pub out: PathBuf,
    pub seconds: u64,
    pub hz: u32,
    /// Orders per second sent to the gateway meanwhile; 0: no load.
    pub rate: f64,
    /// Load before profiling starts, so the profile sees the steady state.
    pub warmup: Duration,
    /// Also the heap profiles and a metrics snapshot (`profiler all`).
    pub all: bool,
    pub seed: u64,
}

/// Symbols the demo load trades (loadgen's defaults).
pub const SYMBOLS: [&str; 5] = ["AAPL", "MSFT", "GOOG", "AMZN", "TSLA"];

/// A new, empty `<out>/<time>` folder (UTC, sortable, no colons).
pub fn new_run_dir(out: &Path) -> anyhow::Result<PathBuf> {
    let now = humantime::format_rfc3339_seconds(SystemTime::now())
        .to_string()
        .replace(':', "-");
    for n in 0..100 {
        let name = if n == 0 {
            now.clone()
        } else {
            format!("{now}-{n}")
        };
        let dir = out.join(name);
        match std::fs::create_dir_all(out).and_then(|()| std::fs::create_dir(&dir)) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
        }
    }
    anyhow::bail!("could not create a new folder under {}", out.display())
}

/// The newest `<time>` folder under `out` that holds profiles.
pub fn newest_run_dir(out: &Path) -> anyhow::Result<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(out)
        .with_context(|| {
            format!(
                "reading {} (no profiles yet? run `make profile-cpu`)",
                out.display()
            )
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && has_profiles(p))
        .collect();
    dirs.sort();
    dirs.pop().with_context(|| {
        format!(
            "no profiles under {}; run `make profile-cpu` first",
            out.display()
        )
    })
}

fn has_profiles(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut d| {
        d.any(|e| {
            e.ok()
                .and_then(|e| e.file_name().into_string().ok())
                .is_some_and(|n| n.ends_with(".pb.gz") || n.ends_with(".svg"))
        })
    })
}

/// Runs the capture and returns the folder it wrote. Fails only if no CPU profile at all was
/// captured; partial failures are reported and recorded in the manifest.
pub async fn capture(stack: &Stack, opts: &CaptureOptions) -> anyhow::Result<PathBuf> {
    let dir = new_run_dir(&opts.out)?;
    let kind = if opts.all { "all" } else { "cpu" };
    eprintln!(
        "profiling {} for {} s at {} Hz{} -> {}",
        stack
            .services
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        opts.seconds,
        opts.hz,
        if opts.rate > 0.0 {
            format!(" under {} orders/s", opts.rate)
        } else {
            " without load".into()
        },
        dir.display()
    );
    let (stop_load, load) = start_load(stack, opts, &dir)?;
    if load.is_some() {
        tokio::time::sleep(opts.warmup).await;
    }
    let started_at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let mut heap_results = Vec::new();
    let mut metrics_results = Vec::new();
    if opts.all {
        // The heap under load, before the CPU profile: symbolizing a profile leaves a large
        // symbol cache in the process (see docs/profiling.md), which would show in the heap.
        heap_results = each_service(stack, |stack, s| {
            let dir = dir.clone();
            async move { heap_one(&stack, &s, &dir).await }
        })
        .await;
    }
    let cpu = each_service(stack, |stack, s| {
        let (opts, dir) = (opts.clone(), dir.clone());
        async move { cpu_one(&stack, &s, &opts, &dir).await }
    });
    // Off-CPU stacks over the same window, from the eBPF agent (one capture for all services).
    let off_cpu = async {
        if opts.all {
            Some(offcpu_all(stack, opts, &dir).await)
        } else {
            None
        }
    };
    let (cpu_results, off_cpu_results) = tokio::join!(cpu, off_cpu);
    if opts.all {
        // The counters at the end of the load window.
        metrics_results = each_service(stack, |stack, s| {
            let dir = dir.clone();
            async move { metrics_one(&stack, &s, &dir).await }
        })
        .await;
    }
    let _ = stop_load.send(());
    let load_summary = match load {
        Some(task) => match task.await {
            Ok(Ok(summary)) => Some(summary),
            Ok(Err(e)) => {
                eprintln!("load generator: {e:#}");
                None
            }
            Err(e) => {
                eprintln!("load generator task: {e}");
                None
            }
        },
        None => None,
    };
    let mut services = Vec::new();
    let mut captured = 0;
    for (i, s) in stack.services.iter().enumerate() {
        let mut entry = json!({ "name": s.name, "url": s.url });
        match &cpu_results[i] {
            Ok(v) => {
                captured += 1;
                entry["cpu"] = v.clone();
            }
            Err(e) => entry["cpu"] = json!({ "error": format!("{e:#}") }),
        }
        if opts.all {
            entry["heap"] = match &heap_results[i] {
                Ok(v) => v.clone(),
                Err(e) => json!({ "error": format!("{e:#}") }),
            };
            entry["metrics"] = match &metrics_results[i] {
                Ok(v) => v.clone(),
                Err(e) => json!({ "error": format!("{e:#}") }),
            };
            entry["off_cpu"] = match &off_cpu_results {
                Some(Ok(per_service)) => per_service.get(&s.name).cloned().unwrap_or_else(
                    || json!({ "error": "the agent recorded no process of this service" }),
                ),
                // The whole capture failed: the manifest's `off_cpu` says why, once.
                Some(Err(_)) | None => Value::Null,
            };
        }
        services.push(entry);
    }
    let mut manifest = json!({
        "schema": "profiler.capture/1",
        "kind": kind,
        "started_at": started_at,
        "seconds": opts.seconds,
        "hz": opts.hz,
        "state_file": stack.state_file.display().to_string(),
        "load": {
            "rate_per_sec": opts.rate,
            "target": stack.gateway,
            "warmup_s": opts.warmup.as_secs_f64(),
            "summary": load_summary.as_ref().map(summary_brief),
        },
        "services": services,
    });
    if let Some(Err(e)) = &off_cpu_results {
        manifest["off_cpu"] = json!(format!("not captured: {e:#}"));
    }
    let manifest_path = dir.join("manifest.json");
    std::fs::write(
        &manifest_path,
        serde_json::to_string_pretty(&manifest)? + "\n",
    )
    .with_context(|| format!("writing {}", manifest_path.display()))?;
    print_summary(&manifest, &dir);
    anyhow::ensure!(
        captured > 0,
        "no CPU profile could be captured (see above); nothing to analyze in {}",
        dir.display()
    );
    Ok(dir)
}

type LoadTask = tokio::task::JoinHandle<anyhow::Result<loadgen::stats::Summary>>;

/// Starts the demo load (open model, `rate` orders/s) for longer than the capture needs; the
/// returned sender stops it.
fn start_load(
    stack: &Stack,
    opts: &CaptureOptions,
    dir: &Path,
) -> anyhow::Result<(tokio::sync::oneshot::Sender<()>, Option<LoadTask>)> {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    if opts.rate <= 0.0 {
        return Ok((stop_tx, None));
    }
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let spec = RunSpec {
        target: stack.gateway.clone(),
        rate_per_sec: opts.rate,
        // Stopped as soon as the profiles are in; this is only the upper bound.
        duration: opts.warmup + Duration::from_secs(opts.seconds + 600),
        flow: FlowSpec {
            seed: opts.seed,
            symbols: SYMBOLS.iter().map(|s| s.to_string()).collect(),
            cancel_share: 0.1,
            accounts: 50,
            client_id_prefix: format!("prof{}-{unix}", opts.seed),
        },
        ledger: None,
        summary: Some(dir.join("load.json")),
        request_timeout: Duration::from_secs(10),
        max_in_flight: 20_000,
        batch: 1,
        progress: false,
    };
    spec.validate()?;
    let task = tokio::spawn(async move {
        loadgen::run::run(spec, async move {
            let _ = stop_rx.await;
        })
        .await
    });
    Ok((stop_tx, Some(task)))
}

/// The numbers of a load summary worth keeping next to a profile.
fn summary_brief(s: &loadgen::stats::Summary) -> Value {
    json!({
        "planned": s.planned,
        "sent": s.sent,
        "achieved_rate_per_sec": s.achieved_rate_per_sec,
        "duration_s": s.duration_s,
        "outcomes": s.outcomes,
        "error_rate": s.error_rate,
        "ack_latency": s.ack_latency,
    })
}

/// Runs `f` for every service at once; results in service order.
async fn each_service<F, Fut>(stack: &Stack, f: F) -> Vec<anyhow::Result<Value>>
where
    F: Fn(Stack, Service) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Value>> + Send + 'static,
{
    let tasks: Vec<_> = stack
        .services
        .iter()
        .map(|s| tokio::spawn(f(stack.clone(), s.clone())))
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(
            t.await
                .unwrap_or_else(|e| Err(anyhow::anyhow!("task failed: {e}"))),
        );
    }
    out
}

/// Profiles one service's CPU and writes its three files.
async fn cpu_one(
    stack: &Stack,
    s: &Service,
    opts: &CaptureOptions,
    dir: &Path,
) -> anyhow::Result<Value> {
    let bytes = stack
        .get(
            s,
            &format!(
                "/debug/pprof/profile?seconds={}&hz={}",
                opts.seconds, opts.hz
            ),
            // Symbolizing the first profile of a process takes a few seconds.
            Duration::from_secs(opts.seconds + 120),
        )
        .await?;
    let profile = decode_pprof(&bytes)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("{}: the profile does not decode", s.name))?;
    let st = stacks(&profile, 0);
    let samples: i64 = st.iter().map(|x| x.value).sum();
    let pb = format!("{}.pb.gz", s.name);
    let svg = format!("{}.svg", s.name);
    let folded = format!("{}.collapsed", s.name);
    write(&dir.join(&pb), &bytes)?;
    write(&dir.join(&folded), collapsed(&st, true).as_bytes())?;
    let title = format!(
        "{}: CPU, {} s at {} Hz, {samples} samples{}",
        s.name,
        opts.seconds,
        opts.hz,
        if opts.rate > 0.0 {
            format!(", {} orders/s", opts.rate)
        } else {
            String::new()
        }
    );
    write(
        &dir.join(&svg),
        &flamegraph_svg(&st, &title, "samples").map_err(|e| anyhow::anyhow!("{e}"))?,
    )?;
    Ok(json!({ "pprof": pb, "svg": svg, "collapsed": folded, "samples": samples }))
}

/// Fetches one service's in-use heap profile and writes it and its flamegraph.
async fn heap_one(stack: &Stack, s: &Service, dir: &Path) -> anyhow::Result<Value> {
    let bytes = stack
        .get(s, "/debug/pprof/heap", Duration::from_secs(120))
        .await?;
    let profile = decode_pprof(&bytes)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("{}: the heap profile does not decode", s.name))?;
    let st = stacks(&profile, 0);
    let bytes_total: i64 = st.iter().map(|x| x.value).sum();
    let pb = format!("{}.heap.pb.gz", s.name);
    let svg = format!("{}.heap.svg", s.name);
    write(&dir.join(&pb), &bytes)?;
    let title = format!(
        "{}: in-use heap (jemalloc, sampled), {:.1} MiB",
        s.name,
        bytes_total as f64 / (1 << 20) as f64
    );
    write(
        &dir.join(&svg),
        &flamegraph_svg(&st, &title, "bytes").map_err(|e| anyhow::anyhow!("{e}"))?,
    )?;
    Ok(json!({ "pprof": pb, "svg": svg, "inuse_bytes": bytes_total }))
}

/// The agent's off-CPU capture of every service over `opts.seconds`, split per service and
/// written as `<service>.offcpu.svg` and `.offcpu.collapsed`; per service name, what was
/// written (or why not).
async fn offcpu_all(
    stack: &Stack,
    opts: &CaptureOptions,
    dir: &Path,
) -> anyhow::Result<serde_json::Map<String, Value>> {
    let url = stack.probes.clone().map_err(anyhow::Error::msg)?;
    let names: Vec<&str> = stack.services.iter().map(|s| s.name.as_str()).collect();
    let agent = Service {
        name: "probes".into(),
        url,
        pid: None,
    };
    let bytes = stack
        .get(
            &agent,
            &format!(
                "/debug/offcpu?component={}&seconds={}&format=json",
                names.join(","),
                opts.seconds
            ),
            Duration::from_secs(opts.seconds + 120),
        )
        .await?;
    let profile: OffCpuAnswer =
        serde_json::from_slice(&bytes).context("the agent's off-CPU answer does not parse")?;
    let mut out = serde_json::Map::new();
    for s in &stack.services {
        let pids: Vec<u32> = profile
            .components
            .iter()
            .filter(|(_, c)| **c == s.name)
            .filter_map(|(p, _)| p.parse().ok())
            .collect();
        if pids.is_empty() {
            continue;
        }
        let st: Vec<kit::debug::Stack> = profile
            .stacks
            .iter()
            .filter(|x| pids.contains(&x.pid))
            .map(|x| kit::debug::Stack {
                frames: x.frames.clone(),
                thread: Some(x.thread.clone()),
                value: x.us.min(i64::MAX as u64) as i64,
            })
            .collect();
        let total_us: i64 = st.iter().map(|x| x.value).sum();
        let svg = format!("{}.offcpu.svg", s.name);
        let folded = format!("{}.offcpu.collapsed", s.name);
        let pb = format!("{}.offcpu.pb.gz", s.name);
        write(&dir.join(&folded), collapsed(&st, true).as_bytes())?;
        write(
            &dir.join(&pb),
            &kit::debug::off_cpu_pprof(&st, Duration::from_secs(opts.seconds)),
        )?;
        let title = format!(
            "{}: off-CPU time by where its threads waited, {} s ({:.1} thread-seconds)",
            s.name,
            opts.seconds,
            total_us as f64 / 1e6
        );
        write(
            &dir.join(&svg),
            &kit::debug::off_cpu_svg(&st, &title).map_err(|e| anyhow::anyhow!("{e}"))?,
        )?;
        out.insert(
            s.name.clone(),
            json!({
                "svg": svg,
                "collapsed": folded,
                "pprof": pb,
                "off_cpu_seconds": total_us as f64 / 1e6,
                "stacks": st.len(),
                "partial": profile.lost + profile.unwalkable > 0,
            }),
        );
    }
    Ok(out)
}

/// The fields of the agent's `probes.offcpu/1` answer the capture uses.
#[derive(Debug, serde::Deserialize)]
struct OffCpuAnswer {
    stacks: Vec<OffCpuAnswerStack>,
    #[serde(default)]
    components: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    lost: u64,
    #[serde(default)]
    unwalkable: u64,
}

#[derive(Debug, serde::Deserialize)]
struct OffCpuAnswerStack {
    pid: u32,
    thread: String,
    frames: Vec<String>,
    us: u64,
}

/// Saves one service's `/metrics`.
async fn metrics_one(stack: &Stack, s: &Service, dir: &Path) -> anyhow::Result<Value> {
    let bytes = stack.get(s, "/metrics", Duration::from_secs(10)).await?;
    let name = format!("{}.metrics.txt", s.name);
    write(&dir.join(&name), &bytes)?;
    Ok(json!(name))
}

fn write(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

fn print_summary(manifest: &Value, dir: &Path) {
    let empty = Vec::new();
    for s in manifest["services"].as_array().unwrap_or(&empty) {
        let name = s["name"].as_str().unwrap_or("?");
        match s["cpu"]["error"].as_str() {
            Some(e) => eprintln!("  {name}: CPU profile FAILED: {e}"),
            None => eprintln!(
                "  {name}: {} CPU samples -> {}",
                s["cpu"]["samples"],
                dir.join(s["cpu"]["svg"].as_str().unwrap_or_default())
                    .display()
            ),
        }
        if let Some(h) = s.get("heap") {
            match h["error"].as_str() {
                Some(e) => eprintln!("  {name}: heap profile FAILED: {e}"),
                None => eprintln!(
                    "  {name}: heap {:.1} MiB in use (sampled) -> {}",
                    h["inuse_bytes"].as_f64().unwrap_or(0.0) / (1u64 << 20) as f64,
                    dir.join(h["svg"].as_str().unwrap_or_default()).display()
                ),
            }
        }
        if let Some(e) = s.get("metrics").and_then(|m| m["error"].as_str()) {
            eprintln!("  {name}: metrics snapshot FAILED: {e}");
        }
        if let Some(o) = s.get("off_cpu").filter(|o| !o.is_null()) {
            match o["error"].as_str() {
                Some(e) => eprintln!("  {name}: off-CPU stacks FAILED: {e}"),
                None => eprintln!(
                    "  {name}: {:.1} thread-seconds off-CPU -> {}",
                    o["off_cpu_seconds"].as_f64().unwrap_or(0.0),
                    dir.join(o["svg"].as_str().unwrap_or_default()).display()
                ),
            }
        }
    }
    if let Some(l) = manifest["load"]["summary"].as_object() {
        eprintln!(
            "  load: {} orders sent at {:.1}/s, error rate {:.4}",
            l.get("sent").cloned().unwrap_or_default(),
            l.get("achieved_rate_per_sec")
                .and_then(Value::as_f64)
                .unwrap_or(0.0),
            l.get("error_rate").and_then(Value::as_f64).unwrap_or(0.0)
        );
    }
    if let Some(o) = manifest["off_cpu"].as_str() {
        eprintln!("  off-CPU: {o}");
    }
}
