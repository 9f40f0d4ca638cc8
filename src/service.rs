//! The daemon: one relay task per configured table over one coordination session and one
//! broker connection shared by all of them, a retention sweeper per table with `retention`,
//! the optional health endpoint, systemd
//! readiness (READY once every table is relaying or standing by; STATUS= names any table that
//! is not ready and why), the watchdog fed from the relay loops, STOPPING at shutdown.
//! It supervises every task it starts: a panic anywhere in the process (a bug) stops the
//! process, never leaves it half alive: every relay drains as at SIGTERM and `run` returns
//! [`Crashed`], which exits with [`EX_SOFTWARE`] so that systemd restarts the service.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use sd_notify::NotifyState;
use tokio::task::{AbortHandle, JoinError, JoinHandle};

use crate::cluster::member::{self, MemberSettings};
use crate::config::Settings;
use crate::metrics::{BacklogSource, Metrics, Server};
use crate::publisher::Broker;
use crate::relay::{Acks, Heartbeat, RowBudget, Share, Sweeper, TableRelay};
use crate::shutdown::Shutdown;
use crate::store::leases::{Beats, Leases};
use crate::store::{Coordination, Store, TableSql};

/// The exit code after a panic: 70, EX_SOFTWARE in sysexits.h ("an internal software error").
/// Not in the unit's `RestartPreventExitStatus=` (which holds 78, EX_CONFIG, only), so
/// `Restart=on-failure` starts the relay again.
pub const EX_SOFTWARE: i32 = 70;

/// `run` stopped because something panicked: the relays drained, and the process exits with
/// [`EX_SOFTWARE`]. Names the task when it was one of the service's own.
#[derive(Debug, thiserror::Error)]
#[error(
    "stopped after a panic in {task} (a bug; see the log); exiting {EX_SOFTWARE} to be restarted"
)]
pub struct Crashed {
    pub task: String,
}

