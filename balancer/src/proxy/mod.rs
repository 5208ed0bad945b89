//! The pingora side: the `ProxyHttp` hooks, in phase order, carrying out the router's
//! decision. `request_filter` asks [`Router::route`] and refuses, rewrites the sid, or takes a
//! WebSocket out of pingora's loop (`handoff`, `ws_tunnel`); `upstream_peer` names the routed
//! worker; the response hooks add the worker's tag to a new polling session's sid; `logging`
//! counts.
//!
//! - [`front`]: the listener's connection loop (head timeout).
//! - [`handoff`]: WebSockets passed to supervised workers; [`ws_tunnel`]: WebSockets relayed;
//!   [`raw_http`]: what both take from pingora's session.
//! - [`rejections`]: refusals logged once per class.

pub mod front;
pub mod handoff;
pub mod raw_http;
pub mod rejections;
pub mod ws_tunnel;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::{Error, ErrorSource, ErrorType, OrErr, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, ProxyWarnLogContext, Session};
use shared::FleetConfig;
use shared::config::{HealthCheck, IpNetwork};
use shared::shutdown::Shutdown;

use crate::limits::{AddressLimits, ConnSlot};
use crate::metrics::{HandoffOutcome, METRICS};
use crate::routing::{self, Carry, Class, Decision, Refusal, Route, Router, StickyReason};
use crate::sticky::{Tag, open_packet};
use crate::workers::{Worker, Workers};
use handoff::Handoffs;
use rejections::RejectLog;
use shared::handoff as handoff_proto;

/// How long to wait for a worker to accept a TCP connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// New-session placements tried per request: the first, and others after refusals.
const MAX_PLACEMENTS: usize = 3;

/// Per-request state: the route, once decided.
pub struct Ctx {
    route: Option<Route>,
    /// A new session's placement key, and the workers that refused it.
    key: Vec<u8>,
    tried: Vec<SocketAddr>,
    /// Set on a polling handshake: the answer's sid gets this tag.
    tag_answer: Option<Tag>,
    /// The handshake answer, gathered until complete to be rewritten.
    body: Vec<u8>,
    /// The request became a WebSocket (counted by the websockets gauge, not the histogram).
    websocket: bool,
    /// The long-polling request was handed to its worker (its answer is the worker's; not in
    /// the histogram, whose durations run to the answer's end).
    handed: bool,
    /// The routed worker failed because it is gone: answered "Session ID unknown".
    session_gone: bool,
    /// The client's address as routing judged it (`balancer.trusted_proxies` applied).
    client: Option<std::net::IpAddr>,
    /// What the listener knows of this request's connection.
    conn: Option<Arc<front::ConnInfo>>,
    /// A polling POST to an existing session whose payload so far ends with a close packet.
    closes_session: bool,
    /// The last byte of that payload so far.
    body_last: Option<u8>,
    started: Instant,
}

/// The front proxy.
pub struct FleetProxy {
    router: Router,
    workers: Arc<Workers>,
    handoffs: Arc<Handoffs>,
    trusted: Vec<IpNetwork>,
    upstream_read_timeout: Duration,
    ws_read_timeout: Duration,
    closing: ws_tunnel::Closing,
    rejections: Arc<RejectLog>,
    limits: Option<Arc<AddressLimits>>,
    /// The public listener serves TLS.
    tls: bool,
    /// Workers report no session count (`health_check: engineio`): the balancer's count of
    /// what it placed is their load, so it counts the sessions it sees end too.
    counts_ends: bool,
    /// Long-polling requests of existing sessions are handed to the workers (`hand_off_poll`):
    /// `workers.handoff` and `workers.handoff_polling` on, TLS off, and the balancer need not
    /// read their bodies.
    polls_leave: bool,
}

