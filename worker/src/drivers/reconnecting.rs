//! A socketioxide-redis `Driver` that survives Redis outages.
//!
//! Invariants: the set of wanted subscriptions lives here, not in the connection, so every new
//! connection re-subscribes to all of it; a publish never fails towards the adapter, so local
//! delivery happens even while Redis is away (the stock adapter drops it on a publish error).
//!
//! Publishes go out through one queue, in order, as pipelines: those made while the previous
//! pipeline was in flight (or in the same turn of the runtime) share one write and one read,
//! for this worker and for Redis, instead of a round trip each. Nobody waits for them.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use redis::{FromRedisValue, PushInfo, PushKind};
use shared::config::RedisConfig;
use shared::{Backoff, Shutdown};
use socketioxide_redis::drivers::{ChanItem, Driver, MessageStream};
use tokio::sync::{Notify, mpsc, watch};

use super::connection::RedisConnection;
use super::target::Target;
use crate::metrics::WorkerMetrics;

/// How long one command may take before the link is presumed dead.
const COMMAND_TIMEOUT: Duration = Duration::from_millis(1000);
/// How often an idle link is checked with PING.
const PING_EVERY: Duration = Duration::from_millis(500);

/// The link's state, as `/readyz` and the logs tell it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    /// Connected and subscribed to every wanted channel.
    Up,
    /// Never connected since start; the text says what is being waited for.
    Connecting(String),
    /// Connected before, lost since: reconnecting (local delivery goes on meanwhile).
    Lost(String),
}

/// Errors the driver can report (only for `num_serv`; publishes are absorbed, see module doc).
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Redis answered with an error or the connection broke.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The command did not complete in time.
    #[error("redis command timed out")]
    Timeout,
}

/// Where one channel's messages go.
#[derive(Clone)]
pub enum Route {
    /// The adapter's queue (its request and response channels).
    Queue(mpsc::Sender<ChanItem>),
    /// A function run as the message arrives, on the connection's reader: room broadcasts,
    /// delivered without a task hop each.
    Inline(Sink),
}

impl Route {
    /// Room channels (inline) are sharded on a Redis Cluster; the adapter's are not.
    fn is_sharded(&self) -> bool {
        matches!(self, Route::Inline(_))
    }
}

/// A function given each message of a channel: `(channel, payload)`.
pub type Sink = Arc<dyn Fn(&str, &[u8]) + Send + Sync>;

/// How many channels one SUBSCRIBE or UNSUBSCRIBE names at most.
const CHANNELS_PER_COMMAND: usize = 1000;
/// How many PUBLISH commands one pipeline carries at most.
const PUBLISHES_PER_PIPELINE: usize = 512;
/// Publishes waiting for Redis beyond this are dropped (and counted): Redis is too slow.
const OUTBOX: usize = 65_536;

type Handlers = HashMap<String, Route>;
/// A message for a channel, on its way to Redis: `(channel, payload, sharded)`.
type Publish = (String, Vec<u8>, bool);

struct Inner {
    target: Target,
    url_for_logs: String,
    /// Wanted subscriptions: channel → where its messages go. Survives reconnections.
    /// The same lock orders "snapshot for re-subscribe" against "add one", see `subscribe`.
    handlers: RwLock<Handlers>,
    /// The live connection, `None` while down.
    conn: Mutex<Option<RedisConnection>>,
    /// Woken by the push sender when the connection reports its own death.
    broken: Notify,
    state_tx: watch::Sender<LinkState>,
    metrics: WorkerMetrics,
    backoff: (Duration, Duration),
    /// Publishes on their way to Redis; the receiver is taken by `run`.
    outbox: mpsc::Sender<Publish>,
    outbox_rx: Mutex<Option<mpsc::Receiver<Publish>>>,
}

/// The shared handle: the adapter's driver, and what probes use to talk to Redis.
#[derive(Clone)]
pub struct RedisLink {
    inner: Arc<Inner>,
}

