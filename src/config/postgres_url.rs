//! `postgres.url` in the two forms libpq users write: a URL that may name several hosts
//! (`postgres://u@a:5432,b:5433/app?sslmode=verify-full`) and key-value pairs
//! (`host=a,b port=5432,5433 user=u dbname=app`). Turns either into one single-host URL per
//! host, in the order given, each of which the driver parses as it always has; owns the
//! redaction of the forms the URL parser cannot read. Opens no connection.
//!
//! Invariant: one host written as a URL yields that URL unchanged (less a
//! `target_session_attrs` parameter), so a single host behaves exactly as before.

use super::SecretUrl;

/// One host of `postgres.url`: a URL for the driver, and `host:port` for the relay's words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgHost {
    /// `host:port` (the port the driver will use when none is written: 5432, or `$PGPORT`).
    pub label: String,
    /// The URL of this host alone, with every other part of `postgres.url`.
    pub url: SecretUrl,
}

/// The keys of the key-value form the relay understands (libpq's names).
const KEYS: [&str; 12] = [
    "host",
    "port",
    "user",
    "password",
    "dbname",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "application_name",
    "options",
    "target_session_attrs",
];

/// The hosts of `url` in order, or what is wrong with it (to follow `postgres.url: `), never
/// showing its password. Every parameter is one the driver reads, with a value it accepts
/// ([`parameter_problems`]), so the driver never fails on one later nor ignores one.
pub fn hosts(url: &SecretUrl) -> Result<Vec<PgHost>, String> {
    let text = url.expose().trim();
    let hosts = match text.split_once("://") {
        Some((scheme, rest)) if ["postgres", "postgresql"].contains(&scheme) => {
            url_hosts(&UrlForm::read(scheme, rest)?)?
        }
        Some(_) => {
            return Err(format!(
                "expected postgres://user@host:port/database (or key=value pairs), got {}",
                url.redacted()
            ))
        }
        None if text.contains('=') => key_value_hosts(text)?,
        None => {
            return Err(format!(
                "expected postgres://user@host:port/database (or key=value pairs), got {}",
                url.redacted()
            ))
        }
    };
    // The hosts share every other part: one is checked for them all.
    let problems = parameter_problems(&hosts[0].url, hosts.len());
    match problems.is_empty() {
        true => Ok(hosts),
        false => Err(problems.join("; ")),
    }
}

/// The URL form taken apart: `scheme://userinfo@hosts` then the path and query as written.
struct UrlForm<'a> {
    scheme: &'a str,
    userinfo: Option<&'a str>,
    /// Each host as written (`[v6]` in brackets) with its port, if one is written; empty
    /// when the URL names none (the driver's default, or a `host` parameter).
    hosts: Vec<(String, Option<u16>)>,
    /// The path and query, from the first `/` or `?`.
    tail: &'a str,
}

impl<'a> UrlForm<'a> {
    /// Takes `scheme://rest` apart; an error never holds the user information, nor a port
    /// (which, in a URL whose `@` is missing, may be the password).
    fn read(scheme: &'a str, rest: &'a str) -> Result<UrlForm<'a>, String> {
        if let Some(reason) = super::unclear_userinfo(rest) {
            return Err(reason.into());
        }
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let (userinfo, host_list) = match authority.rfind('@') {
            Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
            None => (None, authority),
        };
        let mut hosts = Vec::new();
        if !host_list.is_empty() {
            for (i, entry) in host_list.split(',').enumerate() {
                let (host, port) = split_host_port(entry, i + 1)?;
                let written = match host.contains(':') {
                    true => format!("[{host}]"),
                    false => host.to_owned(),
                };
                hosts.push((written, port));
            }
        }
        Ok(UrlForm {
            scheme,
            userinfo,
            hosts,
            tail,
        })
    }

    /// `scheme://userinfo@`, what each host's URL starts with.
    fn prefix(&self) -> String {
        match self.userinfo {
            Some(u) => format!("{}://{u}@", self.scheme),
            None => format!("{}://", self.scheme),
        }
    }
}

