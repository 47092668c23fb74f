use std::collections::BTreeMap;
use std::sync::OnceLock;

use k8s_openapi::api::apps::v1::{DeploymentSpec, DeploymentStatus};
use k8s_openapi::api::core::v1::{
    LoadBalancerIngress, LoadBalancerStatus, ServicePort as KPort, ServiceSpec, ServiceStatus,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinitionCondition, CustomResourceDefinitionStatus,
};
use k8s_openapi::ByteString;
use kube::api::ObjectMeta;
use strait_proxy::identity::{generate_issuer, generate_root, PemPair};

use super::*;
use crate::k8s::crd::LinkStatus;

const NS: &str = "strait-system";
const DAY: Duration = Duration::from_secs(86_400);

fn config_yaml(cluster: &str, trust_domain: Option<&str>) -> String {
    let td = trust_domain
        .map(|t| format!("trustDomain: {t}\n"))
        .unwrap_or_default();
    format!(
        "cluster: {cluster}\n{td}identity:\n  trustAnchors: /var/run/strait/issuer/ca.crt\n  \
         issuerCert: /var/run/strait/issuer/tls.crt\n  issuerKey: /var/run/strait/issuer/tls.key\n\
         source:\n  kubernetes:\n    namespace: {NS}\nimports:\n  dnsTtlSeconds: 7\n"
    )
}

fn config_map(name: &str, key: &str, text: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(key.to_string(), text.to_string())])),
        ..Default::default()
    }
}

fn gateway_config(cluster: &str) -> ConfigMap {
    config_map(
        objects::CONFIG_MAP,
        objects::CONFIG_KEY,
        &config_yaml(cluster, None),
    )
}

/// `(ip, hostname)` ingress entries; `None` for a Service that is not a
/// LoadBalancer.
fn service(type_: &str, ingress: &[(&str, &str)], port: i32) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(objects::GATEWAY_SERVICE.into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some(type_.into()),
            cluster_ip: Some("10.96.0.10".into()),
            ports: Some(vec![
                KPort {
                    name: Some("tunnel-tcp".into()),
                    port,
                    protocol: Some("TCP".into()),
                    ..Default::default()
                },
                KPort {
                    name: Some("tunnel-udp".into()),
                    port,
                    protocol: Some("UDP".into()),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        status: Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(
                    ingress
                        .iter()
                        .map(|(ip, host)| LoadBalancerIngress {
                            ip: (!ip.is_empty()).then(|| ip.to_string()),
                            hostname: (!host.is_empty()).then(|| host.to_string()),
                            ..Default::default()
                        })
                        .collect(),
                ),
            }),
            ..Default::default()
        }),
    }
}

fn dns_service(ip: &str) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(objects::DNS_SERVICE.into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(ip.into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

struct Pki {
    root: PemPair,
    issuer: PemPair,
    other_root: PemPair,
}

fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let root = generate_root("test").expect("root");
        let issuer = generate_issuer(&root, "west.strait.local").expect("issuer");
        let other_root = generate_root("other").expect("root");
        Pki {
            root,
            issuer,
            other_root,
        }
    })
}

fn secret(entries: &[(&str, &str)]) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(objects::ISSUER_SECRET.into()),
            ..Default::default()
        },
        data: Some(
            entries
                .iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        ..Default::default()
    }
}

fn issuer_secret() -> Secret {
    let p = pki();
    secret(&[
        ("tls.crt", &p.issuer.cert_pem),
        ("tls.key", &p.issuer.key_pem),
        ("ca.crt", &p.root.cert_pem),
    ])
}

fn root_fingerprint() -> String {
    anchor_fingerprint(pki().root.cert_pem.as_bytes()).expect("fingerprint")
}

// ---------------------------------------------------------------------------
// strait link
// ---------------------------------------------------------------------------

fn request(name: &str) -> LinkRequest {
    LinkRequest {
        name: name.into(),
        namespace: NS.into(),
        addresses: Vec::new(),
        accept_namespaces: Vec::new(),
        transport: LinkTransport::Quic,
        issuer_secret: objects::ISSUER_SECRET.into(),
    }
}

fn link_objects(svc: Fetched<Service>) -> LinkObjects {
    LinkObjects {
        config: Ok(Some(gateway_config("west"))),
        service: svc,
        issuer: Ok(Some(issuer_secret())),
    }
}

fn parse_link(yaml: &str) -> Link {
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(yaml).expect("the manifest parses");
    let link = docs
        .into_iter()
        .find(|d| d["kind"] == "Link")
        .expect("a Link in the manifest");
    serde_json::from_value(link).expect("a valid Link")
}

fn parse_secret(yaml: &str) -> Secret {
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(yaml).expect("the manifest parses");
    let secret = docs
        .into_iter()
        .find(|d| d["kind"] == "Secret")
        .expect("a Secret in the manifest");
    serde_json::from_value(secret).expect("a valid Secret")
}

