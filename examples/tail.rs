//! Prints the messages an exchange routes to it: the consumer of the README's quickstart, to
//! see the relay's messages arrive. It binds a queue of its own (exclusive, deleted when it
//! stops) to the exchange, so it sees the messages published after it started, and nothing
//! else consumes them.
//!
//! cargo run --release --example tail -- AMQP_URL EXCHANGE [BINDING_KEY]
//!
//! BINDING_KEY defaults to `#` (every routing key, on a topic exchange). When the exchange does
//! not exist yet it waits for it up to 30 seconds (the relay declares it at connect when the
//! table's config has `declare_exchange`). Each message is printed as two lines: its exchange,
//! routing key, `message_id`, `type` and `x-ordering-key` header, then its body.
//! tests/quickstart.rs runs this file's `Tail` with the arguments of the README's command.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};

/// How long `Tail::bind` waits for the exchange to exist.
const EXCHANGE_WAIT: Duration = Duration::from_secs(30);
/// Pause between two looks for the exchange.
const EXCHANGE_RETRY: Duration = Duration::from_millis(200);

/// A queue of its own bound to an exchange, and the consumer on it.
pub struct Tail {
    connection: Connection,
    _channel: Channel,
    consumer: Consumer,
}

impl Tail {
    /// Connects to `url`, waits for `exchange` to exist, and binds a queue of its own to it
    /// with `binding`. Messages published from then on are received.
    pub async fn bind(url: &str, exchange: &str, binding: &str) -> anyhow::Result<Tail> {
        let connection = Connection::connect(
            url,
            ConnectionProperties::default().with_connection_name("outbox-relay tail".into()),
        )
        .await
        .context("connecting to RabbitMQ")?;
        wait_for_exchange(&connection, exchange).await?;
        let channel = connection.create_channel().await?;
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .context("declaring the tail's queue")?;
        channel
            .queue_bind(
                queue.name().clone(),
                exchange.into(),
                binding.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("binding the tail's queue to exchange {exchange}"))?;
        let consumer = channel
            .basic_consume(
                queue.name().clone(),
                "tail".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Tail {
            connection,
            _channel: channel,
            consumer,
        })
    }

    /// The next message, acked and described as printed (`None` when the consumer ended).
    pub async fn next(&mut self) -> anyhow::Result<Option<String>> {
        let Some(delivery) = self.consumer.next().await else {
            return Ok(None);
        };
        let delivery = delivery.context("receiving a message")?;
        delivery.ack(BasicAckOptions::default()).await?;
        Ok(Some(describe(&delivery)))
    }

    /// Closes the connection (its queue goes with it).
    pub async fn close(self) {
        let _ = self.connection.close(200, "tail done".into()).await;
    }
}

/// Waits until `exchange` exists: a passive declare on a channel of its own each time, since a
/// failed one closes its channel.
async fn wait_for_exchange(connection: &Connection, exchange: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + EXCHANGE_WAIT;
    let mut said = false;
    loop {
        let channel = connection.create_channel().await?;
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let found = channel
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Topic,
                passive,
                FieldTable::default(),
            )
            .await;
        match found {
            Ok(()) => {
                let _ = channel.close(200, "found".into()).await;
                return Ok(());
            }
            Err(e) if Instant::now() >= deadline => {
                bail!(
                    "exchange {exchange} does not exist after {}s: is the relay running, with declare_exchange in the table's config? ({e})",
                    EXCHANGE_WAIT.as_secs()
                )
            }
            Err(_) => {
                if !said {
                    eprintln!("tail: waiting for exchange {exchange} to exist");
                    said = true;
                }
                tokio::time::sleep(EXCHANGE_RETRY).await;
            }
        }
    }
}

/// A message as the tail prints it: one line of what identifies it, one line of its body.
pub fn describe(delivery: &Delivery) -> String {
    let props = &delivery.properties;
    let text = |value: Option<String>| value.unwrap_or_else(|| "-".to_owned());
    let headers = props.headers().clone().unwrap_or_default();
    let ordering_key = match headers.inner().get("x-ordering-key") {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        Some(AMQPValue::ShortString(s)) => s.to_string(),
        Some(other) => format!("{other:?}"),
        None => "-".to_owned(),
    };
    format!(
        "exchange={} routing_key={} message_id={} type={} x-ordering-key={}\n{}",
        delivery.exchange,
        delivery.routing_key,
        text(props.message_id().as_ref().map(|s| s.to_string())),
        text(props.kind().as_ref().map(|s| s.to_string())),
        ordering_key,
        String::from_utf8_lossy(&delivery.data),
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (url, exchange, binding) = match args.as_slice() {
        [url, exchange] => (url, exchange, "#"),
        [url, exchange, binding] => (url, exchange, binding.as_str()),
        _ => bail!("usage: tail AMQP_URL EXCHANGE [BINDING_KEY]"),
    };
    let mut tail = Tail::bind(url, exchange, binding).await?;
    eprintln!(
        "tail: bound to exchange {exchange} with {binding:?}; waiting for messages (Ctrl-C stops)"
    );
    while let Some(message) = tail.next().await? {
        println!("{message}");
    }
    tail.close().await;
    Ok(())
}
