//! A cloneable stop signal: every long-running loop selects its work against `recv()`.

use tokio::sync::watch;

/// The sending half: `trigger()` asks every [`Shutdown`] to stop. Dropping it does the same.
#[derive(Debug)]
pub struct ShutdownTrigger(watch::Sender<bool>);

/// The listening half, cheap to clone into every task.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// A connected pair: the trigger and its first listener.
pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger(tx), Shutdown(rx))
}

impl ShutdownTrigger {
    /// Ask every listener to stop. Idempotent.
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }

    /// A new listener of this trigger.
    pub fn subscribe(&self) -> Shutdown {
        Shutdown(self.0.subscribe())
    }
}

impl Shutdown {
    /// Wrap an existing watch receiver (pingora's `ShutdownWatch` is one).
    pub fn from_watch(rx: watch::Receiver<bool>) -> Self {
        Shutdown(rx)
    }

    /// True once stop was asked for.
    pub fn is_stopping(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves when stop is asked for, or when the trigger is gone (nobody can ask any more,
    /// which only happens when the owner is being torn down).
    pub async fn recv(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn trigger_wakes_every_clone() {
        let (tx, rx) = channel();
        let mut a = rx.clone();
        let mut b = tx.subscribe();
        assert!(!a.is_stopping());
        tx.trigger();
        a.recv().await;
        b.recv().await;
        assert!(a.is_stopping());
    }

    #[tokio::test]
    async fn dropped_trigger_counts_as_stop() {
        let (tx, mut rx) = channel();
        drop(tx);
        rx.recv().await;
    }
}
