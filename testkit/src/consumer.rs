//! A real AMQP consumer on one queue. It hands every delivery to the caller's handler before
//! acking it, so a message lost with a closed connection is redelivered rather than lost, and
//! it reconnects when a fault closes its connection. Owns the connection, the subscription and
//! the ack; what a delivery means is the handler's business.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long a connection attempt (connect, channel, qos, consume) may take before it counts as
/// failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// With no delivery for this long, the consumer checks that its connection and channel are still
/// open and connects again if not: a connection the broker dropped without the stream ending
/// must not leave the consumer waiting forever.
const QUIET_CHECK: Duration = Duration::from_secs(2);
/// How long an ack may take before the connection counts as lost.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `stop` waits for a polite close before it aborts the consumer's task.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause before connecting again after the connection was lost or an attempt failed.
const RECONNECT_DELAY: Duration = Duration::from_millis(200);

/// How the consumer acknowledges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acks {
    /// Each message is acked once the handler returned; at most `prefetch` are unacked at once.
    AfterHandler { prefetch: u16 },
    /// No acks (`no_ack`): the broker forgets a message once sent. The fastest, for measuring.
    None,
}

/// Where and how to consume.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    pub url: String,
    pub queue: String,
    /// The connection's name in the broker's connection list.
    pub connection_name: Option<String>,
    pub consumer_tag: String,
    pub acks: Acks,
    /// Connect again when the connection is lost (else consuming ends with it).
    pub reconnect: bool,
}

impl ConsumerSettings {
    /// Acks after the handler with 500 messages in flight, reconnecting: what an application's
    /// consumer does.
    pub fn new(url: impl Into<String>, queue: impl Into<String>) -> ConsumerSettings {
        ConsumerSettings {
            url: url.into(),
            queue: queue.into(),
            connection_name: None,
            consumer_tag: String::new(),
            acks: Acks::AfterHandler { prefetch: 500 },
            reconnect: true,
        }
    }
}

/// A running consumer; consuming ends with [`Consumer::stop`] or when the value is dropped.
pub struct Consumer {
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
    reconnects: Arc<AtomicU64>,
}

impl Consumer {
    /// Subscribes to the queue, then returns: nothing that reaches the queue afterwards is
    /// missed. `handle` sees each delivery, in arrival order, before it is acked.
    pub async fn start<H>(settings: ConsumerSettings, handle: H) -> anyhow::Result<Consumer>
    where
        H: FnMut(&Delivery) + Send + 'static,
    {
        let first = subscribe(&settings)
            .await
            .with_context(|| format!("starting a consumer on queue {}", settings.queue))?;
        let stop = CancellationToken::new();
        let reconnects = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(consume(
            settings,
            first,
            handle,
            stop.clone(),
            reconnects.clone(),
        ));
        Ok(Consumer {
            stop,
            task: Some(task),
            reconnects,
        })
    }

    /// How often the consumer connected again (attempts after the first, failed ones included).
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// Stops consuming and closes the connection politely (waiting at most 2 s for the broker;
    /// a task stuck anywhere else is aborted after 5 s).
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(STOP_TIMEOUT, &mut task).await.is_err() {
                task.abort();
            }
        }
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A connection with a subscription on it.
struct Subscription {
    connection: Connection,
    channel: lapin::Channel,
    deliveries: lapin::Consumer,
}

impl Subscription {
    fn open(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }
}

/// Connects and subscribes, every step of it bounded by `CONNECT_TIMEOUT` (a broker that is
/// starting or stopping may accept a connection and then answer nothing).
async fn subscribe(settings: &ConsumerSettings) -> anyhow::Result<Subscription> {
    tokio::time::timeout(CONNECT_TIMEOUT, subscribe_unbounded(settings))
        .await
        .context("connecting and subscribing timed out")?
}

