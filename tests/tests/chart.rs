//! The Helm chart (`charts/strait`) checked with the real tools: `helm lint
//! --strict`, `helm template` piped through `kubernetes-validate --strict`,
//! the values schema, `promtool check rules` and `promtool test rules` on the
//! alerts the PrometheusRule deploys, and the rendered objects' security
//! settings, RBAC and config file. The CRDs in the chart must be exactly what
//! `strait crds` prints.
//!
//! The tools come from `scripts/install-test-tools.sh` (helm and
//! kubernetes-validate in `.tools/bin`, promtool on PATH). A missing tool
//! fails the test: nothing is skipped.

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Value};

/// The Kubernetes version the rendered objects are validated against (one
/// kubernetes-validate ships schemas for).
const KUBERNETES_VERSION: &str = "1.34.0";

/// Release name and namespace used for every render.
const RELEASE: &str = "strait";
const NAMESPACE: &str = "strait-system";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the workspace")
        .to_path_buf()
}

fn chart() -> PathBuf {
    workspace().join("charts/strait")
}

/// A tool from `.tools/bin` (where the install script puts helm and
/// kubernetes-validate) or PATH; panics if it is nowhere.
fn tool(name: &str) -> PathBuf {
    let local = workspace().join(".tools/bin").join(name);
    if local.is_file() {
        return local;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("{name} not found in .tools/bin or on PATH: run scripts/install-test-tools.sh");
}

/// What a tool printed and whether it succeeded.
struct Run {
    cmd: String,
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Run {
    fn describe(&self) -> String {
        format!(
            "command: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmd, self.stdout, self.stderr
        )
    }

    /// Stdout, or a panic with everything the tool said.
    fn expect_ok(self) -> String {
        assert!(self.ok, "tool failed\n{}", self.describe());
        self.stdout
    }

    /// Stderr of a run that must fail, or a panic if it succeeded.
    fn expect_failure(self) -> String {
        assert!(
            !self.ok,
            "tool succeeded but should not have\n{}",
            self.describe()
        );
        format!("{}{}", self.stdout, self.stderr)
    }
}

fn run<S: AsRef<OsStr>>(program: &str, args: &[S], stdin: Option<&str>) -> Run {
    let path = tool(program);
    let cmd = format!(
        "{} {}",
        path.display(),
        args.iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut child = Command::new(&path)
        .args(args)
        .current_dir(workspace())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        pipe.write_all(input.as_bytes())
            .unwrap_or_else(|e| panic!("cannot write to {cmd}: {e}"));
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("cannot wait for {cmd}: {e}"));
    Run {
        cmd,
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// An issuer for cluster `west` under a fresh root, written as `strait certs
/// root` and `strait certs issuer --cluster west` write them (same code).
struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    fn new() -> Self {
        strait_proxy::tls::install_default_provider();
        let dir = tempfile::tempdir().expect("tempdir");
        strait_gateway::demo::write_certs(dir.path(), &["west"]).expect("certificates");
        Self { dir }
    }

    /// `--set cluster=west` and the issuer PEMs as `--set-file`.
    fn values(&self) -> Vec<String> {
        let file = |name: &str| self.dir.path().join(name).display().to_string();
        vec![
            "--set".into(),
            "cluster=west".into(),
            "--set-file".into(),
            format!("issuer.cert={}", file("west-issuer.pem")),
            "--set-file".into(),
            format!("issuer.key={}", file("west-issuer.key")),
            "--set-file".into(),
            format!("issuer.ca={}", file("root.pem")),
        ]
    }
}

/// `helm template` of the chart with `args` appended.
fn template<S: AsRef<str>>(args: &[S]) -> Run {
    let chart = chart().display().to_string();
    let mut all = vec![
        "template".to_string(),
        RELEASE.into(),
        chart,
        "--namespace".into(),
        NAMESPACE.into(),
    ];
    all.extend(args.iter().map(|a| a.as_ref().to_string()));
    run("helm", &all, None)
}

/// A render with issuer PEMs and `extra` values that must succeed.
fn render(extra: &[&str]) -> String {
    let certs = Certs::new();
    let mut args = certs.values();
    args.extend(extra.iter().map(|s| s.to_string()));
    template(&args).expect_ok()
}

/// The YAML documents of a stream, empty ones left out.
fn documents(yaml: &str) -> Vec<Value> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(yaml)
        .unwrap_or_else(|e| panic!("rendered YAML does not parse: {e}\n{yaml}"));
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

fn has(docs: &[Value], kind: &str) -> bool {
    docs.iter().any(|d| d["kind"] == kind)
}

#[test]
fn crds_match_strait_crds_output() {
    let generated = strait_gateway::k8s::crd::crds_yaml().expect("CRDs serialize");
    let path = chart().join("crds/strait.yaml");
    let in_chart = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    assert!(
        in_chart == generated,
        "{} is out of date with gateway/src/k8s/crd.rs; regenerate it with\n\
         \tcargo run -p strait-cli -- crds > charts/strait/crds/strait.yaml",
        path.display()
    );
    let names: Vec<String> = documents(&in_chart)
        .iter()
        .map(|d| {
            d["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(
        names,
        [
            "links.strait.io",
            "serviceexports.multicluster.x-k8s.io",
            "serviceimports.multicluster.x-k8s.io"
        ]
    );
}

#[test]
fn helm_lint_strict_passes() {
    let certs = Certs::new();
    for extra in [&[][..], &["--values", "charts/strait/values-ha.yaml"][..]] {
        let mut args = vec![
            "lint".to_string(),
            "--strict".into(),
            chart().display().to_string(),
        ];
        args.extend(certs.values());
        args.extend(extra.iter().map(|s| s.to_string()));
        let out = run("helm", &args, None).expect_ok();
        assert!(out.contains("0 chart(s) failed"), "{out}");
    }
}

/// Kinds kubernetes-validate has no schema for: the prometheus-operator's
/// ServiceMonitor and PrometheusRule (CRDs of another project) and our own
/// custom resources (none is rendered today, but they would be skipped for
/// the same reason). Everything else, the CustomResourceDefinitions
/// included, must pass strict validation.
const NO_SCHEMA: [&str; 5] = [
    "ServiceMonitor",
    "PrometheusRule",
    "Link",
    "ServiceExport",
    "ServiceImport",
];

fn validate_strictly(rendered: &str) {
    let run = run(
        "kubernetes-validate",
        &["--strict", "--kubernetes-version", KUBERNETES_VERSION, "-"],
        Some(rendered),
    );
    let report = format!("{}{}", run.stdout, run.stderr);
    assert!(run.ok, "kubernetes-validate failed\n{}", run.describe());
    assert!(
        !report.contains("ERROR") && !report.contains("FATAL"),
        "kubernetes-validate reported errors\n{report}"
    );
    for doc in documents(rendered) {
        let kind = doc["kind"].as_str().expect("every object has a kind");
        let name = doc["metadata"]["name"]
            .as_str()
            .expect("every object has a name");
        let passed = format!(
            "passed for resource {}/{name} against version",
            kind.to_lowercase()
        );
        if NO_SCHEMA.contains(&kind) {
            assert!(
                report.contains(&format!("Couldn't find schema for kind {kind}")),
                "{kind} was expected to have no schema\n{report}"
            );
        } else {
            assert!(
                report.contains(&passed),
                "{kind}/{name} was not validated\n{report}"
            );
        }
    }
    for line in report.lines().filter(|l| l.starts_with("WARN")) {
        assert!(
            NO_SCHEMA
                .iter()
                .any(|k| line.contains(&format!("for kind {k} "))),
            "unexpected warning: {line}"
        );
    }
}

#[test]
fn default_render_validates_strictly() {
    let rendered = render(&["--include-crds"]);
    let docs = documents(&rendered);
    for kind in [
        "CustomResourceDefinition",
        "Deployment",
        "PodDisruptionBudget",
        "ConfigMap",
        "Secret",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Pod",
    ] {
        assert!(has(&docs, kind), "no {kind} in the default render");
    }
    assert!(!has(&docs, "ServiceMonitor") && !has(&docs, "PrometheusRule"));
    find(&docs, "ConfigMap", "strait-dashboard");
    validate_strictly(&rendered);
}

#[test]
fn ha_render_validates_strictly() {
    let rendered = render(&["--include-crds", "--values", "charts/strait/values-ha.yaml"]);
    let docs = documents(&rendered);
    assert_eq!(
        find(&docs, "Deployment", "strait-gateway")["spec"]["replicas"],
        3
    );
    find(&docs, "ServiceMonitor", "strait-gateway");
    find(&docs, "PrometheusRule", "strait-gateway");
    find(&docs, "ConfigMap", "strait-dashboard");
    validate_strictly(&rendered);
}

#[test]
fn rendering_without_an_issuer_fails_clearly() {
    let err = template(&["--set", "cluster=west"]).expect_failure();
    assert!(err.contains("the gateway needs an issuer"), "{err}");
    let err = template(&[
        "--set",
        "cluster=west",
        "--set",
        "issuer.cert=x",
        "--set",
        "issuer.key=y",
        "--set",
        "issuer.ca=z",
    ])
    .expect_failure();
    assert!(
        err.contains("issuer.cert is not a PEM certificate"),
        "{err}"
    );
}

#[test]
fn existing_issuer_secret_is_mounted_and_none_rendered() {
    let rendered = template(&[
        "--set",
        "cluster=west",
        "--set",
        "issuer.existingSecret=my-issuer",
    ])
    .expect_ok();
    let docs = documents(&rendered);
    let secrets: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "Secret").collect();
    assert!(
        secrets
            .iter()
            .all(|s| s["metadata"]["name"] == "strait-injector-tls"),
        "an issuer Secret was rendered:\n{rendered}"
    );
    let deployment = find(&docs, "Deployment", "strait-gateway");
    let volumes = deployment["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .expect("volumes");
    let issuer = volumes
        .iter()
        .find(|v| v["name"] == "issuer")
        .expect("issuer volume");
    assert_eq!(issuer["secret"]["secretName"], "my-issuer");
}

#[test]
fn schema_refuses_bad_values() {
    let certs = Certs::new();
    let cases: [(&[&str], &str); 8] = [
        (&["--set", "cluster=Bad_Name"], "/cluster"),
        // A Lease name the gateway takes: a DNS label, no dots.
        (
            &["--set", "config.leaseName=strait.writer"],
            "/config/leaseName",
        ),
        (
            &["--set", "config.maxConnections=0"],
            "/config/maxConnections",
        ),
        (&["--set", "cluster="], "/cluster"),
        (&["--set", "replicas=x"], "/replicas"),
        (&["--set", "replicas=0"], "/replicas"),
        (&["--set", "service.type=Ingress"], "/service/type"),
        (&["--set", "unknownKey=1"], "unknownKey"),
    ];
    for (bad, path) in cases {
        let mut args = certs.values();
        args.extend(bad.iter().map(|s| s.to_string()));
        let err = template(&args).expect_failure();
        assert!(
            err.contains(path),
            "the schema error for {bad:?} does not name {path}:\n{err}"
        );
    }
    // Missing altogether: `cluster` is required.
    let err = template(&["--set", "issuer.existingSecret=x"]).expect_failure();
    assert!(err.contains("/cluster"), "{err}");
}

fn alerts_file() -> Value {
    let path = chart().join("files/alerts.yaml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_saphyr::from_str(&text)
        .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()))
}

#[test]
fn prometheus_rule_deploys_exactly_the_alerts_file() {
    let rendered = render(&["--set", "prometheusRule.enabled=true"]);
    let docs = documents(&rendered);
    let rule = find(&docs, "PrometheusRule", "strait-gateway");
    let alerts = alerts_file();
    assert!(
        alerts["groups"].is_array(),
        "files/alerts.yaml has no groups"
    );
    assert_eq!(
        rule["spec"]["groups"], alerts["groups"],
        "the PrometheusRule's groups differ from files/alerts.yaml"
    );
    let names: Vec<&str> = alerts["groups"][0]["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .filter_map(|r| r["alert"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "StraitPeerDown",
            "StraitCertificateExpiring",
            "StraitMirrorErrors",
            "StraitGatewayDown"
        ]
    );
}

#[test]
fn alerts_pass_promtool_check_and_unit_tests() {
    let out = run(
        "promtool",
        &["check", "rules", "charts/strait/files/alerts.yaml"],
        None,
    )
    .expect_ok();
    assert!(out.contains("SUCCESS: 4 rules found"), "{out}");
    let out = run(
        "promtool",
        &["test", "rules", "charts/strait/tests/alerts_test.yaml"],
        None,
    )
    .expect_ok();
    assert!(out.contains("SUCCESS"), "{out}");
}

/// Metric names the gateway and DNS server export (prometheus-client adds
/// `_total` to counters and `_bucket`/`_sum`/`_count` to histograms).
const METRICS: [&str; 11] = [
    "strait_peer_up",
    "strait_peer_rtt_seconds_bucket",
    "strait_tunnel_bytes_total",
    "strait_tunnel_streams_total",
    "strait_tunnel_streams_open",
    "strait_imports",
    "strait_exports",
    "strait_dns_queries_total",
    "strait_dns_query_duration_seconds_bucket",
    "strait_mirror_sync_errors_total",
    "strait_mirror_sync_duration_seconds_bucket",
];

#[test]
fn dashboard_queries_parse_and_use_real_metrics() {
    let path = chart().join("files/dashboard.json");
    let text = std::fs::read_to_string(&path).expect("dashboard.json");
    let dashboard: Value = serde_json::from_str(&text).expect("dashboard.json is JSON");
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_string))
        .collect();
    assert!(exprs.len() >= 12, "too few queries: {exprs:?}");
    let all = exprs.join("\n");
    for metric in METRICS
        .iter()
        .chain(&["strait_identity_cert_expiry_timestamp_seconds"])
    {
        assert!(all.contains(metric), "no panel shows {metric}");
    }
    for word in all.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("strait_") {
            assert!(
                METRICS.contains(&word) || word == "strait_identity_cert_expiry_timestamp_seconds",
                "the dashboard queries {word}, which no Strait component exports"
            );
        }
    }
    // promtool parses every query (as recording rules), with Grafana's
    // interval variable replaced.
    let rules = json!({
        "groups": [{
            "name": "dashboard",
            "rules": exprs.iter().enumerate().map(|(i, e)| json!({
                "record": format!("dashboard:query{i}"),
                "expr": e.replace("$__rate_interval", "5m"),
            })).collect::<Vec<_>>(),
        }]
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("dashboard-rules.json");
    std::fs::write(&file, rules.to_string()).expect("write rules");
    run(
        "promtool",
        &[OsStr::new("check"), OsStr::new("rules"), file.as_os_str()],
        None,
    )
    .expect_ok();
    // The ConfigMap carries the file as is.
    let docs = documents(&render(&[]));
    let cm = find(&docs, "ConfigMap", "strait-dashboard");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(cm["data"]["strait.json"].as_str(), Some(text.trim_end()));
}

fn assert_locked_down(pod_spec: &Value, what: &str) {
    let pod = &pod_spec["securityContext"];
    assert_eq!(pod["runAsNonRoot"], true, "{what}: pod runAsNonRoot");
    assert_eq!(pod["runAsUser"], 65532, "{what}: pod runAsUser");
    assert_eq!(pod["runAsGroup"], 65532, "{what}: pod runAsGroup");
    assert_eq!(
        pod["seccompProfile"]["type"], "RuntimeDefault",
        "{what}: pod seccomp"
    );
    let containers = pod_spec["containers"].as_array().expect("containers");
    assert!(!containers.is_empty());
    for c in containers {
        let sc = &c["securityContext"];
        assert_eq!(sc["runAsNonRoot"], true, "{what}: runAsNonRoot");
        assert_eq!(sc["runAsUser"], 65532, "{what}: runAsUser");
        assert_eq!(sc["runAsGroup"], 65532, "{what}: runAsGroup");
        assert_eq!(
            sc["readOnlyRootFilesystem"], true,
            "{what}: readOnlyRootFilesystem"
        );
        assert_eq!(
            sc["allowPrivilegeEscalation"], false,
            "{what}: allowPrivilegeEscalation"
        );
        assert_ne!(sc["privileged"], true, "{what}: privileged");
        assert_eq!(
            sc["capabilities"]["drop"],
            json!(["ALL"]),
            "{what}: drop ALL"
        );
        assert!(
            sc["capabilities"]["add"].is_null(),
            "{what}: no capability added"
        );
        assert_eq!(
            sc["seccompProfile"]["type"], "RuntimeDefault",
            "{what}: seccomp"
        );
    }
    assert_ne!(pod_spec["hostNetwork"], true, "{what}: hostNetwork");
    assert_ne!(pod_spec["hostPID"], true, "{what}: hostPID");
}

#[test]
fn deployment_is_locked_down_and_complete() {
    let docs = documents(&render(&[]));
    let deployment = find(&docs, "Deployment", "strait-gateway");
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert_eq!(labels["app.kubernetes.io/name"], "strait-gateway");
    assert_eq!(labels["app.kubernetes.io/instance"], RELEASE);
    assert_eq!(labels["app.kubernetes.io/part-of"], "strait");
    assert_eq!(deployment["spec"]["replicas"], 2);
    let annotations = &deployment["spec"]["template"]["metadata"]["annotations"];
    assert!(annotations["checksum/config"]
        .as_str()
        .is_some_and(|s| s.len() == 64));
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "4191");
    assert_eq!(annotations["prometheus.io/path"], "/metrics");

    let spec = &deployment["spec"]["template"]["spec"];
    assert_locked_down(spec, "gateway");
    assert_eq!(spec["serviceAccountName"], "strait-gateway");
    let term =
        &spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0];
    assert_eq!(
        term["podAffinityTerm"]["topologyKey"],
        "kubernetes.io/hostname"
    );

    let c = &spec["containers"][0];
    assert_eq!(c["image"], "ghcr.io/strait/strait:0.1.0");
    assert_eq!(c["imagePullPolicy"], "IfNotPresent");
    assert_eq!(
        c["args"],
        json!(["gateway", "--config", "/etc/strait/config.yaml"])
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"],
        json!({"path": "/ready", "port": 4191})
    );
    assert_eq!(
        c["livenessProbe"]["httpGet"],
        json!({"path": "/live", "port": 4191})
    );
    assert_eq!(
        c["resources"]["requests"],
        json!({"cpu": "100m", "memory": "128Mi"})
    );
    assert_eq!(
        c["resources"]["limits"],
        json!({"cpu": "1", "memory": "256Mi"})
    );
    let env: Vec<(String, String)> = c["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap_or_default().to_string(),
                e["valueFrom"]["fieldRef"]["fieldPath"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    assert_eq!(
        env,
        [
            ("POD_NAME".into(), "metadata.name".into()),
            ("POD_NAMESPACE".into(), "metadata.namespace".into()),
            ("POD_IP".into(), "status.podIP".into()),
        ]
    );
    let ports: Vec<(u64, String)> = c["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .map(|p| {
            (
                p["containerPort"].as_u64().unwrap_or_default(),
                p["protocol"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    for want in [
        (4143, "UDP"),
        (4143, "TCP"),
        (4191, "TCP"),
        (5353, "UDP"),
        (5353, "TCP"),
        (8086, "TCP"),
    ] {
        assert!(
            ports.contains(&(want.0, want.1.to_string())),
            "no container port {want:?}"
        );
    }
    assert_eq!(
        c["volumeMounts"],
        json!([
            {"name": "config", "mountPath": "/etc/strait", "readOnly": true},
            {"name": "issuer", "mountPath": "/var/run/strait/issuer", "readOnly": true},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "injector-tls", "mountPath": "/var/run/strait/injector", "readOnly": true},
        ])
    );
    let volumes = &spec["volumes"];
    assert_eq!(volumes[0]["configMap"]["name"], "strait-gateway-config");
    assert_eq!(volumes[1]["secret"]["secretName"], "strait-issuer");
    assert!(volumes[2]["emptyDir"].is_object());

    let secret = find(&docs, "Secret", "strait-issuer");
    assert_eq!(secret["type"], "kubernetes.io/tls");
    for key in ["tls.crt", "tls.key", "ca.crt"] {
        assert!(
            secret["data"][key].as_str().is_some_and(|v| !v.is_empty()),
            "{key}"
        );
    }

    let pdb = find(&docs, "PodDisruptionBudget", "strait-gateway");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    let single = documents(&render(&["--set", "replicas=1"]));
    assert!(
        !has(&single, "PodDisruptionBudget"),
        "a PDB with one replica"
    );

    let test = docs
        .iter()
        .find(|d| d["kind"] == "Pod")
        .expect("the helm test pod");
    assert_eq!(test["metadata"]["annotations"]["helm.sh/hook"], "test");
    assert_ne!(
        test["metadata"]["labels"]["app.kubernetes.io/name"], "strait-gateway",
        "the test pod must not look like a gateway pod"
    );
    assert!(test["spec"]["containers"][0]["args"]
        .as_array()
        .is_some_and(|a| a.iter().any(|x| x
            .as_str()
            .is_some_and(|s| s.contains("strait-admin") && s.ends_with(":4191/ready")))));
    assert_locked_down(&test["spec"], "helm test pod");
}

#[test]
fn config_file_has_the_gateway_shape() {
    let docs = documents(&render(&[]));
    let cm = find(&docs, "ConfigMap", "strait-gateway-config");
    let text = cm["data"]["config.yaml"].as_str().expect("config.yaml");
    let config: Value = serde_saphyr::from_str(text).expect("config.yaml parses");
    // The gateway itself accepts it, defaults and all.
    let parsed = strait_gateway::GatewayConfig::parse(text, std::path::Path::new("config.yaml"))
        .unwrap_or_else(|e| panic!("the gateway refuses the chart's config: {e}\n{text}"));
    assert!(parsed.source.kubernetes.is_some());
    assert_eq!(
        config,
        json!({
            "cluster": "west",
            "identity": {
                "trustAnchors": "/var/run/strait/issuer/ca.crt",
                "issuerCert": "/var/run/strait/issuer/tls.crt",
                "issuerKey": "/var/run/strait/issuer/tls.key",
            },
            "listen": {
                "tunnel": "0.0.0.0:4143",
                "admin": "0.0.0.0:4191",
                "dns": "0.0.0.0:5353",
                "destination": "0.0.0.0:8086",
                "identity": "0.0.0.0:8080",
            },
            "source": {
                "kubernetes": {
                    "namespace": NAMESPACE,
                    "exportLabel": "strait.io/export",
                    "gatewaySelector": format!(
                        "app.kubernetes.io/name=strait-gateway,app.kubernetes.io/instance={RELEASE}"
                    ),
                    "egressPortMin": 20000,
                    "egressPortMax": 20999,
                    "leaseName": "strait-mirror-writer",
                },
            },
            "imports": {"gracePeriodSeconds": 60, "dnsTtlSeconds": 5},
            "maxConnections": 20000,
            "injector": {
                "listen": "0.0.0.0:8443",
                "certFile": "/var/run/strait/injector/tls.crt",
                "keyFile": "/var/run/strait/injector/tls.key",
                "image": "ghcr.io/strait/strait-proxy:0.1.0",
                "ipv6": false,
            },
        })
    );
    // A config change rolls the pods.
    let checksum = |docs: &[Value]| {
        find(docs, "Deployment", "strait-gateway")["spec"]["template"]["metadata"]["annotations"]
            ["checksum/config"]
            .clone()
    };
    let changed = documents(&render(&["--set", "config.dnsTtlSeconds=30"]));
    assert_ne!(checksum(&docs), checksum(&changed));
    let limited = documents(&render(&["--set", "config.maxConnections=500"]));
    let cm = find(&limited, "ConfigMap", "strait-gateway-config");
    let text = cm["data"]["config.yaml"].as_str().expect("config.yaml");
    let parsed = strait_gateway::GatewayConfig::parse(text, std::path::Path::new("config.yaml"))
        .unwrap_or_else(|e| panic!("the gateway refuses the chart's config: {e}\n{text}"));
    assert_eq!(parsed.max_connections, 500);
}

#[test]
fn services_expose_the_documented_ports() {
    let docs = documents(&render(&[]));
    let ports = |name: &str| -> Vec<Value> {
        let svc = find(&docs, "Service", name);
        svc["spec"]["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .map(|p| json!([p["port"], p["protocol"]]))
            .collect()
    };
    assert_eq!(
        find(&docs, "Service", "strait-gateway")["spec"]["type"],
        "LoadBalancer"
    );
    assert_eq!(
        ports("strait-gateway"),
        [json!([4143, "UDP"]), json!([4143, "TCP"])]
    );
    assert_eq!(ports("strait-admin"), [json!([4191, "TCP"])]);
    assert_eq!(
        ports("strait-dns"),
        [json!([53, "UDP"]), json!([53, "TCP"])]
    );
    assert_eq!(ports("strait-destination"), [json!([8086, "TCP"])]);
    assert_eq!(ports("strait-identity"), [json!([8080, "TCP"])]);
    let admin = find(&docs, "Service", "strait-admin");
    assert_eq!(admin["spec"]["type"], "ClusterIP");
    assert_eq!(
        admin["metadata"]["annotations"]["prometheus.io/scrape"],
        "true"
    );
    assert_eq!(
        admin["metadata"]["annotations"]["prometheus.io/port"],
        "4191"
    );
    assert_eq!(
        admin["metadata"]["annotations"]["prometheus.io/path"],
        "/metrics"
    );
    // Each Service's named targetPort is a gateway container port of the
    // same protocol and the documented number.
    let deployment = find(&docs, "Deployment", "strait-gateway");
    let container_ports = deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
        .as_array()
        .expect("container ports");
    for (service, number) in [
        ("strait-gateway", 4143),
        ("strait-admin", 4191),
        ("strait-dns", 5353),
        ("strait-destination", 8086),
        ("strait-identity", 8080),
    ] {
        for p in find(&docs, "Service", service)["spec"]["ports"]
            .as_array()
            .expect("ports")
        {
            let target = container_ports
                .iter()
                .find(|c| c["name"] == p["targetPort"])
                .unwrap_or_else(|| panic!("{service}: no container port {}", p["targetPort"]));
            assert_eq!(target["containerPort"], number, "{service}: {p}");
            assert_eq!(target["protocol"], p["protocol"], "{service}: {p}");
        }
    }
}

fn rules(role: &Value) -> Value {
    role["rules"].clone()
}

#[test]
fn rbac_is_least_privilege() {
    let docs = documents(&render(&[]));
    // Server-side apply and delete: no whole-object updates, no events.
    let all = ["get", "list", "watch", "create", "patch", "delete"];
    let read = ["get", "list", "watch"];
    let status = ["get", "patch"];
    assert_eq!(
        rules(find(&docs, "ClusterRole", "strait-gateway")),
        json!([
            {"apiGroups": [""], "resources": ["services"], "verbs": all},
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": all},
            {"apiGroups": ["multicluster.x-k8s.io"], "resources": ["serviceexports"], "verbs": read},
            {"apiGroups": ["multicluster.x-k8s.io"], "resources": ["serviceexports/status"], "verbs": status},
            {"apiGroups": ["multicluster.x-k8s.io"], "resources": ["serviceimports"], "verbs": all},
            {"apiGroups": ["multicluster.x-k8s.io"], "resources": ["serviceimports/status"], "verbs": status},
            {"apiGroups": ["strait.io"], "resources": ["links"], "verbs": read},
            {"apiGroups": ["strait.io"], "resources": ["links/status"], "verbs": status},
            {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["get", "list"]},
            {"apiGroups": [""], "resources": ["pods"], "verbs": read},
            {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
        ])
    );
    let role = find(&docs, "Role", "strait-gateway");
    assert_eq!(role["metadata"]["namespace"], NAMESPACE);
    assert_eq!(
        rules(role),
        json!([
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "list", "watch", "create", "update", "patch"]},
            {"apiGroups": [""], "resources": ["secrets"], "verbs": read},
        ])
    );
    for kind in ["ClusterRoleBinding", "RoleBinding"] {
        let binding = find(&docs, kind, "strait-gateway");
        assert_eq!(
            binding["subjects"],
            json!([{"kind": "ServiceAccount", "name": "strait-gateway", "namespace": NAMESPACE}])
        );
    }
    find(&docs, "ServiceAccount", "strait-gateway");
}

fn leaf_paths(value: &Value, prefix: &str, out: &mut Vec<String>) {
    match value.as_object() {
        Some(map) if !map.is_empty() => {
            for (key, child) in map {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                leaf_paths(child, &path, out);
            }
        }
        _ => out.push(prefix.to_string()),
    }
}

#[test]
fn readme_documents_every_value() {
    let values: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(chart().join("values.yaml")).expect("values.yaml"),
    )
    .expect("values.yaml parses");
    let readme = std::fs::read_to_string(chart().join("README.md")).expect("README.md");
    let mut paths = Vec::new();
    leaf_paths(&values, "", &mut paths);
    for path in paths {
        // A row for the value or for one of its parents (`resources`).
        let parts: Vec<&str> = path.split('.').collect();
        let documented =
            (1..=parts.len()).any(|n| readme.contains(&format!("| `{}` |", parts[..n].join("."))));
        assert!(documented, "README.md has no row for `{path}`");
    }
}

/// What `strait inject` writes passes the same strict validation as the
/// chart: workloads of each kind that makes pods, one opted out, and an
/// object left as it was.
#[test]
fn injected_workloads_pass_strict_validation() {
    use strait_gateway::k8s::inject::{inject_yaml, InjectConfig, Outcome};
    let root = strait_proxy::identity::generate_root("west").expect("root");
    let config = InjectConfig {
        image: "ghcr.io/strait/strait-proxy:0.1.0".into(),
        trust_domain: "west.strait.local".into(),
        trust_anchors_pem: root.cert_pem,
        control_plane_namespace: NAMESPACE.into(),
        destination_mtls: true,
        ipv6: true,
        ..InjectConfig::default()
    };
    let manifests = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: demo}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata:
      labels: {app: web}
      annotations: {strait.io/skip-inbound-ports: "9090"}
    spec:
      serviceAccountName: web
      containers: [{name: web, image: "nginx:1.27", ports: [{containerPort: 80}]}]
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: report, namespace: demo}
spec:
  schedule: "0 3 * * *"
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: OnFailure
          containers: [{name: report, image: "busybox:1.36"}]
---
apiVersion: v1
kind: Pod
metadata: {name: debug, namespace: demo, annotations: {strait.io/inject: disabled}}
spec: {containers: [{name: debug, image: "busybox:1.36"}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec: {selector: {app: web}, ports: [{port: 80}]}
"#;
    let (out, reports) = inject_yaml(manifests, &config).expect("inject");
    let injected = reports
        .iter()
        .filter(|r| r.outcome == Outcome::Injected)
        .count();
    assert_eq!(injected, 2, "{reports:?}");
    validate_strictly(&out);
}

/// The injector webhook: the API server calls `strait-injector` at
/// `/inject` for Pod creations in opted-in namespaces (never the gateway's
/// own), trusting the CA that signed the certificate the gateway serves,
/// which names the Service; turned off, none of it is rendered.
#[test]
fn the_injector_webhook_is_wired_to_the_gateway() {
    use base64::Engine as _;
    use rustls::client::danger::ServerCertVerifier as _;
    let docs = documents(&render(&[]));
    let webhook = find(
        &docs,
        "MutatingWebhookConfiguration",
        &format!("strait-injector-{NAMESPACE}"),
    );
    let hook = &webhook["webhooks"][0];
    assert_eq!(
        hook["clientConfig"]["service"],
        json!({"name": "strait-injector", "namespace": NAMESPACE, "path": "/inject", "port": 443})
    );
    assert_eq!(hook["failurePolicy"], "Ignore");
    assert_eq!(hook["sideEffects"], "None");
    assert_eq!(hook["admissionReviewVersions"], json!(["v1"]));
    assert_eq!(hook["rules"][0]["operations"], json!(["CREATE"]));
    assert_eq!(hook["rules"][0]["resources"], json!(["pods"]));
    assert_eq!(
        hook["namespaceSelector"],
        json!({
            "matchLabels": {"strait.io/inject": "enabled"},
            "matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "NotIn",
                "values": ["kube-system", "kube-public", "kube-node-lease", NAMESPACE]}],
        })
    );
    // Even a selector of every namespace leaves out the system ones.
    let all = documents(&render(&["--set-json", "injector.namespaceSelector={}"]));
    let hook_all = &find(
        &all,
        "MutatingWebhookConfiguration",
        &format!("strait-injector-{NAMESPACE}"),
    )["webhooks"][0];
    assert_eq!(
        hook_all["namespaceSelector"]["matchExpressions"][0]["values"][0],
        "kube-system"
    );
    assert_eq!(
        hook["objectSelector"]["matchExpressions"][0],
        json!({"key": "app.kubernetes.io/part-of", "operator": "NotIn", "values": ["strait"]})
    );
    let svc = find(&docs, "Service", "strait-injector");
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "injector");
    let deployment = find(&docs, "Deployment", "strait-gateway");
    let ports = &deployment["spec"]["template"]["spec"]["containers"][0]["ports"];
    assert!(ports
        .as_array()
        .expect("ports")
        .iter()
        .any(|p| p["name"] == "injector" && p["containerPort"] == 8443));

    // The certificate names the Service and chains to the caBundle.
    let b64 = |v: &Value| {
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("base64"))
            .expect("base64")
    };
    let secret = find(&docs, "Secret", "strait-injector-tls");
    assert_eq!(secret["type"], "kubernetes.io/tls");
    let ca_pem = b64(&hook["clientConfig"]["caBundle"]);
    assert_eq!(ca_pem, b64(&secret["data"]["ca.crt"]));
    let der = |pem: &[u8]| {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_slice(pem).expect("PEM")
    };
    let ca = der(&ca_pem);
    let leaf = der(&b64(&secret["data"]["tls.crt"]));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).expect("root");
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        strait_proxy::tls::provider(),
    )
    .build()
    .expect("verifier");
    let name = format!("strait-injector.{NAMESPACE}.svc");
    verifier
        .verify_server_cert(
            &leaf,
            &[],
            &rustls::pki_types::ServerName::try_from(name.as_str()).expect("name"),
            &[],
            rustls::pki_types::UnixTime::now(),
        )
        .expect("the leaf is valid for the Service name under the caBundle");

    let off = documents(&render(&["--set", "injector.enabled=false"]));
    assert!(!has(&off, "MutatingWebhookConfiguration"));
    assert!(off
        .iter()
        .all(|d| d["metadata"]["name"] != "strait-injector"
            && d["metadata"]["name"] != "strait-injector-tls"));
    let config: Value = serde_saphyr::from_str(
        find(&off, "ConfigMap", "strait-gateway-config")["data"]["config.yaml"]
            .as_str()
            .expect("config.yaml"),
    )
    .expect("config");
    assert!(config.get("injector").is_none());

    // A dual-stack cluster's sidecars redirect and serve IPv6 too.
    let v6 = documents(&render(&["--set", "injector.ipv6=true"]));
    let text = find(&v6, "ConfigMap", "strait-gateway-config")["data"]["config.yaml"]
        .as_str()
        .expect("config.yaml")
        .to_string();
    let config =
        strait_gateway::config::GatewayConfig::parse(&text, std::path::Path::new("config.yaml"))
            .expect("the gateway reads it");
    assert!(config.injector.expect("injector").ipv6, "{text}");
}

