//! A peer's streams reach meshed endpoints through their sidecars over
//! mutual TLS: east's gateway dials each sidecar's inbound port as itself,
//! checks the identity the cluster source gives the endpoint, and names
//! the endpoint's port in the transport header; the sidecar detects HTTP
//! inside and counts the requests. A sidecar presenting another identity
//! is refused, counted, and the stream fails rather than reaching it.

use std::time::Duration;

use strait_gateway::demo::{http_get, Demo, DemoOptions};
use strait_tests::*;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshed_endpoints_are_reached_over_mtls_and_a_wrong_identity_is_refused() {
    // Ports of their own (below the ephemeral range), apart from the CLI
    // test's and the demo's defaults.
    let at = |port: u16| ([127, 0, 0, 1], port).into();
    let opts = DemoOptions {
        west_dns: at(16353),
        west_admin: at(16191),
        west_tunnel: at(16143),
        west_destination: at(16086),
        east_dns: at(17353),
        east_admin: at(17191),
        east_tunnel: at(17143),
        east_destination: at(17086),
        requests: 8,
    };
    let demo = Demo::start(&opts).await.expect("demo");
    let summary = demo.round_trip(8, |_| {}).await.expect("round trip");
    let over_mtls: u64 = summary.sidecars.iter().map(|s| s.2).sum();
    assert_eq!(over_mtls, 8, "every request through a sidecar, over mTLS");
    let east = metrics(&demo.east).await;
    assert_eq!(
        sample(
            &east,
            r#"strait_endpoint_connects_total{tls="true",result="ok"}"#
        ),
        Some(8.0),
        "{east}"
    );
    assert_eq!(
        sample(
            &east,
            r#"strait_endpoint_connects_total{tls="false",result="ok"}"#
        ),
        None
    );

    // The cluster source now says the endpoints are another workload: the
    // sidecars' certificates do not match, and the gateway will not hand
    // them the stream.
    let file = demo.dir.join("east-cluster.yaml");
    let yaml = std::fs::read_to_string(&file).expect("cluster file");
    assert!(yaml.contains("/sa/hello"));
    std::fs::write(&file, yaml.replace("/sa/hello", "/sa/impostor")).expect("write");
    eventually(WAIT, "east reloaded its cluster file", || async {
        let m = metrics(&demo.east).await;
        (sample(&m, r#"strait_source_reloads_total{result="ok"}"#) >= Some(1.0)).then_some(())
    })
    .await;
    let vip = summary.vip;
    assert!(
        http_get((vip, 8080).into(), "hello.demo.svc.clusterset.local")
            .await
            .is_err(),
        "a sidecar with the wrong identity is never sent the stream"
    );
    let east = metrics(&demo.east).await;
    assert!(
        sample(
            &east,
            r#"strait_endpoint_connects_total{tls="true",result="error"}"#
        ) >= Some(1.0),
        "{east}"
    );
    assert!(
        east.lines()
            .any(|l| l.starts_with("strait_tls_handshake_failures_total{side=\"endpoint\"")),
        "the refusal is counted by reason: {east}"
    );
    demo.west.shutdown().await;
    demo.east.shutdown().await;
}
