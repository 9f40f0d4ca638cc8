//! Per-key sequencing of fetched rows: at most one row per ordering key in flight, keys served
//! in the order they became ready, and the ids held in memory (so fetches can exclude them).
//! A pure data structure: no I/O, no clock.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::message::OutboxRow;

/// Rows fetched but not yet settled, grouped by ordering key.
#[derive(Default)]
pub struct KeyQueues {
    keys: HashMap<String, KeyState>,
    /// Keys whose head row may be sent now (none of the key's rows is in flight).
    ready: VecDeque<String>,
    /// Ids queued or in flight.
    held: HashSet<i64>,
    queued: usize,
}

#[derive(Default)]
struct KeyState {
    queued: VecDeque<OutboxRow>,
    in_flight: bool,
}

impl KeyQueues {
    /// Adds fetched rows (in id order). Rows already held are ignored. A row joins the back of
    /// its key's queue, behind any row of the key that is queued or in flight.
    pub fn add(&mut self, rows: Vec<OutboxRow>) {
        for row in rows {
            if !self.held.insert(row.id) {
                continue;
            }
            let key = row.ordering_key.clone();
            let state = self.keys.entry(key.clone()).or_default();
            let was_idle = !state.in_flight && state.queued.is_empty();
            state.queued.push_back(row);
            self.queued += 1;
            if was_idle {
                self.ready.push_back(key);
            }
        }
    }

    /// The next row to send: the head of the first ready key. Its key is in flight until
    /// [`KeyQueues::release`] or [`KeyQueues::stop_key`].
    pub fn next_to_send(&mut self) -> Option<OutboxRow> {
        while let Some(key) = self.ready.pop_front() {
            let Some(state) = self.keys.get_mut(&key) else {
                continue;
            };
            if state.in_flight {
                continue;
            }
            if let Some(row) = state.queued.pop_front() {
                state.in_flight = true;
                self.queued -= 1;
                return Some(row);
            }
        }
        None
    }

    /// The row is settled (confirmed, or parked while its key goes on): the key's next row,
    /// if any, becomes ready.
    pub fn release(&mut self, row: &OutboxRow) {
        self.held.remove(&row.id);
        let Some(state) = self.keys.get_mut(&row.ordering_key) else {
            return;
        };
        state.in_flight = false;
        if state.queued.is_empty() {
            self.keys.remove(&row.ordering_key);
        } else {
            self.ready.push_back(row.ordering_key.clone());
        }
    }

    /// The row failed: its key goes no further. The key's queued rows are dropped from memory
    /// (they stay due in the table, behind the failed row). Returns how many were dropped.
    pub fn stop_key(&mut self, row: &OutboxRow) -> usize {
        self.held.remove(&row.id);
        let Some(state) = self.keys.remove(&row.ordering_key) else {
            return 0;
        };
        for dropped in &state.queued {
            self.held.remove(&dropped.id);
        }
        self.queued -= state.queued.len();
        state.queued.len()
    }

    /// Forgets everything (after the connection broke: nothing in memory is trusted).
    pub fn clear(&mut self) {
        *self = KeyQueues::default();
    }

    /// Ids queued or in flight.
    pub fn held_ids(&self) -> impl Iterator<Item = i64> + '_ {
        self.held.iter().copied()
    }

    /// Rows queued or in flight.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Rows fetched and not yet handed out by [`KeyQueues::next_to_send`].
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// True when some key's head row could be sent now.
    pub fn has_ready(&self) -> bool {
        self.ready.iter().any(|k| {
            self.keys
                .get(k)
                .is_some_and(|s| !s.in_flight && !s.queued.is_empty())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64, key: &str) -> OutboxRow {
        OutboxRow {
            id,
            dedup_key: format!("d{id}"),
            ordering_key: key.into(),
            routing_key: "r".into(),
            event_type: "t".into(),
            payload: b"{}".to_vec(),
            headers: serde_json::json!({}),
            exchange: None,
            created_at: chrono::DateTime::from_timestamp(0, 0).unwrap(),
            attempts: 0,
            table_oid: 0,
            version: 1,
            defect: None,
        }
    }

    fn drain_ready(q: &mut KeyQueues) -> Vec<i64> {
        std::iter::from_fn(|| q.next_to_send())
            .map(|r| r.id)
            .collect()
    }

    #[test]
    fn one_row_per_key_is_out_at_a_time_and_the_next_follows_its_confirm() {
        let mut q = KeyQueues::default();
        q.add(vec![row(1, "a"), row(2, "b"), row(3, "a"), row(4, "a")]);
        assert_eq!(drain_ready(&mut q), vec![1, 2]);
        assert_eq!(q.queued(), 2);
        q.release(&row(1, "a"));
        assert_eq!(drain_ready(&mut q), vec![3]);
        q.release(&row(3, "a"));
        q.release(&row(2, "b"));
        assert_eq!(drain_ready(&mut q), vec![4]);
        q.release(&row(4, "a"));
        assert_eq!(q.held(), 0);
    }

    #[test]
    fn rows_fetched_later_wait_behind_the_keys_row_in_flight() {
        let mut q = KeyQueues::default();
        q.add(vec![row(1, "a")]);
        assert_eq!(drain_ready(&mut q), vec![1]);
        q.add(vec![row(1, "a"), row(5, "a"), row(6, "c")]);
        assert_eq!(q.held(), 3, "an id already held is not added twice");
        assert_eq!(drain_ready(&mut q), vec![6]);
        q.release(&row(1, "a"));
        assert_eq!(drain_ready(&mut q), vec![5]);
    }

    #[test]
    fn a_failed_row_stops_its_key_and_drops_what_queued_behind_it() {
        let mut q = KeyQueues::default();
        q.add(vec![row(1, "a"), row(2, "a"), row(3, "b"), row(4, "a")]);
        assert_eq!(drain_ready(&mut q), vec![1, 3]);
        assert_eq!(q.stop_key(&row(1, "a")), 2);
        assert_eq!(q.queued(), 0);
        assert_eq!(q.held_ids().collect::<Vec<_>>(), vec![3]);
        assert!(!q.has_ready());
        q.add(vec![row(7, "a")]);
        assert_eq!(
            drain_ready(&mut q),
            vec![7],
            "a later fetch may bring the key back"
        );
    }
}
