//! The walkthrough of the README against two fake API servers, with the
//! real `strait` binary: what `helm install` puts in each cluster (CRDs,
//! gateway config, issuer Secret, Services, Deployment), the gateways in
//! Kubernetes mode, `strait link` each way applied as printed, an export,
//! traffic by clusterset name, and `strait check`.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams, PostParams};
use kube::Api;
use serde_json::{json, Value};
use strait_gateway::k8s::crd::{Link, ServiceExport};
use strait_gateway::Gateway;
use strait_tests::fake_kube::FakeKube;
use strait_tests::{dig, eventually, http_get, spawn_hello_endpoint, unique_egress_ports, Testbed};

const NS: &str = "strait-system";
const WAIT: Duration = Duration::from_secs(20);

fn strait(kubeconfig: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_strait"))
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .expect("run strait")
}

async fn create<K>(api: Api<K>, obj: Value)
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let obj: K = serde_json::from_value(obj).expect("object");
    api.create(&PostParams::default(), &obj)
        .await
        .unwrap_or_else(|e| panic!("create: {e}"));
}

/// What `helm install` leaves in a cluster, as far as `strait link` and
/// `strait check` read it; the gateway Service's load balancer is `tunnel`.
async fn install(kube: &FakeKube, bed: &Testbed, cluster: &str, tunnel: SocketAddr) {
    let c = kube.client();
    for doc in
        serde_saphyr::from_multiple::<Value>(&strait_gateway::k8s::crd::crds_yaml().expect("crds"))
            .expect("crds parse")
    {
        create(Api::<CustomResourceDefinition>::all(c.clone()), doc).await;
    }
    let config = format!(
        "cluster: {cluster}\nidentity:\n  trustAnchors: /var/run/strait/issuer/ca.crt\n  \
         issuerCert: /var/run/strait/issuer/tls.crt\n  issuerKey: /var/run/strait/issuer/tls.key\n\
         source:\n  kubernetes:\n    namespace: {NS}\n"
    );
    create(
        Api::<ConfigMap>::namespaced(c.clone(), NS),
        json!({"metadata": {"name": "strait-gateway-config", "namespace": NS},
            "data": {"config.yaml": config}}),
    )
    .await;
    let read = |f: &str| std::fs::read_to_string(bed.path().join(f)).expect("pem");
    create(
        Api::<Secret>::namespaced(c.clone(), NS),
        json!({"metadata": {"name": "strait-issuer", "namespace": NS}, "type": "kubernetes.io/tls",
            "stringData": {}, "data": {
                "ca.crt": b64(&read("root.pem")),
                "tls.crt": b64(&read(&format!("{cluster}-issuer.pem"))),
                "tls.key": b64(&read(&format!("{cluster}-issuer.key")))}}),
    )
    .await;
    let services: Api<Service> = Api::namespaced(c.clone(), NS);
    create(
        Api::<Service>::namespaced(c.clone(), NS),
        json!({"metadata": {"name": "strait-gateway", "namespace": NS},
            "spec": {"type": "LoadBalancer", "ports": [
                {"name": "tunnel", "port": tunnel.port(), "protocol": "UDP"},
                {"name": "tunnel-tcp", "port": tunnel.port(), "protocol": "TCP"}]}}),
    )
    .await;
    services
        .patch_status(
            "strait-gateway",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"loadBalancer": {"ingress": [{"ip": tunnel.ip().to_string()}]}}}),
            ),
        )
        .await
        .expect("lb status");
    create(
        Api::<Service>::namespaced(c.clone(), NS),
        json!({"metadata": {"name": "strait-dns", "namespace": NS},
            "spec": {"ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}}),
    )
    .await;
    let dns_ip = services
        .get("strait-dns")
        .await
        .expect("dns service")
        .spec
        .and_then(|s| s.cluster_ip)
        .expect("ClusterIP");
    create(Api::<ConfigMap>::namespaced(c.clone(), "kube-system"),
        json!({"metadata": {"name": "coredns", "namespace": "kube-system"},
            "data": {"Corefile": format!(".:53 {{\n    forward . /etc/resolv.conf\n}}\nclusterset.local:53 {{\n    errors\n    cache 5\n    forward . {dns_ip}\n}}\n")}}),
    )
    .await;
    create(Api::<Deployment>::namespaced(c.clone(), NS),
        json!({"metadata": {"name": "strait-gateway", "namespace": NS},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app.kubernetes.io/name": "strait-gateway"}},
                "template": {"metadata": {"labels": {"app.kubernetes.io/name": "strait-gateway"}},
                    "spec": {"containers": [{"name": "gateway", "image": "strait"}]}}}}),
    )
    .await;
    Api::<Deployment>::namespaced(c.clone(), NS)
        .patch_status(
            "strait-gateway",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"replicas": 1, "readyReplicas": 1}})),
        )
        .await
        .expect("deployment status");
}

