//! The port plan: which port every named port of every component uses.
//!
//! `default` gives the fixed demo ports (gateway 8080, ..., rabbitmq 5673 + dist 25673 + epmd
//! 4370); `ephemeral` picks free ports (random ports below the kernel's range for outgoing
//! connections that bind on 127.0.0.1; see [`PortPlan::ephemeral`]) so many labs can run in
//! parallel in tests. Every port is checked again just before its
//! component starts, and a taken port is a [`LabError::PortInUse`] naming port and component.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::component::Component;
use crate::error::{LabError, Result};

/// The address components listen on without isolation (with it, those that have their own
/// network namespace listen on their bridge address: [`crate::LabConfig::host`]).
pub const LOOPBACK: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// How to choose ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortsMode {
    /// The fixed demo ports.
    Default,
    /// Free ports, picked at random below the kernel's range for outgoing connections.
    Ephemeral,
}

impl FromStr for PortsMode {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "default" => Ok(PortsMode::Default),
            "ephemeral" => Ok(PortsMode::Ephemeral),
            other => anyhow::bail!("unknown ports mode {other:?} (expected default or ephemeral)"),
        }
    }
}

/// Port of every named port of every component.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PortPlan {
    ports: BTreeMap<Component, BTreeMap<String, u16>>,
    /// Ports picked as free (not fixed, not set by the caller): another free one may replace
    /// such a port when something else takes it before its component starts.
    #[serde(skip)]
    picked: BTreeSet<(Component, String)>,
    /// The listeners that keep picked ports taken until their component starts (clones of the
    /// plan share them); see [`PortPlan::release`].
    #[serde(skip)]
    reserved: Reservations,
}

impl PartialEq for PortPlan {
    /// Two plans are equal when they assign the same ports; who still holds them does not count.
    fn eq(&self, other: &Self) -> bool {
        self.ports == other.ports && self.picked == other.picked
    }
}

impl Eq for PortPlan {}

/// Listeners bound to picked ports, by component and port name. Without them a picked port
/// is free from the pick until its component binds it — seconds for the components that start
/// after RabbitMQ — and another process that picks free ports (a parallel lab) can take it.
#[derive(Clone, Default)]
struct Reservations(Arc<Mutex<BTreeMap<(Component, String), TcpListener>>>);

impl Reservations {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(Component, String), TcpListener>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl std::fmt::Debug for Reservations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.lock().keys()).finish()
    }
}

impl PortPlan {
    /// The demo defaults from the component table.
    pub fn defaults() -> Self {
        let ports = Component::ALL
            .into_iter()
            .map(|c| {
                let named = c
                    .spec()
                    .ports
                    .iter()
                    .map(|p| (p.name.to_string(), p.default))
                    .collect();
                (c, named)
            })
            .collect();
        PortPlan {
            ports,
            picked: BTreeSet::new(),
            reserved: Reservations::default(),
        }
    }

    /// Free ports for every port of every component, all distinct. Each stays bound by a
    /// listener of this plan until its component starts ([`PortPlan::release`]), so nobody
    /// else takes it meanwhile and no port is handed out twice. The ports lie below the
    /// kernel's ephemeral range (`net.ipv4.ip_local_port_range`) when there is room, so no
    /// outgoing connection takes one either.
    pub fn ephemeral() -> Result<Self> {
        let reserved = Reservations::default();
        let mut ports = BTreeMap::new();
        let mut picked = BTreeSet::new();
        for c in Component::ALL {
            let mut named = BTreeMap::new();
            for p in c.spec().ports {
                let (listener, port) = pick_free()?;
                named.insert(p.name.to_string(), port);
                picked.insert((c, p.name.to_string()));
                reserved.lock().insert((c, p.name.to_string()), listener);
            }
            ports.insert(c, named);
        }
        Ok(PortPlan {
            ports,
            picked,
            reserved,
        })
    }

    /// Closes the listeners that held `component`'s picked ports, so that it can bind them,
    /// and returns those ports' names: the lab calls this just before it starts the component.
    /// Nothing to do for fixed or set ports, or a second time.
    ///
    /// A child process forked (by any thread) while a listener was open keeps a copy of it
    /// until it executes its program: for that moment the port can still look taken.
    pub fn release(&self, component: Component) -> Vec<String> {
        let mut reserved = self.reserved.lock();
        let names: Vec<String> = reserved
            .keys()
            .filter(|(c, _)| *c == component)
            .map(|(_, name)| name.clone())
            .collect();
        for name in &names {
            reserved.remove(&(component, name.clone()));
        }
        names
    }

    /// Whether this plan still holds the port called `name` of `component` (see
    /// [`PortPlan::release`]).
    pub fn is_reserved(&self, component: Component, name: &str) -> bool {
        self.reserved
            .lock()
            .contains_key(&(component, name.to_string()))
    }

    /// Whether this port was picked as free (see [`PortPlan::ephemeral`]) and nobody set it since.
    pub fn is_picked(&self, component: Component, name: &str) -> bool {
        self.picked.contains(&(component, name.to_string()))
    }

