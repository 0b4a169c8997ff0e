//! The bounded memory of answers given, keyed by `client_order_id`.
//!
//! `POST /v1/orders` with a `client_order_id` the gateway has answered before gets that answer
//! again, same status and same bytes, if the order's validated content is the same (its
//! [`Fingerprint`]), and a 409 if it is not. A request whose key is still being worked on by
//! another request waits for that answer instead of racing it to the engine.
//!
//! The memory is bounded in entries and bytes and forgets the oldest answers first (FIFO).
//! What it forgot, or what it lost in a restart, the engine still knows: it answers a known
//! `client_order_id` with the original outcome or a 409, and the gateway passes that through.
//! Only answers that are the order's fate are remembered (201 with the engine's outcome, 202
//! queued), never errors that a retry could turn out differently.

use bytes::Bytes;
use domain::{NewOrder, OrderId};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::watch;

/// A digest of an order's validated content (everything but the order id the gateway assigns).
/// Two requests with the same fingerprint ask for the same thing, whatever their spelling
/// (`"101.25"` and `"101.250"`, an omitted `time_in_force` and its default).
pub type Fingerprint = [u8; 16];

/// The fingerprint of `order`, ignoring its `order_id`.
pub fn fingerprint(order: &NewOrder) -> Fingerprint {
    let mut canonical = order.clone();
    canonical.order_id = OrderId(0);
    // Serializing a plain struct of strings and integers cannot fail.
    let json = serde_json::to_vec(&canonical).unwrap_or_default();
    let digest = Sha256::digest(&json);
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    out
}

/// An answer as it was given: replayed byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAnswer {
    pub status: u16,
    pub body: Bytes,
}

/// Bookkeeping bytes per entry beyond its key and body (map slot, queue slot, `Arc`).
const ENTRY_OVERHEAD_BYTES: usize = 96;

#[derive(Debug)]
enum Slot {
    /// A request is working on this key; others wait on `rx` (it changes or closes when
    /// that request answers or gives up).
    InFlight {
        fingerprint: Fingerprint,
        token: u64,
        rx: watch::Receiver<bool>,
    },
    Answered {
        fingerprint: Fingerprint,
        answer: Arc<StoredAnswer>,
    },
}

impl Slot {
    /// Whether this is the in-flight slot of the reservation holding `token` (not a later
    /// request's, after the key was freed and taken again).
    fn held_by(&self, token: u64) -> bool {
        matches!(self, Slot::InFlight { token: t, .. } if *t == token)
    }
}

#[derive(Debug, Default)]
struct Store {
    map: HashMap<String, Slot>,
    /// Answered keys, oldest first. Every key here maps to `Slot::Answered`.
    order: VecDeque<String>,
    bytes: usize,
    next_token: u64,
}

/// The outcome of [`Idempotency::begin`].
#[derive(Debug)]
pub enum Begin {
    /// Nobody has this key: the caller owns it until the reservation completes or drops.
    Fresh(Reservation),
    /// Answered before with the same content: give this answer again.
    Replay(Arc<StoredAnswer>),
    /// Answered before (or being answered) with other content.
    Conflict,
    /// Another request is working on the same key with the same content: wait, then retry.
    Wait(watch::Receiver<bool>),
}

/// Bounded map of `client_order_id` → (fingerprint, answer).
#[derive(Debug)]
pub struct Idempotency {
    store: Mutex<Store>,
    max_entries: usize,
    max_bytes: usize,
}

