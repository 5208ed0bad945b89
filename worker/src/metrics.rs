//! The worker's Prometheus registry: every sample carries the `worker` label, the process
//! collector's (`process_open_fds`, `process_max_fds`, ...) too, so that workers sharing a
//! host or a scrape job stay apart.

use std::collections::HashMap;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use shared::metrics as names;

/// Latency buckets from 100 µs to 5 s: sub-millisecond local delivery up to a stalled link.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Every metric the worker exports. Cheap to share: the handles are `Arc`s inside.
/// The `kind`s of `fleet_worker_pubsub_messages_total`: every message taken from Redis, and of
/// the room broadcasts, those that reached a member here and those with nothing to do here.
const PUBSUB_RECEIVED: &str = "received";
const PUBSUB_DELIVERED: &str = "delivered";
const PUBSUB_IGNORED: &str = "ignored";

#[derive(Clone)]
pub struct WorkerMetrics {
    registry: Registry,
    /// Connected sockets (set from the live socket list at each scrape).
    pub connections: IntGauge,
    /// Events received, by event name.
    pub events: IntCounterVec,
    /// Room broadcasts started here.
    pub broadcasts: IntCounter,
    /// Time to hand one broadcast to Redis and the local members.
    pub broadcast_duration: Histogram,
    /// Messages a local member could not take (full buffer, closed).
    pub deliveries_dropped: IntCounter,
    /// How late peers' probes arrive.
    pub pubsub_lag: Histogram,
    /// How late a periodic timer wakes.
    pub event_loop_lag: Histogram,
    /// 1 while subscribed to Redis.
    pub redis_up: IntGauge,
    /// Reconnections after a lost link.
    pub redis_reconnects: IntCounter,
    /// Publishes that did not reach Redis.
    pub redis_publish_failures: IntCounter,
    /// Redis `used_memory`, by node (`node=""` for one server).
    pub redis_memory: IntGaugeVec,
    /// 1 while draining.
    pub draining: IntGauge,
    /// Connection attempts by authentication result.
    pub auth: IntCounterVec,
    /// Client requests refused by their permissions, by action.
    pub forbidden: IntCounterVec,
    /// Room channels subscribed in Redis.
    pub rooms_subscribed: IntGauge,
    /// Pub/sub messages from Redis, by what became of them.
    pub pubsub_messages: IntCounterVec,
    /// Its series, resolved once: they are counted per message.
    pub pubsub_received: IntCounter,
    pub pubsub_delivered: IntCounter,
    pub pubsub_ignored: IntCounter,
    /// What the limits refused, by kind.
    pub limited: IntCounterVec,
    /// Its series, resolved once (which also makes each exist from the start): events are
    /// counted one by one.
    pub limited_events: IntCounter,
    pub limited_rooms: IntCounter,
    pub limited_message_size: IntCounter,
    /// Requests on kept long-polling connections, by outcome.
    pub kept: IntCounterVec,
    /// Its series, resolved once: counted per request.
    pub kept_served: IntCounter,
    pub kept_given_back: IntCounter,
    /// The heap, by state (`in_use`, `free`): see [`crate::memory`].
    pub heap: IntGaugeVec,
}

