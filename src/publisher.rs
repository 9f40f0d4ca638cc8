//! All AMQP: one connection per relay process with a confirm-mode channel per table, exchange
//! checks and declarations, publishing and judging confirms. Must not touch PostgreSQL.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::protocol::AMQPErrorKind;
use lapin::tcp::AMQPUriTcpExt;
use lapin::types::FieldTable;
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{
    Channel, Confirmation, Connection, ConnectionProperties, ErrorKind, ExchangeKind,
    PublisherConfirm,
};
use prometheus_client::metrics::counter::Counter;

use crate::config::{ExchangeDeclaration, ExchangeType, RabbitSettings, SecretUrl};
use crate::message::OutboundMessage;
use crate::tls::{BrokerTls, TlsCheck, TlsFailure};

/// Why a publish did not end in a clean confirm.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The broker refused this message (unroutable, missing exchange): the row is retried
    /// with backoff and its attempts count. A nack also comes as this, and the relay treats it
    /// as an outage (see [`Refusal::Nack`]).
    #[error("{1}")]
    Refused(Refusal, String),
    /// The broker refused a message as larger than its `max_message_size` (`limit` bytes) and
    /// closed the channel: rows above the limit are parked from now on, the others go again.
    #[error("the broker refused a message as larger than its limit of {limit} bytes")]
    TooLarge { limit: usize },
    /// Declaring the table's exchange conflicts with the exchange the broker has (another type
    /// or durability): an operator's mistake in the config or the broker, not an outage.
    #[error("{0}")]
    Misdeclared(String),
    /// The connection or channel failed or went silent: nothing is known about the message.
    /// The row stays due, the relay reconnects, and the message goes out again with the same
    /// `message_id`. Attempts do not count, so an outage never parks rows.
    #[error("{0}")]
    Transport(String),
    /// A TLS check failed on connecting (the broker's certificate is untrusted, expired or
    /// names another host; the broker requires or refuses the relay's client certificate).
    /// Retried with backoff like an outage; reported as a certificate problem.
    #[error("{0}")]
    Tls(TlsFailure),
}

impl PublishError {
    /// A failure of the client library: the broker's size refusal becomes [`TooLarge`] with
    /// its limit (the broker states it only in its reply text), anything else is transport.
    ///
    /// [`TooLarge`]: PublishError::TooLarge
    fn from_lapin(context: &str, e: &lapin::Error) -> Self {
        if let ErrorKind::ProtocolError(amqp) = e.kind() {
            if matches!(
                amqp.kind(),
                AMQPErrorKind::Soft(lapin::protocol::AMQPSoftError::PRECONDITIONFAILED)
            ) {
                if let Some(limit) = size_limit_in(amqp.get_message().as_str()) {
                    return PublishError::TooLarge { limit };
                }
            }
        }
        PublishError::Transport(format!("{context}: {}", describe(e)))
    }
}

/// Why the broker refused a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The broker nacked the message: it could not take it (a quorum queue without its
    /// majority or leader, a full queue with `reject-publish`, an internal error). Nothing
    /// about the row: the relay retries it like an outage, attempts unchanged.
    Nack,
    /// The message reached no queue: the broker returned it (published `mandatory`).
    Unroutable,
    /// The message's exchange does not exist.
    NoExchange,
}

/// The broker limit stated in a refusal such as "message size 2000 is larger than configured
/// max size 1024".
fn size_limit_in(reply_text: &str) -> Option<usize> {
    let at = reply_text.find("configured max size")?;
    reply_text[at + "configured max size".len()..]
        .split(|c: char| !c.is_ascii_digit())
        .find(|s| !s.is_empty())?
        .parse()
        .ok()
}

/// A lapin error as a short human sentence.
pub fn describe(e: &lapin::Error) -> String {
    match e.kind() {
        ErrorKind::ProtocolError(amqp) => format!("{} ({:?})", amqp.get_message(), amqp.kind()),
        ErrorKind::IOError(io) => format!("I/O error: {io}"),
        other => format!("{other:?}"),
    }
}

