use super::*;
use crate::catalog::Export;

fn export(ns: &str, name: &str, ports: &[(u16, &str)]) -> Export {
    Export {
        key: ServiceKey::new(ns, name),
        service_type: ServiceType::ClusterSetIp,
        ports: ports
            .iter()
            .map(|(p, n)| Port {
                name: n.to_string(),
                port: *p,
                protocol: Protocol::Tcp,
                app_protocol: None,
            })
            .collect(),
    }
}

fn catalogs(rows: &[(&str, Vec<Export>)]) -> BTreeMap<String, Catalog> {
    rows.iter()
        .map(|(peer, exports)| {
            (
                peer.to_string(),
                exports.iter().map(|e| (e.key.clone(), e.clone())).collect(),
            )
        })
        .collect()
}

#[test]
fn a_service_exported_by_two_peers_is_one_import_with_merged_ports() {
    let c = catalogs(&[
        ("east", vec![export("demo", "hello", &[(8080, "http")])]),
        (
            "north",
            vec![export("demo", "hello", &[(8080, "web"), (9090, "admin")])],
        ),
    ]);
    let p = plan(&c);
    let hello = &p[&ServiceKey::new("demo", "hello")];
    assert_eq!(hello.peers, vec!["east", "north"]);
    let ports: Vec<_> = hello
        .ports
        .iter()
        .map(|p| (p.port, p.name.as_str()))
        .collect();
    assert_eq!(
        ports,
        vec![(8080, "http"), (9090, "admin")],
        "first peer's name wins"
    );
}

#[test]
fn vips_are_stable_in_range_and_distinct() {
    let keys: Vec<ServiceKey> = (0..2000)
        .map(|i| ServiceKey::new("ns", format!("svc-{i}")))
        .collect();
    let mut a = VipAllocator::default();
    let first = a.assign(keys.iter());
    let distinct: BTreeSet<_> = first.values().collect();
    assert_eq!(distinct.len(), keys.len());
    for ip in first.values() {
        let o = ip.octets();
        assert_eq!((o[0], o[1]), (127, 77));
        assert!(o[2] != 0 && o[3] != 0 && o[3] != 255, "{ip}");
    }
    // A fresh allocator (a restart) given the same keys in another order
    // derives the same addresses, except where collisions were probed.
    let mut b = VipAllocator::default();
    let again = b.assign(keys.iter().rev());
    let same = first.iter().filter(|(k, v)| again[*k] == **v).count();
    assert!(same >= keys.len() * 95 / 100, "{same}");
}

#[test]
fn persisted_vips_survive_a_restart_exactly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vips.json");
    let keys: Vec<ServiceKey> = (0..500)
        .map(|i| ServiceKey::new("ns", format!("s{i}")))
        .collect();
    let first = VipAllocator::new(default_range(), Some(path.clone())).assign(keys.iter());
    let again = VipAllocator::new(default_range(), Some(path)).assign(keys.iter().rev());
    assert_eq!(first, again);
}

#[test]
fn removed_imports_release_their_address() {
    let mut a = VipAllocator::default();
    let k1 = ServiceKey::new("a", "one");
    let k2 = ServiceKey::new("a", "two");
    a.assign([&k1, &k2]);
    let after = a.assign([&k2]);
    assert_eq!(after.len(), 1);
    assert!(after.contains_key(&k2));
}

#[test]
fn table_follows_catalogs() {
    let mut vips = VipAllocator::default();
    let c = catalogs(&[("east", vec![export("demo", "hello", &[(8080, "http")])])]);
    let t = build_table(&c, &mut vips);
    assert_eq!(t.len(), 1);
    let hello = &t[&ServiceKey::new("demo", "hello")];
    assert_eq!(hello.dns_name(), "hello.demo.svc.clusterset.local");
    assert!(build_table(&BTreeMap::new(), &mut vips).is_empty());
}

#[test]
fn a_small_custom_range_is_used_and_exhausted_cleanly() {
    let range: ipnet::Ipv4Net = "127.90.1.0/24".parse().expect("cidr");
    let mut a = VipAllocator::new(range, None);
    let keys: Vec<ServiceKey> = (0..300)
        .map(|i| ServiceKey::new("ns", format!("s{i}")))
        .collect();
    let got = a.assign(keys.iter());
    assert_eq!(got.len(), 254, ".0 and .255 are never used");
    assert!(got.values().all(|ip| range.contains(ip)));
}

#[test]
fn peers_are_known_per_port() {
    let c = catalogs(&[
        ("east", vec![export("demo", "hello", &[(8080, "http")])]),
        (
            "north",
            vec![export("demo", "hello", &[(8080, "http"), (9090, "admin")])],
        ),
    ]);
    let mut vips = VipAllocator::default();
    let t = build_table(&c, &mut vips);
    let hello = &t[&ServiceKey::new("demo", "hello")];
    assert_eq!(hello.peers_for(8080), vec!["east", "north"]);
    assert_eq!(hello.peers_for(9090), vec!["north"]);
    assert!(hello.peers_for(1).is_empty());
}

#[test]
fn a_corrupt_state_file_never_gives_two_services_one_address() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vips.json");
    std::fs::write(
        &path,
        r#"[["a","x","127.77.5.5"],["a","y","127.77.5.5"],["a","z","127.77.0.9"],["a","w","127.77.9.255"]]"#,
    )
    .expect("write");
    let keys = [
        ServiceKey::new("a", "x"),
        ServiceKey::new("a", "y"),
        ServiceKey::new("a", "z"),
        ServiceKey::new("a", "w"),
    ];
    let got = VipAllocator::new(default_range(), Some(path)).assign(keys.iter());
    let distinct: BTreeSet<_> = got.values().collect();
    assert_eq!(distinct.len(), 4);
    assert_eq!(
        got[&keys[0]],
        Ipv4Addr::new(127, 77, 5, 5),
        "the first claim keeps it"
    );
    for ip in got.values() {
        let o = ip.octets();
        assert!(o[2] != 0 && o[3] != 0 && o[3] != 255, "{ip}");
    }
}
