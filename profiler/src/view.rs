//! `profiler view`: writes `<dir>/index.html` linking (and embedding) every flamegraph of a
//! profiles folder, with the category breakdown when `profiler analyze` has run, and opens it
//! in a browser when there is one; otherwise prints its path and serves the folder on a local
//! port (loopback only) until Ctrl-C.

use crate::analyze::Analysis;
use anyhow::Context as _;
use axum::extract::{Path as UrlPath, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// A titled list of flamegraphs (`<service><suffix>`), each with a link to its companion file
/// (`(label, <service><companion suffix>)`); nothing when `svgs` is empty.
fn flamegraph_list(
    html: &mut String,
    title: &str,
    svgs: &[&String],
    suffix: &str,
    (label, companion): (&str, &str),
) {
    if svgs.is_empty() {
        return;
    }
    let _ = writeln!(html, "<h2>{}</h2><ul>", esc(title));
    for svg in svgs {
        let service = svg.trim_end_matches(suffix);
        let _ = writeln!(
            html,
            "<li><a href=\"{s}\">{svc}</a> (<a href=\"{svc}{companion}\">{label}</a>)</li>",
            s = esc(svg),
            svc = esc(service),
            companion = esc(companion),
            label = esc(label)
        );
    }
    let _ = writeln!(html, "</ul>");
}

/// Writes `<dir>/index.html` and returns its path.
pub fn write_index(dir: &Path) -> anyhow::Result<PathBuf> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    let cpu: Vec<&String> = names
        .iter()
        .filter(|n| n.ends_with(".svg") && !n.ends_with(".heap.svg") && !n.ends_with(".offcpu.svg"))
        .collect();
    let heap: Vec<&String> = names.iter().filter(|n| n.ends_with(".heap.svg")).collect();
    let off_cpu: Vec<&String> = names
        .iter()
        .filter(|n| n.ends_with(".offcpu.svg"))
        .collect();
    anyhow::ensure!(
        !cpu.is_empty() || !heap.is_empty(),
        "no flamegraphs (*.svg) in {}",
        dir.display()
    );
    let manifest: Option<serde_json::Value> = std::fs::read(dir.join("manifest.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let title = format!(
        "Profiles {}",
        dir.file_name().and_then(|n| n.to_str()).unwrap_or_default()
    );
    let mut html = String::new();
    let _ = write!(
        html,
        r#"<!doctype html>
<html><head><meta charset="utf-8"><title>{t}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; max-width: 1300px; }}
table {{ border-collapse: collapse; margin: .5em 0 1em; }}
td, th {{ border: 1px solid #ccc; padding: .2em .6em; text-align: left; vertical-align: top; }}
td.n {{ text-align: right; }}
object {{ width: 100%; border: 1px solid #ddd; }}
.note {{ color: #555; font-size: .9em; }}
</style></head><body>
<h1>{t}</h1>
"#,
        t = esc(&title)
    );
    if let Some(m) = &manifest {
        let _ = writeln!(
            html,
            "<p>{} profile, {} s at {} Hz, started {}; load {} orders/s to {}.</p>",
            esc(m["kind"].as_str().unwrap_or("cpu")),
            m["seconds"],
            m["hz"],
            esc(m["started_at"].as_str().unwrap_or("?")),
            m["load"]["rate_per_sec"],
            esc(m["load"]["target"].as_str().unwrap_or("?"))
        );
        if let Some(o) = m["off_cpu"].as_str() {
            let _ = writeln!(html, "<p class=\"note\">Off-CPU: {}</p>", esc(o));
        }
    }
    let _ = writeln!(html, "<h2>CPU flamegraphs</h2><ul>");
    for svg in &cpu {
        let service = svg.trim_end_matches(".svg");
        let _ = write!(
            html,
            "<li><a href=\"{s}\">{svc}</a> (<a href=\"{svc}.pb.gz\">pprof</a>, <a href=\"{svc}.collapsed\">collapsed</a>",
            s = esc(svg),
            svc = esc(service)
        );
        if names.contains(&format!("{service}.analysis.json")) {
            let _ = write!(
                html,
                ", <a href=\"{}.analysis.json\">analysis</a>",
                esc(service)
            );
        }
        let _ = writeln!(html, ")</li>");
    }
    let _ = writeln!(html, "</ul>");
    flamegraph_list(
        &mut html,
        "Heap flamegraphs (jemalloc, in use)",
        &heap,
        ".heap.svg",
        ("pprof", ".heap.pb.gz"),
    );
    flamegraph_list(
        &mut html,
        "Off-CPU flamegraphs (eBPF: where the threads waited)",
        &off_cpu,
        ".offcpu.svg",
        ("collapsed", ".offcpu.collapsed"),
    );
    if !off_cpu.is_empty() {
        let _ = writeln!(
            html,
            "<p class=\"note\">Off-CPU: width = thread time spent off the CPU during the window, by the user stack under the kernel stack (<code>_[k]</code>) where the thread stopped. Idle runtime workers (parked in <code>epoll_wait</code> or a futex) are most of it in a lightly loaded service; blocking calls (fdatasync), lock waits and preemption (<code>exit_to_user_mode_loop</code>) are the rest. An async task waiting for PostgreSQL blocks no thread and is not here.</p>"
        );
    }
    let metrics: Vec<&String> = names
        .iter()
        .filter(|n| n.ends_with(".metrics.txt"))
        .collect();
    if !metrics.is_empty() {
        let _ = write!(html, "<p>Metrics snapshots: ");
        let links: Vec<String> = metrics
            .iter()
            .map(|m| format!("<a href=\"{0}\">{0}</a>", esc(m)))
            .collect();
        let _ = writeln!(html, "{}</p>", links.join(", "));
    }
    for svg in cpu.iter().chain(heap.iter()).chain(off_cpu.iter()) {
        let service = svg.trim_end_matches(".heap.svg").trim_end_matches(".svg");
        let _ = writeln!(html, "<h2 id=\"{0}\">{0}</h2>", esc(svg));
        if !svg.ends_with(".heap.svg")
            && !svg.ends_with(".offcpu.svg")
            && let Some(a) = std::fs::read(dir.join(format!("{service}.analysis.json")))
                .ok()
                .and_then(|b| serde_json::from_slice::<Analysis>(&b).ok())
        {
            html.push_str(&analysis_table(&a));
        }
        let _ = writeln!(
            html,
            "<object data=\"{0}\" type=\"image/svg+xml\" height=\"700\"><a href=\"{0}\">{0}</a></object>",
            esc(svg)
        );
    }
    let _ = writeln!(
        html,
        "<p class=\"note\">Flamegraphs: width = share of samples, stacks grow upward from the thread (root) to the function on the CPU (top); click to zoom, Ctrl-F to search. {}</p>\n</body></html>",
        esc(crate::analyze::CPU_IS_NOT_LATENCY)
    );
    let path = dir.join("index.html");
    std::fs::write(&path, html).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

fn analysis_table(a: &Analysis) -> String {
    let mut t = String::from(
        "<table><tr><th>category</th><th>CPU share</th><th>top functions (share of all CPU)</th></tr>\n",
    );
    for c in &a.categories {
        let top: Vec<String> = c
            .top_functions
            .iter()
            .take(3)
            .map(|f| format!("<code>{}</code> {:.1} %", esc(&f.function), f.share_pct))
            .collect();
        let _ = writeln!(
            t,
            "<tr><td>{}</td><td class=\"n\">{:.1} %</td><td>{}</td></tr>",
            esc(&c.label),
            c.share_pct,
            top.join("<br>")
        );
    }
    t.push_str("</table>\n");
    for s in &a.suggestions {
        let _ = writeln!(
            t,
            "<p class=\"note\"><b>{}</b> ({:.1} %): {}</p>",
            esc(&s.category),
            s.share_pct,
            esc(&s.text)
        );
    }
    t
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A command that opens a file in a browser, if this machine has a browser and a display.
pub fn browser() -> Option<String> {
    let on_path = |cmd: &str| {
        std::env::var_os("PATH")
            .is_some_and(|paths| std::env::split_paths(&paths).any(|p| p.join(cmd).is_file()))
    };
    if let Ok(b) = std::env::var("BROWSER")
        && !b.trim().is_empty()
    {
        return Some(b);
    }
    if cfg!(target_os = "macos") && on_path("open") {
        return Some("open".into());
    }
    let display =
        std::env::var_os("DISPLAY").is_some() || std::env::var_os("WAYLAND_DISPLAY").is_some();
    if !display {
        return None;
    }
    [
        "xdg-open",
        "sensible-browser",
        "x-www-browser",
        "firefox",
        "chromium",
    ]
    .into_iter()
    .find(|c| on_path(c))
    .map(str::to_string)
}

/// Serves the files of `dir` on `listener` (GET only, no directory listing except `/` ->
/// `index.html`) until `stop` resolves.
pub async fn serve(
    dir: PathBuf,
    listener: tokio::net::TcpListener,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let app = axum::Router::new()
        .route("/", axum::routing::get(index_file))
        .route("/{*path}", axum::routing::get(file))
        .with_state(dir);
    axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
        .context("serving the profiles")
}

async fn index_file(State(dir): State<PathBuf>) -> Response {
    send(&dir, "index.html").await
}

async fn file(State(dir): State<PathBuf>, UrlPath(path): UrlPath<String>) -> Response {
    send(&dir, &path).await
}

async fn send(dir: &Path, name: &str) -> Response {
    // Only plain file names inside the folder: no `..`, no sub-folders, no absolute paths.
    let plain = !name.is_empty()
        && !name.contains('/')
        && !name.contains('\\')
        && name != ".."
        && name != ".";
    if !plain {
        return (StatusCode::NOT_FOUND, "not found\n").into_response();
    }
    let ty = match name.rsplit_once('.').map(|(_, e)| e) {
        Some("html") => "text/html; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("json") => "application/json",
        Some("gz") => "application/gzip",
        Some("md" | "txt" | "collapsed") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    };
    match tokio::fs::read(dir.join(name)).await {
        Ok(bytes) => ([(header::CONTENT_TYPE, ty)], bytes).into_response(),
        Err(_) => (StatusCode::NOT_FOUND, "not found\n").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn index_links_every_flamegraph_and_the_server_stays_in_its_folder() {
        let dir = tempfile::tempdir().expect("tempdir");
        for f in [
            "order-gateway.svg",
            "order-gateway.pb.gz",
            "order-gateway.heap.svg",
            "order-gateway.offcpu.svg",
            "persistence.svg",
        ] {
            std::fs::write(dir.path().join(f), "<svg/>").expect("write");
        }
        let index = write_index(dir.path()).expect("index");
        let html = std::fs::read_to_string(&index).expect("read");
        for want in [
            "href=\"order-gateway.svg\"",
            "href=\"persistence.svg\"",
            "href=\"order-gateway.heap.svg\"",
            "href=\"order-gateway.offcpu.svg\"",
            "href=\"order-gateway.offcpu.collapsed\"",
            "CPU share is not latency share",
        ] {
            assert!(html.contains(want), "{want}");
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(dir.path().to_owned(), listener, async move {
            let _ = rx.await;
        }));
        let get = |p: &str| {
            let url = format!("http://{addr}{p}");
            async move {
                let r = reqwest::get(url).await.expect("get");
                (
                    r.status().as_u16(),
                    r.headers()
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string(),
                )
            }
        };
        assert_eq!(get("/").await, (200, "text/html; charset=utf-8".into()));
        assert_eq!(get("/persistence.svg").await, (200, "image/svg+xml".into()));
        assert_eq!(get("/..%2Fetc%2Fpasswd").await.0, 404);
        assert_eq!(get("/missing.svg").await.0, 404);
        let _ = tx.send(());
        server.await.expect("join").expect("served");
    }
}
