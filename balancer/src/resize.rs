//! Live resize: the fleet file is read again every few seconds, and a new `workers.count` is
//! applied without a restart. Growing, new workers are started (when this balancer spawns
//! them) and join placement once their `/readyz` answers; shrinking, the surplus workers leave
//! placement first (their clients reconnect and are placed on the others), then drain and stop.
//! Other changed keys take effect at the next restart, and the log says which. A file that no
//! longer parses is reported, file, line and key, and the running fleet is kept.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use shared::{FleetConfig, Shutdown};
use tokio::sync::watch;

use crate::load_poll;
use crate::metrics::METRICS;
use crate::upstreams::Upstreams;

/// How often the fleet file is read again.
const EVERY: Duration = Duration::from_secs(2);

/// How often a starting worker is asked whether it is ready.
const JOIN_POLL: Duration = Duration::from_millis(100);

/// How long a new worker is waited for before it is routed anyway (health checks then decide).
const JOIN_WAIT: Duration = Duration::from_secs(30);

/// Watches the fleet file and resizes the fleet to its `workers.count`.
pub struct Resizer {
    /// The fleet file.
    pub path: PathBuf,
    /// The configuration the balancer started with.
    pub running: FleetConfig,
    /// Workers the supervisor runs (when it spawns them).
    pub spawned: watch::Sender<u32>,
    /// Workers in placement (what discovery lists).
    pub routed: watch::Sender<u32>,
    /// The workers as the proxy sees them.
    pub upstreams: Arc<Upstreams>,
}

#[async_trait]
impl BackgroundService for Resizer {
    async fn start(&self, shutdown: ShutdownWatch) {
        let mut shutdown = Shutdown::from_watch(shutdown);
        let mut last = std::fs::read(&self.path).ok();
        let mut applied = self.running.workers.count;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(EVERY) => {}
                _ = shutdown.recv() => return,
            }
            let now = std::fs::read(&self.path).ok();
            if now.is_none() || now == last {
                continue;
            }
            last = now;
            let cfg = match FleetConfig::load(&self.path) {
                Ok(cfg) => cfg,
                Err(e) => {
                    tracing::error!(
                        "fleet file changed but is refused, keeping the running fleet: {e}"
                    );
                    continue;
                }
            };
            let later = needs_restart(&self.running, &cfg);
            if !later.is_empty() {
                tracing::warn!(sections = ?later, "fleet file changed: these take effect at the next restart");
            }
            if cfg.workers.count == applied {
                continue;
            }
            if !self.running.indexed_workers() {
                tracing::warn!(
                    "workers.count changed, but this balancer's workers come from `upstreams` or `discover`: nothing to resize"
                );
                continue;
            }
            tokio::select! {
                _ = self.resize(applied, cfg.workers.count) => applied = cfg.workers.count,
                _ = shutdown.recv() => return,
            }
        }
    }
}

impl Resizer {
    async fn resize(&self, from: u32, to: u32) {
        tracing::info!(from, to, "resizing the fleet");
        let interval = Duration::from_millis(self.running.balancer.health_check_interval_ms);
        if to > from {
            let labels: Vec<String> = (from..to).map(FleetConfig::worker_id).collect();
            METRICS.init_series(
                labels.iter().map(String::as_str),
                self.running.spawns_workers(),
                false,
            );
            self.spawned.send_replace(to);
            // A new worker joins placement once it answers: pingora counts a new backend
            // healthy until checked, and new sessions must not meet a worker still starting.
            for i in from..to {
                let Ok(addr) = self.running.worker_addr(i).parse::<SocketAddr>() else {
                    continue;
                };
                let deadline = tokio::time::Instant::now() + JOIN_WAIT;
                while !ready(addr, interval).await {
                    if tokio::time::Instant::now() >= deadline {
                        tracing::warn!(worker = %FleetConfig::worker_id(i), "new worker not ready yet; placing on it once its health checks pass");
                        break;
                    }
                    tokio::time::sleep(JOIN_POLL).await;
                }
            }
            self.routed.send_replace(to);
            self.upstreams.lb.update().await.ok();
        } else {
            // Out of placement first (their sessions are refused and reconnect elsewhere),
            // then drained and stopped.
            self.routed.send_replace(to);
            self.upstreams.lb.update().await.ok();
            self.spawned.send_replace(to);
        }
        tracing::info!(workers = to, "fleet resized");
    }
}

/// The sections of `new` that differ from `running`, `workers.count` aside.
fn needs_restart(running: &FleetConfig, new: &FleetConfig) -> Vec<&'static str> {
    let mut workers = new.workers.clone();
    workers.count = running.workers.count;
    [
        ("listen", running.listen == new.listen),
        (
            "metrics_listen",
            running.metrics_listen == new.metrics_listen,
        ),
        ("redis", running.redis == new.redis),
        ("workers", running.workers == workers),
        ("socketio", running.socketio == new.socketio),
        ("balancer", running.balancer == new.balancer),
    ]
    .into_iter()
    .filter(|(_, same)| !same)
    .map(|(name, _)| name)
    .collect()
}

/// Whether the worker at `addr` answers `/readyz` with 200 within `limit`.
async fn ready(addr: SocketAddr, limit: Duration) -> bool {
    load_poll::get(addr, "/readyz", limit)
        .await
        .is_some_and(|answer| answer.split_whitespace().nth(1) == Some("200"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_other_changes_need_a_restart() {
        let running = FleetConfig::default();
        let mut new = running.clone();
        new.workers.count += 3;
        assert!(needs_restart(&running, &new).is_empty());
        new.socketio.ping_interval_ms += 1;
        new.balancer.load_factor = 2.0;
        assert_eq!(needs_restart(&running, &new), ["socketio", "balancer"]);
    }
}
