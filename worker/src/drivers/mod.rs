//! Pub/sub drivers for the socketioxide Redis adapter.

mod connection;
mod reconnecting;
mod target;

pub use connection::RedisConnection;
pub use reconnecting::{LinkState, RedisLink, Route, Sink};
