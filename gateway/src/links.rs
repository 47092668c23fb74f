//! Links: [`supervise`] keeps the running links in line with the desired
//! set (from the config file, or from Link objects in Kubernetes), and
//! [`run`] is the dialing side of one link: keep one tunnel to the peer up
//! (resolving its addresses again on every attempt, backing off with
//! jitter between failures), watch its catalog over that tunnel, and
//! forget its imports once it has been gone longer than the grace period.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use rustls::RootCertStore;
use strait_proxy::identity::{CertError, ExpectedPeerVerifier, SpiffeId, TrustAnchors};
use strait_proxy::tls;

use tokio::sync::watch;

use crate::config::Transport;
use crate::gateway::Shared;
use crate::k8s::crd::AcceptPolicy;
use crate::metrics::{PeerLabels, PeerResultLabels};
use crate::peering::{self, CatalogChange};
use crate::state::PeerConn;
use crate::tunnel::io::PeerInfo;
use crate::tunnel::tcp::TcpDialer;
use crate::tunnel::{frame, TunnelIo};

/// A linked peer, as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkEntry {
    /// The peer's cluster name.
    pub name: String,
    /// The identity its gateways must present.
    pub identity: SpiffeId,
    /// `host:port` of its gateways; empty when only the peer dials.
    pub addresses: Vec<String>,
    /// Which of its exports to import (all when `None`).
    pub accept: Option<AcceptPolicy>,
    /// The peer's own trust anchors (PEM), when it does not share ours.
    pub trust_bundle: Option<String>,
    /// QUIC, TLS over TCP, or QUIC falling back to TCP.
    pub transport: Transport,
}

impl LinkEntry {
    /// The anchors the peer's chain must lead to: its own bundle, or ours.
    pub fn roots(&self, ours: &TrustAnchors) -> Result<Arc<RootCertStore>, CertError> {
        match &self.trust_bundle {
            Some(pem) => Ok(TrustAnchors::from_pem(
                pem.as_bytes(),
                &format!("{} trust bundle", self.name),
            )?
            .roots()),
            None => Ok(ours.roots()),
        }
    }
}

struct Running {
    entry: LinkEntry,
    task: Option<tokio::task::JoinHandle<()>>,
    /// Bumped whenever the entry is (re)configured.
    generation: u64,
}

/// Resolves once link `name` is no longer the one of `generation` (changed
/// or removed): connections accepted under it end then.
pub async fn revoked(shared: &Shared, name: &str, generation: u64) {
    revocation(shared, name.to_string(), generation).await;
}

/// [`revoked`] as an owned future, for connections handed elsewhere.
pub fn revocation(
    shared: &Shared,
    name: String,
    generation: u64,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let mut rx = shared.link_generations.subscribe();
    async move {
        let _ = rx.wait_for(|g| g.get(&name) != Some(&generation)).await;
    }
}

