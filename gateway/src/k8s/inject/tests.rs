use serde_json::Value;

use super::*;

fn config() -> InjectConfig {
    test_config()
}

const DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: demo}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata:
      labels: {app: web}
      annotations:
        strait.io/skip-outbound-ports: "5432, 6379"
        strait.io/opaque-ports: "3306"
    spec:
      initContainers:
        - {name: migrate, image: migrate:1}
      containers:
        - {name: web, image: web:1}
"#;

fn inject(yaml: &str) -> (Vec<Value>, Vec<Report>) {
    let (out, reports) = inject_yaml(yaml, &config()).expect("inject");
    let docs: Vec<Value> = serde_saphyr::from_str_multiple(&out).expect("output is YAML");
    (docs, reports)
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array()
        .expect("a list")
        .iter()
        .map(|c| c["name"].as_str().expect("named"))
        .collect()
}

fn env<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)?["value"]
        .as_str()
}

#[test]
fn a_deployment_gets_the_init_container_the_proxy_and_its_token() {
    let (docs, reports) = inject(DEPLOYMENT);
    assert_eq!(
        reports,
        vec![Report {
            object: "deployment/web".into(),
            outcome: Outcome::Injected
        }]
    );
    let pod = &docs[0]["spec"]["template"];
    let spec = &pod["spec"];
    // The rules, then the proxy as a native sidecar, before the pod's own
    // init containers.
    assert_eq!(
        names(&spec["initContainers"]),
        ["strait-init", "strait-proxy", "migrate"]
    );
    assert_eq!(names(&spec["containers"]), ["web"]);
    assert_eq!(
        names(&spec["volumes"]),
        ["strait-identity", "strait-init-run"]
    );
    let token = &spec["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(token["audience"], TOKEN_AUDIENCE);
    assert_eq!(
        pod["metadata"]["annotations"][INJECTED_ANNOTATION],
        "example.test/strait-proxy:1"
    );
    assert_eq!(pod["metadata"]["labels"]["app"], "web", "the rest is kept");
    assert_eq!(pod["metadata"]["labels"]["strait.io/meshed"], "true");

    let proxy = &spec["initContainers"][1];
    assert_eq!(proxy["args"], serde_json::json!(["run", "--transparent"]));
    assert_eq!(proxy["restartPolicy"], "Always");
    assert_eq!(proxy["startupProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(
        env(proxy, "STRAIT_PROXY_IDENTITY"),
        Some("spiffe://west.strait.local/ns/$(STRAIT_POD_NS)/sa/$(STRAIT_POD_SA)")
    );
    // The variables it refers to come first (Kubernetes expands only
    // those defined earlier).
    assert_eq!(
        names(&proxy["env"])[..2],
        ["STRAIT_POD_NS", "STRAIT_POD_SA"]
    );
    assert_eq!(
        env(proxy, "STRAIT_PROXY_IDENTITY_ADDR"),
        Some("strait-identity.strait-system.svc:8080")
    );
    assert_eq!(
        env(proxy, "STRAIT_PROXY_DESTINATION_ADDR"),
        Some("strait-destination.strait-system.svc:8086")
    );
    assert_eq!(
        env(proxy, "STRAIT_PROXY_IDENTITY_TOKEN_FILE"),
        Some("/var/run/secrets/tokens/strait-identity")
    );
    assert!(env(proxy, "STRAIT_PROXY_TRUST_ANCHORS_PEM")
        .is_some_and(|p| p.contains("BEGIN CERTIFICATE")));
    assert_eq!(env(proxy, "STRAIT_PROXY_OPAQUE_PORTS"), Some("3306"));
    // The pod's own addresses, from the downward API, for the inbound
    // side's check of each connection's destination.
    let inbound_ips = proxy["env"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["name"] == "STRAIT_PROXY_INBOUND_IPS"))
        .expect("STRAIT_PROXY_INBOUND_IPS");
    assert_eq!(
        inbound_ips["valueFrom"]["fieldRef"]["fieldPath"],
        "status.podIPs"
    );
    assert_eq!(env(proxy, "STRAIT_PROXY_DESTINATION_IDENTITY"), None);
    assert_eq!(
        env(proxy, "STRAIT_THREADS"),
        Some("1"),
        "one thread unless asked"
    );
    assert_eq!(proxy["securityContext"]["runAsUser"], PROXY_UID);
    assert_eq!(proxy["readinessProbe"]["httpGet"]["path"], "/ready");

    let init = &spec["initContainers"][0];
    assert_eq!(
        init["args"],
        serde_json::json!([
            "init",
            "--proxy-uid",
            "2102",
            "--skip-outbound-ports",
            "5432,6379"
        ])
    );
    assert_eq!(
        init["securityContext"]["capabilities"]["add"],
        serde_json::json!(["NET_ADMIN", "NET_RAW"])
    );
}

#[test]
fn injecting_twice_changes_nothing_more() {
    let (once, _) = inject_yaml(DEPLOYMENT, &config()).expect("inject");
    let (twice, reports) = inject_yaml(&once, &config()).expect("inject");
    assert_eq!(once, twice);
    assert_eq!(reports[0].outcome, Outcome::Skipped("already injected"));
}

#[test]
fn a_pod_injected_by_an_older_injector_is_brought_up_to_date() {
    let (once, _) = inject_yaml(DEPLOYMENT, &config()).expect("inject");
    // What an older injector wrote: the proxy as a regular container, no
    // meshed label, other settings.
    let mut docs: Vec<Value> = serde_saphyr::from_str_multiple(&once).expect("yaml");
    let template = &mut docs[0]["spec"]["template"];
    let spec = template["spec"].as_object_mut().expect("spec");
    let inits = spec["initContainers"].as_array_mut().expect("inits");
    let mut old_proxy = inits.remove(1);
    old_proxy["image"] = "example.test/strait-proxy:0".into();
    spec["containers"]
        .as_array_mut()
        .expect("containers")
        .push(old_proxy);
    template["metadata"]["labels"]
        .as_object_mut()
        .expect("labels")
        .remove("strait.io/meshed");
    let old = serde_json::to_string(&docs[0]).expect("json");
    let (again, reports) = inject_yaml(&old, &config()).expect("inject");
    assert_eq!(reports[0].outcome, Outcome::Updated);
    assert_eq!(again, once, "as if injected today");
}

#[test]
fn every_kind_that_makes_pods_is_injected_and_others_are_left_alone() {
    let yaml = r#"
apiVersion: v1
kind: Pod
metadata: {name: one}
spec: {containers: [{name: app, image: app:1}]}
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: nightly}
spec:
  schedule: "0 3 * * *"
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: OnFailure
          containers: [{name: job, image: job:1}]
---
apiVersion: v1
kind: List
items:
  - apiVersion: apps/v1
    kind: StatefulSet
    metadata: {name: db}
    spec:
      serviceName: db
      selector: {matchLabels: {app: db}}
      template:
        metadata: {labels: {app: db}}
        spec: {containers: [{name: db, image: db:1}]}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {ports: [{port: 80}]}
"#;
    let (docs, reports) = inject(yaml);
    let outcomes: Vec<(&str, &Outcome)> = reports
        .iter()
        .map(|r| (r.object.as_str(), &r.outcome))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("pod/one", &Outcome::Injected),
            ("cronjob/nightly", &Outcome::Injected),
            ("statefulset/db", &Outcome::Injected),
            ("service/web", &Outcome::Skipped("makes no pods")),
        ]
    );
    let inits = |spec: &Value| names(&spec["initContainers"]).join(",");
    assert_eq!(inits(&docs[0]["spec"]), "strait-init,strait-proxy");
    assert_eq!(
        inits(&docs[1]["spec"]["jobTemplate"]["spec"]["template"]["spec"]),
        "strait-init,strait-proxy"
    );
    assert_eq!(
        inits(&docs[2]["items"][0]["spec"]["template"]["spec"]),
        "strait-init,strait-proxy"
    );
    assert!(docs[3].get("annotations").is_none() && docs[3]["spec"]["ports"][0]["port"] == 80);
}

