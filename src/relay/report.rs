//! A table relay's state as others see it: the log (one line per change of state, never one
//! per retry), systemd's STATUS= text and the health endpoint (through [`Heartbeat`]).
//! Invariant: a state is logged when its kind changes; a new error text under the same kind
//! (the same outage seen through another symptom) updates the state's words, not the log.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::share::Idle;
use crate::message::OutboxRow;
use crate::metrics::{Server, State, TableMetrics};
use crate::publisher::{PublishError, Refusal};
use crate::store::DbError;
use crate::tls::TlsFailure;

/// The relay's view of its dependencies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Health {
    Starting,
    Relaying,
    /// Registered, and owning nothing in the relay's channel: a standby beside the table's other
    /// live relays or beside this process's other channels (ready), or about to claim (not).
    Idle(Idle),
    /// The membership was lost (its coordination session ended, or its lease ran out) and is
    /// registering again: nothing is published until it has. Not a standby: no other relay
    /// needs to be there, and none may be.
    Rejoining,
    /// A relay of an earlier release holds the table's lock (exclusively): a rolling upgrade
    /// is under way, and this relay takes no partition until that one stops.
    OlderRelay,
    Blocked,
    DatabaseDown(String),
    /// PostgreSQL answers but refuses the relay's statements: the table was dropped or
    /// altered, or a privilege was revoked. Retried with backoff like an outage.
    TableUnusable(String),
    /// PostgreSQL answers, and refused one of the relay's statements for what it touched (a
    /// value, a constraint, a limit, a trigger, a conflict): not an outage, and not the table's
    /// shape. Retried with backoff.
    Rejected(String),
    /// PostgreSQL is not the primary (a standby, or read-only): no host of `postgres.url` is
    /// one now. Not an outage of rows; the relay keeps looking.
    NotPrimary(String),
    BrokerDown(String),
    /// The broker has the table's exchange with other settings than `declare_exchange`.
    Misdeclared(String),
    /// A TLS check failed with a server: which server, which check. Another server or another
    /// check is another state (logged); the same one on every reconnect is not.
    Certificate(Server, TlsFailure),
}

impl Health {
    fn same_kind(&self, other: &Health) -> bool {
        match (self, other) {
            (Health::Certificate(_, a), Health::Certificate(_, b)) => a == b,
            (Health::Idle(a), Health::Idle(b)) => {
                std::mem::discriminant(a) == std::mem::discriminant(b)
            }
            _ => std::mem::discriminant(self) == std::mem::discriminant(other),
        }
    }

    /// A database failure; `server` names PostgreSQL for a failed TLS check (the driver's
    /// error does not).
    pub fn database(e: DbError, server: &str) -> Health {
        match e {
            DbError::Tls(check) => Health::Certificate(
                Server::Postgres,
                TlsFailure {
                    server: server.to_owned(),
                    check,
                },
            ),
            e => Health::from(e),
        }
    }

    /// Ready: relaying, or a true standby (both servers reachable, the membership registered,
    /// and the partitions it does not own held by live relays, or this relay's other channels,
    /// or a relay of an earlier release during an upgrade). A relay that lost its membership or
    /// has not claimed yet is not: nobody may be publishing what it should.
    fn is_ready(&self) -> bool {
        matches!(
            self,
            Health::Relaying
                | Health::Idle(Idle::OtherRelays { .. } | Idle::OtherChannels)
                | Health::OlderRelay
        )
    }

    fn state(&self) -> State {
        match self {
            Health::Starting | Health::Idle(Idle::Claiming) | Health::Rejoining => State::Starting,
            Health::Relaying => State::Relaying,
            Health::Idle(_) | Health::OlderRelay => State::Standby,
            Health::Blocked => State::Blocked,
            Health::DatabaseDown(_) => State::DatabaseDown,
            // The nearest label of the state metric; a label of its own is metrics.rs's.
            Health::TableUnusable(_) | Health::Rejected(_) => State::TableUnusable,
            Health::NotPrimary(_) => State::NotPrimary,
            Health::BrokerDown(_) => State::BrokerDown,
            Health::Misdeclared(_) => State::Misdeclared,
            Health::Certificate(Server::Postgres, _) => State::DatabaseDown,
            Health::Certificate(Server::Rabbitmq, _) => State::BrokerDown,
        }
    }

