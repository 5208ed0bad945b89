//! One simulated client: connect, `whoami`, `join` its room, then (if a publisher) publish
//! while counting every `message` it receives.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use shared::protocol::{EV_JOIN, EV_MESSAGE, EV_PUBLISH, EV_WHOAMI};
use shared::{Backoff, unix_micros};
use tokio::sync::watch;
use tokio::time::{Interval, MissedTickBehavior, interval_at};

use crate::protocol::{self, Packet, Sio};
use crate::scenario::{AppProtocol, Scenario, Target, Transport};
use crate::stats::{Seen, Stats};
use crate::transport::{Conn, ConnError};

/// What every client of a process shares.
pub struct Shared {
    /// The run.
    pub scenario: Scenario,
    /// The servers, used in turn.
    pub targets: Vec<Target>,
    /// The counters.
    pub stats: Stats,
    /// Local source addresses to use in turn.
    pub sources: Vec<IpAddr>,
    /// The run's phase: clients wait for `Publish`, stop publishing at `Settle`, leave at `Stop`.
    pub phase: watch::Receiver<Phase>,
}

/// Where the run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Clients connect and join.
    Connect,
    /// Publishers publish.
    Publish,
    /// Nobody publishes; deliveries still count.
    Settle,
    /// Everyone leaves.
    Stop,
}

const WHOAMI_ACK: u64 = 1;
const JOIN_ACK: u64 = 2;
/// Publishes use ack ids from here on.
const FIRST_PUBLISH_ACK: u64 = 3;
/// A dropped client reconnects after 100 ms, then 200 ms … up to 2 s (plus jitter, so the
/// clients of a worker that went away do not come back in step).
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(2);

