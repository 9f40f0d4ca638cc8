//! The soak's own world: a database, a RabbitMQ vhost with its exchange and durable queue, the
//! relay's config pointing at the proxies (with the table's partitions and the members'
//! timings), each key's partition, and their removal at the end (the test kit makes and removes
//! the database and the vhost).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use lapin::ExchangeKind;
use outbox_relay_testkit::database::Database;
use outbox_relay_testkit::proxy::Proxy;
use outbox_relay_testkit::servers::Servers;
use outbox_relay_testkit::vhost::Vhost;

pub const EXCHANGE: &str = "soak.events";
pub const QUEUE: &str = "soak.deliveries";
pub const TABLE: &str = "public.outbox";
/// The relay's `reconnect_max_delay` in the soak: recoveries are measured against it + 2 s.
pub const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(2);
/// The relay's `max_in_flight`: the most a relay sends again after one fault.
pub const WINDOW: u64 = 100;
/// The relay's `rabbitmq.confirm_timeout` and `postgres.statement_timeout`: short, so that the
/// lease rule (lease > heartbeat + confirm timeout + statement timeout) leaves a short lease.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(2);
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(2);

/// How the relays share the table.
#[derive(Debug, Clone, Copy)]
pub struct Sharing {
    /// `[[outbox]] partitions`.
    pub partitions: u32,
    /// `[[outbox]] channels`.
    pub channels: u32,
    /// `[relay] heartbeat`.
    pub heartbeat: Duration,
    /// `[relay] lease`.
    pub lease: Duration,
}

/// The names of this run's objects.
#[derive(Debug, Clone)]
pub struct World {
    pub database: String,
    pub vhost: String,
    pub dir: PathBuf,
}

/// The database and vhost of a run, removed when dropped unless removed or kept before.
pub struct Made {
    database: Database,
    vhost: Vhost,
}

impl Made {
    /// Drops the database and the vhost (with its exchange and queue).
    pub async fn remove(self) -> anyhow::Result<()> {
        let database = self.database.remove().await;
        let vhost = self.vhost.remove().await;
        database.and(vhost)
    }

    /// Leaves both in place (for inspection).
    pub fn keep(self) {
        self.database.keep();
        self.vhost.keep();
    }
}

impl World {
    pub fn named(run_id: &str) -> World {
        World {
            database: format!("obr_soak_{run_id}"),
            vhost: format!("obr-soak-{run_id}"),
            dir: std::env::temp_dir().join(format!("obr-soak-{run_id}")),
        }
    }

    /// Creates the database, the vhost (the servers' user may use it), the exchange and the
    /// bound queue. What was made before a step failed is removed again.
    pub async fn create(&self, servers: &Servers) -> anyhow::Result<Made> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let database = Database::create(&servers.postgres_url("postgres"), &self.database)
            .await
            .context("creating the soak's database as the administrator")?;
        let vhost = Vhost::create(servers, &self.vhost).await?;
        vhost
            .declare_exchange(EXCHANGE, ExchangeKind::Topic)
            .await
            .context("declaring in the soak's vhost")?;
        vhost.declare_queue(QUEUE).await?;
        vhost.bind(QUEUE, EXCHANGE, "#").await?;
        Ok(Made { database, vhost })
    }

    /// Writes the relay's config: both servers reached through the proxies, short timeouts so
    /// every fault is noticed quickly, and a retry policy that never parks a row under faults.
    pub fn write_config(
        &self,
        servers: &Servers,
        pg_proxy: &Proxy,
        amqp_proxy: &Proxy,
        sharing: Sharing,
    ) -> anyhow::Result<PathBuf> {
        let pg = pg_proxy.route(&servers.postgres_url(&self.database))?;
        let amqp = amqp_proxy.route(&servers.rabbitmq_url(Some(&self.vhost)))?;
        let reconnect_max_delay = humantime::format_duration(RECONNECT_MAX_DELAY);
        let statement_timeout = humantime::format_duration(STATEMENT_TIMEOUT);
        let confirm_timeout = humantime::format_duration(CONFIRM_TIMEOUT);
        let heartbeat = humantime::format_duration(sharing.heartbeat);
        let lease = humantime::format_duration(sharing.lease);
        let Sharing {
            partitions,
            channels,
            ..
        } = sharing;
        let config = format!(
            r#"# Written by outbox-relay-soak: the relay reaches both servers through the soak's proxies.
[postgres]
url = "{pg}"
max_connections = 4
connect_timeout = "2s"
statement_timeout = "{statement_timeout}"

[rabbitmq]
url = "{amqp}"
connection_name = "outbox-relay"
connect_timeout = "2s"
confirm_timeout = "{confirm_timeout}"

[relay]
batch_size = 200
max_in_flight = 100
poll_interval = "1s"
shutdown_timeout = "3s"
reconnect_max_delay = "{reconnect_max_delay}"
heartbeat = "{heartbeat}"
lease = "{lease}"
channels = {channels}

[retry]
initial_delay = "200ms"
max_delay = "2s"
max_attempts = 1000

[log]
level = "info"

[[outbox]]
table = "{TABLE}"
exchange = "{EXCHANGE}"
partitions = {partitions}
"#
        );
        let path = self.dir.join("relay.toml");
        std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

/// The partition of each key the producers write (`key-0` .. `key-{keys-1}`; index = key
/// number), by the relay's documented formula, computed by PostgreSQL itself.
pub async fn key_partitions(
    servers: &Servers,
    database: &str,
    keys: u32,
    partitions: u32,
) -> anyhow::Result<Vec<u32>> {
    let mut conn = servers
        .connect_pg(database, "obr-soak-setup")
        .await
        .context("connecting to compute the keys' partitions")?;
    let rows: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT k, (hashtextextended('key-' || k, 0) & 2147483647) % $2 \
         FROM generate_series(0, $1 - 1) AS k ORDER BY k",
    )
    .bind(i32::try_from(keys).context("--keys is too large")?)
    .bind(i64::from(partitions))
    .fetch_all(&mut conn)
    .await
    .context("computing the keys' partitions")?;
    sqlx::Connection::close(conn).await.ok();
    rows.into_iter()
        .map(|(_, p)| u32::try_from(p).context("a negative partition"))
        .collect()
}

