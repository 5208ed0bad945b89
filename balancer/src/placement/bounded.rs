//! `consistent` (the default): consistent hashing of the client address with bounded loads
//! (Mirrokni, Thorup and Zadimoghaddam): walking the ring from the client's point, the first
//! worker that is up and below `load_factor` × the mean load takes the session. Clients keep
//! their worker across reconnects while loads are even, and thousands behind one NAT address
//! still spread.

use std::sync::Arc;

use super::least_connections::least_loaded;
use super::{Admit, Config, Placement, Ring, admitted};
use crate::workers::Worker;

/// Consistent hashing with bounded load.
pub struct BoundedLoad {
    ring: Ring,
    load_factor: f64,
}

impl Placement for BoundedLoad {
    fn build(workers: &[Arc<Worker>], config: &Config) -> Self {
        BoundedLoad {
            ring: Ring::new(workers),
            load_factor: config.load_factor,
        }
    }

    fn choose(
        &self,
        workers: &[Arc<Worker>],
        key: &[u8],
        nonce: u64,
        admit: Admit<'_>,
    ) -> Option<usize> {
        let (count, total) = admitted(workers, admit).fold((0, 0), |(n, sum), i| {
            (n + 1, sum + workers[i].load().get().max(0))
        });
        if count == 0 {
            return None;
        }
        let cap = bounded_cap(total, count, self.load_factor);
        self.ring
            .walk(key)
            .find(|&i| admit(&workers[i]) && workers[i].load().get() < cap)
            // Every point tried was full (loads moved under us): the least loaded instead.
            .or_else(|| least_loaded(workers, nonce, admit))
    }
}

/// The most sessions a worker may hold and still take a new one: `load_factor` × the mean
/// after placing it, rounded up.
pub fn bounded_cap(total: i64, workers: usize, load_factor: f64) -> i64 {
    let mean_after = (total + 1) as f64 / workers.max(1) as f64;
    (load_factor * mean_after).ceil() as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::testing::{address, built, spread};

    /// Thousands of clients behind one address still spread: none above 1.5× the mean.
    #[test]
    fn one_nat_address_spreads_within_bound() {
        for n in [2, 3, 4, 7] {
            let (workers, p) = built::<BoundedLoad>(n);
            let loads = spread(&p, &workers, 3000, |_| b"10.0.0.1".to_vec());
            let mean = 3000.0 / f64::from(n);
            assert!(
                loads.iter().all(|l| (*l as f64) <= 1.5 * mean),
                "{n} workers: {loads:?}"
            );
        }
    }

    #[test]
    fn many_addresses_spread_within_the_factor() {
        let (workers, p) = built::<BoundedLoad>(3);
        let loads = spread(&p, &workers, 3000, address);
        assert!(
            loads.iter().all(|l| (*l as f64) <= 1.25 * 1000.0 + 1.0),
            "{loads:?}"
        );
    }

    #[test]
    fn an_address_sticks_while_loads_are_even() {
        let (workers, p) = built::<BoundedLoad>(3);
        let first = p.choose(&workers, b"1.2.3.4", 0, &|w| w.is_up());
        assert_eq!(p.choose(&workers, b"1.2.3.4", 99, &|w| w.is_up()), first);
    }

    #[test]
    fn a_full_worker_is_passed_over_and_a_down_one_never_chosen() {
        let (workers, p) = built::<BoundedLoad>(3);
        let home = p.choose(&workers, b"k", 0, &|w| w.is_up()).unwrap();
        workers[home]
            .load()
            .set_probed(100, std::time::Instant::now());
        let other = p.choose(&workers, b"k", 0, &|w| w.is_up()).unwrap();
        assert_ne!(other, home);
        workers[other].set_up(false);
        let third = p.choose(&workers, b"k", 0, &|w| w.is_up()).unwrap();
        assert!(third != other && third != home, "{third}");
    }

    #[test]
    fn cap_rounds_up() {
        assert_eq!(bounded_cap(0, 3, 1.25), 1);
        assert_eq!(bounded_cap(299, 3, 1.25), 125);
    }
}