#[test]
fn opted_out_and_host_network_pods_are_left_alone() {
    let yaml = r#"
kind: Deployment
metadata: {name: a, annotations: {strait.io/inject: disabled}}
spec: {template: {spec: {containers: [{name: a}]}}}
---
kind: Deployment
metadata: {name: b}
spec: {template: {metadata: {annotations: {strait.io/inject: disabled}}, spec: {containers: [{name: b}]}}}
---
kind: DaemonSet
metadata: {name: c}
spec: {template: {spec: {hostNetwork: true, containers: [{name: c}]}}}
---
kind: Pod
metadata: {name: d, annotations: {kubernetes.io/config.mirror: "8f2a"}}
spec: {containers: [{name: d}]}
"#;
    let (docs, reports) = inject(yaml);
    assert_eq!(
        reports[3].outcome,
        Outcome::Skipped("a static pod's mirror")
    );
    assert!(
        reports
            .iter()
            .all(|r| matches!(r.outcome, Outcome::Skipped(_))),
        "{reports:?}"
    );
    for doc in &docs[..3] {
        assert_eq!(
            names(&doc["spec"]["template"]["spec"]["containers"]).len(),
            1
        );
    }
    assert_eq!(names(&docs[3]["spec"]["containers"]).len(), 1);
    assert!(docs[3]["spec"]["initContainers"].is_null());
}

