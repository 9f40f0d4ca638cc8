//! The relay's Prometheus metrics (`GET /metrics` on the health listener): what the relay's
//! parts count as rows go out (published, refused, parked, resent, latencies, state,
//! reconnects, broker blocked time) and the backlog gauges, which are read from the tables
//! when scraped, at most once per [`BACKLOG_MAX_AGE`]. Owns the registry and the encoding;
//! counts nothing by itself and runs no SQL of its own (the store counts the backlog). Labels
//! are bounded: `table` from the config, `reason`, `state` and `server` from fixed sets; never
//! a key or an id.

use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use prometheus_client::encoding::{
    EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

pub use crate::publisher::Refusal;
use crate::relay::RetentionProgress;
use crate::store::{Backlog, Store};

/// How old the backlog gauges may be when a scrape comes: older, the scrape reads them anew
/// first (one statement per [`crate::store::BACKLOG_CHUNK`] tables).
pub const BACKLOG_MAX_AGE: Duration = Duration::from_secs(10);

/// How long a scrape waits for the backlog to be read before it answers with the last values.
const BACKLOG_WAIT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TableLabels {
    table: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    table: String,
    reason: Refusal,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ParkedLabels {
    table: String,
    reason: ParkReason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    table: String,
    state: State,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServerLabels {
    server: Server,
}

/// Why a row was parked.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ParkReason {
    /// The broker refused it `retry.max_attempts` times.
    AttemptsExhausted,
    /// It can never be sent as it stands (too large, bad headers, a bad exchange name).
    Unpublishable,
}

/// A table relay's state, as the health endpoint says it in words.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum State {
    Starting,
    Relaying,
    Standby,
    Blocked,
    DatabaseDown,
    TableUnusable,
    NotPrimary,
    BrokerDown,
    Misdeclared,
}

impl State {
    const ALL: [State; 9] = [
        State::Starting,
        State::Relaying,
        State::Standby,
        State::Blocked,
        State::DatabaseDown,
        State::TableUnusable,
        State::NotPrimary,
        State::BrokerDown,
        State::Misdeclared,
    ];
}

/// The server a connection goes to.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Server {
    Postgres,
    Rabbitmq,
}

macro_rules! label_values {
    ($($type:ty { $($variant:ident => $text:literal),* $(,)? })*) => {$(
        impl $type {
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),* }
            }
        }
        impl EncodeLabelValue for $type {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                encoder.write_str(self.as_str())
            }
        }
    )*};
}

label_values! {
    Refusal { Nack => "nack", Unroutable => "unroutable", NoExchange => "no_exchange" }
    ParkReason { AttemptsExhausted => "attempts_exhausted", Unpublishable => "unpublishable" }
    State {
        Starting => "starting",
        Relaying => "relaying",
        Standby => "standby",
        Blocked => "blocked",
        DatabaseDown => "database_down",
        TableUnusable => "table_unusable",
        NotPrimary => "not_primary",
        BrokerDown => "broker_down",
        Misdeclared => "misdeclared",
    }
    Server { Postgres => "postgres", Rabbitmq => "rabbitmq" }
}

type HistogramFamily = Family<TableLabels, Histogram, fn() -> Histogram>;
type F64Gauge = Gauge<f64, AtomicU64>;

