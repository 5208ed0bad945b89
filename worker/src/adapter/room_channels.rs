//! Which room channels this worker listens to. A room's channel is subscribed when the room gets
//! its first member on this worker and unsubscribed when it loses its last, whatever caused it
//! (join, leave, disconnect, drain, a remote operator): the local adapter reports every such
//! change, in order, through its room hook.
//!
//! Changes are applied by one task in batches: whatever accumulated while the previous
//! SUBSCRIBE was in flight goes into the next, coalesced per room, so a churn of thousands of
//! joins a second costs a few commands, not a round trip each. [`RoomChannels::settled`] waits
//! until every change reported so far is confirmed by Redis, so a join can be acknowledged only
//! once the room's broadcasts from other workers reach this one.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use shared::Shutdown;
use socketioxide_core::adapter::{Room, RoomHook};
use tokio::sync::{mpsc, watch};

use crate::drivers::{RedisLink, Route, Sink};
use crate::metrics::WorkerMetrics;

/// How many room changes one batch takes at most.
const MAX_BATCH: usize = 10_000;

/// The longest [`RoomChannels::settled`] waits: Redis slower than this is as good as away,
/// and a join must not hang on it (the reconnection renews the subscription).
const SETTLE_LIMIT: Duration = Duration::from_secs(2);

/// One room appearing on (or disappearing from) this worker.
struct Change {
    seq: u64,
    ns: String,
    channel: String,
    wanted: bool,
}

/// The sender side: a sequence number and the queue, behind one lock so that numbers follow
/// the queue's order even when two namespaces report at once.
struct Reporter {
    seq: u64,
    tx: mpsc::UnboundedSender<Change>,
}

/// The subscriptions of one worker's room channels. Cheap to clone.
#[derive(Clone)]
pub struct RoomChannels {
    prefix: Arc<str>,
    reporter: Arc<Mutex<Reporter>>,
    applied: watch::Receiver<u64>,
    /// Each namespace's delivery function, set once its adapter is initialised.
    sinks: Arc<Mutex<HashMap<String, Sink>>>,
}

/// The task that applies the changes (see [`RoomChannels::new`]).
pub struct Applier {
    link: RedisLink,
    rx: mpsc::UnboundedReceiver<Change>,
    applied: watch::Sender<u64>,
    sinks: Arc<Mutex<HashMap<String, Sink>>>,
    metrics: WorkerMetrics,
}

impl RoomChannels {
    /// The subscriptions of room channels named after `prefix`, and the task that keeps them
    /// (spawn [`Applier::run`]).
    pub fn new(prefix: &str, link: RedisLink, metrics: WorkerMetrics) -> (Self, Applier) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (applied_tx, applied) = watch::channel(0);
        let sinks = Arc::new(Mutex::new(HashMap::new()));
        let channels = RoomChannels {
            prefix: prefix.into(),
            reporter: Arc::new(Mutex::new(Reporter { seq: 0, tx })),
            applied,
            sinks: Arc::clone(&sinks),
        };
        let applier = Applier {
            link,
            rx,
            applied: applied_tx,
            sinks,
            metrics,
        };
        (channels, applier)
    }

    /// The Redis channel of `room` in namespace `ns`. Namespaces never contain `#`, so the
    /// name is unambiguous whatever the room's name.
    pub fn channel(&self, ns: &str, room: &str) -> String {
        format!("{}-room#{ns}#{room}#", self.prefix)
    }

    /// The hook the local adapter of namespace `ns` reports its room changes to; `sink` will
    /// hold the namespace's delivery function once its adapter is initialised.
    pub fn hook(&self, ns: &str, sink: Arc<OnceLock<Sink>>, metrics: &WorkerMetrics) -> RoomHook {
        // A message that arrives before the adapter is initialised has nowhere to go.
        let ignored = metrics.pubsub_ignored.clone();
        let delivery: Sink = Arc::new(move |channel: &str, payload: &[u8]| match sink.get() {
            Some(sink) => sink(channel, payload),
            None => ignored.inc(),
        });
        self.sinks.lock().unwrap().insert(ns.to_owned(), delivery);
        let this = self.clone();
        let ns = ns.to_owned();
        Box::new(move |room: &Room, exists: bool| {
            let channel = this.channel(&ns, room);
            let mut reporter = this.reporter.lock().unwrap();
            reporter.seq += 1;
            let change = Change {
                seq: reporter.seq,
                ns: ns.clone(),
                channel,
                wanted: exists,
            };
            // Closed only when the worker stops: nothing left to subscribe for.
            let _ = reporter.tx.send(change);
        })
    }

    /// Resolves once every room change reported so far is in effect in Redis (or Redis is
    /// away, in which case the reconnection subscribes them), waiting at most 2 s.
    pub async fn settled(&self) {
        let target = self.reporter.lock().unwrap().seq;
        let mut applied = self.applied.clone();
        let _ = tokio::time::timeout(SETTLE_LIMIT, applied.wait_for(|&done| done >= target)).await;
    }
}

impl Applier {
    /// Apply room changes until shutdown.
    pub async fn run(mut self, mut shutdown: Shutdown) {
        let mut subscribed: HashSet<String> = HashSet::new();
        loop {
            let first = tokio::select! {
                c = self.rx.recv() => match c {
                    Some(c) => c,
                    None => return,
                },
                _ = shutdown.recv() => return,
            };
            // The last word per channel wins: a room that came and went meanwhile costs nothing.
            let mut latest = first.seq;
            let mut batch: HashMap<String, (String, bool)> = HashMap::new();
            batch.insert(first.channel, (first.ns, first.wanted));
            while batch.len() < MAX_BATCH {
                let Ok(c) = self.rx.try_recv() else { break };
                latest = c.seq;
                batch.insert(c.channel, (c.ns, c.wanted));
            }
            let mut subscribe: HashMap<String, Vec<String>> = HashMap::new();
            let mut unsubscribe = Vec::new();
            for (channel, (ns, wanted)) in batch {
                match (wanted, subscribed.contains(&channel)) {
                    (true, false) => subscribe.entry(ns).or_default().push(channel),
                    (false, true) => unsubscribe.push(channel),
                    _ => {}
                }
            }
            for (ns, channels) in subscribe {
                let route = Route::Inline(self.sink_of(&ns));
                self.link.subscribe_many(&channels, &route).await;
                subscribed.extend(channels);
            }
            if !unsubscribe.is_empty() {
                self.link.unsubscribe_many(&unsubscribe, true).await;
                for channel in &unsubscribe {
                    subscribed.remove(channel);
                }
            }
            if subscribed.capacity() > 4 * subscribed.len() + 1024 {
                subscribed.shrink_to_fit();
            }
            self.metrics.rooms_subscribed.set(subscribed.len() as i64);
            self.applied.send_replace(latest);
        }
    }

    /// Delivery for namespace `ns`'s room channels (see [`RoomChannels::hook`]).
    fn sink_of(&self, ns: &str) -> Sink {
        let sink = self.sinks.lock().unwrap().get(ns).cloned();
        sink.unwrap_or_else(|| {
            let ignored = self.metrics.pubsub_ignored.clone();
            Arc::new(move |_: &str, _: &[u8]| ignored.inc())
        })
    }
}
