//! The fleet YAML: one file configures balancer and workers. Parsing refuses unknown keys and
//! impossible values, and every error names the file, the key and the line.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The whole fleet file. Every section and key has a default except where noted.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// The balancer's public address. Default `0.0.0.0:8080`.
    #[serde(default = "defaults::listen")]
    pub listen: SocketAddr,
    /// The balancer's `/metrics`, `/healthz`, `/readyz`, `/sd`. Default `0.0.0.0:9100`.
    #[serde(default = "defaults::metrics_listen")]
    pub metrics_listen: SocketAddr,
    /// Redis, which carries cross-worker broadcasts.
    #[serde(default)]
    pub redis: RedisConfig,
    /// The worker processes.
    #[serde(default)]
    pub workers: WorkersConfig,
    /// Engine.IO / Socket.IO settings shared by every worker (and the balancer's path).
    #[serde(default)]
    pub socketio: SocketIoConfig,
    /// The front proxy: placement, health checks, stickiness, shutdown.
    #[serde(default)]
    pub balancer: BalancerConfig,
}

/// How new sessions are placed on workers.
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

/// `balancer:` section.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BalancerConfig {
    /// Placement policy for new sessions. Default `consistent`.
    #[serde(default)]
    pub placement: Placement,
    /// With `consistent`, a worker above `load_factor` × the mean load takes no new session.
    /// Default 1.25; at least 1.0.
    #[serde(default = "defaults::load_factor")]
    pub load_factor: f64,
    /// Peers (IPs or CIDRs) whose `X-Forwarded-For` is believed for the client address.
    /// Default none: the TCP peer is the client.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// How often each worker's `/readyz` is checked, in milliseconds. Default 1000.
    #[serde(default = "defaults::health_check_interval_ms")]
    pub health_check_interval_ms: u64,
    /// Failed checks in a row that take a worker out of placement. Default 2.
    #[serde(default = "defaults::health_check_failures")]
    pub health_check_failures: usize,
    /// On SIGTERM, how long the balancer waits for workers to drain before exiting, in
    /// seconds. Default: `workers.drain_window_secs` + 5.
    #[serde(default)]
    pub grace_period_secs: Option<u64>,
    /// Secret mixed into sticky tags so they do not reveal worker addresses. Balancer
    /// replicas in front of the same workers must share it. Default `fleet`.
    #[serde(default = "defaults::sticky_secret")]
    pub sticky_secret: String,
    /// Worker threads of the proxy. Default 2.
    #[serde(default = "defaults::threads")]
    pub threads: usize,
    /// A new connection whose request head stalls this long (no byte arrives) is dropped, in
    /// seconds. Default 10.
    #[serde(default = "defaults::header_timeout_secs")]
    pub header_timeout_secs: u64,
    /// Open the public port with SO_REUSEPORT, so several balancer processes on one host share
    /// it (the kernel spreads connections; stateless stickiness makes any of them right for
    /// any request). Default false.
    #[serde(default)]
    pub reuse_port: bool,
    /// Request heads larger than this are answered 431. Default 16384; 1024 to 1048576.
    #[serde(default = "defaults::max_header_bytes")]
    pub max_header_bytes: usize,
}

/// `redis:` section.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:pass@]host:port[/db]` or `rediss://…`. Default `redis://127.0.0.1:6379`.
    /// RESP3 (needed for pub/sub pushes) is switched on by the worker whatever the URL says.
    #[serde(default = "defaults::redis_url")]
    pub url: String,
    /// Prefix of every pub/sub channel; fleets sharing one Redis need distinct prefixes.
    /// Default `fleet`.
    #[serde(default = "defaults::prefix")]
    pub prefix: String,
    /// First reconnect delay after the link breaks, in milliseconds. Default 100.
    #[serde(default = "defaults::reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    /// Cap of the reconnect backoff, in milliseconds. Default 1000 (a returning Redis is
    /// noticed within about a second).
    #[serde(default = "defaults::reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    /// How long a cross-worker request (fetch_sockets, broadcast with ack) waits for peers,
    /// in milliseconds. Default 5000.
    #[serde(default = "defaults::request_timeout_ms")]
    pub request_timeout_ms: u64,
}

