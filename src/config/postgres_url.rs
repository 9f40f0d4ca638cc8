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

/// The hosts of `url` in order, or what is wrong with it (to follow `postgres.url: `).
pub fn hosts(url: &SecretUrl) -> Result<Vec<PgHost>, String> {
    let text = url.expose().trim();
    match text.split_once("://") {
        Some((scheme, rest)) if ["postgres", "postgresql"].contains(&scheme) => {
            url_hosts(scheme, rest)
        }
        Some(_) => Err(format!(
            "expected postgres://user@host:port/database (or key=value pairs), got {}",
            url.redacted()
        )),
        None if text.contains('=') => key_value_hosts(text),
        None => Err(format!(
            "expected postgres://user@host:port/database (or key=value pairs), got {}",
            url.redacted()
        )),
    }
}

/// The URL form: the authority's hosts split at commas, everything else kept as written.
fn url_hosts(scheme: &str, rest: &str) -> Result<Vec<PgHost>, String> {
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, host_list) = match authority.rfind('@') {
        Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
        None => (None, authority),
    };
    let tail = without_session_attrs(tail)?;
    let prefix = match userinfo {
        Some(u) => format!("{scheme}://{u}@"),
        None => format!("{scheme}://"),
    };
    if host_list.is_empty() {
        // No host in the authority: the driver's default, or a `host` parameter (a socket
        // directory, say); one host, as written.
        let query = tail.split_once('?').map_or("", |(_, q)| q);
        let param = |name: &str| {
            query
                .split('&')
                .find_map(|p| p.strip_prefix(name)?.strip_prefix('='))
        };
        let host = param("host").unwrap_or("localhost");
        let port = param("port").and_then(|p| p.parse().ok());
        return Ok(vec![PgHost {
            label: label(host, port),
            url: SecretUrl::new(format!("{prefix}{tail}")),
        }]);
    }
    let mut out = Vec::new();
    for entry in host_list.split(',') {
        let (host, port) = split_host_port(entry)?;
        let port_text = port.map(|p| format!(":{p}")).unwrap_or_default();
        let written = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        out.push(PgHost {
            label: label(&written, port),
            url: SecretUrl::new(format!("{prefix}{written}{port_text}{tail}")),
        });
    }
    Ok(out)
}

/// `host`, `host:port` or `[v6]:port` of the URL form.
fn split_host_port(entry: &str) -> Result<(&str, Option<u16>), String> {
    let (host, port) = if let Some(v6) = entry.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("the host {entry:?} lacks its closing ']'"))?;
        match after {
            "" => (host, None),
            p => (
                host,
                Some(p.strip_prefix(':').ok_or_else(|| {
                    format!("expected ':port' after the host [{host}], got {after:?}")
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
            "a host is empty in the host list (hosts are separated by commas: a:5432,b:5432), got {entry:?}"
        ));
    }
    let port = port.map(|p| parse_port(p, host)).transpose()?;
    Ok((host, port))
}

fn parse_port(port: &str, host: &str) -> Result<u16, String> {
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!(
            "the port of {host} is not a port number (1 to 65535), got {port:?}"
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

/// The key-value form: `key=value` pairs separated by spaces, values optionally in single
/// quotes (with `\'` and `\\`); `host` and `port` may list several, separated by commas.
fn key_value_hosts(text: &str) -> Result<Vec<PgHost>, String> {
    let pairs = key_value_pairs(text)?;
    let mut values = std::collections::BTreeMap::new();
    for (key, value) in pairs {
        if !KEYS.contains(&key.as_str()) {
            return Err(format!(
                "unknown parameter {key:?} (the relay reads {})",
                KEYS.join(", ")
            ));
        }
        if key == "target_session_attrs" {
            session_attrs(&value)?;
            continue;
        }
        values.insert(key, value);
    }
    let host_list = values.get("host").map_or("localhost", String::as_str);
    let hosts: Vec<&str> = host_list.split(',').collect();
    if hosts.iter().any(|h| h.is_empty()) {
        return Err(format!(
            "host: a host is empty in the list (separate hosts with commas: host=a,b), got {host_list:?}"
        ));
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
            if let Some(user) = values.get("user") {
                url.set_username(user)
                    .map_err(|_| "user: not usable in a URL".to_string())?;
            }
            if let Some(password) = values.get("password") {
                url.set_password(Some(password))
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

/// Splits `key=value key2='quoted value'` into pairs.
fn key_value_pairs(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
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
        if chars.next() != Some('=') {
            return Err(format!("expected key=value pairs, got {key:?} without '='"));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => return Err(format!("{key}: the quoted value is not closed")),
                    },
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => return Err(format!("{key}: the quoted value is not closed")),
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

/// `text` with its password replaced by `***`, for the forms the URL parser cannot read (several
/// hosts, key-value pairs); `None` when it is neither.
pub fn redacted(text: &str) -> Option<String> {
    let text = text.trim();
    if let Some((scheme, rest)) = text.split_once("://") {
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let authority = match authority.rfind('@') {
            Some(at) => {
                let (userinfo, hosts) = authority.split_at(at);
                match userinfo.split_once(':') {
                    Some((user, _)) => format!("{user}:***{hosts}"),
                    None => authority.to_owned(),
                }
            }
            None => authority.to_owned(),
        };
        let tail = match tail.split_once('?') {
            Some((path, query)) => {
                let query: Vec<String> = query
                    .split('&')
                    .map(|pair| match pair.split_once('=') {
                        Some(("password", _)) => "password=***".to_owned(),
                        _ => pair.to_owned(),
                    })
                    .collect();
                format!("{path}?{}", query.join("&"))
            }
            None => tail.to_owned(),
        };
        return Some(format!("{scheme}://{authority}{tail}"));
    }
    let pairs = key_value_pairs(text).ok()?;
    Some(
        pairs
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
    )
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
        let multi = redacted("postgres://relay:s3cret@a:5432,b:5433/app?sslmode=require").unwrap();
        assert_eq!(
            multi,
            "postgres://relay:***@a:5432,b:5433/app?sslmode=require"
        );
        let kv = redacted("host=a,b password='s3 cret' dbname=app").unwrap();
        assert_eq!(kv, "host=a,b password=*** dbname=app");
        for text in [
            "postgres://relay:s3cret@a,b/app",
            "host=a,b password=s3cret",
        ] {
            let url = SecretUrl::new(text);
            assert!(!format!("{url} {url:?}").contains("s3cret"), "{url}");
        }
    }
}
