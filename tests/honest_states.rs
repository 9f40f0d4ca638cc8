//! What the relay says about itself is true: a relay alone on its table whose database sessions
//! are terminated rejoins (never "standby because of other relays"), and is not ready until it
//! relays again; a broker that closes every connection right after it opens sees the relay's
//! connects fall off, however briefly each one "recovered".

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_relay_testkit::prelude::*;
use outbox_relay_testkit::servers::rabbitmqctl as ctl;

fn with_health(setup: Setup) -> Setup {
    setup.set("health", "listen", "\"127.0.0.1:0\"")
}

/// One look at the relay from outside: `/ready`'s status and the table's state in words, and
/// the table's state metric (the label whose gauge is 1).
#[derive(Debug, Clone)]
struct Seen {
    status: u16,
    state: String,
    metric: Option<String>,
}

/// What `/ready` and the table's state metric said, sampled until stopped.
struct Watch {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Watch {
    fn start(addr: String, table: String) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let (stop, seen) = (stop.clone(), seen.clone());
            async move {
                while !stop.load(Ordering::Relaxed) {
                    let (status, state) = table_state(&addr).await;
                    let scrape = Scrape::of(&addr).await;
                    let metric = scrape
                        .samples
                        .iter()
                        .find(|s| {
                            s.name == "outbox_relay_table_state"
                                && s.labels.get("table") == Some(&table)
                                && s.value == 1.0
                        })
                        .and_then(|s| s.labels.get("state").cloned());
                    seen.lock().unwrap().push(Seen {
                        status,
                        state,
                        metric,
                    });
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        });
        Watch { stop, seen, task }
    }

