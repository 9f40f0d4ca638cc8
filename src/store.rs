//! All SQL: migrations, fetching due rows, marking them, status and retry, and the per-table
//! advisory lock that keeps one relay active per table. Must not touch AMQP.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, FromRow, Row};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{quote_ident, OnExhausted, PostgresSettings, TableName};
use crate::message::OutboxRow;

const RELAY_SCHEMA_SQL: &str = include_str!("../migrations/0000_relay_schema.sql");

/// Per-table migrations: (version, description, SQL template).
const TABLE_MIGRATIONS: &[(i32, &str, &str)] = &[(
    1,
    "outbox table, indexes and order guard",
    include_str!("../migrations/0001_outbox_table.sql"),
)];

type PingUntil = Arc<std::sync::Mutex<Option<std::time::Instant>>>;

/// The database side of the relay: a small pool for fetch, mark, status and retry.
#[derive(Clone)]
pub struct Store {
    pool: PgPool,
    /// Until when pooled connections are pinged before use (see [`Store::distrust_connections`]).
    ping_until: PingUntil,
    /// How long the relay's statements may wait for an answer (see [`answered_within`]).
    answer_within: Duration,
}

impl Store {
    /// Connects the pool. Sessions carry `application_name = outbox-relay` and the configured
    /// `statement_timeout`, so a silent server fails a statement instead of hanging it.
    pub async fn connect(settings: &PostgresSettings) -> anyhow::Result<Store> {
        let (options, ping_until) = pool_options(settings);
        let pool = options
            .connect_with(connect_options(settings)?)
            .await
            // The server's words once, with their SQLSTATE (sqlx's own text repeats them).
            .map_err(|e| anyhow::anyhow!(db_message(&e)))
            .with_context(|| {
                format!(
                    "cannot connect to PostgreSQL at {}",
                    settings.url.redacted()
                )
            })?;
        Ok(Store {
            pool,
            ping_until,
            answer_within: answer_deadline(settings),
        })
    }

    /// Builds the pool without connecting; connections are made on first use.
    pub fn connect_lazy(settings: &PostgresSettings) -> anyhow::Result<Store> {
        let (options, ping_until) = pool_options(settings);
        let pool = options.connect_lazy_with(connect_options(settings)?);
        Ok(Store {
            pool,
            ping_until,
            answer_within: answer_deadline(settings),
        })
    }

