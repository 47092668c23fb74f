//! `strait link` and `strait check`: what the command line does against a
//! cluster's Strait install.
//!
//! The pure halves decide from objects already fetched ([`link_manifest`]
//! renders the Link for the peer cluster; [`evaluate`] turns a
//! [`CheckInputs`] into [`CheckResult`]s; [`render_text`] and
//! [`render_json`] print them); the I/O halves ([`gather_link`],
//! [`gather`], [`probe_dns`]) only fetch, each taking a [`kube::Client`] so
//! tests can point them at a fake API server. A 404 is `Ok(None)` (see
//! [`Fetched`]); any other error is kept as text and becomes a failed check
//! or a [`CtlError`], never a panic.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::ListParams;
use kube::Api;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde::Serialize;

use super::crd::{AcceptPolicy, Condition, Link, LinkSpec, LinkTransport};
use super::labels;
use super::links::with_port;
use crate::catalog::validate_label;
use crate::config::{gateway_identity, GatewayConfig};

#[cfg(test)]
mod tests;

/// Names of the objects a Helm install of `charts/strait` creates.
pub mod objects {
    /// The namespace `strait link` and `strait check` look in by default.
    pub const NAMESPACE: &str = crate::config::GATEWAY_NAMESPACE;
    /// The gateway Deployment.
    pub const DEPLOYMENT: &str = "strait-gateway";
    /// The Service peers dial (tunnel, LoadBalancer).
    pub const GATEWAY_SERVICE: &str = "strait-gateway";
    /// The clusterset DNS Service (port 53).
    pub const DNS_SERVICE: &str = "strait-dns";
    /// The ConfigMap holding the gateway's `config.yaml`.
    pub const CONFIG_MAP: &str = "strait-gateway-config";
    /// The key of the config file in [`CONFIG_MAP`].
    pub const CONFIG_KEY: &str = "config.yaml";
    /// The issuer Secret (`tls.crt`, `tls.key`, `ca.crt`) by default.
    pub const ISSUER_SECRET: &str = "strait-issuer";
    /// The tunnel port when the Service does not say.
    pub const TUNNEL_PORT: u16 = 4143;

    /// The Secret `strait link` makes in the peer for `cluster`'s trust
    /// anchors (a Link's `trustBundleSecret`).
    pub fn anchors_secret(cluster: &str) -> String {
        format!("strait-anchors-{cluster}")
    }
    /// The CRDs a working install needs.
    pub const CRDS: [&str; 3] = [
        "links.strait.io",
        "serviceexports.multicluster.x-k8s.io",
        "serviceimports.multicluster.x-k8s.io",
    ];
    /// CoreDNS's namespace.
    pub const COREDNS_NAMESPACE: &str = "kube-system";
    /// CoreDNS's ConfigMap.
    pub const COREDNS_CONFIG_MAP: &str = "coredns";
    /// Extra server blocks the Corefile imports (AKS, k3s).
    pub const COREDNS_CUSTOM_CONFIG_MAP: &str = "coredns-custom";
    /// The Corefile key in [`COREDNS_CONFIG_MAP`].
    pub const COREFILE_KEY: &str = "Corefile";
    /// The name `strait check` asks the clusterset DNS for (TXT).
    pub const DNS_VERSION_NAME: &str = "dns-version.clusterset.local.";
    /// The answer the MCS API specifies.
    pub const DNS_VERSION: &str = "1.0.0";
}

/// An object as fetched: `Ok(Some)` found, `Ok(None)` not found (404),
/// `Err` any other failure, as text.
pub type Fetched<T> = Result<Option<T>, String>;

/// Why `strait link` (or building a client) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CtlError {
    /// `--name` is not the cluster the kube context points at.
    #[error(
        "--name {requested} does not match this cluster: its gateway config says cluster `{cluster}` \
         (wrong --context? run `strait link --name {cluster}` to link this cluster)"
    )]
    NameMismatch {
        /// What `--name` said.
        requested: String,
        /// The cluster's name from its config.
        cluster: String,
    },
    /// An object Strait needs is not there.
    #[error("{what} not found in namespace {namespace}: {hint}")]
    Missing {
        /// Kind and name, e.g. `ConfigMap strait-gateway-config`.
        what: String,
        /// The namespace looked in.
        namespace: String,
        /// What to do.
        hint: String,
    },
    /// Reading an object failed.
    #[error("reading {what}: {message}")]
    Fetch {
        /// Kind and name.
        what: String,
        /// The API error.
        message: String,
    },
    /// The gateway's config in its ConfigMap is missing or invalid.
    #[error("the gateway config (ConfigMap {config_map}, key {key}): {message}")]
    Config {
        /// The ConfigMap.
        config_map: String,
        /// The key.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// The gateway has no address peers can dial.
    #[error("{0}")]
    NoAddress(String),
    /// A flag's value is invalid.
    #[error("{flag} {value:?}: {message}")]
    InvalidFlag {
        /// The flag, e.g. `--address`.
        flag: &'static str,
        /// Its value.
        value: String,
        /// What is wrong.
        message: String,
    },
    /// The issuer Secret's certificates are missing or unreadable.
    #[error("Secret {secret}: {message}")]
    Certificate {
        /// The Secret.
        secret: String,
        /// What is wrong.
        message: String,
    },
    /// The kubeconfig could not be loaded or the client not built.
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    /// Rendering YAML or JSON failed.
    #[error("rendering: {0}")]
    Render(String),
}

// ---------------------------------------------------------------------------
// Shared pieces
// ---------------------------------------------------------------------------

/// The tunnel port of the gateway Service: the UDP port (QUIC), else the
/// first port, else 4143.
pub fn tunnel_port(service: &Service) -> u16 {
    let ports = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .map(Vec::as_slice)
        .unwrap_or_default();
    ports
        .iter()
        .find(|p| p.protocol.as_deref() == Some("UDP"))
        .or_else(|| ports.first())
        .and_then(|p| u16::try_from(p.port).ok())
        .filter(|p| *p != 0)
        .unwrap_or(objects::TUNNEL_PORT)
}

/// The addresses peers dial, `host:port`, from the Service's load balancer
/// ingress (IPs and hostnames); `Err` says why there are none.
pub fn service_addresses(service: &Service, namespace: &str) -> Result<Vec<String>, String> {
    let port = tunnel_port(service);
    let name = service.metadata.name.as_deref().unwrap_or("strait-gateway");
    let type_ = service
        .spec
        .as_ref()
        .and_then(|s| s.type_.as_deref())
        .unwrap_or("ClusterIP");
    let ingress = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .map(Vec::as_slice)
        .unwrap_or_default();
    let addresses: Vec<String> = ingress
        .iter()
        .filter_map(|i| {
            i.ip.as_deref()
                .filter(|s| !s.is_empty())
                .or(i.hostname.as_deref().filter(|s| !s.is_empty()))
        })
        .map(|host| with_port(host, port))
        .collect();
    if !addresses.is_empty() {
        return Ok(addresses);
    }
    if type_ == "LoadBalancer" {
        Err(format!(
            "Service {name} has no load balancer address yet (pending?): wait for it \
             (kubectl -n {namespace} get service {name} -w) or pass --address HOST[:PORT]"
        ))
    } else {
        Err(format!(
            "Service {name} is type {type_}, which has no load balancer address: pass \
             --address HOST[:PORT] with an address peers can reach (port {port})"
        ))
    }
}

