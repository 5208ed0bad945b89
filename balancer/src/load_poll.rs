//! Worker loads for bounded placement: each worker's `fleet_worker_connections`, read from its
//! `/metrics` every health interval, so replicas of the balancer see the same loads.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use shared::Shutdown;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::metrics::METRICS;
use crate::upstreams::Upstreams;

/// Polls loads and keeps `fleet_balancer_worker_up` current.
pub struct LoadPoller {
    /// The workers.
    pub upstreams: Arc<Upstreams>,
    /// Poll interval.
    pub every: Duration,
}

#[async_trait]
impl BackgroundService for LoadPoller {
    async fn start(&self, shutdown: ShutdownWatch) {
        let mut shutdown = Shutdown::from_watch(shutdown);
        let mut shown = HashSet::new();
        loop {
            let mut now = HashSet::new();
            for (addr, healthy) in self.upstreams.workers() {
                let label = self.upstreams.label(&addr);
                now.insert(label.clone());
                METRICS
                    .worker_up
                    .with_label_values(&[label.as_str()])
                    .set(i64::from(healthy));
                if let Some(n) = connections(addr, self.every).await {
                    self.upstreams.load(&addr).set_polled(n);
                }
            }
            // A worker gone from the fleet (resized away) is not "down": drop its series.
            for gone in shown.difference(&now) {
                let _ = METRICS.worker_up.remove_label_values(&[gone.as_str()]);
            }
            shown = now;
            tokio::select! {
                _ = tokio::time::sleep(self.every) => {}
                _ = shutdown.recv() => return,
            }
        }
    }
}

/// `fleet_worker_connections` from a worker's `/metrics`, or None if it does not answer.
async fn connections(addr: SocketAddr, limit: Duration) -> Option<i64> {
    parse_connections(&get(addr, "/metrics", limit).await?)
}

/// A worker's whole answer (head and body, at most 1 MiB) to `GET path`, or None when it does
/// not answer within `limit`.
pub async fn get(addr: SocketAddr, path: &str, limit: Duration) -> Option<String> {
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let req = format!("GET {path} HTTP/1.0\r\nHost: fleet-worker\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::with_capacity(16 * 1024);
        s.take(1 << 20).read_to_end(&mut buf).await.ok()?;
        Some(String::from_utf8_lossy(&buf).into_owned())
    };
    tokio::time::timeout(limit, fetch).await.ok().flatten()
}

fn parse_connections(text: &str) -> Option<i64> {
    let line = text
        .lines()
        .find(|l| l.starts_with("fleet_worker_connections"))?;
    line.rsplit(' ')
        .next()?
        .trim()
        .parse::<f64>()
        .ok()
        .map(|v| v as i64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_gauge() {
        let text = "HTTP/1.0 200 OK\r\n\r\n# TYPE fleet_worker_connections gauge\nfleet_worker_connections{worker=\"w0\"} 42\n";
        assert_eq!(super::parse_connections(text), Some(42));
        assert_eq!(super::parse_connections("junk"), None);
    }
}
