//! The workers as the proxy sees them: which exist and are healthy (pingora's LoadBalancer),
//! their sticky tags, their loads, and where a new session goes.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use pingora_load_balancing::selection::Consistent;
use pingora_load_balancing::{Backend, LoadBalancer};
use shared::FleetConfig;
use shared::config::Placement;

use crate::sticky::Tag;

/// Ring points tried before giving up on a bounded-load placement.
const MAX_RING_STEPS: usize = 512;

/// A worker's load: its session count at the last poll, plus sessions placed since.
#[derive(Default, Debug)]
pub struct Load {
    polled: AtomicI64,
    placed_since_poll: AtomicI64,
}

impl Load {
    /// The current estimate.
    pub fn get(&self) -> i64 {
        self.polled.load(Ordering::Relaxed) + self.placed_since_poll.load(Ordering::Relaxed)
    }

    /// A fresh count from the worker itself.
    pub fn set_polled(&self, sessions: i64) {
        self.polled.store(sessions, Ordering::Relaxed);
        self.placed_since_poll.store(0, Ordering::Relaxed);
    }

    fn placed(&self) {
        self.placed_since_poll.fetch_add(1, Ordering::Relaxed);
    }
}

struct TagCache {
    backends: Arc<BTreeSet<Backend>>,
    by_tag: HashMap<Tag, SocketAddr>,
}

/// Shared by the proxy, the health check, the load poller and the admin endpoints.
pub struct Upstreams {
    /// pingora's view: discovery + health.
    pub lb: Arc<LoadBalancer<Consistent>>,
    secret: String,
    placement: Placement,
    load_factor: f64,
    labels: HashMap<SocketAddr, String>,
    loads: RwLock<HashMap<SocketAddr, Arc<Load>>>,
    tags: RwLock<Option<TagCache>>,
    rng: AtomicU64,
}

impl Upstreams {
    /// Wrap a load balancer with the fleet's stickiness and placement settings.
    pub fn new(lb: Arc<LoadBalancer<Consistent>>, cfg: &FleetConfig) -> Self {
        // Workers named by index get `w<i>` labels (for every index a resize may bring);
        // discovered ones are labelled by address.
        let mut labels = HashMap::new();
        if cfg.indexed_workers() {
            for i in 0..shared::config::MAX_WORKERS {
                if let Ok(addr) = cfg.worker_addr(i).parse() {
                    labels.insert(addr, FleetConfig::worker_id(i));
                }
            }
        }
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1;
        Upstreams {
            lb,
            secret: cfg.balancer.sticky_secret.clone(),
            placement: cfg.balancer.placement,
            load_factor: cfg.balancer.load_factor,
            labels,
            loads: RwLock::default(),
            tags: RwLock::default(),
            rng: AtomicU64::new(seed),
        }
    }

    /// The metric label of a worker.
    pub fn label(&self, addr: &SocketAddr) -> String {
        self.labels
            .get(addr)
            .cloned()
            .unwrap_or_else(|| addr.to_string())
    }

    /// A worker's sticky tag: from its address, which every balancer sees alike.
    pub fn tag_of(&self, addr: &SocketAddr) -> Tag {
        Tag::derive(&self.secret, &addr.to_string())
    }

    /// Every known worker and whether it is healthy.
    pub fn workers(&self) -> Vec<(SocketAddr, bool)> {
        let backends = self.lb.backends();
        backends
            .get_backend()
            .iter()
            .filter_map(|b| b.addr.as_inet().map(|a| (*a, backends.ready(b))))
            .collect()
    }

