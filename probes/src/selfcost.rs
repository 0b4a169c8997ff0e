//! The agent's own CPU time by activity, from the thread's CPU clock around each one: what an
//! SRE asks of an agent first ("what does it cost, and doing what?"), exported as
//! `probes_agent_cpu_seconds_total{activity}` next to the process's `process_cpu_seconds_total`.
//! The rest of the process's CPU is the runtime between activities: timers, wake-ups, the HTTP
//! server.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::time::{ClockId, clock_gettime};

/// What the agent was doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    /// Draining the ring buffer and reading the aggregating maps.
    Poll,
    /// Draining the ring buffer when it woke the agent.
    Drain,
    /// Attaching or detaching the sampled programs.
    Sampling,
    /// Re-reading the lab state and rescanning `/proc`.
    Refresh,
    /// Rendering `/metrics`.
    Render,
}

impl Activity {
    pub const ALL: [Activity; 5] = [
        Activity::Poll,
        Activity::Drain,
        Activity::Sampling,
        Activity::Refresh,
        Activity::Render,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Activity::Poll => "poll",
            Activity::Drain => "ring_drain",
            Activity::Sampling => "sampling_switch",
            Activity::Refresh => "refresh",
            Activity::Render => "render",
        }
    }
}

/// A metric family: name, help, and its value from (CPU time, runs).
type Family = (&'static str, &'static str, fn(Duration, u64) -> String);

/// Nanoseconds and runs per activity.
#[derive(Debug, Default)]
pub struct SelfCost {
    nanos: [AtomicU64; 5],
    runs: [AtomicU64; 5],
}

/// The calling thread's CPU time (zero if the clock cannot be read).
fn thread_cpu() -> Duration {
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(Duration::from)
        .unwrap_or_default()
}

impl SelfCost {
    /// Runs `f`, charging the calling thread's CPU time to `activity`.
    pub fn time<T>(&self, activity: Activity, f: impl FnOnce() -> T) -> T {
        let start = thread_cpu();
        let out = f();
        let spent = thread_cpu().saturating_sub(start);
        let i = activity as usize;
        self.nanos[i].fetch_add(
            u64::try_from(spent.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.runs[i].fetch_add(1, Ordering::Relaxed);
        out
    }

    /// (CPU time, runs) of `activity` so far.
    pub fn get(&self, activity: Activity) -> (Duration, u64) {
        let i = activity as usize;
        (
            Duration::from_nanos(self.nanos[i].load(Ordering::Relaxed)),
            self.runs[i].load(Ordering::Relaxed),
        )
    }

    /// The Prometheus text of both counters.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let families: [Family; 2] = [
            (
                "probes_agent_cpu_seconds_total",
                "CPU time the agent spent in each activity (its threads' CPU clocks); the rest of process_cpu_seconds_total is the runtime between them (timers, wake-ups, the HTTP server).",
                |t, _| format!("{:.6}", t.as_secs_f64()),
            ),
            (
                "probes_agent_activity_runs_total",
                "Times the agent ran each activity.",
                |_, n| n.to_string(),
            ),
        ];
        for (name, help, value) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for a in Activity::ALL {
                let (t, n) = self.get(a);
                let _ = writeln!(out, "{name}{{activity=\"{}\"}} {}", a.name(), value(t, n));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_cpu_time_to_the_activity_that_spent_it() {
        let cost = SelfCost::default();
        let spin = |d: Duration| {
            let start = thread_cpu();
            let mut x = 0u64;
            while thread_cpu().saturating_sub(start) < d {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        };
        cost.time(Activity::Poll, || spin(Duration::from_millis(20)));
        cost.time(Activity::Render, || {});
        let (poll, runs) = cost.get(Activity::Poll);
        assert_eq!(runs, 1);
        assert!(poll >= Duration::from_millis(20), "{poll:?}");
        assert!(poll < Duration::from_millis(500), "{poll:?}");
        let (render, runs) = cost.get(Activity::Render);
        assert_eq!(runs, 1);
        assert!(render < Duration::from_millis(20), "{render:?}");
        assert_eq!(cost.get(Activity::Refresh), (Duration::ZERO, 0));
        let mut text = String::new();
        cost.render(&mut text);
        assert!(text.contains("probes_agent_cpu_seconds_total{activity=\"poll\"} 0.0"));
        assert!(text.contains("probes_agent_activity_runs_total{activity=\"render\"} 1\n"));
    }
}
