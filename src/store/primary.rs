//! The PostgreSQL servers `postgres.url` names, and which of them the relay works against: the
//! primary, the first host in the configured order that is neither in recovery nor read-only.
//! The coordination session looks for it (and checks its own session) before it takes any
//! table lock; every pool follows its choice.
//!
//! Invariant: the relay's pools connect to the host last found primary, and a pooled connection
//! opened before a move to another host, or before a statement was refused as read-only, is
//! never handed out after it (see [`Servers::retired`]).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::Connection;
use tokio::sync::watch;

use super::{answered_within, DbError};
use crate::config::PostgresSettings;

/// True on a server that must not be written to: a standby (in recovery), or a server whose
/// sessions are read-only (`default_transaction_read_only`). libpq's `read-write` asks the same.
pub(super) const NOT_WRITABLE: &str =
    "pg_is_in_recovery() OR current_setting('transaction_read_only')::bool";

/// One host of `postgres.url`.
struct Server {
    /// `PostgreSQL at host:port`.
    label: String,
    options: PgConnectOptions,
}

/// The configured hosts and the one the relay uses.
pub struct Servers {
    hosts: Vec<Server>,
    chosen: AtomicUsize,
    /// Counts the moves to another host; the pools compare it with the one they follow.
    moves: AtomicU64,
    /// Connections opened before this are not used: the last move, or the last read-only
    /// refusal (a session opened while the server was read-only stays so).
    retired_at: Mutex<Option<Instant>>,
    connect_timeout: Duration,
    answer_within: Duration,
    /// Counts the statements refused as read-only: the coordination session looks again.
    look_again: watch::Sender<u64>,
}