    /// The worker a tag names, and whether it is healthy.
    pub fn by_tag(&self, tag: Tag) -> Option<(SocketAddr, bool)> {
        let backends = self.lb.backends().get_backend();
        let fresh = self
            .tags
            .read()
            .unwrap()
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(&c.backends, &backends));
        if !fresh {
            let by_tag = backends
                .iter()
                .filter_map(|b| b.addr.as_inet().map(|a| (self.tag_of(a), *a)))
                .collect();
            *self.tags.write().unwrap() = Some(TagCache {
                backends: Arc::clone(&backends),
                by_tag,
            });
        }
        let addr = *self.tags.read().unwrap().as_ref()?.by_tag.get(&tag)?;
        let healthy = backends
            .iter()
            .find(|b| b.addr.as_inet() == Some(&addr))
            .is_some_and(|b| self.lb.backends().ready(b));
        Some((addr, healthy))
    }

    /// The load record of a worker (created on first use).
    pub fn load(&self, addr: &SocketAddr) -> Arc<Load> {
        if let Some(l) = self.loads.read().unwrap().get(addr) {
            return Arc::clone(l);
        }
        Arc::clone(self.loads.write().unwrap().entry(*addr).or_default())
    }

    /// Choose a healthy worker for a new session from `client_key` (the client address).
    pub fn place(&self, client_key: &[u8]) -> Option<SocketAddr> {
        let healthy: Vec<SocketAddr> = self
            .workers()
            .into_iter()
            .filter(|(_, h)| *h)
            .map(|(a, _)| a)
            .collect();
        if healthy.is_empty() {
            return None;
        }
        let chosen = match self.placement {
            Placement::IpHash => self.ring(client_key, |_| true),
            Placement::Consistent => {
                let total: i64 = healthy.iter().map(|a| self.load(a).get().max(0)).sum();
                let cap = bounded_cap(total, healthy.len(), self.load_factor);
                self.ring(client_key, |a| self.load(a).get() < cap)
                    // Every ring point was full (loads moved under us): least loaded instead.
                    .or_else(|| self.least_loaded(&healthy))
            }
            Placement::LeastConnections => self.least_loaded(&healthy),
            Placement::Random => Some(healthy[self.next_random() as usize % healthy.len()]),
        }?;
        self.load(&chosen).placed();
        Some(chosen)
    }

    fn ring(&self, key: &[u8], accept: impl Fn(&SocketAddr) -> bool) -> Option<SocketAddr> {
        self.lb
            .select_with(key, MAX_RING_STEPS, |b, healthy| {
                healthy && b.addr.as_inet().is_some_and(&accept)
            })
            .and_then(|b| b.addr.as_inet().copied())
    }

    fn least_loaded(&self, healthy: &[SocketAddr]) -> Option<SocketAddr> {
        // Ties are broken at random so equal workers share new sessions.
        let start = self.next_random() as usize % healthy.len();
        (0..healthy.len())
            .map(|i| healthy[(start + i) % healthy.len()])
            .min_by_key(|a| self.load(a).get())
    }

    fn next_random(&self) -> u64 {
        let mut x = self.rng.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.store(x, Ordering::Relaxed);
        x
    }
}

/// The most sessions a worker may hold and still take a new one: `load_factor` × the mean
/// after placing it, rounded up (consistent hashing with bounded loads, Mirrokni et al.).
pub fn bounded_cap(total: i64, workers: usize, load_factor: f64) -> i64 {
    let mean_after = (total + 1) as f64 / workers.max(1) as f64;
    (load_factor * mean_after).ceil() as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstreams(n: u16, placement: Placement) -> Upstreams {
        let addrs: Vec<String> = (0..n).map(|i| format!("127.0.0.1:{}", 9001 + i)).collect();
        let lb = LoadBalancer::<Consistent>::try_from_iter(addrs).unwrap();
        let mut cfg = FleetConfig::default();
        cfg.workers.count = u32::from(n);
        cfg.balancer.placement = placement;
        Upstreams::new(Arc::new(lb), &cfg)
    }

    fn spread(u: &Upstreams, clients: usize, key: impl Fn(usize) -> Vec<u8>) -> Vec<i64> {
        for i in 0..clients {
            u.place(&key(i)).unwrap();
        }
        u.workers().iter().map(|(a, _)| u.load(a).get()).collect()
    }

    /// Thousands of clients behind one address still spread: none above 1.5× the mean.
    #[test]
    fn one_nat_address_spreads_within_bound() {
        for n in [2, 3, 4, 7] {
            let u = upstreams(n, Placement::Consistent);
            let loads = spread(&u, 3000, |_| b"10.0.0.1".to_vec());
            let mean = 3000.0 / f64::from(n);
            assert!(
                loads.iter().all(|l| (*l as f64) <= 1.5 * mean),
                "{n} workers: {loads:?}"
            );
        }
    }

    #[test]
    fn many_addresses_spread_and_stick() {
        let u = upstreams(3, Placement::Consistent);
        let loads = spread(&u, 3000, |i| {
            format!("10.0.{}.{}", i / 256, i % 256).into_bytes()
        });
        assert!(
            loads.iter().all(|l| (*l as f64) <= 1.25 * 1000.0 + 1.0),
            "{loads:?}"
        );
        let v = upstreams(3, Placement::IpHash);
        assert_eq!(v.place(b"1.2.3.4"), v.place(b"1.2.3.4"));
    }

    #[test]
    fn least_connections_balances_exactly() {
        let u = upstreams(3, Placement::LeastConnections);
        assert_eq!(spread(&u, 300, |_| vec![]), vec![100, 100, 100]);
    }

    #[test]
    fn tags_name_workers() {
        let u = upstreams(3, Placement::Random);
        let addr: SocketAddr = "127.0.0.1:9002".parse().unwrap();
        assert_eq!(u.by_tag(u.tag_of(&addr)), Some((addr, true)));
        assert_eq!(u.by_tag(Tag::derive("other", "x")), None);
        assert_eq!(u.label(&addr), "w1");
    }

    #[test]
    fn cap_rounds_up() {
        assert_eq!(bounded_cap(0, 3, 1.25), 1);
        assert_eq!(bounded_cap(299, 3, 1.25), 125);
    }
}
