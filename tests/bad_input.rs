//! Bad input: a broken config is refused with exit code 78, naming the file and the key,
//! without a backtrace or a password; rows that can never be published are parked at once
//! with a clear error while everything else keeps flowing.

use std::path::PathBuf;

use lapin::types::AMQPValue;
use outbox_relay_testkit::prelude::*;
use serde_json::json;

const PG_PASSWORD: &str = "pg-s3cret-pw";
const AMQP_PASSWORD: &str = "amqp-s3cret-pw";

/// A config file in a fresh temp dir: valid sections with passwords in both URLs, plus `extra`.
struct ConfigFile {
    dir: PathBuf,
    path: PathBuf,
}

impl ConfigFile {
    fn new(text: &str) -> ConfigFile {
        let dir = std::env::temp_dir().join(unique_name("obr_t"));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("outbox-relay.toml");
        std::fs::write(&path, text).unwrap();
        ConfigFile { dir, path }
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn postgres_section() -> String {
    format!("[postgres]\nurl = \"postgres://postgres:{PG_PASSWORD}@127.0.0.1:5432/app\"\n")
}

fn rabbitmq_section() -> String {
    format!("[rabbitmq]\nurl = \"amqp://guest:{AMQP_PASSWORD}@127.0.0.1:5672/%2f\"\n")
}

const OUTBOX: &str = "[[outbox]]\ntable = \"public.outbox\"\nexchange = \"events\"\n";

/// Runs `command` on a config and checks the contract of a config error: exit 78, the file
/// and `key` named on stderr, no backtrace, no password anywhere. Returns stderr.
async fn assert_config_error(text: &str, command: &str, key: &str) -> String {
    let file = ConfigFile::new(text);
    let out = run_cli(&file.path, &[command]).await;
    assert_eq!(out.code, 78, "a config error exits with EX_CONFIG: {out:?}");
    assert!(
        out.stderr.contains(&file.path.display().to_string()),
        "stderr names the file: {}",
        out.stderr
    );
    assert!(
        out.stderr.contains(key),
        "stderr names the key {key:?}: {}",
        out.stderr
    );
    for secret in [PG_PASSWORD, AMQP_PASSWORD] {
        assert!(
            !out.stderr.contains(secret) && !out.stdout.contains(secret),
            "the password leaked: {out:?}"
        );
    }
    for noise in ["panicked", "backtrace", "RUST_BACKTRACE", "stack backtrace"] {
        assert!(
            !out.stderr.contains(noise),
            "no panic or backtrace: {}",
            out.stderr
        );
    }
    out.stderr
}

#[tokio::test]
async fn an_unknown_key_is_a_config_error_naming_the_file_and_the_key() {
    let text = format!(
        "{}{}[relay]\nbatch_sise = 10\n{OUTBOX}",
        postgres_section(),
        rabbitmq_section()
    );
    let stderr = assert_config_error(&text, "check-config", "batch_sise").await;
    assert!(stderr.contains("relay"), "{stderr}");
}

#[tokio::test]
async fn a_postgres_host_list_that_cannot_be_used_is_a_config_error_saying_what_is_wrong() {
    for (url, problem) in [
        (
            format!("postgres://postgres:{PG_PASSWORD}@a:5432,,b:5432/app"),
            "a host is empty",
        ),
        (
            format!("host=a,b port=5432,5433,5434 password={PG_PASSWORD} dbname=app"),
            "3 ports for 2 hosts",
        ),
        (
            format!("postgres://postgres:{PG_PASSWORD}@a,b/app?target_session_attrs=standby"),
            "the relay works only against the primary",
        ),
    ] {
        let text = format!("[postgres]\nurl = {url:?}\n{}{OUTBOX}", rabbitmq_section());
        let stderr = assert_config_error(&text, "run", "postgres.url").await;
        assert!(stderr.contains(problem), "{problem}: {stderr}");
    }
}

#[tokio::test]
async fn a_value_of_the_wrong_type_is_a_config_error_naming_the_key() {
    let text = format!(
        "{}{}[relay]\nbatch_size = \"many\"\n{OUTBOX}",
        postgres_section(),
        rabbitmq_section()
    );
    assert_config_error(&text, "run", "relay.batch_size").await;
    let text = format!(
        "{}{}[retry]\ninitial_delay = \"soon\"\n{OUTBOX}",
        postgres_section(),
        rabbitmq_section()
    );
    assert_config_error(&text, "check-config", "initial_delay").await;
}

#[tokio::test]
async fn a_missing_required_key_is_a_config_error_naming_the_key() {
    let text = format!(
        "{}[rabbitmq]\nconnection_name = \"x\"\n{OUTBOX}",
        postgres_section()
    );
    assert_config_error(&text, "run", "rabbitmq.url").await;
    let text = format!(
        "{}{}[[outbox]]\ntable = \"public.outbox\"\n",
        postgres_section(),
        rabbitmq_section()
    );
    assert_config_error(&text, "check-config", "exchange").await;
}

#[tokio::test]
async fn a_table_name_that_tries_sql_injection_is_refused() {
    let text = format!(
        "{}{}[[outbox]]\ntable = \"outbox; DROP TABLE users; --\"\nexchange = \"events\"\n",
        postgres_section(),
        rabbitmq_section()
    );
    let stderr = assert_config_error(&text, "migrate", "outbox[0].table").await;
    assert!(
        stderr.contains("identifier"),
        "says what a table name may be: {stderr}"
    );
    let text = format!(
        "{}{}[[outbox]]\ntable = 'public.\"outbox\"'\nexchange = \"events\"\n",
        postgres_section(),
        rabbitmq_section()
    );
    assert_config_error(&text, "migrate", "outbox[0].table").await;
}

#[tokio::test]
async fn a_bad_url_is_a_config_error_that_does_not_print_the_password() {
    let text = format!(
        "[postgres]\nurl = \"mysql://root:{PG_PASSWORD}@127.0.0.1/app\"\n{}{OUTBOX}",
        rabbitmq_section()
    );
    assert_config_error(&text, "check-config", "postgres.url").await;
    let text = format!(
        "{}[rabbitmq]\nurl = \"amqp://guest:{AMQP_PASSWORD}@127.0.0.1:notaport/%2f\"\n{OUTBOX}",
        postgres_section()
    );
    assert_config_error(&text, "run", "rabbitmq.url").await;
}

#[tokio::test]
async fn an_invalid_exchange_name_in_the_config_is_a_config_error() {
    let text = format!(
        "{}{}[[outbox]]\ntable = \"public.outbox\"\nexchange = \"bad name!\"\n",
        postgres_section(),
        rabbitmq_section()
    );
    assert_config_error(&text, "check-config", "outbox[0].exchange").await;
}

#[tokio::test]
async fn a_bad_value_from_the_environment_is_a_config_error_naming_the_key() {
    let file = ConfigFile::new(&format!(
        "{}{}{OUTBOX}",
        postgres_section(),
        rabbitmq_section()
    ));
    let out = tokio::process::Command::new(relay_binary())
        .arg("--config")
        .arg(&file.path)
        .arg("check-config")
        .env("OUTBOX_RELAY__RELAY__BATCH_SIZE", "0")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("relay.batch_size"), "{stderr}");
}

#[tokio::test]
async fn a_health_address_that_is_not_host_and_port_is_a_config_error_naming_the_key() {
    let text = format!(
        "{}{}[health]\nlisten = \"localhost\"\n{OUTBOX}",
        postgres_section(),
        rabbitmq_section()
    );
    assert_config_error(&text, "run", "health.listen").await;
}

#[tokio::test]
async fn a_health_address_in_use_stops_run_at_once_with_exit_1_naming_the_key() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let text = format!(
        "{}{}[health]\nlisten = \"{addr}\"\n{OUTBOX}",
        postgres_section(),
        rabbitmq_section()
    );
    let file = ConfigFile::new(&text);
    let out = run_cli(&file.path, &["run"]).await;
    assert_eq!(out.code, 1, "a start failure, not a config error: {out:?}");
    assert!(
        out.stderr
            .contains(&format!("health.listen: cannot listen on {addr}")),
        "names the key and the address: {}",
        out.stderr
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
}

#[tokio::test]
async fn an_unreachable_server_exits_1_without_printing_the_password() {
    let text = format!(
        "[postgres]\nurl = \"postgres://postgres:{PG_PASSWORD}@127.0.0.1:1/app\"\nconnect_timeout = \"2s\"\n{}{OUTBOX}",
        rabbitmq_section()
    );
    let file = ConfigFile::new(&text);
    let out = run_cli(&file.path, &["check-config"]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("127.0.0.1:1"),
        "says which server: {}",
        out.stderr
    );
    assert!(
        !out.stderr.contains(PG_PASSWORD) && !out.stdout.contains(PG_PASSWORD),
        "{out:?}"
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
}

/// A port on 127.0.0.1 that nothing listens on (bound, then let go).
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test]
async fn postgresql_refusing_the_connection_is_said_at_once_by_every_command() {
    let port = closed_port();
    for (url, said) in [
        (
            format!("postgres://postgres:{PG_PASSWORD}@127.0.0.1:{port}/app"),
            format!("connection refused: nothing listens on 127.0.0.1:{port}"),
        ),
        (
            format!("postgres://postgres:{PG_PASSWORD}@obr-no-such-host.invalid:5432/app"),
            "host not found: the name obr-no-such-host.invalid does not resolve".to_owned(),
        ),
        (
            "postgres://postgres@127.0.0.1:5432/obr_no_such_database".to_owned(),
            "no such database: database \"obr_no_such_database\" does not exist (SQLSTATE 3D000)"
                .to_owned(),
        ),
    ] {
        // The connect timeout is long: the answer must not wait for it.
        let text = format!(
            "[postgres]\nurl = {url:?}\nconnect_timeout = \"30s\"\n{}{OUTBOX}",
            rabbitmq_section()
        );
        let file = ConfigFile::new(&text);
        for command in ["status", "check-config", "migrate"] {
            let started = std::time::Instant::now();
            let out = run_cli(&file.path, &[command]).await;
            let took = started.elapsed();
            assert_eq!(out.code, 1, "{command}: {out:?}");
            assert!(
                out.stderr.contains("cannot connect to PostgreSQL at")
                    && out.stderr.contains(&said),
                "{command}: {said:?} not in {}",
                out.stderr
            );
            assert!(
                took < std::time::Duration::from_secs(10),
                "{command} took {took:?} to say {said:?}"
            );
            assert!(!out.stderr.contains("pool timed out"), "{}", out.stderr);
            assert!(!out.stderr.contains(PG_PASSWORD), "{}", out.stderr);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_logs_why_postgresql_cannot_be_reached_and_keeps_trying() {
    let env = TestEnv::new(Setup::new()).await;
    let config = std::fs::read_to_string(&env.config_path).unwrap();
    let port = closed_port();
    let closed = config
        .lines()
        .map(|line| match line.starts_with("url = \"postgres") {
            true => format!("url = \"postgres://postgres:{PG_PASSWORD}@127.0.0.1:{port}/app\""),
            false => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert_ne!(config, closed, "the config has a postgres url line");
    std::fs::write(&env.config_path, closed).unwrap();
    let mut relay = env.start_relay();
    relay
        .wait_for_log(&format!(
            "connection refused: nothing listens on 127.0.0.1:{port}"
        ))
        .await;
    let log = relay.log();
    assert!(relay.is_running(), "{log}");
    assert!(!log.contains("pool timed out"), "{log}");
    assert!(!log.contains(PG_PASSWORD), "{log}");
}

#[tokio::test]
async fn a_postgresql_role_that_does_not_exist_exits_1_naming_the_server_and_the_role() {
    let text = format!(
        "[postgres]\nurl = \"postgres://obr_no_such_role:{PG_PASSWORD}@127.0.0.1:5432/postgres\"\n{}{OUTBOX}",
        rabbitmq_section()
    );
    let file = ConfigFile::new(&text);
    let out = run_cli(&file.path, &["check-config"]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("cannot connect to PostgreSQL at")
            && out.stderr.contains("127.0.0.1:5432")
            && out
                .stderr
                .contains("role \"obr_no_such_role\" does not exist"),
        "names the server and the role: {}",
        out.stderr
    );
    assert_eq!(
        out.stderr.matches("does not exist").count(),
        1,
        "the server's words once: {}",
        out.stderr
    );
    assert!(!out.stderr.contains(PG_PASSWORD), "{}", out.stderr);
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_rabbitmq_password_exits_1_naming_the_server_without_printing_it() {
    let env = TestEnv::new(Setup::new()).await;
    let config = std::fs::read_to_string(&env.config_path).unwrap();
    let wrong = config.replace("guest:guest@", &format!("guest:{AMQP_PASSWORD}@"));
    assert_ne!(config, wrong, "the config's rabbitmq.url has guest:guest");
    std::fs::write(&env.config_path, wrong).unwrap();

    let out = env.cli(&["check-config"]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr
            .contains("cannot connect to RabbitMQ at amqp://guest:***@127.0.0.1:5672")
            && out.stderr.contains("ACCESS_REFUSED"),
        "names the server and the refusal: {}",
        out.stderr
    );
    assert!(
        !out.stderr.contains(AMQP_PASSWORD) && !out.stdout.contains(AMQP_PASSWORD),
        "{out:?}"
    );

    // `run` keeps retrying (a password can be fixed without a restart) and says why, once. The
    // relay reaches the broker through a proxy that counts its connection attempts.
    let (proxy, through_proxy) = broker_proxy(&env.amqp_url).await;
    let routed = config
        .replace(&env.amqp_url, &through_proxy)
        .replace("guest:guest@", &format!("guest:{AMQP_PASSWORD}@"));
    std::fs::write(&env.config_path, routed).unwrap();
    let mut relay = env.start_relay();
    relay.wait_for_log("ACCESS_REFUSED").await;
    let refused = proxy.connections();
    eventually("three more refused connection attempts", || async {
        proxy.connections() >= refused + 3
    })
    .await;
    let log = relay.log();
    assert!(relay.is_running(), "{log}");
    assert_eq!(log.matches("ACCESS_REFUSED").count(), 1, "{log}");
    assert!(!log.contains(AMQP_PASSWORD), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_never_logs_the_passwords_in_its_urls() {
    let env = TestEnv::new(Setup::new()).await;
    // The same servers, reached with passwords in the URLs (trust auth ignores the PostgreSQL one).
    let mut pg = url::Url::parse(&env.pg_url).unwrap();
    pg.set_password(Some(PG_PASSWORD)).unwrap();
    let config = std::fs::read_to_string(&env.config_path)
        .unwrap()
        .replace(&env.pg_url, pg.as_str());
    std::fs::write(&env.config_path, config).unwrap();
    let relay = env.start_relay();
    env.insert(&[NewRow::new("secret-1", "k")]).await;
    env.consumer.wait_for(1).await;
    relay.wait_for_log("relaying").await;
    assert!(
        relay.log().contains("***"),
        "URLs are logged redacted: {}",
        relay.log()
    );
    assert!(!relay.log().contains(PG_PASSWORD), "{}", relay.log());
    let status = env.cli(&["check-config"]).await;
    assert_eq!(status.code, 0, "{status:?}");
    assert!(
        !status.stdout.contains(PG_PASSWORD) && !status.stderr.contains(PG_PASSWORD),
        "{status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_that_can_never_be_published_are_parked_at_once_and_other_keys_flow() {
    let env = TestEnv::new(Setup::new().set("rabbitmq", "max_message_bytes", "2048")).await;
    let _relay = env.start_relay();
    let long_name = "h".repeat(256);
    let bad = vec![
        NewRow::new("bad-headers", "bad-1").headers(json!([1])),
        NewRow::new("bad-exchange", "bad-2").exchange("no spaces allowed!"),
        NewRow::new("d".repeat(300), "bad-3"),
        NewRow::new("too-big", "bad-4").payload(json!({ "blob": "x".repeat(4000) })),
        NewRow::new("é".repeat(128), "bad-5"),
        NewRow::new("long-routing-key", "bad-6").routing_key(&"r".repeat(256)),
        NewRow::new("long-type", "bad-7").event_type(&"t".repeat(256)),
        NewRow::new("long-header-name", "bad-8").headers(json!({ long_name: 1 })),
        NewRow::new("string-headers", "bad-9").headers(json!("tenant=acme")),
    ];
    let expected_errors = [
        "headers must be a JSON object",
        "exchange name",
        "dedup_key is 300 bytes",
        "payload is",
        "dedup_key is 256 bytes",
        "routing_key is 256 bytes",
        "event_type is 256 bytes",
        "header name is 256 bytes",
        "headers must be a JSON object",
    ];
    let mut rows = bad.clone();
    // At the limits, still publishable.
    rows.push(NewRow::new("d".repeat(255), "edge-1").routing_key(&"r".repeat(255)));
    rows.push(NewRow::new("edge-2", "edge-2").payload(json!({ "blob": "x".repeat(1900) })));
    rows.extend((0..20).map(|i| NewRow::new(format!("good-{i}"), format!("good-{}", i % 5))));
    let ids = env.insert(&rows).await;

    let received = env.consumer.wait_for(22).await;
    assert!(
        received
            .iter()
            .all(|m| m.message_id.starts_with("good-") || m.ordering_key().starts_with("edge-")),
        "{received:#?}"
    );
    // Failures are recorded when the relay's turn ends, maybe after the good rows arrived.
    eventually("the bad rows to be parked", || async {
        let mut all = true;
        for id in &ids[..expected_errors.len()] {
            all &= env.row(*id).await.parked_at.is_some();
        }
        all
    })
    .await;
    for (i, expected) in expected_errors.iter().enumerate() {
        let r = env.row(ids[i]).await;
        assert_eq!(r.attempts, 1, "parked at once, not retried: {r:?}");
        let error = r.last_error.clone().unwrap_or_default();
        assert!(
            error.contains(expected),
            "last_error of {}: {error}",
            r.ordering_key
        );
    }
    let big = env.row(ids[3]).await.last_error.unwrap_or_default();
    assert!(
        big.contains("the relay's rabbitmq.max_message_bytes is 2048") && !big.contains("broker"),
        "names the limit, and that it was the relay's own: {big}"
    );
    env.insert(&[NewRow::new("late-good", "good-0")]).await;
    env.consumer.wait_for_id("late-good").await;
    let status = env.cli(&["status", "--json"]).await;
    let json: serde_json::Value =
        serde_json::from_str(&status.stdout).expect("status --json prints JSON");
    assert_eq!(
        json[0]["parked"].as_i64(),
        Some(expected_errors.len() as i64),
        "{json}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_header_objects_arrays_and_nulls_are_delivered() {
    let env = TestEnv::new(Setup::new()).await;
    let _relay = env.start_relay();
    let headers = json!({
        "nested": {"a": [1, null, "x"], "b": {"c": true}},
        "list": [1.5, "two", false],
        "nothing": null,
        "big": 9_007_199_254_740_993i64,
    });
    env.insert(&[NewRow::new("nested-1", "k").headers(headers)])
        .await;
    let received = env.consumer.wait_for(1).await;
    let h = &received[0].headers;
    assert_eq!(h.get("nothing"), Some(&AMQPValue::Void));
    assert_eq!(
        h.get("big"),
        Some(&AMQPValue::LongLongInt(9_007_199_254_740_993))
    );
    let Some(AMQPValue::FieldTable(nested)) = h.get("nested") else {
        panic!("nested object is a table: {h:?}")
    };
    let Some(AMQPValue::FieldArray(a)) = nested.inner().get("a") else {
        panic!("nested array: {nested:?}")
    };
    assert_eq!(a.as_slice()[0], AMQPValue::LongLongInt(1));
    assert_eq!(a.as_slice()[1], AMQPValue::Void);
    assert!(matches!(&a.as_slice()[2], AMQPValue::LongString(s) if s.as_bytes() == b"x"));
    let Some(AMQPValue::FieldTable(b)) = nested.inner().get("b") else {
        panic!("nested table: {nested:?}")
    };
    assert_eq!(b.inner().get("c"), Some(&AMQPValue::Boolean(true)));
    let Some(AMQPValue::FieldArray(list)) = h.get("list") else {
        panic!("array: {h:?}")
    };
    assert_eq!(list.as_slice()[0], AMQPValue::Double(1.5));
    assert_eq!(list.as_slice()[2], AMQPValue::Boolean(false));
    env.wait_all_marked().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_routing_key_is_published_as_it_is_between_rows_of_its_key() {
    let env = TestEnv::new(Setup::new()).await;
    let _relay = env.start_relay();
    let rows = [
        NewRow::new("empty-rk-0", "k").routing_key("x.y"),
        NewRow::new("empty-rk-1", "k").routing_key(""),
        NewRow::new("empty-rk-2", "k").routing_key("x.y"),
    ];
    env.insert(&rows).await;
    // The test queue is bound with `#`, which matches the empty routing key too.
    let received = env.consumer.wait_for(3).await;
    assert_first_deliveries_in_id_order(&received);
    let empty = received
        .iter()
        .find(|m| m.message_id == "empty-rk-1")
        .expect("the row with an empty routing key arrived");
    assert_eq!(empty.routing_key, "", "{empty:?}");
    env.wait_all_marked().await;
    assert_eq!(env.unpublished_count().await, 0);
}

#[tokio::test]
async fn a_url_parameter_the_client_would_refuse_or_ignore_is_a_config_error_naming_it() {
    for (rabbitmq, postgres, key, problem) in [
        (
            format!("url = \"amqp://guest:{AMQP_PASSWORD}@127.0.0.1:5672/%2f?heartbeat=abc\""),
            postgres_section(),
            "rabbitmq.url",
            "heartbeat=abc: expected a whole number",
        ),
        (
            format!("url = \"amqp://guest:{AMQP_PASSWORD}@127.0.0.1:5672/%2f?heartbeat=10&cacertfile=/ca.pem\""),
            postgres_section(),
            "rabbitmq.url",
            "unknown parameter \"cacertfile\"",
        ),
        (
            rabbitmq_section().replace("[rabbitmq]\n", ""),
            format!("[postgres]\nurl = \"postgres://postgres:{PG_PASSWORD}@127.0.0.1:5432/app?connect_timeout=abc\"\n"),
            "postgres.url",
            "unknown parameter \"connect_timeout\" (set postgres.connect_timeout",
        ),
        (
            rabbitmq_section().replace("[rabbitmq]\n", ""),
            format!("[postgres]\nurl = \"postgres://postgres:{PG_PASSWORD}@127.0.0.1:5432/app?sslmode=bogus\"\n"),
            "postgres.url",
            "sslmode=bogus: expected disable, allow, prefer, require, verify-ca or verify-full",
        ),
        (
            rabbitmq_section().replace("[rabbitmq]\n", ""),
            format!("[postgres]\nurl = \"host=127.0.0.1 password={PG_PASSWORD} dbname=app sslmode=bogus\"\n"),
            "postgres.url",
            "sslmode=bogus: expected",
        ),
        (
            rabbitmq_section().replace("[rabbitmq]\n", ""),
            format!("[postgres]\nurl = \"postgres://postgres:{PG_PASSWORD}@127.0.0.1:5432/app?pasword={PG_PASSWORD}\"\n"),
            "postgres.url",
            "unknown parameter \"pasword\"",
        ),
    ] {
        let text = format!("{postgres}[rabbitmq]\n{rabbitmq}\n{OUTBOX}");
        // `run` as well as `check-config`: neither gets as far as the driver.
        for command in ["run", "check-config"] {
            let stderr = assert_config_error(&text, command, key).await;
            assert!(
                stderr.contains(&format!("{key}: {problem}")),
                "{command}: {problem:?} not in {stderr}"
            );
            assert!(!stderr.contains("I/O error"), "{stderr}");
        }
    }
}
