//! Imports: the merge of every linked peer's catalog into one table of
//! imported services, each with a stable virtual IP from `127.77.0.0/16`.
//!
//! [`plan`] is pure: catalogs in, desired imports out. [`VipAllocator`]
//! keeps addresses stable: a service's address is derived from a hash of its
//! name (so it is the same after a restart), probing onward on a collision,
//! and allocations can be persisted to a state file so that even collided
//! names keep their address across restarts.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;

use crate::catalog::{Catalog, Port, Protocol, ServiceKey, ServiceType};

/// One imported service.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Import {
    /// Namespace and name.
    pub key: ServiceKey,
    /// ClusterSetIP or Headless (from the first exporting peer, by name).
    pub service_type: ServiceType,
    /// The union of the exporting peers' ports, by (number, protocol).
    pub ports: Vec<Port>,
    /// The peers exporting it, sorted.
    pub peers: Vec<String>,
    /// For each TCP port, the peers exporting that port, sorted.
    #[serde(skip)]
    pub port_peers: BTreeMap<u16, Vec<String>>,
    /// The local virtual IP.
    pub vip: Ipv4Addr,
}

impl Import {
    /// The peers exporting TCP `port` (empty if none does).
    pub fn peers_for(&self, port: u16) -> Vec<String> {
        self.port_peers.get(&port).cloned().unwrap_or_default()
    }

    /// The DNS name of the import in the clusterset zone.
    pub fn dns_name(&self) -> String {
        format!(
            "{}.{}.svc.clusterset.local",
            self.key.name, self.key.namespace
        )
    }
}

/// Imports by key.
pub type ImportTable = BTreeMap<ServiceKey, Import>;

/// An import before it has an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedImport {
    /// ClusterSetIP or Headless.
    pub service_type: ServiceType,
    /// Merged ports.
    pub ports: Vec<Port>,
    /// Exporting peers, sorted.
    pub peers: Vec<String>,
    /// For each TCP port, the peers exporting it.
    pub port_peers: BTreeMap<u16, Vec<String>>,
}

/// Merges peers' catalogs (peer name to catalog) into planned imports. A
/// service exported by several peers is one import (MCS: the clusterset
/// service is the union); its ports are the union by (number, protocol),
/// the first peer by name winning a conflict of port names or types.
pub fn plan(catalogs: &BTreeMap<String, Catalog>) -> BTreeMap<ServiceKey, PlannedImport> {
    let mut out: BTreeMap<ServiceKey, PlannedImport> = BTreeMap::new();
    for (peer, catalog) in catalogs {
        for export in catalog.values() {
            let entry = out
                .entry(export.key.clone())
                .or_insert_with(|| PlannedImport {
                    service_type: export.service_type,
                    ports: Vec::new(),
                    peers: Vec::new(),
                    port_peers: BTreeMap::new(),
                });
            entry.peers.push(peer.clone());
            for p in export.ports.iter().filter(|p| p.protocol == Protocol::Tcp) {
                entry
                    .port_peers
                    .entry(p.port)
                    .or_default()
                    .push(peer.clone());
            }
            for p in &export.ports {
                if !entry
                    .ports
                    .iter()
                    .any(|q| q.port == p.port && q.protocol == p.protocol)
                {
                    entry.ports.push(p.clone());
                }
            }
        }
    }
    for import in out.values_mut() {
        import.ports.sort_by_key(|p| (p.port, p.protocol));
    }
    out
}

/// Only TCP ports are carried by the tunnel today.
pub fn tcp_ports(import: &Import) -> impl Iterator<Item = &Port> {
    import.ports.iter().filter(|p| p.protocol == Protocol::Tcp)
}

/// The default virtual IP range.
pub const DEFAULT_VIP_RANGE: &str = "127.77.0.0/16";

