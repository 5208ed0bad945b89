//! One client's Engine.IO connection: WebSocket, long-polling, or polling upgraded to
//! WebSocket. `recv` is cancel-safe, so a client can `select!` on it.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};
use std::pin::Pin;
use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::protocol::{self, Open, Packet};
use crate::scenario::{Target, Transport};

/// Why a connection failed; the kind is what the report counts.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// TCP connect failed.
    #[error("connect: {0}")]
    Connect(std::io::Error),
    /// An answer took too long.
    #[error("timeout")]
    Timeout,
    /// The server answered 400 "Session ID unknown".
    #[error("session id unknown")]
    SessionUnknown,
    /// The server answered another HTTP error.
    #[error("http status {0}")]
    Status(u16),
    /// The connection broke.
    #[error("closed: {0}")]
    Closed(String),
    /// The server sent something we cannot read.
    #[error("protocol: {0}")]
    Protocol(String),
}

impl ConnError {
    /// A short stable name for the report.
    pub fn kind(&self) -> String {
        match self {
            ConnError::Connect(e) => format!("connect_{:?}", e.kind()).to_lowercase(),
            ConnError::Timeout => "timeout".into(),
            ConnError::SessionUnknown => "session_unknown".into(),
            ConnError::Status(s) => format!("http_{s}"),
            ConnError::Closed(_) => "closed".into(),
            ConnError::Protocol(_) => "protocol".into(),
        }
    }
}

/// HTTP requests answered in this process (long-polling GETs and POSTs, handshakes): the
/// request rate a polling run puts through the server.
pub static HTTP_REQUESTS: AtomicU64 = AtomicU64::new(0);

/// How long any single handshake step may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(20);

type Ws = WebSocketStream<TcpStream>;
type PendingGet = Pin<Box<dyn Future<Output = (Result<String, ConnError>, Option<Http>)> + Send>>;

/// An open Engine.IO connection.
pub enum Conn {
    /// Over a WebSocket.
    Ws(Box<Ws>),
    /// Over long-polling: one connection for GETs, one for POSTs.
    Polling(Box<Polling>),
}

/// The long-polling state: a connection for GETs and one for POSTs, each reopened when the
/// server closes it (Node's @socket.io/sticky answers every polling request `Connection: close`).
pub struct Polling {
    target: Target,
    source: Option<IpAddr>,
    sid: String,
    get: Option<Http>,
    post: Option<Http>,
    pending: Option<PendingGet>,
}

type Http = SendRequest<Full<Bytes>>;

impl Conn {
    /// Opens a connection and completes the Engine.IO handshake.
    pub async fn open(
        target: &Target,
        transport: Transport,
        source: Option<IpAddr>,
    ) -> Result<(Conn, Open), ConnError> {
        match transport {
            // `mixed` is resolved per client (`Transport::for_client`) before this.
            Transport::Websocket | Transport::Mixed => {
                let mut ws = ws_connect(target, source, None).await?;
                let first = timed(ws_recv(&mut ws)).await??;
                match first.into_iter().next() {
                    Some(Packet::Open(open)) => Ok((Conn::Ws(Box::new(ws)), open)),
                    other => Err(ConnError::Protocol(format!("expected open, got {other:?}"))),
                }
            }
            Transport::Polling => {
                let (polling, open) = Polling::open(target, source).await?;
                Ok((Conn::Polling(Box::new(polling)), open))
            }
            Transport::Upgrade => {
                let (polling, open) = Polling::open(target, source).await?;
                let mut ws = ws_connect(target, source, Some(&open.sid)).await?;
                ws_send(&mut ws, &["2probe".to_owned()]).await?;
                match timed(ws_recv(&mut ws)).await??.first() {
                    Some(Packet::Pong(p)) if p == "probe" => {}
                    other => {
                        return Err(ConnError::Protocol(format!(
                            "expected 3probe, got {other:?}"
                        )));
                    }
                }
                ws_send(&mut ws, &["5".to_owned()]).await?;
                drop(polling);
                Ok((Conn::Ws(Box::new(ws)), open))
            }
        }
    }

    /// The next packets from the server. Cancel-safe.
    pub async fn recv(&mut self) -> Result<Vec<Packet>, ConnError> {
        match self {
            Conn::Ws(ws) => ws_recv(ws).await,
            Conn::Polling(p) => p.recv().await,
        }
    }

