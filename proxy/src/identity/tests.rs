use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::{ClientConnection, ServerConnection};

use super::*;
use crate::tls;

struct Cluster {
    issuer: Issuer,
    id: SpiffeId,
}

fn cluster(root: &PemPair, td: &str) -> Cluster {
    let pem = generate_issuer(root, td).expect("issuer");
    let issuer = Issuer::from_pem(pem.cert_pem.as_bytes(), pem.key_pem.as_bytes()).expect("load");
    assert_eq!(issuer.trust_domain(), td);
    let id = SpiffeId::workload(td, "strait-system", "strait-gateway").expect("id");
    Cluster { issuer, id }
}

fn anchors(root: &PemPair) -> TrustAnchors {
    TrustAnchors::from_pem(root.cert_pem.as_bytes(), "root").expect("anchors")
}

fn recorder() -> (RefusalSink, Arc<Mutex<Vec<RefusalReason>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    (Arc::new(move |r| s.lock().expect("lock").push(r)), seen)
}

/// Runs a TLS handshake between two in-memory connections.
fn handshake(c: &mut ClientConnection, s: &mut ServerConnection) -> Result<(), rustls::Error> {
    for _ in 0..10 {
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).expect("write");
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            s.read_tls(&mut rd).expect("read");
        }
        s.process_new_packets()?;
        let mut buf = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut buf).expect("write");
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            c.read_tls(&mut rd).expect("read");
        }
        c.process_new_packets()?;
        if !c.is_handshaking() && !s.is_handshaking() {
            return Ok(());
        }
    }
    Err(rustls::Error::General("handshake did not finish".into()))
}

fn connect(
    client: &Cluster,
    client_roots: &TrustAnchors,
    expect: &SpiffeId,
    server: &Cluster,
    server_roots: &TrustAnchors,
    allowed: &[SpiffeId],
) -> (
    Result<(), rustls::Error>,
    Vec<RefusalReason>,
    Vec<RefusalReason>,
) {
    let (csink, cseen) = recorder();
    let (ssink, sseen) = recorder();
    let cstore = CertStore::new(
        &client
            .issuer
            .issue(&client.id, DEFAULT_LEAF_LIFETIME)
            .expect("leaf"),
    )
    .expect("store");
    let sstore = CertStore::new(
        &server
            .issuer
            .issue(&server.id, DEFAULT_LEAF_LIFETIME)
            .expect("leaf"),
    )
    .expect("store");
    let peers = AllowedPeers::default();
    peers.set(allowed.iter().cloned());
    let ccfg = tls::client_config(
        ExpectedPeerVerifier::new(client_roots.roots(), expect.clone(), csink),
        cstore,
        &[tls::TUNNEL_ALPN],
    )
    .expect("client config");
    let scfg = tls::server_config(
        LinkedPeersVerifier::new(server_roots.roots(), peers, ssink).expect("verifier"),
        sstore,
        &[tls::TUNNEL_ALPN],
    )
    .expect("server config");
    let mut c = ClientConnection::new(Arc::new(ccfg), "strait-gateway".try_into().expect("name"))
        .expect("client");
    let mut s = ServerConnection::new(Arc::new(scfg)).expect("server");
    let r = handshake(&mut c, &mut s);
    if r.is_ok() {
        let presented = s.peer_certificates().expect("client certs");
        assert_eq!(identity_of(presented).as_ref(), Some(&client.id));
    }
    let c = cseen.lock().expect("lock").clone();
    let s = sseen.lock().expect("lock").clone();
    (r, c, s)
}

#[test]
fn linked_peers_complete_mutual_tls() {
    let root = generate_root("test").expect("root");
    let a = anchors(&root);
    let west = cluster(&root, "west.strait.local");
    let east = cluster(&root, "east.strait.local");
    let (r, c, s) = connect(
        &west,
        &a,
        &east.id,
        &east,
        &a,
        std::slice::from_ref(&west.id),
    );
    r.expect("handshake");
    assert!(c.is_empty() && s.is_empty());
}

