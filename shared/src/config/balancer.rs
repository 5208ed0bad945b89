//! The `balancer:` section: placement of new sessions, health checks, stickiness, the proxy's
//! limits and its shutdown.

use serde::Deserialize;

use super::IpNetwork;

/// `balancer:` section.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BalancerConfig {
    /// Placement policy for new sessions. Default `consistent`.
    pub placement: Placement,
    /// With `consistent`, a worker above `load_factor` × the mean load takes no new session.
    /// Default 1.25; at least 1.0.
    pub load_factor: f64,
    /// Peers (IPs or CIDRs: `10.0.0.0/8`, `::1`, `192.168.1.7`) whose `X-Forwarded-For` is
    /// believed for the client address. Default none: the TCP peer is the client.
    pub trusted_proxies: Vec<IpNetwork>,
    /// How often each worker's `/readyz` is checked, in milliseconds. Default 1000.
    pub health_check_interval_ms: u64,
    /// Failed checks in a row that take a worker out of placement. Default 2.
    pub health_check_failures: usize,
    /// On SIGTERM, how long the balancer waits for workers to drain before exiting, in
    /// seconds. Default: `workers.drain_window_secs` + 5.
    pub grace_period_secs: Option<u64>,
    /// Secret mixed into sticky tags so they do not reveal worker addresses. Balancer
    /// replicas in front of the same workers must share it. Default `fleet`.
    pub sticky_secret: String,
    /// Worker threads of the proxy. Default 2.
    pub threads: usize,
    /// A new connection whose request head stalls this long (no byte arrives) is dropped, in
    /// seconds. Default 10.
    pub header_timeout_secs: u64,
    /// Open the public port with SO_REUSEPORT, so several balancer processes on one host share
    /// it (the kernel spreads connections; stateless stickiness makes any of them right for
    /// any request). Default false.
    pub reuse_port: bool,
    /// Request heads larger than this are answered 431, in bytes. Default 16384; 1024 to
    /// 1048576.
    pub max_header_bytes: usize,
    /// Path prefixes outside the Engine.IO path forwarded to a ready worker, for an app that
    /// serves its own pages (`["/"]`: everything). Default none: such paths are answered 404.
    /// A worker's own `/metrics`, `/healthz`, `/readyz` and `/api/` are never forwarded.
    pub forward_paths: Vec<String>,
}

impl Default for BalancerConfig {
    fn default() -> Self {
        BalancerConfig {
            placement: Placement::Consistent,
            load_factor: 1.25,
            trusted_proxies: Vec::new(),
            health_check_interval_ms: 1000,
            health_check_failures: 2,
            grace_period_secs: None,
            sticky_secret: "fleet".into(),
            threads: 2,
            header_timeout_secs: 10,
            reuse_port: false,
            max_header_bytes: 16 * 1024,
            forward_paths: Vec::new(),
        }
    }
}

/// How new sessions are placed on workers (`balancer.placement`).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Placement {
    /// Consistent hashing (Ketama) of the client address with bounded load (default).
    #[default]
    Consistent,
    /// Consistent hashing of the client address, no load bound (nginx `ip_hash`).
    IpHash,
    /// The worker with the fewest sessions.
    LeastConnections,
    /// A random healthy worker.
    Random,
}