#[test]
fn bad_input_is_a_clear_error() {
    let bad_ports = DEPLOYMENT.replace("\"3306\"", "\"3306,http\"");
    let err = inject_yaml(&bad_ports, &config()).expect_err("a port that is not a number");
    assert!(err.to_string().contains("strait.io/opaque-ports"), "{err}");
    let zero = DEPLOYMENT.replace("\"3306\"", "\"0\"");
    assert!(inject_yaml(&zero, &config()).is_err(), "port 0");
    for threads in ["0", "65", "two", "-1"] {
        let bad = DEPLOYMENT.replace(
            "strait.io/opaque-ports: \"3306\"",
            &format!("strait.io/proxy-threads: \"{threads}\""),
        );
        let err = inject_yaml(&bad, &config()).expect_err(threads);
        assert!(
            err.to_string()
                .contains("deployment/web: annotation strait.io/proxy-threads"),
            "{err}"
        );
    }

    let not_a_list = "kind: Pod\nmetadata: {name: p}\nspec: {containers: web}\n";
    let err = inject_yaml(not_a_list, &config()).expect_err("containers must be a list");
    assert!(
        err.to_string()
            .contains("pod/p: spec.containers is not a list"),
        "{err}"
    );

    let err = inject_yaml("kind: Pod\n  metadata: [", &config()).expect_err("not YAML");
    assert!(matches!(err, InjectError::Parse(_)), "{err}");
}

#[test]
fn yaml_1_1_numbers_and_strings_keep_their_meaning() {
    let yaml = r#"
kind: Pod
metadata: {name: p, annotations: {mode: "0644", flag: "yes"}}
spec:
  containers: [{name: app, env: [{name: A, value: "on"}]}]
  volumes: [{name: s, secret: {secretName: s, defaultMode: 0644}}]
"#;
    let (out, _) = inject_yaml(yaml, &config()).expect("inject");
    let docs: Vec<Value> = serde_saphyr::from_str_multiple(&out).expect("YAML");
    let spec = &docs[0]["spec"];
    assert_eq!(spec["volumes"][0]["secret"]["defaultMode"], 0o644, "{out}");
    assert_eq!(docs[0]["metadata"]["annotations"]["mode"], "0644", "{out}");
    assert_eq!(docs[0]["metadata"]["annotations"]["flag"], "yes", "{out}");
    assert_eq!(spec["containers"][0]["env"][0]["value"], "on", "{out}");
}

