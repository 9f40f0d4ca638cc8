//! The mark pipeline: what the broker settled, on its way into the table. A confirmed row id is
//! in exactly one of `confirmed` (waiting for a mark), `marking` (its mark being written in the
//! background) or `unmarked` (its mark failed; written again before anything is fetched), until
//! its mark is written; [`MarkPipeline::pending_ids`] is that set, which the fetch excludes and
//! the confirm window counts. Failures wait in `unrecorded` until recorded, and the keys they
//! hold back (or that a published holder frees) wait until held (released) in the table.

use std::time::Duration;

use crate::config::OnExhausted;
use crate::store::{DbError, Failure, Fence, Marked, RowVersion, Store, TableSql};

pub struct MarkPipeline {
    store: Store,
    sql: TableSql,
    chunk: usize,
    confirmed: Vec<RowVersion>,
    marking: Option<Marking>,
    unmarked: Vec<RowVersion>,
    unrecorded: Vec<Failure>,
    /// Keys to hold behind their failed row, and keys whose holder no longer holds them.
    holds: Vec<(String, i64)>,
    releases: Vec<String>,
    /// Keys this table holds, as last counted: while any, stale holds are looked for now and
    /// then (a holder deleted by hand); none, never.
    held_keys: i64,
    last_sweep: Option<std::time::Instant>,
    /// The leases every write is fenced by (what the membership last told the relay), and
    /// so the table instance the ids belong to: none until the relay first took a turn, and
    /// nothing can be confirmed before that.
    fence: Option<Fence>,
}

/// A mark being written in the background.
struct Marking {
    ids: Vec<RowVersion>,
    task: tokio::task::JoinHandle<Result<Marked, DbError>>,
}

/// How often a table with held keys looks for stale ones (a parked holder deleted by hand):
/// on a quiet table too, the relay wakes for it, so a key whose holder is gone flows again
/// within this long. One statement per table with held keys, none for a table without.
pub const SWEEP_EVERY: Duration = Duration::from_secs(15);

impl MarkPipeline {
    /// `chunk`: how many confirmed rows one mark writes.
    pub fn new(store: Store, sql: TableSql, chunk: usize) -> Self {
        MarkPipeline {
            store,
            sql,
            chunk,
            confirmed: Vec::new(),
            marking: None,
            unmarked: Vec::new(),
            unrecorded: Vec::new(),
            holds: Vec::new(),
            releases: Vec::new(),
            held_keys: 0,
            last_sweep: None,
            fence: None,
        }
    }

