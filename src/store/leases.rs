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

pub use super::beats::Beats;
use super::{DbError, LockGuard, Store};
use crate::cluster::assignment::{MemberId, Partition};
use crate::config::TableName;

/// Why a member cannot take part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    #[error(transparent)]
    Db(#[from] DbError),
    /// The table does not exist (yet): `migrate` makes it.
    #[error("{0}: the table does not exist (`outbox-relay migrate` creates it)")]
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
    /// The coordination session that holds the table's lock for this process: while it lives,
    /// only the lease's expiry ends the membership; once it is gone (the process was killed),
    /// the others take the partitions at once.
    pub session: Option<LockGuard>,
    /// Only [`Leases::register`] makes a member: from the row the database inserted.
    registered: Registered,
}

/// Proof that a [`Member`] was registered by the database (it has no other constructor).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Registered;

#[cfg(test)]
impl Member {
    /// A member as [`Leases::register`] would answer, for the unit tests of what reads one.
    pub(crate) fn registered_for_tests(id: MemberId, table_oid: i64, partitions: u32) -> Member {
        Member {
            table_oid,
            id,
            partitions,
            session: None,
            registered: Registered,
        }
    }
}

/// A member is dead (its partitions free) once its lease ran out, or once the coordination
/// session it registered from no longer holds the table's lock (the process is gone: a paused
/// or cut-off process keeps its session, so only its lease decides). For alias `m`.
const DEAD: &str =
    "(m.expires_at <= clock_timestamp() OR (m.session_pid IS NOT NULL AND NOT EXISTS ( \
     SELECT 1 FROM pg_locks k WHERE k.locktype = 'advisory' AND k.granted AND k.objsubid = 1 \
       AND k.pid = m.session_pid AND k.classid::bigint = m.lock_classid \
       AND k.objid::bigint = m.lock_objid)))";

/// The writer's proof that it holds its partitions: ANDed into every statement that changes a
/// row's state for the relay (mark, failure record, park, hold, release), so a member that
/// was deposed (a new epoch) or whose lease ran out changes nothing, however late its
/// statement arrives. Built only from a registered [`Member`] and what it claimed (the
/// database's answers), or narrowed from such a fence: there is no default fence and no
/// other constructor, and its fields cannot be changed (one with no table and no partitions
/// must not exist; an empty one refuses: see [`fenced`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The table whose leases these are (its oid when the member registered).
    table_oid: i64,
    member: i64,
    /// The table's partition count: a key's partition depends on it.
    partitions: u32,
    /// The partitions held, ascending, and the epoch each was claimed at.
    owned: Vec<i32>,
    epochs: Vec<i64>,
}

impl Fence {
    /// The table (its oid when the member registered) whose leases these are.
    pub fn table_oid(&self) -> i64 {
        self.table_oid
    }

    /// The member holding them.
    pub fn member(&self) -> i64 {
        self.member
    }

    /// The table's partition count.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// The partitions held, ascending.
    pub fn owned(&self) -> &[i32] {
        &self.owned
    }

    /// The epoch each partition of [`Fence::owned`] was claimed at.
    pub fn epochs(&self) -> &[i64] {
        &self.epochs
    }

    /// `member`'s fence over `owned` (partition, epoch) pairs.
    pub fn new(member: &Member, owned: impl IntoIterator<Item = (Partition, i64)>) -> Fence {
        let (owned, epochs) = owned.into_iter().map(|(p, e)| (p as i32, e)).unzip();
        Fence {
            table_oid: member.table_oid,
            member: member.id as i64,
            partitions: member.partitions,
            owned,
            epochs,
        }
    }

    /// The claimed epoch of every partition of the table, by partition (-1 where not held: a
    /// claim makes the epoch at least 1), as [`fenced`] reads it.
    pub fn epochs_by_partition(&self) -> Vec<i64> {
        let mut epochs = vec![-1; self.partitions as usize];
        for (p, e) in self.owned.iter().zip(&self.epochs) {
            if let Some(slot) = epochs.get_mut(*p as usize) {
                *slot = *e;
            }
        }
        epochs
    }