    /// Sends packets (one WebSocket frame each, or one POST).
    pub async fn send(&mut self, packets: &[String]) -> Result<(), ConnError> {
        match self {
            Conn::Ws(ws) => ws_send(ws, packets).await,
            Conn::Polling(p) => p.send(packets).await,
        }
    }

    /// Closes the session politely, so the server forgets it at once.
    pub async fn close(self) {
        match self {
            Conn::Ws(mut ws) => {
                let _ = ws_send(&mut ws, &["1".to_owned()]).await;
                let _ = SinkExt::close(ws.as_mut()).await;
            }
            Conn::Polling(mut p) => {
                let _ = p.send(&["1".to_owned()]).await;
            }
        }
    }
}

async fn timed<T>(f: impl Future<Output = T>) -> Result<T, ConnError> {
    tokio::time::timeout(STEP_TIMEOUT, f)
        .await
        .map_err(|_| ConnError::Timeout)
}

/// A TCP connection from `source` (any port) when given.
async fn tcp(addr: SocketAddr, source: Option<IpAddr>) -> Result<TcpStream, ConnError> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(ConnError::Connect)?;
    if let Some(ip) = source {
        if let Err(e) = no_port_at_bind(&socket) {
            warn_port_at_bind(&e);
        }
        socket
            .bind(SocketAddr::new(ip, 0))
            .map_err(ConnError::Connect)?;
    }
    let stream = timed(socket.connect(addr))
        .await?
        .map_err(ConnError::Connect)?;
    stream.set_nodelay(true).ok();
    Ok(stream)
}

/// IP_BIND_ADDRESS_NO_PORT: pick the local port at connect, not at bind. A port taken by
/// bind() is withheld from every other connect() on the machine, so tens of thousands of bound
/// clients would starve the servers' own outgoing connections (a balancer's to its workers) of
/// ephemeral ports; a port picked at connect is shared by connections to different places.
///
/// # Errors
/// The kernel refused the option (before Linux 4.2, or not an IP socket).
fn no_port_at_bind(socket: &impl AsFd) -> std::io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: a valid socket fd and a pointer to a c_int that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Without the option a client still connects (its port is then reserved at bind), so the run
/// goes on; but a large run may exhaust the machine's ephemeral ports and make the servers
/// fail, so say so, once per process rather than once per client.
fn warn_port_at_bind(e: &std::io::Error) {
    static WARNED: Once = Once::new();
    WARNED.call_once(|| {
        eprintln!(
            "loadtest: IP_BIND_ADDRESS_NO_PORT refused ({e}): each client bound to a --source \
             address reserves its port at bind; a large run may exhaust the ephemeral ports \
             of the whole machine, the servers' own connections included"
        );
    });
}

async fn ws_connect(
    target: &Target,
    source: Option<IpAddr>,
    sid: Option<&str>,
) -> Result<Ws, ConnError> {
    let stream = tcp(target.addr, source).await?;
    let mut url = format!(
        "ws://{}{}?EIO=4&transport=websocket",
        target.host, target.path
    );
    if let Some(sid) = sid {
        url.push_str("&sid=");
        url.push_str(sid);
    }
    // Small buffers: one process holds tens of thousands of these.
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let (ws, _) = timed(tokio_tungstenite::client_async_with_config(
        url,
        stream,
        Some(config),
    ))
    .await?
    .map_err(|e| match e {
        tokio_tungstenite::tungstenite::Error::Http(resp) => status_error(
            resp.status().as_u16(),
            resp.body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default()
                .as_ref(),
        ),
        other => ConnError::Closed(other.to_string()),
    })?;
    Ok(ws)
}

async fn ws_recv(ws: &mut Ws) -> Result<Vec<Packet>, ConnError> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                return Packet::parse(text.as_str())
                    .map(|p| vec![p])
                    .map_err(|e| ConnError::Protocol(e.to_string()));
            }
            Some(Ok(Message::Close(_))) | None => {
                return Err(ConnError::Closed("websocket closed".into()));
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(ConnError::Closed(e.to_string())),
        }
    }
}

async fn ws_send(ws: &mut Ws, packets: &[String]) -> Result<(), ConnError> {
    for p in packets {
        ws.feed(Message::text(p.as_str()))
            .await
            .map_err(|e| ConnError::Closed(e.to_string()))?;
    }
    ws.flush()
        .await
        .map_err(|e| ConnError::Closed(e.to_string()))
}

fn status_error(status: u16, body: &str) -> ConnError {
    if status == 400 && body.contains("Session ID unknown") {
        ConnError::SessionUnknown
    } else {
        ConnError::Status(status)
    }
}

