//! The reads of `outbox-relay replay`: where a table's retained history begins, and the rows of
//! a range, counted and read in id order with a keyset cursor, one bounded chunk of ids per
//! statement. Only plain SELECTs: a replay never changes a row's state, takes no lock and holds
//! no snapshot open between statements (a long replay must not hold back VACUUM on a table the
//! relay updates with every row).
//!
//! Invariant: a row is replayable only when it was marked published at or before the replay's
//! start (`published_at <= published_by`). So the set does not grow while the relay publishes
//! on, and per key it never has a hole where the relay published a row the cursor had passed.

use anyhow::Context;
use chrono::{DateTime, Utc};
use sqlx::{FromRow, Row};

use super::{answered_within, Store};
use crate::config::TableName;
use crate::message::OutboxRow;

/// Where a table's replayable history begins, read when a replay starts.
#[derive(Debug, Clone)]
pub struct Retained {
    /// The database's clock at the start: the replay takes the rows published by then.
    pub started_at: DateTime<Utc>,
    /// The largest id in the table at the start (the cursor stops there); `None` when empty.
    pub newest_id: Option<i64>,
    /// The published row with the smallest id still in the table; `None` when the table
    /// retains no published row (none published yet, or rows are deleted once published).
    pub oldest: Option<RetainedRow>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetainedRow {
    pub id: i64,
    pub created_at: DateTime<Utc>,
}

/// The rows a replay selects: ids in `(after, last]`, published by `published_by`, of `key`
/// when given, created in `[since, until)` when given.
#[derive(Debug, Clone)]
pub struct ReplayRange {
    pub table: TableName,
    pub after: i64,
    pub last: i64,
    pub published_by: DateTime<Utc>,
    pub key: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

/// What one counting chunk found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CountChunk {
    /// The largest id the chunk scanned: the cursor's next `after`. `None`: the range is done.
    pub scanned_to: Option<i64>,
    /// Rows to replay.
    pub rows: u64,
    /// Rows of the range (key and time included) not published by the start: skipped.
    pub unpublished: u64,
    pub first_id: Option<i64>,
    pub last_id: Option<i64>,
}

/// What one reading chunk found.
#[derive(Debug, Clone, Default)]
pub struct ReplayChunk {
    /// The largest id the chunk scanned. `None`: the range is done.
    pub scanned_to: Option<i64>,
    /// The rows to replay, in id order.
    pub rows: Vec<OutboxRow>,
    /// Rows of the range not published by the start: skipped.
    pub unpublished: u64,
}

/// Per scanned row: published by the replay's start (`$4`), and inside the key (`$5`) and time
/// (`$6`, `$7`) filters. Both are never NULL.
const JUDGED: &str = "published_at IS NOT NULL AND published_at <= $4 AS replayable, \
     ($5::text IS NULL OR ordering_key = $5) \
     AND ($6::timestamptz IS NULL OR created_at >= $6) \
     AND ($7::timestamptz IS NULL OR created_at < $7) AS wanted";

impl Store {
    /// The database's clock, the newest id and the oldest retained published row of `table`.
    /// The oldest is found along the primary key from the lowest id: rows before it that are
    /// still unpublished are stepped over, published ones are never scanned past.
    pub async fn replay_start(&self, table: &TableName) -> anyhow::Result<Retained> {
        let t = table.quoted();
        let sql = format!(
            "SELECT now() AS started_at, (SELECT max(id) FROM {t}) AS newest_id, \
                    o.id AS oldest_id, o.created_at AS oldest_created_at \
             FROM (SELECT 1) one LEFT JOIN LATERAL ( \
                 SELECT id, created_at FROM {t} WHERE published_at IS NOT NULL ORDER BY id LIMIT 1) o ON true"
        );
        let row = answered_within(self.answer_within, sqlx::query(&sql).fetch_one(self.pool()))
            .await
            .with_context(|| {
                format!("reading where {table} begins (run `outbox-relay migrate`?)")
            })?;
        let oldest_id: Option<i64> = row.try_get("oldest_id")?;
        let oldest_created_at: Option<DateTime<Utc>> = row.try_get("oldest_created_at")?;
        Ok(Retained {
            started_at: row.try_get("started_at")?,
            newest_id: row.try_get("newest_id")?,
            oldest: oldest_id
                .zip(oldest_created_at)
                .map(|(id, created_at)| RetainedRow { id, created_at }),
        })
    }

