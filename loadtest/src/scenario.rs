//! What to run: a scenario from a YAML file, flags on top, checked before anything starts.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// How clients reach the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// WebSocket from the first request.
    Websocket,
    /// Long-polling only.
    Polling,
    /// Polling handshake, then upgraded to WebSocket (the official client's default).
    Upgrade,
    /// Half and half: even-numbered clients `websocket`, odd ones `upgrade`.
    Mixed,
}

impl Transport {
    /// The transport client `index` uses (`mixed` alternates websocket and upgrade).
    pub fn for_client(self, index: usize) -> Transport {
        match self {
            Transport::Mixed if index.is_multiple_of(2) => Transport::Websocket,
            Transport::Mixed => Transport::Upgrade,
            t => t,
        }
    }
}

/// One load run. Every field has a default; a YAML file may give any of them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Scenario {
    /// The server, e.g. `http://127.0.0.1:8000`; several, comma-separated, are used in turn
    /// (client i connects to the (i mod n)th), e.g. to load workers directly.
    pub url: String,
    /// The Engine.IO path.
    pub path: String,
    /// Clients to connect.
    pub clients: usize,
    /// New clients per second (over all processes).
    pub connect_rate: f64,
    /// websocket, polling or upgrade.
    pub transport: Transport,
    /// Client i joins room `r{i mod rooms}`.
    pub rooms: usize,
    /// Clients 0..publishers publish to their room.
    pub publishers: usize,
    /// Publishes per second per publisher (ignored when `window` is set).
    pub rate: f64,
    /// Flood instead: each publisher keeps this many unacknowledged publishes in flight.
    pub window: Option<usize>,
    /// Stop each publisher after this many publishes (default: publish for the whole duration).
    pub messages: Option<u64>,
    /// Bytes of padding in each publish.
    pub payload: usize,
    /// How long publishers publish, in seconds.
    pub duration_secs: f64,
    /// How long to keep listening after the last publish, in seconds.
    pub settle_secs: f64,
    /// How long clients may take to connect and join before publishing starts, in seconds.
    pub connect_timeout_secs: f64,
    /// Reconnect (and rejoin) a client whose connection drops.
    pub reconnect: bool,
    /// Local source addresses in 127.0.0.0/8, one or a range `127.0.0.2-127.0.0.9` each;
    /// clients use them in turn (each address has ~28k ephemeral ports).
    pub sources: Vec<String>,
    /// Generator processes (each holds at most ~18k clients).
    pub procs: usize,
    /// The largest tolerated fraction of missing or duplicate deliveries (0 = none).
    pub max_loss: f64,
    /// The protocol spoken: the default rooms app's, or the chat example's (`apps/chat`).
    #[serde(default)]
    pub app: AppProtocol,
    /// A token every client sends in its CONNECT auth payload (`{"token": ...}`), for a fleet
    /// with `auth.mode: jwt` or `proxy`. Never written into a report.
    #[serde(default)]
    pub token: Option<String>,
    /// Write an event log here (joins, drops, acknowledged publishes, first receipts; see
    /// [`crate::events`]); process I of several writes `events.I`.
    #[serde(default)]
    pub events: Option<String>,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            url: "http://127.0.0.1:8000".into(),
            path: "/socket.io/".into(),
            clients: 100,
            connect_rate: 1000.0,
            transport: Transport::Websocket,
            rooms: 10,
            publishers: 10,
            rate: 10.0,
            window: None,
            messages: None,
            payload: 32,
            duration_secs: 10.0,
            settle_secs: 2.0,
            connect_timeout_secs: 60.0,
            reconnect: false,
            sources: Vec::new(),
            procs: 1,
            max_loss: 0.0,
            token: None,
            events: None,
            app: AppProtocol::Rooms,
        }
    }
}

/// Which app's events the clients use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    /// The default app: `whoami`, `join`, `publish` `{room, data}`, `message`.
    #[default]
    Rooms,
    /// The chat example: `nick`, `join`, `say` `{room, text}`, `line` (the payload travels as
    /// the line's text; each line is also kept in the room's history).
    Chat,
}

/// A scenario that cannot run, with the field at fault.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ScenarioError {
    /// The field.
    pub field: &'static str,
    /// What is wrong.
    pub message: String,
}

fn err<T>(field: &'static str, message: impl Into<String>) -> Result<T, ScenarioError> {
    Err(ScenarioError {
        field,
        message: message.into(),
    })
}

/// Where the server is.
#[derive(Debug, Clone)]
pub struct Target {
    /// `host:port` for the Host header.
    pub host: String,
    /// Its resolved address.
    pub addr: SocketAddr,
    /// The Engine.IO path, with a trailing slash.
    pub path: String,
}

