//! Logging setup: text or JSON lines on stderr (journald keeps them), filtered by the config's
//! level unless `RUST_LOG` is set; and the panic hook that reports a panic once, in the log.
//! Must not log secrets; callers pass redacted URLs. Must never stop or stall the relay: a
//! line goes into a bounded queue that one writer thread drains to stderr, so a reader that
//! stopped reading (a paused pager, journald stuck with its buffer full) blocks that thread
//! only; a line the full queue has no room for, or that stderr refuses (its reader gone: `run
//! 2>&1 | head` after `head` exits, journald restarting), is dropped and counted, never
//! retried, never waited for and never a panic.

pub mod otlp;

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{LazyLock, OnceLock};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

/// Lines the queue holds at most. With the pipe's own 64 KiB that is about a megabyte of log
/// (lines of ~250 bytes) that a slow reader may fall behind before lines are dropped: room
/// for a burst (an outage logged by every table and session, a panic with its backtrace),
/// while the memory stays bounded whatever the reader does.
const QUEUE_LINES: usize = 4096;

/// How long the process waits at exit for its last log lines to reach stderr (see [`flush`]):
/// plenty for a reader that reads, and well inside systemd's stop timeout for one that does
/// not.
pub const EXIT_FLUSH: Duration = Duration::from_secs(2);

/// Log lines dropped: the queue was full, or stderr refused them (see [`dropped_lines`]).
static DROPPED_LINES: AtomicU64 = AtomicU64::new(0);

/// The queue to the writer thread, started by the first line; `None` when the thread could
/// not be started (lines are then written in place, as before there was a queue).
static QUEUE: OnceLock<Option<SyncSender<Vec<u8>>>> = OnceLock::new();

/// Lines put into the queue, and lines the writer thread is done with (written or dropped):
/// the queue is empty up to line n once `DONE >= n` (see [`flush`]).
static QUEUED: AtomicU64 = AtomicU64::new(0);
static DONE: AtomicU64 = AtomicU64::new(0);

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
        .with_writer(QueuedStderr)
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

/// How many log lines were dropped since the process started (not retried): the queue was full
/// or stderr refused them.
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
/// config error before logging starts, the error `main` exits with). It takes the log's way,
/// behind the lines logged before it: dropped when the queue is full or stderr is gone
/// (`eprintln!` would block on a full pipe, or panic on a closed one). Reaches stderr before
/// the process exits if [`flush`] is called.
pub fn print_to_stderr(line: &str) {
    enqueue(format!("{line}\n").into_bytes());
}

/// Waits until the lines logged so far are written (or dropped by stderr), for at most
/// `within`: the last lines before an exit ("relay stopped", a config error, the panic) reach
/// a reader that reads, and a reader that does not cannot hold the exit up for longer than
/// `within`. Lines still queued then are lost with the process.
pub fn flush(within: Duration) {
    if QUEUE.get().is_none_or(Option::is_none) {
        return;
    }
    let target = QUEUED.load(Ordering::Acquire);
    let deadline = Instant::now() + within;
    // Polled, at exit only: the writer thread stays a plain loop with nothing to signal.
    while DONE.load(Ordering::Acquire) < target && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Puts one line (its newline included) into the queue without waiting: dropped and counted
/// when the queue is full.
fn enqueue(line: Vec<u8>) {
    match QUEUE.get_or_init(start_writer) {
        Some(queue) => match queue.try_send(line) {
            Ok(()) => {
                QUEUED.fetch_add(1, Ordering::Release);
            }
            // Full: the reader has not kept up with the last QUEUE_LINES lines. (Disconnected
            // cannot happen: the writer thread never returns.)
            Err(_) => {
                DROPPED_LINES.fetch_add(1, Ordering::Relaxed);
            }
        },
        None => {
            write_or_drop(&line);
        }
    }
}

/// Starts the thread that writes the queue's lines to stderr, one at a time and in order; the
/// only thread a stuck stderr blocks. None (and lines written in place) if it cannot start.
fn start_writer() -> Option<SyncSender<Vec<u8>>> {
    let (queue, lines) = sync_channel::<Vec<u8>>(QUEUE_LINES);
    std::thread::Builder::new()
        .name("log writer".into())
        .spawn(move || {
            // Never ends: the sender lives in a static. The process exits around it.
            for line in lines {
                write_or_drop(&line);
                DONE.fetch_add(1, Ordering::Release);
            }
        })
        .ok()?;
    Some(queue)
}

/// The log's writer: a formatted event into the queue, never waiting (see [`enqueue`]).
struct QueuedStderr;

impl<'a> MakeWriter<'a> for QueuedStderr {
    type Writer = QueuedStderr;

    fn make_writer(&'a self) -> Self::Writer {
        QueuedStderr
    }
}

impl Write for QueuedStderr {
    /// One formatted event (tracing-subscriber writes each with one `write_all`): queued
    /// whole, or dropped whole and counted.
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        enqueue(line.to_vec());
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        // The writer thread writes each line as it comes; `flush` (the function) waits for it.
        Ok(())
    }
}

/// Under the queue: one line to stderr, written whole, or dropped whole and counted when
/// stderr refuses it; never a failure.
fn write_or_drop(line: &[u8]) {
    if std::io::stderr().lock().write_all(line).is_err() {
        DROPPED_LINES.fetch_add(1, Ordering::Relaxed);
    }
}

/// Replaces the default panic hook (which writes to stderr in its own format) with one that
/// counts the panic and reports it once, as an ERROR log line (the writer cannot fail or wait,
/// so the hook cannot panic or hang in turn). What the process does about a panic is the
/// service's decision (`crate::service`): it stops, drains and exits with `EX_SOFTWARE`.
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
