//! `outbox-relay-bench`: measures the real relay binary against the broker's own limit
//! (raw lapin publishing) in the same run, plus latency, idle cost, history, the
//! PostgreSQL-only ceiling, two production shapes (many tables, a held key), delete mode
//! against mark mode, scale-out (several relays on one table, and their failover), and the
//! producers' side (their commits into the outbox against a plain table). Thin: parses
//! arguments, sets up and tears down the bench's own database, exchange and queue, runs the
//! scenarios and prints the report.

mod consumer;
mod env;
mod leases;
mod otlp_sink;
mod process;
mod producers;
mod raw;
mod report;
mod resources;
mod scale;
mod scenarios;
mod shapes;
mod workload;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::env::BenchEnv;
use crate::report::{Report, Situation};

const AFTER_HELP: &str = "\
Scenarios (each measures the relay and its baseline in the same run, alternating rounds):
  drain    backlog of --events rows (1 KiB JSON payloads, 1,000 ordering keys) drained to a
           durable queue with a live consumer; time from relay start until every row is marked
           published and received. Baseline: the same messages published from memory with lapin
           (persistent, mandatory, message_id, headers, confirms, same in-flight window).
           Also PostgreSQL's CPU per event drained (every postgres process on the machine;
           target <= 10 us).
  hot-key  --events/10 rows (at least 2,000) on ONE ordering key. Baseline: raw publishing with
           one message in flight.
  latency  --rate events/s (default 1,000) offered by --producers connections (single-row
           transactions) for --latency-secs; commit->consumer latency p50/p95/p99/max.
  idle     relay with nothing to do for --idle-secs: its CPU seconds and the statements it sends
           to PostgreSQL, counted exactly by a protocol-counting TCP proxy in front of the server.
  history  drain again with --history-rows already-published rows in the table (default
           10,000,000; --quick 10 x --events), alternating with drain on an empty table; ratio
           history / empty (target >= 0.95). The history is written once, set-based (INSERT ...
           SELECT generate_series in chunks of 50,000 rows, through the order-guard trigger like
           any producer's rows; small payloads, about 200 bytes a row: the relay never reads a
           published row's payload), then VACUUM ANALYZE, before the first timed round.
  delete-mode
           drain of --events rows with on_published = \"delete\" (each confirmed row deleted)
           against the same drain with on_published = \"mark\", alternating; ratio delete / mark,
           and the PostgreSQL CPU per event of each.
  tracing  drain of --events rows with the relay exporting a span per row over OTLP/HTTP
           ([telemetry] otlp_endpoint, to a collector in the bench that decodes and counts the
           spans) and with export on to a collector that is down (nothing listens), against
           the same drain with export off, alternating; ratios on / off and down / off
           (target >= 0.9) and the spans the collector received.
  pg-only  the relay's own fetch + mark statements (library calls) on a backlog of --events rows,
           no broker: rows/s, i.e. the PostgreSQL ceiling.
  many-tables
           --tables outbox tables (tenants.t0 ..) in one relay, postgres.max_connections 4:
           the relay's PostgreSQL sessions (pg_stat_activity, application_name outbox-relay,
           sampled every 100 ms; target <= max_connections + 1) and AMQP connections
           (rabbitmqctl, by the relay's connection name; target 1), its statements per second
           idle for --idle-secs (counting proxy; target <= 1 per poll_interval in all), and the
           drain of --events rows spread evenly over the tables against the same drain on one
           table (target ratio >= 0.8). A drain that does not finish within 10 x the one-table
           time (30 s to 120 s) is reported as not delivered, with how far it got.
  held-key one key parked at the head of 10 x --events queued rows, then a drain of --events
           rows of 1,000 other keys, against the same drain without the held key (target ratio
           >= 0.9); again with the head waiting for a 1 h retry delay instead of parked. The
           head is parked by a routing key of 300 bytes (max_attempts 1), or refused by a
           missing exchange (retry delay 1 h); the queue is inserted after the relay recorded
           the head's failure and stopped, so with a schema that has held keys the queued rows
           start out held, as a producer's would. Same bound as many-tables.

  scale-out
           --events rows (1,000 keys) drained by 1, 2 and 3 relay processes on one table at
           once, with relay.channels 1 and 4 (--quick: 1 and 3 relays with 1 channel, 1 relay
           with 4), each against raw publishing of the same backlog run just before it; the
           baseline is the median of those raw runs. The relays start on the empty table and the
           clock starts when the backlog, inserted in one transaction, commits, once their
           /ready answers 200 and the lease rows show them sharing every partition fairly.
           Relays run with heartbeat 1 s, lease 6 s, confirm_timeout 2 s, statement_timeout 2 s.
           Then the failover: 3 relays under 500 rows/s (single-row transactions from 2
           connections; 1 row in 5 on a probe key); the owner of the probe key's partition (from
           outbox_relay.leases, mapped to a process by its log line \"partition leases: registered
           member=N\") is SIGKILLed (then replaced by a new relay), later the owner at that time
           is SIGSTOPped until the others hold its partitions and SIGCONTed (--rounds times each).
           Figures: fault -> the first arrival of a row of that partition inserted after the
           fault, and the gap from its last arrival before; every inserted row must arrive.
  producers
           what the outbox costs the application: 1, 4, 16 and 64 producer connections
           (--quick: 4 and 16) commit single-row inserts as fast as they can for
           --producers-secs (default 4, --quick 3) into the outbox table: (a) with the relay
           stopped (its triggers alone), (b) with the relay draining it to the live consumer,
           (c) the same with notify = false (no NOTIFY trigger, the relay polls). Baseline: the
           same inserts into a plain copy of the table in the same database (LIKE ...
           INCLUDING DEFAULTS INCLUDING INDEXES, its own identity, no triggers), in the run
           just before and just after each outbox run. Figures per producer count: commits/s,
           mean and p99 commit latency (client-side), ratio outbox / plain, CPU per commit of
           PostgreSQL, the relay, RabbitMQ and the bench (producers and consumer), and how far
           the relay was behind when the producers stopped. Targets at 4 and 16 producers:
           >= 0.9 with the relay stopped, >= 0.6 with it draining; 1, 64 and notify off
           reported only. Producer connections that do not fit PostgreSQL's max_connections
           (beside the open sessions, a relay's and the bench's) are capped, and the cap is
           printed. --scenario all runs a short form: 4 and 16 producers, (a) and (b) only, 3 s
           runs (--quick 2 s).

Defaults: full run = 100,000 events, 10,000,000 history rows, 2 rounds, 20 s latency, 10 s idle,
200 tables. --quick = 10,000 events, 100,000 history rows, 1 round, 5 s latency, 3 s idle, 50
tables (about 3 minutes, for CI).

The relay binary is taken from the bench's own directory (build both with
`cargo build --release --workspace --bins`; `cargo run --release -p outbox-relay-bench` builds
it there first). The bench creates a database, an exchange and a durable queue with unique
names and removes them at the end, also after an error or Ctrl-C. Targets are printed next to
the figures for information only; the exit code does not depend on them.";

