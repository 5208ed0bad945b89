//! The fleet worker: a socketioxide server whose room broadcasts cross workers over Redis,
//! with health, metrics and graceful drain. Applications plug in their handlers as an [`App`].
//!
//! # For an app
//! - [`main`]: the whole program of a worker binary, given an app (`worker::main(app)`).
//! - [`App`] (any `Fn(Socket, &Fleet)`), [`Namespaces`]: what an app is.
//! - [`Fleet`]: the handle handlers get: cross-worker broadcasts, the Socket.IO server
//!   ([`Io`]), the fleet's Redis ([`RedisConnection`]), a socket's [`Grant`]; [`Socket`] and
//!   [`Ack`]: the types handlers take. [`redis`] and [`socketioxide`]: the crates, at the fleet's versions.
//! - [`run`], [`WorkerSettings`], [`Listener`]: serving an app from a program of one's own.
//! - [`RoomsApp`]: the default app.
//!
//! # Inside (private modules)
//! `cli` (the command line), `settings`, `adapter` (room broadcasts on per-room channels, which
//! a worker subscribes while it holds a member), `drivers` (the reconnecting Redis link: one
//! server, Sentinel or Cluster),
//! `fleet`, `app`, `auth` (who may connect, what a socket may do), `api` (the server API under
//! `/api/`), `server` (accept loop with a connection cap), `conn` (connections a drain can cut),
//! `handoff` (connections the supervising balancer passes over), `http` (the one port),
//! `limits` (`socketio.limits`: the gate every client message passes, the room limit),
//! `pages` (an app's own files), `drain` (moving clients away on SIGTERM), `health`
//! (readiness), `metrics`, `probes` (lag and memory).
#![warn(missing_docs)]

// The library's public surface is what an app uses (re-exported below); the modules are the
// worker's own plumbing.
mod adapter;
mod api;
mod app;
mod auth;
mod cli;
mod conn;
mod drain;
mod drivers;
mod fleet;
mod handoff;
mod health;
mod http;
mod kept;
mod limits;
mod memory;
mod metrics;
mod pages;
mod probes;
mod server;
mod settings;

use std::sync::Arc;
use std::time::Duration;

use shared::shutdown;
use socketioxide::SocketIo;
use socketioxide::adapter::Emitter;
use socketioxide::extract::TryData;
use socketioxide::handler::ConnectHandler;
use socketioxide_redis::RedisAdapterConfig;
use tokio::net::{TcpListener, UnixDatagram};

pub use app::RoomsApp;
pub use auth::{Grant, Rooms};
pub use cli::main;
pub use drain::DrainReport;
pub use drivers::RedisConnection;
pub(crate) use drivers::RedisLink;
pub use fleet::{Ack, App, Fleet, Io, Namespaces, Socket};
pub use limits::TooManyRooms;
/// The Redis client the fleet uses, for an app's own state ([`Fleet::redis`]).
pub use redis;
pub use settings::WorkerSettings;
/// The Socket.IO server the fleet runs: extractors (`Data`, `TryData`), operators, errors.
pub use socketioxide;

/// The Socket.IO adapter every fleet worker uses: socketioxide-redis over [`RedisLink`]. An
/// implementation detail: apps name [`Socket`], [`Ack`] and [`Io`] instead.
pub(crate) type FleetAdapter = adapter::FleetAdapter<Emitter>;

/// Why a worker could not start.
///
/// ```no_run
/// # async fn serve(settings: worker::WorkerSettings, l: tokio::net::TcpListener) {
/// if let Err(e) = worker::run(l, settings, worker::RoomsApp, async {}).await {
///     eprintln!("not started: {e}"); // e.g. "redis url: ..."
/// }
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The Redis URL is not usable.
    #[error("redis url: {0}")]
    RedisUrl(#[from] redis::RedisError),
    /// The Socket.IO namespace could not be set up.
    #[error("socket.io namespace setup: {0}")]
    Namespace(String),
    /// The `auth:` section is unusable (a key file, the backend's URL).
    #[error("{0}")]
    Auth(String),
}

/// Where a worker's connections come from: its port, and the channel from a supervising
/// balancer that hands it WebSocket connections (see `shared::handoff`).
///
/// ```no_run
/// # async fn f() -> std::io::Result<()> {
/// let tcp = tokio::net::TcpListener::bind("127.0.0.1:9001").await?;
/// let listener = worker::Listener { tcp, handoff: None }; // or `tcp.into()`
/// # let _ = listener; Ok(()) }
/// ```
pub struct Listener {
    /// The worker's port.
    pub tcp: TcpListener,
    /// The balancer's handoff channel, when it passed one.
    pub handoff: Option<UnixDatagram>,
}

