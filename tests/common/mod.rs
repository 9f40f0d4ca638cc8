//! Test harness: each test gets its own PostgreSQL database, its own exchange and queue (and,
//! for broker-fault tests, its own vhost), a config file in a temp dir, the real `outbox-relay`
//! binary as a child process, and a real AMQP consumer. Everything is removed on drop.
//!
//! Servers come from `OUTBOX_RELAY_TEST_PG` and `OUTBOX_RELAY_TEST_AMQP` (defaults: the local
//! PostgreSQL and RabbitMQ with their stock users).
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use rand::Rng;
use serde_json::{json, Value};
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
use sqlx::{Connection as _, Row};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_outbox-relay");

/// How long any wait in these tests may take before it counts as a failure.
pub const TIMEOUT: Duration = Duration::from_secs(60);

pub fn pg_base() -> String {
    std::env::var("OUTBOX_RELAY_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

pub fn amqp_base() -> String {
    std::env::var("OUTBOX_RELAY_TEST_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672".into())
}

/// The PostgreSQL URL of database `db` on the test server.
pub fn pg_url(db: &str) -> String {
    let mut url = url::Url::parse(&pg_base()).expect("OUTBOX_RELAY_TEST_PG is a URL");
    url.set_path(&format!("/{db}"));
    url.to_string()
}

/// The AMQP URL of `vhost` (None: the default vhost "/") on the test broker.
pub fn amqp_url(vhost: Option<&str>) -> String {
    let mut url = url::Url::parse(&amqp_base()).expect("OUTBOX_RELAY_TEST_AMQP is a URL");
    match vhost {
        Some(v) => url.set_path(&format!("/{v}")),
        None if url.path().is_empty() || url.path() == "/" => url.set_path("/%2f"),
        None => {}
    }
    url.to_string()
}

/// A fresh name for this test's database, exchange, queue and vhost.
pub fn unique_name() -> String {
    format!(
        "obr_t_{:012x}",
        rand::rng().random::<u64>() & 0xffff_ffff_ffff
    )
}

/// Runs `rabbitmqctl` and panics with its output when it fails.
pub fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl can be run");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Polls `check` every 50 ms until it returns true; panics after [`TIMEOUT`] naming `what`.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {TIMEOUT:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How a test environment is set up; the defaults suit most tests.
#[derive(Debug, Clone)]
pub struct Setup {
    table: String,
    vhost: bool,
    relay_declares_exchange: bool,
    migrate: bool,
    bindings: Vec<String>,
    /// (section, key, TOML value) written into the config, overriding the defaults below.
    settings: Vec<(String, String, String)>,
}

impl Default for Setup {
    fn default() -> Self {
        Self::new()
    }
}

impl Setup {
    pub fn new() -> Self {
        Setup {
            table: "public.outbox".into(),
            vhost: false,
            relay_declares_exchange: false,
            migrate: true,
            bindings: vec!["#".into()],
            settings: Vec::new(),
        }
    }

    /// The outbox table's name in the config (`schema.table`).
    pub fn table(mut self, table: &str) -> Self {
        self.table = table.into();
        self
    }

    /// Run the relay and the consumer in a vhost of their own (needed to close connections).
    pub fn own_vhost(mut self) -> Self {
        self.vhost = true;
        self
    }

    /// The relay declares the table's exchange (`declare_exchange`); the test does not, and binds
    /// the queue with [`TestEnv::bind_when_declared`] once the relay has run.
    pub fn relay_declares_exchange(mut self) -> Self {
        self.relay_declares_exchange = true;
        self
    }

    /// Leave the database empty: the test runs `outbox-relay migrate` itself.
    pub fn without_migrate(mut self) -> Self {
        self.migrate = false;
        self
    }

    /// Routing keys binding the queue to the table's exchange (default `#`, everything).
    pub fn bindings(mut self, keys: &[&str]) -> Self {
        self.bindings = keys.iter().map(|k| k.to_string()).collect();
        self
    }

    /// Sets `section.key = value` (value as TOML, e.g. `"\"1s\""` or `"3"`). Sections `outbox`
    /// and `outbox.retry` are the table's.
    pub fn set(mut self, section: &str, key: &str, value: &str) -> Self {
        self.settings
            .retain(|(s, k, _)| !(s == section && k == key));
        self.settings
            .push((section.into(), key.into(), value.into()));
        self
    }
}

/// One test's private world: database, exchange, queue, optional vhost, config file and a
/// consumer that collects every message reaching the queue.
pub struct TestEnv {
    pub name: String,
    pub db: String,
    pub pg_url: String,
    pub amqp_url: String,
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
    pub consumer: Consumer,
    exchanges: Mutex<Vec<String>>,
    relays_started: Mutex<u32>,
}

impl TestEnv {
    pub async fn new(setup: Setup) -> TestEnv {
        let name = unique_name();
        let db = name.clone();
        let mut admin = PgConnection::connect(&pg_url("postgres"))
            .await
            .expect("connect to the test PostgreSQL server");
        sqlx::query(&format!("CREATE DATABASE \"{db}\""))
            .execute(&mut admin)
            .await
            .expect("create the test database");
        let _ = admin.close().await;

        let vhost = setup.vhost.then(|| name.clone());
        if let Some(v) = &vhost {
            rabbitmqctl(&["add_vhost", v]);
            rabbitmqctl(&["set_permissions", "-p", v, "guest", ".*", ".*", ".*"]);
        }
        let amqp_url = amqp_url(vhost.as_deref());
        let exchange = format!("{name}_x");
        let queue = format!("{name}_q");
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir).expect("create the test's temp dir");
        let config_path = dir.join("outbox-relay.toml");

        let env = TestEnv {
            pg_url: pg_url(&db),
            consumer: Consumer::idle(),
            pool: PgPoolOptions::new()
                .max_connections(8)
                .connect_lazy(&pg_url(&db))
                .expect("a lazy pool"),
            name,
            db,
            amqp_url,
            vhost,
            exchange,
            queue,
            table: setup.table.clone(),
            dir,
            config_path,
            exchanges: Mutex::new(Vec::new()),
            relays_started: Mutex::new(0),
        };
        std::fs::write(&env.config_path, env.render_config(&setup)).expect("write the config file");

        let channel = env.channel().await;
        channel
            .queue_declare(
                env.queue.as_str().into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await
            .expect("declare the test queue");
        if !setup.relay_declares_exchange {
            env.declare_exchange(&env.exchange).await;
            for key in &setup.bindings {
                env.bind(&env.exchange, key).await;
            }
        } else {
            env.exchanges.lock().unwrap().push(env.exchange.clone());
        }
        let _ = channel.close(200, "setup done".into()).await;

        if setup.migrate {
            let migrated = env.cli(&["migrate"]).await;
            assert_eq!(migrated.code, 0, "migrate failed: {migrated:?}");
        }
        let mut env = env;
        env.consumer = Consumer::start(env.amqp_url.clone(), env.queue.clone()).await;
        env
    }

    fn render_config(&self, setup: &Setup) -> String {
        let mut sections: Vec<(&str, Vec<(String, String)>)> = vec![
            (
                "postgres",
                vec![
                    ("url".into(), toml_string(&self.pg_url)),
                    ("connect_timeout".into(), "\"5s\"".into()),
                ],
            ),
            (
                "rabbitmq",
                vec![
                    ("url".into(), toml_string(&self.amqp_url)),
                    (
                        "connection_name".into(),
                        toml_string(&format!("obr-test {}", self.name)),
                    ),
                    ("connect_timeout".into(), "\"5s\"".into()),
                    ("confirm_timeout".into(), "\"10s\"".into()),
                ],
            ),
            (
                "relay",
                vec![
                    ("batch_size".into(), "200".into()),
                    ("poll_interval".into(), "\"200ms\"".into()),
                    ("shutdown_timeout".into(), "\"10s\"".into()),
                    ("reconnect_max_delay".into(), "\"1s\"".into()),
                ],
            ),
            (
                "retry",
                vec![
                    ("initial_delay".into(), "\"50ms\"".into()),
                    ("max_delay".into(), "\"500ms\"".into()),
                ],
            ),
            ("log", vec![("level".into(), "\"info\"".into())]),
            (
                "outbox",
                vec![
                    ("table".into(), toml_string(&self.table)),
                    ("exchange".into(), toml_string(&self.exchange)),
                ],
            ),
            ("outbox.retry", vec![]),
            ("health", vec![]),
        ];
        if setup.relay_declares_exchange {
            sections[5].1.push((
                "declare_exchange".into(),
                "{ type = \"topic\", durable = true }".into(),
            ));
        }
        for (section, key, value) in &setup.settings {
            let entries = &mut sections
                .iter_mut()
                .find(|(s, _)| s == section)
                .unwrap_or_else(|| panic!("unknown config section {section}"))
                .1;
            entries.retain(|(k, _)| k != key);
            entries.push((key.clone(), value.clone()));
        }
        let mut text = String::new();
        for (section, entries) in sections {
            if section != "outbox" && entries.is_empty() {
                continue;
            }
            text += &match section {
                "outbox" => "[[outbox]]\n".to_string(),
                s => format!("[{s}]\n"),
            };
            for (k, v) in entries {
                text += &format!("{k} = {v}\n");
            }
            text += "\n";
        }
        text
    }

    /// A fresh channel on a fresh connection to the test's vhost (connections may be closed
    /// by fault tests, so none is kept).
    pub async fn channel(&self) -> Channel {
        let connection = Connection::connect(&self.amqp_url, ConnectionProperties::default())
            .await
            .expect("connect to the test broker");
        connection.create_channel().await.expect("open a channel")
    }

    /// Declares a durable topic exchange (removed at the end of the test).
    pub async fn declare_exchange(&self, name: &str) {
        let channel = self.channel().await;
        channel
            .exchange_declare(
                name.into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare an exchange");
        self.exchanges.lock().unwrap().push(name.to_owned());
        let _ = channel.close(200, "done".into()).await;
    }

    /// Deletes an exchange (as an operator might while the relay runs).
    pub async fn delete_exchange(&self, name: &str) {
        let channel = self.channel().await;
        channel
            .exchange_delete(name.into(), ExchangeDeleteOptions::default())
            .await
            .expect("delete an exchange");
        let _ = channel.close(200, "done".into()).await;
    }

    /// Binds the test queue to `exchange` with `routing_key`.
    pub async fn bind(&self, exchange: &str, routing_key: &str) {
        let channel = self.channel().await;
        channel
            .queue_bind(
                self.queue.as_str().into(),
                exchange.into(),
                routing_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind the test queue");
        let _ = channel.close(200, "done".into()).await;
    }

    /// True when `exchange` exists (a passive declare on a throwaway channel).
    pub async fn exchange_exists(&self, exchange: &str) -> bool {
        let channel = self.channel().await;
        let found = channel
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    passive: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .is_ok();
        if found {
            let _ = channel.close(200, "done".into()).await;
        }
        found
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
        let channel = self.channel().await;
        let q = channel
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("the test queue exists");
        let _ = channel.close(200, "done".into()).await;
        q.message_count()
    }

    /// Runs `outbox-relay --config <this test's config> <args>` to completion.
    pub async fn cli(&self, args: &[&str]) -> CliOutput {
        run_cli(&self.config_path, args).await
    }

    /// Starts `outbox-relay run` as a child process, logging to a file in the temp dir.
    pub fn start_relay(&self) -> Relay {
        let n = {
            let mut n = self.relays_started.lock().unwrap();
            *n += 1;
            *n
        };
        let log = self.dir.join(format!("relay-{n}.log"));
        let file = std::fs::File::create(&log).expect("create the relay log");
        let child = relay_command(&self.config_path)
            .arg("run")
            .stdout(Stdio::from(file.try_clone().expect("clone the log file")))
            .stderr(Stdio::from(file))
            .spawn()
            .expect("start outbox-relay run");
        Relay {
            child,
            log,
            label: format!("relay {n} of {}", self.name),
            exited: None,
        }
    }

    /// Inserts `rows` in one transaction; returns their ids in the order given.
    pub async fn insert(&self, rows: &[NewRow]) -> Vec<i64> {
        let mut tx = self.pool.begin().await.expect("begin");
        let ids = insert_rows(&mut tx, &self.table, rows)
            .await
            .expect("insert outbox rows");
        tx.commit().await.expect("commit");
        ids
    }

    /// The relay-owned state of one row.
    pub async fn row(&self, id: i64) -> RowState {
        let sql = format!(
            "SELECT id, dedup_key, ordering_key, attempts, last_error, published_at, parked_at, created_at, \
                    extract(epoch FROM created_at)::float8 AS created_epoch \
             FROM {} WHERE id = $1",
            quoted_table(&self.table)
        );
        let r = sqlx::query(&sql)
            .bind(id)
            .fetch_one(&self.pool)
            .await
            .expect("read a row");
        RowState {
            id: r.get("id"),
            dedup_key: r.get("dedup_key"),
            ordering_key: r.get("ordering_key"),
            attempts: r.get("attempts"),
            last_error: r.get("last_error"),
            published_at: r.get("published_at"),
            parked_at: r.get("parked_at"),
            created_at: r.get("created_at"),
            created_epoch: r.get("created_epoch"),
        }
    }

    /// Ids of the rows marked published.
    pub async fn published_ids(&self) -> HashSet<i64> {
        let sql = format!(
            "SELECT id FROM {} WHERE published_at IS NOT NULL",
            quoted_table(&self.table)
        );
        sqlx::query_scalar::<_, i64>(&sql)
            .fetch_all(&self.pool)
            .await
            .expect("read published ids")
            .into_iter()
            .collect()
    }

    /// Number of rows not yet marked published.
    pub async fn unpublished_count(&self) -> i64 {
        let sql = format!(
            "SELECT count(*) FROM {} WHERE published_at IS NULL",
            quoted_table(&self.table)
        );
        sqlx::query_scalar(&sql)
            .fetch_one(&self.pool)
            .await
            .expect("count rows")
    }

    /// Waits until every row of the table is marked published.
    pub async fn wait_all_marked(&self) {
        eventually("every row to be marked published", || async {
            self.unpublished_count().await == 0
        })
        .await;
    }

    /// Terminates only the session holding the table's advisory lock (the relay's lock and
    /// LISTEN session); returns how many were terminated.
    pub async fn terminate_lock_session(&self) -> i64 {
        sqlx::query_scalar(
            "SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks l \
             JOIN pg_database d ON d.oid = l.database \
             WHERE d.datname = $1 AND l.locktype = 'advisory' AND l.granted AND l.objsubid = 1",
        )
        .bind(&self.db)
        .fetch_one(&self.pool)
        .await
        .expect("terminate the lock session")
    }

    /// Terminates this test database's sessions opened by the relay (never the test's own).
    pub async fn terminate_relay_sessions(&self) -> i64 {
        sqlx::query_scalar(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = $1 AND application_name = 'outbox-relay' AND pid <> pg_backend_pid()",
        )
        .bind(&self.db)
        .fetch_one(&self.pool)
        .await
        .expect("terminate the relay's sessions")
    }
}

impl TestEnv {
    /// Freezes (SIGSTOP) the backends of the relay's sessions in the test's database: their
    /// sockets stay open and nothing comes back, like a network that went silent. They are
    /// thawed (SIGCONT) when the returned guard drops, also when the test fails.
    pub async fn freeze_relay_sessions(&self) -> FrozenBackends {
        let pids: Vec<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity \
             WHERE datname = $1 AND application_name = 'outbox-relay' AND pid <> pg_backend_pid()",
        )
        .bind(&self.db)
        .fetch_all(&self.pool)
        .await
        .expect("list the relay's sessions");
        // The guard exists before the first SIGSTOP, so a failure below still thaws them.
        let frozen = FrozenBackends { pids };
        for pid in &frozen.pids {
            assert!(signal("-STOP", *pid), "kill -STOP {pid} failed");
        }
        frozen
    }
}

/// Backends stopped by [`TestEnv::freeze_relay_sessions`]; continued when dropped.
pub struct FrozenBackends {
    pub pids: Vec<i32>,
}

impl Drop for FrozenBackends {
    fn drop(&mut self) {
        for pid in &self.pids {
            signal("-CONT", *pid);
        }
    }
}

/// `kill SIGNAL PID`; true when it succeeded.
fn signal(signal: &str, pid: i32) -> bool {
    std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success())
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        self.consumer.stop();
        let db = self.db.clone();
        let vhost = self.vhost.clone();
        let queue = self.queue.clone();
        let exchanges =
            std::mem::take(&mut *self.exchanges.lock().unwrap_or_else(|e| e.into_inner()));
        let dir = self.dir.clone();
        // Drop cannot await and may run inside the test's runtime: clean up on a thread with a
        // runtime of its own.
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a cleanup runtime");
            rt.block_on(async {
                if let Ok(mut admin) = PgConnection::connect(&pg_url("postgres")).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
                        .execute(&mut admin)
                        .await;
                    let _ = admin.close().await;
                }
                match &vhost {
                    Some(v) => {
                        let _ = Command::new("rabbitmqctl")
                            .args(["delete_vhost", v])
                            .output();
                    }
                    None => {
                        if let Ok(c) =
                            Connection::connect(&amqp_url(None), ConnectionProperties::default())
                                .await
                        {
                            if let Ok(ch) = c.create_channel().await {
                                let _ = ch
                                    .queue_delete(
                                        queue.as_str().into(),
                                        QueueDeleteOptions::default(),
                                    )
                                    .await;
                                for x in &exchanges {
                                    let _ = ch
                                        .exchange_delete(
                                            x.as_str().into(),
                                            ExchangeDeleteOptions::default(),
                                        )
                                        .await;
                                }
                            }
                            let _ = c.close(200, "test cleanup".into()).await;
                        }
                    }
                }
            });
            // A failed test has already printed its relays' logs (see `Relay`'s drop).
            let _ = std::fs::remove_dir_all(&dir);
        });
        let _ = cleanup.join();
    }
}