/// FNV-1a: stable across builds and platforms (unlike `DefaultHasher`).
pub(crate) fn fnv1a(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The preferred host number for a key in a range of `size` addresses.
fn preferred(key: &ServiceKey, size: u32) -> u32 {
    let h = fnv1a(format!("{}/{}", key.namespace, key.name).as_bytes());
    h % size
}

/// Never .0 or .255 in the last octet, and never the range's first /24
/// (kept for the gateway's own use) when the range is larger than a /24.
fn usable(host: u32, size: u32) -> bool {
    let last = host & 0xff;
    (size <= 256 || host >= 256) && last != 0 && last != 255
}

/// Assigns stable virtual IPs to imports.
#[derive(Debug)]
pub struct VipAllocator {
    range: ipnet::Ipv4Net,
    assigned: BTreeMap<ServiceKey, Ipv4Addr>,
    state_file: Option<PathBuf>,
}

impl Default for VipAllocator {
    fn default() -> Self {
        Self::new(default_range(), None)
    }
}

/// `127.77.0.0/16`.
pub fn default_range() -> ipnet::Ipv4Net {
    ipnet::Ipv4Net::new(Ipv4Addr::new(127, 77, 0, 0), 16).unwrap_or_default()
}

impl VipAllocator {
    /// An allocator over `range` persisting to `state_file` (if any),
    /// loading what it holds. A missing or unreadable file starts empty
    /// (hash-derived addresses are stable anyway); saved addresses outside
    /// the range are dropped.
    pub fn new(range: ipnet::Ipv4Net, state_file: Option<PathBuf>) -> Self {
        let mut assigned = BTreeMap::new();
        if let Some(path) = &state_file {
            if let Ok(text) = std::fs::read_to_string(path) {
                match serde_json::from_str::<Vec<(String, String, Ipv4Addr)>>(&text) {
                    Ok(rows) => {
                        let base = u32::from(range.network());
                        let size = 1u32 << (32 - u32::from(range.prefix_len())).min(31);
                        let mut taken = BTreeSet::new();
                        for (ns, name, ip) in rows {
                            // A hand-edited or corrupt file must not give two
                            // services one address, or an unusable one.
                            let host = u32::from(ip).wrapping_sub(base);
                            if range.contains(&ip) && usable(host, size) && taken.insert(ip) {
                                assigned.insert(ServiceKey::new(ns, name), ip);
                            }
                        }
                    }
                    Err(error) => {
                        tracing::warn!(path = %path.display(), %error, "ignoring unreadable VIP state")
                    }
                }
            }
        }
        Self {
            range: range.trunc(),
            assigned,
            state_file,
        }
    }

    /// Gives every key in `keys` an address, keeping existing ones, and
    /// releases addresses of keys no longer present. Returns the mapping.
    pub fn assign<'a>(
        &mut self,
        keys: impl IntoIterator<Item = &'a ServiceKey>,
    ) -> BTreeMap<ServiceKey, Ipv4Addr> {
        let wanted: BTreeSet<&ServiceKey> = keys.into_iter().collect();
        let before = self.assigned.clone();
        self.assigned.retain(|k, _| wanted.contains(k));
        let mut used: BTreeSet<Ipv4Addr> = self.assigned.values().copied().collect();
        for key in wanted {
            if self.assigned.contains_key(key) {
                continue;
            }
            let base = u32::from(self.range.network());
            let size = 1u32 << (32 - u32::from(self.range.prefix_len())).min(31);
            let start = preferred(key, size);
            let found = (0..size)
                .map(|i| (start + i) % size)
                .filter(|h| usable(*h, size))
                .map(|h| Ipv4Addr::from(base + h))
                .find(|ip| !used.contains(ip));
            match found {
                Some(ip) => {
                    used.insert(ip);
                    self.assigned.insert(key.clone(), ip);
                }
                None => tracing::error!(%key, range = %self.range, "virtual IP range exhausted"),
            }
        }
        if self.assigned != before {
            self.persist();
        }
        self.assigned.clone()
    }

    fn persist(&self) {
        let Some(path) = &self.state_file else {
            return;
        };
        let rows: Vec<(&str, &str, Ipv4Addr)> = self
            .assigned
            .iter()
            .map(|(k, ip)| (k.namespace.as_str(), k.name.as_str(), *ip))
            .collect();
        let tmp = path.with_extension("tmp");
        let result = serde_json::to_vec(&rows)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(error) = result {
            tracing::warn!(path = %path.display(), %error, "could not persist VIP state");
        }
    }
}

/// Plans the imports and gives them addresses.
pub fn build_table(catalogs: &BTreeMap<String, Catalog>, vips: &mut VipAllocator) -> ImportTable {
    let planned = plan(catalogs);
    let addrs = vips.assign(planned.keys());
    planned
        .into_iter()
        .filter_map(|(key, p)| {
            let vip = *addrs.get(&key)?;
            Some((
                key.clone(),
                Import {
                    key,
                    service_type: p.service_type,
                    ports: p.ports,
                    peers: p.peers,
                    port_peers: p.port_peers,
                    vip,
                },
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests;
