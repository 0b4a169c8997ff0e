//! `profiler analyze`: the original demo's "AI analysis", done deterministically. A CPU
//! profile's samples are sorted into categories (database, JSON, validation, matching,
//! messaging, network I/O, runtime, allocation, other) by the ordered regex rules of
//! `profiler/categories.toml`; the result is the share of CPU per category, the top functions
//! of each, and suggestions keyed to the categories that dominate.
//!
//! The rule (documented in the rules file): walk each stack from the leaf toward the root; at
//! every frame try the rules in file order; the first frame that matches decides. A stack no
//! frame matches is `other`; the function shown for it is its leaf.
//!
//! What the numbers are: shares of the *CPU samples* of one process. They are not shares of
//! latency: a request waiting 5 ms for PostgreSQL is off-CPU for those 5 ms and invisible here.

use anyhow::Context as _;
use kit::debug::Stack;
use pprof::protos::Profile;
use regex::Regex;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Schema name written in every analysis JSON.
pub const SCHEMA: &str = "profiler.analysis/1";

/// Functions listed per category in the JSON (the markdown shows the first three).
pub const TOP_FUNCTIONS: usize = 10;

/// The id of the catch-all category.
pub const OTHER: &str = "other";

/// Printed with every analysis.
pub const CPU_IS_NOT_LATENCY: &str = "CPU share is not latency share: these are shares of the samples taken while the process was on a CPU. Time spent waiting (for PostgreSQL, RabbitMQ, the network, a lock, fsync) is off-CPU and does not appear here; read it from the latency histograms (loadgen summary, Grafana) and the eBPF off-CPU/run-queue evidence.";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    version: u32,
    #[serde(default)]
    ignore: Vec<String>,
    category: Vec<CategorySpec>,
    rule: Vec<RuleSpec>,
}

/// One category of the rules file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CategorySpec {
    pub id: String,
    pub label: String,
    /// The suggestion is given when the category's share is at least this (percent).
    #[serde(default = "never")]
    pub suggest_at_pct: f64,
    #[serde(default)]
    pub suggestion: String,
}

fn never() -> f64 {
    f64::INFINITY
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    category: String,
    #[serde(rename = "match")]
    pattern: String,
}

/// The compiled rules: categories in report order, rules in match order.
#[derive(Debug, Clone)]
pub struct Rules {
    pub categories: Vec<CategorySpec>,
    ignore: Vec<Regex>,
    /// (index into `categories`, pattern), in file order.
    rules: Vec<(usize, Regex)>,
    other: usize,
    /// Where the rules came from, for the report.
    pub source: String,
}

impl Rules {
    /// The rules file shipped with the tool (`profiler/categories.toml`), compiled in.
    pub fn builtin() -> Rules {
        Rules::parse(BUILTIN_RULES, "profiler/categories.toml (built in)")
            .expect("the shipped rules file is valid; the tests load it")
    }