/// A Secret's key as UTF-8-agnostic bytes, if present and non-empty.
fn secret_key<'a>(secret: &'a Secret, key: &str) -> Option<&'a [u8]> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.as_slice())
        .filter(|b| !b.is_empty())
}

/// Every certificate in a PEM bundle, as DER.
fn pem_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no PEM certificate".into());
    }
    Ok(certs)
}

/// The SHA-256 fingerprint of DER bytes, `AB:CD:…` (as `openssl x509
/// -noout -fingerprint -sha256` prints it).
pub fn fingerprint(der: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    digest
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The fingerprint of the first certificate of a PEM trust-anchor bundle.
pub fn anchor_fingerprint(ca_pem: &[u8]) -> Result<String, String> {
    let certs = pem_certs(ca_pem)?;
    Ok(fingerprint(&certs[0]))
}

fn parse_config(config_map: &ConfigMap) -> Result<GatewayConfig, String> {
    let text = config_map
        .data
        .as_ref()
        .and_then(|d| d.get(objects::CONFIG_KEY))
        .ok_or_else(|| format!("has no key {}", objects::CONFIG_KEY))?;
    GatewayConfig::parse(text, std::path::Path::new(objects::CONFIG_KEY)).map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------
// strait link
// ---------------------------------------------------------------------------

/// What `strait link` was asked for.
#[derive(Clone, Debug, Default)]
pub struct LinkRequest {
    /// `--name`: this cluster's name, which becomes the Link's name and
    /// `spec.cluster`. It must equal the `cluster` of the gateway config
    /// found through the kube context: a guard against the wrong context.
    pub name: String,
    /// The namespace of the install here, and of the Link in the peer.
    pub namespace: String,
    /// `--address`: overrides the load balancer's addresses.
    pub addresses: Vec<String>,
    /// `--accept-namespace`: the peer imports only from these namespaces.
    pub accept_namespaces: Vec<String>,
    /// `--transport`: how the peer reaches this cluster's gateway.
    pub transport: LinkTransport,
    /// The issuer Secret's name.
    pub issuer_secret: String,
}

/// The objects `strait link` reads from this cluster.
#[derive(Clone, Debug)]
pub struct LinkObjects {
    /// ConfigMap `strait-gateway-config`.
    pub config: Fetched<ConfigMap>,
    /// Service `strait-gateway`.
    pub service: Fetched<Service>,
    /// The issuer Secret.
    pub issuer: Fetched<Secret>,
}

fn require<'a, T>(
    fetched: &'a Fetched<T>,
    what: String,
    namespace: &str,
    hint: &str,
) -> Result<&'a T, CtlError> {
    match fetched {
        Ok(Some(t)) => Ok(t),
        Ok(None) => Err(CtlError::Missing {
            what,
            namespace: namespace.to_string(),
            hint: hint.to_string(),
        }),
        Err(message) => Err(CtlError::Fetch {
            what,
            message: message.clone(),
        }),
    }
}

/// Checks an `--address` value: `host`, `host:port`, an IP or
/// `[v6]:port`; gives it back trimmed.
pub fn check_address(a: &str) -> Result<String, CtlError> {
    let bad = |message: &str| CtlError::InvalidFlag {
        flag: "--address",
        value: a.to_string(),
        message: message.to_string(),
    };
    let t = a.trim();
    if t.is_empty() || t.contains('/') || t.chars().any(char::is_whitespace) {
        return Err(bad("not a host or host:port"));
    }
    let port = match t.parse::<SocketAddr>() {
        Ok(sa) => Some(sa.port()),
        Err(_) if t.parse::<IpAddr>().is_ok() => None,
        Err(_) => match t.rsplit_once(':') {
            Some((host, _)) if host.contains(':') || host.starts_with('[') => {
                return Err(bad("not a host or host:port (IPv6: [addr]:port)"))
            }
            Some((host, p)) => {
                if host.is_empty() {
                    return Err(bad("no host"));
                }
                Some(
                    strait_proxy::net::port_number(p)
                        .ok_or_else(|| bad("the port is not a number from 1 to 65535"))?,
                )
            }
            None => None,
        },
    };
    if port == Some(0) {
        return Err(bad("port 0"));
    }
    Ok(t.to_string())
}

