//! The relay for one outbox table: each turn makes sure its links are up, fetches due rows,
//! publishes them through the confirm window, and hands what the broker settled to the mark
//! pipeline. Joins the store and the publisher; has no SQL and no AMQP of its own.
//!
//! One row's way, file by file: the coordination session wakes the table (`store/
//! coordination.rs`); [`TableRelay::step`] fetches it (`store.rs`, `fetch_due`); the window
//! queues it behind its key, builds the message (`message.rs`) and publishes it (`window.rs`,
//! `publisher.rs`); its confirm moves it to the mark pipeline, which writes `published_at` (or,
//! with `on_published = "delete"`, deletes the row) in the background (`marks.rs`, `store.rs`,
//! `mark_published`), or records its failure and holds its key (`record_failures`,
//! `hold_keys`). With `retention`, the table's sweeper deletes the published rows once they are
//! older than that (`retention.rs`, `sweep_published`).

mod budget;
mod links;
pub mod marks;
mod report;
pub mod retention;
mod share;
mod window;

use std::sync::Arc;
use std::time::Duration;

use crate::config::{OutboxSettings, Settings};
use crate::message::MessageShape;
use crate::metrics::TableMetrics;
use crate::publisher::{Broker, PublishError};
use crate::retry::RetryPolicy;
use crate::shutdown::Shutdown;
use crate::store::{DbError, LockGuard, LockState, Store, TableLock, TableSql};

pub use budget::{RowBudget, RowGrant};
use links::{Links, Outage, Unready};
pub use marks::MarkPipeline;
pub use report::Heartbeat;
use report::{Health, Reporter};
pub use retention::{RetentionProgress, SweepStep, Sweeper};
pub use share::{Acks, Share};
use share::{ShareState, Turn};
use window::{ConfirmWindow, Drive};

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
    /// Nothing to send, and a key's hold or release waits for a producer's open transaction
    /// (it holds the key's lock); tried again shortly.
    Waiting,
    /// This relay owns none of the table's partitions (the other relays or its other channels
    /// have them, or its membership is registering), a relay of an earlier release holds the
    /// table's lock, or its leases wait to be renewed: it waits for the membership or the lock
    /// to change.
    Standby,
    /// The broker blocked the connection (resource alarm): fetching is paused.
    Paused,
    /// Rows are due but the process's row budget has none free for this relay (the other
    /// tables hold it): it waits until some are given back.
    Starved,
    /// PostgreSQL or RabbitMQ is unreachable or refuses the table; the reason is logged once.
    Down,
}

/// The relay for one outbox table.
pub struct TableRelay {
    settings: Arc<Settings>,
    table: OutboxSettings,
    sql: TableSql,
    policy: RetryPolicy,
    store: Store,
    shutdown: Shutdown,
    links: Links,
    window: ConfirmWindow,
    marks: MarkPipeline,
    /// The rows this relay holds in memory, in the process's shared budget.
    rows: RowGrant,
    reporter: Reporter,
    /// `schema.table`, for the `x-outbox-table` header and the log.
    name: String,
    /// How the table's rows become messages (decided once, from its settings).
    shape: MessageShape,
    /// The last fetch filled its batch, or a NOTIFY came: more rows are probably due.
    more_waiting: bool,
    /// The largest body the broker takes (lowered when it refuses a message as too large).
    max_message_bytes: crate::message::BodyLimit,
    outage: Outage,
    /// This relay's share of the table's partitions, and what it held last turn.
    share: Share,
    turn: Option<Turn>,
}