impl WorkerMetrics {
    /// A fresh registry whose samples all carry `worker="<worker_id>"`.
    pub fn new(worker_id: &str) -> Self {
        let labels = HashMap::from([(names::LABEL_WORKER.to_owned(), worker_id.to_owned())]);
        let registry = Registry::new_custom(None, Some(labels)).expect("static labels are valid");
        let latency = |name: &str, help: &str| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()))
                .expect("static histogram opts are valid")
        };
        let pubsub_messages = IntCounterVec::new(
            Opts::new(
                names::WORKER_PUBSUB_MESSAGES_TOTAL,
                "Pub/sub messages from Redis by what became of them",
            ),
            &[names::LABEL_KIND],
        )
        .unwrap();
        let limited = IntCounterVec::new(
            Opts::new(
                names::WORKER_LIMITED_TOTAL,
                "Events dropped, joins refused and WebSockets closed by the limits",
            ),
            &[names::LABEL_KIND],
        )
        .unwrap();
        let kept = IntCounterVec::new(
            Opts::new(
                names::WORKER_KEPT_REQUESTS_TOTAL,
                "Requests on long-polling connections kept here: served, or given back to the balancer",
            ),
            &[names::LABEL_OUTCOME],
        )
        .unwrap();
        let m = WorkerMetrics {
            connections: IntGauge::new(names::WORKER_CONNECTIONS, "Connected sockets").unwrap(),
            events: IntCounterVec::new(
                Opts::new(names::WORKER_EVENTS_TOTAL, "Events received from clients"),
                &[names::LABEL_EVENT],
            )
            .unwrap(),
            broadcasts: IntCounter::new(names::WORKER_BROADCASTS_TOTAL, "Room broadcasts").unwrap(),
            broadcast_duration: latency(
                names::WORKER_BROADCAST_DURATION,
                "Time to hand a broadcast to Redis and local members",
            ),
            deliveries_dropped: IntCounter::new(
                names::WORKER_DELIVERIES_DROPPED_TOTAL,
                "Room messages not queued to a local member: buffer full or closed",
            )
            .unwrap(),
            pubsub_lag: latency(names::WORKER_PUBSUB_LAG, "Cross-worker pub/sub probe lag"),
            event_loop_lag: latency(
                names::WORKER_EVENT_LOOP_LAG,
                "How late a periodic timer wakes",
            ),
            redis_up: IntGauge::new(names::WORKER_REDIS_UP, "1 while subscribed to Redis").unwrap(),
            redis_reconnects: IntCounter::new(
                names::WORKER_REDIS_RECONNECTS_TOTAL,
                "Redis reconnections after a lost link",
            )
            .unwrap(),
            redis_publish_failures: IntCounter::new(
                names::WORKER_REDIS_PUBLISH_FAILURES_TOTAL,
                "Publishes that did not reach Redis (local delivery still happened)",
            )
            .unwrap(),
            redis_memory: IntGaugeVec::new(
                Opts::new(names::WORKER_REDIS_MEMORY_BYTES, "Redis used_memory"),
                &[names::LABEL_NODE],
            )
            .unwrap(),
            draining: IntGauge::new(names::WORKER_DRAINING, "1 while draining").unwrap(),
            auth: IntCounterVec::new(
                Opts::new(
                    names::WORKER_AUTH_TOTAL,
                    "Connection attempts by authentication result",
                ),
                &[names::LABEL_RESULT],
            )
            .unwrap(),
            forbidden: IntCounterVec::new(
                Opts::new(
                    names::WORKER_FORBIDDEN_TOTAL,
                    "Client requests outside their permissions",
                ),
                &[names::LABEL_ACTION],
            )
            .unwrap(),
            rooms_subscribed: IntGauge::new(
                names::WORKER_ROOMS_SUBSCRIBED,
                "Room channels subscribed in Redis",
            )
            .unwrap(),
            pubsub_received: pubsub_messages.with_label_values(&[PUBSUB_RECEIVED]),
            pubsub_delivered: pubsub_messages.with_label_values(&[PUBSUB_DELIVERED]),
            pubsub_ignored: pubsub_messages.with_label_values(&[PUBSUB_IGNORED]),
            pubsub_messages,
            limited_events: limited.with_label_values(&[crate::limits::KIND_EVENTS]),
            limited_rooms: limited.with_label_values(&[crate::limits::KIND_ROOMS]),
            limited_message_size: limited.with_label_values(&[crate::limits::KIND_MESSAGE_SIZE]),
            limited,
            kept_served: kept.with_label_values(&["served"]),
            kept_given_back: kept.with_label_values(&["given_back"]),
            kept,
            heap: IntGaugeVec::new(
                Opts::new(
                    names::WORKER_HEAP_BYTES,
                    "Heap bytes in use, and freed but kept by the allocator",
                ),
                &[names::LABEL_STATE],
            )
            .unwrap(),
            registry,
        };
        m.register_all();
        crate::memory::record(&m.heap);
        // Every series exists from the start: a rate over a counter that appears late misses
        // its first increments.
        for outcome in crate::auth::Outcome::ALL {
            m.auth.with_label_values(&[outcome.as_str()]);
        }
        for action in [
            shared::protocol::EV_JOIN,
            shared::protocol::EV_LEAVE,
            shared::protocol::EV_PUBLISH,
        ] {
            m.forbidden.with_label_values(&[action]);
        }

        m
    }

    fn register_all(&self) {
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(self.connections.clone()),
            Box::new(self.events.clone()),
            Box::new(self.broadcasts.clone()),
            Box::new(self.broadcast_duration.clone()),
            Box::new(self.deliveries_dropped.clone()),
            Box::new(self.pubsub_lag.clone()),
            Box::new(self.event_loop_lag.clone()),
            Box::new(self.redis_up.clone()),
            Box::new(self.redis_reconnects.clone()),
            Box::new(self.redis_publish_failures.clone()),
            Box::new(self.redis_memory.clone()),
            Box::new(self.draining.clone()),
            Box::new(self.auth.clone()),
            Box::new(self.forbidden.clone()),
            Box::new(self.rooms_subscribed.clone()),
            Box::new(self.pubsub_messages.clone()),
            Box::new(self.limited.clone()),
            Box::new(self.kept.clone()),
            Box::new(self.heap.clone()),
        ];
        for c in collectors {
            // Names are distinct constants, so registration cannot collide.
            self.registry.register(c).expect("metric names are unique");
        }
        // Read from /proc at each scrape; the prometheus crate has it on Linux only.
        #[cfg(target_os = "linux")]
        self.registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("process_* names are not fleet names");
    }

    /// Count one received event. Only names the app registered reach here, so the label's
    /// cardinality is bounded by the app's event list.
    pub fn event(&self, name: &str) {
        self.events.with_label_values(&[name]).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut buf = Vec::with_capacity(8 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_contract_name_is_exported_with_worker_label() {
        let m = WorkerMetrics::new("w7");
        m.event("join");
        m.pubsub_lag.observe(0.001);
        m.redis_memory.with_label_values(&[""]).set(1);
        let text = m.encode();
        for name in names::WORKER_METRICS {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} missing:\n{text}"
            );
        }
        assert!(
            text.contains(r#"fleet_worker_events_total{event="join",worker="w7"} 1"#),
            "{text}"
        );
        for kind in crate::limits::KINDS {
            let zero = format!(r#"fleet_worker_limited_total{{kind="{kind}",worker="w7"}} 0"#);
            assert!(text.contains(&zero), "{text}");
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn process_descriptors_are_exported_with_worker_label() {
        let text = WorkerMetrics::new("w7").encode();
        for name in ["process_open_fds", "process_max_fds"] {
            let sample = text
                .lines()
                .find(|l| l.starts_with(&format!("{name}{{")))
                .unwrap_or_else(|| panic!("{name} missing:\n{text}"));
            assert!(sample.contains(r#"worker="w7""#), "{sample}");
            let value: f64 = sample.rsplit(' ').next().unwrap().parse().unwrap();
            assert!(value > 0.0, "{sample}");
        }
    }
}
