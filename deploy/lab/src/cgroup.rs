//! The lab's cgroup v1 folders: `/sys/fs/cgroup/<controller>/<lab>/<component>` for the
//! controllers chaos experiments use (`cpu`, `memory`, `blkio`).
//!
//! A component's processes join its folders between fork and exec (see
//! [`crate::netns::enter_on_exec`]), so every descendant is inside too and a limit or a kill
//! through `cgroup.procs` reaches exactly one component. No limit is set here: the lab only
//! creates, lists, kills and removes. Removal refuses any path that is not a lab folder
//! ([`is_lab_cgroup`]), so a damaged state file cannot make the lab kill outside its own.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use nix::sys::signal::Signal;

use crate::process;

/// Where the v1 hierarchies are mounted.
pub const MOUNT: &str = "/sys/fs/cgroup";

/// The controllers the lab gives every component a folder in.
pub const CONTROLLERS: [&str; 3] = ["cpu", "memory", "blkio"];

/// A file only a v1 hierarchy of each controller has (the cgroup2 mount has none of them).
fn marker(controller: &str) -> &'static str {
    match controller {
        "cpu" => "cpu.cfs_quota_us",
        "memory" => "memory.limit_in_bytes",
        "blkio" => "blkio.throttle.read_bps_device",
        _ => "cgroup.procs",
    }
}

/// Problems with the v1 hierarchies the lab needs (empty: all there).
pub fn problems() -> Vec<String> {
    CONTROLLERS
        .iter()
        .filter(|c| !Path::new(MOUNT).join(c).join(marker(c)).is_file())
        .map(|c| {
            format!(
                "no cgroup v1 {c} hierarchy at {MOUNT}/{c} (the lab needs cgroup v1 cpu, memory and blkio)"
            )
        })
        .collect()
}

/// `/sys/fs/cgroup/<controller>/<lab>`.
pub fn lab_dir(controller: &str, lab: &str) -> PathBuf {
    Path::new(MOUNT).join(controller).join(lab)
}

/// True for `/sys/fs/cgroup/{cpu,memory,blkio}/sxlXXXXXX` and one folder below it: the only
/// paths the lab ever removes or kills in.
pub fn is_lab_cgroup(path: &Path) -> bool {
    let Ok(rest) = path.strip_prefix(MOUNT) else {
        return false;
    };
    let parts: Vec<&str> = rest.iter().filter_map(|p| p.to_str()).collect();
    let clean = parts
        .iter()
        .all(|p| !p.is_empty() && *p != "." && *p != "..");
    let shape = match parts.as_slice() {
        [ctl, lab] | [ctl, lab, _] => {
            CONTROLLERS.contains(ctl) && crate::isolation::is_lab_name(lab)
        }
        _ => false,
    };
    clean && shape
}

/// Creates a folder (fine if it exists). In the memory hierarchy, makes sure limits count the
/// whole subtree (`memory.use_hierarchy`, always on in recent kernels).
pub fn create(dir: &Path) -> anyhow::Result<()> {
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("mkdir {}", dir.display())),
    }
    let hierarchy = dir.join("memory.use_hierarchy");
    if std::fs::read_to_string(&hierarchy).is_ok_and(|v| v.trim() == "0") {
        std::fs::write(&hierarchy, "1")
            .with_context(|| format!("writing 1 to {}", hierarchy.display()))?;
    }
    Ok(())
}

/// Pids in a folder (`cgroup.procs`; not its subfolders). A missing folder has none.
pub fn members(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Pids in a folder and all its subfolders.
fn members_deep(dir: &Path) -> Vec<i32> {
    let mut out = members(dir);
    for sub in subdirs(dir) {
        out.extend(members_deep(&sub));
    }
    out
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// SIGKILLs every process in the lab folders `dirs` (and their subfolders), waits up to
/// `timeout` for them to be gone, then removes the folders, deepest first. Folders that do not
/// exist are skipped, so this can run any number of times. Returns what was removed.
pub fn kill_and_remove(dirs: &[PathBuf], timeout: Duration) -> anyhow::Result<Vec<String>> {
    let mut removed = Vec::new();
    let dirs: Vec<&PathBuf> = dirs.iter().filter(|d| d.is_dir()).collect();
    for dir in &dirs {
        anyhow::ensure!(
            is_lab_cgroup(dir),
            "refusing to touch {}: not a lab cgroup ({MOUNT}/<controller>/sxlXXXXXX[/<component>])",
            dir.display()
        );
    }
    let deadline = Instant::now() + timeout;
    loop {
        let pids: Vec<i32> = dirs.iter().flat_map(|d| members_deep(d)).collect();
        if pids.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "processes {pids:?} are still in the lab's cgroups {} after SIGKILL and {}",
                dirs.iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                humantime::format_duration(timeout)
            );
        }
        for pid in pids {
            let _ = process::signal_process(pid, Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Deepest first: component folders (and anything below them) before the lab folders.
    let mut all: Vec<PathBuf> = Vec::new();
    for dir in &dirs {
        collect_tree(dir, &mut all);
    }
    all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    all.dedup();
    let mut errors = Vec::new();
    for dir in all {
        match std::fs::remove_dir(&dir) {
            Ok(()) => removed.push(format!("cgroup {}", dir.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => errors.push(format!("rmdir {}: {e}", dir.display())),
        }
    }
    anyhow::ensure!(errors.is_empty(), "{}", errors.join("; "));
    Ok(removed)
}

fn collect_tree(dir: &Path, out: &mut Vec<PathBuf>) {
    for sub in subdirs(dir) {
        collect_tree(&sub, out);
    }
    out.push(dir.to_path_buf());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_lab_folders_are_lab_cgroups() {
        for (path, ok) in [
            ("/sys/fs/cgroup/cpu/sxl0a1b2c", true),
            ("/sys/fs/cgroup/memory/sxl0a1b2c/order-gateway", true),
            ("/sys/fs/cgroup/blkio/sxl0a1b2c/postgres", true),
            ("/sys/fs/cgroup/cpu", false),
            ("/sys/fs/cgroup/cpu/", false),
            ("/sys/fs/cgroup/pids/sxl0a1b2c", false),
            ("/sys/fs/cgroup/cpu/docker/abc", false),
            ("/sys/fs/cgroup/cpu/sxl0a1b2c/a/b", false),
            ("/sys/fs/cgroup/cpu/sxl0a1b2c/..", false),
            ("/sys/fs/cgroup/cpu/sxlzzzzzz", false),
            ("/tmp/sxl0a1b2c", false),
        ] {
            assert_eq!(is_lab_cgroup(Path::new(path)), ok, "{path}");
        }
    }
}
