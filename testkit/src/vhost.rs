//! A RabbitMQ vhost to work in: one of its own (made with `rabbitmqctl add_vhost`, deleted with
//! everything in it), or a shared one (the default `/`, say), where the queues and exchanges
//! declared through it are deleted instead. Removal happens when asked, or when dropped unless
//! kept. Every call opens a connection of its own and closes it: fault tests close connections
//! under the caller, so none is kept.

use std::sync::Mutex;

use anyhow::Context;
use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use url::Url;

use crate::database::redacted;
use crate::servers::{rabbitmqctl, run_tool_blocking, Servers};

/// A vhost and what this run declared in it.
pub struct Vhost {
    url: Url,
    /// The vhost's name, when it is this run's own.
    own: Option<String>,
    connection_name: Option<String>,
    declared: Mutex<Declared>,
    /// Still this value's to remove (false once removed or kept).
    owned: bool,
}

/// Queues and exchanges to delete from a shared vhost at the end.
#[derive(Debug, Default, Clone)]
struct Declared {
    queues: Vec<String>,
    exchanges: Vec<String>,
}

impl Vhost {
    /// Creates vhost `name` and lets the servers' RabbitMQ user (`guest` when the URL names
    /// none) configure, write and read everything in it.
    pub async fn create(servers: &Servers, name: &str) -> anyhow::Result<Vhost> {
        rabbitmqctl(&["add_vhost", name]).await?;
        // From here on, dropping the value deletes the vhost, also when the next step fails.
        let mut vhost = Vhost::shared(servers.rabbitmq_url(Some(name)));
        vhost.own = Some(name.to_owned());
        let user = match servers.rabbitmq.username() {
            "" => "guest",
            user => user,
        };
        rabbitmqctl(&["set_permissions", "-p", name, user, ".*", ".*", ".*"]).await?;
        Ok(vhost)
    }

    /// An existing vhost (`url` names it): only what is declared through this value is removed.
    pub fn shared(url: Url) -> Vhost {
        Vhost {
            url,
            own: None,
            connection_name: None,
            declared: Mutex::new(Declared::default()),
            owned: true,
        }
    }

    /// Names this value's connections (as the broker's connection list shows them).
    pub fn with_connection_name(mut self, name: impl Into<String>) -> Vhost {
        self.connection_name = Some(name.into());
        self
    }

    /// The vhost's AMQP URL.
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// The vhost's name when it is this run's own.
    pub fn own_name(&self) -> Option<&str> {
        self.own.as_deref()
    }

    /// The vhost's name as `rabbitmqctl -p` takes it (`/` for the default vhost).
    pub fn name(&self) -> String {
        let path = self.url.path().trim_start_matches('/');
        let name = path.replace("%2f", "/").replace("%2F", "/");
        if name.is_empty() {
            "/".to_owned()
        } else {
            name
        }
    }

    /// A fresh connection to the vhost.
    pub async fn connect(&self) -> anyhow::Result<Connection> {
        let mut properties = ConnectionProperties::default();
        if let Some(name) = &self.connection_name {
            properties = properties.with_connection_name(name.as_str().into());
        }
        let connect = Connection::connect(self.url.as_str(), properties);
        tokio::time::timeout(std::time::Duration::from_secs(30), connect)
            .await
            .map_err(|_| anyhow::anyhow!("no answer within 30 s"))
            .and_then(|connected| Ok(connected?))
            .with_context(|| format!("connecting to RabbitMQ at {}", redacted(&self.url)))
    }

