//! Memory freed after a peak goes back to the system.
//!
//! glibc's allocator keeps what a reconnect storm or a burst of connections freed in its
//! per-thread arenas: measured, a worker whose 1,500 WebSocket clients all left stayed at 42-45 MB
//! (idle: 10 MB) until `malloc_trim` brought it to 14 MB, and a chaos soak read that retention
//! as growth. Trimming every [`TRIM_EVERY`] keeps RSS near what the worker really holds.

use std::time::Duration;

use shared::shutdown::Shutdown;

/// How often freed memory is handed back.
const TRIM_EVERY: Duration = Duration::from_secs(30);

/// Hands freed heap memory back to the system every [`TRIM_EVERY`] until shutdown.
pub async fn trim_freed(mut shutdown: Shutdown) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TRIM_EVERY) => {}
            _ = shutdown.recv() => return,
        }
        // It walks every arena under its lock: off the runtime's threads.
        let _ = tokio::task::spawn_blocking(trim).await;
    }
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