/// In an IPv6-only or dual-stack cluster (`ipv6: true`) every gateway
/// listener, egress and the injector's included, is on `[::]`; the tunnel
/// Service takes the families asked for. The default stays IPv4.
#[test]
fn an_ipv6_cluster_gets_listeners_on_both_families() {
    let config_of = |docs: &[Value]| {
        let text = find(docs, "ConfigMap", "strait-gateway-config")["data"]["config.yaml"]
            .as_str()
            .expect("config.yaml")
            .to_string();
        strait_gateway::config::GatewayConfig::parse(&text, std::path::Path::new("config.yaml"))
            .unwrap_or_else(|e| panic!("the gateway cannot read it: {e}\n{text}"))
    };
    let v6 = documents(&render(&[
        "--set",
        "ipv6=true",
        "--set",
        "service.ipFamilyPolicy=PreferDualStack",
        "--set",
        "service.ipFamilies={IPv6,IPv4}",
    ]));
    let config = config_of(&v6);
    let any6: std::net::IpAddr = "::".parse().expect("ip");
    for (what, addr) in [
        ("tunnel", config.listen.tunnel),
        ("admin", config.listen.admin),
        ("dns", config.listen.dns),
        ("destination", config.listen.destination),
        ("identity", config.listen.identity),
        (
            "injector",
            config.injector.as_ref().expect("injector").listen,
        ),
    ] {
        assert_eq!(addr.ip(), any6, "{what}: {addr}");
    }
    let kube = config
        .source
        .kubernetes
        .as_ref()
        .expect("kubernetes source");
    assert_eq!(kube.egress_address, any6);
    let service = find(&v6, "Service", "strait-gateway");
    assert_eq!(service["spec"]["ipFamilyPolicy"], "PreferDualStack");
    assert_eq!(service["spec"]["ipFamilies"], json!(["IPv6", "IPv4"]));

    let v4 = documents(&render(&[]));
    let config = config_of(&v4);
    assert_eq!(config.listen.tunnel, "0.0.0.0:4143".parse().expect("addr"));
    assert_eq!(
        config
            .source
            .kubernetes
            .as_ref()
            .expect("kubernetes")
            .egress_address,
        std::net::IpAddr::from([0, 0, 0, 0])
    );
    let service = find(&v4, "Service", "strait-gateway");
    assert!(
        service["spec"].get("ipFamilyPolicy").is_none(),
        "{service:?}"
    );
    assert!(service["spec"].get("ipFamilies").is_none(), "{service:?}");

    let certs = Certs::new();
    let mut args = certs.values();
    args.extend(["--set".to_string(), "service.ipFamilies={IPv5}".to_string()]);
    let err = template(&args).expect_failure();
    assert!(err.contains("ipFamilies"), "{err}");
    for bad in [
        "service.ipFamilies={IPv6}",
        "service.ipFamilyPolicy=PreferDualStack",
    ] {
        let mut args = certs.values();
        args.extend(["--set".to_string(), bad.to_string()]);
        let err = template(&args).expect_failure();
        assert!(err.contains("set ipv6=true"), "{bad}: {err}");
    }
    let mut args = certs.values();
    args.extend(
        [
            "--set",
            "ipv6=true",
            "--set",
            "service.ipFamilyPolicy=SingleStack",
            "--set",
            "service.ipFamilies={IPv4,IPv6}",
        ]
        .map(String::from),
    );
    let err = template(&args).expect_failure();
    assert!(err.contains("SingleStack takes one"), "{err}");
    // Values reused from a release of an older chart have no `ipv6`.
    let reused = documents(&render(&["--set", "ipv6=null"]));
    assert_eq!(
        config_of(&reused).listen.tunnel,
        "0.0.0.0:4143".parse().expect("addr")
    );
    // The config starts with its first key, not a blank line.
    let text = find(&v4, "ConfigMap", "strait-gateway-config")["data"]["config.yaml"]
        .as_str()
        .expect("config.yaml");
    assert!(text.starts_with("cluster: "), "{text:?}");
}

