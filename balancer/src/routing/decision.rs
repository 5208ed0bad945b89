//! What the router decides for one request, and the label values the decision is counted
//! under. Every refusal has a class (a status, a body, a `class` label) and, when stickiness
//! refused it, a reason.

use std::sync::Arc;

use crate::sticky::Tag;
use crate::workers::Worker;

/// The router's verdict on a request.
#[derive(Debug, Clone)]
pub enum Decision {
    /// Send it to a worker.
    Route(Route),
    /// A browser's CORS preflight: answered here, with the `socketio.cors` headers.
    Preflight,
    /// Answer it here.
    Refuse(Refusal),
}

/// Where a request goes and how.
#[derive(Debug, Clone)]
pub struct Route {
    /// The worker.
    pub worker: Arc<Worker>,
    /// The Engine.IO transport the request is for.
    pub transport: Transport,
    /// A session the worker holds, or a new one placed on it.
    pub session: Session,
    /// How the request reaches it.
    pub carry: Carry,
    /// No worker was up: the worker only still answers its probes (panic mode).
    pub panic: bool,
}

impl Route {
    /// The tag to add to the sid in the worker's answer: on a new polling session's
    /// handshake, so the client echoes the tag in every later request.
    pub fn tag_answer(&self) -> Option<Tag> {
        let handshake = matches!(self.session, Session::New)
            && self.transport == Transport::Polling
            && self.carry == Carry::Proxy;
        handshake.then(|| self.worker.tag())
    }
}

/// Whose session a request belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Session {
    /// One the worker issued; the request target with the sid as the worker knows it (tag
    /// removed).
    Existing {
        /// Path and query to send the worker.
        target: String,
    },
    /// A handshake: no sid yet. The session is placed on the route's worker.
    New,
    /// Not Engine.IO: a path of `balancer.forward_paths`, sent to any ready worker.
    Page,
}

/// How a routed request reaches its worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carry {
    /// Proxied by pingora: long-polling, and any other plain request.
    Proxy,
    /// A WebSocket upgrade: the client's connection itself is passed to the worker (a worker
    /// this balancer runs), falling back to `Relay` if that fails.
    HandOff,
    /// A WebSocket upgrade relayed through the balancer (workers it does not run).
    Relay,
}

/// An Engine.IO transport: the `transport` label of `fleet_balancer_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// HTTP long-polling.
    Polling,
    /// WebSocket.
    WebSocket,
    /// A plain HTTP request of `balancer.forward_paths` (an app's pages).
    Http,
}

impl Transport {
    /// The query value and label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Polling => "polling",
            Transport::WebSocket => "websocket",
            Transport::Http => "http",
        }
    }

    /// From the `transport` query value.
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "polling" => Some(Transport::Polling),
            "websocket" => Some(Transport::WebSocket),
            _ => None,
        }
    }
}

/// A request answered by the balancer itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// Why, as counted in `fleet_balancer_rejects_total{class}`.
    pub class: Class,
    /// When stickiness refused it, why, as counted in
    /// `fleet_balancer_sticky_rejects_total{reason}`.
    pub sticky: Option<StickyReason>,
    /// The `Retry-After` to send, in seconds.
    pub retry_after: Option<u64>,
}

impl Refusal {
    /// A refusal of `class` that stickiness did not cause.
    pub fn plain(class: Class) -> Self {
        Refusal {
            class,
            sticky: None,
            retry_after: None,
        }
    }

    /// A refusal by stickiness.
    pub fn sticky(class: Class, reason: StickyReason) -> Self {
        Refusal {
            class,
            sticky: Some(reason),
            retry_after: None,
        }
    }

    /// A client address over a limit, told when to try again.
    pub fn limited(retry_after_secs: u64) -> Self {
        Refusal {
            class: Class::RateLimited,
            sticky: None,
            retry_after: Some(retry_after_secs),
        }
    }
}

