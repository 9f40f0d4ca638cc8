//! The lease fence on the relay's own statements, against the real PostgreSQL: a mark, a
//! failure record, a park and a hold whose fence's epochs are one above or one below the
//! leases' (the leases moved under it: a fence itself cannot be forged), or written by a
//! deposed owner, change nothing, while the holder's own statements go through; and one relay
//! publishing over four channels keeps every key's order.

use std::collections::HashSet;
use std::time::Duration;

use outbox_relay::config::{OnExhausted, Settings, TableName};
use outbox_relay::store::leases::Leases;
use outbox_relay::store::{Failure, Fence, RowVersion, Store, TableSql};
use outbox_relay_testkit::prelude::*;

const PARTITIONS: u32 = 8;

struct Fenced {
    env: TestEnv,
    store: Store,
    sql: TableSql,
    leases: Leases,
}

impl Fenced {
    async fn new() -> Fenced {
        let env =
            TestEnv::new(Setup::new().set("outbox", "partitions", &PARTITIONS.to_string())).await;
        let settings = Settings::load(&env.config_path).unwrap();
        let store = Store::connect(&settings.postgres).await.unwrap();
        let table = TableName::parse(&env.table).unwrap();
        let sql = TableSql::new(&table, OnExhausted::HoldKey);
        let leases = Leases::new(store.pool().clone(), table, Duration::from_secs(60));
        Fenced {
            env,
            store,
            sql,
            leases,
        }
    }

    /// The rows as they stand now (the version a relay would have read).
    async fn versions(&self, ids: &[i64]) -> Vec<RowVersion> {
        self.env
            .row_versions(ids)
            .await
            .into_iter()
            .map(|(id, version)| RowVersion { id, version })
            .collect()
    }

    async fn mark(&self, ids: &[i64], fence: &Fence) -> HashSet<i64> {
        let rows = self.versions(ids).await;
        self.store
            .mark_published(&self.sql, &rows, fence)
            .await
            .unwrap();
        self.env.published_ids().await
    }
}

/// Moves every lease's epoch by `by` under the fences already handed out (a fence cannot be
/// forged in Rust: only the database's answers build one), so they are `by` behind.
async fn move_epochs(t: &Fenced, by: i64) {
    sqlx::query("UPDATE outbox_relay.leases SET epoch = epoch + $1")
        .bind(by)
        .execute(&t.env.pool)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_with_a_forged_epoch_change_nothing_and_the_holders_go_through() {
    let t = Fenced::new().await;
    let ids = t.env.insert(&rows_over_keys("forge", 20, 40)).await;
    let fence = t.leases.fence_all("holder", PARTITIONS).await.unwrap();
    assert_eq!(fence.owned().len() as u32, PARTITIONS);

    // A fence narrowed to no partitions holds nothing, not everything.
    let empty = fence.only(|_| false);
    assert!(
        t.mark(&ids, &empty).await.is_empty(),
        "an empty fence marks nothing"
    );

    for by in [1, -1] {
        move_epochs(&t, by).await;
        let forgery = fence.clone();
        assert!(
            t.mark(&ids, &forgery).await.is_empty(),
            "a mark with epochs {by:+} marks nothing"
        );
        let failures: Vec<Failure> = t
            .versions(&ids)
            .await
            .into_iter()
            .map(|row| Failure {
                row,
                error: "forged".into(),
                retry_after: None,
            })
            .collect();
        t.store
            .record_failures(&t.sql, &failures, &forgery)
            .await
            .unwrap();
        let holds = vec![("forge-0".to_owned(), ids[0])];
        let unfinished = t.store.hold_keys(&t.sql, &holds, &forgery).await.unwrap();
        assert!(
            unfinished.is_empty(),
            "a key outside the fence is not retried"
        );
        let row = t.env.row(ids[0]).await;
        assert_eq!(
            (row.attempts, row.parked_at, row.last_error),
            (0, None, None),
            "a failure record or park with epochs {by:+} writes nothing"
        );
        let held: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_relay.held_keys")
            .fetch_one(&t.env.pool)
            .await
            .unwrap();
        assert_eq!(held, 0, "a hold with epochs {by:+} holds nothing");
        move_epochs(&t, -by).await;
    }

    // The holder's own fence: a failure is recorded, then every row marked.
    t.store
        .record_failures(
            &t.sql,
            &[Failure {
                row: t.versions(&ids[1..2]).await[0],
                error: "refused".into(),
                retry_after: Some(Duration::from_secs(1)),
            }],
            &fence,
        )
        .await
        .unwrap();
    assert_eq!(t.env.row(ids[1]).await.attempts, 1);
    assert_eq!(t.mark(&ids, &fence).await, ids.iter().copied().collect());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_owner_cannot_mark_and_a_fence_covers_only_its_own_partitions() {
    let t = Fenced::new().await;
    let ids = t.env.insert(&rows_over_keys("depose", 30, 60)).await;
    let old = t.leases.fence_all("old owner", PARTITIONS).await.unwrap();
    // Its lease runs out (a pause, a cut): another member takes every partition.
    sqlx::query("UPDATE outbox_relay.members SET expires_at = now() - interval '1 second'")
        .execute(&t.env.pool)
        .await
        .unwrap();
    let new = t.leases.fence_all("new owner", PARTITIONS).await.unwrap();
    assert!(new.epochs().iter().zip(old.epochs()).all(|(n, o)| n > o));
    assert!(
        t.mark(&ids, &old).await.is_empty(),
        "the deposed owner marks nothing"
    );

    // A fence over half the partitions marks exactly the rows of those partitions.
    let half = new.only(|p| p % 2 == 0);
    let marked = t.mark(&ids, &half).await;
    let expected: HashSet<i64> = sqlx::query_scalar(&format!(
        "SELECT id FROM {} WHERE (hashtextextended(ordering_key, 0) & 2147483647) % {PARTITIONS} % 2 = 0",
        quoted_table(&t.env.table)
    ))
    .fetch_all(&t.env.pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    assert!(!expected.is_empty() && expected.len() < ids.len());
    assert_eq!(marked, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_relay_over_four_channels_delivers_every_key_in_order() {
    const ROWS: usize = 3_000;
    let env = TestEnv::new(Setup::new().set("relay", "channels", "4").set(
        "outbox",
        "partitions",
        "16",
    ))
    .await;
    let relay = env.start_relay();
    relay.wait_for_log("relaying").await;
    let ids = env.insert(&rows_over_keys("ch", 64, ROWS)).await;
    let received = env.consumer.wait_for(ROWS).await;
    env.wait_all_marked().await;
    assert_eq!(delivered_ids(&received), ids.iter().copied().collect());
    assert_first_deliveries_in_id_order(&received);
    assert_eq!(
        assert_duplicates_share_message_id(&received),
        0,
        "nothing goes out twice without a fault"
    );
    let channels: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT owner) FROM outbox_relay.leases WHERE owner IS NOT NULL",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(channels, 1, "one member, however many channels");
}