/// Runs client `index` (numbered over all processes) until the run stops.
pub async fn run(index: usize, shared: Arc<Shared>) {
    let sc = &shared.scenario;
    let room_no = index % sc.rooms;
    let room = sc.room_of(index);
    let source = (!shared.sources.is_empty()).then(|| shared.sources[index % shared.sources.len()]);
    let target = &shared.targets[index % shared.targets.len()];
    let transport = sc.transport.for_client(index);
    let mut phase = shared.phase.clone();

    let conn = loop {
        match connect(&shared, target, transport, source, &room).await {
            Ok((conn, worker)) => {
                if *phase.borrow() == Phase::Connect {
                    shared.stats.member(room_no, &worker);
                    shared.stats.ready.fetch_add(1, Relaxed);
                    shared
                        .stats
                        .event(format_args!("j {index} {worker} {}", unix_micros()));
                    break Some((conn, worker));
                }
                // Too late to be counted as a member: it would receive unowed deliveries.
                shared.stats.error("joined_late");
                conn.close().await;
                break None;
            }
            Err(e) => {
                shared.stats.error(&e.kind());
                if !sc.reconnect || *phase.borrow() != Phase::Connect {
                    break None;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    let Some((mut c, worker)) = conn else {
        shared.stats.failed.fetch_add(1, Relaxed);
        return;
    };
    shared.stats.connected.fetch_add(1, Relaxed);

    // Straight into the session loop: it answers the server's pings while others connect
    // (a client that only waited would be dropped by the heartbeat in a long connect phase),
    // and publishes only once the run reaches `Phase::Publish`.
    let mut member = Member {
        index,
        room,
        room_no,
        publisher: index < sc.publishers,
        worker,
        transport,
        pending: HashMap::new(),
        seq: 0,
        next_ack: FIRST_PUBLISH_ACK,
        inflight: 0,
        seen: Seen::default(),
        padding: "x".repeat(sc.payload),
    };
    loop {
        match member.session(&shared, &mut c, &mut phase).await {
            Ok(()) => break,
            Err(e) => {
                shared.stats.connected.fetch_sub(1, Relaxed);
                if *phase.borrow() == Phase::Stop {
                    return;
                }
                shared.stats.error(&format!("dropped_{}", e.kind()));
                shared
                    .stats
                    .event(format_args!("d {index} {} {}", unix_micros(), e.kind()));
                if !sc.reconnect {
                    return;
                }
                match member.reconnect(&shared, target, source, &mut phase).await {
                    Some(fresh) => {
                        c = fresh;
                        shared.stats.connected.fetch_add(1, Relaxed);
                    }
                    None => return,
                }
            }
        }
    }
    shared.stats.connected.fetch_sub(1, Relaxed);
    c.close().await;
}

/// Connects, asks whoami and joins `room`; returns the connection and the worker's id.
async fn connect(
    shared: &Shared,
    target: &Target,
    transport: Transport,
    source: Option<IpAddr>,
    room: &str,
) -> Result<(Conn, String), ConnError> {
    let started = Instant::now();
    let (mut conn, _open) = Conn::open(target, transport, source).await?;
    conn.send(&[protocol::connect(shared.scenario.token.as_deref())])
        .await?;
    let mut worker = None;
    let mut joined = false;
    let mut connected = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while worker.is_none() || !joined {
        let packets = tokio::time::timeout_at(deadline, conn.recv())
            .await
            .map_err(|_| ConnError::Timeout)??;
        for p in packets {
            match p {
                Packet::Ping(x) => conn.send(&[format!("3{x}")]).await?,
                Packet::Message(Sio::Connect) if !connected => {
                    connected = true;
                    shared
                        .stats
                        .connect_latency(started.elapsed().as_micros() as u64);
                    conn.send(&greeting(shared.scenario.app, room)).await?;
                }
                Packet::Message(Sio::Ack {
                    id: WHOAMI_ACK,
                    args,
                }) => {
                    // The chat's `nick` answers no worker id: its clients count under "?".
                    worker = Some(
                        args.first()
                            .and_then(|a| a["worker"].as_str())
                            .unwrap_or("?")
                            .to_owned(),
                    );
                }
                Packet::Message(Sio::Ack { id: JOIN_ACK, args }) => {
                    if args.first().and_then(|a| a["ok"].as_bool()) != Some(true) {
                        return Err(ConnError::Protocol(format!("join refused: {args:?}")));
                    }
                    joined = true;
                }
                Packet::Message(Sio::ConnectError(e)) => return Err(ConnError::Protocol(e)),
                Packet::Close | Packet::Message(Sio::Disconnect) => {
                    return Err(ConnError::Closed("closed while connecting".into()));
                }
                _ => {}
            }
        }
    }
    Ok((conn, worker.unwrap_or_default()))
}

/// What a client sends once connected: `whoami` (the chat: `nick`) and `join` its room, each
/// with its ack id.
fn greeting(app: AppProtocol, room: &str) -> [String; 2] {
    let hello = match app {
        AppProtocol::Rooms => protocol::bare_event(Some(WHOAMI_ACK), EV_WHOAMI),
        AppProtocol::Chat => protocol::event(Some(WHOAMI_ACK), "nick", &json!("load")),
    };
    [
        hello,
        protocol::event(Some(JOIN_ACK), EV_JOIN, &json!(room)),
    ]
}

/// A connected member's running state.
struct Member {
    index: usize,
    room: String,
    room_no: usize,
    publisher: bool,
    /// The worker it is on now (whoami).
    worker: String,
    transport: Transport,
    /// Publishes awaiting their ack: ack id → (seq, Unix µs sent).
    pending: HashMap<u64, (u64, u64)>,
    seq: u64,
    next_ack: u64,
    inflight: usize,
    seen: Seen,
    padding: String,
}

impl Member {
    /// Runs until the run stops (`Ok`) or the connection fails.
    async fn session(
        &mut self,
        shared: &Shared,
        conn: &mut Conn,
        phase: &mut watch::Receiver<Phase>,
    ) -> Result<(), ConnError> {
        let sc = &shared.scenario;
        let period = Duration::from_secs_f64(1.0 / sc.rate.max(0.001));
        let mut tick: Option<Interval> = None;
        loop {
            let now = *phase.borrow();
            if now == Phase::Stop {
                return Ok(());
            }
            let publishing =
                self.publisher && now == Phase::Publish && sc.messages.is_none_or(|n| self.seq < n);
            let flood_room = sc.window.is_some_and(|w| self.inflight < w);
            if publishing && tick.is_none() {
                // Publisher i starts i/publishers of a period in: the offered load is smooth,
                // not every publisher firing at once each period (which would measure how
                // fast a server drains bursts, not its latency at the stated rate).
                let offset = period.mul_f64(self.index as f64 / sc.publishers.max(1) as f64);
                let mut t = interval_at(tokio::time::Instant::now() + offset, period);
                t.set_missed_tick_behavior(MissedTickBehavior::Delay);
                tick = Some(t);
            }
            tokio::select! {
                packets = conn.recv() => {
                    for p in packets? {
                        self.handle(shared, conn, p).await?;
                    }
                }
                _ = async { tick.as_mut().expect("set when publishing").tick().await },
                    if publishing && sc.window.is_none() => {
                    self.publish(shared, conn).await?;
                }
                _ = std::future::ready(()), if publishing && flood_room => {
                    self.publish(shared, conn).await?;
                }
                _ = phase.changed() => {}
            }
        }
    }

    async fn handle(
        &mut self,
        shared: &Shared,
        conn: &mut Conn,
        p: Packet,
    ) -> Result<(), ConnError> {
        match p {
            Packet::Ping(x) => conn.send(&[format!("3{x}")]).await?,
            Packet::Message(Sio::Event { name, args, .. }) if name == EV_MESSAGE => {
                self.delivered(shared, args.first().map(|m| &m["data"]));
            }
            Packet::Message(Sio::Event { name, args, .. }) if name == "line" => {
                // The chat's line carries the payload as its text.
                let data = args
                    .first()
                    .and_then(|l| l["text"].as_str())
                    .and_then(|t| serde_json::from_str::<Value>(t).ok());
                self.delivered(shared, data.as_ref());
            }
            Packet::Message(Sio::Ack { id, args }) if id >= FIRST_PUBLISH_ACK => {
                self.inflight = self.inflight.saturating_sub(1);
                let sent = self.pending.remove(&id);
                if args.first().and_then(|a| a["ok"].as_bool()) == Some(true) {
                    shared.stats.acked.fetch_add(1, Relaxed);
                    if let Some((seq, t)) = sent {
                        shared.stats.event(format_args!(
                            "a {} {seq} {} {} {t} {}",
                            self.index,
                            self.room_no,
                            self.worker,
                            unix_micros()
                        ));
                    }
                } else {
                    shared.stats.error("publish_refused");
                }
            }
            Packet::Close | Packet::Message(Sio::Disconnect) => {
                return Err(ConnError::Closed("server closed the session".into()));
            }
            _ => {}
        }
        Ok(())
    }

    fn delivered(&mut self, shared: &Shared, data: Option<&Value>) {
        let Some(data) = data else {
            shared.stats.error("bad_message");
            return;
        };
        let (Some(p), Some(s), Some(t)) =
            (data["p"].as_u64(), data["s"].as_u64(), data["t"].as_u64())
        else {
            shared.stats.error("bad_message");
            return;
        };
        shared.stats.delivered.fetch_add(1, Relaxed);
        if !self.seen.first_time(p, s) {
            shared.stats.duplicates.fetch_add(1, Relaxed);
            return;
        }
        shared.stats.event(format_args!("r {} {p} {s}", self.index));
        shared
            .stats
            .delivery_latency(self.index, unix_micros().saturating_sub(t));
    }

    async fn publish(&mut self, shared: &Shared, conn: &mut Conn) -> Result<(), ConnError> {
        let id = self.next_ack;
        self.next_ack += 1;
        let now = unix_micros();
        let data = json!({"p": self.index, "s": self.seq, "t": now, "x": self.padding});
        self.pending.insert(id, (self.seq, now));
        let (event, arg) = match shared.scenario.app {
            AppProtocol::Rooms => (EV_PUBLISH, json!({ "room": self.room, "data": data })),
            AppProtocol::Chat => (
                "say",
                json!({ "room": self.room, "text": data.to_string() }),
            ),
        };
        self.seq += 1;
        self.inflight += 1;
        shared.stats.published(self.room_no);
        conn.send(&[protocol::event(Some(id), event, &arg)]).await
    }

    /// Connects again with backoff and rejoins the room, unless the run stops first.
    async fn reconnect(
        &mut self,
        shared: &Shared,
        target: &Target,
        source: Option<IpAddr>,
        phase: &mut watch::Receiver<Phase>,
    ) -> Option<Conn> {
        let mut backoff = Backoff::new(RECONNECT_MIN, RECONNECT_MAX);
        loop {
            if *phase.borrow() == Phase::Stop {
                return None;
            }
            match connect(shared, target, self.transport, source, &self.room).await {
                Ok((conn, worker)) => {
                    shared.stats.reconnects.fetch_add(1, Relaxed);
                    shared
                        .stats
                        .event(format_args!("j {} {worker} {}", self.index, unix_micros()));
                    self.worker = worker;
                    self.inflight = 0;
                    self.pending.clear();
                    return Some(conn);
                }
                Err(e) => shared.stats.error(&format!("reconnect_{}", e.kind())),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = phase.changed() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The greeting is the default app's protocol, byte for byte.
    #[test]
    fn greets_with_whoami_then_join() {
        assert_eq!(
            greeting(AppProtocol::Rooms, "r3"),
            [r#"421["whoami"]"#, r#"422["join","r3"]"#]
        );
        assert_eq!(
            greeting(AppProtocol::Chat, "r3"),
            [r#"421["nick","load"]"#, r#"422["join","r3"]"#]
        );
    }
}
