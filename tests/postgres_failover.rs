//! PostgreSQL failover: the relay works only against the primary. With `postgres.url` naming a
//! primary and its streaming standby (`postgres://postgres@127.0.0.1:P1,127.0.0.1:P2/db`), the
//! primary stopped while producers write and the standby then promoted, the relay reports "not
//! the primary" meanwhile, follows to the new primary, loses nothing, keeps each key's order,
//! and sends duplicates only with their original's message_id. A relay pointed at a standby
//! alone publishes nothing until the standby is promoted.
//!
//! Both clusters are the test's own ([`PgCluster`]: `initdb`, then `pg_basebackup -R` for the
//! standby), on ports of their own, stopped and removed at the end; the shared server is not
//! touched. The primary is stopped with a fast shutdown, whose walsender sends every WAL record
//! to the connected standby before it exits: every commit the producer saw acknowledged is on
//! the promoted server, and "every committed row" is checked as the rows that server holds.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox_relay_testkit::prelude::*;
use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;

/// A primary and its streaming standby, both running, the standby streaming.
async fn primary_and_standby() -> (PgCluster, PgCluster) {
    let started = Instant::now();
    let mut primary = PgCluster::init("obr_pgfo").unwrap_or_else(|e| panic!("{e:#}"));
    primary.start().unwrap_or_else(|e| panic!("{e:#}"));
    let mut standby =
        PgCluster::standby_of(&primary, "obr_pgfo").unwrap_or_else(|e| panic!("{e:#}"));
    standby.start().unwrap_or_else(|e| panic!("{e:#}"));
    let admin = format!("{}/postgres", primary.url());
    eventually("the standby to stream from the primary", || async {
        let Ok(mut conn) = PgConnection::connect(&admin).await else {
            return false;
        };
        let streaming: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap_or(0);
        streaming == 1
    })
    .await;
    eprintln!(
        "primary and standby ready in {} ms",
        started.elapsed().as_millis()
    );
    (primary, standby)
}

/// The environment on `primary` (database made and migrated there, replicated to the standby),
/// with the health endpoint on.
async fn env_on(primary: &PgCluster) -> TestEnv {
    TestEnv::new(Setup::new().postgres_server(&primary.url()).set(
        "health",
        "listen",
        "\"127.0.0.1:0\"",
    ))
    .await
}

async fn wait_for_state(addr: &str, starts_with: &str) -> (u16, String) {
    eventually(
        &format!("the health endpoint to say {starts_with:?}"),
        || async { table_state(addr).await.1.starts_with(starts_with) },
    )
    .await;
    table_state(addr).await
}

/// The URL of the test's database on `cluster`.
fn db_url(cluster: &PgCluster, env: &TestEnv) -> String {
    format!("{}/{}", cluster.url(), env.db)
}

/// An application writing through a failover: one transaction of a few rows at a time, each
/// on the server of `urls` that takes writes (the first in order); a failed transaction is
/// not retried (its rows may or may not have committed), the next one gets new keys.
struct FailoverProducer {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    /// dedup keys of the transactions whose commit was acknowledged.
    acked: Arc<Mutex<Vec<String>>>,
    /// Commits acknowledged by each server of `urls`.
    acked_on: Arc<[AtomicUsize; 2]>,
}

