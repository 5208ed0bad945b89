//! The command line of every worker binary, the default one and any app's: flags, settings,
//! logging, the open-file limit, the balancer's handoff channel, signals and drain. An app's
//! whole `main` is `worker::main(app)`.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::{App, Listener, WorkerSettings};
use clap::{CommandFactory, FromArgMatches, Parser};
use shared::FleetConfig;
use tokio::signal::unix::{SignalKind, signal};

/// A fleet worker: a Socket.IO server whose room broadcasts reach every worker through Redis.
///
/// Two ways to run it:
///
///   worker --config fleet.yaml --index 2     worker 2 of a fleet file (what the balancer runs)
///
///   worker --listen 0.0.0.0:9001 --redis redis://10.0.0.5:6379 --id hostA-1
///                                            a standalone worker (workers on other hosts);
///                                            the URL may come from FLEET_REDIS_URL instead
///
///   worker --listen 0.0.0.0:9001 --id hostA-1 --config fleet.yaml
///                                            standalone, with the fleet file's auth, rooms,
///                                            socketio, api and redis settings
///
/// One port serves Socket.IO (/socket.io/), /metrics, /healthz and /readyz, and the server
/// API under /api/ when a key is set (api.key, or FLEET_API_KEY for a standalone worker). SIGTERM or SIGINT
/// drains: clients are moved off over the drain window, then the process exits 0; a second
/// signal exits at once.
#[derive(Debug, Parser)]
#[command(version, verbatim_doc_comment)]
struct Args {
    /// The fleet YAML file. With --index, that worker of it; with --listen and --id, a
    /// standalone worker taking every other setting from it (auth, rooms, socketio, api, redis).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Which worker of the fleet file to run (0-based); listens on base_port + index.
    #[arg(long, requires = "config", conflicts_with_all = ["listen", "id"])]
    index: Option<u32>,
    /// Standalone: the address to listen on.
    #[arg(long, requires = "id")]
    listen: Option<SocketAddr>,
    /// Standalone: the Redis URL (redis://[:password@]host:port). Default: $FLEET_REDIS_URL,
    /// which keeps a password off the command line.
    #[arg(long, requires = "listen")]
    redis: Option<String>,
    /// Standalone: this worker's id, unique in the fleet (shown by whoami and in metrics).
    #[arg(long, requires = "listen")]
    id: Option<String>,
    /// Standalone: the drain window in seconds (default 10).
    #[arg(long, requires = "listen")]
    drain_window_secs: Option<u64>,
    /// Standalone: the pub/sub channel prefix; must match the other workers' (default "fleet").
    #[arg(long, requires = "listen")]
    prefix: Option<String>,
}

/// The flags, with `--help` and errors naming this program (an app's binary, not `worker`).
fn parse_args() -> Result<Args, String> {
    let program = std::env::args()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "worker".into());
    let matches = Args::command().name(program).get_matches();
    Args::from_arg_matches(&matches).map_err(|e| e.to_string())
}

fn settings(args: Args) -> Result<WorkerSettings, String> {
    match (args.config, args.index, args.listen, args.redis, args.id) {
        (Some(file), Some(index), ..) => {
            let cfg = FleetConfig::load(&file).map_err(|e| e.to_string())?;
            WorkerSettings::from_fleet(&cfg, index)
        }
        (file, None, Some(listen), redis, Some(id)) => {
            let from_file = match file {
                Some(file) => Some(FleetConfig::load(&file).map_err(|e| e.to_string())?),
                None => None,
            };
            let redis = redis
                .or_else(|| std::env::var("FLEET_REDIS_URL").ok())
                .or_else(|| from_file.as_ref().map(|c| c.redis.url.clone()))
                .ok_or("--listen needs --redis URL, the URL in FLEET_REDIS_URL, or --config FILE")?;
            shared::config::validate_redis_url(&redis).map_err(|e| format!("--redis: {e}"))?;
            let mut s = match &from_file {
                Some(cfg) => WorkerSettings::standalone_from(cfg, id, listen, redis),
                None => WorkerSettings::standalone(id, listen, redis),
            };
            if !s.api_key.is_empty() && s.api_key.len() < 16 {
                return Err("FLEET_API_KEY: must be at least 16 bytes".into());
            }
            if let Some(secs) = args.drain_window_secs {
                s.drain_window = std::time::Duration::from_secs(secs);
            }
            if let Some(prefix) = args.prefix {
                s.redis.prefix = prefix;
            }
            Ok(s)
        }
        _ => Err("give either --config FILE --index I, or --listen ADDR --id NAME with --redis URL or --config FILE (see --help)".into()),
    }
}

