//! One call of a worker's own `/api/`, on a fresh connection, bounded in time: how the
//! balancer's API asks the workers.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The largest answer read from a worker (a room's member list can be long).
const MAX_ANSWER: usize = 64 * 1024 * 1024;

/// Why a call got no answer.
#[derive(Debug)]
pub enum CallError {
    /// The worker could not be reached: it never saw the request.
    Unreached,
    /// The request was sent, the answer did not come: it may have been carried out.
    NoAnswer(String),
}

/// Calls `method path` on the worker at `addr` with the API key; its status and body.
///
/// # Errors
/// See [`CallError`].
pub async fn call(
    addr: SocketAddr,
    method: Method,
    path: &str,
    key: &str,
    body: Bytes,
    limit: Duration,
) -> Result<(StatusCode, Bytes), CallError> {
    let stream = tokio::time::timeout(limit, TcpStream::connect(addr))
        .await
        .map_err(|_| CallError::Unreached)?
        .map_err(|_| CallError::Unreached)?;
    tokio::time::timeout(limit, ask(stream, method, path, key, body))
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {limit:?}")))
        .map_err(CallError::NoAnswer)
}

async fn ask(
    stream: TcpStream,
    method: Method,
    path: &str,
    key: &str,
    body: Bytes,
) -> Result<(StatusCode, Bytes), String> {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, "fleet-worker")
        .header(header::AUTHORIZATION, format!("Bearer {key}"))
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONNECTION, "close")
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?
        .to_bytes();
    Ok((status, body))
}
