//! A tunnel stream as a single duplex byte stream: a QUIC bidirectional
//! stream ([`QuicIo`]), or one TLS-over-TCP connection ([`TlsIo`], the
//! fallback where UDP is blocked), both as a [`TunnelIo`].

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Who is on the other end of a tunnel stream.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// The peer's link name (its cluster name).
    pub name: String,
    /// The peer's authenticated identity.
    pub identity: String,
}

/// A QUIC bidirectional stream joined into one `AsyncRead + AsyncWrite`;
/// shutting down the write half finishes the QUIC send stream (half-close).
#[derive(Debug)]
pub struct QuicIo {
    /// The sending half.
    pub send: quinn::SendStream,
    /// The receiving half.
    pub recv: quinn::RecvStream,
    /// The authenticated peer.
    pub peer: PeerInfo,
    /// Held while this stream is its connection's catalog watch: given
    /// back when the watch's session ends, so the peer can watch again on
    /// the same connection.
    pub watch: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl QuicIo {
    /// A stream of `peer`'s (no watch held).
    pub fn new(send: quinn::SendStream, recv: quinn::RecvStream, peer: PeerInfo) -> Self {
        Self {
            send,
            recv,
            peer,
            watch: None,
        }
    }
}

impl AsyncRead for QuicIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.recv).poll_read(cx, buf)
    }
}

impl AsyncWrite for QuicIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.send), cx, buf).map_err(Into::into)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.send), cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        AsyncWrite::poll_shutdown(Pin::new(&mut self.send), cx)
    }
}

impl tonic::transport::server::Connected for QuicIo {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

/// One mTLS TCP connection carrying one tunnel stream (the TCP transport:
/// a connection per stream, as Linkerd's gateway does, so there is no
/// head-of-line blocking between streams and no second multiplexer).
pub struct TlsIo {
    /// The TLS stream.
    pub stream: tokio_rustls::TlsStream<tokio::net::TcpStream>,
    /// The authenticated peer.
    pub peer: PeerInfo,
    /// Resolves when the link this connection was accepted under changes
    /// or goes: every read and write fails from then on, wherever the
    /// connection has been handed (a relay, the peering server).
    pub revoked: Option<Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
    /// Set once `revoked` has resolved.
    pub aborted: bool,
    /// Held while this connection is a peering watch (see [`WatchSlots`]).
    pub slot: Option<WatchSlot>,
}

/// Counts each peer's open TCP peering watches, capped.
#[derive(Debug, Default)]
pub struct WatchSlots(std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>);

/// Most TCP peering watches one peer may hold at once.
pub const MAX_TCP_WATCHES: usize = 2;

impl WatchSlots {
    /// A slot for `peer`, unless it holds [`MAX_TCP_WATCHES`] already.
    pub fn acquire(&self, peer: &str) -> Option<WatchSlot> {
        let mut counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(peer.to_string()).or_default();
        if *n >= MAX_TCP_WATCHES {
            return None;
        }
        *n += 1;
        Some(WatchSlot {
            slots: self.0.clone(),
            peer: peer.to_string(),
        })
    }

    /// How many watches `peer` holds now.
    pub fn held(&self, peer: &str) -> usize {
        let counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        counts.get(peer).copied().unwrap_or(0)
    }
}

/// One held peering watch; released when dropped (with its connection).
#[derive(Debug)]
pub struct WatchSlot {
    slots: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    peer: String,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut counts = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.peer);
            }
        }
    }
}

impl std::fmt::Debug for TlsIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIo")
            .field("peer", &self.peer)
            .field("revocable", &self.revoked.is_some())
            .finish_non_exhaustive()
    }
}

impl TlsIo {
    fn check(&mut self, cx: &mut Context<'_>) -> std::io::Result<()> {
        let fired = self
            .revoked
            .as_mut()
            .is_some_and(|r| r.as_mut().poll(cx).is_ready());
        if fired {
            // Never poll a finished future again: stay aborted instead.
            self.revoked = None;
            self.aborted = true;
        }
        if self.aborted {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "link changed or removed",
            ));
        }
        Ok(())
    }
}

/// A tunnel stream over either transport.
#[derive(Debug)]
pub enum TunnelIo {
    /// A QUIC stream.
    Quic(QuicIo),
    /// A TLS-over-TCP connection.
    Tls(Box<TlsIo>),
}

impl TunnelIo {
    /// The authenticated peer.
    pub fn peer(&self) -> &PeerInfo {
        match self {
            Self::Quic(q) => &q.peer,
            Self::Tls(t) => &t.peer,
        }
    }

    /// Sets who the peer is (the dialing side knows it from the link).
    pub fn set_peer(&mut self, peer: PeerInfo) {
        match self {
            Self::Quic(q) => q.peer = peer,
            Self::Tls(t) => t.peer = peer,
        }
    }
}

