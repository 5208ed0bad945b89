//! The worker's one port: Socket.IO under its path, plus `/metrics`, `/healthz`, `/readyz`,
//! and the server API under `/api/` when it has a key.
//! Every Engine.IO request passes the drain gate first.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use engineioxide::service::NotFoundService;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::service::Service as _;
use shared::cors::Cors;
use shared::eio_query;
use shared::metrics::READYZ_CONNECTIONS_HEADER;
use socketioxide::service::SocketIoService;

use crate::conn::{ConnId, ConnRegistry};
use crate::drain::DrainGate;
use crate::health::{Readiness, Status};
use crate::metrics::WorkerMetrics;
use crate::{FleetAdapter, Io};

/// Any response body this server sends.
pub type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Everything a request may need; one per worker, shared by every connection.
pub struct HttpCtx {
    /// The Socket.IO service.
    pub sio: SocketIoService<NotFoundService, FleetAdapter>,
    /// The Socket.IO handle (live socket count for `/metrics`).
    pub io: Io,
    /// Engine.IO path, without trailing slash.
    pub sio_path: String,
    /// Whether Engine.IO 3 clients are served (`socketio.allow_eio3`).
    pub allow_eio3: bool,
    /// `socketio.limits.events_per_sec`, for each new session's gate.
    pub events_per_sec: u32,
    /// Browsers on other origins (`socketio.cors`).
    pub cors: Cors,
    /// The server API, when `api.key` is set.
    pub api: Option<crate::api::Api>,
    /// The app's pages ([`crate::App::static_dir`]).
    pub pages: Option<std::path::PathBuf>,
    /// Drain state at the edge.
    pub gate: Arc<DrainGate>,
    /// Open connections.
    pub registry: Arc<ConnRegistry>,
    /// Readiness.
    pub readiness: Readiness,
    /// Metrics.
    pub metrics: WorkerMetrics,
}

/// Route one request.
pub async fn handle(
    ctx: Arc<HttpCtx>,
    conn: ConnId,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path();
    if shared::eio_query::under_path(path, &ctx.sio_path) {
        let origin = req.headers().get(header::ORIGIN).cloned();
        let origin = origin.as_ref().map(header::HeaderValue::as_bytes);
        if req.method() == Method::OPTIONS {
            return Ok(preflight(&ctx.cors, origin, &req));
        }
        let mut req = own_head(req);
        req.extensions_mut().insert(conn);
        let upgrade = req.headers().contains_key(header::UPGRADE);
        // Cross-site WebSocket hijacking, or a session opened by a page not listed.
        let refused = !ctx.cors.admits(origin)
            && (upgrade || eio_query::parse(req.uri().query()).is_ok_and(|q| q.sid.is_none()));
        let mut res = if refused {
            text(
                StatusCode::FORBIDDEN,
                "application/json",
                shared::cors::FORBIDDEN_BODY.into(),
            )
        } else if let Some(bad) = upgrade.then(|| upgrade_refusal(req.headers())).flatten() {
            bad
        } else {
            engine_io(&ctx, conn, req).await
        };
        if upgrade && res.status() != StatusCode::SWITCHING_PROTOCOLS {
            // A refused upgrade ends its connection, as the balancer's relay does: a
            // connection the balancer handed over counts there as an open WebSocket until
            // it closes.
            res.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
        }
        if res.status() != StatusCode::SWITCHING_PROTOCOLS {
            add_headers(&mut res, ctx.cors.headers(origin));
        }
        return Ok(res);
    }
    if path.starts_with("/api/")
        && let Some(api) = &ctx.api
    {
        return Ok(api.handle(req).await);
    }
    Ok(match (req.method(), path) {
        (&Method::GET, "/metrics") => {
            count_connections(&ctx);
            let body = ctx.metrics.encode();
            text(StatusCode::OK, "text/plain; version=0.0.4", body)
        }
        (&Method::GET, "/healthz") => text(StatusCode::OK, "text/plain", "ok\n".into()),
        (&Method::GET, "/readyz") => readyz(ctx.readiness.check(), count_connections(&ctx)),
        (&Method::GET, _) if ctx.pages.is_some() => {
            crate::pages::serve(ctx.pages.as_deref().expect("checked"), path).await
        }
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    })
}

