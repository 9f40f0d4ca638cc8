//! Adopting an application's own outbox table: a Debezium-layout table and a custom-named one
//! are relayed with the properties their mapping promises, by producers that only know their
//! own columns; `migrate --adopt` adds what the relay needs without blocking a producer on a
//! table of a million rows, says what it will do with `--dry-run`, runs twice to the same
//! end, publishes the rows from before only with `--from start`; a mapping that does not fit
//! the table exits 78 naming the table, the key and the column.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::types::AMQPValue;
use outbox_relay_testkit::prelude::*;
use serde_json::json;

/// Debezium's outbox table as its documentation creates it, plus an extra column placed as a
/// header.
const DEBEZIUM_TABLE: &str = "CREATE TABLE public.dbz_outbox (
    id            uuid         NOT NULL PRIMARY KEY,
    aggregatetype varchar(255) NOT NULL,
    aggregateid   varchar(255) NOT NULL,
    type          varchar(255) NOT NULL,
    payload       jsonb,
    tenant        text
)";

/// A Debezium producer: it writes Debezium's columns and nothing else.
async fn insert_debezium(pool: &sqlx::PgPool, aggregate: &str, n: i64) -> String {
    sqlx::query_scalar(
        "INSERT INTO public.dbz_outbox (id, aggregatetype, aggregateid, type, payload, tenant) \
         VALUES (gen_random_uuid(), 'orders', $1, 'OrderUpdated', jsonb_build_object('n', $2::bigint), 'acme') \
         RETURNING id::text",
    )
    .bind(aggregate)
    .bind(n)
    .fetch_one(pool)
    .await
    .expect("a Debezium producer's insert")
}

/// Appends a sub-table of the `[[outbox]]` table to the test's config.
fn append_config(env: &TestEnv, text: &str) {
    let mut config = std::fs::read_to_string(&env.config_path).expect("read the config");
    config += text;
    std::fs::write(&env.config_path, config).expect("write the config");
}

fn long_string(value: Option<&AMQPValue>) -> Option<String> {
    match value {
        Some(AMQPValue::LongString(s)) => Some(s.to_string()),
        _ => None,
    }
}

