//! Partition leases of one table in PostgreSQL (the coordinator: no other service): members
//! register and heartbeat, claim free partitions, release their own, leave. Owns the lease SQL
//! only; what to claim or release is `cluster::assignment`'s, when to stop publishing the
//! caller's.
//!
//! Invariants the statements keep, each in one statement:
//! - a partition is taken only while nobody holds it (unowned, or its owner's lease expired),
//!   and only by a live member; every take gives it a new epoch;
//! - a member changes only its own leases, and only while it is live;
//! - expiry is the database's clock (`clock_timestamp()`), so members never compare clocks with
//!   each other; a member whose lease ran out is deleted when its partitions are taken, and a
//!   member never renews a lease that has run out.
//!
//! A member's heartbeat renews all its leases at once: a lease counts only while its owner's
//! member row is live. Steady state therefore costs one statement and one row per member per
//! heartbeat, however many partitions there are.

use std::collections::BTreeSet;
use std::time::Duration;

use sqlx::{PgPool, Row};

use super::DbError;
use crate::cluster::assignment::{MemberId, Partition};
use crate::config::TableName;

/// Why a member cannot take part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    #[error(transparent)]
    Db(#[from] DbError),
    /// The table does not exist (yet): `migrate` makes it.
    #[error("{0}: no such table")]
    NoTable(String),
    /// The partition count is fixed once chosen: every key's partition depends on it.
    #[error(
        "{table}: partitions = {configured} in the config, but the table's leases were made \
         with {stored}; the count is fixed once chosen (set it back to {stored})"
    )]
    PartitionsChanged {
        table: String,
        configured: u32,
        stored: u32,
    },
}

/// One relay process's incarnation on one table. A member whose lease ran out is gone for
/// good: it registers again as a new member (with a higher id), so it can never revive a lease
/// it lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub table_oid: i64,
    pub id: MemberId,
    pub partitions: u32,
}

/// What a heartbeat found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heartbeat {
    /// Renewed until the database's `now()` + the lease: the live members (this one included)
    /// and this member's partitions with their epochs, ascending.
    Renewed {
        live: BTreeSet<MemberId>,
        owned: Vec<(Partition, i64)>,
    },
    /// The lease had run out before the heartbeat arrived (a pause, a lost connection): this
    /// member holds nothing any more and must not publish; it registers again.
    Expired,
}

/// The lease statements of one table.
#[derive(Debug, Clone)]
pub struct Leases {
    pool: PgPool,
    table: TableName,
    /// How long a member stays live after its last heartbeat.
    lease: Duration,
}

impl Leases {
    pub fn new(pool: PgPool, table: TableName, lease: Duration) -> Leases {
        Leases { pool, table, lease }
    }

