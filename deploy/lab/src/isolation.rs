//! Isolation of the components, the way containers are isolated, so a fault hits exactly one
//! component or one edge: as root, PostgreSQL, RabbitMQ and the three services each get a
//! network namespace on a lab bridge, and every component gets its own cgroups (cpu, memory,
//! blkio). Without root (or with `--isolation none`) everything stays on 127.0.0.1, and the
//! state file says why.
//!
//! Names and addresses of a lab, `NAME` = `sxl` + 6 hex digits of a hash of the lab root:
//!
//! ```text
//! bridge           NAME                          198.18.N.1/24 (the gateway address)
//! netns            NAME-pg NAME-mq NAME-me NAME-ps NAME-gw   (ip netns list)
//! veth (host side) same names as the netns, on the bridge; `eth0` inside
//! addresses        198.18.N.10 postgres, .11 rabbitmq, .12 matching-engine, .13 persistence,
//!                  .14 order-gateway    (10 + position in the component table)
//! cgroups          /sys/fs/cgroup/{cpu,memory,blkio}/NAME/<component>
//! host rule        iptables -I FORWARD -i NAME -o NAME -j ACCEPT  (only when bridged traffic
//!                  goes through iptables: net.bridge.bridge-nf-call-iptables = 1)
//! ```
//!
//! `N` is the lowest number not used by any IPv4 address or /24 route of the host, chosen under
//! a lock (`/run/sxl-lab.lock`) that is held until the new bridge holds its address, so labs
//! started at the same moment get distinct subnets inside 198.18.0.0/16 (the benchmarking
//! range 198.18.0.0/15 of RFC 2544, which never collides with a LAN or Docker's 172.x). The
//! first lab on a machine gets 198.18.0.0/24.
//!
//! Prometheus and the probe agent stay in the host namespace and reach the others through the
//! bridge; so do tests and loadgen. Bridge-local traffic needs no IPv4 forwarding, and the lab
//! does not enable it.
//!
//! The namespaces have no default route, on purpose: only the lab subnet (and so the host, at
//! the gateway address) is reachable, and anything else fails at once with "network is
//! unreachable". A default route via the bridge would only black-hole that traffic (the host
//! does not forward it), and then every DNS lookup inside the namespace waits for the
//! resolver's timeout — RabbitMQ's boot and stop each took 8-9 s longer that way, because
//! Erlang looks `localhost` up over IPv6 and /etc/hosts has no `::1 localhost`.
//!
//! Everything is recorded in the state file before it is created ([`Claim`]), and
//! [`teardown`] removes only what exists, so it can run any number of times: after a normal
//! shutdown, after a crash (`lab cleanup`), or on the next start of the same root.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::cgroup;
use crate::component::{Component, ComponentSet};
use crate::netns;
use crate::state::{HostRule, LabState};

/// Every name the lab creates (bridge, netns, veth, cgroup folder) starts with this.
pub const NAME_PREFIX: &str = "sxl";

/// The first two octets of every lab subnet: `198.18.N.0/24`.
pub const SUBNET_PREFIX: [u8; 2] = [198, 18];

/// Host part of the bridge's address (`198.18.N.1`).
pub const GATEWAY_HOST: u8 = 1;

/// Host part of the first component's address (`198.18.N.10` is postgres).
pub const FIRST_HOST: u8 = 10;

/// Serialises subnet allocation between labs on this machine.
const LOCK_FILE: &str = "/run/sxl-lab.lock";

/// Set when the host passes bridged IPv4 traffic through iptables (br_netfilter).
const BRIDGE_NF_CALL_IPTABLES: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";

/// How long teardown waits for the processes left in the lab's cgroups to die after SIGKILL.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// What the configuration asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// Isolate when running as root and the kernel has what it takes; otherwise loopback,
    /// with the reason in the state file.
    #[default]
    Auto,
    /// Loopback, no namespaces, no cgroups.
    None,
    /// Isolate, or refuse to start saying what is missing.
    Netns,
}

impl FromStr for Isolation {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Isolation::Auto),
            "none" => Ok(Isolation::None),
            "netns" => Ok(Isolation::Netns),
            other => bail!("unknown isolation {other:?} (expected auto, none or netns)"),
        }
    }
}

impl fmt::Display for Isolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Isolation::Auto => "auto",
            Isolation::None => "none",
            Isolation::Netns => "netns",
        })
    }
}

