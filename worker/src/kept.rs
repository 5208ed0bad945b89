//! Long-polling connections the balancer handed over to stay (`shared::handoff::KEEP_HEADER`):
//! after the first request, the connection's later requests come straight here, as with
//! Node's `@socket.io/sticky`, and the balancer sees none of them. Unlike sticky, each request
//! is still routed by its sid: one of a session this worker holds (its sid carries this
//! worker's tag) is served here; anything else (another worker's session, a new session, an
//! upgrade, a head this loop does not judge) sends the connection back to the balancer, with
//! the bytes read of it, to be routed as if just accepted.
//!
//! Each request is served by hyper on a view of the connection that ends after that request's
//! body, so hyper never reads past it and the loop stays at a request boundary.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use shared::sticky_tag::TaggedSid;
use shared::{eio_query, handoff};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixDatagram};

use crate::auth::PeerAddr;
use crate::conn::{ConnId, Tracked};
use crate::http::{HttpCtx, handle};

/// A kept connection idle this long between requests is closed (the balancer's keepalive).
const IDLE: Duration = Duration::from_secs(60);
/// Once a request has begun, its head must be complete within this time.
const HEAD_TIME: Duration = Duration::from_secs(10);
/// A larger head is given back: the balancer answers it.
const MAX_HEAD: usize = 64 * 1024;
/// Beyond the balancer's own limit (96) plus the headers it adds.
const MAX_HEADERS: usize = 128;

/// A kept connection: where it came from and what it may serve.
pub struct Kept {
    pub ctx: Arc<HttpCtx>,
    pub conn: ConnId,
    pub io: Tracked<TcpStream>,
    pub peer: Option<PeerAddr>,
    /// The worker's tag, from the balancer: sids of this worker's sessions start `<tag>.`.
    pub tag: String,
    /// The channel to the balancer, to give the connection back on.
    pub back: Arc<UnixDatagram>,
    /// The balancer's id for the connection.
    pub id: u64,
}

/// The connection's tag, when the balancer handed it over to stay.
pub fn keep_tag(head: &[u8]) -> Option<String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    req.parse(head).ok()?;
    req.headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(handoff::KEEP_HEADER))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .map(str::to_owned)
}

/// What to do with the request at the start of the buffer.
enum Next {
    /// Serve it: its head (as hyper is to read it, room left for the body), the length of the
    /// raw head it replaces, its body's length, and whether the connection ends after it.
    Serve {
        head: BytesMut,
        raw_len: usize,
        body: usize,
        last: bool,
    },
    /// Not this worker's to serve: give the connection back.
    GiveBack,
    /// Incomplete: read more.
    Partial,
}

impl Kept {
    /// Serves the connection: `first` is the request head the balancer sent (its sid already
    /// plain), with any body bytes it had read.
    pub async fn serve(mut self, first: Vec<u8>) {
        let mut buf = BytesMut::from(&first[..]);
        let mut first = true;
        loop {
            let next = match self.read_head(&mut buf, first).await {
                Ok(next) => next,
                Err(_) => return,
            };
            match next {
                Next::Serve {
                    head,
                    raw_len,
                    body,
                    last,
                } => {
                    if !first {
                        self.ctx.metrics.kept_served.inc();
                    }
                    buf.advance(raw_len);
                    let in_buf = body.min(buf.len());
                    let mut request = head;
                    request.extend_from_slice(&buf.split_to(in_buf));
                    let Some(early) = self.serve_one(request, body - in_buf).await else {
                        return;
                    };
                    if last {
                        return;
                    }
                    // Bytes of the next request that came while this one was answered.
                    buf.extend_from_slice(&early);
                }
                Next::GiveBack => {
                    self.ctx.metrics.kept_given_back.inc();
                    self.give_back(&buf).await;
                    return;
                }
                Next::Partial => unreachable!("read_head returns complete heads"),
            }
            first = false;
        }
    }

