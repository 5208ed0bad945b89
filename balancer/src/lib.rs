//! The fleet balancer: a pingora front proxy with stateless sticky sessions, bounded-load
//! placement, health checks and a worker supervisor.
//!
//! # Layout
//! - [`serve`] (here): builds the pingora server from a fleet file, one service per part.
//! - [`front`]: the public listener's connection loop (head timeout).
//! - [`proxy`]: the `ProxyHttp` hooks: route by sid tag or place, tag handshakes, count;
//!   [`handoff`]: WebSockets passed to supervised workers; [`ws_tunnel`]: WebSockets relayed
//!   (other workers); [`raw_http`]: what both take from pingora's session;
//!   [`rejections`]: refusals, logged once per class.
//! - [`sticky`]: pure codecs: tags, the open packet rewrite, the query string.
//! - [`upstreams`]: workers, their tags and loads, and placement policies.
//! - [`discovery`]: which workers exist; [`health`]: `/readyz` checks;
//!   [`load_poll`]: worker loads; [`supervisor`]: worker processes; [`resize`]: the fleet
//!   file followed while running; [`admin`]: own endpoints.
//! - [`metrics`]: the balancer's metrics.
#![warn(missing_docs)]

pub mod admin;
pub mod discovery;
pub mod front;
pub mod handoff;
pub mod health;
pub mod load_poll;
pub mod metrics;
pub mod proxy;
pub mod raw_http;
pub mod rejections;
pub mod resize;
pub mod sticky;
pub mod supervisor;
pub mod upstreams;
pub mod ws_tunnel;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pingora_core::apps::http_app::HttpServer;
use pingora_core::listeners::{L4BufferSettings, ListenerConfig, TcpSocketOptions};
use pingora_core::server::Server;
use pingora_core::server::configuration::ServerConf;
use pingora_core::services::background::background_service;
use pingora_core::services::listening::Service;
use pingora_load_balancing::selection::Consistent;
use pingora_load_balancing::{Backends, LoadBalancer};
use shared::FleetConfig;
use tokio::sync::watch;

/// A pingora server running the whole balancer for `cfg` (read from `config_path`).
pub fn serve(cfg: &FleetConfig, config_path: PathBuf) -> Server {
    let conf = ServerConf {
        threads: cfg.balancer.threads,
        grace_period_seconds: Some(cfg.grace_period().as_secs()),
        graceful_shutdown_timeout_seconds: Some(2),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let interval = Duration::from_millis(cfg.balancer.health_check_interval_ms);
    // The live worker count: what the supervisor runs, and what placement sees (see `resize`).
    let (spawned, spawned_rx) = watch::channel(cfg.workers.count);
    let (routed, routed_rx) = watch::channel(cfg.workers.count);
    let backends = Backends::new(Box::new(discovery::HostsDiscovery::from_config(
        cfg, routed_rx,
    )));
    let mut lb = LoadBalancer::<Consistent>::from_backends(backends);
    lb.set_health_check(health::readyz_check(cfg));
    lb.health_check_frequency = Some(interval);
    lb.update_frequency = Some(if cfg.workers.discover.is_some() {
        Duration::from_secs(5)
    } else {
        Duration::from_secs(60)
    });
    lb.parallel_health_check = true;
    let lb_service = background_service("worker health", lb);
    let upstreams = Arc::new(upstreams::Upstreams::new(lb_service.task(), cfg));
    let handoff = cfg.spawns_workers() && cfg.workers.handoff;
    let named: Vec<String> = if cfg.indexed_workers() {
        (0..cfg.workers.count).map(FleetConfig::worker_id).collect()
    } else {
        Vec::new()
    };
    metrics::METRICS.init_series(
        named.iter().map(String::as_str),
        cfg.spawns_workers(),
        handoff,
    );
    // Filled by the supervisor as it starts workers; stays empty when nothing is handed off.
    let handoffs = Arc::new(handoff::Handoffs::default());

    let mut proxy = Service::new(
        "proxy".to_owned(),
        front::Front::new(
            pingora_proxy::http_proxy(
                &server.configuration,
                proxy::FleetProxy::new(Arc::clone(&upstreams), Arc::clone(&handoffs), cfg),
            ),
            cfg.balancer.header_timeout_secs,
        ),
    );
    let mut socket = TcpSocketOptions::default();
    socket.so_reuseport = Some(cfg.balancer.reuse_port);
    // No L4 read buffer (pingora's default is 64 KiB per connection): request heads have their
    // own buffer, and a WebSocket tunnel copies through a small one of its own. At 10k clients
    // that is the difference between ~640 MB and nothing.
    proxy.add_listener(
        ListenerConfig::tcp(cfg.listen.to_string())
            .tcp_socket_options(socket)
            .l4_buffer(L4BufferSettings::default().read(0)),
    );
    let mut admin = Service::new(
        "admin".to_owned(),
        HttpServer::new_app(admin::Admin {
            upstreams: Arc::clone(&upstreams),
        }),
    );
    admin.add_tcp(&cfg.metrics_listen.to_string());
    let poller = background_service(
        "worker loads",
        load_poll::LoadPoller {
            upstreams: Arc::clone(&upstreams),
            every: interval,
        },
    );

    if cfg.spawns_workers() {
        server.add_service(background_service(
            "workers",
            supervisor::Supervisor::new(
                cfg,
                config_path.clone(),
                spawned_rx,
                handoff.then_some(handoffs),
            ),
        ));
    }
    server.add_service(background_service(
        "fleet file",
        resize::Resizer {
            path: config_path,
            running: cfg.clone(),
            spawned,
            routed,
            upstreams: Arc::clone(&upstreams),
        },
    ));
    server.add_service(lb_service);
    server.add_service(poller);
    server.add_service(admin);
    server.add_service(proxy);
    server
}
