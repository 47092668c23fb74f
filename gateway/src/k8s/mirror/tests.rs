use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use super::*;
use crate::catalog::{Export, LocalService, Port};

fn port(name: &str, n: u16) -> Port {
    Port {
        name: name.into(),
        port: n,
        protocol: Protocol::Tcp,
        app_protocol: None,
    }
}

fn import(ns: &str, name: &str, ports: &[(&str, u16, &[&str])]) -> Import {
    let mut peers: Vec<String> = ports
        .iter()
        .flat_map(|(_, _, ps)| ps.iter().map(|p| p.to_string()))
        .collect();
    peers.sort();
    peers.dedup();
    Import {
        key: ServiceKey::new(ns, name),
        service_type: ServiceType::ClusterSetIp,
        ports: ports.iter().map(|(n, p, _)| port(n, *p)).collect(),
        peers,
        port_peers: ports
            .iter()
            .map(|(_, p, ps)| (*p, ps.iter().map(|s| s.to_string()).collect()))
            .collect(),
        vip: Ipv4Addr::new(127, 77, 1, 1),
    }
}

fn table(imports: Vec<Import>) -> ImportTable {
    imports.into_iter().map(|i| (i.key.clone(), i)).collect()
}

use crate::catalog::Protocol;

fn key(svc: &str, pin: Option<&str>, port: u16) -> AllocKey {
    AllocKey {
        service: ServiceKey::new("shop", svc),
        pin: pin.map(String::from),
        port,
    }
}

#[test]
fn allocation_keeps_ports_and_fills_the_lowest_free() {
    let t = table(vec![import(
        "shop",
        "web",
        &[("http", 80, &["east", "north"])],
    )]);
    let want = wanted(&t);
    assert_eq!(want.len(), 3, "clusterset + one per cluster");
    let current = BTreeMap::from([
        (key("web", Some("north"), 80), 20_005),
        (key("gone", None, 80), 20_000),
        (key("web", Some("east"), 80), 30_000), // outside the range: reassigned
    ]);
    let (a, exhausted) = allocate(&current, &want, 20_000..=20_010);
    assert!(exhausted.is_empty());
    assert_eq!(a[&key("web", Some("north"), 80)], 20_005, "kept");
    // 20_000 is still on gone's Service: not reused until that is deleted.
    assert_eq!(a[&key("web", None, 80)], 20_001);
    assert_eq!(a[&key("web", Some("east"), 80)], 20_002);
    assert!(!a.contains_key(&key("gone", None, 80)));
    let after_delete = BTreeMap::from([(key("web", Some("north"), 80), 20_005)]);
    let (a, _) = allocate(&after_delete, &want, 20_000..=20_010);
    assert_eq!(a[&key("web", None, 80)], 20_000, "reused once gone");
    let (a, exhausted) = allocate(&BTreeMap::new(), &want, 20_000..=20_001);
    assert_eq!((a.len(), exhausted.len()), (2, 1));
    let (a, exhausted) = allocate(&BTreeMap::new(), &want, 65_534..=65_535);
    assert_eq!(
        (a.len(), exhausted.len()),
        (2, 1),
        "the top of the port space"
    );
}

#[test]
fn duplicate_recorded_ports_are_not_both_kept() {
    let want: BTreeSet<AllocKey> = [key("a", None, 80), key("b", None, 80)].into();
    let current = BTreeMap::from([(key("a", None, 80), 20_000), (key("b", None, 80), 20_000)]);
    let (a, _) = allocate(&current, &want, 20_000..=20_010);
    let ports: BTreeSet<u16> = a.values().copied().collect();
    assert_eq!(ports.len(), 2, "{a:?}");
}

