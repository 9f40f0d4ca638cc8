//! How the relay's statements name a table's columns: the relay's own (`id`, `ordering_key`,
//! ...), or an adopted table's mapped ones, always quoted. The fetch's SELECT list gives every
//! mapped column the relay's name (`"aggregateid"::text AS ordering_key`), so the row decoding
//! and everything after it are the same for both. Invariant: the relay's state columns
//! (`attempts`, `next_attempt_at`, `last_error`, `published_at`, `parked_at`, `held`) keep
//! their names on every table; on an adopted one the row's order and identity is
//! `outbox_relay_seq`, and a row without one (there before adoption, `--from now`) is never
//! pending.

use std::sync::Arc;

use crate::config::{quote_ident, ColumnMap, Part, PayloadType};

/// The ordering column `migrate --adopt` adds, set by the table's order guard.
pub const SEQ_COLUMN: &str = "outbox_relay_seq";
/// The insert time `migrate --adopt` adds when no `created_at` column is mapped.
pub const CREATED_COLUMN: &str = "outbox_relay_created_at";

/// The column names of one table, rendered into SQL.
#[derive(Debug, Clone, Default)]
pub struct Columns {
    map: Option<Arc<ColumnMap>>,
}

fn at(alias: &str, column: &str) -> String {
    if alias.is_empty() {
        column.to_owned()
    } else {
        format!("{alias}.{column}")
    }
}

/// A timestamp as microseconds since the epoch, in a float: `infinity` reads as an infinity
/// (an integer cast would fail the whole statement), and a time outside what the relay can
/// represent is the row's problem, not the batch's.
fn epoch_micros(timestamp: &str) -> String {
    format!("(extract(epoch FROM {timestamp}) * 1000000)::float8")
}

/// The row version (`xmin`, a transaction id) as a number: what the relay's writes for a row
/// compare, so they apply to the version that was read and to no other.
pub fn version(alias: &str) -> String {
    format!("{}::text::bigint", at(alias, "xmin"))
}

/// A string literal (identifiers and texts from the config never reach SQL unquoted).
pub fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

impl Columns {
    pub fn new(map: Option<Arc<ColumnMap>>) -> Self {
        Columns { map }
    }

    pub fn map(&self) -> Option<&ColumnMap> {
        self.map.as_deref()
    }

    /// The row's order and identity (`id`; `outbox_relay_seq` on an adopted table).
    pub fn seq(&self, alias: &str) -> String {
        match self.map {
            None => at(alias, "id"),
            Some(_) => at(alias, &quote_ident(SEQ_COLUMN)),
        }
    }

    /// The ordering key as text: the same expression in the statements and the indexes.
    pub fn key(&self, alias: &str) -> String {
        match &self.map {
            None => at(alias, "ordering_key"),
            Some(m) => format!("({}::text)", at(alias, &quote_ident(&m.ordering_key))),
        }
    }

    pub fn created_at(&self, alias: &str) -> String {
        match &self.map {
            None => at(alias, "created_at"),
            Some(m) => match &m.created_at {
                Some(c) => at(alias, &quote_ident(c)),
                None => at(alias, &quote_ident(CREATED_COLUMN)),
            },
        }
    }

    pub fn dedup_key(&self, alias: &str) -> String {
        match &self.map {
            None => at(alias, "dedup_key"),
            Some(m) => format!("{}::text", at(alias, &quote_ident(&m.dedup_key))),
        }
    }

    /// `<seq> IS NOT NULL AND ` on an adopted table (rows there before adoption and not
    /// numbered are not the relay's), nothing otherwise. Goes in front of every "pending"
    /// predicate, so the partial indexes (which carry it too) answer them.
    pub fn live(&self, alias: &str) -> String {
        match self.map {
            None => String::new(),
            Some(_) => format!("{} IS NOT NULL AND ", self.seq(alias)),
        }
    }

