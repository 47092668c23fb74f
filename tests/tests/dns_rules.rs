//! The clusterset DNS server against the MCS DNS specification and the
//! protocol rules, checked with real `dig` over UDP and TCP, IPv4 and IPv6.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use prometheus_client::registry::Registry;
use strait_dns::{
    DnsMetrics, DnsServer, HeadlessEndpoint, PortProtocol, ServiceKind, ServicePort, ServiceRecord,
    Zone, ZoneHandle,
};
use strait_tests::dig_full;

fn port(name: &str, port: u16) -> ServicePort {
    ServicePort {
        name: name.into(),
        port,
        protocol: PortProtocol::Tcp,
    }
}

fn services() -> Vec<ServiceRecord> {
    let many = (0..100u8)
        .map(|i| HeadlessEndpoint {
            cluster: "east".into(),
            hostname: Some(format!("node-{i}")),
            ips: vec![IpAddr::V4(Ipv4Addr::new(10, 9, 0, i))],
        })
        .collect();
    vec![
        ServiceRecord {
            namespace: "demo".into(),
            name: "hello".into(),
            kind: ServiceKind::ClusterSetIp,
            ips: vec![
                IpAddr::V4(Ipv4Addr::new(127, 77, 1, 2)),
                IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 7)),
            ],
            ports: vec![port("http", 8080), port("grpc", 9090)],
            endpoints: vec![],
        },
        ServiceRecord {
            namespace: "data".into(),
            name: "kafka".into(),
            kind: ServiceKind::Headless,
            ips: vec![],
            ports: vec![port("broker", 9092)],
            endpoints: vec![
                HeadlessEndpoint {
                    cluster: "east".into(),
                    hostname: Some("kafka-0".into()),
                    ips: vec![IpAddr::V4(Ipv4Addr::new(10, 2, 0, 1))],
                },
                HeadlessEndpoint {
                    cluster: "west".into(),
                    hostname: Some("kafka-0".into()),
                    ips: vec![IpAddr::V4(Ipv4Addr::new(10, 3, 0, 1))],
                },
            ],
        },
        ServiceRecord {
            namespace: "data".into(),
            name: "big".into(),
            kind: ServiceKind::Headless,
            ips: vec![],
            ports: vec![],
            endpoints: many,
        },
    ]
}

struct Server {
    server: DnsServer,
    zone: ZoneHandle,
    registry: Registry,
}

async fn server() -> Server {
    let mut registry = Registry::default();
    let metrics = DnsMetrics::register(&mut registry);
    let zone = ZoneHandle::new(Zone::build("clusterset.local", &services(), 30).expect("zone"));
    // `[::]` is dual-stack: one server for IPv4 and IPv6 clients.
    let server = DnsServer::bind("[::]:0".parse().expect("addr"), zone.clone(), metrics)
        .await
        .expect("binds");
    Server {
        server,
        zone,
        registry,
    }
}

fn v4(s: &Server) -> SocketAddr {
    (Ipv4Addr::LOCALHOST, s.server.local_addr().port()).into()
}

fn v6(s: &Server) -> SocketAddr {
    (Ipv6Addr::LOCALHOST, s.server.local_addr().port()).into()
}

