//! Metric families shared by the sidecar and the gateway, and the text
//! encoder behind `/metrics`. Every name starts with `strait_`; label values
//! come from bounded sets.

use std::sync::{Arc, Mutex};

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
    /// The request's authority, bounded (see [`HttpMetrics::route`]).
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
    pub grpc_status: &'static str,
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

/// At most this many authorities per direction get their own label value;
/// the rest are `other`, so a client cannot blow up the metric
/// cardinality, and inbound clients naming many hosts cannot push the
/// application's own outbound authorities into `other`.
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
    /// Series handles by direction, then authority label, then tls.
    routes: Arc<Mutex<crate::FastMap<&'static str, Routes>>>,
}

/// One direction's series handles by authority label, then tls.
type Routes = crate::FastMap<String, Vec<Arc<RouteMetrics>>>;

/// The series of one direction, authority and tls, taken from the
/// families once: a request then counts without hashing its labels (the
/// families' maps use SipHash over every label value).
#[derive(Debug)]
pub struct RouteMetrics {
    labels: RequestLabels,
    requests: Counter,
    responses: Family<ResponseLabels, Counter>,
    latency: Family<LatencyLabels, Histogram>,
    /// Responses and latencies by (status class, grpc status) and status
    /// class, as they are first seen (a handful each).
    seen: Mutex<Seen>,
}

#[derive(Debug, Default)]
struct Seen {
    responses: Vec<(&'static str, &'static str, Counter)>,
    latency: Vec<(&'static str, Histogram)>,
}

impl RouteMetrics {
    /// The labels of these series.
    pub fn labels(&self) -> &RequestLabels {
        &self.labels
    }

    /// Counts a request.
    pub fn request(&self) {
        self.requests.inc();
    }

    /// Counts a finished response.
    pub fn response(&self, status_class: &'static str, grpc_status: &'static str) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, _, c)) = seen
            .responses
            .iter()
            .find(|(s, g, _)| same(s, status_class) && same(g, grpc_status))
        {
            c.inc();
            return;
        }
        let c = self
            .responses
            .get_or_create(&ResponseLabels {
                direction: self.labels.direction,
                authority: self.labels.authority.clone(),
                tls: self.labels.tls,
                status_class,
                grpc_status,
            })
            .clone();
        c.inc();
        seen.responses.push((status_class, grpc_status, c));
    }

    /// Records the time to a response's headers.
    pub fn latency(&self, status_class: &'static str, seconds: f64) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, h)) = seen.latency.iter().find(|(s, _)| same(s, status_class)) {
            h.observe(seconds);
            return;
        }
        let h = self
            .latency
            .get_or_create(&LatencyLabels {
                direction: self.labels.direction,
                status_class,
            })
            .clone();
        h.observe(seconds);
        seen.latency.push((status_class, h));
    }
}

type Histogram = prometheus_client::metrics::histogram::Histogram;

/// Whether two label values are equal: at once when they are the same
/// constant, as they nearly always are.
fn same(a: &str, b: &str) -> bool {
    std::ptr::eq(a, b) || a == b
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
            routes: Arc::default(),
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

    /// The series of requests in `direction` to `authority` over `tls`.
    /// The authority label is the authority itself for the first
    /// [`MAX_AUTHORITIES`] seen in that direction, `other` after.
    pub fn route(
        &self,
        direction: &'static str,
        authority: &str,
        tls: &'static str,
    ) -> Arc<RouteMetrics> {
        let mut all = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        let routes = all.entry(direction).or_default();
        // The common case, a series already made: one lookup.
        let known = routes.get(authority);
        if let Some(r) = known.and_then(|v| v.iter().find(|r| same(r.labels.tls, tls))) {
            return r.clone();
        }
        let label = if known.is_some() || routes.len() < MAX_AUTHORITIES {
            authority
        } else {
            // Past the bound: the `other` series, made once.
            if let Some(r) = routes
                .get("other")
                .and_then(|v| v.iter().find(|r| same(r.labels.tls, tls)))
            {
                return r.clone();
            }
            "other"
        };
        let labels = RequestLabels {
            direction,
            authority: label.to_string(),
            tls,
        };
        let route = Arc::new(RouteMetrics {
            requests: self.requests.get_or_create(&labels).clone(),
            labels,
            responses: self.responses.clone(),
            latency: self.latency.clone(),
            seen: Mutex::default(),
        });
        routes
            .entry(label.to_string())
            .or_default()
            .push(route.clone());
        route
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_series_are_shared_and_authorities_bounded() {
        let mut registry = Registry::default();
        let http = HttpMetrics::register(&mut registry);
        let a = http.route("outbound", "web:80", "true");
        assert!(Arc::ptr_eq(&a, &http.route("outbound", "web:80", "true")));
        let plain = http.route("outbound", "web:80", "false");
        assert!(!Arc::ptr_eq(&a, &plain));
        a.request();
        a.request();
        a.response("2xx", "");
        a.response("2xx", "");
        a.response("2xx", "7");
        a.latency("2xx", 0.001);
        for n in 0..MAX_AUTHORITIES {
            http.route("inbound", &format!("a{n}:80"), "false");
        }
        // Past the bound, and only for a new authority: `other`.
        let late = http.route("inbound", "late:80", "false");
        assert_eq!(late.labels().authority, "other");
        assert!(
            Arc::ptr_eq(&late, &http.route("inbound", "later:80", "false")),
            "one `other` series"
        );
        assert_eq!(
            http.route("inbound", "a1:80", "true").labels().authority,
            "a1:80"
        );
        // Each direction has its own bound.
        assert_eq!(
            http.route("outbound", "late:80", "false")
                .labels()
                .authority,
            "late:80"
        );
        late.request();
        let text = encode(&registry);
        for series in [
            r#"strait_proxy_requests_total{direction="outbound",authority="web:80",tls="true"} 2"#,
            r#"strait_proxy_requests_total{direction="inbound",authority="other",tls="false"} 1"#,
            r#"strait_proxy_responses_total{direction="outbound",authority="web:80",tls="true",status_class="2xx",grpc_status=""} 2"#,
            r#"strait_proxy_responses_total{direction="outbound",authority="web:80",tls="true",status_class="2xx",grpc_status="7"} 1"#,
            r#"strait_proxy_response_latency_seconds_count{direction="outbound",status_class="2xx"} 1"#,
        ] {
            assert!(text.contains(series), "{series} in\n{text}");
        }
    }
}
