//! Command-line interface: `run`, `migrate`, `status`, `check-config`, `retry`, `discard`,
//! `replay`. Parses arguments and prints results; the work itself lives in the other modules.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::config::{
    ConfigError, OnExhausted, OnPublished, OutboxSettings, Settings, TableName, EX_CONFIG,
};
use crate::publisher::Broker;
use crate::shutdown::Shutdown;
use crate::store::{
    AdoptFrom, DiscardSelector, MappingError, Published, RetrySelector, RowFate, Store,
    TableLeases, TableSql, TableStatus,
};

/// Publishes PostgreSQL outbox rows to RabbitMQ, in order per key, at least once.
#[derive(Debug, Parser)]
#[command(name = "outbox-relay", version)]
pub struct Cli {
    /// The TOML config file.
    #[arg(
        long,
        short,
        global = true,
        env = "OUTBOX_RELAY_CONFIG",
        default_value = "/etc/outbox-relay/outbox-relay.toml"
    )]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay until SIGTERM or SIGINT.
    #[command(
        after_help = "Example:\n  outbox-relay --config /etc/outbox-relay/outbox-relay.toml run\n\n\
        Under systemd: systemctl enable --now outbox-relay (the unit runs this command)."
    )]
    Run,
    /// Create missing outbox tables and upgrade the relay's own objects; with --adopt, add
    /// what the relay needs to existing tables with mapped columns.
    #[command(after_help = "Examples:\n  outbox-relay migrate\n  \
        outbox-relay migrate --adopt --from now --dry-run")]
    Migrate(MigrateArgs),
    /// Print per table: pending rows (due, waiting for a retry, held behind their key), parked,
    /// discarded and published rows and the oldest pending age; the partition leases: live
    /// members, the partitions each owns, and the unowned ones.
    Status(StatusArgs),
    /// Validate the config file and reach both servers.
    #[command(after_help = "Example:\n  outbox-relay --config ./relay.toml check-config")]
    CheckConfig,
    /// Release parked rows so they are published again, in order.
    Retry(RetryArgs),
    /// End parked rows for good: kept as discarded with the reason and the time, never
    /// published again (not by the relay, not by replay), and their ordering key moves on.
    Discard(DiscardArgs),
    /// Publish a range of published rows again (same message_id, header x-outbox-replay).
    Replay(crate::replay::ReplayArgs),
    /// Print the completion script for a shell (the Debian package installs bash, zsh and fish).
    #[command(
        after_help = "Example:\n  outbox-relay completions bash > /etc/bash_completion.d/outbox-relay"
    )]
    Completions {
        /// The shell: bash, zsh, fish, elvish or powershell.
        shell: crate::generate::Shell,
    },
    /// Write the man pages (outbox-relay.1 and one per command) into a directory.
    #[command(after_help = "Example:\n  outbox-relay man --out-dir /usr/local/share/man/man1")]
    Man {
        /// The directory to write them into (it must exist).
        #[arg(long, value_name = "DIR")]
        out_dir: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Adopt the tables with mapped columns ([outbox.columns], layout = "debezium"): add the
    /// relay's state columns, the ordering sequence, the indexes and the order guard.
    #[arg(long)]
    pub adopt: bool,
    /// Which rows of a table adopted for the first time are published: only those inserted
    /// from now on, or the rows already there too (first).
    #[arg(long, value_enum, requires = "adopt")]
    pub from: Option<FromRows>,
    /// Print what --adopt would do, and what each step locks; change nothing.
    #[arg(long, requires = "adopt")]
    pub dry_run: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum FromRows {
    Now,
    Start,
}

#[derive(Debug, Args)]
#[command(after_help = STATUS_EXAMPLES)]
pub struct StatusArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also list up to N parked rows with their last error, and up to N discarded rows with
    /// their reason.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub parked: i64,
}

const STATUS_EXAMPLES: &str = "\
Columns: PENDING = DUE + RETRYING (waiting for their retry delay after a failed attempt) + HELD
(waiting behind a failed or parked row of their ordering key). PARKED rows wait for `retry` or
`discard`; DISCARDED rows were ended by `discard`. PUBLISHED with ~ is an estimate.

Examples:
  outbox-relay status
  outbox-relay status --parked 20      # also the parked rows' errors and the discarded rows
  outbox-relay status --json | jq '.[] | {table, pending, held, parked, discarded}'";

