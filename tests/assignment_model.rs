//! A model of partition assignment at scale, without servers: 100 members and 10,000 partitions,
//! each member running `cluster::assignment::plan` on its own heartbeat (phases spread over the
//! interval) against a simulated lease table whose claims are conditional, as the store's are
//! (a claim of a partition that is no longer free takes nothing). Members join, leave cleanly and
//! crash; the model reports, per change, the heartbeats until the assignment is balanced again and
//! the partitions moved against the least any assignment could move, and the lease writes per
//! second at steady state. Run with `--nocapture` to see the figures.

use std::collections::{BTreeMap, BTreeSet};

use outbox_relay::cluster::assignment::{plan, share, MemberId, Partition, Plan};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Time in the model is counted in milliseconds.
const HEARTBEAT_MS: u64 = 2_000;
/// A member's lease: renewed on every heartbeat, expired this long after the last renewal.
const LEASE_MS: u64 = 15_000;
/// The model's clock step: members tick in between, at their own phase.
const STEP_MS: u64 = 100;

struct Member {
    /// The member's lease runs out at this time unless renewed.
    expires_at: u64,
    /// Its heartbeat's phase within the interval.
    phase: u64,
    /// False once the process is gone (crashed): it no longer ticks, its lease runs out.
    running: bool,
}

/// The lease table and its members, as the store would hold them.
struct Table {
    partitions: u32,
    owner: Vec<Option<MemberId>>,
    epoch: Vec<u64>,
    members: BTreeMap<MemberId, Member>,
    now: u64,
    /// Rows written to the lease tables (member renewals, claims, releases).
    row_writes: u64,
    /// Statements sent (one per renewal, one per claim batch, one per release batch).
    statements: u64,
    /// Changes of owner since the counter was last reset.
    moved: u64,
}

impl Table {
    fn new(partitions: u32) -> Table {
        Table {
            partitions,
            owner: vec![None; partitions as usize],
            epoch: vec![0; partitions as usize],
            members: BTreeMap::new(),
            now: 0,
            row_writes: 0,
            statements: 0,
            moved: 0,
        }
    }

    fn live(&self) -> BTreeSet<MemberId> {
        self.members
            .iter()
            .filter(|(_, m)| m.expires_at > self.now)
            .map(|(id, _)| *id)
            .collect()
    }

    /// A new member, numbered after every member before it (the store's member sequence).
    fn join(&mut self, rng: &mut StdRng) -> MemberId {
        let id = self.members.keys().next_back().map_or(1, |last| last + 1);
        let member = Member {
            expires_at: self.now + LEASE_MS,
            phase: rng.random_range(0..HEARTBEAT_MS / STEP_MS) * STEP_MS,
            running: true,
        };
        self.members.insert(id, member);
        self.row_writes += 1;
        self.statements += 1;
        id
    }

    /// A clean stop: the member settles and releases everything, then deregisters.
    fn leave(&mut self, id: MemberId) {
        let held = self.owner.iter().filter(|o| **o == Some(id)).count() as u64;
        for owner in self.owner.iter_mut().filter(|o| **o == Some(id)) {
            *owner = None;
        }
        self.members.remove(&id);
        self.row_writes += held + 1;
        self.statements += 2;
    }

    fn crash(&mut self, id: MemberId) {
        self.members.get_mut(&id).unwrap().running = false;
    }

    /// One member's heartbeat: renew its lease, read, and carry out its plan.
    fn tick(&mut self, id: MemberId) {
        let member = self.members.get_mut(&id).unwrap();
        if member.expires_at <= self.now {
            // Its lease ran out (a pause): it holds nothing and registers again as a new member
            // in the store; the model's members never pause, so this does not happen here.
            return;
        }
        member.expires_at = self.now + LEASE_MS;
        self.row_writes += 1;
        self.statements += 1;

        let live = self.live();
        let owned: Vec<Partition> = (0..self.partitions)
            .filter(|p| self.owner[*p as usize] == Some(id))
            .collect();
        match plan(id, self.partitions, &live, &owned) {
            Plan::Stay => {}
            Plan::Release(partitions) => {
                self.statements += 1;
                for p in partitions {
                    self.owner[p as usize] = None;
                    self.row_writes += 1;
                }
            }
            Plan::Claim(wanted) => {
                self.statements += 1;
                self.claim(id, wanted, &live);
            }
        }
    }

    /// The store's claim: the `wanted` lowest partitions nobody holds (unowned, or their
    /// owner's lease ran out), each with a new epoch.
    fn claim(&mut self, id: MemberId, wanted: u32, live: &BTreeSet<MemberId>) {
        let free = (0..self.partitions as usize)
            .filter(|p| !self.owner[*p].is_some_and(|o| live.contains(&o)))
            .take(wanted as usize)
            .collect::<Vec<_>>();
        for p in free {
            self.owner[p] = Some(id);
            self.epoch[p] += 1;
            self.row_writes += 1;
            self.moved += 1;
        }
    }

