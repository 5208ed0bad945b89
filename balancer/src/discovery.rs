//! Which workers exist: a fixed list of `host:port` (spawned, `spawn: false`, or
//! `upstreams`), or every address of a DNS name (`discover`), re-resolved on each update.

use std::collections::{BTreeSet, HashMap};

use async_trait::async_trait;
use pingora_core::{Error, ErrorType, Result};
use pingora_load_balancing::Backend;
use pingora_load_balancing::discovery::ServiceDiscovery;
use shared::FleetConfig;

/// Resolves each name on every call; a name that does not resolve is skipped with a warning,
/// and if nothing resolves the previous set stays (an error keeps pingora's last backends).
pub struct HostsDiscovery {
    hosts: Vec<String>,
}

impl HostsDiscovery {
    /// The workers a fleet file names.
    pub fn from_config(cfg: &FleetConfig) -> Self {
        let w = &cfg.workers;
        let hosts = if let Some(d) = &w.discover {
            vec![d.clone()]
        } else if !w.upstreams.is_empty() {
            w.upstreams.clone()
        } else {
            (0..w.count).map(|i| cfg.worker_addr(i)).collect()
        };
        HostsDiscovery { hosts }
    }
}

#[async_trait]
impl ServiceDiscovery for HostsDiscovery {
    async fn discover(&self) -> Result<(BTreeSet<Backend>, HashMap<u64, bool>)> {
        let mut set = BTreeSet::new();
        for host in &self.hosts {
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
