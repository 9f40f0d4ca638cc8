//! The figures: medians and ratios, the human table (with the targets beside them,
//! for information only) and the JSON object.

mod producers;

use serde_json::{json, Value};

pub use self::producers::{
    CommitTimes, ProducerCount, ProducerRun, Producers, RelayKeptUp, Situation, SituationRuns,
};
use crate::env::Machine;
use crate::process::{CpuSplit, LeaseTimings, LogProblems, Usage};
use crate::Plan;

/// One timed run of the relay or of its baseline.
#[derive(Debug, Clone)]
pub struct Run {
    pub events_per_s: f64,
    pub seconds: f64,
    /// From start until the consumer received the first message.
    pub startup_ms: Option<f64>,
    /// The relay process's CPU and peak RSS (relay runs only).
    pub usage: Option<Usage>,
    pub duplicates: u64,
    /// Fraction of the machine's CPUs busy during the run (every process, not only ours).
    pub host_cpu_busy: Option<f64>,
    /// Where the machine's CPU went during the run.
    pub cpu_split: Option<CpuSplit>,
}

/// Relay runs and baseline runs of one scenario.
#[derive(Debug, Clone)]
pub struct Comparison {
    pub rows: u64,
    pub keys: u64,
    pub raw_window: usize,
    pub relay: Vec<Run>,
    pub raw: Vec<Run>,
}

#[derive(Debug, Clone)]
pub struct Latency {
    pub offered_rate: u32,
    pub producers: u32,
    pub seconds: u64,
    pub events: u64,
    pub committed_rate: f64,
    pub producer_most_late_ms: f64,
    /// Commit acknowledged to the producer -> received by the consumer, sorted.
    pub micros: Vec<u64>,
    /// The same from just before the INSERT was sent (an upper bound: includes insert and commit).
    pub from_insert_micros: Vec<u64>,
    /// Messages the consumer had before the producer saw its commit acknowledged (their
    /// latency counts as 0: the producer task woke late).
    pub received_before_commit_ack: u64,
    pub duplicates: u64,
    pub usage: Usage,
}

#[derive(Debug, Clone)]
pub struct Idle {
    pub seconds: f64,
    pub cpu_s: f64,
    pub statements: u64,
    pub statements_per_s: f64,
    pub statements_per_poll_interval: f64,
    pub round_trips_per_s: f64,
    pub database_transactions_per_s: f64,
    pub poll_interval_s: f64,
    pub usage: Usage,
    /// The same relay, still idle, while `GET /metrics` is scraped (the idle scenario only).
    pub scraped: Option<Scraped>,
}

/// Idle statements while a Prometheus-like scraper reads `/metrics` every `every_s`.
#[derive(Debug, Clone)]
pub struct Scraped {
    pub every_s: f64,
    pub scrapes: u64,
    pub seconds: f64,
    pub statements_per_s: f64,
}

impl Scraped {
    /// What the metrics promise: one backlog statement (one table here) for the first scrape,
    /// then at most one per 10 s, over the idle statements.
    pub fn within_promise(&self, idle_statements_per_s: f64) -> bool {
        let reads = (self.seconds / 10.0).ceil().max(1.0);
        self.statements_per_s <= idle_statements_per_s + (reads + 0.5) / self.seconds
    }
}

#[derive(Debug, Clone)]
pub struct History {
    pub history_rows: u64,
    pub rows: u64,
    /// Seconds to insert the history, and to vacuum and analyze it once.
    pub seed_s: f64,
    pub vacuum_s: f64,
    /// The history table with its indexes and TOAST, before the first round.
    pub history_bytes: i64,
    pub empty: Vec<Run>,
    pub history: Vec<Run>,
}

/// The drain with confirmed rows deleted against the drain with them marked.
#[derive(Debug, Clone)]
pub struct DeleteMode {
    pub rows: u64,
    pub mark: Vec<Run>,
    pub delete: Vec<Run>,
}

impl DeleteMode {
    fn events_per_s(runs: &[Run]) -> f64 {
        median(runs.iter().map(|r| r.events_per_s))
    }
    fn ratio(&self) -> f64 {
        ratio(
            Self::events_per_s(&self.delete),
            Self::events_per_s(&self.mark),
        )
    }
    /// Median PostgreSQL CPU microseconds per event.
    fn postgresql_us(&self, runs: &[Run]) -> f64 {
        postgresql_us_per_event(runs, self.rows)
    }
    fn json(&self) -> Value {
        json!({
            "ratio": round(self.ratio(), 3),
            "delete_events_per_s": round(Self::events_per_s(&self.delete), 1),
            "mark_events_per_s": round(Self::events_per_s(&self.mark), 1),
            "delete_postgresql_cpu_us_per_event": round(self.postgresql_us(&self.delete), 1),
            "mark_postgresql_cpu_us_per_event": round(self.postgresql_us(&self.mark), 1),
            "rows": self.rows,
            "delete_runs": runs_json(&self.delete),
            "mark_runs": runs_json(&self.mark),
        })
    }
    fn table(&self) -> String {
        let mut s = format!(
            "{:<11} {:<44} {:>10.0} {:>10.0} {:>6.2}\n",
            "delete-mode",
            format!("events/s, {} rows, delete (vs mark)", self.rows),
            Self::events_per_s(&self.delete),
            Self::events_per_s(&self.mark),
            self.ratio()
        );
        s += &format!(
            "{:<11} {:<44} {:>10.1} {:>10.1}\n",
            "",
            "  PostgreSQL CPU us/event",
            self.postgresql_us(&self.delete),
            self.postgresql_us(&self.mark)
        );
        s
    }
}

/// The drain with the relay exporting its spans over OTLP against the drain without.
#[derive(Debug, Clone)]
pub struct Tracing {
    pub rows: u64,
    pub off: Vec<Run>,
    pub on: Vec<Run>,
    /// Export on, to a collector that is down (nothing listens on its port).
    pub down: Vec<Run>,
    /// Spans the bench's collector received over all the `on` rounds.
    pub spans: u64,
}

impl Tracing {
    /// Export on must keep at least this much of the drain without it.
    const TARGET: f64 = 0.9;

    fn events_per_s(runs: &[Run]) -> f64 {
        median(runs.iter().map(|r| r.events_per_s))
    }
    fn ratio(&self) -> f64 {
        ratio(Self::events_per_s(&self.on), Self::events_per_s(&self.off))
    }
    fn down_ratio(&self) -> f64 {
        ratio(
            Self::events_per_s(&self.down),
            Self::events_per_s(&self.off),
        )
    }
    fn json(&self) -> Value {
        json!({
            "ratio": round(self.ratio(), 3),
            "down_ratio": round(self.down_ratio(), 3),
            "down_events_per_s": round(Self::events_per_s(&self.down), 1),
            "down_runs": runs_json(&self.down),
            "target": Self::TARGET,
            "on_events_per_s": round(Self::events_per_s(&self.on), 1),
            "off_events_per_s": round(Self::events_per_s(&self.off), 1),
            "rows": self.rows,
            "spans_received": self.spans,
            "rows_exported": self.rows * self.on.len() as u64,
            "on_runs": runs_json(&self.on),
            "off_runs": runs_json(&self.off),
        })
    }
    fn table(&self, verdict: &dyn Fn(bool) -> &'static str) -> String {
        let mut s = format!(
            "{:<11} {:<44} {:>10.0} {:>10.0} {:>6.2}   >= {:.2} {}\n",
            "tracing",
            format!("events/s, {} rows, OTLP export on (vs off)", self.rows),
            Self::events_per_s(&self.on),
            Self::events_per_s(&self.off),
            self.ratio(),
            Self::TARGET,
            verdict(self.ratio() >= Self::TARGET)
        );
        s += &format!(
            "{:<11} {:<44} {:>10.0} {:>10.0} {:>6.2}   >= {:.2} {}\n",
            "",
            "  export on, the collector down (vs off)",
            Self::events_per_s(&self.down),
            Self::events_per_s(&self.off),
            self.down_ratio(),
            Self::TARGET,
            verdict(self.down_ratio() >= Self::TARGET)
        );
        s += &format!(
            "{:<11} {:<44} {:>10}\n",
            "",
            format!(
                "  spans received (of {} rows published)",
                self.rows * self.on.len() as u64
            ),
            self.spans
        );
        s
    }
}

