//! Worker health: each worker's `/readyz` checked on an interval; a few failures in a row take
//! it out of placement, and its sessions are refused until it passes again.

use std::time::Duration;

use async_trait::async_trait;
use pingora_http::RequestHeader;
use pingora_load_balancing::Backend;
use pingora_load_balancing::health_check::{HealthObserve, HttpHealthCheck};
use shared::FleetConfig;

/// The `/readyz` check for a fleet.
pub fn readyz_check(cfg: &FleetConfig) -> Box<HttpHealthCheck> {
    let mut hc = HttpHealthCheck::new("fleet-worker", false);
    let mut req = RequestHeader::build("GET", b"/readyz", None).expect("static request is valid");
    req.append_header("Host", "fleet-worker")
        .expect("static header is valid");
    hc.req = req;
    hc.consecutive_failure = cfg.balancer.health_check_failures;
    hc.consecutive_success = 1;
    // A check must finish well within one interval, or a hung worker would look alive.
    let limit = Duration::from_millis(cfg.balancer.health_check_interval_ms * 8 / 10);
    hc.peer_template.options.connection_timeout = Some(limit);
    hc.peer_template.options.read_timeout = Some(limit);
    hc.peer_template.options.total_connection_timeout = Some(limit);
    hc.health_changed_callback = Some(Box::new(LogFlips));
    Box::new(hc)
}

/// Logs each health flip once (the gauge is kept by the load poller).
struct LogFlips;

#[async_trait]
impl HealthObserve for LogFlips {
    async fn observe(&self, target: &Backend, healthy: bool) {
        if healthy {
            tracing::info!(worker = %target.addr, "worker healthy: taking new sessions");
        } else {
            tracing::warn!(worker = %target.addr, "worker unhealthy: out of placement, its sessions are refused");
        }
    }
}