    /// Ids confirmed by the broker whose mark is not written yet.
    pub fn pending_ids(&self) -> impl Iterator<Item = i64> + '_ {
        self.confirmed
            .iter()
            .chain(self.marking.iter().flat_map(|m| m.ids.iter()))
            .chain(self.unmarked.iter())
            .map(|row| row.id)
    }

    /// How many ids [`MarkPipeline::pending_ids`] yields.
    pub fn pending(&self) -> usize {
        self.confirmed.len()
            + self.marking.as_ref().map_or(0, |m| m.ids.len())
            + self.unmarked.len()
    }

    /// The leases the next writes are fenced by. A write for a partition the fence does not
    /// hold (any more) changes nothing: the row stays due for its new owner. A fence for
    /// another instance of the table (it was dropped and created again, ids start over)
    /// forgets the old one's ids: none of them may be marked in the new table. Returns true
    /// when that happened.
    pub fn set_fence(&mut self, fence: &Fence) -> bool {
        if self.fence.as_ref() == Some(fence) {
            return false;
        }
        let replaced = self
            .fence
            .replace(fence.clone())
            .is_some_and(|old| old.table_oid() != fence.table_oid());
        if replaced {
            self.confirmed.clear();
            self.unmarked.clear();
            self.unrecorded.clear();
            self.holds.clear();
            self.releases.clear();
            self.held_keys = 0;
            if let Some(m) = self.marking.take() {
                m.task.abort();
            }
        }
        replaced
    }

    /// The broker confirmed this version of the row: it is marked published (if the table still
    /// holds that version).
    pub fn confirm(&mut self, row: RowVersion) {
        self.confirmed.push(row);
    }

    /// A failed publish to record; `ordering_key` and the failure's verdict decide whether it
    /// holds its key back.
    pub fn fail(&mut self, failure: Failure, ordering_key: &str, previous_attempts: i32) {
        let parks = failure.retry_after.is_none();
        if !parks || self.sql.on_exhausted() == OnExhausted::HoldKey {
            // A release still under way for the key stops: the key is held again, behind
            // this row (rows released before it and not sent yet are held again).
            self.releases.retain(|k| k != ordering_key);
            self.holds.retain(|(k, _)| k != ordering_key);
            self.holds.push((ordering_key.to_owned(), failure.row.id));
        } else if previous_attempts > 0 {
            // Parked under skip after failing before: it held its key while it waited.
            self.queue_release(ordering_key.to_owned());
        }
        self.unrecorded.push(failure);
    }

    /// True when enough confirmed rows wait for a mark and none is being written: time to
    /// start one, so the window reopens while the rest of the confirms arrive.
    pub fn wants_mark(&self) -> bool {
        self.confirmed.len() >= self.chunk
            && self.marking.as_ref().is_none_or(|m| m.task.is_finished())
    }

    /// True while anything waits to be written: a mark running or failed, failures, holds or
    /// releases. A table with nothing to fetch must not go idle before it is written: a
    /// release still in memory would leave the key's rows held with nobody to free them.
    pub fn has_work(&self) -> bool {
        self.marking.is_some()
            || !self.confirmed.is_empty()
            || !self.unmarked.is_empty()
            || !self.unrecorded.is_empty()
            || !self.holds.is_empty()
            || !self.releases.is_empty()
    }

    /// True when a background mark has finished and waits to be settled.
    pub fn mark_finished(&self) -> bool {
        self.marking.as_ref().is_some_and(|m| m.task.is_finished())
    }

    /// Starts marking the confirmed rows in the background (after settling the previous mark).
    pub async fn start(&mut self) -> Result<(), DbError> {
        let settled = self.finish_marking().await;
        let Some(fence) = self.fence.clone() else {
            return settled;
        };
        if !self.confirmed.is_empty() {
            let ids = std::mem::take(&mut self.confirmed);
            let (store, sql, task_ids) = (self.store.clone(), self.sql.clone(), ids.clone());
            self.marking = Some(Marking {
                ids,
                task: tokio::spawn(
                    async move { store.mark_published(&sql, &task_ids, &fence).await },
                ),
            });
        }
        settled
    }

    /// Writes what earlier turns left: a finished background mark's outcome, failed marks,
    /// unrecorded failures, holds and releases. Called before every fetch, so the rows the
    /// failures hold back stay back. Stops at the first error (the rest stays queued).
    pub async fn settle(&mut self) -> Result<(), DbError> {
        if self.mark_finished() {
            self.finish_marking().await?;
        }
        self.flush().await
    }

    /// At the end of a run: marks everything confirmed, waiting for it. Every step runs, even
    /// after one failed; the first error is returned.
    pub async fn finish(&mut self) -> Result<(), DbError> {
        let started = self.start().await;
        let finished = self.finish_marking().await;
        let flushed = self.flush().await;
        started.and(finished).and(flushed)
    }

    /// Looks for holds whose holder is gone (once after the lock is taken, then every
    /// [`SWEEP_EVERY`] while the table holds keys) and queues their release.
    pub async fn sweep_stale_holds(&mut self, force: bool) -> Result<(), DbError> {
        if !force && !self.sweep_due() {
            return Ok(());
        }
        let Some(fence) = &self.fence else {
            return Ok(());
        };
        self.last_sweep = Some(std::time::Instant::now());
        let (stale, held) = self.store.stale_holds(&self.sql, fence).await?;
        if held == 0 && (force || self.held_keys > 0) {
            self.clear_held_flag().await;
        }
        self.held_keys = held;
        if !stale.is_empty() {
            tracing::info!(table = %self.sql.table(), keys = stale.len(), "releasing keys whose holding row is gone");
            stale.into_iter().for_each(|k| self.queue_release(k));
        }
        Ok(())
    }

    /// True when the table holds keys and has not looked for stale holds for
    /// [`SWEEP_EVERY`]: an idle relay wakes for it.
    pub fn sweep_due(&self) -> bool {
        self.held_keys > 0 && self.last_sweep.is_none_or(|t| t.elapsed() >= SWEEP_EVERY)
    }

    /// The key's holder no longer holds it: a hold still under way stops, the release starts.
    fn queue_release(&mut self, key: String) {
        self.holds.retain(|(k, _)| *k != key);
        if !self.releases.contains(&key) {
            self.releases.push(key);
        }
    }

    /// A mark of `asked` rows was written: the keys it freed are released, and rows it could
    /// not mark are said once (they stay pending and go out again).
    fn written(&mut self, asked: usize, marked: Marked) {
        if marked.marked < asked {
            tracing::warn!(
                table = %self.sql.table(),
                confirmed = asked,
                marked = marked.marked,
                "confirmed rows not marked: changed or removed since they were read (a TRUNCATE, \
                 DELETE or UPDATE by hand), or their partition moved to another relay; those \
                 still pending go out again (same message_id)"
            );
        }
        marked.freed.into_iter().for_each(|k| self.queue_release(k));
    }

    /// Waits for the background mark; its ids join `unmarked` when it failed.
    async fn finish_marking(&mut self) -> Result<(), DbError> {
        let Some(marking) = self.marking.take() else {
            return Ok(());
        };
        match marking.task.await {
            Ok(Ok(marked)) => {
                self.written(marking.ids.len(), marked);
                Ok(())
            }
            Ok(Err(e)) => {
                self.unmarked.extend(marking.ids);
                Err(e)
            }
            Err(join) => {
                self.unmarked.extend(marking.ids);
                tracing::error!(error = %join, "the mark task failed; its rows are marked again");
                Ok(())
            }
        }
    }

    async fn flush(&mut self) -> Result<(), DbError> {
        let Some(fence) = self.fence.clone() else {
            return Ok(());
        };
        if !self.unmarked.is_empty() {
            let marked = self
                .store
                .mark_published(&self.sql, &self.unmarked, &fence)
                .await?;
            let asked = std::mem::take(&mut self.unmarked).len();
            self.written(asked, marked);
        }
        if !self.unrecorded.is_empty() {
            self.store
                .record_failures(&self.sql, &self.unrecorded, &fence)
                .await?;
            for f in self.unrecorded.iter().filter(|f| f.retry_after.is_none()) {
                tracing::warn!(table = %self.sql.table(), id = f.row.id, error = %f.error, "row parked");
            }
            self.unrecorded.clear();
        }
        if !self.holds.is_empty() {
            let holds = std::mem::take(&mut self.holds);
            let busy = self.store.hold_keys(&self.sql, &holds, &fence).await?;
            self.held_keys += (holds.len() - busy.len()) as i64;
            self.holds = holds
                .into_iter()
                .filter(|(k, _)| busy.contains(k))
                .collect();
        }
        if !self.releases.is_empty() {
            let releases = std::mem::take(&mut self.releases);
            let unfinished = self
                .store
                .release_keys(&self.sql, &releases, &fence)
                .await?;
            let before = self.held_keys;
            self.held_keys = (self.held_keys - (releases.len() - unfinished.len()) as i64).max(0);
            self.releases = unfinished;
            if before > 0 && self.held_keys == 0 {
                self.clear_held_flag().await;
            }
        }
        Ok(())
    }

    /// This table holds no key (any more): producers' inserts may skip the held_keys probe
    /// once no table holds one (`Store::clear_held_flag` checks them all). Only that cost is at
    /// stake, so a failure is logged and changes nothing else.
    async fn clear_held_flag(&self) {
        if let Err(e) = self.store.clear_held_flag().await {
            tracing::debug!(table = %self.sql.table(), error = %e, "could not clear held_flag");
        }
    }
}
