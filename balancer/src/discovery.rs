//! Which workers exist: the `workers.count` workers at `host:base_port+i` (spawned or
//! `spawn: false`; the count can change while running, see `resize`), a fixed list
//! (`upstreams`), or every address of a DNS name (`discover`), re-resolved on each update.

use std::collections::{BTreeSet, HashMap};

use async_trait::async_trait;
use pingora_core::{Error, ErrorType, Result};
use pingora_load_balancing::Backend;
use pingora_load_balancing::discovery::ServiceDiscovery;
use shared::FleetConfig;
use tokio::sync::watch;

/// Resolves each name on every call; a name that does not resolve is skipped with a warning,
/// and if nothing resolves the previous set stays (an error keeps pingora's last backends).
pub struct HostsDiscovery {
    hosts: Hosts,
}

enum Hosts {
    /// Workers by index: as many as the count routed now.
    Indexed {
        cfg: Box<FleetConfig>,
        routed: watch::Receiver<u32>,
    },
    /// Names from the file.
    Named(Vec<String>),
}

impl HostsDiscovery {
    /// The workers a fleet file names; indexed workers as many as `routed` says.
    pub fn from_config(cfg: &FleetConfig, routed: watch::Receiver<u32>) -> Self {
        let w = &cfg.workers;
        let hosts = if let Some(d) = &w.discover {
            Hosts::Named(vec![d.clone()])
        } else if !w.upstreams.is_empty() {
            Hosts::Named(w.upstreams.clone())
        } else {
            Hosts::Indexed {
                cfg: Box::new(cfg.clone()),
                routed,
            }
        };
        HostsDiscovery { hosts }
    }

    fn hosts(&self) -> Vec<String> {
        match &self.hosts {
            Hosts::Indexed { cfg, routed } => {
                let n = *routed.borrow();
                (0..n).map(|i| cfg.worker_addr(i)).collect()
            }
            Hosts::Named(names) => names.clone(),
        }
    }
}

#[async_trait]
impl ServiceDiscovery for HostsDiscovery {
    async fn discover(&self) -> Result<(BTreeSet<Backend>, HashMap<u64, bool>)> {
        let mut set = BTreeSet::new();
        for host in self.hosts() {
            match tokio::net::lookup_host(host.as_str()).await {
                Ok(addrs) => {
                    for addr in addrs {
                        set.insert(Backend::new(&addr.to_string())?);
                    }
                }
                Err(e) => tracing::warn!(%host, "cannot resolve worker address: {e}"),
            }
        }
        if set.is_empty() {
            return Err(Error::explain(
                ErrorType::InternalError,
                "no worker address resolved",
            ));
        }
        Ok((set, HashMap::new()))
    }
}
