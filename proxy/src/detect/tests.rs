use std::time::Duration;

use tokio::io::AsyncWriteExt;

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