/// The URL form: one URL per host, everything else kept as written.
fn url_hosts(form: &UrlForm) -> Result<Vec<PgHost>, String> {
    let tail = without_session_attrs(form.tail)?;
    let prefix = form.prefix();
    if form.hosts.is_empty() {
        // No host in the authority: the driver's default, or a `host` parameter (a socket
        // directory, say); one host, as written.
        let query = tail.split_once('?').map_or("", |(_, q)| q);
        let param = |name: &str| {
            url::form_urlencoded::parse(query.as_bytes())
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.into_owned())
        };
        let host = param("host").unwrap_or_else(|| "localhost".into());
        let port = param("port").and_then(|p| p.parse().ok());
        return Ok(vec![PgHost {
            label: label(&host, port),
            url: SecretUrl::new(format!("{prefix}{tail}")),
        }]);
    }
    Ok(form
        .hosts
        .iter()
        .map(|(host, port)| {
            let port_text = port.map(|p| format!(":{p}")).unwrap_or_default();
            PgHost {
                label: label(host, *port),
                url: SecretUrl::new(format!("{prefix}{host}{port_text}{tail}")),
            }
        })
        .collect())
}

/// `host`, `host:port` or `[v6]:port`, the `n`th entry of the URL form's host list. An error
/// names the entry by its place and shows neither its text nor its port.
fn split_host_port(entry: &str, n: usize) -> Result<(&str, Option<u16>), String> {
    let (host, port) = if let Some(v6) = entry.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("host {n} of the list lacks its closing ']'"))?;
        match after {
            "" => (host, None),
            p => (
                host,
                Some(p.strip_prefix(':').ok_or_else(|| {
                    format!("expected ':port' after the host [{host}] (host {n} of the list)")
                })?),
            ),
        }
    } else {
        match entry.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (entry, None),
        }
    };
    if host.is_empty() {
        return Err(format!(
            "a host is empty in the host list (host {n}; hosts are separated by commas: \
             a:5432,b:5432)"
        ));
    }
    let port = port
        .map(|p| parse_port(p, &format!("the port of {host}")))
        .transpose()?;
    Ok((host, port))
}

/// A port number; the error names `what` and never shows the text, which may be a password
/// written where the host should be (`postgres://user:secret/db`).
fn parse_port(port: &str, what: &str) -> Result<u16, String> {
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!(
            "{what} is not a port number (1 to 65535); if a password is written there, the \
             URL lacks its '@' or the password needs its / ? # @ percent-encoded"
        )),
    }
}

/// `host:port` for the relay's words, the driver's default port shown when none is written.
fn label(host: &str, port: Option<u16>) -> String {
    let port = port.unwrap_or_else(|| {
        std::env::var("PGPORT")
            .ok()
            .and_then(|p| p.parse().ok())
            .unwrap_or(5432)
    });
    format!("{host}:{port}")
}

/// The URL's path and query without `target_session_attrs`, which the relay checks and the
/// driver does not know; a value other than "primary only" is an error.
fn without_session_attrs(tail: &str) -> Result<String, String> {
    let Some((path, query)) = tail.split_once('?') else {
        return Ok(tail.to_owned());
    };
    let mut kept = Vec::new();
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("target_session_attrs", value)) => session_attrs(value)?,
            Some(("host", value)) if value.contains(',') || value.contains("%2C") => {
                return Err(
                    "several hosts in the host parameter are not supported; list them in the URL (postgres://u@a:5432,b:5432/db)".into(),
                )
            }
            _ => kept.push(pair),
        }
    }
    Ok(match kept.is_empty() {
        true => path.to_owned(),
        false => format!("{path}?{}", kept.join("&")),
    })
}

/// libpq's `target_session_attrs`: the relay always wants a server that takes writes.
fn session_attrs(value: &str) -> Result<(), String> {
    match value {
        "read-write" | "primary" => Ok(()),
        other => Err(format!(
            "target_session_attrs={other}: the relay works only against the primary; use read-write (what it always asks for) or leave it out"
        )),
    }
}

