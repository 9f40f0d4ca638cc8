//! A watch on the table's partition leases, for diagnosis: samples every partition's owner and
//! epoch every 250 ms through its own connection (straight to the server, not through the
//! proxies), writes each change to `leases.log` in the run's folder, and counts the moves and
//! the longest time a partition had no owner. Reads only; never decides the run's verdict.

use std::io::Write;
use std::time::{Duration, Instant, SystemTime};

use outbox_relay_testkit::servers::Servers;
use sqlx::Connection;
use tokio_util::sync::CancellationToken;

/// What the watch saw.
#[derive(Debug, Default, Clone, Copy)]
pub struct LeaseWatch {
    pub samples: u64,
    /// Changes of a partition's owner (a release and the next claim count as two).
    pub owner_changes: u64,
    /// The longest stretch one partition was seen without an owner while relays ran.
    pub longest_unowned: Duration,
}

/// Samples until `stop`; the log goes to `path`.
pub async fn watch(
    servers: Servers,
    database: String,
    path: std::path::PathBuf,
    stop: CancellationToken,
) -> LeaseWatch {
    let mut seen = LeaseWatch::default();
    let Ok(mut file) = std::fs::File::create(&path) else {
        return seen;
    };
    let mut conn = None;
    let mut last: Vec<Option<i64>> = Vec::new();
    let mut unowned_since: Vec<Option<Instant>> = Vec::new();
    while !stop.is_cancelled() {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = stop.cancelled() => break,
        }
        if conn.is_none() {
            conn = servers.connect_pg(&database, "obr-soak-leases").await.ok();
        }
        let Some(c) = conn.as_mut() else { continue };
        let rows: Result<Vec<(i32, Option<i64>, i64)>, _> = sqlx::query_as(
            "SELECT partition, owner, epoch FROM outbox_relay.leases \
             WHERE table_oid = 'public.outbox'::regclass ORDER BY partition",
        )
        .fetch_all(&mut *c)
        .await;
        let rows = match rows {
            Ok(rows) => rows,
            Err(_) => {
                // Terminated, restarted, or not migrated yet: connect again next time.
                if let Some(c) = conn.take() {
                    c.close().await.ok();
                }
                continue;
            }
        };
        let now = Instant::now();
        seen.samples += 1;
        if last.len() != rows.len() {
            last = vec![None; rows.len()];
            unowned_since = vec![None; rows.len()];
        }
        let owners: Vec<Option<i64>> = rows.iter().map(|(_, owner, _)| *owner).collect();
        for (p, owner) in owners.iter().enumerate() {
            if seen.samples > 1 && *owner != last[p] {
                seen.owner_changes += 1;
            }
            match (owner, unowned_since[p]) {
                (None, None) => unowned_since[p] = Some(now),
                (Some(_), Some(since)) => {
                    seen.longest_unowned = seen.longest_unowned.max(now - since);
                    unowned_since[p] = None;
                }
                _ => {}
            }
        }
        if owners != last || seen.samples == 1 {
            let line: Vec<String> = rows
                .iter()
                .map(|(_, owner, epoch)| match owner {
                    Some(o) => format!("{o}/{epoch}"),
                    None => format!("-/{epoch}"),
                })
                .collect();
            let _ = writeln!(
                file,
                "{} {}",
                humantime::format_rfc3339_millis(SystemTime::now()),
                line.join(" ")
            );
        }
        last = owners;
    }
    if let Some(c) = conn {
        c.close().await.ok();
    }
    seen
}
