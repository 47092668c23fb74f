//! The real gateway in Kubernetes mode against two fake API servers (the
//! real wire protocol: list/watch, bookmarks, 410 Gone, server-side apply,
//! Leases): export → import, endpoint changes, unexport, dropped watches
//! and relists, and leader failover between two replicas.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{json, Value};
use strait_gateway::k8s::crd::{Link, ServiceExport};
use strait_gateway::Gateway;
use strait_tests::fake_kube::FakeKube;
use strait_tests::{
    dig, eventually, http_get, metrics, sample, spawn_hello_endpoint, unique_egress_ports, Testbed,
};

const NS: &str = "strait-system";
const WAIT: Duration = Duration::from_secs(20);

async fn apply(client: &Client, value: Value) {
    let kind = value["kind"].as_str().expect("kind").to_string();
    let ns = value["metadata"]["namespace"]
        .as_str()
        .unwrap_or(NS)
        .to_string();
    let name = value["metadata"]["name"]
        .as_str()
        .expect("name")
        .to_string();
    let pp = PatchParams::apply("test").force();
    let patch = Patch::Apply(&value);
    let r = match kind.as_str() {
        "Service" => Api::<Service>::namespaced(client.clone(), &ns)
            .patch(&name, &pp, &patch)
            .await
            .map(drop),
        "EndpointSlice" => Api::<EndpointSlice>::namespaced(client.clone(), &ns)
            .patch(&name, &pp, &patch)
            .await
            .map(drop),
        "ServiceExport" => Api::<ServiceExport>::namespaced(client.clone(), &ns)
            .patch(&name, &pp, &patch)
            .await
            .map(drop),
        "Link" => Api::<Link>::namespaced(client.clone(), &ns)
            .patch(&name, &pp, &patch)
            .await
            .map(drop),
        other => panic!("unexpected kind {other}"),
    };
    r.unwrap_or_else(|e| panic!("apply {kind} {ns}/{name}: {e}"));
}

/// A Service `shop/<name>` with one `http` port 80, its EndpointSlice
/// pointing at `backend`, and (when `export`) its ServiceExport.
async fn backend_service(client: &Client, name: &str, backend: SocketAddr, export: bool) {
    apply(
        client,
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}),
    )
    .await;
    set_endpoint(client, name, backend).await;
    if export {
        apply(
            client,
            json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
                "metadata": {"name": name, "namespace": "shop"}}),
        )
        .await;
    }
}

async fn set_endpoint(client: &Client, service: &str, backend: SocketAddr) {
    apply(
        client,
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{service}-abcde"), "namespace": "shop",
                "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [backend.ip().to_string()], "conditions": {"ready": true},
                "targetRef": {"kind": "Pod", "name": format!("{service}-{}", backend.port())}}],
            "ports": [{"name": "http", "port": backend.port(), "protocol": "TCP"}]}),
    )
    .await;
}

/// A ready gateway Pod at `ip` in the gateway namespace.
async fn gateway_pod(client: &Client, name: &str, ip: IpAddr) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS,
            "labels": {"app.kubernetes.io/name": "strait-gateway"}},
        "spec": {"containers": [{"name": "gateway", "image": "strait"}]}}))
    .expect("pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("pod");
    let status = json!({"status": {"podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}],
        "conditions": [{"type": "Ready", "status": "True"}]}});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("pod status");
}

async fn link(client: &Client, peer: &str, addresses: &[String]) {
    apply(
        client,
        json!({"apiVersion": "strait.io/v1alpha1", "kind": "Link",
            "metadata": {"name": peer, "namespace": NS},
            "spec": {"cluster": peer, "addresses": addresses}}),
    )
    .await;
}

fn ours(objects: Vec<Value>) -> Vec<Value> {
    objects
        .into_iter()
        .filter(|o| o["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "strait")
        .collect()
}

fn names(objects: &[Value]) -> Vec<String> {
    let mut v: Vec<String> = objects
        .iter()
        .map(|o| {
            format!(
                "{}/{}",
                o["metadata"]["namespace"].as_str().unwrap_or(""),
                o["metadata"]["name"].as_str().unwrap_or("")
            )
        })
        .collect();
    v.sort();
    v
}

fn egress_port(svc: &Value) -> u16 {
    let a = svc["metadata"]["annotations"]["strait.io/egress-ports"]
        .as_str()
        .expect("egress annotation");
    a.strip_prefix("80=")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("annotation {a}"))
}

fn find<'a>(objects: &'a [Value], name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {:?}", names(objects)))
}

