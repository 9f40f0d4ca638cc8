//! The relay loop for one outbox table: fetch due rows, publish them with a bounded window of
//! confirms (one unconfirmed message per ordering key), mark what was confirmed, record what
//! failed. Joins the store and the publisher; has no SQL and no AMQP of its own.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use rand::Rng;

use crate::config::{OnExhausted, OutboxSettings, Settings};
use crate::message::{self, OutboundMessage, OutboxRow};
use crate::publisher::{learned_max_size, PublishError, Publisher};
use crate::retry::{RetryPolicy, Verdict};
use crate::shutdown::Shutdown;
use crate::store::{db_message, Failure, LockSession, Store, TableLock, TableSql};

/// What one [`TableRelay::step`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A batch went out: `published` rows confirmed and marked, `failed` recorded for retry
    /// (of which `parked` were parked). `full` when the fetch filled the batch.
    Batch {
        published: usize,
        failed: usize,
        parked: usize,
        full: bool,
    },
    /// Nothing is due.
    Idle,
    /// Another relay holds this table's lock; this one waits as a standby.
    Standby,
    /// The broker blocked the connection (resource alarm): fetching is paused.
    Paused,
    /// PostgreSQL or RabbitMQ is unreachable; the reason is logged once.
    Down,
}

/// The relay's view of its dependencies, logged once per change.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Health {
    Starting,
    Relaying,
    Standby,
    Blocked,
    DatabaseDown(String),
    BrokerDown(String),
}

/// Liveness for the systemd watchdog and readiness: set by the loop on every turn.
#[derive(Default)]
pub struct Heartbeat {
    /// The relay's current state in words, for systemd's STATUS= line.
    status: std::sync::Mutex<String>,
    /// Milliseconds since `started` of the last turn of the loop.
    last_beat_ms: AtomicU64,
    /// 1 once the relay has connected to both servers (relaying or standing by).
    ready: AtomicU64,
    started: std::sync::OnceLock<Instant>,
}

impl Heartbeat {
    fn beat(&self) {
        let start = *self.started.get_or_init(Instant::now);
        self.last_beat_ms
            .store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn set_ready(&self, ready: bool) {
        self.ready.store(ready as u64, Ordering::Relaxed);
    }

    fn set_status(&self, status: String) {
        if let Ok(mut s) = self.status.lock() {
            *s = status;
        }
    }

    /// The relay's current state in words.
    pub fn status(&self) -> String {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// True while the relay is relaying or standing by (both servers reachable).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) == 1
    }

    /// How long since the loop last turned.
    pub fn silence(&self) -> Duration {
        let start = *self.started.get_or_init(Instant::now);
        start.elapsed().saturating_sub(Duration::from_millis(
            self.last_beat_ms.load(Ordering::Relaxed),
        ))
    }
}

/// The relay for one outbox table.
pub struct TableRelay {
    settings: Arc<Settings>,
    table: OutboxSettings,
    sql: TableSql,
    policy: RetryPolicy,
    store: Store,
    shutdown: Shutdown,
    lock: Option<TableLock>,
    /// The lock session of a standby, tried again every poll interval.
    standby: Option<LockSession>,
    publisher: Option<Publisher>,
    /// Confirmed rows whose mark failed; marked before anything is fetched again.
    unmarked: Vec<i64>,
    /// The mark of the previous batch, written while the next batch is published.
    marking: Option<Marking>,
    /// Failures whose recording failed; recorded before anything is fetched again.
    unrecorded: Vec<Failure>,
    max_message_bytes: usize,
    health: Health,
    outage_attempts: u32,
    heartbeat: Arc<Heartbeat>,
}

impl TableRelay {
    pub fn new(
        settings: Arc<Settings>,
        table: OutboxSettings,
        store: Store,
        shutdown: Shutdown,
    ) -> Self {
        let retry = settings.retry.with_override(&table.retry);
        let policy = RetryPolicy::from(&retry);
        let sql = TableSql::new(&table.table, policy.on_exhausted);
        let max_message_bytes = settings.rabbitmq.max_message_bytes;
        Self {
            settings,
            table,
            sql,
            policy,
            store,
            shutdown,
            lock: None,
            standby: None,
            publisher: None,
            unmarked: Vec::new(),
            marking: None,
            unrecorded: Vec::new(),
            max_message_bytes,
            health: Health::Starting,
            outage_attempts: 0,
            heartbeat: Arc::new(Heartbeat::default()),
        }
    }

