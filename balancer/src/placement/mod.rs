//! Where a new session goes: one type per policy behind [`Placement`], in the manner of
//! pingora's `BackendSelection`. A policy does no I/O and reads no globals: it is built over
//! the fleet's workers when their set changes, and asked for one per new session with the
//! client's key (its address) and a random number drawn by the caller.
//!
//! Adding a policy: a file here with a type implementing [`Placement`], a variant of the
//! config enum `shared::config::Placement`, and its line in [`build`].

mod bounded;
mod ip_hash;
mod least_connections;
mod random;
mod ring;

use std::sync::Arc;

pub use bounded::{BoundedLoad, bounded_cap};
pub use ip_hash::IpHash;
pub use least_connections::LeastConnections;
pub use random::Random;
pub use ring::Ring;
use shared::config::Placement as Policy;

use crate::workers::Worker;

/// What a policy is built from, besides the workers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    /// Which policy.
    pub policy: Policy,
    /// For bounded load: a worker above `load_factor` × the mean takes no new session.
    pub load_factor: f64,
}

/// Chooses the worker of a new session.
pub trait Placement: Send + Sync + 'static {
    /// The policy over `workers` (the whole fleet, up or not: health is read at each choice,
    /// so a worker going down and up again does not reshuffle anyone).
    fn build(workers: &[Arc<Worker>], config: &Config) -> Self
    where
        Self: Sized;

    /// The index in `workers` (the same slice it was built over) of the worker a new session
    /// from `key` goes to, among those `admit` accepts (normally: up); `None` when it accepts
    /// none. `nonce` is random per call.
    fn choose(
        &self,
        workers: &[Arc<Worker>],
        key: &[u8],
        nonce: u64,
        admit: Admit<'_>,
    ) -> Option<usize>;
}

/// The configured policy, built over `workers`.
pub fn build(config: &Config, workers: &[Arc<Worker>]) -> Box<dyn Placement> {
    fn boxed<P: Placement>(workers: &[Arc<Worker>], config: &Config) -> Box<dyn Placement> {
        Box::new(P::build(workers, config))
    }
    match config.policy {
        Policy::Consistent => boxed::<BoundedLoad>(workers, config),
        Policy::IpHash => boxed::<IpHash>(workers, config),
        Policy::LeastConnections => boxed::<LeastConnections>(workers, config),
        Policy::Random => boxed::<Random>(workers, config),
    }
}

/// Which workers a choice may fall on.
pub type Admit<'a> = &'a dyn Fn(&Worker) -> bool;

/// Indices of the workers `admit` accepts.
fn admitted<'a>(workers: &'a [Arc<Worker>], admit: Admit<'a>) -> impl Iterator<Item = usize> + 'a {
    workers
        .iter()
        .enumerate()
        .filter(move |(_, w)| admit(w))
        .map(|(i, _)| i)
}

#[cfg(test)]
pub(crate) mod testing {
    //! A fleet of workers for policy tests.
    use std::sync::Arc;

    use shared::config::Placement as Policy;

    use super::{Config, Placement};
    use crate::workers::Worker;

    /// `n` workers, all up and idle, and policy `P` built over them (load factor 1.25).
    pub fn built<P: Placement>(n: u16) -> (Vec<Arc<Worker>>, P) {
        let workers = fleet(n);
        let config = Config {
            policy: Policy::Consistent,
            load_factor: 1.25,
        };
        let policy = P::build(&workers, &config);
        (workers, policy)
    }

    /// The `i`th of many client addresses.
    pub fn address(i: usize) -> Vec<u8> {
        format!("10.0.{}.{}", i / 256, i % 256).into_bytes()
    }

    /// `n` workers, all up, with no load.
    pub fn fleet(n: u16) -> Vec<Arc<Worker>> {
        (0..n)
            .map(|i| {
                let w = Worker::new(
                    format!("127.0.0.1:{}", 9001 + i).parse().unwrap(),
                    &format!("w{i}"),
                    "fleet",
                );
                w.set_up(true);
                Arc::new(w)
            })
            .collect()
    }

    /// Places `clients` sessions (counting each on its worker); returns the loads.
    pub fn spread(
        p: &dyn super::Placement,
        workers: &[Arc<Worker>],
        clients: usize,
        key: impl Fn(usize) -> Vec<u8>,
    ) -> Vec<i64> {
        for i in 0..clients {
            let chosen = p
                .choose(workers, &key(i), fastrand::u64(..), &|w| w.is_up())
                .unwrap();
            workers[chosen].load().placed();
        }
        workers.iter().map(|w| w.load().get()).collect()
    }
}