/// The YAML to apply in the peer cluster so its gateway dials this one
/// (pure): a comment with this cluster's trust-anchor fingerprint, a
/// Secret with those anchors, then the `Link` naming it. Fails with a clear message when `--name` is not this
/// cluster, an object is missing, or there is no address.
pub fn link_manifest(req: &LinkRequest, objects: &LinkObjects) -> Result<String, CtlError> {
    let ns = &req.namespace;
    let config_map = require(
        &objects.config,
        format!("ConfigMap {}", objects::CONFIG_MAP),
        ns,
        "is Strait installed here? (helm install strait charts/strait -n <namespace>; see --namespace and --context)",
    )?;
    let config = parse_config(config_map).map_err(|message| CtlError::Config {
        config_map: objects::CONFIG_MAP.into(),
        key: objects::CONFIG_KEY.into(),
        message,
    })?;
    if req.name != config.cluster {
        return Err(CtlError::NameMismatch {
            requested: req.name.clone(),
            cluster: config.cluster,
        });
    }
    let identity = gateway_identity(&config.trust_domain()).map_err(|e| CtlError::Config {
        config_map: objects::CONFIG_MAP.into(),
        key: objects::CONFIG_KEY.into(),
        message: e.to_string(),
    })?;

    let secret = require(
        &objects.issuer,
        format!("Secret {}", req.issuer_secret),
        ns,
        "the gateway's issuer Secret (tls.crt, tls.key, ca.crt); see --issuer-secret",
    )?;
    let cert_err = |message: String| CtlError::Certificate {
        secret: req.issuer_secret.clone(),
        message,
    };
    let ca = secret_key(secret, "ca.crt").ok_or_else(|| cert_err("has no ca.crt".into()))?;
    let anchor = anchor_fingerprint(ca).map_err(|e| cert_err(format!("ca.crt: {e}")))?;

    for n in &req.accept_namespaces {
        validate_label("namespace", n).map_err(|e| CtlError::InvalidFlag {
            flag: "--accept-namespace",
            value: n.clone(),
            message: e.to_string(),
        })?;
    }

    // The port: the Service's, when it can be read; --address may do
    // without the Service.
    let service = match (&objects.service, req.addresses.is_empty()) {
        (Ok(Some(s)), _) => Some(s),
        (_, false) => None,
        (fetched, true) => Some(require(
            fetched,
            format!("Service {}", objects::GATEWAY_SERVICE),
            ns,
            "the Service peers dial; or pass --address HOST[:PORT]",
        )?),
    };
    let port = service.map_or(objects::TUNNEL_PORT, tunnel_port);
    let addresses = if req.addresses.is_empty() {
        let service = service.ok_or_else(|| CtlError::NoAddress("no Service".into()))?;
        service_addresses(service, ns).map_err(CtlError::NoAddress)?
    } else {
        req.addresses
            .iter()
            .map(|a| check_address(a).map(|a| with_port(&a, port)))
            .collect::<Result<Vec<_>, _>>()?
    };

    // This cluster's anchors travel with the Link: the peer verifies our
    // gateway against them alone (clustersets need not share a root).
    let bundle_name = objects::anchors_secret(&config.cluster);
    let anchors = Secret {
        metadata: ObjectMeta {
            name: Some(bundle_name.clone()),
            namespace: Some(ns.clone()),
            labels: Some(
                [
                    (labels::MANAGED_BY.to_string(), labels::MANAGER.to_string()),
                    ("strait.io/link".to_string(), config.cluster.clone()),
                ]
                .into(),
            ),
            ..Default::default()
        },
        data: Some(
            [(
                crate::k8s::links::BUNDLE_KEY.to_string(),
                ByteString(ca.to_vec()),
            )]
            .into(),
        ),
        ..Default::default()
    };
    let mut link = Link::new(
        &req.name,
        LinkSpec {
            cluster: config.cluster.clone(),
            addresses,
            port,
            transport: req.transport,
            identity: Some(identity.as_str().to_string()),
            trust_bundle_secret: Some(bundle_name),
            accept: (!req.accept_namespaces.is_empty()).then(|| AcceptPolicy {
                namespaces: req.accept_namespaces.clone(),
                services: Vec::new(),
            }),
        },
    );
    link.metadata.namespace = Some(ns.clone());
    let render = |e: serde_saphyr::SerializeError| CtlError::Render(e.to_string());
    let secret_yaml = serde_saphyr::to_string(&anchors).map_err(render)?;
    let link_yaml = serde_saphyr::to_string(&link).map_err(render)?;
    let cluster = &config.cluster;
    Ok(format!(
        "# Link to cluster {cluster}: apply it in the peer cluster, whose gateway then dials {cluster}:\n\
         #   strait link --name {cluster} | kubectl --context <peer> apply -f -\n\
         # The Secret carries {cluster}'s trust anchors (ca.crt); the peer trusts {cluster}'s\n\
         # gateway through them alone. Their SHA-256 fingerprint:\n\
         #   {anchor}\n\
         # (`strait check` in {cluster} prints the same.)\n\
         ---\n{secret_yaml}---\n{link_yaml}"
    ))
}

/// Reads what `strait link` needs from this cluster (I/O).
pub async fn gather_link(client: &kube::Client, req: &LinkRequest) -> LinkObjects {
    let ns = req.namespace.as_str();
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let (config, service, issuer) = tokio::join!(
        fetch(&config_maps, objects::CONFIG_MAP),
        fetch(&services, objects::GATEWAY_SERVICE),
        fetch(&secrets, &req.issuer_secret),
    );
    LinkObjects {
        config,
        service,
        issuer,
    }
}

// ---------------------------------------------------------------------------
// strait check
// ---------------------------------------------------------------------------

/// A check's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// All good.
    Pass,
    /// Works, but look at it.
    Warn,
    /// Broken: `strait check` exits 1.
    Fail,
}

/// One named check and what it found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CheckResult {
    /// A stable, short name (`crds`, `gateway`, `links`, …).
    pub name: &'static str,
    /// Pass, warn or fail.
    pub status: Status,
    /// One line of detail; further lines, if any, are hints (a snippet).
    pub detail: String,
}

impl CheckResult {
    fn new(name: &'static str, status: Status, detail: impl Into<String>) -> Self {
        Self {
            name,
            status,
            detail: detail.into(),
        }
    }
}

/// The outcome of asking the clusterset DNS for `dns-version`: the TXT
/// strings of a NOERROR answer per transport, or why there were none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsProbe {
    /// The server asked.
    pub server: SocketAddr,
    /// Over UDP.
    pub udp: Result<Vec<String>, String>,
    /// Over TCP (what `kubectl port-forward` carries).
    pub tcp: Result<Vec<String>, String>,
}

/// Everything `strait check` looks at, already fetched.
#[derive(Clone, Debug)]
pub struct CheckInputs {
    /// The API server's version, or why it could not be reached; when it
    /// could not, nothing else was fetched.
    pub api: Result<String, String>,
    /// The install's namespace.
    pub namespace: String,
    /// The issuer Secret's name.
    pub issuer_secret: String,
    /// Each CRD of [`objects::CRDS`], by name.
    pub crds: Vec<(String, Fetched<CustomResourceDefinition>)>,
    /// ConfigMap `strait-gateway-config`.
    pub config: Fetched<ConfigMap>,
    /// Deployment `strait-gateway`.
    pub deployment: Fetched<Deployment>,
    /// Service `strait-gateway`.
    pub gateway_service: Fetched<Service>,
    /// Service `strait-dns`.
    pub dns_service: Fetched<Service>,
    /// The Links in the namespace; `Ok(None)` when the Link CRD is missing.
    pub links: Fetched<Vec<Link>>,
    /// The issuer Secret.
    pub issuer: Fetched<Secret>,
    /// The DNS probe; `None` when no server was known to ask.
    pub dns: Option<DnsProbe>,
    /// ConfigMap `kube-system/coredns`.
    pub coredns: Fetched<ConfigMap>,
    /// ConfigMap `kube-system/coredns-custom` (AKS, k3s: `*.server` files
    /// the Corefile `import`s).
    pub coredns_custom: Fetched<ConfigMap>,
}

fn fetch_failed(name: &'static str, what: &str, e: &str) -> CheckResult {
    CheckResult::new(name, Status::Fail, format!("reading {what}: {e}"))
}

fn seconds(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

fn date(ts: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ts)
        .map(|t| t.date().to_string())
        .unwrap_or_else(|_| format!("@{ts}"))
}