fn b64(s: &str) -> String {
    // Secret data travels base64-encoded; k8s-openapi's ByteString does it.
    let v = serde_json::to_value(k8s_openapi::ByteString(s.as_bytes().to_vec())).expect("b64");
    v.as_str().expect("string").to_string()
}

/// Applies what `strait link` printed, as `kubectl apply -f -` would.
async fn apply_manifest(kube: &FakeKube, yaml: &str) {
    let c = kube.client();
    let pp = PatchParams::apply("kubectl").force();
    for doc in serde_saphyr::from_multiple::<Value>(yaml).expect("manifest parses") {
        let name = doc["metadata"]["name"].as_str().expect("name").to_string();
        let ns = doc["metadata"]["namespace"]
            .as_str()
            .expect("namespace")
            .to_string();
        match doc["kind"].as_str() {
            Some("Secret") => Api::<Secret>::namespaced(c.clone(), &ns)
                .patch(&name, &pp, &Patch::Apply(&doc))
                .await
                .map(drop),
            Some("Link") => Api::<Link>::namespaced(c.clone(), &ns)
                .patch(&name, &pp, &Patch::Apply(&doc))
                .await
                .map(drop),
            other => panic!("unexpected {other:?} in {yaml}"),
        }
        .unwrap_or_else(|e| panic!("apply {name}: {e}"));
    }
}

