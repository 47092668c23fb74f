//! The accepting side of the tunnel: admit linked peers (their identity was
//! checked in the handshake), read each stream's header, authorize the
//! target against this cluster's exports, and connect it to an endpoint;
//! peering streams go to the catalog service.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use strait_proto::tunnel::v1::{StreamHeader, StreamKind};
use strait_proxy::identity::{identity_of, SpiffeId};
use strait_proxy::transport::ProtocolHint;

use crate::catalog::{Protocol, ServiceKey};
use crate::gateway::Shared;
use crate::tunnel::io::{relay, reset, Local, PeerInfo, TlsIo};
use crate::tunnel::{frame, QuicIo, Refusal, TunnelIo};

/// How long a peer has to send a stream header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one endpoint connect may take (with the TLS handshake, to a
/// meshed endpoint).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Endpoints tried per stream before giving up.
const CONNECT_ATTEMPTS: usize = 3;

/// Accepts tunnel connections until the endpoint closes.
pub async fn run(shared: Arc<Shared>) {
    while let Some(incoming) = shared.endpoint.accept().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => serve_connection(conn, shared).await,
                Err(error) => tracing::info!(%remote, %error, "tunnel handshake failed"),
            }
        });
    }
}

/// The linked peer a verified certificate chain belongs to, if any.
fn linked_peer(chain: &[CertificateDer<'_>], shared: &Shared) -> Option<PeerInfo> {
    let id = identity_of(chain)?;
    let name = shared
        .links_by_identity
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(&id)?
        .clone();
    Some(PeerInfo {
        name,
        identity: id.to_string(),
    })
}

fn identify(conn: &quinn::Connection, shared: &Shared) -> Option<PeerInfo> {
    let chain = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    linked_peer(&chain, shared)
}

async fn serve_connection(conn: quinn::Connection, shared: Arc<Shared>) {
    let Some(peer) = identify(&conn, &shared) else {
        // The handshake verifier admits only linked identities; this is a
        // defence in depth.
        conn.close(quinn::VarInt::from_u32(1), b"unknown peer");
        return;
    };
    tracing::info!(peer = %peer.name, remote = %conn.remote_address(), "peer connected");
    // Alongside any others of the peer's (its other replicas).
    let _accepted = shared.accepted.add(&peer.name, &conn);
    // One catalog watch at a time on the connection.
    let watch = Arc::new(tokio::sync::Semaphore::new(1));
    let Some(generation) = crate::links::generation(&shared, &peer.name) else {
        conn.close(quinn::VarInt::from_u32(1), b"unknown peer");
        return;
    };
    loop {
        let accepted = tokio::select! {
            a = conn.accept_bi() => a,
            () = crate::links::revoked(&shared, &peer.name, generation) => {
                tracing::info!(peer = %peer.name, "link changed; closing its tunnel");
                conn.close(quinn::VarInt::from_u32(0), b"link changed");
                return;
            }
        };
        match accepted {
            Ok((send, recv)) => {
                let io = TunnelIo::Quic(QuicIo::new(send, recv, peer.clone()));
                tokio::spawn(handle_stream(io, shared.clone(), watch.clone()));
            }
            Err(error) => {
                tracing::info!(peer = %peer.name, %error, "peer disconnected");
                return;
            }
        }
    }
}

/// Refuses a stream for `why`, counted as such (see [`refuse_as`]).
fn refuse(io: &mut TunnelIo, shared: &Shared, why: Refusal) {
    refuse_as(io, shared, why, why.as_str());
}

/// Refuses a stream: counts it under `result` first, then resets it, so
/// that a peer who has seen the reset also sees the count.
fn refuse_as(io: &mut TunnelIo, shared: &Shared, why: Refusal, result: &'static str) {
    shared
        .metrics
        .stream_done(&io.peer().name, "inbound", result);
    reset(io, why);
}

/// TLS handshakes over TCP in progress at once, at most: beyond, new
/// connections are closed at once (unauthenticated sockets cannot pile up).
const MAX_TCP_HANDSHAKES: usize = 256;

/// Accepts TLS-over-TCP tunnel connections (one stream each) until the
/// listener fails. Each lives only as long as the link it was accepted
/// under ([`crate::links::revoked`]).
pub async fn run_tcp(
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_TCP_HANDSHAKES));
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(c) => c,
            Err(error) => {
                tracing::warn!(%error, "tunnel TCP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            tracing::warn!(%remote, "too many tunnel handshakes in progress; closing");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        crate::tunnel::tcp::keepalive(&tcp);
        let (shared, acceptor) = (shared.clone(), acceptor.clone());
        tokio::spawn(async move {
            let handshake =
                tokio::time::timeout(crate::tunnel::tcp::HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                    .await;
            drop(permit);
            let stream = match handshake {
                Ok(Ok(s)) => s,
                Ok(Err(error)) => {
                    tracing::info!(%remote, %error, "tunnel TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::info!(%remote, "tunnel TLS handshake timed out");
                    return;
                }
            };
            let peer = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| linked_peer(chain, &shared));
            // The verifier admits only linked identities; defence in depth.
            let Some(peer) = peer else { return };
            let Some(generation) = crate::links::generation(&shared, &peer.name) else {
                return;
            };
            let revoked = crate::links::revocation(&shared, peer.name.clone(), generation);
            let io = TunnelIo::Tls(Box::new(TlsIo {
                stream: tokio_rustls::TlsStream::Server(stream),
                peer,
                revoked: Some(Box::pin(revoked)),
                aborted: false,
                slot: None,
            }));
            handle_stream(io, shared, Arc::new(tokio::sync::Semaphore::new(1))).await;
        });
    }
}

async fn handle_stream(mut io: TunnelIo, shared: Arc<Shared>, watch: Arc<tokio::sync::Semaphore>) {
    let header = match tokio::time::timeout(HEADER_TIMEOUT, frame::read(&mut io)).await {
        Ok(Ok(h)) => h,
        Ok(Err(error)) => {
            tracing::info!(peer = %io.peer().name, %error, "refusing stream");
            refuse_as(&mut io, &shared, Refusal::BadHeader, error.reason());
            return;
        }
        Err(_) => {
            refuse_as(&mut io, &shared, Refusal::BadHeader, "header_timeout");
            return;
        }
    };
    match StreamKind::try_from(header.kind) {
        Ok(StreamKind::Peering) => {
            // One catalog watch at a time per QUIC connection is all a
            // peer's gateway needs (it watches again on the same
            // connection once a watch ends); over TCP each watch is a
            // connection of its own, so a peer may hold a couple at once
            // (one being replaced), no more.
            let held = match &mut io {
                TunnelIo::Tls(t) => shared
                    .tcp_watches
                    .acquire(&t.peer.name)
                    .map(|slot| t.slot = Some(slot)),
                TunnelIo::Quic(q) => watch
                    .try_acquire_owned()
                    .ok()
                    .map(|permit| q.watch = Some(permit)),
            };
            if held.is_none() {
                refuse(&mut io, &shared, Refusal::Busy);
                return;
            }
            if shared.peering_tx.send(io).await.is_err() {
                tracing::warn!("peering service gone");
            }
        }
        Ok(StreamKind::Tcp) => {
            // A stream to an endpoint holds one of `maxConnections` slots
            // while it is relayed. Past them it is refused at once: left
            // waiting unread, its data would hold the connection's flow
            // control credit, and with it the peer's other streams.
            let Some(slot) = shared.stream_limit.try_slot() else {
                refuse(&mut io, &shared, Refusal::Busy);
                return;
            };
            proxy(io, header, shared).await;
            drop(slot);
        }
        // (The header's decoding refuses every other kind.)
        Ok(StreamKind::Unspecified) | Err(_) => {
            refuse_as(&mut io, &shared, Refusal::BadHeader, "bad_header");
        }
    }
}

/// An endpoint to connect to: its address and, when it is meshed, its
/// proxy's identity.
type Target = (SocketAddr, Option<SpiffeId>);

/// Connects to one of `targets`: chosen by the shared P2C peak-EWMA
/// balancer (cost: connect latency and open connections), trying another
/// on failure, up to [`CONNECT_ATTEMPTS`]. A meshed endpoint is reached
/// through its sidecar: mutual TLS to the proxy's inbound port, the
/// gateway presenting its own identity and checking the proxy's, the
/// endpoint's port in the transport header with `hint` (unknown: the
/// proxy detects the protocol, so it counts HTTP requests as it does any
/// other client's; opaque: it forwards the bytes at once). Returns the
/// connection and the endpoint to release when it closes.
async fn connect(
    key: &(ServiceKey, u16),
    targets: &[Target],
    hint: ProtocolHint,
    shared: &Shared,
) -> Option<(Local, SocketAddr)> {
    let addrs: Vec<SocketAddr> = targets.iter().map(|t| t.0).collect();
    let mut tried = Vec::new();
    for _ in 0..targets.len().min(CONNECT_ATTEMPTS) {
        let target = shared.balancers.pick(key, &addrs, &tried)?;
        let identity = targets
            .iter()
            .find(|t| t.0 == target)
            .and_then(|t| t.1.as_ref());
        let started = std::time::Instant::now();
        let (connected, tls) = match identity {
            Some(id) => {
                // The mesh client keeps to CONNECT_TIMEOUT itself (TCP and
                // TLS handshake together).
                let proxy = SocketAddr::new(target.ip(), shared.proxy_inbound_port);
                let r = match shared.mesh.connect(proxy, id, target.port(), hint).await {
                    Ok(tls) => Some(Ok(Local::Mesh(Box::new(tls)))),
                    Err(strait_proxy::mesh::MeshError::Connect { source, .. })
                        if source.kind() == std::io::ErrorKind::TimedOut =>
                    {
                        None
                    }
                    Err(e) => Some(Err(std::io::Error::other(e))),
                };
                (r, "true")
            }
            None => {
                let dial = tokio::net::TcpStream::connect(target);
                let r = match tokio::time::timeout(CONNECT_TIMEOUT, dial).await {
                    Ok(r) => Some(r.map(|s| {
                        let _ = s.set_nodelay(true);
                        Local::Tcp(s)
                    })),
                    Err(_) => None,
                };
                (r, "false")
            }
        };
        let result = match connected {
            Some(Ok(local)) => {
                shared.balancers.connected(key, target, started.elapsed());
                shared.metrics.endpoint_connect(tls, "ok");
                return Some((local, target));
            }
            Some(Err(error)) => {
                tracing::info!(%target, tls, %error, "endpoint connect failed");
                "error"
            }
            None => {
                tracing::info!(%target, tls, "endpoint connect timed out");
                "timeout"
            }
        };
        shared.metrics.endpoint_connect(tls, result);
        shared.balancers.failed(key, target);
        tried.push(target);
    }
    None
}

async fn proxy(mut io: TunnelIo, header: StreamHeader, shared: Arc<Shared>) {
    let key = ServiceKey::new(&header.namespace, &header.service);
    let peer = io.peer().name.clone();
    let targets: Result<(Vec<Target>, ProtocolHint), Refusal> = {
        let state = shared.local.borrow();
        match state.exported(&key) {
            None => Err(Refusal::NotExported),
            Some(svc) => match svc
                .ports
                .iter()
                .find(|p| u32::from(p.port) == header.port && p.protocol == Protocol::Tcp)
            {
                None => Err(Refusal::NotExported),
                Some(port) => {
                    let t: Vec<Target> = svc
                        .endpoints
                        .iter()
                        .filter(|e| e.ready)
                        .map(|e| (e.target(port), e.identity.clone()))
                        .collect();
                    // A port its Service calls opaque (or TLS) is not
                    // worth a detection (a server-speaks-first protocol
                    // would wait it out); anything else is detected by
                    // the endpoint's proxy.
                    let hint = match crate::destination::protocol_hint(port) {
                        ProtocolHint::Opaque => ProtocolHint::Opaque,
                        _ => ProtocolHint::Unknown,
                    };
                    if t.is_empty() {
                        Err(Refusal::NoEndpoints)
                    } else {
                        Ok((t, hint))
                    }
                }
            },
        }
    };
    let (targets, hint) = match targets {
        Ok(t) => t,
        Err(why) => {
            tracing::info!(%peer, service = %key, port = header.port, reason = why.as_str(), "refusing stream");
            refuse(&mut io, &shared, why);
            return;
        }
    };
    let balance_key = (key.clone(), header.port as u16);
    let Some((mut local, endpoint)) = connect(&balance_key, &targets, hint, &shared).await else {
        refuse(&mut io, &shared, Refusal::ConnectFailed);
        return;
    };
    relay(&mut local, &mut io, &shared.metrics, "inbound").await;
    shared.balancers.release(&balance_key, endpoint);
}