#[derive(Debug, Clone)]
pub struct PgOnly {
    pub rows: u64,
    pub batch_size: u32,
    pub runs: Vec<PgOnlyRun>,
}

#[derive(Debug, Clone)]
pub struct PgOnlyRun {
    pub rows_per_s: f64,
    pub seconds: f64,
    pub fetch_s: f64,
    pub mark_s: f64,
}

/// A drain that did not finish within its bound: how far it got.
#[derive(Debug, Clone)]
pub struct Shortfall {
    /// Distinct messages of the round the consumer received.
    pub received: u64,
    pub expected: u64,
    pub seconds: f64,
    /// Why it ended early, if not the bound (the relay exited), and trouble stopping it.
    pub note: Option<String>,
}

impl std::fmt::Display for Shortfall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "not delivered: {} of {} in {:.0} s",
            self.received, self.expected, self.seconds
        )?;
        if let Some(note) = &self.note {
            write!(f, " ({note})")?;
        }
        Ok(())
    }
}

/// A timed relay drain with a bound: finished, or not.
#[derive(Debug, Clone)]
pub enum Drained {
    Done(Run),
    NotDelivered(Shortfall),
}

impl Drained {
    pub fn run(&self) -> Option<&Run> {
        match self {
            Drained::Done(run) => Some(run),
            Drained::NotDelivered(_) => None,
        }
    }
}

/// The first shortfall of some drains, if any.
fn shortfall(drains: &[Drained]) -> Option<&Shortfall> {
    drains.iter().find_map(|d| match d {
        Drained::NotDelivered(s) => Some(s),
        Drained::Done(_) => None,
    })
}

/// Median events/s of drains that all finished; `None` when one did not.
fn drained_events_per_s(drains: &[Drained]) -> Option<f64> {
    let runs: Option<Vec<&Run>> = drains.iter().map(Drained::run).collect();
    runs.filter(|r| !r.is_empty())
        .map(|r| median(r.iter().map(|r| r.events_per_s)))
}

fn drained_json(drains: &[Drained]) -> Value {
    Value::Array(
        drains
            .iter()
            .map(|d| match d {
                Drained::Done(run) => runs_json(std::slice::from_ref(run))[0].clone(),
                Drained::NotDelivered(s) => json!({
                    "not_delivered": s.to_string(),
                    "received": s.received,
                    "expected": s.expected,
                    "seconds": round(s.seconds, 1),
                }),
            })
            .collect(),
    )
}

fn log_json(log: &LogProblems) -> Value {
    json!({"warnings": log.warnings, "errors": log.errors, "first": log.first})
}

/// Many outbox tables in one relay process: what it holds on the servers, what it asks of
/// PostgreSQL when idle, and its drain against the same drain on one table.
#[derive(Debug, Clone)]
pub struct ManyTables {
    pub tables: u32,
    pub rows: u64,
    pub max_connections: u32,
    pub migrate_s: f64,
    /// One row per table before the idle count, if it did not all arrive.
    pub warm_up: Option<Shortfall>,
    pub idle: Idle,
    /// The relay's PostgreSQL sessions: most seen with many tables (idle and drains), and in
    /// the one-table drains.
    pub sessions_max: i64,
    pub one_table_sessions_max: i64,
    /// The relay's AMQP connections, most seen with many tables (idle and after each drain).
    pub amqp_connections_max: Option<usize>,
    pub one_table: Vec<Drained>,
    pub many: Vec<Drained>,
    pub log: LogProblems,
}

impl ManyTables {
    fn ratio(&self) -> Option<f64> {
        Some(ratio(
            drained_events_per_s(&self.many)?,
            drained_events_per_s(&self.one_table)?,
        ))
    }
}

/// A drain of other keys beside one key held back at the head of a long queue, parked or
/// waiting for a retry delay, against the same drain without it.
#[derive(Debug, Clone)]
pub struct HeldKey {
    pub queued_rows: u64,
    pub rows: u64,
    pub keys: u64,
    /// The schema has held keys (`outbox_relay.held_keys`): the queued rows started out held.
    pub held_schema: bool,
    /// Queued rows flagged held right after the queue was inserted (held schema only).
    pub queued_held: Vec<i64>,
    /// Seconds to insert each queue.
    pub queue_insert_s: Vec<f64>,
    pub without: Vec<Drained>,
    pub parked: Vec<Drained>,
    pub retrying: Vec<Drained>,
    pub log: LogProblems,
}

impl HeldKey {
    fn ratio(&self, beside: &[Drained]) -> Option<f64> {
        Some(ratio(
            drained_events_per_s(beside)?,
            drained_events_per_s(&self.without)?,
        ))
    }
}

/// One table drained by several relays at once against raw publishing, and the failover time.
#[derive(Debug, Clone)]
pub struct ScaleOut {
    pub rows: u64,
    pub keys: u64,
    /// The table's partition count, from its lease rows.
    pub partitions: Option<u32>,
    pub timings: LeaseTimings,
    /// Raw publishing of the same backlog, one run before each relay drain.
    pub raw: Vec<Run>,
    pub cells: Vec<ScaleCell>,
    /// The failover's figures, or why it could not be measured.
    pub failover: Result<Failover, String>,
    /// The drains' relay logs, and the failover's (where faults make warnings expected).
    pub log: LogProblems,
    pub failover_log: LogProblems,
}

/// The drains of one number of relays with one number of channels each.
#[derive(Debug, Clone)]
pub struct ScaleCell {
    pub relays: u32,
    pub channels: u32,
    pub drains: Vec<Drained>,
    /// Seconds from the relays' start until they shared the partitions (before the clock).
    pub settle_s: Vec<f64>,
}

/// Several relays under a steady load while the owner of a partition is faulted.
#[derive(Debug, Clone)]
pub struct Failover {
    pub relays: u32,
    pub offered_rate: u32,
    /// Of the offered rate, rows on the probe key (whose partition's owner is faulted).
    pub probe_rate: u32,
    pub seconds: f64,
    pub committed: u64,
    /// Committed rows the consumer never received.
    pub lost: u64,
    pub duplicates: u64,
    pub faults: Vec<Fault>,
    /// What went wrong besides the figures (a relay that would not stop).
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// SIGKILL: the process and its PostgreSQL sessions are gone at once.
    Kill,
    /// SIGSTOP until the others took the partitions, then SIGCONT: only the lease's expiry
    /// frees them.
    Pause,
}

