//! Metric families shared by the sidecar and the gateway, and the text
//! encoder behind `/metrics`. Every name starts with `strait_`; label values
//! come from bounded sets.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::identity::{RefusalReason, RefusalSink};

/// Labels of a TLS peer refusal.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// `accept` (a peer dialed us) or `connect` (we dialed a peer).
    pub side: &'static str,
    /// [`RefusalReason::as_str`].
    pub reason: &'static str,
}

/// TLS metrics: refused peer certificates by side and reason.
#[derive(Clone, Debug, Default)]
pub struct TlsMetrics {
    refusals: Family<RefusalLabels, Counter>,
}

impl TlsMetrics {
    /// Registers the families in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "strait_tls_handshake_failures",
            "Peer certificates refused during TLS handshakes, by side and reason",
            m.refusals.clone(),
        );
        m
    }

    /// A sink that counts refusals on `side` (`accept` or `connect`).
    pub fn sink(&self, side: &'static str) -> RefusalSink {
        let refusals = self.refusals.clone();
        Arc::new(move |reason: RefusalReason| {
            refusals
                .get_or_create(&RefusalLabels {
                    side,
                    reason: reason.as_str(),
                })
                .inc();
        })
    }

    /// Refusals counted so far for one side and reason (for tests and
    /// status pages).
    pub fn refusals(&self, side: &'static str, reason: RefusalReason) -> u64 {
        self.refusals
            .get_or_create(&RefusalLabels {
                side,
                reason: reason.as_str(),
            })
            .get()
    }
}

/// Labels of a certification attempt.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertifyLabels {
    /// `ok`, or [`crate::identity::CertifyError::kind`].
    pub result: &'static str,
}

/// The proxy's own certificate: its expiry and how renewals went.
#[derive(Clone, Debug, Default)]
pub struct IdentityMetrics {
    expiry: Gauge,
    renewals: Family<CertifyLabels, Counter>,
}

impl IdentityMetrics {
    /// Registers the families in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "strait_identity_cert_expiry_timestamp_seconds",
            "Expiry of the proxy's current leaf certificate (Unix time)",
            m.expiry.clone(),
        );
        registry.register(
            "strait_identity_renewals",
            "Attempts to get a certificate, by result (ok, token, request, unreachable, refused, invalid)",
            m.renewals.clone(),
        );
        m
    }

    /// A new leaf expiring at `not_after` is in use.
    pub fn renewed(&self, not_after: std::time::SystemTime) {
        self.expiry.set(unix_seconds(not_after));
        self.renewals
            .get_or_create(&CertifyLabels { result: "ok" })
            .inc();
    }

    /// An attempt failed with this [`crate::identity::CertifyError::kind`].
    pub fn failed(&self, kind: &'static str) {
        self.renewals
            .get_or_create(&CertifyLabels { result: kind })
            .inc();
    }
}

/// Whole seconds since the Unix epoch (0 before it): timestamp gauges and
/// wire fields.
pub fn unix_seconds(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Encodes a registry in the OpenMetrics text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// Labels of a per-direction gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
}

/// Labels of a request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// The request's authority, bounded (see [`HttpMetrics::authority`]).
    pub authority: String,
    /// `true` when the connection to the peer proxy is (or was) mTLS.
    pub tls: &'static str,
}

/// Labels of a finished response.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResponseLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// The request's authority, bounded.
    pub authority: String,
    /// `true` when mTLS.
    pub tls: &'static str,
    /// `2xx`... or `error` when the body failed midway.
    pub status_class: &'static str,
    /// `grpc-status` of gRPC responses (0-16, `invalid`), empty otherwise.
    pub grpc_status: String,
}

/// Labels of the latency histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// `2xx`...
    pub status_class: &'static str,
}

/// Labels of proxy-level errors.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// A bounded reason: `http_parse`, `no_endpoints`, `connect`, `timeout`...
    pub reason: &'static str,
}

/// Labels of retries.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// `retried` or `budget_exhausted`.
    pub result: &'static str,
}

/// At most this many authorities get their own label value; the rest are
/// `other`, so a client cannot blow up the metric cardinality.
pub const MAX_AUTHORITIES: usize = 100;

