//! WebSocket connections passed to the workers this balancer supervises (see
//! `shared::handoff`), so that a WebSocket's traffic never crosses the balancer: after its
//! upgrade request is routed, the client's socket itself goes to the worker, with the request
//! head, and the balancer closes its own copy. This is what makes the balancer's CPU and
//! memory independent of how many messages its WebSockets carry, as with Node's
//! `@socket.io/sticky` primary.
//!
//! Long-polling requests that name a session take the same way, one request per connection
//! (see `FleetProxy::hand_off_poll`): the worker answers it `Connection: close`. They are not
//! WebSockets, so the gauge does not count them; they are tracked only while they hold a slot
//! in their address's connection count, and otherwise sent with id 0, which asks for no report.
//!
//! A long-polling connection stays with its worker for the session's later requests
//! (`shared::handoff::KEEP_HEADER`) until the worker gives it back: a given-back connection
//! arrives here with the bytes the worker read of it, and goes to the listener (`front`) to be
//! routed as if just accepted.
//!
//! One channel per worker process: the supervisor opens it when it starts the worker and
//! closes it when the worker exits, since every connection the worker held died with it.

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use pingora_prometheus::prometheus::IntGauge;
use pingora_proxy::Session;
use shared::handoff::{self, FromWorker};
use tokio::net::UnixDatagram;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use super::raw_http;
use crate::limits::ConnSlot;
use crate::metrics::METRICS;

/// Every live channel, by worker label (`w0`, `w1`, …: what the supervisor names a worker and
/// the proxy's routing reports), with the task reading its close reports.
pub struct Handoffs {
    channels: RwLock<HashMap<String, (Arc<Channel>, AbortHandle)>>,
    returns: mpsc::UnboundedSender<Returned>,
}

/// A connection a worker gave back: its socket, and the bytes the worker read of it and did
/// not serve, to be read first.
pub struct Returned {
    /// The client's socket.
    pub stream: std::net::TcpStream,
    /// Read before the socket.
    pub unread: Vec<u8>,
}

impl Handoffs {
    /// No channels yet; connections workers give back come out of the receiver.
    pub fn new() -> (Self, mpsc::UnboundedReceiver<Returned>) {
        let (returns, rx) = mpsc::unbounded_channel();
        let handoffs = Handoffs {
            channels: RwLock::default(),
            returns,
        };
        (handoffs, rx)
    }

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
                open: HashMap::new(),
                dead: false,
            }),
            gauge: METRICS.websockets.with_label_values(&[label]),
        });
        let reader =
            tokio::spawn(read_notes(Arc::clone(&channel), self.returns.clone())).abort_handle();
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

/// Connections passed and not yet reported closed, by id, each with its slot in its client
/// address's count and whether it is a WebSocket (counted by the gauge). Once the worker is gone they are settled, and late reports (a pass that
/// failed as the worker died) must not move the gauge.
struct Count {
    open: HashMap<u64, (ConnSlot, bool)>,
    dead: bool,
}

/// Ids of passed connections, unique in this process.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl Channel {
    /// Passes the client connection of `session`, with `head` (the request as the worker is to
    /// read it), to the worker, with the connection's `slot` in its address's count, held until
    /// the worker reports it closed. A `websocket` is counted by the gauge of open WebSockets
    /// until then; anything else (a long-polling request) is tracked only while its slot holds
    /// a place, and otherwise sent as id 0, which the worker never reports. On success the session no longer holds the connection and
    /// the caller answers nothing; on failure nothing was passed and the session is as it was
    /// (the slot is handed back).
    ///
    /// # Errors
    /// The worker is gone, or did not take the connection within `limit`.
    pub async fn pass(
        &self,
        session: &mut Session,
        head: &[u8],
        limit: Duration,
        slot: ConnSlot,
        websocket: bool,
    ) -> Result<(), (io::Error, ConnSlot)> {
        let fd = session
            .downstream_session
            .stream()
            .map(|s| s.id())
            .ok_or_else(|| io::Error::other("not an HTTP/1 connection"));
        let fd = match fd {
            Ok(fd) => fd,
            Err(e) => return Err((e, slot)),
        };
        let (id, untracked) = if websocket || slot.is_held() {
            let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
            // Counted before sending: the worker may report it closed before `send` returns.
            self.add(id, slot, websocket);
            (id, ConnSlot::default())
        } else {
            (handoff::UNTRACKED, slot)
        };
        let sent = tokio::time::timeout(limit, handoff::send_conn(&self.sock, id, head, fd))
            .await
            .unwrap_or_else(|_| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the worker did not take the connection",
                ))
            });
        match sent {
            // The worker has its own descriptor now; closing ours leaves the socket open.
            Ok(()) => {
                drop(raw_http::take_client(session));
                Ok(())
            }
            Err(e) if id == handoff::UNTRACKED => Err((e, untracked)),
            Err(e) => Err((e, self.remove(id).unwrap_or_default())),
        }
    }

    fn add(&self, id: u64, slot: ConnSlot, websocket: bool) {
        let mut count = self.count.lock().unwrap();
        if !count.dead {
            count.open.insert(id, (slot, websocket));
            if websocket {
                self.gauge.inc();
            }
        }
    }

    fn remove(&self, id: u64) -> Option<ConnSlot> {
        let mut count = self.count.lock().unwrap();
        let (slot, websocket) = count.open.remove(&id)?;
        if websocket {
            self.gauge.dec();
        }
        Some(slot)
    }

    /// The worker is gone: whatever it still held is closed.
    fn settle(&self) {
        let mut count = self.count.lock().unwrap();
        let websockets = count.open.values().filter(|(_, ws)| *ws).count();
        self.gauge.sub(websockets as i64);
        count.open.clear();
        count.dead = true;
    }
}

/// The worker's side of the channel: closed connections, and connections given back.
async fn read_notes(channel: Arc<Channel>, returns: mpsc::UnboundedSender<Returned>) {
    let mut buf = vec![0u8; handoff::MAX_MESSAGE];
    while let Ok(note) = handoff::recv_from_worker(&channel.sock, &mut buf).await {
        match note {
            FromWorker::Closed(ids) => {
                for id in ids {
                    channel.remove(id);
                }
            }
            FromWorker::Returned {
                id,
                unread,
                fd: Some(fd),
            } => {
                // Its place in its address's count is taken again when it is routed.
                channel.remove(id);
                let stream = std::net::TcpStream::from(fd);
                let _ = returns.send(Returned { stream, unread });
            }
            FromWorker::Returned { id, fd: None, .. } => {
                channel.remove(id);
                tracing::warn!("a connection given back arrived without its socket");
            }
        }
    }
}
