//! The fast path: every answer the zone can give, encoded once per
//! snapshot, and sent by copying it and patching in the query's ID and
//! flags (lowercase questions only: see [`FastAnswers::answer`]).
//!
//! [`FastAnswers::build`] asks the generic path (hickory-server) every
//! question the zone has a positive answer to: each name for each type it
//! holds, over TCP so that nothing is truncated. A negative answer (NXDOMAIN,
//! or NODATA for a type the name lacks) is the header, the question and the
//! zone's SOA, whose encoding only depends on where it starts: it is encoded
//! for every possible question length.
//!
//! [`FastAnswers::answer`] takes a query only if it is a plain one: opcode
//! QUERY, one question of class IN, no answer or authority records, at most
//! an OPT record of EDNS version 0 whose options the generic path would
//! ignore too, and an answer that fits the transport without truncation
//! with [`MAX_NAME_LEN`] octets to spare: hickory's encoder writes each
//! name in full before replacing it with a compression pointer, so it
//! truncates answers that would have fit by up to a name's length.
//! Anything else returns `None` and goes to the generic path. The bytes sent
//! are then exactly the ones the generic path would send (the differential
//! tests in `respond/tests.rs`, `tests/random_packets.rs` and the fuzz
//! target check this).

use std::collections::HashMap;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{Name, RecordType};
use hickory_proto::serialize::binary::{BinEncodable, BinEncoder};
use tracing::warn;

use super::generic::{
    self, CLASSIC_UDP_PAYLOAD, EDNS_VERSION, HEADER_LEN, MAX_UDP_PAYLOAD, OPT_RECORD_LEN,
};
use super::{Outcome, Transport};
use crate::{Lookup, Zone};

/// Longest name on the wire, root label included (RFC 1035).
const MAX_NAME_LEN: usize = 255;

/// Answers longer than this are left to the generic path: they never fit a
/// UDP response, and over TCP they are rare.
const MAX_PRECOMPUTED: usize = MAX_UDP_PAYLOAD as usize;

/// EDNS option codes hickory decodes (and may reject) rather than skip:
/// NSID, DAU, DHU, N3U and client subnet. A query carrying one of these
/// goes to the generic path.
const DECODED_EDNS_OPTIONS: [u16; 5] = [3, 5, 6, 7, 8];

/// Record types the fast path never answers: `ANY` and zone transfers.
const GENERIC_ONLY_TYPES: [u16; 3] = [255, 252, 251];

/// A record type code no zone holds (private use, RFC 6895): asking for it
/// at the apex yields the negative SOA.
const ABSENT_TYPE: u16 = 65_534;

/// The precomputed answers of one zone snapshot.
pub(crate) struct FastAnswers {
    /// Every name of the zone, lowercase in wire format, with the encoded
    /// positive answer for each type it holds.
    names: HashMap<Box<[u8]>, Box<[Answer]>>,
    /// The origin in wire format, lowercase.
    origin: Box<[u8]>,
    /// The SOA record of negative answers, encoded as it is when it starts
    /// at `HEADER_LEN + question length`, for every question length from
    /// the shortest in-zone one; empty if the zone has no SOA (never).
    negative_soa: Vec<Box<[u8]>>,
}

/// One positive answer of the zone.
struct Answer {
    qtype: u16,
    /// The whole response to a query with ID 0, no flags and the question
    /// in lowercase; `None` if it is too big to precompute (the generic path
    /// answers it then).
    wire: Option<Box<[u8]>>,
}

/// The parts of a query the fast path needs.
struct Query {
    /// End of the question name (after its root label).
    name_end: usize,
    /// End of the question section.
    question_end: usize,
    qtype: u16,
    /// The payload to advertise in the response's OPT record, if the query
    /// had one.
    edns_payload: Option<u16>,
}

impl FastAnswers {
    /// Precomputes every answer of `zone` with the generic path.
    pub(crate) fn build(zone: &Zone) -> Self {
        let mut names = HashMap::new();
        let mut query = Vec::new();
        let mut out = Vec::new();
        for (owner, records) in zone.owners() {
            let key = wire_name(owner);
            let mut types: Vec<RecordType> = Vec::new();
            for record in records {
                if !types.contains(&record.record_type()) {
                    types.push(record.record_type());
                }
            }
            let mut answers = Vec::with_capacity(types.len());
            for qtype in types {
                let code = u16::from(qtype);
                if GENERIC_ONLY_TYPES.contains(&code) {
                    continue;
                }
                synthetic_query(&key, code, &mut query);
                let wire = match generic::respond(zone, &query, Transport::Tcp, &mut out) {
                    Some(Outcome {
                        rcode: ResponseCode::NoError,
                        ..
                    }) if out.len() <= MAX_PRECOMPUTED => Some(out.as_slice().into()),
                    // Too big: left to the generic path.
                    Some(_) if out.len() > MAX_PRECOMPUTED => None,
                    other => {
                        warn!(
                            name = %owner,
                            %qtype,
                            rcode = ?other.map(|o| o.rcode),
                            "unexpected answer while precomputing; left to the generic path"
                        );
                        None
                    }
                };
                answers.push(Answer { qtype: code, wire });
            }
            names.insert(key, answers.into_boxed_slice());
        }

        let origin = wire_name(zone.origin());
        let negative_soa = negative_soa(zone, origin.len());
        Self {
            names,
            origin,
            negative_soa,
        }
    }

