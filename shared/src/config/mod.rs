//! The fleet YAML: one file configures balancer and workers. Parsing refuses unknown keys and
//! impossible values, and every error names the file, the key and the line.
//!
//! # Layout
//! - this file: [`FleetConfig`], the whole file, with `load` / `from_yaml_str` and helpers.
//! - `redis`, `workers`, `socketio`, `balancer`, `auth` (with `rooms`), `api`: one section each; the structs are the
//!   reference of the keys, and each `impl Default` right below its struct lists the defaults.
//! - [`IpNetwork`] (`ip_network`): the parsed form of `balancer.trusted_proxies` entries.
//! - `validate`: the range and relation checks serde cannot make, one function per section.
//! - `env`: the `FLEET_*` environment overrides.
//! - `error`: [`ConfigError`], and serde_yaml's errors translated into it.
//! - `location`: [`locate_key`], a dotted key's line from YAML parser events.

mod api;
mod auth;
mod balancer;
mod env;
mod error;
mod ip_network;
mod location;
mod redis;
mod socketio;
mod validate;
mod workers;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

pub use api::ApiConfig;
pub use auth::{AuthConfig, AuthMode, JwtConfig, ProxyAuthConfig, RoomsConfig};
pub use balancer::{BalancerConfig, HealthCheck, LimitsConfig, Placement, TlsConfig};
pub use error::ConfigError;
pub use ip_network::IpNetwork;
pub use location::locate_key;
pub use redis::{RedisConfig, RedisTlsConfig};
pub use socketio::{CorsConfig, SocketIoConfig, SocketLimits};
pub use validate::{validate_host_port, validate_redis_url};
pub use workers::{MAX_WORKERS, WorkersConfig};

/// The whole fleet file. Every section and key has a default except where noted.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FleetConfig {
    /// The balancer's public address. Default `0.0.0.0:8080`.
    pub listen: SocketAddr,
    /// The balancer's `/metrics`, `/healthz`, `/readyz`, `/sd`. Default `0.0.0.0:9100`.
    pub metrics_listen: SocketAddr,
    /// Redis, which carries cross-worker broadcasts.
    pub redis: RedisConfig,
    /// The worker processes.
    pub workers: WorkersConfig,
    /// Engine.IO / Socket.IO settings shared by every worker (and the balancer's path).
    pub socketio: SocketIoConfig,
    /// The front proxy: placement, health checks, stickiness, shutdown.
    pub balancer: BalancerConfig,
    /// Who may connect.
    pub auth: AuthConfig,
    /// What clients may do with rooms.
    pub rooms: RoomsConfig,
    /// The server API for the app's backend.
    pub api: ApiConfig,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            metrics_listen: SocketAddr::from(([0, 0, 0, 0], 9100)),
            redis: RedisConfig::default(),
            workers: WorkersConfig::default(),
            socketio: SocketIoConfig::default(),
            balancer: BalancerConfig::default(),
            auth: AuthConfig::default(),
            rooms: RoomsConfig::default(),
            api: ApiConfig::default(),
        }
    }
}

impl FleetConfig {
    /// Read, parse and validate a fleet file, then apply the environment overrides
    /// ([`FleetConfig::apply_env`]).
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
        cfg.validate_secrets()
            .map_err(|(key, message)| ConfigError {
                file: Some(path.to_owned()),
                line: locate_key(&text, key),
                key: Some(key.to_owned()),
                message,
            })?;
        Ok(cfg)
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
            serde_yaml::from_str(text).map_err(|e| error::from_serde(text, e))?
        };
        cfg.validate().map_err(|(key, message)| ConfigError {
            line: locate_key(text, key),
            key: Some(key.to_owned()),
            file: None,
            message,
        })?;
        Ok(cfg)
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

/// A small valid file the tests of every part of this module edit.
#[cfg(test)]
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `deploy/fleet.yaml` is the reference of every key with its default: for the sections it
    /// leaves at their defaults, what it writes must be what the code defaults to.
    #[test]
    fn the_example_file_states_the_real_defaults() {
        let cfg = FleetConfig::from_yaml_str(include_str!("../../../deploy/fleet.yaml")).unwrap();
        assert_eq!(cfg.socketio, SocketIoConfig::default());
        assert_eq!(cfg.auth, AuthConfig::default());
        assert_eq!(cfg.rooms, RoomsConfig::default());
        assert_eq!(cfg.api, ApiConfig::default());
        assert_eq!(cfg.balancer.forward_paths, Vec::<String>::new());
        assert_eq!(cfg.redis.tls, RedisTlsConfig::default());
    }

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

    /// `impl Default` and serde's per-key defaults are the same thing: an empty map, and
    /// every section given as an empty map, parse to `Default`.
    #[test]
    fn default_impls_agree_with_serde() {
        let all_empty = "redis: {}\nworkers: {}\nsocketio: {}\nbalancer: {}\n";
        for text in ["{}", "# only a comment\n{}\n", all_empty] {
            assert_eq!(
                FleetConfig::from_yaml_str(text).unwrap(),
                FleetConfig::default(),
                "{text}"
            );
        }
    }

    /// The shipped example parses, and says exactly the defaults.
    #[test]
    fn deploy_fleet_yaml_is_valid_and_matches_defaults() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/fleet.yaml");
        let cfg = FleetConfig::load(path).unwrap();
        assert_eq!(cfg, FleetConfig::default());
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
    fn trusted_proxies_are_parsed_networks() {
        let text = "balancer:\n  trusted_proxies: [10.0.0.0/8, \"::1\", 192.168.1.7]\n";
        let cfg = FleetConfig::from_yaml_str(text).unwrap();
        let want: Vec<IpNetwork> = ["10.0.0.0/8", "::1/128", "192.168.1.7/32"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(cfg.balancer.trusted_proxies, want);
        assert!(cfg.balancer.trusted_proxies[0].contains(&"10.9.8.7".parse().unwrap()));
    }
}
