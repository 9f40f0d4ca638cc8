//! The figures: medians and ratios, the human table (with the targets beside them,
//! for information only) and the JSON object.

use serde_json::{json, Value};

use crate::env::Machine;
use crate::process::{CpuSplit, Usage};
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
}

#[derive(Debug, Clone)]
pub struct History {
    pub history_rows: u64,
    pub rows: u64,
    pub empty: Vec<Run>,
    pub history: Vec<Run>,
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

pub struct Report {
    plan: Plan,
    machine: Machine,
    pub drain: Option<Comparison>,
    pub hot_key: Option<Comparison>,
    pub latency: Option<Latency>,
    pub idle: Option<Idle>,
    pub history: Option<History>,
    pub pg_only: Option<PgOnly>,
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
        runs
    }

    /// Share of the machine's CPU taken by processes that are not on the delivery path
    /// (other users of a shared machine) during the timed runs.
    fn other_cpu_share(&self) -> Option<f64> {
        let runs = self.timed_runs();
        let other: f64 = runs
            .iter()
            .filter_map(|r| r.cpu_split.map(|c| c.other_s))
            .sum();
        let available: f64 = runs
            .iter()
            .map(|r| r.seconds * self.machine.nproc.max(1) as f64)
            .sum();
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
        peaks.extend(self.latency.as_ref().map(|l| l.usage.peak_rss_mib));
        peaks.extend(self.idle.as_ref().map(|i| i.usage.peak_rss_mib));
        peaks.into_iter().reduce(f64::max)
    }

    pub fn json(&self) -> Value {
        let mut out = serde_json::Map::new();
        if let Some(d) = &self.drain {
            out.insert("drain".into(), d.json());
        }
        if let Some(h) = &self.hot_key {
            out.insert("hot_key".into(), h.json());
        }
        if let Some(l) = &self.latency {
            out.insert("latency".into(), l.json());
        }
        if let Some(i) = &self.idle {
            out.insert(
                "idle".into(),
                json!({
                    "cpu_s": round(i.cpu_s, 3),
                    "statements_per_s": round(i.statements_per_s, 2),
                    "statements_per_poll_interval": round(i.statements_per_poll_interval, 2),
                    "poll_interval_s": i.poll_interval_s,
                    "statements": i.statements,
                    "round_trips_per_s": round(i.round_trips_per_s, 2),
                    "database_transactions_per_s": round(i.database_transactions_per_s, 2),
                    "seconds": round(i.seconds, 2),
                    "counting": "statements: exact, a TCP proxy in front of PostgreSQL counts the relay's Query and Execute messages; \
                                 round trips: Query and Sync messages (sqlx's pool pings on acquire and on release); \
                                 database_transactions_per_s: pg_stat_database xact_commit + xact_rollback of the bench database, \
                                 which also counts autovacuum and lags up to a second",
                    "peak_rss_mib": round(i.usage.peak_rss_mib, 1),
                }),
            );
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
            "{:<9} {:<44} {:>10} {:>10} {:>6}   {}\n",
            "scenario", "figure", "relay", "baseline", "ratio", "target"
        );
        let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
        if let Some(d) = &self.drain {
            s += &format!(
                "{:<9} {:<44} {:>10.0} {:>10.0} {:>6.2}   >= 0.85 {}\n",
                "drain",
                format!("events/s, {} rows, {} keys", d.rows, d.keys),
                d.relay_events_per_s(),
                d.raw_events_per_s(),
                d.ratio(),
                verdict(d.ratio() >= 0.85)
            );
            s += &format!(
                "{:<9} {:<44} {:>10.1} {:>10.1} {:>6.2}\n",
                "",
                "  CPU us/event on the delivery path",
                d.path_cpu_us(&d.relay),
                d.path_cpu_us(&d.raw),
                d.cpu_ratio()
            );
        }
        if let Some(h) = &self.hot_key {
            s += &format!(
                "{:<9} {:<44} {:>10.0} {:>10.0} {:>6.2}   >= 0.80 {}\n",
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
                "{:<9} {:<44} {:>29}   p99 <= 10 ms {}\n",
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
                "{:<9} {:<44} {:>29}   <= 1 per poll {}\n",
                "idle",
                format!("{:.0} s: relay CPU s, statements/s", i.seconds),
                format!("{:.3} s, {:.2}/s", i.cpu_s, i.statements_per_s),
                verdict(i.statements_per_poll_interval <= 1.0 + 1e-9)
            );
        }
        if let Some(h) = &self.history {
            s += &format!(
                "{:<9} {:<44} {:>10.0} {:>10.0} {:>6.2}   >= 0.90 {}\n",
                "history",
                format!("events/s with {} published rows (vs empty)", h.history_rows),
                h.history_events_per_s(),
                h.empty_events_per_s(),
                h.ratio(),
                verdict(h.ratio() >= 0.9)
            );
        }
        if let Some(p) = &self.pg_only {
            s += &format!(
                "{:<9} {:<44} {:>10.0}\n",
                "pg-only",
                format!("rows/s fetch + mark, {} rows, no broker", p.rows),
                p.rows_per_s()
            );
        }
        let noise = self.other_cpu_share();
        if let Some(peak) = self.peak_rss_mib() {
            s += &format!(
                "{:<9} {:<44} {:>10.1}   {:>20}   <= 64 MiB {}\n",
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
