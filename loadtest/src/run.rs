//! One generator process: start its share of the clients at the connect rate, wait until they
//! are in their rooms, publish for the duration, let deliveries settle, and count.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::client::{self, Phase, Shared};
use crate::events::EventLog;
use crate::scenario::Scenario;
use crate::stats::{Snapshot, Stats};
use crate::transport::HTTP_REQUESTS;

/// A once-a-second view of a running process.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Progress {
    /// Seconds since the start.
    pub elapsed: f64,
    /// Clients connected now.
    pub connected: u64,
    /// Publishes so far.
    pub published: u64,
    /// Deliveries so far.
    pub delivered: u64,
    /// Errors so far.
    pub errors: u64,
    /// Delivery p99 so far, in microseconds.
    pub p99_us: u64,
}

impl Progress {
    /// Adds another process's progress (p99: the worst of them).
    pub fn merge(&mut self, o: &Progress) {
        self.elapsed = self.elapsed.max(o.elapsed);
        self.connected += o.connected;
        self.published += o.published;
        self.delivered += o.delivered;
        self.errors += o.errors;
        self.p99_us = self.p99_us.max(o.p99_us);
    }
}

/// How a process talks to whoever runs it.
pub trait Control {
    /// Called every second.
    fn progress(&mut self, p: &Progress, rates: (f64, f64));
    /// Called once every client has connected (or failed); publishing starts when it returns.
    fn ready(&mut self, ready: u64, failed: u64) -> impl Future<Output = ()>;
}

/// Runs the clients `indices` of `scenario` (numbered over all processes) in this process.
pub async fn run_share(
    scenario: &Scenario,
    indices: Vec<usize>,
    connect_rate: f64,
    events: Option<EventLog>,
    control: &mut impl Control,
) -> Snapshot {
    let targets = scenario.check().expect("scenario checked before the run");
    let (phase_tx, phase_rx) = watch::channel(Phase::Connect);
    let shared = Arc::new(Shared {
        sources: scenario.source_addrs().expect("checked"),
        scenario: scenario.clone(),
        targets,
        stats: Stats::new(scenario.rooms).with_events(events),
        phase: phase_rx,
    });
    let started = Instant::now();
    let total = indices.len() as u64;
    let mut tasks = JoinSet::new();
    let mut ticker = Ticker::new(started);

    // Connect at the given rate, reporting progress meanwhile.
    let gap = Duration::from_secs_f64(1.0 / connect_rate);
    let mut next = tokio::time::Instant::now();
    for i in indices {
        tasks.spawn(client::run(i, Arc::clone(&shared)));
        next += gap;
        tokio::time::sleep_until(next).await;
        ticker.maybe(&shared.stats, control);
    }
    let deadline = started + Duration::from_secs_f64(scenario.connect_timeout_secs);
    loop {
        let st = &shared.stats;
        let done = st.ready.load(Relaxed) + st.failed.load(Relaxed);
        if done >= total || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        ticker.maybe(st, control);
    }
    control
        .ready(
            shared.stats.ready.load(Relaxed),
            shared.stats.failed.load(Relaxed),
        )
        .await;

    let mut publish_secs = 0.0;
    let mut publish_requests = 0;
    for (phase, secs) in [
        (Phase::Publish, scenario.duration_secs),
        (Phase::Settle, scenario.settle_secs),
    ] {
        let started = Instant::now();
        let requests_before = HTTP_REQUESTS.load(Relaxed);
        let _ = phase_tx.send(phase);
        wait(
            Duration::from_secs_f64(secs),
            &shared.stats,
            &mut ticker,
            control,
        )
        .await;
        if phase == Phase::Publish {
            publish_secs = started.elapsed().as_secs_f64();
            publish_requests = HTTP_REQUESTS.load(Relaxed) - requests_before;
        }
    }
    let _ = phase_tx.send(Phase::Stop);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    if let Some(log) = &shared.stats.events {
        log.flush();
    }
    let mut snap = shared.stats.snapshot(total as usize);
    snap.publish_secs = publish_secs;
    snap.publish_http_requests = publish_requests;
    snap
}

async fn wait(for_: Duration, stats: &Stats, ticker: &mut Ticker, control: &mut impl Control) {
    let end = tokio::time::Instant::now() + for_;
    while tokio::time::Instant::now() < end {
        tokio::time::sleep_until(end.min(tokio::time::Instant::now() + Duration::from_millis(100)))
            .await;
        ticker.maybe(stats, control);
    }
}

/// Calls `Control::progress` once a second.
struct Ticker {
    started: Instant,
    last: Instant,
    last_counts: (u64, u64),
}

impl Ticker {
    fn new(started: Instant) -> Self {
        Ticker {
            started,
            last: started,
            last_counts: (0, 0),
        }
    }

    fn maybe(&mut self, st: &Stats, control: &mut impl Control) {
        let now = Instant::now();
        let dt = now.duration_since(self.last).as_secs_f64();
        if dt < 1.0 {
            return;
        }
        let p = Progress {
            elapsed: now.duration_since(self.started).as_secs_f64(),
            connected: st.connected.load(Relaxed),
            published: st.published.load(Relaxed),
            delivered: st.delivered.load(Relaxed),
            errors: st.error_count(),
            p99_us: st.delivery_quantile(0.99),
        };
        let rates = (
            (p.published - self.last_counts.0) as f64 / dt,
            (p.delivered - self.last_counts.1) as f64 / dt,
        );
        self.last = now;
        self.last_counts = (p.published, p.delivered);
        control.progress(&p, rates);
    }
}