impl FaultKind {
    pub fn signal(self) -> &'static str {
        match self {
            FaultKind::Kill => "SIGKILL",
            FaultKind::Pause => "SIGSTOP",
        }
    }
}

/// One fault's figures, from the consumer's arrival times.
#[derive(Debug, Clone)]
pub struct Fault {
    pub kind: FaultKind,
    /// The probe key's partition, owned by the faulted relay.
    pub partition: u32,
    /// Fault -> the first arrival of a row of the partition inserted after the fault.
    pub resumed_ms: Option<f64>,
    /// The partition's last arrival before the fault -> that first arrival after it.
    pub gap_ms: Option<f64>,
    /// Fault -> the lease rows show the other relays sharing every partition (read every 50 ms).
    pub taken_over_ms: f64,
    /// Partitions the faulted relay owned.
    pub victim_partitions: u32,
    /// For each of them with a row inserted after the fault: fault -> its first arrival, sorted.
    pub partition_resumed_ms: Vec<f64>,
    /// What went wrong after the takeover (a paused relay that did not come back).
    pub note: Option<String>,
}

pub struct Report {
    plan: Plan,
    machine: Machine,
    pub drain: Option<Comparison>,
    pub hot_key: Option<Comparison>,
    pub latency: Option<Latency>,
    pub idle: Option<Idle>,
    pub history: Option<History>,
    pub pg_only: Option<PgOnly>,
    pub many_tables: Option<ManyTables>,
    pub held_key: Option<HeldKey>,
    pub delete_mode: Option<DeleteMode>,
    pub tracing: Option<Tracing>,
    pub scale_out: Option<ScaleOut>,
    pub producers: Option<Producers>,
}

pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.into_iter().collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// Nearest-rank percentile of sorted microseconds, in milliseconds.
fn percentile_ms(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1000.0
}

fn round(x: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (x * f).round() / f
}

/// Median PostgreSQL CPU microseconds per event of runs of `rows` events (every `postgres`
/// process of the machine: the sessions of other users too).
fn postgresql_us_per_event(runs: &[Run], rows: u64) -> f64 {
    median(runs.iter().filter_map(|r| {
        r.cpu_split
            .map(|c| c.postgresql_s * 1e6 / rows.max(1) as f64)
    }))
}

/// The drain's target for PostgreSQL's CPU per event (issue 23).
const DRAIN_POSTGRESQL_US_MAX: f64 = 10.0;

fn peak_rss(runs: &[Run]) -> f64 {
    runs.iter()
        .filter_map(|r| r.usage.map(|u| u.peak_rss_mib))
        .fold(0.0, f64::max)
}

fn runs_json(runs: &[Run]) -> Value {
    Value::Array(
        runs.iter()
            .map(|r| {
                json!({
                    "events_per_s": round(r.events_per_s, 1),
                    "seconds": round(r.seconds, 3),
                    "startup_ms": r.startup_ms.map(|s| round(s, 1)),
                    "cpu_s": r.usage.map(|u| round(u.cpu_s, 2)),
                    "peak_rss_mib": r.usage.map(|u| round(u.peak_rss_mib, 1)),
                    "duplicates": r.duplicates,
                    "host_cpu_busy": r.host_cpu_busy.map(|b| round(b, 2)),
                    "cpu_s_by_process": r.cpu_split.map(|c| json!({
                        "relay": round(c.relay_s, 2),
                        "bench": round(c.bench_s, 2),
                        "rabbitmq": round(c.rabbitmq_s, 2),
                        "postgresql": round(c.postgresql_s, 2),
                        "other": round(c.other_s, 2),
                    })),
                })
            })
            .collect(),
    )
}

impl Comparison {
    pub fn relay_events_per_s(&self) -> f64 {
        median(self.relay.iter().map(|r| r.events_per_s))
    }
    pub fn raw_events_per_s(&self) -> f64 {
        median(self.raw.iter().map(|r| r.events_per_s))
    }
    pub fn ratio(&self) -> f64 {
        ratio(self.relay_events_per_s(), self.raw_events_per_s())
    }
    fn relay_cpu_s(&self) -> f64 {
        median(self.relay.iter().filter_map(|r| r.usage.map(|u| u.cpu_s)))
    }
    /// Median CPU microseconds per event of everything on the delivery path (relay or raw
    /// publisher, consumer, RabbitMQ, PostgreSQL), excluding other processes.
    fn path_cpu_us(&self, runs: &[Run]) -> f64 {
        median(runs.iter().filter_map(|r| {
            r.cpu_split.map(|c| {
                (c.relay_s + c.bench_s + c.rabbitmq_s + c.postgresql_s) * 1e6 / self.rows as f64
            })
        }))
    }
    /// raw CPU per event / relay CPU per event: the ratio a CPU-bound machine allows, and
    /// much less disturbed by other processes than the throughput ratio.
    pub fn cpu_ratio(&self) -> f64 {
        ratio(self.path_cpu_us(&self.raw), self.path_cpu_us(&self.relay))
    }
    fn json(&self) -> Value {
        json!({
            "relay_events_per_s": round(self.relay_events_per_s(), 1),
            "raw_events_per_s": round(self.raw_events_per_s(), 1),
            "ratio": round(self.ratio(), 3),
            "rows": self.rows,
            "ordering_keys": self.keys,
            "raw_window": self.raw_window,
            "relay_cpu_s": round(self.relay_cpu_s(), 2),
            "relay_path_cpu_us_per_event": round(self.path_cpu_us(&self.relay), 1),
            "raw_path_cpu_us_per_event": round(self.path_cpu_us(&self.raw), 1),
            "cpu_ratio": round(self.cpu_ratio(), 3),
            "relay_cpu_us_per_event": round(self.relay_cpu_s() * 1e6 / self.rows as f64, 1),
            "relay_postgresql_cpu_us_per_event": round(postgresql_us_per_event(&self.relay, self.rows), 1),
            "raw_postgresql_cpu_us_per_event": round(postgresql_us_per_event(&self.raw, self.rows), 1),
            "peak_rss_mib": round(peak_rss(&self.relay), 1),
            "relay_runs": runs_json(&self.relay),
            "raw_runs": runs_json(&self.raw),
        })
    }
}

impl Latency {
    fn json(&self) -> Value {
        let mean = if self.micros.is_empty() {
            0.0
        } else {
            self.micros.iter().sum::<u64>() as f64 / self.micros.len() as f64 / 1000.0
        };
        json!({
            "p50_ms": round(percentile_ms(&self.micros, 50.0), 2),
            "p95_ms": round(percentile_ms(&self.micros, 95.0), 2),
            "p99_ms": round(percentile_ms(&self.micros, 99.0), 2),
            "max_ms": round(percentile_ms(&self.micros, 100.0), 2),
            "mean_ms": round(mean, 2),
            "from_insert_start": {
                "p50_ms": round(percentile_ms(&self.from_insert_micros, 50.0), 2),
                "p99_ms": round(percentile_ms(&self.from_insert_micros, 99.0), 2),
                "max_ms": round(percentile_ms(&self.from_insert_micros, 100.0), 2),
            },
            "offered_events_per_s": self.offered_rate,
            "committed_events_per_s": round(self.committed_rate, 1),
            "producers": self.producers,
            "seconds": self.seconds,
            "events": self.events,
            "producer_most_late_ms": round(self.producer_most_late_ms, 1),
            "received_before_commit_ack": self.received_before_commit_ack,
            "duplicates": self.duplicates,
            "relay_cpu_s": round(self.usage.cpu_s, 2),
            "peak_rss_mib": round(self.usage.peak_rss_mib, 1),
        })
    }
}