    /// A channel on a fresh connection, which lives as long as the channel is open.
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        let connection = self.connect().await?;
        Ok(connection.create_channel().await?)
    }

    /// Runs `f` on a channel of a fresh connection, then closes the connection.
    async fn with_channel<T, F, Fut>(&self, f: F) -> anyhow::Result<T>
    where
        F: FnOnce(Channel) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<T>>,
    {
        let connection = self.connect().await?;
        let channel = connection.create_channel().await?;
        let outcome = f(channel).await;
        close_quietly(&connection, "done").await;
        outcome
    }

    /// Declares a durable exchange of `kind`, deleted with the vhost's objects at the end.
    pub async fn declare_exchange(&self, name: &str, kind: ExchangeKind) -> anyhow::Result<()> {
        let options = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        self.with_channel(|ch| async move {
            ch.exchange_declare(name.into(), kind, options, FieldTable::default())
                .await
                .with_context(|| format!("declaring exchange {name}"))
        })
        .await?;
        self.record_exchange(name);
        Ok(())
    }

    /// Counts an exchange someone else declares (the relay, say) among those deleted at the end.
    pub fn record_exchange(&self, name: &str) {
        let mut declared = self.declared.lock().unwrap_or_else(|e| e.into_inner());
        declared.exchanges.push(name.to_owned());
    }

    /// Declares a durable queue, deleted with the vhost's objects at the end.
    pub async fn declare_queue(&self, name: &str) -> anyhow::Result<()> {
        self.declare_queue_of(name, false).await
    }

    /// Declares a durable queue, a quorum queue when `quorum`, deleted with the vhost's
    /// objects at the end.
    pub async fn declare_queue_of(&self, name: &str, quorum: bool) -> anyhow::Result<()> {
        let mut arguments = FieldTable::default();
        if quorum {
            arguments.insert(
                "x-queue-type".into(),
                lapin::types::AMQPValue::LongString("quorum".into()),
            );
        }
        self.with_channel(|ch| async move {
            ch.queue_declare(name.into(), QueueDeclareOptions::durable(), arguments)
                .await
                .with_context(|| format!("declaring queue {name}"))
        })
        .await?;
        let mut declared = self.declared.lock().unwrap_or_else(|e| e.into_inner());
        declared.queues.push(name.to_owned());
        Ok(())
    }

    /// Binds `queue` to `exchange` with `routing_key`.
    pub async fn bind(&self, queue: &str, exchange: &str, routing_key: &str) -> anyhow::Result<()> {
        self.with_channel(|ch| async move {
            ch.queue_bind(
                queue.into(),
                exchange.into(),
                routing_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("binding queue {queue} to exchange {exchange}"))
        })
        .await
    }

    /// Deletes an exchange now (as an operator might while the relay runs).
    pub async fn delete_exchange(&self, name: &str) -> anyhow::Result<()> {
        self.with_channel(|ch| async move {
            ch.exchange_delete(name.into(), ExchangeDeleteOptions::default())
                .await
                .with_context(|| format!("deleting exchange {name}"))
        })
        .await
    }

    /// True when `exchange` exists (a passive declare, which closes its channel when it does not).
    pub async fn exchange_exists(&self, exchange: &str) -> anyhow::Result<bool> {
        let options = ExchangeDeclareOptions {
            passive: true,
            ..ExchangeDeclareOptions::default()
        };
        self.with_channel(|ch| async move {
            Ok(ch
                .exchange_declare(
                    exchange.into(),
                    ExchangeKind::Topic,
                    options,
                    FieldTable::default(),
                )
                .await
                .is_ok())
        })
        .await
    }

    /// Messages ready in `queue` (not yet delivered to a consumer).
    pub async fn ready_messages(&self, queue: &str) -> anyhow::Result<u32> {
        let options = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        self.with_channel(|ch| async move {
            let q = ch
                .queue_declare(queue.into(), options, FieldTable::default())
                .await
                .with_context(|| format!("queue {queue} does not exist"))?;
            Ok(q.message_count())
        })
        .await
    }

    /// Messages in `queue` either ready or delivered and not yet acked (from `rabbitmqctl
    /// list_queues`): 0 means a consumer that acks after recording has every message the
    /// broker holds for the queue.
    pub async fn unsettled_messages(&self, queue: &str) -> anyhow::Result<u64> {
        let vhost = self.name();
        let listing = rabbitmqctl(&[
            "list_queues",
            "-p",
            &vhost,
            "--quiet",
            "--no-table-headers",
            "name",
            "messages",
        ])
        .await?;
        listing
            .lines()
            .filter_map(|line| line.rsplit_once('\t'))
            .find(|(name, _)| *name == queue)
            .with_context(|| format!("rabbitmqctl list_queues does not show queue {queue}"))?
            .1
            .trim()
            .parse()
            .with_context(|| format!("the message count of queue {queue}"))
    }

    /// Empties `queue`; returns how many messages it dropped.
    pub async fn purge_queue(&self, queue: &str) -> anyhow::Result<u32> {
        self.with_channel(|ch| async move {
            ch.queue_purge(queue.into(), QueuePurgeOptions::default())
                .await
                .with_context(|| format!("purging queue {queue}"))
        })
        .await
    }

    /// Removes now what this value made: its own vhost with everything in it, or the queues and
    /// exchanges declared in a shared one.
    pub async fn remove(mut self) -> anyhow::Result<()> {
        self.owned = false;
        match self.own.clone() {
            Some(name) => rabbitmqctl(&["delete_vhost", &name]).await.map(|_| ()),
            None => self.delete_declared().await,
        }
    }

    /// Leaves everything in place (for inspection after a run).
    pub fn keep(mut self) {
        self.owned = false;
    }

    async fn delete_declared(&self) -> anyhow::Result<()> {
        let declared = self
            .declared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if declared.queues.is_empty() && declared.exchanges.is_empty() {
            return Ok(());
        }
        // Everything is tried; the first failure is reported. A failed delete closes the
        // channel, so each delete gets a channel of its own.
        let connection = self.connect().await?;
        let mut first_failure = None;
        for queue in &declared.queues {
            let deleted = match connection.create_channel().await {
                Ok(ch) => ch
                    .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await
                    .map(|_| ()),
                Err(e) => Err(e),
            };
            if let Err(e) = deleted {
                first_failure.get_or_insert(
                    anyhow::Error::new(e).context(format!("deleting queue {queue}")),
                );
            }
        }
        for exchange in &declared.exchanges {
            let deleted = match connection.create_channel().await {
                Ok(ch) => {
                    ch.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                        .await
                }
                Err(e) => Err(e),
            };
            if let Err(e) = deleted {
                first_failure.get_or_insert(
                    anyhow::Error::new(e).context(format!("deleting exchange {exchange}")),
                );
            }
        }
        close_quietly(&connection, "cleanup done").await;
        first_failure.map_or(Ok(()), Err)
    }
}

/// Closes a connection whose work is done, giving the broker's answer a few seconds: lapin has
/// left such a close pending for good (the broker had closed the connection, the future never
/// resolved), which hung a test in its setup until the whole run was stopped.
async fn close_quietly(connection: &Connection, reason: &str) {
    let close = connection.close(200, reason.into());
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), close).await;
}

impl Drop for Vhost {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        self.owned = false;
        // Best effort: a failed test's cleanup must not hide its failure.
        if let Some(name) = &self.own {
            let _ = run_tool_blocking("rabbitmqctl", &["delete_vhost", name]);
            return;
        }
        let shared = Vhost {
            url: self.url.clone(),
            own: None,
            connection_name: self.connection_name.clone(),
            declared: Mutex::new(
                self.declared
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone(),
            ),
            owned: false,
        };
        // Drop cannot await and may run inside a runtime: delete on a thread with a runtime of
        // its own.
        let cleanup = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                let _ = rt.block_on(shared.delete_declared());
            }
        });
        let _ = cleanup.join();
    }
}
