//! The process's budget of rows in memory (`relay.max_rows_in_memory`), shared by all its
//! table relays and channels: memory grows with the rows held, never with the number of
//! tables. A relay asks for rows before each fetch and fetches at most what it was granted;
//! once its rows are settled (confirmed, failed, or forgotten with a broken channel) it gives
//! them back.
//!
//! Fair: a relay holds at most an equal share of the budget among the relays that hold rows
//! or are asking for some, so one busy table cannot starve the others. A relay alone takes
//! up to the whole budget; when others start asking, it takes nothing more until it is below
//! its share, and the rows it holds settle within one window's time. A relay with nothing
//! granted and nothing free waits for rows to be given back ([`RowGrant::freed`]).

use std::sync::{Arc, Mutex, MutexGuard};

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Notify;

/// The budget, shared by the process's relays.
#[derive(Clone)]
pub struct RowBudget(Arc<Shared>);

struct Shared {
    total: usize,
    usage: Mutex<Usage>,
    freed: Notify,
    /// `outbox_relay_rows_in_memory`: the rows granted, all relays together.
    gauge: Gauge,
}

#[derive(Default)]
struct Usage {
    /// Rows granted and not given back.
    used: usize,
    /// Relays holding rows or asking for some: the budget is shared among them.
    active: usize,
}

impl RowBudget {
    /// A budget of `total` rows (at least one), reporting the rows granted in `gauge`.
    pub fn new(total: usize, gauge: Gauge) -> RowBudget {
        RowBudget(Arc::new(Shared {
            total: total.max(1),
            usage: Mutex::new(Usage::default()),
            freed: Notify::new(),
            gauge,
        }))
    }

    /// One relay's account in the budget, holding nothing yet.
    pub fn grant(&self) -> RowGrant {
        RowGrant {
            budget: self.clone(),
            held: 0,
            active: false,
        }
    }

    /// Rows granted and not given back, by all relays.
    pub fn used(&self) -> usize {
        self.usage().used
    }

    fn usage(&self) -> MutexGuard<'_, Usage> {
        // Nothing panics while holding the lock; a poisoned one still holds consistent counts.
        self.0.usage.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One relay's rows in the budget. Dropping it gives them back.
pub struct RowGrant {
    budget: RowBudget,
    held: usize,
    active: bool,
}

impl RowGrant {
    /// Takes up to `want` more rows for a fetch: what is free, within this relay's fair share.
    /// Zero when nothing may be fetched now (wait for [`RowGrant::freed`]).
    pub fn take(&mut self, want: usize) -> usize {
        let mut usage = self.budget.usage();
        if !self.active {
            self.active = true;
            usage.active += 1;
        }
        let share = (self.budget.0.total / usage.active).max(1);
        let free = self.budget.0.total.saturating_sub(usage.used);
        let n = want.min(free).min(share.saturating_sub(self.held));
        usage.used += n;
        self.held += n;
        self.budget.0.gauge.set(usage.used as i64);
        n
    }

    /// The relay holds `rows` now (rows are settled, or a fetch brought fewer than taken): the
    /// rest goes back to the budget. It still counts in the shares (it may be waiting to take
    /// more) until [`RowGrant::rest`].
    pub fn hold(&mut self, rows: usize) {
        let mut usage = self.budget.usage();
        let returned = self.held.saturating_sub(rows);
        // Never more than was taken, but the count stays true if it ever were.
        usage.used = usage.used - returned + rows.saturating_sub(self.held);
        self.held = rows;
        self.budget.0.gauge.set(usage.used as i64);
        drop(usage);
        if returned > 0 {
            self.budget.0.freed.notify_waiters();
        }
    }

    /// The relay holds nothing and asks for nothing (idle, standby, down): it gives back all
    /// it holds and leaves the shares until it asks again.
    pub fn rest(&mut self) {
        self.hold(0);
        if self.active {
            self.active = false;
            self.budget.usage().active -= 1;
        }
    }

    /// Rows this relay holds.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Resolves once some relay gave rows back (or at once if that happened since the last
    /// [`RowGrant::take`] raced with it: callers wait with a timeout and ask again).
    pub async fn freed(&self) {
        self.budget.0.freed.notified().await
    }
}

impl Drop for RowGrant {
    fn drop(&mut self) {
        self.rest();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_relay_alone_takes_up_to_the_whole_budget_and_gives_back_what_settled() {
        let budget = RowBudget::new(100, Gauge::default());
        let mut a = budget.grant();
        assert_eq!(a.take(60), 60);
        assert_eq!(a.take(60), 40, "only what is free");
        assert_eq!(a.take(1), 0);
        a.hold(30);
        assert_eq!(budget.used(), 30);
        drop(a);
        assert_eq!(budget.used(), 0, "dropping the grant gives its rows back");
    }

    #[test]
    fn a_busy_relay_takes_nothing_more_once_others_ask_until_it_is_below_its_share() {
        let budget = RowBudget::new(100, Gauge::default());
        let mut busy = budget.grant();
        assert_eq!(busy.take(100), 100);
        let mut quiet = budget.grant();
        assert_eq!(quiet.take(10), 0, "nothing is free yet");
        assert_eq!(busy.take(10), 0, "above its share of 50");
        busy.hold(70);
        assert_eq!(busy.take(10), 0, "still above its share");
        assert_eq!(quiet.take(40), 30, "what is free");
        busy.hold(20);
        assert_eq!(quiet.take(40), 20, "up to its share");
        assert_eq!(quiet.take(40), 0, "at its share");
        assert_eq!(busy.take(40), 30, "up to its share");
        assert_eq!(budget.used(), 100);
    }

    #[test]
    fn a_relay_holding_nothing_leaves_the_shares() {
        let budget = RowBudget::new(90, Gauge::default());
        let mut grants: Vec<_> = (0..3).map(|_| budget.grant()).collect();
        for g in &mut grants {
            assert_eq!(g.take(0), 0, "asking for nothing still asks");
        }
        for g in &mut grants {
            assert_eq!(g.take(100), 30);
        }
        grants[1].rest();
        grants[2].rest();
        assert_eq!(grants[0].take(100), 60, "alone again: the whole budget");
    }

    #[test]
    fn every_relay_gets_at_least_one_row_of_a_budget_smaller_than_the_relays() {
        let budget = RowBudget::new(2, Gauge::default());
        let mut grants: Vec<_> = (0..4).map(|_| budget.grant()).collect();
        for g in &mut grants {
            g.take(0);
        }
        let taken: Vec<usize> = grants.iter_mut().map(|g| g.take(10)).collect();
        assert_eq!(taken, [1, 1, 0, 0]);
        grants[0].rest();
        assert_eq!(grants[2].take(10), 1);
    }
}
