//! The server API on a worker's port, under `/api/`, when `api.key` is set: what the app's
//! backend uses, directly or through the balancer (whose API asks every worker this same API
//! and adds the answers up).
//!
//! - `POST /api/publish` `{"room" | "rooms", "data"}`: a room broadcast, as a client publish
//!   (event `message` `{"room", "data"}` to every member on every worker, once).
//! - `GET /api/rooms/<room>`, `POST /api/disconnect`, `GET /api/info`: this worker's part of
//!   the fleet (its members, its sockets, its state).

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::{Value, json};
use shared::api::{self, Endpoint};
use shared::protocol::EV_MESSAGE;
use socketioxide::socket::Sid;

use crate::app::room_arg;
use crate::auth::user_room;
use crate::fleet::Fleet;
use crate::health::Readiness;
use crate::http::Body;
use crate::metrics::WorkerMetrics;

/// The most rooms one publish may name.
const MAX_ROOMS: usize = 1000;

/// What the API needs of the worker.
pub struct Api {
    key: String,
    fleet: Fleet,
    readiness: Readiness,
    metrics: WorkerMetrics,
}

impl Api {
    /// The API under `key`; `None` (no API) when the key is empty.
    pub fn new(
        key: &str,
        fleet: Fleet,
        readiness: Readiness,
        metrics: WorkerMetrics,
    ) -> Option<Self> {
        (!key.is_empty()).then(|| Api {
            key: key.to_owned(),
            fleet,
            readiness,
            metrics,
        })
    }

    /// Answers one `/api/` request.
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let auth = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        if !api::authorized(auth, &self.key) {
            return error(StatusCode::UNAUTHORIZED, "unauthorized");
        }
        let Some(endpoint) = Endpoint::parse(req.uri().path()) else {
            return error(StatusCode::NOT_FOUND, "no such endpoint");
        };
        if req.method().as_str() != endpoint.method() {
            return error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
        }
        let body = if *req.method() == Method::POST {
            match Limited::new(req.into_body(), api::MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                    return error(StatusCode::PAYLOAD_TOO_LARGE, "body over 1 MB");
                }
                Err(_) => return error(StatusCode::BAD_REQUEST, "body unreadable"),
            }
        } else {
            Bytes::new()
        };
        let result = match endpoint {
            Endpoint::Publish => self.publish(&body).await,
            Endpoint::Rooms(room) => Ok(self.room(&room)),
            Endpoint::Disconnect => self.disconnect(&body),
            Endpoint::Info => Ok(self.info()),
        };
        match result {
            Ok(value) => reply(StatusCode::OK, &value),
            Err(why) => error(StatusCode::BAD_REQUEST, &why),
        }
    }

    async fn publish(&self, body: &[u8]) -> Result<Value, String> {
        let mut req: serde_json::Map<String, Value> =
            serde_json::from_slice(body).map_err(|e| format!("body is not a JSON object: {e}"))?;
        let data = req.remove("data").ok_or("missing data")?;
        let rooms = match (req.remove("room"), req.remove("rooms")) {
            (Some(room), None) => vec![room_arg(Some(room))?],
            (None, Some(Value::Array(rooms))) if !rooms.is_empty() && rooms.len() <= MAX_ROOMS => {
                rooms
                    .into_iter()
                    .map(|r| room_arg(Some(r)))
                    .collect::<Result<_, _>>()?
            }
            (None, Some(_)) => {
                return Err(format!("rooms must be a list of 1 to {MAX_ROOMS} rooms"));
            }
            _ => return Err("give room or rooms".into()),
        };
        if let Some(extra) = req.keys().next() {
            return Err(format!("unknown field {extra:?}"));
        }
        let mut dropped = 0;
        for room in rooms {
            let message = json!({ "room": room, "data": data });
            dropped += self
                .fleet
                .publish(room, EV_MESSAGE, &message)
                .await
                .map_err(|e| format!("broadcast failed: {e}"))?;
        }
        Ok(json!({ "ok": true, "dropped": dropped }))
    }

    /// This worker's members of `room`.
    fn room(&self, room: &str) -> Value {
        let members: Vec<Value> = self
            .fleet
            .io()
            .local()
            .within(room.to_owned())
            .sockets()
            .iter()
            .map(|s| {
                json!({
                    "sid": s.id.to_string(),
                    "user": Fleet::grant(s).user,
                    "worker": self.fleet.worker_id(),
                })
            })
            .collect();
        json!({ "room": room, "count": members.len(), "members": members })
    }

    /// Disconnects this worker's sockets of a user, or one socket.
    fn disconnect(&self, body: &[u8]) -> Result<Value, String> {
        let req: Value =
            serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
        let io = self.fleet.io();
        let sockets = match (req.get("user"), req.get("sid")) {
            (Some(Value::String(user)), None) if !user.is_empty() => {
                io.local().within(user_room(user)).sockets()
            }
            (None, Some(Value::String(sid))) => sid
                .parse::<Sid>()
                .ok()
                .and_then(|sid| io.get_socket(sid))
                .into_iter()
                .collect(),
            _ => return Err(r#"give {"user": string} or {"sid": string}"#.into()),
        };
        let mut disconnected = 0;
        for socket in sockets {
            if socket.disconnect().is_ok() {
                disconnected += 1;
            }
        }
        Ok(json!({ "ok": true, "disconnected": disconnected }))
    }

    fn info(&self) -> Value {
        let connections = self.fleet.io().sockets().len();
        let redis_up = self.metrics.redis_up.get() == 1;
        json!({
            "workers": [{
                "worker": self.fleet.worker_id(),
                "ready": matches!(self.readiness.check(), crate::health::Status::Ready | crate::health::Status::Degraded(_)),
                "connections": connections,
                "redis_up": redis_up,
            }],
            "connections": connections,
            "redis_up": redis_up,
        })
    }
}

fn reply(status: StatusCode, value: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(
            Full::new(Bytes::from(value.to_string()))
                .map_err(|e| match e {})
                .boxed(),
        )
        .expect("static headers are valid")
}

fn error(status: StatusCode, why: &str) -> Response<Body> {
    reply(status, &json!({ "error": why }))
}
