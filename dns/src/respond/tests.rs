use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::op::{Edns, Message, OpCode, Query};
use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsCode, EdnsOption};
use hickory_proto::rr::{DNSClass, Name, RecordType};

use super::*;
use crate::{HeadlessEndpoint, PortProtocol, ServiceKind, ServicePort, ServiceRecord};

fn port(name: &str, port: u16, protocol: PortProtocol) -> ServicePort {
    ServicePort {
        name: name.into(),
        port,
        protocol,
    }
}

fn services() -> Vec<ServiceRecord> {
    let many = (0..100u8)
        .map(|i| IpAddr::V4(Ipv4Addr::new(10, 2, 0, i)))
        .collect();
    vec![
        ServiceRecord {
            namespace: "default".into(),
            name: "web".into(),
            kind: ServiceKind::ClusterSetIp,
            ips: vec![
                IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
                IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1)),
            ],
            ports: vec![
                port("http", 80, PortProtocol::Tcp),
                port("dns", 53, PortProtocol::Udp),
                port("", 8080, PortProtocol::Tcp),
            ],
            endpoints: vec![],
        },
        ServiceRecord {
            namespace: "default".into(),
            name: "big".into(),
            kind: ServiceKind::ClusterSetIp,
            ips: many,
            ports: vec![port("http", 80, PortProtocol::Tcp)],
            endpoints: vec![],
        },
        ServiceRecord {
            namespace: "default".into(),
            name: "mid".into(),
            kind: ServiceKind::ClusterSetIp,
            ips: (0..40u8)
                .map(|i| IpAddr::V4(Ipv4Addr::new(10, 3, 0, i)))
                .collect(),
            ports: vec![],
            endpoints: vec![],
        },
        ServiceRecord {
            namespace: "prod".into(),
            name: "db".into(),
            kind: ServiceKind::Headless,
            ips: vec![],
            ports: vec![port("pg", 5432, PortProtocol::Tcp)],
            endpoints: (0..3u8)
                .map(|i| HeadlessEndpoint {
                    cluster: "east".into(),
                    hostname: Some(format!("db-{i}")),
                    ips: vec![IpAddr::V4(Ipv4Addr::new(10, 1, 0, i))],
                })
                .collect(),
        },
    ]
}

fn responder() -> Responder {
    Responder::new(Zone::build("clusterset.local", &services(), 30).expect("zone builds"))
}

fn query(name: &str, qtype: RecordType) -> Message {
    let mut message = Message::query();
    message.metadata.id = 0xbeef;
    message.add_query(Query::query(
        Name::from_ascii(name).expect("valid test name"),
        qtype,
    ));
    message
}

fn edns(mut message: Message, payload: u16, configure: impl FnOnce(&mut Edns)) -> Message {
    let mut edns = Edns::new();
    edns.set_max_payload(payload);
    configure(&mut edns);
    message.set_edns(edns);
    message
}

fn wire(message: &Message) -> Vec<u8> {
    message.to_vec().expect("query encodes")
}

/// The names of the test zone, plus names it does not have, in and out of
/// the zone, in several cases.
const NAMES: [&str; 14] = [
    "clusterset.local.",
    "dns-version.clusterset.local.",
    "svc.clusterset.local.",
    "default.svc.clusterset.local.",
    "web.default.svc.clusterset.local.",
    "WeB.DeFaulT.svc.ClusterSet.LOCAL.",
    "_http._tcp.web.default.svc.clusterset.local.",
    "_tcp.web.default.svc.clusterset.local.",
    "big.default.svc.clusterset.local.",
    "_http._tcp.big.default.svc.clusterset.local.",
    "db-1.east.db.prod.svc.clusterset.local.",
    "east.db.prod.svc.clusterset.local.",
    "nope.default.svc.clusterset.local.",
    "example.com.",
];

const TYPES: [RecordType; 10] = [
    RecordType::A,
    RecordType::AAAA,
    RecordType::SRV,
    RecordType::TXT,
    RecordType::SOA,
    RecordType::NS,
    RecordType::MX,
    RecordType::ANY,
    RecordType::AXFR,
    RecordType::OPT,
];

/// Every name and type, plain and in several EDNS and flag variants.
fn corpus() -> Vec<Vec<u8>> {
    let mut queries = Vec::new();
    for name in NAMES {
        for qtype in TYPES {
            let plain = query(name, qtype);
            queries.push(wire(&plain));
            for payload in [0, 512, 600, 1232, 4096] {
                queries.push(wire(&edns(plain.clone(), payload, |_| {})));
            }
            queries.push(wire(&edns(plain.clone(), 1232, |e| {
                e.set_dnssec_ok(true);
                e.flags_mut().z = 0x1234;
            })));
            queries.push(wire(&edns(plain.clone(), 1232, |e| {
                e.options_mut().insert(EdnsOption::Unknown(
                    u16::from(EdnsCode::Cookie),
                    vec![1, 2, 3, 4, 5, 6, 7, 8],
                ));
            })));
            let mut flags = plain.clone();
            flags.metadata.recursion_desired = true;
            flags.metadata.checking_disabled = true;
            flags.metadata.authentic_data = true;
            queries.push(wire(&flags));
        }
    }
    queries
}