#[derive(Debug, Args)]
#[command(
    group(clap::ArgGroup::new("which").required(true).args(["id", "key", "all"])),
    after_help = RETRY_EXAMPLES
)]
pub struct RetryArgs {
    /// Release the parked row with this id.
    #[arg(long)]
    pub id: Option<i64>,
    /// Release every parked row of this ordering key.
    #[arg(long)]
    pub key: Option<String>,
    /// Release every parked row.
    #[arg(long)]
    pub all: bool,
    /// Only this table (`schema.table`); required with --id when several tables are configured.
    #[arg(long)]
    pub table: Option<String>,
}

const RETRY_EXAMPLES: &str = "\
Prints each table's released rows; exits 1 when no parked row matched, saying why (no such row,
not parked, already published, discarded).

Examples:
  outbox-relay status --parked 20                  # which rows are parked, and why
  outbox-relay retry --id 4182                     # one row (--table T with several tables)
  outbox-relay retry --key order-991 --table public.outbox
  outbox-relay retry --all";

#[derive(Debug, Args)]
#[command(
    group(clap::ArgGroup::new("which").required(true).args(["id", "key"])),
    after_help = DISCARD_EXAMPLES
)]
pub struct DiscardArgs {
    /// Discard the parked row with this id.
    #[arg(long)]
    pub id: Option<i64>,
    /// Discard every parked row of this ordering key.
    #[arg(long)]
    pub key: Option<String>,
    /// Why (kept with the row, shown by `status --parked`); required, not empty.
    #[arg(long, value_parser = parse_reason)]
    pub reason: String,
    /// The table (`schema.table`); required when several tables are configured.
    #[arg(long)]
    pub table: Option<String>,
}

const DISCARD_EXAMPLES: &str = "\
Only parked rows are discarded. A discarded row is recorded in outbox_relay.discarded (the
reason, the time, its state and the row itself) and leaves the table's pending rows the way a
published row does: marked published (its last_error says \"discarded: <reason>\"), or deleted
with on_published = \"delete\". The rows held behind it go out in order. Exits 1 when no
parked row matched, saying why.

Examples:
  outbox-relay status --parked 20
  outbox-relay discard --id 4182 --reason \"payload refused by billing, ticket OPS-12\"
  outbox-relay discard --table public.outbox --key order-991 --reason \"order deleted\"";

fn parse_reason(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        return Err("a reason is required: say why the row is discarded".into());
    }
    Ok(s.to_owned())
}

/// Runs the command and returns the process exit code: 0 success, 78 configuration error,
/// 70 `run` stopped after a panic, 2 a usage error, 1 any other failure. A command other than
/// `run` whose output's reader is gone does not return: SIGPIPE ends it (141 in the shell).
pub fn main(cli: Cli) -> i32 {
    if !matches!(cli.command, Command::Run) {
        end_quietly_when_the_reader_goes();
    }
    // Generated from the CLI definition alone: no config is read, no server reached.
    match &cli.command {
        Command::Completions { shell } => {
            crate::generate::completions(*shell, &mut std::io::stdout());
            return 0;
        }
        Command::Man { out_dir } => {
            return match crate::generate::man_pages(out_dir) {
                Ok(pages) => {
                    pages.iter().for_each(|p| println!("{}", p.display()));
                    0
                }
                Err(e) => {
                    crate::telemetry::print_to_stderr(&format!(
                        "outbox-relay: cannot write the man pages into {}: {e}",
                        out_dir.display()
                    ));
                    1
                }
            };
        }
        _ => {}
    }
    let settings = match Settings::load(&cli.config) {
        Ok(s) => s,
        Err(e) => return config_failure(&e),
    };
    crate::telemetry::init(&settings.log);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            crate::telemetry::print_to_stderr(&format!(
                "outbox-relay: cannot start the async runtime: {e}"
            ));
            return 1;
        }
    };
    let file = cli.config.clone();
    let outcome = runtime.block_on(async move {
        match cli.command {
            Command::Run => run(settings).await,
            Command::Migrate(args) => migrate(&settings, &args).await,
            Command::Status(args) => status(&settings, &args).await,
            Command::CheckConfig => check_config(&settings, &cli.config).await,
            Command::Retry(args) => retry(&settings, &args).await,
            Command::Discard(args) => discard(&settings, &args).await,
            Command::Replay(args) => crate::replay::main(&settings, &cli.config, &args).await,
            Command::Completions { .. } | Command::Man { .. } => Ok(()),
        }
    });
    match outcome {
        Ok(()) => 0,
        Err(e) => match (
            e.downcast_ref::<ConfigError>(),
            e.downcast_ref::<MappingError>(),
        ) {
            (Some(config_error), _) => config_failure(config_error),
            // A mapping that does not fit the real table is a configuration error too.
            (None, Some(mapping)) => {
                config_failure(&ConfigError::in_file(&file, mapping.problems.clone()))
            }
            (None, None) => {
                crate::telemetry::print_to_stderr(&format!("outbox-relay: {e:#}"));
                if e.is::<crate::service::Crashed>() {
                    return crate::service::EX_SOFTWARE;
                }
                e.downcast_ref::<crate::replay::ReplayError>()
                    .map_or(1, crate::replay::ReplayError::exit_code)
            }
        },
    }
}