/// Brings the `fleet_worker_connections` gauge up to date (this worker's connected sockets)
/// and returns its value.
fn count_connections(ctx: &HttpCtx) -> i64 {
    // Every namespace (an app need not serve `/`), each client once.
    let n = i64::try_from(crate::fleet::local_sids(&ctx.io).len()).unwrap_or(i64::MAX);
    ctx.metrics.connections.set(n);
    n
}

/// `/readyz`: 200 (ready, or degraded with the reason) or 503 with the reason, each carrying
/// the worker's load in [`READYZ_CONNECTIONS_HEADER`], so one probe tells the balancer
/// readiness and load.
fn readyz(status: Status, connections: i64) -> Response<Body> {
    let mut res = match status {
        Status::Ready => text(StatusCode::OK, "text/plain", "ready\n".into()),
        Status::Degraded(why) => text(
            StatusCode::OK,
            "text/plain",
            format!("ready, degraded: {why}\n"),
        ),
        Status::NotReady(why) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            format!("{why}\n"),
        ),
    };
    res.headers_mut().insert(
        READYZ_CONNECTIONS_HEADER,
        header::HeaderValue::from(connections),
    );
    res
}

/// The request with its URI and header values copied out of hyper's read buffer.
///
/// hyper's header values are slices of its 8 KiB connection read buffer, and engineioxide keeps
/// a session's request head (and a WebSocket's, for the connection's life): without this copy
/// every WebSocket pins that whole buffer — 8 KB of the worker's ~27 KB per idle WebSocket.
fn own_head<B>(req: Request<B>) -> Request<B> {
    let (mut parts, body) = req.into_parts();
    if let Ok(uri) = http::Uri::try_from(parts.uri.to_string()) {
        parts.uri = uri;
    }
    let shared = std::mem::take(&mut parts.headers);
    parts.headers.reserve(shared.len());
    for (name, value) in &shared {
        let owned =
            header::HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
        parts.headers.append(name.clone(), owned);
    }
    Request::from_parts(parts, body)
}

async fn engine_io(ctx: &HttpCtx, conn: ConnId, req: Request<Incoming>) -> Response<Body> {
    // A query that does not parse is forwarded as is: socketioxide answers it.
    let q = eio_query::parse(req.uri().query()).unwrap_or_default();
    if q.eio == Some(3) && !ctx.allow_eio3 {
        // engineioxide is built with EIO3 support; it is offered only when configured.
        return text(
            StatusCode::BAD_REQUEST,
            "application/json",
            UNSUPPORTED_PROTOCOL.into(),
        );
    }
    let _inflight = ctx.gate.enter();
    let Some(sid) = q.sid.as_deref() else {
        if ctx.gate.is_draining() {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "draining\n".into(),
            );
        }
        // This request opens a session, which keeps its extensions: the session's gate
        // goes with it (see `crate::limits`).
        let mut req = req;
        let gate = crate::limits::SessionGate::new(ctx.events_per_sec, &ctx.metrics);
        req.extensions_mut()
            .insert(engineioxide::gate::Gate(Arc::new(gate)));
        return forward(ctx, req).await;
    };
    if ctx.gate.is_cut(sid) {
        return session_closed();
    }
    if q.transport.as_deref() == Some("websocket") {
        ctx.registry.bind_sid(conn, sid);
        return forward(ctx, req).await;
    }
    if req.method() != Method::GET {
        return forward(ctx, req).await;
    }
    // A long-poll: answer it the moment its session is cut.
    let poll = ctx.gate.poll_started(sid);
    tokio::select! {
        res = forward(ctx, req) => res,
        _ = poll.cancel.cancelled() => session_closed(),
    }
}

async fn forward(ctx: &HttpCtx, req: Request<Incoming>) -> Response<Body> {
    match ctx.sio.call(req).await {
        Ok(res) => res.map(|b| b.map_err(Into::into).boxed()),
        Err(e) => match e {},
    }
}

