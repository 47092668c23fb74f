use serde_json::{json, Value};

use super::*;

fn config() -> InjectConfig {
    super::super::inject::test_config()
}

/// A review of `object` (as the API server sends it: no type in the
/// object itself) for `operation` on `kind`.
fn review_of(object: Value, kind: &str, operation: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "b8e1a7e4-1",
            "kind": {"group": "", "version": "v1", "kind": kind},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": kind},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "demo",
            "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": object,
            "oldObject": null,
            "dryRun": false,
        }
    }))
    .expect("json")
}

fn pod(annotations: Value) -> Value {
    json!({
        "metadata": {"generateName": "web-5d9c-", "namespace": "demo",
            "labels": {"app": "web"}, "annotations": annotations},
        "spec": {"serviceAccountName": "web",
            "containers": [{"name": "web", "image": "web:1"}]},
    })
}

/// The response of an answer.
fn response(answer: &Answer) -> Value {
    let v: Value = serde_json::from_slice(&answer.body).expect("json");
    assert_eq!(v["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(v["kind"], "AdmissionReview");
    assert_eq!(v["response"]["uid"], "b8e1a7e4-1", "the request's uid");
    assert_eq!(v["response"]["allowed"], true, "never refused");
    v["response"].clone()
}

#[test]
fn a_created_pod_is_patched_into_what_strait_inject_makes() {
    let original = pod(json!({}));
    let answer = review(&review_of(original.clone(), "Pod", "CREATE"), &config()).expect("review");
    assert_eq!(answer.result, "injected");
    let rsp = response(&answer);
    assert_eq!(rsp["patchType"], "JSONPatch");
    // The patch, applied by the API server to the object it sent, gives
    // exactly `strait inject`'s pod.
    let patch: json_patch::Patch = {
        use base64::Engine as _;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(rsp["patch"].as_str().expect("base64 patch"))
            .expect("base64");
        serde_json::from_slice(&raw).expect("a JSON Patch")
    };
    let mut patched = original.clone();
    json_patch::patch(&mut patched, &patch).expect("applies");
    let mut expected = original;
    expected["kind"] = "Pod".into();
    expected["apiVersion"] = "v1".into();
    let mut reports = Vec::new();
    inject_object(&mut expected, &config(), &mut reports).expect("inject");
    let expected = expected.as_object().expect("object").clone();
    let mut patched = patched.as_object().expect("object").clone();
    // The type the injector added to read the object is not patched in.
    patched.insert("kind".into(), "Pod".into());
    patched.insert("apiVersion".into(), "v1".into());
    assert_eq!(patched, expected);
    let inits = &patched["spec"]["initContainers"];
    assert_eq!(inits[0]["name"], "strait-init");
    assert_eq!(inits[1]["name"], "strait-proxy");
    assert_eq!(patched["metadata"]["labels"]["strait.io/meshed"], "true");
}

#[test]
fn opted_out_other_kinds_and_other_operations_are_admitted_unchanged() {
    let cases = [
        (
            pod(json!({"strait.io/inject": "disabled"})),
            "Pod",
            "CREATE",
        ),
        (pod(json!({})), "Pod", "UPDATE"),
        (pod(json!({})), "Pod", "DELETE"),
        (json!({"metadata": {"name": "x"}}), "ConfigMap", "CREATE"),
    ];
    for (object, kind, operation) in cases {
        let answer = review(&review_of(object, kind, operation), &config()).expect("review");
        assert_eq!(answer.result, "skipped", "{kind} {operation}");
        let rsp = response(&answer);
        assert!(rsp.get("patch").is_none(), "{kind} {operation}: {rsp}");
    }
    // Already injected (by the webhook or `strait inject`): unchanged.
    let mut injected = pod(json!({}));
    injected["kind"] = "Pod".into();
    inject_object(&mut injected, &config(), &mut Vec::new()).expect("inject");
    let answer = review(&review_of(injected, "Pod", "CREATE"), &config()).expect("review");
    assert_eq!(answer.result, "skipped");
}

#[test]
fn a_bad_annotation_admits_the_pod_unchanged_with_a_warning() {
    let bad = pod(json!({"strait.io/proxy-threads": "lots"}));
    let answer = review(&review_of(bad, "Pod", "CREATE"), &config()).expect("review");
    assert_eq!(answer.result, "refused");
    let rsp = response(&answer);
    assert!(rsp.get("patch").is_none());
    let warning = rsp["warnings"][0].as_str().expect("a warning");
    assert!(
        warning.contains("strait.io/proxy-threads") && warning.contains("not injected"),
        "{warning}"
    );
}

#[test]
fn what_is_not_a_review_is_an_error() {
    for body in [
        &b"not json"[..],
        br#"{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}"#,
        br#"{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": 7}}"#,
        br#"[]"#,
    ] {
        assert!(
            matches!(review(body, &config()), Err(ReviewError::Invalid(_))),
            "{}",
            String::from_utf8_lossy(body)
        );
    }
}

#[test]
fn the_certificate_is_read_again_when_its_files_change() {
    let dir = tempfile::tempdir().expect("tmp");
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let write = |name: &str| {
        let root = strait_proxy::identity::generate_root(name).expect("root");
        std::fs::write(&cert, &root.cert_pem).expect("write");
        std::fs::write(&key, &root.key_pem).expect("write");
    };
    let serving = |c: &ReloadingCert| c.current.load().cert[0].clone();
    write("a");
    let loaded = ReloadingCert::load(&cert, &key).expect("load");
    let first = serving(&loaded);
    assert!(!loaded.reload().expect("same files"), "nothing changed");

    // A half-written renewal (no key yet) keeps the last good pair.
    std::fs::write(&key, "not a key").expect("write");
    let err = loaded.reload().expect_err("a bad key");
    assert!(err.to_string().contains("tls.key"), "{err}");
    assert_eq!(serving(&loaded), first);

    write("b");
    assert!(loaded.reload().expect("renewed"));
    assert_ne!(serving(&loaded), first, "the new certificate is served");

    let missing = ReloadingCert::load(&dir.path().join("nope.crt"), &key).expect_err("missing");
    assert!(missing.to_string().contains("nope.crt"), "{missing}");
}

/// The API server fills in defaults before each call (and calls again
/// after other webhooks): a pod this injector already made, defaults and
/// all, is admitted unchanged; one injected with another image is brought
/// up to date.
#[test]
fn an_injected_pod_with_the_api_servers_defaults_is_left_alone() {
    let mut injected = pod(json!({}));
    injected["kind"] = "Pod".into();
    inject_object(&mut injected, &config(), &mut Vec::new()).expect("inject");
    for c in injected["spec"]["initContainers"]
        .as_array_mut()
        .expect("inits")
    {
        c["terminationMessagePath"] = "/dev/termination-log".into();
        c["terminationMessagePolicy"] = "File".into();
    }
    injected["spec"]["volumes"][0]["projected"]["defaultMode"] = 420.into();
    let answer = review(&review_of(injected.clone(), "Pod", "CREATE"), &config()).expect("review");
    assert_eq!(answer.result, "skipped");
    assert!(response(&answer).get("patch").is_none());

    let mut newer = config();
    newer.image = "example.test/strait-proxy:2".into();
    let answer = review(&review_of(injected, "Pod", "CREATE"), &newer).expect("review");
    assert_eq!(answer.result, "updated");
    assert!(response(&answer)["patch"].is_string());
}

#[test]
fn rotated_trust_anchors_are_injected_without_a_restart() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("ca.crt");
    let (a, b) = (
        strait_proxy::identity::generate_root("a").expect("root"),
        strait_proxy::identity::generate_root("b").expect("root"),
    );
    std::fs::write(&path, &a.cert_pem).expect("write");
    let mut first = config();
    first.trust_anchors_pem = a.cert_pem.clone();
    let injecting: Injecting = Arc::new(arc_swap::ArcSwap::from_pointee(first));
    assert!(!reload_anchors(&path, &injecting).expect("same file"));

    // Half-written: refused, the last good bundle stays.
    std::fs::write(&path, "-----BEGIN CERTIFICATE-----\nnot base64").expect("write");
    assert!(reload_anchors(&path, &injecting).is_err());
    assert_eq!(injecting.load().trust_anchors_pem, a.cert_pem);

    // Both roots during a rotation: injected from the next pod on.
    let both = format!("{}{}", a.cert_pem, b.cert_pem);
    std::fs::write(&path, &both).expect("write");
    assert!(reload_anchors(&path, &injecting).expect("rotated"));
    let answer = review(
        &review_of(pod(json!({})), "Pod", "CREATE"),
        &injecting.load(),
    )
    .expect("review");
    assert_eq!(answer.result, "injected");
    let patch = {
        use base64::Engine as _;
        let rsp = response(&answer);
        let raw = base64::engine::general_purpose::STANDARD
            .decode(rsp["patch"].as_str().expect("base64 patch"))
            .expect("base64");
        String::from_utf8(raw).expect("utf-8")
    };
    let line_of_b = b.cert_pem.lines().nth(1).expect("a base64 line");
    assert!(patch.contains(line_of_b), "the new root is injected");
    assert_eq!(injecting.load().trust_anchors_pem, both);
}

/// A connection at the end of its lifetime finishes the review in flight
/// (its body still coming in) before it closes.
#[tokio::test]
async fn a_review_in_flight_outlives_its_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().expect("tmp");
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    const NAME: &str = "strait-injector.strait-system.svc";
    let key_pair = rcgen::KeyPair::generate().expect("key");
    let self_signed = rcgen::CertificateParams::new(vec![NAME.to_string()])
        .expect("params")
        .self_signed(&key_pair)
        .expect("cert");
    std::fs::write(&cert, self_signed.pem()).expect("write");
    std::fs::write(&key, key_pair.serialize_pem()).expect("write");
    let tls = Arc::new(
        ReloadingCert::load(&cert, &key)
            .expect("load")
            .server_config()
            .expect("tls"),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let injecting: Injecting = Arc::new(arc_swap::ArcSwap::from_pointee(config()));
    let server = tokio::spawn(serve_for(
        listener,
        tls,
        injecting,
        Requests::default(),
        std::time::Duration::from_millis(300),
    ));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(self_signed.der().clone()).expect("root");
    let client = rustls::ClientConfig::builder_with_provider(strait_proxy::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name =
        rustls::pki_types::ServerName::try_from("strait-injector.strait-system.svc").expect("name");
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect(name, tcp)
        .await
        .expect("handshake");
    let body = review_of(pod(json!({})), "Pod", "CREATE");
    let head = format!(
        "POST /inject HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await.expect("head");
    // Half the body, then the rest after the connection's lifetime.
    let (first, rest) = body.split_at(body.len() / 2);
    tls.write_all(first).await.expect("body");
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    tls.write_all(rest).await.expect("the rest");
    let mut out = Vec::new();
    let _ =
        tokio::time::timeout(std::time::Duration::from_secs(5), tls.read_to_end(&mut out)).await;
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("\"allowed\":true"), "{out}");
    server.abort();
}
