//! The gateway configuration file (YAML), validated when loaded: an invalid
//! value is refused at start, with the field named, never at first use.
//!
//! ```yaml
//! cluster: west
//! identity:
//!   trustAnchors: certs/root.pem
//!   issuerCert: certs/west-issuer.pem
//!   issuerKey: certs/west-issuer.key
//! listen:
//!   tunnel: 0.0.0.0:4143
//!   admin: 0.0.0.0:4191
//!   dns: 0.0.0.0:5353
//!   destination: 0.0.0.0:8086
//!   identity: 0.0.0.0:8080
//! source:
//!   file: west-cluster.yaml
//! links:
//!   - name: east
//!     addresses: ["east-gateway.example.com:4143"]
//! maxConnections: 20000
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use strait_proxy::identity::SpiffeId;

use crate::catalog::validate_label;

/// The namespace and service account gateways run as; part of their
/// SPIFFE ID.
pub const GATEWAY_NAMESPACE: &str = "strait-system";
/// See [`GATEWAY_NAMESPACE`].
pub const GATEWAY_SERVICE_ACCOUNT: &str = "strait-gateway";

/// A whole gateway configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GatewayConfig {
    /// This cluster's name (an RFC 1123 label).
    pub cluster: String,
    /// The SPIFFE trust domain of this cluster; default `<cluster>.strait.local`.
    #[serde(default)]
    pub trust_domain: Option<String>,
    /// Certificate files.
    pub identity: IdentityConfig,
    /// Listen addresses.
    #[serde(default)]
    pub listen: ListenConfig,
    /// Where the cluster's services come from.
    pub source: SourceConfig,
    /// Import settings.
    #[serde(default)]
    pub imports: ImportsConfig,
    /// Linked peers.
    #[serde(default)]
    pub links: Vec<LinkConfig>,
    /// Tunnel transport tuning.
    #[serde(default)]
    pub tunnel: TunnelTuning,
    /// How the gateway reaches meshed endpoints.
    #[serde(default)]
    pub mesh: MeshConfig,
    /// The sidecar injector webhook (off unless set).
    #[serde(default)]
    pub injector: Option<InjectorConfig>,
    /// Connections served at once in each direction (default 20,000).
    /// Outbound, the egress listeners share it: past it they stop
    /// accepting until a connection ends, and new ones wait in the listen
    /// backlog. Inbound, streams from peers to endpoints share it: past it
    /// a new one is refused (reset, `busy`). Catalog watches do not count.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
}

fn default_max_connections() -> u32 {
    20_000
}

/// The sidecar injector: a mutating admission webhook the API server calls
/// for every Pod created in an opted-in namespace
/// ([`crate::k8s::webhook`]).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct InjectorConfig {
    /// HTTPS listener (default `0.0.0.0:8443`).
    #[serde(default = "default_injector_listen")]
    pub listen: SocketAddr,
    /// Its certificate chain (PEM), for the name the webhook configuration
    /// calls it by.
    pub cert_file: PathBuf,
    /// Its private key (PEM).
    pub key_file: PathBuf,
    /// The `strait-proxy` image injected.
    #[serde(default = "default_proxy_image")]
    pub image: String,
    /// Pods have IPv6 addresses as well (a dual-stack cluster): sidecars
    /// redirect and serve IPv6 too (default `false`: many nodes have no
    /// IPv6 `nat` table, and `ip6tables` would fail the pod's start).
    #[serde(default)]
    pub ipv6: bool,
}

fn default_injector_listen() -> SocketAddr {
    ([0, 0, 0, 0], 8443).into()
}

/// The `strait-proxy` image of this release (what `strait inject` and the
/// injector webhook add unless told otherwise).
pub const PROXY_IMAGE: &str = concat!("ghcr.io/strait/strait-proxy:", env!("CARGO_PKG_VERSION"));

fn default_proxy_image() -> String {
    PROXY_IMAGE.to_string()
}

/// How the gateway reaches endpoints with a sidecar proxy (those with an
/// identity in the cluster source): mutual TLS to the proxy's inbound port,
/// the gateway presenting its own identity, the endpoint's port named in
/// the transport header.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshConfig {
    /// The sidecars' inbound port (default 4143, `strait-proxy`'s).
    #[serde(default = "default_proxy_inbound_port")]
    pub proxy_inbound_port: u16,
}

