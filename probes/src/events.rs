//! The bounded ring of notable kernel events served at `GET /events?since=<unix ms>`, which the
//! chaos reports put on their timelines: failed connects, retransmit bursts, resets, OOM kills.

use std::collections::VecDeque;

use serde::Serialize;

/// Default capacity of the ring.
pub const DEFAULT_CAPACITY: usize = 10_000;

/// One event as `/events` serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    /// Unix time in ms (converted from the kernel's monotonic clock).
    pub ts_ms: u64,
    /// `connect_failed`, `retransmit_burst`, `reset` or `oom_kill`.
    pub kind: &'static str,
    pub component: String,
    /// Process (thread group) id, when known.
    pub pid: Option<u32>,
    pub comm: Option<String>,
    /// Local endpoint (`ip:port`) for TCP events.
    pub src: Option<String>,
    /// Remote endpoint for TCP events.
    pub dst: Option<String>,
    /// Human-readable specifics (durations, states, memory figures).
    pub detail: String,
}

/// The last `capacity` events, oldest first.
#[derive(Debug)]
pub struct EventRing {
    capacity: usize,
    events: VecDeque<Event>,
    /// Events pushed out of the ring since start.
    pub dropped: u64,
}

impl EventRing {
    pub fn new(capacity: usize) -> EventRing {
        assert!(capacity > 0, "an event ring needs room for one event");
        EventRing {
            capacity,
            events: VecDeque::with_capacity(capacity.min(1024)),
            dropped: 0,
        }
    }

    pub fn push(&mut self, e: Event) {
        if self.events.len() == self.capacity {
            self.events.pop_front();
            self.dropped += 1;
        }
        self.events.push_back(e);
    }

    /// Events with `ts_ms >= since`, in time order (the ring is kept sorted on insertion
    /// order; events arrive nearly in order, so they are sorted on the way out).
    pub fn since(&self, since_ms: u64) -> Vec<Event> {
        let mut out: Vec<Event> = self
            .events
            .iter()
            .filter(|e| e.ts_ms >= since_ms)
            .cloned()
            .collect();
        out.sort_by_key(|e| e.ts_ms);
        out
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(ts_ms: u64) -> Event {
        Event {
            ts_ms,
            kind: "reset",
            component: "unknown".into(),
            pid: None,
            comm: None,
            src: None,
            dst: None,
            detail: String::new(),
        }
    }

    #[test]
    fn bounded_and_filtered_by_time() {
        let mut r = EventRing::new(3);
        for t in [5, 1, 7, 9] {
            r.push(ev(t));
        }
        assert_eq!(r.len(), 3);
        assert_eq!(r.dropped, 1);
        let ts: Vec<u64> = r.since(0).iter().map(|e| e.ts_ms).collect();
        assert_eq!(ts, vec![1, 7, 9]);
        let ts: Vec<u64> = r.since(7).iter().map(|e| e.ts_ms).collect();
        assert_eq!(ts, vec![7, 9]);
        let json = serde_json::to_value(ev(3)).unwrap();
        assert_eq!(json["kind"], "reset");
        assert!(json["pid"].is_null());
    }
}
