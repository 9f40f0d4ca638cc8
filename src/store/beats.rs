//! The process's heartbeat rounds: the members of all its tables renew their leases together,
//! in one statement per round ([`super::leases::renew_all`]), so a relay of 200 tables renews
//! with one statement per heartbeat, not 200. Rounds fall on a fixed grid (every `period`
//! since the process started); a member waits for the next round after each heartbeat, so
//! renewals arrive together and are gathered for a moment ([`GATHER`]) before the statement.
//! Owns the gathering only: each member still decides what its answer means.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::leases::{bounded, renew_all, Heartbeat, Renewal};
use super::{DbError, Store};

/// How long a round waits, after the first renewal, for the others: timers set for the same
/// instant fire within a few milliseconds of each other.
const GATHER: Duration = Duration::from_millis(20);

/// A handle on the rounds; cloned into every table's leases. The rounds end when the last
/// handle is dropped.
#[derive(Clone)]
pub struct Beats {
    requests: mpsc::UnboundedSender<Request>,
    /// The grid: rounds at `start + k * period`.
    start: Instant,
    period: Duration,
}

struct Request {
    renewal: Renewal,
    answer: oneshot::Sender<Result<Heartbeat, DbError>>,
}

impl Beats {
    /// Starts the rounds on `store` (following the primary as the relay does), one per
    /// `period` (the heartbeat).
    pub fn start(store: Store, period: Duration) -> Beats {
        let (requests, queue) = mpsc::unbounded_channel();
        tokio::spawn(gather(store, queue));
        Beats {
            requests,
            start: Instant::now(),
            period,
        }
    }

    /// Renews one member in the current round; answers what its heartbeat found. Fails as
    /// unavailable when the statement does (all members of the round alike).
    pub async fn renew(&self, renewal: Renewal) -> Result<Heartbeat, DbError> {
        let (answer, answered) = oneshot::channel();
        let gone = || DbError::Unavailable("the heartbeat rounds have stopped".into());
        self.requests
            .send(Request { renewal, answer })
            .map_err(|_| gone())?;
        answered.await.map_err(|_| gone())?
    }

    /// How long until the next round.
    pub fn until_next_round(&self) -> Duration {
        let into = Instant::now().duration_since(self.start).as_nanos() % self.period.as_nanos();
        self.period - Duration::from_nanos(into as u64)
    }
}

/// Gathers the renewals that arrive together and answers each from one statement.
async fn gather(store: Store, mut queue: mpsc::UnboundedReceiver<Request>) {
    while let Some(first) = queue.recv().await {
        let mut round = vec![first];
        let until = Instant::now() + GATHER;
        while let Ok(Some(next)) = tokio::time::timeout_at(until, queue.recv()).await {
            round.push(next);
        }
        let renewals: Vec<Renewal> = round.iter().map(|r| r.renewal.clone()).collect();
        let found = bounded(&store, renew_all(store.pool(), &renewals)).await;
        match found {
            Ok(found) => {
                for (request, heartbeat) in round.into_iter().zip(found) {
                    let _ = request.answer.send(Ok(heartbeat));
                }
            }
            Err(e) => {
                for request in round {
                    let _ = request.answer.send(Err(e.clone()));
                }
            }
        }
    }
}