/// Every metric the relay exports: its own under the `outbox_relay_` prefix, and the standard
/// `process_*` ones ([`ProcessCollector`]).
pub struct Metrics {
    registry: Registry,
    published: Family<TableLabels, Counter>,
    refused: Family<RefusedLabels, Counter>,
    parked: Family<ParkedLabels, Counter>,
    resent: Family<TableLabels, Counter>,
    confirm_seconds: HistogramFamily,
    commit_to_confirm_seconds: HistogramFamily,
    state: Family<StateLabels, Gauge>,
    ready: Family<TableLabels, Gauge>,
    pending_rows: Family<TableLabels, Gauge>,
    due_rows: Family<TableLabels, Gauge>,
    held_rows: Family<TableLabels, Gauge>,
    parked_rows: Family<TableLabels, Gauge>,
    discarded_rows: Family<TableLabels, Gauge>,
    oldest_pending_age: Family<TableLabels, F64Gauge>,
    backlog_read_at: F64Gauge,
    backlog_read_errors: Counter,
    reconnects: Family<ServerLabels, Counter>,
    broker_blocked_seconds: Counter<f64, AtomicU64>,
    retention_deleted: Family<TableLabels, Counter>,
    retention_last_sweep: Family<TableLabels, F64Gauge>,
    oldest_published_age: Family<TableLabels, F64Gauge>,
    rows_in_memory: Gauge,
    log_lines_dropped: Counter,
    /// How many of telemetry's dropped lines `log_lines_dropped` has counted so far.
    log_lines_dropped_seen: AtomicU64,
    spans_dropped: Counter,
    /// How many of the span exporter's dropped spans `spans_dropped` has counted so far.
    spans_dropped_seen: AtomicU64,
    /// The sweepers' progress, copied into the three metrics above at each scrape.
    sweepers: std::sync::Mutex<Vec<(TableLabels, Arc<RetentionProgress>)>>,
    /// When the backlog gauges were last read (`None`: never), held while one scrape reads them.
    backlog_read: tokio::sync::Mutex<Option<Instant>>,
}

/// Confirm latency: 0.5 ms to ~33 s.
fn confirm_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 17))
}