#[test]
fn the_plan_has_an_import_a_clusterset_service_and_a_mirror_per_cluster() {
    let t = table(vec![import(
        "shop",
        "web",
        &[("http", 80, &["east", "north"]), ("admin", 9000, &["east"])],
    )]);
    let (alloc, _) = allocate(&BTreeMap::new(), &wanted(&t), 20_000..=20_999);
    let gw: Vec<IpAddr> = vec![
        "10.0.0.7".parse().expect("ip"),
        "fd00::7".parse().expect("ip"),
    ];
    let ips = BTreeMap::from([(
        ServiceKey::new("shop", "web"),
        "10.96.0.50".parse().expect("ip"),
    )]);
    let d = plan(&t, &alloc, &ips, &gw);
    assert_eq!(d.imports.len(), 1);
    let si = &d.imports[0];
    assert_eq!(si.spec.ips, ["10.96.0.50"]);
    assert_eq!(si.spec.type_, "ClusterSetIP");
    let clusters: Vec<&str> = si
        .status
        .as_ref()
        .expect("status")
        .clusters
        .iter()
        .map(|c| c.cluster.as_str())
        .collect();
    assert_eq!(clusters, ["east", "north"]);
    let names: Vec<String> = d
        .services
        .iter()
        .map(|s| s.metadata.name.clone().unwrap_or_default())
        .collect();
    assert_eq!(names, ["web-clusterset", "web-east", "web-north"]);
    let north = &d.services[2];
    let ports = north
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .expect("ports");
    assert_eq!(ports.len(), 1, "north does not export 9000");
    assert_eq!(ports[0].port, 80);
    let east = &d.services[1];
    let egress = &east.metadata.annotations.as_ref().expect("annotations")[labels::EGRESS_PORTS];
    assert_eq!(parse_egress_ports(egress).len(), 2);
    assert_eq!(
        parse_egress_ports("80=20001, +81=20002,82=+20003,83=0,0=20004,84=x,85"),
        BTreeMap::from([(80, 20_001)]),
        "one spelling of a port, never 0"
    );
    // A slice per family per Service; the mirror's carries its cluster.
    assert_eq!(d.slices.len(), 6);
    let (owner, east_v4) = &d.slices[2];
    assert_eq!(owner, "web-east");
    let l = east_v4.metadata.labels.as_ref().expect("labels");
    assert_eq!(l[labels::MCS_SOURCE_CLUSTER], "east");
    assert_eq!(l[labels::MCS_SERVICE_NAME], "web");
    assert_eq!(l[labels::SERVICE_NAME_K8S], "web-east");
    assert_eq!(l[labels::SLICE_MANAGED_BY], labels::SLICE_MANAGER);
    let eps = east_v4.endpoints.as_ref().expect("endpoints");
    assert_eq!(eps[0].addresses, ["10.0.0.7"]);
    // What the plan writes, observe reads back.
    let written: Vec<Service> = d
        .services
        .iter()
        .cloned()
        .map(|mut s| {
            if let Some(spec) = s.spec.as_mut() {
                spec.cluster_ip = Some("10.96.0.50".into());
            }
            s
        })
        .collect();
    let seen = observe(&written);
    assert_eq!(seen.allocations, alloc);
    assert_eq!(seen.clusterset_ips, ips);
    // Listeners: one per allocation, each on its port.
    let any = IpAddr::from([0, 0, 0, 0]);
    let l = listeners(&seen, &t, any, &(20_000..=20_999));
    assert_eq!(l.len(), alloc.len());
    for (k, port) in &alloc {
        let target = &l[&std::net::SocketAddr::new(any, *port)];
        assert_eq!(
            (&target.key, target.port, &target.pin),
            (&k.service, k.port, &k.pin)
        );
    }
}