fn default_proxy_inbound_port() -> u16 {
    4143
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            proxy_inbound_port: default_proxy_inbound_port(),
        }
    }
}

/// Certificate files.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IdentityConfig {
    /// PEM bundle of trust anchors (root CAs).
    pub trust_anchors: PathBuf,
    /// The cluster issuer's PEM certificate.
    pub issuer_cert: PathBuf,
    /// The cluster issuer's PKCS#8 PEM key.
    pub issuer_key: PathBuf,
    /// Leaf certificate lifetime in seconds (default 86400), for the
    /// gateway's own leaf and those it issues to sidecars.
    #[serde(default = "default_leaf_lifetime")]
    pub leaf_lifetime_seconds: u64,
    /// Outside Kubernetes: a YAML list of bearer tokens, each for one
    /// service account (`- {token, namespace, serviceAccount}`); enables
    /// the identity service there (see [`crate::identity`]). In
    /// Kubernetes, tokens are checked with TokenReview instead.
    #[serde(default)]
    pub tokens_file: Option<PathBuf>,
    /// The audience sidecars' tokens must be issued for (in Kubernetes,
    /// the projected token's `audience`); default `identity.strait.io`.
    #[serde(default = "default_token_audience")]
    pub token_audience: String,
}

fn default_token_audience() -> String {
    crate::identity::TOKEN_AUDIENCE.into()
}

fn default_leaf_lifetime() -> u64 {
    86_400
}

/// Listen addresses.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ListenConfig {
    /// QUIC tunnel (UDP); default `0.0.0.0:4143`.
    #[serde(default = "default_tunnel")]
    pub tunnel: SocketAddr,
    /// Admin HTTP; default `0.0.0.0:4191`.
    #[serde(default = "default_admin")]
    pub admin: SocketAddr,
    /// DNS (UDP and TCP); default `0.0.0.0:5353`.
    #[serde(default = "default_dns")]
    pub dns: SocketAddr,
    /// Destination discovery for sidecar proxies (plain gRPC over TCP,
    /// see [`crate::destination`]); default `0.0.0.0:8086`.
    #[serde(default = "default_destination")]
    pub destination: SocketAddr,
    /// Serve destination discovery over mTLS only (proxies present their
    /// workload certificate and pin the gateway's identity); default
    /// false (plaintext inside the cluster).
    #[serde(default)]
    pub destination_mtls: bool,
    /// The identity service for sidecar proxies (gRPC over server-auth
    /// TLS, see [`crate::identity`]); default `0.0.0.0:8080`. Served in
    /// Kubernetes, and outside it when `identity.tokensFile` is set.
    #[serde(default = "default_identity")]
    pub identity: SocketAddr,
}

fn default_tunnel() -> SocketAddr {
    ([0, 0, 0, 0], 4143).into()
}
fn default_admin() -> SocketAddr {
    ([0, 0, 0, 0], 4191).into()
}
fn default_dns() -> SocketAddr {
    ([0, 0, 0, 0], 5353).into()
}
fn default_destination() -> SocketAddr {
    ([0, 0, 0, 0], 8086).into()
}
fn default_identity() -> SocketAddr {
    ([0, 0, 0, 0], 8080).into()
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            tunnel: default_tunnel(),
            admin: default_admin(),
            dns: default_dns(),
            destination: default_destination(),
            destination_mtls: false,
            identity: default_identity(),
        }
    }
}

/// Where the cluster's services come from: exactly one of `file` and
/// `kubernetes`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SourceConfig {
    /// A cluster YAML file (see [`crate::source::file`]).
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// How often to check the file for changes, ms (default 500).
    #[serde(default = "default_poll")]
    pub poll_interval_ms: u64,
    /// The Kubernetes API (in-cluster credentials, or the kubeconfig).
    #[serde(default)]
    pub kubernetes: Option<KubernetesConfig>,
}