/// A command other than `run` ends when the reader of its output goes away (`outbox-relay
/// status | head -1` once `head` has its line) the way `cat` and `grep` do: killed by SIGPIPE
/// at its next write to that pipe, quietly, exit status 141 in the shell. Rust's runtime
/// ignores SIGPIPE, which turns that write into an error that `println!` and `eprintln!`
/// panic on (an ERROR "panicked" line, exit 70). The default action covers every write the
/// commands make, their prints and their log lines alike. `run` keeps SIGPIPE ignored: a log
/// line that a closed pipe refuses is dropped and counted (`crate::telemetry`), and the relay
/// goes on.
fn end_quietly_when_the_reader_goes() {
    // SAFETY: sets one signal's disposition back to the kernel's default (no handler of ours
    // runs); called before this process starts any thread, and tokio never handles SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn config_failure(e: &ConfigError) -> i32 {
    crate::telemetry::print_to_stderr(&format!("outbox-relay: {e}"));
    EX_CONFIG
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    check_mappings_at_start(&settings).await?;
    let shutdown = Shutdown::new();
    shutdown
        .on_signals(settings.relay.shutdown_timeout)
        .context("installing signal handlers")?;
    if let Some(url) = &settings.telemetry.traces_url {
        crate::telemetry::otlp::start(url)?;
    }
    let outcome = crate::service::run(settings, shutdown).await;
    // The relays have settled: their last spans are queued. Sent within a bound, so that a
    // collector that does not answer cannot hold the exit up. (It blocks this thread, the
    // runtime's only one, which has nothing left to run: the exporter has a thread of its own.)
    crate::telemetry::otlp::shutdown(crate::telemetry::otlp::EXIT_FLUSH);
    outcome
}

/// Checks the column mappings of adopted tables against the real tables before the relays
/// start, when PostgreSQL answers: a mapping that does not fit stops `run` with exit 78, a
/// table not (or not completely) adopted with exit 1: above all while `migrate --adopt --from
/// start` still numbers the rows from before, when a relay would send a key's new rows before
/// its old ones. When PostgreSQL does not answer, the relays start and retry (and report the
/// table as unusable if it does not fit once it answers).
async fn check_mappings_at_start(settings: &Settings) -> anyhow::Result<()> {
    if settings.outbox.iter().all(|t| t.mapping.is_none()) {
        return Ok(());
    }
    let store = match Store::connect(&settings.postgres).await {
        Ok(store) => store,
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "cannot check the column mappings at start; the relays retry");
            return Ok(());
        }
    };
    let mut problems = Vec::new();
    for table in settings.outbox.iter().filter(|t| t.mapping.is_some()) {
        match store.check_mapping(table).await {
            Ok(()) => {}
            Err(e) => match e.downcast::<MappingError>() {
                Ok(mapping) => problems.extend(mapping.problems),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), table = %table.table, "cannot check the column mapping at start; the relay retries")
                }
            },
        }
    }
    if !problems.is_empty() {
        store.close().await;
        return Err(MappingError { problems }.into());
    }
    for table in settings.outbox.iter().filter(|t| t.mapping.is_some()) {
        if let Err(e) = store.check_adopted(table).await {
            store.close().await;
            return Err(e);
        }
    }
    store.close().await;
    Ok(())
}