    pub fn heartbeat(&self) -> Arc<Heartbeat> {
        self.heartbeat.clone()
    }

    fn set_health(&mut self, health: Health) {
        if self.health == health {
            return;
        }
        let table = self.table.table.to_string();
        match &health {
            Health::Relaying if matches!(self.health, Health::Starting | Health::Standby) => {
                tracing::info!(%table, "relaying: holding the table's lock, connected to PostgreSQL and RabbitMQ")
            }
            Health::Relaying => tracing::info!(%table, "recovered: relaying again"),
            Health::Standby => {
                tracing::info!(%table, "standby: another relay holds this table's lock")
            }
            Health::Blocked => {
                tracing::warn!(%table, "RabbitMQ blocked the connection (resource alarm); fetching paused")
            }
            Health::DatabaseDown(e) => {
                tracing::warn!(%table, error = %e, "PostgreSQL unavailable; retrying with backoff")
            }
            Health::BrokerDown(e) => {
                tracing::warn!(%table, error = %e, "RabbitMQ unavailable; retrying with backoff")
            }
            Health::Starting => {}
        }
        let ready = matches!(health, Health::Relaying | Health::Standby);
        if ready {
            self.outage_attempts = 0;
        }
        self.heartbeat.set_ready(ready);
        self.heartbeat.set_status(format!(
            "{table}: {}",
            match &health {
                Health::Starting => "starting".to_owned(),
                Health::Relaying => "relaying".to_owned(),
                Health::Standby => "standby (another relay holds the lock)".to_owned(),
                Health::Blocked => "paused: broker blocked the connection".to_owned(),
                Health::DatabaseDown(e) => format!("not ready: PostgreSQL: {e}"),
                Health::BrokerDown(e) => format!("not ready: RabbitMQ: {e}"),
            }
        ));
        self.health = health;
    }

    fn database_down(&mut self, context: &str, e: &sqlx::Error) -> Step {
        self.set_health(Health::DatabaseDown(format!(
            "{context}: {}",
            db_message(e)
        )));
        Step::Down
    }

    async fn broker_down(&mut self, error: String) -> Step {
        if let Some(publisher) = self.publisher.take() {
            publisher.close().await;
        }
        if let Some(limit) = learned_max_size(&error) {
            if limit < self.max_message_bytes {
                tracing::warn!(table = %self.table.table, limit, "the broker refused a message as too large; rows above its limit will be parked");
                self.max_message_bytes = limit;
            }
        }
        self.set_health(Health::BrokerDown(error));
        Step::Down
    }

