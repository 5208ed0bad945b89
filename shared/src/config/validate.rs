//! The checks serde cannot make: ranges and relations between keys, one function per section,
//! run in file order. Each refusal is `(dotted key, message)`; the caller adds the line.

use super::{
    AuthConfig, AuthMode, BalancerConfig, CorsConfig, FleetConfig, MAX_WORKERS, RedisConfig,
    SocketIoConfig, WorkersConfig,
};

/// The key refused and why.
pub(super) type Refusal = (&'static str, String);

impl FleetConfig {
    /// Check the values serde cannot: ranges and relations between keys. The first refusal
    /// wins.
    pub(super) fn validate(&self) -> Result<(), Refusal> {
        workers(&self.workers)?;
        worker_sources(&self.workers)?;
        balancer(&self.balancer)?;
        redis(&self.redis)?;
        socketio(&self.socketio)?;
        auth(&self.auth)?;
        if !self.api.listen.is_empty() && self.api.listen_addr().is_none() {
            return Err((
                "api.listen",
                format!(
                    "must be an address like 127.0.0.1:9300, got {:?}",
                    self.api.listen
                ),
            ));
        }
        Ok(())
    }

    /// The checks that need the secrets, which the environment may supply after the file was
    /// read (`FLEET_JWT_SECRET`): run once the overrides are applied.
    pub fn validate_secrets(&self) -> Result<(), Refusal> {
        let jwt = &self.auth.jwt;
        if self.auth.mode == AuthMode::Jwt
            && jwt.hs256_secret.is_empty() == jwt.public_key_file.is_empty()
        {
            return Err((
                "auth.mode",
                "jwt needs exactly one key: auth.jwt.hs256_secret (or env FLEET_JWT_SECRET) or auth.jwt.public_key_file".into(),
            ));
        }
        if !self.api.listen.is_empty() && self.api.key.is_empty() {
            return Err((
                "api.listen",
                "the API needs a key: api.key, or env FLEET_API_KEY".into(),
            ));
        }
        if !self.api.key.is_empty() && self.api.key.len() < 16 {
            return Err(("api.key", "must be at least 16 bytes".into()));
        }
        Ok(())
    }
}

/// Count, ports, host and limits of the workers.
fn workers(w: &WorkersConfig) -> Result<(), Refusal> {
    if !(1..=MAX_WORKERS).contains(&w.count) {
        return Err((
            "workers.count",
            format!("must be 1 to {MAX_WORKERS}, got {}", w.count),
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
    Ok(())
}

/// Where the workers come from: a list, a DNS name, or a command to spawn.
fn worker_sources(w: &WorkersConfig) -> Result<(), Refusal> {
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
    Ok(())
}

/// `trusted_proxies` needs no check here: each entry was parsed into an `IpNetwork`.
fn balancer(b: &BalancerConfig) -> Result<(), Refusal> {
    // Written so that NaN is refused too.
    if !(b.load_factor >= 1.0 && b.load_factor <= 100.0) {
        return Err((
            "balancer.load_factor",
            format!("must be 1.0 to 100, got {}", b.load_factor),
        ));
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
    if let Some(bad) = b.forward_paths.iter().find(|p| !p.starts_with('/')) {
        return Err((
            "balancer.forward_paths",
            format!("each must be a path prefix starting with /, got {bad:?}"),
        ));
    }
    // pingora itself refuses heads over 1 MiB.
    if !(1024..=1024 * 1024).contains(&b.max_header_bytes) {
        return Err((
            "balancer.max_header_bytes",
            "must be 1024 to 1048576".into(),
        ));
    }
    match (b.tls.cert_file.is_empty(), b.tls.key_file.is_empty()) {
        (false, true) => {
            return Err((
                "balancer.tls.key_file",
                "must be set with balancer.tls.cert_file".into(),
            ));
        }
        (true, false) => {
            return Err((
                "balancer.tls.cert_file",
                "must be set with balancer.tls.key_file".into(),
            ));
        }
        _ => {}
    }
    Ok(())
}

fn redis(r: &RedisConfig) -> Result<(), Refusal> {
    validate_redis_url(&r.url).map_err(|m| ("redis.url", m))?;
    // The Redis adapter's channels are `{prefix}-request#{namespace}#`: '#' is its separator.
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
    if r.sentinel.is_set() {
        if r.sentinel.master.is_empty() {
            return Err((
                "redis.sentinel.master",
                "names the master the sentinels monitor; it must be set with redis.sentinel.nodes"
                    .into(),
            ));
        }
        if r.sentinel.nodes.is_empty() {
            return Err((
                "redis.sentinel.nodes",
                "must list at least one sentinel (host:port)".into(),
            ));
        }
        for node in &r.sentinel.nodes {
            validate_node(node).map_err(|m| ("redis.sentinel.nodes", m))?;
        }
    }
    if !r.cluster.is_empty() {
        if r.sentinel.is_set() {
            return Err((
                "redis.cluster",
                "a Redis Cluster has no sentinels: set redis.cluster or redis.sentinel, not both"
                    .into(),
            ));
        }
        for node in &r.cluster {
            validate_node(node).map_err(|m| ("redis.cluster", m))?;
        }
    }
    Ok(())
}

/// A node of a sentinel or cluster list: `host:port`, optionally `user:password@` before.
fn validate_node(node: &str) -> Result<(), String> {
    let url = url::Url::parse(&format!("redis://{node}"))
        .map_err(|e| format!("{node:?} is not host:port ({e})"))?;
    if url.host_str().is_none_or(str::is_empty) || url.port().is_none() || url.path().len() > 1 {
        return Err(format!("{node:?} is not host:port"));
    }
    Ok(())
}

fn socketio(s: &SocketIoConfig) -> Result<(), Refusal> {
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
    cors(&s.cors)
}

fn cors(c: &CorsConfig) -> Result<(), Refusal> {
    let any = c.origins.iter().any(|o| o == "*");
    if any && c.origins.len() > 1 {
        return Err((
            "socketio.cors.origins",
            r#"give either ["*"] or a list of origins, not both"#.into(),
        ));
    }
    if any && c.credentials {
        return Err((
            "socketio.cors.credentials",
            r#"cannot be true with origins ["*"]: browsers refuse credentials for any origin; list the origins"#.into(),
        ));
    }
    for origin in c.origins.iter().filter(|o| *o != "*") {
        validate_origin(origin).map_err(|m| ("socketio.cors.origins", m))?;
    }
    Ok(())
}

/// A web origin as browsers send it: `scheme://host[:port]`, lowercase, nothing after.
///
/// # Errors
/// What is wrong, quoting `s`.
pub fn validate_origin(s: &str) -> Result<(), String> {
    let bad = |why: &str| {
        Err(format!(
            "{s:?} is not an origin like https://app.example.com: {why}"
        ))
    };
    let Some((scheme, rest)) = s.split_once("://") else {
        return bad("no scheme");
    };
    if scheme != "http" && scheme != "https" {
        return bad("the scheme must be http or https");
    }
    if rest.is_empty() {
        return bad("no host");
    }
    if rest.contains(['/', '?', '#', '@', ' ']) {
        return bad("nothing may follow the host and port, not even a /");
    }
    if s.chars().any(|c| c.is_ascii_uppercase()) {
        return bad("browsers send origins in lowercase");
    }
    Ok(())
}

fn auth(a: &AuthConfig) -> Result<(), Refusal> {
    if a.mode == AuthMode::Proxy {
        let url = url::Url::parse(&a.proxy.url).map_err(|e| {
            (
                "auth.proxy.url",
                format!(
                    "mode proxy needs the backend's URL ({e}): {:?}",
                    a.proxy.url
                ),
            )
        })?;
        if url.scheme() != "http" {
            return Err((
                "auth.proxy.url",
                format!("must be an http:// URL, got {:?}", a.proxy.url),
            ));
        }
    }
    if !(1..=60_000).contains(&a.proxy.timeout_ms) {
        return Err(("auth.proxy.timeout_ms", "must be 1 to 60000".into()));
    }
    if !a.jwt.hs256_secret.is_empty() && a.jwt.hs256_secret.len() < 32 {
        return Err((
            "auth.jwt.hs256_secret",
            "must be at least 32 bytes: a short HS256 secret can be guessed offline from one token"
                .into(),
        ));
    }
    if a.jwt.leeway_secs > 3600 {
        return Err(("auth.jwt.leeway_secs", "must be at most 3600".into()));
    }
    Ok(())
}

/// `host:port` with a non-empty host and a port from 1 to 65535.
///
/// # Errors
/// What is wrong, quoting `s`.
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

/// Accept `redis://`, `rediss://`, `redis+unix://` and `unix://` URLs with a host or path.
///
/// # Errors
/// What is wrong, quoting `raw`.
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

#[cfg(test)]
mod tests {
    use super::super::{FleetConfig, GOOD};

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
    fn edge_keys_parse_and_are_checked() {
        let ok = FleetConfig::from_yaml_str(
            "balancer:\n  tls: {cert_file: c.pem, key_file: k.pem}\n  limits: {connections_per_ip: 50, handshakes_per_ip_per_sec: 10}\n  health_check: engineio\nsocketio:\n  limits: {events_per_sec: 20, max_rooms_per_socket: 5}\n",
        )
        .unwrap();
        assert!(ok.balancer.tls.enabled());
        assert_eq!(ok.balancer.limits.connections_per_ip, 50);
        assert_eq!(ok.balancer.limits.handshakes_per_ip_per_sec, 10);
        assert_eq!(
            ok.balancer.health_check,
            super::super::HealthCheck::Engineio
        );
        assert_eq!(ok.socketio.limits.events_per_sec, 20);
        assert_eq!(ok.socketio.limits.max_rooms_per_socket, 5);
        assert!(!FleetConfig::default().balancer.tls.enabled());
        for (yaml, key) in [
            (
                "balancer:\n  tls: {cert_file: c.pem}\n",
                "balancer.tls.key_file",
            ),
            (
                "balancer:\n  tls: {key_file: k.pem}\n",
                "balancer.tls.cert_file",
            ),
            ("balancer:\n  health_check: tcp\n", "balancer.health_check"),
            (
                "balancer:\n  limits: {per_ip: 3}\n",
                "balancer.limits.per_ip",
            ),
        ] {
            let err = FleetConfig::from_yaml_str(yaml).unwrap_err();
            assert_eq!(err.key.as_deref(), Some(key), "{yaml}: {err}");
        }
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
    fn sentinel_and_cluster_are_checked() {
        let ok = FleetConfig::from_yaml_str(
            "redis:\n  sentinel: {master: mymaster, nodes: [\"10.0.0.1:26379\", \"u:p@10.0.0.2:26379\"]}\n",
        )
        .unwrap();
        assert_eq!(ok.redis.sentinel.nodes.len(), 2);
        for (yaml, key) in [
            (
                "redis:\n  sentinel: {nodes: [\"h:1\"]}\n",
                "redis.sentinel.master",
            ),
            ("redis:\n  sentinel: {master: m}\n", "redis.sentinel.nodes"),
            (
                "redis:\n  sentinel: {master: m, nodes: [h]}\n",
                "redis.sentinel.nodes",
            ),
            (
                "redis:\n  sentinel: {master: m, nodes: [\"h:1/0\"]}\n",
                "redis.sentinel.nodes",
            ),
            (
                "redis:\n  cluster: [\"h:1\"]\n  sentinel: {master: m, nodes: [\"h:2\"]}\n",
                "redis.cluster",
            ),
            ("redis:\n  cluster: [\"no port\"]\n", "redis.cluster"),
        ] {
            let err = FleetConfig::from_yaml_str(yaml).unwrap_err();
            assert_eq!(err.key.as_deref(), Some(key), "{yaml}: {err}");
        }
    }

    #[test]
    fn flow_style_range_error_has_a_line() {
        let text = "listen: 0.0.0.0:8080\nbalancer: {placement: random, load_factor: 0.5}\n";
        let err = FleetConfig::from_yaml_str(text).unwrap_err();
        assert_eq!(
            (err.key.as_deref(), err.line),
            (Some("balancer.load_factor"), Some(2)),
            "{err}"
        );
        assert_eq!(err.message, "must be 1.0 to 100, got 0.5");
        let err =
            FleetConfig::from_yaml_str("workers: {count: 2, base_port: 65535}\n").unwrap_err();
        assert_eq!(
            (err.key.as_deref(), err.line),
            (Some("workers.base_port"), Some(1))
        );
    }
}