    /// Whether each partition of the table is held, by partition: the fetch's filter when the
    /// fence holds only some (one lookup per row, however many partitions there are).
    pub fn held_by_partition(&self) -> Vec<bool> {
        let mut held = vec![false; self.partitions as usize];
        for p in &self.owned {
            if let Some(slot) = held.get_mut(*p as usize) {
                *slot = true;
            }
        }
        held
    }

    /// Holds every partition of the table (a single relay, or one channel of one).
    pub fn holds_all(&self) -> bool {
        self.owned.len() as u32 == self.partitions
    }

    /// The same fence restricted to the partitions `keep` accepts (one channel's share).
    pub fn only(&self, keep: impl Fn(u32) -> bool) -> Fence {
        let (owned, epochs) = self
            .owned
            .iter()
            .zip(&self.epochs)
            .filter(|(p, _)| keep(**p as u32))
            .map(|(p, e)| (*p, *e))
            .unzip();
        Fence {
            owned,
            epochs,
            ..self.clone()
        }
    }
}

/// A key's partition, in SQL, for the key expression `key` and the partition count in
/// parameter `$count`: `(hashtextextended(key, 0) & 2147483647) % partitions`. Stable across
/// releases and servers (PostgreSQL's own hash of text, seed 0), so an operator can compute it.
pub(crate) fn partition_of(key: &str, count: usize) -> String {
    format!("((hashtextextended({key}, 0) & 2147483647) % ${count})::int4")
}

/// The fence's predicate for the row or key whose ordering key is `key`, over the fence's four
/// parameters from `$first` (table oid, member, epochs by partition, partition count: the
/// order [`bind_fence!`] binds them in): true only while the member holds the key's partition
/// at the epoch it claimed it and its lease has not run out, as the database's clock reads
/// when the statement starts.
///
/// The partitions still held are read once per statement (`ARRAY(...)` of an uncorrelated
/// query is an init plan): the member's lease rows, each compared with its claimed epoch by
/// subscript (`epochs[partition + 1]`, one array with an element per partition), so the work
/// is linear in the partitions whatever plan PostgreSQL picks. Each row then computes its
/// key's partition and looks it up in that array; a member that still holds every partition
/// (one relay alone on its table) skips even that (an init plan runs when first needed: the
/// second is never run then). A join of the leases with the claimed pairs ran as a nested
/// loop in the generic plan (13 ms per statement at 256 partitions, growing with their
/// square); written as `IN (SELECT ...)` it ran for every row (11 s for a mark of 1,000).
pub(crate) fn fenced(key: &str, first: usize) -> String {
    let [oid, member, epochs, count] = std::array::from_fn(|i| first + i);
    // The member's liveness is one uncorrelated EXISTS: checked once, not once per partition.
    let held = format!(
        "ARRAY(SELECT fl.partition FROM outbox_relay.leases fl \
           WHERE fl.table_oid = ${oid} AND fl.owner = ${member} \
             AND fl.epoch = (${epochs}::int8[])[fl.partition + 1] \
             AND EXISTS (SELECT 1 FROM outbox_relay.members fm \
                         WHERE fm.table_oid = ${oid} AND fm.member = ${member} \
                           AND fm.expires_at > clock_timestamp()))"
    );
    // A fence of no partitions at all holds nothing (`$count > 0`), whatever its array says.
    format!(
        "(${count} > 0 AND (cardinality({held}) = ${count} OR {part} = ANY ({held})))",
        part = partition_of(key, count)
    )
}

/// Binds a [`Fence`]'s four parameters, in [`fenced`]'s order.
macro_rules! bind_fence {
    ($query:expr, $fence:expr) => {
        $query
            .bind($fence.table_oid())
            .bind($fence.member())
            .bind($fence.epochs_by_partition())
            .bind($fence.partitions() as i32)
    };
}
pub(crate) use bind_fence;

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
    /// The table the member registered on is gone: dropped, or dropped and created again (a
    /// new instance, whose members register on it anew). The member must publish nothing more
    /// and leave; it registers on the current instance, if there is one.
    Replaced,
}

