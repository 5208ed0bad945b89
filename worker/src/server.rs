//! The accept loop: a connection permit is taken before `accept()` (overload means not
//! accepting, not failing), each connection — accepted on the port or handed over by the
//! balancer — is wrapped so a drain can cut it, and served by hyper with upgrades for
//! WebSockets.

use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use shared::{Backoff, Shutdown};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::handoff::{CloseReport, HandedOff, HandoffChannel};
use crate::http::{HttpCtx, handle};

/// Headers must arrive within this time, or the connection is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serve connections on `listener`, and those `handoff` brings from the balancer, until
/// shutdown, at most `max_connections` at once.
pub async fn serve(
    listener: TcpListener,
    mut handoff: Option<HandoffChannel>,
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
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    backoff.reset();
                    let _ = stream.set_nodelay(true);
                    serve_one(&ctx, stream, None, permit);
                }
                Err(e) => {
                    // EMFILE and friends: pause instead of spinning; one line per failure streak.
                    if backoff.failures() == 0 {
                        tracing::error!("accept failed: {e}; backing off");
                    }
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            },
            handed = next_handed(&mut handoff) => match handed {
                Ok(conn) => match crate::kept::keep_tag(&conn.head) {
                    Some(tag) => serve_kept(&ctx, conn, tag, permit),
                    None => serve_one(&ctx, conn.stream, Some((conn.head, conn.closed)), permit),
                },
                Err(e) => {
                    tracing::error!("the balancer's handoff channel failed ({e}); serving the port only");
                    handoff = None;
                }
            },
            _ = shutdown.recv() => return,
        }
    }
}

async fn next_handed(handoff: &mut Option<HandoffChannel>) -> std::io::Result<HandedOff> {
    match handoff {
        Some(channel) => channel.accept().await,
        None => std::future::pending().await,
    }
}

/// Serves a long-polling connection the balancer handed over to stay (see `kept`).
fn serve_kept(ctx: &Arc<HttpCtx>, conn: HandedOff, tag: String, permit: OwnedSemaphorePermit) {
    let peer = conn.stream.peer_addr().ok().map(crate::auth::PeerAddr);
    let (conn_id, io) = ctx.registry.wrap(conn.stream, Some(permit));
    let id = conn.closed.id();
    let kept = crate::kept::Kept {
        ctx: Arc::clone(ctx),
        conn: conn_id,
        io: io.kept(conn.closed),
        peer,
        tag,
        back: conn.back,
        id,
    };
    tokio::spawn(kept.serve(conn.head));
}

/// Serves one connection in a task of its own, wrapped so a drain can cut it; a handed-over
/// one with the request head the balancer read from it, and its close report.
fn serve_one(
    ctx: &Arc<HttpCtx>,
    stream: TcpStream,
    handed: Option<(Vec<u8>, CloseReport)>,
    permit: OwnedSemaphorePermit,
) {
    let peer = stream.peer_addr().ok().map(crate::auth::PeerAddr);
    let (conn_id, io) = ctx.registry.wrap(stream, Some(permit));
    let io = match handed {
        Some((head, closed)) => io.handed_over(head, closed),
        None => io,
    };
    let ctx = Arc::clone(ctx);
    tokio::spawn(async move {
        let svc = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            if let Some(peer) = peer {
                req.extensions_mut().insert(peer);
            }
            handle(Arc::clone(&ctx), conn_id, req)
        });
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
