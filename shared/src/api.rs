//! The server API's common ground: how a caller is recognised, the endpoints and their metric
//! labels, and the body limit. The balancer serves the API for the whole fleet by asking each
//! worker's own `/api/` for its part ([`SCOPE_LOCAL`]) and adding the answers up.

use subtle::ConstantTimeEq;

/// The most members a rooms answer lists (its `count` is exact; `"members_truncated": true`
/// says some were left out). Keeps one answer, and a worker's answer over Redis, bounded.
pub const MAX_MEMBERS: usize = 10_000;

/// The largest request body accepted; larger ones are answered 413.
pub const MAX_BODY: usize = 1024 * 1024;

/// `POST /api/publish`: `{"room" | "rooms", "data"}`.
pub const PUBLISH: &str = "/api/publish";
/// `GET /api/rooms/<room>`: the room's members.
pub const ROOMS_PREFIX: &str = "/api/rooms/";
/// `POST /api/disconnect`: `{"user"}` or `{"sid"}`.
pub const DISCONNECT: &str = "/api/disconnect";
/// `GET /api/info`: workers, connections, Redis.
pub const INFO: &str = "/api/info";

/// The query that asks a worker for its own part only (`/api/rooms/r?scope=local`): what the
/// balancer sends each worker before adding the answers up.
pub const SCOPE_LOCAL: &str = "scope=local";

/// One API endpoint: the `endpoint` label of `fleet_balancer_api_requests_total`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /api/publish`.
    Publish,
    /// `GET /api/rooms/<room>`, with the room (percent-decoded).
    Rooms(String),
    /// `POST /api/disconnect`.
    Disconnect,
    /// `GET /api/info`.
    Info,
}

impl Endpoint {
    /// The endpoint a path names, if any; the method is checked by [`Endpoint::method`].
    pub fn parse(path: &str) -> Option<Endpoint> {
        match path {
            PUBLISH => Some(Endpoint::Publish),
            DISCONNECT => Some(Endpoint::Disconnect),
            INFO => Some(Endpoint::Info),
            _ => {
                let room = path.strip_prefix(ROOMS_PREFIX)?;
                let room = percent_decode(room)?;
                (!room.is_empty()).then_some(Endpoint::Rooms(room))
            }
        }
    }

    /// The method it takes.
    pub fn method(&self) -> &'static str {
        match self {
            Endpoint::Publish | Endpoint::Disconnect => "POST",
            Endpoint::Rooms(_) | Endpoint::Info => "GET",
        }
    }

    /// The label value.
    pub fn label(&self) -> &'static str {
        match self {
            Endpoint::Publish => "publish",
            Endpoint::Rooms(_) => "rooms",
            Endpoint::Disconnect => "disconnect",
            Endpoint::Info => "info",
        }
    }
}

/// The label of requests that name no endpoint.
pub const OTHER_LABEL: &str = "other";

/// Whether an `Authorization` header carries `Bearer <key>`; compared in constant time, so the
/// answer's timing says nothing about how much of a guess was right. An empty key admits no one.
pub fn authorized(authorization: Option<&[u8]>, key: &str) -> bool {
    let Some(given) = authorization.and_then(|h| h.strip_prefix(b"Bearer ")) else {
        return false;
    };
    !key.is_empty() && bool::from(given.ct_eq(key.as_bytes()))
}

/// One rooms answer from several workers' (`{"count", "members"}` each): the counts added,
/// the members listed up to [`MAX_MEMBERS`].
pub fn merge_rooms<'a>(
    room: &str,
    answers: impl IntoIterator<Item = &'a serde_json::Value>,
) -> serde_json::Value {
    let mut count = 0;
    let mut members = Vec::new();
    for answer in answers {
        count += answer["count"].as_u64().unwrap_or(0);
        if let Some(listed) = answer["members"].as_array() {
            let room_left = MAX_MEMBERS.saturating_sub(members.len());
            members.extend(listed.iter().take(room_left).cloned());
        }
    }
    let mut out = serde_json::json!({ "room": room, "count": count, "members": members });
    if (members.len() as u64) < count {
        out["members_truncated"] = serde_json::json!(true);
    }
    out
}

/// `%XX` escapes decoded; `None` when malformed or not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_bearer_key_is_authorized() {
        let key = "0123456789abcdef";
        assert!(authorized(Some(b"Bearer 0123456789abcdef"), key));
        for wrong in [
            &b"Bearer 0123456789abcdeF"[..],
            b"Bearer 0123456789abcde",
            b"Bearer 0123456789abcdef0",
            b"bearer 0123456789abcdef",
            b"0123456789abcdef",
            b"Bearer ",
        ] {
            assert!(!authorized(Some(wrong), key), "{wrong:?}");
        }
        assert!(!authorized(None, key));
        assert!(!authorized(Some(b"Bearer "), ""));
    }

    #[test]
    fn endpoints_by_path() {
        assert_eq!(Endpoint::parse("/api/publish"), Some(Endpoint::Publish));
        assert_eq!(
            Endpoint::parse("/api/rooms/chat%3Ageneral"),
            Some(Endpoint::Rooms("chat:general".into()))
        );
        assert_eq!(Endpoint::parse("/api/rooms/"), None);
        assert_eq!(Endpoint::parse("/api/rooms/%zz"), None);
        assert_eq!(Endpoint::parse("/api/other"), None);
        assert_eq!(Endpoint::Info.method(), "GET");
    }
}