/// Runs every table's relay until `shutdown`, then waits for them to drain.
pub async fn run(settings: Settings, shutdown: Shutdown) -> anyhow::Result<()> {
    let settings = Arc::new(settings);
    // Bound before anything starts: an address in use is a start failure, not a log line.
    let health = match settings.health.listen {
        Some(addr) => Some(crate::health::bind(addr).await?),
        None => None,
    };
    // Lazy: a database that is down at start is retried by the relays, not fatal.
    let store = Store::connect_lazy(&settings.postgres)?;
    let metrics = Arc::new(Metrics::new());
    // One coordination session and one broker connection for all tables.
    let sqls: Vec<TableSql> = settings
        .outbox
        .iter()
        .map(|t| {
            let retry = settings.retry.with_override(&t.retry);
            TableSql::for_outbox(t, retry.on_exhausted)
        })
        .collect();
    let coordination = Coordination::start(
        &settings.postgres,
        store.servers(),
        &sqls,
        settings.relay.notify,
        settings.relay.poll_interval,
        settings.relay.reconnect_max_delay,
        metrics.reconnects(Server::Postgres),
    )?;
    let broker = Arc::new(
        Broker::new(&settings.rabbitmq).counting_reconnects(metrics.reconnects(Server::Rabbitmq)),
    );
    // The relays and the sweepers run until shutdown and end on their own; the tasks beside
    // them run until `run` stops them, after the relays.
    let mut relays = Tasks::default();
    let mut beside = Tasks::default();
    let blocked = {
        let broker = broker.clone();
        beside.spawn(
            "the broker-blocked sampler".into(),
            crate::metrics::sample_blocked(metrics.broker_blocked(), move || broker.is_blocked()),
        )
    };
    let mut beats = Vec::new();
    // Retention sweepers' progress, for the log at the end (the metrics have it too).
    let mut retention = Vec::new();
    // One membership per table (its partition leases), and one relay per table and channel.
    let members_stop = tokio_util::sync::CancellationToken::new();
    let channels = settings.relay.channels;
    // The members of all tables renew together: one statement per heartbeat for the process.
    let rounds = Beats::start(store.clone(), settings.relay.heartbeat);
    // The rows all tables and channels hold in memory, together.
    let rows = RowBudget::new(settings.relay.max_rows_in_memory, metrics.rows_in_memory());
    for (index, (table, sql)) in settings.outbox.iter().zip(&sqls).enumerate() {
        let lock = coordination.lock(index);
        let membership = member::start_in(
            Leases::on_store(store.clone(), table.table.clone(), settings.lease())
                .in_rounds(rounds.clone()),
            MemberSettings {
                name: member_name(),
                partitions: table.partitions,
                lease: settings.lease(),
                heartbeat: settings.relay.heartbeat,
                settle_margin: settings.settle_margin(),
            },
            Some(lock.clone()),
            members_stop.clone(),
        );
        if let Some(keep) = table.retention {
            let sweeper = Sweeper::new(
                store.clone(),
                sql.clone(),
                keep,
                lock.clone(),
                membership.ownership.clone(),
                shutdown.clone(),
            );
            metrics.add_sweeper(&table.table.to_string(), sweeper.progress());
            retention.push((table.table.clone(), sweeper.progress()));
            relays.spawn(
                format!("the retention sweeper of {}", table.table),
                sweeper.run(),
            );
        }
        let acks = Acks::new(channels, membership.settled);
        beside.watch(
            format!("the partition membership of {}", table.table),
            membership.task,
        );
        let metrics = metrics.table(&table.table.to_string());
        for channel in 0..channels {
            let relay = TableRelay::new(
                settings.clone(),
                table.clone(),
                store.clone(),
                if channel == 0 {
                    lock.clone()
                } else {
                    lock.for_another_relay()
                },
                Share::new(
                    membership.ownership.clone(),
                    acks.clone(),
                    channel,
                    channels,
                ),
                broker.clone(),
                &rows,
                shutdown.clone(),
                metrics.clone(),
            );
            beats.push(relay.heartbeat());
            relays.spawn(
                format!("the relay of {} (channel {channel})", table.table),
                relay.run(),
            );
        }
    }
    tracing::info!(
        tables = %settings.outbox.iter().map(|t| t.table.to_string()).collect::<Vec<_>>().join(", "),
        postgres = %settings.postgres.url,
        rabbitmq = %settings.rabbitmq.url,
        "outbox-relay starting"
    );
    let health = match health {
        Some(listener) => {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "health endpoint listening: GET /ready, GET /live, GET /metrics");
            }
            let probe = crate::health::Probe {
                beats: beats.clone(),
                shutdown: shutdown.clone(),
                metrics: metrics.clone(),
                backlog: BacklogSource {
                    store: store.clone(),
                    tables: sqls.clone(),
                },
            };
            Some(beside.spawn(
                "the health endpoint".into(),
                crate::health::serve(listener, Arc::new(probe)),
            ))
        }
        None => None,
    };
    let notifier = beside.spawn(
        "the systemd notifier".into(),
        notify_systemd(beats, shutdown.clone()),
    );
    let mut crash = Crash::default();
    // Until every relay and sweeper has drained (after SIGTERM, or after the first panic).
    // Biased: when a task of ours panicked, its end (which names it) is seen before the hook's
    // word that something panicked.
    loop {
        tokio::select! {
            biased;
            ended = relays.next() => match ended {
                Some((task, outcome)) => crash.check(task, outcome, &shutdown),
                None => break,
            },
            Some((task, outcome)) = beside.next() => crash.check(task, outcome, &shutdown),
            _ = crate::telemetry::panicked(), if !crash.happened() => {
                crash.record("a task the service did not start".into(), &shutdown)
            }
        }
    }
    notifier.abort();
    blocked.abort();
    if let Some(health) = health {
        health.abort();
    }
    for (table, progress) in &retention {
        tracing::debug!(table = %table, rows_deleted = progress.rows_deleted_total(), "retention sweeper stopped");
    }
    // The relays have settled: the memberships hand their partitions back and leave.
    members_stop.cancel();
    while let Some((task, outcome)) = beside.next().await {
        crash.check(task, outcome, &shutdown);
    }
    // Shutdown order: the relays have settled and closed their channels; then the broker
    // connection, the locks and LISTEN (the coordination session), the pool.
    broker.close().await;
    coordination.close().await;
    store.close().await;
    // A panic outside the service's tasks after the relays had drained still ends in a restart.
    if !crash.happened() && crate::telemetry::panics() > 0 {
        crash.record("a task the service did not start".into(), &shutdown);
    }
    match crash.task {
        Some(task) => Err(Crashed { task }.into()),
        None => Ok(()),
    }
}

/// Tasks that `run` started, each with the name a crash report gives it. Invariant: every
/// task's end is looked at (by [`Tasks::next`]); no panic stays in a handle nobody awaits.
#[derive(Default)]
struct Tasks {
    running: FuturesUnordered<BoxFuture<'static, (String, Result<(), JoinError>)>>,
}

