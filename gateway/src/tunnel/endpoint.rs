//! The QUIC endpoint of a gateway: one UDP socket that both accepts linked
//! peers and dials them, with flow-control windows sized for a long fat
//! pipe (quinn's defaults cap a stream near 100 Mbit/s at 100 ms RTT).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};

/// The largest UDP payload the tunnel uses. quinn sends up to 10
/// datagrams in one GSO `sendmsg`, and the kernel refuses a send whose IPv4
/// packet would exceed 65535 bytes (65507 of UDP payload); quinn then drops
/// the whole batch as if it were an MTU probe. So datagrams stay below
/// 6550 bytes, with a margin. This still lets jumbo-frame networks (and
/// loopback) carry 4.5 times the payload of a 1500-byte path.
pub const MAX_UDP_PAYLOAD: u16 = 6500;

/// Tunnel transport settings, with documented defaults.
#[derive(Clone, Debug)]
pub struct TunnelConfig {
    /// A silent connection is dropped after this long (default 15 s).
    pub idle_timeout: Duration,
    /// Keepalive interval (default 4 s); must be under `idle_timeout`.
    pub keep_alive: Duration,
    /// Receive window per stream (default 16 MiB: 1 Gbit/s at 130 ms).
    pub stream_window: u32,
    /// Receive window per connection (default 64 MiB).
    pub connection_window: u32,
    /// Send buffer per connection (default 64 MiB).
    pub send_window: u64,
    /// UDP socket send and receive buffer request (default 8 MiB).
    pub udp_buffer: usize,
    /// Largest UDP payload path-MTU discovery probes for (default and
    /// maximum [`MAX_UDP_PAYLOAD`]; a 1500-byte path settles at 1452 by
    /// itself).
    pub max_udp_payload: u16,
}

impl Default for TunnelConfig {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(15),
            keep_alive: Duration::from_secs(4),
            stream_window: 16 << 20,
            connection_window: 64 << 20,
            send_window: 64 << 20,
            udp_buffer: 8 << 20,
            max_udp_payload: MAX_UDP_PAYLOAD,
        }
    }
}

/// Why the endpoint could not start or dial.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TunnelError {
    /// Invalid transport settings.
    #[error("invalid tunnel config: {0}")]
    Config(String),
    /// The socket could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The TLS config is unusable for QUIC.
    #[error("TLS config unusable for QUIC: {0}")]
    Tls(String),
    /// Dialing failed before the handshake.
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The handshake or connection failed.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
}

impl TunnelConfig {
    fn transport(&self, accepts_streams: bool) -> Result<Arc<TransportConfig>, TunnelError> {
        if self.keep_alive >= self.idle_timeout {
            return Err(TunnelError::Config(
                "keep_alive must be shorter than idle_timeout".into(),
            ));
        }
        let mut t = TransportConfig::default();
        t.max_idle_timeout(Some(
            IdleTimeout::try_from(self.idle_timeout)
                .map_err(|e| TunnelError::Config(e.to_string()))?,
        ));
        t.keep_alive_interval(Some(self.keep_alive));
        t.stream_receive_window(VarInt::from_u32(self.stream_window));
        t.receive_window(VarInt::from_u32(self.connection_window));
        t.send_window(self.send_window);
        // Only the accepting side serves streams; a dialed connection lets
        // the peer open none (it could only pin our receive window).
        t.max_concurrent_bidi_streams(VarInt::from_u32(if accepts_streams { 1024 } else { 0 }));
        t.max_concurrent_uni_streams(VarInt::from_u32(0));
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(self.max_udp_payload.clamp(1200, MAX_UDP_PAYLOAD));
        t.mtu_discovery_config(Some(mtu));
        Ok(Arc::new(t))
    }
}

/// The gateway's QUIC endpoint.
#[derive(Clone, Debug)]
pub struct TunnelEndpoint {
    endpoint: quinn::Endpoint,
    dial_transport: Arc<TransportConfig>,
}

impl TunnelEndpoint {
    /// Binds `addr` (UDP) and accepts peers with `server_tls`.
    pub fn bind(
        addr: SocketAddr,
        server_tls: rustls::ServerConfig,
        config: &TunnelConfig,
    ) -> Result<Self, TunnelError> {
        let transport = config.transport(true)?;
        let dial_transport = config.transport(false)?;
        let crypto =
            QuicServerConfig::try_from(server_tls).map_err(|e| TunnelError::Tls(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(transport.clone());
        let socket = udp_socket(addr, config.udp_buffer)
            .map_err(|source| TunnelError::Bind { addr, source })?;
        let runtime = quinn::default_runtime()
            .ok_or_else(|| TunnelError::Config("no async runtime".into()))?;
        let mut endpoint_config = quinn::EndpointConfig::default();
        endpoint_config
            .max_udp_payload_size(config.max_udp_payload.clamp(1200, MAX_UDP_PAYLOAD))
            .map_err(|e| TunnelError::Config(e.to_string()))?;
        let endpoint = quinn::Endpoint::new(endpoint_config, Some(server), socket, runtime)
            .map_err(|source| TunnelError::Bind { addr, source })?;
        Ok(Self {
            endpoint,
            dial_transport,
        })
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Dials `addr` with `client_tls` (which pins the expected peer).
    pub async fn connect(
        &self,
        addr: SocketAddr,
        client_tls: rustls::ClientConfig,
    ) -> Result<quinn::Connection, TunnelError> {
        let crypto =
            QuicClientConfig::try_from(client_tls).map_err(|e| TunnelError::Tls(e.to_string()))?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(self.dial_transport.clone());
        // The server name is a constant: the destination travels inside the
        // tunnel, and the peer is authenticated by its SPIFFE ID.
        let conn = self
            .endpoint
            .connect_with(client, addr, "strait-gateway")?
            .await?;
        Ok(conn)
    }

    /// The next incoming connection attempt, or `None` once closed.
    pub async fn accept(&self) -> Option<quinn::Incoming> {
        self.endpoint.accept().await
    }

    /// Closes every connection and stops accepting.
    pub fn close(&self) {
        self.endpoint.close(VarInt::from_u32(0), b"shutdown");
    }

    /// Waits until closed connections have told their peers, or `limit`.
    pub async fn wait_idle(&self, limit: std::time::Duration) {
        let _ = tokio::time::timeout(limit, self.endpoint.wait_idle()).await;
    }
}

fn udp_socket(addr: SocketAddr, buffer: usize) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Accept IPv4-mapped peers too when bound to [::].
        let _ = socket.set_only_v6(false);
    }
    // Best effort: the kernel caps these at net.core.[rw]mem_max.
    let _ = socket.set_recv_buffer_size(buffer);
    let _ = socket.set_send_buffer_size(buffer);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}
