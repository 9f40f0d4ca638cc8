//! The real consumer: a lapin consumer on the soak's durable queue, straight to the broker (not
//! through a proxy), acking each message after the checker has seen it, and reconnecting when a
//! fault closes its connection.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use tokio_util::sync::CancellationToken;

use crate::checker::{body_hash, Checker, Delivery};
use crate::setup::QUEUE;

/// Consumes until `stop`, feeding every delivery to `checker`. Returns how often it reconnected.
pub async fn run(
    url: String,
    checker: Arc<Mutex<Checker>>,
    stop: CancellationToken,
    reconnects: Arc<AtomicU64>,
) {
    let mut first = true;
    while !stop.is_cancelled() {
        if !first {
            reconnects.fetch_add(1, Ordering::Relaxed);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = stop.cancelled() => break,
            }
        }
        first = false;
        if consume(&url, &checker, &stop).await.is_ok() {
            break;
        }
    }
}

/// One connection's life; `Ok` only when stopped on purpose.
async fn consume(
    url: &str,
    checker: &Mutex<Checker>,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let properties =
        ConnectionProperties::default().with_connection_name("obr-soak-consumer".into());
    let connection =
        tokio::time::timeout(Duration::from_secs(5), Connection::connect(url, properties))
            .await??;
    let channel = connection.create_channel().await?;
    channel.basic_qos(500, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(
            QUEUE.into(),
            "obr-soak-consumer".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    loop {
        let next = tokio::select! {
            next = consumer.next() => next,
            _ = stop.cancelled() => {
                let _ = tokio::time::timeout(Duration::from_secs(2), connection.close(200, "soak over".into())).await;
                return Ok(());
            }
        };
        let delivery = match next {
            Some(Ok(d)) => d,
            Some(Err(e)) => anyhow::bail!("consumer: {e}"),
            None => anyhow::bail!("consumer stream ended"),
        };
        let seen = Delivery {
            id: header_i64(&delivery.properties, "x-outbox-id"),
            message_id: delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default(),
            ordering_key: header_string(&delivery.properties, "x-ordering-key").unwrap_or_default(),
            body_hash: body_hash(&delivery.data),
            at: Instant::now(),
            redelivered: delivery.redelivered,
        };
        checker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe(seen);
        // Acked only after the checker saw it: a lost ack means a redelivery, never a loss.
        delivery.ack(BasicAckOptions::default()).await?;
    }
}

fn header<'a>(p: &'a lapin::BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    p.headers().as_ref()?.inner().get(name)
}

fn header_i64(p: &lapin::BasicProperties, name: &str) -> Option<i64> {
    match header(p, name)? {
        AMQPValue::LongLongInt(i) => Some(*i),
        AMQPValue::LongInt(i) => Some(i64::from(*i)),
        AMQPValue::LongUInt(i) => Some(i64::from(*i)),
        AMQPValue::ShortInt(i) => Some(i64::from(*i)),
        _ => None,
    }
}

fn header_string(p: &lapin::BasicProperties, name: &str) -> Option<String> {
    match header(p, name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}
