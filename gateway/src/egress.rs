//! Egress listeners: one TCP listener for every imported port, following
//! the [`Realized`] import table as it changes. Each accepted connection
//! becomes one tunnel stream to an exporting peer (or to the one pinned
//! peer, for a `<svc>-<cluster>` mirror in Kubernetes).
//!
//! Outside Kubernetes a listener is `VIP:port` ([`vip_listeners`]); in
//! Kubernetes it is the egress port allocated for that (Service, port) on
//! every gateway pod (see [`crate::k8s::mirror`]).

use std::collections::HashMap;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt as _;
use strait_dns::ServiceRecord;
use strait_proxy::net::LimitedAccept;
use tokio::net::{TcpListener, TcpStream};

use crate::catalog::ServiceKey;
use crate::gateway::Shared;
use crate::imports::{tcp_ports, ImportTable};
use crate::tunnel::frame;
use crate::tunnel::io::{relay, reset_tcp, Local, PeerInfo};

/// How often bind failures are retried even if imports do not change.
const RETRY: Duration = Duration::from_secs(5);

/// What one egress listener carries.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EgressTarget {
    /// The imported service.
    pub key: ServiceKey,
    /// The service port.
    pub port: u16,
    /// Only this peer (a cluster-pinned mirror), or any exporting peer.
    pub pin: Option<String>,
}

/// An import table made real: where its listeners are and what DNS says.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Realized {
    /// The imports.
    pub table: Arc<ImportTable>,
    /// Listener address to what it carries.
    pub listeners: HashMap<SocketAddr, EgressTarget>,
    /// The DNS records of the clusterset zone.
    pub records: Vec<ServiceRecord>,
}

struct Listener {
    target: EgressTarget,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// The listeners of an import table outside Kubernetes: `VIP:port` for
/// every TCP port (pure).
pub fn vip_listeners(table: &ImportTable) -> HashMap<SocketAddr, EgressTarget> {
    table
        .values()
        .flat_map(|import| {
            tcp_ports(import).map(move |p| {
                (
                    SocketAddr::V4(SocketAddrV4::new(import.vip, p.port)),
                    EgressTarget {
                        key: import.key.clone(),
                        port: p.port,
                        pin: None,
                    },
                )
            })
        })
        .collect()
}

/// Keeps the listeners in line with the realized table until aborted.
pub async fn run(shared: Arc<Shared>) {
    let mut rx = shared.realized.subscribe();
    let mut listeners: HashMap<SocketAddr, Listener> = HashMap::new();
    loop {
        let realized = rx.borrow_and_update().clone();
        let want = &realized.listeners;
        // Stop what is no longer wanted and wait until those sockets are
        // closed: a port whose target changed is bound again at once.
        let stale: Vec<SocketAddr> = listeners
            .iter()
            .filter(|(addr, l)| want.get(*addr) != Some(&l.target))
            .map(|(addr, _)| *addr)
            .collect();
        for addr in stale {
            if let Some(mut l) = listeners.remove(&addr) {
                if let Some(task) = l.task.take() {
                    task.abort();
                    let _ = task.await;
                }
            }
        }
        for (addr, target) in want {
            if listeners.contains_key(addr) {
                continue;
            }
            match strait_proxy::net::bind_listener(*addr) {
                Ok(listener) => {
                    tracing::info!(%addr, service = %target.key, pin = ?target.pin, "egress listener up");
                    let task = tokio::spawn(accept(listener, target.clone(), shared.clone()));
                    listeners.insert(
                        *addr,
                        Listener {
                            target: target.clone(),
                            task: Some(task),
                        },
                    );
                }
                Err(error) => {
                    tracing::warn!(%addr, service = %target.key, %error, "cannot bind egress listener; will retry");
                    shared.metrics.egress_bind_errors.inc();
                }
            }
        }
        shared.metrics.egress_listeners.set(listeners.len() as i64);
        // Announce the table once DNS answers it too (bounded: DNS is
        // built off the async workers and normally lands within ms).
        let mut dns = shared.dns_synced.subscribe();
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            dns.wait_for(|r| Arc::ptr_eq(r, &realized) || **r == *realized),
        )
        .await;
        shared.egress_synced.send_replace(realized.table.clone());
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(RETRY) => {}
        }
    }
}

async fn accept(listener: TcpListener, target: EgressTarget, shared: Arc<Shared>) {
    let target = Arc::new(target);
    let metrics = shared.metrics.clone();
    // Every egress listener shares the limit: at it, none accepts until a
    // connection ends (new ones wait in the listen backlog).
    let listener = LimitedAccept::sharing(listener, shared.egress_slots.clone(), "egress")
        .on_limit(move || metrics.limit_reached("outbound"));
    loop {
        let (tcp, _, slot) = listener.accept().await;
        let _ = tcp.set_nodelay(true);
        let forwarding = forward(tcp, target.clone(), shared.clone());
        tokio::spawn(forwarding.map(move |()| drop(slot)));
    }
}

/// How long opening a stream (peer flow-control credit) may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

async fn forward(tcp: TcpStream, target: Arc<EgressTarget>, shared: Arc<Shared>) {
    let (key, port) = (&target.key, target.port);
    // Only peers exporting this port: services merged from several
    // clusters may have ports that only some of them export.
    let candidates = match shared.imports.current().get(key) {
        Some(import) => {
            let mut peers = import.peers_for(port);
            if let Some(pin) = &target.pin {
                peers.retain(|p| p == pin);
            }
            peers
        }
        None => {
            reset_tcp(&tcp);
            return;
        }
    };
    let Some((peer, conn)) = shared.peers.pick(&candidates) else {
        tracing::info!(service = %key, "no live tunnel to any exporting peer");
        let peer = candidates.first().cloned().unwrap_or_default();
        shared.metrics.stream_done(&peer, "outbound", "no_tunnel");
        reset_tcp(&tcp);
        return;
    };
    let header = match frame::encode(&frame::tcp_header(key, port, shared.certs.id().as_str())) {
        Ok(h) => h,
        Err(error) => {
            tracing::warn!(%error, "cannot encode stream header");
            reset_tcp(&tcp);
            return;
        }
    };
    let info = PeerInfo {
        name: peer.clone(),
        identity: String::new(),
    };
    let mut io = match tokio::time::timeout(OPEN_TIMEOUT, conn.open(&header, info)).await {
        Ok(Ok(io)) => io,
        Ok(Err(error)) => {
            tracing::info!(%peer, %error, "cannot open tunnel stream");
            shared.metrics.stream_done(&peer, "outbound", "error");
            reset_tcp(&tcp);
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "opening a tunnel stream timed out");
            shared
                .metrics
                .stream_done(&peer, "outbound", "open_timeout");
            reset_tcp(&tcp);
            return;
        }
    };
    relay(&mut Local::Tcp(tcp), &mut io, &shared.metrics, "outbound").await;
}