#[test]
fn destination_mtls_pins_the_gateway() {
    let config = InjectConfig {
        destination_mtls: true,
        ..config()
    };
    let (out, _) = inject_yaml(DEPLOYMENT, &config).expect("inject");
    let docs: Vec<Value> = serde_saphyr::from_str_multiple(&out).expect("YAML");
    let proxy = &docs[0]["spec"]["template"]["spec"]["initContainers"][1];
    assert_eq!(
        env(proxy, "STRAIT_PROXY_DESTINATION_IDENTITY"),
        Some("spiffe://west.strait.local/ns/strait-system/sa/strait-gateway")
    );
}

#[test]
fn ipv6_pods_redirect_and_listen_on_both_families() {
    let spec_of = |config: &InjectConfig| {
        let (out, _) = inject_yaml(DEPLOYMENT, config).expect("inject");
        let docs: Vec<Value> = serde_saphyr::from_str_multiple(&out).expect("YAML");
        docs[0]["spec"]["template"]["spec"].clone()
    };
    let ipv6 = InjectConfig {
        ipv6: true,
        ..config()
    };
    let spec = spec_of(&ipv6);
    let init = &spec["initContainers"][0];
    let args: Vec<&str> = init["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(args.last(), Some(&"--ipv6"), "{args:?}");
    let proxy = &spec["initContainers"][1];
    for (name, value) in [
        ("STRAIT_PROXY_INBOUND_LISTEN", "[::]:4143"),
        ("STRAIT_PROXY_ADMIN_LISTEN", "[::]:4191"),
        ("STRAIT_PROXY_OUTBOUND_LISTEN_IPV6", "[::1]:4140"),
    ] {
        assert_eq!(env(proxy, name), Some(value), "{name}");
    }
    // An IPv4 cluster's pods get neither (the proxy's defaults hold).
    let spec = spec_of(&config());
    assert!(!spec["initContainers"][0]["args"]
        .as_array()
        .expect("args")
        .iter()
        .any(|a| a == "--ipv6"));
    assert_eq!(
        env(
            &spec["initContainers"][1],
            "STRAIT_PROXY_OUTBOUND_LISTEN_IPV6"
        ),
        None
    );
}

#[test]
fn the_gateways_audience_and_inbound_port_reach_the_pod() {
    let custom = InjectConfig {
        token_audience: "identity.example.com".into(),
        proxy_inbound_port: 4243,
        ..config()
    };
    let (out, _) = inject_yaml(DEPLOYMENT, &custom).expect("inject");
    let docs: Vec<Value> = serde_saphyr::from_str_multiple(&out).expect("YAML");
    let spec = &docs[0]["spec"]["template"]["spec"];
    let token = spec["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == "strait-identity")
        .expect("token volume");
    assert_eq!(
        token["projected"]["sources"][0]["serviceAccountToken"]["audience"],
        "identity.example.com"
    );
    let args: Vec<&str> = spec["initContainers"][0]["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        args.windows(2).any(|w| w == ["--inbound-port", "4243"]),
        "{args:?}"
    );
    let proxy = &spec["initContainers"][1];
    assert_eq!(
        env(proxy, "STRAIT_PROXY_INBOUND_LISTEN"),
        Some("0.0.0.0:4243")
    );
    assert_eq!(env(proxy, "STRAIT_PROXY_PEER_INBOUND_PORT"), Some("4243"));
    assert_eq!(proxy["ports"][0]["containerPort"], 4243);
    // The defaults add nothing the proxy's own defaults already say.
    let (out, _) = inject_yaml(DEPLOYMENT, &config()).expect("inject");
    assert!(!out.contains("--inbound-port") && !out.contains("PEER_INBOUND_PORT"));
    assert!(out.contains("audience: identity.strait.io"), "{out}");
}

#[test]
fn the_threads_annotation_sets_the_proxy_threads() {
    // Quoted or, as YAML allows, a bare number.
    for value in ["\"2\"", "2"] {
        let yaml = DEPLOYMENT.replace(
            "strait.io/opaque-ports: \"3306\"",
            &format!("strait.io/proxy-threads: {value}"),
        );
        let (docs, _) = inject(&yaml);
        let proxy = &docs[0]["spec"]["template"]["spec"]["initContainers"][1];
        assert_eq!(env(proxy, "STRAIT_THREADS"), Some("2"), "{value}");
    }
}
