//! The faults that change the table's rows while good rows flow: bad rows inserted from the
//! producers' side (`bad-row`, made by [`crate::badrows`]) and an operator's hand (`operator`:
//! TRUNCATE, the delete of a parked row, the update of a pending row's payload). Each action
//! writes down exactly what it did in the [`RowLog`], so that the end of the run knows what is
//! owed: a row a TRUNCATE removed unsent is owed nothing (the log holds every row the TRUNCATE
//! removed, read under the same ACCESS EXCLUSIVE lock), an updated row may arrive in any of its
//! versions, a deleted parked row's key must flow again. The drop and re-creation of the
//! table (`DROP TABLE`, `outbox-relay migrate`) pauses the producers meanwhile, as an
//! application paused for that maintenance, and sets the new table's ids to go on from the old
//! ones (a row's id names one row for the whole run).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use sqlx::{Connection, PgConnection, Row};

use outbox_relay_testkit::servers::Servers;

use crate::badrows::{self, BadRow, Generator, Outcome, RowState, KEY_PREFIX};
use crate::checker::{body_hash, Checker, CommittedRow};
use crate::producers::Gate;

/// The ordering keys of the operator's own rows (a poison row and the rows behind it).
pub const OPERATOR_KEY_PREFIX: &str = "op-";

/// How long a poison row may take to be parked before that counts as a relay problem.
const PARK_WITHIN: Duration = Duration::from_secs(20);

/// The target for a deleted parked row's key to flow again: the relay looks for holds whose
/// row is gone every 15 s, + 5 s. Slower releases are listed, as slow recoveries are.
pub const KEY_RELEASE_TARGET: Duration = Duration::from_secs(20);

/// How long the operator watches the rows behind a deleted parked row before the next fault.
const RELEASE_WATCH: Duration = Duration::from_secs(30);

const INSERT_BAD: &str = "INSERT INTO public.outbox \
     (dedup_key, ordering_key, routing_key, event_type, payload, headers, exchange, created_at) \
     VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb, $7, $8::timestamptz) RETURNING id";

/// The operator's actions, one per `operator` fault, in seeded shuffled rounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    Truncate,
    DeleteParked,
    UpdatePending,
    DropRecreate,
}

impl Action {
    pub const ALL: [Action; 4] = [
        Action::Truncate,
        Action::DeleteParked,
        Action::UpdatePending,
        Action::DropRecreate,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Action::Truncate => "truncate",
            Action::DeleteParked => "delete-parked",
            Action::UpdatePending => "update-pending",
            Action::DropRecreate => "drop-recreate",
        }
    }
}

/// What the drop and re-creation of the table needs: the relay's `migrate`, and the gate
/// that pauses the producers.
pub struct Recreate {
    pub relay_bin: PathBuf,
    pub config: PathBuf,
    pub gate: Gate,
}

/// A bad row and what its INSERT said (its id, or the error's text).
pub struct BadRecord {
    pub row: BadRow,
    pub insert: Result<i64, String>,
}

/// A poison row the operator deleted once it was parked, and the rows queued behind it.
pub struct DeletedPoison {
    pub id: i64,
    pub ordering_key: String,
    pub followers: Vec<i64>,
    pub deleted_at: Instant,
}

/// Everything the row faults did, for the checks at the end.
#[derive(Default)]
pub struct RowLog {
    pub bad: Vec<BadRecord>,
    /// Good rows removed by TRUNCATEs and DROP TABLEs (owed only if they were marked
    /// published by then).
    pub truncated_good: Vec<CommittedRow>,
    /// Bad rows removed by TRUNCATEs and DROP TABLEs, with their state then.
    pub truncated_bad: HashMap<i64, RowState>,
    pub truncates: u64,
    /// How long each drop and re-creation kept the table away (producers paused).
    pub recreations_ms: Vec<u64>,
    pub deletes: Vec<DeletedPoison>,
    /// Payload versions of updated rows (body hashes, the original first).
    pub versions: HashMap<i64, Vec<u64>>,
    pub updates: u64,
    /// Update faults that found no pending row to update.
    pub updates_without_pending: u64,
    /// Ids of the operator's poison rows (never to be delivered).
    pub poison: HashSet<i64>,
    /// What the relay did wrong as the operator saw it (a poison row not parked in time).
    pub problems: Vec<String>,
    pub actions: BTreeMap<&'static str, u64>,
}

