//! The hickory-server [`RequestHandler`] answering from the current zone
//! snapshot.

use std::slice;
use std::time::Instant;

use hickory_proto::op::{Edns, Header, HeaderCounts, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, Record, RecordType};
use hickory_proto::serialize::binary::BinEncoder;
use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol;
use hickory_server::net::NetError;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tracing::{trace, warn};

use crate::{DnsMetrics, Lookup, ZoneHandle};

/// Largest UDP payload advertised in our OPT record (the DNS flag day 2020
/// value); the response is truncated to `min(client's payload, this)`.
pub(crate) const MAX_UDP_PAYLOAD: u16 = 1232;

/// EDNS version this server implements.
const EDNS_VERSION: u8 = 0;

/// UDP payload limit of a query without EDNS (RFC 1035).
const CLASSIC_UDP_PAYLOAD: u16 = 512;

/// Wire size of an OPT record without options.
const OPT_RECORD_LEN: u16 = 11;

/// Answers queries from a [`ZoneHandle`] and records [`DnsMetrics`].
pub(crate) struct ZoneRequestHandler {
    zone: ZoneHandle,
    metrics: DnsMetrics,
}

impl ZoneRequestHandler {
    pub(crate) fn new(zone: ZoneHandle, metrics: DnsMetrics) -> Self {
        Self { zone, metrics }
    }

    async fn respond<R: ResponseHandler>(&self, request: &Request, handle: R) -> ResponseInfo {
        let edns = request.edns.as_ref().map(response_edns);
        let edns = edns.as_ref();

        if request
            .edns
            .as_ref()
            .is_some_and(|e| e.version() > EDNS_VERSION)
        {
            return send_error(request, edns, ResponseCode::BADVERS, handle).await;
        }
        if request.metadata.op_code != OpCode::Query {
            return send_error(request, edns, ResponseCode::NotImp, handle).await;
        }
        let [query] = request.queries.queries() else {
            return send_error(request, edns, ResponseCode::FormErr, handle).await;
        };
        let qtype = query.query_type();
        if query.query_class() != DNSClass::IN
            || matches!(qtype, RecordType::AXFR | RecordType::IXFR)
        {
            return send_error(request, edns, ResponseCode::Refused, handle).await;
        }

        let zone = self.zone.current();
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
            Lookup::NotAuthoritative => {
                return send_error(request, edns, ResponseCode::Refused, handle).await;
            }
        };
        trace!(
            name = %query.name(),
            %qtype,
            %rcode,
            answers = answers.len(),
            serial = zone.serial(),
            "answering from zone"
        );

        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        metadata.response_code = rcode;
        let fit = additionals_that_fit(request, edns, metadata, answers, authorities, additionals);
        let additionals = additionals.get(..fit).unwrap_or(additionals);
        // The question section is copied from the request bytes, so it
        // echoes the query's case.
        let response = MessageResponseBuilder::new(&request.queries, edns).build(
            metadata,
            answers,
            authorities,
            &[],
            additionals,
        );
        let mut handle = handle;
        sent(request, handle.send_response(response).await)
    }
}

#[async_trait::async_trait]
impl RequestHandler for ZoneRequestHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        let start = Instant::now();
        let qtype = match request.queries.queries() {
            [query] => Some(query.query_type()),
            _ => None,
        };
        let info = self.respond(request, response_handle).await;
        self.metrics
            .record_query(qtype, info.response_code, start.elapsed());
        info
    }
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
    request: &Request,
    edns: Option<&Edns>,
    metadata: Metadata,
    answers: &[Record],
    authorities: &[Record],
    additionals: &[Record],
) -> usize {
    if additionals.is_empty() || request.protocol() != Protocol::Udp {
        return additionals.len();
    }
    let limit = match edns {
        Some(edns) => edns.max_payload().saturating_sub(OPT_RECORD_LEN),
        None => CLASSIC_UDP_PAYLOAD,
    };
    let mut buf = Vec::with_capacity(usize::from(limit));
    let mut encoder = BinEncoder::new(&mut buf);
    encoder.set_max_size(limit);
    let trial = MessageResponseBuilder::new(&request.queries, None).build(
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

async fn send_error<R: ResponseHandler>(
    request: &Request,
    edns: Option<&Edns>,
    rcode: ResponseCode,
    handle: R,
) -> ResponseInfo {
    trace!(%rcode, id = request.metadata.id, "answering with an error");
    let response =
        MessageResponseBuilder::new(&request.queries, edns).error_msg(&request.metadata, rcode);
    let mut handle = handle;
    sent(request, handle.send_response(response).await)
}

/// The outcome of sending the response to `request`; a failure to send is
/// logged and reported as SERVFAIL.
fn sent(request: &Request, result: Result<ResponseInfo, NetError>) -> ResponseInfo {
    match result {
        Ok(info) => info,
        Err(error) => {
            warn!(%error, id = request.metadata.id, "failed to send DNS response");
            let mut metadata = Metadata::response_from_request(&request.metadata);
            metadata.response_code = ResponseCode::ServFail;
            ResponseInfo::from(Header {
                metadata,
                counts: HeaderCounts::default(),
            })
        }
    }
}
