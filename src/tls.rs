//! TLS for the relay's two servers: the certificate files the config names (read and checked at
//! load, so a missing or bad file is a configuration error), the broker's TLS connector built
//! from `[rabbitmq.tls]`, and the relay's words for a handshake that failed: which check failed,
//! decided on the TLS library's typed error, never on its message text. Opens no connection.

use std::fmt;
use std::path::Path;

use lapin::tcp::{RustlsConnector, RustlsConnectorConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{AlertDescription, CertificateError};

use crate::config::{RabbitTlsSettings, SecretUrl};

/// Which check of a TLS handshake failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsCheck {
    /// The server's certificate does not lead to a CA the relay trusts.
    UnknownIssuer,
    /// The server's certificate does not carry the name the relay expects.
    NameMismatch {
        /// The name the relay checked (the URL's host, or `server_name`), when known.
        expected: Option<String>,
        /// The names the certificate carries.
        presented: Vec<String>,
    },
    /// The server's certificate has expired (`not_after`, Unix seconds, when known).
    Expired { not_after: Option<u64> },
    /// The server's certificate is not valid yet (`not_before`, Unix seconds, when known).
    NotYetValid { not_before: Option<u64> },
    /// The server's certificate was revoked.
    Revoked,
    /// The server's certificate is unusable otherwise (bad signature, not for TLS servers, ...).
    BadServerCertificate(String),
    /// The server requires a client certificate and the relay sent none.
    ClientCertificateRequired,
    /// The server refused the relay's client certificate, with this alert.
    ClientCertificateRefused(String),
    /// The server does not speak TLS on this port (it answered with something else).
    NotTls,
    /// The relay's own certificate files could not be used (read at each connect).
    OwnSettings(String),
    /// The handshake failed otherwise (no common protocol version or cipher suite, ...).
    Handshake(String),
}

impl TlsCheck {
    /// The failed check in `error` or in the errors it wraps: the client libraries return the
    /// TLS library's typed error inside an I/O error. `None` when no TLS check failed.
    pub fn find(error: &(dyn std::error::Error + 'static)) -> Option<TlsCheck> {
        let mut next = Some(error);
        while let Some(e) = next {
            if let Some(tls) = e.downcast_ref::<rustls::Error>() {
                return Some(TlsCheck::from_rustls(tls));
            }
            // An I/O error's `source` skips the error it carries; look at that one first.
            if let Some(inner) = e
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
            {
                if let Some(check) = TlsCheck::find(inner) {
                    return Some(check);
                }
            }
            next = e.source();
        }
        None
    }

    fn from_rustls(e: &rustls::Error) -> TlsCheck {
        match e {
            rustls::Error::InvalidCertificate(c) => match c {
                CertificateError::UnknownIssuer => TlsCheck::UnknownIssuer,
                CertificateError::NotValidForName => TlsCheck::NameMismatch {
                    expected: None,
                    presented: Vec::new(),
                },
                CertificateError::NotValidForNameContext {
                    expected,
                    presented,
                } => TlsCheck::NameMismatch {
                    expected: Some(expected.to_str().into_owned()),
                    presented: presented.clone(),
                },
                CertificateError::Expired => TlsCheck::Expired { not_after: None },
                CertificateError::ExpiredContext { not_after, .. } => TlsCheck::Expired {
                    not_after: Some(not_after.as_secs()),
                },
                CertificateError::NotValidYet => TlsCheck::NotYetValid { not_before: None },
                CertificateError::NotValidYetContext { not_before, .. } => TlsCheck::NotYetValid {
                    not_before: Some(not_before.as_secs()),
                },
                CertificateError::Revoked => TlsCheck::Revoked,
                other => TlsCheck::BadServerCertificate(format!("{other:?}")),
            },
            rustls::Error::NoCertificatesPresented => {
                TlsCheck::BadServerCertificate("the server presented no certificate".into())
            }
            rustls::Error::AlertReceived(alert) => match alert {
                AlertDescription::CertificateRequired => TlsCheck::ClientCertificateRequired,
                AlertDescription::BadCertificate
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::CertificateRevoked
                | AlertDescription::CertificateExpired
                | AlertDescription::CertificateUnknown
                | AlertDescription::UnknownCA
                | AlertDescription::AccessDenied => {
                    TlsCheck::ClientCertificateRefused(format!("{alert:?}"))
                }
                // TLS 1.2 servers also end the handshake this way when a client certificate
                // they require is missing.
                AlertDescription::HandshakeFailure => TlsCheck::Handshake(
                    "the server ended the handshake (alert HandshakeFailure: no common protocol \
                     version or cipher suite, or, with TLS 1.2, a client certificate it requires)"
                        .into(),
                ),
                other => TlsCheck::Handshake(format!("the server sent the alert {other:?}")),
            },
            rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType) => {
                TlsCheck::NotTls
            }
            other => TlsCheck::Handshake(other.to_string()),
        }
    }
}