/// The query parameters the driver (sqlx 0.8's `PgConnectOptions::parse_from_url`) reads; it
/// ignores any other with a warning that logs its value, so the relay refuses them instead.
/// `options[NAME]` is read as well (see [`parameter_problems`]).
const DRIVER_PARAMETERS: [&str; 18] = [
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// libpq parameters the driver does not read, with what to use instead.
const NOT_READ: [(&str, &str); 4] = [
    (
        "connect_timeout",
        "set postgres.connect_timeout (e.g. \"10s\") instead",
    ),
    (
        "keepalives",
        "the driver does not support TCP keepalive settings",
    ),
    ("sslpassword", "the driver reads unencrypted keys only"),
    ("passfile", "the driver reads ~/.pgpass or $PGPASSFILE only"),
];

/// What is wrong with the query parameters of `url` (one host's URL, as [`hosts`] builds it,
/// `hosts` of them in all): a parameter the driver does not read, or a value it would refuse
/// when connecting. Names the parameter; shows a value only where it cannot be a secret. A
/// percent-encoding the driver cannot decode is named too.
fn parameter_problems(url: &SecretUrl, hosts: usize) -> Vec<String> {
    let parsed = match url::Url::parse(url.expose()) {
        Ok(parsed) => parsed,
        // The parser's own words (no part of the URL in them).
        Err(e) => return vec![format!("not a URL the driver can read ({e})")],
    };
    let mut out = Vec::new();
    for (part, text) in [
        ("the user name", parsed.username()),
        ("the password", parsed.password().unwrap_or("")),
        ("the database name", parsed.path()),
    ] {
        if !decodes_to_utf8(text) {
            out.push(format!("{part} is not UTF-8 once percent-decoded"));
        }
    }
    for (key, value) in parsed.query_pairs() {
        let key = key.as_ref();
        let bad_value = |expected: &str| Some(format!("{key}={value}: expected {expected}"));
        let problem = match key {
            "sslmode" | "ssl-mode" if value.parse::<sqlx::postgres::PgSslMode>().is_err() => {
                bad_value("disable, allow, prefer, require, verify-ca or verify-full")
            }
            "statement-cache-capacity" if value.parse::<usize>().is_err() => {
                bad_value("a whole number")
            }
            "port" if value.parse::<u16>().map_or(true, |p| p == 0) => {
                bad_value("a port number (1 to 65535)")
            }
            "hostaddr" if value.parse::<std::net::IpAddr>().is_err() => bad_value("an IP address"),
            "host" | "hostaddr" | "port" if hosts > 1 => Some(format!(
                "{key}: the driver would take it for every one of the {hosts} hosts; write the \
                 hosts and ports in the URL (postgres://u@a:5432,b:5432/db)"
            )),
            k if k.starts_with("options[") && !k.ends_with(']') => Some(format!(
                "{k:?} lacks its closing ']' (options[NAME]=value); the driver would ignore it"
            )),
            k if k.starts_with("options[") || DRIVER_PARAMETERS.contains(&k) => None,
            k => {
                let hint = NOT_READ
                    .iter()
                    .find(|(name, _)| k.starts_with(name))
                    .map_or_else(
                        || {
                            format!(
                                "the driver reads {}, options[NAME] and target_session_attrs",
                                DRIVER_PARAMETERS.join(", ")
                            )
                        },
                        |(_, hint)| (*hint).to_owned(),
                    );
                Some(format!("unknown parameter {k:?} ({hint})"))
            }
        };
        out.extend(problem);
    }
    // Whatever else the driver would refuse; its error is not shown, as it may quote the URL.
    if out.is_empty()
        && url
            .expose()
            .parse::<sqlx::postgres::PgConnectOptions>()
            .is_err()
    {
        out.push("the driver cannot read it".into());
    }
    out
}

/// `text` percent-encoded for a URL's user information or path: everything but letters,
/// digits and `-._~`.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

/// Whether `text` is UTF-8 once its `%XX` escapes are decoded (as the driver decodes it; a `%`
/// without two hex digits after it stays as it is).
pub(super) fn decodes_to_utf8(text: &str) -> bool {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).is_ok()
}

