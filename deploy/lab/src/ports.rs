//! The port plan: which port every named port of every component uses.
//!
//! `default` gives the fixed demo ports (gateway 8080, ..., rabbitmq 5673 + dist 25673 + epmd
//! 4370); `ephemeral` asks the kernel for free ports (bind port 0 on 127.0.0.1, read it, close)
//! so many labs can run in parallel in tests. Every port is checked again just before its
//! component starts, and a taken port is a [`LabError::PortInUse`] naming port and component.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::str::FromStr;

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
    /// Free ports picked by the kernel.
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortPlan {
    ports: BTreeMap<Component, BTreeMap<String, u16>>,
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
        PortPlan { ports }
    }

    /// Free ports for every port of every component, all distinct. All listeners are held
    /// until every port is chosen, so the kernel cannot hand out the same port twice.
    pub fn ephemeral() -> Result<Self> {
        let mut held = Vec::new();
        let mut ports = BTreeMap::new();
        for c in Component::ALL {
            let mut named = BTreeMap::new();
            for p in c.spec().ports {
                let listener = TcpListener::bind(SocketAddr::from((LOOPBACK, 0)))
                    .context("binding 127.0.0.1:0 to pick a free port")?;
                let port = listener
                    .local_addr()
                    .context("reading a picked port")?
                    .port();
                named.insert(p.name.to_string(), port);
                held.push(listener);
            }
            ports.insert(c, named);
        }
        Ok(PortPlan { ports })
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

    /// Overrides one port.
    pub fn set(&mut self, component: Component, name: &str, port: u16) {
        self.ports
            .entry(component)
            .or_default()
            .insert(name.to_string(), port);
    }

    /// All named ports of a component.
    pub fn of(&self, component: Component) -> BTreeMap<String, u16> {
        self.ports.get(&component).cloned().unwrap_or_default()
    }

    /// Fails with [`LabError::PortInUse`] if any port of `component` cannot be bound now.
    pub fn check_free(&self, component: Component) -> Result<()> {
        self.check_free_except(component, &[])
    }

    /// Same as [`PortPlan::check_free`], skipping the ports named in `skip`.
    pub fn check_free_except(&self, component: Component, skip: &[&str]) -> Result<()> {
        for (name, port) in self.of(component) {
            if skip.contains(&name.as_str()) {
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
}