impl Scenario {
    /// Reads a YAML file; errors name the line.
    pub fn from_file(path: &Path) -> Result<Scenario, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Checks the scenario and resolves the targets.
    pub fn check(&self) -> Result<Vec<Target>, ScenarioError> {
        if self.clients == 0 {
            return err("clients", "must be at least 1");
        }
        if self.rooms == 0 {
            return err("rooms", "must be at least 1");
        }
        if self.publishers > self.clients {
            return err("publishers", "cannot exceed clients");
        }
        if self.window.is_none() && self.publishers > 0 && self.rate <= 0.0 {
            return err("rate", "must be positive (or set window to flood)");
        }
        if self.window == Some(0) {
            return err("window", "must be at least 1");
        }
        if self.connect_rate <= 0.0 {
            return err("connect_rate", "must be positive");
        }
        if !(1..=64).contains(&self.procs) {
            return err("procs", "must be 1 to 64");
        }
        if !(0.0..=1.0).contains(&self.max_loss) {
            return err("max_loss", "must be between 0 and 1");
        }
        if self.duration_secs < 0.0 || self.settle_secs < 0.0 {
            return err("duration_secs", "times must not be negative");
        }
        self.source_addrs()?;
        self.url.split(',').map(|u| self.target(u.trim())).collect()
    }

    fn target(&self, url: &str) -> Result<Target, ScenarioError> {
        let Some(rest) = url.strip_prefix("http://") else {
            return err("url", "must start with http:// (TLS is not supported)");
        };
        let host = rest.trim_end_matches('/');
        if host.contains('/') {
            return err("url", "give the server only; the Engine.IO path is `path`");
        }
        let host = if host.contains(':') {
            host.to_owned()
        } else {
            format!("{host}:80")
        };
        let Some(addr) = host.to_socket_addrs().ok().and_then(|mut a| a.next()) else {
            return err("url", format!("cannot resolve {host}"));
        };
        let path = format!("/{}/", self.path.trim_matches('/'));
        Ok(Target { host, addr, path })
    }

    /// The local source addresses, expanded.
    pub fn source_addrs(&self) -> Result<Vec<IpAddr>, ScenarioError> {
        let mut out = Vec::new();
        for s in &self.sources {
            let (a, b) = s.split_once('-').unwrap_or((s, s));
            let (Ok(a), Ok(b)) = (a.trim().parse::<Ipv4Addr>(), b.trim().parse::<Ipv4Addr>())
            else {
                return err("sources", format!("`{s}` is not an IPv4 address or range"));
            };
            if !a.is_loopback() || !b.is_loopback() || u32::from(a) > u32::from(b) {
                return err(
                    "sources",
                    format!("`{s}` must be an ascending range in 127.0.0.0/8"),
                );
            }
            out.extend((u32::from(a)..=u32::from(b)).map(|n| IpAddr::V4(Ipv4Addr::from(n))));
        }
        Ok(out)
    }

    /// The room of client `i`.
    pub fn room_of(&self, i: usize) -> String {
        format!("r{}", i % self.rooms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_check() {
        let t = Scenario::default().check().unwrap();
        assert_eq!(t[0].host, "127.0.0.1:8000");
        assert_eq!(t[0].path, "/socket.io/");
        let two = Scenario {
            url: "http://127.0.0.1:1,http://127.0.0.1:2/".into(),
            ..Scenario::default()
        };
        assert_eq!(two.check().unwrap().len(), 2);
    }

    #[test]
    fn yaml_names_unknown_fields() {
        let e = serde_yaml::from_str::<Scenario>("clients: 5\nclinets: 3\n").unwrap_err();
        assert!(e.to_string().contains("clinets"), "{e}");
    }

    #[test]
    fn sources_expand_and_stay_in_loopback() {
        let s = Scenario {
            sources: vec!["127.0.0.2-127.0.0.4".into(), "127.0.0.9".into()],
            ..Scenario::default()
        };
        assert_eq!(s.source_addrs().unwrap().len(), 4);
        let bad = Scenario {
            sources: vec!["10.0.0.1".into()],
            ..Scenario::default()
        };
        assert_eq!(bad.check().unwrap_err().field, "sources");
    }

    #[test]
    fn mixed_alternates_websocket_and_upgrade() {
        let t = Transport::Mixed;
        assert_eq!(t.for_client(0), Transport::Websocket);
        assert_eq!(t.for_client(1), Transport::Upgrade);
        assert_eq!(Transport::Polling.for_client(1), Transport::Polling);
        let s: Scenario = serde_yaml::from_str("transport: mixed\nevents: /tmp/e\n").unwrap();
        assert_eq!(s.transport, Transport::Mixed);
        assert_eq!(s.events.as_deref(), Some("/tmp/e"));
    }

    #[test]
    fn rejects_impossible_scenarios() {
        let s = Scenario {
            publishers: 200,
            ..Scenario::default()
        };
        assert_eq!(s.check().unwrap_err().field, "publishers");
        let s = Scenario {
            url: "https://x".into(),
            ..Scenario::default()
        };
        assert_eq!(s.check().unwrap_err().field, "url");
    }
}
