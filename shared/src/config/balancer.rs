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
    /// HTTPS/WSS on `listen`.
    pub tls: TlsConfig,
    /// Per-client-address limits.
    pub limits: LimitsConfig,
    /// How a worker is checked: `readyz` (default, our workers) or `engineio` (an Engine.IO
    /// handshake on `socketio.path`: any Socket.IO server).
    pub health_check: HealthCheck,
}

/// `balancer.tls`: with both files set, `listen` serves HTTPS/WSS only (TLS 1.2 and 1.3).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first. Re-read when it changes: new connections get the new
    /// certificate, open ones continue.
    pub cert_file: String,
    /// PEM private key of the leaf certificate.
    pub key_file: String,
}

impl TlsConfig {
    /// Whether TLS is on.
    pub fn enabled(&self) -> bool {
        !self.cert_file.is_empty() && !self.key_file.is_empty()
    }
}

/// `balancer.limits`: what one client address may do. 0 turns a limit off.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Concurrent connections (relayed, proxied or handed off) per client address.
    pub connections_per_ip: u32,
    /// New sessions (handshakes) per second per address: a token bucket, burst = 2 x rate.
    pub handshakes_per_ip_per_sec: u32,
}

/// `balancer.health_check`: what a worker's probe asks.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum HealthCheck {
    /// `GET /readyz` (fleet workers: readiness and load).
    #[default]
    Readyz,
    /// An Engine.IO polling handshake on `socketio.path`: any Socket.IO server.
    Engineio,
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
            tls: TlsConfig::default(),
            limits: LimitsConfig::default(),
            health_check: HealthCheck::Readyz,
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