impl Idempotency {
    pub fn new(max_entries: usize, max_bytes: usize) -> Arc<Idempotency> {
        Arc::new(Idempotency {
            store: Mutex::new(Store::default()),
            max_entries: max_entries.max(1),
            max_bytes: max_bytes.max(1),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Store> {
        // Every mutation below completes before anything that could panic, so a poisoned
        // lock still guards a consistent map.
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Looks `key` up and, if nobody has it, reserves it for the caller.
    pub fn begin(self: &Arc<Self>, key: &str, fingerprint: Fingerprint) -> Begin {
        let mut st = self.lock();
        match st.map.get(key) {
            Some(Slot::Answered {
                fingerprint: f,
                answer,
            }) => {
                if *f == fingerprint {
                    Begin::Replay(answer.clone())
                } else {
                    Begin::Conflict
                }
            }
            Some(Slot::InFlight {
                fingerprint: f, rx, ..
            }) => {
                if *f == fingerprint {
                    Begin::Wait(rx.clone())
                } else {
                    Begin::Conflict
                }
            }
            None => {
                let token = st.next_token;
                st.next_token += 1;
                let (tx, rx) = watch::channel(false);
                st.map.insert(
                    key.to_owned(),
                    Slot::InFlight {
                        fingerprint,
                        token,
                        rx,
                    },
                );
                Begin::Fresh(Reservation {
                    store: self.clone(),
                    key: key.to_owned(),
                    token,
                    fingerprint,
                    tx: Some(tx),
                })
            }
        }
    }

    /// Records an answer given in an earlier run (rebuilt from the spool), unless the key is
    /// already known.
    pub fn remember(&self, key: &str, fingerprint: Fingerprint, answer: StoredAnswer) {
        let mut st = self.lock();
        if st.map.contains_key(key) {
            return;
        }
        self.insert_answered(&mut st, key.to_owned(), fingerprint, Arc::new(answer));
    }

    /// Answers remembered.
    pub fn len(&self) -> usize {
        self.lock().order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn insert_answered(
        &self,
        st: &mut Store,
        key: String,
        fingerprint: Fingerprint,
        answer: Arc<StoredAnswer>,
    ) {
        st.map.insert(
            key.clone(),
            Slot::Answered {
                fingerprint,
                answer: answer.clone(),
            },
        );
        self.answered_in_place(st, key, &answer);
    }

    /// Accounts for `key`, whose slot in the map already holds `answer`, and forgets the
    /// oldest answers beyond the bounds.
    fn answered_in_place(&self, st: &mut Store, key: String, answer: &StoredAnswer) {
        st.bytes += entry_bytes(&key, answer);
        st.order.push_back(key);
        while st.order.len() > self.max_entries || st.bytes > self.max_bytes {
            let Some(oldest) = st.order.pop_front() else {
                break;
            };
            if let Some(Slot::Answered { answer, .. }) = st.map.remove(&oldest) {
                st.bytes = st.bytes.saturating_sub(entry_bytes(&oldest, &answer));
            }
        }
        metrics::gauge!("gateway_idempotency_entries").set(st.order.len() as f64);
    }
}

fn entry_bytes(key: &str, answer: &StoredAnswer) -> usize {
    key.len() + answer.body.len() + ENTRY_OVERHEAD_BYTES
}

/// Ownership of one key while its request is answered. Dropping it without
/// [`Reservation::complete`] (an error answer, a cancelled request) frees the key.
#[derive(Debug)]
pub struct Reservation {
    store: Arc<Idempotency>,
    key: String,
    token: u64,
    fingerprint: Fingerprint,
    tx: Option<watch::Sender<bool>>,
}

impl Reservation {
    /// Remembers `answer` for the key and wakes requests waiting on it.
    pub fn complete(mut self, answer: StoredAnswer) -> Arc<StoredAnswer> {
        let answer = Arc::new(answer);
        {
            let mut st = self.store.lock();
            // The slot is turned into the answer where it is: one lookup, no new key.
            let ours = match st.map.get_mut(&self.key) {
                Some(slot) if slot.held_by(self.token) => {
                    *slot = Slot::Answered {
                        fingerprint: self.fingerprint,
                        answer: answer.clone(),
                    };
                    true
                }
                _ => false,
            };
            if ours {
                let key = std::mem::take(&mut self.key);
                self.store.answered_in_place(&mut st, key, &answer);
            }
        }
        if let Some(tx) = self.tx.take() {
            tx.send_replace(true);
        }
        answer
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let mut st = self.store.lock();
            if st
                .map
                .get(&self.key)
                .is_some_and(|slot| slot.held_by(self.token))
            {
                st.map.remove(&self.key);
            }
            drop(st);
            tx.send_replace(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(s: &str) -> StoredAnswer {
        StoredAnswer {
            status: 201,
            body: Bytes::from(s.to_owned()),
        }
    }

    #[test]
    fn replay_conflict_and_release() {
        let idem = Idempotency::new(10, 1 << 20);
        let Begin::Fresh(r) = idem.begin("a", [1; 16]) else {
            panic!("fresh key")
        };
        assert!(matches!(idem.begin("a", [1; 16]), Begin::Wait(_)));
        assert!(matches!(idem.begin("a", [2; 16]), Begin::Conflict));
        r.complete(answer("x"));
        match idem.begin("a", [1; 16]) {
            Begin::Replay(a) => assert_eq!(a.body, "x"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(idem.begin("a", [2; 16]), Begin::Conflict));
        // A dropped reservation frees its key.
        let Begin::Fresh(r) = idem.begin("b", [1; 16]) else {
            panic!("fresh key")
        };
        drop(r);
        assert!(matches!(idem.begin("b", [2; 16]), Begin::Fresh(_)));
    }

    #[test]
    fn bounded_fifo() {
        let idem = Idempotency::new(3, 1 << 20);
        for k in ["a", "b", "c", "d"] {
            idem.remember(k, [0; 16], answer(k));
        }
        assert_eq!(idem.len(), 3);
        assert!(matches!(idem.begin("a", [0; 16]), Begin::Fresh(_)));
        assert!(matches!(idem.begin("d", [0; 16]), Begin::Replay(_)));
        let small = Idempotency::new(100, 2 * (ENTRY_OVERHEAD_BYTES + 2));
        for k in ["a", "b", "c"] {
            small.remember(k, [0; 16], answer(k));
        }
        assert_eq!(small.len(), 2);
    }

    #[tokio::test]
    async fn waiters_wake_when_the_owner_answers() {
        let idem = Idempotency::new(10, 1 << 20);
        let Begin::Fresh(r) = idem.begin("a", [1; 16]) else {
            panic!("fresh key")
        };
        let Begin::Wait(mut rx) = idem.begin("a", [1; 16]) else {
            panic!("in flight")
        };
        let waiter = tokio::spawn(async move { rx.wait_for(|done| *done).await.is_ok() });
        r.complete(answer("x"));
        assert!(waiter.await.unwrap());
        assert!(matches!(idem.begin("a", [1; 16]), Begin::Replay(_)));
    }
}
