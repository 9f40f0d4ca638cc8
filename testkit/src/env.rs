//! One test's private world: its own database, exchange and queue (and, for broker-fault tests,
//! its own vhost), a config file in a temp dir, and a consumer that collects every message
//! reaching the queue. Everything is removed when the environment is dropped, also when the
//! test fails, so tests run in parallel against the shared servers.
//!
//! Servers come from `OUTBOX_RELAY_TEST_PG` and `OUTBOX_RELAY_TEST_AMQP` (defaults: the local
//! PostgreSQL and RabbitMQ with their stock users).

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use lapin::{Channel, ExchangeKind};
use sqlx::postgres::{PgPool, PgPoolOptions};

use crate::cli::run_cli;
use crate::database::Database;
use crate::proxy::Proxy;
use crate::received::Inbox;
use crate::servers::{unique_name, Servers};
use crate::setup::{Setup, Targets};
use crate::vhost::Vhost;
use crate::wait::eventually;

/// The test servers, read from the environment once.
pub fn servers() -> &'static Servers {
    static SERVERS: OnceLock<Servers> = OnceLock::new();
    SERVERS.get_or_init(|| Servers::from_env().unwrap_or_else(|e| panic!("{e:#}")))
}

/// The PostgreSQL URL of database `db` on the test server.
pub fn pg_url(db: &str) -> String {
    servers().postgres_url(db).to_string()
}

/// The AMQP URL of `vhost` (None: the default vhost "/") on the test broker.
pub fn amqp_url(vhost: Option<&str>) -> String {
    servers().rabbitmq_url(vhost).to_string()
}

/// A proxy in front of the test broker, and `amqp_url` (a URL on that broker) routed through it:
/// to count the relay's connection attempts, or to break its network.
pub async fn broker_proxy(amqp_url: &str) -> (Proxy, String) {
    let upstream = servers()
        .rabbitmq_addr()
        .unwrap_or_else(|e| panic!("{e:#}"));
    let proxy = Proxy::start("rabbitmq", upstream)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let url = url::Url::parse(amqp_url).unwrap_or_else(|e| panic!("{amqp_url}: {e}"));
    let routed = proxy.route(&url).unwrap_or_else(|e| panic!("{e:#}"));
    (proxy, routed.to_string())
}

/// A proxy in front of the test PostgreSQL: to cut a relay off (`counting`: false), or to count
/// the statements it sends (`counting`: true; its clients must not use TLS, see
/// [`Proxy::start_counting_postgres`]).
pub async fn postgres_proxy(counting: bool) -> Proxy {
    let upstream = servers()
        .postgres_addr()
        .unwrap_or_else(|e| panic!("{e:#}"));
    let started = if counting {
        Proxy::start_counting_postgres("postgres", upstream).await
    } else {
        Proxy::start("postgres", upstream).await
    };
    started.unwrap_or_else(|e| panic!("{e:#}"))
}

/// One test's private world. Fields are dropped in order: the consumer stops before its queue
/// goes, the database and the broker objects go before the temp dir.
pub struct TestEnv {
    pub name: String,
    pub db: String,
    pub pg_url: String,
    pub amqp_url: String,
    /// The test's own vhost, when [`Setup::own_vhost`] asked for one.
    pub vhost: Option<String>,
    /// The table's exchange (a topic exchange).
    pub exchange: String,
    pub queue: String,
    /// `schema.table` as configured.
    pub table: String,
    pub dir: PathBuf,
    pub config_path: PathBuf,
    /// A pool on the test database, for producers and for reading rows' state.
    pub pool: PgPool,
    pub consumer: Inbox,
    pub(crate) relays_started: Mutex<u32>,
    _database: Database,
    pub(crate) broker: Vhost,
    _scratch: ScratchDir,
}

impl TestEnv {
    pub async fn new(setup: Setup) -> TestEnv {
        let servers = servers();
        let name = unique_name("obr_t");
        let admin = match &setup.postgres {
            Some(server) => {
                let mut url = server.clone();
                url.set_path("/postgres");
                url
            }
            None => servers.postgres_url("postgres"),
        };
        let database = Database::create(&admin, &name)
            .await
            .unwrap_or_else(|e| panic!("create the test database: {e:#}"));
        let broker = if let Some(url) = &setup.rabbitmq {
            Vhost::shared(url.clone())
        } else if setup.vhost {
            Vhost::create(servers, &name)
                .await
                .unwrap_or_else(|e| panic!("create the test's vhost: {e:#}"))
        } else {
            Vhost::shared(servers.rabbitmq_url(None))
        };
        let vhost = broker.own_name().map(str::to_owned);
        let pg_url = database.url().to_string();
        let amqp_url = broker.url().to_string();
        let exchange = format!("{name}_x");
        let queue = format!("{name}_q");
        let scratch = ScratchDir::create(std::env::temp_dir().join(&name));
        let config_path = scratch.0.join("outbox-relay.toml");
        let config = setup.render(&Targets {
            pg_url: &pg_url,
            amqp_url: &amqp_url,
            name: &name,
            exchange: &exchange,
        });
        std::fs::write(&config_path, config).expect("write the config file");

        broker
            .declare_queue_of(&queue, setup.quorum_queue)
            .await
            .unwrap_or_else(|e| panic!("declare the test queue: {e:#}"));
        if setup.relay_declares_exchange {
            broker.record_exchange(&exchange);
        } else {
            broker
                .declare_exchange(&exchange, ExchangeKind::Topic)
                .await
                .unwrap_or_else(|e| panic!("declare the test exchange: {e:#}"));
            for key in &setup.bindings {
                broker
                    .bind(&queue, &exchange, key)
                    .await
                    .unwrap_or_else(|e| panic!("bind the test queue: {e:#}"));
            }
        }
        if setup.migrate {
            let migrated = run_cli(&config_path, &["migrate"]).await;
            assert_eq!(migrated.code, 0, "migrate failed: {migrated:?}");
        }
        let consumer = Inbox::start(&amqp_url, &queue).await;
        TestEnv {
            pool: PgPoolOptions::new()
                .max_connections(8)
                .connect_lazy(&pg_url)
                .expect("a lazy pool"),
            db: name.clone(),
            name,
            pg_url,
            amqp_url,
            vhost,
            exchange,
            queue,
            table: setup.table.clone(),
            dir: scratch.0.clone(),
            config_path,
            consumer,
            relays_started: Mutex::new(0),
            _database: database,
            broker,
            _scratch: scratch,
        }
    }

