//! Every metric and label name in one place: dashboards, alerts and tests depend on them.

/// Label carrying the worker id: on every worker sample, and on the balancer's per-worker
/// series.
pub const LABEL_WORKER: &str = "worker";
/// Label carrying the event name.
pub const LABEL_EVENT: &str = "event";
/// Label carrying the Engine.IO transport of a proxied request (`polling`, `websocket`).
pub const LABEL_TRANSPORT: &str = "transport";
/// Label carrying how a WebSocket handoff ended (`passed`, `relayed`).
pub const LABEL_OUTCOME: &str = "outcome";
/// Label carrying why stickiness refused a request (`malformed`, `unknown_worker`,
/// `worker_down`).
pub const LABEL_REASON: &str = "reason";
/// Label carrying the class of a request the balancer refused itself.
pub const LABEL_CLASS: &str = "class";
/// Label: how an authentication ended.
pub const LABEL_RESULT: &str = "result";
/// Label: what a client tried.
pub const LABEL_ACTION: &str = "action";
/// Label: a server API endpoint.
pub const LABEL_ENDPOINT: &str = "endpoint";
/// Label: an HTTP status code.
pub const LABEL_CODE: &str = "code";

/// Gauge: sockets connected to this worker.
pub const WORKER_CONNECTIONS: &str = "fleet_worker_connections";
/// Counter by `event`: events received from clients.
pub const WORKER_EVENTS_TOTAL: &str = "fleet_worker_events_total";
/// Counter: room broadcasts started on this worker.
pub const WORKER_BROADCASTS_TOTAL: &str = "fleet_worker_broadcasts_total";
/// Histogram: time to hand a broadcast to Redis and the local members.
pub const WORKER_BROADCAST_DURATION: &str = "fleet_worker_broadcast_duration_seconds";
/// Counter: room messages not queued to a member of this worker because its buffer was full
/// or it had closed (seen when this worker publishes).
pub const WORKER_DELIVERIES_DROPPED_TOTAL: &str = "fleet_worker_deliveries_dropped_total";
/// Histogram: how late a peer's pub/sub probe arrives here.
pub const WORKER_PUBSUB_LAG: &str = "fleet_worker_pubsub_lag_seconds";
/// Histogram: how late a periodic timer wakes (event-loop lag).
pub const WORKER_EVENT_LOOP_LAG: &str = "fleet_worker_event_loop_lag_seconds";
/// Gauge 0/1: subscribed to Redis right now.
pub const WORKER_REDIS_UP: &str = "fleet_worker_redis_up";
/// Counter: successful Redis reconnections after a lost link.
pub const WORKER_REDIS_RECONNECTS_TOTAL: &str = "fleet_worker_redis_reconnects_total";
/// Counter: publishes that did not reach Redis (local delivery still happened).
pub const WORKER_REDIS_PUBLISH_FAILURES_TOTAL: &str = "fleet_worker_redis_publish_failures_total";
/// Gauge by `node`: Redis `used_memory`, polled; one series per master of a Redis Cluster
/// (`node` its address), one with `node=""` for one server.
pub const WORKER_REDIS_MEMORY_BYTES: &str = "fleet_worker_redis_memory_bytes";
/// Label of [`WORKER_REDIS_MEMORY_BYTES`].
pub const LABEL_NODE: &str = "node";
/// Gauge 0/1: draining (SIGTERM received).
pub const WORKER_DRAINING: &str = "fleet_worker_draining";
/// Counter by `result`: connection attempts by how authentication ended (`ok`, `missing`,
/// `invalid`, `expired`, `forbidden`, `unavailable`).
pub const WORKER_AUTH_TOTAL: &str = "fleet_worker_auth_total";
/// Counter by `action` (`join`, `publish`): client requests outside their permissions.
pub const WORKER_FORBIDDEN_TOTAL: &str = "fleet_worker_forbidden_total";
/// Counter by `kind`: what `socketio.limits` and `socketio.max_payload_bytes` refused
/// (`events` dropped, `rooms` joins refused, `message_size` WebSockets closed with 1009).
pub const WORKER_LIMITED_TOTAL: &str = "fleet_worker_limited_total";

/// Counter by `outcome`: requests on long-polling connections the balancer handed over to
/// stay, `served` here without the balancer, or `given_back` to it to be routed.
pub const WORKER_KEPT_REQUESTS_TOTAL: &str = "fleet_worker_kept_requests_total";

/// Gauge: room channels this worker is subscribed to in Redis (rooms with a member here).
pub const WORKER_ROOMS_SUBSCRIBED: &str = "fleet_worker_rooms_subscribed";
/// Counter by `kind`: pub/sub messages taken from Redis (`received`), and of the room
/// broadcasts among them, those handed to members here (`delivered`) and those with nothing to
/// do here (`ignored`: this worker's own message coming back, or no member left).
pub const WORKER_PUBSUB_MESSAGES_TOTAL: &str = "fleet_worker_pubsub_messages_total";
/// Label of [`WORKER_PUBSUB_MESSAGES_TOTAL`].
pub const LABEL_KIND: &str = "kind";
/// Gauge by `state`: the worker's heap as its allocator sees it, `in_use` (what the worker
/// holds) and `free` (freed but kept by the allocator, so still part of the RSS: what a peak
/// of connections leaves behind). Set every 30 s, after freed memory is handed back.
pub const WORKER_HEAP_BYTES: &str = "fleet_worker_heap_bytes";
/// Label of [`WORKER_HEAP_BYTES`].
pub const LABEL_STATE: &str = "state";

