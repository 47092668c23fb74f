//! Destination discovery for the sidecar proxies of this cluster: the gRPC
//! service `strait.destination.v1.Destination`, answered from the
//! gateway's own cluster source (the same [`ClusterState`] watch that feeds
//! the export catalog).
//!
//! A proxy asks for an authority (`hello.demo.svc.cluster.local:8080`,
//! `hello.demo.svc:8080`, `hello.demo:8080`, or an endpoint's own
//! `10.0.0.7:8080`) and gets a server stream of [`Update`]s: the current
//! set of ready endpoints, each with its target address, weight, SPIFFE
//! identity (when meshed) and protocol hint, then a new one every time the
//! set changes, until the proxy goes away. Every update is a complete
//! snapshot (no deltas), so a proxy keeps only the last one.
//!
//! - A name of the right shape that names no service port (unknown service,
//!   or a port the service does not have) is answered
//!   `no_endpoints { exists: false }`, and the stream stays open: the
//!   service may appear later. A service port without ready endpoints is
//!   `no_endpoints { exists: true }`. Either way the proxy falls back to
//!   DNS and the original destination.
//! - An authority that can never be a cluster name (no port, an external
//!   name like `api.example.com:443`) is refused with `INVALID_ARGUMENT`,
//!   which a proxy may remember.
//!
//! The service is plain gRPC over TCP on its own listener
//! (`listen.destination`, default port 8086, like Linkerd's destination
//! service), for the sidecars and gateways of one cluster. Serving it over
//! mTLS (sidecars presenting their SPIFFE identity) is future work, as is a
//! configurable cluster domain (`cluster.local` here).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use strait_proxy::net::{LimitedAccept, Slot};

use strait_proto::destination::v1::destination_server::{
    Destination, DestinationServer as GrpcServer,
};
use strait_proto::destination::v1::{
    update, AddressSet, GetDestination, NoEndpoints, Update, WeightedAddr,
};
use strait_proto::tunnel::v1::ProtocolHint;
use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::catalog::{
    validate_label, ClusterState, InvalidExport, LocalService, Port, Protocol, ServiceKey,
};

/// The cluster domain of `<svc>.<ns>.svc.<domain>` names.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// Most `Get` streams one connection may hold open at once.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 4096;

/// What an authority asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A service port, by number.
    Service {
        /// Namespace and name.
        key: ServiceKey,
        /// The service port number.
        port: u16,
    },
    /// One endpoint, by its own address: answered with that endpoint alone,
    /// so a proxy forwarding a connection to it learns its identity.
    Addr(SocketAddr),
}

/// Why an authority can never name anything in this cluster.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvalidAuthority {
    /// No `:port`.
    #[error("{0:?} has no port")]
    MissingPort(String),
    /// The port is not 1 to 65535.
    #[error("{0:?} has an invalid port")]
    Port(String),
    /// Not `<svc>.<ns>`, `<svc>.<ns>.svc` or `<svc>.<ns>.svc.cluster.local`.
    #[error("{0:?} is not a cluster-local service name")]
    NotClusterLocal(String),
    /// The service or namespace is not a DNS label.
    #[error(transparent)]
    Label(#[from] InvalidExport),
}

/// Parses `<svc>.<ns>.svc.cluster.local:<port>`, `<svc>.<ns>.svc:<port>`,
/// `<svc>.<ns>:<port>` (any case, a trailing dot allowed) or
/// `<ip>:<port>` (pure).
pub fn parse_authority(authority: &str) -> Result<Target, InvalidAuthority> {
    if let Ok(addr) = authority.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err(InvalidAuthority::Port(authority.to_string()));
        }
        return Ok(Target::Addr(addr));
    }
    let (host, port) = authority
        .rsplit_once(':')
        .ok_or_else(|| InvalidAuthority::MissingPort(authority.to_string()))?;
    let port = strait_proxy::net::port_number(port)
        .ok_or_else(|| InvalidAuthority::Port(authority.to_string()))?;
    let host = host.to_ascii_lowercase();
    let host = host.strip_suffix('.').unwrap_or(&host);
    let labels: Vec<&str> = host.split('.').collect();
    let (name, namespace) = match labels.as_slice() {
        [name, ns] | [name, ns, "svc"] => (*name, *ns),
        [name, ns, "svc", rest @ ..] if rest.join(".") == CLUSTER_DOMAIN => (*name, *ns),
        _ => return Err(InvalidAuthority::NotClusterLocal(authority.to_string())),
    };
    validate_label("namespace", namespace)?;
    validate_label("service name", name)?;
    Ok(Target::Service {
        key: ServiceKey::new(namespace, name),
        port,
    })
}

/// What a service port's `appProtocol` says of the traffic on it.
pub fn protocol_hint(port: &Port) -> ProtocolHint {
    match port.app_protocol.as_deref().map(str::to_ascii_lowercase) {
        None => ProtocolHint::Unknown,
        Some(p) => match p.as_str() {
            "http" | "http1" | "http/1.1" => ProtocolHint::Http1,
            "kubernetes.io/h2c" | "h2c" | "http2" => ProtocolHint::Http2,
            "grpc" => ProtocolHint::Grpc,
            // Already encrypted, or not HTTP at all: the proxy must not
            // try to read it.
            "tcp" | "opaque" | "tls" | "https" | "kubernetes.io/wss" => ProtocolHint::Opaque,
            _ => ProtocolHint::Unknown,
        },
    }
}