impl fmt::Debug for RedisLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLink")
            .field("url", &self.inner.url_for_logs)
            .finish()
    }
}

impl RedisLink {
    /// A link to the Redis `config` names (RESP3 is forced: pub/sub pushes need it).
    /// Nothing connects until [`RedisLink::run`] is spawned.
    ///
    /// # Errors
    /// The URL or a node cannot be understood, or the CA file cannot be read.
    pub fn new(config: &RedisConfig, metrics: WorkerMetrics) -> Result<Self, redis::RedisError> {
        let target = Target::new(config)?;
        let url_for_logs = target.describe(config);
        let (state_tx, _) = watch::channel(LinkState::Connecting(format!(
            "connecting to {url_for_logs}"
        )));
        metrics.redis_up.set(0);
        let (outbox, outbox_rx) = mpsc::channel(OUTBOX);
        Ok(RedisLink {
            inner: Arc::new(Inner {
                target,
                url_for_logs,
                handlers: RwLock::new(HashMap::new()),
                conn: Mutex::new(None),
                broken: Notify::new(),
                state_tx,
                metrics,
                backoff: (
                    Duration::from_millis(config.reconnect_min_ms),
                    Duration::from_millis(config.reconnect_max_ms),
                ),
                outbox,
                outbox_rx: Mutex::new(Some(outbox_rx)),
            }),
        })
    }

    /// Watch the link state (for readiness and tests).
    pub fn state(&self) -> watch::Receiver<LinkState> {
        self.inner.state_tx.subscribe()
    }

    /// The live connection, if any, for commands of our own (INFO, probes).
    pub fn connection(&self) -> Option<RedisConnection> {
        self.inner.conn.lock().unwrap().clone()
    }

