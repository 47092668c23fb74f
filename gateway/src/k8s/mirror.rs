//! The mirror: what an import becomes in the cluster, planned by pure
//! functions and written by server-side apply.
//!
//! For each import `<svc>` in `<ns>`:
//! - a `ServiceImport` `<svc>` (MCS API): type, merged ports, the clusterset
//!   IP, the exporting clusters;
//! - a clusterset Service `<svc>-clusterset` with a ClusterIP: the gateway
//!   balances its connections across every exporting cluster;
//! - a mirror Service `<svc>-<cluster>` per exporting cluster, pinned to
//!   that cluster;
//! - an EndpointSlice per Service listing the ready gateway pods, on the
//!   egress port allocated for that (Service, port). Every gateway replica
//!   listens on every allocation ([`listeners`]), so any pod may take the
//!   connection.
//!
//! Allocations live on the Services themselves (annotation
//! [`labels::EGRESS_PORTS`]): the API server is the only state, a restarted
//! or newly elected writer keeps every port, and followers learn them by
//! watching.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::ops::RangeInclusive;

use k8s_openapi::api::core::v1::{Service, ServicePort as KubeServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{
    Endpoint as SliceEndpoint, EndpointConditions, EndpointPort, EndpointSlice,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::crd::{
    ClusterStatus, Condition, ServiceImport, ServiceImportSpec, ServiceImportStatus, ServicePort,
};
use super::{labels, names};
use crate::catalog::{Catalog, ClusterState, ServiceKey, ServiceType};
use crate::imports::{tcp_ports, Import, ImportTable};

pub mod writer;

/// One egress allocation: an imported service's port, optionally pinned to
/// one exporting cluster (the `<svc>-<cluster>` mirror).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AllocKey {
    /// The imported service.
    pub service: ServiceKey,
    /// `None` for the clusterset Service, else the pinned cluster.
    pub pin: Option<String>,
    /// The service port.
    pub port: u16,
}

/// Egress port by allocation.
pub type Allocations = BTreeMap<AllocKey, u16>;

/// The allocations an import table needs (pure).
pub fn wanted(table: &ImportTable) -> BTreeSet<AllocKey> {
    let mut out = BTreeSet::new();
    for import in table.values() {
        for p in tcp_ports(import) {
            out.insert(AllocKey {
                service: import.key.clone(),
                pin: None,
                port: p.port,
            });
            for peer in import.peers_for(p.port) {
                out.insert(AllocKey {
                    service: import.key.clone(),
                    pin: Some(peer),
                    port: p.port,
                });
            }
        }
    }
    out
}

/// Keeps every current allocation that is still wanted (and valid: in the
/// range, not a duplicate) and gives each new key the lowest free port. A
/// port still recorded on a Service counts as taken even when its key is no
/// longer wanted: it is reused only after that Service is gone, so no
/// kube-proxy rule or replica's listener can still lead to it. Returns the
/// allocations and the keys the range had no room for (pure).
pub fn allocate(
    current: &Allocations,
    wanted: &BTreeSet<AllocKey>,
    range: RangeInclusive<u16>,
) -> (Allocations, Vec<AllocKey>) {
    let mut out = Allocations::new();
    let mut used: BTreeSet<u16> = current.values().copied().collect();
    let mut kept = BTreeSet::new();
    for (key, port) in current {
        if wanted.contains(key) && range.contains(port) && kept.insert(*port) {
            out.insert(key.clone(), *port);
        }
    }
    let mut exhausted = Vec::new();
    // u32: stepping past 65535 must not overflow.
    let (mut next, end) = (u32::from(*range.start()), u32::from(*range.end()));
    for key in wanted {
        if out.contains_key(key) {
            continue;
        }
        while next <= end && u16::try_from(next).is_ok_and(|p| used.contains(&p)) {
            next += 1;
        }
        let Some(port) = u16::try_from(next).ok().filter(|_| next <= end) else {
            exhausted.push(key.clone());
            continue;
        };
        used.insert(port);
        out.insert(key.clone(), port);
    }
    (out, exhausted)
}

/// `80=20001,443=20002` (the [`labels::EGRESS_PORTS`] annotation).
pub fn format_egress_ports(ports: &BTreeMap<u16, u16>) -> String {
    ports
        .iter()
        .map(|(p, e)| format!("{p}={e}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses [`format_egress_ports`]; malformed pairs (and port 0) are
/// skipped (the writer rewrites them).
pub fn parse_egress_ports(s: &str) -> BTreeMap<u16, u16> {
    use strait_proxy::net::port_number;
    s.split(',')
        .filter_map(|pair| {
            let (p, e) = pair.trim().split_once('=')?;
            Some((port_number(p)?, port_number(e)?))
        })
        .collect()
}

/// Whether a Service is one Strait wrote for an import: Strait's labels,
/// and — where the server tracks field managers, as every real one does —
/// fields written by the `strait` manager (labels alone could be copied
/// onto any Service by whoever may create one, and feed it allocations).
pub fn is_ours(svc: &Service) -> bool {
    let l = svc.metadata.labels.as_ref();
    let labelled = l
        .and_then(|l| l.get(labels::MANAGED_BY))
        .map(String::as_str)
        == Some(labels::MANAGER)
        && l.is_some_and(|l| l.contains_key(labels::MIRROR));
    let managed = svc.metadata.managed_fields.as_ref().is_none_or(|m| {
        m.is_empty()
            || m.iter()
                .any(|f| f.manager.as_deref() == Some(labels::MANAGER))
    });
    labelled && managed
}

/// What the mirror Services in the cluster say: their allocations and the
/// clusterset Services' ClusterIPs (read by every replica).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// Egress ports recorded on the Services.
    pub allocations: Allocations,
    /// The ClusterIP of each import's clusterset Service.
    pub clusterset_ips: BTreeMap<ServiceKey, IpAddr>,
}

/// The egress listeners the mirror Services' allocations call for (pure):
/// one per allocation of an import this gateway serves, on a port in the
/// egress range. The leader's writer allocates only in the range, so a
/// port outside it (an annotation edited by hand, an old range) waits for
/// the writer to set it right; a port recorded by two Services carries
/// neither until then.
pub fn listeners(
    observed: &Observed,
    table: &ImportTable,
    listen: std::net::IpAddr,
    range: &std::ops::RangeInclusive<u16>,
) -> std::collections::HashMap<std::net::SocketAddr, crate::egress::EgressTarget> {
    let mut listeners = std::collections::HashMap::new();
    let mut clashing = Vec::new();
    for (k, port) in &observed.allocations {
        let served = table.get(&k.service).is_some_and(|i| {
            i.peers_for(k.port)
                .iter()
                .any(|p| k.pin.as_ref().is_none_or(|pin| pin == p))
        });
        if !served || !range.contains(port) {
            continue;
        }
        let target = crate::egress::EgressTarget {
            key: k.service.clone(),
            port: k.port,
            pin: k.pin.clone(),
        };
        if listeners
            .insert(std::net::SocketAddr::new(listen, *port), target)
            .is_some()
        {
            clashing.push(*port);
        }
    }
    for port in clashing {
        listeners.remove(&std::net::SocketAddr::new(listen, port));
        tracing::warn!(
            port,
            "two mirror Services record one egress port; serving neither"
        );
    }
    listeners
}

/// The names a mirror Service's ports go by (and its EndpointSlices'): as
/// exported, except that a Service of several ports needs every port
/// named, each once, or the API server refuses it. A port with no name, or
/// with one an earlier port took (two peers naming one service's ports
/// differently: `80` unnamed in one cluster, `http: 80` and `metrics: 9090`
/// in another), is called `tcp-<port>`.
fn service_port_names(ports: &[(&crate::catalog::Port, u16)]) -> Vec<String> {
    if let [(only, _)] = ports {
        return vec![only.name.clone()];
    }
    let mut used = BTreeSet::new();
    ports
        .iter()
        .map(|(p, _)| {
            let mut name = p.name.clone();
            if name.is_empty() || used.contains(&name) {
                name = format!("tcp-{}", p.port);
                let mut n = 1;
                while used.contains(&name) {
                    name = format!("tcp-{}-{n}", p.port);
                    n += 1;
                }
            }
            used.insert(name.clone());
            name
        })
        .collect()
}

/// Reads allocations and ClusterIPs back from Services (pure).
pub fn observe<'a>(services: impl IntoIterator<Item = &'a Service>) -> Observed {
    let mut out = Observed::default();
    for svc in services.into_iter().filter(|s| is_ours(s)) {
        let meta = &svc.metadata;
        let (Some(ns), Some(l)) = (meta.namespace.as_ref(), meta.labels.as_ref()) else {
            continue;
        };
        let (Some(name), Some(mirror)) = (l.get(labels::MCS_SERVICE_NAME), l.get(labels::MIRROR))
        else {
            continue;
        };
        let key = ServiceKey::new(ns, name);
        let pin = (mirror != labels::CLUSTERSET).then(|| mirror.clone());
        if let Some(a) = meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(labels::EGRESS_PORTS))
        {
            for (port, egress) in parse_egress_ports(a) {
                out.allocations.insert(
                    AllocKey {
                        service: key.clone(),
                        pin: pin.clone(),
                        port,
                    },
                    egress,
                );
            }
        }
        if pin.is_none() {
            let ip = svc.spec.as_ref().and_then(|s| s.cluster_ip.as_ref());
            if let Some(ip) = ip.and_then(|ip| ip.parse().ok()) {
                out.clusterset_ips.insert(key, ip);
            }
        }
    }
    out
}

/// Everything the mirror should hold.
#[derive(Clone, Debug, Default)]
pub struct Desired {
    /// ServiceImports.
    pub imports: Vec<ServiceImport>,
    /// Clusterset and mirror Services, each after its ServiceImport's
    /// position (the writer sets owner references in this order).
    pub services: Vec<Service>,
    /// EndpointSlices, by the name of the Service they belong to.
    pub slices: Vec<(String, EndpointSlice)>,
    /// Service names two imports would both take (`api` from `prod-east`
    /// and `api-prod` from `east` are both `api-prod-east`): the first by
    /// import and cluster name keeps it, the other is not written.
    pub collisions: Vec<String>,
}

fn meta(ns: &str, name: &str, service: &str, mirror: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(ns.to_string()),
        labels: Some(
            [
                (labels::MANAGED_BY, labels::MANAGER),
                (labels::MIRROR, mirror),
                (labels::MCS_SERVICE_NAME, service),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ),
        ..Default::default()
    }
}

/// Plans the mirror of an import table (pure). Allocations missing for a
/// port leave that port out until they exist; ready gateway pod addresses
/// become the endpoints.
pub fn plan(
    table: &ImportTable,
    allocations: &Allocations,
    clusterset_ips: &BTreeMap<ServiceKey, IpAddr>,
    gateways: &[IpAddr],
) -> Desired {
    let mut out = Desired::default();
    let mut taken: BTreeMap<(String, String), (ServiceKey, Option<String>)> = BTreeMap::new();
    for import in table.values() {
        out.imports.push(service_import(import, clusterset_ips));
        let pins = std::iter::once(None).chain(import.peers.iter().cloned().map(Some));
        for pin in pins {
            let (name, mirror) = match &pin {
                None => (names::clusterset(&import.key.name), labels::CLUSTERSET),
                Some(c) => (names::mirror(&import.key.name, c), c.as_str()),
            };
            let ports: Vec<(&crate::catalog::Port, u16)> = tcp_ports(import)
                .filter(|p| {
                    pin.as_ref()
                        .is_none_or(|c| import.peers_for(p.port).contains(c))
                })
                .filter_map(|p| {
                    let key = AllocKey {
                        service: import.key.clone(),
                        pin: pin.clone(),
                        port: p.port,
                    };
                    allocations.get(&key).map(|e| (p, *e))
                })
                .collect();
            if ports.is_empty() {
                continue;
            }
            let ns = &import.key.namespace;
            let owner = (import.key.clone(), pin.clone());
            match taken.get(&(ns.clone(), name.clone())) {
                Some(first) if *first != owner => {
                    out.collisions.push(format!(
                        "Service {ns}/{name} is wanted by {}{} and by {}{}: kept for the first",
                        first.0,
                        first
                            .1
                            .as_deref()
                            .map(|c| format!(" from {c}"))
                            .unwrap_or_default(),
                        import.key,
                        pin.as_deref()
                            .map(|c| format!(" from {c}"))
                            .unwrap_or_default(),
                    ));
                    continue;
                }
                _ => {
                    taken.insert((ns.clone(), name.clone()), owner);
                }
            }
            let port_names = service_port_names(&ports);
            let mut m = meta(ns, &name, &import.key.name, mirror);
            let egress: BTreeMap<u16, u16> = ports.iter().map(|(p, e)| (p.port, *e)).collect();
            m.annotations = Some(BTreeMap::from([(
                labels::EGRESS_PORTS.to_string(),
                format_egress_ports(&egress),
            )]));
            out.services.push(Service {
                metadata: m,
                spec: Some(ServiceSpec {
                    type_: Some("ClusterIP".into()),
                    ports: Some(
                        ports
                            .iter()
                            .zip(&port_names)
                            .map(|((p, e), name)| KubeServicePort {
                                name: (!name.is_empty()).then(|| name.clone()),
                                port: i32::from(p.port),
                                target_port: Some(IntOrString::Int(i32::from(*e))),
                                protocol: Some("TCP".into()),
                                app_protocol: p.app_protocol.clone(),
                                ..Default::default()
                            })
                            .collect(),
                    ),
                    ..Default::default()
                }),
                status: None,
            });
            for (family, ips) in families(gateways) {
                let mut m = meta(ns, &name, &import.key.name, mirror);
                if family == "IPv6" {
                    m.name = Some(format!("{name}-ipv6"));
                }
                let l = m.labels.get_or_insert_with(Default::default);
                l.insert(labels::SERVICE_NAME_K8S.into(), name.clone());
                l.insert(
                    labels::SLICE_MANAGED_BY.into(),
                    labels::SLICE_MANAGER.into(),
                );
                if let Some(c) = &pin {
                    l.insert(labels::MCS_SOURCE_CLUSTER.into(), c.clone());
                }
                out.slices.push((
                    name.clone(),
                    EndpointSlice {
                        metadata: m,
                        address_type: family.into(),
                        endpoints: Some(
                            ips.iter()
                                .map(|ip| SliceEndpoint {
                                    addresses: vec![ip.to_string()],
                                    conditions: Some(EndpointConditions {
                                        ready: Some(true),
                                        serving: Some(true),
                                        terminating: Some(false),
                                    }),
                                    ..Default::default()
                                })
                                .collect(),
                        ),
                        ports: Some(
                            ports
                                .iter()
                                .zip(&port_names)
                                .map(|((p, e), name)| EndpointPort {
                                    name: Some(name.clone()),
                                    port: Some(i32::from(*e)),
                                    protocol: Some("TCP".into()),
                                    app_protocol: p.app_protocol.clone(),
                                })
                                .collect(),
                        ),
                    },
                ));
            }
        }
    }
    out
}

/// Gateway addresses by EndpointSlice address type; IPv4 always present
/// (an empty slice says "no ready gateway" rather than nothing at all).
fn families(gateways: &[IpAddr]) -> Vec<(&'static str, Vec<IpAddr>)> {
    let mut v4: Vec<IpAddr> = gateways.iter().copied().filter(IpAddr::is_ipv4).collect();
    let mut v6: Vec<IpAddr> = gateways.iter().copied().filter(IpAddr::is_ipv6).collect();
    v4.sort();
    v4.dedup();
    v6.sort();
    v6.dedup();
    let mut out = vec![("IPv4", v4)];
    if !v6.is_empty() {
        out.push(("IPv6", v6));
    }
    out
}

fn service_import(import: &Import, ips: &BTreeMap<ServiceKey, IpAddr>) -> ServiceImport {
    let mut si = ServiceImport::new(
        &import.key.name,
        ServiceImportSpec {
            ips: ips
                .get(&import.key)
                .map(|ip| vec![ip.to_string()])
                .unwrap_or_default(),
            type_: match import.service_type {
                ServiceType::ClusterSetIp => "ClusterSetIP".into(),
                ServiceType::Headless => "Headless".into(),
            },
            ports: import
                .ports
                .iter()
                .map(|p| ServicePort {
                    name: p.name.clone(),
                    protocol: p.protocol.as_str().into(),
                    app_protocol: p.app_protocol.clone(),
                    port: p.port,
                })
                .collect(),
            session_affinity: None,
        },
    );
    si.metadata = meta(
        &import.key.namespace,
        &import.key.name,
        &import.key.name,
        labels::CLUSTERSET,
    );
    si.status = Some(ServiceImportStatus {
        clusters: import
            .peers
            .iter()
            .map(|c| ClusterStatus { cluster: c.clone() })
            .collect(),
    });
    si
}

/// A condition as computed, before its transition time is known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewCondition {
    /// Type.
    pub type_: &'static str,
    /// `True` or `False`.
    pub status: bool,
    /// Reason.
    pub reason: &'static str,
    /// Message.
    pub message: String,
}

