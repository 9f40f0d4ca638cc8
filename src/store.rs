//! All SQL: migrations, fetching due rows, marking (or deleting) them, recording failures,
//! holding and releasing keys, the retention sweep, status and retry; the coordination session
//! (every table's lock, LISTEN and poll) is in [`coordination`]. Must not touch AMQP.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, FromRow, Row, TypeInfo, ValueRef};

use crate::config::{
    quote_ident, OnExhausted, OnPublished, OutboxSettings, PostgresSettings, TableName,
};
use chrono::{DateTime, Utc};

use crate::message::{OutboxRow, Unpublishable};
use crate::tls::TlsCheck;

/// How often `migrate` tries its transaction when a lock it needs is busy or PostgreSQL ends it
/// as a deadlock victim.
const MIGRATE_ATTEMPTS: u32 = 20;

/// True when `e` is a lock `migrate` could not take in time (SQLSTATE 55P03, its
/// `lock_timeout`) or PostgreSQL ending its transaction as a deadlock victim (40P01): either
/// way the transaction changed nothing and can be tried again. Decided on the code.
fn is_lock_conflict(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<sqlx::Error>(),
            Some(sqlx::Error::Database(db))
                if matches!(db.code().as_deref(), Some("40P01" | "55P03"))
        )
    })
}

const RELAY_SCHEMA_SQL: &str = include_str!("../migrations/0000_relay_schema.sql");

/// Per-table migrations: (version, description, SQL template).
const TABLE_MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "outbox table, indexes and order guard",
        include_str!("../migrations/0001_outbox_table.sql"),
    ),
    (
        2,
        "rows behind held keys leave the due index",
        include_str!("../migrations/0002_held_keys.sql"),
    ),
    (
        3,
        "ordering keys longer than 1024 bytes are refused at insert",
        include_str!("../migrations/0003_ordering_key_length.sql"),
    ),
    (
        4,
        "empty dedup and ordering keys are refused at insert",
        include_str!("../migrations/0004_keys_not_empty.sql"),
    ),
    (
        5,
        "ordering keys over 1024 bytes in rows from before migration 3 can be marked",
        include_str!("../migrations/0005_key_length_spares_old_rows.sql"),
    ),
];

/// Gives `table`'s order guard its id sequence as the trigger's argument (what
/// `outbox_relay.order_guard_v2` draws ids from without a catalog lookup per row), when it does
/// not name it already: a table made by an earlier release, or one whose identity sequence
/// changed. The trigger is made again (a lock on the table for milliseconds, bounded by the
/// transaction's lock_timeout); with its argument right, nothing is locked. Says what it did.
async fn name_the_id_sequence(
    tx: &mut sqlx::PgConnection,
    table: &TableName,
) -> anyhow::Result<Option<String>> {
    let found: Option<(Option<String>, Vec<u8>)> = sqlx::query_as(
        "SELECT pg_get_serial_sequence($1, 'id'), t.tgargs FROM pg_trigger t \
         WHERE t.tgrelid = to_regclass($1) AND t.tgname = $2 \
           AND t.tgfoid = to_regproc('outbox_relay.order_guard_v2')",
    )
    .bind(table.quoted())
    .bind(table.derived("order"))
    .fetch_optional(&mut *tx)
    .await?;
    // No guard of this release's kind, or no identity sequence: the guard looks it up per row.
    let Some((Some(sequence), args)) = found else {
        return Ok(None);
    };
    // pg_trigger keeps each argument followed by a zero byte.
    if args == format!("{sequence}\0").into_bytes() {
        return Ok(None);
    }
    let trigger = quote_ident(&table.derived("order"));
    let t = table.quoted();
    sqlx::raw_sql(&format!(
        "DROP TRIGGER {trigger} ON {t}; \
         CREATE TRIGGER {trigger} BEFORE INSERT ON {t} \
             FOR EACH ROW EXECUTE FUNCTION outbox_relay.order_guard_v2({})",
        columns::literal(&sequence)
    ))
    .execute(&mut *tx)
    .await?;
    Ok(Some(format!(
        "{table}: the order guard {} draws ids from {sequence} without a lookup per row",
        table.derived("order")
    )))
}

/// SQLSTATE of a call to a function that does not exist.
const UNDEFINED_FUNCTION: &str = "42883";

/// The longest ordering key (in bytes) a relay-made table accepts (migration 3).
pub const MAX_ORDERING_KEY_BYTES: usize = 1024;

mod adopt;
pub use adopt::{AdoptFrom, AdoptPlan, MappingError, ADOPT_LOCK_TIMEOUT};
mod columns;
pub use columns::Columns;
mod coordination;
pub use coordination::{Coordination, LockGuard, LockState, TableLock};
mod beats;
pub mod leases;
pub use leases::Fence;
use leases::{bind_fence, fenced, partition_of};
mod members_status;
pub use members_status::{LiveMember, TableLeases};
mod primary;
pub use primary::Servers;
mod discard;
pub use discard::{Discard, DiscardRecord, DiscardSelector, DiscardedRow, RowFate};
mod replay;
pub use replay::{CountChunk, DeletedHistory, ReplayChunk, ReplayRange, Retained, RetainedRow};

/// Why a statement failed, as the relay decides on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DbError {
    /// The server is down, unreachable, silent, or dropped the session: retried with backoff.
    #[error("{0}")]
    Unavailable(String),
    /// The server refuses the relay's statements: the table, a column, a schema or a privilege
    /// is missing (SQLSTATE classes 42 and 3F), or a row does not decode. A reconnect does not
    /// fix it; an operator does.
    #[error("{0}")]
    Refused(String),
    /// The server answers and refused this one statement for what it touched or asked, not for
    /// its own state: a data exception (SQLSTATE class 22), an integrity constraint (23: a
    /// check, unique or foreign key an operator added, a trigger refusing with such a code), a
    /// program limit (54: an index row too large, a statement too complex), a trigger's own
    /// exception (P0), a feature not supported (0A), a conflict with other transactions (40: a
    /// deadlock, a serialization failure; 55: a lock not available, an object in use), and the
    /// other statement-scope classes (09, 21, 27, 2F, 38, 39, 44). Retried with backoff, never
    /// reported as the server being unavailable, and the pool's connections stay trusted.
    #[error("{0}")]
    Rejected(String),
    /// The server is not the primary: a standby (in recovery), or it refused a write as
    /// read-only (SQLSTATE 25006), e.g. after a failover. Not an outage of rows: nothing is
    /// counted against them; the relay looks for the primary again with backoff.
    #[error("{0}")]
    NotPrimary(String),
    /// A TLS check failed on connecting (an untrusted, expired or misnamed server certificate,
    /// a client certificate the server requires or refuses): retried with backoff, reported as
    /// a certificate problem. The driver's error does not name the server; the relay adds it.
    #[error("TLS: {0}")]
    Tls(TlsCheck),
}

impl DbError {
    /// The same failure with `what` the relay was doing in front of its text.
    pub fn context(self, what: &str) -> DbError {
        match self {
            DbError::Unavailable(e) => DbError::Unavailable(format!("{what}: {e}")),
            DbError::Refused(e) => DbError::Refused(format!("{what}: {e}")),
            DbError::Rejected(e) => DbError::Rejected(format!("{what}: {e}")),
            DbError::NotPrimary(e) => DbError::NotPrimary(format!("{what}: {e}")),
            // Which check failed is the whole story, whatever the relay was doing.
            DbError::Tls(check) => DbError::Tls(check),
        }
    }
}

impl From<sqlx::Error> for DbError {
    fn from(e: sqlx::Error) -> Self {
        if let Some(check) = tls_check(&e) {
            return DbError::Tls(check);
        }
        let text = db_message(&e);
        match &e {
            sqlx::Error::Database(db) => match db.code().as_deref() {
                Some(c) if c.starts_with("42") || c.starts_with("3F") => DbError::Refused(text),
                Some("25006") => DbError::NotPrimary(text),
                Some(c) if STATEMENT_SCOPE.iter().any(|class| c.starts_with(class)) => {
                    DbError::Rejected(text)
                }
                _ => DbError::Unavailable(text),
            },
            sqlx::Error::ColumnDecode { .. }
            | sqlx::Error::ColumnNotFound(_)
            | sqlx::Error::TypeNotFound { .. }
            | sqlx::Error::Decode(_) => DbError::Refused(text),
            _ => DbError::Unavailable(text),
        }
    }
}

