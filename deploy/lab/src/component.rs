//! The components of the stack, as data.
//!
//! One table ([`SPECS`]) says, for every component, its name, what it needs before it may start,
//! which ports it listens on (with their demo defaults), which other components' URLs it receives
//! in its environment, whether Prometheus scrapes it and how long it may take to become ready.
//! Adding a component is one enum variant, one row here and, if it is not an ordinary service,
//! one launch recipe in [`crate::launch`].
//!
//! Architecture invariant: the declaration order of [`Component`] is the start order, so a
//! `BTreeSet<Component>` iterates in start order and its reverse is the stop order.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One supervised component. The declaration order is the start order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Component {
    Postgres,
    Rabbitmq,
    MatchingEngine,
    Persistence,
    OrderGateway,
    /// The eBPF agent: optional, part of the default set only as root and when its binary exists.
    Probes,
    Prometheus,
}

/// How a component is launched; each kind has a recipe in [`crate::launch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A private PostgreSQL 15 cluster (initdb + postgres).
    Postgres,
    /// A private RabbitMQ node with its own epmd.
    Rabbitmq,
    /// Prometheus with a config rendered by the lab.
    Prometheus,
    /// One of our binaries from `--bin-dir`, configured only through `APP__*` variables.
    Service {
        /// File name of the binary inside the bin dir.
        binary: &'static str,
    },
}

/// A named port of a component and its demo default.
#[derive(Clone, Copy, Debug)]
pub struct PortSpec {
    /// Name used in the port plan and the state file (`http`, `amqp`, `dist`, ...).
    pub name: &'static str,
    /// Port used by `--ports default`.
    pub default: u16,
}

/// "Give this component the primary URL of `target` in the environment variable `env`".
#[derive(Clone, Copy, Debug)]
pub struct Link {
    pub env: &'static str,
    pub target: Component,
}

/// Everything the supervisor needs to know about a component that is not code.
#[derive(Debug)]
pub struct Spec {
    pub component: Component,
    /// Stable name: CLI argument, log file name, folder name, Prometheus job name.
    pub name: &'static str,
    pub kind: Kind,
    /// Components that must be ready before this one starts (and that `--only` pulls in).
    pub needs: &'static [Component],
    /// Ports it listens on; the first one is the one its primary URL uses.
    pub ports: &'static [PortSpec],
    /// URLs of other components handed over in environment variables (services only).
    pub links: &'static [Link],
    /// It serves `GET /metrics` on its `http` port and Prometheus scrapes it.
    pub scraped: bool,
    /// Not part of the default set unless available (see [`ComponentSet::default_for_host`]).
    pub optional: bool,
    /// How long one start attempt may take to become ready.
    pub ready_timeout: Duration,
    /// Runs in its own network namespace on the lab bridge when the lab isolates (see
    /// [`crate::isolation`]); otherwise it stays in the host namespace (Prometheus and the
    /// probe agent, which watch the others from outside).
    pub netns: bool,
    /// Two-letter tag in the names of its network namespace and veth (`sxl1a2b3c-gw`).
    pub short: &'static str,
}

const HTTP: &str = "http";

/// The component table, in start order (same order as the enum).
pub static SPECS: [Spec; 7] = [
    Spec {
        component: Component::Postgres,
        name: "postgres",
        kind: Kind::Postgres,
        needs: &[],
        ports: &[PortSpec {
            name: "postgres",
            default: 5433,
        }],
        links: &[],
        scraped: false,
        optional: false,
        // initdb (first start only) plus recovery after a crash.
        ready_timeout: Duration::from_secs(60),
        netns: true,
        short: "pg",
    },
    Spec {
        component: Component::Rabbitmq,
        name: "rabbitmq",
        kind: Kind::Rabbitmq,
        needs: &[],
        ports: &[
            PortSpec {
                name: "amqp",
                default: 5673,
            },
            PortSpec {
                name: "dist",
                default: 25673,
            },
            PortSpec {
                name: "epmd",
                default: 4370,
            },
        ],
        links: &[],
        scraped: false,
        optional: false,
        // ~7 s idle, ~19 s while the machine builds Rust; leave room.
        ready_timeout: Duration::from_secs(120),
        netns: true,
        short: "mq",
    },
    Spec {
        component: Component::MatchingEngine,
        name: "matching-engine",
        kind: Kind::Service {
            binary: "matching-engine",
        },
        needs: &[Component::Rabbitmq],
        ports: &[PortSpec {
            name: HTTP,
            default: 8081,
        }],
        links: &[Link {
            env: "APP__AMQP__URL",
            target: Component::Rabbitmq,
        }],
        scraped: true,
        optional: false,
        ready_timeout: Duration::from_secs(30),
        netns: true,
        short: "me",
    },
    Spec {
        component: Component::Persistence,
        name: "persistence",
        kind: Kind::Service {
            binary: "persistence",
        },
        needs: &[Component::Postgres, Component::Rabbitmq],
        ports: &[PortSpec {
            name: HTTP,
            default: 8082,
        }],
        links: &[
            Link {
                env: "APP__DATABASE__URL",
                target: Component::Postgres,
            },
            Link {
                env: "APP__AMQP__URL",
                target: Component::Rabbitmq,
            },
        ],
        scraped: true,
        optional: false,
        ready_timeout: Duration::from_secs(30),
        netns: true,
        short: "ps",
    },
    Spec {
        component: Component::OrderGateway,
        name: "order-gateway",
        kind: Kind::Service {
            binary: "order-gateway",
        },
        needs: &[Component::MatchingEngine, Component::Persistence],
        ports: &[PortSpec {
            name: HTTP,
            default: 8080,
        }],
        links: &[
            Link {
                env: "APP__ENGINE__URL",
                target: Component::MatchingEngine,
            },
            Link {
                env: "APP__PERSISTENCE__URL",
                target: Component::Persistence,
            },
        ],
        scraped: true,
        optional: false,
        ready_timeout: Duration::from_secs(30),
        netns: true,
        short: "gw",
    },
    Spec {
        component: Component::Probes,
        name: "probes",
        // Provisional: the agent's binary name and configuration follow the service contract
        // until the probes issue says otherwise.
        kind: Kind::Service { binary: "probes" },
        needs: &[],
        ports: &[PortSpec {
            name: HTTP,
            default: 9435,
        }],
        links: &[],
        scraped: true,
        optional: true,
        ready_timeout: Duration::from_secs(30),
        netns: false,
        short: "pb",
    },
    Spec {
        component: Component::Prometheus,
        name: "prometheus",
        kind: Kind::Prometheus,
        needs: &[],
        ports: &[PortSpec {
            name: HTTP,
            default: 9090,
        }],
        links: &[],
        scraped: false,
        optional: false,
        ready_timeout: Duration::from_secs(30),
        netns: false,
        short: "pr",
    },
];

