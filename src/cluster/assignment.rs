//! Which partitions a member should own: pure policy over one reading of a table's members and
//! leases, as a function of that reading only (no clock, no SQL, no randomness), so every member
//! that reads the same rows reaches the same answer and tests need no servers.
//!
//! The rule it keeps: **a member only ever takes a partition that nobody holds** (unowned, or its
//! owner's lease expired) and only ever gives up partitions of its own. A partition therefore
//! changes owner only after the old owner released it or its lease ran out; the lease's epoch
//! (kept by the store) fences whatever the old owner still tries.
//!
//! Fair share: the live members, sorted by id, each aim for `partitions / members` partitions,
//! and the first `partitions % members` of them for one more. A member above its share releases
//! the surplus (after settling its in-flight rows); a member below it claims free partitions up
//! to its share. Nothing else moves, so a change of membership moves close to the minimum: a
//! member that joins `m` others takes about `partitions / (m + 1)`, one that leaves hands over
//! what it held.

use std::collections::BTreeSet;

/// A member's identity: one per process incarnation, so a relay that lost its lease and comes
/// back is a new member and can never revive an old lease.
pub type MemberId = u64;

/// A partition number, `0..partitions`.
pub type Partition = u32;

/// What one member does after reading its table's live members and its own partitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// At its share: renew and carry on.
    Stay,
    /// Above its share: give up these partitions of its own (the highest; the lowest stay
    /// where they are), after settling their in-flight rows.
    Release(Vec<Partition>),
    /// Below its share: take up to this many free partitions. The store's claim takes only
    /// partitions nobody holds (unowned, or their owner's lease expired), lowest first, and
    /// skips those another member is claiming at the same moment.
    Claim(u32),
}

/// The share of `member` among `live`: `partitions / live`, plus one for the first
/// `partitions % live` members in id order. `None` when `member` is not live.
pub fn share(partitions: u32, live: &BTreeSet<MemberId>, member: MemberId) -> Option<u32> {
    let rank = live.iter().position(|m| *m == member)? as u32;
    let count = live.len() as u32;
    Some(partitions / count + u32::from(rank < partitions % count))
}

/// What `me` does, holding `owned` (ascending) among `live` members. A member that is not live
/// (its own lease expired) must register again first: it stays and takes nothing.
pub fn plan(me: MemberId, partitions: u32, live: &BTreeSet<MemberId>, owned: &[Partition]) -> Plan {
    let Some(share) = share(partitions, live, me) else {
        return Plan::Stay;
    };
    let held = owned.len() as u32;
    match held.cmp(&share) {
        std::cmp::Ordering::Equal => Plan::Stay,
        std::cmp::Ordering::Greater => Plan::Release(
            owned
                .iter()
                .rev()
                .take((held - share) as usize)
                .copied()
                .collect(),
        ),
        std::cmp::Ordering::Less => Plan::Claim(share - held),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(ids: &[MemberId]) -> BTreeSet<MemberId> {
        ids.iter().copied().collect()
    }

    #[test]
    fn shares_add_up_to_the_partitions_and_differ_by_at_most_one() {
        for members in 1..=12u64 {
            let live = live(&(1..=members).collect::<Vec<_>>());
            for partitions in [1, 7, 256, 10_000] {
                let shares: Vec<u32> = live
                    .iter()
                    .map(|m| share(partitions, &live, *m).unwrap())
                    .collect();
                assert_eq!(shares.iter().sum::<u32>(), partitions);
                let (min, max) = (shares.iter().min(), shares.iter().max());
                assert!(max.unwrap() - min.unwrap() <= 1, "{shares:?}");
            }
        }
    }

    #[test]
    fn a_single_member_claims_every_partition() {
        assert_eq!(plan(9, 256, &live(&[9]), &[]), Plan::Claim(256));
    }

    #[test]
    fn a_member_above_its_share_releases_its_highest_partitions() {
        let all: Vec<Partition> = (0..10).collect();
        assert_eq!(
            plan(1, 10, &live(&[1, 2]), &all),
            Plan::Release(vec![9, 8, 7, 6, 5])
        );
        assert_eq!(plan(2, 10, &live(&[1, 2]), &[]), Plan::Claim(5));
        assert_eq!(plan(1, 10, &live(&[1, 2]), &all[..5]), Plan::Stay);
    }

    #[test]
    fn a_member_that_is_not_live_takes_nothing() {
        assert_eq!(plan(7, 4, &live(&[1]), &[0, 1]), Plan::Stay);
    }
}
