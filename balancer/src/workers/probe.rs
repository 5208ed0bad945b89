//! One probe of one worker, on a fresh connection (so a worker that stopped accepting
//! connections fails it), answering whether the worker is ready and, when it says, how many
//! sessions it holds. The only HTTP client the balancer uses to look at workers. What it asks
//! is `balancer.health_check`:
//!
//! - `readyz` (fleet workers): `GET /readyz`; 200 is ready, and the `x-fleet-connections`
//!   header is the worker's session count.
//! - `engineio` (any Engine.IO v4 server, e.g. a stock Node `socket.io`): the polling
//!   handshake `GET {socketio.path}/?EIO=4&transport=polling`; ready when answered 200 with an
//!   open packet (`0{..."sid":...}`). Such a server reports no load, so none is read: the
//!   balancer counts the sessions it placed on it instead (see [`super::Load`]).
//!
//! The session an `engineio` probe opens is closed at once, with a close packet (`POST
//! ...&sid=<sid>`, body `1`) on another fresh connection, best effort and not waited for (a
//! slow close must not fail a good probe). Left open, each would live until the server gives
//! up on it (a Node `socket.io` server: its 45 s `connectTimeout`), so one probe a second
//! would keep some 45 idle sessions on every server, in its memory and its `clientsCount`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use shared::config::HealthCheck;
use shared::metrics::READYZ_CONNECTIONS_HEADER;
use tokio::net::TcpStream;

use crate::sticky::tag::{MAX_SID_LEN, is_sid_char};

/// The most of a handshake answer read: an open packet is a few hundred bytes.
const MAX_HANDSHAKE_BODY: usize = 16 * 1024;

/// What a worker answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The status of the probe's request.
    pub status: StatusCode,
    /// Whether that answer means ready for new sessions.
    pub ready: bool,
    /// The sessions it holds, when it said.
    pub connections: Option<i64>,
}

impl Answer {
    /// Ready for new sessions.
    pub fn is_ready(&self) -> bool {
        self.ready
    }
}

/// Why a probe got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// No TCP connection (refused, unreachable).
    #[error("connect: {0}")]
    Connect(std::io::Error),
    /// The connection failed or the answer was not HTTP.
    #[error("http: {0}")]
    Http(#[from] hyper::Error),
    /// The answer's body broke off or was too long to be a handshake.
    #[error("body: {0}")]
    Body(Box<dyn std::error::Error + Send + Sync>),
    /// No answer within the probe's time limit (a hung worker).
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
}

/// What a probe asks.
#[derive(Debug, Clone)]
enum Check {
    Readyz,
    /// The Engine.IO path, without a trailing slash.
    Engineio(Arc<str>),
}

/// Probes workers, each answer bounded by `limit`.
#[derive(Debug, Clone)]
pub struct Probe {
    limit: Duration,
    check: Check,
}

impl Probe {
    /// A `/readyz` probe that gives up after `limit`.
    pub fn new(limit: Duration) -> Self {
        Probe {
            limit,
            check: Check::Readyz,
        }
    }

    /// An Engine.IO handshake probe on `path` (`socketio.path`) that gives up after `limit`.
    pub fn engineio(limit: Duration, path: &str) -> Self {
        Probe {
            limit,
            check: Check::Engineio(path.trim_end_matches('/').into()),
        }
    }

    /// The probe `balancer.health_check` names.
    pub fn for_config(limit: Duration, check: HealthCheck, path: &str) -> Self {
        match check {
            HealthCheck::Readyz => Probe::new(limit),
            HealthCheck::Engineio => Probe::engineio(limit, path),
        }
    }

    /// What it asks, for logs.
    pub fn what(&self) -> &'static str {
        match self.check {
            Check::Readyz => "/readyz",
            Check::Engineio(_) => "the Engine.IO handshake",
        }
    }

    /// Asks the worker at `addr`.
    ///
    /// # Errors
    /// No answer: see [`ProbeError`].
    pub async fn check(&self, addr: SocketAddr) -> Result<Answer, ProbeError> {
        let asked = async {
            match &self.check {
                Check::Readyz => readyz(addr).await,
                Check::Engineio(path) => self.handshake(addr, path).await,
            }
        };
        tokio::time::timeout(self.limit, asked)
            .await
            .unwrap_or(Err(ProbeError::TimedOut(self.limit)))
    }

    async fn handshake(&self, addr: SocketAddr, path: &Arc<str>) -> Result<Answer, ProbeError> {
        let req = Request::get(format!("{path}/?EIO=4&transport=polling"))
            .header(header::HOST, "fleet-worker")
            .header(header::CONNECTION, "close")
            .body(Full::new(Bytes::new()))
            .expect("the request is valid");
        let (status, _, body) = exchange(addr, req, MAX_HANDSHAKE_BODY).await?;
        let sid = (status == StatusCode::OK)
            .then(|| open_packet_sid(&body))
            .flatten();
        if let Some(sid) = &sid {
            let close = close_session(addr, Arc::clone(path), sid.clone());
            tokio::spawn(tokio::time::timeout(self.limit, close));
        }
        Ok(Answer {
            status,
            ready: sid.is_some(),
            connections: None,
        })
    }
}

