use super::*;

fn export(ns: &str, name: &str, port: u16) -> Export {
    Export {
        key: ServiceKey::new(ns, name),
        service_type: ServiceType::ClusterSetIp,
        ports: vec![Port {
            name: "http".into(),
            port,
            protocol: Protocol::Tcp,
            app_protocol: Some("http".into()),
        }],
    }
}

fn catalog(items: &[Export]) -> Catalog {
    items.iter().map(|e| (e.key.clone(), e.clone())).collect()
}

#[test]
fn diff_reports_changes_and_removals_only() {
    let old = catalog(&[
        export("a", "x", 80),
        export("a", "y", 80),
        export("b", "z", 80),
    ]);
    let new = catalog(&[
        export("a", "x", 80),
        export("a", "y", 81),
        export("c", "w", 80),
    ]);
    let (up, rm) = diff(&old, &new);
    assert_eq!(up, vec![export("a", "y", 81), export("c", "w", 80)]);
    assert_eq!(rm, vec![ServiceKey::new("b", "z")]);
    assert_eq!(diff(&new, &new), (vec![], vec![]));
}

#[test]
fn wire_round_trip() {
    let e = export("demo", "hello", 8080);
    let wire = pb::Export::from(&e);
    assert_eq!(Export::try_from(&wire), Ok(e));
}

#[test]
fn invalid_exports_from_peers_are_refused() {
    let good = pb::Export::from(&export("demo", "hello", 8080));
    let mut bad = good.clone();
    bad.namespace = "Demo".into();
    assert!(matches!(
        Export::try_from(&bad),
        Err(InvalidExport::Label { .. })
    ));
    let mut bad = good.clone();
    bad.name = "a".repeat(64);
    assert!(Export::try_from(&bad).is_err());
    let mut bad = good.clone();
    bad.ports[0].port = 70000;
    assert_eq!(Export::try_from(&bad), Err(InvalidExport::PortRange(70000)));
    let mut bad = good.clone();
    bad.ports[0].port = 0;
    assert!(Export::try_from(&bad).is_err());
    let mut bad = good.clone();
    bad.ports[0].protocol = "QUIC".into();
    assert!(Export::try_from(&bad).is_err());
    let mut bad = good.clone();
    bad.ports.push(bad.ports[0].clone());
    assert!(matches!(
        Export::try_from(&bad),
        Err(InvalidExport::DuplicatePort(_))
    ));
    let mut bad = good.clone();
    bad.ports = (1..=101)
        .map(|p| pb::Port {
            name: String::new(),
            port: p,
            protocol: "TCP".into(),
            app_protocol: String::new(),
        })
        .collect();
    assert_eq!(
        Export::try_from(&bad),
        Err(InvalidExport::TooManyPorts(101))
    );
    // appProtocol: what Kubernetes takes, and nothing of any length.
    for ok in [
        "http",
        "kubernetes.io/h2c",
        "grpc",
        "example.com/my-proto.v1",
        "HTTP2",
    ] {
        let mut e = good.clone();
        e.ports[0].app_protocol = ok.into();
        assert!(Export::try_from(&e).is_ok(), "{ok}");
    }
    for wrong in [
        "x".repeat(100_000),
        "a/b/c".into(),
        "/h2c".into(),
        "Example.com/h2c".into(),
        "-http".into(),
        "http proto".into(),
        "a".repeat(64),
    ] {
        let mut e = good.clone();
        e.ports[0].app_protocol = wrong.clone();
        match Export::try_from(&e) {
            Err(err @ InvalidExport::AppProtocol(_)) => {
                assert!(err.to_string().len() < 300, "the value is cut short")
            }
            other => panic!("{:.80}: {other:?}", wrong),
        }
    }
    let mut bad = good.clone();
    bad.namespace = "n".repeat(1_000_000);
    let err = Export::try_from(&bad).expect_err("too long").to_string();
    assert!(err.len() < 300, "{}", err.len());
    let mut bad = good;
    bad.ports.clear();
    assert_eq!(Export::try_from(&bad), Err(InvalidExport::NoPorts));
}

#[test]
fn labels() {
    for ok in ["a", "hello", "a-1", &"x".repeat(63)] {
        assert!(validate_label("n", ok).is_ok(), "{ok}");
    }
    for bad in ["", "-a", "a-", "A", "a.b", "a_b", &"x".repeat(64)] {
        assert!(validate_label("n", bad).is_err(), "{bad}");
    }
}
