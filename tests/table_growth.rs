//! Bounded table growth: `on_published = "delete"` deletes each confirmed row instead of marking
//! it, `retention` has a sweeper delete published rows once they are older than that, and
//! `migrate` gives every outbox table autovacuum settings of its own. Whatever either deletes,
//! it is never a pending, held or parked row.

use std::time::Duration;

use outbox_relay::cluster::member::{self, MemberSettings};
use outbox_relay::config::{OnExhausted, Settings, TableName};
use outbox_relay::relay::{SweepStep, Sweeper};
use outbox_relay::shutdown::Shutdown;
use outbox_relay::store::leases::Leases;
use outbox_relay::store::{Coordination, LockState, Store, TableSql};
use outbox_relay_testkit::prelude::*;

/// Rows of the test's table that satisfy `condition` (SQL).
async fn count(env: &TestEnv, condition: &str) -> i64 {
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {} WHERE {condition}",
        quoted_table(&env.table)
    ))
    .fetch_one(&env.pool)
    .await
    .unwrap_or_else(|e| panic!("counting rows where {condition}: {e}"))
}

/// Runs one statement on the test database.
async fn execute(env: &TestEnv, sql: &str) {
    sqlx::raw_sql(sql)
        .execute(&env.pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Inserts `rows` rows with dedup keys `<prefix>-1` … through the table's trigger and marks
/// them published `age` ago, as if a relay had published them then.
async fn insert_published(env: &TestEnv, prefix: &str, rows: i64, age: &str) {
    let table = quoted_table(&env.table);
    execute(
        env,
        &format!(
            "INSERT INTO {table} (dedup_key, ordering_key, routing_key, event_type, payload) \
             SELECT '{prefix}-' || g, '{prefix}-k' || (g % 50), 'old', 'old', '{{}}' FROM generate_series(1, {rows}) g; \
             UPDATE {table} SET published_at = now() - interval '{age}', created_at = now() - interval '{age}' \
             WHERE dedup_key LIKE '{prefix}-%';"
        ),
    )
    .await;
}

/// `n` rows of ordering key `key` (dedup keys `<key>-1` …).
fn queue_of(key: &str, n: usize) -> Vec<NewRow> {
    (1..=n)
        .map(|i| NewRow::new(format!("{key}-{i}"), key))
        .collect()
}

/// The storage parameters of the test's table (`name=value`).
async fn reloptions(env: &TestEnv) -> Vec<String> {
    sqlx::query_scalar("SELECT coalesce(reloptions, '{}') FROM pg_class WHERE oid = $1::regclass")
        .bind(quoted_table(&env.table))
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

/// True when the test's table has a retention index.
async fn has_retention_index(env: &TestEnv) -> bool {
    let index = TableName::parse(&env.table).unwrap().derived("published");
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_indexes WHERE indexname = $1)")
        .bind(index)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

/// Delete mode, with a refused row parked at its first failure.
fn delete_mode_parking_at_once() -> Setup {
    Setup::new()
        .set("outbox", "on_published", "\"delete\"")
        .set("outbox.retry", "max_attempts", "1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_mode_delivers_every_row_in_key_order_deletes_it_and_keeps_a_parked_row_until_retry()
{
    let env = TestEnv::new(delete_mode_parking_at_once()).await;
    // The head of key "late" is refused (its exchange does not exist yet) and parked at once;
    // the key's later rows wait behind it.
    let late = format!("{}_late", env.name);
    let parked = env
        .insert(&[NewRow::new("late-head", "late").exchange(&late)])
        .await[0];
    let behind = env.insert(&queue_of("late", 3)).await;
    let relay = env.start_relay();
    let first = env.insert(&rows_over_keys("a", 7, 300)).await;
    let producer = Producer::start(&env, "p", 5, 10, Duration::from_millis(20));
    relay.wait_for_log("row parked").await;
    let produced = producer.stop().await;

    let received = env.consumer.wait_for(first.len() + produced).await;
    assert_first_deliveries_in_id_order(&received);
    assert!(
        delivered_of_key(&received, "late").is_empty(),
        "the parked key is held"
    );
    // Every delivered row is gone; what is left is the parked row and the rows behind it.
    eventually("every delivered row to be deleted", || async {
        count(&env, "true").await == 1 + behind.len() as i64
    })
    .await;
    assert_eq!(count(&env, "published_at IS NOT NULL").await, 0);
    let row = env.row(parked).await;
    assert!(
        row.parked_at.is_some() && row.published_at.is_none(),
        "{row:?}"
    );
    let status = env.status_json().await;
    assert_eq!(
        (
            status["pending"].as_i64(),
            status["parked"].as_i64(),
            status["published"].as_i64()
        ),
        (Some(3), Some(1), Some(0)),
        "{status}"
    );
    assert_eq!(status["on_published"], "delete", "{status}");

    // Released by `retry` once its exchange exists: it goes out, then its key's rows in order,
    // and each is deleted.
    env.declare_exchange(&late).await;
    env.bind(&late, "#").await;
    let released = env.cli(&["retry", "--id", &parked.to_string()]).await;
    assert_eq!(released.code, 0, "{released:?}");
    let received = env.consumer.wait_for(first.len() + produced + 4).await;
    let mut key = vec![parked];
    key.extend(&behind);
    assert_eq!(delivered_of_key(&received, "late"), key);
    eventually("the table to be empty", || async {
        count(&env, "true").await == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_delete_mode_a_key_whose_holder_was_deleted_while_no_relay_ran_is_released_by_the_next_relay(
) {
    let env = TestEnv::new(delete_mode_parking_at_once()).await;
    let late = format!("{}_late", env.name);
    let head = env
        .insert(&[NewRow::new("head", "k").exchange(&late)])
        .await[0];
    let behind = env.insert(&queue_of("k", 3)).await;
    let mut relay = env.start_relay();
    relay.wait_for_log("row parked").await;
    eventually("the rows behind the head to be held", || async {
        env.status_json().await["held"].as_i64() == Some(3)
    })
    .await;
    relay.sigterm();
    relay.wait_exit().await;

    // What a relay stopped between its delete of the holder and the release leaves behind:
    // the holder gone, the key still noted as held.
    execute(
        &env,
        &format!("DELETE FROM {} WHERE id = {head}", quoted_table(&env.table)),
    )
    .await;
    let _relay = env.start_relay();
    let received = env.consumer.wait_for(3).await;
    assert_eq!(delivered_of_key(&received, "k"), behind);
    eventually("the released rows to be deleted", || async {
        count(&env, "true").await == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweeper_deletes_only_published_rows_older_than_the_retention_under_concurrent_inserts()
{
    let env = TestEnv::new(
        Setup::new()
            .set("outbox", "retention", "\"1m\"")
            .set("outbox.retry", "max_attempts", "1")
            .set("health", "listen", "\"127.0.0.1:0\""),
    )
    .await;
    // History: 12,000 rows published two hours ago (three batches and a bit), one published
    // 30 s ago (inside the retention).
    insert_published(&env, "old", 12_000, "2 hours").await;
    insert_published(&env, "young", 1, "30 seconds").await;
    // A parked row and the rows held behind it, all created a day ago: old, but not published.
    let late = format!("{}_late", env.name);
    let parked = env
        .insert(&[NewRow::new("stuck-head", "stuck").exchange(&late)])
        .await[0];
    env.insert(&queue_of("stuck", 4)).await;
    execute(
        &env,
        &format!(
            "UPDATE {} SET created_at = now() - interval '1 day' WHERE dedup_key LIKE 'stuck%'",
            quoted_table(&env.table)
        ),
    )
    .await;

    // Producers insert from before the relay starts until after its first sweep.
    let producer = Producer::start(&env, "live", 4, 5, Duration::from_millis(5));
    let relay = env.start_relay();
    relay
        .wait_for_log("deleted published rows older than the retention")
        .await;
    relay.wait_for_log("row parked").await;
    let produced = producer.stop().await;
    let received = env.consumer.wait_for(produced).await;
    assert_eq!(first_deliveries(&received).len(), produced);

    let log = relay.log();
    let line = log
        .lines()
        .find(|l| l.contains("deleted published rows older than the retention"))
        .unwrap_or_default();
    assert!(
        line.contains("rows=12000"),
        "one line for the sweep: {line}"
    );
    assert_eq!(count(&env, "dedup_key LIKE 'old-%'").await, 0);
    assert_eq!(count(&env, "dedup_key LIKE 'young-%'").await, 1);
    // Every row the producers wrote is still there (pending then, published now), and so are
    // the parked row and the rows behind it.
    assert_eq!(
        count(&env, "dedup_key LIKE 'live-%'").await,
        produced as i64
    );
    assert_eq!(
        count(&env, "dedup_key LIKE 'stuck%' AND published_at IS NULL").await,
        5
    );
    assert!(env.row(parked).await.parked_at.is_some());

    // The sweep's progress in the metrics.
    let scrape = Scrape::of(&health_addr(&relay).await).await;
    let t = [("table", env.table.as_str())];
    assert_eq!(
        scrape.value("outbox_relay_retention_deleted_rows_total", &t),
        Some(12_000.0),
        "{}",
        scrape.text
    );
    assert!(scrape.value("outbox_relay_retention_last_sweep_timestamp_seconds", &t) > Some(0.0));
    let oldest = scrape
        .value("outbox_relay_oldest_published_age_seconds", &t)
        .unwrap();
    assert!(
        (25.0..3600.0).contains(&oldest),
        "the young row is the oldest left: {oldest}"
    );
}

/// The sweeper of the test's table in this process, and the coordination session holding the
/// table's lock, with a membership of the table: the first one owns every partition, a second
/// one (another process's) none, so only the first sweeps.
async fn sweeper(env: &TestEnv, retention: Duration) -> (Sweeper, Coordination, Store) {
    let settings = Settings::load(&env.config_path).expect("the test's config");
    let store = Store::connect(&settings.postgres).await.unwrap();
    let table = TableName::parse(&env.table).unwrap();
    let sql = TableSql::new(&table, OnExhausted::HoldKey);
    let coordination = Coordination::start(
        &settings.postgres,
        store.servers(),
        std::slice::from_ref(&sql),
        false,
        Duration::from_millis(200),
        Duration::from_secs(1),
        Default::default(),
    )
    .unwrap();
    let mut lock = coordination.lock(0);
    while matches!(lock.state(), LockState::Connecting) {
        lock.changed().await;
    }
    let membership = member::start_in(
        Leases::new(store.pool().clone(), table, settings.lease()),
        MemberSettings {
            name: "table_growth".into(),
            partitions: settings.outbox[0].partitions,
            lease: settings.lease(),
            heartbeat: settings.relay.heartbeat,
            settle_margin: settings.settle_margin(),
        },
        Some(lock.clone()),
        // Ends with the test (the membership's lease runs out with it).
        tokio_util::sync::CancellationToken::new(),
    );
    let mut ownership = membership.ownership.clone();
    // Registered, and done claiming what was free (all of it, or nothing).
    ownership
        .wait_for(|o| o.member.is_some() && o.until.is_some())
        .await
        .unwrap();
    let sweeper = Sweeper::new(
        store.clone(),
        sql,
        retention,
        lock,
        membership.ownership,
        Shutdown::new(),
    );
    (sweeper, coordination, store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sweep_step_deletes_at_most_a_batch_oldest_first_and_a_standby_deletes_nothing() {
    let env = TestEnv::new(Setup::new().set("outbox", "retention", "\"1m\"")).await;
    insert_published(&env, "oldest", 4_000, "3 hours").await;
    insert_published(&env, "older", 1_010, "2 hours").await;
    insert_published(&env, "inside", 10, "10 seconds").await;
    env.insert(&rows_over_keys("pending", 2, 10)).await;
    execute(
        &env,
        &format!(
            "UPDATE {} SET created_at = now() - interval '1 day' WHERE published_at IS NULL",
            quoted_table(&env.table)
        ),
    )
    .await;

    let (mut active, coordination, store) = sweeper(&env, Duration::from_secs(60)).await;
    // A second process's sweeper (its own coordination session) stands by behind the first.
    let (mut standby, standby_coordination, standby_store) =
        sweeper(&env, Duration::from_secs(60)).await;
    assert_eq!(standby.step().await.unwrap(), SweepStep::NotHolding);

    let progress = active.progress();
    assert_eq!(
        active.step().await.unwrap(),
        SweepStep::Deleted {
            rows: 5_000,
            full: true
        }
    );
    // Oldest first: what is left of the history is the youngest ten rows past the retention.
    assert_eq!(count(&env, "dedup_key LIKE 'oldest-%'").await, 0);
    assert_eq!(count(&env, "dedup_key LIKE 'older-%'").await, 10);
    assert_eq!(
        active.step().await.unwrap(),
        SweepStep::Deleted {
            rows: 10,
            full: false
        }
    );
    assert_eq!(
        active.step().await.unwrap(),
        SweepStep::Deleted {
            rows: 0,
            full: false
        }
    );
    assert_eq!(progress.rows_deleted_total(), 5_010);
    assert_eq!(count(&env, "dedup_key LIKE 'inside-%'").await, 10);
    assert_eq!(count(&env, "published_at IS NULL").await, 10);
    drop((active, standby));
    for c in [coordination, standby_coordination] {
        c.close().await;
    }
    for s in [store, standby_store] {
        s.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_sets_autovacuum_parameters_a_table_lacks_and_builds_the_retention_index_only_with_retention(
) {
    let env = TestEnv::new(Setup::new()).await;
    let options = reloptions(&env).await;
    for expected in [
        "autovacuum_vacuum_scale_factor=0.01",
        "autovacuum_vacuum_insert_scale_factor=0.01",
        "autovacuum_analyze_scale_factor=0.02",
    ] {
        assert!(options.iter().any(|o| o == expected), "{options:?}");
    }
    assert!(!has_retention_index(&env).await, "no retention, no index");

    // An operator's own value stays; migrate has nothing to do.
    execute(
        &env,
        &format!(
            "ALTER TABLE {} SET (autovacuum_vacuum_scale_factor = 0.05)",
            quoted_table(&env.table)
        ),
    )
    .await;
    let again = env.cli(&["migrate"]).await;
    assert!(
        again.code == 0 && again.stdout.contains("up to date"),
        "{again:?}"
    );
    assert!(reloptions(&env)
        .await
        .contains(&"autovacuum_vacuum_scale_factor=0.05".to_owned()));

    // With a retention, migrate builds the sweeper's index; without it again, drops it.
    let config = std::fs::read_to_string(&env.config_path).unwrap();
    let retained = config.replace("[[outbox]]\n", "[[outbox]]\nretention = \"7d\"\n");
    std::fs::write(&env.config_path, &retained).unwrap();
    let built = env.cli(&["migrate"]).await;
    assert!(
        built.code == 0 && built.stdout.contains("built the retention index"),
        "{built:?}"
    );
    assert!(has_retention_index(&env).await);
    let again = env.cli(&["migrate"]).await;
    assert!(again.stdout.contains("up to date"), "{again:?}");
    std::fs::write(&env.config_path, &config).unwrap();
    let dropped = env.cli(&["migrate"]).await;
    assert!(
        dropped.code == 0 && dropped.stdout.contains("dropped the retention index"),
        "{dropped:?}"
    );
    assert!(!has_retention_index(&env).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_beside_delete_mode_or_below_a_minute_is_a_config_error_naming_the_table_and_key()
{
    let env = TestEnv::new(
        Setup::new()
            .without_migrate()
            .set("outbox", "on_published", "\"delete\"")
            .set("outbox", "retention", "\"7d\""),
    )
    .await;
    for command in ["run", "migrate"] {
        let out = env.cli(&[command]).await;
        assert_eq!(out.code, 78, "{out:?}");
        assert!(
            out.stderr.contains("outbox[0].retention") && out.stderr.contains(&env.table),
            "{}",
            out.stderr
        );
        assert!(
            out.stderr.contains(&env.config_path.display().to_string()),
            "{}",
            out.stderr
        );
    }
    // Nothing was touched: the table does not exist.
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(quoted_table(&env.table))
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert!(!exists);

    let short = TestEnv::new(
        Setup::new()
            .without_migrate()
            .set("outbox", "retention", "\"30s\""),
    )
    .await;
    let out = short.cli(&["check-config"]).await;
    assert_eq!(out.code, 78, "{out:?}");
    assert!(
        out.stderr.contains("outbox[0].retention") && out.stderr.contains("at least 1m"),
        "{}",
        out.stderr
    );
}
