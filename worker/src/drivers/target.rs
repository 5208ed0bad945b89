//! Where the Redis link connects: one server named by `redis.url`, whichever server Redis
//! Sentinel names master at the moment of connecting (`redis.sentinel`), so that every
//! reconnection after a failover lands on the new master, or a Redis Cluster
//! (`redis.cluster`), whose client follows the slots' owners itself.

use std::time::Duration;

use redis::aio::AsyncPushSender;
use redis::cluster::ClusterClientBuilder;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, ConnectionAddr, ErrorKind, ProtocolVersion, RedisError, RedisResult,
    TlsCertificates,
};
use shared::config::{RedisConfig, RedisTlsConfig};
use tokio::sync::Mutex;

use super::connection::RedisConnection;

/// The server (or servers) the link may connect to.
pub enum Target {
    /// `redis.url`.
    Fixed(redis::Client),
    /// The master the sentinels name.
    Sentinel {
        client: Mutex<SentinelClient>,
        master: String,
    },
    /// A Redis Cluster, from its seed nodes (URLs with the scheme and credentials of
    /// `redis.url`).
    Cluster {
        seeds: Vec<String>,
        certificates: Option<Vec<u8>>,
    },
}

impl Target {
    /// The target `config` describes (RESP3 forced: pub/sub pushes need it).
    ///
    /// # Errors
    /// The URL or a node cannot be understood, or the CA file cannot be read.
    pub fn new(config: &RedisConfig) -> RedisResult<Self> {
        let url = config.url.as_str();
        let tls = url.starts_with("rediss://");
        let ca = ca_certificates(tls, &config.tls)?;
        if !config.cluster.is_empty() {
            return Ok(Target::Cluster {
                seeds: cluster_seeds(config)?,
                certificates: ca,
            });
        }
        if !config.sentinel.is_set() {
            // redis-rs spells "do not verify" as a URL fragment.
            let url = if tls && config.tls.insecure && !url.contains('#') {
                format!("{url}#insecure")
            } else {
                url.to_owned()
            };
            let info = redis::IntoConnectionInfo::into_connection_info(url.as_str())?;
            let settings = info
                .redis_settings()
                .clone()
                .set_protocol(ProtocolVersion::RESP3);
            let info = info.set_redis_settings(settings);
            let client = match ca {
                Some(root_cert) => redis::Client::build_with_tls(
                    info,
                    TlsCertificates {
                        client_tls: None,
                        root_cert: Some(root_cert),
                    },
                )?,
                None => redis::Client::open(info)?,
            };
            return Ok(Target::Fixed(client));
        }

        let data = url::Url::parse(url).map_err(|e| invalid("redis.url", e.to_string()))?;
        let tls_mode = tls.then_some(if config.tls.insecure {
            redis::TlsMode::Insecure
        } else {
            redis::TlsMode::Secure
        });
        let mut sentinels = Vec::new();
        let mut sentinel_auth = None;
        for node in &config.sentinel.nodes {
            let n = url::Url::parse(&format!("redis://{node}"))
                .map_err(|e| invalid("redis.sentinel.nodes", format!("{node}: {e}")))?;
            let host = n.host_str().unwrap_or_default().to_owned();
            let port = n.port().unwrap_or(26379);
            sentinels.push(match tls_mode {
                Some(mode) => ConnectionAddr::TcpTls {
                    host,
                    port,
                    insecure: mode == redis::TlsMode::Insecure,
                    tls_params: None,
                },
                None => ConnectionAddr::Tcp(host, port),
            });
            if let Some(password) = n.password()
                && sentinel_auth.is_none()
            {
                sentinel_auth = Some((n.username().to_owned(), decode(password)));
            }
        }
        let mut builder = SentinelClientBuilder::new(
            sentinels,
            &config.sentinel.master,
            SentinelServerType::Master,
        )?
        .set_client_to_redis_protocol(ProtocolVersion::RESP3);
        if let Some(mode) = tls_mode {
            builder = builder
                .set_client_to_redis_tls_mode(mode)
                .set_client_to_sentinel_tls_mode(mode);
        }
        if let Some(root_cert) = ca {
            let certs = || TlsCertificates {
                client_tls: None,
                root_cert: Some(root_cert.clone()),
            };
            builder = builder
                .set_client_to_redis_certificates(certs())
                .set_client_to_sentinel_certificates(certs());
        }
        if !data.username().is_empty() {
            builder = builder.set_client_to_redis_username(data.username());
        }
        if let Some(password) = data.password() {
            builder = builder.set_client_to_redis_password(decode(password));
        }
        if let Ok(db) = data.path().trim_start_matches('/').parse::<i64>() {
            builder = builder.set_client_to_redis_db(db);
        }
        if let Some((user, password)) = sentinel_auth {
            if !user.is_empty() {
                builder = builder.set_client_to_sentinel_username(user);
            }
            builder = builder.set_client_to_sentinel_password(password);
        }
        Ok(Target::Sentinel {
            client: Mutex::new(builder.build()?),
            master: config.sentinel.master.clone(),
        })
    }

