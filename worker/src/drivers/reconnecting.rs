//! A socketioxide-redis `Driver` that survives Redis outages.
//!
//! Invariants: the set of wanted subscriptions lives here, not in the connection, so every new
//! connection re-subscribes to all of it; a publish never fails towards the adapter, so local
//! delivery happens even while Redis is away (the stock adapter drops it on a publish error).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, FromRedisValue, PushInfo, PushKind};
use shared::config::RedisTlsConfig;
use shared::{Backoff, Shutdown};
use socketioxide_redis::drivers::{ChanItem, Driver, MessageStream};
use tokio::sync::{Notify, mpsc, watch};

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

/// A function given each message of a channel: `(channel, payload)`.
pub type Sink = Arc<dyn Fn(&str, &[u8]) + Send + Sync>;

/// How many channels one SUBSCRIBE or UNSUBSCRIBE names at most.
const CHANNELS_PER_COMMAND: usize = 1000;

type Handlers = HashMap<String, Route>;

struct Inner {
    client: redis::Client,
    url_for_logs: String,
    /// Wanted subscriptions: channel → where its messages go. Survives reconnections.
    /// The same lock orders "snapshot for re-subscribe" against "add one", see `subscribe`.
    handlers: RwLock<Handlers>,
    /// The live connection, `None` while down.
    conn: Mutex<Option<MultiplexedConnection>>,
    /// Woken by the push sender when the connection reports its own death.
    broken: Notify,
    state_tx: watch::Sender<LinkState>,
    metrics: WorkerMetrics,
    backoff: (Duration, Duration),
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
    /// A link to `url` (RESP3 is forced: pub/sub pushes need it). Nothing connects until
    /// [`RedisLink::run`] is spawned.
    ///
    /// # Errors
    /// The URL cannot be understood by the redis client.
    pub fn new(
        url: &str,
        tls: &RedisTlsConfig,
        backoff_min: Duration,
        backoff_max: Duration,
        metrics: WorkerMetrics,
    ) -> Result<Self, redis::RedisError> {
        let tls_url = url.starts_with("rediss://");
        // redis-rs spells "do not verify" as a URL fragment.
        let with_fragment = if tls_url && tls.insecure && !url.contains('#') {
            format!("{url}#insecure")
        } else {
            url.to_owned()
        };
        let info = redis::IntoConnectionInfo::into_connection_info(with_fragment.as_str())?;
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(redis::ProtocolVersion::RESP3);
        let info = info.set_redis_settings(settings);
        let client = if tls_url && !tls.ca_file.is_empty() && !tls.insecure {
            let ca = std::fs::read(&tls.ca_file).map_err(|e| {
                redis::RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "redis.tls.ca_file cannot be read",
                    format!("{}: {e}", tls.ca_file),
                ))
            })?;
            let certs = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(ca),
            };
            redis::Client::build_with_tls(info, certs)?
        } else {
            redis::Client::open(info)?
        };
        let (state_tx, _) = watch::channel(LinkState::Connecting(format!(
            "connecting to {}",
            redact(url)
        )));
        metrics.redis_up.set(0);
        Ok(RedisLink {
            inner: Arc::new(Inner {
                client,
                url_for_logs: redact(url),
                handlers: RwLock::new(HashMap::new()),
                conn: Mutex::new(None),
                broken: Notify::new(),
                state_tx,
                metrics,
                backoff: (backoff_min, backoff_max),
            }),
        })
    }

    /// Watch the link state (for readiness and tests).
    pub fn state(&self) -> watch::Receiver<LinkState> {
        self.inner.state_tx.subscribe()
    }

    /// The live connection, if any, for commands of our own (INFO, probes).
    pub fn connection(&self) -> Option<MultiplexedConnection> {
        self.inner.conn.lock().unwrap().clone()
    }

    /// Keep the link up until shutdown: connect, re-subscribe everything, watch for breakage,
    /// and start over with capped backoff.
    pub async fn run(self, mut shutdown: Shutdown) {
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
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_push_sender(move |push: PushInfo| {
                if let Some(inner) = weak.upgrade() {
                    route_push(&inner, push);
                }
                Ok::<(), std::convert::Infallible>(())
            });
        let conn = self
            .inner
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        // Publish the connection and snapshot the wanted channels under the handlers lock:
        // a `subscribe` that runs after this sees the connection; one before is in the snapshot.
        let channels: Vec<String> = {
            let handlers = self.inner.handlers.read().unwrap();
            *self.inner.conn.lock().unwrap() = Some(conn.clone());
            handlers.keys().cloned().collect()
        };
        let mut c = conn.clone();
        for batch in channels.chunks(CHANNELS_PER_COMMAND) {
            with_timeout(c.subscribe(batch)).await.inspect_err(|_| {
                *self.inner.conn.lock().unwrap() = None;
            })?;
        }
        Ok(())
    }

    /// Resolves with a reason when the connection breaks. A disconnect push or a failed
    /// command only triggers an early PING: a stale wake-up must not cost a reconnection.
    async fn watch_until_broken(&self) -> String {
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
            let ping = redis::cmd("PING");
            if let Err(e) = with_timeout(ping.query_async::<String>(&mut conn)).await {
                return format!("ping failed: {e}");
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
            if let Err(e) = with_timeout(conn.subscribe(batch)).await {
                tracing::debug!("subscribe failed, will renew on reconnect: {e}");
                self.suspect();
                return;
            }
        }
    }

    /// Stop listening to `channels` (best effort: a stale subscription only brings messages
    /// that find no route).
    pub async fn unsubscribe_many(&self, channels: &[String]) {
        let conn = {
            let mut handlers = self.inner.handlers.write().unwrap();
            for chan in channels {
                handlers.remove(chan);
            }
            self.connection()
        };
        let Some(mut conn) = conn else { return };
        for batch in channels.chunks(CHANNELS_PER_COMMAND) {
            if with_timeout(conn.unsubscribe(batch)).await.is_err() {
                self.suspect();
                return;
            }
        }
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

/// Hide a password in a URL before it reaches a log line or `/readyz`.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

impl Driver for RedisLink {
    type Error = LinkError;

    /// Never fails: while Redis is away the message is counted as lost for other workers and
    /// the adapter goes on to deliver it locally.
    async fn publish(&self, chan: String, val: Vec<u8>) -> Result<(), Self::Error> {
        let Some(mut conn) = self.connection() else {
            self.inner.metrics.redis_publish_failures.inc();
            return Ok(());
        };
        let mut publish = redis::cmd("PUBLISH");
        publish.arg(chan).arg(val);
        if let Err(e) = with_timeout(publish.query_async::<i64>(&mut conn)).await {
            self.inner.metrics.redis_publish_failures.inc();
            tracing::debug!("publish failed: {e}");
            self.suspect();
        }
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
            && let Err(e) = with_timeout(conn.subscribe(&chan)).await
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
            let _ = with_timeout(conn.unsubscribe(&chan)).await;
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
        match with_timeout(numsub.query_async::<(String, u16)>(&mut conn)).await {
            Ok((_, n)) => Ok(n.max(1)),
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
    fn redact_hides_password_only() {
        assert_eq!(redact("redis://:secret@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(redact("redis://h:1"), "redis://h:1");
    }
}
