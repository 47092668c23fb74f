//! The immutable `clusterset.local` zone snapshot and the pure function that
//! builds it from imported services.
//!
//! Nothing in here does I/O: [`Zone::build`] turns a list of
//! [`ServiceRecord`]s into a fully indexed snapshot, and [`Zone::lookup`]
//! answers a question from it. The DNS server only translates a [`Lookup`]
//! into a wire response.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use hickory_proto::rr::rdata::{A, AAAA, NS, SOA, SRV, TXT};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_proto::ProtoError;

#[cfg(test)]
mod tests;
mod zonefile;

/// Negative-caching TTL (the SOA `minimum`), in seconds.
pub const NEGATIVE_TTL: u32 = 5;

/// Value of the `dns-version.<origin>` TXT record (the MCS DNS schema version).
pub const SCHEMA_VERSION: &str = "1.0.0";

/// SOA refresh, in seconds (no secondaries are expected; CoreDNS uses the same values).
const SOA_REFRESH: i32 = 7200;
/// SOA retry, in seconds.
const SOA_RETRY: i32 = 1800;
/// SOA expire, in seconds.
const SOA_EXPIRE: i32 = 86400;

/// SRV priority of every generated SRV record.
const SRV_PRIORITY: u16 = 0;
/// SRV weight of every generated SRV record.
const SRV_WEIGHT: u16 = 100;

/// Transport protocol of a service port; selects the `_tcp`/`_udp`/`_sctp`
/// label of its SRV name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PortProtocol {
    /// TCP (`_tcp`).
    Tcp,
    /// UDP (`_udp`).
    Udp,
    /// SCTP (`_sctp`).
    Sctp,
}

impl PortProtocol {
    /// The SRV protocol label for this protocol, e.g. `_tcp`.
    pub fn srv_label(self) -> &'static str {
        match self {
            PortProtocol::Tcp => "_tcp",
            PortProtocol::Udp => "_udp",
            PortProtocol::Sctp => "_sctp",
        }
    }
}

/// One port of an imported service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// Port name (a lowercase DNS label of at most 62 octets, usually an
    /// IANA service name). An empty name means the port is
    /// unnamed: it then only appears in the SRV set at the service name.
    pub name: String,
    /// Port number.
    pub port: u16,
    /// Transport protocol.
    pub protocol: PortProtocol,
}

/// Kind of an imported service (KEP-1645 `ServiceImport.spec.type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ServiceKind {
    /// A service with cluster-set virtual IPs.
    ClusterSetIp,
    /// A headless service: the service name answers every endpoint's
    /// addresses, each endpoint has `<hostname>.<clusterid>.<svc>.<ns>...`,
    /// and SRV records point at those per-endpoint names.
    Headless,
}

/// One endpoint of a headless service, in one cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeadlessEndpoint {
    /// The cluster the endpoint lives in (a lowercase DNS label).
    pub cluster: String,
    /// The endpoint's hostname (a lowercase DNS label); when absent, the
    /// address with dots or colons replaced by dashes stands in, as in
    /// CoreDNS.
    pub hostname: Option<String>,
    /// The endpoint's addresses.
    pub ips: Vec<IpAddr>,
}

impl HeadlessEndpoint {
    /// The label naming the endpoint within its cluster.
    pub fn label(&self) -> String {
        match (&self.hostname, self.ips.first()) {
            (Some(h), _) => h.clone(),
            (None, Some(ip)) => ip.to_string().replace(['.', ':'], "-"),
            (None, None) => String::new(),
        }
    }
}

/// An imported service as the zone sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRecord {
    /// Namespace of the service (a lowercase RFC 1123 DNS label).
    pub namespace: String,
    /// Name of the service (a lowercase RFC 1123 DNS label).
    pub name: String,
    /// Service kind.
    pub kind: ServiceKind,
    /// Addresses served as A (IPv4) and AAAA (IPv6) records at the service name.
    pub ips: Vec<IpAddr>,
    /// Ports served as SRV records.
    pub ports: Vec<ServicePort>,
    /// Headless services only: the endpoints, from every exporting cluster.
    /// The service name answers all their addresses (and `ips` too, if
    /// any). Ignored for `ClusterSetIp` services.
    pub endpoints: Vec<HeadlessEndpoint>,
}

