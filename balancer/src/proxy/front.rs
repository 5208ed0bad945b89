//! The public listener's connection loop: the first request head of each connection is read
//! here, whole, under one deadline, before pingora's HTTP/1 loop takes the connection.
//!
//! Why: pingora bounds each *read* of a head by its keepalive timeout, so a client sending one
//! byte every few seconds holds a descriptor forever. Here the whole first head must arrive
//! within `balancer.header_timeout_secs`; a connection closed partway through it is counted,
//! not logged as an error; a request line over `balancer.max_header_bytes` is answered 414;
//! the client address is judged once, for `balancer.limits.connections_per_ip`. The head and
//! whatever followed it go to pingora as its first bytes (pipelined requests included), except
//! the bytes after an upgrade request's head, which belong to the WebSocket and are kept for
//! the worker in [`ConnInfo`]; the bytes after a plain first request's head, when they are
//! its body and nothing more, are kept there too (a copy), for a long-polling request the proxy
//! hands to a worker. Later requests on a kept-alive connection are read by pingora
//! (their reads bounded by the keepalive). HTTP/1 only: Engine.IO clients do not speak h2c.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora_core::apps::{HttpServerApp, ServerApp};
use pingora_core::listeners::tls::Acceptor;
use pingora_core::protocols::Stream;
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::server::ShutdownWatch;
use shared::config::IpNetwork;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::rejections::RejectLog;
use crate::limits::{AddressLimits, ConnSlot};
use crate::metrics::METRICS;
use crate::routing::{self, Class};

/// Keepalive between requests once a connection has sent a complete head, in seconds.
pub const KEEPALIVE_SECS: u64 = 60;

/// Headers parsed in a first head; more is answered 431.
const MAX_HEADERS: usize = 96;

/// What the listener's loop tells the proxy about a connection (pingora's connection user
/// context carries it to every request on the connection).
#[derive(Default)]
pub struct ConnInfo {
    /// The connection's place in its address's count, while the balancer holds it; taken when
    /// the connection is handed to a worker.
    pub slot: Mutex<ConnSlot>,
    /// Bytes that followed an upgrade request's head (the WebSocket's first frames).
    pub after_upgrade: Mutex<Option<Bytes>>,
    /// When the connection's first request is a plain one and everything read after its head
    /// is that request's body (none of a second request): those bytes (maybe none), for a
    /// request the proxy hands to a worker with its head. Taken by the first request.
    pub first_body: Mutex<Option<Bytes>>,
    /// The first read brought more than the first request (or a chunked body, which is not
    /// judged): the client pipelines, so its answers keep the connection open for the rest.
    pub pipelined: AtomicBool,
}

/// What the listener needs to know.
pub struct FrontConfig {
    /// Limit on the whole first head.
    pub header_timeout: Duration,
    /// Heads larger than this are refused (431; 414 when the request line alone is).
    pub max_header_bytes: usize,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted: Vec<IpNetwork>,
    /// Keep a first request's body bytes in [`ConnInfo`] (long-polling requests are handed
    /// to the workers).
    pub keep_first_body: bool,
    /// Per-address limits, when any is on.
    pub limits: Option<Arc<AddressLimits>>,
    /// Refusals, logged once per class (shared with the proxy).
    pub rejections: Arc<RejectLog>,
    /// `balancer.tls`: each connection's handshake, done here under the head timeout.
    pub tls: Option<Arc<Acceptor>>,
}

/// An HTTP app (the proxy) behind the first-head reader.
pub struct Front<A> {
    proxy: Arc<A>,
    cfg: FrontConfig,
}

impl<A> Front<A> {
    /// Wraps pingora's proxy app.
    pub fn new(proxy: A, cfg: FrontConfig) -> Self {
        Front {
            proxy: Arc::new(proxy),
            cfg,
        }
    }
}

/// How reading a first head ended.
enum Head {
    /// A complete head of `len` bytes at the start of `buf`.
    Complete { buf: BytesMut, len: usize },
    /// Something pingora should judge itself (a malformed head): all bytes read so far.
    Unparsed(BytesMut),
    /// Answered or dropped here.
    Done,
}

