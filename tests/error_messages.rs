//! What the relay says when something is wrong points the right way: `check-config` words a
//! missing exchange as the retry policy really treats its rows, the health endpoints answer a
//! wrong method with 405 and the methods they allow, and an empty dedup or ordering key is
//! refused at insert by a constraint whose name says what is wrong.

use outbox_relay_testkit::prelude::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_says_rows_for_a_missing_exchange_are_parked_after_max_attempts() {
    let env = TestEnv::new(Setup::new().set("retry", "max_attempts", "3")).await;
    let missing = format!("{}_nowhere", env.name);
    let config = std::fs::read_to_string(&env.config_path).unwrap();
    let other = env.dir.join("missing-exchange.toml");
    let changed = config.replace(
        &format!("exchange = \"{}\"", env.exchange),
        &format!("exchange = \"{missing}\""),
    );
    assert_ne!(changed, config, "the config names the table's exchange");
    std::fs::write(&other, changed).unwrap();

    let out = run_cli(&other, &["check-config"]).await;
    assert_eq!(out.code, 0, "a missing exchange is a warning: {out:?}");
    let line = out
        .stdout
        .lines()
        .find(|l| l.contains(&missing) && l.contains("WARNING"))
        .unwrap_or_else(|| panic!("no warning for {missing}: {}", out.stdout));
    // The test config's retry: 50 ms doubling, so 50 ms + 100 ms between three attempts.
    assert!(
        line.contains("does not exist")
            && line.contains(
                "rows for it are retried with backoff and parked after 3 attempts \
                 (retry.max_attempts), within 150ms of the first, holding their ordering key \
                 until `retry` releases it"
            ),
        "{line}"
    );
    assert!(!line.contains("until it exists"), "{line}");
}

/// `method path` on the health endpoint: the whole response (status line, headers, body).
async fn http(addr: &str, method: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: relay\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_method_on_a_health_path_is_405_with_the_methods_allowed() {
    let env = TestEnv::new(Setup::new().set("health", "listen", "\"127.0.0.1:0\"")).await;
    let relay = env.start_relay();
    let addr = health_addr(&relay).await;
    for path in ["/ready", "/live", "/metrics"] {
        for method in ["POST", "PUT", "DELETE"] {
            let response = http(&addr, method, path).await;
            assert!(
                response.starts_with("HTTP/1.1 405"),
                "{method} {path}: {response}"
            );
            assert!(
                response
                    .to_ascii_lowercase()
                    .contains("\r\nallow: get, head\r\n"),
                "{method} {path}: {response}"
            );
        }
        let response = http(&addr, "GET", path).await;
        assert!(
            !response.starts_with("HTTP/1.1 405") && !response.starts_with("HTTP/1.1 404"),
            "GET {path}: {response}"
        );
    }
    let response = http(&addr, "POST", "/nowhere").await;
    assert!(response.starts_with("HTTP/1.1 404"), "{response}");
}

/// Inserts one row with these keys as a producer would, outside the test kit's helpers.
async fn insert_keys(
    env: &TestEnv,
    dedup_key: &str,
    ordering_key: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "INSERT INTO {} (dedup_key, ordering_key, routing_key, event_type, payload) \
         VALUES ($1, $2, 'rk', 'Test', '{{}}'::jsonb)",
        quoted_table(&env.table)
    ))
    .bind(dedup_key)
    .bind(ordering_key)
    .execute(&env.pool)
    .await
    .map(|_| ())
}

