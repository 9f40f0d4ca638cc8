//! The column mapping of an adopted outbox table: `[outbox.columns]` (names of the
//! application's own) or `layout = "debezium"` with `[outbox.debezium]` (Debezium's outbox
//! event router options), resolved at load into one [`ColumnMap`]. Owns what a user can write
//! about columns; must not open connections (the mapping is checked against the real table by
//! the store, at `check-config`, `migrate --adopt` and start).

use serde::Deserialize;

/// How a table's columns are named.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// The relay's own columns, created by `migrate` (or mapped with `[outbox.columns]`).
    #[default]
    Relay,
    /// Debezium's outbox table (`id`, `aggregatetype`, `aggregateid`, `type`, `payload`).
    Debezium,
}

/// The SQL type of the payload column, which says how it becomes the body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PayloadType {
    /// Sent as PostgreSQL renders it (UTF-8 JSON), `application/json`.
    #[default]
    Jsonb,
    /// Sent as stored (UTF-8 JSON), `application/json`.
    Json,
    /// Sent as UTF-8, `text/plain; charset=utf-8` unless `content_type` says otherwise.
    Text,
    /// Sent as the bytes, `application/octet-stream` unless `content_type` says otherwise.
    Bytea,
}

impl PayloadType {
    pub fn sql_name(self) -> &'static str {
        match self {
            PayloadType::Jsonb => "jsonb",
            PayloadType::Json => "json",
            PayloadType::Text => "text",
            PayloadType::Bytea => "bytea",
        }
    }

    fn default_content_type(self) -> &'static str {
        match self {
            PayloadType::Jsonb | PayloadType::Json => "application/json",
            PayloadType::Text => "text/plain; charset=utf-8",
            PayloadType::Bytea => "application/octet-stream",
        }
    }
}

/// `[outbox.columns]`: which of the table's columns the relay reads for each part of the message.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnsSettings {
    /// The event's identity, sent as `message_id`.
    pub dedup_key: String,
    /// Rows of one value are published in order, one after another.
    pub ordering_key: String,
    /// A column that holds the routing key.
    pub routing_key: Option<String>,
    /// Or a routing key made of text and `{column}` values (a fixed one without any `{}`).
    pub routing_key_template: Option<String>,
    /// The AMQP `type`.
    pub event_type: String,
    pub payload: String,
    #[serde(default)]
    pub payload_type: PayloadType,
    /// The `content_type` sent; by default that of `payload_type`.
    pub content_type: Option<String>,
    /// A `jsonb` (or `json`) column holding an object of headers.
    pub headers: Option<String>,
    /// Columns placed as headers: `"column"` or `"column:header-name"`.
    #[serde(default)]
    pub header_columns: Vec<String>,
    /// A column naming the exchange (null: the table's `exchange`).
    pub exchange: Option<String>,
    /// The message `timestamp`; unset, the time the relay's own column records at insert.
    pub created_at: Option<String>,
    /// A text column holding the producer's trace context: a W3C `traceparent`, or a
    /// serialized `java.util.Properties` with `traceparent` (and `tracestate`, `baggage`), as
    /// Debezium's `tracingspancontext` holds it. Sent as the `traceparent`, `tracestate` and
    /// `baggage` headers.
    pub trace_context: Option<String>,
}

/// `[outbox.debezium]`: Debezium's outbox event router options, named as Debezium names them
/// with `_` for `.` (`table.field.event.id` is `table_field_event_id`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DebeziumSettings {
    pub table_field_event_id: Option<String>,
    pub table_field_event_key: Option<String>,
    pub table_field_event_payload: Option<String>,
    pub table_field_event_timestamp: Option<String>,
    /// The relay's own addition: the column sent as the AMQP `type`.
    pub table_field_event_type: Option<String>,
    /// `column:header[:name],...`; only the `header` placement means something to AMQP.
    pub table_fields_additional_placement: Option<String>,
    pub route_by_field: Option<String>,
    /// `${routedByValue}` is the value of `route_by_field`.
    pub route_topic_replacement: Option<String>,
    /// Where the routed value goes: the routing key (default) or the exchange.
    #[serde(default)]
    pub route_to: RouteTo,
    #[serde(default)]
    pub payload_type: PayloadType,
    pub content_type: Option<String>,
    /// Debezium's `tracing.span.context.field`: the column holding the producer's trace
    /// context as a serialized `java.util.Properties` (Debezium's column is
    /// `tracingspancontext`). Unset, no trace column is read: Debezium's tables have it only
    /// when the application writes it, and a mapped column must exist.
    pub tracing_span_context_field: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteTo {
    /// The routed value is the routing key.
    #[default]
    RoutingKey,
    /// The routed value is the exchange; the routing key is the event key.
    Exchange,
}