fn toml_string(s: &str) -> String {
    Value::String(s.to_owned()).to_string()
}

/// `"schema"."table"` for a test table name.
pub fn quoted_table(table: &str) -> String {
    let (schema, name) = table.split_once('.').unwrap_or(("public", table));
    format!("\"{schema}\".\"{name}\"")
}

fn relay_command(config: &std::path::Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("--config").arg(config);
    // The test's config is the whole truth: no overrides leaking in from the environment.
    for (key, _) in std::env::vars() {
        if key.starts_with("OUTBOX_RELAY") || key == "RUST_LOG" || key == "RUST_BACKTRACE" {
            cmd.env_remove(key);
        }
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// What a CLI command printed and its exit code.
#[derive(Debug, Clone)]
pub struct CliOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `outbox-relay --config <config> <args>` to completion.
pub async fn run_cli(config: &std::path::Path, args: &[&str]) -> CliOutput {
    let mut cmd = tokio::process::Command::from(relay_command(config));
    let out = tokio::time::timeout(TIMEOUT, cmd.args(args).output())
        .await
        .unwrap_or_else(|_| panic!("outbox-relay {args:?} did not finish within {TIMEOUT:?}"))
        .expect("run outbox-relay");
    CliOutput {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A running `outbox-relay run`. Killed on drop; its log is printed when the test failed.
pub struct Relay {
    child: Child,
    log: PathBuf,
    label: String,
    exited: Option<ExitStatus>,
}

impl Relay {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends SIGTERM (graceful drain).
    pub fn sigterm(&self) {
        // Only while not reaped: until then the pid is still our child's.
        if self.exited.is_none() {
            let sent = Command::new("kill")
                .args(["-TERM", &self.pid().to_string()])
                .status()
                .expect("run kill");
            assert!(sent.success(), "kill -TERM {} failed", self.pid());
        }
    }

    /// SIGKILLs the relay and reaps it.
    pub fn sigkill(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            self.exited = self.child.wait().ok();
        }
    }

    /// Waits for the process to exit; panics after [`TIMEOUT`].
    pub async fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.exited {
                return status;
            }
            if let Some(status) = self.child.try_wait().expect("poll the relay process") {
                self.exited = Some(status);
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {TIMEOUT:?}",
                self.label
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        self.exited.is_none() && matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits until the relay's log contains `needle`.
    pub async fn wait_for_log(&self, needle: &str) {
        eventually(
            &format!("{:?} in the log of {}", needle, self.label),
            || async { self.log().contains(needle) },
        )
        .await;
    }

    /// Everything the relay logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.sigkill();
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(80)..];
            eprintln!(
                "---- {} log (last {} lines) ----\n{}\n----",
                self.label,
                tail.len(),
                tail.join("\n")
            );
        }
    }
}

/// A row as a producer writes it.
#[derive(Debug, Clone)]
pub struct NewRow {
    pub dedup_key: String,
    pub ordering_key: String,
    pub routing_key: String,
    pub event_type: String,
    pub payload: Value,
    pub headers: Value,
    pub exchange: Option<String>,
}

impl NewRow {
    /// A row of `ordering_key` with routing key `test.<ordering_key>`, type `TestEvent`, a small
    /// payload naming it, and no extra headers.
    pub fn new(dedup_key: impl Into<String>, ordering_key: impl Into<String>) -> NewRow {
        let dedup_key = dedup_key.into();
        let ordering_key = ordering_key.into();
        NewRow {
            routing_key: format!("test.{ordering_key}"),
            event_type: "TestEvent".into(),
            payload: json!({ "dedup_key": dedup_key, "ordering_key": ordering_key }),
            headers: json!({}),
            exchange: None,
            dedup_key,
            ordering_key,
        }
    }

    pub fn exchange(mut self, exchange: &str) -> Self {
        self.exchange = Some(exchange.into());
        self
    }

    pub fn routing_key(mut self, key: &str) -> Self {
        self.routing_key = key.into();
        self
    }

    pub fn headers(mut self, headers: Value) -> Self {
        self.headers = headers;
        self
    }

    pub fn payload(mut self, payload: Value) -> Self {
        self.payload = payload;
        self
    }

    pub fn event_type(mut self, event_type: &str) -> Self {
        self.event_type = event_type.into();
        self
    }
}

/// `count` rows over `keys` ordering keys named `<prefix>-k<n>`, round-robin, dedup keys
/// `<prefix>-<i>`.
pub fn rows_over_keys(prefix: &str, keys: usize, count: usize) -> Vec<NewRow> {
    (0..count)
        .map(|i| NewRow::new(format!("{prefix}-{i}"), format!("{prefix}-k{}", i % keys)))
        .collect()
}

/// A producer inserting rows steadily in the background (load during a fault): every `tick`,
/// one transaction of `per_tick` rows over `keys` keys named `<prefix>-k<n>`.
pub struct Producer {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<usize>,
}

impl Producer {
    pub fn start(
        env: &TestEnv,
        prefix: &str,
        keys: usize,
        per_tick: usize,
        tick: Duration,
    ) -> Producer {
        let stop = tokio_util::sync::CancellationToken::new();
        let pool = env.pool.clone();
        let table = env.table.clone();
        let prefix = prefix.to_owned();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let mut written = 0;
            while !token.is_cancelled() {
                let rows: Vec<NewRow> = (written..written + per_tick)
                    .map(|i| {
                        NewRow::new(format!("{prefix}-{i}"), format!("{prefix}-k{}", i % keys))
                    })
                    .collect();
                let mut tx = pool.begin().await.expect("begin");
                insert_rows(&mut tx, &table, &rows)
                    .await
                    .expect("insert outbox rows");
                tx.commit().await.expect("commit");
                written += per_tick;
                tokio::time::sleep(tick).await;
            }
            written
        });
        Producer { stop, task }
    }

    /// Stops producing; returns how many rows were written.
    pub async fn stop(mut self) -> usize {
        self.stop.cancel();
        (&mut self.task).await.expect("producer task")
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        // A failed test drops the producer early: stop writing into a database about to go.
        self.task.abort();
    }
}

