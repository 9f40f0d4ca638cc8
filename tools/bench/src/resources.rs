//! What a running relay holds on the servers, as the servers see it: its PostgreSQL sessions
//! (rows of pg_stat_activity for the bench database with `application_name = outbox-relay`,
//! sampled in the background) and its AMQP connections (`rabbitmqctl list_connections`, by
//! the relay's client-provided connection name). Only reads; never acts on the relay.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use outbox_relay_testkit::servers;
use sqlx::postgres::PgPool;
use tokio::task::JoinHandle;

/// How often the session sampler looks: often enough to see a short-lived extra session, cheap
/// enough (one read of the server's shared memory) not to disturb a drain.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// The relay's sessions in the bench database now.
pub async fn relay_sessions(pool: &PgPool, database: &str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name = 'outbox-relay'",
    )
    .bind(database)
    .fetch_one(pool)
    .await?)
}

/// Samples [`relay_sessions`] until stopped and keeps the largest count seen.
pub struct SessionSampler {
    max: Arc<AtomicI64>,
    task: JoinHandle<()>,
}

impl SessionSampler {
    pub fn start(pool: &PgPool, database: &str) -> SessionSampler {
        let max = Arc::new(AtomicI64::new(0));
        let (seen, pool, database) = (max.clone(), pool.clone(), database.to_owned());
        let task = tokio::spawn(async move {
            loop {
                // A failed sample (the server busy with the drain) is only a missing sample.
                if let Ok(n) = relay_sessions(&pool, &database).await {
                    seen.fetch_max(n, Ordering::Relaxed);
                }
                tokio::time::sleep(SAMPLE_EVERY).await;
            }
        });
        SessionSampler { max, task }
    }

    /// The largest count so far.
    pub fn max(&self) -> i64 {
        self.max.load(Ordering::Relaxed)
    }

    /// Stops sampling and returns the largest count seen.
    pub fn stop(self) -> i64 {
        self.task.abort();
        self.max()
    }
}

/// AMQP connections whose client-provided name starts with `name` (the relay's
/// `connection_name`; see `process::relay_connection_name`). `rabbitmqctl` takes about half a
/// second of CPU, so this is read between timed phases, not during them.
pub async fn amqp_connections(name: &str) -> anyhow::Result<usize> {
    let listing = servers::rabbitmqctl(&["list_connections", "-q", "client_properties"]).await?;
    Ok(count_named(&listing, name))
}

/// Lines of a `list_connections client_properties` listing (one connection a line, in
/// Erlang terms: `{"connection_name","<name>"}`) whose connection name starts with `name`.
fn count_named(listing: &str, name: &str) -> usize {
    let needle = format!("{{\"connection_name\",\"{name}");
    listing.lines().filter(|l| l.contains(&needle)).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_counted_by_the_start_of_their_name() {
        let listing = "client_properties\n\
            [{\"capabilities\",[]},{\"connection_name\",\"obr-bench-1 relay\"},{\"product\",\"lapin\"}]\n\
            [{\"connection_name\",\"obr-bench-1 relay tenants.t0\"}]\n\
            [{\"connection_name\",\"obr-bench-1 consumer\"}]\n\
            [{\"connection_name\",\"obr-bench-12 relay\"}]\n";
        assert_eq!(count_named(listing, "obr-bench-1 relay"), 2);
        assert_eq!(count_named(listing, "obr-bench-1 consumer"), 1);
        assert_eq!(count_named(listing, "obr-bench-2"), 0);
    }
}