    fn step(&mut self) {
        self.now += STEP_MS;
        let due: Vec<MemberId> = self
            .members
            .iter()
            .filter(|(_, m)| m.running && self.now % HEARTBEAT_MS == m.phase)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            self.tick(id);
        }
    }

    /// Every partition held by a live member that runs, and every live member at its share
    /// (a crashed member counts as live, holding its partitions, until its lease runs out).
    fn balanced(&self) -> bool {
        let live = self.live();
        if live.is_empty() || live.iter().any(|m| !self.members[m].running) {
            return false;
        }
        let mut held: BTreeMap<MemberId, u32> = BTreeMap::new();
        for owner in &self.owner {
            match owner {
                Some(o) if live.contains(o) => *held.entry(*o).or_default() += 1,
                _ => return false,
            }
        }
        live.iter().all(|m| {
            held.get(m).copied().unwrap_or(0) == share(self.partitions, &live, *m).unwrap()
        })
    }

    /// Steps until balanced; the heartbeats it took.
    fn converge(&mut self) -> f64 {
        let start = self.now;
        while !self.balanced() {
            self.step();
            assert!(
                self.now - start < 100 * HEARTBEAT_MS,
                "no balance within 100 heartbeats"
            );
        }
        (self.now - start) as f64 / HEARTBEAT_MS as f64
    }

    fn held_by(&self, id: MemberId) -> u64 {
        self.owner.iter().filter(|o| **o == Some(id)).count() as u64
    }
}

#[derive(Default)]
struct Figures {
    heartbeats: Vec<f64>,
    moved: u64,
    least: u64,
}

impl Figures {
    fn record(&mut self, heartbeats: f64, moved: u64, least: u64) {
        self.heartbeats.push(heartbeats);
        self.moved += moved;
        self.least += least;
    }

    fn line(&self, kind: &str) -> String {
        let n = self.heartbeats.len() as f64;
        let mean = self.heartbeats.iter().sum::<f64>() / n;
        let max = self.heartbeats.iter().cloned().fold(0.0, f64::max);
        format!(
            "{kind:>6}: {} changes, balanced after {mean:.1} heartbeats (max {max:.1}), \
             moved {:.1} partitions per change, least possible {:.1} (ratio {:.3})",
            self.heartbeats.len(),
            self.moved as f64 / n,
            self.least as f64 / n,
            self.moved as f64 / self.least as f64
        )
    }
}

#[test]
fn a_hundred_members_share_ten_thousand_partitions_and_rebalance_with_few_moves() {
    const MEMBERS: u64 = 100;
    const PARTITIONS: u32 = 10_000;
    const CHANGES: usize = 30;
    let mut rng = StdRng::seed_from_u64(20261203);
    let mut table = Table::new(PARTITIONS);

    for _ in 0..MEMBERS {
        table.join(&mut rng);
    }
    let start = table.converge();
    println!("start: {MEMBERS} members balanced after {start:.1} heartbeats");

    // Steady state: ten heartbeats with nothing changing moves nothing.
    let (writes, statements, moved) = (table.row_writes, table.statements, table.moved);
    let before = table.now;
    while table.now - before < 20_000 {
        table.step();
    }
    let seconds = (table.now - before) as f64 / 1000.0;
    let steady_writes = (table.row_writes - writes) as f64 / seconds;
    let steady_statements = (table.statements - statements) as f64 / seconds;
    assert_eq!(table.moved, moved, "nothing moves while nothing changes");
    println!(
        "steady: {steady_writes:.1} lease rows written/s, {steady_statements:.1} statements/s \
         ({MEMBERS} members, heartbeat {HEARTBEAT_MS} ms; independent of the partitions)"
    );
    assert_eq!(steady_writes, MEMBERS as f64 * 1000.0 / HEARTBEAT_MS as f64);

    let (mut joins, mut leaves, mut crashes) =
        (Figures::default(), Figures::default(), Figures::default());
    for change in 0..CHANGES {
        table.moved = 0;
        let live: Vec<MemberId> = table.live().into_iter().collect();
        match change % 3 {
            0 => {
                let id = table.join(&mut rng);
                let heartbeats = table.converge();
                // The newcomer ends with its share, all of which had to move to it.
                let least = table.held_by(id);
                joins.record(heartbeats, table.moved, least);
            }
            1 => {
                let id = live[rng.random_range(0..live.len())];
                let least = table.held_by(id);
                table.leave(id);
                leaves.record(table.converge(), table.moved, least);
            }
            _ => {
                let id = live[rng.random_range(0..live.len())];
                let least = table.held_by(id);
                table.crash(id);
                let heartbeats = table.converge();
                table.members.remove(&id);
                crashes.record(heartbeats, table.moved, least);
            }
        }
    }
    for (kind, figures) in [("join", &joins), ("leave", &leaves), ("crash", &crashes)] {
        println!("{}", figures.line(kind));
        // Close to the minimum: a change moves at most a few partitions beyond what it must.
        assert!(
            figures.moved as f64
                <= figures.least as f64 * 1.1 + 2.0 * figures.heartbeats.len() as f64,
            "{}",
            figures.line(kind)
        );
    }
    // A crashed member's partitions wait for its lease to run out, then move within heartbeats.
    let lease_heartbeats = LEASE_MS as f64 / HEARTBEAT_MS as f64;
    assert!(crashes
        .heartbeats
        .iter()
        .all(|h| *h >= lease_heartbeats - 1.0));
}