fn weighted(
    addr: SocketAddr,
    identity: Option<&strait_proxy::identity::SpiffeId>,
    hint: ProtocolHint,
) -> WeightedAddr {
    WeightedAddr {
        addr: addr.to_string(),
        weight: 1,
        identity: identity.map(|i| i.as_str().to_string()).unwrap_or_default(),
        protocol_hint: hint as i32,
    }
}

fn no_endpoints(exists: bool) -> Update {
    Update {
        update: Some(update::Update::NoEndpoints(NoEndpoints { exists })),
    }
}

fn tcp_port(service: &LocalService, number: u16) -> Option<&Port> {
    service
        .ports
        .iter()
        .find(|p| p.port == number && p.protocol == Protocol::Tcp)
}

/// The update for `target` in `state` (pure). Service ports list their
/// ready endpoints at their target ports, ordered by address, one entry per
/// address; an endpoint address is answered whether or not it is ready
/// (the caller already chose it; it only learns how to reach it).
pub fn lookup(state: &ClusterState, target: &Target) -> Update {
    let addrs: Vec<WeightedAddr> = match target {
        Target::Service { key, port } => {
            let Some((service, port)) = state
                .services
                .get(key)
                .and_then(|s| tcp_port(s, *port).map(|p| (s, p)))
            else {
                return no_endpoints(false);
            };
            let hint = protocol_hint(port);
            let mut by_addr = BTreeMap::new();
            for e in service.endpoints.iter().filter(|e| e.ready) {
                let addr = e.target(port);
                by_addr
                    .entry(addr)
                    .or_insert_with(|| weighted(addr, e.identity.as_ref(), hint));
            }
            if by_addr.is_empty() {
                return no_endpoints(true);
            }
            by_addr.into_values().collect()
        }
        Target::Addr(addr) => state
            .services
            .values()
            .flat_map(|s| s.endpoints.iter().map(move |e| (s, e)))
            .filter(|(_, e)| e.ip == addr.ip())
            .find_map(|(s, e)| {
                s.ports
                    .iter()
                    .filter(|p| p.protocol == Protocol::Tcp)
                    .find(|p| e.target(p) == *addr)
                    .map(|p| weighted(*addr, e.identity.as_ref(), protocol_hint(p)))
            })
            .into_iter()
            .collect(),
    };
    if addrs.is_empty() {
        return no_endpoints(false);
    }
    Update {
        update: Some(update::Update::Set(AddressSet { addrs })),
    }
}

/// The gRPC service over the local cluster state.
#[derive(Clone, Debug)]
pub struct DestinationService {
    local: watch::Receiver<Arc<ClusterState>>,
    stopping: watch::Receiver<bool>,
}

impl DestinationService {
    /// A service over `local`; its streams end when `stopping` turns true
    /// or closes, or when `local` closes.
    pub fn new(local: watch::Receiver<Arc<ClusterState>>, stopping: watch::Receiver<bool>) -> Self {
        Self { local, stopping }
    }
}

#[tonic::async_trait]
impl Destination for DestinationService {
    type GetStream = ReceiverStream<Result<Update, Status>>;