/// `workers:` section.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WorkersConfig {
    /// How many worker processes the balancer runs. Default 4; 1 to 1024.
    #[serde(default = "defaults::count")]
    pub count: u32,
    /// Address the workers listen on and are reached at. Default `127.0.0.1`.
    #[serde(default = "defaults::host")]
    pub host: String,
    /// Worker `i` listens on `base_port + i`. Default 9001.
    #[serde(default = "defaults::base_port")]
    pub base_port: u16,
    /// Most concurrent connections one worker accepts; more wait in the kernel backlog.
    /// Default 18000 (these machines cap open files at 20 000 per process).
    #[serde(default = "defaults::max_connections")]
    pub max_connections: u32,
    /// On SIGTERM, clients are moved off the worker spread evenly over this many seconds,
    /// then it exits. Default 10.
    #[serde(default = "defaults::drain_window_secs")]
    pub drain_window_secs: u64,
    /// Whether the balancer runs the workers itself. Default true; false attaches to `count`
    /// workers already running at `host:base_port+i`.
    #[serde(default = "defaults::spawn")]
    pub spawn: bool,
    /// Whether the balancer passes each WebSocket connection to the spawned worker that owns
    /// it (the client's socket itself, as Node's `@socket.io/sticky` does) instead of relaying
    /// its bytes. Default true. Only for spawned workers: attached, listed and discovered ones
    /// are always relayed.
    #[serde(default = "defaults::handoff")]
    pub handoff: bool,
    /// The command the balancer runs per worker, before `--config FILE --index I`.
    /// Default: the `worker` binary next to the balancer's own executable.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Workers anywhere, as `host:port`. When set, the balancer spawns nothing.
    #[serde(default)]
    pub upstreams: Vec<String>,
    /// `name:port`: resolve `name` to all its addresses every few seconds (docker compose
    /// `--scale`, a Kubernetes headless Service). When set, the balancer spawns nothing.
    #[serde(default)]
    pub discover: Option<String>,
}

/// The most workers a fleet may have (`workers.count`).
pub const MAX_WORKERS: u32 = 1024;

/// `socketio:` section.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SocketIoConfig {
    /// HTTP path of Engine.IO. Default `/socket.io`.
    #[serde(default = "defaults::path")]
    pub path: String,
    /// Engine.IO ping interval, in milliseconds. Default 25000.
    #[serde(default = "defaults::ping_interval_ms")]
    pub ping_interval_ms: u64,
    /// Engine.IO ping timeout, in milliseconds. Default 20000.
    #[serde(default = "defaults::ping_timeout_ms")]
    pub ping_timeout_ms: u64,
    /// Largest polling request body accepted, in bytes. Default 100000.
    #[serde(default = "defaults::max_payload_bytes")]
    pub max_payload_bytes: u64,
    /// Packets queued per client before further messages to it are dropped (a slow reader,
    /// or a polling client that has gone away). Default 1024.
    #[serde(default = "defaults::max_buffer_packets")]
    pub max_buffer_packets: usize,
    /// Initial read buffer of each WebSocket, in bytes; it grows for larger messages. Every
    /// open WebSocket holds one. Default 1024.
    #[serde(default = "defaults::ws_read_buffer_bytes")]
    pub ws_read_buffer_bytes: usize,
    /// Also accept Engine.IO 3 clients (Socket.IO 2.x client libraries), as Node's
    /// `allowEIO3`. Default false: they are answered 400 "Unsupported protocol version".
    #[serde(default)]
    pub allow_eio3: bool,
}

mod defaults {
    use std::net::SocketAddr;

