use std::time::Duration;

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};

use super::*;

const T: Duration = Duration::from_millis(300);

#[test]
fn classifies_prefixes() {
    use Detected::*;
    for (bytes, want) in [
        (
            &b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"[..],
            Verdict::Is(Http1),
        ),
        (b"POST /a?b HTTP/1.0\r\n", Verdict::Is(Http1)),
        (b"GET / HTTP/1.1\n", Verdict::Is(Http1)),
        (H2_PREFACE, Verdict::Is(Http2)),
        (b"PRI * HTTP/2.0\r\n", Verdict::NeedMore),
        (b"PRI * HTTP/2.0\r\nXX", Verdict::Is(Opaque)),
        (b"G", Verdict::NeedMore),
        (b"GE", Verdict::NeedMore),
        (b"GET", Verdict::NeedMore),
        (b"GET /", Verdict::NeedMore),
        (b"GETX / HTTP/1.1\r\n", Verdict::Is(Opaque)),
        (b"GET / SMTP\r\n", Verdict::Is(Opaque)),
        (b"\x16\x03\x01\x02\x00\x01\x00", Verdict::Is(Tls)),
        (b"\x16\x03", Verdict::NeedMore),
        (b"\x16\x03\x01\x02\x00\x02", Verdict::Is(Opaque)),
        (b"\x16\x01", Verdict::Is(Opaque)),
        (b"SSH-2.0-OpenSSH\r\n", Verdict::Is(Opaque)),
        (b"\x00\x00\x00", Verdict::Is(Opaque)),
        (b"", Verdict::NeedMore),
    ] {
        assert_eq!(
            classify(bytes),
            want,
            "{:?}",
            String::from_utf8_lossy(bytes)
        );
    }
}

