//! Engine.IO v4 and Socket.IO v5 packets, as text: just what the default app's protocol uses
//! (no binary attachments, main namespace only).

use serde_json::{Value, json};

/// The record separator between packets of one polling payload.
pub const SEPARATOR: char = '\u{1e}';

/// The Engine.IO handshake's useful fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Open {
    /// The session id.
    pub sid: String,
    /// How often the server pings, in milliseconds.
    pub ping_interval: u64,
    /// How long the server waits for a pong, in milliseconds.
    pub ping_timeout: u64,
}

/// An Engine.IO packet, with a Socket.IO packet inside `Message`.
#[derive(Debug, Clone, PartialEq)]
pub enum Packet {
    /// `0{...}`
    Open(Open),
    /// `1`
    Close,
    /// `2`, with `probe` during an upgrade.
    Ping(String),
    /// `3`
    Pong(String),
    /// `4…`: a Socket.IO packet.
    Message(Sio),
    /// `5`
    Upgrade,
    /// `6`
    Noop,
}

/// A Socket.IO packet on the main namespace.
#[derive(Debug, Clone, PartialEq)]
pub enum Sio {
    /// `0{"sid":…}`: connected.
    Connect,
    /// `1`: disconnected by the server.
    Disconnect,
    /// `2[id]["event", args…]`
    Event {
        /// Set when the sender wants an ack.
        id: Option<u64>,
        /// The event name and its arguments.
        name: String,
        /// The arguments.
        args: Vec<Value>,
    },
    /// `3id[args…]`
    Ack {
        /// The id of the event acked.
        id: u64,
        /// The ack's arguments.
        args: Vec<Value>,
    },
    /// `4{...}`: connect refused.
    ConnectError(String),
}

/// A packet that could not be understood.
#[derive(Debug, thiserror::Error)]
#[error("bad packet: {0}")]
pub struct BadPacket(pub String);

fn bad<T>(text: &str) -> Result<T, BadPacket> {
    Err(BadPacket(text.chars().take(80).collect()))
}

impl Packet {
    /// Parses one Engine.IO packet.
    pub fn parse(text: &str) -> Result<Packet, BadPacket> {
        let mut chars = text.chars();
        let Some(kind) = chars.next() else {
            return bad(text);
        };
        let rest = chars.as_str();
        Ok(match kind {
            '0' => {
                let v: Value = serde_json::from_str(rest).or_else(|_| bad(text))?;
                let sid = v["sid"].as_str().map(str::to_owned);
                let (Some(sid), Some(pi), Some(pt)) =
                    (sid, v["pingInterval"].as_u64(), v["pingTimeout"].as_u64())
                else {
                    return bad(text);
                };
                Packet::Open(Open {
                    sid,
                    ping_interval: pi,
                    ping_timeout: pt,
                })
            }
            '1' => Packet::Close,
            '2' => Packet::Ping(rest.to_owned()),
            '3' => Packet::Pong(rest.to_owned()),
            '4' => Packet::Message(Sio::parse(rest)?),
            '5' => Packet::Upgrade,
            '6' => Packet::Noop,
            _ => return bad(text),
        })
    }

    /// Parses a polling payload: packets separated by [`SEPARATOR`].
    pub fn parse_payload(text: &str) -> Result<Vec<Packet>, BadPacket> {
        text.split(SEPARATOR)
            .filter(|p| !p.is_empty())
            .map(Packet::parse)
            .collect()
    }
}

impl Sio {
    fn parse(text: &str) -> Result<Sio, BadPacket> {
        let mut chars = text.chars();
        let Some(kind) = chars.next() else {
            return bad(text);
        };
        let rest = chars.as_str();
        // The main namespace "/" is implicit: no "/nsp," prefix.
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let id = if digits > 0 {
            Some(rest[..digits].parse::<u64>().or_else(|_| bad(text))?)
        } else {
            None
        };
        let body = &rest[digits..];
        Ok(match kind {
            '0' => Sio::Connect,
            '1' => Sio::Disconnect,
            '2' => {
                let Ok(Value::Array(mut items)) = serde_json::from_str(body) else {
                    return bad(text);
                };
                if items.is_empty() {
                    return bad(text);
                }
                let Value::String(name) = items.remove(0) else {
                    return bad(text);
                };
                Sio::Event {
                    id,
                    name,
                    args: items,
                }
            }
            '3' => {
                let (Some(id), Ok(Value::Array(args))) = (id, serde_json::from_str(body)) else {
                    return bad(text);
                };
                Sio::Ack { id, args }
            }
            '4' => Sio::ConnectError(body.to_owned()),
            _ => return bad(text),
        })
    }
}