/// Text made of literal parts and column values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Text(String),
    Column(String),
}

/// A mapped table's columns, resolved and checked for form (not yet against the table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnMap {
    pub dedup_key: String,
    pub ordering_key: String,
    pub routing_key: Vec<Part>,
    pub event_type: String,
    pub payload: String,
    pub payload_type: PayloadType,
    pub content_type: String,
    pub headers: Option<String>,
    /// (column, header name)
    pub header_columns: Vec<(String, String)>,
    /// None: the table's `exchange`.
    pub exchange: Option<Vec<Part>>,
    /// None: the relay's own `outbox_relay_created_at`, set at insert.
    pub created_at: Option<String>,
    /// A text column holding the producer's trace context (a `traceparent`, or Debezium's
    /// serialized properties).
    pub trace_context: Option<String>,
    /// (config key, column) of every mapped column, e.g. `("outbox[0].columns.payload", "body")`.
    pub keys: Vec<(String, String)>,
}

impl ColumnMap {
    /// Every mapped column with the config key that names it, for the check against the table.
    pub fn columns(&self) -> &[(String, String)] {
        &self.keys
    }
}

fn parts_keyed(key: &str, parts: &[Part], keys: &mut Vec<(String, String)>) {
    for p in parts {
        if let Part::Column(c) = p {
            keys.push((key.to_owned(), c.clone()));
        }
    }
}

/// A column name from the config: any name PostgreSQL accepts (it is always quoted).
fn column(key: &str, name: &str, out: &mut Vec<String>) -> String {
    // Quoted wherever it reaches SQL; `$` is refused because the order guard's body is
    // dollar-quoted.
    if name.is_empty() || name.len() > 63 || name.contains(['\0', '$']) {
        out.push(format!(
            "{key}: {name:?} is not a column name (1 to 63 bytes, without `$`)"
        ));
    }
    name.to_owned()
}

/// Parses `{column}` placeholders (`{{` and `}}` are literal braces).
fn template(key: &str, text: &str, out: &mut Vec<String>) -> Vec<Part> {
    let mut parts = Vec::new();
    let mut literal = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                literal.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                literal.push('}');
            }
            '{' => {
                let name: String = chars.by_ref().take_while(|c| *c != '}').collect();
                if !literal.is_empty() {
                    parts.push(Part::Text(std::mem::take(&mut literal)));
                }
                parts.push(Part::Column(column(key, &name, out)));
            }
            '}' => out.push(format!("{key}: {text:?} has a `}}` without its `{{`")),
            c => literal.push(c),
        }
    }
    if !literal.is_empty() || parts.is_empty() {
        parts.push(Part::Text(literal));
    }
    parts
}

/// Debezium's `route.topic.replacement`: `${routedByValue}` is the routed column's value.
fn replacement(text: &str, routed: &str) -> Vec<Part> {
    let mut parts = Vec::new();
    for (i, piece) in text.split("${routedByValue}").enumerate() {
        if i > 0 {
            parts.push(Part::Column(routed.to_owned()));
        }
        if !piece.is_empty() {
            parts.push(Part::Text(piece.to_owned()));
        }
    }
    if parts.is_empty() {
        parts.push(Part::Text(String::new()));
    }
    parts
}

