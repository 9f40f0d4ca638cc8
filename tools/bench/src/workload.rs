//! The bench's rows: how they are written into an outbox table (the way a producer would,
//! through the table's id-assigning trigger), read back for the raw baseline, and checked.

use std::time::{Duration, Instant};

use anyhow::Context;
use outbox_relay::config::TableName;
use outbox_relay::message::OutboxRow;
use sqlx::postgres::{PgConnection, PgPool};
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
    seed_range(pool, table, tag, 0..rows, keys, published).await
}

/// As [`seed`], the rows `<tag>-<from>` … `<tag>-<to-1>` of a round spread over several tables
/// (the ordering key is a hash of the index, so it does not depend on the table).
pub async fn seed_range(
    pool: &PgPool,
    table: &TableName,
    tag: &str,
    range: std::ops::Range<u64>,
    keys: u64,
    published: bool,
) -> anyhow::Result<Duration> {
    seed_with(pool, table, tag, range, keys, published, PAYLOAD_SQL).await
}

/// As [`seed_range`] with `published`, but with small payloads (`{"n": g}`, about 200 bytes a
/// row with the other columns): a long published history at a tenth of the disk space. The
/// relay never reads a published row's payload (its fetch and mark go through the indexes to
/// the pending rows), so a history's payloads only cost disk.
pub async fn seed_history(
    pool: &PgPool,
    table: &TableName,
    tag: &str,
    range: std::ops::Range<u64>,
    keys: u64,
) -> anyhow::Result<Duration> {
    seed_with(
        pool,
        table,
        tag,
        range,
        keys,
        true,
        "jsonb_build_object('n', g)",
    )
    .await
}

async fn seed_with(
    pool: &PgPool,
    table: &TableName,
    tag: &str,
    range: std::ops::Range<u64>,
    keys: u64,
    published: bool,
    payload_sql: &str,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut connection = pool.acquire().await?;
    // Each chunk is its own transaction (autocommit).
    insert_chunks(
        &mut connection,
        table,
        tag,
        range,
        keys,
        published,
        payload_sql,
    )
    .await?;
    Ok(started.elapsed())
}

/// As [`seed`], in one transaction: every row becomes visible to the relays at once, when it
/// commits. The table is analyzed in the same transaction (ANALYZE counts the transaction's own
/// rows), so the relays plan their statements for the backlog as after [`vacuum_analyze`] of
/// the other drains. Returns the moment the commit was acknowledged.
pub async fn seed_at_once(
    pool: &PgPool,
    table: &TableName,
    tag: &str,
    rows: u64,
    keys: u64,
) -> anyhow::Result<Instant> {
    let mut transaction = pool.begin().await?;
    insert_chunks(
        &mut transaction,
        table,
        tag,
        0..rows,
        keys,
        false,
        PAYLOAD_SQL,
    )
    .await?;
    sqlx::query(&format!("ANALYZE {}", table.quoted()))
        .execute(&mut *transaction)
        .await
        .with_context(|| format!("analyzing {table}"))?;
    transaction
        .commit()
        .await
        .with_context(|| format!("committing the backlog of {table}"))?;
    Ok(Instant::now())
}

/// The rows `<tag>-<from>` … `<tag>-<to-1>`, 50,000 rows a statement.
async fn insert_chunks(
    connection: &mut PgConnection,
    table: &TableName,
    tag: &str,
    range: std::ops::Range<u64>,
    keys: u64,
    published: bool,
    payload_sql: &str,
) -> anyhow::Result<()> {
    let sql = format!(
        "INSERT INTO {} (dedup_key, ordering_key, routing_key, event_type, payload, published_at) \
         SELECT $1 || '-' || g, 'key-' || ((hashint8(g)::bigint + 2147483648) % $2), $3, $4, {payload_sql}, \
                CASE WHEN $5 THEN now() END \
         FROM generate_series($6::bigint, $7::bigint) AS g",
        table.quoted()
    );
    const CHUNK: u64 = 50_000;
    let mut from = range.start;
    while from < range.end {
        let to = (from + CHUNK).min(range.end) - 1;
        sqlx::query(&sql)
            .bind(tag)
            .bind(keys.max(1) as i64)
            .bind(ROUTING_KEY)
            .bind(EVENT_TYPE)
            .bind(published)
            .bind(from as i64)
            .bind(to as i64)
            .execute(&mut *connection)
            .await
            .with_context(|| format!("seeding {table}"))?;
        from = to + 1;
    }
    Ok(())
}

