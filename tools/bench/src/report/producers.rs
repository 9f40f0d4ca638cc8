//! The producers scenario's figures: commits per second and commit latency of the outbox
//! against its plain copy, per producer count and situation of the relay, the CPU split per
//! commit, the table rows with the targets and the JSON object. Only arithmetic on
//! what the scenario measured; measures nothing itself.

use serde_json::{json, Value};

use super::{log_json, log_rows, median, percentile_ms, ratio, round};
use crate::process::{CpuSplit, LogProblems, Usage};

/// Where the relay is while the producers commit into its outbox table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Situation {
    /// Not running: the table's triggers alone (the order guard and the NOTIFY trigger).
    RelayStopped,
    /// Running, draining the table to the live consumer as the rows come.
    RelayDraining,
    /// Running and draining with `notify = false`: no NOTIFY trigger, the relay polls.
    DrainingWithoutNotify,
}

impl Situation {
    pub const ALL: [Situation; 3] = [
        Situation::RelayStopped,
        Situation::RelayDraining,
        Situation::DrainingWithoutNotify,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Situation::RelayStopped => "relay stopped",
            Situation::RelayDraining => "relay draining",
            Situation::DrainingWithoutNotify => "relay draining, notify off",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Situation::RelayStopped => "relay_stopped",
            Situation::RelayDraining => "relay_draining",
            Situation::DrainingWithoutNotify => "relay_draining_notify_off",
        }
    }

    /// The relay runs during the outbox runs.
    pub fn relay_runs(self) -> bool {
        self != Situation::RelayStopped
    }

    /// The outbox table has its NOTIFY trigger and the relay listens.
    pub fn notify(self) -> bool {
        self != Situation::DrainingWithoutNotify
    }

    /// The least outbox/plain ratio issue 23 asks for, at [`TARGET_PRODUCERS`] only. Without
    /// NOTIFY there is none: it is reported beside the real situation.
    fn target(self) -> Option<f64> {
        match self {
            Situation::RelayStopped => Some(0.9),
            Situation::RelayDraining => Some(0.6),
            Situation::DrainingWithoutNotify => None,
        }
    }
}

/// The producer counts the targets are set at; the others are reported only.
const TARGET_PRODUCERS: [u32; 2] = [4, 16];

/// Commit latency of one run, client-side: the INSERT sent -> its commit acknowledged.
#[derive(Debug, Clone, Copy)]
pub struct CommitTimes {
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl CommitTimes {
    /// From every commit's latency in microseconds.
    pub fn of(mut micros: Vec<u64>) -> CommitTimes {
        micros.sort_unstable();
        let mean_ms = if micros.is_empty() {
            0.0
        } else {
            micros.iter().sum::<u64>() as f64 / micros.len() as f64 / 1000.0
        };
        CommitTimes {
            mean_ms,
            p50_ms: percentile_ms(&micros, 50.0),
            p99_ms: percentile_ms(&micros, 99.0),
            max_ms: percentile_ms(&micros, 100.0),
        }
    }
}

/// One timed run of the producers, into the outbox or into the plain copy.
#[derive(Debug, Clone)]
pub struct ProducerRun {
    pub commits: u64,
    /// From the producers' common start until the last one's last commit.
    pub seconds: f64,
    pub latency: CommitTimes,
    pub cpu_split: CpuSplit,
    /// Fraction of the machine's CPUs busy during the run.
    pub host_cpu_busy: Option<f64>,
    /// What the relay did, when it ran.
    pub relay: Option<RelayKeptUp>,
}

impl ProducerRun {
    pub fn commits_per_s(&self) -> f64 {
        ratio(self.commits as f64, self.seconds)
    }

    fn cpu_us(&self, kind: fn(&CpuSplit) -> f64) -> f64 {
        kind(&self.cpu_split) * 1e6 / self.commits.max(1) as f64
    }
}

/// How far the relay kept up with the producers of one run.
#[derive(Debug, Clone, Copy)]
pub struct RelayKeptUp {
    /// Rows not published yet when the producers stopped.
    pub behind: i64,
    /// The producers stopped -> every row published; `None` when not within the bound.
    pub caught_up_s: Option<f64>,
    /// The relay process over its whole life (start, warm-up, run, catch-up).
    pub usage: Usage,
}

/// One situation at one producer count: its outbox runs, and the plain runs just before and
/// just after each (the plain run between two situations counts for both).
#[derive(Debug, Clone)]
pub struct SituationRuns {
    pub situation: Situation,
    pub outbox: Vec<ProducerRun>,
    pub plain: Vec<ProducerRun>,
}

/// Every situation at one producer count.
#[derive(Debug, Clone)]
pub struct ProducerCount {
    /// The count asked for, and the connections used (fewer when max_connections is short).
    pub asked: u32,
    pub producers: u32,
    pub situations: Vec<SituationRuns>,
}

#[derive(Debug, Clone)]
pub struct Producers {
    pub run_s: f64,
    /// The short form of `--scenario all` (fewer counts and situations).
    pub short: bool,
    pub max_connections: i64,
    /// The statement every producer commits, on the outbox (the plain copy's is the same).
    pub insert: String,
    pub counts: Vec<ProducerCount>,
    pub log: LogProblems,
}

fn commits_per_s(runs: &[ProducerRun]) -> f64 {
    median(runs.iter().map(ProducerRun::commits_per_s))
}

/// Medians over runs of one latency figure.
fn latency(runs: &[ProducerRun], figure: fn(&CommitTimes) -> f64) -> f64 {
    median(runs.iter().map(|r| figure(&r.latency)))
}

fn cpu_us(runs: &[ProducerRun], kind: fn(&CpuSplit) -> f64) -> f64 {
    median(runs.iter().map(|r| r.cpu_us(kind)))
}

impl SituationRuns {
    pub fn ratio(&self) -> f64 {
        ratio(commits_per_s(&self.outbox), commits_per_s(&self.plain))
    }

