//! What a table's messages look like: `message_format` (the relay's own headers, or a
//! CloudEvent in binary or structured content mode) and the CloudEvents settings beside it.
//! Owns what a user can write about the format and its checks; must not build messages
//! (that is `message.rs`).

use serde::Deserialize;

use super::{OutboxSettings, PostgresSettings};

/// `message_format` of an `[[outbox]]` table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MessageFormat {
    /// The relay's own contract: `message_id`, `type`, `timestamp`, the `x-outbox-*` headers
    /// and the row's headers; the body is the payload.
    #[default]
    Outbox,
    /// The same message, and a CloudEvent in binary content mode: the attributes as
    /// `cloudEvents:*` headers (the AMQP protocol binding's names), the body the payload.
    CloudEvents,
    /// A CloudEvent in structured content mode: the body an `application/cloudevents+json`
    /// envelope with the payload in `data` (or `data_base64`).
    CloudEventsStructured,
}

impl<'de> Deserialize<'de> for MessageFormat {
    /// From its name; any other text is refused with the names there are (the config
    /// reports it with the key).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        match name.as_str() {
            "outbox" => Ok(MessageFormat::Outbox),
            "cloudevents" => Ok(MessageFormat::CloudEvents),
            "cloudevents-structured" => Ok(MessageFormat::CloudEventsStructured),
            other => Err(serde::de::Error::custom(format!(
                "expected \"outbox\", \"cloudevents\" or \"cloudevents-structured\", got {other:?}"
            ))),
        }
    }
}

impl MessageFormat {
    pub fn is_cloudevents(self) -> bool {
        !matches!(self, MessageFormat::Outbox)
    }
}

/// The attribute names the CloudEvents core and the distributed-tracing extension define:
/// an extension from a header may not take one of them.
const RESERVED_ATTRIBUTES: [&str; 13] = [
    "specversion",
    "id",
    "source",
    "type",
    "datacontenttype",
    "dataschema",
    "subject",
    "time",
    "data",
    "data_base64",
    "traceparent",
    "tracestate",
    "baggage",
];

/// Why `name` cannot be a CloudEvents extension attribute (the spec: lower-case ASCII letters
/// and digits, at most 20 characters), or None.
pub fn extension_name_problem(name: &str) -> Option<String> {
    if name.is_empty()
        || name.len() > 20
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Some(format!(
            "{name:?} is not a CloudEvents attribute name (1 to 20 lower-case letters a-z and digits)"
        ));
    }
    RESERVED_ATTRIBUTES
        .contains(&name)
        .then(|| format!("{name:?} is an attribute the relay sets itself"))
}

/// Why `text` is not a URI-reference (RFC 3986, section 4.1: a URI, or a relative reference
/// such as `/orders/outbox`), or None. Checks the characters (unreserved, reserved and
/// `%HH` only), the scheme's form when there is one, and where `#` and `[ ]` may stand.
pub fn uri_reference_problem(text: &str) -> Option<String> {
    let bad = |why: &str| Some(format!("{text:?} is not a URI-reference: {why}"));
    if text.is_empty() {
        return bad("it is empty");
    }
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3);
                if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                    return bad("a % not followed by two hex digits");
                }
                i += 3;
                continue;
            }
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {}
            b':' | b'/' | b'?' | b'#' | b'[' | b']' | b'@' => {}
            b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'=' => {}
            _ => {
                return bad(&format!(
                    "{:?} must be percent-encoded",
                    text[i..].chars().next().unwrap_or(' ')
                ))
            }
        }
        i += 1;
    }
    let (before_fragment, fragment) = text.split_once('#').unwrap_or((text, ""));
    if fragment.contains('#') {
        return bad("more than one #");
    }
    // A `:` before any `/ ? #` ends a scheme; in a relative reference the first segment may
    // hold no `:` (it would read as a scheme).
    let first = before_fragment
        .find(['/', '?'])
        .map_or(before_fragment, |end| &before_fragment[..end]);
    let rest = match first.split_once(':') {
        Some((scheme, _)) => {
            let mut chars = scheme.chars();
            let form = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
                && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
            if !form {
                return bad(&format!(
                    "{scheme:?} before the first \":\" is not a scheme (a letter, then letters, digits, + - .)"
                ));
            }
            &before_fragment[scheme.len() + 1..]
        }
        None => before_fragment,
    };
    // `[` and `]` only around an IP literal, the whole host of an authority.
    if rest.contains(['[', ']']) {
        let authority = rest
            .strip_prefix("//")
            .map(|a| a.split(['/', '?']).next().unwrap_or(""));
        let host = authority.map(|a| a.rsplit_once('@').map_or(a, |(_, h)| h));
        let literal = host.is_some_and(|h| {
            h.starts_with('[')
                && h[1..].find(']').is_some_and(|end| {
                    let after = &h[end + 2..];
                    after.is_empty()
                        || after
                            .strip_prefix(':')
                            .is_some_and(|port| port.bytes().all(|b| b.is_ascii_digit()))
                })
        });
        let outside = authority
            .map_or(rest, |a| &rest[2 + a.len()..])
            .contains(['[', ']']);
        if !literal || outside {
            return bad("[ and ] stand only around an IP literal host");
        }
    }
    if fragment.contains(['[', ']']) {
        return bad("[ and ] stand only around an IP literal host");
    }
    None
}

