//! Shared runtime state: linked peers (their tunnels, for the egress path
//! and the admin API) and the import registry (peers' catalogs merged into
//! the import table, published on a watch channel).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use tokio::sync::watch;

use crate::catalog::{Catalog, Export, ServiceKey};
use crate::imports::{build_table, ImportTable, VipAllocator};
use crate::k8s::crd::AcceptPolicy;
use crate::metrics::{GatewayMetrics, PeerLabels};
use crate::tunnel::io::PeerInfo;
use crate::tunnel::tcp::TcpDialer;
use crate::tunnel::{QuicIo, TunnelIo};

/// What the admin API shows of a peer.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerStatus {
    /// Link name (the peer's cluster name).
    pub name: String,
    /// The identity the peer must present.
    pub identity: String,
    /// Addresses dialed (empty: accept-only link).
    pub addresses: Vec<String>,
    /// Whether a tunnel we dialed is up.
    pub connected: bool,
    /// Its transport (`quic` or `tcp`) while up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transport: Option<&'static str>,
    /// Since when (Unix seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connected_since: Option<u64>,
    /// Last sampled round-trip time, milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
    /// Path statistics of the tunnel, sampled with the RTT.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathSample>,
    /// The last connection error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Services imported from this peer.
    pub imports: usize,
    /// Whether a catalog has arrived from this peer since this gateway
    /// started (the Kubernetes writer removes nothing before).
    pub catalog_received: bool,
}

/// A sample of a tunnel's QUIC path statistics.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PathSample {
    /// Discovered path MTU (UDP payload bytes).
    pub mtu: u16,
    /// Congestion window, bytes.
    pub cwnd: u64,
    /// Packets sent.
    pub sent_packets: u64,
    /// Packets declared lost.
    pub lost_packets: u64,
    /// Congestion events.
    pub congestion_events: u64,
    /// Path-MTU black holes detected.
    pub black_holes: u64,
}

/// A live tunnel to a peer, over either transport.
#[derive(Clone, Debug)]
pub enum PeerConn {
    /// One QUIC connection; a stream per proxied connection.
    Quic(quinn::Connection),
    /// TLS over TCP; a connection per proxied connection.
    Tcp(Arc<TcpDialer>),
}

impl PeerConn {
    /// `quic` or `tcp`.
    pub fn transport(&self) -> &'static str {
        match self {
            Self::Quic(_) => "quic",
            Self::Tcp(_) => "tcp",
        }
    }

    /// Whether new streams can be opened on it.
    pub fn is_live(&self) -> bool {
        match self {
            Self::Quic(c) => c.close_reason().is_none(),
            // Held only while its link's peering connection is up.
            Self::Tcp(_) => true,
        }
    }

    /// Opens a stream and sends `header` on it.
    pub async fn open(&self, header: &[u8], peer: PeerInfo) -> std::io::Result<TunnelIo> {
        match self {
            Self::Quic(conn) => {
                let (mut send, recv) = conn.open_bi().await.map_err(std::io::Error::from)?;
                send.write_all(header).await?;
                Ok(TunnelIo::Quic(QuicIo::new(send, recv, peer)))
            }
            Self::Tcp(dialer) => {
                let mut io = dialer.open(header).await?;
                io.set_peer(peer);
                Ok(io)
            }
        }
    }
}

#[derive(Debug)]
struct Peer {
    status: PeerStatus,
    connection: Option<PeerConn>,
}

/// Linked peers and their live tunnels.
#[derive(Debug, Default)]
pub struct Peers {
    peers: RwLock<BTreeMap<String, Peer>>,
    next: AtomicUsize,
}

impl Peers {
    /// Adds a link.
    pub fn add(&self, name: &str, identity: &str, addresses: Vec<String>) {
        let mut peers = self.peers.write().unwrap_or_else(|e| e.into_inner());
        peers.insert(
            name.to_string(),
            Peer {
                status: PeerStatus {
                    name: name.to_string(),
                    identity: identity.to_string(),
                    addresses,
                    connected: false,
                    transport: None,
                    connected_since: None,
                    rtt_ms: None,
                    path: None,
                    last_error: None,
                    imports: 0,
                    catalog_received: false,
                },
                connection: None,
            },
        );
    }