/// Queues `rows` rows on one ordering key in one statement (dedup keys `<tag>-1` …), with
/// small payloads (`{"n": g}`): what piles up behind a key that is held back. Through the
/// table's triggers, so with a held key they start out held. Returns the largest id.
pub async fn queue_on_key(
    pool: &PgPool,
    table: &TableName,
    tag: &str,
    key: &str,
    rows: u64,
) -> anyhow::Result<i64> {
    let sql = format!(
        "WITH queued AS ( \
             INSERT INTO {} (dedup_key, ordering_key, routing_key, event_type, payload) \
             SELECT $1 || '-' || g, $2, $3, $4, jsonb_build_object('n', g) \
             FROM generate_series(1, $5::bigint) AS g RETURNING id) \
         SELECT coalesce(max(id), 0) FROM queued",
        table.quoted()
    );
    sqlx::query_scalar(&sql)
        .bind(tag)
        .bind(key)
        .bind(ROUTING_KEY)
        .bind(EVENT_TYPE)
        .bind(rows as i64)
        .fetch_one(pool)
        .await
        .with_context(|| format!("queueing {rows} rows on one key of {table}"))
}

/// Inserts one row of `key` (1 KiB payload), with its own routing key and exchange when given:
/// the head row that holds its key back. Returns its id.
pub async fn insert_head(
    pool: &PgPool,
    table: &TableName,
    dedup_key: &str,
    key: &str,
    routing_key: &str,
    exchange: Option<&str>,
) -> anyhow::Result<i64> {
    let sql = format!(
        "INSERT INTO {} (dedup_key, ordering_key, routing_key, event_type, payload, exchange) \
         SELECT $1, $2, $3, $4, {PAYLOAD_SQL}, $5 FROM (SELECT 0::bigint AS g) AS one RETURNING id",
        table.quoted()
    );
    sqlx::query_scalar(&sql)
        .bind(dedup_key)
        .bind(key)
        .bind(routing_key)
        .bind(EVENT_TYPE)
        .bind(exchange)
        .fetch_one(pool)
        .await
        .with_context(|| format!("inserting the head row of {table}"))
}

/// The insert one producer of the producers scenario commits, one row a transaction: a random
/// dedup key, one of 1,000 ordering keys, a small payload, all made by the server. The routing
/// key and event type are the bench's, so the relay's messages reach the bench queue (it
/// publishes `mandatory`: a message no queue takes is refused and retried).
pub fn producer_insert_sql(table: &TableName) -> String {
    format!(
        "INSERT INTO {} (dedup_key, ordering_key, routing_key, event_type, payload) \
         VALUES (md5(random()::text || clock_timestamp()::text), 'k' || (1 + floor(random() * 1000))::int, \
                 '{ROUTING_KEY}', '{EVENT_TYPE}', '{{\"a\":1}}')",
        table.quoted()
    )
}

/// Creates `plain`, the outbox table `outbox` as an application's own table would be without
/// the relay: the same columns, defaults and indexes, no triggers, and an id of its own (LIKE
/// copies neither the identity nor a default, so the copy never draws from the outbox's
/// sequence).
pub async fn create_plain_copy(
    pool: &PgPool,
    outbox: &TableName,
    plain: &TableName,
) -> anyhow::Result<()> {
    let (outbox, plain) = (outbox.quoted(), plain.quoted());
    sqlx::raw_sql(&format!(
        "CREATE TABLE {plain} (LIKE {outbox} INCLUDING DEFAULTS INCLUDING INDEXES); \
         ALTER TABLE {plain} ALTER COLUMN id DROP DEFAULT, \
                             ALTER COLUMN id ADD GENERATED BY DEFAULT AS IDENTITY;"
    ))
    .execute(pool)
    .await
    .with_context(|| format!("creating {plain} like {outbox}"))?;
    Ok(())
}

/// The user triggers on the table (the relay's order guard and NOTIFY trigger), by name.
pub async fn triggers(pool: &PgPool, table: &TableName) -> anyhow::Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT tgname::text FROM pg_trigger WHERE tgrelid = $1::regclass AND NOT tgisinternal ORDER BY tgname",
    )
    .bind(table.quoted())
    .fetch_all(pool)
    .await?)
}

