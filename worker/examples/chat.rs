//! The smallest app of its own: everyone who says something is heard on every worker.
//!
//! As the balancer's workers: `workers.command: [target/release/examples/chat]` in the fleet
//! file. Alone: `cargo run -p worker --example chat -- --listen 127.0.0.1:9001 --redis
//! redis://127.0.0.1:6379 --id chat-1`. A complete app is `apps/chat`.

use worker::socketioxide::extract::Data;
use worker::{Fleet, Socket};

fn main() -> std::process::ExitCode {
    worker::main(|socket: Socket, fleet: &Fleet| {
        socket.join("chat");
        let fleet = fleet.clone();
        socket.on("say", async move |Data(text): Data<String>| {
            let _ = fleet.publish("chat".into(), "said", &text).await;
        });
    })
}
