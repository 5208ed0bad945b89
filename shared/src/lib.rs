//! What every fleet binary agrees on: the fleet YAML, metric names, backoff, shutdown and
//! the open-file limit.
//!
//! # Layout
//! - [`api`]: the server API's endpoints, key check (constant time) and body limit.
//! - [`config`]: `FleetConfig`, parsed and validated from the fleet YAML; errors name file, key, line.
//! - [`metrics`]: every metric and label name, as constants (the names are a contract).
//! - [`backoff`]: capped exponential backoff with random jitter; it only computes delays.
//! - [`clock`]: wall-clock microseconds, the timestamp fleet processes compare across processes.
//! - [`shutdown`]: a cloneable "stop now" signal over a `watch` channel.
//! - [`cors`]: the `socketio.cors` policy: headers for answers and preflights, origins admitted.
//! - [`eio_query`]: the Engine.IO query parameters (`sid`, `transport`), parsed and rewritten.
//! - [`protocol`]: the default app's event names and limits.
//! - [`handoff`]: passing a client's connection from the balancer to a worker (SCM_RIGHTS).
//! - [`fd_limit`]: the open-file limit, raised to the hard limit at start.
#![warn(missing_docs)]

pub mod api;
pub mod backoff;
pub mod clock;
pub mod config;
pub mod cors;
pub mod eio_query;
pub mod fd_limit;
pub mod handoff;
pub mod metrics;
pub mod protocol;
pub mod shutdown;
pub mod sticky_tag;

pub use backoff::Backoff;
pub use clock::unix_micros;
pub use config::{ConfigError, FleetConfig};
pub use shutdown::{Shutdown, ShutdownTrigger};