/// A component's place on the lab bridge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetnsMember {
    /// `ip netns` name.
    pub netns: String,
    /// Host side of the veth pair (same name as the namespace; `eth0` inside).
    pub veth: String,
    /// Its address; it listens there.
    pub address: Ipv4Addr,
}

/// The isolation of one lab: names, addresses and cgroup folders.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IsolationPlan {
    /// `sxl` + 6 hex digits: the bridge, the cgroup folder, the prefix of namespaces and veths.
    pub name: String,
    /// `N` of `198.18.N.0/24`.
    pub subnet_index: u8,
    /// The bridge's own address, `198.18.N.1`.
    pub gateway: Ipv4Addr,
    /// Components with their own network namespace.
    pub members: BTreeMap<Component, NetnsMember>,
    /// Cgroup folder of every component, per controller.
    pub cgroups: BTreeMap<Component, BTreeMap<String, PathBuf>>,
    /// The lab's cgroup folder per controller (parent of the components' folders).
    pub cgroup_parents: BTreeMap<String, PathBuf>,
    /// iptables rules added in the host namespace.
    pub host_rules: Vec<HostRule>,
}

/// `sxl` + 6 hex digits of the FNV-1a hash of the (canonical) lab root: short enough for
/// interface names (15 bytes, `sxl1a2b3c-gw` is 12) and distinct for distinct roots.
pub fn lab_name(root: &Path) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in root.as_os_str().as_encoded_bytes() {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{NAME_PREFIX}{:06x}", hash & 0xff_ffff)
}

