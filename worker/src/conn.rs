//! Connections the worker can cut one by one: every accepted TCP stream is wrapped so a drain
//! can end it, even after hyper handed it to a WebSocket (socketioxide has no per-socket
//! transport close that avoids the Socket.IO disconnect packet).

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// Every open connection, and the Engine.IO session bound to it when it carries a WebSocket.
#[derive(Default)]
pub struct ConnRegistry {
    next_id: AtomicU64,
    conns: Mutex<Conns>,
}

#[derive(Default)]
struct Conns {
    entries: HashMap<u64, ConnEntry>,
    /// sid → connections carrying its WebSocket: a drain cuts one session in O(1), not by
    /// scanning every connection.
    by_sid: HashMap<String, Vec<u64>>,
}

struct ConnEntry {
    kill: CancellationToken,
    sid: Option<String>,
}

impl Conns {
    fn remove(&mut self, id: u64) {
        let Some(ConnEntry { sid: Some(sid), .. }) = self.entries.remove(&id) else {
            return;
        };
        if let Some(ids) = self.by_sid.get_mut(&sid) {
            ids.retain(|i| *i != id);
            if ids.is_empty() {
                self.by_sid.remove(&sid);
            }
        }
    }
}

/// Put in each request's extensions: which connection carried it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnId(pub u64);

impl ConnRegistry {
    /// Register a new connection and wrap its stream. The permit (the worker's connection
    /// cap) is released when the stream is dropped, even if a WebSocket outlived hyper.
    pub fn wrap<T>(
        self: &Arc<Self>,
        io: T,
        permit: Option<OwnedSemaphorePermit>,
    ) -> (ConnId, KillableIo<T>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let kill = CancellationToken::new();
        let entry = ConnEntry {
            kill: kill.clone(),
            sid: None,
        };
        self.conns.lock().unwrap().entries.insert(id, entry);
        let guard = ConnGuard {
            id,
            registry: Arc::clone(self),
            _permit: permit,
        };
        let io = KillableIo {
            io,
            killed: Box::pin(kill.cancelled_owned()),
            _guard: guard,
        };
        (ConnId(id), io)
    }

    /// Record that connection `id` carries the WebSocket of session `sid`.
    pub fn bind_sid(&self, id: ConnId, sid: &str) {
        let mut conns = self.conns.lock().unwrap();
        let Some(entry) = conns.entries.get_mut(&id.0) else {
            return;
        };
        if entry.sid.as_deref() == Some(sid) {
            return;
        }
        entry.sid = Some(sid.to_owned());
        conns.by_sid.entry(sid.to_owned()).or_default().push(id.0);
    }

    /// Cut every connection bound to `sid`; returns how many.
    pub fn kill_sid(&self, sid: &str) -> usize {
        let conns = self.conns.lock().unwrap();
        let ids = conns.by_sid.get(sid).map_or(&[][..], Vec::as_slice);
        for id in ids {
            conns.entries[id].kill.cancel();
        }
        ids.len()
    }

    /// Sessions whose WebSocket is still open.
    pub fn bound_count(&self) -> usize {
        self.conns.lock().unwrap().by_sid.len()
    }

    /// All open connections.
    pub fn len(&self) -> usize {
        self.conns.lock().unwrap().entries.len()
    }

    /// True when no connection is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Removes the registry entry when the stream is dropped, wherever it ended up.
struct ConnGuard {
    id: u64,
    registry: Arc<ConnRegistry>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.registry.conns.lock().unwrap().remove(self.id);
    }
}

/// A stream that fails every read and write once its connection is killed.
pub struct KillableIo<T> {
    io: T,
    killed: Pin<Box<WaitForCancellationFutureOwned>>,
    _guard: ConnGuard,
}

impl<T> KillableIo<T> {
    fn check(&mut self, cx: &mut Context<'_>) -> Result<(), io::Error> {
        // Polling the cancellation registers the waker, so a pending read wakes on kill.
        match self.killed.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection drained",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for KillableIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for KillableIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn kill_wakes_a_pending_read_and_unregisters_on_drop() {
        let registry = Arc::new(ConnRegistry::default());
        let (a, mut b) = tokio::io::duplex(64);
        let (id, mut io) = registry.wrap(a, None);
        registry.bind_sid(id, "abc");
        assert_eq!(registry.bound_count(), 1);
        b.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 2];
        io.read_exact(&mut buf).await.unwrap();
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            let err = io.read(&mut buf).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
        });
        tokio::task::yield_now().await;
        assert_eq!(registry.kill_sid("abc"), 1);
        reader.await.unwrap();
        assert!(registry.is_empty());
        assert_eq!(registry.bound_count(), 0);
    }
}
