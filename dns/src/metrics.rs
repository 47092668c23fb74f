//! Prometheus metrics of the DNS server.
//!
//! | name | type | labels |
//! |------|------|--------|
//! | `strait_dns_queries_total` | counter | `type` (A, AAAA, SRV, TXT, SOA, NS, ANY, other), `rcode` (noerror, formerr, servfail, nxdomain, notimp, refused, badvers, other) |
//! | `strait_dns_query_duration_seconds` | histogram | none |
//! | `strait_dns_zone_records` | gauge | none |
//! | `strait_dns_zone_last_update_timestamp_seconds` | gauge | none |
//!
//! Every query answered is counted, a FORMERR for an undecodable message
//! included (with type `other`); messages dropped without an answer
//! (shorter than a header, or responses) are not. A query is counted as
//! its answer is handed to the socket (so that a client holding the answer
//! sees it counted), an answer the socket then fails to send included. The
//! duration runs from the query read off the socket to the answer ready to
//! send.

use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[cfg(test)]
mod tests;

/// Upper bounds of the query duration histogram, in seconds (10 µs to 100 ms).
const DURATION_BUCKETS: [f64; 13] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueryLabels {
    r#type: &'static str,
    rcode: &'static str,
}

/// Handles to the DNS metric families; cheap to clone (all clones update the
/// same registered metrics).
///
/// The zone gauges are updated by the [`ZoneHandle`](crate::ZoneHandle) the
/// metrics are attached to: either explicitly with
/// [`ZoneHandle::with_metrics`](crate::ZoneHandle::with_metrics) or
/// implicitly by [`DnsServer::bind`](crate::DnsServer::bind).
#[derive(Clone, Debug)]
pub struct DnsMetrics {
    queries: Family<QueryLabels, Counter>,
    duration: Histogram,
    zone_records: Gauge,
    zone_last_update: Gauge<f64, AtomicU64>,
    tcp_drops: Family<TcpDropLabels, Counter>,
}

/// Why a TCP connection was closed by the server before the client was
/// done with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum TcpDrop {
    /// Too many connections were open already.
    Limit,
    /// The client did not take an answer in time.
    SlowReader,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TcpDropLabels {
    reason: &'static str,
}

impl DnsMetrics {
    /// Creates the DNS metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            queries: Family::default(),
            duration: Histogram::new(DURATION_BUCKETS),
            zone_records: Gauge::default(),
            zone_last_update: Gauge::default(),
            tcp_drops: Family::default(),
        };
        // The counter's `_total` suffix is added by the encoder.
        registry.register(
            "strait_dns_queries",
            "DNS queries answered, by query type and response code",
            metrics.queries.clone(),
        );
        registry.register(
            "strait_dns_query_duration_seconds",
            "Time to answer a DNS query, in seconds",
            metrics.duration.clone(),
        );
        registry.register(
            "strait_dns_zone_records",
            "Resource records in the currently served zone",
            metrics.zone_records.clone(),
        );
        registry.register(
            "strait_dns_zone_last_update_timestamp_seconds",
            "Unix time at which the currently served zone was published",
            metrics.zone_last_update.clone(),
        );
        registry.register(
            "strait_dns_tcp_connections_dropped",
            "TCP connections the DNS server closed: limit (too many open) or slow_reader (answers not taken in time)",
            metrics.tcp_drops.clone(),
        );
        metrics
    }

    /// Counts a TCP connection closed by the server.
    pub(crate) fn record_tcp_drop(&self, why: TcpDrop) {
        let reason = match why {
            TcpDrop::Limit => "limit",
            TcpDrop::SlowReader => "slow_reader",
        };
        self.tcp_drops
            .get_or_create(&TcpDropLabels { reason })
            .inc();
    }

    /// Counts one answered query and observes its duration.
    pub(crate) fn record_query(
        &self,
        qtype: Option<RecordType>,
        rcode: ResponseCode,
        elapsed: Duration,
    ) {
        self.queries
            .get_or_create(&QueryLabels {
                r#type: type_label(qtype),
                rcode: rcode_label(rcode),
            })
            .inc();
        self.duration.observe(elapsed.as_secs_f64());
    }

    /// Records the size and publication time of the served zone.
    pub(crate) fn record_zone(&self, records: usize, published_at: SystemTime) {
        self.zone_records
            .set(i64::try_from(records).unwrap_or(i64::MAX));
        let secs = published_at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.zone_last_update.set(secs);
    }
}

/// Bounded `type` label value.
fn type_label(qtype: Option<RecordType>) -> &'static str {
    match qtype {
        Some(RecordType::A) => "A",
        Some(RecordType::AAAA) => "AAAA",
        Some(RecordType::SRV) => "SRV",
        Some(RecordType::TXT) => "TXT",
        Some(RecordType::SOA) => "SOA",
        Some(RecordType::NS) => "NS",
        Some(RecordType::ANY) => "ANY",
        _ => "other",
    }
}

/// Bounded, lowercase `rcode` label value.
fn rcode_label(rcode: ResponseCode) -> &'static str {
    match rcode {
        ResponseCode::NoError => "noerror",
        ResponseCode::FormErr => "formerr",
        ResponseCode::ServFail => "servfail",
        ResponseCode::NXDomain => "nxdomain",
        ResponseCode::NotImp => "notimp",
        ResponseCode::Refused => "refused",
        ResponseCode::BADVERS => "badvers",
        _ => "other",
    }
}
