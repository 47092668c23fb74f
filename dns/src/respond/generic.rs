//! The generic path: any query, decoded with hickory-server's
//! [`Request`] and answered with its [`MessageResponseBuilder`].
//!
//! Everything the fast path ([`super::fast`]) does not take ends here:
//! malformed messages, other opcodes and classes, several questions, EDNS
//! versions above 0, unusual EDNS options, `ANY`, zone transfers, names
//! outside the zone, and answers too big for the client's UDP payload
//! (truncation). The fast path precomputes its positive answers with this
//! very function, so both give the same answers.

use std::net::{Ipv4Addr, SocketAddr};
use std::slice;

use hickory_proto::op::{Edns, Header, HeaderCounts, Metadata, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, LowerName, Name, Record, RecordType};
use hickory_proto::serialize::binary::{
    BinDecodable, BinDecoder, BinEncodable, BinEncoder, NameEncoding,
};
use hickory_server::server::Request;
use hickory_server::zone_handler::{MessageResponse, MessageResponseBuilder, Queries};
use tracing::{error, trace};

use super::{Outcome, Transport};
use crate::{Lookup, Zone};

/// Largest UDP payload advertised in our OPT record (the DNS flag day 2020
/// value); the response is truncated to `min(client's payload, this)`.
pub(crate) const MAX_UDP_PAYLOAD: u16 = 1232;

/// EDNS version this server implements.
pub(crate) const EDNS_VERSION: u8 = 0;

/// UDP payload limit of a query without EDNS (RFC 1035).
pub(crate) const CLASSIC_UDP_PAYLOAD: u16 = 512;

/// Wire size of an OPT record without options.
pub(crate) const OPT_RECORD_LEN: u16 = 11;

/// Length of the DNS message header.
pub(crate) const HEADER_LEN: usize = 12;

/// Stands in for the client address in the [`Request`]s built here: nothing
/// in answering depends on who asked.
const ANY_CLIENT: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);

/// Answers `query` into `out` (cleared first); `None` means no answer at
/// all (shorter than a header, or a response rather than a query).
pub(crate) fn respond(
    zone: &Zone,
    query: &[u8],
    transport: Transport,
    out: &mut Vec<u8>,
) -> Option<Outcome> {
    out.clear();
    // Fewer than 12 octets cannot be a query: no answer.
    let header = Header::read(&mut BinDecoder::new(query)).ok()?;
    // Never answer a response (no reflection).
    if header.metadata.message_type == hickory_proto::op::MessageType::Response {
        return None;
    }
    let request = match Request::from_bytes(query.to_vec(), ANY_CLIENT, transport.protocol()) {
        Ok(request) => request,
        Err(error) => {
            trace!(%error, id = header.metadata.id, "undecodable query: FORMERR");
            // As hickory-server does: the header is echoed, without questions.
            let queries = Queries::read(&mut BinDecoder::new(&[]), 0).ok()?;
            let response = MessageResponseBuilder::new(&queries, None)
                .error_msg(&header.metadata, ResponseCode::FormErr);
            let rcode = encode(response, transport, out);
            return Some(Outcome { qtype: None, rcode });
        }
    };
    let qtype = match request.queries.queries() {
        [query] => Some(query.query_type()),
        _ => None,
    };
    let Some(questions) = echoed_questions(query, request.queries.len()) else {
        // Decoded once already: cannot happen.
        error!(id = header.metadata.id, "cannot decode the questions again");
        return None;
    };
    let rcode = answer(zone, &request, &questions, transport, out);
    // Empty only if even a bare SERVFAIL could not be encoded (logged).
    (!out.is_empty()).then_some(Outcome { qtype, rcode })
}

/// The question section of the response: the query's questions as asked
/// (case kept), encoded without compression.
///
/// hickory-server's builder copies the query's question bytes, and a
/// compression pointer among them would point into the response's header,
/// which differs from the query's: the response would not decode (found by
/// fuzzing).
fn echoed_questions(query: &[u8], count: usize) -> Option<Queries> {
    // Over the whole message: pointers are offsets from its start.
    let mut decoder = BinDecoder::new(query);
    decoder.read_slice(HEADER_LEN).ok()?;
    let mut buf = Vec::new();
    let mut encoder = BinEncoder::new(&mut buf);
    encoder.set_name_encoding(NameEncoding::Uncompressed);
    for _ in 0..count {
        Query::read(&mut decoder).ok()?.emit(&mut encoder).ok()?;
    }
    Queries::read(&mut BinDecoder::new(&buf), count).ok()
}

