//! `outbox-relay discard`: a parked row ended for good while the relay runs. Its key moves on
//! in order (under hold_key, also while a producer of the key holds the key's lock; under
//! skip), the row is kept as discarded with the reason and the time (status, its listing, the
//! metrics, the relay's record) and is never published again: not by the relay, not by
//! `replay`, not by `retry`. Only parked rows are discarded, and a command that matched nothing
//! says why and exits 1.

use outbox_relay_testkit::prelude::*;
use sqlx::Row;

/// Waits until row `id` satisfies `done`, returning its state.
async fn wait_row(
    env: &TestEnv,
    id: i64,
    what: &str,
    done: impl Fn(&RowState) -> bool,
) -> RowState {
    eventually(what, || async { done(&env.row(id).await) }).await;
    env.row(id).await
}

/// The rows of the test's table flagged held.
async fn held_rows(env: &TestEnv) -> Vec<i64> {
    sqlx::query_scalar(&format!(
        "SELECT id FROM {} WHERE held ORDER BY id",
        quoted_table(&env.table)
    ))
    .fetch_all(&env.pool)
    .await
    .expect("read held rows")
}

/// The relay's record of a discarded row: reason, attempts and the row's dedup key as kept.
async fn record(env: &TestEnv, id: i64) -> Option<(String, i32, String)> {
    sqlx::query(
        "SELECT reason, attempts, row_data->>'dedup_key' AS dedup_key FROM outbox_relay.discarded \
         WHERE table_oid = $1::regclass::oid::bigint AND row_id = $2",
    )
    .bind(quoted_table(&env.table))
    .bind(id)
    .fetch_optional(&env.pool)
    .await
    .expect("read the discard record")
    .map(|r| (r.get("reason"), r.get("attempts"), r.get("dedup_key")))
}