    /// Reads and compiles a rules file.
    pub fn load(path: &Path) -> anyhow::Result<Rules> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Rules::parse(&text, &path.display().to_string())
    }

    /// Compiles rules from TOML text; errors name the rule at fault.
    pub fn parse(text: &str, source: &str) -> anyhow::Result<Rules> {
        let file: RulesFile = toml::from_str(text).with_context(|| format!("parsing {source}"))?;
        anyhow::ensure!(
            file.version == 1,
            "{source}: version {} is not supported (expected 1)",
            file.version
        );
        let mut categories = file.category;
        if !categories.iter().any(|c| c.id == OTHER) {
            categories.push(CategorySpec {
                id: OTHER.into(),
                label: "Other".into(),
                suggest_at_pct: f64::INFINITY,
                suggestion: String::new(),
            });
        }
        for (i, c) in categories.iter().enumerate() {
            anyhow::ensure!(
                !categories[..i].iter().any(|d| d.id == c.id),
                "{source}: category {:?} is defined twice",
                c.id
            );
        }
        let other = categories
            .iter()
            .position(|c| c.id == OTHER)
            .unwrap_or_default();
        let ignore = file
            .ignore
            .iter()
            .map(|p| Regex::new(p).with_context(|| format!("{source}: ignore pattern {p:?}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut rules = Vec::new();
        for (n, r) in file.rule.iter().enumerate() {
            let cat = categories
                .iter()
                .position(|c| c.id == r.category)
                .with_context(|| {
                    format!(
                        "{source}: rule #{} names category {:?}, which no [[category]] defines",
                        n + 1,
                        r.category
                    )
                })?;
            let re = Regex::new(&r.pattern)
                .with_context(|| format!("{source}: rule #{} pattern {:?}", n + 1, r.pattern))?;
            rules.push((cat, re));
        }
        Ok(Rules {
            categories,
            ignore,
            rules,
            other,
            source: source.to_string(),
        })
    }

    /// Whether `frame` is one of the profiler's own (removed before matching).
    pub fn ignored(&self, frame: &str) -> bool {
        self.ignore.iter().any(|r| r.is_match(frame))
    }

    /// The category (index) of the first rule matching `frame`, if any.
    pub fn match_frame(&self, frame: &str) -> Option<usize> {
        self.rules
            .iter()
            .find(|(_, re)| re.is_match(frame))
            .map(|(c, _)| *c)
    }

    /// The category id of a whole stack (frames root first) and the deciding frame.
    pub fn classify<'a>(&self, frames_root_first: &'a [String]) -> (&str, Option<&'a str>) {
        let mut memo = HashMap::new();
        let (c, f) = self.classify_with(frames_root_first, &mut memo);
        (&self.categories[c].id, f)
    }

    fn classify_with<'a>(
        &self,
        frames_root_first: &'a [String],
        memo: &mut HashMap<String, Option<usize>>,
    ) -> (usize, Option<&'a str>) {
        // For a stack no rule matches, the function shown is the first qualified frame from the
        // leaf (`a::b`): inlined frames symbolized from line tables have bare names (`is_none`).
        let mut leaf = None;
        let mut qualified = None;
        for frame in frames_root_first.iter().rev() {
            let decided = match memo.get(frame.as_str()) {
                Some(d) => *d,
                None => {
                    let d = if self.ignored(frame) {
                        Some(usize::MAX)
                    } else {
                        self.match_frame(frame)
                    };
                    memo.insert(frame.clone(), d);
                    d
                }
            };
            match decided {
                Some(usize::MAX) => continue, // the profiler's own frame
                Some(c) => return (c, Some(frame)),
                None => {
                    leaf.get_or_insert(frame.as_str());
                    if frame.contains("::") {
                        qualified.get_or_insert(frame.as_str());
                    }
                }
            }
        }
        (self.other, qualified.or(leaf))
    }
}

/// The shipped rules file.
pub const BUILTIN_RULES: &str = include_str!("../categories.toml");

/// One function's part of the profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionShare {
    pub function: String,
    pub samples: i64,
    /// Percent of all the profile's samples.
    pub share_pct: f64,
}

/// One category's part of the profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CategoryShare {
    pub id: String,
    pub label: String,
    pub samples: i64,
    pub share_pct: f64,
    /// The functions that decided the category (the leaf-most matching frame; for `other`,
    /// the leaf), heaviest first.
    pub top_functions: Vec<FunctionShare>,
}

/// A suggestion triggered by a category's share.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Suggestion {
    pub category: String,
    pub share_pct: f64,
    pub threshold_pct: f64,
    pub text: String,
}