    /// Replaces a port picked as free with another free one, distinct from every port of the
    /// plan; returns it. Fails for a port that was not picked (a fixed or caller-set port).
    pub fn repick(&mut self, component: Component, name: &str) -> Result<u16> {
        if !self.is_picked(component, name) {
            return Err(anyhow::anyhow!(
                "the {name} port of {component} was fixed or set, not picked; not replacing it"
            )
            .into());
        }
        let in_plan: BTreeSet<u16> = self
            .ports
            .values()
            .flat_map(|m| m.values())
            .copied()
            .collect();
        let mut held = Vec::new();
        loop {
            let (listener, port) = pick_free()?;
            if !in_plan.contains(&port) {
                self.ports
                    .entry(component)
                    .or_default()
                    .insert(name.to_string(), port);
                self.reserved
                    .lock()
                    .insert((component, name.to_string()), listener);
                return Ok(port);
            }
            // Held until a distinct port comes up, so the kernel cannot return it again;
            // bounded by the number of ports in the plan.
            held.push(listener);
        }
    }

    /// A plan for the given mode.
    pub fn for_mode(mode: PortsMode) -> Result<Self> {
        match mode {
            PortsMode::Default => Ok(Self::defaults()),
            PortsMode::Ephemeral => Self::ephemeral(),
        }
    }

    /// The port called `name` of `component`.
    pub fn port(&self, component: Component, name: &str) -> Result<u16> {
        self.ports
            .get(&component)
            .and_then(|m| m.get(name))
            .copied()
            .ok_or_else(|| {
                anyhow::anyhow!("the port plan has no {name} port for {component}").into()
            })
    }

    /// The port the component's primary URL uses.
    pub fn primary(&self, component: Component) -> Result<u16> {
        self.port(component, component.primary_port_name())
    }

    /// Overrides one port (from then on it is never replaced, see [`PortPlan::repick`]).
    pub fn set(&mut self, component: Component, name: &str, port: u16) {
        self.picked.remove(&(component, name.to_string()));
        self.reserved.lock().remove(&(component, name.to_string()));
        self.ports
            .entry(component)
            .or_default()
            .insert(name.to_string(), port);
    }

    /// All named ports of a component.
    pub fn of(&self, component: Component) -> BTreeMap<String, u16> {
        self.ports.get(&component).cloned().unwrap_or_default()
    }

    /// Fails with [`LabError::PortInUse`] if any port of `component` cannot be bound now (a
    /// port this plan still holds for it counts as free).
    pub fn check_free(&self, component: Component) -> Result<()> {
        self.check_free_except(component, &[])
    }

    /// Same as [`PortPlan::check_free`], skipping the ports named in `skip`.
    pub fn check_free_except(&self, component: Component, skip: &[&str]) -> Result<()> {
        for (name, port) in self.of(component) {
            if skip.contains(&name.as_str()) || self.is_reserved(component, &name) {
                continue;
            }
            // std sets SO_REUSEADDR, so sockets in TIME_WAIT from a previous run do not count.
            if let Err(e) = TcpListener::bind(SocketAddr::from((LOOPBACK, port))) {
                if e.kind() == std::io::ErrorKind::AddrInUse {
                    return Err(LabError::PortInUse {
                        component,
                        name,
                        port,
                    });
                }
                return Err(anyhow::Error::new(e)
                    .context(format!("checking port {port} ({component} {name} port)"))
                    .into());
            }
        }
        Ok(())
    }
}

/// Lowest port [`pick_free`] draws from.
const PICK_FLOOR: u16 = 10_000;

/// The kernel's range for the local ports of outgoing connections
/// (`net.ipv4.ip_local_port_range`), read once per process.
fn local_port_range() -> Option<(u16, u16)> {
    static RANGE: std::sync::OnceLock<Option<(u16, u16)>> = std::sync::OnceLock::new();
    *RANGE.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
        let mut it = text.split_whitespace().map(str::parse::<u16>);
        Some((it.next()?.ok()?, it.next()?.ok()?))
    })
}