    /// The fetch's columns, under the relay's names, as [`crate::message::OutboxRow`] decodes
    /// them (`payload` as text, or as bytes for a `bytea` payload).
    pub fn select_list(&self, alias: &str) -> String {
        let Some(m) = &self.map else {
            let a = if alias.is_empty() {
                String::new()
            } else {
                format!("{alias}.")
            };
            return format!(
                "{a}id, {a}dedup_key, {a}ordering_key, {a}routing_key, {a}event_type, {a}payload::text AS payload, \
                 {a}headers::text AS headers, {a}exchange, {created} AS created_at, {a}attempts, \
                 {a}tableoid::bigint AS table_oid, {version} AS version",
                created = epoch_micros(&format!("{a}created_at")),
                version = version(alias),
            );
        };
        let col = |name: &str| at(alias, &quote_ident(name));
        let text = |parts: &[Part]| {
            let pieces: Vec<String> = parts
                .iter()
                .map(|p| match p {
                    Part::Text(t) => literal(t),
                    Part::Column(c) => format!("coalesce({}::text, '')", col(c)),
                })
                .collect();
            match pieces.as_slice() {
                [one] => one.clone(),
                _ => format!("({})", pieces.join(" || ")),
            }
        };
        let payload = match m.payload_type {
            PayloadType::Jsonb | PayloadType::Json => {
                format!("coalesce({}::text, '')", col(&m.payload))
            }
            PayloadType::Text => format!("coalesce({}, '')", col(&m.payload)),
            PayloadType::Bytea => format!("coalesce({}, ''::bytea)", col(&m.payload)),
        };
        let mut headers = match &m.headers {
            Some(h) => format!("coalesce({}::jsonb, '{{}}'::jsonb)", col(h)),
            None => "'{}'::jsonb".to_owned(),
        };
        if !m.header_columns.is_empty() {
            let pairs: Vec<String> = m
                .header_columns
                .iter()
                .map(|(c, name)| format!("{}, to_jsonb({})", literal(name), col(c)))
                .collect();
            headers = format!("({headers} || jsonb_build_object({}))", pairs.join(", "));
        }
        if let Some(trace) = &m.trace_context {
            // The raw text travels in the headers object under a name of the relay's, which
            // building the message takes out and reads (a traceparent, or Debezium's
            // serialized properties): parsing it is Rust's job, not the statement's.
            headers = format!(
                "({headers} || CASE WHEN {col} IS NULL THEN '{{}}'::jsonb \
                 ELSE jsonb_build_object({name}, {col}::text) END)",
                col = col(trace),
                name = literal(crate::message::TRACE_CONTEXT_HEADER),
            );
        }
        let exchange = match &m.exchange {
            Some(parts) => format!("nullif({}, '')", text(parts)),
            None => "NULL::text".to_owned(),
        };
        let created_at = match &m.created_at {
            Some(_) => format!("{}::timestamptz", self.created_at(alias)),
            None => self.created_at(alias),
        };
        format!(
            "{seq} AS id, {dedup} AS dedup_key, {key} AS ordering_key, {routing} AS routing_key, \
             coalesce({kind}::text, '') AS event_type, {payload} AS payload, {headers}::text AS headers, \
             {exchange} AS exchange, {created_at} AS created_at, {attempts}, {oid}::bigint AS table_oid, \
             {version} AS version",
            created_at = epoch_micros(&created_at),
            version = version(alias),
            seq = self.seq(alias),
            dedup = self.dedup_key(alias),
            key = self.key(alias),
            routing = text(&m.routing_key),
            kind = col(&m.event_type),
            attempts = at(alias, "attempts"),
            oid = at(alias, "tableoid"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ColumnsSettings, DebeziumSettings};

    #[test]
    fn the_relays_own_tables_read_their_own_columns_each_decodable_on_its_own() {
        let c = Columns::default();
        assert_eq!(
            c.select_list("o"),
            "o.id, o.dedup_key, o.ordering_key, o.routing_key, o.event_type, o.payload::text AS payload, \
             o.headers::text AS headers, o.exchange, (extract(epoch FROM o.created_at) * 1000000)::float8 AS created_at, \
             o.attempts, o.tableoid::bigint AS table_oid, o.xmin::text::bigint AS version"
        );
        assert_eq!(
            (c.seq("e"), c.key("e"), c.live("o")),
            ("e.id".into(), "e.ordering_key".into(), String::new())
        );
    }

    #[test]
    fn mapped_columns_are_quoted_and_renamed_to_the_relays_names() {
        let mut problems = Vec::new();
        let map = ColumnsSettings {
            dedup_key: "Event\"Id".into(),
            ordering_key: "stream".into(),
            routing_key: None,
            routing_key_template: Some("app.{topic}'s".into()),
            event_type: "kind".into(),
            payload: "body".into(),
            payload_type: PayloadType::Bytea,
            content_type: None,
            headers: None,
            header_columns: vec!["tenant:x-tenant".into()],
            exchange: None,
            created_at: None,
            trace_context: None,
        }
        .resolve("outbox[0].columns", &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(map.content_type, "application/octet-stream");
        let c = Columns::new(Some(Arc::new(map)));
        let select = c.select_list("o");
        assert!(select.starts_with("o.\"outbox_relay_seq\" AS id, o.\"Event\"\"Id\"::text AS dedup_key, (o.\"stream\"::text) AS ordering_key"), "{select}");
        assert!(
            select.contains("('app.' || coalesce(o.\"topic\"::text, '') || '''s') AS routing_key"),
            "{select}"
        );
        assert!(
            select.contains("coalesce(o.\"body\", ''::bytea) AS payload"),
            "{select}"
        );
        assert!(
            select.contains("jsonb_build_object('x-tenant', to_jsonb(o.\"tenant\"))"),
            "{select}"
        );
        assert!(
            select.contains(
                "(extract(epoch FROM o.\"outbox_relay_created_at\") * 1000000)::float8 AS created_at"
            ),
            "{select}"
        );
        assert_eq!(c.live("o"), "o.\"outbox_relay_seq\" IS NOT NULL AND ");
    }

    #[test]
    fn a_trace_column_travels_in_the_headers_under_the_relays_name() {
        let mut problems = Vec::new();
        let map = DebeziumSettings {
            tracing_span_context_field: Some("tracingspancontext".into()),
            ..Default::default()
        }
        .resolve("outbox[0].debezium", &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        let select = Columns::new(Some(Arc::new(map))).select_list("o");
        assert!(
            select.contains(
                "('{}'::jsonb || CASE WHEN o.\"tracingspancontext\" IS NULL THEN '{}'::jsonb \
                 ELSE jsonb_build_object('x-outbox-trace-context', o.\"tracingspancontext\"::text) END)::text AS headers"
            ),
            "{select}"
        );
    }

    #[test]
    fn a_debezium_table_routed_to_exchanges_names_them_from_the_routed_column() {
        let mut problems = Vec::new();
        let map = DebeziumSettings {
            route_to: crate::config::RouteTo::Exchange,
            ..Default::default()
        }
        .resolve("outbox[0].debezium", &mut problems);
        let select = Columns::new(Some(Arc::new(map))).select_list("o");
        assert!(
            select.contains("coalesce(o.\"aggregateid\"::text, '') AS routing_key"),
            "{select}"
        );
        assert!(
            select.contains("nullif(coalesce(o.\"aggregatetype\"::text, ''), '') AS exchange"),
            "{select}"
        );
    }
}