impl TableRelay {
    /// The relay for `table`'s partitions in `share`, under `lock` (from the process's
    /// coordination session) and on a channel of `broker`'s connection, holding rows in
    /// `budget` (the process's) and counting into `metrics`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: Arc<Settings>,
        table: OutboxSettings,
        store: Store,
        lock: TableLock,
        share: Share,
        broker: Arc<Broker>,
        budget: &RowBudget,
        shutdown: Shutdown,
        metrics: TableMetrics,
    ) -> Self {
        let policy = RetryPolicy::from(&settings.retry.with_override(&table.retry));
        let sql = TableSql::for_outbox(&table, policy.on_exhausted);
        let relay = &settings.relay;
        // Half the window per mark, so one half is marked while the other is published.
        let mark_chunk = (relay.max_in_flight / 2).clamp(1, relay.batch_size as usize);
        let declarations = table
            .declare_exchange
            .iter()
            .map(|d| (table.exchange.clone(), d.clone()))
            .collect();
        Self {
            links: Links::new(lock, broker, declarations),
            window: ConfirmWindow::new(relay.max_in_flight, metrics.clone()),
            marks: MarkPipeline::new(store.clone(), sql.clone(), mark_chunk),
            rows: budget.grant(),
            reporter: Reporter::new(table.table.to_string(), metrics),
            name: table.table.to_string(),
            shape: MessageShape::for_table(&table, &settings.postgres),
            max_message_bytes: crate::message::BodyLimit::Configured(
                settings.rabbitmq.max_message_bytes,
            ),
            more_waiting: false,
            outage: Outage::default(),
            share,
            turn: None,
            sql,
            policy,
            store,
            shutdown,
            table,
            settings,
        }
    }

    pub fn heartbeat(&self) -> Arc<Heartbeat> {
        self.reporter.heartbeat()
    }

    /// One turn: settle what earlier turns left, make sure the lock and the channel are there,
    /// fetch one batch when it fits, publish, and hand what was settled to the mark pipeline.
    /// Never leaves a batch half-done: rows are either marked published (confirmed), recorded
    /// as failed, or left due to go out again.
    pub async fn step(&mut self) -> Step {
        if let Err(e) = self.marks.settle().await {
            return self.down(e.context("marking rows"));
        }
        let (guard, fresh) = match self.links.ensure().await {
            Ok(ready) => {
                if ready.fresh {
                    // A new lock session or channel: what was in flight on the old ones is
                    // unknown; it stays due and goes out again with the same message_id.
                    self.window.clear();
                }
                (ready.guard, ready.fresh)
            }
            Err(unready) => return self.unready(unready).await,
        };
        // Which partitions this relay may publish, and until when.
        let state = self.share.state();
        let settling = self.share.must_settle();
        let expiring = state == ShareState::Expiring;
        let turn = match state {
            ShareState::Owns(turn) => turn,
            ShareState::Nothing(idle) if !settling => {
                return self.owns_nothing(Health::Idle(idle)).await
            }
            ShareState::Registering { again } if !settling => {
                // Not a member yet (or again, after its lease ran out): nothing to publish.
                self.window.clear();
                self.turn = None;
                self.reporter.set(registering(again));
                return Step::Standby;
            }
            // Partitions left the set: settle what is in flight with the last fence first. With
            // nothing in flight it is settled, and the relay is what the membership says (never
            // a standby while its membership registers again).
            ShareState::Nothing(idle) => match self.turn.clone() {
                Some(turn) => turn,
                None => return self.owns_nothing(Health::Idle(idle)).await,
            },
            ShareState::Registering { again } => match self.turn.clone() {
                Some(turn) => turn,
                None => return self.owns_nothing(registering(again)).await,
            },
            ShareState::Unusable(problem) => {
                self.window.clear();
                self.reporter.set(Health::TableUnusable(problem));
                return Step::Standby;
            }
            ShareState::Expiring => {
                // The leases could not be renewed in time: nothing more goes out before they
                // are (they could run out), but what is out is still settled with the last
                // turn's fence: a confirm read and marked now is a row not sent twice, and a
                // lease that did run out makes the mark change nothing (its next owner sends
                // the row again, same message_id). The queued rows wait for the renewal.
                self.reporter.set(Health::DatabaseDown(
                    "the partition leases could not be renewed in time; publishing stopped until they are".into(),
                ));
                match self.turn.clone() {
                    Some(turn) if self.window.in_flight() > 0 => turn,
                    _ => return Step::Standby,
                }
            }
        };
        if turn.session.is_some_and(|s| s != guard) {
            // The membership holds its leases through an earlier coordination session: to the
            // other members it is dead, and they may be taking its partitions. Nothing goes out
            // until it has registered again from this session.
            self.window.clear();
            self.turn = None;
            self.reporter.set(Health::Rejoining);
            return Step::Standby;
        }
        if self.turn.as_ref().is_some_and(|t| t.member != turn.member) {
            // A new membership (the last one's lease ran out): nothing held for the old one
            // may be sent.
            self.window.clear();
        }
        let gained = self.turn.as_ref().is_none_or(|t| {
            turn.fence
                .owned()
                .iter()
                .any(|p| !t.fence.owned().contains(p))
        });
        if self.marks.set_fence(&turn.fence) {
            tracing::warn!(table = %self.table.table, "the outbox table was created anew; forgetting the old table's unsettled rows");
            self.window.clear();
        }
        if fresh || gained {
            // New links, or partitions new to this relay: a relay that stopped between a mark
            // and its release may have left their keys held; look once under the new fence.
            if let Err(e) = self.marks.sweep_stale_holds(true).await {
                return self.down(e.context("looking for stale holds"));
            }
        }
        // `None`: publish nothing, only settle what is in flight.
        let until = (!settling && !expiring).then_some(turn.until);
        let fence = turn.fence.clone();
        self.turn = Some(turn);
        if settling && self.window.in_flight() == 0 {
            return self.give_up().await;
        }
        if until.is_some() && self.window.has_room_to_fetch() && !self.shutdown.is_stopping() {
            // At most what the process's row budget grants this relay beside what it holds.
            self.rows.hold(self.window.held());
            let limit = self.rows.take(self.settings.relay.batch_size as usize) as u32;
            if limit == 0 {
                if self.window.is_empty() {
                    return Step::Starved;
                }
                // Nothing more fits now: settle what is held (which gives rows back), waiting
                // for its confirms rather than coming back to a fetch that cannot run.
                return self.drive(guard, until, false).await;
            }
            let exclude: Vec<i64> = self
                .window
                .held_ids()
                .chain(self.marks.pending_ids())
                .collect();
            let rows = match self
                .store
                .fetch_due(&self.sql, &guard, &fence, limit, &exclude)
                .await
            {
                Ok(rows) => rows,
                Err(e) => return self.down(e.context("fetching due rows")),
            };
            self.reporter.set(Health::Relaying);
            self.more_waiting = rows.len() as u32 == limit;
            if rows.is_empty() && self.window.is_empty() {
                if self.marks.has_work() {
                    // Nothing to send, but the pipeline still writes (a mark that frees a key,
                    // a release): finish it now, then fetch again what it made due.
                    if let Err(e) = self.marks.finish().await {
                        return self.down(e.context("marking rows"));
                    }
                    return if self.marks.has_work() {
                        // A hold or release waits for a producer's open transaction.
                        Step::Waiting
                    } else {
                        Step::Batch {
                            published: 0,
                            failed: 0,
                            parked: 0,
                            full: false,
                        }
                    };
                }
                if let Err(e) = self.marks.sweep_stale_holds(false).await {
                    return self.down(e.context("looking for stale holds"));
                }
                return Step::Idle;
            }
            self.window.add(rows);
            self.rows.hold(self.window.held());
        }
        self.drive(guard, until, self.more_waiting).await
    }

    /// Sends what is ready and settles what the broker answers, then hands the settled rows
    /// to the mark pipeline: the second half of [`TableRelay::step`]. `fetch_soon`: return
    /// as soon as a fetch fits, with confirms outstanding.
    async fn drive(
        &mut self,
        guard: LockGuard,
        until: Option<tokio::time::Instant>,
        fetch_soon: bool,
    ) -> Step {
        let Some((publisher, lock)) = self.links.publisher_and_lock() else {
            return Step::Down;
        };
        let settled = self
            .window
            .drive(Drive {
                publisher,
                marks: &mut self.marks,
                lock,
                guard,
                until,
                reporter: &mut self.reporter,
                shutdown: &self.shutdown,
                policy: &self.policy,
                table: &self.name,
                default_exchange: &self.table.exchange,
                shape: &self.shape,
                max_message_bytes: self.max_message_bytes,
                more_waiting: fetch_soon,
            })
            .await;
        self.more_waiting |= settled.announced;
        // Failures are recorded (and their keys held) before the next fetch.
        let mut written = self.marks.settle().await;
        if self.marks.wants_mark() || self.window.in_flight() == 0 || settled.broken.is_some() {
            written = written.and(self.marks.start().await);
        }
        if let Some(broken) = settled.broken {
            // Nothing in memory is trusted after the channel broke.
            self.window.clear();
            self.links.close_channel().await;
            if let PublishError::TooLarge { limit } = broken {
                if limit < self.max_message_bytes.bytes() {
                    tracing::warn!(table = %self.table.table, limit, "the broker refused a message as too large; rows above its limit will be parked");
                    self.max_message_bytes = crate::message::BodyLimit::Broker(limit);
                }
            } else {
                return self.down_broker(broken, written.err());
            }
        }
        if let Err(e) = written {
            return self.down(e.context("marking rows"));
        }
        Step::Batch {
            published: settled.confirmed,
            failed: settled.failed,
            parked: settled.parked,
            full: self.more_waiting,
        }
    }

    /// Nothing of the table is this relay's until the membership gives it partitions: a
    /// standby, or a membership registering (again), as `health` says.
    async fn owns_nothing(&mut self, health: Health) -> Step {
        self.window.clear();
        self.turn = None;
        if let Err(e) = self.marks.finish().await {
            return self.down(e.context("marking rows"));
        }
        self.share.ack(self.share.generation());
        self.reporter.set(health);
        Step::Standby
    }

    /// Partitions left the set and nothing is in flight: their marks, failures and holds are
    /// written, the rows queued for them are forgotten (the next owner reads them), and the
    /// membership may release them.
    async fn give_up(&mut self) -> Step {
        if let Err(e) = self.marks.finish().await {
            return self.down(e.context("marking rows before giving partitions up"));
        }
        if self.marks.has_work() {
            // A hold or release waits for a producer's open transaction.
            return Step::Waiting;
        }
        // Nothing is in flight and everything is written: whatever left the set by now (the
        // turn's generation, or a later one) is settled.
        self.window.clear();
        self.share.ack(self.share.generation());
        Step::Batch {
            published: 0,
            failed: 0,
            parked: 0,
            full: true,
        }
    }

    fn down(&mut self, e: DbError) -> Step {
        // A statement that found no server says less than the coordination session, which
        // asked every host: no primary among them is the state to report.
        let e = match (e, self.links.lock.current()) {
            (DbError::Unavailable(_), LockState::Down(found @ DbError::NotPrimary(_))) => found,
            (e, _) => e,
        };
        match e {
            DbError::Unavailable(_) => self.store.distrust_connections(),
            // Refused as read-only: the host is not the primary (any more); the coordination
            // session gives up the locks and looks for it.
            DbError::NotPrimary(_) => self.store.look_for_primary(),
            _ => {}
        }
        self.reporter
            .set(Health::database(e, &self.store.server_label()));
        Step::Down
    }

    fn down_broker(&mut self, e: PublishError, also: Option<DbError>) -> Step {
        self.reporter.set(Health::from(e));
        if let Some(e) = also {
            return self.down(e.context("marking rows"));
        }
        Step::Down
    }

    async fn unready(&mut self, unready: Unready) -> Step {
        match unready {
            Unready::Connecting => Step::Down,
            Unready::Standby => {
                self.window.clear();
                self.reporter.set(Health::OlderRelay);
                Step::Standby
            }
            Unready::Database(e) => {
                // The lock is gone with its session: another relay may already hold it. Stop,
                // forget what is in memory (the new holder sends it), then try again. The
                // session looks for the primary itself: no statement of this table was refused.
                self.window.clear();
                if matches!(e, DbError::Unavailable(_)) {
                    self.store.distrust_connections();
                }
                self.reporter
                    .set(Health::database(e, &self.store.server_label()));
                Step::Down
            }
            Unready::Broker(e) => {
                self.window.clear();
                self.down_broker(e, None)
            }
            Unready::Blocked => {
                // Confirms cannot come while blocked: the silence clock stops.
                self.window.hold_clock();
                self.reporter.set(Health::Blocked);
                Step::Paused
            }
        }
    }

    /// Runs until shutdown: steps back to back while there is work, waits for a wake-up (a
    /// NOTIFY, or the coordination poll finding due rows) when idle, backs off (capped,
    /// jittered) while a server is down. Beats the heartbeat at least once a second however
    /// long it waits. Finishes with the in-flight rows settled and marked.
    pub async fn run(mut self) {
        let backoff = RetryPolicy::outage(self.settings.relay.reconnect_max_delay);
        loop {
            self.reporter.beat();
            if self.shutdown.is_stopping() {
                break;
            }
            let step = self.step().await;
            // Rows settled or forgotten in this step go back to the process's budget; a relay
            // with nothing to do leaves its shares (a starved one keeps asking).
            self.rows.hold(self.window.held());
            if self.window.is_empty() && step != Step::Starved {
                self.rows.rest();
                if !matches!(step, Step::Batch { .. }) {
                    // Quiet: give back what the queues grew to while busy.
                    self.window.shrink_when_empty();
                }
            }
            // The outage count starts again only once the links stayed up for a while: a fault
            // that comes back right after each brief "recovered" keeps the backoff growing.
            if step != Step::Down {
                self.outage.up(tokio::time::Instant::now());
            }
            match step {
                // Back to back, but never without letting the process's other tasks (the
                // membership, the other tables, the health endpoint) run.
                Step::Batch { .. } => tokio::task::yield_now().await,
                Step::Idle => self.wait_for_work().await,
                // The coordination session is down or connecting: it retries, and says when.
                Step::Down if !self.links.lock.is_held() => {
                    self.outage.down(tokio::time::Instant::now());
                    self.wait_for_lock().await
                }
                Step::Standby => self.wait_for_lock().await,
                Step::Paused | Step::Waiting => self.pause(Duration::from_millis(250)).await,
                Step::Starved => self.wait_for_rows().await,
                Step::Down => {
                    let attempt = self.outage.down(tokio::time::Instant::now());
                    let delay = backoff.delay(attempt, rand::random::<f64>());
                    self.pause(delay).await
                }
            }
        }
        // Drain: no new sends (stopping); wait for what is in flight until the abort.
        if self.window.in_flight() > 0 {
            self.step().await;
        }
        if self.marks.finish().await.is_err() {
            tracing::warn!(table = %self.table.table, "could not mark the last confirmed rows; they will be published again (same message_id)");
        }
        // Nothing is in flight any more: the membership may hand every partition back.
        self.window.clear();
        self.share.ack_all();
        self.links.close_channel().await;
        tracing::info!(table = %self.table.table, "relay stopped");
    }

    /// Idle: until the table is woken, its lock changes (since the step read it), or shutdown.
    async fn wait_for_work(&mut self) {
        self.links.lock.set_idle(true);
        let wake = self.links.lock.wake();
        loop {
            tokio::select! {
                _ = wake.notified() => break,
                _ = self.links.lock.changed() => break,
                _ = self.share.changed() => break,
                _ = self.shutdown.stopping() => break,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    self.reporter.beat();
                    // A quiet table wakes no one: held keys whose holder was deleted by hand
                    // would stay held until other work came.
                    if self.links.channel_died() || self.marks.sweep_due() {
                        break;
                    }
                }
            }
        }
        self.links.lock.set_idle(false);
    }

    /// Starved: until another relay gives rows back to the budget (or a moment passed: the
    /// rows may have come back just before this wait began), or shutdown.
    async fn wait_for_rows(&mut self) {
        tokio::select! {
            _ = self.rows.freed() => {}
            _ = self.shutdown.stopping() => {}
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
        self.reporter.beat();
    }

    /// Standby or connecting: until the lock's state changes (since the step read it), or
    /// shutdown.
    async fn wait_for_lock(&mut self) {
        loop {
            tokio::select! {
                _ = self.links.lock.changed() => break,
                _ = self.share.changed() => break,
                _ = self.shutdown.stopping() => break,
                _ = tokio::time::sleep(Duration::from_secs(1)) => self.reporter.beat(),
            }
        }
    }

    /// Sleeps `pause` in slices of at most a second, so the watchdog keeps seeing a live loop.
    async fn pause(&mut self, pause: Duration) {
        let until = tokio::time::Instant::now() + pause;
        while tokio::time::Instant::now() < until && !self.shutdown.is_stopping() {
            let slice = until
                .saturating_duration_since(tokio::time::Instant::now())
                .min(Duration::from_secs(1));
            tokio::select! {
                _ = tokio::time::sleep(slice) => {}
                _ = self.shutdown.stopping() => {}
            }
            self.reporter.beat();
        }
    }
}

/// The state of a relay whose membership is not registered: starting, or registering again
/// after it was lost.
fn registering(again: bool) -> Health {
    if again {
        Health::Rejoining
    } else {
        Health::Starting
    }
}
