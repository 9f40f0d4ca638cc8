//! The live consumer: one connection consuming the bench queue for the whole run (no-ack, as
//! fast as it can), checking off each round's messages by their `message_id`
//! (`<tag>-<index>`), and telling the round when every message has arrived at least once. The
//! connection and the subscription are the test kit's consumer; this file keeps the rounds.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use outbox_relay_testkit::consumer::{self, Acks, ConsumerSettings};
use tokio::sync::oneshot;

pub struct Consumer {
    consumer: consumer::Consumer,
    state: Arc<Mutex<Option<Round>>>,
}

/// What the consumer expects in the current round.
struct Round {
    tag: String,
    seen: Vec<bool>,
    distinct: usize,
    duplicates: u64,
    first: Option<Instant>,
    /// Receive time per index, kept only when latency is measured.
    times: Option<Vec<Option<Instant>>>,
    done: Option<oneshot::Sender<Instant>>,
}

/// A finished round as the consumer saw it.
#[derive(Debug, Default)]
pub struct Received {
    pub duplicates: u64,
    pub first: Option<Instant>,
    pub times: Option<Vec<Option<Instant>>>,
}

impl Consumer {
    pub async fn start(amqp_url: &str, queue: &str, name: &str) -> anyhow::Result<Consumer> {
        let mut settings = ConsumerSettings::new(amqp_url, queue);
        settings.connection_name = Some(format!("{name} consumer"));
        settings.consumer_tag = "outbox-relay-bench".into();
        settings.acks = Acks::None;
        settings.reconnect = false;
        let state: Arc<Mutex<Option<Round>>> = Arc::new(Mutex::new(None));
        let shared = state.clone();
        let consumer = consumer::Consumer::start(settings, move |delivery| {
            let now = Instant::now();
            let id = consumer::message_id(&delivery.properties);
            let Some((tag, index)) = id.rsplit_once('-') else {
                return;
            };
            let Ok(index) = index.parse::<usize>() else {
                return;
            };
            let Ok(mut guard) = shared.lock() else { return };
            if let Some(round) = guard.as_mut() {
                round.check_off(tag, index, now);
            }
        })
        .await?;
        Ok(Consumer { consumer, state })
    }

    /// Starts a round: `count` messages with ids `<tag>-0` .. `<tag>-<count-1>`. The receiver
    /// fires with the arrival time of the last one missing.
    pub fn expect(&self, tag: &str, count: usize, keep_times: bool) -> oneshot::Receiver<Instant> {
        let (done, all_received) = oneshot::channel();
        let round = Round {
            tag: tag.to_owned(),
            seen: vec![false; count],
            distinct: 0,
            duplicates: 0,
            first: None,
            times: keep_times.then(|| vec![None; count]),
            done: Some(done),
        };
        if let Ok(mut guard) = self.state.lock() {
            *guard = Some(round);
        }
        all_received
    }

    /// Messages of the current round received so far (distinct).
    pub fn progress(&self) -> usize {
        self.state
            .lock()
            .ok()
            .and_then(|g| g.as_ref().map(|r| r.distinct))
            .unwrap_or(0)
    }

    /// Ends the round and returns what arrived.
    pub fn finish(&self) -> Received {
        let round = self.state.lock().ok().and_then(|mut g| g.take());
        match round {
            Some(r) => Received {
                duplicates: r.duplicates,
                first: r.first,
                times: r.times,
            },
            None => Received::default(),
        }
    }

    pub async fn stop(self) {
        self.consumer.stop().await;
    }
}

impl Round {
    fn check_off(&mut self, tag: &str, index: usize, now: Instant) {
        if tag != self.tag || index >= self.seen.len() {
            return;
        }
        self.first.get_or_insert(now);
        if self.seen[index] {
            self.duplicates += 1;
            return;
        }
        self.seen[index] = true;
        self.distinct += 1;
        if let Some(times) = &mut self.times {
            times[index] = Some(now);
        }
        if self.distinct == self.seen.len() {
            if let Some(done) = self.done.take() {
                let _ = done.send(now);
            }
        }
    }
}