/// Checks each certificate of a PEM bundle is valid now and for more than
/// `min_days`; returns a description of the earliest expiry.
fn validity(
    certs: &[CertificateDer<'_>],
    now: i64,
    min_days: u64,
) -> Result<(String, bool), String> {
    let mut earliest: Option<(i64, i64)> = None;
    for (i, der) in certs.iter().enumerate() {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("certificate {}: {e}", i + 1))?;
        let v = cert.validity();
        let (nb, na) = (v.not_before.timestamp(), v.not_after.timestamp());
        if nb > now {
            return Err(format!("not valid before {}", date(nb)));
        }
        if earliest.is_none_or(|(_, e)| na < e) {
            earliest = Some((nb, na));
        }
    }
    let Some((_, not_after)) = earliest else {
        return Err("no certificate".into());
    };
    let left = not_after - now;
    if left <= 0 {
        return Err(format!("expired on {}", date(not_after)));
    }
    let days = left / 86_400;
    let min = i64::try_from(min_days).unwrap_or(i64::MAX);
    let ok = left > min.saturating_mul(86_400);
    Ok((format!("valid until {} ({days} days)", date(not_after)), ok))
}

fn check_crds(inputs: &CheckInputs) -> CheckResult {
    let mut missing = Vec::new();
    let mut errors = Vec::new();
    let mut unestablished = Vec::new();
    for (name, fetched) in &inputs.crds {
        match fetched {
            Ok(Some(crd)) => {
                let established = crd
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| {
                        c.iter()
                            .any(|c| c.type_ == "Established" && c.status == "True")
                    });
                if !established {
                    unestablished.push(name.as_str());
                }
            }
            Ok(None) => missing.push(name.as_str()),
            Err(e) => errors.push(format!("{name}: {e}")),
        }
    }
    if !errors.is_empty() {
        return CheckResult::new(
            "crds",
            Status::Fail,
            format!("reading CRDs: {}", errors.join("; ")),
        );
    }
    if !missing.is_empty() {
        return CheckResult::new(
            "crds",
            Status::Fail,
            format!(
                "missing: {} (install them: strait crds | kubectl apply --server-side -f -)",
                missing.join(", ")
            ),
        );
    }
    if !unestablished.is_empty() {
        return CheckResult::new(
            "crds",
            Status::Warn,
            format!("not Established yet: {}", unestablished.join(", ")),
        );
    }
    let names: Vec<&str> = inputs.crds.iter().map(|(n, _)| n.as_str()).collect();
    CheckResult::new(
        "crds",
        Status::Pass,
        format!("installed: {}", names.join(", ")),
    )
}

fn check_config(inputs: &CheckInputs) -> (CheckResult, Option<GatewayConfig>) {
    let what = format!("ConfigMap {}", objects::CONFIG_MAP);
    match &inputs.config {
        Err(e) => (fetch_failed("config", &what, e), None),
        Ok(None) => (
            CheckResult::new(
                "config",
                Status::Fail,
                format!(
                    "{what} not found in namespace {} (is Strait installed there? see --namespace, --context)",
                    inputs.namespace
                ),
            ),
            None,
        ),
        Ok(Some(cm)) => match parse_config(cm) {
            Err(e) => (
                CheckResult::new("config", Status::Fail, format!("{what}: {e}")),
                None,
            ),
            Ok(config) => {
                let id = gateway_identity(&config.trust_domain())
                    .map(|id| id.as_str().to_string())
                    .unwrap_or_default();
                (
                    CheckResult::new(
                        "config",
                        Status::Pass,
                        format!("cluster {}, gateway identity {id}", config.cluster),
                    ),
                    Some(config),
                )
            }
        },
    }
}

fn check_deployment(inputs: &CheckInputs) -> CheckResult {
    let what = format!("Deployment {}", objects::DEPLOYMENT);
    let d = match &inputs.deployment {
        Err(e) => return fetch_failed("gateway", &what, e),
        Ok(None) => {
            return CheckResult::new(
                "gateway",
                Status::Fail,
                format!("{what} not found in namespace {}", inputs.namespace),
            )
        }
        Ok(Some(d)) => d,
    };
    let want = d.spec.replicas.unwrap_or(1);
    let ready = d
        .status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    let detail = format!("{ready} of {want} replicas ready");
    if ready < 1 {
        CheckResult::new(
            "gateway",
            Status::Fail,
            format!(
                "{detail} (kubectl -n {} describe deployment {})",
                inputs.namespace,
                objects::DEPLOYMENT
            ),
        )
    } else if ready < want {
        CheckResult::new("gateway", Status::Warn, detail)
    } else {
        CheckResult::new("gateway", Status::Pass, detail)
    }
}

fn check_gateway_service(inputs: &CheckInputs) -> CheckResult {
    let what = format!("Service {}", objects::GATEWAY_SERVICE);
    match &inputs.gateway_service {
        Err(e) => fetch_failed("gateway-service", &what, e),
        Ok(None) => CheckResult::new(
            "gateway-service",
            Status::Fail,
            format!("{what} not found in namespace {}", inputs.namespace),
        ),
        Ok(Some(s)) => match service_addresses(s, &inputs.namespace) {
            Ok(a) => CheckResult::new(
                "gateway-service",
                Status::Pass,
                format!("peers dial {}", a.join(", ")),
            ),
            Err(e) => CheckResult::new("gateway-service", Status::Warn, e),
        },
    }
}

fn condition<'a>(link: &'a Link, type_: &str) -> Option<&'a Condition> {
    link.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

fn describe(name: &str, link: &Link, c: Option<&Condition>) -> String {
    let cluster = &link.spec.cluster;
    match c {
        None => format!("{name} (cluster {cluster}): no status yet (is the gateway running?)"),
        Some(c) if c.message.is_empty() => {
            format!("{name} (cluster {cluster}): {} {}", c.status, c.reason)
        }
        Some(c) => format!(
            "{name} (cluster {cluster}): {} {}: {}",
            c.status, c.reason, c.message
        ),
    }
}