/// Inserts bad rows and acts as the operator, on a connection of its own.
pub struct RowFaults {
    servers: Servers,
    database: String,
    conn: Option<PgConnection>,
    generator: Generator,
    rng: ChaCha8Rng,
    round: Vec<Action>,
    operations: u64,
    recreate: Recreate,
    pub log: Arc<Mutex<RowLog>>,
}

impl RowFaults {
    pub fn new(
        seed: u64,
        servers: Servers,
        database: String,
        frame_max: usize,
        recreate: Recreate,
        log: Arc<Mutex<RowLog>>,
    ) -> RowFaults {
        RowFaults {
            servers,
            database,
            conn: None,
            generator: Generator::new(seed, frame_max, crate::setup::TABLE),
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0x0e7a_7012),
            round: Vec::new(),
            operations: 0,
            recreate,
            log,
        }
    }

    fn log(&self) -> std::sync::MutexGuard<'_, RowLog> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn conn(&mut self) -> anyhow::Result<&mut PgConnection> {
        if self.conn.is_none() {
            let c = self
                .servers
                .connect_pg(&self.database, "obr-soak-operator")
                .await
                .context("connecting as the operator")?;
            self.conn = Some(c);
        }
        self.conn.as_mut().context("no connection")
    }

    /// Forgets a connection that failed (the next action connects again).
    fn drop_conn_on<T>(&mut self, r: &Result<T, sqlx::Error>) {
        if matches!(r, Err(e) if e.as_database_error().is_none()) {
            self.conn = None;
        }
    }

    /// `bad-row`: inserts 3 to 6 bad rows, each in its own transaction, and says which.
    pub async fn insert_bad_rows(&mut self) -> anyhow::Result<String> {
        let count = self.rng.random_range(3..=6);
        let mut cases = Vec::new();
        for _ in 0..count {
            let row = self.generator.next_row();
            let insert = self.insert_bad(&row).await;
            let outcome = match &insert {
                Ok(_) => row.case.to_string(),
                Err(_) => format!("{}(refused)", row.case),
            };
            cases.push(outcome);
            self.log().bad.push(BadRecord { row, insert });
        }
        Ok(format!("{count} bad rows: {}", cases.join(", ")))
    }

    /// One bad row's INSERT: its id, or the database's error. A lost connection is asked
    /// again by dedup_key (the INSERT may have committed), then tried once more.
    async fn insert_bad(&mut self, row: &BadRow) -> Result<i64, String> {
        let mut last = String::new();
        for _ in 0..3 {
            let conn = match self.conn().await {
                Ok(c) => c,
                Err(e) => {
                    last = format!("{e:#}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let found: Result<Option<i64>, _> =
                sqlx::query_scalar("SELECT id FROM public.outbox WHERE dedup_key = $1")
                    .bind(&row.dedup_key)
                    .fetch_optional(&mut *conn)
                    .await;
            if let Ok(Some(id)) = found {
                return Ok(id);
            }
            let r = sqlx::query_scalar::<_, i64>(INSERT_BAD)
                .bind(&row.dedup_key)
                .bind(&row.ordering_key)
                .bind(&row.routing_key)
                .bind(&row.event_type)
                .bind(&row.payload)
                .bind(&row.headers)
                .bind(&row.exchange)
                .bind(row.created_at)
                .fetch_one(&mut *conn)
                .await;
            self.drop_conn_on(&r);
            match r {
                Ok(id) => return Ok(id),
                Err(sqlx::Error::Database(db)) => {
                    return Err(format!(
                        "{} (constraint {})",
                        db.message(),
                        db.constraint().unwrap_or("none")
                    ))
                }
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(last)
    }

    /// `operator`: the next action of the round.
    pub async fn act(&mut self) -> anyhow::Result<String> {
        if self.round.is_empty() {
            self.round = Action::ALL.to_vec();
            self.round.shuffle(&mut self.rng);
        }
        let action = self.round.pop().unwrap_or(Action::Truncate);
        self.operations += 1;
        let r = match action {
            Action::Truncate => self.truncate().await,
            Action::DeleteParked => self.delete_parked().await,
            Action::UpdatePending => self.update_pending().await,
            Action::DropRecreate => self.drop_recreate().await,
        };
        if r.is_err() {
            self.conn = None;
        }
        *self.log().actions.entry(action.name()).or_default() += 1;
        r.map(|detail| format!("{}: {detail}", action.name()))
    }

    /// TRUNCATE, reading first (under the same ACCESS EXCLUSIVE lock, so exactly) every row it
    /// removes.
    async fn truncate(&mut self) -> anyhow::Result<String> {
        self.remove_all("TRUNCATE public.outbox").await
    }

    /// DROP TABLE (rows read first as for TRUNCATE) and `outbox-relay migrate`, with the
    /// producers paused; the new table's ids go on from the old ones and the marks log's
    /// trigger is installed again before the producers resume.
    async fn drop_recreate(&mut self) -> anyhow::Result<String> {
        let gate = self.recreate.gate.clone();
        let paused = gate.write_owned().await;
        let started = Instant::now();
        let conn = self.conn().await?;
        let last: i64 = sqlx::query_scalar(
            "SELECT coalesce(pg_sequence_last_value(pg_get_serial_sequence('public.outbox', 'id')), 0)",
        )
        .fetch_one(&mut *conn)
        .await?;
        let removed = self.remove_all("DROP TABLE public.outbox").await?;
        crate::setup::migrate(&self.recreate.relay_bin, &self.recreate.config).await?;
        let conn = self.conn().await?;
        // The ids the old table drew are never drawn again.
        sqlx::query("SELECT setval(pg_get_serial_sequence('public.outbox', 'id'), $1)")
            .bind(last + 1_000)
            .execute(&mut *conn)
            .await
            .context("moving the new table's ids past the old ones")?;
        sqlx::query(crate::setup::MARK_TRIGGER)
            .execute(&mut *conn)
            .await
            .context("installing the marks log's trigger on the new table")?;
        let took = started.elapsed();
        drop(paused);
        self.log().recreations_ms.push(took.as_millis() as u64);
        Ok(format!(
            "{removed}; migrated anew, producers paused for {} ms",
            took.as_millis()
        ))
    }

    /// `statement` (TRUNCATE or DROP TABLE) after reading, under the same ACCESS EXCLUSIVE
    /// lock, every row it removes.
    async fn remove_all(&mut self, statement: &'static str) -> anyhow::Result<String> {
        let conn = self.conn().await?;
        let mut tx = conn.begin().await?;
        sqlx::query("SET LOCAL lock_timeout = '10s'")
            .execute(&mut *tx)
            .await?;
        sqlx::query("LOCK TABLE public.outbox IN ACCESS EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await
            .context("locking the table for TRUNCATE")?;
        let rows = sqlx::query(
            "SELECT id, dedup_key, ordering_key, payload::text AS payload, \
                    published_at IS NOT NULL AS published, parked_at IS NOT NULL AS parked, \
                    coalesce(last_error, '') AS reason FROM public.outbox",
        )
        .fetch_all(&mut *tx)
        .await?;
        sqlx::query(statement).execute(&mut *tx).await?;
        let ids: Vec<i64> = rows
            .iter()
            .map(|r| r.try_get("id"))
            .collect::<Result<_, _>>()?;
        if let Err(e) = tx.commit().await {
            // Did it commit? The rows it read are all gone if it did.
            self.conn = None;
            let conn = self.conn().await?;
            let left: i64 = sqlx::query_scalar(
                "SELECT CASE WHEN to_regclass('public.outbox') IS NULL THEN 0 \
                 ELSE (SELECT count(*) FROM public.outbox WHERE id = ANY($1)) END",
            )
            .bind(&ids)
            .fetch_one(&mut *conn)
            .await?;
            if left > 0 || ids.is_empty() {
                return Err(e).context("TRUNCATE / DROP TABLE did not commit");
            }
        }
        let (mut unsent, mut parked) = (0, 0);
        let mut log = self.log();
        if statement.starts_with("TRUNCATE") {
            log.truncates += 1;
        }
        for r in &rows {
            let id: i64 = r.try_get("id")?;
            let ordering_key: String = r.try_get("ordering_key")?;
            let payload: String = r.try_get("payload")?;
            let published: bool = r.try_get("published")?;
            let is_parked: bool = r.try_get("parked")?;
            unsent += u64::from(!published && !is_parked);
            parked += u64::from(is_parked);
            if ordering_key.starts_with(KEY_PREFIX) {
                log.truncated_bad.insert(
                    id,
                    RowState {
                        parked: is_parked,
                        published,
                        reason: r.try_get("reason")?,
                        payload,
                        truncated: true,
                    },
                );
            } else if !log.poison.contains(&id) {
                log.truncated_good.push(CommittedRow {
                    id,
                    dedup_key: r.try_get("dedup_key")?,
                    ordering_key,
                    body_hash: body_hash(payload.as_bytes()),
                    owed: published,
                });
            }
        }
        Ok(format!(
            "removed {} rows ({unsent} unsent, {parked} parked)",
            rows.len()
        ))
    }

    /// A poison row (headers the decoder refuses) and three rows behind it on a key of their
    /// own; once the poison is parked, the operator deletes it: the three must then flow.
    async fn delete_parked(&mut self) -> anyhow::Result<String> {
        let n = self.operations;
        let key = format!("{OPERATOR_KEY_PREFIX}{n}");
        let conn = self.conn().await?;
        let mut tx = conn.begin().await?;
        let poison: i64 = sqlx::query_scalar(
            "INSERT INTO public.outbox (dedup_key, ordering_key, routing_key, event_type, payload, headers) \
             VALUES ($1, $2, 'soak.operator', 'SoakPoison', '{}', '{\"amount\": 1e400}') RETURNING id",
        )
        .bind(format!("{key}-poison"))
        .bind(&key)
        .fetch_one(&mut *tx)
        .await?;
        let mut followers = Vec::new();
        for i in 0..3 {
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO public.outbox (dedup_key, ordering_key, routing_key, event_type, payload) \
                 VALUES ($1, $2, 'soak.operator', 'SoakEvent', $3::jsonb) RETURNING id",
            )
            .bind(format!("{key}-{i}"))
            .bind(&key)
            .bind(json!({ "operator": n, "behind_poison": i }).to_string())
            .fetch_one(&mut *tx)
            .await?;
            followers.push(id);
        }
        tx.commit().await?;
        self.log().poison.insert(poison);

        let asked = Instant::now();
        let (parked, reason) = loop {
            let conn = self.conn().await?;
            let state: Option<(bool, bool, String)> = sqlx::query_as(
                "SELECT parked_at IS NOT NULL, published_at IS NOT NULL, coalesce(last_error, '') \
                 FROM public.outbox WHERE id = $1",
            )
            .bind(poison)
            .fetch_optional(&mut *conn)
            .await?;
            match state {
                Some((true, _, reason)) => break (true, reason),
                Some((false, true, _)) => {
                    self.log().problems.push(format!(
                        "{key}: the poison row id={poison} (headers {{\"amount\": 1e400}}) was marked published"
                    ));
                    break (false, String::new());
                }
                None => anyhow::bail!("{key}: the poison row id={poison} vanished"),
                Some(_) if asked.elapsed() > PARK_WITHIN => {
                    self.log().problems.push(format!(
                        "{key}: the poison row id={poison} was not parked within {PARK_WITHIN:?}"
                    ));
                    break (false, String::new());
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        if parked && !reason.contains("headers cannot be read") {
            self.log().problems.push(format!(
                "{key}: the poison row id={poison} was parked for {reason:?}, not its headers"
            ));
        }
        // Deleted by hand, as an operator does with a poison row (parked or not: the rows
        // behind it are to flow either way).
        let conn = self.conn().await?;
        sqlx::query("DELETE FROM public.outbox WHERE id = $1")
            .bind(poison)
            .execute(&mut *conn)
            .await?;
        let deleted_at = Instant::now();
        let waited = deleted_at.duration_since(asked);
        // The operator watches the key flow again (until the rows behind are marked, or
        // RELEASE_WATCH): no other fault (a TRUNCATE) comes in between.
        let mut marked_after = None;
        while deleted_at.elapsed() < RELEASE_WATCH {
            let conn = self.conn().await?;
            let marked: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM public.outbox WHERE id = ANY($1) AND published_at IS NOT NULL",
            )
            .bind(&followers)
            .fetch_one(&mut *conn)
            .await?;
            if marked == followers.len() as i64 {
                marked_after = Some(deleted_at.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.log().deletes.push(DeletedPoison {
            id: poison,
            ordering_key: key.clone(),
            followers,
            deleted_at,
        });
        Ok(format!(
            "{key}: poison id={poison} parked after {} ms, deleted; the 3 rows behind it {}",
            waited.as_millis(),
            match marked_after {
                Some(d) => format!("marked {} ms after the delete", d.as_millis()),
                None => format!("not marked within {RELEASE_WATCH:?}"),
            }
        ))
    }

    /// The payload of a pending good row changed by hand: the oldest pending row (likely in
    /// flight) or the newest (likely not fetched yet), at random.
    async fn update_pending(&mut self) -> anyhow::Result<String> {
        let n = self.operations;
        let oldest = self.rng.random_bool(0.5);
        let order = if oldest { "ASC" } else { "DESC" };
        let sql = format!(
            "WITH target AS (SELECT id, payload::text AS old FROM public.outbox \
                 WHERE published_at IS NULL AND parked_at IS NULL AND NOT held AND ordering_key LIKE 'key-%' \
                 ORDER BY id {order} LIMIT 1 FOR UPDATE SKIP LOCKED) \
             UPDATE public.outbox o SET payload = o.payload || jsonb_build_object('operator_update', $1::bigint) \
             FROM target WHERE o.id = target.id \
             RETURNING o.id, o.dedup_key, target.old, o.payload::text AS new"
        );
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(5) {
            let conn = self.conn().await?;
            let updated: Option<(i64, String, String, String)> = sqlx::query_as(&sql)
                .bind(n as i64)
                .fetch_optional(&mut *conn)
                .await?;
            if let Some((id, dedup_key, old, new)) = updated {
                let mut log = self.log();
                log.updates += 1;
                let versions = log.versions.entry(id).or_default();
                for body in [&old, &new] {
                    let h = body_hash(body.as_bytes());
                    if !versions.contains(&h) {
                        versions.push(h);
                    }
                }
                return Ok(format!(
                    "updated the {} pending row id={id} dedup_key={dedup_key}",
                    if oldest { "oldest" } else { "newest" }
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.log().updates_without_pending += 1;
        Ok("no pending row to update within 5 s".into())
    }
}

/// One mark as the soak's trigger logged it (`soak_marks`).
pub struct Mark {
    pub id: i64,
    pub dedup_key: String,
    pub body_hash: u64,
}

/// The row faults' figures at the end.
pub struct RowFigures {
    pub lines: Vec<String>,
    pub json: serde_json::Value,
    /// Failures, one line each (the run fails if any).
    pub failures: Vec<String>,
    /// Keys that flowed again later than [`KEY_RELEASE_TARGET`] after their parked row was
    /// deleted (listed; the logs are kept).
    pub slow_releases: Vec<String>,
}

/// Judges every bad row, the operator's deletes and updates, and compares every logged mark
/// with the deliveries. `end_bad`: bad rows in the table at the end.
pub fn figures(
    log: &RowLog,
    checker: &Checker,
    end_bad: &HashMap<i64, RowState>,
    marks: &[Mark],
    default_exchange: &str,
) -> RowFigures {
    let mut failures = Vec::new();

    // Bad rows.
    let mut outcomes: BTreeMap<Outcome, u64> = BTreeMap::new();
    let mut by_case: BTreeMap<&str, BTreeMap<&str, u64>> = BTreeMap::new();
    let no_messages = Vec::new();
    for record in &log.bad {
        let (state, received) = match record.insert {
            Ok(id) => (
                end_bad.get(&id).or_else(|| log.truncated_bad.get(&id)),
                checker.captured.get(&id).unwrap_or(&no_messages),
            ),
            Err(_) => (None, &no_messages),
        };
        let (outcome, why) = badrows::judge(
            &record.row,
            &record.insert,
            state,
            received,
            default_exchange,
        );
        *outcomes.entry(outcome).or_default() += 1;
        *by_case
            .entry(record.row.case)
            .or_default()
            .entry(outcome.name())
            .or_default() += 1;
        if outcome.is_failure() {
            failures.push(format!("bad row {}: {why}", outcome.name()));
        }
    }
    let count = |o: Outcome| outcomes.get(&o).copied().unwrap_or(0);
    let bad_failures: u64 = outcomes
        .iter()
        .filter(|(o, _)| o.is_failure())
        .map(|(_, n)| n)
        .sum();

    // Deleted poison rows: never delivered; the rows behind them delivered after the delete.
    let mut longest_release = Duration::ZERO;
    let mut released = 0u64;
    let mut releases_ms = Vec::new();
    // Deletes whose rows behind were removed by a TRUNCATE before they could flow.
    let mut followers_truncated = 0u64;
    let mut slow_releases = Vec::new();
    for d in &log.deletes {
        if checker.has(d.id) {
            failures.push(format!(
                "operator: the poison row id={} of {} was delivered",
                d.id, d.ordering_key
            ));
        }
        let truncated = d
            .followers
            .iter()
            .all(|f| log.truncated_good.iter().any(|r| r.id == *f && !r.owed));
        if truncated && !d.followers.iter().any(|f| checker.has(*f)) {
            followers_truncated += 1;
        } else if let Some(at) = d
            .followers
            .first()
            .and_then(|f| checker.first_delivered(*f))
        {
            released += 1;
            let took = at.saturating_duration_since(d.deleted_at);
            if took > KEY_RELEASE_TARGET {
                slow_releases.push(format!(
                    "{}: the rows behind the deleted poison row id={} flowed after {} ms",
                    d.ordering_key,
                    d.id,
                    took.as_millis()
                ));
            }
            releases_ms.push(took.as_millis() as u64);
            longest_release = longest_release.max(took);
        }
    }
    failures.extend(log.problems.iter().map(|p| format!("operator: {p}")));

    // Updated rows: which versions arrived (any is right; which is a figure).
    let (mut old_only, mut new_only, mut both, mut none) = (0u64, 0u64, 0u64, 0u64);
    for (id, versions) in &log.versions {
        let got: Vec<bool> = versions
            .iter()
            .map(|v| checker.received_body(*id, *v))
            .collect();
        let first = got.first().copied().unwrap_or(false);
        let later = got.iter().skip(1).any(|g| *g);
        match (first, later) {
            (true, true) => both += 1,
            (true, false) => old_only += 1,
            (false, true) => new_only += 1,
            (false, false) => none += 1,
        }
    }

    // Marks: every row version marked published was received.
    let unreceived: Vec<&Mark> = marks
        .iter()
        .filter(|m| !checker.received_body(m.id, m.body_hash))
        .collect();
    for m in unreceived.iter().take(20) {
        let got = checker.message_id(m.id);
        failures.push(format!(
            "marked published, never received: id={} dedup_key={:?}{}",
            m.id,
            m.dedup_key,
            match got {
                Some(_) => " (received, with another body)",
                None => "",
            }
        ));
    }

    let truncated_unsent = log.truncated_good.iter().filter(|r| !r.owed).count();
    let truncated_unsent_delivered = log
        .truncated_good
        .iter()
        .filter(|r| !r.owed && checker.has(r.id))
        .count();
    let actions = |a: Action| log.actions.get(a.name()).copied().unwrap_or(0);
    let lines = vec![
        format!(
            "bad rows: generated={} delivered_intact={} parked={} refused={} truncated={} not_inserted={} corrupted={} parked_not_delivered={} delivered_not_parked={} wrong_reason={} stuck={} not_refused={}",
            log.bad.len(),
            count(Outcome::Delivered),
            count(Outcome::Parked),
            count(Outcome::Refused),
            count(Outcome::Truncated),
            count(Outcome::NotInserted),
            count(Outcome::Corrupted),
            count(Outcome::ParkedNotDelivered),
            count(Outcome::DeliveredNotParked),
            count(Outcome::WrongReason),
            count(Outcome::Stuck),
            count(Outcome::NotRefused),
        ),
        format!(
            "operator: truncate={} drop-recreate={} longest_recreate_ms={} truncated_rows={} truncated_unsent={} truncated_unsent_delivered={} delete-parked={} keys_released={released} keys_truncated={followers_truncated} longest_key_release_ms={} slow_key_releases={} update-pending={} updated_rows={} no_pending_row={} updates_received_old_only={old_only} new_only={new_only} both={both} neither={none} problems={}",
            actions(Action::Truncate),
            actions(Action::DropRecreate),
            log.recreations_ms.iter().max().copied().unwrap_or(0),
            log.truncated_good.len() + log.truncated_bad.len(),
            truncated_unsent,
            truncated_unsent_delivered,
            actions(Action::DeleteParked),
            longest_release.as_millis(),
            slow_releases.len(),
            actions(Action::UpdatePending),
            log.updates,
            log.updates_without_pending,
            log.problems.len(),
        ),
        format!(
            "marks: logged={} not_received={}",
            marks.len(),
            unreceived.len()
        ),
    ];
    let json = json!({
        "bad_rows": {
            "generated": log.bad.len(),
            "outcomes": outcomes.iter().map(|(o, n)| (o.name().to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
            "by_case": by_case,
            "failures": bad_failures,
        },
        "operator": {
            "actions": log.actions,
            "truncated_rows": log.truncated_good.len() + log.truncated_bad.len(),
            "recreations_ms": log.recreations_ms,
            "truncated_unsent": truncated_unsent,
            "truncated_unsent_delivered": truncated_unsent_delivered,
            "keys_released": released,
            "keys_truncated": followers_truncated,
            "longest_key_release_ms": longest_release.as_millis() as u64,
            "key_releases_ms": releases_ms,
            "key_release_target_ms": KEY_RELEASE_TARGET.as_millis() as u64,
            "slow_key_releases": slow_releases.len(),
            "updated_rows": log.updates,
            "no_pending_row": log.updates_without_pending,
            "updates_received": { "old_only": old_only, "new_only": new_only, "both": both, "neither": none },
            "problems": log.problems,
        },
        "marks": { "logged": marks.len(), "not_received": unreceived.len() },
    });
    RowFigures {
        lines,
        json,
        failures,
        slow_releases,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::Delivery;

    fn delivery(id: i64, body: &str) -> Delivery {
        Delivery {
            id: Some(id),
            message_id: format!("m{id}"),
            ordering_key: "key-1".into(),
            body_hash: body_hash(body.as_bytes()),
            at: Instant::now(),
            redelivered: false,
            content: None,
        }
    }

    fn mark(id: i64, body: &str) -> Mark {
        Mark {
            id,
            dedup_key: format!("m{id}"),
            body_hash: body_hash(body.as_bytes()),
        }
    }

    #[test]
    fn a_marked_row_version_no_consumer_received_fails_the_run() {
        let mut c = Checker::default();
        c.observe(delivery(1, "{\"v\": 1}"));
        let log = RowLog::default();
        let ok = figures(&log, &c, &HashMap::new(), &[mark(1, "{\"v\": 1}")], "ex");
        assert!(ok.failures.is_empty(), "{:?}", ok.failures);
        // Marked in its updated version, received only in the old one; and a row never seen.
        let marks = [mark(1, "{\"v\": 2}"), mark(2, "{}")];
        let bad = figures(&log, &c, &HashMap::new(), &marks, "ex");
        assert_eq!(bad.failures.len(), 2, "{:?}", bad.failures);
        assert!(bad.lines[2].ends_with("not_received=2"), "{}", bad.lines[2]);
    }

    #[test]
    fn a_delivered_poison_row_fails_and_the_rows_behind_it_time_the_release() {
        let mut c = Checker::default();
        let deleted_at = Instant::now();
        c.observe(delivery(11, "{}"));
        let mut log = RowLog::default();
        log.deletes.push(DeletedPoison {
            id: 10,
            ordering_key: "op-1".into(),
            followers: vec![11, 12, 13],
            deleted_at,
        });
        let f = figures(&log, &c, &HashMap::new(), &[], "ex");
        assert!(f.failures.is_empty(), "{:?}", f.failures);
        assert!(f.lines[1].contains("keys_released=1"), "{}", f.lines[1]);
        c.observe(delivery(10, "{}"));
        let f = figures(&log, &c, &HashMap::new(), &[], "ex");
        assert_eq!(f.failures.len(), 1, "{:?}", f.failures);
    }
}
