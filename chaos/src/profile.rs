//! Profiling during chaos: CPU profiles of one component (folded stacks from its
//! `/debug/pprof/profile?format=collapsed` endpoint) during the baseline and during the fault,
//! rendered as flamegraphs with inferno, plus the differential flamegraph (red: more samples
//! during the fault, blue: fewer). When the lab runs the eBPF agent, the same for the
//! component's off-CPU time (`/debug/offcpu` on the agent): where its threads waited.

use crate::report::Profiles;
use crate::target::Stack;
use lab::Component;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Fetches a `secs`-second CPU profile of `c` as folded stacks into `<prefix>.folded`.
pub async fn capture(
    stack: &Stack,
    c: Component,
    secs: f64,
    prefix: &Path,
) -> Result<PathBuf, String> {
    let url = stack.url(c).map_err(|e| e.to_string())?;
    let secs = secs.round().max(1.0) as u64;
    let mut req = reqwest::Client::new()
        .get(format!(
            "{url}/debug/pprof/profile?seconds={secs}&format=collapsed"
        ))
        .timeout(Duration::from_secs(secs + 15));
    // The lab writes a token for the debug endpoints (they only serve loopback otherwise).
    if let Ok(token) = std::fs::read_to_string(stack.state.root.join("debug-token")) {
        req = req.bearer_auth(token.trim());
    }
    fetch_folded(
        req,
        &format!("profiling {c}"),
        "the profile is empty (no samples)",
        &prefix.with_extension("folded"),
    )
    .await
}

/// Fetches `secs` seconds of `c`'s off-CPU stacks from the lab's eBPF agent as folded stacks
/// (microseconds) into `<prefix>.offcpu.folded`.
pub async fn capture_offcpu(
    stack: &Stack,
    c: Component,
    secs: f64,
    prefix: &Path,
) -> Result<PathBuf, String> {
    let agent = stack
        .url(Component::Probes)
        .map_err(|_| "off-CPU stacks: the lab runs no eBPF agent (it needs root)".to_string())?;
    let secs = secs.round().max(1.0) as u64;
    let req = reqwest::Client::new()
        .get(format!(
            "{agent}/debug/offcpu?component={c}&seconds={secs}&format=collapsed"
        ))
        .timeout(Duration::from_secs(secs + 60));
    fetch_folded(
        req,
        &format!("off-CPU stacks of {c}"),
        "no thread switched",
        &prefix.with_extension("offcpu.folded"),
    )
    .await
}

/// Sends `req` and writes its folded-stacks answer to `path`; errors start with `what`.
async fn fetch_folded(
    req: reqwest::RequestBuilder,
    what: &str,
    if_empty: &str,
    path: &Path,
) -> Result<PathBuf, String> {
    let resp = req.send().await.map_err(|e| format!("{what}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!(
            "{what}: {} {}",
            resp.status(),
            resp.text().await.unwrap_or_default().trim()
        ));
    }
    let body = resp.text().await.map_err(|e| format!("{what}: {e}"))?;
    if body.trim().is_empty() {
        return Err(format!("{what}: {if_empty}"));
    }
    std::fs::write(path, body).map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(path.to_owned())
}

fn render(folded: &Path, title: &str, svg: &Path) -> Result<(), String> {
    let mut opts = inferno::flamegraph::Options::default();
    opts.title = title.to_owned();
    let out = std::fs::File::create(svg).map_err(|e| format!("creating {}: {e}", svg.display()))?;
    inferno::flamegraph::from_files(&mut opts, &[folded.to_owned()], out)
        .map_err(|e| format!("rendering {}: {e}", svg.display()))
}

/// What one kind of profile produced: (baseline, fault, differential) SVG names.
type Rendered = (Option<String>, Option<String>, Option<String>);

/// Renders `<kind>baseline.svg`, `<kind>fault.svg` and `<kind>differential.svg` from what was
/// captured; notes what could not be.
fn render_pair(
    dir: &Path,
    file_prefix: &str,
    what: &str,
    c: Component,
    baseline: Option<Result<PathBuf, String>>,
    fault: Option<Result<PathBuf, String>>,
    notes: &mut Vec<String>,
) -> Rendered {
    let mut ok = |r: Option<Result<PathBuf, String>>, name: &str, title: &str| -> Option<PathBuf> {
        match r {
            Some(Ok(folded)) => {
                let svg = dir.join(format!("{file_prefix}{name}.svg"));
                match render(&folded, title, &svg) {
                    Ok(()) => Some(folded),
                    Err(e) => {
                        notes.push(e);
                        None
                    }
                }
            }
            Some(Err(e)) => {
                notes.push(e);
                None
            }
            None => None,
        }
    };
    let base = ok(
        baseline,
        "baseline",
        &format!("{c}: {what} before the fault"),
    );
    let during = ok(fault, "fault", &format!("{c}: {what} during the fault"));
    let mut out: Rendered = (
        base.is_some().then(|| format!("{file_prefix}baseline.svg")),
        during.is_some().then(|| format!("{file_prefix}fault.svg")),
        None,
    );
    if let (Some(b), Some(f)) = (base, during) {
        let diff = dir.join(format!("{file_prefix}differential.folded"));
        let made = std::fs::File::create(&diff)
            .map_err(|e| e.to_string())
            .and_then(|out| {
                inferno::differential::from_files(
                    inferno::differential::Options::default(),
                    &b,
                    &f,
                    out,
                )
                .map_err(|e| e.to_string())
            })
            .and_then(|()| {
                render(
                    &diff,
                    &format!("{c}: differential {what} (red = more during the fault)"),
                    &dir.join(format!("{file_prefix}differential.svg")),
                )
            });
        match made {
            Ok(()) => out.2 = Some(format!("{file_prefix}differential.svg")),
            Err(e) => notes.push(format!("differential {what} flamegraph: {e}")),
        }
    }
    out
}

/// Captured profiles of one phase: the CPU profile and, when asked for, the off-CPU stacks.
pub type Captured = Option<Result<PathBuf, String>>;

/// Renders what was captured (CPU, and off-CPU when `off_cpu` holds captures); notes what
/// could not be.
pub fn assemble(
    dir: &Path,
    c: Component,
    baseline: Captured,
    fault: Captured,
    off_cpu: Option<(Captured, Captured)>,
) -> Profiles {
    let mut notes = Vec::new();
    let (baseline_svg, fault_svg, differential_svg) =
        render_pair(dir, "", "CPU", c, baseline, fault, &mut notes);
    let (offcpu_baseline_svg, offcpu_fault_svg, offcpu_differential_svg) = match off_cpu {
        Some((b, f)) => render_pair(dir, "offcpu-", "off-CPU time", c, b, f, &mut notes),
        None => (None, None, None),
    };
    Profiles {
        component: c.to_string(),
        baseline_svg,
        fault_svg,
        differential_svg,
        offcpu_baseline_svg,
        offcpu_fault_svg,
        offcpu_differential_svg,
        note: (!notes.is_empty()).then(|| notes.join("; ")),
    }
}