fn check_links(inputs: &CheckInputs) -> Vec<CheckResult> {
    let links = match &inputs.links {
        Err(e) => return vec![fetch_failed("links", "Links", e)],
        Ok(None) => {
            return vec![CheckResult::new(
                "links",
                Status::Fail,
                "cannot list Links: the CRD links.strait.io is not installed",
            )]
        }
        Ok(Some(l)) => l,
    };
    if links.is_empty() {
        return vec![CheckResult::new(
            "links",
            Status::Warn,
            format!(
                "no Links in namespace {}: link a peer (strait link --name <peer> --context <peer> | kubectl apply -f -)",
                inputs.namespace
            ),
        )];
    }
    let mut sorted: Vec<&Link> = links.iter().collect();
    sorted.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let (mut up, mut waiting, mut down) = (Vec::new(), Vec::new(), Vec::new());
    let (mut synced, mut unsynced, mut unknown) = (Vec::new(), Vec::new(), Vec::new());
    for link in sorted {
        let name = link.metadata.name.as_deref().unwrap_or("?");
        let connected = condition(link, "Connected");
        match connected {
            Some(c) if c.status == "True" => {
                let rtt = link
                    .status
                    .as_ref()
                    .and_then(|s| s.last_rtt.as_deref())
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default();
                up.push(format!("{name}{rtt}"));
            }
            Some(c) if c.reason == "WaitingForPeer" => {
                waiting.push(describe(name, link, connected))
            }
            _ => down.push(describe(name, link, connected)),
        }
        let imports = condition(link, "ImportsSynced");
        match imports {
            Some(c) if c.status == "True" => {
                let n = link.status.as_ref().map_or(0, |s| s.import_count);
                synced.push(format!("{name} ({n} imported)"));
            }
            Some(c) if c.status == "False" => unsynced.push(describe(name, link, imports)),
            _ => unknown.push(describe(name, link, imports)),
        }
    }
    let links_result = if !down.is_empty() {
        let mut d = format!("not connected: {}", down.join("; "));
        if !waiting.is_empty() {
            d.push_str(&format!(
                "; waiting for the peer to dial: {}",
                waiting.join("; ")
            ));
        }
        CheckResult::new("links", Status::Fail, d)
    } else if !waiting.is_empty() {
        CheckResult::new(
            "links",
            Status::Warn,
            format!(
                "waiting for the peer to dial (no addresses here; apply `strait link` from this cluster in the peer): {}",
                waiting.join("; ")
            ),
        )
    } else {
        CheckResult::new(
            "links",
            Status::Pass,
            format!("connected: {}", up.join(", ")),
        )
    };
    let imports_result = if !unsynced.is_empty() {
        CheckResult::new(
            "imports",
            Status::Fail,
            format!("not synced: {}", unsynced.join("; ")),
        )
    } else if !unknown.is_empty() {
        CheckResult::new(
            "imports",
            Status::Warn,
            format!("not reported yet: {}", unknown.join("; ")),
        )
    } else {
        CheckResult::new(
            "imports",
            Status::Pass,
            format!("synced: {}", synced.join(", ")),
        )
    };
    vec![links_result, imports_result]
}

fn check_certificates(inputs: &CheckInputs, now: i64, min_days: u64) -> Vec<CheckResult> {
    let what = format!("Secret {}", inputs.issuer_secret);
    let secret = match &inputs.issuer {
        Err(e) => {
            return vec![
                fetch_failed("issuer", &what, e),
                fetch_failed("anchor", &what, e),
            ]
        }
        Ok(None) => {
            let d = format!(
                "{what} not found in namespace {} (see --issuer-secret)",
                inputs.namespace
            );
            return vec![
                CheckResult::new("issuer", Status::Fail, d.clone()),
                CheckResult::new("anchor", Status::Fail, d),
            ];
        }
        Ok(Some(s)) => s,
    };
    let too_soon = |d: String| format!("{d}: expires within --min-cert-days {min_days}");

    let anchors = secret_key(secret, "ca.crt")
        .ok_or_else(|| "no ca.crt".to_string())
        .and_then(|pem| pem_certs(pem).map_err(|e| format!("ca.crt: {e}")));
    let anchor = match &anchors {
        Err(e) => CheckResult::new("anchor", Status::Fail, format!("{what}: {e}")),
        Ok(certs) => {
            let fp = fingerprint(&certs[0]);
            match validity(certs, now, min_days) {
                Err(e) => {
                    CheckResult::new("anchor", Status::Fail, format!("ca.crt {e}; SHA-256 {fp}"))
                }
                Ok((d, true)) => {
                    CheckResult::new("anchor", Status::Pass, format!("{d}; SHA-256 {fp}"))
                }
                Ok((d, false)) => CheckResult::new(
                    "anchor",
                    Status::Fail,
                    format!("{}; SHA-256 {fp}", too_soon(d)),
                ),
            }
        }
    };

    let issuer = (|| {
        let pem = secret_key(secret, "tls.crt").ok_or_else(|| "no tls.crt".to_string())?;
        let certs = pem_certs(pem).map_err(|e| format!("tls.crt: {e}"))?;
        if secret_key(secret, "tls.key").is_none() {
            return Err("no tls.key".to_string());
        }
        let (desc, ok) =
            validity(&certs[..1], now, min_days).map_err(|e| format!("tls.crt {e}"))?;
        if let Ok(anchors) = &anchors {
            let (_, cert) = x509_parser::parse_x509_certificate(&certs[0])
                .map_err(|e| format!("tls.crt: {e}"))?;
            let signed = anchors.iter().any(|a| {
                x509_parser::parse_x509_certificate(a)
                    .is_ok_and(|(_, a)| cert.verify_signature(Some(a.public_key())).is_ok())
            });
            if !signed {
                return Err("tls.crt is not signed by a trust anchor in ca.crt".into());
            }
        }
        Ok((desc, ok))
    })();
    let issuer = match issuer {
        Err(e) => CheckResult::new("issuer", Status::Fail, format!("{what}: {e}")),
        Ok((d, true)) => CheckResult::new("issuer", Status::Pass, d),
        Ok((d, false)) => CheckResult::new("issuer", Status::Fail, too_soon(d)),
    };
    vec![issuer, anchor]
}

fn check_dns(inputs: &CheckInputs) -> CheckResult {
    let hint = format!(
        "from outside the cluster: kubectl -n {} port-forward service/{} 5353:53, then --dns-server 127.0.0.1:5353",
        inputs.namespace,
        objects::DNS_SERVICE
    );
    let Some(probe) = &inputs.dns else {
        let why = match &inputs.dns_service {
            Err(e) => format!("reading Service {}: {e}", objects::DNS_SERVICE),
            Ok(None) => format!(
                "Service {} not found in namespace {}",
                objects::DNS_SERVICE,
                inputs.namespace
            ),
            Ok(Some(_)) => format!("Service {} has no ClusterIP", objects::DNS_SERVICE),
        };
        return CheckResult::new(
            "dns",
            Status::Fail,
            format!("{why}; pass --dns-server ADDR"),
        );
    };
    let name = objects::DNS_VERSION_NAME.trim_end_matches('.');
    let server = probe.server;
    let good = |r: &Result<Vec<String>, String>| {
        r.as_ref()
            .is_ok_and(|t| t.iter().any(|s| s == objects::DNS_VERSION))
    };
    match (good(&probe.udp), good(&probe.tcp)) {
        (true, true) => CheckResult::new(
            "dns",
            Status::Pass,
            format!("{server} answers {name} TXT \"1.0.0\" over UDP and TCP"),
        ),
        (true, false) => CheckResult::new(
            "dns",
            Status::Pass,
            format!(
                "{server} answers {name} TXT \"1.0.0\" over UDP (TCP: {})",
                brief(&probe.tcp)
            ),
        ),
        (false, true) => CheckResult::new(
            "dns",
            Status::Pass,
            format!(
                "{server} answers {name} TXT \"1.0.0\" over TCP (UDP: {})",
                brief(&probe.udp)
            ),
        ),
        (false, false) => {
            let answered = |r: &Result<Vec<String>, String>| r.is_ok();
            if answered(&probe.udp) || answered(&probe.tcp) {
                CheckResult::new(
                    "dns",
                    Status::Warn,
                    format!(
                        "{server} answers {name} with TXT {} over UDP, {} over TCP; expected \"1.0.0\"",
                        brief(&probe.udp),
                        brief(&probe.tcp)
                    ),
                )
            } else {
                CheckResult::new(
                    "dns",
                    Status::Fail,
                    format!(
                        "{server}: no answer to {name} TXT (UDP: {}; TCP: {})\n{hint}",
                        brief(&probe.udp),
                        brief(&probe.tcp)
                    ),
                )
            }
        }
    }
}