/// Reasons [`Zone::build`] rejects its input.
#[derive(Debug, thiserror::Error)]
pub enum ZoneError {
    /// The origin is not a valid, non-root domain name.
    #[error("invalid zone origin {origin:?}: {reason}")]
    InvalidOrigin {
        /// The origin as given.
        origin: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A namespace, service or port name is not a lowercase DNS label.
    #[error("invalid {field} {value:?} in service {namespace}/{name}: not a lowercase RFC 1123 DNS label")]
    InvalidLabel {
        /// Which field was invalid (`namespace`, `name`, `port name`, `cluster`
        /// or `hostname`).
        field: &'static str,
        /// The invalid value.
        value: String,
        /// Namespace of the offending service, as given.
        namespace: String,
        /// Name of the offending service, as given.
        name: String,
    },
    /// The same namespace/name pair appears twice.
    #[error("duplicate service {namespace}/{name}")]
    DuplicateService {
        /// Namespace of the duplicate service.
        namespace: String,
        /// Name of the duplicate service.
        name: String,
    },
    /// A record name could not be formed (e.g. longer than 255 octets).
    #[error("cannot form a record name for service {namespace}/{name}: {source}")]
    Name {
        /// Namespace of the offending service.
        namespace: String,
        /// Name of the offending service.
        name: String,
        /// The underlying name error.
        #[source]
        source: ProtoError,
    },
}

/// The answer of [`Zone::lookup`]; borrows records from the zone.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Lookup<'z> {
    /// The name has records of the requested type.
    Answer {
        /// Answer-section records.
        answers: &'z [Record],
        /// Additional-section records (A/AAAA of SRV targets).
        additionals: &'z [Record],
    },
    /// The name exists (possibly as an empty non-terminal) but has no record
    /// of the requested type: NOERROR with an empty answer.
    NoData {
        /// SOA for the authority section (TTL capped at the negative TTL).
        soa: &'z Record,
    },
    /// The name does not exist in the zone.
    NxDomain {
        /// SOA for the authority section (TTL capped at the negative TTL).
        soa: &'z Record,
    },
    /// The name is outside the zone: the server answers REFUSED.
    NotAuthoritative,
}

/// An immutable, fully indexed snapshot of the zone.
#[derive(Clone)]
pub struct Zone {
    origin: LowerName,
    serial: u32,
    negative_soa: Record,
    nodes: HashMap<LowerName, Node>,
    record_count: usize,
}

/// All records at one owner name.
#[derive(Clone, Debug, Default)]
struct Node {
    /// RRsets by type, in insertion order (A, AAAA, SRV, ...).
    rrsets: Vec<(RecordType, RrSet)>,
    /// Every record at this name, for `ANY`.
    all: Vec<Record>,
}

#[derive(Clone, Debug, Default)]
struct RrSet {
    records: Vec<Record>,
    additionals: Vec<Record>,
}

impl Zone {
    /// Builds a zone for `origin` (usually `clusterset.local`) serving
    /// `services` with record TTL `ttl`.
    ///
    /// The SOA serial is derived from the wall clock and strictly increases
    /// with each build in this process, so every snapshot has a new serial.
    /// Use [`Zone::build_with_serial`] for a fully deterministic build.
    pub fn build(origin: &str, services: &[ServiceRecord], ttl: u32) -> Result<Zone, ZoneError> {
        Self::build_with_serial(origin, services, ttl, next_serial())
    }

