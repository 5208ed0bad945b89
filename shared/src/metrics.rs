//! Every metric and label name in one place: dashboards, alerts and tests depend on them.

/// Label carrying the worker id on every worker sample.
pub const LABEL_WORKER: &str = "worker";
/// Label carrying the event name.
pub const LABEL_EVENT: &str = "event";

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
/// Gauge: Redis `used_memory`, polled.
pub const WORKER_REDIS_MEMORY_BYTES: &str = "fleet_worker_redis_memory_bytes";
/// Gauge 0/1: draining (SIGTERM received).
pub const WORKER_DRAINING: &str = "fleet_worker_draining";
