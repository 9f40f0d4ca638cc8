//! `rabbitmq.url`: each node's URL checked the way the AMQP client (lapin's amq-protocol-uri)
//! reads it when it connects, so a URL it would refuse, misread or partly ignore is a config
//! error at load instead of an I/O error at run. Opens no connection; shows no password.

use super::SecretUrl;

/// The query parameters the client reads (`AMQPQueryString`): it ignores any other silently,
/// so the relay refuses them.
const PARAMETERS: [&str; 5] = [
    "frame_max",
    "channel_max",
    "heartbeat",
    "connection_timeout",
    "auth_mechanism",
];

/// The SASL mechanisms the client knows, in the case it accepts them (any).
const MECHANISMS: [&str; 5] = [
    "plain",
    "amqplain",
    "external",
    "anonymous",
    "rabbit-cr-demo",
];

/// RabbitMQ's URI parameters for TLS (its Erlang client reads them; this client does not).
const TLS_PARAMETERS: [&str; 8] = [
    "cacertfile",
    "certfile",
    "keyfile",
    "verify",
    "fail_if_no_peer_cert",
    "server_name_indication",
    "depth",
    "password",
];

/// What is wrong with one `amqp://` or `amqps://` URL, each to follow `rabbitmq.url: `.
pub fn problems(url: &SecretUrl) -> Vec<String> {
    let text = url.expose().trim();
    let Some((_, rest)) = text.split_once("://") else {
        return vec!["not a URL".into()];
    };
    if let Some(reason) = super::unclear_userinfo(rest) {
        return vec![reason.into()];
    }
    let parsed = match url::Url::parse(text) {
        Ok(parsed) => parsed,
        // The parser's own words (no part of the URL in them).
        Err(e) => return vec![format!("not a URL the AMQP client can read ({e})")],
    };
    let mut out = Vec::new();
    if matches!(parsed.host(), Some(url::Host::Ipv6(_))) {
        // amq-protocol-uri takes the host from `Url::domain`, which is empty for an address.
        out.push(
            "an IPv6 address as the host is read as localhost by the AMQP client; use a host \
             name"
                .into(),
        );
    }
    for (part, text) in [
        ("the user name", parsed.username()),
        ("the password", parsed.password().unwrap_or("")),
        ("the vhost", parsed.path()),
    ] {
        if !super::postgres_url::decodes_to_utf8(text) {
            out.push(format!("{part} is not UTF-8 once percent-decoded"));
        }
    }
    let mut seen: Vec<String> = Vec::new();
    for (key, value) in parsed.query_pairs() {
        let key = key.as_ref();
        if seen.iter().any(|k| k == key) {
            out.push(format!(
                "the parameter {key} is given twice (the client reads only the first)"
            ));
            continue;
        }
        seen.push(key.to_owned());
        let number = |ok: bool, range: &str| {
            (!ok).then(|| format!("{key}={value}: expected a whole number from {range}"))
        };
        let problem = match key {
            "frame_max" => number(value.parse::<u32>().is_ok(), "0 to 4294967295"),
            "channel_max" => number(value.parse::<u16>().is_ok(), "0 to 65535"),
            "heartbeat" => number(value.parse::<u16>().is_ok(), "0 to 65535 (seconds)"),
            "connection_timeout" => number(value.parse::<u64>().is_ok(), "0 up (milliseconds)"),
            "auth_mechanism" => (!MECHANISMS.contains(&value.to_lowercase().as_str())).then(|| {
                format!(
                    "auth_mechanism={value}: expected one of {}",
                    MECHANISMS.join(", ")
                )
            }),
            k if TLS_PARAMETERS.contains(&k) => Some(format!(
                "unknown parameter {k:?}: the AMQP client does not read TLS settings from the \
                 URL; set them in [rabbitmq.tls] (ca_file, cert_file, key_file, server_name)"
            )),
            k => Some(format!(
                "unknown parameter {k:?} (the AMQP client reads {} and ignores any other)",
                PARAMETERS.join(", ")
            )),
        };
        out.extend(problem);
    }
    // Whatever else the client would refuse; its error is not shown, as it may quote the URL.
    if out.is_empty() && text.parse::<lapin::uri::AMQPUri>().is_err() {
        out.push("the AMQP client cannot read it".into());
    }
    out
}
