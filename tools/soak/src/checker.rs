//! The invariants, checked as deliveries arrive and once more against the table at the end:
//! every committed row delivered, first deliveries of a key in id order, duplicates identical to
//! their original (message_id and body), rolled-back rows never delivered, every version a mark
//! names received. Pure bookkeeping.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use crate::badrows::Received;

/// One message as the consumer received it.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The `x-outbox-id` header: the row's id.
    pub id: Option<i64>,
    pub message_id: String,
    pub ordering_key: String,
    pub body_hash: u64,
    pub at: Instant,
    /// The broker's redelivered flag: the consumer may have seen this very message before
    /// (its ack was lost with a connection), which is not a duplicate sent by the relay.
    pub redelivered: bool,
    /// The whole message, kept for bad rows only (their content is compared at the end).
    pub content: Option<Box<Received>>,
}

/// A committed good row, as read from the table at the end or by a TRUNCATE that removed it.
#[derive(Debug, Clone)]
pub struct CommittedRow {
    pub id: i64,
    pub dedup_key: String,
    pub ordering_key: String,
    pub body_hash: u64,
    /// Must be received: in the table at the end, or marked published before a TRUNCATE
    /// removed it (an unsent row a TRUNCATE removed is owed nothing).
    pub owed: bool,
}

/// A stable hash of a message body (the row's `payload::text`).
pub fn body_hash(bytes: &[u8]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

struct First {
    message_id: String,
    body_hash: u64,
    at: Instant,
    /// Bodies of later deliveries that differ from the first (a row updated by hand between
    /// two sends; any other row's differing duplicate is a mismatch).
    other_bodies: Vec<u64>,
}

/// Everything the consumer saw, and the violations found so far.
#[derive(Default)]
pub struct Checker {
    first: HashMap<i64, First>,
    /// The largest id first-delivered per ordering key.
    last_first: HashMap<String, i64>,
    pub order_violations: Vec<String>,
    /// Deliveries beyond the first of a row that the broker did not flag as redelivered.
    pub duplicates: u64,
    /// Deliveries beyond the first that the broker flagged as redelivered (consumer side).
    pub redeliveries: u64,
    /// Duplicates whose message_id or body differ from the original's: (id, what differed).
    pub mismatches: Vec<(i64, String)>,
    /// Every message of a bad row, by id.
    pub captured: HashMap<i64, Vec<Received>>,
    pub without_id: u64,
    pub deliveries: u64,
    /// Arrival times of all deliveries and of the duplicates, in arrival order.
    pub delivery_times: Vec<Instant>,
    pub duplicate_times: Vec<Instant>,
}

impl Checker {
    /// Records one delivery and checks order and identity at once.
    pub fn observe(&mut self, d: Delivery) {
        self.deliveries += 1;
        self.delivery_times.push(d.at);
        let Some(id) = d.id else {
            self.without_id += 1;
            return;
        };
        if let Some(content) = d.content {
            self.captured.entry(id).or_default().push(*content);
        }
        if let Some(first) = self.first.get_mut(&id) {
            if d.redelivered {
                self.redeliveries += 1;
            } else {
                self.duplicates += 1;
                self.duplicate_times.push(d.at);
            }
            if first.body_hash != d.body_hash && !first.other_bodies.contains(&d.body_hash) {
                first.other_bodies.push(d.body_hash);
            }
            if first.message_id != d.message_id || first.body_hash != d.body_hash {
                let problem = format!(
                    "id={id}: duplicate with message_id={:?} differs from the original's message_id={:?} or body",
                    d.message_id, first.message_id
                );
                self.mismatches.push((id, problem));
            }
            return;
        }
        match self.last_first.get_mut(&d.ordering_key) {
            Some(last) if *last > id => {
                let problem = format!(
                    "key={:?}: id {id} first delivered after id {} of the same key",
                    d.ordering_key, *last
                );
                eprintln!("soak: ORDER VIOLATION {problem}");
                self.order_violations.push(problem);
            }
            Some(last) => *last = id,
            None => {
                self.last_first.insert(d.ordering_key.clone(), id);
            }
        }
        self.first.insert(
            id,
            First {
                message_id: d.message_id,
                body_hash: d.body_hash,
                at: d.at,
                other_bodies: Vec::new(),
            },
        );
    }

    /// Rows delivered at least once.
    pub fn delivered(&self) -> usize {
        self.first.len()
    }

    pub fn has(&self, id: i64) -> bool {
        self.first.contains_key(&id)
    }

    /// Whether row `id` arrived with a body of hash `body` (first or later).
    pub fn received_body(&self, id: i64, body: u64) -> bool {
        self.first
            .get(&id)
            .is_some_and(|f| f.body_hash == body || f.other_bodies.contains(&body))
    }

    /// The body hashes row `id` arrived with, the first one first.
    pub fn bodies(&self, id: i64) -> Vec<u64> {
        self.first.get(&id).map_or_else(Vec::new, |f| {
            std::iter::once(f.body_hash)
                .chain(f.other_bodies.iter().copied())
                .collect()
        })
    }

    /// The message_id row `id` first arrived with.
    pub fn message_id(&self, id: i64) -> Option<&str> {
        self.first.get(&id).map(|f| f.message_id.as_str())
    }

    /// When row `id` first arrived.
    pub fn first_delivered(&self, id: i64) -> Option<Instant> {
        self.first.get(&id).map(|f| f.at)
    }

    /// Compares what arrived with what the table says was committed. `versions`: the rows an
    /// operator updated, with every payload they had (any of them may arrive, nothing else).
    pub fn verdict(
        &self,
        committed: &[CommittedRow],
        rolled_back: &HashSet<String>,
        versions: &HashMap<i64, Vec<u64>>,
    ) -> Verdict {
        let mut v = Verdict::default();
        let mut committed_ids = HashSet::with_capacity(committed.len());
        for row in committed {
            committed_ids.insert(row.id);
            match self.first.get(&row.id) {
                None if row.owed => {
                    v.lost += 1;
                    if v.lost_examples.len() < 10 {
                        v.lost_examples
                            .push(format!("id={} dedup_key={}", row.id, row.dedup_key));
                    }
                }
                None => v.not_owed += 1,
                Some(first) => {
                    let body_ok = match versions.get(&row.id) {
                        Some(accepted) => self.bodies(row.id).iter().all(|b| accepted.contains(b)),
                        None => first.body_hash == row.body_hash,
                    };
                    if first.message_id != row.dedup_key || !body_ok {
                        v.wrong_content.push(format!(
                            "id={}: delivered message_id={:?} or body differs from the row (dedup_key={:?})",
                            row.id, first.message_id, row.dedup_key
                        ));
                    }
                }
            }
        }
        for (id, first) in &self.first {
            // Bad rows are judged on their own (crate::badrows::judge).
            if committed_ids.contains(id) || self.captured.contains_key(id) {
                continue;
            }
            if rolled_back.contains(&first.message_id) {
                v.rolled_back_delivered
                    .push(format!("id={id} message_id={:?}", first.message_id));
            } else {
                v.unknown_delivered
                    .push(format!("id={id} message_id={:?}", first.message_id));
            }
        }
        v.mismatches = self
            .mismatches
            .iter()
            .filter(|(id, _)| !versions.contains_key(id))
            .map(|(_, m)| m.clone())
            .collect();
        v
    }

    /// Time from `end` to the first delivery after it.
    pub fn recovery_after(&self, end: Instant) -> Option<Duration> {
        let i = self.delivery_times.partition_point(|t| *t < end);
        self.delivery_times.get(i).map(|t| t.duration_since(end))
    }
}

/// The end-of-run comparison with the table.
#[derive(Debug, Default)]
pub struct Verdict {
    /// Owed rows never received.
    pub lost: u64,
    /// Rows a TRUNCATE removed before they were sent, never received: owed nothing.
    pub not_owed: u64,
    /// Duplicates that differ from their original (an updated row's versions excepted).
    pub mismatches: Vec<String>,
    pub lost_examples: Vec<String>,
    pub rolled_back_delivered: Vec<String>,
    pub unknown_delivered: Vec<String>,
    pub wrong_content: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(id: i64, key: &str, redelivered: bool) -> Delivery {
        Delivery {
            id: Some(id),
            message_id: format!("m{id}"),
            ordering_key: key.into(),
            body_hash: id as u64,
            at: Instant::now(),
            redelivered,
            content: None,
        }
    }

    #[test]
    fn a_smaller_id_first_delivered_after_a_larger_one_of_its_key_is_a_violation() {
        let mut c = Checker::default();
        c.observe(d(1, "a", false));
        c.observe(d(3, "a", false));
        c.observe(d(4, "b", false));
        c.observe(d(1, "a", false));
        assert!(c.order_violations.is_empty());
        assert_eq!(c.duplicates, 1);
        c.observe(d(2, "a", false));
        assert_eq!(c.order_violations.len(), 1);
    }

    #[test]
    fn lost_and_rolled_back_rows_are_told_apart() {
        let mut c = Checker::default();
        c.observe(d(1, "a", false));
        c.observe(d(9, "a", true));
        let committed = vec![
            CommittedRow {
                id: 1,
                dedup_key: "m1".into(),
                ordering_key: "a".into(),
                body_hash: 1,
                owed: true,
            },
            CommittedRow {
                id: 2,
                dedup_key: "m2".into(),
                ordering_key: "a".into(),
                body_hash: 2,
                owed: true,
            },
            CommittedRow {
                id: 3,
                dedup_key: "m3".into(),
                ordering_key: "a".into(),
                body_hash: 3,
                owed: false,
            },
        ];
        let v = c.verdict(
            &committed,
            &HashSet::from(["m9".to_string()]),
            &HashMap::new(),
        );
        assert_eq!(v.lost, 1);
        assert_eq!(v.not_owed, 1);
        assert_eq!(v.rolled_back_delivered.len(), 1);
        assert!(v.wrong_content.is_empty());
    }

    #[test]
    fn an_updated_row_may_arrive_in_any_of_its_versions_and_in_no_other() {
        let mut c = Checker::default();
        let mut old = d(1, "a", false);
        old.body_hash = 10;
        let mut new = d(1, "a", false);
        new.body_hash = 11;
        c.observe(old);
        c.observe(new);
        assert_eq!(
            c.mismatches.len(),
            1,
            "a differing duplicate, until told why"
        );
        let row = CommittedRow {
            id: 1,
            dedup_key: "m1".into(),
            ordering_key: "a".into(),
            body_hash: 11,
            owed: true,
        };
        let updated = HashMap::from([(1, vec![10, 11])]);
        let v = c.verdict(std::slice::from_ref(&row), &HashSet::new(), &updated);
        assert!(
            v.wrong_content.is_empty() && v.mismatches.is_empty(),
            "{v:?}"
        );
        assert!(c.received_body(1, 10) && c.received_body(1, 11) && !c.received_body(1, 12));
        let only_new = HashMap::from([(1, vec![11, 12])]);
        let v = c.verdict(&[row], &HashSet::new(), &only_new);
        assert_eq!(v.wrong_content.len(), 1, "body 10 is no version of the row");
    }
}