    /// Like [`Zone::build`] but with an explicit SOA serial (a pure function
    /// of its arguments).
    pub fn build_with_serial(
        origin: &str,
        services: &[ServiceRecord],
        ttl: u32,
        serial: u32,
    ) -> Result<Zone, ZoneError> {
        let origin_name = parse_origin(origin)?;
        let mut builder = Builder::new(origin_name.clone());

        let invalid_origin = |source: ProtoError| ZoneError::InvalidOrigin {
            origin: origin.to_string(),
            reason: source.to_string(),
        };
        let ns_name = prepend(&origin_name, &["ns", "dns"]).map_err(invalid_origin)?;
        let hostmaster = prepend(&origin_name, &["hostmaster"]).map_err(invalid_origin)?;
        let version_name = prepend(&origin_name, &["dns-version"]).map_err(invalid_origin)?;
        let svc_root = prepend(&origin_name, &["svc"]).map_err(invalid_origin)?;

        let soa = SOA::new(
            ns_name.clone(),
            hostmaster,
            serial,
            SOA_REFRESH,
            SOA_RETRY,
            SOA_EXPIRE,
            NEGATIVE_TTL,
        );
        let soa_record = Record::from_rdata(origin_name.clone(), ttl, RData::SOA(soa));
        let mut negative_soa = soa_record.clone();
        negative_soa.ttl = ttl.min(NEGATIVE_TTL);
        builder.add(soa_record);
        builder.add(Record::from_rdata(
            origin_name.clone(),
            ttl,
            RData::NS(NS(ns_name)),
        ));
        builder.add(Record::from_rdata(
            version_name,
            ttl,
            RData::TXT(TXT::new(vec![SCHEMA_VERSION.to_string()])),
        ));
        // `svc.<origin>` exists even when nothing is imported.
        builder.touch(svc_root.clone());

        let mut seen = HashSet::new();
        for service in services {
            validate_service(service)?;
            if !seen.insert((service.namespace.as_str(), service.name.as_str())) {
                return Err(ZoneError::DuplicateService {
                    namespace: service.namespace.clone(),
                    name: service.name.clone(),
                });
            }
            add_service(&mut builder, &svc_root, service, ttl).map_err(|source| {
                ZoneError::Name {
                    namespace: service.namespace.clone(),
                    name: service.name.clone(),
                    source,
                }
            })?;
        }

        Ok(builder.finish(serial, negative_soa))
    }

    /// The zone origin (apex), lowercase and fully qualified.
    pub fn origin(&self) -> &LowerName {
        &self.origin
    }

    /// The SOA serial of this snapshot.
    pub fn serial(&self) -> u32 {
        self.serial
    }

    /// Number of resource records in the zone (SOA, NS and TXT included).
    pub fn record_count(&self) -> usize {
        self.record_count
    }

    /// Answers `qtype` at `name` from this snapshot. Names compare
    /// case-insensitively; `ANY` returns every record at the name.
    pub fn lookup(&self, name: &LowerName, qtype: RecordType) -> Lookup<'_> {
        let fqdn;
        let name = if name.is_fqdn() {
            name
        } else {
            let mut n = Name::from(name);
            n.set_fqdn(true);
            fqdn = LowerName::from(n);
            &fqdn
        };

        if !self.origin.zone_of(name) {
            return Lookup::NotAuthoritative;
        }
        let soa = &self.negative_soa;
        let Some(node) = self.nodes.get(name) else {
            return Lookup::NxDomain { soa };
        };

        if qtype == RecordType::ANY {
            return if node.all.is_empty() {
                Lookup::NoData { soa }
            } else {
                Lookup::Answer {
                    answers: &node.all,
                    additionals: &[],
                }
            };
        }

        match node.rrsets.iter().find(|(t, _)| *t == qtype) {
            Some((_, rrset)) => Lookup::Answer {
                answers: &rrset.records,
                additionals: &rrset.additionals,
            },
            None => Lookup::NoData { soa },
        }
    }
}

impl fmt::Debug for Zone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Zone")
            .field("origin", &self.origin.to_string())
            .field("serial", &self.serial)
            .field("names", &self.nodes.len())
            .field("records", &self.record_count)
            .finish()
    }
}