    pub fn listen() -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], 8080))
    }
    pub fn metrics_listen() -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], 9100))
    }
    pub fn redis_url() -> String {
        "redis://127.0.0.1:6379".into()
    }
    pub fn prefix() -> String {
        "fleet".into()
    }
    pub fn reconnect_min_ms() -> u64 {
        100
    }
    pub fn reconnect_max_ms() -> u64 {
        1000
    }
    pub fn request_timeout_ms() -> u64 {
        5000
    }
    pub fn count() -> u32 {
        4
    }
    pub fn host() -> String {
        "127.0.0.1".into()
    }
    pub fn base_port() -> u16 {
        9001
    }
    pub fn max_connections() -> u32 {
        18_000
    }
    pub fn drain_window_secs() -> u64 {
        10
    }
    pub fn path() -> String {
        "/socket.io".into()
    }
    pub fn ping_interval_ms() -> u64 {
        25_000
    }
    pub fn ping_timeout_ms() -> u64 {
        20_000
    }
    pub fn ws_read_buffer_bytes() -> usize {
        1024
    }
    pub fn max_buffer_packets() -> usize {
        1024
    }
    pub fn max_payload_bytes() -> u64 {
        100_000
    }
    pub fn spawn() -> bool {
        true
    }
    pub fn handoff() -> bool {
        true
    }
    pub fn load_factor() -> f64 {
        1.25
    }
    pub fn health_check_interval_ms() -> u64 {
        1000
    }
    pub fn health_check_failures() -> usize {
        2
    }
    pub fn sticky_secret() -> String {
        "fleet".into()
    }
    pub fn threads() -> usize {
        2
    }
    pub fn header_timeout_secs() -> u64 {
        10
    }
    pub fn max_header_bytes() -> usize {
        16 * 1024
    }
}

macro_rules! default_from_empty {
    ($($ty:ty),*) => {$(
        impl Default for $ty {
            fn default() -> Self {
                serde_yaml::from_str("{}").expect("every field has a default")
            }
        }
    )*};
}
default_from_empty!(
    RedisConfig,
    WorkersConfig,
    SocketIoConfig,
    BalancerConfig,
    FleetConfig
);

/// A refused fleet file: where, which key, and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct ConfigError {
    /// The file, when the text came from one.
    pub file: Option<PathBuf>,
    /// Dotted key path (`workers.count`), when known.
    pub key: Option<String>,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = self.file.as_deref().map(Path::display);
        match (file, self.line) {
            (Some(file), Some(line)) => write!(f, "{file}:{line}: ")?,
            (Some(file), None) => write!(f, "{file}: ")?,
            (None, Some(line)) => write!(f, "line {line}: ")?,
            (None, None) => {}
        }
        if let Some(key) = &self.key {
            write!(f, "key `{key}`: ")?;
        }
        f.write_str(&self.message)
    }
}