#[test]
fn another_root_is_refused_and_reported() {
    let root = generate_root("test").expect("root");
    let other = generate_root("other").expect("root");
    let west = cluster(&root, "west.strait.local");
    let east = cluster(&other, "east.strait.local");
    let (r, c, _) = connect(
        &west,
        &anchors(&root),
        &east.id,
        &east,
        &anchors(&other),
        std::slice::from_ref(&west.id),
    );
    assert!(r.is_err());
    assert_eq!(c, vec![RefusalReason::UnknownIssuer]);
}

#[test]
fn unexpected_server_identity_is_refused() {
    let root = generate_root("test").expect("root");
    let a = anchors(&root);
    let west = cluster(&root, "west.strait.local");
    let east = cluster(&root, "east.strait.local");
    let wanted =
        SpiffeId::workload("north.strait.local", "strait-system", "strait-gateway").expect("id");
    let (r, c, _) = connect(
        &west,
        &a,
        &wanted,
        &east,
        &a,
        std::slice::from_ref(&west.id),
    );
    assert!(r.is_err());
    assert_eq!(c, vec![RefusalReason::UnexpectedIdentity]);
}

#[test]
fn unlinked_client_is_refused_by_the_listener() {
    let root = generate_root("test").expect("root");
    let a = anchors(&root);
    let west = cluster(&root, "west.strait.local");
    let east = cluster(&root, "east.strait.local");
    let (r, _, s) = connect(&west, &a, &east.id, &east, &a, &[]);
    assert!(r.is_err());
    assert_eq!(s, vec![RefusalReason::UnexpectedIdentity]);
}

#[test]
fn an_issuer_cannot_mint_another_trust_domain() {
    let root = generate_root("test").expect("root");
    let east = cluster(&root, "east.strait.local");
    let west_id =
        SpiffeId::workload("west.strait.local", "strait-system", "strait-gateway").expect("id");
    assert!(east.issuer.issue(&west_id, DEFAULT_LEAF_LIFETIME).is_err());
}

#[test]
fn spiffe_ids_are_validated() {
    let id = SpiffeId::parse("spiffe://east.strait.local/ns/demo/sa/hello").expect("valid");
    assert_eq!(id.trust_domain(), "east.strait.local");
    for bad in [
        "http://x/y",
        "spiffe://",
        "spiffe://UPPER/x",
        "spiffe://td//x",
        "spiffe://td/../x",
        "spiffe://td/x/",
    ] {
        assert!(SpiffeId::parse(bad).is_err(), "{bad} should be refused");
    }
}

#[test]
fn malformed_pem_gives_clear_errors() {
    assert!(matches!(
        TrustAnchors::from_pem(b"not a pem", "x"),
        Err(CertError::NoCertificate(_))
    ));
    assert!(Issuer::from_pem(
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        b"junk"
    )
    .is_err());
}

#[tokio::test]
async fn rotation_swaps_the_leaf_before_expiry() {
    let root = generate_root("test").expect("root");
    let east = cluster(&root, "east.strait.local");
    let leaf = east
        .issuer
        .issue(&east.id, Duration::from_secs(3))
        .expect("leaf");
    let first = leaf.not_after;
    let store = CertStore::new(&leaf).expect("store");
    let renewals = Arc::new(AtomicUsize::new(0));
    let r = renewals.clone();
    // Rotation needs its own issuer handle: re-load the same issuer PEMs.
    let pem = generate_issuer(&root, "east.strait.local").expect("issuer");
    let issuer =
        Arc::new(Issuer::from_pem(pem.cert_pem.as_bytes(), pem.key_pem.as_bytes()).expect("load"));
    let task = spawn_rotation(
        issuer,
        store.clone(),
        Duration::from_secs(3),
        Duration::from_millis(100),
        move |_| {
            r.fetch_add(1, Ordering::SeqCst);
        },
    );
    tokio::time::sleep(Duration::from_millis(2600)).await;
    task.abort();
    assert!(
        renewals.load(Ordering::SeqCst) >= 1,
        "renewed at 2/3 of life"
    );
    assert!(store.not_after() > first);
}