/// The SQLSTATE classes of a failure of one statement, not of the server or its session (see
/// [`DbError::Rejected`]).
const STATEMENT_SCOPE: &[&str] = &[
    "09", "0A", "21", "22", "23", "27", "2F", "38", "39", "40", "44", "54", "55", "P0",
];

pub(crate) type PingUntil = Arc<std::sync::Mutex<Option<std::time::Instant>>>;

/// The database side of the relay: a small pool for fetch, mark, status and retry, on the
/// primary of `postgres.url`'s hosts.
#[derive(Clone)]
pub struct Store {
    pool: PgPool,
    /// The configured hosts and which is the primary (chosen by the coordination session, or by
    /// [`Store::connect`]); the pool follows it.
    servers: Arc<Servers>,
    /// The [`Servers::moves`] the pool's connect options were last set for.
    following: Arc<std::sync::atomic::AtomicU64>,
    /// Until when pooled connections are pinged before use (see [`Store::distrust_connections`]).
    ping_until: PingUntil,
    /// How long the relay's statements may wait for an answer (see [`answered_within`]).
    answer_within: Duration,
}

impl Store {
    /// Connects the pool to the primary (with several hosts, the first in order that is one).
    /// Sessions carry `application_name = outbox-relay` and the configured
    /// `statement_timeout` (also as `idle_in_transaction_session_timeout`), so a silent server
    /// fails a statement instead of hanging it.
    pub async fn connect(settings: &PostgresSettings) -> anyhow::Result<Store> {
        let servers = Arc::new(Servers::new(settings)?);
        let cannot = || {
            format!(
                "cannot connect to PostgreSQL at {}",
                settings.url.redacted()
            )
        };
        servers
            .find_primary()
            .await
            .map_err(|e| anyhow::anyhow!(e.to_string()))
            .with_context(cannot)?;
        let (options, ping_until) = pool_options(settings, &servers);
        let pool = options
            .connect_with(servers.options())
            .await
            // The server's words once, with their SQLSTATE (sqlx's own text repeats them).
            .map_err(|e| anyhow::anyhow!(db_message(&e)))
            .with_context(cannot)?;
        Ok(Store::with_pool(pool, servers, ping_until, settings))
    }

    /// Builds the pool without connecting; connections are made on first use, on the host the
    /// coordination session finds primary ([`Store::servers`]).
    pub fn connect_lazy(settings: &PostgresSettings) -> anyhow::Result<Store> {
        let servers = Arc::new(Servers::new(settings)?);
        let (options, ping_until) = pool_options(settings, &servers);
        let pool = options.connect_lazy_with(servers.options());
        Ok(Store::with_pool(pool, servers, ping_until, settings))
    }

    fn with_pool(
        pool: PgPool,
        servers: Arc<Servers>,
        ping_until: PingUntil,
        settings: &PostgresSettings,
    ) -> Store {
        Store {
            following: Arc::new(std::sync::atomic::AtomicU64::new(servers.moves())),
            pool,
            servers,
            ping_until,
            answer_within: answer_deadline(settings),
        }
    }

    /// How long a statement of the relay's may wait for its answer (see [`answered_within`]).
    pub(crate) fn answer_within(&self) -> Duration {
        self.answer_within
    }

    /// The configured hosts and which one is the primary, shared with the coordination session.
    pub fn servers(&self) -> Arc<Servers> {
        self.servers.clone()
    }

    /// `PostgreSQL at host:port` of the host in use.
    pub fn server_label(&self) -> String {
        self.servers.label()
    }