/// Running in Kubernetes: what to watch and how to mirror imports.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KubernetesConfig {
    /// The gateway's namespace: Links, the Lease, gateway pods (default
    /// `$POD_NAMESPACE`, else `strait-system`).
    #[serde(default)]
    pub namespace: Option<String>,
    /// A Service labelled `<exportLabel>=true` is exported (as is any
    /// Service with a ServiceExport); default `strait.io/export`.
    #[serde(default = "default_export_label")]
    pub export_label: String,
    /// Label selector of the gateway pods, whose addresses back the mirror
    /// Services (default `app.kubernetes.io/name=strait-gateway`).
    #[serde(default = "default_gateway_selector")]
    pub gateway_selector: String,
    /// First egress port allocated per (import, port) (default 20000).
    #[serde(default = "default_egress_min")]
    pub egress_port_min: u16,
    /// Last egress port (default 20999).
    #[serde(default = "default_egress_max")]
    pub egress_port_max: u16,
    /// The address egress ports listen on (default `0.0.0.0`).
    #[serde(default = "default_egress_address")]
    pub egress_address: std::net::IpAddr,
    /// The Lease electing the replica that writes (default
    /// `strait-mirror-writer`).
    #[serde(default = "default_lease_name")]
    pub lease_name: String,
    /// How long the Lease lasts unrenewed, seconds (default 15).
    #[serde(default = "default_lease_duration")]
    pub lease_duration_seconds: u64,
    /// How often the Lease is renewed or checked, seconds (default 5).
    #[serde(default = "default_lease_renew")]
    pub lease_renew_seconds: u64,
    /// This replica's name in the Lease (default `$POD_NAME`, else the
    /// host name).
    #[serde(default)]
    pub replica: Option<String>,
}

fn default_export_label() -> String {
    "strait.io/export".into()
}
fn default_gateway_selector() -> String {
    "app.kubernetes.io/name=strait-gateway".into()
}
fn default_egress_min() -> u16 {
    20_000
}
fn default_egress_max() -> u16 {
    20_999
}
fn default_egress_address() -> std::net::IpAddr {
    std::net::Ipv4Addr::UNSPECIFIED.into()
}
fn default_lease_name() -> String {
    "strait-mirror-writer".into()
}
fn default_lease_duration() -> u64 {
    15
}
fn default_lease_renew() -> u64 {
    5
}

impl KubernetesConfig {
    /// The gateway's namespace.
    pub fn namespace(&self) -> String {
        self.namespace
            .clone()
            .or_else(|| {
                std::env::var("POD_NAMESPACE")
                    .ok()
                    .filter(|s| !s.is_empty())
            })
            .unwrap_or_else(|| GATEWAY_NAMESPACE.to_string())
    }

    /// This replica's name.
    pub fn replica(&self) -> String {
        self.replica
            .clone()
            .or_else(|| std::env::var("POD_NAME").ok().filter(|s| !s.is_empty()))
            .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
            .unwrap_or_else(|| format!("strait-{}", std::process::id()))
    }

    fn validate(
        &self,
        listen: &ListenConfig,
        injector: Option<&InjectorConfig>,
    ) -> Result<(), ConfigError> {
        let field = |f: &str| format!("source.kubernetes.{f}");
        if let Some(ns) = &self.namespace {
            validate_label("namespace", ns)
                .map_err(|e| invalid(field("namespace"), e.to_string()))?;
        }
        if self.export_label.is_empty() || self.export_label.len() > 316 {
            return Err(invalid(field("exportLabel"), "must be a label key"));
        }
        if self.gateway_selector.trim().is_empty() {
            return Err(invalid(
                field("gatewaySelector"),
                "must select the gateway pods",
            ));
        }
        if self.egress_port_min == 0 || self.egress_port_min > self.egress_port_max {
            return Err(invalid(
                field("egressPortMin"),
                "must be positive and at most egressPortMax",
            ));
        }
        let range = self.egress_port_min..=self.egress_port_max;
        for (name, addr) in [
            ("tunnel", listen.tunnel),
            ("admin", listen.admin),
            ("dns", listen.dns),
            ("destination", listen.destination),
            ("identity", listen.identity),
        ]
        .into_iter()
        .map(|(name, addr)| (format!("listen.{name}"), addr))
        .chain(injector.map(|i| ("injector.listen".to_string(), i.listen)))
        {
            if range.contains(&addr.port()) {
                return Err(invalid(
                    field("egressPortMin"),
                    format!("the egress range overlaps {name} ({})", addr.port()),
                ));
            }
        }
        validate_label("leaseName", &self.lease_name)
            .map_err(|e| invalid(field("leaseName"), e.to_string()))?;
        if self.lease_renew_seconds == 0
            || self.lease_renew_seconds * 2 > self.lease_duration_seconds
        {
            return Err(invalid(
                field("leaseRenewSeconds"),
                "must be positive and at most half of leaseDurationSeconds",
            ));
        }
        Ok(())
    }
}

