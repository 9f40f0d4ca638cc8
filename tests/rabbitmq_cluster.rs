//! A RabbitMQ cluster of the test's own (three nodes on this machine, a quorum queue bound to
//! the table's exchange), with `rabbitmq.url` listing every node. Under load, the relay's node
//! is stopped (killed, then stopped cleanly), then each other node in turn: the relay moves to
//! the next node every time. Then the cluster loses its majority and every node goes: the relay
//! marks nothing the quorum did not confirm, says the broker is unavailable, and catches up
//! once the nodes are back. Each time nothing is lost, first deliveries keep per-key order,
//! and duplicates carry the same message_id.
//!
//! One test, one cluster: starting three nodes takes about 12 s, and the phases stop nodes
//! that the others would need.

use std::collections::HashSet;
use std::time::Duration;

use outbox_relay_testkit::prelude::*;

const KEYS: usize = 30;

/// Waits until the relay's AMQP connection is on a node other than `not` (any node when
/// `None`), asking the nodes in `up`; returns that node.
async fn relay_node(
    cluster: &RabbitCluster,
    env: &TestEnv,
    up: &[usize],
    not: Option<usize>,
) -> usize {
    let name = format!("obr-test {}", env.name);
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        for &asking in up {
            match cluster.node_of_connection(asking, &name).await {
                Ok(Some(node)) if Some(node) != not => return node,
                Ok(_) => {}
                Err(e) => eprintln!("asking node {asking}: {e:#}"),
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the relay's connection never showed up on a node other than {not:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until at least `more` rows beyond `before` are marked published: rows flow.
async fn wait_for_progress(env: &TestEnv, before: usize, more: usize, what: &str) -> usize {
    eventually(what, || async {
        env.published_ids().await.len() >= before + more
    })
    .await;
    env.published_ids().await.len()
}

async fn parked_count(env: &TestEnv) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM public.outbox WHERE parked_at IS NOT NULL")
        .fetch_one(&env.pool)
        .await
        .expect("count parked rows")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_moves_round_a_cluster_as_its_nodes_go_and_loses_nothing() {
    let started = std::time::Instant::now();
    let mut cluster = RabbitCluster::start(3)
        .await
        .unwrap_or_else(|e| panic!("start a RabbitMQ cluster: {e:#}"));
    eprintln!("a 3-node cluster started in {:?}", started.elapsed());
    let list = format!(
        "[{}]",
        cluster
            .urls()
            .iter()
            .map(|u| format!("\"{u}\""))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let env = TestEnv::new(
        Setup::new()
            .rabbitmq_server(&cluster.url(0))
            .quorum_queue()
            .set("rabbitmq", "url", &list)
            .set("rabbitmq", "confirm_timeout", "\"5s\"")
            .set("health", "listen", "\"127.0.0.1:0\""),
    )
    .await;
    let relay = env.start_relay();
    let producer = Producer::start(&env, "c", KEYS, 10, Duration::from_millis(50));
    let all = [0, 1, 2];

    // A fresh start connects to the first node that answers: the top of the list.
    let mut on = relay_node(&cluster, &env, &all, None).await;
    assert_eq!(
        on, 0,
        "a fresh start connects to the first node of the list"
    );
    let mut published = wait_for_progress(&env, 0, 200, "the first rows to be marked").await;

    // The relay's node goes (killed first, like a machine that died; then stopped cleanly,
    // as an operator does), the relay moves to the next node, rows flow again, the node comes
    // back; then the next node, until every node went once.
    for round in 0..cluster.size() {
        let others: Vec<usize> = all.iter().copied().filter(|&n| n != on).collect();
        if round == 0 {
            cluster.kill(on);
        } else {
            cluster
                .stop_app(on)
                .await
                .unwrap_or_else(|e| panic!("{e:#}"));
        }
        let next = relay_node(&cluster, &env, &others, Some(on)).await;
        assert_eq!(
            next,
            (on + 1) % cluster.size(),
            "the relay moves to the node after the one it lost"
        );
        published = wait_for_progress(
            &env,
            published,
            200,
            &format!("rows to flow again after node {on} went (round {round})"),
        )
        .await;
        if round == 0 {
            cluster.restart(on).await
        } else {
            cluster.start_app(on).await
        }
        .unwrap_or_else(|e| panic!("bring node {on} back: {e:#}"));
        on = next;
    }
    assert_eq!(parked_count(&env).await, 0, "an outage never parks rows");
    let log = relay.log();
    assert!(
        log.contains("connected to RabbitMQ node") && !log.contains("guest:guest"),
        "the relay names its node, without the password:\n{log}"
    );

    // The cluster loses its majority: the two nodes the relay is not on go. The quorum queue
    // confirms nothing now, so rows written from here on stay unmarked (the relay gives the
    // connection up after confirm_timeout and publishes them again, with the same message_id).
    let others: Vec<usize> = all.iter().copied().filter(|&n| n != on).collect();
    for &n in &others {
        cluster
            .stop_app(n)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
    }
    let before_loss: HashSet<i64> = sqlx::query_scalar("SELECT id FROM public.outbox")
        .fetch_all(&env.pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    relay
        .wait_for_log("no confirm from the broker within 5s")
        .await;
    let marked_without_majority: Vec<i64> = env
        .published_ids()
        .await
        .into_iter()
        .filter(|id| !before_loss.contains(id))
        .collect();
    assert!(
        marked_without_majority.is_empty(),
        "rows written after the quorum was lost were marked: {:?}",
        &marked_without_majority[..marked_without_majority.len().min(10)]
    );

    // The last node goes too: the relay says so (the log said "RabbitMQ unavailable" at the
    // confirm timeout already; the state's words follow the outage), and keeps every row.
    cluster
        .stop_app(on)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let addr = health_addr(&relay).await;
    eventually("the health endpoint to say no node answers", || async {
        let (status, body) = http_get(&addr, "/ready").await;
        status == 503 && body.contains("none of the 3 RabbitMQ nodes answered")
    })
    .await;
    assert_eq!(parked_count(&env).await, 0, "an outage never parks rows");

    // The nodes come back (together: each waits for the others' tables), the relay catches up.
    let (a, b, c) = tokio::join!(
        cluster.start_app(0),
        cluster.start_app(1),
        cluster.start_app(2)
    );
    for started in [a, b, c] {
        started.unwrap_or_else(|e| panic!("bring the nodes back: {e:#}"));
    }
    let written = producer.stop().await;
    let received = env.consumer.wait_for(written).await;
    env.wait_all_marked().await;
    eventually(
        "the consumer to have every message of the queue",
        || async {
            cluster
                .unsettled_messages(0, &env.queue)
                .await
                .is_ok_and(|n| n == 0)
        },
    )
    .await;
    let received = {
        let _ = received;
        env.consumer.received()
    };
    let ids: HashSet<i64> = sqlx::query_scalar("SELECT id FROM public.outbox")
        .fetch_all(&env.pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(ids.len(), written);
    assert_eq!(delivered_ids(&received), ids, "every row delivered");
    assert_first_deliveries_in_id_order(&received);
    let duplicates = assert_duplicates_share_message_id(&received);
    assert_eq!(parked_count(&env).await, 0, "an outage never parks rows");
    eprintln!(
        "{written} rows over {KEYS} keys, {duplicates} duplicate deliveries, in {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_that_refuse_or_are_down_are_named_and_the_next_node_is_used() {
    // The shared broker is the third node; before it, a node that refuses the password and
    // one where nothing listens.
    let good = amqp_url(None);
    let mut refusing = url::Url::parse(&good).unwrap();
    refusing.set_password(Some("wrong-pw")).unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut down = url::Url::parse(&good).unwrap();
    down.set_port(Some(closed.local_addr().unwrap().port()))
        .unwrap();
    drop(closed);
    let list = format!("[\"{refusing}\", \"{down}\", \"{good}\"]");
    let env = TestEnv::new(Setup::new().set("rabbitmq", "url", &list)).await;

    let checked = env.cli(&["check-config"]).await;
    assert_eq!(checked.code, 0, "{checked:?}");
    assert!(
        checked.stdout.contains(&format!(
            "rabbitmq {}: reachable (the first node of rabbitmq.url that answered)",
            good.replace("guest:guest", "guest:***")
        )),
        "{checked:?}"
    );

    let relay = env.start_relay();
    let ids = env.insert(&rows_over_keys("n", 3, 30)).await;
    env.consumer.wait_for(ids.len()).await;
    relay
        .wait_for_log("connected to RabbitMQ node after nodes that did not answer")
        .await;
    let log = relay.log();
    let line = log
        .lines()
        .find(|l| l.contains("after nodes that did not answer"))
        .expect("the line waited for");
    assert!(line.contains("(3 of 3)"), "{line}");
    assert!(
        line.contains("ACCESS_REFUSED"),
        "the refusal in words: {line}"
    );
    assert!(
        line.contains(&format!("127.0.0.1:{}", down.port().unwrap())),
        "{line}"
    );
    assert!(
        !log.contains("wrong-pw") && !log.contains("guest:guest"),
        "a password in the log:\n{log}"
    );
}
