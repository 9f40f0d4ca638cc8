//! The relay process's one coordination session: it holds every table's advisory lock, LISTENs
//! on every table's channel, and once per poll interval asks, in one statement for all tables,
//! which idle tables have due rows and which standby tables can take their lock now. Its cost
//! does not grow with the number of tables: one PostgreSQL session and at most one statement
//! per poll interval.
//!
//! The lock is taken *shared*: every relay of this release holds it at once (they divide the
//! table's partitions through leases, `super::leases`), while a relay of an earlier release,
//! which takes it exclusively, excludes them all and is excluded by any of them. That is the
//! rolling upgrade's guarantee: an old and a new relay never publish one table at once. The
//! session is also the member's liveness: a process whose session is gone (killed) loses its
//! partitions at once.
//!
//! Invariant: a table is [`LockState::Held`] only while this session lives and holds the
//! table's lock, on a server that said on this session that it takes writes (the primary; see
//! [`super::primary`]); when the session ends, every table leaves `Held` at once (a standby may
//! be taking over), and a new session's locks carry a new epoch, so nothing settled under the
//! old one is trusted.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use sqlx::Row;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use super::primary::NOT_WRITABLE;
use super::{answered_within, DbError, Servers, TableSql};
use crate::config::{PostgresSettings, TableName};
use crate::retry::RetryPolicy;

/// How long a session must have lived for its end to start the reconnect backoff again.
const SESSION_STABLE_AFTER: Duration = Duration::from_secs(10);

/// Identifies the lock holder's session for the fetch's guard, and the session's epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockGuard {
    pub(super) pid: i32,
    pub(super) classid: i64,
    pub(super) objid: i64,
    /// Which coordination session took the lock (1, 2, ... per process).
    pub epoch: u64,
}

/// A table's lock as the coordination session sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockState {
    /// The session is not connected yet.
    Connecting,
    /// This process holds the table's lock.
    Held(LockGuard),
    /// A relay of an earlier release holds it (exclusively); tried again every poll interval.
    Standby,
    /// The session cannot be opened or ended; tables wait until it is back.
    Down(DbError),
}

/// One table's view of the coordination session.
#[derive(Clone)]
pub struct TableLock {
    state: watch::Receiver<LockState>,
    wake: Arc<Notify>,
    wakes: Arc<Wakes>,
    /// How many of the table's relays (one per channel) wait for work.
    idle: Arc<AtomicUsize>,
    /// Tells the session that a table's relays went idle or woke (it arms or disarms the
    /// table's wake-up flag).
    idle_changed: Arc<Notify>,
}

/// The wake-ups of one table's relays: a NOTIFY or a poll wakes each of them.
#[derive(Default)]
struct Wakes(Mutex<Vec<Arc<Notify>>>);

impl Wakes {
    fn add(&self) -> Arc<Notify> {
        let wake = Arc::new(Notify::new());
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(wake.clone());
        wake
    }

    fn notify(&self) {
        for wake in self.0.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            wake.notify_one();
        }
    }
}

impl TableLock {
    /// The lock's state, seen: [`TableLock::changed`] waits for the next change after it.
    pub fn state(&mut self) -> LockState {
        self.state.borrow_and_update().clone()
    }

    /// The lock's state, without marking it seen.
    pub fn current(&self) -> LockState {
        self.state.borrow().clone()
    }

    /// True while the lock is held (without marking its state seen).
    pub fn is_held(&self) -> bool {
        matches!(&*self.state.borrow(), LockState::Held(_))
    }

    /// True while `guard`'s lock is still held: same session, not lost.
    pub fn still_holds(&self, guard: &LockGuard) -> bool {
        matches!(&*self.state.borrow(), LockState::Held(g) if g == guard)
    }

    /// Resolves when the lock's state changes after it was last read with
    /// [`TableLock::state`] (at once if it changed since).
    pub async fn changed(&mut self) {
        if self.state.changed().await.is_err() {
            // The coordination task ended (shutdown): nothing will change any more.
            std::future::pending::<()>().await
        }
    }

    /// Resolves on the next wake-up: a NOTIFY on the table's channel, or the poll finding due
    /// rows while the table was idle (at once if one arrived unseen).
    pub async fn notified(&self) {
        self.wake.notified().await
    }

