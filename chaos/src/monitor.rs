//! Watching the stack while an experiment runs: every 200 ms the runner scrapes the services'
//! `/metrics` (queue depths, sequence numbers), the probe agent's kernel counters when it
//! runs, and the lab's state (restarts), and keeps the samples for the report's timeline.

use crate::target::Stack;
use lab::Component;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One parsed line of the Prometheus text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the Prometheus text exposition format (what every `/metrics` here serves).
pub fn parse_metrics(text: &str) -> Vec<Series> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (head, value) = match line.rfind(' ') {
            Some(i) => (&line[..i], line[i + 1..].trim()),
            None => continue,
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match head.find('{') {
            Some(i) => {
                let inner = head[i + 1..].trim_end_matches('}');
                let mut labels = BTreeMap::new();
                for pair in split_labels(inner) {
                    if let Some((k, v)) = pair.split_once('=') {
                        labels.insert(k.trim().to_owned(), v.trim().trim_matches('"').to_owned());
                    }
                }
                (head[..i].to_owned(), labels)
            }
            None => (head.trim().to_owned(), BTreeMap::new()),
        };
        out.push(Series {
            name,
            labels,
            value,
        });
    }
    out
}

/// Splits `a="x",b="y,z"` on the commas outside quotes.
fn split_labels(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            '\\' if quoted => escaped = !escaped,
            '"' if !escaped => quoted = !quoted,
            ',' if !quoted => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => escaped = false,
        }
        if c != '\\' {
            escaped = false;
        }
    }
    if start < s.len() {
        parts.push(&s[start..]);
    }
    parts
}

/// Sum of every series named `name` whose labels include all of `filter`.
pub fn sum(series: &[Series], name: &str, filter: &[(&str, &str)]) -> Option<f64> {
    let mut found = false;
    let mut total = 0.0;
    for s in series.iter().filter(|s| s.name == name) {
        if filter
            .iter()
            .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        {
            found = true;
            total += s.value;
        }
    }
    found.then_some(total)
}

/// One observation of the stack.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Unix time in ms.
    pub t_ms: u64,
    /// Orders in the gateway's retry queue.
    pub spool: Option<f64>,
    /// Events journaled by the engine and not yet confirmed by RabbitMQ.
    pub outbox_lag: Option<f64>,
    /// The engine's last event sequence number.
    pub engine_seq: Option<f64>,
    /// The highest sequence number persistence wrote with no gap before it.
    pub persisted_seq: Option<f64>,
    /// Kernel counters from the probe agent (cumulative), keyed `metric{label=value,...}`.
    pub kernel: BTreeMap<String, f64>,
    /// Restarts per component, from the lab's state file.
    pub restarts: BTreeMap<String, u32>,
}

impl Sample {
    /// Events the engine produced that persistence has not written yet.
    pub fn persistence_lag(&self) -> Option<f64> {
        Some((self.engine_seq? - self.persisted_seq?).max(0.0))
    }
}

/// Kernel metrics kept from each probe scrape.
const KERNEL_FAMILIES: &[&str] = &[
    "probes_tcp_retransmits_total",
    "probes_tcp_connect_failures_total",
    "probes_tcp_resets_total",
    "probes_oom_kills_total",
    "probes_runqueue_latency_seconds_bucket",
    "probes_block_io_latency_seconds_bucket",
];

fn key(s: &Series) -> String {
    let labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{}{{{}}}", s.name, labels.join(","))
}

async fn scrape(client: &reqwest::Client, url: &str) -> Option<Vec<Series>> {
    let r = client.get(format!("{url}/metrics")).send().await.ok()?;
    if !r.status().is_success() {
        return None;
    }
    Some(parse_metrics(&r.text().await.ok()?))
}

