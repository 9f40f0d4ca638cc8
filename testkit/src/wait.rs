//! Waiting for an event instead of sleeping: poll what a user would look at until it holds,
//! and fail naming what never happened.

use std::future::Future;
use std::time::{Duration, Instant};

/// How long any wait in the tests may take before it counts as a failure.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// Polls `check` every 50 ms until it returns true; panics after [`TIMEOUT`] naming `what`.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {TIMEOUT:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
