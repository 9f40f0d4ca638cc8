//! `outbox-relay discard`: ends parked rows for good so their ordering key moves on, and the
//! reads that show them (`status`, the metrics) or say why a row was not found parked (`retry`
//! and `discard` when nothing matched). Must not touch AMQP, and leaves the relay's fetch and
//! mark statements alone: a discarded row only takes states those statements already know.
//!
//! Invariant: a row is discarded exactly when `outbox_relay.discarded` holds it (table
//! instance and row id), and the same transaction took it out of the relay's hands the way a
//! confirm does (marked published, or deleted under `on_published = "delete"`), under the
//! key's order-guard lock, so the relay never publishes it again and `replay` skips it. A key
//! held behind a discarded row is released in the same transaction (more chunks follow in
//! their own, each under the lock), held from the next parked row of the key on when one is
//! left under `hold_key`.

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::{Store, TableSql, HOLD_CHUNK};
use crate::config::{OnExhausted, OnPublished, TableName};

/// Which parked rows a `discard` ends.
#[derive(Debug, Clone)]
pub enum DiscardSelector {
    Id(i64),
    Key(String),
}

/// A row `discard` ended.
#[derive(Debug, Clone)]
pub struct DiscardedRow {
    pub id: i64,
    pub ordering_key: String,
    pub attempts: i32,
    pub last_error: Option<String>,
}

/// What one `discard` changed in one table.
#[derive(Debug, Clone, Default)]
pub struct Discard {
    /// The rows discarded, in id order; empty when no parked row matched.
    pub rows: Vec<DiscardedRow>,
    /// Rows that waited behind a discarded row of their key and go out now.
    pub released: u64,
}

/// A discarded row as `status --parked` lists it.
#[derive(Debug, Clone)]
pub struct DiscardRecord {
    pub id: i64,
    pub ordering_key: String,
    pub dedup_key: String,
    pub reason: String,
    pub discarded_at: DateTime<Utc>,
    pub attempts: i32,
    pub last_error: Option<String>,
}

/// Where one row stands, for saying why a command that wanted it parked found nothing to do.
#[derive(Debug, Clone, PartialEq)]
pub enum RowFate {
    /// No row with that id in the table (and none discarded).
    Missing,
    Discarded {
        at: DateTime<Utc>,
        reason: String,
    },
    Published {
        at: DateTime<Utc>,
    },
    Parked,
    /// Not published and not parked: due, waiting for a retry delay, or held behind its key.
    Pending {
        attempts: i32,
        held: bool,
        retry_later: bool,
    },
}

impl std::fmt::Display for RowFate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RowFate::Missing => write!(f, "no such row"),
            RowFate::Discarded { at, reason } => write!(
                f,
                "it was discarded at {} (reason: {reason:?})",
                at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ),
            RowFate::Published { at } => write!(
                f,
                "it was already published at {}",
                at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ),
            RowFate::Parked => write!(f, "it is parked"),
            RowFate::Pending {
                attempts,
                held,
                retry_later,
            } => {
                write!(f, "it is not parked but pending")?;
                if *held {
                    write!(f, ", held behind an earlier row of its key")?;
                } else if *retry_later {
                    write!(f, ", waiting for its retry delay")?;
                }
                write!(f, " ({attempts} failed attempt(s))")
            }
        }
    }
}

/// Whether the relay's schema has `outbox_relay.discarded` (`migrate` of this release ran) and
/// this session's role may read it (a relay role granted only what earlier releases needed
/// reads no discarded rows: its gauge stays at 0 instead of failing every scrape).
const DISCARDED_EXISTS: &str =
    "SELECT CASE WHEN to_regclass('outbox_relay.discarded') IS NULL THEN false \
     ELSE has_table_privilege('outbox_relay.discarded', 'SELECT') END";