/// Runs a worker binary serving `app`: the same command line as `worker` (`--config FILE
/// --index I` as the balancer runs it, or standalone `--listen --redis --id`; `--help`), the
/// same logging (`RUST_LOG`), open-file limit, WebSocket handoff from a supervising balancer,
/// metrics, health and drain on SIGTERM. Returns the process's exit code.
///
/// ```no_run
/// use worker::{Fleet, Socket};
///
/// fn main() -> std::process::ExitCode {
///     worker::main(|socket: Socket, _fleet: &Fleet| {
///         socket.on("ping", async |ack: worker::Ack| {
///             let _ = ack.send("pong");
///         });
///     })
/// }
/// ```
pub fn main(app: impl App) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("worker: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(serve(app))
}

async fn serve(app: impl App) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(log_filter())
        .with_target(false)
        .with_ansi(std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        // An app that set up its own logging first keeps it.
        .try_init()
        .ok();
    let settings = match parse_args().and_then(settings) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("worker: {e}");
            return ExitCode::from(2);
        }
    };
    raise_fd_limit(settings.max_connections);
    let listener = match tokio::net::TcpListener::bind(settings.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("worker: cannot listen on {}: {e}", settings.listen);
            return ExitCode::from(1);
        }
    };
    let handoff = match shared::handoff::inherited() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("worker: the balancer's handoff channel: {e}");
            return ExitCode::from(1);
        }
    };
    // No Redis URL here: it may carry a password (the Redis link logs it redacted).
    tracing::info!(id = %settings.id, listen = %settings.listen, handoff = handoff.is_some(), "starting");
    let listener = Listener {
        tcp: listener,
        handoff,
    };
    match crate::run(listener, settings, app, stop_signal()).await {
        Ok(report) => {
            tracing::info!(
                sessions = report.sessions,
                took_ms = report.took.as_millis() as u64,
                "drained, exiting"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("worker: {e}");
            ExitCode::from(1)
        }
    }
}

/// `RUST_LOG`, or `info` with socketioxide's warnings. socketioxide logs CONNECT payloads
/// (tokens) and packets at debug: they are capped at info whatever `RUST_LOG` says.
fn log_filter() -> tracing_subscriber::EnvFilter {
    match tracing_subscriber::EnvFilter::try_from_default_env() {
        Ok(asked) => asked
            .add_directive("socketioxide=info".parse().expect("static directive"))
            .add_directive("engineioxide=info".parse().expect("static directive")),
        // The Redis client logs every failed attempt to reach a lost cluster node; the link
        // says once what happened and what it waits for.
        Err(_) => "info,socketioxide=warn,engineioxide=warn,redis=error".into(),
    }
}

/// Raises the open-file limit to the hard limit, logs the clients it allows, and warns when
/// `workers.max_connections` is more than that (accepts would fail with EMFILE first).
fn raise_fd_limit(max_connections: usize) {
    use shared::fd_limit::{WORKER_FDS_PER_CLIENT, raise_nofile};
    match raise_nofile() {
        Ok(limits) => {
            let clients = limits.connections(WORKER_FDS_PER_CLIENT);
            tracing::info!(
                nofile = limits.soft,
                was = limits.was,
                clients,
                "open-file limit"
            );
            if max_connections as u64 > clients {
                tracing::warn!(
                    max_connections,
                    clients,
                    nofile = limits.soft,
                    "workers.max_connections is more than the open-file limit allows: raise the hard limit (ulimit -Hn, LimitNOFILE=, ulimits: nofile)"
                );
            }
        }
        Err(e) => tracing::warn!(cause = %e, "cannot raise the open-file limit"),
    }
}

/// Resolves on the first SIGTERM or SIGINT; a second one ends the process at once.
async fn stop_signal() {
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler installs");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = int.recv() => tracing::info!("SIGINT: draining"),
    }
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("second signal: exiting without finishing the drain");
        std::process::exit(130);
    });
}
