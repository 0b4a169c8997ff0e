//! What the gateway itself knows about orders, for `GET /v1/orders/{id}` when persistence
//! does not have the order (yet) and for formatting cancel answers.
//!
//! Two parts, both bounded:
//! * **queued**: every new order waiting in the retry queue (bounded by the spool's limits;
//!   rebuilt from the spool at start). While an order is here its status is `queued`, whatever
//!   persistence says.
//! * **recent**: the last answers the engine gave (bounded, FIFO), covering the moment between
//!   the engine's answer and persistence's commit (eventual consistency).

use crate::answers::{self, OrderAnswer};
use domain::{OrderId, Symbol};
use serde_json::Value;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

/// One order as the gateway knows it.
#[derive(Debug, Clone)]
pub struct KnownOrder {
    pub symbol: Symbol,
    /// What to answer `GET /v1/orders/{id}` with.
    pub view: KnownView,
}

/// The gateway's view of an order. An engine answer is kept as it is and turned into the
/// view's JSON only when someone asks: every accepted order passes through here, few are
/// looked up before persistence has them, and building a JSON tree per order was ~7 % of the
/// gateway's CPU under load.
#[derive(Debug, Clone)]
pub enum KnownView {
    /// A view built already (a queued order, a refusal).
    Json(Arc<Value>),
    /// The engine's answer, formatted by [`answers::answered_view`] when asked.
    Answered(Arc<OrderAnswer>),
}

impl KnownView {
    /// The view as JSON.
    pub fn to_value(&self) -> Value {
        match self {
            KnownView::Json(v) => Value::clone(v),
            KnownView::Answered(a) => answers::answered_view(a),
        }
    }

    /// The order's `client_order_id`, when the view has one.
    pub fn client_order_id(&self) -> Option<&str> {
        match self {
            KnownView::Json(v) => v.get("client_order_id").and_then(|v| v.as_str()),
            KnownView::Answered(a) => a.client_order_id.as_ref().map(|c| c.as_str()),
        }
    }
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
            view: KnownView::Json(Arc::new(serde_json::json!({ "status": status }))),
        }
    }

    #[test]
    fn queued_wins_and_recent_is_bounded() {
        let k = KnownOrders::new(2);
        k.queued(OrderId(1), known("queued"));
        k.answered(OrderId(1), known("filled"));
        assert_eq!(
            k.get(OrderId(1)).unwrap().view.to_value()["status"],
            "queued"
        );
        assert!(k.dequeued(OrderId(1)).is_some());
        assert_eq!(
            k.get(OrderId(1)).unwrap().view.to_value()["status"],
            "filled"
        );
        k.answered(OrderId(2), known("new"));
        k.answered(OrderId(3), known("new"));
        assert!(k.get(OrderId(1)).is_none());
        assert!(k.get(OrderId(3)).is_some());
    }

    #[test]
    fn an_answered_view_is_built_when_asked_and_names_its_client_order_id() {
        let answer = OrderAnswer {
            order_id: OrderId(7),
            client_order_id: Some(domain::ClientOrderId::parse("client_order_id", "c-7").unwrap()),
            symbol: Some("AAPL".into()),
            status: "new".into(),
            filled_quantity: domain::Quantity(0),
            resting_quantity: domain::Quantity(5),
            fills: vec![],
            reject_reason: None,
            expire_reason: None,
        };
        let view = KnownView::Answered(Arc::new(answer.clone()));
        assert_eq!(view.to_value(), answers::answered_view(&answer));
        assert_eq!(view.to_value()["source"], "gateway");
        assert_eq!(view.to_value()["resting_quantity"], 5);
        assert_eq!(view.client_order_id(), Some("c-7"));
        let queued = KnownView::Json(Arc::new(serde_json::json!({ "client_order_id": "c-8" })));
        assert_eq!(queued.client_order_id(), Some("c-8"));
        assert_eq!(known("new").view.client_order_id(), None);
    }
}
