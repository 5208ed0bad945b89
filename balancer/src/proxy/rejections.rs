//! Requests the balancer refuses or fails: logged once per class, not once per request.
//!
//! A scanner, a crowd of clients with stale sessions or a dead worker must not flood the log:
//! the first event of each class is logged with an example, and later ones are only counted
//! (in metrics, and in a summary logged at most once a minute).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How often the "and N more" summary may be logged.
const SUMMARY_EVERY: Duration = Duration::from_secs(60);

/// The process's one log of refusals (the listener, the proxy and the log filter share it, so
/// each class is logged once).
pub fn shared() -> Arc<RejectLog> {
    static SHARED: OnceLock<Arc<RejectLog>> = OnceLock::new();
    Arc::clone(SHARED.get_or_init(Default::default))
}

/// Counts since the last log line, per class.
#[derive(Default)]
pub struct RejectLog {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    seen: HashMap<String, u64>,
    unlogged: HashMap<String, u64>,
    last_summary: Option<Instant>,
}

impl RejectLog {
    /// Counts one event; logs it if it is the first of its class, or a summary if one is due.
    pub fn note(&self, class: &str, detail: &dyn std::fmt::Display) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let seen = match st.seen.get_mut(class) {
            Some(n) => {
                *n += 1;
                *n
            }
            None => {
                st.seen.insert(class.to_owned(), 1);
                1
            }
        };
        if seen == 1 {
            st.last_summary.get_or_insert_with(Instant::now);
            tracing::warn!(
                "first {class}: {detail} (later ones are counted, with a summary at most once a minute)"
            );
            return;
        }
        match st.unlogged.get_mut(class) {
            Some(n) => *n += 1,
            None => {
                st.unlogged.insert(class.to_owned(), 1);
            }
        }
        let now = Instant::now();
        if st
            .last_summary
            .is_some_and(|t| now.duration_since(t) < SUMMARY_EVERY)
        {
            return;
        }
        st.last_summary = Some(now);
        let mut parts: Vec<String> = st
            .unlogged
            .drain()
            .map(|(c, n)| format!("{c}={n}"))
            .collect();
        parts.sort();
        tracing::info!("since the last summary: {}", parts.join(" "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_every_event_and_keeps_later_ones_for_the_summary() {
        let log = RejectLog::default();
        for _ in 0..5 {
            log.note("header_too_large", &"x");
        }
        log.note("not_found", &"y");
        let st = log.state.lock().unwrap();
        assert_eq!(st.seen["header_too_large"], 5);
        assert_eq!(st.seen["not_found"], 1);
        // The summary is due a minute after the first line.
        assert_eq!(st.unlogged["header_too_large"], 4);
        assert!(!st.unlogged.contains_key("not_found"));
    }
}
