//! A table relay's links to its two servers: the table's lock (held by the process's
//! coordination session) and the table's channel on the process's broker connection.
//! Invariant: rows are published only under a guard that [`Links::ensure`] returned in this
//! turn; when the guard's session or the channel changed since the last turn, `ensure` says
//! so (`fresh`), and nothing the relay held in memory for the old ones may be sent or settled.

use std::sync::Arc;

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
