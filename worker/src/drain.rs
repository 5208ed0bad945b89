//! Graceful drain: move every client off this worker, spread over the drain window, by closing
//! its transport (never a Socket.IO disconnect packet, which tells clients not to reconnect).
//!
//! A cut session is forgotten at the HTTP edge: its pending long-poll is answered 503, its
//! WebSocket's TCP stream is ended, and any later request for it gets 503 too, so the client
//! sees a transport error and reconnects with a fresh handshake — through the balancer, to a
//! worker that is still ready.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::conn::ConnRegistry;
use crate::health::Readiness;

/// Share of the window used to spread the cuts; the rest lets the last clients' final
/// responses flush before the deadline.
const SPREAD_SHARE: f64 = 0.9;

/// The drain's state at the HTTP edge; consulted by every Engine.IO request.
pub struct DrainGate {
    registry: Arc<ConnRegistry>,
    readiness: Readiness,
    cut: Mutex<HashSet<String>>,
    /// sid → (generation, cancel) of its in-flight long-poll GET.
    polls: Mutex<HashMap<String, (u64, CancellationToken)>>,
    poll_gen: AtomicU64,
    inflight: AtomicUsize,
}

/// Held while a long-poll GET is in flight; cancelled when its session is cut.
pub struct PollGuard<'a> {
    gate: &'a DrainGate,
    sid: String,
    generation: u64,
    /// Fires when the session is cut.
    pub cancel: CancellationToken,
}

impl Drop for PollGuard<'_> {
    fn drop(&mut self) {
        let mut polls = self.gate.polls.lock().unwrap();
        if polls
            .get(&self.sid)
            .is_some_and(|(g, _)| *g == self.generation)
        {
            polls.remove(&self.sid);
        }
    }
}

/// Counts one Engine.IO request in flight, so the drain knows when responses are flushed.
pub struct InflightGuard<'a>(&'a DrainGate);

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl DrainGate {
    /// A gate over the worker's connections, flipping `readiness` when the drain starts.
    pub fn new(registry: Arc<ConnRegistry>, readiness: Readiness) -> Self {
        DrainGate {
            registry,
            readiness,
            cut: Mutex::default(),
            polls: Mutex::default(),
            poll_gen: AtomicU64::new(0),
            inflight: AtomicUsize::new(0),
        }
    }

    /// True while draining: new handshakes are refused.
    pub fn is_draining(&self) -> bool {
        self.readiness.is_draining()
    }

    /// True when this session was cut and must not be served again.
    pub fn is_cut(&self, sid: &str) -> bool {
        self.cut.lock().unwrap().contains(sid)
    }

    /// Count a request in flight until the guard drops.
    pub fn enter(&self) -> InflightGuard<'_> {
        self.inflight.fetch_add(1, Ordering::SeqCst);
        InflightGuard(self)
    }

    /// Register the long-poll of `sid` so a cut can answer it at once.
    pub fn poll_started(&self, sid: &str) -> PollGuard<'_> {
        let generation = self.poll_gen.fetch_add(1, Ordering::Relaxed);
        let cancel = CancellationToken::new();
        self.polls
            .lock()
            .unwrap()
            .insert(sid.to_owned(), (generation, cancel.clone()));
        PollGuard {
            gate: self,
            sid: sid.to_owned(),
            generation,
            cancel,
        }
    }

    /// Close one session's transport: answer its pending poll, end its WebSocket, and refuse
    /// it from now on.
    pub fn cut(&self, sid: &str) {
        self.cut.lock().unwrap().insert(sid.to_owned());
        if let Some((_, cancel)) = self.polls.lock().unwrap().remove(sid) {
            cancel.cancel();
        }
        self.registry.kill_sid(sid);
    }

    /// Move every session off this worker within `window`, then return. `sids` lists the
    /// sessions now; it is called again at the end to catch sessions opened meanwhile.
    pub async fn drain(&self, window: Duration, sids: impl Fn() -> Vec<String>) -> DrainReport {
        let start = Instant::now();
        let deadline = start + window;
        self.readiness.set_draining();
        let first = sids();
        let total = first.len();
        tracing::info!(
            sessions = total,
            window_secs = window.as_secs_f64(),
            "draining"
        );
        let spread = window.mul_f64(SPREAD_SHARE);
        for (i, sid) in first.iter().enumerate() {
            // Cut i at spread·i/n: clients come back to the other workers at an even rate.
            tokio::time::sleep_until(start + spread.mul_f64(i as f64 / total as f64)).await;
            self.cut(sid);
        }
        let mut late = 0;
        for sid in sids() {
            if !self.is_cut(&sid) {
                self.cut(&sid);
                late += 1;
            }
        }
        // Wait for the WebSockets to close and the last responses to flush.
        let flushed = loop {
            if self.registry.bound_count() == 0 && self.inflight.load(Ordering::SeqCst) == 0 {
                break true;
            }
            if Instant::now() >= deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let report = DrainReport {
            sessions: total + late,
            flushed,
            took: start.elapsed(),
        };
        tracing::info!(?report, "drain finished");
        report
    }
}

/// What a drain did.
///
/// ```no_run
/// # async fn serve(settings: worker::WorkerSettings, l: tokio::net::TcpListener) -> Result<(), worker::StartError> {
/// let report = worker::run(l, settings, worker::RoomsApp, async {}).await?;
/// println!("{} sessions moved in {:?}", report.sessions, report.took);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct DrainReport {
    /// Sessions whose transport was closed.
    pub sessions: usize,
    /// False when the deadline came before every connection closed.
    pub flushed: bool,
    /// How long the drain took.
    pub took: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drivers::LinkState;

    fn gate() -> DrainGate {
        let (_tx, rx) = tokio::sync::watch::channel(LinkState::Up);
        DrainGate::new(Arc::new(ConnRegistry::default()), Readiness::new(rx))
    }

    #[tokio::test(start_paused = true)]
    async fn cuts_are_spread_over_the_window() {
        let gate = gate();
        let sids: Vec<String> = (0..10).map(|i| format!("s{i}")).collect();
        let polls: Vec<_> = sids.iter().map(|s| gate.poll_started(s)).collect();
        let start = Instant::now();
        let report = {
            let drain = gate.drain(Duration::from_secs(10), || sids.clone());
            tokio::pin!(drain);
            // After 4.6 s of a 9 s spread, sessions 0..=5 are cut and 6..=9 are not.
            tokio::select! {
                _ = &mut drain => unreachable!("drain ends after the last cut"),
                _ = tokio::time::sleep(Duration::from_millis(4600)) => {}
            }
            let cut: Vec<bool> = polls.iter().map(|p| p.cancel.is_cancelled()).collect();
            assert_eq!(
                cut,
                [
                    true, true, true, true, true, true, false, false, false, false
                ]
            );
            drain.await
        };
        assert_eq!(report.sessions, 10);
        assert!(report.flushed);
        assert!(start.elapsed() <= Duration::from_secs(10));
        assert!(gate.is_cut("s9") && gate.is_draining());
    }

    #[test]
    fn stale_poll_guard_does_not_remove_newer_poll() {
        let gate = gate();
        let old = gate.poll_started("a");
        let new = gate.poll_started("a");
        drop(old);
        gate.cut("a");
        assert!(new.cancel.is_cancelled());
    }
}
