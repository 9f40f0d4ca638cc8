//! The reads of `outbox-relay replay`: where a table's retained history begins, and the rows of
//! a range, counted and read in id order with a keyset cursor, one bounded chunk of ids per
//! statement. Only plain SELECTs: a replay never changes a row's state, takes no lock and holds
//! no snapshot open between statements (a long replay must not hold back VACUUM on a table the
//! relay updates with every row).
//!
//! Invariant: a row is replayable only when it was marked published at or before the replay's
//! start (`published_at <= published_by`) and was not discarded (`outbox_relay.discarded`: a
//! discarded row is marked like a published one, and is never sent). So the set does not grow
//! while the relay publishes on, and per key it never has a hole where the relay published a
//! row the cursor had passed. Also the record of deletions (`outbox_relay.deleted_history`),
//! which the retention sweep writes and a replay reads to know whether rows are missing.

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
    /// Published rows of this table instance the retention sweeper deleted, as recorded in
    /// `outbox_relay.deleted_history`; `None` when it never deleted one.
    pub deleted: Option<DeletedHistory>,
    /// The relay's schema records discarded rows (`migrate` of this release ran): the range's
    /// reads skip them.
    pub discards_recorded: bool,
}

/// The retention sweeper's deletions in one table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeletedHistory {
    pub rows: i64,
    pub last_deleted: DateTime<Utc>,
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
    /// Skip the rows recorded as discarded (see [`Retained::discards_recorded`]).
    pub skip_discarded: bool,
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
    /// Rows of the range an operator discarded: never sent.
    pub discarded: u64,
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
    /// Rows of the range an operator discarded: never sent.
    pub discarded: u64,
}

/// Per scanned row (of the table under the alias `o`): published by the replay's start (`$4`),
/// inside the key (`$5`) and time (`$6`, `$7`) filters, and discarded by an operator (a probe
/// of `outbox_relay.discarded`'s primary key, which holds the few discarded rows). None is
/// ever NULL.
fn judged(range: &ReplayRange) -> String {
    let discarded = if range.skip_discarded {
        "EXISTS (SELECT 1 FROM outbox_relay.discarded d \
                 WHERE d.table_oid = o.tableoid::bigint AND d.row_id = o.id)"
    } else {
        "false"
    };
    format!(
        "published_at IS NOT NULL AND published_at <= $4 AS published, \
         {discarded} AS discarded, \
         ($5::text IS NULL OR ordering_key = $5) \
         AND ($6::timestamptz IS NULL OR created_at >= $6) \
         AND ($7::timestamptz IS NULL OR created_at < $7) AS wanted"
    )
}

