//! Live resize: the fleet file is read again every few seconds, and a new `workers.count` is
//! applied without a restart. Growing, new workers are started (when this balancer spawns
//! them) and enter the view, where they join placement once a probe finds them ready;
//! shrinking, the surplus workers leave the view first (their clients reconnect and are placed
//! on the others), then drain and stop.
//! Other changed keys take effect at the next restart, and the log says which. A file that no
//! longer parses is reported, file, line and key, and the running fleet is kept.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use shared::{FleetConfig, Shutdown};
use tokio::sync::watch;

use crate::metrics::METRICS;

/// How often the fleet file is read again.
const EVERY: Duration = Duration::from_secs(2);

/// Watches the fleet file and resizes the fleet to its `workers.count`.
pub struct Resizer {
    /// The fleet file.
    pub path: PathBuf,
    /// The configuration the balancer started with.
    pub running: FleetConfig,
    /// Workers the supervisor runs (when it spawns them).
    pub spawned: watch::Sender<u32>,
    /// Workers in the view (what discovery lists).
    pub routed: watch::Sender<u32>,
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
            self.resize(applied, cfg.workers.count);
            applied = cfg.workers.count;
        }
    }
}

impl Resizer {
    fn resize(&self, from: u32, to: u32) {
        tracing::info!(from, to, "resizing the fleet");
        if to > from {
            let labels: Vec<String> = (from..to).map(FleetConfig::worker_id).collect();
            METRICS.init_series(
                labels.iter().map(String::as_str),
                self.running.spawns_workers(),
                false,
            );
            // Started, and in the view at once: a new worker is placed on only once a probe
            // finds it ready.
            self.spawned.send_replace(to);
            self.routed.send_replace(to);
        } else {
            // Out of the view first (their sessions are refused and reconnect elsewhere), then
            // drained and stopped.
            self.routed.send_replace(to);
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