fn default_poll() -> u64 {
    500
}

/// Import settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ImportsConfig {
    /// Keep a lost peer's imports this long before removing them (default 60).
    #[serde(default = "default_grace")]
    pub grace_period_seconds: u64,
    /// Where to persist virtual IP assignments (optional).
    #[serde(default)]
    pub state_file: Option<PathBuf>,
    /// DNS record TTL in seconds (default 5).
    #[serde(default = "default_ttl")]
    pub dns_ttl_seconds: u32,
    /// Where virtual IPs come from (default `127.77.0.0/16`; a /8 to /24).
    #[serde(default = "crate::imports::default_range")]
    pub vip_range: ipnet::Ipv4Net,
}

fn default_grace() -> u64 {
    60
}
fn default_ttl() -> u32 {
    5
}

impl Default for ImportsConfig {
    fn default() -> Self {
        Self {
            grace_period_seconds: default_grace(),
            state_file: None,
            dns_ttl_seconds: default_ttl(),
            vip_range: crate::imports::default_range(),
        }
    }
}

/// How a link's tunnel travels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// QUIC over UDP.
    #[default]
    Quic,
    /// TLS over TCP, one connection per stream (where UDP is blocked).
    Tcp,
    /// QUIC, falling back to TLS over TCP when QUIC does not connect
    /// within 3 s (tried again on every reconnect).
    Auto,
}

/// A linked peer.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LinkConfig {
    /// The peer's cluster name.
    pub name: String,
    /// `host:port` of the peer's gateways, dialed to import its exports;
    /// hostnames are resolved again on every reconnect. Empty: the link
    /// only lets the peer in (it imports from us).
    #[serde(default)]
    pub addresses: Vec<String>,
    /// The SPIFFE ID the peer's gateway must present; default
    /// `spiffe://<name>.strait.local/ns/strait-system/sa/strait-gateway`.
    #[serde(default)]
    pub identity: Option<String>,
    /// `quic` (default).
    #[serde(default)]
    pub transport: Transport,
}

/// Tunnel transport tuning.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TunnelTuning {
    /// Idle timeout, ms (default 15000).
    #[serde(default = "default_idle")]
    pub idle_timeout_ms: u64,
    /// Keepalive, ms (default 4000).
    #[serde(default = "default_keepalive")]
    pub keep_alive_ms: u64,
    /// First reconnect delay, ms (default 250); doubles up to the maximum.
    #[serde(default = "default_backoff_min")]
    pub reconnect_min_ms: u64,
    /// Longest reconnect delay, ms (default 10000).
    #[serde(default = "default_backoff_max")]
    pub reconnect_max_ms: u64,
    /// Largest UDP payload path-MTU discovery may reach (default and
    /// maximum 6500, see [`crate::tunnel::endpoint::MAX_UDP_PAYLOAD`]).
    #[serde(default = "default_max_udp_payload")]
    pub max_udp_payload: u16,
}

fn default_max_udp_payload() -> u16 {
    crate::tunnel::endpoint::MAX_UDP_PAYLOAD
}

fn default_idle() -> u64 {
    15_000
}
fn default_keepalive() -> u64 {
    4_000
}
fn default_backoff_min() -> u64 {
    250
}
fn default_backoff_max() -> u64 {
    10_000
}

