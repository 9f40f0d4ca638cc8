//! Rows the way a producer writes them (one statement through the table's id-assigning trigger,
//! in the caller's transaction), a producer writing steadily in the background, and the
//! relay-owned state of rows read back from the table.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde_json::{json, Value};
use sqlx::postgres::PgConnection;
use sqlx::Row;

use crate::env::TestEnv;
use crate::wait::eventually;

/// A row as a producer writes it.
#[derive(Debug, Clone)]
pub struct NewRow {
    pub dedup_key: String,
    pub ordering_key: String,
    pub routing_key: String,
    pub event_type: String,
    pub payload: Value,
    pub headers: Value,
    pub exchange: Option<String>,
}

impl NewRow {
    /// A row of `ordering_key` with routing key `test.<ordering_key>`, type `TestEvent`, a small
    /// payload naming it, and no extra headers.
    pub fn new(dedup_key: impl Into<String>, ordering_key: impl Into<String>) -> NewRow {
        let dedup_key = dedup_key.into();
        let ordering_key = ordering_key.into();
        NewRow {
            routing_key: format!("test.{ordering_key}"),
            event_type: "TestEvent".into(),
            payload: json!({ "dedup_key": dedup_key, "ordering_key": ordering_key }),
            headers: json!({}),
            exchange: None,
            dedup_key,
            ordering_key,
        }
    }

    pub fn exchange(mut self, exchange: &str) -> Self {
        self.exchange = Some(exchange.into());
        self
    }

    pub fn routing_key(mut self, key: &str) -> Self {
        self.routing_key = key.into();
        self
    }

    pub fn headers(mut self, headers: Value) -> Self {
        self.headers = headers;
        self
    }

    pub fn payload(mut self, payload: Value) -> Self {
        self.payload = payload;
        self
    }

    pub fn event_type(mut self, event_type: &str) -> Self {
        self.event_type = event_type.into();
        self
    }
}

/// `count` rows over `keys` ordering keys named `<prefix>-k<n>`, round-robin, dedup keys
/// `<prefix>-<i>`.
pub fn rows_over_keys(prefix: &str, keys: usize, count: usize) -> Vec<NewRow> {
    (0..count)
        .map(|i| NewRow::new(format!("{prefix}-{i}"), format!("{prefix}-k{}", i % keys)))
        .collect()
}

/// `"schema"."table"` for a test table name.
pub fn quoted_table(table: &str) -> String {
    let (schema, name) = table.split_once('.').unwrap_or(("public", table));
    format!("\"{schema}\".\"{name}\"")
}

/// Inserts `rows` with one statement on `conn` (inside the caller's transaction, if any);
/// returns their ids in the order given.
pub async fn insert_rows(
    conn: &mut PgConnection,
    table: &str,
    rows: &[NewRow],
) -> sqlx::Result<Vec<i64>> {
    let sql = format!(
        "INSERT INTO {} (dedup_key, ordering_key, routing_key, event_type, payload, headers, exchange) \
         SELECT d, o, r, t, p, h, x \
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::jsonb[], $7::text[]) \
              WITH ORDINALITY AS u(d, o, r, t, p, h, x, n) \
         ORDER BY n \
         RETURNING id, dedup_key",
        quoted_table(table)
    );
    let column = |f: fn(&NewRow) -> String| rows.iter().map(f).collect::<Vec<_>>();
    let got = sqlx::query(&sql)
        .bind(column(|r| r.dedup_key.clone()))
        .bind(column(|r| r.ordering_key.clone()))
        .bind(column(|r| r.routing_key.clone()))
        .bind(column(|r| r.event_type.clone()))
        .bind(rows.iter().map(|r| r.payload.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.headers.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.exchange.clone()).collect::<Vec<_>>())
        .fetch_all(conn)
        .await?;
    let by_key: HashMap<String, i64> = got
        .iter()
        .map(|r| (r.get("dedup_key"), r.get("id")))
        .collect();
    Ok(rows.iter().map(|r| by_key[&r.dedup_key]).collect())
}

/// The relay-owned columns of one row.
#[derive(Debug, Clone)]
pub struct RowState {
    pub id: i64,
    pub dedup_key: String,
    pub ordering_key: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub published_at: Option<chrono::DateTime<chrono::Utc>>,
    pub parked_at: Option<chrono::DateTime<chrono::Utc>>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub created_epoch: f64,
}

impl TestEnv {
    /// Inserts `rows` in one transaction; returns their ids in the order given.
    pub async fn insert(&self, rows: &[NewRow]) -> Vec<i64> {
        let mut tx = self.pool.begin().await.expect("begin");
        let ids = insert_rows(&mut tx, &self.table, rows)
            .await
            .expect("insert outbox rows");
        tx.commit().await.expect("commit");
        ids
    }

