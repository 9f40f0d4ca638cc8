//! Turns an outbox row into the AMQP message the contract promises, or into the reason it can
//! never be sent. Pure: no I/O, so every representability rule is unit-tested.

use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, Utc};
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::BasicProperties;

use crate::config::{
    exchange_name_problem, MessageFormat, OutboxSettings, PayloadType, PostgresSettings,
};

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
    /// The largest body, and whose limit it is.
    pub max_body: BodyLimit,
    /// The connection's negotiated `frame_max`: the properties and headers travel in one
    /// content-header frame, which may not be larger (RabbitMQ closes the whole connection
    /// with `FRAME_ERROR` otherwise).
    pub frame_max: usize,
}

/// The largest body a message may have, and whose limit it is: an oversized row's park reason
/// names the one that refused it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLimit {
    /// The relay's own `rabbitmq.max_message_bytes`.
    Configured(usize),
    /// The broker's `max_message_size`, lower than the configured limit, learned when the
    /// broker refused a message as larger.
    Broker(usize),
}

impl BodyLimit {
    pub fn bytes(self) -> usize {
        match self {
            BodyLimit::Configured(n) | BodyLimit::Broker(n) => n,
        }
    }
}

impl std::fmt::Display for BodyLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyLimit::Configured(n) => write!(f, "the relay's rabbitmq.max_message_bytes is {n}"),
            BodyLimit::Broker(n) => write!(
                f,
                "the broker accepts at most {n} (its max_message_size; it refused a larger message)"
            ),
        }
    }
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

/// Builds the message for `row` from a table of the relay's own, in the relay's own format
/// (see [`build_with`]).
pub fn build(
    row: &mut OutboxRow,
    table: &str,
    default_exchange: &str,
    limits: BrokerLimits,
) -> Result<OutboundMessage, Unpublishable> {
    build_with(
        row,
        table,
        default_exchange,
        &MessageShape::default(),
        limits,
    )
}

/// The content type of the relay's own `jsonb` payloads.
pub const JSON: &str = "application/json";

/// The content type of a CloudEvent in structured content mode (the JSON event format).
pub const CLOUDEVENTS_JSON: &str = "application/cloudevents+json; charset=utf-8";

/// The name under which an adopted table's trace column reaches message building (the fetch
/// puts it into the row's headers object, `store/columns.rs`): taken out and read, never sent.
pub const TRACE_CONTEXT_HEADER: &str = "x-outbox-trace-context";

/// The W3C Trace Context headers (and the W3C Baggage header) a message carries.
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";
pub const BAGGAGE: &str = "baggage";

/// What the payload column holds, which says how a structured CloudEvent carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PayloadKind {
    /// JSON text as PostgreSQL renders a `jsonb` or `json` value: always valid JSON.
    Json,
    /// UTF-8 text.
    Text,
    /// Bytes (`bytea`).
    Bytes,
}

/// The CloudEvents attributes a table sets besides the row's own.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CloudEventsShape {
    /// `source`: `cloudevents_source`, or the default naming the database and table.
    source: String,
    /// (row header, extension attribute), from `cloudevents_extensions`.
    extensions: Vec<(String, String)>,
}

/// How one table's rows become messages, decided once when the table's relay starts: the
/// payload's content type and kind, the format (the relay's own, or a CloudEvent in binary or
/// structured mode), and whether a trace column comes with the row. With the relay's own
/// format and no trace column, building a message does what it always did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageShape {
    content_type: String,
    payload: PayloadKind,
    format: MessageFormat,
    cloudevents: Option<CloudEventsShape>,
    trace_column: bool,
}

impl Default for MessageShape {
    /// A table of the relay's own (`jsonb` payload) in the relay's own format.
    fn default() -> Self {
        MessageShape {
            content_type: JSON.to_owned(),
            payload: PayloadKind::Json,
            format: MessageFormat::Outbox,
            cloudevents: None,
            trace_column: false,
        }
    }
}

