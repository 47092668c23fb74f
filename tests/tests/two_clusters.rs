//! West imports what east exports, end to end over real sockets on
//! loopback: DNS, egress listeners, the QUIC tunnel, endpoints.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use strait_gateway::Gateway;
use strait_tests::*;

const HELLO: &str = "hello.demo.svc.clusterset.local";
const WAIT: Duration = Duration::from_secs(20);

struct Linked {
    bed: Testbed,
    west: Gateway,
    east: Gateway,
    endpoints: Vec<(String, SocketAddr)>,
}

async fn linked() -> Linked {
    linked_with(20_000, 20_000).await
}

/// [`linked`], with each gateway's `maxConnections`.
async fn linked_with(west_max: u32, east_max: u32) -> Linked {
    let bed = Testbed::new(&["west", "east"]);
    let mut endpoints = Vec::new();
    for name in ["hello-east-0", "hello-east-1"] {
        endpoints.push((
            name.to_string(),
            spawn_hello_endpoint("east", name).await.expect("endpoint"),
        ));
    }
    bed.write_cluster("east", &hello_cluster_yaml(&endpoints, true));
    let mut config = bed.config("east", None, &[("west", None, None)]);
    config.max_connections = east_max;
    let east = bed.start(config).await;
    let mut config = bed.config("west", None, &[("east", Some(east.tunnel_addr()), None)]);
    config.max_connections = west_max;
    let west = bed.start(config).await;
    Linked {
        bed,
        west,
        east,
        endpoints,
    }
}