impl From<TcpListener> for Listener {
    fn from(tcp: TcpListener) -> Self {
        Listener { tcp, handoff: None }
    }
}

/// Serve a worker on `listener` until `stop` resolves, then drain and return.
///
/// Redis may be down at start: the worker serves at once, reports not-ready on `/readyz`, and
/// subscribes when Redis appears.
///
/// # Errors
/// The settings are unusable; nothing was served.
///
/// ```no_run
/// # async fn serve() -> Result<(), Box<dyn std::error::Error>> {
/// let settings = worker::WorkerSettings::standalone(
///     "w9".into(), "127.0.0.1:9009".parse()?, "redis://127.0.0.1:6379".into());
/// let listener = tokio::net::TcpListener::bind(settings.listen).await?;
/// let stop = async { let _ = tokio::signal::ctrl_c().await; };
/// let report = worker::run(listener, settings, worker::RoomsApp, stop).await?;
/// println!("drained {} sessions", report.sessions);
/// # Ok(()) }
/// ```
pub async fn run(
    listener: impl Into<Listener>,
    settings: WorkerSettings,
    app: impl App,
    stop: impl Future<Output = ()>,
) -> Result<DrainReport, StartError> {
    let metrics = metrics::WorkerMetrics::new(&settings.id);
    // rustls needs one crypto provider for the process (rediss://); a second install is a no-op.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let link = RedisLink::new(&settings.redis, metrics.clone())?;
    let adapter_config = RedisAdapterConfig::new()
        .with_prefix(settings.redis.prefix.clone())
        .with_request_timeout(Duration::from_millis(settings.redis.request_timeout_ms));
    let (adapter_state, room_applier) = adapter::AdapterState::new(
        link.clone(),
        adapter_config,
        &settings.redis.prefix,
        metrics.clone(),
    );
    let room_channels = adapter_state.rooms().clone();
    let sio = &settings.socketio;
    let (svc, io) = SocketIo::builder()
        .req_path(sio.path.clone())
        .ping_interval(Duration::from_millis(sio.ping_interval_ms))
        .ping_timeout(Duration::from_millis(sio.ping_timeout_ms))
        .max_payload(sio.max_payload_bytes)
        // One cap for both transports, as Node's `maxHttpBufferSize`; tungstenite refuses a
        // frame from its header, before reading its payload, and the patched engineioxide
        // closes such a WebSocket with 1009.
        .ws_max_message_size(usize::try_from(sio.max_payload_bytes).unwrap_or(usize::MAX))
        .ws_max_frame_size(usize::try_from(sio.max_payload_bytes).unwrap_or(usize::MAX))
        .max_buffer_size(sio.max_buffer_packets)
        .ws_read_buffer_size(sio.ws_read_buffer_bytes)
        .with_adapter::<FleetAdapter>(adapter_state)
        .build_svc();

    let admission =
        Arc::new(auth::Gate::new(&settings.auth, &settings.rooms).map_err(StartError::Auth)?);
    if admission.is_open() {
        tracing::warn!("auth.mode none: anyone may connect, join and publish any room");
    }
    let registry = Arc::new(conn::ConnRegistry::default());
    let fleet = Fleet::new(
        &settings.id,
        io.clone(),
        metrics.clone(),
        link.clone(),
        room_channels.clone(),
        &sio.limits,
    );
    let namespaces = app.namespaces();
    let pages = app.static_dir();
    if namespaces.is_empty() || namespaces.iter().any(|p| !p.starts_with('/')) {
        return Err(StartError::Namespace(format!(
            "an app serves namespaces like \"/\" or \"/chat\", got {namespaces:?}"
        )));
    }
    let app = Arc::new(app);
    let ns_registry = Arc::clone(&registry);
    let ns_metrics = metrics.clone();
    let expiry = auth::Expiry::default();
    // Registering the namespace subscribes its channels (or queues them while Redis is down);
    // the link starts after, so "up" always means "every channel subscribed".
    // The app's handlers are registered in a connect middleware, not the connect handler:
    // socketioxide sends the CONNECT packet before it spawns the (async) connect handler, so
    // a client that emits at once on connect could otherwise beat the handler's `on(...)`
    // and lose the event. Middlewares run before the CONNECT packet is sent.
    // Authentication runs here too, before the CONNECT packet: a refused client never gets
    // a connected socket, and nothing of the app runs for it.
    let setup = async move |socket: Socket,
                            TryData(payload): TryData<serde_json::Value>|
                -> Result<(), auth::Refused> {
        let outcome = admission.admit(&socket, payload.ok().as_ref()).await;
        let result = outcome.as_ref().map_or_else(|o| *o, |_| auth::Outcome::Ok);
        ns_metrics.auth.with_label_values(&[result.as_str()]).inc();
        let grant = outcome.map_err(auth::Refused::auth)?;
        if let Some(user) = &grant.user {
            socket.join(auth::user_room(user));
        }
        socket.extensions.insert(grant);
        if fleet.limits_rooms() {
            socket.extensions.insert(fleet::RoomLock::default());
        }
        app.admit(&socket, &fleet).map_err(auth::Refused::app)?;
        bind_websocket_handshake(&ns_registry, &socket);
        app.on_connect(socket, &fleet);
        // The rooms joined so far (the user's, the app's) hear other workers' broadcasts
        // before the client is told it is connected.
        fleet.settled().await;
        Ok(())
    };
    // In its namespace now: the expiry schedule may look it up from here on.
    let ns_expiry = expiry.clone();
    let connected = async move |socket: Socket| {
        if let Some(exp) = Fleet::grant(&socket).expires {
            ns_expiry.add(&socket, exp);
        }
    };
    for path in namespaces {
        io.ns(
            path.clone(),
            ConnectHandler::with(connected.clone(), setup.clone()),
        )
        .await
        .map_err(|e| StartError::Namespace(format!("{path}: {e}")))?;
    }

    let (trigger, shutdown) = shutdown::channel();
    let readiness = health::Readiness::new(link.state());
    let gate = Arc::new(drain::DrainGate::new(
        Arc::clone(&registry),
        readiness.clone(),
    ));
    let api = if settings.api_key.is_empty() {
        None
    } else {
        let local = api::Local {
            fleet: Fleet::new(
                &settings.id,
                io.clone(),
                metrics.clone(),
                link.clone(),
                room_channels.clone(),
                &sio.limits,
            ),
            readiness: readiness.clone(),
            metrics: metrics.clone(),
        };
        let peers = api::Peers::start(link.clone(), &settings.redis.prefix, local.clone()).await;
        Some(api::Api::new(&settings.api_key, local, peers))
    };
    let ctx = Arc::new(http::HttpCtx {
        sio: svc,
        io: io.clone(),
        sio_path: sio.path.trim_end_matches('/').to_owned(),
        allow_eio3: sio.allow_eio3,
        events_per_sec: sio.limits.events_per_sec,
        cors: shared::cors::Cors::new(&sio.cors),
        api,
        pages,
        gate: Arc::clone(&gate),
        registry,
        readiness,
        metrics: metrics.clone(),
    });
    tokio::spawn(link.clone().run(shutdown.clone()));
    tokio::spawn(room_applier.run(shutdown.clone()));
    tokio::spawn(expiry.run(io.clone(), shutdown.clone()));
    tokio::spawn(probes::event_loop_lag(metrics.clone(), shutdown.clone()));
    tokio::spawn(memory::trim_freed(metrics.heap.clone(), shutdown.clone()));
    tokio::spawn(probes::pubsub_lag(
        link.clone(),
        settings.redis.prefix.clone(),
        settings.id.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(probes::redis_memory(
        link,
        metrics.clone(),
        shutdown.clone(),
    ));
    let listener = listener.into();
    tokio::spawn(server::serve(
        listener.tcp,
        listener.handoff.map(handoff::HandoffChannel::new),
        ctx,
        settings.max_connections,
        shutdown,
    ));
    tracing::info!(worker = %settings.id, "worker serving");

    stop.await;
    metrics.draining.set(1);
    let report = gate
        .drain(settings.drain_window, || {
            fleet::local_sids(&io)
                .into_iter()
                .map(|sid| sid.to_string())
                .collect()
        })
        .await;
    trigger.trigger();
    Ok(report)
}

/// A WebSocket-only client opens its session on the upgrade request itself (no `sid` in the
/// URL), so its connection is bound to the session here, once the id exists.
fn bind_websocket_handshake(registry: &conn::ConnRegistry, socket: &Socket) {
    let parts = socket.req_parts();
    let q = shared::eio_query::parse(parts.uri.query()).unwrap_or_default();
    if q.sid.is_none()
        && q.transport.as_deref() == Some("websocket")
        && let Some(id) = parts.extensions.get::<conn::ConnId>()
    {
        registry.bind_sid(*id, &socket.id.to_string());
    }
}