impl MessageShape {
    /// The shape of `table`'s messages (its mapping, `message_format` and CloudEvents
    /// settings; `postgres` names the database of the default `source`).
    pub fn for_table(table: &OutboxSettings, postgres: &PostgresSettings) -> Self {
        let mapping = table.mapping.as_deref();
        let payload = match mapping.map(|m| m.payload_type) {
            None | Some(PayloadType::Jsonb) | Some(PayloadType::Json) => PayloadKind::Json,
            Some(PayloadType::Text) => PayloadKind::Text,
            Some(PayloadType::Bytea) => PayloadKind::Bytes,
        };
        MessageShape {
            content_type: mapping.map_or(JSON, |m| m.content_type.as_str()).to_owned(),
            payload,
            format: table.message_format,
            cloudevents: table
                .message_format
                .is_cloudevents()
                .then(|| CloudEventsShape {
                    source: table.cloudevents_source(postgres),
                    extensions: table.cloudevents_extension_pairs(),
                }),
            trace_column: mapping.is_some_and(|m| m.trace_context.is_some()),
        }
    }

    /// The payload's content type (`content_type` of the message in the relay's own format
    /// and in binary mode; `datacontenttype` in structured mode).
    pub fn content_type(&self) -> &str {
        &self.content_type
    }
}

/// Builds the message for `row`: its exchange (else `default_exchange`), routing key, body and
/// the contract's properties and headers, in the table's format (`shape`), within what the
/// broker takes (`limits`). The payload moves into the message (the row keeps what settling
/// it needs).
pub fn build_with(
    row: &mut OutboxRow,
    table: &str,
    default_exchange: &str,
    shape: &MessageShape,
    limits: BrokerLimits,
) -> Result<OutboundMessage, Unpublishable> {
    build_traced(row, table, default_exchange, shape, limits, None)
}

/// Moves an adopted table's trace column into the row's headers (as building does, which then
/// finds nothing more to move), so that [`producer_trace`] reads it.
pub fn take_trace(row: &mut OutboxRow, shape: &MessageShape) {
    if shape.trace_column {
        take_trace_column(row);
    }
}

/// The producer's trace context of `row`, for the relay's own span to continue: its
/// `traceparent` when it is a valid W3C one, and the `tracestate` beside it. None when the
/// row has none, or one that does not parse. An adopted table's trace column is read once
/// [`take_trace`] has moved it.
pub fn producer_trace(row: &OutboxRow) -> Option<(&str, Option<&str>)> {
    let map = row.headers.as_object()?;
    let traceparent = map
        .get(TRACEPARENT)?
        .as_str()
        .filter(|t| is_valid_traceparent(t))?;
    Some((traceparent, map.get(TRACESTATE).and_then(|v| v.as_str())))
}