impl fmt::Display for TlsCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsCheck::UnknownIssuer => {
                f.write_str("the server's certificate is not trusted (unknown issuer)")
            }
            TlsCheck::NameMismatch {
                expected,
                presented,
            } => {
                f.write_str("the server's certificate is not valid for ")?;
                match expected {
                    Some(name) => write!(f, "{name:?}")?,
                    None => f.write_str("the name the relay expects")?,
                }
                f.write_str(" (name mismatch")?;
                if !presented.is_empty() {
                    let names: Vec<&str> = presented.iter().map(|n| plain_name(n)).collect();
                    write!(f, "; it names {}", names.join(", "))?;
                }
                f.write_str(")")
            }
            TlsCheck::Expired { not_after } => {
                f.write_str("the server's certificate has expired")?;
                if let Some(at) = not_after.and_then(utc) {
                    write!(f, " (not after {at})")?;
                }
                Ok(())
            }
            TlsCheck::NotYetValid { not_before } => {
                f.write_str("the server's certificate is not valid yet")?;
                if let Some(at) = not_before.and_then(utc) {
                    write!(f, " (not before {at})")?;
                }
                Ok(())
            }
            TlsCheck::Revoked => f.write_str("the server's certificate was revoked"),
            TlsCheck::BadServerCertificate(why) => {
                write!(f, "the server's certificate is not usable ({why})")
            }
            TlsCheck::ClientCertificateRequired => {
                f.write_str("the server requires a client certificate and the relay sent none")
            }
            TlsCheck::ClientCertificateRefused(alert) => write!(
                f,
                "the server refused the relay's client certificate (alert {alert})"
            ),
            TlsCheck::NotTls => {
                f.write_str("the server does not speak TLS on this port (a plain port?)")
            }
            TlsCheck::OwnSettings(why) => write!(f, "the relay's TLS settings: {why}"),
            TlsCheck::Handshake(why) => write!(f, "the TLS handshake failed: {why}"),
        }
    }
}

/// A name as the TLS library lists a certificate's names (`DnsName("mq.internal")`,
/// `IpAddress(10.0.0.7)`), without the wrapping; for the words only.
fn plain_name(presented: &str) -> &str {
    presented
        .strip_prefix("DnsName(\"")
        .and_then(|n| n.strip_suffix("\")"))
        .or_else(|| {
            presented
                .strip_prefix("IpAddress(")
                .and_then(|n| n.strip_suffix(')'))
        })
        .unwrap_or(presented)
}

fn utc(secs: u64) -> Option<String> {
    let at = chrono::DateTime::from_timestamp(i64::try_from(secs).ok()?, 0)?;
    Some(at.format("%Y-%m-%d %H:%M:%S UTC").to_string())
}

/// A TLS check that failed with one of the relay's servers, in the relay's words:
/// `RabbitMQ at amqps://mq.internal:5671: the server's certificate is not trusted (unknown issuer)`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{server}: {check}")]
pub struct TlsFailure {
    /// `RabbitMQ at amqps://host:port` or `PostgreSQL at host:port`.
    pub server: String,
    pub check: TlsCheck,
}

/// The broker connection's TLS, from `[rabbitmq.tls]`: the platform's trust store plus
/// `ca_file`, the client certificate when configured, and the name to check.
pub struct BrokerTls {
    pub connector: RustlsConnector,
    /// The name the server's certificate must carry instead of the URL's host.
    pub server_name: Option<String>,
}

