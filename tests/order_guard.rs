//! What a producer's insert runs with the relay's rights: the order guard (`BEFORE INSERT`)
//! and the wake-up check (deferred to the commit). They are SECURITY DEFINER functions without
//! a `SET search_path` (it costs every producer row), so nothing a producer puts on its
//! search_path may stand in for what they call; and the guard draws ids from the sequence its
//! trigger names, falling back to looking it up when that name is stale.

use outbox_relay_testkit::prelude::*;
use sqlx::Connection;

/// The ids and `held` of the test table's rows, by dedup key.
async fn row(env: &TestEnv, dedup: &str) -> (i64, bool) {
    sqlx::query_as(&format!(
        "SELECT id, held FROM {} WHERE dedup_key = $1",
        quoted_table(&env.table)
    ))
    .bind(dedup)
    .fetch_one(&env.pool)
    .await
    .unwrap()
}

/// Inserts a row of `key` the broker can never take (a routing key over 255 bytes: parked at
/// once under `max_attempts = 1`) and waits until it is parked and its key held. Its id.
async fn park_head(env: &TestEnv, key: &str) -> i64 {
    let head = env
        .insert(&[NewRow::new(format!("{key}-head"), key).routing_key(&"r".repeat(300))])
        .await[0];
    eventually("the head to be parked and its key held", || async {
        env.row(head).await.parked_at.is_some()
            && sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox_relay.held_keys")
                .fetch_one(&env.pool)
                .await
                .unwrap()
                == 1
    })
    .await;
    head
}

