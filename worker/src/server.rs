//! The accept loop: a connection permit is taken before `accept()` (overload means not
//! accepting, not failing), each connection is wrapped so a drain can cut it, and served by
//! hyper with upgrades for WebSockets.

use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use shared::{Backoff, Shutdown};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::http::{HttpCtx, handle};

/// Headers must arrive within this time, or the connection is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serve connections on `listener` until shutdown, at most `max_connections` at once.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<HttpCtx>,
    max_connections: usize,
    mut shutdown: Shutdown,
) {
    let limit = Arc::new(Semaphore::new(max_connections));
    let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&limit).acquire_owned() => p.expect("the semaphore is never closed"),
            _ = shutdown.recv() => return,
        };
        let stream = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.recv() => return,
        };
        let stream = match stream {
            Ok((stream, _peer)) => {
                backoff.reset();
                stream
            }
            Err(e) => {
                // EMFILE and friends: pause instead of spinning; one line per failure streak.
                if backoff.failures() == 0 {
                    tracing::error!("accept failed: {e}; backing off");
                }
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (conn_id, io) = ctx.registry.wrap(stream, Some(permit));
        let ctx = Arc::clone(&ctx);
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(Arc::clone(&ctx), conn_id, req));
            let conn = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(io), svc)
                .with_upgrades();
            if let Err(e) = conn.await {
                tracing::debug!("connection ended with error: {e}");
            }
        });
    }
}