/// Why a request was refused: the `class` label of `fleet_balancer_rejects_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// A path outside the Engine.IO path: 404.
    NotFound,
    /// A malformed Engine.IO query: 400.
    BadRequest,
    /// A sid that names no worker, a down worker, or is malformed: 400 Session ID unknown.
    SessionUnknown,
    /// A request head over `balancer.max_header_bytes`: 431.
    HeaderTooLarge,
    /// No worker is ready for a new session: 503.
    NoWorker,
    /// The chosen worker failed before answering: 502.
    UpstreamFailed,
    /// A handshake or upgrade from a web origin `socketio.cors.origins` does not list: 403.
    Forbidden,
    /// A request line over `balancer.max_header_bytes`: 414.
    UriTooLong,
    /// A client address over a `balancer.limits` limit: 429 with `Retry-After`.
    RateLimited,
    /// A first request head that did not arrive whole within `balancer.header_timeout_secs`:
    /// 408, and the connection closed.
    HeaderTimeout,
    /// A connection closed partway through its first request head: counted, nothing to answer.
    IncompleteHead,
    /// A TLS handshake that failed or did not finish within `balancer.header_timeout_secs`.
    TlsHandshake,
}

const SESSION_UNKNOWN: &str = r#"{"code":1,"message":"Session ID unknown"}"#;
const BAD_REQUEST: &str = r#"{"code":3,"message":"Bad request"}"#;

impl Class {
    /// Every class.
    pub const ALL: [Class; 12] = [
        Class::NotFound,
        Class::BadRequest,
        Class::SessionUnknown,
        Class::HeaderTooLarge,
        Class::NoWorker,
        Class::UpstreamFailed,
        Class::Forbidden,
        Class::UriTooLong,
        Class::RateLimited,
        Class::HeaderTimeout,
        Class::IncompleteHead,
        Class::TlsHandshake,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Class::NotFound => "not_found",
            Class::BadRequest => "bad_request",
            Class::SessionUnknown => "session_unknown",
            Class::HeaderTooLarge => "header_too_large",
            Class::NoWorker => "no_worker",
            Class::UpstreamFailed => "upstream_failed",
            Class::Forbidden => "forbidden",
            Class::UriTooLong => "uri_too_long",
            Class::RateLimited => "rate_limited",
            Class::HeaderTimeout => "header_timeout",
            Class::IncompleteHead => "incomplete_head",
            Class::TlsHandshake => "tls_handshake",
        }
    }

    /// The answer: status and body (Engine.IO's own JSON errors where a client parses them).
    pub fn response(self) -> (u16, &'static str) {
        match self {
            Class::NotFound => (404, "not found\n"),
            Class::BadRequest => (400, BAD_REQUEST),
            Class::SessionUnknown => (400, SESSION_UNKNOWN),
            Class::HeaderTooLarge => (431, "request header fields too large\n"),
            Class::NoWorker => (503, "no worker ready\n"),
            Class::UpstreamFailed => (502, "worker unavailable\n"),
            Class::Forbidden => (403, shared::cors::FORBIDDEN_BODY),
            Class::UriTooLong => (414, "request line too long\n"),
            Class::RateLimited => (429, "too many requests from this address\n"),
            Class::HeaderTimeout => (408, "request head timed out\n"),
            Class::IncompleteHead => (400, "incomplete request head\n"),
            Class::TlsHandshake => (400, "tls handshake failed\n"),
        }
    }
}

/// Why stickiness refused a request: the `reason` label of
/// `fleet_balancer_sticky_rejects_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StickyReason {
    /// The query or the sid could not be read.
    Malformed,
    /// The sid's tag names no worker of the fleet.
    UnknownWorker,
    /// The sid's worker is not up.
    WorkerDown,
}

impl StickyReason {
    /// Every reason.
    pub const ALL: [StickyReason; 3] = [
        StickyReason::Malformed,
        StickyReason::UnknownWorker,
        StickyReason::WorkerDown,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            StickyReason::Malformed => "malformed",
            StickyReason::UnknownWorker => "unknown_worker",
            StickyReason::WorkerDown => "worker_down",
        }
    }
}