    /// After a database error: for the next few seconds, ping each pooled connection before
    /// using it and replace the ones that fail. One terminated session or server restart
    /// leaves every idle connection dead; without this each would fail one statement, and
    /// the relay's backoff would grow with every one of them.
    pub fn distrust_connections(&self) {
        if let Ok(mut until) = self.ping_until.lock() {
            *until = Some(std::time::Instant::now() + Duration::from_secs(5));
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Creates the relay's schema and every missing outbox table, applies pending per-table
    /// migrations, and installs or drops the NOTIFY trigger to match `notify`.
    pub async fn migrate(&self, tables: &[TableName], notify: bool) -> anyhow::Result<Vec<String>> {
        let mut tx = self.pool.begin().await?;
        // Two `migrate` runs at once would race on CREATE OR REPLACE; serialize them.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('outbox_relay:migrate', 0))")
            .execute(&mut *tx)
            .await?;
        sqlx::raw_sql(RELAY_SCHEMA_SQL)
            .execute(&mut *tx)
            .await
            .context("creating the outbox_relay schema")?;
        let mut applied = Vec::new();
        for table in tables {
            let q = TableSql::new(table, OnExhausted::HoldKey);
            sqlx::raw_sql(&format!(
                "CREATE SCHEMA IF NOT EXISTS {}",
                quote_ident(&table.schema)
            ))
            .execute(&mut *tx)
            .await?;
            // A table dropped since its last migrate starts over from version 1.
            sqlx::query(
                "DELETE FROM outbox_relay.migrations WHERE table_name = $1 AND to_regclass($2) IS NULL",
            )
            .bind(table.to_string())
            .bind(table.quoted())
            .execute(&mut *tx)
            .await?;
            let done: Vec<i32> = sqlx::query_scalar(
                "SELECT version FROM outbox_relay.migrations WHERE table_name = $1",
            )
            .bind(table.to_string())
            .fetch_all(&mut *tx)
            .await?;
            for (version, description, template) in TABLE_MIGRATIONS {
                if done.contains(version) {
                    continue;
                }
                sqlx::raw_sql(&q.render(template))
                    .execute(&mut *tx)
                    .await
                    .with_context(|| format!("migration {version} ({description}) of {table}"))?;
                sqlx::query(
                    "INSERT INTO outbox_relay.migrations (table_name, version, description) VALUES ($1, $2, $3)",
                )
                .bind(table.to_string())
                .bind(version)
                .bind(description)
                .execute(&mut *tx)
                .await?;
                applied.push(format!("{table}: {version} {description}"));
            }
            let trigger = quote_ident(&table.derived("notify"));
            let mut sql = format!("DROP TRIGGER IF EXISTS {trigger} ON {};", table.quoted());
            if notify {
                sql += &format!(
                    "CREATE TRIGGER {trigger} AFTER INSERT ON {} FOR EACH STATEMENT \
                     EXECUTE FUNCTION outbox_relay.notify('{}');",
                    table.quoted(),
                    q.notify_channel
                );
            }
            sqlx::raw_sql(&sql).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(applied)
    }

    /// Fails with a clear message when `table` is missing or lacks the relay's columns.
    pub async fn check_table(&self, table: &TableName) -> anyhow::Result<()> {
        let sql = format!(
            "SELECT id, dedup_key, ordering_key, routing_key, event_type, payload, headers, exchange, \
             created_at, attempts, next_attempt_at, last_error, published_at, parked_at FROM {} LIMIT 0",
            table.quoted()
        );
        sqlx::query(&sql).execute(&self.pool).await.map_err(|e| {
            anyhow::anyhow!(
                "outbox table {table} is not usable: {} (run `outbox-relay migrate`)",
                db_message(&e)
            )
        })?;
        Ok(())
    }

    /// Due rows of `table` in id order that no earlier row of their key holds back, except
    /// `exclude` (confirmed rows whose mark is still being written). Returns nothing unless
    /// `lock`'s session still holds the table's lock.
    pub async fn fetch_due(
        &self,
        q: &TableSql,
        lock: &LockGuard,
        limit: u32,
        exclude: &[i64],
    ) -> sqlx::Result<Vec<OutboxRow>> {
        let query = sqlx::query(&q.fetch)
            .bind(limit as i64)
            .bind(lock.pid)
            .bind(lock.classid)
            .bind(lock.objid)
            .bind(exclude)
            // Rows above every excluded id skip the (linear, in a generic plan) array check.
            .bind(exclude.iter().copied().max().unwrap_or(i64::MIN));
        let rows = answered_within(self.answer_within, query.fetch_all(&self.pool)).await?;
        rows.iter().map(OutboxRow::from_row).collect()
    }

    /// Marks confirmed rows published, in one statement.
    pub async fn mark_published(
        &self,
        q: &TableSql,
        ids: &[i64],
        table_oid: i64,
    ) -> sqlx::Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let query = sqlx::query(&q.mark_published).bind(ids).bind(table_oid);
        let done = answered_within(self.answer_within, query.execute(&self.pool)).await?;
        Ok(done.rows_affected())
    }

    /// Records failed publishes in one statement: attempts + 1, the error, the next attempt
    /// time, and `parked_at` for rows that are parked.
    pub async fn record_failures(
        &self,
        q: &TableSql,
        failures: &[Failure],
        table_oid: i64,
    ) -> sqlx::Result<()> {
        if failures.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = failures.iter().map(|f| f.id).collect();
        let errors: Vec<&str> = failures.iter().map(|f| f.error.as_str()).collect();
        let delays: Vec<f64> = failures
            .iter()
            .map(|f| f.retry_after.map_or(0.0, |d| d.as_secs_f64() * 1000.0))
            .collect();
        let parks: Vec<bool> = failures.iter().map(|f| f.retry_after.is_none()).collect();
        let query = sqlx::query(&q.record_failures)
            .bind(&ids)
            .bind(&errors)
            .bind(&delays)
            .bind(&parks)
            .bind(table_oid);
        answered_within(self.answer_within, query.execute(&self.pool)).await?;
        Ok(())
    }

    /// Counts for `outbox-relay status`.
    pub async fn status(&self, table: &TableName) -> anyhow::Result<TableStatus> {
        let sql = format!(
            "SELECT count(*) FILTER (WHERE published_at IS NULL AND parked_at IS NULL) AS pending, \
                    count(*) FILTER (WHERE published_at IS NULL AND parked_at IS NULL AND next_attempt_at <= now()) AS due, \
                    count(*) FILTER (WHERE published_at IS NULL AND parked_at IS NOT NULL) AS parked, \
                    count(*) FILTER (WHERE published_at IS NOT NULL) AS published, \
                    extract(epoch FROM now() - min(created_at) FILTER (WHERE published_at IS NULL AND parked_at IS NULL))::float8 AS oldest \
             FROM {}",
            table.quoted()
        );
        let row = sqlx::query(&sql)
            .fetch_one(&self.pool)
            .await
            .with_context(|| format!("reading the status of {table}"))?;
        Ok(TableStatus {
            table: table.clone(),
            pending: row.try_get("pending")?,
            due: row.try_get("due")?,
            parked: row.try_get("parked")?,
            published: row.try_get("published")?,
            oldest_pending: row
                .try_get::<Option<f64>, _>("oldest")?
                .map(|s| Duration::from_secs_f64(s.max(0.0))),
        })
    }

    /// Parked rows with their errors, oldest first, for `status --parked`.
    pub async fn parked_rows(
        &self,
        table: &TableName,
        limit: i64,
    ) -> anyhow::Result<Vec<ParkedRow>> {
        let sql = format!(
            "SELECT id, ordering_key, dedup_key, attempts, coalesce(last_error, '') AS last_error \
             FROM {} WHERE published_at IS NULL AND parked_at IS NOT NULL ORDER BY id LIMIT $1",
            table.quoted()
        );
        let rows = sqlx::query(&sql).bind(limit).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                Ok(ParkedRow {
                    id: r.try_get("id")?,
                    ordering_key: r.try_get("ordering_key")?,
                    dedup_key: r.try_get("dedup_key")?,
                    attempts: r.try_get("attempts")?,
                    last_error: r.try_get("last_error")?,
                })
            })
            .collect()
    }