/// Per-request metrics of the proxy.
#[derive(Clone, Debug)]
pub struct HttpMetrics {
    /// Requests received.
    pub requests: Family<RequestLabels, Counter>,
    /// Responses finished.
    pub responses: Family<ResponseLabels, Counter>,
    /// Time from request to response headers.
    pub latency: Family<LatencyLabels, prometheus_client::metrics::histogram::Histogram>,
    /// Errors the proxy answered itself or could not answer.
    pub errors: Family<ErrorLabels, Counter>,
    /// Retries made, or refused by the budget.
    pub retries: Family<RetryLabels, Counter>,
    /// Idle HTTP/1 connections parked (hyper's buffers freed), by
    /// direction.
    pub parked: Family<DirectionLabels, Gauge>,
    authorities: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

impl HttpMetrics {
    /// Registers the families in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            responses: Family::default(),
            latency: Family::new_with_constructor(|| {
                prometheus_client::metrics::histogram::Histogram::new(
                    prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 18),
                )
            }),
            errors: Family::default(),
            retries: Family::default(),
            parked: Family::default(),
            authorities: Arc::default(),
        };
        registry.register(
            "strait_proxy_requests",
            "HTTP requests received, by direction, authority and tls",
            m.requests.clone(),
        );
        registry.register(
            "strait_proxy_responses",
            "HTTP responses finished, by direction, authority, tls, status class and grpc status",
            m.responses.clone(),
        );
        registry.register(
            "strait_proxy_response_latency_seconds",
            "Time from a request to its response headers",
            m.latency.clone(),
        );
        registry.register(
            "strait_proxy_retries",
            "Retries of idempotent requests, by result (retried, budget_exhausted)",
            m.retries.clone(),
        );
        registry.register(
            "strait_proxy_parked_connections",
            "Idle HTTP/1 keep-alive connections waiting for a request without HTTP state, by direction",
            m.parked.clone(),
        );
        registry.register(
            "strait_proxy_errors",
            "Requests and connections the proxy failed or answered itself, by reason",
            m.errors.clone(),
        );
        m
    }

    /// The label value for `authority`: itself for the first
    /// [`MAX_AUTHORITIES`] seen, `other` after.
    pub fn authority(&self, authority: &str) -> String {
        let mut seen = self.authorities.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(authority) {
            return authority.to_string();
        }
        if seen.len() < MAX_AUTHORITIES {
            seen.insert(authority.to_string());
            return authority.to_string();
        }
        "other".to_string()
    }

    /// Counts an error.
    pub fn error(&self, direction: &'static str, reason: &'static str) {
        self.errors
            .get_or_create(&ErrorLabels { direction, reason })
            .inc();
    }
}

/// Labels of TCP connection metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// `true` when mTLS.
    pub tls: &'static str,
}

/// Labels of TCP bytes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpBytesLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// `true` when mTLS.
    pub tls: &'static str,
    /// `read` (from the accepted connection) or `write` (to it).
    pub flow: &'static str,
}

/// Labels of closed TCP connections.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpCloseLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// `true` when mTLS.
    pub tls: &'static str,
    /// `ok` or `error`.
    pub result: &'static str,
}

/// Connection-level metrics of the proxy.
#[derive(Clone, Debug)]
pub struct TcpMetrics {
    /// Connections accepted.
    pub opens: Family<TcpLabels, Counter>,
    /// Connections closed.
    pub closes: Family<TcpCloseLabels, Counter>,
    /// Bytes of opaque TCP forwarding.
    pub bytes: Family<TcpBytesLabels, Counter>,
    /// Connection lifetimes.
    pub duration: Family<TcpLabels, prometheus_client::metrics::histogram::Histogram>,
}

impl TcpMetrics {
    /// Registers the families in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            opens: Family::default(),
            closes: Family::default(),
            bytes: Family::default(),
            duration: Family::new_with_constructor(|| {
                prometheus_client::metrics::histogram::Histogram::new(
                    prometheus_client::metrics::histogram::exponential_buckets(0.001, 4.0, 12),
                )
            }),
        };
        registry.register(
            "strait_tcp_opens",
            "TCP connections accepted",
            m.opens.clone(),
        );
        registry.register(
            "strait_tcp_closes",
            "TCP connections closed",
            m.closes.clone(),
        );
        registry.register(
            "strait_tcp_bytes",
            "Bytes of opaque TCP forwarding",
            m.bytes.clone(),
        );
        registry.register(
            "strait_tcp_connection_duration_seconds",
            "TCP connection lifetimes",
            m.duration.clone(),
        );
        m
    }
}
