//! Byte-for-byte forwarding between two duplex streams with half-close:
//! when one side finishes sending, the other side's write half is shut down
//! and the opposite direction keeps flowing until it finishes too.
//!
//! A direction holds a buffer only while it has bytes to move. Opaque
//! connections are often long-lived and mostly idle (database pools, message
//! brokers), and a buffer per direction kept for a connection's whole life
//! (tokio's `copy_bidirectional` allocates both up front) would make each
//! cost its buffers even while nothing flows. Here a direction's buffer is
//! taken when its side becomes readable and given back as soon as a read
//! finds nothing more and everything read has been written: an idle spliced
//! connection holds its two sockets and a few words of state.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};

/// A direction's first buffer, and its buffer while reads come in small.
pub const SMALL_BUFFER_BYTES: usize = 16 * 1024;
/// A direction's buffer once a read has filled a small one: large enough to
/// keep a high-bandwidth stream busy with few system calls.
pub const COPY_BUFFER_BYTES: usize = 64 * 1024;

/// Bytes moved by [`splice`], per direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    /// Bytes read from `a` and written to `b`.
    pub a_to_b: u64,
    /// Bytes read from `b` and written to `a`.
    pub b_to_a: u64,
}

/// Copies `a` to `b` and `b` to `a` until both directions reach end of
/// stream, propagating each end of stream as a write shutdown (half-close).
/// The first error of either direction ends both. Gives the bytes moved
/// either way, the ones moved before an error too (a reset connection's
/// bytes still count), and the error if one ended it.
pub async fn splice<A, B>(a: &mut A, b: &mut B) -> (Transferred, io::Result<()>)
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    Splice {
        a,
        b,
        a_to_b: Direction::default(),
        b_to_a: Direction::default(),
    }
    .await
}

/// The future of [`splice`].
struct Splice<'a, A: ?Sized, B: ?Sized> {
    a: &'a mut A,
    b: &'a mut B,
    a_to_b: Direction,
    b_to_a: Direction,
}

impl<A: ?Sized, B: ?Sized> Splice<'_, A, B> {
    /// Buffer bytes held by both directions (allocated, in use or not).
    #[cfg(test)]
    fn held(&self) -> usize {
        self.a_to_b.held() + self.b_to_a.held()
    }
}

impl<A, B> Future for Splice<'_, A, B>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    type Output = (Transferred, io::Result<()>);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let a_to_b = this.a_to_b.poll_copy(cx, &mut *this.a, &mut *this.b);
        let b_to_a = match a_to_b {
            Poll::Ready(Err(_)) => Poll::Pending,
            _ => this.b_to_a.poll_copy(cx, &mut *this.b, &mut *this.a),
        };
        let moved = Transferred {
            a_to_b: this.a_to_b.moved,
            b_to_a: this.b_to_a.moved,
        };
        match (a_to_b, b_to_a) {
            (Poll::Ready(Err(e)), _) | (_, Poll::Ready(Err(e))) => Poll::Ready((moved, Err(e))),
            (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => Poll::Ready((moved, Ok(()))),
            _ => Poll::Pending,
        }
    }
}

/// One direction: reads from one side, writes to the other.
#[derive(Debug, Default)]
struct Direction {
    /// Read and not yet written; `None` while nothing is in flight.
    buf: Option<BytesMut>,
    /// The last read filled its buffer: the next buffer is a large one.
    bulk: bool,
    /// Written since the last flush.
    unflushed: bool,
    /// The reader reached end of stream.
    eof: bool,
    /// The writer has been shut down: this direction is finished.
    done: bool,
    /// Bytes written so far.
    moved: u64,
}

impl Direction {
    #[cfg(test)]
    fn held(&self) -> usize {
        self.buf.as_ref().map_or(0, BytesMut::capacity)
    }

