//! One relay process's membership on one table: registers, heartbeats, claims and releases
//! partitions by `assignment::plan`, and tells the relay through a watch what it may publish.
//! Owns the heartbeat's timing; the statements are the store's (`store::leases`), the rows the
//! relay's.
//!
//! Invariants:
//! - the relay is told a partition only after the claim took it, and only with the epoch the
//!   claim gave it (the fence of every statement the relay writes for that partition);
//! - a partition is released only after the relay acknowledged an [`Ownership`] without it, so
//!   nothing of it is in flight when another member takes it;
//! - [`Ownership::until`] is the moment the heartbeat that renewed the lease was *sent*, plus
//!   the lease, minus the margin the relay needs to settle (confirm timeout and mark): the
//!   database's expiry is later than that, so a relay that stops at `until` has stopped before
//!   its lease can run out, however long the process was paused or the answer delayed.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::assignment::{plan, MemberId, Partition, Plan};
use crate::retry::RetryPolicy;
use crate::store::leases::{Fence, Heartbeat, LeaseError, Leases, Member};
use crate::store::{DbError, LockGuard, LockState, TableLock};

/// The timings and identity of a membership.
#[derive(Debug, Clone)]
pub struct MemberSettings {
    /// Shown in `status`: host and process.
    pub name: String,
    pub partitions: u32,
    /// How long a member stays live after its last heartbeat.
    pub lease: Duration,
    /// How often it renews: well under the lease, so a few heartbeats may fail in a row.
    pub heartbeat: Duration,
    /// What the relay needs after its last publish to settle it (confirm timeout and the mark):
    /// publishing stops this long before the lease could run out.
    pub settle_margin: Duration,
}

impl MemberSettings {
    /// The timings' one rule: an owner that cannot renew stops publishing (at `until`) before
    /// its lease can expire, with at least one heartbeat's room to renew first.
    pub fn check(&self) -> Result<(), String> {
        if self.lease <= self.heartbeat + self.settle_margin {
            return Err(format!(
                "the lease ({}) must be longer than the heartbeat ({}) plus the confirm timeout \
                 and the mark ({})",
                humantime::format_duration(self.lease),
                humantime::format_duration(self.heartbeat),
                humantime::format_duration(self.settle_margin)
            ));
        }
        Ok(())
    }
}

/// What the relay may publish now.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ownership {
    /// The member this process is on the table, while registered.
    pub member: Option<MemberId>,
    /// The partitions the relay may fetch and publish, each with its epoch.
    pub partitions: BTreeMap<Partition, i64>,
    /// The fence over them, built from the registered member and its claims (None while not
    /// registered): what the relay's statements carry.
    pub fence: Option<Fence>,
    /// The table's live members at the last heartbeat, this one included (0 while it is not
    /// registered): a relay that owns nothing is a standby only when there are others.
    pub members: usize,
    /// Publish nothing after this instant, unless a later heartbeat moved it on.
    pub until: Option<Instant>,
    /// The coordination session the member registered and renews from: the relay publishes
    /// only while its links hold the table's lock through this very session. Once that
    /// session is gone the other members count this one dead and may take its partitions at
    /// once, before its next heartbeat learns it.
    pub session: Option<LockGuard>,
    /// Grows whenever partitions leave the set; the relay acknowledges it once nothing of the
    /// partitions that left is in flight.
    pub generation: u64,
    /// Why the member cannot take part (no such table, a changed partition count): the relay
    /// reports it, not ready, until it is mended.
    pub problem: Option<String>,
}

impl Ownership {
    /// True while the relay may publish `partition` (held, and the lease safely live).
    pub fn may_publish(&self, partition: Partition, now: Instant) -> bool {
        self.until.is_some_and(|until| now < until) && self.partitions.contains_key(&partition)
    }
}

/// The relay's side of a membership.
pub struct MemberHandle {
    pub ownership: watch::Receiver<Ownership>,
    /// The relay sends the generation of the last [`Ownership`] it has settled.
    pub settled: watch::Sender<u64>,
    pub task: tokio::task::JoinHandle<()>,
}

/// Starts the membership: it runs until `stop`, then hands its partitions back (after the
/// relay settled them) and leaves, so the others take them at their next heartbeat.
pub fn start(leases: Leases, settings: MemberSettings, stop: CancellationToken) -> MemberHandle {
    start_in(leases, settings, None, stop)
}