/// The relay process's one AMQP connection, shared by every table: each table publishes on a
/// channel of its own ([`Broker::publisher`]), so a channel error stays that table's while the
/// connection count stays one, whatever the number of tables. Reconnects on demand, once for
/// all tables: the first table that finds the connection dead opens a new one, the others
/// open their channels on it.
///
/// With several nodes (`rabbitmq.url` a list), a connect tries each node once, in the list's
/// order: from the top on the first connect, and from the node after the one just lost on a
/// reconnect (the lost one is the likeliest still down), so the relay moves round the cluster
/// and a node that is back gets its turn when the relay next loses its node.
pub struct Broker {
    settings: RabbitSettings,
    connection: tokio::sync::Mutex<Link>,
    reconnects: Counter,
}

#[derive(Default)]
struct Link {
    connection: Option<Arc<Connection>>,
    /// A connection was opened before: the next one is a reconnect.
    connected_once: bool,
    /// The index in `rabbitmq.url` of the node of the last connection opened; the next
    /// connect starts with the node after it.
    node: Option<usize>,
    /// The last failed connect: tables that ask again within [`RECONNECT_QUIET`] get the same
    /// answer instead of a connect attempt each.
    failed: Option<(Instant, PublishError)>,
}

/// How long a failed connect answers for every table.
const RECONNECT_QUIET: Duration = Duration::from_millis(500);

impl Broker {
    pub fn new(settings: &RabbitSettings) -> Broker {
        Broker {
            settings: settings.clone(),
            connection: tokio::sync::Mutex::new(Link::default()),
            reconnects: Counter::default(),
        }
    }

    /// Counts every connection opened after the first into `reconnects`.
    pub fn counting_reconnects(mut self, reconnects: Counter) -> Broker {
        self.reconnects = reconnects;
        self
    }

    /// True while the broker blocks the connection (a resource alarm). False while a table is
    /// connecting (nothing is blocked then).
    pub fn is_blocked(&self) -> bool {
        self.connection.try_lock().is_ok_and(|link| {
            link.connection
                .as_ref()
                .is_some_and(|c| c.status().connected() && c.status().blocked())
        })
    }

