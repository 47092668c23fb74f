//! [`DnsServer`]: binds UDP and TCP and serves the zone with hickory-server.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use hickory_server::Server;
use tokio::net::{TcpListener, UdpSocket};
use tracing::{debug, info, warn};

use crate::{DnsMetrics, ZoneHandle};

mod handler;
#[cfg(test)]
mod tests;

use handler::ZoneRequestHandler;

/// How many times [`DnsServer::bind`] tries to find a port free for both UDP
/// and TCP when asked for port 0.
const BIND_ATTEMPTS: usize = 8;

/// A TCP connection that sends no query for this long is closed.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Responses queued per TCP connection.
const TCP_RESPONSE_BUFFER: usize = 32;

/// Errors starting the DNS server.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// A socket could not be bound.
    #[error("cannot bind DNS {protocol} socket on {addr}: {source}")]
    Bind {
        /// `udp` or `tcp`.
        protocol: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// With port 0, no port could be bound for both UDP and TCP.
    #[error("no port free for both UDP and TCP on {addr} after {attempts} attempts: {source}")]
    NoCommonPort {
        /// The address asked for.
        addr: SocketAddr,
        /// Attempts made.
        attempts: usize,
        /// The error of the last TCP bind.
        #[source]
        source: io::Error,
    },
}

/// The authoritative DNS server for the zone held by a [`ZoneHandle`],
/// running in tokio tasks on one UDP socket and one TCP listener sharing an
/// address.
///
/// Dropping the server aborts its tasks; [`DnsServer::shutdown`] stops it
/// gracefully.
pub struct DnsServer {
    local_addr: SocketAddr,
    server: Server<ZoneRequestHandler>,
}

impl fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DnsServer")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl DnsServer {
    /// Binds UDP and TCP on the same address (port 0 allowed: both then use
    /// the port UDP got; retry a few times if TCP can't get it) and starts
    /// serving in tokio tasks.
    ///
    /// `metrics` are attached to `zone` (see [`ZoneHandle`]) so that
    /// publishing a zone updates the zone gauges.
    pub async fn bind(
        addr: SocketAddr,
        zone: ZoneHandle,
        metrics: DnsMetrics,
    ) -> Result<DnsServer, DnsError> {
        let (udp, tcp) = bind_pair(addr).await?;
        let local_addr = udp.local_addr().map_err(|source| DnsError::Bind {
            protocol: "udp",
            addr,
            source,
        })?;

        zone.attach_metrics(&metrics);
        let mut server = Server::new(ZoneRequestHandler::new(zone, metrics));
        server.register_socket(udp);
        server.register_listener(tcp, TCP_IDLE_TIMEOUT, TCP_RESPONSE_BUFFER);
        info!(%local_addr, "DNS server listening on UDP and TCP");
        Ok(DnsServer { local_addr, server })
    }

    /// The address both the UDP socket and the TCP listener are bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting queries and waits for the server tasks to finish.
    pub async fn shutdown(mut self) {
        match self.server.shutdown_gracefully().await {
            Ok(()) => info!(local_addr = %self.local_addr, "DNS server stopped"),
            Err(error) => {
                warn!(local_addr = %self.local_addr, %error, "DNS server stopped with an error")
            }
        }
    }
}

async fn bind_pair(addr: SocketAddr) -> Result<(UdpSocket, TcpListener), DnsError> {
    let bind_udp = |addr| async move {
        UdpSocket::bind(addr)
            .await
            .map_err(|source| DnsError::Bind {
                protocol: "udp",
                addr,
                source,
            })
    };
    let tcp_error = |source| DnsError::Bind {
        protocol: "tcp",
        addr,
        source,
    };

    if addr.port() != 0 {
        let udp = bind_udp(addr).await?;
        let tcp = TcpListener::bind(addr).await.map_err(tcp_error)?;
        return Ok((udp, tcp));
    }

    let mut last_error = None;
    for attempt in 1..=BIND_ATTEMPTS {
        let udp = bind_udp(addr).await?;
        let udp_addr = udp.local_addr().map_err(|source| DnsError::Bind {
            protocol: "udp",
            addr,
            source,
        })?;
        match TcpListener::bind(udp_addr).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(error) if error.kind() == io::ErrorKind::AddrInUse => {
                debug!(%udp_addr, attempt, "TCP port taken, trying another UDP port");
                last_error = Some(error);
            }
            Err(error) => return Err(tcp_error(error)),
        }
    }
    Err(DnsError::NoCommonPort {
        addr,
        attempts: BIND_ATTEMPTS,
        source: last_error.unwrap_or_else(|| io::ErrorKind::AddrInUse.into()),
    })
}