impl<A> Front<A> {
    /// The head must be complete `header_timeout` after `started` (the connection's accept);
    /// `buf` holds what was read of it before (by a worker that gave the connection back).
    async fn read_first_head(
        &self,
        stream: &mut Stream,
        started: tokio::time::Instant,
        mut buf: BytesMut,
    ) -> Head {
        let deadline = started + self.cfg.header_timeout;
        buf.reserve(1024);
        // What a worker gave back is judged before anything more is read.
        let mut given = !buf.is_empty();
        loop {
            if given {
                given = false;
            } else {
                let read = tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await;
                match read {
                    Err(_) => {
                        self.reject(stream, Class::HeaderTimeout, "the head took too long")
                            .await;
                        return Head::Done;
                    }
                    Ok(Ok(0)) | Ok(Err(_)) => {
                        if !buf.is_empty() {
                            self.count(Class::IncompleteHead, "closed partway through its head");
                        }
                        return Head::Done;
                    }
                    Ok(Ok(_)) => {}
                }
            }
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&buf) {
                Ok(httparse::Status::Complete(len)) => {
                    if len > self.cfg.max_header_bytes {
                        // Routing answers 431 for a complete but large head.
                        return Head::Unparsed(buf);
                    }
                    return Head::Complete { buf, len };
                }
                Ok(httparse::Status::Partial) => {}
                Err(httparse::Error::TooManyHeaders) => {
                    self.reject(stream, Class::HeaderTooLarge, "too many header fields")
                        .await;
                    return Head::Done;
                }
                Err(_) => return Head::Unparsed(buf),
            }
            if buf.len() > self.cfg.max_header_bytes {
                let class = if buf.contains(&b'\n') {
                    Class::HeaderTooLarge
                } else {
                    Class::UriTooLong
                };
                self.reject(stream, class, &format!("{} bytes and no end", buf.len()))
                    .await;
                return Head::Done;
            }
        }
    }

    fn count(&self, class: Class, detail: &str) {
        METRICS.rejects.with_label_values(&[class.as_str()]).inc();
        self.cfg.rejections.note(class.as_str(), &detail);
    }

    /// Counts a refusal and answers it on the raw connection, which then closes.
    async fn reject(&self, stream: &mut Stream, class: Class, detail: &str) {
        self.reject_with(stream, class, detail, class.response().1, None)
            .await;
    }

    async fn reject_with(
        &self,
        stream: &mut Stream,
        class: Class,
        detail: &str,
        body: &str,
        retry_after: Option<u64>,
    ) {
        self.count(class, detail);
        let status = class.response().0;
        let response = raw_response(status, body, retry_after);
        // The client may be gone, or not reading: it gets what fits, within a second.
        let write = async {
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.flush().await;
            let _ = stream.shutdown().await;
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
    }
}

/// A complete HTTP/1.1 answer that closes its connection.
fn raw_response(status: u16, body: &str, retry_after: Option<u64>) -> String {
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let content_type = if body.starts_with('{') {
        "application/json"
    } else {
        "text/plain"
    };
    let retry = retry_after
        .map(|s| format!("Retry-After: {s}\r\n"))
        .unwrap_or_default();
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{retry}Connection: close\r\n\r\n{body}",
        body.len()
    )
}

/// What the listener reads of a first head.
struct FirstHead {
    upgrade: bool,
    has_body: bool,
    /// The body's length: `Content-Length`, 0 without one; `None` for a chunked body or an
    /// unreadable length.
    body_len: Option<usize>,
    forwarded_for: Option<String>,
}

