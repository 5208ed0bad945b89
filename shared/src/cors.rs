//! CORS for the Engine.IO path, as `socketio.cors` asks: which headers a long-polling answer
//! and a preflight carry, and which origins may open a session. Pure: the worker and the
//! balancer each apply it to their own HTTP types, so a browser sees the same answers straight
//! from a worker and through the balancer.

use crate::config::CorsConfig;

/// The answer to a handshake or upgrade from an origin not admitted: 403 with Engine.IO's own
/// body for a refused request (Node's `allowRequest`).
pub const FORBIDDEN_BODY: &str = r#"{"code":4,"message":"Forbidden"}"#;

/// How long a browser may cache a preflight answer, in seconds.
const MAX_AGE_SECS: &str = "600";
/// The longest `Access-Control-Request-Headers` echoed back.
const MAX_REQUEST_HEADERS: usize = 1024;

/// The CORS policy of one process.
#[derive(Debug, Clone, Default)]
pub struct Cors {
    /// `origins: ["*"]`.
    any: bool,
    /// Listed origins (empty with `any`, or when CORS is off).
    origins: Vec<String>,
    credentials: bool,
}

impl Cors {
    /// The policy of a (validated) `socketio.cors` section.
    pub fn new(cfg: &CorsConfig) -> Self {
        let any = cfg.origins.iter().any(|o| o == "*");
        Cors {
            any,
            origins: if any { Vec::new() } else { cfg.origins.clone() },
            credentials: cfg.credentials && !any,
        }
    }

    /// Whether any CORS header is ever sent.
    pub fn enabled(&self) -> bool {
        self.any || !self.origins.is_empty()
    }

    /// Whether a request bearing `origin` may open a session or upgrade to a WebSocket. Only a
    /// list of origins restricts: a browser always sends `Origin` on a cross-site WebSocket,
    /// so one from elsewhere is a hijacking attempt; a request with no `Origin` is not from a
    /// browser page and is let through.
    pub fn admits(&self, origin: Option<&[u8]>) -> bool {
        match origin {
            None => true,
            Some(_) if self.any || self.origins.is_empty() => true,
            Some(o) => self.listed(o),
        }
    }

    fn listed(&self, origin: &[u8]) -> bool {
        self.origins.iter().any(|o| o.as_bytes() == origin)
    }

    /// The headers an answer to a request bearing `origin` carries.
    pub fn headers(&self, origin: Option<&[u8]>) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.any {
            out.push(("access-control-allow-origin", "*".to_owned()));
        } else if !self.origins.is_empty() {
            // The answer depends on the Origin header: caches must keep one per origin.
            out.push(("vary", "Origin".to_owned()));
            if let Some(o) = origin.filter(|o| self.listed(o)) {
                out.push((
                    "access-control-allow-origin",
                    String::from_utf8_lossy(o).into_owned(),
                ));
                if self.credentials {
                    out.push(("access-control-allow-credentials", "true".to_owned()));
                }
            }
        }
        out
    }

    /// The headers of a preflight's answer (`OPTIONS` with `Access-Control-Request-*`): those
    /// of [`Cors::headers`], plus the methods Engine.IO uses and the request headers asked
    /// for (echoed when they are plain header names).
    pub fn preflight_headers(
        &self,
        origin: Option<&[u8]>,
        request_headers: Option<&[u8]>,
    ) -> Vec<(&'static str, String)> {
        let mut out = self.headers(origin);
        if !out.iter().any(|(k, _)| *k == "access-control-allow-origin") {
            return out; // not allowed: the browser stops here
        }
        out.push(("access-control-allow-methods", "GET, POST, OPTIONS".into()));
        let asked = request_headers
            .filter(|h| h.len() <= MAX_REQUEST_HEADERS && h.iter().all(|&b| is_list_char(b)))
            .map(|h| String::from_utf8_lossy(h).into_owned())
            .filter(|h| !h.trim().is_empty());
        if let Some(asked) = asked {
            out.push(("access-control-allow-headers", asked));
        }
        out.push(("access-control-max-age", MAX_AGE_SECS.into()));
        out
    }
}

/// A character of a comma-separated list of header names (RFC 9110 tokens).
fn is_list_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~, ".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cors(origins: &[&str], credentials: bool) -> Cors {
        Cors::new(&CorsConfig {
            origins: origins.iter().map(|s| (*s).to_owned()).collect(),
            credentials,
        })
    }

    fn get<'a>(h: &'a [(&str, String)], k: &str) -> Option<&'a str> {
        h.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str())
    }

    const APP: &[u8] = b"http://app.test:3000";
    const EVIL: &[u8] = b"http://evil.test";

    #[test]
    fn off_by_default_says_nothing_and_refuses_nothing() {
        let c = cors(&[], false);
        assert!(!c.enabled());
        assert!(c.headers(Some(APP)).is_empty());
        assert!(
            c.preflight_headers(Some(APP), Some(b"content-type"))
                .is_empty()
        );
        assert!(c.admits(Some(EVIL)) && c.admits(None));
    }

    #[test]
    fn any_origin_is_a_star_without_credentials() {
        let c = cors(&["*"], true);
        let h = c.headers(Some(EVIL));
        assert_eq!(get(&h, "access-control-allow-origin"), Some("*"));
        assert_eq!(get(&h, "access-control-allow-credentials"), None);
        assert!(c.admits(Some(EVIL)));
    }

    #[test]
    fn a_list_echoes_listed_origins_only() {
        let c = cors(&["http://app.test:3000"], true);
        let h = c.headers(Some(APP));
        assert_eq!(
            get(&h, "access-control-allow-origin"),
            Some("http://app.test:3000")
        );
        assert_eq!(get(&h, "access-control-allow-credentials"), Some("true"));
        assert_eq!(get(&h, "vary"), Some("Origin"));
        let h = c.headers(Some(EVIL));
        assert_eq!(get(&h, "access-control-allow-origin"), None);
        assert_eq!(get(&h, "vary"), Some("Origin"));
        assert!(c.admits(Some(APP)) && c.admits(None));
        assert!(!c.admits(Some(EVIL)));
        // Exact: no prefix, suffix or case games.
        assert!(!c.admits(Some(b"http://app.test:3000.evil.test")));
        assert!(!c.admits(Some(b"http://app.test")));
        assert!(!c.admits(Some(b"HTTP://APP.TEST:3000")));
    }

    #[test]
    fn preflight_names_methods_and_echoes_plain_header_names() {
        let c = cors(&["http://app.test:3000"], false);
        let h = c.preflight_headers(Some(APP), Some(b"content-type, authorization"));
        assert_eq!(
            get(&h, "access-control-allow-methods"),
            Some("GET, POST, OPTIONS")
        );
        assert_eq!(
            get(&h, "access-control-allow-headers"),
            Some("content-type, authorization")
        );
        assert!(get(&h, "access-control-max-age").is_some());
        // A header list with anything but header-name characters is not echoed.
        let h = c.preflight_headers(Some(APP), Some(b"x\r\nset-cookie: a"));
        assert_eq!(get(&h, "access-control-allow-headers"), None);
        // An origin not listed gets nothing to go on.
        let h = c.preflight_headers(Some(EVIL), Some(b"content-type"));
        assert_eq!(get(&h, "access-control-allow-methods"), None);
    }
}
