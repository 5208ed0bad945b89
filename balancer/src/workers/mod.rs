//! The one view of the workers: which exist, whether each is up, and its load. Routing,
//! placement, the admin endpoints and the `worker_up` gauge read it; the [`Watcher`] writes
//! it, from [`discovery`] (which workers exist) and one [`probe`] per worker per interval
//! (whether it is ready, and how many sessions it holds).
//!
//! The set of workers is a [`Snapshot`] swapped whole when membership changes; health and
//! load change in place on each [`Worker`], so a request never waits for the prober.

pub mod discovery;
pub mod probe;
mod watcher;
mod worker;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::placement::{self, Placement};
use crate::sticky::Tag;
pub use watcher::Watcher;
pub use worker::{Load, Worker};

/// The workers at one moment, with the placement policy built over them.
pub struct Snapshot {
    workers: Vec<Arc<Worker>>,
    by_tag: HashMap<Tag, usize>,
    placement: Box<dyn Placement>,
}

impl Snapshot {
    /// A snapshot of `workers` placing new sessions by `config`.
    pub fn new(workers: Vec<Arc<Worker>>, config: &placement::Config) -> Self {
        Snapshot {
            by_tag: workers
                .iter()
                .enumerate()
                .map(|(i, w)| (w.tag(), i))
                .collect(),
            placement: placement::build(config, &workers),
            workers,
        }
    }

    /// Every worker, up or not.
    pub fn workers(&self) -> &[Arc<Worker>] {
        &self.workers
    }

    /// The worker a sticky tag names.
    pub fn by_tag(&self, tag: Tag) -> Option<&Arc<Worker>> {
        self.by_tag.get(&tag).map(|&i| &self.workers[i])
    }

    /// The worker for a new session from `key` (see [`Placement::choose`]), never one in
    /// `exclude` (workers that just refused the connection). Among the workers that are up; if
    /// none is, among those that still answer their probes (a panic placement, as Envoy's
    /// panic threshold: refusing everyone while workers are alive helps nobody).
    pub fn place(&self, key: &[u8], nonce: u64, exclude: &[SocketAddr]) -> Option<Placed<'_>> {
        let fresh = |w: &Worker| !exclude.contains(&w.addr());
        let up = |w: &Worker| w.is_up() && fresh(w);
        if let Some(i) = self.placement.choose(&self.workers, key, nonce, &up) {
            return Some(Placed {
                worker: &self.workers[i],
                panic: false,
            });
        }
        let answering = |w: &Worker| w.answers() && fresh(w);
        let i = self
            .placement
            .choose(&self.workers, key, nonce, &answering)?;
        Some(Placed {
            worker: &self.workers[i],
            panic: true,
        })
    }

    /// How many workers are up.
    pub fn ready(&self) -> usize {
        self.workers.iter().filter(|w| w.is_up()).count()
    }
}

/// A placement: the worker, and whether it was a panic placement (no worker up).
pub struct Placed<'a> {
    /// The chosen worker.
    pub worker: &'a Arc<Worker>,
    /// True when no worker was up and the choice fell among those still answering.
    pub panic: bool,
}

/// The live view, shared by everything in the balancer.
pub struct Workers {
    current: ArcSwap<Snapshot>,
    placement: placement::Config,
    secret: String,
}

impl Workers {
    /// No workers yet; `secret` keys their sticky tags.
    pub fn new(placement: placement::Config, secret: &str) -> Self {
        Workers {
            current: ArcSwap::from_pointee(Snapshot::new(Vec::new(), &placement)),
            placement,
            secret: secret.to_owned(),
        }
    }