    /// One turn: make sure the lock and both connections are there, then fetch one batch,
    /// publish it, and record the outcome. Never leaves a batch half-done: rows are either
    /// marked published (confirmed), recorded as failed, or left due to go out again.
    pub async fn step(&mut self) -> Step {
        if self.marking.as_ref().is_some_and(|m| m.task.is_finished()) {
            if let Err(e) = self.finish_marking().await {
                return self.database_down("marking rows", &e);
            }
        }
        if let Err(e) = self.flush_outcomes().await {
            return self.database_down("marking rows", &e);
        }
        if self.lock.as_ref().is_some_and(|l| l.is_lost()) {
            // Its session died: another relay may already hold the lock. Stop, then try again.
            self.lock = None;
            self.set_health(Health::DatabaseDown(
                "the table lock's session ended".into(),
            ));
            return Step::Down;
        }
        if self.lock.is_none() {
            let session = match self.standby.take() {
                Some(session) => session,
                None => match self
                    .store
                    .open_lock(&self.table.table, self.settings.relay.notify)
                    .await
                {
                    Ok(session) => session,
                    Err(e) => return self.database_down("opening the lock session", &e),
                },
            };
            match session.try_acquire().await {
                Ok(Ok(lock)) => self.lock = Some(lock),
                Ok(Err(session)) => {
                    self.standby = Some(session);
                    self.set_health(Health::Standby);
                    return Step::Standby;
                }
                Err(e) => return self.database_down("taking the table lock", &e),
            }
        }
        let guard = self.lock.as_ref().expect("lock taken above").guard();
        if self.publisher.as_ref().is_none_or(|p| !p.is_healthy()) {
            if let Some(p) = self.publisher.take() {
                // Found dead between batches (closed by the broker, an operator or the
                // network): say so once; the reconnect below logs the recovery.
                self.set_health(Health::BrokerDown(
                    "the connection was closed (by the broker, an operator or the network); reconnecting".into(),
                ));
                p.close().await;
            }
            let declarations: Vec<_> = self
                .table
                .declare_exchange
                .iter()
                .map(|d| (self.table.exchange.clone(), d.clone()))
                .collect();
            let name = format!(
                "{} {}",
                self.settings.rabbitmq.connection_name, self.table.table
            );
            match Publisher::connect(&self.settings.rabbitmq, &name, &declarations).await {
                Ok(p) => self.publisher = Some(p),
                Err(e) => return self.broker_down(e.to_string()).await,
            }
        }
        if self.publisher.as_ref().is_some_and(|p| p.is_blocked()) {
            self.set_health(Health::Blocked);
            return Step::Paused;
        }
        let limit = self.settings.relay.batch_size;
        let marking_ids: &[i64] = self.marking.as_ref().map_or(&[], |m| &m.ids);
        let rows = match self
            .store
            .fetch_due(&self.sql, &guard, limit, marking_ids)
            .await
        {
            Ok(rows) => rows,
            Err(e) => return self.database_down("fetching due rows", &e),
        };
        self.set_health(Health::Relaying);
        if rows.is_empty() {
            return Step::Idle;
        }
        let full = rows.len() as u32 == limit;
        let outcome = self.publish_batch(rows).await;
        let published = outcome.confirmed.len();
        let failed = outcome.failures.len();
        let parked = outcome
            .failures
            .iter()
            .filter(|f| f.retry_after.is_none())
            .count();
        self.unrecorded.extend(outcome.failures);
        let mut flushed = self.flush_outcomes().await;
        // The previous batch's mark has had a whole batch to finish; this batch's mark runs
        // while the next batch is fetched (excluding these rows) and published.
        if let Err(e) = self.finish_marking().await {
            flushed = Err(e);
        }
        if !outcome.confirmed.is_empty() {
            let (store, sql, ids) = (self.store.clone(), self.sql.clone(), outcome.confirmed);
            let task_ids = ids.clone();
            self.marking = Some(Marking {
                ids,
                task: tokio::spawn(async move { store.mark_published(&sql, &task_ids).await }),
            });
        }
        if let Some(e) = outcome.transport_error {
            return self.broker_down(e).await;
        }
        if let Err(e) = flushed {
            return self.database_down("marking rows", &e);
        }
        Step::Batch {
            published,
            failed,
            parked,
            full,
        }
    }

