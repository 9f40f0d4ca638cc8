//! Memberships on one table in the real PostgreSQL, each with a stand-in for its relay that
//! settles at once: members reach their fair shares with every partition owned once; a member
//! that stops hands its partitions over; one that dies loses them when its lease runs out, and
//! the ownership it last published stops allowing publishes before that.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_relay::cluster::member::{self, MemberHandle, MemberSettings, Ownership};
use outbox_relay::config::TableName;
use outbox_relay::store::leases::Leases;
use outbox_relay_testkit::prelude::*;
use tokio_util::sync::CancellationToken;

const PARTITIONS: u32 = 64;

fn settings(name: &str) -> MemberSettings {
    MemberSettings {
        name: name.into(),
        partitions: PARTITIONS,
        lease: Duration::from_secs(3),
        heartbeat: Duration::from_millis(300),
        settle_margin: Duration::from_secs(1),
    }
}

/// An ownership a relay saw: when, and its partitions.
type Seen = (tokio::time::Instant, BTreeSet<u32>);

struct Running {
    handle: MemberHandle,
    stop: CancellationToken,
    /// Every ownership its relay saw, with when it saw it.
    changes: Arc<Mutex<Vec<Seen>>>,
}

impl Running {
    fn start(env: &TestEnv, name: &str) -> Running {
        let leases = Leases::new(
            env.pool.clone(),
            TableName::parse(&env.table).unwrap(),
            settings(name).lease,
        );
        let stop = CancellationToken::new();
        let handle = member::start(leases, settings(name), stop.clone());
        // The relay's stand-in: nothing is ever in flight, so every generation is settled.
        let mut ownership = handle.ownership.clone();
        let settled = handle.settled.clone();
        let changes = Arc::new(Mutex::new(Vec::new()));
        let seen = changes.clone();
        tokio::spawn(async move {
            while ownership.changed().await.is_ok() {
                let now = ownership.borrow_and_update().clone();
                let partitions = now.partitions.keys().copied().collect();
                seen.lock()
                    .unwrap()
                    .push((tokio::time::Instant::now(), partitions));
                let generation = now.generation;
                if settled.send(generation).is_err() {
                    break;
                }
            }
        });
        Running {
            handle,
            stop,
            changes,
        }
    }

    /// When this member's relay was first allowed one of `partitions`.
    fn first_took(&self, partitions: &BTreeSet<u32>) -> Option<tokio::time::Instant> {
        self.changes
            .lock()
            .unwrap()
            .iter()
            .find(|(_, owned)| owned.iter().any(|p| partitions.contains(p)))
            .map(|(at, _)| *at)
    }

    fn owned(&self) -> Ownership {
        self.handle.ownership.borrow().clone()
    }

    fn partitions(&self) -> BTreeSet<u32> {
        self.owned().partitions.keys().copied().collect()
    }
}

/// True when the members' partitions are disjoint, cover every partition, and each member holds
/// its fair share (64 / n, give or take one).
fn balanced(members: &[&Running]) -> bool {
    let sets: Vec<BTreeSet<u32>> = members.iter().map(|m| m.partitions()).collect();
    let total: usize = sets.iter().map(|s| s.len()).sum();
    let union: BTreeSet<u32> = sets.iter().flatten().copied().collect();
    let fair = PARTITIONS as usize / members.len();
    total == PARTITIONS as usize
        && union.len() == PARTITIONS as usize
        && sets.iter().all(|s| s.len() == fair || s.len() == fair + 1)
}

#[tokio::test]
async fn members_share_fairly_hand_over_on_stop_and_lose_on_death() {
    let env = TestEnv::new(Setup::new()).await;
    let a = Running::start(&env, "a");
    eventually("a alone to own every partition", || async {
        balanced(&[&a])
    })
    .await;
    let b = Running::start(&env, "b");
    eventually("a and b to own half each", || async { balanced(&[&a, &b]) }).await;
    let c = Running::start(&env, "c");
    eventually("a, b and c to share", || async { balanced(&[&a, &b, &c]) }).await;

    // A clean stop: a settles, releases and leaves; b and c take its partitions.
    a.stop.cancel();
    a.handle.task.await.unwrap();
    eventually("b and c to share a's partitions", || async {
        balanced(&[&b, &c])
    })
    .await;

    // b dies (its task is gone without leaving): the last ownership it published stops
    // allowing publishes by itself, before its lease can run out; then c takes everything.
    b.handle.task.abort();
    let last = b.owned();
    let until = last.until.expect("b was publishing");
    // Only what c takes from now on counts.
    c.changes.lock().unwrap().clear();
    let some_partition = *last.partitions.keys().next().unwrap();
    let b_partitions: BTreeSet<u32> = last.partitions.keys().copied().collect();
    eventually(
        "c to own every partition after b's lease ran out",
        || async { c.partitions().len() == PARTITIONS as usize },
    )
    .await;
    // c's heartbeats watched b's partitions: the first one c took came after b had stopped.
    let taken_at = c.first_took(&b_partitions).expect("c took b's partitions");
    assert!(
        taken_at > until,
        "c took one of b's partitions {:?} before b's ownership stopped allowing publishes",
        until - taken_at
    );
    assert!(!last.may_publish(some_partition, taken_at));
    c.stop.cancel();
    c.handle.task.await.unwrap();
}

#[test]
fn the_lease_must_outlast_a_heartbeat_and_the_settling() {
    let mut s = settings("x");
    assert!(s.check().is_ok());
    s.lease = Duration::from_millis(1200);
    let e = s.check().unwrap_err();
    assert!(e.contains("lease"), "{e}");
}