fn brief(r: &Result<Vec<String>, String>) -> String {
    match r {
        Ok(t) if t.is_empty() => "no TXT".into(),
        Ok(t) => t
            .iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(" "),
        Err(e) => e.clone(),
    }
}

/// The CoreDNS server block that forwards `clusterset.local` to Strait's
/// DNS Service (as in charts/strait/README.md).
pub fn stub_domain_snippet(cluster_ip: &str, cache_seconds: u32) -> String {
    format!(
        "clusterset.local:53 {{\n    errors\n    cache {cache_seconds}\n    forward . {cluster_ip}\n}}\n"
    )
}

fn strip_comment(line: &str) -> &str {
    line.split_once('#').map_or(line, |(l, _)| l)
}

fn zone_of(key: &str) -> &str {
    let k = key.strip_prefix("dns://").unwrap_or(key);
    // `zone:port`; zones have no colons.
    let k = k.split_once(':').map_or(k, |(z, _)| z);
    k.trim_end_matches('.')
}

fn host_of(target: &str) -> &str {
    let t = target.strip_prefix("dns://").unwrap_or(target);
    if let Some(rest) = t.strip_prefix('[') {
        return rest.split_once(']').map_or(rest, |(h, _)| h);
    }
    if t.parse::<IpAddr>().is_ok() {
        return t;
    }
    t.rsplit_once(':').map_or(t, |(h, _)| h)
}

/// The upstreams of the `forward` in the Corefile's `clusterset.local`
/// server block (pure): `None` when there is no such block, `Some(empty)`
/// when it does not forward.
pub fn corefile_clusterset_forwards(corefile: &str) -> Option<Vec<String>> {
    let mut depth = 0usize;
    let mut in_block = false;
    let mut found = false;
    let mut forwards = Vec::new();
    for raw in corefile.lines() {
        let line = strip_comment(raw).trim();
        if line.is_empty() {
            continue;
        }
        if depth == 0 && line.ends_with('{') {
            let keys = line.trim_end_matches('{');
            in_block = keys
                .split(|c: char| c.is_whitespace() || c == ',')
                .any(|k| !k.is_empty() && zone_of(k) == "clusterset.local");
            found |= in_block;
        } else if in_block && depth == 1 {
            let mut words = line.split_whitespace();
            if words.next() == Some("forward") {
                let _from = words.next();
                forwards.extend(words.take_while(|w| *w != "{").map(|w| w.to_string()));
            }
        }
        depth += line.matches('{').count();
        depth = depth.saturating_sub(line.matches('}').count());
        if depth == 0 {
            in_block = false;
        }
    }
    found.then_some(forwards)
}

fn check_coredns(inputs: &CheckInputs, config: Option<&GatewayConfig>) -> CheckResult {
    let what = format!(
        "ConfigMap {}/{}",
        objects::COREDNS_NAMESPACE,
        objects::COREDNS_CONFIG_MAP
    );
    let cluster_ip = match &inputs.dns_service {
        Ok(Some(s)) => s
            .spec
            .as_ref()
            .and_then(|s| s.cluster_ip.clone())
            .filter(|ip| !ip.is_empty() && ip != "None"),
        _ => None,
    };
    let ttl = config.map_or(5, |c| c.imports.dns_ttl_seconds);
    let snippet = stub_domain_snippet(
        cluster_ip.as_deref().unwrap_or("<strait-dns ClusterIP>"),
        ttl,
    );
    let add = format!(
        "append to the Corefile (kubectl -n {} edit configmap {}):\n{snippet}",
        objects::COREDNS_NAMESPACE,
        objects::COREDNS_CONFIG_MAP
    );
    let cm = match &inputs.coredns {
        Err(e) => return fetch_failed("coredns", &what, e),
        Ok(None) => {
            return CheckResult::new(
                "coredns",
                Status::Warn,
                format!(
                    "{what} not found (not CoreDNS?): make the cluster DNS forward clusterset.local to the {} Service; for CoreDNS, {add}",
                    objects::DNS_SERVICE
                ),
            )
        }
        Ok(Some(cm)) => cm,
    };
    let Some(corefile) = cm.data.as_ref().and_then(|d| d.get(objects::COREFILE_KEY)) else {
        return CheckResult::new(
            "coredns",
            Status::Warn,
            format!("{what} has no {}; {add}", objects::COREFILE_KEY),
        );
    };
    // The block may also sit in a `*.server` file of coredns-custom that
    // the Corefile imports (AKS and k3s keep user blocks there).
    let imports = corefile
        .lines()
        .any(|l| strip_comment(l).trim_start().starts_with("import "));
    let custom = match (&inputs.coredns_custom, imports) {
        (Ok(Some(cm)), true) => cm
            .data
            .iter()
            .flatten()
            .filter(|(k, _)| k.ends_with(".server"))
            .find_map(|(_, v)| corefile_clusterset_forwards(v)),
        _ => None,
    };
    match corefile_clusterset_forwards(corefile).or(custom) {
        None => CheckResult::new(
            "coredns",
            Status::Warn,
            format!("no clusterset.local server block in the Corefile; {add}"),
        ),
        Some(forwards) => match &cluster_ip {
            Some(ip) if forwards.iter().any(|f| host_of(f) == ip) => CheckResult::new(
                "coredns",
                Status::Pass,
                format!("clusterset.local forwards to {ip} ({})", objects::DNS_SERVICE),
            ),
            Some(ip) => CheckResult::new(
                "coredns",
                Status::Warn,
                format!(
                    "clusterset.local forwards to [{}], not to the {} ClusterIP {ip}; the block should read:\n{snippet}",
                    forwards.join(" "),
                    objects::DNS_SERVICE
                ),
            ),
            None => CheckResult::new(
                "coredns",
                Status::Warn,
                format!(
                    "clusterset.local forwards to [{}]; cannot compare: the {} Service's ClusterIP is unknown",
                    forwards.join(" "),
                    objects::DNS_SERVICE
                ),
            ),
        },
    }
}

