//! The balancer's metrics, registered in the default registry that `/metrics` serves. Names
//! come from `shared::metrics` (a contract with dashboards and alerts); label values from the
//! routing enums and [`HandoffOutcome`].

use std::sync::LazyLock;

use pingora_prometheus::prometheus::{
    Histogram, HistogramOpts, IntCounterVec, IntGaugeVec, Opts, register_histogram,
    register_int_counter_vec, register_int_gauge_vec,
};
use shared::metrics as names;

use crate::routing::{Class, StickyReason};

/// Every balancer metric.
pub struct Metrics {
    /// Requests proxied, by worker and transport.
    pub requests: IntCounterVec,
    /// Open WebSockets, by worker.
    pub websockets: IntGaugeVec,
    /// WebSocket connections handed to a supervised worker, or relayed because that failed.
    pub handoffs: IntCounterVec,
    /// New sessions placed, by worker.
    pub placed: IntCounterVec,
    /// New sessions placed while no worker was up (panic mode), by worker.
    pub panic_placements: IntCounterVec,
    /// Requests refused by stickiness, by reason.
    pub sticky_rejects: IntCounterVec,
    /// Requests refused by the balancer itself, by class.
    pub rejects: IntCounterVec,
    /// Failures talking to a worker.
    pub upstream_errors: IntCounterVec,
    /// 1 while a worker passes its probes.
    pub worker_up: IntGaugeVec,
    /// Worker process restarts by the supervisor.
    pub restarts: IntCounterVec,
    /// Time from request to response end (WebSockets and handed-off polling requests excluded).
    pub duration: Histogram,
    /// Server API requests, by endpoint and status code.
    pub api_requests: IntCounterVec,
}

/// How a WebSocket handoff went: the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandoffOutcome {
    /// The worker took the client's connection.
    Passed,
    /// The pass failed; the WebSocket was relayed instead.
    Relayed,
}

impl HandoffOutcome {
    /// Every outcome.
    pub const ALL: [HandoffOutcome; 2] = [HandoffOutcome::Passed, HandoffOutcome::Relayed];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            HandoffOutcome::Passed => "passed",
            HandoffOutcome::Relayed => "relayed",
        }
    }
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
            for outcome in HandoffOutcome::ALL {
                self.handoffs.with_label_values(&[outcome.as_str()]);
            }
        }
        for reason in StickyReason::ALL {
            self.sticky_rejects.with_label_values(&[reason.as_str()]);
        }
        for class in Class::ALL {
            self.rejects.with_label_values(&[class.as_str()]);
        }
        for w in worker_labels {
            self.upstream_errors.with_label_values(&[w]);
            self.placed.with_label_values(&[w]);
            self.panic_placements.with_label_values(&[w]);
            self.websockets.with_label_values(&[w]);
            if supervised {
                self.restarts.with_label_values(&[w]);
            }
        }
    }

    /// Counts one WebSocket handoff.
    pub fn handoff(&self, outcome: HandoffOutcome) {
        self.handoffs.with_label_values(&[outcome.as_str()]).inc();
    }
}

/// The process-wide metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let c = |name: &str, help: &str, label: &[&str]| {
        register_int_counter_vec!(Opts::new(name, help), label).expect("unique metric name")
    };
    let g = |name: &str, help: &str| {
        register_int_gauge_vec!(Opts::new(name, help), &[names::LABEL_WORKER])
            .expect("unique metric name")
    };
    let worker = &[names::LABEL_WORKER];
    Metrics {
        requests: c(
            names::BALANCER_REQUESTS_TOTAL,
            "Requests proxied",
            &[names::LABEL_WORKER, names::LABEL_TRANSPORT],
        ),
        websockets: g(names::BALANCER_WEBSOCKETS_ACTIVE, "Open WebSockets"),
        handoffs: c(
            names::BALANCER_WEBSOCKET_HANDOFFS_TOTAL,
            "WebSockets passed to a supervised worker, or relayed when that failed",
            &[names::LABEL_OUTCOME],
        ),
        placed: c(
            names::BALANCER_SESSIONS_PLACED_TOTAL,
            "New sessions placed",
            worker,
        ),
        panic_placements: c(
            names::BALANCER_PANIC_PLACEMENTS_TOTAL,
            "New sessions placed while no worker passed its probe",
            worker,
        ),
        sticky_rejects: c(
            names::BALANCER_STICKY_REJECTS_TOTAL,
            "Requests refused by stickiness",
            &[names::LABEL_REASON],
        ),
        api_requests: c(
            names::BALANCER_API_REQUESTS_TOTAL,
            "Server API requests answered",
            &[names::LABEL_ENDPOINT, names::LABEL_CODE],
        ),
        rejects: c(
            names::BALANCER_REJECTS_TOTAL,
            "Requests refused by the balancer",
            &[names::LABEL_CLASS],
        ),
        upstream_errors: c(
            names::BALANCER_UPSTREAM_ERRORS_TOTAL,
            "Failures talking to a worker",
            worker,
        ),
        worker_up: g(
            names::BALANCER_WORKER_UP,
            "1 while the worker passes its health check",
        ),
        restarts: c(
            names::BALANCER_WORKER_RESTARTS_TOTAL,
            "Worker restarts by the supervisor",
            worker,
        ),
        duration: register_histogram!(
            HistogramOpts::new(
                names::BALANCER_REQUEST_DURATION,
                "Request duration, WebSockets and long-polling requests handed to a worker excluded"
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
                60.0
            ])
        )
        .expect("unique metric name"),
    }
});
