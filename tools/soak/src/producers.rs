//! Application-like producers: each on its own connection, writing single- and multi-row
//! transactions into the outbox at a paced rate, rolling some back (those rows must never be
//! delivered) and retrying some with the same dedup_key (`ON CONFLICT (dedup_key) DO NOTHING`),
//! as an application does after a timeout or an ambiguous commit.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_relay_testkit::servers::Servers;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;

const INSERT: &str = "INSERT INTO public.outbox (dedup_key, ordering_key, routing_key, event_type, payload, headers) \
                      VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb) ON CONFLICT (dedup_key) DO NOTHING";

/// Counters shared by every producer.
#[derive(Default)]
pub struct ProducerStats {
    pub committed_rows: AtomicU64,
    pub committed_txs: AtomicU64,
    pub rolled_back_txs: AtomicU64,
    pub rolled_back_rows: AtomicU64,
    /// Inserts of an already committed dedup_key (expected to insert nothing).
    pub dedup_retries: AtomicU64,
    /// Of those, the ones that inserted a row after all (must stay 0).
    pub dedup_reinserted: AtomicU64,
    /// Transactions that failed (connection lost, server restarting) and were retried.
    pub failed_attempts: AtomicU64,
    /// Failures at COMMIT, where the outcome is unknown until the retry.
    pub ambiguous_commits: AtomicU64,
}

/// What one producer knows at the end.
#[derive(Default)]
pub struct ProducerLog {
    /// Rows whose transaction this producer saw commit.
    pub acknowledged: Vec<Acknowledged>,
    pub rolled_back: Vec<String>,
    /// dedup_keys of a transaction given up at shutdown: committed or not, nobody knows.
    pub uncertain: Vec<String>,
    /// dedup_keys a retry inserted again (right only after a TRUNCATE removed the first).
    pub reinserted: Vec<String>,
}

/// A row this producer saw commit.
pub struct Acknowledged {
    pub dedup_key: String,
    /// When its first attempt began: the row was committed after this (an ambiguous commit's
    /// retry may be later than the commit itself, so the retry's start would not do).
    pub began: Instant,
}

#[derive(Clone)]
struct Row {
    dedup_key: String,
    ordering_key: String,
    routing_key: String,
    event_type: &'static str,
    payload: String,
    headers: String,
}

enum Plan {
    Commit(Vec<Row>),
    Rollback(Vec<Row>),
}

/// The shape of the load.
#[derive(Clone, Copy)]
pub struct Load {
    pub rows_per_second: f64,
    pub keys: u32,
}

/// Held shared by each transaction: the operator's drop and re-creation of the table holds it
/// exclusively, as an application paused for that maintenance (the table's ids then go on
/// where they were, so that a row's id names one row for the whole run).
pub type Gate = Arc<tokio::sync::RwLock<()>>;

