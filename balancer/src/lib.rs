//! The fleet balancer: a pingora front proxy with stateless sticky sessions, bounded-load
//! placement, one view of the workers, and a worker supervisor.
//!
//! # Layout
//! - [`serve`] (here): builds the pingora server from a fleet file, one service per part.
//! - [`routing`]: the routing core, pure: a request and a fleet snapshot in, a decision out.
//! - [`placement`]: where a new session goes, one type per policy behind a trait.
//! - [`sticky`]: pure codecs: tags, the open packet rewrite.
//! - [`workers`]: the one view of the workers (which exist, up or not, their load), kept by
//!   discovery and one probe per worker.
//! - [`proxy`]: the pingora hooks that carry decisions out: proxy, hand off, relay, refuse.
//! - [`supervisor`]: worker processes; [`resize`]: the fleet file followed while running;
//!   [`admin`]: own endpoints; [`api`]: the server API; [`metrics`]: the balancer's metrics.
#![warn(missing_docs)]

pub mod admin;
pub mod api;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod placement;
pub mod proxy;
pub mod resize;
pub mod routing;
pub mod sticky;
pub mod supervisor;
pub mod tls;
pub mod workers;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pingora_core::apps::http_app::HttpServer;
use pingora_core::listeners::{L4BufferSettings, ListenerConfig, TcpSocketOptions};
use pingora_core::server::Server;
use pingora_core::server::configuration::ServerConf;
use pingora_core::services::background::background_service;
use pingora_core::services::listening::Service;
use shared::FleetConfig;
use tokio::sync::watch;

/// A pingora server running the whole balancer for `cfg` (read from `config_path`).
///
/// # Errors
/// `balancer.tls` names a certificate that cannot be served.
pub fn serve(cfg: &FleetConfig, config_path: PathBuf) -> Result<Server, tls::CertError> {
    let tls = cfg
        .balancer
        .tls
        .enabled()
        .then(|| tls::listener(&cfg.balancer.tls))
        .transpose()?;
    let conf = ServerConf {
        threads: cfg.balancer.threads,
        grace_period_seconds: Some(cfg.grace_period().as_secs()),
        graceful_shutdown_timeout_seconds: Some(2),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let interval = Duration::from_millis(cfg.balancer.health_check_interval_ms);
    // The live worker count: what the supervisor runs, and what the view holds (see `resize`).
    let (spawned, spawned_rx) = watch::channel(cfg.workers.count);
    let (routed, routed_rx) = watch::channel(cfg.workers.count);
    let placement = placement::Config {
        policy: cfg.balancer.placement,
        load_factor: cfg.balancer.load_factor,
    };
    let workers = Arc::new(workers::Workers::new(
        placement,
        &cfg.balancer.sticky_secret,
    ));
    let watcher = background_service(
        "workers",
        workers::Watcher::new(
            Arc::clone(&workers),
            workers::discovery::Discovery::from_config(cfg, routed_rx),
            cfg.balancer.health_check,
            &cfg.socketio.path,
            interval,
            cfg.balancer.health_check_failures,
        ),
    );
    // Under TLS the session lives in the balancer: a WebSocket cannot leave it as a plain
    // socket, so it is relayed.
    let handoff = cfg.spawns_workers() && cfg.workers.handoff && tls.is_none();
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
    let (handoffs, returned) = proxy::handoff::Handoffs::new();
    let handoffs = Arc::new(handoffs);

    let rejections = proxy::rejections::shared();
    let limits = limits::AddressLimits::new(&cfg.balancer.limits);
    let (close_tunnels, tunnels_closing) = shared::shutdown::channel();
    server.add_service(background_service(
        "relayed websockets",
        proxy::ws_tunnel::CloseOnShutdown {
            trigger: close_tunnels,
            exit_when_idle: !cfg.spawns_workers(),
        },
    ));
    let front = Arc::new(proxy::front::Front::new(
        pingora_proxy::http_proxy(
            &server.configuration,
            proxy::FleetProxy::new(
                Arc::clone(&workers),
                Arc::clone(&handoffs),
                tunnels_closing,
                cfg,
                Arc::clone(&rejections),
                limits.clone(),
            ),
        ),
        proxy::front::FrontConfig {
            header_timeout: Duration::from_secs(cfg.balancer.header_timeout_secs),
            max_header_bytes: cfg.balancer.max_header_bytes,
            trusted: cfg.balancer.trusted_proxies.clone(),
            keep_first_body: proxy::polls_leave(cfg),
            limits,
            rejections,
            tls: tls.map(|(acceptor, watcher)| {
                server.add_service(background_service("tls certificate", watcher));
                acceptor
            }),
        },
    ));
    // Long-polling connections the workers give back are routed as if just accepted.
    server.add_service(background_service(
        "returned connections",
        proxy::front::Returns {
            front: Arc::clone(&front),
            returned: std::sync::Mutex::new(Some(returned)),
        },
    ));
    let mut proxy = Service::new("proxy".to_owned(), proxy::front::Shared(front));
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
        HttpServer::new_app(admin::Admin::new(Arc::clone(&workers), cfg.listen)),
    );
    admin.add_tcp(&cfg.metrics_listen.to_string());
    if let Some(listen) = cfg.api.listen_addr() {
        let mut api = Service::new(
            "api".to_owned(),
            HttpServer::new_app(api::Api::new(Arc::clone(&workers), &cfg.api.key)),
        );
        api.add_tcp(&listen.to_string());
        server.add_service(api);
    }

    if cfg.spawns_workers() {
        server.add_service(background_service(
            "supervisor",
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
        },
    ));
    let watcher = server.add_service(watcher);
    server.add_service(admin);
    // Requests are routed only once every worker known at start has been probed once.
    server.add_service(proxy).add_dependency(&watcher);
    Ok(server)
}