/// Benchmarks outbox-relay against raw publishing to the same RabbitMQ, in one run.
#[derive(Debug, Parser)]
#[command(name = "outbox-relay-bench", version, after_long_help = AFTER_HELP)]
struct Args {
    /// PostgreSQL server (any database on it; the bench creates its own).
    #[arg(
        long,
        env = "OBR_BENCH_PG_URL",
        hide_env_values = true,
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pg_url: String,
    /// RabbitMQ server (the vhost in the URL is used).
    #[arg(
        long,
        env = "OBR_BENCH_AMQP_URL",
        hide_env_values = true,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
    /// Which scenario to run.
    #[arg(long, value_enum, default_value = "all")]
    scenario: Scenario,
    /// Rows of the drain backlog; the other scenarios scale with it (hot-key /10, history x10).
    #[arg(long, value_name = "N")]
    events: Option<u64>,
    /// Published rows in the table of the history scenario (default 10,000,000; --quick 10 x
    /// --events).
    #[arg(long, value_name = "N")]
    history_rows: Option<u64>,
    /// Small sizes and short durations for CI (about 3 minutes).
    #[arg(long)]
    quick: bool,
    /// Relay and baseline runs per scenario, alternating (default 2, --quick 1); medians are reported.
    #[arg(long, value_name = "N")]
    rounds: Option<u32>,
    /// Offered load of the latency scenario, events per second.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Producer connections of the latency scenario.
    #[arg(long, default_value_t = 4)]
    producers: u32,
    /// Duration of the latency scenario in seconds (default 20, --quick 5).
    #[arg(long, value_name = "SECONDS")]
    latency_secs: Option<u64>,
    /// Length of each timed run of the producers scenario in seconds (default 4, --quick 3;
    /// in --scenario all 3, --quick 2).
    #[arg(long, value_name = "SECONDS")]
    producers_secs: Option<u64>,
    /// Duration of the idle scenario in seconds (default 10, --quick 3).
    #[arg(long, value_name = "SECONDS")]
    idle_secs: Option<u64>,
    /// Outbox tables of the many-tables scenario (default 200, --quick 50).
    #[arg(long, value_name = "N")]
    tables: Option<u32>,
    /// relay.batch_size given to the relay (and to pg-only).
    #[arg(long, default_value_t = 1000)]
    batch_size: u32,
    /// relay.max_in_flight given to the relay; also the raw baseline's confirm window in drain.
    #[arg(long, default_value_t = 1000)]
    max_in_flight: usize,
    /// The relay binary (default: `outbox-relay` next to this executable).
    #[arg(long, value_name = "FILE")]
    relay_bin: Option<PathBuf>,
    /// Keep the relay configs and logs (a directory in $TMPDIR named after the run) also after a
    /// successful run; they are always kept after a failed one.
    #[arg(long)]
    keep_logs: bool,
    /// Also write the figures as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Drain,
    HotKey,
    Latency,
    Idle,
    History,
    PgOnly,
    ManyTables,
    HeldKey,
    DeleteMode,
    Tracing,
    ScaleOut,
    Producers,
    All,
}