fn first_head(head: &[u8]) -> Option<FirstHead> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    req.parse(head).ok()?;
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    let upgrade = header("upgrade").is_some()
        && header("connection").is_some_and(|v| {
            String::from_utf8_lossy(v)
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        });
    let has_body = header("transfer-encoding").is_some()
        || header("content-length")
            .is_some_and(|v| std::str::from_utf8(v).map_or(true, |v| v.trim() != "0"));
    let body_len = if header("transfer-encoding").is_some() {
        None
    } else {
        header("content-length").map_or(Some(0), |v| {
            std::str::from_utf8(v)
                .ok()
                .and_then(|v| v.trim().parse().ok())
        })
    };
    let forwarded_for = header("x-forwarded-for").map(|v| String::from_utf8_lossy(v).into_owned());
    Some(FirstHead {
        upgrade,
        has_body,
        body_len,
        forwarded_for,
    })
}

/// The listener's app: the front shared with [`Returns`].
pub struct Shared<A>(pub Arc<Front<A>>);

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> ServerApp for Shared<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        self.0.serve(stream, BytesMut::new(), shutdown).await;
        None
    }

    async fn cleanup(&self) {
        self.0.proxy.http_cleanup().await;
    }
}

/// Connections the workers give back (`handoff::Returned`), served as if just accepted.
pub struct Returns<A> {
    /// The listener's front.
    pub front: Arc<Front<A>>,
    /// Where they arrive.
    pub returned: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<super::handoff::Returned>>>,
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> pingora_core::services::background::BackgroundService
    for Returns<A>
{
    async fn start(&self, shutdown: ShutdownWatch) {
        let Some(mut returned) = self.returned.lock().unwrap().take() else {
            return;
        };
        // Through the grace period too: a connection given back then is answered (and, the
        // balancer shutting down, not kept alive).
        while let Some(conn) = returned.recv().await {
            let front = Arc::clone(&self.front);
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let Ok(stream) = adopt(conn.stream) else {
                    return;
                };
                front
                    .serve(stream, BytesMut::from(&conn.unread[..]), &shutdown)
                    .await;
            });
        }
    }
}

/// A socket from a worker, as pingora's listener would have accepted it.
fn adopt(stream: std::net::TcpStream) -> std::io::Result<Stream> {
    use pingora_core::protocols::GetSocketDigest;
    use std::os::fd::AsRawFd;
    stream.set_nonblocking(true)?;
    let stream = tokio::net::TcpStream::from_std(stream)?;
    let _ = stream.set_nodelay(true);
    let mut stream = L4Stream::from(stream);
    let digest = pingora_core::protocols::SocketDigest::from_raw_fd(stream.as_raw_fd());
    stream.set_socket_digest(digest);
    Ok(Box::new(stream))
}

