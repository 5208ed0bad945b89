//! What both WebSocket paths need beyond pingora's own API: the request head as the bytes a
//! worker reads, and the client's raw connection out of pingora's session.

use std::io::Cursor;

use pingora_core::protocols::Stream;
use pingora_core::protocols::http::ServerSession;
use pingora_http::RequestHeader;
use pingora_proxy::Session;

/// The request as HTTP/1.1 bytes.
pub fn serialize(req: &RequestHeader) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    let target = req.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    out.extend_from_slice(req.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in req.headers.iter() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Takes the client's connection out of pingora's session, leaving an inert one behind.
pub fn take_client(session: &mut Session) -> Option<Stream> {
    let inert = ServerSession::new_http1(Box::new(Cursor::new(Vec::<u8>::new())));
    match std::mem::replace(&mut *session.downstream_session, inert) {
        ServerSession::H1(h1) => Some(h1.into_inner()),
        other => {
            *session.downstream_session = other;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_the_rewritten_target_and_headers() {
        let mut req = RequestHeader::build(
            "GET",
            b"/socket.io/?EIO=4&transport=websocket&sid=abc",
            None,
        )
        .unwrap();
        req.insert_header("Upgrade", "websocket").unwrap();
        let text = String::from_utf8(serialize(&req)).unwrap();
        assert!(text.starts_with("GET /socket.io/?EIO=4&transport=websocket&sid=abc HTTP/1.1\r\n"));
        assert!(text.to_ascii_lowercase().contains("upgrade: websocket\r\n"));
        assert!(text.ends_with("\r\n\r\n"));
    }
}
