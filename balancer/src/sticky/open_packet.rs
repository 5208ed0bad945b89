//! Rewrite the sid in an Engine.IO handshake response (the open packet) to its tagged form.
//! EIO4 bodies are `0{json}` (more packets may follow after a 0x1e separator); EIO3 bodies
//! are length-prefixed `<n>:0{json}<m>:…`, whose prefix is recomputed.

use serde_json::Value;

use super::tag::{MAX_SID_LEN, Tag, TaggedSid, is_sid_char};

/// Why a handshake body could not be rewritten.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenPacketError {
    /// The body is not an open packet in either payload format.
    #[error("not an Engine.IO open packet")]
    NotOpenPacket,
    /// The open packet has no usable sid.
    #[error("open packet has no valid sid")]
    BadSid,
}

/// The body with its open packet's sid replaced by `<tag>.<sid>`.
pub fn rewrite(body: &[u8], tag: Tag) -> Result<Vec<u8>, OpenPacketError> {
    if body.first() == Some(&b'0') {
        // EIO4: the open packet runs to the first record separator.
        let end = body.iter().position(|b| *b == 0x1e).unwrap_or(body.len());
        let mut out = rewrite_packet(&body[..end], tag)?;
        out.extend_from_slice(&body[end..]);
        return Ok(out);
    }
    // EIO3: "<len>:<packet>" where len counts characters (the open packet is ASCII).
    let colon = body
        .iter()
        .take(8)
        .position(|b| *b == b':')
        .ok_or(OpenPacketError::NotOpenPacket)?;
    let len: usize = std::str::from_utf8(&body[..colon])
        .ok()
        .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|d| d.parse().ok())
        .ok_or(OpenPacketError::NotOpenPacket)?;
    let start = colon + 1;
    let packet = body
        .get(start..start + len)
        .ok_or(OpenPacketError::NotOpenPacket)?;
    if packet.first() != Some(&b'0') || !packet.is_ascii() {
        return Err(OpenPacketError::NotOpenPacket);
    }
    let new_packet = rewrite_packet(packet, tag)?;
    let mut out = format!("{}:", new_packet.len()).into_bytes();
    out.extend_from_slice(&new_packet);
    out.extend_from_slice(&body[start + len..]);
    Ok(out)
}

/// `0{json}` → `0{json with the sid tagged}`.
fn rewrite_packet(packet: &[u8], tag: Tag) -> Result<Vec<u8>, OpenPacketError> {
    let json = packet
        .strip_prefix(b"0")
        .ok_or(OpenPacketError::NotOpenPacket)?;
    let mut value: Value =
        serde_json::from_slice(json).map_err(|_| OpenPacketError::NotOpenPacket)?;
    let obj = value
        .as_object_mut()
        .ok_or(OpenPacketError::NotOpenPacket)?;
    let sid = match obj.get("sid") {
        Some(Value::String(s))
            if !s.is_empty() && s.len() <= MAX_SID_LEN && s.bytes().all(is_sid_char) =>
        {
            s.clone()
        }
        _ => return Err(OpenPacketError::BadSid),
    };
    obj.insert("sid".into(), Value::String(TaggedSid::encode(tag, &sid)));
    let mut out = b"0".to_vec();
    serde_json::to_writer(&mut out, &value).expect("a JSON value serialises");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tag() -> Tag {
        Tag::derive("s", "w")
    }

    fn sid_of(packet: &[u8]) -> String {
        let v: Value = serde_json::from_slice(&packet[1..]).unwrap();
        v["sid"].as_str().unwrap().to_owned()
    }

    #[test]
    fn eio4() {
        let body = br#"0{"sid":"lv_VI97HAXpY6yYWAAAC","upgrades":["websocket"],"pingInterval":25000,"pingTimeout":20000,"maxPayload":1000000}"#;
        let out = rewrite(body, tag()).unwrap();
        let tagged = sid_of(&out);
        let parsed = TaggedSid::parse(&tagged).unwrap();
        assert_eq!((parsed.tag, parsed.sid), (tag(), "lv_VI97HAXpY6yYWAAAC"));
        let v: Value = serde_json::from_slice(&out[1..]).unwrap();
        assert_eq!(v["pingInterval"], 25000);
        assert_eq!(v["upgrades"][0], "websocket");
    }

    #[test]
    fn eio4_with_following_packets() {
        let body = b"0{\"sid\":\"abc\"}\x1e40";
        let out = rewrite(body, tag()).unwrap();
        assert!(out.ends_with(b"\x1e40"));
    }

    #[test]
    fn eio3_prefix_recomputed_and_tail_kept() {
        let packet = r#"0{"sid":"abc","upgrades":[],"pingInterval":25000,"pingTimeout":5000}"#;
        let body = format!("{}:{packet}2:40", packet.len());
        let out = String::from_utf8(rewrite(body.as_bytes(), tag()).unwrap()).unwrap();
        let (len, rest) = out.split_once(':').unwrap();
        let len: usize = len.parse().unwrap();
        assert_eq!(&rest[len..], "2:40");
        assert!(TaggedSid::parse(&sid_of(&rest.as_bytes()[..len])).is_ok());
    }

    #[test]
    fn refuses_junk() {
        for bad in [
            &b""[..],
            b"x",
            b"0",
            b"0[]",
            b"0{\"sid\":1}",
            b"0{\"sid\":\"a b\"}",
            b"99:0{}",
            b"2:0{",
            b"1:x",
        ] {
            assert!(
                rewrite(bad, tag()).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    proptest! {
        #[test]
        fn never_panics(body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = rewrite(&body, tag());
        }

        #[test]
        fn round_trip(sid in "[A-Za-z0-9_-]{1,64}", ping in 1u32..100000) {
            let body = format!(r#"0{{"sid":"{sid}","pingInterval":{ping}}}"#);
            let out = rewrite(body.as_bytes(), tag()).unwrap();
            let tagged = sid_of(&out);
            let parsed = TaggedSid::parse(&tagged).unwrap();
            prop_assert_eq!(parsed.sid, sid.as_str());
        }
    }
}
