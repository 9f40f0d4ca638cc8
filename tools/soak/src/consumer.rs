//! The real consumer: the test kit's consumer on the soak's durable queue, straight to the
//! broker (not through a proxy), acking each message after the checker has seen it, and
//! reconnecting when a fault closes its connection.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use outbox_relay_testkit::consumer::{
    header_i64, header_string, message_id, Consumer, ConsumerSettings,
};

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
        let seen = Delivery {
            id: header_i64(p, "x-outbox-id"),
            message_id: message_id(p).to_owned(),
            ordering_key: header_string(p, "x-ordering-key").unwrap_or_default(),
            body_hash: body_hash(&delivery.data),
            at: Instant::now(),
            redelivered: delivery.redelivered,
        };
        checker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe(seen);
    })
    .await
}