    /// The relay-owned state of one row.
    pub async fn row(&self, id: i64) -> RowState {
        let sql = format!(
            "SELECT id, dedup_key, ordering_key, attempts, last_error, published_at, parked_at, created_at, \
                    extract(epoch FROM created_at)::float8 AS created_epoch \
             FROM {} WHERE id = $1",
            quoted_table(&self.table)
        );
        let r = sqlx::query(&sql)
            .bind(id)
            .fetch_one(&self.pool)
            .await
            .expect("read a row");
        RowState {
            id: r.get("id"),
            dedup_key: r.get("dedup_key"),
            ordering_key: r.get("ordering_key"),
            attempts: r.get("attempts"),
            last_error: r.get("last_error"),
            published_at: r.get("published_at"),
            parked_at: r.get("parked_at"),
            created_at: r.get("created_at"),
            created_epoch: r.get("created_epoch"),
        }
    }

    /// Ids of the rows marked published.
    pub async fn published_ids(&self) -> HashSet<i64> {
        let sql = format!(
            "SELECT id FROM {} WHERE published_at IS NOT NULL",
            quoted_table(&self.table)
        );
        sqlx::query_scalar::<_, i64>(&sql)
            .fetch_all(&self.pool)
            .await
            .expect("read published ids")
            .into_iter()
            .collect()
    }

    /// Number of rows not yet marked published.
    pub async fn unpublished_count(&self) -> i64 {
        let sql = format!(
            "SELECT count(*) FROM {} WHERE published_at IS NULL",
            quoted_table(&self.table)
        );
        sqlx::query_scalar(&sql)
            .fetch_one(&self.pool)
            .await
            .expect("count rows")
    }

    /// Waits until every row of the table is marked published.
    pub async fn wait_all_marked(&self) {
        eventually("every row to be marked published", || async {
            self.unpublished_count().await == 0
        })
        .await;
    }
}

/// A producer inserting rows steadily in the background (load during a fault): every `tick`,
/// one transaction of `per_tick` rows over `keys` keys named `<prefix>-k<n>`.
pub struct Producer {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<usize>,
}

impl Producer {
    pub fn start(
        env: &TestEnv,
        prefix: &str,
        keys: usize,
        per_tick: usize,
        tick: Duration,
    ) -> Producer {
        let stop = tokio_util::sync::CancellationToken::new();
        let pool = env.pool.clone();
        let table = env.table.clone();
        let prefix = prefix.to_owned();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let mut written = 0;
            while !token.is_cancelled() {
                let rows: Vec<NewRow> = (written..written + per_tick)
                    .map(|i| {
                        NewRow::new(format!("{prefix}-{i}"), format!("{prefix}-k{}", i % keys))
                    })
                    .collect();
                let mut tx = pool.begin().await.expect("begin");
                insert_rows(&mut tx, &table, &rows)
                    .await
                    .expect("insert outbox rows");
                tx.commit().await.expect("commit");
                written += per_tick;
                // The producer's pace: load during a fault, not a wait for anything.
                tokio::time::sleep(tick).await;
            }
            written
        });
        Producer { stop, task }
    }

    /// Stops producing; returns how many rows were written.
    pub async fn stop(mut self) -> usize {
        self.stop.cancel();
        (&mut self.task).await.expect("producer task")
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        // A failed test drops the producer early: stop writing into a database about to go.
        self.task.abort();
    }
}

impl TestEnv {
    /// Everything a fault test promises about the final state: all `expected` rows of the
    /// table delivered at least once, per-key order of first deliveries, one message_id per
    /// row, every row marked. Returns the number of duplicate deliveries.
    pub async fn assert_nothing_lost(&self, expected: usize) -> usize {
        self.consumer.wait_for(expected).await;
        self.wait_all_marked().await;
        let received = self.consumer.received();
        let all: HashSet<i64> =
            sqlx::query_scalar::<_, i64>(&format!("SELECT id FROM {}", quoted_table(&self.table)))
                .fetch_all(&self.pool)
                .await
                .expect("read the table's ids")
                .into_iter()
                .collect();
        assert_eq!(all.len(), expected);
        assert_eq!(
            crate::received::delivered_ids(&received),
            all,
            "every row delivered at least once"
        );
        crate::received::assert_first_deliveries_in_id_order(&received);
        crate::received::assert_duplicates_share_message_id(&received)
    }
}

impl TestEnv {
    /// `(id, xmin)` of the rows `ids` as they stand now, in id order: the row versions a relay
    /// would have read (and whose marks name them).
    pub async fn row_versions(&self, ids: &[i64]) -> Vec<(i64, i64)> {
        let sql = format!(
            "SELECT id, xmin::text::bigint FROM {} WHERE id = ANY($1) ORDER BY id",
            quoted_table(&self.table)
        );
        sqlx::query_as(&sql)
            .bind(ids)
            .fetch_all(&self.pool)
            .await
            .expect("read the rows' versions")
    }
}