async fn migrate(settings: &Settings, args: &MigrateArgs) -> anyhow::Result<()> {
    let store = Store::connect(&settings.postgres).await?;
    let (adopted, own): (Vec<&OutboxSettings>, Vec<&OutboxSettings>) =
        settings.outbox.iter().partition(|t| t.mapping.is_some());
    // Every mapping is checked before anything changes.
    let mut problems = Vec::new();
    for table in &adopted {
        if let Err(e) = store.check_mapping(table).await {
            match e.downcast::<MappingError>() {
                Ok(mapping) => problems.extend(mapping.problems),
                Err(e) => return Err(e),
            }
        }
    }
    if !problems.is_empty() {
        return Err(MappingError { problems }.into());
    }
    if args.dry_run {
        for table in &own {
            println!(
                "{}: the relay's own table: --dry-run shows adopted tables only",
                table.table
            );
        }
    } else if !own.is_empty() {
        let own: Vec<OutboxSettings> = own.into_iter().cloned().collect();
        let tables: Vec<TableName> = own.iter().map(|t| t.table.clone()).collect();
        let applied = store.migrate(&own, settings.relay.notify).await?;
        if applied.is_empty() {
            println!("outbox tables up to date: {}", names(&tables));
        } else {
            for line in applied {
                println!("applied {line}");
            }
        }
    }
    if !adopted.is_empty() && !args.adopt {
        // Without --adopt, tables adopted before are kept up to date (triggers, indexes);
        // adopting a table is asked for explicitly.
        for table in &adopted {
            let plan = store
                .adopt(table, None, settings.relay.notify, false)
                .await
                .map_err(|e| anyhow::anyhow!("{e:#} (with `migrate --adopt`)"))?;
            print_plan(&plan, false);
        }
    }
    if args.adopt {
        let from = args.from.map(|f| match f {
            FromRows::Now => AdoptFrom::Now,
            FromRows::Start => AdoptFrom::Start,
        });
        if adopted.is_empty() {
            anyhow::bail!(
                "--adopt: no table has mapped columns ([outbox.columns] or layout = \"debezium\")"
            );
        }
        for table in &adopted {
            let plan = store
                .adopt(table, from, settings.relay.notify, args.dry_run)
                .await?;
            print_plan(&plan, args.dry_run);
        }
    }
    store.close().await;
    Ok(())
}

fn print_plan(plan: &crate::store::AdoptPlan, dry_run: bool) {
    if plan.up_to_date {
        println!("{}: adopted, up to date", plan.table);
        return;
    }
    for (i, step) in plan.steps.iter().enumerate() {
        if dry_run {
            println!("{}: would {}. {step}", plan.table, i + 1);
        } else {
            println!("{}: adopted: {step}", plan.table);
        }
    }
    if dry_run {
        println!("{}: (dry run: nothing changed)", plan.table);
    }
}

