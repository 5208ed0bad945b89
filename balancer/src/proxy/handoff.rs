//! WebSocket connections passed to the workers this balancer supervises (see
//! `shared::handoff`), so that a WebSocket's traffic never crosses the balancer: after its
//! upgrade request is routed, the client's socket itself goes to the worker, with the request
//! head, and the balancer closes its own copy. This is what makes the balancer's CPU and
//! memory independent of how many messages its WebSockets carry, as with Node's
//! `@socket.io/sticky` primary.
//!
//! One channel per worker process: the supervisor opens it when it starts the worker and
//! closes it when the worker exits, since every connection the worker held died with it.

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use pingora_prometheus::prometheus::IntGauge;
use pingora_proxy::Session;
use shared::handoff;
use tokio::net::UnixDatagram;
use tokio::task::AbortHandle;

use super::raw_http;
use crate::metrics::METRICS;

/// Every live channel, by worker label (`w0`, `w1`, …: what the supervisor names a worker and
/// the proxy's routing reports), with the task reading its close reports.
#[derive(Default)]
pub struct Handoffs {
    channels: RwLock<HashMap<String, (Arc<Channel>, AbortHandle)>>,
}

impl Handoffs {
    /// A fresh channel to worker `label` (replacing any earlier one). Returns the worker's
    /// end, for the child process to inherit, and the channel, to `close` it by.
    ///
    /// # Errors
    /// No descriptors left.
    pub fn open(&self, label: &str) -> io::Result<(OwnedFd, Arc<Channel>)> {
        let (sock, theirs) = handoff::pair()?;
        let channel = Arc::new(Channel {
            sock,
            count: Mutex::new(Count {
                open: 0,
                dead: false,
            }),
            gauge: METRICS.websockets.with_label_values(&[label]),
        });
        let reader = tokio::spawn(count_closed(Arc::clone(&channel))).abort_handle();
        let old = self
            .channels
            .write()
            .unwrap()
            .insert(label.to_owned(), (Arc::clone(&channel), reader));
        if let Some((old, old_reader)) = old {
            old_reader.abort();
            old.settle();
        }
        Ok((theirs, channel))
    }

    /// The worker process behind `channel` exited: its connections are gone, and so is its
    /// channel. (A worker of the same label started since, after a quick resize down and up,
    /// keeps its own.)
    pub fn close(&self, label: &str, channel: &Arc<Channel>) {
        let mut channels = self.channels.write().unwrap();
        if channels
            .get(label)
            .is_some_and(|(current, _)| Arc::ptr_eq(current, channel))
            && let Some((channel, reader)) = channels.remove(label)
        {
            reader.abort();
            channel.settle();
        }
    }

    /// The channel to worker `label`, if it is one this balancer runs.
    pub fn get(&self, label: &str) -> Option<Arc<Channel>> {
        let channels = self.channels.read().unwrap();
        channels.get(label).map(|(channel, _)| Arc::clone(channel))
    }
}

/// The channel to one worker process.
pub struct Channel {
    sock: UnixDatagram,
    count: Mutex<Count>,
    gauge: IntGauge,
}

/// Connections passed and not yet reported closed. Once the worker is gone the count is
/// settled, and late reports (a pass that failed as the worker died) must not move the gauge.
struct Count {
    open: i64,
    dead: bool,
}

impl Channel {
    /// Passes the client connection of `session`, with `head` (the request as the worker is to
    /// read it), to the worker. On success the session no longer holds the connection and the
    /// caller answers nothing; on failure nothing was passed and the session is as it was.
    ///
    /// # Errors
    /// The worker is gone, or did not take the connection within `limit`.
    pub async fn pass(
        &self,
        session: &mut Session,
        head: &[u8],
        limit: Duration,
    ) -> io::Result<()> {
        let fd = session
            .downstream_session
            .stream()
            .map(|s| s.id())
            .ok_or_else(|| io::Error::other("not an HTTP/1 connection"))?;
        // Counted before sending: the worker may report it closed before `send` returns.
        self.add(1);
        let sent = tokio::time::timeout(limit, handoff::send_conn(&self.sock, head, fd))
            .await
            .unwrap_or_else(|_| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the worker did not take the connection",
                ))
            });
        match sent {
            // The worker has its own descriptor now; closing ours leaves the socket open.
            Ok(()) => drop(raw_http::take_client(session)),
            Err(_) => self.add(-1),
        }
        sent
    }

    fn add(&self, n: i64) {
        let mut count = self.count.lock().unwrap();
        if !count.dead {
            count.open += n;
            self.gauge.add(n);
        }
    }

    /// The worker is gone: whatever it still held is closed.
    fn settle(&self) {
        let mut count = self.count.lock().unwrap();
        self.gauge.sub(count.open);
        count.open = 0;
        count.dead = true;
    }
}

async fn count_closed(channel: Arc<Channel>) {
    while let Ok(closed) = handoff::recv_closed(&channel.sock).await {
        channel.add(-(closed.min(i64::MAX as u64) as i64));
    }
}
