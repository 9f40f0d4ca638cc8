//! The relay loop for one outbox table: fetch due rows, publish them with a bounded window of
//! confirms (one unconfirmed message per ordering key), mark what was confirmed, record what
//! failed. Joins the store and the publisher; has no SQL and no AMQP of its own.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use rand::Rng;

use crate::config::{OnExhausted, OutboxSettings, Settings};
use crate::dispatch::KeyQueues;
use crate::message::{self, OutboundMessage, OutboxRow};
use crate::publisher::{learned_max_size, PublishError, Publisher};
use crate::retry::{RetryPolicy, Verdict};
use crate::shutdown::Shutdown;
use crate::store::{db_message, is_schema_error, Failure, LockSession, Store, TableLock, TableSql};

/// What one [`TableRelay::step`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Rows went out: `published` confirmed (and being marked), `failed` recorded for retry
    /// (of which `parked` were parked). `full` when the last fetch filled its batch.
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
    /// PostgreSQL answers but refuses the relay's statements: the table was dropped or
    /// altered, or a privilege was revoked. Retried with backoff like an outage.
    TableUnusable(String),
    BrokerDown(String),
}

const BLOCKED_STATE: &str = "paused: broker blocked the connection";

/// Liveness for the systemd watchdog and readiness: set by the loop on every turn.
pub struct Heartbeat {
    table: String,
    /// The relay's current state in words, for systemd's STATUS= line and the health endpoint.
    state: std::sync::Mutex<String>,
    /// Milliseconds since `started` of the last turn of the loop.
    last_beat_ms: AtomicU64,
    /// 1 once the relay has connected to both servers (relaying or standing by).
    ready: AtomicU64,
    started: std::sync::OnceLock<Instant>,
}

impl Heartbeat {
    fn new(table: String) -> Self {
        Self {
            table,
            state: std::sync::Mutex::new("starting".to_owned()),
            last_beat_ms: AtomicU64::new(0),
            ready: AtomicU64::new(0),
            started: std::sync::OnceLock::new(),
        }
    }