    /// Un-parks the selected rows (attempts back to 0, due now) and wakes the relay.
    pub async fn retry(&self, table: &TableName, selector: &RetrySelector) -> anyhow::Result<u64> {
        let base = format!(
            "UPDATE {} SET parked_at = NULL, attempts = 0, next_attempt_at = now() \
             WHERE published_at IS NULL AND parked_at IS NOT NULL",
            table.quoted()
        );
        let sql = match selector {
            RetrySelector::All => format!("{base} RETURNING id"),
            RetrySelector::Id(_) => format!("{base} AND id = $1 RETURNING id"),
            RetrySelector::Key(_) => format!("{base} AND ordering_key = $1 RETURNING id"),
        };
        let query = sqlx::query_scalar::<_, i64>(&sql);
        let query = match selector {
            RetrySelector::All => query,
            RetrySelector::Id(id) => query.bind(*id),
            RetrySelector::Key(key) => query.bind(key.as_str()),
        };
        let mut tx = self.pool.begin().await?;
        let ids = query
            .fetch_all(&mut *tx)
            .await
            .with_context(|| format!("releasing parked rows of {table}"))?;
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(TableSql::notify_channel(table))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(ids.len() as u64)
    }

    /// Opens the dedicated session that may hold `table`'s advisory lock and LISTEN for its hint.
    pub async fn open_lock(&self, table: &TableName, listen: bool) -> sqlx::Result<LockSession> {
        let open = async {
            let mut listener = PgListener::connect_with(&self.pool).await?;
            // The pool may close while we wait; the lock session lives until the relay drops it.
            listener.ignore_pool_close_event(true);
            let key: i64 = sqlx::query_scalar("SELECT hashtextextended($1, 0)")
                .bind(format!("outbox_relay:{table}"))
                .fetch_one(&mut listener)
                .await?;
            Ok(LockSession {
                listener,
                channel: listen.then(|| TableSql::notify_channel(table)),
                key,
                answer_within: self.answer_within,
            })
        };
        answered_within(self.answer_within, open).await
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// The client's own deadline for a statement's answer: `statement_timeout` plus 2 s for the
/// server's cancellation to arrive.
fn answer_deadline(settings: &PostgresSettings) -> Duration {
    settings.statement_timeout + Duration::from_secs(2)
}

/// Bounds a statement by the client's clock. `statement_timeout` works only while the server
/// hears the client: over a network that went silent (connection open, nothing arriving) a
/// statement would wait for TCP to give up, many minutes. Past the deadline it fails like a
/// lost connection, and the relay backs off and reconnects.
async fn answered_within<T>(
    deadline: Duration,
    statement: impl std::future::Future<Output = sqlx::Result<T>>,
) -> sqlx::Result<T> {
    match tokio::time::timeout(deadline, statement).await {
        Ok(result) => result,
        Err(_) => Err(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "no answer from PostgreSQL within {} (statement_timeout + 2s): the server or the network is silent",
                humantime::format_duration(deadline)
            ),
        ))),
    }
}

