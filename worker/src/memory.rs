//! Memory freed after a peak goes back to the system.
//!
//! glibc's allocator keeps what a reconnect storm or a burst of connections freed in its
//! per-thread arenas: measured, a worker whose 1,500 WebSocket clients all left stayed at 42-45 MB
//! (idle: 10 MB) until `malloc_trim` brought it to 14 MB, and a chaos soak read that retention
//! as growth. Trimming every [`TRIM_EVERY`] keeps RSS near what the worker really holds.
//!
//! What trimming cannot hand back is freed memory between chunks still in use: after a peak of
//! connections (a reconnect storm from a dead worker) the allocator keeps part of it, and RSS
//! stays above what the worker holds. `fleet_worker_heap_bytes` tells the two apart, `in_use`
//! (which follows the connections: a leak would grow it) and `free` (kept by the allocator).

use std::time::Duration;

use prometheus::IntGaugeVec;
use shared::shutdown::Shutdown;

/// How often freed memory is handed back.
const TRIM_EVERY: Duration = Duration::from_secs(30);

/// Hands freed heap memory back to the system every [`TRIM_EVERY`] until shutdown, then
/// records the heap in `heap` (`fleet_worker_heap_bytes`).
pub async fn trim_freed(heap: IntGaugeVec, mut shutdown: Shutdown) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TRIM_EVERY) => {}
            _ = shutdown.recv() => return,
        }
        // Both walk every arena under its lock: off the runtime's threads.
        let heap = heap.clone();
        let _ = tokio::task::spawn_blocking(move || {
            trim();
            record(&heap);
        })
        .await;
    }
}

/// Sets `heap`'s `in_use` and `free` series from the allocator's own figures.
pub fn record(heap: &IntGaugeVec) {
    if let Some(Heap { in_use, free }) = heap_now() {
        heap.with_label_values(&["in_use"]).set(saturating(in_use));
        heap.with_label_values(&["free"]).set(saturating(free));
    }
}

fn saturating(bytes: usize) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

/// The heap as the allocator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heap {
    /// Bytes in allocations not yet freed (in arenas and mapped on their own).
    pub in_use: usize,
    /// Bytes freed but kept by the allocator in its arenas.
    pub free: usize,
}

/// The heap now, where the allocator can say (glibc's).
#[cfg(target_env = "gnu")]
pub fn heap_now() -> Option<Heap> {
    // SAFETY: mallinfo2 reads the allocator's statistics under its locks; no preconditions.
    let m = unsafe { libc::mallinfo2() };
    Some(Heap {
        in_use: m.uordblks + m.hblkhd,
        free: m.fordblks,
    })
}

/// The heap now, where the allocator can say (glibc's).
#[cfg(not(target_env = "gnu"))]
pub fn heap_now() -> Option<Heap> {
    None
}

#[cfg(target_env = "gnu")]
fn trim() {
    // SAFETY: malloc_trim only releases free memory at the top of glibc's heaps and in its
    // arenas; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(target_env = "gnu"))]
fn trim() {}

#[cfg(all(test, target_env = "gnu"))]
mod tests {
    use super::*;

    #[test]
    fn in_use_follows_what_is_held() {
        // 32 MB in blocks small enough to stay in the arenas, as connections' allocations do;
        // the margins leave room for what tests running beside this one allocate meanwhile.
        const BLOCKS: usize = 16 * 1024;
        const SIZE: usize = 2000;
        const MARGIN: usize = 8 << 20;
        let before = heap_now().unwrap();
        let held: Vec<Vec<u8>> = (0..BLOCKS).map(|i| vec![i as u8; SIZE]).collect();
        let holding = heap_now().unwrap();
        assert!(
            holding.in_use + MARGIN >= before.in_use + BLOCKS * SIZE,
            "{before:?} -> {holding:?}"
        );
        drop(held);
        let after = heap_now().unwrap();
        assert!(
            after.in_use + BLOCKS * SIZE <= holding.in_use + MARGIN,
            "{holding:?} -> {after:?}"
        );
    }
}