/// Commit to confirm: 1 ms to ~4.7 h (a key held for hours shows up here).
fn commit_to_confirm_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 3.0, 17))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut root = Registry::default();
        root.register_collector(Box::new(ProcessCollector));
        let registry = root.sub_registry_with_prefix("outbox_relay");
        let m = Metrics {
            published: Family::default(),
            refused: Family::default(),
            parked: Family::default(),
            resent: Family::default(),
            confirm_seconds: Family::new_with_constructor(confirm_histogram),
            commit_to_confirm_seconds: Family::new_with_constructor(commit_to_confirm_histogram),
            state: Family::default(),
            ready: Family::default(),
            pending_rows: Family::default(),
            due_rows: Family::default(),
            held_rows: Family::default(),
            parked_rows: Family::default(),
            discarded_rows: Family::default(),
            oldest_pending_age: Family::default(),
            backlog_read_at: Gauge::default(),
            backlog_read_errors: Counter::default(),
            reconnects: Family::default(),
            broker_blocked_seconds: Counter::default(),
            retention_deleted: Family::default(),
            retention_last_sweep: Family::default(),
            oldest_published_age: Family::default(),
            rows_in_memory: Gauge::default(),
            log_lines_dropped: Counter::default(),
            log_lines_dropped_seen: AtomicU64::new(0),
            spans_dropped: Counter::default(),
            spans_dropped_seen: AtomicU64::new(0),
            sweepers: std::sync::Mutex::new(Vec::new()),
            backlog_read: tokio::sync::Mutex::new(None),
            registry: Registry::default(),
        };
        registry.register(
            "build",
            "The relay's version (value 1)",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        registry.register(
            "published",
            "Messages the broker confirmed (their rows are then marked published)",
            m.published.clone(),
        );
        registry.register(
            "refused",
            "Publishes the broker refused (nack, unroutable, no such exchange); the row is retried with backoff",
            m.refused.clone(),
        );
        registry.register(
            "parked",
            "Rows parked: refused retry.max_attempts times, or unpublishable as they stand",
            m.parked.clone(),
        );
        registry.register(
            "resent",
            "Publishes whose outcome was lost with their channel, connection or lock: the rows stay due and go out again with the same message_id (possible duplicates)",
            m.resent.clone(),
        );
        registry.register_with_unit(
            "confirm_latency",
            "From the publish to the broker's confirm",
            Unit::Seconds,
            m.confirm_seconds.clone(),
        );
        registry.register_with_unit(
            "commit_to_confirm",
            "From the row's created_at (its transaction's start, on the database's clock) to the broker's confirm",
            Unit::Seconds,
            m.commit_to_confirm_seconds.clone(),
        );
        registry.register(
            "table_state",
            "1 for the table relay's current state, 0 for the others",
            m.state.clone(),
        );
        registry.register(
            "ready",
            "1 while the table's relay is relaying or standing by, as GET /ready counts it",
            m.ready.clone(),
        );
        registry.register(
            "pending_rows",
            "Rows neither published nor parked (counted up to 1,000,000)",
            m.pending_rows.clone(),
        );
        registry.register(
            "due_rows",
            "Pending rows due now, neither waiting for a retry delay nor held behind their key (counted up to 1,000,000)",
            m.due_rows.clone(),
        );
        registry.register(
            "held_rows",
            "Pending rows held behind a failed row of their key (counted up to 1,000,000)",
            m.held_rows.clone(),
        );
        registry.register(
            "parked_rows",
            "Parked rows, waiting for `outbox-relay retry` (counted up to 1,000,000)",
            m.parked_rows.clone(),
        );
        registry.register(
            "discarded_rows",
            "Parked rows ended for good by `outbox-relay discard` (recorded in outbox_relay.discarded until an operator deletes the record)",
            m.discarded_rows.clone(),
        );
        registry.register_with_unit(
            "oldest_pending_age",
            "Age of the oldest pending row (0 when none)",
            Unit::Seconds,
            m.oldest_pending_age.clone(),
        );
        registry.register_with_unit(
            "backlog_read_timestamp",
            "When the row gauges were last read from the tables (Unix time)",
            Unit::Seconds,
            m.backlog_read_at.clone(),
        );
        registry.register(
            "backlog_read_errors",
            "Times reading the row gauges failed (they keep their last values)",
            m.backlog_read_errors.clone(),
        );
        registry.register(
            "rows_in_memory",
            "Rows the process holds in memory (fetched and not yet settled), all tables together: at most relay.max_rows_in_memory",
            m.rows_in_memory.clone(),
        );
        registry.register(
            "log_lines_dropped",
            "Log lines dropped: stderr refused them (its reader gone) or the log queue was full (its reader not reading); the relay goes on",
            m.log_lines_dropped.clone(),
        );
        registry.register(
            "spans_dropped",
            "The relay's spans dropped instead of exported over OTLP: the export queue was full (the collector slow or down) or the collector did not take them; delivery goes on (0 while telemetry.otlp_endpoint is unset)",
            m.spans_dropped.clone(),
        );
        registry.register(
            "reconnects",
            "Connections opened again after one was lost (PostgreSQL: the coordination session; RabbitMQ: the broker connection)",
            m.reconnects.clone(),
        );
        registry.register_with_unit(
            "broker_blocked",
            "Time the broker blocked the connection (a resource alarm), sampled every second",
            Unit::Seconds,
            m.broker_blocked_seconds.clone(),
        );
        registry.register(
            "retention_deleted_rows",
            "Published rows the retention sweeper deleted (tables with `retention`)",
            m.retention_deleted.clone(),
        );
        registry.register_with_unit(
            "retention_last_sweep_timestamp",
            "When the retention sweeper last finished a sweep (Unix time; 0 before the first)",
            Unit::Seconds,
            m.retention_last_sweep.clone(),
        );
        registry.register_with_unit(
            "oldest_published_age",
            "Age of the oldest published row still in the table, at the last sweep: near the retention while the sweeper keeps up",
            Unit::Seconds,
            m.oldest_published_age.clone(),
        );
        for server in [Server::Postgres, Server::Rabbitmq] {
            let _ = m.reconnects.get_or_create(&ServerLabels { server });
        }
        Metrics {
            registry: root,
            ..m
        }
    }

    /// The handles one table's relay counts into; its series exist from now on (at zero).
    pub fn table(&self, table: &str) -> TableMetrics {
        let labels = TableLabels {
            table: table.to_owned(),
        };
        let refused = [Refusal::Nack, Refusal::Unroutable, Refusal::NoExchange].map(|reason| {
            self.refused
                .get_or_create(&RefusedLabels {
                    table: table.to_owned(),
                    reason,
                })
                .clone()
        });
        let parked = [ParkReason::AttemptsExhausted, ParkReason::Unpublishable].map(|reason| {
            self.parked
                .get_or_create(&ParkedLabels {
                    table: table.to_owned(),
                    reason,
                })
                .clone()
        });
        let states = State::ALL.map(|state| {
            self.state
                .get_or_create(&StateLabels {
                    table: table.to_owned(),
                    state,
                })
                .clone()
        });
        for gauges in [
            &self.pending_rows,
            &self.due_rows,
            &self.held_rows,
            &self.parked_rows,
            &self.discarded_rows,
        ] {
            let _ = gauges.get_or_create(&labels);
        }
        let _ = self.oldest_pending_age.get_or_create(&labels);
        let metrics = TableMetrics {
            published: self.published.get_or_create(&labels).clone(),
            refused,
            parked,
            resent: self.resent.get_or_create(&labels).clone(),
            confirm: self.confirm_seconds.get_or_create(&labels).clone(),
            commit_to_confirm: self
                .commit_to_confirm_seconds
                .get_or_create(&labels)
                .clone(),
            states,
            ready: self.ready.get_or_create(&labels).clone(),
        };
        metrics.set_state(State::Starting, false);
        metrics
    }

    /// Exports the retention sweeper's `progress` for `table`.
    pub fn add_sweeper(&self, table: &str, progress: Arc<RetentionProgress>) {
        let labels = TableLabels {
            table: table.to_owned(),
        };
        let _ = self.retention_deleted.get_or_create(&labels);
        let _ = self.retention_last_sweep.get_or_create(&labels);
        let _ = self.oldest_published_age.get_or_create(&labels);
        if let Ok(mut sweepers) = self.sweepers.lock() {
            sweepers.push((labels, progress));
        }
    }

    /// The counter catches up with telemetry's count, which only grows; `fetch_max` makes two
    /// scrapes at once add each dropped line once.
    fn read_dropped_log_lines(&self) {
        let dropped = crate::telemetry::dropped_lines();
        let counted = self
            .log_lines_dropped_seen
            .fetch_max(dropped, std::sync::atomic::Ordering::Relaxed);
        self.log_lines_dropped
            .inc_by(dropped.saturating_sub(counted));
    }

    /// The counter catches up with the span exporter's count, as [`Self::read_dropped_log_lines`].
    fn read_dropped_spans(&self) {
        let dropped = crate::telemetry::otlp::dropped_spans();
        let counted = self
            .spans_dropped_seen
            .fetch_max(dropped, std::sync::atomic::Ordering::Relaxed);
        self.spans_dropped.inc_by(dropped.saturating_sub(counted));
    }

    /// Copies the sweepers' progress into their metrics.
    fn read_sweepers(&self) {
        let Ok(sweepers) = self.sweepers.lock() else {
            return;
        };
        for (labels, progress) in sweepers.iter() {
            let deleted = self.retention_deleted.get_or_create(labels);
            // The sweeper's count only grows; the counter catches up with it (under the lock,
            // so two scrapes never add the same rows twice).
            deleted.inc_by(progress.rows_deleted_total().saturating_sub(deleted.get()));
            self.retention_last_sweep
                .get_or_create(labels)
                .set(progress.last_sweep_unix().unwrap_or(0) as f64);
            self.oldest_published_age.get_or_create(labels).set(
                progress
                    .oldest_published_age()
                    .map_or(0.0, |d| d.as_secs_f64()),
            );
        }
    }

    /// Counts reconnects to `server`.
    /// The gauge of rows held in memory, all tables together (the process's row budget sets it).
    pub fn rows_in_memory(&self) -> Gauge {
        self.rows_in_memory.clone()
    }

    pub fn reconnects(&self, server: Server) -> Counter {
        self.reconnects
            .get_or_create(&ServerLabels { server })
            .clone()
    }

    /// Counts the broker's blocked time.
    pub fn broker_blocked(&self) -> Counter<f64, AtomicU64> {
        self.broker_blocked_seconds.clone()
    }

    /// The metrics in Prometheus' text format (0.0.4), or OpenMetrics' with `openmetrics`,
    /// after reading the backlog gauges anew when they are older than [`BACKLOG_MAX_AGE`].
    pub async fn scrape(&self, backlog: &BacklogSource, openmetrics: bool) -> String {
        self.refresh_backlog(backlog).await;
        self.read_sweepers();
        self.read_dropped_log_lines();
        self.read_dropped_spans();
        let mut text = String::new();
        let encoded = if openmetrics {
            prometheus_client::encoding::text::encode(&mut text, &self.registry)
        } else {
            prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)
        };
        if let Err(e) = encoded {
            tracing::warn!(error = %e, "cannot encode the metrics");
        }
        text
    }

    /// Reads the row gauges when they are stale; one scrape reads, scrapes that come meanwhile
    /// wait for it. A failure keeps the last values and is counted (and logged at debug: the
    /// relay's own state already says when PostgreSQL is down).
    async fn refresh_backlog(&self, source: &BacklogSource) {
        let Ok(mut read) = tokio::time::timeout(BACKLOG_WAIT, self.backlog_read.lock()).await
        else {
            return;
        };
        if read.is_some_and(|at| at.elapsed() < BACKLOG_MAX_AGE) {
            return;
        }
        let answer = tokio::time::timeout(BACKLOG_WAIT, source.store.backlog(&source.tables)).await;
        // Stale or not, the next scrape within BACKLOG_MAX_AGE does not try again: a database
        // that is down is not asked once per scrape.
        *read = Some(Instant::now());
        let backlog = match answer {
            Ok(Ok(backlog)) => backlog,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "cannot read the backlog for the metrics");
                self.backlog_read_errors.inc();
                return;
            }
            Err(_) => {
                tracing::debug!("reading the backlog for the metrics timed out");
                self.backlog_read_errors.inc();
                return;
            }
        };
        for b in backlog {
            self.set_backlog(&b);
        }
        // Discarded rows, from the relay's small record of them (one statement for all tables).
        let names: Vec<_> = source.tables.iter().map(|t| t.table().clone()).collect();
        match tokio::time::timeout(BACKLOG_WAIT, source.store.discarded_counts(&names)).await {
            Ok(Ok(counts)) => {
                for (name, count) in names.iter().zip(counts) {
                    let labels = TableLabels {
                        table: name.to_string(),
                    };
                    self.discarded_rows.get_or_create(&labels).set(count);
                }
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %format!("{e:#}"), "cannot read the discarded rows for the metrics");
                self.backlog_read_errors.inc();
            }
            Err(_) => {
                tracing::debug!("reading the discarded rows for the metrics timed out");
                self.backlog_read_errors.inc();
            }
        }
        self.backlog_read_at
            .set(Utc::now().timestamp_millis() as f64 / 1000.0);
    }

    fn set_backlog(&self, b: &Backlog) {
        let labels = TableLabels {
            table: b.table.to_string(),
        };
        self.pending_rows.get_or_create(&labels).set(b.pending);
        self.due_rows.get_or_create(&labels).set(b.due);
        self.held_rows.get_or_create(&labels).set(b.held);
        self.parked_rows.get_or_create(&labels).set(b.parked);
        self.oldest_pending_age
            .get_or_create(&labels)
            .set(b.oldest_pending.map_or(0.0, |d| d.as_secs_f64()));
    }
}

