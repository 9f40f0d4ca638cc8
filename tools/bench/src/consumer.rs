//! The live consumer: one connection consuming the bench queue for the whole run (no-ack, as
//! fast as it can), checking off each round's messages by their `message_id`
//! (`<tag>-<index>`), and telling the round when every message has arrived at least once.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use futures::StreamExt;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct Consumer {
    connection: Connection,
    state: Arc<Mutex<Option<Round>>>,
    task: JoinHandle<()>,
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
        let connection = Connection::connect(
            amqp_url,
            ConnectionProperties::default().with_connection_name(format!("{name} consumer").into()),
        )
        .await
        .context("connecting the consumer")?;
        let channel = connection.create_channel().await?;
        let mut deliveries = channel
            .basic_consume(
                queue.into(),
                "outbox-relay-bench".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .context("starting the consumer")?;
        let state: Arc<Mutex<Option<Round>>> = Arc::new(Mutex::new(None));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Some(Ok(delivery)) = deliveries.next().await {
                let now = Instant::now();
                let Some(id) = delivery.properties.message_id() else {
                    continue;
                };
                let Some((tag, index)) = id.as_str().rsplit_once('-') else {
                    continue;
                };
                let Ok(index) = index.parse::<usize>() else {
                    continue;
                };
                let Ok(mut guard) = shared.lock() else { return };
                if let Some(round) = guard.as_mut() {
                    round.check_off(tag, index, now);
                }
            }
        });
        Ok(Consumer {
            connection,
            state,
            task,
        })
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
        self.task.abort();
        let _ = self.connection.close(200, "bench done".into()).await;
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