/// Scrapes until `check` holds for a scrape (the row gauges are read at most every 10 s).
async fn scrape_until(addr: &str, what: &str, check: impl Fn(&Scrape) -> bool) -> Scrape {
    eventually(what, || async { check(&Scrape::of(addr).await) }).await;
    Scrape::of(addr).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_row_discarded_under_hold_key_lets_its_key_go_on_in_order_and_is_never_published_again(
) {
    let env = TestEnv::new(Setup::new().set("retry", "max_attempts", "1").set(
        "health",
        "listen",
        "\"127.0.0.1:0\"",
    ))
    .await;
    let relay = env.start_relay();
    let addr = health_addr(&relay).await;
    let late = format!("{}_late", env.name);
    let ids = env
        .insert(&[
            NewRow::new("poison", "k").exchange(&late),
            NewRow::new("k-2", "k"),
            NewRow::new("k-3", "k"),
        ])
        .await;
    let parked = wait_row(&env, ids[0], "the row to be parked", |r| {
        r.parked_at.is_some()
    })
    .await;
    eventually("the rows behind it to be held", || async {
        held_rows(&env).await == ids[1..]
    })
    .await;

    // A producer of the key in the middle of its transaction holds the key's order-guard lock:
    // the discard waits for its commit, and its row (inserted held) goes out after the others.
    let mut producer = env.pool.begin().await.unwrap();
    let late_row = insert_rows(&mut producer, &env.table, &[NewRow::new("k-4", "k")])
        .await
        .unwrap()[0];
    let config = env.config_path.clone();
    let poison = ids[0].to_string();
    let discard = tokio::spawn(async move {
        run_cli(
            &config,
            &[
                "discard",
                "--id",
                &poison,
                "--reason",
                "the exchange is gone for good (OPS-12)",
            ],
        )
        .await
    });
    eventually("the discard to wait for the key's lock", || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND NOT l.granted AND a.application_name = 'outbox-relay' \
               AND a.datname = current_database()",
        )
        .fetch_one(&env.pool)
        .await
        .unwrap()
            == 1
    })
    .await;
    producer.commit().await.unwrap();
    let out = discard.await.unwrap();
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains(&format!(
            "public.outbox: discarded row {} of key \"k\" (parked after 1 attempt(s): ",
            ids[0]
        )) && out.stdout.contains(&format!(
            "public.outbox: discarded 1 parked row(s): id {} (marked published, recorded in \
             outbox_relay.discarded); 3 row(s) held behind them go out now",
            ids[0]
        )),
        "{out:?}"
    );

    let received = env.consumer.wait_for(3).await;
    assert_eq!(
        delivered_of_key(&received, "k"),
        [ids[1], ids[2], late_row],
        "the key goes on in order without the discarded row"
    );
    env.wait_all_marked().await;
    let row = env.row(ids[0]).await;
    assert!(
        row.published_at.is_some()
            && row.parked_at.is_none()
            && row.last_error.as_deref()
                == Some("discarded: the exchange is gone for good (OPS-12)"),
        "{row:?}"
    );
    assert_eq!(
        record(&env, ids[0]).await,
        Some((
            "the exchange is gone for good (OPS-12)".into(),
            parked.attempts,
            "poison".into()
        ))
    );
    assert!(held_rows(&env).await.is_empty());

    let status = env.status_json().await;
    assert_eq!(
        (
            status["parked"].as_i64(),
            status["discarded"].as_i64(),
            status["published"].as_i64(),
            status["held"].as_i64()
        ),
        (Some(0), Some(1), Some(3), Some(0)),
        "a discarded row is not counted as published: {status}"
    );
    let listing = env.cli(&["status", "--parked", "5"]).await;
    let line = listing
        .stdout
        .lines()
        .find(|l| l.starts_with("discarded"))
        .unwrap_or_else(|| panic!("status --parked lists the discarded row: {listing:?}"));
    assert!(
        line.contains(&format!("id={}", ids[0]))
            && line.contains("the exchange is gone for good (OPS-12)")
            && line.contains(&late),
        "{line}"
    );
    let text = env.cli(&["status"]).await;
    let header: Vec<&str> = text
        .stdout
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        &header[..9],
        [
            "TABLE",
            "PENDING",
            "DUE",
            "RETRYING",
            "HELD",
            "PARKED",
            "DISCARDED",
            "PUBLISHED",
            "OLDEST"
        ],
        "{text:?}"
    );
    let scrape = scrape_until(&addr, "the discarded row in the metrics", |s| {
        s.value("outbox_relay_discarded_rows", &[("table", "public.outbox")]) == Some(1.0)
    })
    .await;
    assert_eq!(
        scrape.value("outbox_relay_parked_rows", &[("table", "public.outbox")]),
        Some(0.0)
    );

    // Never again: not by the relay once the exchange exists, not by retry, not by replay.
    env.declare_exchange(&late).await;
    env.bind(&late, "#").await;
    let retry = env.cli(&["retry", "--id", &ids[0].to_string()]).await;
    assert_eq!(retry.code, 1, "{retry:?}");
    assert!(
        retry.stderr.contains(&format!(
            "public.outbox: no parked row with id {} to release: it was discarded at ",
            ids[0]
        )),
        "{retry:?}"
    );
    let again = env
        .cli(&["discard", "--id", &ids[0].to_string(), "--reason", "twice"])
        .await;
    assert_eq!(again.code, 1, "{again:?}");
    assert!(again.stderr.contains("it was discarded at"), "{again:?}");
    let dry = env
        .cli(&["replay", "--table", "outbox", "--from-id", "1", "--dry-run"])
        .await;
    assert!(
        dry.code == 0
            && dry.stdout.contains("3 row(s) to replay")
            && dry.stdout.contains("skipped 1 discarded row(s)"),
        "{dry:?}"
    );
    let replay = env
        .cli(&["replay", "--table", "outbox", "--from-id", "1"])
        .await;
    assert_eq!(replay.code, 0, "{replay:?}");
    env.insert(&[NewRow::new("k-5", "k")]).await;
    env.consumer.wait_for_id("k-5").await;
    eventually("the replayed messages", || async {
        env.consumer.received().len() >= 7
    })
    .await;
    env.wait_until_queue_is_settled().await;
    assert!(
        env.consumer
            .received()
            .iter()
            .all(|m| m.message_id != "poison"),
        "the discarded row never reached the broker"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_skip_and_in_delete_mode_discard_by_key_ends_every_parked_row_of_the_key() {
    let env = TestEnv::new(
        Setup::new()
            .set("retry", "max_attempts", "1")
            .set("retry", "on_exhausted", "\"skip\"")
            .set("outbox", "on_published", "\"delete\""),
    )
    .await;
    let _relay = env.start_relay();
    let late = format!("{}_late", env.name);
    let ids = env
        .insert(&[
            NewRow::new("s-1", "s").exchange(&late),
            NewRow::new("s-2", "s"),
            NewRow::new("s-3", "s").exchange(&late),
            NewRow::new("s-4", "s"),
        ])
        .await;
    let received = env.consumer.wait_for(2).await;
    assert_eq!(delivered_of_key(&received, "s"), [ids[1], ids[3]]);
    for id in [ids[0], ids[2]] {
        wait_row(&env, id, "the row to be parked", |r| r.parked_at.is_some()).await;
    }

    let out = env
        .cli(&["discard", "--key", "s", "--reason", "replaced by s-5"])
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains(&format!(
            "discarded 2 parked row(s): id {}, {} (deleted from the table, recorded in \
             outbox_relay.discarded)",
            ids[0], ids[2]
        )),
        "{out:?}"
    );
    assert_eq!(
        env.unpublished_count().await,
        0,
        "deleted, as published rows are"
    );
    for id in [ids[0], ids[2]] {
        let kept = record(&env, id).await.expect("the relay keeps the record");
        assert_eq!(kept.0, "replaced by s-5");
    }
    let status = env.status_json().await;
    assert_eq!(
        (status["parked"].as_i64(), status["discarded"].as_i64()),
        (Some(0), Some(2)),
        "{status}"
    );
    let json = env.cli(&["status", "--json", "--parked", "5"]).await;
    let json: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    let listed: Vec<i64> = json[0]["discarded_rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_i64().unwrap())
        .collect();
    assert_eq!(listed, [ids[2], ids[0]], "most recent first: {json}");

    let nothing = env
        .cli(&["discard", "--key", "s", "--reason", "again"])
        .await;
    assert_eq!(nothing.code, 1, "{nothing:?}");
    assert!(
        nothing.stderr.contains(
            "public.outbox: no parked row of key \"s\" to discard (2 row(s) of the key were discarded)"
        ),
        "{nothing:?}"
    );
    env.declare_exchange(&late).await;
    env.bind(&late, "#").await;
    env.insert(&[NewRow::new("s-5", "s").exchange(&late)]).await;
    env.consumer.wait_for_id("s-5").await;
    let received = env.consumer.received();
    assert_eq!(
        received.len(),
        3,
        "the discarded rows never went out: {received:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_parked_rows_are_discarded_and_a_command_that_matched_nothing_says_why_and_exits_1() {
    // The failing row must stay pending (not parked) through the whole test, however slow the
    // machine: one attempt, then an hour until the next.
    let env = TestEnv::new(
        Setup::new()
            .set("retry", "max_attempts", "5")
            .set("retry", "initial_delay", "\"1h\"")
            .set("retry", "max_delay", "\"1h\""),
    )
    .await;
    let _relay = env.start_relay();
    let late = format!("{}_late", env.name);
    let ids = env
        .insert(&[
            NewRow::new("fine", "a"),
            NewRow::new("failing", "b").exchange(&late),
        ])
        .await;
    env.consumer.wait_for_id("fine").await;
    wait_row(&env, ids[0], "the row to be marked", |r| {
        r.published_at.is_some()
    })
    .await;
    wait_row(&env, ids[1], "a failed attempt", |r| r.attempts >= 1).await;

    let (fine, failing) = (ids[0].to_string(), ids[1].to_string());
    let cases = [
        (
            vec!["discard", "--id", "99999", "--reason", "x"],
            "public.outbox: no parked row with id 99999 to discard: no such row".to_owned(),
        ),
        (
            vec!["retry", "--id", "99999"],
            "public.outbox: no parked row with id 99999 to release: no such row".to_owned(),
        ),
        (
            vec!["discard", "--id", &fine, "--reason", "x"],
            format!(
                "public.outbox: no parked row with id {} to discard: it was already published at ",
                ids[0]
            ),
        ),
        (
            vec!["discard", "--id", &failing, "--reason", "x"],
            format!(
                "public.outbox: no parked row with id {} to discard: it is not parked but pending",
                ids[1]
            ),
        ),
        (
            vec!["retry", "--key", "nobody"],
            "public.outbox: no parked row of key \"nobody\" to release".to_owned(),
        ),
        (
            vec!["retry", "--all"],
            "public.outbox: no parked row to release".to_owned(),
        ),
    ];
    for (args, expected) in &cases {
        let out = env.cli(args).await;
        assert_eq!(out.code, 1, "{args:?}: {out:?}");
        assert!(out.stderr.contains(expected.as_str()), "{args:?}: {out:?}");
    }
    let no_reason = env.cli(&["discard", "--id", "1", "--reason", " "]).await;
    assert_eq!(no_reason.code, 2, "{no_reason:?}");
    assert!(
        no_reason.stderr.contains("a reason is required"),
        "{no_reason:?}"
    );
    let no_reason = env.cli(&["discard", "--id", "1"]).await;
    assert_eq!(no_reason.code, 2, "{no_reason:?}");
    let help = env.cli(&["discard", "--help"]).await;
    assert!(
        help.code == 0 && help.stdout.contains("Examples:") && help.stdout.contains("--reason"),
        "{help:?}"
    );
    let pending = env.row(ids[1]).await;
    assert!(pending.parked_at.is_none() && pending.published_at.is_none());
}

/// Debezium's outbox table as its documentation creates it (adopted, mapped columns).
const DEBEZIUM_TABLE: &str = "CREATE TABLE public.dbz_outbox (
    id            uuid         NOT NULL PRIMARY KEY,
    aggregatetype varchar(255) NOT NULL,
    aggregateid   varchar(255) NOT NULL,
    type          varchar(255) NOT NULL,
    payload       jsonb
)";

/// A Debezium producer's insert of one row of `aggregate`, routed by `aggregate_type`.
async fn insert_debezium(pool: &sqlx::PgPool, aggregate_type: &str, aggregate: &str) -> String {
    sqlx::query_scalar(
        "INSERT INTO public.dbz_outbox (id, aggregatetype, aggregateid, type, payload) \
         VALUES (gen_random_uuid(), $1, $2, 'OrderUpdated', '{}') RETURNING id::text",
    )
    .bind(aggregate_type)
    .bind(aggregate)
    .fetch_one(pool)
    .await
    .expect("a Debezium producer's insert")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_row_of_an_adopted_table_is_discarded_by_key_and_its_key_goes_on() {
    let env = TestEnv::new(
        Setup::new()
            .without_migrate()
            .table("public.dbz_outbox")
            .set("outbox", "layout", "\"debezium\""),
    )
    .await;
    sqlx::raw_sql(DEBEZIUM_TABLE)
        .execute(&env.pool)
        .await
        .unwrap();
    let adopted = env.cli(&["migrate", "--adopt", "--from", "now"]).await;
    assert_eq!(adopted.code, 0, "{adopted:?}");
    let _relay = env.start_relay();
    // A routing key AMQP cannot carry (400 bytes): parked at once, its key held.
    let bad = insert_debezium(&env.pool, &"é".repeat(200), "order-k").await;
    let behind = [
        insert_debezium(&env.pool, "orders", "order-k").await,
        insert_debezium(&env.pool, "orders", "order-k").await,
    ];
    eventually("the row parked, its key's later rows held", || async {
        let status = env.status_json().await;
        status["parked"] == 1 && status["held"] == 2
    })
    .await;

    let out = env
        .cli(&[
            "discard",
            "--key",
            "order-k",
            "--reason",
            "aggregatetype cannot be a routing key",
        ])
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains("discarded 1 parked row(s)")
            && out.stdout.contains("2 row(s) held behind them go out now"),
        "{out:?}"
    );
    let received = env.consumer.wait_for(2).await;
    let ids: Vec<&str> = received.iter().map(|m| m.message_id.as_str()).collect();
    assert_eq!(
        ids, behind,
        "the key goes on in order without the discarded row"
    );
    let kept: String = sqlx::query_scalar(
        "SELECT row_data->>'id' FROM outbox_relay.discarded \
         WHERE table_oid = 'public.dbz_outbox'::regclass::oid::bigint",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(kept, bad);
    eventually("the rows behind it marked", || async {
        let status = env.status_json().await;
        status["published"] == 2 && status["discarded"] == 1 && status["parked"] == 0
    })
    .await;
}