/// Inserts `rows` with one statement on `conn` (inside the caller's transaction, if any);
/// returns their ids in the order given.
pub async fn insert_rows(
    conn: &mut PgConnection,
    table: &str,
    rows: &[NewRow],
) -> sqlx::Result<Vec<i64>> {
    let sql = format!(
        "INSERT INTO {} (dedup_key, ordering_key, routing_key, event_type, payload, headers, exchange) \
         SELECT d, o, r, t, p, h, x \
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::jsonb[], $7::text[]) \
              WITH ORDINALITY AS u(d, o, r, t, p, h, x, n) \
         ORDER BY n \
         RETURNING id, dedup_key",
        quoted_table(table)
    );
    let got = sqlx::query(&sql)
        .bind(rows.iter().map(|r| r.dedup_key.clone()).collect::<Vec<_>>())
        .bind(
            rows.iter()
                .map(|r| r.ordering_key.clone())
                .collect::<Vec<_>>(),
        )
        .bind(
            rows.iter()
                .map(|r| r.routing_key.clone())
                .collect::<Vec<_>>(),
        )
        .bind(
            rows.iter()
                .map(|r| r.event_type.clone())
                .collect::<Vec<_>>(),
        )
        .bind(rows.iter().map(|r| r.payload.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.headers.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.exchange.clone()).collect::<Vec<_>>())
        .fetch_all(conn)
        .await?;
    let by_key: HashMap<String, i64> = got
        .iter()
        .map(|r| (r.get("dedup_key"), r.get("id")))
        .collect();
    Ok(rows.iter().map(|r| by_key[&r.dedup_key]).collect())
}

