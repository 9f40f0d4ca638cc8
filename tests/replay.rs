//! `outbox-relay replay`: a range of published rows (by id, by time, of one key) goes out again
//! in id order with the original message_id and properties plus `x-outbox-replay`; a dry run
//! counts and publishes nothing; a range reaching rows no longer retained is refused; and the
//! rows' state never changes, also while the relay publishes new rows of the same keys.

use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use outbox_relay_testkit::prelude::*;
use serde_json::json;

const REPLAY_HEADER: &str = "x-outbox-replay";

fn is_replay(m: &Received) -> bool {
    m.headers.contains_key(REPLAY_HEADER)
}

/// The replayed messages received so far, in arrival order.
fn replays(env: &TestEnv) -> Vec<Received> {
    env.consumer
        .received()
        .into_iter()
        .filter(is_replay)
        .collect()
}

/// The relay's own deliveries received so far (no replay header), in arrival order.
fn originals(env: &TestEnv) -> Vec<Received> {
    env.consumer
        .received()
        .into_iter()
        .filter(|m| !is_replay(m))
        .collect()
}

/// Waits until the queue is settled with `n` replayed messages received; returns them.
async fn wait_for_replays(env: &TestEnv, n: usize) -> Vec<Received> {
    eventually(&format!("{n} replayed messages"), || async {
        replays(env).len() >= n
    })
    .await;
    env.wait_until_queue_is_settled().await;
    replays(env)
}

/// Inserts `rows` (one transaction), waits until the running relay delivered and marked them.
async fn published(env: &TestEnv, rows: &[NewRow]) -> Vec<i64> {
    let ids = env.insert(rows).await;
    for row in rows {
        env.consumer.wait_for_id(&row.dedup_key).await;
    }
    env.wait_all_marked().await;
    ids
}

fn ids_of(messages: &[Received]) -> Vec<i64> {
    messages.iter().map(Received::outbox_id).collect()
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

async fn states(env: &TestEnv, ids: &[i64]) -> Vec<RowState> {
    let mut states = Vec::new();
    for id in ids {
        states.push(env.row(*id).await);
    }
    states
}

/// Asserts that replaying did not touch the rows: published_at, parked_at and attempts as before.
async fn assert_unchanged(env: &TestEnv, before: &[RowState]) {
    let after = states(env, &before.iter().map(|r| r.id).collect::<Vec<_>>()).await;
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(
            (b.published_at, b.parked_at, b.attempts),
            (a.published_at, a.parked_at, a.attempts),
            "row {} changed: {b:?} -> {a:?}",
            b.id
        );
    }
}

