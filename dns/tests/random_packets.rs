//! Bounded random-packet testing of the request path (the fuzz target in
//! `dns/fuzz` explores further): random and mutated valid messages through
//! [`Responder::respond`] and over real UDP and TCP sockets, with a fixed
//! seed so that a failure reproduces.
//!
//! Checked for every packet: no panic; any answer decodes as a DNS message
//! carrying the query's ID and fits the transport; the fast path and the
//! generic path send the same bytes; the server sends exactly what
//! `respond` computes, and still answers a valid query afterwards.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, Query};
use hickory_proto::rr::rdata::opt::{EdnsCode, EdnsOption};
use hickory_proto::rr::{Name, RecordType};
use prometheus_client::registry::Registry;
use strait_dns::{DnsMetrics, DnsServer, Responder, Transport, Zone, ZoneHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::timeout;

const SEED: u64 = 0x5742_4149_5444_4e53;
const RANDOM: usize = 2_000;
const MUTATED: usize = 4_000;
const OVER_UDP: usize = 1_500;
const OVER_TCP: usize = 400;
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(n.max(1)).unwrap_or(1)).unwrap_or(0)
    }

    fn byte(&mut self) -> u8 {
        self.next().to_le_bytes()[0]
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.byte()).collect()
    }
}

fn zone() -> Zone {
    let services = strait_dns::sample::every_kind_of_answer();
    Zone::build_with_serial("clusterset.local", &services, 30, 1).expect("zone builds")
}

/// Valid queries to mutate: several names, types, EDNS variants.
fn seeds() -> Vec<Vec<u8>> {
    let names = [
        "web.default.svc.clusterset.local.",
        "_http._tcp.web.default.svc.clusterset.local.",
        "big.default.svc.clusterset.local.",
        "_http._tcp.db.prod.svc.clusterset.local.",
        "10-1-0-3.east.db.prod.svc.clusterset.local.",
        "nope.default.svc.clusterset.local.",
        "clusterset.local.",
        "example.com.",
    ];
    let types = [
        RecordType::A,
        RecordType::AAAA,
        RecordType::SRV,
        RecordType::SOA,
        RecordType::ANY,
    ];
    let mut seeds = Vec::new();
    for (i, name) in names.iter().enumerate() {
        for (j, qtype) in types.iter().enumerate() {
            let mut message = Message::query();
            message.metadata.id = u16::try_from(i * 16 + j).unwrap_or(0);
            message.metadata.recursion_desired = j % 2 == 0;
            message.add_query(Query::query(
                Name::from_ascii(name).expect("valid name"),
                *qtype,
            ));
            seeds.push(message.to_vec().expect("encodes"));
            let mut edns = Edns::new();
            edns.set_max_payload(1232);
            if i % 2 == 0 {
                edns.options_mut()
                    .insert(EdnsOption::Unknown(u16::from(EdnsCode::Cookie), vec![7; 8]));
            }
            message.set_edns(edns);
            seeds.push(message.to_vec().expect("encodes"));
        }
    }
    seeds
}

/// One to four random edits of `packet`.
fn mutate(rng: &mut Rng, mut packet: Vec<u8>) -> Vec<u8> {
    for _ in 0..=rng.below(4) {
        let at = rng.below(packet.len());
        match rng.below(8) {
            0 => {
                if let Some(b) = packet.get_mut(at) {
                    *b ^= 1 << rng.below(8);
                }
            }
            1 => {
                if let Some(b) = packet.get_mut(at) {
                    *b = rng.byte();
                }
            }
            2 => packet.truncate(at),
            3 => {
                let len = rng.below(40);
                let extra = rng.bytes(len);
                packet.extend(extra);
            }
            4 => {
                let len = 1 + rng.below(8);
                let insert = rng.bytes(len);
                packet.splice(at..at, insert);
            }
            5 => {
                let end = (at + 1 + rng.below(16)).min(packet.len());
                packet.drain(at..end);
            }
            // Header counts and flags are where parsers take decisions.
            6 => {
                if let Some(b) = packet.get_mut(2 + rng.below(10)) {
                    *b = [0, 1, 2, 0x80, 0xff][rng.below(5)];
                }
            }
            _ => {
                // Case of the question.
                for b in packet.iter_mut().skip(12) {
                    if b.is_ascii_alphabetic() && rng.below(2) == 0 {
                        *b ^= 0x20;
                    }
                }
            }
        }
    }
    packet
}

fn packets() -> Vec<Vec<u8>> {
    let mut rng = Rng(SEED);
    let seeds = seeds();
    let mut packets = Vec::with_capacity(RANDOM + MUTATED);
    for i in 0..RANDOM {
        let len = rng.below(600);
        let mut packet = rng.bytes(len);
        // Every other one with a plausible query header, to get further in.
        if i % 2 == 0 && packet.len() >= 12 {
            packet[2] &= 0x79;
            packet[4..12].copy_from_slice(&[0, 1, 0, 0, 0, 0, 0, rng.below(2) as u8]);
        }
        packets.push(packet);
    }
    for _ in 0..MUTATED {
        let seed = seeds[rng.below(seeds.len())].clone();
        packets.push(mutate(&mut rng, seed));
    }
    packets
}