    /// The wake-up alone, to wait for it beside [`TableLock::changed`].
    pub fn wake(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Says whether the relay is waiting for work: only idle tables are polled. Each `true`
    /// is followed by a `false` from the same relay.
    pub fn set_idle(&self, idle: bool) {
        if idle {
            self.idle.fetch_add(1, Ordering::Relaxed);
        } else {
            self.idle.fetch_sub(1, Ordering::Relaxed);
        }
        self.idle_changed.notify_one();
    }

    /// The same lock for another relay of the table (one per channel), with a wake-up of its
    /// own: every NOTIFY and poll wakes each of them.
    pub fn for_another_relay(&self) -> TableLock {
        TableLock {
            state: self.state.clone(),
            wake: self.wakes.add(),
            wakes: self.wakes.clone(),
            idle: self.idle.clone(),
            idle_changed: self.idle_changed.clone(),
        }
    }
}

struct Entry {
    table: TableName,
    /// The advisory lock key, `hashtextextended('outbox_relay:<schema.table>', 0)` as every
    /// release so far has used (an older relay and this one exclude each other); read from the
    /// server when the first session opens.
    key: i64,
    channel: Option<String>,
    /// `SELECT <index> WHERE EXISTS (<a due row>)`.
    probe: String,
    state: watch::Sender<LockState>,
    wake: Arc<Wakes>,
    idle: Arc<AtomicUsize>,
    /// This session has written the table's row in `outbox_relay.waiting`: producers' commits
    /// notify.
    armed: bool,
    /// Notifications received while the table's relays were busy, since they last went idle.
    busy_notes: u32,
}

/// The coordination session's task and the tables it serves.
pub struct Coordination {
    locks: Vec<TableLock>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Coordination {
    /// Starts the session's task for `tables` (in this order; see [`Coordination::lock`]). It
    /// connects with its own one-connection pool, so it never takes a statement connection, to
    /// the primary among `servers` (it looks for it, and the store's pool follows).
    pub fn start(
        settings: &PostgresSettings,
        servers: Arc<Servers>,
        tables: &[TableSql],
        listen: bool,
        poll_interval: Duration,
        reconnect_max_delay: Duration,
        reconnects: Counter,
    ) -> anyhow::Result<Coordination> {
        let follows = servers.clone();
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(settings.connect_timeout)
            // A session left to the pool on a host the relay moved away from (or that refused a
            // write) is not reused.
            .before_acquire(move |_, meta| {
                let fresh = !follows.retired(meta.age);
                Box::pin(async move { Ok(fresh) })
            })
            .connect_lazy_with(servers.options());
        let mut entries = Vec::new();
        let mut locks = Vec::new();
        let idle_changed = Arc::new(Notify::new());
        for (index, sql) in tables.iter().enumerate() {
            let (state, receiver) = watch::channel(LockState::Connecting);
            let wake = Arc::new(Wakes::default());
            let idle = Arc::new(AtomicUsize::new(0));
            locks.push(TableLock {
                state: receiver,
                wake: wake.add(),
                wakes: wake.clone(),
                idle: idle.clone(),
                idle_changed: idle_changed.clone(),
            });
            entries.push(Entry {
                table: sql.table().clone(),
                key: 0,
                channel: listen.then(|| TableSql::notify_channel(sql.table())),
                probe: sql.probe(index),
                state,
                wake,
                idle,
                armed: false,
                busy_notes: 0,
            });
        }
        let stop = CancellationToken::new();
        let session = Session {
            pool,
            idle_changed,
            arming: Arming::Unknown,
            look_again: servers.asked_to_look_again(),
            servers,
            entries,
            poll_interval,
            reconnect_max_delay,
            reconnects,
            answer_within: super::answer_deadline(settings),
            stop: stop.clone(),
        };
        Ok(Coordination {
            locks,
            stop,
            task: tokio::spawn(session.run()),
        })
    }

    /// The lock of the `index`th table given to [`Coordination::start`].
    pub fn lock(&self, index: usize) -> TableLock {
        self.locks[index].clone()
    }

    /// Releases every lock and ends the session.
    pub async fn close(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(3), self.task).await;
    }
}

/// Whether the server has the wake-up flag (`outbox_relay.waiting`, this release's schema).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arming {
    Unknown,
    /// Writes the flag of idle tables.
    On,
    /// The schema predates the flag (`migrate` not run since the upgrade): its tables' triggers
    /// notify on every commit, as they did, and nothing is armed.
    Unsupported,
}

