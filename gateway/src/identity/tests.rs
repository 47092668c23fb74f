use std::path::Path;

use k8s_openapi::api::authentication::v1::{TokenReviewStatus, UserInfo};
use strait_proxy::identity::{generate_issuer, generate_root, CertRequest, PemPair};

use super::*;

const TOKENS: &str = r#"
- token: "web-token-0123456789"
  namespace: demo
  serviceAccount: web
- token: "gw-token-0123456789"
  namespace: strait-system
  serviceAccount: strait-gateway
- token: "api-token-0123456789"
  namespace: prod
  serviceAccount: api
"#;

fn account(ns: &str, name: &str) -> ServiceAccount {
    ServiceAccount {
        namespace: ns.into(),
        name: name.into(),
    }
}

fn issuer() -> (PemPair, Arc<Issuer>) {
    strait_proxy::tls::install_default_provider();
    let root = generate_root("test").expect("root");
    let pair = generate_issuer(&root, "west.strait.local").expect("issuer");
    let issuer =
        Issuer::from_pem(pair.cert_pem.as_bytes(), pair.key_pem.as_bytes()).expect("issuer");
    (root, Arc::new(issuer))
}

fn service() -> (PemPair, IdentityService) {
    let (root, issuer) = issuer();
    let tokens = StaticTokens::parse(TOKENS, Path::new("tokens.yaml")).expect("tokens");
    let service = IdentityService::new(
        issuer,
        SpiffeId::workload("west.strait.local", "strait-system", "strait-gateway").expect("id"),
        Authenticator::Static(watch::channel(tokens).1),
        Duration::from_secs(3600),
        Family::default(),
    );
    (root, service)
}

fn request(id: &str, token: &str) -> (CertRequest, CertifyRequest) {
    let spiffe = SpiffeId::parse(id).expect("id");
    let req = CertRequest::new(&spiffe).expect("csr");
    let msg = CertifyRequest {
        identity: id.into(),
        token: token.as_bytes().to_vec(),
        certificate_signing_request: req.csr_der().to_vec(),
    };
    (req, msg)
}

#[test]
fn service_accounts_come_from_kubernetes_user_names() {
    assert_eq!(
        service_account_of("system:serviceaccount:demo:web"),
        Some(account("demo", "web"))
    );
    for not in [
        "system:serviceaccount:demo",
        "system:serviceaccount::web",
        "system:serviceaccount:Demo:web",
        "system:serviceaccount:demo:",
        "system:serviceaccount:demo:web:x",
        "system:node:worker-1",
        "alice",
        "",
    ] {
        assert_eq!(service_account_of(not), None, "{not}");
    }
}

#[test]
fn an_account_may_have_its_own_identity_and_no_other() {
    let web = account("demo", "web");
    let id = authorize(
        "spiffe://west.strait.local/ns/demo/sa/web",
        "west.strait.local",
        &web,
    )
    .expect("its own");
    assert_eq!(id.as_str(), "spiffe://west.strait.local/ns/demo/sa/web");
    for (requested, label) in [
        ("spiffe://west.strait.local/ns/demo/sa/api", "forbidden"),
        ("spiffe://west.strait.local/ns/prod/sa/web", "forbidden"),
        ("spiffe://east.strait.local/ns/demo/sa/web", "forbidden"),
        (
            "spiffe://west.strait.local/ns/strait-system/sa/strait-gateway",
            "forbidden",
        ),
        ("not a spiffe id", "invalid"),
        ("", "invalid"),
    ] {
        let refusal = authorize(requested, "west.strait.local", &web).expect_err(requested);
        assert_eq!(refusal.as_str(), label, "{requested}: {refusal}");
    }
}

