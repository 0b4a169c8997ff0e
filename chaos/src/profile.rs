//! Profiling during chaos: CPU profiles of one component (folded stacks from its
//! `/debug/pprof/profile?format=collapsed` endpoint) during the baseline and during the fault,
//! rendered as flamegraphs with inferno, plus the differential flamegraph (red: more samples
//! during the fault, blue: fewer).

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
    let resp = req
        .send()
        .await
        .map_err(|e| format!("profiling {c}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!(
            "profiling {c}: {} {}",
            resp.status(),
            resp.text().await.unwrap_or_default()
        ));
    }
    let body = resp
        .text()
        .await
        .map_err(|e| format!("profiling {c}: {e}"))?;
    if body.trim().is_empty() {
        return Err(format!("profiling {c}: the profile is empty (no samples)"));
    }
    let path = prefix.with_extension("folded");
    std::fs::write(&path, body).map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(path)
}

fn render(folded: &Path, title: &str, svg: &Path) -> Result<(), String> {
    let mut opts = inferno::flamegraph::Options::default();
    opts.title = title.to_owned();
    let out = std::fs::File::create(svg).map_err(|e| format!("creating {}: {e}", svg.display()))?;
    inferno::flamegraph::from_files(&mut opts, &[folded.to_owned()], out)
        .map_err(|e| format!("rendering {}: {e}", svg.display()))
}

/// Renders what was captured; notes what could not be.
pub fn assemble(
    dir: &Path,
    c: Component,
    baseline: Option<Result<PathBuf, String>>,
    fault: Option<Result<PathBuf, String>>,
) -> Profiles {
    let mut p = Profiles {
        component: c.to_string(),
        ..Profiles::default()
    };
    let mut notes = Vec::new();
    let mut ok = |r: Option<Result<PathBuf, String>>, name: &str, title: &str| -> Option<PathBuf> {
        match r {
            Some(Ok(folded)) => {
                let svg = dir.join(format!("{name}.svg"));
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
    let base = ok(baseline, "baseline", &format!("{c}: CPU before the fault"));
    let during = ok(fault, "fault", &format!("{c}: CPU during the fault"));
    if base.is_some() {
        p.baseline_svg = Some("baseline.svg".into());
    }
    if during.is_some() {
        p.fault_svg = Some("fault.svg".into());
    }
    if let (Some(b), Some(f)) = (base, during) {
        let diff = dir.join("differential.folded");
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
                    &format!("{c}: differential (red = more CPU during the fault)"),
                    &dir.join("differential.svg"),
                )
            });
        match made {
            Ok(()) => p.differential_svg = Some("differential.svg".into()),
            Err(e) => notes.push(format!("differential flamegraph: {e}")),
        }
    }
    if !notes.is_empty() {
        p.note = Some(notes.join("; "));
    }
    p
}
