//! Plaintext HTTP/1.1 connections to upstreams (the application behind an
//! inbound proxy, unmeshed destinations), pooled by address.
//!
//! A request takes the connection used most recently (its socket and
//! buffers are the warmest) or dials one; it goes back to the pool when its
//! response body has been read to the end. Nothing is spawned per request
//! and no connection is dialed while an idle one exists (hyper-util's pool
//! races a dial against every checkout that finds none ready, and its
//! connections come back through a task of their own per response).
//!
//! A request without a body (most of them) is written and its response
//! read in the request's own task ([`wire`]): no connection task to hand
//! it to and back, no channels. A request with a body goes through
//! hyper's client connection, which streams the body while the response
//! may already come; a connection of the first kind becomes one of the
//! second when such a request needs it.

mod wire;

use crate::net::Target;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::{Request, Response};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::http::{Body, BoxError};
pub use wire::WireError;

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Http1Error {
    /// Connecting failed or timed out.
    #[error("connecting to {target}: {source}")]
    Connect {
        /// The upstream.
        target: Target,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The connection failed before a response head arrived.
    #[error("http/1.1 to {target}: {source}")]
    Http {
        /// The upstream.
        target: Target,
        /// The cause.
        #[source]
        source: hyper::Error,
    },
    /// The connection failed, or the upstream's response head was not
    /// one to take, on a connection this module drives itself.
    #[error("http/1.1 to {target}: {source}")]
    Wire {
        /// The upstream.
        target: Target,
        /// The cause.
        #[source]
        source: WireError,
    },
}

/// Limits of a [`Pool`].
#[derive(Debug, Clone, Copy)]
pub struct PoolConfig {
    /// Idle connections kept per address.
    pub max_idle: usize,
    /// How long an idle connection may wait for its next request.
    pub idle_timeout: Duration,
    /// How long a dial may take.
    pub connect_timeout: Duration,
}

/// What a read asks the kernel for at first, and at least (bytes).
const READ_SIZE: usize = 8 * 1024;
/// What a read asks for at most (bytes): reads that fill what they asked
/// for ask for twice as much next time, up to this, as a large body
/// streams.
const MAX_READ_SIZE: usize = 256 * 1024;
/// Idle connections are swept every quarter of the idle timeout, but
/// not more often than this...
const SWEEP_MIN: Duration = Duration::from_millis(50);
/// ...nor less often than this (a closed connection is let go within it).
const SWEEP_MAX: Duration = Duration::from_secs(5);

/// A connection whose requests this module writes and whose responses it
/// reads itself (see [`wire`]).
struct Wire {
    tcp: TcpStream,
    /// Bytes read and not yet taken.
    buf: BytesMut,
    /// What the next read asks for.
    read_size: usize,
}

impl Wire {
    fn new(tcp: TcpStream) -> Self {
        Self {
            tcp,
            buf: BytesMut::new(),
            read_size: READ_SIZE,
        }
    }

    /// Whether an idle connection may take a request: its upstream has
    /// neither closed it nor sent anything unasked. Costs no system call
    /// unless the socket became readable, since reading a response to its
    /// end left it drained.
    fn is_usable(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.tcp.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    /// Reads more into the buffer; `Ready(Ok(0))` at the end of the
    /// stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < self.read_size / 2 {
            self.buf.reserve(self.read_size);
        }
        let room = self.buf.capacity() - self.buf.len();
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.tcp),
            cx,
            &mut self.buf
        ))?;
        if n == room {
            self.read_size = (self.read_size * 2).min(MAX_READ_SIZE);
        } else if n < self.read_size / 4 {
            self.read_size = (self.read_size / 2).max(READ_SIZE);
        }
        Poll::Ready(Ok(n))
    }
}

/// A pooled connection.
enum Conn {
    /// Driven by hyper's connection task.
    Hyper(SendRequest<Body>),
    /// Driven by the request that holds it.
    Wire(Wire),
}

struct Idle {
    conn: Conn,
    since: Instant,
}

#[derive(Default)]
struct Conns {
    /// Keyed by the whole target: a connection that went to a fallback
    /// serves only requests that allow it.
    by_addr: crate::FastMap<Target, VecDeque<Idle>>,
    /// Whether a sweeper task is running (while any connection is idle).
    sweeping: bool,
}

struct Shared {
    config: PoolConfig,
    idle: Mutex<Conns>,
}

