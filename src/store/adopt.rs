//! Adopting an application's own outbox table: the check of a column mapping against the real
//! table, and `migrate --adopt`, which adds only what the relay needs. Invariant: adoption
//! never rewrites the table and never holds a lock that blocks producers for more than a
//! moment: the catalog changes run in one short transaction whose lock waits are bounded by
//! [`ADOPT_LOCK_TIMEOUT`] (and retried), the indexes are built `CONCURRENTLY` after it, and
//! the rows from before adoption are numbered (`--from start`) in short batches of their own.

use std::time::Duration;

use anyhow::Context;
use sqlx::Row;

use super::columns::{literal, Columns, CREATED_COLUMN, SEQ_COLUMN};
use super::{set_autovacuum, Store, TableSql, RELAY_SCHEMA_SQL};
use crate::config::{quote_ident, ColumnMap, OutboxSettings, PayloadType, TableName};

/// Which rows an adopted table publishes: decided at the first `migrate --adopt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdoptFrom {
    /// Only rows inserted after adoption; the rows already there are never published.
    Now,
    /// The rows already there too (numbered in the table's order), before the new ones.
    Start,
}

impl AdoptFrom {
    fn word(self) -> &'static str {
        match self {
            AdoptFrom::Now => "now",
            AdoptFrom::Start => "start",
        }
    }
}

/// The version `outbox_relay.migrations` records for an adopted table.
const ADOPTED_VERSION: i32 = 100;

/// How long the adoption's catalog transaction waits for a table lock before it gives up and
/// tries again: a producer's inserts queue behind a waiting `ALTER TABLE`, so the wait is
/// what they may wait at most.
pub const ADOPT_LOCK_TIMEOUT: Duration = Duration::from_millis(300);
/// Attempts at that transaction before `migrate --adopt` gives up.
const ADOPT_ATTEMPTS: u32 = 20;
/// Rows from before adoption numbered per statement (`--from start`).
const BACKFILL_BATCH: i64 = 10_000;

/// The relay's state columns with their definitions. Constant defaults and `now()` (stable,
/// evaluated once) are stored in the catalog: no column added here rewrites the table
/// (PostgreSQL 11 and later).
const STATE_COLUMNS: &[(&str, &str)] = &[
    ("attempts", "integer NOT NULL DEFAULT 0"),
    ("next_attempt_at", "timestamptz NOT NULL DEFAULT now()"),
    ("last_error", "text"),
    ("published_at", "timestamptz"),
    ("parked_at", "timestamptz"),
    ("held", "boolean NOT NULL DEFAULT false"),
    (SEQ_COLUMN, "bigint"),
];

/// What `migrate --adopt` will do (or did) to one table, step by step.
#[derive(Debug, Clone)]
pub struct AdoptPlan {
    pub table: TableName,
    /// Each step and what it locks, in order.
    pub steps: Vec<String>,
    /// Nothing to do.
    pub up_to_date: bool,
}

/// One table's state as adoption sees it.
struct Found {
    columns: Vec<String>,
    sequence: bool,
    trigger: bool,
    /// The NOTIFY trigger: `Some(true)` this release's, `Some(false)` an earlier one's.
    notify_trigger: Option<bool>,
    /// The ordering key's length check (see [`crate::store::MAX_ORDERING_KEY_BYTES`]).
    key_check: bool,
    adopted: Option<AdoptFrom>,
    /// name -> valid
    indexes: Vec<(String, bool)>,
    unnumbered: i64,
}

/// An index the relay needs on an adopted table.
struct IndexSpec {
    name: String,
    definition: String,
}

/// A column that does not fit the mapping.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", problems.join("; "))]
pub struct MappingError {
    pub problems: Vec<String>,
}

