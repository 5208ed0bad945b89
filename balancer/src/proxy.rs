//! The `ProxyHttp` implementation, hooks in phase order: route by the sid's tag (or place a
//! new session), forward with the plain sid, tag the sid in the handshake response, count.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use ipnet::IpNet;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::{Error, ErrorType, OrErr, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{ProxyHttp, Session};
use shared::FleetConfig;
use shared::eio_query as query;

use crate::front;
use crate::handoff::Handoffs;
use crate::metrics::METRICS;
use crate::raw_http;
use crate::rejections::{Class, RejectLog};
use crate::sticky::{Tag, TaggedSid, open_packet};
use crate::upstreams::Upstreams;
use crate::ws_tunnel;

/// Per-request state.
pub struct Ctx {
    worker: Option<SocketAddr>,
    label: String,
    transport: &'static str,
    /// Set on a polling handshake: the response body's sid gets this tag.
    rewrite_tag: Option<Tag>,
    body: Vec<u8>,
    websocket: bool,
    started: Instant,
}

/// The front proxy.
pub struct FleetProxy {
    upstreams: Arc<Upstreams>,
    handoffs: Arc<Handoffs>,
    path: String,
    trusted: Vec<IpNet>,
    upstream_read_timeout: Duration,
    ws_read_timeout: Duration,
    max_header_bytes: usize,
    rejections: RejectLog,
}

impl FleetProxy {
    /// A proxy for a fleet file's workers; WebSockets to workers with a channel in
    /// `handoffs` are passed to them rather than relayed.
    pub fn new(upstreams: Arc<Upstreams>, handoffs: Arc<Handoffs>, cfg: &FleetConfig) -> Self {
        let trusted = cfg
            .balancer
            .trusted_proxies
            .iter()
            .filter_map(|n| IpNet::new(n.addr(), n.prefix()).ok())
            .collect();
        let heartbeat =
            Duration::from_millis(cfg.socketio.ping_interval_ms + cfg.socketio.ping_timeout_ms);
        FleetProxy {
            upstreams,
            handoffs,
            path: cfg.socketio.path.trim_end_matches('/').to_owned(),
            trusted,
            // A long-poll is held up to a ping interval; allow a full heartbeat plus slack.
            upstream_read_timeout: heartbeat + Duration::from_secs(5),
            // An open WebSocket carries a ping every interval; twice the heartbeat is dead.
            ws_read_timeout: heartbeat * 2,
            max_header_bytes: cfg.balancer.max_header_bytes,
            rejections: RejectLog::default(),
        }
    }

    /// The client's address: the TCP peer, or the nearest untrusted hop of X-Forwarded-For
    /// when the peer is a trusted proxy.
    fn client_ip(&self, session: &Session) -> Option<IpAddr> {
        let peer = session.client_addr()?.as_inet()?.ip();
        if !self.trusted.iter().any(|n| n.contains(&peer)) {
            return Some(peer);
        }
        let xff = session
            .req_header()
            .headers
            .get("x-forwarded-for")?
            .to_str()
            .ok()?;
        xff.rsplit(',')
            .filter_map(|h| h.trim().parse::<IpAddr>().ok())
            .find(|ip| !self.trusted.iter().any(|n| n.contains(ip)))
            .or(Some(peer))
    }

    /// Answers a refused request itself, counted and logged once per class; `sticky` also
    /// counts it as a stickiness refusal with that reason.
    async fn reject(
        &self,
        session: &mut Session,
        class: Class,
        sticky: Option<&'static str>,
    ) -> Result<bool> {
        if let Some(reason) = sticky {
            METRICS.sticky_rejects.with_label_values(&[reason]).inc();
        }
        let req = session.req_header();
        let mut target = req.uri.to_string();
        target.truncate(120);
        let peer = session
            .client_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        METRICS.rejects.with_label_values(&[class.as_str()]).inc();
        self.rejections.note(
            class.as_str(),
            &format_args!("{} {target} from {peer}", req.method),
        );
        let (status, body) = match class {
            Class::NotFound => (404, "not found\n"),
            Class::BadRequest => (400, BAD_REQUEST),
            Class::SessionUnknown => (400, SESSION_UNKNOWN),
            Class::HeaderTooLarge => (431, "request header fields too large\n"),
            Class::NoWorker => (503, "no worker ready\n"),
            Class::UpstreamFailed => (502, "worker unavailable\n"),
        };
        let json = body.starts_with('{');
        let mut resp = ResponseHeader::build(status, Some(3))?;
        resp.insert_header(
            "Content-Type",
            if json {
                "application/json"
            } else {
                "text/plain"
            },
        )?;
        resp.insert_header("Content-Length", body.len().to_string())?;
        session.set_keepalive(None);
        session.write_response_header(Box::new(resp), false).await?;
        session
            .write_response_body(Some(Bytes::from_static(body.as_bytes())), true)
            .await?;
        Ok(true)
    }

