//! fleet patch: a session's message gate.
//!
//! A [`Gate`] put in the extensions of the request that opens a session (the handshake, or a
//! WebSocket-only upgrade) is asked about every message the client sends, on either transport,
//! before the handler sees it, and is told when the session's WebSocket is closed for a
//! message over `ws_max_message_size` / `ws_max_frame_size`.

use std::sync::Arc;

use engineioxide_core::Str;

/// What decides a session's messages. Calls for one session come in the order its messages
/// arrived.
pub trait MessageGate: Send + Sync + 'static {
    /// Whether this text message reaches the handler.
    fn admit_text(&self, msg: &Str) -> bool;
    /// Whether this binary message reaches the handler.
    fn admit_binary(&self, data: &[u8]) -> bool;
    /// The WebSocket was closed with 1009 (Message Too Big).
    fn message_too_big(&self);
}

/// The request extension carrying a session's [`MessageGate`].
#[derive(Clone)]
pub struct Gate(pub Arc<dyn MessageGate>);

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Gate")
    }
}

pub(crate) fn of(parts: &http::request::Parts) -> Option<&dyn MessageGate> {
    parts.extensions.get::<Gate>().map(|g| &*g.0)
}

pub(crate) fn admits_text(parts: &http::request::Parts, msg: &Str) -> bool {
    of(parts).is_none_or(|g| g.admit_text(msg))
}

pub(crate) fn admits_binary(parts: &http::request::Parts, data: &[u8]) -> bool {
    of(parts).is_none_or(|g| g.admit_binary(data))
}
