//! The partition leases of one table as `outbox-relay status` shows them: the partition count,
//! the live members with the partitions each owns, and how many partitions nobody live owns.
//! One read-only statement per table; it takes no lock and changes no lease (the members own
//! their leases, see [`super::leases`]).
//!
//! A member is live while its `expires_at` (the database's clock) is in the future; a partition
//! is unowned when its owner is null or not live. The unowned count is derived from the owned
//! ones (partitions less what live members own), so the two always add up.

use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use sqlx::Row;

use super::Store;
use crate::config::TableName;

/// A table's leases: its partition count and who owns what.
#[derive(Debug, Clone, PartialEq)]
pub struct TableLeases {
    pub partitions: u32,
    /// The live members, oldest first (ascending member id).
    pub members: Vec<LiveMember>,
}

impl TableLeases {
    /// Partitions no live member owns (owner null, or an owner whose lease ran out): nobody
    /// publishes their rows until a member takes them.
    pub fn unowned(&self) -> u32 {
        let owned: u32 = self.members.iter().map(|m| m.partitions).sum();
        self.partitions.saturating_sub(owned)
    }
}

/// A live member of a table (one relay process's incarnation on it).
#[derive(Debug, Clone, PartialEq)]
pub struct LiveMember {
    pub member: i64,
    /// Where the relay runs (as the relay named itself when it registered).
    pub name: String,
    pub registered_at: DateTime<Utc>,
    /// How long its lease still runs unless it renews it.
    pub expires_in: Duration,
    /// The partitions it owns.
    pub partitions: u32,
}

impl Store {
    /// The leases of `table`, or `None` when it has none yet (no relay of this release has run
    /// on it). One statement.
    pub async fn leases_status(&self, table: &TableName) -> anyhow::Result<Option<TableLeases>> {
        // One row per live member; a single row with a null member when none is live; no row
        // when the table has no leases.
        let rows = sqlx::query(
            "WITH t AS (
                 SELECT table_oid, partitions FROM outbox_relay.lease_tables
                 WHERE table_oid = to_regclass($1)::oid::bigint),
             live AS (
                 SELECT m.member, m.name, m.registered_at, m.expires_at
                 FROM outbox_relay.members m JOIN t USING (table_oid)
                 WHERE m.expires_at > now())
             SELECT t.partitions, live.member, live.name, live.registered_at,
                    extract(epoch FROM live.expires_at - now())::float8 AS expires_in_s,
                    (SELECT count(*) FROM outbox_relay.leases l
                     WHERE l.table_oid = t.table_oid AND l.owner = live.member) AS owned
             FROM t LEFT JOIN live ON true
             ORDER BY live.member",
        )
        .bind(table.quoted())
        .fetch_all(self.pool())
        .await
        .with_context(|| {
            format!("reading the partition leases of {table} (run `outbox-relay migrate`?)")
        })?;
        let Some(first) = rows.first() else {
            return Ok(None);
        };
        let partitions: i32 = first.try_get("partitions")?;
        let mut members = Vec::with_capacity(rows.len());
        for row in &rows {
            let Some(member) = row.try_get::<Option<i64>, _>("member")? else {
                continue;
            };
            let expires_in: f64 = row.try_get("expires_in_s")?;
            let owned: i64 = row.try_get("owned")?;
            members.push(LiveMember {
                member,
                name: row.try_get("name")?,
                registered_at: row.try_get("registered_at")?,
                expires_in: Duration::from_secs_f64(expires_in.max(0.0)),
                partitions: u32::try_from(owned).context("a member's partition count")?,
            });
        }
        Ok(Some(TableLeases {
            partitions: u32::try_from(partitions).context("the table's partition count")?,
            members,
        }))
    }
}
