use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};

use super::*;

const ORIGIN: &str = "clusterset.local";
const TTL: u32 = 30;
const SERIAL: u32 = 42;

fn name(s: &str) -> LowerName {
    LowerName::from(Name::from_ascii(s).expect("valid test name"))
}

fn port(name: &str, port: u16, protocol: PortProtocol) -> ServicePort {
    ServicePort {
        name: name.to_string(),
        port,
        protocol,
    }
}

fn services() -> Vec<ServiceRecord> {
    vec![
        ServiceRecord {
            namespace: "default".into(),
            name: "web".into(),
            kind: ServiceKind::ClusterSetIp,
            endpoints: Vec::new(),
            ips: vec![
                IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
                IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1)),
            ],
            ports: vec![
                port("http", 80, PortProtocol::Tcp),
                port("dns", 53, PortProtocol::Udp),
                port("diameter", 3868, PortProtocol::Sctp),
                port("", 8080, PortProtocol::Tcp),
            ],
        },
        ServiceRecord {
            namespace: "prod".into(),
            name: "db".into(),
            kind: ServiceKind::Headless,
            endpoints: Vec::new(),
            ips: vec![
                IpAddr::V4(Ipv4Addr::new(10, 1, 0, 1)),
                IpAddr::V4(Ipv4Addr::new(10, 1, 0, 2)),
            ],
            ports: vec![port("pg", 5432, PortProtocol::Tcp)],
        },
        ServiceRecord {
            namespace: "prod".into(),
            name: "empty".into(),
            kind: ServiceKind::ClusterSetIp,
            endpoints: Vec::new(),
            ips: vec![],
            ports: vec![],
        },
    ]
}

fn zone() -> Zone {
    Zone::build_with_serial(ORIGIN, &services(), TTL, SERIAL).expect("zone builds")
}

#[track_caller]
fn answer<'z>(lookup: Lookup<'z>) -> (&'z [Record], &'z [Record]) {
    match lookup {
        Lookup::Answer {
            answers,
            additionals,
        } => (answers, additionals),
        other => panic!("expected an answer, got {other:?}"),
    }
}

#[track_caller]
fn assert_nodata(lookup: Lookup<'_>) {
    match lookup {
        Lookup::NoData { soa } => assert_eq!(soa.record_type(), RecordType::SOA),
        other => panic!("expected NODATA, got {other:?}"),
    }
}

#[track_caller]
fn assert_nxdomain(lookup: Lookup<'_>) {
    match lookup {
        Lookup::NxDomain { soa } => assert_eq!(soa.record_type(), RecordType::SOA),
        other => panic!("expected NXDOMAIN, got {other:?}"),
    }
}

fn ipv4s(records: &[Record]) -> Vec<Ipv4Addr> {
    records
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

fn srvs(records: &[Record]) -> Vec<(u16, u16, u16, String)> {
    records
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(s) => Some((s.priority, s.weight, s.port, s.target.to_ascii())),
            _ => None,
        })
        .collect()
}

#[test]
fn a_records() {
    let zone = zone();
    let (answers, additionals) =
        answer(zone.lookup(&name("web.default.svc.clusterset.local."), RecordType::A));
    assert_eq!(ipv4s(answers), vec![Ipv4Addr::new(10, 0, 0, 1)]);
    assert!(additionals.is_empty());
    assert_eq!(answers[0].ttl, TTL);
    assert_eq!(
        answers[0].name.to_ascii(),
        "web.default.svc.clusterset.local."
    );
}

#[test]
fn aaaa_records() {
    let zone = zone();
    let (answers, _) =
        answer(zone.lookup(&name("web.default.svc.clusterset.local."), RecordType::AAAA));
    assert_eq!(answers.len(), 1);
    assert_eq!(
        answers[0].data,
        RData::AAAA(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1).into())
    );
}

#[test]
fn headless_service_answers_with_its_ips() {
    let zone = zone();
    let (answers, _) = answer(zone.lookup(&name("db.prod.svc.clusterset.local."), RecordType::A));
    assert_eq!(
        ipv4s(answers),
        vec![Ipv4Addr::new(10, 1, 0, 1), Ipv4Addr::new(10, 1, 0, 2)]
    );
}