/// The relay-owned columns of one row.
#[derive(Debug, Clone)]
pub struct RowState {
    pub id: i64,
    pub dedup_key: String,
    pub ordering_key: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub published_at: Option<chrono::DateTime<chrono::Utc>>,
    pub parked_at: Option<chrono::DateTime<chrono::Utc>>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub created_epoch: f64,
}

/// One message as the consumer received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub message_id: String,
    pub kind: Option<String>,
    pub content_type: Option<String>,
    pub delivery_mode: Option<u8>,
    pub timestamp: Option<u64>,
    pub headers: BTreeMap<String, AMQPValue>,
    pub body: Vec<u8>,
    pub exchange: String,
    pub routing_key: String,
    pub redelivered: bool,
}

impl Received {
    /// The `x-outbox-id` header.
    pub fn outbox_id(&self) -> i64 {
        match self.headers.get("x-outbox-id") {
            Some(AMQPValue::LongLongInt(i)) => *i,
            Some(AMQPValue::LongInt(i)) => *i as i64,
            other => panic!(
                "message {} has no integer x-outbox-id: {other:?}",
                self.message_id
            ),
        }
    }

    /// The `x-ordering-key` header.
    pub fn ordering_key(&self) -> String {
        self.header_str("x-ordering-key")
            .unwrap_or_else(|| panic!("message {} has no x-ordering-key", self.message_id))
    }

