//! The public listener's connection loop: pingora's HTTP/1 loop, with a timeout on the first
//! request head of each connection.
//!
//! Why: pingora reads a new connection's head under its keepalive timeout (60 s per read) and
//! has no setting for it. Here a new connection starts with `balancer.header_timeout_secs`;
//! the proxy restores the normal keepalive ([`KEEPALIVE_SECS`]) once a head has arrived. HTTP/1
//! only: Engine.IO clients do not speak h2c.

use std::sync::Arc;

use async_trait::async_trait;
use pingora_core::apps::{HttpServerApp, ServerApp};
use pingora_core::protocols::Stream;
use pingora_core::protocols::http::ServerSession;
use pingora_core::server::ShutdownWatch;

/// Keepalive between requests once a connection has sent a complete head, in seconds.
pub const KEEPALIVE_SECS: u64 = 60;

/// An HTTP app (the proxy) behind a head timeout.
pub struct Front<A> {
    proxy: Arc<A>,
    header_timeout_secs: u64,
}

impl<A> Front<A> {
    /// Wraps pingora's proxy app.
    pub fn new(proxy: A, header_timeout_secs: u64) -> Self {
        Front {
            proxy: Arc::new(proxy),
            header_timeout_secs,
        }
    }
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> ServerApp for Front<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let mut session = ServerSession::new_http1(stream);
        // pingora bounds each read of a head by the keepalive timeout: this is the head timeout.
        session.set_keepalive(if *shutdown.borrow() {
            None
        } else {
            Some(self.header_timeout_secs)
        });
        let mut result = self.proxy.process_new_http(session, shutdown).await;
        while let Some((stream, settings)) = result.map(|r| r.consume()) {
            let mut session = ServerSession::new_http1(stream);
            if let Some(settings) = settings {
                settings.apply_to_session(&mut session);
            }
            result = self.proxy.process_new_http(session, shutdown).await;
        }
        None
    }

    async fn cleanup(&self) {
        self.proxy.http_cleanup().await;
    }
}