/// Returns a serial that is at least the current Unix time and strictly
/// greater than any serial returned before in this process.
fn next_serial() -> u32 {
    static LAST: AtomicU32 = AtomicU32::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
        .unwrap_or(0);
    let mut next = now;
    // `fetch_update` with a closure that always returns `Some` cannot fail.
    let _ = LAST.fetch_update(Ordering::AcqRel, Ordering::Acquire, |last| {
        next = now.max(last.wrapping_add(1));
        Some(next)
    });
    next
}

fn parse_origin(origin: &str) -> Result<Name, ZoneError> {
    let invalid = |reason: String| ZoneError::InvalidOrigin {
        origin: origin.to_string(),
        reason,
    };
    let mut name = Name::from_ascii(origin).map_err(|e| invalid(e.to_string()))?;
    name.set_fqdn(true);
    if name.is_root() {
        return Err(invalid("the root zone cannot be served".to_string()));
    }
    Ok(name.to_lowercase())
}

/// `labels` are given most-specific first: `prepend(o, &["ns", "dns"])` is `ns.dns.o`.
fn prepend(base: &Name, labels: &[&str]) -> Result<Name, ProtoError> {
    let mut name = base.clone();
    for label in labels.iter().rev() {
        name = name.prepend_label(*label)?;
    }
    Ok(name)
}

/// A lowercase RFC 1123 label: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 octets.
fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty()
        && b.len() <= 63
        && b.first().is_some_and(alnum)
        && b.last().is_some_and(alnum)
        && b.iter().all(|c| alnum(c) || *c == b'-')
}

fn validate_service(service: &ServiceRecord) -> Result<(), ZoneError> {
    let invalid = |field: &'static str, value: &str| ZoneError::InvalidLabel {
        field,
        value: value.to_string(),
        namespace: service.namespace.clone(),
        name: service.name.clone(),
    };
    if !is_dns_label(&service.namespace) {
        return Err(invalid("namespace", &service.namespace));
    }
    if !is_dns_label(&service.name) {
        return Err(invalid("name", &service.name));
    }
    for port in &service.ports {
        // `_<name>` must fit in one 63-octet label.
        if !port.name.is_empty() && (!is_dns_label(&port.name) || port.name.len() > 62) {
            return Err(invalid("port name", &port.name));
        }
    }
    if service.kind == ServiceKind::Headless {
        for e in &service.endpoints {
            if !is_dns_label(&e.cluster) {
                return Err(invalid("cluster", &e.cluster));
            }
            if !is_dns_label(&e.label()) {
                return Err(invalid("hostname", &e.label()));
            }
        }
    }
    Ok(())
}

