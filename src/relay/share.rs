//! One table relay's share of its table's partitions: what the membership holds
//! (`cluster::member`), narrowed to the relay's channel (partition p goes out on channel
//! p % channels), as the fence its writes carry and the instant its publishing must stop.
//! Also the other way: the relay's acknowledgement that nothing of the partitions it gave up
//! is in flight any more, which lets the membership release them.
//!
//! Invariant: a relay publishes a partition only while the last [`Turn`] it took holds it and
//! its `until` has not passed; it acknowledges a generation only once its window is empty and
//! its marks are written.

use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio::time::Instant;

use crate::cluster::assignment::MemberId;
use crate::cluster::member::Ownership;
use crate::store::{Fence, LockGuard};

/// What a relay may do this turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ShareState {
    /// It owns partitions (in its channel) and may publish them until `until`.
    Owns(Turn),
    /// The membership has not registered yet; `again` once it had been registered before (its
    /// lease ran out, or the coordination session it was registered from ended): it was lost,
    /// and nothing is published until the membership has registered anew.
    Registering { again: bool },
    /// It owns nothing in its channel, for the reason given.
    Nothing(Idle),
    /// Its leases could not be renewed in time: it must publish nothing until the membership
    /// renews them, or they run out and it registers again.
    Expiring,
    /// The member cannot take part (no such table, a changed partition count).
    Unusable(String),
}

/// Why a registered member's relay owns nothing in its channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Idle {
    /// The process owns partitions of the table, but none that go out on this channel.
    OtherChannels,
    /// The table's `others` other live relays own all its partitions: a standby.
    OtherRelays { others: usize },
    /// No other relay is live, and the membership has claimed nothing yet: it is about to.
    Claiming,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Turn {
    pub member: MemberId,
    pub fence: Fence,
    pub until: Instant,
    /// The coordination session the membership holds its leases through (see
    /// [`Ownership::session`]).
    pub session: Option<LockGuard>,
    /// The membership's generation this turn was taken at (see [`Share::ack`]).
    pub generation: u64,
}

/// The acknowledgements of one table's relays, the lowest of which the membership sees.
pub struct Acks {
    acked: Mutex<Vec<u64>>,
    settled: watch::Sender<u64>,
}

impl Acks {
    pub fn new(channels: u32, settled: watch::Sender<u64>) -> Arc<Acks> {
        Arc::new(Acks {
            acked: Mutex::new(vec![0; channels as usize]),
            settled,
        })
    }

    fn ack(&self, channel: u32, generation: u64) {
        let mut acked = self.acked.lock().unwrap_or_else(|e| e.into_inner());
        acked[channel as usize] = acked[channel as usize].max(generation);
        let lowest = acked.iter().copied().min().unwrap_or(generation);
        self.settled.send_if_modified(|s| {
            let moved = lowest > *s;
            *s = (*s).max(lowest);
            moved
        });
    }
}

/// One relay's view of the membership.
pub struct Share {
    ownership: watch::Receiver<Ownership>,
    acks: Arc<Acks>,
    channel: u32,
    channels: u32,
    acked: u64,
    /// The membership was registered at some point: a membership seen unregistered after that
    /// was lost, not yet to come.
    was_member: bool,
}

impl Share {
    /// The share of channel `channel` of `channels` of a table's partitions.
    pub fn new(
        ownership: watch::Receiver<Ownership>,
        acks: Arc<Acks>,
        channel: u32,
        channels: u32,
    ) -> Share {
        Share {
            ownership,
            acks,
            channel,
            channels,
            acked: 0,
            was_member: false,
        }
    }