    /// Connect now, every pub/sub message going to `push`: for Sentinel, to the current master
    /// (checked to call itself master); for a cluster, to its nodes.
    pub async fn connect(
        &self,
        push: impl AsyncPushSender,
        timeout: Duration,
    ) -> RedisResult<RedisConnection> {
        let client = match self {
            Target::Fixed(client) => client.clone(),
            Target::Sentinel { client, .. } => client.lock().await.async_get_client().await?,
            Target::Cluster {
                seeds,
                certificates,
            } => {
                let mut builder = ClusterClientBuilder::new(seeds.clone())
                    .use_protocol(ProtocolVersion::RESP3)
                    .push_sender(push)
                    .connection_timeout(timeout)
                    .response_timeout(timeout);
                if let Some(root_cert) = certificates {
                    builder = builder.certs(TlsCertificates {
                        client_tls: None,
                        root_cert: Some(root_cert.clone()),
                    });
                }
                let conn = builder.build()?.get_async_connection().await?;
                return Ok(RedisConnection::Cluster(conn));
            }
        };
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_push_sender(push);
        let conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        Ok(RedisConnection::Single(conn))
    }

    /// Whether this is a Redis Cluster (room channels are sharded there).
    pub fn is_cluster(&self) -> bool {
        matches!(self, Target::Cluster { .. })
    }

    /// Whether a connection must keep checking that its server is still the master.
    pub fn follows_failovers(&self) -> bool {
        matches!(self, Target::Sentinel { .. })
    }

    /// What the logs and `/readyz` call it, with no secret in it.
    pub fn describe(&self, config: &RedisConfig) -> String {
        match self {
            Target::Fixed(_) => redact(&config.url),
            Target::Cluster { .. } => format!("cluster via {}", hosts(&config.cluster)),
            Target::Sentinel { master, .. } => format!(
                "sentinel master {master:?} via {}",
                hosts(&config.sentinel.nodes)
            ),
        }
    }
}

/// Nodes as `host:port`, any `user:password@` left out.
fn hosts(nodes: &[String]) -> String {
    nodes
        .iter()
        .map(|n| n.rsplit('@').next().unwrap_or(n))
        .collect::<Vec<_>>()
        .join(",")
}

/// The cluster's seed nodes as URLs: each `host:port` with `redis.url`'s scheme and
/// credentials (unless the node has its own), and its TLS choice.
fn cluster_seeds(config: &RedisConfig) -> RedisResult<Vec<String>> {
    let data = url::Url::parse(&config.url).map_err(|e| invalid("redis.url", e.to_string()))?;
    let scheme = data.scheme();
    let auth = match (data.username(), data.password()) {
        ("", None) => String::new(),
        (user, None) => format!("{user}@"),
        (user, Some(password)) => format!("{user}:{password}@"),
    };
    let insecure = scheme == "rediss" && config.tls.insecure;
    Ok(config
        .cluster
        .iter()
        .map(|node| {
            let auth = if node.contains('@') {
                ""
            } else {
                auth.as_str()
            };
            let fragment = if insecure { "#insecure" } else { "" };
            format!("{scheme}://{auth}{node}{fragment}")
        })
        .collect())
}

fn ca_certificates(tls: bool, config: &RedisTlsConfig) -> RedisResult<Option<Vec<u8>>> {
    if !tls || config.ca_file.is_empty() || config.insecure {
        return Ok(None);
    }
    std::fs::read(&config.ca_file).map(Some).map_err(|e| {
        RedisError::from((
            ErrorKind::InvalidClientConfig,
            "redis.tls.ca_file cannot be read",
            format!("{}: {e}", config.ca_file),
        ))
    })
}

fn invalid(key: &'static str, detail: String) -> RedisError {
    RedisError::from((ErrorKind::InvalidClientConfig, key, detail))
}

/// A URL's password as typed before percent-encoding (`p%40ss` is `p@ss`).
fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// Hide a password in a URL before it reaches a log line or `/readyz`.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_hides_password_only() {
        assert_eq!(redact("redis://:secret@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(redact("redis://h:1"), "redis://h:1");
    }

    #[test]
    fn percent_encoded_passwords_are_decoded() {
        assert_eq!(decode("p%40ss"), "p@ss");
        assert_eq!(decode("plain+x"), "plain+x");
    }

    #[test]
    fn cluster_seeds_take_the_url_scheme_and_credentials() {
        let mut config = RedisConfig {
            url: "rediss://app:pw@ignored:6379".into(),
            ..RedisConfig::default()
        };
        config.cluster = vec!["10.0.0.1:7000".into(), "other:x@10.0.0.2:7001".into()];
        assert_eq!(
            cluster_seeds(&config).unwrap(),
            [
                "rediss://app:pw@10.0.0.1:7000",
                "rediss://other:x@10.0.0.2:7001"
            ]
        );
        let target = Target::new(&config).unwrap();
        assert!(target.is_cluster());
        assert_eq!(
            target.describe(&config),
            "cluster via 10.0.0.1:7000,10.0.0.2:7001"
        );
    }

    #[test]
    fn sentinel_nodes_are_never_shown_with_their_password() {
        let mut config = RedisConfig::default();
        config.sentinel.master = "mymaster".into();
        config.sentinel.nodes = vec!["user:pw@127.0.0.1:26379".into(), "127.0.0.1:26380".into()];
        let target = Target::new(&config).unwrap();
        assert!(target.follows_failovers());
        let text = target.describe(&config);
        assert_eq!(
            text,
            r#"sentinel master "mymaster" via 127.0.0.1:26379,127.0.0.1:26380"#
        );
    }
}