    /// Takes a peer's tunnel handle (to close it).
    pub fn take_connection(&self, name: &str) -> Option<PeerConn> {
        let mut peers = self.peers.write().unwrap_or_else(|e| e.into_inner());
        let p = peers.get_mut(name)?;
        p.status.connected = false;
        p.status.transport = None;
        p.connection.take()
    }

    /// Removes a link (its tunnel, if any, is closed by its owner).
    pub fn remove(&self, name: &str) {
        let mut peers = self.peers.write().unwrap_or_else(|e| e.into_inner());
        peers.remove(name);
    }

    fn update(&self, name: &str, f: impl FnOnce(&mut Peer)) {
        let mut peers = self.peers.write().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = peers.get_mut(name) {
            f(p);
        }
    }

    /// Records a new tunnel to `name`.
    pub fn connected(&self, name: &str, conn: PeerConn) {
        self.update(name, |p| {
            p.status.transport = Some(conn.transport());
            p.connection = Some(conn);
            p.status.connected = true;
            p.status.last_error = None;
            p.status.connected_since = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs());
        });
    }

    /// Records the loss of the tunnel to `name`, or a failed attempt.
    pub fn disconnected(&self, name: &str, error: Option<String>) {
        self.update(name, |p| {
            p.connection = None;
            p.status.connected = false;
            p.status.transport = None;
            p.status.connected_since = None;
            p.status.rtt_ms = None;
            p.status.path = None;
            if error.is_some() {
                p.status.last_error = error;
            }
        });
    }

    /// Records that a catalog arrived from `name`.
    pub fn catalog_received(&self, name: &str) {
        self.update(name, |p| p.status.catalog_received = true);
    }

    /// Records a round-trip time measured outside QUIC (TCP tunnels).
    pub fn set_rtt(&self, name: &str, rtt: std::time::Duration) {
        self.update(name, |p| p.status.rtt_ms = Some(rtt.as_secs_f64() * 1000.0));
    }

    /// Records a sample of the tunnel's path.
    pub fn sample(&self, name: &str, stats: &quinn::ConnectionStats) {
        self.update(name, |p| {
            p.status.rtt_ms = Some(stats.path.rtt.as_secs_f64() * 1000.0);
            p.status.path = Some(PathSample {
                mtu: stats.path.current_mtu,
                cwnd: stats.path.cwnd,
                sent_packets: stats.path.sent_packets,
                lost_packets: stats.path.lost_packets,
                congestion_events: stats.path.congestion_events,
                black_holes: stats.path.black_holes_detected,
            });
        });
    }

    fn set_imports(&self, counts: &BTreeMap<String, usize>) {
        let mut peers = self.peers.write().unwrap_or_else(|e| e.into_inner());
        for (name, p) in peers.iter_mut() {
            p.status.imports = counts.get(name).copied().unwrap_or(0);
        }
    }

    /// Picks a live tunnel among `candidates`, round robin.
    pub fn pick(&self, candidates: &[String]) -> Option<(String, PeerConn)> {
        let peers = self.peers.read().unwrap_or_else(|e| e.into_inner());
        let live: Vec<(&String, &PeerConn)> = candidates
            .iter()
            .filter_map(|c| {
                let conn = peers.get(c)?.connection.as_ref()?;
                conn.is_live().then_some((c, conn))
            })
            .collect();
        if live.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % live.len();
        Some((live[i].0.clone(), live[i].1.clone()))
    }

    /// Every peer's status.
    pub fn statuses(&self) -> Vec<PeerStatus> {
        let peers = self.peers.read().unwrap_or_else(|e| e.into_inner());
        peers.values().map(|p| p.status.clone()).collect()
    }
}

/// Most services one peer may export to us.
pub const MAX_EXPORTS_PER_PEER: usize = 10_000;

/// The import registry: each peer's catalog, and the merged table.
#[derive(Debug)]
pub struct Imports {
    inner: Mutex<(BTreeMap<String, Catalog>, VipAllocator)>,
    policies: Mutex<BTreeMap<String, AcceptPolicy>>,
    tx: watch::Sender<Arc<ImportTable>>,
    peers: Arc<Peers>,
    metrics: GatewayMetrics,
}

impl Imports {
    /// An empty registry.
    pub fn new(vips: VipAllocator, peers: Arc<Peers>, metrics: GatewayMetrics) -> Self {
        Self {
            inner: Mutex::new((BTreeMap::new(), vips)),
            policies: Mutex::default(),
            tx: watch::channel(Arc::new(ImportTable::new())).0,
            peers,
            metrics,
        }
    }

