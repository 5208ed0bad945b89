//! A chat, written as the fleet's workers run it: rooms with the last 50 lines kept in Redis
//! (every worker answers the same history), nicknames per socket, typing indicators, a member
//! list across workers, and an `/admin` namespace that can kick a user wherever they are.
//!
//! - [`chat`]: the `/` namespace.
//! - [`history`]: a room's last lines, in Redis.
//! - [`admin`]: the `/admin` namespace and who may use it.
//!
//! The page under `static/` tries it in a browser (through the balancer with
//! `balancer.forward_paths: ["/"]`).

pub mod admin;
pub mod chat;
pub mod history;

use std::path::PathBuf;

use worker::Namespaces;

/// The app: `/` and `/admin`, and the page.
pub fn app() -> Namespaces {
    let pages = std::env::var_os("CHAT_STATIC_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("static"));
    Namespaces::new()
        .on("/", chat::on_connect)
        .on("/admin", admin::on_connect)
        .admit("/admin", admin::admit)
        .pages(pages)
}