#[test]
fn merged_ports_get_names_the_api_server_takes() {
    // One port unnamed in east, named in north; another port named `http`
    // by both for different numbers; and one of each alone.
    let t = table(vec![
        import(
            "shop",
            "web",
            &[("", 80, &["east", "north"]), ("metrics", 9090, &["north"])],
        ),
        import(
            "shop",
            "api",
            &[("http", 80, &["east"]), ("http", 8080, &["north"])],
        ),
        import("shop", "one", &[("", 5432, &["east"])]),
    ]);
    let (alloc, _) = allocate(&BTreeMap::new(), &wanted(&t), 20_000..=20_999);
    let d = plan(
        &t,
        &alloc,
        &BTreeMap::new(),
        &["10.0.0.7".parse().expect("ip")],
    );
    for svc in &d.services {
        let name = svc.metadata.name.clone().unwrap_or_default();
        let ports = svc
            .spec
            .as_ref()
            .and_then(|s| s.ports.clone())
            .expect("ports");
        let names: Vec<String> = ports
            .iter()
            .map(|p| p.name.clone().unwrap_or_default())
            .collect();
        if ports.len() > 1 {
            let unique: BTreeSet<&String> = names.iter().collect();
            assert!(
                names.iter().all(|n| !n.is_empty()) && unique.len() == names.len(),
                "{name}: {names:?}"
            );
        }
        // Its slices name the same ports.
        for (owner, slice) in d.slices.iter().filter(|(o, _)| *o == name) {
            let slice_names: Vec<String> = slice
                .ports
                .iter()
                .flatten()
                .map(|p| p.name.clone().unwrap_or_default())
                .collect();
            assert_eq!(slice_names, names, "{owner}");
        }
    }
    let clusterset = d
        .services
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some("web-clusterset"))
        .expect("web-clusterset");
    let named: Vec<Option<String>> = clusterset
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .expect("ports")
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(
        named,
        [Some("tcp-80".to_string()), Some("metrics".to_string())]
    );
    let one = d
        .services
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some("one-clusterset"))
        .expect("one-clusterset");
    let port = &one
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .expect("ports")[0];
    assert_eq!(port.name, None, "a lone port keeps having no name");
}

#[test]
fn listeners_wait_out_ports_the_writer_would_not_have_allocated() {
    let t = table(vec![import(
        "shop",
        "web",
        &[("http", 80, &["east"]), ("db", 5432, &["east"])],
    )]);
    let range = 20_000..=20_999;
    let any = IpAddr::from([0, 0, 0, 0]);
    let on = |alloc: Allocations| {
        let seen = Observed {
            allocations: alloc,
            ..Observed::default()
        };
        let mut ports: Vec<u16> = listeners(&seen, &t, any, &range)
            .keys()
            .map(|a| a.port())
            .collect();
        ports.sort_unstable();
        ports
    };
    // Outside the range (an annotation edited by hand, an old range):
    // nothing until the writer sets it right; the rest are served.
    for wrong in [0, 1, 19_999, 21_000] {
        let alloc = BTreeMap::from([
            (key("web", None, 80), wrong),
            (key("web", None, 5432), 20_001),
        ]);
        assert_eq!(on(alloc), [20_001], "port {wrong}");
    }
    // One port on two Services: neither.
    let alloc = BTreeMap::from([
        (key("web", None, 80), 20_001),
        (key("web", None, 5432), 20_001),
        (key("web", Some("east"), 80), 20_002),
    ]);
    assert_eq!(on(alloc), [20_002]);
    // Not imported (any more): nothing.
    let alloc = BTreeMap::from([(key("gone", None, 80), 20_003)]);
    assert!(on(alloc).is_empty());
}

#[test]
fn export_conditions_follow_the_mcs_rules() {
    let k = ServiceKey::new("shop", "web");
    let mut local = ClusterState::default();
    let c = export_conditions(&k, &local, None, &BTreeMap::new());
    assert_eq!(
        (c[0].type_, c[0].status, c[0].reason),
        ("Valid", false, "NoService")
    );
    let c = export_conditions(&k, &local, Some("ExternalName"), &BTreeMap::new());
    assert_eq!(c[0].reason, "InvalidService");
    local.services.insert(
        k.clone(),
        LocalService {
            key: k.clone(),
            service_type: ServiceType::ClusterSetIp,
            ports: vec![port("http", 80)],
            endpoints: vec![],
            exported: true,
        },
    );
    let same = Export {
        key: k.clone(),
        service_type: ServiceType::ClusterSetIp,
        ports: vec![port("http", 80)],
    };
    let peers = BTreeMap::from([(
        "east".to_string(),
        Catalog::from([(k.clone(), same.clone())]),
    )]);
    let c = export_conditions(&k, &local, None, &peers);
    assert_eq!(
        (c[0].status, c[1].status, c[1].reason),
        (true, false, "NoConflicts")
    );
    let mut other = same.clone();
    other.ports = vec![port("web", 80)];
    let peers = BTreeMap::from([("east".to_string(), Catalog::from([(k.clone(), other)]))]);
    let c = export_conditions(&k, &local, None, &peers);
    assert_eq!((c[1].status, c[1].reason), (true, "ConflictingPorts"));
    assert!(c[1].message.contains("east"));
    let mut headless = same;
    headless.service_type = ServiceType::Headless;
    let peers = BTreeMap::from([("east".to_string(), Catalog::from([(k.clone(), headless)]))]);
    assert_eq!(
        export_conditions(&k, &local, None, &peers)[1].reason,
        "ConflictingType"
    );
}

