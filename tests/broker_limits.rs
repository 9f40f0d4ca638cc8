//! Limits of the broker the relay only learns by being refused: a payload larger than RabbitMQ's
//! `max_message_size`. The limit is lowered for the test with `rabbitmqctl eval` — a change to
//! the whole broker, so it is made only while holding `/tmp/obr-server-faults.lock` exclusively,
//! and the original value is always restored (a guard, also on failure).
//!
//! Run it outside `flock -s /tmp/obr-server-faults.lock` (it takes the lock exclusively itself).

use std::fs::File;
use std::process::Command;
use std::time::{Duration, Instant};

use outbox_relay_testkit::prelude::{eventually, rows_over_keys, NewRow, Setup, TestEnv};
use serde_json::json;

const LOCK_PATH: &str = "/tmp/obr-server-faults.lock";
const LOWERED_LIMIT: usize = 4096;

/// `/tmp/obr-server-faults.lock` held exclusively until dropped.
struct ExclusiveServerLock {
    _file: File,
}

impl ExclusiveServerLock {
    async fn acquire() -> ExclusiveServerLock {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_PATH)
            .expect("open the server-fault lock file");
        let deadline = Instant::now() + Duration::from_secs(300);
        while file.try_lock().is_err() {
            assert!(
                Instant::now() < deadline,
                "could not take {LOCK_PATH} exclusively within 5 minutes \
                 (is this test running under `flock -s`? it takes the lock itself)"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        ExclusiveServerLock { _file: file }
    }
}

fn rabbitmq_eval(expression: &str) -> String {
    let out = Command::new("rabbitmqctl")
        .args(["eval", expression])
        .output()
        .expect("run rabbitmqctl eval");
    assert!(
        out.status.success(),
        "rabbitmqctl eval {expression} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The broker's `max_message_size` lowered; the value read before is restored when dropped.
struct LoweredMaxMessageSize {
    /// `None` when the setting was not set (the broker's built-in default applied).
    original: Option<u64>,
}

impl LoweredMaxMessageSize {
    fn to(limit: usize) -> LoweredMaxMessageSize {
        let current = rabbitmq_eval("application:get_env(rabbit, max_message_size).");
        let original = match current.as_str() {
            "undefined" => None,
            text => Some(
                text.trim_start_matches("{ok,")
                    .trim_end_matches('}')
                    .parse::<u64>()
                    .unwrap_or_else(|_| panic!("unexpected max_message_size {text:?}")),
            ),
        };
        let guard = LoweredMaxMessageSize { original };
        rabbitmq_eval(&format!(
            "application:set_env(rabbit, max_message_size, {limit})."
        ));
        guard
    }
}

impl Drop for LoweredMaxMessageSize {
    fn drop(&mut self) {
        let restore = match self.original {
            Some(v) => format!("application:set_env(rabbit, max_message_size, {v})."),
            None => "application:unset_env(rabbit, max_message_size).".to_owned(),
        };
        let restored = Command::new("rabbitmqctl")
            .args(["eval", &restore])
            .status();
        if !matches!(restored, Ok(s) if s.success()) {
            eprintln!(
                "COULD NOT RESTORE the broker's max_message_size: run rabbitmqctl eval '{restore}'"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_larger_than_the_brokers_max_message_size_is_parked_with_a_clear_error_and_other_keys_keep_flowing(
) {
    let _lock = ExclusiveServerLock::acquire().await;
    // Lowered before the relay connects: a channel reads the limit when it opens.
    let _limit = LoweredMaxMessageSize::to(LOWERED_LIMIT);
    let env = TestEnv::new(Setup::new()).await;
    let relay = env.start_relay();
    env.insert(&rows_over_keys("before", 3, 6)).await;
    env.consumer.wait_for(6).await;

    // The relay's own limit (128 MiB by default) lets it try; the broker refuses.
    let big = NewRow::new("big-1", "big").payload(json!({ "blob": "x".repeat(3 * LOWERED_LIMIT) }));
    let big_id = env.insert(&[big]).await[0];
    env.insert(&rows_over_keys("after", 3, 6)).await;

    eventually("the oversized row to be parked", || async {
        env.row(big_id).await.parked_at.is_some()
    })
    .await;
    let row = env.row(big_id).await;
    let error = row.last_error.clone().unwrap_or_default();
    assert!(
        error.contains(&LOWERED_LIMIT.to_string()) && error.contains("bytes"),
        "last_error does not say the payload is larger than the broker's limit: {error:?}\n{}",
        relay.log()
    );
    let received = env.consumer.wait_for(12).await;
    wait_all_published_but(&env, big_id).await;
    assert!(
        received.iter().all(|r| r.message_id != "big-1"),
        "the oversized message was delivered"
    );
    let status = env.cli(&["status", "--parked", "5"]).await;
    assert!(
        status.stdout.contains("big-1") && status.stdout.contains(&LOWERED_LIMIT.to_string()),
        "status --parked does not show the parked row and why: {status:?}"
    );
}

/// Waits until every row except `id` is marked published.
async fn wait_all_published_but(env: &TestEnv, id: i64) {
    eventually("every other row to be marked published", || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM public.outbox WHERE published_at IS NULL AND id <> $1",
        )
        .bind(id)
        .fetch_one(&env.pool)
        .await
        .expect("count unpublished rows")
            == 0
    })
    .await;
}
