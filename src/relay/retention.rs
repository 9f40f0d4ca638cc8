//! The retention sweeper of one table (`retention` set, `on_published = "mark"`): it deletes
//! published rows older than the retention, in batches, while this process holds the table's
//! lock and, of several relays on the table, owns its partition 0 (the others do not sweep). Has no SQL of its own (`store.rs`,
//! `sweep_published`).
//!
//! Invariant: it deletes only rows whose `published_at` is older than the retention, never a
//! pending, held or parked row, whatever its age; the statement itself says so, and skips rows
//! another session has locked, so it is safe beside producers, the relay's marks and another
//! process's sweeper. Its load is bounded: at most [`SWEEP_BATCH`] rows per statement (each
//! statement within `SWEEP_STATEMENT_TIMEOUT`), a pause as long as the batch took before the
//! next one (the sweeper uses at most half of one connection's time), and while nothing is left
//! to delete, two short statements per [`SWEEP_EVERY`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use crate::cluster::member::Ownership;
use crate::config::TableName;
use crate::shutdown::Shutdown;
use crate::store::{DbError, LockState, Store, TableLock, TableSql};

/// Rows one sweep statement deletes at most.
pub const SWEEP_BATCH: u32 = 5_000;
/// How often the sweeper looks for rows past the retention once none is left.
pub const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// The shortest pause between two batches of one sweep.
const MIN_PAUSE: Duration = Duration::from_millis(20);
/// The first sweep after the lock is taken starts within this (at random, so many tables do not
/// sweep at the same moment, and the relay's first fetches go first).
const FIRST_SWEEP_WITHIN: Duration = Duration::from_secs(3);

/// The sweeper's progress, for the metrics (and the log): read with the accessors.
#[derive(Debug, Default)]
pub struct RetentionProgress {
    rows_deleted: AtomicU64,
    /// Unix seconds of the last sweep that finished; 0 until one did.
    last_sweep_unix: AtomicU64,
    /// Milliseconds since the oldest published row still in the table was published, plus
    /// one; 0 while none is (or before the first sweep).
    oldest_published_ms: AtomicU64,
}

impl RetentionProgress {
    /// Published rows the sweeper deleted since the process started.
    pub fn rows_deleted_total(&self) -> u64 {
        self.rows_deleted.load(Ordering::Relaxed)
    }

    /// When the last sweep finished (Unix seconds); `None` before the first.
    pub fn last_sweep_unix(&self) -> Option<u64> {
        Some(self.last_sweep_unix.load(Ordering::Relaxed)).filter(|&s| s > 0)
    }

    /// The age of the oldest published row in the table at the last sweep; `None` when there
    /// was none (or no sweep finished yet). Stays near the retention while the sweeper keeps up.
    pub fn oldest_published_age(&self) -> Option<Duration> {
        match self.oldest_published_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms - 1)),
        }
    }

    fn deleted(&self, rows: u64) {
        self.rows_deleted.fetch_add(rows, Ordering::Relaxed);
    }

    fn swept(&self, oldest: Option<Duration>) {
        let ms = oldest.map_or(0, |d| (d.as_millis() as u64).saturating_add(1));
        self.oldest_published_ms.store(ms, Ordering::Relaxed);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.last_sweep_unix.store(now, Ordering::Relaxed);
    }
}

/// What one [`Sweeper::step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SweepStep {
    /// Deleted `rows` published rows past the retention; `full` when the batch was full (more
    /// may be left).
    Deleted { rows: u64, full: bool },
    /// Another relay holds the table's lock (or the lock's session is not up): nothing done.
    NotHolding,
}

/// The retention sweeper of one table.
pub struct Sweeper {
    store: Store,
    sql: TableSql,
    table: TableName,
    retention: Duration,
    lock: TableLock,
    /// The process's membership of the table: of several relays, the owner of partition 0
    /// sweeps.
    ownership: watch::Receiver<Ownership>,
    shutdown: Shutdown,
    progress: Arc<RetentionProgress>,
    /// The last round failed (logged once, until a round succeeds again).
    failing: bool,
}

impl Sweeper {
    /// The sweeper of the table `sql` is for, deleting published rows older than `retention`
    /// while `lock` is held and the membership (`ownership`) owns the table's partition 0.
    pub fn new(
        store: Store,
        sql: TableSql,
        retention: Duration,
        lock: TableLock,
        ownership: watch::Receiver<Ownership>,
        shutdown: Shutdown,
    ) -> Self {
        Sweeper {
            table: sql.table().clone(),
            store,
            sql,
            retention,
            lock,
            ownership,
            shutdown,
            progress: Arc::default(),
            failing: false,
        }
    }