/// Rows of the table not published yet, counted through the pending rows' index.
pub async fn unpublished(pool: &PgPool, table: &TableName) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {} WHERE published_at IS NULL",
        table.quoted()
    ))
    .fetch_one(pool)
    .await?)
}

/// Empties every table in one statement.
pub async fn truncate_all(pool: &PgPool, tables: &[TableName]) -> anyhow::Result<()> {
    let list: Vec<String> = tables.iter().map(|t| t.quoted()).collect();
    sqlx::query(&format!("TRUNCATE {}", list.join(", ")))
        .execute(pool)
        .await
        .context("truncating the tables")?;
    Ok(())
}

/// [`vacuum_analyze`] of every table, in one statement.
pub async fn vacuum_analyze_all(pool: &PgPool, tables: &[TableName]) -> anyhow::Result<()> {
    let list: Vec<String> = tables.iter().map(|t| t.quoted()).collect();
    sqlx::query(&format!("VACUUM (ANALYZE) {}", list.join(", ")))
        .execute(pool)
        .await
        .context("vacuuming the tables")?;
    Ok(())
}

/// One statement that is true while any of the tables has a row waiting to be published.
pub fn any_unpublished_sql(tables: &[TableName]) -> String {
    let probes: Vec<String> = tables
        .iter()
        .map(|t| {
            format!(
                "EXISTS (SELECT 1 FROM {} WHERE published_at IS NULL)",
                t.quoted()
            )
        })
        .collect();
    format!("SELECT {}", probes.join(" OR "))
}

/// Runs a statement of one boolean (such as [`any_unpublished_sql`]).
pub async fn ask(pool: &PgPool, sql: &str) -> anyhow::Result<bool> {
    Ok(sqlx::query_scalar(sql).fetch_one(pool).await?)
}

/// Empties the table (a fresh file, no dead rows left from the previous round).
pub async fn truncate(pool: &PgPool, table: &TableName) -> anyhow::Result<()> {
    sqlx::query(&format!("TRUNCATE {}", table.quoted()))
        .execute(pool)
        .await
        .with_context(|| format!("truncating {table}"))?;
    Ok(())
}

/// The largest id in the table (0 when empty).
pub async fn max_id(pool: &PgPool, table: &TableName) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(&format!(
        "SELECT coalesce(max(id), 0) FROM {}",
        table.quoted()
    ))
    .fetch_one(pool)
    .await?)
}

/// Removes the rows a previous round published on top of the history (every id above
/// `history_top`, found through the primary key), and vacuums them away.
pub async fn delete_above(
    pool: &PgPool,
    table: &TableName,
    history_top: i64,
) -> anyhow::Result<()> {
    sqlx::query(&format!("DELETE FROM {} WHERE id > $1", table.quoted()))
        .bind(history_top)
        .execute(pool)
        .await
        .with_context(|| format!("deleting the previous backlog of {table}"))?;
    vacuum_analyze(pool, table).await
}

/// The table's size on disk with its indexes and TOAST, in bytes.
pub async fn total_bytes(pool: &PgPool, table: &TableName) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT pg_total_relation_size($1::regclass)")
            .bind(table.quoted())
            .fetch_one(pool)
            .await?,
    )
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
        "SELECT {} FROM {} WHERE published_at IS NULL ORDER BY id",
        outbox_relay::store::Columns::default().select_list(""),
        table.quoted()
    );
    // Decoded exactly as the relay's fetch decodes them.
    Ok(sqlx::query_as::<_, OutboxRow>(&sql).fetch_all(pool).await?)
}

/// True once no row of the table waits to be published.
pub async fn all_published(pool: &PgPool, table: &TableName) -> anyhow::Result<bool> {
    all_published_above(pool, table, 0).await
}

/// True once no row with an id above `floor` waits to be published. Read through the primary
/// key from `floor` up: beside a published history below `floor`, `published_at IS NULL` alone
/// matches no index and would read the whole history on every call.
pub async fn all_published_above(
    pool: &PgPool,
    table: &TableName,
    floor: i64,
) -> anyhow::Result<bool> {
    let pending: bool = sqlx::query_scalar(&format!(
        "SELECT EXISTS (SELECT 1 FROM {} WHERE id > $1 AND published_at IS NULL)",
        table.quoted()
    ))
    .bind(floor)
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
