//! Command-line interface: `run`, `migrate`, `status`, `check-config`, `retry`, `replay`. Parses
//! arguments and prints results; the work itself lives in the other modules.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::config::{ConfigError, OnPublished, OutboxSettings, Settings, TableName, EX_CONFIG};
use crate::publisher::Broker;
use crate::shutdown::Shutdown;
use crate::store::{
    AdoptFrom, MappingError, Published, RetrySelector, Store, TableLeases, TableSql, TableStatus,
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
    Run,
    /// Create missing outbox tables and upgrade the relay's own objects; with --adopt, add
    /// what the relay needs to existing tables with mapped columns.
    Migrate(MigrateArgs),
    /// Print per table: pending, due, parked, published rows and the oldest pending age; the
    /// partition leases: live members, the partitions each owns, and the unowned ones.
    Status(StatusArgs),
    /// Validate the config file and reach both servers.
    CheckConfig,
    /// Release parked rows so they are published again, in order.
    Retry(RetryArgs),
    /// Publish a range of published rows again (same message_id, header x-outbox-replay).
    Replay(crate::replay::ReplayArgs),
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
pub struct StatusArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also list up to N parked rows with their last error.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub parked: i64,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["id", "key", "all"])))]
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

/// Runs the command and returns the process exit code: 0 success, 78 configuration error,
/// 70 `run` stopped after a panic, 2 a usage error, 1 any other failure. A command other than
/// `run` whose output's reader is gone does not return: SIGPIPE ends it (141 in the shell).
pub fn main(cli: Cli) -> i32 {
    if !matches!(cli.command, Command::Run) {
        end_quietly_when_the_reader_goes();
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
            Command::Replay(args) => crate::replay::main(&settings, &cli.config, &args).await,
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
            (None, Some(mapping)) => config_failure(&ConfigError {
                file,
                problems: mapping.problems.clone(),
            }),
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
    crate::service::run(settings, shutdown).await
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
            }
            json.push(object);
        }
        println!("{}", serde_json::to_string_pretty(&json)?);
        store.close().await;
        return Ok(());
    } else {
        println!(
            "{:<32} {:>10} {:>10} {:>8} {:>12}  OLDEST PENDING",
            "TABLE", "PENDING", "DUE", "PARKED", "PUBLISHED"
        );
        for s in &all {
            let published = match s.published {
                Published::Exact(n) => n.to_string(),
                Published::Estimated(n) => format!("~{n}"),
            };
            println!(
                "{:<32} {:>10} {:>10} {:>8} {:>12}  {}",
                s.table.to_string(),
                s.pending,
                s.due,
                s.parked,
                published,
                s.oldest_pending
                    .map(
                        |d| humantime::format_duration(std::time::Duration::from_secs(d.as_secs()))
                            .to_string()
                    )
                    .unwrap_or_else(|| "-".into())
            );
        }
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
        }
    }
    store.close().await;
    Ok(())
}

fn status_json(s: &TableStatus, table: &OutboxSettings) -> serde_json::Value {
    serde_json::json!({
        "table": s.table.to_string(),
        "pending": s.pending,
        "due": s.due,
        "parked": s.parked,
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
            Err(e) => println!(
                "exchange {:?}: WARNING {e} (rows for it will be retried until it exists)",
                table.exchange
            ),
        }
    }
    publisher.close().await;
    broker.close().await;
    Ok(())
}

async fn retry(settings: &Settings, args: &RetryArgs) -> anyhow::Result<()> {
    let tables: Vec<&OutboxSettings> = match &args.table {
        Some(name) => {
            let wanted = TableName::parse(name).map_err(|e| anyhow::anyhow!("--table: {e}"))?;
            let found = settings.outbox.iter().find(|t| t.table == wanted);
            vec![found.with_context(|| format!("--table: {wanted} is not configured"))?]
        }
        None => settings.outbox.iter().collect(),
    };
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
    for table in tables {
        let sql = TableSql::for_outbox(
            table,
            settings.retry.with_override(&table.retry).on_exhausted,
        );
        let released = store.retry(&sql, &selector).await?;
        println!("{}: released {released} parked row(s)", table.table);
    }
    store.close().await;
    Ok(())
}

fn names(tables: &[TableName]) -> String {
    tables
        .iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
