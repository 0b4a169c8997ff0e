//! Network namespaces by name, the `ip netns` way (a bind mount at `/run/netns/<name>`), and
//! how a process gets into one — plus into its cgroups — before it runs.
//!
//! - [`command`]: a `std::process::Command` whose child enters a namespace before exec (what
//!   `ip netns exec` does, without the extra process): run `iptables`, `ss`, `rabbitmqctl`
//!   inside a component's namespace;
//! - [`run_in`]: runs a closure on a short-lived thread that entered a namespace (sockets it
//!   creates stay in that namespace: port checks, connections "from inside");
//! - [`enter_on_exec`]: how the supervisor puts a component into its namespace and cgroups
//!   between fork and exec, so the component and every descendant start inside.

use std::ffi::OsStr;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use nix::sched::CloneFlags;
use nix::unistd::{Gid, Uid};

/// Where `ip netns` keeps its named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// `/run/netns/<name>`.
pub fn path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// A named namespace exists.
pub fn exists(name: &str) -> bool {
    path(name).exists()
}

fn open(name: &str) -> anyhow::Result<File> {
    let p = path(name);
    File::open(&p).with_context(|| {
        format!(
            "opening network namespace {name} ({}): does it exist? (`ip netns list`)",
            p.display()
        )
    })
}

/// `program` as a command that runs inside namespace `name` (the namespace is opened now, and
/// entered by the child before exec). Equivalent to `ip netns exec <name> <program>`.
pub fn command(name: &str, program: impl AsRef<OsStr>) -> anyhow::Result<std::process::Command> {
    let ns = open(name)?;
    let mut cmd = std::process::Command::new(program);
    enter_on_exec(&mut cmd, Some(ns), Vec::new(), None);
    Ok(cmd)
}

/// Runs `f` on a thread that joined namespace `name`; the caller's threads are not affected.
/// Sockets `f` creates belong to that namespace for their whole life.
pub fn run_in<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    let ns = open(name)?;
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("entering network namespace {name} (setns)"))?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the thread running in network namespace {name} panicked"))?
    })
}

/// Device and inode of a namespace file (`/proc/PID/ns/net`, `/run/netns/NAME`): two files
/// name the same namespace exactly when these are equal.
pub fn identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The network namespace `pid` lives in, as [`identity`].
pub fn of_process(pid: i32) -> Option<(u64, u64)> {
    identity(Path::new(&format!("/proc/{pid}/ns/net")))
}

/// Makes the child of `cmd`, between fork and exec: join the network namespace `netns`, join
/// the cgroups whose `cgroup.procs` files are `procs` (opened for writing), then — last, since
/// it drops the right to do the rest — become `user`. Do not also call `cmd.uid()`: std would
/// switch user before this runs.
#[allow(unsafe_code)]
pub(crate) fn enter_on_exec(
    cmd: &mut std::process::Command,
    netns: Option<File>,
    procs: Vec<File>,
    user: Option<(Uid, Gid)>,
) {
    use std::os::unix::process::CommandExt as _;
    let enter = move || -> std::io::Result<()> {
        if let Some(ns) = &netns {
            nix::sched::setns(ns, CloneFlags::CLONE_NEWNET)?;
        }
        for f in &procs {
            // In cgroup v1, writing 0 to cgroup.procs moves the writing process.
            nix::unistd::write(f, b"0")?;
        }
        if let Some((uid, gid)) = user {
            nix::unistd::setgroups(&[])?;
            nix::unistd::setgid(gid)?;
            nix::unistd::setuid(uid)?;
        }
        Ok(())
    };
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // work is allowed. It makes plain system calls (setns, write, setgroups, setgid, setuid) on
    // file descriptors opened by the parent beforehand, allocates nothing, takes no lock, and
    // turns errors into `io::Error` from a raw errno (no allocation either).
    unsafe {
        cmd.pre_exec(enter);
    }
}
