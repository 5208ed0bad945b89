//! The Engine.IO query string: read `sid` and `transport`, and put back a plain sid for the
//! worker while leaving every other parameter byte for byte. Used by balancer and worker alike.

/// The parameters routing needs.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EioParams {
    /// The client's sid (tagged), if any.
    pub sid: Option<String>,
    /// `polling` or `websocket`.
    pub transport: Option<String>,
    /// The Engine.IO protocol version (`EIO`), when it is a number.
    pub eio: Option<u8>,
}

/// Why a query could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// `sid` appears more than once.
    #[error("repeated sid parameter")]
    RepeatedSid,
    /// A value is not valid percent-encoded UTF-8.
    #[error("bad percent-encoding")]
    BadEncoding,
}

/// Read the routing parameters.
pub fn parse(query: Option<&str>) -> Result<EioParams, QueryError> {
    let mut out = EioParams::default();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "sid" => {
                if out.sid.is_some() {
                    return Err(QueryError::RepeatedSid);
                }
                out.sid = Some(decode(value)?);
            }
            "transport" => out.transport = Some(decode(value)?),
            "EIO" => out.eio = value.parse().ok(),
            _ => {}
        }
    }
    Ok(out)
}

/// True when `path` is the Engine.IO path (given without trailing slash) or below it.
pub fn under_path(path: &str, eio_path: &str) -> bool {
    path.strip_prefix(eio_path)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The same query with the `sid` value replaced by `sid` (a plain base64url sid).
pub fn with_sid(query: &str, sid: &str) -> String {
    let mut out = String::with_capacity(query.len());
    for (i, pair) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        if pair == "sid" || pair.starts_with("sid=") {
            out.push_str("sid=");
            out.push_str(sid);
        } else {
            out.push_str(pair);
        }
    }
    out
}

fn decode(value: &str) -> Result<String, QueryError> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or(QueryError::BadEncoding)?;
                let hex = std::str::from_utf8(hex).map_err(|_| QueryError::BadEncoding)?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| QueryError::BadEncoding)?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| QueryError::BadEncoding)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reads_and_rewrites() {
        let q = "EIO=4&transport=polling&t=PZ1&sid=ABCDEFGH.xyz";
        let p = parse(Some(q)).unwrap();
        assert_eq!(p.sid.as_deref(), Some("ABCDEFGH.xyz"));
        assert_eq!(p.transport.as_deref(), Some("polling"));
        assert_eq!(with_sid(q, "xyz"), "EIO=4&transport=polling&t=PZ1&sid=xyz");
        assert_eq!(
            parse(Some("sid=A%2Eb")).unwrap().sid.as_deref(),
            Some("A.b")
        );
        assert_eq!(parse(Some("sid=a&sid=b")), Err(QueryError::RepeatedSid));
        assert_eq!(parse(Some("sid=%zz")), Err(QueryError::BadEncoding));
        assert_eq!(parse(Some("sid=%e2")), Err(QueryError::BadEncoding));
        assert_eq!(parse(None).unwrap(), EioParams::default());
        let q = parse(Some("EIO=4&transport=polling&t=x&sid=ab%2Dc")).unwrap();
        assert_eq!(q.sid.as_deref(), Some("ab-c"));
        assert!(under_path("/socket.io/", "/socket.io") && under_path("/socket.io", "/socket.io"));
        assert!(!under_path("/socket.iox", "/socket.io") && !under_path("/metrics", "/socket.io"));
    }

    proptest! {
        #[test]
        fn never_panics(q in "\\PC{0,200}") {
            let _ = parse(Some(&q));
            let _ = with_sid(&q, "x");
        }

        #[test]
        fn rewrite_round_trip(pre in "[a-z]{1,5}=[a-z0-9]{0,5}", tagged in "[A-Za-z0-9_-]{8}\\.[A-Za-z0-9_-]{1,20}", plain in "[A-Za-z0-9_-]{1,20}") {
            let q = format!("{pre}&sid={tagged}&EIO=4");
            let rewritten = with_sid(&q, &plain);
            let p = parse(Some(&rewritten)).unwrap();
            prop_assert_eq!(p.sid.as_deref(), Some(plain.as_str()));
            prop_assert!(rewritten.starts_with(&pre));
        }
    }
}
