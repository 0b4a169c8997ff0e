//! Liveness and readiness. `GET /healthz` answers 200 while the process runs; `GET /readyz`
//! answers 200 only while every dependency the service registered is reachable.
//!
//! Background tasks that own a connection (AMQP, PostgreSQL, the engine client) flip their
//! dependency's flag as they lose and regain it, so `/readyz` never blocks on a probe.
//!
//! Every flag is also exported: `dependency_up{dependency}` (0 from the start) and
//! `dependency_reconnects_total{dependency}`, which counts returns after a loss (the first
//! time a dependency comes up is not a reconnect).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Named readiness flags, all false until their owners report in.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    deps: Arc<BTreeMap<&'static str, Flag>>,
}

#[derive(Debug)]
struct Flag {
    up: AtomicBool,
    /// Was ever up: a later down → up is a reconnect.
    ever_up: AtomicBool,
    /// Readiness requires it.
    required: bool,
}

impl Flag {
    fn new(name: &'static str, required: bool) -> (&'static str, Flag) {
        // Visible at 0 from the start, so that alerts and rate() see the series.
        metrics::gauge!("dependency_up", "dependency" => name).set(0.0);
        metrics::counter!("dependency_reconnects_total", "dependency" => name).increment(0);
        (
            name,
            Flag {
                up: AtomicBool::new(false),
                ever_up: AtomicBool::new(false),
                required,
            },
        )
    }
}

impl Readiness {
    /// Every dependency required for readiness.
    pub fn new(dependencies: &[&'static str]) -> Readiness {
        Readiness::with_optional(dependencies, &[])
    }

    /// `required` gate readiness; `optional` are only reported (in `/readyz` and in the
    /// `dependency_up` metric): the service keeps working without them, e.g. the engine
    /// buffers events in its journal while RabbitMQ is away.
    pub fn with_optional(required: &[&'static str], optional: &[&'static str]) -> Readiness {
        let flags = required
            .iter()
            .map(|d| Flag::new(d, true))
            .chain(optional.iter().map(|d| Flag::new(d, false)))
            .collect();
        Readiness {
            deps: Arc::new(flags),
        }
    }

    /// Records whether `dependency` is reachable. Unknown names are a programming error.
    pub fn set(&self, dependency: &'static str, up: bool) {
        match self.deps.get(dependency) {
            Some(flag) => {
                let was = flag.up.swap(up, Ordering::Relaxed);
                if was != up {
                    tracing::info!(dependency, up, "dependency readiness changed");
                }
                if up && !was && flag.ever_up.swap(true, Ordering::Relaxed) {
                    metrics::counter!("dependency_reconnects_total", "dependency" => dependency)
                        .increment(1);
                }
                metrics::gauge!("dependency_up", "dependency" => dependency)
                    .set(f64::from(u8::from(up)));
            }
            None => debug_assert!(false, "unregistered dependency {dependency}"),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.deps
            .values()
            .all(|f| !f.required || f.up.load(Ordering::Relaxed))
    }

    /// Every dependency and whether it is up, for the `/readyz` body.
    pub fn snapshot(&self) -> BTreeMap<&'static str, bool> {
        self.deps
            .iter()
            .map(|(k, f)| (*k, f.up.load(Ordering::Relaxed)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_all_up() {
        let r = Readiness::new(&["a", "b"]);
        assert!(!r.is_ready());
        r.set("a", true);
        assert!(!r.is_ready());
        r.set("b", true);
        assert!(r.is_ready());
        r.set("a", false);
        assert_eq!(r.snapshot().get("a"), Some(&false));
        assert!(Readiness::new(&[]).is_ready());
        let o = Readiness::with_optional(&["a"], &["b"]);
        o.set("a", true);
        assert!(o.is_ready(), "optional dependencies do not gate readiness");
        assert_eq!(o.snapshot().get("b"), Some(&false));
    }
}