/// Where the backlog gauges come from: the configured tables, read through the store.
pub struct BacklogSource {
    pub store: Store,
    /// The statements of every table (their column names, for an adopted table).
    pub tables: Vec<crate::store::TableSql>,
}

/// One table's handles into [`Metrics`]. Cheap to clone (they share the counters).
#[derive(Clone)]
pub struct TableMetrics {
    published: Counter,
    refused: [Counter; 3],
    parked: [Counter; 2],
    resent: Counter,
    confirm: Histogram,
    commit_to_confirm: Histogram,
    states: [Gauge; 9],
    ready: Gauge,
}

impl TableMetrics {
    /// Handles that count into no registry: for a relay built outside the daemon (a test, the
    /// benchmark's in-process relay).
    pub fn unregistered() -> Self {
        Metrics::new().table("")
    }

    /// The broker confirmed a message published at `sent` for a row created at `created_at`.
    pub fn confirmed(&self, sent: Instant, created_at: DateTime<Utc>) {
        self.published.inc();
        self.confirm.observe(sent.elapsed().as_secs_f64());
        let since_commit = (Utc::now() - created_at)
            .num_microseconds()
            .unwrap_or(i64::MAX);
        self.commit_to_confirm
            .observe(since_commit.max(0) as f64 / 1_000_000.0);
    }