    /// Registers a new member named `name` (host and process, for `status`), live for one
    /// lease. Creates the table's lease rows on first use with `partitions`, and refuses a
    /// different count later.
    pub async fn register(&self, name: &str, partitions: u32) -> Result<Member, LeaseError> {
        let mut tx = self.pool.begin().await.map_err(DbError::from)?;
        let oid: Option<i64> = sqlx::query_scalar("SELECT to_regclass($1)::oid::bigint")
            .bind(self.table.quoted())
            .fetch_one(&mut *tx)
            .await
            .map_err(DbError::from)?;
        let table_oid = oid.ok_or_else(|| LeaseError::NoTable(self.table.to_string()))?;
        let stored: i32 = sqlx::query_scalar(
            "WITH made AS (
                 INSERT INTO outbox_relay.lease_tables (table_oid, partitions) VALUES ($1, $2)
                 ON CONFLICT (table_oid) DO NOTHING RETURNING partitions)
             SELECT partitions FROM made
             UNION ALL SELECT partitions FROM outbox_relay.lease_tables WHERE table_oid = $1
             LIMIT 1",
        )
        .bind(table_oid)
        .bind(partitions as i32)
        .fetch_one(&mut *tx)
        .await
        .map_err(DbError::from)?;
        if stored as u32 != partitions {
            return Err(LeaseError::PartitionsChanged {
                table: self.table.to_string(),
                configured: partitions,
                stored: stored as u32,
            });
        }
        sqlx::query(
            "INSERT INTO outbox_relay.leases (table_oid, partition)
             SELECT $1, generate_series(0, $2 - 1)
             ON CONFLICT (table_oid, partition) DO NOTHING",
        )
        .bind(table_oid)
        .bind(partitions as i32)
        .execute(&mut *tx)
        .await
        .map_err(DbError::from)?;
        // Members whose lease ran out leave no rows behind; their partitions are free.
        sqlx::query(
            "DELETE FROM outbox_relay.members
             WHERE table_oid = $1 AND expires_at <= clock_timestamp()",
        )
        .bind(table_oid)
        .execute(&mut *tx)
        .await
        .map_err(DbError::from)?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO outbox_relay.members (table_oid, name, expires_at)
             VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3)) RETURNING member",
        )
        .bind(table_oid)
        .bind(name)
        .bind(self.lease.as_secs_f64())
        .fetch_one(&mut *tx)
        .await
        .map_err(DbError::from)?;
        tx.commit().await.map_err(DbError::from)?;
        Ok(Member {
            table_oid,
            id: id as MemberId,
            partitions,
        })
    }

    /// Renews `member`'s lease, if it has not run out, and reads the live members and the
    /// member's own partitions: one statement.
    pub async fn heartbeat(&self, member: &Member) -> Result<Heartbeat, DbError> {
        let row = sqlx::query(
            "WITH renewed AS (
                 UPDATE outbox_relay.members
                 SET expires_at = clock_timestamp() + make_interval(secs => $3)
                 WHERE table_oid = $1 AND member = $2 AND expires_at > clock_timestamp()
                 RETURNING member)
             SELECT EXISTS (SELECT 1 FROM renewed) AS renewed,
                    ARRAY(SELECT member FROM outbox_relay.members
                          WHERE table_oid = $1 AND expires_at > now()) AS live,
                    ARRAY(SELECT partition FROM outbox_relay.leases
                          WHERE table_oid = $1 AND owner = $2 ORDER BY partition) AS partitions,
                    ARRAY(SELECT epoch FROM outbox_relay.leases
                          WHERE table_oid = $1 AND owner = $2 ORDER BY partition) AS epochs",
        )
        .bind(member.table_oid)
        .bind(member.id as i64)
        .bind(self.lease.as_secs_f64())
        .fetch_one(&self.pool)
        .await?;
        if !row.try_get::<bool, _>("renewed")? {
            return Ok(Heartbeat::Expired);
        }
        let live: Vec<i64> = row.try_get("live")?;
        let partitions: Vec<i32> = row.try_get("partitions")?;
        let epochs: Vec<i64> = row.try_get("epochs")?;
        Ok(Heartbeat::Renewed {
            live: live.into_iter().map(|m| m as MemberId).collect(),
            owned: partitions
                .into_iter()
                .map(|p| p as Partition)
                .zip(epochs)
                .collect(),
        })
    }

    /// Takes up to `wanted` partitions nobody holds, lowest first, skipping those another
    /// member is taking at this moment; only while `member` is live. Returns what it took,
    /// with the new epochs.
    pub async fn claim(
        &self,
        member: &Member,
        wanted: u32,
    ) -> Result<Vec<(Partition, i64)>, DbError> {
        // A member whose lease ran out is deleted as its partitions are taken: the delete
        // waits for a heartbeat of its that is under way (and then finds it live), and a
        // heartbeat that comes after finds no row, so a member can never believe it renewed a
        // lease another member took. The clock is read when each row is checked
        // (`clock_timestamp()`), not when the statement began.
        let rows = sqlx::query(
            "WITH dead AS (
                 DELETE FROM outbox_relay.members
                 WHERE table_oid = $1 AND expires_at <= clock_timestamp()
                 RETURNING member),
             free AS (
                 SELECT f.partition FROM outbox_relay.leases f
                 WHERE f.table_oid = $1
                   AND (f.owner IS NULL
                        OR f.owner IN (SELECT member FROM dead)
                        OR NOT EXISTS (SELECT 1 FROM outbox_relay.members m
                                       WHERE m.table_oid = $1 AND m.member = f.owner))
                 ORDER BY f.partition LIMIT $3
                 FOR UPDATE SKIP LOCKED)
             UPDATE outbox_relay.leases l
             SET owner = $2, epoch = l.epoch + 1, changed_at = now()
             FROM free
             WHERE l.table_oid = $1 AND l.partition = free.partition
               AND EXISTS (SELECT 1 FROM outbox_relay.members me
                           WHERE me.table_oid = $1 AND me.member = $2
                             AND me.expires_at > clock_timestamp())
             RETURNING l.partition, l.epoch",
        )
        .bind(member.table_oid)
        .bind(member.id as i64)
        .bind(i64::from(wanted))
        .fetch_all(&self.pool)
        .await?;
        let mut taken = rows
            .iter()
            .map(|r| {
                Ok((
                    r.try_get::<i32, _>(0)? as Partition,
                    r.try_get::<i64, _>(1)?,
                ))
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        taken.sort_unstable();
        Ok(taken)
    }

    /// Gives up `partitions` of `member`'s own (their in-flight rows settled first, by the
    /// caller); partitions it does not hold are left alone. Returns how many it gave up.
    pub async fn release(&self, member: &Member, partitions: &[Partition]) -> Result<u64, DbError> {
        let partitions: Vec<i32> = partitions.iter().map(|p| *p as i32).collect();
        let done = sqlx::query(
            "UPDATE outbox_relay.leases SET owner = NULL, changed_at = now()
             WHERE table_oid = $1 AND owner = $2 AND partition = ANY($3)",
        )
        .bind(member.table_oid)
        .bind(member.id as i64)
        .bind(&partitions)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// A clean stop: gives up every partition and ends the membership, in one transaction, so
    /// the others can take the partitions at their next heartbeat instead of after the lease.
    pub async fn leave(&self, member: &Member) -> Result<(), DbError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE outbox_relay.leases SET owner = NULL, changed_at = now()
             WHERE table_oid = $1 AND owner = $2",
        )
        .bind(member.table_oid)
        .bind(member.id as i64)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM outbox_relay.members WHERE table_oid = $1 AND member = $2")
            .bind(member.table_oid)
            .bind(member.id as i64)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }
}