struct Clusters {
    bed: Testbed,
    west: FakeKube,
    east: FakeKube,
    east_gw: Gateway,
    west_ports: std::ops::RangeInclusive<u16>,
}

/// East exports `shop/web` (backed by `backend`) and runs one gateway;
/// west links to it (gateway pods not started yet).
async fn clusters(backend: SocketAddr) -> Clusters {
    let bed = Testbed::new(&["west", "east"]);
    let west = FakeKube::start().await.expect("west API");
    let east = FakeKube::start().await.expect("east API");
    backend_service(&east.client(), "web", backend, true).await;
    link(&east.client(), "west", &[]).await;
    let cfg = bed.kube_config(
        "east",
        "east-0",
        "127.0.0.1".parse().expect("ip"),
        unique_egress_ports(),
    );
    let east_gw = Gateway::start_with_client(cfg, Some(east.client()))
        .await
        .expect("east gateway");
    link(&west.client(), "east", &[east_gw.tunnel_addr().to_string()]).await;
    Clusters {
        bed,
        west,
        east,
        east_gw,
        west_ports: unique_egress_ports(),
    }
}

impl Clusters {
    async fn west_replica(&self, replica: &str, ip: IpAddr) -> Gateway {
        gateway_pod(&self.west.client(), replica, ip).await;
        let cfg = self
            .bed
            .kube_config("west", replica, ip, self.west_ports.clone());
        Gateway::start_with_client(cfg, Some(self.west.client()))
            .await
            .expect("west gateway")
    }

    /// West's Link to east set to `transport`, a west replica started, and
    /// the mirror it writes once east's service is imported.
    async fn west_over(&self, transport: &str) -> (Gateway, Vec<Value>) {
        apply(
            &self.west.client(),
            json!({"apiVersion": "strait.io/v1alpha1", "kind": "Link",
                "metadata": {"name": "east", "namespace": NS},
                "spec": {"cluster": "east", "addresses": [self.east_gw.tunnel_addr().to_string()],
                    "transport": transport}}),
        )
        .await;
        let west = self
            .west_replica("west-0", "127.0.0.1".parse().expect("ip"))
            .await;
        let svcs = self
            .mirrored(&["shop/web-clusterset", "shop/web-east"])
            .await;
        (west, svcs)
    }

    /// West's mirror once it holds exactly `services` (sorted ns/name).
    async fn mirrored(&self, services: &[&str]) -> Vec<Value> {
        let want: Vec<String> = services.iter().map(|s| s.to_string()).collect();
        eventually(WAIT, &format!("west mirrors {want:?}"), || async {
            let svcs = ours(self.west.objects("", "v1", "services"));
            let ready = names(&svcs) == want
                && svcs
                    .iter()
                    .all(|s| s["metadata"]["annotations"]["strait.io/egress-ports"].is_string());
            ready.then_some(svcs)
        })
        .await
    }
}

fn lease_holder(kube: &FakeKube) -> Option<String> {
    kube.objects("coordination.k8s.io", "v1", "leases")
        .into_iter()
        .find(|l| l["metadata"]["name"] == "strait-mirror-writer")
        .and_then(|l| l["spec"]["holderIdentity"].as_str().map(String::from))
}