fn address_record(owner: &Name, ttl: u32, ip: &IpAddr) -> Record {
    let rdata = match ip {
        IpAddr::V4(v4) => RData::A(A::from(*v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA::from(*v6)),
    };
    Record::from_rdata(owner.clone(), ttl, rdata)
}

fn add_service(
    builder: &mut Builder,
    svc_root: &Name,
    service: &ServiceRecord,
    ttl: u32,
) -> Result<(), ProtoError> {
    let svc_name = prepend(svc_root, &[&service.name, &service.namespace])?;
    builder.touch(svc_name.clone());

    for ip in &service.ips {
        builder.add(address_record(&svc_name, ttl, ip));
    }

    // SRV targets: the service name, or for a headless service each
    // endpoint's `<hostname>.<clusterid>.<svc>...` name. The forbidden
    // `<clusterid>.<svc>...` stays an empty non-terminal: it has no records.
    let mut targets = Vec::new();
    if service.kind == ServiceKind::Headless && !service.endpoints.is_empty() {
        for e in &service.endpoints {
            let host = prepend(&svc_name, &[&e.label(), &e.cluster])?;
            for ip in &e.ips {
                builder.add(address_record(&svc_name, ttl, ip));
                builder.add(address_record(&host, ttl, ip));
            }
            targets.push(host);
        }
    } else {
        targets.push(svc_name.clone());
    }

    for port in &service.ports {
        for target in &targets {
            let srv = RData::SRV(SRV::new(
                SRV_PRIORITY,
                SRV_WEIGHT,
                port.port,
                target.clone(),
            ));
            // The service name itself lists every port, named or not (as
            // CoreDNS does).
            builder.add(Record::from_rdata(svc_name.clone(), ttl, srv.clone()));
            if !port.name.is_empty() {
                let owner = prepend(
                    &svc_name,
                    &[&format!("_{}", port.name), port.protocol.srv_label()],
                )?;
                builder.add(Record::from_rdata(owner, ttl, srv));
            }
        }
    }
    Ok(())
}

/// Accumulates records by owner name, then indexes them.
struct Builder {
    origin: Name,
    nodes: HashMap<LowerName, Node>,
}

impl Builder {
    fn new(origin: Name) -> Self {
        Self {
            origin,
            nodes: HashMap::new(),
        }
    }

    /// Makes `name` exist, with no records of its own.
    fn touch(&mut self, name: Name) -> &mut Node {
        self.nodes.entry(LowerName::new(&name)).or_default()
    }

    /// Adds `record` to its owner's RRset of its type; duplicates are dropped.
    fn add(&mut self, record: Record) {
        let rtype = record.record_type();
        let node = self.touch(record.name.clone());
        let idx = match node.rrsets.iter().position(|(t, _)| *t == rtype) {
            Some(idx) => idx,
            None => {
                node.rrsets.push((rtype, RrSet::default()));
                node.rrsets.len() - 1
            }
        };
        let records = &mut node.rrsets[idx].1.records;
        if !records.contains(&record) {
            records.push(record);
        }
    }

    fn finish(mut self, serial: u32, negative_soa: Record) -> Zone {
        // Every ancestor of an owner name, up to the origin, is an empty
        // non-terminal (it exists, so queries get NODATA, not NXDOMAIN).
        let origin = LowerName::new(&self.origin);
        let owners: Vec<LowerName> = self.nodes.keys().cloned().collect();
        for owner in owners {
            let mut name = owner;
            while name != origin && !name.is_root() {
                name = name.base_name();
                self.nodes.entry(name.clone()).or_default();
            }
        }

        // Additional section of SRV answers: the A/AAAA records of each target.
        let mut additionals: Vec<(LowerName, Vec<Record>)> = Vec::new();
        for (owner, node) in &self.nodes {
            for (rtype, rrset) in &node.rrsets {
                if *rtype != RecordType::SRV {
                    continue;
                }
                let mut extra: Vec<Record> = Vec::new();
                let mut targets: Vec<&Name> = Vec::new();
                for record in &rrset.records {
                    let RData::SRV(srv) = &record.data else {
                        continue;
                    };
                    if targets.contains(&&srv.target) {
                        continue;
                    }
                    targets.push(&srv.target);
                    if let Some(target) = self.nodes.get(&LowerName::new(&srv.target)) {
                        for (t, set) in &target.rrsets {
                            if matches!(t, RecordType::A | RecordType::AAAA) {
                                extra.extend(set.records.iter().cloned());
                            }
                        }
                    }
                }
                additionals.push((owner.clone(), extra));
            }
        }
        for (owner, extra) in additionals {
            if let Some(node) = self.nodes.get_mut(&owner) {
                if let Some((_, rrset)) =
                    node.rrsets.iter_mut().find(|(t, _)| *t == RecordType::SRV)
                {
                    rrset.additionals = extra;
                }
            }
        }

        let mut record_count = 0;
        for node in self.nodes.values_mut() {
            node.all = node
                .rrsets
                .iter()
                .flat_map(|(_, set)| set.records.iter().cloned())
                .collect();
            record_count += node.all.len();
        }

        Zone {
            origin,
            serial,
            negative_soa,
            nodes: self.nodes,
            record_count,
        }
    }
}