async fn status(settings: &Settings, args: &StatusArgs) -> anyhow::Result<()> {
    let store = Store::connect(&settings.postgres).await?;
    let mut all = Vec::new();
    let sqls: Vec<TableSql> = settings
        .outbox
        .iter()
        .map(|t| TableSql::for_outbox(t, settings.retry.with_override(&t.retry).on_exhausted))
        .collect();
    let mut leases = Vec::new();
    for (sql, table) in sqls.iter().zip(&settings.outbox) {
        all.push(store.status(sql).await?);
        leases.push(store.leases_status(&table.table).await?);
    }
    if args.json {
        let mut json = Vec::new();
        for (((s, table), sql), leases) in all.iter().zip(&settings.outbox).zip(&sqls).zip(&leases)
        {
            let mut object = status_json(s, table);
            object["leases"] = leases_json(leases.as_ref());
            if args.parked > 0 {
                let parked = store.parked_rows(sql, args.parked).await?;
                object["parked_rows"] = parked
                    .iter()
                    .map(|r| {
                        serde_json::json!({
                            "id": r.id, "ordering_key": r.ordering_key, "dedup_key": r.dedup_key,
                            "attempts": r.attempts, "last_error": r.last_error,
                        })
                    })
                    .collect();
                let discarded = store.discarded_rows(&table.table, args.parked).await?;
                object["discarded_rows"] = discarded
                    .iter()
                    .map(|r| {
                        serde_json::json!({
                            "id": r.id, "ordering_key": r.ordering_key, "dedup_key": r.dedup_key,
                            "reason": r.reason, "discarded_at": timestamp(r.discarded_at),
                            "attempts": r.attempts, "last_error": r.last_error,
                        })
                    })
                    .collect();
            }
            json.push(object);
        }
        println!("{}", serde_json::to_string_pretty(&json)?);
        store.close().await;
        return Ok(());
    } else {
        println!(
            "{:<32} {:>10} {:>10} {:>8} {:>10} {:>8} {:>9} {:>12}  OLDEST PENDING",
            "TABLE", "PENDING", "DUE", "RETRYING", "HELD", "PARKED", "DISCARDED", "PUBLISHED"
        );
        for s in &all {
            let published = match s.published {
                Published::Exact(n) => n.to_string(),
                Published::Estimated(n) => format!("~{n}"),
            };
            println!(
                "{:<32} {:>10} {:>10} {:>8} {:>10} {:>8} {:>9} {:>12}  {}",
                s.table.to_string(),
                s.pending,
                s.due,
                s.retrying,
                s.held,
                s.parked,
                s.discarded,
                published,
                s.oldest_pending
                    .map(
                        |d| humantime::format_duration(std::time::Duration::from_secs(d.as_secs()))
                            .to_string()
                    )
                    .unwrap_or_else(|| "-".into())
            );
        }
        println!(
            "(PENDING = DUE + RETRYING, waiting for a retry delay, + HELD, behind a failed or \
             parked row of their key)"
        );
        for (s, leases) in all.iter().zip(&leases) {
            print_leases(&s.table, leases.as_ref());
        }
    }
    if args.parked > 0 {
        for (table, sql) in settings.outbox.iter().zip(&sqls) {
            for row in store.parked_rows(sql, args.parked).await? {
                println!(
                    "parked {} id={} key={:?} dedup_key={:?} attempts={}: {}",
                    table.table,
                    row.id,
                    row.ordering_key,
                    row.dedup_key,
                    row.attempts,
                    row.last_error
                );
            }
            for row in store.discarded_rows(&table.table, args.parked).await? {
                println!(
                    "discarded {} id={} key={:?} dedup_key={:?} attempts={} at {}: {} (last error: {})",
                    table.table,
                    row.id,
                    row.ordering_key,
                    row.dedup_key,
                    row.attempts,
                    timestamp(row.discarded_at),
                    row.reason,
                    row.last_error.as_deref().unwrap_or("-")
                );
            }
        }
    }
    store.close().await;
    Ok(())
}

