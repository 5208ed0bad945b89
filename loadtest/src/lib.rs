//! The fleet's Socket.IO load generator.
//!
//! # Layout
//! - [`scenario`]: what to run (YAML + flags), checked up front.
//! - [`protocol`]: Engine.IO / Socket.IO text packets.
//! - [`transport`]: one connection: WebSocket, polling, or polling upgraded.
//! - [`client`]: one simulated client: connect, whoami, join, publish, count deliveries.
//! - [`stats`]: counters, HDR histograms, exactly-once bookkeeping, mergeable snapshots.
//! - [`events`]: the optional per-event log (joins, drops, acks, first receipts).
//! - [`run`]: one process's share of the clients, phase by phase.
//! - [`procs`]: one process or several, with the live line; [`report`]: table, JSON, verdict.
#![warn(missing_docs)]

pub mod client;
pub mod events;
pub mod procs;
pub mod protocol;
pub mod report;
pub mod run;
pub mod scenario;
pub mod stats;
pub mod transport;
