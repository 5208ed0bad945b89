//! The server API on a worker's port, under `/api/`, when `api.key` is set: the same API as
//! the balancer's, for the whole fleet. A publish is a room broadcast (it crosses Redis to the
//! other workers); rooms, disconnect and info are answered here for this worker ([`local`]) and
//! asked of the others over Redis ([`peers`]). With `?scope=local` only this worker's part is
//! answered: how the balancer asks each worker before adding the answers up itself.
//!
//! - `POST /api/publish` `{"room" | "rooms", "data"}`: event `message` `{"room", "data"}` to
//!   every member on every worker, once (as a client publish).
//! - `GET /api/rooms/<room>`, `POST /api/disconnect` `{"user" | "sid"}`, `GET /api/info`.

pub mod local;
pub mod peers;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::{Value, json};
use shared::api::{self, Endpoint};
use shared::protocol::EV_MESSAGE;

use crate::app::room_arg;
use crate::http::Body;
pub use local::{Local, Question};
pub use peers::Peers;

/// The most rooms one publish may name.
const MAX_ROOMS: usize = 1000;

/// What the API needs of the worker.
pub struct Api {
    key: String,
    local: Local,
    peers: Peers,
}

impl Api {
    /// The API under `key`, answering with `local` and asking `peers`.
    pub fn new(key: &str, local: Local, peers: Peers) -> Self {
        Api {
            key: key.to_owned(),
            local,
            peers,
        }
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
        let only_here = req.uri().query() == Some(api::SCOPE_LOCAL);
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
            Endpoint::Rooms(room) => Ok(self.room(room, only_here).await),
            Endpoint::Disconnect => match disconnect_question(&body) {
                Ok(q) => Ok(self.disconnect(q, only_here).await),
                Err(why) => Err(why),
            },
            Endpoint::Info => Ok(self.info(only_here).await),
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
        let mut rooms: Vec<String> = rooms;
        rooms.sort();
        rooms.dedup(); // a room named twice is published once
        let mut dropped = 0;
        for room in rooms {
            let message = json!({ "room": room, "data": data });
            dropped += self
                .local
                .fleet
                .publish(room, EV_MESSAGE, &message)
                .await
                .map_err(|e| format!("broadcast failed: {e}"))?;
        }
        Ok(json!({ "ok": true, "dropped": dropped }))
    }

    /// This worker's answer and, unless `only_here`, the others'.
    async fn gather(&self, question: Question, only_here: bool) -> (Vec<Value>, bool) {
        let mine = self.local.answer(&question);
        if only_here {
            return (vec![mine], true);
        }
        let (mut answers, complete) = self.peers.ask(question).await;
        answers.insert(0, mine);
        (answers, complete)
    }

    async fn room(&self, room: String, only_here: bool) -> Value {
        let (answers, complete) = self.gather(Question::Room(room.clone()), only_here).await;
        let mut out = api::merge_rooms(&room, &answers);
        mark_partial(&mut out, complete);
        out
    }

    async fn disconnect(&self, question: Question, only_here: bool) -> Value {
        let (answers, complete) = self.gather(question, only_here).await;
        let disconnected: u64 = answers
            .iter()
            .filter_map(|a| a["disconnected"].as_u64())
            .sum();
        let mut out = json!({ "ok": true, "disconnected": disconnected });
        mark_partial(&mut out, complete);
        out
    }

    async fn info(&self, only_here: bool) -> Value {
        let (mut workers, complete) = self.gather(Question::Info, only_here).await;
        workers[1..].sort_by(|a, b| a["worker"].as_str().cmp(&b["worker"].as_str()));
        let connections: u64 = workers
            .iter()
            .filter_map(|w| w["connections"].as_u64())
            .sum();
        let redis_up = workers.iter().all(|w| w["redis_up"] == true);
        let mut out =
            json!({ "workers": workers, "connections": connections, "redis_up": redis_up });
        mark_partial(&mut out, complete);
        out
    }
}

/// `{"user": string}` or `{"sid": string}`.
fn disconnect_question(body: &[u8]) -> Result<Question, String> {
    let req: Value = serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
    match (req.get("user"), req.get("sid")) {
        (Some(Value::String(user)), None) if !user.is_empty() => {
            Ok(Question::DisconnectUser(user.clone()))
        }
        (None, Some(Value::String(sid))) if !sid.is_empty() => {
            Ok(Question::DisconnectSid(sid.clone()))
        }
        _ => Err(r#"give {"user": string} or {"sid": string}"#.into()),
    }
}

/// Not every worker answered: the totals leave some out.
fn mark_partial(out: &mut Value, complete: bool) {
    if !complete {
        out["partial"] = json!(true);
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
