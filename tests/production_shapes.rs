//! The shapes production brings, each at its size: more outbox tables than pool connections,
//! a held key with a long queue behind it, a long poll interval on a quiet database, and
//! `status` beside a long published history.

use std::time::Duration;

use outbox_relay_testkit::prelude::*;
use serde_json::Value;

/// Inserts `count` rows of one key with one statement (the order guard runs per row).
async fn insert_queue(env: &TestEnv, key: &str, count: i64) {
    sqlx::query(&format!(
        "INSERT INTO {} (dedup_key, ordering_key, routing_key, event_type, payload) \
         SELECT $1 || '-' || g, $1, 'q', 'queued', '{{}}' FROM generate_series(1, $2) g",
        quoted_table(&env.table)
    ))
    .bind(key)
    .bind(count)
    .execute(&env.pool)
    .await
    .expect("insert the queue");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_tables_with_four_pool_connections_are_all_relayed_over_one_session_and_one_connection(
) {
    const TABLES: usize = 60;
    let env = TestEnv::new(Setup::new().set("postgres", "max_connections", "4")).await;
    let tables: Vec<String> = (1..TABLES).map(|i| format!("tenants.t{i}")).collect();
    env.add_tables(&tables).await;
    let relay = env.start_relay();
    relay.wait_for_log("relaying").await;

    let mut expected = env.insert(&rows_over_keys("t0", 2, 5)).await.len();
    let mut tx = env.pool.begin().await.unwrap();
    for i in 1..TABLES {
        let rows = rows_over_keys(&format!("t{i}"), 2, 5);
        expected += insert_rows(&mut tx, &format!("tenants.t{i}"), &rows)
            .await
            .unwrap()
            .len();
    }
    tx.commit().await.unwrap();
    let received = env.consumer.wait_for(expected).await;
    let tables: std::collections::HashSet<String> = received
        .iter()
        .filter_map(|m| m.header_str("x-outbox-table"))
        .collect();
    assert_eq!(tables.len(), TABLES, "every table delivered");

    // The budget: the pool (4) and the coordination session, whatever the table count.
    let sessions: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name = 'outbox-relay'",
    )
    .bind(&env.db)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(
        sessions <= 5,
        "{sessions} PostgreSQL sessions for {TABLES} tables"
    );
    let connection_name = format!("obr-test {}", env.name);
    let listing = std::process::Command::new("rabbitmqctl")
        .args(["list_connections", "-q", "client_properties"])
        .output()
        .expect("rabbitmqctl list_connections");
    let connections = String::from_utf8_lossy(&listing.stdout)
        .lines()
        .filter(|l| l.contains(&format!("\"{connection_name}\"")))
        .count();
    assert_eq!(connections, 1, "one AMQP connection for {TABLES} tables");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_key_holds_its_long_queue_out_of_the_way_of_every_other_key_and_releases_it_in_order(
) {
    let env = TestEnv::new(Setup::new().set("outbox.retry", "max_attempts", "1")).await;
    // The head of key "hot" can never be sent as it stands: parked at once, key held. Its
    // queue is there before the relay starts, so the relay moves it out of the due index
    // itself (in chunks); rows inserted later start out held.
    let head = env
        .insert(&[NewRow::new("hot-head", "hot").routing_key(&"r".repeat(300))])
        .await[0];
    insert_queue(&env, "hot", 12_000).await;
    let others = env.insert(&rows_over_keys("cold", 100, 2_000)).await;
    let relay = env.start_relay();
    let received = env.consumer.wait_for(2_000).await;
    assert!(env.row(head).await.parked_at.is_some());
    assert_eq!(
        first_deliveries(&received).len(),
        2_000,
        "only the other keys' rows"
    );
    for key in 0..100 {
        let key = format!("cold-k{key}");
        let ids = delivered_of_key(&received, &key);
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{key} in id order");
    }
    assert!(others
        .iter()
        .all(|id| delivered_ids(&received).contains(id)));
    // Every row queued behind the parked head waits outside the due index, including rows
    // inserted for the key while it is held.
    eventually("the queue behind the parked head to be held", || async {
        env.status_json().await["held"].as_i64() == Some(12_000)
    })
    .await;
    assert_eq!(env.status_json().await["parked"].as_i64(), Some(1));
    let late: Vec<NewRow> = (0..3)
        .map(|i| NewRow::new(format!("hot-late-{i}"), "hot"))
        .collect();
    env.insert(&late).await;
    sqlx::query(&format!(
        "INSERT INTO {} (dedup_key, ordering_key, routing_key, event_type, payload) \
         SELECT 'hot-more-' || g, 'hot', 'q', 'queued', '{{}}' FROM generate_series(1, 7) g",
        quoted_table(&env.table)
    ))
    .execute(&env.pool)
    .await
    .unwrap();
    assert_eq!(env.status_json().await["held"].as_i64(), Some(12_010));

    // Fixed and released: the head, then its queue, in id order.
    sqlx::query(&format!(
        "UPDATE {} SET routing_key = 'fixed' WHERE id = $1",
        quoted_table(&env.table)
    ))
    .bind(head)
    .execute(&env.pool)
    .await
    .unwrap();
    let released = env.cli(&["retry", "--key", "hot"]).await;
    assert!(released.stdout.contains("released 1"), "{released:?}");
    let received = env.consumer.wait_for(2_000 + 1 + 12_010).await;
    let hot = delivered_of_key(&received, "hot");
    assert_eq!(hot.len(), 12_011);
    assert_eq!(hot[0], head, "the head goes first");
    assert!(
        hot.windows(2).all(|w| w[0] < w[1]),
        "the key's rows in id order"
    );
    env.wait_all_marked().await;
    let status = env.status_json().await;
    assert_eq!(status["held"].as_i64(), Some(0), "{status}");
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_whose_head_waits_for_a_retry_delay_is_held_and_flows_again_after_it() {
    let env = TestEnv::new(
        Setup::new()
            .set("outbox.retry", "initial_delay", "\"2s\"")
            .set("outbox.retry", "max_delay", "\"2s\"")
            .set("outbox.retry", "jitter", "0.0"),
    )
    .await;
    let missing = format!("{}-later", env.exchange);
    let head = env
        .insert(&[NewRow::new("slow-head", "slow").exchange(&missing)])
        .await[0];
    let _relay = env.start_relay();
    eventually("the head row to fail once", || async {
        env.row(head).await.attempts >= 1
    })
    .await;
    insert_queue(&env, "slow", 5_000).await;
    let others = env.insert(&rows_over_keys("quick", 50, 500)).await;
    let received = env.consumer.wait_for(others.len()).await;
    assert!(delivered_of_key(&received, "slow").is_empty());
    assert_eq!(env.status_json().await["held"].as_i64(), Some(5_000));
    // A producer at REPEATABLE READ inserts its row unheld (its snapshot may predate a
    // release): still it must not overtake the held queue.
    let mut tx = env.pool.begin().await.unwrap();
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *tx)
        .await
        .unwrap();
    insert_rows(&mut tx, &env.table, &[NewRow::new("slow-rr", "slow")])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let status = env.status_json().await;
    assert_eq!(
        (status["held"].as_i64(), status["pending"].as_i64()),
        (Some(5_000), Some(5_002)),
        "{status}"
    );

    env.declare_exchange(&missing).await;
    env.bind(&missing, "#").await;
    let received = env.consumer.wait_for(others.len() + 5_002).await;
    let slow = delivered_of_key(&received, "slow");
    assert_eq!(slow.len(), 5_002);
    assert_eq!(slow[0], head);
    assert!(slow.windows(2).all(|w| w[0] < w[1]), "in id order");
    env.wait_all_marked().await;
    assert_eq!(env.status_json().await["held"].as_i64(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_relay_polling_every_twenty_seconds_stays_live_and_wakes_on_notify() {
    let env = TestEnv::new(Setup::new().set("relay", "poll_interval", "\"20s\"").set(
        "health",
        "listen",
        "\"127.0.0.1:0\"",
    ))
    .await;
    // The relay reaches PostgreSQL through a proxy that counts its statements: its own, not the
    // database's (autovacuum, this test's reads) nor the other tests'.
    let proxy = postgres_proxy(true).await;
    let url = proxy
        .route_without_tls(&url::Url::parse(&env.pg_url).expect("the test's URL"))
        .unwrap_or_else(|e| panic!("{e:#}"));
    env.relay_postgres_url(url.as_str());
    let relay = env.start_relay();
    let addr = health_addr(&relay).await;
    relay.wait_for_log("relaying").await;
    let before = proxy.counted();
    // Longer than an idle poll interval, and longer than the liveness limit (15 s): every
    // answer must be 200. A probe each second, as a monitoring system would.
    for second in 0..24 {
        assert_eq!(http_get(&addr, "/live").await.0, 200, "at second {second}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // Idle costs the database one statement per poll interval (two polls in 24 s) and one
    // lease renewal per heartbeat (at most thirteen at the default 2 s): nothing like a loop
    // (a relay turning idle would run hundreds).
    let idle = proxy.counted() - before;
    eprintln!(
        "{} statements ({} round trips) in 24 idle seconds",
        idle.statements, idle.round_trips
    );
    assert!(
        idle.statements <= 2 + 13,
        "{} statements in 24 idle seconds",
        idle.statements
    );
    let ids = env.insert(&rows_over_keys("late", 2, 4)).await;
    let received = env.consumer.wait_for(ids.len()).await;
    assert_eq!(first_deliveries(&received).len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_beside_a_million_published_rows_estimates_them_without_reading_the_history() {
    let env = TestEnv::new(Setup::new()).await;
    let table = quoted_table(&env.table);
    let mut tx = env.pool.begin().await.unwrap();
    // History written in bulk (no trigger: these rows were published long ago).
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query(&format!(
        "INSERT INTO {table} (dedup_key, ordering_key, routing_key, event_type, payload, published_at) \
         SELECT 'old-' || g, 'k' || (g % 1000), 'r', 'old', '{{}}', now() FROM generate_series(1, 1000000) g"
    ))
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    env.insert(&rows_over_keys("new", 3, 7)).await;

    let scanned = || async {
        sqlx::query_as::<_, (i64, i64)>(
            "SELECT coalesce(seq_tup_read, 0), coalesce(idx_scan, 0) FROM pg_stat_user_tables \
             WHERE relid = $1::regclass",
        )
        .bind(&table)
        .fetch_one(&env.pool)
        .await
        .unwrap()
    };
    let (read_before, index_scans_before) = scanned().await;
    // The live-row estimate follows the insert within a second or so.
    let runs = std::sync::atomic::AtomicI64::new(0);
    let last = std::sync::Mutex::new(Value::Null);
    eventually("status to estimate the history", || async {
        runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let status = env.status_json().await;
        let close = status["published"]
            .as_i64()
            .is_some_and(|n| (900_000..=1_100_000).contains(&n));
        *last.lock().unwrap() = status;
        close
    })
    .await;
    let status = last.lock().unwrap().clone();
    assert_eq!(status["published_is_estimate"], true, "{status}");
    assert_eq!(
        (status["pending"].as_i64(), status["due"].as_i64()),
        (Some(7), Some(7)),
        "{status}"
    );
    // Once the status sessions' statistics are in (their index scans show), the rows they
    // read sequentially are a bounded sample, not the history.
    eventually("the status sessions' statistics", || async {
        scanned().await.1 > index_scans_before
    })
    .await;
    let (read_after, _) = scanned().await;
    // Each status run reads at most the published-count cap of rows in sequence.
    let runs = runs.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        read_after - read_before <= runs * 10_000,
        "status read {} rows of history",
        read_after - read_before
    );
}
