//! The public listener's connection loop: pingora's HTTP/1 loop, with a timeout on the first
//! request head of each connection.
//!
//! Why: pingora reads a new connection's head under its keepalive timeout (60 s per read) and
//! has no setting for it. Here a new connection starts with `balancer.header_timeout_secs`;
//! the proxy restores the normal keepalive once a head has arrived
//! ([`FleetProxy::early_request_filter`](crate::proxy::FleetProxy)). HTTP/1 only: Engine.IO
//! clients do not speak h2c.

use std::sync::Arc;

use async_trait::async_trait;
use pingora_core::apps::{HttpServerApp, ServerApp};
use pingora_core::protocols::Stream;
use pingora_core::protocols::http::ServerSession;
use pingora_core::server::ShutdownWatch;
use pingora_proxy::HttpProxy;

use crate::proxy::FleetProxy;

/// Keepalive between requests once a connection has sent a complete head, in seconds.
pub const KEEPALIVE_SECS: u64 = 60;

/// The proxy behind a head timeout.
pub struct Front {
    proxy: Arc<HttpProxy<FleetProxy>>,
    header_timeout_secs: u64,
}

impl Front {
    /// Wraps pingora's proxy app.
    pub fn new(proxy: HttpProxy<FleetProxy>, header_timeout_secs: u64) -> Self {
        Front {
            proxy: Arc::new(proxy),
            header_timeout_secs,
        }
    }
}

#[async_trait]
impl ServerApp for Front {
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
