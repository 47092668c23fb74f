use k8s_openapi::api::core::v1::{ObjectReference, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{
    Endpoint as SliceEndpoint, EndpointConditions, EndpointPort, EndpointSlice,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::*;
use crate::k8s::crd::{ServiceExport, ServiceExportSpec};

fn meta(ns: &str, name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        namespace: Some(ns.into()),
        name: Some(name.into()),
        labels: Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        ..Default::default()
    }
}

fn service(ns: &str, name: &str, labels: &[(&str, &str)], ports: &[(&str, i32)]) -> Service {
    Service {
        metadata: meta(ns, name, labels),
        spec: Some(ServiceSpec {
            cluster_ip: Some("10.96.0.10".into()),
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p)| ServicePort {
                        name: Some(n.to_string()),
                        port: *p,
                        protocol: Some("TCP".into()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        status: None,
    }
}

fn slice(
    ns: &str,
    svc: &str,
    name: &str,
    eps: &[(&str, &str, Option<bool>)],
    port: (&str, i32),
) -> EndpointSlice {
    EndpointSlice {
        metadata: meta(ns, name, &[(labels::SERVICE_NAME_K8S, svc)]),
        address_type: "IPv4".into(),
        endpoints: Some(
            eps.iter()
                .map(|(pod, ip, ready)| SliceEndpoint {
                    addresses: vec![ip.to_string()],
                    conditions: Some(EndpointConditions {
                        ready: *ready,
                        ..Default::default()
                    }),
                    target_ref: Some(ObjectReference {
                        kind: Some("Pod".into()),
                        name: Some(pod.to_string()),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
        ),
        ports: Some(vec![EndpointPort {
            name: Some(port.0.into()),
            port: Some(port.1),
            protocol: Some("TCP".into()),
            app_protocol: None,
        }]),
    }
}

fn export(ns: &str, name: &str) -> ServiceExport {
    let mut e = ServiceExport::new(name, ServiceExportSpec {});
    e.metadata.namespace = Some(ns.into());
    e
}

#[test]
fn services_are_exported_by_service_export_or_label() {
    let services = [
        service("shop", "cart", &[], &[("http", 80)]),
        service(
            "shop",
            "web",
            &[("strait.io/export", "true")],
            &[("http", 80)],
        ),
        service(
            "shop",
            "quiet",
            &[("strait.io/export", "false")],
            &[("http", 80)],
        ),
        service("shop", "db", &[], &[("pg", 5432)]),
    ];
    let (state, skipped) = cluster_state(
        &services,
        &[],
        &[export("shop", "cart")],
        &MeshedPods::new(),
        "strait.io/export",
    );
    assert!(skipped.is_empty());
    let exported: Vec<String> = state.catalog().keys().map(|k| k.to_string()).collect();
    assert_eq!(exported, ["shop/cart", "shop/web"]);
    assert_eq!(
        state.services.len(),
        4,
        "unexported services are still known locally"
    );
}

#[test]
fn endpoints_come_from_slices_with_target_ports_and_readiness() {
    let services = [
        service("shop", "cart", &[], &[("http", 80)]),
        service("other", "cart", &[], &[("http", 80)]),
    ];
    let slices = [
        slice(
            "shop",
            "cart",
            "cart-a",
            &[
                ("p1", "10.0.0.1", Some(true)),
                ("p2", "10.0.0.2", Some(false)),
            ],
            ("http", 8080),
        ),
        // The same endpoint in a second slice (mid-rebalance) is one endpoint.
        slice(
            "shop",
            "cart",
            "cart-b",
            &[("p1", "10.0.0.1", None)],
            ("http", 8080),
        ),
        slice(
            "other",
            "cart",
            "cart-x",
            &[("p9", "10.9.9.9", Some(true))],
            ("http", 1),
        ),
    ];
    // p1 and p9 are injected (p9 with the default service account), p2
    // is not; a finished pod and a pod on the host's network claim p2's
    // address, which belongs to neither.
    let mut pods = [
        pod("shop", "p1", true, Some("cart"), "10.0.0.1"),
        pod("shop", "p2", false, Some("cart"), "10.0.0.2"),
        pod("other", "p9", true, None, "10.9.9.9"),
        pod("shop", "old-job", true, Some("x"), "10.0.0.2"),
        pod("kube-system", "node-agent", true, Some("x"), "10.0.0.2"),
    ];
    if let Some(status) = pods[3].status.as_mut() {
        status.phase = Some("Succeeded".into());
    }
    if let Some(spec) = pods[4].spec.as_mut() {
        spec.host_network = Some(true);
    }
    for p in &mut pods {
        trim_pod(p);
    }
    let meshed = meshed_pods(&pods, "west.strait.local");
    assert_eq!(meshed.len(), 2, "{meshed:?}");
    // Another slice names p1's address as something else: the address
    // still leads to p1's sidecar, and keeps its identity.
    let mut slices = slices.to_vec();
    slices.push(slice(
        "shop",
        "cart",
        "cart-c",
        &[("not-p1", "10.0.0.1", Some(true))],
        ("http", 8080),
    ));
    let (state, _) = cluster_state(
        &services,
        &slices,
        &[export("shop", "cart")],
        &meshed,
        "strait.io/export",
    );
    let cart = &state.services[&ServiceKey::new("shop", "cart")];
    assert_eq!(cart.endpoints.len(), 3, "{:?}", cart.endpoints);
    let p1 = cart.endpoints.iter().find(|e| e.name == "p1").expect("p1");
    assert!(p1.ready);
    assert_eq!(p1.target(&cart.ports[0]).port(), 8080);
    let cart_sa = Some("spiffe://west.strait.local/ns/shop/sa/cart");
    assert_eq!(p1.identity.as_ref().map(SpiffeId::as_str), cart_sa);
    let alias = cart
        .endpoints
        .iter()
        .find(|e| e.name == "not-p1")
        .expect("alias");
    assert_eq!(alias.identity.as_ref().map(SpiffeId::as_str), cart_sa);
    let p2 = cart.endpoints.iter().find(|e| e.name == "p2").expect("p2");
    assert!(!p2.ready);
    assert_eq!(p2.identity, None, "not injected");
    let other = &state.services[&ServiceKey::new("other", "cart")];
    assert_eq!(
        other.endpoints[0].identity.as_ref().map(SpiffeId::as_str),
        Some("spiffe://west.strait.local/ns/other/sa/default")
    );
}

/// A pod at `ip`, labelled meshed or not, as the API returns it (a
/// container, annotations, conditions): [`trim_pod`] must keep what
/// matters.
fn pod(ns: &str, name: &str, meshed: bool, sa: Option<&str>, ip: &str) -> Pod {
    use k8s_openapi::api::core::v1::{Container, PodCondition, PodIP, PodSpec, PodStatus};
    let labels: &[(&str, &str)] = if meshed {
        &[(labels::MESHED, "true")]
    } else {
        &[]
    };
    let mut metadata = meta(ns, name, labels);
    metadata.annotations = Some([("big".to_string(), "x".repeat(1000))].into());
    Pod {
        metadata,
        spec: Some(PodSpec {
            service_account_name: sa.map(String::from),
            containers: vec![Container {
                name: "app".into(),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(ip.into()),
            pod_ips: Some(vec![PodIP { ip: ip.into() }]),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

#[test]
fn a_trimmed_pod_keeps_what_identifies_it_only() {
    let mut p = pod("shop", "p1", true, Some("cart"), "10.0.0.1");
    trim_pod(&mut p);
    assert_eq!(p.metadata.annotations, None);
    let status = p.status.expect("status");
    assert_eq!(status.conditions, None);
    assert_eq!(status.phase.as_deref(), Some("Running"));
    assert_eq!(status.pod_ip.as_deref(), Some("10.0.0.1"));
    assert_eq!(status.pod_ips.map(|i| i.len()), Some(1));
    let spec = p.spec.expect("spec");
    assert!(spec.containers.is_empty());
    assert_eq!(spec.service_account_name.as_deref(), Some("cart"));
    assert_eq!(
        p.metadata
            .labels
            .and_then(|l| l.get(labels::MESHED).cloned())
            .as_deref(),
        Some("true")
    );
}

/// A meshed pod's status churn (conditions, a new resourceVersion) leaves
/// its trimmed copy as it was: no change is signalled, so the cluster
/// state is not recomputed for it. Its address, phase or labels changing
/// are changes; so is every delete.
#[test]
fn updates_that_leave_a_trimmed_object_equal_signal_nothing() {
    use kube::runtime::watcher::Event;
    let trimmed = |mut p: Pod, rv: &str| {
        p.metadata.resource_version = Some(rv.into());
        trim_pod(&mut p);
        p
    };
    let (store, mut writer) = reflector::store::<Pod>();
    let first = trimmed(pod("shop", "p1", true, Some("cart"), "10.0.0.1"), "1");
    assert!(!is_unchanged(&store, &Event::Apply(first.clone())), "new");
    writer.apply_watcher_event(&Event::Apply(first.clone()));
    assert!(is_unchanged(&store, &Event::Apply(first.clone())));

    let mut flapped = pod("shop", "p1", true, Some("cart"), "10.0.0.1");
    if let Some(status) = flapped.status.as_mut() {
        status.conditions = None;
        status.start_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ));
    }
    assert!(
        is_unchanged(&store, &Event::Apply(trimmed(flapped, "2"))),
        "status churn"
    );

    let moved = trimmed(pod("shop", "p1", true, Some("cart"), "10.0.0.2"), "3");
    assert!(!is_unchanged(&store, &Event::Apply(moved)), "new address");
    let mut failed = pod("shop", "p1", true, Some("cart"), "10.0.0.1");
    if let Some(status) = failed.status.as_mut() {
        status.phase = Some("Failed".into());
    }
    assert!(
        !is_unchanged(&store, &Event::Apply(trimmed(failed, "4"))),
        "phase"
    );
    let unmeshed = trimmed(pod("shop", "p1", false, Some("cart"), "10.0.0.1"), "5");
    assert!(!is_unchanged(&store, &Event::Apply(unmeshed)), "labels");
    assert!(!is_unchanged(&store, &Event::Delete(first)), "deleted");
}

#[test]
fn mirrors_are_never_exported_and_bad_services_are_reported() {
    let mut external = service("shop", "ext", &[], &[("http", 80)]);
    if let Some(spec) = external.spec.as_mut() {
        spec.type_ = Some("ExternalName".into());
    }
    let mut headless = service("shop", "hl", &[], &[("http", 80)]);
    if let Some(spec) = headless.spec.as_mut() {
        spec.cluster_ip = Some("None".into());
    }
    let services = [
        service(
            "shop",
            "web-east",
            &[(labels::MIRROR, "east"), ("strait.io/export", "true")],
            &[("http", 80)],
        ),
        external,
        headless,
    ];
    let exports = [
        export("shop", "ext"),
        export("shop", "hl"),
        export("shop", "web-east"),
        export("shop", "gone"),
    ];
    let (state, skipped) = cluster_state(
        &services,
        &[],
        &exports,
        &MeshedPods::new(),
        "strait.io/export",
    );
    let keys: Vec<String> = state.catalog().keys().map(|k| k.to_string()).collect();
    assert_eq!(keys, ["shop/hl"]);
    assert_eq!(
        state.services[&ServiceKey::new("shop", "hl")].service_type,
        ServiceType::Headless
    );
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert!(skipped[0].reason.contains("ExternalName"));
}

#[test]
fn only_ready_pods_back_the_mirror() {
    use k8s_openapi::api::core::v1::{Pod, PodCondition, PodIP, PodStatus};
    let pod = |ip: &str, ready: &str| Pod {
        metadata: ObjectMeta::default(),
        spec: None,
        status: Some(PodStatus {
            pod_ip: Some(ip.into()),
            pod_ips: Some(vec![PodIP { ip: ip.into() }]),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: ready.into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    };
    let pods = [
        pod("10.0.0.2", "True"),
        pod("10.0.0.1", "True"),
        pod("10.0.0.3", "False"),
    ];
    let ips: Vec<String> = ready_pod_ips(&pods).iter().map(|i| i.to_string()).collect();
    assert_eq!(ips, ["10.0.0.1", "10.0.0.2"]);
}
