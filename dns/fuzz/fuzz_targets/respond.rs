//! Fuzzes the request path: raw bytes in, through the very function the DNS
//! server answers every UDP datagram and TCP message with
//! ([`Responder::respond`]; the server calls its buffer-reusing twin).
//!
//! The first input byte picks the transport, the rest is the message.
//! Checked: no panic; any answer decodes as a DNS message with the query's
//! ID and fits the transport; the fast path and the generic (hickory-server)
//! path send the same bytes.

#![no_main]

use std::sync::OnceLock;

use hickory_proto::op::Message;
use libfuzzer_sys::fuzz_target;
use strait_dns::{Responder, Transport, Zone};

/// A zone with every kind of answer: A and AAAA, SRV with additionals,
/// headless endpoints, an answer too big for UDP, empty non-terminals.
fn responder() -> &'static Responder {
    static RESPONDER: OnceLock<Responder> = OnceLock::new();
    RESPONDER.get_or_init(|| {
        let services = strait_dns::sample::every_kind_of_answer();
        let zone = Zone::build_with_serial("clusterset.local", &services, 30, 1)
            .expect("the fuzzing zone builds");
        Responder::new(zone)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, query)) = data.split_first() else {
        return;
    };
    let transport = if selector & 1 == 0 {
        Transport::Udp
    } else {
        Transport::Tcp
    };
    let responder = responder();
    let answer = responder.respond(query, transport);
    assert_eq!(
        answer,
        responder.respond_generic(query, transport),
        "the fast and generic paths differ"
    );
    let Some(answer) = answer else {
        return;
    };
    let message = Message::from_vec(&answer).expect("every answer decodes");
    assert_eq!(message.metadata.id.to_be_bytes(), [query[0], query[1]]);
    let limit = match transport {
        Transport::Udp => 1232,
        Transport::Tcp => usize::from(u16::MAX),
    };
    assert!(
        answer.len() <= limit,
        "{} octets over {transport:?}",
        answer.len()
    );
});
