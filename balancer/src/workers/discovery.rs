//! Which workers exist: the `workers.count` workers at `host:base_port+i` (spawned or
//! `spawn: false`; the count can change while running, see `resize`), a fixed list
//! (`upstreams`), or every address of a DNS name (`discover`), resolved again every few
//! seconds (docker compose `--scale`, a Kubernetes headless Service).

use std::net::SocketAddr;
use std::time::Duration;

use shared::FleetConfig;
use tokio::sync::watch;

/// How often listed workers are resolved again.
const LISTED_EVERY: Duration = Duration::from_secs(60);
/// How often a `discover` name is resolved again.
const DISCOVERED_EVERY: Duration = Duration::from_secs(5);

/// Where the workers come from.
#[derive(Clone)]
pub enum Discovery {
    /// Workers by index, `w0`..: as many as routed now.
    Indexed {
        /// The fleet file (host, base port).
        cfg: Box<FleetConfig>,
        /// How many are in placement (see `resize`).
        routed: watch::Receiver<u32>,
    },
    /// Names from the file, each resolved to all its addresses; labelled by address.
    Named {
        /// `host:port` names.
        names: Vec<String>,
        /// How often to resolve them again.
        every: Duration,
    },
}

impl Discovery {
    /// The workers a fleet file names; indexed workers as many as `routed` says.
    pub fn from_config(cfg: &FleetConfig, routed: watch::Receiver<u32>) -> Self {
        let w = &cfg.workers;
        if let Some(name) = &w.discover {
            Discovery::Named {
                names: vec![name.clone()],
                every: DISCOVERED_EVERY,
            }
        } else if !w.upstreams.is_empty() {
            Discovery::Named {
                names: w.upstreams.clone(),
                every: LISTED_EVERY,
            }
        } else {
            Discovery::Indexed {
                cfg: Box::new(cfg.clone()),
                routed,
            }
        }
    }

    /// The workers now, each with its label; `None` when nothing resolves (the caller keeps
    /// the last set). A name that does not resolve is skipped with a warning.
    pub async fn members(&self) -> Option<Vec<(SocketAddr, String)>> {
        let mut members = Vec::new();
        match self {
            Discovery::Indexed { cfg, routed } => {
                let count = *routed.borrow();
                for i in 0..count {
                    // A worker by index listens on one address.
                    if let Some(addr) = resolve(&cfg.worker_addr(i)).await.into_iter().next() {
                        members.push((addr, FleetConfig::worker_id(i)));
                    }
                }
            }
            Discovery::Named { names, .. } => {
                for name in names {
                    for addr in resolve(name).await {
                        members.push((addr, addr.to_string()));
                    }
                }
            }
        }
        members.sort();
        members.dedup_by_key(|(addr, _)| *addr);
        if members.is_empty() {
            tracing::warn!("no worker address resolved; keeping the last known workers");
            return None;
        }
        Some(members)
    }

    /// Resolves when the set may have changed: the routed count moved, or it is time to
    /// resolve the names again.
    pub async fn changed(&mut self) {
        match self {
            Discovery::Indexed { routed, .. } => {
                if routed.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            Discovery::Named { every, .. } => tokio::time::sleep(*every).await,
        }
    }
}

async fn resolve(name: &str) -> Vec<SocketAddr> {
    match tokio::net::lookup_host(name).await {
        Ok(addrs) => addrs.collect(),
        Err(e) => {
            tracing::warn!(host = %name, "cannot resolve worker address: {e}");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn indexed_workers_follow_the_routed_count() {
        let cfg = FleetConfig::default();
        let (routed, rx) = watch::channel(2);
        let mut d = Discovery::from_config(&cfg, rx);
        let m = d.members().await.unwrap();
        assert_eq!(
            m,
            vec![
                ("127.0.0.1:9001".parse().unwrap(), "w0".to_owned()),
                ("127.0.0.1:9002".parse().unwrap(), "w1".to_owned())
            ]
        );
        routed.send_replace(3);
        d.changed().await;
        assert_eq!(d.members().await.unwrap().len(), 3);
    }

    #[tokio::test]
    async fn listed_workers_are_labelled_by_address_and_junk_is_skipped() {
        let mut cfg = FleetConfig::default();
        cfg.workers.upstreams = vec!["127.0.0.1:7001".into(), "no-such-host.invalid:1".into()];
        let (_tx, rx) = watch::channel(0);
        let m = Discovery::from_config(&cfg, rx).members().await.unwrap();
        assert_eq!(
            m,
            vec![(
                "127.0.0.1:7001".parse().unwrap(),
                "127.0.0.1:7001".to_owned()
            )]
        );
    }
}