/// Mints a leaf for `id` with `signer`'s key, bypassing `Issuer::issue`'s
/// own trust-domain check (what a malicious cluster would do).
fn forge(
    signer: &PemPair,
    id: &SpiffeId,
) -> (
    rustls::pki_types::CertificateDer<'static>,
    rustls::pki_types::PrivateKeyDer<'static>,
) {
    use rcgen::{CertificateParams, KeyPair, SanType};
    use rustls_pki_types::pem::PemObject;
    let signer_key = KeyPair::from_pem(&signer.key_pem).expect("key");
    let signer_der =
        rustls::pki_types::CertificateDer::from_pem_slice(signer.cert_pem.as_bytes()).expect("der");
    let issuer = rcgen::Issuer::from_ca_cert_der(&signer_der, signer_key).expect("issuer");
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(id.as_str().try_into().expect("uri"))];
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = p.signed_by(&key, &issuer).expect("signed");
    (
        cert.der().clone(),
        rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
    )
}

#[test]
fn a_reordered_chain_cannot_borrow_another_issuers_trust_domain() {
    use rustls::client::danger::ServerCertVerifier;
    use rustls::server::danger::ClientCertVerifier;
    use rustls_pki_types::pem::PemObject;
    let root = generate_root("test").expect("root");
    let east_pem = generate_issuer(&root, "east.strait.local").expect("east");
    let mallory_pem = generate_issuer(&root, "mallory.strait.local").expect("mallory");
    let east_id =
        SpiffeId::workload("east.strait.local", "strait-system", "strait-gateway").expect("id");
    let (leaf, _) = forge(&mallory_pem, &east_id);
    let east_der = rustls::pki_types::CertificateDer::from_pem_slice(east_pem.cert_pem.as_bytes())
        .expect("der");
    let mallory_der =
        rustls::pki_types::CertificateDer::from_pem_slice(mallory_pem.cert_pem.as_bytes())
            .expect("der");
    let a = anchors(&root);
    let now = rustls::pki_types::UnixTime::now();
    for chain in [
        vec![east_der.clone(), mallory_der.clone()],
        vec![mallory_der.clone()],
        vec![mallory_der, east_der],
    ] {
        let (sink, seen) = recorder();
        let v = ExpectedPeerVerifier::new(a.roots(), east_id.clone(), sink);
        let name = rustls::pki_types::ServerName::try_from("strait-gateway").expect("name");
        assert!(
            v.verify_server_cert(&leaf, &chain, &name, &[], now)
                .is_err(),
            "dialer accepted a forged east"
        );
        assert_eq!(
            *seen.lock().expect("lock"),
            vec![RefusalReason::TrustDomainMismatch]
        );
        let (sink, _) = recorder();
        let allowed = AllowedPeers::default();
        allowed.set([east_id.clone()]);
        let v = LinkedPeersVerifier::new(a.roots(), allowed, sink).expect("verifier");
        assert!(
            v.verify_client_cert(&leaf, &chain, now).is_err(),
            "listener accepted a forged east"
        );
    }
}

