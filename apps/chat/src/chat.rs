//! The `/` namespace: a nickname per socket, rooms with history, lines, typing, members.
//!
//! | client emits | ack / effect |
//! |---|---|
//! | `nick`, name | `{"ok", "nick"}`; the socket is known by it (and in room `nick:<name>`) |
//! | `join`, room | `{"ok", "room", "history": [line, ...]}` (the last 50, oldest first) |
//! | `leave`, room | `{"ok", "room"}` |
//! | `say`, `{"room", "text"}` | `{"ok"}`; every member gets `line` `{"room", "nick", "text", "at"}` |
//! | `typing`, `{"room", "typing"}` | the other members get `typing` `{"room", "nick", "typing"}` |
//! | `members`, room (one it is in) | `{"room", "members": [{"nick"}]}` across all workers |
//!
//! Rooms follow the socket's permissions (`auth:`, `rooms:`): no `user:` room is joined or
//! left, and a room outside the claims is refused `forbidden`. Socket ids are never shown to
//! other clients (a socket's id is its session's id).

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::{Value, json};
use worker::redis::AsyncCommands;
use worker::socketioxide::extract::TryData;
use worker::{Ack, Fleet, Socket};

use crate::history;

/// A socket's nickname, kept in its extensions.
#[derive(Clone)]
pub struct Nick(pub String);

/// Longest nickname and room name, and line.
const MAX_NAME: usize = 32;
const MAX_TEXT: usize = 2000;
/// Rooms one socket may be in (besides its own).
const MAX_ROOMS: usize = 50;
/// How long a nickname entry lives in Redis, in seconds: a worker killed outright leaves
/// nothing behind for long.
const NICK_TTL: u64 = 24 * 3600;

/// A socket's nickname in Redis, for member lists across workers.
fn nick_key(sid: &str) -> String {
    format!("chat:nick:{sid}")
}

/// The socket's nickname (`anonymous` until it says one).
pub fn nick(socket: &Socket) -> String {
    socket
        .extensions
        .get::<Nick>()
        .map_or_else(|| "anonymous".to_owned(), |n| n.0)
}

/// The room every socket of a nickname is in: how `/admin` reaches it on any worker.
pub fn nick_room(nick: &str) -> String {
    format!("nick:{nick}")
}

