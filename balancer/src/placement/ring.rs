//! The Ketama ring of the fleet's workers (nginx's consistent hashing, as pingora's
//! `Consistent` selection builds it): a client key maps to a point, and walking on from it
//! gives every worker in a stable order, so removing one moves only its own clients.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use pingora_ketama::{Bucket, Continuum};

use crate::workers::Worker;

/// Ring points tried before giving up (each worker owns 160 points).
const MAX_STEPS: usize = 512;

/// The ring over a set of workers.
pub struct Ring {
    continuum: Continuum,
    index: HashMap<SocketAddr, usize>,
}

impl Ring {
    /// Every worker with weight 1.
    pub fn new(workers: &[Arc<Worker>]) -> Self {
        let buckets: Vec<Bucket> = workers.iter().map(|w| Bucket::new(w.addr(), 1)).collect();
        Ring {
            continuum: Continuum::new(&buckets),
            index: workers
                .iter()
                .enumerate()
                .map(|(i, w)| (w.addr(), i))
                .collect(),
        }
    }

    /// Worker indices in ring order from `key`'s point (repeats included, bounded).
    pub fn walk<'a>(&'a self, key: &[u8]) -> impl Iterator<Item = usize> + 'a {
        self.continuum
            .node_iter(key)
            .take(MAX_STEPS)
            .filter_map(|addr| self.index.get(addr).copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::testing::fleet;

    #[test]
    fn removing_a_worker_moves_only_its_own_keys() {
        let all = fleet(4);
        let before = Ring::new(&all);
        let fewer: Vec<_> = all[..3].to_vec();
        let after = Ring::new(&fewer);
        for i in 0..1000 {
            let key = format!("10.0.{}.{}", i / 256, i % 256);
            let was = before.walk(key.as_bytes()).next().unwrap();
            let now = after.walk(key.as_bytes()).next().unwrap();
            if was < 3 {
                assert_eq!(was, now, "{key}");
            }
        }
    }

    #[test]
    fn an_empty_ring_walks_nowhere() {
        assert_eq!(Ring::new(&[]).walk(b"k").count(), 0);
    }
}