impl Polling {
    async fn open(target: &Target, source: Option<IpAddr>) -> Result<(Polling, Open), ConnError> {
        let (body, get) = timed(exchange(
            target,
            source,
            None,
            "EIO=4&transport=polling",
            None,
        ))
        .await?;
        let open = match Packet::parse_payload(&body?)
            .map_err(|e| ConnError::Protocol(e.to_string()))?
            .into_iter()
            .next()
        {
            Some(Packet::Open(open)) => open,
            other => return Err(ConnError::Protocol(format!("expected open, got {other:?}"))),
        };
        Ok((
            Polling {
                target: target.clone(),
                source,
                sid: open.sid.clone(),
                get,
                post: None,
                pending: None,
            },
            open,
        ))
    }

    fn query(&self) -> String {
        format!("EIO=4&transport=polling&sid={}", self.sid)
    }

    async fn recv(&mut self) -> Result<Vec<Packet>, ConnError> {
        if self.pending.is_none() {
            let (target, source, query) = (self.target.clone(), self.source, self.query());
            let conn = self.get.take();
            self.pending = Some(Box::pin(async move {
                exchange(&target, source, conn, &query, None).await
            }));
        }
        let (body, conn) = self.pending.as_mut().expect("set above").as_mut().await;
        self.pending = None;
        self.get = conn;
        Packet::parse_payload(&body?).map_err(|e| ConnError::Protocol(e.to_string()))
    }

    async fn send(&mut self, packets: &[String]) -> Result<(), ConnError> {
        let body = protocol::payload(packets);
        let query = self.query();
        let conn = self.post.take();
        let (answer, conn) = timed(exchange(
            &self.target,
            self.source,
            conn,
            &query,
            Some(body),
        ))
        .await?;
        self.post = conn;
        let answer = answer?;
        if answer != "ok" {
            return Err(ConnError::Protocol(format!("POST answered {answer:?}")));
        }
        Ok(())
    }
}

/// One HTTP request on `conn` (or a new connection when there is none, or it was closed);
/// gives back the connection if the server keeps it open.
async fn exchange(
    target: &Target,
    source: Option<IpAddr>,
    conn: Option<Http>,
    query: &str,
    body: Option<String>,
) -> (Result<String, ConnError>, Option<Http>) {
    let mut conn = match conn {
        Some(c) if !c.is_closed() => c,
        _ => match http_conn(target, source).await {
            Ok(c) => c,
            Err(e) => return (Err(e), None),
        },
    };
    if let Err(e) = conn.ready().await {
        return (Err(ConnError::Closed(e.to_string())), None);
    }
    let resp = match conn.send_request(build(target, query, body)).await {
        Ok(r) => r,
        Err(e) => return (Err(ConnError::Closed(e.to_string())), None),
    };
    HTTP_REQUESTS.fetch_add(1, Relaxed);
    let keep = !resp
        .headers()
        .get(http::header::CONNECTION)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    let text = read_response(resp).await;
    let reusable = keep && text.is_ok();
    (text, reusable.then_some(conn))
}

async fn http_conn(target: &Target, source: Option<IpAddr>) -> Result<Http, ConnError> {
    let stream = tcp(target.addr, source).await?;
    let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| ConnError::Closed(e.to_string()))?;
    tokio::spawn(conn);
    Ok(send)
}

fn build(target: &Target, query: &str, body: Option<String>) -> http::Request<Full<Bytes>> {
    let method = if body.is_some() { "POST" } else { "GET" };
    http::Request::builder()
        .method(method)
        .uri(format!("{}?{query}", target.path))
        .header("host", target.host.as_str())
        .header("content-type", "text/plain;charset=UTF-8")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .expect("a valid request")
}

async fn read_response(resp: http::Response<hyper::body::Incoming>) -> Result<String, ConnError> {
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| ConnError::Closed(e.to_string()))?
        .to_bytes();
    let text = String::from_utf8_lossy(&body).into_owned();
    if status != 200 {
        return Err(status_error(status, &text));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The option is set on a TCP socket, and a refusal is reported, not ignored.
    #[test]
    fn port_at_connect_is_set_or_reported() {
        let socket = TcpSocket::new_v4().unwrap();
        no_port_at_bind(&socket).unwrap();
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: a valid socket fd, and pointers to a c_int and its length that outlive
        // the call.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!((rc, value), (0, 1));
        // Not an IP socket: the kernel refuses, and the refusal comes back.
        let (unix, _) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(no_port_at_bind(&unix).is_err());
    }
}
