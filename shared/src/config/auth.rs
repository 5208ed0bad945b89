//! The `auth:` and `rooms:` sections: who may connect, and what a client may do with rooms.

use serde::Deserialize;

/// `auth:` section.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// How clients are authenticated. Default `none`: anyone may connect, join and publish
    /// any room (said in the log at start).
    pub mode: AuthMode,
    /// `mode: jwt`.
    pub jwt: JwtConfig,
    /// `mode: proxy`.
    pub proxy: ProxyAuthConfig,
}

/// `auth.mode`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// No authentication.
    #[default]
    None,
    /// A JSON Web Token in the CONNECT auth payload (`{token}`) or `Authorization: Bearer`.
    Jwt,
    /// The app's backend decides: the worker POSTs what the client sent to `auth.proxy.url`.
    Proxy,
}

/// `auth.jwt`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct JwtConfig {
    /// HS256 shared secret; or env `FLEET_JWT_SECRET`. Give this or `public_key_file`.
    pub hs256_secret: String,
    /// A PEM public key: RS256, ES256 or EdDSA, the algorithm fixed by the key (`alg: none`
    /// and any other algorithm are refused).
    pub public_key_file: String,
    /// The `iss` claim required, when set.
    pub issuer: String,
    /// The `aud` claim required, when set.
    pub audience: String,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds. Default 30.
    pub leeway_secs: u64,
}

impl Default for JwtConfig {
    fn default() -> Self {
        JwtConfig {
            hs256_secret: String::new(),
            public_key_file: String::new(),
            issuer: String::new(),
            audience: String::new(),
            leeway_secs: 30,
        }
    }
}

/// `auth.proxy`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyAuthConfig {
    /// The app's backend: `POST {auth, headers, address, transport}` answered `200 {user,
    /// rooms, publish}` to admit, `401`/`403 {message}` to refuse.
    pub url: String,
    /// How long the backend may take, in milliseconds; past it (or if it is down) the client
    /// is refused `unavailable`, never admitted. Default 2000.
    pub timeout_ms: u64,
}

impl Default for ProxyAuthConfig {
    fn default() -> Self {
        ProxyAuthConfig {
            url: String::new(),
            timeout_ms: 2000,
        }
    }
}

/// `rooms:` section.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RoomsConfig {
    /// Clients may publish (within their `publish` claims). Default true; false: only the
    /// server API publishes, clients join and receive.
    pub client_publish: bool,
}

impl Default for RoomsConfig {
    fn default() -> Self {
        RoomsConfig {
            client_publish: true,
        }
    }
}
