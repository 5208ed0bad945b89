//! Wall-clock time as one number: what fleet processes stamp into messages to measure how late
//! they arrive elsewhere (pub/sub probes, load-test deliveries).

use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch; 0 if the clock is set before 1970. Comparable between
/// processes on one host (or hosts whose clocks agree, e.g. by NTP), unlike `Instant`.
pub fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The unit is microseconds of wall-clock time, not milliseconds or nanoseconds.
    #[test]
    fn counts_wall_clock_microseconds() {
        let before = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let now = unix_micros();
        let after = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        assert!(before.as_micros() as u64 <= now && now <= after.as_micros() as u64);
        // Later than 2020-01-01 in µs: rules out a wrong unit or a zero clock.
        assert!(now > 1_577_836_800_000_000, "{now}");
    }
}