/// [`build_with`], and with `relay_traceparent` (the relay's own span, when it exports spans)
/// the message's `traceparent` (header, and CloudEvents attribute) is that one, so that the
/// consumer continues from the relay's span; `tracestate` and `baggage` stay the row's (a
/// row without a valid traceparent sends no tracestate). None: the row's, as it is.
pub fn build_traced(
    row: &mut OutboxRow,
    table: &str,
    default_exchange: &str,
    shape: &MessageShape,
    limits: BrokerLimits,
    relay_traceparent: Option<&str>,
) -> Result<OutboundMessage, Unpublishable> {
    if let Some(defect) = &row.defect {
        return Err(defect.clone());
    }
    if shape.trace_column {
        take_trace_column(row);
    }
    let exchange = row.exchange.as_deref().unwrap_or(default_exchange);
    if let Some(problem) = exchange_name_problem(exchange) {
        return Err(Unpublishable(problem));
    }
    if row.payload.len() > limits.max_body.bytes() {
        return Err(Unpublishable(format!(
            "payload is {} bytes; {}",
            row.payload.len(),
            limits.max_body
        )));
    }
    let map = match &row.headers {
        serde_json::Value::Object(map) => Some(map),
        serde_json::Value::Null => None,
        other => {
            return Err(Unpublishable(format!(
                "headers must be a JSON object, got {}",
                json_kind(other)
            )))
        }
    };
    // W3C Trace Context: a traceparent that does not parse is not passed on, nor is the
    // tracestate that goes with it (a consumer would ignore both, or worse, continue a trace
    // that does not exist). An unsampled one (flags 00) is valid and goes on as it is.
    let trace = match map.and_then(|m| m.get(TRACEPARENT)) {
        None => Trace::None,
        Some(value) => match value.as_str().filter(|t| is_valid_traceparent(t)) {
            Some(traceparent) => Trace::Valid(traceparent),
            None => {
                tracing::debug!(
                    table,
                    id = row.id,
                    traceparent = %value,
                    "traceparent is not a W3C traceparent; not passed on (nor its tracestate)"
                );
                Trace::Invalid
            }
        },
    };
    let mut headers = FieldTable::default();
    for (name, value) in map.into_iter().flatten() {
        if matches!(trace, Trace::Invalid) && (name == TRACEPARENT || name == TRACESTATE) {
            continue;
        }
        if relay_traceparent.is_some() && name == TRACEPARENT {
            continue;
        }
        headers.insert(short("header name", name)?, amqp_value(value));
    }
    // The tracestate that goes with the producer's traceparent, for a CloudEvent.
    let tracestate = match trace {
        Trace::Valid(_) => map.and_then(|m| m.get(TRACESTATE)).and_then(|v| v.as_str()),
        Trace::None | Trace::Invalid => None,
    };
    let trace = match relay_traceparent {
        Some(relay) => {
            headers.insert(TRACEPARENT.into(), AMQPValue::LongString(relay.into()));
            Trace::Valid(relay)
        }
        None => trace,
    };
    headers.insert("x-outbox-table".into(), AMQPValue::LongString(table.into()));
    headers.insert("x-outbox-id".into(), AMQPValue::LongLongInt(row.id));
    headers.insert(
        "x-ordering-key".into(),
        AMQPValue::LongString(row.ordering_key.as_str().into()),
    );
    // Bytes the CloudEvents headers add to the content-header frame, for its bound.
    let mut added = 0;
    let (content_type, body) = match (shape.format, &shape.cloudevents) {
        (MessageFormat::CloudEvents, Some(ce)) => {
            let attributes = attributes(row, ce, trace, tracestate, map);
            for (name, value) in &attributes {
                let name = format!("cloudEvents:{name}");
                added += name.len() + value.len() + 6;
                headers.insert(
                    short("header name", &name)?,
                    AMQPValue::LongString(value.as_str().into()),
                );
            }
            (
                short("content_type", &shape.content_type)?,
                std::mem::take(&mut row.payload),
            )
        }
        (MessageFormat::CloudEventsStructured, Some(ce)) => {
            let attributes = attributes(row, ce, trace, tracestate, map);
            let body = envelope(&attributes, shape, &row.payload);
            if body.len() > limits.max_body.bytes() {
                return Err(Unpublishable(format!(
                    "the CloudEvent (payload and attributes) is {} bytes; {}",
                    body.len(),
                    limits.max_body
                )));
            }
            (CLOUDEVENTS_JSON.into(), body)
        }
        _ => (
            short("content_type", &shape.content_type)?,
            std::mem::take(&mut row.payload),
        ),
    };
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(short("dedup_key", &row.dedup_key)?)
        .with_type(short("event_type", &row.event_type)?)
        .with_content_type(content_type)
        .with_timestamp(row.created_at.timestamp().max(0) as u64)
        .with_headers(headers);
    let routing_key = short("routing_key", &row.routing_key)?.to_string();
    check_header_frame(row, &properties, added, limits.frame_max)?;
    Ok(OutboundMessage {
        exchange: exchange.to_owned(),
        routing_key,
        body,
        properties,
    })
}

/// The row's `traceparent` header, as read.
#[derive(Debug, Clone, Copy)]
enum Trace<'a> {
    None,
    Valid(&'a str),
    Invalid,
}

/// The CloudEvents attributes of `row` (without `datacontenttype`, which binary mode sends as
/// `content_type`), in the order they are written: the required ones, `time`, `subject`, the
/// distributed-tracing extension, then the configured extensions from the row's headers.
fn attributes<'a>(
    row: &OutboxRow,
    ce: &'a CloudEventsShape,
    trace: Trace<'_>,
    tracestate: Option<&str>,
    headers: Option<&serde_json::Map<String, serde_json::Value>>,
) -> Vec<(&'a str, String)> {
    let mut out = vec![
        ("specversion", "1.0".to_owned()),
        ("id", row.dedup_key.clone()),
        ("source", ce.source.clone()),
        ("type", row.event_type.clone()),
        (
            "time",
            row.created_at.to_rfc3339_opts(SecondsFormat::AutoSi, true),
        ),
        ("subject", row.ordering_key.clone()),
    ];
    if let Trace::Valid(traceparent) = trace {
        out.push((TRACEPARENT, traceparent.to_owned()));
        if let Some(state) = tracestate {
            out.push((TRACESTATE, state.to_owned()));
        }
    }
    for (header, attribute) in &ce.extensions {
        // Every value in its canonical string form (an extension attribute of type String):
        // a header's JSON number or boolean as written, an object or array as its JSON text.
        let value = match headers.and_then(|h| h.get(header)) {
            None | Some(serde_json::Value::Null) => continue,
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
        };
        // The names were checked at load: lower-case letters and digits only.
        out.push((attribute.as_str(), value));
    }
    out
}

