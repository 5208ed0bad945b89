//! WebSocket upgrades to workers this balancer does not run (attached, listed, discovered; or
//! when a handoff fails), tunnelled by the balancer itself rather than by pingora's proxy loop.
//! (Spawned workers are handed the client's connection instead: see `handoff`.)
//!
//! Why: pingora 0.9.1 tears an upgraded connection down right after the 101 whenever the
//! worker answers before the proxy has consumed the upgrade request's empty body
//! (cloudflare/pingora#946; the fix, PR #947, is unreleased). A Socket.IO worker answers
//! upgrades in microseconds, so under load the race is common. Here the 101 is read from the
//! worker before the client side is touched; then the client's raw connection is taken out of
//! pingora's session and the two sockets are joined by a plain byte copy: every broadcast
//! crosses the balancer as one read and one write, with no per-message HTTP machinery, until
//! either side closes. (RFC 6455 §4.1: a client sends nothing after its handshake until the
//! 101, so no client bytes are left behind in pingora's buffers.)

use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use pingora_core::{Error, ErrorType, OrErr, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_prometheus::prometheus::IntGauge;
use pingora_proxy::Session;
use shared::shutdown::{Shutdown, ShutdownTrigger};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::raw_http;

/// The largest response head a worker may send.
const MAX_HEAD: usize = 16 * 1024;
/// The largest non-101 body relayed (a worker's refusal is a short JSON message).
const MAX_REFUSAL_BODY: usize = 64 * 1024;
const MAX_HEADERS: usize = 64;

/// How an upgrade attempt ended.
pub enum Outcome {
    /// The worker accepted; the tunnel ran until one side closed.
    Tunnelled,
    /// The worker refused the upgrade; its answer was relayed to the client.
    Refused,
}

/// Timeouts for one tunnel, and when it closes at shutdown.
pub struct Limits {
    /// For the worker to accept the TCP connection.
    pub connect: Duration,
    /// For the worker's answer to the upgrade request.
    pub handshake: Duration,
    /// Longest silence in either direction before the tunnel is closed (both sides ping).
    pub idle: Duration,
    /// When the balancer shuts down.
    pub closing: Closing,
}

/// Relayed tunnels close at shutdown each at a moment of its own, spread evenly over the drain
/// window as the workers spread theirs: the clients come back (through another balancer) at a
/// steady rate rather than all in the same instant, and none is left to be cut when the
/// process exits.
#[derive(Clone)]
pub struct Closing {
    shutdown: Shutdown,
    spread: Duration,
}

impl Closing {
    /// Tunnels close once `shutdown` fires, at uniformly random moments within `spread`.
    pub fn new(shutdown: Shutdown, spread: Duration) -> Self {
        Closing { shutdown, spread }
    }

    /// Resolves at this tunnel's moment, once shutdown has begun.
    async fn moment(mut self) {
        self.shutdown.recv().await;
        tokio::time::sleep(self.spread.mul_f64(fastrand::f64())).await;
    }
}

/// Fires the tunnels' [`Closing`] when pingora starts its graceful shutdown.
///
/// With `exit_when_idle` (a balancer that runs no workers, so no supervisor ends the process
/// once they have drained), the process exits once every WebSocket it relays has closed, plus
/// [`EXIT_LINGER`] for HTTP answers in flight, rather than sleeping out pingora's grace period:
/// its listener closed when the shutdown began, so a balancer restarted in place (same port)
/// would refuse its clients' reconnects for the rest of that period.
pub struct CloseOnShutdown {
    /// Fired at shutdown.
    pub trigger: ShutdownTrigger,
    /// Exit as soon as no relayed WebSocket is left.
    pub exit_when_idle: bool,
}

/// How long a balancer that runs no workers stays up after its last relayed WebSocket closed.
pub const EXIT_LINGER: Duration = Duration::from_millis(500);

#[async_trait]
impl BackgroundService for CloseOnShutdown {
    async fn start(&self, shutdown: ShutdownWatch) {
        Shutdown::from_watch(shutdown).recv().await;
        self.trigger.trigger();
        if !self.exit_when_idle {
            return;
        }
        while open_websockets() > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(EXIT_LINGER).await;
        tracing::info!("every relayed WebSocket has closed: exiting");
        std::process::exit(0);
    }
}

/// WebSockets open through this balancer, over every worker.
fn open_websockets() -> i64 {
    use pingora_prometheus::prometheus::core::Collector;
    crate::metrics::METRICS
        .websockets
        .collect()
        .iter()
        .flat_map(|family| family.get_metric())
        .map(|m| m.get_gauge().value() as i64)
        .sum()
}

/// Copy buffer per direction: Socket.IO messages are small, and a balancer holds thousands.
const COPY_BUF: usize = 4096;

/// Sends `req` to the worker at `addr` and, on a 101, joins client and worker until either
/// closes. An error means the worker failed before the client was sent anything: the caller
/// answers 502. Once the worker has accepted, the tunnel runs in a task of its own (so none of
/// pingora's per-request state stays alive with it) and `open` counts it while it lasts.
/// `early` is what the client sent after its request (it reaches the worker right after the
/// request, as it would directly). `lasting` is called once the tunnel is up, and what it
/// returns runs when the tunnel is over (never, when there was no tunnel): what the caller
/// holds for the tunnel's life, such as the connection's place in its address's count.
pub async fn run(
    session: &mut Session,
    addr: SocketAddr,
    req: &RequestHeader,
    early: &[u8],
    limits: &Limits,
    open: IntGauge,
    lasting: impl FnOnce() -> Box<dyn FnOnce() + Send>,
) -> Result<Outcome> {
    let mut upstream = timeout(limits.connect, TcpStream::connect(addr))
        .await
        .or_err(ErrorType::ConnectTimedout, "connecting to worker")?
        .or_err(ErrorType::ConnectRefused, "connecting to worker")?;
    upstream.set_nodelay(true).ok();
    let mut request = raw_http::serialize(req);
    request.extend_from_slice(early);
    upstream
        .write_all(&request)
        .await
        .or_err(ErrorType::WriteError, "sending upgrade request to worker")?;

    let (head, raw_head, rest) = timeout(limits.handshake, read_head(&mut upstream))
        .await
        .or_err(
            ErrorType::ReadTimedout,
            "waiting for the worker's upgrade answer",
        )??;

    if head.status.as_u16() != 101 {
        // A client that left meanwhile needs no answer.
        let _ = relay_refusal(session, &mut upstream, head, rest).await;
        return Ok(Outcome::Refused);
    }

    let Some(mut client) = raw_http::take_client(session) else {
        return Error::e_explain(ErrorType::InternalError, "upgrade on a non-HTTP/1 session");
    };
    open.inc();
    let idle = limits.idle;
    let closing = limits.closing.clone();
    let ended = lasting();
    tokio::spawn(async move {
        // The worker's 101 goes to the client byte for byte, then whatever followed it.
        if client.write_all(&raw_head).await.is_ok()
            && client.write_all(&rest).await.is_ok()
            && client.flush().await.is_ok()
        {
            pump(client, upstream, idle, closing).await;
        }
        // Before the gauge drops, so whoever sees it drop sees the session ended too.
        ended();
        open.dec();
    });
    Ok(Outcome::Tunnelled)
}

/// Copies both ways until either side closes, fails, or stays silent for `idle`, or the
/// tunnel's moment to close at shutdown comes. A WebSocket ends with a close or a reset from
/// either side as a matter of course: nothing here is an error.
///
/// One task owns the client's stream and reads it again after every write: a TLS stream split
/// in two halves can leave bytes it decrypted while writing unseen by the reading half until
/// more arrive (a Socket.IO connect held until the next ping).
async fn pump(mut client: Stream, mut upstream: TcpStream, idle: Duration, closing: Closing) {
    let mut from_client = vec![0u8; COPY_BUF];
    let mut from_worker = vec![0u8; COPY_BUF];
    // One timer per direction for the tunnel's life, pushed back after each read: a new timer
    // per message would register and cancel a timer-wheel entry on every broadcast.
    let client_silent = tokio::time::sleep(idle);
    let worker_silent = tokio::time::sleep(idle);
    let moment = closing.moment();
    tokio::pin!(client_silent, worker_silent, moment);
    loop {
        tokio::select! {
            read = client.read(&mut from_client) => {
                let Ok(n @ 1..) = read else { break };
                client_silent.as_mut().reset(tokio::time::Instant::now() + idle);
                if upstream.write_all(&from_client[..n]).await.is_err() {
                    break;
                }
            }
            read = upstream.read(&mut from_worker) => {
                let Ok(n @ 1..) = read else { break };
                worker_silent.as_mut().reset(tokio::time::Instant::now() + idle);
                if client.write_all(&from_worker[..n]).await.is_err() || client.flush().await.is_err() {
                    break;
                }
            }
            _ = &mut client_silent => break,
            _ = &mut worker_silent => break,
            _ = &mut moment => break,
        }
    }
    let _ = upstream.shutdown().await;
    let _ = client.shutdown().await;
}

/// Relays a refused upgrade (e.g. 400 Session ID unknown, 503 while draining) as it came.
async fn relay_refusal(
    session: &mut Session,
    upstream: &mut TcpStream,
    mut head: ResponseHeader,
    already_read: Bytes,
) -> Result<()> {
    let length = head
        .headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0)
        .min(MAX_REFUSAL_BODY);
    let mut buf = BytesMut::from(&already_read[..]);
    while buf.len() < length {
        match upstream.read_buf(&mut buf).await {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
    buf.truncate(length);
    let body = buf.freeze();
    head.insert_header("Content-Length", body.len().to_string())?;
    head.remove_header("Transfer-Encoding");
    session.set_keepalive(None);
    session.write_response_header(Box::new(head), false).await?;
    session.write_response_body(Some(body), true).await?;
    Ok(())
}

/// Reads a response head; returns it parsed and raw, and any bytes that followed it.
async fn read_head(upstream: &mut TcpStream) -> Result<(ResponseHeader, Bytes, Bytes)> {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        let n = upstream
            .read_buf(&mut buf)
            .await
            .or_err(ErrorType::ReadError, "reading the worker's upgrade answer")?;
        if n == 0 {
            return Error::e_explain(
                ErrorType::ConnectionClosed,
                "worker closed before answering the upgrade",
            );
        }
        if let Some((head, used)) = parse_head(&buf)? {
            let rest = buf.split_off(used).freeze();
            return Ok((head, buf.freeze(), rest));
        }
        if buf.len() > MAX_HEAD {
            return Error::e_explain(
                ErrorType::InvalidHTTPHeader,
                "worker's answer head too large",
            );
        }
    }
}

/// Parses a complete response head, or `None` when more bytes are needed.
fn parse_head(buf: &[u8]) -> Result<Option<(ResponseHeader, usize)>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let used = match resp.parse(buf) {
        Ok(httparse::Status::Complete(used)) => used,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => {
            return Error::e_explain(
                ErrorType::InvalidHTTPHeader,
                format!("worker's upgrade answer: {e}"),
            );
        }
    };
    let code = resp.code.unwrap_or(502);
    let mut head = ResponseHeader::build(code, Some(resp.headers.len()))?;
    for h in resp.headers.iter() {
        head.append_header(h.name.to_owned(), h.value)?;
    }
    Ok(Some((head, used)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_switching_protocols_head_and_keeps_what_follows() {
        let raw = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                    Connection: Upgrade\r\nSec-WebSocket-Accept: abc=\r\n\r\n\x81\x01x";
        let (head, used) = parse_head(raw).unwrap().unwrap();
        assert_eq!(head.status.as_u16(), 101);
        assert_eq!(head.headers.get("upgrade").unwrap(), "websocket");
        assert_eq!(&raw[used..], b"\x81\x01x");
    }

    #[test]
    fn a_partial_head_asks_for_more() {
        assert!(
            parse_head(b"HTTP/1.1 101 Switching Protocols\r\nUpgr")
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn junk_is_an_error_not_a_panic() {
        assert!(parse_head(b"\x00\x01garbage\r\n\r\n").is_err());
    }
}
