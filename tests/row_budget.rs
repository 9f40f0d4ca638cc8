//! The process's budget of rows in memory (`relay.max_rows_in_memory`): busy tables share it,
//! none is starved, and the rows the relay holds never go above it, whatever the tables'
//! `batch_size` and `max_in_flight` would allow each.

use std::time::Duration;

use outbox_relay_testkit::prelude::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_busy_tables_share_a_small_row_budget_and_every_row_goes_out_in_order() {
    const TABLES: usize = 20;
    const ROWS: usize = 150;
    const BUDGET: f64 = 50.0;
    let env = TestEnv::new(
        Setup::new()
            .set("health", "listen", "\"127.0.0.1:0\"")
            .set("relay", "max_rows_in_memory", "50")
            .set("relay", "batch_size", "40"),
    )
    .await;
    let tables: Vec<String> = (0..TABLES).map(|i| format!("budget.t{i}")).collect();
    env.add_tables(&tables).await;
    // Every table's backlog is there before the relay starts: each wants a whole batch at once
    // (20 tables x 40 rows, where the budget holds 50).
    let mut conn = env.pool.acquire().await.unwrap();
    for table in &tables {
        insert_rows(&mut conn, table, &rows_over_keys(table, 7, ROWS))
            .await
            .unwrap();
    }
    drop(conn);

    let relay = env.start_relay();
    let addr = health_addr(&relay).await;
    let mut peak = 0.0_f64;
    while env.consumer.unique_count() < TABLES * ROWS {
        let held = Scrape::of(&addr)
            .await
            .value("outbox_relay_rows_in_memory", &[])
            .expect("outbox_relay_rows_in_memory is exported");
        assert!(
            held <= BUDGET,
            "the relay holds {held} rows in memory; max_rows_in_memory is {BUDGET}"
        );
        peak = peak.max(held);
        // Sampling the gauge while the rows flow; the loop ends on the last delivery.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(peak > 0.0, "the gauge never showed a row held");
    let received = env.consumer.wait_for(TABLES * ROWS).await;
    // Ids are per table; the ordering keys are too (`budget.t<n>-k<m>`).
    assert_first_deliveries_in_id_order(&received);
    // Everything settled: the budget is whole again.
    eventually("the rows in memory to go back to 0", || async {
        Scrape::of(&addr)
            .await
            .value("outbox_relay_rows_in_memory", &[])
            == Some(0.0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_of_one_row_still_relays_every_table() {
    let env = TestEnv::new(Setup::new().set("relay", "max_rows_in_memory", "1")).await;
    let tables: Vec<String> = (0..3).map(|i| format!("one.t{i}")).collect();
    env.add_tables(&tables).await;
    let relay = env.start_relay();
    relay.wait_for_log("relaying").await;
    let mut conn = env.pool.acquire().await.unwrap();
    for table in &tables {
        insert_rows(&mut conn, table, &rows_over_keys(table, 2, 10))
            .await
            .unwrap();
    }
    let received = env.consumer.wait_for(30).await;
    assert_first_deliveries_in_id_order(&received);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_of_zero_rows_is_refused_with_the_key_named() {
    let env = TestEnv::new(Setup::new().set("relay", "max_rows_in_memory", "7")).await;
    let config = std::fs::read_to_string(&env.config_path).unwrap();
    assert!(config.contains("max_rows_in_memory = 7"), "{config}");
    std::fs::write(
        &env.config_path,
        config.replace("max_rows_in_memory = 7", "max_rows_in_memory = 0"),
    )
    .unwrap();
    let out = env.cli(&["check-config"]).await;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(
        out.stderr
            .contains("relay.max_rows_in_memory: expected 1 to 10000000, got 0"),
        "{}",
        out.stderr
    );
}