/// `sxl` + 6 lowercase hex digits.
pub fn is_lab_name(name: &str) -> bool {
    name.strip_prefix(NAME_PREFIX).is_some_and(|h| {
        h.len() == 6
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// `sxlXXXXXX` or `sxlXXXXXX-xx`: the only interface and namespace names the lab deletes.
fn is_lab_link(name: &str) -> bool {
    match name.split_once('-') {
        None => is_lab_name(name),
        Some((lab, short)) => {
            is_lab_name(lab) && short.len() == 2 && short.bytes().all(|b| b.is_ascii_lowercase())
        }
    }
}

/// The address of `c` in subnet `index`: `198.18.index.(10 + position in the table)`.
pub fn address_of(index: u8, c: Component) -> Ipv4Addr {
    let [a, b] = SUBNET_PREFIX;
    Ipv4Addr::new(a, b, index, FIRST_HOST + c as u8)
}

impl IsolationPlan {
    /// The plan for lab `name` in subnet `index`; `forward_rule`: add the host FORWARD rule.
    pub fn new(name: &str, index: u8, components: &ComponentSet, forward_rule: bool) -> Self {
        let [a, b] = SUBNET_PREFIX;
        let members = components
            .iter()
            .filter(|c| c.spec().netns)
            .map(|c| {
                let ns = format!("{name}-{}", c.spec().short);
                let member = NetnsMember {
                    veth: ns.clone(),
                    netns: ns,
                    address: address_of(index, c),
                };
                (c, member)
            })
            .collect();
        let cgroup_parents: BTreeMap<String, PathBuf> = cgroup::CONTROLLERS
            .iter()
            .map(|ctl| (ctl.to_string(), cgroup::lab_dir(ctl, name)))
            .collect();
        let cgroups = components
            .iter()
            .map(|c| {
                let dirs = cgroup_parents
                    .iter()
                    .map(|(ctl, dir)| (ctl.clone(), dir.join(c.name())))
                    .collect();
                (c, dirs)
            })
            .collect();
        let comment = format!("lab {name}: traffic between lab components");
        let host_rules = if forward_rule {
            vec![HostRule {
                table: "filter".to_string(),
                chain: "FORWARD".to_string(),
                rule: [
                    "-i",
                    name,
                    "-o",
                    name,
                    "-m",
                    "comment",
                    "--comment",
                    comment.as_str(),
                    "-j",
                    "ACCEPT",
                ]
                .map(String::from)
                .to_vec(),
            }]
        } else {
            Vec::new()
        };
        IsolationPlan {
            name: name.to_string(),
            subnet_index: index,
            gateway: Ipv4Addr::new(a, b, index, GATEWAY_HOST),
            members,
            cgroups,
            cgroup_parents,
            host_rules,
        }
    }

    /// The bridge's name (the lab name).
    pub fn bridge(&self) -> &str {
        &self.name
    }

    /// `198.18.N.0/24`.
    pub fn subnet(&self) -> String {
        let [a, b] = SUBNET_PREFIX;
        format!("{a}.{b}.{}.0/24", self.subnet_index)
    }

    /// `c`'s place on the bridge, if it has its own namespace.
    pub fn member(&self, c: Component) -> Option<&NetnsMember> {
        self.members.get(&c)
    }

    /// `c`'s cgroup folder in `controller` (`cpu`, `memory`, `blkio`).
    pub fn cgroup(&self, c: Component, controller: &str) -> Option<&Path> {
        self.cgroups
            .get(&c)
            .and_then(|m| m.get(controller))
            .map(PathBuf::as_path)
    }

    /// Writes the plan into a state (lab and component fields).
    pub fn record(&self, state: &mut LabState) {
        state.bridge = Some(self.name.clone());
        state.subnet = Some(self.subnet());
        state.gateway_address = Some(self.gateway);
        state.cgroup = self.cgroup_parents.clone();
        state.host_rules = self.host_rules.clone();
        for cs in &mut state.components {
            if let Some(m) = self.members.get(&cs.name) {
                cs.netns = Some(m.netns.clone());
                cs.veth = Some(m.veth.clone());
                cs.address = Some(m.address);
            }
            cs.cgroup = self.cgroups.get(&cs.name).cloned().unwrap_or_default();
        }
    }

    /// Where a process of `c` goes before exec.
    pub(crate) fn placement(&self, c: Component) -> Placement {
        Placement {
            netns: self.member(c).map(|m| m.netns.clone()),
            cgroups: self
                .cgroups
                .get(&c)
                .map(|m| m.values().cloned().collect())
                .unwrap_or_default(),
        }
    }
}

/// Where a component's processes go before exec: its namespace (if any) and its cgroups.
#[derive(Clone, Debug, Default)]
pub(crate) struct Placement {
    pub netns: Option<String>,
    pub cgroups: Vec<PathBuf>,
}

impl Placement {
    /// Makes `cmd`'s child enter the namespace and cgroups before exec, then become `user`.
    pub(crate) fn apply(
        &self,
        cmd: &mut std::process::Command,
        user: Option<(nix::unistd::Uid, nix::unistd::Gid)>,
    ) -> anyhow::Result<()> {
        let ns = match &self.netns {
            Some(name) => Some(
                File::open(netns::path(name))
                    .with_context(|| format!("opening network namespace {name}"))?,
            ),
            None => None,
        };
        let procs = self
            .cgroups
            .iter()
            .map(|dir| {
                let p = dir.join("cgroup.procs");
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .with_context(|| format!("opening {}", p.display()))
            })
            .collect::<anyhow::Result<Vec<File>>>()?;
        netns::enter_on_exec(cmd, ns, procs, user);
        Ok(())
    }

    /// Pids in the component's cgroups right now.
    pub(crate) fn members(&self) -> BTreeSet<i32> {
        self.cgroups
            .iter()
            .flat_map(|d| cgroup::members(d))
            .collect()
    }
}

/// Whether a lab with this configuration is isolated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    On,
    /// Off, and why.
    Off(String),
}

/// Decides from what is asked, whether we are root, and what this host lacks
/// ([`host_problems`]). `Err`: isolation was demanded (`netns`) and cannot be had.
pub fn decide(
    requested: Isolation,
    is_root: bool,
    host_problems: &[String],
) -> Result<Decision, Vec<String>> {
    match requested {
        Isolation::None => Ok(Decision::Off(
            "disabled by configuration (--isolation none)".to_string(),
        )),
        Isolation::Netns if !is_root => Err(vec![
            "--isolation netns needs root (network namespaces, the lab bridge and cgroups): \
             run as root, or use --isolation auto or none"
                .to_string(),
        ]),
        _ if !is_root => Ok(Decision::Off(
            "not running as root: network namespaces, the lab bridge and cgroups need root, so \
             every component listens on 127.0.0.1 and experiments that need isolation will refuse"
                .to_string(),
        )),
        _ if !host_problems.is_empty() => {
            if requested == Isolation::Netns {
                Err(host_problems
                    .iter()
                    .map(|p| format!("--isolation netns: {p}"))
                    .collect())
            } else {
                Ok(Decision::Off(format!(
                    "this host cannot isolate: {}",
                    host_problems.join("; ")
                )))
            }
        }
        _ => Ok(Decision::On),
    }
}

/// What this host lacks for isolation: `ip`, `iptables` (needed when bridged traffic goes
/// through iptables, and by the chaos faults), the cgroup v1 hierarchies.
pub fn host_problems() -> Vec<String> {
    let mut problems = Vec::new();
    if tool("ip").is_none() {
        problems.push("`ip` not found (install iproute2)".to_string());
    }
    if tool("iptables").is_none() {
        problems.push("`iptables` not found (install iptables)".to_string());
    }
    problems.extend(cgroup::problems());
    problems
}

/// Finds a system tool on PATH, then in /usr/sbin and /sbin (not always on a user's PATH).
fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Runs a system tool; a failure names the whole command line and carries its stderr.
fn run(name: &str, args: &[&str]) -> anyhow::Result<String> {
    let line = format!("{name} {}", args.join(" "));
    let program = tool(name).with_context(|| format!("`{line}`: {name} not found"))?;
    let out = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("running `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> anyhow::Result<String> {
    run("ip", args)
}

fn iptables(verb: &str, rule: &HostRule) -> anyhow::Result<String> {
    let mut args = vec!["-w", "-t", &rule.table, verb, &rule.chain];
    args.extend(rule.rule.iter().map(String::as_str));
    run("iptables", &args)
}

/// Bridged IPv4 traffic passes through the host's iptables (so a FORWARD policy of DROP, as
/// Docker sets it, would cut the components off from each other).
pub fn bridged_traffic_hits_iptables() -> bool {
    std::fs::read_to_string(BRIDGE_NF_CALL_IPTABLES).is_ok_and(|v| v.trim() == "1")
}

/// `N`s of `198.18.N.0/24` in use on this host, from `ip -4 -o addr show` and `ip -4 route
/// show` output: any address in it, or any route to it (or a part of it).
fn used_subnets(addrs: &str, routes: &str) -> BTreeSet<u8> {
    let [a, b] = SUBNET_PREFIX;
    let mut used = BTreeSet::new();
    let mut mark = |cidr: &str, whole_prefix_counts: bool| {
        let (addr, len) = cidr.split_once('/').unwrap_or((cidr, "32"));
        let (Ok(addr), Ok(len)) = (addr.parse::<Ipv4Addr>(), len.parse::<u8>()) else {
            return;
        };
        let o = addr.octets();
        if o[0] == a && o[1] == b && (whole_prefix_counts || len >= 24) {
            used.insert(o[2]);
        }
    };
    for line in addrs.lines() {
        let mut words = line.split_whitespace();
        if words.any(|w| w == "inet")
            && let Some(cidr) = words.next()
        {
            mark(cidr, true);
        }
    }
    for line in routes.lines() {
        if let Some(dest) = line.split_whitespace().next() {
            mark(dest, false);
        }
    }
    used
}

/// An allocated, recorded, not yet created isolation: holds the allocation lock until the
/// bridge holds its address.
pub struct Claim {
    plan: IsolationPlan,
    lock: Option<nix::fcntl::Flock<File>>,
}

impl fmt::Debug for Claim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Claim").field("plan", &self.plan).finish()
    }
}

impl Claim {
    /// Takes the allocation lock and picks the lowest free subnet for lab `name`.
    pub fn allocate(name: &str, components: &ComponentSet) -> anyhow::Result<Claim> {
        anyhow::ensure!(is_lab_name(name), "{name:?} is not a lab name");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_FILE)
            .with_context(|| format!("opening {LOCK_FILE}"))?;
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| anyhow::anyhow!("locking {LOCK_FILE}: {e}"))?;
        let used = used_subnets(
            &ip(&["-4", "-o", "addr", "show"])?,
            &ip(&["-4", "route", "show"])?,
        );
        let index = (0..=u8::MAX).find(|n| !used.contains(n)).with_context(|| {
            format!(
                "every subnet 198.18.N.0/24 is in use on this host ({} labs or leftovers? `ip -4 addr | grep 198.18`)",
                used.len()
            )
        })?;
        Ok(Claim {
            plan: IsolationPlan::new(name, index, components, bridged_traffic_hits_iptables()),
            lock: Some(lock),
        })
    }

    /// The plan: record it (state file) before calling [`Claim::create`].
    pub fn plan(&self) -> &IsolationPlan {
        &self.plan
    }

    /// Creates everything in the plan. On failure, removes what was created and says which
    /// command failed.
    pub fn create(mut self) -> anyhow::Result<IsolationPlan> {
        let result = self.create_all();
        self.lock = None;
        match result {
            Ok(()) => Ok(self.plan),
            Err(e) => {
                if let Err(undo) = teardown(&Leftovers::from_plan(&self.plan)) {
                    tracing::warn!(error = %format!("{undo:#}"), "removing a half-made isolation");
                }
                Err(e.context(format!(
                    "setting up isolation {} ({})",
                    self.plan.name,
                    self.plan.subnet()
                )))
            }
        }
    }

    fn create_all(&mut self) -> anyhow::Result<()> {
        let plan = &self.plan;
        let bridge = plan.bridge();
        if Path::new("/sys/class/net").join(bridge).exists() {
            bail!(
                "interface {bridge} already exists: another lab with the same name, or leftovers \
                 of one (`lab cleanup --root <its root>`, or `ip link del {bridge}`)"
            );
        }
        ip(&["link", "add", bridge, "type", "bridge"])?;
        let gateway = format!("{}/24", plan.gateway);
        ip(&["addr", "add", &gateway, "dev", bridge])?;
        ip(&["link", "set", bridge, "up"])?;
        // The subnet is claimed (the bridge holds its address): other labs may allocate now.
        self.lock = None;
        for rule in &plan.host_rules {
            iptables("-I", rule)?;
        }
        for dir in plan.cgroup_parents.values() {
            cgroup::create(dir)?;
        }
        for dirs in plan.cgroups.values() {
            for dir in dirs.values() {
                cgroup::create(dir)?;
            }
        }
        for m in plan.members.values() {
            let ns = m.netns.as_str();
            let address = format!("{}/24", m.address);
            ip(&["netns", "add", ns])?;
            ip(&[
                "link", "add", &m.veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ])?;
            ip(&["link", "set", "dev", &m.veth, "master", bridge, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "addr", "add", &address, "dev", "eth0"])?;
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
            // Deliberately no default route: see the module documentation.
        }
        Ok(())
    }
}