#[test]
fn token_reviews_are_judged_by_authentication_audience_and_user() {
    let status =
        |authenticated: Option<bool>, audiences: Option<Vec<&str>>, user: &str| TokenReviewStatus {
            authenticated,
            audiences: audiences.map(|a| a.into_iter().map(String::from).collect()),
            user: Some(UserInfo {
                username: Some(user.into()),
                ..UserInfo::default()
            }),
            error: Some("token expired".into()),
        };
    let sa = "system:serviceaccount:demo:web";
    assert_eq!(
        judge_review(
            Some(&status(Some(true), Some(vec![TOKEN_AUDIENCE]), sa)),
            TOKEN_AUDIENCE
        ),
        Ok(account("demo", "web"))
    );
    // A review answered without audiences vouches for the API server's
    // own audience only.
    assert_eq!(
        judge_review(Some(&status(Some(true), None, sa)), TOKEN_AUDIENCE)
            .expect_err("no audience")
            .as_str(),
        "unauthenticated"
    );
    let refused = |s: Option<&TokenReviewStatus>| {
        judge_review(s, TOKEN_AUDIENCE)
            .expect_err("refused")
            .as_str()
    };
    assert_eq!(
        refused(Some(&status(Some(false), None, sa))),
        "unauthenticated"
    );
    assert_eq!(refused(Some(&status(None, None, sa))), "unauthenticated");
    assert_eq!(
        refused(Some(&status(
            Some(true),
            Some(vec!["https://kubernetes.default.svc"]),
            sa
        ))),
        "unauthenticated"
    );
    assert_eq!(
        refused(Some(&status(
            Some(true),
            Some(vec![TOKEN_AUDIENCE]),
            "system:node:worker-1"
        ))),
        "forbidden"
    );
    assert_eq!(refused(None), "unavailable");
    let e = judge_review(Some(&status(Some(false), None, sa)), TOKEN_AUDIENCE).expect_err("no");
    assert!(e.to_string().contains("token expired"), "{e}");
}

#[test]
fn tokens_files_are_checked_when_read() {
    let tokens = StaticTokens::parse(TOKENS, Path::new("t.yaml")).expect("valid");
    assert_eq!(
        tokens.lookup(b"web-token-0123456789"),
        Some(&account("demo", "web"))
    );
    assert_eq!(
        tokens.lookup(b"api-token-0123456789\n"),
        Some(&account("prod", "api"))
    );
    assert_eq!(tokens.lookup(b"web-token-012345678"), None);
    assert_eq!(tokens.lookup(b""), None);
    for (bad, why) in [
        (
            "- {token: short, namespace: demo, serviceAccount: web}",
            "shorter than 16",
        ),
        (
            "- {token: aaaaaaaaaaaaaaaaaaaa, namespace: demo, serviceAccount: web}\n\
             - {token: aaaaaaaaaaaaaaaaaaaa, namespace: demo, serviceAccount: api}",
            "twice",
        ),
        (
            "- {token: aaaaaaaaaaaaaaaaaaaa, namespace: Demo, serviceAccount: web}",
            "entry 0",
        ),
        ("- {token: aaaaaaaaaaaaaaaaaaaa, namespace: demo}", "t.yaml"),
        (
            "- {token: aaaaaaaaaaaaaaaaaaaa, namespace: demo, serviceAccount: web, x: 1}",
            "t.yaml",
        ),
        ("tokens: [", "t.yaml"),
    ] {
        let e = StaticTokens::parse(bad, Path::new("t.yaml")).expect_err(bad);
        assert!(e.to_string().contains(why), "{bad}: {e}");
    }
    assert!(format!("{tokens:?}").contains("count: 3"));
    assert!(!format!("{tokens:?}").contains("web-token"));
}

#[tokio::test]
async fn a_tokens_file_that_goes_missing_keeps_the_last_tokens_and_is_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tokens.yaml");
    std::fs::write(&path, TOKENS).expect("write");
    let (tokens, text) = StaticTokens::load(&path).expect("load");
    let (tx, rx) = watch::channel(tokens);
    let reloads = ReloadCounter::default();
    let task = spawn_tokens_reload(
        path.clone(),
        text,
        tx,
        Duration::from_millis(10),
        reloads.clone(),
    );
    let count = |result| reloads.get_or_create(&ResultLabels { result }).get();
    std::fs::remove_file(&path).expect("remove");
    crate::testing::until("the missing file counted", || count("error") == 1).await;
    assert!(rx.borrow().lookup(b"web-token-0123456789").is_some());
    // Counted once, not once a poll.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(count("error"), 1);
    std::fs::write(
        &path,
        "- {token: db-token-0123456789x, namespace: demo, serviceAccount: db}\n",
    )
    .expect("write");
    crate::testing::until("the new file applied", || count("ok") == 1).await;
    assert!(rx.borrow().lookup(b"web-token-0123456789").is_none());
    assert_eq!(
        rx.borrow().lookup(b"db-token-0123456789x"),
        Some(&account("demo", "db"))
    );
    task.abort();
}

