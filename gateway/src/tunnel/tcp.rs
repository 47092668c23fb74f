//! The TLS-over-TCP transport, for networks that block UDP: the same mTLS
//! identities and verifiers as QUIC, the same stream header, and one TCP
//! connection per tunnel stream (as Linkerd's gateway carries each proxied
//! connection), on the same port number as the QUIC endpoint (4143/tcp).
//! The peering watch is one more such connection, held open.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::io::{PeerInfo, TlsIo, TunnelIo};

/// How long a TCP connect plus TLS handshake may take (per address: a
/// stream's whole open is bounded by the caller).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// TCP keepalive on tunnel connections: a peer gone silent is found out in
/// about 25 s instead of the kernel's two hours.
pub fn keepalive(tcp: &TcpStream) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(5))
        .with_retries(3);
    let _ = socket2::SockRef::from(tcp).set_tcp_keepalive(&ka);
}

/// Makes, for each stream a dialer opens, the future that resolves when the
/// link it was opened under is changed or removed (the stream ends then).
pub type Revocations =
    Arc<dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Send + Sync>;

/// Opens tunnel streams to one peer over TLS on TCP.
pub struct TcpDialer {
    revocations: Option<Revocations>,
    addresses: Vec<String>,
    connector: TlsConnector,
    peer: PeerInfo,
    /// The address that answered last: tried first, so a stream does not
    /// pay a DNS lookup.
    last: Mutex<Option<SocketAddr>>,
    /// The last TCP connect time (SYN to SYN-ACK: one round trip).
    rtt: Mutex<Option<Duration>>,
}

impl std::fmt::Debug for TcpDialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpDialer")
            .field("addresses", &self.addresses)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl TcpDialer {
    /// A dialer for `addresses` (`host:port`), verifying the peer with
    /// `client_tls` (which pins the expected identity).
    pub fn new(
        addresses: Vec<String>,
        client_tls: Arc<rustls::ClientConfig>,
        peer: PeerInfo,
    ) -> Self {
        Self {
            revocations: None,
            addresses,
            connector: TlsConnector::from(client_tls),
            peer,
            last: Mutex::new(None),
            rtt: Mutex::new(None),
        }
    }

    /// Ends every stream this dialer opens when `revocations` says so.
    pub fn revoked_by(mut self, revocations: Revocations) -> Self {
        self.revocations = Some(revocations);
        self
    }

    /// The round-trip time the last connection's TCP handshake took.
    pub fn rtt(&self) -> Option<Duration> {
        *self.rtt.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn handshake(&self, addr: SocketAddr) -> std::io::Result<TunnelIo> {
        let connect = async {
            let started = std::time::Instant::now();
            let tcp = TcpStream::connect(addr).await?;
            *self.rtt.lock().unwrap_or_else(|e| e.into_inner()) = Some(started.elapsed());
            let _ = tcp.set_nodelay(true);
            keepalive(&tcp);
            // A constant name: the peer is authenticated by its SPIFFE ID.
            let name = ServerName::try_from("strait-gateway")
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            self.connector.connect(name, tcp).await
        };
        let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, connect)
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
            })??;
        Ok(TunnelIo::Tls(Box::new(TlsIo {
            stream: tokio_rustls::TlsStream::Client(stream),
            peer: self.peer.clone(),
            revoked: self.revocations.as_ref().map(|r| r()),
            aborted: false,
            slot: None,
        })))
    }

    /// Opens one stream: a connection to the first address that answers
    /// (the last good one first), the handshake, then `header`.
    pub async fn open(&self, header: &[u8]) -> std::io::Result<TunnelIo> {
        let last = *self.last.lock().unwrap_or_else(|e| e.into_inner());
        let mut errors = Vec::new();
        let mut candidates: Vec<SocketAddr> = last.into_iter().collect();
        let mut resolved = false;
        let mut i = 0;
        loop {
            if i == candidates.len() {
                if resolved {
                    break;
                }
                resolved = true;
                for a in &self.addresses {
                    match tokio::net::lookup_host(a.as_str()).await {
                        Ok(r) => candidates.extend(r.filter(|sa| Some(*sa) != last)),
                        Err(e) => errors.push(format!("{a}: resolve: {e}")),
                    }
                }
                if i == candidates.len() {
                    break;
                }
            }
            let addr = candidates[i];
            i += 1;
            match self.handshake(addr).await {
                Ok(mut io) => {
                    io.write_all(header).await?;
                    *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(addr);
                    return Ok(io);
                }
                Err(e) => {
                    // Never try a dead address first again.
                    let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
                    if *last == Some(addr) {
                        *last = None;
                    }
                    errors.push(format!("{addr}: {e}"));
                }
            }
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            if errors.is_empty() {
                "no addresses".to_string()
            } else {
                errors.join("; ")
            },
        ))
    }
}