    /// A fresh channel on a fresh connection to the test's vhost (connections may be closed
    /// by fault tests, so none is kept).
    pub async fn channel(&self) -> Channel {
        self.broker
            .channel()
            .await
            .unwrap_or_else(|e| panic!("open a channel on the test broker: {e:#}"))
    }

    /// Declares a durable topic exchange (removed at the end of the test).
    pub async fn declare_exchange(&self, name: &str) {
        self.broker
            .declare_exchange(name, ExchangeKind::Topic)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// Deletes an exchange (as an operator might while the relay runs).
    pub async fn delete_exchange(&self, name: &str) {
        self.broker
            .delete_exchange(name)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// Binds the test queue to `exchange` with `routing_key`.
    pub async fn bind(&self, exchange: &str, routing_key: &str) {
        self.broker
            .bind(&self.queue, exchange, routing_key)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// True when `exchange` exists (a passive declare on a throwaway channel).
    pub async fn exchange_exists(&self, exchange: &str) -> bool {
        self.broker
            .exchange_exists(exchange)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Waits until the relay has declared the table's exchange, then binds the queue to it.
    pub async fn bind_when_declared(&self, routing_key: &str) {
        eventually("the relay to declare the table's exchange", || {
            self.exchange_exists(&self.exchange)
        })
        .await;
        self.bind(&self.exchange, routing_key).await;
    }

    /// Messages now waiting in the test queue (not yet delivered to the consumer).
    pub async fn queue_depth(&self) -> u32 {
        self.broker
            .ready_messages(&self.queue)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Points the relay's `postgres.url` at `hosts` (`host:port`, tried in order for the
    /// primary) in place of the server the test's database was made on; the user, the database
    /// and the parameters stay. Returns the URL now in the config file.
    pub fn relay_postgres_hosts(&self, hosts: &[String]) -> String {
        let url = url::Url::parse(&self.pg_url).expect("the test's own URL");
        let server = format!(
            "{}:{}",
            url.host_str().expect("a host"),
            url.port().unwrap_or(5432)
        );
        let moved = self.pg_url.replacen(&server, &hosts.join(","), 1);
        self.relay_postgres_url(&moved);
        moved
    }

    /// Points the relay's `postgres.url` at `url` in place of the test database's own.
    pub fn relay_postgres_url(&self, url: &str) {
        let quoted = |s: &str| serde_json::Value::String(s.to_owned()).to_string();
        let config = std::fs::read_to_string(&self.config_path).expect("read the config file");
        assert!(config.contains(&quoted(&self.pg_url)), "{config}");
        std::fs::write(
            &self.config_path,
            config.replace(&quoted(&self.pg_url), &quoted(url)),
        )
        .expect("write the config file");
    }

    /// Waits until the test queue holds no message, ready or delivered and not yet acked: the
    /// consumer (which acks after recording) then has every message the broker accepted for
    /// the queue so far, duplicates included.
    pub async fn wait_until_queue_is_settled(&self) {
        eventually(
            "the consumer to have every message the broker holds for the test queue",
            || async {
                self.broker
                    .unsettled_messages(&self.queue)
                    .await
                    .unwrap_or_else(|e| panic!("{e:#}"))
                    == 0
            },
        )
        .await;
    }
}

/// A test's temp dir (config, relay logs), removed when dropped, unless `OBR_TEST_KEEP_DIRS`
/// is set (to read whole relay logs after a run). A failed test has already printed the end
/// of its relays' logs (see [`crate::relay::Relay`]'s drop).
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn create(dir: PathBuf) -> ScratchDir {
        std::fs::create_dir_all(&dir).expect("create the test's temp dir");
        ScratchDir(dir)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if std::env::var_os("OBR_TEST_KEEP_DIRS").is_some() {
            eprintln!("kept {}", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