impl Idle {
    fn json(&self) -> Value {
        json!({
            "cpu_s": round(self.cpu_s, 3),
            "statements_per_s": round(self.statements_per_s, 2),
            "statements_per_poll_interval": round(self.statements_per_poll_interval, 2),
            "poll_interval_s": self.poll_interval_s,
            "statements": self.statements,
            "round_trips_per_s": round(self.round_trips_per_s, 2),
            "database_transactions_per_s": round(self.database_transactions_per_s, 2),
            "seconds": round(self.seconds, 2),
            "counting": "statements: exact, a TCP proxy in front of PostgreSQL counts the relay's Query and Execute messages; \
                         round trips: Query and Sync messages (sqlx's pool pings on acquire and on release); \
                         database_transactions_per_s: pg_stat_database xact_commit + xact_rollback of the bench database, \
                         which also counts autovacuum and lags up to a second",
            "peak_rss_mib": round(self.usage.peak_rss_mib, 1),
            "scraped": self.scraped.as_ref().map(|s| json!({
                "every_s": s.every_s,
                "scrapes": s.scrapes,
                "seconds": round(s.seconds, 2),
                "statements_per_s": round(s.statements_per_s, 2),
                "counting": "the same proxy; the relay reads its backlog gauges at most every 10 s when scraped",
            })),
        })
    }
}

impl ManyTables {
    fn json(&self) -> Value {
        let eps = |d: &[Drained]| drained_events_per_s(d).map(|e| round(e, 1));
        json!({
            "tables": self.tables,
            "rows": self.rows,
            "max_connections": self.max_connections,
            "pg_sessions_max": self.sessions_max,
            "pg_sessions_target_max": self.max_connections + 1,
            "one_table_pg_sessions_max": self.one_table_sessions_max,
            "amqp_connections_max": self.amqp_connections_max,
            "idle": self.idle.json(),
            "warm_up": self.warm_up.as_ref().map(|s| s.to_string()),
            "ratio": self.ratio().map(|r| round(r, 3)),
            "not_delivered": shortfall(&self.many).or(shortfall(&self.one_table)).map(|s| s.to_string()),
            "many_events_per_s": eps(&self.many),
            "one_table_events_per_s": eps(&self.one_table),
            "migrate_s": round(self.migrate_s, 2),
            "many_runs": drained_json(&self.many),
            "one_table_runs": drained_json(&self.one_table),
            "relay_log": log_json(&self.log),
        })
    }
}

impl HeldKey {
    fn json(&self) -> Value {
        let eps = |d: &[Drained]| drained_events_per_s(d).map(|e| round(e, 1));
        let variant = |beside: &[Drained]| {
            json!({
                "ratio": self.ratio(beside).map(|r| round(r, 3)),
                "events_per_s": eps(beside),
                "not_delivered": shortfall(beside).map(|s| s.to_string()),
                "runs": drained_json(beside),
            })
        };
        json!({
            "parked": variant(&self.parked),
            "retry_delay": variant(&self.retrying),
            "without_events_per_s": eps(&self.without),
            "without_runs": drained_json(&self.without),
            "queued_rows": self.queued_rows,
            "rows": self.rows,
            "ordering_keys": self.keys,
            "held_keys_schema": self.held_schema,
            "queued_rows_held_at_start": self.queued_held,
            "queue_insert_s": self.queue_insert_s.iter().map(|s| round(*s, 2)).collect::<Vec<_>>(),
            "relay_log": log_json(&self.log),
        })
    }
}

/// A drain comparison's row: both figures and the ratio, or how far the drain got.
fn drained_row(
    label: &str,
    figure: &str,
    drains: &[Drained],
    baseline: &[Drained],
    target: f64,
    verdict: &dyn Fn(bool) -> &'static str,
) -> String {
    match (drained_events_per_s(drains), drained_events_per_s(baseline)) {
        (Some(a), Some(b)) => format!(
            "{:<11} {:<44} {:>10.0} {:>10.0} {:>6.2}   >= {target:.2} {}\n",
            label,
            figure,
            a,
            b,
            ratio(a, b),
            verdict(ratio(a, b) >= target)
        ),
        _ => {
            let short = shortfall(drains)
                .or(shortfall(baseline))
                .map(|s| s.to_string())
                .unwrap_or_default();
            format!(
                "{:<11} {:<44} {:>29}   >= {target:.2} {}\n",
                label,
                figure,
                short,
                verdict(false)
            )
        }
    }
}

fn log_rows(log: &LogProblems) -> String {
    if log.is_empty() {
        return String::new();
    }
    let mut s = format!(
        "{:<11} {}\n",
        "",
        format_args!(
            "  relay logs: {} warnings, {} errors",
            log.warnings, log.errors
        )
    );
    for line in &log.first {
        s += &format!("{:<11}     {line}\n", "");
    }
    s
}

impl ManyTables {
    fn table(&self, verdict: &dyn Fn(bool) -> &'static str) -> String {
        let budget = self.max_connections as i64 + 1;
        let mut s = format!(
            "{:<11} {:<44} {:>29}   <= {budget} {}\n",
            "many-tables",
            format!(
                "PG sessions, max ({} tables, pool {})",
                self.tables, self.max_connections
            ),
            format!(
                "{} (one table: {})",
                self.sessions_max, self.one_table_sessions_max
            ),
            verdict(self.sessions_max <= budget)
        );
        s += &format!(
            "{:<11} {:<44} {:>29}   1 {}\n",
            "",
            "AMQP connections, max",
            self.amqp_connections_max
                .map_or("?".to_owned(), |n| n.to_string()),
            verdict(self.amqp_connections_max == Some(1))
        );
        if let Some(w) = &self.warm_up {
            s += &format!(
                "{:<11} {:<44} {:>29}\n",
                "",
                "warm-up, 1 row per table",
                w.to_string()
            );
        }
        s += &format!(
            "{:<11} {:<44} {:>29}   <= 1 per poll {}\n",
            "",
            format!("idle {:.0} s: statements/s, relay CPU s", self.idle.seconds),
            format!(
                "{:.2}/s, {:.3} s",
                self.idle.statements_per_s, self.idle.cpu_s
            ),
            verdict(self.idle.statements_per_poll_interval <= 1.0 + 1e-9)
        );
        s += &drained_row(
            "",
            &format!(
                "events/s, {} rows over {} tables (vs 1)",
                self.rows, self.tables
            ),
            &self.many,
            &self.one_table,
            0.8,
            verdict,
        );
        s + &log_rows(&self.log)
    }
}

