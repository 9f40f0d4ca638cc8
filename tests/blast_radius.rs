//! A row's problem is that row's: a row the broker cannot take (headers past the frame), the
//! relay cannot decode (a JSON number out of range, nesting past the decoder's limit, an
//! infinite timestamp) or the relay's indexes cannot hold (an over-long key) is parked or
//! refused with its reason, while every other key flows, the process lives and `/ready` says
//! 200. And a mark applies to the row version that was sent: a TRUNCATE, a re-insert or an
//! update between publish and mark never makes an unsent row look published.

use std::collections::HashSet;
use std::time::Duration;

use outbox_relay::config::{OnExhausted, Settings, TableName};
use outbox_relay::store::leases::Leases;
use outbox_relay::store::{RowVersion, Store, TableSql, MAX_ORDERING_KEY_BYTES};
use outbox_relay_testkit::prelude::*;
use rand::Rng;
use sqlx::Row;

/// Inserts one row the way a producer writing SQL by hand would: `headers` and `created_at`
/// as SQL text, so values serde_json cannot even represent (`1e400`) reach the table.
async fn insert_raw(
    env: &TestEnv,
    dedup_key: &str,
    ordering_key: &str,
    headers: &str,
    created_at: &str,
) -> Result<i64, sqlx::Error> {
    let sql = format!(
        "INSERT INTO {} (dedup_key, ordering_key, routing_key, event_type, payload, headers, created_at) \
         VALUES ($1, $2, 'test.raw', 'RawEvent', '{{\"raw\":true}}', $3::jsonb, $4::timestamptz) RETURNING id",
        quoted_table(&env.table)
    );
    sqlx::query_scalar(&sql)
        .bind(dedup_key)
        .bind(ordering_key)
        .bind(headers)
        .bind(created_at)
        .fetch_one(&env.pool)
        .await
}

/// `(parked, last_error)` of the row with `dedup_key`, read without decoding its timestamps
/// (an infinite `created_at` is what some of these rows carry).
async fn parked_reason(env: &TestEnv, dedup_key: &str) -> (bool, String, bool) {
    let sql = format!(
        "SELECT parked_at IS NOT NULL AS parked, coalesce(last_error, '') AS error, \
                published_at IS NOT NULL AS published \
         FROM {} WHERE dedup_key = $1",
        quoted_table(&env.table)
    );
    let row = sqlx::query(&sql)
        .bind(dedup_key)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    (row.get("parked"), row.get("error"), row.get("published"))
}

async fn wait_parked(env: &TestEnv, dedup_key: &str) -> String {
    eventually(&format!("{dedup_key} to be parked"), || async {
        parked_reason(env, dedup_key).await.0
    })
    .await;
    let (_, error, published) = parked_reason(env, dedup_key).await;
    assert!(!published, "{dedup_key} is parked, not published");
    error
}

