//! Listening sockets, bound the same way everywhere.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Pending connections a listener queues (the kernel caps it at
/// `net.core.somaxconn`): a burst of new connections, such as a client's
/// pool opening at once, waits instead of being refused.
pub const LISTEN_BACKLOG: u32 = 1024;

/// A port number as URIs (RFC 3986: `port = *DIGIT`) and Kubernetes write
/// it: 1 to 65535 in decimal digits (at most five) and nothing else.
/// (`u16::from_str` also takes a leading `+`, a spelling no URI has.)
pub fn port_number(text: &str) -> Option<u16> {
    if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok().filter(|&p| p != 0)
}

/// Whether `authority` is `<host>:<port>` with a host and a
/// [`port_number`].
pub fn has_host_and_port(authority: &str) -> bool {
    authority
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && port_number(p).is_some())
}

/// Binds a TCP listener on `addr` with `SO_REUSEADDR` (a restart does not
/// wait out `TIME_WAIT`). An unspecified IPv6 address (`[::]`) is
/// explicitly dual-stack, so IPv4 connections reach it too whatever the
/// node's `net.ipv6.bindv6only` says.
pub fn bind_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        socket2::SockRef::from(&socket).set_only_v6(false)?;
    }
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Where to connect: an address, and another to try when nothing listens
/// there (a refused connection reaches no one, so trying again is
/// harmless). The inbound side gives a mesh connection the pod's address
/// of the other family: the client's proxy picked the endpoint's family,
/// not the application.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    /// The address tried first.
    pub addr: SocketAddr,
    /// Tried when `addr` refuses the connection.
    pub fallback: Option<SocketAddr>,
}

impl Target {
    /// Connects to `addr`, or to `fallback` if `addr` refuses, all
    /// `within` a time (else `TimedOut`).
    pub async fn connect(&self, within: Duration) -> std::io::Result<TcpStream> {
        let connect = async {
            match (TcpStream::connect(self.addr).await, self.fallback) {
                (Err(e), Some(fallback)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    tracing::debug!(addr = %self.addr, %fallback, "refused: trying the fallback");
                    TcpStream::connect(fallback).await
                }
                (connected, _) => connected,
            }
        };
        timed(within, connect).await
    }
}

/// A limit on what is served at once (connections, tunnel streams),
/// counted in slots that several listeners may share. Each time it is
/// reached is passed to [`Limit::on_limit`] and logged, at most every 10 s.
pub struct Limit {
    slots: Arc<Semaphore>,
    name: &'static str,
    on_limit: Option<Box<dyn Fn() + Send + Sync>>,
    /// When the last pause at the limit was logged.
    warned: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limit")
            .field("free", &self.slots.available_permits())
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// How often a listener held at its limit logs so (each pause is passed
/// to [`Limit::on_limit`]).
const LIMIT_WARNING_EVERY: Duration = Duration::from_secs(10);

impl Limit {
    /// A limit of `slots`, which others may share; `name` is for logs.
    pub fn new(slots: Arc<Semaphore>, name: &'static str) -> Self {
        Self {
            slots,
            name,
            on_limit: None,
            warned: Mutex::new(None),
        }
    }

    /// Calls `counted` each time the limit is reached (something waits or
    /// is refused).
    pub fn on_limit(mut self, counted: impl Fn() + Send + Sync + 'static) -> Self {
        self.on_limit = Some(Box::new(counted));
        self
    }

    /// Waits until a slot is free, without taking it (a listener waiting
    /// for a connection then holds none that others sharing the slots
    /// could use).
    async fn free(&self) {
        if self.slots.available_permits() == 0 {
            self.paused("new connections wait in the listen backlog");
            // Never closed.
            let _ = self.slots.acquire().await;
        }
    }

    /// A slot, at once if one is free, else when one is given back; held
    /// until dropped. `None` only if the slots were closed (never done).
    async fn slot(&self) -> Option<OwnedSemaphorePermit> {
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            return Some(slot);
        }
        self.paused("one accepted waits for a slot");
        self.slots.clone().acquire_owned().await.ok()
    }

    /// A slot if one is free now; else `None`, counted and logged as the
    /// limit reached (the caller refuses what wanted it).
    pub fn try_slot(&self) -> Option<OwnedSemaphorePermit> {
        let slot = self.slots.clone().try_acquire_owned().ok();
        if slot.is_none() {
            self.paused("one refused");
        }
        slot
    }

    /// Counts a pause at the limit, and logs it unless one was lately.
    fn paused(&self, why: &str) {
        if let Some(counted) = &self.on_limit {
            counted();
        }
        let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
        if warned.is_none_or(|at| at.elapsed() >= LIMIT_WARNING_EVERY) {
            *warned = Some(Instant::now());
            tracing::warn!(limit = self.name, "connection limit reached: {why}");
        }
    }
}

/// A listener's connections, at most so many being served at once
/// (counted with the other listeners sharing its slots, if any), and
/// optionally at most so many from one address.
#[derive(Debug)]
pub struct LimitedAccept {
    listener: TcpListener,
    limit: Limit,
    per_source: Option<(usize, Sources)>,
}