fn outcome(responder: &Responder, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    responder
        .fast
        .answer(query, transport, &mut out)
        .map(|_| out)
}

#[test]
fn fast_and_generic_paths_send_the_same_bytes() {
    let r = responder();
    let mut fast = 0;
    for q in corpus() {
        for transport in [Transport::Udp, Transport::Tcp] {
            let generic = r.respond_generic(&q, transport);
            assert!(generic.is_some(), "{q:02x?}");
            if let Some(answer) = outcome(&r, &q, transport) {
                fast += 1;
                assert_eq!(
                    Some(&answer),
                    generic.as_ref(),
                    "{q:02x?} over {transport:?}"
                );
            }
            assert_eq!(r.respond(&q, transport), generic, "{q:02x?}");
        }
    }
    // Most of the corpus is plain queries within the zone.
    assert!(fast > 1000, "only {fast} fast answers");
}

#[test]
fn plain_queries_take_the_fast_path() {
    let r = responder();
    let cases = [
        ("web.default.svc.clusterset.local.", RecordType::A),
        ("web.default.svc.clusterset.local.", RecordType::AAAA),
        (
            "_http._tcp.web.default.svc.clusterset.local.",
            RecordType::SRV,
        ),
        ("web.default.svc.clusterset.local.", RecordType::TXT),
        ("nope.default.svc.clusterset.local.", RecordType::A),
        ("default.svc.clusterset.local.", RecordType::A),
        ("clusterset.local.", RecordType::SOA),
        ("db-1.east.db.prod.svc.clusterset.local.", RecordType::A),
    ];
    for (name, qtype) in cases {
        let q = query(name, qtype);
        let answer = outcome(&r, &wire(&q), Transport::Udp).expect(name);
        let m = Message::from_vec(&answer).expect("answer decodes");
        assert_eq!(m.metadata.id, 0xbeef);
        assert!(m.metadata.authoritative, "{name}");
        assert!(m.queries[0].name().eq_case(q.queries[0].name()), "{name}");
        let q = edns(q, 1232, |_| {});
        let answer = outcome(&r, &wire(&q), Transport::Udp).expect(name);
        let m = Message::from_vec(&answer).expect("answer decodes");
        assert_eq!(m.edns.map(|e| e.max_payload()), Some(1232), "{name}");
    }
}

#[test]
fn everything_else_takes_the_generic_path() {
    let r = responder();
    let web = "web.default.svc.clusterset.local.";
    let mut cases = vec![
        // Capitals: the generic path echoes them in the answers.
        wire(&query("WEB.default.svc.clusterset.local.", RecordType::A)),
        wire(&query(web, RecordType::ANY)),
        wire(&query("clusterset.local.", RecordType::AXFR)),
        wire(&query("example.com.", RecordType::A)),
        // Too big for UDP without EDNS.
        wire(&query("big.default.svc.clusterset.local.", RecordType::A)),
        wire(&edns(query(web, RecordType::A), 1232, |e| {
            e.set_version(1);
        })),
        wire(&edns(query(web, RecordType::A), 1232, |e| {
            e.options_mut().insert(EdnsOption::Subnet(ClientSubnet::new(
                IpAddr::V4(Ipv4Addr::new(192, 0, 2, 0)),
                24,
                0,
            )));
        })),
    ];
    let mut notify = query(web, RecordType::A);
    notify.metadata.op_code = OpCode::Notify;
    cases.push(wire(&notify));
    let mut chaos = query(web, RecordType::A);
    chaos.queries[0].set_query_class(DNSClass::CH);
    cases.push(wire(&chaos));
    let mut two = query(web, RecordType::A);
    two.add_query(Query::query(Name::root(), RecordType::NS));
    cases.push(wire(&two));
    let mut compressed = wire(&query(web, RecordType::A));
    compressed.truncate(12);
    compressed.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
    cases.push(compressed);

    for q in cases {
        assert_eq!(outcome(&r, &q, Transport::Udp), None, "{q:02x?}");
        assert!(r.respond(&q, Transport::Udp).is_some(), "{q:02x?}");
    }
    // Over TCP the big answer fits, but it is too big to precompute.
    let big = wire(&query("big.default.svc.clusterset.local.", RecordType::A));
    assert_eq!(outcome(&r, &big, Transport::Tcp), None);
}

