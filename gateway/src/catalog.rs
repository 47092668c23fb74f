//! The cluster-state model and the export catalog, as plain data with pure
//! functions over it: what a cluster has ([`ClusterState`]), what it exports
//! to peers ([`Export`]), the delta between two catalogs, and conversions to
//! and from the peering wire types (which validate everything a peer sends).

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use strait_proto::peer::v1 as pb;
use strait_proxy::identity::SpiffeId;

/// A service's namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct ServiceKey {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Service name.
    pub name: String,
}

impl ServiceKey {
    /// A key from parts (not validated; see [`validate_label`]).
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// How a service is addressed across the clusterset (MCS API).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ServiceType {
    /// One virtual IP for the whole clusterset.
    #[default]
    #[serde(rename = "ClusterSetIP")]
    ClusterSetIp,
    /// No virtual IP; per-endpoint records.
    Headless,
}

/// A port's transport protocol.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// TCP (the only protocol the tunnel carries today).
    #[default]
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Protocol {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "TCP" | "" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            _ => None,
        }
    }
}

/// A service port.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Port {
    /// Port name (may be empty for a single unnamed port).
    pub name: String,
    /// Port number.
    pub port: u16,
    /// Transport protocol.
    pub protocol: Protocol,
    /// Application protocol hint (`http`, `kubernetes.io/h2c`, `grpc`...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
}

/// One backend of a local service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Name (pod name, or anything unique in the service).
    pub name: String,
    /// Address.
    pub ip: IpAddr,
    /// Target port per service port name; a port not listed uses the
    /// service port number.
    pub target_ports: BTreeMap<String, u16>,
    /// Whether the endpoint takes traffic.
    pub ready: bool,
    /// The SPIFFE ID of the endpoint's proxy, when it is meshed (served to
    /// sidecars by [`crate::destination`], so they speak mTLS to it).
    pub identity: Option<SpiffeId>,
}

impl Endpoint {
    /// The address this endpoint serves `port` on.
    pub fn target(&self, port: &Port) -> std::net::SocketAddr {
        let p = self
            .target_ports
            .get(&port.name)
            .copied()
            .unwrap_or(port.port);
        (self.ip, p).into()
    }
}

/// A service in the local cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalService {
    /// Namespace and name.
    pub key: ServiceKey,
    /// ClusterSetIP or Headless.
    pub service_type: ServiceType,
    /// Ports.
    pub ports: Vec<Port>,
    /// Backends.
    pub endpoints: Vec<Endpoint>,
    /// Whether the service is exported to linked peers.
    pub exported: bool,
}

/// Everything the gateway knows of its own cluster: the output of a
/// cluster source (file or Kubernetes).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterState {
    /// Services by key.
    pub services: BTreeMap<ServiceKey, LocalService>,
}

/// A service as peers see it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Export {
    /// Namespace and name.
    pub key: ServiceKey,
    /// ClusterSetIP or Headless.
    pub service_type: ServiceType,
    /// Ports.
    pub ports: Vec<Port>,
}

/// A cluster's export catalog.
pub type Catalog = BTreeMap<ServiceKey, Export>;

impl ClusterState {
    /// The exported services, as peers see them.
    pub fn catalog(&self) -> Catalog {
        self.services
            .values()
            .filter(|s| s.exported)
            .map(|s| {
                (
                    s.key.clone(),
                    Export {
                        key: s.key.clone(),
                        service_type: s.service_type,
                        ports: s.ports.clone(),
                    },
                )
            })
            .collect()
    }

    /// The exported service `key`, if it is exported.
    pub fn exported(&self, key: &ServiceKey) -> Option<&LocalService> {
        self.services.get(key).filter(|s| s.exported)
    }
}

/// The changes that turn catalog `old` into `new`.
pub fn diff(old: &Catalog, new: &Catalog) -> (Vec<Export>, Vec<ServiceKey>) {
    let upserted = new
        .iter()
        .filter(|(k, v)| old.get(*k) != Some(*v))
        .map(|(_, v)| v.clone())
        .collect();
    let removed = old
        .keys()
        .filter(|k| !new.contains_key(*k))
        .cloned()
        .collect();
    (upserted, removed)
}

/// Why a name or a received export is invalid.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvalidExport {
    /// Not an RFC 1123 DNS label.
    #[error("{what} {value:?} is not a DNS label (1-63 of a-z, 0-9, '-', starting and ending alphanumeric)")]
    Label {
        /// Which field.
        what: &'static str,
        /// The value.
        value: String,
    },
    /// Port 0 or over 65535.
    #[error("port {0} out of range")]
    PortRange(u32),
    /// Unknown protocol.
    #[error("unknown protocol {0:?}")]
    Protocol(String),
    /// Two ports with the same number and protocol, or the same name.
    #[error("duplicate port {0}")]
    DuplicatePort(String),
    /// No ports.
    #[error("service has no ports")]
    NoPorts,
    /// More than [`MAX_PORTS`] ports.
    #[error("{0} ports is more than the {MAX_PORTS} allowed")]
    TooManyPorts(usize),
    /// An `appProtocol` Kubernetes would not take.
    #[error("appProtocol {0:?} is not a qualified name (an IANA service name or <domain>/<name>, at most 63 characters after the domain)")]
    AppProtocol(String),
}

