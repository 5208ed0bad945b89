//! The balancer's own endpoints on `metrics_listen`: `/metrics`, `/healthz`, `/readyz` (200
//! while at least one worker is ready and the public port is open) and `/sd` (Prometheus HTTP
//! service discovery of every worker's metrics target, labelled with its worker id).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use http::Response;
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use pingora_prometheus::prometheus::{self, Encoder, TextEncoder};
use serde_json::json;

use crate::workers::Workers;

/// The admin HTTP app.
pub struct Admin {
    workers: Arc<Workers>,
    public: PublicPort,
}

impl Admin {
    /// Endpoints for `workers`, behind the public port `listen`.
    pub fn new(workers: Arc<Workers>, listen: SocketAddr) -> Self {
        Admin {
            workers,
            public: PublicPort::new(listen),
        }
    }
}

/// Whether the proxy's public port accepts connections yet. pingora starts the proxy once the
/// first probe round is done and binds its port a moment later; until then a ready answer
/// would send clients to a closed port. Once seen open it stays so for the process's life
/// (the listener only closes at shutdown, when this endpoint closes too).
struct PublicPort {
    addr: SocketAddr,
    open: AtomicBool,
}

impl PublicPort {
    fn new(listen: SocketAddr) -> Self {
        // A wildcard bind is reached on loopback.
        let ip = match listen.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        PublicPort {
            addr: SocketAddr::new(ip, listen.port()),
            open: AtomicBool::new(false),
        }
    }

    async fn is_open(&self) -> bool {
        if self.open.load(Ordering::Relaxed) {
            return true;
        }
        let connect = tokio::net::TcpStream::connect(self.addr);
        let open = matches!(
            tokio::time::timeout(Duration::from_secs(1), connect).await,
            Ok(Ok(_))
        );
        if open {
            self.open.store(true, Ordering::Relaxed);
        }
        open
    }
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
                if ready > 0 && !self.public.is_open().await {
                    reply(503, "text/plain", b"public port not open yet\n".to_vec())
                } else if ready > 0 {
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