/// Every worker metric name.
pub const WORKER_METRICS: &[&str] = &[
    WORKER_CONNECTIONS,
    WORKER_EVENTS_TOTAL,
    WORKER_BROADCASTS_TOTAL,
    WORKER_BROADCAST_DURATION,
    WORKER_DELIVERIES_DROPPED_TOTAL,
    WORKER_PUBSUB_LAG,
    WORKER_EVENT_LOOP_LAG,
    WORKER_REDIS_UP,
    WORKER_REDIS_RECONNECTS_TOTAL,
    WORKER_REDIS_PUBLISH_FAILURES_TOTAL,
    WORKER_REDIS_MEMORY_BYTES,
    WORKER_DRAINING,
    WORKER_AUTH_TOTAL,
    WORKER_FORBIDDEN_TOTAL,
    WORKER_ROOMS_SUBSCRIBED,
    WORKER_PUBSUB_MESSAGES_TOTAL,
    WORKER_LIMITED_TOTAL,
    WORKER_KEPT_REQUESTS_TOTAL,
    WORKER_HEAP_BYTES,
];

/// Header on every `/readyz` answer of a worker (200 and 503 alike): its connected sockets,
/// the value of [`WORKER_CONNECTIONS`], so one probe gives the balancer readiness and load.
pub const READYZ_CONNECTIONS_HEADER: &str = "x-fleet-connections";

/// Counter by `worker`, `transport`: requests proxied.
pub const BALANCER_REQUESTS_TOTAL: &str = "fleet_balancer_requests_total";
/// Gauge by `worker`: open WebSockets.
pub const BALANCER_WEBSOCKETS_ACTIVE: &str = "fleet_balancer_websockets_active";
/// Counter by `outcome`: WebSocket connections handed to a supervised worker (`passed`), or
/// relayed because the handoff failed (`relayed`).
pub const BALANCER_WEBSOCKET_HANDOFFS_TOTAL: &str = "fleet_balancer_websocket_handoffs_total";
/// Counter by `worker`: new sessions placed.
pub const BALANCER_SESSIONS_PLACED_TOTAL: &str = "fleet_balancer_sessions_placed_total";
/// Counter by `reason`: requests refused by stickiness.
pub const BALANCER_STICKY_REJECTS_TOTAL: &str = "fleet_balancer_sticky_rejects_total";
/// Counter by `class`: requests refused by the balancer itself.
pub const BALANCER_REJECTS_TOTAL: &str = "fleet_balancer_rejects_total";
/// Counter by `worker`: failures talking to a worker.
pub const BALANCER_UPSTREAM_ERRORS_TOTAL: &str = "fleet_balancer_upstream_errors_total";
/// Gauge 0/1 by `worker`: 1 while the worker passes its health check.
pub const BALANCER_WORKER_UP: &str = "fleet_balancer_worker_up";
/// Counter by `worker`: worker process restarts by the supervisor.
pub const BALANCER_WORKER_RESTARTS_TOTAL: &str = "fleet_balancer_worker_restarts_total";
/// Counter by `worker`: new sessions placed while no worker passed its probe, on a worker that
/// still answered (panic mode).
pub const BALANCER_PANIC_PLACEMENTS_TOTAL: &str = "fleet_balancer_panic_placements_total";
/// Histogram: time from request to response end (WebSockets and handed-off polls excluded).
pub const BALANCER_REQUEST_DURATION: &str = "fleet_balancer_request_duration_seconds";

/// Counter by `endpoint`, `code`: server API requests answered (`api.listen`).
pub const BALANCER_API_REQUESTS_TOTAL: &str = "fleet_balancer_api_requests_total";

/// Every balancer metric name.
pub const BALANCER_METRICS: &[&str] = &[
    BALANCER_REQUESTS_TOTAL,
    BALANCER_WEBSOCKETS_ACTIVE,
    BALANCER_WEBSOCKET_HANDOFFS_TOTAL,
    BALANCER_SESSIONS_PLACED_TOTAL,
    BALANCER_STICKY_REJECTS_TOTAL,
    BALANCER_REJECTS_TOTAL,
    BALANCER_UPSTREAM_ERRORS_TOTAL,
    BALANCER_WORKER_UP,
    BALANCER_WORKER_RESTARTS_TOTAL,
    BALANCER_PANIC_PLACEMENTS_TOTAL,
    BALANCER_REQUEST_DURATION,
    BALANCER_API_REQUESTS_TOTAL,
];

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn is_name(s: &str) -> bool {
        let mut chars = s.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    }

    /// Every name is a valid Prometheus name under its process's prefix, and no name or label
    /// is used twice (two constants for one series would split it in two on a rename).
    #[test]
    fn names_are_valid_distinct_and_prefixed() {
        let mut seen = HashSet::new();
        for (prefix, names) in [
            ("fleet_worker_", WORKER_METRICS),
            ("fleet_balancer_", BALANCER_METRICS),
        ] {
            for name in names {
                assert!(name.starts_with(prefix) && is_name(name), "{name}");
                assert!(seen.insert(*name), "{name} twice");
            }
        }
        for label in [
            LABEL_WORKER,
            LABEL_EVENT,
            LABEL_TRANSPORT,
            LABEL_OUTCOME,
            LABEL_REASON,
            LABEL_CLASS,
            LABEL_RESULT,
            LABEL_ACTION,
            LABEL_ENDPOINT,
            LABEL_CODE,
        ] {
            assert!(is_name(label) && !label.starts_with("__"), "{label}");
            assert!(seen.insert(label), "{label} twice");
        }
        // HTTP/2 and the http crate want header names in lower case.
        assert!(
            READYZ_CONNECTIONS_HEADER
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '-')
        );
    }
}