/// Every check, from objects already fetched (pure). `now` dates the
/// certificates; they must stay valid for more than `min_cert_days`.
pub fn evaluate(inputs: &CheckInputs, now: SystemTime, min_cert_days: u64) -> Vec<CheckResult> {
    let now = seconds(now);
    let api = match &inputs.api {
        Err(e) => {
            return vec![
                CheckResult::new(
                    "kubernetes-api",
                    Status::Fail,
                    format!("cannot reach the API server: {e}"),
                ),
                check_dns(inputs),
            ]
        }
        Ok(version) => CheckResult::new(
            "kubernetes-api",
            Status::Pass,
            format!("reachable, Kubernetes {version}"),
        ),
    };
    let mut out = vec![api, check_crds(inputs)];
    let (config, parsed) = check_config(inputs);
    out.push(config);
    out.push(check_deployment(inputs));
    out.push(check_gateway_service(inputs));
    out.extend(check_links(inputs));
    out.extend(check_certificates(inputs, now, min_cert_days));
    out.push(check_dns(inputs));
    out.push(check_coredns(inputs, parsed.as_ref()));
    out
}

/// Whether any check failed (`strait check` then exits 1).
pub fn any_failed(results: &[CheckResult]) -> bool {
    results.iter().any(|r| r.status == Status::Fail)
}

/// Aligned text, `√` pass, `‼` warn, `×` fail (as `linkerd check`), hint
/// lines indented under their check, then a summary line.
pub fn render_text(results: &[CheckResult]) -> String {
    let width = results.iter().map(|r| r.name.len()).max().unwrap_or(0);
    let mut out = String::new();
    for r in results {
        let mark = match r.status {
            Status::Pass => "√",
            Status::Warn => "‼",
            Status::Fail => "×",
        };
        let mut lines = r.detail.lines();
        let first = lines.next().unwrap_or("");
        out.push_str(&format!("{mark} {:<width$}  {first}\n", r.name));
        for l in lines {
            out.push_str(&format!("  {:<width$}    {l}\n", ""));
        }
    }
    let count = |s: Status| results.iter().filter(|r| r.status == s).count();
    let (fail, warn) = (count(Status::Fail), count(Status::Warn));
    out.push('\n');
    out.push_str(&match (fail, warn) {
        (0, 0) => "Status check results are √\n".to_string(),
        (0, w) => format!("Status check results are √ ({w} warning(s))\n"),
        (f, w) => format!("Status check results are ×: {f} failed, {w} warning(s)\n"),
    });
    out
}

/// A JSON array of `{name, status, detail}`.
pub fn render_json(results: &[CheckResult]) -> Result<String, CtlError> {
    serde_json::to_string_pretty(results).map_err(|e| CtlError::Render(e.to_string()))
}

// ---------------------------------------------------------------------------
// strait gateways
// ---------------------------------------------------------------------------

/// One linked peer gateway as this cluster's Links report it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayRow {
    /// The peer cluster.
    pub cluster: String,
    /// Whether the tunnel is up (`Connected` condition).
    pub alive: bool,
    /// Why not, when not (the condition's reason and message).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// Services imported from it.
    pub imports: u32,
    /// The last round-trip time, e.g. `1.2ms`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtt: Option<String>,
    /// `quic`, `tcp` or `auto`.
    pub transport: String,
}

/// The peers of this cluster from its Links (pure), sorted by cluster.
pub fn gateway_rows(links: &[Link]) -> Vec<GatewayRow> {
    let mut rows: Vec<GatewayRow> = links
        .iter()
        .map(|l| {
            let status = l.status.clone().unwrap_or_default();
            let connected = status.conditions.iter().find(|c| c.type_ == "Connected");
            let alive = connected.is_some_and(|c| c.status == "True");
            let detail = match connected {
                None => "no status yet".to_string(),
                Some(c) if !alive => format!("{}: {}", c.reason, c.message)
                    .trim_end_matches(": ")
                    .to_string(),
                Some(_) => String::new(),
            };
            GatewayRow {
                cluster: l.spec.cluster.clone(),
                alive,
                detail,
                imports: status.import_count,
                rtt: status.last_rtt,
                transport: format!("{:?}", l.spec.transport).to_lowercase(),
            }
        })
        .collect();
    rows.sort_by(|a, b| a.cluster.cmp(&b.cluster));
    rows
}

