//! Serving one accepted HTTP connection (HTTP/1 with hyper, HTTP/2 with
//! [`crate::http2::server`]), and parking idle HTTP/1 keep-alive
//! connections.
//!
//! hyper holds two buffers on every HTTP/1 server connection for as long
//! as it lives — a read buffer of 8 to 16 KiB and an 8 KiB write buffer —
//! even while the connection waits, idle, for a next request that may
//! never come. Applications keep many such connections open (pools of
//! keep-alive connections to their sidecar), so a proxy holding 10,000 of
//! them would spend most of its memory on empty buffers.
//!
//! So an HTTP/1 connection that has answered every request it received,
//! the last of them without a body, and then seen nothing for
//! [`PARK_AFTER`] is handed back by hyper (a
//! graceful shutdown of an idle connection closes nothing on the wire and
//! writes nothing: keep-alive was never refused) and waits for its next
//! byte holding only the socket. When the client speaks again, the byte
//! and anything hyper had read ahead are replayed into a fresh hyper
//! connection. The client cannot tell.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

use super::{drained, http_error_reason, Shared, MAX_HEADER_BYTES};
use crate::metrics::DirectionLabels;

/// How long an HTTP/1 connection must be idle (every response sent,
/// nothing read or written) before its hyper state is dropped.
pub(crate) const PARK_AFTER: Duration = Duration::from_secs(1);

/// Which HTTP a connection speaks (from protocol detection, or the mesh
/// transport header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Version {
    /// HTTP/1.x.
    Http1,
    /// HTTP/2 (prior knowledge: the preface was seen, or the peer is a
    /// proxy).
    Http2,
}

/// What one connection's I/O wrapper and service tell the task serving it.
#[derive(Debug)]
struct Idle {
    /// When the connection was accepted: the origin of `head_since`.
    born: Instant,
    /// Bumped by every read or write that moved bytes, and every request.
    activity: AtomicU64,
    /// `activity` when a read last found nothing to read with no request
    /// in flight.
    idle_at: AtomicU64,
    /// Requests whose response has not been sent in full.
    in_flight: AtomicUsize,
    /// Whether the last request received came without a body, as HTTP/1.1
    /// and with neither it nor its response asking to close. Only then is
    /// an idle connection parked: a fresh connection never is (hyper would
    /// answer its first request with `close`), nor one whose last request
    /// body may not have been read to its end (hyper then closes the
    /// connection itself, and what is left of the body must never be read
    /// as a next request), nor one hyper is closing anyway.
    parkable: AtomicBool,
    /// Set while a park is in progress: hyper's shutdown of the socket is
    /// skipped.
    parking: AtomicBool,
    /// When the first bytes of a next request head arrived (milliseconds
    /// after `born`, plus one), 0 until they have: a parked connection
    /// holding part of a head waits only until the head is due, and a
    /// header timeout with none is an idle connection closing.
    head_since: AtomicU64,
    notify: Notify,
}

impl Idle {
    fn new() -> Self {
        Self {
            born: Instant::now(),
            activity: AtomicU64::new(0),
            idle_at: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            parkable: AtomicBool::new(false),
            parking: AtomicBool::new(false),
            head_since: AtomicU64::new(0),
            notify: Notify::new(),
        }
    }

    /// When the head being awaited began to arrive, if it has.
    fn head_started(&self) -> Option<Instant> {
        match self.head_since.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(self.born + Duration::from_millis(ms - 1)),
        }
    }

    /// Marks the head being awaited as begun now, unless it began before.
    fn head_began_by_now(&self) {
        if self.head_since.load(Ordering::Relaxed) == 0 {
            let ms = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
            self.head_since.store(ms + 1, Ordering::Relaxed);
        }
    }

    /// The deadline of the head being awaited, if it has begun to arrive.
    fn head_deadline(&self, timeout: Duration) -> Option<Instant> {
        self.head_started().map(|t| t + timeout)
    }

    fn active(&self) {
        self.activity.fetch_add(1, Ordering::Relaxed);
    }

    /// Bytes were read from the client.
    fn read(&self) {
        self.active();
        if self.in_flight.load(Ordering::Relaxed) == 0 {
            self.head_began_by_now();
        }
    }

    fn read_pending(&self) {
        if self.in_flight.load(Ordering::Relaxed) == 0 && self.parkable.load(Ordering::Relaxed) {
            self.idle_at
                .store(self.activity.load(Ordering::Relaxed), Ordering::Relaxed);
            self.notify.notify_one();
        }
    }

    /// Resolves once the connection has been idle for `after`: nothing in
    /// flight and no bytes moved since a read found nothing.
    async fn parkable(&self, after: Duration) {
        loop {
            self.notify.notified().await;
            let at = self.idle_at.load(Ordering::Relaxed);
            tokio::time::sleep(after).await;
            if self.activity.load(Ordering::Relaxed) == at
                && self.in_flight.load(Ordering::Relaxed) == 0
            {
                return;
            }
        }
    }
}

