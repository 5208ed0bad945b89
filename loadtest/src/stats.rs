//! What one generator process counts, and the snapshot it reports (mergeable across processes).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use base64::Engine;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use serde::{Deserialize, Serialize};

use crate::events::EventLog;

/// Delivery latencies are recorded in shards so thousands of clients rarely share a lock.
const SHARDS: usize = 16;

/// A histogram of microseconds from 1 µs to one hour, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")
}

/// Live counters of one process.
pub struct Stats {
    /// Clients currently connected.
    pub connected: AtomicU64,
    /// Clients connected and joined before publishing started.
    pub ready: AtomicU64,
    /// Clients that gave up connecting.
    pub failed: AtomicU64,
    /// Reconnects after a drop.
    pub reconnects: AtomicU64,
    /// Publishes sent.
    pub published: AtomicU64,
    /// Publishes acknowledged `ok`.
    pub acked: AtomicU64,
    /// `message` events received by members.
    pub delivered: AtomicU64,
    /// Of those, ones already received by the same member.
    pub duplicates: AtomicU64,
    room_members: Vec<AtomicU64>,
    room_publishes: Vec<AtomicU64>,
    errors: Mutex<BTreeMap<String, u64>>,
    workers: Mutex<BTreeMap<String, u64>>,
    connect: Mutex<Histogram<u64>>,
    delivery: Vec<Mutex<Histogram<u64>>>,
    /// The event log, when the scenario asks for one.
    pub events: Option<EventLog>,
}

impl Stats {
    /// Counters for a run with `rooms` rooms.
    pub fn new(rooms: usize) -> Self {
        Stats {
            connected: AtomicU64::new(0),
            ready: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            published: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            room_members: (0..rooms).map(|_| AtomicU64::new(0)).collect(),
            room_publishes: (0..rooms).map(|_| AtomicU64::new(0)).collect(),
            errors: Mutex::new(BTreeMap::new()),
            workers: Mutex::new(BTreeMap::new()),
            connect: Mutex::new(new_histogram()),
            delivery: (0..SHARDS).map(|_| Mutex::new(new_histogram())).collect(),
            events: None,
        }
    }

    /// The same counters, writing to `events` too.
    pub fn with_events(self, events: Option<EventLog>) -> Self {
        Stats { events, ..self }
    }

    /// Appends a line to the event log, if there is one.
    pub fn event(&self, args: std::fmt::Arguments<'_>) {
        if let Some(log) = &self.events {
            log.line(args);
        }
    }

    /// Counts an error by kind.
    pub fn error(&self, kind: &str) {
        let mut e = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        *e.entry(kind.to_owned()).or_default() += 1;
        drop(e);
        self.event(format_args!("e {} {kind}", shared::unix_micros()));
    }

    /// Total errors so far.
    pub fn error_count(&self) -> u64 {
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .sum()
    }

    /// A client joined room `room` on `worker` before publishing started.
    pub fn member(&self, room: usize, worker: &str) {
        self.room_members[room].fetch_add(1, Relaxed);
        let mut w = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        *w.entry(worker.to_owned()).or_default() += 1;
    }

    /// A publish to room `room` was sent.
    pub fn published(&self, room: usize) {
        self.room_publishes[room].fetch_add(1, Relaxed);
        self.published.fetch_add(1, Relaxed);
    }

    /// Records a connect latency.
    pub fn connect_latency(&self, micros: u64) {
        let mut h = self.connect.lock().unwrap_or_else(|p| p.into_inner());
        h.saturating_record(micros.max(1));
    }

    /// Records a delivery latency, from client `shard`.
    pub fn delivery_latency(&self, shard: usize, micros: u64) {
        let mut h = self.delivery[shard % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        h.saturating_record(micros.max(1));
    }

    /// Delivery latency percentile so far, in microseconds.
    pub fn delivery_quantile(&self, q: f64) -> u64 {
        self.deliveries().value_at_quantile(q)
    }

    /// Every shard's delivery latencies in one histogram.
    fn deliveries(&self) -> Histogram<u64> {
        let mut all = new_histogram();
        for shard in &self.delivery {
            let h = shard.lock().unwrap_or_else(|p| p.into_inner());
            all.add(&*h).expect("same bounds");
        }
        all
    }

    /// Everything counted, for the report.
    pub fn snapshot(&self, clients: usize) -> Snapshot {
        let delivery = self.deliveries();
        let connect = self.connect.lock().unwrap_or_else(|p| p.into_inner());
        Snapshot {
            clients: clients as u64,
            ready: self.ready.load(Relaxed),
            failed: self.failed.load(Relaxed),
            reconnects: self.reconnects.load(Relaxed),
            published: self.published.load(Relaxed),
            acked: self.acked.load(Relaxed),
            delivered: self.delivered.load(Relaxed),
            duplicates: self.duplicates.load(Relaxed),
            room_members: self.room_members.iter().map(|a| a.load(Relaxed)).collect(),
            room_publishes: self
                .room_publishes
                .iter()
                .map(|a| a.load(Relaxed))
                .collect(),
            errors: self
                .errors
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            workers: self
                .workers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            connect_hist: encode(&connect),
            delivery_hist: encode(&delivery),
            publish_secs: 0.0,
            publish_http_requests: 0,
        }
    }
}

/// One process's totals; snapshots of several processes merge into one.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Snapshot {
    /// Clients this process was to run.
    pub clients: u64,
    /// Clients connected and joined when publishing started.
    pub ready: u64,
    /// Clients that never connected.
    pub failed: u64,
    /// Reconnects after a drop.
    pub reconnects: u64,
    /// Publishes sent.
    pub published: u64,
    /// Publishes acknowledged ok.
    pub acked: u64,
    /// Deliveries received by members.
    pub delivered: u64,
    /// Deliveries a member had already received.
    pub duplicates: u64,
    /// Members per room.
    pub room_members: Vec<u64>,
    /// Publishes per room.
    pub room_publishes: Vec<u64>,
    /// Errors by kind.
    pub errors: BTreeMap<String, u64>,
    /// Members per worker (from whoami).
    pub workers: BTreeMap<String, u64>,
    /// Connect latencies (µs), HDR V2, base64.
    pub connect_hist: String,
    /// Delivery latencies (µs), HDR V2, base64.
    pub delivery_hist: String,
    /// How long publishing lasted, in seconds.
    pub publish_secs: f64,
    /// HTTP requests answered while publishing (polling; 0 over WebSocket).
    #[serde(default)]
    pub publish_http_requests: u64,
}