impl Tasks {
    /// Spawns `task`; the handle only aborts it (its end comes from [`Tasks::next`]).
    fn spawn(
        &mut self,
        name: String,
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> AbortHandle {
        self.watch(name, tokio::spawn(task))
    }

    /// Watches a task spawned elsewhere (a membership starts its own).
    fn watch(&mut self, name: String, task: JoinHandle<()>) -> AbortHandle {
        let abort = task.abort_handle();
        self.running
            .push(Box::pin(async move { (name, task.await) }));
        abort
    }

    /// The next task to end, with how it ended; None once every task has ended.
    async fn next(&mut self) -> Option<(String, Result<(), JoinError>)> {
        self.running.next().await
    }
}

/// The first panic the service saw, if any: it decides how the process ends.
#[derive(Default)]
struct Crash {
    task: Option<String>,
}

impl Crash {
    fn happened(&self) -> bool {
        self.task.is_some()
    }

    /// Looks at how `task` ended: a panic stops the process; an end of any other kind (the
    /// task finished, or `run` aborted it) is what `run` expects.
    fn check(&mut self, task: String, outcome: Result<(), JoinError>, shutdown: &Shutdown) {
        if outcome.is_err_and(|e| e.is_panic()) {
            self.record(task, shutdown);
        }
    }

    /// The first panic stops the process: logged once here (the panic hook has logged what
    /// panicked and where); later ones only add to the hook's lines.
    fn record(&mut self, task: String, shutdown: &Shutdown) {
        if self.happened() {
            return;
        }
        tracing::error!(
            task = %task,
            exit_code = EX_SOFTWARE,
            "stopping after a panic: the relays drain as at SIGTERM, then the process exits for systemd to restart it"
        );
        shutdown.stop();
        self.task = Some(task);
    }
}

/// READY=1 once every relay has connected; WATCHDOG=1 while every relay loop keeps turning;
/// STOPPING=1 when shutdown begins. Does nothing outside systemd.
async fn notify_systemd(beats: Vec<Arc<Heartbeat>>, shutdown: Shutdown) {
    let mut watchdog_usec = 0u64;
    let watchdog = sd_notify::watchdog_enabled(false, &mut watchdog_usec);
    let watchdog_limit = Duration::from_micros(watchdog_usec);
    let mut ready = false;
    let mut last_status = String::new();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.stopping() => {
                let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
                return;
            }
        }
        let status = beats
            .iter()
            .map(|b| format!("{}: {}", b.table(), b.state()))
            .collect::<Vec<_>>()
            .join("; ");
        if !ready && beats.iter().all(|b| b.is_ready()) {
            ready = true;
            let _ = sd_notify::notify(false, &[NotifyState::Ready]);
        }
        if status != last_status {
            let _ = sd_notify::notify(false, &[NotifyState::Status(&status)]);
            last_status = status;
        }
        // A loop stuck longer than half the watchdog interval stops the feed; systemd then
        // restarts the service.
        if watchdog && beats.iter().all(|b| b.silence() < watchdog_limit / 2) {
            let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
        }
    }
}

/// A member's name in `status`: the host and the process id.
fn member_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown-host".into());
    format!("{host}/{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_that_panics_is_named_and_stops_the_tasks_that_wait_for_shutdown() {
        let shutdown = Shutdown::new();
        let mut tasks = Tasks::default();
        let waiting = shutdown.clone();
        tasks.spawn("a relay".into(), async move { waiting.stopping().await });
        tasks.spawn("a sweeper".into(), async { panic!("a bug") });
        let mut crash = Crash::default();
        // The same loop as `run`'s: it ends only because the panic stopped the other task.
        while let Some((task, outcome)) = tasks.next().await {
            crash.check(task, outcome, &shutdown);
        }
        assert_eq!(crash.task.as_deref(), Some("a sweeper"));
        assert!(shutdown.is_stopping());
    }

    #[tokio::test]
    async fn tasks_that_end_or_are_aborted_are_no_crash() {
        let shutdown = Shutdown::new();
        let mut tasks = Tasks::default();
        tasks.spawn("ends".into(), async {});
        let aborted = tasks.spawn("aborted".into(), std::future::pending());
        aborted.abort();
        let mut crash = Crash::default();
        while let Some((task, outcome)) = tasks.next().await {
            crash.check(task, outcome, &shutdown);
        }
        assert!(!crash.happened());
        assert!(!shutdown.is_stopping());
    }
}
