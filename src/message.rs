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
    /// The row version that was read (its `xmin`): every state change the relay writes for the
    /// row names it, so a row that was replaced meanwhile (a TRUNCATE and a new row with the
    /// same id, a delete and re-insert, an update by hand) is never marked for what was sent.
    pub version: i64,
    /// A value of the row the relay could not decode (its headers' JSON, its timestamp): the
    /// row is parked with this reason and nothing of it is sent. The field it names holds an
    /// empty value.
    pub defect: Option<Unpublishable>,
}

/// What the broker takes in one message, as negotiated on the connection.
#[derive(Debug, Clone, Copy)]
pub struct BrokerLimits {
    /// The largest body (`rabbitmq.max_message_bytes`, lowered to the broker's
    /// `max_message_size` once it refused one as larger).
    pub max_body: usize,
    /// The connection's negotiated `frame_max`: the properties and headers travel in one
    /// content-header frame, which may not be larger (RabbitMQ closes the whole connection
    /// with `FRAME_ERROR` otherwise).
    pub frame_max: usize,
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
/// the contract's properties and headers, within what the broker takes (`limits`). The payload
/// moves into the message (the row keeps what settling it needs).
pub fn build(
    row: &mut OutboxRow,
    table: &str,
    default_exchange: &str,
    limits: BrokerLimits,
) -> Result<OutboundMessage, Unpublishable> {
    build_with(row, table, default_exchange, JSON, limits)
}

/// The content type of the relay's own `jsonb` payloads.
pub const JSON: &str = "application/json";

/// [`build`] with the body's content type given (an adopted table's `text` or `bytea` payload).
pub fn build_with(
    row: &mut OutboxRow,
    table: &str,
    default_exchange: &str,
    content_type: &str,
    limits: BrokerLimits,
) -> Result<OutboundMessage, Unpublishable> {
    if let Some(defect) = &row.defect {
        return Err(defect.clone());
    }
    let max_bytes = limits.max_body;
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
    check_header_frame(row, &properties, limits.frame_max)?;
    Ok(OutboundMessage {
        exchange: exchange.to_owned(),
        routing_key,
        body: std::mem::take(&mut row.payload),
        properties,
    })
}

/// A content-header frame's bytes besides the properties: frame type, channel, size, class,
/// weight, body size and the frame-end octet.
const HEADER_FRAME_OVERHEAD: usize = 1 + 2 + 4 + 2 + 2 + 8 + 1;

/// Refuses properties whose content-header frame would exceed `frame_max`. The exact size is
/// the AMQP client's own encoding; it is computed only when a cheap bound says it might not
/// fit (a row's headers are small almost always).
fn check_header_frame(
    row: &OutboxRow,
    properties: &BasicProperties,
    frame_max: usize,
) -> Result<(), Unpublishable> {
    // Every JSON value takes at most 9 bytes more than 5 times its own text in AMQP
    // (a one-digit number becomes a tagged 8-byte integer); the rest of the properties are
    // short strings (255 bytes each at most) and the key, a long string.
    let bound = 5 * json_text_bound(&row.headers)
        + row.ordering_key.len()
        + 8 * 260
        + HEADER_FRAME_OVERHEAD;
    if bound <= frame_max {
        return Ok(());
    }
    let encoded = cookie_factory::gen_simple(
        lapin::protocol::basic::gen_properties(properties),
        Vec::new(),
    )
    .map_err(|e| Unpublishable(format!("headers cannot be encoded in AMQP: {e}")))?;
    let size = encoded.len() + HEADER_FRAME_OVERHEAD;
    if size > frame_max {
        return Err(Unpublishable(format!(
            "headers and properties take {size} bytes (headers, ordering_key as x-ordering-key, \
             dedup_key, event_type); the broker's frame_max is {frame_max}"
        )));
    }
    Ok(())
}

/// An upper bound of the length of `value` written as JSON text, plus 9 bytes per value.
fn json_text_bound(value: &serde_json::Value) -> usize {
    use serde_json::Value;
    9 + match value {
        Value::Null | Value::Bool(_) => 5,
        Value::Number(_) => 24,
        Value::String(s) => s.len() + 2,
        Value::Array(items) => items.iter().map(json_text_bound).sum::<usize>() + 2,
        Value::Object(map) => {
            map.iter()
                .map(|(k, v)| k.len() + 3 + json_text_bound(v))
                .sum::<usize>()
                + 2
        }
    }
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

    const LIMITS: BrokerLimits = BrokerLimits {
        max_body: 1 << 20,
        frame_max: 131_072,
    };

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
            version: 1,
            defect: None,
        }
    }

    #[test]
    fn a_row_becomes_a_persistent_message_with_the_contract_properties() {
        let m = build(&mut row(), "public.outbox", "events", LIMITS).unwrap();
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
            build(&mut r, "t", "events", LIMITS).unwrap().exchange,
            "audit"
        );
    }

    #[test]
    fn rows_that_can_never_be_sent_say_why() {
        let mut r = row();
        r.dedup_key = "k".repeat(300);
        assert!(build(&mut r, "t", "events", LIMITS)
            .unwrap_err()
            .0
            .contains("dedup_key is 300 bytes"));
        let mut r = row();
        r.exchange = Some("no spaces".into());
        assert!(build(&mut r, "t", "events", LIMITS)
            .unwrap_err()
            .0
            .contains("exchange name"));
        let mut r = row();
        r.headers = json!([1, 2]);
        assert!(build(&mut r, "t", "events", LIMITS)
            .unwrap_err()
            .0
            .contains("an array"));
        assert!(build(
            &mut row(),
            "t",
            "events",
            BrokerLimits {
                max_body: 4,
                ..LIMITS
            }
        )
        .unwrap_err()
        .0
        .contains("at most 4"));
    }

    #[test]
    fn headers_past_the_frame_are_refused_and_headers_just_inside_it_go_out() {
        let with_blob = |len: usize| {
            let mut r = row();
            r.headers = json!({ "blob": "x".repeat(len) });
            r
        };
        let error = build(&mut with_blob(200_000), "t", "events", LIMITS).unwrap_err();
        assert!(
            error.0.contains("frame_max is 131072") && error.0.contains("headers"),
            "{error}"
        );
        // The exact size: the largest blob that fits, found by the encoder itself, goes out,
        // and one byte more does not.
        let fits = (100_000..131_072)
            .rev()
            .find(|&len| build(&mut with_blob(len), "t", "events", LIMITS).is_ok())
            .expect("some blob fits");
        assert!(
            fits > 130_000,
            "only the other properties take room: {fits}"
        );
        assert!(build(&mut with_blob(fits + 1), "t", "events", LIMITS).is_err());
        let m = build(&mut with_blob(fits), "t", "events", LIMITS).unwrap();
        let encoded = cookie_factory::gen_simple(
            lapin::protocol::basic::gen_properties(&m.properties),
            Vec::new(),
        )
        .unwrap();
        assert_eq!(encoded.len() + HEADER_FRAME_OVERHEAD, 131_072);
    }

    #[test]
    fn the_cheap_bound_is_never_below_the_encoded_size() {
        for headers in [
            json!({}),
            json!({"n": [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]}),
            json!({"a": {"b": {"c": [[], [[]], {}, null, true, false, 1.5, -7]}}}),
            json!({"k": "x".repeat(1000), "": ""}),
        ] {
            let mut r = row();
            r.headers = headers.clone();
            let m = build(&mut r.clone(), "t", "events", LIMITS).unwrap();
            let encoded = cookie_factory::gen_simple(
                lapin::protocol::basic::gen_properties(&m.properties),
                Vec::new(),
            )
            .unwrap();
            let bound = 5 * json_text_bound(&r.headers) + r.ordering_key.len() + 8 * 260;
            assert!(
                encoded.len() <= bound,
                "{headers}: {} > {bound}",
                encoded.len()
            );
        }
    }

    #[test]
    fn a_row_the_store_could_not_decode_is_refused_with_its_reason() {
        let mut r = row();
        r.defect = Some(Unpublishable("created_at is not a time".into()));
        assert_eq!(
            build(&mut r, "t", "events", LIMITS).unwrap_err().0,
            "created_at is not a time"
        );
    }

    #[test]
    fn a_replay_keeps_the_originals_properties_and_adds_the_replay_header() {
        let original = build(&mut row(), "public.outbox", "events", LIMITS).unwrap();
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
        let m = build(&mut r, "t", "events", LIMITS).unwrap();
        let h = m.properties.headers().as_ref().unwrap().inner();
        assert_eq!(h.get("nothing"), Some(&AMQPValue::Void));
        assert!(matches!(h.get("nested"), Some(AMQPValue::FieldTable(_))));
    }
}
