//! Failed publishes: retried with backoff until they succeed, parked after the maximum
//! attempts (holding their key back, or not with `on_exhausted = "skip"`), and released by
//! `outbox-relay retry`.

use outbox_relay_testkit::prelude::*;

/// Waits until row `id` satisfies `done`, returning its state.
async fn wait_row(
    env: &TestEnv,
    id: i64,
    what: &str,
    done: impl Fn(&RowState) -> bool,
) -> RowState {
    eventually(what, || async { done(&env.row(id).await) }).await;
    env.row(id).await
}

/// Inserts a row on a fresh key and waits for it: everything inserted before it that could
/// be published has been fetched by then.
async fn sentinel(env: &TestEnv, name: &str) {
    env.insert(&[NewRow::new(name, name)]).await;
    env.consumer.wait_for_id(name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_for_a_missing_exchange_is_retried_and_delivered_once_the_exchange_exists() {
    let env = TestEnv::new(Setup::new()).await;
    let _relay = env.start_relay();
    let late = format!("{}_late", env.name);
    let ids = env
        .insert(&[
            NewRow::new("late-1", "k").exchange(&late),
            NewRow::new("late-2", "k"),
        ])
        .await;

    let failing = wait_row(&env, ids[0], "a second failed attempt", |r| r.attempts >= 2).await;
    let error = failing.last_error.clone().unwrap_or_default();
    assert!(
        error.contains(&late),
        "last_error names the exchange: {error}"
    );
    assert!(
        failing.published_at.is_none() && failing.parked_at.is_none(),
        "{failing:?}"
    );
    assert_eq!(
        env.row(ids[1]).await.attempts,
        0,
        "the row behind it waits untried"
    );
    let status = env.status_json().await;
    assert_eq!(
        (status["pending"].as_i64(), status["parked"].as_i64()),
        (Some(2), Some(0)),
        "{status}"
    );

    env.declare_exchange(&late).await;
    env.bind(&late, "#").await;
    let received = env.consumer.wait_for(2).await;
    assert_eq!(
        delivered_of_key(&received, "k"),
        ids,
        "delivered in order once the exchange exists"
    );
    assert_eq!(received[0].exchange, late);
    let done = wait_row(&env, ids[0], "the row to be marked", |r| {
        r.published_at.is_some()
    })
    .await;
    assert!(done.attempts >= 2 && done.parked_at.is_none(), "{done:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_row_is_retried_until_a_queue_is_bound() {
    let env = TestEnv::new(Setup::new().bindings(&["bound.#"])).await;
    let _relay = env.start_relay();
    let ids = env
        .insert(&[
            NewRow::new("nowhere-1", "k").routing_key("unbound.x"),
            NewRow::new("nowhere-2", "k").routing_key("bound.x"),
        ])
        .await;

    let failing = wait_row(&env, ids[0], "a second failed attempt", |r| r.attempts >= 2).await;
    let error = failing.last_error.clone().unwrap_or_default();
    assert!(
        error.contains("unroutable"),
        "last_error says the message was returned: {error}"
    );
    assert!(
        failing.published_at.is_none(),
        "an Ack with a returned message is not a success"
    );
    env.insert(&[NewRow::new("sentinel", "sentinel").routing_key("bound.sentinel")])
        .await;
    env.consumer.wait_for_id("sentinel").await;
    let received = env.consumer.received();
    assert!(
        delivered_of_key(&received, "k").is_empty(),
        "the routable row behind it waits: {received:#?}"
    );

    env.bind(&env.exchange, "unbound.#").await;
    let received = env.consumer.wait_for(3).await;
    assert_eq!(delivered_of_key(&received, "k"), ids);
    env.wait_all_marked().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_out_of_attempts_is_parked_holds_its_key_and_is_released_by_retry_id() {
    // The table's own retry policy overrides the global one.
    let env = TestEnv::new(Setup::new().set("outbox.retry", "max_attempts", "3")).await;
    let _relay = env.start_relay();
    let late = format!("{}_late", env.name);
    let ids = env
        .insert(&[
            NewRow::new("held-1", "held").exchange(&late),
            NewRow::new("held-2", "held"),
            NewRow::new("held-3", "held"),
        ])
        .await;

    let parked = wait_row(&env, ids[0], "the row to be parked", |r| {
        r.parked_at.is_some()
    })
    .await;
    assert_eq!(parked.attempts, 3, "parked after max_attempts: {parked:?}");
    assert!(parked.published_at.is_none());
    assert!(
        parked.last_error.as_deref().unwrap_or("").contains(&late),
        "{parked:?}"
    );

    sentinel(&env, "sentinel").await;
    assert!(
        delivered_of_key(&env.consumer.received(), "held").is_empty(),
        "hold_key holds the key back"
    );
    for id in &ids[1..] {
        let r = env.row(*id).await;
        assert!(
            r.attempts == 0 && r.published_at.is_none() && r.parked_at.is_none(),
            "{r:?}"
        );
    }
    let status = env.status_json().await;
    assert_eq!(status["parked"].as_i64(), Some(1), "{status}");
    assert_eq!(status["pending"].as_i64(), Some(2), "{status}");
    let listing = env.cli(&["status", "--parked", "10"]).await;
    let line = listing
        .stdout
        .lines()
        .find(|l| l.starts_with("parked"))
        .unwrap_or_else(|| panic!("status --parked lists the row: {}", listing.stdout));
    assert!(
        line.contains(&format!("id={}", ids[0])) && line.contains(&late),
        "{line}"
    );

    env.declare_exchange(&late).await;
    env.bind(&late, "#").await;
    let released = env.cli(&["retry", "--id", &ids[0].to_string()]).await;
    assert_eq!(released.code, 0, "{released:?}");
    assert!(
        released.stdout.contains("released 1"),
        "{}",
        released.stdout
    );

    let received = env.consumer.wait_for(4).await;
    assert_eq!(
        delivered_of_key(&received, "held"),
        ids,
        "released rows arrive in order"
    );
    env.wait_all_marked().await;
    let status = env.status_json().await;
    assert_eq!(
        (status["parked"].as_i64(), status["published"].as_i64()),
        (Some(0), Some(4)),
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_on_exhausted_skip_later_rows_of_a_parked_key_go_on() {
    let env = TestEnv::new(Setup::new().set("retry", "max_attempts", "2").set(
        "retry",
        "on_exhausted",
        "\"skip\"",
    ))
    .await;
    let _relay = env.start_relay();
    let late = format!("{}_late", env.name);
    let ids = env
        .insert(&[
            NewRow::new("skip-1", "skip").exchange(&late),
            NewRow::new("skip-2", "skip"),
            NewRow::new("skip-3", "skip"),
            // Unpublishable: parked at once, and its key goes on in the same turn.
            NewRow::new("bad-1", "bad").headers(serde_json::json!([1])),
            NewRow::new("bad-2", "bad"),
        ])
        .await;

    let received = env.consumer.wait_for(3).await;
    assert_eq!(
        delivered_of_key(&received, "skip"),
        ids[1..3],
        "the key goes on without the parked row"
    );
    assert_eq!(delivered_of_key(&received, "bad"), ids[4..]);
    // Recorded when the relay's turn ends, perhaps after bad-2 arrived.
    wait_row(&env, ids[3], "bad-1 to be parked", |r| {
        r.parked_at.is_some()
    })
    .await;
    let parked = env.row(ids[0]).await;
    assert!(
        parked.parked_at.is_some() && parked.attempts == 2,
        "parked before the key went on: {parked:?}"
    );
    assert!(parked.published_at.is_none());

    env.declare_exchange(&late).await;
    env.bind(&late, "#").await;
    let released = env.cli(&["retry", "--key", "skip"]).await;
    assert!(released.stdout.contains("released 1"), "{released:?}");
    let received = env.consumer.wait_for(4).await;
    assert_eq!(received.last().unwrap().message_id, "skip-1");
    eventually("skip-1 to be marked", || async {
        env.row(ids[0]).await.published_at.is_some()
    })
    .await;
    assert_eq!(
        env.unpublished_count().await,
        1,
        "only the unpublishable row is left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_releases_parked_rows_by_id_by_key_and_all_in_order() {
    let env = TestEnv::new(Setup::new().set("retry", "max_attempts", "1")).await;
    let _relay = env.start_relay();
    let late = format!("{}_late", env.name);
    let mut rows = Vec::new();
    for key in ["a", "b", "c"] {
        rows.push(NewRow::new(format!("{key}-1"), key).exchange(&late));
        rows.push(NewRow::new(format!("{key}-2"), key));
        rows.push(NewRow::new(format!("{key}-3"), key));
    }
    let ids = env.insert(&rows).await;
    for i in [0, 3, 6] {
        wait_row(&env, ids[i], "the key's first row to be parked", |r| {
            r.parked_at.is_some()
        })
        .await;
    }
    assert_eq!(env.status_json().await["parked"].as_i64(), Some(3));
    env.declare_exchange(&late).await;
    env.bind(&late, "#").await;

    let out = env.cli(&["retry", "--id", &ids[0].to_string()]).await;
    assert!(
        out.code == 0
            && out.stdout.contains(&format!(
                "public.outbox: released 1 parked row(s): id {}",
                ids[0]
            )),
        "{out:?}"
    );
    env.consumer.wait_for(3).await;
    sentinel(&env, "after-id").await;
    let received = env.consumer.received();
    assert_eq!(delivered_of_key(&received, "a"), ids[0..3]);
    assert!(
        delivered_of_key(&received, "b").is_empty() && delivered_of_key(&received, "c").is_empty()
    );

    let out = env.cli(&["retry", "--key", "b"]).await;
    assert!(
        out.code == 0 && out.stdout.contains("released 1"),
        "{out:?}"
    );
    env.consumer.wait_for(7).await;
    sentinel(&env, "after-key").await;
    let received = env.consumer.received();
    assert_eq!(delivered_of_key(&received, "b"), ids[3..6]);
    assert!(delivered_of_key(&received, "c").is_empty());

    let out = env.cli(&["retry", "--all"]).await;
    assert!(
        out.code == 0 && out.stdout.contains("released 1"),
        "{out:?}"
    );
    let received = env.consumer.wait_for(11).await;
    assert_eq!(delivered_of_key(&received, "c"), ids[6..9]);
    assert_first_deliveries_in_id_order(&received);

    // --table only narrows a selection; on its own it must not release everything.
    let unselected = env.cli(&["retry", "--table", "public.outbox"]).await;
    assert_eq!(
        unselected.code, 2,
        "retry needs --id, --key or --all: {unselected:?}"
    );

    // Nothing parked: said, and exit 1.
    let nothing = env.cli(&["retry", "--all"]).await;
    assert!(
        nothing.code == 1
            && nothing
                .stderr
                .contains("public.outbox: no parked row to release"),
        "{nothing:?}"
    );
    env.wait_all_marked().await;
    let published = env.cli(&["retry", "--id", &ids[0].to_string()]).await;
    assert!(
        published.code == 1
            && published.stderr.contains(&format!(
                "public.outbox: no parked row with id {} to release: it was already published at ",
                ids[0]
            )),
        "{published:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchange_deleted_while_the_relay_runs_makes_its_rows_retry_until_it_returns() {
    let env = TestEnv::new(Setup::new()).await;
    let side = format!("{}_side", env.name);
    env.declare_exchange(&side).await;
    env.bind(&side, "#").await;
    let _relay = env.start_relay();
    env.insert(&[NewRow::new("side-1", "k").exchange(&side)])
        .await;
    env.consumer.wait_for_id("side-1").await;

    env.delete_exchange(&side).await;
    let ids = env
        .insert(&[
            NewRow::new("side-2", "k").exchange(&side),
            NewRow::new("main-2", "k"),
        ])
        .await;
    let failing = wait_row(&env, ids[0], "a failed attempt", |r| r.attempts >= 1).await;
    assert!(
        failing.last_error.as_deref().unwrap_or("").contains(&side),
        "{failing:?}"
    );
    assert!(failing.published_at.is_none());
    sentinel(&env, "sentinel").await;
    assert_eq!(
        delivered_of_key(&env.consumer.received(), "k").len(),
        1,
        "the key waits"
    );

    env.declare_exchange(&side).await;
    env.bind(&side, "#").await;
    let received = env.consumer.wait_for(4).await;
    assert_eq!(delivered_of_key(&received, "k")[1..], ids);
    env.wait_all_marked().await;
}
