//! Proxy-to-proxy connections: mutual TLS 1.3 with SPIFFE identities, then
//! a [`crate::transport`] header naming the target port and
//! protocol, then either one multiplexed HTTP/2 connection (every HTTP
//! request to that peer and port, HTTP/1 ones included) or the bytes of one
//! opaque TCP connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use rustls::pki_types::ServerName;
use rustls::RootCertStore;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::http::Body;
use crate::http2::Sender;
use crate::identity::{CertStore, ExpectedPeerVerifier, RefusalSink, SpiffeId};
use crate::transport::{self, ProtocolHint};

/// Write buffer between an HTTP/2 connection and its TLS stream.
pub const WRITE_BUFFER: usize = 16 * 1024;

/// Largest response head taken from a peer proxy (what it accepts too).
const MAX_HEADER: u32 = crate::sidecar::MAX_HEADER_BYTES as u32;

/// TLS client configurations kept (one per peer identity).
const MAX_CLIENT_CONFIGS: usize = 4096;

/// ALPN of proxy-to-proxy connections.
pub const MESH_ALPN: &[u8] = b"strait-proxy/1";

/// Why a mesh request or connection failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MeshError {
    /// TCP connect or TLS handshake failed or timed out.
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// The peer.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP/2 connection failed.
    #[error("http/2 to {addr}: {source}")]
    Http {
        /// The peer.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: h2::Error,
    },
}

type PoolKey = (SocketAddr, u16, SpiffeId);

/// The client side of the mesh: dials peer proxies, pools their HTTP/2
/// connections.
pub struct MeshClient {
    identity: Arc<CertStore>,
    roots: Arc<RootCertStore>,
    sink: RefusalSink,
    connect_timeout: Duration,
    configs: Mutex<HashMap<SpiffeId, Arc<rustls::ClientConfig>>>,
    pool: crate::http2::Pool<PoolKey>,
}

impl std::fmt::Debug for MeshClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshClient")
            .field("identity", self.identity.id())
            .finish_non_exhaustive()
    }
}

impl MeshClient {
    /// A client presenting `identity`, trusting `roots`, reporting refused
    /// peer certificates to `sink`.
    pub fn new(
        identity: Arc<CertStore>,
        roots: Arc<RootCertStore>,
        sink: RefusalSink,
        connect_timeout: Duration,
    ) -> Self {
        Self {
            identity,
            roots,
            sink,
            connect_timeout,
            configs: Mutex::default(),
            pool: crate::http2::Pool::default(),
        }
    }

    fn config(&self, peer: &SpiffeId) -> Result<Arc<rustls::ClientConfig>, std::io::Error> {
        let mut configs = self.configs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = configs.get(peer) {
            return Ok(c.clone());
        }
        let c = Arc::new(
            crate::tls::client_config(
                ExpectedPeerVerifier::new(self.roots.clone(), peer.clone(), self.sink.clone()),
                self.identity.clone(),
                &[MESH_ALPN],
            )
            .map_err(std::io::Error::other)?,
        );
        // One per peer identity (service account) ever dialed: bounded
        // by starting afresh past a limit no real mesh reaches.
        if configs.len() >= MAX_CLIENT_CONFIGS {
            configs.clear();
        }
        configs.insert(peer.clone(), c.clone());
        Ok(c)
    }

    /// Dials `addr` (a peer proxy's inbound port), completes mutual TLS with
    /// `peer`, and sends the transport header for `port`/`protocol`.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        peer: &SpiffeId,
        port: u16,
        protocol: ProtocolHint,
    ) -> Result<TlsStream<TcpStream>, MeshError> {
        let err = |source| MeshError::Connect { addr, source };
        let config = self.config(peer).map_err(err)?;
        let header = transport::encode(&transport::to_port(
            port,
            protocol,
            self.identity.id().as_str(),
        ))
        .map_err(|e| err(std::io::Error::other(e)))?;
        let dial = async {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from("strait-proxy").map_err(std::io::Error::other)?;
            let mut tls = TlsConnector::from(config).connect(name, tcp).await?;
            tls.write_all(&header).await?;
            tls.flush().await?;
            Ok::<_, std::io::Error>(tls)
        };
        match tokio::time::timeout(self.connect_timeout, dial).await {
            Ok(r) => r.map_err(err),
            Err(_) => Err(err(std::io::ErrorKind::TimedOut.into())),
        }
    }

    async fn sender(
        &self,
        addr: SocketAddr,
        peer: &SpiffeId,
        port: u16,
    ) -> Result<Sender, MeshError> {
        let key = (addr, port, peer.clone());
        // Dialing (TCP, TLS, HTTP/2 handshake) is rare and its state large:
        // boxed, so the per-request future stays small.
        self.pool
            .get(&key, || Box::pin(self.dial(addr, peer, port)))
            .await
    }

    /// Opens a new HTTP/2 connection to a peer proxy.
    async fn dial(
        &self,
        addr: SocketAddr,
        peer: &SpiffeId,
        port: u16,
    ) -> Result<Sender, MeshError> {
        let tls = self.connect(addr, peer, port, ProtocolHint::Http2).await?;
        // Frames are written into a buffer and flushed together: one TLS
        // record and one send for a batch, not one per frame.
        let io = tokio::io::BufWriter::with_capacity(WRITE_BUFFER, tls);
        let keepalive = crate::http2::Keepalive::Ping;
        let sender = crate::http2::handshake(io, MAX_HEADER, keepalive, addr.to_string())
            .await
            .map_err(|source| MeshError::Http { addr, source })?;
        Ok(sender)
    }

    /// Sends `req` (already prepared with [`crate::http::to_mesh`]) to the
    /// peer proxy at `addr` for its local `port`.
    pub async fn send(
        &self,
        addr: SocketAddr,
        peer: &SpiffeId,
        port: u16,
        req: Request<Body>,
    ) -> Result<Response<Body>, MeshError> {
        let mut sender = self.sender(addr, peer, port).await?;
        crate::http2::send(&mut sender, req)
            .await
            .map_err(|source| MeshError::Http { addr, source })
    }
}
