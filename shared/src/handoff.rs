//! Passing a client's connection from the balancer to a worker it supervises, the way Node's
//! `@socket.io/sticky` hands a socket to a cluster worker: once a WebSocket upgrade is routed,
//! the balancer sends the worker the client's descriptor (SCM_RIGHTS) with the request head it
//! already read, and leaves the data path. Every broadcast then goes from the worker straight
//! to the client, with no second TCP hop through the balancer.
//!
//! The channel is a Unix datagram socket pair made by the supervisor per worker process; the
//! worker finds its end in the descriptor named by [`FD_ENV`]. Two messages, one per
//! direction, one per datagram (so neither needs framing):
//! - balancer → worker: the connection's id (8 bytes, little-endian), then the request head,
//!   exactly as it would arrive over TCP, plus one descriptor.
//! - worker → balancer: the ids of handed-over connections that have closed since the last
//!   note (8 bytes each, little-endian), so the balancer's gauge of open WebSockets and its
//!   per-address connection counts stay true. Id [`UNTRACKED`] (0) is never reported: the
//!   balancer keeps no count of such a connection (a long-polling request without a
//!   connection limit).
//! - worker → balancer: a connection given back ([`RETURNED`] in place of an id, then its id,
//!   then the bytes the worker read of it and did not serve, plus its descriptor). A long-polling
//!   connection stays with the worker it was handed to for its session's later requests
//!   (the first request's head carries [`KEEP_HEADER`]); a request the worker must not serve
//!   itself (another worker's session, a new session, an upgrade) sends the connection back
//!   to the balancer, which routes it as if it had just been accepted.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use sendfd::{RecvWithFd, SendWithFd};
use tokio::net::UnixDatagram;

/// The environment variable naming the worker's end of the channel.
pub const FD_ENV: &str = "FLEET_HANDOFF_FD";

/// The largest message: a request head (the balancer refuses heads over its
/// `max_header_bytes`, at most 1 MiB by pingora's parser) stays well under this.
pub const MAX_MESSAGE: usize = 128 * 1024;

/// The id of a connection the balancer does not track: its close is not reported.
pub const UNTRACKED: u64 = 0;

/// Marks a connection the worker gives back, where a note of closed ids would start: no
/// connection is ever given this id.
pub const RETURNED: u64 = u64::MAX;

/// In the head of a long-polling request the balancer hands over: the connection stays with
/// the worker for the later requests of sessions it holds. The value is the worker's sticky
/// tag, which those requests' sids carry (`<tag>.<sid>`).
pub const KEEP_HEADER: &str = "x-fleet-keep";

/// Ids per close note: one datagram of 32 KiB.
const IDS_PER_NOTE: usize = 4096;