/// What a lab may have left in the kernel: the input of [`teardown`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Leftovers {
    pub bridge: Option<String>,
    /// Host sides of veth pairs.
    pub veths: Vec<String>,
    pub netns: Vec<String>,
    /// Component folders, then lab folders.
    pub cgroups: Vec<PathBuf>,
    pub host_rules: Vec<HostRule>,
}

impl Leftovers {
    /// Everything a state file records.
    pub fn from_state(state: &LabState) -> Self {
        let mut cgroups: Vec<PathBuf> = state
            .components
            .iter()
            .flat_map(|c| c.cgroup.values().cloned())
            .collect();
        cgroups.extend(state.cgroup.values().cloned());
        Leftovers {
            bridge: state.bridge.clone(),
            veths: state
                .components
                .iter()
                .filter_map(|c| c.veth.clone())
                .collect(),
            netns: state
                .components
                .iter()
                .filter_map(|c| c.netns.clone())
                .collect(),
            cgroups,
            host_rules: state.host_rules.clone(),
        }
    }

    /// Everything a plan names.
    pub fn from_plan(plan: &IsolationPlan) -> Self {
        let mut cgroups: Vec<PathBuf> = plan
            .cgroups
            .values()
            .flat_map(|m| m.values().cloned())
            .collect();
        cgroups.extend(plan.cgroup_parents.values().cloned());
        Leftovers {
            bridge: Some(plan.name.clone()),
            veths: plan.members.values().map(|m| m.veth.clone()).collect(),
            netns: plan.members.values().map(|m| m.netns.clone()).collect(),
            cgroups,
            host_rules: plan.host_rules.clone(),
        }
    }