#[test]
fn a_peer_with_its_own_trust_bundle_must_chain_to_it_alone() {
    use rustls::server::danger::ClientCertVerifier;
    use rustls_pki_types::pem::PemObject;
    let own_root = generate_root("west").expect("root");
    let east_root = generate_root("east").expect("root");
    let east_id =
        SpiffeId::workload("east.strait.local", "strait-system", "strait-gateway").expect("id");
    let der =
        |pem: &str| rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).expect("der");
    // The real east, under its own root; and an east forged under ours.
    let east_issuer = generate_issuer(&east_root, "east.strait.local").expect("issuer");
    let (real, _) = forge(&east_issuer, &east_id);
    let forger = generate_issuer(&own_root, "east.strait.local").expect("issuer");
    let (fake, _) = forge(&forger, &east_id);
    let now = rustls::pki_types::UnixTime::now();
    let verify = |bundle: Option<&PemPair>,
                  leaf: &rustls::pki_types::CertificateDer<'static>,
                  chain: &PemPair| {
        let (sink, seen) = recorder();
        let allowed = AllowedPeers::default();
        allowed
            .set_with_roots([(east_id.clone(), bundle.map(|b| anchors(b).roots()))])
            .expect("roots");
        let v =
            LinkedPeersVerifier::new(anchors(&own_root).roots(), allowed, sink).expect("verifier");
        let r = v.verify_client_cert(leaf, &[der(&chain.cert_pem)], now);
        let seen = seen.lock().expect("lock").clone();
        (r.is_ok(), seen)
    };
    assert_eq!(
        verify(Some(&east_root), &real, &east_issuer),
        (true, vec![])
    );
    assert_eq!(
        verify(None, &real, &east_issuer),
        (false, vec![RefusalReason::UnknownIssuer]),
        "without the bundle, east's root is unknown here"
    );
    assert_eq!(
        verify(Some(&east_root), &fake, &forger),
        (false, vec![RefusalReason::UnknownIssuer]),
        "with a bundle, our own root no longer vouches for east"
    );
}

/// A client with no certificate of its own expecting `id`.
fn certless_client(root: &PemPair, id: &SpiffeId) -> ClientConnection {
    let (sink, _) = recorder();
    let client = tls::client_config(
        ExpectedPeerVerifier::new(anchors(root).roots(), id.clone(), sink),
        CertStore::pending(id.clone()),
        &[b"t"],
    )
    .expect("client");
    ClientConnection::new(Arc::new(client), "x".try_into().expect("name")).expect("client conn")
}

#[tokio::test]
async fn a_pending_store_offers_nothing_until_its_first_leaf() {
    let root = generate_root("test").expect("root");
    let west = cluster(&root, "west.strait.local");
    let store = CertStore::pending(west.id.clone());
    assert!(!store.is_certified());
    assert!(!rustls::client::ResolvesClientCert::has_certs(&*store));
    assert_eq!(store.not_after(), std::time::SystemTime::UNIX_EPOCH);
    // A handshake needing its certificate fails while pending.
    let server = tls::server_auth_only_config(store.clone(), &[b"t"]).expect("server");
    let mut c = certless_client(&root, &west.id);
    let mut s = ServerConnection::new(Arc::new(server)).expect("server conn");
    assert!(handshake(&mut c, &mut s).is_err());

    // A leaf for another identity is refused; its own is taken.
    let other = SpiffeId::workload("west.strait.local", "demo", "web").expect("id");
    let wrong = west
        .issuer
        .issue(&other, Duration::from_secs(60))
        .expect("leaf");
    assert!(matches!(store.store(&wrong), Err(CertError::Mismatch(_))));
    let waiter = tokio::spawn({
        let store = store.clone();
        async move { store.certified().await }
    });
    let leaf = west
        .issuer
        .issue(&west.id, Duration::from_secs(60))
        .expect("leaf");
    store.store(&leaf).expect("stored");
    tokio::time::timeout(Duration::from_secs(1), waiter)
        .await
        .expect("woken")
        .expect("task");
    assert!(store.is_certified());
    assert_eq!(store.not_after(), leaf.not_after);
    let mut s = ServerConnection::new(Arc::new(
        tls::server_auth_only_config(store.clone(), &[b"t"]).expect("server"),
    ))
    .expect("server conn");
    let mut c = certless_client(&root, &west.id);
    handshake(&mut c, &mut s).expect("server-auth handshake once certified");
}