impl Component {
    /// Every component, in start order.
    pub const ALL: [Component; 7] = [
        Component::Postgres,
        Component::Rabbitmq,
        Component::MatchingEngine,
        Component::Persistence,
        Component::OrderGateway,
        Component::Probes,
        Component::Prometheus,
    ];

    /// The infrastructure the services run on (no binaries of ours needed).
    pub const INFRA: [Component; 3] = [
        Component::Postgres,
        Component::Rabbitmq,
        Component::Prometheus,
    ];

    /// This component's row in [`SPECS`].
    pub fn spec(self) -> &'static Spec {
        // SPECS is in enum order; the unit test `specs_are_in_enum_order` guards it.
        &SPECS[self as usize]
    }

    /// Stable name (`matching-engine`, ...).
    pub fn name(self) -> &'static str {
        self.spec().name
    }

    /// The port its primary URL uses.
    pub fn primary_port_name(self) -> &'static str {
        self.spec().ports[0].name
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A component name that is not in the table.
#[derive(Debug, thiserror::Error)]
#[error("unknown component {0:?} (known: {known})", known = known_names())]
pub struct UnknownComponent(pub String);

fn known_names() -> String {
    Component::ALL
        .iter()
        .map(|c| c.name())
        .collect::<Vec<_>>()
        .join(", ")
}

impl FromStr for Component {
    type Err = UnknownComponent;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        Component::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| UnknownComponent(s.to_string()))
    }
}

/// A set of components; iterates in start order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentSet(pub BTreeSet<Component>);

impl ComponentSet {
    /// The given components plus everything they need, transitively.
    pub fn with_dependencies(components: impl IntoIterator<Item = Component>) -> Self {
        let mut set = BTreeSet::new();
        let mut todo: Vec<Component> = components.into_iter().collect();
        while let Some(c) = todo.pop() {
            if set.insert(c) {
                todo.extend(c.spec().needs.iter().copied());
            }
        }
        ComponentSet(set)
    }

    /// Every non-optional component, plus the optional ones this host can run (`probes`: only
    /// as root and when its binary exists in `bin_dir`).
    pub fn default_for_host(bin_dir: &std::path::Path) -> Self {
        let root = nix::unistd::geteuid().is_root();
        Self::with_dependencies(Component::ALL.into_iter().filter(|c| {
            let spec = c.spec();
            if !spec.optional {
                return true;
            }
            match spec.kind {
                Kind::Service { binary } => root && bin_dir.join(binary).is_file(),
                _ => root,
            }
        }))
    }

    /// Parses `a,b,c` and adds dependencies.
    pub fn parse_list(list: &str) -> Result<Self, UnknownComponent> {
        let parsed = list
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(Component::from_str)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::with_dependencies(parsed))
    }

    pub fn contains(&self, c: Component) -> bool {
        self.0.contains(&c)
    }

    /// Start order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = Component> + '_ {
        self.0.iter().copied()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for ComponentSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.iter().map(Component::name).collect();
        f.write_str(&names.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_are_in_enum_order() {
        for (i, c) in Component::ALL.iter().enumerate() {
            assert_eq!(SPECS[i].component, *c);
            assert_eq!(*c as usize, i);
        }
    }

    #[test]
    fn needs_come_earlier_in_start_order() {
        for spec in &SPECS {
            for need in spec.needs {
                assert!(
                    *need < spec.component,
                    "{} needs {need} which starts later",
                    spec.name
                );
            }
            for link in spec.links {
                assert!(
                    spec.needs.contains(&link.target),
                    "{} links {} without needing it",
                    spec.name,
                    link.target
                );
            }
        }
    }

    #[test]
    fn names_round_trip() {
        for c in Component::ALL {
            assert_eq!(c.name().parse::<Component>().ok(), Some(c));
            let json = serde_json::to_string(&c).ok();
            assert_eq!(json.as_deref(), Some(format!("\"{}\"", c.name()).as_str()));
        }
        let err = "postgress"
            .parse::<Component>()
            .err()
            .map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("postgress") && e.contains("rabbitmq")));
    }

    #[test]
    fn only_pulls_in_dependencies() {
        let set = ComponentSet::parse_list("order-gateway").ok();
        let names = set.map(|s| s.to_string());
        assert_eq!(
            names.as_deref(),
            Some("postgres,rabbitmq,matching-engine,persistence,order-gateway")
        );
        let set = ComponentSet::parse_list("postgres, prometheus")
            .map(|s| s.to_string())
            .ok();
        assert_eq!(set.as_deref(), Some("postgres,prometheus"));
    }
}
