//! The default app's wire protocol: event names and limits shared by worker, tests and tools.

/// Client → server: ack `{"worker": id, "sid": socket id}`.
pub const EV_WHOAMI: &str = "whoami";
/// Client → server: ack with the same value.
pub const EV_ECHO: &str = "echo";
/// Client → server: join a room (string); ack `{"ok": true, "room": room}`.
pub const EV_JOIN: &str = "join";
/// Client → server: leave a room (string); ack `{"ok": true, "room": room}`.
pub const EV_LEAVE: &str = "leave";
/// Client → server: `{"room", "data"}`, broadcast as [`EV_MESSAGE`] to every member.
pub const EV_PUBLISH: &str = "publish";
/// Server → client: `{"room", "data"}`.
pub const EV_MESSAGE: &str = "message";
/// The longest room name accepted, in bytes.
pub const MAX_ROOM_BYTES: usize = 256;

/// Header the balancer puts on every request it sends a worker (replacing any the client
/// sent): the client's address as the balancer judged it (`balancer.trusted_proxies` applied).
/// Workers pass it to an auth backend as `address`.
pub const CLIENT_IP_HEADER: &str = "x-fleet-client-ip";