impl Store {
    /// Ends the selected parked rows of `q`'s table: records each in `outbox_relay.discarded`
    /// with `reason`, takes it out of the relay's hands as `on_published` does with a
    /// published row, and releases its key when it was the key's holder. Takes the key's
    /// order-guard lock, waiting (up to the session's statement timeout) for a producer of the
    /// key to commit. Returns what it changed: no row when none of the selected is parked.
    pub async fn discard(
        &self,
        q: &TableSql,
        on_published: OnPublished,
        selector: &DiscardSelector,
        reason: &str,
    ) -> anyhow::Result<Discard> {
        let table = q.table();
        let t = table.quoted();
        let c = q.columns();
        let (id, key, live) = (c.seq(""), c.key(""), c.live(""));
        let key_value = match selector {
            DiscardSelector::Key(k) => k.clone(),
            DiscardSelector::Id(n) => {
                let sql = format!("SELECT {key} FROM {t} WHERE {id} = $1");
                match sqlx::query_scalar::<_, String>(&sql)
                    .bind(n)
                    .fetch_optional(self.pool())
                    .await?
                {
                    Some(k) => k,
                    None => return Ok(Discard::default()),
                }
            }
        };
        let only_id = match selector {
            DiscardSelector::Id(n) => Some(*n),
            DiscardSelector::Key(_) => None,
        };
        let mut tx = self.pool().begin().await?;
        lock_key(&mut tx, table, &key_value).await?;
        // Under the lock: the rows still parked (a relay's retry or another discard may have
        // come first), locked until the commit.
        let pick = format!(
            "WITH picked AS ( \
                 SELECT {id} AS id, {key} AS ordering_key, {dedup} AS dedup_key, attempts, last_error, \
                        parked_at, to_jsonb(t) AS row_data, tableoid::bigint AS table_oid \
                 FROM {t} t \
                 WHERE {live}{key} = $1 AND ($2::bigint IS NULL OR {id} = $2) \
                   AND published_at IS NULL AND parked_at IS NOT NULL \
                 ORDER BY {id} FOR UPDATE), \
             recorded AS ( \
                 INSERT INTO outbox_relay.discarded AS d (table_oid, row_id, table_name, ordering_key, \
                        dedup_key, reason, parked_at, attempts, last_error, row_data) \
                 SELECT table_oid, id, $3, ordering_key, dedup_key, $4, parked_at, attempts, last_error, row_data \
                 FROM picked \
                 ON CONFLICT (table_oid, row_id) DO UPDATE SET table_name = EXCLUDED.table_name, \
                     ordering_key = EXCLUDED.ordering_key, dedup_key = EXCLUDED.dedup_key, \
                     reason = EXCLUDED.reason, discarded_at = now(), parked_at = EXCLUDED.parked_at, \
                     attempts = EXCLUDED.attempts, last_error = EXCLUDED.last_error, \
                     row_data = EXCLUDED.row_data \
                 RETURNING row_id) \
             SELECT p.id, p.ordering_key, p.attempts, p.last_error, p.table_oid \
             FROM picked p JOIN recorded r ON r.row_id = p.id ORDER BY p.id",
            dedup = c.dedup_key(""),
        );
        let picked = sqlx::query(&pick)
            .bind(&key_value)
            .bind(only_id)
            .bind(table.to_string())
            .bind(reason)
            .fetch_all(&mut *tx)
            .await?;
        let Some(table_oid) = picked
            .first()
            .map(|r| r.try_get::<i64, _>("table_oid"))
            .transpose()?
        else {
            tx.rollback().await?;
            return Ok(Discard::default());
        };
        let mut discard = Discard::default();
        for r in &picked {
            discard.rows.push(DiscardedRow {
                id: r.try_get("id")?,
                ordering_key: r.try_get("ordering_key")?,
                attempts: r.try_get("attempts")?,
                last_error: r.try_get("last_error")?,
            });
        }
        let ids: Vec<i64> = discard.rows.iter().map(|r| r.id).collect();
        // Out of the relay's hands as a confirmed row goes: a marked row leaves the pending
        // and failed indexes (the fetch never reads it again, and no later row of its key
        // waits for it), and retention deletes it with the published history.
        let end = match on_published {
            OnPublished::Mark => format!(
                "UPDATE {t} SET published_at = now(), parked_at = NULL, last_error = 'discarded: ' || $2 \
                 WHERE {id} = ANY($1) AND published_at IS NULL AND parked_at IS NOT NULL"
            ),
            // $2 unused, but typed: one statement shape for both modes.
            OnPublished::Delete => format!(
                "DELETE FROM {t} WHERE {id} = ANY($1) AND published_at IS NULL AND parked_at IS NOT NULL \
                 AND $2::text IS NOT NULL"
            ),
        };
        sqlx::query(&end)
            .bind(&ids)
            .bind(reason)
            .execute(&mut *tx)
            .await?;
        // The key's hold, when a discarded row is its holder: under hold_key a parked row of
        // the key still there holds it from its own id on; otherwise the key is released.
        let holder: Option<i64> = sqlx::query_scalar(
            "SELECT holder FROM outbox_relay.held_keys \
             WHERE table_oid = $1 AND ordering_key = $2 FOR UPDATE",
        )
        .bind(table_oid)
        .bind(&key_value)
        .fetch_optional(&mut *tx)
        .await?;
        let release = match holder {
            Some(h) if ids.contains(&h) => {
                let next_parked: Option<i64> = match q.on_exhausted() {
                    OnExhausted::HoldKey => {
                        sqlx::query_scalar(&format!(
                            "SELECT min({id}) FROM {t} WHERE {live}{key} = $1 \
                             AND published_at IS NULL AND parked_at IS NOT NULL"
                        ))
                        .bind(&key_value)
                        .fetch_one(&mut *tx)
                        .await?
                    }
                    OnExhausted::Skip => None,
                };
                if let Some(next) = next_parked {
                    sqlx::query(
                        "UPDATE outbox_relay.held_keys SET holder = $3 \
                         WHERE table_oid = $1 AND ordering_key = $2",
                    )
                    .bind(table_oid)
                    .bind(&key_value)
                    .bind(next)
                    .execute(&mut *tx)
                    .await?;
                }
                Some(next_parked)
            }
            _ => None,
        };
        let mut done = true;
        if let Some(below) = release {
            let moved = unhold_chunk(&mut tx, q, table_oid, &key_value, below, &ids).await?;
            discard.released += moved;
            done = moved < HOLD_CHUNK as u64;
        }
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(TableSql::notify_channel(table))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        // A key with more rows waiting than one chunk: the rest in transactions of their own,
        // each short and under the key's lock (the relay's release goes the same way).
        if let Some(below) = release {
            while !done {
                let mut tx = self.pool().begin().await?;
                lock_key(&mut tx, table, &key_value).await?;
                let moved = unhold_chunk(&mut tx, q, table_oid, &key_value, below, &ids).await?;
                sqlx::query("SELECT pg_notify($1, '')")
                    .bind(TableSql::notify_channel(table))
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                discard.released += moved;
                done = moved < HOLD_CHUNK as u64;
            }
        }
        Ok(discard)
    }

