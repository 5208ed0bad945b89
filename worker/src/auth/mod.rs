//! Who may connect (`auth:`), and what each socket may do (`rooms:`): checked once per
//! connection, in the namespace's connect middleware, never per message.
//!
//! - [`expiry`]: sockets disconnected when their credentials expire.
//! - [`grant`]: a socket's permissions and room patterns; `user:<id>` rooms.
//! - [`jwt`]: `mode: jwt`, one key, one algorithm.
//! - [`proxy`]: `mode: proxy`, the app's backend asked over HTTP.
//!
//! A refused client gets a CONNECT error `{"message": "unauthorized", "data": {"reason"}}`
//! and nothing else about its credentials.

pub mod expiry;
pub mod grant;
pub mod jwt;
pub mod proxy;

use std::fmt;
use std::net::SocketAddr;

use serde_json::Value;
use shared::config::{AuthConfig, AuthMode, RoomsConfig};
use socketioxide::TransportType;

use crate::fleet::Socket;
pub use expiry::Expiry;
pub use grant::{Grant, Rooms, user_room};

/// How an authentication ended: the `result` label of `fleet_worker_auth_total`, and the
/// `reason` a refused client is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Admitted.
    Ok,
    /// No credentials where some are needed.
    Missing,
    /// Credentials that do not verify (bad signature, algorithm, claims; a backend's 401).
    Invalid,
    /// Credentials past their expiry.
    Expired,
    /// Credentials fine, access refused (a backend's 403).
    Forbidden,
    /// The backend could not be asked (down, slow, or an unreadable answer).
    Unavailable,
}

impl Outcome {
    /// Every outcome.
    pub const ALL: [Outcome; 6] = [
        Outcome::Ok,
        Outcome::Missing,
        Outcome::Invalid,
        Outcome::Expired,
        Outcome::Forbidden,
        Outcome::Unavailable,
    ];

    /// The label value and reason.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Missing => "missing",
            Outcome::Invalid => "invalid",
            Outcome::Expired => "expired",
            Outcome::Forbidden => "forbidden",
            Outcome::Unavailable => "unavailable",
        }
    }
}

/// A refused connection, as the connect middleware's error: its `Display` is the CONNECT
/// error payload (sent as is: see vendor/socketioxide-parser-common/FLEET-PATCH.md).
#[derive(Debug)]
pub struct Refused(Refusal);

#[derive(Debug)]
enum Refusal {
    /// By the fleet's authentication: `unauthorized`, with the reason.
    Auth(Outcome),
    /// By the app's own check: its message.
    App(String),
}

impl Refused {
    /// Refused by authentication.
    pub fn auth(outcome: Outcome) -> Self {
        Refused(Refusal::Auth(outcome))
    }

    /// Refused by the app ([`crate::App::admit`]), with its message.
    pub fn app(message: String) -> Self {
        Refused(Refusal::App(message))
    }
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Refusal::Auth(o) => write!(
                f,
                r#"{{"message":"unauthorized","data":{{"reason":"{}"}}}}"#,
                o.as_str()
            ),
            Refusal::App(message) => {
                write!(f, "{}", serde_json::json!({ "message": message }))
            }
        }
    }
}

/// The connection-time check of one worker.
pub struct Gate {
    how: How,
    client_publish: bool,
}

enum How {
    Anyone,
    Jwt(Box<jwt::Verifier>),
    Proxy(proxy::Backend),
}

impl Gate {
    /// The gate `auth` and `rooms` describe.
    ///
    /// # Errors
    /// The JWT key or the backend URL is unusable.
    pub fn new(auth: &AuthConfig, rooms: &RoomsConfig) -> Result<Self, String> {
        let how = match auth.mode {
            AuthMode::None => How::Anyone,
            AuthMode::Jwt => How::Jwt(Box::new(jwt::Verifier::new(&auth.jwt)?)),
            AuthMode::Proxy => How::Proxy(proxy::Backend::new(&auth.proxy)?),
        };
        Ok(Gate {
            how,
            client_publish: rooms.client_publish,
        })
    }

    /// Whether anyone may connect (`auth.mode: none`).
    pub fn is_open(&self) -> bool {
        matches!(self.how, How::Anyone)
    }

