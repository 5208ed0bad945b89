//! The balancer's own endpoints on `metrics_listen`: `/metrics`, `/healthz`, `/readyz` (200
//! while at least one worker is ready) and `/sd` (Prometheus HTTP service discovery of every
//! worker's metrics target, labelled with its worker id).

use std::sync::Arc;

use async_trait::async_trait;
use http::Response;
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use pingora_prometheus::prometheus::{self, Encoder, TextEncoder};
use serde_json::json;

use crate::workers::Workers;

/// The admin HTTP app.
pub struct Admin {
    /// The workers.
    pub workers: Arc<Workers>,
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_owned();
        match path.as_str() {
            "/metrics" => {
                let mut buf = Vec::new();
                let enc = TextEncoder::new();
                enc.encode(&prometheus::gather(), &mut buf)
                    .expect("encoding into a Vec");
                reply(200, enc.format_type(), buf)
            }
            "/healthz" => reply(200, "text/plain", b"ok\n".to_vec()),
            "/readyz" => {
                let ready = self.workers.snapshot().ready();
                if ready > 0 {
                    reply(
                        200,
                        "text/plain",
                        format!("ready: {ready} worker(s)\n").into_bytes(),
                    )
                } else {
                    reply(503, "text/plain", b"no worker ready\n".to_vec())
                }
            }
            "/sd" => {
                // `?host=NAME` names the workers by a host Prometheus can reach (in a
                // container, the fleet's service name) instead of their bind address.
                let host = session
                    .req_header()
                    .uri
                    .query()
                    .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("host=")))
                    .filter(|h| !h.is_empty() && h.len() <= 253 && !h.contains(['/', '@', ':']))
                    .map(str::to_owned);
                let groups: Vec<_> = self
                    .workers
                    .snapshot()
                    .workers()
                    .iter()
                    .map(|w| {
                        let target = match &host {
                            Some(h) => format!("{h}:{}", w.addr().port()),
                            None => w.addr().to_string(),
                        };
                        json!({"targets": [target], "labels": {"worker": w.label()}})
                    })
                    .collect();
                reply(
                    200,
                    "application/json",
                    serde_json::to_vec(&groups).expect("JSON"),
                )
            }
            _ => reply(404, "text/plain", b"not found\n".to_vec()),
        }
    }
}

fn reply(status: u16, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len())
        .body(body)
        .expect("static response is valid")
}