    /// Reads until `buf` starts with a complete head, and judges it. The first request was
    /// judged by the balancer.
    async fn read_head(&mut self, buf: &mut BytesMut, first: bool) -> io::Result<Next> {
        // Idle until a request begins; then its head has HEAD_TIME from its first byte.
        let mut begun = !buf.is_empty();
        let mut limit = tokio::time::Instant::now() + if begun { HEAD_TIME } else { IDLE };
        loop {
            if begun {
                match judge(buf, &self.tag, first, &self.ctx.sio_path) {
                    Next::Partial if buf.len() > MAX_HEAD => return Ok(Next::GiveBack),
                    Next::Partial => {}
                    next => return Ok(next),
                }
            }
            match tokio::time::timeout_at(limit, self.io.read_buf(buf)).await {
                Ok(Ok(0)) | Err(_) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(Ok(_)) if !begun => {
                    begun = true;
                    limit = tokio::time::Instant::now() + HEAD_TIME;
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
            }
        }
    }

    /// Serves one request through hyper; when the connection may carry another, what was read
    /// of the next one meanwhile.
    async fn serve_one(&mut self, request: BytesMut, body_left: usize) -> Option<BytesMut> {
        let ctx = Arc::clone(&self.ctx);
        let (conn, peer) = (self.conn, self.peer);
        let closing = Arc::new(AtomicBool::new(false));
        let seen = Arc::clone(&closing);
        let answered = Arc::new(AtomicBool::new(false));
        let done = Arc::clone(&answered);
        let svc = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            if let Some(peer) = peer {
                req.extensions_mut().insert(peer);
            }
            let ctx = Arc::clone(&ctx);
            let seen = Arc::clone(&seen);
            let done = Arc::clone(&done);
            async move {
                let res = handle(ctx, conn, req).await?;
                let close = res
                    .headers()
                    .get(hyper::header::CONNECTION)
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
                if close {
                    seen.store(true, Ordering::Relaxed);
                }
                done.store(true, Ordering::Release);
                Ok::<_, std::convert::Infallible>(res)
            }
        });
        let view = OneRequest {
            pre: request,
            body_left,
            io: &mut self.io,
            answered,
            written: false,
            early: BytesMut::new(),
        };
        let served = http1::Builder::new()
            .serve_connection(TokioIo::new(view), svc)
            .without_shutdown()
            .await;
        let parts = served.ok()?;
        if closing.load(Ordering::Relaxed) {
            return None;
        }
        let view = parts.io.into_inner();
        // A request whose body was not read to its end (answered early) leaves bytes in the
        // socket that are not a next request.
        let whole = view.pre.is_empty() && view.body_left == 0;
        (view.written && whole).then_some(view.early)
    }

    async fn give_back(self, unread: &[u8]) {
        use std::os::fd::AsRawFd;
        if unread.len() + 16 > handoff::MAX_MESSAGE {
            // Over any head the balancer accepts: it would refuse it too.
            return;
        }
        let sent = handoff::send_back(&self.back, self.id, unread, self.io.as_raw_fd()).await;
        if let Err(e) = sent {
            tracing::debug!("a kept connection could not go back to the balancer: {e}");
        }
        // Dropping ours leaves the balancer's copy open; the balancer is told it closed here.
    }
}

