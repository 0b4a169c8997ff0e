//! What a lab is made of: [`LabConfig`] (root, binaries, ports, components, policies), the
//! folder layout under the root, the URLs every component is reached at, and the restart
//! policy with its backoff arithmetic.
//!
//! Layout of a lab root:
//! ```text
//! <root>/state.json            the state file (see crate::state)
//! <root>/control.sock          the supervisor daemon's control channel
//! <root>/logs/<component>.log  stdout+stderr of every run, plus `=== lab ... ===` lines
//! <root>/logs/lab.log          the supervisor daemon's own log
//! <root>/<component>/          private configuration of the component
//! <root>/<component>/data/     its durable state (APP__DATA__DIR for services)
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::component::{Component, ComponentSet, Kind};
use crate::error::Result;
use crate::isolation::{Isolation, IsolationPlan};
use crate::ports::{LOOPBACK, PortPlan};

/// AMQP credentials of the lab's RabbitMQ node (a dedicated user, allowed from any address).
pub const AMQP_USER: &str = "exchange";
/// Password of [`AMQP_USER`]. A lab secret, not a real one.
pub const AMQP_PASSWORD: &str = "exchange";
/// Database created in the lab's PostgreSQL cluster.
pub const DATABASE: &str = "exchange";

/// Restart policy for components that exit unexpectedly (like Docker's `on-failure`, but any
/// unexpected exit counts, and exit code 64 never restarts).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Delay before the first restart.
    pub backoff_initial: Duration,
    /// The delay doubles after every restart up to this.
    pub backoff_max: Duration,
    /// Give up (status `failed`) when this many restarts happened within `window`.
    pub max_restarts: u32,
    pub window: Duration,
    /// A process that was ready for this long resets the delay to `backoff_initial`.
    pub reset_after: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            backoff_initial: Duration::from_millis(250),
            backoff_max: Duration::from_secs(10),
            max_restarts: 10,
            window: Duration::from_secs(60),
            reset_after: Duration::from_secs(10),
        }
    }
}

/// Backoff state of one component under a [`RestartPolicy`]; time is passed in, so it is
/// deterministic.
#[derive(Debug)]
pub(crate) struct Backoff {
    policy: RestartPolicy,
    next_delay: Duration,
    recent: VecDeque<Instant>,
}

impl Backoff {
    pub(crate) fn new(policy: RestartPolicy) -> Self {
        Backoff {
            next_delay: policy.backoff_initial,
            policy,
            recent: VecDeque::new(),
        }
    }

    /// Forget history (after a requested start).
    pub(crate) fn reset(&mut self) {
        self.next_delay = self.policy.backoff_initial;
        self.recent.clear();
    }

    /// An unexpected exit at `now` after being ready for `ready_for` (zero if it never was):
    /// `Some(delay)` before the next start, or `None` to give up.
    pub(crate) fn on_exit(&mut self, now: Instant, ready_for: Duration) -> Option<Duration> {
        if ready_for >= self.policy.reset_after {
            self.next_delay = self.policy.backoff_initial;
        }
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.policy.window)
        {
            self.recent.pop_front();
        }
        if self.recent.len() >= self.policy.max_restarts as usize {
            return None;
        }
        self.recent.push_back(now);
        let delay = self.next_delay;
        self.next_delay = (self.next_delay * 2).min(self.policy.backoff_max);
        Some(delay)
    }

    /// Restarts counted in the current window.
    pub(crate) fn recent(&self) -> usize {
        self.recent.len()
    }
}

/// Everything needed to start a lab.
#[derive(Clone, Debug)]
pub struct LabConfig {
    /// Runtime folder (created if missing, made absolute).
    pub root: PathBuf,
    /// Where `matching-engine`, `persistence`, `order-gateway` (and `probes`) are.
    pub bin_dir: PathBuf,
    /// Repository checkout, for `deploy/prometheus/rules/*.yml`. `None`: look for it above the
    /// root and the current directory; not found means no rule files.
    pub repo: Option<PathBuf>,
    pub ports: PortPlan,
    /// Components to run (dependencies are added by [`LabConfig::new`] and the CLI).
    pub components: ComponentSet,
    pub restart: RestartPolicy,
    /// Graceful stop: how long after SIGTERM (SIGINT for PostgreSQL) before SIGKILL.
    pub stop_timeout: Duration,
    /// Per-component override of the readiness deadline in the component table.
    pub ready_timeouts: BTreeMap<Component, Duration>,
    /// Control socket path recorded in the state file (set by the daemon).
    pub control_socket: Option<PathBuf>,
    /// Whether to give components their own network namespace and cgroups (see
    /// [`crate::isolation`]): `Auto` (isolate when root) for [`LabConfig::new`], `None`
    /// (loopback) for [`LabConfig::ephemeral`].
    pub isolation: Isolation,
    /// The isolation in effect: set by [`crate::Lab::new`] when it isolates, `None` for
    /// loopback. Addresses and URLs follow it.
    pub isolation_plan: Option<IsolationPlan>,
}