/// Connections being served, by client address.
type Sources = Arc<Mutex<crate::FastMap<IpAddr, usize>>>;

/// What an accepted connection holds while it is served: its share of
/// the listener's limits, given back when dropped.
#[derive(Debug)]
pub struct Slot {
    _slot: OwnedSemaphorePermit,
    source: Option<(IpAddr, Sources)>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some((ip, sources)) = self.source.take() {
            let mut sources = sources.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = sources.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    sources.remove(&ip);
                }
            }
        }
    }
}

impl LimitedAccept {
    /// Accepts from `listener` while fewer than `max` accepted connections
    /// are being served; `name` is for logs.
    pub fn new(listener: TcpListener, max: usize, name: &'static str) -> Self {
        Self::sharing(listener, Arc::new(Semaphore::new(max)), name)
    }

    /// Accepts from `listener` while `slots`, which other listeners may
    /// share, has one free; `name` is for logs. A listener waiting for a
    /// connection holds no slot, so an idle one never keeps a slot from
    /// the others.
    pub fn sharing(listener: TcpListener, slots: Arc<Semaphore>, name: &'static str) -> Self {
        Self {
            listener,
            limit: Limit::new(slots, name),
            per_source: None,
        }
    }

    /// Calls `counted` each time the listener pauses at its limit.
    pub fn on_limit(mut self, counted: impl Fn() + Send + Sync + 'static) -> Self {
        self.limit = self.limit.on_limit(counted);
        self
    }

    /// Also at most `max` connections from one client address at once: a
    /// connection beyond that is closed as soon as it is accepted, so one
    /// client cannot take every slot and the others still get theirs.
    pub fn per_source(mut self, max: usize) -> Self {
        self.per_source = Some((max.max(1), Sources::default()));
        self
    }

    /// The next connection, with the [`Slot`] it holds until dropped.
    /// Waits while every slot is taken (connections queue in the kernel's
    /// backlog; with shared slots, one connection per listener may instead
    /// wait accepted, when another listener took the slot). A failed
    /// accept (out of descriptors, most likely) is logged and retried
    /// shortly, letting some connections close.
    pub async fn accept(&self) -> (TcpStream, SocketAddr, Slot) {
        loop {
            self.limit.free().await;
            let (tcp, remote) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(listener = self.limit.name, %error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // A listener sharing the slots may have taken the last one
            // first: this connection then waits for the next.
            let Some(slot) = self.limit.slot().await else {
                continue;
            };
            let Some((max, sources)) = &self.per_source else {
                return (
                    tcp,
                    remote,
                    Slot {
                        _slot: slot,
                        source: None,
                    },
                );
            };
            let ip = remote.ip().to_canonical();
            let mut held = sources.lock().unwrap_or_else(|e| e.into_inner());
            let n = held.entry(ip).or_default();
            if *n >= *max {
                drop(held);
                tracing::debug!(listener = self.limit.name, %remote, "too many connections from one address; closed");
                continue;
            }
            *n += 1;
            let source = Some((ip, sources.clone()));
            return (
                tcp,
                remote,
                Slot {
                    _slot: slot,
                    source,
                },
            );
        }
    }
}

/// Raises the soft limit on open descriptors to the hard limit, as Go's
/// runtime does for every program: a container's soft limit may be 1,024,
/// far below the connections a proxy or gateway is meant to hold. Warns,
/// naming `setting`, when even the hard limit is short of
/// `max_connections` in both directions at roughly two descriptors each
/// (its own and one to its destination; pooled connections add some):
/// accepts would then fail for want of descriptors before the connection
/// limit applies.
pub fn raise_descriptor_limit(max_connections: usize, setting: &str) {
    let wanted = (max_connections as u64)
        .saturating_mul(4)
        .saturating_add(256);
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < wanted => tracing::warn!(
            limit,
            wanted,
            "the open descriptor limit is below what {setting} needs"
        ),
        Ok(limit) => tracing::debug!(limit, "open descriptor limit"),
        Err(error) => tracing::warn!(%error, "could not raise the open descriptor limit"),
    }
}

/// Connects to `addr` within a time (else `TimedOut`): a destination that
/// drops SYNs would otherwise hold the caller for the kernel's two minutes
/// of retries.
pub async fn connect_within(addr: SocketAddr, within: Duration) -> std::io::Result<TcpStream> {
    timed(within, TcpStream::connect(addr)).await
}

/// `io` within a time, else `TimedOut`.
pub async fn timed<T>(
    within: Duration,
    io: impl std::future::Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    tokio::time::timeout(within, io)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.fallback {
            Some(fallback) => write!(f, "{} (else {fallback})", self.addr),
            None => write!(f, "{}", self.addr),
        }
    }
}

impl From<SocketAddr> for Target {
    fn from(addr: SocketAddr) -> Self {
        Self {
            addr,
            fallback: None,
        }
    }
}