/// The start of a refused value, for its error: a peer's value may be of
/// any length.
fn shown(value: &str) -> String {
    const SHOWN: usize = 64;
    match value.char_indices().nth(SHOWN) {
        Some((end, _)) => format!("{}...", &value[..end]),
        None => value.to_string(),
    }
}

/// Whether `value` is a Kubernetes qualified name (what `appProtocol`
/// must be): a name of 1-63 of `A-Za-z0-9-_.`, alphanumeric at both ends,
/// optionally after a DNS subdomain and `/`.
pub fn is_qualified_name(value: &str) -> bool {
    let (prefix, name) = match value.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, value),
    };
    let b = name.as_bytes();
    let name_ok = !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric();
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty() && p.len() <= 253 && p.split('.').all(|l| validate_label("domain", l).is_ok())
    });
    name_ok && prefix_ok
}

/// Checks an RFC 1123 label (Kubernetes names of namespaces and services).
pub fn validate_label(what: &'static str, value: &str) -> Result<(), InvalidExport> {
    let b = value.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-';
    if ok {
        Ok(())
    } else {
        Err(InvalidExport::Label {
            what,
            value: shown(value),
        })
    }
}

/// Most ports one service may have: each is a listener on every importing
/// gateway, so a peer must not be able to ask for thousands.
pub const MAX_PORTS: usize = 100;

/// Checks a list of ports: one to [`MAX_PORTS`], numbers in range, no
/// duplicate (number, protocol) or name.
pub fn validate_ports(ports: &[Port]) -> Result<(), InvalidExport> {
    if ports.is_empty() {
        return Err(InvalidExport::NoPorts);
    }
    if ports.len() > MAX_PORTS {
        return Err(InvalidExport::TooManyPorts(ports.len()));
    }
    let mut seen = std::collections::HashSet::new();
    let mut names = std::collections::HashSet::new();
    for p in ports {
        if p.port == 0 {
            return Err(InvalidExport::PortRange(0));
        }
        if !seen.insert((p.port, p.protocol)) {
            return Err(InvalidExport::DuplicatePort(p.port.to_string()));
        }
        if !p.name.is_empty() {
            validate_label("port name", &p.name)?;
            if !names.insert(p.name.as_str()) {
                return Err(InvalidExport::DuplicatePort(p.name.clone()));
            }
        }
        if let Some(a) = p.app_protocol.as_deref().filter(|a| !is_qualified_name(a)) {
            return Err(InvalidExport::AppProtocol(shown(a)));
        }
    }
    Ok(())
}

impl From<&Export> for pb::Export {
    fn from(e: &Export) -> Self {
        pb::Export {
            namespace: e.key.namespace.clone(),
            name: e.key.name.clone(),
            r#type: match e.service_type {
                ServiceType::ClusterSetIp => pb::ServiceType::ClusterSetIp,
                ServiceType::Headless => pb::ServiceType::Headless,
            } as i32,
            ports: e
                .ports
                .iter()
                .map(|p| pb::Port {
                    name: p.name.clone(),
                    port: u32::from(p.port),
                    protocol: p.protocol.as_str().to_string(),
                    app_protocol: p.app_protocol.clone().unwrap_or_default(),
                })
                .collect(),
        }
    }
}

impl TryFrom<&pb::Export> for Export {
    type Error = InvalidExport;

    fn try_from(e: &pb::Export) -> Result<Self, Self::Error> {
        validate_label("namespace", &e.namespace)?;
        validate_label("service name", &e.name)?;
        let service_type = match pb::ServiceType::try_from(e.r#type) {
            Ok(pb::ServiceType::Headless) => ServiceType::Headless,
            _ => ServiceType::ClusterSetIp,
        };
        let ports = e
            .ports
            .iter()
            .map(|p| {
                let port = u16::try_from(p.port).map_err(|_| InvalidExport::PortRange(p.port))?;
                Ok(Port {
                    name: p.name.clone(),
                    port,
                    protocol: Protocol::parse(&p.protocol)
                        .ok_or_else(|| InvalidExport::Protocol(shown(&p.protocol)))?,
                    app_protocol: (!p.app_protocol.is_empty()).then(|| p.app_protocol.clone()),
                })
            })
            .collect::<Result<Vec<_>, InvalidExport>>()?;
        validate_ports(&ports)?;
        Ok(Export {
            key: ServiceKey::new(&e.namespace, &e.name),
            service_type,
            ports,
        })
    }
}

impl From<&pb::ExportKey> for ServiceKey {
    fn from(k: &pb::ExportKey) -> Self {
        ServiceKey::new(&k.namespace, &k.name)
    }
}

impl From<&ServiceKey> for pb::ExportKey {
    fn from(k: &ServiceKey) -> Self {
        pb::ExportKey {
            namespace: k.namespace.clone(),
            name: k.name.clone(),
        }
    }
}

#[cfg(test)]
mod tests;