    /// Where row `id` of `q`'s table stands (for a command that found it not parked).
    pub async fn row_fate(&self, q: &TableSql, id: i64) -> anyhow::Result<RowFate> {
        if let Some((at, reason)) = self.discard_record(q.table(), id).await? {
            return Ok(RowFate::Discarded { at, reason });
        }
        let c = q.columns();
        let sql = format!(
            "SELECT published_at, parked_at IS NOT NULL AS parked, attempts, held, \
                    next_attempt_at > now() AS retry_later \
             FROM {} WHERE {} = $1",
            q.table().quoted(),
            c.seq("")
        );
        let Some(row) = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(self.pool())
            .await?
        else {
            return Ok(RowFate::Missing);
        };
        if let Some(at) = row.try_get::<Option<DateTime<Utc>>, _>("published_at")? {
            return Ok(RowFate::Published { at });
        }
        if row.try_get("parked")? {
            return Ok(RowFate::Parked);
        }
        Ok(RowFate::Pending {
            attempts: row.try_get("attempts")?,
            held: row.try_get("held")?,
            retry_later: row.try_get("retry_later")?,
        })
    }

    /// When and why row `id` of `table` was discarded, if it was.
    async fn discard_record(
        &self,
        table: &TableName,
        id: i64,
    ) -> anyhow::Result<Option<(DateTime<Utc>, String)>> {
        if !self.discards_recorded().await? {
            return Ok(None);
        }
        let row = sqlx::query(
            "SELECT discarded_at, reason FROM outbox_relay.discarded \
             WHERE table_oid = to_regclass($1)::oid::bigint AND row_id = $2",
        )
        .bind(table.quoted())
        .bind(id)
        .fetch_optional(self.pool())
        .await?;
        row.map(|r| Ok((r.try_get("discarded_at")?, r.try_get("reason")?)))
            .transpose()
    }