    /// Answers `query` into `out` (empty on entry) if it is a plain query
    /// whose answer fits `transport`; `None` (and `out` left in any state)
    /// otherwise.
    pub(crate) fn answer(
        &self,
        query: &[u8],
        transport: Transport,
        out: &mut Vec<u8>,
    ) -> Option<Outcome> {
        let mut key = [0u8; MAX_NAME_LEN];
        let parsed = parse(query, &mut key)?;
        // A question with capitals is answered by the generic path, which
        // echoes its case in the answers' owner names; compression then
        // differs from the precomputed (lowercase) answers. Stub resolvers
        // ask in lowercase; resolvers randomising case (0x20) take the
        // slower path.
        if query
            .get(HEADER_LEN..parsed.name_end)?
            .iter()
            .any(u8::is_ascii_uppercase)
        {
            return None;
        }
        let key = key.get(..parsed.name_end - HEADER_LEN)?;
        let limit = match (transport, parsed.edns_payload) {
            (Transport::Tcp, _) => usize::from(u16::MAX),
            (Transport::Udp, Some(payload)) => usize::from(payload),
            (Transport::Udp, None) => usize::from(CLASSIC_UDP_PAYLOAD),
        };
        // What the answer may take: the limit, less the OPT record and the
        // encoder's margin (see the module documentation).
        let opt_len = if parsed.edns_payload.is_some() {
            usize::from(OPT_RECORD_LEN)
        } else {
            0
        };
        let room = limit.checked_sub(opt_len + MAX_NAME_LEN)?;

        let rcode = match self.names.get(key) {
            Some(answers) => match answers.iter().find(|a| a.qtype == parsed.qtype) {
                Some(answer) => {
                    let wire = answer.wire.as_deref()?;
                    if wire.len() > room {
                        return None;
                    }
                    out.extend_from_slice(wire);
                    // Only lowercase questions get here (see below), so the
                    // template's question is already the one asked.
                    ResponseCode::NoError
                }
                None => self.negative(query, &parsed, ResponseCode::NoError, out)?,
            },
            None if self.in_zone(key) => {
                self.negative(query, &parsed, ResponseCode::NXDomain, out)?
            }
            // Not ours: REFUSED, from the generic path.
            None => return None,
        };
        if out.len() > room {
            return None;
        }

        // Header: the query's ID; QR and AA set, the query's RD and CD.
        out.get_mut(..4)?.copy_from_slice(&[
            *query.first()?,
            *query.get(1)?,
            0x84 | (query.get(2)? & 0x01),
            (query.get(3)? & 0x10) | rcode.low(),
        ]);
        if let Some(payload) = parsed.edns_payload {
            let count = out.get_mut(10..12)?;
            let additionals = u16::from_be_bytes([count[0], count[1]]).checked_add(1)?;
            count.copy_from_slice(&additionals.to_be_bytes());
            // OPT: root owner, type 41, class = payload, extended RCODE 0,
            // version 0, no flags, no options.
            let [hi, lo] = payload.to_be_bytes();
            out.extend_from_slice(&[0, 0, 41, hi, lo, 0, EDNS_VERSION, 0, 0, 0, 0]);
        }
        Some(Outcome {
            qtype: Some(RecordType::from(parsed.qtype)),
            rcode,
        })
    }

    /// Writes a negative answer (header counts, question, SOA) into `out`;
    /// the caller fills in the ID and flags.
    fn negative(
        &self,
        query: &[u8],
        parsed: &Query,
        rcode: ResponseCode,
        out: &mut Vec<u8>,
    ) -> Option<ResponseCode> {
        let question = query.get(HEADER_LEN..parsed.question_end)?;
        let shortest = self.origin.len() + 4;
        let soa = self
            .negative_soa
            .get(question.len().checked_sub(shortest)?)?;
        // ID and flags are patched by the caller; 1 question, 0 answers,
        // 1 authority, 0 additionals.
        out.extend_from_slice(&[0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0]);
        out.extend_from_slice(question);
        out.extend_from_slice(soa);
        Some(rcode)
    }

    /// Whether the lowercase wire name `key` is the origin or below it: the
    /// origin's labels end it, starting at a label boundary.
    fn in_zone(&self, key: &[u8]) -> bool {
        let Some(start) = key.len().checked_sub(self.origin.len()) else {
            return false;
        };
        if key.get(start..) != Some(&self.origin[..]) {
            return false;
        }
        let mut at = 0;
        while at < start {
            match key.get(at) {
                Some(&len) => at += 1 + usize::from(len),
                None => return false,
            }
        }
        at == start
    }
}

