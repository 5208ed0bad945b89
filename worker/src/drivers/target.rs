//! Where the Redis link connects: one server named by `redis.url`, or whichever server Redis
//! Sentinel names master at the moment of connecting (`redis.sentinel`), so that every
//! reconnection after a failover lands on the new master.

use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{ConnectionAddr, ErrorKind, ProtocolVersion, RedisError, RedisResult, TlsCertificates};
use shared::config::{RedisConfig, RedisTlsConfig};
use tokio::sync::Mutex;

/// The server (or servers) the link may connect to.
pub enum Target {
    /// `redis.url`.
    Fixed(redis::Client),
    /// The master the sentinels name.
    Sentinel {
        client: Mutex<SentinelClient>,
        master: String,
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

    /// A client for the server to connect to now: for Sentinel, the current master (checked
    /// to call itself master).
    pub async fn client(&self) -> RedisResult<redis::Client> {
        match self {
            Target::Fixed(client) => Ok(client.clone()),
            Target::Sentinel { client, .. } => client.lock().await.async_get_client().await,
        }
    }

    /// Whether a connection must keep checking that its server is still the master.
    pub fn follows_failovers(&self) -> bool {
        matches!(self, Target::Sentinel { .. })
    }

    /// What the logs and `/readyz` call it, with no secret in it.
    pub fn describe(&self, config: &RedisConfig) -> String {
        match self {
            Target::Fixed(_) => redact(&config.url),
            Target::Sentinel { master, .. } => format!(
                "sentinel master {master:?} via {}",
                config
                    .sentinel
                    .nodes
                    .iter()
                    .map(|n| n.rsplit('@').next().unwrap_or(n))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        }
    }
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