/// The sid of an Engine.IO v4 open packet, the first packet of `body`; `None` when it is none,
/// or its sid is one the balancer could not tag (a server it could not keep sessions on).
pub fn open_packet_sid(body: &[u8]) -> Option<String> {
    let packet = body.split(|b| *b == 0x1e).next()?;
    let json = packet.strip_prefix(b"0")?;
    let open: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(json).ok()?;
    let sid = open.get("sid")?.as_str()?;
    let usable = !sid.is_empty() && sid.len() <= MAX_SID_LEN && sid.bytes().all(is_sid_char);
    usable.then(|| sid.to_owned())
}

/// Ends the probe's own session with a close packet; whatever happens is ignored.
async fn close_session(addr: SocketAddr, path: Arc<str>, sid: String) {
    // The sid is URL-safe as it is (`open_packet_sid` checked its characters).
    let req = Request::post(format!("{path}/?EIO=4&transport=polling&sid={sid}"))
        .header(header::HOST, "fleet-worker")
        .header(header::CONNECTION, "close")
        .header(header::CONTENT_TYPE, "text/plain;charset=UTF-8")
        .body(Full::new(Bytes::from_static(b"1")))
        .expect("the request is valid");
    if let Err(e) = exchange(addr, req, MAX_HANDSHAKE_BODY).await {
        tracing::debug!(%addr, "closing the probe's Engine.IO session: {e}");
    }
}

async fn readyz(addr: SocketAddr) -> Result<Answer, ProbeError> {
    let req = Request::get("/readyz")
        .header(header::HOST, "fleet-worker")
        .header(header::CONNECTION, "close")
        .body(Full::new(Bytes::new()))
        .expect("static request is valid");
    let (status, headers, _) = exchange(addr, req, 0).await?;
    let connections = headers
        .get(READYZ_CONNECTIONS_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok());
    Ok(Answer {
        status,
        ready: status == StatusCode::OK,
        connections,
    })
}