/// Parses a plain query (see the module documentation), writing the
/// question name lowercase into `key`; `None` if the query is not plain.
fn parse(query: &[u8], key: &mut [u8; MAX_NAME_LEN]) -> Option<Query> {
    let header = query.get(..HEADER_LEN)?;
    let count = |i: usize| u16::from_be_bytes([header[i], header[i + 1]]);
    // QR clear (a query) and opcode QUERY (0).
    if header[2] & 0xf8 != 0 {
        return None;
    }
    // One question, nothing in the answer and authority sections, at most
    // one additional record (an OPT).
    if count(4) != 1 || count(6) != 0 || count(8) != 0 || count(10) > 1 {
        return None;
    }

    let mut at = HEADER_LEN;
    let mut len = 0;
    loop {
        let label = usize::from(*query.get(at)?);
        if label == 0 {
            *key.get_mut(len)? = 0;
            at += 1;
            break;
        }
        // Compression pointers and extended label types: generic path.
        if label > 63 || len + label + 2 > MAX_NAME_LEN {
            return None;
        }
        key[len] = label as u8;
        let bytes = query.get(at + 1..at + 1 + label)?;
        for (k, b) in key.get_mut(len + 1..len + 1 + label)?.iter_mut().zip(bytes) {
            *k = b.to_ascii_lowercase();
        }
        len += 1 + label;
        at += 1 + label;
    }
    let name_end = at;
    let qtype = u16::from_be_bytes([*query.get(at)?, *query.get(at + 1)?]);
    let qclass = u16::from_be_bytes([*query.get(at + 2)?, *query.get(at + 3)?]);
    let question_end = at + 4;
    if qclass != 1 || GENERIC_ONLY_TYPES.contains(&qtype) {
        return None;
    }

    let edns_payload = if count(10) == 1 {
        Some(parse_opt(query.get(question_end..)?)?)
    } else {
        None
    };
    Some(Query {
        name_end,
        question_end,
        qtype,
        edns_payload,
    })
}

/// Parses an OPT record the generic path would accept and answer with
/// version 0, returning the payload size to advertise back.
fn parse_opt(record: &[u8]) -> Option<u16> {
    // Root owner, type OPT.
    if record.get(..3)? != [0, 0, 41] {
        return None;
    }
    let payload = u16::from_be_bytes([*record.get(3)?, *record.get(4)?]);
    let version = *record.get(6)?;
    if version != EDNS_VERSION {
        return None;
    }
    let rdlen = usize::from(u16::from_be_bytes([*record.get(9)?, *record.get(10)?]));
    let mut options = record.get(11..11 + rdlen)?;
    // Options the generic path skips, exactly filling the record data.
    while !options.is_empty() {
        let code = u16::from_be_bytes([*options.first()?, *options.get(1)?]);
        let len = usize::from(u16::from_be_bytes([*options.get(2)?, *options.get(3)?]));
        if DECODED_EDNS_OPTIONS.contains(&code) {
            return None;
        }
        options = options.get(4 + len..)?;
    }
    // RFC 6891: below 512 means 512; never more than this server's limit.
    Some(payload.clamp(CLASSIC_UDP_PAYLOAD, MAX_UDP_PAYLOAD))
}

/// Writes a query for `name` (lowercase, wire format) and `qtype`, ID 0 and
/// no flags, into `out`.
fn synthetic_query(name: &[u8], qtype: u16, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&[0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    out.extend_from_slice(name);
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&[0, 1]);
}

/// `name` in uncompressed wire format (as stored: the zone's names are
/// lowercase).
fn wire_name(name: &Name) -> Box<[u8]> {
    let mut wire = Vec::with_capacity(name.len() + 1);
    for label in name.iter() {
        // Labels of a valid name are at most 63 octets.
        wire.push(label.len() as u8);
        wire.extend_from_slice(label);
    }
    wire.push(0);
    wire.into_boxed_slice()
}

/// The zone's negative SOA record encoded as the generic path encodes it
/// after a question of each possible length (the owner name in full, the
/// names in its data compressed against it, so pointers depend on where it
/// starts). Index 0 is for the shortest in-zone question, `origin_len + 4`.
fn negative_soa(zone: &Zone, origin_len: usize) -> Vec<Box<[u8]>> {
    let soa = match zone.lookup(zone.origin(), RecordType::from(ABSENT_TYPE)) {
        Lookup::NoData { soa } | Lookup::NxDomain { soa } => soa,
        Lookup::Answer { .. } | Lookup::NotAuthoritative => return Vec::new(),
    };
    let mut tails = Vec::new();
    let mut buf = Vec::new();
    for question_len in origin_len + 4..=MAX_NAME_LEN + 4 {
        let start = HEADER_LEN + question_len;
        buf.clear();
        buf.resize(start, 0);
        let mut encoder = BinEncoder::with_offset(&mut buf, start as u32);
        if soa.emit(&mut encoder).is_err() {
            return Vec::new();
        }
        tails.push(buf.get(start..).unwrap_or_default().into());
    }
    tails
}
