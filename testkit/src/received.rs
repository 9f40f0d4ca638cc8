//! What a consumer of the test queue received, and the assertions on it that the relay's
//! promises make: per-key order of first deliveries, one message_id per row, nothing lost.
//! [`Inbox`] is the test's consumer (the kit's consumer, acking after recording, reconnecting),
//! keeping every delivery in arrival order, duplicates included.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::message::Delivery;
use lapin::types::AMQPValue;
use serde_json::Value;

use crate::consumer::{as_i64, as_string, message_id, Consumer, ConsumerSettings};
use crate::wait::{eventually, TIMEOUT};

/// One message as the consumer received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub message_id: String,
    pub kind: Option<String>,
    pub content_type: Option<String>,
    pub delivery_mode: Option<u8>,
    pub timestamp: Option<u64>,
    pub headers: BTreeMap<String, AMQPValue>,
    pub body: Vec<u8>,
    pub exchange: String,
    pub routing_key: String,
    pub redelivered: bool,
}

impl Received {
    fn of(delivery: &Delivery) -> Received {
        let p = &delivery.properties;
        let headers = p
            .headers()
            .as_ref()
            .map(|h| {
                h.inner()
                    .iter()
                    .map(|(k, v)| (k.as_str().to_owned(), v.clone()))
                    .collect()
            })
            .unwrap_or_default();
        Received {
            message_id: message_id(p).to_owned(),
            kind: p.kind().as_ref().map(|s| s.as_str().to_owned()),
            content_type: p.content_type().as_ref().map(|s| s.as_str().to_owned()),
            delivery_mode: *p.delivery_mode(),
            timestamp: *p.timestamp(),
            headers,
            body: delivery.data.clone(),
            exchange: delivery.exchange.as_str().to_owned(),
            routing_key: delivery.routing_key.as_str().to_owned(),
            redelivered: delivery.redelivered,
        }
    }

    /// The `x-outbox-id` header.
    pub fn outbox_id(&self) -> i64 {
        let header = self.headers.get("x-outbox-id");
        header.and_then(as_i64).unwrap_or_else(|| {
            panic!(
                "message {} has no integer x-outbox-id: {header:?}",
                self.message_id
            )
        })
    }

    /// The `x-ordering-key` header.
    pub fn ordering_key(&self) -> String {
        self.header_str("x-ordering-key")
            .unwrap_or_else(|| panic!("message {} has no x-ordering-key", self.message_id))
    }

    /// A string header's value.
    pub fn header_str(&self, name: &str) -> Option<String> {
        self.headers.get(name).and_then(as_string)
    }

    pub fn body_json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("the body is JSON")
    }
}

/// A real consumer on the test queue, reconnecting when its connection is closed, that keeps
/// every delivery. Acks each message after recording it, so a message lost with a closed
/// connection is redelivered.
pub struct Inbox {
    received: Arc<Mutex<Vec<Received>>>,
    _consumer: Consumer,
}

