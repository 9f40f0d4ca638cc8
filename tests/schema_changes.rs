//! The database changing under a running relay: the outbox table dropped, a column renamed, the
//! relay's role losing a privilege. Each time the relay must log a clear error naming the
//! table, report not ready on its health endpoint, keep running and retrying with backoff (not
//! exit, not spin), and deliver everything and report ready again once the schema is fixed.

use std::time::{Duration, Instant};

use outbox_relay_testkit::prelude::{
    assert_duplicates_share_message_id, assert_first_deliveries_in_id_order, eventually,
    health_addr, http_get, rows_over_keys, Relay, Setup, TestEnv,
};

/// How long the relay is watched while it cannot work.
const WATCH: Duration = Duration::from_secs(6);
/// Statements a relay backing off (capped at 1 s here) may fail within [`WATCH`]; a relay that
/// retried in a tight loop would fail thousands.
const MAX_FAILED_STATEMENTS: i64 = 60;
/// CPU a backing-off relay may burn within [`WATCH`] (clock ticks, normally 100 per second).
const MAX_CPU_TICKS: u64 = 150;

/// The relay's CPU time so far, in clock ticks (utime + stime from /proc).
fn cpu_ticks(pid: i32) -> u64 {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the relay's /proc entry");
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = &stat[stat.rfind(')').expect("a /proc stat line") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Transactions that ended in an error in the test's database (each failed relay statement is one).
async fn failed_statements(env: &TestEnv) -> i64 {
    sqlx::query_scalar("SELECT xact_rollback FROM pg_stat_database WHERE datname = $1")
        .bind(&env.db)
        .fetch_one(&env.pool)
        .await
        .expect("read pg_stat_database")
}

/// Watches the failing relay for [`WATCH`]: it keeps running, retries (at least one more failed
/// statement) and backs off (few failed statements, little CPU).
async fn assert_backs_off_without_exiting(env: &TestEnv, relay: &mut Relay) {
    let (statements_before, cpu_before) = (failed_statements(env).await, cpu_ticks(relay.pid()));
    let started = Instant::now();
    // It retries: a failed statement reaches pg_stat_database (within about a second of the
    // backend going idle).
    eventually("the relay to retry: one more failed statement", || async {
        failed_statements(env).await > statements_before
    })
    .await;
    // It backs off: the count over the whole window. Both readings lag the same way, so the
    // window they count is WATCH long.
    tokio::time::sleep_until((started + WATCH).into()).await;
    let statements = failed_statements(env).await - statements_before;
    let cpu = cpu_ticks(relay.pid()) - cpu_before;
    assert!(relay.is_running(), "the relay exited:\n{}", relay.log());
    assert!(
        statements <= MAX_FAILED_STATEMENTS,
        "the relay retried {statements} times in {:?}: it spins instead of backing off",
        started.elapsed()
    );
    assert!(
        cpu <= MAX_CPU_TICKS,
        "the relay burned {cpu} CPU ticks in {:?} while failing",
        started.elapsed()
    );
}

/// The log line that reports `needle`, which must name the table and blame it (not the server).
fn assert_logged_naming_the_table(relay: &Relay, env: &TestEnv, needle: &str) {
    let log = relay.log();
    let line = log
        .lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no log line mentions {needle:?}:\n{log}"));
    assert!(
        line.contains(&env.table),
        "the error does not name the table {}: {line}",
        env.table
    );
    // The server is up: the log must say the table is the problem, not the server.
    assert!(
        line.contains("cannot use the outbox table"),
        "the error does not say the table is unusable: {line}"
    );
}

async fn execute(env: &TestEnv, sql: &str) {
    sqlx::raw_sql(sql)
        .execute(&env.pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

fn setup() -> Setup {
    Setup::new()
        .set("relay", "reconnect_max_delay", "\"1s\"")
        .set("health", "listen", "\"127.0.0.1:0\"")
}

/// `GET /ready` on the health endpoint: the HTTP status and the JSON body.
async fn get_ready(addr: &str) -> (u16, serde_json::Value) {
    let (status, body) = http_get(addr, "/ready").await;
    let json = serde_json::from_str(body.trim())
        .unwrap_or_else(|e| panic!("the body is not JSON ({e}): {body:?}"));
    (status, json)
}

/// Waits until `/ready` answers `status`; returns its body.
async fn wait_for_readiness(addr: &str, status: u16) -> serde_json::Value {
    let mut last = (0, serde_json::Value::Null);
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        last = get_ready(addr).await;
        if last.0 == status {
            return last.1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "/ready never answered {status}; last: {} {}",
        last.0, last.1
    );
}

/// `/ready` says 503 and blames the outbox table (not the server) for the table's relay.
async fn assert_not_ready_blaming_the_table(addr: &str, env: &TestEnv, needle: &str) {
    let body = wait_for_readiness(addr, 503).await;
    let table = &body["tables"][0];
    assert_eq!(table["table"], env.table.as_str(), "{body}");
    assert_eq!(table["ready"], false, "{body}");
    let state = table["state"].as_str().unwrap_or_default();
    assert!(
        state.starts_with("not ready: outbox table:") && state.contains(needle),
        "the state does not name the table problem ({needle}): {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_outbox_table_is_reported_retried_with_backoff_and_recovered_by_migrate() {
    let env = TestEnv::new(setup()).await;
    let mut relay = env.start_relay();
    let health = health_addr(&relay).await;
    env.insert(&rows_over_keys("before", 3, 9)).await;
    env.consumer.wait_for(9).await;
    wait_for_readiness(&health, 200).await;

    execute(&env, "DROP TABLE public.outbox").await;
    relay.wait_for_log("does not exist").await;
    assert_logged_naming_the_table(&relay, &env, "does not exist");
    assert_not_ready_blaming_the_table(&health, &env, "does not exist").await;
    assert_backs_off_without_exiting(&env, &mut relay).await;

    // The fix a user would reach for: `migrate` creates the missing table again.
    let migrated = env.cli(&["migrate"]).await;
    assert_eq!(
        migrated.code, 0,
        "migrate could not recreate the dropped table: {migrated:?}"
    );
    env.insert(&rows_over_keys("after", 3, 9)).await;
    let received = env.consumer.wait_for(18).await;
    env.wait_all_marked().await;
    relay.wait_for_log("recovered").await;
    wait_for_readiness(&health, 200).await;
    assert!(relay.is_running());
    // The new table's ids start again at 1, so each table's deliveries are checked apart.
    let (before, after): (Vec<_>, Vec<_>) = received
        .into_iter()
        .partition(|r| r.message_id.starts_with("before"));
    for deliveries in [before, after] {
        assert_first_deliveries_in_id_order(&deliveries);
        assert_duplicates_share_message_id(&deliveries);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renamed_column_is_reported_retried_with_backoff_and_rows_written_meanwhile_arrive_once_it_is_renamed_back(
) {
    let env = TestEnv::new(setup()).await;
    let mut relay = env.start_relay();
    let health = health_addr(&relay).await;
    env.insert(&rows_over_keys("before", 3, 6)).await;
    env.consumer.wait_for(6).await;

    execute(
        &env,
        "ALTER TABLE public.outbox RENAME COLUMN routing_key TO route",
    )
    .await;
    // The application goes on writing (with the column's new name) while the relay cannot read.
    for i in 0..6 {
        sqlx::query(
            "INSERT INTO public.outbox (dedup_key, ordering_key, route, event_type, payload) \
             VALUES ($1, $2, 'test.renamed', 'TestEvent', '{}')",
        )
        .bind(format!("during-{i}"))
        .bind(format!("during-k{}", i % 2))
        .execute(&env.pool)
        .await
        .expect("insert with the renamed column");
    }
    relay.wait_for_log("routing_key does not exist").await;
    assert_logged_naming_the_table(&relay, &env, "routing_key does not exist");
    assert_not_ready_blaming_the_table(&health, &env, "routing_key does not exist").await;
    assert_backs_off_without_exiting(&env, &mut relay).await;
    assert_eq!(
        env.consumer.unique_count(),
        6,
        "rows were published while the column was missing"
    );

    execute(
        &env,
        "ALTER TABLE public.outbox RENAME COLUMN route TO routing_key",
    )
    .await;
    let received = env.consumer.wait_for(12).await;
    env.wait_all_marked().await;
    wait_for_readiness(&health, 200).await;
    assert!(relay.is_running());
    assert_first_deliveries_in_id_order(&received);
    assert_duplicates_share_message_id(&received);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_role_that_loses_update_is_reported_retried_with_backoff_and_marks_everything_once_granted_again(
) {
    let env = TestEnv::new(setup()).await;
    // A dedicated role for the relay, with only what it needs on the outbox table.
    let role = format!("{}_relay", env.name);
    execute(
        &env,
        &format!(
            "CREATE ROLE \"{role}\" LOGIN; GRANT USAGE ON SCHEMA public TO \"{role}\"; \
             GRANT SELECT, UPDATE ON public.outbox TO \"{role}\"; \
             GRANT USAGE ON SCHEMA outbox_relay TO \"{role}\"; \
             GRANT SELECT, INSERT, UPDATE, DELETE ON outbox_relay.held_keys TO \"{role}\"; \
             GRANT SELECT, INSERT, UPDATE, DELETE ON outbox_relay.lease_tables, \
                 outbox_relay.members, outbox_relay.leases TO \"{role}\"; \
             GRANT USAGE ON SEQUENCE outbox_relay.member_seq TO \"{role}\"; \
             GRANT SELECT, INSERT, DELETE ON outbox_relay.waiting TO \"{role}\";"
        ),
    )
    .await;
    let mut role_url = url::Url::parse(&env.pg_url).unwrap();
    role_url.set_username(&role).unwrap();
    let config = std::fs::read_to_string(&env.config_path).unwrap();
    let config = config.replace(&format!("\"{}\"", env.pg_url), &format!("\"{role_url}\""));
    assert!(
        config.contains(role.as_str()),
        "the config's postgres.url was not switched to the role"
    );
    std::fs::write(&env.config_path, config).unwrap();

    let mut relay = env.start_relay();
    let health = health_addr(&relay).await;
    env.insert(&rows_over_keys("before", 3, 6)).await;
    env.consumer.wait_for(6).await;
    env.wait_all_marked().await;

    execute(
        &env,
        &format!("REVOKE UPDATE ON public.outbox FROM \"{role}\""),
    )
    .await;
    env.insert(&rows_over_keys("revoked", 3, 6)).await;
    relay.wait_for_log("permission denied").await;
    assert_logged_naming_the_table(&relay, &env, "permission denied");
    assert_not_ready_blaming_the_table(&health, &env, "permission denied").await;
    assert_backs_off_without_exiting(&env, &mut relay).await;
    assert_eq!(
        env.unpublished_count().await,
        6,
        "rows were marked without the UPDATE privilege"
    );

    execute(
        &env,
        &format!("GRANT UPDATE ON public.outbox TO \"{role}\""),
    )
    .await;
    env.wait_all_marked().await;
    env.insert(&rows_over_keys("granted", 3, 6)).await;
    let received = env.consumer.wait_for(18).await;
    env.wait_all_marked().await;
    wait_for_readiness(&health, 200).await;
    assert!(relay.is_running());
    assert_first_deliveries_in_id_order(&received);
    assert_duplicates_share_message_id(&received);

    drop(relay);
    execute(
        &env,
        &format!(
            "REVOKE ALL ON public.outbox FROM \"{role}\"; REVOKE USAGE ON SCHEMA public FROM \"{role}\"; \
             REVOKE ALL ON outbox_relay.held_keys FROM \"{role}\"; \
             REVOKE ALL ON outbox_relay.lease_tables, outbox_relay.members, outbox_relay.leases FROM \"{role}\"; \
             REVOKE ALL ON SEQUENCE outbox_relay.member_seq FROM \"{role}\"; \
             REVOKE ALL ON outbox_relay.waiting FROM \"{role}\"; \
             REVOKE USAGE ON SCHEMA outbox_relay FROM \"{role}\"; \
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'; \
             DROP ROLE \"{role}\";"
        ),
    )
    .await;
}