#[test]
fn named_port_srv_with_target_addresses_in_additional() {
    let zone = zone();
    let target = "web.default.svc.clusterset.local.".to_string();
    for (owner, port) in [
        ("_http._tcp.web.default.svc.clusterset.local.", 80),
        ("_dns._udp.web.default.svc.clusterset.local.", 53),
        ("_diameter._sctp.web.default.svc.clusterset.local.", 3868),
    ] {
        let (answers, additionals) = answer(zone.lookup(&name(owner), RecordType::SRV));
        assert_eq!(
            srvs(answers),
            vec![(0, 100, port, target.clone())],
            "{owner}"
        );
        assert_eq!(answers[0].name.to_ascii(), owner);
        let mut types: Vec<_> = additionals.iter().map(Record::record_type).collect();
        types.sort_by_key(|t| u16::from(*t));
        assert_eq!(types, vec![RecordType::A, RecordType::AAAA], "{owner}");
        assert!(additionals.iter().all(|r| r.name.to_ascii() == target));
    }
}

#[test]
fn srv_at_service_name_lists_every_port() {
    let zone = zone();
    let (answers, additionals) =
        answer(zone.lookup(&name("web.default.svc.clusterset.local."), RecordType::SRV));
    let mut ports: Vec<u16> = srvs(answers).into_iter().map(|s| s.2).collect();
    ports.sort_unstable();
    assert_eq!(ports, vec![53, 80, 3868, 8080]);
    assert_eq!(additionals.len(), 2);
}

#[test]
fn unnamed_port_has_no_named_srv() {
    let zone = zone();
    // The only `_tcp` SRV name is `_http`; an unnamed port creates none.
    assert_nxdomain(zone.lookup(
        &name("_._tcp.web.default.svc.clusterset.local."),
        RecordType::SRV,
    ));
}

#[test]
fn txt_version() {
    let zone = zone();
    let (answers, _) = answer(zone.lookup(&name("dns-version.clusterset.local."), RecordType::TXT));
    assert_eq!(answers.len(), 1);
    let RData::TXT(txt) = &answers[0].data else {
        panic!("not a TXT record");
    };
    assert_eq!(txt.txt_data.len(), 1);
    assert_eq!(&*txt.txt_data[0], b"1.0.0");
}

#[test]
fn soa_at_apex() {
    let zone = zone();
    let (answers, _) = answer(zone.lookup(&name("clusterset.local."), RecordType::SOA));
    assert_eq!(answers.len(), 1);
    assert_eq!(answers[0].ttl, TTL);
    let RData::SOA(soa) = &answers[0].data else {
        panic!("not a SOA record");
    };
    assert_eq!(soa.mname.to_ascii(), "ns.dns.clusterset.local.");
    assert_eq!(soa.rname.to_ascii(), "hostmaster.clusterset.local.");
    assert_eq!(soa.serial, SERIAL);
    assert_eq!(soa.minimum, 5);
    assert_eq!(zone.serial(), SERIAL);
}

#[test]
fn ns_at_apex() {
    let zone = zone();
    let (answers, _) = answer(zone.lookup(&name("clusterset.local."), RecordType::NS));
    assert_eq!(answers.len(), 1);
    assert_eq!(
        answers[0].data,
        RData::NS(NS(Name::from_ascii("ns.dns.clusterset.local.").unwrap()))
    );
}

#[test]
fn nxdomain_for_unknown_names_with_capped_soa() {
    let zone = zone();
    for unknown in [
        "nope.default.svc.clusterset.local.",
        "web.nope.svc.clusterset.local.",
        "nope.clusterset.local.",
        "_http._udp.web.default.svc.clusterset.local.",
        "_nope._tcp.web.default.svc.clusterset.local.",
    ] {
        match zone.lookup(&name(unknown), RecordType::A) {
            Lookup::NxDomain { soa } => {
                assert_eq!(soa.ttl, NEGATIVE_TTL, "{unknown}");
                assert_eq!(soa.name.to_ascii(), "clusterset.local.");
            }
            other => panic!("{unknown}: expected NXDOMAIN, got {other:?}"),
        }
    }
}

#[test]
fn negative_soa_ttl_is_min_of_ttl_and_minimum() {
    let zone = Zone::build_with_serial(ORIGIN, &[], 2, 1).unwrap();
    match zone.lookup(&name("nope.clusterset.local."), RecordType::A) {
        Lookup::NxDomain { soa } => assert_eq!(soa.ttl, 2),
        other => panic!("expected NXDOMAIN, got {other:?}"),
    }
}

