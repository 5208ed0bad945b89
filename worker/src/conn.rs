//! Connections the worker can cut one by one: every connection is registered with its socket,
//! so a drain can end it even after hyper handed it to a WebSocket (socketioxide has no
//! per-socket transport close that avoids the Socket.IO disconnect packet). A cut is a
//! `shutdown(2)` of the socket: the kernel wakes whatever waits on it and the transport ends as
//! if the client had gone, at no cost to the connection's reads and writes until then.
//!
//! The registry keeps each socket's raw descriptor, so it must never outlive the socket:
//! `Tracked`'s `Drop` removes the entry, and a struct's own `Drop` runs before any of its
//! fields is dropped, so before the socket closes, whatever order the fields are declared in.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;

use crate::handoff::CloseReport;

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
    /// Open while the entry exists: the entry is removed in `Tracked::drop`, before the
    /// `Tracked`'s socket (the only owner of this descriptor) is closed.
    fd: RawFd,
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
    ///
    /// `io` must own its descriptor and keep it until dropped, as every socket type does.
    pub fn wrap<T: AsFd>(
        self: &Arc<Self>,
        io: T,
        permit: Option<OwnedSemaphorePermit>,
    ) -> (ConnId, Tracked<T>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = ConnEntry {
            fd: io.as_fd().as_raw_fd(),
            sid: None,
        };
        self.conns.lock().unwrap().entries.insert(id, entry);
        let tracked = Tracked {
            id,
            registry: Arc::clone(self),
            _permit: permit,
            _closed: None,
            head: Vec::new(),
            head_read: 0,
            io,
        };
        (ConnId(id), tracked)
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
            // SAFETY: plain shutdown(2) on a socket this process still has open. Its entry
            // exists, so its `Tracked` has not run `drop` (which removes the entry under this
            // lock before the socket, the descriptor's only owner, can close), and cannot
            // finish it while we hold the lock.
            unsafe { libc::shutdown(conns.entries[id].fd, libc::SHUT_RDWR) };
        }
        ids.len()
    }

    /// Sessions whose WebSocket is still open.
    pub fn bound_count(&self) -> usize {
        self.conns.lock().unwrap().by_sid.len()
    }

    /// All open connections.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.conns.lock().unwrap().entries.len()
    }

    /// True when no connection is open.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A registered connection's stream; reads and writes go straight through (after the request
/// head of a handed-over connection). Dropping it, wherever it ended up, unregisters it.
pub struct Tracked<T> {
    id: u64,
    registry: Arc<ConnRegistry>,
    _permit: Option<OwnedSemaphorePermit>,
    _closed: Option<CloseReport>,
    head: Vec<u8>,
    head_read: usize,
    /// Never moved out nor replaced: its descriptor stays open until `Tracked` is dropped.
    io: T,
}

impl<T> Drop for Tracked<T> {
    /// Runs before any field is dropped, so the registry forgets the descriptor while `io`
    /// still holds it open: `kill_sid` can never shut down a closed (or reused) descriptor.
    fn drop(&mut self) {
        self.registry.conns.lock().unwrap().remove(self.id);
    }
}

impl<T> Tracked<T> {
    /// A connection the balancer handed over: `head` (what it read of the first request) is
    /// read before the socket, and `closed` reports the connection's end to the balancer.
    pub fn handed_over(mut self, head: Vec<u8>, closed: CloseReport) -> Self {
        self.head = head;
        self._closed = Some(closed);
        self
    }
}

impl<T> Tracked<T> {
    /// A connection the balancer handed over to stay (`kept`): its head is read separately,
    /// and `closed` reports the connection's end to the balancer.
    pub fn kept(mut self, closed: CloseReport) -> Self {
        self._closed = Some(closed);
        self
    }
}

impl<T: AsRawFd> AsRawFd for Tracked<T> {
    fn as_raw_fd(&self) -> RawFd {
        self.io.as_raw_fd()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.head_read < this.head.len() {
            let rest = &this.head[this.head_read..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.head_read += n;
            if this.head_read == this.head.len() {
                this.head = Vec::new();
                this.head_read = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
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
    use tokio::net::{TcpListener, TcpStream};

    #[tokio::test]
    async fn kill_ends_a_pending_read_and_unregisters_on_drop() {
        let registry = Arc::new(ConnRegistry::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (id, mut io) = registry.wrap(server, None);
        registry.bind_sid(id, "abc");
        assert_eq!(registry.bound_count(), 1);
        client.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 2];
        io.read_exact(&mut buf).await.unwrap();
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            // A cut socket reads as closed.
            assert_eq!(io.read(&mut buf).await.unwrap(), 0);
        });
        tokio::task::yield_now().await;
        assert_eq!(registry.kill_sid("abc"), 1);
        reader.await.unwrap();
        assert!(registry.is_empty());
        assert_eq!(registry.bound_count(), 0);
        // The client sees its connection end.
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    /// The registry forgets a connection before its socket closes, whatever the order of
    /// `Tracked`'s fields: the socket's own drop finds its entry already gone.
    #[test]
    fn the_entry_is_gone_before_the_socket_closes() {
        struct Witness {
            sock: std::os::unix::net::UnixStream,
            registry: Arc<ConnRegistry>,
            entries_at_close: Arc<AtomicU64>,
        }
        impl AsFd for Witness {
            fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
                self.sock.as_fd()
            }
        }
        impl Drop for Witness {
            fn drop(&mut self) {
                let open = self.registry.len() as u64;
                self.entries_at_close.store(open, Ordering::SeqCst);
            }
        }
        let registry = Arc::new(ConnRegistry::default());
        let entries_at_close = Arc::new(AtomicU64::new(u64::MAX));
        let (sock, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let witness = Witness {
            sock,
            registry: Arc::clone(&registry),
            entries_at_close: Arc::clone(&entries_at_close),
        };
        let (_, tracked) = registry.wrap(witness, None);
        assert_eq!(registry.len(), 1);
        drop(tracked);
        assert_eq!(entries_at_close.load(Ordering::SeqCst), 0);
    }
}