impl HeldKey {
    fn table(&self, verdict: &dyn Fn(bool) -> &'static str) -> String {
        let mut s = drained_row(
            "held-key",
            &format!("events/s, {} rows beside a parked key", self.rows),
            &self.parked,
            &self.without,
            0.9,
            verdict,
        );
        s += &drained_row(
            "",
            &format!("events/s, {} rows beside a retrying key", self.rows),
            &self.retrying,
            &self.without,
            0.9,
            verdict,
        );
        s += &format!(
            "{:<11} {}\n",
            "",
            format_args!(
                "  {} rows queued behind the key, {}",
                self.queued_rows,
                if self.held_schema {
                    "held (out of the due index)"
                } else {
                    "in the due index (no held keys in this schema)"
                }
            )
        );
        s + &log_rows(&self.log)
    }
}

impl History {
    fn empty_events_per_s(&self) -> f64 {
        median(self.empty.iter().map(|r| r.events_per_s))
    }
    fn history_events_per_s(&self) -> f64 {
        median(self.history.iter().map(|r| r.events_per_s))
    }
    fn ratio(&self) -> f64 {
        ratio(self.history_events_per_s(), self.empty_events_per_s())
    }
}

impl PgOnly {
    fn rows_per_s(&self) -> f64 {
        median(self.runs.iter().map(|r| r.rows_per_s))
    }
}

impl Report {
    pub fn new(plan: Plan, machine: Machine) -> Report {
        Report {
            plan,
            machine,
            drain: None,
            hot_key: None,
            latency: None,
            idle: None,
            history: None,
            pg_only: None,
            many_tables: None,
            held_key: None,
            delete_mode: None,
            tracing: None,
            scale_out: None,
            producers: None,
        }
    }

    /// Every timed relay and baseline run.
    fn timed_runs(&self) -> Vec<&Run> {
        let mut runs: Vec<&Run> = Vec::new();
        for c in [&self.drain, &self.hot_key].into_iter().flatten() {
            runs.extend(c.relay.iter().chain(&c.raw));
        }
        if let Some(h) = &self.history {
            runs.extend(h.empty.iter().chain(&h.history));
        }
        if let Some(d) = &self.delete_mode {
            runs.extend(d.mark.iter().chain(&d.delete));
        }
        if let Some(t) = &self.tracing {
            runs.extend(t.off.iter().chain(&t.on).chain(&t.down));
        }
        if let Some(m) = &self.many_tables {
            runs.extend(m.one_table.iter().chain(&m.many).filter_map(Drained::run));
        }
        if let Some(h) = &self.held_key {
            let drains = h.without.iter().chain(&h.parked).chain(&h.retrying);
            runs.extend(drains.filter_map(Drained::run));
        }
        if let Some(o) = &self.scale_out {
            runs.extend(&o.raw);
            runs.extend(
                o.cells
                    .iter()
                    .flat_map(|c| c.drains.iter().filter_map(Drained::run)),
            );
        }
        runs
    }

    /// Share of the machine's CPU taken by processes that are not on the delivery path
    /// (other users of a shared machine) during the timed runs.
    fn other_cpu_share(&self) -> Option<f64> {
        let runs = self.timed_runs();
        let mut other: f64 = runs
            .iter()
            .filter_map(|r| r.cpu_split.map(|c| c.other_s))
            .sum();
        let mut seconds: f64 = runs.iter().map(|r| r.seconds).sum();
        for run in self.producers.iter().flat_map(Producers::runs) {
            other += run.cpu_split.other_s;
            seconds += run.seconds;
        }
        let available = seconds * self.machine.nproc.max(1) as f64;
        (available > 0.0).then(|| other / available)
    }

    /// The largest VmHWM of any relay process of the run.
    fn peak_rss_mib(&self) -> Option<f64> {
        let mut peaks = Vec::new();
        for c in [&self.drain, &self.hot_key].into_iter().flatten() {
            peaks.push(peak_rss(&c.relay));
        }
        if let Some(h) = &self.history {
            peaks.push(peak_rss(&h.empty));
            peaks.push(peak_rss(&h.history));
        }
        if let Some(d) = &self.delete_mode {
            peaks.push(peak_rss(&d.mark));
            peaks.push(peak_rss(&d.delete));
        }
        if let Some(t) = &self.tracing {
            peaks.push(peak_rss(&t.off));
            peaks.push(peak_rss(&t.on));
            peaks.push(peak_rss(&t.down));
        }
        peaks.extend(self.latency.as_ref().map(|l| l.usage.peak_rss_mib));
        peaks.extend(self.idle.as_ref().map(|i| i.usage.peak_rss_mib));
        if let Some(m) = &self.many_tables {
            peaks.push(m.idle.usage.peak_rss_mib);
            let runs: Vec<Run> = m
                .one_table
                .iter()
                .chain(&m.many)
                .filter_map(Drained::run)
                .cloned()
                .collect();
            peaks.push(peak_rss(&runs));
        }
        if let Some(h) = &self.held_key {
            let drains = h.without.iter().chain(&h.parked).chain(&h.retrying);
            let runs: Vec<Run> = drains.filter_map(Drained::run).cloned().collect();
            peaks.push(peak_rss(&runs));
        }
        if let Some(o) = &self.scale_out {
            peaks.extend(o.cells.iter().map(ScaleCell::peak_rss_mib));
        }
        peaks.extend(self.producers.as_ref().and_then(Producers::peak_rss_mib));
        peaks.into_iter().reduce(f64::max)
    }

    pub fn json(&self) -> Value {
        let mut out = serde_json::Map::new();
        if let Some(d) = &self.drain {
            let mut drain = d.json();
            if let Some(fields) = drain.as_object_mut() {
                fields.insert(
                    "relay_postgresql_cpu_us_per_event_target_max".into(),
                    json!(DRAIN_POSTGRESQL_US_MAX),
                );
            }
            out.insert("drain".into(), drain);
        }
        if let Some(h) = &self.hot_key {
            out.insert("hot_key".into(), h.json());
        }
        if let Some(l) = &self.latency {
            out.insert("latency".into(), l.json());
        }
        if let Some(i) = &self.idle {
            out.insert("idle".into(), i.json());
        }
        if let Some(h) = &self.history {
            out.insert(
                "history".into(),
                json!({
                    "ratio": round(h.ratio(), 3),
                    "history_events_per_s": round(h.history_events_per_s(), 1),
                    "empty_events_per_s": round(h.empty_events_per_s(), 1),
                    "history_rows": h.history_rows,
                    "rows": h.rows,
                    "history_insert_s": round(h.seed_s, 1),
                    "history_vacuum_analyze_s": round(h.vacuum_s, 1),
                    "history_table_bytes": h.history_bytes,
                    "history_runs": runs_json(&h.history),
                    "empty_runs": runs_json(&h.empty),
                }),
            );
        }
        if let Some(p) = &self.pg_only {
            out.insert(
                "pg_only".into(),
                json!({
                    "rows_per_s": round(p.rows_per_s(), 1),
                    "rows": p.rows,
                    "batch_size": p.batch_size,
                    "runs": p.runs.iter().map(|r| json!({
                        "rows_per_s": round(r.rows_per_s, 1),
                        "seconds": round(r.seconds, 3),
                        "fetch_s": round(r.fetch_s, 3),
                        "mark_s": round(r.mark_s, 3),
                    })).collect::<Vec<_>>(),
                }),
            );
        }
        if let Some(m) = &self.many_tables {
            out.insert("many_tables".into(), m.json());
        }
        if let Some(h) = &self.held_key {
            out.insert("held_key".into(), h.json());
        }
        if let Some(t) = &self.tracing {
            out.insert("tracing".into(), t.json());
        }
        if let Some(d) = &self.delete_mode {
            out.insert("delete_mode".into(), d.json());
        }
        if let Some(o) = &self.scale_out {
            out.insert("scale_out".into(), o.json());
        }
        if let Some(p) = &self.producers {
            out.insert("producers".into(), p.json());
        }
        if let Some(peak) = self.peak_rss_mib() {
            out.insert("peak_rss_mib".into(), json!(round(peak, 1)));
        }
        if let Some(share) = self.other_cpu_share() {
            out.insert("other_processes_cpu_share".into(), json!(round(share, 3)));
        }
        out.insert(
            "run".into(),
            json!({
                "quick": self.plan.quick,
                "rounds": self.plan.rounds,
                "batch_size": self.plan.batch_size,
                "max_in_flight": self.plan.max_in_flight,
            }),
        );
        out.insert("machine".into(), json!(self.machine));
        Value::Object(out)
    }

