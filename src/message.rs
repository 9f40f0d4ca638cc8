//! Turns an outbox row into the AMQP message the contract promises, or into the reason it can
//! never be sent. Pure: no I/O, so every representability rule is unit-tested.

use chrono::{DateTime, Utc};
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::BasicProperties;

use crate::config::exchange_name_problem;

/// One row as fetched by the store.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: i64,
    pub dedup_key: String,
    pub ordering_key: String,
    pub routing_key: String,
    pub event_type: String,
    pub payload: Vec<u8>,
    pub headers: serde_json::Value,
    pub exchange: Option<String>,
    pub created_at: DateTime<Utc>,
    pub attempts: i32,
    /// The oid of the table the row was read from: a table dropped and created again reuses
    /// ids, so marks name the table instance too.
    pub table_oid: i64,
}

/// A message ready for `basic_publish`.
#[derive(Debug, Clone)]
pub struct OutboundMessage {
    pub exchange: String,
    pub routing_key: String,
    pub body: Vec<u8>,
    pub properties: BasicProperties,
}

/// Why a row can never be published as it stands (it is parked at once).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unpublishable: {0}")]
pub struct Unpublishable(pub String);

/// AMQP short strings (exchange, routing key, message_id, type, header names) hold 255 bytes.
const SHORT_STRING_MAX: usize = 255;

fn short(field: &str, value: &str) -> Result<ShortString, Unpublishable> {
    if value.len() > SHORT_STRING_MAX {
        return Err(Unpublishable(format!(
            "{field} is {} bytes; AMQP allows at most {SHORT_STRING_MAX}",
            value.len()
        )));
    }
    Ok(value.into())
}

/// Builds the message for `row`: its exchange (else `default_exchange`), routing key, body and
/// the contract's properties and headers. `max_bytes` is the largest body the broker accepts.
/// The payload moves into the message (the row keeps what settling it needs).
pub fn build(
    row: &mut OutboxRow,
    table: &str,
    default_exchange: &str,
    max_bytes: usize,
) -> Result<OutboundMessage, Unpublishable> {
    build_with(row, table, default_exchange, JSON, max_bytes)
}

/// The content type of the relay's own `jsonb` payloads.
pub const JSON: &str = "application/json";

/// [`build`] with the body's content type given (an adopted table's `text` or `bytea` payload).
pub fn build_with(
    row: &mut OutboxRow,
    table: &str,
    default_exchange: &str,
    content_type: &str,
    max_bytes: usize,
) -> Result<OutboundMessage, Unpublishable> {
    let exchange = row.exchange.as_deref().unwrap_or(default_exchange);
    if let Some(problem) = exchange_name_problem(exchange) {
        return Err(Unpublishable(problem));
    }
    if row.payload.len() > max_bytes {
        return Err(Unpublishable(format!(
            "payload is {} bytes; the broker accepts at most {max_bytes}",
            row.payload.len()
        )));
    }
    let mut headers = match &row.headers {
        serde_json::Value::Object(map) => {
            let mut table = FieldTable::default();
            for (name, value) in map {
                table.insert(short("header name", name)?, amqp_value(value));
            }
            table
        }
        serde_json::Value::Null => FieldTable::default(),
        other => {
            return Err(Unpublishable(format!(
                "headers must be a JSON object, got {}",
                json_kind(other)
            )))
        }
    };
    headers.insert("x-outbox-table".into(), AMQPValue::LongString(table.into()));
    headers.insert("x-outbox-id".into(), AMQPValue::LongLongInt(row.id));
    headers.insert(
        "x-ordering-key".into(),
        AMQPValue::LongString(row.ordering_key.as_str().into()),
    );
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(short("dedup_key", &row.dedup_key)?)
        .with_type(short("event_type", &row.event_type)?)
        .with_content_type(short("content_type", content_type)?)
        .with_timestamp(row.created_at.timestamp().max(0) as u64)
        .with_headers(headers);
    let routing_key = short("routing_key", &row.routing_key)?.to_string();
    Ok(OutboundMessage {
        exchange: exchange.to_owned(),
        routing_key,
        body: std::mem::take(&mut row.payload),
        properties,
    })
}

/// The header that marks a replayed message (`outbox-relay replay`).
pub const REPLAY_HEADER: &str = "x-outbox-replay";

/// Marks `message`, built by [`build`] from an already published row, as a replay: every
/// property and header stays (`message_id` above all, so consumers see the original's
/// identity), and [`REPLAY_HEADER`] says which replay sent it (`replay`: its start time).
pub fn mark_replay(message: &mut OutboundMessage, replay: &str) {
    let mut headers = message.properties.headers().clone().unwrap_or_default();
    headers.insert(REPLAY_HEADER.into(), AMQPValue::LongString(replay.into()));
    message.properties = message.properties.clone().with_headers(headers);
}

