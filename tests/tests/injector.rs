//! The sidecar injector webhook as the API server calls it: an
//! `AdmissionReview` for a new Pod posted over HTTPS to the gateway, the
//! answer a JSON Patch that makes the pod what `strait inject` would;
//! anything else a clear error, counted.

use std::net::SocketAddr;

use base64::Engine as _;
use serde_json::{json, Value};
use strait_gateway::config::InjectorConfig;
use strait_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NAME: &str = "strait-injector.strait-system.svc";

/// `method path` with `body` over TLS (trusting `cert` for [`NAME`]);
/// the status code and the body.
async fn call(
    addr: SocketAddr,
    cert: &rcgen::Certificate,
    method: &str,
    body: &[u8],
) -> (u16, Vec<u8>) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).expect("root");
    let config = rustls::ClientConfig::builder_with_provider(strait_proxy::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from(NAME).expect("name");
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("a certificate for the webhook's name");
    let head = format!(
        "{method} /inject?timeout=10s HTTP/1.1\r\nhost: {NAME}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await.expect("write");
    tls.write_all(body).await.expect("write");
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&out[..split]).to_string();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status");
    (status, out[split + 4..].to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_pod_is_patched_over_https_and_bad_calls_are_refused() {
    let bed = Testbed::new(&["west"]);
    bed.write_cluster("west", "services: []\n");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec![NAME.to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    let (cert_file, key_file) = (
        bed.path().join("injector.crt"),
        bed.path().join("injector.key"),
    );
    std::fs::write(&cert_file, cert.pem()).expect("write");
    std::fs::write(&key_file, key.serialize_pem()).expect("write");
    let mut config = bed.config("west", None, &[]);
    config.injector = Some(InjectorConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        cert_file,
        key_file,
        image: "example.test/strait-proxy:9".into(),
        ipv6: true,
    });
    let gw = bed.start(config).await;
    let addr = gw.injector_addr().expect("the injector listens");

    let pod = json!({
        "metadata": {"generateName": "web-5d9c-", "namespace": "demo", "labels": {"app": "web"}},
        "spec": {"serviceAccountName": "web", "containers": [{"name": "web", "image": "web:1"}]},
    });
    let review = json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "0f1e2d3c", "operation": "CREATE", "namespace": "demo",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
        }
    });
    let (status, body) = call(addr, &cert, "POST", review.to_string().as_bytes()).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let answer: Value = serde_json::from_slice(&body).expect("json");
    let rsp = &answer["response"];
    assert_eq!(rsp["uid"], "0f1e2d3c");
    assert_eq!(rsp["allowed"], true);
    assert_eq!(rsp["patchType"], "JSONPatch");
    let raw = base64::engine::general_purpose::STANDARD
        .decode(rsp["patch"].as_str().expect("a base64 patch"))
        .expect("base64");
    let patch: json_patch::Patch = serde_json::from_slice(&raw).expect("a JSON Patch");
    let mut patched = pod.clone();
    json_patch::patch(&mut patched, &patch).expect("the patch applies");
    let proxy = &patched["spec"]["initContainers"][1];
    assert_eq!(proxy["name"], "strait-proxy");
    assert_eq!(proxy["image"], "example.test/strait-proxy:9");
    let env = |name: &str| {
        proxy["env"]
            .as_array()
            .expect("env")
            .iter()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str())
            .map(String::from)
    };
    let anchors = std::fs::read_to_string(bed.path().join("root.pem")).expect("root.pem");
    assert_eq!(
        env("STRAIT_PROXY_TRUST_ANCHORS_PEM"),
        Some(anchors),
        "the cluster's anchors"
    );
    assert_eq!(
        env("STRAIT_PROXY_IDENTITY").as_deref(),
        Some("spiffe://west.strait.local/ns/$(STRAIT_POD_NS)/sa/$(STRAIT_POD_SA)")
    );
    assert_eq!(patched["metadata"]["labels"]["strait.io/meshed"], "true");
    // The gateway's `injector.ipv6` reaches the pods.
    assert_eq!(
        env("STRAIT_PROXY_OUTBOUND_LISTEN_IPV6").as_deref(),
        Some("[::1]:4140")
    );
    assert!(patched["spec"]["initContainers"][0]["args"]
        .as_array()
        .expect("args")
        .iter()
        .any(|a| a == "--ipv6"));

    // Not a review, not a POST: errors, and the injector keeps serving.
    let (status, _) = call(addr, &cert, "POST", b"{\"kind\": 3").await;
    assert_eq!(status, 400);
    let (status, _) = call(addr, &cert, "GET", b"").await;
    assert_eq!(status, 405);
    let (status, _) = call(addr, &cert, "POST", review.to_string().as_bytes()).await;
    assert_eq!(status, 200);
    let m = metrics(&gw).await;
    assert_eq!(
        sample(&m, r#"strait_injector_requests_total{result="injected"}"#),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, r#"strait_injector_requests_total{result="invalid"}"#),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_missing_certificate_is_a_clear_start_error() {
    let bed = Testbed::new(&["west"]);
    bed.write_cluster("west", "services: []\n");
    let mut config = bed.config("west", None, &[]);
    config.injector = Some(InjectorConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        cert_file: bed.path().join("nope.crt"),
        key_file: bed.path().join("nope.key"),
        image: "example.test/strait-proxy:9".into(),
        ipv6: false,
    });
    let err = strait_gateway::Gateway::start(config)
        .await
        .expect_err("no certificate");
    let text = err.to_string();
    assert!(
        text.starts_with("injector: ") && text.contains("nope.crt"),
        "{text}"
    );
}