impl Default for TunnelTuning {
    fn default() -> Self {
        Self {
            idle_timeout_ms: default_idle(),
            keep_alive_ms: default_keepalive(),
            reconnect_min_ms: default_backoff_min(),
            reconnect_max_ms: default_backoff_max(),
            max_udp_payload: default_max_udp_payload(),
        }
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The YAML did not parse.
    #[error("parsing {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A field has an invalid value.
    #[error("{field}: {message}")]
    Invalid {
        /// The field.
        field: String,
        /// What is wrong.
        message: String,
    },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// The default trust domain of a cluster.
pub fn default_trust_domain(cluster: &str) -> String {
    format!("{cluster}.strait.local")
}

/// The SPIFFE ID of the gateway of a cluster in `trust_domain`.
pub fn gateway_identity(trust_domain: &str) -> Result<SpiffeId, ConfigError> {
    SpiffeId::workload(trust_domain, GATEWAY_NAMESPACE, GATEWAY_SERVICE_ACCOUNT)
        .map_err(|e| invalid("trustDomain", e.to_string()))
}

impl GatewayConfig {
    /// Reads and validates a config file; relative paths in it are taken
    /// relative to the file's folder.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Self::parse(&text, path)?;
        if let Some(dir) = path.parent() {
            config.rebase(dir);
        }
        Ok(config)
    }

    /// Parses and validates config text (pure).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Self = serde_saphyr::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    fn rebase(&mut self, dir: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        fix(&mut self.identity.trust_anchors);
        fix(&mut self.identity.issuer_cert);
        fix(&mut self.identity.issuer_key);
        if let Some(p) = &mut self.identity.tokens_file {
            fix(p);
        }
        if let Some(i) = &mut self.injector {
            fix(&mut i.cert_file);
            fix(&mut i.key_file);
        }
        if let Some(p) = &mut self.source.file {
            fix(p);
        }
        if let Some(p) = &mut self.imports.state_file {
            fix(p);
        }
    }