    /// The target at this producer count, if any.
    fn target(&self, producers: u32) -> Option<f64> {
        self.situation
            .target()
            .filter(|_| TARGET_PRODUCERS.contains(&producers))
    }

    fn runs_json(runs: &[ProducerRun]) -> Value {
        Value::Array(
            runs.iter()
                .map(|r| {
                    json!({
                        "commits": r.commits,
                        "seconds": round(r.seconds, 3),
                        "commits_per_s": round(r.commits_per_s(), 1),
                        "commit_ms": {
                            "mean": round(r.latency.mean_ms, 3),
                            "p50": round(r.latency.p50_ms, 3),
                            "p99": round(r.latency.p99_ms, 3),
                            "max": round(r.latency.max_ms, 3),
                        },
                        "cpu_s_by_process": {
                            "relay": round(r.cpu_split.relay_s, 2),
                            "bench": round(r.cpu_split.bench_s, 2),
                            "rabbitmq": round(r.cpu_split.rabbitmq_s, 2),
                            "postgresql": round(r.cpu_split.postgresql_s, 2),
                            "other": round(r.cpu_split.other_s, 2),
                        },
                        "host_cpu_busy": r.host_cpu_busy.map(|b| round(b, 2)),
                        "relay": r.relay.map(|k| json!({
                            "rows_behind_at_stop": k.behind,
                            "caught_up_s": k.caught_up_s.map(|s| round(s, 3)),
                            "cpu_s": round(k.usage.cpu_s, 2),
                            "peak_rss_mib": round(k.usage.peak_rss_mib, 1),
                        })),
                    })
                })
                .collect(),
        )
    }

    fn json(&self, producers: u32) -> Value {
        let side = |runs: &[ProducerRun]| {
            json!({
                "commits_per_s": round(commits_per_s(runs), 1),
                "commit_ms_mean": round(latency(runs, |l| l.mean_ms), 3),
                "commit_ms_p99": round(latency(runs, |l| l.p99_ms), 3),
                "cpu_us_per_commit": {
                    "postgresql": round(cpu_us(runs, |c| c.postgresql_s), 1),
                    "relay": round(cpu_us(runs, |c| c.relay_s), 1),
                    "rabbitmq": round(cpu_us(runs, |c| c.rabbitmq_s), 1),
                    "bench": round(cpu_us(runs, |c| c.bench_s), 1),
                    "other": round(cpu_us(runs, |c| c.other_s), 1),
                },
            })
        };
        let target = self.target(producers);
        json!({
            "ratio": round(self.ratio(), 3),
            "ratio_target_min": target,
            "target_met": target.map(|t| self.ratio() >= t),
            "outbox": side(&self.outbox),
            "plain": side(&self.plain),
            "outbox_runs": Self::runs_json(&self.outbox),
            "plain_runs": Self::runs_json(&self.plain),
        })
    }