    fn words(&self) -> String {
        match self {
            Health::Starting => "starting".to_owned(),
            Health::Relaying => "relaying".to_owned(),
            Health::Idle(Idle::OtherRelays { others }) => {
                format!("standby (the table's other relays own all its partitions: {others} live)")
            }
            Health::Idle(Idle::OtherChannels) => {
                "standby (this relay's partitions of the table go out on its other channels)"
                    .to_owned()
            }
            Health::Idle(Idle::Claiming) => {
                "starting: claiming the table's partitions (no other relay holds them)".to_owned()
            }
            Health::Rejoining => {
                "not ready: rejoining the table: its partition membership was lost \
                 (the coordination session ended, or the lease ran out); registering again"
                    .to_owned()
            }
            Health::OlderRelay => {
                "standby (a relay of an earlier release holds the table's lock)".to_owned()
            }
            Health::Blocked => "paused: broker blocked the connection".to_owned(),
            Health::DatabaseDown(e) => format!("not ready: PostgreSQL: {e}"),
            Health::TableUnusable(e) => format!("not ready: outbox table: {e}"),
            Health::Rejected(e) => {
                format!("not ready: PostgreSQL refused a statement on the outbox table: {e}")
            }
            Health::NotPrimary(e) => format!("not ready: PostgreSQL is not the primary: {e}"),
            Health::BrokerDown(e) => format!("not ready: RabbitMQ: {e}"),
            Health::Misdeclared(e) => format!("not ready: exchange declaration: {e}"),
            Health::Certificate(_, f) => format!("not ready: {f}"),
        }
    }
}

impl From<DbError> for Health {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Unavailable(e) => Health::DatabaseDown(e),
            DbError::Refused(e) => Health::TableUnusable(e),
            DbError::Rejected(e) => Health::Rejected(e),
            DbError::NotPrimary(e) => Health::NotPrimary(e),
            DbError::Tls(check) => Health::DatabaseDown(format!("TLS: {check}")),
        }
    }
}

impl From<PublishError> for Health {
    fn from(e: PublishError) -> Self {
        match e {
            PublishError::Misdeclared(e) => Health::Misdeclared(e),
            PublishError::Tls(f) => Health::Certificate(Server::Rabbitmq, f),
            other => Health::BrokerDown(other.to_string()),
        }
    }
}

/// Logs and publishes one table relay's state (the log, the heartbeat, the state metric).
pub(crate) struct Reporter {
    table: String,
    health: Health,
    heartbeat: std::sync::Arc<Heartbeat>,
    metrics: TableMetrics,
}

impl Reporter {
    pub fn new(table: String, metrics: TableMetrics) -> Self {
        Reporter {
            heartbeat: std::sync::Arc::new(Heartbeat::new(table.clone())),
            table,
            health: Health::Starting,
            metrics,
        }
    }

    pub fn heartbeat(&self) -> std::sync::Arc<Heartbeat> {
        self.heartbeat.clone()
    }

    pub fn beat(&self) {
        self.heartbeat.beat();
    }

    /// Records `health`; logs it when its kind differs from the last one.
    pub fn set(&mut self, health: Health) {
        if self.health == health {
            return;
        }
        if !self.health.same_kind(&health) {
            self.log(&health);
            self.metrics.set_state(health.state(), health.is_ready());
        }
        self.heartbeat.set(health.is_ready(), health.words());
        self.health = health;
    }