#[tokio::test]
async fn a_client_sending_one_byte_at_a_time_is_detected() {
    let (mut client, mut server) = tokio::io::duplex(64);
    let req = b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n";
    let writer = tokio::spawn(async move {
        for b in req {
            client.write_all(&[*b]).await.expect("write");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        client
    });
    let (d, prefix) = detect(&mut server, Duration::from_secs(5))
        .await
        .expect("detect");
    assert_eq!(d, Detected::Http1);
    assert!(req.starts_with(&prefix));
    drop(writer.await.expect("join"));
}

#[tokio::test]
async fn a_partial_preface_then_silence_is_opaque_and_kept() {
    let (mut client, mut server) = tokio::io::duplex(64);
    client.write_all(&H2_PREFACE[..10]).await.expect("write");
    let (d, prefix) = detect(&mut server, T).await.expect("detect");
    assert_eq!(d, Detected::Opaque);
    assert_eq!(&prefix[..], &H2_PREFACE[..10], "no byte lost");
}

#[tokio::test]
async fn a_server_first_protocol_times_out_as_opaque() {
    let (_client, mut server) = tokio::io::duplex(64);
    let (d, prefix) = detect(&mut server, T).await.expect("detect");
    assert_eq!(d, Detected::Opaque);
    assert!(prefix.is_empty());
}

#[tokio::test]
async fn a_tls_client_hello_is_replayed_untouched() {
    let hello: Vec<u8> = [0x16, 0x03, 0x01, 0x00, 0x05, 0x01, 0xaa, 0xbb, 0xcc, 0xdd].to_vec();
    let (mut client, server) = tokio::io::duplex(64);
    client.write_all(&hello).await.expect("write");
    client.shutdown().await.expect("eof");
    let mut server = server;
    let (d, prefix) = detect(&mut server, T).await.expect("detect");
    assert_eq!(d, Detected::Tls);
    let mut replay = PrefixedIo::new(prefix, server);
    let mut all = Vec::new();
    replay.read_to_end(&mut all).await.expect("read");
    assert_eq!(all, hello, "byte for byte");
}

#[tokio::test]
async fn an_endless_request_line_gives_up_at_the_limit() {
    let (mut client, mut server) = tokio::io::duplex(MAX_DETECT_BYTES * 2);
    let mut line = b"GET /".to_vec();
    line.extend(std::iter::repeat_n(b'a', MAX_DETECT_BYTES + 100));
    client.write_all(&line).await.expect("write");
    let (d, prefix) = detect(&mut server, Duration::from_secs(5))
        .await
        .expect("detect");
    assert_eq!(d, Detected::Opaque);
    assert!(prefix.len() >= MAX_DETECT_BYTES);
}

/// A reader that hands out its input in the given pieces, one per read,
/// then end of stream: a client whose bytes arrive in any segmentation.
struct Pieces(std::collections::VecDeque<Vec<u8>>);

impl AsyncRead for Pieces {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(mut piece) = self.0.pop_front() {
            let n = piece.len().min(buf.remaining());
            buf.put_slice(&piece[..n]);
            if n < piece.len() {
                self.0.push_front(piece.split_off(n));
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Cuts `bytes` into pieces at the given lengths (cycled; never empty).
fn cut(bytes: &[u8], lengths: &[usize]) -> std::collections::VecDeque<Vec<u8>> {
    let mut pieces = std::collections::VecDeque::new();
    let mut rest = bytes;
    for &n in lengths.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (piece, tail) = rest.split_at(n.clamp(1, rest.len()));
        pieces.push_back(piece.to_vec());
        rest = tail;
    }
    pieces
}

/// First bytes worth classifying: what clients really send, their
/// prefixes and near misses, and noise.
fn first_bytes() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
    use proptest::prelude::*;
    let request = (
        proptest::sample::select(METHODS.to_vec()),
        "/[!-~]{0,40}",
        proptest::sample::select(vec!["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "SMTP", ""]),
        proptest::sample::select(vec!["\r\n", "\n", ""]),
        proptest::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(m, target, version, eol, tail)| {
            let mut b = m.to_vec();
            b.push(b' ');
            b.extend_from_slice(target.as_bytes());
            b.push(b' ');
            b.extend_from_slice(version.as_bytes());
            b.extend_from_slice(eol.as_bytes());
            b.extend(tail);
            b
        });
    let preface = (
        0..=H2_PREFACE.len(),
        proptest::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(n, tail)| {
            let mut b = H2_PREFACE[..n].to_vec();
            b.extend(tail);
            b
        });
    let tls = (
        any::<u8>(),
        any::<u8>(),
        proptest::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(minor, kind, tail)| {
            let mut b = vec![0x16, 0x03, minor, 0x00, 0x40, kind];
            b.extend(tail);
            b
        });
    prop_oneof![
        request,
        preface,
        tls,
        proptest::collection::vec(any::<u8>(), 0..256),
    ]
}

proptest::proptest! {
    /// More bytes never change a decision, so a client's segmentation
    /// (one byte at a time, or all at once) cannot change what it is
    /// taken for.
    #[test]
    fn a_decision_stands_whatever_follows(bytes in first_bytes()) {
        let mut decided = None;
        for n in 0..=bytes.len() {
            match (classify(&bytes[..n]), decided) {
                (Verdict::Is(d), None) => decided = Some(d),
                (Verdict::Is(d), Some(first)) => proptest::prop_assert_eq!(d, first, "at {} bytes", n),
                (Verdict::NeedMore, Some(first)) => {
                    proptest::prop_assert!(false, "{:?} at fewer bytes, undecided at {}", first, n)
                }
                (Verdict::NeedMore, None) => {}
            }
        }
    }

    /// However the bytes arrive, detection reaches the verdict of the whole
    /// (opaque when the whole leaves it open), and the connection replays
    /// every byte, in order, before the rest of the stream.
    #[test]
    fn detection_keeps_every_byte_however_it_arrives(
        bytes in first_bytes(),
        lengths in proptest::collection::vec(1usize..40, 1..8),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        let (detected, all) = runtime.block_on(async {
            let mut io = Pieces(cut(&bytes, &lengths));
            let (d, prefix) = detect(&mut io, T).await.expect("detect");
            let mut all = Vec::new();
            PrefixedIo::new(prefix, io).read_to_end(&mut all).await.expect("read");
            (d, all)
        });
        let want = match classify(&bytes) {
            Verdict::Is(d) => d,
            Verdict::NeedMore => Detected::Opaque,
        };
        proptest::prop_assert_eq!(detected, want);
        proptest::prop_assert_eq!(all, bytes);
    }
}