#[test]
fn the_fast_path_leaves_answers_near_the_size_limit_to_the_generic_path() {
    let r = responder();
    let q = query("mid.default.svc.clusterset.local.", RecordType::A);
    let whole = r
        .respond_generic(&wire(&q), Transport::Tcp)
        .expect("answer");
    // With the OPT record, the answer needs 11 more octets; the fast path
    // keeps a name's length of margin for hickory's encoder.
    let needed = whole.len() + 11;
    let margin = needed + 255;
    assert!(margin < 1232, "{needed}");
    let mut truncated = 0;
    for payload in needed - 20..=1232 {
        let q = wire(&edns(
            q.clone(),
            u16::try_from(payload).expect("small"),
            |_| {},
        ));
        let generic = r.respond_generic(&q, Transport::Udp).expect("answer");
        assert!(generic.len() <= payload);
        let m = Message::from_vec(&generic).expect("decodes");
        truncated += usize::from(m.metadata.truncation);
        let fast = outcome(&r, &q, Transport::Udp);
        assert_eq!(fast.is_some(), payload >= margin, "payload {payload}");
        if let Some(fast) = fast {
            assert_eq!(fast, generic, "payload {payload}");
        }
        assert_eq!(r.respond(&q, Transport::Udp), Some(generic));
    }
    // hickory truncates a little short of the limit: the margin is needed.
    assert!(truncated > 20, "{truncated}");
}

#[test]
fn no_answer_to_runts_and_responses() {
    let r = responder();
    for q in [&[][..], &[0x12, 0x34, 0x01][..], &[0; 11][..]] {
        assert_eq!(r.respond(q, Transport::Udp), None);
    }
    let mut response = query("web.default.svc.clusterset.local.", RecordType::A);
    response.metadata.message_type = hickory_proto::op::MessageType::Response;
    assert_eq!(r.respond(&wire(&response), Transport::Udp), None);
    assert_eq!(r.respond(&wire(&response), Transport::Tcp), None);
}

#[test]
fn undecodable_queries_get_formerr_with_the_id() {
    let r = responder();
    let mut q = wire(&query("web.default.svc.clusterset.local.", RecordType::A));
    q.truncate(20);
    let answer = r.respond(&q, Transport::Udp).expect("FORMERR");
    let m = Message::from_vec(&answer).expect("decodes");
    assert_eq!(m.metadata.id, 0xbeef);
    assert_eq!(
        m.metadata.response_code,
        hickory_proto::op::ResponseCode::FormErr
    );
}

#[test]
fn compressed_questions_are_echoed_uncompressed() {
    let r = responder();
    // Found by fuzzing: three questions, one pointing into the header (whose
    // flags differ in the response), so that echoing the question bytes as
    // they came made an undecodable FORMERR.
    let fuzzed = [
        0x02, 0x4c, 0x01, 0x00, 0x00, 0x03, 0, 0, 0, 0, 0, 0, 0x00, 0x00, 0xce, 0x5b, 0xde, 0xc0,
        0x02, 0x00, 0x00, 0xce, 0x01, 0x00, 0x00, 0xce, 0xc0, 0x00,
    ];
    // A well-formed query whose question name points at... the header's ID
    // and flags, which happen to read as the root name: 0x00.
    let into_header = [
        0x00, 0x07, 0x00, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0xc0, 0x00, 0x00, 0x01, 0x00, 0x01,
    ];
    // Two questions, the second compressed against the first, as a client
    // may legitimately send them.
    let mut two = wire(&query("web.default.svc.clusterset.local.", RecordType::A));
    two[5] = 2;
    two.extend_from_slice(&[0xc0, 0x0c, 0x00, 0x1c, 0x00, 0x01]);
    for q in [&fuzzed[..], &into_header[..], &two[..]] {
        for transport in [Transport::Udp, Transport::Tcp] {
            let answer = r.respond(q, transport).expect("an answer");
            let m = Message::from_vec(&answer)
                .unwrap_or_else(|e| panic!("answer to {q:02x?} does not decode: {e}"));
            assert_eq!(m.metadata.id.to_be_bytes(), [q[0], q[1]]);
        }
    }
    let m = Message::from_vec(&r.respond(&two, Transport::Udp).expect("FORMERR")).expect("decodes");
    assert_eq!(m.queries.len(), 2);
    assert_eq!(m.queries[1].name(), m.queries[0].name());
    assert_eq!(m.queries[1].query_type(), RecordType::AAAA);
}

#[test]
fn answers_echo_the_question_case() {
    let r = responder();
    for (name, qtype) in [
        ("WeB.DeFault.svc.ClusterSet.LOCAL.", RecordType::A),
        (
            "_HTTP._tcp.web.DEFAULT.svc.clusterset.local.",
            RecordType::SRV,
        ),
    ] {
        let q = query(name, qtype);
        let answer = r.respond(&wire(&q), Transport::Udp).expect(name);
        let m = Message::from_vec(&answer).expect("answer decodes");
        assert!(m.queries[0].name().eq_case(q.queries[0].name()), "{name}");
        assert!(!m.answers.is_empty(), "{name}");
        for a in &m.answers {
            assert!(
                a.name.eq_case(q.queries[0].name()),
                "{name}: owner {}",
                a.name
            );
        }
    }
}
