//! The bench's own objects: a uniquely named database (with the bench's outbox tables, created
//! by the relay's `migrate`), a durable exchange and queue, a scratch directory for relay
//! configs and logs, and the live consumer. Everything made here is removed by `teardown` (the
//! test kit makes and removes the database, the exchange and the queue).

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use lapin::ExchangeKind;
use outbox_relay::config::{SecretUrl, TableName};
use outbox_relay_testkit::database::Database;
use outbox_relay_testkit::vhost::Vhost;
use serde::Serialize;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::Connection as _;

use crate::consumer::Consumer;
use crate::process::{self, RelayConfig};
use crate::workload::ROUTING_KEY;

/// The bench's outbox tables, one per scenario so the relay under test only sees its own.
pub const DRAIN_TABLE: &str = "bench.drain_outbox";
pub const HOT_KEY_TABLE: &str = "bench.hot_key_outbox";
pub const LATENCY_TABLE: &str = "bench.latency_outbox";
pub const IDLE_TABLE: &str = "bench.idle_outbox";
pub const HISTORY_TABLE: &str = "bench.history_outbox";
pub const HELD_KEY_TABLE: &str = "bench.held_key_outbox";
pub const SCALE_TABLE: &str = "bench.scale_outbox";
/// The producers scenario's outbox table, its twin migrated with `notify = false` (no NOTIFY
/// trigger; made by that scenario's `migrate`), and its plain copy without triggers.
pub const PRODUCERS_TABLE: &str = "bench.producers_outbox";
pub const PRODUCERS_QUIET_TABLE: &str = "bench.producers_quiet_outbox";
pub const PRODUCERS_PLAIN_TABLE: &str = "bench.producers_plain";
/// The many-tables scenario's tables are `tenants.t0` … (made by that scenario's `migrate`).
pub const MANY_TABLES_SCHEMA: &str = "tenants";
const TABLES: [&str; 8] = [
    DRAIN_TABLE,
    HOT_KEY_TABLE,
    LATENCY_TABLE,
    IDLE_TABLE,
    HISTORY_TABLE,
    HELD_KEY_TABLE,
    SCALE_TABLE,
    PRODUCERS_TABLE,
];

pub fn table(name: &str) -> TableName {
    // The names above are constants known to be valid.
    TableName::parse(name).unwrap_or_else(|e| unreachable!("bench table name {name}: {e}"))
}

pub struct BenchEnv {
    /// Unique name of this run: the database, exchange and queue are named after it.
    pub id: String,
    admin_url: url::Url,
    /// The bench database (carries the password of --pg-url, if any: never print it).
    pub db_url: url::Url,
    pub amqp_url: String,
    pub exchange: String,
    pub queue: String,
    /// Scratch directory: relay configs (may hold passwords, so 0700) and relay logs.
    pub dir: PathBuf,
    pub relay_bin: PathBuf,
    pool: Option<PgPool>,
    database: Option<Database>,
    /// The --amqp-url vhost, holding the bench's exchange and queue once declared.
    vhost: Option<Vhost>,
    consumer: Option<Consumer>,
}

impl BenchEnv {
    /// Names everything; creates nothing yet.
    pub fn new(pg_url: &str, amqp_url: &str, relay_bin: PathBuf) -> anyhow::Result<BenchEnv> {
        let admin_url = url::Url::parse(pg_url).map_err(|_| {
            anyhow::anyhow!(
                "--pg-url is not a valid URL: {}",
                SecretUrl::new(pg_url).redacted()
            )
        })?;
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let id = format!("obr_bench_{}_{:x}", std::process::id(), millis);
        let mut db_url = admin_url.clone();
        db_url.set_path(&format!("/{id}"));
        let name = id.replace('_', "-");
        Ok(BenchEnv {
            dir: std::env::temp_dir().join(&id),
            id,
            admin_url,
            db_url,
            amqp_url: amqp_url.to_owned(),
            exchange: name.clone(),
            queue: name,
            relay_bin,
            pool: None,
            database: None,
            vhost: None,
            consumer: None,
        })
    }

    pub fn pg_redacted(&self) -> String {
        SecretUrl::new(self.admin_url.as_str()).redacted()
    }

    pub fn amqp_redacted(&self) -> String {
        SecretUrl::new(self.amqp_url.as_str()).redacted()
    }