impl Inbox {
    /// Subscribes before returning, so nothing published afterwards can be missed.
    pub async fn start(amqp_url: &str, queue: &str) -> Inbox {
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = received.clone();
        let consumer = Consumer::start(ConsumerSettings::new(amqp_url, queue), move |d| {
            sink.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Received::of(d));
        })
        .await
        .unwrap_or_else(|e| panic!("start the test consumer: {e:#}"));
        Inbox {
            received,
            _consumer: consumer,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Received>> {
        self.received.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every delivery so far, duplicates included, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.lock().clone()
    }

    /// Distinct message_ids received so far.
    pub fn unique_count(&self) -> usize {
        self.lock()
            .iter()
            .map(|r| r.message_id.as_str())
            .collect::<HashSet<_>>()
            .len()
    }

    /// Waits until at least `n` distinct messages arrived; returns every delivery so far.
    pub async fn wait_for(&self, n: usize) -> Vec<Received> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let got = self.unique_count();
            if got >= n {
                return self.received();
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {TIMEOUT:?}: {got} of {n} distinct messages arrived"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until a message with `message_id` arrived; returns every delivery so far.
    pub async fn wait_for_id(&self, message_id: &str) -> Vec<Received> {
        eventually(&format!("message {message_id}"), || async {
            self.lock().iter().any(|r| r.message_id == message_id)
        })
        .await;
        self.received()
    }
}

/// The first delivery of each message_id, in arrival order.
pub fn first_deliveries(received: &[Received]) -> Vec<&Received> {
    let mut seen = HashSet::new();
    received
        .iter()
        .filter(|r| seen.insert(r.message_id.clone()))
        .collect()
}

/// Asserts that, for every ordering key, the first deliveries came in increasing id order.
pub fn assert_first_deliveries_in_id_order(received: &[Received]) {
    let mut last: HashMap<String, i64> = HashMap::new();
    for r in first_deliveries(received) {
        let id = r.outbox_id();
        if let Some(prev) = last.insert(r.ordering_key(), id) {
            assert!(
                prev < id,
                "key {}: id {id} arrived after id {prev} (first deliveries out of order)",
                r.ordering_key()
            );
        }
    }
}

/// Asserts that every redelivered row carries the same message_id (and that distinct rows do
/// not share one). Returns the number of duplicate deliveries.
pub fn assert_duplicates_share_message_id(received: &[Received]) -> usize {
    if std::env::var("OBR_TEST_DEBUG").is_ok() {
        let mut counts: BTreeMap<i64, usize> = BTreeMap::new();
        for r in received {
            *counts.entry(r.outbox_id()).or_default() += 1;
        }
        let dups: Vec<(i64, usize)> = counts.into_iter().filter(|(_, n)| *n > 1).collect();
        eprintln!("duplicated rows (id, deliveries): {dups:?}");
    }
    let mut by_id: HashMap<i64, &str> = HashMap::new();
    let mut by_message: HashMap<&str, i64> = HashMap::new();
    for r in received {
        let id = r.outbox_id();
        let first = *by_id.entry(id).or_insert(r.message_id.as_str());
        assert_eq!(
            first, r.message_id,
            "row {id} was delivered with two message_ids"
        );
        let owner = *by_message.entry(r.message_id.as_str()).or_insert(id);
        assert_eq!(
            owner, id,
            "message_id {} was used by rows {owner} and {id}",
            r.message_id
        );
    }
    received.len() - by_id.len()
}

/// For the key whose deliveries (duplicates included) restart the most, that key and how many
/// times its id sequence went backwards. A relay that restarts once re-sends from its oldest
/// unmarked row: one restart per key. Two relays publishing the same key at once interleave
/// two sequences: many restarts.
pub fn most_restarts_of_a_key(received: &[Received]) -> (String, usize) {
    let mut last: HashMap<String, i64> = HashMap::new();
    let mut restarts: HashMap<String, usize> = HashMap::new();
    for r in received {
        let id = r.outbox_id();
        if let Some(prev) = last.insert(r.ordering_key(), id) {
            if id <= prev {
                *restarts.entry(r.ordering_key()).or_default() += 1;
            }
        }
    }
    restarts
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .unwrap_or_default()
}

/// The ids of `key`'s first deliveries, in arrival order.
pub fn delivered_of_key(received: &[Received], key: &str) -> Vec<i64> {
    first_deliveries(received)
        .iter()
        .filter(|m| m.ordering_key() == key)
        .map(|m| m.outbox_id())
        .collect()
}

/// Every delivery of `key` (duplicates included) as (position among all deliveries, id), in
/// arrival order: what a failed order assertion shows, to place each go-back in the run.
pub fn deliveries_of_key(received: &[Received], key: &str) -> Vec<(usize, i64)> {
    received
        .iter()
        .enumerate()
        .filter(|(_, m)| m.ordering_key() == key)
        .map(|(i, m)| (i, m.outbox_id()))
        .collect()
}

/// Ids of the rows delivered at least once.
pub fn delivered_ids(received: &[Received]) -> HashSet<i64> {
    received.iter().map(|r| r.outbox_id()).collect()
}