macro_rules! delegate {
    ($self:ident, $cx:ident, $io:ident => $e:expr) => {
        match $self.get_mut() {
            TunnelIo::Quic($io) => {
                let $io = Pin::new($io);
                $e
            }
            TunnelIo::Tls(t) => {
                if let Err(e) = t.check($cx) {
                    return Poll::Ready(Err(e));
                }
                let $io = Pin::new(&mut t.stream);
                $e
            }
        }
    };
}

impl AsyncRead for TunnelIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        delegate!(self, cx, io => io.poll_read(cx, buf))
    }
}

impl AsyncWrite for TunnelIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        delegate!(self, cx, io => io.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        delegate!(self, cx, io => io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        delegate!(self, cx, io => io.poll_shutdown(cx))
    }
}

impl tonic::transport::server::Connected for TunnelIo {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer().clone()
    }
}

/// Bytes moved by [`splice_tcp`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Spliced {
    /// From the TCP connection into the tunnel.
    pub into_tunnel: u64,
    /// From the tunnel out to the TCP connection.
    pub out_of_tunnel: u64,
}

/// Largest chunk read from TCP at once.
const CHUNK: usize = 64 * 1024;
/// Received chunks gathered into one vectored write.
const GATHER: usize = 64;

/// Splices a TCP connection and a tunnel stream until both directions
/// finish, with half-close: TCP end of stream finishes the QUIC stream and
/// the end of the QUIC stream shuts down the TCP write half. Chunks are
/// handed to quinn and taken from it as `Bytes`, so no byte is copied
/// through an intermediate buffer (the generic [`strait_proxy::forward`]
/// copy costs a memmove per direction, measurable at gigabits).
///
/// Gives the bytes moved either way, those moved before an error too, and
/// the error if one ended the splice.
pub async fn splice_tcp(
    tcp: &mut tokio::net::TcpStream,
    io: &mut QuicIo,
) -> (Spliced, std::io::Result<()>) {
    let (rd, wr) = tcp.split();
    splice_halves(rd, wr, io).await
}

/// [`splice_tcp`] for the two halves of any connection.
pub async fn splice_halves<R, W>(
    mut rd: R,
    mut wr: W,
    io: &mut QuicIo,
) -> (Spliced, std::io::Result<()>)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let send = &mut io.send;
    let recv = &mut io.recv;
    let mut moved = Spliced::default();
    let (into_tunnel, out_of_tunnel) = (&mut moved.into_tunnel, &mut moved.out_of_tunnel);
    let up = async {
        let n = into_tunnel;
        let mut buf = bytes::BytesMut::with_capacity(CHUNK);
        loop {
            buf.reserve(CHUNK);
            if rd.read_buf(&mut buf).await? == 0 {
                send.finish()
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::BrokenPipe, e))?;
                return Ok::<(), std::io::Error>(());
            }
            let chunk = buf.split().freeze();
            let len = chunk.len() as u64;
            send.write_chunk(chunk).await?;
            *n += len;
        }
    };
    let down = async {
        let n = out_of_tunnel;
        // Each received packet is one chunk: gather many per write so a
        // syscall carries tens of kilobytes, not one packet's worth.
        let mut chunks: [bytes::Bytes; GATHER] = std::array::from_fn(|_| bytes::Bytes::new());
        while let Some(k) = recv.read_chunks(&mut chunks).await? {
            let mut slices: Vec<std::io::IoSlice<'_>> = chunks[..k]
                .iter()
                .map(|b| std::io::IoSlice::new(b))
                .collect();
            let mut rest = &mut slices[..];
            while !rest.is_empty() {
                let written = wr.write_vectored(rest).await?;
                if written == 0 {
                    return Err(std::io::ErrorKind::WriteZero.into());
                }
                *n += written as u64;
                std::io::IoSlice::advance_slices(&mut rest, written);
            }
            // A TLS writer takes bytes into its buffer and sends them
            // only when flushed (a no-op on TCP): without this, the tail of
            // a burst would wait for the next chunk from the tunnel.
            wr.flush().await?;
        }
        wr.shutdown().await?;
        Ok::<(), std::io::Error>(())
    };
    let result = tokio::try_join!(up, down).map(|_| ());
    (moved, result)
}

/// Resets both halves of a tunnel stream with `why`, so the peer sees a
/// refusal or an abort, never a clean end of stream. Over TCP there is no
/// code to send: the connection is reset when dropped (the reason is
/// counted on this side).
pub fn reset(io: &mut TunnelIo, why: super::Refusal) {
    match io {
        TunnelIo::Quic(q) => {
            let code = quinn::VarInt::from_u32(why.code());
            let _ = q.send.reset(code);
            let _ = q.recv.stop(code);
        }
        TunnelIo::Tls(t) => reset_tcp(t.stream.get_ref().0),
    }
}