/// Records that the sweep's batch deleted `rows` published rows of `table`. Called in the
/// sweep's transaction, so the record is exact. A relay schema from before this release (no
/// `deleted_history` yet: `migrate` not run), or a relay role not granted INSERT and UPDATE on
/// it, records nothing and the sweep goes on (deleting is the sweeper's job; `replay` then does
/// not know of these deletions).
pub(super) async fn note_deleted(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    table: &TableName,
    rows: i64,
) -> sqlx::Result<()> {
    if rows <= 0 {
        return Ok(());
    }
    let recorded: bool = sqlx::query_scalar(
        "SELECT CASE WHEN to_regclass('outbox_relay.deleted_history') IS NULL THEN false \
         ELSE has_table_privilege('outbox_relay.deleted_history', 'INSERT') \
          AND has_table_privilege('outbox_relay.deleted_history', 'UPDATE') END",
    )
    .fetch_one(&mut **tx)
    .await?;
    if !recorded {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO outbox_relay.deleted_history AS h (table_oid, rows) \
         VALUES ($1::regclass::oid::bigint, $2) \
         ON CONFLICT (table_oid) DO UPDATE SET rows = h.rows + EXCLUDED.rows, last_deleted = now()",
    )
    .bind(table.quoted())
    .bind(rows)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

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
        let (deleted, discards_recorded) = self.deleted_history(table).await?;
        Ok(Retained {
            started_at: row.try_get("started_at")?,
            newest_id: row.try_get("newest_id")?,
            oldest: oldest_id
                .zip(oldest_created_at)
                .map(|(id, created_at)| RetainedRow { id, created_at }),
            deleted,
            discards_recorded,
        })
    }

    /// The retention sweeper's recorded deletions in `table` (this instance of it), and whether
    /// the relay's schema records discarded rows; both `None`/false on a schema from before
    /// this release.
    async fn deleted_history(
        &self,
        table: &TableName,
    ) -> anyhow::Result<(Option<DeletedHistory>, bool)> {
        let schema = sqlx::query(
            "SELECT to_regclass('outbox_relay.deleted_history') IS NOT NULL AS deletions, \
                    to_regclass('outbox_relay.discarded') IS NOT NULL AS discards",
        );
        let schema = answered_within(self.answer_within, schema.fetch_one(self.pool())).await?;
        let discards: bool = schema.try_get("discards")?;
        if !schema.try_get::<bool, _>("deletions")? {
            return Ok((None, discards));
        }
        let query = sqlx::query(
            "SELECT rows, last_deleted FROM outbox_relay.deleted_history \
             WHERE table_oid = $1::regclass::oid::bigint",
        )
        .bind(table.quoted());
        let found = answered_within(self.answer_within, query.fetch_optional(self.pool()))
            .await
            .with_context(|| format!("reading the deletions recorded for {table}"))?;
        let deleted = match found {
            Some(row) => Some(DeletedHistory {
                rows: row.try_get("rows")?,
                last_deleted: row.try_get("last_deleted")?,
            }),
            None => None,
        };
        Ok((deleted.filter(|d| d.rows > 0), discards))
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
                    count(*) FILTER (WHERE wanted AND published AND NOT discarded) AS rows, \
                    count(*) FILTER (WHERE wanted AND NOT published AND NOT discarded) AS unpublished, \
                    count(*) FILTER (WHERE wanted AND discarded) AS discarded, \
                    min(id) FILTER (WHERE wanted AND published AND NOT discarded) AS first_id, \
                    max(id) FILTER (WHERE wanted AND published AND NOT discarded) AS last_id \
             FROM (SELECT id, {judged} FROM {} o WHERE id > $1 AND id <= $2 ORDER BY id LIMIT $3) c",
            range.table.quoted(),
            judged = judged(range),
        );
        let query = bind_range(sqlx::query(&sql), range, after, limit);
        let row = answered_within(self.answer_within, query.fetch_one(self.pool()))
            .await
            .with_context(|| format!("counting the rows of {} to replay", range.table))?;
        Ok(CountChunk {
            scanned_to: row.try_get("scanned_to")?,
            rows: row.try_get::<i64, _>("rows")?.max(0) as u64,
            unpublished: row.try_get::<i64, _>("unpublished")?.max(0) as u64,
            discarded: row.try_get::<i64, _>("discarded")?.max(0) as u64,
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
            "SELECT {select}, published, discarded, wanted \
             FROM ( \
                 SELECT c.*, max(c.id) OVER () AS chunk_end FROM ( \
                     SELECT id, dedup_key, ordering_key, routing_key, event_type, payload, headers, exchange, \
                            created_at, attempts, tableoid, xmin, {judged} \
                     FROM {t} o WHERE id > $1 AND id <= $2 ORDER BY id LIMIT $3) c) w \
             WHERE wanted OR id = chunk_end \
             ORDER BY id",
            // Decoded as the relay's fetch decodes rows (a value it cannot read stops the
            // replay at that row, with the reason).
            select = super::Columns::default().select_list(""),
            t = range.table.quoted(),
            judged = judged(range),
        );
        let query = bind_range(sqlx::query(&sql), range, after, limit);
        let found = answered_within(self.answer_within, query.fetch_all(self.pool()))
            .await
            .with_context(|| format!("reading the rows of {} to replay", range.table))?;
        let mut chunk = ReplayChunk::default();
        for row in &found {
            chunk.scanned_to = Some(row.try_get("id")?);
            let discarded: bool = row.try_get("discarded")?;
            match (row.try_get("wanted")?, row.try_get("published")?) {
                (true, _) if discarded => chunk.discarded += 1,
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