    fn beat(&self) {
        let start = *self.started.get_or_init(Instant::now);
        self.last_beat_ms
            .store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn set_ready(&self, ready: bool) {
        self.ready.store(ready as u64, Ordering::Relaxed);
    }

    fn set_state(&self, state: String) {
        if let Ok(mut s) = self.state.lock() {
            *s = state;
        }
    }

    /// The table this relay serves.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The relay's current state in words (`relaying`, `not ready: RabbitMQ: ...`).
    pub fn state(&self) -> String {
        self.state.lock().map(|s| s.clone()).unwrap_or_default()
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
    /// Fetched rows by ordering key, and the confirms in flight: kept across fetches so the
    /// confirm window stays full from one batch to the next.
    queues: KeyQueues,
    in_flight: InFlight,
    /// The last fetch filled its batch: more rows are probably due.
    more_waiting: bool,
    /// When a confirm last arrived (or the window last went from empty to busy): a connection
    /// silent for longer than the confirm timeout is presumed dead.
    last_progress: Instant,
    /// Confirmed rows not yet handed to a mark.
    confirmed: Vec<i64>,
    /// The oid of the table the held rows were read from (0 before the first fetch).
    table_oid: i64,
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
        let heartbeat = Arc::new(Heartbeat::new(table.table.to_string()));
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
            queues: KeyQueues::default(),
            in_flight: FuturesUnordered::new(),
            more_waiting: false,
            last_progress: Instant::now(),
            confirmed: Vec::new(),
            table_oid: 0,
            unmarked: Vec::new(),
            marking: None,
            unrecorded: Vec::new(),
            max_message_bytes,
            health: Health::Starting,
            outage_attempts: 0,
            heartbeat,
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
            Health::TableUnusable(e) => {
                tracing::warn!(%table, error = %e, "cannot use the outbox table (dropped, altered, or a privilege revoked); retrying with backoff")
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
        self.heartbeat.set_state(match &health {
            Health::Starting => "starting".to_owned(),
            Health::Relaying => "relaying".to_owned(),
            Health::Standby => "standby (another relay holds the lock)".to_owned(),
            Health::Blocked => BLOCKED_STATE.to_owned(),
            Health::DatabaseDown(e) => format!("not ready: PostgreSQL: {e}"),
            Health::TableUnusable(e) => format!("not ready: outbox table: {e}"),
            Health::BrokerDown(e) => format!("not ready: RabbitMQ: {e}"),
        });
        self.health = health;
    }

    fn database_down(&mut self, context: &str, e: &sqlx::Error) -> Step {
        let error = format!("{context}: {}", db_message(e));
        self.set_health(if is_schema_error(e) {
            Health::TableUnusable(error)
        } else {
            self.store.distrust_connections();
            Health::DatabaseDown(error)
        });
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
            // Its session died: another relay may already hold the lock. Stop, forget what is
            // in memory (the new holder sends it), then try again.
            self.lock = None;
            self.forget_unsettled();
            self.store.distrust_connections();
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
                self.forget_unsettled();
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
            // Confirms cannot come while blocked: the silence clock stops.
            self.last_progress = Instant::now();
            self.set_health(Health::Blocked);
            return Step::Paused;
        }
        let window = self.settings.relay.max_in_flight;
        let limit = self.settings.relay.batch_size;
        // Fetch when nothing fetched can be sent right now and a whole batch fits beside the
        // window: the next batch is read while the previous one's confirms still arrive.
        if !self.queues.has_ready() && self.queues.held() <= window {
            let exclude: Vec<i64> = self
                .queues
                .held_ids()
                .chain(self.confirmed.iter().copied())
                .chain(self.marking.iter().flat_map(|m| m.ids.iter().copied()))
                .collect();
            let rows = match self
                .store
                .fetch_due(&self.sql, &guard, limit, &exclude)
                .await
            {
                Ok(rows) => rows,
                Err(e) => return self.database_down("fetching due rows", &e),
            };
            self.set_health(Health::Relaying);
            if let Some(oid) = rows.first().map(|r| r.table_oid) {
                if oid != self.table_oid {
                    // The table was dropped and created again (ids start over): nothing held
                    // for the old one may be marked in the new one.
                    if self.table_oid != 0 {
                        tracing::warn!(table = %self.table.table, "the outbox table was created anew; forgetting the old table's unsettled rows");
                    }
                    self.forget_unsettled();
                    self.confirmed.clear();
                    self.table_oid = oid;
                }
            }
            self.more_waiting = rows.len() as u32 == limit;
            if rows.is_empty() && self.queues.held() == 0 {
                return Step::Idle;
            }
            self.queues.add(rows);
        }
        let outcome = self.drive().await;
        let failed = outcome.failures.len();
        let parked = outcome
            .failures
            .iter()
            .filter(|f| f.retry_after.is_none())
            .count();
        // Failures are recorded before the next fetch, so the rows they hold back stay back.
        self.unrecorded.extend(outcome.failures);
        let mut flushed = self.flush_outcomes().await;
        if self.confirmed.len() >= self.mark_chunk() || self.in_flight.is_empty() {
            if let Err(e) = self.start_marking().await {
                flushed = Err(e);
            }
        }
        if let Some(e) = outcome.transport_error {
            // Nothing in memory is trusted after the connection broke: unconfirmed rows stay
            // due and go out again (same message_id) after the reconnect.
            self.forget_unsettled();
            if let Err(e) = self.start_marking().await {
                flushed = Err(e);
            }
            let step = self.broker_down(e).await;
            if let Err(e) = flushed {
                return self.database_down("marking rows", &e);
            }
            return step;
        }
        if let Err(e) = flushed {
            return self.database_down("marking rows", &e);
        }
        Step::Batch {
            published: outcome.confirmed,
            failed,
            parked,
            full: self.more_waiting,
        }
    }

    /// How many confirmed rows one mark writes: half the window, so one half can be marked
    /// while the other is published, and at most a batch.
    fn mark_chunk(&self) -> usize {
        (self.settings.relay.max_in_flight / 2).clamp(1, self.settings.relay.batch_size as usize)
    }

    /// Drops queued rows and unconfirmed publishes from memory: they stay due in the table and
    /// go out again (with the same message_id) once the relay is back.
    fn forget_unsettled(&mut self) {
        self.queues.clear();
        self.in_flight = FuturesUnordered::new();
    }

    /// Waits for the previous background mark, then starts marking the confirmed rows
    /// collected since; the next fetch excludes them until the mark is written.
    async fn start_marking(&mut self) -> Result<(), sqlx::Error> {
        let finished = self.finish_marking().await;
        if !self.confirmed.is_empty() {
            let ids = std::mem::take(&mut self.confirmed);
            let (store, sql, task_ids) = (self.store.clone(), self.sql.clone(), ids.clone());
            let oid = self.table_oid;
            self.marking = Some(Marking {
                ids,
                task: tokio::spawn(async move { store.mark_published(&sql, &task_ids, oid).await }),
            });
        }
        finished
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
            self.store
                .mark_published(&self.sql, &self.unmarked, self.table_oid)
                .await?;
            self.unmarked.clear();
        }
        if !self.unrecorded.is_empty() {
            self.store
                .record_failures(&self.sql, &self.unrecorded, self.table_oid)
                .await?;
            for f in self.unrecorded.iter().filter(|f| f.retry_after.is_none()) {
                tracing::warn!(table = %self.table.table, id = f.id, error = %f.error, "row parked");
            }
            self.unrecorded.clear();
        }
        Ok(())
    }

