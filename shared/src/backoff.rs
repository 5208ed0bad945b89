//! Capped exponential backoff: each failure doubles the delay up to a cap; success resets it.

use std::time::Duration;

/// Delays for retrying something that keeps failing: `min`, `2·min`, `4·min` … capped at `max`.
///
/// A small deterministic jitter (up to +25 %, from a counter, not a RNG) spreads retries of
/// many processes that failed at the same instant.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
    seed: u64,
}

impl Backoff {
    /// A backoff starting at `min` and never waiting longer than `max` (plus jitter).
    pub fn new(min: Duration, max: Duration) -> Self {
        let min = min.max(Duration::from_millis(1));
        Backoff {
            min,
            max: max.max(min),
            attempt: 0,
            seed: 0x9E37_79B9_7F4A_7C15,
        }
    }

    /// The delay before the next attempt; each call counts one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        let base = self.min.saturating_mul(factor).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        // xorshift: cheap, reproducible spread without a RNG dependency.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let jitter_permille = self.seed % 251; // 0..=250 ‰
        base + base.mul_f64(jitter_permille as f64 / 1000.0)
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
}
