//! Readiness: ready while subscribed to Redis and not draining; otherwise a one-line reason.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;

use crate::drivers::LinkState;

/// What `/readyz` answers. Cheap to clone.
#[derive(Clone)]
pub struct Readiness {
    link: watch::Receiver<LinkState>,
    draining: Arc<AtomicBool>,
}

impl Readiness {
    /// Readiness following a Redis link's state.
    pub fn new(link: watch::Receiver<LinkState>) -> Self {
        Readiness {
            link,
            draining: Arc::new(AtomicBool::new(false)),
        }
    }

    /// From now on, not ready: the worker is moving its clients away.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// True once draining started.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// `Ok` when ready, else why not.
    pub fn check(&self) -> Result<(), String> {
        if self.is_draining() {
            return Err("draining: moving clients to other workers".into());
        }
        match &*self.link.borrow() {
            LinkState::Up => Ok(()),
            LinkState::Down(why) => Err(format!("not subscribed to redis: {why}")),
        }
    }
}
