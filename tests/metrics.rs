//! `GET /metrics`: what an operator's Prometheus sees while rows flow, fail, park and are
//! released, and while a relay stands by or reconnects.

use outbox_relay_testkit::prelude::*;

fn with_metrics(setup: Setup) -> Setup {
    setup.set("health", "listen", "\"127.0.0.1:0\"")
}

/// Scrapes until `check` holds for a scrape (the row gauges are read at most every 10 s).
async fn scrape_until(addr: &str, what: &str, check: impl Fn(&Scrape) -> bool) -> Scrape {
    eventually(what, || async { check(&Scrape::of(addr).await) }).await;
    Scrape::of(addr).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_rows_as_they_flow_fail_park_and_are_released() {
    let env = TestEnv::new(with_metrics(Setup::new().set("retry", "max_attempts", "2"))).await;
    let relay = env.start_relay();
    let addr = health_addr(&relay).await;
    let table = env.table.as_str();
    let t = [("table", table)];

    let first = Scrape::of(&addr).await;
    let build = first
        .samples
        .iter()
        .find(|s| s.name == "outbox_relay_build_info")
        .expect("outbox_relay_build_info");
    assert_eq!(build.labels["version"], env!("CARGO_PKG_VERSION"));
    // The standard process metrics, as every exporter has them, unprefixed.
    let process = |name: &str| {
        first
            .value(name, &[])
            .unwrap_or_else(|| panic!("no {name} in:\n{}", first.text))
    };
    assert!(process("process_resident_memory_bytes") > 1024.0 * 1024.0);
    assert!(process("process_virtual_memory_bytes") >= process("process_resident_memory_bytes"));
    assert!(process("process_cpu_seconds_total") >= 0.0);
    assert!(process("process_threads") >= 1.0);
    let (open, max) = (process("process_open_fds"), process("process_max_fds"));
    assert!(open > 0.0 && open <= max, "open fds {open}, max {max}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64();
    let started = process("process_start_time_seconds");
    assert!(
        started <= now + 1.0 && started > now - 600.0,
        "the relay started at {started}, now is {now}"
    );
    assert_eq!(first.value("outbox_relay_published_total", &t), Some(0.0));

    let missing = format!("{}_missing", env.name);
    let ids = env
        .insert(&[
            NewRow::new("ok-1", "ok"),
            NewRow::new("ok-2", "ok"),
            NewRow::new("ok-3", "ok"),
            NewRow::new("lost-1", "lost").exchange(&missing),
            NewRow::new("lost-2", "lost"),
        ])
        .await;
    let ok = env.consumer.wait_for(3).await;
    assert_eq!(delivered_of_key(&ok, "ok"), ids[..3]);

    let parked = [("table", table), ("reason", "attempts_exhausted")];
    let scrape = scrape_until(&addr, "the parked row in the gauges", |s| {
        s.value("outbox_relay_parked_total", &parked) == Some(1.0)
            && s.value("outbox_relay_parked_rows", &t) == Some(1.0)
    })
    .await;
    assert_eq!(scrape.value("outbox_relay_published_total", &t), Some(3.0));
    assert_eq!(
        scrape.value(
            "outbox_relay_refused_total",
            &[("table", table), ("reason", "no_exchange")]
        ),
        Some(2.0),
        "two attempts, both refused: {}",
        scrape.text
    );
    assert_eq!(
        scrape.value(
            "outbox_relay_refused_total",
            &[("table", table), ("reason", "nack")]
        ),
        Some(0.0)
    );
    // The row behind the parked one is pending, held behind its key, and ages.
    assert_eq!(scrape.value("outbox_relay_held_rows", &t), Some(1.0));
    assert_eq!(scrape.value("outbox_relay_pending_rows", &t), Some(1.0));
    assert_eq!(scrape.value("outbox_relay_due_rows", &t), Some(0.0));
    assert!(scrape.value("outbox_relay_oldest_pending_age_seconds", &t) > Some(0.0));
    for histogram in [
        "outbox_relay_confirm_latency_seconds_count",
        "outbox_relay_commit_to_confirm_seconds_count",
    ] {
        assert_eq!(scrape.value(histogram, &t), Some(3.0), "{histogram}");
    }
    assert_eq!(
        scrape.value(
            "outbox_relay_table_state",
            &[("table", table), ("state", "relaying")]
        ),
        Some(1.0)
    );
    assert_eq!(
        scrape.value(
            "outbox_relay_table_state",
            &[("table", table), ("state", "database_down")]
        ),
        Some(0.0)
    );
    assert_eq!(scrape.value("outbox_relay_ready", &t), Some(1.0));
    assert!(
        !scrape.text.contains("ok-1") && !scrape.text.contains("\"lost\""),
        "no key or dedup key is a label"
    );

    env.declare_exchange(&missing).await;
    env.bind(&missing, "#").await;
    let released = env.cli(&["retry", "--all"]).await;
    assert_eq!(released.code, 0, "{released:?}");
    env.consumer.wait_for(5).await;
    env.wait_all_marked().await;
    let scrape = scrape_until(&addr, "the backlog to empty", |s| {
        s.value("outbox_relay_parked_rows", &t) == Some(0.0)
            && s.value("outbox_relay_pending_rows", &t) == Some(0.0)
    })
    .await;
    assert_eq!(scrape.value("outbox_relay_published_total", &t), Some(5.0));
    assert_eq!(
        scrape.value("outbox_relay_oldest_pending_age_seconds", &t),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_relay_reports_standby_and_a_closed_connection_counts_as_a_reconnect() {
    // One partition: the second relay owns nothing.
    let env = TestEnv::new(with_metrics(Setup::new().own_vhost().set(
        "outbox",
        "partitions",
        "1",
    )))
    .await;
    let active = env.start_relay();
    let active_addr = health_addr(&active).await;
    active.wait_for_log("relaying").await;
    let standby = env.start_relay();
    let standby_addr = health_addr(&standby).await;
    let table = env.table.as_str();
    let standing_by = [("table", table), ("state", "standby")];
    let scrape = scrape_until(&standby_addr, "the second relay to stand by", |s| {
        s.value("outbox_relay_table_state", &standing_by) == Some(1.0)
    })
    .await;
    assert_eq!(
        scrape.value("outbox_relay_ready", &[("table", table)]),
        Some(1.0),
        "standing by is ready"
    );

    let rabbitmq = [("server", "rabbitmq")];
    assert_eq!(
        Scrape::of(&active_addr)
            .await
            .value("outbox_relay_reconnects_total", &rabbitmq),
        Some(0.0)
    );
    env.close_broker_connections().await;
    let ids = env.insert(&rows_over_keys("after", 2, 4)).await;
    env.consumer.wait_for(ids.len()).await;
    let scrape = Scrape::of(&active_addr).await;
    assert!(
        scrape.value("outbox_relay_reconnects_total", &rabbitmq) >= Some(1.0),
        "{}",
        scrape.text
    );
    assert_eq!(
        scrape.value("outbox_relay_published_total", &[("table", table)]),
        Some(4.0),
        "{}",
        scrape.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_tables_report_their_backlog_and_a_dropped_one_does_not_hide_the_others() {
    const TABLES: usize = 60;
    let env = TestEnv::new(with_metrics(Setup::new())).await;
    let tables: Vec<String> = (1..TABLES).map(|i| format!("tenants.t{i}")).collect();
    env.add_tables(&tables).await;
    let relay = env.start_relay();
    let addr = health_addr(&relay).await;
    relay.wait_for_log("relaying").await;

    // A row of the last table, published and then parked by hand (as if it had failed).
    let last = tables.last().unwrap();
    let mut tx = env.pool.begin().await.unwrap();
    let ids = insert_rows(&mut tx, last, &[NewRow::new("late", "k")])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    env.consumer.wait_for(1).await;
    let marked = format!(
        "SELECT published_at IS NOT NULL FROM {} WHERE id = $1",
        quoted_table(last)
    );
    eventually("the row to be marked", || async {
        sqlx::query_scalar::<_, bool>(&marked)
            .bind(ids[0])
            .fetch_one(&env.pool)
            .await
            .unwrap()
    })
    .await;
    sqlx::query(&format!(
        "UPDATE {} SET published_at = NULL, parked_at = now(), last_error = 'by hand' WHERE id = $1",
        quoted_table(last)
    ))
    .bind(ids[0])
    .execute(&env.pool)
    .await
    .unwrap();

    let scrape = scrape_until(&addr, "the parked row in the last table", |s| {
        s.value("outbox_relay_parked_rows", &[("table", last)]) == Some(1.0)
    })
    .await;
    for table in std::iter::once(env.table.as_str()).chain(tables.iter().map(String::as_str)) {
        let pending = scrape.value("outbox_relay_pending_rows", &[("table", table)]);
        assert_eq!(pending, Some(0.0), "{table}");
    }

    // One table dropped: its chunk is read table by table, the others keep their gauges.
    sqlx::query("DROP TABLE tenants.t1")
        .execute(&env.pool)
        .await
        .unwrap();
    let read_at = scrape
        .value("outbox_relay_backlog_read_timestamp_seconds", &[])
        .unwrap();
    let scrape = scrape_until(&addr, "the backlog to be read again", |s| {
        s.value("outbox_relay_backlog_read_timestamp_seconds", &[]) > Some(read_at)
    })
    .await;
    assert_eq!(
        scrape.value("outbox_relay_parked_rows", &[("table", last)]),
        Some(1.0)
    );
    assert_eq!(
        scrape.value("outbox_relay_backlog_read_errors_total", &[]),
        Some(0.0),
        "a dropped table is the table's state, not a failed read"
    );
    let unusable = [("table", "tenants.t1"), ("state", "table_unusable")];
    scrape_until(&addr, "the dropped table's state", |s| {
        s.value("outbox_relay_table_state", &unusable) == Some(1.0)
    })
    .await;
}
