//! Pub/sub drivers for the socketioxide Redis adapter.

mod reconnecting;
mod target;

pub use reconnecting::{LinkState, RedisLink, Route, Sink};