    /// The sweeper's counters (for `/metrics`).
    pub fn progress(&self) -> Arc<RetentionProgress> {
        self.progress.clone()
    }

    /// One batch: deletes at most [`SWEEP_BATCH`] published rows older than the retention,
    /// oldest first, if this process holds the table's lock.
    pub async fn step(&mut self) -> Result<SweepStep, DbError> {
        if !self.holding() {
            return Ok(SweepStep::NotHolding);
        }
        let rows = self
            .store
            .sweep_published(&self.sql, self.retention, SWEEP_BATCH)
            .await?;
        self.progress.deleted(rows);
        Ok(SweepStep::Deleted {
            rows,
            full: rows >= SWEEP_BATCH as u64,
        })
    }

    /// Runs until shutdown: a sweep soon after the lock is taken, then one every
    /// [`SWEEP_EVERY`]; nothing while the lock is another relay's.
    pub async fn run(mut self) {
        let mut first = true;
        loop {
            if !self.wait_for_lock().await {
                break;
            }
            let pause = if first {
                FIRST_SWEEP_WITHIN.mul_f64(rand::random::<f64>())
            } else {
                SWEEP_EVERY
            };
            first = false;
            if !self.sleep(pause).await {
                break;
            }
            match self.sweep().await {
                Ok(()) => self.failing = false,
                Err(e) => {
                    if !self.failing {
                        tracing::warn!(table = %self.table, error = %e, "retention sweep failed; trying again in a minute");
                    }
                    self.failing = true;
                }
            }
        }
    }

    /// One sweep: batches until none is full (or the lock is lost, or shutdown), then the
    /// oldest published row's age. One log line when it deleted anything.
    async fn sweep(&mut self) -> Result<(), DbError> {
        if !self.holding() {
            return Ok(());
        }
        if self.store.retention_index_valid(&self.table).await? != Some(true) {
            // Without it every sweep would read the whole history.
            return Err(DbError::Refused(format!(
                "the table has no valid retention index {} (run `outbox-relay migrate`)",
                self.table.derived("published")
            )));
        }
        let mut oldest = self.store.oldest_published(&self.sql).await?;
        let (mut deleted, mut batches) = (0, 0);
        if oldest.is_some_and(|age| age > self.retention) {
            while !self.shutdown.is_stopping() {
                let started = tokio::time::Instant::now();
                let SweepStep::Deleted { rows, full } = self.step().await? else {
                    break;
                };
                deleted += rows;
                batches += 1;
                // As long as the batch took: the sweeper never takes more than half of a
                // connection's time, and slows down with a busy server.
                if !full || !self.sleep(started.elapsed().max(MIN_PAUSE)).await {
                    break;
                }
            }
            oldest = self.store.oldest_published(&self.sql).await?;
        }
        self.progress.swept(oldest);
        if deleted > 0 {
            tracing::info!(
                table = %self.table,
                rows = deleted,
                batches,
                retention = %humantime::format_duration(self.retention),
                oldest_published_s = oldest.map(|d| d.as_secs()),
                "deleted published rows older than the retention"
            );
        }
        Ok(())
    }

    /// Until this process holds the table's lock; false on shutdown.
    async fn wait_for_lock(&mut self) -> bool {
        loop {
            if self.shutdown.is_stopping() {
                return false;
            }
            if self.holding() {
                return true;
            }
            tokio::select! {
                _ = self.lock.changed() => {}
                changed = self.ownership.changed() => {
                    if changed.is_err() {
                        // The membership ended: the process is stopping.
                        return false;
                    }
                }
                _ = self.shutdown.stopping() => return false,
            }
        }
    }

    /// The lock is held, and of the table's relays this one sweeps (it owns partition 0).
    fn holding(&mut self) -> bool {
        matches!(self.lock.state(), LockState::Held(_))
            && self
                .ownership
                .borrow_and_update()
                .partitions
                .contains_key(&0)
    }

    /// Sleeps `pause`; false when shutdown began.
    async fn sleep(&self, pause: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(pause) => !self.shutdown.is_stopping(),
            _ = self.shutdown.stopping() => false,
        }
    }
}