    /// The table now and as it changes.
    pub fn watch(&self) -> watch::Receiver<Arc<ImportTable>> {
        self.tx.subscribe()
    }

    /// The table now.
    pub fn current(&self) -> Arc<ImportTable> {
        self.tx.borrow().clone()
    }

    fn change(&self, f: impl FnOnce(&mut BTreeMap<String, Catalog>)) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (catalogs, vips) = &mut *inner;
        f(catalogs);
        catalogs.retain(|_, c| !c.is_empty());
        // A peer may not flood us: beyond the cap, exports are refused
        // (the last ones by name) and counted.
        for (peer, catalog) in catalogs.iter_mut() {
            let excess = catalog.len().saturating_sub(MAX_EXPORTS_PER_PEER);
            if excess > 0 {
                let drop: Vec<ServiceKey> = catalog.keys().rev().take(excess).cloned().collect();
                for k in drop {
                    catalog.remove(&k);
                }
                tracing::warn!(%peer, excess, "peer exports more than {MAX_EXPORTS_PER_PEER} services; refusing the rest");
                self.metrics
                    .invalid_exports
                    .get_or_create(&PeerLabels { peer: peer.clone() })
                    .inc_by(excess as u64);
            }
        }
        let policies = self.policies.lock().unwrap_or_else(|e| e.into_inner());
        let accepted: BTreeMap<String, Catalog> = catalogs
            .iter()
            .map(|(peer, catalog)| {
                let catalog = match policies.get(peer) {
                    None => catalog.clone(),
                    Some(policy) => catalog
                        .iter()
                        .filter(|(k, _)| policy.accepts(&k.namespace, &k.name))
                        .map(|(k, e)| (k.clone(), e.clone()))
                        .collect(),
                };
                (peer.clone(), catalog)
            })
            .collect();
        drop(policies);
        let table = build_table(&accepted, vips);
        let counts: BTreeMap<String, usize> =
            accepted.iter().map(|(p, c)| (p.clone(), c.len())).collect();
        for status in self.peers.statuses() {
            let n = counts.get(&status.name).copied().unwrap_or(0);
            self.metrics
                .imports
                .get_or_create(&PeerLabels { peer: status.name })
                .set(n as i64);
        }
        self.peers.set_imports(&counts);
        self.tx.send_if_modified(|cur| {
            if **cur == table {
                false
            } else {
                *cur = Arc::new(table);
                true
            }
        });
    }

    /// Sets (or clears) which of a peer's exports are imported.
    pub fn set_policy(&self, peer: &str, policy: Option<AcceptPolicy>) {
        {
            let mut p = self.policies.lock().unwrap_or_else(|e| e.into_inner());
            match policy {
                Some(policy) => p.insert(peer.to_string(), policy),
                None => p.remove(peer),
            };
        }
        self.change(|_| {});
    }

    /// Every peer's catalog as received (before accept policies), for the
    /// export conflict rules.
    pub fn catalogs(&self) -> BTreeMap<String, Catalog> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    /// Replaces a peer's catalog (a snapshot).
    pub fn snapshot(&self, peer: &str, exports: Vec<Export>) {
        self.change(|c| {
            c.insert(
                peer.to_string(),
                exports.into_iter().map(|e| (e.key.clone(), e)).collect(),
            );
        });
    }

    /// Applies a delta to a peer's catalog.
    pub fn delta(&self, peer: &str, upserted: Vec<Export>, removed: Vec<ServiceKey>) {
        self.change(|c| {
            let cat = c.entry(peer.to_string()).or_default();
            for k in removed {
                cat.remove(&k);
            }
            for e in upserted {
                cat.insert(e.key.clone(), e);
            }
        });
    }

    /// Forgets everything imported from a peer.
    pub fn forget(&self, peer: &str) {
        self.change(|c| {
            c.remove(peer);
        });
    }
}

/// The connections each peer dialed to us, while they are served, oldest
/// first. A peer may hold several at once: every replica of its gateway
/// dials with the one identity, and they must not close each other's. A
/// connection the peer abandoned (it restarted) ends at the tunnel's idle
/// timeout, or when [`MAX_ACCEPTED_PER_PEER`] newer ones come.
#[derive(Debug, Default)]
pub struct Accepted(Mutex<BTreeMap<String, Vec<(usize, quinn::Connection)>>>);

