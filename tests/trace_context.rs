//! Trace context from the producer's transaction to the consumer: a row's `traceparent`,
//! `tracestate` and `baggage` arrive as the producer wrote them, sampled or not; one that is
//! not a W3C traceparent is not passed on; an adopted table's trace column (a traceparent, or
//! Debezium's `tracingspancontext` properties) becomes the message's trace context.

use outbox_relay_testkit::prelude::*;
use serde_json::json;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

fn traceparent(span: &str, flags: &str) -> String {
    format!("00-{TRACE_ID}-{span}-{flags}")
}

/// The trace id of a `traceparent` header.
fn trace_id(m: &Received) -> Option<String> {
    m.header_str("traceparent")
        .and_then(|t| t.split('-').nth(1).map(str::to_owned))
}

/// The message of `message_id`, once it arrived.
async fn message(env: &TestEnv, message_id: &str) -> Received {
    env.consumer
        .wait_for_id(message_id)
        .await
        .into_iter()
        .find(|m| m.message_id == message_id)
        .expect("the row's message")
}

fn append_config(env: &TestEnv, text: &str) {
    let mut config = std::fs::read_to_string(&env.config_path).expect("read the config");
    config += text;
    std::fs::write(&env.config_path, config).expect("write the config");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rows_trace_context_arrives_with_the_same_trace_id_state_and_baggage_sampled_or_not() {
    let env = TestEnv::new(Setup::new()).await;
    let _relay = env.start_relay();
    let sampled = traceparent("00f067aa0ba902b7", "01");
    let unsampled = traceparent("b7ad6b7169203331", "00");
    let rows = [
        NewRow::new("sampled", "k1").headers(json!({
            "traceparent": sampled,
            "tracestate": "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE",
            "baggage": "userId=alice,serverNode=DF%2028;prop=1",
        })),
        NewRow::new("unsampled", "k2").headers(json!({
            "traceparent": unsampled,
            "tracestate": "rojo=1",
            "baggage": "tenant=acme",
        })),
        NewRow::new("broken", "k3").headers(json!({
            "traceparent": format!("00-{TRACE_ID}-0000000000000000-01"),
            "tracestate": "rojo=2",
            "baggage": "tenant=acme",
        })),
    ];
    env.insert(&rows).await;
    env.consumer.wait_for(3).await;
    let got = |id: &str| {
        env.consumer
            .received()
            .into_iter()
            .find(|m| m.message_id == id)
            .expect("the row's message")
    };
    let m = got("sampled");
    assert_eq!(m.header_str("traceparent"), Some(sampled));
    assert_eq!(trace_id(&m).as_deref(), Some(TRACE_ID));
    assert_eq!(
        m.header_str("tracestate").as_deref(),
        Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")
    );
    assert_eq!(
        m.header_str("baggage").as_deref(),
        Some("userId=alice,serverNode=DF%2028;prop=1")
    );
    // An unsampled trace keeps its headers, flags as the producer set them.
    let m = got("unsampled");
    assert_eq!(m.header_str("traceparent"), Some(unsampled));
    assert_eq!(m.header_str("tracestate").as_deref(), Some("rojo=1"));
    assert_eq!(m.header_str("baggage").as_deref(), Some("tenant=acme"));
    // A parent id of zeros is not a traceparent: it and its tracestate are not passed on;
    // baggage stands on its own and goes on; the message itself goes out.
    let m = got("broken");
    assert_eq!(m.header_str("traceparent"), None);
    assert_eq!(m.header_str("tracestate"), None);
    assert_eq!(m.header_str("baggage").as_deref(), Some("tenant=acme"));
}

/// Debezium's outbox table with the tracing column its Quarkus extension writes.
const DEBEZIUM_TABLE: &str = "CREATE TABLE public.dbz_outbox (
    id                 uuid         NOT NULL PRIMARY KEY,
    aggregatetype      varchar(255) NOT NULL,
    aggregateid        varchar(255) NOT NULL,
    type               varchar(255) NOT NULL,
    payload            jsonb,
    tracingspancontext varchar(256)
)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debezium_table_with_tracingspancontext_keeps_the_producers_trace() {
    let env = TestEnv::new(
        Setup::new()
            .without_migrate()
            .table("public.dbz_outbox")
            .set("outbox", "layout", "\"debezium\"")
            .set("outbox", "message_format", "\"cloudevents\""),
    )
    .await;
    append_config(
        &env,
        "\n[outbox.debezium]\ntracing_span_context_field = \"tracingspancontext\"\n",
    );
    sqlx::raw_sql(DEBEZIUM_TABLE)
        .execute(&env.pool)
        .await
        .unwrap();
    let adopted = env.cli(&["migrate", "--adopt", "--from", "now"]).await;
    assert_eq!(adopted.code, 0, "{adopted:?}");
    let _relay = env.start_relay();
    let producer_span = traceparent("53995c3f42cd8ad8", "01");
    // What java.util.Properties.store writes for the context Debezium's extension injects:
    // a date comment, then the keys with `=` and `:` in values escaped.
    let stored = format!(
        "#Mon Mar 02 10:00:00 UTC 2026\ntracestate=rojo\\=00f067aa0ba902b7,congo\\=t61rcWkgMzE\ntraceparent={producer_span}\n"
    );
    let insert = |context: Option<String>| {
        let pool = env.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "INSERT INTO public.dbz_outbox (id, aggregatetype, aggregateid, type, payload, tracingspancontext) \
                 VALUES (gen_random_uuid(), 'orders', 'order-1', 'OrderCreated', '{\"n\": 1}', $1) RETURNING id::text",
            )
            .bind(context)
            .fetch_one(&pool)
            .await
            .expect("a Debezium producer's insert")
        }
    };
    let traced = insert(Some(stored)).await;
    let untraced = insert(None).await;
    let m = &message(&env, &traced).await;
    assert_eq!(m.header_str("traceparent"), Some(producer_span.clone()));
    assert_eq!(trace_id(m).as_deref(), Some(TRACE_ID));
    assert_eq!(
        m.header_str("tracestate").as_deref(),
        Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),
        "unescaped as Properties.load reads it"
    );
    // The distributed-tracing extension of the CloudEvent carries the same context.
    assert_eq!(m.header_str("cloudEvents:traceparent"), Some(producer_span));
    assert_eq!(
        m.header_str("cloudEvents:tracestate").as_deref(),
        Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")
    );
    assert_eq!(m.header_str("x-outbox-trace-context"), None);
    // A row without a context goes out without one.
    let m = &message(&env, &untraced).await;
    assert_eq!(m.header_str("traceparent"), None);
    assert_eq!(m.header_str("cloudEvents:traceparent"), None);
    assert_eq!(m.header_str("x-outbox-trace-context"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_tables_traceparent_column_is_the_messages_traceparent() {
    let env = TestEnv::new(Setup::new().without_migrate().table("app.events")).await;
    append_config(
        &env,
        "\n[outbox.columns]\ndedup_key = \"event_id\"\nordering_key = \"stream\"\n\
         routing_key_template = \"app.events\"\nevent_type = \"kind\"\npayload = \"body\"\n\
         headers = \"meta\"\ntrace_context = \"trace\"\n",
    );
    sqlx::raw_sql(
        "CREATE SCHEMA app; CREATE TABLE app.events (
            event_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            stream   text  NOT NULL,
            kind     text  NOT NULL,
            body     jsonb NOT NULL,
            meta     jsonb,
            trace    text
        )",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let adopted = env.cli(&["migrate", "--adopt", "--from", "now"]).await;
    assert_eq!(adopted.code, 0, "{adopted:?}");
    let _relay = env.start_relay();
    let column = traceparent("1111111111111111", "00");
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO app.events (stream, kind, body, meta, trace) \
         VALUES ('s', 'Happened', '{}', $1, $2) RETURNING event_id",
    )
    .bind(json!({"baggage": "tenant=acme", "traceparent": traceparent("2222222222222222", "01")}))
    .bind(&column)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    let m = &message(&env, &id.to_string()).await;
    // The column wins over the headers object's; the rest of the headers stay.
    assert_eq!(m.header_str("traceparent"), Some(column));
    assert_eq!(m.header_str("baggage").as_deref(), Some("tenant=acme"));
    assert_eq!(m.header_str("x-outbox-trace-context"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_column_the_table_does_not_have_exits_78_naming_the_option() {
    let env = TestEnv::new(
        Setup::new()
            .without_migrate()
            .table("public.dbz_outbox")
            .set("outbox", "layout", "\"debezium\""),
    )
    .await;
    append_config(
        &env,
        "\n[outbox.debezium]\ntracing_span_context_field = \"span_context\"\n",
    );
    sqlx::raw_sql(DEBEZIUM_TABLE)
        .execute(&env.pool)
        .await
        .unwrap();
    let out = env.cli(&["check-config"]).await;
    assert_eq!(out.code, 78, "{out:?}");
    assert!(
        out.stderr.contains(
            "public.dbz_outbox: outbox[0].debezium.tracing_span_context_field: column \"span_context\" does not exist"
        ),
        "{}",
        out.stderr
    );
}
