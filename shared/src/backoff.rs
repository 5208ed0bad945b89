//! Capped exponential backoff: each failure doubles the delay up to a cap; success resets it.

use std::time::Duration;

/// Delays for retrying something that keeps failing: `min`, `2·min`, `4·min` … capped at `max`.
///
/// Each delay gets a random jitter of up to +25 %, so processes (or clients) that failed at the
/// same instant do not retry in step. Each `Backoff` forks its generator from fastrand's
/// per-thread one, which is seeded from the monotonic clock (in nanoseconds) when the thread
/// first uses it: two processes started at once still draw different jitter.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
    rng: fastrand::Rng,
}

impl Backoff {
    /// A backoff starting at `min` and never waiting longer than `max` (plus jitter).
    pub fn new(min: Duration, max: Duration) -> Self {
        let min = min.max(Duration::from_millis(1));
        Backoff {
            min,
            max: max.max(min),
            attempt: 0,
            rng: fastrand::Rng::new(),
        }
    }

    /// The delay before the next attempt; each call counts one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        let base = self.min.saturating_mul(factor).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let jitter_permille = self.rng.u32(0..=250);
        base + base.mul_f64(f64::from(jitter_permille) / 1000.0)
    }

    /// Forget past failures: the next delay is `min` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// How many failures in a row have been counted since the last reset.
    pub fn failures(&self) -> u32 {
        self.attempt
    }
}

/// A copy at the same point of the schedule, with a generator of its own: a clone handed to
/// another task does not retry in step with the original.
impl Clone for Backoff {
    fn clone(&self) -> Self {
        Backoff {
            rng: fastrand::Rng::new(),
            ..*self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_then_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let delays: Vec<_> = (0..8).map(|_| b.next_delay()).collect();
        for (i, d) in delays.iter().enumerate() {
            let base = Duration::from_millis((100u64 << i).min(1000));
            assert!(
                *d >= base && *d <= base.mul_f64(1.25),
                "attempt {i}: {d:?} vs {base:?}"
            );
        }
        assert_eq!(b.failures(), 8);
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(125));
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(64));
        for _ in 0..10_000 {
            assert!(b.next_delay() <= Duration::from_secs(80));
        }
    }

    /// Two backoffs made at the same instant (two processes or tasks started together) draw
    /// different jitter: a fixed seed would make them retry in step.
    #[test]
    fn backoffs_made_together_do_not_retry_in_step() {
        let delays = |mut b: Backoff| (0..8).map(|_| b.next_delay()).collect::<Vec<_>>();
        let (min, max) = (Duration::from_secs(1), Duration::from_secs(1));
        let a = Backoff::new(min, max);
        let b = Backoff::new(min, max);
        let c = a.clone();
        let a = delays(a);
        // 8 draws of 251 values each: equal by chance with probability 251^-8.
        assert_ne!(a, delays(b));
        assert_ne!(a, delays(c), "a clone draws its own jitter");
    }
}
