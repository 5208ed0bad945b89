//! The fleet's Socket.IO adapter: socketioxide-redis's, except that a broadcast to one room
//! travels on that room's own Redis channel, which only workers holding a member of the room
//! listen to (see `room_channels`). Everything else — broadcasts to all, to several rooms or
//! with acks, `fetch_sockets`, remote join/leave/disconnect, `rooms` — is a request on the
//! namespace's common channel, answered by every worker, as socketioxide-redis does it.
//!
//! Why one room only: a socket in two rooms of one broadcast must get it once, which only one
//! message can promise. Acks need the number of answering workers, which only the common
//! channel knows. (`@socket.io/redis-adapter`'s sharded adapter draws the same line.)
//!
//! Exactly once: the publishing worker delivers to its own members at once (also while Redis
//! is away), and ignores its message when Redis brings it back.

mod room_channels;

use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use socketioxide_core::Uid;
use socketioxide_core::adapter::errors::{AdapterError, BroadcastError};
use socketioxide_core::adapter::remote_packet::{
    RequestIn, RequestOut, RequestTypeIn, RequestTypeOut,
};
use socketioxide_core::adapter::{
    BroadcastFlags, BroadcastOptions, CoreAdapter, CoreLocalAdapter, DefinedAdapter,
    RemoteSocketData, Room, RoomParam, SocketEmitter,
};
use socketioxide_core::packet::Packet;
use socketioxide_redis::{CustomRedisAdapter, RedisAdapterConfig, RedisAdapterCtr};

use crate::drivers::{RedisLink, Sink};
use crate::metrics::WorkerMetrics;

pub use room_channels::{Applier, RoomChannels};

type Inner<E> = CustomRedisAdapter<E, RedisLink>;

/// What every namespace's adapter shares: the Redis link, the adapter settings, and this
/// worker's room channels.
pub struct AdapterState {
    inner: RedisAdapterCtr<RedisLink>,
    link: RedisLink,
    rooms: RoomChannels,
    metrics: WorkerMetrics,
}

impl AdapterState {
    /// The state for adapters over `link`; spawn the returned [`Applier`] to keep the room
    /// subscriptions.
    pub fn new(
        link: RedisLink,
        config: RedisAdapterConfig,
        prefix: &str,
        metrics: WorkerMetrics,
    ) -> (Self, Applier) {
        let (rooms, applier) = RoomChannels::new(prefix, link.clone(), metrics.clone());
        let state = AdapterState {
            inner: RedisAdapterCtr::new_with_driver(link.clone(), config),
            link,
            rooms,
            metrics,
        };
        (state, applier)
    }

    /// The room channels, for waiting on joins ([`RoomChannels::settled`]).
    pub fn rooms(&self) -> &RoomChannels {
        &self.rooms
    }
}

/// One namespace's adapter.
pub struct FleetAdapter<E> {
    inner: Arc<Inner<E>>,
    uid: Uid,
    link: RedisLink,
    rooms: RoomChannels,
    metrics: WorkerMetrics,
    /// Where this namespace's room channels deliver, set in `init`.
    sink: Arc<OnceLock<Sink>>,
}

impl<E> DefinedAdapter for FleetAdapter<E> {}

impl<E: SocketEmitter> FleetAdapter<E> {
    fn local(&self) -> &CoreLocalAdapter<E> {
        self.inner.get_local()
    }

    /// The one room of a broadcast that goes on that room's channel, if it is one.
    fn room_channel_of(&self, opts: &BroadcastOptions) -> Option<String> {
        match opts.rooms.as_slice() {
            [room] if opts.server_id.is_none() && !opts.has_flag(BroadcastFlags::Local) => {
                Some(self.rooms.channel(self.local().path(), room))
            }
            _ => None,
        }
    }

    /// A broadcast that arrived on one of this namespace's room channels.
    fn receive(&self, payload: &[u8]) {
        let req: RequestIn = match rmp_serde::from_slice(payload) {
            Ok(req) => req,
            Err(e) => {
                self.metrics.pubsub_ignored.inc();
                tracing::warn!("unreadable room broadcast from redis: {e}");
                return;
            }
        };
        // Its origin delivered it to its own members already.
        if req.node_id == self.uid {
            self.metrics.pubsub_ignored.inc();
            return;
        }
        let (RequestTypeIn::Broadcast(packet), Some(opts)) = (req.r#type, req.opts) else {
            self.metrics.pubsub_ignored.inc();
            return;
        };
        self.metrics.pubsub_delivered.inc();
        if let Err(errors) = self.local().broadcast(packet, opts) {
            self.metrics.deliveries_dropped.inc_by(errors.len() as u64);
        }
    }
}

