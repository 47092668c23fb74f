//! Sidecar certificates from the control plane, end to end: proxies make
//! their own keys, present a token to their gateway's identity service,
//! get leaves for their service account's SPIFFE ID and speak mTLS with
//! them; tokens are checked from a tokens file outside Kubernetes and by
//! TokenReview (against the fake API server) inside it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use strait_gateway::Gateway;
use strait_proxy::discovery::{Destination, Endpoint, StaticResolver};
use strait_proxy::identity::{
    spawn_certify, CertStore, Certifier, CertifyError, Leaf, SpiffeId, TrustAnchors,
};
use strait_proxy::sidecar::{Proxy, ProxyConfig};
use strait_tests::fake_kube::FakeKube;
use strait_tests::*;

const WAIT: Duration = Duration::from_secs(10);
const GATEWAY: &str = "spiffe://west.strait.local/ns/strait-system/sa/strait-gateway";

fn id(sa: &str) -> SpiffeId {
    SpiffeId::workload("west.strait.local", "demo", sa).expect("id")
}

/// A certifier for `id` asking `gw`, pinning `pin`, with the token in
/// `token_file`.
fn certifier(
    bed: &Testbed,
    gw: &Gateway,
    id: &SpiffeId,
    pin: &str,
    token_file: PathBuf,
) -> Certifier {
    let anchors = TrustAnchors::load(&bed.path().join("root.pem")).expect("anchors");
    let addr = gw.identity_addr().expect("identity service served");
    let uri = format!("http://{addr}").parse().expect("uri");
    let pin = SpiffeId::parse(pin).expect("pin");
    Certifier::for_control_plane(id.clone(), &uri, pin, token_file, &anchors)
        .expect("tls")
        .0
}

fn write_token(dir: &Path, name: &str, token: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{token}\n")).expect("token");
    path
}