    /// Counts the range's rows among the next `limit` ids after `after` (narrow columns only).
    pub async fn count_replay_chunk(
        &self,
        range: &ReplayRange,
        after: i64,
        limit: i64,
    ) -> anyhow::Result<CountChunk> {
        let sql = format!(
            "SELECT max(id) AS scanned_to, \
                    count(*) FILTER (WHERE wanted AND replayable) AS rows, \
                    count(*) FILTER (WHERE wanted AND NOT replayable) AS unpublished, \
                    min(id) FILTER (WHERE wanted AND replayable) AS first_id, \
                    max(id) FILTER (WHERE wanted AND replayable) AS last_id \
             FROM (SELECT id, {JUDGED} FROM {} WHERE id > $1 AND id <= $2 ORDER BY id LIMIT $3) c",
            range.table.quoted()
        );
        let query = bind_range(sqlx::query(&sql), range, after, limit);
        let row = answered_within(self.answer_within, query.fetch_one(self.pool()))
            .await
            .with_context(|| format!("counting the rows of {} to replay", range.table))?;
        Ok(CountChunk {
            scanned_to: row.try_get("scanned_to")?,
            rows: row.try_get::<i64, _>("rows")?.max(0) as u64,
            unpublished: row.try_get::<i64, _>("unpublished")?.max(0) as u64,
            first_id: row.try_get("first_id")?,
            last_id: row.try_get("last_id")?,
        })
    }

    /// Reads the range's rows among the next `limit` ids after `after`, in id order. The scan
    /// is bounded by `limit` ids whatever the filters match (a key's rows may be sparse in a
    /// long table), so each statement is short; the chunk's last scanned row always comes back,
    /// flagged unwanted when it is not in the range, to move the cursor.
    pub async fn replay_chunk(
        &self,
        range: &ReplayRange,
        after: i64,
        limit: i64,
    ) -> anyhow::Result<ReplayChunk> {
        let sql = format!(
            "SELECT {select}, replayable, wanted \
             FROM ( \
                 SELECT c.*, max(c.id) OVER () AS chunk_end FROM ( \
                     SELECT id, dedup_key, ordering_key, routing_key, event_type, payload, headers, exchange, \
                            created_at, attempts, tableoid, xmin, {JUDGED} \
                     FROM {t} WHERE id > $1 AND id <= $2 ORDER BY id LIMIT $3) c) w \
             WHERE wanted OR id = chunk_end \
             ORDER BY id",
            // Decoded as the relay's fetch decodes rows (a value it cannot read stops the
            // replay at that row, with the reason).
            select = super::Columns::default().select_list(""),
            t = range.table.quoted()
        );
        let query = bind_range(sqlx::query(&sql), range, after, limit);
        let found = answered_within(self.answer_within, query.fetch_all(self.pool()))
            .await
            .with_context(|| format!("reading the rows of {} to replay", range.table))?;
        let mut chunk = ReplayChunk::default();
        for row in &found {
            chunk.scanned_to = Some(row.try_get("id")?);
            match (row.try_get("wanted")?, row.try_get("replayable")?) {
                (true, true) => chunk.rows.push(OutboxRow::from_row(row)?),
                (true, false) => chunk.unpublished += 1,
                (false, _) => {}
            }
        }
        Ok(chunk)
    }
}

fn bind_range<'q>(
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    range: &'q ReplayRange,
    after: i64,
    limit: i64,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    query
        .bind(after)
        .bind(range.last)
        .bind(limit)
        .bind(range.published_by)
        .bind(range.key.as_deref())
        .bind(range.since)
        .bind(range.until)
}
