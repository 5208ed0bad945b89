//! `random`: any worker that is up, uniformly.

use std::sync::Arc;

use super::{Admit, Config, Placement, admitted};
use crate::workers::Worker;

/// A uniformly random worker.
pub struct Random;

impl Placement for Random {
    fn build(_: &[Arc<Worker>], _: &Config) -> Self {
        Random
    }

    fn choose(
        &self,
        workers: &[Arc<Worker>],
        _: &[u8],
        nonce: u64,
        admit: Admit<'_>,
    ) -> Option<usize> {
        let count = admitted(workers, admit).count();
        if count == 0 {
            return None;
        }
        admitted(workers, admit).nth((nonce % count as u64) as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::testing::{built, spread};

    #[test]
    fn spreads_over_up_workers_only() {
        let (workers, p) = built::<Random>(4);
        workers[3].set_up(false);
        let loads = spread(&p, &workers, 3000, |_| vec![]);
        assert_eq!(loads[3], 0);
        assert!(loads[..3].iter().all(|l| *l > 800), "{loads:?}");
    }
}
