//! The relay's parts driven one step at a time against the real servers, the way a worker's
//! single step is tested: a row fetched, the window filled and refilled, confirms, the mark, a
//! failure recorded; the mark pipeline's last mark at shutdown; and what the log says about a
//! refused row and about one outage.

use std::sync::Arc;

use outbox_relay::cluster::member::{self, MemberSettings};
use outbox_relay::config::{OnExhausted, Settings, TableName};
use outbox_relay::metrics::TableMetrics;
use outbox_relay::publisher::Broker;
use outbox_relay::relay::{Acks, MarkPipeline, RowBudget, Share, Step, TableRelay};
use outbox_relay::shutdown::Shutdown;
use outbox_relay::store::leases::Leases;
use outbox_relay::store::{Coordination, LockState, RowVersion, Store, TableSql};
use outbox_relay_testkit::prelude::*;
use tokio_util::sync::CancellationToken;

/// A table relay of `env`'s config in this process, with its lock already held.
struct Driven {
    relay: TableRelay,
    coordination: Coordination,
    broker: Arc<Broker>,
    store: Store,
    membership: CancellationToken,
}

impl Driven {
    async fn new(env: &TestEnv) -> Driven {
        let settings = Arc::new(Settings::load(&env.config_path).expect("the test's config"));
        let table = settings.outbox[0].clone();
        let store = Store::connect(&settings.postgres).await.unwrap();
        let sql = TableSql::new(&table.table, OnExhausted::HoldKey);
        let coordination = Coordination::start(
            &settings.postgres,
            store.servers(),
            std::slice::from_ref(&sql),
            true,
            settings.relay.poll_interval,
            settings.relay.reconnect_max_delay,
            Default::default(),
        )
        .unwrap();
        let mut lock = coordination.lock(0);
        while !matches!(lock.state(), LockState::Held(_)) {
            lock.changed().await;
        }
        // The table's only member: it owns every partition.
        let membership = CancellationToken::new();
        let handle = member::start_in(
            Leases::new(store.pool().clone(), table.table.clone(), settings.lease()),
            MemberSettings {
                name: "relay_parts".into(),
                partitions: table.partitions,
                lease: settings.lease(),
                heartbeat: settings.relay.heartbeat,
                settle_margin: settings.settle_margin(),
            },
            Some(coordination.lock(0)),
            membership.clone(),
        );
        let mut ownership = handle.ownership.clone();
        ownership
            .wait_for(|o| o.partitions.len() as u32 == table.partitions)
            .await
            .unwrap();
        let share = Share::new(handle.ownership, Acks::new(1, handle.settled), 0, 1);
        let broker = Arc::new(Broker::new(&settings.rabbitmq));
        let rows = RowBudget::new(settings.relay.max_rows_in_memory, Default::default());
        let relay = TableRelay::new(
            settings,
            table,
            store.clone(),
            coordination.lock(0),
            share,
            broker.clone(),
            &rows,
            Shutdown::new(),
            TableMetrics::unregistered(),
        );
        Driven {
            relay,
            coordination,
            broker,
            store,
            membership,
        }
    }

