//! Real faults under load: the relay SIGKILLed and restarted, its broker connections closed,
//! its database sessions terminated, SIGTERM while busy, and a second relay on the same table.
//! Each time nothing is lost, first deliveries keep per-key order, and duplicates (only from
//! messages in flight when something broke) carry the same message_id.

use std::time::Duration;

use outbox_relay_testkit::prelude::*;

const BACKLOG: usize = 4000;
const KEYS: usize = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_mid_batch_and_restarted_loses_nothing_and_keeps_key_order() {
    const WINDOW: usize = 300;
    let env = TestEnv::new(Setup::new().set("relay", "batch_size", "500").set(
        "relay",
        "max_in_flight",
        &WINDOW.to_string(),
    ))
    .await;
    env.insert(&rows_over_keys("kill", KEYS, BACKLOG)).await;
    let mut first = env.start_relay();
    env.consumer.wait_for(600).await;
    first.sigkill();
    let at_kill = env.consumer.unique_count();
    assert!(
        at_kill < BACKLOG,
        "killed while busy ({at_kill} of {BACKLOG} delivered)"
    );

    let _second = env.start_relay();
    let duplicates = env.assert_nothing_lost(BACKLOG).await;
    eprintln!(
        "killed after {at_kill} deliveries; {duplicates} duplicate deliveries after the restart"
    );
    // The window counts confirmed rows whose mark is not written yet, so it bounds what a
    // crash sends twice.
    assert!(
        duplicates <= WINDOW,
        "a crash resent {duplicates} messages, more than max_in_flight = {WINDOW}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_connections_closed_under_load_lose_nothing() {
    let env = TestEnv::new(Setup::new().own_vhost()).await;
    let relay = env.start_relay();
    let producer = Producer::start(&env, "amqp", KEYS, 25, Duration::from_millis(20));
    env.consumer.wait_for(500).await;
    // Closes the relay's and the consumer's connections: both are in this test's vhost only.
    env.close_broker_connections().await;
    let at_first = env.consumer.unique_count();
    env.consumer.wait_for(at_first + 500).await;
    env.close_broker_connections().await;
    let at_second = env.consumer.unique_count();
    // The relay keeps running and delivers what was written during and after the outages.
    env.consumer.wait_for(at_second + 500).await;
    let written = producer.stop().await;
    let duplicates = env.assert_nothing_lost(written).await;
    eprintln!("connections closed at {at_first} and {at_second} of {written} rows; {duplicates} duplicate deliveries");
    let mut relay = relay;
    assert!(relay.is_running(), "the daemon survives broker outages");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_connection_closed_while_idle_is_logged_and_replaced() {
    let env = TestEnv::new(Setup::new().own_vhost()).await;
    let relay = env.start_relay();
    env.insert(&[NewRow::new("before", "k")]).await;
    env.consumer.wait_for_id("before").await;
    let logged_before = relay.log().lines().count();
    env.close_broker_connections().await;
    env.insert(&[NewRow::new("after", "k")]).await;
    env.consumer.wait_for_id("after").await;
    let log = relay.log();
    let new_lines: Vec<&str> = log.lines().skip(logged_before).collect();
    assert!(
        new_lines
            .iter()
            .any(|l| l.contains("WARN") && l.contains("RabbitMQ")),
        "losing the broker connection is a state change worth one warning; the log after the close:\n{}",
        new_lines.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relays_database_sessions_terminated_under_load_lose_nothing() {
    let env = TestEnv::new(Setup::new()).await;
    let relay = env.start_relay();
    let producer = Producer::start(&env, "pg", KEYS, 25, Duration::from_millis(20));
    env.consumer.wait_for(500).await;
    let killed = env.terminate_relay_sessions().await;
    assert!(killed >= 1, "the relay had sessions to terminate");
    let at_first = env.consumer.unique_count();
    env.consumer.wait_for(at_first + 500).await;
    env.terminate_relay_sessions().await;
    let at_second = env.consumer.unique_count();
    env.consumer.wait_for(at_second + 500).await;
    let written = producer.stop().await;
    let duplicates = env.assert_nothing_lost(written).await;
    eprintln!("sessions terminated at {at_first} and {at_second} of {written} rows; {duplicates} duplicate deliveries");
    let mut relay = relay;
    assert!(relay.is_running(), "the daemon survives database outages");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_confirms_marks_them_and_exits_0() {
    let env = TestEnv::new(Setup::new().set("relay", "batch_size", "1000").set(
        "relay",
        "max_in_flight",
        "1000",
    ))
    .await;
    env.insert(&rows_over_keys("term", KEYS, BACKLOG)).await;
    let mut relay = env.start_relay();
    env.consumer.wait_for(300).await;
    relay.sigterm();
    let status = relay.wait_exit().await;
    assert_eq!(
        status.code(),
        Some(0),
        "a drained shutdown exits 0: {}",
        relay.log()
    );
    assert!(relay.log().contains("relay stopped"), "{}", relay.log());

    // Every message the broker accepted has reached the consumer: the queue holds none, ready
    // or unacked.
    env.wait_until_queue_is_settled().await;
    let received = env.consumer.received();
    let delivered = delivered_ids(&received);
    let marked = env.published_ids().await;
    eprintln!(
        "SIGTERM: {} of {BACKLOG} delivered and {} marked at exit",
        delivered.len(),
        marked.len()
    );
    assert!(delivered.len() < BACKLOG, "stopped while busy");
    let marked_not_received: Vec<_> = marked.difference(&delivered).collect();
    assert!(
        marked_not_received.is_empty(),
        "rows marked but never received: {marked_not_received:?}"
    );
    let received_not_marked: Vec<_> = delivered.difference(&marked).collect();
    assert!(
        received_not_marked.is_empty(),
        "confirmed rows left unmarked by the drain ({}): {:?}",
        received_not_marked.len(),
        &received_not_marked[..received_not_marked.len().min(20)]
    );

    let _again = env.start_relay();
    let duplicates = env.assert_nothing_lost(BACKLOG).await;
    assert_eq!(
        duplicates, 0,
        "a drained shutdown leaves nothing to publish twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_relay_on_a_table_of_one_partition_stands_by_and_takes_over_in_order() {
    const BATCH: usize = 200;
    const WINDOW: usize = 150;
    // One partition: one relay owns it, the other owns nothing (the degenerate case of the
    // partition leases, and the shape of the single-lock relays before them).
    let env = TestEnv::new(
        Setup::new()
            .set("outbox", "partitions", "1")
            .set("relay", "batch_size", &BATCH.to_string())
            .set("relay", "max_in_flight", &WINDOW.to_string()),
    )
    .await;
    let mut active = env.start_relay();
    active.wait_for_log("relaying").await;
    let standby = env.start_relay();
    standby.wait_for_log("standby").await;

    env.insert(&rows_over_keys("two", KEYS, BACKLOG)).await;
    env.consumer.wait_for(1000).await;
    let before = env.consumer.received();
    assert_eq!(
        assert_duplicates_share_message_id(&before),
        0,
        "two relays at once never publish a row twice"
    );
    active.sigkill();
    let duplicates = env.assert_nothing_lost(BACKLOG).await;
    assert!(
        standby.log().contains("relaying"),
        "the standby took over: {}",
        standby.log()
    );
    // Only the killed relay's window (unconfirmed, or confirmed with the mark not written yet)
    // goes out again.
    assert!(
        duplicates <= WINDOW,
        "only the killed relay's window of {WINDOW} may go out twice: {duplicates}"
    );
    let (key, restarts) = most_restarts_of_a_key(&env.consumer.received());
    assert!(
        restarts <= 1,
        "key {key} restarted {restarts} times: the relays overlapped"
    );
    let mut standby = standby;
    standby.sigterm();
    assert_eq!(
        standby.wait_exit().await.code(),
        Some(0),
        "{}",
        standby.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_loses_its_lock_session_stops_publishing_before_the_standby_takes_over() {
    let env = TestEnv::new(
        Setup::new()
            .set("outbox", "partitions", "1")
            .set("relay", "batch_size", "4000")
            .set("relay", "max_in_flight", "20"),
    )
    .await;
    let active = env.start_relay();
    active.wait_for_log("relaying").await;
    let standby = env.start_relay();
    standby.wait_for_log("standby").await;

    // Few keys and one batch for the whole backlog: the active relay is busy with that batch,
    // one confirm per key at a time, for a while.
    env.insert(&rows_over_keys("lock", 4, BACKLOG)).await;
    env.consumer.wait_for(100).await;
    // Only the active relay's lock session: its lock passes to the standby, while the active
    // relay is still busy with its batch.
    assert_eq!(env.terminate_owner_session(0).await, 1);
    let at_termination = env.consumer.unique_count();
    let duplicates = env.assert_nothing_lost(BACKLOG).await;
    let (key, restarts) = most_restarts_of_a_key(&env.consumer.received());
    eprintln!(
        "lock session terminated at {at_termination} of {BACKLOG}; {duplicates} duplicate deliveries; \
         key {key} restarted {restarts} times"
    );
    // The standby may re-send what the old holder confirmed but had not marked (as after a
    // crash), but the old holder must stop publishing once its lock is gone, so no key's
    // deliveries interleave two relays' sequences.
    assert!(
        restarts <= 1,
        "two relays published key {key} at once: its deliveries went back {restarts} times"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_cannot_reach_rabbitmq_retries_logs_once_and_stops_on_sigterm() {
    let env = TestEnv::new(Setup::new()).await;
    // A vhost that does not exist: every connection attempt is refused. The relay reaches the
    // broker through a proxy that counts its attempts.
    let nowhere = amqp_url(Some(&format!("{}_nowhere", env.name)));
    let (proxy, nowhere) = broker_proxy(&nowhere).await;
    let config = std::fs::read_to_string(&env.config_path)
        .unwrap()
        .replace(&env.amqp_url, &nowhere);
    std::fs::write(&env.config_path, config).unwrap();
    env.insert(&rows_over_keys("wait", 2, 10)).await;
    let mut relay = env.start_relay();
    relay.wait_for_log("RabbitMQ unavailable").await;
    // Several reconnect attempts (200 ms backoff doubling to the 1 s cap).
    const ATTEMPTS: u64 = 4;
    eventually("several refused reconnect attempts", || async {
        proxy.connections() > ATTEMPTS
    })
    .await;
    assert!(
        relay.is_running(),
        "an unreachable broker is waited for, not fatal"
    );
    let log = relay.log();
    assert_eq!(
        log.matches("RabbitMQ unavailable").count(),
        1,
        "logged once per state change:\n{log}"
    );
    assert_eq!(env.unpublished_count().await, 10);
    let rows =
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM public.outbox WHERE attempts > 0")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(rows, 0, "an outage does not count as failed attempts");

    relay.sigterm();
    assert_eq!(relay.wait_exit().await.code(), Some(0), "{}", relay.log());
    // Not three ERROR lines per reconnect attempt from the AMQP client library either.
    let noisy: Vec<&str> = log.lines().filter(|l| l.contains("not found")).collect();
    assert!(
        noisy.len() <= 1,
        "the outage's cause is logged {} times in {} connection attempts:\n{}",
        noisy.len(),
        proxy.connections(),
        noisy.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_started_before_its_database_exists_recovers_once_it_does() {
    let env = TestEnv::new(Setup::new()).await;
    let late = format!("{}_later", env.db);
    let config = std::fs::read_to_string(&env.config_path)
        .unwrap()
        .replace(&env.pg_url, &pg_url(&late));
    std::fs::write(&env.config_path, config).unwrap();
    let mut relay = env.start_relay();
    relay.wait_for_log("PostgreSQL unavailable").await;
    assert!(
        relay.is_running(),
        "a missing database is waited for, not fatal"
    );

    // Dropped at the end of the test, also when it fails.
    let _late_db = Database::create(&servers().postgres_url("postgres"), &late)
        .await
        .unwrap();
    let migrated = env.cli(&["migrate"]).await;
    assert_eq!(migrated.code, 0, "{migrated:?}");
    let pool = sqlx::PgPool::connect(&pg_url(&late)).await.unwrap();
    let mut conn = pool.acquire().await.unwrap();
    let ids = insert_rows(&mut conn, &env.table, &rows_over_keys("late", 2, 10))
        .await
        .unwrap();
    drop(conn);
    let received = env.consumer.wait_for(10).await;
    assert_eq!(delivered_ids(&received), ids.into_iter().collect());
    assert!(
        relay.log().contains("recovered") || relay.log().contains("relaying"),
        "{}",
        relay.log()
    );
    pool.close().await;
    relay.sigterm();
    assert_eq!(relay.wait_exit().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_goes_silent_is_noticed_by_the_statement_deadline_and_nothing_is_lost() {
    // A long poll interval keeps the coordination session idle, so it can be frozen safely
    // (see freeze_relay_sessions); the poll after the freeze is the statement that goes
    // unanswered.
    let env = TestEnv::new(
        Setup::new()
            .set("postgres", "statement_timeout", "\"1s\"")
            .set("relay", "poll_interval", "\"3s\""),
    )
    .await;
    let mut relay = env.start_relay();
    env.insert(&rows_over_keys("before", 4, 40)).await;
    env.consumer.wait_for(40).await;
    env.wait_all_marked().await;

    // The relay's sessions stay open and answer nothing: only the client's own deadline
    // (statement_timeout + 2 s) can notice; without it the relay would wait for TCP.
    let frozen = env.freeze_relay_sessions().await;
    assert!(!frozen.pids.is_empty(), "the relay had sessions to freeze");
    env.insert(&rows_over_keys("during", 4, 40)).await;
    relay
        .wait_for_log("no answer from PostgreSQL within 3s")
        .await;
    assert!(relay.is_running(), "{}", relay.log());

    drop(frozen);
    let duplicates = env.assert_nothing_lost(80).await;
    eprintln!("{duplicates} duplicate deliveries after the silence");
}