    async fn get(
        &self,
        request: Request<GetDestination>,
    ) -> Result<Response<Self::GetStream>, Status> {
        let authority = request.into_inner().authority;
        let target =
            parse_authority(&authority).map_err(|e| Status::invalid_argument(e.to_string()))?;
        tracing::debug!(%authority, "destination watch");
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut local = self.local.clone();
        let mut stopping = self.stopping.clone();
        tokio::spawn(async move {
            let mut sent: Option<Update> = None;
            loop {
                let update = lookup(&local.borrow_and_update(), &target);
                if sent.as_ref() != Some(&update) {
                    if tx.send(Ok(update.clone())).await.is_err() {
                        return;
                    }
                    sent = Some(update);
                }
                tokio::select! {
                    changed = local.changed() => if changed.is_err() { return },
                    () = tx.closed() => return,
                    _ = stopping.wait_for(|s| *s) => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// The destination listener: gRPC over TCP, plain or mTLS (any workload
/// identity chained to the cluster's anchors may ask). Dropping it stops
/// accepting, ends every open stream and lets the connections close.
#[derive(Debug)]
pub struct DestinationServer {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
}

/// One connection to a control-plane gRPC service (mTLS, TLS or, for the
/// destination service without identities, plaintext), holding its share
/// of the listener's connection limit until it closes.
pub(crate) struct ControlConn {
    io: ControlIo,
    _slot: Slot,
}

enum ControlIo {
    Tls(Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>),
    Plain(tokio::net::TcpStream),
}

impl tonic::transport::server::Connected for ControlConn {
    type ConnectInfo = ();

    fn connect_info(&self) {}
}

impl tokio::io::AsyncRead for ControlConn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match &mut self.io {
            ControlIo::Tls(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            ControlIo::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for ControlConn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match &mut self.io {
            ControlIo::Tls(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            ControlIo::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match &mut self.io {
            ControlIo::Tls(s) => std::pin::Pin::new(s).poll_flush(cx),
            ControlIo::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match &mut self.io {
            ControlIo::Tls(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            ControlIo::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// The destination listener's mTLS config: this gateway's certificate, and
/// any workload identity chained to `anchors` (its issuer bound to its
/// trust domain) may ask.
pub fn server_tls(
    anchors: &strait_proxy::identity::TrustAnchors,
    certs: Arc<strait_proxy::identity::CertStore>,
    refusals: strait_proxy::identity::RefusalSink,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let verifier = strait_proxy::identity::LinkedPeersVerifier::new(
        anchors.roots(),
        strait_proxy::identity::AllowedPeers::any(),
        refusals,
    )?;
    Ok(Arc::new(strait_proxy::tls::server_config(
        verifier,
        certs,
        &[strait_proxy::tls::CONTROL_PLANE_ALPN],
    )?))
}

/// TLS handshakes in progress at once, at most.
const MAX_HANDSHAKES: usize = 128;

/// Connections a control-plane listener serves at once (one or two per
/// sidecar in the cluster), and at most from one address: past either,
/// one more is not served, so a single pod cannot take the descriptors
/// the tunnels and egress listeners need, nor every slot.
pub const MAX_CONTROL_CONNECTIONS: usize = 16_384;
/// See [`MAX_CONTROL_CONNECTIONS`].
pub const MAX_CONTROL_CONNECTIONS_PER_SOURCE: usize = 256;

/// Accepts a control-plane service's connections within its limits and
/// hands on those whose TLS handshake succeeds (refusals are counted by
/// the verifier), or every one with no `tls`. `at_limit` counts each
/// time the limit holds connections back.
pub(crate) fn control_incoming(
    service: &'static str,
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    at_limit: impl Fn() + Send + Sync + 'static,
    mut stopping: watch::Receiver<bool>,
) -> ReceiverStream<std::io::Result<ControlConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let listener = LimitedAccept::new(listener, MAX_CONTROL_CONNECTIONS, service)
        .per_source(MAX_CONTROL_CONNECTIONS_PER_SOURCE)
        .on_limit(at_limit);
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let (tcp, remote, slot) = tokio::select! {
                a = listener.accept() => a,
                _ = stopping.wait_for(|s| *s) => return,
            };
            let _ = tcp.set_nodelay(true);
            let Some(acceptor) = acceptor.clone() else {
                let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(
                    &socket2::TcpKeepalive::new().with_time(Duration::from_secs(60)),
                );
                let conn = ControlConn {
                    io: ControlIo::Plain(tcp),
                    _slot: slot,
                };
                if tx.send(Ok(conn)).await.is_err() {
                    return;
                }
                continue;
            };
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let handshake =
                    tokio::time::timeout(Duration::from_secs(5), acceptor.accept(tcp)).await;
                drop(permit);
                match handshake {
                    Ok(Ok(stream)) => {
                        let conn = ControlConn {
                            io: ControlIo::Tls(Box::new(stream)),
                            _slot: slot,
                        };
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(Err(error)) => {
                        tracing::info!(service, %remote, %error, "TLS handshake failed")
                    }
                    Err(_) => tracing::info!(service, %remote, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

impl DestinationServer {
    /// Binds `addr` and serves `local` on it, over mTLS with `tls` (see
    /// [`server_tls`]) or in plaintext.
    pub async fn bind(
        addr: SocketAddr,
        local: watch::Receiver<Arc<ClusterState>>,
        tls: Option<Arc<rustls::ServerConfig>>,
        at_limit: impl Fn() + Send + Sync + 'static,
    ) -> std::io::Result<Self> {
        let listener = strait_proxy::net::bind_listener(addr)?;
        let bound = listener.local_addr()?;
        let mtls = tls.is_some();
        let (stop, stopping) = watch::channel(false);
        let service = DestinationService::new(local, stopping.clone());
        let server = tonic::transport::Server::builder()
            // One stream per name a proxy follows (a proxy follows at
            // most 1000); bound what one connection can hold open.
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            // Notice proxies that vanished without closing.
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(GrpcServer::new(service));
        let mut shutdown = stopping.clone();
        let stopped = async move {
            let _ = shutdown.wait_for(|s| *s).await;
        };
        let incoming = control_incoming("destination", listener, tls, at_limit, stopping);
        tokio::spawn(async move {
            if let Err(error) = server.serve_with_incoming_shutdown(incoming, stopped).await {
                tracing::warn!(%error, "destination server stopped");
            }
        });
        tracing::info!(addr = %bound, mtls, "destination discovery listening");
        Ok(Self { addr: bound, stop })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for DestinationServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

#[cfg(test)]
mod tests;