/// Answers a decoded query; returns the response code sent.
fn answer(
    zone: &Zone,
    request: &Request,
    questions: &Queries,
    transport: Transport,
    out: &mut Vec<u8>,
) -> ResponseCode {
    let edns = request.edns.as_ref().map(response_edns);
    let edns = edns.as_ref();
    let error = |rcode: ResponseCode, out: &mut Vec<u8>| {
        trace!(%rcode, id = request.metadata.id, "answering with an error");
        let response =
            MessageResponseBuilder::new(questions, edns).error_msg(&request.metadata, rcode);
        encode(response, transport, out)
    };

    if request
        .edns
        .as_ref()
        .is_some_and(|e| e.version() > EDNS_VERSION)
    {
        return error(ResponseCode::BADVERS, out);
    }
    if request.metadata.op_code != OpCode::Query {
        return error(ResponseCode::NotImp, out);
    }
    let [query] = request.queries.queries() else {
        return error(ResponseCode::FormErr, out);
    };
    let qtype = query.query_type();
    if query.query_class() != DNSClass::IN || matches!(qtype, RecordType::AXFR | RecordType::IXFR) {
        return error(ResponseCode::Refused, out);
    }

    let (rcode, answers, authorities, additionals): (
        ResponseCode,
        &[Record],
        &[Record],
        &[Record],
    ) = match zone.lookup(query.name(), qtype) {
        Lookup::Answer {
            answers,
            additionals,
        } => (ResponseCode::NoError, answers, &[], additionals),
        Lookup::NoData { soa } => (ResponseCode::NoError, &[], slice::from_ref(soa), &[]),
        Lookup::NxDomain { soa } => (ResponseCode::NXDomain, &[], slice::from_ref(soa), &[]),
        Lookup::NotAuthoritative => return error(ResponseCode::Refused, out),
    };
    trace!(
        name = %query.name(),
        %qtype,
        %rcode,
        answers = answers.len(),
        serial = zone.serial(),
        "answering from zone"
    );

    // Answers at the question's name echo its case as asked (0x20 resolvers
    // check it): their owner becomes the question's own name, which the
    // encoder then writes as a pointer to the question.
    let asked = Name::read(&mut BinDecoder::new(questions.as_bytes())).ok();
    let echoed: Vec<Record>;
    let answers: &[Record] = match &asked {
        Some(asked)
            if answers
                .iter()
                .any(|r| LowerName::from(&r.name) == *query.name()) =>
        {
            echoed = answers
                .iter()
                .map(|r| {
                    let mut r = r.clone();
                    if LowerName::from(&r.name) == *query.name() {
                        r.name = asked.clone();
                    }
                    r
                })
                .collect();
            &echoed
        }
        _ => answers,
    };

    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.authoritative = true;
    metadata.response_code = rcode;
    let fit = additionals_that_fit(
        questions,
        transport,
        edns,
        metadata,
        answers,
        authorities,
        additionals,
    );
    let additionals = additionals.get(..fit).unwrap_or(additionals);
    let response = MessageResponseBuilder::new(questions, edns).build(
        metadata,
        answers,
        authorities,
        &[],
        additionals,
    );
    encode(response, transport, out)
}

/// The OPT record of a response to a query carrying `request`.
fn response_edns(request: &Edns) -> Edns {
    let mut edns = Edns::new();
    // `set_max_payload` raises values below 512 to 512.
    edns.set_max_payload(request.max_payload().min(MAX_UDP_PAYLOAD));
    edns.set_version(EDNS_VERSION);
    edns
}

/// How many of `additionals` fit in a UDP response beside the rest of it.
///
/// hickory's encoder sets TC whenever any section overflows, but additional
/// data that does not fit is simply left out (RFC 2181 section 9), so a
/// trial encoding finds how much of it fits, keeping room for the OPT record.
fn additionals_that_fit(
    questions: &Queries,
    transport: Transport,
    edns: Option<&Edns>,
    metadata: Metadata,
    answers: &[Record],
    authorities: &[Record],
    additionals: &[Record],
) -> usize {
    if additionals.is_empty() || transport != Transport::Udp {
        return additionals.len();
    }
    let limit = match edns {
        Some(edns) => edns.max_payload().saturating_sub(OPT_RECORD_LEN),
        None => CLASSIC_UDP_PAYLOAD,
    };
    let mut buf = Vec::with_capacity(usize::from(limit));
    let mut encoder = BinEncoder::new(&mut buf);
    encoder.set_max_size(limit);
    let trial = MessageResponseBuilder::new(questions, None).build(
        metadata,
        answers,
        authorities,
        &[],
        additionals,
    );
    match trial.destructive_emit(&mut encoder) {
        Ok(info) => usize::from(info.counts().additionals),
        // The real encoding reports the error.
        Err(_) => additionals.len(),
    }
}

/// Encodes `response` into `out` within the transport's size limit (UDP:
/// the OPT record's payload, else 512; hickory sets TC when a section does
/// not fit), as hickory-server's own response handle does; an encoding
/// error becomes a bare SERVFAIL. Returns the response code sent.
fn encode<'a>(
    response: MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    transport: Transport,
    out: &mut Vec<u8>,
) -> ResponseCode {
    let id = response.metadata().id;
    let max_size = match transport {
        Transport::Udp => response
            .edns()
            .map_or(CLASSIC_UDP_PAYLOAD, Edns::max_payload),
        Transport::Tcp => u16::MAX,
    };
    out.clear();
    let mut encoder = BinEncoder::new(out);
    encoder.set_max_size(max_size);
    let error = match response.destructive_emit(&mut encoder) {
        Ok(info) => return info.response_code,
        Err(error) => error,
    };

    error!(%error, id, "cannot encode DNS response: SERVFAIL");
    out.clear();
    let mut metadata = Metadata::new(id, hickory_proto::op::MessageType::Response, OpCode::Query);
    metadata.response_code = ResponseCode::ServFail;
    let header = Header {
        metadata,
        counts: HeaderCounts::default(),
    };
    let mut encoder = BinEncoder::new(out);
    if let Err(error) = header.emit(&mut encoder) {
        error!(%error, id, "cannot encode a SERVFAIL header either");
        out.clear();
    }
    ResponseCode::ServFail
}
