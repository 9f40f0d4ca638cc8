//! The wake-up a producer pays for: its transaction sends a NOTIFY only while a relay of the
//! table waits for work (the relay's coordination session writes the table's row in
//! `outbox_relay.waiting` when its relay goes idle and deletes it when the relay wakes or
//! stops). Against the real server: what a LISTEN session on the table's channel receives.

use std::time::Duration;

use outbox_relay::config::TableName;
use outbox_relay::store::TableSql;
use outbox_relay_testkit::prelude::*;
use sqlx::postgres::PgListener;
use sqlx::Connection;

/// A LISTEN session on the test table's channel.
async fn listen(env: &TestEnv) -> (PgListener, String) {
    let channel = TableSql::notify_channel(&TableName::parse(&env.table).unwrap());
    let mut listener = PgListener::connect_with(&env.pool).await.unwrap();
    listener.listen(&channel).await.unwrap();
    (listener, channel)
}

/// Inserts one row, then sends a marker on the channel after it committed: notifications
/// arrive in commit order, so the first one received says whether the insert sent one.
async fn insert_sends_notify(
    env: &TestEnv,
    listener: &mut PgListener,
    channel: &str,
    dedup: &str,
) -> bool {
    env.insert(&[NewRow::new(dedup, "k")]).await;
    sqlx::query("SELECT pg_notify($1, 'marker')")
        .bind(channel)
        .execute(&env.pool)
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(30), listener.recv())
        .await
        .expect("the marker arrives")
        .unwrap();
    if first.payload() == "marker" {
        return false;
    }
    assert_eq!(first.payload(), "", "the trigger's notification is empty");
    let marker = listener.recv().await.unwrap();
    assert_eq!(marker.payload(), "marker");
    true
}

