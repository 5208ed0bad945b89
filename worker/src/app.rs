//! The default rooms app: whoami, echo, join, leave, publish → message, within each socket's
//! permissions (see [`crate::auth`]). Its protocol is a contract spoken by the load tester, the
//! tests and outside tools.

use serde_json::{Value, json};
use shared::protocol::{
    EV_ECHO, EV_JOIN, EV_LEAVE, EV_MESSAGE, EV_PUBLISH, EV_WHOAMI, MAX_ROOM_BYTES,
};
use socketioxide::extract::TryData;

use crate::auth::Grant;
use crate::fleet::{Ack, App, Fleet, Socket};

/// The default app. Plug your own [`App`] into [`crate::run`] instead to serve your events.
///
/// ```no_run
/// fn main() -> std::process::ExitCode {
///     worker::main(worker::RoomsApp) // the `worker` binary itself
/// }
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct RoomsApp;

type Arg = TryData<Value>;

impl App for RoomsApp {
    fn on_connect(&self, socket: Socket, fleet: &Fleet) {
        let f = fleet.clone();
        socket.on(EV_WHOAMI, async move |s: Socket, ack: Ack| {
            f.count_event(EV_WHOAMI);
            let user = Fleet::grant(&s).user;
            reply(
                ack,
                json!({ "worker": f.worker_id(), "sid": s.id.to_string(), "user": user }),
            );
        });
        let f = fleet.clone();
        socket.on(EV_ECHO, async move |TryData(arg): Arg, ack: Ack| {
            f.count_event(EV_ECHO);
            reply(ack, arg.unwrap_or(Value::Null));
        });
        on_room(&socket, fleet, EV_JOIN, Grant::may_join);
        on_room(&socket, fleet, EV_LEAVE, Grant::may_leave);
        let f = fleet.clone();
        socket.on(
            EV_PUBLISH,
            async move |s: Socket, TryData(arg): Arg, ack: Ack| {
                f.count_event(EV_PUBLISH);
                let (room, data) = match publish_arg(arg.ok()) {
                    Ok(parts) => parts,
                    Err(why) => return reply(ack, refusal(why)),
                };
                if !Fleet::grant(&s).may_publish(&room) {
                    f.count_forbidden(EV_PUBLISH);
                    return reply(ack, refusal(FORBIDDEN));
                }
                let message = json!({ "room": room, "data": data });
                reply(
                    ack,
                    match f.publish(room, EV_MESSAGE, &message).await {
                        Ok(0) => json!({ "ok": true }),
                        Ok(dropped) => json!({ "ok": true, "dropped": dropped }),
                        Err(e) => refusal(format!("broadcast failed: {e}")),
                    },
                );
            },
        );
    }
}

/// `join` and `leave`: validate the room, check `allowed`, apply it, acknowledge
/// `{"ok": true, "room"}`; a room outside the socket's permissions is acknowledged
/// `{"ok": false, "error": "forbidden"}`, a join past `socketio.limits.max_rooms_per_socket`
/// `{"ok": false, "error": "too many rooms"}`, and nothing is done.
fn on_room(socket: &Socket, fleet: &Fleet, event: &'static str, allowed: fn(&Grant, &str) -> bool) {
    let f = fleet.clone();
    socket.on(
        event,
        async move |s: Socket, TryData(arg): Arg, ack: Ack| {
            f.count_event(event);
            reply(
                ack,
                match room_arg(arg.ok()) {
                    Ok(room) if !allowed(&Fleet::grant(&s), &room) => {
                        f.count_forbidden(event);
                        refusal(FORBIDDEN)
                    }
                    // A join is acknowledged once other workers' broadcasts reach it.
                    Ok(room) if event == EV_JOIN => match f.join(&s, room.clone()).await {
                        Ok(()) => json!({ "ok": true, "room": room }),
                        Err(too_many) => refusal(too_many.to_string()),
                    },
                    Ok(room) => {
                        s.leave(room.clone());
                        json!({ "ok": true, "room": room })
                    }
                    Err(why) => refusal(why),
                },
            );
        },
    );
}

/// The refusal of a room outside a socket's permissions.
const FORBIDDEN: &str = "forbidden";

/// Acknowledge if the client asked for it; a client that went away is not an error.
fn reply(ack: Ack, value: Value) {
    let _ = ack.send(&value);
}

fn refusal(why: impl Into<String>) -> Value {
    json!({ "ok": false, "error": why.into() })
}

/// A room argument: a non-empty string of at most [`MAX_ROOM_BYTES`] bytes.
pub fn room_arg(arg: Option<Value>) -> Result<String, String> {
    match arg {
        Some(Value::String(room)) => check_room(room),
        None | Some(Value::Null) => Err("missing room".into()),
        Some(other) => Err(format!("room must be a string, got {}", kind(&other))),
    }
}

/// A publish argument: `{"room": string, "data": any}`.
pub fn publish_arg(arg: Option<Value>) -> Result<(String, Value), String> {
    let Some(Value::Object(mut obj)) = arg else {
        return Err(r#"publish expects {"room": string, "data": any}"#.into());
    };
    let room = match obj.remove("room") {
        Some(Value::String(room)) => check_room(room)?,
        None | Some(Value::Null) => return Err("missing room".into()),
        Some(other) => return Err(format!("room must be a string, got {}", kind(&other))),
    };
    let data = obj
        .remove("data")
        .ok_or_else(|| "missing data".to_owned())?;
    Ok((room, data))
}

fn check_room(room: String) -> Result<String, String> {
    if room.is_empty() {
        Err("room must not be empty".into())
    } else if room.len() > MAX_ROOM_BYTES {
        Err(format!(
            "room is {} bytes, the limit is {MAX_ROOM_BYTES}",
            room.len()
        ))
    } else {
        Ok(room)
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_rules() {
        assert_eq!(room_arg(Some(json!("a"))), Ok("a".into()));
        assert!(room_arg(None).is_err());
        assert!(room_arg(Some(json!(3))).unwrap_err().contains("a number"));
        assert!(room_arg(Some(json!(""))).is_err());
        assert!(room_arg(Some(json!("x".repeat(256)))).is_ok());
        assert!(
            room_arg(Some(json!("x".repeat(257))))
                .unwrap_err()
                .contains("257")
        );
    }

    #[test]
    fn publish_rules() {
        assert_eq!(
            publish_arg(Some(json!({"room": "r", "data": null}))),
            Ok(("r".into(), Value::Null))
        );
        assert_eq!(
            publish_arg(Some(json!({"room": "r"}))),
            Err("missing data".into())
        );
        assert!(publish_arg(Some(json!({"data": 1}))).is_err());
        assert!(publish_arg(Some(json!(["r", 1]))).is_err());
        assert!(publish_arg(Some(json!({"room": ["r"], "data": 1}))).is_err());
    }
}
