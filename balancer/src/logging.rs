//! The balancer's log: `RUST_LOG` (default `info`), with what pingora reports as errors about
//! clients turned into counts.
//!
//! pingora logs at ERROR each connection that closes partway through a request head it reads
//! itself (a kept-alive connection's later requests: the first is read in `proxy::front`), and
//! each error answer it could not send to a client that left. Both are client behaviour, not
//! the balancer's: they are counted in `fleet_balancer_rejects_total{class="incomplete_head"}`
//! and logged once, like every other refusal class.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Metadata};
use tracing_log::NormalizeEvent;
use tracing_subscriber::layer::{Context, Filter, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::metrics::METRICS;
use crate::proxy::rejections;
use crate::routing::Class;

/// pingora's messages about a client's connection, as they begin.
const CLIENT_NOISE: [&str; 2] = [
    "Fail to proxy: Downstream",
    "failed to send error response to downstream",
];

/// Installs the log for the process.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let fmt = tracing_subscriber::fmt::layer()
        .with_target(false)
        .with_ansi(false)
        .with_filter(filter)
        .with_filter(ClientNoise);
    tracing_subscriber::registry().with(fmt).init();
}

/// Drops pingora's client errors from the log after counting them.
struct ClientNoise;

impl<S> Filter<S> for ClientNoise {
    fn enabled(&self, _meta: &Metadata<'_>, _cx: &Context<'_, S>) -> bool {
        true
    }

    fn event_enabled(&self, event: &Event<'_>, _cx: &Context<'_, S>) -> bool {
        // pingora logs through `log`: its events carry their real target once normalized.
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        if *meta.level() != Level::ERROR || !meta.target().starts_with("pingora") {
            return true;
        }
        let mut message = Message(String::new());
        event.record(&mut message);
        if !CLIENT_NOISE.iter().any(|p| message.0.starts_with(p)) {
            return true;
        }
        let class = Class::IncompleteHead;
        METRICS.rejects.with_label_values(&[class.as_str()]).inc();
        rejections::shared().note(class.as_str(), &message.0);
        false
    }
}

struct Message(String);

impl Visit for Message {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0 = value.to_owned();
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}
