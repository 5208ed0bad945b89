//! A room's last [`KEEP`] lines, in a Redis list per room: whichever worker a client joins
//! through answers the same history.

use serde_json::Value;
use worker::Fleet;
use worker::redis::AsyncCommands;

/// Lines kept per room.
pub const KEEP: isize = 50;
/// A room silent this long forgets its history, in seconds (room names are the clients').
const IDLE_TTL: i64 = 7 * 24 * 3600;

fn key(room: &str) -> String {
    format!("chat:history:{room}")
}

/// Appends `line` to `room`'s history, dropping what falls past [`KEEP`].
pub async fn push(fleet: &Fleet, room: &str, line: &Value) {
    let Some(mut redis) = fleet.redis() else {
        return; // Redis away: the line is delivered, not kept
    };
    let key = key(room);
    let _: Result<(), _> = worker::redis::pipe()
        .lpush(&key, line.to_string())
        .ltrim(&key, 0, KEEP - 1)
        .expire(&key, IDLE_TTL)
        .query_async(&mut redis)
        .await;
}

/// `room`'s history, oldest first (empty while Redis is away).
pub async fn lines(fleet: &Fleet, room: &str) -> Vec<Value> {
    let Some(mut redis) = fleet.redis() else {
        return Vec::new();
    };
    let raw: Vec<String> = redis
        .lrange(key(room), 0, KEEP - 1)
        .await
        .unwrap_or_default();
    raw.iter()
        .rev()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}