/// The current generation of link `name`, if it is configured.
pub fn generation(shared: &Shared, name: &str) -> Option<u64> {
    shared.link_generations.borrow().get(name).copied()
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// Applies one desired link set: starts new links, restarts changed ones,
/// stops removed ones. A changed or removed link's tunnels are cut — the
/// one we dialed, the one the peer dialed, and every TCP connection it
/// holds (see [`revoked`]) — so a rotated identity or trust bundle is
/// checked again from a fresh handshake; a removed link's imports go too.
async fn apply(
    shared: &Arc<Shared>,
    running: &mut BTreeMap<String, Running>,
    desired: &[LinkEntry],
    next_generation: &mut u64,
) {
    let want: BTreeMap<&str, &LinkEntry> = desired.iter().map(|l| (l.name.as_str(), l)).collect();
    let stale: Vec<String> = running
        .iter()
        .filter(|(name, r)| want.get(name.as_str()).is_none_or(|w| **w != r.entry))
        .map(|(name, _)| name.clone())
        .collect();
    for name in stale {
        let Some(mut r) = running.remove(&name) else {
            continue;
        };
        // Wait for the dialing task to be gone, so it cannot bring back
        // imports after they are forgotten below.
        if let Some(task) = r.task.take() {
            task.abort();
            let _ = task.await;
        }
        if let Some(PeerConn::Quic(conn)) = shared.peers.take_connection(&name) {
            conn.close(quinn::VarInt::from_u32(0), b"link changed");
        }
        for conn in shared.accepted.remove(&name) {
            conn.close(quinn::VarInt::from_u32(0), b"link changed");
        }
        if let Some(new) = want.get(name.as_str()) {
            tracing::info!(peer = %name, "link changed");
            // A link that no longer dials watches no catalog: what it
            // imported has nothing to keep it, nor a dialing task's grace
            // timer to forget it.
            if new.addresses.is_empty() {
                shared.imports.forget(&name);
            }
        } else {
            tracing::info!(peer = %name, "link removed");
            shared.peers.remove(&name);
            shared.imports.forget(&name);
            shared.imports.set_policy(&name, None);
        }
    }
    // New and changed links get their generation, published before any is
    // dialed: a connection made under a generation must find it current.
    let mut to_dial = Vec::new();
    for entry in desired {
        if running.contains_key(&entry.name) {
            continue;
        }
        tracing::info!(peer = %entry.name, identity = %entry.identity, "link configured");
        shared.peers.add(
            &entry.name,
            entry.identity.as_str(),
            entry.addresses.clone(),
        );
        shared.imports.set_policy(&entry.name, entry.accept.clone());
        *next_generation += 1;
        running.insert(
            entry.name.clone(),
            Running {
                entry: entry.clone(),
                task: None,
                generation: *next_generation,
            },
        );
        let roots = match entry.roots(&shared.anchors) {
            Ok(r) => r,
            Err(error) => {
                // Links from Kubernetes are checked before they get here;
                // a bad bundle leaves the peer unable to connect, not us.
                tracing::error!(peer = %entry.name, %error, "bad trust bundle; link disabled");
                continue;
            }
        };
        if !entry.addresses.is_empty() {
            to_dial.push(DialedLink {
                name: entry.name.clone(),
                identity: entry.identity.clone(),
                addresses: entry.addresses.clone(),
                roots,
                transport: entry.transport,
                generation: *next_generation,
            });
        }
    }
    shared.link_generations.send_replace(
        running
            .iter()
            .map(|(name, r)| (name.clone(), r.generation))
            .collect(),
    );
    for link in to_dial {
        if let Some(r) = running.get_mut(&link.name) {
            r.task = Some(tokio::spawn(run(link, shared.clone())));
        }
    }
    let by_identity: HashMap<SpiffeId, String> = desired
        .iter()
        .map(|l| (l.identity.clone(), l.name.clone()))
        .collect();
    let with_roots = desired.iter().filter_map(|l| match &l.trust_bundle {
        None => Some((l.identity.clone(), None)),
        Some(_) => l
            .roots(&shared.anchors)
            .ok()
            .map(|r| (l.identity.clone(), Some(r))),
    });
    if let Err(error) = shared.allowed.set_with_roots(with_roots) {
        tracing::error!(%error, "cannot build the linked peers' verifiers; keeping the last set");
    }
    *shared
        .links_by_identity
        .write()
        .unwrap_or_else(|e| e.into_inner()) = by_identity;
}

/// Keeps the running links equal to the desired set until aborted (or the
/// sender is dropped, when the last set stays).
pub async fn supervise(shared: Arc<Shared>, mut desired: watch::Receiver<Arc<Vec<LinkEntry>>>) {
    let mut running = BTreeMap::new();
    let mut generation = 0;
    loop {
        let set = desired.borrow_and_update().clone();
        apply(&shared, &mut running, &set, &mut generation).await;
        if desired.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// A link this gateway dials.
#[derive(Clone, Debug)]
pub struct DialedLink {
    /// The peer's name.
    pub name: String,
    /// The identity it must present.
    pub identity: SpiffeId,
    /// `host:port` addresses.
    pub addresses: Vec<String>,
    /// The anchors its chain must lead to.
    pub roots: Arc<RootCertStore>,
    /// How to reach it.
    pub transport: Transport,
    /// The link's generation: what it opens is cut when that changes.
    pub generation: u64,
}

/// Exponential backoff with jitter: each delay is drawn from
/// `[d/2, d]` where `d` doubles from `min` up to `max`.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    cur: Duration,
}

impl Backoff {
    /// A backoff starting at `min`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self { min, max, cur: min }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.cur;
        self.cur = (self.cur * 2).min(self.max);
        let half = d / 2;
        half + half.mul_f64(rand::rng().random::<f64>())
    }

    /// Back to `min` after a success.
    pub fn reset(&mut self) {
        self.cur = self.min;
    }
}

/// How long one dial may take, at most.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often to sample the tunnel's round-trip time.
const RTT_INTERVAL: Duration = Duration::from_secs(2);

/// How long QUIC gets before `auto` tries TCP.
const AUTO_QUIC_TIMEOUT: Duration = Duration::from_secs(3);

async fn dial_quic(
    link: &DialedLink,
    shared: &Shared,
    client_tls: &rustls::ClientConfig,
    timeout: Duration,
) -> Result<quinn::Connection, String> {
    let mut errors = Vec::new();
    for addr in &link.addresses {
        let resolved = match tokio::net::lookup_host(addr.as_str()).await {
            Ok(r) => r.collect::<Vec<_>>(),
            Err(e) => {
                errors.push(format!("{addr}: resolve: {e}"));
                continue;
            }
        };
        for sa in resolved {
            match tokio::time::timeout(timeout, shared.endpoint.connect(sa, client_tls.clone()))
                .await
            {
                Ok(Ok(conn)) => return Ok(conn),
                Ok(Err(e)) => errors.push(format!("{sa}: {e}")),
                Err(_) => errors.push(format!("{sa}: timed out")),
            }
        }
    }
    Err(if errors.is_empty() {
        "no addresses".into()
    } else {
        errors.join("; ")
    })
}

/// A tunnel just dialed: a QUIC connection, or a TCP dialer with its
/// peering connection already open (so "up" means handshake done).
enum Dialed {
    Quic(quinn::Connection),
    Tcp(Arc<TcpDialer>, TunnelIo),
}

async fn dial_tcp(
    link: &DialedLink,
    shared: &Shared,
    client_tls: &Arc<rustls::ClientConfig>,
) -> Result<Dialed, String> {
    let peer = PeerInfo {
        name: link.name.clone(),
        identity: link.identity.to_string(),
    };
    let revocations: crate::tunnel::tcp::Revocations = {
        let gens = shared.link_generations.subscribe();
        let (name, generation) = (link.name.clone(), link.generation);
        Arc::new(move || {
            let (mut gens, name) = (gens.clone(), name.clone());
            Box::pin(async move {
                let _ = gens.wait_for(|g| g.get(&name) != Some(&generation)).await;
            })
        })
    };
    let dialer = Arc::new(
        TcpDialer::new(link.addresses.clone(), client_tls.clone(), peer).revoked_by(revocations),
    );
    let header = frame::encode(&frame::peering_header(shared.certs.id().as_str()))
        .map_err(|e| e.to_string())?;
    let first = dialer
        .open(&header)
        .await
        .map_err(|e| format!("tcp: {e}"))?;
    Ok(Dialed::Tcp(dialer, first))
}

async fn dial(
    link: &DialedLink,
    shared: &Shared,
    client_tls: &Arc<rustls::ClientConfig>,
) -> Result<Dialed, String> {
    match link.transport {
        Transport::Quic => dial_quic(link, shared, client_tls, CONNECT_TIMEOUT)
            .await
            .map(Dialed::Quic),
        Transport::Tcp => dial_tcp(link, shared, client_tls).await,
        Transport::Auto => match dial_quic(link, shared, client_tls, AUTO_QUIC_TIMEOUT).await {
            Ok(conn) => Ok(Dialed::Quic(conn)),
            Err(quic) => {
                tracing::debug!(peer = %link.name, error = %quic, "QUIC failed; trying TLS over TCP");
                dial_tcp(link, shared, client_tls)
                    .await
                    .map_err(|tcp| format!("quic: {quic}; {tcp}"))
            }
        },
    }
}

/// Runs a link until the task is aborted.
pub async fn run(link: DialedLink, shared: Arc<Shared>) {
    let client_tls = match tls::client_config(
        ExpectedPeerVerifier::new(
            link.roots.clone(),
            link.identity.clone(),
            shared.metrics.tls.sink("connect"),
        ),
        shared.certs.clone(),
        &[tls::TUNNEL_ALPN],
    ) {
        Ok(c) => Arc::new(c),
        Err(error) => {
            tracing::error!(peer = %link.name, %error, "cannot build TLS config; link disabled");
            return;
        }
    };
    let up = shared
        .metrics
        .peer_up
        .get_or_create(&PeerLabels {
            peer: link.name.clone(),
        })
        .clone();
    let mut backoff = Backoff::new(shared.reconnect_min, shared.reconnect_max);
    let mut lost_since = Instant::now();
    loop {
        match dial(&link, &shared, &client_tls).await {
            Ok(dialed) => {
                let (conn, first) = match dialed {
                    Dialed::Quic(c) => (PeerConn::Quic(c), None),
                    Dialed::Tcp(d, first) => (PeerConn::Tcp(d), Some(first)),
                };
                // "Up" only once the peer's first catalog arrives: a TLS 1.3
                // client finishes its handshake before the server has
                // judged the client's certificate, so a refused dial would
                // otherwise look up for a moment.
                let (error, synced) = serve(&link, &shared, conn.clone(), first, &up).await;
                if let PeerConn::Quic(c) = &conn {
                    c.close(quinn::VarInt::from_u32(0), b"tunnel down");
                }
                up.set(0);
                if synced {
                    backoff.reset();
                    tracing::warn!(peer = %link.name, %error, "tunnel down");
                } else {
                    count(&shared, &link.name, "error");
                    tracing::debug!(peer = %link.name, %error, "tunnel refused or lost before its catalog");
                }
                shared.peers.disconnected(&link.name, Some(error));
                // The grace period runs from the last time the peer's
                // catalog was current, not from every failed attempt.
                if synced {
                    lost_since = Instant::now();
                }
            }
            Err(error) => {
                count(&shared, &link.name, "error");
                tracing::debug!(peer = %link.name, %error, "dial failed");
                shared.peers.disconnected(&link.name, Some(error));
            }
        }
        if lost_since.elapsed() >= shared.grace_period {
            shared.imports.forget(&link.name);
        }
        tokio::time::sleep(backoff.next_delay()).await;
        if lost_since.elapsed() >= shared.grace_period {
            shared.imports.forget(&link.name);
        }
    }
}

fn count(shared: &Shared, peer: &str, result: &'static str) {
    shared
        .metrics
        .peer_connects
        .get_or_create(&PeerResultLabels {
            peer: peer.to_string(),
            result,
        })
        .inc();
}

/// Watches the catalog (again, with backoff, if the watch alone fails)
/// and samples the path until the tunnel closes; returns why, and whether
/// a catalog was received on this connection.
async fn serve(
    link: &DialedLink,
    shared: &Shared,
    conn: PeerConn,
    first: Option<TunnelIo>,
    up: &prometheus_client::metrics::gauge::Gauge,
) -> (String, bool) {
    let rtt = shared
        .metrics
        .peer_rtt
        .get_or_create(&PeerLabels {
            peer: link.name.clone(),
        })
        .clone();
    let quic = match &conn {
        PeerConn::Quic(c) => Some(c.clone()),
        PeerConn::Tcp(_) => None,
    };
    let sample = async {
        loop {
            match &conn {
                PeerConn::Quic(c) => {
                    let stats = c.stats();
                    rtt.observe(stats.path.rtt.as_secs_f64());
                    shared.peers.sample(&link.name, &stats);
                }
                // TCP: each stream's connect times one round trip.
                PeerConn::Tcp(d) => {
                    if let Some(r) = d.rtt() {
                        rtt.observe(r.as_secs_f64());
                        shared.peers.set_rtt(&link.name, r);
                    }
                }
            }
            tokio::time::sleep(RTT_INTERVAL).await;
        }
    };
    let closed = async {
        match &quic {
            Some(c) => c.closed().await.to_string(),
            None => std::future::pending().await,
        }
    };
    let first = std::sync::Mutex::new(first);
    let synced = std::sync::atomic::AtomicBool::new(false);
    let watch = async {
        let mut backoff = Backoff::new(shared.reconnect_min, shared.reconnect_max);
        loop {
            let peer = PeerInfo {
                name: link.name.clone(),
                identity: link.identity.to_string(),
            };
            let imports = shared.imports.clone();
            let peers = shared.peers.clone();
            let name = link.name.clone();
            let (status_conn, up, metrics) = (conn.clone(), up.clone(), shared.metrics.clone());
            let synced = &synced;
            let first = first.lock().unwrap_or_else(|e| e.into_inner()).take();
            let result = peering::watch_peer(
                conn.clone(),
                first,
                peer,
                &shared.cluster,
                shared.certs.id().as_str(),
                &shared.metrics,
                move |change| {
                    if !synced.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        tracing::info!(peer = %name, transport = status_conn.transport(), "tunnel up");
                        // Counted before the tunnel is offered to new
                        // streams: traffic over it implies the count.
                        up.set(1);
                        metrics
                            .peer_connects
                            .get_or_create(&PeerResultLabels {
                                peer: name.clone(),
                                result: "ok",
                            })
                            .inc();
                        peers.connected(&name, status_conn.clone());
                        peers.catalog_received(&name);
                    }
                    match change {
                        CatalogChange::Snapshot(exports) => imports.snapshot(&name, exports),
                        CatalogChange::Delta(up, rm) => imports.delta(&name, up, rm),
                    }
                },
            )
            .await;
            let error = match result {
                Ok(()) => "catalog stream ended".to_string(),
                Err(e) => e.to_string(),
            };
            // Over TCP the watch's connection is the tunnel's liveness.
            if quic.as_ref().is_none_or(|c| c.close_reason().is_some()) {
                return error;
            }
            // The tunnel is fine; only the watch failed (the peer's
            // peering server restarting, say): watch again, keep traffic.
            tracing::warn!(peer = %link.name, %error, "catalog watch failed; watching again");
            tokio::time::sleep(backoff.next_delay()).await;
        }
    };
    let why = tokio::select! {
        e = watch => e,
        e = closed => e,
        _ = sample => String::from("path sampler stopped"),
    };
    (why, synced.load(std::sync::atomic::Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let delays: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
        let bounds = [100, 200, 400, 800, 1000, 1000];
        for (d, max) in delays.iter().zip(bounds) {
            let max = Duration::from_millis(max);
            assert!(
                *d >= max / 2 && *d <= max,
                "{d:?} not in [{:?}, {max:?}]",
                max / 2
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