/// The pool's options. No ping before each statement in normal operation (it would cost a
/// round trip per statement); only while [`Store::distrust_connections`] asks for it.
fn pool_options(settings: &PostgresSettings) -> (PgPoolOptions, PingUntil) {
    let ping_until = PingUntil::default();
    let until = ping_until.clone();
    let options = PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .test_before_acquire(false)
        .before_acquire(move |conn, _| {
            let ping = until
                .lock()
                .ok()
                .and_then(|u| *u)
                .is_some_and(|u| std::time::Instant::now() < u);
            Box::pin(async move { Ok(!ping || sqlx::Connection::ping(conn).await.is_ok()) })
        })
        .acquire_timeout(settings.connect_timeout);
    (options, ping_until)
}

fn connect_options(settings: &PostgresSettings) -> anyhow::Result<PgConnectOptions> {
    let options: PgConnectOptions = settings.url.expose().parse().map_err(|_| {
        anyhow::anyhow!(
            "postgres.url is not a valid PostgreSQL URL: {}",
            settings.url.redacted()
        )
    })?;
    let timeout_ms = settings.statement_timeout.as_millis().to_string();
    Ok(options
        .application_name("outbox-relay")
        .options([
            ("statement_timeout", timeout_ms.as_str()),
            ("client_min_messages", "warning"),
        ])
        .log_statements(tracing::log::LevelFilter::Trace)
        .log_slow_statements(tracing::log::LevelFilter::Debug, Duration::from_secs(1)))
}

/// The text of a database error, without the client library's wrapping.
pub fn db_message(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => match db.code() {
            Some(code) => format!("{} (SQLSTATE {code})", db.message()),
            None => db.message().to_owned(),
        },
        other => other.to_string(),
    }
}

/// True for errors a reconnect does not fix: the table, a column, a schema or a privilege the
/// relay needs is missing (SQLSTATE classes 42 and 3F), as opposed to a server that is down.
pub fn is_schema_error(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db)
        if db.code().is_some_and(|c| c.starts_with("42") || c.starts_with("3F")))
}

/// Decodes a row selected with the columns of the fetch (`payload` as text).
impl<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> for OutboxRow {
    fn from_row(r: &'r sqlx::postgres::PgRow) -> sqlx::Result<Self> {
        let payload: String = r.try_get("payload")?;
        Ok(OutboxRow {
            id: r.try_get("id")?,
            dedup_key: r.try_get("dedup_key")?,
            ordering_key: r.try_get("ordering_key")?,
            routing_key: r.try_get("routing_key")?,
            event_type: r.try_get("event_type")?,
            payload: payload.into_bytes(),
            headers: r.try_get("headers")?,
            exchange: r.try_get("exchange")?,
            created_at: r.try_get("created_at")?,
            attempts: r.try_get("attempts")?,
            table_oid: r.try_get("table_oid").unwrap_or(0),
        })
    }
}