/// The table's wake-up flags: the pids of the sessions waiting on it.
async fn waiting(env: &TestEnv) -> Vec<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM outbox_relay.waiting WHERE table_oid = to_regclass($1)::oid::bigint ORDER BY pid",
    )
    .bind(quoted_table(&env.table))
    .fetch_all(&env.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_notifies_only_while_a_relay_waits_and_a_stopped_or_killed_relay_leaves_no_flag()
{
    // An hour's poll: only the NOTIFY can wake the relay in time.
    let env = TestEnv::new(Setup::new().set("relay", "poll_interval", "\"1h\"")).await;
    let (mut listener, channel) = listen(&env).await;

    // No relay: nobody waits, the producer's commit sends nothing.
    assert!(!insert_sends_notify(&env, &mut listener, &channel, "alone").await);

    // A relay that went idle (after sending that row) waits: the next commit wakes it.
    let mut relay = env.start_relay();
    env.consumer.wait_for_id("alone").await;
    eventually("the idle relay's flag", || async {
        waiting(&env).await.len() == 1
    })
    .await;
    assert!(insert_sends_notify(&env, &mut listener, &channel, "woken").await);
    env.consumer.wait_for_id("woken").await;
    env.wait_all_marked().await;

    // Stopped, it takes its flag with it: producers send nothing again.
    relay.sigterm();
    assert_eq!(relay.wait_exit().await.code(), Some(0), "{}", relay.log());
    assert!(
        waiting(&env).await.is_empty(),
        "a stopped relay leaves no flag"
    );
    assert!(!insert_sends_notify(&env, &mut listener, &channel, "after-stop").await);

    // Killed, its flag stays until a relay's next session clears the flags of sessions gone.
    let mut killed = env.start_relay();
    env.consumer.wait_for_id("after-stop").await;
    eventually("the second relay's flag", || async {
        waiting(&env).await.len() == 1
    })
    .await;
    let stale = waiting(&env).await;
    killed.sigkill();
    killed.wait_exit().await;
    let _relay = env.start_relay();
    eventually(
        "the new relay's flag, and the killed one's gone",
        || async {
            let now = waiting(&env).await;
            now.len() == 1 && now != stale
        },
    )
    .await;
    assert!(insert_sends_notify(&env, &mut listener, &channel, "third").await);
    env.consumer.wait_for_id("third").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_with_nothing_to_do_waits_for_no_lock_on_the_outbox_or_the_relays_tables() {
    let env = TestEnv::new(Setup::new()).await;
    let table = quoted_table(&env.table);
    // Another session holds every table migrate touches in a mode that lets readers and row
    // writers through but no DDL (CREATE TRIGGER, CREATE INDEX, ALTER TABLE).
    let mut holder = env.pool.begin().await.unwrap();
    sqlx::raw_sql(&format!(
        "LOCK TABLE {table}, outbox_relay.members, outbox_relay.leases, outbox_relay.held_keys, \
         outbox_relay.lease_tables, outbox_relay.waiting IN EXCLUSIVE MODE"
    ))
    .execute(&mut *holder)
    .await
    .unwrap();
    let migrated = env.cli(&["migrate"]).await;
    assert_eq!(migrated.code, 0, "{migrated:?}");
    assert!(
        migrated.stdout.contains("up to date"),
        "nothing to apply: {migrated:?}"
    );
    holder.rollback().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_replaces_a_trigger_that_notifies_on_every_commit_and_notify_off_drops_it() {
    let env = TestEnv::new(Setup::new()).await;
    let table = quoted_table(&env.table);
    let name = TableName::parse(&env.table).unwrap();
    let trigger = name.derived("notify");
    // The trigger of earlier releases: a NOTIFY from every inserting statement.
    sqlx::raw_sql(&format!(
        "DROP TRIGGER \"{trigger}\" ON {table}; \
         CREATE TRIGGER \"{trigger}\" AFTER INSERT ON {table} FOR EACH STATEMENT \
         EXECUTE FUNCTION outbox_relay.notify('{}');",
        TableSql::notify_channel(&name)
    ))
    .execute(&env.pool)
    .await
    .unwrap();
    let (mut listener, channel) = listen(&env).await;
    assert!(insert_sends_notify(&env, &mut listener, &channel, "old").await);

    // The upgrade while a producer's transaction stays open on the table: replacing the
    // trigger must wait for it, and while it waits, other producers go on committing (its
    // lock waits are bounded and retried, never a queue that producers stand in).
    let mut long = env.pool.begin().await.unwrap();
    sqlx::query(&format!(
        "INSERT INTO {table} (dedup_key, ordering_key, routing_key, event_type, payload) \
         VALUES ('open', 'k', 'r', 't', '{{}}')"
    ))
    .execute(&mut *long)
    .await
    .unwrap();
    let config = env.config_path.clone();
    let migrating = tokio::spawn(async move { run_cli(&config, &["migrate"]).await });
    eventually("migrate to wait for the open transaction's lock", || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE NOT l.granted AND l.relation = to_regclass($1) AND a.datname = current_database()",
        )
        .bind(&table)
        .fetch_one(&env.pool)
        .await
        .unwrap();
        waiting > 0
    })
    .await;
    for i in 0..5 {
        let mut producer = sqlx::PgConnection::connect(env.pg_url.as_str())
            .await
            .unwrap();
        sqlx::query("SET statement_timeout = '20s'")
            .execute(&mut producer)
            .await
            .unwrap();
        sqlx::query(&format!(
            "INSERT INTO {table} (dedup_key, ordering_key, routing_key, event_type, payload) \
             VALUES ($1, 'other', 'r', 't', '{{}}')"
        ))
        .bind(format!("during-{i}"))
        .execute(&mut producer)
        .await
        .expect("a producer commits while migrate waits to replace the trigger");
    }
    assert!(
        !migrating.is_finished(),
        "migrate waits for the open transaction"
    );
    long.commit().await.unwrap();
    let migrated = migrating.await.unwrap();
    assert_eq!(migrated.code, 0, "{migrated:?}");
    assert!(
        migrated.stdout.contains("installed the wake-up trigger"),
        "{migrated:?}"
    );
    // The old trigger's notifications of the rows above, read past.
    sqlx::query("SELECT pg_notify($1, 'sync')")
        .bind(&channel)
        .execute(&env.pool)
        .await
        .unwrap();
    while listener.recv().await.unwrap().payload() != "sync" {}
    let (function, deferred): (String, bool) = sqlx::query_as(
        "SELECT tgfoid::regproc::text, tginitdeferred FROM pg_trigger \
         WHERE tgrelid = to_regclass($1) AND tgname = $2",
    )
    .bind(&table)
    .bind(&trigger)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        (function.as_str(), deferred),
        ("outbox_relay.notify_waiting", true)
    );
    assert!(!insert_sends_notify(&env, &mut listener, &channel, "new").await);

    // `notify = false`: no trigger at all.
    let config = std::fs::read_to_string(&env.config_path).unwrap();
    let config = config.replacen("[relay]", "[relay]\nnotify = false", 1);
    assert!(
        config.contains("notify = false"),
        "the test config has a [relay] table"
    );
    std::fs::write(&env.config_path, config).unwrap();
    let migrated = env.cli(&["migrate"]).await;
    assert_eq!(migrated.code, 0, "{migrated:?}");
    let triggers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = to_regclass($1) AND tgname = $2",
    )
    .bind(&table)
    .bind(&trigger)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(triggers, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_dropped_and_made_again_is_armed_again_once_the_poll_finds_its_first_row() {
    let env = TestEnv::new(Setup::new().set("relay", "poll_interval", "\"300ms\"")).await;
    let _relay = env.start_relay();
    eventually("the idle relay's flag", || async {
        waiting(&env).await.len() == 1
    })
    .await;

    sqlx::raw_sql(&format!("DROP TABLE {}", quoted_table(&env.table)))
        .execute(&env.pool)
        .await
        .unwrap();
    let migrated = env.cli(&["migrate"]).await;
    assert_eq!(migrated.code, 0, "{migrated:?}");
    // The flag names the old instance: the first row sends no NOTIFY, the poll finds it, and
    // the flag is written again for the new instance.
    let (mut listener, channel) = listen(&env).await;
    assert!(!insert_sends_notify(&env, &mut listener, &channel, "first").await);
    env.consumer.wait_for_id("first").await;
    eventually("the flag of the new instance", || async {
        waiting(&env).await.len() == 1
    })
    .await;
    assert!(insert_sends_notify(&env, &mut listener, &channel, "second").await);
    env.consumer.wait_for_id("second").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_with_only_the_documented_grants_commits_and_wakes_the_relay() {
    let env = TestEnv::new(Setup::new().set("relay", "poll_interval", "\"1h\"")).await;
    let _relay = env.start_relay();
    eventually("the idle relay's flag", || async {
        waiting(&env).await.len() == 1
    })
    .await;

    // The README's producer grants, nothing on the relay's schema (PUBLIC's rights on it
    // revoked, as a hardened database does).
    let role = format!("{}_app", env.name);
    let table = quoted_table(&env.table);
    let sequence: String = sqlx::query_scalar("SELECT pg_get_serial_sequence($1, 'id')")
        .bind(&table)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    sqlx::raw_sql(&format!(
        "CREATE ROLE \"{role}\" LOGIN; \
         REVOKE ALL ON SCHEMA outbox_relay FROM PUBLIC; \
         GRANT USAGE ON SCHEMA public TO \"{role}\"; \
         GRANT INSERT, SELECT (dedup_key) ON {table} TO \"{role}\"; \
         GRANT USAGE ON SEQUENCE {sequence} TO \"{role}\";"
    ))
    .execute(&env.pool)
    .await
    .unwrap();
    let mut url = url::Url::parse(&env.pg_url).unwrap();
    url.set_username(&role).unwrap();
    let mut app = sqlx::postgres::PgConnection::connect(url.as_str())
        .await
        .unwrap();
    let committed = sqlx::query(&format!(
        "INSERT INTO {table} (dedup_key, ordering_key, routing_key, event_type, payload) \
         VALUES ('by-app', 'k', 'test.app', 'AppEvent', '{{}}') ON CONFLICT (dedup_key) DO NOTHING"
    ))
    .execute(&mut app)
    .await;
    app.close().await.unwrap();
    sqlx::raw_sql(&format!("DROP OWNED BY \"{role}\"; DROP ROLE \"{role}\";"))
        .execute(&env.pool)
        .await
        .unwrap();
    committed.expect("the producer's insert commits");
    env.consumer.wait_for_id("by-app").await;
}
