//! What the gateway itself knows about orders, for `GET /v1/orders/{id}` when persistence
//! does not have the order (yet) and for formatting cancel answers.
//!
//! Two parts, both bounded:
//! * **queued**: every new order waiting in the retry queue (bounded by the spool's limits;
//!   rebuilt from the spool at start). While an order is here its status is `queued`, whatever
//!   persistence says.
//! * **recent**: the last answers the engine gave (bounded, FIFO), covering the moment between
//!   the engine's answer and persistence's commit (eventual consistency).

use domain::{OrderId, Symbol};
use serde_json::Value;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

/// One order as the gateway knows it.
#[derive(Debug, Clone)]
pub struct KnownOrder {
    pub symbol: Symbol,
    /// The JSON to answer `GET /v1/orders/{id}` with.
    pub view: Arc<Value>,
}

#[derive(Debug, Default)]
struct Known {
    queued: HashMap<OrderId, KnownOrder>,
    recent: HashMap<OrderId, KnownOrder>,
    recent_order: VecDeque<OrderId>,
}

/// Queued and recently answered orders.
#[derive(Debug)]
pub struct KnownOrders {
    inner: Mutex<Known>,
    max_recent: usize,
}

impl KnownOrders {
    pub fn new(max_recent: usize) -> KnownOrders {
        KnownOrders {
            inner: Mutex::new(Known::default()),
            max_recent,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Known> {
        // Mutations complete before anything that could panic; a poisoned map is consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An order went into the retry queue.
    pub fn queued(&self, id: OrderId, order: KnownOrder) {
        let mut k = self.lock();
        k.queued.insert(id, order);
        metrics::gauge!("gateway_queued_orders").set(k.queued.len() as f64);
    }

    /// A queued order left the retry queue (delivered or dead-lettered).
    pub fn dequeued(&self, id: OrderId) -> Option<KnownOrder> {
        let mut k = self.lock();
        let o = k.queued.remove(&id);
        metrics::gauge!("gateway_queued_orders").set(k.queued.len() as f64);
        o
    }

    /// The engine answered about `id`.
    pub fn answered(&self, id: OrderId, order: KnownOrder) {
        if self.max_recent == 0 {
            return;
        }
        let mut k = self.lock();
        if k.recent.insert(id, order).is_none() {
            k.recent_order.push_back(id);
        }
        while k.recent_order.len() > self.max_recent {
            if let Some(old) = k.recent_order.pop_front() {
                k.recent.remove(&old);
            }
        }
    }

    /// The gateway's view of `id`, queued first.
    pub fn get(&self, id: OrderId) -> Option<KnownOrder> {
        let k = self.lock();
        k.queued.get(&id).or_else(|| k.recent.get(&id)).cloned()
    }

    pub fn is_queued(&self, id: OrderId) -> bool {
        self.lock().queued.contains_key(&id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(status: &str) -> KnownOrder {
        KnownOrder {
            symbol: Symbol::parse("symbol", "AAPL").unwrap(),
            view: Arc::new(serde_json::json!({ "status": status })),
        }
    }

    #[test]
    fn queued_wins_and_recent_is_bounded() {
        let k = KnownOrders::new(2);
        k.queued(OrderId(1), known("queued"));
        k.answered(OrderId(1), known("filled"));
        assert_eq!(k.get(OrderId(1)).unwrap().view["status"], "queued");
        assert!(k.dequeued(OrderId(1)).is_some());
        assert_eq!(k.get(OrderId(1)).unwrap().view["status"], "filled");
        k.answered(OrderId(2), known("new"));
        k.answered(OrderId(3), known("new"));
        assert!(k.get(OrderId(1)).is_none());
        assert!(k.get(OrderId(3)).is_some());
    }
}