    pub fn refused(&self, reason: Refusal) {
        self.refused[reason as usize].inc();
    }

    pub fn parked(&self, reason: ParkReason) {
        self.parked[reason as usize].inc();
    }

    /// `n` publishes were unconfirmed when their channel, connection or lock went.
    pub fn resent(&self, n: usize) {
        self.resent.inc_by(n as u64);
    }

    pub fn set_state(&self, state: State, ready: bool) {
        for (s, gauge) in State::ALL.iter().zip(&self.states) {
            gauge.set((*s == state) as i64);
        }
        self.ready.set(ready as i64);
    }
}

/// Adds the broker's blocked time to `blocked` once a second while `is_blocked` says so, until
/// the task is aborted.
pub async fn sample_blocked(
    blocked: Counter<f64, AtomicU64>,
    is_blocked: impl Fn() -> bool + Send + 'static,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        if is_blocked() {
            blocked.inc_by(1.0);
        }
    }
}

/// The standard process metrics every Prometheus exporter has (the names and meanings of the
/// Prometheus Go client's process collector): CPU seconds, resident and virtual memory, open and
/// maximum file descriptors, threads, start time. Read from /proc at each scrape (a few
/// microseconds); a value /proc does not give (another OS, a restricted /proc) is left out,
/// not reported as zero.
#[derive(Debug)]
struct ProcessCollector;

