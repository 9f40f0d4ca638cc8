//! What the relay says about itself is true: a broker that closes every connection right after
//! it opens sees the relay's connects fall off, however briefly each one "recovered".

use std::time::Duration;

use outbox_relay_testkit::prelude::*;
use outbox_relay_testkit::servers::rabbitmqctl as ctl;

fn with_health(setup: Setup) -> Setup {
    setup.set("health", "listen", "\"127.0.0.1:0\"")
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