/// The SQLSTATE and the constraint of a refused insert.
fn refusal(e: &sqlx::Error) -> (String, String) {
    let db = e.as_database_error().expect("a database error");
    (
        db.code().map(|c| c.into_owned()).unwrap_or_default(),
        db.constraint().unwrap_or_default().to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_dedup_or_ordering_key_is_refused_at_insert_naming_the_constraint() {
    let env = TestEnv::new(Setup::new()).await;
    let _relay = env.start_relay();
    let name = env.table.rsplit('.').next().unwrap().to_owned();

    let e = insert_keys(&env, "", "k")
        .await
        .expect_err("an empty dedup key");
    assert_eq!(
        refusal(&e),
        (
            "23514".to_owned(),
            format!("outbox_relay_{name}_dedup_key_not_empty")
        ),
        "{e}"
    );
    assert!(e.to_string().contains("dedup_key_not_empty"), "{e}");
    let e = insert_keys(&env, "d-1", "")
        .await
        .expect_err("an empty ordering key");
    assert_eq!(
        refusal(&e),
        (
            "23514".to_owned(),
            format!("outbox_relay_{name}_ordering_key_not_empty")
        ),
        "{e}"
    );

    // Keys of one space are keys: only empty ones are refused. The relay goes on delivering.
    insert_keys(&env, " ", " ")
        .await
        .expect("a key of one space");
    env.insert(&[NewRow::new("after", "k")]).await;
    env.consumer.wait_for_id("after").await;
    env.consumer.wait_for_id(" ").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_with_empty_keys_from_before_the_migration_are_still_relayed() {
    let env = TestEnv::new(Setup::new()).await;
    let name = env.table.rsplit('.').next().unwrap().to_owned();
    // The table as it was at version 3: no checks on empty keys, and a row with both empty.
    sqlx::raw_sql(&format!(
        "ALTER TABLE {t} DROP CONSTRAINT outbox_relay_{name}_dedup_key_not_empty; \
         ALTER TABLE {t} DROP CONSTRAINT outbox_relay_{name}_ordering_key_not_empty; \
         DELETE FROM outbox_relay.migrations WHERE table_name = '{table}' AND version = 4",
        t = quoted_table(&env.table),
        table = env.table,
    ))
    .execute(&env.pool)
    .await
    .unwrap();
    insert_keys(&env, "", "")
        .await
        .expect("no check at version 3");

    let migrated = env.cli(&["migrate"]).await;
    assert_eq!(migrated.code, 0, "{migrated:?}");
    assert!(
        migrated
            .stdout
            .contains("migration 4 (empty dedup and ordering keys are refused at insert)"),
        "{}",
        migrated.stdout
    );
    insert_keys(&env, "", "k")
        .await
        .expect_err("checked from now on");

    // NOT VALID: the row from before is not checked, and goes out as before.
    let _relay = env.start_relay();
    env.insert(&[NewRow::new("after", "k")]).await;
    let received = env.consumer.wait_for(2).await;
    assert!(
        received.iter().any(|m| m.message_id.is_empty()),
        "{received:#?}"
    );
    env.wait_all_marked().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_with_a_long_key_from_before_the_key_check_is_still_marked_after_migrate() {
    let env = TestEnv::new(Setup::new()).await;
    let name = env.table.rsplit('.').next().unwrap().to_owned();
    // The table as it was at version 2: no key checks, and a row with a 1,500-byte key.
    sqlx::raw_sql(&format!(
        "ALTER TABLE {t} DROP CONSTRAINT outbox_relay_{name}_ordering_key_length; \
         ALTER TABLE {t} DROP CONSTRAINT outbox_relay_{name}_dedup_key_not_empty; \
         ALTER TABLE {t} DROP CONSTRAINT outbox_relay_{name}_ordering_key_not_empty; \
         DELETE FROM outbox_relay.migrations WHERE table_name = '{table}' AND version >= 3",
        t = quoted_table(&env.table),
        table = env.table,
    ))
    .execute(&env.pool)
    .await
    .unwrap();
    let long = "k".repeat(1500);
    insert_keys(&env, "old-long", &long)
        .await
        .expect("no check at version 2");

    let migrated = env.cli(&["migrate"]).await;
    assert_eq!(migrated.code, 0, "{migrated:?}");
    assert!(
        migrated.stdout.contains("migration 5 ("),
        "{}",
        migrated.stdout
    );
    let e = insert_keys(&env, "new-long", &long)
        .await
        .expect_err("checked from now on");
    assert_eq!(
        refusal(&e),
        (
            "23514".to_owned(),
            format!("outbox_relay_{name}_ordering_key_length")
        ),
        "{e}"
    );

    // The old row goes out and is marked like any other (an UPDATE of it passes the check).
    let _relay = env.start_relay();
    env.insert(&[NewRow::new("after", "k")]).await;
    env.consumer.wait_for_id("old-long").await;
    env.consumer.wait_for_id("after").await;
    env.wait_all_marked().await;
}