impl FleetConfig {
    /// Read, parse and validate a fleet file.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the file, and the key and line where they are known.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: Some(path.to_owned()),
            key: None,
            line: None,
            message: format!("cannot read the fleet file: {e}"),
        })?;
        let mut cfg = Self::from_yaml_str(&text).map_err(|mut e| {
            e.file = Some(path.to_owned());
            e
        })?;
        cfg.apply_env(|k| std::env::var(k).ok())?;
        Ok(cfg)
    }

    /// Overrides from the environment, for containers that mount one fleet file everywhere:
    /// `FLEET_LISTEN`, `FLEET_METRICS_LISTEN`, `FLEET_REDIS_URL` and `FLEET_WORKERS_HOST`
    /// (e.g. `0.0.0.0`, so workers in a container are reachable from outside it).
    ///
    /// # Errors
    /// A [`ConfigError`] naming the variable when its value is invalid.
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let bad = |name: &str, message: String| ConfigError {
            file: None,
            key: Some(format!("env {name}")),
            line: None,
            message,
        };
        let addr = |name: &str, v: String| {
            v.parse::<SocketAddr>()
                .map_err(|e| bad(name, format!("{e}: {v:?}")))
        };
        if let Some(v) = var("FLEET_LISTEN") {
            self.listen = addr("FLEET_LISTEN", v)?;
        }
        if let Some(v) = var("FLEET_METRICS_LISTEN") {
            self.metrics_listen = addr("FLEET_METRICS_LISTEN", v)?;
        }
        if let Some(v) = var("FLEET_REDIS_URL") {
            validate_redis_url(&v).map_err(|m| bad("FLEET_REDIS_URL", m))?;
            self.redis.url = v;
        }
        if let Some(v) = var("FLEET_WORKERS_HOST") {
            validate_host_port(&format!("{v}:1")).map_err(|m| bad("FLEET_WORKERS_HOST", m))?;
            self.workers.host = v;
        }
        Ok(())
    }

    /// Parse and validate fleet YAML text.
    ///
    /// # Errors
    /// A [`ConfigError`] with the key and line of the first problem found.
    pub fn from_yaml_str(text: &str) -> Result<Self, ConfigError> {
        // An empty file is a fleet with every default, not an error.
        let cfg: FleetConfig = if text.trim().is_empty() {
            FleetConfig::default()
        } else {
            serde_yaml::from_str(text).map_err(|e| from_serde(text, e))?
        };
        cfg.validate().map_err(|(key, message)| ConfigError {
            line: locate_key(text, key),
            key: Some(key.to_owned()),
            file: None,
            message,
        })?;
        Ok(cfg)
    }

    /// Check the values serde cannot: ranges and relations between keys.
    fn validate(&self) -> Result<(), (&'static str, String)> {
        let w = &self.workers;
        if !(1..=MAX_WORKERS).contains(&w.count) {
            return Err((
                "workers.count",
                format!("must be 1 to 1024, got {}", w.count),
            ));
        }
        if w.base_port == 0 {
            return Err(("workers.base_port", "must be 1 to 65535, got 0".into()));
        }
        let last = u32::from(w.base_port) + w.count - 1;
        if last > u32::from(u16::MAX) {
            return Err((
                "workers.base_port",
                format!(
                    "base_port {} + count {} needs ports up to {last}, past 65535",
                    w.base_port, w.count
                ),
            ));
        }
        if w.host.trim().is_empty() {
            return Err(("workers.host", "must not be empty".into()));
        }
        if w.max_connections == 0 {
            return Err(("workers.max_connections", "must be at least 1".into()));
        }
        if w.drain_window_secs > 3600 {
            return Err(("workers.drain_window_secs", "must be at most 3600".into()));
        }
        if !w.upstreams.is_empty() && w.discover.is_some() {
            return Err((
                "workers.discover",
                "give either upstreams or discover, not both".into(),
            ));
        }
        for up in &w.upstreams {
            validate_host_port(up).map_err(|m| ("workers.upstreams", m))?;
        }
        if let Some(d) = &w.discover {
            validate_host_port(d).map_err(|m| ("workers.discover", m))?;
        }
        if w.command
            .as_ref()
            .is_some_and(|c| c.is_empty() || c[0].is_empty())
        {
            return Err(("workers.command", "must name a program".into()));
        }
        let b = &self.balancer;
        if !(b.load_factor >= 1.0 && b.load_factor <= 100.0) {
            return Err((
                "balancer.load_factor",
                format!("must be 1.0 to 100, got {}", b.load_factor),
            ));
        }
        for p in &b.trusted_proxies {
            parse_cidr(p).map_err(|m| ("balancer.trusted_proxies", m))?;
        }
        if !(100..=60_000).contains(&b.health_check_interval_ms) {
            return Err((
                "balancer.health_check_interval_ms",
                "must be 100 to 60000".into(),
            ));
        }
        if b.health_check_failures == 0 {
            return Err((
                "balancer.health_check_failures",
                "must be at least 1".into(),
            ));
        }
        if b.sticky_secret.is_empty() {
            return Err(("balancer.sticky_secret", "must not be empty".into()));
        }
        if !(1..=256).contains(&b.threads) {
            return Err(("balancer.threads", "must be 1 to 256".into()));
        }
        if !(1..=600).contains(&b.header_timeout_secs) {
            return Err(("balancer.header_timeout_secs", "must be 1 to 600".into()));
        }
        // pingora itself refuses heads over 1 MiB.
        if !(1024..=1024 * 1024).contains(&b.max_header_bytes) {
            return Err((
                "balancer.max_header_bytes",
                "must be 1024 to 1048576".into(),
            ));
        }
        validate_redis_url(&self.redis.url).map_err(|m| ("redis.url", m))?;
        let r = &self.redis;
        if r.prefix.is_empty() || r.prefix.contains('#') {
            return Err((
                "redis.prefix",
                "must be non-empty and must not contain '#'".into(),
            ));
        }
        if r.reconnect_min_ms == 0 {
            return Err(("redis.reconnect_min_ms", "must be at least 1".into()));
        }
        if r.reconnect_max_ms < r.reconnect_min_ms {
            return Err((
                "redis.reconnect_max_ms",
                "must be at least reconnect_min_ms".into(),
            ));
        }
        if r.request_timeout_ms == 0 {
            return Err(("redis.request_timeout_ms", "must be at least 1".into()));
        }
        let s = &self.socketio;
        if !s.path.starts_with('/') || s.path.len() < 2 || s.path.contains(['?', '#', ' ']) {
            return Err((
                "socketio.path",
                format!("must look like /socket.io, got {:?}", s.path),
            ));
        }
        if s.ping_interval_ms == 0 {
            return Err(("socketio.ping_interval_ms", "must be at least 1".into()));
        }
        if s.ping_timeout_ms == 0 {
            return Err(("socketio.ping_timeout_ms", "must be at least 1".into()));
        }
        if s.max_payload_bytes < 1024 {
            return Err(("socketio.max_payload_bytes", "must be at least 1024".into()));
        }
        if !(16..=1_000_000).contains(&s.max_buffer_packets) {
            return Err((
                "socketio.max_buffer_packets",
                "must be 16 to 1000000".into(),
            ));
        }
        if !(256..=16 * 1024 * 1024).contains(&s.ws_read_buffer_bytes) {
            return Err((
                "socketio.ws_read_buffer_bytes",
                "must be 256 to 16777216".into(),
            ));
        }
        Ok(())
    }

    /// The address worker `index` listens on.
    pub fn worker_addr(&self, index: u32) -> String {
        format!(
            "{}:{}",
            self.workers.host,
            u32::from(self.workers.base_port) + index
        )
    }

    /// The id of worker `index`: `w<index>`.
    pub fn worker_id(index: u32) -> String {
        format!("w{index}")
    }
}