/// Runs `outbox-relay migrate` with the soak's config.
pub async fn migrate(relay_bin: &Path, config: &Path) -> anyhow::Result<()> {
    let out = tokio::process::Command::new(relay_bin)
        .arg("--config")
        .arg(config)
        .arg("migrate")
        .output()
        .await
        .with_context(|| format!("running {}", relay_bin.display()))?;
    if !out.status.success() {
        bail!(
            "outbox-relay migrate failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Logs every mark: a row trigger (TRUNCATE fires none) copies the row's id, dedup_key and
/// payload into `soak_marks` when `published_at` is set, so that the end of the run can check
/// that every row version marked published reached the consumer, also those a TRUNCATE or an
/// update by hand removed or replaced afterwards.
pub async fn log_marks(servers: &Servers, database: &str) -> anyhow::Result<()> {
    let mut conn = servers
        .connect_pg(database, "obr-soak-setup")
        .await
        .context("connecting to install the marks log")?;
    sqlx::raw_sql(&format!(
        "CREATE TABLE soak_marks (id bigint NOT NULL, dedup_key text NOT NULL, payload text NOT NULL, \
             marked_at timestamptz NOT NULL DEFAULT clock_timestamp()); \
         CREATE FUNCTION soak_note_mark() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN INSERT INTO soak_marks (id, dedup_key, payload) VALUES (NEW.id, NEW.dedup_key, NEW.payload::text); \
         RETURN NULL; END $$; {MARK_TRIGGER}"
    ))
    .execute(&mut conn)
    .await
    .context("installing the marks log (soak_marks)")?;
    sqlx::Connection::close(conn).await.ok();
    Ok(())
}

/// The marks log's trigger on the table (again after the table was created anew).
pub const MARK_TRIGGER: &str =
    "CREATE TRIGGER soak_note_mark AFTER UPDATE OF published_at ON public.outbox \
     FOR EACH ROW WHEN (OLD.published_at IS NULL AND NEW.published_at IS NOT NULL) \
     EXECUTE FUNCTION soak_note_mark()";

/// The `frame_max` the broker negotiates with the AMQP client the relay uses (lapin, default
/// settings, as the soak's relay config sets none).
pub async fn frame_max(servers: &Servers, vhost: &str) -> anyhow::Result<usize> {
    let url = servers.rabbitmq_url(Some(vhost)).to_string();
    let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .context("connecting to the broker to read its frame_max")?;
    let frame_max = conn.configuration().frame_max() as usize;
    conn.close(200, "bye".into()).await.ok();
    Ok(frame_max)
}