/// The analysis of one CPU profile (written as `<service>.analysis.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Analysis {
    pub schema: String,
    /// The service (the profile's file name without extensions).
    pub service: String,
    pub profile: String,
    pub rules: String,
    pub samples: i64,
    /// CPU time the samples stand for.
    pub cpu_seconds: f64,
    /// Wall time the profile covered, when known.
    pub duration_seconds: Option<f64>,
    /// Sampling rate, when known.
    pub hz: Option<f64>,
    /// Every category of the rules (zero shares included), in report order: by share, `other`
    /// last.
    pub categories: Vec<CategoryShare>,
    /// The category with the largest share (excluding `other` unless nothing else has any).
    pub dominant: Option<String>,
    pub suggestions: Vec<Suggestion>,
    pub note: String,
}

impl Analysis {
    /// The share of category `id` in percent (0 when absent).
    pub fn share(&self, id: &str) -> f64 {
        self.categories
            .iter()
            .find(|c| c.id == id)
            .map_or(0.0, |c| c.share_pct)
    }
}

/// Whether a profile is a heap profile (jemalloc's `inuse_space`) rather than a CPU profile.
pub fn is_heap_profile(profile: &Profile) -> bool {
    profile.sample_type.iter().any(|t| {
        profile
            .string_table
            .get(t.ty as usize)
            .is_some_and(|s| s.contains("space") || s.contains("alloc"))
    })
}

/// Analyzes a CPU profile.
pub fn analyze_profile(profile: &Profile, rules: &Rules, service: &str, source: &str) -> Analysis {
    let stacks = kit::debug::stacks(profile, 0);
    let cpu_ns: i64 = {
        let cpu_index = profile.sample_type.iter().position(|t| {
            profile.string_table.get(t.ty as usize).map(String::as_str) == Some("cpu")
        });
        match cpu_index {
            Some(i) => profile.sample.iter().filter_map(|s| s.value.get(i)).sum(),
            None => stacks.iter().map(|s| s.value).sum::<i64>() * profile.period.max(0),
        }
    };
    let hz = (profile.period > 0).then(|| 1e9 / profile.period as f64);
    let duration = (profile.duration_nanos > 0).then(|| profile.duration_nanos as f64 / 1e9);
    let mut a = analyze_stacks(&stacks, rules, service, source);
    a.cpu_seconds = cpu_ns as f64 / 1e9;
    a.hz = hz;
    a.duration_seconds = duration;
    a
}