/// The checks every answer must pass; returns the answer.
fn check(responder: &Responder, packet: &[u8], transport: Transport) -> Option<Vec<u8>> {
    let answer = responder.respond(packet, transport);
    assert_eq!(
        answer,
        responder.respond_generic(packet, transport),
        "fast and generic paths differ for {packet:02x?} over {transport:?}"
    );
    let bytes = answer.as_ref()?;
    let message = Message::from_vec(bytes)
        .unwrap_or_else(|e| panic!("answer to {packet:02x?} does not decode: {e}"));
    assert_eq!(
        message.metadata.id.to_be_bytes(),
        [packet[0], packet[1]],
        "{packet:02x?}"
    );
    let limit = match transport {
        Transport::Udp => 1232,
        Transport::Tcp => usize::from(u16::MAX),
    };
    assert!(
        bytes.len() <= limit,
        "{} bytes for {packet:02x?}",
        bytes.len()
    );
    answer
}

#[test]
fn random_and_mutated_packets_through_the_responder() {
    let responder = Responder::new(zone());
    let mut answered = 0;
    for packet in packets() {
        for transport in [Transport::Udp, Transport::Tcp] {
            answered += usize::from(check(&responder, &packet, transport).is_some());
        }
    }
    // The mix reaches the answering code, not only the early exits.
    assert!(answered > MUTATED, "only {answered} answers");
}

fn probe(id: u16) -> Vec<u8> {
    let mut message = Message::query();
    message.metadata.id = id;
    message.add_query(Query::query(
        Name::from_ascii("web.default.svc.clusterset.local.").expect("name"),
        RecordType::A,
    ));
    message.to_vec().expect("encodes")
}

async fn recv(socket: &UdpSocket) -> Vec<u8> {
    let mut buf = vec![0; 65_535];
    let (len, _) = timeout(IO_TIMEOUT, socket.recv_from(&mut buf))
        .await
        .expect("an answer in time")
        .expect("recv");
    buf.truncate(len);
    buf
}

async fn tcp_exchange(stream: &mut TcpStream, packet: &[u8]) {
    let len = u16::try_from(packet.len()).expect("fits a frame");
    let mut frame = len.to_be_bytes().to_vec();
    frame.extend_from_slice(packet);
    stream.write_all(&frame).await.expect("write");
}

async fn tcp_recv(stream: &mut TcpStream) -> Vec<u8> {
    let len = timeout(IO_TIMEOUT, stream.read_u16())
        .await
        .expect("an answer in time")
        .expect("length");
    let mut body = vec![0; usize::from(len)];
    timeout(IO_TIMEOUT, stream.read_exact(&mut body))
        .await
        .expect("an answer in time")
        .expect("body");
    body
}

/// The server sends exactly what `respond` computes, in order (one UDP task
/// on this current-thread runtime): each packet is followed by a valid probe
/// query, and whatever arrives before the probe's answer is the packet's.
#[tokio::test]
async fn random_and_mutated_packets_over_the_wire() {
    let handle = ZoneHandle::new(zone());
    let responder = handle.responder();
    let metrics = DnsMetrics::register(&mut Registry::default());
    let server = DnsServer::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), handle, metrics)
        .await
        .expect("server binds");
    let addr = server.local_addr();
    let packets = packets();

    let client = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("client binds");
    for (i, packet) in packets.iter().step_by(packets.len() / OVER_UDP).enumerate() {
        let expected = check(&responder, packet, Transport::Udp);
        let probe = probe(0xf000 | u16::try_from(i % 0x1000).unwrap_or(0));
        let probe_answer = responder.respond(&probe, Transport::Udp);
        client.send_to(packet, addr).await.expect("send");
        client.send_to(&probe, addr).await.expect("send");
        if let Some(expected) = expected {
            assert_eq!(recv(&client).await, expected, "answer to {packet:02x?}");
        }
        assert_eq!(
            Some(recv(&client).await),
            probe_answer,
            "after {packet:02x?}"
        );
    }

    // TCP: the same, a fresh connection every 50 packets.
    let mut stream = TcpStream::connect(addr).await.expect("connects");
    let mut connections = 1;
    for (i, packet) in packets.iter().step_by(packets.len() / OVER_TCP).enumerate() {
        let expected = check(&responder, packet, Transport::Tcp);
        let probe = probe(0xe000 | u16::try_from(i % 0x1000).unwrap_or(0));
        tcp_exchange(&mut stream, packet).await;
        tcp_exchange(&mut stream, &probe).await;
        if let Some(expected) = expected {
            assert_eq!(tcp_recv(&mut stream).await, expected, "{packet:02x?}");
        }
        assert_eq!(
            Some(tcp_recv(&mut stream).await),
            responder.respond(&probe, Transport::Tcp)
        );
        if i % 50 == 49 {
            stream = TcpStream::connect(addr).await.expect("connects");
            connections += 1;
        }
    }
    assert!(connections > 1);

    // Still serving.
    let fresh = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("client binds");
    fresh.send_to(&probe(7), addr).await.expect("send");
    let answer = Message::from_vec(&recv(&fresh).await).expect("decodes");
    assert_eq!(answer.metadata.id, 7);
    assert_eq!(answer.answers.len(), 1);
    server.shutdown().await;
}