impl Idle {
    fn is_closed(&self) -> bool {
        match &self.conn {
            Conn::Hyper(sender) => sender.is_closed(),
            Conn::Wire(wire) => !wire.is_usable(),
        }
    }

    fn is_ready(&self) -> bool {
        match &self.conn {
            Conn::Hyper(sender) => sender.is_ready(),
            Conn::Wire(_) => true,
        }
    }
}

impl Shared {
    /// The most recent idle connection for `addr` (a whole target) ready
    /// for a request, if any. One still busy (the upstream answered before
    /// it had read the whole request body, which hyper is still sending) is
    /// kept for later.
    fn checkout(&self, addr: Target) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let conns = idle.by_addr.get_mut(&addr)?;
        let now = Instant::now();
        let mut busy = Vec::new();
        let mut found = None;
        while let Some(c) = conns.pop_back() {
            if now.duration_since(c.since) >= self.config.idle_timeout || c.is_closed() {
                continue;
            }
            if c.is_ready() {
                found = Some(c.conn);
                break;
            }
            busy.push(c);
        }
        // Back in their order (oldest at the front).
        while let Some(c) = busy.pop() {
            conns.push_back(c);
        }
        found
    }

    fn checkin(self: &Arc<Self>, addr: Target, conn: Conn) {
        if let Conn::Hyper(sender) = &conn {
            if sender.is_closed() {
                return;
            }
        }
        let now = Instant::now();
        let timeout = self.config.idle_timeout;
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if !idle.sweeping {
            idle.sweeping = self.start_sweeper();
        }
        let conns = idle.by_addr.entry(addr).or_default();
        // Oldest first: the expired ones are at the front.
        while conns
            .front()
            .is_some_and(|c| now.duration_since(c.since) >= timeout)
        {
            conns.pop_front();
        }
        if conns.len() < self.config.max_idle {
            conns.push_back(Idle { conn, since: now });
        }
    }

    /// Starts the task that, while connections are idle, closes the
    /// expired ones and those their upstream closed (nothing else reads
    /// an idle connection this module drives), and forgets addresses with
    /// none left. Whether it started (not outside a runtime).
    fn start_sweeper(self: &Arc<Self>) -> bool {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return false;
        };
        let every = (self.config.idle_timeout / 4).clamp(SWEEP_MIN, SWEEP_MAX);
        let pool = Arc::downgrade(self);
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(pool) = pool.upgrade() else {
                    return;
                };
                if !pool.sweep() {
                    return;
                }
            }
        });
        true
    }

    /// One sweep; whether any connection is left idle (if none, the
    /// sweeper stops, and the next checkin starts another).
    fn sweep(&self) -> bool {
        let now = Instant::now();
        let timeout = self.config.idle_timeout;
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.by_addr.retain(|_, conns| {
            conns.retain(|c| now.duration_since(c.since) < timeout && !c.is_closed());
            !conns.is_empty()
        });
        idle.sweeping = !idle.by_addr.is_empty();
        idle.sweeping
    }
}

