//! The routing core: a request (what [`Request`] keeps of it) and a snapshot of the fleet in,
//! a [`Decision`] out. No I/O, no clock, no globals: the proxy's hooks only carry decisions
//! out, and the whole table is tested here without a socket.
//!
//! The rules, in order: a head over `max_header_bytes` is refused (431); a path outside the
//! Engine.IO path is not ours (404); a preflight (`OPTIONS`) is answered here with the CORS
//! headers, never placed; the query must parse and name a transport (400); a handshake or
//! upgrade from an origin `socketio.cors.origins` does not list is refused (403). Then a
//! request with a sid goes to the worker its tag names, the tag removed, if that worker is up
//! (else 400 "Session ID unknown", as a worker answers a sid it does not know, so the client
//! reconnects); a request without one is a new session, placed by the configured policy (503
//! if no worker is up). Upgrades are handed off or relayed; everything else is proxied.

mod decision;
mod request;
#[cfg(test)]
mod tests;

use shared::FleetConfig;
use shared::cors::Cors;
use shared::eio_query as query;

pub use decision::{Carry, Class, Decision, Refusal, Route, Session, StickyReason, Transport};
pub use request::{Request, client_ip, forwarded_for, head_size};

use crate::sticky::TaggedSid;
use crate::workers::Snapshot;

/// What new sessions from `req` are placed by: the client's address.
pub fn placement_key(req: &Request<'_>) -> Vec<u8> {
    req.client
        .map(|ip| ip.to_string().into_bytes())
        .unwrap_or_default()
}

/// The routing rules of one fleet file.
#[derive(Debug, Clone)]
pub struct Router {
    path: String,
    max_header_bytes: usize,
    handoff: bool,
    cors: Cors,
    forward_paths: Vec<String>,
}

/// A worker's own endpoints (and everything under `/api/`): never forwarded, whatever
/// `forward_paths` says.
const PRIVATE_PATHS: [&str; 4] = ["/metrics", "/healthz", "/readyz", "/api"];

impl Router {
    /// The rules for `cfg`: its Engine.IO path and head limit; WebSockets are handed off when
    /// the balancer runs the workers and `workers.handoff` is on.
    pub fn new(cfg: &FleetConfig) -> Self {
        Router {
            path: cfg.socketio.path.trim_end_matches('/').to_owned(),
            max_header_bytes: cfg.balancer.max_header_bytes,
            handoff: cfg.spawns_workers() && cfg.workers.handoff,
            cors: Cors::new(&cfg.socketio.cors),
            forward_paths: cfg.balancer.forward_paths.clone(),
        }
    }

    /// The CORS policy requests are answered under.
    pub fn cors(&self) -> &Cors {
        &self.cors
    }

    /// Decides where `req` goes in `fleet`.
    pub fn route(&self, req: &Request<'_>, fleet: &Snapshot) -> Decision {
        match self.try_route(req, fleet) {
            Ok(Some(route)) => Decision::Route(route),
            Ok(None) => Decision::Preflight,
            Err(refusal) => Decision::Refuse(refusal),
        }
    }

    /// A path outside the Engine.IO path: an app's page when `forward_paths` covers it (to any
    /// ready worker, as a new session would be placed), else not ours (404). A worker's own
    /// endpoints stay private.
    fn page(&self, req: &Request<'_>, fleet: &Snapshot) -> Result<Route, Refusal> {
        let private = PRIVATE_PATHS.contains(&req.path) || req.path.starts_with("/api/");
        let forwarded = self
            .forward_paths
            .iter()
            .any(|p| req.path.starts_with(p.as_str()));
        if private || !forwarded || req.upgrade {
            return Err(Refusal::plain(Class::NotFound));
        }
        let placed = fleet
            .place(&placement_key(req), req.nonce, &[])
            .ok_or(Refusal::plain(Class::NoWorker))?;
        Ok(Route {
            worker: placed.worker.clone(),
            transport: Transport::Http,
            session: Session::Page,
            carry: Carry::Proxy,
            panic: placed.panic,
        })
    }

    /// `Ok(None)`: a preflight, answered by the balancer.
    fn try_route(&self, req: &Request<'_>, fleet: &Snapshot) -> Result<Option<Route>, Refusal> {
        if req.head_bytes > self.max_header_bytes {
            return Err(Refusal::plain(Class::HeaderTooLarge));
        }
        if !query::under_path(req.path, &self.path) {
            return self.page(req, fleet).map(Some);
        }
        if req.preflight {
            return Ok(None);
        }
        let params = query::parse(req.query)
            .map_err(|_| Refusal::sticky(Class::BadRequest, StickyReason::Malformed))?;
        let transport = params
            .transport
            .as_deref()
            .and_then(Transport::parse)
            .ok_or(Refusal::plain(Class::BadRequest))?;
        // Cross-site WebSocket hijacking, and sessions opened by pages not listed.
        if (req.upgrade || params.sid.is_none()) && !self.cors.admits(req.origin) {
            return Err(Refusal::plain(Class::Forbidden));
        }
        // Only a WebSocket's upgrade leaves the proxy loop: a polling request that carries
        // upgrade headers is proxied as the polling request it is.
        let carry = match (
            req.upgrade && transport == Transport::WebSocket,
            self.handoff,
        ) {
            (false, _) => Carry::Proxy,
            (true, true) => Carry::HandOff,
            (true, false) => Carry::Relay,
        };
        let (worker, session, panic) = match params.sid.as_deref() {
            Some(text) => {
                let unknown = |reason| Refusal::sticky(Class::SessionUnknown, reason);
                let tagged =
                    TaggedSid::parse(text).map_err(|_| unknown(StickyReason::Malformed))?;
                let worker = fleet
                    .by_tag(tagged.tag)
                    .ok_or(unknown(StickyReason::UnknownWorker))?;
                // In panic mode (no worker up) a worker that still answers keeps its sessions.
                let panic = !worker.is_up() && worker.answers() && fleet.ready() == 0;
                if !worker.is_up() && !panic {
                    return Err(unknown(StickyReason::WorkerDown));
                }
                // The worker sees exactly its own sid.
                let target = format!(
                    "{}?{}",
                    req.path,
                    query::with_sid(req.query.unwrap_or(""), tagged.sid)
                );
                (worker, Session::Existing { target }, panic)
            }
            None => {
                let placed = fleet
                    .place(&placement_key(req), req.nonce, &[])
                    .ok_or(Refusal::plain(Class::NoWorker))?;
                (placed.worker, Session::New, placed.panic)
            }
        };
        Ok(Some(Route {
            worker: worker.clone(),
            transport,
            session,
            carry,
            panic,
        }))
    }
}
