//! Graceful shutdown: SIGTERM or SIGINT asks relays to stop fetching and drain; after the
//! shutdown timeout, waiting for confirms is abandoned. SIGHUP is logged and ignored (the
//! config is read at start only), never the default action that would kill the process
//! without a drain. Owns signals only.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Two-stage shutdown shared by every relay task.
#[derive(Clone, Default)]
pub struct Shutdown {
    stop: CancellationToken,
    abort: CancellationToken,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Stop fetching; in-flight confirms are still awaited and marked.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Give up waiting for confirms (unconfirmed rows stay due and go out again later).
    pub fn abort(&self) {
        self.stop.cancel();
        self.abort.cancel();
    }

    pub fn is_stopping(&self) -> bool {
        self.stop.is_cancelled()
    }

    pub async fn stopping(&self) {
        self.stop.cancelled().await
    }

    pub async fn aborted(&self) {
        self.abort.cancelled().await
    }

    /// Stops on the first SIGTERM or SIGINT, then aborts after `timeout` (or a second signal).
    /// Logs each SIGHUP and otherwise ignores it.
    pub fn on_signals(&self, timeout: Duration) -> std::io::Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        // Installed with the others, before any relay starts: from here on SIGHUP no longer
        // terminates the process. A reload would have to replace settings that every relay,
        // lease and connection was built from; a restart (SIGTERM, drain, start) does that.
        let mut hup = signal(SignalKind::hangup())?;
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::warn!("SIGHUP ignored: the configuration is read at start only; restart the service to apply changes");
            }
        });
        let this = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
                _ = this.stopping() => {}
            }
            tracing::info!(timeout = %humantime::format_duration(timeout), "shutting down: no new fetches, draining in-flight confirms");
            this.stop();
            tokio::select! {
                _ = tokio::time::sleep(timeout) => {
                    tracing::warn!("shutdown timeout reached; unconfirmed rows stay pending and go out again later");
                }
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            this.abort();
        });
        Ok(())
    }
}
