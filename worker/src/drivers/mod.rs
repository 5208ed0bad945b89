//! Pub/sub drivers for the socketioxide Redis adapter.

mod reconnecting;

pub use reconnecting::{LinkState, RedisLink, Route, Sink};
