use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::time::timeout;

use super::*;
use crate::{PortProtocol, ServiceKind, ServicePort, ServiceRecord, Zone};

const ORIGIN: &str = "clusterset.local";
const IO_TIMEOUT: Duration = Duration::from_secs(5);

fn service(namespace: &str, name: &str, ips: Vec<IpAddr>) -> ServiceRecord {
    ServiceRecord {
        namespace: namespace.into(),
        name: name.into(),
        kind: ServiceKind::ClusterSetIp,
        endpoints: Vec::new(),
        ips,
        ports: vec![ServicePort {
            name: "http".into(),
            port: 80,
            protocol: PortProtocol::Tcp,
        }],
    }
}

fn services() -> Vec<ServiceRecord> {
    let many = (0..100u8)
        .map(|i| IpAddr::V4(Ipv4Addr::new(10, 2, 0, i)))
        .collect();
    vec![
        service(
            "default",
            "web",
            vec![
                IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
                IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1)),
            ],
        ),
        service("default", "big", many),
    ]
}

struct Fixture {
    server: DnsServer,
    zone: ZoneHandle,
    registry: Registry,
}

impl Fixture {
    async fn start() -> Self {
        Self::start_with(TcpLimits::default()).await
    }

    async fn start_with(limits: TcpLimits) -> Self {
        let mut registry = Registry::default();
        let metrics = DnsMetrics::register(&mut registry);
        let zone = ZoneHandle::new(Zone::build(ORIGIN, &services(), 30).expect("zone builds"));
        let server = DnsServer::bind_with(
            SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            zone.clone(),
            metrics,
            limits,
        )
        .await
        .expect("server binds");
        Self {
            server,
            zone,
            registry,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    fn metrics_text(&self) -> String {
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("registry encodes");
        text
    }
}

fn query(name: &str, qtype: RecordType) -> Message {
    let mut message = Message::query();
    message.add_query(Query::query(
        Name::from_ascii(name).expect("valid test name"),
        qtype,
    ));
    message
}

fn with_edns(mut message: Message, max_payload: u16) -> Message {
    let mut edns = Edns::new();
    edns.set_max_payload(max_payload);
    message.set_edns(edns);
    message
}

fn encode_message(message: &Message) -> Vec<u8> {
    message.to_vec().expect("query encodes")
}

async fn udp_raw(addr: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
    udp_raw_within(addr, bytes, IO_TIMEOUT).await
}

async fn udp_raw_within(addr: SocketAddr, bytes: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("client binds");
    socket.send_to(bytes, addr).await.expect("datagram sent");
    let mut buf = vec![0; 65_535];
    let (len, _) = timeout(wait, socket.recv_from(&mut buf)).await.ok()?.ok()?;
    buf.truncate(len);
    Some(buf)
}

async fn udp(addr: SocketAddr, message: &Message) -> (Message, usize) {
    let bytes = udp_raw(addr, &encode_message(message))
        .await
        .expect("UDP response");
    let len = bytes.len();
    (Message::from_vec(&bytes).expect("response decodes"), len)
}

async fn tcp_frame(stream: &mut TcpStream, bytes: &[u8]) -> Vec<u8> {
    let len = u16::try_from(bytes.len()).expect("frame fits");
    stream.write_all(&len.to_be_bytes()).await.expect("write");
    stream.write_all(bytes).await.expect("write");
    let mut len = [0u8; 2];
    timeout(IO_TIMEOUT, stream.read_exact(&mut len))
        .await
        .expect("TCP response in time")
        .expect("read length");
    let mut body = vec![0; usize::from(u16::from_be_bytes(len))];
    timeout(IO_TIMEOUT, stream.read_exact(&mut body))
        .await
        .expect("TCP response in time")
        .expect("read body");
    body
}

async fn tcp(addr: SocketAddr, message: &Message) -> Message {
    let mut stream = TcpStream::connect(addr).await.expect("TCP connects");
    let body = tcp_frame(&mut stream, &encode_message(message)).await;
    Message::from_vec(&body).expect("response decodes")
}

fn a_addresses(message: &Message) -> Vec<Ipv4Addr> {
    message
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn udp_and_tcp_share_the_port() {
    let fx = Fixture::start().await;
    assert_ne!(fx.addr().port(), 0);
    let q = query("web.default.svc.clusterset.local.", RecordType::A);
    let (over_udp, _) = udp(fx.addr(), &q).await;
    let over_tcp = tcp(fx.addr(), &q).await;
    for response in [over_udp, over_tcp] {
        assert_eq!(response.metadata.message_type, MessageType::Response);
        assert_eq!(response.metadata.id, q.metadata.id);
        assert_eq!(response.metadata.response_code, ResponseCode::NoError);
        assert!(response.metadata.authoritative);
        assert!(!response.metadata.recursion_available);
        assert_eq!(a_addresses(&response), vec![Ipv4Addr::new(10, 0, 0, 1)]);
        assert!(response.authorities.is_empty());
    }
    fx.server.shutdown().await;
}

#[tokio::test]
async fn aaaa_and_srv_with_additionals() {
    let fx = Fixture::start().await;
    let (aaaa, _) = udp(
        fx.addr(),
        &query("web.default.svc.clusterset.local.", RecordType::AAAA),
    )
    .await;
    assert_eq!(aaaa.answers.len(), 1);
    assert_eq!(aaaa.answers[0].record_type(), RecordType::AAAA);

    let (srv, _) = udp(
        fx.addr(),
        &query(
            "_http._tcp.web.default.svc.clusterset.local.",
            RecordType::SRV,
        ),
    )
    .await;
    assert!(srv.metadata.authoritative);
    assert_eq!(srv.answers.len(), 1);
    let RData::SRV(record) = &srv.answers[0].data else {
        panic!("not a SRV record");
    };
    assert_eq!((record.priority, record.weight, record.port), (0, 100, 80));
    assert_eq!(
        record.target.to_ascii(),
        "web.default.svc.clusterset.local."
    );
    let mut extra: Vec<RecordType> = srv.additionals.iter().map(|r| r.record_type()).collect();
    extra.sort_by_key(|t| u16::from(*t));
    assert_eq!(extra, vec![RecordType::A, RecordType::AAAA]);
}

#[tokio::test]
async fn question_echoes_query_case() {
    let fx = Fixture::start().await;
    let mixed = "WeB.DeFaulT.svc.ClusterSet.LOCAL.";
    let (response, _) = udp(fx.addr(), &query(mixed, RecordType::A)).await;
    assert_eq!(response.metadata.response_code, ResponseCode::NoError);
    assert_eq!(response.queries.len(), 1);
    assert!(response.queries[0]
        .name()
        .eq_case(&Name::from_ascii(mixed).expect("name")));
    assert_eq!(a_addresses(&response), vec![Ipv4Addr::new(10, 0, 0, 1)]);
}

#[tokio::test]
async fn nxdomain_and_nodata_carry_the_soa() {
    let fx = Fixture::start().await;
    for (name, qtype, rcode) in [
        (
            "nope.default.svc.clusterset.local.",
            RecordType::A,
            ResponseCode::NXDomain,
        ),
        (
            "cluster-a.web.default.svc.clusterset.local.",
            RecordType::A,
            ResponseCode::NXDomain,
        ),
        (
            "web.default.svc.clusterset.local.",
            RecordType::TXT,
            ResponseCode::NoError,
        ),
        (
            "default.svc.clusterset.local.",
            RecordType::A,
            ResponseCode::NoError,
        ),
    ] {
        let q = query(name, qtype);
        for response in [udp(fx.addr(), &q).await.0, tcp(fx.addr(), &q).await] {
            assert_eq!(response.metadata.response_code, rcode, "{name}");
            assert!(response.metadata.authoritative, "{name}");
            assert!(response.answers.is_empty(), "{name}");
            assert_eq!(response.authorities.len(), 1, "{name}");
            let soa = &response.authorities[0];
            assert_eq!(soa.record_type(), RecordType::SOA);
            assert_eq!(soa.name.to_ascii(), "clusterset.local.");
            assert_eq!(soa.ttl, 5);
        }
    }
}

#[tokio::test]
async fn txt_soa_ns_at_the_apex() {
    let fx = Fixture::start().await;
    let (txt, _) = udp(
        fx.addr(),
        &query("dns-version.clusterset.local.", RecordType::TXT),
    )
    .await;
    let RData::TXT(record) = &txt.answers[0].data else {
        panic!("not a TXT record");
    };
    assert_eq!(&*record.txt_data[0], b"1.0.0");

    let (soa, _) = udp(fx.addr(), &query("clusterset.local.", RecordType::SOA)).await;
    assert_eq!(soa.answers[0].record_type(), RecordType::SOA);
    let (ns, _) = udp(fx.addr(), &query("clusterset.local.", RecordType::NS)).await;
    assert_eq!(
        ns.answers[0].data,
        RData::NS(hickory_proto::rr::rdata::NS(
            Name::from_ascii("ns.dns.clusterset.local.").expect("name")
        ))
    );
}

#[tokio::test]
async fn refused_outside_the_zone_and_for_transfers() {
    let fx = Fixture::start().await;
    let cases = [
        query("example.com.", RecordType::A),
        query("web.default.svc.cluster.local.", RecordType::A),
        query("clusterset.local.", RecordType::AXFR),
        query("clusterset.local.", RecordType::IXFR),
    ];
    for q in &cases {
        let response = tcp(fx.addr(), q).await;
        assert_eq!(
            response.metadata.response_code,
            ResponseCode::Refused,
            "{:?}",
            q.queries
        );
        assert!(!response.metadata.authoritative);
        assert!(response.answers.is_empty());
    }
    let (response, _) = udp(fx.addr(), &cases[0]).await;
    assert_eq!(response.metadata.response_code, ResponseCode::Refused);

    // Another class than IN is not ours either.
    let mut chaos = query("web.default.svc.clusterset.local.", RecordType::A);
    chaos.queries[0].set_query_class(DNSClass::CH);
    let (response, _) = udp(fx.addr(), &chaos).await;
    assert_eq!(response.metadata.response_code, ResponseCode::Refused);
}

#[tokio::test]
async fn other_opcodes_are_not_implemented() {
    let fx = Fixture::start().await;
    for op_code in [OpCode::Status, OpCode::Notify, OpCode::Update] {
        let mut q = query("clusterset.local.", RecordType::SOA);
        q.metadata.op_code = op_code;
        let (response, _) = udp(fx.addr(), &q).await;
        assert_eq!(
            response.metadata.response_code,
            ResponseCode::NotImp,
            "{op_code:?}"
        );
        assert_eq!(response.metadata.op_code, op_code);
    }
}

#[tokio::test]
async fn more_than_one_question_is_a_format_error() {
    let fx = Fixture::start().await;
    let mut q = query("web.default.svc.clusterset.local.", RecordType::A);
    q.add_query(Query::query(
        Name::from_ascii("clusterset.local.").expect("name"),
        RecordType::SOA,
    ));
    let (response, _) = udp(fx.addr(), &q).await;
    assert_eq!(response.metadata.response_code, ResponseCode::FormErr);
    assert!(response.answers.is_empty());

    let mut empty = Message::query();
    empty.metadata.id = 7;
    let (response, _) = udp(fx.addr(), &empty).await;
    assert_eq!(response.metadata.response_code, ResponseCode::FormErr);
}

#[tokio::test]
async fn edns_is_echoed_with_capped_payload() {
    let fx = Fixture::start().await;
    let name = "web.default.svc.clusterset.local.";

    let (plain, _) = udp(fx.addr(), &query(name, RecordType::A)).await;
    assert!(plain.edns.is_none());

    for (asked, advertised) in [(4096, 1232), (1232, 1232), (600, 600), (100, 512)] {
        let (response, _) = udp(fx.addr(), &with_edns(query(name, RecordType::A), asked)).await;
        let edns = response.edns.as_ref().expect("OPT echoed");
        assert_eq!(edns.max_payload(), advertised, "asked {asked}");
        assert_eq!(edns.version(), 0);
        assert_eq!(a_addresses(&response).len(), 1);
    }

    // Errors echo the OPT record too.
    let (refused, _) = udp(
        fx.addr(),
        &with_edns(query("example.com.", RecordType::A), 4096),
    )
    .await;
    assert_eq!(refused.metadata.response_code, ResponseCode::Refused);
    assert!(refused.edns.is_some());
}

#[tokio::test]
async fn unsupported_edns_version_is_badvers() {
    let fx = Fixture::start().await;
    let mut q = with_edns(
        query("web.default.svc.clusterset.local.", RecordType::A),
        1232,
    );
    if let Some(edns) = q.edns.as_mut() {
        edns.set_version(1);
    }
    let (response, _) = udp(fx.addr(), &q).await;
    // BADVERS and BADSIG share code 16; the decoder reports BADSIG.
    assert_eq!(u16::from(response.metadata.response_code), 16);
    assert_eq!(response.edns.as_ref().map(Edns::version), Some(0));
    assert!(response.answers.is_empty());
}

#[tokio::test]
async fn big_answers_truncate_over_udp_and_not_over_tcp() {
    let fx = Fixture::start().await;
    let q = query("big.default.svc.clusterset.local.", RecordType::A);

    let (no_edns, len) = udp(fx.addr(), &q).await;
    assert!(no_edns.metadata.truncation);
    assert!(len <= 512, "{len} bytes");
    assert!(no_edns.answers.len() < 100);

    let (edns, len) = udp(fx.addr(), &with_edns(q.clone(), 4096)).await;
    assert!(edns.metadata.truncation);
    assert!(len <= 1232, "{len} bytes");
    assert!(edns.answers.len() > no_edns.answers.len());

    let whole = tcp(fx.addr(), &q).await;
    assert!(!whole.metadata.truncation);
    assert!(whole.metadata.authoritative);
    let mut ips = a_addresses(&whole);
    ips.sort_unstable();
    let expected: Vec<Ipv4Addr> = (0..100u8).map(|i| Ipv4Addr::new(10, 2, 0, i)).collect();
    assert_eq!(ips, expected);
}

#[tokio::test]
async fn additional_data_that_does_not_fit_is_dropped_without_tc() {
    let fx = Fixture::start().await;
    let q = query(
        "_http._tcp.big.default.svc.clusterset.local.",
        RecordType::SRV,
    );

    let (no_edns, len) = udp(fx.addr(), &q).await;
    assert!(!no_edns.metadata.truncation);
    assert!(len <= 512, "{len} bytes");
    assert_eq!(no_edns.answers.len(), 1);
    assert!(!no_edns.additionals.is_empty());
    assert!(no_edns.additionals.len() < 100);

    let (edns, len) = udp(fx.addr(), &with_edns(q.clone(), 4096)).await;
    assert!(!edns.metadata.truncation);
    assert!(len <= 1232, "{len} bytes");
    assert!(edns.edns.is_some());
    assert!(edns.additionals.len() > no_edns.additionals.len());

    let whole = tcp(fx.addr(), &q).await;
    assert!(!whole.metadata.truncation);
    assert_eq!(whole.additionals.len(), 100);
}

#[tokio::test]
async fn publishing_a_new_zone_changes_the_answer() {
    let fx = Fixture::start().await;
    let name = "web.default.svc.clusterset.local.";
    let (before, _) = udp(fx.addr(), &query(name, RecordType::A)).await;
    assert_eq!(a_addresses(&before), vec![Ipv4Addr::new(10, 0, 0, 1)]);

    let updated = vec![
        service(
            "default",
            "web",
            vec![IpAddr::V4(Ipv4Addr::new(10, 9, 9, 9))],
        ),
        service("other", "new", vec![IpAddr::V4(Ipv4Addr::new(10, 8, 8, 8))]),
    ];
    let old_serial = fx.zone.current().serial();
    fx.zone
        .publish(Zone::build(ORIGIN, &updated, 30).expect("zone builds"));
    assert!(fx.zone.current().serial() > old_serial);

    let (after, _) = udp(fx.addr(), &query(name, RecordType::A)).await;
    assert_eq!(a_addresses(&after), vec![Ipv4Addr::new(10, 9, 9, 9)]);
    let added = tcp(
        fx.addr(),
        &query("new.other.svc.clusterset.local.", RecordType::A),
    )
    .await;
    assert_eq!(a_addresses(&added), vec![Ipv4Addr::new(10, 8, 8, 8)]);
    let (gone, _) = udp(
        fx.addr(),
        &query("big.default.svc.clusterset.local.", RecordType::A),
    )
    .await;
    assert_eq!(gone.metadata.response_code, ResponseCode::NXDomain);

    assert!(fx
        .metrics_text()
        .lines()
        .any(|l| l == "strait_dns_zone_records 9"));
}

/// Deterministic pseudo-random bytes (xorshift), no extra dependency.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .collect()
}

#[tokio::test]
async fn malformed_packets_do_not_stop_the_server() {
    let fx = Fixture::start().await;
    let valid = query("web.default.svc.clusterset.local.", RecordType::A);
    let short = Duration::from_millis(200);

    // Shorter than a header: dropped silently.
    assert!(udp_raw_within(fx.addr(), &[0x12, 0x34, 0x01], short)
        .await
        .is_none());
    // Empty datagram.
    let _ = udp_raw_within(fx.addr(), &[], short).await;
    // Random bytes, of various lengths.
    for seed in 1..20u64 {
        let len = usize::try_from(seed * 37 % 700).unwrap_or(0);
        let _ = udp_raw_within(fx.addr(), &noise(seed, len), Duration::from_millis(20)).await;
    }
    // A header announcing a question that is not there: FORMERR from hickory.
    let mut truncated = encode_message(&valid);
    truncated.truncate(14);
    let reply = udp_raw(fx.addr(), &truncated).await.expect("FORMERR reply");
    let reply = Message::from_vec(&reply).expect("reply decodes");
    assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
    // A response-type message is never answered (no reflection).
    let mut response_type = valid.clone();
    response_type.metadata.message_type = MessageType::Response;
    assert!(
        udp_raw_within(fx.addr(), &encode_message(&response_type), short)
            .await
            .is_none()
    );

    // Garbage over TCP, then a fresh connection still works.
    {
        let mut stream = TcpStream::connect(fx.addr()).await.expect("connects");
        let garbage = noise(99, 300);
        stream
            .write_all(&300u16.to_be_bytes())
            .await
            .expect("write");
        stream.write_all(&garbage).await.expect("write");
        stream.write_all(&[0xff]).await.expect("write");
    }
    {
        let mut stream = TcpStream::connect(fx.addr()).await.expect("connects");
        stream.write_all(&[0, 40, 1, 2]).await.expect("write");
        stream.shutdown().await.expect("half-close");
    }

    let (response, _) = udp(fx.addr(), &valid).await;
    assert_eq!(a_addresses(&response), vec![Ipv4Addr::new(10, 0, 0, 1)]);
    let response = tcp(fx.addr(), &valid).await;
    assert_eq!(a_addresses(&response), vec![Ipv4Addr::new(10, 0, 0, 1)]);
}

#[tokio::test]
async fn several_queries_on_one_tcp_connection() {
    let fx = Fixture::start().await;
    let mut stream = TcpStream::connect(fx.addr()).await.expect("connects");
    for _ in 0..3 {
        let q = query("web.default.svc.clusterset.local.", RecordType::A);
        let body = tcp_frame(&mut stream, &encode_message(&q)).await;
        let response = Message::from_vec(&body).expect("decodes");
        assert_eq!(response.metadata.id, q.metadata.id);
        assert_eq!(a_addresses(&response).len(), 1);
    }
}

/// A framed query, as a TCP client sends it.
fn framed(message: &Message) -> Vec<u8> {
    let body = encode_message(message);
    let mut frame = u16::try_from(body.len())
        .expect("fits")
        .to_be_bytes()
        .to_vec();
    frame.extend_from_slice(&body);
    frame
}

/// The line of `text` for series `series`, if any.
fn metric_line<'a>(text: &'a str, series: &str) -> Option<&'a str> {
    text.lines().find(|l| l.starts_with(series))
}