/// Resets a TCP connection on close (linger 0), so its client sees an
/// error rather than a clean end of stream.
pub fn reset_tcp(tcp: &tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(std::time::Duration::ZERO));
}

/// Why the peer reset a tunnel stream, if it did.
pub fn refusal_of(error: &std::io::Error) -> Option<super::Refusal> {
    let inner = error.get_ref()?;
    let code = if let Some(quinn::ReadError::Reset(code)) = inner.downcast_ref::<quinn::ReadError>()
    {
        *code
    } else if let Some(quinn::WriteError::Stopped(code)) = inner.downcast_ref::<quinn::WriteError>()
    {
        *code
    } else {
        return None;
    };
    super::Refusal::from_code(code.into_inner())
}

/// This cluster's end of a relayed stream: a TCP connection, or mutual TLS
/// to a meshed endpoint's proxy.
#[derive(Debug)]
pub enum Local {
    /// Plain TCP (an application's connection, or an unmeshed endpoint).
    Tcp(tokio::net::TcpStream),
    /// Mutual TLS to the sidecar proxy in front of the endpoint.
    Mesh(Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>),
}

impl Local {
    /// The TCP connection underneath.
    pub fn tcp(&self) -> &tokio::net::TcpStream {
        match self {
            Local::Tcp(t) => t,
            Local::Mesh(m) => m.get_ref().0,
        }
    }
}

impl tokio::io::AsyncRead for Local {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Local::Tcp(t) => std::pin::Pin::new(t).poll_read(cx, buf),
            Local::Mesh(m) => std::pin::Pin::new(m).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Local {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Local::Tcp(t) => std::pin::Pin::new(t).poll_write(cx, buf),
            Local::Mesh(m) => std::pin::Pin::new(m).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Local::Tcp(t) => std::pin::Pin::new(t).poll_write_vectored(cx, bufs),
            Local::Mesh(m) => std::pin::Pin::new(m).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Local::Tcp(t) => t.is_write_vectored(),
            Local::Mesh(m) => m.is_write_vectored(),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Local::Tcp(t) => std::pin::Pin::new(t).poll_flush(cx),
            Local::Mesh(m) => std::pin::Pin::new(m).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Local::Tcp(t) => std::pin::Pin::new(t).poll_shutdown(cx),
            Local::Mesh(m) => std::pin::Pin::new(m).poll_shutdown(cx),
        }
    }
}

/// Relays this cluster's end of a stream and a tunnel stream to the end
/// with [`splice_tcp`] (or [`splice_halves`] over mutual TLS), keeping the
/// stream gauges and counters; on failure the stream is reset
/// ([`Refusal::Aborted`](super::Refusal::Aborted)) and the TCP connection
/// reset, so neither side mistakes a failure for an end.
pub async fn relay(
    local: &mut Local,
    io: &mut TunnelIo,
    metrics: &crate::metrics::GatewayMetrics,
    direction: &'static str,
) {
    let peer = io.peer().name.clone();
    let open = metrics
        .streams_open
        .get_or_create(&crate::metrics::StreamLabels {
            peer: peer.clone(),
            direction,
        })
        .clone();
    open.inc();
    let (moved, result) = match (&mut *local, &mut *io) {
        (Local::Tcp(tcp), TunnelIo::Quic(q)) => splice_tcp(tcp, q).await,
        (Local::Mesh(tls), TunnelIo::Quic(q)) => {
            let (rd, wr) = tokio::io::split(tls);
            splice_halves(rd, wr, q).await
        }
        // TLS needs its bytes copied through rustls anyway: the proxy's
        // splice, with its half-close and its buffers held only while
        // bytes are in flight. Through the tunnel stream itself, not its
        // TLS stream: every read and write checks the link is still the
        // one the connection was made under (a changed or removed link
        // ends its streams).
        (local, TunnelIo::Tls(_)) => {
            let (moved, result) = strait_proxy::forward::splice(local, io).await;
            let moved = Spliced {
                into_tunnel: moved.a_to_b,
                out_of_tunnel: moved.b_to_a,
            };
            (moved, result)
        }
    };
    open.dec();
    // Bytes count however the stream ended.
    metrics.bytes(&peer, moved.into_tunnel, moved.out_of_tunnel);
    match result {
        Ok(()) => {
            metrics.stream_done(&peer, direction, "ok");
        }
        Err(error) => {
            let result = refusal_of(&error).map_or("error", super::Refusal::as_str);
            tracing::info!(%peer, direction, %error, result, "tunnel stream failed");
            // Counted before the resets: whoever saw one sees the count.
            metrics.stream_done(&peer, direction, result);
            reset(io, super::Refusal::Aborted);
            reset_tcp(local.tcp());
        }
    }
}