fn s(id: i64) -> String {
    id.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_of_ids_is_replayed_in_id_order_with_the_original_message_id_properties_and_the_header(
) {
    let env = TestEnv::new(Setup::new()).await;
    let _relay = env.start_relay();
    let rows: Vec<NewRow> = (0..10)
        .map(|i| {
            NewRow::new(format!("range-{i}"), format!("k{}", i % 2))
                .event_type(&format!("Event{i}"))
                .headers(json!({"tenant": "acme", "n": i}))
                .payload(json!({"i": i, "text": "Ærø ✓"}))
        })
        .collect();
    let ids = published(&env, &rows).await;
    let before = states(&env, &ids).await;

    let out = env
        .cli(&[
            "replay",
            "--table",
            "public.outbox",
            "--from-id",
            &s(ids[2]),
            "--to-id",
            &s(ids[7]),
        ])
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout
            .contains(&format!("replayed 6 row(s), ids {} to {}", ids[2], ids[7])),
        "{out:?}"
    );

    let replayed = wait_for_replays(&env, 6).await;
    assert_eq!(ids_of(&replayed), ids[2..8], "in id order, only the range");
    let first_time = originals(&env);
    assert_eq!(first_time.len(), 10, "the relay sent nothing more");
    let mut replay_values = std::collections::HashSet::new();
    for r in &replayed {
        let original = first_time
            .iter()
            .find(|o| o.outbox_id() == r.outbox_id())
            .expect("the original delivery");
        assert_eq!(r.message_id, original.message_id);
        assert_eq!(
            (&r.kind, &r.content_type, r.delivery_mode, r.timestamp),
            (
                &original.kind,
                &original.content_type,
                original.delivery_mode,
                original.timestamp
            )
        );
        assert_eq!(
            (&r.exchange, &r.routing_key, &r.body),
            (&original.exchange, &original.routing_key, &original.body)
        );
        let mut headers = r.headers.clone();
        let value = r.header_str(REPLAY_HEADER).expect("a text header");
        headers.remove(REPLAY_HEADER);
        assert_eq!(
            headers, original.headers,
            "every other header as the first time"
        );
        DateTime::parse_from_rfc3339(&value)
            .unwrap_or_else(|e| panic!("{REPLAY_HEADER} is the replay's start time: {value}: {e}"));
        replay_values.insert(value);
    }
    assert_eq!(replay_values.len(), 1, "one value for one replay");
    assert_unchanged(&env, &before).await;
    let status = env.status_json().await;
    assert_eq!(
        (status["published"].as_i64(), status["pending"].as_i64()),
        (Some(10), Some(0)),
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_of_a_key_sends_only_that_keys_rows_in_id_order() {
    let env = TestEnv::new(Setup::new()).await;
    let _relay = env.start_relay();
    let ids = published(&env, &rows_over_keys("key", 3, 15)).await;
    let of_k1: Vec<i64> = ids.iter().skip(1).step_by(3).copied().collect();

    let out = env
        .cli(&[
            "replay",
            "--table",
            "public.outbox",
            "--from-id",
            &s(ids[0]),
            "--key",
            "key-k1",
        ])
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("replayed 5 row(s)"), "{out:?}");

    let replayed = wait_for_replays(&env, 5).await;
    assert!(replayed.iter().all(|m| m.ordering_key() == "key-k1"));
    assert_eq!(ids_of(&replayed), of_k1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_time_range_takes_the_rows_created_in_it_and_may_be_narrowed_to_a_key() {
    let env = TestEnv::new(Setup::new()).await;
    let _relay = env.start_relay();
    // Three transactions, so three creation times.
    published(&env, &rows_over_keys("early", 2, 4)).await;
    let middle = published(&env, &rows_over_keys("middle", 2, 6)).await;
    let late = published(&env, &rows_over_keys("late", 2, 4)).await;
    let since = rfc3339(env.row(middle[0]).await.created_at);
    let until = rfc3339(env.row(late[0]).await.created_at);

    let out = env
        .cli(&[
            "replay", "--table", "outbox", "--since", &since, "--until", &until,
        ])
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    let replayed = wait_for_replays(&env, 6).await;
    assert_eq!(ids_of(&replayed), middle);

    let out = env
        .cli(&[
            "replay",
            "--table",
            "outbox",
            "--since",
            &since,
            "--until",
            &until,
            "--key",
            "middle-k0",
        ])
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    let replayed = wait_for_replays(&env, 9).await;
    assert_eq!(ids_of(&replayed[6..]), [middle[0], middle[2], middle[4]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_counts_without_rabbitmq_and_rows_not_yet_published_are_skipped() {
    let env = TestEnv::new(Setup::new()).await;
    let mut relay = env.start_relay();
    let ids = published(&env, &rows_over_keys("dry", 2, 8)).await;
    relay.sigterm();
    assert_eq!(relay.wait_exit().await.code(), Some(0));
    let pending = env.insert(&rows_over_keys("pending", 2, 2)).await;

    // A config whose broker is unreachable: a dry run does not need one.
    let unreachable = env.dir.join("no-broker.toml");
    let config = std::fs::read_to_string(&env.config_path).unwrap();
    assert!(config.contains(&env.amqp_url));
    std::fs::write(
        &unreachable,
        config.replace(&env.amqp_url, "amqp://guest:guest@127.0.0.1:1/%2f"),
    )
    .unwrap();
    let from = s(ids[0]);
    let dry = run_cli(
        &unreachable,
        &[
            "replay",
            "--table",
            "outbox",
            "--from-id",
            &from,
            "--dry-run",
        ],
    )
    .await;
    assert_eq!(dry.code, 0, "{dry:?}");
    assert_eq!(
        dry.stdout.trim(),
        format!(
            "public.outbox: 8 row(s) to replay, ids {} to {}; skipped 2 row(s) of the range \
             not yet published (dry run: nothing published)",
            ids[0], ids[7]
        ),
        "{dry:?}"
    );

    let out = env
        .cli(&["replay", "--table", "outbox", "--from-id", &from])
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains("replayed 8 row(s)") && out.stdout.contains("skipped 2 row(s)"),
        "{out:?}"
    );
    let replayed = wait_for_replays(&env, 8).await;
    assert_eq!(
        ids_of(&replayed),
        ids,
        "the dry run published nothing, the pending rows are not replayed"
    );
    assert_eq!(env.unpublished_count().await, 2);
    for id in pending {
        assert!(env.row(id).await.published_at.is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_reaching_rows_the_retention_sweeper_deleted_is_refused_naming_the_oldest_retained_row(
) {
    let env = TestEnv::new(Setup::new().set("outbox", "retention", "\"1m\"")).await;
    // History published two minutes ago, before the relay starts: its sweeper deletes it.
    let gone = env.insert(&rows_over_keys("gone", 2, 4)).await;
    sqlx::query(
        "UPDATE public.outbox SET published_at = now() - interval '2 minutes', \
                created_at = now() - interval '2 minutes' WHERE id = ANY($1)",
    )
    .bind(&gone)
    .execute(&env.pool)
    .await
    .unwrap();
    let gone_created = rfc3339(env.row(gone[0]).await.created_at);
    let relay = env.start_relay();
    relay
        .wait_for_log("deleted published rows older than the retention")
        .await;
    let kept = published(&env, &rows_over_keys("kept", 2, 6)).await;
    let kept_created = rfc3339(env.row(kept[0]).await.created_at);
    assert!(env.published_ids().await.iter().all(|id| kept.contains(id)));

    let by_id = env
        .cli(&["replay", "--table", "outbox", "--from-id", &s(gone[0])])
        .await;
    assert_eq!(by_id.code, 1, "{by_id:?}");
    assert!(
        by_id.stderr.contains("no longer retained")
            && by_id
                .stderr
                .contains("the retention sweeper deleted 4 published row(s)")
            && by_id.stderr.contains(&format!(
                "the oldest published row still there is id {}",
                kept[0]
            ))
            && by_id.stderr.contains(&format!("--from-id {}", kept[0]))
            && by_id.stderr.contains(&format!("--since {kept_created}")),
        "{by_id:?}"
    );
    let dry = env
        .cli(&[
            "replay",
            "--table",
            "outbox",
            "--from-id",
            &s(gone[0]),
            "--dry-run",
        ])
        .await;
    assert_eq!(dry.code, 1, "a dry run is refused too: {dry:?}");
    let by_time = env
        .cli(&["replay", "--table", "outbox", "--since", &gone_created])
        .await;
    assert_eq!(by_time.code, 1, "{by_time:?}");
    assert!(
        by_time.stderr.contains(&format!("since {gone_created}")),
        "{by_time:?}"
    );

    let narrowed = env
        .cli(&["replay", "--table", "outbox", "--from-id", &s(kept[0])])
        .await;
    assert_eq!(narrowed.code, 0, "{narrowed:?}");
    let replayed = wait_for_replays(&env, 6).await;
    assert_eq!(
        ids_of(&replayed),
        kept,
        "the refused runs published nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_that_never_deleted_a_row_replays_from_id_1_and_takes_dates_without_a_zone_as_utc()
{
    let env = TestEnv::new(Setup::new()).await;
    let _relay = env.start_relay();
    let ids = published(&env, &rows_over_keys("all", 2, 6)).await;
    assert!(ids[0] > 1, "ids start above 1: {ids:?}");
    let pending = env
        .insert(&[NewRow::new("late", "k").exchange("nowhere")])
        .await;

    let dry = env
        .cli(&["replay", "--table", "outbox", "--from-id", "1", "--dry-run"])
        .await;
    assert_eq!(dry.code, 0, "sparse ids are not deleted rows: {dry:?}");
    assert!(
        dry.stdout.starts_with(&format!(
            "public.outbox: 6 row(s) to replay, ids {} to {}",
            ids[0], ids[5]
        )),
        "{dry:?}"
    );

    // A bare date and a date and time without a zone are UTC: the rows were created today
    // (UTC), so today's midnight takes them all and tomorrow's none.
    let today = Utc::now().date_naive();
    let tomorrow = today.succ_opt().unwrap();
    let created = env.row(ids[0]).await.created_at;
    let since_date = env
        .cli(&[
            "replay",
            "--table",
            "outbox",
            "--since",
            &today.to_string(),
            "--dry-run",
        ])
        .await;
    assert_eq!(since_date.code, 0, "{since_date:?}");
    assert!(
        since_date.stdout.contains("6 row(s) to replay"),
        "{since_date:?}"
    );
    let until_date = env
        .cli(&[
            "replay",
            "--table",
            "outbox",
            "--from-id",
            "1",
            "--until",
            &today.to_string(),
            "--dry-run",
        ])
        .await;
    assert!(
        until_date.code == 0 && until_date.stdout.contains("0 row(s) to replay"),
        "{until_date:?}"
    );
    let minute = created.format("%Y-%m-%d %H:%M").to_string();
    let next_minute = (created + chrono::Duration::minutes(1))
        .format("%Y-%m-%dT%H:%M:00")
        .to_string();
    let in_utc = env
        .cli(&[
            "replay",
            "--table",
            "outbox",
            "--since",
            &minute,
            "--until",
            &format!("{tomorrow}"),
            "--dry-run",
        ])
        .await;
    assert!(
        in_utc.code == 0 && in_utc.stdout.contains("6 row(s) to replay"),
        "{minute} read as UTC: {in_utc:?}"
    );
    let after = env
        .cli(&[
            "replay",
            "--table",
            "outbox",
            "--since",
            &next_minute,
            "--dry-run",
        ])
        .await;
    assert!(
        after.code == 0 && after.stdout.contains("0 row(s) to replay"),
        "{next_minute} is after the rows' creation: {after:?}"
    );
    let bad = env
        .cli(&["replay", "--table", "outbox", "--since", "07.12.2026"])
        .await;
    assert_eq!(bad.code, 2, "{bad:?}");
    assert!(bad.stderr.contains("UTC"), "{bad:?}");

    let out = env
        .cli(&["replay", "--table", "outbox", "--from-id", "1"])
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(ids_of(&wait_for_replays(&env, 6).await), ids);
    assert!(env.row(pending[0]).await.published_at.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replay_of_a_table_in_delete_mode_is_refused() {
    let env = TestEnv::new(Setup::new().set("outbox", "on_published", "\"delete\"")).await;
    let _relay = env.start_relay();
    env.insert(&rows_over_keys("d", 2, 2)).await;
    env.consumer.wait_for(2).await;
    let out = env
        .cli(&["replay", "--table", "outbox", "--from-id", "1", "--dry-run"])
        .await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("keeps no published row to replay")
            && out.stderr.contains("on_published = \"delete\""),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_beside_the_running_relay_changes_no_row_and_leaves_the_live_order_alone() {
    let env = TestEnv::new(Setup::new()).await;
    let _relay = env.start_relay();
    // Old rows on the keys the producer writes to now.
    let old_rows: Vec<NewRow> = (0..30)
        .map(|i| NewRow::new(format!("old-{i}"), format!("live-k{}", i % 3)))
        .collect();
    let old = published(&env, &old_rows).await;
    let before = states(&env, &old).await;

    let producer = Producer::start(&env, "live", 3, 3, Duration::from_millis(20));
    env.consumer.wait_for_id("live-5").await;
    let out = env
        .cli(&[
            "replay",
            "--table",
            "outbox",
            "--from-id",
            &s(old[0]),
            "--to-id",
            &s(old[29]),
            "--rate",
            "100",
        ])
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    let during = env.consumer.unique_count();
    eventually("more live rows after the replay", || async {
        env.consumer.unique_count() > during + 6
    })
    .await;
    let written = producer.stop().await;
    env.wait_all_marked().await;
    env.consumer.wait_for(30 + written).await;
    let replayed = wait_for_replays(&env, 30).await;

    assert_eq!(ids_of(&replayed), old, "the replay in id order");
    assert_unchanged(&env, &before).await;
    let live: Vec<Received> = originals(&env)
        .into_iter()
        .filter(|m| m.message_id.starts_with("live-"))
        .collect();
    assert_eq!(first_deliveries(&live).len(), written);
    assert_first_deliveries_in_id_order(&live);
    let status = env.status_json().await;
    assert_eq!(
        status["published"].as_i64(),
        Some(30 + written as i64),
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_keeps_to_its_rate_and_reports_progress_on_a_long_run() {
    let env = TestEnv::new(Setup::new()).await;
    let _relay = env.start_relay();
    let ids = published(&env, &rows_over_keys("paced", 3, 12)).await;

    let started = Instant::now();
    let out = env
        .cli(&[
            "replay",
            "--table",
            "outbox",
            "--from-id",
            &s(ids[0]),
            "--rate",
            "4",
        ])
        .await;
    let took = started.elapsed();
    assert_eq!(out.code, 0, "{out:?}");
    // 12 messages at 4/s: the first at once, then one every 250 ms.
    assert!(took >= Duration::from_millis(2700), "took {took:?}");
    assert!(
        out.stderr.contains("replay public.outbox: replayed ")
            && out.stderr.contains(" of 12 rows"),
        "a progress line: {out:?}"
    );
    wait_for_replays(&env, 12).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_destination_can_be_overridden_and_an_unroutable_replay_stops_at_its_first_row() {
    let env = TestEnv::new(Setup::new()).await;
    let _relay = env.start_relay();
    let ids = published(&env, &rows_over_keys("dest", 2, 4)).await;
    let before = states(&env, &ids).await;
    let side = format!("{}_side", env.name);
    env.declare_exchange(&side).await;
    env.bind(&side, "replayed.#").await;

    let out = env
        .cli(&[
            "replay",
            "--table",
            "outbox",
            "--from-id",
            &s(ids[0]),
            "--exchange",
            &side,
            "--routing-key",
            "replayed.all",
        ])
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    let replayed = wait_for_replays(&env, 4).await;
    assert_eq!(ids_of(&replayed), ids);
    assert!(
        replayed
            .iter()
            .all(|m| m.exchange == side && m.routing_key == "replayed.all"),
        "{replayed:#?}"
    );

    let nowhere = env
        .cli(&[
            "replay",
            "--table",
            "outbox",
            "--from-id",
            &s(ids[0]),
            "--exchange",
            &side,
        ])
        .await;
    assert_eq!(nowhere.code, 1, "{nowhere:?}");
    assert!(
        nowhere
            .stderr
            .contains(&format!("stopped at row {}", ids[0]))
            && nowhere.stderr.contains("unroutable")
            && nowhere.stderr.contains(&format!("--from-id {}", ids[0])),
        "{nowhere:?}"
    );
    let missing = env
        .cli(&[
            "replay",
            "--table",
            "outbox",
            "--from-id",
            &s(ids[0]),
            "--exchange",
            &format!("{}_missing", env.name),
        ])
        .await;
    assert_eq!(missing.code, 1, "{missing:?}");
    assert!(missing.stderr.contains("does not exist"), "{missing:?}");
    assert_unchanged(&env, &before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_not_configured_is_a_config_error_and_contradicting_bounds_a_usage_error() {
    let env = TestEnv::new(Setup::new()).await;
    let unknown = env
        .cli(&["replay", "--table", "public.other", "--from-id", "1"])
        .await;
    assert_eq!(unknown.code, 78, "{unknown:?}");
    assert!(
        unknown.stderr.contains("--table public.other")
            && unknown.stderr.contains("configured: public.outbox"),
        "{unknown:?}"
    );
    let backwards = env
        .cli(&[
            "replay",
            "--table",
            "outbox",
            "--from-id",
            "9",
            "--to-id",
            "5",
        ])
        .await;
    assert_eq!(backwards.code, 2, "{backwards:?}");
    let no_start = env
        .cli(&["replay", "--table", "outbox", "--to-id", "5"])
        .await;
    assert_eq!(no_start.code, 2, "{no_start:?}");
    assert!(no_start.stderr.contains("--from-id"), "{no_start:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_replay_says_where_to_resume_and_the_resumed_one_sends_the_rest_in_order() {
    let env = TestEnv::new(Setup::new()).await;
    let _relay = env.start_relay();
    let ids = published(&env, &rows_over_keys("resume", 2, 12)).await;

    let (replay, pid) = slow_replay_under_way(&env, ids[0]).await;
    assert!(
        outbox_relay_testkit::faults::signal("-INT", pid),
        "kill -INT {pid}"
    );
    let out = tokio::time::timeout(TIMEOUT, replay.wait_with_output())
        .await
        .expect("the replay exits after SIGINT")
        .expect("the replay's output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    env.wait_until_queue_is_settled().await;
    let first = replays(&env);
    let done = first.len();
    assert!(done < 12, "interrupted before the end: {stderr}");
    assert_eq!(
        ids_of(&first),
        ids[..done],
        "a prefix of the range, in order"
    );
    let resume = ids[done - 1] + 1;
    assert!(
        stderr.contains(&format!("interrupted after {done} of 12 row(s)"))
            && stderr.contains(&format!("resume with --from-id {resume}")),
        "{stderr}"
    );

    let rest = env
        .cli(&["replay", "--table", "outbox", "--from-id", &s(resume)])
        .await;
    assert_eq!(rest.code, 0, "{rest:?}");
    let all = wait_for_replays(&env, 12).await;
    assert_eq!(
        ids_of(&all),
        ids,
        "the two runs together: the range once, in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_during_a_replay_is_logged_and_ignored_and_the_replay_sends_the_whole_range() {
    let env = TestEnv::new(Setup::new()).await;
    let _relay = env.start_relay();
    let ids = published(&env, &rows_over_keys("hup", 2, 12)).await;

    let (replay, pid) = slow_replay_under_way(&env, ids[0]).await;
    for _ in 0..2 {
        assert!(
            outbox_relay_testkit::faults::signal("-HUP", pid),
            "kill -HUP {pid}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = tokio::time::timeout(TIMEOUT, replay.wait_with_output())
        .await
        .expect("the replay ends")
        .expect("the replay's output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{} {stderr}", out.status);
    assert_eq!(
        stderr.matches("SIGHUP ignored").count(),
        2,
        "one line per SIGHUP: {stderr}"
    );
    let all = wait_for_replays(&env, 12).await;
    assert_eq!(ids_of(&all), ids, "the whole range once, in order");
}

/// `outbox-relay replay --from-id from --rate 5` (5 messages a second: slow enough to
/// interrupt), its output piped, once a few of its messages arrived: the child and its pid.
async fn slow_replay_under_way(env: &TestEnv, from: i64) -> (tokio::process::Child, i32) {
    let replay = tokio::process::Command::new(relay_binary())
        .arg("--config")
        .arg(&env.config_path)
        .args([
            "replay",
            "--table",
            "outbox",
            "--from-id",
            &s(from),
            "--rate",
            "5",
        ])
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start outbox-relay replay");
    eventually("a few replayed messages", || async {
        replays(env).len() >= 3
    })
    .await;
    let pid = replay.id().expect("the replay's pid") as i32;
    (replay, pid)
}
