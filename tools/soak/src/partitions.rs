//! Delivery on every partition resuming after a fault: for each partition, the first delivery
//! of a row committed after the fault, and the longest wait over the partitions that had such
//! rows. Only rows committed after the fault count: a message the relay had sent before it
//! (still on its way to the consumer) says nothing about who publishes the partition now.
//! Pure bookkeeping over the run's rows, without servers.

use std::time::{Duration, Instant};

/// The rows of each partition by when they were committed, and when each first arrived.
pub struct Timeline {
    partitions: Vec<Rows>,
}

/// One partition's rows, ordered by `began`.
#[derive(Default)]
struct Rows {
    /// When each row's transaction began (it committed after that).
    began: Vec<Instant>,
    /// `earliest[i]`: the first arrival of any of rows `i..` (`None`: none of them arrived).
    earliest: Vec<Option<Instant>>,
}

/// How delivery resumed after one fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resumption {
    /// Partitions that had rows committed after the fault.
    pub partitions: usize,
    /// The longest wait until one of a partition's rows committed after the fault arrived,
    /// over the partitions where one did arrive.
    pub longest: Duration,
    /// The partition that waited longest.
    pub slowest: u32,
    /// Partitions none of whose rows committed after the fault arrived (lost rows).
    pub never: usize,
    /// Each such partition's wait (`None`: never).
    pub waits: Vec<(u32, Option<Duration>)>,
}

impl Resumption {
    /// The partitions that waited longer than `bound` (or for ever), slowest first.
    pub fn later_than(&self, bound: Duration) -> Vec<(u32, Option<Duration>)> {
        let mut late: Vec<_> = self
            .waits
            .iter()
            .filter(|(_, w)| w.is_none_or(|w| w > bound))
            .copied()
            .collect();
        late.sort_by_key(|(_, w)| std::cmp::Reverse(w.unwrap_or(Duration::MAX)));
        late
    }
}

impl Timeline {
    /// From `(partition, began, first arrival)` per committed row.
    pub fn new(
        partitions: u32,
        rows: impl IntoIterator<Item = (u32, Instant, Option<Instant>)>,
    ) -> Timeline {
        let mut raw: Vec<Vec<(Instant, Option<Instant>)>> =
            (0..partitions).map(|_| Vec::new()).collect();
        for (p, began, arrived) in rows {
            if let Some(list) = raw.get_mut(p as usize) {
                list.push((began, arrived));
            }
        }
        let partitions = raw
            .into_iter()
            .map(|mut list| {
                list.sort_by_key(|(began, _)| *began);
                let mut earliest = vec![None; list.len()];
                let mut best: Option<Instant> = None;
                for (i, (_, arrived)) in list.iter().enumerate().rev() {
                    best = match (best, *arrived) {
                        (Some(b), Some(a)) => Some(b.min(a)),
                        (b, a) => b.or(a),
                    };
                    earliest[i] = best;
                }
                Rows {
                    began: list.into_iter().map(|(b, _)| b).collect(),
                    earliest,
                }
            })
            .collect();
        Timeline { partitions }
    }

    /// How delivery resumed on every partition after a fault at `from`; `None` when no row was
    /// committed after it.
    pub fn resumption(&self, from: Instant) -> Option<Resumption> {
        let mut r = Resumption {
            partitions: 0,
            longest: Duration::ZERO,
            slowest: 0,
            never: 0,
            waits: Vec::new(),
        };
        for (p, rows) in self.partitions.iter().enumerate() {
            let i = rows.began.partition_point(|b| *b < from);
            if i == rows.began.len() {
                continue;
            }
            r.partitions += 1;
            let waited = rows.earliest[i].map(|at| at.saturating_duration_since(from));
            match waited {
                Some(waited) if waited >= r.longest => {
                    r.longest = waited;
                    r.slowest = p as u32;
                }
                Some(_) => {}
                None => r.never += 1,
            }
            r.waits.push((p as u32, waited));
        }
        (r.partitions > 0).then_some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(t0: Instant, n: u64) -> Instant {
        t0 + Duration::from_millis(n)
    }

    #[test]
    fn the_slowest_partition_is_the_one_whose_rows_after_the_fault_arrived_last() {
        let t0 = Instant::now();
        let rows = vec![
            // Partition 0: a row from before the fault arrives just after it (it was on its
            // way), the rows after it only at 900 ms.
            (0, ms(t0, 0), Some(ms(t0, 120))),
            (0, ms(t0, 150), Some(ms(t0, 900))),
            (0, ms(t0, 300), Some(ms(t0, 950))),
            // Partition 1: flows on.
            (1, ms(t0, 160), Some(ms(t0, 170))),
            // Partition 2: nothing after the fault.
            (2, ms(t0, 10), Some(ms(t0, 20))),
        ];
        let t = Timeline::new(4, rows);
        let r = t.resumption(ms(t0, 100)).unwrap();
        assert_eq!(r.partitions, 2);
        assert_eq!(r.slowest, 0);
        assert_eq!(r.longest, Duration::from_millis(800));
        assert_eq!(r.never, 0);
        assert_eq!(
            r.later_than(Duration::from_millis(500)),
            vec![(0, Some(Duration::from_millis(800)))]
        );
        assert_eq!(t.resumption(ms(t0, 400)), None);
    }

    #[test]
    fn a_partition_whose_rows_after_the_fault_never_arrived_is_counted_apart() {
        let t0 = Instant::now();
        let t = Timeline::new(
            2,
            vec![(0, ms(t0, 50), None), (1, ms(t0, 50), Some(ms(t0, 60)))],
        );
        let r = t.resumption(t0).unwrap();
        assert_eq!((r.partitions, r.never), (2, 1));
        assert_eq!(r.longest, Duration::from_millis(60));
        assert_eq!(r.later_than(Duration::from_secs(1)), vec![(0, None)]);
    }
}