/// Asks the eBPF agent, when it runs, to keep its sampled probes (run queue, block I/O)
/// attached for `seconds` (`POST /debug/sampling/hold`), so the kernel evidence of an
/// experiment covers all of it; `seconds == 0` ends the hold (`DELETE`). Best effort: an
/// agent that is not running, or too old to sample, changes nothing.
pub async fn hold_kernel_sampling(stack: &Stack, seconds: u64) {
    let Some(url) = stack
        .url(Component::Probes)
        .ok()
        .filter(|u| u.starts_with("http"))
    else {
        return;
    };
    let client = reqwest::Client::new();
    let request = if seconds == 0 {
        client.delete(format!("{url}/debug/sampling/hold"))
    } else {
        client.post(format!(
            "{url}/debug/sampling/hold?seconds={}",
            seconds.min(3600)
        ))
    };
    match request.timeout(Duration::from_secs(3)).send().await {
        Ok(r) if r.status().is_success() => {}
        Ok(r) => {
            tracing::info!(status = %r.status(), "the eBPF agent did not take the sampling hold")
        }
        Err(e) => tracing::debug!(error = %e, "no eBPF agent to hold sampling"),
    }
}

/// Samples the stack every `every` until `stop` resolves; returns the samples.
pub async fn watch(
    stack: Stack,
    every: Duration,
    stop: impl std::future::Future<Output = ()>,
) -> Vec<Sample> {
    let samples = Arc::new(Mutex::new(Vec::new()));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap_or_default();
    let url = |c: Component| stack.url(c).ok().filter(|u| u.starts_with("http"));
    let gateway = url(Component::OrderGateway);
    let engine = url(Component::MatchingEngine);
    let persistence = url(Component::Persistence);
    let probes = url(Component::Probes);
    let mut stack = stack.clone();
    let out = samples.clone();
    let work = async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let t_ms = crate::now_ms();
            let (g, e, p, k) = tokio::join!(
                async {
                    match &gateway {
                        Some(u) => scrape(&client, u).await,
                        None => None,
                    }
                },
                async {
                    match &engine {
                        Some(u) => scrape(&client, u).await,
                        None => None,
                    }
                },
                async {
                    match &persistence {
                        Some(u) => scrape(&client, u).await,
                        None => None,
                    }
                },
                async {
                    match &probes {
                        Some(u) => scrape(&client, u).await,
                        None => None,
                    }
                },
            );
            let mut s = Sample {
                t_ms,
                spool: g.as_deref().and_then(|g| sum(g, "spool_entries", &[])),
                outbox_lag: e
                    .as_deref()
                    .and_then(|e| sum(e, "engine_outbox_lag_events", &[])),
                engine_seq: e.as_deref().and_then(|e| sum(e, "engine_last_seq", &[])),
                persisted_seq: p
                    .as_deref()
                    .and_then(|p| sum(p, "persistence_contiguous_seq", &[])),
                ..Sample::default()
            };
            if let Some(k) = k {
                for series in k
                    .iter()
                    .filter(|s| KERNEL_FAMILIES.contains(&s.name.as_str()))
                {
                    *s.kernel.entry(key(series)).or_default() += series.value;
                }
            }
            if stack.refresh().is_ok() {
                for c in &stack.state.components {
                    s.restarts.insert(c.name.to_string(), c.restarts);
                }
            }
            out.lock().unwrap_or_else(|p| p.into_inner()).push(s);
        }
    };
    tokio::select! {
        _ = work => {}
        _ = stop => {}
    }
    samples.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_text_format() {
        let text = "# HELP x y\n# TYPE spool_entries gauge\nspool_entries{spool=\"gateway\"} 12\n\
                    probes_tcp_retransmits_total{component=\"order-gateway\",dst=\"198.18.0.12:8081\",src=\"a,b\"} 3\n\
                    engine_last_seq 42\nbad line\n";
        let s = parse_metrics(text);
        assert_eq!(s.len(), 3);
        assert_eq!(sum(&s, "spool_entries", &[]), Some(12.0));
        assert_eq!(sum(&s, "engine_last_seq", &[]), Some(42.0));
        assert_eq!(
            sum(&s, "probes_tcp_retransmits_total", &[("src", "a,b")]),
            Some(3.0)
        );
        assert_eq!(sum(&s, "missing", &[]), None);
    }
}