impl Servers {
    /// The hosts of `settings.url` (checked at load), each with the relay's session settings.
    pub fn new(settings: &PostgresSettings) -> anyhow::Result<Servers> {
        let hosts = settings
            .hosts()
            .map_err(|problem| anyhow::anyhow!("postgres.url: {problem}"))?
            .into_iter()
            .map(|host| {
                Ok(Server {
                    label: format!("PostgreSQL at {}", host.label),
                    options: super::connect_options(&host.url, settings)?,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Servers {
            hosts,
            chosen: AtomicUsize::new(0),
            moves: AtomicU64::new(0),
            retired_at: Mutex::new(None),
            connect_timeout: settings.connect_timeout,
            answer_within: super::answer_deadline(settings),
            look_again: watch::Sender::new(0),
        })
    }

    /// The connect options of the host in use.
    pub fn options(&self) -> PgConnectOptions {
        self.hosts[self.chosen.load(Ordering::Acquire)]
            .options
            .clone()
    }

    /// `PostgreSQL at host:port` of the host in use, for reports the driver's errors do not
    /// name it in.
    pub fn label(&self) -> String {
        self.hosts[self.chosen.load(Ordering::Acquire)]
            .label
            .clone()
    }

    /// How many times the relay moved to another host.
    pub fn moves(&self) -> u64 {
        self.moves.load(Ordering::Acquire)
    }

    /// True for a connection `age` old that was opened before the relay moved to another host
    /// (it leads to the old one) or before a statement was refused as read-only: not used.
    pub fn retired(&self, age: Duration) -> bool {
        let retired_at = self.retired_at.lock().ok().and_then(|at| *at);
        retired_at.is_some_and(|at| at.elapsed() < age)
    }

    fn retire_connections(&self) {
        if let Ok(mut at) = self.retired_at.lock() {
            *at = Some(Instant::now());
        }
    }

    /// Asks the coordination session to look for the primary again (a statement was refused
    /// as read-only: the host in use is not, or no longer, the primary), and retires every
    /// open connection: a session opened while its server was read-only stays read-only.
    pub fn look_again(&self) {
        self.retire_connections();
        self.look_again.send_modify(|n| *n += 1);
    }

    /// Changes whenever [`Servers::look_again`] is called.
    pub fn asked_to_look_again(&self) -> watch::Receiver<u64> {
        self.look_again.subscribe()
    }

    /// With several hosts: asks each in order whether it is the primary, on a connection of
    /// its own, and uses the first that is. With one, there is nothing to choose: the caller's
    /// own session checks it. Fails with [`DbError::NotPrimary`] when a host answered but none
    /// is the primary, else with why none answered.
    pub async fn find_primary(&self) -> Result<(), DbError> {
        if let [host] = self.hosts.as_slice() {
            // Nothing to choose, but one connection says at once why the host cannot be
            // reached: the pool would retry a refused connection until its acquire timeout and
            // then say only that it timed out.
            let conn = self.open(host).await?;
            let _ = conn.close().await;
            return Ok(());
        }
        let mut answers = Vec::new();
        let mut standby = false;
        let mut tls = None;
        let mut all_tls = true;
        for (index, host) in self.hosts.iter().enumerate() {
            match self.ask(host).await {
                Ok(true) => {
                    self.choose(index);
                    return Ok(());
                }
                Ok(false) => {
                    standby = true;
                    all_tls = false;
                    answers.push(format!("{}: not the primary", host.label));
                }
                Err(e) => {
                    match &e {
                        DbError::Tls(check) => {
                            tls.get_or_insert_with(|| check.clone());
                        }
                        _ => all_tls = false,
                    }
                    answers.push(format!("{}: {e}", host.label));
                }
            }
        }
        let answers = answers.join("; ");
        Err(match (standby, tls) {
            (true, _) => DbError::NotPrimary(format!("no primary among the hosts ({answers})")),
            (false, Some(check)) if all_tls => DbError::Tls(check),
            _ => DbError::Unavailable(format!("no host answered ({answers})")),
        })
    }

    /// Whether `host` is the primary: true when it takes writes. The connect is bounded by
    /// `connect_timeout` (a host that does not answer at all costs no more), the question by the
    /// statement deadline.
    async fn ask(&self, host: &Server) -> Result<bool, DbError> {
        let mut conn = self.open(host).await?;
        let question = format!("SELECT {NOT_WRITABLE}");
        let asked = sqlx::query_scalar(&question).fetch_one(&mut conn);
        let read_only: bool = answered_within(self.answer_within, asked).await?;
        let _ = conn.close().await;
        Ok(!read_only)
    }

    /// A connection of its own to `host`, bounded by `connect_timeout`, or why there is none in
    /// the relay's words ([`ConnectFailure`]).
    async fn open(&self, host: &Server) -> Result<PgConnection, DbError> {
        let connect = PgConnection::connect_with(&host.options);
        match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(ConnectFailure::of(e, &host.options).await.into()),
            Err(_) => Err(ConnectFailure::NoAnswer(self.connect_timeout).into()),
        }
    }

    fn choose(&self, index: usize) {
        let before = self.chosen.swap(index, Ordering::AcqRel);
        if before == index {
            return;
        }
        self.retire_connections();
        self.moves.fetch_add(1, Ordering::AcqRel);
        tracing::info!(
            from = %self.hosts[before].label,
            to = %self.hosts[index].label,
            "the primary is on another host; following it"
        );
    }
}

/// Why a connection to a server could not be opened, decided on the driver's error variants,
/// the I/O error kind and the SQLSTATE, never on message text: what an operator fixes
/// differs for each.
#[derive(Debug)]
pub(super) enum ConnectFailure {
    /// Nothing listens on the port (the server is down, or another port is meant).
    Refused { host: String, port: u16 },
    /// The host name does not resolve.
    HostNotFound { host: String },
    /// No connection within `postgres.connect_timeout` (a firewall dropping packets, a
    /// server that does not answer).
    NoAnswer(Duration),
    /// The server refused the role or its password (SQLSTATE class 28), in its words.
    Authentication(String),
    /// The database of the URL does not exist (SQLSTATE 3D000), in the server's words.
    NoDatabase(String),
    /// Anything else (a TLS check, a server starting up, too many connections), as the
    /// relay reports database errors.
    Other(DbError),
}

impl ConnectFailure {
    /// The failure of connecting with `options`. An I/O error that is neither a refusal nor a
    /// timeout is looked at once more: when the host name does not resolve, that is the
    /// failure (the resolver's error reaches the driver as a plain I/O error).
    pub(super) async fn of(e: sqlx::Error, options: &PgConnectOptions) -> ConnectFailure {
        let host = options.get_host().to_owned();
        let port = options.get_port();
        let socket = options.get_socket().is_some() || host.starts_with('/');
        let unresolved = match &e {
            sqlx::Error::Io(io)
                if !socket
                    && !matches!(
                        io.kind(),
                        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::TimedOut
                    ) =>
            {
                tokio::net::lookup_host((host.as_str(), port))
                    .await
                    .is_err()
            }
            _ => false,
        };
        match &e {
            sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
                return ConnectFailure::Refused { host, port }
            }
            sqlx::Error::Io(_) if unresolved => return ConnectFailure::HostNotFound { host },
            sqlx::Error::Database(db) => match db.code().as_deref() {
                Some("3D000") => return ConnectFailure::NoDatabase(super::db_message(&e)),
                Some(code) if code.starts_with("28") => {
                    return ConnectFailure::Authentication(super::db_message(&e))
                }
                _ => {}
            },
            _ => {}
        }
        ConnectFailure::Other(e.into())
    }
}

impl From<ConnectFailure> for DbError {
    fn from(failure: ConnectFailure) -> DbError {
        let text = match failure {
            ConnectFailure::Other(e) => return e,
            ConnectFailure::Refused { host, port } => {
                format!("connection refused: nothing listens on {host}:{port}")
            }
            ConnectFailure::HostNotFound { host } => {
                format!("host not found: the name {host} does not resolve")
            }
            ConnectFailure::NoAnswer(timeout) => format!(
                "no connection within {} (postgres.connect_timeout)",
                humantime::format_duration(timeout)
            ),
            ConnectFailure::Authentication(server) => format!("authentication failed: {server}"),
            ConnectFailure::NoDatabase(server) => format!("no such database: {server}"),
        };
        DbError::Unavailable(text)
    }
}
