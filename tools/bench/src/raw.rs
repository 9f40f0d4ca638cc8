//! The baseline: the same messages the relay would send, published straight from memory with
//! lapin on a confirm-mode channel, keeping `window` unconfirmed messages at most. This is what
//! the broker can take from one publishing connection on this machine.

use anyhow::Context;
use futures::stream::{FuturesUnordered, StreamExt};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{Confirmation, Connection, ConnectionProperties};
use outbox_relay::message::OutboundMessage;

/// Publishes every message (mandatory, with its properties) and waits for all confirms.
/// Fails on any nack, return or channel error: the baseline must deliver everything too.
pub async fn publish_all(
    amqp_url: &str,
    connection_name: &str,
    messages: &[OutboundMessage],
    window: usize,
) -> anyhow::Result<()> {
    let connection = Connection::connect(
        amqp_url,
        ConnectionProperties::default().with_connection_name(connection_name.into()),
    )
    .await
    .context("connecting the raw publisher")?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut in_flight = FuturesUnordered::new();
    let mut next = messages.iter();
    let mut more = true;
    loop {
        while more && in_flight.len() < window.max(1) {
            let Some(m) = next.next() else {
                more = false;
                break;
            };
            let confirm = channel
                .basic_publish(
                    m.exchange.as_str().into(),
                    m.routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    &m.body,
                    m.properties.clone(),
                )
                .await
                .context("raw publish")?;
            in_flight.push(confirm);
        }
        match in_flight.next().await {
            None => break,
            Some(Ok(Confirmation::Ack(None))) => {}
            Some(Ok(other)) => anyhow::bail!("the broker did not accept a raw publish: {other:?}"),
            Some(Err(e)) => return Err(e).context("waiting for a raw publish confirm"),
        }
    }
    let _ = connection.close(200, "raw publish done".into()).await;
    Ok(())
}
