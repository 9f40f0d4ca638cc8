//! The partition leases of a test's table as an operator reads them in PostgreSQL
//! (`outbox_relay.leases`, `outbox_relay.members`), and which member a relay registered as (from
//! its log). Reads only: the kit never changes a lease.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};

use crate::env::TestEnv;
use crate::relay::Relay;
use crate::rows::quoted_table;

/// The relay's log line when it joined a table as a new member (with `member=<id>`).
pub const REGISTERED: &str = "partition leases: registered";

impl Relay {
    /// The member ids this relay registered as, in order (a relay whose lease ran out
    /// registers again as a new member).
    pub fn member_ids(&self) -> Vec<i64> {
        self.log()
            .lines()
            .filter(|l| l.contains(REGISTERED))
            .map(|l| {
                l.split(|c: char| c.is_whitespace() || c == ',' || c == '{' || c == '}')
                    .find_map(|w| w.strip_prefix("member=")?.trim_matches('"').parse().ok())
                    .unwrap_or_else(|| panic!("no member=<id> in {l:?}"))
            })
            .collect()
    }

    /// The member id this relay registered as last; waits for its first registration.
    pub async fn member_id(&self) -> i64 {
        self.wait_for_log(REGISTERED).await;
        *self.member_ids().last().expect("the line waited for")
    }
}

impl TestEnv {
    /// Each partition of the test's table and its owner (None: unowned), from
    /// `outbox_relay.leases`; empty while the table has no leases.
    pub async fn lease_owners(&self) -> BTreeMap<i32, Option<i64>> {
        sqlx::query_as::<_, (i32, Option<i64>)>(
            "SELECT partition, owner FROM outbox_relay.leases \
             WHERE table_oid = to_regclass($1)::oid::bigint ORDER BY partition",
        )
        .bind(quoted_table(&self.table))
        .fetch_all(&self.pool)
        .await
        .expect("read the leases")
        .into_iter()
        .collect()
    }

    /// The partitions `member` owns now.
    pub async fn partitions_of(&self, member: i64) -> BTreeSet<i32> {
        self.lease_owners()
            .await
            .into_iter()
            .filter(|(_, owner)| *owner == Some(member))
            .map(|(p, _)| p)
            .collect()
    }

    /// The members whose lease has not run out (`expires_at > now()`), ascending.
    pub async fn live_members(&self) -> BTreeSet<i64> {
        sqlx::query_scalar::<_, i64>(
            "SELECT member FROM outbox_relay.members \
             WHERE table_oid = to_regclass($1)::oid::bigint AND expires_at > now()",
        )
        .bind(quoted_table(&self.table))
        .fetch_all(&self.pool)
        .await
        .expect("read the members")
        .into_iter()
        .collect()
    }

    /// When `member`'s lease runs out unless renewed (None: no such member any more).
    pub async fn member_expires_at(&self, member: i64) -> Option<DateTime<Utc>> {
        sqlx::query_scalar(
            "SELECT expires_at FROM outbox_relay.members \
             WHERE table_oid = to_regclass($1)::oid::bigint AND member = $2",
        )
        .bind(quoted_table(&self.table))
        .bind(member)
        .fetch_optional(&self.pool)
        .await
        .expect("read a member")
    }

    /// When each partition last changed owner (`changed_at`).
    pub async fn lease_changes(&self) -> BTreeMap<i32, DateTime<Utc>> {
        sqlx::query_as::<_, (i32, DateTime<Utc>)>(
            "SELECT partition, changed_at FROM outbox_relay.leases \
             WHERE table_oid = to_regclass($1)::oid::bigint",
        )
        .bind(quoted_table(&self.table))
        .fetch_all(&self.pool)
        .await
        .expect("read the leases")
        .into_iter()
        .collect()
    }

    /// True when every partition has an owner among `members` and each of them owns at least
    /// one.
    pub async fn partitions_shared_by(&self, members: &[i64]) -> bool {
        let owners = self.lease_owners().await;
        let wanted: BTreeSet<i64> = members.iter().copied().collect();
        let owning: BTreeSet<i64> = owners.values().flatten().copied().collect();
        !owners.is_empty()
            && owners
                .values()
                .all(|owner| owner.is_some_and(|o| wanted.contains(&o)))
            && owning == wanted
    }
}
