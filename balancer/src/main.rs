//! `balancer --config FILE`: the one process a user starts per machine. It runs the workers
//! (unless told to attach to existing ones) and fronts them with sticky sessions.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use shared::FleetConfig;

// pingora allocates and frees several small objects per proxied request: with mimalloc a
// long-polling request costs the balancer 10-17% less CPU than with glibc's allocator, and a
// relayed WebSocket the same memory (13.5 KB); the price is ~12 MB more at start.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The fleet balancer: runs the workers of a fleet file and fronts them with sticky sessions.
///
/// Clients connect to `listen` (Socket.IO at /socket.io/); /metrics, /healthz, /readyz and /sd
/// answer on `metrics_listen`. SIGTERM: stop accepting, let the workers drain, exit within
/// balancer.grace_period_secs.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The fleet YAML file.
    #[arg(long, default_value = "deploy/fleet.yaml")]
    config: PathBuf,
}

fn main() -> ExitCode {
    balancer::logging::init();
    let args = Args::parse();
    let cfg = match FleetConfig::load(&args.config) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("balancer: {e}");
            return ExitCode::from(2);
        }
    };
    // Workers get an absolute path: they may resolve it from another directory.
    let path = std::fs::canonicalize(&args.config).unwrap_or(args.config);
    raise_fd_limit();
    tracing::info!(listen = %cfg.listen, metrics = %cfg.metrics_listen, workers = cfg.workers.count, "balancer starting");
    match balancer::serve(&cfg, path) {
        Ok(server) => server.run_forever(),
        Err(e) => {
            eprintln!("balancer: balancer.tls: {e}");
            ExitCode::from(2)
        }
    }
}

/// Raises the open-file limit to the hard limit (the workers it starts inherit it) and logs the
/// proxied connections it allows.
fn raise_fd_limit() {
    use shared::fd_limit::{BALANCER_FDS_PER_CONNECTION, raise_nofile};
    match raise_nofile() {
        Ok(limits) => tracing::info!(
            nofile = limits.soft,
            was = limits.was,
            connections = limits.connections(BALANCER_FDS_PER_CONNECTION),
            "open-file limit"
        ),
        Err(e) => tracing::warn!(cause = %e, "cannot raise the open-file limit"),
    }
}
