//! Where the servers are and how to reach them: the PostgreSQL and RabbitMQ base URLs (without a
//! database or vhost), unique names for the objects a run makes on them, administrator
//! connections, and `rabbitmqctl` and the other server tools. Makes nothing on the servers itself.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use rand::Rng;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, PgConnection};
use url::Url;

/// The test servers when `OUTBOX_RELAY_TEST_PG` and `OUTBOX_RELAY_TEST_AMQP` do not say otherwise.
pub const DEFAULT_POSTGRES: &str = "postgres://postgres@127.0.0.1:5432";
pub const DEFAULT_RABBITMQ: &str = "amqp://guest:guest@127.0.0.1:5672";

/// One PostgreSQL and one RabbitMQ server.
#[derive(Debug, Clone)]
pub struct Servers {
    /// `postgres://user@host:port`; the database is set per connection.
    pub postgres: Url,
    /// `amqp://user:pass@host:port`; the vhost is set per connection.
    pub rabbitmq: Url,
}

impl Servers {
    /// The servers named by `OUTBOX_RELAY_TEST_PG` and `OUTBOX_RELAY_TEST_AMQP`, else the local
    /// ones with their stock users.
    pub fn from_env() -> anyhow::Result<Servers> {
        let read = |var: &str, default: &str| -> anyhow::Result<Url> {
            let text = std::env::var(var).unwrap_or_else(|_| default.to_owned());
            Url::parse(&text).with_context(|| format!("{var} is not a URL"))
        };
        Ok(Servers {
            postgres: read("OUTBOX_RELAY_TEST_PG", DEFAULT_POSTGRES)?,
            rabbitmq: read("OUTBOX_RELAY_TEST_AMQP", DEFAULT_RABBITMQ)?,
        })
    }

    /// The URL of `database` on the PostgreSQL server.
    pub fn postgres_url(&self, database: &str) -> Url {
        let mut url = self.postgres.clone();
        url.set_path(&format!("/{database}"));
        url
    }

    /// The URL of `vhost` on the broker; `None` is the default vhost `/` (unless the base URL
    /// names one).
    pub fn rabbitmq_url(&self, vhost: Option<&str>) -> Url {
        let mut url = self.rabbitmq.clone();
        match vhost {
            Some(v) => url.set_path(&format!("/{}", v.replace('/', "%2f"))),
            None if url.path().is_empty() || url.path() == "/" => url.set_path("/%2f"),
            None => {}
        }
        url
    }

    pub fn postgres_addr(&self) -> anyhow::Result<SocketAddr> {
        socket_addr(&self.postgres, 5432)
    }

    pub fn rabbitmq_addr(&self) -> anyhow::Result<SocketAddr> {
        socket_addr(&self.rabbitmq, 5672)
    }

    /// A connection to `database` as `application_name`.
    pub async fn connect_pg(
        &self,
        database: &str,
        application_name: &str,
    ) -> sqlx::Result<PgConnection> {
        connect_pg(&self.postgres_url(database), application_name).await
    }
}

/// The address a server URL points at (`default_port` when it names none).
pub fn socket_addr(url: &Url, default_port: u16) -> anyhow::Result<SocketAddr> {
    let host = url.host_str().context("server URL without a host")?;
    let port = url.port().unwrap_or(default_port);
    std::net::ToSocketAddrs::to_socket_addrs(&(host, port))?
        .next()
        .with_context(|| format!("cannot resolve {host}"))
}

/// A connection to the database `url` names, as `application_name`, quiet: no notices (such as
/// "database does not exist, skipping") and no statement logging.
pub async fn connect_pg(url: &Url, application_name: &str) -> sqlx::Result<PgConnection> {
    let options: PgConnectOptions = url.as_str().parse()?;
    options
        .application_name(application_name)
        .options([("client_min_messages", "warning")])
        .log_statements(tracing::log::LevelFilter::Off)
        .connect()
        .await
}

/// `<prefix>_<12 random hex digits>`: a name for a database, vhost, exchange or queue that no
/// other run uses (lowercase, so PostgreSQL and RabbitMQ spell it the same).
pub fn unique_name(prefix: &str) -> String {
    format!(
        "{prefix}_{:012x}",
        rand::rng().random::<u64>() & 0xffff_ffff_ffff
    )
}

/// `name` as a PostgreSQL identifier in double quotes.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Runs `rabbitmqctl ARGS` (bounded to two minutes) and returns its standard output.
pub async fn rabbitmqctl(args: &[&str]) -> anyhow::Result<String> {
    run_tool("rabbitmqctl", args, Duration::from_secs(120)).await
}

/// Runs a server tool and returns its standard output, failing with its standard error.
pub async fn run_tool(tool: &str, args: &[&str], limit: Duration) -> anyhow::Result<String> {
    let mut command = tokio::process::Command::new(tool);
    command
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(limit, command.output())
        .await
        .with_context(|| format!("{tool} {} did not finish within {limit:?}", args.join(" ")))?
        .with_context(|| format!("running {tool}"))?;
    if !out.status.success() {
        // What the tool said went wrong: its standard error, else its standard output.
        let said = match String::from_utf8_lossy(&out.stderr).trim() {
            "" => String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            stderr => stderr.to_owned(),
        };
        bail!("{tool} {} failed ({}): {said}", args.join(" "), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The same as [`run_tool`], blocking and without its output: for guards that restore or
/// remove something from `Drop`.
pub fn run_tool_blocking(tool: &str, args: &[&str]) -> anyhow::Result<()> {
    let status = std::process::Command::new(tool)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .status()
        .with_context(|| format!("running {tool}"))?;
    if !status.success() {
        bail!("{tool} {} failed ({status})", args.join(" "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> Servers {
        Servers {
            postgres: Url::parse(DEFAULT_POSTGRES).unwrap(),
            rabbitmq: Url::parse(DEFAULT_RABBITMQ).unwrap(),
        }
    }

    #[test]
    fn a_database_url_keeps_the_servers_user_and_address() {
        assert_eq!(
            local().postgres_url("obr_t_1").as_str(),
            "postgres://postgres@127.0.0.1:5432/obr_t_1"
        );
    }

    #[test]
    fn the_default_vhost_is_spelled_percent_2f_and_a_named_one_as_it_is() {
        let servers = local();
        assert_eq!(
            servers.rabbitmq_url(None).as_str(),
            "amqp://guest:guest@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            servers.rabbitmq_url(Some("obr-soak-1")).as_str(),
            "amqp://guest:guest@127.0.0.1:5672/obr-soak-1"
        );
    }

    #[test]
    fn unique_names_differ_and_keep_their_prefix() {
        let (a, b) = (unique_name("obr_t"), unique_name("obr_t"));
        assert_ne!(a, b);
        assert!(
            a.starts_with("obr_t_") && a.len() == "obr_t_".len() + 12,
            "{a}"
        );
    }

    #[test]
    fn a_quoted_identifier_doubles_its_quotes() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
