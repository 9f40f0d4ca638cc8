//! Table names as PostgreSQL reads them: `table = "public.OutBox"` is the table a producer's
//! unquoted `INSERT INTO public.OutBox` writes to (`public.outbox`), and `'app."OrderEvents"'`
//! is the case-sensitive table of a producer that quotes it. `migrate` makes the table the
//! producer names, and the relay delivers what it writes.

use outbox_relay_testkit::prelude::*;

/// The relations of the test database named `name` in any case, as the catalog holds them.
async fn relations_named(env: &TestEnv, name: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT n.nspname || '.' || c.relname FROM pg_class c \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE lower(c.relname) = lower($1) AND c.relkind = 'r' ORDER BY 1",
    )
    .bind(name)
    .fetch_all(&env.pool)
    .await
    .expect("read the catalog")
}

/// Inserts rows `ids` of one key (dedup keys `<key>-<i>`) with `insert_into` as the producer
/// writes it.
async fn produce(env: &TestEnv, insert_into: &str, key: &str, ids: std::ops::Range<usize>) {
    for i in ids {
        sqlx::query(&format!(
            "INSERT INTO {insert_into} (dedup_key, ordering_key, routing_key, event_type, payload) \
             VALUES ($1, $2, 'test.names', 'TestEvent', '{{}}')"
        ))
        .bind(format!("{key}-{i}"))
        .bind(key)
        .execute(&env.pool)
        .await
        .unwrap_or_else(|e| panic!("INSERT INTO {insert_into}: {e}"));
    }
}

async fn unpublished(env: &TestEnv, table: &str) -> i64 {
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {table} WHERE published_at IS NULL"
    ))
    .fetch_one(&env.pool)
    .await
    .expect("count unpublished rows")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_case_table_name_is_the_table_an_unquoted_insert_writes_to() {
    let env = TestEnv::new(Setup::new().table("public.OutBox").without_migrate()).await;
    let migrated = env.cli(&["migrate"]).await;
    assert_eq!(migrated.code, 0, "{migrated:?}");
    assert_eq!(
        relations_named(&env, "outbox").await,
        ["public.outbox"],
        "migrate makes the table PostgreSQL folds OutBox to, not a case-sensitive \"OutBox\""
    );
    let checked = env.cli(&["check-config"]).await;
    assert_eq!(checked.code, 0, "{checked:?}");
    assert!(
        checked.stdout.contains("outbox table public.outbox: ready"),
        "{checked:?}"
    );

    let _relay = env.start_relay();
    produce(&env, "public.OutBox", "names", 0..3).await;
    produce(&env, "OUTBOX", "names", 3..5).await;
    let received = env.consumer.wait_for(5).await;
    let first = first_deliveries(&received);
    let ids: Vec<&str> = first.iter().map(|m| m.message_id.as_str()).collect();
    assert_eq!(ids, ["names-0", "names-1", "names-2", "names-3", "names-4"]);
    for m in &first {
        assert_eq!(
            m.header_str("x-outbox-table").as_deref(),
            Some("public.outbox"),
            "{m:?}"
        );
    }
    eventually("every row to be marked published", || async {
        unpublished(&env, "public.OutBox").await == 0
    })
    .await;
    let status = env.status_json().await;
    assert_eq!(status["table"], "public.outbox", "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quoted_table_name_keeps_its_case_for_a_producer_that_quotes_it() {
    let env = TestEnv::new(Setup::new().table("app.\"OrderEvents\"").without_migrate()).await;
    let migrated = env.cli(&["migrate"]).await;
    assert_eq!(migrated.code, 0, "{migrated:?}");
    assert_eq!(
        relations_named(&env, "orderevents").await,
        ["app.OrderEvents"]
    );

    let _relay = env.start_relay();
    produce(&env, "app.\"OrderEvents\"", "quoted", 0..3).await;
    let received = env.consumer.wait_for(3).await;
    let first = first_deliveries(&received);
    let ids: Vec<&str> = first.iter().map(|m| m.message_id.as_str()).collect();
    assert_eq!(ids, ["quoted-0", "quoted-1", "quoted-2"]);
    assert_eq!(
        first[0].header_str("x-outbox-table").as_deref(),
        Some("app.OrderEvents")
    );
    eventually("every row to be marked published", || async {
        unpublished(&env, "app.\"OrderEvents\"").await == 0
    })
    .await;
    // An unquoted name is another table, which does not exist.
    let unquoted = sqlx::query("INSERT INTO app.OrderEvents (dedup_key) VALUES ('x')")
        .execute(&env.pool)
        .await
        .expect_err("app.OrderEvents is app.orderevents");
    assert!(
        unquoted.to_string().contains("app.orderevents"),
        "{unquoted}"
    );
}