    /// A statement was refused as read-only: the host in use is no longer the primary.
    /// The coordination session looks for it again (and gives up the locks meanwhile).
    pub fn look_for_primary(&self) {
        self.servers.look_again();
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

    /// The pool, its connect options on the host in use (set again after a move).
    pub fn pool(&self) -> &PgPool {
        let moves = self.servers.moves();
        if self
            .following
            .swap(moves, std::sync::atomic::Ordering::AcqRel)
            != moves
        {
            self.pool.set_connect_options(self.servers.options());
        }
        &self.pool
    }

    /// Creates the relay's schema and every missing outbox table, applies pending per-table
    /// migrations, installs or drops the NOTIFY trigger to match `notify`, sets the outbox
    /// autovacuum parameters a table does not have yet ([`AUTOVACUUM`]), and then, outside the
    /// transaction, builds or drops each table's retention index to match its `retention`.
    /// Returns what it changed, one line each.
    pub async fn migrate(
        &self,
        outboxes: &[OutboxSettings],
        notify: bool,
    ) -> anyhow::Result<Vec<String>> {
        let tables: Vec<TableName> = outboxes.iter().map(|o| o.table.clone()).collect();
        // A `migrate` with nothing to do takes no lock on a table that exists. What it must
        // change (a new table's migration, an earlier release's trigger) locks the table for
        // milliseconds, but a lock wait could queue producers behind it: each wait is bounded
        // by ADOPT_LOCK_TIMEOUT, and the transaction, which then changed nothing, is tried again
        // after a pause (so is one PostgreSQL ends as a deadlock victim).
        let mut attempt = 1;
        let mut applied = loop {
            match self.migrate_tables(&tables, notify).await {
                Err(e) if attempt < MIGRATE_ATTEMPTS && is_lock_conflict(&e) => {
                    tracing::info!(attempt, "a table is busy; trying the migration again");
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt.min(10))))
                        .await;
                    attempt += 1;
                }
                Err(e) if is_lock_conflict(&e) => {
                    return Err(e.context(format!(
                        "migrate tried {MIGRATE_ATTEMPTS} times: a long transaction holds a lock \
                         on a table it must change (pg_locks names it); run migrate again once it ended"
                    )))
                }
                outcome => break outcome?,
            }
        };
        for outbox in outboxes {
            applied.extend(
                self.match_retention_index(&outbox.table, outbox.retention.is_some())
                    .await
                    .with_context(|| format!("the retention index of {}", outbox.table))?,
            );
        }
        Ok(applied)
    }

    /// The part of [`Store::migrate`] that runs in one transaction.
    async fn migrate_tables(
        &self,
        tables: &[TableName],
        notify: bool,
    ) -> anyhow::Result<Vec<String>> {
        let mut tx = self.pool().begin().await?;
        // Two `migrate` runs at once would race on CREATE OR REPLACE; serialize them.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('outbox_relay:migrate', 0))")
            .execute(&mut *tx)
            .await?;
        sqlx::query("SELECT set_config('lock_timeout', $1, true)")
            .bind(ADOPT_LOCK_TIMEOUT.as_millis().to_string())
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
                applied.push(format!("{table}: migration {version} ({description})"));
            }
            if let Some(named) = name_the_id_sequence(&mut tx, table).await? {
                applied.push(named);
            }
            // Replaced only when it is not the wanted one (an earlier release's NOTIFY from every
            // producer transaction, or `notify` changed): CREATE TRIGGER locks the table.
            let current: Option<bool> = sqlx::query_scalar(
                "SELECT coalesce(tgfoid = to_regproc('outbox_relay.notify_waiting'), false) \
                 FROM pg_trigger WHERE tgrelid = to_regclass($1) AND tgname = $2",
            )
            .bind(table.quoted())
            .bind(table.derived("notify"))
            .fetch_optional(&mut *tx)
            .await?;
            if current != notify.then_some(true) {
                let trigger = quote_ident(&table.derived("notify"));
                let mut sql = format!("DROP TRIGGER IF EXISTS {trigger} ON {};", table.quoted());
                if notify {
                    sql += &TableSql::notify_trigger(table);
                    sql += ";";
                }
                sqlx::raw_sql(&sql).execute(&mut *tx).await?;
                applied.push(format!(
                    "{table}: {} the wake-up trigger {}",
                    if notify { "installed" } else { "dropped" },
                    table.derived("notify")
                ));
            }
            if let Some(set) = set_autovacuum(&mut tx, table).await? {
                applied.push(format!("{table}: autovacuum settings {set}"));
            }
        }
        tx.commit().await?;
        Ok(applied)
    }

    /// Builds the retention sweeper's index (`outbox_relay_<t>_published`) when `wanted`, drops
    /// it when not; both `CONCURRENTLY`, so producers and the relay never wait for the build
    /// (it may take minutes beside a long history). An invalid index left by an interrupted
    /// build is dropped and built again. Returns what it did.
    async fn match_retention_index(
        &self,
        table: &TableName,
        wanted: bool,
    ) -> anyhow::Result<Option<String>> {
        let index = table.derived("published");
        let qualified = format!("{}.{}", quote_ident(&table.schema), quote_ident(&index));
        let valid = self.retention_index_valid(table).await?;
        let drop = format!("DROP INDEX CONCURRENTLY IF EXISTS {qualified}");
        match (wanted, valid) {
            (true, Some(true)) | (false, None) => Ok(None),
            (false, Some(_)) => {
                sqlx::raw_sql(&drop).execute(self.pool()).await?;
                Ok(Some(format!(
                    "{table}: dropped the retention index {index} (no retention)"
                )))
            }
            (true, state) => {
                if state == Some(false) {
                    sqlx::raw_sql(&drop).execute(self.pool()).await?;
                }
                sqlx::raw_sql(&format!(
                    "CREATE INDEX CONCURRENTLY {} ON {} (published_at) WHERE published_at IS NOT NULL",
                    quote_ident(&index),
                    table.quoted()
                ))
                .execute(self.pool())
                .await?;
                Ok(Some(format!("{table}: built the retention index {index}")))
            }
        }
    }

    /// The retention index of `table`: valid (`Some(true)`), left invalid by an interrupted
    /// build (`Some(false)`), or missing (`None`).
    pub async fn retention_index_valid(&self, table: &TableName) -> Result<Option<bool>, DbError> {
        let index = format!(
            "{}.{}",
            quote_ident(&table.schema),
            quote_ident(&table.derived("published"))
        );
        let query = sqlx::query_scalar(
            "SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass($1)",
        )
        .bind(index);
        Ok(answered_within(self.answer_within, query.fetch_optional(self.pool())).await?)
    }

    /// Fails with a clear message when `table` is missing or lacks the relay's columns.
    pub async fn check_table(&self, table: &TableName) -> anyhow::Result<()> {
        let sql = format!(
            "SELECT id, dedup_key, ordering_key, routing_key, event_type, payload, headers, exchange, \
             created_at, attempts, next_attempt_at, last_error, published_at, parked_at, held FROM {} LIMIT 0",
            table.quoted()
        );
        sqlx::query(&sql).execute(self.pool()).await.map_err(|e| {
            anyhow::anyhow!(
                "outbox table {table} is not usable: {} (run `outbox-relay migrate`)",
                db_message(&e)
            )
        })?;
        Ok(())
    }

    /// Due rows of `table` in id order that no earlier row of their key holds back, except
    /// `exclude` (rows the relay holds in memory: queued, in flight, or confirmed with the
    /// mark not written yet). Returns nothing unless `lock`'s session still holds the table's
    /// lock. Only rows of the table instance `fence` is for (a table created anew is fetched
    /// once the membership registered on it), and of its partitions unless it holds them all
    /// (a single relay on one channel: then no key is hashed). Reads the due index only: rows behind held keys are
    /// not in it.
    pub async fn fetch_due(
        &self,
        q: &TableSql,
        lock: &LockGuard,
        fence: &Fence,
        limit: u32,
        exclude: &[i64],
    ) -> Result<Vec<OutboxRow>, DbError> {
        let only = (!fence.holds_all()).then(|| fence.held_by_partition());
        let query = sqlx::query(&q.fetch)
            .bind(limit as i64)
            .bind(lock.pid)
            .bind(lock.classid)
            .bind(lock.objid)
            .bind(exclude)
            // Rows above every excluded id skip the (linear, in a generic plan) array check.
            .bind(exclude.iter().copied().max().unwrap_or(i64::MIN))
            .bind(only)
            .bind(fence.partitions() as i32)
            // Only the table instance the leases are for: a table dropped and created again
            // is relayed once the membership registered on it anew (a member of the old
            // instance and one of the new would otherwise both think they hold every row).
            .bind(fence.table_oid());
        let rows = answered_within(self.answer_within, query.fetch_all(self.pool())).await?;
        Ok(rows
            .iter()
            .map(OutboxRow::from_row)
            .collect::<Result<_, _>>()?)
    }

    /// Marks confirmed rows published (with `on_published = "delete"`: deletes them), in one
    /// statement, each only in the version that was sent. Says how many it marked, and the keys
    /// whose holder was among them: the relay releases those next ([`Store::release_keys`]).
    pub async fn mark_published(
        &self,
        q: &TableSql,
        rows: &[RowVersion],
        fence: &Fence,
    ) -> Result<Marked, DbError> {
        if rows.is_empty() {
            return Ok(Marked::default());
        }
        let (ids, versions): (Vec<i64>, Vec<i64>) = rows.iter().map(|r| (r.id, r.version)).unzip();
        let query = bind_fence!(
            sqlx::query(&q.mark_published)
                .bind(ids)
                .bind(fence.table_oid()),
            fence
        )
        .bind(versions);
        let row = answered_within(self.answer_within, query.fetch_one(self.pool())).await?;
        Ok(Marked {
            marked: row.try_get::<i64, _>("marked")? as usize,
            freed: row.try_get("freed")?,
        })
    }

    /// Records failed publishes in one statement: attempts + 1, the error, the next attempt
    /// time, and `parked_at` for rows that are parked.
    pub async fn record_failures(
        &self,
        q: &TableSql,
        failures: &[Failure],
        fence: &Fence,
    ) -> Result<(), DbError> {
        if failures.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = failures.iter().map(|f| f.row.id).collect();
        let versions: Vec<i64> = failures.iter().map(|f| f.row.version).collect();
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
            .bind(fence.table_oid());
        let query = bind_fence!(query, fence).bind(&versions);
        answered_within(self.answer_within, query.execute(self.pool())).await?;
        Ok(())
    }

    /// Clears held_flag when no outbox table holds a key (producers' inserts then skip the
    /// held_keys probe): see `outbox_relay.clear_held_flag`. True when it cleared it.
    pub async fn clear_held_flag(&self) -> Result<bool, DbError> {
        let query = sqlx::query_scalar("SELECT outbox_relay.clear_held_flag()");
        Ok(answered_within(self.answer_within, query.fetch_one(self.pool())).await?)
    }

    /// Holds keys back behind their failed row (`(key, holder id)`): the key's later pending
    /// rows leave the due index (up to a chunk per key and call), and rows inserted for it
    /// later start out held. Each key is taken under its order-guard lock without waiting;
    /// returns the keys not finished (a producer's open transaction kept the key locked, or
    /// more rows wait than one chunk): hold them again later; until then the fetch's per-key
    /// checks keep them back, at the cost of reading them.
    pub async fn hold_keys(
        &self,
        q: &TableSql,
        holds: &[(String, i64)],
        fence: &Fence,
    ) -> Result<Vec<String>, DbError> {
        if holds.is_empty() {
            return Ok(Vec::new());
        }
        let (keys, holders): (Vec<&str>, Vec<i64>) =
            holds.iter().map(|(k, h)| (k.as_str(), *h)).unzip();
        let hold = |sql| {
            let query = sqlx::query(sql)
                .bind(&keys)
                .bind(&holders)
                .bind(q.table.to_string())
                .bind(fence.table_oid());
            bind_fence!(query, fence).fetch_all(self.pool())
        };
        let done = match answered_within(self.answer_within, hold(&q.hold_keys)).await {
            // A schema from before held_flag (the package restarted the relay before `migrate`
            // ran): the keys are held all the same; that schema's guard always probes.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some(UNDEFINED_FUNCTION) => {
                answered_within(self.answer_within, hold(&q.hold_keys_unflagged)).await?
            }
            done => done?,
        };
        Ok(unfinished(keys.into_iter().map(str::to_owned), &done)?)
    }

    /// Releases held keys: their rows return to the due index in id order, a chunk per key
    /// and call; the key's held_keys entry goes with the last chunk. Like
    /// [`Store::hold_keys`], returns the keys not finished (release them again later).
    pub async fn release_keys(
        &self,
        q: &TableSql,
        keys: &[String],
        fence: &Fence,
    ) -> Result<Vec<String>, DbError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let query = sqlx::query(&q.release_keys)
            .bind(keys)
            .bind(q.table.to_string())
            .bind(fence.table_oid());
        let query = bind_fence!(query, fence);
        let done = answered_within(self.answer_within, query.fetch_all(self.pool())).await?;
        Ok(unfinished(keys.iter().cloned(), &done)?)
    }

    /// Held keys of the table whose holder no longer holds them (published, deleted by the
    /// relay in delete mode or by hand, or parked under `skip`: a relay stopped between the
    /// mark and the release), and how many keys are held in all.
    pub async fn stale_holds(
        &self,
        q: &TableSql,
        fence: &Fence,
    ) -> Result<(Vec<String>, i64), DbError> {
        let query = bind_fence!(sqlx::query(&q.stale_holds).bind(fence.table_oid()), fence);
        let rows = answered_within(self.answer_within, query.fetch_all(self.pool())).await?;
        let mut stale = Vec::new();
        let mut held = 0;
        for row in rows {
            held += 1;
            if row.try_get::<bool, _>("stale")? {
                stale.push(row.try_get("ordering_key")?);
            }
        }
        Ok((stale, held))
    }

    /// The retention sweep's one batch: deletes at most `limit` published rows whose
    /// `published_at` is older than `retention`, oldest first, in a transaction of its own
    /// bounded by [`SWEEP_STATEMENT_TIMEOUT`] and [`SWEEP_LOCK_TIMEOUT`]. Rows another session
    /// has locked are skipped, never waited for. Returns how many it deleted.
    pub async fn sweep_published(
        &self,
        q: &TableSql,
        retention: Duration,
        limit: u32,
    ) -> Result<u64, DbError> {
        let sweep = async {
            let mut tx = self.pool().begin().await?;
            sqlx::query(
                "SELECT set_config('statement_timeout', $1, true), set_config('lock_timeout', $2, true)",
            )
            .bind(SWEEP_STATEMENT_TIMEOUT.as_millis().to_string())
            .bind(SWEEP_LOCK_TIMEOUT.as_millis().to_string())
            .execute(&mut *tx)
            .await?;
            let deleted: i64 = sqlx::query_scalar(&q.sweep)
                .bind(retention.as_secs_f64() * 1000.0)
                .bind(limit as i64)
                .fetch_one(&mut *tx)
                .await?;
            // What `replay` needs to know: this table's published history has holes now.
            replay::note_deleted(&mut tx, &q.table, deleted).await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(deleted.max(0) as u64)
        };
        Ok(answered_within(self.answer_within, sweep).await?)
    }

    /// How long ago the oldest published row still in the table was published (`None`: none
    /// is). One probe of the retention index.
    pub async fn oldest_published(&self, q: &TableSql) -> Result<Option<Duration>, DbError> {
        let query = sqlx::query_scalar::<_, Option<f64>>(&q.oldest_published);
        let age = answered_within(self.answer_within, query.fetch_one(self.pool())).await?;
        Ok(age.map(|s| Duration::from_secs_f64(s.max(0.0))))
    }

    /// Counts for `outbox-relay status`, in time that does not grow with the published
    /// history: pending, due, held and parked rows are counted on the partial indexes (which
    /// hold unpublished rows only); discarded rows in the relay's own record of them;
    /// published rows (discarded ones left out) are counted up to [`PUBLISHED_COUNT_CAP`], and
    /// past that estimated from PostgreSQL's live-row count.
    pub async fn status(&self, q: &TableSql) -> anyhow::Result<TableStatus> {
        let table = &q.table;
        let t = table.quoted();
        let c = &q.columns;
        let (id, key, live) = (c.seq(""), c.key(""), c.live(""));
        let created_finite = finite_time(&c.created_at(""));
        // A discarded row is marked like a published one (see `store/discard.rs`).
        let (not_discarded, discarded) = if self.discards_recorded().await? {
            (
                format!(
                    " AND NOT EXISTS (SELECT 1 FROM outbox_relay.discarded d \
                     WHERE d.table_oid = o.tableoid::bigint AND d.row_id = {o_id})",
                    o_id = c.seq("o"),
                ),
                format!(
                    "(SELECT count(*) FROM outbox_relay.discarded \
                     WHERE table_oid = '{t}'::regclass::oid::bigint)"
                ),
            )
        } else {
            (String::new(), "0::bigint".to_owned())
        };
        let sql = format!(
            "SELECT (SELECT count(*) FROM {t} WHERE {live}published_at IS NULL AND parked_at IS NULL AND NOT held) AS ready, \
                    (SELECT count(*) FROM {t} WHERE {live}published_at IS NULL AND parked_at IS NULL AND NOT held AND next_attempt_at <= now()) AS due, \
                    (SELECT count(*) FROM {t} WHERE published_at IS NULL AND held) AS held, \
                    (SELECT count(*) FROM {t} WHERE published_at IS NULL AND parked_at IS NOT NULL) AS parked, \
                    (SELECT count(*) FROM (SELECT 1 FROM {t} o WHERE published_at IS NOT NULL{not_discarded} LIMIT {PUBLISHED_COUNT_CAP}) p) AS published, \
                    {discarded} AS discarded, \
                    greatest(pg_stat_get_live_tuples('{t}'::regclass), 0) AS live, \
                    extract(epoch FROM now() - least( \
                        (SELECT {created_finite} FROM {t} WHERE {live}published_at IS NULL AND parked_at IS NULL AND NOT held ORDER BY {id} LIMIT 1), \
                        (SELECT min(f.created_at) FROM outbox_relay.held_keys h CROSS JOIN LATERAL ( \
                             SELECT {created_finite} AS created_at FROM {t} WHERE {key} = h.ordering_key AND held AND published_at IS NULL \
                             ORDER BY {id} LIMIT 1) f \
                         WHERE h.table_oid = '{t}'::regclass::oid::bigint)))::float8 AS oldest"
        );
        let row = sqlx::query(&sql)
            .fetch_one(self.pool())
            .await
            .with_context(|| {
                format!("reading the status of {table} (run `outbox-relay migrate`?)")
            })?;
        let ready: i64 = row.try_get("ready")?;
        let held: i64 = row.try_get("held")?;
        let parked: i64 = row.try_get("parked")?;
        let discarded: i64 = row.try_get("discarded")?;
        let live: i64 = row.try_get("live")?;
        let counted: i64 = row.try_get("published")?;
        let published = if counted < PUBLISHED_COUNT_CAP {
            Published::Exact(counted)
        } else {
            Published::Estimated(
                (live - ready - held - parked - discarded).max(PUBLISHED_COUNT_CAP),
            )
        };
        let due: i64 = row.try_get("due")?;
        Ok(TableStatus {
            table: table.clone(),
            pending: ready + held,
            due,
            retrying: ready - due,
            held,
            parked,
            discarded,
            published,
            oldest_pending: row
                .try_get::<Option<f64>, _>("oldest")?
                .map(|s| Duration::from_secs_f64(s.max(0.0))),
        })
    }

    /// The backlog gauges of `tables` for the metrics: one statement per [`BACKLOG_CHUNK`]
    /// tables, each count on a partial index and capped at [`BACKLOG_COUNT_CAP`] (a scrape
    /// never scans a long backlog, nor any of the history). A chunk that fails (a table dropped)
    /// is read again table by table, and the tables that still fail are left out.
    pub async fn backlog(&self, tables: &[TableSql]) -> Result<Vec<Backlog>, DbError> {
        let mut out = Vec::with_capacity(tables.len());
        for chunk in tables.chunks(BACKLOG_CHUNK) {
            match self.backlog_of(chunk).await {
                Ok(rows) => out.extend(rows),
                Err(DbError::Refused(_)) if chunk.len() > 1 => {
                    for table in chunk {
                        match self.backlog_of(std::slice::from_ref(table)).await {
                            Ok(rows) => out.extend(rows),
                            Err(DbError::Refused(_)) => {}
                            Err(e) => return Err(e),
                        }
                    }
                }
                Err(DbError::Refused(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    async fn backlog_of(&self, tables: &[TableSql]) -> Result<Vec<Backlog>, DbError> {
        let cap = BACKLOG_COUNT_CAP;
        let selects: Vec<String> = tables
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let t = q.table.quoted();
                let c = &q.columns;
                let (id, key, live) = (c.seq(""), c.key(""), c.live(""));
                let created_finite = finite_time(&c.created_at(""));
                let count = |condition: &str| {
                    format!("(SELECT count(*) FROM (SELECT 1 FROM {t} WHERE {condition} LIMIT {cap}) c)")
                };
                format!(
                    "SELECT {i} AS i, {ready} AS ready, {due} AS due, {held} AS held, {parked} AS parked, \
                        extract(epoch FROM now() - least( \
                            (SELECT {created_finite} FROM {t} WHERE {live}published_at IS NULL AND parked_at IS NULL AND NOT held ORDER BY {id} LIMIT 1), \
                            (SELECT min(f.created_at) FROM outbox_relay.held_keys h CROSS JOIN LATERAL ( \
                                 SELECT {created_finite} AS created_at FROM {t} WHERE {key} = h.ordering_key AND held AND published_at IS NULL \
                                 ORDER BY {id} LIMIT 1) f \
                             WHERE h.table_oid = '{t}'::regclass::oid::bigint)))::float8 AS oldest",
                    ready = count(&format!("{live}published_at IS NULL AND parked_at IS NULL AND NOT held")),
                    due = count(&format!("{live}published_at IS NULL AND parked_at IS NULL AND NOT held AND next_attempt_at <= now()")),
                    held = count("published_at IS NULL AND held"),
                    parked = count("published_at IS NULL AND parked_at IS NOT NULL"),
                )
            })
            .collect();
        let rows = sqlx::query(&selects.join(" UNION ALL "))
            .fetch_all(self.pool())
            .await
            .map_err(|e| DbError::from(e).context("reading the backlog"))?;
        rows.iter()
            .map(|row| {
                let i: i32 = row.try_get("i")?;
                let ready: i64 = row.try_get("ready")?;
                let held: i64 = row.try_get("held")?;
                Ok(Backlog {
                    table: tables[i as usize].table.clone(),
                    pending: (ready + held).min(cap),
                    due: row.try_get("due")?,
                    held,
                    parked: row.try_get("parked")?,
                    oldest_pending: row
                        .try_get::<Option<f64>, _>("oldest")?
                        .map(|s| Duration::from_secs_f64(s.max(0.0))),
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(|e| DbError::from(e).context("reading the backlog"))
    }

    /// Parked rows with their errors, oldest first, for `status --parked`.
    pub async fn parked_rows(&self, q: &TableSql, limit: i64) -> anyhow::Result<Vec<ParkedRow>> {
        let c = &q.columns;
        let sql = format!(
            "SELECT {id} AS id, {key} AS ordering_key, {dedup} AS dedup_key, attempts, coalesce(last_error, '') AS last_error \
             FROM {} WHERE published_at IS NULL AND parked_at IS NOT NULL ORDER BY {id} LIMIT $1",
            q.table.quoted(),
            id = c.seq(""),
            key = c.key(""),
            dedup = c.dedup_key(""),
        );
        let rows = sqlx::query(&sql).bind(limit).fetch_all(self.pool()).await?;
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

    /// Un-parks the selected rows (attempts back to 0, due now) and wakes the relay. Returns
    /// the ids released, in id order.
    pub async fn retry(&self, q: &TableSql, selector: &RetrySelector) -> anyhow::Result<Vec<i64>> {
        let table = &q.table;
        let (id, key) = (q.columns.seq(""), q.columns.key(""));
        let base = format!(
            "UPDATE {} SET parked_at = NULL, attempts = 0, next_attempt_at = now() \
             WHERE published_at IS NULL AND parked_at IS NOT NULL",
            table.quoted()
        );
        let sql = match selector {
            RetrySelector::All => format!("{base} RETURNING {id}"),
            RetrySelector::Id(_) => format!("{base} AND {id} = $1 RETURNING {id}"),
            RetrySelector::Key(_) => format!("{base} AND {key} = $1 RETURNING {id}"),
        };
        let query = sqlx::query_scalar::<_, i64>(&sql);
        let query = match selector {
            RetrySelector::All => query,
            RetrySelector::Id(id) => query.bind(*id),
            RetrySelector::Key(key) => query.bind(key.as_str()),
        };
        let mut tx = self.pool().begin().await?;
        let mut ids = query
            .fetch_all(&mut *tx)
            .await
            .with_context(|| format!("releasing parked rows of {table}"))?;
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(TableSql::notify_channel(table))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        ids.sort_unstable();
        Ok(ids)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Rows one hold or release statement moves per key at most.
const HOLD_CHUNK: i64 = 10_000;

/// A retention sweep batch gives up after this long (its rows stay for the next one).
pub const SWEEP_STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
/// ... and after this long waiting for a table lock (an `ALTER TABLE`, a `LOCK TABLE`): the
/// sweeper never keeps a queue of other sessions waiting behind it.
pub const SWEEP_LOCK_TIMEOUT: Duration = Duration::from_secs(1);

/// The storage parameters `migrate` gives every outbox table (see docs/operations-and-metrics.md, "Autovacuum").
/// A parameter the table already has (set by an operator, or by an earlier `migrate`) is left
/// as it is. `autovacuum_vacuum_insert_scale_factor` needs PostgreSQL 13.
pub const AUTOVACUUM: &[(&str, &str)] = &[
    // Vacuum after 1 % of the table changed instead of 20 %: the published (or deleted) rows'
    // old versions are removed while they are few, whatever the history's size.
    ("autovacuum_vacuum_scale_factor", "0.01"),
    // Inserts alone (delete mode, or rows still pending) start a vacuum after 1 % too: the
    // visibility map stays current and the history is frozen in small steps, not by one
    // anti-wraparound vacuum over the whole table.
    ("autovacuum_vacuum_insert_scale_factor", "0.01"),
    // The planner's view of a table whose pending set swings from empty to a backlog and back.
    ("autovacuum_analyze_scale_factor", "0.02"),
];

/// Sets the [`AUTOVACUUM`] parameters `table` does not have yet, in the caller's transaction
/// (`ALTER TABLE ... SET` takes a SHARE UPDATE EXCLUSIVE lock: it waits for a running vacuum,
/// never blocks producers or the relay). Returns the ones set, or `None` when none was missing.
async fn set_autovacuum(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    table: &TableName,
) -> anyhow::Result<Option<String>> {
    let row = sqlx::query(
        "SELECT coalesce(c.reloptions, '{}') AS options, current_setting('server_version_num')::int AS version          FROM pg_class c WHERE c.oid = $1::regclass",
    )
    .bind(table.quoted())
    .fetch_one(&mut **tx)
    .await?;
    let options: Vec<String> = row.try_get("options")?;
    let version: i32 = row.try_get("version")?;
    let missing: Vec<String> = AUTOVACUUM
        .iter()
        .filter(|(name, _)| version >= 130_000 || *name != "autovacuum_vacuum_insert_scale_factor")
        .filter(|(name, _)| !options.iter().any(|o| o.starts_with(&format!("{name}="))))
        .map(|(name, value)| format!("{name} = {value}"))
        .collect();
    if missing.is_empty() {
        return Ok(None);
    }
    let set = missing.join(", ");
    sqlx::raw_sql(&format!("ALTER TABLE {} SET ({set})", table.quoted()))
        .execute(&mut **tx)
        .await?;
    Ok(Some(set))
}

/// The keys of `asked` that a hold or release statement did not finish: not locked (a
/// producer's open transaction holds the key) or with more rows than one chunk.
fn unfinished(
    asked: impl Iterator<Item = String>,
    answered: &[sqlx::postgres::PgRow],
) -> sqlx::Result<Vec<String>> {
    let mut done = std::collections::HashSet::new();
    for row in answered {
        if row.try_get::<bool, _>(1)? {
            done.insert(row.try_get::<String, _>(0)?);
        }
    }
    Ok(asked.filter(|k| !done.contains(k)).collect())
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
        Err(_) => Err(no_answer(deadline)),
    }
}

/// The error of a statement (or a short transaction) that got no answer within `deadline`:
/// an I/O error, so it reads as the server being unavailable.
pub(crate) fn no_answer(deadline: Duration) -> sqlx::Error {
    sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!(
            "no answer from PostgreSQL within {} (statement_timeout + 2s): the server or the network is silent",
            humantime::format_duration(deadline)
        ),
    ))
}

/// The pool's options. No ping before each statement in normal operation (it would cost a
/// round trip per statement); only while [`Store::distrust_connections`] asks for it.
fn pool_options(settings: &PostgresSettings, servers: &Arc<Servers>) -> (PgPoolOptions, PingUntil) {
    let ping_until = PingUntil::default();
    let until = ping_until.clone();
    let servers = servers.clone();
    let options = PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .test_before_acquire(false)
        .before_acquire(move |conn, meta| {
            // A connection to the host the relay moved away from, or opened before a write was
            // refused as read-only, is closed, not used.
            if servers.retired(meta.age) {
                return Box::pin(async { Ok(false) });
            }
            let ping = until
                .lock()
                .ok()
                .and_then(|u| *u)
                .is_some_and(|u| std::time::Instant::now() < u);
            Box::pin(async move { Ok(!ping || sqlx::Connection::ping(conn).await.is_ok()) })
        })
        .acquire_timeout(settings.connect_timeout)
        // Every table shares the pool, so a table waiting for a connection while others run
        // their statements is the design, not news; a wait past the acquire timeout is an
        // outage and reported as one.
        .acquire_slow_level(tracing::log::LevelFilter::Debug);
    (options, ping_until)
}

/// The driver's options for one host's URL (see [`crate::config::PgHost`]), with the relay's
/// session settings.
fn connect_options(
    url: &crate::config::SecretUrl,
    settings: &PostgresSettings,
) -> anyhow::Result<PgConnectOptions> {
    let options: PgConnectOptions = url.expose().parse().map_err(|_| {
        anyhow::anyhow!(
            "postgres.url is not a valid PostgreSQL URL: {}",
            url.redacted()
        )
    })?;
    let timeout_ms = settings.statement_timeout.as_millis().to_string();
    // A transaction left open between two statements (the relay paused, or its connection
    // cut mid-transaction) is ended by the server after the same time, so the row locks it
    // took (a member registering, a lease given up) never block the other relays' claims for
    // longer than a statement may take.
    Ok(options
        .application_name("outbox-relay")
        .options([
            ("statement_timeout", timeout_ms.as_str()),
            ("idle_in_transaction_session_timeout", timeout_ms.as_str()),
            ("client_min_messages", "warning"),
        ])
        .log_statements(tracing::log::LevelFilter::Trace)
        .log_slow_statements(tracing::log::LevelFilter::Debug, Duration::from_secs(1)))
}

/// The TLS check that failed in a connection error, if one did: the TLS library's typed error
/// inside it, or the driver's own TLS refusal (e.g. "server does not support TLS" when the
/// mode requires it), which it gives as text only.
fn tls_check(e: &sqlx::Error) -> Option<TlsCheck> {
    match e {
        sqlx::Error::Database(_) => None,
        sqlx::Error::Tls(inner) => Some(
            TlsCheck::find(inner.as_ref())
                .unwrap_or_else(|| TlsCheck::Handshake(inner.to_string())),
        ),
        other => TlsCheck::find(other),
    }
}

/// The text of a database error, without the client library's wrapping; a failed TLS check in
/// the relay's words.
pub fn db_message(e: &sqlx::Error) -> String {
    if let Some(check) = tls_check(e) {
        return format!("TLS: {check}");
    }
    match e {
        sqlx::Error::Database(db) => match db.code() {
            Some(code) => format!("{} (SQLSTATE {code})", db.message()),
            None => db.message().to_owned(),
        },
        other => other.to_string(),
    }
}

/// Decodes a row selected with the columns of the fetch (`payload` as text, `headers` as JSON
/// text, `created_at` as microseconds since the epoch). Each value of the row's content is
/// decoded on its own: one the relay cannot read (a JSON number out of range, nesting deeper
/// than the decoder's limit, an infinite timestamp) becomes the row's
/// [`OutboxRow::defect`], so the row is parked with the reason and the rest of the batch goes
/// out. Only the row's identity (id, key, version) and the relay's own columns must decode.
impl<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> for OutboxRow {
    fn from_row(r: &'r sqlx::postgres::PgRow) -> sqlx::Result<Self> {
        let mut defect = None;
        let mut note = |problem: String| {
            defect.get_or_insert(Unpublishable(problem));
        };
        let mut text = |column: &str| match r.try_get::<String, _>(column) {
            Ok(value) => value,
            Err(e) => {
                note(format!("{column} cannot be decoded: {e}"));
                String::new()
            }
        };
        let (dedup_key, routing_key, event_type) =
            (text("dedup_key"), text("routing_key"), text("event_type"));
        let exchange = match r.try_get::<Option<String>, _>("exchange") {
            Ok(exchange) => exchange,
            Err(e) => {
                note(format!("exchange cannot be decoded: {e}"));
                None
            }
        };
        // Text (JSON rendered by PostgreSQL, or a text payload), or an adopted table's bytea.
        let payload = if r.try_get_raw("payload")?.type_info().name() == "BYTEA" {
            r.try_get::<Vec<u8>, _>("payload")
        } else {
            r.try_get::<String, _>("payload").map(String::into_bytes)
        };
        let payload = payload.unwrap_or_else(|e| {
            note(format!("payload cannot be decoded: {e}"));
            Vec::new()
        });
        let headers = match r.try_get::<Option<String>, _>("headers") {
            Ok(None) => serde_json::Value::Null,
            Ok(Some(json)) => serde_json::from_str(&json).unwrap_or_else(|e| {
                note(format!(
                    "headers cannot be read as JSON ({e}): numbers must fit a 64-bit float, \
                     nesting fewer than {JSON_DEPTH_LIMIT} levels"
                ));
                serde_json::Value::Null
            }),
            Err(e) => {
                note(format!("headers cannot be decoded: {e}"));
                serde_json::Value::Null
            }
        };
        let created_at = match r.try_get::<Option<f64>, _>("created_at") {
            // An adopted table's mapped column may be null: the time the relay read the row
            // is the best it knows (the message's timestamp, the lag metrics).
            Ok(None) => Some(Utc::now()),
            Ok(Some(micros)) => created_from_micros(micros),
            Err(_) => None,
        };
        let created_at = created_at.unwrap_or_else(|| {
            note(format!(
                "created_at is not a time a message can carry (infinity, or outside {} to {})",
                DateTime::<Utc>::MIN_UTC.format("%Y-%m-%d"),
                DateTime::<Utc>::MAX_UTC.format("%Y-%m-%d")
            ));
            DateTime::<Utc>::UNIX_EPOCH
        });
        Ok(OutboxRow {
            id: r.try_get("id")?,
            dedup_key,
            ordering_key: r.try_get("ordering_key")?,
            routing_key,
            event_type,
            payload,
            headers,
            exchange,
            created_at,
            attempts: r.try_get("attempts")?,
            table_oid: r.try_get("table_oid")?,
            version: r.try_get("version")?,
            defect,
        })
    }
}

/// `timestamp` where it is finite, else NULL: a producer's `infinity` in `created_at` must not
/// fail a statement that subtracts it from `now()` (PostgreSQL before 17 refuses to), which
/// would stop the status and the backlog gauges of the whole table.
fn finite_time(timestamp: &str) -> String {
    format!("(CASE WHEN isfinite({timestamp}::timestamptz) THEN {timestamp}::timestamptz END)")
}

/// serde_json's recursion limit: a `jsonb` nested deeper cannot be decoded.
const JSON_DEPTH_LIMIT: usize = 128;

/// `created_at` as the fetch reads it (microseconds since the epoch, as a float: infinite
/// timestamps read as infinities, which no integer type holds), if it is a time chrono holds.
fn created_from_micros(micros: f64) -> Option<DateTime<Utc>> {
    if !micros.is_finite() || micros.abs() >= i64::MAX as f64 {
        return None;
    }
    DateTime::from_timestamp_micros(micros as i64)
}

/// One row as it was read: its id and the version (`xmin`) the relay sent. A write for it
/// applies only while the table still holds that version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowVersion {
    pub id: i64,
    pub version: i64,
}

impl RowVersion {
    pub fn of(row: &OutboxRow) -> Self {
        RowVersion {
            id: row.id,
            version: row.version,
        }
    }
}

/// What a mark wrote.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Marked {
    /// Rows marked (or deleted): fewer than asked when rows were changed, removed or marked
    /// by another relay since they were read.
    pub marked: usize,
    /// The keys whose holder was among them: released next ([`Store::release_keys`]).
    pub freed: Vec<String>,
}

/// A failed publish to record.
#[derive(Debug, Clone)]
pub struct Failure {
    pub row: RowVersion,
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
    /// Rows not published and not parked (due, waiting for a retry, or held behind a key).
    pub pending: i64,
    /// Pending rows that may go out now.
    pub due: i64,
    /// Pending rows waiting for their retry delay (a failed attempt), not held.
    pub retrying: i64,
    /// Pending rows waiting behind a held key.
    pub held: i64,
    pub parked: i64,
    /// Parked rows an operator ended with `discard` (recorded in `outbox_relay.discarded`).
    pub discarded: i64,
    pub published: Published,
    pub oldest_pending: Option<Duration>,
}

/// Published rows: counted while few, estimated once many (never a scan of the history).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    Exact(i64),
    /// PostgreSQL's live-row estimate less the unpublished rows.
    Estimated(i64),
}

/// Published rows `status` counts one by one before it estimates instead.
pub const PUBLISHED_COUNT_CAP: i64 = 10_000;

/// One table's backlog, for the metrics' gauges (counts capped at [`BACKLOG_COUNT_CAP`]).
#[derive(Debug, Clone)]
pub struct Backlog {
    pub table: TableName,
    pub pending: i64,
    pub due: i64,
    pub held: i64,
    pub parked: i64,
    pub oldest_pending: Option<Duration>,
}

/// Tables whose backlog one statement reads.
pub const BACKLOG_CHUNK: usize = 25;

/// Rows the backlog gauges count one by one before they stop counting.
pub const BACKLOG_COUNT_CAP: i64 = 1_000_000;

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
    columns: Columns,
    on_exhausted: OnExhausted,
    fetch: String,
    mark_published: String,
    sweep: String,
    oldest_published: String,
    record_failures: String,
    hold_keys: String,
    hold_keys_unflagged: String,
    release_keys: String,
    stale_holds: String,
}

/// A pending row that may go out now, as the due index's partial predicate reads it.
const DUE: &str =
    "published_at IS NULL AND parked_at IS NULL AND NOT held AND next_attempt_at <= now()";

impl TableSql {
    /// The statements of a table with the relay's own columns.
    pub fn new(table: &TableName, on_exhausted: OnExhausted) -> Self {
        Self::with_columns(table, Columns::default(), on_exhausted)
    }

    /// The statements of a configured table: its own columns, or its mapped ones.
    pub fn for_outbox(outbox: &OutboxSettings, on_exhausted: OnExhausted) -> Self {
        Self::with_columns(
            &outbox.table,
            Columns::new(outbox.mapping.clone()),
            on_exhausted,
        )
        .on_published(outbox.on_published)
    }

    fn with_columns(table: &TableName, c: Columns, on_exhausted: OnExhausted) -> Self {
        let t = table.quoted();
        // The row order/identity and the ordering key under each alias (`id` and
        // `ordering_key` on the relay's own tables, so their statements read as always).
        let (o_id, e_id, h_id, t_id) = (c.seq("o"), c.seq("e"), c.seq("h"), c.seq("t"));
        let (o_key, e_key, h_key, t_key) = (c.key("o"), c.key("e"), c.key("h"), c.key("t"));
        let (id, o_live) = (c.seq(""), c.live("o"));
        // A row is held back by an earlier row of its key that waits for a retry, or (with
        // hold_key) is parked. Such rows are few and sit in the small `failed` index, so the
        // check is one probe of an almost empty index per candidate row. The rows of held keys
        // are not candidates at all (`held`); these checks keep order for the few that are not
        // flagged (a hold still to be written, or not yet reaching them, a producer outside
        // READ COMMITTED): no row goes before a failed or a held row of its key.
        let holds_back = match on_exhausted {
            OnExhausted::HoldKey => "(e.parked_at IS NOT NULL OR e.next_attempt_at > now())",
            OnExhausted::Skip => "(e.parked_at IS NULL AND e.next_attempt_at > now())",
        };
        let fetch = format!(
            "SELECT {select} \
             FROM {t} o \
             WHERE {o_live}o.published_at IS NULL AND o.parked_at IS NULL AND NOT o.held AND o.next_attempt_at <= now() \
               AND NOT EXISTS ( \
                   SELECT 1 FROM {t} e \
                   WHERE {e_key} = {o_key} AND {e_id} < {o_id} \
                     AND e.published_at IS NULL AND (e.parked_at IS NOT NULL OR e.attempts > 0) \
                     AND {holds_back}) \
               AND NOT EXISTS ( \
                   SELECT 1 FROM {t} h \
                   WHERE {h_key} = {o_key} AND {h_id} < {o_id} AND h.published_at IS NULL AND h.held) \
               AND EXISTS ( \
                   SELECT 1 FROM pg_locks l \
                   WHERE l.locktype = 'advisory' AND l.pid = $2 AND l.granted AND l.objsubid = 1 \
                     AND l.classid::bigint = $3 AND l.objid::bigint = $4) \
               AND ({o_id} > $6 OR {o_id} <> ALL($5::bigint[])) \
               AND ($7::bool[] IS NULL OR ($7::bool[])[{o_part} + 1]) \
               AND o.tableoid::bigint = $9 \
             ORDER BY {o_id} LIMIT $1",
            select = c.select_list("o"),
            o_part = partition_of(&o_key, 8),
        );
        let mark_published = Self::mark_sql(table, &c, OnPublished::Mark);
        // Oldest first through the retention index (it stops at the cutoff: rows inside the
        // retention are never read); `FOR UPDATE SKIP LOCKED`: a row another session locked is
        // left for the next batch, never waited for. Only published rows: never a pending,
        // held or parked one, whatever their age.
        let sweep = format!(
            "WITH picked AS ( \
                 SELECT {id} AS id FROM {t} \
                 WHERE published_at IS NOT NULL AND parked_at IS NULL \
                   AND published_at < now() - $1 * interval '1 millisecond' \
                 ORDER BY published_at LIMIT $2 FOR UPDATE SKIP LOCKED), \
             deleted AS ( \
                 DELETE FROM {t} AS t USING picked p \
                 WHERE {t_id} = p.id AND t.published_at IS NOT NULL RETURNING 1) \
             SELECT count(*) FROM deleted"
        );
        let oldest_published = format!(
            "SELECT extract(epoch FROM now() - min(published_at))::float8 FROM {t} \
             WHERE published_at IS NOT NULL"
        );
        let record_failures = format!(
            "UPDATE {t} AS t SET attempts = t.attempts + 1, last_error = f.error, \
                    next_attempt_at = now() + f.delay_ms * interval '1 millisecond', \
                    parked_at = CASE WHEN f.park THEN now() END \
             FROM unnest($1::bigint[], $2::text[], $3::float8[], $4::bool[], $10::bigint[]) \
                  AS f(id, error, delay_ms, park, version) \
             WHERE {t_id} = f.id AND {t_version} = f.version \
               AND t.published_at IS NULL AND t.tableoid::bigint = $5 \
               AND {fence}",
            fence = fenced(&t_key, 6),
            t_version = columns::version("t"),
        );
        // Both take the key's order-guard lock (without waiting: a producer's transaction may
        // hold it for long), so no insert of the key is in progress while its rows change
        // state, and inserts that follow see the new held_keys. The CTE with the volatile lock
        // call is evaluated once per key.
        // Both work in chunks of HOLD_CHUNK rows per key and statement (a key with a million
        // rows queued is held or released over many turns, each statement short); a key is
        // done when its chunk came back short. Any state in between keeps order: the fetch
        // never sends a row with a held row of its key before it.
        // `flagged` turns held_flag on before the held_keys rows can commit (and keeps it from
        // being cleared until then): producers' inserts probe held_keys again. Without it, for
        // a schema from before held_flag.
        let hold_keys_unflagged = format!(
            "WITH flagged AS MATERIALIZED (SELECT true AS raised), \
             locked AS ( \
                 SELECT h.key, h.holder FROM unnest($1::text[], $2::int8[]) AS h(key, holder), flagged f \
                 WHERE f.raised AND {hold_fence} AND pg_try_advisory_xact_lock(hashtext($3), hashtext(h.key))), \
             noted AS ( \
                 INSERT INTO outbox_relay.held_keys (table_oid, ordering_key, holder) \
                 SELECT $4, key, holder FROM locked \
                 ON CONFLICT (table_oid, ordering_key) DO UPDATE SET holder = EXCLUDED.holder \
                 RETURNING ordering_key, holder), \
             picked AS ( \
                 SELECT x.id FROM noted n CROSS JOIN LATERAL ( \
                     SELECT {t_id} AS id FROM {t} t \
                     WHERE {t_key} = n.ordering_key AND {t_id} > n.holder AND t.published_at IS NULL \
                       AND t.parked_at IS NULL AND NOT t.held \
                     ORDER BY {t_id} LIMIT {HOLD_CHUNK}) x), \
             moved AS ( \
                 UPDATE {t} AS t SET held = true FROM picked p WHERE {t_id} = p.id RETURNING {t_key} AS ordering_key) \
             SELECT n.ordering_key, coalesce(c.rows, 0) < {HOLD_CHUNK} AS done FROM noted n \
             LEFT JOIN (SELECT ordering_key, count(*) AS rows FROM moved GROUP BY 1) c USING (ordering_key) \
             UNION ALL SELECT h.key, true FROM unnest($1::text[]) AS h(key) WHERE NOT {hold_fence}",
            hold_fence = fenced("h.key", 5),
        );
        let hold_keys = hold_keys_unflagged.replacen(
            "SELECT true AS raised",
            "SELECT outbox_relay.holding_keys() AS raised",
            1,
        );
        let release_keys = format!(
            "WITH locked AS ( \
                 SELECT k.key FROM unnest($1::text[]) AS k(key) \
                 WHERE {release_fence} AND pg_try_advisory_xact_lock(hashtext($2), hashtext(k.key))), \
             picked AS ( \
                 SELECT x.id FROM locked l CROSS JOIN LATERAL ( \
                     SELECT {t_id} AS id FROM {t} t \
                     WHERE {t_key} = l.key AND t.held AND t.published_at IS NULL \
                     ORDER BY {t_id} LIMIT {HOLD_CHUNK}) x), \
             moved AS ( \
                 UPDATE {t} AS t SET held = false FROM picked p WHERE {t_id} = p.id RETURNING {t_key} AS ordering_key), \
             counted AS ( \
                 SELECT l.key, coalesce(c.rows, 0) < {HOLD_CHUNK} AS done FROM locked l \
                 LEFT JOIN (SELECT ordering_key, count(*) AS rows FROM moved GROUP BY 1) c \
                   ON c.ordering_key = l.key), \
             dropped AS ( \
                 DELETE FROM outbox_relay.held_keys h USING counted c \
                 WHERE h.table_oid = $3 AND h.ordering_key = c.key AND c.done RETURNING 1) \
             SELECT key, done FROM counted \
             UNION ALL SELECT k.key, true FROM unnest($1::text[]) AS k(key) WHERE NOT {release_fence}",
            release_fence = fenced("k.key", 4),
        );
        let holder_holds = match on_exhausted {
            OnExhausted::HoldKey => "o.published_at IS NULL",
            OnExhausted::Skip => "o.published_at IS NULL AND o.parked_at IS NULL",
        };
        let stale_holds = format!(
            "SELECT h.ordering_key, NOT EXISTS ( \
                 SELECT 1 FROM {t} o WHERE {o_id} = h.holder AND {holder_holds}) AS stale \
             FROM outbox_relay.held_keys h WHERE h.table_oid = $1 AND {fence}",
            fence = fenced("h.ordering_key", 2),
        );
        Self {
            table: table.clone(),
            columns: c,
            on_exhausted,
            fetch,
            mark_published,
            sweep,
            oldest_published,
            record_failures,
            hold_keys,
            hold_keys_unflagged,
            release_keys,
            stale_holds,
        }
    }

    /// The same statements with confirmed rows marked or deleted as `on_published` says.
    pub fn on_published(mut self, on_published: OnPublished) -> Self {
        self.mark_published = Self::mark_sql(&self.table, &self.columns, on_published);
        self
    }

    /// The mark: exactly the confirmed ids of the fence's table instance (`tableoid`: a table
    /// dropped and created again reuses ids) that are still unpublished, set published or
    /// deleted; returns the keys whose holder it published, so they are released. A deleted
    /// holder is as gone as a published one: the stale-hold sweep treats both alike.
    fn mark_sql(table: &TableName, c: &Columns, on_published: OnPublished) -> String {
        let t = table.quoted();
        let id = c.seq("");
        let fence = fenced(&c.key(""), 3);
        // Each id with its version (`$7`, in the order of `$1`), compared after the id's
        // index found the row: a row replaced since it was read (TRUNCATE and a new row with
        // the same id, an update or a re-insert by hand) is not marked, stays pending and goes
        // out again.
        let sent = "unnest($1::bigint[], $7::bigint[]) AS sent(sent_id, sent_version)";
        let version = columns::version("");
        let write = match on_published {
            OnPublished::Mark => format!(
                "UPDATE {t} SET published_at = now() FROM {sent} \
                 WHERE {id} = sent.sent_id AND {version} = sent.sent_version \
                   AND published_at IS NULL AND tableoid::bigint = $2 AND {fence} \
                 RETURNING {id} AS id"
            ),
            OnPublished::Delete => format!(
                "DELETE FROM {t} USING {sent} \
                 WHERE {id} = sent.sent_id AND {version} = sent.sent_version \
                   AND published_at IS NULL AND tableoid::bigint = $2 AND {fence} \
                 RETURNING {id} AS id"
            ),
        };
        format!(
            "WITH marked AS ({write}) \
             SELECT (SELECT count(*) FROM marked) AS marked, \
                    ARRAY(SELECT h.ordering_key FROM outbox_relay.held_keys h JOIN marked m ON h.holder = m.id \
                          WHERE h.table_oid = $2) AS freed"
        )
    }

    /// The insert trigger that wakes an idle relay: deferred to the commit, once per row, a
    /// NOTIFY only while a relay of the table waits (`outbox_relay.waiting`); see
    /// `outbox_relay.notify_waiting` in the relay's schema.
    pub fn notify_trigger(table: &TableName) -> String {
        format!(
            "CREATE CONSTRAINT TRIGGER {} AFTER INSERT ON {} DEFERRABLE INITIALLY DEFERRED \
             FOR EACH ROW EXECUTE FUNCTION outbox_relay.notify_waiting({})",
            quote_ident(&table.derived("notify")),
            table.quoted(),
            columns::literal(&Self::notify_channel(table))
        )
    }

    /// The LISTEN channel of `table`'s insert trigger.
    pub fn notify_channel(table: &TableName) -> String {
        table.derived("notify")
    }

    pub fn table(&self) -> &TableName {
        &self.table
    }

    pub fn on_exhausted(&self) -> OnExhausted {
        self.on_exhausted
    }

    /// The coordination poll's part for this table: `index` when a row is due. Reads the due
    /// index's first entries only.
    fn probe(&self, index: usize) -> String {
        format!(
            "SELECT {index}::int4 WHERE EXISTS (SELECT 1 FROM {} WHERE {}{DUE})",
            self.table.quoted(),
            self.columns.live("")
        )
    }

    /// The table's column names.
    pub fn columns(&self) -> &Columns {
        &self.columns
    }

    fn render(&self, template: &str) -> String {
        let t = &self.table;
        template
            .replace("{table}", &t.quoted())
            .replace("{schema}", &quote_ident(&t.schema))
            .replace("{due_index}", &quote_ident(&t.derived("due")))
            .replace("{failed_index}", &quote_ident(&t.derived("failed")))
            .replace("{held_index}", &quote_ident(&t.derived("held")))
            .replace("{dedup_index}", &quote_ident(&t.derived("dedup_key")))
            .replace("{order_trigger}", &quote_ident(&t.derived("order")))
            .replace(
                "{key_check}",
                &quote_ident(&t.derived("ordering_key_length")),
            )
            .replace(
                "{dedup_key_not_empty}",
                &quote_ident(&t.derived("dedup_key_not_empty")),
            )
            .replace(
                "{ordering_key_not_empty}",
                &quote_ident(&t.derived("ordering_key_not_empty")),
            )
    }
}