/// An I/O object whose writes fail once the peer has taken nothing for
/// `limit`: for servers whose answers are small (the admin port), where a
/// client that sends requests and never reads the answers would otherwise
/// hold its connection, and a slot, for good. Costs nothing until a write
/// has to wait.
#[derive(Debug)]
pub struct WriteDeadline<I> {
    io: I,
    limit: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<I> WriteDeadline<I> {
    /// Wraps `io`.
    pub fn new(io: I, limit: Duration) -> Self {
        Self {
            io,
            limit,
            stalled: None,
        }
    }

    /// The write that had to wait: pending still, or the error once it has
    /// waited `limit` since the last write that went through.
    fn waited(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        let limit = self.limit;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        ready!(stalled.as_mut().poll(cx));
        Poll::Ready(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the peer took nothing written for {limit:?}"),
        ))
    }

    /// `result` of a write, flush or shutdown: the deadline is off again
    /// once one goes through.
    fn after<T>(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        match result {
            Poll::Pending => self.waited(cx).map(Err),
            done => {
                self.stalled = None;
                done
            }
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for WriteDeadline<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.io).poll_write(cx, buf);
        self.after(cx, result)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let result = Pin::new(&mut self.io).poll_flush(cx);
        self.after(cx, result)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let result = Pin::new(&mut self.io).poll_shutdown(cx);
        self.after(cx, result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_numbers_are_digits_only() {
        for p in 1..=u16::MAX {
            assert_eq!(port_number(&p.to_string()), Some(p));
        }
        assert_eq!(port_number("08080"), Some(8080));
        for bad in [
            "", "0", "00000", "+80", "-80", " 80", "80 ", "65536", "080800", "8o",
        ] {
            assert_eq!(port_number(bad), None, "{bad:?}");
        }
        assert!(has_host_and_port("web.demo:80"));
        for bad in ["web.demo", ":80", "web:", "web:+80", "web:0"] {
            assert!(!has_host_and_port(bad), "{bad:?}");
        }
    }

    const SECOND: Duration = Duration::from_secs(1);

    /// A destination that drops SYNs (here a listener whose accept queue
    /// is full) times out instead of holding the caller for minutes.
    #[tokio::test]
    async fn a_connect_that_gets_no_answer_times_out() {
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        let listener = socket.listen(0).expect("listen");
        let addr = listener.local_addr().expect("addr");
        let mut queued = Vec::new();
        for _ in 0..8 {
            match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
                Ok(Ok(s)) => queued.push(s),
                _ => break,
            }
        }
        assert!(queued.len() < 8, "the accept queue never filled");
        let started = std::time::Instant::now();
        let kind = |r: std::io::Result<TcpStream>| r.expect_err("no answer").kind();
        let within = Duration::from_millis(300);
        assert_eq!(
            kind(connect_within(addr, within).await),
            std::io::ErrorKind::TimedOut
        );
        assert_eq!(
            kind(Target::from(addr).connect(within).await),
            std::io::ErrorKind::TimedOut
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_refused_target_falls_back_and_an_accepting_one_does_not() {
        let listener = bind_listener("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let open = listener.local_addr().expect("addr");
        // A port nothing listens on (bound, not listening: it refuses, and
        // no other test can take it meanwhile).
        let reserved = TcpSocket::new_v4().expect("socket");
        reserved
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        let closed = reserved.local_addr().expect("addr");
        let refused = Target {
            addr: closed,
            fallback: Some(open),
        };
        let tcp = refused
            .connect(SECOND)
            .await
            .expect("the fallback takes it");
        assert_eq!(tcp.peer_addr().expect("peer"), open);
        let direct = Target {
            addr: open,
            fallback: Some(closed),
        };
        let tcp = direct.connect(SECOND).await.expect("connects");
        assert_eq!(tcp.peer_addr().expect("peer"), open);
        let alone = Target::from(closed);
        assert_eq!(
            alone.connect(SECOND).await.expect_err("refused").kind(),
            std::io::ErrorKind::ConnectionRefused
        );
    }

    #[tokio::test]
    async fn an_unspecified_ipv6_listener_takes_ipv4_too() {
        let listener = bind_listener("[::]:0".parse().expect("addr")).expect("bind");
        assert_eq!(
            socket2::SockRef::from(&listener).only_v6().ok(),
            Some(false),
            "IPV6_V6ONLY is cleared"
        );
        let port = listener.local_addr().expect("addr").port();
        let client = tokio::net::TcpStream::connect(("127.0.0.1", port));
        let (accepted, connected) = tokio::join!(listener.accept(), client);
        connected.expect("an IPv4 client connects");
        let (_, peer) = accepted.expect("accepted");
        // Seen as an IPv4-mapped IPv6 address.
        assert_eq!(peer.ip().to_canonical(), std::net::Ipv4Addr::LOCALHOST);
        let v4 = bind_listener("127.0.0.1:0".parse().expect("addr")).expect("bind");
        assert!(v4.local_addr().expect("addr").is_ipv4());
    }
}