fn condition<'a>(obj: &'a Value, type_: &str) -> Option<&'a Value> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_becomes_import_follows_endpoints_and_unexport_cleans_up() {
    let web1 = spawn_hello_endpoint("east", "web-1")
        .await
        .expect("backend");
    let c = clusters(web1).await;
    let west = c
        .west_replica("west-0", "127.0.0.1".parse().expect("ip"))
        .await;

    // The import: ServiceImport, clusterset Service, mirror, slices.
    let svcs = c.mirrored(&["shop/web-clusterset", "shop/web-east"]).await;
    let si = eventually(WAIT, "ServiceImport with its IP", || async {
        ours(
            c.west
                .objects("multicluster.x-k8s.io", "v1alpha1", "serviceimports"),
        )
        .into_iter()
        .find(|s| s["metadata"]["name"] == "web" && s["spec"]["ips"][0].is_string())
    })
    .await;
    let clusterset = find(&svcs, "web-clusterset");
    let cluster_ip = clusterset["spec"]["clusterIP"].as_str().expect("ClusterIP");
    assert_eq!(si["spec"]["ips"][0], cluster_ip);
    assert_eq!(si["spec"]["type"], "ClusterSetIP");
    assert_eq!(si["spec"]["ports"][0]["port"], 80);
    let si_status = eventually(WAIT, "ServiceImport status", || async {
        ours(
            c.west
                .objects("multicluster.x-k8s.io", "v1alpha1", "serviceimports"),
        )
        .into_iter()
        .find(|s| s["status"]["clusters"].is_array())
    })
    .await;
    assert_eq!(
        si_status["status"]["clusters"],
        json!([{"cluster": "east"}])
    );
    for s in &svcs {
        let owner = &s["metadata"]["ownerReferences"][0];
        assert_eq!(owner["kind"], "ServiceImport", "{s}");
        assert_eq!(owner["uid"], si["metadata"]["uid"]);
        assert_eq!(
            s["metadata"]["labels"]["multicluster.kubernetes.io/service-name"],
            "web"
        );
    }
    let (cs_port, east_port) = (
        egress_port(clusterset),
        egress_port(find(&svcs, "web-east")),
    );
    assert_ne!(cs_port, east_port);
    assert!(c.west_ports.contains(&cs_port) && c.west_ports.contains(&east_port));
    assert_eq!(clusterset["spec"]["ports"][0]["targetPort"], cs_port);
    let slices = ours(c.west.objects("discovery.k8s.io", "v1", "endpointslices"));
    assert_eq!(names(&slices), ["shop/web-clusterset", "shop/web-east"]);
    let mirror_slice = find(&slices, "web-east");
    assert_eq!(
        mirror_slice["metadata"]["labels"]["multicluster.kubernetes.io/source-cluster"],
        "east"
    );
    assert_eq!(
        mirror_slice["metadata"]["labels"]["kubernetes.io/service-name"],
        "web-east"
    );
    assert_eq!(
        mirror_slice["endpoints"][0]["addresses"],
        json!(["127.0.0.1"])
    );
    assert_eq!(mirror_slice["ports"][0]["port"], east_port);
    assert_eq!(
        mirror_slice["metadata"]["ownerReferences"][0]["kind"],
        "Service"
    );

    // DNS answers the ClusterIP; traffic crosses on the egress ports.
    eventually(WAIT, "DNS answers the ClusterIP", || async {
        (dig(west.dns_addr(), "web.shop.svc.clusterset.local", "A", false) == [cluster_ip])
            .then_some(())
    })
    .await;
    for port in [cs_port, east_port] {
        let body = eventually(WAIT, "traffic through the egress port", || async {
            http_get(SocketAddr::from(([127, 0, 0, 1], port)), "web")
                .await
                .ok()
        })
        .await;
        assert!(body.contains("hello from east/web-1"), "{body}");
    }

    // Status: east's export is valid and conflict-free; west's link is up.
    let export = eventually(WAIT, "ServiceExport conditions", || async {
        c.east
            .objects("multicluster.x-k8s.io", "v1alpha1", "serviceexports")
            .into_iter()
            .find(|e| condition(e, "Valid").is_some())
    })
    .await;
    assert_eq!(
        condition(&export, "Valid").expect("Valid")["status"],
        "True"
    );
    assert_eq!(
        condition(&export, "Conflict").expect("Conflict")["status"],
        "False"
    );
    let l = eventually(WAIT, "Link status", || async {
        c.west
            .objects("strait.io", "v1alpha1", "links")
            .into_iter()
            .find(|l| {
                condition(l, "Connected").is_some_and(|c| c["status"] == "True")
                    && l["status"]["importCount"] == 1
            })
    })
    .await;
    assert_eq!(
        condition(&l, "ImportsSynced").expect("synced")["status"],
        "True"
    );
    // Leading (a renewal a loaded machine delays can drop the lease for a
    // moment with the tests' short lease; it comes back).
    eventually(WAIT, "west leads", || async {
        (sample(&metrics(&west).await, "strait_mirror_leader") == Some(1.0)).then_some(())
    })
    .await;

    // An endpoint change in east is followed.
    let web2 = spawn_hello_endpoint("east", "web-2")
        .await
        .expect("backend");
    set_endpoint(&c.east.client(), "web", web2).await;
    eventually(WAIT, "traffic to the new endpoint", || async {
        let body = http_get(SocketAddr::from(([127, 0, 0, 1], cs_port)), "web")
            .await
            .ok()?;
        body.contains("web-2").then_some(())
    })
    .await;

    // Unexport: every mirror object and the DNS name go.
    Api::<ServiceExport>::namespaced(c.east.client(), "shop")
        .delete("web", &DeleteParams::default())
        .await
        .expect("unexport");
    c.mirrored(&[]).await;
    eventually(WAIT, "mirror cleaned up", || async {
        let left = ours(
            c.west
                .objects("multicluster.x-k8s.io", "v1alpha1", "serviceimports"),
        )
        .len()
            + ours(c.west.objects("discovery.k8s.io", "v1", "endpointslices")).len();
        (left == 0).then_some(())
    })
    .await;
    eventually(WAIT, "DNS forgets the name", || async {
        dig(west.dns_addr(), "web.shop.svc.clusterset.local", "A", false)
            .is_empty()
            .then_some(())
    })
    .await;
    drop(c.east_gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_watches_and_410_relists_lose_and_duplicate_nothing() {
    let web = spawn_hello_endpoint("east", "web").await.expect("backend");
    let c = clusters(web).await;
    let _west = c
        .west_replica("west-0", "127.0.0.1".parse().expect("ip"))
        .await;
    c.mirrored(&["shop/web-clusterset", "shop/web-east"]).await;

    // Both API servers forget their history and cut every watch; changes
    // made meanwhile must still arrive, once.
    let lists_before = c.west.requests().count_for("list", "services")
        + c.east.requests().count_for("list", "services");
    for kube in [&c.west, &c.east] {
        kube.compact();
        kube.drop_watches();
    }
    let cart = spawn_hello_endpoint("east", "cart").await.expect("backend");
    backend_service(&c.east.client(), "cart", cart, true).await;
    let svcs = c
        .mirrored(&[
            "shop/cart-clusterset",
            "shop/cart-east",
            "shop/web-clusterset",
            "shop/web-east",
        ])
        .await;
    // Each side's Service watch was told 410 and listed again (the change
    // may have landed on the other side before that).
    eventually(WAIT, "both sides relist", || async {
        let lists = c.west.requests().count_for("list", "services")
            + c.east.requests().count_for("list", "services");
        (lists >= lists_before + 2).then_some(())
    })
    .await;
    let body = eventually(WAIT, "traffic to the new import", || async {
        let port = egress_port(find(&svcs, "cart-clusterset"));
        http_get(SocketAddr::from(([127, 0, 0, 1], port)), "cart")
            .await
            .ok()
    })
    .await;
    assert!(body.contains("hello from east/cart"), "{body}");
    // Nothing doubled, nothing reallocated.
    let imports = ours(
        c.west
            .objects("multicluster.x-k8s.io", "v1alpha1", "serviceimports"),
    );
    assert_eq!(names(&imports), ["shop/cart", "shop/web"]);
    let ports: std::collections::BTreeSet<u16> = svcs.iter().map(egress_port).collect();
    assert_eq!(ports.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_leader_dies_another_replica_takes_over() {
    let web = spawn_hello_endpoint("east", "web").await.expect("backend");
    let c = clusters(web).await;
    let a = c
        .west_replica("west-a", "127.0.0.1".parse().expect("ip"))
        .await;
    let b = c
        .west_replica("west-b", "127.0.0.2".parse().expect("ip"))
        .await;
    let svcs = c.mirrored(&["shop/web-clusterset", "shop/web-east"]).await;
    let port = egress_port(find(&svcs, "web-clusterset"));
    // Every replica carries traffic on the same allocation, and the slice
    // lists both.
    for ip in [[127, 0, 0, 1], [127, 0, 0, 2]] {
        let body = eventually(WAIT, "traffic through each replica", || async {
            http_get(SocketAddr::from((ip, port)), "web").await.ok()
        })
        .await;
        assert!(body.contains("hello from east/web"), "{body}");
    }
    eventually(WAIT, "slices list both replicas", || async {
        let slices = ours(c.west.objects("discovery.k8s.io", "v1", "endpointslices"));
        slices
            .iter()
            .all(|s| s["endpoints"].as_array().is_some_and(|e| e.len() == 2))
            .then_some(())
    })
    .await;

    let leader = lease_holder(&c.west).expect("a leader");
    let (survivor, name) = if leader == "west-a" {
        drop(a);
        (b, "west-b")
    } else {
        drop(b);
        (a, "west-a")
    };
    eventually(WAIT, "the survivor takes the Lease", || async {
        (lease_holder(&c.west).as_deref() == Some(name)).then_some(())
    })
    .await;
    // The new leader writes: a new export appears in west's mirror.
    let cart = spawn_hello_endpoint("east", "cart").await.expect("backend");
    backend_service(&c.east.client(), "cart", cart, true).await;
    c.mirrored(&[
        "shop/cart-clusterset",
        "shop/cart-east",
        "shop/web-clusterset",
        "shop/web-east",
    ])
    .await;
    eventually(WAIT, "the survivor leads", || async {
        (sample(&metrics(&survivor).await, "strait_mirror_leader") == Some(1.0)).then_some(())
    })
    .await;
    let lease = Api::<Lease>::namespaced(c.west.client(), NS)
        .get("strait-mirror-writer")
        .await
        .expect("lease");
    assert!(lease.spec.and_then(|s| s.lease_transitions).unwrap_or(0) >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_services_are_never_overwritten_and_policies_and_bad_links_show_in_status() {
    let web = spawn_hello_endpoint("east", "web").await.expect("backend");
    let c = clusters(web).await;
    let wc = c.west.client();
    // Someone already owns the name the pinned mirror would take.
    apply(
        &wc,
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web-east", "namespace": "shop"},
            "spec": {"ports": [{"name": "db", "port": 5432, "protocol": "TCP"}]}}),
    )
    .await;
    // A Link to ourselves is refused with a reason.
    apply(
        &wc,
        json!({"apiVersion": "strait.io/v1alpha1", "kind": "Link",
            "metadata": {"name": "loop", "namespace": NS},
            "spec": {"cluster": "west"}}),
    )
    .await;
    // East's exports outside `payments` are not taken at first.
    apply(
        &wc,
        json!({"apiVersion": "strait.io/v1alpha1", "kind": "Link",
            "metadata": {"name": "east", "namespace": NS},
            "spec": {"cluster": "east", "addresses": [c.east_gw.tunnel_addr().to_string()],
                "accept": {"namespaces": ["payments"]}}}),
    )
    .await;
    let west = c
        .west_replica("west-0", "127.0.0.1".parse().expect("ip"))
        .await;
    let refused = eventually(WAIT, "the self-link refused in status", || async {
        c.west
            .objects("strait.io", "v1alpha1", "links")
            .into_iter()
            .find(|l| l["metadata"]["name"] == "loop" && condition(l, "Connected").is_some())
    })
    .await;
    let cond = condition(&refused, "Connected").expect("Connected");
    assert_eq!(
        (cond["status"].as_str(), cond["reason"].as_str()),
        (Some("False"), Some("Invalid"))
    );
    assert!(
        cond["message"].as_str().unwrap_or("").contains("itself"),
        "{cond}"
    );
    eventually(WAIT, "east connected, nothing accepted", || async {
        c.west
            .objects("strait.io", "v1alpha1", "links")
            .into_iter()
            .find(|l| {
                l["metadata"]["name"] == "east"
                    && condition(l, "Connected").is_some_and(|c| c["status"] == "True")
                    && l["status"]["importCount"] == 0
            })
    })
    .await;
    assert!(ours(c.west.objects("", "v1", "services")).is_empty());

    // Accepting `shop` imports web; the foreign web-east stays untouched.
    apply(
        &wc,
        json!({"apiVersion": "strait.io/v1alpha1", "kind": "Link",
            "metadata": {"name": "east", "namespace": NS},
            "spec": {"cluster": "east", "addresses": [c.east_gw.tunnel_addr().to_string()],
                "accept": {"namespaces": ["shop"]}}}),
    )
    .await;
    c.mirrored(&["shop/web-clusterset"]).await;
    let foreign = find(&c.west.objects("", "v1", "services"), "web-east").clone();
    assert_eq!(
        foreign["spec"]["ports"][0]["port"], 5432,
        "foreign Service changed: {foreign}"
    );
    assert!(foreign["metadata"]["labels"]["strait.io/mirror"].is_null());
    let m = eventually(WAIT, "the conflict counted", || async {
        let m = metrics(&west).await;
        (sample(&m, "strait_mirror_sync_errors_total{kind=\"conflict\"}").unwrap_or(0.0) >= 1.0)
            .then_some(m)
    })
    .await;
    assert!(m.contains("strait_mirror_sync_errors_total"), "{m}");
    let east = eventually(WAIT, "the conflict in the Link status", || async {
        c.west
            .objects("strait.io", "v1alpha1", "links")
            .into_iter()
            .find(|l| {
                l["metadata"]["name"] == "east"
                    && condition(l, "ImportsSynced").is_some_and(|c| c["status"] == "False")
            })
    })
    .await;
    let msg = condition(&east, "ImportsSynced").expect("synced")["message"].to_string();
    assert!(
        msg.contains("web-east") && msg.contains("not Strait's"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusters_with_separate_roots_link_through_trust_bundles() {
    use k8s_openapi::api::core::v1::Secret;
    use strait_proxy::identity::{generate_issuer, generate_root};
    let web = spawn_hello_endpoint("east", "web").await.expect("backend");
    let bed = Testbed::new(&["west", "east"]);
    // East gets a root of its own.
    let east_root = generate_root("east only").expect("root");
    let east_issuer = generate_issuer(&east_root, "east.strait.local").expect("issuer");
    std::fs::write(bed.path().join("east-root.pem"), &east_root.cert_pem).expect("write");
    std::fs::write(bed.path().join("east-issuer.pem"), &east_issuer.cert_pem).expect("write");
    std::fs::write(bed.path().join("east-issuer.key"), &east_issuer.key_pem).expect("write");
    let west_root = std::fs::read_to_string(bed.path().join("root.pem")).expect("root");
    let west = FakeKube::start().await.expect("west API");
    let east = FakeKube::start().await.expect("east API");
    let secret = |name: &str, pem: &str| Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NS.into()),
            ..Default::default()
        },
        data: Some(
            [(
                "ca.crt".to_string(),
                k8s_openapi::ByteString(pem.as_bytes().to_vec()),
            )]
            .into(),
        ),
        ..Default::default()
    };
    Api::<Secret>::namespaced(east.client(), NS)
        .create(&PostParams::default(), &secret("west-anchors", &west_root))
        .await
        .expect("secret");
    Api::<Secret>::namespaced(west.client(), NS)
        .create(
            &PostParams::default(),
            &secret("east-anchors", &east_root.cert_pem),
        )
        .await
        .expect("secret");
    backend_service(&east.client(), "web", web, true).await;
    apply(
        &east.client(),
        json!({"apiVersion": "strait.io/v1alpha1", "kind": "Link",
            "metadata": {"name": "west", "namespace": NS},
            "spec": {"cluster": "west", "trustBundleSecret": "west-anchors"}}),
    )
    .await;
    let mut cfg = bed.kube_config(
        "east",
        "east-0",
        "127.0.0.1".parse().expect("ip"),
        unique_egress_ports(),
    );
    cfg.identity.trust_anchors = bed.path().join("east-root.pem");
    let east_gw = Gateway::start_with_client(cfg, Some(east.client()))
        .await
        .expect("east");
    // Without the bundle, west cannot trust east: refused and counted.
    link(&west.client(), "east", &[east_gw.tunnel_addr().to_string()]).await;
    gateway_pod(&west.client(), "west-0", "127.0.0.1".parse().expect("ip")).await;
    let cfg = bed.kube_config(
        "west",
        "west-0",
        "127.0.0.1".parse().expect("ip"),
        unique_egress_ports(),
    );
    let west_gw = Gateway::start_with_client(cfg, Some(west.client()))
        .await
        .expect("west");
    eventually(WAIT, "west refuses east's unknown root", || async {
        let m = metrics(&west_gw).await;
        m.lines()
            .any(|l| {
                l.starts_with("strait_tls_handshake_failures_total") && l.contains("unknown_issuer")
            })
            .then_some(())
    })
    .await;
    // With it, the link comes up and the import follows.
    apply(
        &west.client(),
        json!({"apiVersion": "strait.io/v1alpha1", "kind": "Link",
            "metadata": {"name": "east", "namespace": NS},
            "spec": {"cluster": "east", "addresses": [east_gw.tunnel_addr().to_string()],
                "trustBundleSecret": "east-anchors"}}),
    )
    .await;
    let svcs = eventually(WAIT, "the import over a bundle-verified link", || async {
        let svcs = ours(west.objects("", "v1", "services"));
        (names(&svcs) == ["shop/web-clusterset", "shop/web-east"]).then_some(svcs)
    })
    .await;
    let port = egress_port(find(&svcs, "web-clusterset"));
    let body = eventually(WAIT, "traffic", || async {
        http_get(SocketAddr::from(([127, 0, 0, 1], port)), "web")
            .await
            .ok()
    })
    .await;
    assert!(body.contains("hello from east/web"), "{body}");
}

/// Removing the Link on the accepting side cuts the tunnel the peer
/// already holds (over QUIC or TLS over TCP), and the peer cannot come
/// back: revocation is not deferred to the next reconnect.
async fn removing_the_accepting_link_cuts_the_tunnel(transport: &str) {
    let web = spawn_hello_endpoint("east", "web").await.expect("backend");
    let c = clusters(web).await;
    let (west, _) = c.west_over(transport).await;
    let peer = west
        .peers()
        .into_iter()
        .find(|p| p.name == "east")
        .expect("east");
    assert_eq!(peer.transport, Some(transport));

    Api::<Link>::namespaced(c.east.client(), NS)
        .delete("west", &DeleteParams::default())
        .await
        .expect("delete link");
    eventually(WAIT, "west's tunnel cut", || async {
        west.peers()
            .into_iter()
            .find(|p| p.name == "east")
            .is_some_and(|p| !p.connected)
            .then_some(())
    })
    .await;
    // And it stays cut: east no longer admits west's identity.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let peer = west
        .peers()
        .into_iter()
        .find(|p| p.name == "east")
        .expect("east");
    assert!(!peer.connected, "west got back in: {peer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_the_accepting_link_cuts_a_quic_tunnel() {
    removing_the_accepting_link_cuts_the_tunnel("quic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_the_accepting_link_cuts_a_tcp_tunnel() {
    removing_the_accepting_link_cuts_the_tunnel("tcp").await;
}

/// Removing the Link on either side cuts the streams already open under
/// it, over either transport (over TLS on TCP each stream is a connection
/// of its own, and each must notice): a peer no longer trusted gets no
/// more bytes from them.
async fn removing_a_link_cuts_its_open_streams(transport: &str, side: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An echo backend: its connections last as long as the client's.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let backend = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let c = clusters(backend).await;
    let (_west, svcs) = c.west_over(transport).await;
    let egress = SocketAddr::from(([127, 0, 0, 1], egress_port(find(&svcs, "web-clusterset"))));
    // Whether `s` still echoes.
    async fn echoes(s: &mut tokio::net::TcpStream) -> bool {
        if s.write_all(b"ping").await.is_err() {
            return false;
        }
        let mut buf = [0u8; 4];
        matches!(
            tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut buf)).await,
            Ok(Ok(_)) if &buf == b"ping"
        )
    }
    let mut open = eventually(WAIT, "a connection through the tunnel", || async {
        let mut s = tokio::net::TcpStream::connect(egress).await.ok()?;
        echoes(&mut s).await.then_some(s)
    })
    .await;
    assert!(echoes(&mut open).await, "lasts");
    let (api, peer) = match side {
        "dialing" => (c.west.client(), "east"),
        _ => (c.east.client(), "west"),
    };
    Api::<Link>::namespaced(api, NS)
        .delete(peer, &DeleteParams::default())
        .await
        .expect("delete link");
    let started = std::time::Instant::now();
    while echoes(&mut open).await {
        assert!(started.elapsed() < WAIT, "the stream outlived its link");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A Link changed to let the peer in only (no addresses) no longer
/// watches the peer's catalog: what it imported goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_changed_to_accept_only_drops_its_imports() {
    let web = spawn_hello_endpoint("east", "web").await.expect("backend");
    let c = clusters(web).await;
    let west = c
        .west_replica("west-0", "127.0.0.1".parse().expect("ip"))
        .await;
    c.mirrored(&["shop/web-clusterset", "shop/web-east"]).await;
    link(&c.west.client(), "east", &[]).await;
    eventually(WAIT, "the imports gone", || async {
        west.imports().borrow().is_empty().then_some(())
    })
    .await;
    c.mirrored(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_the_dialing_link_cuts_its_open_tcp_streams() {
    removing_a_link_cuts_its_open_streams("tcp", "dialing").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_the_accepting_link_cuts_its_open_tcp_streams() {
    removing_a_link_cuts_its_open_streams("tcp", "accepting").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_the_dialing_link_cuts_its_open_quic_streams() {
    removing_a_link_cuts_its_open_streams("quic", "dialing").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_the_accepting_link_cuts_its_open_quic_streams() {
    removing_a_link_cuts_its_open_streams("quic", "accepting").await;
}

/// A running pod `strait inject` meshed (label `strait.io/meshed=true`)
/// serves the endpoints at its address to sidecars with its service
/// account's SPIFFE ID, so they reach it with mutual TLS; the label gone,
/// the identity goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshed_pods_are_discovered_with_their_identity() {
    use strait_proxy::discovery::{GrpcResolver, Resolve};

    let backend: SocketAddr = "127.0.0.1:18480".parse().expect("addr");
    let c = clusters(backend).await;
    let pods: Api<Pod> = Api::namespaced(c.east.client(), "shop");
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-18480", "namespace": "shop",
            "labels": {"app": "web", "strait.io/meshed": "true"}},
        "spec": {"serviceAccountName": "web-sa",
            "containers": [{"name": "web", "image": "web"}]}}))
    .expect("pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("pod");
    // Its address (the endpoint's) is known once it runs.
    let status = json!({"status": {"phase": "Running", "podIP": "127.0.0.1",
        "podIPs": [{"ip": "127.0.0.1"}]}});
    pods.patch_status("web-18480", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("pod status");
    let grpc = GrpcResolver::for_addr(c.east_gw.destination_addr());
    let identities = || async {
        grpc.resolve("web.shop.svc.cluster.local:80")
            .await
            .map(|d| {
                d.endpoints
                    .iter()
                    .map(|e| (e.addr, e.identity.as_ref().map(|i| i.as_str().to_string())))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    eventually(
        WAIT,
        "web's endpoint served with its pod's identity",
        || async {
            (identities().await
                == vec![(
                    backend,
                    Some("spiffe://east.strait.local/ns/shop/sa/web-sa".to_string()),
                )])
            .then_some(())
        },
    )
    .await;

    // Uninjected: the label goes, and with it the identity.
    pods.patch(
        "web-18480",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"strait.io/meshed": null}}})),
    )
    .await
    .expect("unlabel");
    eventually(WAIT, "web's endpoint served without identity", || async {
        (identities().await == vec![(backend, None)]).then_some(())
    })
    .await;
}
