//! One probe of one worker: `GET /readyz` on a fresh connection (so a worker that stopped
//! accepting connections fails it), answering whether the worker is ready and how many
//! sessions it holds (its `x-fleet-connections` header). The only HTTP client the balancer
//! uses to look at workers.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use shared::metrics::READYZ_CONNECTIONS_HEADER;
use tokio::net::TcpStream;

/// What a worker answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The status of `/readyz`: 200 is ready.
    pub status: StatusCode,
    /// The sessions it holds, when it said.
    pub connections: Option<i64>,
}

impl Answer {
    /// Ready for new sessions.
    pub fn is_ready(&self) -> bool {
        self.status == StatusCode::OK
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
    /// No answer within the probe's time limit (a hung worker).
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
}

/// Probes workers, each answer bounded by `limit`.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    limit: Duration,
}

impl Probe {
    /// A probe that gives up after `limit`.
    pub fn new(limit: Duration) -> Self {
        Probe { limit }
    }

    /// Asks the worker at `addr`.
    ///
    /// # Errors
    /// No answer: see [`ProbeError`].
    pub async fn check(&self, addr: SocketAddr) -> Result<Answer, ProbeError> {
        tokio::time::timeout(self.limit, ask(addr))
            .await
            .unwrap_or(Err(ProbeError::TimedOut(self.limit)))
    }
}

async fn ask(addr: SocketAddr) -> Result<Answer, ProbeError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(ProbeError::Connect)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let req = Request::get("/readyz")
        .header(header::HOST, "fleet-worker")
        .header(header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .expect("static request is valid");
    let response = async move {
        let resp = sender.send_request(req).await?;
        let connections = resp
            .headers()
            .get(READYZ_CONNECTIONS_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        Ok(Answer {
            status: resp.status(),
            connections,
        })
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

    #[tokio::test]
    async fn junk_is_an_error() {
        let addr = server("SSH-2.0-nope\r\n\r\n").await;
        let probe = Probe::new(Duration::from_secs(2));
        assert!(matches!(probe.check(addr).await, Err(ProbeError::Http(_))));
    }
}
