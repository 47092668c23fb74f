//! A sidecar's discovery, end to end: a gateway serves its cluster file's
//! endpoints on `strait.destination.v1.Destination`, a proxy's
//! `GrpcResolver` follows them as the file changes, and falls back to DNS
//! when the control plane knows nothing or is gone.

use std::time::{Duration, Instant};

use strait_gateway::Gateway;
use strait_proxy::discovery::{Chain, Destination, DnsResolver, GrpcResolver, Resolve};
use strait_tests::*;

const WAIT: Duration = Duration::from_secs(20);
/// A lookup the gateway is expected to answer: far above the resolver's
/// 500 ms default, which a loaded machine can miss on a first connect.
const ANSWERED: Duration = Duration::from_secs(5);
const ID: &str = "spiffe://west.strait.local/ns/demo/sa/hello";
const HELLO: &str = "hello.demo.svc.cluster.local:8080";

fn cluster(with_first: bool) -> String {
    let first = if with_first {
        "      - { name: hello-0, ip: 127.0.0.1, ports: { http: 18080 } }\n"
    } else {
        ""
    };
    format!(
        "services:
  - namespace: demo
    name: hello
    ports:
      - {{ name: http, port: 8080, appProtocol: http }}
    endpoints:
{first}      - {{ name: hello-1, ip: 127.0.0.2, ports: {{ http: 18081 }}, identity: \"{ID}\" }}
"
    )
}

/// (address, identity) of each endpoint.
fn seen(d: &Option<Destination>) -> Vec<(String, Option<String>)> {
    d.iter()
        .flat_map(|d| &d.endpoints)
        .map(|e| {
            (
                e.addr.to_string(),
                e.identity.as_ref().map(|i| i.as_str().to_string()),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_follow_the_gateways_endpoints() {
    let bed = Testbed::new(&["west"]);
    bed.write_cluster("west", &cluster(true));
    let gw = bed.start(bed.config("west", None, &[])).await;
    let grpc = GrpcResolver::for_addr(gw.destination_addr()).with_timeout(ANSWERED);

    let both = vec![
        ("127.0.0.1:18080".to_string(), None),
        ("127.0.0.2:18081".to_string(), Some(ID.to_string())),
    ];
    assert_eq!(seen(&grpc.resolve(HELLO).await), both);
    assert_eq!(seen(&grpc.resolve("hello.demo:8080").await), both);
    assert_eq!(
        seen(&grpc.resolve("127.0.0.2:18081").await),
        vec![("127.0.0.2:18081".to_string(), Some(ID.to_string()))],
        "an endpoint's own address tells its identity"
    );

    // The file loses an endpoint: the open stream brings the change.
    bed.write_cluster("west", &cluster(false));
    eventually(WAIT, "hello-0 gone", || async {
        (seen(&grpc.resolve(HELLO).await).len() == 1).then_some(())
    })
    .await;
    assert_eq!(
        seen(&grpc.resolve(HELLO).await),
        vec![("127.0.0.2:18081".to_string(), Some(ID.to_string()))]
    );

    // What the gateway does not know falls through to DNS.
    assert!(grpc
        .resolve("nope.demo.svc.cluster.local:8080")
        .await
        .is_none());
    assert!(
        grpc.resolve("hello.demo:9999").await.is_none(),
        "not a service port"
    );
    assert!(grpc.resolve("api.example.com:443").await.is_none());
    let chain = Chain(vec![
        Box::new(grpc.clone()),
        Box::new(DnsResolver::default()),
    ]);
    assert_eq!(
        seen(&chain.resolve("127.0.0.1:9").await),
        vec![("127.0.0.1:9".to_string(), None)],
        "DNS answers what the control plane does not know"
    );
    assert_eq!(seen(&chain.resolve(HELLO).await).len(), 1);

    // The gateway goes away: its streams end and the proxy falls back.
    let addr = gw.destination_addr();
    drop(gw);
    eventually(WAIT, "fallback after the gateway stopped", || async {
        grpc.resolve(HELLO).await.is_none().then_some(())
    })
    .await;

    // It comes back on the same address: the proxy follows it again.
    let mut config = bed.config("west", None, &[]);
    config.listen.destination = addr;
    let _gw = eventually(WAIT, "gateway restarted", || async {
        Gateway::start(config.clone()).await.ok()
    })
    .await;
    eventually(WAIT, "discovery after the gateway came back", || async {
        (seen(&grpc.resolve(HELLO).await).len() == 1).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_dead_control_plane_answers_none_without_waiting() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let grpc = GrpcResolver::for_addr(dead);
    for _ in 0..3 {
        let started = Instant::now();
        assert!(grpc.resolve(HELLO).await.is_none());
        // A refused connection answers at once; the bound only leaves
        // room for a loaded machine, far below a hang.
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
    let chain = Chain(vec![Box::new(grpc), Box::new(DnsResolver::default())]);
    let started = Instant::now();
    assert_eq!(
        seen(&chain.resolve("127.0.0.1:9").await),
        vec![("127.0.0.1:9".to_string(), None)]
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// A proxy's TLS config for the destination service: its own workload
/// certificate from `cluster`'s issuer, the gateway's identity pinned.
fn proxy_tls(
    bed: &Testbed,
    cluster: &str,
    root: &str,
    gateway: &str,
) -> std::sync::Arc<rustls::ClientConfig> {
    use strait_proxy::identity::{CertStore, ExpectedPeerVerifier, Issuer, SpiffeId, TrustAnchors};
    let dir = bed.path();
    let anchors = TrustAnchors::load(&dir.join(root)).expect("anchors");
    let issuer = Issuer::load(
        &dir.join(format!("{cluster}-issuer.pem")),
        &dir.join(format!("{cluster}-issuer.key")),
    )
    .expect("issuer");
    let me = SpiffeId::workload(&format!("{cluster}.strait.local"), "demo", "client").expect("id");
    let store = CertStore::new(&issuer.issue(&me, Duration::from_secs(3600)).expect("leaf"))
        .expect("store");
    let gw = SpiffeId::parse(gateway).expect("gateway id");
    std::sync::Arc::new(
        strait_proxy::tls::client_config(
            ExpectedPeerVerifier::new(anchors.roots(), gw, std::sync::Arc::new(|_| {})),
            store,
            &[strait_proxy::tls::CONTROL_PLANE_ALPN],
        )
        .expect("client tls"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_over_mtls_serves_meshed_proxies_only() {
    let bed = Testbed::new(&["west", "north"]);
    bed.write_cluster("west", &cluster(true));
    let mut config = bed.config("west", None, &[]);
    config.listen.destination_mtls = true;
    let gw = bed.start(config).await;
    let gateway_id = "spiffe://west.strait.local/ns/strait-system/sa/strait-gateway";

    // A meshed proxy of the cluster, pinning the gateway: answered.
    let meshed = GrpcResolver::for_addr(gw.destination_addr())
        .with_timeout(ANSWERED)
        .with_tls(proxy_tls(&bed, "west", "root.pem", gateway_id));
    let got = seen(&meshed.resolve(HELLO).await);
    assert_eq!(got.len(), 2, "{got:?}");

    // Plaintext gets nothing (the listener speaks TLS only).
    let plain =
        GrpcResolver::for_addr(gw.destination_addr()).with_timeout(Duration::from_millis(300));
    assert_eq!(plain.resolve(HELLO).await, None);

    // A proxy pinning another identity refuses the gateway.
    let wrong = "spiffe://north.strait.local/ns/strait-system/sa/strait-gateway";
    let pinned_wrong = GrpcResolver::for_addr(gw.destination_addr())
        .with_timeout(Duration::from_millis(300))
        .with_tls(proxy_tls(&bed, "west", "root.pem", wrong));
    assert_eq!(pinned_wrong.resolve(HELLO).await, None);

    // A client from an unknown root is refused by the gateway, and counted.
    let other_root = strait_proxy::identity::generate_root("elsewhere").expect("root");
    let other_issuer =
        strait_proxy::identity::generate_issuer(&other_root, "west.strait.local").expect("issuer");
    std::fs::write(bed.path().join("other-root.pem"), &other_root.cert_pem).expect("write");
    std::fs::write(bed.path().join("west-issuer.pem"), &other_issuer.cert_pem).expect("write");
    std::fs::write(bed.path().join("west-issuer.key"), &other_issuer.key_pem).expect("write");
    let stranger = GrpcResolver::for_addr(gw.destination_addr())
        .with_timeout(Duration::from_millis(300))
        .with_tls(proxy_tls(&bed, "west", "root.pem", gateway_id));
    assert_eq!(stranger.resolve(HELLO).await, None);
    eventually(WAIT, "the stranger counted", || async {
        let m = metrics(&gw).await;
        m.lines()
            .any(|l| {
                l.starts_with("strait_tls_handshake_failures_total")
                    && l.contains("destination")
                    && l.contains("unknown_issuer")
            })
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_ports_are_known_by_name_and_by_address() {
    let bed = Testbed::new(&["west"]);
    bed.write_cluster(
        "west",
        "services:
  - namespace: demo
    name: db
    ports:
      - { name: mysql, port: 3306, appProtocol: tcp }
    endpoints:
      - { name: db-0, ip: 127.0.0.9, ports: { mysql: 13306 } }
",
    );
    let gw = bed.start(bed.config("west", None, &[])).await;
    let grpc = GrpcResolver::for_addr(gw.destination_addr()).with_timeout(ANSWERED);
    let by_name = grpc.resolve("db.demo:3306").await.expect("db");
    assert!(by_name.opaque, "{by_name:?}");
    // What a transparent proxy asks: the original destination's address.
    // The first peek starts following it; once known, peeks answer at once.
    assert!(grpc.peek("127.0.0.9:13306").is_none_or(|d| d.opaque));
    let by_addr = eventually(WAIT, "the address known", || async {
        grpc.peek("127.0.0.9:13306")
    })
    .await;
    assert!(by_addr.opaque, "{by_addr:?}");
}