impl FleetProxy {
    /// A proxy for a fleet file's workers; WebSockets to workers with a channel in
    /// `handoffs` are passed to them rather than relayed. Relayed ones close when `closing`
    /// fires, spread over the drain window.
    pub fn new(
        workers: Arc<Workers>,
        handoffs: Arc<Handoffs>,
        closing: Shutdown,
        cfg: &FleetConfig,
        rejections: Arc<RejectLog>,
        limits: Option<Arc<AddressLimits>>,
    ) -> Self {
        let heartbeat =
            Duration::from_millis(cfg.socketio.ping_interval_ms + cfg.socketio.ping_timeout_ms);
        FleetProxy {
            router: Router::new(cfg),
            workers,
            handoffs,
            trusted: cfg.balancer.trusted_proxies.clone(),
            // A long-poll is held up to a ping interval; allow a full heartbeat plus slack.
            upstream_read_timeout: heartbeat + Duration::from_secs(5),
            // An open WebSocket carries a ping every interval; twice the heartbeat is dead.
            ws_read_timeout: heartbeat * 2,
            // As a worker spreads its drain (the rest of the window lets the last flush).
            closing: ws_tunnel::Closing::new(
                closing,
                cfg.workers
                    .drain_window()
                    .min(cfg.grace_period())
                    .mul_f64(0.9),
            ),
            rejections,
            limits,
            tls: cfg.balancer.tls.enabled(),
            counts_ends: cfg.balancer.health_check == HealthCheck::Engineio,
            polls_leave: polls_leave(cfg),
        }
    }

    /// A session on `worker` ended, or a placement on it made no session: its count drops,
    /// where the count is the balancer's own.
    fn ended(&self, worker: &Worker) {
        if self.counts_ends {
            worker.load().ended();
        }
    }