/// Mends the parked `head` of `key` and releases the key (`retry --key`); waits for `last`
/// and checks that every key's rows arrived in id order.
async fn release_head(env: &TestEnv, head: i64, key: &str, last: &str) {
    sqlx::query(&format!(
        "UPDATE {} SET routing_key = 'fixed' WHERE id = $1",
        quoted_table(&env.table)
    ))
    .bind(head)
    .execute(&env.pool)
    .await
    .unwrap();
    let released = env.cli(&["retry", "--key", key]).await;
    assert_eq!(released.code, 0, "{released:?}");
    let received = env.consumer.wait_for_id(last).await;
    assert_first_deliveries_in_id_order(&received);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producers_search_path_cannot_stand_in_for_what_the_triggers_call() {
    let env = TestEnv::new(Setup::new().set("relay", "poll_interval", "\"1h\"")).await;
    let _relay = env.start_relay();
    // The relay waits for work: the wake-up check goes as far as its NOTIFY.
    eventually("the idle relay's flag", || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox_relay.waiting")
            .fetch_one(&env.pool)
            .await
            .unwrap()
            > 0
    })
    .await;

    // A producer role with the documented grants and a schema of its own, holding a stand-in
    // for each function and operator the triggers use; each fails the insert if it is called.
    let role = format!("{}_app", env.name);
    let evil = format!("{}_evil", env.name);
    let table = quoted_table(&env.table);
    let sequence: String = sqlx::query_scalar("SELECT pg_get_serial_sequence($1, 'id')")
        .bind(&table)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let stand_in = |signature: &str, returns: &str| {
        format!(
            "CREATE FUNCTION \"{evil}\".{signature} RETURNS {returns} LANGUAGE plpgsql AS \
             $f$ BEGIN RAISE EXCEPTION 'the trigger called {evil}.{signature}'; END $f$;"
        )
    };
    let setup = [
        format!("CREATE ROLE \"{role}\" LOGIN"),
        format!("GRANT USAGE ON SCHEMA public TO \"{role}\""),
        format!("GRANT INSERT, SELECT (dedup_key) ON {table} TO \"{role}\""),
        format!("GRANT USAGE ON SEQUENCE {sequence} TO \"{role}\""),
        format!("CREATE SCHEMA \"{evil}\" AUTHORIZATION \"{role}\""),
        format!("SET ROLE \"{role}\""),
        stand_in("nextval(regclass)", "bigint"),
        stand_in("hashtext(text)", "integer"),
        stand_in("pg_advisory_xact_lock(integer, integer)", "void"),
        stand_in("current_setting(text)", "text"),
        stand_in("to_regclass(text)", "regclass"),
        stand_in("pg_notify(text, text)", "void"),
        stand_in("text_eq(text, text)", "boolean"),
        stand_in("int8_eq(bigint, bigint)", "boolean"),
        stand_in("text_cat(text, text)", "text"),
        format!(
            "CREATE OPERATOR \"{evil}\".= (LEFTARG = text, RIGHTARG = text, FUNCTION = \"{evil}\".text_eq)"
        ),
        format!(
            "CREATE OPERATOR \"{evil}\".= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = \"{evil}\".int8_eq)"
        ),
        format!(
            "CREATE OPERATOR \"{evil}\".|| (LEFTARG = text, RIGHTARG = text, FUNCTION = \"{evil}\".text_cat)"
        ),
        "RESET ROLE".to_owned(),
    ];
    sqlx::raw_sql(&(setup.join("; ") + ";"))
        .execute(&env.pool)
        .await
        .unwrap();

    let mut url = url::Url::parse(&env.pg_url).unwrap();
    url.set_username(&role).unwrap();
    let mut app = sqlx::postgres::PgConnection::connect(url.as_str())
        .await
        .unwrap();
    // The producer's own schema first, before pg_catalog.
    sqlx::raw_sql(&format!("SET search_path = \"{evil}\", pg_catalog, public"))
        .execute(&mut app)
        .await
        .unwrap();
    let committed = sqlx::query(&format!(
        "INSERT INTO {table} (dedup_key, ordering_key, routing_key, event_type, payload) \
         VALUES ('searched', 'k', 'test.app', 'AppEvent', '{{}}')"
    ))
    .execute(&mut app)
    .await;
    app.close().await.unwrap();
    sqlx::raw_sql(&format!(
        "DROP SCHEMA \"{evil}\" CASCADE; DROP OWNED BY \"{role}\"; DROP ROLE \"{role}\";"
    ))
    .execute(&env.pool)
    .await
    .unwrap();
    committed.expect("the insert commits without calling the producer's functions");
    let (id, held) = row(&env, "searched").await;
    assert!(id > 0, "the id comes from the table's sequence: {id}");
    assert!(!held, "no key is held");
    env.consumer.wait_for_id("searched").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_names_the_id_sequence_in_an_earlier_guard_and_a_stale_name_fails_no_insert() {
    let env = TestEnv::new(Setup::new()).await;
    let table = quoted_table(&env.table);
    let trigger: String = sqlx::query_scalar(
        "SELECT tgname::text FROM pg_trigger WHERE tgrelid = $1::regclass \
           AND tgfoid = 'outbox_relay.order_guard_v2'::regproc",
    )
    .bind(&table)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    let args = || async {
        sqlx::query_scalar::<_, Vec<u8>>(
            "SELECT tgargs FROM pg_trigger WHERE tgrelid = $1::regclass AND tgname = $2",
        )
        .bind(&table)
        .bind(&trigger)
        .fetch_one(&env.pool)
        .await
        .unwrap()
    };
    let sequence: String = sqlx::query_scalar("SELECT pg_get_serial_sequence($1, 'id')")
        .bind(&table)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(args().await, format!("{sequence}\0").into_bytes());

    // The guard as an earlier release made it (no argument): ids come from the lookup.
    let remake = |argument: &str| {
        format!(
            "DROP TRIGGER \"{trigger}\" ON {table}; CREATE TRIGGER \"{trigger}\" BEFORE INSERT \
             ON {table} FOR EACH ROW EXECUTE FUNCTION outbox_relay.order_guard_v2({argument})"
        )
    };
    sqlx::raw_sql(&remake("")).execute(&env.pool).await.unwrap();
    let first = env.insert(&[NewRow::new("earlier", "k")]).await[0];
    let migrated = env.cli(&["migrate"]).await;
    assert_eq!(migrated.code, 0, "{migrated:?}");
    assert!(
        migrated
            .stdout
            .contains(&format!("draws ids from {sequence}")),
        "{}",
        migrated.stdout
    );
    assert_eq!(args().await, format!("{sequence}\0").into_bytes());
    let again = env.cli(&["migrate"]).await;
    assert!(!again.stdout.contains("draws ids"), "{}", again.stdout);

    // A name that no longer resolves (as after the schema was renamed) still draws from the
    // table's own sequence.
    sqlx::raw_sql(&remake("'public.no_such_sequence'"))
        .execute(&env.pool)
        .await
        .unwrap();
    let stale = env.insert(&[NewRow::new("stale", "k")]).await[0];
    assert!(stale > first, "ids keep increasing: {first}, then {stale}");

    let _relay = env.start_relay();
    let received = env.consumer.wait_for(2).await;
    assert_first_deliveries_in_id_order(&received);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_held_probe_is_skipped_only_while_no_key_is_held_and_a_producers_own_held_is_never_kept(
) {
    let env = TestEnv::new(Setup::new().set("outbox.retry", "max_attempts", "1")).await;
    let table = quoted_table(&env.table);
    // held_flag: 0 while no key of any table is held (the guard skips its held_keys probe).
    let flag = || async {
        sqlx::query_scalar::<_, Option<i64>>(
            "SELECT pg_sequence_last_value('outbox_relay.held_flag')",
        )
        .fetch_one(&env.pool)
        .await
        .unwrap()
    };
    let _relay = env.start_relay();
    eventually("the relay to clear held_flag (no key is held)", || async {
        flag().await == Some(0)
    })
    .await;

    // A producer's own `held = true` is not kept: the row is due and goes out.
    sqlx::query(&format!(
        "INSERT INTO {table} (dedup_key, ordering_key, routing_key, event_type, payload, held) \
         VALUES ('own-held', 'free', 'test.free', 'T', '{{}}', true)"
    ))
    .execute(&env.pool)
    .await
    .unwrap();
    env.consumer.wait_for_id("own-held").await;

    // A key held by its parked head: from then on its new rows start out held.
    let head = park_head(&env, "hot").await;
    assert_ne!(flag().await, Some(0), "a key is held");
    env.insert(&[NewRow::new("behind", "hot")]).await;
    assert!(
        row(&env, "behind").await.1,
        "a row of a held key starts out held"
    );
    env.insert(&[NewRow::new("elsewhere", "cold")]).await;
    assert!(
        !row(&env, "elsewhere").await.1,
        "other keys' rows are not held"
    );
    env.consumer.wait_for_id("elsewhere").await;

    // Fixed and released: its queue goes out in order, and the flag is cleared again.
    release_head(&env, head, "hot", "behind").await;
    eventually("held_flag cleared once no key is held", || async {
        flag().await == Some(0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_started_before_migrate_brought_held_flag_still_holds_keys() {
    let env = TestEnv::new(Setup::new().set("outbox.retry", "max_attempts", "1")).await;
    // The schema of the release before held_flag, as a package upgrade that restarts the relay
    // before `migrate` runs leaves it: no function that raises the flag.
    sqlx::raw_sql("DROP FUNCTION outbox_relay.holding_keys()")
        .execute(&env.pool)
        .await
        .unwrap();
    let _relay = env.start_relay();
    let head = park_head(&env, "hot").await;
    // The table goes on: another key's row flows, the held key's row waits behind its head.
    env.insert(&[NewRow::new("behind", "hot"), NewRow::new("other", "cold")])
        .await;
    env.consumer.wait_for_id("other").await;
    assert!(
        env.consumer
            .received()
            .iter()
            .all(|r| r.message_id != "behind"),
        "a row of the held key went out before its head"
    );

    // Migrated and released: the head, then the row behind it.
    let migrated = env.cli(&["migrate"]).await;
    assert_eq!(migrated.code, 0, "{migrated:?}");
    release_head(&env, head, "hot", "behind").await;
}