impl<A: HttpServerApp + Send + Sync + 'static> Front<A> {
    /// Serves a connection: `prefix` is what was read of it already (by a worker that gave it
    /// back), read again before the socket.
    pub async fn serve(
        self: &Arc<Self>,
        mut stream: Stream,
        prefix: BytesMut,
        shutdown: &ShutdownWatch,
    ) {
        let started = tokio::time::Instant::now();
        if let Some(acceptor) = &self.cfg.tls {
            // The listener is plain TCP: its streams are pingora's L4 streams.
            let Ok(tcp) = stream.into_any().downcast::<L4Stream>() else {
                return;
            };
            match tokio::time::timeout(self.cfg.header_timeout, acceptor.tls_handshake(*tcp)).await
            {
                Ok(Ok(tls)) => stream = Box::new(tls),
                Ok(Err(e)) => {
                    self.count(Class::TlsHandshake, &format!("handshake failed: {e}"));
                    return;
                }
                Err(_) => {
                    self.count(Class::TlsHandshake, "handshake timed out");
                    return;
                }
            }
        }
        let info = Arc::new(ConnInfo::default());
        let prefix = match self.read_first_head(&mut stream, started, prefix).await {
            Head::Done => return,
            Head::Unparsed(buf) => buf,
            Head::Complete { mut buf, len } => {
                let head = first_head(&buf[..len]);
                if let Some(head) = &head {
                    if head.upgrade && head.has_body {
                        let body = "an upgrade request carries no body\n";
                        self.reject_with(&mut stream, Class::BadRequest, body, body, None)
                            .await;
                        return;
                    }
                    if head.upgrade && buf.len() > len {
                        *info.after_upgrade.lock().unwrap() = Some(buf.split_off(len).freeze());
                    } else if !head.upgrade && self.cfg.keep_first_body {
                        if head.body_len.is_some_and(|body| buf.len() - len <= body) {
                            // pingora gets them too, should the request stay with it.
                            let body = Bytes::copy_from_slice(&buf[len..]);
                            *info.first_body.lock().unwrap() = Some(body);
                        } else {
                            info.pipelined.store(true, Ordering::Relaxed);
                        }
                    }
                }
                if let Some(limits) = &self.cfg.limits
                    && let Some(ip) = client_ip(&stream, head.as_ref(), &self.cfg.trusted)
                {
                    match limits.connect(ip) {
                        Ok(slot) => *info.slot.lock().unwrap() = slot,
                        Err(limited) => {
                            let detail = format!("{ip}: over connections_per_ip");
                            let body = "too many connections from this address\n";
                            self.reject_with(
                                &mut stream,
                                Class::RateLimited,
                                &detail,
                                body,
                                Some(limited.retry_after_secs),
                            )
                            .await;
                            return;
                        }
                    }
                }
                buf
            }
        };
        let mut session = ServerSession::new_http1(stream);
        session.set_pipelined_prefix(prefix);
        session.set_pipelining_enabled(true);
        session.set_keepalive(if *shutdown.borrow() {
            None
        } else {
            Some(self.cfg.header_timeout.as_secs().max(1))
        });
        let context = || -> Option<Box<dyn std::any::Any + Send + Sync>> {
            Some(Box::new(Arc::clone(&info)))
        };
        session.set_connection_user_context(context());
        let mut result = self.proxy.process_new_http(session, shutdown).await;
        while let Some((stream, settings)) = result.map(|r| r.consume()) {
            let mut session = ServerSession::new_http1(stream);
            if let Some(settings) = settings {
                settings.apply_to_session(&mut session);
            }
            session.set_pipelining_enabled(true);
            session.set_connection_user_context(context());
            result = self.proxy.process_new_http(session, shutdown).await;
        }
    }
}

/// The client's address as placement judges it.
fn client_ip(stream: &Stream, head: Option<&FirstHead>, trusted: &[IpNetwork]) -> Option<IpAddr> {
    let digest = stream.get_socket_digest()?;
    let peer = digest.peer_addr()?.as_inet()?.ip();
    let xff = head.and_then(|h| h.forwarded_for.as_deref());
    Some(routing::client_ip(peer, xff, trusted))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_first_head_says_upgrade_body_and_forwarded_for() {
        let head = first_head(
            b"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nX-Forwarded-For: 10.0.0.9\r\n\r\n",
        )
        .unwrap();
        assert!(head.upgrade && !head.has_body);
        assert_eq!(head.body_len, Some(0));
        assert_eq!(head.forwarded_for.as_deref(), Some("10.0.0.9"));
        let chunked = first_head(
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\nTransfer-Encoding: chunked\r\n\r\n",
        )
        .unwrap();
        assert!(chunked.upgrade && chunked.has_body);
        assert_eq!(chunked.body_len, None);
        let zero = first_head(b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n").unwrap();
        assert!(!zero.upgrade && !zero.has_body);
        let post = first_head(b"POST / HTTP/1.1\r\nContent-Length: 12\r\n\r\n").unwrap();
        assert_eq!(post.body_len, Some(12));
        let bad = first_head(b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n").unwrap();
        assert_eq!(bad.body_len, None);
    }

    #[test]
    fn a_raw_refusal_is_complete_http() {
        let text = raw_response(429, "slow down\n", Some(2));
        assert!(text.starts_with("HTTP/1.1 429 Too Many Requests\r\n"));
        assert!(text.contains("Retry-After: 2\r\n"));
        assert!(text.contains("Content-Length: 10\r\n"));
        assert!(text.ends_with("\r\n\r\nslow down\n"));
    }
}