    /// Keep the link up until shutdown: connect, re-subscribe everything, watch for breakage,
    /// and start over with capped backoff.
    pub async fn run(self, mut shutdown: Shutdown) {
        if let Some(outbox) = self.inner.outbox_rx.lock().unwrap().take() {
            tokio::spawn(self.clone().send_publishes(outbox, shutdown.clone()));
        }
        let (min, max) = self.inner.backoff;
        let mut backoff = Backoff::new(min, max);
        let mut ever_up = false;
        loop {
            match self.connect_and_subscribe().await {
                Ok(()) => {
                    backoff.reset();
                    if ever_up {
                        self.inner.metrics.redis_reconnects.inc();
                        tracing::info!(url = %self.inner.url_for_logs, "redis link restored, all subscriptions renewed");
                    } else {
                        tracing::info!(url = %self.inner.url_for_logs, "redis link up");
                    }
                    ever_up = true;
                    self.set_state(LinkState::Up);
                    tokio::select! {
                        reason = self.watch_until_broken() => {
                            tracing::warn!(url = %self.inner.url_for_logs, %reason, "redis link lost; local delivery continues, reconnecting");
                            self.mark_down(LinkState::Lost(format!("reconnecting to {} ({reason})", self.inner.url_for_logs)));
                        }
                        _ = shutdown.recv() => return,
                    }
                }
                Err(e) => {
                    let what = format!("waiting for redis at {} ({e})", self.inner.url_for_logs);
                    // One line per change of cause, plus a reminder every 20 failures.
                    let state = if ever_up {
                        LinkState::Lost(what.clone())
                    } else {
                        LinkState::Connecting(what.clone())
                    };
                    let changed = *self.inner.state_tx.borrow() != state;
                    if changed || backoff.failures().is_multiple_of(20) {
                        tracing::warn!(attempt = backoff.failures() + 1, "{what}; retrying");
                    }
                    self.mark_down(state);
                }
            }
            let delay = backoff.next_delay();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.recv() => return,
            }
        }
    }

    fn set_state(&self, state: LinkState) {
        self.inner
            .metrics
            .redis_up
            .set(i64::from(state == LinkState::Up));
        self.inner.state_tx.send_if_modified(|s| {
            let changed = *s != state;
            *s = state;
            changed
        });
    }

    fn mark_down(&self, state: LinkState) {
        *self.inner.conn.lock().unwrap() = None;
        self.set_state(state);
    }

    async fn connect_and_subscribe(&self) -> Result<(), LinkError> {
        let weak = Arc::downgrade(&self.inner);
        let push = move |push: PushInfo| {
            if let Some(inner) = weak.upgrade() {
                route_push(&inner, push);
            }
            Ok::<(), std::convert::Infallible>(())
        };
        let conn = self.inner.target.connect(push, COMMAND_TIMEOUT).await?;
        // Publish the connection and snapshot the wanted channels under the handlers lock:
        // a `subscribe` that runs after this sees the connection; one before is in the snapshot.
        let (mut rooms, mut others) = (Vec::new(), Vec::new());
        {
            let handlers = self.inner.handlers.read().unwrap();
            *self.inner.conn.lock().unwrap() = Some(conn.clone());
            for (chan, route) in handlers.iter() {
                let list = if route.is_sharded() {
                    &mut rooms
                } else {
                    &mut others
                };
                list.push(chan.clone());
            }
        }
        let mut c = conn.clone();
        // Up means whole: every master of a cluster answers.
        with_timeout(c.check()).await.inspect_err(|_| {
            *self.inner.conn.lock().unwrap() = None;
        })?;
        for (channels, sharded) in [(others, false), (rooms, true)] {
            for batch in channels.chunks(CHANNELS_PER_COMMAND) {
                with_bulk_timeout(c.subscribe(batch, sharded))
                    .await
                    .inspect_err(|_| {
                        *self.inner.conn.lock().unwrap() = None;
                    })?;
            }
        }
        Ok(())
    }

    /// Resolves with a reason when the connection breaks. A disconnect push or a failed
    /// command only triggers an early PING: a stale wake-up must not cost a reconnection.
    /// On a cluster, a change of which master serves which slots counts as broken too: the
    /// connection is rebuilt and every sharded subscription made again where it now belongs.
    async fn watch_until_broken(&self) -> String {
        let topology = match self.connection() {
            Some(mut conn) => with_timeout(conn.topology()).await.ok().flatten(),
            None => None,
        };
        let mut tick = tokio::time::interval(PING_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.inner.broken.notified() => {}
                _ = tick.tick() => {}
            }
            let Some(mut conn) = self.connection() else {
                return "connection dropped".into();
            };
            if self.inner.target.follows_failovers() {
                // A failover can demote the server without closing the connection.
                match with_timeout(redis::cmd("ROLE").query_async::<redis::Value>(&mut conn)).await
                {
                    Ok(role) if is_master(&role) => {}
                    Ok(_) => return "the server is no longer the master (failover)".into(),
                    Err(e) => return format!("ROLE failed: {e}"),
                }
            } else if let Err(e) = with_timeout(conn.check()).await {
                // On a cluster: a master is gone. The connection is rebuilt and every
                // subscription renewed once the cluster is whole again, rather than trusting
                // the client to move each sharded subscription to the promoted replica.
                return format!("ping failed: {e}");
            } else if topology.is_some()
                && let Ok(now) = with_timeout(conn.topology()).await
                && now != topology
            {
                return "the cluster's slots moved (failover or resharding)".into();
            }
        }
    }

    /// Send queued publishes, in order, a pipeline at a time, until shutdown.
    async fn send_publishes(self, mut outbox: mpsc::Receiver<Publish>, mut shutdown: Shutdown) {
        let failures = &self.inner.metrics.redis_publish_failures;
        loop {
            let first = tokio::select! {
                m = outbox.recv() => match m {
                    Some(m) => m,
                    None => return,
                },
                _ = shutdown.recv() => return,
            };
            // Publishes made in this turn of the runtime (other clients' frames read in the
            // same wake-up) go with it.
            tokio::task::yield_now().await;
            let mut batch = vec![first];
            while batch.len() < PUBLISHES_PER_PIPELINE {
                let Ok(next) = outbox.try_recv() else { break };
                batch.push(next);
            }
            let count = batch.len();
            let Some(mut conn) = self.connection() else {
                failures.inc_by(count as u64);
                continue;
            };
            if let Err(e) = with_timeout(conn.publish_all(batch)).await {
                failures.inc_by(count as u64);
                tracing::debug!("publish failed: {e}");
                self.suspect();
            }
        }
    }

    /// Report a failed command: the watcher re-checks the link at once.
    fn suspect(&self) {
        self.inner.broken.notify_one();
    }

    /// Listen to `channels`, each message going to `route`, in as few commands as possible.
    /// Returns once Redis confirmed them, or at once while Redis is away (the next connection
    /// subscribes them: they are wanted from now on).
    pub async fn subscribe_many(&self, channels: &[String], route: &Route) {
        let conn = {
            let mut handlers = self.inner.handlers.write().unwrap();
            for chan in channels {
                handlers.insert(chan.clone(), route.clone());
            }
            self.connection()
        };
        let Some(mut conn) = conn else { return };
        for batch in channels.chunks(CHANNELS_PER_COMMAND) {
            if let Err(e) = with_bulk_timeout(conn.subscribe(batch, route.is_sharded())).await {
                tracing::debug!("subscribe failed, will renew on reconnect: {e}");
                self.suspect();
                return;
            }
        }
    }

    /// Stop listening to `channels` (best effort: a stale subscription only brings messages
    /// that find no route).
    pub async fn unsubscribe_many(&self, channels: &[String], sharded: bool) {
        let conn = {
            let mut handlers = self.inner.handlers.write().unwrap();
            for chan in channels {
                handlers.remove(chan);
            }
            self.connection()
        };
        let Some(mut conn) = conn else { return };
        for batch in channels.chunks(CHANNELS_PER_COMMAND) {
            if with_bulk_timeout(conn.unsubscribe(batch, sharded))
                .await
                .is_err()
            {
                self.suspect();
                return;
            }
        }
    }

    /// Queue a room broadcast for its room's channel (sharded on a cluster); see
    /// [`Driver::publish`].
    pub fn publish_room(&self, chan: String, payload: Vec<u8>) {
        self.enqueue((chan, payload, self.inner.target.is_cluster()));
    }

    fn enqueue(&self, message: Publish) {
        if self.connection().is_none() || self.inner.outbox.try_send(message).is_err() {
            self.inner.metrics.redis_publish_failures.inc();
        }
    }
}