fn kubeconfig(dir: &std::path::Path, clusters: &[(&str, &FakeKube)]) -> std::path::PathBuf {
    let mut y = String::from("apiVersion: v1\nkind: Config\nclusters:\n");
    for (name, kube) in clusters {
        y.push_str(&format!(
            "- name: {name}\n  cluster:\n    server: {}\n",
            kube.url()
        ));
    }
    y.push_str("users:\n- name: nobody\n  user: {}\ncontexts:\n");
    for (name, _) in clusters {
        y.push_str(&format!(
            "- name: {name}\n  context:\n    cluster: {name}\n    user: nobody\n"
        ));
    }
    y.push_str(&format!("current-context: {}\n", clusters[0].0));
    let path = dir.join("kubeconfig");
    std::fs::write(&path, y).expect("kubeconfig");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_both_ways_export_call_by_name_and_check() {
    let bed = Testbed::new(&["west", "east"]);
    let west = FakeKube::start().await.expect("west API");
    let east = FakeKube::start().await.expect("east API");
    let kubeconfig = kubeconfig(bed.path(), &[("west", &west), ("east", &east)]);

    // Gateways first (their tunnel ports are the load balancers' ports).
    let loopback = "127.0.0.1".parse().expect("ip");
    let east_gw = Gateway::start_with_client(
        bed.kube_config("east", "east-0", loopback, unique_egress_ports()),
        Some(east.client()),
    )
    .await
    .expect("east gateway");
    let west_gw = Gateway::start_with_client(
        bed.kube_config("west", "west-0", loopback, unique_egress_ports()),
        Some(west.client()),
    )
    .await
    .expect("west gateway");
    install(&west, &bed, "west", west_gw.tunnel_addr()).await;
    install(&east, &bed, "east", east_gw.tunnel_addr()).await;
    let pod = |name: &str| {
        json!({"metadata": {"name": name, "namespace": NS,
            "labels": {"app.kubernetes.io/name": "strait-gateway"}},
            "spec": {"containers": [{"name": "gateway", "image": "strait"}]}})
    };
    create(
        Api::<k8s_openapi::api::core::v1::Pod>::namespaced(west.client(), NS),
        pod("west-0"),
    )
    .await;
    Api::<k8s_openapi::api::core::v1::Pod>::namespaced(west.client(), NS)
        .patch_status(
            "west-0",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"podIP": "127.0.0.1",
                "conditions": [{"type": "Ready", "status": "True"}]}})),
        )
        .await
        .expect("pod status");

    // `strait link` each way, applied as printed.
    for (from, to) in [("west", &east), ("east", &west)] {
        let out = strait(&kubeconfig, &["link", "--context", from, "--name", from]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "strait link {from}: {}\n{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("kind: Secret") && stdout.contains("kind: Link"),
            "{stdout}"
        );
        apply_manifest(to, &stdout).await;
    }
    // The wrong name for the context is refused.
    let out = strait(
        &kubeconfig,
        &["link", "--context", "west", "--name", "east"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("west"));

    // East exports web; west calls it by its clusterset name.
    let backend = spawn_hello_endpoint("east", "web").await.expect("backend");
    let ec = east.client();
    Api::<Service>::namespaced(ec.clone(), "shop")
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "web", "namespace": "shop"},
                "spec": {"ports": [{"name": "http", "port": 80}]}}))
            .expect("svc"),
        )
        .await
        .expect("service");
    Api::<k8s_openapi::api::discovery::v1::EndpointSlice>::namespaced(ec.clone(), "shop")
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "web-x", "namespace": "shop",
                    "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": ["127.0.0.1"]}],
                "ports": [{"name": "http", "port": backend.port()}]}))
            .expect("slice"),
        )
        .await
        .expect("slice");
    Api::<ServiceExport>::namespaced(ec, "shop")
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1",
                "kind": "ServiceExport", "metadata": {"name": "web", "namespace": "shop"}}))
            .expect("export"),
        )
        .await
        .expect("export");
    let ip = eventually(WAIT, "web.shop.svc.clusterset.local resolves", || async {
        dig(
            west_gw.dns_addr(),
            "web.shop.svc.clusterset.local",
            "A",
            false,
        )
        .into_iter()
        .next()
    })
    .await;
    // No kube-proxy here: the ClusterIP leads to the egress port the
    // clusterset Service records, where the gateway listens.
    let svc = Api::<Service>::namespaced(west.client(), "shop")
        .get("web-clusterset")
        .await
        .expect("clusterset service");
    assert_eq!(
        svc.spec.as_ref().and_then(|s| s.cluster_ip.clone()),
        Some(ip)
    );
    let target = svc.spec.and_then(|s| s.ports).expect("ports")[0]
        .target_port
        .clone()
        .expect("target port");
    let k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(port) = target else {
        panic!("named target port")
    };
    let body = eventually(WAIT, "traffic", || async {
        http_get(SocketAddr::from(([127, 0, 0, 1], port as u16)), "web")
            .await
            .ok()
    })
    .await;
    assert!(body.contains("hello from east/web"), "{body}");

    // `strait gateways` in west: east alive with its import.
    let table = eventually(WAIT, "strait gateways shows east alive", || {
        let kubeconfig = kubeconfig.clone();
        async move {
            let out = strait(
                &kubeconfig,
                &["gateways", "--context", "west", "-o", "json"],
            );
            let rows: Value = serde_json::from_slice(&out.stdout).ok()?;
            let east = rows
                .as_array()?
                .iter()
                .find(|r| r["cluster"] == "east")?
                .clone();
            (east["alive"] == true && east["imports"] == 1).then_some(east)
        }
    })
    .await;
    assert_eq!(table["transport"], "quic");
    let out = strait(&kubeconfig, &["gateways", "--context", "west"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("CLUSTER") && text.contains("east"),
        "{text}"
    );

    // `strait check` in west: everything passes once the Link reports.
    let dns = west_gw.dns_addr().to_string();
    let report = eventually(WAIT, "strait check passes", || {
        let (kubeconfig, dns) = (kubeconfig.clone(), dns.clone());
        async move {
            let out = strait(
                &kubeconfig,
                &[
                    "check",
                    "--context",
                    "west",
                    "--dns-server",
                    &dns,
                    "-o",
                    "json",
                ],
            );
            let report: Value = serde_json::from_slice(&out.stdout).ok()?;
            out.status.success().then_some(report)
        }
    })
    .await;
    let checks = report.as_array().expect("array");
    for name in ["crds", "gateway", "links", "dns", "coredns"] {
        let c = checks
            .iter()
            .find(|c| c["name"].as_str().is_some_and(|n| n.starts_with(name)))
            .unwrap_or_else(|| panic!("no {name} check in {report}"));
        assert_eq!(c["status"], "pass", "{c}");
    }
    // And fails, exit 1, when the DNS is not there.
    let out = strait(
        &kubeconfig,
        &["check", "--context", "west", "--dns-server", "127.0.0.1:9"],
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
