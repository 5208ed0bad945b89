//! Readiness: whether this worker can serve clients. Ready once it has reached Redis since
//! start, until it drains. A Redis link lost after that is *degraded*, not unready: the worker
//! still serves its clients and delivers to members on it, so placement keeps using it (a
//! fleet whose workers all turned unready during an outage would refuse every new client).

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

    /// Ready, degraded, or not ready, with the reason.
    pub fn check(&self) -> Status {
        if self.is_draining() {
            return Status::NotReady("draining: moving clients to other workers".into());
        }
        match &*self.link.borrow() {
            LinkState::Up => Status::Ready,
            LinkState::Lost(why) => Status::Degraded(format!(
                "not subscribed to redis: {why}; serving local clients, cross-worker delivery paused"
            )),
            LinkState::Connecting(why) => {
                Status::NotReady(format!("not subscribed to redis yet: {why}"))
            }
        }
    }
}

/// What `/readyz` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Serving, linked to the fleet.
    Ready,
    /// Serving, but cut off from the other workers; why.
    Degraded(String),
    /// Not serving new clients; why.
    NotReady(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_link_degrades_a_started_worker_and_only_drain_or_no_start_unreadies_it() {
        let (tx, rx) = watch::channel(LinkState::Connecting("connecting".into()));
        let r = Readiness::new(rx);
        assert!(matches!(r.check(), Status::NotReady(why) if why.contains("redis")));
        tx.send_replace(LinkState::Up);
        assert_eq!(r.check(), Status::Ready);
        tx.send_replace(LinkState::Lost("refused".into()));
        assert!(matches!(r.check(), Status::Degraded(why) if why.contains("refused")));
        r.set_draining();
        assert!(matches!(r.check(), Status::NotReady(why) if why.contains("draining")));
    }
}