/// Sends connection `id`: `head` and the descriptor `fd` in one datagram. Waits while the
/// worker's queue is full. The descriptor stays open here: the caller closes its copy once
/// this returns.
///
/// # Errors
/// The worker is gone (`ECONNREFUSED`), or the head is larger than [`MAX_MESSAGE`] allows.
pub async fn send_conn(sock: &UnixDatagram, id: u64, head: &[u8], fd: RawFd) -> io::Result<()> {
    if 8 + head.len() > MAX_MESSAGE {
        // The worker reads at most this much of a datagram.
        return Err(io::Error::other(format!(
            "a head of {} bytes is over the channel's {MAX_MESSAGE}",
            head.len()
        )));
    }
    let mut message = Vec::with_capacity(8 + head.len());
    message.extend_from_slice(&id.to_le_bytes());
    message.extend_from_slice(head);
    loop {
        sock.writable().await?;
        match sock.send_with_fd(&message, &[fd]) {
            Ok(n) if n == message.len() => return Ok(()),
            Ok(n) => {
                return Err(io::Error::other(format!(
                    "sent {n} of {} bytes",
                    message.len()
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// A connection received from the balancer.
#[derive(Debug)]
pub struct Received {
    /// The balancer's id for it, to report it closed by.
    pub id: u64,
    /// The request head, to be read before anything from the socket.
    pub head: Vec<u8>,
    /// The client's socket; `None` when it did not arrive (the worker is out of descriptors:
    /// the kernel then drops it, which closes the client's connection). The balancer counted
    /// it all the same, so it must still be reported closed.
    pub fd: Option<OwnedFd>,
}

/// Receives the next connection.
///
/// # Errors
/// The channel failed; no more connections will come on it.
pub async fn recv_conn(sock: &UnixDatagram, buf: &mut [u8]) -> io::Result<Received> {
    loop {
        sock.readable().await?;
        let mut fds = [-1 as RawFd; 2];
        let (len, count) = match sock.recv_with_fd(buf, &mut fds) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        // SAFETY: the kernel just installed these descriptors in this process; nothing else
        // owns them.
        let mut owned = fds[..count]
            .iter()
            .map(|fd| unsafe { OwnedFd::from_raw_fd(*fd) });
        let fd = owned.next();
        // The balancer sends one; any more are owned and closed here, not leaked.
        owned.for_each(drop);
        if len < 8 {
            // Not from a balancer of this version: nothing to report it by.
            continue;
        }
        let id = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
        return Ok(Received {
            id,
            head: buf[8..len].to_vec(),
            fd,
        });
    }
}

/// Gives connection `id` back to the balancer: `unread`, the bytes read from it and not
/// served (a request head, maybe some of its body), and its descriptor, which the caller then
/// closes. The balancer releases what it counted for `id` before routing the connection again.
///
/// # Errors
/// The balancer is gone, or `unread` is too large for one message.
pub async fn send_back(sock: &UnixDatagram, id: u64, unread: &[u8], fd: RawFd) -> io::Result<()> {
    let mut message = Vec::with_capacity(8 + unread.len());
    message.extend_from_slice(&id.to_le_bytes());
    message.extend_from_slice(unread);
    send_conn(sock, RETURNED, &message, fd).await
}

/// What a worker sends.
#[derive(Debug)]
pub enum FromWorker {
    /// Handed-over connections that have closed, by id.
    Closed(Vec<u64>),
    /// A connection given back: the bytes to read before its socket, and the socket (`None`
    /// if this process had no descriptor left for it; the kernel then closed it).
    Returned {
        /// The id it was handed over with.
        id: u64,
        /// What the worker read of the connection and did not serve.
        unread: Vec<u8>,
        /// The socket.
        fd: Option<OwnedFd>,
    },
}

/// Receives a worker's next message.
///
/// # Errors
/// The channel failed.
pub async fn recv_from_worker(sock: &UnixDatagram, buf: &mut [u8]) -> io::Result<FromWorker> {
    loop {
        let got = recv_conn(sock, buf).await?;
        if got.id == RETURNED {
            let Some(id) = got.head.get(..8) else {
                continue;
            };
            return Ok(FromWorker::Returned {
                id: u64::from_le_bytes(id.try_into().expect("8 bytes")),
                unread: got.head[8..].to_vec(),
                fd: got.fd,
            });
        }
        if !got.head.len().is_multiple_of(8) {
            continue;
        }
        let mut ids = vec![got.id];
        ids.extend(
            got.head
                .chunks_exact(8)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))),
        );
        return Ok(FromWorker::Closed(ids));
    }
}

/// Tells the balancer that the handed-over connections `closed` have ended.
///
/// # Errors
/// The balancer is gone.
pub async fn send_closed(sock: &UnixDatagram, closed: &[u64]) -> io::Result<()> {
    for ids in closed.chunks(IDS_PER_NOTE) {
        let bytes: Vec<u8> = ids.iter().flat_map(|id| id.to_le_bytes()).collect();
        sock.send(&bytes).await?;
    }
    Ok(())
}

/// Waits for the worker's next note of closed connections: their ids.
///
/// # Errors
/// The channel failed.
pub async fn recv_closed(sock: &UnixDatagram) -> io::Result<Vec<u64>> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        if let FromWorker::Closed(ids) = recv_from_worker(sock, &mut buf).await? {
            return Ok(ids);
        }
    }
}

/// The worker's end of the channel, if its balancer passed one.
///
/// # Errors
/// [`FD_ENV`] is set but names no usable socket.
pub fn inherited() -> io::Result<Option<UnixDatagram>> {
    let Some(value) = std::env::var_os(FD_ENV) else {
        return Ok(None);
    };
    let fd: RawFd = value
        .to_str()
        .and_then(|v| v.parse().ok())
        .filter(|fd| *fd > 2)
        .ok_or_else(|| io::Error::other(format!("{FD_ENV}={value:?} is not a descriptor")))?;
    // SAFETY: the supervisor passed this descriptor for this purpose and nothing else in this
    // process refers to it; `worker_end` fails cleanly if it is not a connected socket.
    worker_end(unsafe { OwnedFd::from_raw_fd(fd) }).map(Some)
}

/// The worker's end of a channel, ready for tokio.
///
/// # Errors
/// `fd` is not a connected socket.
pub fn worker_end(fd: OwnedFd) -> io::Result<UnixDatagram> {
    let sock = std::os::unix::net::UnixDatagram::from(fd);
    sock.set_nonblocking(true)?;
    sock.peer_addr()?;
    UnixDatagram::from_std(sock)
}

/// A channel pair: the balancer's end, and the worker's end as a plain descriptor for the
/// child process to inherit.
///
/// # Errors
/// The system is out of descriptors.
pub fn pair() -> io::Result<(UnixDatagram, OwnedFd)> {
    let (ours, theirs) = std::os::unix::net::UnixDatagram::pair()?;
    ours.set_nonblocking(true)?;
    Ok((UnixDatagram::from_std(ours)?, OwnedFd::from(theirs)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;

    #[tokio::test]
    async fn a_connection_crosses_with_its_head_and_closures_come_back() {
        let (balancer, worker) = pair().unwrap();
        let worker = worker_end(worker).unwrap();
        let (mut client, server) = std::os::unix::net::UnixStream::pair().unwrap();
        send_conn(&balancer, 42, b"GET / HTTP/1.1\r\n\r\n", server.as_raw_fd())
            .await
            .unwrap();
        drop(server); // the balancer's copy: the worker's still works
        let mut buf = vec![0u8; MAX_MESSAGE];
        let got = recv_conn(&worker, &mut buf).await.unwrap();
        assert_eq!(got.head, b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(got.id, 42);
        let mut passed = std::os::unix::net::UnixStream::from(got.fd.unwrap());
        passed.write_all(b"hi").unwrap();
        let mut two = [0u8; 2];
        client.read_exact(&mut two).unwrap();
        assert_eq!(&two, b"hi");

        send_closed(&worker, &[42, 7]).await.unwrap();
        assert_eq!(recv_closed(&balancer).await.unwrap(), vec![42, 7]);
        // A long list goes in several notes, none lost.
        let many: Vec<u64> = (0..10_000).collect();
        send_closed(&worker, &many).await.unwrap();
        let mut got = Vec::new();
        while got.len() < many.len() {
            got.extend(recv_closed(&balancer).await.unwrap());
        }
        assert_eq!(got, many);
    }

    #[tokio::test]
    async fn a_connection_given_back_arrives_with_its_unread_bytes() {
        let (balancer, worker) = pair().unwrap();
        let worker = worker_end(worker).unwrap();
        let (mut client, server) = std::os::unix::net::UnixStream::pair().unwrap();
        send_closed(&worker, &[3]).await.unwrap();
        send_back(&worker, 9, b"GET /x HTTP/1.1\r\n\r\n", server.as_raw_fd())
            .await
            .unwrap();
        drop(server);
        let mut buf = vec![0u8; MAX_MESSAGE];
        assert!(matches!(
            recv_from_worker(&balancer, &mut buf).await.unwrap(),
            FromWorker::Closed(ids) if ids == [3]
        ));
        let FromWorker::Returned { id, unread, fd } =
            recv_from_worker(&balancer, &mut buf).await.unwrap()
        else {
            panic!("expected a returned connection");
        };
        assert_eq!((id, &unread[..]), (9, &b"GET /x HTTP/1.1\r\n\r\n"[..]));
        let mut passed = std::os::unix::net::UnixStream::from(fd.unwrap());
        passed.write_all(b"ok").unwrap();
        let mut two = [0u8; 2];
        client.read_exact(&mut two).unwrap();
        assert_eq!(&two, b"ok");
    }

    #[tokio::test]
    async fn a_message_without_a_descriptor_arrives_as_such() {
        let (balancer, worker) = pair().unwrap();
        let worker = worker_end(worker).unwrap();
        balancer.send(b"\x05\0\0\0\0\0\0\0no fd").await.unwrap();
        let mut buf = vec![0u8; 64];
        let got = recv_conn(&worker, &mut buf).await.unwrap();
        assert_eq!((got.id, &got.head[..]), (5, &b"no fd"[..]));
        assert!(got.fd.is_none());
    }

    #[tokio::test]
    async fn sending_to_a_closed_worker_fails() {
        let (balancer, worker) = pair().unwrap();
        drop(worker);
        let (_client, server) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(
            send_conn(&balancer, 1, b"head", server.as_raw_fd())
                .await
                .is_err()
        );
    }

    /// A datagram carrying two descriptors: the first is kept, the second is closed in the
    /// receiving process. Checked by end of file: the peer of the second socket reads EOF
    /// only once every copy of it is closed, the one the kernel installed here included.
    #[tokio::test]
    async fn descriptors_beyond_the_first_are_closed() {
        let (balancer, worker) = pair().unwrap();
        let worker = worker_end(worker).unwrap();
        let (_first_peer, first) = std::os::unix::net::UnixStream::pair().unwrap();
        let (mut second_peer, second) = std::os::unix::net::UnixStream::pair().unwrap();
        balancer.writable().await.unwrap();
        balancer
            .send_with_fd(
                b"\x01\0\0\0\0\0\0\0head",
                &[first.as_raw_fd(), second.as_raw_fd()],
            )
            .unwrap();
        drop((first, second)); // the sender's copies
        let mut buf = vec![0u8; 64];
        let got = recv_conn(&worker, &mut buf).await.unwrap();
        assert!(got.fd.is_some());
        second_peer
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut byte = [0u8; 1];
        // A leaked copy would keep the socket open: the read would time out instead.
        assert_eq!(second_peer.read(&mut byte).unwrap(), 0);
    }
}