/// Runs `op` (a statement or a short transaction) within the relay's answer deadline, on
/// the relay's store: over a network gone silent a statement would otherwise wait for TCP to
/// give up (many minutes), and the membership with it, renewing nothing and never registering
/// again. Past the deadline it fails as unavailable, and the pool checks its connections
/// before the next use.
pub(crate) async fn bounded<T, E: From<DbError>>(
    store: &Store,
    op: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let deadline = store.answer_within();
    match tokio::time::timeout(deadline, op).await {
        Ok(result) => result,
        Err(_) => {
            store.distrust_connections();
            Err(E::from(DbError::from(super::no_answer(deadline))))
        }
    }
}

/// One member's renewal, for [`renew_all`].
#[derive(Debug, Clone)]
pub struct Renewal {
    /// The outbox table, to see whether it is still the instance the member registered on.
    pub table: TableName,
    pub member: Member,
    /// How long the member stays live after this renewal.
    pub lease: Duration,
}

/// Renews the leases of many members, of any tables, in one statement: for each, what its
/// heartbeat finds ([`Heartbeat`]), in the order given. A member's renewal is the same as
/// alone (renewed only while live and from the session it registered from; the live members
/// and its partitions read in the same snapshot), so a process renews all its tables with one
/// statement per heartbeat, however many tables it has. The lock table is read once for all
/// of them.
pub async fn renew_all(pool: &PgPool, renewals: &[Renewal]) -> Result<Vec<Heartbeat>, DbError> {
    if renewals.is_empty() {
        return Ok(Vec::new());
    }
    let column = |f: &dyn Fn(&Renewal) -> Option<i64>| -> Vec<Option<i64>> {
        renewals.iter().map(f).collect()
    };
    // DEAD, against the lock table read once (`held`) instead of once per member.
    let dead = "(m.expires_at <= clock_timestamp() OR (m.session_pid IS NOT NULL AND NOT EXISTS ( \
                SELECT 1 FROM held k WHERE k.pid = m.session_pid AND k.classid = m.lock_classid \
                  AND k.objid = m.lock_objid)))";
    let rows = sqlx::query(&format!(
        "WITH held AS MATERIALIZED (
             SELECT pid, classid::bigint AS classid, objid::bigint AS objid FROM pg_locks
             WHERE locktype = 'advisory' AND granted AND objsubid = 1),
         r AS (
             SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::float8[], $4::int[],
                                  $5::bigint[], $6::bigint[], $7::text[])
                 WITH ORDINALITY AS r(table_oid, member, lease, pid, classid, objid, tname, i)),
         renewed AS (
             UPDATE outbox_relay.members m
             SET expires_at = clock_timestamp() + make_interval(secs => r.lease),
                 session_pid = r.pid, lock_classid = r.classid, lock_objid = r.objid
             FROM r
             WHERE m.table_oid = r.table_oid AND m.member = r.member AND NOT {dead}
               AND m.session_pid IS NOT DISTINCT FROM r.pid
             RETURNING m.table_oid, m.member)
         SELECT EXISTS (SELECT 1 FROM renewed n
                        WHERE n.table_oid = r.table_oid AND n.member = r.member) AS renewed,
                ARRAY(SELECT m.member FROM outbox_relay.members m
                      WHERE m.table_oid = r.table_oid AND (m.member = r.member OR NOT {dead})) AS live,
                ARRAY(SELECT partition FROM outbox_relay.leases
                      WHERE table_oid = r.table_oid AND owner = r.member ORDER BY partition) AS partitions,
                ARRAY(SELECT epoch FROM outbox_relay.leases
                      WHERE table_oid = r.table_oid AND owner = r.member ORDER BY partition) AS epochs,
                to_regclass(r.tname)::oid::bigint AS current_oid
         FROM r ORDER BY r.i"
    ))
    .bind(renewals.iter().map(|r| r.member.table_oid).collect::<Vec<_>>())
    .bind(renewals.iter().map(|r| r.member.id as i64).collect::<Vec<_>>())
    .bind(renewals.iter().map(|r| r.lease.as_secs_f64()).collect::<Vec<_>>())
    .bind(renewals.iter().map(|r| r.member.session.map(|s| s.pid)).collect::<Vec<_>>())
    .bind(column(&|r| r.member.session.map(|s| s.classid)))
    .bind(column(&|r| r.member.session.map(|s| s.objid)))
    .bind(renewals.iter().map(|r| r.table.quoted()).collect::<Vec<_>>())
    .fetch_all(pool)
    .await?;
    rows.iter()
        .zip(renewals)
        .map(|(row, renewal)| {
            let current: Option<i64> = row.try_get("current_oid")?;
            if current != Some(renewal.member.table_oid) {
                return Ok(Heartbeat::Replaced);
            }
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
        })
        .collect()
}