impl WorkersConfig {
    /// The drain window as a duration.
    pub fn drain_window(&self) -> Duration {
        Duration::from_secs(self.drain_window_secs)
    }
}

impl FleetConfig {
    /// True when the balancer runs the workers itself.
    pub fn spawns_workers(&self) -> bool {
        self.workers.spawn && self.indexed_workers()
    }

    /// True when the workers are the `workers.count` at `host:base_port+i` (spawned or not),
    /// not a list (`upstreams`) or a DNS name (`discover`).
    pub fn indexed_workers(&self) -> bool {
        self.workers.upstreams.is_empty() && self.workers.discover.is_none()
    }

    /// The balancer's grace period on SIGTERM.
    pub fn grace_period(&self) -> Duration {
        Duration::from_secs(
            self.balancer
                .grace_period_secs
                .unwrap_or(self.workers.drain_window_secs + 5),
        )
    }
}

/// `host:port` with a non-empty host and a port from 1 to 65535.
pub fn validate_host_port(s: &str) -> Result<(), String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not host:port"))?;
    if host.is_empty() {
        return Err(format!("{s:?} has no host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("{s:?} has no valid port")),
    }
}

/// An IP address or CIDR block: `10.0.0.0/8`, `::1`, `192.168.1.7`.
pub fn parse_cidr(s: &str) -> Result<(std::net::IpAddr, u8), String> {
    let (ip, len) = match s.split_once('/') {
        Some((ip, len)) => (ip, Some(len)),
        None => (s, None),
    };
    let ip: std::net::IpAddr = ip
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not an IP or CIDR"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        Some(l) => l
            .parse::<u8>()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("{s:?} has a bad prefix length"))?,
    };
    Ok((ip, len))
}

/// Accept `redis://`, `rediss://`, `redis+unix://` and `unix://` URLs with a host or path.
pub fn validate_redis_url(raw: &str) -> Result<(), String> {
    let url = url::Url::parse(raw).map_err(|e| format!("not a URL ({e}): {raw:?}"))?;
    match url.scheme() {
        "redis" | "rediss" => {
            if url.host_str().is_none_or(str::is_empty) {
                return Err(format!("no host in {raw:?}"));
            }
            Ok(())
        }
        "redis+unix" | "unix" => Ok(()),
        other => Err(format!(
            "scheme must be redis:// or rediss://, got {other}://"
        )),
    }
}

