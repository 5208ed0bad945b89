//! Stateless stickiness: the worker is named inside the Engine.IO sid the client echoes back,
//! the way HAProxy's `cookie prefix` mode tags an application cookie. Pure codecs only.

pub mod open_packet;

pub use shared::sticky_tag as tag;
pub use tag::{Tag, TaggedSid};
