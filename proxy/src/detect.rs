//! Protocol detection on an accepted connection: HTTP/1, the HTTP/2
//! preface, a TLS ClientHello, or opaque TCP.
//!
//! [`classify`] is pure: it looks at the bytes read so far and says what
//! they are, or that it needs more. [`detect`] reads from a connection
//! until `classify` decides, the peer stops sending, the buffer is full or
//! the timeout passes, and hands back the bytes it read (a
//! [`PrefixedIo`] replays them), so that undetected traffic is forwarded
//! byte for byte.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The HTTP/2 connection preface (RFC 9113, section 3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Most bytes read before giving up on detection (an HTTP/1 request line
/// longer than this is treated as opaque, which is still forwarded).
pub const MAX_DETECT_BYTES: usize = 8 * 1024;

/// What a connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    /// HTTP/1.x (a request line was seen).
    Http1,
    /// HTTP/2 with prior knowledge (the preface was seen).
    Http2,
    /// A TLS ClientHello: pass it through untouched.
    Tls,
    /// Anything else, or nothing decided in time.
    Opaque,
}

/// What [`classify`] concludes from a prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Decided.
    Is(Detected),
    /// The prefix is consistent with a protocol; read more.
    NeedMore,
}

const METHODS: &[&[u8]] = &[
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH",
];

/// Classifies the first bytes of a connection.
pub fn classify(buf: &[u8]) -> Verdict {
    if buf.is_empty() {
        return Verdict::NeedMore;
    }
    // HTTP/2 preface: must match byte for byte.
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Verdict::Is(Detected::Http2)
        } else {
            Verdict::NeedMore
        };
    }
    // TLS: a handshake record (22), version 3.x, then a ClientHello (1).
    if buf[0] == 0x16 {
        return match buf.len() {
            1 => Verdict::NeedMore,
            2..=5 if buf[1] == 0x03 => Verdict::NeedMore,
            _ if buf[1] == 0x03 && buf[5] == 0x01 => Verdict::Is(Detected::Tls),
            _ => Verdict::Is(Detected::Opaque),
        };
    }
    // HTTP/1: a known method, a space, a target, a space, "HTTP/1.".
    classify_http1(buf)
}

fn classify_http1(buf: &[u8]) -> Verdict {
    let method_end = buf.iter().position(|b| *b == b' ');
    let method = &buf[..method_end.unwrap_or(buf.len())];
    let known = METHODS
        .iter()
        .any(|m| m.starts_with(method) || method.starts_with(m));
    if !known {
        return Verdict::Is(Detected::Opaque);
    }
    let Some(method_end) = method_end else {
        return Verdict::NeedMore;
    };
    if !METHODS.contains(&method) {
        return Verdict::Is(Detected::Opaque);
    }
    let rest = &buf[method_end + 1..];
    let Some(line_end) = rest.iter().position(|b| *b == b'\n') else {
        // No end of line yet (bounded by MAX_DETECT_BYTES and the timeout).
        return Verdict::NeedMore;
    };
    let line = rest[..line_end]
        .strip_suffix(b"\r")
        .unwrap_or(&rest[..line_end]);
    let version_ok = line
        .rsplit(|b| *b == b' ')
        .next()
        .is_some_and(|v| v.starts_with(b"HTTP/1."));
    if version_ok {
        Verdict::Is(Detected::Http1)
    } else {
        Verdict::Is(Detected::Opaque)
    }
}

/// Reads from `io` until the protocol is decided, the peer goes quiet for
/// `timeout` (then: opaque; a server-speaks-first protocol must not hang
/// on us), the peer closes, or [`MAX_DETECT_BYTES`] have been read.
/// Returns the verdict and every byte read.
pub async fn detect<I: AsyncRead + Unpin>(
    io: &mut I,
    timeout: Duration,
) -> std::io::Result<(Detected, Bytes)> {
    let mut buf = BytesMut::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Verdict::Is(d) = classify(&buf) {
            return Ok((d, buf.freeze()));
        }
        if buf.len() >= MAX_DETECT_BYTES {
            return Ok((Detected::Opaque, buf.freeze()));
        }
        buf.reserve(1024);
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Err(_) | Ok(Ok(0)) => return Ok((Detected::Opaque, buf.freeze())),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// Moves what `buf` has room for from `prefix` into it; whether there was
/// anything to move. An emptied prefix's buffer is freed at once, not when
/// the (possibly long-lived, idle) connection closes.
pub(crate) fn replay(prefix: &mut Bytes, buf: &mut ReadBuf<'_>) -> bool {
    if prefix.is_empty() {
        return false;
    }
    let n = prefix.len().min(buf.remaining());
    buf.put_slice(&prefix[..n]);
    prefix.advance(n);
    if prefix.is_empty() {
        *prefix = Bytes::new();
    }
    true
}

/// An I/O object that first replays bytes already read from it.
#[derive(Debug)]
pub struct PrefixedIo<I> {
    prefix: Bytes,
    io: I,
}

impl<I> PrefixedIo<I> {
    /// Replays `prefix`, then reads from `io`.
    pub fn new(prefix: Bytes, io: I) -> Self {
        Self { prefix, io }
    }

    /// The inner I/O object (any unreplayed prefix is lost).
    pub fn into_inner(self) -> I {
        self.io
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for PrefixedIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if replay(&mut self.prefix, buf) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for PrefixedIo<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;

/// Reads on until `prefix` holds the whole first TLS record (the
/// ClientHello, at most 16 KiB), so its server name and ALPN can be read
/// without consuming the connection. Gives back what it has on timeout or
/// end of stream.
pub async fn complete_tls_record<I: AsyncRead + Unpin>(
    io: &mut I,
    prefix: Bytes,
    timeout: Duration,
) -> std::io::Result<Bytes> {
    let mut buf = BytesMut::from(&prefix[..]);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let want = match buf.get(3..5) {
            Some(len) => 5 + usize::from(u16::from_be_bytes([len[0], len[1]])).min(16 * 1024 + 256),
            None => 5,
        };
        if buf.len() >= want {
            return Ok(buf.freeze());
        }
        buf.reserve(want - buf.len());
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Err(_) | Ok(Ok(0)) => return Ok(buf.freeze()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}
