//! A worker serving your own events instead of the default rooms app: everyone who says
//! something in "chat" is heard on every worker of the fleet.
//!
//! Run: `cargo run -p worker --example chat -- 127.0.0.1:9001 redis://127.0.0.1:6379 chat-1`

use socketioxide::extract::Data;
use worker::{Fleet, Socket, WorkerSettings};

fn chat(socket: Socket, fleet: &Fleet) {
    socket.join("chat");
    let fleet = fleet.clone();
    socket.on("say", async move |Data(text): Data<String>| {
        fleet.count_event("say");
        let _ = fleet.publish("chat".into(), "said", &text).await;
    });
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let listen = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:9001".into())
        .parse()?;
    let redis = args
        .next()
        .unwrap_or_else(|| "redis://127.0.0.1:6379".into());
    let id = args.next().unwrap_or_else(|| "chat-1".into());
    let settings = WorkerSettings::standalone(id, listen, redis);
    let listener = tokio::net::TcpListener::bind(settings.listen).await?;
    let stop = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    worker::run(listener, settings, chat, stop).await?;
    Ok(())
}
