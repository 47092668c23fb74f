use std::path::Path;

use strait_proto::destination::v1::destination_client::DestinationClient;

use super::*;
use crate::source::file;

const CLUSTER: &str = r#"
services:
  - namespace: demo
    name: hello
    ports:
      - { name: http, port: 8080, appProtocol: http }
      - { name: admin, port: 9090 }
      - { name: dns, port: 53, protocol: UDP }
    endpoints:
      - { name: hello-1, ip: 10.0.0.2, ports: { http: 18080 }, identity: "spiffe://west.strait.local/ns/demo/sa/hello" }
      - { name: hello-0, ip: 10.0.0.1, ports: { http: 18080 } }
      - { name: hello-2, ip: 10.0.0.3, ready: false }
  - namespace: demo
    name: empty
    ports: [{ port: 80, appProtocol: kubernetes.io/h2c }]
    endpoints:
      - { name: e-0, ip: 10.0.1.1, ready: false }
"#;

fn state(yaml: &str) -> ClusterState {
    file::parse(yaml, Path::new("c.yaml")).expect("valid cluster")
}

fn svc(ns: &str, name: &str, port: u16) -> Target {
    Target::Service {
        key: ServiceKey::new(ns, name),
        port,
    }
}

fn addrs(update: &Update) -> Vec<(String, String, ProtocolHint)> {
    match &update.update {
        Some(update::Update::Set(s)) => s
            .addrs
            .iter()
            .map(|a| (a.addr.clone(), a.identity.clone(), a.protocol_hint()))
            .collect(),
        other => panic!("expected a set, got {other:?}"),
    }
}

#[test]
fn authorities_parse_in_every_cluster_form() {
    for a in [
        "hello.demo.svc.cluster.local:8080",
        "hello.demo.svc.cluster.local.:8080",
        "Hello.Demo.SVC.Cluster.Local:8080",
        "hello.demo.svc:8080",
        "hello.demo:8080",
    ] {
        assert_eq!(parse_authority(a), Ok(svc("demo", "hello", 8080)), "{a}");
    }
    assert_eq!(
        parse_authority("10.0.0.7:8080"),
        Ok(Target::Addr("10.0.0.7:8080".parse().expect("addr")))
    );
    assert_eq!(
        parse_authority("[fd00::7]:80"),
        Ok(Target::Addr("[fd00::7]:80".parse().expect("addr")))
    );
}

#[test]
fn other_authorities_are_refused_with_a_reason() {
    for (a, want) in [
        ("hello.demo.svc.cluster.local", "has no port"),
        ("hello.demo:0", "invalid port"),
        ("hello.demo:http", "invalid port"),
        ("hello.demo:70000", "invalid port"),
        ("hello.demo:+80", "invalid port"),
        ("hello.demo: 80", "invalid port"),
        ("10.0.0.7:0", "invalid port"),
        ("hello:8080", "not a cluster-local"),
        ("api.example.com:443", "not a cluster-local"),
        ("hello.demo.svc.other.domain:80", "not a cluster-local"),
        ("hello.demo.svc.cluster.local.x:80", "not a cluster-local"),
        ("hel_lo.demo:80", "DNS label"),
        ("hello..svc:80", "DNS label"),
        (":80", "not a cluster-local"),
    ] {
        let err = parse_authority(a).expect_err(a).to_string();
        assert!(err.contains(want), "{a}: {err}");
    }
}

#[test]
fn service_ports_list_ready_endpoints_at_their_target_ports() {
    let s = state(CLUSTER);
    let u = lookup(&s, &svc("demo", "hello", 8080));
    assert_eq!(
        addrs(&u),
        vec![
            ("10.0.0.1:18080".into(), String::new(), ProtocolHint::Http1),
            (
                "10.0.0.2:18080".into(),
                "spiffe://west.strait.local/ns/demo/sa/hello".into(),
                ProtocolHint::Http1
            ),
        ],
        "ordered by address, not-ready hello-2 left out"
    );
    let Some(update::Update::Set(set)) = &u.update else {
        panic!("set")
    };
    assert!(set.addrs.iter().all(|a| a.weight == 1));
    // A port with no target mapping uses the service port number.
    assert_eq!(
        addrs(&lookup(&s, &svc("demo", "hello", 9090))),
        vec![
            ("10.0.0.1:9090".into(), String::new(), ProtocolHint::Unknown),
            (
                "10.0.0.2:9090".into(),
                "spiffe://west.strait.local/ns/demo/sa/hello".into(),
                ProtocolHint::Unknown
            ),
        ]
    );
}