/// Most connections one peer may hold to us at once (one per replica of
/// its gateway): past it, its oldest is closed.
pub const MAX_ACCEPTED_PER_PEER: usize = 16;

impl Accepted {
    /// Forgets `peer`'s connections, returning them.
    pub fn remove(&self, peer: &str) -> Vec<quinn::Connection> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(peer)
            .map(|c| c.into_iter().map(|(_, c)| c).collect())
            .unwrap_or_default()
    }

    /// Records `conn` as one of `peer`'s connections until the returned
    /// guard is dropped.
    pub fn add(self: &Arc<Self>, peer: &str, conn: &quinn::Connection) -> AcceptedGuard {
        let id = conn.stable_id();
        let oldest = {
            let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
            let conns = m.entry(peer.to_string()).or_default();
            conns.push((id, conn.clone()));
            (conns.len() > MAX_ACCEPTED_PER_PEER).then(|| conns.remove(0).1)
        };
        if let Some(oldest) = oldest {
            oldest.close(quinn::VarInt::from_u32(2), b"too many connections");
        }
        AcceptedGuard {
            accepted: self.clone(),
            peer: peer.to_string(),
            id,
        }
    }

    /// How many connections `peer` has open to us.
    pub fn count(&self, peer: &str) -> usize {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(peer)
            .map_or(0, Vec::len)
    }
}

/// Keeps a connection in [`Accepted`] while it is served.
#[derive(Debug)]
pub struct AcceptedGuard {
    accepted: Arc<Accepted>,
    peer: String,
    id: usize,
}

impl Drop for AcceptedGuard {
    fn drop(&mut self) {
        let mut m = self.accepted.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(conns) = m.get_mut(&self.peer) {
            conns.retain(|(id, _)| *id != self.id);
            if conns.is_empty() {
                m.remove(&self.peer);
            }
        }
    }
}

/// One balancer per exported (service, port): the data plane's P2C
/// peak-EWMA balancer, shared with the sidecar proxy.
#[derive(Debug, Default)]
pub struct Balancers(
    Mutex<
        std::collections::HashMap<
            (ServiceKey, u16),
            strait_proxy::balance::Balancer<std::net::SocketAddr>,
        >,
    >,
);

impl Balancers {
    fn with<T>(
        &self,
        key: &(ServiceKey, u16),
        f: impl FnOnce(&mut strait_proxy::balance::Balancer<std::net::SocketAddr>) -> T,
    ) -> T {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let b = m.entry(key.clone()).or_insert_with(|| {
            strait_proxy::balance::Balancer::new(
                strait_proxy::balance::BalanceConfig {
                    // Unmeasured endpoints look fast, so each gets tried.
                    default_rtt: std::time::Duration::ZERO,
                    ..Default::default()
                },
                rand::random(),
            )
        });
        f(b)
    }

    /// Picks one of `targets` (the current endpoint set), avoiding `tried`.
    pub fn pick(
        &self,
        key: &(ServiceKey, u16),
        targets: &[std::net::SocketAddr],
        tried: &[std::net::SocketAddr],
    ) -> Option<std::net::SocketAddr> {
        let now = std::time::Instant::now();
        self.with(key, |b| {
            b.update(targets.iter().copied(), now);
            let mut pick = b.pick(now)?.key;
            for _ in 0..4 {
                if !tried.contains(&pick) || tried.len() >= targets.len() {
                    break;
                }
                b.release(&pick);
                pick = b.pick(now)?.key;
            }
            Some(pick)
        })
    }

    /// The connection to `target` is up after `latency`.
    pub fn connected(
        &self,
        key: &(ServiceKey, u16),
        target: std::net::SocketAddr,
        latency: std::time::Duration,
    ) {
        self.with(key, |b| {
            b.sample(&target, latency, std::time::Instant::now())
        });
    }

    /// Connecting to `target` failed.
    pub fn failed(&self, key: &(ServiceKey, u16), target: std::net::SocketAddr) {
        self.with(key, |b| b.failed(&target, std::time::Instant::now()));
    }

    /// The connection to `target` ended.
    pub fn release(&self, key: &(ServiceKey, u16), target: std::net::SocketAddr) {
        self.with(key, |b| b.release(&target));
    }
}
