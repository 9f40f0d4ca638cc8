//! How a test environment is set up, and the relay config file it renders: short timeouts and
//! backoffs so tests run fast, the test's own database, exchange and table, and whatever a test
//! overrides. Renders text only; [`crate::env::TestEnv`] makes the objects it names.

use serde_json::Value;

/// How a test environment is set up; the defaults suit most tests.
#[derive(Debug, Clone)]
pub struct Setup {
    pub(crate) table: String,
    pub(crate) vhost: bool,
    pub(crate) relay_declares_exchange: bool,
    pub(crate) migrate: bool,
    pub(crate) bindings: Vec<String>,
    /// Another PostgreSQL server for the test's database (see [`Setup::postgres_server`]).
    pub(crate) postgres: Option<url::Url>,
    /// Another broker for the test's exchange and queue (see [`Setup::rabbitmq_server`]).
    pub(crate) rabbitmq: Option<url::Url>,
    /// The test queue is a quorum queue (see [`Setup::quorum_queue`]).
    pub(crate) quorum_queue: bool,
    /// (section, key, TOML value) written into the config, overriding the defaults below.
    settings: Vec<(String, String, String)>,
}

impl Default for Setup {
    fn default() -> Self {
        Self::new()
    }
}

/// What the config names that only exists once the environment is made.
pub(crate) struct Targets<'a> {
    pub pg_url: &'a str,
    pub amqp_url: &'a str,
    /// The test's name, in the relay's AMQP connection name (`obr-test <name>`).
    pub name: &'a str,
    pub exchange: &'a str,
}

impl Setup {
    pub fn new() -> Self {
        Setup {
            table: "public.outbox".into(),
            vhost: false,
            relay_declares_exchange: false,
            migrate: true,
            bindings: vec!["#".into()],
            postgres: None,
            rabbitmq: None,
            quorum_queue: false,
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
    /// the queue with [`crate::env::TestEnv::bind_when_declared`] once the relay has run.
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

    /// Makes the test's database on the PostgreSQL server of `url` (`postgres://user@host:port`,
    /// its query kept: TLS parameters, say) instead of the test server; the relay, `migrate` and
    /// the test's pool all reach it with that URL.
    pub fn postgres_server(mut self, url: &url::Url) -> Self {
        self.postgres = Some(url.clone());
        self
    }

    /// Makes the test's exchange and queue on the broker of `url` (a vhost's URL: a node of a
    /// [`crate::rabbit_cluster::RabbitCluster`], say) instead of the test broker; the consumer and
    /// the relay's `rabbitmq.url` use it (set `rabbitmq.url` to list more nodes).
    pub fn rabbitmq_server(mut self, url: &url::Url) -> Self {
        self.rabbitmq = Some(url.clone());
        self
    }

    /// Declares the test queue as a quorum queue (`x-queue-type = quorum`), replicated on
    /// every node of a cluster: the broker confirms a message only once a majority holds it.
    pub fn quorum_queue(mut self) -> Self {
        self.quorum_queue = true;
        self
    }

    /// Sets `section.key = value` (value as TOML, e.g. `"\"1s\""` or `"3"`). Sections `outbox`
    /// and `outbox.retry` are the table's; `rabbitmq.tls` is written only when set.
    pub fn set(mut self, section: &str, key: &str, value: &str) -> Self {
        self.settings
            .retain(|(s, k, _)| !(s == section && k == key));
        self.settings
            .push((section.into(), key.into(), value.into()));
        self
    }

    /// The relay's config file for `targets`.
    pub(crate) fn render(&self, targets: &Targets<'_>) -> String {
        let mut sections: Vec<(&str, Vec<(String, String)>)> = vec![
            (
                "postgres",
                vec![
                    ("url".into(), toml_string(targets.pg_url)),
                    ("connect_timeout".into(), "\"5s\"".into()),
                ],
            ),
            (
                "rabbitmq",
                vec![
                    ("url".into(), toml_string(targets.amqp_url)),
                    (
                        "connection_name".into(),
                        toml_string(&format!("obr-test {}", targets.name)),
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
                    ("exchange".into(), toml_string(targets.exchange)),
                ],
            ),
            ("outbox.retry", vec![]),
            ("health", vec![]),
            // After the others: TOML lets a sub-table come after unrelated tables.
            ("rabbitmq.tls", vec![]),
        ];
        if self.relay_declares_exchange {
            sections[5].1.push((
                "declare_exchange".into(),
                "{ type = \"topic\", durable = true }".into(),
            ));
        }
        for (section, key, value) in &self.settings {
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
}

/// A TOML basic string (JSON string literals are valid ones).
fn toml_string(s: &str) -> String {
    Value::String(s.to_owned()).to_string()
}