/// Sizes and durations after --quick, --events and the explicit flags.
#[derive(Debug, Clone)]
pub struct Plan {
    pub quick: bool,
    pub rounds: u32,
    pub drain_rows: u64,
    pub hot_key_rows: u64,
    pub history_rows: u64,
    pub ordering_keys: u64,
    /// Tables of the many-tables scenario.
    pub tables: u32,
    /// Rows queued behind the held key of the held-key scenario.
    pub held_queue_rows: u64,
    pub rate: u32,
    pub producers: u32,
    pub latency: Duration,
    pub idle: Duration,
    pub batch_size: u32,
    pub max_in_flight: usize,
    pub producer_runs: ProducersPlan,
}

/// The producers scenario's shape: which producer counts and situations, each run how long.
#[derive(Debug, Clone)]
pub struct ProducersPlan {
    pub counts: Vec<u32>,
    pub situations: Vec<Situation>,
    pub run: Duration,
    /// The short form of `--scenario all`.
    pub short: bool,
}

impl ProducersPlan {
    fn from(args: &Args) -> ProducersPlan {
        let short = args.scenario == Scenario::All;
        let secs = match (short, args.quick) {
            (false, false) => 4,
            (false, true) | (true, false) => 3,
            (true, true) => 2,
        };
        ProducersPlan {
            counts: if short || args.quick {
                vec![4, 16]
            } else {
                vec![1, 4, 16, 64]
            },
            situations: if short {
                vec![Situation::RelayStopped, Situation::RelayDraining]
            } else {
                Situation::ALL.to_vec()
            },
            run: Duration::from_secs(args.producers_secs.unwrap_or(secs).max(1)),
            short,
        }
    }
}