fn encode(h: &Histogram<u64>) -> String {
    let mut buf = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut buf)
        .expect("serialising to memory");
    base64::engine::general_purpose::STANDARD.encode(buf)
}

/// Decodes a histogram written by [`Snapshot`]; an empty or damaged one reads as empty.
pub fn decode(text: &str) -> Histogram<u64> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()
        .and_then(|bytes| {
            Deserializer::new()
                .deserialize::<u64, _>(&mut bytes.as_slice())
                .ok()
        })
        .unwrap_or_else(new_histogram)
}

fn add_vec(a: &mut Vec<u64>, b: &[u64]) {
    if a.len() < b.len() {
        a.resize(b.len(), 0);
    }
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

fn add_map(a: &mut BTreeMap<String, u64>, b: &BTreeMap<String, u64>) {
    for (k, v) in b {
        *a.entry(k.clone()).or_default() += v;
    }
}

impl Snapshot {
    /// Adds another process's snapshot to this one.
    pub fn merge(&mut self, o: &Snapshot) {
        self.clients += o.clients;
        self.ready += o.ready;
        self.failed += o.failed;
        self.reconnects += o.reconnects;
        self.published += o.published;
        self.acked += o.acked;
        self.delivered += o.delivered;
        self.duplicates += o.duplicates;
        add_vec(&mut self.room_members, &o.room_members);
        add_vec(&mut self.room_publishes, &o.room_publishes);
        add_map(&mut self.errors, &o.errors);
        add_map(&mut self.workers, &o.workers);
        for (mine, theirs) in [
            (&mut self.connect_hist, &o.connect_hist),
            (&mut self.delivery_hist, &o.delivery_hist),
        ] {
            let mut h = decode(mine);
            h.add(decode(theirs)).expect("same bounds");
            *mine = encode(&h);
        }
        self.publish_secs = self.publish_secs.max(o.publish_secs);
        self.publish_http_requests += o.publish_http_requests;
    }

    /// Deliveries owed: every publish to a room, once to each of its members.
    pub fn expected(&self) -> u64 {
        self.room_members
            .iter()
            .zip(&self.room_publishes)
            .map(|(m, p)| m * p)
            .sum()
    }
}

/// Exactly-once bookkeeping of one member: per publisher, the highest sequence number seen and
/// which of the 64 before it were seen, so a repeat is caught even out of order.
#[derive(Default)]
pub struct Seen {
    by_publisher: HashMap<u64, (u64, u64)>,
}

impl Seen {
    /// Records `seq` from `publisher`; false if this member already had it.
    pub fn first_time(&mut self, publisher: u64, seq: u64) -> bool {
        let Some((top, mask)) = self.by_publisher.get_mut(&publisher) else {
            self.by_publisher.insert(publisher, (seq, 1));
            return true;
        };
        if seq > *top {
            let shift = seq - *top;
            *mask = if shift >= 64 { 0 } else { *mask << shift };
            *mask |= 1;
            *top = seq;
            return true;
        }
        let back = *top - seq;
        if back >= 64 {
            // Too old to tell: counted as new (publishes are in order per publisher).
            return true;
        }
        let bit = 1u64 << back;
        let fresh = *mask & bit == 0;
        *mask |= bit;
        fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_catches_repeats_in_and_out_of_order() {
        let mut s = Seen::default();
        assert!(s.first_time(1, 0));
        assert!(s.first_time(1, 2));
        assert!(s.first_time(1, 1));
        assert!(!s.first_time(1, 1));
        assert!(!s.first_time(1, 2));
        assert!(s.first_time(2, 2));
        assert!(s.first_time(1, 100));
        assert!(!s.first_time(1, 100));
    }

    #[test]
    fn snapshots_merge_totals_and_histograms() {
        let a = Stats::new(2);
        a.member(0, "w0");
        a.member(1, "w1");
        a.published(0);
        a.delivery_latency(0, 500);
        let b = Stats::new(2);
        b.member(0, "w0");
        b.published(0);
        b.delivery_latency(3, 1500);
        let mut m = a.snapshot(2);
        m.merge(&b.snapshot(1));
        assert_eq!(m.room_members, vec![2, 1]);
        assert_eq!(m.room_publishes, vec![2, 0]);
        assert_eq!(m.expected(), 4);
        assert_eq!(m.workers["w0"], 2);
        assert_eq!(decode(&m.delivery_hist).len(), 2);
    }
}