/// Registers the `/` handlers on a new socket.
pub fn on_connect(socket: Socket, fleet: &Fleet) {
    let f = fleet.clone();
    socket.on(
        "nick",
        async move |s: Socket, TryData(name): TryData<String>, ack: Ack| {
            let Some(name) = name.ok().filter(|n| valid(n)) else {
                return reply(ack, refusal("a nickname is 1 to 32 characters"));
            };
            if let Some(Nick(old)) = s.extensions.get::<Nick>() {
                s.leave(nick_room(&old));
            }
            if let Err(too_many) = f.join(&s, nick_room(&name)).await {
                // The old nickname's room is left already.
                s.extensions.remove::<Nick>();
                return reply(ack, refusal(&too_many.to_string()));
            }
            s.extensions.insert(Nick(name.clone()));
            if let Some(mut redis) = f.redis() {
                let key = nick_key(&s.id.to_string());
                let _: Result<(), _> = redis.set_ex(key, &name, NICK_TTL).await;
            }
            reply(ack, json!({ "ok": true, "nick": name }));
        },
    );

    let f = fleet.clone();
    socket.on(
        "join",
        async move |s: Socket, TryData(room): TryData<String>, ack: Ack| {
            let Some(room) = room.ok().filter(|r| valid(r)) else {
                return reply(ack, refusal("a room is 1 to 32 characters"));
            };
            if room.starts_with("nick:") || !Fleet::grant(&s).may_join(&room) {
                f.count_forbidden("join");
                return reply(ack, refusal("forbidden"));
            }
            if s.rooms().len() > MAX_ROOMS {
                return reply(ack, refusal("in too many rooms: leave one first"));
            }
            if let Err(too_many) = f.join(&s, room.clone()).await {
                return reply(ack, refusal(&too_many.to_string()));
            }
            let history = history::lines(&f, &room).await;
            reply(ack, json!({ "ok": true, "room": room, "history": history }));
        },
    );

    socket.on(
        "leave",
        async |s: Socket, TryData(room): TryData<String>, ack: Ack| {
            let Ok(room) = room else {
                return reply(ack, refusal("which room?"));
            };
            if room.starts_with("nick:") || !Fleet::grant(&s).may_leave(&room) {
                return reply(ack, refusal("forbidden"));
            }
            s.leave(room.clone());
            reply(ack, json!({ "ok": true, "room": room }));
        },
    );

    let f = fleet.clone();
    socket.on(
        "say",
        async move |s: Socket, TryData(said): TryData<Said>, ack: Ack| {
            let Ok(Said { room, text }) = said else {
                return reply(ack, refusal(r#"say {"room", "text"}"#));
            };
            if !in_room(&s, &room) || text.is_empty() || text.len() > MAX_TEXT {
                return reply(
                    ack,
                    refusal("join the room first; a line is 1 to 2000 bytes"),
                );
            }
            if !Fleet::grant(&s).may_publish(&room) {
                f.count_forbidden("publish");
                return reply(ack, refusal("forbidden"));
            }
            let line = json!({ "room": room, "nick": nick(&s), "text": text, "at": now_ms() });
            history::push(&f, &room, &line).await;
            let _ = f.io().to(room).emit("line", &line).await;
            reply(ack, json!({ "ok": true }));
        },
    );

    socket.on("typing", async |s: Socket, TryData(t): TryData<Typing>| {
        // Only to a room it is in and may speak in.
        if let Ok(Typing { room, typing }) = t
            && in_room(&s, &room)
            && Fleet::grant(&s).may_publish(&room)
        {
            let note = json!({ "room": room, "nick": nick(&s), "typing": typing });
            let _ = s.to(room).emit("typing", &note).await;
        }
    });

    let f = fleet.clone();
    socket.on(
        "members",
        async move |s: Socket, TryData(room): TryData<String>, ack: Ack| {
            let Ok(room) = room else {
                return reply(ack, refusal("which room?"));
            };
            if !in_room(&s, &room) {
                return reply(ack, refusal("join the room first"));
            }
            reply(ack, members(&f, &room).await);
        },
    );

    let f = fleet.clone();
    socket.on_disconnect(async move |s: Socket| {
        if let Some(mut redis) = f.redis() {
            let _: Result<(), _> = redis.del(nick_key(&s.id.to_string())).await;
        }
    });
}

/// The room's members on every worker (the adapter asks them), by nickname.
async fn members(fleet: &Fleet, room: &str) -> Value {
    let sockets = match fleet.io().within(room.to_owned()).fetch_sockets().await {
        Ok(s) => s,
        Err(e) => return refusal(&format!("members unavailable: {e}")),
    };
    let keys: Vec<String> = sockets
        .iter()
        .map(|s| nick_key(&s.data().id.to_string()))
        .collect();
    let nicks: Vec<Option<String>> = match (fleet.redis(), keys.is_empty()) {
        (Some(mut redis), false) => worker::redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut redis)
            .await
            .unwrap_or_default(),
        _ => Vec::new(),
    };
    // Nicknames only: a socket's id is its session's id, not for other clients' eyes.
    let members: Vec<Value> = (0..keys.len())
        .map(|i| json!({ "nick": nicks.get(i).cloned().flatten() }))
        .collect();
    json!({ "room": room, "members": members })
}

fn in_room(socket: &Socket, room: &str) -> bool {
    socket.rooms().iter().any(|r| r.as_ref() == room)
}

#[derive(Deserialize)]
struct Said {
    room: String,
    text: String,
}

#[derive(Deserialize)]
struct Typing {
    room: String,
    typing: bool,
}

fn valid(name: &str) -> bool {
    !name.is_empty() && name.chars().count() <= MAX_NAME
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Acknowledge if the client asked for it.
pub fn reply(ack: Ack, value: Value) {
    let _ = ack.send(&value);
}

/// `{"ok": false, "error"}`.
pub fn refusal(why: &str) -> Value {
    json!({ "ok": false, "error": why })
}