impl FailoverProducer {
    fn start(env: &TestEnv, urls: [String; 2], keys: usize) -> FailoverProducer {
        let stop = CancellationToken::new();
        let acked = Arc::new(Mutex::new(Vec::new()));
        let acked_on = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let table = env.table.clone();
        let task = tokio::spawn({
            let (stop, acked, acked_on) = (stop.clone(), acked.clone(), acked_on.clone());
            async move {
                let mut conn: Option<(usize, PgConnection)> = None;
                let mut next = 0usize;
                while !stop.is_cancelled() {
                    let Some((server, c)) = conn.as_mut() else {
                        conn = writable(&urls).await;
                        // The application's reconnect pace, not a wait for anything.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let rows: Vec<NewRow> = (next..next + 3)
                        .map(|n| NewRow::new(format!("fo-{n}"), format!("fo-k{}", n % keys)))
                        .collect();
                    next += 3;
                    let written = async {
                        let mut tx = c.begin().await?;
                        insert_rows(&mut tx, &table, &rows).await?;
                        tx.commit().await
                    }
                    .await;
                    match written {
                        Ok(()) => {
                            acked_on[*server].fetch_add(1, Ordering::Relaxed);
                            let mut acked = acked.lock().unwrap();
                            acked.extend(rows.iter().map(|r| r.dedup_key.clone()));
                        }
                        Err(_) => conn = None,
                    }
                    // The producer's pace: load during the failover.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        });
        FailoverProducer {
            stop,
            task,
            acked,
            acked_on,
        }
    }

    fn acked_on(&self, server: usize) -> usize {
        self.acked_on[server].load(Ordering::Relaxed)
    }

    /// Stops writing; returns the dedup keys of every acknowledged commit.
    async fn stop(self) -> Vec<String> {
        self.stop.cancel();
        self.task.await.expect("the producer task");
        let acked = self.acked.lock().unwrap().clone();
        acked
    }
}

/// A connection to the first server of `urls` that takes writes, and its index.
async fn writable(urls: &[String; 2]) -> Option<(usize, PgConnection)> {
    for (index, url) in urls.iter().enumerate() {
        let Ok(mut conn) = PgConnection::connect(url).await else {
            continue;
        };
        let standby: bool = sqlx::query_scalar("SELECT pg_is_in_recovery()")
            .fetch_one(&mut conn)
            .await
            .unwrap_or(true);
        if !standby {
            return Some((index, conn));
        }
    }
    None
}

/// `(id, dedup_key)` of every row of the outbox table on `url`, and how many are unpublished.
async fn rows_on(url: &str, env: &TestEnv) -> (Vec<(i64, String)>, i64) {
    let mut conn = PgConnection::connect(url).await.expect("connect");
    let table = quoted_table(&env.table);
    let rows = sqlx::query_as(&format!("SELECT id, dedup_key FROM {table} ORDER BY id"))
        .fetch_all(&mut conn)
        .await
        .expect("read the rows");
    let unpublished = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {table} WHERE published_at IS NULL"
    ))
    .fetch_one(&mut conn)
    .await
    .expect("count the unpublished rows");
    (rows, unpublished)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_relay_follows_a_promoted_standby_and_loses_nothing_nor_reorders_a_key() {
    let (mut primary, standby) = primary_and_standby().await;
    let env = env_on(&primary).await;
    let url = env.relay_postgres_hosts(&[primary.host(), standby.host()]);
    assert!(url.contains(&format!("{},{}", primary.host(), standby.host())));
    let relay = env.start_relay();
    let addr = health_addr(&relay).await;
    wait_for_state(&addr, "relaying").await;
    let producer =
        FailoverProducer::start(&env, [db_url(&primary, &env), db_url(&standby, &env)], 25);
    // Rows flow through the primary first.
    env.consumer.wait_for(150).await;

    primary.stop();
    // The old primary refuses connections and the standby is not promoted yet: no primary.
    let (status, state) = wait_for_state(&addr, "not ready: PostgreSQL is not the primary").await;
    assert_eq!(status, 503, "{state}");
    assert!(
        state.contains(&standby.host()),
        "names the standby: {state}"
    );
    let scrape = Scrape::of(&addr).await;
    let not_primary = [("table", env.table.as_str()), ("state", "not_primary")];
    assert_eq!(
        scrape.value("outbox_relay_table_state", &not_primary),
        Some(1.0)
    );

    standby.promote().unwrap_or_else(|e| panic!("{e:#}"));
    wait_for_state(&addr, "relaying").await;
    // The producer goes on on the new primary, and its rows go out too.
    eventually("the producer to commit on the promoted standby", || async {
        producer.acked_on(1) >= 30
    })
    .await;
    let acked = producer.stop().await;

    let (rows, _) = rows_on(&db_url(&standby, &env), &env).await;
    let held: HashSet<&str> = rows.iter().map(|(_, k)| k.as_str()).collect();
    let missing: Vec<&String> = acked
        .iter()
        .filter(|k| !held.contains(k.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged commits missing on the promoted server: {missing:?}"
    );
    let received = env.consumer.wait_for(rows.len()).await;
    let delivered = delivered_ids(&received);
    let undelivered: Vec<i64> = rows
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| !delivered.contains(id))
        .collect();
    assert!(
        undelivered.is_empty(),
        "rows never delivered: {undelivered:?}"
    );
    assert_first_deliveries_in_id_order(&received);
    assert_duplicates_share_message_id(&received);
    eventually("every row to be marked on the new primary", || async {
        rows_on(&db_url(&standby, &env), &env).await.1 == 0
    })
    .await;

    let log = relay.log();
    assert_eq!(
        log.matches("the primary is on another host; following it")
            .count(),
        1,
        "one move, logged once:\n{log}"
    );
    assert!(
        log.contains(&format!("to=PostgreSQL at {}", standby.host())),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_on_a_standby_reports_not_the_primary_and_publishes_once_it_is_promoted() {
    let (mut primary, standby) = primary_and_standby().await;
    let env = env_on(&primary).await;
    let ids = env.insert(&rows_over_keys("sb", 5, 40)).await;
    // The rows reach the standby by replication.
    let on_standby = db_url(&standby, &env);
    eventually("the rows to be replayed on the standby", || async {
        rows_on(&on_standby, &env).await.0.len() == ids.len()
    })
    .await;
    env.relay_postgres_hosts(&[standby.host()]);
    let relay = env.start_relay();
    let addr = health_addr(&relay).await;
    let (status, state) = wait_for_state(&addr, "not ready: PostgreSQL is not the primary").await;
    assert_eq!(status, 503, "{state}");
    // It keeps looking: three more sessions on the standby, and still nothing published.
    let seen = standby.connections();
    eventually("the relay to look at the standby again", || async {
        standby.connections() >= seen + 3
    })
    .await;
    assert_eq!(table_state(&addr).await.1, state);
    assert!(
        env.consumer.received().is_empty(),
        "published from a standby"
    );
    assert_eq!(rows_on(&on_standby, &env).await.1, ids.len() as i64);
    assert_eq!(
        relay
            .log()
            .matches("PostgreSQL is not the primary (a standby, or read-only)")
            .count(),
        1,
        "logged once:\n{}",
        relay.log()
    );

    primary.stop();
    standby.promote().unwrap_or_else(|e| panic!("{e:#}"));
    let received = env.consumer.wait_for(ids.len()).await;
    assert_first_deliveries_in_id_order(&received);
    wait_for_state(&addr, "relaying").await;
    eventually("every row to be marked on the promoted standby", || async {
        rows_on(&on_standby, &env).await.1 == 0
    })
    .await;
}

/// Sessions opened in the test's database so far (PostgreSQL's own count), asked on `conn`, a
/// session the test keeps open, so the asking opens none.
async fn sessions(conn: &mut PgConnection, env: &TestEnv) -> i64 {
    sqlx::query_scalar("SELECT sessions FROM pg_stat_database WHERE datname = $1")
        .bind(&env.db)
        .fetch_one(conn)
        .await
        .expect("read the database's session count")
}

/// Inserts `rows` on a session of its own that writes whatever the database's default.
async fn insert_writable(env: &TestEnv, rows: &[NewRow]) -> Vec<i64> {
    let mut conn = PgConnection::connect(&env.pg_url).await.expect("connect");
    let mut tx = conn.begin().await.expect("begin");
    sqlx::query("SET TRANSACTION READ WRITE")
        .execute(&mut *tx)
        .await
        .expect("a writing transaction");
    let ids = insert_rows(&mut tx, &env.table, rows)
        .await
        .expect("insert outbox rows");
    tx.commit().await.expect("commit");
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_refused_as_read_only_is_not_the_primary_and_costs_the_rows_no_attempt() {
    let env = TestEnv::new(Setup::new().set("health", "listen", "\"127.0.0.1:0\"")).await;
    let relay = env.start_relay();
    let addr = health_addr(&relay).await;
    wait_for_state(&addr, "relaying").await;
    let first = env.insert(&rows_over_keys("ro-a", 3, 6)).await;
    env.consumer.wait_for(first.len()).await;

    // The test's database turns read-only for new sessions; the relay's statement sessions are
    // replaced by new ones, its lock session lives on: the next mark is refused (25006).
    // The test's own session, opened before: it stays writable.
    let mut admin = PgConnection::connect(&env.pg_url).await.expect("connect");
    let db = format!("\"{}\"", env.db);
    sqlx::raw_sql(&format!(
        "ALTER DATABASE {db} SET default_transaction_read_only = on"
    ))
    .execute(&mut admin)
    .await
    .expect("make the database read-only");
    sqlx::query(
        "SELECT count(pg_terminate_backend(a.pid)) FROM pg_stat_activity a \
         WHERE a.datname = $1 AND a.application_name = 'outbox-relay' AND NOT EXISTS ( \
             SELECT 1 FROM pg_locks l WHERE l.pid = a.pid AND l.locktype = 'advisory' AND l.granted)",
    )
    .bind(&env.db)
    .execute(&mut admin)
    .await
    .expect("terminate the relay's statement sessions");
    let second = insert_writable(&env, &rows_over_keys("ro-b", 3, 6)).await;
    let (status, state) = wait_for_state(&addr, "not ready: PostgreSQL is not the primary").await;
    assert_eq!(status, 503, "{state}");
    // It keeps looking, and nothing is counted against the rows meanwhile.
    let seen = sessions(&mut admin, &env).await;
    let admin = tokio::sync::Mutex::new(admin);
    eventually("the relay to look for the primary again", || async {
        sessions(&mut *admin.lock().await, &env).await >= seen + 3
    })
    .await;
    let mut admin = admin.into_inner();
    for id in first.iter().chain(&second) {
        let row = env.row(*id).await;
        assert_eq!(row.attempts, 0, "row {id}: {row:?}");
        assert!(row.parked_at.is_none(), "row {id}: {row:?}");
    }

    sqlx::raw_sql(&format!(
        "ALTER DATABASE {db} RESET default_transaction_read_only"
    ))
    .execute(&mut admin)
    .await
    .expect("make the database writable again");
    wait_for_state(&addr, "relaying").await;
    let received = env.consumer.wait_for(first.len() + second.len()).await;
    assert_first_deliveries_in_id_order(&received);
    assert_duplicates_share_message_id(&received);
    env.wait_all_marked().await;
    for id in &second {
        assert_eq!(env.row(*id).await.attempts, 0, "row {id}");
    }
    let log = relay.log();
    assert_eq!(
        log.matches("PostgreSQL is not the primary (a standby, or read-only)")
            .count(),
        1,
        "logged once:\n{log}"
    );
    assert!(log.contains("(SQLSTATE 25006)"), "the refusal:\n{log}");
}