#[test]
fn nodata_for_known_name_other_type() {
    let zone = zone();
    assert_nodata(zone.lookup(&name("web.default.svc.clusterset.local."), RecordType::TXT));
    assert_nodata(zone.lookup(&name("web.default.svc.clusterset.local."), RecordType::MX));
    assert_nodata(zone.lookup(
        &name("_http._tcp.web.default.svc.clusterset.local."),
        RecordType::A,
    ));
    assert_nodata(zone.lookup(&name("db.prod.svc.clusterset.local."), RecordType::AAAA));
    assert_nodata(zone.lookup(&name("clusterset.local."), RecordType::A));
    assert_nodata(zone.lookup(&name("dns-version.clusterset.local."), RecordType::A));
    // A service without addresses or ports still exists.
    assert_nodata(zone.lookup(&name("empty.prod.svc.clusterset.local."), RecordType::A));
    assert_nodata(zone.lookup(&name("empty.prod.svc.clusterset.local."), RecordType::SRV));
}

#[test]
fn empty_non_terminals_are_nodata() {
    let zone = zone();
    for ent in [
        "svc.clusterset.local.",
        "default.svc.clusterset.local.",
        "prod.svc.clusterset.local.",
        "_tcp.web.default.svc.clusterset.local.",
        "_udp.web.default.svc.clusterset.local.",
        "_sctp.web.default.svc.clusterset.local.",
        "_tcp.db.prod.svc.clusterset.local.",
    ] {
        for qtype in [RecordType::A, RecordType::SRV, RecordType::ANY] {
            match zone.lookup(&name(ent), qtype) {
                Lookup::NoData { .. } => {}
                other => panic!("{ent} {qtype}: expected NODATA, got {other:?}"),
            }
        }
    }
    // `svc.<origin>` exists even with no service at all.
    let empty = Zone::build_with_serial(ORIGIN, &[], TTL, 1).unwrap();
    assert_nodata(empty.lookup(&name("svc.clusterset.local."), RecordType::A));
    assert_nxdomain(empty.lookup(&name("default.svc.clusterset.local."), RecordType::A));
}

#[test]
fn cluster_id_form_is_never_served() {
    let zone = zone();
    for forbidden in [
        "cluster-a.web.default.svc.clusterset.local.",
        "cluster-a.db.prod.svc.clusterset.local.",
        "member1.empty.prod.svc.clusterset.local.",
    ] {
        for qtype in [
            RecordType::A,
            RecordType::AAAA,
            RecordType::SRV,
            RecordType::ANY,
        ] {
            assert_nxdomain(zone.lookup(&name(forbidden), qtype));
        }
    }
}

#[test]
fn names_outside_the_zone_are_not_authoritative() {
    let zone = zone();
    for outside in [
        "example.com.",
        "web.default.svc.cluster.local.",
        "local.",
        ".",
        "clusterset.local.example.",
        "xclusterset.local.",
    ] {
        assert_eq!(
            zone.lookup(&name(outside), RecordType::A),
            Lookup::NotAuthoritative,
            "{outside}"
        );
    }
}

#[test]
fn lookup_is_case_insensitive() {
    let zone = zone();
    let (answers, _) =
        answer(zone.lookup(&name("WEB.Default.SVC.ClusterSet.LOCAL."), RecordType::A));
    assert_eq!(ipv4s(answers), vec![Ipv4Addr::new(10, 0, 0, 1)]);
    let (answers, _) = answer(zone.lookup(
        &name("_HTTP._Tcp.web.DEFAULT.svc.clusterset.local."),
        RecordType::SRV,
    ));
    assert_eq!(answers.len(), 1);
    assert_nxdomain(zone.lookup(&name("NOPE.clusterset.LOCAL."), RecordType::A));
}

#[test]
fn relative_lookup_name_is_treated_as_fqdn() {
    let zone = zone();
    let (answers, _) =
        answer(zone.lookup(&name("web.default.svc.clusterset.local"), RecordType::A));
    assert_eq!(answers.len(), 1);
}

#[test]
fn any_returns_every_record_at_the_name() {
    let zone = zone();
    let (answers, _) =
        answer(zone.lookup(&name("web.default.svc.clusterset.local."), RecordType::ANY));
    // 1 A + 1 AAAA + 4 SRV.
    assert_eq!(answers.len(), 6);
    let (apex, _) = answer(zone.lookup(&name("clusterset.local."), RecordType::ANY));
    assert_eq!(apex.len(), 2);
}

