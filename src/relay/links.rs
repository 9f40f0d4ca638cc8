//! A table relay's links to its two servers: the table's lock (held by the process's
//! coordination session) and the table's channel on the process's broker connection.
//! Invariant: rows are published only under a guard that [`Links::ensure`] returned in this
//! turn; when the guard's session or the channel changed since the last turn, `ensure` says
//! so (`fresh`), and nothing the relay held in memory for the old ones may be sent or settled.
//! Also how often the links are tried again ([`Outage`]): a recovery counts only once it lasted.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::ExchangeDeclaration;
use crate::publisher::{Broker, PublishError, Publisher};
use crate::store::{DbError, LockGuard, LockState, TableLock};

/// Why a table cannot publish this turn.
#[derive(Debug)]
pub(crate) enum Unready {
    /// The coordination session is still connecting.
    Connecting,
    /// A relay of an earlier release holds the table's lock.
    Standby,
    Database(DbError),
    Broker(PublishError),
    /// The broker blocked the connection (resource alarm).
    Blocked,
}

/// Both links up for this turn.
pub(crate) struct Ready {
    pub guard: LockGuard,
    /// The lock's session or the channel is new: forget what was in flight on the old ones.
    pub fresh: bool,
}

pub(crate) struct Links {
    pub lock: TableLock,
    guard: Option<LockGuard>,
    broker: Arc<Broker>,
    publisher: Option<Publisher>,
    declarations: Vec<(String, ExchangeDeclaration)>,
}

impl Links {
    pub fn new(
        lock: TableLock,
        broker: Arc<Broker>,
        declarations: Vec<(String, ExchangeDeclaration)>,
    ) -> Self {
        Links {
            lock,
            guard: None,
            broker,
            publisher: None,
            declarations,
        }
    }

    /// Makes sure the lock is held and the channel is open (opening it when it is not).
    pub async fn ensure(&mut self) -> Result<Ready, Unready> {
        let guard = match self.lock.state() {
            LockState::Held(guard) => guard,
            LockState::Connecting => return Err(Unready::Connecting),
            LockState::Standby => return Err(Unready::Standby),
            LockState::Down(e) => return Err(Unready::Database(e)),
        };
        let mut fresh = self.guard != Some(guard);
        self.guard = Some(guard);
        if self.publisher.as_ref().is_some_and(|p| !p.is_healthy()) {
            // Found dead between turns (closed by the broker, an operator or the network):
            // reported as an outage; the next turn opens a new channel.
            self.close_channel().await;
            return Err(Unready::Broker(PublishError::Transport(
                "the connection or channel was closed (by the broker, an operator or the network); reconnecting".into(),
            )));
        }
        if self.publisher.is_none() {
            fresh = true;
            self.publisher = Some(
                self.broker
                    .publisher(&self.declarations)
                    .await
                    .map_err(Unready::Broker)?,
            );
        }
        if self.publisher.as_ref().is_some_and(|p| p.is_blocked()) {
            return Err(Unready::Blocked);
        }
        Ok(Ready { guard, fresh })
    }

    /// The open channel (after a successful [`Links::ensure`]) and the lock.
    pub fn publisher_and_lock(&mut self) -> Option<(&mut Publisher, &TableLock)> {
        Some((self.publisher.as_mut()?, &self.lock))
    }

    /// True when the open channel or its connection died (closed by the broker, an operator
    /// or the network): an idle relay looks once a second, so readiness says so.
    pub fn channel_died(&self) -> bool {
        self.publisher.as_ref().is_some_and(|p| !p.is_healthy())
    }

    /// Closes the channel (it failed, or the relay stops); the next `ensure` opens a new one.
    pub async fn close_channel(&mut self) {
        if let Some(p) = self.publisher.take() {
            p.close().await;
        }
    }
}

/// How long the links must stay up before a recovery counts: a fault that comes back sooner
/// (a broker that closes each connection right after it opens, a session terminated as soon as
/// it is back) is the same outage, and its retries keep backing off.
pub(crate) const STABLE_AFTER: Duration = Duration::from_secs(10);

/// The relay's outage count, the attempt number of its capped, jittered reconnect backoff
/// (`RetryPolicy::outage`). Invariant: the count starts again only after the links stayed up
/// for [`STABLE_AFTER`] since the last turn that found a server down; a brief recovery in
/// between ("recovered", then down again) leaves it growing.
#[derive(Debug, Default)]
pub(crate) struct Outage {
    attempts: u32,
    /// Since when every turn found the links up (none since the last failure: `None`).
    up_since: Option<Instant>,
}

impl Outage {
    /// A turn found the links up at `now`.
    pub fn up(&mut self, now: Instant) {
        self.up_since.get_or_insert(now);
    }

    /// A turn found a server down at `now`: the attempt number to back off by (1 after a
    /// recovery that lasted, one more than the last otherwise).
    pub fn down(&mut self, now: Instant) -> u32 {
        if self
            .up_since
            .take()
            .is_some_and(|since| now.duration_since(since) >= STABLE_AFTER)
        {
            self.attempts = 0;
        }
        self.attempts = self.attempts.saturating_add(1);
        self.attempts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recovery_that_does_not_last_leaves_the_backoff_growing() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut outage = Outage::default();
        assert_eq!(outage.down(at(0)), 1);
        assert_eq!(outage.down(at(200)), 2);
        // Up for a moment ("recovered"), then down again: the same outage.
        outage.up(at(300));
        outage.up(at(400));
        assert_eq!(outage.down(at(500)), 3);
        outage.up(at(900));
        assert_eq!(
            outage.down(at(900) + STABLE_AFTER - Duration::from_millis(1)),
            4
        );
    }

    #[test]
    fn a_recovery_that_lasted_starts_the_count_again() {
        let start = Instant::now();
        let mut outage = Outage::default();
        for _ in 0..5 {
            outage.down(start);
        }
        outage.up(start);
        assert_eq!(outage.down(start + STABLE_AFTER), 1);
        // Down without being up in between: the count goes on, however long the pause was.
        assert_eq!(outage.down(start + STABLE_AFTER * 10), 2);
    }
}
