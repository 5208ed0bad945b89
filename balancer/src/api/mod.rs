//! The server API for the app's backend, on `api.listen`: the same endpoints as a worker's own
//! `/api/`, for the whole fleet. A publish is handed to one ready worker (its broadcast crosses
//! Redis to the others, so each member gets it once); rooms, disconnect and info ask every
//! worker for its own part over HTTP and add the answers up, so they hold during a Redis
//! outage and name the workers that did not answer. Works alike with workers spawned, attached, listed or
//! discovered: the balancer asks the addresses it routes to.

mod workers_call;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::join_all;
use http::{Method, Response, StatusCode};
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use serde_json::{Value, json};
use shared::api::{self, Endpoint};

use crate::metrics::METRICS;
use crate::workers::{Worker, Workers};

/// How long one worker may take to answer.
const WORKER_TIMEOUT: Duration = Duration::from_secs(5);

/// The API app.
pub struct Api {
    workers: Arc<Workers>,
    key: String,
}

impl Api {
    /// The API over `workers`, for callers bearing `key`.
    pub fn new(workers: Arc<Workers>, key: &str) -> Self {
        Api {
            workers,
            key: key.to_owned(),
        }
    }

    async fn answer(&self, session: &mut ServerSession) -> (&'static str, StatusCode, Value) {
        let req = session.req_header();
        let auth = req.headers.get("authorization").map(|v| v.as_bytes());
        if !api::authorized(auth, &self.key) {
            return (
                api::OTHER_LABEL,
                StatusCode::UNAUTHORIZED,
                error("unauthorized"),
            );
        }
        let Some(endpoint) = Endpoint::parse(req.uri.path()) else {
            return (
                api::OTHER_LABEL,
                StatusCode::NOT_FOUND,
                error("no such endpoint"),
            );
        };
        let label = endpoint.label();
        if req.method.as_str() != endpoint.method() {
            return (
                label,
                StatusCode::METHOD_NOT_ALLOWED,
                error("method not allowed"),
            );
        }
        let body = match read_body(session).await {
            Ok(b) => b,
            Err(status) => {
                let why = if status == StatusCode::PAYLOAD_TOO_LARGE {
                    "body over 1 MB"
                } else {
                    "body unreadable"
                };
                return (label, status, error(why));
            }
        };
        let path = session.req_header().uri.path().to_owned();
        // Each worker is asked for its own part only; the sums are made here.
        let local = format!("{path}?{}", api::SCOPE_LOCAL);
        let (status, value) = match endpoint {
            Endpoint::Publish => self.publish(&path, body).await,
            Endpoint::Rooms(room) => self.rooms(&local, &room).await,
            Endpoint::Disconnect => self.disconnect(&local, body).await,
            Endpoint::Info => self.info(&local).await,
        };
        (label, status, value)
    }

    /// Handed to a ready worker; its answer is the API's. Another worker is tried only when
    /// one could not be reached at all: a worker that took the request and did not answer may
    /// have broadcast it, and a second try would deliver it twice.
    async fn publish(&self, path: &str, body: Bytes) -> (StatusCode, Value) {
        let snapshot = self.workers.snapshot();
        let mut order: Vec<&Arc<Worker>> = snapshot.workers().iter().collect();
        order.sort_by_key(|w| !w.is_up()); // ready ones first
        for worker in order {
            match self.call(worker, Method::POST, path, body.clone()).await {
                Ok(answer) => return answer,
                Err(workers_call::CallError::Unreached) => continue,
                Err(workers_call::CallError::NoAnswer(why)) => {
                    let why = format!(
                        "worker {} took the publish but did not answer ({why}): it may have been delivered",
                        worker.label()
                    );
                    return (StatusCode::BAD_GATEWAY, error(&why));
                }
            }
        }
        (
            StatusCode::SERVICE_UNAVAILABLE,
            error("no worker could be reached"),
        )
    }

    async fn rooms(&self, path: &str, room: &str) -> (StatusCode, Value) {
        let (answers, unreachable) = self.ask_all(Method::GET, path, Bytes::new()).await;
        if let Some(refusal) = first_refusal(&answers) {
            return refusal;
        }
        let mut out = api::merge_rooms(room, answers.iter().map(|(_, v)| v));
        partial(&mut out, unreachable);
        (StatusCode::OK, out)
    }

