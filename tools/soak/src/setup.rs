//! The soak's own world: a database, a RabbitMQ vhost with its exchange and durable queue, the
//! relay's config pointing at the proxies, and their removal at the end. Also the small helpers
//! that run `rabbitmqctl` and talk to PostgreSQL as the administrator.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection as _, PgConnection};

pub const EXCHANGE: &str = "soak.events";
pub const QUEUE: &str = "soak.deliveries";
pub const TABLE: &str = "public.outbox";
/// The relay's `reconnect_max_delay` in the soak: recoveries are measured against it + 2 s.
pub const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(2);

/// Where the servers are (without the soak's database or vhost).
#[derive(Debug, Clone)]
pub struct Servers {
    /// `postgres://user@host:port` base; the database name is appended.
    pub postgres: url::Url,
    /// `amqp://user:pass@host:port` base; the vhost is appended.
    pub rabbitmq: url::Url,
}

impl Servers {
    pub fn postgres_url(&self, database: &str) -> url::Url {
        let mut u = self.postgres.clone();
        u.set_path(&format!("/{database}"));
        u
    }

    pub fn rabbitmq_url(&self, vhost: &str) -> url::Url {
        let mut u = self.rabbitmq.clone();
        u.set_path(&format!("/{}", vhost.replace('/', "%2f")));
        u
    }

    pub fn postgres_addr(&self) -> anyhow::Result<std::net::SocketAddr> {
        socket_addr(&self.postgres, 5432)
    }

    pub fn rabbitmq_addr(&self) -> anyhow::Result<std::net::SocketAddr> {
        socket_addr(&self.rabbitmq, 5672)
    }

    /// A connection as `application_name`, to the soak's database or `postgres`.
    pub async fn connect_pg(
        &self,
        database: &str,
        application_name: &str,
    ) -> sqlx::Result<PgConnection> {
        let options: PgConnectOptions = self.postgres_url(database).as_str().parse()?;
        options
            .application_name(application_name)
            .options([("client_min_messages", "warning")])
            .log_statements(tracing::log::LevelFilter::Off)
            .connect()
            .await
    }
}

fn socket_addr(u: &url::Url, default_port: u16) -> anyhow::Result<std::net::SocketAddr> {
    let host = u.host_str().context("server URL without a host")?;
    let port = u.port().unwrap_or(default_port);
    std::net::ToSocketAddrs::to_socket_addrs(&(host, port))?
        .next()
        .with_context(|| format!("cannot resolve {host}"))
}

/// The names of this run's objects.
#[derive(Debug, Clone)]
pub struct World {
    pub database: String,
    pub vhost: String,
    pub dir: PathBuf,
}

impl World {
    pub fn named(run_id: &str) -> World {
        World {
            database: format!("obr_soak_{run_id}"),
            vhost: format!("obr-soak-{run_id}"),
            dir: std::env::temp_dir().join(format!("obr-soak-{run_id}")),
        }
    }

    /// Creates the database, the vhost (guest may use it), the exchange and the bound queue.
    pub async fn create(&self, servers: &Servers) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let mut admin = servers
            .connect_pg("postgres", "obr-soak-admin")
            .await
            .context("connecting to PostgreSQL as the administrator")?;
        sqlx::raw_sql(&format!("CREATE DATABASE \"{}\"", self.database))
            .execute(&mut admin)
            .await
            .with_context(|| format!("creating database {}", self.database))?;
        admin.close().await.ok();
        rabbitmqctl(&["add_vhost", &self.vhost]).await?;
        let user = servers.rabbitmq.username();
        rabbitmqctl(&["set_permissions", "-p", &self.vhost, user, ".*", ".*", ".*"]).await?;
        let amqp = Connection::connect(
            servers.rabbitmq_url(&self.vhost).as_str(),
            ConnectionProperties::default(),
        )
        .await
        .context("connecting to the soak's vhost")?;
        let channel = amqp.create_channel().await?;
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .exchange_declare(
                EXCHANGE.into(),
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await?;
        let queue = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .queue_declare(QUEUE.into(), queue, FieldTable::default())
            .await?;
        channel
            .queue_bind(
                QUEUE.into(),
                EXCHANGE.into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let _ = amqp.close(200, "set up".into()).await;
        Ok(())
    }

    /// Drops the database and the vhost (with its exchange and queue).
    pub async fn remove(&self, servers: &Servers) -> anyhow::Result<()> {
        let mut admin = servers.connect_pg("postgres", "obr-soak-admin").await?;
        sqlx::raw_sql(&format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            self.database
        ))
        .execute(&mut admin)
        .await?;
        admin.close().await.ok();
        rabbitmqctl(&["delete_vhost", &self.vhost]).await?;
        Ok(())
    }

    /// Writes the relay's config: both servers reached through the proxies, short timeouts so
    /// every fault is noticed quickly, and a retry policy that never parks a row under faults.
    pub fn write_config(
        &self,
        servers: &Servers,
        pg_port: u16,
        amqp_port: u16,
    ) -> anyhow::Result<PathBuf> {
        let mut pg = servers.postgres_url(&self.database);
        let mut amqp = servers.rabbitmq_url(&self.vhost);
        pg.set_host(Some("127.0.0.1"))?;
        amqp.set_host(Some("127.0.0.1"))?;
        pg.set_port(Some(pg_port))
            .map_err(|_| anyhow::anyhow!("cannot set the port"))?;
        amqp.set_port(Some(amqp_port))
            .map_err(|_| anyhow::anyhow!("cannot set the port"))?;
        let reconnect_max_delay = humantime::format_duration(RECONNECT_MAX_DELAY);
        let config = format!(
            r#"# Written by outbox-relay-soak: the relay reaches both servers through the soak's proxies.
[postgres]
url = "{pg}"
max_connections = 4
connect_timeout = "2s"
statement_timeout = "3s"

[rabbitmq]
url = "{amqp}"
connection_name = "outbox-relay"
connect_timeout = "2s"
confirm_timeout = "3s"

[relay]
batch_size = 200
max_in_flight = 100
poll_interval = "1s"
shutdown_timeout = "3s"
reconnect_max_delay = "{reconnect_max_delay}"

[retry]
initial_delay = "200ms"
max_delay = "2s"
max_attempts = 1000

[log]
level = "info"

[[outbox]]
table = "{TABLE}"
exchange = "{EXCHANGE}"
"#
        );
        let path = self.dir.join("relay.toml");
        std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
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

/// Runs `rabbitmqctl ARGS` (bounded to two minutes) and returns its standard output.
pub async fn rabbitmqctl(args: &[&str]) -> anyhow::Result<String> {
    run_tool("rabbitmqctl", args, Duration::from_secs(120)).await
}

/// Runs a server tool and returns its standard output, failing with its standard error.
pub async fn run_tool(tool: &str, args: &[&str], limit: Duration) -> anyhow::Result<String> {
    let mut command = tokio::process::Command::new(tool);
    command.args(args).kill_on_drop(true);
    let out = tokio::time::timeout(limit, command.output())
        .await
        .with_context(|| format!("{tool} {} did not finish within {limit:?}", args.join(" ")))?
        .with_context(|| format!("running {tool}"))?;
    if !out.status.success() {
        bail!(
            "{tool} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The same as [`run_tool`], blocking: for guards that restore a server from `Drop`.
pub fn run_tool_blocking(tool: &str, args: &[&str]) -> anyhow::Result<()> {
    let status = std::process::Command::new(tool)
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .with_context(|| format!("running {tool}"))?;
    if !status.success() {
        bail!("{tool} {} failed ({status})", args.join(" "));
    }
    Ok(())
}