impl Plan {
    fn from(args: &Args) -> Plan {
        let events = args
            .events
            .unwrap_or(if args.quick { 10_000 } else { 100_000 })
            .max(1);
        Plan {
            quick: args.quick,
            rounds: args.rounds.unwrap_or(if args.quick { 1 } else { 2 }).max(1),
            drain_rows: events,
            hot_key_rows: (events / 10).max(2_000),
            history_rows: args.history_rows.unwrap_or(if args.quick {
                events * 10
            } else {
                10_000_000
            }),
            ordering_keys: 1_000,
            tables: args
                .tables
                .unwrap_or(if args.quick { 50 } else { 200 })
                .clamp(1, outbox_relay::config::MAX_TABLES as u32),
            held_queue_rows: events * 10,
            rate: args.rate.max(1),
            producers: args.producers.max(1),
            latency: Duration::from_secs(
                args.latency_secs
                    .unwrap_or(if args.quick { 5 } else { 20 })
                    .max(1),
            ),
            idle: Duration::from_secs(
                args.idle_secs
                    .unwrap_or(if args.quick { 3 } else { 10 })
                    .max(1),
            ),
            batch_size: args.batch_size.max(1),
            max_in_flight: args.max_in_flight.max(1),
            producer_runs: ProducersPlan::from(args),
        }
    }
}

fn relay_binary(args: &Args) -> anyhow::Result<PathBuf> {
    let path = match &args.relay_bin {
        Some(p) => p.clone(),
        None => outbox_relay_testkit::relay::beside_tool(env!("CARGO_PKG_NAME"))?,
    };
    if !path.is_file() {
        anyhow::bail!(
            "the relay binary {} is missing: build it next to the bench with `cargo build --release --workspace --bins` \
             (or pass --relay-bin FILE)",
            path.display()
        );
    }
    Ok(path)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("outbox-relay-bench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outbox-relay-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let relay_bin = relay_binary(&args)?;
    let plan = Plan::from(&args);
    let mut env = BenchEnv::new(&args.pg_url, &args.amqp_url, relay_bin)?;
    eprintln!(
        "outbox-relay-bench: PostgreSQL {}, RabbitMQ {}, database/exchange/queue {}",
        env.pg_redacted(),
        env.amqp_redacted(),
        env.id
    );
    let outcome = tokio::select! {
        outcome = measure(&mut env, &plan, args.scenario) => outcome,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    let kept_logs = outcome.is_err() || args.keep_logs;
    env.teardown(kept_logs).await;
    let report = outcome?;
    print!("{}", report.table());
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report.json())?;
        std::fs::write(path, text + "\n")
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
        eprintln!("outbox-relay-bench: figures written to {}", path.display());
    }
    Ok(())
}

async fn measure(env: &mut BenchEnv, plan: &Plan, scenario: Scenario) -> anyhow::Result<Report> {
    env.setup().await?;
    let mut report = Report::new(plan.clone(), env.machine().await);
    let wants = |s: Scenario| scenario == Scenario::All || scenario == s;
    if wants(Scenario::Drain) {
        report.drain = Some(scenarios::drain(env, plan).await?);
    }
    if wants(Scenario::HotKey) {
        report.hot_key = Some(scenarios::hot_key(env, plan).await?);
    }
    if wants(Scenario::Latency) {
        report.latency = Some(scenarios::latency(env, plan).await?);
    }
    if wants(Scenario::Idle) {
        report.idle = Some(scenarios::idle(env, plan).await?);
    }
    if wants(Scenario::History) {
        report.history = Some(scenarios::history(env, plan).await?);
    }
    if wants(Scenario::PgOnly) {
        report.pg_only = Some(scenarios::pg_only(env, plan).await?);
    }
    if wants(Scenario::ManyTables) {
        report.many_tables = Some(shapes::many_tables(env, plan).await?);
    }
    if wants(Scenario::HeldKey) {
        report.held_key = Some(shapes::held_key(env, plan).await?);
    }
    if wants(Scenario::DeleteMode) {
        report.delete_mode = Some(scenarios::delete_mode(env, plan).await?);
    }
    if wants(Scenario::Tracing) {
        report.tracing = Some(scenarios::tracing(env, plan).await?);
    }
    if wants(Scenario::ScaleOut) {
        report.scale_out = Some(scale::scale_out(env, plan).await?);
    }
    if wants(Scenario::Producers) {
        report.producers = Some(producers::producers(env, plan).await?);
    }
    Ok(report)
}
