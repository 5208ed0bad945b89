//! `auth.mode: proxy`: the app's backend decides. The worker POSTs what the client sent
//! (`{auth, headers, address, transport}`) to `auth.proxy.url`; `200 {user, rooms, publish}`
//! admits, `401` / `403` refuse, anything else (down, slow, garbage) refuses as `unavailable`:
//! a client is never admitted because the backend could not be asked.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use shared::config::ProxyAuthConfig;
use tokio::net::TcpStream;

use super::Outcome;
use super::grant::{Grant, Rooms};

/// The largest answer read from the backend.
const MAX_ANSWER: usize = 64 * 1024;

/// What the backend is asked.
#[derive(Serialize)]
pub struct Question<'a> {
    /// The CONNECT auth payload, as the client sent it (`null` when none).
    pub auth: &'a Value,
    /// The handshake's headers (cookies included: the backend may use its own sessions).
    pub headers: serde_json::Map<String, Value>,
    /// The client's address (the last `X-Forwarded-For` hop, which the balancer adds; else the
    /// TCP peer).
    pub address: String,
    /// `polling` or `websocket`.
    pub transport: &'a str,
}

/// What an admitting backend answers.
#[derive(Deserialize)]
struct Admitted {
    user: String,
    #[serde(default)]
    rooms: Rooms,
    #[serde(default)]
    publish: Rooms,
    /// When the admission ends (Unix seconds), if it does.
    #[serde(default)]
    exp: Option<u64>,
}

/// The backend.
pub struct Backend {
    authority: String,
    path: String,
    timeout: Duration,
}

impl Backend {
    /// The backend `cfg` names.
    ///
    /// # Errors
    /// The URL is not `http://host[:port]/path`.
    pub fn new(cfg: &ProxyAuthConfig) -> Result<Self, String> {
        let url = url::Url::parse(&cfg.url).map_err(|e| format!("auth.proxy.url: {e}"))?;
        let host = url.host_str().ok_or("auth.proxy.url: no host")?.to_owned();
        let port = url.port_or_known_default().unwrap_or(80);
        let mut path = url.path().to_owned();
        if let Some(q) = url.query() {
            path = format!("{path}?{q}");
        }
        Ok(Backend {
            authority: format!("{host}:{port}"),
            path,
            timeout: Duration::from_millis(cfg.timeout_ms),
        })
    }

    /// Asks the backend about one client.
    ///
    /// # Errors
    /// `Invalid` on a 401, `Forbidden` on a 403, `Unavailable` otherwise.
    pub async fn ask(&self, question: &Question<'_>) -> Result<Grant, Outcome> {
        let body = serde_json::to_vec(question).map_err(|_| Outcome::Unavailable)?;
        let answer = tokio::time::timeout(self.timeout, self.post(body))
            .await
            .map_err(|_| {
                tracing::warn!(backend = %self.authority, "auth backend: no answer within {:?}", self.timeout);
                Outcome::Unavailable
            })?
            .map_err(|e| {
                tracing::warn!(backend = %self.authority, "auth backend: {e}");
                Outcome::Unavailable
            })?;
        match answer {
            (StatusCode::OK, body) => {
                let unreadable = |e: serde_json::Error| {
                    tracing::warn!(backend = %self.authority, "auth backend: unreadable 200 answer: {e}");
                    Outcome::Unavailable
                };
                let raw: Value = serde_json::from_slice(&body).map_err(unreadable)?;
                let admitted = Admitted::deserialize(&raw).map_err(unreadable)?;
                if admitted.user.is_empty() {
                    return Err(Outcome::Unavailable);
                }
                Ok(Grant {
                    user: Some(admitted.user),
                    rooms: admitted.rooms,
                    publish: admitted.publish,
                    expires: admitted.exp,
                    claims: raw,
                })
            }
            (StatusCode::UNAUTHORIZED, _) => Err(Outcome::Invalid),
            (StatusCode::FORBIDDEN, _) => Err(Outcome::Forbidden),
            (status, _) => {
                tracing::warn!(backend = %self.authority, %status, "auth backend: unexpected answer");
                Err(Outcome::Unavailable)
            }
        }
    }

    async fn post(&self, body: Vec<u8>) -> Result<(StatusCode, Bytes), String> {
        let stream = TcpStream::connect(&self.authority)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = Request::post(&self.path)
            .header(header::HOST, &self.authority)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONNECTION, "close")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        Ok((status, body))
    }
}