/// A time as the commands print it: RFC 3339 in UTC, to the second.
fn timestamp(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn status_json(s: &TableStatus, table: &OutboxSettings) -> serde_json::Value {
    serde_json::json!({
        "table": s.table.to_string(),
        "pending": s.pending,
        "due": s.due,
        "retrying": s.retrying,
        "parked": s.parked,
        "discarded": s.discarded,
        "held": s.held,
        "published": match s.published {
            Published::Exact(n) | Published::Estimated(n) => n,
        },
        "published_is_estimate": matches!(s.published, Published::Estimated(_)),
        "oldest_pending_s": s.oldest_pending.map(|d| d.as_secs_f64()),
        "on_published": match table.on_published {
            OnPublished::Mark => "mark",
            OnPublished::Delete => "delete",
        },
        "retention_s": table.retention.map(|d| d.as_secs_f64()),
    })
}

/// A table's partition leases under the status table: the counts, then one line per live
/// member.
fn print_leases(table: &TableName, leases: Option<&TableLeases>) {
    let Some(leases) = leases else {
        println!("\n{table}: no partition leases yet (no relay of this release has run on it)");
        return;
    };
    println!(
        "\n{table}: {} partitions, {} live member(s), {} unowned",
        leases.partitions,
        leases.members.len(),
        leases.unowned()
    );
    if leases.members.is_empty() {
        return;
    }
    println!(
        "  {:>8} {:>10} {:>10}  {:<20}  NAME",
        "MEMBER", "PARTITIONS", "EXPIRES IN", "REGISTERED"
    );
    for m in &leases.members {
        println!(
            "  {:>8} {:>10} {:>10}  {:<20}  {}",
            m.member,
            m.partitions,
            format!("{:.1}s", m.expires_in.as_secs_f64()),
            m.registered_at.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
            m.name
        );
    }
}

/// `leases` in `status --json`: null while the table has none yet.
fn leases_json(leases: Option<&TableLeases>) -> serde_json::Value {
    let Some(leases) = leases else {
        return serde_json::Value::Null;
    };
    serde_json::json!({
        "partitions": leases.partitions,
        "unowned": leases.unowned(),
        "members": leases.members.iter().map(|m| serde_json::json!({
            "member": m.member,
            "name": m.name,
            "registered_at": m.registered_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "expires_in_s": m.expires_in.as_secs_f64(),
            "partitions": m.partitions,
        })).collect::<Vec<_>>(),
    })
}

async fn check_config(settings: &Settings, path: &std::path::Path) -> anyhow::Result<()> {
    println!("config {}: valid", path.display());
    let store = Store::connect(&settings.postgres).await?;
    println!("postgres {}: reachable", settings.postgres.url);
    for table in &settings.outbox {
        if table.mapping.is_some() {
            store.check_mapping(table).await?;
            store.check_adopted(table).await?;
            println!(
                "outbox table {}: ready (adopted, columns mapped)",
                table.table
            );
            continue;
        }
        store.check_table(&table.table).await?;
        println!("outbox table {}: ready", table.table);
    }
    store.close().await;
    let broker = Broker::new(&settings.rabbitmq);
    let mut publisher = broker
        .publisher(&[])
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    match broker.current_node().await {
        Some(node) if settings.rabbitmq.url.nodes().len() > 1 => {
            println!("rabbitmq {node}: reachable (the first node of rabbitmq.url that answered)")
        }
        _ => println!("rabbitmq {}: reachable", settings.rabbitmq.url),
    }
    for table in &settings.outbox {
        if table.declare_exchange.is_some() {
            println!(
                "exchange {:?}: declared by the relay at start",
                table.exchange
            );
            continue;
        }
        match publisher.ensure_exchange(&table.exchange).await {
            Ok(()) => println!("exchange {:?}: exists", table.exchange),
            Err(e) => {
                let retry = settings.retry.with_override(&table.retry);
                let policy = crate::retry::RetryPolicy::from(&retry);
                let within = policy
                    .longest_until_parked()
                    .map(|d| format!(", within {} of the first", humantime::format_duration(d)))
                    .unwrap_or_default();
                println!(
                    "exchange {:?}: WARNING {e}: rows for it are retried with backoff and parked \
                     after {} attempts (retry.max_attempts){within}, {}; declare the exchange \
                     (or set declare_exchange) before rows arrive",
                    table.exchange,
                    retry.max_attempts,
                    match retry.on_exhausted {
                        OnExhausted::HoldKey => {
                            "holding their ordering key until `retry` releases it"
                        }
                        OnExhausted::Skip => "and later rows of their key go on",
                    }
                )
            }
        }
    }
    publisher.close().await;
    broker.close().await;
    Ok(())
}

/// The configured tables `--table` names (all of them without it).
fn selected_tables<'a>(
    settings: &'a Settings,
    table: Option<&str>,
) -> anyhow::Result<Vec<&'a OutboxSettings>> {
    match table {
        Some(name) => {
            let wanted = TableName::parse(name).map_err(|e| anyhow::anyhow!("--table: {e}"))?;
            let found = settings.outbox.iter().find(|t| t.table == wanted);
            Ok(vec![found.with_context(|| {
                format!("--table: {wanted} is not configured")
            })?])
        }
        None => Ok(settings.outbox.iter().collect()),
    }
}

fn table_sql(settings: &Settings, table: &OutboxSettings) -> TableSql {
    TableSql::for_outbox(
        table,
        settings.retry.with_override(&table.retry).on_exhausted,
    )
}

/// Ids as a command lists them: the first ten, then how many more.
fn id_list(ids: &[i64]) -> String {
    let shown: Vec<String> = ids.iter().take(10).map(i64::to_string).collect();
    match ids.len() {
        0..=10 => shown.join(", "),
        n => format!("{}, and {} more", shown.join(", "), n - 10),
    }
}