impl ColumnsSettings {
    pub fn resolve(&self, key: &str, out: &mut Vec<String>) -> ColumnMap {
        let c =
            |k: &str, name: &str, out: &mut Vec<String>| column(&format!("{key}.{k}"), name, out);
        let routing_key = match (&self.routing_key, &self.routing_key_template) {
            (Some(col), None) => vec![Part::Column(c("routing_key", col, out))],
            (None, Some(t)) => template(&format!("{key}.routing_key_template"), t, out),
            (Some(_), Some(_)) => {
                out.push(format!(
                    "{key}: routing_key and routing_key_template are both set; keep one"
                ));
                Vec::new()
            }
            (None, None) => {
                out.push(format!(
                    "{key}: routing_key (a column) or routing_key_template (text and {{column}}s; fixed without any) is required"
                ));
                Vec::new()
            }
        };
        let header_columns: Vec<(String, String)> = self
            .header_columns
            .iter()
            .map(|entry| {
                let (col, name) = entry.split_once(':').unwrap_or((entry, entry));
                (c("header_columns", col, out), name.to_owned())
            })
            .collect();
        let k = |name: &str| format!("{key}.{name}");
        let mut keys = vec![
            (k("dedup_key"), self.dedup_key.clone()),
            (k("ordering_key"), self.ordering_key.clone()),
            (k("event_type"), self.event_type.clone()),
            (k("payload"), self.payload.clone()),
        ];
        let routing_name = if self.routing_key.is_some() {
            "routing_key"
        } else {
            "routing_key_template"
        };
        parts_keyed(&k(routing_name), &routing_key, &mut keys);
        for (name, value) in [
            ("headers", &self.headers),
            ("exchange", &self.exchange),
            ("created_at", &self.created_at),
            ("trace_context", &self.trace_context),
        ] {
            if let Some(v) = value {
                keys.push((k(name), v.clone()));
            }
        }
        for (col, _) in &header_columns {
            keys.push((k("header_columns"), col.clone()));
        }
        ColumnMap {
            keys,
            dedup_key: c("dedup_key", &self.dedup_key, out),
            ordering_key: c("ordering_key", &self.ordering_key, out),
            routing_key,
            event_type: c("event_type", &self.event_type, out),
            payload: c("payload", &self.payload, out),
            payload_type: self.payload_type,
            content_type: self
                .content_type
                .clone()
                .unwrap_or_else(|| self.payload_type.default_content_type().to_owned()),
            headers: self.headers.as_ref().map(|h| c("headers", h, out)),
            header_columns,
            exchange: self
                .exchange
                .as_ref()
                .map(|e| vec![Part::Column(c("exchange", e, out))]),
            created_at: self.created_at.as_ref().map(|t| c("created_at", t, out)),
            trace_context: self
                .trace_context
                .as_ref()
                .map(|t| c("trace_context", t, out)),
        }
    }
}

