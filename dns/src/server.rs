//! [`DnsServer`]: binds UDP and TCP and answers every query with
//! [`Responder::respond_into`](crate::Responder), in tokio tasks.
//!
//! The transport loops are written here rather than taken from
//! hickory-server's `Server`: that one decodes each message before handing
//! it over and only sends what its own response builder encodes, so the
//! precomputed answers of the fast path could not be sent from it, and its
//! task per UDP datagram plus response channel cost as much CPU as the
//! answering itself (see `crate::respond`). hickory-server still decodes
//! and answers every query the fast path does not take.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinSet;
use tokio::time::timeout;
use tracing::{debug, info, trace, warn};

use crate::metrics::TcpDrop;
use crate::{DnsMetrics, Transport, ZoneHandle};

#[cfg(test)]
mod tests;

/// How many times [`DnsServer::bind`] tries to find a port free for both UDP
/// and TCP when asked for port 0.
const BIND_ATTEMPTS: usize = 8;

/// Limits on the TCP side of a [`DnsServer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpLimits {
    /// Connections served at once; one more is closed as soon as it is
    /// accepted (and counted), as BIND's `tcp-clients` does.
    pub max_connections: usize,
    /// A connection that sends no query for this long is closed; so is one
    /// that takes this long to send a query it has started, or to take an
    /// answer (a client that sends queries and never reads would otherwise
    /// hold its connection, and its buffers, for good).
    pub timeout: Duration,
}

impl Default for TcpLimits {
    /// 1024 connections (a cluster's resolvers, CoreDNS, reuse a handful
    /// each) and 10 s.
    fn default() -> Self {
        Self {
            max_connections: 1024,
            timeout: Duration::from_secs(10),
        }
    }
}

/// Largest DNS message over UDP (and the receive buffer size).
const MAX_DATAGRAM: usize = 65_535;

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
/// UDP datagrams are answered by as many tasks as the runtime has worker
/// threads, all reading the one socket; each TCP connection gets a task
/// answering its queries in order.
///
/// Dropping the server aborts its tasks; [`DnsServer::shutdown`] does the
/// same and waits until they are gone and the sockets closed.
pub struct DnsServer {
    local_addr: SocketAddr,
    tasks: JoinSet<()>,
}

impl fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DnsServer")
            .field("local_addr", &self.local_addr)
            .field("tasks", &self.tasks.len())
            .finish()
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
        Self::bind_with(addr, zone, metrics, TcpLimits::default()).await
    }

    /// [`DnsServer::bind`] with the given TCP limits.
    pub async fn bind_with(
        addr: SocketAddr,
        zone: ZoneHandle,
        metrics: DnsMetrics,
        limits: TcpLimits,
    ) -> Result<DnsServer, DnsError> {
        let (udp, tcp) = bind_pair(addr).await?;
        let local_addr = udp.local_addr().map_err(|source| DnsError::Bind {
            protocol: "udp",
            addr,
            source,
        })?;

        zone.attach_metrics(&metrics);
        let udp = Arc::new(udp);
        let workers = tokio::runtime::Handle::current()
            .metrics()
            .num_workers()
            .max(1);
        let mut tasks = JoinSet::new();
        for _ in 0..workers {
            tasks.spawn(serve_udp(udp.clone(), zone.clone(), metrics.clone()));
        }
        tasks.spawn(serve_tcp(tcp, zone, metrics, limits));
        info!(%local_addr, udp_tasks = workers, "DNS server listening on UDP and TCP");
        Ok(DnsServer { local_addr, tasks })
    }

    /// The address both the UDP socket and the TCP listener are bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops answering, closes the sockets and TCP connections, and waits
    /// for the server tasks to be gone.
    pub async fn shutdown(mut self) {
        self.tasks.shutdown().await;
        info!(local_addr = %self.local_addr, "DNS server stopped");
    }
}

/// A socket of `ty` for `addr`'s family; an unspecified IPv6 address
/// (`[::]`) is made dual-stack, so IPv4 clients reach it too whatever the
/// node's `net.ipv6.bindv6only` says.
fn socket_for(addr: SocketAddr, ty: socket2::Type) -> io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), ty, None)?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        socket.set_only_v6(false)?;
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

