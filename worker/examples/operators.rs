//! The default rooms app plus one event per Socket.IO server operator, each acting across
//! every worker: what `tests/test_room_channels.py` drives to check that the fleet's adapter
//! keeps them all working (room broadcasts travel on per-room channels, the rest on the
//! namespace's common channel).
//!
//! Events (each acknowledged with its result): `op:emit_all` data → `all` to every socket;
//! `op:emit_rooms` `{rooms, data}` → `multi` to the union of the rooms; `op:fetch` room → the
//! members' ids; `op:ask` room → every member's answer to `ask`; `op:add` / `op:del`
//! `{room, target}` → the room's members join / leave `target`; `op:disconnect` room; `op:rooms`
//! → every room of the namespace.

use std::time::Duration;

use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use worker::socketioxide::extract::{Data, TryData};
use worker::{Ack, App, Fleet, RoomsApp, Socket};

fn main() -> std::process::ExitCode {
    worker::main(|socket: Socket, fleet: &Fleet| {
        RoomsApp.on_connect(socket.clone(), fleet);
        operators(&socket, fleet);
    })
}

#[derive(Deserialize)]
struct ToRooms {
    rooms: Vec<String>,
    data: Value,
}

#[derive(Deserialize)]
struct Move {
    room: String,
    target: String,
}

fn done<E: std::fmt::Display>(res: Result<Value, E>) -> Value {
    match res {
        Ok(v) => json!({ "ok": true, "result": v }),
        Err(e) => json!({ "ok": false, "error": e.to_string() }),
    }
}

fn operators(socket: &Socket, fleet: &Fleet) {
    let io = fleet.io().clone();
    socket.on(
        "op:emit_all",
        async move |Data(data): Data<Value>, ack: Ack| {
            let res = io.emit("all", &data).await.map(|()| Value::Null);
            let _ = ack.send(&done(res));
        },
    );
    let io = fleet.io().clone();
    socket.on(
        "op:emit_rooms",
        async move |Data(ToRooms { rooms, data }): Data<ToRooms>, ack: Ack| {
            let res = io
                .to(rooms)
                .emit("multi", &data)
                .await
                .map(|()| Value::Null);
            let _ = ack.send(&done(res));
        },
    );
    let io = fleet.io().clone();
    socket.on(
        "op:fetch",
        async move |Data(room): Data<String>, ack: Ack| {
            let res = io.within(room).fetch_sockets().await.map(|sockets| {
                sockets
                    .iter()
                    .map(|s| Value::from(s.data().id.to_string()))
                    .collect()
            });
            let _ = ack.send(&done(res));
        },
    );
    let io = fleet.io().clone();
    socket.on("op:ask", async move |Data(room): Data<String>, ack: Ack| {
        let asked = io
            .to(room)
            .timeout(Duration::from_secs(3))
            .emit_with_ack::<_, Value>("ask", &())
            .await;
        let res = match asked {
            Ok(stream) => Ok(stream
                .filter_map(async |(_, answer)| answer.ok())
                .collect::<Vec<Value>>()
                .await
                .into()),
            Err(e) => Err(e),
        };
        let _ = ack.send(&done(res));
    });
    let io = fleet.io().clone();
    socket.on(
        "op:add",
        async move |Data(Move { room, target }): Data<Move>, ack: Ack| {
            let res = io.within(room).join(target).await.map(|()| Value::Null);
            let _ = ack.send(&done(res));
        },
    );
    let io = fleet.io().clone();
    socket.on(
        "op:del",
        async move |Data(Move { room, target }): Data<Move>, ack: Ack| {
            let res = io.within(room).leave(target).await.map(|()| Value::Null);
            let _ = ack.send(&done(res));
        },
    );
    let io = fleet.io().clone();
    socket.on(
        "op:disconnect",
        async move |Data(room): Data<String>, ack: Ack| {
            let res = io.within(room).disconnect().await.map(|()| Value::Null);
            let _ = ack.send(&done(res));
        },
    );
    let io = fleet.io().clone();
    socket.on(
        "op:rooms",
        async move |TryData(_): TryData<Value>, ack: Ack| {
            let res = io
                .rooms()
                .await
                .map(|rooms| rooms.iter().map(|r| Value::from(r.to_string())).collect());
            let _ = ack.send(&done(res));
        },
    );
}