    /// Nothing recorded.
    pub fn is_empty(&self) -> bool {
        self.bridge.is_none()
            && self.veths.is_empty()
            && self.netns.is_empty()
            && self.cgroups.is_empty()
            && self.host_rules.is_empty()
    }

    /// The recorded things that exist right now, described (`netns sxl1a2b3c-gw`, ...).
    pub fn existing(&self) -> Vec<String> {
        let mut out = Vec::new();
        for d in &self.cgroups {
            if d.is_dir() {
                out.push(format!("cgroup {}", d.display()));
            }
        }
        for v in &self.veths {
            if link_exists(v) {
                out.push(format!("veth {v}"));
            }
        }
        for n in &self.netns {
            if netns::exists(n) {
                out.push(format!("netns {n}"));
            }
        }
        if let Some(b) = &self.bridge
            && link_exists(b)
        {
            out.push(format!("bridge {b}"));
        }
        for r in &self.host_rules {
            if iptables("-C", r).is_ok() {
                out.push(format!(
                    "iptables -t {} {} {}",
                    r.table,
                    r.chain,
                    r.rule.join(" ")
                ));
            }
        }
        out
    }
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Removes what `leftovers` records and still exists, in an order that works: processes in the
/// cgroups (SIGKILL, waiting until they are gone), the cgroup folders, veths, namespaces, host
/// rules, the bridge. Names that are not lab names are refused, not deleted. Returns what was
/// removed; fails listing every step that failed (after trying all of them).
pub fn teardown(leftovers: &Leftovers) -> anyhow::Result<Vec<String>> {
    let mut removed = Vec::new();
    let mut errors = Vec::new();
    match cgroup::kill_and_remove(&leftovers.cgroups, KILL_TIMEOUT) {
        Ok(r) => removed.extend(r),
        Err(e) => errors.push(format!("{e:#}")),
    }
    let names = leftovers
        .veths
        .iter()
        .chain(&leftovers.netns)
        .chain(&leftovers.bridge);
    for name in names {
        if !is_lab_link(name) {
            errors.push(format!("refusing to delete {name:?}: not a lab name"));
        }
    }
    for veth in leftovers.veths.iter().filter(|v| is_lab_link(v)) {
        if link_exists(veth) {
            match ip(&["link", "del", veth]) {
                Ok(_) => removed.push(format!("veth {veth}")),
                Err(e) if !link_exists(veth) => {
                    tracing::debug!(error = %e, "veth went away by itself");
                }
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
    }
    for ns in leftovers.netns.iter().filter(|n| is_lab_link(n)) {
        if netns::exists(ns) {
            match ip(&["netns", "del", ns]) {
                Ok(_) => removed.push(format!("netns {ns}")),
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
    }
    for rule in &leftovers.host_rules {
        // Delete every copy (`-C` succeeds while one is left); bounded.
        for _ in 0..8 {
            if iptables("-C", rule).is_err() {
                break;
            }
            match iptables("-D", rule) {
                Ok(_) => removed.push(format!(
                    "iptables -t {} {} {}",
                    rule.table,
                    rule.chain,
                    rule.rule.join(" ")
                )),
                Err(e) => {
                    errors.push(format!("{e:#}"));
                    break;
                }
            }
        }
    }
    if let Some(bridge) = leftovers.bridge.as_deref().filter(|b| is_lab_link(b))
        && link_exists(bridge)
    {
        match ip(&["link", "del", bridge]) {
            Ok(_) => removed.push(format!("bridge {bridge}")),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    if errors.is_empty() {
        Ok(removed)
    } else {
        bail!(
            "cleaning up the lab's isolation failed:\n  - {}",
            errors.join("\n  - ")
        )
    }
}

/// Checks that nothing is bound to the ports of `c` inside its namespace (binding 0.0.0.0
/// there conflicts with any listener on the port). `Err(port)` for the first taken port.
pub(crate) fn check_ports_in_netns(
    ns: &str,
    ports: impl IntoIterator<Item = u16> + Send,
) -> anyhow::Result<Result<(), u16>> {
    netns::run_in(ns, move || {
        for port in ports {
            if let Err(e) = std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
                && e.kind() == std::io::ErrorKind::AddrInUse
            {
                return Err(port);
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_interfaces_and_differ_per_root() {
        let a = lab_name(Path::new("/work/main/.lab"));
        let b = lab_name(Path::new("/tmp/lab-x/root"));
        assert_ne!(a, b);
        for name in [&a, &b] {
            assert!(is_lab_name(name), "{name}");
            assert_eq!(name.len(), 9);
        }
        assert_eq!(a, lab_name(Path::new("/work/main/.lab")), "stable");
        let plan = IsolationPlan::new(
            &a,
            7,
            &ComponentSet::with_dependencies(Component::ALL),
            true,
        );
        let names: Vec<&str> = plan
            .members
            .values()
            .flat_map(|m| [m.netns.as_str(), m.veth.as_str()])
            .collect();
        assert_eq!(names.len(), 10);
        for n in names {
            assert!(n.len() <= 15 && is_lab_link(n), "{n}");
        }
        assert!(!is_lab_link("eth0") && !is_lab_link("docker0") && !is_lab_link("sxl-gw"));
    }

    #[test]
    fn plan_follows_the_address_scheme() {
        let plan = IsolationPlan::new(
            "sxl0a1b2c",
            3,
            &ComponentSet::with_dependencies([Component::OrderGateway, Component::Prometheus]),
            true,
        );
        assert_eq!(plan.subnet(), "198.18.3.0/24");
        assert_eq!(plan.gateway, Ipv4Addr::new(198, 18, 3, 1));
        let got: Vec<(Component, String, Ipv4Addr)> = plan
            .members
            .iter()
            .map(|(c, m)| (*c, m.netns.clone(), m.address))
            .collect();
        let want = [
            (Component::Postgres, "sxl0a1b2c-pg", 10),
            (Component::Rabbitmq, "sxl0a1b2c-mq", 11),
            (Component::MatchingEngine, "sxl0a1b2c-me", 12),
            (Component::Persistence, "sxl0a1b2c-ps", 13),
            (Component::OrderGateway, "sxl0a1b2c-gw", 14),
        ]
        .map(|(c, n, h)| (c, n.to_string(), Ipv4Addr::new(198, 18, 3, h)))
        .to_vec();
        assert_eq!(got, want, "prometheus stays in the host namespace");
        assert_eq!(
            plan.cgroup(Component::Prometheus, "memory"),
            Some(Path::new("/sys/fs/cgroup/memory/sxl0a1b2c/prometheus"))
        );
        assert_eq!(
            plan.cgroup(Component::OrderGateway, "blkio"),
            Some(Path::new("/sys/fs/cgroup/blkio/sxl0a1b2c/order-gateway"))
        );
        assert_eq!(
            plan.host_rules[0].rule[..4],
            ["-i", "sxl0a1b2c", "-o", "sxl0a1b2c"].map(String::from)
        );
        let left = Leftovers::from_plan(&plan);
        assert_eq!(left.cgroups.len(), 6 * 3 + 3);
        assert!(
            left.cgroups[..18]
                .iter()
                .all(|d| d.components().count() == 7),
            "component folders come before the lab folders"
        );
    }

    #[test]
    fn decision_says_why_isolation_is_off() {
        let off = |r: Result<Decision, Vec<String>>| match r {
            Ok(Decision::Off(why)) => why,
            other => panic!("expected off, got {other:?}"),
        };
        assert!(off(decide(Isolation::Auto, false, &[])).contains("not running as root"));
        assert!(off(decide(Isolation::None, true, &[])).contains("--isolation none"));
        let missing = ["no cgroup v1 cpu hierarchy".to_string()];
        assert!(off(decide(Isolation::Auto, true, &missing)).contains("no cgroup v1 cpu"));
        assert_eq!(decide(Isolation::Auto, true, &[]), Ok(Decision::On));
        assert_eq!(decide(Isolation::Netns, true, &[]), Ok(Decision::On));
        let refused = decide(Isolation::Netns, false, &[])
            .err()
            .unwrap_or_default();
        assert!(refused[0].contains("--isolation netns needs root"));
        let refused = decide(Isolation::Netns, true, &missing)
            .err()
            .unwrap_or_default();
        assert!(refused[0].contains("cgroup v1"));
        for s in ["auto", "none", "netns"] {
            assert_eq!(
                s.parse::<Isolation>().map(|i| i.to_string()).ok(),
                Some(s.into())
            );
        }
        assert!("docker".parse::<Isolation>().is_err());
    }

    #[test]
    fn used_subnets_come_from_addresses_and_routes() {
        let addrs = "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever\n\
                     5: sxl0a1b2c    inet 198.18.0.1/24 brd 198.18.0.255 scope global sxl0a1b2c\n\
                     9: tun0    inet 198.18.7.3/32 scope global tun0\n";
        let routes = "default via 10.0.0.1 dev eth0\n\
                      198.18.0.0/24 dev sxl0a1b2c proto kernel scope link src 198.18.0.1\n\
                      198.18.4.0/24 via 10.0.0.9 dev eth0\n\
                      198.18.0.0/15 via 10.0.0.9 dev eth0\n\
                      198.19.1.0/24 dev x\n";
        assert_eq!(
            used_subnets(addrs, routes).into_iter().collect::<Vec<_>>(),
            vec![0, 4, 7]
        );
    }
}