#[tokio::test]
async fn a_valid_request_gets_a_leaf_for_its_key_chained_to_the_root() {
    let (root, service) = service();
    let (req, msg) = request(
        "spiffe://west.strait.local/ns/demo/sa/web",
        "web-token-0123456789",
    );
    let response = service.handle(msg).await.expect("issued");
    assert_eq!(response.intermediate_certificates.len(), 1);
    let now = strait_proxy::metrics::unix_seconds(std::time::SystemTime::now());
    assert!((now + 3500..=now + 3700).contains(&response.valid_until_unix_seconds));
    let mut chain = vec![rustls_pki_types::CertificateDer::from(
        response.leaf_certificate.clone(),
    )];
    chain.extend(
        response
            .intermediate_certificates
            .iter()
            .map(|c| rustls_pki_types::CertificateDer::from(c.clone())),
    );
    // The proxy's own checks: this identity, this key, the root's chain.
    let leaf = req
        .into_leaf(chain.clone())
        .expect("the leaf of our request");
    assert_eq!(
        leaf.id.as_str(),
        "spiffe://west.strait.local/ns/demo/sa/web"
    );
    let anchors = strait_proxy::identity::TrustAnchors::from_pem(root.cert_pem.as_bytes(), "root")
        .expect("anchors");
    let verifier = strait_proxy::identity::ExpectedPeerVerifier::new(
        anchors.roots(),
        leaf.id.clone(),
        Arc::new(|_| {}),
    );
    use rustls::client::danger::ServerCertVerifier;
    verifier
        .verify_server_cert(
            &chain[0],
            &chain[1..],
            &rustls_pki_types::ServerName::try_from("x").expect("name"),
            &[],
            rustls_pki_types::UnixTime::now(),
        )
        .expect("chains to the root");
    // Another request's key does not match this leaf.
    let (other, _) = request("spiffe://west.strait.local/ns/demo/sa/web", "x");
    let e = other.into_leaf(chain).expect_err("another key");
    assert!(e.to_string().contains("another public key"), "{e}");
}

#[tokio::test]
async fn bad_requests_are_refused_with_the_right_code_and_counted() {
    let (_, service) = service();
    let web = "spiffe://west.strait.local/ns/demo/sa/web";
    let (_, ok) = request(web, "web-token-0123456789");
    let cases: Vec<(CertifyRequest, tonic::Code, &str)> = vec![
        (
            CertifyRequest {
                token: Vec::new(),
                ..ok.clone()
            },
            tonic::Code::Unauthenticated,
            "unauthenticated",
        ),
        (
            CertifyRequest {
                token: b"wrong-token-0123456789".to_vec(),
                ..ok.clone()
            },
            tonic::Code::Unauthenticated,
            "unauthenticated",
        ),
        (
            // The api account's token, asking for web.
            CertifyRequest {
                token: b"api-token-0123456789".to_vec(),
                ..ok.clone()
            },
            tonic::Code::PermissionDenied,
            "forbidden",
        ),
        (
            CertifyRequest {
                certificate_signing_request: b"\x30\x03\x02\x01\x00".to_vec(),
                ..ok.clone()
            },
            tonic::Code::InvalidArgument,
            "invalid",
        ),
        (
            // A request whose signature does not cover its contents.
            CertifyRequest {
                certificate_signing_request: {
                    let mut csr = ok.certificate_signing_request.clone();
                    let n = csr.len();
                    csr[n - 5] ^= 0x40;
                    csr
                },
                ..ok.clone()
            },
            tonic::Code::InvalidArgument,
            "invalid",
        ),
        (
            // A request naming another identity in its SANs.
            {
                let (_, m) = request("spiffe://west.strait.local/ns/demo/sa/api", "x");
                CertifyRequest {
                    certificate_signing_request: m.certificate_signing_request,
                    ..ok.clone()
                }
            },
            tonic::Code::InvalidArgument,
            "invalid",
        ),
        (
            CertifyRequest {
                identity: "spiffe://west.strait.local/ns/demo/sa/web/extra".into(),
                ..ok.clone()
            },
            tonic::Code::PermissionDenied,
            "forbidden",
        ),
        (
            // The gateway's own service account may not be the gateway.
            {
                let gw = "spiffe://west.strait.local/ns/strait-system/sa/strait-gateway";
                let (_, m) = request(gw, "gw-token-0123456789");
                m
            },
            tonic::Code::PermissionDenied,
            "forbidden",
        ),
        (
            CertifyRequest {
                identity: "https://west.strait.local/ns/demo/sa/web".into(),
                ..ok.clone()
            },
            tonic::Code::InvalidArgument,
            "invalid",
        ),
    ];
    for (i, (req, code, label)) in cases.into_iter().enumerate() {
        let status = Identity::certify(&service, Request::new(req))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), code, "case {i}: {status:?}");
        assert!(
            service
                .requests
                .get_or_create(&ResultLabels { result: label })
                .get()
                >= 1,
            "case {i}: counted as {label}"
        );
    }
    Identity::certify(&service, Request::new(ok))
        .await
        .expect("the good one still works");
    assert_eq!(
        service
            .requests
            .get_or_create(&ResultLabels { result: "ok" })
            .get(),
        1
    );
}