/// A failed publish to record.
#[derive(Debug, Clone)]
pub struct Failure {
    pub id: i64,
    pub error: String,
    /// `None` parks the row.
    pub retry_after: Option<Duration>,
}

#[derive(Debug, Clone)]
pub enum RetrySelector {
    All,
    Id(i64),
    Key(String),
}

#[derive(Debug, Clone)]
pub struct TableStatus {
    pub table: TableName,
    pub pending: i64,
    pub due: i64,
    pub parked: i64,
    pub published: i64,
    pub oldest_pending: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct ParkedRow {
    pub id: i64,
    pub ordering_key: String,
    pub dedup_key: String,
    pub attempts: i32,
    pub last_error: String,
}

/// The statements for one table, rendered once with its quoted name.
#[derive(Debug, Clone)]
pub struct TableSql {
    table: TableName,
    notify_channel: String,
    fetch: String,
    mark_published: String,
    record_failures: String,
}

impl TableSql {
    pub fn new(table: &TableName, on_exhausted: OnExhausted) -> Self {
        let t = table.quoted();
        // A row is held back by an earlier row of its key that waits for a retry, or (with
        // hold_key) is parked. Such rows are few and sit in the small `failed` index, so the
        // check is one probe of an almost empty index per candidate row.
        let holds_back = match on_exhausted {
            OnExhausted::HoldKey => "(e.parked_at IS NOT NULL OR e.next_attempt_at > now())",
            OnExhausted::Skip => "(e.parked_at IS NULL AND e.next_attempt_at > now())",
        };
        let fetch = format!(
            "SELECT o.id, o.dedup_key, o.ordering_key, o.routing_key, o.event_type, o.payload::text AS payload, \
                    o.headers, o.exchange, o.created_at, o.attempts, o.tableoid::bigint AS table_oid \
             FROM {t} o \
             WHERE o.published_at IS NULL AND o.parked_at IS NULL AND o.next_attempt_at <= now() \
               AND NOT EXISTS ( \
                   SELECT 1 FROM {t} e \
                   WHERE e.ordering_key = o.ordering_key AND e.id < o.id \
                     AND e.published_at IS NULL AND (e.parked_at IS NOT NULL OR e.attempts > 0) \
                     AND {holds_back}) \
               AND EXISTS ( \
                   SELECT 1 FROM pg_locks l \
                   WHERE l.locktype = 'advisory' AND l.pid = $2 AND l.granted AND l.objsubid = 1 \
                     AND l.classid::bigint = $3 AND l.objid::bigint = $4) \
               AND (o.id > $6 OR o.id <> ALL($5::bigint[])) \
             ORDER BY o.id LIMIT $1"
        );
        let mark_published = format!(
            "UPDATE {t} SET published_at = now() WHERE id = ANY($1) AND published_at IS NULL AND tableoid::bigint = $2"
        );
        let record_failures = format!(
            "UPDATE {t} AS t SET attempts = t.attempts + 1, last_error = f.error, \
                    next_attempt_at = now() + f.delay_ms * interval '1 millisecond', \
                    parked_at = CASE WHEN f.park THEN now() END \
             FROM unnest($1::bigint[], $2::text[], $3::float8[], $4::bool[]) AS f(id, error, delay_ms, park) \
             WHERE t.id = f.id AND t.published_at IS NULL AND t.tableoid::bigint = $5"
        );
        Self {
            table: table.clone(),
            notify_channel: Self::notify_channel(table),
            fetch,
            mark_published,
            record_failures,
        }
    }

    /// The LISTEN channel of `table`'s insert trigger.
    pub fn notify_channel(table: &TableName) -> String {
        table.derived("notify")
    }

    pub fn table(&self) -> &TableName {
        &self.table
    }