    /// The grant of a connecting socket, from its CONNECT payload and handshake.
    ///
    /// # Errors
    /// Why it is refused.
    pub async fn admit(&self, socket: &Socket, payload: Option<&Value>) -> Result<Grant, Outcome> {
        let mut grant = match &self.how {
            How::Anyone => Grant::anonymous(),
            How::Jwt(verifier) => {
                let token = token(payload, socket.req_parts()).ok_or(Outcome::Missing)?;
                verifier.verify(&token)?
            }
            How::Proxy(backend) => {
                let parts = socket.req_parts();
                let headers = parts
                    .headers
                    .iter()
                    .filter_map(|(k, v)| Some((k.to_string(), Value::from(v.to_str().ok()?))))
                    .collect();
                let question = proxy::Question {
                    auth: payload.unwrap_or(&Value::Null),
                    headers,
                    address: address(parts),
                    transport: match socket.transport_type() {
                        TransportType::Polling => "polling",
                        TransportType::Websocket => "websocket",
                    },
                };
                backend.ask(&question).await?
            }
        };
        if !self.client_publish {
            grant.publish = Rooms::default();
        }
        // Credentials already past their end (a backend's `exp` in the past) are not admitted.
        if grant
            .expires
            .is_some_and(|exp| exp <= shared::unix_micros() / 1_000_000)
        {
            return Err(Outcome::Expired);
        }
        Ok(grant)
    }
}

/// The token: `auth: {token}` in the CONNECT payload, else `Authorization: Bearer` on the
/// handshake.
fn token(payload: Option<&Value>, parts: &http::request::Parts) -> Option<String> {
    if let Some(t) = payload.and_then(|p| p.get("token")).and_then(Value::as_str) {
        return (!t.is_empty()).then(|| t.to_owned());
    }
    let header = parts
        .headers
        .get(http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, t) = header.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !t.trim().is_empty()).then(|| t.trim().to_owned())
}

/// The client's address: as the balancer judged it ([`shared::protocol::CLIENT_IP_HEADER`]),
/// else the TCP peer (a client straight on the worker).
fn address(parts: &http::request::Parts) -> String {
    if let Some(ip) = parts
        .headers
        .get(shared::protocol::CLIENT_IP_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        return ip.to_owned();
    }
    parts
        .extensions
        .get::<PeerAddr>()
        .map(|p| p.0.ip().to_string())
        .unwrap_or_default()
}

/// The TCP peer of a request's connection (a request extension).
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_say_the_reason_and_nothing_else() {
        assert_eq!(
            Refused::auth(Outcome::Expired).to_string(),
            r#"{"message":"unauthorized","data":{"reason":"expired"}}"#
        );
        for o in Outcome::ALL {
            let v: Value = serde_json::from_str(&Refused::auth(o).to_string()).unwrap();
            assert_eq!(v["data"]["reason"], o.as_str());
        }
        let v: Value =
            serde_json::from_str(&Refused::app("admins \"only\"".into()).to_string()).unwrap();
        assert_eq!(v, serde_json::json!({"message": "admins \"only\""}));
    }

    #[test]
    fn the_token_comes_from_the_payload_or_a_bearer_header() {
        let parts = |auth: Option<&str>| {
            let mut b = http::Request::get("/");
            if let Some(a) = auth {
                b = b.header("authorization", a);
            }
            b.body(()).unwrap().into_parts().0
        };
        let payload = serde_json::json!({"token": "abc"});
        assert_eq!(
            token(Some(&payload), &parts(Some("Bearer xyz"))).as_deref(),
            Some("abc")
        );
        assert_eq!(
            token(None, &parts(Some("Bearer xyz"))).as_deref(),
            Some("xyz")
        );
        assert_eq!(
            token(None, &parts(Some("bearer  xyz "))).as_deref(),
            Some("xyz")
        );
        assert_eq!(token(None, &parts(Some("Basic xyz"))), None);
        assert_eq!(
            token(Some(&serde_json::json!({"token": ""})), &parts(None)),
            None
        );
        assert_eq!(
            token(Some(&serde_json::json!({"token": 3})), &parts(None)),
            None
        );
        assert_eq!(token(None, &parts(None)), None);
    }
}