    /// A publisher for one table on the shared connection (connecting first when there is no
    /// live connection): a confirm-mode channel, and `declarations` declared.
    pub async fn publisher(
        &self,
        declarations: &[(String, ExchangeDeclaration)],
    ) -> Result<Publisher, PublishError> {
        let connection = self.connection().await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| PublishError::from_lapin("opening a channel", &e))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| PublishError::from_lapin("enabling publisher confirms", &e))?;
        let mut publisher = Publisher {
            connection,
            channel,
            probe: None,
            known_exchanges: HashSet::new(),
            confirm_timeout: self.settings.confirm_timeout,
        };
        for (name, declaration) in declarations {
            if let Err(e) = publisher.declare_exchange(name, declaration).await {
                publisher.close().await;
                return Err(e);
            }
        }
        Ok(publisher)
    }

    async fn connection(&self) -> Result<Arc<Connection>, PublishError> {
        let mut link = self.connection.lock().await;
        if let Some(c) = &link.connection {
            if c.status().connected() {
                return Ok(c.clone());
            }
        }
        if let Some((at, e)) = &link.failed {
            if at.elapsed() < RECONNECT_QUIET {
                return Err(e.clone());
            }
        }
        if let Some(old) = link.connection.take() {
            close_connection(&old).await;
        }
        let nodes = self.settings.url.nodes();
        match self.connect_round(round(link.node, nodes.len())).await {
            Ok((node, c, skipped)) => {
                if nodes.len() > 1 && link.node != Some(node) {
                    report_node(&nodes[node], node, nodes.len(), &skipped);
                }
                let c = Arc::new(c);
                link.connection = Some(c.clone());
                link.node = Some(node);
                link.failed = None;
                if std::mem::replace(&mut link.connected_once, true) {
                    self.reconnects.inc();
                }
                Ok(c)
            }
            Err(e) => {
                link.failed = Some((Instant::now(), e.clone()));
                Err(e)
            }
        }
    }

    /// The node of the live connection (redacted), if there is one.
    pub async fn current_node(&self) -> Option<String> {
        let link = self.connection.lock().await;
        let live = link.connection.as_ref()?.status().connected();
        let node = self.settings.url.nodes().get(link.node?)?;
        live.then(|| node.redacted())
    }

    /// Tries the nodes in `order` (see [`round`]): the index of the first that answered,
    /// its connection, and the failures of the nodes tried before it. When none answered:
    /// a single node's own error; for several, a TLS failure when every node failed its TLS
    /// check (the operator's certificates, most likely the same on every node), else an
    /// outage naming each node's failure.
    async fn connect_round(
        &self,
        order: Vec<usize>,
    ) -> Result<(usize, Connection, Vec<PublishError>), PublishError> {
        let nodes = self.settings.url.nodes();
        let mut failures = Vec::new();
        for i in order {
            match self.connect(&nodes[i]).await {
                Ok(c) => return Ok((i, c, failures)),
                Err(e) => failures.push(e),
            }
        }
        if failures.len() <= 1 || failures.iter().all(|e| matches!(e, PublishError::Tls(_))) {
            return Err(failures
                .into_iter()
                .next()
                .unwrap_or_else(|| PublishError::Transport("rabbitmq.url names no node".into())));
        }
        let each: Vec<String> = failures.iter().map(ToString::to_string).collect();
        Err(PublishError::Transport(format!(
            "none of the {} RabbitMQ nodes answered: {}",
            nodes.len(),
            each.join("; ")
        )))
    }

    async fn connect(&self, url: &SecretUrl) -> Result<Connection, PublishError> {
        let settings = &self.settings;
        let properties = ConnectionProperties::default()
            .with_connection_name(settings.connection_name.as_str().into());
        let connect = async {
            match url.expose().parse::<AMQPUri>() {
                Ok(uri) if uri.scheme == AMQPScheme::AMQPS => {
                    self.connect_tls(url, uri, properties).await
                }
                _ => Connection::connect(url.expose(), properties)
                    .await
                    .map_err(|e| connect_failed(url, &e)),
            }
        };
        match tokio::time::timeout(settings.connect_timeout, connect).await {
            Err(_) => Err(PublishError::Transport(format!(
                "connecting to RabbitMQ at {} timed out after {}",
                url.redacted(),
                humantime::format_duration(settings.connect_timeout)
            ))),
            Ok(result) => result,
        }
    }

    /// An `amqps://` connection: TCP to the URL's host, then TLS with the certificates of
    /// `[rabbitmq.tls]` (read again now, so renewed files take effect), checking the broker's
    /// certificate for `server_name` when set, else for the URL's host (each node's own).
    async fn connect_tls(
        &self,
        url: &SecretUrl,
        uri: AMQPUri,
        properties: ConnectionProperties,
    ) -> Result<Connection, PublishError> {
        let server = format!(
            "RabbitMQ at amqps://{}:{}",
            uri.authority.host, uri.authority.port
        );
        let tls = BrokerTls::load(self.settings.tls.as_ref()).map_err(|problems| {
            PublishError::Tls(TlsFailure {
                server: server.clone(),
                check: TlsCheck::OwnSettings(problems.join("; ")),
            })
        })?;
        let name = tls
            .server_name
            .unwrap_or_else(|| uri.authority.host.clone());
        let connector = tls.connector;
        let runtime = lapin::runtime::default_runtime().map_err(|e| connect_failed(url, &e))?;
        let transport = async move |uri: AMQPUri, runtime| {
            let plain = AMQPUri {
                scheme: AMQPScheme::AMQP,
                ..uri
            };
            let stream = plain.connect_async(&runtime).await?;
            Ok(stream.into_rustls(&connector, &name).await?)
        };
        Connection::connector(uri, runtime, transport, properties)
            .await
            .map_err(|e| match e.kind() {
                ErrorKind::IOError(io) => match TlsCheck::find(io.as_ref()) {
                    Some(check) => PublishError::Tls(TlsFailure { server, check }),
                    None => connect_failed(url, &e),
                },
                _ => connect_failed(url, &e),
            })
    }

    /// Closes the connection politely (at shutdown, after every table closed its channel).
    pub async fn close(&self) {
        if let Some(c) = self.connection.lock().await.connection.take() {
            close_connection(&c).await;
        }
    }
}

/// The order in which a connect tries `nodes` nodes, `last` being the node of the last
/// connection: every node once, from the top on the first connect, else from the node after
/// `last`, round the list.
fn round(last: Option<usize>, nodes: usize) -> Vec<usize> {
    let first = last.map_or(0, |n| n + 1);
    (0..nodes).map(|k| (first + k) % nodes).collect()
}

