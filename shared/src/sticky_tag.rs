//! Tags: 8 URL-safe characters derived from a worker's identity with a keyed hash, so every
//! balancer sharing the secret derives the same tag, and the tag does not reveal the address.
//! A tagged sid is `<tag>.<sid>`. The balancer tags and reads sids; a worker keeping a
//! long-polling connection reads them to tell its own sessions' requests.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use blake2::{Blake2b512, Digest};

/// Length of a tag in characters (6 bytes of hash, base64url).
pub const TAG_LEN: usize = 8;
/// Separates the tag from the worker's own sid.
pub const SEPARATOR: u8 = b'.';
/// The longest worker sid accepted (engineioxide's are 16).
pub const MAX_SID_LEN: usize = 64;

/// A worker's tag.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag([u8; TAG_LEN]);

impl Tag {
    /// The tag of a worker identity (its `host:port`), keyed by the fleet's sticky secret.
    pub fn derive(secret: &str, identity: &str) -> Tag {
        let mut h = Blake2b512::new();
        h.update((secret.len() as u64).to_le_bytes());
        h.update(secret.as_bytes());
        h.update(identity.as_bytes());
        let digest = h.finalize();
        let mut out = [0u8; TAG_LEN];
        let n = URL_SAFE_NO_PAD
            .encode_slice(&digest[..6], &mut out)
            .expect("6 bytes fit 8 chars");
        debug_assert_eq!(n, TAG_LEN);
        Tag(out)
    }

    /// The tag's text.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("base64url is ASCII")
    }

    fn parse(bytes: &[u8]) -> Option<Tag> {
        let arr: [u8; TAG_LEN] = bytes.try_into().ok()?;
        arr.iter().all(|b| is_sid_char(*b)).then_some(Tag(arr))
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tag({})", self.as_str())
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A sid as the client holds it: which worker, and that worker's own sid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaggedSid<'a> {
    /// The worker's tag.
    pub tag: Tag,
    /// The sid the worker issued.
    pub sid: &'a str,
}

/// Why a client's sid could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SidError {
    /// No separator, wrong tag length, or characters outside base64url.
    #[error("malformed sid")]
    Malformed,
}

impl<'a> TaggedSid<'a> {
    /// Read `<tag>.<sid>`.
    pub fn parse(text: &'a str) -> Result<Self, SidError> {
        let bytes = text.as_bytes();
        if bytes.len() < TAG_LEN + 2 || bytes[TAG_LEN] != SEPARATOR {
            return Err(SidError::Malformed);
        }
        let tag = Tag::parse(&bytes[..TAG_LEN]).ok_or(SidError::Malformed)?;
        let sid = &text[TAG_LEN + 1..];
        if sid.len() > MAX_SID_LEN || !sid.bytes().all(is_sid_char) {
            return Err(SidError::Malformed);
        }
        Ok(TaggedSid { tag, sid })
    }

    /// Write `<tag>.<sid>`.
    pub fn encode(tag: Tag, sid: &str) -> String {
        let mut s = String::with_capacity(TAG_LEN + 1 + sid.len());
        s.push_str(tag.as_str());
        s.push(SEPARATOR as char);
        s.push_str(sid);
        s
    }
}

/// Characters a worker sid may contain: base64url.
pub fn is_sid_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn derive_is_stable_and_keyed() {
        let a = Tag::derive("s", "127.0.0.1:9001");
        assert_eq!(a, Tag::derive("s", "127.0.0.1:9001"));
        assert_ne!(a, Tag::derive("s", "127.0.0.1:9002"));
        assert_ne!(a, Tag::derive("t", "127.0.0.1:9001"));
        assert!(!a.as_str().contains("127"));
        assert_eq!(a.as_str().len(), TAG_LEN);
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "abc",
            "ABCDEFGH",
            "ABCDEFGH.",
            "ABCDEFGHxsid",
            "ABC$EFGH.sid",
            "ABCDEFGH.s d",
            "ABCDEFGH.a.b",
        ] {
            assert_eq!(TaggedSid::parse(bad), Err(SidError::Malformed), "{bad:?}");
        }
        let long = format!("ABCDEFGH.{}", "a".repeat(MAX_SID_LEN + 1));
        assert!(TaggedSid::parse(&long).is_err());
    }

    proptest! {
        #[test]
        fn round_trip(identity in ".{0,40}", sid in "[A-Za-z0-9_-]{1,64}") {
            let tag = Tag::derive("secret", &identity);
            let text = TaggedSid::encode(tag, &sid);
            let parsed = TaggedSid::parse(&text).unwrap();
            prop_assert_eq!(parsed.tag, tag);
            prop_assert_eq!(parsed.sid, sid.as_str());
        }

        #[test]
        fn parse_never_panics(text in "\\PC{0,100}") {
            let _ = TaggedSid::parse(&text);
        }
    }
}
