//! Environment overrides of a few keys, for containers that mount one fleet file everywhere
//! and for secrets kept out of it: `FLEET_LISTEN`, `FLEET_METRICS_LISTEN`, `FLEET_REDIS_URL`,
//! `FLEET_WORKERS_HOST`, `FLEET_STICKY_SECRET`, `FLEET_JWT_SECRET`, `FLEET_API_KEY`.

use std::net::SocketAddr;

use super::{ConfigError, FleetConfig, validate_host_port, validate_redis_url};

impl FleetConfig {
    /// Overrides from the environment, for containers that mount one fleet file everywhere:
    /// `FLEET_LISTEN`, `FLEET_METRICS_LISTEN`, `FLEET_REDIS_URL` and `FLEET_WORKERS_HOST`
    /// (e.g. `0.0.0.0`, so workers in a container are reachable from outside it); and the two
    /// secrets, `FLEET_REDIS_URL` (it may carry a password), `FLEET_STICKY_SECRET`,
    /// `FLEET_JWT_SECRET` and `FLEET_API_KEY`, so they
    /// can come from a Kubernetes Secret instead of a ConfigMap.
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
            // Checked as a host of `host:port`, the form it is used in.
            validate_host_port(&format!("{v}:1")).map_err(|m| bad("FLEET_WORKERS_HOST", m))?;
            self.workers.host = v;
        }
        if let Some(v) = var("FLEET_STICKY_SECRET") {
            // The same rule as the key's (validate.rs): an empty secret signs nothing.
            if v.is_empty() {
                return Err(bad("FLEET_STICKY_SECRET", "must not be empty".into()));
            }
            self.balancer.sticky_secret = v;
        }
        if let Some(v) = var("FLEET_JWT_SECRET") {
            // The same rule as the key's (validate.rs).
            if v.len() < 32 {
                return Err(bad("FLEET_JWT_SECRET", "must be at least 32 bytes".into()));
            }
            self.auth.jwt.hs256_secret = v;
        }
        if let Some(v) = var("FLEET_API_KEY") {
            // The same rule as the key's (validate.rs).
            if v.len() < 16 {
                return Err(bad("FLEET_API_KEY", "must be at least 16 bytes".into()));
            }
            self.api.key = v;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn every_bad_override_names_its_variable_and_changes_nothing() {
        for (name, value, why) in [
            ("FLEET_LISTEN", "8080", "invalid socket address"),
            (
                "FLEET_METRICS_LISTEN",
                "localhost:9100",
                "invalid socket address",
            ),
            (
                "FLEET_REDIS_URL",
                "http://redis:6379",
                "scheme must be redis://",
            ),
            ("FLEET_WORKERS_HOST", "", "has no host"),
            ("FLEET_STICKY_SECRET", "", "must not be empty"),
        ] {
            let mut cfg = FleetConfig::default();
            let err = cfg
                .apply_env(|k| (k == name).then(|| value.to_owned()))
                .unwrap_err();
            assert_eq!(err.key, Some(format!("env {name}")), "{err}");
            assert_eq!((err.file.as_ref(), err.line), (None, None), "{err}");
            assert!(err.message.contains(why), "{name}: {err}");
            assert!(
                err.to_string().starts_with(&format!("key `env {name}`: ")),
                "{err}"
            );
            assert_eq!(cfg, FleetConfig::default(), "{name}");
        }
    }

    #[test]
    fn metrics_listen_override() {
        let mut cfg = FleetConfig::default();
        cfg.apply_env(|k| (k == "FLEET_METRICS_LISTEN").then(|| "127.0.0.1:9200".to_owned()))
            .unwrap();
        assert_eq!(cfg.metrics_listen.to_string(), "127.0.0.1:9200");
    }

    #[test]
    fn sticky_secret_override() {
        let mut cfg =
            FleetConfig::from_yaml_str("balancer:\n  sticky_secret: in-the-file\n").unwrap();
        cfg.apply_env(|k| (k == "FLEET_STICKY_SECRET").then(|| "from-a-secret".to_owned()))
            .unwrap();
        assert_eq!(cfg.balancer.sticky_secret, "from-a-secret");
    }
}