    /// The human table.
    pub fn table(&self) -> String {
        let m = &self.machine;
        let mut s = format!(
            "\noutbox-relay-bench ({} run, {} round{}) on {} CPUs{}, {:.1} GiB, PostgreSQL {}, RabbitMQ {}\n\n",
            if self.plan.quick { "quick" } else { "full" },
            self.plan.rounds,
            if self.plan.rounds == 1 { "" } else { "s" },
            m.nproc,
            m.cpu.as_ref().map(|c| format!(" ({c})")).unwrap_or_default(),
            m.memory_gib.unwrap_or(0.0),
            m.postgresql.as_deref().unwrap_or("?"),
            m.rabbitmq.as_deref().unwrap_or("?"),
        );
        s += &format!(
            "{:<11} {:<44} {:>10} {:>10} {:>6}   {}\n",
            "scenario", "figure", "relay", "baseline", "ratio", "target"
        );
        let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
        if let Some(d) = &self.drain {
            s += &format!(
                "{:<11} {:<44} {:>10.0} {:>10.0} {:>6.2}   >= 0.85 {}\n",
                "drain",
                format!("events/s, {} rows, {} keys", d.rows, d.keys),
                d.relay_events_per_s(),
                d.raw_events_per_s(),
                d.ratio(),
                verdict(d.ratio() >= 0.85)
            );
            s += &format!(
                "{:<11} {:<44} {:>10.1} {:>10.1} {:>6.2}\n",
                "",
                "  CPU us/event on the delivery path",
                d.path_cpu_us(&d.relay),
                d.path_cpu_us(&d.raw),
                d.cpu_ratio()
            );
            let postgresql_us = postgresql_us_per_event(&d.relay, d.rows);
            s += &format!(
                "{:<11} {:<44} {:>10.1} {:>10.1} {:>6}   <= {DRAIN_POSTGRESQL_US_MAX:.0} us {}\n",
                "",
                "  PostgreSQL CPU us/event",
                postgresql_us,
                postgresql_us_per_event(&d.raw, d.rows),
                "",
                verdict(postgresql_us <= DRAIN_POSTGRESQL_US_MAX)
            );
        }
        if let Some(h) = &self.hot_key {
            s += &format!(
                "{:<11} {:<44} {:>10.0} {:>10.0} {:>6.2}   >= 0.80 {}\n",
                "hot-key",
                format!("events/s, {} rows, 1 key, 1 in flight", h.rows),
                h.relay_events_per_s(),
                h.raw_events_per_s(),
                h.ratio(),
                verdict(h.ratio() >= 0.8)
            );
        }
        if let Some(l) = &self.latency {
            let p99 = percentile_ms(&l.micros, 99.0);
            s += &format!(
                "{:<11} {:<44} {:>29}   p99 <= 10 ms {}\n",
                "latency",
                format!(
                    "commit->consumer ms at {}/s: p50 p95 p99 max",
                    l.offered_rate
                ),
                format!(
                    "{:.1} / {:.1} / {:.1} / {:.1}",
                    percentile_ms(&l.micros, 50.0),
                    percentile_ms(&l.micros, 95.0),
                    p99,
                    percentile_ms(&l.micros, 100.0)
                ),
                verdict(p99 <= 10.0)
            );
        }
        if let Some(i) = &self.idle {
            s += &format!(
                "{:<11} {:<44} {:>29}   <= 1 per poll {}\n",
                "idle",
                format!("{:.0} s: relay CPU s, statements/s", i.seconds),
                format!("{:.3} s, {:.2}/s", i.cpu_s, i.statements_per_s),
                verdict(i.statements_per_poll_interval <= 1.0 + 1e-9)
            );
            if let Some(sc) = &i.scraped {
                s += &format!(
                    "{:<11} {:<44} {:>29}   <= idle + 1/10 s {}\n",
                    "idle+scrape",
                    format!(
                        "{:.0} s, /metrics every {:.0} s: statements/s",
                        sc.seconds, sc.every_s
                    ),
                    format!("{} scrapes, {:.2}/s", sc.scrapes, sc.statements_per_s),
                    verdict(sc.within_promise(i.statements_per_s))
                );
            }
        }
        if let Some(h) = &self.history {
            s += &format!(
                "{:<11} {:<44} {:>10.0} {:>10.0} {:>6.2}   >= 0.95 {}\n",
                "history",
                format!("events/s with {} published rows (vs empty)", h.history_rows),
                h.history_events_per_s(),
                h.empty_events_per_s(),
                h.ratio(),
                verdict(h.ratio() >= 0.95)
            );
        }
        if let Some(p) = &self.pg_only {
            s += &format!(
                "{:<11} {:<44} {:>10.0}\n",
                "pg-only",
                format!("rows/s fetch + mark, {} rows, no broker", p.rows),
                p.rows_per_s()
            );
        }
        if let Some(m) = &self.many_tables {
            s += &m.table(&verdict);
        }
        if let Some(h) = &self.held_key {
            s += &h.table(&verdict);
        }
        if let Some(d) = &self.delete_mode {
            s += &d.table();
        }
        if let Some(t) = &self.tracing {
            s += &t.table(&verdict);
        }
        if let Some(o) = &self.scale_out {
            s += &o.table();
        }
        if let Some(p) = &self.producers {
            s += &p.table(&verdict);
        }
        let noise = self.other_cpu_share();
        if let Some(peak) = self.peak_rss_mib() {
            s += &format!(
                "{:<11} {:<44} {:>10.1}   {:>20}   <= 64 MiB {}\n",
                "peak RSS",
                "MiB, largest relay process of the run",
                peak,
                "",
                verdict(peak <= 64.0)
            );
        }
        if let Some(share) = noise {
            s += &format!(
                "\nOther processes took {:.0}% of the machine's CPU during the timed runs{}.\n",
                share * 100.0,
                if share > 0.1 {
                    " (a busy machine: expect noisy figures)"
                } else {
                    ""
                }
            );
        }
        s
    }
}