    /// Sends ready rows (at most one unconfirmed message per ordering key, at most
    /// `max_in_flight` overall counting the confirmed rows whose mark is not written yet, so
    /// a crash resends no more than that) and settles confirms as they arrive. Returns when
    /// nothing is in flight; early, with confirms outstanding, when more rows wait in the
    /// table and the queues have room for them, or when enough confirmed rows wait to be
    /// marked and no mark is running. A key whose row fails goes no further until the failure is
    /// recorded and the row is due again.
    async fn drive(&mut self) -> DriveOutcome {
        let mut outcome = DriveOutcome::default();
        let mark_chunk = self.mark_chunk();
        let publisher = self.publisher.as_mut().expect("connected before driving");
        let lock = self.lock.as_ref();
        let lock_lost = || lock.is_none_or(|l| l.is_lost());
        let table = self.table.table.to_string();
        let window = self.settings.relay.max_in_flight;
        let policy = &self.policy;
        let failure_for = |row: &OutboxRow, error: String, park_now: bool| {
            let attempt = row.attempts.max(0) as u32 + 1;
            let verdict = if park_now {
                Verdict::Park
            } else {
                policy.after_failure(attempt, rand::rng().random::<f64>())
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
        loop {
            // Fill the window from the ready keys, unless shutting down or broken. A relay
            // whose lock session died stops at once: a standby may be taking over.
            // The window counts every message that would go out again after a crash: the
            // unconfirmed ones and the confirmed ones whose mark is not written yet.
            let unmarked = self.confirmed.len()
                + self.marking.as_ref().map_or(0, |m| m.ids.len())
                + self.unmarked.len();
            let mut sends: Vec<(OutboxRow, OutboundMessage)> = Vec::new();
            while self.in_flight.len() + unmarked + sends.len() < window
                && outcome.transport_error.is_none()
                && !self.shutdown.is_stopping()
                && !lock_lost()
            {
                let Some(mut row) = self.queues.next_to_send() else {
                    break;
                };
                let message = match message::build(
                    &mut row,
                    &table,
                    &self.table.exchange,
                    self.max_message_bytes,
                ) {
                    Ok(m) => m,
                    Err(unpublishable) => {
                        outcome
                            .failures
                            .push(failure_for(&row, unpublishable.to_string(), true));
                        if policy.on_exhausted == OnExhausted::Skip {
                            self.queues.release(&row);
                        } else {
                            self.queues.stop_key(&row);
                        }
                        continue;
                    }
                };
                if let Err(e) = publisher.ensure_exchange(&message.exchange).await {
                    self.queues.stop_key(&row);
                    match e {
                        PublishError::Rejected(reason) => {
                            outcome.failures.push(failure_for(&row, reason, false))
                        }
                        PublishError::Transport(reason) => outcome.transport_error = Some(reason),
                    }
                    continue;
                }
                sends.push((row, message));
            }
            if !sends.is_empty() {
                if self.in_flight.is_empty() {
                    self.last_progress = Instant::now();
                }
                // Hand the whole group to the client at once: its I/O thread writes the frames
                // together instead of waking once per message. Frames (and delivery tags) keep
                // the order of `sends`, and a key has at most one message in the group.
                let publishing =
                    futures::future::join_all(sends.iter().map(|(_, m)| publisher.publish(m)));
                let results = tokio::select! {
                    results = publishing => results,
                    _ = self.shutdown.aborted() => break,
                };
                for ((row, _), sent) in sends.into_iter().zip(results) {
                    match sent {
                        Ok(pending) => self
                            .in_flight
                            .push(Box::pin(async move { (row, pending.wait().await) })),
                        Err(e) => {
                            if outcome.transport_error.is_none() {
                                outcome.transport_error = Some(e.to_string());
                            }
                        }
                    }
                }
            }
            if self.in_flight.is_empty() || outcome.transport_error.is_some() {
                break;
            }
            // Go and fetch while these confirms are on their way: at once when the last fetch
            // was full, or as soon as new rows are announced.
            let room_to_fetch = !self.queues.has_ready()
                && self.queues.held() <= window
                && !self.shutdown.is_stopping();
            if room_to_fetch && self.more_waiting {
                break;
            }
            let next = tokio::select! {
                next = self.in_flight.next() => next,
                _ = self.shutdown.aborted() => break,
                _ = async { lock.expect("checked by room_to_fetch").notified().await }, if room_to_fetch && lock.is_some() => {
                    self.more_waiting = true;
                    break;
                }
                _ = tick.tick() => {
                    // Confirms may legitimately take long while the broker blocks us (resource
                    // alarm): the loop is alive and the silence clock stops. Otherwise a
                    // connection that stays silent past the confirm timeout is presumed dead.
                    self.heartbeat.beat();
                    if publisher.is_blocked() {
                        self.last_progress = Instant::now();
                        if self.health != Health::Blocked {
                            // A block that starts mid-batch, logged once like one found before
                            // a fetch; the next fetch after it logs the recovery.
                            tracing::warn!(%table, "RabbitMQ blocked the connection (resource alarm); waiting for confirms, fetching paused");
                            self.heartbeat.set_state(BLOCKED_STATE.to_owned());
                            self.heartbeat.set_ready(false);
                            self.health = Health::Blocked;
                        }
                    } else if self.last_progress.elapsed() >= confirm_timeout {
                        outcome.transport_error = Some(format!(
                            "no confirm from the broker within {}",
                            humantime::format_duration(confirm_timeout)
                        ));
                        break;
                    }
                    continue;
                }
            };
            let Some((row, result)) = next else {
                break;
            };
            self.last_progress = Instant::now();
            match result {
                Ok(()) => {
                    self.confirmed.push(row.id);
                    outcome.confirmed += 1;
                    self.queues.release(&row);
                    // Enough confirmed to mark, and no mark running: back to `step` to start
                    // one, so the window reopens while the rest of the confirms arrive.
                    if self.confirmed.len() >= mark_chunk
                        && self.marking.as_ref().is_none_or(|m| m.task.is_finished())
                    {
                        break;
                    }
                }
                Err(PublishError::Rejected(reason)) => {
                    tracing::debug!(%table, id = row.id, %reason, "publish rejected");
                    outcome.failures.push(failure_for(&row, reason, false));
                    self.queues.stop_key(&row);
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
        // Drain: no new sends (stopping), wait for what is in flight until the abort.
        if !self.in_flight.is_empty() && self.publisher.is_some() {
            let outcome = self.drive().await;
            self.unrecorded.extend(outcome.failures);
        }
        let marked = self.start_marking().await;
        if marked.is_err()
            || self.finish_marking().await.is_err()
            || self.flush_outcomes().await.is_err()
        {
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

/// What one [`TableRelay::drive`] settled.
#[derive(Default)]
struct DriveOutcome {
    confirmed: usize,
    failures: Vec<Failure>,
    transport_error: Option<String>,
}

type InFlight = FuturesUnordered<
    std::pin::Pin<
        Box<dyn std::future::Future<Output = (OutboxRow, Result<(), PublishError>)> + Send>,
    >,
>;