/// Runs producer `index` until `stop`.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    index: u32,
    seed: u64,
    servers: Servers,
    database: String,
    load: Load,
    stats: Arc<ProducerStats>,
    gate: Gate,
    stop: CancellationToken,
) -> ProducerLog {
    let mut rng = ChaCha8Rng::seed_from_u64(
        seed ^ (u64::from(index) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15),
    );
    let mut log = ProducerLog::default();
    let mut conn: Option<PgConnection> = None;
    let mut recent: VecDeque<Row> = VecDeque::with_capacity(64);
    let mut serial = 0u64;
    let mut next_at = tokio::time::Instant::now();
    let mut new_row = |rng: &mut ChaCha8Rng, prefix: &str| {
        serial += 1;
        let key = rng.random_range(0..load.keys);
        let pad = "x".repeat(rng.random_range(0..200));
        let dedup_key = format!("{prefix}p{index}-{serial}");
        Row {
            payload: serde_json::json!({ "event": dedup_key, "producer": index, "n": serial, "pad": pad }).to_string(),
            headers: serde_json::json!({ "producer": index }).to_string(),
            dedup_key,
            ordering_key: format!("key-{key}"),
            routing_key: format!("soak.key.{key}"),
            event_type: "SoakEvent",
        }
    };
    while !stop.is_cancelled() {
        let roll: f64 = rng.random();
        let plan = if roll < 0.6 {
            Plan::Commit(vec![new_row(&mut rng, "")])
        } else if roll < 0.8 {
            let n = rng.random_range(2..=6);
            Plan::Commit((0..n).map(|_| new_row(&mut rng, "")).collect())
        } else if roll < 0.9 {
            let n = rng.random_range(1..=4);
            Plan::Rollback((0..n).map(|_| new_row(&mut rng, "rb-")).collect())
        } else {
            // A retried request: the same event again (already committed), plus a new one.
            let mut rows = vec![new_row(&mut rng, "")];
            if !recent.is_empty() {
                let again = recent[rng.random_range(0..recent.len())].clone();
                rows.insert(rng.random_range(0..=1), again);
            }
            Plan::Commit(rows)
        };
        let fresh = match &plan {
            Plan::Commit(rows) => rows
                .iter()
                .filter(|r| !recent.iter().any(|p| p.dedup_key == r.dedup_key))
                .count(),
            Plan::Rollback(rows) => rows.len(),
        };
        // Pace by rows; never burst to catch up after an outage.
        next_at += Duration::from_secs_f64(fresh as f64 / load.rows_per_second);
        let now = tokio::time::Instant::now();
        if next_at + Duration::from_secs(1) < now {
            next_at = now;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(next_at) => {}
            _ = stop.cancelled() => break,
        }
        match plan {
            Plan::Rollback(rows) => {
                // Whatever happens, these rows never commit.
                log.rolled_back
                    .extend(rows.iter().map(|r| r.dedup_key.clone()));
                stats
                    .rolled_back_rows
                    .fetch_add(rows.len() as u64, Ordering::Relaxed);
                let open = gate.read().await;
                let written = write(&mut conn, &servers, &database, &rows, false).await;
                drop(open);
                if written.is_ok() {
                    stats.rolled_back_txs.fetch_add(1, Ordering::Relaxed);
                } else {
                    stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
                }
            }
            Plan::Commit(rows) => {
                let retried: Vec<bool> = rows
                    .iter()
                    .map(|r| recent.iter().any(|p| p.dedup_key == r.dedup_key))
                    .collect();
                let began = Instant::now();
                let given_up_at = began + Duration::from_secs(60);
                loop {
                    let open = gate.read().await;
                    let written = write(&mut conn, &servers, &database, &rows, true).await;
                    drop(open);
                    match written {
                        Ok(inserted) => {
                            for ((row, retried), inserted) in
                                rows.iter().zip(&retried).zip(&inserted)
                            {
                                if *retried {
                                    stats.dedup_retries.fetch_add(1, Ordering::Relaxed);
                                    if *inserted {
                                        stats.dedup_reinserted.fetch_add(1, Ordering::Relaxed);
                                        log.reinserted.push(row.dedup_key.clone());
                                    }
                                } else {
                                    log.acknowledged.push(Acknowledged {
                                        dedup_key: row.dedup_key.clone(),
                                        began,
                                    });
                                    stats.committed_rows.fetch_add(1, Ordering::Relaxed);
                                    if recent.len() == 64 {
                                        recent.pop_front();
                                    }
                                    recent.push_back(row.clone());
                                }
                            }
                            stats.committed_txs.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        Err(at_commit) => {
                            stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
                            if at_commit {
                                stats.ambiguous_commits.fetch_add(1, Ordering::Relaxed);
                            }
                            if stop.is_cancelled() && Instant::now() > given_up_at {
                                log.uncertain
                                    .extend(rows.iter().map(|r| r.dedup_key.clone()));
                                break;
                            }
                            // The same rows again: ON CONFLICT makes the retry safe.
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
            }
        }
    }
    log
}

/// One transaction; returns per row whether it inserted, or `Err(true)` when the failure
/// happened at COMMIT (the outcome is unknown).
async fn write(
    conn: &mut Option<PgConnection>,
    servers: &Servers,
    database: &str,
    rows: &[Row],
    commit: bool,
) -> Result<Vec<bool>, bool> {
    if conn.is_none() {
        match servers.connect_pg(database, "obr-soak-producer").await {
            Ok(c) => *conn = Some(c),
            Err(_) => return Err(false),
        }
    }
    let Some(c) = conn.as_mut() else {
        return Err(false);
    };
    let outcome = async {
        let mut tx = c.begin().await.map_err(|_| false)?;
        let mut inserted = Vec::with_capacity(rows.len());
        for r in rows {
            let done = sqlx::query(INSERT)
                .bind(&r.dedup_key)
                .bind(&r.ordering_key)
                .bind(&r.routing_key)
                .bind(r.event_type)
                .bind(&r.payload)
                .bind(&r.headers)
                .execute(&mut *tx)
                .await
                .map_err(|_| false)?;
            inserted.push(done.rows_affected() == 1);
        }
        if commit {
            tx.commit().await.map_err(|_| true)?;
        } else {
            tx.rollback().await.map_err(|_| false)?;
        }
        Ok(inserted)
    }
    .await;
    if outcome.is_err() {
        *conn = None;
    }
    outcome
}