#[test]
fn link_takes_load_balancer_ips_and_hostnames_with_the_tunnel_port() {
    let objects = link_objects(Ok(Some(service(
        "LoadBalancer",
        &[("203.0.113.7", ""), ("", "gw-west.elb.example.com")],
        4143,
    ))));
    let yaml = link_manifest(&request("west"), &objects).expect("renders");
    let link = parse_link(&yaml);
    assert_eq!(link.metadata.name.as_deref(), Some("west"));
    assert_eq!(link.metadata.namespace.as_deref(), Some(NS));
    assert_eq!(link.spec.cluster, "west");
    assert_eq!(
        link.spec.addresses,
        ["203.0.113.7:4143", "gw-west.elb.example.com:4143"]
    );
    assert_eq!(link.spec.port, 4143);
    assert_eq!(
        link.spec.identity.as_deref(),
        Some("spiffe://west.strait.local/ns/strait-system/sa/strait-gateway")
    );
    assert_eq!(
        link.spec.trust_bundle_secret.as_deref(),
        Some("strait-anchors-west")
    );
    assert!(link.spec.accept.is_none());
    assert!(link.status.is_none());
    assert!(yaml.starts_with("# Link to cluster west"), "{yaml}");
    assert!(
        yaml.contains(&format!("#   {}\n", root_fingerprint())),
        "{yaml}"
    );
    assert!(yaml.contains("apiVersion: strait.io/v1alpha1"), "{yaml}");
    assert!(yaml.contains("kind: Link"), "{yaml}");
    // The anchors travel in a Secret next to the Link: only ca.crt, never
    // the issuer's key.
    let secret = parse_secret(&yaml);
    assert_eq!(secret.metadata.name.as_deref(), Some("strait-anchors-west"));
    let data = secret.data.expect("data");
    assert_eq!(data.keys().collect::<Vec<_>>(), ["ca.crt"]);
    assert_eq!(data["ca.crt"].0, pki().root.cert_pem.as_bytes());
    assert_eq!(
        yaml,
        link_manifest(&request("west"), &objects).expect("renders"),
        "deterministic"
    );
    // What the gateway in the peer makes of it.
    let pem = String::from_utf8(data["ca.crt"].0.clone()).expect("pem");
    let lookup = move |_: &str| Ok::<_, String>(pem.clone());
    let (entries, errors) = crate::k8s::links::link_entries([&link], "east", &lookup);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(entries[0].name, "west");
    assert!(entries[0].trust_bundle.is_some());
}

#[test]
fn link_uses_the_service_port_and_the_trust_domain_of_the_config() {
    let mut objects = link_objects(Ok(Some(service("LoadBalancer", &[("10.0.0.1", "")], 443))));
    objects.config = Ok(Some(config_map(
        objects::CONFIG_MAP,
        objects::CONFIG_KEY,
        &config_yaml("west", Some("prod.example.org")),
    )));
    let mut req = request("west");
    req.accept_namespaces = vec!["shop".into(), "web".into()];
    req.transport = LinkTransport::Auto;
    let link = parse_link(&link_manifest(&req, &objects).expect("renders"));
    assert_eq!(link.spec.addresses, ["10.0.0.1:443"]);
    assert_eq!(link.spec.port, 443);
    assert_eq!(link.spec.transport, LinkTransport::Auto);
    assert_eq!(
        link.spec.identity.as_deref(),
        Some("spiffe://prod.example.org/ns/strait-system/sa/strait-gateway")
    );
    assert_eq!(
        link.spec.accept.expect("accept").namespaces,
        ["shop", "web"]
    );
}

#[test]
fn address_flags_override_the_load_balancer() {
    let objects = link_objects(Ok(Some(service("LoadBalancer", &[("10.0.0.1", "")], 4143))));
    let mut req = request("west");
    req.addresses = vec![
        "gw.west.example".into(),
        "198.51.100.1:5000".into(),
        "fd00::1".into(),
    ];
    let link = parse_link(&link_manifest(&req, &objects).expect("renders"));
    assert_eq!(
        link.spec.addresses,
        [
            "gw.west.example:4143",
            "198.51.100.1:5000",
            "[fd00::1]:4143"
        ]
    );
    // Without the Service (a NodePort setup, say) --address still works.
    let objects = link_objects(Ok(None));
    req.addresses = vec!["node1.example:30143".into()];
    let link = parse_link(&link_manifest(&req, &objects).expect("renders"));
    assert_eq!(link.spec.addresses, ["node1.example:30143"]);
    for bad in ["", "http://x", "a b", "host:0", "host:port", ":4143"] {
        req.addresses = vec![bad.into()];
        let err = link_manifest(&req, &objects).expect_err(bad);
        assert!(
            matches!(
                err,
                CtlError::InvalidFlag {
                    flag: "--address",
                    ..
                }
            ),
            "{bad}: {err}"
        );
    }
}