#[test]
fn a_signing_request_is_certified_only_for_its_own_name() {
    let root = generate_root("test").expect("root");
    let west = cluster(&root, "west.strait.local");
    let web = SpiffeId::workload("west.strait.local", "demo", "web").expect("id");
    let req = CertRequest::new(&web).expect("request");
    let (chain, not_after) = west
        .issuer
        .certify(&web, req.csr_der(), Duration::from_secs(600))
        .expect("certified");
    let leaf = req.into_leaf(chain).expect("leaf");
    assert_eq!(leaf.id, web);
    // Certificates keep whole seconds.
    let gap = not_after.duration_since(leaf.not_after).expect("not later");
    assert!(gap < Duration::from_secs(1), "{gap:?}");
    // Its SAN names web: not certified as api, nor from another domain.
    let api = SpiffeId::workload("west.strait.local", "demo", "api").expect("id");
    let req = CertRequest::new(&web).expect("request");
    assert!(matches!(
        west.issuer
            .certify(&api, req.csr_der(), Duration::from_secs(600)),
        Err(CertError::Request(_))
    ));
    let east_web = SpiffeId::workload("east.strait.local", "demo", "web").expect("id");
    let req = CertRequest::new(&east_web).expect("request");
    assert!(west
        .issuer
        .certify(&east_web, req.csr_der(), Duration::from_secs(600))
        .is_err());
    // Keys other than P-256 are refused (the leaf would mislabel them).
    for alg in [&rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_ED25519] {
        let key = rcgen::KeyPair::generate_for(alg).expect("key");
        let mut p = rcgen::CertificateParams::default();
        p.subject_alt_names = vec![rcgen::SanType::URI(web.as_str().try_into().expect("uri"))];
        let csr = p.serialize_request(&key).expect("csr");
        assert!(matches!(
            west.issuer
                .certify(&web, csr.der(), Duration::from_secs(600)),
            Err(CertError::Request(_))
        ));
    }
    // Garbage is a clean error.
    for junk in [&b""[..], b"\x30\x00", b"not DER at all"] {
        assert!(matches!(
            west.issuer.certify(&web, junk, Duration::from_secs(600)),
            Err(CertError::Request(_))
        ));
    }
    // A chain issued for another request's key is refused by the asker.
    let mine = CertRequest::new(&web).expect("request");
    let theirs = CertRequest::new(&web).expect("request");
    let (chain, _) = west
        .issuer
        .certify(&web, theirs.csr_der(), Duration::from_secs(600))
        .expect("certified");
    assert!(matches!(mine.into_leaf(chain), Err(CertError::Mismatch(_))));
}

#[test]
fn renewals_are_spread_and_never_hot() {
    let near = |a: Duration, secs: f64| (a.as_secs_f64() - secs).abs() < 0.001;
    let day = 24.0 * 3600.0;
    let left = Duration::from_secs_f64(day);
    assert!(near(renew_after(left, 0.0), day * 2.0 / 3.0 * 0.9));
    assert!(near(renew_after(left, 1.0), day * 2.0 / 3.0 * 1.1));
    // Short leaves (an issuer about to expire): at least 30 s, or all that
    // is left.
    assert!(near(renew_after(Duration::from_secs(60), 0.5), 40.0));
    assert!(near(renew_after(Duration::from_secs(40), 0.0), 30.0));
    assert!(near(renew_after(Duration::from_secs(46), 1.0), 33.733));
    assert!(near(renew_after(Duration::from_secs(20), 0.0), 20.0));
    assert!(near(renew_after(Duration::from_secs(2), 1.0), 2.0));
    assert_eq!(renew_after(Duration::ZERO, 0.3), Duration::ZERO);
}

proptest::proptest! {
    /// Any text: an answer, never a panic. An ID that parses names its
    /// trust domain as written, prints as it was read, and parses again to
    /// itself.
    #[test]
    fn spiffe_ids_parse_to_what_they_print(
        text in proptest::prop_oneof![
            "spiffe://[a-zA-Z0-9._/%:@-]{0,40}",
            "[sS]piffe:/{0,3}[a-z.]{0,8}(/[a-zA-Z0-9._-]{0,6}){0,4}/?",
            ".{0,60}",
        ],
    ) {
        if let Ok(id) = SpiffeId::parse(&text) {
            let domain = text["spiffe://".len()..].split('/').next().unwrap_or_default();
            proptest::prop_assert_eq!(id.trust_domain(), domain);
            proptest::prop_assert_eq!(id.to_string(), text.clone());
            proptest::prop_assert_eq!(SpiffeId::parse(&id.to_string()), Ok(id));
        }
    }
}
