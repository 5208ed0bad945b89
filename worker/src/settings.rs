//! What one worker needs to run, taken from the fleet YAML (`--config --index`) or from flags
//! (a standalone worker on another host).

use std::net::SocketAddr;
use std::time::Duration;

use shared::FleetConfig;
use shared::config::{AuthConfig, RedisConfig, RoomsConfig, SocketIoConfig};

/// One worker's settings.
///
/// ```
/// let mut s = worker::WorkerSettings::standalone(
///     "w1".into(), "127.0.0.1:9001".parse().unwrap(), "redis://127.0.0.1:6379".into());
/// s.drain_window = std::time::Duration::from_secs(30);
/// s.max_connections = 50_000;
/// ```
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Identity in logs, metrics and `whoami`.
    pub id: String,
    /// Where to listen.
    pub listen: SocketAddr,
    /// Redis link settings.
    pub redis: RedisConfig,
    /// Engine.IO settings.
    pub socketio: SocketIoConfig,
    /// Connection cap.
    pub max_connections: usize,
    /// Drain window.
    pub drain_window: Duration,
    /// Who may connect.
    pub auth: AuthConfig,
    /// What clients may do with rooms.
    pub rooms: RoomsConfig,
    /// The server API's key (`api.key`); empty: no API on this worker.
    pub api_key: String,
}

impl WorkerSettings {
    /// Worker `index` of a fleet file.
    ///
    /// # Errors
    /// The index is past `workers.count`, or the address does not resolve to one socket address.
    ///
    /// ```
    /// let cfg = shared::FleetConfig::from_yaml_str("workers:\n  count: 2\n  base_port: 9001\n").unwrap();
    /// let s = worker::WorkerSettings::from_fleet(&cfg, 1).unwrap();
    /// assert_eq!((s.id.as_str(), s.listen.port()), ("w1", 9002));
    /// assert!(worker::WorkerSettings::from_fleet(&cfg, 2).is_err());
    /// ```
    pub fn from_fleet(cfg: &FleetConfig, index: u32) -> Result<Self, String> {
        if index >= cfg.workers.count {
            return Err(format!(
                "--index {index} is out of range: workers.count is {}",
                cfg.workers.count
            ));
        }
        let addr = cfg.worker_addr(index);
        let listen = addr
            .parse()
            .map_err(|e| format!("workers.host + base_port give {addr:?}, not an address: {e}"))?;
        Ok(WorkerSettings {
            id: FleetConfig::worker_id(index),
            listen,
            redis: cfg.redis.clone(),
            socketio: cfg.socketio.clone(),
            max_connections: cfg.workers.max_connections as usize,
            drain_window: cfg.workers.drain_window(),
            auth: cfg.auth.clone(),
            rooms: cfg.rooms.clone(),
            api_key: cfg.api.key.clone(),
        })
    }

    /// A standalone worker at `listen` named `id`, every other setting from a fleet file (its
    /// auth, rooms, socketio, api, drain window and connection cap), Redis at `redis_url`.
    ///
    /// ```
    /// let cfg = shared::FleetConfig::from_yaml_str("rooms:\n  client_publish: false\n").unwrap();
    /// let s = worker::WorkerSettings::standalone_from(
    ///     &cfg, "far-1".into(), "0.0.0.0:9001".parse().unwrap(), "redis://10.0.0.5".into());
    /// assert!(!s.rooms.client_publish && s.redis.url == "redis://10.0.0.5");
    /// ```
    pub fn standalone_from(
        cfg: &FleetConfig,
        id: String,
        listen: SocketAddr,
        redis_url: String,
    ) -> Self {
        WorkerSettings {
            id,
            listen,
            redis: RedisConfig {
                url: redis_url,
                ..cfg.redis.clone()
            },
            socketio: cfg.socketio.clone(),
            max_connections: cfg.workers.max_connections as usize,
            drain_window: cfg.workers.drain_window(),
            auth: cfg.auth.clone(),
            rooms: cfg.rooms.clone(),
            api_key: cfg.api.key.clone(),
        }
    }

    /// A standalone worker: everything but these from the defaults.
    ///
    /// ```
    /// let s = worker::WorkerSettings::standalone(
    ///     "far-1".into(), "127.0.0.1:9001".parse().unwrap(), "redis://127.0.0.1:6379".into());
    /// assert_eq!(s.id, "far-1");
    /// ```
    pub fn standalone(id: String, listen: SocketAddr, redis_url: String) -> Self {
        let defaults = FleetConfig::default();
        WorkerSettings {
            id,
            listen,
            redis: RedisConfig {
                url: redis_url,
                ..defaults.redis
            },
            socketio: defaults.socketio,
            max_connections: defaults.workers.max_connections as usize,
            drain_window: defaults.workers.drain_window(),
            auth: defaults.auth,
            rooms: defaults.rooms,
            api_key: std::env::var("FLEET_API_KEY").unwrap_or_default(),
        }
    }
}