/// Analyzes stacks (from a profile or a collapsed file).
pub fn analyze_stacks(stacks: &[Stack], rules: &Rules, service: &str, source: &str) -> Analysis {
    let n = rules.categories.len();
    let mut samples = vec![0i64; n];
    let mut functions: Vec<HashMap<String, i64>> = vec![HashMap::new(); n];
    let mut memo = HashMap::new();
    let mut total = 0i64;
    for st in stacks {
        if st.value <= 0 {
            continue;
        }
        total += st.value;
        let (c, f) = rules.classify_with(&st.frames, &mut memo);
        samples[c] += st.value;
        *functions[c]
            .entry(f.unwrap_or("(no frames)").to_string())
            .or_default() += st.value;
    }
    let pct = |v: i64| {
        if total > 0 {
            round2(100.0 * v as f64 / total as f64)
        } else {
            0.0
        }
    };
    let mut categories: Vec<CategoryShare> = rules
        .categories
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let mut top: Vec<(String, i64)> = functions[i].drain().collect();
            top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            CategoryShare {
                id: spec.id.clone(),
                label: spec.label.clone(),
                samples: samples[i],
                share_pct: pct(samples[i]),
                top_functions: top
                    .into_iter()
                    .take(TOP_FUNCTIONS)
                    .map(|(function, s)| FunctionShare {
                        function,
                        samples: s,
                        share_pct: pct(s),
                    })
                    .collect(),
            }
        })
        .collect();
    // By share, heaviest first; `other` last; ties in rules-file order (the sort is stable).
    categories.sort_by(|a, b| {
        (a.id == OTHER)
            .cmp(&(b.id == OTHER))
            .then(b.samples.cmp(&a.samples))
    });
    let dominant = categories
        .iter()
        .find(|c| c.samples > 0 && c.id != OTHER)
        .or_else(|| categories.iter().find(|c| c.samples > 0))
        .map(|c| c.id.clone());
    let mut suggestions: Vec<Suggestion> = categories
        .iter()
        .filter_map(|c| {
            let spec = rules.categories.iter().find(|s| s.id == c.id)?;
            (c.samples > 0 && c.share_pct >= spec.suggest_at_pct && !spec.suggestion.is_empty())
                .then(|| Suggestion {
                    category: c.id.clone(),
                    share_pct: c.share_pct,
                    threshold_pct: spec.suggest_at_pct,
                    text: spec.suggestion.clone(),
                })
        })
        .collect();
    suggestions.sort_by(|a, b| b.share_pct.total_cmp(&a.share_pct));
    Analysis {
        schema: SCHEMA.into(),
        service: service.into(),
        profile: source.into(),
        rules: rules.source.clone(),
        samples: total,
        cpu_seconds: 0.0,
        duration_seconds: None,
        hz: None,
        categories,
        dominant,
        suggestions,
        note: CPU_IS_NOT_LATENCY.into(),
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// The markdown report of one analysis: a heading, the table, the suggestions.
pub fn markdown(a: &Analysis) -> String {
    let mut out = String::new();
    let mut head = format!("### {} — {} samples", a.service, a.samples);
    if a.cpu_seconds > 0.0 {
        let _ = write!(head, ", {:.1} CPU-seconds", a.cpu_seconds);
        if let Some(d) = a.duration_seconds.filter(|d| *d > 0.0) {
            let _ = write!(head, " in {d:.0} s ({:.2} cores busy)", a.cpu_seconds / d);
        }
    }
    let _ = writeln!(out, "{head}\n");
    let _ = writeln!(
        out,
        "| category | CPU share | top functions (share of all CPU) |"
    );
    let _ = writeln!(out, "|---|---:|---|");
    for c in &a.categories {
        let top: Vec<String> = c
            .top_functions
            .iter()
            .take(3)
            .map(|f| format!("`{}` {:.1} %", short(&f.function), f.share_pct))
            .collect();
        let _ = writeln!(
            out,
            "| {} | {:.1} % | {} |",
            c.label,
            c.share_pct,
            if top.is_empty() {
                "—".to_string()
            } else {
                top.join("; ")
            }
        );
    }
    out.push('\n');
    if let Some(d) = &a.dominant {
        let c = a.categories.iter().find(|c| &c.id == d);
        if let Some(c) = c {
            let _ = writeln!(
                out,
                "Largest share: **{}** ({:.1} %).\n",
                c.label, c.share_pct
            );
        }
    }
    if a.suggestions.is_empty() {
        let _ = writeln!(
            out,
            "Suggestions: none — no category is above its threshold in {}.\n",
            a.rules
        );
    } else {
        let _ = writeln!(out, "Suggestions:\n");
        for s in &a.suggestions {
            let label = a
                .categories
                .iter()
                .find(|c| c.id == s.category)
                .map_or(s.category.as_str(), |c| c.label.as_str());
            let _ = writeln!(
                out,
                "- **{label}** at {:.1} % (threshold {:.0} %): {}",
                s.share_pct, s.threshold_pct, s.text
            );
        }
        out.push('\n');
    }
    let _ = writeln!(out, "> {}", a.note);
    out
}

/// Shortens long generic names for the table (the JSON keeps them whole).
fn short(name: &str) -> String {
    const MAX: usize = 90;
    if name.chars().count() <= MAX {
        name.replace('|', "\\|")
    } else {
        let s: String = name.chars().take(MAX - 1).collect();
        format!("{}…", s.replace('|', "\\|"))
    }
}

/// A CPU profile file found for analysis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileFile {
    pub service: String,
    pub path: PathBuf,
}

