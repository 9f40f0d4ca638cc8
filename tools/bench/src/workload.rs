//! The bench's rows: how they are written into an outbox table (the way a producer would,
//! through the table's id-assigning trigger), read back for the raw baseline, and checked.

use std::time::{Duration, Instant};

use anyhow::Context;
use outbox_relay::config::TableName;
use outbox_relay::message::OutboxRow;
use sqlx::postgres::PgPool;
use sqlx::Row;

pub const ROUTING_KEY: &str = "bench";
pub const EVENT_TYPE: &str = "BenchEvent";

/// A 1 KiB JSON payload, `{"n": g, "pad": "xx…"}` as PostgreSQL's jsonb prints it
/// (18 bytes of syntax + the digits of g + the padding = 1024 bytes).
const PAYLOAD_SQL: &str = "jsonb_build_object('n', g, 'pad', repeat('x', 1006 - length(g::text)))";

/// The same payload built in Rust, for producers that insert single rows.
pub fn payload(n: u64) -> String {
    let digits = n.to_string().len();
    format!(
        "{{\"n\": {n}, \"pad\": \"{}\"}}",
        "x".repeat(1006usize.saturating_sub(digits))
    )
}

/// The ordering key of row `n` among `keys`: a hash, so a batch holds some keys several times
/// and others not at all, as real traffic does.
pub fn ordering_key(n: u64, keys: u64) -> String {
    // Used by the latency producers; `seed` spreads its rows with PostgreSQL's hashint8 instead.
    let h = (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) % keys.max(1);
    format!("key-{h}")
}

/// Inserts `rows` rows with dedup keys `<tag>-0` … `<tag>-<rows-1>` in chunks of 50,000 rows
/// (one transaction each), through the table's triggers like any producer. With `published`
/// the rows are history: already marked published.
pub async fn seed(
    pool: &PgPool,
    table: &TableName,
    tag: &str,
    rows: u64,
    keys: u64,
    published: bool,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let sql = format!(
        "INSERT INTO {} (dedup_key, ordering_key, routing_key, event_type, payload, published_at) \
         SELECT $1 || '-' || g, 'key-' || ((hashint8(g)::bigint + 2147483648) % $2), $3, $4, {PAYLOAD_SQL}, \
                CASE WHEN $5 THEN now() END \
         FROM generate_series($6::bigint, $7::bigint) AS g",
        table.quoted()
    );
    const CHUNK: u64 = 50_000;
    let mut from = 0;
    while from < rows {
        let to = (from + CHUNK).min(rows) - 1;
        sqlx::query(&sql)
            .bind(tag)
            .bind(keys.max(1) as i64)
            .bind(ROUTING_KEY)
            .bind(EVENT_TYPE)
            .bind(published)
            .bind(from as i64)
            .bind(to as i64)
            .execute(pool)
            .await
            .with_context(|| format!("seeding {table}"))?;
        from = to + 1;
    }
    Ok(started.elapsed())
}

/// Empties the table (a fresh file, no dead rows left from the previous round).
pub async fn truncate(pool: &PgPool, table: &TableName) -> anyhow::Result<()> {
    sqlx::query(&format!("TRUNCATE {}", table.quoted()))
        .execute(pool)
        .await
        .with_context(|| format!("truncating {table}"))?;
    Ok(())
}

/// Removes the rows a previous round published on top of the history, and vacuums them away.
pub async fn delete_tag_prefix(
    pool: &PgPool,
    table: &TableName,
    prefix: &str,
) -> anyhow::Result<()> {
    sqlx::query(&format!(
        "DELETE FROM {} WHERE dedup_key LIKE $1 || '%'",
        table.quoted()
    ))
    .bind(prefix)
    .execute(pool)
    .await
    .with_context(|| format!("deleting the previous backlog of {table}"))?;
    vacuum_analyze(pool, table).await
}

/// Fresh statistics and visibility map, as autovacuum would leave a table at rest.
pub async fn vacuum_analyze(pool: &PgPool, table: &TableName) -> anyhow::Result<()> {
    sqlx::query(&format!("VACUUM (ANALYZE) {}", table.quoted()))
        .execute(pool)
        .await
        .with_context(|| format!("vacuuming {table}"))?;
    Ok(())
}

/// The pending rows, in id order, as the relay's fetch returns them.
pub async fn load_pending(pool: &PgPool, table: &TableName) -> anyhow::Result<Vec<OutboxRow>> {
    let sql = format!(
        "SELECT id, dedup_key, ordering_key, routing_key, event_type, payload::text AS payload, headers, \
                exchange, created_at, attempts, tableoid::bigint AS table_oid \
         FROM {} WHERE published_at IS NULL ORDER BY id",
        table.quoted()
    );
    // Decoded exactly as the relay's fetch decodes them.
    Ok(sqlx::query_as::<_, OutboxRow>(&sql).fetch_all(pool).await?)
}

/// True once no row of the table waits to be published.
pub async fn all_published(pool: &PgPool, table: &TableName) -> anyhow::Result<bool> {
    let pending: bool = sqlx::query_scalar(&format!(
        "SELECT EXISTS (SELECT 1 FROM {} WHERE published_at IS NULL)",
        table.quoted()
    ))
    .fetch_one(pool)
    .await?;
    Ok(!pending)
}

/// Rows of the table that were never published, to explain a round that did not finish.
pub async fn pending_count(pool: &PgPool, table: &TableName) -> anyhow::Result<(i64, i64)> {
    let row = sqlx::query(&format!(
        "SELECT count(*) FILTER (WHERE published_at IS NULL) AS pending, \
                count(*) FILTER (WHERE parked_at IS NOT NULL OR attempts > 0) AS failed FROM {}",
        table.quoted()
    ))
    .fetch_one(pool)
    .await?;
    Ok((row.try_get("pending")?, row.try_get("failed")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_one_kibibyte() {
        assert_eq!(payload(0).len(), 1024);
        assert_eq!(payload(123_456).len(), 1024);
    }
}