/// [`start`] under the process's table lock (`lock`, held shared by every relay of this
/// release): the member registers only while the lock is held, from the session holding it,
/// so a killed process's partitions are free at once; while a relay of an earlier release
/// holds the lock (exclusively) this one takes no partition at all.
pub fn start_in(
    leases: Leases,
    settings: MemberSettings,
    lock: Option<TableLock>,
    stop: CancellationToken,
) -> MemberHandle {
    let (ownership_tx, ownership) = watch::channel(Ownership::default());
    let (settled, settled_rx) = watch::channel(0);
    let task = tokio::spawn(
        Membership {
            leases,
            settings,
            member: None,
            ownership: ownership_tx,
            settled: settled_rx,
            releasing: Vec::new(),
            failures: 0,
            lock,
        }
        .run(stop),
    );
    MemberHandle {
        ownership,
        settled,
        task,
    }
}

struct Membership {
    leases: Leases,
    settings: MemberSettings,
    member: Option<Member>,
    ownership: watch::Sender<Ownership>,
    settled: watch::Receiver<u64>,
    /// Partitions taken out of the relay's set, released once it settled them.
    releasing: Vec<Partition>,
    /// Heartbeats or registrations failed in a row.
    failures: u32,
    lock: Option<TableLock>,
}

impl Membership {
    async fn run(mut self, stop: CancellationToken) {
        let backoff = RetryPolicy::outage(self.settings.heartbeat);
        while !stop.is_cancelled() {
            let pause = match self.beat().await {
                // Waiting for the table's lock to register: look again soon.
                Ok(()) if self.member.is_none() => {
                    self.failures = 0;
                    self.clear_problem();
                    self.settings.heartbeat.min(Duration::from_millis(250))
                }
                Ok(()) => {
                    self.failures = 0;
                    self.clear_problem();
                    self.leases.next_heartbeat_in(self.settings.heartbeat)
                }
                Err(
                    e @ (LeaseError::NoTable(_)
                    | LeaseError::PartitionsChanged { .. }
                    | LeaseError::Db(DbError::Refused(_))),
                ) => {
                    self.failures += 1;
                    let problem = e.to_string();
                    if self.ownership.borrow().problem.as_ref() != Some(&problem) {
                        tracing::warn!(table = %self.leases.table(), error = %e, "partition leases: cannot take part; retrying with backoff");
                        self.ownership.send_modify(|o| o.problem = Some(problem));
                    }
                    backoff
                        .delay(self.failures, rand::random::<f64>())
                        .min(self.settings.heartbeat * 5)
                }
                Err(e) => {
                    self.failures += 1;
                    if self.failures == 1 {
                        tracing::warn!(table = %self.leases.table(), error = %e, "partition leases: cannot renew; publishing stops when the lease is near its end");
                    }
                    backoff
                        .delay(self.failures, rand::random::<f64>())
                        .min(self.settings.heartbeat)
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.cancelled() => {}
            }
        }
        self.leave().await;
    }

    /// One heartbeat: register if need be, renew, release what the relay settled, then claim
    /// or give up partitions to reach the fair share.
    async fn beat(&mut self) -> Result<(), LeaseError> {
        let session = match self.lock.as_ref().map(TableLock::current) {
            None => None,
            Some(LockState::Held(guard)) => Some(guard),
            Some(LockState::Standby) => {
                // A relay of an earlier release holds the table: take no part while it does.
                if self.member.is_some() {
                    tracing::warn!(table = %self.leases.table(), "partition leases: a relay of an earlier release holds the table's lock; giving up the partitions");
                    self.leave().await;
                }
                return Ok(());
            }
            // The session is reconnecting: the leases stay until they run out; the relay
            // publishes nothing meanwhile (its links are down).
            Some(LockState::Connecting | LockState::Down(_)) if self.member.is_none() => {
                return Ok(())
            }
            Some(_) => self.member.as_ref().and_then(|m| m.session),
        };
        if let Some(member) = self.member.as_mut() {
            member.session = session;
        }
        let member = match &self.member {
            Some(member) => member.clone(),
            None => {
                let member = self
                    .leases
                    .register_in(&self.settings.name, self.settings.partitions, session)
                    .await?;
                tracing::info!(table = %self.leases.table(), member = member.id, "partition leases: registered");
                self.member = Some(member.clone());
                member
            }
        };
        let sent = Instant::now();
        let (live, owned) = match self.leases.heartbeat(&member).await? {
            Heartbeat::Renewed { live, owned } => (live, owned),
            Heartbeat::Replaced => {
                tracing::warn!(table = %self.leases.table(), member = member.id, "partition leases: the outbox table was dropped or created anew; leaving its old instance and registering on the current one");
                self.leave().await;
                self.releasing.clear();
                return Ok(());
            }
            Heartbeat::Expired => {
                tracing::warn!(table = %self.leases.table(), member = member.id, "partition leases: the lease ran out (a pause or a lost connection), or the coordination session it was taken from is gone; registering again");
                self.member = None;
                self.releasing.clear();
                self.publish(BTreeMap::new(), None, 0);
                return Ok(());
            }
        };
        let until = sent + self.settings.lease - self.settings.settle_margin;
        let mut owned: BTreeMap<Partition, i64> = owned.into_iter().collect();
        if !self.releasing.is_empty() && *self.settled.borrow() >= self.generation() {
            let releasing = std::mem::take(&mut self.releasing);
            self.leases.release(&member, &releasing).await?;
            for p in &releasing {
                owned.remove(p);
            }
            tracing::info!(table = %self.leases.table(), member = member.id, released = releasing.len(), owned = owned.len(), "partition leases: handed partitions over (their rows settled)");
        }
        for p in &self.releasing {
            owned.remove(p);
        }
        let held: Vec<Partition> = owned.keys().copied().collect();
        match plan(member.id, self.settings.partitions, &live, &held) {
            Plan::Stay => {}
            Plan::Claim(wanted) => {
                let taken = self.leases.claim(&member, wanted).await?;
                if !taken.is_empty() {
                    let claimed = taken.len();
                    owned.extend(taken);
                    tracing::info!(table = %self.leases.table(), member = member.id, claimed, owned = owned.len(), members = live.len(), "partition leases: claimed partitions");
                }
            }
            Plan::Release(give) => {
                for p in &give {
                    owned.remove(p);
                }
                self.releasing.extend(give);
            }
        }
        self.publish(owned, Some(until), live.len());
        Ok(())
    }

    fn clear_problem(&self) {
        self.ownership
            .send_if_modified(|o| o.problem.take().is_some());
    }

    fn generation(&self) -> u64 {
        self.ownership.borrow().generation
    }

    /// Tells the relay what it may publish; a set that lost partitions is a new generation.
    /// The relays are woken only by a change they act on: a renewal that merely moves `until`
    /// on is read at their next turn (an idle relay stays asleep), unless the last `until` had
    /// passed (the relay stopped publishing and waits for it).
    fn publish(
        &self,
        partitions: BTreeMap<Partition, i64>,
        until: Option<Instant>,
        members: usize,
    ) {
        let member = self.member.as_ref().map(|m| m.id);
        let fence = self
            .member
            .as_ref()
            .map(|m| Fence::new(m, partitions.iter().map(|(p, e)| (*p, *e))));
        let session = self.member.as_ref().and_then(|m| m.session);
        self.ownership.send_if_modified(|now| {
            let lost = now.partitions.keys().any(|p| !partitions.contains_key(p));
            if lost {
                now.generation += 1;
            }
            let stopped = now.until.is_none_or(|u| Instant::now() >= u) != until.is_none();
            let changed = lost
                || stopped
                || now.member != member
                || now.fence != fence
                || now.session != session
                || now.partitions != partitions
                || now.members != members;
            now.member = member;
            now.members = members;
            now.session = session;
            now.fence = fence;
            now.partitions = partitions;
            now.until = until;
            changed
        });
    }

    /// Stops publishing, waits (at most the settle margin) for the relay to settle, and
    /// leaves.
    async fn leave(&mut self) {
        let Some(member) = self.member.take() else {
            return;
        };
        self.publish(BTreeMap::new(), None, 0);
        let generation = self.generation();
        let settled = self.settled.wait_for(|g| *g >= generation);
        let _ = tokio::time::timeout(self.settings.settle_margin, settled).await;
        match self.leases.leave(&member).await {
            Ok(()) => {
                tracing::info!(table = %self.leases.table(), member = member.id, "partition leases: left")
            }
            Err(e) => {
                tracing::warn!(table = %self.leases.table(), member = member.id, error = %e, "partition leases: could not leave; the partitions move when the lease runs out")
            }
        }
    }
}