/// `len` bytes of random printable ASCII: text PostgreSQL cannot compress, as a key made of
/// ids and hashes is.
fn random_text(len: usize) -> String {
    let mut rng = rand::rng();
    (0..len)
        .map(|_| rng.random_range(b'!'..=b'~') as char)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_the_broker_or_the_decoder_cannot_take_are_parked_with_their_reason_and_every_other_key_flows(
) {
    let env = TestEnv::new(Setup::new().set("health", "listen", "\"127.0.0.1:0\"")).await;
    let mut relay = env.start_relay();
    let addr = health_addr(&relay).await;

    let before = env.insert(&rows_over_keys("before", 10, 30)).await;
    let deep = format!("{}1{}", "{\"a\":".repeat(300), "}".repeat(300));
    let blob = format!("{{\"blob\":\"{}\"}}", "x".repeat(200_000));
    // (dedup key, headers, created_at, what the parked row's reason must say)
    let bad = [
        ("bad-frame", blob.as_str(), "now", "frame_max"),
        (
            "bad-number",
            "{\"amount\": 1e400}",
            "now",
            "headers cannot be read",
        ),
        (
            "bad-nesting",
            deep.as_str(),
            "now",
            "headers cannot be read",
        ),
        ("bad-infinity", "{}", "infinity", "created_at"),
        ("bad-minus-infinity", "{}", "-infinity", "created_at"),
    ];
    for (dedup, headers, created, _) in &bad {
        insert_raw(&env, dedup, dedup, headers, created)
            .await
            .unwrap_or_else(|e| panic!("{dedup} is a valid row for PostgreSQL: {e}"));
        // Behind it, on the same key: held back by the parked row, as any failed row holds.
        env.insert(&[NewRow::new(format!("{dedup}-next"), *dedup)])
            .await;
    }
    // Just inside the frame: delivered whole.
    let fits = format!("{{\"blob\":\"{}\"}}", "y".repeat(120_000));
    insert_raw(&env, "fits", "fits", &fits, "now")
        .await
        .unwrap();
    let after = env.insert(&rows_over_keys("after", 10, 30)).await;

    let received = env.consumer.wait_for(61).await;
    let big = received
        .iter()
        .find(|r| r.message_id == "fits")
        .expect("the row just inside the frame is delivered");
    assert_eq!(
        big.header_str("blob").map(|b| b.len()),
        Some(120_000),
        "its header intact"
    );
    for (prefix, ids) in [("before", &before), ("after", &after)] {
        for k in 0..10 {
            let key = format!("{prefix}-k{k}");
            let expected: Vec<i64> = ids.iter().copied().skip(k).step_by(10).collect();
            assert_eq!(
                delivered_of_key(&received, &key),
                expected,
                "{key} in order"
            );
        }
    }
    for (dedup, _, _, says) in &bad {
        let error = wait_parked(&env, dedup).await;
        assert!(
            error.contains(says),
            "{dedup}'s reason says {says:?}: {error}"
        );
    }
    let received = env.consumer.received();
    let ids: HashSet<String> = received.iter().map(|r| r.message_id.clone()).collect();
    for (dedup, ..) in &bad {
        assert!(!ids.contains(*dedup), "{dedup} was never sent");
        assert!(
            !ids.contains(&format!("{dedup}-next")),
            "the row behind {dedup} waits behind its parked row"
        );
    }

    assert!(relay.is_running(), "the relay lives: {}", relay.log());
    let (status, state) = table_state(&addr).await;
    assert_eq!((status, state.as_str()), (200, "relaying"));
    let status = env.status_json().await;
    assert_eq!(
        status["parked"].as_i64(),
        Some(bad.len() as i64),
        "{status}"
    );
    // The broker's connection was never closed over a row: one connection all along.
    assert!(
        !relay.log().contains("FRAME_ERROR") && !relay.log().contains("unavailable"),
        "{}",
        relay.log()
    );

    // A good row on a fresh key still goes out after all that.
    env.insert(&[NewRow::new("last", "last")]).await;
    env.consumer.wait_for_id("last").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordering_key_past_the_limit_is_refused_at_insert_and_one_at_the_limit_parks_and_holds()
{
    let env = TestEnv::new(Setup::new().set("retry", "max_attempts", "1")).await;
    let _relay = env.start_relay();

    let too_long = random_text(10_000);
    let refused = insert_raw(&env, "long", &too_long, "{}", "now").await;
    let error = refused.expect_err("a 10 KB key is refused").to_string();
    assert!(error.contains("ordering_key_length"), "{error}");

    // The longest key allowed, incompressible, on a row that fails: it parks and holds its key
    // (the relay's indexes take it).
    let key = random_text(MAX_ORDERING_KEY_BYTES);
    let missing = format!("{}_missing", env.name);
    env.insert(&[
        NewRow::new("at-limit-1", key.as_str())
            .exchange(&missing)
            .routing_key("test.at-limit"),
        NewRow::new("at-limit-2", key.as_str()).routing_key("test.at-limit"),
    ])
    .await;
    let error = wait_parked(&env, "at-limit-1").await;
    assert!(error.contains(&missing), "{error}");
    env.insert(&[NewRow::new("other", "other")]).await;
    env.consumer.wait_for_id("other").await;
    assert!(
        !env.consumer
            .received()
            .iter()
            .any(|r| r.message_id.starts_with("at-limit")),
        "the key is held behind its parked row"
    );
    let status = env.status_json().await;
    assert_eq!(
        (status["parked"].as_i64(), status["held"].as_i64()),
        (Some(1), Some(1)),
        "{status}"
    );
}

/// A store and an all-partitions fence on `env`'s table, as a lone relay holds them.
async fn store_of(env: &TestEnv) -> (Store, TableSql, outbox_relay::store::Fence) {
    let settings = Settings::load(&env.config_path).unwrap();
    let store = Store::connect(&settings.postgres).await.unwrap();
    let table = TableName::parse(&env.table).unwrap();
    let sql = TableSql::new(&table, OnExhausted::HoldKey);
    let leases = Leases::new(store.pool().clone(), table, Duration::from_secs(60));
    let fence = leases.fence_all("marker", 256).await.unwrap();
    (store, sql, fence)
}

async fn versions(env: &TestEnv, ids: &[i64]) -> Vec<RowVersion> {
    env.row_versions(ids)
        .await
        .into_iter()
        .map(|(id, version)| RowVersion { id, version })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mark_after_a_truncate_a_reinsert_or_an_update_leaves_the_unsent_rows_pending() {
    let env = TestEnv::new(Setup::new()).await;
    let (store, sql, fence) = store_of(&env).await;

    // Read (as a relay reads them before publishing), then the table changes under the relay.
    let ids = env.insert(&rows_over_keys("old", 4, 8)).await;
    let sent = versions(&env, &ids).await;
    sqlx::raw_sql(&format!(
        "TRUNCATE {} RESTART IDENTITY",
        quoted_table(&env.table)
    ))
    .execute(&env.pool)
    .await
    .unwrap();
    let new_ids = env.insert(&rows_over_keys("new", 4, 8)).await;
    assert_eq!(new_ids, ids, "the new rows reuse the old ids");
    store.mark_published(&sql, &sent, &fence).await.unwrap();
    assert!(
        env.published_ids().await.is_empty(),
        "no row the relay did not send is marked"
    );

    // An update by hand (a pending row's payload corrected) and a delete-and-reinsert.
    let sent = versions(&env, &new_ids).await;
    let t = quoted_table(&env.table);
    sqlx::raw_sql(&format!(
        "UPDATE {t} SET payload = '{{\"fixed\":true}}' WHERE id = {}; \
         WITH gone AS (DELETE FROM {t} WHERE id = {} RETURNING *) \
         INSERT INTO {t} SELECT * FROM gone;",
        new_ids[0], new_ids[1]
    ))
    .execute(&env.pool)
    .await
    .unwrap();
    store.mark_published(&sql, &sent, &fence).await.unwrap();
    let published = env.published_ids().await;
    let untouched: HashSet<i64> = new_ids[2..].iter().copied().collect();
    assert_eq!(
        published, untouched,
        "the rows left as they were are marked; the changed ones stay pending"
    );
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncating_the_table_while_rows_flow_never_marks_a_row_no_consumer_received() {
    let env = TestEnv::new(Setup::new()).await;
    let t = quoted_table(&env.table);
    // Every mark, kept where TRUNCATE cannot reach it (row triggers do not fire on TRUNCATE).
    sqlx::raw_sql(&format!(
        "CREATE TABLE marks_seen (dedup_key text); \
         CREATE FUNCTION note_mark() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN INSERT INTO marks_seen VALUES (NEW.dedup_key); RETURN NEW; END $$; \
         CREATE TRIGGER note_mark AFTER UPDATE OF published_at ON {t} FOR EACH ROW \
             WHEN (OLD.published_at IS NULL AND NEW.published_at IS NOT NULL) \
             EXECUTE FUNCTION note_mark();"
    ))
    .execute(&env.pool)
    .await
    .unwrap();
    let _relay = env.start_relay();
    for round in 0..8 {
        env.insert(&rows_over_keys(&format!("r{round}"), 20, 200))
            .await;
        // Mid-flight: some rows sent, some confirmed and not marked, some not fetched yet.
        env.consumer.wait_for(env.consumer.unique_count() + 1).await;
        sqlx::raw_sql(&format!("TRUNCATE {t} RESTART IDENTITY"))
            .execute(&env.pool)
            .await
            .unwrap();
    }
    let last = env.insert(&rows_over_keys("last", 20, 200)).await;
    env.wait_all_marked().await;
    let marked: Vec<String> = sqlx::query_scalar("SELECT dedup_key FROM marks_seen")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    assert!(marked.len() >= last.len(), "the last round is marked");
    // A marked row reaches the consumer a moment after its confirm, at the latest.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let received: HashSet<String> = env
            .consumer
            .received()
            .iter()
            .map(|r| r.message_id.clone())
            .collect();
        let unsent: Vec<&String> = marked.iter().filter(|d| !received.contains(*d)).collect();
        if unsent.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "marked published, never received: {unsent:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_row_deleted_by_hand_frees_its_key_on_a_quiet_table() {
    // A quiet table: nothing else wakes the relay (no NOTIFY comes for held rows, and the
    // poll finds nothing due).
    let env = TestEnv::new(Setup::new().set("retry", "max_attempts", "1").set(
        "relay",
        "poll_interval",
        "\"60s\"",
    ))
    .await;
    let _relay = env.start_relay();
    let missing = format!("{}_missing", env.name);
    env.insert(&[
        NewRow::new("poison", "k").exchange(&missing),
        NewRow::new("k-1", "k"),
        NewRow::new("k-2", "k"),
    ])
    .await;
    wait_parked(&env, "poison").await;
    eventually("the rows behind it to be held", || async {
        env.status_json().await["held"].as_i64() == Some(2)
    })
    .await;

    // What an operator does with a poison row today.
    sqlx::query(&format!(
        "DELETE FROM {} WHERE dedup_key = 'poison'",
        quoted_table(&env.table)
    ))
    .execute(&env.pool)
    .await
    .unwrap();
    let received = env.consumer.wait_for(2).await;
    assert_eq!(
        received
            .iter()
            .map(|r| r.message_id.as_str())
            .collect::<Vec<_>>(),
        ["k-1", "k-2"],
        "the key flows again, in order"
    );
}
