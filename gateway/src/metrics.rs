//! The gateway's metric families (names per DESIGN.md: `strait_` prefix,
//! units in the name, counters ending `_total`, bounded label values: peer
//! names come from configured links, never from the network).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use strait_proxy::metrics::TlsMetrics;

/// A peer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    /// The link name.
    pub peer: String,
}

/// A peer and a direction (`inbound`: the peer opened it; `outbound`: we
/// did).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    /// The link name.
    pub peer: String,
    /// `inbound` or `outbound`.
    pub direction: &'static str,
}

/// A finished stream.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamResultLabels {
    /// The link name.
    pub peer: String,
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// `ok`, `error`, or a refusal reason (`not_exported`, `bad_header`...).
    pub result: &'static str,
}

/// Tunnel bytes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    /// The link name.
    pub peer: String,
    /// `sent` (into the tunnel) or `received` (out of it).
    pub direction: &'static str,
}

/// An outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok` or `error`.
    pub result: &'static str,
}

/// A peer and an outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerResultLabels {
    /// The link name.
    pub peer: String,
    /// `ok` or a failure kind.
    pub result: &'static str,
}

/// A connection to a local endpoint.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointConnectLabels {
    /// `true` (mutual TLS to the endpoint's proxy) or `false`.
    pub tls: &'static str,
    /// `ok`, `error` or `timeout`.
    pub result: &'static str,
}

/// A direction: `outbound` (local clients through the egress listeners)
/// or `inbound` (streams from peers to endpoints).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `inbound` or `outbound` (or, for connection limits, `destination`
    /// or `identity`).
    pub direction: &'static str,
}

/// Every gateway metric family.
#[derive(Clone, Debug)]
pub struct GatewayMetrics {
    /// 1 while the tunnel to the peer is up.
    pub peer_up: Family<PeerLabels, Gauge>,
    /// Tunnel round-trip time.
    pub peer_rtt: Family<PeerLabels, Histogram>,
    /// Tunnel connection attempts by outcome.
    pub peer_connects: Family<PeerResultLabels, Counter>,
    /// Streams open now.
    pub streams_open: Family<StreamLabels, Gauge>,
    /// Streams finished, by result.
    pub streams: Family<StreamResultLabels, Counter>,
    /// Bytes through the tunnel.
    pub tunnel_bytes: Family<BytesLabels, Counter>,
    /// Imports per exporting peer.
    pub imports: Family<PeerLabels, Gauge>,
    /// Exports of this cluster.
    pub exports: Gauge,
    /// Exports received from a peer and refused as invalid.
    pub invalid_exports: Family<PeerLabels, Counter>,
    /// Cluster source reloads by outcome.
    pub source_reloads: Family<ResultLabels, Counter>,
    /// Egress listeners open now.
    pub egress_listeners: Gauge,
    /// Egress listeners that could not be bound.
    pub egress_bind_errors: Counter,
    /// Expiry of the gateway's current leaf certificate.
    pub cert_expiry: Gauge,
    /// Certificate requests from sidecars, by result (see
    /// [`crate::identity`]).
    pub identity_requests: Family<ResultLabels, Counter>,
    /// Tokens file reloads by outcome (see
    /// [`crate::identity::spawn_tokens_reload`]).
    pub tokens_reloads: Family<ResultLabels, Counter>,
    /// Sidecar injector reviews, by result (see [`crate::k8s::webhook`]).
    pub injector_requests: Family<ResultLabels, Counter>,
    /// Connections to local endpoints for inbound streams, by mTLS (to a
    /// meshed endpoint's proxy) and result.
    pub endpoint_connects: Family<EndpointConnectLabels, Counter>,
    /// Times `maxConnections` was reached, by direction.
    pub connection_limit_reached: Family<DirectionLabels, Counter>,
    /// TLS refusals.
    pub tls: TlsMetrics,
    /// Kubernetes mirror metrics (registered in every mode; zero outside
    /// Kubernetes).
    pub mirror: MirrorMetrics,
}

/// A mirror failure's kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `apply`, `delete`, `status`, `conflict`, `exhausted`, `watch`, `skipped`.
    pub kind: &'static str,
}

/// The Kubernetes mirror writer's metrics.
#[derive(Clone, Debug)]
pub struct MirrorMetrics {
    /// How long one sync of the mirror took.
    pub sync_duration: Histogram,
    /// Failures, by kind.
    pub errors: Family<KindLabels, Counter>,
    /// Objects applied or deleted.
    pub writes: Family<KindLabels, Counter>,
    /// Whether this replica holds the writer Lease.
    pub leader: Gauge,
}

impl MirrorMetrics {
    fn register(r: &mut Registry) -> Self {
        let m = Self {
            sync_duration: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            errors: Family::default(),
            writes: Family::default(),
            leader: Gauge::default(),
        };
        r.register(
            "strait_mirror_sync_duration_seconds",
            "Time to bring the Kubernetes mirror in line with the imports",
            m.sync_duration.clone(),
        );
        r.register(
            "strait_mirror_sync_errors",
            "Kubernetes mirror failures, by kind",
            m.errors.clone(),
        );
        r.register(
            "strait_mirror_writes",
            "Kubernetes objects applied or deleted by the mirror, by kind",
            m.writes.clone(),
        );
        r.register(
            "strait_mirror_leader",
            "Whether this replica holds the mirror writer Lease",
            m.leader.clone(),
        );
        m
    }