/// Turn serde_yaml's error into ours; its message already carries the key path.
fn from_serde(text: &str, e: serde_yaml::Error) -> ConfigError {
    let line = e.location().map(|l| l.line());
    let full = e.to_string();
    // serde_yaml prints "path.to.key: message at line L column C"; split the path off.
    let without_loc = match full.rfind(" at line ") {
        Some(i) => full[..i].to_owned(),
        None => full.clone(),
    };
    let (key, message) = match without_loc.split_once(": ") {
        Some((k, m)) if !k.contains(' ') && !k.is_empty() => (Some(k.to_owned()), m.to_owned()),
        _ => (None, without_loc),
    };
    // An unknown key is reported at its own line; name it in the key too.
    let key = match (key, unknown_field(&message)) {
        (Some(parent), Some(field)) => Some(format!("{parent}.{field}")),
        (None, Some(field)) => Some(field.to_owned()),
        (key, None) => key,
    };
    let line = line.or_else(|| key.as_deref().and_then(|k| locate_key(text, k)));
    ConfigError {
        file: None,
        key,
        line,
        message,
    }
}

fn unknown_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split('`').next()
}

/// Find the 1-based line of a dotted key in block-style YAML, by indentation.
///
/// Used only to point at a value that parsed but is out of range; flow-style maps fall back
/// to no line.
pub fn locate_key(text: &str, dotted: &str) -> Option<usize> {
    let mut parts = dotted.split('.').peekable();
    let mut want = parts.next()?;
    let mut parent_indent: Option<usize> = None;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let indent = line.len() - trimmed.len();
        if parent_indent.is_some_and(|p| indent <= p) {
            return None; // left the parent's block without finding the key
        }
        let Some(key) = trimmed.split(':').next() else {
            continue;
        };
        if key.trim() == want && trimmed[key.len()..].starts_with(':') {
            match parts.next() {
                None => return Some(i + 1),
                Some(next) => {
                    want = next;
                    parent_indent = Some(indent);
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #[test]
    fn environment_overrides_name_the_variable() {
        let mut cfg = FleetConfig::default();
        let env = |k: &str| match k {
            "FLEET_REDIS_URL" => Some("redis://redis:6379".to_owned()),
            "FLEET_LISTEN" => Some("0.0.0.0:8000".to_owned()),
            "FLEET_WORKERS_HOST" => Some("0.0.0.0".to_owned()),
            _ => None,
        };
        cfg.apply_env(env).unwrap();
        assert_eq!(cfg.redis.url, "redis://redis:6379");
        assert_eq!(cfg.listen.to_string(), "0.0.0.0:8000");
        assert_eq!(cfg.worker_addr(1), "0.0.0.0:9002");
        let err = FleetConfig::default()
            .apply_env(|k| (k == "FLEET_LISTEN").then(|| "nowhere".to_owned()))
            .unwrap_err();
        assert_eq!(err.key.as_deref(), Some("env FLEET_LISTEN"));
    }

    use super::*;

    const GOOD: &str = "\
listen: 0.0.0.0:8080
metrics_listen: 0.0.0.0:9100
redis:
  url: redis://127.0.0.1:6379
workers:
  count: 4
  host: 127.0.0.1
  base_port: 9001
";

    #[test]
    fn contract_keys_parse() {
        let cfg = FleetConfig::from_yaml_str(GOOD).unwrap();
        assert_eq!(cfg.workers.count, 4);
        assert_eq!(cfg.worker_addr(3), "127.0.0.1:9004");
        assert_eq!(cfg.workers.drain_window_secs, 10);
        assert_eq!(cfg.socketio.path, "/socket.io");
    }

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(
            FleetConfig::from_yaml_str("").unwrap(),
            FleetConfig::default()
        );
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = GOOD.replace("  host:", "  hots:");
        let err = FleetConfig::from_yaml_str(&text).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("workers.hots"), "{err}");
        assert_eq!(err.line, Some(7), "{err}");
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn unknown_top_level_key() {
        let err = FleetConfig::from_yaml_str("listen: 0.0.0.0:1\nworkerz: {}\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("workerz"), "{err}");
        assert_eq!(err.line, Some(2));
    }

    #[test]
    fn wrong_type_names_key_and_line() {
        let text = GOOD.replace("count: 4", "count: four");
        let err = FleetConfig::from_yaml_str(&text).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("workers.count"), "{err}");
        assert_eq!(err.line, Some(6));
    }

    #[test]
    fn zero_workers_refused_at_its_line() {
        let text = GOOD.replace("count: 4", "count: 0");
        let err = FleetConfig::from_yaml_str(&text).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("workers.count"));
        assert_eq!(err.line, Some(6));
    }

    #[test]
    fn port_overflow_refused() {
        let text = GOOD.replace("base_port: 9001", "base_port: 65534");
        let err = FleetConfig::from_yaml_str(&text).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("workers.base_port"));
        assert_eq!(err.line, Some(8));
        assert!(err.message.contains("65537"), "{err}");
        let err = FleetConfig::from_yaml_str(&GOOD.replace("9001", "70000")).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("workers.base_port"), "{err}");
    }

    #[test]
    fn websocket_read_buffer_bounds() {
        let err =
            FleetConfig::from_yaml_str("socketio:\n  ws_read_buffer_bytes: 16\n").unwrap_err();
        assert_eq!(
            err.key.as_deref(),
            Some("socketio.ws_read_buffer_bytes"),
            "{err}"
        );
        let ok = FleetConfig::from_yaml_str("socketio:\n  ws_read_buffer_bytes: 4096\n").unwrap();
        assert_eq!(ok.socketio.ws_read_buffer_bytes, 4096);
        assert_eq!(FleetConfig::default().socketio.ws_read_buffer_bytes, 1024);
    }

    #[test]
    fn bad_redis_url_refused() {
        for bad in ["http://x:1", "not a url", "redis://"] {
            let text = GOOD.replace("redis://127.0.0.1:6379", bad);
            let err = FleetConfig::from_yaml_str(&text).unwrap_err();
            assert_eq!(err.key.as_deref(), Some("redis.url"), "{bad}: {err}");
            assert_eq!(err.line, Some(4), "{bad}: {err}");
        }
    }

    #[test]
    fn bad_listen_address() {
        let err = FleetConfig::from_yaml_str("listen: nowhere\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("listen"), "{err}");
        assert_eq!(err.line, Some(1));
    }

    #[test]
    fn display_has_file_line_key() {
        let dir = std::env::temp_dir().join(format!("fleet-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("fleet.yaml");
        std::fs::write(&file, GOOD.replace("count: 4", "count: 0")).unwrap();
        let msg = FleetConfig::load(&file).unwrap_err().to_string();
        assert!(
            msg.starts_with(&format!("{}:6: key `workers.count`", file.display())),
            "{msg}"
        );
    }

    #[test]
    fn balancer_section_and_worker_sources() {
        let text = "workers:\n  upstreams: [\"10.0.0.1:9001\", \"w2:9001\"]\nbalancer:\n  placement: least-connections\n  trusted_proxies: [10.0.0.0/8]\n";
        let cfg = FleetConfig::from_yaml_str(text).unwrap();
        assert!(!cfg.spawns_workers());
        assert_eq!(cfg.balancer.placement, Placement::LeastConnections);
        assert_eq!(cfg.grace_period(), Duration::from_secs(15));
        let err = FleetConfig::from_yaml_str("balancer:\n  placement: round-robin\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("balancer.placement"), "{err}");
        let err = FleetConfig::from_yaml_str("balancer:\n  load_factor: 0.5\n").unwrap_err();
        assert_eq!(
            (err.key.as_deref(), err.line),
            (Some("balancer.load_factor"), Some(2))
        );
        let err = FleetConfig::from_yaml_str("workers:\n  discover: fleet\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("workers.discover"));
        let err = FleetConfig::from_yaml_str("balancer:\n  trusted_proxies: [10.0.0.0/40]\n")
            .unwrap_err();
        assert_eq!(err.key.as_deref(), Some("balancer.trusted_proxies"));
    }

    #[test]
    fn locate_key_respects_nesting() {
        let text = "a:\n  x: 1\nb:\n  # c\n  x: 2\n";
        assert_eq!(locate_key(text, "b.x"), Some(5));
        assert_eq!(locate_key(text, "a.x"), Some(2));
        assert_eq!(locate_key(text, "a.y"), None);
    }
}

#[cfg(test)]
mod example_file {
    use super::*;

    /// The shipped example parses, and says exactly the defaults.
    #[test]
    fn deploy_fleet_yaml_is_valid_and_matches_defaults() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/fleet.yaml");
        let cfg = FleetConfig::load(path).unwrap();
        assert_eq!(cfg, FleetConfig::default());
    }
}