/// The key-value form: `key=value` pairs separated by spaces, values optionally in single
/// quotes (with `\'` and `\\`); `host` and `port` may list several, separated by commas.
fn key_value_hosts(text: &str) -> Result<Vec<PgHost>, String> {
    let pairs = key_value_pairs(text)?;
    let mut values = std::collections::BTreeMap::new();
    let mut after_password = false;
    for (key, value) in pairs {
        if !KEYS.contains(&key.as_str()) {
            // A word after an unquoted password with a space in it is a piece of that password.
            let which = match after_password {
                true => "after password= (if the password holds a space, put it in single \
                         quotes: password='...')"
                    .to_owned(),
                false => format!("{key:?}"),
            };
            return Err(format!(
                "unknown parameter {which} (the relay reads {})",
                KEYS.join(", ")
            ));
        }
        after_password |= key == "password";
        if key == "target_session_attrs" {
            session_attrs(&value)?;
            continue;
        }
        values.insert(key, value);
    }
    let host_list = values.get("host").map_or("localhost", String::as_str);
    let hosts: Vec<&str> = host_list.split(',').collect();
    if hosts.iter().any(|h| h.is_empty()) {
        return Err(
            "host: a host is empty in the list (separate hosts with commas: host=a,b)".into(),
        );
    }
    let ports: Vec<Option<u16>> = match values.get("port") {
        None => vec![None; hosts.len()],
        Some(list) => {
            let ports: Vec<&str> = list.split(',').collect();
            let parsed = ports
                .iter()
                .map(|p| parse_port(p, "the port list").map(Some))
                .collect::<Result<Vec<_>, _>>()?;
            match parsed.len() {
                1 => vec![parsed[0]; hosts.len()],
                n if n == hosts.len() => parsed,
                n => {
                    return Err(format!(
                        "port: {n} ports for {} hosts (give one port for all, or one per host)",
                        hosts.len()
                    ))
                }
            }
        }
    };
    hosts
        .iter()
        .zip(ports)
        .map(|(host, port)| {
            let mut url = url::Url::parse("postgres://localhost")
                .map_err(|e| format!("building the URL: {e}"))?;
            let socket = host.starts_with('/');
            if !socket {
                let written = match host.contains(':') {
                    true => format!("[{host}]"),
                    false => host.to_string(),
                };
                url.set_host(Some(&written))
                    .map_err(|e| format!("host {host:?}: {e}"))?;
            }
            url.set_port(port)
                .map_err(|_| format!("port of {host:?}: not usable"))?;
            // Encoded here: the URL parser would leave a '%' of the value as it is, and the
            // driver would decode it.
            if let Some(user) = values.get("user") {
                url.set_username(&percent_encode(user))
                    .map_err(|_| "user: not usable in a URL".to_string())?;
            }
            if let Some(password) = values.get("password") {
                url.set_password(Some(&percent_encode(password)))
                    .map_err(|_| "password: not usable in a URL".to_string())?;
            }
            if let Some(db) = values.get("dbname") {
                url.path_segments_mut()
                    .map_err(|_| "dbname: not usable in a URL".to_string())?
                    .push(db);
            }
            {
                let mut query = url.query_pairs_mut();
                if socket {
                    query.append_pair("host", host);
                }
                for (key, value) in &values {
                    if !["host", "port", "user", "password", "dbname"].contains(&key.as_str()) {
                        query.append_pair(key, value);
                    }
                }
            }
            let mut text = url.to_string();
            if text.ends_with('?') {
                text.pop();
            }
            Ok(PgHost {
                label: label(
                    if socket {
                        host
                    } else {
                        url.host_str().unwrap_or(host)
                    },
                    port,
                ),
                url: SecretUrl::new(text),
            })
        })
        .collect()
}

/// Splits `key=value key2='quoted value'` into pairs. An error shows no value, and no word
/// that follows a `password` pair (it may be a piece of the password).
fn key_value_pairs(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let after_password = out.iter().any(|(k, _)| k == "password");
        let plain = !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if chars.next() != Some('=') || !plain {
            return Err(match (after_password, plain) {
                (true, _) => "expected key=value pairs, got a word without '=' after password= \
                              (if the password holds a space, put it in single quotes: \
                              password='...')"
                    .into(),
                (false, true) => format!("expected key=value pairs, got {key:?} without '='"),
                (false, false) => "expected key=value pairs, got a key that is not a parameter \
                                   name (letters, digits and _)"
                    .into(),
            });
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        // A key after an unquoted password with a space in it may be a piece of the password.
        let named = match after_password && key != "password" {
            true => "a parameter after password=".to_owned(),
            false => key.clone(),
        };
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => return Err(format!("{named}: the quoted value is not closed")),
                    },
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => return Err(format!("{named}: the quoted value is not closed")),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        out.push((key, value));
    }
}