    /// Counts one failure.
    pub fn error(&self, kind: &'static str) {
        self.errors.get_or_create(&KindLabels { kind }).inc();
    }

    /// Counts one write.
    pub fn write(&self, kind: &'static str) {
        self.writes.get_or_create(&KindLabels { kind }).inc();
    }
}

impl GatewayMetrics {
    /// Registers every family in `r`.
    pub fn register(r: &mut Registry) -> Self {
        let m = Self {
            peer_up: Family::default(),
            peer_rtt: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0001, 2.0, 16))
            }),
            peer_connects: Family::default(),
            streams_open: Family::default(),
            streams: Family::default(),
            tunnel_bytes: Family::default(),
            imports: Family::default(),
            exports: Gauge::default(),
            invalid_exports: Family::default(),
            source_reloads: Family::default(),
            egress_listeners: Gauge::default(),
            egress_bind_errors: Counter::default(),
            cert_expiry: Gauge::default(),
            identity_requests: Family::default(),
            tokens_reloads: Family::default(),
            endpoint_connects: Family::default(),
            injector_requests: Family::default(),
            connection_limit_reached: Family::default(),
            tls: TlsMetrics::register(r),
            mirror: MirrorMetrics::register(r),
        };
        r.register(
            "strait_peer_up",
            "Whether the tunnel to a linked peer is up",
            m.peer_up.clone(),
        );
        r.register(
            "strait_peer_rtt_seconds",
            "Tunnel round-trip time to a linked peer",
            m.peer_rtt.clone(),
        );
        r.register(
            "strait_peer_connects",
            "Tunnel connection attempts to linked peers, by result",
            m.peer_connects.clone(),
        );
        r.register(
            "strait_tunnel_streams_open",
            "Tunnel streams open now",
            m.streams_open.clone(),
        );
        r.register(
            "strait_tunnel_streams",
            "Tunnel streams finished, by peer, direction and result",
            m.streams.clone(),
        );
        r.register(
            "strait_tunnel_bytes",
            "Bytes carried through the tunnel",
            m.tunnel_bytes.clone(),
        );
        r.register(
            "strait_imports",
            "Services imported from each peer",
            m.imports.clone(),
        );
        r.register(
            "strait_exports",
            "Services this cluster exports",
            m.exports.clone(),
        );
        r.register(
            "strait_invalid_exports",
            "Exports received from a peer and refused as invalid",
            m.invalid_exports.clone(),
        );
        r.register(
            "strait_source_reloads",
            "Cluster source reloads, by result",
            m.source_reloads.clone(),
        );
        r.register(
            "strait_egress_listeners",
            "Egress listeners (import VIP:port) open now",
            m.egress_listeners.clone(),
        );
        r.register(
            "strait_egress_bind_errors",
            "Egress listeners that could not be bound",
            m.egress_bind_errors.clone(),
        );
        r.register(
            "strait_identity_certify_requests",
            "Certificate requests from sidecar proxies, by result (ok, unauthenticated, forbidden, invalid, unavailable, error)",
            m.identity_requests.clone(),
        );
        r.register(
            "strait_identity_tokens_reloads",
            "Tokens file reloads (outside Kubernetes), by result",
            m.tokens_reloads.clone(),
        );
        r.register(
            "strait_injector_requests",
            "Pods reviewed by the sidecar injector webhook, by result (injected, updated, skipped, refused: admitted unchanged with a warning, invalid: not a review)",
            m.injector_requests.clone(),
        );
        r.register(
            "strait_endpoint_connects",
            "Connections to this cluster's endpoints for streams from peers, by tls (true: mutual TLS to a meshed endpoint's proxy) and result",
            m.endpoint_connects.clone(),
        );
        r.register(
            "strait_connection_limit_reached",
            "Times maxConnections was reached: outbound, an egress listener stopped accepting (new connections wait in its listen backlog; counted once per listener each time); inbound, a peer's stream to an endpoint was refused (reset, also counted in strait_tunnel_streams_total as busy); destination, identity: that control-plane listener served its most connections (16384) and stopped accepting",
            m.connection_limit_reached.clone(),
        );
        r.register(
            "strait_identity_cert_expiry_timestamp_seconds",
            "Expiry of the gateway's current leaf certificate (Unix time)",
            m.cert_expiry.clone(),
        );
        m
    }

    /// Counts `maxConnections` reached in `direction`.
    pub fn limit_reached(&self, direction: &'static str) {
        self.connection_limit_reached
            .get_or_create(&DirectionLabels { direction })
            .inc();
    }

    /// Records a finished stream.
    pub fn stream_done(&self, peer: &str, direction: &'static str, result: &'static str) {
        self.streams
            .get_or_create(&StreamResultLabels {
                peer: peer.to_string(),
                direction,
                result,
            })
            .inc();
    }

    /// Counts one connection attempt to a local endpoint.
    pub fn endpoint_connect(&self, tls: &'static str, result: &'static str) {
        self.endpoint_connects
            .get_or_create(&EndpointConnectLabels { tls, result })
            .inc();
    }

    /// Records bytes moved for a peer.
    pub fn bytes(&self, peer: &str, sent: u64, received: u64) {
        for (direction, n) in [("sent", sent), ("received", received)] {
            self.tunnel_bytes
                .get_or_create(&BytesLabels {
                    peer: peer.to_string(),
                    direction,
                })
                .inc_by(n);
        }
    }
}