    /// Checks every value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_label("cluster", &self.cluster).map_err(|e| invalid("cluster", e.to_string()))?;
        gateway_identity(&self.trust_domain())?;
        if !(60..=30 * 86_400).contains(&self.identity.leaf_lifetime_seconds) {
            return Err(invalid(
                "identity.leafLifetimeSeconds",
                "must be 60 to 2592000 (30 days)",
            ));
        }
        if self.identity.token_audience.trim().is_empty() {
            return Err(invalid("identity.tokenAudience", "must not be empty"));
        }
        if self.identity.tokens_file.is_some() && self.source.kubernetes.is_some() {
            return Err(invalid(
                "identity.tokensFile",
                "is for outside Kubernetes (in Kubernetes, tokens are reviewed by the API server)",
            ));
        }
        if self.mesh.proxy_inbound_port == 0 {
            return Err(invalid("mesh.proxyInboundPort", "must not be 0"));
        }
        if self.max_connections == 0 {
            return Err(invalid(
                "maxConnections",
                "must be positive (0 would serve nothing)",
            ));
        }
        if self
            .injector
            .as_ref()
            .is_some_and(|i| i.image.trim().is_empty())
        {
            return Err(invalid("injector.image", "must not be empty"));
        }
        let prefix = self.imports.vip_range.prefix_len();
        if !(8..=24).contains(&prefix) {
            return Err(invalid("imports.vipRange", "prefix must be /8 to /24"));
        }
        if !self.imports.vip_range.network().is_loopback() {
            // Egress listeners bind these addresses: outside loopback they
            // would expose imported services on a real network.
            return Err(invalid("imports.vipRange", "must be inside 127.0.0.0/8"));
        }
        match (&self.source.file, &self.source.kubernetes) {
            (Some(_), None) => {}
            (None, Some(k)) => {
                k.validate(&self.listen, self.injector.as_ref())?;
                if !self.links.is_empty() {
                    return Err(invalid(
                        "links",
                        "in Kubernetes, links are Link objects (`strait link`), not config",
                    ));
                }
            }
            _ => {
                return Err(invalid(
                    "source",
                    "set exactly one of `file` and `kubernetes`",
                ))
            }
        }
        if self.cluster == crate::k8s::labels::CLUSTERSET {
            return Err(invalid(
                "cluster",
                "`clusterset` is reserved (the clusterset Services are `<svc>-clusterset`)",
            ));
        }
        if self.source.poll_interval_ms == 0 {
            return Err(invalid("source.pollIntervalMs", "must be positive"));
        }
        let t = &self.tunnel;
        if t.keep_alive_ms == 0 || t.keep_alive_ms >= t.idle_timeout_ms {
            return Err(invalid(
                "tunnel.keepAliveMs",
                "must be positive and shorter than tunnel.idleTimeoutMs",
            ));
        }
        if t.reconnect_min_ms == 0 || t.reconnect_min_ms > t.reconnect_max_ms {
            return Err(invalid(
                "tunnel.reconnectMinMs",
                "must be positive and at most tunnel.reconnectMaxMs",
            ));
        }
        let max = crate::tunnel::endpoint::MAX_UDP_PAYLOAD;
        if !(1200..=max).contains(&t.max_udp_payload) {
            return Err(invalid(
                "tunnel.maxUdpPayload",
                format!("must be 1200 to {max} (a GSO batch of 10 must fit in 64 KiB)"),
            ));
        }
        let own = gateway_identity(&self.trust_domain())?;
        let mut names = std::collections::HashSet::new();
        let mut identities = std::collections::HashSet::new();
        for (i, link) in self.links.iter().enumerate() {
            let field = format!("links[{i}]");
            validate_label("name", &link.name)
                .map_err(|e| invalid(format!("{field}.name"), e.to_string()))?;
            if link.name == self.cluster {
                return Err(invalid(
                    format!("{field}.name"),
                    "a cluster cannot link to itself",
                ));
            }
            if link.name == crate::k8s::labels::CLUSTERSET {
                return Err(invalid(format!("{field}.name"), "`clusterset` is reserved"));
            }
            if !names.insert(&link.name) {
                return Err(invalid(format!("{field}.name"), "duplicate link"));
            }
            for (j, a) in link.addresses.iter().enumerate() {
                if !strait_proxy::net::has_host_and_port(a) {
                    return Err(invalid(
                        format!("{field}.addresses[{j}]"),
                        format!("{a:?} is not host:port"),
                    ));
                }
            }
            let id = self
                .link_identity(link)
                .map_err(|e| invalid(format!("{field}.identity"), e.to_string()))?;
            if id == own {
                return Err(invalid(
                    format!("{field}.identity"),
                    "is this gateway's own identity",
                ));
            }
            if !identities.insert(id) {
                return Err(invalid(
                    format!("{field}.identity"),
                    "another link has the same identity",
                ));
            }
        }
        Ok(())
    }

    /// This cluster's trust domain.
    pub fn trust_domain(&self) -> String {
        self.trust_domain
            .clone()
            .unwrap_or_else(|| default_trust_domain(&self.cluster))
    }

    /// The identity a link's peer must present.
    pub fn link_identity(&self, link: &LinkConfig) -> Result<SpiffeId, ConfigError> {
        match &link.identity {
            Some(id) => SpiffeId::parse(id).map_err(|e| invalid("identity", e.to_string())),
            None => gateway_identity(&default_trust_domain(&link.name)),
        }
    }

    /// The tunnel transport settings.
    pub fn tunnel_config(&self) -> crate::tunnel::TunnelConfig {
        crate::tunnel::TunnelConfig {
            idle_timeout: Duration::from_millis(self.tunnel.idle_timeout_ms),
            keep_alive: Duration::from_millis(self.tunnel.keep_alive_ms),
            max_udp_payload: self.tunnel.max_udp_payload,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
cluster: west
identity: { trustAnchors: root.pem, issuerCert: i.pem, issuerKey: i.key }
source: { file: c.yaml }
"#;

    #[test]
    fn defaults_apply() {
        let c = GatewayConfig::parse(BASE, Path::new("g.yaml")).expect("valid");
        assert_eq!(c.listen.tunnel.port(), 4143);
        assert_eq!(c.listen.admin.port(), 4191);
        assert_eq!(c.listen.dns.port(), 5353);
        assert_eq!(c.listen.destination.port(), 8086);
        assert_eq!(c.trust_domain(), "west.strait.local");
        assert_eq!(c.max_connections, 20_000);
    }

    proptest::proptest! {
        /// A mangled file gets an error that names the file (YAML) or the
        /// field (values), or a config; never a panic.
        #[test]
        fn mangled_config_files_get_an_answer(text in crate::testing::edited_yaml(BASE)) {
            match GatewayConfig::parse(&text, Path::new("g.yaml")) {
                Err(e @ ConfigError::Parse { .. }) => {
                    proptest::prop_assert!(e.to_string().starts_with("parsing g.yaml: "), "{}", e)
                }
                Err(e @ ConfigError::Invalid { .. }) => {
                    proptest::prop_assert!(!e.to_string().starts_with(": "), "{}", e)
                }
                Err(e) => proptest::prop_assert!(false, "{}", e),
                Ok(_) => {}
            }
        }
    }

    const KUBE: &str = r#"
cluster: west
identity: { trustAnchors: root.pem, issuerCert: i.pem, issuerKey: i.key }
"#;

    #[test]
    fn kubernetes_mode_is_validated() {
        let ok = format!("{KUBE}source: {{kubernetes: {{namespace: strait-system}}}}\n");
        let c = GatewayConfig::parse(&ok, Path::new("g.yaml")).expect("valid");
        let k = c.source.kubernetes.expect("kubernetes");
        assert_eq!((k.egress_port_min, k.egress_port_max), (20_000, 20_999));
        assert_eq!(k.namespace(), "strait-system");
        for (source, field) in [
            (
                "{kubernetes: {egressPortMin: 5000, egressPortMax: 4000}}",
                "source.kubernetes.egressPortMin",
            ),
            (
                "{kubernetes: {egressPortMin: 4000, egressPortMax: 5000}}",
                "source.kubernetes.egressPortMin",
            ),
            (
                "{kubernetes: {leaseRenewSeconds: 10}}",
                "source.kubernetes.leaseRenewSeconds",
            ),
            (
                "{kubernetes: {namespace: Bad}}",
                "source.kubernetes.namespace",
            ),
            ("{kubernetes: {}, file: x.yaml}", "source"),
            ("{}", "source"),
        ] {
            let text = format!("{KUBE}source: {source}\n");
            let err = GatewayConfig::parse(&text, Path::new("g.yaml")).expect_err(source);
            assert!(err.to_string().starts_with(field), "{source}: {err}");
        }
        let reserved = ok.replace("cluster: west", "cluster: clusterset");
        let err = GatewayConfig::parse(&reserved, Path::new("g.yaml")).expect_err("reserved");
        assert!(err.to_string().starts_with("cluster"), "{err}");
        // The injector's port is a listener like the others.
        let injector = format!(
            "{KUBE}source: {{kubernetes: {{egressPortMin: 8100, egressPortMax: 9000}}}}\ninjector: {{certFile: a, keyFile: b}}\n"
        );
        let err = GatewayConfig::parse(&injector, Path::new("g.yaml")).expect_err("overlap");
        assert!(err.to_string().contains("injector.listen (8443)"), "{err}");
        let links = format!("{KUBE}source: {{kubernetes: {{}}}}\nlinks: [{{name: east}}]\n");
        let err = GatewayConfig::parse(&links, Path::new("g.yaml")).expect_err("links");
        assert!(err.to_string().starts_with("links"), "{err}");
    }

    #[test]
    fn bad_values_name_the_field() {
        for (extra, field) in [
            ("links: [{name: west}]", "links[0].name"),
            ("links: [{name: east}, {name: east}]", "links[1].name"),
            (
                "links: [{name: east, addresses: [nope]}]",
                "links[0].addresses[0]",
            ),
            (
                "links: [{name: east, identity: 'http://x'}]",
                "links[0].identity",
            ),
            ("tunnel: {keepAliveMs: 20000}", "tunnel.keepAliveMs"),
            ("imports: {vipRange: 127.0.0.0/30}", "imports.vipRange"),
            ("tunnel: {maxUdpPayload: 9000}", "tunnel.maxUdpPayload"),
            ("imports: {vipRange: 10.77.0.0/16}", "imports.vipRange"),
            ("maxConnections: 0", "maxConnections"),
                        ("links: [{name: east}, {name: north, identity: 'spiffe://east.strait.local/ns/strait-system/sa/strait-gateway'}]", "links[1].identity"),
            ("links: [{name: east, identity: 'spiffe://west.strait.local/ns/strait-system/sa/strait-gateway'}]", "links[0].identity"),
        ] {
            let text = format!("{BASE}{extra}\n");
            let err = GatewayConfig::parse(&text, Path::new("g.yaml")).expect_err(extra);
            assert!(err.to_string().starts_with(field), "{extra}: {err}");
        }
        let huge = BASE.replace(
            "issuerKey: i.key }",
            "issuerKey: i.key, leafLifetimeSeconds: 99999999999 }",
        );
        let err = GatewayConfig::parse(&huge, Path::new("g.yaml")).expect_err("huge");
        assert!(
            err.to_string().starts_with("identity.leafLifetimeSeconds"),
            "{err}"
        );
        let err = GatewayConfig::parse("cluster: West\n", Path::new("g.yaml")).expect_err("bad");
        assert!(err.to_string().contains("parsing"), "{err}");
        let err = GatewayConfig::parse(&BASE.replace("west", "West"), Path::new("g.yaml"))
            .expect_err("bad");
        assert!(err.to_string().starts_with("cluster"), "{err}");
    }
}
