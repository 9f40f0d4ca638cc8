//! The kit's own promises, against the real servers: what it makes is removed, the consumer
//! sees every message and comes back after its connection is closed, and the proxy counts and
//! breaks what goes through it. The relay's tests, the bench and the soak rely on these.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, ExchangeKind};
use outbox_relay_testkit::consumer::{message_id, Consumer, ConsumerSettings};
use outbox_relay_testkit::database::Database;
use outbox_relay_testkit::prelude::{eventually, servers};
use outbox_relay_testkit::proxy::{Counted, Proxy};
use outbox_relay_testkit::servers::{connect_pg, rabbitmqctl, unique_name};
use outbox_relay_testkit::vhost::Vhost;
use sqlx::{Connection, PgConnection};

async fn database_exists(name: &str) -> bool {
    let mut admin = PgConnection::connect(servers().postgres_url("postgres").as_str())
        .await
        .unwrap();
    let found: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&mut admin)
            .await
            .unwrap();
    let _ = admin.close().await;
    found
}

async fn vhost_exists(name: &str) -> bool {
    let listing = rabbitmqctl(&["list_vhosts", "--quiet", "--no-table-headers", "name"])
        .await
        .unwrap();
    listing.lines().any(|l| l.trim() == name)
}

fn admin_url() -> url::Url {
    servers().postgres_url("postgres")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_is_dropped_when_removed_even_with_a_session_in_it_and_when_dropped() {
    let name = unique_name("obr_kit");
    let database = Database::create(&admin_url(), &name).await.unwrap();
    assert!(database_exists(&name).await);
    // A session left in the database (a killed relay's, say) does not stop the removal.
    let _session = PgConnection::connect(database.url().as_str())
        .await
        .unwrap();
    database.remove().await.unwrap();
    assert!(!database_exists(&name).await);

    let name = unique_name("obr_kit");
    drop(Database::create(&admin_url(), &name).await.unwrap());
    assert!(!database_exists(&name).await, "dropping the value drops it");

    let name = unique_name("obr_kit");
    Database::create(&admin_url(), &name).await.unwrap().keep();
    assert!(database_exists(&name).await, "a kept database stays");
    let mut admin = connect_pg(&admin_url(), "kit-test").await.unwrap();
    sqlx::raw_sql(&format!("DROP DATABASE \"{name}\""))
        .execute(&mut admin)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vhost_of_its_own_goes_with_everything_in_it_and_a_shared_one_loses_only_what_was_declared(
) {
    let name = unique_name("obr-kit");
    let vhost = Vhost::create(servers(), &name).await.unwrap();
    vhost
        .declare_exchange("kit.x", ExchangeKind::Topic)
        .await
        .unwrap();
    vhost.declare_queue("kit.q").await.unwrap();
    vhost.bind("kit.q", "kit.x", "#").await.unwrap();
    assert!(vhost_exists(&name).await);
    vhost.remove().await.unwrap();
    assert!(!vhost_exists(&name).await);

    let shared = Vhost::shared(servers().rabbitmq_url(None));
    assert_eq!(shared.name(), "/");
    let (exchange, queue) = (unique_name("obr_kit_x"), unique_name("obr_kit_q"));
    shared
        .declare_exchange(&exchange, ExchangeKind::Direct)
        .await
        .unwrap();
    shared.declare_queue(&queue).await.unwrap();
    assert!(shared.exchange_exists(&exchange).await.unwrap());
    assert_eq!(shared.ready_messages(&queue).await.unwrap(), 0);
    let observer = Vhost::shared(servers().rabbitmq_url(None));
    drop(shared);
    assert!(!observer.exchange_exists(&exchange).await.unwrap());
    assert!(
        observer.ready_messages(&queue).await.is_err(),
        "queue deleted"
    );
    assert!(
        observer.exchange_exists("amq.topic").await.unwrap(),
        "nothing else is touched"
    );
    observer.keep();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_sees_every_message_acks_it_and_comes_back_after_its_connection_is_closed() {
    let name = unique_name("obr-kit");
    let vhost = Vhost::create(servers(), &name).await.unwrap();
    vhost.declare_queue("kit.q").await.unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    let consumer = Consumer::start(
        ConsumerSettings::new(vhost.url().as_str(), "kit.q"),
        move |d| {
            sink.lock()
                .unwrap()
                .push(message_id(&d.properties).to_owned())
        },
    )
    .await
    .unwrap();
    let publish = |from: usize| {
        let vhost = &vhost;
        async move {
            let channel = vhost.channel().await.unwrap();
            for i in from..from + 10 {
                channel
                    .basic_publish(
                        "".into(),
                        "kit.q".into(),
                        BasicPublishOptions::default(),
                        b"{}",
                        BasicProperties::default().with_message_id(format!("m-{i}").into()),
                    )
                    .await
                    .unwrap();
            }
            let _ = channel.close(200, "done".into()).await;
        }
    };
    publish(0).await;
    eventually("ten messages", || async {
        seen.lock().unwrap().len() >= 10
    })
    .await;

    rabbitmqctl(&["close_all_connections", "--vhost", &name, "kit test"])
        .await
        .unwrap();
    eventually("the consumer to reconnect", || async {
        consumer.reconnects() >= 1
    })
    .await;
    publish(10).await;
    eventually("ten more messages", || async {
        seen.lock().unwrap().iter().any(|m| m == "m-19")
    })
    .await;
    eventually("every message acked", || async {
        vhost.unsettled_messages("kit.q").await.unwrap() == 0
    })
    .await;
    consumer.stop().await;
    let seen = seen.lock().unwrap().clone();
    for i in 0..20 {
        assert!(seen.contains(&format!("m-{i}")), "m-{i} not seen: {seen:?}");
    }
    vhost.remove().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_counts_a_postgres_clients_statements_and_connections() {
    let upstream = servers().postgres_addr().unwrap();
    let proxy = Proxy::start_counting_postgres("postgres", upstream)
        .await
        .unwrap();
    let mut url = proxy.route(&admin_url()).unwrap();
    url.query_pairs_mut().append_pair("sslmode", "disable");
    let mut conn = PgConnection::connect(url.as_str()).await.unwrap();
    assert_eq!(proxy.connections(), 1);
    let before = proxy.counted();
    sqlx::raw_sql("SELECT 1").execute(&mut conn).await.unwrap();
    let simple = proxy.counted() - before;
    assert_eq!(
        simple,
        Counted {
            statements: 1,
            round_trips: 1
        }
    );
    let before = proxy.counted();
    let n: i32 = sqlx::query_scalar("SELECT $1::int4")
        .bind(7)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(n, 7);
    let extended = proxy.counted() - before;
    assert_eq!(extended.statements, 1, "{extended:?}");
    assert!(extended.round_trips >= 1, "{extended:?}");
    let _ = conn.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_breaks_open_connections_and_a_silent_proxy_answers_nothing_until_healed() {
    let upstream = servers().postgres_addr().unwrap();
    let proxy = Proxy::start("postgres", upstream).await.unwrap();
    let url = proxy.route(&admin_url()).unwrap();
    let mut conn = PgConnection::connect(url.as_str()).await.unwrap();
    proxy.reset();
    assert!(
        sqlx::raw_sql("SELECT 1").execute(&mut conn).await.is_err(),
        "a reset connection is broken"
    );

    let mut conn = PgConnection::connect(url.as_str()).await.unwrap();
    proxy.set_silent(true);
    let silent = tokio::time::timeout(
        Duration::from_millis(500),
        sqlx::raw_sql("SELECT 1").execute(&mut conn),
    )
    .await;
    assert!(silent.is_err(), "no answer through a silent proxy");
    proxy.heal();
    let mut conn = PgConnection::connect(url.as_str()).await.unwrap();
    sqlx::raw_sql("SELECT 1").execute(&mut conn).await.unwrap();
    assert_eq!(proxy.connections(), 3);
}
