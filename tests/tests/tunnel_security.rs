//! Who may use the tunnel, and what a gateway does with bad streams.

use std::time::Duration;

use strait_gateway::tunnel::frame;
use strait_gateway::Gateway;
use strait_proto::tunnel::v1::StreamHeader;
use strait_tests::*;

const WAIT: Duration = Duration::from_secs(20);

async fn hello_east(bed: &Testbed) -> Gateway {
    let ep = spawn_hello_endpoint("east", "hello-east-0")
        .await
        .expect("endpoint");
    let mut yaml = hello_cluster_yaml(&[("hello-east-0".into(), ep)], true);
    yaml.push_str("  - namespace: demo\n    name: secret\n    ports: [{ name: http, port: 8080 }]\n    endpoints: [{ name: s, ip: 127.0.0.1, ports: { http: 1 } }]\n");
    bed.write_cluster("east", &yaml);
    bed.start(bed.config("east", None, &[("west", None, None)]))
        .await
}

async fn failures(gw: &Gateway, side: &str, reason: &str) -> f64 {
    let m = metrics(gw).await;
    sample(
        &m,
        &format!("strait_tls_handshake_failures_total{{side=\"{side}\",reason=\"{reason}\"}}"),
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_from_another_root_is_refused_and_counted() {
    let bed = Testbed::new(&["west"]);
    let rogue = Testbed::new(&["east"]);
    let east = hello_east(&rogue).await;
    let west = bed
        .start(bed.config("west", None, &[("east", Some(east.tunnel_addr()), None)]))
        .await;
    eventually(WAIT, "refusal counted", || async {
        (failures(&west, "connect", "unknown_issuer").await >= 1.0).then_some(())
    })
    .await;
    // The handshake refusal is counted inside the TLS verifier, the failed
    // dial a moment later by the dialer.
    let m = eventually(WAIT, "failed dial counted", || async {
        let m = metrics(&west).await;
        let errors = sample(
            &m,
            "strait_peer_connects_total{peer=\"east\",result=\"error\"}",
        );
        (errors.unwrap_or(0.0) >= 1.0).then_some(m)
    })
    .await;
    assert!(west.imports().borrow().is_empty());
    assert_eq!(sample(&m, "strait_peer_up{peer=\"east\"}"), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_an_unexpected_identity_is_refused_and_counted() {
    let bed = Testbed::new(&["west", "east"]);
    let east = hello_east(&bed).await;
    let north_id = "spiffe://north.strait.local/ns/strait-system/sa/strait-gateway";
    let west = bed
        .start(bed.config(
            "west",
            None,
            &[("east", Some(east.tunnel_addr()), Some(north_id))],
        ))
        .await;
    eventually(WAIT, "refusal counted", || async {
        (failures(&west, "connect", "unexpected_identity").await >= 1.0).then_some(())
    })
    .await;
    assert!(west.imports().borrow().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unlinked_cluster_is_refused_by_the_listener() {
    let bed = Testbed::new(&["west", "east", "north"]);
    let east = hello_east(&bed).await;
    let north = bed
        .start(bed.config("north", None, &[("east", Some(east.tunnel_addr()), None)]))
        .await;
    eventually(WAIT, "east refuses north", || async {
        (failures(&east, "accept", "unexpected_identity").await >= 1.0).then_some(())
    })
    .await;
    assert!(north.imports().borrow().is_empty());
}

/// Opens a stream, sends `bytes`, and returns the reset code the gateway
/// answers with (None if it answered with data instead).
async fn send_raw(conn: &quinn::Connection, bytes: &[u8]) -> Result<Vec<u8>, u64> {
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    // The gateway may stop reading before all is written: that is a refusal too.
    let _ = send.write_all(bytes).await;
    let _ = send.finish();
    match tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1 << 20)).await {
        Ok(Ok(data)) => Ok(data),
        Ok(Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code)))) => {
            Err(code.into_inner())
        }
        Ok(Err(e)) => panic!("unexpected stream error: {e}"),
        Err(_) => panic!("gateway neither answered nor refused"),
    }
}

fn header(ns: &str, svc: &str, port: u32) -> StreamHeader {
    let mut h = frame::tcp_header(
        &strait_gateway::catalog::ServiceKey::new(ns, svc),
        1,
        "spiffe://west.strait.local/ns/demo/sa/client",
    );
    h.port = port;
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_streams_are_refused_cleanly_and_the_gateway_keeps_serving() {
    let bed = Testbed::new(&["west", "east"]);
    let east = hello_east(&bed).await;
    let (ep, tls) = bed.raw_client("west", "east");
    let conn = ep
        .connect(east.tunnel_addr(), tls)
        .await
        .expect("linked peer connects");

    const BAD: u64 = 0x10;
    const NOT_EXPORTED: u64 = 0x11;
    const CONNECT_FAILED: u64 = 0x13;
    // Oversized length prefix.
    let mut big = vec![0x13, 0x88]; // 5000
    big.extend(std::iter::repeat_n(0u8, 5000));
    assert_eq!(send_raw(&conn, &big).await, Err(BAD));
    // Not protobuf.
    assert_eq!(
        send_raw(&conn, &[0, 4, 0xff, 0xff, 0xff, 0xff]).await,
        Err(BAD)
    );
    // Truncated.
    assert_eq!(send_raw(&conn, &[0, 40, 1, 2]).await, Err(BAD));
    // A future version.
    let mut v2 = header("demo", "hello", 8080);
    v2.version = 2;
    let mut bytes = frame::encode(&v2).expect("encode").to_vec();
    assert_eq!(send_raw(&conn, &bytes).await, Err(BAD));
    // Not exported, exported but another port, unknown service.
    for h in [
        header("demo", "secret", 8080),
        header("demo", "hello", 9999),
        header("x", "y", 1),
    ] {
        bytes = frame::encode(&h).expect("encode").to_vec();
        assert_eq!(send_raw(&conn, &bytes).await, Err(NOT_EXPORTED), "{h:?}");
    }
    // The gateway still serves, on the same connection.
    bytes = frame::encode(&header("demo", "hello", 8080))
        .expect("encode")
        .to_vec();
    bytes.extend_from_slice(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n");
    let answer = send_raw(&conn, &bytes).await.expect("served");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.ends_with("hello from east/hello-east-0\n"), "{text}");

    let key = "strait_tunnel_streams_total{peer=\"west\",direction=\"inbound\",result=\"ok\"}";
    let m = eventually(WAIT, "stream counted", || async {
        let m = metrics(&east).await;
        (sample(&m, key) == Some(1.0)).then_some(m)
    })
    .await;
    let inbound = |result: &str| {
        sample(
            &m,
            &format!("strait_tunnel_streams_total{{peer=\"west\",direction=\"inbound\",result=\"{result}\"}}"),
        )
        .unwrap_or(0.0)
    };
    assert_eq!(inbound("header_too_large"), 1.0, "{m}");
    assert_eq!(inbound("bad_header"), 1.0);
    assert_eq!(inbound("header_read_error"), 1.0);
    assert_eq!(inbound("bad_version"), 1.0);
    assert_eq!(inbound("not_exported"), 3.0);
    assert_eq!(inbound("ok"), 1.0);
    let _ = CONNECT_FAILED;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_of_one_peer_keep_their_connections_side_by_side() {
    let bed = Testbed::new(&["west", "east"]);
    let east = hello_east(&bed).await;
    // Two replicas of west's gateway: one identity, two connections.
    let (a_ep, a_tls) = bed.raw_client("west", "east");
    let (b_ep, b_tls) = bed.raw_client("west", "east");
    let a = a_ep
        .connect(east.tunnel_addr(), a_tls)
        .await
        .expect("connects");
    let b = b_ep
        .connect(east.tunnel_addr(), b_tls)
        .await
        .expect("connects");
    let mut get = frame::encode(&header("demo", "hello", 8080))
        .expect("encode")
        .to_vec();
    get.extend_from_slice(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n");
    // Each is served, and neither closes the other, however long they last.
    for _ in 0..3 {
        for conn in [&a, &b] {
            let answer = send_raw(conn, &get).await.expect("served");
            assert!(String::from_utf8_lossy(&answer).ends_with("hello-east-0\n"));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(a.close_reason(), None);
        assert_eq!(b.close_reason(), None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_holds_a_bounded_number_of_connections() {
    let bed = Testbed::new(&["west", "east"]);
    let east = hello_east(&bed).await;
    let mut conns = Vec::new();
    for _ in 0..=strait_gateway::state::MAX_ACCEPTED_PER_PEER {
        let (ep, tls) = bed.raw_client("west", "east");
        let conn = ep.connect(east.tunnel_addr(), tls).await.expect("connects");
        // Served (a stream answered) before the next one comes.
        let _ = send_raw(&conn, &[0, 0]).await;
        conns.push((ep, conn));
    }
    // The oldest goes; the newest stay.
    let closed = tokio::time::timeout(Duration::from_secs(5), conns[0].1.closed())
        .await
        .expect("the oldest closed");
    assert!(
        format!("{closed}").contains("too many connections"),
        "{closed}"
    );
    assert!(conns[1..].iter().all(|(_, c)| c.close_reason().is_none()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_watches_again_on_the_same_connection_once_a_watch_ends() {
    const BUSY: u64 = 0x15;
    let bed = Testbed::new(&["west", "east"]);
    let east = hello_east(&bed).await;
    let (ep, tls) = bed.raw_client("west", "east");
    let conn = ep.connect(east.tunnel_addr(), tls).await.expect("connects");
    let watch = frame::encode(&frame::peering_header(
        "spiffe://west.strait.local/ns/strait-system/sa/strait-gateway",
    ))
    .expect("encode")
    .to_vec();
    // A watch whose session ends at once (no HTTP/2 at all), then another:
    // the first gives its place back when it ends.
    assert_ne!(send_raw(&conn, &watch).await, Err(BUSY));
    let again = eventually(WAIT, "a second watch taken", || async {
        (send_raw(&conn, &watch).await != Err(BUSY)).then_some(())
    });
    tokio::time::timeout(Duration::from_secs(5), again)
        .await
        .expect("a watch may start again on a live connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_refuses_connections_is_reported_to_the_peer() {
    let bed = Testbed::new(&["west", "east"]);
    // An endpoint on a port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead = closed.local_addr().expect("addr");
    drop(closed);
    bed.write_cluster("east", &hello_cluster_yaml(&[("gone".into(), dead)], true));
    let east = bed
        .start(bed.config("east", None, &[("west", None, None)]))
        .await;
    let (ep, tls) = bed.raw_client("west", "east");
    let conn = ep.connect(east.tunnel_addr(), tls).await.expect("connects");
    let bytes = frame::encode(&header("demo", "hello", 8080)).expect("encode");
    assert_eq!(send_raw(&conn, &bytes).await, Err(0x13));
}