#[tokio::test]
async fn a_client_that_never_reads_its_answers_is_dropped() {
    let limits = TcpLimits {
        timeout: Duration::from_millis(300),
        ..TcpLimits::default()
    };
    let fx = Fixture::start_with(limits).await;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("small buffer");
    let stream = socket.connect(fx.addr()).await.expect("connects");
    let (mut reader, mut writer) = stream.into_split();
    // Big answers (100 addresses each), asked for and never read: the
    // server's writes stall once the socket buffers are full.
    let big = query("big.default.svc.clusterset.local.", RecordType::A);
    let one = 2 + encode_message(&tcp(fx.addr(), &big).await).len();
    let q = framed(&big);
    let sent = 20_000;
    let flood = tokio::spawn(async move {
        for _ in 0..sent {
            if writer.write_all(&q).await.is_err() {
                break;
            }
        }
        writer
    });
    let series = "strait_dns_tcp_connections_dropped_total{reason=\"slow_reader\"}";
    let deadline = std::time::Instant::now() + IO_TIMEOUT;
    while metric_line(&fx.metrics_text(), series) != Some(&format!("{series} 1")) {
        assert!(
            std::time::Instant::now() < deadline,
            "not dropped:\n{}",
            fx.metrics_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // What was answered before the stall can still be read; then the
    // connection ends, short of the queries sent.
    let mut answered = Vec::new();
    let _ = timeout(IO_TIMEOUT, reader.read_to_end(&mut answered))
        .await
        .expect("ends");
    assert!(answered.len() < sent * one, "{} bytes", answered.len());
    flood.abort();
    // Others are still served.
    let response = tcp(
        fx.addr(),
        &query("web.default.svc.clusterset.local.", RecordType::A),
    )
    .await;
    assert_eq!(a_addresses(&response).len(), 1);
}

#[tokio::test]
async fn connections_past_the_limit_are_closed_at_once_and_counted() {
    let limits = TcpLimits {
        max_connections: 2,
        ..TcpLimits::default()
    };
    let fx = Fixture::start_with(limits).await;
    let q = query("web.default.svc.clusterset.local.", RecordType::A);
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(fx.addr()).await.expect("connects");
        // Answered: the connection holds a slot.
        tcp_frame(&mut stream, &encode_message(&q)).await;
        held.push(stream);
    }
    let mut third = TcpStream::connect(fx.addr())
        .await
        .expect("accepted by the kernel");
    let _ = third.write_all(&framed(&q)).await;
    let mut rest = Vec::new();
    let read = timeout(IO_TIMEOUT, third.read_to_end(&mut rest))
        .await
        .expect("closed at once");
    assert!(read.is_err() || rest.is_empty(), "answered past the limit");
    let series = "strait_dns_tcp_connections_dropped_total{reason=\"limit\"}";
    assert_eq!(
        metric_line(&fx.metrics_text(), series),
        Some(&*format!("{series} 1"))
    );
    // A slot freed is a slot taken again.
    drop(held.pop());
    let deadline = std::time::Instant::now() + IO_TIMEOUT;
    loop {
        let mut stream = TcpStream::connect(fx.addr()).await.expect("connects");
        let _ = stream.write_all(&framed(&q)).await;
        let mut len = [0u8; 2];
        if timeout(IO_TIMEOUT, stream.read_exact(&mut len))
            .await
            .is_ok_and(|r| r.is_ok())
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the freed slot was not reused"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn queries_are_counted() {
    let fx = Fixture::start().await;
    let _ = udp(
        fx.addr(),
        &query("web.default.svc.clusterset.local.", RecordType::A),
    )
    .await;
    let _ = tcp(
        fx.addr(),
        &query("nope.default.svc.clusterset.local.", RecordType::SRV),
    )
    .await;
    let _ = udp(fx.addr(), &query("example.com.", RecordType::MX)).await;

    let text = fx.metrics_text();
    for line in [
        "strait_dns_queries_total{type=\"A\",rcode=\"noerror\"} 1",
        "strait_dns_queries_total{type=\"SRV\",rcode=\"nxdomain\"} 1",
        "strait_dns_queries_total{type=\"other\",rcode=\"refused\"} 1",
        "strait_dns_query_duration_seconds_count 3",
        "strait_dns_zone_records 109",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in:\n{text}"
        );
    }
    assert!(text
        .lines()
        .any(|l| l.starts_with("strait_dns_zone_last_update_timestamp_seconds ")));
}

#[tokio::test]
async fn shutdown_releases_the_sockets() {
    let fx = Fixture::start().await;
    let addr = fx.addr();
    timeout(IO_TIMEOUT, fx.server.shutdown())
        .await
        .expect("shutdown in time");
    UdpSocket::bind(addr).await.expect("UDP port free again");
    TcpListener::bind(addr).await.expect("TCP port free again");
}

#[tokio::test]
async fn dropping_the_server_stops_it() {
    let fx = Fixture::start().await;
    let addr = fx.addr();
    drop(fx.server);
    // The aborted tasks release their sockets once the runtime gets to them.
    let mut rebound = None;
    for _ in 0..100 {
        if let Ok(listener) = TcpListener::bind(addr).await {
            rebound = Some(listener);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(rebound.is_some(), "TCP port still taken after drop");
}

#[tokio::test]
async fn binding_a_taken_port_fails() {
    let taken = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("binds");
    let addr = taken.local_addr().expect("addr");
    let zone = ZoneHandle::new(Zone::build(ORIGIN, &[], 30).expect("zone builds"));
    let metrics = DnsMetrics::register(&mut Registry::default());
    match DnsServer::bind(addr, zone, metrics).await {
        Err(DnsError::Bind { protocol, .. }) => assert_eq!(protocol, "udp"),
        other => panic!("expected a bind error, got {other:?}"),
    }
}

/// `[::]` is explicitly dual-stack for UDP and TCP, so an IPv6-only or
/// dual-stack cluster's gateway answers IPv4 clients too, whatever the
/// node's `net.ipv6.bindv6only` says (which would hide a regression here).
#[tokio::test]
async fn an_unspecified_ipv6_address_takes_both_families() {
    let (udp, tcp) = bind_pair((Ipv6Addr::UNSPECIFIED, 0).into())
        .await
        .expect("bind [::]");
    assert!(!socket2::SockRef::from(&udp).only_v6().expect("udp v6only"));
    assert!(!socket2::SockRef::from(&tcp).only_v6().expect("tcp v6only"));
    let port = udp.local_addr().expect("addr").port();
    assert_eq!(tcp.local_addr().expect("addr").port(), port);
    let client = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("client");
    client
        .send_to(b"ping", (Ipv4Addr::LOCALHOST, port))
        .await
        .expect("send");
    let mut buf = [0u8; 8];
    let (n, _) = timeout(Duration::from_secs(5), udp.recv_from(&mut buf))
        .await
        .expect("an IPv4 datagram arrives")
        .expect("recv");
    assert_eq!(&buf[..n], b"ping");
    let accept = tcp.accept();
    let (connected, accepted) =
        tokio::join!(TcpStream::connect((Ipv4Addr::LOCALHOST, port)), accept);
    connected.expect("IPv4 client connects");
    accepted.expect("accepted");
}