fn connect_failed(url: &SecretUrl, e: &lapin::Error) -> PublishError {
    PublishError::Transport(format!(
        "cannot connect to RabbitMQ at {}: {}",
        url.redacted(),
        describe(e)
    ))
}

/// Logs the node the relay is connected to now (once per change of node), with the nodes that
/// did not answer before it: a node that refuses the relay (its credentials, its certificate)
/// while another answers is said here, not hidden by the working one.
fn report_node(url: &SecretUrl, node: usize, nodes: usize, skipped: &[PublishError]) {
    let node = format!("{} ({} of {nodes})", url.redacted(), node + 1);
    if skipped.is_empty() {
        tracing::info!(%node, "connected to RabbitMQ node");
    } else {
        let skipped: Vec<String> = skipped.iter().map(ToString::to_string).collect();
        tracing::warn!(%node, skipped = %skipped.join("; "), "connected to RabbitMQ node after nodes that did not answer");
    }
}

async fn close_connection(connection: &Connection) {
    if connection.status().connected() {
        let close = connection.close(200, "outbox-relay closing".into());
        let _ = tokio::time::timeout(Duration::from_secs(2), close).await;
    }
}

/// One table's channels on the shared connection: a confirm-mode channel for publishing and
/// one for exchange checks (a failed passive declare closes the channel it ran on, so it must
/// not be the publishing one).
pub struct Publisher {
    connection: Arc<Connection>,
    channel: Channel,
    probe: Option<Channel>,
    known_exchanges: HashSet<String>,
    confirm_timeout: Duration,
}

impl Publisher {
    async fn declare_exchange(
        &mut self,
        name: &str,
        d: &ExchangeDeclaration,
    ) -> Result<(), PublishError> {
        let kind = match d.kind {
            ExchangeType::Direct => ExchangeKind::Direct,
            ExchangeType::Fanout => ExchangeKind::Fanout,
            ExchangeType::Topic => ExchangeKind::Topic,
            ExchangeType::Headers => ExchangeKind::Headers,
        };
        let options = ExchangeDeclareOptions {
            durable: d.durable,
            ..ExchangeDeclareOptions::default()
        };
        let probe = self.probe().await?;
        match probe
            .exchange_declare(name.into(), kind, options, FieldTable::default())
            .await
        {
            Ok(()) => {
                self.known_exchanges.insert(name.to_owned());
                Ok(())
            }
            Err(e) => {
                self.probe = None;
                match e.kind() {
                    // A declaration that conflicts with the existing exchange is an operator's
                    // mistake, not an outage.
                    ErrorKind::ProtocolError(amqp)
                        if matches!(
                            amqp.kind(),
                            AMQPErrorKind::Soft(lapin::protocol::AMQPSoftError::PRECONDITIONFAILED)
                        ) =>
                    {
                        Err(PublishError::Misdeclared(format!(
                            "declaring exchange {name:?} (declare_exchange): {}",
                            describe(&e)
                        )))
                    }
                    _ => Err(PublishError::from_lapin(
                        &format!("declaring exchange {name:?}"),
                        &e,
                    )),
                }
            }
        }
    }

    async fn probe(&mut self) -> Result<Channel, PublishError> {
        if let Some(p) = &self.probe {
            if p.status().connected() {
                return Ok(p.clone());
            }
        }
        let p = self
            .connection
            .create_channel()
            .await
            .map_err(|e| PublishError::from_lapin("opening a channel", &e))?;
        self.probe = Some(p.clone());
        Ok(p)
    }