    async fn stop(self) -> Vec<Seen> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("the watch ran");
        let seen = self.seen.lock().unwrap();
        seen.clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_alone_whose_sessions_are_terminated_rejoins_and_never_claims_other_relays() {
    let env = TestEnv::new(with_health(Setup::new())).await;
    let relay = env.start_relay();
    let addr = health_addr(&relay).await;
    relay.wait_for_log("relaying").await;
    env.insert(&[NewRow::new("before", "k")]).await;
    env.consumer.wait_for_id("before").await;

    let watch = Watch::start(addr.clone(), env.table.clone());
    for round in 0..3 {
        let lines = relay.log().lines().count();
        assert!(
            env.terminate_relay_sessions().await >= 1,
            "the relay had sessions to terminate"
        );
        // Back once it relays again: the membership registered anew and claimed the table.
        eventually("the relay to rejoin and relay again", || async {
            let log = relay.log();
            log.lines().skip(lines).any(|l| l.contains("relaying"))
                && table_state(&addr).await == (200, "relaying".to_owned())
        })
        .await;
        let id = format!("after-{round}");
        env.insert(&[NewRow::new(&id, "k")]).await;
        env.consumer.wait_for_id(&id).await;
    }
    let seen = watch.stop().await;

    let log = relay.log();
    assert!(
        !log.contains("other relays own"),
        "the relay is alone on its table, yet its log says other relays own the partitions:\n{log}"
    );
    assert!(
        log.contains("rejoining"),
        "losing the membership with the session is said in the log:\n{log}"
    );
    for Seen {
        status,
        state,
        metric,
    } in &seen
    {
        assert!(
            !state.contains("standby") && metric.as_deref() != Some("standby"),
            "a relay alone on its table was reported standing by: /ready {status} {state:?}, metric {metric:?}"
        );
        assert!(
            *status != 200 || state == "relaying",
            "/ready said ready while the relay was {state:?}"
        );
    }
    // Every row, before and after the terminations, went out and was marked.
    env.wait_all_marked().await;
    assert_eq!(env.consumer.unique_count(), 4);
}

/// A broker user of the test's own (deleted when dropped, also when the test fails).
struct BrokerUser {
    name: String,
}

impl BrokerUser {
    async fn create(name: String, password: &str, vhost: &str) -> BrokerUser {
        ctl(&["add_user", &name, password])
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        let user = BrokerUser { name };
        ctl(&["set_permissions", "-p", vhost, &user.name, ".*", ".*", ".*"])
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        user
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["delete_user", &self.name])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_closes_each_connection_right_after_it_opens_gets_ever_fewer_connects() {
    // The capped backoff: 200 ms doubling to 10 s, jittered. Each connection "recovers" (the
    // relay fetches), then dies: the old relay started its backoff again each time.
    let env = TestEnv::new(with_health(Setup::new().own_vhost().set(
        "relay",
        "reconnect_max_delay",
        "\"10s\"",
    )))
    .await;
    let vhost = env.vhost.clone().expect("the test's own vhost");
    let user = BrokerUser::create(format!("{}_u", env.name), "relay-secret", &vhost).await;
    // A real refusal of the broker's: the user may open one channel. The relay's publishing
    // channel opens; the channel that checks the rows' exchange (opened once rows are
    // fetched) makes the broker close the whole connection (NOT_ALLOWED, a connection error).
    ctl(&["set_user_limits", &user.name, r#"{"max-channels": 1}"#])
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let url = format!("amqp://{}:relay-secret@127.0.0.1:5672/{vhost}", user.name);
    let config = std::fs::read_to_string(&env.config_path)
        .unwrap()
        .replace(&format!("\"{}\"", env.amqp_url), &format!("\"{url}\""));
    assert!(config.contains(&url), "{config}");
    std::fs::write(&env.config_path, config).unwrap();
    let ids = env.insert(&rows_over_keys("flap", 4, 20)).await;

    let relay = env.start_relay();
    let addr = health_addr(&relay).await;
    relay.wait_for_log("RabbitMQ unavailable").await;
    let rabbitmq = [("server", "rabbitmq")];
    let reconnects = |scrape: &Scrape| {
        scrape
            .value("outbox_relay_reconnects_total", &rabbitmq)
            .unwrap_or_else(|| panic!("no reconnect counter: {}", scrape.text))
    };
    let at_start = reconnects(&Scrape::of(&addr).await);
    // Counts only, no timing: the old relay reconnected every 0.1-0.2 s (about 100 times in
    // these 20 s); backing off to the 10 s cap makes at most 10.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let made = reconnects(&Scrape::of(&addr).await) - at_start;
    assert!(
        made < 15.0,
        "{made} connects in 20 s to a broker that closes each one right after it opens"
    );
    assert!(made >= 2.0, "the relay kept trying: {made} connects");
    assert!(
        env.consumer.received().is_empty(),
        "nothing could go out while the broker closed every connection"
    );

    // The limit lifted, the next reconnect (within the 10 s cap) delivers everything.
    ctl(&["clear_user_limits", &user.name, "all"])
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    env.consumer.wait_for(ids.len()).await;
    env.wait_all_marked().await;
    let mut relay = relay;
    assert!(relay.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mark_refused_by_a_constraint_is_not_reported_as_postgresql_down() {
    let env = TestEnv::new(with_health(Setup::new())).await;
    // An operator's check that no row may be marked: PostgreSQL, up and answering, refuses
    // every mark with SQLSTATE 23514 (check_violation).
    sqlx::query(
        "ALTER TABLE public.outbox ADD CONSTRAINT obr_no_marks CHECK (published_at IS NULL)",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let relay = env.start_relay();
    env.insert(&[NewRow::new("refused", "k")]).await;
    env.consumer.wait_for_id("refused").await;
    relay
        .wait_for_log("PostgreSQL refused a statement on the outbox table")
        .await;
    assert!(relay.log().contains("23514"), "{}", relay.log());

    sqlx::query("ALTER TABLE public.outbox DROP CONSTRAINT obr_no_marks")
        .execute(&env.pool)
        .await
        .unwrap();
    env.wait_all_marked().await;
    let log = relay.log();
    assert!(
        !log.contains("PostgreSQL unavailable") && !log.contains("cannot use the outbox table"),
        "a statement PostgreSQL refused for a row's value is neither an outage nor an unusable table:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordination_session_terminated_right_after_it_opens_gets_ever_fewer_reconnects() {
    let env = TestEnv::new(with_health(Setup::new().set(
        "relay",
        "reconnect_max_delay",
        "\"10s\"",
    )))
    .await;
    let relay = env.start_relay();
    let addr = health_addr(&relay).await;
    relay.wait_for_log("relaying").await;
    // The coordination session is terminated as soon as it holds the tables' locks: opened,
    // then gone (its reconnects are what the metric counts).
    let stop = Arc::new(AtomicBool::new(false));
    let killer = tokio::spawn({
        let (stop, pool, db) = (stop.clone(), env.pool.clone(), env.db.clone());
        async move {
            while !stop.load(Ordering::Relaxed) {
                let _ = sqlx::query(
                    "SELECT pg_terminate_backend(a.pid) FROM pg_stat_activity a \
                     WHERE a.datname = $1 AND a.application_name = 'outbox-relay' \
                       AND a.pid IN (SELECT l.pid FROM pg_locks l \
                                     WHERE l.locktype = 'advisory' AND l.granted)",
                )
                .bind(&db)
                .execute(&pool)
                .await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    let postgres = [("server", "postgres")];
    let reconnects = |scrape: &Scrape| {
        scrape
            .value("outbox_relay_reconnects_total", &postgres)
            .unwrap_or_else(|| panic!("no reconnect counter: {}", scrape.text))
    };
    let at_start = reconnects(&Scrape::of(&addr).await);
    tokio::time::sleep(Duration::from_secs(20)).await;
    let made = reconnects(&Scrape::of(&addr).await) - at_start;
    stop.store(true, Ordering::Relaxed);
    killer.await.unwrap();
    assert!(
        made < 15.0,
        "{made} coordination sessions in 20 s, each terminated right after it opened"
    );
    env.insert(&[NewRow::new("after", "k")]).await;
    env.consumer.wait_for_id("after").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_refusal_of_each_kind_is_logged_with_its_reason_exchange_and_row_then_counted() {
    let env = TestEnv::new(Setup::new().set("retry", "max_attempts", "50")).await;
    let missing = unique_name("obr_missing");
    let unbound = unique_name("obr_unbound");
    env.declare_exchange(&unbound).await;
    let relay = env.start_relay();
    let ids = env
        .insert(&[
            NewRow::new("to-missing-1", "k1").exchange(&missing),
            NewRow::new("to-missing-2", "k2").exchange(&missing),
            NewRow::new("to-unbound", "k3").exchange(&unbound),
            NewRow::new("routed", "k4"),
        ])
        .await;
    env.consumer.wait_for_id("routed").await;
    eventually("each refused row to fail three times", || async {
        for id in &ids[..3] {
            if env.row(*id).await.attempts < 3 {
                return false;
            }
        }
        true
    })
    .await;

    let log = relay.log();
    let said: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("the broker refused a publish"))
        .collect();
    assert_eq!(said.len(), 2, "one line per kind of refusal:\n{log}");
    let no_exchange = said
        .iter()
        .find(|line| line.contains("no_exchange"))
        .unwrap_or_else(|| panic!("no line for the missing exchange:\n{log}"));
    assert!(
        no_exchange.contains(&missing)
            && no_exchange.contains("NOT_FOUND")
            && (no_exchange.contains(&format!("id={}", ids[0]))
                || no_exchange.contains(&format!("id={}", ids[1]))),
        "the exchange, the broker's reason and the row: {no_exchange}"
    );
    let unroutable = said
        .iter()
        .find(|line| line.contains("unroutable"))
        .unwrap_or_else(|| panic!("no line for the unroutable row:\n{log}"));
    assert!(
        unroutable.contains(&unbound)
            && unroutable.contains("NO_ROUTE")
            && unroutable.contains(&format!("id={}", ids[2])),
        "the exchange, the broker's reason and the row: {unroutable}"
    );
    assert!(
        !log.contains("publishes refused by the broker; retrying with backoff"),
        "refusals are counted, not repeated:\n{log}"
    );
}
