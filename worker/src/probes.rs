//! Background measurements: event-loop lag, cross-worker pub/sub lag, Redis memory.

use std::time::Duration;

use futures_util::StreamExt;
use shared::{Shutdown, unix_micros};
use socketioxide_redis::drivers::Driver;
use tokio::time::Instant;

use crate::drivers::{LinkState, RedisLink};
use crate::metrics::WorkerMetrics;

/// How often the event-loop timer is armed.
const LOOP_TICK: Duration = Duration::from_millis(100);
/// How often each worker publishes its pub/sub probe.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How often Redis memory is polled.
const MEMORY_EVERY: Duration = Duration::from_secs(5);

/// Record how late a 100 ms timer fires: time the runtime was too busy to run it.
pub async fn event_loop_lag(metrics: WorkerMetrics, mut shutdown: Shutdown) {
    loop {
        let armed = Instant::now();
        tokio::select! {
            _ = tokio::time::sleep(LOOP_TICK) => {}
            _ = shutdown.recv() => return,
        }
        let late = armed.elapsed().saturating_sub(LOOP_TICK);
        metrics.event_loop_lag.observe(late.as_secs_f64());
    }
}

/// Publish `"<worker>|<unix µs>"` every second on the fleet's probe channel, and record how
/// late other workers' probes arrive here. Assumes the workers' clocks agree (same host, or
/// NTP); a skewed peer shows up as a constant offset.
pub async fn pubsub_lag(
    link: RedisLink,
    prefix: String,
    worker: String,
    metrics: WorkerMetrics,
    mut shutdown: Shutdown,
) {
    let chan = format!("{prefix}-probe");
    let Ok(mut incoming) = link.subscribe(chan.clone(), 64).await else {
        return;
    };
    let me = worker.clone();
    let recorder = async move {
        while let Some((_, payload)) = incoming.next().await {
            let Some((from, sent)) = parse_probe(&payload) else {
                continue;
            };
            if from != me {
                let lag = unix_micros().saturating_sub(sent);
                metrics.pubsub_lag.observe(lag as f64 / 1e6);
            }
        }
    };
    let mut state = link.state();
    let publisher = async move {
        let mut tick = tokio::time::interval(PROBE_EVERY);
        loop {
            tick.tick().await;
            // Skip while down: a probe is not a client message, and must not count as a loss.
            if *state.borrow_and_update() == LinkState::Up {
                let _ = link
                    .publish(
                        chan.clone(),
                        format!("{worker}|{}", unix_micros()).into_bytes(),
                    )
                    .await;
            }
        }
    };
    tokio::select! {
        _ = recorder => {}
        _ = publisher => {}
        _ = shutdown.recv() => {}
    }
}

/// Poll `INFO memory` (of every master, on a cluster) and export `used_memory`.
pub async fn redis_memory(link: RedisLink, metrics: WorkerMetrics, mut shutdown: Shutdown) {
    let mut tick = tokio::time::interval(MEMORY_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.recv() => return,
        }
        let Some(mut conn) = link.connection() else {
            // Not connected yet: look again soon, so the gauge appears as soon as Redis does.
            tick.reset_after(Duration::from_millis(200));
            continue;
        };
        // One series per master of a cluster (`node`), one with `node=""` otherwise; nodes
        // gone after a failover disappear.
        let info = tokio::time::timeout(Duration::from_secs(1), conn.memory_info()).await;
        if let Ok(Ok(nodes)) = info {
            metrics.redis_memory.reset();
            for (node, text) in nodes {
                if let Some(bytes) = used_memory(&text) {
                    metrics.redis_memory.with_label_values(&[&node]).set(bytes);
                }
            }
        }
    }
}

fn parse_probe(payload: &[u8]) -> Option<(&str, u64)> {
    let text = std::str::from_utf8(payload).ok()?;
    let (from, micros) = text.rsplit_once('|')?;
    Some((from, micros.parse().ok()?))
}

fn used_memory(info: &str) -> Option<i64> {
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_probe_and_info() {
        assert_eq!(parse_probe(b"w|1|42"), Some(("w|1", 42)));
        assert_eq!(parse_probe(b"junk"), None);
        assert_eq!(
            used_memory("# Memory\r\nused_memory:1024\r\nused_memory_human:1K\r\n"),
            Some(1024)
        );
    }
}