/// `40`: connect to the main namespace; `40{"token":...}` with an auth token.
pub fn connect(token: Option<&str>) -> String {
    match token {
        None => "40".to_owned(),
        Some(t) => format!("40{}", json!({ "token": t })),
    }
}

/// `42[id]["name", arg]`: an event, with an ack id when one is wanted.
pub fn event(id: Option<u64>, name: &str, arg: &Value) -> String {
    let body = serde_json::to_string(&(name, arg)).expect("a JSON value serialises");
    match id {
        Some(id) => format!("42{id}{body}"),
        None => format!("42{body}"),
    }
}

/// `42[id]["name"]`: an event with no argument.
pub fn bare_event(id: Option<u64>, name: &str) -> String {
    let body = serde_json::to_string(&[name]).expect("a string serialises");
    match id {
        Some(id) => format!("42{id}{body}"),
        None => format!("42{body}"),
    }
}

/// Joins packets into one polling payload.
pub fn payload(packets: &[String]) -> String {
    packets.join(&SEPARATOR.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn parses_the_open_packet() {
        let p = Packet::parse(
            r#"0{"sid":"ab.cd","upgrades":["websocket"],"pingInterval":25000,"pingTimeout":20000,"maxPayload":100000}"#,
        )
        .unwrap();
        assert_eq!(
            p,
            Packet::Open(Open {
                sid: "ab.cd".into(),
                ping_interval: 25000,
                ping_timeout: 20000
            })
        );
    }

    #[test]
    fn parses_events_and_acks() {
        assert_eq!(
            Packet::parse(r#"42["message",{"room":"r","data":1}]"#).unwrap(),
            Packet::Message(Sio::Event {
                id: None,
                name: "message".into(),
                args: vec![json!({"room":"r","data":1})]
            })
        );
        assert_eq!(
            Packet::parse(r#"4317[{"worker":"w0"}]"#).unwrap(),
            Packet::Message(Sio::Ack {
                id: 17,
                args: vec![json!({"worker":"w0"})]
            })
        );
        assert_eq!(
            Packet::parse(r#"40{"sid":"x"}"#).unwrap(),
            Packet::Message(Sio::Connect)
        );
    }

    #[test]
    fn splits_a_polling_payload() {
        let ps = Packet::parse_payload("2\u{1e}42[\"a\"]\u{1e}6").unwrap();
        assert_eq!(ps.len(), 3);
        assert_eq!(ps[0], Packet::Ping(String::new()));
        assert_eq!(ps[2], Packet::Noop);
    }

    #[test]
    fn encodes_what_it_parses() {
        let arg = json!({"room": "r1", "data": {"s": 3}});
        let text = event(Some(9), "publish", &arg);
        assert_eq!(text, r#"429["publish",{"data":{"s":3},"room":"r1"}]"#);
        assert_eq!(
            Packet::parse(&text).unwrap(),
            Packet::Message(Sio::Event {
                id: Some(9),
                name: "publish".into(),
                args: vec![arg]
            })
        );
        assert_eq!(bare_event(Some(1), "whoami"), r#"421["whoami"]"#);
    }

    proptest! {
        #[test]
        fn never_panics(s in ".{0,200}") {
            let _ = Packet::parse(&s);
            let _ = Packet::parse_payload(&s);
        }

        #[test]
        fn event_round_trips(id in proptest::option::of(0u64..1_000_000), name in "[a-z]{1,10}", n in any::<i64>(), text in ".{0,40}") {
            let arg = json!({"n": n, "t": text});
            let parsed = Packet::parse(&event(id, &name, &arg)).unwrap();
            prop_assert_eq!(parsed, Packet::Message(Sio::Event { id, name, args: vec![arg] }));
        }
    }
}