#[test]
fn missing_things_are_no_endpoints() {
    let s = state(CLUSTER);
    let none = |exists| Update {
        update: Some(update::Update::NoEndpoints(NoEndpoints { exists })),
    };
    assert_eq!(lookup(&s, &svc("demo", "nope", 8080)), none(false));
    assert_eq!(lookup(&s, &svc("other", "hello", 8080)), none(false));
    assert_eq!(
        lookup(&s, &svc("demo", "hello", 18080)),
        none(false),
        "a target port is not a service port"
    );
    assert_eq!(
        lookup(&s, &svc("demo", "hello", 53)),
        none(false),
        "UDP ports are not proxied"
    );
    assert_eq!(
        lookup(&s, &svc("demo", "empty", 80)),
        none(true),
        "exists, nothing ready"
    );
    assert_eq!(
        lookup(&ClusterState::default(), &svc("a", "b", 1)),
        none(false)
    );
}

#[test]
fn endpoint_addresses_answer_that_endpoint_alone() {
    let s = state(CLUSTER);
    let addr = |a: &str| Target::Addr(a.parse().expect("addr"));
    assert_eq!(
        addrs(&lookup(&s, &addr("10.0.0.2:18080"))),
        vec![(
            "10.0.0.2:18080".into(),
            "spiffe://west.strait.local/ns/demo/sa/hello".into(),
            ProtocolHint::Http1
        )]
    );
    assert_eq!(
        addrs(&lookup(&s, &addr("10.0.0.2:9090"))),
        vec![(
            "10.0.0.2:9090".into(),
            "spiffe://west.strait.local/ns/demo/sa/hello".into(),
            ProtocolHint::Unknown
        )]
    );
    assert_eq!(
        addrs(&lookup(&s, &addr("10.0.1.1:80"))),
        vec![("10.0.1.1:80".into(), String::new(), ProtocolHint::Http2)],
        "not ready, but the caller already chose it"
    );
    for a in ["10.0.0.2:8080", "10.0.0.9:18080", "10.0.0.1:53"] {
        assert!(
            matches!(
                lookup(&s, &addr(a)).update,
                Some(update::Update::NoEndpoints(NoEndpoints { exists: false }))
            ),
            "{a}"
        );
    }
}

#[test]
fn app_protocols_map_to_hints() {
    let port = |p: Option<&str>| Port {
        name: String::new(),
        port: 1,
        protocol: Protocol::Tcp,
        app_protocol: p.map(str::to_string),
    };
    for (p, hint) in [
        (None, ProtocolHint::Unknown),
        (Some("http"), ProtocolHint::Http1),
        (Some("HTTP"), ProtocolHint::Http1),
        (Some("kubernetes.io/h2c"), ProtocolHint::Http2),
        (Some("grpc"), ProtocolHint::Grpc),
        (Some("https"), ProtocolHint::Opaque),
        (Some("tcp"), ProtocolHint::Opaque),
        (Some("kubernetes.io/ws"), ProtocolHint::Unknown),
    ] {
        assert_eq!(protocol_hint(&port(p)), hint, "{p:?}");
    }
}

async fn next(s: &mut tonic::Streaming<Update>) -> Result<Option<Update>, Status> {
    tokio::time::timeout(Duration::from_secs(5), s.message())
        .await
        .expect("in time")
}