/// dig with extra flags; returns the whole output.
fn dig(server: SocketAddr, args: &[&str]) -> String {
    let out = std::process::Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .arg("-p")
        .arg(server.port().to_string())
        .args(["+time=5", "+tries=2"])
        .args(args)
        .output()
        .expect("dig must be installed: run scripts/test.sh, which installs it");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn short(server: SocketAddr, args: &[&str]) -> Vec<String> {
    let mut a = vec!["+short"];
    a.extend_from_slice(args);
    let mut lines: Vec<String> = dig(server, &a).lines().map(str::to_string).collect();
    lines.sort();
    lines
}

const HELLO: &str = "hello.demo.svc.clusterset.local";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_the_mcs_specification() {
    let s = server().await;
    for addr in [v4(&s), v6(&s)] {
        for tcp in [false, true] {
            let t = if tcp { "+tcp" } else { "+notcp" };
            assert_eq!(
                short(addr, &[t, HELLO, "A"]),
                vec!["127.77.1.2"],
                "{addr} {t}"
            );
            assert_eq!(short(addr, &[t, HELLO, "AAAA"]), vec!["fd00::7"]);
            assert_eq!(
                short(addr, &[t, &format!("_http._tcp.{HELLO}"), "SRV"]),
                vec![format!("0 100 8080 {HELLO}.")]
            );
            assert_eq!(
                short(addr, &[t, HELLO, "SRV"]),
                vec![
                    format!("0 100 8080 {HELLO}."),
                    format!("0 100 9090 {HELLO}.")
                ]
            );
            assert_eq!(
                short(addr, &[t, "dns-version.clusterset.local", "TXT"]),
                vec!["\"1.0.0\""]
            );
        }
    }
    let a = v4(&s);
    // Headless: every endpoint at the service name, one name per endpoint
    // and cluster, SRV targeting those names.
    assert_eq!(
        short(a, &["kafka.data.svc.clusterset.local", "A"]),
        vec!["10.2.0.1", "10.3.0.1"]
    );
    assert_eq!(
        short(a, &["kafka-0.west.kafka.data.svc.clusterset.local", "A"]),
        vec!["10.3.0.1"]
    );
    assert_eq!(
        short(a, &["_broker._tcp.kafka.data.svc.clusterset.local", "SRV"]),
        vec![
            "0 100 9092 kafka-0.east.kafka.data.svc.clusterset.local.",
            "0 100 9092 kafka-0.west.kafka.data.svc.clusterset.local."
        ]
    );
    // The forbidden <clusterid>.<svc>.<ns> form has no records.
    let forbidden = dig(a, &["east.kafka.data.svc.clusterset.local", "A"]);
    assert!(forbidden.contains("ANSWER: 0"), "{forbidden}");
    let forbidden = dig(a, &["east.hello.demo.svc.clusterset.local", "A"]);
    assert!(forbidden.contains("status: NXDOMAIN"), "{forbidden}");
    // Apex.
    let soa = dig(a, &["clusterset.local", "SOA"]);
    assert!(
        soa.contains("status: NOERROR") && soa.contains("flags: qr aa"),
        "{soa}"
    );
    assert_eq!(
        short(a, &["clusterset.local", "NS"]),
        vec!["ns.dns.clusterset.local."]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_answers_carry_the_soa_with_the_negative_ttl() {
    let s = server().await;
    let a = v4(&s);
    for (name, qtype, status, answers) in [
        (
            "nope.demo.svc.clusterset.local",
            "A",
            "NXDOMAIN",
            "ANSWER: 0",
        ),
        (HELLO, "MX", "NOERROR", "ANSWER: 0"),
        ("demo.svc.clusterset.local", "A", "NOERROR", "ANSWER: 0"),
    ] {
        let out = dig(a, &["+noall", "+comments", "+authority", name, qtype]);
        assert!(out.contains(&format!("status: {status}")), "{name}: {out}");
        assert!(
            out.contains(answers) && out.contains("AUTHORITY: 1"),
            "{out}"
        );
        let soa_line = out
            .lines()
            .find(|l| l.contains("\tSOA\t"))
            .unwrap_or_else(|| panic!("no SOA in {out}"));
        let ttl: u32 = soa_line
            .split_whitespace()
            .nth(1)
            .and_then(|t| t.parse().ok())
            .expect("ttl");
        assert!(ttl <= strait_dns::NEGATIVE_TTL, "{soa_line}");
        assert!(
            soa_line.ends_with(&format!(" {}", strait_dns::NEGATIVE_TTL)),
            "SOA minimum: {soa_line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_transfers() {
    let s = server().await;
    let a = v4(&s);
    let out = dig(a, &["example.com", "A"]);
    assert!(out.contains("status: REFUSED"), "{out}");
    let axfr = dig(a, &["clusterset.local", "AXFR"]);
    assert!(axfr.contains("Transfer failed"), "{axfr}");
    let ixfr = dig(a, &["+tcp", "clusterset.local", "IXFR=1"]);
    assert!(
        ixfr.contains("Transfer failed") || ixfr.contains("REFUSED"),
        "{ixfr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_are_case_insensitive_and_the_question_case_is_kept() {
    let s = server().await;
    let out = dig(v4(&s), &["HeLLo.DeMo.sVc.ClusterSet.LOCAL", "A"]);
    assert!(out.contains("status: NOERROR"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with(";HeLLo.DeMo.sVc.ClusterSet.LOCAL.")),
        "question echoed as asked: {out}"
    );
    assert!(out.contains("127.77.1.2"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("HeLLo.DeMo.sVc.ClusterSet.LOCAL.") && l.contains("127.77.1.2")),
        "the answer's owner echoes the case: {out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edns_truncation_and_tcp_fallback() {
    let s = server().await;
    let a = v4(&s);
    let big = "big.data.svc.clusterset.local";
    // EDNS echoed with our payload size; none without EDNS.
    let out = dig(a, &["+bufsize=4096", HELLO, "A"]);
    assert!(
        out.contains("OPT PSEUDOSECTION") && out.contains("udp: 1232"),
        "{out}"
    );
    let out = dig(a, &["+noedns", HELLO, "A"]);
    assert!(!out.contains("OPT PSEUDOSECTION"), "{out}");
    // 100 addresses do not fit 512 bytes: TC over UDP...
    let out = dig(a, &["+noedns", "+ignore", "+notcp", big, "A"]);
    assert!(out.contains(" tc") || out.contains("flags: qr tc"), "{out}");
    // ...and dig's automatic retry over TCP gets all of them.
    let out = dig(a, &["+noedns", big, "A"]);
    assert!(out.contains("ANSWER: 100"), "{out}");
    let out = dig(a, &["+tcp", big, "A"]);
    assert!(out.contains("ANSWER: 100"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_queries_get_formerr_or_nothing_and_the_server_keeps_serving() {
    let s = server().await;
    let a = v4(&s);
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    // A header announcing one question, then garbage.
    let garbage = [
        0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0xc0, 0xff, 0x01,
    ];
    sock.send_to(&garbage, a).await.expect("send");
    let mut buf = [0u8; 512];
    if let Ok(Ok((n, _))) =
        tokio::time::timeout(Duration::from_millis(500), sock.recv_from(&mut buf)).await
    {
        let m = Message::from_vec(&buf[..n]).expect("decodes");
        assert_eq!(m.metadata.id, 0x1234);
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    }
    for junk in [&b""[..], &[0u8; 5][..], &[0xffu8; 300][..]] {
        sock.send_to(junk, a).await.expect("send");
    }
    assert_eq!(short(a, &[HELLO, "A"]), vec!["127.77.1.2"], "still serving");
}

async fn ask(addr: SocketAddr, name: &str, qtype: RecordType) -> Message {
    let mut q = Message::query();
    q.add_query(Query::query(Name::from_ascii(name).expect("name"), qtype));
    q.metadata.id = rand_id();
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    sock.send_to(&q.to_vec().expect("encode"), addr)
        .await
        .expect("send");
    let mut buf = vec![0u8; 4096];
    let (n, _) = tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf))
        .await
        .expect("answer in time")
        .expect("recv");
    Message::from_vec(&buf[..n]).expect("decodes")
}

fn rand_id() -> u16 {
    static N: AtomicU64 = AtomicU64::new(1);
    (N.fetch_add(7919, Ordering::Relaxed) & 0xffff) as u16
}

fn version_zone(v: u8) -> Zone {
    // Version v: the A record and the SRV port both carry v, so one ANY
    // answer shows whether it came from a single snapshot.
    let svc = ServiceRecord {
        namespace: "demo".into(),
        name: "hello".into(),
        kind: ServiceKind::ClusterSetIp,
        ips: vec![IpAddr::V4(Ipv4Addr::new(127, 77, 0, v))],
        ports: vec![port("http", 8000 + u16::from(v))],
        endpoints: vec![],
    };
    Zone::build("clusterset.local", &[svc], 30).expect("zone")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_are_atomic_and_quick_under_load() {
    let s = server().await;
    let addr = v4(&s);
    s.zone.publish(version_zone(1));
    let stop = Arc::new(AtomicBool::new(false));
    let zone = s.zone.clone();
    let st = stop.clone();
    let writer = tokio::spawn(async move {
        let mut v = 1u8;
        while !st.load(Ordering::Relaxed) {
            v = if v == 1 { 2 } else { 1 };
            zone.publish(version_zone(v));
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    // At least 2 s and 50 queries (a loaded machine takes longer for
    // them), within 20 s.
    let mut checked = 0;
    let started = Instant::now();
    while (started.elapsed() < Duration::from_secs(2) || checked <= 50)
        && started.elapsed() < Duration::from_secs(20)
    {
        let m = ask(addr, HELLO, RecordType::ANY).await;
        let mut a = None;
        let mut p = None;
        for r in &m.answers {
            match &r.data {
                RData::A(x) => a = Some(x.0.octets()[3]),
                RData::SRV(x) => p = Some((x.port - 8000) as u8),
                _ => {}
            }
        }
        assert_eq!(a, p, "an answer mixed two snapshots: {m:?}");
        checked += 1;
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.expect("writer");
    assert!(checked > 50, "only {checked} queries");

    // Visibility: a published change answers within 50 ms.
    for v in [3u8, 4, 5] {
        let t = Instant::now();
        s.zone.publish(version_zone(v));
        loop {
            let m = ask(addr, HELLO, RecordType::A).await;
            let got = m.answers.iter().find_map(|r| match &r.data {
                RData::A(x) => Some(x.0.octets()[3]),
                _ => None,
            });
            if got == Some(v) {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_millis(50),
                "update not visible in 50 ms"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_queries_by_type_and_rcode() {
    let s = server().await;
    let a = v4(&s);
    dig(a, &[HELLO, "A"]);
    dig(a, &["nope.clusterset.local", "AAAA"]);
    dig(a, &["example.org", "SRV"]);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &s.registry).expect("encode");
    for line in [
        "strait_dns_queries_total{type=\"A\",rcode=\"noerror\"} 1",
        "strait_dns_queries_total{type=\"AAAA\",rcode=\"nxdomain\"} 1",
        "strait_dns_queries_total{type=\"SRV\",rcode=\"refused\"} 1",
        "strait_dns_query_duration_seconds_count 3",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    assert!(text.contains("strait_dns_zone_records "), "{text}");
    assert!(
        text.contains("strait_dns_zone_last_update_timestamp_seconds "),
        "{text}"
    );
    let _ = dig_full;
}
