//! Command-line interface: `run`, `migrate`, `status`, `check-config`, `retry`, `replay`. Parses
//! arguments and prints results; the work itself lives in the other modules.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::config::{ConfigError, OnPublished, OutboxSettings, Settings, TableName, EX_CONFIG};
use crate::publisher::Broker;
use crate::shutdown::Shutdown;
use crate::store::{Published, RetrySelector, Store, TableStatus};

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
    /// Create missing outbox tables and upgrade the relay's own objects.
    Migrate,
    /// Print per table: pending, due, parked, published rows and the oldest pending age.
    Status(StatusArgs),
    /// Validate the config file and reach both servers.
    CheckConfig,
    /// Release parked rows so they are published again, in order.
    Retry(RetryArgs),
    /// Publish a range of published rows again (same message_id, header x-outbox-replay).
    Replay(crate::replay::ReplayArgs),
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
/// 2 a usage error, 1 any other failure.
pub fn main(cli: Cli) -> i32 {
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
            eprintln!("outbox-relay: cannot start the async runtime: {e}");
            return 1;
        }
    };
    let outcome = runtime.block_on(async move {
        match cli.command {
            Command::Run => run(settings).await,
            Command::Migrate => migrate(&settings).await,
            Command::Status(args) => status(&settings, &args).await,
            Command::CheckConfig => check_config(&settings, &cli.config).await,
            Command::Retry(args) => retry(&settings, &args).await,
            Command::Replay(args) => crate::replay::main(&settings, &cli.config, &args).await,
        }
    });
    match outcome {
        Ok(()) => 0,
        Err(e) => match e.downcast_ref::<ConfigError>() {
            Some(config_error) => config_failure(config_error),
            None => {
                eprintln!("outbox-relay: {e:#}");
                e.downcast_ref::<crate::replay::ReplayError>()
                    .map_or(1, crate::replay::ReplayError::exit_code)
            }
        },
    }
}

fn config_failure(e: &ConfigError) -> i32 {
    eprintln!("outbox-relay: {e}");
    EX_CONFIG
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    let shutdown = Shutdown::new();
    shutdown
        .on_signals(settings.relay.shutdown_timeout)
        .context("installing signal handlers")?;
    crate::service::run(settings, shutdown).await
}

async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let store = Store::connect(&settings.postgres).await?;
    let tables: Vec<TableName> = settings.outbox.iter().map(|t| t.table.clone()).collect();
    let applied = store
        .migrate(&settings.outbox, settings.relay.notify)
        .await?;
    if applied.is_empty() {
        println!("outbox tables up to date: {}", names(&tables));
    } else {
        for line in applied {
            println!("applied {line}");
        }
    }
    store.close().await;
    Ok(())
}

async fn status(settings: &Settings, args: &StatusArgs) -> anyhow::Result<()> {
    let store = Store::connect(&settings.postgres).await?;
    let mut all = Vec::new();
    for table in &settings.outbox {
        all.push(store.status(&table.table).await?);
    }
    if args.json {
        let mut json = Vec::new();
        for (s, table) in all.iter().zip(&settings.outbox) {
            let mut object = status_json(s, table);
            if args.parked > 0 {
                let parked = store.parked_rows(&table.table, args.parked).await?;
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
    }
    if args.parked > 0 {
        for table in &settings.outbox {
            for row in store.parked_rows(&table.table, args.parked).await? {
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

async fn check_config(settings: &Settings, path: &std::path::Path) -> anyhow::Result<()> {
    println!("config {}: valid", path.display());
    let store = Store::connect(&settings.postgres).await?;
    println!("postgres {}: reachable", settings.postgres.url);
    for table in &settings.outbox {
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
    let tables: Vec<&TableName> = match &args.table {
        Some(name) => {
            let wanted = TableName::parse(name).map_err(|e| anyhow::anyhow!("--table: {e}"))?;
            let found = settings
                .outbox
                .iter()
                .find(|t| t.table == wanted)
                .map(|t| &t.table);
            vec![found.with_context(|| format!("--table: {wanted} is not configured"))?]
        }
        None => settings.outbox.iter().map(|t| &t.table).collect(),
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
        let released = store.retry(table, &selector).await?;
        println!("{table}: released {released} parked row(s)");
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