/// A ServiceExport's conditions by the MCS rules (pure): `Valid` when the
/// Service exists and can be exported; `Conflict` when a peer exports the
/// same service with another type, or the same port number with another
/// protocol or name (the local definition is still used here; the peer's
/// differing ports are merged by the oldest-name-wins rule of
/// [`crate::imports::plan`]).
pub fn export_conditions(
    key: &ServiceKey,
    local: &ClusterState,
    skipped: Option<&str>,
    peers: &BTreeMap<String, Catalog>,
) -> Vec<NewCondition> {
    let Some(svc) = local.services.get(key) else {
        let (reason, message) = match skipped {
            Some(why) => (
                "InvalidService",
                format!("Service {key} cannot be exported: {why}"),
            ),
            None => ("NoService", format!("Service {key} does not exist")),
        };
        return vec![
            NewCondition {
                type_: "Valid",
                status: false,
                reason,
                message,
            },
            NewCondition {
                type_: "Conflict",
                status: false,
                reason: "NoConflicts",
                message: String::new(),
            },
        ];
    };
    let mut conflicts = Vec::new();
    let mut reason = "NoConflicts";
    for (peer, catalog) in peers {
        let Some(theirs) = catalog.get(key) else {
            continue;
        };
        if theirs.service_type != svc.service_type {
            reason = "ConflictingType";
            conflicts.push(format!("{peer} exports it as {:?}", theirs.service_type));
        }
        for p in &theirs.ports {
            if let Some(q) = svc.ports.iter().find(|q| q.port == p.port) {
                if q.protocol != p.protocol || q.name != p.name {
                    if reason == "NoConflicts" {
                        reason = "ConflictingPorts";
                    }
                    conflicts.push(format!(
                        "{peer} exports port {} as {}/{:?}",
                        p.port,
                        p.protocol.as_str(),
                        p.name
                    ));
                }
            }
        }
    }
    vec![
        NewCondition {
            type_: "Valid",
            status: true,
            reason: "Exported",
            message: format!("Service {key} is exported to linked clusters"),
        },
        NewCondition {
            type_: "Conflict",
            status: !conflicts.is_empty(),
            reason,
            message: conflicts.join("; "),
        },
    ]
}

/// Stamps computed conditions with transition times, keeping an old
/// condition's time when its status did not change (pure).
pub fn merge_conditions(old: &[Condition], new: &[NewCondition], now: &str) -> Vec<Condition> {
    new.iter()
        .map(|n| {
            let status = if n.status { "True" } else { "False" };
            let since = old
                .iter()
                .find(|o| o.type_ == n.type_ && o.status == status)
                .map(|o| o.last_transition_time.clone())
                .unwrap_or_else(|| now.to_string());
            Condition {
                type_: n.type_.into(),
                status: status.into(),
                reason: n.reason.into(),
                message: n.message.clone(),
                last_transition_time: since,
                observed_generation: None,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests;