/// Subscribing a thousand channels (one command each on a cluster) may take longer than one
/// command.
const BULK_TIMEOUT: Duration = Duration::from_secs(10);

async fn with_bulk_timeout<T>(
    fut: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, LinkError> {
    match tokio::time::timeout(BULK_TIMEOUT, fut).await {
        Ok(res) => Ok(res?),
        Err(_) => Err(LinkError::Timeout),
    }
}

async fn with_timeout<T>(fut: impl Future<Output = redis::RedisResult<T>>) -> Result<T, LinkError> {
    match tokio::time::timeout(COMMAND_TIMEOUT, fut).await {
        Ok(res) => Ok(res?),
        Err(_) => Err(LinkError::Timeout),
    }
}

/// Deliver one push from Redis to the handler of its channel.
fn route_push(inner: &Inner, push: PushInfo) {
    match push.kind {
        PushKind::Message | PushKind::SMessage => {
            let mut data = push.data.into_iter();
            let (Some(chan), Some(payload)) = (data.next(), data.next()) else {
                return;
            };
            let (Ok(chan), Ok(payload)) = (
                String::from_redis_value(chan),
                Vec::<u8>::from_redis_value(payload),
            ) else {
                tracing::warn!("malformed pub/sub message from redis");
                return;
            };
            inner.metrics.pubsub_received.inc();
            // Cloned out of the lock: an inline delivery must not hold up (un)subscribing.
            let route = inner.handlers.read().unwrap().get(&chan).cloned();
            match route {
                Some(Route::Queue(tx)) => {
                    if let Err(e) = tx.try_send((chan, payload)) {
                        // The adapter's buffer (stream_buffer) is full: the message is lost.
                        tracing::warn!("pub/sub message dropped, handler queue full: {e}");
                    }
                }
                Some(Route::Inline(sink)) => sink(&chan, &payload),
                // Unsubscribed meanwhile.
                None => inner.metrics.pubsub_ignored.inc(),
            }
        }
        PushKind::Disconnection => inner.broken.notify_one(),
        _ => {}
    }
}

/// Whether a `ROLE` answer is a master's (`["master", offset, replicas]`).
fn is_master(role: &redis::Value) -> bool {
    let first = match role {
        redis::Value::Array(items) => items.first(),
        _ => None,
    };
    matches!(first, Some(redis::Value::BulkString(b)) if b == b"master")
        || matches!(first, Some(redis::Value::SimpleString(s)) if s == "master")
}

impl Driver for RedisLink {
    type Error = LinkError;

    /// Queues the message for Redis and returns (see the module doc). Never fails: while
    /// Redis is away the message is counted as lost for other workers and the adapter goes on
    /// to deliver it locally.
    async fn publish(&self, chan: String, val: Vec<u8>) -> Result<(), Self::Error> {
        self.enqueue((chan, val, false));
        Ok(())
    }

    async fn subscribe(
        &self,
        chan: String,
        size: usize,
    ) -> Result<MessageStream<ChanItem>, Self::Error> {
        let (tx, rx) = mpsc::channel(size);
        let conn = {
            let mut handlers = self.inner.handlers.write().unwrap();
            handlers.insert(chan.clone(), Route::Queue(tx));
            self.connection()
        };
        // While down, the next connection subscribes it; a failure here is repaired the same way.
        if let Some(mut conn) = conn
            && let Err(e) = with_timeout(conn.subscribe(std::slice::from_ref(&chan), false)).await
        {
            tracing::debug!(%chan, "subscribe failed, will renew on reconnect: {e}");
            self.suspect();
        }
        Ok(MessageStream::new(rx))
    }

    async fn unsubscribe(&self, chan: String) -> Result<(), Self::Error> {
        self.inner.handlers.write().unwrap().remove(&chan);
        if let Some(mut conn) = self.connection() {
            // Best effort: a stale subscription only costs ignored messages.
            let _ = with_timeout(conn.unsubscribe(std::slice::from_ref(&chan), false)).await;
        }
        Ok(())
    }

    /// While Redis is away this node is alone: answer 1, so requests that wait for peers'
    /// answers finish at once instead of waiting for their timeout.
    async fn num_serv(&self, chan: &str) -> Result<u16, Self::Error> {
        let Some(mut conn) = self.connection() else {
            return Ok(1);
        };
        let mut numsub = redis::cmd("PUBSUB");
        numsub.arg("NUMSUB").arg(chan);
        // A map on a cluster (every node's count, summed), pairs on one server.
        match with_timeout(numsub.query_async::<HashMap<String, u16>>(&mut conn)).await {
            Ok(counts) => Ok(counts.get(chan).copied().unwrap_or(0).max(1)),
            Err(e) => {
                self.suspect();
                tracing::debug!("PUBSUB NUMSUB failed, counting this node alone: {e}");
                Ok(1)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_master_role_is_master() {
        let role = |r: &str| redis::Value::Array(vec![redis::Value::BulkString(r.into())]);
        assert!(is_master(&role("master")));
        assert!(!is_master(&role("slave")));
        assert!(!is_master(&redis::Value::Nil));
    }
}