#[test]
fn record_count_counts_every_record() {
    // SOA + NS + TXT, web: A + AAAA + 4 service SRV + 3 named SRV,
    // db: 2 A + 1 service SRV + 1 named SRV, empty: nothing.
    assert_eq!(zone().record_count(), 3 + 9 + 4);
    assert_eq!(
        Zone::build_with_serial(ORIGIN, &[], TTL, 1)
            .unwrap()
            .record_count(),
        3
    );
}

#[test]
fn duplicate_addresses_and_ports_are_deduplicated() {
    let services = vec![ServiceRecord {
        namespace: "ns".into(),
        name: "svc".into(),
        kind: ServiceKind::ClusterSetIp,
        endpoints: Vec::new(),
        ips: vec![IpAddr::V4(Ipv4Addr::LOCALHOST); 3],
        ports: vec![port("http", 80, PortProtocol::Tcp); 2],
    }];
    let zone = Zone::build_with_serial(ORIGIN, &services, TTL, 1).unwrap();
    let (a, _) = answer(zone.lookup(&name("svc.ns.svc.clusterset.local."), RecordType::A));
    assert_eq!(a.len(), 1);
    let (srv, _) = answer(zone.lookup(&name("svc.ns.svc.clusterset.local."), RecordType::SRV));
    assert_eq!(srv.len(), 1);
}

#[test]
fn serial_increases_with_each_build() {
    let first = Zone::build(ORIGIN, &services(), TTL).unwrap();
    let second = Zone::build(ORIGIN, &services(), TTL).unwrap();
    assert!(second.serial() > first.serial());
    let (soa, _) = answer(second.lookup(&name("clusterset.local."), RecordType::SOA));
    let RData::SOA(soa) = &soa[0].data else {
        panic!("not a SOA record");
    };
    assert_eq!(soa.serial, second.serial());
}

#[test]
fn other_origins_work() {
    let zone = Zone::build_with_serial("Example.TEST.", &services(), TTL, 1).unwrap();
    assert_eq!(zone.origin().to_string(), "example.test.");
    let (answers, _) = answer(zone.lookup(&name("web.default.svc.example.test."), RecordType::A));
    assert_eq!(answers.len(), 1);
    assert_eq!(
        zone.lookup(&name("web.default.svc.clusterset.local."), RecordType::A),
        Lookup::NotAuthoritative
    );
}

#[test]
fn invalid_origins_are_rejected() {
    for origin in [".", "", "bad..name", "a b.local"] {
        assert!(
            matches!(
                Zone::build(origin, &[], TTL),
                Err(ZoneError::InvalidOrigin { .. })
            ),
            "{origin:?}"
        );
    }
}

#[test]
fn invalid_labels_are_rejected() {
    let mut bad_namespace = services();
    bad_namespace[0].namespace = "Default".into();
    let mut bad_name = services();
    bad_name[0].name = "_web".into();
    let mut bad_port = services();
    bad_port[0].ports[0].name = "http.x".into();
    let mut too_long = services();
    too_long[0].name = "a".repeat(64);
    let mut dash = services();
    dash[0].name = "-web".into();
    let mut long_port = services();
    long_port[0].ports[0].name = "p".repeat(63);
    for (case, services) in [
        ("namespace", bad_namespace),
        ("name", bad_name),
        ("port name", bad_port),
        ("name", too_long),
        ("name", dash),
        ("port name", long_port),
    ] {
        match Zone::build(ORIGIN, &services, TTL) {
            Err(ZoneError::InvalidLabel { field, .. }) => assert_eq!(field, case),
            other => panic!("{case}: expected InvalidLabel, got {other:?}"),
        }
    }
}

#[test]
fn duplicate_services_are_rejected() {
    let mut services = services();
    services.push(services[0].clone());
    match Zone::build(ORIGIN, &services, TTL) {
        Err(ZoneError::DuplicateService { namespace, name }) => {
            assert_eq!((namespace.as_str(), name.as_str()), ("default", "web"));
        }
        other => panic!("expected DuplicateService, got {other:?}"),
    }
}

#[test]
fn over_long_names_are_rejected() {
    let label = "a".repeat(63);
    let services = vec![ServiceRecord {
        namespace: label.clone(),
        name: label.clone(),
        kind: ServiceKind::ClusterSetIp,
        endpoints: Vec::new(),
        ips: vec![],
        ports: vec![],
    }];
    // 4 labels of 63 octets plus `svc` and `local` exceed 255 octets.
    let origin = format!("{label}.{label}.local");
    assert!(matches!(
        Zone::build(&origin, &services, TTL),
        Err(ZoneError::Name { .. })
    ));
}