/// A `postgres://` or `postgresql://` URL (one host or several) without its password, printed
/// from its parsed parts: the user, `***` for a password, the hosts as checked, the path and
/// the query with `***` for a `password` parameter. What cannot be parsed is shown as the
/// scheme and the reason only.
pub fn redacted(url: &SecretUrl) -> String {
    let text = url.expose().trim();
    let Some((scheme, rest)) = text.split_once("://") else {
        return redacted_key_values(text);
    };
    let form = match UrlForm::read(scheme, rest) {
        Ok(form) => form,
        Err(reason) => return format!("{scheme}://<not shown: {reason}>"),
    };
    // The parser reads the user information, path and query of one host's URL; the hosts
    // shown are the checked ones.
    let one = format!("{}localhost{}", form.prefix(), form.tail);
    let shown = match url::Url::parse(&one) {
        Ok(parsed) => super::without_password(&parsed).and_then(|s| url::Url::parse(&s).ok()),
        Err(e) => return format!("{scheme}://<not shown: not a URL the driver can read ({e})>"),
    };
    let Some(shown) = shown else {
        return format!("{scheme}://<not shown: the password cannot be removed>");
    };
    let userinfo = match (shown.username(), shown.password()) {
        ("", None) => String::new(),
        (user, None) => format!("{user}@"),
        (user, Some(password)) => format!("{user}:{password}@"),
    };
    let hosts: Vec<String> = form
        .hosts
        .iter()
        .map(|(host, port)| match port {
            Some(port) => format!("{host}:{port}"),
            None => host.clone(),
        })
        .collect();
    // `scheme://host` has no path; the parser writes "/" for it.
    let path = if form.tail.is_empty() {
        ""
    } else {
        shown.path()
    };
    let query = shown.query().map(|q| format!("?{q}")).unwrap_or_default();
    format!("{scheme}://{userinfo}{}{path}{query}", hosts.join(","))
}