/// HTTP/1.1 connections by address; cheap to clone.
#[derive(Clone)]
pub struct Pool(Arc<Shared>);

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("config", &self.0.config)
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// An empty pool.
    pub fn new(config: PoolConfig) -> Self {
        Self(Arc::new(Shared {
            config,
            idle: Mutex::default(),
        }))
    }

    /// Sends `req` (origin-form URI, `Host` set) to `target` on an idle
    /// connection, or a new one. A request an idle connection closed
    /// under before taking it whole is sent again on another connection
    /// (the upstream cannot have acted on it).
    pub async fn send(
        &self,
        target: impl Into<Target>,
        req: Request<Body>,
    ) -> Result<Response<Body>, Http1Error> {
        let target = target.into();
        let bodyless = wire::suits(&req);
        let mut req = req;
        while let Some(conn) = self.0.checkout(target) {
            let mut sender = match conn {
                Conn::Wire(wire) if bodyless => match self.send_wire(target, wire, req).await {
                    Ok(answer) => return answer,
                    Err(Unsent(unsent, _)) => {
                        req = unsent;
                        continue;
                    }
                },
                // Rare, and its state large: boxed.
                Conn::Wire(wire) => match Box::pin(handshake(target, wire.tcp)).await {
                    Ok(sender) => sender,
                    Err(_) => continue,
                },
                Conn::Hyper(sender) => sender,
            };
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(rsp) => return Ok(self.pooled(target, sender, rsp)),
                Err(mut e) => match e.take_message() {
                    Some(unsent) => req = unsent,
                    None => {
                        return Err(Http1Error::Http {
                            target,
                            source: e.into_error(),
                        })
                    }
                },
            }
        }
        // Dialing is rare and its state large: boxed, so the per-request
        // future stays small.
        let tcp = Box::pin(self.dial(target)).await?;
        if bodyless {
            return match self.send_wire(target, Wire::new(tcp), req).await {
                Ok(answer) => answer,
                Err(Unsent(_, e)) => Err(Http1Error::Wire {
                    target,
                    source: e.into(),
                }),
            };
        }
        let mut sender = Box::pin(handshake(target, tcp)).await?;
        match sender.send_request(req).await {
            Ok(rsp) => Ok(self.pooled(target, sender, rsp)),
            Err(source) => Err(Http1Error::Http { target, source }),
        }
    }

    async fn dial(&self, target: Target) -> Result<TcpStream, Http1Error> {
        let err = |source| Http1Error::Connect { target, source };
        let tcp = target
            .connect(self.0.config.connect_timeout)
            .await
            .map_err(err)?;
        tcp.set_nodelay(true).map_err(err)?;
        Ok(tcp)
    }

    /// Writes a request without a body on `wire` and reads the response
    /// head; its body is read as the caller reads it. A request the
    /// connection failed to take whole is handed back ([`Unsent`]): the
    /// upstream cannot have acted on it.
    async fn send_wire(
        &self,
        target: Target,
        mut wire: Wire,
        req: Request<Body>,
    ) -> Result<Result<Response<Body>, Http1Error>, Unsent> {
        let err = |source| Http1Error::Wire { target, source };
        let (parts, body) = req.into_parts();
        let mut head = Vec::with_capacity(256);
        wire::encode_request(&parts, &mut head);
        if let Err(e) = wire.tcp.write_all(&head).await {
            return Err(Unsent(Request::from_parts(parts, body), e));
        }
        Ok(read_response(target, wire, &parts.method, &self.0)
            .await
            .map_err(err))
    }

    /// The response with a body that returns the connection to the pool
    /// once read to the end.
    fn pooled(
        &self,
        addr: Target,
        sender: SendRequest<Body>,
        rsp: Response<Incoming>,
    ) -> Response<Body> {
        rsp.map(|inner| {
            let mut body = PooledBody {
                inner,
                slot: Some((self.0.clone(), addr, sender)),
            };
            if body.inner.is_end_stream() {
                body.release();
            }
            crate::http::boxed(body)
        })
    }
}

/// A request a connection did not take whole, and why.
struct Unsent(Request<Body>, std::io::Error);

/// Reads the response to a `method` request from `wire`: its head now,
/// its body as the caller reads it.
async fn read_response(
    target: Target,
    mut wire: Wire,
    method: &http::Method,
    pool: &Arc<Shared>,
) -> Result<Response<Body>, WireError> {
    let head = loop {
        match wire::parse_head(&wire.buf, method)? {
            wire::Parsed::Final(len, head) => {
                wire.buf.advance(len);
                break head;
            }
            wire::Parsed::Interim(len) => {
                wire.buf.advance(len);
                continue;
            }
            wire::Parsed::Partial => {}
        }
        if std::future::poll_fn(|cx| wire.poll_fill(cx)).await? == 0 {
            return Err(WireError::Incomplete);
        }
    };
    let mut body = WireBody {
        wire: Some(wire),
        framing: match head.framing {
            wire::Framing::Empty => Framing::Length(0),
            wire::Framing::Length(n) => Framing::Length(n),
            wire::Framing::Chunked => Framing::Chunked(wire::Chunked::default()),
            wire::Framing::Close => Framing::Close,
        },
        keep_alive: head.keep_alive,
        ended: false,
        slot: Some((pool.clone(), target)),
    };
    if head.framing == wire::Framing::Empty {
        body.end();
    }
    Ok(head.response.map(|()| crate::http::boxed(body)))
}

/// Hands `tcp` to hyper's HTTP/1.1 client, whose connection task then
/// drives it.
async fn handshake(target: Target, tcp: TcpStream) -> Result<SendRequest<Body>, Http1Error> {
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|source| Http1Error::Http { target, source })?;
    tokio::spawn(async move {
        if let Err(error) = conn.await {
            tracing::debug!(%target, %error, "upstream HTTP/1.1 connection closed");
        }
    });
    Ok(sender)
}

