//! All AMQP: one connection and confirm-mode channel per table relay, exchange checks and
//! declarations, publishing and judging confirms. Must not touch PostgreSQL.

use std::collections::HashSet;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::protocol::AMQPErrorKind;
use lapin::types::FieldTable;
use lapin::{
    Channel, Confirmation, Connection, ConnectionProperties, ErrorKind, ExchangeKind,
    PublisherConfirm,
};

use crate::config::{ExchangeDeclaration, ExchangeType, RabbitSettings};
use crate::message::OutboundMessage;

/// Why a publish did not end in a clean confirm.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    /// The broker refused this message (nack, unroutable, missing exchange): the row is retried
    /// with backoff and its attempts count.
    #[error("{0}")]
    Rejected(String),
    /// The connection or channel failed or went silent: nothing is known about the message.
    /// The row stays due, the relay reconnects, and the message goes out again with the same
    /// `message_id`. Attempts do not count, so an outage never parks rows.
    #[error("{0}")]
    Transport(String),
}

impl PublishError {
    fn from_lapin(context: &str, e: &lapin::Error) -> Self {
        PublishError::Transport(format!("{context}: {}", describe(e)))
    }
}

/// The broker limit learned from a refusal such as "message size 2000 is larger than
/// configured max size 1024".
pub fn learned_max_size(error_text: &str) -> Option<usize> {
    let at = error_text.find("configured max size")?;
    error_text[at + "configured max size".len()..]
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

/// A live connection with one confirm-mode channel for publishing and one for exchange checks
/// (a failed passive declare closes the channel it ran on, so it must not be the publishing one).
pub struct Publisher {
    connection: Connection,
    channel: Channel,
    probe: Option<Channel>,
    known_exchanges: HashSet<String>,
    confirm_timeout: Duration,
}

impl Publisher {
    /// Connects, opens the channels, enables confirms and declares the configured exchanges.
    pub async fn connect(
        settings: &RabbitSettings,
        connection_name: &str,
        declarations: &[(String, ExchangeDeclaration)],
    ) -> Result<Publisher, PublishError> {
        let properties =
            ConnectionProperties::default().with_connection_name(connection_name.into());
        let connect = Connection::connect(settings.url.expose(), properties);
        let connection = match tokio::time::timeout(settings.connect_timeout, connect).await {
            Err(_) => {
                return Err(PublishError::Transport(format!(
                    "connecting to RabbitMQ at {} timed out after {}",
                    settings.url.redacted(),
                    humantime::format_duration(settings.connect_timeout)
                )))
            }
            Ok(Err(e)) => {
                return Err(PublishError::from_lapin(
                    &format!("cannot connect to RabbitMQ at {}", settings.url.redacted()),
                    &e,
                ))
            }
            Ok(Ok(c)) => c,
        };
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
            confirm_timeout: settings.confirm_timeout,
        };
        for (name, declaration) in declarations {
            publisher.declare_exchange(name, declaration).await?;
        }
        Ok(publisher)
    }

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
                // A declaration that conflicts with the existing exchange is an operator's
                // mistake, not an outage; it is reported like a refused row.
                Err(PublishError::Rejected(format!(
                    "declaring exchange {name:?}: {}",
                    describe(&e)
                )))
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
                        Err(PublishError::Rejected(format!(
                            "exchange {exchange:?} does not exist"
                        )))
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

    /// Closes the connection politely (used at shutdown and before reconnecting).
    pub async fn close(self) {
        if self.connection.status().connected() {
            let close = self.connection.close(200, "outbox-relay closing".into());
            let _ = tokio::time::timeout(Duration::from_secs(2), close).await;
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
            Ok(Confirmation::Ack(Some(returned))) => Err(PublishError::Rejected(format!(
                "unroutable: the broker returned the message ({} {}) from exchange {:?} with routing key {:?}",
                returned.reply_code,
                returned.reply_text,
                returned.delivery.exchange.as_str(),
                returned.delivery.routing_key.as_str()
            ))),
            Ok(Confirmation::Nack(_)) => Err(PublishError::Rejected("the broker nacked the message".into())),
            Err(e) => Err(PublishError::from_lapin("waiting for the confirm", &e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_brokers_size_limit_is_read_from_its_refusal() {
        assert_eq!(
            learned_max_size(
                "PRECONDITION_FAILED - message size 2000 is larger than configured max size 1024"
            ),
            Some(1024)
        );
        assert_eq!(learned_max_size("NOT_FOUND - no exchange 'x'"), None);
    }
}