    /// Moves what `reader` has to `writer` until one of them is not ready,
    /// or, at end of stream, shuts `writer` down; ready once finished.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            // Everything read goes out before the next read.
            if let Some(buf) = self.buf.as_mut().filter(|b| !b.is_empty()) {
                let n = ready!(Pin::new(&mut *writer).poll_write(cx, buf))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                bytes::Buf::advance(buf, n);
                self.moved += n as u64;
                self.unflushed = true;
                continue;
            }
            if self.eof {
                self.buf = None;
                if self.unflushed {
                    ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                    self.unflushed = false;
                }
                ready!(Pin::new(&mut *writer).poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            let size = if self.bulk {
                COPY_BUFFER_BYTES
            } else {
                SMALL_BUFFER_BYTES
            };
            let buf = self
                .buf
                .get_or_insert_with(|| BytesMut::with_capacity(size));
            // Empty: make the whole allocation writable again.
            buf.reserve(size);
            let room = buf.capacity();
            match tokio_util::io::poll_read_buf(Pin::new(&mut *reader), cx, buf) {
                Poll::Ready(Ok(0)) => self.eof = true,
                Poll::Ready(Ok(n)) => self.bulk = n == room,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Nothing in flight: the buffer goes back until the
                    // reader has more.
                    self.buf = None;
                    if self.unflushed {
                        ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn half_close_lets_the_other_direction_finish() {
        let (mut client, mut proxy_a) = tokio::io::duplex(1024);
        let (mut proxy_b, mut server) = tokio::io::duplex(1024);
        let task = tokio::spawn(async move { splice(&mut proxy_a, &mut proxy_b).await });

        client.write_all(b"request").await.expect("write");
        client.shutdown().await.expect("shutdown");
        let mut got = Vec::new();
        server
            .read_to_end(&mut got)
            .await
            .expect("server reads to EOF");
        assert_eq!(got, b"request");
        // The server answers after the client's half-close.
        server.write_all(b"response").await.expect("write");
        server.shutdown().await.expect("shutdown");
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.expect("client reads");
        assert_eq!(back, b"response");
        let (moved, result) = task.await.expect("join");
        result.expect("splice");
        assert_eq!(
            moved,
            Transferred {
                a_to_b: 7,
                b_to_a: 8
            }
        );
    }

    /// Deterministic bytes, different per direction.
    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Megabytes both ways at once through pipes far smaller than a
    /// buffer (writes are often not ready, reads often fill a buffer): every
    /// byte arrives, in order, and the counts match.
    #[tokio::test]
    async fn bulk_both_ways_arrives_intact() {
        const LEN: usize = 3 * 1024 * 1024 + 17;
        let (client, mut proxy_a) = tokio::io::duplex(7 * 1024);
        let (mut proxy_b, server) = tokio::io::duplex(100 * 1024);
        let task = tokio::spawn(async move { splice(&mut proxy_a, &mut proxy_b).await });
        let send_and_read = |io: tokio::io::DuplexStream, seed: u8| async move {
            let (mut rd, mut wr) = tokio::io::split(io);
            let send = async {
                wr.write_all(&pattern(LEN, seed)).await.expect("write");
                wr.shutdown().await.expect("shutdown");
            };
            let mut got = Vec::new();
            let read = rd.read_to_end(&mut got);
            let ((), n) = tokio::join!(send, read);
            n.expect("read");
            got
        };
        // Each side sends its pattern and reads the other's.
        let (at_client, at_server) =
            tokio::join!(send_and_read(client, 1), send_and_read(server, 2));
        assert!(at_server == pattern(LEN, 1), "client to server corrupted");
        assert!(at_client == pattern(LEN, 2), "server to client corrupted");
        let (moved, result) = task.await.expect("join");
        result.expect("splice");
        assert_eq!(
            moved,
            Transferred {
                a_to_b: LEN as u64,
                b_to_a: LEN as u64
            }
        );
    }

    /// An idle connection holds no buffer: one is taken for bytes in
    /// flight (and kept while the writer is not ready) and given back once
    /// they are written and the reader has nothing more.
    #[tokio::test]
    async fn an_idle_connection_holds_no_buffer() {
        let (mut client, mut proxy_a) = tokio::io::duplex(64);
        let (mut proxy_b, mut server) = tokio::io::duplex(64);
        let mut splice = Splice {
            a: &mut proxy_a,
            b: &mut proxy_b,
            a_to_b: Direction::default(),
            b_to_a: Direction::default(),
        };
        let mut splice = Pin::new(&mut splice);
        assert!(futures::poll!(splice.as_mut()).is_pending());
        assert_eq!(splice.held(), 0);

        // More than the server-side pipe takes: the rest waits in a buffer.
        client.write_all(&[7u8; 60]).await.expect("write");
        assert!(futures::poll!(splice.as_mut()).is_pending());
        client.write_all(&[7u8; 60]).await.expect("write");
        assert!(futures::poll!(splice.as_mut()).is_pending());
        let held = splice.held();
        assert!(held > 0 && held <= SMALL_BUFFER_BYTES, "{held}");

        // Drained by the server, written through, and nothing more to read:
        // the buffer is given back.
        let mut got = vec![0u8; 120];
        let mut read = 0;
        while read < got.len() {
            assert!(futures::poll!(splice.as_mut()).is_pending());
            read += server.read(&mut got[read..]).await.expect("read");
        }
        assert!(futures::poll!(splice.as_mut()).is_pending());
        assert_eq!(splice.held(), 0);
        assert_eq!(got, vec![7u8; 120]);
    }

    /// A stream whose reads fail once its peer has gone: an application
    /// that resets its connection.
    struct ResetAfter(tokio::io::DuplexStream);

    impl AsyncRead for ResetAfter {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let before = buf.filled().len();
            ready!(Pin::new(&mut self.get_mut().0).poll_read(cx, buf))?;
            if buf.filled().len() == before {
                return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
            }
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for ResetAfter {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
        }
        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().0).poll_flush(cx)
        }
        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
        }
    }

    /// Bytes moved before a reset are still reported, with the error.
    #[tokio::test]
    async fn bytes_moved_before_an_error_count() {
        let (mut client, proxy_a) = tokio::io::duplex(1024);
        let (mut proxy_b, mut server) = tokio::io::duplex(1024);
        let mut proxy_a = ResetAfter(proxy_a);
        let task = tokio::spawn(async move { splice(&mut proxy_a, &mut proxy_b).await });
        client.write_all(b"hello").await.expect("write");
        let mut got = [0u8; 5];
        server.read_exact(&mut got).await.expect("read");
        server.write_all(b"bye").await.expect("write");
        let mut back = [0u8; 3];
        client.read_exact(&mut back).await.expect("read");
        drop(client);
        let (moved, result) = task.await.expect("join");
        assert_eq!(
            result.expect_err("reset").kind(),
            io::ErrorKind::ConnectionReset
        );
        assert_eq!(
            moved,
            Transferred {
                a_to_b: 5,
                b_to_a: 3
            }
        );
    }
}
