//! What an application gets from the fleet: the worker's identity, the Socket.IO handle, and
//! measured room broadcasts that reach every worker.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use socketioxide::extract::SocketRef;
use socketioxide::{BroadcastError, SocketIo};

use crate::FleetAdapter;
use crate::metrics::WorkerMetrics;

/// Handle passed to the application for each connected socket. Cheap to clone.
#[derive(Clone)]
pub struct Fleet {
    worker_id: Arc<str>,
    io: SocketIo<FleetAdapter>,
    metrics: WorkerMetrics,
}

impl Fleet {
    pub(crate) fn new(worker_id: &str, io: SocketIo<FleetAdapter>, metrics: WorkerMetrics) -> Self {
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
    pub fn io(&self) -> &SocketIo<FleetAdapter> {
        &self.io
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
/// Any `Fn(SocketRef<FleetAdapter>, &Fleet)` closure is an `App`.
pub trait App: Send + Sync + 'static {
    /// Called once per connected socket, before any of its events are handled.
    fn on_connect(&self, socket: SocketRef<FleetAdapter>, fleet: &Fleet);
}

impl<F> App for F
where
    F: Fn(SocketRef<FleetAdapter>, &Fleet) + Send + Sync + 'static,
{
    fn on_connect(&self, socket: SocketRef<FleetAdapter>, fleet: &Fleet) {
        self(socket, fleet)
    }
}
