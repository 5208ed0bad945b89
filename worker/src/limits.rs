//! What one client may do (`socketio.limits`), and the counts of what was refused
//! (`fleet_worker_limited_total{kind}`).
//!
//! Events are held at the Engine.IO layer, by a gate engineioxide asks about every message of a
//! session before socketioxide decodes it (see vendor/engineioxide/FLEET-PATCH.md): it is the
//! one place every event of every namespace and app passes, whatever handlers the app
//! registered, and a dropped event never reaches a handler, so it is never acknowledged. The
//! bucket is the Engine.IO session's, shared by the namespaces a client multiplexes on it.

use std::sync::Mutex;
use std::time::Instant;

use engineioxide::Str;
use engineioxide::gate::MessageGate;
use prometheus::IntCounter;

/// The `kind`s of `fleet_worker_limited_total`.
pub const KIND_EVENTS: &str = "events";
pub const KIND_ROOMS: &str = "rooms";
pub const KIND_MESSAGE_SIZE: &str = "message_size";
#[cfg(test)]
pub const KINDS: [&str; 3] = [KIND_EVENTS, KIND_ROOMS, KIND_MESSAGE_SIZE];

/// A token bucket of `rate` tokens a second holding at most `2 x rate`; it starts full.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: u32, now: Instant) -> Self {
        let rate = f64::from(rate);
        TokenBucket {
            rate,
            burst: 2.0 * rate,
            tokens: 2.0 * rate,
            last: now,
        }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// One Engine.IO session's gate: put in the extensions of the request that opens the session.
pub struct SessionGate {
    /// `None`: `events_per_sec` is 0.
    events: Option<Mutex<EventState>>,
    limited_events: IntCounter,
    limited_message_size: IntCounter,
}

struct EventState {
    bucket: TokenBucket,
    /// Binary attachments still to come of a dropped binary event: dropped with it, or
    /// socketioxide would take them for another packet's.
    skip_attachments: usize,
}

impl SessionGate {
    pub fn new(events_per_sec: u32, metrics: &crate::metrics::WorkerMetrics) -> Self {
        SessionGate {
            events: (events_per_sec > 0).then(|| {
                Mutex::new(EventState {
                    bucket: TokenBucket::new(events_per_sec, Instant::now()),
                    skip_attachments: 0,
                })
            }),
            limited_events: metrics.limited_events.clone(),
            limited_message_size: metrics.limited_message_size.clone(),
        }
    }
}

impl MessageGate for SessionGate {
    fn admit_text(&self, msg: &Str) -> bool {
        let Some(events) = &self.events else {
            return true;
        };
        let Some(attachments) = event_attachments(msg.as_str()) else {
            return true;
        };
        let mut state = events.lock().unwrap();
        if state.bucket.take(Instant::now()) {
            return true;
        }
        state.skip_attachments = attachments;
        self.limited_events.inc();
        false
    }

    fn admit_binary(&self, _data: &[u8]) -> bool {
        let Some(events) = &self.events else {
            return true;
        };
        let mut state = events.lock().unwrap();
        if state.skip_attachments == 0 {
            return true;
        }
        state.skip_attachments -= 1;
        false
    }

    fn message_too_big(&self) {
        self.limited_message_size.inc();
    }
}

/// For a Socket.IO EVENT (`2...`) or BINARY_EVENT (`5<n>-...`) packet, how many binary
/// attachments follow it; `None` for any other packet (connect, disconnect, acks), which is
/// never limited.
fn event_attachments(msg: &str) -> Option<usize> {
    match msg.as_bytes().first()? {
        b'2' => Some(0),
        b'5' => {
            let rest = &msg[1..];
            let digits = rest.find('-').map_or("", |i| &rest[..i]);
            // A malformed count is socketioxide's to refuse; nothing to skip here.
            Some(digits.parse().unwrap_or(0))
        }
        _ => None,
    }
}

/// A join refused by `socketio.limits.max_rooms_per_socket`. Its text is the refusal the
/// default app acknowledges: `{"ok": false, "error": "too many rooms"}`.
///
/// ```
/// assert_eq!(worker::TooManyRooms.to_string(), "too many rooms");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many rooms")]
pub struct TooManyRooms;

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_bucket_allows_a_burst_of_twice_the_rate_then_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, t0);
        let burst = (0..100).filter(|_| b.take(t0)).count();
        assert_eq!(burst, 20);
        // Half a second later: 5 more, not more.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!((0..100).filter(|_| b.take(t1)).count(), 5);
        // A long pause refills to the burst, never beyond.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!((0..100).filter(|_| b.take(t2)).count(), 20);
    }

    #[test]
    fn a_steady_rate_under_the_limit_is_never_refused() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, t0);
        for i in 0..1000 {
            assert!(b.take(t0 + Duration::from_millis(100 * i)), "event {i}");
        }
    }

    #[test]
    fn a_clock_that_does_not_advance_does_not_refill() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1, t0 + Duration::from_secs(1));
        assert!(b.take(t0) && b.take(t0));
        assert!(!b.take(t0));
    }

    #[test]
    fn only_events_are_limited() {
        assert_eq!(event_attachments(r#"2["echo",1]"#), Some(0));
        assert_eq!(event_attachments(r#"2/chat,5["echo",1]"#), Some(0));
        assert_eq!(
            event_attachments(r#"52-["up",{"_placeholder":true,"num":0}]"#),
            Some(2)
        );
        for other in ["0", "0/chat,", "1", r#"31["ok"]"#, r#"61-1[{}]"#, ""] {
            assert_eq!(event_attachments(other), None, "{other:?}");
        }
    }

    #[test]
    fn a_dropped_binary_event_takes_its_attachments_along() {
        let metrics = crate::metrics::WorkerMetrics::new("w0");
        let gate = SessionGate::new(1, &metrics);
        let event = Str::from(r#"52-["up",{"_placeholder":true,"num":0}]"#);
        assert!(gate.admit_text(&event) && gate.admit_binary(b"a") && gate.admit_binary(b"b"));
        assert!(gate.admit_text(&event));
        assert!(!gate.admit_text(&event), "over the burst of 2");
        assert!(!gate.admit_binary(b"a") && !gate.admit_binary(b"b"));
        assert!(gate.admit_binary(b"c"), "only the dropped event's two");
        assert!(gate.admit_text(&Str::from(r#"31["ack"]"#)), "acks pass");
        assert_eq!(metrics.limited_events.get(), 1);
    }

    #[test]
    fn without_a_rate_everything_passes() {
        let metrics = crate::metrics::WorkerMetrics::new("w0");
        let gate = SessionGate::new(0, &metrics);
        let event = Str::from(r#"2["echo"]"#);
        assert!((0..1000).all(|_| gate.admit_text(&event)));
    }
}
