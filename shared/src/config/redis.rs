//! The `redis:` section: where cross-worker broadcasts go and how the link to Redis recovers.

use serde::Deserialize;

/// `redis:` section.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:pass@]host:port[/db]` or `rediss://…`. Default `redis://127.0.0.1:6379`.
    /// RESP3 (needed for pub/sub pushes) is switched on by the worker whatever the URL says.
    pub url: String,
    /// Prefix of every pub/sub channel; fleets sharing one Redis need distinct prefixes.
    /// Default `fleet`.
    pub prefix: String,
    /// First reconnect delay after the link breaks, in milliseconds. Default 100.
    pub reconnect_min_ms: u64,
    /// Cap of the reconnect backoff, in milliseconds. Default 1000 (a returning Redis is
    /// noticed within about a second).
    pub reconnect_max_ms: u64,
    /// How long a cross-worker request (fetch_sockets, broadcast with ack) waits for peers,
    /// in milliseconds. Default 5000.
    pub request_timeout_ms: u64,
    /// TLS for a `rediss://` URL.
    pub tls: RedisTlsConfig,
    /// Redis Sentinel: the master is asked of these sentinels, and asked again after a
    /// failover. The URL still gives the scheme (`rediss://` = TLS), the ACL user and password
    /// and the database of the master; its host is not used.
    pub sentinel: SentinelConfig,
    /// Seed nodes (`host:port`, or `user:password@host:port`) of a Redis Cluster: room
    /// channels are sharded over its masters (SSUBSCRIBE/SPUBLISH). The URL still gives the
    /// scheme (`rediss://` = TLS) and the ACL user and password; its host is not used. Default
    /// none.
    pub cluster: Vec<String>,
}

/// `redis.sentinel`: which master, named to which sentinels.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SentinelConfig {
    /// The master's name in the sentinels' configuration (`sentinel monitor <name> ...`).
    pub master: String,
    /// The sentinels, `host:port` or `user:password@host:port` each.
    pub nodes: Vec<String>,
}

impl SentinelConfig {
    /// Whether Sentinel is in use.
    pub fn is_set(&self) -> bool {
        !self.nodes.is_empty() || !self.master.is_empty()
    }
}

/// `redis.tls`: how a `rediss://` server's certificate is checked.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RedisTlsConfig {
    /// A PEM file of the CA(s) that signed the server's certificate. Default empty: the
    /// system's trusted roots (a managed Redis with a public certificate).
    pub ca_file: String,
    /// Skip verifying the server's certificate and name. Default false; for tests only: it
    /// lets anyone in the path read and write the fleet's traffic.
    pub insecure: bool,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379".into(),
            prefix: "fleet".into(),
            reconnect_min_ms: 100,
            reconnect_max_ms: 1000,
            request_timeout_ms: 5000,
            tls: RedisTlsConfig::default(),
            sentinel: SentinelConfig::default(),
            cluster: Vec::new(),
        }
    }
}
