//! The end of a run: a table for people, JSON for machines, and the verdict on loss.

use std::collections::BTreeMap;
use std::fmt::Write;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::scenario::Scenario;
use crate::stats::{Snapshot, decode};

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Latency {
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        Latency {
            count: h.len(),
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
            p999: ms(0.999),
            max: h.max() as f64 / 1000.0,
        }
    }
}

/// Exactly-once accounting over all members.
#[derive(Debug, Clone, Serialize)]
pub struct Deliveries {
    /// Owed: each publish once to each member of its room.
    pub expected: u64,
    /// Received, repeats included.
    pub delivered: u64,
    /// Received more than once by the same member.
    pub duplicate: u64,
    /// Owed but never received.
    pub missing: u64,
}

/// The whole result.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// What ran.
    pub scenario: Scenario,
    /// Clients asked for.
    pub clients: u64,
    /// Clients connected and joined when publishing started.
    pub connected: u64,
    /// Clients that never connected.
    pub failed: u64,
    /// Reconnects after drops.
    pub reconnects: u64,
    /// Connect latency (handshake to Socket.IO connected), ms.
    pub connect_ms: Latency,
    /// Delivery latency (publish sent to message received), ms.
    pub delivery_ms: Latency,
    /// Publishes sent.
    pub published: u64,
    /// Publishes acknowledged ok.
    pub acked: u64,
    /// Exactly-once accounting.
    pub deliveries: Deliveries,
    /// Errors by kind.
    pub errors: BTreeMap<String, u64>,
    /// Members per worker (from whoami).
    pub clients_per_worker: BTreeMap<String, u64>,
    /// Publishing time, seconds.
    pub publish_secs: f64,
    /// Publishes per second while publishing.
    pub published_per_sec: f64,
    /// Deliveries per second while publishing.
    pub delivered_per_sec: f64,
    /// HTTP requests answered per second while publishing (long-polling; 0 over WebSocket).
    pub http_requests_per_sec: f64,
    /// Whether every client connected and missing + duplicate deliveries stayed within
    /// `max_loss`.
    pub pass: bool,
}

impl Report {
    /// Computes the report of a (merged) snapshot.
    pub fn new(scenario: &Scenario, s: &Snapshot) -> Report {
        let expected = s.expected();
        let unique = s.delivered - s.duplicates;
        let missing = expected.saturating_sub(unique);
        let bad = missing + s.duplicates;
        // A client that never connected is a failure, even with nothing owed to it.
        let pass = s.failed == 0
            && if expected == 0 {
                bad == 0
            } else {
                bad as f64 <= scenario.max_loss * expected as f64
            };
        let secs = s.publish_secs.max(1e-9);
        Report {
            scenario: Scenario {
                // The report may be shared; the token is a credential.
                token: scenario.token.as_ref().map(|_| "<redacted>".to_owned()),
                ..scenario.clone()
            },
            clients: s.clients,
            connected: s.ready,
            failed: s.failed,
            reconnects: s.reconnects,
            connect_ms: Latency::of(&decode(&s.connect_hist)),
            delivery_ms: Latency::of(&decode(&s.delivery_hist)),
            published: s.published,
            acked: s.acked,
            deliveries: Deliveries {
                expected,
                delivered: s.delivered,
                duplicate: s.duplicates,
                missing,
            },
            errors: s.errors.clone(),
            clients_per_worker: s.workers.clone(),
            publish_secs: s.publish_secs,
            published_per_sec: s.published as f64 / secs,
            delivered_per_sec: s.delivered as f64 / secs,
            http_requests_per_sec: s.publish_http_requests as f64 / secs,
            pass,
        }
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let sc = &self.scenario;
        let _ = writeln!(
            t,
            "\n{} clients ({:?}) on {} rooms, {} publishers, {} for {:.0} s, {} proc(s)",
            self.clients,
            sc.transport,
            sc.rooms,
            sc.publishers,
            match sc.window {
                Some(w) => format!("flood window {w}"),
                None => format!("{}/s each", sc.rate),
            },
            self.publish_secs,
            sc.procs
        );
        let _ = writeln!(
            t,
            "connected {}  failed {}  reconnects {}",
            self.connected, self.failed, self.reconnects
        );
        let _ = writeln!(
            t,
            "\n{:<14}{:>8}{:>10}{:>10}{:>10}{:>10}{:>10}",
            "latency (ms)", "count", "p50", "p90", "p99", "p99.9", "max"
        );
        for (name, l) in [
            ("connect", &self.connect_ms),
            ("delivery", &self.delivery_ms),
        ] {
            let _ = writeln!(
                t,
                "{:<14}{:>8}{:>10.2}{:>10.2}{:>10.2}{:>10.2}{:>10.2}",
                name, l.count, l.p50, l.p90, l.p99, l.p999, l.max
            );
        }
        let d = &self.deliveries;
        let _ = writeln!(
            t,
            "\npublished {} (acked {}), {:.0}/s; delivered {:.0}/s",
            self.published, self.acked, self.published_per_sec, self.delivered_per_sec
        );
        if self.http_requests_per_sec > 0.0 {
            let _ = writeln!(
                t,
                "HTTP requests (long-polling) {:.0}/s",
                self.http_requests_per_sec
            );
        }
        let _ = writeln!(
            t,
            "deliveries: expected {}  delivered {}  duplicate {}  missing {}",
            d.expected, d.delivered, d.duplicate, d.missing
        );
        let workers: Vec<String> = self
            .clients_per_worker
            .iter()
            .map(|(w, n)| format!("{w}={n}"))
            .collect();
        let _ = writeln!(t, "clients per worker: {}", workers.join(" "));
        let errors: Vec<String> = self
            .errors
            .iter()
            .map(|(k, n)| format!("{k}={n}"))
            .collect();
        let _ = writeln!(
            t,
            "errors: {}",
            if errors.is_empty() {
                "none".into()
            } else {
                errors.join(" ")
            }
        );
        let _ = writeln!(
            t,
            "{}",
            if self.pass {
                "PASS: deliveries exactly once within max_loss".to_owned()
            } else if self.failed > 0 {
                format!(
                    "FAIL: {} of {} clients never connected",
                    self.failed, self.clients
                )
            } else {
                format!(
                    "FAIL: {} missing + {} duplicate over max_loss {}",
                    d.missing, d.duplicate, sc.max_loss
                )
            }
        );
        t
    }
}