    fn render(&self, template: &str) -> String {
        let t = &self.table;
        template
            .replace("{table}", &t.quoted())
            .replace("{due_index}", &quote_ident(&t.derived("due")))
            .replace("{failed_index}", &quote_ident(&t.derived("failed")))
            .replace("{dedup_index}", &quote_ident(&t.derived("dedup_key")))
            .replace("{order_trigger}", &quote_ident(&t.derived("order")))
    }
}

/// Identifies the lock holder's session for the fetch's guard.
#[derive(Debug, Clone, Copy)]
pub struct LockGuard {
    pid: i32,
    classid: i64,
    objid: i64,
}

/// A dedicated session that may take a table's advisory lock (one active relay per table).
/// A standby keeps it and tries again every poll interval.
pub struct LockSession {
    listener: PgListener,
    channel: Option<String>,
    key: i64,
    answer_within: Duration,
}

impl LockSession {
    /// Tries to take the lock without waiting. On success the session is handed to a watcher
    /// task that LISTENs for the insert hint and notices at once when the session dies.
    pub async fn try_acquire(mut self) -> sqlx::Result<Result<TableLock, LockSession>> {
        let query = sqlx::query("SELECT pg_try_advisory_lock($1) AS got, pg_backend_pid() AS pid")
            .bind(self.key);
        let row = answered_within(self.answer_within, query.fetch_one(&mut self.listener)).await?;
        if !row.try_get::<bool, _>("got")? {
            return Ok(Err(self));
        }
        if let Some(channel) = &self.channel {
            answered_within(self.answer_within, self.listener.listen(channel)).await?;
        }
        let guard = LockGuard {
            pid: row.try_get("pid")?,
            classid: (self.key as u64 >> 32) as i64,
            objid: (self.key as u64 & 0xffff_ffff) as i64,
        };
        let wake = Arc::new(Notify::new());
        let lost = CancellationToken::new();
        let release = CancellationToken::new();
        let watcher = tokio::spawn(watch_lock_session(
            self.listener,
            self.key,
            wake.clone(),
            lost.clone(),
            release.clone(),
        ));
        Ok(Ok(TableLock {
            guard,
            wake,
            lost,
            release,
            watcher,
        }))
    }
}

/// Owns the lock session: turns notifications into wake-ups and the session's end into `lost`.
async fn watch_lock_session(
    mut listener: PgListener,
    key: i64,
    wake: Arc<Notify>,
    lost: CancellationToken,
    release: CancellationToken,
) {
    loop {
        tokio::select! {
            received = listener.try_recv() => match received {
                // Notifications that pile up while the relay is busy collapse into one wake-up.
                Ok(Some(_)) => wake.notify_one(),
                // The session died and the lock with it; try_recv would reconnect, we don't.
                Ok(None) | Err(_) => {
                    lost.cancel();
                    return;
                }
            },
            _ = release.cancelled() => {
                let _ = sqlx::query("SELECT pg_advisory_unlock($1)").bind(key).execute(&mut listener).await;
                return;
            }
        }
    }
}

/// A held table lock. If its session ends, [`TableLock::is_lost`] turns true at once and the
/// fetch's guard returns nothing, so a relay that lost its lock stops publishing.
pub struct TableLock {
    guard: LockGuard,
    wake: Arc<Notify>,
    lost: CancellationToken,
    release: CancellationToken,
    watcher: tokio::task::JoinHandle<()>,
}

/// What ended a wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    Notified,
    Timeout,
    /// The lock session died; the lock is gone.
    Lost,
}

impl TableLock {
    pub fn guard(&self) -> LockGuard {
        self.guard
    }

    pub fn is_lost(&self) -> bool {
        self.lost.is_cancelled()
    }

    /// Waits for an insert notification, the lock's loss, or `timeout`.
    pub async fn wait(&self, timeout: Duration) -> Wake {
        tokio::select! {
            _ = self.wake.notified() => Wake::Notified,
            _ = self.lost.cancelled() => Wake::Lost,
            _ = tokio::time::sleep(timeout) => Wake::Timeout,
        }
    }

    /// Resolves on the next insert notification (or at once if one arrived unseen).
    pub async fn notified(&self) {
        self.wake.notified().await
    }

    /// Releases the lock and ends the session.
    pub async fn release(self) {
        self.release.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.watcher).await;
    }
}