/// The lease statements of one table.
#[derive(Clone)]
pub struct Leases {
    pool: Pool,
    table: TableName,
    /// How long a member stays live after its last heartbeat.
    lease: Duration,
    /// The process's heartbeat rounds, when its tables renew together.
    beats: Option<Beats>,
}

/// Where the statements go: a plain pool (tests, tools), or the relay's store, whose pool
/// follows the primary when it moves (a failover), so the leases move with the relay.
#[derive(Clone)]
enum Pool {
    Plain(PgPool),
    Store(Store),
}

impl Leases {
    pub fn new(pool: PgPool, table: TableName, lease: Duration) -> Leases {
        Leases {
            pool: Pool::Plain(pool),
            table,
            lease,
            beats: None,
        }
    }

    /// The leases of `table` on `store`'s pool, following the primary as the relay does.
    pub fn on_store(store: Store, table: TableName, lease: Duration) -> Leases {
        Leases {
            pool: Pool::Store(store),
            table,
            lease,
            beats: None,
        }
    }

    /// These leases renewed in `beats`' rounds, with the process's other tables.
    pub fn in_rounds(self, beats: Beats) -> Leases {
        Leases {
            beats: Some(beats),
            ..self
        }
    }

    fn pool(&self) -> &PgPool {
        match &self.pool {
            Pool::Plain(pool) => pool,
            Pool::Store(store) => store.pool(),
        }
    }

    pub fn table(&self) -> &TableName {
        &self.table
    }

    /// Runs `op` (a statement or a short transaction) within the relay's answer deadline when
    /// on the relay's store ([`bounded`]).
    async fn bounded<T, E: From<DbError>>(
        &self,
        op: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        match &self.pool {
            Pool::Store(store) => bounded(store, op).await,
            Pool::Plain(_) => op.await,
        }
    }

    /// Renews `member` with the process's other members when the leases have a [`Beats`]
    /// round to join (one statement for all tables), else on its own.
    async fn renew(&self, member: &Member) -> Result<Heartbeat, DbError> {
        match &self.beats {
            Some(beats) => {
                beats
                    .renew(Renewal {
                        table: self.table.clone(),
                        member: member.clone(),
                        lease: self.lease,
                    })
                    .await
            }
            None => self.bounded(self.heartbeat_now(member)).await,
        }
    }

    /// How long a member waits for its next heartbeat after one that went well: to the
    /// process's next round when there is one (so every table renews in the same statement),
    /// else `period`.
    pub fn next_heartbeat_in(&self, period: Duration) -> Duration {
        self.beats
            .as_ref()
            .map_or(period, |beats| beats.until_next_round())
    }

    /// Registers a new member named `name` (host and process, for `status`), live for one
    /// lease. Creates the table's lease rows on first use with `partitions`, and refuses a
    /// different count later.
    pub async fn register(&self, name: &str, partitions: u32) -> Result<Member, LeaseError> {
        self.register_in(name, partitions, None).await
    }

    /// [`Leases::register`] from `session`, the coordination session holding the table's lock
    /// (see [`Member::session`]).
    pub async fn register_in(
        &self,
        name: &str,
        partitions: u32,
        session: Option<LockGuard>,
    ) -> Result<Member, LeaseError> {
        self.bounded(self.register_now(name, partitions, session))
            .await
    }

