//! Logging setup: text or JSON lines on stderr (journald keeps them), filtered by the config's
//! level unless `RUST_LOG` is set. Must not log secrets; callers pass redacted URLs.

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

/// Installs the global subscriber; safe to call once per process.
pub fn init(settings: &LogSettings) {
    // The AMQP client logs every failed reconnect at ERROR, and so does the TLS certificate
    // verifier it uses (rustls-platform-verifier: "failed to verify TLS certificate", on every
    // connect to an untrusted broker); the relay already logs each outage and each failed TLS
    // check once, in its own words, so both are quiet unless RUST_LOG asks for them.
    const QUIET: &str = "lapin=off,rustls_platform_verifier=off";
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(format!("{},{QUIET}", settings.level)))
        .unwrap_or_else(|_| EnvFilter::new(format!("info,{QUIET}")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let _ = match settings.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