async fn vip_of(west: &Gateway) -> IpAddr {
    import_vip(west, HELLO).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_answers_over_udp_and_tcp() {
    let l = linked().await;
    let vip = vip_of(&l.west).await;
    let dns = l.west.dns_addr();
    assert_eq!(dig(dns, HELLO, "A", false), vec![vip.to_string()]);
    assert_eq!(dig(dns, HELLO, "A", true), vec![vip.to_string()]);
    assert_eq!(
        dig(dns, &format!("_http._tcp.{HELLO}"), "SRV", false),
        vec![format!("0 100 8080 {HELLO}.")]
    );
    assert_eq!(
        dig(dns, "dns-version.clusterset.local", "TXT", true),
        vec!["\"1.0.0\""]
    );
    let soa = dig_full(dns, "clusterset.local", "SOA", false);
    assert!(
        soa.contains("status: NOERROR") && soa.contains("IN\tSOA"),
        "{soa}"
    );
    let nx = dig_full(dns, "nope.demo.svc.clusterset.local", "A", false);
    assert!(
        nx.contains("status: NXDOMAIN") && nx.contains("AUTHORITY: 1"),
        "{nx}"
    );
    let nodata = dig_full(dns, HELLO, "MX", true);
    assert!(
        nodata.contains("status: NOERROR")
            && nodata.contains("ANSWER: 0")
            && nodata.contains("AUTHORITY: 1"),
        "{nodata}"
    );
    // East's own DNS imports nothing: west exports nothing.
    let east_nx = dig_full(l.east.dns_addr(), HELLO, "A", false);
    assert!(east_nx.contains("status: NXDOMAIN"), "{east_nx}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_reach_both_endpoints_through_the_tunnel() {
    let l = linked().await;
    let vip = vip_of(&l.west).await;
    let resolved = resolve_a(l.west.dns_addr(), HELLO).await.expect("resolves");
    assert_eq!(IpAddr::V4(resolved), vip);
    let mut served: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..10 {
        let body = http_get((vip, 8080).into(), HELLO)
            .await
            .expect("request through the tunnel");
        *served.entry(body).or_default() += 1;
    }
    assert_eq!(served.len(), 2, "both endpoints get traffic: {served:?}");
    for (name, _) in &l.endpoints {
        assert!(
            served.contains_key(&format!("hello from east/{name}")),
            "{served:?}"
        );
    }
    // A stream is counted once both directions have closed, a moment after
    // the client has its answer.
    let ok = "strait_tunnel_streams_total{peer=\"east\",direction=\"outbound\",result=\"ok\"}";
    let west = eventually(WAIT, "streams counted", || async {
        let m = metrics(&l.west).await;
        (sample(&m, ok) == Some(10.0)).then_some(m)
    })
    .await;
    assert_eq!(
        sample(&west, "strait_peer_up{peer=\"east\"}"),
        Some(1.0),
        "{west}"
    );
    assert_eq!(sample(&west, "strait_imports{peer=\"east\"}"), Some(1.0));
    assert_eq!(
        sample(
            &west,
            "strait_tunnel_streams_total{peer=\"east\",direction=\"outbound\",result=\"ok\"}"
        ),
        Some(10.0)
    );
    assert!(
        sample(
            &west,
            "strait_tunnel_bytes_total{peer=\"east\",direction=\"sent\"}"
        )
        .unwrap_or(0.0)
            > 0.0
    );
    assert!(west.contains("strait_peer_rtt_seconds_count{peer=\"east\"}"));
    let inbound_ok =
        "strait_tunnel_streams_total{peer=\"west\",direction=\"inbound\",result=\"ok\"}";
    let east = eventually(WAIT, "streams counted", || async {
        let m = metrics(&l.east).await;
        (sample(&m, inbound_ok) == Some(10.0)).then_some(m)
    })
    .await;
    assert_eq!(sample(&east, "strait_exports"), Some(1.0));
    assert_eq!(
        sample(
            &east,
            "strait_tunnel_streams_total{peer=\"west\",direction=\"inbound\",result=\"ok\"}"
        ),
        Some(10.0),
        "{east}"
    );
    let imports: serde_json::Value = serde_json::from_str(
        &http_get_path(l.west.admin_addr(), "admin", "/api/imports")
            .await
            .expect("api"),
    )
    .expect("json");
    assert_eq!(imports[0]["dnsName"], HELLO);
    assert_eq!(imports[0]["vip"], vip.to_string());
    assert_eq!(imports[0]["peers"][0], "east");
    let peers: serde_json::Value = serde_json::from_str(
        &http_get_path(l.west.admin_addr(), "admin", "/api/peers")
            .await
            .expect("api"),
    )
    .expect("json");
    assert_eq!(peers[0]["name"], "east");
    assert_eq!(peers[0]["connected"], true);
    assert_eq!(peers[0]["imports"], 1);
    let ready = http_get_path(l.west.admin_addr(), "admin", "/ready")
        .await
        .expect("ready");
    assert_eq!(ready, "ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unexporting_removes_the_import_its_name_and_its_listener() {
    let l = linked().await;
    let vip = vip_of(&l.west).await;
    http_get((vip, 8080).into(), HELLO)
        .await
        .expect("works while exported");
    l.bed
        .write_cluster("east", &hello_cluster_yaml(&l.endpoints, false));
    eventually(WAIT, "import removed", || async {
        l.west.egress_synced().borrow().is_empty().then_some(())
    })
    .await;
    let nx = dig_full(l.west.dns_addr(), HELLO, "A", false);
    assert!(nx.contains("status: NXDOMAIN"), "{nx}");
    let refused = tokio::net::TcpStream::connect((vip, 8080)).await;
    assert!(refused.is_err(), "the egress listener is gone");
    // Exporting again brings it back on the same address.
    l.bed
        .write_cluster("east", &hello_cluster_yaml(&l.endpoints, true));
    assert_eq!(vip_of(&l.west).await, vip);
    http_get((vip, 8080).into(), HELLO)
        .await
        .expect("works again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn west_reconnects_after_east_restarts() {
    let l = linked().await;
    let vip = vip_of(&l.west).await;
    http_get((vip, 8080).into(), HELLO)
        .await
        .expect("works before");
    let tunnel = l.east.tunnel_addr();
    drop(l.east); // killed: no goodbye
    eventually(WAIT, "west notices east is gone", || async {
        l.west
            .peers()
            .iter()
            .any(|p| p.name == "east" && !p.connected)
            .then_some(())
    })
    .await;
    assert!(
        http_get((vip, 8080).into(), HELLO).await.is_err(),
        "no tunnel, no traffic"
    );
    // Imports survive the grace period, so the name and address stay.
    assert_eq!(
        dig(l.west.dns_addr(), HELLO, "A", false),
        vec![vip.to_string()]
    );
    // A restarted process binds the same port once the old socket is gone.
    let east = eventually(WAIT, "east restarts on its old port", || async {
        Gateway::start(l.bed.config("east", Some(tunnel), &[("west", None, None)]))
            .await
            .ok()
    })
    .await;
    let body = eventually(WAIT, "traffic resumes", || async {
        http_get((vip, 8080).into(), HELLO).await.ok()
    })
    .await;
    assert!(body.starts_with("hello from east/"), "{body}");
    let m = metrics(&l.west).await;
    assert!(
        sample(
            &m,
            "strait_peer_connects_total{peer=\"east\",result=\"ok\"}"
        )
        .unwrap_or(0.0)
            >= 2.0,
        "{m}"
    );
    drop(east);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_gone_longer_than_the_grace_period_loses_its_imports() {
    let bed = Testbed::new(&["west", "east"]);
    bed.set_grace_period(1);
    let ep = spawn_hello_endpoint("east", "hello-east-0")
        .await
        .expect("endpoint");
    bed.write_cluster(
        "east",
        &hello_cluster_yaml(&[("hello-east-0".into(), ep)], true),
    );
    let east = bed
        .start(bed.config("east", None, &[("west", None, None)]))
        .await;
    let west = bed
        .start(bed.config("west", None, &[("east", Some(east.tunnel_addr()), None)]))
        .await;
    let vip = vip_of(&west).await;
    drop(east);
    eventually(WAIT, "imports forgotten after the grace period", || async {
        west.egress_synced().borrow().is_empty().then_some(())
    })
    .await;
    let nx = dig_full(west.dns_addr(), HELLO, "A", false);
    assert!(nx.contains("status: NXDOMAIN"), "{nx}");
    assert!(tokio::net::TcpStream::connect((vip, 8080)).await.is_err());
    let m = metrics(&west).await;
    assert_eq!(
        sample(&m, "strait_imports{peer=\"east\"}"),
        Some(0.0),
        "{m}"
    );
}

/// Gateways listening on `[::]`, as in an IPv6-only or dual-stack cluster
/// (chart value `ipv6`): linked over IPv6, and answering DNS (UDP and TCP),
/// admin and tunnel connections over both families.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_on_both_families_link_over_ipv6() {
    use std::net::{Ipv4Addr, Ipv6Addr};
    let bed = Testbed::new(&["west", "east"]);
    let any6 = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
    let east = bed.start_hello_east_on(any6).await;
    assert_eq!(east.tunnel_addr().ip(), any6);
    let east_v6 = SocketAddr::new(Ipv6Addr::LOCALHOST.into(), east.tunnel_addr().port());
    let west = bed
        .start(bed.config_on("west", any6, None, &[("east", Some(east_v6), None)]))
        .await;

    // The import arrived over the IPv6 tunnel, and traffic crosses it.
    let vip = vip_of(&west).await;
    let body = http_get((vip, 8080).into(), HELLO)
        .await
        .expect("request through the tunnel");
    assert_eq!(body, "hello from east/hello-0");

    let families = [
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ];
    for ip in families {
        for tcp in [false, true] {
            let dns = SocketAddr::new(ip, west.dns_addr().port());
            assert_eq!(
                dig(dns, HELLO, "A", tcp),
                vec![vip.to_string()],
                "DNS at {dns}, tcp {tcp}"
            );
        }
        let admin = SocketAddr::new(ip, west.admin_addr().port());
        let m = http_get_path(admin, "admin", "/metrics")
            .await
            .unwrap_or_else(|e| panic!("metrics at {admin}: {e}"));
        assert_eq!(
            sample(&m, "strait_peer_up{peer=\"east\"}"),
            Some(1.0),
            "{m}"
        );
        // The TLS-over-TCP tunnel listener takes both families too.
        let tunnel = SocketAddr::new(ip, east.tunnel_addr().port());
        tokio::net::TcpStream::connect(tunnel)
            .await
            .unwrap_or_else(|e| panic!("TCP tunnel listener at {tunnel}: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_connections_past_the_limit_wait_for_one_to_close() {
    let l = linked_with(1, 20_000).await;
    let vip = vip_of(&l.west).await;
    let held = hold(vip, &l.west, "east", "outbound").await;
    // The listeners stopped once the held connection took the slot (the
    // accept loop runs on after spawning the held one's relay).
    let reached = "strait_connection_limit_reached_total{direction=\"outbound\"}";
    eventually(WAIT, "the limit reached counted", || async {
        (sample(&metrics(&l.west).await, reached) == Some(1.0)).then_some(())
    })
    .await;
    // Another waits in the listen backlog, neither refused nor lost...
    let waiting = tokio::spawn(http_get((vip, 8080).into(), HELLO));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "served past the limit");
    // ...and is served once the held one closes.
    drop(held);
    let body = waiting
        .await
        .expect("task")
        .expect("answered once a slot is free");
    assert!(body.starts_with("hello from east/"), "{body}");
    // (The listener stops again if it looks before the waiting one's
    // exchange is over, which a busy machine may not: not counted here.)
    // East had room all along.
    let m = metrics(&l.east).await;
    let inbound = "strait_connection_limit_reached_total{direction=\"inbound\"}";
    assert_eq!(sample(&m, inbound), None, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_from_a_peer_past_the_limit_are_refused() {
    // West's catalog watch takes no slot.
    let l = linked_with(20_000, 1).await;
    let vip = vip_of(&l.west).await;
    let held = hold(vip, &l.east, "west", "inbound").await;
    refused_while_held(vip, HELLO, held, &l.east).await;
}