/// Judges the request at the start of `buf`.
fn judge(buf: &[u8], tag: &str, first: bool, sio_path: &str) -> Next {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let raw_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Next::Partial,
        Err(_) => return Next::GiveBack,
    };
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    let close = header("connection").is_some_and(|v| {
        String::from_utf8_lossy(v)
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("close"))
    });
    let body = match header("content-length") {
        None => Some(0),
        Some(v) => std::str::from_utf8(v)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok()),
    };
    let plain = req.version == Some(1)
        && matches!(req.method, Some("GET" | "POST"))
        && header("upgrade").is_none()
        && header("transfer-encoding").is_none()
        && header("expect").is_none();
    let last = close || req.version == Some(0);
    if first {
        // The balancer routed it and read its body's length: serve it, whatever it is.
        return match body {
            Some(body) => Next::Serve {
                head: BytesMut::from(&buf[..raw_len]),
                raw_len,
                body,
                last,
            },
            None => Next::GiveBack,
        };
    }
    let (Some(body), true, Some(path)) = (body, plain, req.path) else {
        return Next::GiveBack;
    };
    let (route, query) = path.split_once('?').unwrap_or((path, ""));
    if !eio_query::under_path(route, sio_path) {
        return Next::GiveBack;
    }
    let Ok(params) = eio_query::parse(Some(query)) else {
        return Next::GiveBack;
    };
    // Read as the balancer reads it: a well-formed sid (base64url) cannot change the head it
    // is written back into.
    let tagged = params.sid.as_deref().map(TaggedSid::parse);
    let own = match tagged {
        Some(Ok(tagged)) if tagged.tag.as_str() == tag => Some(tagged.sid),
        _ => None,
    };
    let (Some(sid), Some("polling")) = (own, params.transport.as_deref()) else {
        return Next::GiveBack;
    };
    // The head as the balancer would forward it: the sid plain, no header of the fleet's own.
    let mut head = BytesMut::with_capacity(raw_len + body.min(MAX_HEAD));
    head.extend_from_slice(req.method.unwrap_or("GET").as_bytes());
    head.put_u8(b' ');
    head.extend_from_slice(route.as_bytes());
    head.put_u8(b'?');
    head.extend_from_slice(eio_query::with_sid(query, sid).as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    for h in req.headers.iter() {
        if h.name.len() >= 8 && h.name[..8].eq_ignore_ascii_case("x-fleet-") {
            continue;
        }
        head.extend_from_slice(h.name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(h.value);
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    Next::Serve {
        head,
        raw_len,
        body,
        last,
    }
}

/// The connection as hyper sees it for one request: the request's bytes, then the rest of
/// its body from the socket, then end of file once the answer is written. Writes go to the
/// socket. Until then the socket is still watched, so a client that leaves during a held
/// long-poll is seen at once (hyper drops the request); bytes of a next request that arrive
/// meanwhile are kept for the loop (`early`).
struct OneRequest<'a> {
    pre: BytesMut,
    body_left: usize,
    io: &'a mut Tracked<TcpStream>,
    /// Set when the service has produced the answer.
    answered: Arc<AtomicBool>,
    /// The answer has been flushed.
    written: bool,
    early: BytesMut,
}

impl AsyncRead for OneRequest<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.pre.is_empty() {
            let n = this.pre.len().min(buf.remaining());
            buf.put_slice(&this.pre.split_to(n));
            return Poll::Ready(Ok(()));
        }
        if this.body_left == 0 {
            if this.written {
                return Poll::Ready(Ok(()));
            }
            if !this.early.is_empty() {
                // Pipelined: nothing more to learn from the socket until the answer is out
                // (hyper polls again once it has written it).
                return Poll::Pending;
            }
            this.early.reserve(4096);
            let mut probe = ReadBuf::uninit(this.early.spare_capacity_mut());
            return match Pin::new(&mut *this.io).poll_read(cx, &mut probe) {
                Poll::Ready(Ok(())) if probe.filled().is_empty() => Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => {
                    let n = probe.filled().len();
                    // SAFETY: `n` bytes of the spare capacity were just initialised by the read.
                    unsafe { this.early.set_len(n) };
                    Poll::Pending
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            };
        }
        let want = this.body_left.min(buf.remaining());
        let mut limited = ReadBuf::new(buf.initialize_unfilled_to(want));
        match Pin::new(&mut *this.io).poll_read(cx, &mut limited) {
            Poll::Ready(Ok(())) => {
                let n = limited.filled().len();
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                }
                buf.advance(n);
                this.body_left -= n;
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl AsyncWrite for OneRequest<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let flushed = Pin::new(&mut *this.io).poll_flush(cx);
        if matches!(flushed, Poll::Ready(Ok(())))
            && !this.written
            && this.answered.load(Ordering::Acquire)
        {
            // hyper flushes once the whole answer is in the socket's buffer. It may be waiting
            // on a read that only ends now (the probe's waker is the socket's, which may never
            // fire): poll it again.
            this.written = true;
            cx.waker().wake_by_ref();
        }
        flushed
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection outlives this request.
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve_head(next: Next) -> (String, usize, bool) {
        match next {
            Next::Serve {
                head, body, last, ..
            } => (String::from_utf8(head.to_vec()).unwrap(), body, last),
            Next::GiveBack => panic!("given back"),
            Next::Partial => panic!("partial"),
        }
    }

    #[test]
    fn a_request_of_a_session_held_here_is_served_with_its_sid_plain() {
        let raw = b"POST /socket.io/?EIO=4&transport=polling&sid=TAGTAG12.abc&t=1 HTTP/1.1\r\nHost: x\r\nX-Fleet-Client-Ip: 6.6.6.6\r\nContent-Length: 5\r\n\r\n40abc";
        let (head, body, last) = serve_head(judge(raw, "TAGTAG12", false, "/socket.io"));
        assert_eq!(
            head,
            "POST /socket.io/?EIO=4&transport=polling&sid=abc&t=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n"
        );
        assert_eq!((body, last), (5, false));
        let close = b"GET /socket.io/?EIO=4&transport=polling&sid=TAGTAG12.abc HTTP/1.1\r\nConnection: close\r\n\r\n";
        assert!(serve_head(judge(close, "TAGTAG12", false, "/socket.io")).2);
    }

    #[test]
    fn anything_else_goes_back_to_the_balancer() {
        let tag = "TAGTAG12";
        for raw in [
            // another worker's session
            &b"GET /socket.io/?EIO=4&transport=polling&sid=OTHERTAG.abc HTTP/1.1\r\n\r\n"[..],
            // a new session
            b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\n\r\n",
            // an upgrade
            b"GET /socket.io/?EIO=4&transport=websocket&sid=TAGTAG12.abc HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            // a chunked body, an Expect, HTTP/1.0, another path, another method
            b"POST /socket.io/?EIO=4&transport=polling&sid=TAGTAG12.abc HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST /socket.io/?EIO=4&transport=polling&sid=TAGTAG12.abc HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
            b"GET /socket.io/?EIO=4&transport=polling&sid=TAGTAG12.abc HTTP/1.0\r\n\r\n",
            b"GET /metrics?sid=TAGTAG12.abc&transport=polling HTTP/1.1\r\n\r\n",
            b"PUT /socket.io/?EIO=4&transport=polling&sid=TAGTAG12.abc HTTP/1.1\r\n\r\n",
            // a bare tag, a sid repeated, an unreadable length, a malformed head
            b"GET /socket.io/?EIO=4&transport=polling&sid=TAGTAG12abc HTTP/1.1\r\n\r\n",
            b"GET /socket.io/?EIO=4&transport=polling&sid=TAGTAG12.a&sid=TAGTAG12.b HTTP/1.1\r\n\r\n",
            b"POST /socket.io/?EIO=4&transport=polling&sid=TAGTAG12.abc HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            b"GET\x01 / HTTP/1.1\r\n\r\n",
            // a sid that would write headers, or a second request, into the head
            b"GET /socket.io/?EIO=4&transport=polling&sid=TAGTAG12.x%20HTTP/1.1%0D%0AX-Fleet-Client-Ip:%201.2.3.4%0D%0A%0D%0AGET%20/metrics HTTP/1.1\r\n\r\n",
            b"GET /socket.io/?EIO=4&transport=polling&sid=TAGTAG12.a%2Fb HTTP/1.1\r\n\r\n",
        ] {
            assert!(
                matches!(judge(raw, tag, false, "/socket.io"), Next::GiveBack),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
        assert!(matches!(
            judge(
                b"GET /socket.io/?EIO=4&transport=polling&sid=TAGTAG12.abc HTTP/1.1\r\nHost:",
                tag,
                false,
                "/socket.io"
            ),
            Next::Partial
        ));
    }
}
