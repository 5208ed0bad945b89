//! `least-connections`: the worker that is up with the fewest sessions; ties are broken at
//! random so equal workers share new sessions.

use std::sync::Arc;

use super::{Admit, Config, Placement};
use crate::workers::Worker;

/// The least loaded worker.
pub struct LeastConnections;

impl Placement for LeastConnections {
    fn build(_: &[Arc<Worker>], _: &Config) -> Self {
        LeastConnections
    }

    fn choose(
        &self,
        workers: &[Arc<Worker>],
        _: &[u8],
        nonce: u64,
        admit: Admit<'_>,
    ) -> Option<usize> {
        least_loaded(workers, nonce, admit)
    }
}

/// The admitted worker with the lowest load, scanning from a random start so ties spread.
pub(super) fn least_loaded(workers: &[Arc<Worker>], nonce: u64, admit: Admit<'_>) -> Option<usize> {
    let n = workers.len();
    if n == 0 {
        return None;
    }
    let start = (nonce % n as u64) as usize;
    (0..n)
        .map(|i| (start + i) % n)
        .filter(|&i| admit(&workers[i]))
        .min_by_key(|&i| workers[i].load().get())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::testing::{built, spread};

    #[test]
    fn balances_exactly() {
        let (workers, p) = built::<LeastConnections>(3);
        assert_eq!(spread(&p, &workers, 300, |_| vec![]), vec![100, 100, 100]);
    }

    #[test]
    fn skips_down_workers_whatever_their_load() {
        let (workers, p) = built::<LeastConnections>(3);
        workers[1].set_up(false);
        workers[0].load().set_probed(5, std::time::Instant::now());
        workers[2].load().set_probed(7, std::time::Instant::now());
        for nonce in 0..10 {
            assert_eq!(p.choose(&workers, b"", nonce, &|w| w.is_up()), Some(0));
        }
    }
}