    /// What routing reads of the session's request.
    fn request<'a>(&self, session: &'a Session) -> routing::Request<'a> {
        let req = session.req_header();
        let client = session.client_addr().and_then(|a| a.as_inet()).map(|peer| {
            let xff = req
                .headers
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok());
            routing::client_ip(peer.ip(), xff, &self.trusted)
        });
        routing::Request {
            path: req.uri.path(),
            query: req.uri.query(),
            upgrade: session.is_upgrade_req(),
            preflight: req.method == http::Method::OPTIONS,
            origin: req.headers.get("origin").map(|v| v.as_bytes()),
            head_bytes: routing::head_size(req),
            client,
            nonce: fastrand::u64(..),
        }
    }

    /// Answers a refused request itself, counted and logged once per class.
    async fn refuse(&self, session: &mut Session, refusal: Refusal) -> Result<bool> {
        if let Some(reason) = refusal.sticky {
            METRICS
                .sticky_rejects
                .with_label_values(&[reason.as_str()])
                .inc();
        }
        let class = refusal.class;
        METRICS.rejects.with_label_values(&[class.as_str()]).inc();
        let req = session.req_header();
        let mut target = req.uri.to_string();
        target.truncate(120);
        let peer = session
            .client_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        self.rejections.note(
            class.as_str(),
            &format_args!("{} {target} from {peer}", req.method),
        );
        let (status, body) = class.response();
        let retry_after = refusal.retry_after;
        let json = body.starts_with('{');
        let content_type = if json {
            "application/json"
        } else {
            "text/plain"
        };
        // A browser page on an allowed origin may read why (a worker's refusals say it too).
        let cors = self.router.cors().headers(origin(session));
        let mut resp = ResponseHeader::build(status, Some(4 + cors.len()))?;
        resp.insert_header("Content-Type", content_type)?;
        resp.insert_header("Content-Length", body.len().to_string())?;
        if let Some(secs) = retry_after {
            resp.insert_header("Retry-After", secs.to_string())?;
        }
        for (name, value) in cors {
            resp.insert_header(name, value)?;
        }
        session.set_keepalive(None);
        session.write_response_header(Box::new(resp), false).await?;
        session
            .write_response_body(Some(Bytes::from_static(body.as_bytes())), true)
            .await?;
        Ok(true)
    }

    /// A browser's CORS preflight, answered here: it must never be placed, nor reach a worker
    /// that would take it for a request of an unknown session.
    async fn preflight(&self, session: &mut Session) -> Result<bool> {
        let req = session.req_header();
        let asked = req
            .headers
            .get("access-control-request-headers")
            .map(|v| v.as_bytes());
        let headers = self.router.cors().preflight_headers(origin(session), asked);
        let mut resp = ResponseHeader::build(204, Some(1 + headers.len()))?;
        resp.insert_header("Content-Length", "0")?;
        for (name, value) in headers {
            resp.insert_header(name, value)?;
        }
        session.write_response_header(Box::new(resp), true).await?;
        Ok(true)
    }

    /// X-Forwarded-For (see [`routing::forwarded_for`]), X-Forwarded-Proto, and the client's
    /// address as judged here ([`shared::protocol::CLIENT_IP_HEADER`], never the client's own).
    fn add_forwarded(&self, session: &Session, req: &mut RequestHeader, ctx: &Ctx) -> Result<()> {
        req.remove_header(shared::protocol::CLIENT_IP_HEADER);
        // Only the balancer says a handed-over connection stays (`hand_off_poll`).
        req.remove_header(handoff_proto::KEEP_HEADER);
        let Some(peer) = session.client_addr().and_then(|a| a.as_inet()) else {
            return Ok(());
        };
        let peer = peer.ip();
        // Judged once, by routing (`request`), from the headers as the client sent them.
        if let Some(client) = ctx.client {
            req.insert_header(shared::protocol::CLIENT_IP_HEADER, client.to_string())?;
        }
        let previous = req
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok());
        let xff = routing::forwarded_for(peer, previous, &self.trusted);
        let trusted = self.trusted.iter().any(|n| n.contains(&peer));
        req.insert_header("X-Forwarded-For", xff)?;
        if !trusted || req.headers.get("x-forwarded-proto").is_none() {
            let proto = if self.tls { "https" } else { "http" };
            req.insert_header("X-Forwarded-Proto", proto)?;
        }
        Ok(())
    }

    /// Counts a new session on its worker (load, metrics; a panic placement logged once).
    fn count_placement(&self, route: &Route) {
        let label = route.worker.label();
        route.worker.load().placed();
        METRICS.placed.with_label_values(&[label]).inc();
        if route.panic {
            METRICS.panic_placements.with_label_values(&[label]).inc();
            self.rejections.note(
                "panic_placement",
                &format_args!(
                    "no worker passes its probe: new sessions go to every worker that still answers ({label})"
                ),
            );
        }
    }

    /// After the routed worker failed a new session before answering: another worker for it,
    /// if one is left. True when the route now names it.
    fn place_again(&self, ctx: &mut Ctx) -> bool {
        let Some(route) = ctx.route.as_mut() else {
            return false;
        };
        if route.session != routing::Session::New {
            return false;
        }
        // The failed placement made no session.
        self.ended(&route.worker);
        if ctx.tried.len() + 1 >= MAX_PLACEMENTS {
            return false;
        }
        ctx.tried.push(route.worker.addr());
        let snapshot = self.workers.snapshot();
        let Some(placed) = snapshot.place(&ctx.key, fastrand::u64(..), &ctx.tried) else {
            return false;
        };
        route.worker = Arc::clone(placed.worker);
        route.panic = placed.panic;
        ctx.tag_answer = route.tag_answer();
        self.count_placement(route);
        true
    }

    /// Passes a long-polling request of an existing session, with its client's connection, to
    /// the session's worker, as a WebSocket is (`shared::handoff`): the worker answers it and
    /// closes the connection, and the client's next request comes back through here on a new
    /// one. Only the first request of a connection, and only when the listener read nothing
    /// past its body (`first_body`): later requests' bytes may sit in pingora's buffer. True
    /// when passed; otherwise the request is proxied as before (the worker has no channel, is
    /// gone, or did not take it in time: the proxy then finds out which).
    async fn hand_off_poll(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        body: Bytes,
    ) -> Result<bool> {
        let Some(route) = &ctx.route else {
            return Ok(false);
        };
        let label = route.worker.label();
        let Some(channel) = self.handoffs.get(label) else {
            return Ok(false);
        };
        let mut req = session.req_header().clone();
        self.add_forwarded(session, &mut req, ctx)?;
        // The connection stays with the worker for the later requests of its sessions (the
        // worker gives back any other).
        req.insert_header(handoff_proto::KEEP_HEADER, route.worker.tag().as_str())?;
        let mut head = raw_http::serialize(&req);
        head.extend_from_slice(&body);
        let slot = ctx.take_slot();
        match channel
            .pass(session, &head, CONNECT_TIMEOUT, slot, false)
            .await
        {
            Ok(()) => {
                ctx.handed = true;
                Ok(true)
            }
            Err((e, slot)) => {
                ctx.put_slot(slot);
                self.rejections.note(
                    "handoff_failed",
                    &format_args!("worker={label}: {e}; proxying the polling request instead"),
                );
                Ok(false)
            }
        }
    }

    /// A WebSocket upgrade, never through pingora's proxy loop. A new session whose worker
    /// fails before answering is placed again, as in `fail_to_connect`; an existing one whose
    /// worker is gone is told its session is, as in `fail_to_proxy`.
    async fn upgrade(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        loop {
            let route = ctx.route.clone().expect("routed before upgrading");
            let failed = match self.upgrade_to(session, &route, ctx).await? {
                Attempt::Done(done) => return Ok(done),
                Attempt::WorkerFailed(e) => e,
            };
            if self.place_again(ctx) {
                continue;
            }
            let refusal = if worker_gone(&route, &failed).await {
                Refusal::sticky(Class::SessionUnknown, StickyReason::WorkerDown)
            } else {
                Refusal::plain(Class::UpstreamFailed)
            };
            return self.refuse(session, refusal).await;
        }
    }

    /// One attempt: the client's connection is passed to the worker when the route says so
    /// and the worker has a channel (`handoff`), else tunnelled here (`ws_tunnel`).
    async fn upgrade_to(
        &self,
        session: &mut Session,
        route: &Route,
        ctx: &mut Ctx,
    ) -> Result<Attempt> {
        let mut req = session.req_header().clone();
        self.add_forwarded(session, &mut req, ctx)?;
        let label = route.worker.label();
        let channel = (route.carry == Carry::HandOff)
            .then(|| self.handoffs.get(label))
            .flatten();
        let early = ctx.after_upgrade();
        if let Some(channel) = channel {
            let mut head = raw_http::serialize(&req);
            // What the client sent after its request is read by the worker right after it.
            head.extend_from_slice(&early);
            let slot = ctx.take_slot();
            match channel
                .pass(session, &head, CONNECT_TIMEOUT, slot, true)
                .await
            {
                Ok(()) => {
                    METRICS.handoff(HandoffOutcome::Passed);
                    ctx.websocket = true;
                    return Ok(Attempt::Done(true));
                }
                Err((e, slot)) => {
                    ctx.put_slot(slot);
                    // E.g. the worker died a moment ago: its restart gets a new channel.
                    METRICS.handoff(HandoffOutcome::Relayed);
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
            closing: self.closing.clone(),
        };
        let open = METRICS.websockets.with_label_values(&[label]);
        // The WebSocket carries its session to the end: when it closes, the session is over.
        let ended = (self.counts_ends && route.session != routing::Session::Page)
            .then(|| Arc::clone(&route.worker));
        let lasting = || -> Box<dyn FnOnce() + Send> {
            let slot = ctx.take_slot();
            Box::new(move || {
                if let Some(worker) = ended {
                    worker.load().ended();
                }
                drop(slot);
            })
        };
        let tunnel = ws_tunnel::run(
            session,
            route.worker.addr(),
            &req,
            &early,
            &limits,
            open,
            lasting,
        );
        match tunnel.await {
            Ok(ws_tunnel::Outcome::Tunnelled) => ctx.websocket = true,
            Ok(ws_tunnel::Outcome::Refused) => {
                if route.session == routing::Session::New {
                    self.ended(&route.worker);
                }
            }
            Err(e) => {
                tracing::debug!(worker = %label, "websocket upgrade failed: {e}");
                METRICS.upstream_errors.with_label_values(&[label]).inc();
                return Ok(Attempt::WorkerFailed(e));
            }
        }
        Ok(Attempt::Done(true))
    }
}

/// Whether long-polling requests of existing sessions are handed to the workers.
pub fn polls_leave(cfg: &FleetConfig) -> bool {
    cfg.spawns_workers()
        && cfg.workers.handoff
        && cfg.workers.handoff_polling
        && !cfg.balancer.tls.enabled()
        && cfg.balancer.health_check != HealthCheck::Engineio
}

/// Whether a request announces a body.
fn has_body(req: &RequestHeader) -> bool {
    req.headers.contains_key("transfer-encoding")
        || req
            .headers
            .get("content-length")
            .is_some_and(|v| v.as_bytes().trim_ascii() != b"0")
}

/// Whether an Engine.IO v4 payload, read so far up to `chunk` (after a byte `before`, if
/// any), ends with a close packet: `1` alone or after a record separator, a client leaving
/// over polling.
fn ends_with_close(before: Option<u8>, chunk: &[u8]) -> bool {
    match chunk {
        [b'1'] => matches!(before, None | Some(0x1e)),
        _ => chunk.ends_with(b"\x1e1"),
    }
}

/// The request's `Origin` header.
fn origin(session: &Session) -> Option<&[u8]> {
    session
        .req_header()
        .headers
        .get("origin")
        .map(|v| v.as_bytes())
}

impl Ctx {
    /// The bytes that followed the upgrade request on its connection (kept by the listener).
    fn after_upgrade(&self) -> Bytes {
        self.conn
            .as_ref()
            .and_then(|c| c.after_upgrade.lock().unwrap().clone())
            .unwrap_or_default()
    }

    /// What the listener kept of the connection's first request's body (see
    /// `front::ConnInfo::first_body`); `None` from the second request on.
    fn take_first_body(&self) -> Option<Bytes> {
        self.conn
            .as_ref()
            .and_then(|c| c.first_body.lock().unwrap().take())
    }

    /// Whether the client pipelined requests on this connection (`front::ConnInfo`).
    fn pipelined(&self) -> bool {
        self.conn
            .as_ref()
            .is_some_and(|c| c.pipelined.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn take_slot(&self) -> ConnSlot {
        self.conn
            .as_ref()
            .map(|c| std::mem::take(&mut *c.slot.lock().unwrap()))
            .unwrap_or_default()
    }

    fn put_slot(&self, slot: ConnSlot) {
        if let Some(conn) = &self.conn {
            *conn.slot.lock().unwrap() = slot;
        }
    }
}

/// How one upgrade attempt ended.
enum Attempt {
    /// Answered (handed off, tunnelled, or the worker's refusal relayed); as `request_filter`.
    Done(bool),
    /// The worker failed before the client was sent anything.
    WorkerFailed(Box<Error>),
}

/// How long `worker_gone` waits for a worker's port to answer.
const GONE_CHECK: Duration = Duration::from_millis(250);

/// Whether the worker of an existing session failed because it is gone (nothing listens on
/// its port any more), so the session went with it. Such a request is answered as a restarted
/// worker, and routing once the probes catch up, answer it: 400 "Session ID unknown", which
/// sends the client to a fresh handshake, rather than a 502 for a failure that will not pass.
/// A worker that merely broke one connection is not gone: its failure stays a 502.
async fn worker_gone(route: &Route, e: &Error) -> bool {
    if route.session == routing::Session::New {
        return false;
    }
    match e.etype() {
        ErrorType::ConnectRefused => true,
        // A connect reset while the dying process's listener is torn down, or broken
        // mid-request: gone only if a fresh connection is refused too.
        ErrorType::ConnectError
        | ErrorType::ConnectionClosed
        | ErrorType::ReadError
        | ErrorType::WriteError => {
            let connect = tokio::net::TcpStream::connect(route.worker.addr());
            matches!(
                tokio::time::timeout(GONE_CHECK, connect).await,
                Ok(Err(refused)) if refused.kind() == std::io::ErrorKind::ConnectionRefused
            )
        }
        _ => false,
    }
}

#[async_trait]
impl ProxyHttp for FleetProxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            route: None,
            key: Vec::new(),
            tried: Vec::new(),
            tag_answer: None,
            body: Vec::new(),
            websocket: false,
            handed: false,
            session_gone: false,
            client: None,
            conn: None,
            closes_session: false,
            body_last: None,
            started: Instant::now(),
        }
    }

    fn on_connection_reuse(
        &self,
        _session: &mut Session,
        ctx: &mut Ctx,
        conn: Box<dyn std::any::Any + Send + Sync>,
    ) {
        // Set by the listener (`front`) on every request of a connection.
        ctx.conn = conn.downcast::<Arc<front::ConnInfo>>().ok().map(|c| *c);
    }

    async fn early_request_filter(&self, session: &mut Session, _ctx: &mut Ctx) -> Result<()> {
        // The head has arrived: from now on the connection idles under the normal keepalive.
        session.set_keepalive(Some(front::KEEPALIVE_SECS));
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        // Whatever this request is, the next one on the connection is not the first.
        let first_body = ctx.take_first_body();
        let request = self.request(session);
        ctx.client = request.client;
        if request.upgrade && has_body(session.req_header()) {
            // A client's WebSocket frames must wait for the 101 (RFC 6455 4.1).
            return self
                .refuse(session, Refusal::plain(Class::BadRequest))
                .await;
        }
        let decision = self.router.route(&request, &self.workers.snapshot());
        let route = match decision {
            Decision::Refuse(refusal) => return self.refuse(session, refusal).await,
            Decision::Preflight => return self.preflight(session).await,
            Decision::Route(route) => route,
        };
        match &route.session {
            routing::Session::Existing { target } => {
                let uri = target
                    .parse()
                    .or_err(ErrorType::InvalidHTTPHeader, "rewritten uri")?;
                session.req_header_mut().set_uri(uri);
            }
            routing::Session::New => {
                if let (Some(limits), Some(ip)) = (&self.limits, ctx.client)
                    && let Err(limited) = limits.handshake(ip)
                {
                    let refusal = Refusal::limited(limited.retry_after_secs);
                    return self.refuse(session, refusal).await;
                }
                // Kept for placing it again should its worker fail (`place_again`).
                ctx.key = routing::placement_key(&request);
                self.count_placement(&route);
            }
            routing::Session::Page => {}
        }
        ctx.tag_answer = route.tag_answer();
        let carry = route.carry;
        let poll = self.polls_leave
            && route.transport == routing::Transport::Polling
            && matches!(route.session, routing::Session::Existing { .. });
        ctx.route = Some(route);
        match carry {
            Carry::Proxy => match first_body {
                Some(body) if poll => self.hand_off_poll(session, ctx, body).await,
                _ => Ok(false),
            },
            Carry::HandOff | Carry::Relay => self.upgrade(session, ctx).await,
        }
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        _ctx: &mut Ctx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        let req = session.req_header();
        // A request whose head or body could not be written to a kept-alive connection never
        // reached the worker whole, so it was not processed: sending it again on a fresh
        // connection is safe, POSTs included. A worker restarted on the same port (kill -9,
        // then the supervisor) then answers "Session ID unknown" itself, rather than the client
        // getting a 502 for the dead one's pooled connection.
        let unsent = client_reused
            && matches!(e.etype(), ErrorType::WriteError)
            && !session.as_ref().retry_buffer_truncated();
        if unsent {
            e.set_retry(true);
        } else if !req.method.is_idempotent() || session.as_ref().retry_buffer_truncated() {
            e.set_retry(false);
        } else {
            e.retry.decide_reuse(client_reused);
        }
        e
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // A new session whose worker refused (it died a moment ago, before its probes said
        // so) is placed on another worker in the same request: the client never sees a 502.
        if self.place_again(ctx) {
            e.set_retry(true);
        }
        e
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let answered = session.as_downstream().response_written().is_some();
        if !answered
            && let Some(route) = &ctx.route
            && worker_gone(route, e).await
        {
            ctx.session_gone = true;
            let refusal = Refusal::sticky(Class::SessionUnknown, StickyReason::WorkerDown);
            // A client that left meanwhile needs no answer.
            let _ = self.refuse(session, refusal).await;
            return FailToProxy {
                error_code: 400,
                can_reuse_downstream: false,
            };
        }
        // pingora's own answer otherwise.
        let code = match (e.etype(), e.esource()) {
            (ErrorType::HTTPStatus(code), _) => *code,
            (_, ErrorSource::Upstream) => 502,
            (
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed,
                ErrorSource::Downstream,
            ) => 0, // the client is gone
            (_, ErrorSource::Downstream) => 400,
            (_, ErrorSource::Internal | ErrorSource::Unset) => 500,
        };
        if code > 0 && !answered {
            let _ = session.respond_error(code).await;
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        ctx: &Ctx,
        error: &Error,
        _context: ProxyWarnLogContext,
    ) -> bool {
        self.rejections.note(
            "placed_again",
            &format_args!(
                "{error}; the new session went to another worker ({} tried)",
                ctx.tried.len()
            ),
        );
        true
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let route = ctx
            .route
            .as_ref()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no worker chosen"))?;
        let mut peer = HttpPeer::new(route.worker.addr(), false, String::new());
        peer.options.connection_timeout = Some(CONNECT_TIMEOUT);
        peer.options.read_timeout = Some(self.upstream_read_timeout);
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        self.add_forwarded(session, req, ctx)
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(route) = &ctx.route {
            if self.polls_leave
                && route.transport == routing::Transport::Polling
                && !ctx.pipelined()
            {
                // The session's next request should come on a new connection, the first of
                // which the balancer can hand to the worker. (A pipelining client's next
                // requests are already here: they are answered on this one.)
                session.set_keepalive(None);
            }
            let ok = resp.status.as_u16() == 200;
            // A close the worker took ends its session; a handshake it refused made none.
            if (ctx.closes_session && ok) || (ctx.tag_answer.is_some() && !ok) {
                self.ended(&route.worker);
            }
        }
        if ctx.tag_answer.is_some() {
            if resp.status.as_u16() == 200 {
                // The body grows by the tag: re-frame it rather than trust the old length.
                resp.remove_header("Content-Length");
                resp.insert_header("Transfer-Encoding", "chunked")?;
            } else {
                ctx.tag_answer = None;
            }
        }
        Ok(())
    }

    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if !self.counts_ends {
            return Ok(());
        }
        let Some(route) = &ctx.route else {
            return Ok(());
        };
        let existing = matches!(route.session, routing::Session::Existing { .. });
        let req = session.req_header();
        if existing && route.carry == Carry::Proxy && req.method == http::Method::POST {
            let eio4 = req
                .uri
                .query()
                .is_some_and(|q| q.split('&').any(|p| p == "EIO=4"));
            if let Some(chunk) = body.as_ref().filter(|c| !c.is_empty()) {
                ctx.closes_session = eio4 && ends_with_close(ctx.body_last, chunk);
                ctx.body_last = chunk.last().copied();
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
        let Some(tag) = ctx.tag_answer else {
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
                    let worker = ctx.route.as_ref().map(|r| r.worker.label());
                    tracing::warn!(worker = ?worker, "handshake not rewritten: {e}");
                    Bytes::from(original)
                }
            });
        }
        Ok(None)
    }

    fn suppress_error_log(&self, _session: &Session, ctx: &Ctx, error: &Error) -> bool {
        // A dead worker fails every request on it: one line per kind, not per request.
        // (WebSockets never get here: they leave pingora's proxy loop.)
        let class = format!(
            "{} error {}",
            error.esource().as_str().to_lowercase(),
            error.etype().as_str()
        );
        let (worker, transport) = ctx
            .route
            .as_ref()
            .map_or(("", ""), |r| (r.worker.label(), r.transport.as_str()));
        self.rejections.note(
            &class,
            &format_args!("worker={worker} transport={transport}: {error}"),
        );
        true
    }

    async fn logging(&self, _session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        let Some(route) = &ctx.route else { return };
        let label = route.worker.label();
        METRICS
            .requests
            .with_label_values(&[label, route.transport.as_str()])
            .inc();
        // A WebSocket counts itself in the websockets gauge while it lasts; a polling request
        // handed to its worker ends there, unseen.
        if !ctx.websocket && !ctx.handed {
            METRICS
                .duration
                .observe(ctx.started.elapsed().as_secs_f64());
        }
        if let Some(e) = e
            && matches!(e.esource(), ErrorSource::Upstream)
        {
            METRICS.upstream_errors.with_label_values(&[label]).inc();
            // pingora answered it (502/504): a refusal like any other, for `rejects_total`.
            // (A session found gone was counted as refused when it was answered.)
            if !ctx.session_gone {
                METRICS
                    .rejects
                    .with_label_values(&[Class::UpstreamFailed.as_str()])
                    .inc();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ends_with_close;

    #[test]
    fn a_close_packet_is_the_last_packet_of_a_payload() {
        assert!(ends_with_close(None, b"1"));
        assert!(ends_with_close(None, b"41\x1e1"));
        assert!(ends_with_close(Some(b'x'), b"\x1e1"));
        assert!(
            ends_with_close(Some(0x1e), b"1"),
            "split after the separator"
        );
        assert!(
            !ends_with_close(Some(b'c'), b"1"),
            "the end of a message split in two"
        );
        assert!(!ends_with_close(None, b"42[\"a\",1]"));
        assert!(!ends_with_close(None, b"41"));
        assert!(!ends_with_close(None, b"2"));
    }
}
