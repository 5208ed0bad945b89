//! The balancer's metrics, registered in the default registry that `/metrics` serves.

use std::sync::LazyLock;

use pingora_prometheus::prometheus::{
    Histogram, HistogramOpts, IntCounterVec, IntGaugeVec, Opts, register_histogram,
    register_int_counter_vec, register_int_gauge_vec,
};

/// Every balancer metric (names are a contract).
pub struct Metrics {
    /// Requests proxied, by worker and transport.
    pub requests: IntCounterVec,
    /// Open WebSockets, by worker.
    pub websockets: IntGaugeVec,
    /// WebSocket connections handed to a supervised worker (`passed`), or relayed because
    /// the handoff failed (`relayed`).
    pub handoffs: IntCounterVec,
    /// New sessions placed, by worker.
    pub placed: IntCounterVec,
    /// Requests refused by stickiness, by reason.
    pub sticky_rejects: IntCounterVec,
    /// Requests refused by the balancer itself, by class.
    pub rejects: IntCounterVec,
    /// Failures talking to a worker.
    pub upstream_errors: IntCounterVec,
    /// 1 while a worker passes its health check.
    pub worker_up: IntGaugeVec,
    /// Worker process restarts by the supervisor.
    pub restarts: IntCounterVec,
    /// Time from request to response end (WebSockets excluded).
    pub duration: Histogram,
}

impl Metrics {
    /// Creates the series whose labels are known up front at 0, so dashboards and alerts see
    /// "none yet" rather than "no data".
    pub fn init_series<'a>(
        &self,
        worker_labels: impl Iterator<Item = &'a str>,
        supervised: bool,
        handoff: bool,
    ) {
        if handoff {
            for outcome in ["passed", "relayed"] {
                self.handoffs.with_label_values(&[outcome]);
            }
        }
        for reason in ["malformed", "unknown_worker", "worker_down"] {
            self.sticky_rejects.with_label_values(&[reason]);
        }
        for class in crate::rejections::Class::ALL {
            self.rejects.with_label_values(&[class.as_str()]);
        }
        for w in worker_labels {
            self.upstream_errors.with_label_values(&[w]);
            self.placed.with_label_values(&[w]);
            self.websockets.with_label_values(&[w]);
            if supervised {
                self.restarts.with_label_values(&[w]);
            }
        }
    }
}

/// The process-wide metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let c = |name: &str, help: &str, label: &[&str]| {
        register_int_counter_vec!(Opts::new(name, help), label).expect("unique metric name")
    };
    let g = |name: &str, help: &str| {
        register_int_gauge_vec!(Opts::new(name, help), &["worker"]).expect("unique metric name")
    };
    Metrics {
        requests: c(
            "fleet_balancer_requests_total",
            "Requests proxied",
            &["worker", "transport"],
        ),
        websockets: g("fleet_balancer_websockets_active", "Open WebSockets"),
        handoffs: c(
            "fleet_balancer_websocket_handoffs_total",
            "WebSockets passed to a supervised worker, or relayed when that failed",
            &["outcome"],
        ),
        placed: c(
            "fleet_balancer_sessions_placed_total",
            "New sessions placed",
            &["worker"],
        ),
        sticky_rejects: c(
            "fleet_balancer_sticky_rejects_total",
            "Requests refused by stickiness",
            &["reason"],
        ),
        rejects: c(
            "fleet_balancer_rejects_total",
            "Requests refused by the balancer",
            &["class"],
        ),
        upstream_errors: c(
            "fleet_balancer_upstream_errors_total",
            "Failures talking to a worker",
            &["worker"],
        ),
        worker_up: g(
            "fleet_balancer_worker_up",
            "1 while the worker passes its health check",
        ),
        restarts: c(
            "fleet_balancer_worker_restarts_total",
            "Worker restarts by the supervisor",
            &["worker"],
        ),
        duration: register_histogram!(
            HistogramOpts::new(
                "fleet_balancer_request_duration_seconds",
                "Request duration, WebSockets excluded"
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
                60.0
            ])
        )
        .expect("unique metric name"),
    }
});
