//! The task that keeps the view true: it follows [`Discovery`] and runs one prober per
//! worker, which probes every health interval (every 100 ms while the worker has never been
//! ready, so a new worker joins placement as soon as it answers), flips the worker's health,
//! records its load, keeps `fleet_balancer_worker_up`, and logs each flip once.
//!
//! A worker that was up leaves placement after `health_check_failures` failed probes in a
//! row; each probe is bounded by 0.8 × the interval, so a dead or refusing worker is out
//! within 2 intervals and a hung one within 2.8. A worker never seen ready is not placed on.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::ServiceReadyNotifier;
use pingora_core::services::background::BackgroundService;
use shared::Shutdown;
use shared::config::HealthCheck;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use super::discovery::Discovery;
use super::probe::{Answer, Probe, ProbeError};
use super::{Change, Worker, Workers};
use crate::metrics::METRICS;

/// How often a worker that has never been ready is probed.
const STARTING_EVERY: Duration = Duration::from_millis(100);

/// Keeps [`Workers`] current. Signals ready once every worker known at start was probed once,
/// so the proxy starts with a true view.
pub struct Watcher {
    workers: Arc<Workers>,
    discovery: Discovery,
    rules: Rules,
}

/// How workers are probed and judged.
#[derive(Clone)]
struct Rules {
    probe: Probe,
    every: Duration,
    failures: usize,
}

impl Watcher {
    /// Watches the workers `discovery` finds, probing each `every` as `check` says (an
    /// Engine.IO handshake on `path`, or `/readyz`); `failures` failed probes in a row take a
    /// worker out.
    pub fn new(
        workers: Arc<Workers>,
        discovery: Discovery,
        check: HealthCheck,
        path: &str,
        every: Duration,
        failures: usize,
    ) -> Self {
        Watcher {
            workers,
            discovery,
            rules: Rules {
                // A probe must finish well within one interval, or a hung worker looks alive.
                probe: Probe::for_config(every * 8 / 10, check, path),
                every,
                failures: failures.max(1),
            },
        }
    }

    /// Starts probers for the workers added, stops those of the workers removed; returns a
    /// receiver per added worker that fires after its first probe.
    async fn apply(
        &self,
        change: Change,
        probers: &mut HashMap<SocketAddr, JoinHandle<()>>,
    ) -> Vec<oneshot::Receiver<()>> {
        for gone in change.removed {
            if let Some(task) = probers.remove(&gone.addr()) {
                task.abort();
                let _ = task.await;
            }
            // A worker resized away is not "down": its series goes.
            let _ = METRICS.worker_up.remove_label_values(&[gone.label()]);
            tracing::info!(worker = %gone.label(), "worker left the fleet");
        }
        let mut first = Vec::new();
        for worker in change.added {
            let (done, probed) = oneshot::channel();
            first.push(probed);
            let task = tokio::spawn(watch_worker(Arc::clone(&worker), self.rules.clone(), done));
            probers.insert(worker.addr(), task);
        }
        first
    }
}

#[async_trait]
impl BackgroundService for Watcher {
    async fn start_with_ready_notifier(
        &self,
        shutdown: ShutdownWatch,
        ready: ServiceReadyNotifier,
    ) {
        let mut shutdown = Shutdown::from_watch(shutdown);
        let mut discovery = self.discovery.clone();
        let mut probers = HashMap::new();
        let mut ready = Some(ready);
        loop {
            if let Some(members) = discovery.members().await {
                let change = self.workers.set_members(&members);
                let first = self.apply(change, &mut probers).await;
                if let Some(ready) = ready.take() {
                    futures::future::join_all(first).await;
                    ready.notify_ready();
                }
            }
            if let Some(ready) = ready.take() {
                // Nothing resolved yet: serve anyway (new sessions get 503 until workers appear).
                ready.notify_ready();
            }
            tokio::select! {
                _ = discovery.changed() => {}
                _ = shutdown.recv() => break,
            }
        }
        for task in probers.into_values() {
            task.abort();
        }
    }
}

/// Probes one worker until aborted.
async fn watch_worker(worker: Arc<Worker>, rules: Rules, first: oneshot::Sender<()>) {
    let mut first = Some(first);
    let mut failed = 0;
    let mut ever_ready = false;
    let mut tick = ticker(STARTING_EVERY);
    loop {
        tick.tick().await;
        let asked = std::time::Instant::now();
        let result = rules.probe.check(worker.addr()).await;
        if let Ok(Answer {
            connections: Some(n),
            ..
        }) = &result
        {
            worker.load().set_probed(*n, asked);
        }
        worker.set_answers(result.is_ok());
        let ready = result.as_ref().is_ok_and(Answer::is_ready);
        failed = if ready { 0 } else { failed + 1 };
        let up = ready || (worker.is_up() && failed < rules.failures);
        if worker.set_up(up) {
            log_flip(&worker, &rules.probe, &result);
        }
        METRICS
            .worker_up
            .with_label_values(&[worker.label()])
            .set(i64::from(up));
        if let Some(first) = first.take() {
            let _ = first.send(());
        }
        if ready && !ever_ready {
            ever_ready = true;
            tick = ticker(rules.every);
            tick.tick().await; // the first tick of an interval is immediate
        }
    }
}

fn ticker(every: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval_at(Instant::now(), every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tick
}

fn log_flip(worker: &Worker, probe: &Probe, result: &Result<Answer, ProbeError>) {
    if worker.is_up() {
        tracing::info!(worker = %worker.label(), addr = %worker.addr(), "worker healthy: taking new sessions");
        return;
    }
    let why = match result {
        Ok(answer) if answer.status == http::StatusCode::OK => {
            format!(
                "{} answered 200 without an Engine.IO open packet",
                probe.what()
            )
        }
        Ok(answer) => format!("{} answered {}", probe.what(), answer.status),
        Err(e) => e.to_string(),
    };
    tracing::warn!(worker = %worker.label(), addr = %worker.addr(), %why, "worker unhealthy: out of placement, its sessions are refused");
}
