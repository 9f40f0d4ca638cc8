//! Logging setup: text or JSON lines on stderr (journald keeps them), filtered by the config's
//! level unless `RUST_LOG` is set; and the panic hook that reports a panic once, in the log.
//! Must not log secrets; callers pass redacted URLs. Must never stop the relay: a line that
//! cannot be written (stderr's reader gone: `run 2>&1 | head` after `head` exits, journald
//! restarting) is dropped and counted, never retried and never a panic.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;

use tokio_util::sync::CancellationToken;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

/// Log lines dropped because stderr refused them (see [`dropped_lines`]).
static DROPPED_LINES: AtomicU64 = AtomicU64::new(0);

/// Panics seen by the panic hook in this process (see [`panics`]).
static PANICS: AtomicU64 = AtomicU64::new(0);

/// Cancelled by the panic hook at the first panic (see [`panicked`]).
static PANICKED: LazyLock<CancellationToken> = LazyLock::new(CancellationToken::new);

/// Installs the global subscriber and the panic hook; safe to call once per process.
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
        .with_writer(LossyStderr)
        // tracing-subscriber reports a failed write with `eprintln!`, which panics when stderr
        // is gone. The writer never fails, and this keeps that path closed regardless.
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let _ = match settings.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    report_panics();
}

/// How many log lines stderr refused since the process started (dropped, not retried).
pub fn dropped_lines() -> u64 {
    DROPPED_LINES.load(Ordering::Relaxed)
}

/// How many panics the process has seen, in any thread or task, caught or not.
pub fn panics() -> u64 {
    PANICS.load(Ordering::Relaxed)
}

/// Completes once any thread or task of the process has panicked: the service stops on it even
/// for a task it does not own (a library's background task, a health connection).
pub async fn panicked() {
    PANICKED.cancelled().await
}

/// Writes `line` and a newline to stderr, for the few messages written outside the log (a
/// config error before logging starts, the error `main` exits with). Like a log line, it is
/// dropped when stderr is gone: `eprintln!` would panic instead.
pub fn print_to_stderr(line: &str) {
    let mut stderr = std::io::stderr().lock();
    if writeln!(stderr, "{line}").is_err() {
        DROPPED_LINES.fetch_add(1, Ordering::Relaxed);
    }
}

/// The log's writer: stderr, where a write that fails drops the line instead of failing.
struct LossyStderr;

impl<'a> MakeWriter<'a> for LossyStderr {
    type Writer = LossyStderr;

    fn make_writer(&'a self) -> Self::Writer {
        LossyStderr
    }
}

impl Write for LossyStderr {
    /// One formatted event (tracing-subscriber writes each with one `write_all`): written
    /// whole, or dropped whole and counted.
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        if std::io::stderr().lock().write_all(line).is_err() {
            DROPPED_LINES.fetch_add(1, Ordering::Relaxed);
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        // stderr is unbuffered; nothing is kept to flush.
        Ok(())
    }
}

/// Replaces the default panic hook (which writes to stderr in its own format) with one that
/// counts the panic and reports it once, as an ERROR log line (the writer cannot fail, so the
/// hook cannot panic in turn). What the process does about a panic is the service's decision
/// (`crate::service`): it stops, drains and exits with `EX_SOFTWARE`.
fn report_panics() {
    std::panic::set_hook(Box::new(|info| {
        PANICS.fetch_add(1, Ordering::Relaxed);
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(a panic without a message)");
        let location = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_default();
        let thread = std::thread::current();
        let thread = thread.name().unwrap_or("unnamed");
        // Only when RUST_BACKTRACE asks for one, as the default hook does.
        let backtrace = std::backtrace::Backtrace::capture();
        if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
            tracing::error!(panic = message, %location, thread, %backtrace, "panicked: a bug in outbox-relay");
        } else {
            tracing::error!(panic = message, %location, thread, "panicked: a bug in outbox-relay");
        }
        PANICKED.cancel();
    }));
}
