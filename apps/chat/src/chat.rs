//! The `/` namespace: a nickname per socket, rooms with history, lines, typing, members.
//!
//! | client emits | ack / effect |
//! |---|---|
//! | `nick`, name | `{"ok", "nick"}`; the socket is known by it (and in room `nick:<name>`) |
//! | `join`, room | `{"ok", "room", "history": [line, ...]}` (the last 50, oldest first) |
//! | `leave`, room | `{"ok", "room"}` |
//! | `say`, `{"room", "text"}` | `{"ok"}`; every member gets `line` `{"room", "nick", "text", "at"}` |
//! | `typing`, `{"room", "typing"}` | the other members get `typing` `{"room", "nick", "typing"}` |
//! | `members`, room | `{"room", "members": [{"sid", "nick"}]}` across all workers |

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

/// Nicknames by socket id, for member lists across workers.
const NICKS: &str = "chat:nicks";
/// Longest nickname and room name, and line.
const MAX_NAME: usize = 32;
const MAX_TEXT: usize = 2000;

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
            s.extensions.insert(Nick(name.clone()));
            s.join(nick_room(&name));
            if let Some(mut redis) = f.redis() {
                let _: Result<(), _> = redis.hset(NICKS, s.id.to_string(), &name).await;
            }
            reply(ack, json!({ "ok": true, "nick": name }));
        },
    );

    let f = fleet.clone();
    socket.on(
        "join",
        async move |s: Socket, TryData(room): TryData<String>, ack: Ack| {
            let Some(room) = room.ok().filter(|r| valid(r) && !r.starts_with("nick:")) else {
                return reply(ack, refusal("a room is 1 to 32 characters"));
            };
            s.join(room.clone());
            let history = history::lines(&f, &room).await;
            reply(ack, json!({ "ok": true, "room": room, "history": history }));
        },
    );

    socket.on(
        "leave",
        async |s: Socket, TryData(room): TryData<String>, ack: Ack| {
            let Some(room) = room.ok().filter(|r| !r.starts_with("nick:")) else {
                return reply(ack, refusal("which room?"));
            };
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
            if !s.rooms().contains(&room.clone().into()) || text.is_empty() || text.len() > MAX_TEXT
            {
                return reply(
                    ack,
                    refusal("join the room first; a line is 1 to 2000 bytes"),
                );
            }
            let line = json!({ "room": room, "nick": nick(&s), "text": text, "at": now_ms() });
            history::push(&f, &room, &line).await;
            let _ = f.io().to(room).emit("line", &line).await;
            reply(ack, json!({ "ok": true }));
        },
    );

    socket.on("typing", async |s: Socket, TryData(t): TryData<Typing>| {
        if let Ok(Typing { room, typing }) = t {
            let note = json!({ "room": room, "nick": nick(&s), "typing": typing });
            let _ = s.to(room).emit("typing", &note).await;
        }
    });

    let f = fleet.clone();
    socket.on(
        "members",
        async move |TryData(room): TryData<String>, ack: Ack| {
            let Ok(room) = room else {
                return reply(ack, refusal("which room?"));
            };
            reply(ack, members(&f, &room).await);
        },
    );

    let f = fleet.clone();
    socket.on_disconnect(async move |s: Socket| {
        if let Some(mut redis) = f.redis() {
            let _: Result<(), _> = redis.hdel(NICKS, s.id.to_string()).await;
        }
    });
}

/// The room's members on every worker (the adapter asks them), with their nicknames.
async fn members(fleet: &Fleet, room: &str) -> Value {
    let sockets = match fleet.io().within(room.to_owned()).fetch_sockets().await {
        Ok(s) => s,
        Err(e) => return refusal(&format!("members unavailable: {e}")),
    };
    let sids: Vec<String> = sockets.iter().map(|s| s.data().id.to_string()).collect();
    let nicks: Vec<Option<String>> = match (fleet.redis(), sids.is_empty()) {
        (Some(mut redis), false) => worker::redis::cmd("HMGET")
            .arg(NICKS)
            .arg(&sids)
            .query_async(&mut redis)
            .await
            .unwrap_or_default(),
        _ => Vec::new(),
    };
    let members: Vec<Value> = sids
        .iter()
        .enumerate()
        .map(|(i, sid)| json!({ "sid": sid, "nick": nicks.get(i).cloned().flatten() }))
        .collect();
    json!({ "room": room, "members": members })
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