impl LabConfig {
    /// A lab of `components` (plus their dependencies) under `root`, with the demo ports and
    /// binaries from `target/release`.
    pub fn new(root: impl Into<PathBuf>, components: impl IntoIterator<Item = Component>) -> Self {
        LabConfig {
            root: root.into(),
            bin_dir: PathBuf::from("target/release"),
            repo: None,
            ports: PortPlan::defaults(),
            components: ComponentSet::with_dependencies(components),
            restart: RestartPolicy::default(),
            stop_timeout: Duration::from_secs(10),
            ready_timeouts: BTreeMap::new(),
            control_socket: None,
            isolation: Isolation::Auto,
            isolation_plan: None,
        }
    }

    /// Same as [`LabConfig::new`] with free ports picked at random, on loopback (for tests;
    /// ask for namespaces with [`LabConfig::with_isolation`]).
    pub fn ephemeral(
        root: impl Into<PathBuf>,
        components: impl IntoIterator<Item = Component>,
    ) -> Result<Self> {
        Ok(LabConfig {
            ports: PortPlan::ephemeral()?,
            isolation: Isolation::None,
            ..Self::new(root, components)
        })
    }

    /// Sets the binary folder.
    pub fn with_bin_dir(mut self, bin_dir: impl Into<PathBuf>) -> Self {
        self.bin_dir = bin_dir.into();
        self
    }

    /// Sets the isolation mode.
    pub fn with_isolation(mut self, isolation: Isolation) -> Self {
        self.isolation = isolation;
        self
    }

    /// The address `c` listens on: its bridge address when it has its own network namespace,
    /// 127.0.0.1 otherwise.
    pub fn host(&self, c: Component) -> Ipv4Addr {
        self.isolation_plan
            .as_ref()
            .and_then(|p| p.member(c))
            .map(|m| m.address)
            .unwrap_or(LOOPBACK)
    }

    /// The readiness deadline of one start attempt of `c`.
    pub fn ready_timeout(&self, c: Component) -> Duration {
        self.ready_timeouts
            .get(&c)
            .copied()
            .unwrap_or(c.spec().ready_timeout)
    }

    /// `<root>/<component>`: private configuration.
    pub fn component_dir(&self, c: Component) -> PathBuf {
        self.root.join(c.name())
    }

    /// `<root>/<component>/data`: durable state.
    pub fn data_dir(&self, c: Component) -> PathBuf {
        self.component_dir(c).join("data")
    }

    /// `<root>/logs`.
    pub fn log_dir(&self) -> PathBuf {
        self.root.join("logs")
    }

    /// `<root>/logs/<component>.log`.
    pub fn log_file(&self, c: Component) -> PathBuf {
        self.log_dir().join(format!("{}.log", c.name()))
    }

    /// `<root>/state.json`.
    pub fn state_file(&self) -> PathBuf {
        state_file(&self.root)
    }

    /// The `host:port` of a component's primary port.
    pub fn addr(&self, c: Component) -> Result<std::net::SocketAddr> {
        Ok(std::net::SocketAddr::from((
            self.host(c),
            self.ports.primary(c)?,
        )))
    }

    /// URLs of a component by name (`postgres`, `amqp`, `http`).
    pub fn urls(&self, c: Component) -> Result<BTreeMap<String, String>> {
        let port = self.ports.primary(c)?;
        let host = self.host(c);
        let (name, url) = match c.spec().kind {
            Kind::Postgres => (
                "postgres",
                format!("postgres://postgres@{host}:{port}/{DATABASE}"),
            ),
            Kind::Rabbitmq => (
                "amqp",
                format!("amqp://{AMQP_USER}:{AMQP_PASSWORD}@{host}:{port}/%2f"),
            ),
            Kind::Prometheus | Kind::Service { .. } => ("http", format!("http://{host}:{port}")),
        };
        Ok([(name.to_string(), url)].into_iter().collect())
    }

    /// Fails with [`crate::LabError::PortInUse`] if a port of `c` (except those named in
    /// `skip`) is taken where `c` will listen: inside its network namespace when it has one,
    /// on 127.0.0.1 otherwise.
    pub fn check_ports_free(&self, c: Component, skip: &[&str]) -> Result<()> {
        let Some(member) = self.isolation_plan.as_ref().and_then(|p| p.member(c)) else {
            return self.ports.check_free_except(c, skip);
        };
        let ports: Vec<(String, u16)> = self
            .ports
            .of(c)
            .into_iter()
            .filter(|(name, _)| !skip.contains(&name.as_str()))
            .collect();
        let numbers: Vec<u16> = ports.iter().map(|(_, p)| *p).collect();
        match crate::isolation::check_ports_in_netns(&member.netns, numbers)? {
            Ok(()) => Ok(()),
            Err(port) => Err(crate::LabError::PortInUse {
                component: c,
                name: ports
                    .into_iter()
                    .find(|(_, p)| *p == port)
                    .map(|(n, _)| n)
                    .unwrap_or_default(),
                port,
            }),
        }
    }

