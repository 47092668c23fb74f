//! The custom resources Strait reads and writes, as Rust types from which
//! the CRDs themselves are generated (`strait crds`; the chart's copy is
//! checked against them by a test).
//!
//! - `Link` (`links.strait.io`): one linked peer cluster.
//! - `ServiceExport` and `ServiceImport` (`multicluster.x-k8s.io/v1alpha1`,
//!   the Multi-Cluster Services API, KEP-1645), for clusters that do not
//!   have the upstream CRDs installed yet.

use kube::CustomResource;
use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of Strait's own resources.
pub const GROUP: &str = "strait.io";
/// The API group of the Multi-Cluster Services API.
pub const MCS_GROUP: &str = "multicluster.x-k8s.io";

/// How a link's tunnel travels.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum LinkTransport {
    /// QUIC over UDP.
    #[default]
    Quic,
    /// TLS over TCP (for networks that block UDP).
    Tcp,
    /// QUIC, falling back to TCP.
    Auto,
}

/// A linked peer cluster: where its gateways are, who they must be, and
/// which of its exports this cluster takes.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "strait.io",
    version = "v1alpha1",
    kind = "Link",
    derive = "PartialEq",
    plural = "links",
    namespaced,
    status = "LinkStatus",
    printcolumn = r#"{"name":"Cluster","type":"string","jsonPath":".spec.cluster"}"#,
    printcolumn = r#"{"name":"Connected","type":"string","jsonPath":".status.conditions[?(@.type==\"Connected\")].status"}"#,
    printcolumn = r#"{"name":"Imports","type":"integer","jsonPath":".status.importCount"}"#,
    printcolumn = r#"{"name":"RTT","type":"string","jsonPath":".status.lastRtt"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct LinkSpec {
    /// The peer cluster's name (an RFC 1123 label).
    pub cluster: String,
    /// The peer's gateway addresses: IPs or DNS hostnames, each optionally
    /// with `:port`. Hostnames are resolved again on every reconnect (cloud
    /// load balancers). Empty: this cluster only lets the peer in.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// The port for addresses without one (default 4143).
    #[serde(default = "default_port")]
    pub port: u16,
    /// `quic` (default), `tcp` or `auto`.
    #[serde(default)]
    pub transport: LinkTransport,
    /// The SPIFFE ID the peer's gateway must present; default
    /// `spiffe://<cluster>.strait.local/ns/strait-system/sa/strait-gateway`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// A Secret in the Link's namespace whose `ca.crt` holds the peer's
    /// trust anchors; default: this cluster's own anchors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_bundle_secret: Option<String>,
    /// Which of the peer's exports to import; default all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accept: Option<AcceptPolicy>,
}

fn default_port() -> u16 {
    4143
}

/// Which exports a link accepts. An export is accepted when its namespace
/// is listed (or the list is empty) and its `namespace/name` matches one of
/// the service patterns (or that list is empty); a pattern may end in `*`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AcceptPolicy {
    /// Namespaces to import from.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// `namespace/name` patterns, e.g. `shop/*` or `shop/cart`.
    #[serde(default)]
    pub services: Vec<String>,
}

impl AcceptPolicy {
    /// Whether the export `namespace/name` is accepted.
    pub fn accepts(&self, namespace: &str, name: &str) -> bool {
        let ns_ok = self.namespaces.is_empty() || self.namespaces.iter().any(|n| n == namespace);
        let full = format!("{namespace}/{name}");
        let svc_ok = self.services.is_empty()
            || self.services.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => full.starts_with(prefix),
                None => *p == full,
            });
        ns_ok && svc_ok
    }
}

/// What the gateway last observed of a link.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LinkStatus {
    /// `Connected` and `ImportsSynced`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The last measured round-trip time, e.g. `1.2ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rtt: Option<String>,
    /// How many services this cluster imports from the peer.
    #[serde(default)]
    pub import_count: u32,
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A status condition, shaped like `metav1.Condition`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// The condition's type, e.g. `Connected`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// A CamelCase reason.
    #[serde(default)]
    pub reason: String,
    /// A human-readable message.
    #[serde(default)]
    pub message: String,
    /// When the status last changed (RFC 3339).
    #[serde(default)]
    pub last_transition_time: String,
    /// The generation this condition was set for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Marks a Service for export to every linked cluster (MCS API). The
/// Service of the same name and namespace is exported. Upstream
/// ServiceExports have no `spec` at all (`no_spec`: nothing under `spec`
/// on the wire or in the schema).
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "multicluster.x-k8s.io",
    version = "v1alpha1",
    kind = "ServiceExport",
    derive = "PartialEq",
    plural = "serviceexports",
    namespaced,
    no_spec,
    status = "ServiceExportStatus",
    printcolumn = r#"{"name":"Valid","type":"string","jsonPath":".status.conditions[?(@.type==\"Valid\")].status"}"#,
    printcolumn = r#"{"name":"Conflict","type":"string","jsonPath":".status.conditions[?(@.type==\"Conflict\")].status"}"#
)]
pub struct ServiceExportSpec {}

/// What the gateway observed of an export.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ServiceExportStatus {
    /// `Valid` and `Conflict`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// A service imported from other clusters of the clusterset (MCS API).
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "multicluster.x-k8s.io",
    version = "v1alpha1",
    kind = "ServiceImport",
    derive = "PartialEq",
    plural = "serviceimports",
    namespaced,
    status = "ServiceImportStatus",
    printcolumn = r#"{"name":"Type","type":"string","jsonPath":".spec.type"}"#,
    printcolumn = r#"{"name":"IP","type":"string","jsonPath":".spec.ips"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ServiceImportSpec {
    /// The clusterset IPs (the ClusterIP of the clusterset Service).
    #[serde(default)]
    pub ips: Vec<String>,
    /// `ClusterSetIP` or `Headless`.
    #[serde(rename = "type")]
    pub type_: String,
    /// The merged ports of the exporting clusters.
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    /// `None` or `ClientIP`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity: Option<String>,
}

/// A port of a [`ServiceImport`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    /// The port's name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
    /// The application protocol, if declared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
    /// The port number.
    pub port: u16,
}

/// Which clusters export a [`ServiceImport`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ServiceImportStatus {
    /// The exporting clusters.
    #[serde(default)]
    pub clusters: Vec<ClusterStatus>,
}

/// One exporting cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ClusterStatus {
    /// The cluster's name.
    pub cluster: String,
}

/// Every CRD Strait ships, as one multi-document YAML stream (the chart's
/// `crds/strait.yaml` is this output).
pub fn crds_yaml() -> Result<String, serde_saphyr::SerializeError> {
    let crds = [Link::crd(), ServiceExport::crd(), ServiceImport::crd()];
    let mut out =
        String::from("# Generated by `strait crds` from gateway/src/k8s/crd.rs; do not edit.\n");
    for crd in &crds {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(crd)?);
    }
    Ok(out)
}