impl DebeziumSettings {
    /// The mapping of Debezium's outbox event router with these options (its defaults where
    /// unset): `id` the dedup key, `aggregateid` the ordering key, `aggregatetype` the
    /// destination, `type` the event type, `payload` the body.
    pub fn resolve(&self, key: &str, out: &mut Vec<String>) -> ColumnMap {
        let or = |v: &Option<String>, k: &str, default: &str, out: &mut Vec<String>| {
            column(&format!("{key}.{k}"), v.as_deref().unwrap_or(default), out)
        };
        let id = or(
            &self.table_field_event_id,
            "table_field_event_id",
            "id",
            out,
        );
        let event_key = or(
            &self.table_field_event_key,
            "table_field_event_key",
            "aggregateid",
            out,
        );
        let payload = or(
            &self.table_field_event_payload,
            "table_field_event_payload",
            "payload",
            out,
        );
        let event_type = or(
            &self.table_field_event_type,
            "table_field_event_type",
            "type",
            out,
        );
        let routed = or(&self.route_by_field, "route_by_field", "aggregatetype", out);
        let destination = replacement(
            self.route_topic_replacement
                .as_deref()
                .unwrap_or("${routedByValue}"),
            &routed,
        );
        let (routing_key, exchange) = match self.route_to {
            RouteTo::RoutingKey => (destination, None),
            RouteTo::Exchange => (vec![Part::Column(event_key.clone())], Some(destination)),
        };
        let mut header_columns = Vec::new();
        for entry in self
            .table_fields_additional_placement
            .iter()
            .flat_map(|p| p.split(','))
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            let k = format!("{key}.table_fields_additional_placement");
            match entry.split(':').collect::<Vec<_>>().as_slice() {
                [col, "header"] => header_columns.push((column(&k, col, out), (*col).to_owned())),
                [col, "header", name] => {
                    header_columns.push((column(&k, col, out), (*name).to_owned()))
                }
                [_, place, ..] => out.push(format!(
                    "{k}: {entry:?}: only the header placement exists for AMQP (not {place:?})"
                )),
                _ => out.push(format!(
                    "{k}: {entry:?} is not column:header or column:header:name"
                )),
            }
        }
        let k = |name: &str| format!("{key}.{name}");
        let mut keys = vec![
            (k("table_field_event_id"), id.clone()),
            (k("table_field_event_key"), event_key.clone()),
            (k("table_field_event_type"), event_type.clone()),
            (k("table_field_event_payload"), payload.clone()),
            (k("route_by_field"), routed.clone()),
        ];
        if let Some(t) = &self.table_field_event_timestamp {
            keys.push((k("table_field_event_timestamp"), t.clone()));
        }
        for (col, _) in &header_columns {
            keys.push((k("table_fields_additional_placement"), col.clone()));
        }
        let trace_context = self.tracing_span_context_field.as_ref().map(|t| {
            let key = k("tracing_span_context_field");
            keys.push((key.clone(), t.clone()));
            column(&key, t, out)
        });
        ColumnMap {
            keys,
            dedup_key: id,
            ordering_key: event_key,
            routing_key,
            event_type,
            payload,
            payload_type: self.payload_type,
            content_type: self
                .content_type
                .clone()
                .unwrap_or_else(|| self.payload_type.default_content_type().to_owned()),
            headers: None,
            header_columns,
            exchange,
            created_at: self
                .table_field_event_timestamp
                .as_ref()
                .map(|t| column(&format!("{key}.table_field_event_timestamp"), t, out)),
            trace_context,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_debezium_preset_maps_the_event_routers_defaults() {
        let mut out = Vec::new();
        let map = DebeziumSettings {
            table_fields_additional_placement: Some("tenant:header, type:header:eventType".into()),
            ..Default::default()
        }
        .resolve("outbox[0].debezium", &mut out);
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(map.dedup_key, "id");
        assert_eq!(map.ordering_key, "aggregateid");
        assert_eq!(map.routing_key, vec![Part::Column("aggregatetype".into())]);
        assert_eq!(map.exchange, None);
        assert_eq!(map.event_type, "type");
        assert_eq!(map.content_type, "application/json");
        assert_eq!(
            map.header_columns,
            vec![
                ("tenant".into(), "tenant".into()),
                ("type".into(), "eventType".into())
            ]
        );
    }

    #[test]
    fn the_routed_value_can_name_the_exchange_and_the_replacement_wraps_it() {
        let mut out = Vec::new();
        let map = DebeziumSettings {
            route_to: RouteTo::Exchange,
            route_topic_replacement: Some("outbox.event.${routedByValue}".into()),
            ..Default::default()
        }
        .resolve("d", &mut out);
        assert_eq!(map.routing_key, vec![Part::Column("aggregateid".into())]);
        assert_eq!(
            map.exchange,
            Some(vec![
                Part::Text("outbox.event.".into()),
                Part::Column("aggregatetype".into())
            ])
        );
    }

    #[test]
    fn templates_mix_text_and_columns() {
        let mut out = Vec::new();
        assert_eq!(
            template("k", "orders.{kind}.{{v1}}", &mut out),
            vec![
                Part::Text("orders.".into()),
                Part::Column("kind".into()),
                Part::Text(".{v1}".into())
            ]
        );
        assert_eq!(
            template("k", "fixed", &mut out),
            vec![Part::Text("fixed".into())]
        );
        assert!(out.is_empty());
        template("k", "a.{}", &mut out);
        assert!(
            out[0].starts_with("k: \"\" is not a column name"),
            "{out:?}"
        );
    }

    #[test]
    fn an_envelope_placement_is_refused() {
        let mut out = Vec::new();
        DebeziumSettings {
            table_fields_additional_placement: Some("type:envelope:eventType".into()),
            ..Default::default()
        }
        .resolve("d", &mut out);
        assert!(out[0].contains("only the header placement"), "{out:?}");
    }
}
