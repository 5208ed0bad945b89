//! The `socketio:` section: Engine.IO / Socket.IO settings every worker shares (and the
//! balancer's path).

use serde::Deserialize;

/// `socketio:` section.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SocketIoConfig {
    /// HTTP path of Engine.IO. Default `/socket.io`.
    pub path: String,
    /// Engine.IO ping interval, in milliseconds. Default 25000.
    pub ping_interval_ms: u64,
    /// Engine.IO ping timeout, in milliseconds. Default 20000.
    pub ping_timeout_ms: u64,
    /// Largest message accepted, in bytes: a polling request body, or a WebSocket message
    /// (closed with 1009 beyond it). Default 100000.
    pub max_payload_bytes: u64,
    /// Packets queued per client before further messages to it are dropped (a slow reader,
    /// or a polling client that has gone away). Default 1024.
    pub max_buffer_packets: usize,
    /// Initial read buffer of each WebSocket, in bytes; it grows for larger messages. Every
    /// open WebSocket holds one. Default 1024.
    pub ws_read_buffer_bytes: usize,
    /// Also accept Engine.IO 3 clients (Socket.IO 2.x client libraries), as Node's
    /// `allowEIO3`. Default false: they are answered 400 "Unsupported protocol version".
    pub allow_eio3: bool,
    /// Browsers on other origins.
    pub cors: CorsConfig,
    /// Per-socket limits.
    pub limits: SocketLimits,
}

/// `socketio.limits`: what one socket may do. 0 turns a limit off.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SocketLimits {
    /// Events per second per client connection (its namespaces together): a token bucket,
    /// burst = 2 x rate. Excess events are dropped and counted
    /// (`fleet_worker_limited_total{kind="events"}`).
    pub events_per_sec: u32,
    /// Rooms one socket may be in (its own room and its user's not counted); a join beyond it is acked
    /// `{"ok": false, "error": "too many rooms"}`.
    pub max_rooms_per_socket: u32,
}

/// `socketio.cors`: which web origins may use the fleet from a browser.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CorsConfig {
    /// `[]` (default): no CORS headers, browsers on other origins are refused by the browser
    /// itself. `["*"]`: any origin, never with credentials. A list of exact origins
    /// (`https://app.example.com`): each is echoed back with `Vary: Origin`, and a handshake or
    /// WebSocket upgrade from any other origin is refused 403.
    pub origins: Vec<String>,
    /// Send `Access-Control-Allow-Credentials: true` (cookies, HTTP auth) to listed origins.
    /// Default false; refused at start with `"*"`.
    pub credentials: bool,
}

impl Default for SocketIoConfig {
    fn default() -> Self {
        SocketIoConfig {
            path: "/socket.io".into(),
            ping_interval_ms: 25_000,
            ping_timeout_ms: 20_000,
            max_payload_bytes: 100_000,
            max_buffer_packets: 1024,
            ws_read_buffer_bytes: 1024,
            allow_eio3: false,
            cors: CorsConfig::default(),
            limits: SocketLimits::default(),
        }
    }
}