    fn table(&self, producers: u32, verdict: &dyn Fn(bool) -> &'static str) -> String {
        let (outbox, plain) = (&self.outbox, &self.plain);
        let target = self.target(producers).map_or(String::new(), |t| {
            format!("   >= {t:.2} {}", verdict(self.ratio() >= t))
        });
        let mut s = format!(
            "{:<11} {:<44} {:>10.0} {:>10.0} {:>6.2}{target}\n",
            "",
            format!("    {}: commits/s", self.situation.name()),
            commits_per_s(outbox),
            commits_per_s(plain),
            self.ratio(),
        );
        let ms = |runs: &[ProducerRun]| {
            format!(
                "{:.2}/{:.1}",
                latency(runs, |l| l.mean_ms),
                latency(runs, |l| l.p99_ms)
            )
        };
        s += &format!(
            "{:<11} {:<44} {:>10} {:>10}\n",
            "",
            "      commit ms, mean/p99",
            ms(outbox),
            ms(plain)
        );
        let us = |runs: &[ProducerRun], kind: fn(&CpuSplit) -> f64| cpu_us(runs, kind);
        let busy: Vec<f64> = outbox.iter().filter_map(|r| r.host_cpu_busy).collect();
        s += &format!(
            "{:<11}       CPU us/commit, outbox (plain): PostgreSQL {:.0} ({:.0}), relay {:.0}, RabbitMQ {:.0} ({:.0}), bench {:.0} ({:.0}); machine {}\n",
            "",
            us(outbox, |c| c.postgresql_s),
            us(plain, |c| c.postgresql_s),
            us(outbox, |c| c.relay_s),
            us(outbox, |c| c.rabbitmq_s),
            us(plain, |c| c.rabbitmq_s),
            us(outbox, |c| c.bench_s),
            us(plain, |c| c.bench_s),
            if busy.is_empty() {
                "?".to_owned()
            } else {
                format!("{:.0}% busy", median(busy) * 100.0)
            }
        );
        let kept: Vec<RelayKeptUp> = outbox.iter().filter_map(|r| r.relay).collect();
        if !kept.is_empty() {
            let behind: Vec<String> = kept.iter().map(|k| k.behind.to_string()).collect();
            let caught: Vec<String> = kept
                .iter()
                .map(|k| {
                    k.caught_up_s
                        .map_or("not within 60 s".to_owned(), |c| format!("{c:.2} s"))
                })
                .collect();
            s += &format!(
                "{:<11}       relay: rows behind when the producers stopped {}; all published after {}\n",
                "",
                behind.join(", "),
                caught.join(", ")
            );
        }
        s
    }
}

impl Producers {
    /// Every outbox and plain run, for the run's CPU noise.
    pub fn runs(&self) -> impl Iterator<Item = &ProducerRun> {
        self.counts
            .iter()
            .flat_map(|c| &c.situations)
            .flat_map(|s| s.outbox.iter().chain(&s.plain))
    }

    /// The largest VmHWM of the relays that ran.
    pub fn peak_rss_mib(&self) -> Option<f64> {
        self.runs()
            .filter_map(|r| r.relay.map(|k| k.usage.peak_rss_mib))
            .reduce(f64::max)
    }

    pub fn json(&self) -> Value {
        json!({
            "run_s": self.run_s,
            "short_form": self.short,
            "max_connections": self.max_connections,
            "insert": self.insert,
            "baseline": "the same inserts into a plain copy of the table (LIKE ... INCLUDING DEFAULTS INCLUDING INDEXES, its own identity, no triggers), \
                         in the runs just before and just after each outbox run; commit latency measured client-side around each autocommit INSERT",
            "targets": {
                "at_producers": TARGET_PRODUCERS,
                "relay_stopped_ratio_min": Situation::RelayStopped.target(),
                "relay_draining_ratio_min": Situation::RelayDraining.target(),
            },
            "counts": self.counts.iter().map(|c| {
                let mut count = serde_json::Map::new();
                count.insert("producers".into(), json!(c.producers));
                count.insert("asked".into(), json!(c.asked));
                for s in &c.situations {
                    count.insert(s.situation.key().into(), s.json(c.producers));
                }
                Value::Object(count)
            }).collect::<Vec<_>>(),
            "relay_log": log_json(&self.log),
        })
    }

    pub fn table(&self, verdict: &dyn Fn(bool) -> &'static str) -> String {
        let mut s = format!(
            "{:<11} {}\n",
            "producers",
            format_args!(
                "single-row commits, {:.0} s runs{}, outbox (relay) vs plain copy (baseline)",
                self.run_s,
                if self.short { ", short form" } else { "" }
            )
        );
        for count in &self.counts {
            let capped = if count.producers < count.asked {
                format!(
                    " (asked {}: max_connections {} leaves room for {})",
                    count.asked, self.max_connections, count.producers
                )
            } else {
                String::new()
            };
            s += &format!(
                "{:<11}   {} producer connection{}{capped}\n",
                "",
                count.producers,
                if count.producers == 1 { "" } else { "s" }
            );
            for situation in &count.situations {
                s += &situation.table(count.producers, verdict);
            }
        }
        s + &log_rows(&self.log)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_times_are_the_mean_and_nearest_rank_percentiles_of_every_commit() {
        let times = CommitTimes::of((1..=100).rev().map(|ms| ms * 1000).collect());
        assert_eq!(times.mean_ms, 50.5);
        assert_eq!(times.p50_ms, 50.0);
        assert_eq!(times.p99_ms, 99.0);
        assert_eq!(times.max_ms, 100.0);
    }

    #[test]
    fn targets_apply_at_4_and_16_producers_and_not_without_notify() {
        let at = |situation: Situation, producers: u32| {
            SituationRuns {
                situation,
                outbox: Vec::new(),
                plain: Vec::new(),
            }
            .target(producers)
        };
        assert_eq!(at(Situation::RelayStopped, 4), Some(0.9));
        assert_eq!(at(Situation::RelayDraining, 16), Some(0.6));
        assert_eq!(at(Situation::RelayDraining, 64), None);
        assert_eq!(at(Situation::RelayStopped, 1), None);
        assert_eq!(at(Situation::DrainingWithoutNotify, 4), None);
    }
}