    /// X-Forwarded-For / -Proto: appended to when the peer is a trusted proxy, else replaced.
    fn add_forwarded(&self, session: &Session, req: &mut RequestHeader) -> Result<()> {
        let Some(peer) = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip())
        else {
            return Ok(());
        };
        let trusted = self.trusted.iter().any(|n| n.contains(&peer));
        let xff = match req
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
        {
            Some(prev) if trusted => format!("{prev}, {peer}"),
            _ => peer.to_string(),
        };
        req.insert_header("X-Forwarded-For", xff)?;
        if !trusted || req.headers.get("x-forwarded-proto").is_none() {
            req.insert_header("X-Forwarded-Proto", "http")?;
        }
        Ok(())
    }

    /// A WebSocket upgrade, never through pingora's proxy loop: the client's connection is
    /// passed to the worker when it is one this balancer runs (`handoff`), else tunnelled here
    /// (`ws_tunnel`).
    async fn upgrade(
        &self,
        session: &mut Session,
        worker: SocketAddr,
        ctx: &mut Ctx,
    ) -> Result<bool> {
        let mut req = session.req_header().clone();
        self.add_forwarded(session, &mut req)?;
        let label = ctx.label.as_str();
        if let Some(channel) = self.handoffs.get(label) {
            let head = raw_http::serialize(&req);
            match channel.pass(session, &head, CONNECT_TIMEOUT).await {
                Ok(()) => {
                    METRICS.handoffs.with_label_values(&["passed"]).inc();
                    ctx.websocket = true;
                    return Ok(true);
                }
                Err(e) => {
                    // E.g. the worker died a moment ago: its restart gets a new channel.
                    METRICS.handoffs.with_label_values(&["relayed"]).inc();
                    self.rejections.note(
                        "handoff_failed",
                        &format_args!("worker={label}: {e}; relaying the WebSocket instead"),
                    );
                }
            }
        }
        let limits = ws_tunnel::Limits {
            connect: CONNECT_TIMEOUT,
            handshake: self.upstream_read_timeout,
            idle: self.ws_read_timeout,
        };
        let label = ctx.label.as_str();
        let open = METRICS.websockets.with_label_values(&[label]);
        let result = ws_tunnel::run(session, worker, &req, &limits, open).await;
        match result {
            Ok(ws_tunnel::Outcome::Tunnelled) => ctx.websocket = true,
            Ok(ws_tunnel::Outcome::Refused) => {}
            Err(e) => {
                tracing::debug!(worker = %ctx.label, "websocket upgrade failed: {e}");
                METRICS.upstream_errors.with_label_values(&[label]).inc();
                return self.reject(session, Class::UpstreamFailed, None).await;
            }
        }
        Ok(true)
    }
}

/// The size of a request head as sent, near enough: request line and header lines.
fn head_size(req: &RequestHeader) -> usize {
    let target = req.uri.path_and_query().map_or(1, |p| p.as_str().len());
    let line = req.method.as_str().len() + target + 12;
    req.headers
        .iter()
        .fold(line, |n, (k, v)| n + k.as_str().len() + v.len() + 4)
}

/// How long to wait for a worker to accept a TCP connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

const SESSION_UNKNOWN: &str = r#"{"code":1,"message":"Session ID unknown"}"#;
const BAD_REQUEST: &str = r#"{"code":3,"message":"Bad request"}"#;