/// A free port on 127.0.0.1 and its listener (hold it to keep the port).
///
/// Drawn at random from below the kernel's ephemeral range, so that no outgoing connection of
/// any process can take it between the pick and the start of its component (one did, in CI:
/// ports from `bind(0)` come from the same range as outgoing connections' local ports). Falls
/// back to `bind(0)` when that range leaves no room below it.
pub fn pick_free() -> Result<(TcpListener, u16)> {
    use std::hash::{BuildHasher as _, Hasher as _};
    let (low, _) = local_port_range().unwrap_or((32768, 60999));
    if low > PICK_FLOOR + 1_000 {
        let span = u64::from(low - PICK_FLOOR);
        let seed = std::hash::RandomState::new();
        for attempt in 0..64u64 {
            let mut h = seed.build_hasher();
            h.write_u64(attempt);
            let port = PICK_FLOOR + u16::try_from(h.finish() % span).unwrap_or(0);
            if let Ok(listener) = TcpListener::bind(SocketAddr::from((LOOPBACK, port))) {
                return Ok((listener, port));
            }
        }
    }
    let listener = TcpListener::bind(SocketAddr::from((LOOPBACK, 0)))
        .context("binding 127.0.0.1:0 to pick a free port")?;
    let port = listener
        .local_addr()
        .context("reading a picked port")?
        .port();
    Ok((listener, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_demo_plan() {
        let plan = PortPlan::defaults();
        let got: Vec<(Component, u16)> = Component::ALL
            .into_iter()
            .filter_map(|c| plan.primary(c).ok().map(|p| (c, p)))
            .collect();
        assert_eq!(
            got,
            vec![
                (Component::Postgres, 5433),
                (Component::Rabbitmq, 5673),
                (Component::MatchingEngine, 8081),
                (Component::Persistence, 8082),
                (Component::OrderGateway, 8080),
                (Component::Probes, 9435),
                (Component::Prometheus, 9090),
            ]
        );
        assert_eq!(plan.port(Component::Rabbitmq, "dist").ok(), Some(25673));
        assert_eq!(plan.port(Component::Rabbitmq, "epmd").ok(), Some(4370));
    }

    #[test]
    fn ephemeral_ports_are_distinct_and_free() {
        let plan = PortPlan::ephemeral().expect("picking free ports on loopback");
        let mut all: Vec<u16> = Component::ALL
            .into_iter()
            .flat_map(|c| plan.of(c).into_values())
            .collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n, "ports must be distinct");
        assert!(all.iter().all(|p| *p != 0));
        if let Some((low, _)) = local_port_range().filter(|(low, _)| *low > PICK_FLOOR + 1_000) {
            assert!(
                all.iter().all(|p| (PICK_FLOOR..low).contains(p)),
                "below the ephemeral range {low}: {all:?}"
            );
        }
    }

    #[test]
    fn picked_ports_stay_taken_until_their_component_is_released() {
        let plan = PortPlan::ephemeral().expect("picking free ports on loopback");
        let copy = plan.clone();
        let pg = plan.primary(Component::Postgres).expect("postgres port");
        let engine = plan
            .primary(Component::MatchingEngine)
            .expect("engine port");
        let bind = |port: u16| TcpListener::bind((LOOPBACK, port));
        assert!(bind(pg).is_err(), "{pg} must stay held by the plan");
        plan.check_free(Component::Postgres)
            .expect("a port the plan holds counts as free");
        // Clones share the listeners: the lab's copy releases what the caller's copy picked.
        copy.release(Component::Postgres);
        assert!(!plan.is_reserved(Component::Postgres, "postgres"));
        let pg_listener = bind(pg).expect("released: the component can bind it");
        assert!(
            bind(engine).is_err(),
            "{engine}: other components' ports are still held"
        );
        // Now someone else has it: the check says so.
        let err = plan
            .check_free(Component::Postgres)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains(&pg.to_string()), "{err}");
        drop(pg_listener);
        // A port the caller sets is not held.
        let mut plan = plan;
        plan.set(Component::MatchingEngine, "http", engine);
        assert!(!plan.is_reserved(Component::MatchingEngine, "http"));
        drop(bind(engine).expect("a set port is the caller's"));
    }

    #[test]
    fn a_taken_port_names_port_and_component() {
        let listener = TcpListener::bind((LOOPBACK, 0)).expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let mut plan = PortPlan::defaults();
        plan.set(Component::Postgres, "postgres", port);
        let err = plan
            .check_free(Component::Postgres)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains(&port.to_string()) && err.contains("postgres"),
            "{err}"
        );
    }

    #[test]
    fn only_picked_ports_are_replaced_and_the_replacement_is_free_and_distinct() {
        let mut plan = PortPlan::ephemeral().expect("picking free ports on loopback");
        let old = plan.primary(Component::Postgres).expect("postgres port");
        // Someone takes the picked port once the plan no longer holds it.
        plan.release(Component::Postgres);
        let thief = TcpListener::bind((LOOPBACK, old));
        assert!(plan.is_picked(Component::Postgres, "postgres"));
        let new = plan
            .repick(Component::Postgres, "postgres")
            .expect("another free port");
        assert_ne!(new, old);
        assert_eq!(plan.primary(Component::Postgres).ok(), Some(new));
        assert!(plan.is_reserved(Component::Postgres, "postgres"));
        plan.release(Component::Postgres);
        plan.check_free(Component::Postgres)
            .expect("the new port is free");
        let all: Vec<u16> = Component::ALL
            .into_iter()
            .flat_map(|c| plan.of(c).into_values())
            .collect();
        assert_eq!(all.iter().filter(|p| **p == new).count(), 1, "{all:?}");
        drop(thief);

        // A port the caller set is theirs: never replaced.
        plan.set(Component::Prometheus, "http", old);
        assert!(!plan.is_picked(Component::Prometheus, "http"));
        assert!(plan.repick(Component::Prometheus, "http").is_err());
        assert!(!PortPlan::defaults().is_picked(Component::Postgres, "postgres"));
    }
}
