//! What an application gets from the fleet: the worker's identity, the Socket.IO handle, and
//! measured room broadcasts that reach every worker. Apps name the Socket.IO types through the
//! aliases here ([`Socket`], [`Ack`], [`Io`]), never the adapter, so the adapter can change
//! without touching them.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use socketioxide::extract::{AckSender, SocketRef};
use socketioxide::{BroadcastError, SocketIo};

use crate::FleetAdapter;
use crate::auth::Grant;
use crate::metrics::WorkerMetrics;

/// A connected client's socket, as an app's handlers receive it (the `SocketRef` extractor of
/// this fleet's Socket.IO server). Apps write their handlers against this type.
pub type Socket = SocketRef<FleetAdapter>;

/// The acknowledgement extractor for an event handler: `ack.send(&value)` answers the client.
pub type Ack = AckSender<FleetAdapter>;

/// This fleet's Socket.IO server handle, as [`Fleet::io`] gives it.
pub type Io = SocketIo<FleetAdapter>;

/// Handle passed to the application for each connected socket. Cheap to clone.
#[derive(Clone)]
pub struct Fleet {
    worker_id: Arc<str>,
    io: Io,
    metrics: WorkerMetrics,
}

impl Fleet {
    pub(crate) fn new(worker_id: &str, io: Io, metrics: WorkerMetrics) -> Self {
        Fleet {
            worker_id: worker_id.into(),
            io,
            metrics,
        }
    }

    /// This worker's id (`w0`, or `--id` when standalone).
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// The Socket.IO server, for anything the helpers below do not cover.
    pub fn io(&self) -> &Io {
        &self.io
    }

    /// What `socket` may do, as its connection was admitted (`auth:`, `rooms:`).
    pub fn grant(socket: &Socket) -> Grant {
        socket
            .extensions
            .get::<Grant>()
            .unwrap_or_else(Grant::anonymous)
    }

    /// Count a client request refused by its permissions in
    /// `fleet_worker_forbidden_total{action}`.
    pub fn count_forbidden(&self, action: &str) {
        self.metrics.forbidden.with_label_values(&[action]).inc();
    }

    /// Count one received event in `fleet_worker_events_total{event}`.
    pub fn count_event(&self, event: &str) {
        self.metrics.event(event);
    }

    /// Emit `event` to every member of `room` on every worker, the sender included if it is a
    /// member, counted and timed in the broadcast metrics. While Redis is away, members on this
    /// worker still receive it. Returns how many local members could not take the message
    /// (full buffer or closed; also counted in `fleet_worker_deliveries_dropped_total`).
    ///
    /// # Errors
    /// The local emit failed (the payload could not be serialised).
    pub async fn publish<T: ?Sized + Serialize>(
        &self,
        room: String,
        event: &'static str,
        data: &T,
    ) -> Result<usize, BroadcastError> {
        let started = Instant::now();
        self.metrics.broadcasts.inc();
        let res = self.io.to(room).emit(event, data).await;
        self.metrics
            .broadcast_duration
            .observe(started.elapsed().as_secs_f64());
        match res {
            Ok(()) => Ok(0),
            // Members that could not take the message (a full buffer: a slow or vanished
            // client) do not make the publish fail for everyone else.
            Err(BroadcastError::Socket(errors)) => {
                self.metrics.deliveries_dropped.inc_by(errors.len() as u64);
                Ok(errors.len())
            }
            Err(e) => Err(e),
        }
    }
}

/// An application: registers its event handlers on each new socket.
///
/// Any `Fn(Socket, &Fleet)` closure is an `App`.
pub trait App: Send + Sync + 'static {
    /// Called once per connected socket, before any of its events are handled.
    fn on_connect(&self, socket: Socket, fleet: &Fleet);
}

impl<F> App for F
where
    F: Fn(Socket, &Fleet) + Send + Sync + 'static,
{
    fn on_connect(&self, socket: Socket, fleet: &Fleet) {
        self(socket, fleet)
    }
}

#[cfg(test)]
mod tests {
    /// The apps in this repository name only the aliases above: swapping the adapter must not
    /// touch them.
    #[test]
    fn apps_do_not_name_the_adapter() {
        for (file, text) in [
            ("src/app.rs", include_str!("app.rs")),
            ("examples/chat.rs", include_str!("../examples/chat.rs")),
        ] {
            assert!(!text.contains("FleetAdapter"), "{file} names the adapter");
        }
    }
}