#[async_trait]
impl ProxyHttp for FleetProxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            worker: None,
            label: String::new(),
            transport: "other",
            rewrite_tag: None,
            body: Vec::new(),
            websocket: false,
            started: Instant::now(),
        }
    }

    async fn early_request_filter(&self, session: &mut Session, _ctx: &mut Ctx) -> Result<()> {
        // The head has arrived: from now on the connection idles under the normal keepalive.
        session.set_keepalive(Some(front::KEEPALIVE_SECS));
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        if head_size(session.req_header()) > self.max_header_bytes {
            return self.reject(session, Class::HeaderTooLarge, None).await;
        }
        let uri = &session.req_header().uri;
        let path = uri.path();
        if !query::under_path(path, &self.path) {
            return self.reject(session, Class::NotFound, None).await;
        }
        let raw_query = uri.query().unwrap_or("").to_owned();
        let Ok(params) = query::parse(Some(&raw_query)) else {
            return self
                .reject(session, Class::BadRequest, Some("malformed"))
                .await;
        };
        ctx.transport = match params.transport.as_deref() {
            Some("polling") => "polling",
            Some("websocket") => "websocket",
            _ => return self.reject(session, Class::BadRequest, None).await,
        };
        let worker = match params.sid.as_deref() {
            Some(text) => {
                let Ok(tagged) = TaggedSid::parse(text) else {
                    return self
                        .reject(session, Class::SessionUnknown, Some("malformed"))
                        .await;
                };
                let addr = match self.upstreams.by_tag(tagged.tag) {
                    None => {
                        return self
                            .reject(session, Class::SessionUnknown, Some("unknown_worker"))
                            .await;
                    }
                    Some((_, false)) => {
                        return self
                            .reject(session, Class::SessionUnknown, Some("worker_down"))
                            .await;
                    }
                    Some((addr, true)) => addr,
                };
                // The worker sees exactly its own sid.
                let new_uri = format!(
                    "{}?{}",
                    session.req_header().uri.path(),
                    query::with_sid(&raw_query, tagged.sid)
                );
                let new_uri = new_uri
                    .parse()
                    .or_err(ErrorType::InvalidHTTPHeader, "rewritten uri")?;
                session.req_header_mut().set_uri(new_uri);
                addr
            }
            None => {
                let key = self
                    .client_ip(session)
                    .map(|ip| ip.to_string())
                    .unwrap_or_default();
                let Some(addr) = self.upstreams.place(key.as_bytes()) else {
                    return self.reject(session, Class::NoWorker, None).await;
                };
                METRICS
                    .placed
                    .with_label_values(&[self.upstreams.label(&addr).as_str()])
                    .inc();
                if ctx.transport == "polling" {
                    ctx.rewrite_tag = Some(self.upstreams.tag_of(&addr));
                }
                addr
            }
        };
        ctx.label = self.upstreams.label(&worker);
        ctx.worker = Some(worker);
        if session.is_upgrade_req() {
            return self.upgrade(session, worker, ctx).await;
        }
        Ok(false)
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let addr = ctx
            .worker
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no worker chosen"))?;
        let mut peer = HttpPeer::new(addr, false, String::new());
        peer.options.connection_timeout = Some(CONNECT_TIMEOUT);
        peer.options.read_timeout = Some(self.upstream_read_timeout);
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        req: &mut RequestHeader,
        _ctx: &mut Ctx,
    ) -> Result<()> {
        self.add_forwarded(session, req)
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if ctx.rewrite_tag.is_some() {
            if resp.status.as_u16() == 200 {
                // The body grows by the tag: re-frame it rather than trust the old length.
                resp.remove_header("Content-Length");
                resp.insert_header("Transfer-Encoding", "chunked")?;
            } else {
                ctx.rewrite_tag = None;
            }
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<Duration>> {
        let Some(tag) = ctx.rewrite_tag else {
            return Ok(None);
        };
        if let Some(chunk) = body.take() {
            ctx.body.extend_from_slice(&chunk);
        }
        if end {
            let original = std::mem::take(&mut ctx.body);
            *body = Some(match open_packet::rewrite(&original, tag) {
                Ok(rewritten) => Bytes::from(rewritten),
                Err(e) => {
                    tracing::warn!(worker = %ctx.label, "handshake not rewritten: {e}");
                    Bytes::from(original)
                }
            });
        }
        Ok(None)
    }

    fn suppress_error_log(&self, _session: &Session, ctx: &Ctx, error: &Error) -> bool {
        // A dead worker fails every request on it: one line per kind, not per request.
        // (WebSockets never get here: `ws_tunnel` carries them outside pingora's proxy loop.)
        let class = format!(
            "{} error {}",
            error.esource().as_str().to_lowercase(),
            error.etype().as_str()
        );
        self.rejections.note(
            &class,
            &format_args!("worker={} transport={}: {error}", ctx.label, ctx.transport),
        );
        true
    }

    async fn logging(&self, _session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        let Some(_) = ctx.worker else { return };
        METRICS
            .requests
            .with_label_values(&[ctx.label.as_str(), ctx.transport])
            .inc();
        // A WebSocket counts itself in the websockets gauge while it lasts (`ws_tunnel`,
        // `handoff`).
        if !ctx.websocket {
            METRICS
                .duration
                .observe(ctx.started.elapsed().as_secs_f64());
        }
        if let Some(e) = e
            && matches!(e.esource(), pingora_core::ErrorSource::Upstream)
        {
            METRICS
                .upstream_errors
                .with_label_values(&[ctx.label.as_str()])
                .inc();
            // pingora answered it (502/504): a refusal like any other, for `rejects_total`.
            METRICS
                .rejects
                .with_label_values(&[Class::UpstreamFailed.as_str()])
                .inc();
        }
    }
}