fn udp_socket(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = socket_for(addr, socket2::Type::DGRAM)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

fn tcp_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = socket_for(addr, socket2::Type::STREAM)?;
    // A restart does not wait out TIME_WAIT (as tokio's own bind does).
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

async fn bind_pair(addr: SocketAddr) -> Result<(UdpSocket, TcpListener), DnsError> {
    let bind_udp = |addr| async move {
        udp_socket(addr).map_err(|source| DnsError::Bind {
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
        let tcp = tcp_listener(addr).map_err(tcp_error)?;
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
        match tcp_listener(udp_addr) {
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

/// Answers datagrams on `socket` until the task is aborted.
async fn serve_udp(socket: Arc<UdpSocket>, zone: ZoneHandle, metrics: DnsMetrics) {
    let mut query = vec![0; MAX_DATAGRAM];
    let mut response = Vec::with_capacity(MAX_DATAGRAM);
    loop {
        let (len, client) = match socket.recv_from(&mut query).await {
            Ok(received) => received,
            // As hickory-server: these mean the socket is gone.
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::NotConnected | io::ErrorKind::ConnectionAborted
                ) =>
            {
                warn!(%error, "DNS UDP socket failed; no longer answering on it");
                return;
            }
            // Others include ICMP errors for earlier responses
            // (ECONNREFUSED): nothing to do with the next datagram.
            Err(error) => {
                debug!(%error, "error receiving a DNS datagram");
                continue;
            }
        };
        if !answerable(client) {
            debug!(%client, "not answering a datagram from this address");
            continue;
        }
        let start = Instant::now();
        // The snapshot guard is dropped before the send's `.await`.
        let outcome = zone.load().respond_into(
            query.get(..len).unwrap_or_default(),
            Transport::Udp,
            &mut response,
        );
        let Some(outcome) = outcome else {
            trace!(%client, len, "datagram dropped without an answer");
            continue;
        };
        // Counted before the send: a client that has its answer sees the
        // count (a failed send is still a query answered).
        metrics.record_query(outcome.qtype, outcome.rcode, start.elapsed());
        if let Err(error) = socket.send_to(&response, client).await {
            debug!(%client, %error, "cannot send a DNS response");
            continue;
        }
    }
}

/// Accepts TCP connections until the task is aborted; aborting it aborts
/// the connections too. Past [`TcpLimits::max_connections`] a connection
/// is closed at once: the client learns now, not after a timeout, and
/// tries another server or UDP.
async fn serve_tcp(
    listener: TcpListener,
    zone: ZoneHandle,
    metrics: DnsMetrics,
    limits: TcpLimits,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut connections = JoinSet::new();
    loop {
        let accepted = listener.accept().await;
        // Reap finished connections.
        while connections.try_join_next().is_some() {}
        let (stream, client) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: give it a moment.
                warn!(%error, "cannot accept a DNS connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if !answerable(client) {
            continue;
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics.record_tcp_drop(TcpDrop::Limit);
            debug!(%client, limit = limits.max_connections, "DNS connection refused: too many open");
            continue;
        };
        let (zone, metrics) = (zone.clone(), metrics.clone());
        connections.spawn(async move {
            serve_connection(stream, client, zone, metrics, limits.timeout).await;
            drop(slot);
        });
    }
}

/// Answers the queries of one TCP connection (RFC 7766: two-octet length,
/// then the message), in order, until the client closes it, breaks the
/// framing, stays idle for `timeout` or takes longer than that to take an
/// answer.
async fn serve_connection(
    stream: TcpStream,
    client: SocketAddr,
    zone: ZoneHandle,
    metrics: DnsMetrics,
    timeout_after: Duration,
) {
    let (reader, mut writer) = stream.into_split();
    let mut reader = BufReader::new(reader);
    let mut query = Vec::new();
    let mut response = Vec::new();
    let mut frame = Vec::new();
    loop {
        let read = timeout(timeout_after, async {
            let len = reader.read_u16().await?;
            query.resize(usize::from(len), 0);
            reader.read_exact(&mut query).await
        })
        .await;
        match read {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                trace!(%client, %error, "DNS connection closed");
                return;
            }
            Err(_) => {
                debug!(%client, "idle DNS connection closed");
                return;
            }
        }

        let start = Instant::now();
        let outcome = zone
            .load()
            .respond_into(&query, Transport::Tcp, &mut response);
        let Some(outcome) = outcome else {
            trace!(%client, "message dropped without an answer");
            continue;
        };
        // Transport::Tcp keeps responses within 65535 octets.
        let Ok(len) = u16::try_from(response.len()) else {
            warn!(%client, len = response.len(), "DNS response too long for TCP");
            return;
        };
        // One write: a separate two-octet write could wait for Nagle.
        frame.clear();
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(&response);
        metrics.record_query(outcome.qtype, outcome.rcode, start.elapsed());
        match timeout(timeout_after, writer.write_all(&frame)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                debug!(%client, %error, "cannot send a DNS response");
                return;
            }
            Err(_) => {
                metrics.record_tcp_drop(TcpDrop::SlowReader);
                debug!(%client, "DNS connection closed: the client does not take its answers");
                return;
            }
        }
    }
}

/// Whether a response can go to `client` (as hickory-server checks): not
/// port 0, not an unspecified or broadcast address.
fn answerable(client: SocketAddr) -> bool {
    client.port() != 0
        && match client.ip() {
            IpAddr::V4(ip) => !ip.is_unspecified() && !ip.is_broadcast(),
            IpAddr::V6(ip) => !ip.is_unspecified(),
        }
}