/// The injector needs native sidecars (Kubernetes 1.29); with a
/// certificate of the user's own (cert-manager, GitOps) the chart makes
/// none and wants the CA to trust.
#[test]
fn the_injector_refuses_old_clusters_and_takes_an_existing_certificate() {
    let certs = Certs::new();
    let with = |extra: &[&str]| {
        let mut args = certs.values();
        args.extend(extra.iter().map(|s| s.to_string()));
        template(&args)
    };
    let err = with(&["--kube-version", "1.28.0"]).expect_failure();
    assert!(err.contains("needs Kubernetes 1.29"), "{err}");
    with(&[
        "--kube-version",
        "1.28.0",
        "--set",
        "injector.enabled=false",
    ])
    .expect_ok();

    let err = with(&["--set", "injector.tls.existingSecret=my-injector"]).expect_failure();
    assert!(err.contains("injector.tls.caBundle"), "{err}");
    let docs = documents(
        &with(&[
            "--set",
            "injector.tls.existingSecret=my-injector",
            "--set",
            "injector.webhookAnnotations.cert-manager\\.io/inject-ca-from=strait-system/injector",
        ])
        .expect_ok(),
    );
    assert!(docs
        .iter()
        .all(|d| d["metadata"]["name"] != "strait-injector-tls"));
    let webhook = find(
        &docs,
        "MutatingWebhookConfiguration",
        &format!("strait-injector-{NAMESPACE}"),
    );
    assert_eq!(
        webhook["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        "strait-system/injector"
    );
    assert!(webhook["webhooks"][0]["clientConfig"]["caBundle"].is_null());
    let volumes =
        &find(&docs, "Deployment", "strait-gateway")["spec"]["template"]["spec"]["volumes"];
    assert!(volumes
        .as_array()
        .expect("volumes")
        .iter()
        .any(|v| v["secret"]["secretName"] == "my-injector"));
    let docs = documents(
        &with(&[
            "--set",
            "injector.tls.existingSecret=my-injector",
            "--set",
            "injector.tls.caBundle=-----BEGIN CERTIFICATE-----",
        ])
        .expect_ok(),
    );
    let webhook = find(
        &docs,
        "MutatingWebhookConfiguration",
        &format!("strait-injector-{NAMESPACE}"),
    );
    assert_eq!(
        webhook["webhooks"][0]["clientConfig"]["caBundle"],
        "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0t"
    );
}
