//! One worker as every part of the balancer sees it: where it is, what it is called, its
//! sticky tag, whether it is up, and its load. Health and load change in place (atomics), so a
//! request never waits on the prober.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::sticky::Tag;

/// A worker of the fleet.
#[derive(Debug)]
pub struct Worker {
    addr: SocketAddr,
    label: Arc<str>,
    tag: Tag,
    up: AtomicBool,
    answers: AtomicBool,
    load: Load,
}

impl Worker {
    /// A worker at `addr`, named `label` in metrics and logs, not up until a probe says so.
    /// Its tag derives from its address and the fleet's sticky secret, so every balancer
    /// sharing the secret derives the same one.
    pub fn new(addr: SocketAddr, label: &str, secret: &str) -> Self {
        Worker {
            addr,
            label: label.into(),
            tag: Tag::derive(secret, &addr.to_string()),
            up: AtomicBool::new(false),
            answers: AtomicBool::new(false),
            load: Load::default(),
        }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its metric label: `w<i>` for workers by index, else its address.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Its sticky tag.
    pub fn tag(&self) -> Tag {
        self.tag
    }

    /// Whether it takes sessions: passing its probes.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Records a health verdict; true when it changed.
    pub fn set_up(&self, up: bool) -> bool {
        self.up.swap(up, Ordering::Relaxed) != up
    }

    /// Whether its last probe got an HTTP answer, ready or not: it still accepts connections,
    /// so it can take sessions when no worker is up (panic placement).
    pub fn answers(&self) -> bool {
        self.answers.load(Ordering::Relaxed)
    }

    /// Records whether the last probe got an answer.
    pub fn set_answers(&self, answers: bool) {
        self.answers.store(answers, Ordering::Relaxed);
    }

    /// Its load.
    pub fn load(&self) -> &Load {
        &self.load
    }
}

/// A worker's load: its session count at the last probe, plus the sessions placed on it that
/// the count may not include yet, so a burst of new sessions between two probes does not all
/// land on one worker.
///
/// A client is placed at its Engine.IO handshake but counted by the worker only once its
/// Socket.IO connect arrives, a few milliseconds (a slow client: longer) later. A probe that
/// lands in between would forget it, so placements made within [`IN_FLIGHT`] before a probe
/// started stay counted after it: a brief overcount rather than an undercount that sends the
/// next burst to the same worker.
///
/// A worker that never reports a count (one checked by `balancer.health_check: engineio`,
/// such as a stock Node `socket.io` server) never has a placement confirmed by a probe, so
/// every placement stays: its load is the balancer's own count of the sessions it placed
/// there, less those it saw end ([`Load::ended`]).
#[derive(Default, Debug)]
pub struct Load {
    probed: AtomicI64,
    /// When each placement not yet surely in `probed` was made, oldest first.
    pending: Mutex<VecDeque<Instant>>,
}

/// How long after its placement a session may still be missing from its worker's count.
pub const IN_FLIGHT: Duration = Duration::from_millis(250);

/// Placements remembered at most (a flood of handshakes must not grow memory).
const MAX_PENDING: usize = 100_000;

impl Load {
    /// The current estimate.
    pub fn get(&self) -> i64 {
        self.probed.load(Ordering::Relaxed) + self.pending().len() as i64
    }

    /// A fresh count from the worker itself, from a probe that started at `asked`.
    pub fn set_probed(&self, sessions: i64, asked: Instant) {
        let mut pending = self.pending();
        self.probed.store(sessions, Ordering::Relaxed);
        let counted = asked.checked_sub(IN_FLIGHT).unwrap_or(asked);
        while pending.front().is_some_and(|t| *t < counted) {
            pending.pop_front();
        }
    }

    /// One new session placed on the worker.
    pub fn placed(&self) {
        let mut pending = self.pending();
        if pending.len() < MAX_PENDING {
            pending.push_back(Instant::now());
        }
    }

    /// One session placed on the worker ended (or never began), as the balancer saw it. Only
    /// for a worker whose load is the balancer's own count: for one that reports its count,
    /// the next probe says so.
    pub fn ended(&self) {
        self.pending().pop_front();
    }

    fn pending(&self) -> MutexGuard<'_, VecDeque<Instant>> {
        // Only counters behind the lock: a panic elsewhere cannot leave them inconsistent.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_counts_placements_until_a_probe_surely_includes_them() {
        let load = Load::default();
        let start = Instant::now();
        load.set_probed(10, start);
        load.placed();
        load.placed();
        assert_eq!(load.get(), 12);
        // A probe right after may have missed them: they stay counted.
        load.set_probed(11, Instant::now());
        assert_eq!(load.get(), 13);
        // One that started long enough after them has them.
        load.set_probed(12, Instant::now() + IN_FLIGHT * 2);
        assert_eq!(load.get(), 12);
    }

    #[test]
    fn without_probed_counts_load_is_placements_less_ends() {
        let load = Load::default();
        for _ in 0..3 {
            load.placed();
        }
        load.ended();
        assert_eq!(load.get(), 2);
        for _ in 0..5 {
            load.ended();
        }
        assert_eq!(
            load.get(),
            0,
            "ends of sessions placed elsewhere never go below 0"
        );
    }

    #[test]
    fn starts_down_and_reports_flips() {
        let w = Worker::new("127.0.0.1:9001".parse().unwrap(), "w0", "s");
        assert!(!w.is_up());
        assert!(w.set_up(true));
        assert!(!w.set_up(true));
        assert!(w.set_up(false));
        assert_eq!(w.tag(), Tag::derive("s", "127.0.0.1:9001"));
    }
}