    async fn close(self) {
        drop(self.relay);
        self.membership.cancel();
        self.broker.close().await;
        self.coordination.close().await;
        self.store.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_step_fetches_publishes_through_a_refilled_window_and_the_next_marks() {
    let env = TestEnv::new(Setup::new().set("relay", "max_in_flight", "2")).await;
    let ids = env.insert(&rows_over_keys("s", 5, 5)).await;
    let mut driven = Driven::new(&env).await;

    // Five rows of five keys through a window of two (marks of one row each): each step
    // sends what the window holds and returns as soon as a confirmed row waits for its mark.
    let mut published = 0;
    let mut steps = 0;
    while published < 5 {
        match driven.relay.step().await {
            Step::Batch {
                published: n,
                failed: 0,
                parked: 0,
                ..
            } => {
                assert!(n <= 2, "at most the window per step, got {n}");
                published += n;
            }
            other => panic!("step {steps}: {other:?}"),
        }
        steps += 1;
    }
    assert_eq!(published, 5);
    assert!(
        steps >= 3,
        "a window of two needs three fills for five rows"
    );
    let received = env.consumer.wait_for(5).await;
    assert_eq!(delivered_ids(&received), ids.iter().copied().collect());
    // Confirmed rows are marked by the pipeline; the step that finds nothing due settles it.
    let step = driven.relay.step().await;
    assert!(matches!(step, Step::Idle | Step::Batch { .. }), "{step:?}");
    env.wait_all_marked().await;
    assert_eq!(driven.relay.step().await, Step::Idle);
    driven.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_records_a_refused_row_and_holds_its_key_while_other_keys_go_on() {
    let env = TestEnv::new(
        Setup::new()
            .set("outbox.retry", "initial_delay", "\"1h\"")
            .set("outbox.retry", "max_delay", "\"1h\""),
    )
    .await;
    let missing = format!("{}-missing", env.exchange);
    let refused = env
        .insert(&[NewRow::new("bad", "held").exchange(&missing)])
        .await[0];
    let behind = env.insert(&[NewRow::new("behind", "held")]).await[0];
    let other = env.insert(&[NewRow::new("fine", "other")]).await[0];
    let mut driven = Driven::new(&env).await;

    let step = driven.relay.step().await;
    assert_eq!(
        step,
        Step::Batch {
            published: 1,
            failed: 1,
            parked: 0,
            full: false
        }
    );
    let row = env.row(refused).await;
    assert_eq!(row.attempts, 1);
    assert!(
        row.last_error
            .as_deref()
            .is_some_and(|e| e.contains("does not exist")),
        "{:?}",
        row.last_error
    );
    let received = env.consumer.wait_for(1).await;
    assert_eq!(first_deliveries(&received)[0].outbox_id(), other);
    // The row behind the refused one waits out of the due index, and stays unpublished.
    let held: bool = sqlx::query_scalar(&format!(
        "SELECT held FROM {} WHERE id = $1",
        quoted_table(&env.table)
    ))
    .bind(behind)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(held, "the key's next row is held");
    // The next step finishes the pipeline's writes (the other row's mark); then nothing is due.
    let step = driven.relay.step().await;
    assert!(
        matches!(step, Step::Idle | Step::Batch { published: 0, .. }),
        "{step:?}"
    );
    assert_eq!(driven.relay.step().await, Step::Idle);
    assert!(env.row(behind).await.published_at.is_none());
    driven.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_mark_at_shutdown_is_written_even_when_the_mark_before_it_failed() {
    let env = TestEnv::new(Setup::new().set("postgres", "statement_timeout", "\"1s\"")).await;
    let ids = env.insert(&rows_over_keys("m", 2, 4)).await;
    let settings = Settings::load(&env.config_path).unwrap();
    let store = Store::connect(&settings.postgres).await.unwrap();
    let table = TableName::parse(&env.table).unwrap();
    let sql = TableSql::new(&table, OnExhausted::HoldKey);
    let fence = Leases::new(store.pool().clone(), table.clone(), settings.lease())
        .fence_all("relay_parts", settings.outbox[0].partitions)
        .await
        .unwrap();
    let mut marks = MarkPipeline::new(store.clone(), sql, 100);
    marks.set_fence(&fence);

    // The versions the relay read and sent.
    let rows: Vec<RowVersion> = env
        .row_versions(&ids)
        .await
        .into_iter()
        .map(|(id, version)| RowVersion { id, version })
        .collect();

    // The first mark runs into a lock held past the statement timeout, and fails.
    let mut blocker = env.pool.begin().await.unwrap();
    sqlx::query(&format!(
        "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
        quoted_table(&env.table)
    ))
    .execute(&mut *blocker)
    .await
    .unwrap();
    marks.confirm(rows[0]);
    marks.confirm(rows[1]);
    marks.start().await.unwrap();
    eventually("the blocked mark to fail", || async {
        marks.mark_finished()
    })
    .await;
    blocker.rollback().await.unwrap();

    // Confirmed after it: the shutdown's mark writes these and the failed ones.
    marks.confirm(rows[2]);
    marks.confirm(rows[3]);
    let finished = marks.finish().await;
    assert!(finished.is_err(), "the failed mark is reported");
    assert_eq!(marks.pending(), 0, "nothing is left unmarked");
    for id in ids {
        assert!(env.row(id).await.published_at.is_some(), "row {id} marked");
    }
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_row_that_is_parked_at_once_is_logged_as_parked_not_as_retrying() {
    let env = TestEnv::new(Setup::new().set("outbox.retry", "max_attempts", "1")).await;
    let missing = format!("{}-missing", env.exchange);
    let id = env
        .insert(&[NewRow::new("poison", "k").exchange(&missing)])
        .await[0];
    let relay = env.start_relay();
    relay.wait_for_log("row parked").await;
    assert!(env.row(id).await.parked_at.is_some());
    let log = relay.log();
    assert!(!log.contains("retrying with backoff"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_broker_outage_seen_through_several_errors_is_logged_once_and_its_end_once() {
    let env = TestEnv::new(
        Setup::new()
            .own_vhost()
            .set("health", "listen", "\"127.0.0.1:0\""),
    )
    .await;
    let vhost = env.vhost.clone().expect("own vhost");
    let relay = env.start_relay();
    relay.wait_for_log("relaying").await;
    let addr = health_addr(&relay).await;

    // The outage: the broker closes the relay's connection, and reconnects are refused.
    rabbitmqctl(&["clear_permissions", "-p", &vhost, "guest"]);
    let _restore = Restore(vhost.clone());
    rabbitmqctl(&["close_all_connections", "-p", &vhost, "test outage"]);
    // The state's words follow the symptom: first the closed connection, then the refusal.
    eventually("a refused reconnect in the relay's state", || async {
        http_get(&addr, "/ready")
            .await
            .1
            .contains("access to vhost")
    })
    .await;
    rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
    relay.wait_for_log("recovered").await;
    let log = relay.log();
    assert_eq!(
        log.matches("RabbitMQ unavailable").count(),
        1,
        "one outage, one line: {log}"
    );
    assert_eq!(log.matches("recovered").count(), 1, "{log}");
}

/// Gives guest its permissions on the vhost back, also when the test fails.
struct Restore(String);

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["set_permissions", "-p", &self.0, "guest", ".*", ".*", ".*"])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declaration_that_conflicts_with_the_exchange_stops_its_table_only_and_says_so() {
    // The test's exchange is a topic exchange; the table's config declares it as fanout.
    let env =
        TestEnv::new(Setup::new().set("outbox", "declare_exchange", "{ type = \"fanout\" }")).await;
    env.add_tables(&["app.other".into()]).await;
    let stuck = env.insert(&rows_over_keys("stuck", 1, 2)).await;
    let mut tx = env.pool.begin().await.unwrap();
    insert_rows(&mut tx, "app.other", &rows_over_keys("fine", 2, 4))
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let relay = env.start_relay();
    relay
        .wait_for_log("exists with other settings than declare_exchange")
        .await;
    let received = env.consumer.wait_for(4).await;
    assert!(first_deliveries(&received)
        .iter()
        .all(|m| m.header_str("x-outbox-table").as_deref() == Some("app.other")));
    let log = relay.log();
    assert!(
        !log.contains("RabbitMQ unavailable"),
        "not an outage: {log}"
    );
    for id in stuck {
        let row = env.row(id).await;
        assert_eq!((row.attempts, row.published_at), (0, None), "untouched");
    }
}
