//! End to end: rows written by a producer reach a real consumer with every property of the
//! contract, and are marked published; `status` and `check-config` report what a user needs.

use std::collections::HashMap;

use lapin::types::AMQPValue;
use outbox_relay_testkit::prelude::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_arrive_with_every_contract_property_and_are_then_marked_published() {
    let env = TestEnv::new(
        Setup::new()
            .table("app.events_outbox")
            .relay_declares_exchange(),
    )
    .await;
    let audit = format!("{}_audit", env.name);
    env.declare_exchange(&audit).await;
    env.bind(&audit, "audit.#").await;
    let _relay = env.start_relay();
    env.bind_when_declared("#").await;

    let rows = vec![
        NewRow::new("order-1-created", "order-1")
            .routing_key("orders.created")
            .event_type("OrderCreated")
            .payload(json!({"order": 1, "total": 5.5, "items": ["a", "b"], "note": "ünïcödé"}))
            .headers(json!({"tenant": "acme", "n": 3, "ok": true, "ratio": 0.5})),
        NewRow::new("order-1-paid", "order-1")
            .routing_key("orders.paid")
            .event_type("OrderPaid")
            .payload(json!({"order": 1, "paid": true})),
        NewRow::new("order-2-created", "order-2")
            .routing_key("orders.created")
            .event_type("OrderCreated")
            .payload(json!({"order": 2})),
        NewRow::new("order-2-audited", "order-2")
            .exchange(&audit)
            .routing_key("audit.orders")
            .event_type("OrderAudited")
            .payload(json!([1, "two", null])),
    ];
    let ids = env.insert(&rows).await;
    env.consumer.wait_for(rows.len()).await;
    env.wait_all_marked().await;
    // A marked row is never fetched again, and whatever the broker confirmed before the marks is
    // in the queue or with the consumer: once the queue is settled, these are all the
    // deliveries there will be, late duplicates included.
    env.wait_until_queue_is_settled().await;
    let received = env.consumer.received();
    assert_eq!(
        received.len(),
        rows.len(),
        "each row delivered exactly once without faults: {received:#?}"
    );

    let by_id: HashMap<&str, &Received> = received
        .iter()
        .map(|r| (r.message_id.as_str(), r))
        .collect();
    for (row, id) in rows.iter().zip(&ids) {
        let m = by_id
            .get(row.dedup_key.as_str())
            .unwrap_or_else(|| panic!("{} not received", row.dedup_key));
        let state = env.row(*id).await;
        assert_eq!(m.message_id, row.dedup_key, "message_id is the dedup_key");
        assert_eq!(
            m.kind.as_deref(),
            Some(row.event_type.as_str()),
            "type is the event_type"
        );
        assert_eq!(m.content_type.as_deref(), Some("application/json"));
        assert_eq!(m.delivery_mode, Some(2), "persistent");
        assert_eq!(
            m.timestamp,
            Some(state.created_epoch.floor() as u64),
            "timestamp is created_at in unix seconds"
        );
        assert_eq!(m.routing_key, row.routing_key);
        let exchange = row.exchange.clone().unwrap_or_else(|| env.exchange.clone());
        assert_eq!(m.exchange, exchange, "the row's exchange, else the table's");
        assert_eq!(m.body_json(), row.payload, "body is the payload as JSON");
        assert!(std::str::from_utf8(&m.body).is_ok(), "body is UTF-8");
        assert_eq!(
            m.header_str("x-outbox-table").as_deref(),
            Some("app.events_outbox")
        );
        assert_eq!(m.outbox_id(), *id);
        assert_eq!(m.ordering_key(), row.ordering_key);
        assert_eq!(state.attempts, 0, "no failed attempts on the clean path");
        let published_at = state.published_at.expect("marked published after delivery");
        assert!(published_at >= state.created_at);
        assert!(state.parked_at.is_none() && state.last_error.is_none());
    }

    let first = by_id["order-1-created"];
    assert_eq!(first.header_str("tenant").as_deref(), Some("acme"));
    assert_eq!(first.headers.get("n"), Some(&AMQPValue::LongLongInt(3)));
    assert_eq!(first.headers.get("ok"), Some(&AMQPValue::Boolean(true)));
    assert_eq!(first.headers.get("ratio"), Some(&AMQPValue::Double(0.5)));
    let expected_names = [
        "n",
        "ok",
        "ratio",
        "tenant",
        "x-ordering-key",
        "x-outbox-id",
        "x-outbox-table",
    ];
    assert_eq!(
        first.headers.keys().map(String::as_str).collect::<Vec<_>>(),
        expected_names,
        "the row's headers plus the relay's three"
    );
    assert_first_deliveries_in_id_order(&received);

    let published = env.published_ids().await;
    assert_eq!(
        published,
        delivered_ids(&received),
        "every marked row was received, and only those"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_pending_and_published_counts_as_text_and_json() {
    let env = TestEnv::new(Setup::new()).await;
    env.insert(&rows_over_keys("s", 3, 5)).await;

    let before = env.cli(&["status", "--json"]).await;
    assert_eq!(before.code, 0, "{before:?}");
    let json: Value = serde_json::from_str(&before.stdout).expect("status --json prints JSON");
    let t = &json[0];
    assert_eq!(t["table"], "public.outbox");
    assert_eq!(
        (t["pending"].as_i64(), t["due"].as_i64()),
        (Some(5), Some(5))
    );
    assert_eq!(
        (t["parked"].as_i64(), t["published"].as_i64()),
        (Some(0), Some(0))
    );
    assert!(
        t["oldest_pending_s"].as_f64().is_some_and(|s| s >= 0.0),
        "{t}"
    );

    let text = env.cli(&["status"]).await;
    assert_eq!(text.code, 0, "{text:?}");
    let header: Vec<&str> = text
        .stdout
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        &header[..8],
        [
            "TABLE",
            "PENDING",
            "DUE",
            "RETRYING",
            "HELD",
            "PARKED",
            "DISCARDED",
            "PUBLISHED"
        ],
        "{}",
        text.stdout
    );
    let line = status_line(&text.stdout, "public.outbox");
    assert_eq!(
        &line[1..8],
        ["5", "5", "0", "0", "0", "0", "0"],
        "{}",
        text.stdout
    );

    let _relay = env.start_relay();
    env.consumer.wait_for(5).await;
    env.wait_all_marked().await;

    let after = env.cli(&["status", "--json"]).await;
    let json: Value = serde_json::from_str(&after.stdout).expect("status --json prints JSON");
    let t = &json[0];
    assert_eq!(
        (t["pending"].as_i64(), t["due"].as_i64()),
        (Some(0), Some(0)),
        "{t}"
    );
    assert_eq!(
        (t["parked"].as_i64(), t["published"].as_i64()),
        (Some(0), Some(5)),
        "{t}"
    );
    assert!(t["oldest_pending_s"].is_null(), "nothing pending: {t}");
    let text = env.cli(&["status"]).await;
    let line = status_line(&text.stdout, "public.outbox");
    assert_eq!(
        &line[1..9],
        ["0", "0", "0", "0", "0", "0", "5", "-"],
        "{}",
        text.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_are_found_by_polling_when_notify_is_off() {
    let env = TestEnv::new(Setup::new().set("relay", "notify", "false")).await;
    let relay = env.start_relay();
    // Inserted once the relay is up and idle: only its poll can find them.
    relay.wait_for_log("relaying").await;
    let ids = env.insert(&rows_over_keys("p", 2, 10)).await;
    let received = env.consumer.wait_for(10).await;
    assert_eq!(delivered_ids(&received), ids.into_iter().collect());
    assert_first_deliveries_in_id_order(&received);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_reaches_both_servers_and_warns_about_a_missing_exchange() {
    let env = TestEnv::new(Setup::new()).await;
    let ok = env.cli(&["check-config"]).await;
    assert_eq!(ok.code, 0, "{ok:?}");
    assert!(ok.stdout.contains("valid"), "{}", ok.stdout);
    assert!(
        ok.stdout.contains("postgres") && ok.stdout.contains("reachable"),
        "{}",
        ok.stdout
    );
    assert!(ok.stdout.contains("rabbitmq"), "{}", ok.stdout);
    assert!(
        ok.stdout
            .contains(&format!("exchange \"{}\": exists", env.exchange)),
        "{}",
        ok.stdout
    );

    let missing = format!("{}_nowhere", env.name);
    let config = std::fs::read_to_string(&env.config_path).unwrap();
    let other = env.dir.join("missing-exchange.toml");
    std::fs::write(
        &other,
        config.replace(
            &format!("exchange = \"{}\"", env.exchange),
            &format!("exchange = \"{missing}\""),
        ),
    )
    .unwrap();
    let warned = run_cli(&other, &["check-config"]).await;
    assert_eq!(
        warned.code, 0,
        "a missing exchange is a warning, not an error: {warned:?}"
    );
    assert!(
        warned.stdout.contains(&missing) && warned.stdout.contains("WARNING"),
        "{}",
        warned.stdout
    );
}

/// The whitespace-separated fields of `table`'s line in `status` output.
fn status_line<'a>(stdout: &'a str, table: &str) -> Vec<&'a str> {
    stdout
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.first() == Some(&table))
        .unwrap_or_else(|| panic!("no line for {table} in:\n{stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_larger_than_one_amqp_frame_arrives_intact() {
    let env = TestEnv::new(Setup::new()).await;
    let _relay = env.start_relay();
    let blob: String = (0..1_000_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let payload = json!({ "blob": blob, "tail": "end" });
    env.insert(&[NewRow::new("big-1", "k").payload(payload.clone())])
        .await;
    let received = env.consumer.wait_for(1).await;
    assert_eq!(received[0].body_json(), payload);
    env.wait_all_marked().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_started_before_migrate_keeps_running_and_relays_once_the_table_exists() {
    let env = TestEnv::new(Setup::new().without_migrate()).await;
    let mut relay = env.start_relay();
    relay.wait_for_log("does not exist").await;
    assert!(
        relay.is_running(),
        "a missing table is waited for, not fatal"
    );
    let migrated = env.cli(&["migrate"]).await;
    assert_eq!(migrated.code, 0, "{migrated:?}");
    // Each migration by its number and what it does (not a number that reads as a row count).
    assert!(
        migrated.stdout.contains(
            "applied public.outbox: migration 2 (rows behind held keys leave the due index)"
        ),
        "{}",
        migrated.stdout
    );
    let again = env.cli(&["migrate"]).await;
    assert!(
        again.code == 0 && again.stdout.contains("up to date"),
        "migrate is idempotent: {again:?}"
    );

    let ids = env.insert(&rows_over_keys("m", 2, 6)).await;
    let received = env.consumer.wait_for(6).await;
    assert_eq!(delivered_ids(&received), ids.into_iter().collect());
    assert_first_deliveries_in_id_order(&received);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_written_while_the_relay_is_idle_wake_it_through_notify() {
    // A poll interval of an hour: only the insert trigger's NOTIFY (and `retry`'s) can wake it. A
    // table in a schema of its own (mixed-case names: tests/table_names.rs).
    let env = TestEnv::new(
        Setup::new()
            .table("sales.order_events")
            .set("relay", "poll_interval", "\"1h\"")
            .set("retry", "max_attempts", "1"),
    )
    .await;
    let relay = env.start_relay();
    relay.wait_for_log("relaying").await;
    let late = format!("{}_late", env.name);
    let ids = env
        .insert(&[
            NewRow::new("n-1", "k"),
            NewRow::new("n-2", "j").exchange(&late),
        ])
        .await;
    let received = env.consumer.wait_for_id("n-1").await;
    assert_eq!(
        received[0].header_str("x-outbox-table").as_deref(),
        Some("sales.order_events")
    );
    eventually("the row for the missing exchange to be parked", || async {
        env.row(ids[1]).await.parked_at.is_some()
    })
    .await;

    env.declare_exchange(&late).await;
    env.bind(&late, "#").await;
    let out = env.cli(&["retry", "--key", "j"]).await;
    assert!(
        out.code == 0 && out.stdout.contains("released 1"),
        "{out:?}"
    );
    env.consumer.wait_for_id("n-2").await;
    env.wait_all_marked().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tables_in_one_config_are_relayed_side_by_side() {
    let env = TestEnv::new(Setup::new()).await;
    let migrated = env.add_tables(&["app.second".into()]).await;
    assert!(migrated.stdout.contains("app.second"), "{migrated:?}");
    let _relay = env.start_relay();

    let first = env.insert(&rows_over_keys("one", 3, 30)).await;
    let mut tx = env.pool.begin().await.unwrap();
    let second = insert_rows(&mut tx, "app.second", &rows_over_keys("two", 3, 30))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let received = env.consumer.wait_for(60).await;
    for m in first_deliveries(&received) {
        let table = m.header_str("x-outbox-table").unwrap();
        let ids = if m.message_id.starts_with("one-") {
            &first
        } else {
            &second
        };
        let expected = if m.message_id.starts_with("one-") {
            "public.outbox"
        } else {
            "app.second"
        };
        assert_eq!(table, expected);
        assert!(ids.contains(&m.outbox_id()));
    }
    // Ids are per table, so order is checked per table.
    let (one, two): (Vec<Received>, Vec<Received>) = received
        .into_iter()
        .partition(|m| m.message_id.starts_with("one-"));
    assert_first_deliveries_in_id_order(&one);
    assert_first_deliveries_in_id_order(&two);

    let status = env.cli(&["status", "--json"]).await;
    let json: Value = serde_json::from_str(&status.stdout).unwrap();
    let tables: Vec<&str> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["table"].as_str().unwrap())
        .collect();
    assert_eq!(tables, ["public.outbox", "app.second"]);
    let ambiguous = env.cli(&["retry", "--id", "1"]).await;
    assert_eq!(ambiguous.code, 1, "{ambiguous:?}");
    assert!(ambiguous.stderr.contains("--table"), "{}", ambiguous.stderr);
    let scoped = env
        .cli(&["retry", "--id", "1", "--table", "app.second"])
        .await;
    assert!(
        scoped.code == 1
            && scoped
                .stderr
                .contains("app.second: no parked row with id 1 to release: no such row"),
        "{scoped:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_for_the_default_exchange_goes_straight_to_the_queue_its_routing_key_names() {
    let env = TestEnv::new(Setup::new()).await;
    let _relay = env.start_relay();
    let payload_text = r#"{"amount": 123456789012345678901234567890.5, "name": "Ærøskøbing ✓"}"#;
    // Written as SQL text: the test's own JSON library would round the number.
    sqlx::query(
        "INSERT INTO public.outbox (dedup_key, ordering_key, routing_key, event_type, payload, exchange) \
         VALUES ('direct-1', 'ключ-1', $1, 'Direct', $2::jsonb, '')",
    )
    .bind(&env.queue)
    .bind(payload_text)
    .execute(&env.pool)
    .await
    .unwrap();
    let received = env.consumer.wait_for(1).await;
    let m = &received[0];
    assert_eq!(m.exchange, "", "published to the default exchange");
    assert_eq!(m.routing_key, env.queue);
    assert_eq!(m.ordering_key(), "ключ-1");
    let body = std::str::from_utf8(&m.body).expect("UTF-8 body");
    assert!(
        body.contains("123456789012345678901234567890.5") && body.contains("Ærøskøbing ✓"),
        "numbers keep their digits and text its characters: {body}"
    );
}