/// A table like `linkerd multicluster gateways`.
pub fn render_gateways(rows: &[GatewayRow]) -> String {
    let mut table = vec![[
        "CLUSTER".to_string(),
        "ALIVE".into(),
        "IMPORTS".into(),
        "RTT".into(),
        "TRANSPORT".into(),
        "DETAIL".into(),
    ]];
    for r in rows {
        table.push([
            r.cluster.clone(),
            if r.alive { "True" } else { "False" }.into(),
            r.imports.to_string(),
            r.rtt.clone().unwrap_or_else(|| "-".into()),
            r.transport.clone(),
            r.detail.clone(),
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|i| table.iter().map(|row| row[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &table {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

/// The Links of `namespace` (I/O).
pub async fn gather_gateways(
    client: &kube::Client,
    namespace: &str,
) -> Result<Vec<Link>, CtlError> {
    let api: Api<Link> = Api::namespaced(client.clone(), namespace);
    api.list(&ListParams::default())
        .await
        .map(|l| l.items)
        .map_err(|e| CtlError::Fetch {
            what: format!("Links in {namespace}"),
            message: error_chain(&e),
        })
}

async fn fetch<K>(api: &Api<K>, name: &str) -> Fetched<K>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.get_opt(name).await.map_err(|e| error_chain(&e))
}

/// An error and its causes, `outer: inner: root` (kube's own message
/// alone often hides the cause, e.g. `client error (Connect)`).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Fetches everything [`evaluate`] looks at and probes the DNS (I/O):
/// `dns_server`, else the `strait-dns` Service's ClusterIP on port 53.
pub async fn gather(
    client: &kube::Client,
    namespace: &str,
    issuer_secret: &str,
    dns_server: Option<SocketAddr>,
) -> CheckInputs {
    let crds_api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let services: Api<Service> = Api::namespaced(client.clone(), namespace);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let links_api: Api<Link> = Api::namespaced(client.clone(), namespace);
    let system_config_maps: Api<ConfigMap> =
        Api::namespaced(client.clone(), objects::COREDNS_NAMESPACE);

    let api = client
        .apiserver_version()
        .await
        .map(|v| v.git_version)
        .map_err(|e| error_chain(&e));
    let (crds, config, deployment, gateway_service, dns_service, links, issuer, coredns, custom) =
        if let Err(e) = &api {
            let e = format!("API server unreachable: {e}");
            (
                Vec::new(),
                Err(e.clone()),
                Err(e.clone()),
                Err(e.clone()),
                Err(e.clone()),
                Err(e.clone()),
                Err(e.clone()),
                Err(e.clone()),
                Err(e),
            )
        } else {
            let crds = async {
                let mut out = Vec::new();
                for name in objects::CRDS {
                    out.push((name.to_string(), fetch(&crds_api, name).await));
                }
                out
            };
            let links = async {
                match links_api.list(&ListParams::default()).await {
                    Ok(list) => Ok(Some(list.items)),
                    Err(kube::Error::Api(s)) if s.is_not_found() => Ok(None),
                    Err(e) => Err(error_chain(&e)),
                }
            };
            tokio::join!(
                crds,
                fetch(&config_maps, objects::CONFIG_MAP),
                fetch(&deployments, objects::DEPLOYMENT),
                fetch(&services, objects::GATEWAY_SERVICE),
                fetch(&services, objects::DNS_SERVICE),
                links,
                fetch(&secrets, issuer_secret),
                fetch(&system_config_maps, objects::COREDNS_CONFIG_MAP),
                fetch(&system_config_maps, objects::COREDNS_CUSTOM_CONFIG_MAP),
            )
        };
    let server = dns_server.or_else(|| {
        let ip: IpAddr = dns_service
            .as_ref()
            .ok()?
            .as_ref()?
            .spec
            .as_ref()?
            .cluster_ip
            .as_deref()?
            .parse()
            .ok()?;
        Some(SocketAddr::new(ip, 53))
    });
    let dns = match server {
        Some(s) => Some(probe_dns(s, DNS_TIMEOUT).await),
        None => None,
    };
    CheckInputs {
        api,
        namespace: namespace.to_string(),
        issuer_secret: issuer_secret.to_string(),
        crds,
        config,
        deployment,
        gateway_service,
        dns_service,
        links,
        issuer,
        dns,
        coredns,
        coredns_custom: custom,
    }
}

/// How long `strait check` waits for a DNS answer, per transport.
pub const DNS_TIMEOUT: Duration = Duration::from_secs(2);

/// A `dns-version.clusterset.local` TXT query: its id and wire bytes.
pub fn dns_version_query() -> Result<(u16, Vec<u8>), String> {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RecordType};
    let name = Name::from_ascii(objects::DNS_VERSION_NAME).map_err(|e| e.to_string())?;
    let mut message = Message::query();
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(name, RecordType::TXT));
    let id = message.metadata.id;
    Ok((id, message.to_vec().map_err(|e| e.to_string())?))
}

/// The TXT strings of a reply to the query with `id` (pure); `Err` for
/// another id, an error rcode or bytes that are not DNS.
pub fn parse_txt_reply(id: u16, bytes: &[u8]) -> Result<Vec<String>, String> {
    use hickory_proto::op::{Message, ResponseCode};
    use hickory_proto::rr::RData;
    let m = Message::from_vec(bytes).map_err(|e| format!("not a DNS reply: {e}"))?;
    if m.metadata.id != id {
        return Err(format!("reply id {} for query {id}", m.metadata.id));
    }
    if m.metadata.response_code != ResponseCode::NoError {
        return Err(format!("rcode {}", m.metadata.response_code));
    }
    Ok(m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::TXT(t) => Some(
                t.txt_data
                    .iter()
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect::<String>(),
            ),
            _ => None,
        })
        .collect())
}

async fn query_udp(server: SocketAddr, wait: Duration) -> Result<Vec<String>, String> {
    let (id, query) = dns_version_query()?;
    let bind: SocketAddr = if server.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let exchange = async {
        let socket = tokio::net::UdpSocket::bind(bind)
            .await
            .map_err(|e| format!("bind: {e}"))?;
        socket
            .connect(server)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        socket
            .send(&query)
            .await
            .map_err(|e| format!("send: {e}"))?;
        let mut buf = vec![0u8; 4096];
        loop {
            let n = socket.recv(&mut buf).await.map_err(|e| format!("{e}"))?;
            match parse_txt_reply(id, &buf[..n]) {
                // A stray datagram: keep waiting for ours.
                Err(e) if e.starts_with("reply id") => continue,
                other => return other,
            }
        }
    };
    tokio::time::timeout(wait, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {wait:?}")))
}

async fn query_tcp(server: SocketAddr, wait: Duration) -> Result<Vec<String>, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (id, query) = dns_version_query()?;
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(server)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let len = u16::try_from(query.len()).map_err(|_| "query too long".to_string())?;
        let mut frame = len.to_be_bytes().to_vec();
        frame.extend_from_slice(&query);
        stream
            .write_all(&frame)
            .await
            .map_err(|e| format!("send: {e}"))?;
        let mut len = [0u8; 2];
        stream
            .read_exact(&mut len)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream
            .read_exact(&mut reply)
            .await
            .map_err(|e| format!("read: {e}"))?;
        parse_txt_reply(id, &reply)
    };
    tokio::time::timeout(wait, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {wait:?}")))
}

/// Asks `server` for `dns-version.clusterset.local` TXT over UDP and TCP
/// at once, each within `wait` (I/O; never hangs).
pub async fn probe_dns(server: SocketAddr, wait: Duration) -> DnsProbe {
    let (udp, tcp) = tokio::join!(query_udp(server, wait), query_tcp(server, wait));
    DnsProbe { server, udp, tcp }
}

/// A kube client from the kubeconfig (`KUBECONFIG` or `~/.kube/config`;
/// `context` picks a context, default the current one; without a
/// kubeconfig and `context`, in-cluster credentials); requests time out after 15 s so a command never hangs.
pub async fn client(context: Option<&str>) -> Result<kube::Client, CtlError> {
    strait_proxy::tls::install_default_provider();
    let mut config = match context {
        Some(context) => {
            let options = kube::config::KubeConfigOptions {
                context: Some(context.to_string()),
                ..Default::default()
            };
            kube::Config::from_kubeconfig(&options)
                .await
                .map_err(|e| CtlError::Kubeconfig(format!("context {context}: {e}")))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| CtlError::Kubeconfig(e.to_string()))?,
    };
    config.read_timeout = Some(Duration::from_secs(15));
    config.connect_timeout = Some(Duration::from_secs(10));
    kube::Client::try_from(config).map_err(|e| CtlError::Kubeconfig(e.to_string()))
}
