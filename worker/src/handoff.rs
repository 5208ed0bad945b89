//! Connections handed over by the supervising balancer (see `shared::handoff`). Each arrives
//! with the request head the balancer already read from it, and is served like an accepted
//! one; when it ends, the balancer is told, so its gauge of open WebSockets stays true.

use std::io;
use std::sync::{Arc, Mutex};

use shared::handoff;
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
            let id = received.id;
            match received.fd.map(adopt) {
                Some(Ok(stream)) => {
                    return Ok(HandedOff {
                        stream,
                        head: received.head,
                        closed: CloseReport(Arc::clone(&self.closed), received.id),
                        back: Arc::clone(&self.sock),
                    });
                }
                Some(Err(e)) => tracing::warn!("a handed-over connection is unusable: {e}"),
                None => tracing::warn!("a handed-over connection arrived without its socket"),
            }
            // The balancer counted this connection: report it closed, as it is.
            if id != handoff::UNTRACKED {
                self.closed.note(id);
            }
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

/// Closed connections not yet reported, by the balancer's ids; a burst of closes becomes one
/// message.
#[derive(Default)]
struct ClosedNotes {
    ids: Mutex<Vec<u64>>,
    wake: Notify,
}

impl ClosedNotes {
    fn note(&self, id: u64) {
        self.ids.lock().unwrap_or_else(|p| p.into_inner()).push(id);
        self.wake.notify_one();
    }
}

async fn report_closed(sock: Arc<UnixDatagram>, closed: Arc<ClosedNotes>) {
    loop {
        closed.wake.notified().await;
        let ids = std::mem::take(&mut *closed.ids.lock().unwrap_or_else(|p| p.into_inner()));
        if !ids.is_empty() && handoff::send_closed(&sock, &ids).await.is_err() {
            return;
        }
    }
}

/// A handed-over client connection: its socket, and the request head the balancer already
/// read from it (to be read first: see `conn::Tracked::handed_over`).
pub struct HandedOff {
    /// The client's socket.
    pub stream: TcpStream,
    /// The request head, as the balancer rewrote it.
    pub head: Vec<u8>,
    /// Tells the balancer when the connection is gone.
    pub closed: CloseReport,
    /// The channel, to give a kept connection back on (`kept`).
    pub back: Arc<UnixDatagram>,
}

/// Reports its connection closed to the balancer when dropped.
pub struct CloseReport(Arc<ClosedNotes>, u64);

impl CloseReport {
    /// The balancer's id for the connection.
    pub fn id(&self) -> u64 {
        self.1
    }
}

impl Drop for CloseReport {
    fn drop(&mut self) {
        // The balancer keeps no count of an untracked connection.
        if self.1 != handoff::UNTRACKED {
            self.0.note(self.1);
        }
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
        handoff::send_conn(&balancer, 9, b"HEAD;", accepted.as_raw_fd())
            .await
            .unwrap();
        drop(accepted);

        let handed = channel.accept().await.unwrap();
        let registry = Arc::new(crate::conn::ConnRegistry::default());
        let (_, conn) = registry.wrap(handed.stream, None);
        let mut conn = conn.handed_over(handed.head, handed.closed);
        client.write_all(b"body").await.unwrap();
        let mut got = [0u8; 9];
        conn.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"HEAD;body");
        conn.write_all(b"reply").await.unwrap();
        let mut reply = [0u8; 5];
        client.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"reply");

        drop(conn);
        assert_eq!(handoff::recv_closed(&balancer).await.unwrap(), vec![9]);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "the client sees the close");
    }

    #[tokio::test]
    async fn a_connection_that_arrives_without_its_socket_is_reported_closed() {
        let (balancer, worker_fd) = handoff::pair().unwrap();
        let mut channel = HandoffChannel::new(handoff::worker_end(worker_fd).unwrap());
        balancer
            .send(b"\x03\0\0\0\0\0\0\0GET / HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let accepting = tokio::spawn(async move { channel.accept().await.map(|_| ()) });
        assert_eq!(handoff::recv_closed(&balancer).await.unwrap(), vec![3]);
        assert!(
            !accepting.is_finished(),
            "it waits for the next, usable one"
        );
        accepting.abort();
    }
}