    /// Creates the database, the outbox tables (through the relay's own `migrate`), the
    /// exchange, the queue and the live consumer.
    pub async fn setup(&mut self) -> anyhow::Result<()> {
        create_private_dir(&self.dir)?;
        let database = Database::create(&self.admin_url, &self.id)
            .await
            .context("creating the bench database")?;
        self.database = Some(database);
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect(self.db_url.as_str())
            .await
            .context("connecting to the bench database")?;
        self.pool = Some(pool);

        let amqp_url = url::Url::parse(&self.amqp_url).map_err(|_| {
            anyhow::anyhow!("--amqp-url is not a valid URL: {}", self.amqp_redacted())
        })?;
        let vhost = self.vhost.insert(
            Vhost::shared(amqp_url).with_connection_name(format!("{} admin", self.exchange)),
        );
        vhost
            .declare_exchange(&self.exchange, ExchangeKind::Direct)
            .await?;
        vhost
            .declare_queue(&self.queue)
            .await
            .context("declaring the bench queue")?;
        vhost.bind(&self.queue, &self.exchange, ROUTING_KEY).await?;

        let tables: Vec<TableName> = TABLES.iter().map(|t| table(t)).collect();
        let config = RelayConfig::new(self, &tables).write(&self.dir.join("migrate.toml"))?;
        process::migrate(&self.relay_bin, &config, &self.dir.join("migrate.log")).await?;
        self.consumer = Some(Consumer::start(&self.amqp_url, &self.queue, &self.exchange).await?);
        Ok(())
    }

    pub fn pool(&self) -> anyhow::Result<&PgPool> {
        self.pool
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("the bench database is not set up"))
    }

    pub fn consumer(&self) -> anyhow::Result<&Consumer> {
        self.consumer
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("the consumer is not running"))
    }

    /// Empties the queue between rounds (it should already be empty: the consumer is live).
    pub async fn purge_queue(&self) -> anyhow::Result<()> {
        let vhost = self
            .vhost
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("RabbitMQ is not set up"))?;
        // Bounded: a broker that stops answering ends the run with an error, not a hang.
        tokio::time::timeout(Duration::from_secs(30), vhost.purge_queue(&self.queue))
            .await
            .map_err(|_| anyhow::anyhow!("purging the bench queue: no answer within 30 s"))?
            .context("purging the bench queue")?;
        Ok(())
    }

    /// Removes everything `setup` made, as far as it got. Best effort: problems are printed.
    pub async fn teardown(&mut self, keep_logs: bool) {
        if let Some(consumer) = self.consumer.take() {
            consumer.stop().await;
        }
        if let Some(pool) = self.pool.take() {
            pool.close().await;
        }
        if let Some(vhost) = self.vhost.take() {
            if let Err(e) = vhost.remove().await {
                eprintln!(
                    "outbox-relay-bench: could not delete exchange/queue {}: {e:#}",
                    self.queue
                );
            }
        }
        if let Some(database) = self.database.take() {
            // FORCE ends the sessions of a relay that did not stop (only this run's database).
            if let Err(e) = database.remove().await {
                eprintln!(
                    "outbox-relay-bench: could not drop database {}: {e:#}",
                    self.id
                );
            }
        }
        if keep_logs {
            eprintln!(
                "outbox-relay-bench: relay configs and logs kept in {}",
                self.dir.display()
            );
        } else if self.dir.exists() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// Transactions committed plus rolled back in the bench database, from the statistics
    /// (read from the admin database so this reading does not count itself).
    pub async fn database_transactions(&self) -> anyhow::Result<i64> {
        let database = self
            .database
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("the bench database is not set up"))?;
        let mut admin = database.connect_admin().await?;
        let n: i64 = sqlx::query_scalar(
            "SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database WHERE datname = $1",
        )
        .bind(&self.id)
        .fetch_one(&mut admin)
        .await?;
        let _ = admin.close().await;
        Ok(n)
    }

    /// What the figures were measured on.
    pub async fn machine(&self) -> Machine {
        let mut machine = Machine {
            nproc: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            memory_gib: read_meminfo_kib("MemTotal").map(|k| k as f64 / 1024.0 / 1024.0),
            cpu: std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|m| m.trim().to_owned())
            }),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .ok()
                .map(|s| s.trim().to_owned()),
            postgresql: None,
            postgresql_settings: None,
            rabbitmq: rabbitmq_version().await,
        };
        if let Ok(pool) = self.pool() {
            machine.postgresql = sqlx::query_scalar("SHOW server_version")
                .fetch_one(pool)
                .await
                .ok();
            machine.postgresql_settings = sqlx::query_scalar(
                "SELECT string_agg(name || '=' || setting || coalesce(unit, ''), ', ' ORDER BY name) FROM pg_settings \
                 WHERE name IN ('synchronous_commit', 'fsync', 'shared_buffers', 'wal_level', 'max_wal_size')",
            )
            .fetch_one(pool)
            .await
            .ok();
        }
        machine
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub memory_gib: Option<f64>,
    pub cpu: Option<String>,
    pub kernel: Option<String>,
    pub postgresql: Option<String>,
    pub postgresql_settings: Option<String>,
    pub rabbitmq: Option<String>,
}

fn create_private_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

fn read_meminfo_kib(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with(&format!("{key}:")))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The broker's version via `rabbitmqctl version` (only meaningful for a local broker).
async fn rabbitmq_version() -> Option<String> {
    let run = tokio::process::Command::new("rabbitmqctl")
        .arg("version")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(Duration::from_secs(15), run).await {
        Ok(Ok(out)) if out.status.success() => {
            Some(String::from_utf8_lossy(&out.stdout).trim().to_owned()).filter(|s| !s.is_empty())
        }
        _ => None,
    }
}
