//! Per-key order: rows of one ordering key reach the consumer in id order while several
//! producers write the same keys at once, and a key held back by a failing row does not hold
//! back anyone else.

use std::collections::HashMap;

use outbox_relay_testkit::prelude::*;
use rand::seq::IndexedRandom;
use serde_json::json;

const PRODUCERS: usize = 4;
const TRANSACTIONS: usize = 30;
const KEYS: usize = 50;
const KEYS_PER_TRANSACTION: usize = 3;
const ROWS_PER_KEY_PER_STATEMENT: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_of_each_key_arrive_in_id_order_under_concurrent_producers() {
    let env = TestEnv::new(Setup::new()).await;
    let _relay = env.start_relay();
    let keys: Vec<String> = (0..KEYS).map(|k| format!("agg-{k:02}")).collect();

    let mut producers = Vec::new();
    for p in 0..PRODUCERS {
        let pool = env.pool.clone();
        let table = env.table.clone();
        let keys = keys.clone();
        producers.push(tokio::spawn(async move {
            let mut seq = 0usize;
            let mut written = 0usize;
            for t in 0..TRANSACTIONS {
                let mut chosen: Vec<String> = keys
                    .choose_multiple(&mut rand::rng(), KEYS_PER_TRANSACTION)
                    .cloned()
                    .collect();
                // Each key's order guard is a transaction lock taken at its first insert:
                // taking them in one global order keeps producers from deadlocking.
                chosen.sort();
                let mut tx = pool.begin().await.expect("begin");
                for statement in 0..2 {
                    let mut rows = Vec::new();
                    for _ in 0..ROWS_PER_KEY_PER_STATEMENT {
                        for key in &chosen {
                            rows.push(
                                NewRow::new(format!("p{p}-t{t}-s{seq}"), key.as_str()).payload(
                                    json!({"producer": p, "seq": seq, "statement": statement}),
                                ),
                            );
                            seq += 1;
                        }
                    }
                    insert_rows(&mut tx, &table, &rows).await.expect("insert");
                    written += rows.len();
                }
                tx.commit().await.expect("commit");
            }
            written
        }));
    }
    let mut total = 0;
    for p in producers {
        total += p.await.expect("producer task");
    }
    assert_eq!(
        total,
        PRODUCERS * TRANSACTIONS * 2 * KEYS_PER_TRANSACTION * ROWS_PER_KEY_PER_STATEMENT
    );

    let received = env.consumer.wait_for(total).await;
    let all_ids: std::collections::HashSet<i64> =
        sqlx::query_scalar::<_, i64>("SELECT id FROM public.outbox")
            .fetch_all(&env.pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(all_ids.len(), total);
    assert_eq!(
        delivered_ids(&received),
        all_ids,
        "every row delivered at least once"
    );
    assert_duplicates_share_message_id(&received);
    assert_first_deliveries_in_id_order(&received);

    // What the id order means to a consumer: each producer's events of one key arrive in the
    // order that producer wrote them.
    let mut last_seq: HashMap<(String, u64), u64> = HashMap::new();
    for m in first_deliveries(&received) {
        let body = m.body_json();
        let producer = body["producer"].as_u64().unwrap();
        let seq = body["seq"].as_u64().unwrap();
        if let Some(prev) = last_seq.insert((m.ordering_key(), producer), seq) {
            assert!(
                prev < seq,
                "key {}: producer {producer} wrote seq {prev} before {seq}",
                m.ordering_key()
            );
        }
    }
    env.wait_all_marked().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_held_back_by_a_failing_row_does_not_starve_the_other_keys() {
    const HOT_ROWS: usize = 2000;
    const OTHER_KEYS: usize = 50;
    const OTHER_ROWS: usize = 500;
    let env = TestEnv::new(Setup::new().set("relay", "batch_size", "100").set(
        "retry",
        "max_attempts",
        "10000",
    ))
    .await;
    let missing = format!("{}_late", env.name);
    let mut hot = vec![NewRow::new("hot-0", "hot").exchange(&missing)];
    hot.extend((1..HOT_ROWS).map(|i| NewRow::new(format!("hot-{i}"), "hot")));
    let hot_ids = env.insert(&hot).await;
    let others = rows_over_keys("other", OTHER_KEYS, OTHER_ROWS);
    env.insert(&others).await;

    let _relay = env.start_relay();
    let received = env.consumer.wait_for(OTHER_ROWS).await;
    assert!(
        received.iter().all(|m| m.ordering_key() != "hot"),
        "nothing of the held-back key may overtake its failing first row"
    );
    let blocker = env.row(hot_ids[0]).await;
    assert!(
        blocker.published_at.is_none() && blocker.parked_at.is_none(),
        "{blocker:?}"
    );
    assert!(blocker.attempts >= 1, "{blocker:?}");
    assert!(
        blocker
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains(&missing),
        "{blocker:?}"
    );

    env.declare_exchange(&missing).await;
    env.bind(&missing, "#").await;
    let received = env.consumer.wait_for(OTHER_ROWS + HOT_ROWS).await;
    assert_first_deliveries_in_id_order(&received);
    let hot_arrivals: Vec<i64> = first_deliveries(&received)
        .iter()
        .filter(|m| m.ordering_key() == "hot")
        .map(|m| m.outbox_id())
        .collect();
    assert_eq!(
        hot_arrivals, hot_ids,
        "the held-back key, once released, arrives whole and in order"
    );
    assert_eq!(
        received
            .iter()
            .find(|m| m.message_id == "hot-0")
            .unwrap()
            .exchange,
        missing
    );
    env.wait_all_marked().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_committed_late_still_arrives_before_later_rows_of_its_key() {
    let env = TestEnv::new(Setup::new()).await;
    let _relay = env.start_relay();

    // A producer writes key k and keeps its transaction open.
    let mut slow = env.pool.begin().await.unwrap();
    let first = insert_rows(&mut slow, &env.table, &[NewRow::new("slow-1", "k")])
        .await
        .unwrap()[0];
    // Another producer writes the same key and tries to commit first.
    let pool = env.pool.clone();
    let table = env.table.clone();
    let fast = tokio::spawn(async move {
        let mut tx = pool.begin().await.unwrap();
        let id = insert_rows(&mut tx, &table, &[NewRow::new("fast-1", "k")])
            .await
            .unwrap()[0];
        tx.commit().await.unwrap();
        id
    });
    // Other keys are not held up by the open transaction, and nothing of key k overtakes it.
    env.insert(&[NewRow::new("other-1", "other")]).await;
    let before_commit = env.consumer.wait_for_id("other-1").await;
    assert!(
        !fast.is_finished(),
        "a second writer of key k waits for the first to commit"
    );
    assert!(
        before_commit.iter().all(|m| m.ordering_key() != "k"),
        "a row of key k was delivered while the key's first row was uncommitted: {before_commit:#?}"
    );

    slow.commit().await.unwrap();
    let second = fast.await.unwrap();
    let received = env.consumer.wait_for(3).await;
    let order: Vec<i64> = first_deliveries(&received)
        .iter()
        .filter(|m| m.ordering_key() == "k")
        .map(|m| m.outbox_id())
        .collect();
    assert_eq!(
        order,
        [first, second],
        "the row written first arrives first"
    );
    let events: Vec<&str> = first_deliveries(&received)
        .iter()
        .filter(|m| m.ordering_key() == "k")
        .map(|m| m.message_id.as_str())
        .collect();
    assert_eq!(
        events,
        ["slow-1", "fast-1"],
        "the consumer gets key k's events in the order their producers wrote them"
    );
}