impl BrokerTls {
    /// Reads the files `tls` names and builds the connector (without `[rabbitmq.tls]`: the
    /// platform's trust store only, as the AMQP client does by default). Every problem names
    /// its key and path.
    pub fn load(tls: Option<&RabbitTlsSettings>) -> Result<BrokerTls, Vec<String>> {
        let mut problems = Vec::new();
        let mut config = RustlsConnectorConfig::new_with_platform_verifier();
        let Some(tls) = tls else {
            return connector(config, None)
                .map(|connector| BrokerTls {
                    connector,
                    server_name: None,
                })
                .map_err(|e| vec![format!("rabbitmq: cannot set up TLS: {e}")]);
        };
        if let Some(path) = &tls.ca_file {
            match read_certificates(path) {
                Ok(certs) => config.add_parsable_certificates(certs),
                Err(e) => problems.push(format!("rabbitmq.tls.ca_file: {e}")),
            }
        }
        let identity = match (&tls.cert_file, &tls.key_file) {
            (Some(cert), Some(key)) => {
                let certs = read_certificates(cert)
                    .map_err(|e| problems.push(format!("rabbitmq.tls.cert_file: {e}")));
                let key =
                    read_key(key).map_err(|e| problems.push(format!("rabbitmq.tls.key_file: {e}")));
                certs.ok().zip(key.ok())
            }
            (Some(_), None) => {
                problems.push("rabbitmq.tls.key_file: required with cert_file (the client certificate's private key)".into());
                None
            }
            (None, Some(_)) => {
                problems.push("rabbitmq.tls.cert_file: required with key_file (the client certificate the key belongs to)".into());
                None
            }
            (None, None) => None,
        };
        if let Some(name) = &tls.server_name {
            if ServerName::try_from(name.as_str()).is_err() {
                problems.push(format!(
                    "rabbitmq.tls.server_name: {name:?} is not a DNS name or an IP address"
                ));
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let has_identity = identity.is_some();
        let e = match connector(config, identity) {
            Ok(connector) => {
                return Ok(BrokerTls {
                    connector,
                    server_name: tls.server_name.clone(),
                })
            }
            Err(e) => e,
        };
        // Each file parsed; what fails now is using them: a key that is not the certificate's,
        // a client certificate or a CA that the TLS library cannot use (an X.509 v1 one, say).
        let cause = e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>());
        let (cert, key, ca) = (
            shown(tls.cert_file.as_deref()),
            shown(tls.key_file.as_deref()),
            shown(tls.ca_file.as_deref()),
        );
        Err(vec![match cause {
            Some(rustls::Error::InconsistentKeys(_)) if has_identity => format!(
                "rabbitmq.tls.key_file: {key} is not the key of the certificate in cert_file {cert}"
            ),
            Some(rustls::Error::InvalidCertificate(c)) if has_identity => format!(
                "rabbitmq.tls.cert_file: {cert}: not usable as a client certificate ({c:?})"
            ),
            _ if has_identity => format!(
                "rabbitmq.tls: cert_file {cert}, key_file {key} and ca_file {ca} cannot be used ({e})"
            ),
            _ => format!("rabbitmq.tls.ca_file: {ca}: not usable as a CA ({e})"),
        }])
    }
}

fn connector(
    config: RustlsConnectorConfig,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> std::io::Result<RustlsConnector> {
    match identity {
        Some((certs, key)) => config.connector_with_single_cert(certs, key),
        None => config.connector_with_no_client_auth(),
    }
}

fn shown(path: Option<&Path>) -> String {
    path.map(|p| p.display().to_string()).unwrap_or_default()
}

/// Every certificate in the PEM file at `path`; at least one.
fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not a valid PEM file ({e})", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no PEM certificate in it (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(certs)
}

/// The private key in the PEM file at `path` (PKCS#8, PKCS#1 RSA or SEC1 EC, unencrypted).
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => format!(
            "{}: no unencrypted PEM private key in it (-----BEGIN PRIVATE KEY-----)",
            path.display()
        ),
        e => format!("{}: not a valid PEM private key ({e})", path.display()),
    })
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Problems with the TLS parameters of a PostgreSQL URL: an `sslmode` the driver does not know,
/// certificate files that cannot be read or hold no PEM, `sslcert` without `sslkey`, and a CA
/// given to a mode that would not check the server with it.
pub fn postgres_url_problems(url: &SecretUrl) -> Vec<String> {
    let Ok(parsed) = url::Url::parse(url.expose()) else {
        return Vec::new();
    };
    let mut problems = Vec::new();
    let (mut mode, mut root, mut cert, mut key) = (None, None, None, None);
    for (name, value) in parsed.query_pairs() {
        // The names and aliases the driver accepts.
        match name.as_ref() {
            "sslmode" | "ssl-mode" => mode = Some(value.into_owned()),
            "sslrootcert" | "ssl-root-cert" | "ssl-ca" => root = Some(value.into_owned()),
            "sslcert" | "ssl-cert" => cert = Some(value.into_owned()),
            "sslkey" | "ssl-key" => key = Some(value.into_owned()),
            _ => {}
        }
    }
    const MODES: [&str; 6] = [
        "disable",
        "allow",
        "prefer",
        "require",
        "verify-ca",
        "verify-full",
    ];
    if let Some(mode) = &mode {
        if !MODES.contains(&mode.to_ascii_lowercase().as_str()) {
            problems.push(format!(
                "postgres.url: sslmode={mode} is not one of {}",
                MODES.join(", ")
            ));
        }
    }
    // The driver takes a certificate given inline as well as a file name.
    let inline = |value: &str| value.trim_start().starts_with("-----BEGIN");
    if let Some(root) = root.as_deref() {
        if !inline(root) {
            if let Err(e) = read_certificates(Path::new(root)) {
                problems.push(format!("postgres.url: sslrootcert: {e}"));
            }
        }
        let verifies = mode.as_deref().is_some_and(|m| {
            matches!(m.to_ascii_lowercase().as_str(), "verify-ca" | "verify-full")
        });
        if !verifies {
            problems.push(format!(
                "postgres.url: sslrootcert is given but sslmode={}: the driver then checks no certificate (unlike libpq, which verifies against sslrootcert); use sslmode=verify-full",
                mode.as_deref().unwrap_or("prefer (the default)")
            ));
        }
    }
    match (cert.as_deref(), key.as_deref()) {
        (Some(cert), Some(key)) => {
            if !inline(cert) {
                if let Err(e) = read_certificates(Path::new(cert)) {
                    problems.push(format!("postgres.url: sslcert: {e}"));
                }
            }
            if !inline(key) {
                if let Err(e) = read_key(Path::new(key)) {
                    problems.push(format!("postgres.url: sslkey: {e}"));
                }
            }
        }
        (Some(_), None) => problems.push(
            "postgres.url: sslcert needs sslkey (the client certificate's private key)".into(),
        ),
        (None, Some(_)) => problems.push(
            "postgres.url: sslkey needs sslcert (the client certificate the key belongs to)".into(),
        ),
        (None, None) => {}
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io_wrapped(e: rustls::Error) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }

    #[test]
    fn a_tls_error_inside_an_io_error_is_found_and_put_in_words() {
        let e = io_wrapped(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer,
        ));
        let check = TlsCheck::find(&e).expect("a TLS check");
        assert_eq!(check, TlsCheck::UnknownIssuer);
        assert_eq!(
            check.to_string(),
            "the server's certificate is not trusted (unknown issuer)"
        );
        assert_eq!(
            TlsCheck::find(&std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
            None
        );
    }

    #[test]
    fn each_failed_check_says_which_one_it_was() {
        let name = rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
            expected: ServerName::try_from("mq.internal").unwrap().to_owned(),
            presented: vec!["DnsName(\"other.internal\")".into()],
        });
        assert_eq!(
            TlsCheck::find(&io_wrapped(name)).unwrap().to_string(),
            "the server's certificate is not valid for \"mq.internal\" (name mismatch; it names other.internal)"
        );
        let expired = rustls::Error::InvalidCertificate(CertificateError::ExpiredContext {
            time: rustls::pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                1_800_000_000,
            )),
            not_after: rustls::pki_types::UnixTime::since_unix_epoch(
                std::time::Duration::from_secs(1_700_000_000),
            ),
        });
        assert_eq!(
            TlsCheck::find(&io_wrapped(expired)).unwrap().to_string(),
            "the server's certificate has expired (not after 2023-11-14 22:13:20 UTC)"
        );
        assert_eq!(
            TlsCheck::find(&io_wrapped(rustls::Error::AlertReceived(
                AlertDescription::CertificateRequired
            ))),
            Some(TlsCheck::ClientCertificateRequired)
        );
        assert_eq!(
            TlsCheck::find(&io_wrapped(rustls::Error::AlertReceived(
                AlertDescription::UnknownCA
            ))),
            Some(TlsCheck::ClientCertificateRefused("UnknownCA".into()))
        );
        assert_eq!(
            TlsCheck::find(&io_wrapped(rustls::Error::InvalidMessage(
                rustls::InvalidMessage::InvalidContentType
            ))),
            Some(TlsCheck::NotTls)
        );
    }

    #[test]
    fn postgres_tls_parameters_are_checked_at_load() {
        let problems = |url: &str| postgres_url_problems(&SecretUrl::new(url));
        assert!(problems("postgres://u@db:5432/app").is_empty());
        assert!(problems("postgres://u@db:5432/app?sslmode=verify-full").is_empty());
        let bad_mode = problems("postgres://u@db/app?sslmode=verify");
        assert!(
            bad_mode[0].contains("sslmode=verify is not one of"),
            "{bad_mode:?}"
        );
        let missing =
            problems("postgres://u@db/app?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem");
        assert_eq!(missing.len(), 1, "{missing:?}");
        assert!(
            missing[0].starts_with("postgres.url: sslrootcert: cannot read /nonexistent/ca.pem"),
            "{missing:?}"
        );
        let unchecked =
            problems("postgres://u@db/app?sslmode=require&sslrootcert=/nonexistent/ca.pem");
        assert!(
            unchecked
                .iter()
                .any(|p| p.contains("use sslmode=verify-full")),
            "{unchecked:?}"
        );
        let half = problems("postgres://u@db/app?sslmode=verify-full&sslcert=/x/client.pem");
        assert_eq!(
            half,
            ["postgres.url: sslcert needs sslkey (the client certificate's private key)"]
        );
    }
}
