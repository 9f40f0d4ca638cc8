//! TLS to both servers with a CA the test makes: rows flow with both servers verified
//! (PostgreSQL `sslmode=verify-full`, `[rabbitmq.tls]`) and with client certificates both
//! require; every failed check is refused with a state that names the server and the check,
//! logged once however often the relay reconnects, and nothing from the TLS library in the log;
//! a certificate file that cannot be used is a configuration error (exit 78) naming the key.
//!
//! The broker is reached through `stunnel` and PostgreSQL is a second cluster with `ssl = on`,
//! each on a port of its own; the shared servers are untouched.

use std::net::SocketAddr;
use std::path::Path;

use outbox_relay_testkit::prelude::*;

/// A TOML string: a path or a URL as a config value.
fn toml(text: impl AsRef<str>) -> String {
    serde_json::Value::String(text.as_ref().to_owned()).to_string()
}

fn path(p: &Path) -> String {
    toml(p.to_str().expect("a UTF-8 temp path"))
}

fn broker() -> SocketAddr {
    servers()
        .rabbitmq_addr()
        .expect("the test broker's address")
}

/// The relay's config for a broker behind `tunnel` (by `host`), on the test's own database on
/// the test server, with the health endpoint on.
fn through(tunnel: &TlsTunnel, host: &str) -> Setup {
    Setup::new()
        .set("rabbitmq", "url", &toml(tunnel.url(&amqp_url(None), host)))
        .set("health", "listen", "\"127.0.0.1:0\"")
}

/// Waits until `/ready` says the table's state is `state`; returns the status and the state.
async fn wait_for_state(relay: &Relay, state: &str) -> (u16, String) {
    let addr = health_addr(relay).await;
    eventually(&format!("the health endpoint to say {state:?}"), || async {
        table_state(&addr).await.1 == state
    })
    .await;
    table_state(&addr).await
}

/// The relay's log lines that contain `needle`.
fn lines_with(relay: &Relay, needle: &str) -> usize {
    relay.log().lines().filter(|l| l.contains(needle)).count()
}