impl Store {
    /// Checks `outbox`'s mapping against the real table: every mapped column exists and has a
    /// type that fits its role. Each problem names the table, the config key and the column.
    pub async fn check_mapping(&self, outbox: &OutboxSettings) -> anyhow::Result<()> {
        let Some(map) = &outbox.mapping else {
            return Ok(());
        };
        let rows = sqlx::query(
            "SELECT a.attname::text AS name, format_type(a.atttypid, a.atttypmod) AS kind, \
                    ty.typname::text AS typname, ty.typcategory::text AS category, a.attnotnull AS not_null \
             FROM pg_attribute a JOIN pg_type ty ON ty.oid = a.atttypid \
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
        )
        .bind(outbox.table.quoted())
        .fetch_all(&self.pool)
        .await
        .with_context(|| format!("reading the columns of {}", outbox.table))?;
        if rows.is_empty() {
            return Err(MappingError {
                problems: vec![format!(
                    "{}: the table does not exist (migrate --adopt adopts an existing table)",
                    outbox.table
                )],
            }
            .into());
        }
        let mut found = Vec::new();
        for row in &rows {
            let name: String = row.try_get("name")?;
            let kind: String = row.try_get("kind")?;
            let typname: String = row.try_get("typname")?;
            let category: String = row.try_get("category")?;
            let not_null: bool = row.try_get("not_null")?;
            found.push((name, kind, typname, category, not_null));
        }
        let mut problems = Vec::new();
        for (key, column) in map.columns() {
            let role = key.rsplit('.').next().unwrap_or(key);
            let Some((_, kind, typname, category, not_null)) =
                found.iter().find(|(name, ..)| name == column)
            else {
                problems.push(format!(
                    "{}: {key}: column {column:?} does not exist",
                    outbox.table
                ));
                continue;
            };
            if let Some(expected) = type_problem(role, map, typname, category) {
                problems.push(format!(
                    "{}: {key}: column {column:?} is {kind}; expected {expected}",
                    outbox.table
                ));
            } else if matches!(
                role,
                "dedup_key" | "ordering_key" | "table_field_event_id" | "table_field_event_key"
            ) && !not_null
            {
                problems.push(format!(
                    "{}: {key}: column {column:?} may be null; the dedup key and the ordering key must be NOT NULL",
                    outbox.table
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(MappingError { problems }.into())
        }
    }

    /// Checks that an adopted table carries what the relay needs (after `migrate --adopt`):
    /// its state columns, its indexes, and no numbering of old rows still running.
    pub async fn check_adopted(&self, outbox: &OutboxSettings) -> anyhow::Result<()> {
        let Some(map) = &outbox.mapping else {
            return Ok(());
        };
        let found = self.found(&outbox.table, false).await?;
        let missing: Vec<&str> = STATE_COLUMNS
            .iter()
            .map(|(c, _)| *c)
            .chain(map.created_at.is_none().then_some(CREATED_COLUMN))
            .filter(|c| !found.columns.iter().any(|f| f == c))
            .collect();
        let specs = index_specs(&outbox.table, map);
        let invalid: Vec<&str> = specs
            .iter()
            .filter(|s| {
                !found
                    .indexes
                    .iter()
                    .any(|(n, valid)| *n == s.name && *valid)
            })
            .map(|s| s.name.as_str())
            .collect();
        if found.adopted.is_none() || !missing.is_empty() || !invalid.is_empty() || !found.trigger {
            anyhow::bail!(
                "outbox table {} is not adopted yet (missing: {}); run `outbox-relay migrate --adopt --from now|start`",
                outbox.table,
                missing
                    .iter()
                    .chain(invalid.iter())
                    .copied()
                    .chain((!found.trigger).then_some("the order guard trigger"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if found
            .indexes
            .iter()
            .any(|(n, _)| *n == outbox.table.derived("backfill"))
        {
            anyhow::bail!(
                "outbox table {}: `migrate --adopt --from start` has not finished numbering the rows from before adoption; run it again to finish",
                outbox.table
            );
        }
        Ok(())
    }

    /// The table's adoption state; `count` also counts the rows without a number.
    async fn found(&self, table: &TableName, count: bool) -> anyhow::Result<Found> {
        let row = sqlx::query(
            "SELECT ARRAY(SELECT attname::text FROM pg_attribute WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped) AS columns, \
                    to_regclass($2) IS NOT NULL AS sequence, \
                    EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = to_regclass($1) AND tgname = $3) AS trigger, \
                    (SELECT coalesce(tgfoid = to_regproc('outbox_relay.notify_waiting'), false) FROM pg_trigger \
                     WHERE tgrelid = to_regclass($1) AND tgname = $4) AS notify_trigger, \
                    EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = to_regclass($1) AND conname = $5) AS key_check, \
                    to_regclass('outbox_relay.migrations') IS NOT NULL AS relay_schema, \
                    ARRAY(SELECT c.relname::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = to_regclass($1) ORDER BY 1) AS index_names, \
                    ARRAY(SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = to_regclass($1) ORDER BY c.relname) AS index_valid",
        )
        .bind(table.quoted())
        .bind(format!("{}.{}", quote_ident(&table.schema), quote_ident(&table.derived("seq"))))
        .bind(table.derived("order"))
        .bind(table.derived("notify"))
        .bind(table.derived("ordering_key_length"))
        .fetch_one(&self.pool)
        .await
        .with_context(|| format!("reading the state of {table}"))?;
        let adopted: Option<String> = if row.try_get("relay_schema")? {
            sqlx::query_scalar(
                "SELECT description FROM outbox_relay.migrations WHERE table_name = $1 AND version = $2",
            )
            .bind(table.to_string())
            .bind(ADOPTED_VERSION)
            .fetch_optional(&self.pool)
            .await?
        } else {
            None
        };
        let columns: Vec<String> = row.try_get("columns")?;
        let names: Vec<String> = row.try_get("index_names")?;
        let valid: Vec<bool> = row.try_get("index_valid")?;
        let unnumbered = if !count {
            0
        } else if columns.iter().any(|c| c == SEQ_COLUMN) {
            sqlx::query_scalar(&format!(
                "SELECT count(*) FROM {} WHERE {} IS NULL",
                table.quoted(),
                quote_ident(SEQ_COLUMN)
            ))
            .fetch_one(&self.pool)
            .await?
        } else {
            sqlx::query_scalar::<_, i64>(&format!("SELECT count(*) FROM {}", table.quoted()))
                .fetch_one(&self.pool)
                .await?
        };
        Ok(Found {
            columns,
            sequence: row.try_get("sequence")?,
            trigger: row.try_get("trigger")?,
            notify_trigger: row.try_get("notify_trigger")?,
            key_check: row.try_get("key_check")?,
            adopted: adopted.map(|d| {
                if d.ends_with("--from start)") {
                    AdoptFrom::Start
                } else {
                    AdoptFrom::Now
                }
            }),
            indexes: names.into_iter().zip(valid).collect(),
            unnumbered,
        })
    }

    /// `migrate --adopt` for one mapped table: checks the mapping, then adds what is missing
    /// (state columns, the ordering sequence, the order guard, the NOTIFY trigger to match
    /// `notify`, the autovacuum settings; the indexes, concurrently; with `--from start` the
    /// numbering of the rows already there). `from` is required the first time and must
    /// not change afterwards. With `dry_run`, only says what it would do.
    pub async fn adopt(
        &self,
        outbox: &OutboxSettings,
        from: Option<AdoptFrom>,
        notify: bool,
        dry_run: bool,
    ) -> anyhow::Result<AdoptPlan> {
        let table = &outbox.table;
        let Some(map) = &outbox.mapping else {
            anyhow::bail!("{table} has no column mapping ([outbox.columns] or layout = \"debezium\"): use plain `migrate`");
        };
        self.check_mapping(outbox).await?;
        let found = self.found(table, true).await?;
        let from = match (found.adopted, from) {
            (Some(done), Some(asked)) if done != asked => anyhow::bail!(
                "{table} was adopted with --from {}; it cannot change to --from {}",
                done.word(),
                asked.word()
            ),
            (Some(done), _) => done,
            (None, Some(asked)) => asked,
            (None, None) => anyhow::bail!(
                "{table} is not adopted yet: choose which rows to publish, --from now (only rows inserted from now on) or --from start (the {} rows already there too)",
                found.unnumbered
            ),
        };
        let mut steps = Vec::new();
        let t = table.quoted();
        let mut catalog: Vec<String> = Vec::new();
        let mut catalog_steps: Vec<String> = Vec::new();
        let missing: Vec<(&str, &str)> = STATE_COLUMNS
            .iter()
            .copied()
            .chain(
                map.created_at
                    .is_none()
                    .then_some((CREATED_COLUMN, "timestamptz NOT NULL DEFAULT now()")),
            )
            .filter(|(c, _)| !found.columns.iter().any(|f| f == c))
            .collect();
        if !missing.is_empty() {
            let adds: Vec<String> = missing
                .iter()
                .map(|(c, def)| format!("ADD COLUMN IF NOT EXISTS {} {def}", quote_ident(c)))
                .collect();
            catalog.push(format!("ALTER TABLE {t} {}", adds.join(", ")));
            catalog_steps.push(format!(
                "add the columns {} (ALTER TABLE: ACCESS EXCLUSIVE for milliseconds; constant and now() defaults live in the catalog, no rewrite)",
                missing.iter().map(|(c, _)| *c).collect::<Vec<_>>().join(", ")
            ));
        }
        let sequence = format!(
            "{}.{}",
            quote_ident(&table.schema),
            quote_ident(&table.derived("seq"))
        );
        if !found.sequence {
            catalog.push(format!(
                "CREATE SEQUENCE IF NOT EXISTS {sequence} OWNED BY {t}.{}",
                quote_ident(SEQ_COLUMN)
            ));
            catalog_steps.push(format!(
                "create the sequence {} for {SEQ_COLUMN} (no table lock)",
                table.derived("seq")
            ));
        }
        // The guard's function is replaced every time (cheap, no table lock): a changed
        // ordering_key mapping takes effect.
        catalog.push(guard_function(table, map, &sequence));
        if !found.trigger {
            catalog.push(format!(
                "CREATE TRIGGER {} BEFORE INSERT ON {t} FOR EACH ROW EXECUTE FUNCTION {}()",
                quote_ident(&table.derived("order")),
                guard_name(table)
            ));
            catalog_steps.push(format!(
                "install the order guard {} (BEFORE INSERT: per-key lock, then {SEQ_COLUMN}; CREATE TRIGGER: SHARE ROW EXCLUSIVE for milliseconds)",
                table.derived("order")
            ));
        }
        // A trigger of an earlier release (a NOTIFY from every producer transaction) is
        // replaced as well.
        if found.notify_trigger != notify.then_some(true) {
            let trigger = quote_ident(&table.derived("notify"));
            catalog.push(format!("DROP TRIGGER IF EXISTS {trigger} ON {t}"));
            if notify {
                catalog.push(TableSql::notify_trigger(table));
            }
            catalog_steps.push(format!(
                "{} the NOTIFY trigger {} (SHARE ROW EXCLUSIVE for milliseconds)",
                if notify { "install" } else { "drop" },
                table.derived("notify")
            ));
        }
        if !found.key_check {
            // As on the relay's own tables: a longer key could never be parked or held (the
            // relay's indexes take the key), so it is refused where the producer sees why.
            // NOT VALID: the rows already there are not scanned.
            let check = table.derived("ordering_key_length");
            catalog.push(format!(
                "ALTER TABLE {t} ADD CONSTRAINT {} CHECK (octet_length({}) <= {}) NOT VALID",
                quote_ident(&check),
                Columns::new(Some(map.clone())).key(""),
                crate::store::MAX_ORDERING_KEY_BYTES
            ));
            catalog_steps.push(format!(
                "refuse ordering keys over {} bytes at insert: the check {check} (NOT VALID: rows already there are not scanned; ACCESS EXCLUSIVE for milliseconds)",
                crate::store::MAX_ORDERING_KEY_BYTES
            ));
        }
        if found.adopted.is_none() {
            catalog_steps.push(format!("record the adoption (--from {})", from.word()));
        }
        let up_to_date_catalog = catalog_steps.is_empty();
        steps.extend(catalog_steps.iter().map(|s| {
            format!(
                "in one transaction, lock waits at most {}ms (retried): {s}",
                ADOPT_LOCK_TIMEOUT.as_millis()
            )
        }));
        let specs = index_specs(table, map);
        let mut builds = Vec::new();
        for spec in specs {
            match found.indexes.iter().find(|(n, _)| *n == spec.name) {
                Some((_, true)) => {}
                state => {
                    steps.push(format!(
                        "{}build the index {} CONCURRENTLY (producers and the relay go on; reads the whole table)",
                        if state.is_some() { "drop the invalid index and " } else { "" },
                        spec.name
                    ));
                    builds.push((spec, state.is_some()));
                }
            }
        }
        let backfill = table.derived("backfill");
        let backfill_left = found.indexes.iter().any(|(n, _)| *n == backfill);
        let number = from == AdoptFrom::Start && (found.unnumbered > 0 || backfill_left);
        match from {
            AdoptFrom::Start if number => steps.push(format!(
                "number the {} rows from before adoption in the table's order ({}), {BACKFILL_BATCH} a transaction, below every new row, so they are published first (row locks on those rows only)",
                found.unnumbered,
                match &map.created_at {
                    Some(c) => format!("{c}, then {}", map.dedup_key),
                    None => map.dedup_key.clone(),
                }
            )),
            AdoptFrom::Now if found.adopted.is_none() => steps.push(format!(
                "leave the {} rows from before adoption unpublished (--from now: {SEQ_COLUMN} stays null, nothing rewritten)",
                found.unnumbered
            )),
            _ => {}
        }
        let retention = table.derived("published");
        let retention_matches = match found.indexes.iter().find(|(n, _)| *n == retention) {
            Some((_, valid)) => outbox.retention.is_some() && *valid,
            None => outbox.retention.is_none(),
        };
        if !retention_matches {
            steps.push(format!(
                "{} the retention index {retention} CONCURRENTLY to match `retention`",
                if outbox.retention.is_some() {
                    "build"
                } else {
                    "drop"
                }
            ));
        }
        let up_to_date = up_to_date_catalog && builds.is_empty() && !number && retention_matches;
        if up_to_date && !dry_run && found.trigger {
            // Only the guard's function, which takes no table lock: a changed ordering_key
            // mapping takes effect.
            sqlx::raw_sql(&guard_function(table, map, &sequence))
                .execute(&self.pool)
                .await
                .with_context(|| format!("replacing the order guard of {table}"))?;
        }
        if dry_run || up_to_date {
            return Ok(AdoptPlan {
                table: table.clone(),
                steps,
                up_to_date,
            });
        }
        if !up_to_date_catalog {
            self.adopt_catalog(table, &catalog, found.adopted.is_none().then_some(from))
                .await?;
        }
        for (spec, invalid) in builds {
            if invalid {
                sqlx::raw_sql(&format!(
                    "DROP INDEX CONCURRENTLY IF EXISTS {}.{}",
                    quote_ident(&table.schema),
                    quote_ident(&spec.name)
                ))
                .execute(&self.pool)
                .await?;
            }
            sqlx::raw_sql(&spec.definition)
                .execute(&self.pool)
                .await
                .with_context(|| format!("building the index {} of {table}", spec.name))?;
        }
        if number {
            self.number_backlog(table, map).await?;
        }
        self.match_retention_index(table, outbox.retention.is_some())
            .await
            .with_context(|| format!("the retention index of {table}"))?;
        Ok(AdoptPlan {
            table: table.clone(),
            steps,
            up_to_date,
        })
    }

    /// The catalog changes in one transaction with a short `lock_timeout`: on a busy table the
    /// `ALTER` gives up after [`ADOPT_LOCK_TIMEOUT`] instead of queueing producers behind it,
    /// and is tried again after a pause.
    async fn adopt_catalog(
        &self,
        table: &TableName,
        catalog: &[String],
        record: Option<AdoptFrom>,
    ) -> anyhow::Result<()> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let outcome: Result<(), sqlx::Error> = async {
                let mut tx = self.pool.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('outbox_relay:migrate', 0))")
                    .execute(&mut *tx)
                    .await?;
                sqlx::raw_sql(RELAY_SCHEMA_SQL).execute(&mut *tx).await?;
                sqlx::query("SELECT set_config('lock_timeout', $1, true)")
                    .bind(ADOPT_LOCK_TIMEOUT.as_millis().to_string())
                    .execute(&mut *tx)
                    .await?;
                for statement in catalog {
                    sqlx::raw_sql(statement).execute(&mut *tx).await?;
                }
                if let Some(from) = record {
                    sqlx::query(
                        "INSERT INTO outbox_relay.migrations (table_name, version, description) VALUES ($1, $2, $3) \
                         ON CONFLICT DO NOTHING",
                    )
                    .bind(table.to_string())
                    .bind(ADOPTED_VERSION)
                    .bind(format!("adopted (--from {})", from.word()))
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(())
            }
            .await;
            match outcome {
                Ok(()) => break,
                // lock_not_available: a long transaction holds a lock on the table.
                Err(sqlx::Error::Database(e))
                    if e.code().as_deref() == Some("55P03") && attempt < ADOPT_ATTEMPTS =>
                {
                    tracing::info!(table = %table, attempt, "the table is busy; trying the adoption's ALTER again");
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt.min(10))))
                        .await;
                }
                Err(e) => {
                    return Err(anyhow::anyhow!(super::db_message(&e)))
                        .with_context(|| format!("adopting {table} (attempt {attempt})"))
                }
            }
        }
        if let Some(set) = {
            let mut tx = self.pool.begin().await?;
            let set = set_autovacuum(&mut tx, table).await?;
            tx.commit().await?;
            set
        } {
            tracing::info!(table = %table, settings = %set, "autovacuum settings set");
        }
        Ok(())
    }

    /// Numbers the rows from before adoption (`--from start`): in the table's order, below
    /// every number the sequence gives new rows (negative, ending at -1), a batch per
    /// transaction, through a temporary partial index of the unnumbered rows (dropped at the
    /// end; while it exists `run` and `check-config` refuse the table: a relay running now
    /// could send a key's new rows before its old ones).
    async fn number_backlog(&self, table: &TableName, map: &ColumnMap) -> anyhow::Result<()> {
        let t = table.quoted();
        let index = table.derived("backfill");
        let qualified = format!("{}.{}", quote_ident(&table.schema), quote_ident(&index));
        let c = Columns::new(Some(std::sync::Arc::new(map.clone())));
        let seq = quote_ident(SEQ_COLUMN);
        let valid: Option<bool> = sqlx::query_scalar(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)",
        )
        .bind(&qualified)
        .fetch_optional(&self.pool)
        .await?;
        if valid == Some(false) {
            sqlx::raw_sql(&format!("DROP INDEX CONCURRENTLY IF EXISTS {qualified}"))
                .execute(&self.pool)
                .await?;
        }
        if valid != Some(true) {
            sqlx::raw_sql(&format!(
                "CREATE INDEX CONCURRENTLY {} ON {t} ({}, ({})) WHERE {seq} IS NULL",
                quote_ident(&index),
                c.created_at(""),
                c.dedup_key("")
            ))
            .execute(&self.pool)
            .await?;
        }
        // The planner knows nothing of the new columns yet; its statistics make the batches
        // read the index in order.
        sqlx::raw_sql(&format!("ANALYZE {t}"))
            .execute(&self.pool)
            .await?;
        let mut remaining: i64 =
            sqlx::query_scalar(&format!("SELECT count(*) FROM {t} WHERE {seq} IS NULL"))
                .fetch_one(&self.pool)
                .await?;
        let (created, dedup) = (c.created_at(""), c.dedup_key(""));
        let batch = format!(
            "UPDATE {t} AS t SET {seq} = p.n \
             FROM (SELECT ctid, $1 + row_number() OVER (ORDER BY c1, c2) - 1 AS n \
                   FROM (SELECT ctid, {created} AS c1, {dedup} AS c2 FROM {t} \
                         WHERE {seq} IS NULL ORDER BY {created}, {dedup} LIMIT $2) x) p \
             WHERE t.ctid = p.ctid AND t.{seq} IS NULL"
        );
        while remaining > 0 {
            let mut tx = self.pool.begin().await?;
            // One index scan in order and a TID lookup per row, whatever the estimates say.
            sqlx::raw_sql(
                "SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off; \
                 SET LOCAL enable_bitmapscan = off; SET LOCAL enable_sort = off",
            )
            .execute(&mut *tx)
            .await?;
            let done = sqlx::query(&batch)
                .bind(-remaining)
                .bind(BACKFILL_BATCH)
                .execute(&mut *tx)
                .await
                .with_context(|| format!("numbering the rows of {table} from before adoption"))?
                .rows_affected() as i64;
            tx.commit().await?;
            if done == 0 {
                break;
            }
            remaining -= done;
        }
        sqlx::raw_sql(&format!("DROP INDEX CONCURRENTLY IF EXISTS {qualified}"))
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

/// `outbox_relay."outbox_relay_<schema>_<table>_guard"`, the adopted table's order guard.
fn guard_name(table: &TableName) -> String {
    let named = TableName {
        schema: "outbox_relay".into(),
        name: format!("{}_{}", table.schema, table.name),
    };
    format!("outbox_relay.{}", quote_ident(&named.derived("guard")))
}

/// The order guard of an adopted table: as `order_guard_v2`, with the mapped ordering key and
/// `outbox_relay_seq` drawn from the table's own sequence after the key's lock, so one key's
/// numbers commit in increasing order. The table's own id (a uuid, or a bigint drawn before
/// any lock) is left as the producer set it.
fn guard_function(table: &TableName, map: &ColumnMap, sequence: &str) -> String {
    let key = format!("(NEW.{}::text)", quote_ident(&map.ordering_key));
    format!(
        "CREATE OR REPLACE FUNCTION {name}() RETURNS trigger \
         LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $guard$ \
         BEGIN \
             PERFORM pg_advisory_xact_lock(hashtext(TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME), hashtext({key})); \
             NEW.{seq} := nextval({sequence_literal}::regclass); \
             NEW.held := current_setting('transaction_isolation') = 'read committed' \
                 AND EXISTS (SELECT 1 FROM outbox_relay.held_keys \
                             WHERE table_oid = TG_RELID::bigint AND ordering_key = {key}); \
             RETURN NEW; \
         END $guard$",
        name = guard_name(table),
        seq = quote_ident(SEQ_COLUMN),
        sequence_literal = literal(sequence),
    )
}

/// The indexes of an adopted table: the row identity (marks, retry), and the due, failed and
/// held indexes of the relay's own tables, on `outbox_relay_seq` and the key as text.
fn index_specs(table: &TableName, map: &ColumnMap) -> Vec<IndexSpec> {
    let c = Columns::new(Some(std::sync::Arc::new(map.clone())));
    let t = table.quoted();
    let (seq, key) = (c.seq(""), c.key(""));
    let spec = |suffix: &str, body: String| IndexSpec {
        name: table.derived(suffix),
        definition: format!(
            "CREATE {} {} ON {t} {body}",
            if suffix == "rows" {
                "UNIQUE INDEX CONCURRENTLY"
            } else {
                "INDEX CONCURRENTLY"
            },
            quote_ident(&table.derived(suffix))
        ),
    };
    vec![
        spec("rows", format!("({seq})")),
        spec(
            "due",
            format!("({seq}) WHERE {seq} IS NOT NULL AND published_at IS NULL AND parked_at IS NULL AND NOT held"),
        ),
        spec(
            "failed",
            format!("({key}, {seq}) WHERE published_at IS NULL AND (parked_at IS NOT NULL OR attempts > 0)"),
        ),
        spec("held", format!("({key}, {seq}) WHERE published_at IS NULL AND held")),
    ]
}

/// What is wrong with a column of type `typname` (category `category`) in `role`, if anything.
fn type_problem(role: &str, map: &ColumnMap, typname: &str, category: &str) -> Option<String> {
    let texty = category == "S" || matches!(typname, "uuid" | "int2" | "int4" | "int8");
    match role {
        "payload" | "table_field_event_payload" => {
            let fits = match map.payload_type {
                PayloadType::Text => category == "S",
                other => typname == other.sql_name(),
            };
            (!fits).then(|| {
                format!(
                    "{} (payload_type = {:?}; the payload may be jsonb, json, text or bytea)",
                    map.payload_type.sql_name(),
                    map.payload_type.sql_name()
                )
            })
        }
        "headers" => (!matches!(typname, "jsonb" | "json"))
            .then(|| "jsonb or json (an object of headers)".into()),
        "header_columns" | "table_fields_additional_placement" => None,
        "created_at" | "table_field_event_timestamp" => {
            (!matches!(typname, "timestamptz" | "timestamp"))
                .then(|| "timestamptz or timestamp".into())
        }
        _ => (!texty).then(|| "text, varchar, uuid or an integer".into()),
    }
}
