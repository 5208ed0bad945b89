//! What routing reads of a request, taken out of pingora's session once: the target, whether
//! it asks to upgrade or is a preflight, its origin, the head's size, and the client's address (believing X-Forwarded-For
//! only from trusted proxies). Also the X-Forwarded-For a worker is sent.

use std::net::IpAddr;

use pingora_http::RequestHeader;
use shared::config::IpNetwork;

/// A request as routing sees it.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The URI path.
    pub path: &'a str,
    /// The raw query string.
    pub query: Option<&'a str>,
    /// It asks for a WebSocket upgrade.
    pub upgrade: bool,
    /// An `OPTIONS` request: a browser's CORS preflight.
    pub preflight: bool,
    /// The `Origin` header: the web page's origin, sent by browsers.
    pub origin: Option<&'a [u8]>,
    /// The size of the head as sent (request line and headers), near enough.
    pub head_bytes: usize,
    /// The client's address; `None` when the connection has none (a Unix socket).
    pub client: Option<IpAddr>,
    /// A random number for this request, for policies that choose at random.
    pub nonce: u64,
}

/// The size of a request head as sent, near enough: request line and header lines.
pub fn head_size(req: &RequestHeader) -> usize {
    let target = req.uri.path_and_query().map_or(1, |p| p.as_str().len());
    let line = req.method.as_str().len() + target + 12;
    req.headers
        .iter()
        .fold(line, |n, (k, v)| n + k.as_str().len() + v.len() + 4)
}

/// The client's address: the TCP peer, or when the peer is a trusted proxy, the nearest hop
/// of `X-Forwarded-For` that is not.
pub fn client_ip(peer: IpAddr, forwarded_for: Option<&str>, trusted: &[IpNetwork]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    forwarded_for
        .into_iter()
        .flat_map(|xff| xff.rsplit(','))
        .filter_map(|hop| hop.trim().parse::<IpAddr>().ok())
        .find(|ip| !is_trusted(ip))
        .unwrap_or(peer)
}

/// The `X-Forwarded-For` to send a worker: appended to when the peer is a trusted proxy,
/// else replaced (a client cannot forge its own address).
pub fn forwarded_for(peer: IpAddr, previous: Option<&str>, trusted: &[IpNetwork]) -> String {
    match previous {
        Some(prev) if trusted.iter().any(|n| n.contains(&peer)) => format!("{prev}, {peer}"),
        _ => peer.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNetwork> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_peers() {
        let trusted = nets(&["10.0.0.0/8"]);
        let peer: IpAddr = "10.0.0.2".parse().unwrap();
        let outsider: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(client_ip(outsider, Some("1.2.3.4"), &trusted), outsider);
        assert_eq!(
            client_ip(peer, Some("1.2.3.4, 10.0.0.7"), &trusted),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_ip(peer, Some("junk"), &trusted), peer);
        assert_eq!(client_ip(peer, None, &trusted), peer);
        assert_eq!(
            forwarded_for(peer, Some("1.2.3.4"), &trusted),
            "1.2.3.4, 10.0.0.2"
        );
        assert_eq!(
            forwarded_for(outsider, Some("1.2.3.4"), &trusted),
            "203.0.113.9"
        );
        assert_eq!(forwarded_for(outsider, None, &[]), "203.0.113.9");
    }

    #[test]
    fn head_size_counts_line_and_headers() {
        let mut req = RequestHeader::build("GET", b"/socket.io/?EIO=4", None).unwrap();
        let bare = head_size(&req);
        req.insert_header("X-Pad", "a".repeat(100)).unwrap();
        assert_eq!(head_size(&req), bare + 5 + 100 + 4);
    }
}
