//! The `workers:` section: how many worker processes, where they listen, whether the balancer
//! runs them, and how they drain.

use std::time::Duration;

use serde::Deserialize;

/// The most workers a fleet may have (`workers.count`).
pub const MAX_WORKERS: u32 = 1024;

/// `workers:` section.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WorkersConfig {
    /// How many worker processes the balancer runs. Default 4; 1 to 1024 ([`MAX_WORKERS`]).
    pub count: u32,
    /// Address the workers listen on and are reached at. Default `127.0.0.1`.
    pub host: String,
    /// Worker `i` listens on `base_port + i`. Default 9001.
    pub base_port: u16,
    /// Most concurrent connections one worker accepts; more wait in the kernel backlog.
    /// Default 18000 (these machines cap open files at 20 000 per process).
    pub max_connections: u32,
    /// On SIGTERM, clients are moved off the worker spread evenly over this many seconds,
    /// then it exits. Default 10.
    pub drain_window_secs: u64,
    /// Whether the balancer runs the workers itself. Default true; false attaches to `count`
    /// workers already running at `host:base_port+i`.
    pub spawn: bool,
    /// Whether the balancer passes each WebSocket connection to the spawned worker that owns
    /// it (the client's socket itself, as Node's `@socket.io/sticky` does) instead of relaying
    /// its bytes. Default true. Only for spawned workers: attached, listed and discovered ones
    /// are always relayed.
    pub handoff: bool,
    /// With `handoff`, also pass long-polling connections to their worker: the first request
    /// of a connection that names a session leaves with the connection, which stays with the
    /// worker for its sessions' later requests; the worker gives back a connection that
    /// carries any other request, to be routed by the balancer. Default true: measured, it
    /// takes the balancer out of the polling data path (docs/BENCHMARKS.md, section 3); false
    /// proxies every polling request. Ignored under `balancer.tls` and with `balancer.health_check: engineio`.
    pub handoff_polling: bool,
    /// The command the balancer runs per worker, before `--config FILE --index I`.
    /// Default: the `worker` binary next to the balancer's own executable.
    pub command: Option<Vec<String>>,
    /// Workers anywhere, as `host:port`. When set, the balancer spawns nothing. Default none.
    pub upstreams: Vec<String>,
    /// `name:port`: resolve `name` to all its addresses every few seconds (docker compose
    /// `--scale`, a Kubernetes headless Service). When set, the balancer spawns nothing.
    /// Default none.
    pub discover: Option<String>,
}

impl Default for WorkersConfig {
    fn default() -> Self {
        WorkersConfig {
            count: 4,
            host: "127.0.0.1".into(),
            base_port: 9001,
            max_connections: 18_000,
            drain_window_secs: 10,
            spawn: true,
            handoff: true,
            handoff_polling: true,
            command: None,
            upstreams: Vec::new(),
            discover: None,
        }
    }
}

impl WorkersConfig {
    /// The drain window as a duration.
    pub fn drain_window(&self) -> Duration {
        Duration::from_secs(self.drain_window_secs)
    }
}