/// The CPU profiles in `dir` (`<service>.pb.gz`, not `*.heap.pb.gz`), by name; or `path`
/// itself when it is a file.
pub fn find_profiles(path: &Path) -> anyhow::Result<Vec<ProfileFile>> {
    if path.is_file() {
        return Ok(vec![ProfileFile {
            service: service_of(path),
            path: path.to_owned(),
        }]);
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(path).with_context(|| format!("reading {}", path.display()))? {
        let p = entry?.path();
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        // Heap and off-CPU profiles sit next to the CPU ones; they are not CPU samples.
        let other = [".heap.", ".offcpu."].iter().any(|k| name.contains(k));
        let cpu = !other && (name.ends_with(".pb.gz") || name.ends_with(".collapsed"));
        if cpu {
            out.push(ProfileFile {
                service: service_of(&p),
                path: p,
            });
        }
    }
    // One entry per service: prefer the protobuf over the collapsed file.
    out.sort_by(|a, b| {
        a.service
            .cmp(&b.service)
            .then_with(|| is_collapsed(&a.path).cmp(&is_collapsed(&b.path)))
    });
    out.dedup_by(|b, a| a.service == b.service);
    anyhow::ensure!(
        !out.is_empty(),
        "no CPU profiles (<service>.pb.gz) in {}; run `make profile-cpu` first",
        path.display()
    );
    Ok(out)
}

fn is_collapsed(p: &Path) -> bool {
    p.extension().is_some_and(|e| e == "collapsed")
}

/// `profiles/x/order-gateway.pb.gz` -> `order-gateway`.
pub fn service_of(path: &Path) -> String {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("profile");
    name.split('.').next().unwrap_or(name).to_string()
}

/// Reads a collapsed (folded) file: `a;b;c 12` per line, root first.
pub fn read_collapsed(text: &str) -> Vec<Stack> {
    text.lines()
        .filter_map(|line| {
            let (stack, n) = line.trim().rsplit_once(' ')?;
            let value = n.parse::<i64>().ok()?;
            Some(Stack {
                frames: stack.split(';').map(str::to_string).collect(),
                thread: None,
                value,
            })
        })
        .collect()
}

/// Analyzes one file (protobuf or collapsed).
pub fn analyze_file(file: &ProfileFile, rules: &Rules) -> anyhow::Result<Analysis> {
    let source = file.path.display().to_string();
    if is_collapsed(&file.path) {
        let text =
            std::fs::read_to_string(&file.path).with_context(|| format!("reading {source}"))?;
        return Ok(analyze_stacks(
            &read_collapsed(&text),
            rules,
            &file.service,
            &source,
        ));
    }
    let bytes = std::fs::read(&file.path).with_context(|| format!("reading {source}"))?;
    let profile = kit::debug::decode_pprof(&bytes)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("decoding {source}"))?;
    anyhow::ensure!(
        !is_heap_profile(&profile),
        "{source} is a heap profile; analyze works on CPU profiles"
    );
    Ok(analyze_profile(&profile, rules, &file.service, &source))
}

