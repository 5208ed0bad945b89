//! What one client address may do (`balancer.limits`): concurrent connections, and new
//! sessions per second (a token bucket, burst = 2 x rate).
//!
//! The address is the one placement uses (`balancer.trusted_proxies` honoured). The table is
//! bounded: an address with no open connection and a full bucket carries no state and is
//! dropped when the table grows, and past [`MAX_ADDRESSES`] even partly used buckets are
//! forgotten (a flood from that many addresses is not one address's abuse). Only addresses
//! holding connections always stay, and those are bounded by the descriptors the process has.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shared::config::LimitsConfig;

/// Addresses tracked before idle ones are dropped.
pub const MAX_ADDRESSES: usize = 65_536;

/// Why a request was refused, and when the client may try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// The `Retry-After` to send, in whole seconds (at least 1).
    pub retry_after_secs: u64,
}

/// The per-address table.
pub struct AddressLimits {
    connections: u32,
    rate: f64,
    burst: f64,
    table: Mutex<HashMap<IpAddr, Entry>>,
}

#[derive(Debug)]
struct Entry {
    open: u32,
    tokens: f64,
    refilled: Instant,
}

impl Entry {
    fn new(burst: f64, now: Instant) -> Self {
        Entry {
            open: 0,
            tokens: burst,
            refilled: now,
        }
    }

    fn refill(&mut self, rate: f64, burst: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.refilled = now;
    }

    /// Holds nothing worth keeping: no connection, and a bucket that is full by `now`.
    fn idle(&self, rate: f64, burst: f64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.open == 0 && (rate == 0.0 || self.tokens + elapsed * rate >= burst)
    }
}

impl AddressLimits {
    /// The table for `cfg`, or `None` when every limit is off.
    pub fn new(cfg: &LimitsConfig) -> Option<Arc<Self>> {
        if cfg.connections_per_ip == 0 && cfg.handshakes_per_ip_per_sec == 0 {
            return None;
        }
        let rate = f64::from(cfg.handshakes_per_ip_per_sec);
        Some(Arc::new(AddressLimits {
            connections: cfg.connections_per_ip,
            rate,
            burst: 2.0 * rate,
            table: Mutex::new(HashMap::new()),
        }))
    }

    /// A new connection from `ip`: its slot, released when dropped, or a refusal.
    pub fn connect(self: &Arc<Self>, ip: IpAddr) -> Result<ConnSlot, Limited> {
        if self.connections == 0 {
            return Ok(ConnSlot(None));
        }
        let now = Instant::now();
        let mut table = self.lock();
        let entry = self.entry(&mut table, ip, now);
        if entry.open >= self.connections {
            return Err(Limited {
                retry_after_secs: 1,
            });
        }
        entry.open += 1;
        Ok(ConnSlot(Some((Arc::clone(self), ip))))
    }

    /// A new session from `ip`: taken from its bucket, or refused until a token is due.
    pub fn handshake(&self, ip: IpAddr) -> Result<(), Limited> {
        if self.rate == 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut table = self.lock();
        let entry = self.entry(&mut table, ip, now);
        entry.refill(self.rate, self.burst, now);
        if entry.tokens >= 1.0 {
            entry.tokens -= 1.0;
            return Ok(());
        }
        let wait = Duration::from_secs_f64((1.0 - entry.tokens) / self.rate);
        Err(Limited {
            retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
        })
    }

    /// Addresses tracked now.
    pub fn tracked(&self) -> usize {
        self.lock().len()
    }

    fn release(&self, ip: IpAddr) {
        let now = Instant::now();
        let mut table = self.lock();
        if let Some(entry) = table.get_mut(&ip) {
            entry.open = entry.open.saturating_sub(1);
            if entry.idle(self.rate, self.burst, now) {
                table.remove(&ip);
            }
        }
    }

    /// `ip`'s entry, made (room first) if it has none.
    fn entry<'t>(
        &self,
        table: &'t mut HashMap<IpAddr, Entry>,
        ip: IpAddr,
        now: Instant,
    ) -> &'t mut Entry {
        self.make_room(table, now);
        table
            .entry(ip)
            .or_insert_with(|| Entry::new(self.burst, now))
    }

    /// Keeps the table under [`MAX_ADDRESSES`] before an insert: idle entries go first, then
    /// every one not holding a connection. Each sweep at least halves what it may drop, so
    /// its cost is shared by the inserts that filled the table.
    fn make_room(&self, table: &mut HashMap<IpAddr, Entry>, now: Instant) {
        if table.len() < MAX_ADDRESSES {
            return;
        }
        table.retain(|_, e| !e.idle(self.rate, self.burst, now));
        if table.len() >= MAX_ADDRESSES / 2 {
            table.retain(|_, e| e.open > 0);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Entry>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One connection counted against its address while it lives (also once handed to a worker,
/// until the worker reports it closed).
#[derive(Default)]
pub struct ConnSlot(Option<(Arc<AddressLimits>, IpAddr)>);

impl ConnSlot {
    /// Whether it holds a place in an address's count (limits are on).
    pub fn is_held(&self) -> bool {
        self.0.is_some()
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        if let Some((limits, ip)) = self.0.take() {
            limits.release(ip);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn limits(connections: u32, handshakes: u32) -> Arc<AddressLimits> {
        AddressLimits::new(&LimitsConfig {
            connections_per_ip: connections,
            handshakes_per_ip_per_sec: handshakes,
        })
        .unwrap()
    }

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))
    }

    #[test]
    fn off_when_both_are_zero() {
        assert!(AddressLimits::new(&LimitsConfig::default()).is_none());
    }

    #[test]
    fn connections_are_held_to_the_limit_per_address_and_freed_on_drop() {
        let l = limits(2, 0);
        let a = l.connect(ip(1)).unwrap();
        let _b = l.connect(ip(1)).unwrap();
        assert_eq!(
            l.connect(ip(1)).err(),
            Some(Limited {
                retry_after_secs: 1
            })
        );
        // Another address is not affected.
        let _c = l.connect(ip(2)).unwrap();
        drop(a);
        let _d = l.connect(ip(1)).unwrap();
    }

    #[test]
    fn handshakes_burst_to_twice_the_rate_then_wait_for_tokens() {
        let l = limits(0, 5);
        for _ in 0..10 {
            l.handshake(ip(1)).unwrap();
        }
        let refused = l.handshake(ip(1)).unwrap_err();
        assert_eq!(refused.retry_after_secs, 1);
        l.handshake(ip(2)).unwrap();
    }

    #[test]
    fn a_flood_from_a_million_addresses_keeps_the_table_bounded() {
        let l = limits(4, 1);
        let held: Vec<ConnSlot> = (0..1000).map(|n| l.connect(ip(n)).unwrap()).collect();
        for n in 1000..1_000_000 {
            let _ = l.handshake(ip(n));
            assert!(l.tracked() <= MAX_ADDRESSES);
        }
        // Addresses holding connections were never forgotten: their limit still holds.
        for n in 0..1000 {
            for _ in 1..4 {
                std::mem::forget(l.connect(ip(n)).unwrap());
            }
            assert!(l.connect(ip(n)).is_err());
        }
        drop(held);
    }

    #[test]
    fn an_address_with_nothing_left_is_dropped_on_release() {
        let l = limits(1, 0);
        let slot = l.connect(ip(7)).unwrap();
        assert_eq!(l.tracked(), 1);
        drop(slot);
        assert_eq!(l.tracked(), 0);
    }
}