/// One request on a fresh connection: the answer's status, headers and, when `max_body` is
/// not 0, its body (an error past `max_body` bytes).
async fn exchange(
    addr: SocketAddr,
    req: Request<Full<Bytes>>,
    max_body: usize,
) -> Result<(StatusCode, HeaderMap, Bytes), ProbeError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(ProbeError::Connect)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let response = async move {
        let resp = sender.send_request(req).await?;
        let (parts, body) = resp.into_parts();
        let body = if max_body == 0 {
            Bytes::new()
        } else {
            Limited::new(body, max_body)
                .collect()
                .await
                .map_err(ProbeError::Body)?
                .to_bytes()
        };
        Ok((parts.status, parts.headers, body))
    };
    tokio::pin!(response);
    // The connection task ends when the worker closes; the answer may be delivered in the
    // same step, so a finished connection still hands over its answer.
    tokio::select! {
        biased;
        answer = &mut response => answer,
        closed = conn => {
            closed?;
            response.await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A one-shot server answering every connection with `answer` (or never, when empty).
    async fn server(answer: &'static str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                    if answer.is_empty() {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                    }
                    let _ = s.write_all(answer.as_bytes()).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn reads_readiness_and_load() {
        let addr = server(
            "HTTP/1.1 200 OK\r\nx-fleet-connections: 42\r\ncontent-length: 6\r\n\r\nready\n",
        )
        .await;
        let answer = Probe::new(Duration::from_secs(2))
            .check(addr)
            .await
            .unwrap();
        assert!(answer.is_ready());
        assert_eq!(answer.connections, Some(42));
    }

    #[tokio::test]
    async fn a_draining_worker_is_not_ready_but_still_counts() {
        let addr = server(
            "HTTP/1.1 503 Service Unavailable\r\nx-fleet-connections: 3\r\nconnection: close\r\n\r\ndraining\n",
        )
        .await;
        let answer = Probe::new(Duration::from_secs(2))
            .check(addr)
            .await
            .unwrap();
        assert!(!answer.is_ready());
        assert_eq!(answer.connections, Some(3));
    }

    #[tokio::test]
    async fn a_hung_worker_times_out_and_a_closed_port_is_refused() {
        let hung = server("").await;
        let probe = Probe::new(Duration::from_millis(200));
        assert!(matches!(
            probe.check(hung).await,
            Err(ProbeError::TimedOut(_))
        ));
        let closed = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        assert!(matches!(
            probe.check(closed).await,
            Err(ProbeError::Connect(_))
        ));
    }

    const OPEN: &str = r#"0{"sid":"lv_VI97HAXpY6yYWAAAC","upgrades":["websocket"],"pingInterval":25000,"pingTimeout":20000,"maxPayload":1000000}"#;

    #[test]
    fn an_open_packet_names_its_sid_and_nothing_else_does() {
        assert_eq!(
            open_packet_sid(OPEN.as_bytes()).as_deref(),
            Some("lv_VI97HAXpY6yYWAAAC")
        );
        // Further packets after the record separator do not matter.
        let more = format!("{OPEN}\x1e40");
        assert!(open_packet_sid(more.as_bytes()).is_some());
        for garbage in [
            "",
            "ready\n",
            "0",
            "0{}",
            r#"0{"sid":""}"#,
            r#"0{"sid":42}"#,
            r#"0{"sid":"a/b"}"#,
            r#"0["sid"]"#,
            r#"4{"sid":"abc"}"#,
            r#"97:0{"sid":"abc"}"#, // Engine.IO 3 framing: the probe asked for v4
            "<html>Not Found</html>",
        ] {
            assert_eq!(open_packet_sid(garbage.as_bytes()), None, "{garbage:?}");
        }
    }

    /// A server answering the first connection with `answer` and recording what the second
    /// (the probe's close) sends.
    async fn engineio_server(answer: String) -> (SocketAddr, tokio::sync::mpsc::Receiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (seen, requests) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let seen = seen.clone();
                let answer = answer.clone();
                tokio::spawn(async move {
                    let request = read_request(&mut s).await;
                    let reply = if request.starts_with("GET ") {
                        answer
                    } else {
                        "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_owned()
                    };
                    let _ = s.write_all(reply.as_bytes()).await;
                    let _ = seen.send(request).await;
                });
            }
        });
        (addr, requests)
    }

    /// A request's head and, for a POST, its (short) body, however the writes were split.
    async fn read_request(s: &mut tokio::net::TcpStream) -> String {
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            let text = String::from_utf8_lossy(&got).into_owned();
            if let Some(end) = text.find("\r\n\r\n")
                && (!text.starts_with("POST ") || text.len() > end + 4)
            {
                return text;
            }
            match s.read(&mut buf).await {
                Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
                _ => return text,
            }
        }
    }

    fn http(status: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=UTF-8\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    #[tokio::test]
    async fn an_engineio_handshake_is_ready_and_its_session_closed() {
        let (addr, mut requests) = engineio_server(http("200 OK", OPEN)).await;
        let probe = Probe::engineio(Duration::from_secs(2), "/socket.io/");
        let answer = probe.check(addr).await.unwrap();
        assert!(answer.is_ready());
        assert_eq!(answer.connections, None, "such a server reports no load");
        let asked = requests.recv().await.unwrap();
        assert!(
            asked.starts_with("GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\n"),
            "{asked}"
        );
        let close = tokio::time::timeout(Duration::from_secs(2), requests.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(
            close.starts_with(
                "POST /socket.io/?EIO=4&transport=polling&sid=lv_VI97HAXpY6yYWAAAC HTTP/1.1\r\n"
            ),
            "{close}"
        );
        assert!(close.ends_with("\r\n\r\n1"), "a close packet: {close}");
    }

    #[tokio::test]
    async fn an_engineio_probe_wants_an_open_packet_with_200() {
        let probe = Probe::engineio(Duration::from_secs(2), "/socket.io");
        for answer in [
            http("200 OK", "ready\n"),
            http("200 OK", "<html>hello</html>"),
            http("404 Not Found", ""),
            http("503 Service Unavailable", OPEN),
            http(
                "400 Bad Request",
                r#"{"code":0,"message":"Transport unknown"}"#,
            ),
        ] {
            let (addr, _) = engineio_server(answer.clone()).await;
            let got = probe.check(addr).await.unwrap();
            assert!(!got.is_ready(), "{answer}");
        }
        // A worker that stalls the handshake is as down as one that never answers.
        let hung = server("").await;
        let probe = Probe::engineio(Duration::from_millis(200), "/socket.io");
        assert!(matches!(
            probe.check(hung).await,
            Err(ProbeError::TimedOut(_))
        ));
    }

    #[tokio::test]
    async fn junk_is_an_error() {
        let addr = server("SSH-2.0-nope\r\n\r\n").await;
        let probe = Probe::new(Duration::from_secs(2));
        assert!(matches!(probe.check(addr).await, Err(ProbeError::Http(_))));
    }
}