/// The JSON file written next to a profile: `<dir>/<service>.analysis.json`.
pub fn json_path(file: &ProfileFile) -> PathBuf {
    file.path
        .with_file_name(format!("{}.analysis.json", file.service))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stack(frames: &str, value: i64) -> Stack {
        Stack {
            frames: frames.split(';').map(str::to_string).collect(),
            thread: None,
            value,
        }
    }

    #[test]
    fn the_shipped_rules_compile() {
        let r = Rules::builtin();
        let ids: Vec<&str> = r.categories.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "database",
                "json",
                "validation",
                "matching",
                "messaging",
                "network",
                "runtime",
                "storage",
                "allocation",
                "other"
            ]
        );
    }

    /// Stacks from the real services (root first) and the category each must land in.
    #[test]
    fn classification_table() {
        let r = Rules::builtin();
        let table: &[(&str, &str)] = &[
            // The leaf decides: an allocation inside serde_json is allocation.
            (
                "tokio::runtime::task::raw::poll;order_gateway::api::create_order;serde_json::ser::to_vec;alloc::raw_vec::finish_grow;malloc",
                "allocation",
            ),
            (
                "order_gateway::api::create_order;serde_json::ser::format_escaped_str_contents",
                "json",
            ),
            (
                "order_gateway::parse::new_order;serde_json::de::from_slice",
                "json",
            ),
            (
                "order_gateway::parse::new_order;order_gateway::parse::request_from_object",
                "validation",
            ),
            (
                "order_gateway::parse::new_order;domain::order::NewOrderRequest::validate",
                "validation",
            ),
            (
                "persistence::pipeline::Pipeline::run;persistence::store::write_batch;sqlx_postgres::connection::PgConnection::run",
                "database",
            ),
            (
                "persistence::pipeline::Pipeline::run;<lapin::channel::Channel>::basic_ack",
                "messaging",
            ),
            (
                "std::thread::spawn;matching_engine::matcher::run;matching_engine::book::OrderBook::submit",
                "matching",
            ),
            (
                "matching_engine::matcher::run;matching_engine::journal::Journal::append;<std::fs::File>::sync_data;__GI_fdatasync",
                "storage",
            ),
            (
                "matching_engine::matcher::run;matching_engine::journal::Journal::append;__GI___libc_write",
                "storage",
            ),
            (
                "order_gateway::api::create_order;domain::price::SymbolSpec::parse_price",
                "validation",
            ),
            (
                "order_gateway::upstream::{async_fn#0};reqwest::into_url::into_url;http::uri::authority::validate_authority_bytes",
                "network",
            ),
            (
                "order_gateway::answers::accepted;domain::price::SymbolSpec::format_price",
                "other",
            ),
            (
                "tokio::runtime::task::raw::poll;hyper::server;std::sys::net::connection::socket::unix::Socket::write_vectored;__GI___writev",
                "network",
            ),
            (
                "tokio::runtime::scheduler::multi_thread::worker::run;<hyper::proto::h1::conn::Conn<I,B,T>>::poll_read",
                "network",
            ),
            (
                "tokio::runtime::scheduler::multi_thread::worker::Context::park;tokio::runtime::io::driver::Driver::turn;mio::poll::Poll::poll;epoll_wait",
                "network",
            ),
            (
                "tokio::runtime::scheduler::multi_thread::worker::Context::run;tokio::runtime::scheduler::multi_thread::worker::Context::run_task",
                "runtime",
            ),
            (
                "tokio::runtime::task::raw::poll;<axum::serve::Serve>::run;hyper::server;order_gateway::gateway::Gateway::submit;sha2::sha256::compress256",
                "other",
            ),
            (
                "tokio::runtime::task::raw::poll;hyper::server;tracing_subscriber::fmt::format::json::format_event;core::fmt::write",
                "other",
            ),
            ("clone3;start_thread;some_unknown_leaf", "other"),
            (
                "clone3;std::thread::lifecycle::spawn;busy::work;is_none",
                "other",
            ),
            ("pprof::profiler::perf_signal_handler", "other"),
        ];
        for (frames, want) in table {
            let frames: Vec<String> = frames.split(';').map(str::to_string).collect();
            let (got, by) = r.classify(&frames);
            assert_eq!(got, *want, "{frames:?} decided by {by:?}");
        }
    }

    #[test]
    fn shares_top_functions_and_suggestions() {
        let r = Rules::builtin();
        let stacks = vec![
            stack(
                "main;order_gateway::api::create_order;serde_json::ser::to_vec",
                50,
            ),
            stack(
                "main;order_gateway::api::create_order;serde_json::de::from_slice",
                10,
            ),
            stack("main;order_gateway::parse::new_order", 15),
            stack("main;busy_loop", 25),
        ];
        let a = analyze_stacks(&stacks, &r, "svc", "test");
        assert_eq!(a.samples, 100);
        assert_eq!(a.share("json"), 60.0);
        assert_eq!(a.share("validation"), 15.0);
        assert_eq!(a.share("other"), 25.0);
        assert_eq!(a.dominant.as_deref(), Some("json"));
        assert_eq!(a.categories[0].id, "json");
        assert_eq!(a.categories.last().map(|c| c.id.as_str()), Some("other"));
        assert_eq!(
            a.categories[0].top_functions[0].function,
            "serde_json::ser::to_vec"
        );
        assert_eq!(a.categories[0].top_functions[0].share_pct, 50.0);
        let other = a
            .categories
            .iter()
            .find(|c| c.id == "other")
            .expect("other");
        assert_eq!(other.top_functions[0].function, "busy_loop");
        let cats: Vec<&str> = a.suggestions.iter().map(|s| s.category.as_str()).collect();
        assert_eq!(cats, ["json", "validation"]);
        let md = markdown(&a);
        assert!(
            md.contains("| JSON serialization (serde_json) | 60.0 % |"),
            "{md}"
        );
        assert!(md.contains("CPU share is not latency share"), "{md}");
        let shares: f64 = a.categories.iter().map(|c| c.share_pct).sum();
        assert!((shares - 100.0).abs() < 0.1, "{shares}");
    }

    #[test]
    fn unmatched_stacks_show_their_first_qualified_frame() {
        let r = Rules::builtin();
        let frames: Vec<String> = ["clone3", "busy::work", "{async_fn#0}", "is_none"]
            .map(str::to_string)
            .to_vec();
        assert_eq!(r.classify(&frames), ("other", Some("busy::work")));
        let bare: Vec<String> = ["clone3", "is_none"].map(str::to_string).to_vec();
        assert_eq!(r.classify(&bare), ("other", Some("is_none")));
    }

    #[test]
    fn rules_errors_name_the_rule() {
        let bad_cat = "version = 1\n[[category]]\nid = \"a\"\nlabel = \"A\"\n[[rule]]\ncategory = \"b\"\nmatch = \"x\"\n";
        let e = format!(
            "{:#}",
            Rules::parse(bad_cat, "f").expect_err("unknown category")
        );
        assert!(e.contains("rule #1") && e.contains("\"b\""), "{e}");
        let bad_re = "version = 1\n[[category]]\nid = \"a\"\nlabel = \"A\"\n[[rule]]\ncategory = \"a\"\nmatch = \"(\"\n";
        let e = format!("{:#}", Rules::parse(bad_re, "f").expect_err("bad regex"));
        assert!(e.contains("rule #1"), "{e}");
        let ok = "version = 1\n[[category]]\nid = \"a\"\nlabel = \"A\"\n[[rule]]\ncategory = \"a\"\nmatch = \"^x\"\n";
        let r = Rules::parse(ok, "f").expect("valid");
        assert_eq!(r.categories.last().map(|c| c.id.as_str()), Some("other"));
    }

    #[test]
    fn collapsed_files_and_names() {
        let s = read_collapsed("a;b;c 12\nbroken line\nx 3\n");
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].frames, ["a", "b", "c"]);
        assert_eq!(s[0].value, 12);
        assert_eq!(
            service_of(Path::new("/p/order-gateway.pb.gz")),
            "order-gateway"
        );
        assert_eq!(
            service_of(Path::new("persistence.heap.pb.gz")),
            "persistence"
        );
    }

    #[test]
    fn only_cpu_profiles_are_analyzed() {
        let dir = tempfile::tempdir().expect("tempdir");
        for f in [
            "order-gateway.offcpu.pb.gz",
            "order-gateway.offcpu.collapsed",
            "order-gateway.heap.pb.gz",
            "order-gateway.pb.gz",
            "order-gateway.collapsed",
            "persistence.offcpu.collapsed",
            "persistence.collapsed",
        ] {
            std::fs::write(dir.path().join(f), "").expect("write");
        }
        let found: Vec<String> = find_profiles(dir.path())
            .expect("profiles")
            .iter()
            .map(|p| p.path.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(found, ["order-gateway.pb.gz", "persistence.collapsed"]);
    }
}