/// A cut session's answer. Any non-2xx makes both the official client and python-socketio
/// treat it as a transport error and reconnect with a fresh handshake; Engine.IO's close packet
/// would not do for python-socketio, which takes it as a deliberate server disconnect.
fn session_closed() -> Response<Body> {
    text(
        StatusCode::SERVICE_UNAVAILABLE,
        "text/plain",
        "worker draining: session closed, reconnect\n".into(),
    )
}

/// A browser's CORS preflight: 204 with the `socketio.cors` headers (none when the origin is
/// not allowed, which is the browser's cue to stop).
fn preflight<B>(cors: &Cors, origin: Option<&[u8]>, req: &Request<B>) -> Response<Body> {
    let asked = req
        .headers()
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .map(header::HeaderValue::as_bytes);
    let mut res = Response::builder()
        .status(StatusCode::NO_CONTENT)
        .body(Full::new(Bytes::new()).map_err(|e| match e {}).boxed())
        .expect("static headers are valid");
    add_headers(&mut res, cors.preflight_headers(origin, asked));
    res
}

fn add_headers(res: &mut Response<Body>, headers: Vec<(&'static str, String)>) {
    for (name, value) in headers {
        if let Ok(value) = header::HeaderValue::try_from(value) {
            res.headers_mut().append(name, value);
        }
    }
}

/// RFC 6455 4.2.1: what a WebSocket opening handshake must carry before it is upgraded. A
/// missing or other `Sec-WebSocket-Version` is answered 426 with the version served (4.4);
/// anything else amiss 400. `None`: the handshake may go on.
fn upgrade_refusal(headers: &header::HeaderMap) -> Option<Response<Body>> {
    let bad = |why: &str| text(StatusCode::BAD_REQUEST, "text/plain", format!("{why}\n"));
    if !has_token(headers, header::UPGRADE, "websocket") {
        return Some(bad("only Upgrade: websocket is served"));
    }
    if !has_token(headers, header::CONNECTION, "upgrade") {
        return Some(bad("Connection: Upgrade missing"));
    }
    let mut versions = headers.get_all(header::SEC_WEBSOCKET_VERSION).iter();
    let version = versions.next().map(|v| v.as_bytes().trim_ascii());
    if version != Some(b"13".as_slice()) || versions.next().is_some() {
        let mut res = text(
            StatusCode::UPGRADE_REQUIRED,
            "text/plain",
            "WebSocket version 13 required\n".into(),
        );
        res.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            header::HeaderValue::from_static("13"),
        );
        return Some(res);
    }
    let mut keys = headers.get_all(header::SEC_WEBSOCKET_KEY).iter();
    match (keys.next(), keys.next()) {
        (Some(key), None) if is_websocket_key(key.as_bytes()) => None,
        _ => Some(bad("Sec-WebSocket-Key must be the base64 of 16 bytes")),
    }
}