    /// Checks once per connection that `exchange` exists, with a passive declare on the probe
    /// channel. Publishing to a missing exchange would close the publishing channel and fail
    /// every message in flight on it; this keeps that failure to the rows that name it.
    pub async fn ensure_exchange(&mut self, exchange: &str) -> Result<(), PublishError> {
        if exchange.is_empty() || self.known_exchanges.contains(exchange) {
            return Ok(());
        }
        let probe = self.probe().await?;
        let options = ExchangeDeclareOptions {
            passive: true,
            ..ExchangeDeclareOptions::default()
        };
        match probe
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Direct,
                options,
                FieldTable::default(),
            )
            .await
        {
            Ok(()) => {
                self.known_exchanges.insert(exchange.to_owned());
                Ok(())
            }
            Err(e) => {
                self.probe = None;
                match e.kind() {
                    ErrorKind::ProtocolError(amqp)
                        if matches!(
                            amqp.kind(),
                            AMQPErrorKind::Soft(lapin::protocol::AMQPSoftError::NOTFOUND)
                        ) =>
                    {
                        Err(PublishError::Refused(
                            Refusal::NoExchange,
                            format!(
                                "exchange {exchange:?} does not exist (the broker: {} {})",
                                amqp.get_id(),
                                amqp.get_message()
                            ),
                        ))
                    }
                    _ => Err(PublishError::from_lapin(
                        &format!("checking exchange {exchange:?}"),
                        &e,
                    )),
                }
            }
        }
    }

    /// Forgets which exchanges exist (after a channel error that may mean one was deleted).
    pub fn forget_exchanges(&mut self) {
        self.known_exchanges.clear();
    }

    /// Sends one message (mandatory, on the confirm channel) and returns its pending confirm.
    pub async fn publish(&self, message: &OutboundMessage) -> Result<PendingConfirm, PublishError> {
        let confirm = self
            .channel
            .basic_publish(
                message.exchange.as_str().into(),
                message.routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &message.body,
                message.properties.clone(),
            )
            .await
            .map_err(|e| PublishError::from_lapin("publishing", &e))?;
        Ok(PendingConfirm { confirm })
    }

    /// The connection's negotiated `frame_max`: a message's properties and headers must fit in
    /// one frame of this size.
    pub fn frame_max(&self) -> usize {
        self.connection.configuration().frame_max() as usize
    }

    /// How long a connection may stay silent with confirms outstanding before it is presumed dead.
    pub fn confirm_timeout(&self) -> Duration {
        self.confirm_timeout
    }

    /// True while the broker has blocked this connection (a memory or disk alarm).
    pub fn is_blocked(&self) -> bool {
        self.connection.status().blocked()
    }

    /// True while the connection and its publishing channel are usable.
    pub fn is_healthy(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }

    /// Closes this table's channels (the connection stays, for the other tables).
    pub async fn close(self) {
        for channel in std::iter::once(&self.channel).chain(self.probe.as_ref()) {
            if channel.status().connected() {
                let close = channel.close(200, "outbox-relay closing".into());
                let _ = tokio::time::timeout(Duration::from_secs(2), close).await;
            }
        }
    }
}

/// The broker's answer to one publish, still to come.
pub struct PendingConfirm {
    confirm: PublisherConfirm,
}

impl PendingConfirm {
    /// Waits for the confirm. An `Ack` is success only when the message was routed; a returned
    /// message or a `Nack` is a rejection; a channel or connection error is a transport
    /// failure. The caller bounds the wait (the relay treats a silent connection as dead after
    /// the confirm timeout, except while the broker blocks it).
    pub async fn wait(self) -> Result<(), PublishError> {
        match self.confirm.await {
            Ok(Confirmation::Ack(None)) | Ok(Confirmation::NotRequested) => Ok(()),
            Ok(Confirmation::Ack(Some(returned))) => Err(PublishError::Refused(Refusal::Unroutable, format!(
                "unroutable: the broker returned the message ({} {}) from exchange {:?} with routing key {:?}",
                returned.reply_code,
                returned.reply_text,
                returned.delivery.exchange.as_str(),
                returned.delivery.routing_key.as_str()
            ))),
            Ok(Confirmation::Nack(_)) => Err(PublishError::Refused(Refusal::Nack, "the broker nacked the message (a queue could not take it: a quorum queue without its majority, a full queue that rejects publishes)".into())),
            Err(e) => Err(PublishError::from_lapin("waiting for the confirm", &e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connect_tries_every_node_once_from_the_top_then_from_the_node_after_the_lost_one() {
        assert_eq!(round(None, 3), [0, 1, 2]);
        assert_eq!(round(Some(0), 3), [1, 2, 0]);
        assert_eq!(round(Some(2), 3), [0, 1, 2]);
        assert_eq!(round(Some(0), 1), [0]);
        assert!(round(None, 0).is_empty());
    }

    #[test]
    fn the_brokers_size_limit_is_read_from_its_refusal() {
        assert_eq!(
            size_limit_in(
                "PRECONDITION_FAILED - message size 2000 is larger than configured max size 1024"
            ),
            Some(1024)
        );
        assert_eq!(size_limit_in("NOT_FOUND - no exchange 'x'"), None);
    }
}
