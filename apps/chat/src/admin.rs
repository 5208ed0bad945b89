//! The `/admin` namespace: kick a nickname or a user off the chat, on whichever worker they
//! are. Admitted: a socket whose credentials say `"admin": true` (with `auth:` on), or whose
//! handshake carries `x-chat-admin-key: <CHAT_ADMIN_KEY>` (a header of its own: the fleet's
//! `Authorization` is the user's token). A key shorter than 16 bytes, or left at the deploy
//! files' `change-me` placeholder, admits no one.
//!
//! | admin emits | ack |
//! |---|---|
//! | `kick`, `{"nick"}` or `{"user"}` | `{"ok", "kicked": n}`: those sockets of `/` disconnected |

use serde_json::{Value, json};
use worker::socketioxide::extract::TryData;
use worker::{Ack, Fleet, Socket};

use crate::chat::{nick_room, refusal, reply};

/// Who may connect to `/admin`.
///
/// # Errors
/// Not an admin.
pub fn admit(socket: &Socket, _fleet: &Fleet) -> Result<(), String> {
    if Fleet::grant(socket).claims["admin"] == Value::Bool(true) {
        return Ok(());
    }
    let key = std::env::var("CHAT_ADMIN_KEY").unwrap_or_default();
    let usable = key.len() >= 16 && !key.starts_with("change-me");
    let given = socket
        .req_parts()
        .headers
        .get("x-chat-admin-key")
        .map(|v| [b"Bearer ".as_slice(), v.as_bytes()].concat());
    if usable && shared::api::authorized(given.as_deref(), &key) {
        Ok(())
    } else {
        Err("admins only".into())
    }
}

/// Registers the `/admin` handlers.
pub fn on_connect(socket: Socket, fleet: &Fleet) {
    let f = fleet.clone();
    socket.on(
        "kick",
        async move |TryData(who): TryData<Value>, ack: Ack| {
            let room = match who.ok().as_ref() {
                Some(Value::Object(o)) if o.get("nick").is_some_and(Value::is_string) => {
                    nick_room(o["nick"].as_str().unwrap_or_default())
                }
                Some(Value::Object(o)) if o.get("user").is_some_and(Value::is_string) => {
                    Fleet::user_room(o["user"].as_str().unwrap_or_default())
                }
                _ => return reply(ack, refusal(r#"kick {"nick"} or {"user"}"#)),
            };
            let Some(chat) = f.io().of("/") else {
                return reply(ack, refusal("no chat namespace"));
            };
            // Across workers: the adapter finds the sockets, and disconnects them where they are.
            let kicked = chat
                .clone()
                .within(room.clone())
                .fetch_sockets()
                .await
                .map_or(0, |s| s.len());
            match chat.within(room).disconnect().await {
                Ok(()) => reply(ack, json!({ "ok": true, "kicked": kicked })),
                Err(e) => reply(ack, refusal(&format!("kick failed: {e}"))),
            }
        },
    );
}