impl ScaleCell {
    fn events_per_s(&self) -> Option<f64> {
        drained_events_per_s(&self.drains)
    }
    fn runs(&self) -> Vec<&Run> {
        self.drains.iter().filter_map(Drained::run).collect()
    }
    /// Median CPU seconds per kind of process over the cell's drains, per event (us).
    fn cpu_us(&self, rows: u64, kind: fn(&CpuSplit) -> f64) -> f64 {
        median(
            self.runs()
                .iter()
                .filter_map(|r| r.cpu_split.map(|c| kind(&c) * 1e6 / rows.max(1) as f64)),
        )
    }
    fn host_busy(&self) -> Option<f64> {
        let busy: Vec<f64> = self.runs().iter().filter_map(|r| r.host_cpu_busy).collect();
        (!busy.is_empty()).then(|| median(busy))
    }
    fn peak_rss_mib(&self) -> f64 {
        self.runs()
            .iter()
            .filter_map(|r| r.usage.map(|u| u.peak_rss_mib))
            .fold(0.0, f64::max)
    }
    fn name(&self) -> String {
        let plural = |n: u32| if n == 1 { "" } else { "s" };
        format!(
            "{} relay{} x {} channel{}",
            self.relays,
            plural(self.relays),
            self.channels,
            plural(self.channels)
        )
    }
    fn json(&self, rows: u64, raw: f64) -> Value {
        let us = |kind: fn(&CpuSplit) -> f64| round(self.cpu_us(rows, kind), 1);
        json!({
            "relays": self.relays,
            "channels": self.channels,
            "events_per_s": self.events_per_s().map(|e| round(e, 1)),
            "ratio": self.events_per_s().map(|e| round(ratio(e, raw), 3)),
            "not_delivered": shortfall(&self.drains).map(|s| s.to_string()),
            "settle_s": self.settle_s.iter().map(|s| round(*s, 2)).collect::<Vec<_>>(),
            "cpu_us_per_event": {
                "relays": us(|c| c.relay_s),
                "rabbitmq": us(|c| c.rabbitmq_s),
                "postgresql": us(|c| c.postgresql_s),
                "bench": us(|c| c.bench_s),
                "other": us(|c| c.other_s),
            },
            "host_cpu_busy": self.host_busy().map(|b| round(b, 2)),
            "peak_rss_mib": round(self.peak_rss_mib(), 1),
            "runs": drained_json(&self.drains),
        })
    }
}

/// Events/s with one channel per relay as the relays grow (over one relay's), and the first
/// step of the grid (from, to relays) that adds less than 10 %.
#[derive(Debug, Default)]
struct Curve {
    gains: Vec<(u32, f64)>,
    no_gain: Option<(u32, u32)>,
}

impl ScaleOut {
    fn raw_events_per_s(&self) -> f64 {
        median(self.raw.iter().map(|r| r.events_per_s))
    }

    /// Where adding relays stops paying (one channel each): each number of relays' events/s
    /// over one relay's, and the first step of the grid (from, to relays) that adds less than
    /// 10 %.
    fn flattening(&self) -> Curve {
        let mut one_channel: Vec<(u32, f64)> = self
            .cells
            .iter()
            .filter(|c| c.channels == 1)
            .filter_map(|c| Some((c.relays, c.events_per_s()?)))
            .collect();
        one_channel.sort_by_key(|(relays, _)| *relays);
        let Some(&(_, single)) = one_channel.first() else {
            return Curve::default();
        };
        let gains: Vec<(u32, f64)> = one_channel
            .iter()
            .map(|(relays, eps)| (*relays, ratio(*eps, single)))
            .collect();
        let flat = one_channel
            .windows(2)
            .find(|w| w[1].1 < w[0].1 * 1.1)
            .map(|w| (w[0].0, w[1].0));
        Curve {
            gains,
            no_gain: flat,
        }
    }

    /// What the CPU did in the cell with the most relays: saturated or not, and who used it.
    fn limit(&self) -> Option<String> {
        let cell = self
            .cells
            .iter()
            .filter(|c| c.events_per_s().is_some())
            .max_by_key(|c| (c.relays, c.channels))?;
        let busy = cell.host_busy()?;
        let mut users = [
            ("RabbitMQ", cell.cpu_us(self.rows, |c| c.rabbitmq_s)),
            ("PostgreSQL", cell.cpu_us(self.rows, |c| c.postgresql_s)),
            ("the relays", cell.cpu_us(self.rows, |c| c.relay_s)),
            (
                "the bench (consumer)",
                cell.cpu_us(self.rows, |c| c.bench_s),
            ),
            ("other processes", cell.cpu_us(self.rows, |c| c.other_s)),
        ];
        let used: f64 = users.iter().map(|(_, us)| us).sum();
        users.sort_by(|a, b| b.1.total_cmp(&a.1));
        let shares: Vec<String> = users
            .iter()
            .map(|(who, us)| format!("{who} {:.0}%", ratio(*us, used) * 100.0))
            .collect();
        let verdict = if busy >= 0.9 {
            format!(
                "CPU-bound: the machine's CPUs, shared by the broker, PostgreSQL and the relays, are the limit, {} the largest user",
                users[0].0
            )
        } else if busy >= 0.75 {
            format!(
                "close to CPU-bound (the rest is waits: round trips, confirms), {} the largest user",
                users[0].0
            )
        } else {
            "not CPU-bound: waits (round trips, confirms), not CPU, limit it".to_owned()
        };
        Some(format!(
            "at {}: machine CPU {:.0}% busy; of the CPU used: {}; {verdict}",
            cell.name(),
            busy * 100.0,
            shares.join(", ")
        ))
    }

    fn faults(&self, kind: FaultKind) -> Vec<&Fault> {
        self.failover
            .iter()
            .flat_map(|f| &f.faults)
            .filter(|f| f.kind == kind)
            .collect()
    }

    fn faults_json(&self, kind: FaultKind) -> Value {
        let faults = self.faults(kind);
        let med = |v: Vec<f64>| (!v.is_empty()).then(|| round(median(v), 1));
        let max = |v: Vec<f64>| v.into_iter().reduce(f64::max).map(|m| round(m, 1));
        let resumed = || {
            faults
                .iter()
                .filter_map(|f| f.resumed_ms)
                .collect::<Vec<_>>()
        };
        let gap = || faults.iter().filter_map(|f| f.gap_ms).collect::<Vec<_>>();
        let taken = || faults.iter().map(|f| f.taken_over_ms).collect::<Vec<_>>();
        let every = || {
            faults
                .iter()
                .filter_map(|f| f.partition_resumed_ms.last().copied())
                .collect::<Vec<_>>()
        };
        json!({
            "faults": faults.len(),
            "resumed_ms_median": med(resumed()),
            "resumed_ms_max": max(resumed()),
            "gap_ms_median": med(gap()),
            "gap_ms_max": max(gap()),
            "taken_over_ms_median": med(taken()),
            "all_partitions_resumed_ms_max": max(every()),
            "runs": faults.iter().map(|f| json!({
                "partition": f.partition,
                "resumed_ms": f.resumed_ms.map(|m| round(m, 1)),
                "gap_ms": f.gap_ms.map(|m| round(m, 1)),
                "taken_over_ms": round(f.taken_over_ms, 1),
                "victim_partitions": f.victim_partitions,
                "partitions_with_rows_after": f.partition_resumed_ms.len(),
                "partition_resumed_ms_p50": (!f.partition_resumed_ms.is_empty())
                    .then(|| round(percentile(&f.partition_resumed_ms, 50.0), 1)),
                "partition_resumed_ms_max": f.partition_resumed_ms.last().map(|m| round(*m, 1)),
                "note": f.note,
            })).collect::<Vec<_>>(),
        })
    }