#[test]
fn transition_times_move_only_when_status_changes() {
    let new = |status| NewCondition {
        type_: "Valid",
        status,
        reason: "X",
        message: String::new(),
    };
    let first = merge_conditions(&[], &[new(true)], "t1");
    assert_eq!(first[0].last_transition_time, "t1");
    let again = merge_conditions(&first, &[new(true)], "t2");
    assert_eq!(again[0].last_transition_time, "t1");
    let flipped = merge_conditions(&again, &[new(false)], "t3");
    assert_eq!(flipped[0].last_transition_time, "t3");
}

#[test]
fn egress_port_annotations_round_trip_and_skip_garbage() {
    let m = BTreeMap::from([(80, 20_001), (443, 20_002)]);
    assert_eq!(format_egress_ports(&m), "80=20001,443=20002");
    assert_eq!(parse_egress_ports("80=20001, 443=20002"), m);
    assert_eq!(parse_egress_ports("x=1,80=,=5,80=20001,99999=1").len(), 1);
}

#[test]
fn colliding_mirror_names_are_written_once_and_reported() {
    // `api` from cluster `prod-east` and `api-prod` from `east`.
    let mut a = import("shop", "api", &[("http", 80, &["prod-east"])]);
    a.peers = vec!["prod-east".into()];
    let b = import("shop", "api-prod", &[("http", 80, &["east"])]);
    let t = table(vec![a, b]);
    let (alloc, _) = allocate(&BTreeMap::new(), &wanted(&t), 20_000..=20_999);
    let d = plan(&t, &alloc, &BTreeMap::new(), &[]);
    let names: Vec<String> = d
        .services
        .iter()
        .map(|s| s.metadata.name.clone().unwrap_or_default())
        .collect();
    assert_eq!(
        names.iter().filter(|n| *n == "api-prod-east").count(),
        1,
        "{names:?}"
    );
    assert_eq!(d.collisions.len(), 1);
    assert!(
        d.collisions[0].contains("api-prod-east"),
        "{:?}",
        d.collisions
    );
}

#[test]
fn strait_labels_written_by_someone_else_do_not_make_a_mirror() {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;
    let t = table(vec![import("shop", "web", &[("http", 80, &["east"])])]);
    let (alloc, _) = allocate(&BTreeMap::new(), &wanted(&t), 20_000..=20_999);
    let d = plan(&t, &alloc, &BTreeMap::new(), &[]);
    let mut svc = d.services[0].clone();
    assert!(is_ours(&svc), "no field managers tracked: labels decide");
    let entry = |manager: &str| ManagedFieldsEntry {
        manager: Some(manager.into()),
        operation: Some("Apply".into()),
        ..Default::default()
    };
    svc.metadata.managed_fields = Some(vec![entry("kubectl")]);
    assert!(!is_ours(&svc), "labels copied by kubectl");
    assert!(
        observe([&svc]).allocations.is_empty(),
        "and no allocation read from it"
    );
    svc.metadata.managed_fields = Some(vec![entry("kubectl-edit"), entry("strait")]);
    assert!(is_ours(&svc), "ours, edited by hand since");
}
