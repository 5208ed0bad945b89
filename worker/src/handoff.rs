//! Connections handed over by the supervising balancer (see `shared::handoff`). Each arrives
//! with the request head the balancer already read from it, and is served like an accepted
//! one; when it ends, the balancer is told, so its gauge of open WebSockets stays true.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use shared::handoff;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixDatagram};
use tokio::sync::Notify;

/// The worker's end of the channel from its balancer.
pub struct HandoffChannel {
    sock: Arc<UnixDatagram>,
    closed: Arc<ClosedNotes>,
    buf: Vec<u8>,
}

impl HandoffChannel {
    /// Takes the channel over and starts reporting closed connections on it.
    pub fn new(sock: UnixDatagram) -> Self {
        let sock = Arc::new(sock);
        let closed = Arc::new(ClosedNotes::default());
        tokio::spawn(report_closed(Arc::clone(&sock), Arc::clone(&closed)));
        HandoffChannel {
            sock,
            closed,
            buf: vec![0; handoff::MAX_MESSAGE],
        }
    }

    /// The next connection from the balancer.
    ///
    /// # Errors
    /// The channel failed: the balancer is gone.
    pub async fn accept(&mut self) -> io::Result<HandedOff> {
        loop {
            let received = handoff::recv_conn(&self.sock, &mut self.buf).await?;
            match received.fd.map(adopt) {
                Some(Ok(stream)) => {
                    return Ok(HandedOff {
                        head: received.head,
                        head_read: 0,
                        stream,
                        closed: Arc::clone(&self.closed),
                    });
                }
                Some(Err(e)) => tracing::warn!("a handed-over connection is unusable: {e}"),
                None => tracing::warn!("a handed-over connection arrived without its socket"),
            }
            // The balancer counted this connection: report it closed, as it is.
            self.closed.note();
        }
    }
}

fn adopt(fd: std::os::fd::OwnedFd) -> io::Result<TcpStream> {
    let stream = std::net::TcpStream::from(fd);
    stream.set_nonblocking(true)?;
    let stream = TcpStream::from_std(stream)?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Closed connections not yet reported; a burst of closes becomes one message.
#[derive(Default)]
struct ClosedNotes {
    count: AtomicU64,
    wake: Notify,
}

impl ClosedNotes {
    fn note(&self) {
        self.count.fetch_add(1, Ordering::AcqRel);
        self.wake.notify_one();
    }
}

async fn report_closed(sock: Arc<UnixDatagram>, closed: Arc<ClosedNotes>) {
    loop {
        closed.wake.notified().await;
        let n = closed.count.swap(0, Ordering::AcqRel);
        if n > 0 && handoff::send_closed(&sock, n).await.is_err() {
            return;
        }
    }
}

/// A handed-over client connection: reads give the request head first, then the socket.
pub struct HandedOff {
    head: Vec<u8>,
    head_read: usize,
    stream: TcpStream,
    closed: Arc<ClosedNotes>,
}

impl std::os::fd::AsRawFd for HandedOff {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.stream.as_raw_fd()
    }
}

impl Drop for HandedOff {
    fn drop(&mut self) {
        self.closed.note();
    }
}

impl AsyncRead for HandedOff {
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
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for HandedOff {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_handed_connection_reads_its_head_first_and_reports_its_close() {
        let (balancer, worker_fd) = handoff::pair().unwrap();
        let mut channel = HandoffChannel::new(handoff::worker_end(worker_fd).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        handoff::send_conn(&balancer, b"HEAD;", accepted.as_raw_fd())
            .await
            .unwrap();
        drop(accepted);

        let mut conn = channel.accept().await.unwrap();
        client.write_all(b"body").await.unwrap();
        let mut got = [0u8; 9];
        conn.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"HEAD;body");
        conn.write_all(b"reply").await.unwrap();
        let mut reply = [0u8; 5];
        client.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"reply");

        drop(conn);
        assert_eq!(handoff::recv_closed(&balancer).await.unwrap(), 1);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "the client sees the close");
    }

    #[tokio::test]
    async fn a_connection_that_arrives_without_its_socket_is_reported_closed() {
        let (balancer, worker_fd) = handoff::pair().unwrap();
        let mut channel = HandoffChannel::new(handoff::worker_end(worker_fd).unwrap());
        balancer.send(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let accepting = tokio::spawn(async move { channel.accept().await.map(|_| ()) });
        assert_eq!(handoff::recv_closed(&balancer).await.unwrap(), 1);
        assert!(
            !accepting.is_finished(),
            "it waits for the next, usable one"
        );
        accepting.abort();
    }
}