    /// A string header's value.
    pub fn header_str(&self, name: &str) -> Option<String> {
        match self.headers.get(name)? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
            _ => None,
        }
    }

    pub fn body_json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("the body is JSON")
    }
}

/// A real consumer on the test queue, reconnecting when its connection is closed. Acks each
/// message after recording it, so a message lost with a closed connection is redelivered.
pub struct Consumer {
    received: Arc<Mutex<Vec<Received>>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Consumer {
    fn idle() -> Consumer {
        Consumer {
            received: Arc::new(Mutex::new(Vec::new())),
            task: None,
        }
    }

    async fn start(url: String, queue: String) -> Consumer {
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = received.clone();
        // The first subscription is made before returning, so nothing published after `new`
        // can be missed.
        let first = subscribe(&url, &queue)
            .await
            .expect("start the test consumer");
        let task = tokio::spawn(async move {
            let mut current = Some(first);
            loop {
                let (connection, mut consumer) = match current.take() {
                    Some(c) => c,
                    None => match subscribe(&url, &queue).await {
                        Ok(c) => c,
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            continue;
                        }
                    },
                };
                while let Some(Ok(delivery)) = consumer.next().await {
                    let p = &delivery.properties;
                    let headers = p
                        .headers()
                        .as_ref()
                        .map(|h| {
                            h.inner()
                                .iter()
                                .map(|(k, v)| (k.as_str().to_owned(), v.clone()))
                                .collect()
                        })
                        .unwrap_or_default();
                    sink.lock().unwrap().push(Received {
                        message_id: p
                            .message_id()
                            .as_ref()
                            .map(|s| s.as_str().to_owned())
                            .unwrap_or_default(),
                        kind: p.kind().as_ref().map(|s| s.as_str().to_owned()),
                        content_type: p.content_type().as_ref().map(|s| s.as_str().to_owned()),
                        delivery_mode: *p.delivery_mode(),
                        timestamp: *p.timestamp(),
                        headers,
                        body: delivery.data.clone(),
                        exchange: delivery.exchange.as_str().to_owned(),
                        routing_key: delivery.routing_key.as_str().to_owned(),
                        redelivered: delivery.redelivered,
                    });
                    let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                }
                drop(connection);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Consumer {
            received,
            task: Some(task),
        }
    }

    fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// Every delivery so far, duplicates included, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Distinct message_ids received so far.
    pub fn unique_count(&self) -> usize {
        self.received
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.message_id.as_str())
            .collect::<HashSet<_>>()
            .len()
    }

    /// Waits until at least `n` distinct messages arrived; returns every delivery so far.
    pub async fn wait_for(&self, n: usize) -> Vec<Received> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let got = self.unique_count();
            if got >= n {
                return self.received();
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {TIMEOUT:?}: {got} of {n} distinct messages arrived"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until a message with `message_id` arrived; returns every delivery so far.
    pub async fn wait_for_id(&self, message_id: &str) -> Vec<Received> {
        eventually(&format!("message {message_id}"), || async {
            self.received
                .lock()
                .unwrap()
                .iter()
                .any(|r| r.message_id == message_id)
        })
        .await;
        self.received()
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn subscribe(url: &str, queue: &str) -> lapin::Result<(Connection, lapin::Consumer)> {
    let connection = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel.basic_qos(500, BasicQosOptions::default()).await?;
    let consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((connection, consumer))
}

/// The first delivery of each message_id, in arrival order.
pub fn first_deliveries(received: &[Received]) -> Vec<&Received> {
    let mut seen = HashSet::new();
    received
        .iter()
        .filter(|r| seen.insert(r.message_id.clone()))
        .collect()
}

/// Asserts that, for every ordering key, the first deliveries came in increasing id order.
pub fn assert_first_deliveries_in_id_order(received: &[Received]) {
    let mut last: HashMap<String, i64> = HashMap::new();
    for r in first_deliveries(received) {
        let id = r.outbox_id();
        if let Some(prev) = last.insert(r.ordering_key(), id) {
            assert!(
                prev < id,
                "key {}: id {id} arrived after id {prev} (first deliveries out of order)",
                r.ordering_key()
            );
        }
    }
}

/// Asserts that every redelivered row carries the same message_id (and that distinct rows do
/// not share one). Returns the number of duplicate deliveries.
pub fn assert_duplicates_share_message_id(received: &[Received]) -> usize {
    if std::env::var("OBR_TEST_DEBUG").is_ok() {
        let mut counts: BTreeMap<i64, usize> = BTreeMap::new();
        for r in received {
            *counts.entry(r.outbox_id()).or_default() += 1;
        }
        let dups: Vec<(i64, usize)> = counts.into_iter().filter(|(_, n)| *n > 1).collect();
        eprintln!("duplicated rows (id, deliveries): {dups:?}");
    }
    let mut by_id: HashMap<i64, &str> = HashMap::new();
    let mut by_message: HashMap<&str, i64> = HashMap::new();
    for r in received {
        let id = r.outbox_id();
        let first = *by_id.entry(id).or_insert(r.message_id.as_str());
        assert_eq!(
            first, r.message_id,
            "row {id} was delivered with two message_ids"
        );
        let owner = *by_message.entry(r.message_id.as_str()).or_insert(id);
        assert_eq!(
            owner, id,
            "message_id {} was used by rows {owner} and {id}",
            r.message_id
        );
    }
    received.len() - by_id.len()
}

/// For the key whose deliveries (duplicates included) restart the most, that key and how many
/// times its id sequence went backwards. A relay that restarts once re-sends from its oldest
/// unmarked row: one restart per key. Two relays publishing the same key at once interleave
/// two sequences: many restarts.
pub fn most_restarts_of_a_key(received: &[Received]) -> (String, usize) {
    let mut last: HashMap<String, i64> = HashMap::new();
    let mut restarts: HashMap<String, usize> = HashMap::new();
    for r in received {
        let id = r.outbox_id();
        if let Some(prev) = last.insert(r.ordering_key(), id) {
            if id <= prev {
                *restarts.entry(r.ordering_key()).or_default() += 1;
            }
        }
    }
    restarts
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .unwrap_or_default()
}

/// Ids of the rows delivered at least once.
pub fn delivered_ids(received: &[Received]) -> HashSet<i64> {
    received.iter().map(|r| r.outbox_id()).collect()
}