    async fn disconnect(&self, path: &str, body: Bytes) -> (StatusCode, Value) {
        let (answers, unreachable) = self.ask_all(Method::POST, path, body).await;
        if let Some(refusal) = first_refusal(&answers) {
            return refusal;
        }
        let disconnected: u64 = answers
            .iter()
            .filter_map(|(_, v)| v["disconnected"].as_u64())
            .sum();
        let mut out = json!({ "ok": true, "disconnected": disconnected });
        partial(&mut out, unreachable);
        (StatusCode::OK, out)
    }

    /// Every worker the balancer knows, ready or not, with what it says of itself.
    async fn info(&self, path: &str) -> (StatusCode, Value) {
        let snapshot = self.workers.snapshot();
        let asked = join_all(
            snapshot
                .workers()
                .iter()
                .map(|w| self.call(w, Method::GET, path, Bytes::new())),
        )
        .await;
        let mut workers = Vec::new();
        let (mut connections, mut redis_up) = (0, true);
        for (worker, answer) in snapshot.workers().iter().zip(asked) {
            let own = answer
                .ok()
                .filter(|(s, _)| s.is_success())
                .and_then(|(_, v)| v["workers"].get(0).cloned());
            let entry = match own {
                Some(own) => {
                    connections += own["connections"].as_u64().unwrap_or(0);
                    redis_up &= own["redis_up"].as_bool().unwrap_or(false);
                    json!({
                        "worker": own["worker"],
                        "address": worker.addr().to_string(),
                        "ready": worker.is_up(),
                        "connections": own["connections"],
                        "redis_up": own["redis_up"],
                    })
                }
                None => {
                    redis_up = false;
                    json!({
                        "worker": worker.label(),
                        "address": worker.addr().to_string(),
                        "ready": false,
                        "connections": null,
                        "redis_up": null,
                        "error": "no answer",
                    })
                }
            };
            workers.push(entry);
        }
        let out = json!({
            "workers": workers,
            "connections": connections,
            "redis_up": redis_up && !workers.is_empty(),
        });
        (StatusCode::OK, out)
    }

    /// Asks every worker; the answers (worker label, body) and the workers that gave none.
    async fn ask_all(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> (Vec<(StatusCode, Value)>, Vec<String>) {
        let snapshot = self.workers.snapshot();
        let asked = join_all(
            snapshot
                .workers()
                .iter()
                .map(|w| self.call(w, method.clone(), path, body.clone())),
        )
        .await;
        let mut answers = Vec::new();
        let mut unreachable = Vec::new();
        for (worker, answer) in snapshot.workers().iter().zip(asked) {
            match answer {
                Ok(a) if !a.0.is_server_error() => answers.push(a),
                _ => unreachable.push(worker.label().to_owned()),
            }
        }
        (answers, unreachable)
    }

    async fn call(
        &self,
        worker: &Worker,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<(StatusCode, Value), workers_call::CallError> {
        let (status, body) =
            workers_call::call(worker.addr(), method, path, &self.key, body, WORKER_TIMEOUT)
                .await?;
        let value = serde_json::from_slice(&body)
            .map_err(|e| workers_call::CallError::NoAnswer(format!("unreadable answer: {e}")))?;
        Ok((status, value))
    }
}

#[async_trait]
impl ServeHttp for Api {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let (label, status, value) = self.answer(session).await;
        METRICS
            .api_requests
            .with_label_values(&[label, status.as_str()])
            .inc();
        Response::builder()
            .status(status)
            .header("Content-Type", "application/json")
            .body(value.to_string().into_bytes())
            .expect("static headers are valid")
    }
}

/// The body, at most [`api::MAX_BODY`] bytes.
async fn read_body(session: &mut ServerSession) -> Result<Bytes, StatusCode> {
    let declared = session
        .req_header()
        .headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > api::MAX_BODY) {
        return Err(StatusCode::PAYLOAD_TOO_LARGE);
    }
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > api::MAX_BODY {
                    return Err(StatusCode::PAYLOAD_TOO_LARGE);
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(Bytes::from(body)),
            Err(_) => return Err(StatusCode::BAD_REQUEST),
        }
    }
}

/// A worker's 4xx (the request itself is wrong): the API's answer as it is.
fn first_refusal(answers: &[(StatusCode, Value)]) -> Option<(StatusCode, Value)> {
    answers.iter().find(|(s, _)| s.is_client_error()).cloned()
}

/// Says which workers did not answer, when some did not: the totals leave them out.
fn partial(out: &mut Value, unreachable: Vec<String>) {
    if !unreachable.is_empty() {
        out["partial"] = json!(true);
        out["unreachable"] = json!(unreachable);
    }
}

fn error(why: &str) -> Value {
    json!({ "error": why })
}