    fn log(&self, health: &Health) {
        let table = &self.table;
        match health {
            Health::Relaying
                if matches!(
                    self.health,
                    Health::Starting | Health::Idle(_) | Health::OlderRelay
                ) =>
            {
                tracing::info!(%table, "relaying: owning partitions of the table, connected to PostgreSQL and RabbitMQ")
            }
            Health::Relaying => tracing::info!(%table, "recovered: relaying again"),
            Health::Idle(Idle::OtherRelays { others }) => {
                tracing::info!(%table, others, "standby: the table's other relays own all its partitions")
            }
            Health::Idle(Idle::OtherChannels) => {
                tracing::info!(%table, "standby: this relay's partitions of the table go out on its other channels")
            }
            Health::Rejoining => {
                tracing::warn!(%table, "rejoining: the table's partition membership was lost (its coordination session ended, or its lease ran out); publishing nothing until it has registered again")
            }
            Health::OlderRelay => {
                tracing::warn!(%table, "standby: a relay of an earlier release holds the table's lock; taking no partition until it stops")
            }
            Health::Blocked => {
                tracing::warn!(%table, "RabbitMQ blocked the connection (resource alarm); fetching paused")
            }
            Health::DatabaseDown(e) => {
                tracing::warn!(%table, error = %e, "PostgreSQL unavailable; retrying with backoff")
            }
            Health::TableUnusable(e) => {
                tracing::warn!(%table, error = %e, "cannot use the outbox table (dropped, altered, or a privilege revoked); retrying with backoff")
            }
            Health::Rejected(e) => {
                tracing::warn!(%table, error = %e, "PostgreSQL refused a statement on the outbox table for what it touched (a value, a constraint, a limit, a trigger, a conflict; not an outage); retrying with backoff")
            }
            Health::NotPrimary(e) => {
                tracing::warn!(%table, error = %e, "PostgreSQL is not the primary (a standby, or read-only); looking for the primary with backoff")
            }
            Health::BrokerDown(e) => {
                tracing::warn!(%table, error = %e, "RabbitMQ unavailable; retrying with backoff")
            }
            Health::Misdeclared(e) => {
                tracing::warn!(%table, error = %e, "the table's exchange exists with other settings than declare_exchange; fix the config or the exchange; retrying with backoff")
            }
            Health::Certificate(_, f) => {
                tracing::warn!(%table, error = %f, "TLS check failed; fix the certificate or the TLS settings; retrying with backoff")
            }
            Health::Starting | Health::Idle(Idle::Claiming) => {}
        }
    }
}

/// Liveness for the systemd watchdog and readiness: set by the loop on every turn.
pub struct Heartbeat {
    table: String,
    /// The relay's current state in words, for systemd's STATUS= line and the health endpoint.
    state: std::sync::Mutex<String>,
    /// Milliseconds since `started` of the last turn of the loop.
    last_beat_ms: AtomicU64,
    /// 1 once the relay has connected to both servers (relaying or standing by).
    ready: AtomicU64,
    started: Instant,
}

impl Heartbeat {
    fn new(table: String) -> Self {
        Self {
            table,
            state: std::sync::Mutex::new(Health::Starting.words()),
            last_beat_ms: AtomicU64::new(0),
            ready: AtomicU64::new(0),
            started: Instant::now(),
        }
    }

    fn beat(&self) {
        self.last_beat_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn set(&self, ready: bool, state: String) {
        self.ready.store(ready as u64, Ordering::Relaxed);
        if let Ok(mut s) = self.state.lock() {
            *s = state;
        }
    }

    /// The table this relay serves.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The relay's current state in words (`relaying`, `not ready: RabbitMQ: ...`).
    pub fn state(&self) -> String {
        self.state.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// True while the relay is relaying or standing by (both servers reachable).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) == 1
    }

    /// How long since the loop last turned.
    pub fn silence(&self) -> Duration {
        self.started.elapsed().saturating_sub(Duration::from_millis(
            self.last_beat_ms.load(Ordering::Relaxed),
        ))
    }
}

/// The broker's refusals of one table's publishes, as the log tells them. Invariant: the first
/// refusal of each kind (unroutable, no such exchange) is logged once, with the broker's
/// reason, the exchange and the row id, at the moment it is decided on; the later ones are
/// counted (`outbox_relay_refused_total{reason}`), never logged again. A refused row is
/// retried with backoff and parked after `max_attempts`, which the park itself logs.
#[derive(Debug, Default)]
pub(crate) struct RefusalLog {
    logged: HashSet<Refusal>,
}

impl RefusalLog {
    /// The broker refused the publish of `row` to `exchange` for `reason` (a failed attempt
    /// of the row's `max_attempts`).
    pub fn refused(
        &mut self,
        table: &str,
        refusal: Refusal,
        row: &OutboxRow,
        exchange: &str,
        reason: &str,
        max_attempts: u32,
    ) {
        if !self.logged.insert(refusal) {
            return;
        }
        let attempt = row.attempts.max(0) as u32 + 1;
        let kind = match refusal {
            Refusal::Unroutable => "unroutable",
            Refusal::NoExchange => "no_exchange",
            Refusal::Nack => "nack",
        };
        tracing::warn!(
            table,
            id = row.id,
            exchange,
            refusal = kind,
            reason,
            attempt,
            max_attempts,
            "the broker refused a publish; the row is retried with backoff and parked after \
             max_attempts; further refusals of this kind are counted in \
             outbox_relay_refused_total, not logged"
        );
    }
}
