//! The `api:` section: the server API for the app's backend.

use serde::Deserialize;

/// `api:` section.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Where the balancer serves the API (`127.0.0.1:9300`); empty (default): off. Workers
    /// serve it under `/api/` on their own port whenever `key` is set.
    pub listen: String,
    /// The key callers send as `Authorization: Bearer <key>`, at least 16 bytes; or env
    /// `FLEET_API_KEY`. Required when `listen` is set.
    pub key: String,
}

impl ApiConfig {
    /// The balancer's API address, when on.
    pub fn listen_addr(&self) -> Option<std::net::SocketAddr> {
        self.listen.parse().ok()
    }
}