/// `retry`: releases the selected parked rows, prints each table's (`T: released N parked
/// row(s): ids ...`), and fails (exit 1) when no parked row matched, saying for each table
/// what was looked for and why nothing matched.
async fn retry(settings: &Settings, args: &RetryArgs) -> anyhow::Result<()> {
    let tables = selected_tables(settings, args.table.as_deref())?;
    let selector = match (&args.id, &args.key) {
        (Some(id), _) => {
            if tables.len() > 1 {
                anyhow::bail!("--id needs --table when several tables are configured");
            }
            RetrySelector::Id(*id)
        }
        (None, Some(key)) => RetrySelector::Key(key.clone()),
        (None, None) => RetrySelector::All,
    };
    let store = Store::connect(&settings.postgres).await?;
    let mut released_any = false;
    let mut nothing = Vec::new();
    for table in tables {
        let sql = table_sql(settings, table);
        let released = store.retry(&sql, &selector).await?;
        if !released.is_empty() {
            released_any = true;
            println!(
                "{}: released {} parked row(s): id {}",
                table.table,
                released.len(),
                id_list(&released)
            );
            continue;
        }
        let why = match &selector {
            RetrySelector::Id(id) => format!(
                "{}: no parked row with id {id} to release: {}",
                table.table,
                store.row_fate(&sql, *id).await?
            ),
            RetrySelector::Key(key) => format!(
                "{}: no parked row of key {key:?} to release{}",
                table.table,
                discarded_note(store.discarded_of_key(&sql, key).await?)
            ),
            RetrySelector::All => format!("{}: no parked row to release", table.table),
        };
        nothing.push(why);
    }
    store.close().await;
    if released_any {
        for why in nothing {
            println!("{why}");
        }
        Ok(())
    } else {
        Err(anyhow::anyhow!("{}", nothing.join("; ")))
    }
}

/// ` (N row(s) of the key were discarded)` when some were.
fn discarded_note(discarded: i64) -> String {
    match discarded {
        0 => String::new(),
        n => format!(" ({n} row(s) of the key were discarded)"),
    }
}

/// `discard`: ends the selected parked rows of one table, prints each with what it released,
/// and fails (exit 1) when no parked row matched, saying what was looked for and why.
async fn discard(settings: &Settings, args: &DiscardArgs) -> anyhow::Result<()> {
    let tables = selected_tables(settings, args.table.as_deref())?;
    let [table] = tables.as_slice() else {
        anyhow::bail!("discard needs --table when several tables are configured");
    };
    let selector = match (&args.id, &args.key) {
        (Some(id), _) => DiscardSelector::Id(*id),
        (None, Some(key)) => DiscardSelector::Key(key.clone()),
        (None, None) => anyhow::bail!("discard needs --id or --key"),
    };
    let store = Store::connect(&settings.postgres).await?;
    let sql = table_sql(settings, table);
    let outcome = store
        .discard(&sql, table.on_published, &selector, &args.reason)
        .await
        .with_context(|| format!("discarding parked rows of {}", table.table));
    let outcome = match outcome {
        Ok(discard) if discard.rows.is_empty() => {
            let why = match &selector {
                DiscardSelector::Id(id) => match store.row_fate(&sql, *id).await? {
                    // Parked a moment ago, retried or discarded since: say what it is now.
                    RowFate::Parked => format!(
                        "{}: row {id} changed while it was being discarded; look again with \
                         `outbox-relay status --parked`",
                        table.table
                    ),
                    fate => format!(
                        "{}: no parked row with id {id} to discard: {fate}",
                        table.table
                    ),
                },
                DiscardSelector::Key(key) => format!(
                    "{}: no parked row of key {key:?} to discard{}",
                    table.table,
                    discarded_note(store.discarded_of_key(&sql, key).await?)
                ),
            };
            Err(anyhow::anyhow!(why))
        }
        Ok(discard) => {
            for row in &discard.rows {
                println!(
                    "{}: discarded row {} of key {:?} (parked after {} attempt(s): {})",
                    table.table,
                    row.id,
                    row.ordering_key,
                    row.attempts,
                    row.last_error.as_deref().unwrap_or("-")
                );
            }
            let ids: Vec<i64> = discard.rows.iter().map(|r| r.id).collect();
            let kept = match table.on_published {
                crate::config::OnPublished::Mark => {
                    "marked published, recorded in outbox_relay.discarded"
                }
                crate::config::OnPublished::Delete => {
                    "deleted from the table, recorded in outbox_relay.discarded"
                }
            };
            let released = match discard.released {
                0 => String::new(),
                n => format!("; {n} row(s) held behind them go out now"),
            };
            println!(
                "{}: discarded {} parked row(s): id {} ({kept}){released}",
                table.table,
                ids.len(),
                id_list(&ids)
            );
            Ok(())
        }
        Err(e) => Err(e),
    };
    store.close().await;
    outcome
}

fn names(tables: &[TableName]) -> String {
    tables
        .iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
