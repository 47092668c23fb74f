//! Byte-for-byte forwarding between two duplex streams with half-close:
//! when one side finishes sending, the other side's write half is shut down
//! and the opposite direction keeps flowing until it finishes too.

use tokio::io::{AsyncRead, AsyncWrite};

/// Buffer size for each direction; large enough to keep a high-bandwidth
/// tunnel stream busy without per-connection memory getting out of hand.
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
pub async fn splice<A, B>(a: &mut A, b: &mut B) -> std::io::Result<Transferred>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (a_to_b, b_to_a) =
        tokio::io::copy_bidirectional_with_sizes(a, b, COPY_BUFFER_BYTES, COPY_BUFFER_BYTES)
            .await?;
    Ok(Transferred { a_to_b, b_to_a })
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
        let moved = task.await.expect("join").expect("splice");
        assert_eq!(
            moved,
            Transferred {
                a_to_b: 7,
                b_to_a: 8
            }
        );
    }
}