/// A CloudEvent in the JSON event format: the attributes, `datacontenttype`, and the payload
/// as `data` (JSON as it is; text as a JSON string unless it is JSON of a JSON content type)
/// or `data_base64` (bytes). An empty payload (a null column) has no data.
fn envelope(attributes: &[(&str, String)], shape: &MessageShape, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(payload.len() + 64 * (attributes.len() + 2));
    body.push(b'{');
    let field = |body: &mut Vec<u8>, name: &str| {
        if body.len() > 1 {
            body.push(b',');
        }
        json_string(body, name);
        body.push(b':');
    };
    for (name, value) in attributes {
        field(&mut body, name);
        json_string(&mut body, value);
    }
    field(&mut body, "datacontenttype");
    json_string(&mut body, &shape.content_type);
    if !payload.is_empty() {
        match shape.payload {
            PayloadKind::Json => {
                field(&mut body, "data");
                body.extend_from_slice(payload);
            }
            PayloadKind::Text => {
                field(&mut body, "data");
                let json = is_json_media_type(&shape.content_type)
                    && serde_json::from_slice::<serde::de::IgnoredAny>(payload).is_ok();
                if json {
                    body.extend_from_slice(payload);
                } else {
                    json_string(&mut body, &String::from_utf8_lossy(payload));
                }
            }
            PayloadKind::Bytes => {
                field(&mut body, "data_base64");
                body.push(b'"');
                body.extend_from_slice(
                    base64::engine::general_purpose::STANDARD
                        .encode(payload)
                        .as_bytes(),
                );
                body.push(b'"');
            }
        }
    }
    body.push(b'}');
    body
}

/// `application/json`, or any `+json` type, with or without parameters.
fn is_json_media_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence.ends_with("+json")
}

fn json_string(out: &mut Vec<u8>, text: &str) {
    // Writing a str to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, text);
}

/// True when `text` is a W3C Trace Context `traceparent` (version 00, or a later version read
/// as the spec says: its first four fields, then nothing or `-` and more): version, a trace
/// id and a parent id that are not all zeros, and the flags, in lower-case hex.
pub fn is_valid_traceparent(text: &str) -> bool {
    let b = text.as_bytes();
    let hex = |range: std::ops::Range<usize>| {
        b.get(range)
            .is_some_and(|s| s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')))
    };
    let zeros = |range: std::ops::Range<usize>| b[range].iter().all(|c| *c == b'0');
    if b.len() < 55 || !hex(0..2) || &b[0..2] == b"ff" {
        return false;
    }
    let length_ok = if &b[0..2] == b"00" {
        b.len() == 55
    } else {
        b.len() == 55 || b[55] == b'-'
    };
    length_ok
        && b[2] == b'-'
        && hex(3..35)
        && !zeros(3..35)
        && b[35] == b'-'
        && hex(36..52)
        && !zeros(36..52)
        && b[52] == b'-'
        && hex(53..55)
}

/// Takes the trace column's text out of the row's headers (see [`TRACE_CONTEXT_HEADER`]) and
/// puts the context it holds in its place: `traceparent` (and `tracestate`, `baggage` when it
/// has them), which replace any the headers object carried. Text that holds no valid
/// `traceparent` leaves the row's own headers as they are.
fn take_trace_column(row: &mut OutboxRow) {
    let serde_json::Value::Object(map) = &mut row.headers else {
        return;
    };
    let Some(serde_json::Value::String(text)) = map.remove(TRACE_CONTEXT_HEADER) else {
        return;
    };
    match read_trace_context(&text) {
        Some(context) => {
            for (name, value) in [
                (TRACEPARENT, Some(context.traceparent)),
                (TRACESTATE, context.tracestate),
                (BAGGAGE, context.baggage),
            ] {
                if let Some(value) = value {
                    map.insert(name.to_owned(), serde_json::Value::String(value));
                }
            }
        }
        None => tracing::debug!(
            id = row.id,
            "the trace column holds no W3C traceparent; the message carries none from it"
        ),
    }
}

/// A trace context read from a trace column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    pub traceparent: String,
    pub tracestate: Option<String>,
    pub baggage: Option<String>,
}

