//! `ip-hash`: the first worker that is up on the ring from the client's address, with no load
//! bound (nginx `ip_hash`). A client address always lands on the same worker while it is up.

use std::sync::Arc;

use super::{Admit, Config, Placement, Ring};
use crate::workers::Worker;

/// Consistent hashing of the client address.
pub struct IpHash {
    ring: Ring,
}

impl Placement for IpHash {
    fn build(workers: &[Arc<Worker>], _: &Config) -> Self {
        IpHash {
            ring: Ring::new(workers),
        }
    }

    fn choose(
        &self,
        workers: &[Arc<Worker>],
        key: &[u8],
        _: u64,
        admit: Admit<'_>,
    ) -> Option<usize> {
        self.ring.walk(key).find(|&i| admit(&workers[i]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::testing::{address, built, spread};

    #[test]
    fn an_address_sticks_and_fails_over_to_the_next_on_the_ring() {
        let (workers, p) = built::<IpHash>(3);
        let first = p.choose(&workers, b"1.2.3.4", 1, &|w| w.is_up()).unwrap();
        assert_eq!(
            p.choose(&workers, b"1.2.3.4", 2, &|w| w.is_up()),
            Some(first)
        );
        workers[first].set_up(false);
        let next = p.choose(&workers, b"1.2.3.4", 3, &|w| w.is_up()).unwrap();
        assert_ne!(next, first);
        workers[first].set_up(true);
        assert_eq!(
            p.choose(&workers, b"1.2.3.4", 4, &|w| w.is_up()),
            Some(first)
        );
    }

    #[test]
    fn many_addresses_spread() {
        let (workers, p) = built::<IpHash>(3);
        let loads = spread(&p, &workers, 3000, address);
        assert!(loads.iter().all(|l| *l > 600), "{loads:?}");
    }

    #[test]
    fn none_up_places_nothing() {
        let (workers, p) = built::<IpHash>(2);
        workers.iter().for_each(|w| {
            w.set_up(false);
        });
        assert_eq!(p.choose(&workers, b"k", 0, &|w| w.is_up()), None);
    }
}