/// A store kept certified by `gw` for `sa`, with the token in `token_file`.
fn certified_store(bed: &Testbed, gw: &Gateway, sa: &str, token_file: PathBuf) -> Arc<CertStore> {
    let store = CertStore::pending(id(sa));
    spawn_certify(
        certifier(bed, gw, &id(sa), GATEWAY, token_file),
        store.clone(),
        |_| {},
    );
    store
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

async fn ready(addr: SocketAddr) -> bool {
    http_get_path(addr, "admin", "/ready").await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_certified_by_their_gateway_speak_mtls() {
    let bed = Testbed::new(&["west"]);
    bed.write_cluster("west", "services: []\n");
    std::fs::write(
        bed.path().join("tokens.yaml"),
        "- {token: web-token-0123456789, namespace: demo, serviceAccount: web}\n\
         - {token: api-token-0123456789, namespace: demo, serviceAccount: api}\n",
    )
    .expect("tokens");
    let mut config = bed.config("west", None, &[]);
    config.identity.tokens_file = Some(bed.path().join("tokens.yaml"));
    let gw = bed.start(config).await;
    let anchors = TrustAnchors::load(&bed.path().join("root.pem")).expect("anchors");

    // The server's token is not there yet: its proxy starts, but is not
    // ready and offers no certificate.
    let api_token = bed.path().join("api-token");
    let api = certified_store(&bed, &gw, "api", api_token.clone());
    let app = spawn_hello_endpoint("west", "api-0").await.expect("app");
    let server = Proxy::start(
        ProxyConfig {
            outbound: loopback(),
            inbound: loopback(),
            admin: loopback(),
            inbound_target: Some(app),
            require_mtls: true,
            ..Default::default()
        },
        api.clone(),
        anchors.clone(),
        Arc::new(StaticResolver::default()),
        Registry::default(),
    )
    .await
    .expect("server proxy");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!api.is_certified());
    assert!(
        !ready(server.admin_addr()).await,
        "ready without a certificate"
    );
    let m = metrics(&gw).await;
    assert_eq!(
        sample(&m, "strait_identity_certify_requests_total{result=\"ok\"}"),
        None
    );

    // The token arrives (as a projected token is mounted): certified, ready.
    write_token(bed.path(), "api-token", "api-token-0123456789");
    tokio::time::timeout(WAIT, api.certified())
        .await
        .expect("api certified");
    eventually(WAIT, "server proxy ready", || async {
        ready(server.admin_addr()).await.then_some(())
    })
    .await;

    // A client certified the same way reaches it over mTLS (the server
    // requires it), and the server proxy sees the client's identity.
    let web = certified_store(
        &bed,
        &gw,
        "web",
        write_token(bed.path(), "web-token", "web-token-0123456789"),
    );
    tokio::time::timeout(WAIT, web.certified())
        .await
        .expect("web certified");
    let mut table = HashMap::new();
    table.insert(
        "api.demo:80".to_string(),
        Destination {
            endpoints: vec![Endpoint {
                addr: app,
                identity: Some(id("api")),
                weight: 1,
            }],
            ..Destination::default()
        },
    );
    let client = Proxy::start(
        ProxyConfig {
            outbound: loopback(),
            inbound: loopback(),
            admin: loopback(),
            inbound_target: Some(app),
            peer_inbound_port: server.inbound_addr().port(),
            ..Default::default()
        },
        web.clone(),
        anchors,
        Arc::new(StaticResolver::new(table)),
        Registry::default(),
    )
    .await
    .expect("client proxy");
    let body = http_get(client.outbound_addr(), "api.demo:80")
        .await
        .expect("a response through the pair");
    assert!(body.contains("hello from west/api-0"), "{body}");
    let server_metrics = http_get_path(server.admin_addr(), "admin", "/metrics")
        .await
        .expect("metrics");
    assert!(
        server_metrics
            .lines()
            .any(|l| l.starts_with("strait_proxy_requests_total") && l.contains("tls=\"true\"")),
        "{server_metrics}"
    );
    let m = metrics(&gw).await;
    assert!(sample(&m, "strait_identity_certify_requests_total{result=\"ok\"}") >= Some(2.0));
    assert!(
        sample(
            &m,
            "strait_identity_certify_requests_total{result=\"unauthenticated\"}"
        )
        .is_none(),
        "a missing token never reaches the gateway"
    );

    // The tokens file changes while the gateway runs: a new workload is
    // certified, a removed token refused, a broken file ignored.
    std::fs::write(
        bed.path().join("tokens.yaml"),
        "- {token: api-token-0123456789, namespace: demo, serviceAccount: api}\n\
         - {token: db-token-01234567890, namespace: demo, serviceAccount: db}\n",
    )
    .expect("tokens");
    let db = certifier(
        &bed,
        &gw,
        &id("db"),
        GATEWAY,
        write_token(bed.path(), "db-token", "db-token-01234567890"),
    );
    let leaf = eventually(WAIT, "the new token accepted", || async {
        db.certify().await.ok()
    })
    .await;
    assert_eq!(leaf.id, id("db"));
    let web_again = certifier(&bed, &gw, &id("web"), GATEWAY, bed.path().join("web-token"));
    assert_eq!(attempt(&web_again).await.err(), Some("refused"));
    std::fs::write(bed.path().join("tokens.yaml"), "- {token: short}\n").expect("tokens");
    eventually(WAIT, "the broken tokens file refused", || async {
        let m = metrics(&gw).await;
        (sample(&m, "strait_identity_tokens_reloads_total{result=\"error\"}") == Some(1.0))
            .then_some(())
    })
    .await;
    assert!(db.certify().await.is_ok(), "the last good tokens kept");
}

/// One attempt's outcome, as its error kind.
async fn attempt(c: &Certifier) -> Result<Leaf, &'static str> {
    c.certify().await.map_err(|e: CertifyError| e.kind())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_kubernetes_tokens_are_reviewed_by_the_api_server() {
    let bed = Testbed::new(&["west"]);
    let kube = FakeKube::start().await.expect("API");
    let cfg = bed.kube_config(
        "west",
        "west-0",
        "127.0.0.1".parse().expect("ip"),
        unique_egress_ports(),
    );
    let gw = Gateway::start_with_client(cfg, Some(kube.client()))
        .await
        .expect("gateway");
    let dir = bed.path();
    let aud = strait_gateway::identity::TOKEN_AUDIENCE;
    // A certifier for demo/web presenting `token` (written to `file`).
    let web_with = |file: &str, token: &str| {
        certifier(
            &bed,
            &gw,
            &id("web"),
            GATEWAY,
            write_token(dir, file, token),
        )
    };

    // A projected token for demo/web with the identity audience.
    let good = kube.issue_token("demo", "web", &[aud]);
    let web = web_with("good", &good);
    let leaf = attempt(&web).await.expect("certified");
    assert_eq!(leaf.id, id("web"));
    assert!(leaf.chain.len() == 2, "leaf and issuer");
    assert!(kube.requests().count_for("create", "tokenreviews") >= 1);

    // The same account's token for the API server's audience: refused.
    let api_aud = kube.issue_token("demo", "web", &[]);
    let c = web_with("aud", &api_aud);
    assert_eq!(attempt(&c).await.err(), Some("refused"));

    // Another account's token asking for web: refused.
    let api = kube.issue_token("demo", "api", &[aud]);
    let c = web_with("api", &api);
    assert_eq!(attempt(&c).await.err(), Some("refused"));

    // A revoked token: refused; an unknown one too.
    kube.revoke_token(&good);
    assert_eq!(attempt(&web).await.err(), Some("refused"));
    let c = web_with("junk", "not-a-token");
    assert_eq!(attempt(&c).await.err(), Some("refused"));

    // A proxy pinning another control plane never sends its token.
    let c = certifier(
        &bed,
        &gw,
        &id("web"),
        "spiffe://west.strait.local/ns/elsewhere/sa/impostor",
        write_token(dir, "api2", &api),
    );
    assert_eq!(attempt(&c).await.err(), Some("unreachable"));

    let m = metrics(&gw).await;
    let count = |r: &str| {
        sample(
            &m,
            &format!("strait_identity_certify_requests_total{{result=\"{r}\"}}"),
        )
        .unwrap_or(0.0)
    };
    assert_eq!(count("ok"), 1.0, "{m}");
    assert_eq!(count("unauthenticated"), 3.0, "{m}");
    assert_eq!(count("forbidden"), 1.0, "{m}");

    // Without the API server, tokens cannot be checked: unavailable, and
    // the proxy keeps its leaf and retries.
    let fresh = kube.issue_token("demo", "web", &[aud]);
    let c = web_with("fresh", &fresh);
    drop(kube);
    assert_eq!(attempt(&c).await.err(), Some("unreachable"));
    let m = metrics(&gw).await;
    assert_eq!(
        sample(
            &m,
            "strait_identity_certify_requests_total{result=\"unavailable\"}"
        ),
        Some(1.0),
        "{m}"
    );
}