/// A test world whose table is Debezium's outbox (`DEBEZIUM_TABLE`, made but not adopted),
/// relayed with `layout = "debezium"` and `options` appended to the config file (an
/// `[outbox.debezium]` section, say).
async fn debezium_env(options: Option<&str>) -> TestEnv {
    let env = TestEnv::new(
        Setup::new()
            .without_migrate()
            .table("public.dbz_outbox")
            .set("outbox", "layout", "\"debezium\""),
    )
    .await;
    if let Some(options) = options {
        append_config(&env, options);
    }
    sqlx::raw_sql(DEBEZIUM_TABLE)
        .execute(&env.pool)
        .await
        .unwrap();
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debezium_outbox_table_is_relayed_with_the_presets_properties() {
    let env = debezium_env(Some(
        "\n[outbox.debezium]\ntable_fields_additional_placement = \"tenant:header,type:header:eventType\"\n",
    ))
    .await;
    // Rows from before adoption: with --from now they are never published.
    for n in 0..3 {
        insert_debezium(&env.pool, "order-old", n).await;
    }
    let adopted = env.cli(&["migrate", "--adopt", "--from", "now"]).await;
    assert_eq!(adopted.code, 0, "{adopted:?}");
    let checked = env.cli(&["check-config"]).await;
    assert_eq!(checked.code, 0, "{checked:?}");
    assert!(
        checked.stdout.contains("public.dbz_outbox: ready (adopted"),
        "{checked:?}"
    );

    let _relay = env.start_relay();
    // Two producers at once on the same keys, one row per transaction.
    let mut producers = Vec::new();
    for p in 0..2 {
        let pool = env.pool.clone();
        producers.push(tokio::spawn(async move {
            let mut written: HashMap<String, Vec<String>> = HashMap::new();
            for n in 0..20 {
                let key = format!("order-{}", n % 3);
                let id = insert_debezium(&pool, &key, n).await;
                written.entry(format!("{p}/{key}")).or_default().push(id);
            }
            written
        }));
    }
    let mut written: HashMap<String, Vec<String>> = HashMap::new();
    for p in producers {
        written.extend(p.await.unwrap());
    }
    let total: usize = written.values().map(Vec::len).sum();
    env.consumer.wait_for(total).await;
    env.wait_until_queue_is_settled().await;
    let received = env.consumer.received();
    assert_eq!(
        env.consumer.unique_count(),
        total,
        "only the new rows: {received:?}"
    );

    // Per aggregateid, in the order the guard numbered the rows (x-outbox-id), and each
    // producer's rows of a key in the order it wrote them; message_id is Debezium's id.
    assert_first_deliveries_in_id_order(&received);
    for (producer_key, ids) in &written {
        let key = producer_key.split_once('/').map_or("", |(_, k)| k);
        let got: Vec<&str> = first_deliveries(&received)
            .into_iter()
            .filter(|m| m.ordering_key() == key && ids.contains(&m.message_id))
            .map(|m| m.message_id.as_str())
            .collect();
        assert_eq!(
            got, *ids,
            "{producer_key}: message_id = id, in the producer's order"
        );
    }
    for m in &received {
        assert_eq!(m.routing_key, "orders", "aggregatetype is the routing key");
        assert_eq!(
            m.kind.as_deref(),
            Some("OrderUpdated"),
            "type is the AMQP type"
        );
        assert_eq!(m.content_type.as_deref(), Some("application/json"));
        assert_eq!(m.exchange, env.exchange);
        assert_eq!(
            long_string(m.headers.get("tenant")).as_deref(),
            Some("acme")
        );
        assert_eq!(
            long_string(m.headers.get("eventType")).as_deref(),
            Some("OrderUpdated")
        );
        assert!(
            m.body_json()["n"].is_i64(),
            "the payload is the body: {m:?}"
        );
    }
    eventually(
        "every new row marked published, the old ones not pending",
        || async {
            let status = env.status_json().await;
            status["pending"] == json!(0) && status["published"] == json!(total)
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_row_of_an_adopted_table_holds_its_key_until_retry() {
    let env = debezium_env(None).await;
    let adopted = env.cli(&["migrate", "--adopt", "--from", "now"]).await;
    assert_eq!(adopted.code, 0, "{adopted:?}");
    let _relay = env.start_relay();
    // A routing key AMQP cannot carry (400 bytes in 200 characters): parked at once, and its
    // key is held.
    let bad: String = sqlx::query_scalar(
        "INSERT INTO public.dbz_outbox (id, aggregatetype, aggregateid, type, payload) \
         VALUES (gen_random_uuid(), repeat('é', 200), 'order-k', 'OrderCreated', '{}') RETURNING id::text",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    let behind = [
        insert_debezium(&env.pool, "order-k", 1).await,
        insert_debezium(&env.pool, "order-k", 2).await,
    ];
    let other = insert_debezium(&env.pool, "order-l", 1).await;
    env.consumer.wait_for_id(&other).await;
    eventually("the row parked, its key's later rows held", || async {
        let status = env.status_json().await;
        status["parked"] == json!(1) && status["held"] == json!(2)
    })
    .await;
    let parked = env.cli(&["status", "--parked", "5"]).await;
    assert!(parked.stdout.contains(&bad), "{parked:?}");
    assert!(
        parked
            .stdout
            .contains("unpublishable: routing_key is 400 bytes"),
        "{parked:?}"
    );
    assert_eq!(
        env.consumer.unique_count(),
        1,
        "nothing of order-k went out"
    );

    sqlx::query("UPDATE public.dbz_outbox SET aggregatetype = 'orders' WHERE id = $1::uuid")
        .bind(&bad)
        .execute(&env.pool)
        .await
        .unwrap();
    let retried = env.cli(&["retry", "--key", "order-k"]).await;
    assert_eq!(retried.code, 0, "{retried:?}");
    let received = env.consumer.wait_for(4).await;
    let of_key: Vec<&str> = first_deliveries(&received)
        .into_iter()
        .filter(|m| m.ordering_key() == "order-k")
        .map(|m| m.message_id.as_str())
        .collect();
    assert_eq!(
        of_key,
        [bad.as_str(), behind[0].as_str(), behind[1].as_str()]
    );
}

/// An application's own table: names of its own, a text payload, header columns, a routing
/// key made of a column.
const CUSTOM_TABLE: &str = "CREATE TABLE public.app_events (
    event_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream      text        NOT NULL,
    topic       text        NOT NULL,
    kind        text        NOT NULL,
    body        text        NOT NULL,
    meta        jsonb,
    tenant_id   integer,
    trace       text,
    inserted_at timestamptz NOT NULL DEFAULT now()
)";

const CUSTOM_COLUMNS: &str = "
[outbox.columns]
dedup_key = \"event_id\"
ordering_key = \"stream\"
routing_key_template = \"app.{topic}\"
event_type = \"kind\"
payload = \"body\"
payload_type = \"text\"
headers = \"meta\"
header_columns = [\"tenant_id:x-tenant\", \"trace\"]
created_at = \"inserted_at\"
";

async fn insert_custom(pool: &sqlx::PgPool, stream: &str, body: &str) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO public.app_events (stream, topic, kind, body, meta, tenant_id, trace) \
         VALUES ($1, 'orders', 'order.noted', $2, '{\"source\": \"shop\"}', 7, 'tr-1') RETURNING event_id",
    )
    .bind(stream)
    .bind(body)
    .fetch_one(pool)
    .await
    .expect("the application's insert")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_table_with_a_text_payload_and_header_columns_publishes_its_backlog_first() {
    let env = TestEnv::new(Setup::new().without_migrate().table("public.app_events")).await;
    append_config(&env, CUSTOM_COLUMNS);
    sqlx::raw_sql(CUSTOM_TABLE)
        .execute(&env.pool)
        .await
        .unwrap();
    let mut before = Vec::new();
    for n in 0..5 {
        before.push(insert_custom(&env.pool, "s-1", &format!("old {n}")).await);
    }
    // Plain migrate does not adopt: which rows to publish is the operator's choice.
    let plain = env.cli(&["migrate"]).await;
    assert_ne!(plain.code, 0, "{plain:?}");
    assert!(plain.stderr.contains("--from now"), "{plain:?}");

    let adopted = env.cli(&["migrate", "--adopt", "--from", "start"]).await;
    assert_eq!(adopted.code, 0, "{adopted:?}");
    assert!(adopted.stdout.contains("number the 5 rows"), "{adopted:?}");
    let changed = env.cli(&["migrate", "--adopt", "--from", "now"]).await;
    assert_ne!(changed.code, 0, "the choice is made once: {changed:?}");

    let _relay = env.start_relay();
    let mut after = Vec::new();
    for n in 0..5 {
        after.push(insert_custom(&env.pool, "s-1", &format!("new {n}")).await);
    }
    let received = env.consumer.wait_for(10).await;
    let ids: Vec<String> = first_deliveries(&received)
        .iter()
        .map(|m| m.message_id.clone())
        .collect();
    let expected: Vec<String> = before.iter().chain(&after).map(i64::to_string).collect();
    assert_eq!(
        ids, expected,
        "the rows from before first, then the new, in order"
    );
    let m = &received[0];
    assert_eq!(m.body, b"old 0");
    assert_eq!(m.content_type.as_deref(), Some("text/plain; charset=utf-8"));
    assert_eq!(m.routing_key, "app.orders");
    assert_eq!(m.kind.as_deref(), Some("order.noted"));
    assert_eq!(m.headers.get("x-tenant"), Some(&AMQPValue::LongLongInt(7)));
    assert_eq!(long_string(m.headers.get("trace")).as_deref(), Some("tr-1"));
    assert_eq!(
        long_string(m.headers.get("source")).as_deref(),
        Some("shop")
    );
    assert!(
        m.timestamp.is_some_and(|t| t > 0),
        "inserted_at is the timestamp"
    );

    eventually("every row marked published", || async {
        let status = env.status_json().await;
        status["pending"] == json!(0) && status["published"] == json!(10)
    })
    .await;

    // A key the relay's indexes could not take is refused at the application's insert, as on
    // the relay's own tables (the rows from before adoption were not scanned).
    let refused = sqlx::query(
        "INSERT INTO public.app_events (stream, topic, kind, body) VALUES ($1, 'orders', 'k', 'b')",
    )
    .bind("s".repeat(1025))
    .execute(&env.pool)
    .await
    .expect_err("a 1025-byte key is refused")
    .to_string();
    assert!(refused.contains("ordering_key_length"), "{refused}");
}

/// When each insert of a producer began and how long it took.
type InsertTimes = Vec<(Instant, Duration)>;

/// The longest insert that overlapped `[from, to]`, and the longest of the others.
fn longest_inserts(times: &InsertTimes, from: Instant, to: Instant) -> (Duration, Duration) {
    let (mut during, mut outside) = (Duration::ZERO, Duration::ZERO);
    for (at, took) in times {
        if *at <= to && *at + *took >= from {
            during = during.max(*took);
        } else {
            outside = outside.max(*took);
        }
    }
    (during, outside)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_adopt_on_a_million_rows_never_blocks_a_concurrent_producer_for_long() {
    let env = debezium_env(None).await;
    let started = Instant::now();
    sqlx::raw_sql(
        "INSERT INTO public.dbz_outbox (id, aggregatetype, aggregateid, type, payload) \
         SELECT gen_random_uuid(), 'orders', 'order-' || (g % 1000), 'OrderCreated', '{\"n\": 1}' \
         FROM generate_series(1, 1000000) g",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    println!("1M rows written in {:?}", started.elapsed());
    let relfilenode = || async {
        sqlx::query_scalar::<_, sqlx::postgres::types::Oid>(
            "SELECT relfilenode FROM pg_class WHERE oid = 'public.dbz_outbox'::regclass",
        )
        .fetch_one(&env.pool)
        .await
        .unwrap()
    };
    let columns = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM information_schema.columns WHERE table_name = 'dbz_outbox'",
        )
        .fetch_one(&env.pool)
        .await
        .unwrap()
    };
    let (file_before, columns_before) = (relfilenode().await, columns().await);

    let dry = env
        .cli(&["migrate", "--adopt", "--from", "now", "--dry-run"])
        .await;
    assert_eq!(dry.code, 0, "{dry:?}");
    print!("{}", dry.stdout);
    for step in [
        "add the columns",
        "install the order guard",
        "CONCURRENTLY",
        "leave the 1000000 rows",
    ] {
        assert!(
            dry.stdout.contains(step),
            "dry run names {step:?}: {}",
            dry.stdout
        );
    }
    assert!(
        dry.stdout.contains("dry run: nothing changed"),
        "{}",
        dry.stdout
    );
    assert_eq!(columns().await, columns_before, "a dry run changes nothing");

    // A producer that inserts one event per transaction throughout, timing each insert.
    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let (pool, stop) = (env.pool.clone(), stop.clone());
        tokio::spawn(async move {
            let mut times = InsertTimes::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let at = Instant::now();
                insert_debezium(&pool, &format!("order-{}", n % 50), n).await;
                times.push((at, at.elapsed()));
                n += 1;
            }
            times
        })
    };
    eventually("the producer is inserting", || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM public.dbz_outbox WHERE type = 'OrderUpdated'",
        )
        .fetch_one(&env.pool)
        .await
        .unwrap()
            > 10
    })
    .await;
    let migrate_started = Instant::now();
    let inserts_before: i64 =
        sqlx::query_scalar("SELECT count(*) FROM public.dbz_outbox WHERE type = 'OrderUpdated'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    let adopted = env.cli(&["migrate", "--adopt", "--from", "now"]).await;
    let migrate_ended = Instant::now();
    let migrate_took = migrate_ended - migrate_started;
    let inserts_during = sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM public.dbz_outbox WHERE type = 'OrderUpdated'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap()
        - inserts_before;
    stop.store(true, Ordering::Relaxed);
    let times = producer.await.unwrap();
    let (during, outside) = longest_inserts(&times, migrate_started, migrate_ended);
    assert_eq!(adopted.code, 0, "{adopted:?}");
    print!("{}", adopted.stdout);
    println!(
        "migrate --adopt on 1M rows took {migrate_took:?}; the producer inserted {inserts_during} rows meanwhile \
         ({} in all); its longest insert during the migrate took {during:?} (outside it: {outside:?})",
        times.len()
    );
    assert!(
        inserts_during > 0,
        "the producer made progress while migrate --adopt ran"
    );
    assert_eq!(
        relfilenode().await,
        file_before,
        "the table was not rewritten"
    );

    // Idempotent: a second run finds everything in place.
    let again = env.cli(&["migrate", "--adopt"]).await;
    assert_eq!(again.code, 0, "{again:?}");
    assert!(again.stdout.contains("adopted, up to date"), "{again:?}");
    // --from now: the million rows from before are not pending; the producer's new rows are.
    let numbered: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM public.dbz_outbox WHERE outbox_relay_seq IS NOT NULL",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(numbered < 1_000_000 / 10, "{numbered}");
    let status = env.status_json().await;
    assert_eq!(status["pending"], json!(numbered), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mappings_that_do_not_fit_the_table_exit_78_naming_the_table_the_key_and_the_column() {
    let env = TestEnv::new(Setup::new().without_migrate().table("public.app_events")).await;
    append_config(
        &env,
        "
[outbox.columns]
dedup_key = \"event_id\"
ordering_key = \"no_such_column\"
routing_key = \"topic\"
event_type = \"kind\"
payload = \"tenant_id\"
payload_type = \"text\"
",
    );
    sqlx::raw_sql(CUSTOM_TABLE)
        .execute(&env.pool)
        .await
        .unwrap();
    for args in [
        &["check-config"][..],
        &["migrate", "--adopt", "--from", "now"][..],
        &["migrate", "--adopt", "--from", "now", "--dry-run"][..],
        &["run"][..],
    ] {
        let out = env.cli(args).await;
        assert_eq!(out.code, 78, "{args:?}: {out:?}");
        assert!(
            out.stderr.contains(
                "public.app_events: outbox[0].columns.ordering_key: column \"no_such_column\" does not exist"
            ),
            "{args:?}: {}",
            out.stderr
        );
        assert!(
            out.stderr.contains(
                "public.app_events: outbox[0].columns.payload: column \"tenant_id\" is integer; expected text"
            ),
            "{args:?}: {}",
            out.stderr
        );
    }
    let added: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.columns WHERE table_name = 'app_events' AND column_name = 'outbox_relay_seq'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(added, 0, "nothing was changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bytea_payload_goes_out_as_its_bytes_with_a_fixed_routing_key() {
    let env = TestEnv::new(Setup::new().without_migrate().table("public.blobs")).await;
    append_config(
        &env,
        "
[outbox.columns]
dedup_key = \"uid\"
ordering_key = \"uid\"
routing_key_template = \"blobs.stored\"
event_type = \"kind\"
payload = \"data\"
payload_type = \"bytea\"
content_type = \"application/x-protobuf\"
",
    );
    sqlx::raw_sql(
        "CREATE TABLE public.blobs (uid uuid NOT NULL DEFAULT gen_random_uuid(), kind text NOT NULL, data bytea)",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let adopted = env.cli(&["migrate", "--adopt", "--from", "now"]).await;
    assert_eq!(adopted.code, 0, "{adopted:?}");
    let _relay = env.start_relay();
    let uid: String = sqlx::query_scalar(
        "INSERT INTO public.blobs (kind, data) VALUES ('Stored', '\\x00ff10'::bytea) RETURNING uid::text",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    let received = env.consumer.wait_for_id(&uid).await;
    let m = &received[0];
    assert_eq!(m.body, [0x00, 0xff, 0x10]);
    assert_eq!(m.content_type.as_deref(), Some("application/x-protobuf"));
    assert_eq!(m.routing_key, "blobs.stored");
    assert_eq!(m.kind.as_deref(), Some("Stored"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debezium_table_without_the_routed_column_exits_78_naming_the_debezium_option() {
    let env = debezium_env(Some(
        "\n[outbox.debezium]\nroute_by_field = \"aggregate_type\"\n",
    ))
    .await;
    let out = env.cli(&["check-config"]).await;
    assert_eq!(out.code, 78, "{out:?}");
    assert!(
        out.stderr.contains(
            "public.dbz_outbox: outbox[0].debezium.route_by_field: column \"aggregate_type\" does not exist"
        ),
        "{}",
        out.stderr
    );
}