/// Reads a trace column: a `traceparent` on its own, or a serialized `java.util.Properties`
/// (Debezium's `tracingspancontext`) with a `traceparent` key, and `tracestate` and `baggage`
/// when it has them. None when no valid `traceparent` is there.
pub fn read_trace_context(text: &str) -> Option<TraceContext> {
    let text = text.trim();
    if is_valid_traceparent(text) {
        return Some(TraceContext {
            traceparent: text.to_owned(),
            tracestate: None,
            baggage: None,
        });
    }
    let properties = java_properties(text);
    let get = |key: &str| {
        properties
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    let traceparent = get(TRACEPARENT).filter(|t| is_valid_traceparent(t))?;
    Some(TraceContext {
        traceparent,
        tracestate: get(TRACESTATE).filter(|s| !s.is_empty()),
        baggage: get(BAGGAGE).filter(|s| !s.is_empty()),
    })
}

/// The key-value pairs of `text` in the format of `java.util.Properties.load` (what
/// `Properties.store` writes): `#` and `!` comment lines, `key=value`, `key:value` or
/// `key value`, a line ending in an odd number of `\` continued on the next, and the escapes
/// `\t \n \r \f \uXXXX` (any other escaped character stands for itself, `\=` for `=`).
fn java_properties(text: &str) -> Vec<(String, String)> {
    // Logical lines: a natural line ending in an odd number of backslashes goes on with the
    // next one, whose leading white space is dropped.
    let mut lines: Vec<String> = Vec::new();
    let mut pending: Option<String> = None;
    for natural in text.split(['\n', '\r']) {
        let piece = match pending.take() {
            Some(mut line) => {
                line.push_str(natural.trim_start_matches([' ', '\t', '\x0c']));
                line
            }
            None => {
                let trimmed = natural.trim_start_matches([' ', '\t', '\x0c']);
                if trimmed.is_empty() || trimmed.starts_with(['#', '!']) {
                    continue;
                }
                trimmed.to_owned()
            }
        };
        let backslashes = piece.chars().rev().take_while(|c| *c == '\\').count();
        if backslashes % 2 == 1 {
            let mut line = piece;
            line.pop();
            pending = Some(line);
        } else {
            lines.push(piece);
        }
    }
    lines.extend(pending);
    lines
        .iter()
        .map(|line| {
            // The key ends at the first unescaped `=`, `:` or white space; then white space,
            // at most one `=` or `:`, white space, and the value.
            let mut chars = line.char_indices().peekable();
            let mut end = line.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        chars.next();
                    }
                    '=' | ':' | ' ' | '\t' | '\x0c' => {
                        end = i;
                        break;
                    }
                    _ => {}
                }
            }
            let key = &line[..end];
            let mut rest = line[end..].trim_start_matches([' ', '\t', '\x0c']);
            if let Some(after) = rest.strip_prefix(['=', ':']) {
                rest = after.trim_start_matches([' ', '\t', '\x0c']);
            }
            (unescape(key), unescape(rest))
        })
        .collect()
}

fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('f') => out.push('\x0c'),
            Some('u') => {
                let hex: String = chars.by_ref().take(4).collect();
                match u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32) {
                    Some(decoded) => out.push(decoded),
                    None => out.push(char::REPLACEMENT_CHARACTER),
                }
            }
            Some(other) => out.push(other),
            None => {}
        }
    }
    out
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
    added: usize,
    frame_max: usize,
) -> Result<(), Unpublishable> {
    // Every JSON value takes at most 9 bytes more than 5 times its own text in AMQP
    // (a one-digit number becomes a tagged 8-byte integer); the rest of the properties are
    // short strings (255 bytes each at most) and the key, a long string; `added`, the
    // CloudEvents headers, each counted with its name, tag and length.
    let bound = 5 * json_text_bound(&row.headers)
        + row.ordering_key.len()
        + 8 * 260
        + added
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
             dedup_key, event_type{}); the broker's frame_max is {frame_max}",
            if added > 0 {
                ", the cloudEvents: headers"
            } else {
                ""
            }
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
        max_body: BodyLimit::Configured(1 << 20),
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
    fn the_relays_traceparent_replaces_the_producers_and_the_rest_of_the_context_stays() {
        let producer = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let relay = "00-4bf92f3577b34da6a3ce929d0e0e4736-1111111111111111-01";
        let mut r = row();
        r.headers = json!({"traceparent": producer, "tracestate": "rojo=1", "baggage": "a=b"});
        assert_eq!(producer_trace(&r), Some((producer, Some("rojo=1"))));
        let m = build_traced(
            &mut r,
            "t",
            "events",
            &MessageShape::default(),
            LIMITS,
            Some(relay),
        )
        .unwrap();
        let headers = m.properties.headers().as_ref().unwrap();
        let get = |name: &str| headers.inner().get(name).cloned();
        assert_eq!(
            get("traceparent"),
            Some(AMQPValue::LongString(relay.into()))
        );
        assert_eq!(
            get("tracestate"),
            Some(AMQPValue::LongString("rojo=1".into()))
        );
        assert_eq!(get("baggage"), Some(AMQPValue::LongString("a=b".into())));
        // A traceparent that does not parse is no parent; the relay's span (a new trace) is
        // the message's, without the tracestate that went with the broken one.
        let mut r = row();
        r.headers = json!({"traceparent": "00-zz", "tracestate": "rojo=1"});
        assert_eq!(producer_trace(&r), None);
        let m = build_traced(
            &mut r,
            "t",
            "events",
            &MessageShape::default(),
            LIMITS,
            Some(relay),
        )
        .unwrap();
        let headers = m.properties.headers().as_ref().unwrap();
        assert_eq!(
            headers.inner().get("traceparent"),
            Some(&AMQPValue::LongString(relay.into()))
        );
        assert_eq!(headers.inner().get("tracestate"), None);
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
                max_body: BodyLimit::Configured(4),
                ..LIMITS
            }
        )
        .unwrap_err()
        .0
        .contains("payload is 11 bytes; the relay's rabbitmq.max_message_bytes is 4"));
        assert!(build(
            &mut row(),
            "t",
            "events",
            BrokerLimits {
                max_body: BodyLimit::Broker(4),
                ..LIMITS
            }
        )
        .unwrap_err()
        .0
        .contains("payload is 11 bytes; the broker accepts at most 4 (its max_message_size"));
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

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn shape(format: MessageFormat, payload: PayloadKind, content_type: &str) -> MessageShape {
        MessageShape {
            content_type: content_type.into(),
            payload,
            format,
            cloudevents: format.is_cloudevents().then(|| CloudEventsShape {
                source: "/outbox-relay/shop/public.outbox".into(),
                extensions: vec![
                    ("tenant".into(), "tenant".into()),
                    ("n".into(), "count".into()),
                ],
            }),
            trace_column: false,
        }
    }

    fn header<'a>(m: &'a OutboundMessage, name: &str) -> Option<&'a AMQPValue> {
        m.properties.headers().as_ref().unwrap().inner().get(name)
    }

    fn text(value: &str) -> Option<AMQPValue> {
        Some(AMQPValue::LongString(value.into()))
    }

    #[test]
    fn binary_mode_adds_the_cloudevents_headers_and_keeps_the_body_and_the_contract() {
        let s = shape(MessageFormat::CloudEvents, PayloadKind::Json, JSON);
        let mut r = row();
        r.headers = json!({"tenant": "acme", "n": 3, "traceparent": TP, "tracestate": "rojo=1"});
        let m = build_with(&mut r, "public.outbox", "events", &s, LIMITS).unwrap();
        assert_eq!(m.body, br#"{"total":5}"#);
        let p = &m.properties;
        assert_eq!(p.content_type().as_ref().unwrap().as_str(), JSON);
        assert_eq!(p.message_id().as_ref().unwrap().as_str(), "order-1-created");
        for (name, value) in [
            ("cloudEvents:specversion", "1.0"),
            ("cloudEvents:id", "order-1-created"),
            ("cloudEvents:source", "/outbox-relay/shop/public.outbox"),
            ("cloudEvents:type", "OrderCreated"),
            ("cloudEvents:time", "2023-11-14T22:13:20Z"),
            ("cloudEvents:subject", "order-1"),
            ("cloudEvents:traceparent", TP),
            ("cloudEvents:tracestate", "rojo=1"),
            ("cloudEvents:tenant", "acme"),
            ("cloudEvents:count", "3"),
            ("traceparent", TP),
            ("tracestate", "rojo=1"),
        ] {
            assert_eq!(header(&m, name), text(value).as_ref(), "{name}");
        }
        assert_eq!(header(&m, "cloudEvents:datacontenttype"), None);
        assert_eq!(header(&m, "x-outbox-id"), Some(&AMQPValue::LongLongInt(7)));
    }

    #[test]
    fn structured_mode_wraps_json_text_and_bytes_as_the_json_format_says() {
        let envelope_of = |kind, content_type: &str, payload: &[u8]| {
            let s = shape(MessageFormat::CloudEventsStructured, kind, content_type);
            let mut r = row();
            r.payload = payload.to_vec();
            let m = build_with(&mut r, "public.outbox", "events", &s, LIMITS).unwrap();
            assert_eq!(
                m.properties.content_type().as_ref().unwrap().as_str(),
                CLOUDEVENTS_JSON
            );
            assert_eq!(header(&m, "cloudEvents:id"), None);
            serde_json::from_slice::<serde_json::Value>(&m.body).unwrap()
        };
        let e = envelope_of(PayloadKind::Json, JSON, br#"{"total":5}"#);
        assert_eq!(
            e,
            json!({
                "specversion": "1.0", "id": "order-1-created",
                "source": "/outbox-relay/shop/public.outbox", "type": "OrderCreated",
                "time": "2023-11-14T22:13:20Z", "subject": "order-1",
                "tenant": "acme", "count": "3",
                "datacontenttype": "application/json", "data": {"total": 5}
            })
        );
        let e = envelope_of(
            PayloadKind::Text,
            "text/plain; charset=utf-8",
            b"hi \"there\"",
        );
        assert_eq!(e["data"], json!("hi \"there\""));
        let e = envelope_of(PayloadKind::Text, JSON, b"[1,2]");
        assert_eq!(e["data"], json!([1, 2]));
        let e = envelope_of(PayloadKind::Text, JSON, b"not json");
        assert_eq!(e["data"], json!("not json"));
        let e = envelope_of(
            PayloadKind::Bytes,
            "application/octet-stream",
            &[0, 1, 254, 255],
        );
        assert_eq!(e["data_base64"], json!("AAH+/w=="));
        assert_eq!(e.get("data"), None);
        let e = envelope_of(PayloadKind::Json, JSON, b"");
        assert_eq!((e.get("data"), e.get("data_base64")), (None, None));
    }

    #[test]
    fn a_structured_event_larger_than_the_broker_takes_is_refused() {
        let s = shape(
            MessageFormat::CloudEventsStructured,
            PayloadKind::Json,
            JSON,
        );
        let limits = BrokerLimits {
            max_body: BodyLimit::Configured(100),
            ..LIMITS
        };
        let error = build_with(&mut row(), "t", "events", &s, limits).unwrap_err();
        assert!(error.0.contains("the CloudEvent"), "{error}");
    }

    #[test]
    fn a_valid_traceparent_goes_on_sampled_or_not_and_an_invalid_one_is_dropped_with_its_state() {
        for flags in ["01", "00"] {
            let tp = format!("{}{flags}", &TP[..53]);
            let mut r = row();
            r.headers = json!({"traceparent": tp, "tracestate": "a=b", "baggage": "k=v"});
            let m = build(&mut r, "t", "events", LIMITS).unwrap();
            assert_eq!(header(&m, "traceparent"), text(&tp).as_ref());
            assert_eq!(header(&m, "tracestate"), text("a=b").as_ref());
            assert_eq!(header(&m, "baggage"), text("k=v").as_ref());
        }
        let mut r = row();
        r.headers = json!({"traceparent": "00-zz", "tracestate": "a=b", "baggage": "k=v"});
        let m = build(&mut r, "t", "events", LIMITS).unwrap();
        assert_eq!(header(&m, "traceparent"), None);
        assert_eq!(header(&m, "tracestate"), None);
        assert_eq!(header(&m, "baggage"), text("k=v").as_ref());
    }

    #[test]
    fn traceparents_are_checked_as_w3c_trace_context_says() {
        assert!(is_valid_traceparent(TP));
        assert!(is_valid_traceparent(&TP.replace("-01", "-00")));
        // A later version: the four fields, then more after a dash.
        assert!(is_valid_traceparent(&format!(
            "cc{}-what-comes-next",
            &TP[2..]
        )));
        assert!(!is_valid_traceparent(&format!("cc{}x", &TP[2..])));
        assert!(
            !is_valid_traceparent(&format!("{TP}-x")),
            "version 00 is exactly 55"
        );
        assert!(!is_valid_traceparent(&format!("ff{}", &TP[2..])));
        assert!(!is_valid_traceparent(&TP.to_uppercase()));
        assert!(!is_valid_traceparent(
            &TP.replace("4bf92f3577b34da6a3ce929d0e0e4736", &"0".repeat(32))
        ));
        assert!(!is_valid_traceparent(
            &TP.replace("00f067aa0ba902b7", &"0".repeat(16))
        ));
        assert!(!is_valid_traceparent(&TP[..54]));
        assert!(!is_valid_traceparent(""));
    }

    #[test]
    fn a_trace_column_holds_a_traceparent_or_debeziums_serialized_properties() {
        assert_eq!(
            read_trace_context(&format!(" {TP}\n")),
            Some(TraceContext {
                traceparent: TP.into(),
                tracestate: None,
                baggage: None
            })
        );
        // What java.util.Properties.store writes: a date comment, `=` and `:` escaped.
        let stored = format!(
            "#Tue Mar 01 12:00:00 UTC 2022\r\ntracestate=rojo\\=00f067aa0ba902b7,congo\\=t61rcWkgMzE\r\ntraceparent={TP}\r\nbaggage=user\\=al\\u00e9,\\\n    k\\:v\n"
        );
        assert_eq!(
            read_trace_context(&stored),
            Some(TraceContext {
                traceparent: TP.into(),
                tracestate: Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE".into()),
                baggage: Some("user=al\u{e9},k:v".into())
            })
        );
        assert_eq!(
            read_trace_context("! comment\ntraceparent : 00-1-2-01"),
            None
        );
        assert_eq!(read_trace_context(""), None);
        assert_eq!(
            java_properties("a b\nc:d\n  e = f g\n\\#k=v"),
            vec![
                ("a".into(), "b".into()),
                ("c".into(), "d".into()),
                ("e".into(), "f g".into()),
                ("#k".into(), "v".into())
            ]
        );
    }

    #[test]
    fn the_trace_column_replaces_the_headers_context_and_is_never_sent() {
        let s = MessageShape {
            trace_column: true,
            ..MessageShape::default()
        };
        let mut r = row();
        r.headers = json!({
            "traceparent": "00-11111111111111111111111111111111-2222222222222222-01",
            TRACE_CONTEXT_HEADER: format!("traceparent={TP}\ntracestate=a\\=b"),
        });
        let m = build_with(&mut r, "t", "events", &s, LIMITS).unwrap();
        assert_eq!(header(&m, "traceparent"), text(TP).as_ref());
        assert_eq!(header(&m, "tracestate"), text("a=b").as_ref());
        assert_eq!(header(&m, TRACE_CONTEXT_HEADER), None);
        // A column without a context leaves the row's own headers.
        let mut r = row();
        r.headers = json!({"traceparent": TP, TRACE_CONTEXT_HEADER: "nothing here"});
        let m = build_with(&mut r, "t", "events", &s, LIMITS).unwrap();
        assert_eq!(header(&m, "traceparent"), text(TP).as_ref());
        assert_eq!(header(&m, TRACE_CONTEXT_HEADER), None);
    }

    #[test]
    fn the_cloudevents_headers_count_against_the_frame() {
        let s = shape(MessageFormat::CloudEvents, PayloadKind::Json, JSON);
        // The ordering key goes twice in binary mode (x-ordering-key and cloudEvents:subject).
        let mut r = row();
        r.ordering_key = "k".repeat(70_000);
        let Err(error) = build_with(&mut r, "t", "events", &s, LIMITS) else {
            panic!("a 140 kB header frame was accepted");
        };
        assert!(error.0.contains("the cloudEvents: headers"), "{error}");
        let mut r = row();
        r.ordering_key = "k".repeat(70_000);
        assert!(build(&mut r, "t", "events", LIMITS).is_ok());
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