impl prometheus_client::collector::Collector for ProcessCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        let Ok(me) = procfs::process::Process::myself() else {
            return Ok(());
        };
        let e = &mut encoder;
        if let Ok(stat) = me.stat() {
            let ticks = procfs::ticks_per_second() as f64;
            let rss = (stat.rss * procfs::page_size()) as f64;
            process_gauge(
                e,
                "process_resident_memory",
                "Resident memory size",
                Some(Unit::Bytes),
                rss,
            )?;
            let vsize = stat.vsize as f64;
            process_gauge(
                e,
                "process_virtual_memory",
                "Virtual memory size",
                Some(Unit::Bytes),
                vsize,
            )?;
            let threads = stat.num_threads as f64;
            process_gauge(
                e,
                "process_threads",
                "Number of OS threads in the process",
                None,
                threads,
            )?;
            if let Ok(boot) = procfs::boot_time_secs() {
                let start = boot as f64 + stat.starttime as f64 / ticks;
                let help = "Start time of the process since the Unix epoch";
                process_gauge(e, "process_start_time", help, Some(Unit::Seconds), start)?;
            }
            let cpu = ConstCounter::new((stat.utime + stat.stime) as f64 / ticks);
            let help = "Total user and system CPU time spent";
            let metric =
                e.encode_descriptor("process_cpu", help, Some(&Unit::Seconds), cpu.metric_type())?;
            cpu.encode(metric)?;
        }
        if let Ok(open) = me.fd_count() {
            process_gauge(
                e,
                "process_open_fds",
                "Number of open file descriptors",
                None,
                open as f64,
            )?;
        }
        if let Ok(limits) = me.limits() {
            if let procfs::process::LimitValue::Value(max) = limits.max_open_files.soft_limit {
                let help = "Maximum number of open file descriptors";
                process_gauge(e, "process_max_fds", help, None, max as f64)?;
            }
        }
        Ok(())
    }
}

fn process_gauge(
    encoder: &mut prometheus_client::encoding::DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    value: f64,
) -> Result<(), std::fmt::Error> {
    let gauge = ConstGauge::new(value);
    let metric = encoder.encode_descriptor(name, help, unit.as_ref(), gauge.metric_type())?;
    gauge.encode(metric)
}
