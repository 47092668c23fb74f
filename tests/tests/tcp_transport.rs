//! The TLS-over-TCP tunnel transport (for networks that block UDP): the
//! same imports, identities and traffic as QUIC, over one mTLS TCP
//! connection per stream; `auto` falls back to it when QUIC does not get
//! through.

use std::net::SocketAddr;
use std::time::Duration;

use strait_gateway::config::Transport;
use strait_gateway::Gateway;
use strait_tests::*;
use tokio::net::{TcpListener, TcpStream};

const HELLO: &str = "hello.demo.svc.clusterset.local";
const WAIT: Duration = Duration::from_secs(20);

/// East exports `hello`; west links to `address` with `transport`.
async fn linked(
    transport: Transport,
    address: impl FnOnce(&Gateway) -> SocketAddr,
    identity: Option<&str>,
) -> (Testbed, Gateway, Gateway) {
    let bed = Testbed::new(&["west", "east"]);
    let east = bed.start_hello_east().await;
    let mut config = bed.config("west", None, &[("east", Some(address(&east)), identity)]);
    config.links[0].transport = transport;
    let west = bed.start(config).await;
    (bed, west, east)
}

async fn call_hello(west: &Gateway) -> String {
    let vip = import_vip(west, HELLO).await;
    assert_eq!(dig(west.dns_addr(), HELLO, "A", false), [vip.to_string()]);
    eventually(WAIT, "a response through the tunnel", || async {
        http_get(SocketAddr::new(vip, 8080), "hello").await.ok()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_links_carry_the_catalog_and_the_traffic() {
    let (_bed, west, east) = linked(Transport::Tcp, Gateway::tunnel_addr, None).await;
    for _ in 0..5 {
        let body = call_hello(&west).await;
        assert!(body.contains("hello from east/hello-0"), "{body}");
    }
    let peer = west
        .peers()
        .into_iter()
        .find(|p| p.name == "east")
        .expect("east");
    assert!(peer.connected);
    assert_eq!(peer.transport, Some("tcp"));
    // The round trip is measured from the streams' TCP connects.
    eventually(WAIT, "an RTT for the TCP tunnel", || async {
        west.peers()
            .into_iter()
            .find(|p| p.name == "east")
            .and_then(|p| p.rtt_ms)
            .filter(|ms| *ms > 0.0 && *ms < 1000.0)
    })
    .await;
    eventually(WAIT, "five streams counted on east", || async {
        let m = metrics(&east).await;
        let ok = "strait_tunnel_streams_total{peer=\"west\",direction=\"inbound\",result=\"ok\"}";
        (sample(&m, ok).unwrap_or(0.0) >= 5.0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_refuses_a_peer_with_the_wrong_identity() {
    let wrong = "spiffe://north.strait.local/ns/strait-system/sa/strait-gateway";
    let (_bed, west, _east) = linked(Transport::Tcp, Gateway::tunnel_addr, Some(wrong)).await;
    eventually(WAIT, "the dialer refuses east's identity", || async {
        let m = metrics(&west).await;
        m.lines()
            .any(|l| {
                l.starts_with("strait_tls_handshake_failures_total")
                    && l.contains("connect")
                    && l.contains("unexpected_identity")
            })
            .then_some(())
    })
    .await;
    let peer = eventually(WAIT, "the refusal recorded", || async {
        west.peers().into_iter().find(|p| {
            p.name == "east" && p.last_error.as_deref().is_some_and(|e| e.contains("tcp"))
        })
    })
    .await;
    assert!(!peer.connected);
}

/// A plain TCP relay to `to`: the only way to east's tunnel port from a
/// port where nothing answers UDP (as when a firewall drops UDP).
async fn tcp_only_relay(to: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_falls_back_to_tcp_when_udp_does_not_get_through() {
    let (bed, west, east) = linked(Transport::Auto, Gateway::tunnel_addr, None).await;
    // With UDP open, auto uses QUIC.
    let body = call_hello(&west).await;
    assert!(body.contains("hello from east"), "{body}");
    let quic = west
        .peers()
        .into_iter()
        .find(|p| p.name == "east")
        .expect("east");
    assert_eq!(quic.transport, Some("quic"));
    drop(west);

    // Through a TCP-only path, auto settles on TLS over TCP.
    let relay_addr = tcp_only_relay(east.tunnel_addr()).await;
    let mut config = bed.config("west", None, &[("east", Some(relay_addr), None)]);
    config.links[0].transport = Transport::Auto;
    let west = bed.start(config).await;
    let body = call_hello(&west).await;
    assert!(body.contains("hello from east"), "{body}");
    let peer = west
        .peers()
        .into_iter()
        .find(|p| p.name == "east")
        .expect("east");
    assert_eq!(peer.transport, Some("tcp"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_holds_at_most_two_tcp_catalog_watches() {
    use strait_gateway::tunnel::frame;
    use strait_gateway::tunnel::io::PeerInfo;
    use strait_gateway::tunnel::tcp::TcpDialer;
    // East lets west in; nothing dials yet.
    let bed = Testbed::new(&["west", "east"]);
    let east = bed
        .start(bed.config("east", None, &[("west", None, None)]))
        .await;
    let (_ep, client_tls) = bed.raw_client("west", "east");
    let dialer = TcpDialer::new(
        vec![east.tunnel_addr().to_string()],
        std::sync::Arc::new(client_tls),
        PeerInfo {
            name: "east".into(),
            identity: String::new(),
        },
    );
    let west_id = "spiffe://west.strait.local/ns/strait-system/sa/strait-gateway";
    let header = frame::encode(&frame::peering_header(west_id)).expect("header");
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(dialer.open(&header).await.expect("open"));
    }
    // Both taken before the third comes, so the third is the one refused
    // (east serves each header in a task of its own, in any order).
    eventually(WAIT, "two watches accepted", || async {
        (east.tcp_watches("west") == 2).then_some(())
    })
    .await;
    held.push(dialer.open(&header).await.expect("open"));
    let busy = "strait_tunnel_streams_total{peer=\"west\",direction=\"inbound\",result=\"busy\"}";
    eventually(WAIT, "the third watch refused", || async {
        let m = metrics(&east).await;
        (sample(&m, busy) == Some(1.0)).then_some(())
    })
    .await;
    assert_eq!(east.tcp_watches("west"), 2);
    // Closing one frees its slot (the refused third goes too).
    drop(held.pop());
    drop(held.pop());
    // East sees the close when its peering server reads the EOF.
    eventually(WAIT, "a watch slot freed", || async {
        (east.tcp_watches("west") == 1).then_some(())
    })
    .await;
    held.push(dialer.open(&header).await.expect("open"));
    eventually(WAIT, "the new watch accepted", || async {
        (east.tcp_watches("west") == 2).then_some(())
    })
    .await;
    let m = metrics(&east).await;
    assert_eq!(sample(&m, busy), Some(1.0), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_streams_past_the_limit_are_refused() {
    let bed = Testbed::new(&["west", "east"]);
    let mut config = bed
        .hello_east_config_on(std::net::Ipv4Addr::LOCALHOST.into())
        .await;
    config.max_connections = 1;
    let east = bed.start(config).await;
    let mut config = bed.config("west", None, &[("east", Some(east.tunnel_addr()), None)]);
    config.links[0].transport = Transport::Tcp;
    let west = bed.start(config).await;
    let body = call_hello(&west).await;
    assert!(body.contains("hello from east/hello-0"), "{body}");
    let vip = import_vip(&west, HELLO).await;
    // The catalog watches' connections take no slot; a held stream's does.
    let held = hold(vip, &east, "west", "inbound").await;
    refused_while_held(vip, HELLO, held, &east).await;
}