#[test]
fn a_pending_load_balancer_is_a_clear_error_suggesting_address() {
    let err = link_manifest(
        &request("west"),
        &link_objects(Ok(Some(service("LoadBalancer", &[], 4143)))),
    )
    .expect_err("no address");
    let msg = err.to_string();
    assert!(matches!(err, CtlError::NoAddress(_)), "{msg}");
    assert!(
        msg.contains("pending") && msg.contains("--address"),
        "{msg}"
    );

    let err = link_manifest(
        &request("west"),
        &link_objects(Ok(Some(service("ClusterIP", &[], 4143)))),
    )
    .expect_err("no address");
    assert!(err.to_string().contains("type ClusterIP"), "{err}");
    assert!(err.to_string().contains("--address"), "{err}");
}

#[test]
fn the_name_must_be_this_clusters() {
    let err = link_manifest(
        &request("east"),
        &link_objects(Ok(Some(service("LoadBalancer", &[("10.0.0.1", "")], 4143)))),
    )
    .expect_err("wrong name");
    let msg = err.to_string();
    assert!(matches!(err, CtlError::NameMismatch { .. }), "{msg}");
    assert!(
        msg.contains("--name east") && msg.contains("cluster `west`") && msg.contains("--context"),
        "{msg}"
    );
}

#[test]
fn missing_objects_and_errors_are_named() {
    let svc = Ok(Some(service("LoadBalancer", &[("10.0.0.1", "")], 4143)));
    let mut objects = link_objects(svc.clone());
    objects.config = Ok(None);
    let msg = link_manifest(&request("west"), &objects)
        .expect_err("no config")
        .to_string();
    assert!(msg.contains("ConfigMap strait-gateway-config not found in namespace strait-system"));

    objects.config = Err("forbidden".into());
    let msg = link_manifest(&request("west"), &objects)
        .expect_err("error")
        .to_string();
    assert!(
        msg.contains("reading ConfigMap strait-gateway-config: forbidden"),
        "{msg}"
    );

    objects.config = Ok(Some(config_map(objects::CONFIG_MAP, "other", "")));
    let msg = link_manifest(&request("west"), &objects)
        .expect_err("no key")
        .to_string();
    assert!(msg.contains("has no key config.yaml"), "{msg}");

    let mut objects = link_objects(svc.clone());
    objects.issuer = Ok(None);
    let msg = link_manifest(&request("west"), &objects)
        .expect_err("no secret")
        .to_string();
    assert!(msg.contains("Secret strait-issuer not found"), "{msg}");

    objects.issuer = Ok(Some(secret(&[("tls.crt", "x")])));
    let msg = link_manifest(&request("west"), &objects)
        .expect_err("no ca")
        .to_string();
    assert!(msg.contains("has no ca.crt"), "{msg}");

    let mut objects = link_objects(Err("connection refused".into()));
    let msg = link_manifest(&request("west"), &objects)
        .expect_err("service error")
        .to_string();
    assert!(msg.contains("reading Service strait-gateway"), "{msg}");
    objects.service = svc;
    let mut req = request("west");
    req.accept_namespaces = vec!["Bad_NS".into()];
    let msg = link_manifest(&req, &objects)
        .expect_err("bad ns")
        .to_string();
    assert!(msg.contains("--accept-namespace"), "{msg}");
}

#[test]
fn fingerprints_are_sha256_of_the_first_certificate() {
    assert_eq!(
        fingerprint(b"abc"),
        "BA:78:16:BF:8F:01:CF:EA:41:41:40:DE:5D:AE:22:23:B0:03:61:A3:96:17:7A:9C:B4:10:FF:61:F2:00:15:AD"
    );
    let p = pki();
    let bundle = format!("{}{}", p.root.cert_pem, p.other_root.cert_pem);
    assert_eq!(
        anchor_fingerprint(bundle.as_bytes()).expect("fp"),
        root_fingerprint()
    );
    assert!(anchor_fingerprint(b"nothing").is_err());
}

// ---------------------------------------------------------------------------
// strait check
// ---------------------------------------------------------------------------