    /// What the relay may do now (and the membership's state, seen: [`Share::changed`] waits
    /// for the next change after it).
    pub(crate) fn state(&mut self) -> ShareState {
        let (channel, channels) = (self.channel, self.channels);
        let own = self.ownership.borrow_and_update();
        if let Some(problem) = &own.problem {
            return ShareState::Unusable(problem.clone());
        }
        let (Some(member), Some(all)) = (own.member, own.fence.as_ref()) else {
            return ShareState::Registering {
                again: self.was_member,
            };
        };
        self.was_member = true;
        // The membership's fence (the database's answers), narrowed to this channel.
        let fence = all.only(|p| p % channels == channel);
        if fence.owned().is_empty() {
            let others = own.members.saturating_sub(1);
            return ShareState::Nothing(if !own.partitions.is_empty() {
                Idle::OtherChannels
            } else if others > 0 {
                Idle::OtherRelays { others }
            } else {
                Idle::Claiming
            });
        }
        match own.until {
            Some(until) if Instant::now() < until => ShareState::Owns(Turn {
                member,
                fence,
                until,
                session: own.session,
                generation: own.generation,
            }),
            _ => ShareState::Expiring,
        }
    }

    /// The membership's generation now: partitions left the set since the relay acknowledged
    /// when it is above what [`Share::ack`] last said.
    pub fn generation(&self) -> u64 {
        self.ownership.borrow().generation
    }

    /// True when partitions left the set since the last acknowledgement.
    pub fn must_settle(&self) -> bool {
        self.generation() > self.acked
    }

    /// Nothing of the partitions that left the set by `generation` is in flight or unmarked.
    pub fn ack(&mut self, generation: u64) {
        self.acked = self.acked.max(generation);
        self.acks.ack(self.channel, self.acked);
    }

    /// The relay stopped with everything settled: whatever leaves the set from now on is
    /// settled too.
    pub fn ack_all(&mut self) {
        self.ack(u64::MAX);
    }

    /// Resolves when the membership changed after it was last read with [`Share::state`].
    pub async fn changed(&mut self) {
        if self.ownership.changed().await.is_err() {
            std::future::pending::<()>().await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share_of(channel: u32, channels: u32) -> (watch::Sender<Ownership>, Share) {
        let (tx, rx) = watch::channel(Ownership::default());
        let acks = Acks::new(channels, watch::channel(0).0);
        (tx, Share::new(rx, acks, channel, channels))
    }

    /// What the membership publishes for `member` (None: not registered) holding the
    /// ownership's partitions of a table of 4.
    fn member_is(o: &mut Ownership, member: Option<MemberId>) {
        o.member = member;
        o.fence = member.map(|id| {
            let m = crate::store::leases::Member::registered_for_tests(id, 42, 4);
            Fence::new(&m, o.partitions.iter().map(|(p, e)| (*p, *e)))
        });
    }

    #[test]
    fn owning_nothing_is_a_standby_only_beside_live_owners() {
        let (tx, mut share) = share_of(1, 2);
        tx.send_modify(|o| {
            member_is(o, Some(7));
            o.members = 1;
        });
        assert_eq!(share.state(), ShareState::Nothing(Idle::Claiming));
        tx.send_modify(|o| o.members = 3);
        assert_eq!(
            share.state(),
            ShareState::Nothing(Idle::OtherRelays { others: 2 })
        );
        // Partition 0 goes out on channel 0: this channel has nothing, the process has.
        tx.send_modify(|o| {
            o.members = 1;
            o.partitions.insert(0, 1);
            member_is(o, Some(7));
        });
        assert_eq!(share.state(), ShareState::Nothing(Idle::OtherChannels));
    }

    #[test]
    fn a_membership_seen_before_and_gone_is_registering_again() {
        let (tx, mut share) = share_of(0, 1);
        assert_eq!(share.state(), ShareState::Registering { again: false });
        tx.send_modify(|o| {
            member_is(o, Some(7));
            o.members = 1;
        });
        share.state();
        tx.send_modify(|o| {
            member_is(o, None);
            o.members = 0;
        });
        assert_eq!(share.state(), ShareState::Registering { again: true });
    }
}