/// Whether any of the `name` headers' comma-separated tokens is `token`, case-insensitively.
fn has_token(headers: &header::HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// Whether `key` is the base64 of 16 bytes: 22 characters, the last carrying 2 bits of data
/// and 4 zero bits, then `==`.
fn is_websocket_key(key: &[u8]) -> bool {
    let key = key.trim_ascii();
    let alphabet = |b: &u8| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/';
    key.len() == 24
        && key[..21].iter().all(alphabet)
        && b"AQgw".contains(&key[21])
        && &key[22..] == b"=="
}

/// engineioxide's own answer to a protocol version it does not serve.
const UNSUPPORTED_PROTOCOL: &str = r#"{"code":5,"message":"Unsupported protocol version"}"#;

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed())
        .expect("static headers are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_head_keeps_the_request_as_it_was() {
        let req = Request::get("/socket.io/?EIO=4&transport=websocket")
            .header("upgrade", "websocket")
            .header("x-forwarded-for", "10.0.0.1")
            .header("x-twice", "a")
            .header("x-twice", "b")
            .body(())
            .unwrap();
        let owned = own_head(req);
        assert_eq!(owned.uri(), "/socket.io/?EIO=4&transport=websocket");
        assert_eq!(owned.headers()["upgrade"], "websocket");
        assert_eq!(owned.headers()["x-forwarded-for"], "10.0.0.1");
        let twice: Vec<_> = owned.headers().get_all("x-twice").iter().collect();
        assert_eq!(twice, ["a", "b"]);
    }

    fn handshake(headers: &[(&str, &str)]) -> Result<(), StatusCode> {
        let mut req = Request::get("/socket.io/?EIO=4&transport=websocket");
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let req = req.body(()).unwrap();
        upgrade_refusal(req.headers()).map_or(Ok(()), |res| {
            if res.status() == StatusCode::UPGRADE_REQUIRED {
                assert_eq!(res.headers()[header::SEC_WEBSOCKET_VERSION], "13");
            }
            Err(res.status())
        })
    }

    #[test]
    fn a_websocket_handshake_follows_rfc_6455() {
        const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
        let valid = [
            ("upgrade", "websocket"),
            ("connection", "Upgrade"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", KEY),
        ];
        assert_eq!(handshake(&valid), Ok(()));
        let with = |name: &str, value: &'static str| -> Vec<(&str, &str)> {
            let mut h: Vec<_> = valid.iter().copied().filter(|(n, _)| *n != name).collect();
            if !value.is_empty() {
                h.push((valid.iter().find(|(n, _)| *n == name).unwrap().0, value));
            }
            h
        };
        // Tokens are case-insensitive, and may come in lists.
        assert_eq!(handshake(&with("upgrade", "WebSocket")), Ok(()));
        assert_eq!(
            handshake(&with("connection", "keep-alive, upgrade")),
            Ok(())
        );
        let upgrade_required = Err(StatusCode::UPGRADE_REQUIRED);
        assert_eq!(
            handshake(&with("sec-websocket-version", "8")),
            upgrade_required
        );
        assert_eq!(
            handshake(&with("sec-websocket-version", "")),
            upgrade_required
        );
        assert_eq!(
            handshake(&with("sec-websocket-version", "13, 8")),
            upgrade_required
        );
        let bad = Err(StatusCode::BAD_REQUEST);
        assert_eq!(handshake(&with("upgrade", "h2c")), bad);
        assert_eq!(handshake(&with("connection", "keep-alive")), bad);
        assert_eq!(handshake(&with("connection", "")), bad);
        assert_eq!(handshake(&with("sec-websocket-key", "")), bad);
        assert_eq!(handshake(&with("sec-websocket-key", "c2hvcnQ=")), bad);
        let long: &'static str = "QUFB".repeat(1250).leak();
        assert_eq!(handshake(&with("sec-websocket-key", long)), bad);
        // 24 characters, but 17 bytes' worth or not base64.
        assert_eq!(
            handshake(&with("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZR==")),
            bad
        );
        assert_eq!(
            handshake(&with("sec-websocket-key", "dGhlIHNhbXBsZSBub25j*Q==")),
            bad
        );
        let mut twice = valid.to_vec();
        twice.push(("sec-websocket-key", KEY));
        assert_eq!(handshake(&twice), bad);
    }

    #[test]
    fn sixteen_random_bytes_in_base64_are_a_key() {
        // Every value of the last character's two data bits.
        for key in [
            "AAAAAAAAAAAAAAAAAAAAAA==",
            "AAAAAAAAAAAAAAAAAAAAAQ==",
            "/////////////////////g==",
            "/////////////////////w==",
        ] {
            assert!(is_websocket_key(key.as_bytes()), "{key}");
        }
    }

    /// Ready or not, `/readyz` carries the connection count, as a number.
    #[test]
    fn readyz_reports_the_load_either_way() {
        for (ready, status) in [
            (Status::Ready, StatusCode::OK),
            (Status::Degraded("no redis".into()), StatusCode::OK),
            (
                Status::NotReady("draining".into()),
                StatusCode::SERVICE_UNAVAILABLE,
            ),
        ] {
            let res = readyz(ready, 42);
            assert_eq!(res.status(), status);
            let value = res.headers()[READYZ_CONNECTIONS_HEADER].to_str().unwrap();
            assert_eq!(value.parse::<i64>().unwrap(), 42);
        }
    }
}