fn crd(name: &str, established: bool) -> CustomResourceDefinition {
    CustomResourceDefinition {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        status: Some(CustomResourceDefinitionStatus {
            conditions: Some(vec![CustomResourceDefinitionCondition {
                type_: "Established".into(),
                status: if established { "True" } else { "False" }.into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn deployment(want: i32, ready: i32) -> Deployment {
    Deployment {
        spec: DeploymentSpec {
            replicas: Some(want),
            ..Default::default()
        },
        status: Some(DeploymentStatus {
            ready_replicas: Some(ready),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn cond(type_: &str, status: &str, reason: &str, message: &str) -> Condition {
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        ..Default::default()
    }
}

fn link(name: &str, conditions: Option<Vec<Condition>>) -> Link {
    let mut l = Link::new(
        name,
        LinkSpec {
            cluster: name.into(),
            addresses: vec!["10.0.0.1".into()],
            port: 4143,
            transport: LinkTransport::Quic,
            identity: None,
            trust_bundle_secret: None,
            accept: None,
        },
    );
    l.status = conditions.map(|conditions| LinkStatus {
        conditions,
        last_rtt: Some("1.5ms".into()),
        import_count: 3,
        observed_generation: None,
    });
    l
}

fn healthy_link(name: &str) -> Link {
    link(
        name,
        Some(vec![
            cond("Connected", "True", "Connected", "tunnel up"),
            cond("ImportsSynced", "True", "Synced", "3 services imported"),
        ]),
    )
}

const DNS_IP: &str = "10.96.0.53";

fn corefile(extra: &str) -> String {
    format!(
        ".:53 {{\n    errors\n    kubernetes cluster.local in-addr.arpa ip6.arpa {{\n       pods insecure\n    }}\n    forward . /etc/resolv.conf {{\n       max_concurrent 1000\n    }}\n    cache 30\n}}\n{extra}"
    )
}

fn healthy() -> CheckInputs {
    CheckInputs {
        api: Ok("v1.33.1".into()),
        namespace: NS.into(),
        issuer_secret: objects::ISSUER_SECRET.into(),
        crds: objects::CRDS
            .iter()
            .map(|n| (n.to_string(), Ok(Some(crd(n, true)))))
            .collect(),
        config: Ok(Some(gateway_config("west"))),
        deployment: Ok(Some(deployment(2, 2))),
        gateway_service: Ok(Some(service("LoadBalancer", &[("203.0.113.7", "")], 4143))),
        dns_service: Ok(Some(dns_service(DNS_IP))),
        links: Ok(Some(vec![healthy_link("east"), healthy_link("north")])),
        issuer: Ok(Some(issuer_secret())),
        dns: Some(DnsProbe {
            server: SocketAddr::from(([10, 96, 0, 53], 53)),
            udp: Ok(vec!["1.0.0".into()]),
            tcp: Ok(vec!["1.0.0".into()]),
        }),
        coredns: Ok(Some(config_map(
            objects::COREDNS_CONFIG_MAP,
            objects::COREFILE_KEY,
            &corefile(&stub_domain_snippet(DNS_IP, 5)),
        ))),
        coredns_custom: Ok(None),
    }
}

fn run(inputs: &CheckInputs) -> Vec<CheckResult> {
    evaluate(inputs, SystemTime::now(), 7)
}

fn get<'a>(results: &'a [CheckResult], name: &str) -> &'a CheckResult {
    results
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no check {name}: {results:?}"))
}

fn assert_check(inputs: &CheckInputs, name: &str, status: Status, needle: &str) {
    let results = run(inputs);
    let r = get(&results, name);
    assert_eq!(r.status, status, "{name}: {r:?}");
    assert!(
        r.detail.contains(needle),
        "{name}: {:?} lacks {needle:?}",
        r.detail
    );
}

#[test]
fn a_healthy_install_passes_every_check() {
    let results = run(&healthy());
    let names: Vec<&str> = results.iter().map(|r| r.name).collect();
    assert_eq!(
        names,
        [
            "kubernetes-api",
            "crds",
            "config",
            "gateway",
            "gateway-service",
            "links",
            "imports",
            "issuer",
            "anchor",
            "dns",
            "coredns"
        ]
    );
    for r in &results {
        assert_eq!(r.status, Status::Pass, "{r:?}");
    }
    assert!(!any_failed(&results));
    assert!(get(&results, "anchor").detail.contains(&root_fingerprint()));
    assert!(get(&results, "links")
        .detail
        .contains("east (1.5ms), north (1.5ms)"));
    assert!(get(&results, "imports")
        .detail
        .contains("east (3 imported)"));
    assert!(get(&results, "config").detail.contains("cluster west"));
    assert!(get(&results, "gateway-service")
        .detail
        .contains("203.0.113.7:4143"));
}

#[test]
fn an_unreachable_api_server_is_one_failure_and_dns_is_still_checked() {
    let mut i = healthy();
    i.api = Err("connection refused".into());
    let results = run(&i);
    let names: Vec<&str> = results.iter().map(|r| r.name).collect();
    assert_eq!(names, ["kubernetes-api", "dns"]);
    assert_eq!(results[0].status, Status::Fail);
    assert!(results[0].detail.contains("connection refused"));
    assert_eq!(results[1].status, Status::Pass);
}

#[test]
fn crd_branches() {
    let mut i = healthy();
    i.crds[1].1 = Ok(None);
    assert_check(
        &i,
        "crds",
        Status::Fail,
        "missing: serviceexports.multicluster.x-k8s.io",
    );
    i.crds[1].1 = Err("forbidden".into());
    assert_check(&i, "crds", Status::Fail, "forbidden");
    i.crds[1].1 = Ok(Some(crd(objects::CRDS[1], false)));
    assert_check(&i, "crds", Status::Warn, "not Established");
}

#[test]
fn config_branches() {
    let mut i = healthy();
    i.config = Ok(None);
    assert_check(
        &i,
        "config",
        Status::Fail,
        "not found in namespace strait-system",
    );
    i.config = Err("boom".into());
    assert_check(&i, "config", Status::Fail, "boom");
    i.config = Ok(Some(config_map(
        objects::CONFIG_MAP,
        objects::CONFIG_KEY,
        "cluster: West\n",
    )));
    assert_check(
        &i,
        "config",
        Status::Fail,
        "ConfigMap strait-gateway-config",
    );
}

#[test]
fn gateway_branches() {
    let mut i = healthy();
    i.deployment = Ok(Some(deployment(2, 1)));
    assert_check(&i, "gateway", Status::Warn, "1 of 2 replicas ready");
    i.deployment = Ok(Some(deployment(2, 0)));
    assert_check(&i, "gateway", Status::Fail, "0 of 2 replicas ready");
    i.deployment = Ok(Some(Deployment::default()));
    assert_check(&i, "gateway", Status::Fail, "0 of 1 replicas ready");
    i.deployment = Ok(None);
    assert_check(
        &i,
        "gateway",
        Status::Fail,
        "Deployment strait-gateway not found",
    );
    i.deployment = Err("timeout".into());
    assert_check(&i, "gateway", Status::Fail, "timeout");
}

#[test]
fn gateway_service_branches() {
    let mut i = healthy();
    i.gateway_service = Ok(Some(service("LoadBalancer", &[], 4143)));
    assert_check(&i, "gateway-service", Status::Warn, "pending");
    i.gateway_service = Ok(None);
    assert_check(&i, "gateway-service", Status::Fail, "not found");
    i.gateway_service = Err("nope".into());
    assert_check(&i, "gateway-service", Status::Fail, "nope");
}

#[test]
fn link_branches() {
    let mut i = healthy();
    i.links = Ok(Some(vec![]));
    assert_check(
        &i,
        "links",
        Status::Warn,
        "no Links in namespace strait-system",
    );
    assert!(
        run(&i).iter().all(|r| r.name != "imports"),
        "no imports check without links"
    );
    i.links = Ok(None);
    assert_check(
        &i,
        "links",
        Status::Fail,
        "links.strait.io is not installed",
    );
    i.links = Err("forbidden".into());
    assert_check(&i, "links", Status::Fail, "forbidden");

    let down = link(
        "south",
        Some(vec![
            cond("Connected", "False", "Disconnected", "handshake refused"),
            cond("ImportsSynced", "True", "Synced", ""),
        ]),
    );
    i.links = Ok(Some(vec![healthy_link("east"), down.clone()]));
    assert_check(
        &i,
        "links",
        Status::Fail,
        "not connected: south (cluster south): False Disconnected: handshake refused",
    );
    assert!(!run(&i)[..]
        .iter()
        .any(|r| r.detail.contains("east (cluster")));

    let waiting = link(
        "west2",
        Some(vec![
            cond("Connected", "False", "WaitingForPeer", ""),
            cond("ImportsSynced", "True", "Synced", ""),
        ]),
    );
    i.links = Ok(Some(vec![healthy_link("east"), waiting.clone()]));
    assert_check(
        &i,
        "links",
        Status::Warn,
        "west2 (cluster west2): False WaitingForPeer",
    );
    i.links = Ok(Some(vec![waiting, down]));
    assert_check(
        &i,
        "links",
        Status::Fail,
        "waiting for the peer to dial: west2",
    );

    i.links = Ok(Some(vec![link("fresh", None)]));
    assert_check(
        &i,
        "links",
        Status::Fail,
        "fresh (cluster fresh): no status yet",
    );
    assert_check(&i, "imports", Status::Warn, "not reported yet: fresh");
    assert!(any_failed(&run(&i)));
}

#[test]
fn import_branches() {
    let mut i = healthy();
    i.links = Ok(Some(vec![link(
        "east",
        Some(vec![
            cond("Connected", "True", "Connected", ""),
            cond(
                "ImportsSynced",
                "False",
                "SyncFailed",
                "apply Service web-east: forbidden",
            ),
        ]),
    )]));
    assert_check(
        &i,
        "imports",
        Status::Fail,
        "east (cluster east): False SyncFailed: apply Service web-east: forbidden",
    );
    assert_check(&i, "links", Status::Pass, "east");
}

#[test]
fn certificate_branches() {
    let p = pki();
    let mut i = healthy();
    // A year-long issuer is within 400 days of expiry; a ten-year anchor not.
    let r = evaluate(&i, SystemTime::now(), 400);
    assert_eq!(get(&r, "issuer").status, Status::Fail);
    assert!(get(&r, "issuer").detail.contains("--min-cert-days 400"));
    assert_eq!(get(&r, "anchor").status, Status::Pass);
    // Two years on, the issuer has expired.
    let r = evaluate(&i, SystemTime::now() + DAY * 730, 0);
    assert_eq!(get(&r, "issuer").status, Status::Fail);
    assert!(get(&r, "issuer").detail.contains("expired on"), "{r:?}");
    assert_eq!(get(&r, "anchor").status, Status::Pass);
    // And eleven years on, the anchor too, still with its fingerprint.
    let r = evaluate(&i, SystemTime::now() + DAY * 4000, 0);
    assert!(get(&r, "anchor").detail.contains("expired on"));
    assert!(get(&r, "anchor").detail.contains(&root_fingerprint()));
    // Before they were made.
    let r = evaluate(&i, SystemTime::now() - DAY * 30, 0);
    assert!(
        get(&r, "anchor").detail.contains("not valid before"),
        "{r:?}"
    );

    i.issuer = Ok(Some(secret(&[
        ("tls.crt", &p.issuer.cert_pem),
        ("tls.key", &p.issuer.key_pem),
        ("ca.crt", &p.other_root.cert_pem),
    ])));
    assert_check(&i, "issuer", Status::Fail, "not signed by a trust anchor");
    assert_check(&i, "anchor", Status::Pass, "SHA-256");
    // A bundle holding the right anchor too is fine.
    let bundle = format!("{}{}", p.other_root.cert_pem, p.root.cert_pem);
    i.issuer = Ok(Some(secret(&[
        ("tls.crt", &p.issuer.cert_pem),
        ("tls.key", &p.issuer.key_pem),
        ("ca.crt", &bundle),
    ])));
    assert_check(&i, "issuer", Status::Pass, "valid until");

    i.issuer = Ok(Some(secret(&[
        ("tls.crt", &p.issuer.cert_pem),
        ("ca.crt", &p.root.cert_pem),
    ])));
    assert_check(&i, "issuer", Status::Fail, "no tls.key");
    i.issuer = Ok(Some(secret(&[("tls.key", "k"), ("ca.crt", "garbage")])));
    assert_check(&i, "issuer", Status::Fail, "no tls.crt");
    assert_check(&i, "anchor", Status::Fail, "ca.crt: no PEM certificate");
    i.issuer = Ok(None);
    assert_check(&i, "issuer", Status::Fail, "Secret strait-issuer not found");
    assert_check(&i, "anchor", Status::Fail, "Secret strait-issuer not found");
    i.issuer = Err("forbidden".into());
    assert_check(&i, "anchor", Status::Fail, "forbidden");
}

#[test]
fn dns_branches() {
    let mut i = healthy();
    let server = SocketAddr::from(([127, 0, 0, 1], 5353));
    let probe = |udp: Result<Vec<String>, String>, tcp: Result<Vec<String>, String>| DnsProbe {
        server,
        udp,
        tcp,
    };
    let good = || Ok(vec!["1.0.0".to_string()]);
    let timeout = || Err("no answer within 2s".to_string());
    i.dns = Some(probe(timeout(), good()));
    assert_check(
        &i,
        "dns",
        Status::Pass,
        "over TCP (UDP: no answer within 2s)",
    );
    i.dns = Some(probe(good(), timeout()));
    assert_check(&i, "dns", Status::Pass, "over UDP (TCP: no answer");
    i.dns = Some(probe(Ok(vec!["2.0.0".into()]), timeout()));
    assert_check(&i, "dns", Status::Warn, "expected \"1.0.0\"");
    i.dns = Some(probe(timeout(), Err("connect: refused".into())));
    assert_check(&i, "dns", Status::Fail, "127.0.0.1:5353: no answer");
    assert_check(
        &i,
        "dns",
        Status::Fail,
        "port-forward service/strait-dns 5353:53",
    );
    i.dns = None;
    assert_check(
        &i,
        "dns",
        Status::Fail,
        "has no ClusterIP; pass --dns-server",
    );
    i.dns_service = Ok(None);
    assert_check(&i, "dns", Status::Fail, "Service strait-dns not found");
}

#[test]
fn coredns_branches() {
    let mut i = healthy();
    let cm = |text: &str| {
        Ok(Some(config_map(
            objects::COREDNS_CONFIG_MAP,
            objects::COREFILE_KEY,
            text,
        )))
    };
    i.coredns = cm(&corefile(""));
    // The snippet carries the ClusterIP and the config's DNS TTL.
    assert_check(
        &i,
        "coredns",
        Status::Warn,
        "no clusterset.local server block",
    );
    assert_check(&i, "coredns", Status::Warn, &stub_domain_snippet(DNS_IP, 7));
    i.coredns = cm(&corefile(
        "clusterset.local:53 {\n    forward . 10.0.0.99\n}\n",
    ));
    assert_check(
        &i,
        "coredns",
        Status::Warn,
        "forwards to [10.0.0.99], not to",
    );
    i.coredns = cm(&corefile(
        "clusterset.local {\n  forward . dns://10.96.0.53:53\n}\n",
    ));
    assert_check(&i, "coredns", Status::Pass, "forwards to 10.96.0.53");
    i.coredns = Ok(Some(config_map(objects::COREDNS_CONFIG_MAP, "other", "")));
    assert_check(&i, "coredns", Status::Warn, "has no Corefile");
    i.coredns = Ok(None);
    assert_check(&i, "coredns", Status::Warn, "not found (not CoreDNS?)");
    i.coredns = Err("forbidden".into());
    assert_check(&i, "coredns", Status::Fail, "forbidden");
    i.coredns = cm(&corefile(&stub_domain_snippet(DNS_IP, 5)));
    i.dns_service = Ok(None);
    assert_check(&i, "coredns", Status::Warn, "ClusterIP is unknown");
}

#[test]
fn corefile_parsing() {
    assert_eq!(corefile_clusterset_forwards(&corefile("")), None);
    assert_eq!(
        corefile_clusterset_forwards(&stub_domain_snippet("10.1.1.1", 5)),
        Some(vec!["10.1.1.1".into()])
    );
    let multi = "# comment { \nclusterset.local.:53 other.local:53 {\n  errors # {\n  forward . 10.1.1.1:53 10.1.1.2 {\n    policy sequential\n  }\n}\n";
    assert_eq!(
        corefile_clusterset_forwards(multi),
        Some(vec!["10.1.1.1:53".into(), "10.1.1.2".into()])
    );
    // A forward nested deeper, or in another block, does not count.
    let other = ".:53 {\n  forward . 8.8.8.8\n}\nclusterset.local:53 {\n  errors\n}\n";
    assert_eq!(corefile_clusterset_forwards(other), Some(vec![]));
    // `clusterset.local` inside another block's plugin args is not a key.
    let inner = ".:53 {\n  rewrite name clusterset.local x {\n  }\n}\n";
    assert_eq!(corefile_clusterset_forwards(inner), None);
    assert_eq!(host_of("dns://10.0.0.1:53"), "10.0.0.1");
    assert_eq!(host_of("[fd00::1]:53"), "fd00::1");
    assert_eq!(host_of("fd00::1"), "fd00::1");
}

#[test]
fn text_is_aligned_and_json_is_an_array() {
    let results = vec![
        CheckResult::new("crds", Status::Pass, "installed"),
        CheckResult::new("gateway-service", Status::Warn, "pending"),
        CheckResult::new("dns", Status::Fail, "no answer\nhint line"),
    ];
    let text = render_text(&results);
    assert_eq!(
        text,
        "√ crds             installed\n\
         ‼ gateway-service  pending\n\
         × dns              no answer\n\
         \x20                    hint line\n\
         \n\
         Status check results are ×: 1 failed, 1 warning(s)\n"
    );
    assert!(render_text(&results[..1]).ends_with("Status check results are √\n"));
    assert!(render_text(&results[..2]).ends_with("√ (1 warning(s))\n"));
    let json: serde_json::Value =
        serde_json::from_str(&render_json(&results).expect("json")).expect("parses");
    assert_eq!(json[1]["name"], "gateway-service");
    assert_eq!(json[1]["status"], "warn");
    assert_eq!(json[2]["status"], "fail");
    assert_eq!(json[2]["detail"], "no answer\nhint line");
    assert!(any_failed(&results));
}

#[test]
fn dns_replies_are_parsed_and_checked() {
    use hickory_proto::op::{Message, OpCode, ResponseCode};
    use hickory_proto::rr::rdata::TXT;
    use hickory_proto::rr::{Name, RData, Record};
    let (id, query) = dns_version_query().expect("query");
    let q = Message::from_vec(&query).expect("decodes");
    assert_eq!(q.queries.len(), 1);
    let mut reply = Message::response(id, OpCode::Query);
    reply.add_answer(Record::from_rdata(
        Name::from_ascii(objects::DNS_VERSION_NAME).expect("name"),
        5,
        RData::TXT(TXT::new(vec!["1.0.0".into()])),
    ));
    let bytes = reply.to_vec().expect("encodes");
    assert_eq!(parse_txt_reply(id, &bytes), Ok(vec!["1.0.0".to_string()]));
    assert!(parse_txt_reply(id.wrapping_add(1), &bytes)
        .expect_err("id")
        .starts_with("reply id"));
    let nx = Message::error_msg(id, OpCode::Query, ResponseCode::NXDomain)
        .to_vec()
        .expect("encodes");
    assert!(parse_txt_reply(id, &nx)
        .expect_err("rcode")
        .contains("rcode"));
    assert!(parse_txt_reply(id, b"\x01").is_err());
}

/// Answers `dns-version` TXT over UDP, once per datagram.
async fn udp_responder(version: &'static str) -> SocketAddr {
    use hickory_proto::op::{Message, OpCode};
    use hickory_proto::rr::rdata::TXT;
    use hickory_proto::rr::{RData, Record};
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = socket.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut r = Message::response(q.metadata.id, OpCode::Query);
            // A stray reply with the wrong id first: the probe must skip it.
            let stray = Message::response(q.metadata.id.wrapping_add(1), OpCode::Query);
            let _ = socket
                .send_to(&stray.to_vec().expect("encodes"), from)
                .await;
            let name = q.queries[0].name().clone();
            r.add_answer(Record::from_rdata(
                name,
                5,
                RData::TXT(TXT::new(vec![version.into()])),
            ));
            let _ = socket.send_to(&r.to_vec().expect("encodes"), from).await;
        }
    });
    addr
}

#[tokio::test]
async fn the_probe_asks_over_udp_and_tcp_and_never_hangs() {
    let addr = udp_responder("1.0.0").await;
    let started = std::time::Instant::now();
    let probe = probe_dns(addr, Duration::from_secs(2)).await;
    assert_eq!(probe.udp, Ok(vec!["1.0.0".to_string()]));
    // Nothing listens on TCP there: refused or timed out, within bounds.
    assert!(probe.tcp.is_err());
    assert!(started.elapsed() < Duration::from_secs(5));

    // A server that never answers: both fail within the timeout.
    let silent = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let started = std::time::Instant::now();
    let probe = probe_dns(
        silent.local_addr().expect("addr"),
        Duration::from_millis(300),
    )
    .await;
    assert!(
        probe
            .udp
            .as_ref()
            .expect_err("timeout")
            .contains("no answer within"),
        "{probe:?}"
    );
    assert!(probe.tcp.is_err());
    assert!(started.elapsed() < Duration::from_secs(2));
    let mut i = healthy();
    i.dns = Some(probe);
    assert_check(&i, "dns", Status::Fail, "no answer");
}

#[test]
fn gateways_table_lists_each_peer_alive_or_why_not() {
    let link = |cluster: &str, connected: Option<(&str, &str, &str)>, imports: u32| {
        let mut l = Link::new(
            cluster,
            LinkSpec {
                cluster: cluster.into(),
                addresses: vec![],
                port: 4143,
                transport: LinkTransport::Quic,
                identity: None,
                trust_bundle_secret: None,
                accept: None,
            },
        );
        l.status = connected.map(|(status, reason, message)| LinkStatus {
            conditions: vec![Condition {
                type_: "Connected".into(),
                status: status.into(),
                reason: reason.into(),
                message: message.into(),
                ..Default::default()
            }],
            last_rtt: (status == "True").then(|| "1.2ms".into()),
            import_count: imports,
            observed_generation: None,
        });
        l
    };
    let rows = gateway_rows(&[
        link("north", None, 0),
        link("east", Some(("True", "Connected", "tunnel up")), 3),
        link("south", Some(("False", "Disconnected", "timed out")), 0),
    ]);
    let names: Vec<&str> = rows.iter().map(|r| r.cluster.as_str()).collect();
    assert_eq!(names, ["east", "north", "south"]);
    assert!(rows[0].alive && rows[0].imports == 3 && rows[0].detail.is_empty());
    assert_eq!(rows[1].detail, "no status yet");
    assert_eq!(rows[2].detail, "Disconnected: timed out");
    let text = render_gateways(&rows);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("CLUSTER") && lines[0].contains("ALIVE"),
        "{text}"
    );
    assert!(
        lines[1].starts_with("east") && lines[1].contains("True") && lines[1].contains("1.2ms"),
        "{text}"
    );
    assert_eq!(lines.len(), 4);
}

#[test]
fn a_stub_domain_in_coredns_custom_counts_when_the_corefile_imports_it() {
    let mut i = healthy();
    let importing = ".:53 {\n    errors\n    import /etc/coredns/custom/*.server\n    forward . /etc/resolv.conf\n}\n";
    i.coredns = Ok(Some(config_map(
        objects::COREDNS_CONFIG_MAP,
        objects::COREFILE_KEY,
        importing,
    )));
    assert_check(
        &i,
        "coredns",
        Status::Warn,
        "no clusterset.local server block",
    );
    i.coredns_custom = Ok(Some(config_map(
        objects::COREDNS_CUSTOM_CONFIG_MAP,
        "strait.server",
        &stub_domain_snippet(DNS_IP, 5),
    )));
    assert_check(&i, "coredns", Status::Pass, DNS_IP);
    // Not imported: a custom file alone does nothing.
    i.coredns = Ok(Some(config_map(
        objects::COREDNS_CONFIG_MAP,
        objects::COREFILE_KEY,
        ".:53 {\n    forward . /etc/resolv.conf\n}\n",
    )));
    assert_check(
        &i,
        "coredns",
        Status::Warn,
        "no clusterset.local server block",
    );
}