    /// The workers now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Makes `members` (address, label) the fleet. A worker already known keeps its state
    /// (health, load); a new one starts down until probed. Returns the workers added and
    /// removed.
    pub fn set_members(&self, members: &[(SocketAddr, String)]) -> Change {
        let old = self.snapshot();
        let known: HashMap<SocketAddr, &Arc<Worker>> =
            old.workers.iter().map(|w| (w.addr(), w)).collect();
        let mut change = Change::default();
        let workers: Vec<Arc<Worker>> = members
            .iter()
            .map(|(addr, label)| match known.get(addr) {
                Some(w) if w.label() == label => Arc::clone(w),
                _ => {
                    let w = Arc::new(Worker::new(*addr, label, &self.secret));
                    change.added.push(Arc::clone(&w));
                    w
                }
            })
            .collect();
        change.removed = old
            .workers
            .iter()
            .filter(|w| !workers.iter().any(|n| Arc::ptr_eq(n, w)))
            .cloned()
            .collect();
        if !change.added.is_empty() || !change.removed.is_empty() {
            self.current
                .store(Arc::new(Snapshot::new(workers, &self.placement)));
        }
        change
    }
}

/// What a membership update changed.
#[derive(Default)]
pub struct Change {
    /// New workers (down until probed).
    pub added: Vec<Arc<Worker>>,
    /// Workers no longer in the fleet.
    pub removed: Vec<Arc<Worker>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::config::Placement as Policy;

    fn members(ports: &[u16]) -> Vec<(SocketAddr, String)> {
        ports
            .iter()
            .map(|p| (format!("127.0.0.1:{p}").parse().unwrap(), format!("w{p}")))
            .collect()
    }

    fn view() -> Workers {
        let config = placement::Config {
            policy: Policy::Consistent,
            load_factor: 1.25,
        };
        Workers::new(config, "fleet")
    }

    #[test]
    fn membership_changes_keep_known_workers_state() {
        let view = view();
        let change = view.set_members(&members(&[1, 2]));
        assert_eq!(change.added.len(), 2);
        change.added[0].set_up(true);
        change.added[0]
            .load()
            .set_probed(7, std::time::Instant::now());
        let change = view.set_members(&members(&[1, 3]));
        assert_eq!(change.added.len(), 1);
        assert_eq!(change.removed.len(), 1);
        let snap = view.snapshot();
        let kept = &snap.workers()[0];
        assert!(kept.is_up());
        assert_eq!(kept.load().get(), 7);
        assert!(!snap.workers()[1].is_up(), "a new worker starts down");
        assert_eq!(snap.ready(), 1);
    }

    #[test]
    fn tags_name_workers_and_placement_sees_health() {
        let view = view();
        view.set_members(&members(&[1, 2]));
        let snap = view.snapshot();
        let w = &snap.workers()[1];
        assert!(Arc::ptr_eq(snap.by_tag(w.tag()).unwrap(), w));
        assert!(snap.by_tag(Tag::derive("other", "x")).is_none());
        assert!(
            snap.place(b"k", 0, &[]).is_none(),
            "nobody up or answering yet"
        );
        w.set_up(true);
        let placed = snap.place(b"k", 0, &[]).unwrap();
        assert!(Arc::ptr_eq(placed.worker, w) && !placed.panic);
        assert!(snap.place(b"k", 0, &[w.addr()]).is_none(), "excluded");
    }

    #[test]
    fn with_no_worker_up_sessions_go_to_workers_that_still_answer() {
        let view = view();
        view.set_members(&members(&[1, 2, 3]));
        let snap = view.snapshot();
        let (a, b) = (&snap.workers()[0], &snap.workers()[1]);
        a.set_answers(true);
        b.set_answers(true);
        let placed = snap.place(b"k", 0, &[]).unwrap();
        assert!(placed.panic);
        assert!(
            !Arc::ptr_eq(placed.worker, &snap.workers()[2]),
            "the silent one never"
        );
        let other = snap.place(b"k", 0, &[placed.worker.addr()]).unwrap();
        assert!(other.panic && !Arc::ptr_eq(other.worker, placed.worker));
        b.set_up(true);
        let placed = snap.place(b"k", 0, &[]).unwrap();
        assert!(!placed.panic && Arc::ptr_eq(placed.worker, b));
    }

    #[test]
    fn an_unchanged_set_keeps_the_snapshot() {
        let view = view();
        view.set_members(&members(&[1]));
        let before = view.snapshot();
        view.set_members(&members(&[1]));
        assert!(Arc::ptr_eq(&before, &view.snapshot()));
    }
}