    async fn register_now(
        &self,
        name: &str,
        partitions: u32,
        session: Option<LockGuard>,
    ) -> Result<Member, LeaseError> {
        let mut tx = self.pool().begin().await.map_err(DbError::from)?;
        let oid: Option<i64> = sqlx::query_scalar("SELECT to_regclass($1)::oid::bigint")
            .bind(self.table.quoted())
            .fetch_one(&mut *tx)
            .await
            .map_err(DbError::from)?;
        let table_oid = oid.ok_or_else(|| LeaseError::NoTable(self.table.to_string()))?;
        // Two statements: a member registering at the same moment may have made the row; the
        // insert waits for its commit, and only a statement after it sees the row.
        sqlx::query(
            "INSERT INTO outbox_relay.lease_tables (table_oid, partitions) VALUES ($1, $2)
             ON CONFLICT (table_oid) DO NOTHING",
        )
        .bind(table_oid)
        .bind(partitions as i32)
        .execute(&mut *tx)
        .await
        .map_err(DbError::from)?;
        let stored: i32 = sqlx::query_scalar(
            "SELECT partitions FROM outbox_relay.lease_tables WHERE table_oid = $1",
        )
        .bind(table_oid)
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
        // Tables dropped since leave no lease rows behind (a table created again is a new
        // instance, with a new oid: its members start afresh).
        for forget in [
            "DELETE FROM outbox_relay.members WHERE NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid::bigint = table_oid)",
            "DELETE FROM outbox_relay.leases WHERE NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid::bigint = table_oid)",
            "DELETE FROM outbox_relay.lease_tables WHERE NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid::bigint = table_oid)",
            "DELETE FROM outbox_relay.held_keys WHERE NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid::bigint = table_oid)",
        ] {
            sqlx::query(forget)
                .execute(&mut *tx)
                .await
                .map_err(DbError::from)?;
        }
        // Dead members leave no rows behind; their partitions are free.
        sqlx::query(&format!(
            "DELETE FROM outbox_relay.members m WHERE m.table_oid = $1 AND {DEAD}"
        ))
        .bind(table_oid)
        .execute(&mut *tx)
        .await
        .map_err(DbError::from)?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO outbox_relay.members
                 (table_oid, name, expires_at, session_pid, lock_classid, lock_objid)
             VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3), $4, $5, $6)
             RETURNING member",
        )
        .bind(table_oid)
        .bind(name)
        .bind(self.lease.as_secs_f64())
        .bind(session.map(|s| s.pid))
        .bind(session.map(|s| s.classid))
        .bind(session.map(|s| s.objid))
        .fetch_one(&mut *tx)
        .await
        .map_err(DbError::from)?;
        tx.commit().await.map_err(DbError::from)?;
        Ok(Member {
            table_oid,
            id: id as MemberId,
            partitions,
            session,
            registered: Registered,
        })
    }

    /// Registers a member and claims every partition, for one lease: the fence of a writer
    /// that is the table's only one (the bench's database-only run, tests of the relay's
    /// parts). Fails when another member holds any partition.
    pub async fn fence_all(&self, name: &str, partitions: u32) -> Result<Fence, LeaseError> {
        let member = self.register(name, partitions).await?;
        let owned = self.claim(&member, partitions).await?;
        if owned.len() as u32 != partitions {
            return Err(LeaseError::Db(DbError::Refused(format!(
                "{}: {} of {partitions} partitions are held by other members",
                self.table,
                partitions - owned.len() as u32
            ))));
        }
        Ok(Fence::new(&member, owned))
    }

    /// Renews `member`'s lease, if it has not run out and the coordination session it
    /// registered from still holds the table's lock (what the other members go by: once that
    /// session is gone they may take the partitions at once, so the member must count itself
    /// dead too, and register again from its new session), and reads the live members and the
    /// member's own partitions: one statement.
    pub async fn heartbeat(&self, member: &Member) -> Result<Heartbeat, DbError> {
        self.renew(member).await
    }

    async fn heartbeat_now(&self, member: &Member) -> Result<Heartbeat, DbError> {
        let renewal = Renewal {
            table: self.table.clone(),
            member: member.clone(),
            lease: self.lease,
        };
        renew_all(self.pool(), std::slice::from_ref(&renewal))
            .await?
            .pop()
            .ok_or_else(|| DbError::Rejected("the heartbeat statement returned no row".into()))
    }

    /// Takes up to `wanted` partitions nobody holds, lowest first, skipping those another
    /// member is taking at this moment; only while `member` is live. Returns what it took,
    /// with the new epochs.
    pub async fn claim(
        &self,
        member: &Member,
        wanted: u32,
    ) -> Result<Vec<(Partition, i64)>, DbError> {
        self.bounded(self.claim_now(member, wanted)).await
    }

    async fn claim_now(
        &self,
        member: &Member,
        wanted: u32,
    ) -> Result<Vec<(Partition, i64)>, DbError> {
        // A member whose lease ran out is deleted, then its partitions are taken, in one
        // transaction: the delete waits for a heartbeat of its that is under way (and then
        // finds it live), and a heartbeat that comes after waits for the commit and finds no
        // row, so a member can never believe it renewed a lease another member took. Only the
        // members this delete removed (or that have no row at all) count as gone: a snapshot
        // older than a renewal would see a dead member there. The clock is read when each row
        // is checked (`clock_timestamp()`), not when the statement began. Two statements, not
        // one: a claim whose partition check read a deleting CTE failed with PostgreSQL's
        // internal error `ModifyTable should not be called during EvalPlanQual` whenever a
        // lease row it locked had changed since its snapshot (another member's claim
        // committing at that moment).
        let mut tx = self.pool().begin().await?;
        let dead: Vec<i64> = sqlx::query_scalar(&format!(
            "DELETE FROM outbox_relay.members m
             WHERE m.table_oid = $1 AND m.member <> $2 AND {DEAD}
             RETURNING m.member"
        ))
        .bind(member.table_oid)
        .bind(member.id as i64)
        .fetch_all(&mut *tx)
        .await?;
        let rows = sqlx::query(
            "WITH free AS (
                 SELECT f.partition FROM outbox_relay.leases f
                 WHERE f.table_oid = $1
                   AND (f.owner IS NULL
                        OR f.owner = ANY ($4)
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
        .bind(&dead)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
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
        self.bounded(self.release_now(member, partitions)).await
    }

    async fn release_now(&self, member: &Member, partitions: &[Partition]) -> Result<u64, DbError> {
        let partitions: Vec<i32> = partitions.iter().map(|p| *p as i32).collect();
        let done = sqlx::query(
            "UPDATE outbox_relay.leases SET owner = NULL, changed_at = now()
             WHERE table_oid = $1 AND owner = $2 AND partition = ANY($3)",
        )
        .bind(member.table_oid)
        .bind(member.id as i64)
        .bind(&partitions)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected())
    }

    /// A clean stop: gives up every partition and ends the membership, in one transaction, so
    /// the others can take the partitions at their next heartbeat instead of after the lease.
    pub async fn leave(&self, member: &Member) -> Result<(), DbError> {
        self.leave_member(member.table_oid, member.id as i64).await
    }

    /// Ends the membership a [`Leases::fence_all`] registered, so its partitions are free at
    /// once rather than when its lease runs out.
    pub async fn leave_fence(&self, fence: &Fence) -> Result<(), DbError> {
        self.leave_member(fence.table_oid, fence.member).await
    }

    async fn leave_member(&self, table_oid: i64, member: i64) -> Result<(), DbError> {
        self.bounded(self.leave_now(table_oid, member)).await
    }

    async fn leave_now(&self, table_oid: i64, member: i64) -> Result<(), DbError> {
        let mut tx = self.pool().begin().await?;
        sqlx::query(
            "UPDATE outbox_relay.leases SET owner = NULL, changed_at = now()
             WHERE table_oid = $1 AND owner = $2",
        )
        .bind(table_oid)
        .bind(member)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM outbox_relay.members WHERE table_oid = $1 AND member = $2")
            .bind(table_oid)
            .bind(member)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }
}
