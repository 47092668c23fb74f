//! [`Responder`]: wire-format query in, wire-format response out, with no
//! I/O. The DNS server answers every UDP datagram and TCP message with
//! [`Responder::respond_into`]; the tests and the fuzz target call the same
//! code through [`Responder::respond`].
//!
//! Two paths give the same bytes:
//!
//! * the **fast path** ([`fast`]) answers plain queries (opcode QUERY, one
//!   IN question in lowercase, optional EDNS 0) from answers encoded once
//!   per zone snapshot, patching in the query's ID and flags;
//! * the **generic path** ([`generic`]) decodes anything with hickory-server
//!   and builds the response with its `MessageResponseBuilder`: errors,
//!   EDNS versions and options the fast path does not take, `ANY`, names
//!   outside the zone, truncation, and questions with capitals, whose case
//!   it echoes in the answers' owner names (0x20 resolvers check it).
//!
//! Why: with hickory-server's own `Server` loop and request handler, a query
//! cost about 10 µs of CPU on the benchmark machine (`bench/dns.sh`), half
//! of it in user space spread over a task spawned per datagram, the
//! response channel, decoding into owned names, the zone lookup with
//! hickory's name hashing, and encoding every record again (twice for SRV
//! answers, to see which additional records fit). With the fast path and the
//! server's own loops it costs 6 µs, as much as Knot DNS, five sixths of it
//! in the kernel's `recvfrom` and `sendto`.

use std::sync::Arc;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use hickory_server::net::xfer::Protocol;

use crate::Zone;

mod fast;
mod generic;
#[cfg(test)]
mod tests;

use fast::FastAnswers;

/// The transport a query came over: it bounds the response size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    /// UDP: responses fit 512 octets, or the EDNS payload size (at most
    /// 1232); bigger answers are truncated (TC set) or lose additional
    /// records.
    Udp,
    /// TCP (without the two-octet length prefix): responses up to 65535
    /// octets.
    Tcp,
}

impl Transport {
    fn protocol(self) -> Protocol {
        match self {
            Transport::Udp => Protocol::Udp,
            Transport::Tcp => Protocol::Tcp,
        }
    }
}

/// What was answered, for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Outcome {
    /// The question's type, if there was exactly one question.
    pub(crate) qtype: Option<RecordType>,
    /// The response code sent.
    pub(crate) rcode: ResponseCode,
}

/// A zone snapshot ready to answer wire-format queries: the [`Zone`] and
/// every answer it can give, encoded in advance.
///
/// Building one encodes an answer for each name and type of the zone
/// (about 0.1 s for 10,000 services in a release build);
/// [`ZoneHandle::publish`](crate::ZoneHandle::publish) does it once per
/// snapshot.
pub struct Responder {
    zone: Arc<Zone>,
    fast: FastAnswers,
}

impl Responder {
    /// Precomputes the answers of `zone`.
    pub fn new(zone: impl Into<Arc<Zone>>) -> Self {
        let zone = zone.into();
        let fast = FastAnswers::build(&zone);
        Self { zone, fast }
    }

    /// The zone answered from.
    pub fn zone(&self) -> &Arc<Zone> {
        &self.zone
    }

    /// The response to the DNS message `query` received over `transport`,
    /// or `None` when it gets no response at all (shorter than a header, or
    /// a response rather than a query). A message that cannot be decoded
    /// gets FORMERR.
    pub fn respond(&self, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        self.respond_into(query, transport, &mut out)?;
        Some(out)
    }

    /// [`Responder::respond`] without the fast path: every query decoded and
    /// answered by hickory-server. The bytes are the same; this exists to
    /// check exactly that (tests, fuzzing) and to measure the difference.
    pub fn respond_generic(&self, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        generic::respond(&self.zone, query, transport, &mut out)?;
        Some(out)
    }

    /// Writes the response to `query` into `out` (cleared first) and tells
    /// what was answered; `None`, with `out` empty, when nothing is to be
    /// sent.
    pub(crate) fn respond_into(
        &self,
        query: &[u8],
        transport: Transport,
        out: &mut Vec<u8>,
    ) -> Option<Outcome> {
        out.clear();
        if let Some(outcome) = self.fast.answer(query, transport, out) {
            return Some(outcome);
        }
        generic::respond(&self.zone, query, transport, out)
    }
}

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Responder")
            .field("zone", &self.zone)
            .finish_non_exhaustive()
    }
}
