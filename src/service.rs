//! The daemon: one relay task per configured table over one coordination session and one
//! broker connection shared by all of them, a retention sweeper per table with `retention`,
//! the optional health endpoint, systemd
//! readiness (READY once every table is relaying or standing by; STATUS= names any table that
//! is not ready and why), the watchdog fed from the relay loops, STOPPING at shutdown.

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;

use crate::cluster::member::{self, MemberSettings};
use crate::config::Settings;
use crate::metrics::{BacklogSource, Metrics, Server};
use crate::publisher::Broker;
use crate::relay::{Acks, Heartbeat, Share, Sweeper, TableRelay};
use crate::shutdown::Shutdown;
use crate::store::leases::Leases;
use crate::store::{Coordination, Store, TableSql};

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
    let blocked = {
        let broker = broker.clone();
        tokio::spawn(crate::metrics::sample_blocked(
            metrics.broker_blocked(),
            move || broker.is_blocked(),
        ))
    };
    let mut tasks = Vec::new();
    let mut beats = Vec::new();
    // One retention sweeper per table with `retention`; their progress is for the metrics.
    let mut sweepers = Vec::new();
    let mut retention = Vec::new();
    // One membership per table (its partition leases), and one relay per table and channel.
    let members_stop = tokio_util::sync::CancellationToken::new();
    let mut members = Vec::new();
    let channels = settings.relay.channels;
    for (index, (table, sql)) in settings.outbox.iter().zip(&sqls).enumerate() {
        let lock = coordination.lock(index);
        let membership = member::start_in(
            Leases::on_store(store.clone(), table.table.clone(), settings.lease()),
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
            sweepers.push(tokio::spawn(sweeper.run()));
        }
        let acks = Acks::new(channels, membership.settled);
        members.push(membership.task);
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
                    table.partitions,
                ),
                broker.clone(),
                shutdown.clone(),
                metrics.clone(),
            );
            beats.push(relay.heartbeat());
            tasks.push(tokio::spawn(relay.run()));
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
            Some(tokio::spawn(crate::health::serve(
                listener,
                Arc::new(probe),
            )))
        }
        None => None,
    };
    let notifier = tokio::spawn(notify_systemd(beats, shutdown.clone()));
    let mut crashed = 0;
    for task in tasks {
        if let Err(e) = task.await {
            // Exit non-zero so systemd's Restart=on-failure brings the relay back.
            tracing::error!(error = %e, "a relay task crashed");
            shutdown.stop();
            crashed += 1;
        }
    }
    notifier.abort();
    blocked.abort();
    if let Some(health) = health {
        health.abort();
    }
    // A sweep stops between batches; each batch is bounded by its statement timeout.
    for sweeper in sweepers {
        let _ = sweeper.await;
    }
    for (table, progress) in &retention {
        tracing::debug!(table = %table, rows_deleted = progress.rows_deleted_total(), "retention sweeper stopped");
    }
    // The relays have settled: the memberships hand their partitions back and leave.
    members_stop.cancel();
    for membership in members {
        let _ = membership.await;
    }
    // Shutdown order: the relays have settled and closed their channels; then the broker
    // connection, the locks and LISTEN (the coordination session), the pool.
    broker.close().await;
    coordination.close().await;
    store.close().await;
    if crashed > 0 {
        anyhow::bail!("{crashed} relay task(s) crashed");
    }
    Ok(())
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
