//! The real consumer: the test kit's consumer on the soak's durable queue, straight to the
//! broker (not through a proxy), acking each message after the checker has seen it, and
//! reconnecting when a fault closes its connection.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use outbox_relay_testkit::consumer::{
    header_i64, header_string, message_id, Consumer, ConsumerSettings,
};

use crate::badrows::{self, Received, KEY_PREFIX};
use crate::checker::{body_hash, Checker, Delivery};
use crate::setup::QUEUE;

/// Starts consuming, feeding every delivery to `checker`; [`Consumer::reconnects`] says how
/// often it connected again.
pub async fn start(url: String, checker: Arc<Mutex<Checker>>) -> anyhow::Result<Consumer> {
    let mut settings = ConsumerSettings::new(url, QUEUE);
    settings.connection_name = Some("obr-soak-consumer".into());
    settings.consumer_tag = "obr-soak-consumer".into();
    Consumer::start(settings, move |delivery| {
        let p = &delivery.properties;
        let ordering_key = header_string(p, "x-ordering-key").unwrap_or_default();
        // A bad row's whole message is kept: its every byte is compared with the row's.
        let content = ordering_key.starts_with(KEY_PREFIX).then(|| {
            Box::new(Received {
                exchange: delivery.exchange.as_str().to_string(),
                routing_key: delivery.routing_key.as_str().to_string(),
                message_id: p.message_id().as_ref().map(|s| s.as_str().to_string()),
                event_type: p.kind().as_ref().map(|s| s.as_str().to_string()),
                content_type: p.content_type().as_ref().map(|s| s.as_str().to_string()),
                ordering_key: Some(ordering_key.clone()),
                headers: p
                    .headers()
                    .as_ref()
                    .map_or(serde_json::Value::Null, |h| badrows::table(h, true)),
                body: delivery.data.clone(),
            })
        });
        let seen = Delivery {
            id: header_i64(p, "x-outbox-id"),
            message_id: message_id(p).to_owned(),
            ordering_key,
            body_hash: body_hash(&delivery.data),
            at: Instant::now(),
            redelivered: delivery.redelivered,
            content,
        };
        checker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe(seen);
    })
    .await
}