    /// The URL other components use to reach `c`.
    pub fn primary_url(&self, c: Component) -> Result<String> {
        let urls = self.urls(c)?;
        let url = urls
            .into_values()
            .next()
            .ok_or_else(|| anyhow::anyhow!("{c} has no URL"))?;
        Ok(url)
    }

    /// The repository checkout: the configured one, or the first folder above the root, the
    /// current directory or this executable that holds `deploy/lab/Cargo.toml`.
    pub fn find_repo(&self) -> Option<PathBuf> {
        if let Some(repo) = &self.repo {
            return Some(repo.clone());
        }
        let mut starts = vec![self.root.clone()];
        if let Ok(cwd) = std::env::current_dir() {
            starts.push(cwd);
        }
        if let Ok(exe) = std::env::current_exe() {
            starts.push(exe);
        }
        starts.iter().find_map(|start| {
            start
                .ancestors()
                .find(|dir| dir.join("deploy/lab/Cargo.toml").is_file())
                .map(Path::to_path_buf)
        })
    }
}

/// `<root>/state.json`.
pub fn state_file(root: &Path) -> PathBuf {
    root.join("state.json")
}

/// `<root>/control.sock`.
pub fn control_socket(root: &Path) -> PathBuf {
    root.join("control.sock")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_caps_and_gives_up() {
        let policy = RestartPolicy::default();
        let mut b = Backoff::new(policy.clone());
        let t0 = Instant::now();
        let delays: Vec<Option<u128>> = (0..11)
            .map(|i| {
                b.on_exit(t0 + Duration::from_secs(i), Duration::ZERO)
                    .map(|d| d.as_millis())
            })
            .collect();
        let expected: Vec<Option<u128>> = [
            250, 500, 1000, 2000, 4000, 8000, 10_000, 10_000, 10_000, 10_000,
        ]
        .into_iter()
        .map(Some)
        .chain([None])
        .collect();
        assert_eq!(delays, expected);
        assert_eq!(b.recent(), 10);
    }

    #[test]
    fn backoff_forgets_old_restarts_and_resets_after_a_good_run() {
        let mut b = Backoff::new(RestartPolicy::default());
        let t0 = Instant::now();
        for i in 0..10 {
            assert!(
                b.on_exit(t0 + Duration::from_millis(i), Duration::ZERO)
                    .is_some()
            );
        }
        // Outside the 60 s window the old restarts no longer count.
        let later = t0 + Duration::from_secs(61);
        assert!(b.on_exit(later, Duration::ZERO).is_some());
        // A run that was ready for 10 s brings the delay back to the start.
        assert_eq!(
            b.on_exit(later + Duration::from_secs(20), Duration::from_secs(15)),
            Some(Duration::from_millis(250))
        );
    }

    #[test]
    fn urls_follow_the_contract() {
        let cfg = LabConfig::new("/tmp/lab", [Component::OrderGateway, Component::Prometheus]);
        assert_eq!(
            cfg.components.to_string(),
            "postgres,rabbitmq,matching-engine,persistence,order-gateway,prometheus"
        );
        let url = |c| cfg.primary_url(c).unwrap_or_default();
        assert_eq!(
            url(Component::Postgres),
            "postgres://postgres@127.0.0.1:5433/exchange"
        );
        assert_eq!(
            url(Component::Rabbitmq),
            "amqp://exchange:exchange@127.0.0.1:5673/%2f"
        );
        assert_eq!(url(Component::MatchingEngine), "http://127.0.0.1:8081");
        // With isolation, components with a namespace are reached at their bridge address.
        let mut cfg = cfg.clone();
        cfg.isolation_plan = Some(IsolationPlan::new("sxl0a1b2c", 5, &cfg.components, false));
        let url = |c| cfg.primary_url(c).unwrap_or_default();
        assert_eq!(
            url(Component::Postgres),
            "postgres://postgres@198.18.5.10:5433/exchange"
        );
        assert_eq!(url(Component::OrderGateway), "http://198.18.5.14:8080");
        assert_eq!(url(Component::Prometheus), "http://127.0.0.1:9090");
        assert_eq!(
            cfg.log_file(Component::Persistence),
            PathBuf::from("/tmp/lab/logs/persistence.log")
        );
        assert_eq!(
            cfg.data_dir(Component::Persistence),
            PathBuf::from("/tmp/lab/persistence/data")
        );
    }
}