/// JSON to AMQP field values: every JSON value has a faithful AMQP form.
fn amqp_value(value: &serde_json::Value) -> AMQPValue {
    use serde_json::Value;
    match value {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => AMQPValue::LongLongInt(i),
            None => AMQPValue::Double(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_str())),
        Value::Array(items) => AMQPValue::FieldArray(FieldArray::from(
            items.iter().map(amqp_value).collect::<Vec<_>>(),
        )),
        Value::Object(map) => {
            let mut table = FieldTable::default();
            for (k, v) in map {
                // Nested names are short strings too; an over-long nested name is cut rather
                // than dropping the whole message (top-level names are checked strictly).
                let name: String = k
                    .chars()
                    .scan(0, |n, c| {
                        *n += c.len_utf8();
                        (*n <= SHORT_STRING_MAX).then_some(c)
                    })
                    .collect();
                table.insert(name.into(), amqp_value(v));
            }
            AMQPValue::FieldTable(table)
        }
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row() -> OutboxRow {
        OutboxRow {
            id: 7,
            dedup_key: "order-1-created".into(),
            ordering_key: "order-1".into(),
            routing_key: "orders.created".into(),
            event_type: "OrderCreated".into(),
            payload: br#"{"total":5}"#.to_vec(),
            headers: json!({"tenant": "acme", "n": 3, "ok": true, "ratio": 0.5}),
            exchange: None,
            created_at: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            attempts: 0,
            table_oid: 0,
        }
    }

    #[test]
    fn a_row_becomes_a_persistent_message_with_the_contract_properties() {
        let m = build(&mut row(), "public.outbox", "events", 1 << 20).unwrap();
        assert_eq!(m.exchange, "events");
        assert_eq!(m.routing_key, "orders.created");
        let p = &m.properties;
        assert_eq!(p.delivery_mode(), &Some(2));
        assert_eq!(
            p.message_id().as_ref().map(|s| s.as_str()),
            Some("order-1-created")
        );
        assert_eq!(p.kind().as_ref().map(|s| s.as_str()), Some("OrderCreated"));
        assert_eq!(p.timestamp(), &Some(1_700_000_000));
        let h = p.headers().as_ref().unwrap().inner();
        assert_eq!(h.get("x-outbox-id"), Some(&AMQPValue::LongLongInt(7)));
        assert_eq!(h.get("n"), Some(&AMQPValue::LongLongInt(3)));
        assert_eq!(h.get("ok"), Some(&AMQPValue::Boolean(true)));
        assert_eq!(h.get("ratio"), Some(&AMQPValue::Double(0.5)));
    }

    #[test]
    fn the_rows_exchange_overrides_the_tables() {
        let mut r = row();
        r.exchange = Some("audit".into());
        assert_eq!(
            build(&mut r, "t", "events", 1 << 20).unwrap().exchange,
            "audit"
        );
    }

    #[test]
    fn rows_that_can_never_be_sent_say_why() {
        let mut r = row();
        r.dedup_key = "k".repeat(300);
        assert!(build(&mut r, "t", "events", 1 << 20)
            .unwrap_err()
            .0
            .contains("dedup_key is 300 bytes"));
        let mut r = row();
        r.exchange = Some("no spaces".into());
        assert!(build(&mut r, "t", "events", 1 << 20)
            .unwrap_err()
            .0
            .contains("exchange name"));
        let mut r = row();
        r.headers = json!([1, 2]);
        assert!(build(&mut r, "t", "events", 1 << 20)
            .unwrap_err()
            .0
            .contains("an array"));
        assert!(build(&mut row(), "t", "events", 4)
            .unwrap_err()
            .0
            .contains("at most 4"));
    }

    #[test]
    fn a_replay_keeps_the_originals_properties_and_adds_the_replay_header() {
        let original = build(&mut row(), "public.outbox", "events", 1 << 20).unwrap();
        let mut replay = original.clone();
        mark_replay(&mut replay, "2026-03-01T12:00:00.000000Z");
        let (p, q) = (&original.properties, &replay.properties);
        assert_eq!(p.message_id(), q.message_id());
        assert_eq!(p.kind(), q.kind());
        assert_eq!(p.timestamp(), q.timestamp());
        assert_eq!(p.delivery_mode(), q.delivery_mode());
        assert_eq!(p.content_type(), q.content_type());
        let mut headers = q.headers().as_ref().unwrap().inner().clone();
        assert_eq!(
            headers.remove(REPLAY_HEADER),
            Some(AMQPValue::LongString("2026-03-01T12:00:00.000000Z".into()))
        );
        assert_eq!(&headers, p.headers().as_ref().unwrap().inner());
        assert_eq!(
            (replay.exchange, replay.body),
            (original.exchange, original.body)
        );
    }

    #[test]
    fn nested_headers_arrays_and_nulls_are_represented() {
        let mut r = row();
        r.headers = json!({"nested": {"a": [1, null, "x"]}, "nothing": null});
        let m = build(&mut r, "t", "events", 1 << 20).unwrap();
        let h = m.properties.headers().as_ref().unwrap().inner();
        assert_eq!(h.get("nothing"), Some(&AMQPValue::Void));
        assert!(matches!(h.get("nested"), Some(AMQPValue::FieldTable(_))));
    }
}