/// The relay's report of a failed TLS check: one line, however often it reconnected (at least
/// `attempts` times, counted by `seen`), and nothing from the TLS library or the AMQP client.
async fn assert_reported_once(relay: &Relay, attempts: usize, seen: impl Fn() -> usize) {
    eventually(
        &format!("{attempts} connection attempts of the relay"),
        || async { seen() >= attempts },
    )
    .await;
    let log = relay.log();
    assert_eq!(
        lines_with(relay, "TLS check failed"),
        1,
        "one line for the failed check across {} attempts:\n{log}",
        seen()
    );
    assert!(
        !log.contains("ERROR") && !log.contains("failed to verify TLS certificate"),
        "no error lines of the libraries:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_flow_with_both_servers_verified_and_the_client_certificates_they_require() {
    let ca = TestCa::new("both").unwrap();
    let server = ca.server("server", &["localhost", "127.0.0.1"]).unwrap();
    let client = ca.client("relay", "outbox-relay").unwrap();
    let tunnel = TlsTunnel::start(&server, broker(), Some(&ca.ca_file)).unwrap();
    let pg = TlsPostgres::start(&server, &ca.ca_file, true).unwrap();
    let (root, cert, key) = (
        ca.ca_file.to_str().unwrap(),
        client.cert.to_str().unwrap(),
        client.key.to_str().unwrap(),
    );
    let pg_url = pg.url(&[
        ("sslmode", "verify-full"),
        ("sslrootcert", root),
        ("sslcert", cert),
        ("sslkey", key),
    ]);
    let env = TestEnv::new(
        through(&tunnel, "localhost")
            .postgres_server(&pg_url)
            .set("rabbitmq.tls", "ca_file", &path(&ca.ca_file))
            .set("rabbitmq.tls", "cert_file", &path(&client.cert))
            .set("rabbitmq.tls", "key_file", &path(&client.key)),
    )
    .await;
    let relay = env.start_relay();
    let (status, body) = wait_for_state(&relay, "relaying").await;
    assert_eq!(status, 200, "{body}");

    let ids = env.insert(&rows_over_keys("tls", 5, 50)).await;
    let received = env.consumer.wait_for(ids.len()).await;
    env.wait_all_marked().await;
    assert_first_deliveries_in_id_order(&received);
    assert_eq!(delivered_ids(&received), ids.into_iter().collect());

    // Every session of the relay is TLS, with the client certificate it was given.
    let (sessions, all_tls, dns): (i64, Option<bool>, Vec<String>) = sqlx::query_as(
        "SELECT count(*), bool_and(s.ssl), coalesce(array_agg(DISTINCT s.client_dn), '{}') \
         FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
         WHERE a.application_name = 'outbox-relay'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(
        sessions >= 2,
        "the pool and the coordination session: {sessions}"
    );
    assert_eq!(all_tls, Some(true));
    assert_eq!(dns, ["/CN=outbox-relay"]);
    // The broker was reached through the tunnel, which takes only verified client certificates.
    assert!(tunnel.connections() >= 1, "{}", tunnel.log());
    assert!(!relay.log().contains("ERROR"), "{}", relay.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_requires_a_client_certificate_refuses_a_relay_without_one_with_a_clear_state(
) {
    let ca = TestCa::new("nocert").unwrap();
    let server = ca.server("server", &["localhost"]).unwrap();
    let tunnel = TlsTunnel::start(&server, broker(), Some(&ca.ca_file)).unwrap();
    let env = TestEnv::new(through(&tunnel, "localhost").set(
        "rabbitmq.tls",
        "ca_file",
        &path(&ca.ca_file),
    ))
    .await;
    let relay = env.start_relay();
    let state = format!(
        "not ready: RabbitMQ at amqps://localhost:{}: the server requires a client certificate and the relay sent none",
        tunnel.port
    );
    let (status, body) = wait_for_state(&relay, &state).await;
    assert_eq!(status, 503, "{body}");
    assert_reported_once(&relay, 4, || tunnel.connections()).await;
    assert!(env.consumer.received().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_broker_is_refused_with_one_state_line_and_no_error_from_the_tls_library() {
    let ca = TestCa::new("untrusted").unwrap();
    let server = ca.server("server", &["localhost"]).unwrap();
    let tunnel = TlsTunnel::start(&server, broker(), None).unwrap();
    // No ca_file: the system's trust store does not know the test's CA.
    let env = TestEnv::new(through(&tunnel, "localhost")).await;
    let relay = env.start_relay();
    let state = format!(
        "not ready: RabbitMQ at amqps://localhost:{}: the server's certificate is not trusted (unknown issuer)",
        tunnel.port
    );
    let (status, body) = wait_for_state(&relay, &state).await;
    assert_eq!(status, 503, "{body}");
    assert_reported_once(&relay, 4, || tunnel.connections()).await;
    assert!(
        relay
            .log()
            .contains(&format!("error={}", &state["not ready: ".len()..])),
        "the log line says which server and which check:\n{}",
        relay.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_or_misnamed_broker_certificate_is_named_as_such() {
    let ca = TestCa::new("checks").unwrap();
    let expired = ca
        .server_valid("expired", &["localhost"], Validity::Expired)
        .unwrap();
    let misnamed = ca.server("misnamed", &["mq.test"]).unwrap();
    for (cert, check) in [
        (
            &expired,
            "the server's certificate has expired (not after 2021-01-01 00:00:00 UTC)",
        ),
        (
            &misnamed,
            "the server's certificate is not valid for \"localhost\" (name mismatch; it names mq.test)",
        ),
    ] {
        let tunnel = TlsTunnel::start(cert, broker(), None).unwrap();
        let env = TestEnv::new(
            through(&tunnel, "localhost").set("rabbitmq.tls", "ca_file", &path(&ca.ca_file)),
        )
        .await;
        let relay = env.start_relay();
        let state = format!(
            "not ready: RabbitMQ at amqps://localhost:{}: {check}",
            tunnel.port
        );
        wait_for_state(&relay, &state).await;
        assert_reported_once(&relay, 2, || tunnel.connections()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_name_is_the_name_the_brokers_certificate_is_checked_for() {
    let ca = TestCa::new("named").unwrap();
    // Reached by IP address; the certificate names only the broker's DNS name.
    let server = ca.server("server", &["mq.test"]).unwrap();
    let tunnel = TlsTunnel::start(&server, broker(), None).unwrap();
    let env = TestEnv::new(
        through(&tunnel, "127.0.0.1")
            .set("rabbitmq.tls", "ca_file", &path(&ca.ca_file))
            .set("rabbitmq.tls", "server_name", "\"mq.test\""),
    )
    .await;
    let relay = env.start_relay();
    wait_for_state(&relay, "relaying").await;
    env.insert(&[NewRow::new("named-1", "k")]).await;
    env.consumer.wait_for(1).await;
    env.wait_all_marked().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_postgres_is_refused_with_one_state_line_naming_it() {
    let ca = TestCa::new("pg").unwrap();
    let other = TestCa::new("other").unwrap();
    let server = ca.server("server", &["127.0.0.1"]).unwrap();
    let pg = TlsPostgres::start(&server, &ca.ca_file, false).unwrap();
    let trusted = pg.url(&[
        ("sslmode", "verify-full"),
        ("sslrootcert", ca.ca_file.to_str().unwrap()),
    ]);
    // The relay trusts another CA than the one that signed the server's certificate.
    let mut untrusted = pg.url(&[
        ("sslmode", "verify-full"),
        ("sslrootcert", other.ca_file.to_str().unwrap()),
    ]);
    untrusted.set_path("/postgres");
    let env = TestEnv::new(
        Setup::new()
            .postgres_server(&trusted)
            .without_migrate()
            .set("postgres", "url", &toml(untrusted.as_str()))
            .set("health", "listen", "\"127.0.0.1:0\""),
    )
    .await;
    let relay = env.start_relay();
    let words = format!(
        "PostgreSQL at 127.0.0.1:{}: the server's certificate is not trusted (unknown issuer)",
        pg.port
    );
    let (status, body) = wait_for_state(&relay, &format!("not ready: {words}")).await;
    assert_eq!(status, 503, "{body}");
    let before = pg.connections();
    assert_reported_once(&relay, before + 3, || pg.connections()).await;

    // The commands say the same in their error.
    let status = env.cli(&["status"]).await;
    assert_eq!(status.code, 1, "{status:?}");
    assert!(
        status
            .stderr
            .contains("TLS: the server's certificate is not trusted (unknown issuer)"),
        "{status:?}"
    );
}

/// A config on the test servers' URLs with `extra` appended, checked by `check-config`.
async fn check_config(
    dir: &Path,
    postgres_url: &str,
    rabbitmq_url: &str,
    extra: &str,
) -> CliOutput {
    let config = dir.join("outbox-relay.toml");
    std::fs::write(
        &config,
        format!(
            "[postgres]\nurl = {}\n[rabbitmq]\nurl = {}\n{extra}\n[[outbox]]\ntable = \"outbox\"\nexchange = \"events\"\n",
            toml(postgres_url),
            toml(rabbitmq_url)
        ),
    )
    .unwrap();
    run_cli(&config, &["check-config"]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_file_that_cannot_be_used_is_exit_78_naming_the_key_and_the_path() {
    let ca = TestCa::new("config").unwrap();
    let dir = ca.dir();
    let missing = dir.join("no-such-ca.pem");
    let not_pem = dir.join("not-pem.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let client = ca.client("relay", "outbox-relay").unwrap();
    let pg = "postgres://postgres@127.0.0.1:5432/postgres";
    let amqps = "amqps://guest:guest@localhost:5671/%2f";

    let out = check_config(
        dir,
        pg,
        amqps,
        &format!("[rabbitmq.tls]\nca_file = {}\n", path(&missing)),
    )
    .await;
    assert_eq!(out.code, 78, "{out:?}");
    assert!(
        out.stderr.contains(&format!(
            "rabbitmq.tls.ca_file: cannot read {}",
            missing.display()
        )),
        "{out:?}"
    );

    let out = check_config(
        dir,
        pg,
        amqps,
        &format!(
            "[rabbitmq.tls]\ncert_file = {}\nkey_file = {}\n",
            path(&not_pem),
            path(&ca.ca_file)
        ),
    )
    .await;
    assert_eq!(out.code, 78, "{out:?}");
    assert!(
        out.stderr.contains(&format!(
            "rabbitmq.tls.cert_file: {}: no PEM certificate in it",
            not_pem.display()
        )) && out.stderr.contains("rabbitmq.tls.key_file:"),
        "{out:?}"
    );

    let out = check_config(
        dir,
        pg,
        amqps,
        &format!("[rabbitmq.tls]\ncert_file = {}\n", path(&client.cert)),
    )
    .await;
    assert_eq!(out.code, 78, "{out:?}");
    assert!(
        out.stderr
            .contains("rabbitmq.tls.key_file: required with cert_file"),
        "{out:?}"
    );

    let out = check_config(
        dir,
        pg,
        "amqp://guest:guest@localhost:5672/%2f",
        &format!("[rabbitmq.tls]\nca_file = {}\n", path(&ca.ca_file)),
    )
    .await;
    assert_eq!(out.code, 78, "{out:?}");
    assert!(
        out.stderr
            .contains("rabbitmq.tls: needs an amqps:// rabbitmq.url"),
        "{out:?}"
    );

    let out = check_config(
        dir,
        &format!("{pg}?sslmode=verify-full&sslrootcert={}", missing.display()),
        amqps,
        "",
    )
    .await;
    assert_eq!(out.code, 78, "{out:?}");
    assert!(
        out.stderr.contains(&format!(
            "postgres.url: sslrootcert: cannot read {}",
            missing.display()
        )),
        "{out:?}"
    );
}