    fn json(&self) -> Value {
        let raw = self.raw_events_per_s();
        let Curve {
            gains,
            no_gain: flat,
        } = self.flattening();
        let t = &self.timings;
        json!({
            "rows": self.rows,
            "ordering_keys": self.keys,
            "partitions": self.partitions,
            "raw_events_per_s": round(raw, 1),
            "cells": self.cells.iter().map(|c| c.json(self.rows, raw)).collect::<Vec<_>>(),
            "one_channel_gain_over_one_relay": gains.iter().map(|(relays, g)| json!({"relays": relays, "gain": round(*g, 3)})).collect::<Vec<_>>(),
            "no_gain_from_relays": flat.map(|(from, to)| json!({"from": from, "to": to})),
            "limit": self.limit(),
            "timings": {
                "heartbeat_s": t.heartbeat.as_secs_f64(),
                "lease_s": t.lease.as_secs_f64(),
                "confirm_timeout_s": t.confirm_timeout.as_secs_f64(),
                "statement_timeout_s": t.statement_timeout.as_secs_f64(),
            },
            "failover": self.failover.as_ref().map_or_else(|e| json!({"error": e}), |f| json!({
                "relays": f.relays,
                "offered_events_per_s": f.offered_rate,
                "probe_events_per_s": f.probe_rate,
                "seconds": round(f.seconds, 1),
                "committed": f.committed,
                "lost": f.lost,
                "duplicates": f.duplicates,
                "notes": f.notes,
                "sigkill": self.faults_json(FaultKind::Kill),
                "sigstop": self.faults_json(FaultKind::Pause),
                "measured": "resumed: fault -> the first arrival of a row of the faulted owner's probe-key partition inserted after the fault (only a new owner can have published it); \
                             gap: that partition's last arrival before the fault -> that first arrival; taken_over: fault -> the lease rows show the other relays sharing every partition (polled every 50 ms); \
                             partition_resumed: the same as resumed for each of the faulted owner's partitions that had a row inserted after the fault (includes waiting for that row)",
            })),
            "raw_runs": runs_json(&self.raw),
            "relay_log": log_json(&self.log),
            "failover_relay_log": log_json(&self.failover_log),
        })
    }

    fn table(&self) -> String {
        let raw = self.raw_events_per_s();
        let mut s = format!(
            "{:<11} {}\n",
            "scale-out",
            format_args!(
                "{} rows, {} keys, {} partitions, backlog committed after the relays shared the partitions",
                self.rows,
                self.keys,
                self.partitions.map_or("?".to_owned(), |p| p.to_string())
            )
        );
        for cell in &self.cells {
            let figure = format!("  events/s, {}", cell.name());
            match cell.events_per_s() {
                Some(eps) => {
                    s += &format!(
                        "{:<11} {:<44} {:>10.0} {:>10.0} {:>6.2}\n",
                        "",
                        figure,
                        eps,
                        raw,
                        ratio(eps, raw)
                    );
                    let us = |kind: fn(&CpuSplit) -> f64| cell.cpu_us(self.rows, kind);
                    s += &format!(
                        "{:<11}     CPU us/event relays {:.1}, RabbitMQ {:.1}, PostgreSQL {:.1}, bench {:.1}; machine {}\n",
                        "",
                        us(|c| c.relay_s),
                        us(|c| c.rabbitmq_s),
                        us(|c| c.postgresql_s),
                        us(|c| c.bench_s),
                        cell.host_busy()
                            .map_or("?".to_owned(), |b| format!("{:.0}% busy", b * 100.0))
                    );
                }
                None => {
                    let short = shortfall(&cell.drains)
                        .map(|s| s.to_string())
                        .unwrap_or_default();
                    s += &format!("{:<11} {:<44} {short}\n", "", figure);
                }
            }
        }
        let Curve {
            gains,
            no_gain: flat,
        } = self.flattening();
        if gains.len() > 1 {
            let steps: Vec<String> = gains
                .iter()
                .skip(1)
                .map(|(relays, g)| format!("{relays} relays {g:.2}x"))
                .collect();
            s += &format!(
                "{:<11}   curve (1 channel, vs 1 relay): {}; {}\n",
                "",
                steps.join(", "),
                flat.map_or(
                    "each step adds 10% or more".to_owned(),
                    |(from, to)| format!("no gain from {from} to {to} relays (< 10% more)")
                )
            );
        }
        if let Some(limit) = self.limit() {
            s += &format!("{:<11}   {limit}\n", "");
        }
        s += &log_rows(&self.log);
        if let Err(e) = &self.failover {
            s += &format!("{:<11}   failover not measured: {e}\n", "");
        }
        if let Ok(f) = &self.failover {
            let t = &self.timings;
            s += &format!(
                "{:<11}   failover, {} relays, {} rows/s ({}/s on the probe key), heartbeat {:.0} s, lease {:.0} s (confirm {:.0} s + statement {:.0} s):\n",
                "",
                f.relays,
                f.offered_rate,
                f.probe_rate,
                t.heartbeat.as_secs_f64(),
                t.lease.as_secs_f64(),
                t.confirm_timeout.as_secs_f64(),
                t.statement_timeout.as_secs_f64()
            );
            for kind in [FaultKind::Kill, FaultKind::Pause] {
                for fault in self.faults(kind) {
                    let ms =
                        |m: Option<f64>| m.map_or("never".to_owned(), |m| format!("{m:.0} ms"));
                    s += &format!(
                        "{:<11}     {} of a partition's owner: its rows flow again after {} (gap {}); leases taken over after {:.0} ms; its {} partitions: {}\n",
                        "",
                        kind.signal(),
                        ms(fault.resumed_ms),
                        ms(fault.gap_ms),
                        fault.taken_over_ms,
                        fault.victim_partitions,
                        if fault.partition_resumed_ms.is_empty() {
                            "no rows after".to_owned()
                        } else {
                            format!(
                                "{} resumed, p50 {:.0} ms, max {:.0} ms",
                                fault.partition_resumed_ms.len(),
                                percentile(&fault.partition_resumed_ms, 50.0),
                                fault.partition_resumed_ms.last().copied().unwrap_or(0.0)
                            )
                        }
                    );
                    if let Some(note) = &fault.note {
                        s += &format!("{:<11}       {note}\n", "");
                    }
                }
            }
            for note in &f.notes {
                s += &format!("{:<11}     {note}\n", "");
            }
            s += &format!(
                "{:<11}     {} rows in {:.0} s: {} lost, {} duplicates\n",
                "", f.committed, f.seconds, f.lost, f.duplicates
            );
            s += &log_rows(&self.failover_log);
        }
        s
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median([3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median([4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median([]), 0.0);
    }

    #[test]
    fn percentiles_are_nearest_rank_over_every_sample() {
        let micros: Vec<u64> = (1..=100).map(|ms| ms * 1000).collect();
        assert_eq!(percentile_ms(&micros, 50.0), 50.0);
        assert_eq!(percentile_ms(&micros, 99.0), 99.0);
        assert_eq!(percentile_ms(&micros, 100.0), 100.0);
        assert_eq!(percentile_ms(&[], 99.0), 0.0);
    }
}