/// PostgreSQL's key=value form with `password=***`, printed from its parsed pairs; a text that
/// is not one (nor a URL) is shown as `<not shown: reason>` only.
pub fn redacted_key_values(text: &str) -> String {
    if !text.contains('=') {
        return "<not shown: not a URL (no scheme:// at its start)>".into();
    }
    match key_value_pairs(text) {
        Ok(pairs) => pairs
            .iter()
            .map(|(k, v)| match k.as_str() {
                "password" => format!("{k}=***"),
                _ if v.is_empty() || v.contains(char::is_whitespace) || v.contains('\'') => {
                    format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
                }
                _ => format!("{k}={v}"),
            })
            .collect::<Vec<_>>()
            .join(" "),
        Err(reason) => format!("<not shown: {reason}>"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<(String, String)>, String> {
        hosts(&SecretUrl::new(text)).map(|hosts| {
            hosts
                .into_iter()
                .map(|h| (h.label, h.url.expose().to_owned()))
                .collect()
        })
    }

    #[test]
    fn one_host_is_the_url_as_written() {
        let url = "postgres://relay:s3cret@db.internal:5432/app?sslmode=verify-full";
        assert_eq!(
            parse(url).unwrap(),
            [("db.internal:5432".to_owned(), url.to_owned())]
        );
    }

    #[test]
    fn a_url_without_a_host_keeps_its_host_parameter() {
        let url = "postgres:///app?host=/var/run/postgresql&port=5433";
        assert_eq!(
            parse(url).unwrap(),
            [("/var/run/postgresql:5433".to_owned(), url.to_owned())]
        );
    }

    #[test]
    fn several_hosts_become_one_url_each_in_order() {
        let got = parse(
            "postgresql://relay:s3cret@a:5432,b:5433,[::1]:5434/app?sslmode=require&target_session_attrs=read-write",
        )
        .unwrap();
        assert_eq!(
            got,
            [
                (
                    "a:5432".to_owned(),
                    "postgresql://relay:s3cret@a:5432/app?sslmode=require".to_owned()
                ),
                (
                    "b:5433".to_owned(),
                    "postgresql://relay:s3cret@b:5433/app?sslmode=require".to_owned()
                ),
                (
                    "[::1]:5434".to_owned(),
                    "postgresql://relay:s3cret@[::1]:5434/app?sslmode=require".to_owned()
                ),
            ]
        );
        // Each of them is a URL the driver reads.
        for (_, url) in got {
            url.parse::<sqlx::postgres::PgConnectOptions>().unwrap();
        }
    }

    #[test]
    fn key_value_pairs_list_hosts_and_ports() {
        let got = parse(
            "host=a,b port=5432,5433 user=relay password='it\\'s s3cret' dbname=app sslmode=verify-full target_session_attrs=primary",
        )
        .unwrap();
        assert_eq!(got[0].0, "a:5432");
        assert_eq!(got[1].0, "b:5433");
        let options: sqlx::postgres::PgConnectOptions = got[1].1.parse().unwrap();
        assert_eq!(options.get_host(), "b");
        assert_eq!(options.get_port(), 5433);
        assert_eq!(options.get_username(), "relay");
        assert_eq!(options.get_database(), Some("app"));
        let one_port = parse("host=a,b port=6000 dbname=app").unwrap();
        assert_eq!(one_port[1].0, "b:6000");
    }

    #[test]
    fn mistakes_are_named() {
        let problem = |text: &str| parse(text).unwrap_err();
        assert!(problem("postgres://u@a:5432,,b/app").contains("a host is empty"));
        assert!(problem("postgres://u@a:5432,b:x/app").contains("the port of b"));
        assert!(problem("postgres://u@a,b/app?target_session_attrs=any")
            .contains("target_session_attrs=any: the relay works only against the primary"));
        assert!(problem("host=a,b port=1,2,3").contains("3 ports for 2 hosts"));
        assert!(problem("host=a hostaddr=10.0.0.1").contains("unknown parameter \"hostaddr\""));
        assert!(problem("mysql://u@a/app").starts_with("expected postgres://"));
        assert!(problem("host=a password='open").contains("not closed"));
    }

    #[test]
    fn passwords_of_every_form_are_redacted() {
        let shown = |text: &str| SecretUrl::new(text).redacted();
        assert_eq!(
            shown("postgres://relay:s3cret@a:5432,b:5433/app?sslmode=require"),
            "postgres://relay:***@a:5432,b:5433/app?sslmode=require"
        );
        assert_eq!(
            shown("host=a,b password='s3 cret' dbname=app"),
            "host=a,b password=*** dbname=app"
        );
        assert_eq!(
            shown("postgresql://relay@[::1],b/app?password=s3cret&sslmode=require"),
            "postgresql://relay@[::1],b/app?password=***&sslmode=require"
        );
        assert_eq!(shown("postgres://a,b"), "postgres://a,b");
        for text in [
            "postgres://relay:s3cret@a,b/app",
            "host=a,b password=s3cret",
            "postgres://relay@a/app?password=s3cret",
        ] {
            let url = SecretUrl::new(text);
            assert!(!format!("{url} {url:?}").contains("s3cret"), "{url}");
        }
    }

    use crate::config::hostile;

    const HOSTILE: [&str; 6] = hostile::passwords("x-db.internal-y");

    /// Every form of `postgres.url` with `password` in it: neither the hosts' list nor its
    /// problem, nor the URL shown, holds the password.
    #[test]
    fn no_password_is_shown_whatever_characters_it_holds() {
        for password in HOSTILE {
            let forms = [
                format!("postgres://relay:{password}@db.internal:5432/app"),
                format!("postgres://relay:{password}@db.internal:5432,b:5433/app"),
                format!("postgresql://relay:{password}@/app?host=/run/postgresql"),
                format!("postgres://relay:{password}"),
                format!("postgres://relay:{password}@"),
                format!("postgres://relay@db.internal/app?password={password}"),
                format!("host=db.internal,b password={password} dbname=app"),
                format!("host=db.internal password='{password}' dbname=app"),
                format!("host=db.internal password={password} x dbname=app"),
                format!("host=db.internal password={password} x='y dbname=app"),
            ];
            for text in forms {
                let url = SecretUrl::new(&text);
                let problem = hosts(&url).err().unwrap_or_default();
                hostile::assert_hidden(password, &text, &format!("{url} | {url:?} | {problem}"));
            }
        }
    }

    #[test]
    fn a_quoted_key_value_password_reaches_the_driver_as_written() {
        for password in HOSTILE {
            let text = format!(
                "host=a user=relay password='{}' dbname=app",
                password.replace('\'', "\\'")
            );
            let got = hosts(&SecretUrl::new(&text)).unwrap_or_else(|e| panic!("{text}: {e}"));
            let url = url::Url::parse(got[0].url.expose()).unwrap();
            let decoded: Vec<u8> =
                url::form_urlencoded::parse(format!("p={}", url.password().unwrap()).as_bytes())
                    .map(|(_, v)| v.into_owned().into_bytes())
                    .next()
                    .unwrap();
            assert_eq!(String::from_utf8(decoded).unwrap(), *password);
            got[0]
                .url
                .expose()
                .parse::<sqlx::postgres::PgConnectOptions>()
                .unwrap();
        }
    }

    #[test]
    fn parameters_the_driver_would_refuse_or_ignore_are_named() {
        let problem = |text: &str| parse(text).unwrap_err();
        for (url, expected) in [
            (
                "postgres://u:pw@a/app?connect_timeout=abc",
                "unknown parameter \"connect_timeout\" (set postgres.connect_timeout",
            ),
            (
                "postgres://u:pw@a/app?sslmode=bogus",
                "sslmode=bogus: expected disable, allow, prefer, require, verify-ca or verify-full",
            ),
            (
                "postgres://u:pw@a/app?ssl-mode=nope",
                "ssl-mode=nope: expected",
            ),
            (
                "postgres://u:pw@a/app?pasword=pw",
                "unknown parameter \"pasword\"",
            ),
            ("postgres://u:pw@a/app?keepalives_idle=5", "TCP keepalive"),
            (
                "postgres://u:pw@a/app?port=0",
                "port=0: expected a port number",
            ),
            (
                "postgres://u:pw@a/app?port=x",
                "port=x: expected a port number",
            ),
            (
                "postgres://u:pw@a/app?hostaddr=db",
                "hostaddr=db: expected an IP address",
            ),
            (
                "postgres://u:pw@a,b/app?hostaddr=10.0.0.1",
                "hostaddr: the driver would take it for every one of the 2 hosts",
            ),
            (
                "postgres://u:pw@a/app?statement-cache-capacity=-1",
                "a whole number",
            ),
            (
                "postgres://u:pw@a/app?options[search_path=x",
                "lacks its closing ']'",
            ),
            ("postgres://u:%FF@a/app", "the password is not UTF-8"),
            ("host=a sslmode=bogus", "sslmode=bogus: expected"),
        ] {
            let got = problem(url);
            assert!(got.contains(expected), "{url}: {expected:?} not in {got}");
            assert!(!got.contains("pw"), "{url}: {got}");
        }
        // Several at once, all named.
        let got = problem("postgres://u@a/app?connect_timeout=abc&sslmode=bogus");
        assert!(
            got.contains("connect_timeout") && got.contains("sslmode=bogus"),
            "{got}"
        );
        // What the driver reads is accepted.
        for url in [
            "postgres://u:pw@a/app?sslmode=verify-full&sslrootcert=-----BEGIN&application_name=x",
            "postgres://u@a/app?options=-c%20search_path%3Dapp&options[work_mem]=4MB",
            "postgres://u@a/app?statement-cache-capacity=0&dbname=other&user=v&password=pw2",
            "postgres://u@a/app?hostaddr=10.0.0.1&port=5433",
            "postgres://u@a,b/app?target_session_attrs=read-write&sslmode=REQUIRE",
        ] {
            parse(url).unwrap_or_else(|e| panic!("{url}: {e}"));
        }
    }
}