impl<E: SocketEmitter> CoreAdapter<E> for FleetAdapter<E> {
    type Error = <Inner<E> as CoreAdapter<E>>::Error;
    type State = AdapterState;
    type AckStream = <Inner<E> as CoreAdapter<E>>::AckStream;
    type InitRes = <Inner<E> as CoreAdapter<E>>::InitRes;

    fn new(state: &Self::State, local: CoreLocalAdapter<E>) -> Self {
        let sink = Arc::new(OnceLock::new());
        let hook = state
            .rooms
            .hook(local.path(), Arc::clone(&sink), &state.metrics);
        let uid = local.server_id();
        let local = local.with_room_hook(hook);
        FleetAdapter {
            inner: Arc::new(<Inner<E> as CoreAdapter<E>>::new(&state.inner, local)),
            uid,
            link: state.link.clone(),
            rooms: state.rooms.clone(),
            metrics: state.metrics.clone(),
            sink,
        }
    }

    fn init(self: Arc<Self>, on_success: impl FnOnce() + Send + 'static) -> Self::InitRes {
        // Weak: the link holds the sink, and the adapter holds the link.
        let this: Weak<Self> = Arc::downgrade(&self);
        let sink: Sink = Arc::new(move |_channel: &str, payload: &[u8]| {
            if let Some(adapter) = this.upgrade() {
                adapter.receive(payload);
            }
        });
        let _ = self.sink.set(sink);
        Arc::clone(&self.inner).init(on_success)
    }

    async fn close(&self) -> Result<(), Self::Error> {
        self.inner.close().await
    }

    async fn server_count(&self) -> Result<u16, Self::Error> {
        self.inner.server_count().await
    }

    async fn broadcast(
        &self,
        packet: Packet,
        opts: BroadcastOptions,
    ) -> Result<(), BroadcastError> {
        let Some(channel) = self.room_channel_of(&opts) else {
            return self.inner.broadcast(packet, opts).await;
        };
        let message = RequestOut::new(self.uid, RequestTypeOut::Broadcast(&packet), &opts);
        let bytes = rmp_serde::to_vec(&message)
            .map_err(|e| AdapterError::from(Box::new(e) as Box<dyn std::error::Error + Send>))?;
        // Members here first: they do not wait for Redis, nor miss it while it is away.
        let local = self.local().broadcast(packet, opts);
        // Never fails: while Redis is away the publish is counted as lost for other workers.
        self.link.publish_room(channel, bytes);
        local.map_err(BroadcastError::Socket)
    }

    async fn broadcast_with_ack(
        &self,
        packet: Packet,
        opts: BroadcastOptions,
        timeout: Option<Duration>,
    ) -> Result<Self::AckStream, Self::Error> {
        self.inner.broadcast_with_ack(packet, opts, timeout).await
    }

    async fn add_sockets(
        &self,
        opts: BroadcastOptions,
        rooms: impl RoomParam,
    ) -> Result<(), Self::Error> {
        self.inner.add_sockets(opts, rooms).await
    }

    async fn del_sockets(
        &self,
        opts: BroadcastOptions,
        rooms: impl RoomParam,
    ) -> Result<(), Self::Error> {
        self.inner.del_sockets(opts, rooms).await
    }

    async fn disconnect_socket(&self, opts: BroadcastOptions) -> Result<(), BroadcastError> {
        self.inner.disconnect_socket(opts).await
    }

    async fn rooms(&self, opts: BroadcastOptions) -> Result<Vec<Room>, Self::Error> {
        self.inner.rooms(opts).await
    }

    async fn fetch_sockets(
        &self,
        opts: BroadcastOptions,
    ) -> Result<Vec<RemoteSocketData>, Self::Error> {
        self.inner.fetch_sockets(opts).await
    }

    fn get_local(&self) -> &CoreLocalAdapter<E> {
        self.local()
    }
}