    /// Rows of key `key` in `q`'s table recorded as discarded.
    pub async fn discarded_of_key(&self, q: &TableSql, key: &str) -> anyhow::Result<i64> {
        if !self.discards_recorded().await? {
            return Ok(0);
        }
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM outbox_relay.discarded \
             WHERE table_oid = to_regclass($1)::oid::bigint AND ordering_key = $2",
        )
        .bind(q.table().quoted())
        .bind(key)
        .fetch_one(self.pool())
        .await?)
    }

    /// The discarded rows of `table`, most recent first, for `status --parked`.
    pub async fn discarded_rows(
        &self,
        table: &TableName,
        limit: i64,
    ) -> anyhow::Result<Vec<DiscardRecord>> {
        if !self.discards_recorded().await? {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(
            "SELECT row_id, ordering_key, dedup_key, reason, discarded_at, attempts, last_error \
             FROM outbox_relay.discarded WHERE table_oid = to_regclass($1)::oid::bigint \
             ORDER BY discarded_at DESC, row_id DESC LIMIT $2",
        )
        .bind(table.quoted())
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(DiscardRecord {
                    id: r.try_get("row_id")?,
                    ordering_key: r.try_get("ordering_key")?,
                    dedup_key: r.try_get("dedup_key")?,
                    reason: r.try_get("reason")?,
                    discarded_at: r.try_get("discarded_at")?,
                    attempts: r.try_get("attempts")?,
                    last_error: r.try_get("last_error")?,
                })
            })
            .collect()
    }

    /// Discarded rows per table (the tables' current instances; 0 for a table with none or
    /// not there), for `status` and the metrics: one probe of `outbox_relay.discarded`.
    pub async fn discarded_counts(&self, tables: &[TableName]) -> anyhow::Result<Vec<i64>> {
        if tables.is_empty() || !self.discards_recorded().await? {
            return Ok(vec![0; tables.len()]);
        }
        let names: Vec<String> = tables.iter().map(TableName::quoted).collect();
        let counts: Vec<i64> = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM outbox_relay.discarded d \
                     WHERE d.table_oid = to_regclass(t.name)::oid::bigint) \
             FROM unnest($1::text[]) WITH ORDINALITY AS t(name, n) ORDER BY t.n",
        )
        .bind(&names)
        .fetch_all(self.pool())
        .await?;
        Ok(counts)
    }

    /// True once `migrate` of this release created `outbox_relay.discarded`.
    pub(super) async fn discards_recorded(&self) -> sqlx::Result<bool> {
        sqlx::query_scalar(DISCARDED_EXISTS)
            .fetch_one(self.pool())
            .await
    }
}

/// Takes key `key`'s order-guard lock for the transaction, as the order guard and the relay's
/// hold and release do (`hashtext('schema.table')`, `hashtext(key)`): no insert of the key is
/// in progress while its rows change state, and inserts that follow see the new held_keys.
async fn lock_key(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    table: &TableName,
    key: &str,
) -> sqlx::Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1), hashtext($2))")
        .bind(table.to_string())
        .bind(key)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Puts back up to [`HOLD_CHUNK`] rows held behind key `key` (below `below`, the next parked
/// row's id, when one still holds the key), in id order; with the last chunk of a key no row
/// holds any more, its held_keys entry goes (unless a relay held it anew since, for a holder
/// of its own). Returns the rows put back.
async fn unhold_chunk(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    q: &TableSql,
    table_oid: i64,
    key: &str,
    below: Option<i64>,
    discarded: &[i64],
) -> sqlx::Result<u64> {
    let t = q.table().quoted();
    let c = q.columns();
    let sql = format!(
        "UPDATE {t} AS t SET held = false FROM ( \
             SELECT {id} AS id FROM {t} WHERE {key} = $1 AND held AND published_at IS NULL \
               AND ($2::bigint IS NULL OR {id} < $2) \
             ORDER BY {id} LIMIT {HOLD_CHUNK}) p \
         WHERE {t_id} = p.id",
        id = c.seq(""),
        key = c.key(""),
        t_id = c.seq("t"),
    );
    let moved = sqlx::query(&sql)
        .bind(key)
        .bind(below)
        .execute(&mut **tx)
        .await?
        .rows_affected();
    if below.is_none() && moved < HOLD_CHUNK as u64 {
        sqlx::query(
            "DELETE FROM outbox_relay.held_keys \
             WHERE table_oid = $1 AND ordering_key = $2 AND holder = ANY($3)",
        )
        .bind(table_oid)
        .bind(key)
        .bind(discarded)
        .execute(&mut **tx)
        .await?;
    }
    Ok(moved)
}