    /// Waits for the background mark; on failure its rows join `unmarked` and are marked
    /// (synchronously) before the next fetch.
    async fn finish_marking(&mut self) -> Result<(), sqlx::Error> {
        let Some(marking) = self.marking.take() else {
            return Ok(());
        };
        match marking.task.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                self.unmarked.extend(marking.ids);
                self.flush_outcomes().await.map_err(|_| e)
            }
            Err(join) => {
                self.unmarked.extend(marking.ids);
                self.flush_outcomes().await?;
                tracing::error!(error = %join, "the mark task failed; its rows were marked again");
                Ok(())
            }
        }
    }

    /// Marks confirmed rows and records failures left from earlier turns, one statement each.
    async fn flush_outcomes(&mut self) -> Result<(), sqlx::Error> {
        if !self.unmarked.is_empty() {
            self.store.mark_published(&self.sql, &self.unmarked).await?;
            self.unmarked.clear();
        }
        if !self.unrecorded.is_empty() {
            self.store
                .record_failures(&self.sql, &self.unrecorded)
                .await?;
            for f in self.unrecorded.iter().filter(|f| f.retry_after.is_none()) {
                tracing::warn!(table = %self.table.table, id = f.id, error = %f.error, "row parked");
            }
            self.unrecorded.clear();
        }
        Ok(())
    }

    /// Publishes `rows` (in id order) keeping at most one unconfirmed message per ordering key
    /// and at most `max_in_flight` overall. A key whose row fails goes no further this batch.
    async fn publish_batch(&mut self, rows: Vec<OutboxRow>) -> BatchOutcome {
        let mut outcome = BatchOutcome::default();
        let publisher = self.publisher.as_mut().expect("connected before fetching");
        let table = self.table.table.to_string();
        let window = self.settings.relay.max_in_flight;
        let lock = self.lock.as_ref().expect("held before fetching");
        let lock_lost = || lock.is_lost();

        // Rows grouped by key, keys in order of their first row: the ready queue.
        let mut slots: HashMap<&str, usize> = HashMap::new();
        let mut keys: Vec<VecDeque<&OutboxRow>> = Vec::new();
        for row in &rows {
            let slot = *slots.entry(row.ordering_key.as_str()).or_insert_with(|| {
                keys.push(VecDeque::new());
                keys.len() - 1
            });
            keys[slot].push_back(row);
        }
        let mut ready: VecDeque<usize> = (0..keys.len()).collect();
        let mut in_flight = FuturesUnordered::new();
        let failure_for = |row: &OutboxRow, error: String, park_now: bool| {
            let attempt = row.attempts.max(0) as u32 + 1;
            let verdict = if park_now {
                Verdict::Park
            } else {
                self.policy
                    .after_failure(attempt, rand::rng().random::<f64>())
            };
            Failure {
                id: row.id,
                error,
                retry_after: match verdict {
                    Verdict::RetryAfter(d) => Some(d),
                    Verdict::Park => None,
                },
            }
        };

        let confirm_timeout = publisher.confirm_timeout();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // When a confirm last arrived (or the window last went from empty to busy).
        let mut last_progress = Instant::now();
        loop {
            // Fill the window from the ready keys, unless shutting down or broken. A relay
            // whose lock session died stops at once: a standby may be taking over.
            let mut sends: Vec<(usize, &OutboxRow, OutboundMessage)> = Vec::new();
            while in_flight.len() + sends.len() < window
                && outcome.transport_error.is_none()
                && !self.shutdown.is_stopping()
                && !lock_lost()
            {
                let Some(slot) = ready.pop_front() else { break };
                let Some(row) = keys[slot].pop_front() else {
                    continue;
                };
                let message =
                    match message::build(row, &table, &self.table.exchange, self.max_message_bytes)
                    {
                        Ok(m) => m,
                        Err(unpublishable) => {
                            outcome.failures.push(failure_for(
                                row,
                                unpublishable.to_string(),
                                true,
                            ));
                            if self.policy.on_exhausted == OnExhausted::Skip {
                                ready.push_back(slot);
                            }
                            continue;
                        }
                    };
                if let Err(e) = publisher.ensure_exchange(&message.exchange).await {
                    match e {
                        PublishError::Rejected(reason) => {
                            outcome.failures.push(failure_for(row, reason, false))
                        }
                        PublishError::Transport(reason) => outcome.transport_error = Some(reason),
                    }
                    continue;
                }
                sends.push((slot, row, message));
            }
            if !sends.is_empty() {
                if in_flight.is_empty() {
                    last_progress = Instant::now();
                }
                // Hand the whole group to the client at once: its I/O thread writes the frames
                // together instead of waking once per message. Frames (and delivery tags) keep
                // the order of `sends`, and a key has at most one message in the group.
                let publishing =
                    futures::future::join_all(sends.iter().map(|(_, _, m)| publisher.publish(m)));
                let results = tokio::select! {
                    results = publishing => results,
                    _ = self.shutdown.aborted() => break,
                };
                for ((slot, row, _), sent) in sends.into_iter().zip(results) {
                    match sent {
                        Ok(pending) => {
                            in_flight.push(async move { (slot, row, pending.wait().await) })
                        }
                        Err(e) => {
                            if outcome.transport_error.is_none() {
                                outcome.transport_error = Some(e.to_string());
                            }
                        }
                    }
                }
            }
            if in_flight.is_empty() {
                break;
            }
            let next = tokio::select! {
                next = in_flight.next() => next,
                _ = self.shutdown.aborted() => break,
                _ = tick.tick() => {
                    // Confirms may legitimately take long while the broker blocks us (resource
                    // alarm): the loop is alive and the silence clock stops. Otherwise a
                    // connection that stays silent past the confirm timeout is presumed dead.
                    self.heartbeat.beat();
                    if publisher.is_blocked() {
                        last_progress = Instant::now();
                    } else if last_progress.elapsed() >= confirm_timeout {
                        outcome.transport_error = Some(format!(
                            "no confirm from the broker within {}",
                            humantime::format_duration(confirm_timeout)
                        ));
                        break;
                    }
                    continue;
                }
            };
            let Some((slot, row, result)) = next else {
                break;
            };
            last_progress = Instant::now();
            match result {
                Ok(()) => {
                    outcome.confirmed.push(row.id);
                    ready.push_back(slot);
                }
                Err(PublishError::Rejected(reason)) => {
                    tracing::debug!(%table, id = row.id, %reason, "publish rejected");
                    outcome.failures.push(failure_for(row, reason, false));
                }
                Err(PublishError::Transport(reason)) => {
                    if outcome.transport_error.is_none() {
                        outcome.transport_error = Some(reason);
                    }
                    publisher.forget_exchanges();
                }
            }
        }
        if !outcome.failures.is_empty() {
            tracing::warn!(
                %table,
                failed = outcome.failures.len(),
                first_error = %outcome.failures[0].error,
                "publishes failed; retrying with backoff"
            );
        }
        outcome
    }

    /// Runs until shutdown: steps back to back while batches come back full, waits for a
    /// notification or the poll interval when idle, backs off (capped, jittered) while a
    /// server is down. Finishes with the in-flight batch marked, then closes connections.
    pub async fn run(mut self) {
        let poll = self.settings.relay.poll_interval;
        loop {
            self.heartbeat.beat();
            if self.shutdown.is_stopping() {
                break;
            }
            let step = self.step().await;
            self.heartbeat.beat();
            let pause = match step {
                Step::Batch { .. } => continue,
                Step::Idle => {
                    if let Some(lock) = &self.lock {
                        tokio::select! {
                            _ = lock.wait(poll) => {}
                            _ = self.shutdown.stopping() => {}
                        }
                    }
                    continue;
                }
                Step::Standby => poll,
                Step::Paused => Duration::from_millis(250).min(poll),
                Step::Down => {
                    self.outage_attempts += 1;
                    let policy = RetryPolicy {
                        initial_delay: Duration::from_millis(200),
                        max_delay: self.settings.relay.reconnect_max_delay,
                        multiplier: 2.0,
                        jitter: 0.5,
                        max_attempts: u32::MAX,
                        on_exhausted: OnExhausted::HoldKey,
                    };
                    policy.delay(self.outage_attempts, rand::rng().random::<f64>())
                }
            };
            // Sleep in short slices so the watchdog keeps seeing a live loop.
            let until = tokio::time::Instant::now() + pause;
            while tokio::time::Instant::now() < until && !self.shutdown.is_stopping() {
                let slice = until
                    .saturating_duration_since(tokio::time::Instant::now())
                    .min(Duration::from_secs(1));
                tokio::select! {
                    _ = tokio::time::sleep(slice) => {}
                    _ = self.shutdown.stopping() => {}
                }
                self.heartbeat.beat();
            }
        }
        if self.finish_marking().await.is_err() || self.flush_outcomes().await.is_err() {
            tracing::warn!(table = %self.table.table, "could not mark the last confirmed rows; they will be published again (same message_id)");
        }
        if let Some(p) = self.publisher.take() {
            p.close().await;
        }
        if let Some(lock) = self.lock.take() {
            lock.release().await;
        }
        tracing::info!(table = %self.table.table, "relay stopped");
    }
}

/// A batch's mark being written in the background.
struct Marking {
    ids: Vec<i64>,
    task: tokio::task::JoinHandle<sqlx::Result<u64>>,
}

#[derive(Default)]
struct BatchOutcome {
    confirmed: Vec<i64>,
    failures: Vec<Failure>,
    transport_error: Option<String>,
}