async fn subscribe_unbounded(settings: &ConsumerSettings) -> anyhow::Result<Subscription> {
    let mut properties = ConnectionProperties::default();
    if let Some(name) = &settings.connection_name {
        properties = properties.with_connection_name(name.as_str().into());
    }
    let connection = Connection::connect(&settings.url, properties).await?;
    let channel = connection.create_channel().await?;
    let mut options = BasicConsumeOptions::default();
    match settings.acks {
        Acks::AfterHandler { prefetch } => {
            channel
                .basic_qos(prefetch, BasicQosOptions::default())
                .await?;
        }
        Acks::None => options.no_ack = true,
    }
    let deliveries = channel
        .basic_consume(
            settings.queue.as_str().into(),
            settings.consumer_tag.as_str().into(),
            options,
            FieldTable::default(),
        )
        .await?;
    Ok(Subscription {
        connection,
        channel,
        deliveries,
    })
}

/// Consumes until stopped, connecting again whenever the connection is lost.
async fn consume<H>(
    settings: ConsumerSettings,
    first: Subscription,
    mut handle: H,
    stop: CancellationToken,
    reconnects: Arc<AtomicU64>,
) where
    H: FnMut(&Delivery),
{
    let mut current = Some(first);
    loop {
        let subscription = match current.take() {
            Some(s) => s,
            None => {
                if !settings.reconnect {
                    return;
                }
                reconnects.fetch_add(1, Ordering::Relaxed);
                tokio::select! {
                    _ = tokio::time::sleep(RECONNECT_DELAY) => {}
                    _ = stop.cancelled() => return,
                }
                let attempt = tokio::select! {
                    attempt = subscribe(&settings) => attempt,
                    _ = stop.cancelled() => return,
                };
                match attempt {
                    Ok(s) => s,
                    Err(_) => continue,
                }
            }
        };
        if let Stopped::OnPurpose = serve(subscription, &settings, &mut handle, &stop).await {
            return;
        }
    }
}

enum Stopped {
    OnPurpose,
    ConnectionLost,
}

/// One connection's life.
async fn serve<H>(
    mut subscription: Subscription,
    settings: &ConsumerSettings,
    handle: &mut H,
    stop: &CancellationToken,
) -> Stopped
where
    H: FnMut(&Delivery),
{
    loop {
        let next = tokio::select! {
            next = subscription.deliveries.next() => next,
            _ = tokio::time::sleep(QUIET_CHECK) => {
                if subscription.open() {
                    continue;
                }
                return Stopped::ConnectionLost;
            }
            _ = stop.cancelled() => {
                let close = subscription.connection.close(200, "consumer stopped".into());
                let _ = tokio::time::timeout(Duration::from_secs(2), close).await;
                return Stopped::OnPurpose;
            }
        };
        let Some(Ok(delivery)) = next else {
            return Stopped::ConnectionLost;
        };
        handle(&delivery);
        if let Acks::AfterHandler { .. } = settings.acks {
            // Acked only after the handler saw it: a lost ack means a redelivery, never a loss.
            let ack = tokio::time::timeout(ACK_TIMEOUT, delivery.ack(BasicAckOptions::default()));
            if !matches!(ack.await, Ok(Ok(_))) {
                return Stopped::ConnectionLost;
            }
        }
    }
}

/// Header `name` of a message.
pub fn header<'a>(properties: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    properties.headers().as_ref()?.inner().get(name)
}

/// An integer header (any of AMQP's integer types).
pub fn header_i64(properties: &BasicProperties, name: &str) -> Option<i64> {
    header(properties, name).and_then(as_i64)
}

/// A string header (long or short string).
pub fn header_string(properties: &BasicProperties, name: &str) -> Option<String> {
    header(properties, name).and_then(as_string)
}

/// An AMQP value of any integer type as an `i64`.
pub fn as_i64(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::LongLongInt(i) => Some(*i),
        AMQPValue::LongInt(i) => Some(i64::from(*i)),
        AMQPValue::LongUInt(i) => Some(i64::from(*i)),
        AMQPValue::ShortInt(i) => Some(i64::from(*i)),
        _ => None,
    }
}

/// An AMQP long or short string as a `String`.
pub fn as_string(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// The message's `message_id`, or "" when it has none.
pub fn message_id(properties: &BasicProperties) -> &str {
    properties
        .message_id()
        .as_ref()
        .map_or("", |id| id.as_str())
}