impl OutboxSettings {
    /// The problems of `message_format`, `cloudevents_source` and `cloudevents_extensions`
    /// of table `key` (`outbox[i]`).
    pub(super) fn format_problems(&self, key: &str, out: &mut Vec<String>) {
        if !self.message_format.is_cloudevents() {
            for (name, set) in [
                ("cloudevents_source", self.cloudevents_source.is_some()),
                (
                    "cloudevents_extensions",
                    !self.cloudevents_extensions.is_empty(),
                ),
            ] {
                if set {
                    out.push(format!(
                        "{key}.{name}: only used with message_format = \"cloudevents\" or \"cloudevents-structured\" (message_format is \"outbox\")"
                    ));
                }
            }
        }
        if let Some(source) = &self.cloudevents_source {
            if let Some(problem) = uri_reference_problem(source) {
                out.push(format!("{key}.cloudevents_source: {problem}"));
            }
        }
        let mut seen = Vec::new();
        for entry in &self.cloudevents_extensions {
            let (header, attribute) = extension_entry(entry);
            if header.is_empty() || header.len() > 255 {
                out.push(format!(
                    "{key}.cloudevents_extensions: {entry:?}: the header name must be 1 to 255 bytes"
                ));
            }
            if let Some(problem) = extension_name_problem(attribute) {
                out.push(format!(
                    "{key}.cloudevents_extensions: {entry:?}: {problem}"
                ));
            } else if seen.contains(&attribute) {
                out.push(format!(
                    "{key}.cloudevents_extensions: attribute {attribute:?} is named twice"
                ));
            }
            seen.push(attribute);
        }
    }

    /// The CloudEvents `source` of this table's events: `cloudevents_source`, else
    /// `/outbox-relay/<database>/<schema>.<table>` (each part percent-encoded as a path
    /// segment), the database being `postgres.url`'s (or, when it names none, the user's, as
    /// PostgreSQL defaults it).
    pub fn cloudevents_source(&self, postgres: &PostgresSettings) -> String {
        if let Some(source) = &self.cloudevents_source {
            return source.clone();
        }
        let database = postgres
            .hosts()
            .ok()
            .and_then(|hosts| {
                let options: sqlx::postgres::PgConnectOptions =
                    hosts.first()?.url.expose().parse().ok()?;
                Some(
                    options
                        .get_database()
                        .unwrap_or(options.get_username())
                        .to_owned(),
                )
            })
            .unwrap_or_default();
        default_source(&database, &self.table.to_string())
    }

    /// `cloudevents_extensions` as (header, attribute) pairs.
    pub fn cloudevents_extension_pairs(&self) -> Vec<(String, String)> {
        self.cloudevents_extensions
            .iter()
            .map(|entry| {
                let (header, attribute) = extension_entry(entry);
                (header.to_owned(), attribute.to_owned())
            })
            .collect()
    }
}

/// `"header"` or `"header:attribute"`.
fn extension_entry(entry: &str) -> (&str, &str) {
    entry.rsplit_once(':').unwrap_or((entry, entry))
}

/// The default `source`: `/outbox-relay/<database>/<schema.table>`.
pub fn default_source(database: &str, table: &str) -> String {
    format!(
        "/outbox-relay/{}/{}",
        path_segment(database),
        path_segment(table)
    )
}

/// `text` as one path segment of a URI: every byte outside the unreserved and sub-delimiter
/// characters (and `:` `@`) percent-encoded.
pub fn path_segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'=' | b':'
            | b'@' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_references_absolute_and_relative_pass() {
        for ok in [
            "/outbox-relay/shop/public.outbox",
            "https://example.com/orders?x=1#frag",
            "urn:event:from:orders",
            "orders",
            "//host:8080/a",
            "http://[::1]:80/x",
            "mailto:a@b.c",
            "/a%20b",
            "./a:b",
        ] {
            assert_eq!(uri_reference_problem(ok), None, "{ok}");
        }
    }

    #[test]
    fn text_that_is_no_uri_reference_says_why() {
        for (bad, why) in [
            ("", "empty"),
            ("/a b", "percent-encoded"),
            ("/a%2", "two hex digits"),
            ("/a#b#c", "more than one #"),
            ("1ab:c", "not a scheme"),
            ("a b:c", "percent-encoded"),
            ("/x[1]", "IP literal"),
            ("héllo", "percent-encoded"),
        ] {
            let problem = uri_reference_problem(bad).unwrap_or_default();
            assert!(problem.contains(why), "{bad:?}: {problem}");
        }
    }

    #[test]
    fn a_path_segment_is_always_part_of_a_uri_reference() {
        let segment = path_segment("my db/\"Out Box\"#1é");
        assert_eq!(segment, "my%20db%2F%22Out%20Box%22%231%C3%A9");
        assert_eq!(uri_reference_problem(&format!("/x/{segment}")), None);
    }

    #[test]
    fn the_default_source_names_the_database_and_the_table() {
        assert_eq!(
            default_source("shop", "public.outbox"),
            "/outbox-relay/shop/public.outbox"
        );
        assert_eq!(
            default_source("my shop", "public.Out/Box"),
            "/outbox-relay/my%20shop/public.Out%2FBox"
        );
    }

    #[test]
    fn extension_names_follow_the_cloudevents_rules() {
        assert_eq!(extension_name_problem("tenant"), None);
        assert_eq!(extension_name_problem("region2"), None);
        assert!(extension_name_problem("Tenant").is_some());
        assert!(extension_name_problem("x-tenant").is_some());
        assert!(extension_name_problem(&"a".repeat(21)).is_some());
        assert!(extension_name_problem("traceparent")
            .unwrap()
            .contains("sets itself"));
    }
}