fn headless() -> Zone {
    let ep = |cluster: &str, hostname: Option<&str>, ip: [u8; 4]| HeadlessEndpoint {
        cluster: cluster.into(),
        hostname: hostname.map(str::to_string),
        ips: vec![IpAddr::V4(Ipv4Addr::from(ip))],
    };
    let services = vec![ServiceRecord {
        namespace: "data".into(),
        name: "kafka".into(),
        kind: ServiceKind::Headless,
        ips: vec![],
        ports: vec![port("broker", 9092, PortProtocol::Tcp)],
        endpoints: vec![
            ep("east", Some("kafka-0"), [10, 2, 0, 1]),
            ep("east", Some("kafka-1"), [10, 2, 0, 2]),
            ep("west", None, [10, 3, 0, 7]),
        ],
    }];
    Zone::build_with_serial(ORIGIN, &services, TTL, SERIAL).expect("zone builds")
}

#[test]
fn headless_service_name_answers_every_endpoint() {
    let zone = headless();
    let (answers, _) =
        answer(zone.lookup(&name("kafka.data.svc.clusterset.local."), RecordType::A));
    let mut ips = ipv4s(answers);
    ips.sort();
    assert_eq!(
        ips,
        vec![
            Ipv4Addr::new(10, 2, 0, 1),
            Ipv4Addr::new(10, 2, 0, 2),
            Ipv4Addr::new(10, 3, 0, 7)
        ]
    );
}

#[test]
fn headless_endpoints_have_hostname_dot_cluster_names() {
    let zone = headless();
    let (a, _) = answer(zone.lookup(
        &name("kafka-1.east.kafka.data.svc.clusterset.local."),
        RecordType::A,
    ));
    assert_eq!(ipv4s(a), vec![Ipv4Addr::new(10, 2, 0, 2)]);
    // No hostname: the dashed address stands in.
    let (a, _) = answer(zone.lookup(
        &name("10-3-0-7.west.kafka.data.svc.clusterset.local."),
        RecordType::A,
    ));
    assert_eq!(ipv4s(a), vec![Ipv4Addr::new(10, 3, 0, 7)]);
    // An endpoint name in the wrong cluster does not exist.
    assert_nxdomain(zone.lookup(
        &name("kafka-1.west.kafka.data.svc.clusterset.local."),
        RecordType::A,
    ));
}

#[test]
fn headless_cluster_label_alone_has_no_records() {
    // `<clusterid>.<svc>.<ns>...` is forbidden: no records; it is an empty
    // non-terminal (NODATA), since endpoint names exist below it.
    let zone = headless();
    assert_nodata(zone.lookup(
        &name("east.kafka.data.svc.clusterset.local."),
        RecordType::A,
    ));
    assert_nxdomain(zone.lookup(
        &name("north.kafka.data.svc.clusterset.local."),
        RecordType::A,
    ));
}

#[test]
fn headless_srv_targets_each_endpoint() {
    let zone = headless();
    let (answers, additionals) = answer(zone.lookup(
        &name("_broker._tcp.kafka.data.svc.clusterset.local."),
        RecordType::SRV,
    ));
    let mut targets: Vec<String> = srvs(answers).into_iter().map(|s| s.3).collect();
    targets.sort();
    assert_eq!(
        targets,
        vec![
            "10-3-0-7.west.kafka.data.svc.clusterset.local.",
            "kafka-0.east.kafka.data.svc.clusterset.local.",
            "kafka-1.east.kafka.data.svc.clusterset.local.",
        ]
    );
    assert_eq!(
        ipv4s(additionals).len(),
        3,
        "targets' addresses in additional"
    );
}

#[test]
fn headless_endpoint_labels_are_validated() {
    let services = vec![ServiceRecord {
        namespace: "data".into(),
        name: "kafka".into(),
        kind: ServiceKind::Headless,
        ips: vec![],
        ports: vec![],
        endpoints: vec![HeadlessEndpoint {
            cluster: "East".into(),
            hostname: None,
            ips: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
        }],
    }];
    assert!(matches!(
        Zone::build_with_serial(ORIGIN, &services, TTL, SERIAL),
        Err(ZoneError::InvalidLabel {
            field: "cluster",
            ..
        })
    ));
}