#[tokio::test]
async fn streams_the_current_set_then_changes_until_stopped() {
    let (tx, rx) = watch::channel(Arc::new(state(CLUSTER)));
    let server = DestinationServer::bind("127.0.0.1:0".parse().expect("addr"), rx, None, || {})
        .await
        .expect("bind");
    let mut client = DestinationClient::connect(format!("http://{}", server.local_addr()))
        .await
        .expect("connect");
    let get = |authority: &str| GetDestination {
        authority: authority.into(),
        context_token: String::new(),
    };

    let mut hello = client
        .get(get("hello.demo.svc.cluster.local:8080"))
        .await
        .expect("get")
        .into_inner();
    let first = next(&mut hello).await.expect("ok").expect("update");
    assert_eq!(addrs(&first).len(), 2);

    let mut later = client
        .get(get("later.demo:80"))
        .await
        .expect("get")
        .into_inner();
    let u = next(&mut later).await.expect("ok").expect("update");
    assert!(matches!(
        u.update,
        Some(update::Update::NoEndpoints(NoEndpoints { exists: false }))
    ));

    // hello loses an endpoint and `later` appears.
    let changed = CLUSTER.replace(
        "      - { name: hello-0, ip: 10.0.0.1, ports: { http: 18080 } }\n",
        "",
    ) + "  - { namespace: demo, name: later, ports: [{ port: 80 }], endpoints: [{ name: l, ip: 10.0.2.1 }] }\n";
    tx.send_replace(Arc::new(state(&changed)));
    let u = next(&mut hello).await.expect("ok").expect("update");
    assert_eq!(
        addrs(&u),
        vec![(
            "10.0.0.2:18080".into(),
            "spiffe://west.strait.local/ns/demo/sa/hello".into(),
            ProtocolHint::Http1
        )]
    );
    let u = next(&mut later).await.expect("ok").expect("update");
    assert_eq!(
        addrs(&u),
        vec![("10.0.2.1:80".into(), String::new(), ProtocolHint::Unknown)]
    );

    // A change elsewhere sends nothing: the next update hello sees is the
    // one after it.
    tx.send_replace(Arc::new(state(&changed.replace("10.0.2.1", "10.0.2.2"))));
    tx.send_replace(Arc::new(state(CLUSTER)));
    let u = next(&mut hello).await.expect("ok").expect("update");
    assert_eq!(addrs(&u).len(), 2);

    let err = client
        .get(get("api.example.com:443"))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    drop(server);
    assert!(
        next(&mut hello).await.expect("clean end").is_none(),
        "streams end when the server stops"
    );
}

proptest::proptest! {
    /// Every cluster form of every valid name, in any case, with or without
    /// the root dot, names the same service and port.
    #[test]
    fn every_cluster_form_names_the_service(
        name in "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?",
        ns in "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?",
        port in 1..=u16::MAX,
        form in 0..3usize,
        upper in proptest::collection::vec(proptest::prelude::any::<bool>(), 64),
        root_dot in proptest::prelude::any::<bool>(),
    ) {
        let suffix = ["", ".svc", ".svc.cluster.local"][form];
        let host: String = format!("{name}.{ns}{suffix}")
            .chars()
            .zip(upper.iter().cycle())
            .map(|(c, &up)| if up { c.to_ascii_uppercase() } else { c })
            .collect();
        let dot = if root_dot { "." } else { "" };
        let authority = format!("{host}{dot}:{port}");
        proptest::prop_assert_eq!(parse_authority(&authority), Ok(svc(&ns, &name, port)), "{}", authority);
    }

    /// Any text: an answer, never a panic, and a service only with valid
    /// labels and a port.
    #[test]
    fn any_authority_gets_an_answer(text in "[a-zA-Z0-9.:\\[\\]-]{0,40}|.{0,40}") {
        if let Ok(Target::Service { key, port }) = parse_authority(&text) {
            proptest::prop_assert!(port != 0);
            proptest::prop_assert!(crate::catalog::validate_label("namespace", &key.namespace).is_ok());
            proptest::prop_assert!(crate::catalog::validate_label("name", &key.name).is_ok());
        }
    }
}

#[tokio::test]
async fn one_address_gets_at_most_its_share_of_connections() {
    use tokio::io::AsyncReadExt;
    let (_tx, rx) = watch::channel(Arc::new(state(CLUSTER)));
    let server = DestinationServer::bind("127.0.0.1:0".parse().expect("addr"), rx, None, || {})
        .await
        .expect("bind");
    let addr = server.local_addr();
    let mut held = Vec::new();
    for _ in 0..MAX_CONTROL_CONNECTIONS_PER_SOURCE {
        held.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
    }
    // One more from the same address is closed as soon as it is accepted.
    let mut extra = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf))
        .await
        .expect("closed, not left waiting");
    assert!(read.is_err() || read.is_ok_and(|n| n == 0));
    // One given back is one to be had: a client gets its answers again.
    held.clear();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let connected = DestinationClient::connect(format!("http://{addr}")).await;
        if let Ok(mut client) = connected {
            let got = client
                .get(GetDestination {
                    authority: "hello.demo.svc.cluster.local:8080".into(),
                    context_token: String::new(),
                })
                .await;
            if got.is_ok() {
                break;
            }
        }
        assert!(std::time::Instant::now() < deadline, "no slot came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
