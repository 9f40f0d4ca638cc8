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

/// One member's reading of its table: who is live, and who holds what.
#[derive(Debug, Clone)]
pub struct Reading<'a> {
    /// The partitions of the table.
    pub partitions: u32,
    /// The members whose lease has not expired, the reader included.
    pub live: &'a BTreeSet<MemberId>,
    /// For each partition, the live member that holds it, or `None` when it is free (never
    /// taken, released, or its owner's lease expired).
    pub holders: &'a [Option<MemberId>],
}

/// What one member does after a reading.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Own partitions to give up, highest first (the lowest stay where they are).
    pub release: Vec<Partition>,
    /// Free partitions to try to take, in this order; another member may take one first, and
    /// the store's conditional claim decides.
    pub claim: Vec<Partition>,
}

/// The share of `member` among `live`: `partitions / live`, plus one for the first
/// `partitions % live` members in id order. `None` when `member` is not live.
pub fn share(partitions: u32, live: &BTreeSet<MemberId>, member: MemberId) -> Option<u32> {
    let rank = live.iter().position(|m| *m == member)? as u32;
    let count = live.len() as u32;
    Some(partitions / count + u32::from(rank < partitions % count))
}

/// What `me` does after `reading`. A member that is not live (its own lease expired) plans
/// nothing: it must register again first.
pub fn plan(me: MemberId, reading: &Reading<'_>) -> Plan {
    let Some(share) = share(reading.partitions, reading.live, me) else {
        return Plan::default();
    };
    let owned: Vec<Partition> = (0..reading.partitions)
        .filter(|p| reading.holders[*p as usize] == Some(me))
        .collect();
    let held = owned.len() as u32;
    if held > share {
        let surplus = (held - share) as usize;
        return Plan {
            release: owned.iter().rev().take(surplus).copied().collect(),
            claim: Vec::new(),
        };
    }
    let wanted = (share - held) as usize;
    // Start the search at a place of the member's own, so members that claim at once mostly
    // try different partitions instead of racing for the lowest free ones.
    let start = (me % u64::from(reading.partitions.max(1))) as u32;
    let claim = (0..reading.partitions)
        .map(|i| (start + i) % reading.partitions)
        .filter(|p| reading.holders[*p as usize].is_none())
        .take(wanted)
        .collect();
    Plan {
        release: Vec::new(),
        claim,
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
        let live = live(&[9]);
        let holders = vec![None; 256];
        let reading = Reading {
            partitions: 256,
            live: &live,
            holders: &holders,
        };
        let plan = plan(9, &reading);
        assert!(plan.release.is_empty());
        assert_eq!(
            plan.claim.iter().copied().collect::<BTreeSet<_>>(),
            (0..256).collect()
        );
    }

    #[test]
    fn a_member_never_claims_a_held_partition_and_releases_only_its_own() {
        let live = live(&[1, 2]);
        // Member 1 holds everything; member 2 just joined.
        let holders = vec![Some(1); 10];
        let reading = Reading {
            partitions: 10,
            live: &live,
            holders: &holders,
        };
        assert_eq!(plan(2, &reading).claim, Vec::<Partition>::new());
        assert_eq!(plan(1, &reading).release, vec![9, 8, 7, 6, 5]);
    }

    #[test]
    fn a_member_that_is_not_live_plans_nothing() {
        let live = live(&[1]);
        let holders = vec![Some(7); 4];
        let reading = Reading {
            partitions: 4,
            live: &live,
            holders: &holders,
        };
        assert_eq!(plan(7, &reading), Plan::default());
    }
}
