//! What a table's partition leases say, read from the relay's own rows
//! (`outbox_relay.lease_tables`, `leases`, `members`) and its log: how many partitions the
//! table has, a key's partition, who owns which partition, and which member a relay process
//! registered as. Only reads (and analyzes); never writes a lease row.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::Context;
use outbox_relay::config::TableName;
use sqlx::postgres::PgPool;

/// The table's oid, as the lease rows name it.
pub async fn table_oid(pool: &PgPool, table: &TableName) -> anyhow::Result<i64> {
    sqlx::query_scalar("SELECT $1::text::regclass::oid::bigint")
        .bind(table.quoted())
        .fetch_one(pool)
        .await
        .with_context(|| format!("the oid of {table}"))
}

/// The table's partition count, once its leases exist.
pub async fn partitions(pool: &PgPool, table_oid: i64) -> anyhow::Result<Option<u32>> {
    let n: Option<i32> =
        sqlx::query_scalar("SELECT partitions FROM outbox_relay.lease_tables WHERE table_oid = $1")
            .bind(table_oid)
            .fetch_optional(pool)
            .await
            .context("reading outbox_relay.lease_tables")?;
    Ok(n.map(|n| n.max(0) as u32))
}

/// Fresh planner statistics of the lease tables, as autovacuum leaves them once the relays
/// ran for a while. A new database has none, and without them PostgreSQL plans the relay's
/// fenced mark as a nested loop over every partition for every row (seconds for a batch of
/// 1,000 rows: past the statement timeout); the drains measure the relays at rest, not that.
pub async fn analyze(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query("ANALYZE outbox_relay.lease_tables, outbox_relay.members, outbox_relay.leases")
        .execute(pool)
        .await
        .context("analyzing the lease tables")?;
    Ok(())
}

/// Each key's partition, as the relay computes it (the documented hash, in SQL).
pub async fn partitions_of(
    pool: &PgPool,
    keys: &[String],
    partitions: u32,
) -> anyhow::Result<HashMap<String, u32>> {
    let rows: Vec<(String, i32)> = sqlx::query_as(
        "SELECT k, ((hashtextextended(k, 0) & 2147483647) % $2)::int FROM unnest($1::text[]) AS k",
    )
    .bind(keys)
    .bind(i64::from(partitions.max(1)))
    .fetch_all(pool)
    .await
    .context("computing the keys' partitions")?;
    Ok(rows
        .into_iter()
        .map(|(k, p)| (k, p.max(0) as u32))
        .collect())
}

/// Partitions per owner, counting only owners whose lease has not run out.
pub async fn spread(pool: &PgPool, table_oid: i64) -> anyhow::Result<BTreeMap<u64, u32>> {
    let rows: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT l.owner, count(*) FROM outbox_relay.leases l \
         JOIN outbox_relay.members m ON m.table_oid = l.table_oid AND m.member = l.owner \
         WHERE l.table_oid = $1 AND m.expires_at > clock_timestamp() GROUP BY l.owner",
    )
    .bind(table_oid)
    .fetch_all(pool)
    .await
    .context("reading outbox_relay.leases")?;
    Ok(rows
        .into_iter()
        .map(|(owner, n)| (owner.max(0) as u64, n.max(0) as u32))
        .collect())
}

/// The partitions `member` owns now.
pub async fn owned_by(pool: &PgPool, table_oid: i64, member: u64) -> anyhow::Result<Vec<u32>> {
    let rows: Vec<i32> = sqlx::query_scalar(
        "SELECT partition FROM outbox_relay.leases WHERE table_oid = $1 AND owner = $2 ORDER BY partition",
    )
    .bind(table_oid)
    .bind(member as i64)
    .fetch_all(pool)
    .await
    .context("reading outbox_relay.leases")?;
    Ok(rows.into_iter().map(|p| p.max(0) as u32).collect())
}

/// The owner of one partition, if it has one.
pub async fn owner_of(
    pool: &PgPool,
    table_oid: i64,
    partition: u32,
) -> anyhow::Result<Option<u64>> {
    let owner: Option<Option<i64>> = sqlx::query_scalar(
        "SELECT owner FROM outbox_relay.leases WHERE table_oid = $1 AND partition = $2",
    )
    .bind(table_oid)
    .bind(partition as i32)
    .fetch_optional(pool)
    .await
    .context("reading outbox_relay.leases")?;
    Ok(owner.flatten().map(|o| o.max(0) as u64))
}

/// True when `spread` is every one of `partitions` shared fairly (shares differ by at most
/// one) by exactly the members `expected`: the rebalance after a start, a join or a fault is
/// over.
pub fn settled(spread: &BTreeMap<u64, u32>, partitions: u32, expected: &[u64]) -> bool {
    let mut owners: Vec<u64> = spread.keys().copied().collect();
    let mut wanted = expected.to_vec();
    owners.sort_unstable();
    wanted.sort_unstable();
    wanted.dedup();
    let (most, least) = (
        spread.values().copied().max().unwrap_or(0),
        spread.values().copied().min().unwrap_or(0),
    );
    owners == wanted && spread.values().sum::<u32>() == partitions && most - least <= 1
}

/// The member the relay whose log is at `log` registered as last (its log line
/// "partition leases: registered member=N"; a relay whose lease ran out registers again as a
/// new member).
pub fn registered_member(log: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(log).ok()?;
    member_in(&text)
}

fn member_in(log: &str) -> Option<u64> {
    log.lines()
        .rev()
        .filter(|l| l.contains("partition leases: registered"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("member="))
                .and_then(|n| n.trim_matches('"').parse().ok())
        })
        .next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relay_is_the_member_it_registered_as_last() {
        let log = "2026-12-01T20:43:54.59Z  INFO outbox-relay starting tables=a\n\
            2026-12-01T20:43:54.63Z  INFO partition leases: registered member=7 table=a\n\
            2026-12-01T20:44:04.10Z  WARN partition leases: the lease ran out (a pause or a lost connection); registering again member=7\n\
            2026-12-01T20:44:04.12Z  INFO partition leases: registered member=12 table=a\n";
        assert_eq!(member_in(log), Some(12));
        assert_eq!(
            member_in("2026-12-01T20:43:54.59Z  INFO outbox-relay starting\n"),
            None
        );
    }

    #[test]
    fn partitions_are_settled_when_the_expected_members_share_them_all_fairly() {
        let spread = |pairs: &[(u64, u32)]| pairs.iter().copied().collect::<BTreeMap<_, _>>();
        assert!(settled(
            &spread(&[(1, 86), (2, 85), (3, 85)]),
            256,
            &[1, 2, 3]
        ));
        assert!(settled(&spread(&[(4, 256)]), 256, &[4]));
        // A rebalance half-way: one member still holds more than its share.
        assert!(!settled(
            &spread(&[(1, 128), (2, 85), (3, 43)]),
            256,
            &[1, 2, 3]
        ));
        // Released but not claimed yet.
        assert!(!settled(
            &spread(&[(1, 85), (2, 85), (3, 80)]),
            256,
            &[1, 2, 3]
        ));
        // A member that is not one of ours (a killed relay's lease before the takeover).
        assert!(!settled(&spread(&[(1, 128), (9, 128)]), 256, &[1, 2]));
    }
}