/// A request in flight until its response body has been sent (or
/// dropped).
struct InFlight(Arc<Idle>);

impl InFlight {
    fn new(idle: Arc<Idle>, bodiless: bool) -> Self {
        idle.in_flight.fetch_add(1, Ordering::Relaxed);
        idle.parkable.store(bodiless, Ordering::Relaxed);
        idle.head_since.store(0, Ordering::Relaxed);
        idle.active();
        Self(idle)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.active();
        // The last response sent: idle from now unless bytes move (hyper
        // may have polled for the next request before dropping the body).
        if self.0.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.0.read_pending();
        }
    }
}

/// A response body holding its request's [`InFlight`].
struct Tracked {
    inner: crate::http::Body,
    _in_flight: InFlight,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = crate::http::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// The connection's I/O as hyper sees it: replays bytes read while parked,
/// reports activity, and keeps the socket open when hyper shuts down a
/// connection being parked.
struct ParkIo<I> {
    io: I,
    replay: Bytes,
    idle: Arc<Idle>,
}

impl<I: AsyncRead + Unpin> AsyncRead for ParkIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if crate::detect::replay(&mut self.replay, buf) {
            self.idle.read();
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        match &polled {
            Poll::Ready(Ok(())) if buf.filled().len() > before => self.idle.read(),
            Poll::Pending => self.idle.read_pending(),
            _ => {}
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for ParkIo<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.idle.active();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.idle.active();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.idle.parking.load(Ordering::Relaxed) {
            // Parking, not closing: hyper is done with the socket, we are
            // not.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Counts a parked connection while alive.
struct Parked(prometheus_client::metrics::gauge::Gauge);

impl Parked {
    fn new(
        family: &prometheus_client::metrics::family::Family<
            DirectionLabels,
            prometheus_client::metrics::gauge::Gauge,
        >,
        direction: &'static str,
    ) -> Self {
        let gauge = family.get_or_create(&DirectionLabels { direction }).clone();
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for Parked {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Whether headers ask for the connection to close after this message.
fn closes(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("close"))
}

fn http1(header_timeout: Duration) -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.max_buf_size(MAX_HEADER_BYTES)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout);
    b
}

/// Serves one HTTP/2 connection (see [`crate::http2::server`]) until it
/// ends or a drain asks it to finish its streams and close. Returns whether
/// it ended cleanly; failures are counted by reason.
async fn serve_h2(
    io: Box<dyn BoxedIo>,
    shared: &Shared,
    direction: &'static str,
    handle: Handler,
) -> bool {
    use crate::http2::server;
    let settings = server::Settings {
        max_header: MAX_HEADER_BYTES as u32,
        keepalive: shared.config.http2_keepalive,
    };
    let failed = |error: server::ServeError| {
        tracing::debug!(direction, %error, "HTTP/2 connection failed");
        shared.http.error(direction, http2_error_reason(&error));
        false
    };
    let mut draining = shared.draining.clone();
    // The client's preface is due at once (detection saw it, or a peer
    // proxy sends it first): one that stalls does not hold its slot.
    let handshake = tokio::time::timeout(
        shared.config.setup_timeout(),
        server::handshake(io, settings),
    );
    let mut conn = tokio::select! {
        r = handshake => match r {
            Ok(Ok(conn)) => conn,
            Ok(Err(error)) => return failed(error.into()),
            Err(_) => {
                tracing::debug!(direction, "HTTP/2 preface not received in time");
                shared.http.error(direction, "http_timeout");
                return false;
            }
        },
        () = drained(&mut draining) => return true,
    };
    let ended = tokio::select! {
        r = conn.serve(&*handle) => Some(r),
        () = drained(&mut draining) => None,
    };
    let ended = match ended {
        Some(r) => r,
        None => {
            conn.graceful_shutdown();
            conn.serve(&*handle).await
        }
    };
    ended.map_or_else(failed, |()| true)
}

/// The error counter's reason for a failed HTTP/2 connection: the client
/// broke the protocol (h2 found it: a bad preface, frame or header block,
/// answered with GOAWAY once the preface was good), stopped answering
/// pings, or the connection failed otherwise (reset, cut off in the middle
/// of a frame, or the client's GOAWAY with an error). A close between
/// frames, even with streams open, is no error (as with hyper).
fn http2_error_reason(error: &crate::http2::server::ServeError) -> &'static str {
    use crate::http2::server::ServeError;
    match error {
        ServeError::PingTimeout(_) => "http2_ping_timeout",
        ServeError::H2(e) if e.is_go_away() && e.is_library() => "http2_protocol",
        ServeError::H2(_) => "http_connection",
    }
}

/// How one hyper connection ended.
enum Ended {
    /// For good (closed, failed, upgraded or drained): whether cleanly.
    Done(bool),
    /// Parked: waiting for the client's next request.
    Parked,
}

/// A connection of any kind, boxed: [`serve_http`] is compiled once for
/// every kind (plain or TLS, bytes read ahead or not, HTTP/2 buffered).
pub(crate) trait BoxedIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> BoxedIo for T {}

/// A request handler's answer, boxed (its state is large, and hyper's
/// HTTP/1 server keeps room for the service's future on every connection,
/// in flight or not).
pub(crate) type Handled =
    Pin<Box<dyn std::future::Future<Output = http::Response<crate::http::Body>> + Send>>;

/// A request handler of either direction.
pub(crate) type Handler = Arc<dyn Fn(http::Request<crate::http::Body>) -> Handled + Send + Sync>;

/// Serves one HTTP connection with `handle`, until it ends or a drain asks
/// it to finish its requests and close. Returns whether it ended cleanly;
/// failures are counted by reason. Idle HTTP/1 connections are parked
/// (see the module documentation).
///
/// Not generic: hyper's and h2's server code, instantiated for its
/// connection and service types, is compiled once for both directions
/// rather than once each (82 KB less text), for a virtual call per read,
/// write and request (no change in instructions per request,
/// `bench/proxy-instructions.sh`).
pub(crate) async fn serve_http(
    io: Box<dyn BoxedIo>,
    version: Version,
    shared: &Shared,
    direction: &'static str,
    handle: Handler,
) -> bool {
    if version == Version::Http2 {
        // Boxed: every parked HTTP/1 connection's task would otherwise
        // hold room for an HTTP/2 connection's state.
        return Box::pin(serve_h2(io, shared, direction, handle)).await;
    }
    let idle = Arc::new(Idle::new());
    // hyper keeps a box sized for the service's future on every
    // connection, in flight or not: the request handler's (large) state is
    // boxed per request instead.
    let service = {
        let idle = idle.clone();
        hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
            use hyper::body::Body as _;
            let keeps_alive = req.version() == http::Version::HTTP_11 && !closes(req.headers());
            let in_flight = InFlight::new(idle.clone(), keeps_alive && req.body().is_end_stream());
            let fut = handle(req.map(crate::http::boxed));
            async move {
                let rsp = fut.await;
                if closes(rsp.headers()) {
                    in_flight.0.parkable.store(false, Ordering::Relaxed);
                }
                // (Served as it is: a second box around the body would be
                // one more allocation and indirection per request.)
                Ok::<_, std::convert::Infallible>(rsp.map(|inner| Tracked {
                    inner,
                    _in_flight: in_flight,
                }))
            }
        })
    };
    let mut draining = shared.draining.clone();
    let failed = |error: &(dyn std::error::Error + 'static)| {
        let timed_out = error
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_timeout);
        if timed_out && idle.head_started().is_none() {
            // Idle since its last exchange (one that cannot be parked):
            // closed at the header timeout, as keep-alive allows.
            return true;
        }
        tracing::debug!(direction, %error, "HTTP connection failed");
        shared.http.error(direction, http_error_reason(error));
        false
    };
    let mut io = ParkIo {
        io,
        replay: Bytes::new(),
        idle: idle.clone(),
    };
    let head_limit = shared.config.http1_header_timeout;
    loop {
        idle.parking.store(false, Ordering::Relaxed);
        // A fresh hyper connection is busy until it has answered a request.
        idle.parkable.store(false, Ordering::Relaxed);
        // hyper's timer runs from each wait for a head, a resumed one's
        // too: a head split by a park has at most twice the limit in all
        // (its time while parked is held to the first). A shorter timer
        // here would also be the idle wait after the exchange, closing the
        // connection before it could be parked again.
        // Boxed: a parked connection's task then holds no hyper state.
        let mut conn = Box::pin(
            http1(head_limit)
                .serve_connection(TokioIo::new(io), service.clone())
                .with_upgrades(),
        );
        let ended = tokio::select! {
            r = conn.as_mut() => Ended::Done(r.map_or_else(|e| failed(&e), |()| true)),
            () = drained(&mut draining) => {
                conn.as_mut().graceful_shutdown();
                Ended::Done(conn.as_mut().await.is_ok())
            }
            () = idle.parkable(PARK_AFTER) => {
                idle.parking.store(true, Ordering::Relaxed);
                conn.as_mut().graceful_shutdown();
                // Idle, hyper closes it at once, writing nothing. If it
                // does not (still flushing to a slow reader, or closing on
                // its own), it was not idle: let it close for real.
                let first = std::future::poll_fn(|cx| Poll::Ready(conn.as_mut().poll(cx))).await;
                let ended = match first {
                    Poll::Ready(Ok(())) => Ended::Parked,
                    Poll::Ready(Err(e)) => Ended::Done(failed(&e)),
                    Poll::Pending => {
                        idle.parking.store(false, Ordering::Relaxed);
                        Ended::Done(conn.as_mut().await.is_ok())
                    }
                };
                idle.parking.store(false, Ordering::Relaxed);
                ended
            }
        };
        match ended {
            Ended::Done(clean) => return clean,
            Ended::Parked => {}
        }
        // The socket back, with whatever hyper read and did not use.
        let Some(parts) = Pin::into_inner(conn).into_parts() else {
            return true;
        };
        io = parts.io.into_inner();
        // A slow client's partial request head, kept to replay: copied, not
        // holding on to hyper's whole read buffer. Read while the last
        // response was still going out (or pipelined behind it), it began
        // no later than now.
        let unread = if parts.read_buf.is_empty() {
            Bytes::new()
        } else {
            idle.head_began_by_now();
            Bytes::copy_from_slice(&parts.read_buf)
        };
        let parked = Parked::new(&shared.http.parked, direction);
        let mut next = [0u8; 1];
        // Idle, it may wait as long as it likes; halfway through a head,
        // only until the head is due.
        let head_due = async {
            match idle.head_deadline(head_limit) {
                Some(due) => tokio::time::sleep_until(due.into()).await,
                None => std::future::pending().await,
            }
        };
        let woken = tokio::select! {
            r = io.io.read(&mut next) => matches!(r, Ok(1)),
            () = drained(&mut draining) => false,
            () = head_due => {
                tracing::debug!(direction, "HTTP/1 request head not received in time");
                shared.http.error(direction, "http_timeout");
                return false;
            }
        };
        drop(parked);
        if !woken {
            // Closed (or reset) while idle, or draining: done, cleanly.
            return true;
        }
        // What hyper read ahead, then anything it never got to of an
        // earlier replay, then the new byte.
        io.replay = [&unread[..], &io.replay[..], &next[..]].concat().into();
    }
}
#[cfg(test)]
mod tests {
    /// The size of the future `f` returns.
    fn size_of_return<'a, F, R>(_: F) -> usize
    where
        F: Fn(
            Box<dyn super::BoxedIo>,
            super::Version,
            &'a super::Shared,
            &'static str,
            super::Handler,
        ) -> R,
    {
        std::mem::size_of::<R>()
    }

    /// Every parked HTTP/1 connection's task holds `serve_http`'s state:
    /// an HTTP/2 connection's must not be inlined in it (in a debug build,
    /// 2.3 KB in all with hyper's HTTP/2 connection inlined, 3.3 KB with
    /// `http2::server`'s, 0.8 KB with it boxed).
    #[test]
    fn a_connections_task_holds_no_http2_state_inline() {
        let size = size_of_return(super::serve_http);
        assert!(size < 1536, "serve_http's future is {size} bytes");
    }
}