/// Notifications a busy table may receive before its flag is taken down (see
/// [`Session::sync_flags`]).
const BUSY_NOTES: u32 = 4;

/// Deletes the flags this session wrote (its relays stop).
const CLEAR_OWN_FLAGS: &str = "DELETE FROM outbox_relay.waiting WHERE pid = pg_backend_pid()";

struct Session {
    pool: PgPool,
    /// A table's relays went idle or woke.
    idle_changed: Arc<Notify>,
    arming: Arming,
    servers: Arc<Servers>,
    /// Changes when a statement was refused as read-only ([`Servers::look_again`]).
    look_again: watch::Receiver<u64>,
    entries: Vec<Entry>,
    poll_interval: Duration,
    reconnect_max_delay: Duration,
    /// Counts every session opened after the first.
    reconnects: Counter,
    answer_within: Duration,
    stop: CancellationToken,
}

impl Session {
    async fn run(mut self) {
        let mut epoch = 0u64;
        let mut failures = 0u32;
        loop {
            let outcome = match self.open().await {
                Ok((listener, pid)) => {
                    if epoch > 0 {
                        self.reconnects.inc();
                    }
                    epoch += 1;
                    let opened = tokio::time::Instant::now();
                    let served = self.serve(listener, pid, epoch).await;
                    // A session counts as recovered only once it lasted: one that ends right
                    // after it opens (terminated, refused its first statement) is the same
                    // outage, and the backoff keeps growing.
                    if opened.elapsed() >= SESSION_STABLE_AFTER {
                        failures = 0;
                    }
                    served
                }
                Err(e) => Err(e),
            };
            match outcome {
                Ok(()) => break,
                Err(e) => {
                    for entry in &self.entries {
                        entry.state.send_replace(LockState::Down(e.clone()));
                    }
                    failures += 1;
                    let pause = RetryPolicy::outage(self.reconnect_max_delay)
                        .delay(failures, rand::random::<f64>());
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = self.stop.cancelled() => break,
                    }
                }
            }
        }
        self.pool.close().await;
    }

    /// Opens the session on the primary: with several hosts, the first in order that is one.
    /// The session checks for itself that its server takes writes before it takes any lock: a
    /// lock taken on a standby would let a relay publish rows it can never mark.
    async fn open(&mut self) -> Result<(PgListener, i32), DbError> {
        // A read-only refusal seen before this session opened is answered by this look.
        self.look_again.mark_unchanged();
        self.servers
            .find_primary()
            .await
            .map_err(|e| e.context("looking for the primary"))?;
        self.pool.set_connect_options(self.servers.options());
        let open = async {
            let mut conn = self.pool.acquire().await?;
            let read_only: bool = sqlx::query_scalar(&format!("SELECT {NOT_WRITABLE}"))
                .fetch_one(&mut *conn)
                .await?;
            if read_only {
                // Not kept: the next look opens a session of its own.
                let _ = conn.close().await;
                return Ok(None);
            }
            // Back to the one-connection pool, where the listener takes it.
            drop(conn);
            let mut listener = PgListener::connect_with(&self.pool).await?;
            listener.ignore_pool_close_event(true);
            listener.eager_reconnect(false);
            // The listener's session is asked too: the pool may have opened it anew.
            let (pid, read_only): (i32, bool) =
                sqlx::query_as(&format!("SELECT pg_backend_pid(), {NOT_WRITABLE}"))
                    .fetch_one(&mut listener)
                    .await?;
            if read_only {
                return Ok(None);
            }
            let names: Vec<String> = self
                .entries
                .iter()
                .map(|e| format!("outbox_relay:{}", e.table))
                .collect();
            let keys: Vec<i64> = sqlx::query_scalar(
                "SELECT hashtextextended(n, 0) FROM unnest($1::text[]) WITH ORDINALITY AS u(n, o) ORDER BY o",
            )
            .bind(&names)
            .fetch_all(&mut listener)
            .await?;
            let channels: Vec<&str> = self
                .entries
                .iter()
                .filter_map(|e| e.channel.as_deref())
                .collect();
            if !channels.is_empty() {
                listener.listen_all(channels).await?;
            }
            Ok::<_, sqlx::Error>(Some((listener, pid, keys)))
        };
        let opened = answered_within(self.answer_within, open)
            .await
            .map_err(|e| DbError::from(e).context("opening the coordination session"))?;
        let Some((listener, pid, keys)) = opened else {
            return Err(DbError::NotPrimary(format!(
                "{} is a standby or read-only",
                self.servers.label()
            )));
        };
        for (entry, key) in self.entries.iter_mut().zip(keys) {
            entry.key = key;
        }
        Ok((listener, pid))
    }

    /// Serves one session until it ends (an error) or the relay stops (`Ok`).
    async fn serve(
        &mut self,
        mut listener: PgListener,
        pid: i32,
        epoch: u64,
    ) -> Result<(), DbError> {
        let all: Vec<usize> = (0..self.entries.len()).collect();
        self.try_locks(&mut listener, pid, epoch, &all).await?;
        self.clear_flags(&mut listener).await?;
        let mut tick = tokio::time::interval(self.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => {
                    for entry in &self.entries {
                        entry.state.send_replace(LockState::Connecting);
                    }
                    let unlock = sqlx::query("SELECT pg_advisory_unlock_all()").execute(&mut listener);
                    let _ = tokio::time::timeout(Duration::from_secs(2), unlock).await;
                    if self.arming == Arming::On {
                        let clear = sqlx::query(CLEAR_OWN_FLAGS).execute(&mut listener);
                        let _ = tokio::time::timeout(Duration::from_secs(2), clear).await;
                    }
                    return Ok(());
                }
                _ = self.idle_changed.notified() => self.sync_flags(&mut listener).await?,
                received = listener.try_recv() => match received {
                    // Notifications that pile up while a relay is busy collapse into one wake-up.
                    Ok(Some(n)) => {
                        let mut disarm = false;
                        if let Some(entry) = self.entries.iter_mut().find(|e| e.channel.as_deref() == Some(n.channel())) {
                            entry.wake.notify();
                            if entry.idle.load(Ordering::Relaxed) == 0 {
                                entry.busy_notes += 1;
                                disarm = entry.armed && entry.busy_notes > BUSY_NOTES;
                            }
                        }
                        // Only a busy table that crossed the bound changes a flag here; the rest
                        // is the relays' going idle and waking, which `idle_changed` reports.
                        if disarm {
                            self.sync_flags(&mut listener).await?;
                        }
                    }
                    Ok(None) => return Err(DbError::Unavailable("the coordination session ended (its locks with it)".into())),
                    Err(e) => return Err(DbError::from(e).context("the coordination session failed")),
                },
                _ = self.look_again.changed() => {
                    // A statement was refused as read-only: this server no longer takes writes.
                    // Give the locks up (the session may live on) and look for the primary.
                    let unlock = sqlx::query("SELECT pg_advisory_unlock_all()").execute(&mut listener);
                    let _ = tokio::time::timeout(Duration::from_secs(2), unlock).await;
                    return Err(DbError::NotPrimary(format!(
                        "{} refused a write as read-only",
                        self.servers.label()
                    )));
                }
                _ = tick.tick() => {
                    let missed = self.poll(&mut listener, pid, epoch).await?;
                    // An armed table the poll found due rows in missed a NOTIFY (a commit
                    // in the moment its flag appeared, or a flag for an instance of the table
                    // since dropped): its flag is written again, for the table as it is now.
                    if !missed.is_empty() {
                        for i in missed {
                            self.entries[i].armed = false;
                        }
                        self.sync_flags(&mut listener).await?;
                    }
                }
            }
        }
    }

    /// At the start of a session: no table is armed by it yet, and flags left by sessions that
    /// are gone (a relay killed, a connection cut) are deleted, so producers stop notifying
    /// for them. Finds out whether the server has the flag at all.
    async fn clear_flags(&mut self, listener: &mut PgListener) -> Result<(), DbError> {
        for entry in &mut self.entries {
            entry.armed = false;
        }
        if self.entries.iter().all(|e| e.channel.is_none()) {
            self.arming = Arming::Unsupported;
            return Ok(());
        }
        let check = sqlx::query_as::<_, (bool, bool)>(
            "SELECT to_regclass('outbox_relay.waiting') IS NOT NULL, \
                    CASE WHEN to_regclass('outbox_relay.waiting') IS NULL THEN false \
                         ELSE has_table_privilege('outbox_relay.waiting', 'SELECT, INSERT, DELETE') END",
        )
        .fetch_one(&mut *listener);
        let (exists, may_write) = answered_within(self.answer_within, check)
            .await
            .map_err(|e| DbError::from(e).context("looking for the wake-up flags"))?;
        if !exists || !may_write {
            if self.arming != Arming::Unsupported {
                if exists {
                    tracing::warn!("the relay's role may not write its wake-up flags (GRANT SELECT, INSERT, DELETE ON outbox_relay.waiting to it): producers send no NOTIFY, so new rows wait for the poll (relay.poll_interval) until it may");
                } else {
                    tracing::warn!("the relay's schema has no wake-up flags (outbox_relay.waiting): run `outbox-relay migrate` once; until then every producer transaction sends a NOTIFY, as before");
                }
            }
            self.arming = Arming::Unsupported;
            return Ok(());
        }
        let clear = sqlx::query(
            "DELETE FROM outbox_relay.waiting w WHERE w.pid = pg_backend_pid() \
             OR NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = w.pid)",
        )
        .execute(&mut *listener);
        answered_within(self.answer_within, clear)
            .await
            .map_err(|e| DbError::from(e).context("clearing wake-up flags"))?;
        self.arming = Arming::On;
        Ok(())
    }

    /// Arms the flag of every table whose relays wait for work (and probes those it armed:
    /// a row committed before the flag was visible sent no NOTIFY), and disarms a table whose
    /// producers keep notifying while its relays work (more than [`BUSY_NOTES`] since they
    /// woke: the relays find those rows by fetching again, and each NOTIFY costs a producer
    /// its turn at the commit lock). A table whose relays wake and sleep between a few
    /// commits stays armed: no statement per wake-up. At most two statements (three with the
    /// probe), and none when nothing changed.
    async fn sync_flags(&mut self, listener: &mut PgListener) -> Result<(), DbError> {
        if self.arming != Arming::On {
            return Ok(());
        }
        for entry in &mut self.entries {
            if entry.idle.load(Ordering::Relaxed) > 0 {
                entry.busy_notes = 0;
            }
        }
        let usable =
            |e: &Entry| e.channel.is_some() && matches!(*e.state.borrow(), LockState::Held(_));
        let disarm: Vec<usize> = (0..self.entries.len())
            .filter(|&i| {
                let e = &self.entries[i];
                e.armed && (!usable(e) || e.busy_notes > BUSY_NOTES)
            })
            .collect();
        let arm: Vec<usize> = (0..self.entries.len())
            .filter(|&i| {
                let e = &self.entries[i];
                !e.armed && usable(e) && e.idle.load(Ordering::Relaxed) > 0
            })
            .collect();
        if !disarm.is_empty() {
            let names = self.quoted_names(&disarm);
            let query = sqlx::query(
                "DELETE FROM outbox_relay.waiting WHERE pid = pg_backend_pid() \
                 AND table_oid IN (SELECT to_regclass(n)::oid::bigint FROM unnest($1::text[]) AS n)",
            )
            .bind(&names)
            .execute(&mut *listener);
            answered_within(self.answer_within, query)
                .await
                .map_err(|e| DbError::from(e).context("disarming wake-up flags"))?;
            for &i in &disarm {
                self.entries[i].armed = false;
            }
        }
        if !arm.is_empty() {
            let names = self.quoted_names(&arm);
            let query = sqlx::query(
                "INSERT INTO outbox_relay.waiting (table_oid, pid) \
                 SELECT t.oid::bigint, pg_backend_pid() \
                 FROM unnest($1::text[]) AS n, LATERAL (SELECT to_regclass(n) AS oid) t \
                 WHERE t.oid IS NOT NULL ON CONFLICT DO NOTHING",
            )
            .bind(&names)
            .execute(&mut *listener);
            match answered_within(self.answer_within, query)
                .await
                .map_err(DbError::from)
            {
                Ok(_) => {}
                // A table dropped meanwhile: its relay finds out for itself.
                Err(DbError::Refused(_) | DbError::Rejected(_)) => {}
                Err(e) => return Err(e.context("arming wake-up flags")),
            }
            for &i in &arm {
                self.entries[i].armed = true;
            }
            let probed: Vec<&Entry> = arm.iter().map(|&i| &self.entries[i]).collect();
            self.wake_due(listener, probed).await?;
        }
        Ok(())
    }

    /// The quoted names of the tables at `indices`, for a statement's `text[]` parameter.
    fn quoted_names(&self, indices: &[usize]) -> Vec<String> {
        indices
            .iter()
            .map(|&i| self.entries[i].table.quoted())
            .collect()
    }

    /// Tries the locks of `indices` in one statement; the rest become standbys.
    async fn try_locks(
        &self,
        listener: &mut PgListener,
        pid: i32,
        epoch: u64,
        indices: &[usize],
    ) -> Result<(), DbError> {
        if indices.is_empty() {
            return Ok(());
        }
        let (idx, keys): (Vec<i32>, Vec<i64>) = indices
            .iter()
            .map(|&i| (i as i32, self.entries[i].key))
            .unzip();
        let query = sqlx::query(
            "SELECT s.i FROM unnest($1::int4[], $2::int8[]) AS s(i, k) WHERE pg_try_advisory_lock_shared(s.k)",
        )
        .bind(&idx)
        .bind(&keys);
        let rows = answered_within(self.answer_within, query.fetch_all(&mut *listener))
            .await
            .map_err(|e| DbError::from(e).context("taking the table locks"))?;
        let got: Vec<usize> = rows
            .iter()
            .map(|r| r.try_get::<i32, _>(0).map(|i| i as usize))
            .collect::<Result<_, _>>()?;
        for &i in indices {
            let entry = &self.entries[i];
            let state = if got.contains(&i) {
                LockState::Held(LockGuard {
                    pid,
                    classid: (entry.key as u64 >> 32) as i64,
                    objid: (entry.key as u64 & 0xffff_ffff) as i64,
                    epoch,
                })
            } else {
                LockState::Standby
            };
            entry.state.send_if_modified(|s| {
                let changed = *s != state;
                *s = state;
                changed
            });
        }
        Ok(())
    }

    /// The poll: standby tables try their locks again, idle tables that have due rows are
    /// woken. One statement when only one of the two has work, and none is skipped: it also
    /// notices a session that went silent.
    /// Returns the armed tables it woke.
    async fn poll(
        &self,
        listener: &mut PgListener,
        pid: i32,
        epoch: u64,
    ) -> Result<Vec<usize>, DbError> {
        let standby: Vec<usize> = (0..self.entries.len())
            .filter(|&i| *self.entries[i].state.borrow() == LockState::Standby)
            .collect();
        self.try_locks(listener, pid, epoch, &standby).await?;
        let idle: Vec<&Entry> = self
            .entries
            .iter()
            .filter(|e| {
                e.idle.load(Ordering::Relaxed) > 0
                    && matches!(*e.state.borrow(), LockState::Held(_))
            })
            .collect();
        if idle.is_empty() {
            if standby.is_empty() {
                // Nothing to ask: still one round trip, so a silent session is noticed.
                answered_within(
                    self.answer_within,
                    sqlx::query("SELECT 1").execute(&mut *listener),
                )
                .await
                .map_err(|e| DbError::from(e).context("polling"))?;
            }
            return Ok(Vec::new());
        }
        let woken = self.wake_due(listener, idle).await?;
        Ok(woken
            .into_iter()
            .filter(|&i| self.entries[i].armed)
            .collect())
    }

    /// Wakes those of `tables` that have due rows: one statement.
    /// Wakes those of `tables` that have due rows: one statement. Returns their indices (all
    /// of them when the statement was refused: each finds out for itself).
    async fn wake_due(
        &self,
        listener: &mut PgListener,
        tables: Vec<&Entry>,
    ) -> Result<Vec<usize>, DbError> {
        if tables.is_empty() {
            return Ok(Vec::new());
        }
        let sql = tables
            .iter()
            .map(|e| e.probe.as_str())
            .collect::<Vec<_>>()
            .join(" UNION ALL ");
        let polled = answered_within(
            self.answer_within,
            sqlx::query(&sql)
                .persistent(false)
                .fetch_all(&mut *listener),
        )
        .await;
        let woken: Vec<usize> = match polled.map_err(DbError::from) {
            Ok(rows) => rows
                .iter()
                .map(|row| row.try_get::<i32, _>(0).map(|i| i as usize))
                .collect::<Result<_, _>>()?,
            // A table that was dropped or altered fails the whole statement: wake every one,
            // so each finds out for itself (and reports the broken one by name).
            Err(DbError::Refused(_) | DbError::Rejected(_)) => tables
                .iter()
                .filter_map(|t| self.entries.iter().position(|e| std::ptr::eq(e, *t)))
                .collect(),
            Err(e) => return Err(e.context("polling")),
        };
        for &i in &woken {
            if let Some(entry) = self.entries.get(i) {
                entry.wake.notify();
            }
        }
        Ok(woken)
    }
}
