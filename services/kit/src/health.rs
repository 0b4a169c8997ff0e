//! Liveness and readiness. `GET /healthz` answers 200 while the process runs; `GET /readyz`
//! answers 200 only while every dependency the service registered is reachable.
//!
//! Background tasks that own a connection (AMQP, PostgreSQL, the engine client) flip their
//! dependency's flag as they lose and regain it, so `/readyz` never blocks on a probe.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Named readiness flags, all false until their owners report in.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    deps: Arc<BTreeMap<&'static str, AtomicBool>>,
}

impl Readiness {
    pub fn new(dependencies: &[&'static str]) -> Readiness {
        Readiness {
            deps: Arc::new(
                dependencies
                    .iter()
                    .map(|d| (*d, AtomicBool::new(false)))
                    .collect(),
            ),
        }
    }

    /// Records whether `dependency` is reachable. Unknown names are a programming error.
    pub fn set(&self, dependency: &'static str, up: bool) {
        match self.deps.get(dependency) {
            Some(flag) => {
                let was = flag.swap(up, Ordering::Relaxed);
                if was != up {
                    tracing::info!(dependency, up, "dependency readiness changed");
                }
                metrics::gauge!("dependency_up", "dependency" => dependency)
                    .set(f64::from(u8::from(up)));
            }
            None => debug_assert!(false, "unregistered dependency {dependency}"),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.deps.values().all(|f| f.load(Ordering::Relaxed))
    }

    /// Every dependency and whether it is up, for the `/readyz` body.
    pub fn snapshot(&self) -> BTreeMap<&'static str, bool> {
        self.deps
            .iter()
            .map(|(k, v)| (*k, v.load(Ordering::Relaxed)))
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
    }
}