/// How much of a [`WireBody`] is still to come.
enum Framing {
    /// This many bytes.
    Length(u64),
    /// Chunks, decoded as they come.
    Chunked(wire::Chunked),
    /// Until the upstream closes.
    Close,
}

/// A response body read from its connection as the reader asks; the
/// connection goes back to the pool when the body has ended (with its
/// last frame when the length or trailers tell it is the last, so a
/// reader may stop there; else with the poll after it) if the response
/// allows it.
/// A body dropped before its end takes the connection with it.
struct WireBody {
    /// `None` once the body has ended or failed.
    wire: Option<Wire>,
    framing: Framing,
    keep_alive: bool,
    ended: bool,
    slot: Option<(Arc<Shared>, Target)>,
}

impl WireBody {
    /// The body has ended: the connection goes back to the pool unless
    /// the response said otherwise or the upstream sent more than it.
    fn end(&mut self) {
        self.ended = true;
        let wire = self.wire.take();
        if let (Some(mut wire), Some((pool, addr))) = (wire, self.slot.take()) {
            if self.keep_alive && wire.buf.is_empty() {
                // An idle connection keeps no buffer: its last one is
                // usually shared with data still being relayed, and would
                // keep all of that allocated (up to twice the largest
                // read). The next request's first read takes a new one.
                wire.buf = BytesMut::new();
                wire.read_size = READ_SIZE;
                pool.checkin(addr, Conn::Wire(wire));
            }
        }
    }

    fn fail(&mut self, e: WireError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.wire = None;
        Poll::Ready(Some(Err(e.into())))
    }
}

impl HttpBody for WireBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            let Some(wire) = this.wire.as_mut() else {
                return Poll::Ready(None);
            };
            match &mut this.framing {
                Framing::Length(0) => {
                    this.end();
                    return Poll::Ready(None);
                }
                Framing::Length(left) if !wire.buf.is_empty() => {
                    let n = usize::try_from(*left)
                        .unwrap_or(usize::MAX)
                        .min(wire.buf.len());
                    let data = wire.buf.split_to(n).freeze();
                    *left -= n as u64;
                    if *left == 0 {
                        this.end();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Chunked(decoder) => match decoder.decode(&mut wire.buf) {
                    Ok(wire::Decoded::Data(data)) => {
                        return Poll::Ready(Some(Ok(Frame::data(data))))
                    }
                    Ok(wire::Decoded::Trailers(trailers)) => {
                        this.end();
                        return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                    }
                    Ok(wire::Decoded::End) => {
                        this.end();
                        return Poll::Ready(None);
                    }
                    Ok(wire::Decoded::More) => {}
                    Err(e) => return this.fail(e),
                },
                Framing::Close if !wire.buf.is_empty() => {
                    return Poll::Ready(Some(Ok(Frame::data(wire.buf.split().freeze()))));
                }
                Framing::Length(_) | Framing::Close => {}
            }
            match ready!(wire.poll_fill(cx)) {
                Ok(0) if matches!(this.framing, Framing::Close) => {
                    this.keep_alive = false;
                    this.end();
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail(WireError::Incomplete),
                Ok(_) => {}
                Err(e) => return this.fail(e.into()),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.framing, self.ended) {
            (_, true) => SizeHint::with_exact(0),
            (Framing::Length(n), false) => SizeHint::with_exact(*n),
            _ => SizeHint::default(),
        }
    }
}

/// A response body holding its connection until the body ends; a body
/// dropped before its end takes the connection with it (hyper closes a
/// connection whose response was not read through).
struct PooledBody {
    inner: Incoming,
    slot: Option<(Arc<Shared>, Target, SendRequest<Body>)>,
}

impl PooledBody {
    fn release(&mut self) {
        if let Some((pool, addr, sender)) = self.slot.take() {
            pool.checkin(addr, Conn::Hyper(sender));
        }
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // Read to the end without the final poll for `None`.
        if self.inner.is_end_stream() {
            self.release();
        }
    }
}

impl HttpBody for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            Some(Err(_)) => self.slot = None,
            None => self.release(),
            // The last frame (data that ends the length, or trailers):
            // whoever reads the body may stop here.
            Some(Ok(f)) if f.is_trailers() || self.inner.is_end_stream() => self.release(),
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests;
