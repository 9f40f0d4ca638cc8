//! Retry policy as pure functions of the attempt count: capped exponential backoff with
//! jitter. Owns no clock and no randomness source of its own, so tests need neither.

use std::time::Duration;

use crate::config::{OnExhausted, RetrySettings};

/// What to do with a row after a failed publish.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// Try again after this delay.
    RetryAfter(Duration),
    /// Attempts are used up (or the row can never be sent): park it.
    Park,
}

/// Backoff for one table.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub initial_delay: Duration,
    pub max_delay: Duration,
    pub multiplier: f64,
    pub jitter: f64,
    pub max_attempts: u32,
    pub on_exhausted: OnExhausted,
}

impl From<&RetrySettings> for RetryPolicy {
    fn from(s: &RetrySettings) -> Self {
        Self {
            initial_delay: s.initial_delay,
            max_delay: s.max_delay,
            multiplier: s.multiplier,
            jitter: s.jitter,
            max_attempts: s.max_attempts,
            on_exhausted: s.on_exhausted,
        }
    }
}

impl RetryPolicy {
    /// The reconnect backoff after a broker or database outage: 200 ms doubling up to
    /// `max_delay` (`relay.reconnect_max_delay`), up to half of each delay jittered away.
    pub fn outage(max_delay: Duration) -> RetryPolicy {
        RetryPolicy {
            initial_delay: Duration::from_millis(200).min(max_delay),
            max_delay,
            multiplier: 2.0,
            jitter: 0.5,
            max_attempts: u32::MAX,
            on_exhausted: OnExhausted::HoldKey,
        }
    }

    /// The un-jittered delay after `attempt` failures (1 = the first failure), capped at `max_delay`.
    pub fn base_delay(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(1000) as i32;
        let secs = self.initial_delay.as_secs_f64() * self.multiplier.powi(exponent);
        let capped = secs.min(self.max_delay.as_secs_f64());
        Duration::from_secs_f64(capped)
    }

    /// The delay after `attempt` failures, with `sample` in [0, 1) taking away up to
    /// `jitter` of it. Never more than `max_delay`, never less than `(1 - jitter) * base`.
    pub fn delay(&self, attempt: u32, sample: f64) -> Duration {
        let base = self.base_delay(attempt);
        base.mul_f64(1.0 - self.jitter * sample.clamp(0.0, 1.0))
    }

    /// The longest a row that fails every attempt waits before it is parked: the un-jittered
    /// delays after each failure but the last (jitter only shortens them). `None` when the
    /// policy never parks.
    pub fn longest_until_parked(&self) -> Option<Duration> {
        if self.max_attempts == u32::MAX {
            return None;
        }
        Some((1..self.max_attempts).map(|a| self.base_delay(a)).sum())
    }

    /// The verdict after the row's `attempt`-th failure.
    pub fn after_failure(&self, attempt: u32, sample: f64) -> Verdict {
        if attempt >= self.max_attempts {
            Verdict::Park
        } else {
            Verdict::RetryAfter(self.delay(attempt, sample))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            multiplier: 2.0,
            jitter: 0.5,
            max_attempts: 4,
            on_exhausted: OnExhausted::HoldKey,
        }
    }

    #[test]
    fn delays_grow_exponentially_then_stay_at_the_cap() {
        let p = policy();
        assert_eq!(p.base_delay(1), Duration::from_millis(100));
        assert_eq!(p.base_delay(2), Duration::from_millis(200));
        assert_eq!(p.base_delay(3), Duration::from_millis(400));
        assert_eq!(p.base_delay(7), Duration::from_secs(5));
        assert_eq!(p.base_delay(u32::MAX), Duration::from_secs(5));
    }

    #[test]
    fn jitter_only_shortens_within_its_fraction() {
        let p = policy();
        assert_eq!(p.delay(2, 0.0), Duration::from_millis(200));
        assert_eq!(p.delay(2, 0.5), Duration::from_millis(150));
        assert!(p.delay(2, 0.999_999) >= Duration::from_millis(100));
        assert!(p.delay(50, 0.0) <= p.max_delay);
    }

    #[test]
    fn the_row_is_parked_when_attempts_run_out() {
        let p = policy();
        assert!(matches!(p.after_failure(3, 0.0), Verdict::RetryAfter(_)));
        assert_eq!(p.after_failure(4, 0.0), Verdict::Park);
    }

    #[test]
    fn the_default_policy_parks_a_row_within_eight_and_a_half_minutes_of_its_first_failure() {
        let policy = RetryPolicy::from(&RetrySettings::default());
        // 1 + 2 + 4 + ... + 256 seconds: nine delays between ten attempts.
        assert_eq!(
            policy.longest_until_parked(),
            Some(Duration::from_secs(511))
        );
        assert_eq!(
            RetryPolicy::outage(Duration::from_secs(30)).longest_until_parked(),
            None
        );
    }
}
