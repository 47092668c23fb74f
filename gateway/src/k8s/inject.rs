//! `strait inject`: adds the sidecar proxy to the pods of Kubernetes
//! manifests, as `linkerd inject` does.
//!
//! Every object that makes pods (Pod, Deployment, StatefulSet, DaemonSet,
//! ReplicaSet, ReplicationController, Job, CronJob, and the items of a
//! List) gets, in its pod spec:
//! - a first init container `strait-init` (`strait-proxy init`: the
//!   iptables rules that send the pod's TCP through the proxy, skipping the
//!   proxy's own UID);
//! - the proxy, `strait-proxy` (`strait-proxy run --transparent`), as a
//!   native sidecar: the second init container, with `restartPolicy:
//!   Always` and a startup probe on `/ready`, so the kubelet starts it
//!   before any other init or application container and waits until it is
//!   certified (every connection they make goes through it), and stops it
//!   after them (a Job's pod completes). Native sidecars need Kubernetes
//!   1.29 or later. It is certified by the gateway's identity service with
//!   a projected service account token, discovers destinations from the
//!   gateway, and trusts the cluster's anchors (given inline: no ConfigMap
//!   needed per namespace);
//! - a projected token volume for the audience `identity.strait.io`;
//! - the pod label `strait.io/meshed: "true"`, by which the gateway knows
//!   the pod's endpoints are meshed and serves them to sidecars with the
//!   pod's identity (they connect to it with mutual TLS).
//!
//! Its SPIFFE ID comes from the pod itself (namespace and service account
//! through the downward API), so one injected manifest serves any
//! namespace. Pods annotated `strait.io/inject: disabled` and pods on the
//! host's network are left as they are; pods already injected are left as
//! they are when current, else injected again (an older injector's proxy,
//! changed annotations). The pod
//! annotations `strait.io/skip-inbound-ports`, `strait.io/skip-outbound-ports`
//! and `strait.io/opaque-ports` (comma-separated ports) are passed on;
//! `strait.io/proxy-threads` sets the proxy's worker threads (default 1:
//! tokio's single-threaded scheduler, the cheapest per request, as
//! linkerd2-proxy runs with one core).
//!
//! The transform is pure: YAML in, YAML out.

use serde_json::{json, Map, Value};

/// The annotation that opts a workload out (`disabled`).
pub const INJECT_ANNOTATION: &str = "strait.io/inject";
/// The annotation an injected pod carries: the proxy image injected.
pub const INJECTED_ANNOTATION: &str = "strait.io/injected";
/// The proxy container's name.
pub const PROXY_CONTAINER: &str = "strait-proxy";
/// The init container's name.
pub const INIT_CONTAINER: &str = "strait-init";
/// The UID the proxy runs as; its own traffic is not redirected.
pub const PROXY_UID: i64 = 2102;
/// Where the projected identity token is mounted.
pub const TOKEN_DIR: &str = "/var/run/secrets/tokens";
/// The audience of the identity token (the gateway's `identity.tokenAudience`).
pub const TOKEN_AUDIENCE: &str = "identity.strait.io";

const TOKEN_VOLUME: &str = "strait-identity";
const INIT_RUN_VOLUME: &str = "strait-init-run";
/// The annotation that sets the proxy's worker threads.
pub const THREADS_ANNOTATION: &str = "strait.io/proxy-threads";
/// The proxy's worker threads unless annotated: one.
const DEFAULT_THREADS: u16 = 1;
/// At most this many worker threads may be asked for.
const MAX_THREADS: u16 = 64;
const ANNOTATION_PORTS: [(&str, &str); 3] = [
    ("strait.io/skip-inbound-ports", "--skip-inbound-ports"),
    ("strait.io/skip-outbound-ports", "--skip-outbound-ports"),
    ("strait.io/opaque-ports", "STRAIT_PROXY_OPAQUE_PORTS"),
];

/// What the injected containers need to know about the cluster.
#[derive(Debug, Clone)]
pub struct InjectConfig {
    /// The `strait-proxy` image (init and proxy).
    pub image: String,
    /// The cluster's SPIFFE trust domain.
    pub trust_domain: String,
    /// The cluster's trust anchors (PEM).
    pub trust_anchors_pem: String,
    /// Where the gateway runs (its `strait-identity` and
    /// `strait-destination` Services). The gateway's own SPIFFE ID, which
    /// proxies pin, names `strait-system` whatever this is.
    pub control_plane_namespace: String,
    /// Speak mTLS to destination discovery (the gateway's
    /// `listen.destinationMtls`).
    pub destination_mtls: bool,
    /// The cluster gives pods IPv6 addresses as well (a dual-stack cluster):
    /// the init container redirects IPv6 traffic too (`--ipv6`), the proxy
    /// listens on `[::]` for inbound and admin traffic and on `[::1]` for
    /// the application's IPv6 connections out.
    pub ipv6: bool,
    /// The audience of the service account token the proxy shows the
    /// identity service (the gateway's `identity.tokenAudience`).
    pub token_audience: String,
    /// The proxies' inbound port (the gateway's `mesh.proxyInboundPort`,
    /// where it and other proxies reach meshed pods).
    pub proxy_inbound_port: u16,
}

impl Default for InjectConfig {
    fn default() -> Self {
        Self {
            image: String::new(),
            trust_domain: String::new(),
            trust_anchors_pem: String::new(),
            control_plane_namespace: String::new(),
            destination_mtls: false,
            ipv6: false,
            token_audience: TOKEN_AUDIENCE.to_string(),
            proxy_inbound_port: DEFAULT_INBOUND_PORT,
        }
    }
}

/// The proxy's own default inbound port.
const DEFAULT_INBOUND_PORT: u16 = 4143;

/// What happened to one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The proxy was added.
    Injected,
    /// The proxy was there, injected with other settings (an older
    /// injector, other annotations): it was injected again.
    Updated,
    /// Left alone, and why.
    Skipped(&'static str),
}

/// One object's outcome, named `kind/name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// `kind/name` of the object.
    pub object: String,
    /// What happened.
    pub outcome: Outcome,
}

/// Why manifests could not be injected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InjectError {
    /// The input is not YAML.
    #[error("reading the manifests: {0}")]
    Parse(String),
    /// An annotation's value is not a list of ports.
    #[error("{object}: annotation {annotation}: {value:?} is not a comma-separated list of ports")]
    BadPorts {
        /// `kind/name` of the object.
        object: String,
        /// The annotation.
        annotation: &'static str,
        /// Its value.
        value: String,
    },
    /// The threads annotation is not a number from 1 to 64.
    #[error("{object}: annotation {THREADS_ANNOTATION}: {value:?} is not a number of threads from 1 to {MAX_THREADS}")]
    BadThreads {
        /// `kind/name` of the object.
        object: String,
        /// Its value.
        value: String,
    },
    /// A pod spec field has the wrong shape (e.g. `containers` not a list).
    #[error("{object}: {field} is not a {expected}")]
    Shape {
        /// `kind/name` of the object.
        object: String,
        /// The field.
        field: &'static str,
        /// What it should be.
        expected: &'static str,
    },
    /// Writing YAML failed.
    #[error("writing the manifests: {0}")]
    Write(String),
}

/// Injects every document of a multi-document YAML stream; returns the
/// documents (each object as it was when not injected) and what happened
/// to each.
pub fn inject_yaml(
    input: &str,
    config: &InjectConfig,
) -> Result<(String, Vec<Report>), InjectError> {
    // Kubernetes reads YAML 1.1: `0644` is octal (a file mode), not 644.
    let options = serde_saphyr::options! { legacy_octal_numbers: true };
    let docs: Vec<Value> = serde_saphyr::from_str_multiple_with_options(input, options)
        .map_err(|e| InjectError::Parse(e.to_string()))?;
    let mut out = Vec::with_capacity(docs.len());
    let mut reports = Vec::new();
    for mut doc in docs {
        if doc.is_null() {
            continue;
        }
        inject_object(&mut doc, config, &mut reports)?;
        out.push(doc);
    }
    let yaml =
        serde_saphyr::to_string_multiple(&out).map_err(|e| InjectError::Write(e.to_string()))?;
    Ok((yaml, reports))
}

/// Injects one object (and the items of a List), appending to `reports`.
pub fn inject_object(
    obj: &mut Value,
    config: &InjectConfig,
    reports: &mut Vec<Report>,
) -> Result<(), InjectError> {
    let kind = obj
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if kind == "List" || kind.ends_with("List") {
        if let Some(items) = obj.get_mut("items").and_then(Value::as_array_mut) {
            for item in items {
                inject_object(item, config, reports)?;
            }
        }
        return Ok(());
    }
    let name = obj
        .pointer("/metadata/name")
        .or_else(|| obj.pointer("/metadata/generateName"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let object = format!("{}/{name}", kind.to_ascii_lowercase());
    let template = match kind.as_str() {
        "Pod" => "",
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "ReplicationController"
        | "Job" => "/spec/template",
        "CronJob" => "/spec/jobTemplate/spec/template",
        _ => {
            reports.push(Report {
                object,
                outcome: Outcome::Skipped("makes no pods"),
            });
            return Ok(());
        }
    };
    let disabled = |v: &Value| {
        v.pointer("/metadata/annotations")
            .and_then(|a| a.get(INJECT_ANNOTATION))
            .and_then(Value::as_str)
            == Some("disabled")
    };
    let outcome = if disabled(obj) {
        Outcome::Skipped("annotated strait.io/inject: disabled")
    } else {
        match obj.pointer_mut(template) {
            None => Outcome::Skipped("no pod template"),
            Some(pod) if disabled(pod) => Outcome::Skipped("annotated strait.io/inject: disabled"),
            Some(pod) => inject_pod(pod, config, &object)?,
        }
    };
    reports.push(Report { object, outcome });
    Ok(())
}

/// Injects a pod (or pod template): `{metadata, spec}`.
fn inject_pod(
    pod: &mut Value,
    config: &InjectConfig,
    object: &str,
) -> Result<Outcome, InjectError> {
    let shape = |field, expected| InjectError::Shape {
        object: object.to_string(),
        field,
        expected,
    };
    let Some(pod) = pod.as_object_mut() else {
        return Err(shape("the pod template", "mapping"));
    };
    let metadata = pod
        .entry("metadata")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .ok_or_else(|| shape("metadata", "mapping"))?;
    // A static pod's mirror: the kubelet runs the static pod from its own
    // manifest, never these containers, and the API server refuses the
    // projected token volume on a mirror pod.
    if metadata
        .get("annotations")
        .and_then(|a| a.get("kubernetes.io/config.mirror"))
        .is_some()
    {
        return Ok(Outcome::Skipped("a static pod's mirror"));
    }
    let mut ports: Vec<(&'static str, String)> = Vec::new();
    let mut threads = DEFAULT_THREADS;
    if let Some(annotations) = metadata.get("annotations").and_then(Value::as_object) {
        let text = |value: &Value| {
            value
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| value.to_string())
        };
        for (annotation, flag) in ANNOTATION_PORTS {
            if let Some(value) = annotations.get(annotation) {
                ports.push((flag, checked_ports(&text(value), annotation, object)?));
            }
        }
        if let Some(value) = annotations.get(THREADS_ANNOTATION) {
            let value = text(value);
            threads = value
                .trim()
                .parse::<u16>()
                .ok()
                .filter(|n| (1..=MAX_THREADS).contains(n))
                .ok_or_else(|| InjectError::BadThreads {
                    object: object.to_string(),
                    value,
                })?;
        }
    }
    let spec = pod
        .get_mut("spec")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| shape("spec", "mapping"))?;
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Ok(Outcome::Skipped("on the host's network"));
    }
    // An injected pod is injected again from scratch (the old proxy, as
    // an init container or, from older injectors, a regular one, taken
    // out): what this injector adds is then current, and nothing changes
    // when it already was.
    let before = spec.clone();
    let named = |c: &Value, n: &str| c.get("name").and_then(Value::as_str) == Some(n);
    let containers = list(spec, "containers").ok_or_else(|| shape("spec.containers", "list"))?;
    let mut already = containers.iter().any(|c| named(c, PROXY_CONTAINER));
    containers.retain(|c| !named(c, PROXY_CONTAINER));
    let inits = list(spec, "initContainers").ok_or_else(|| shape("spec.initContainers", "list"))?;
    already |= inits.iter().any(|c| named(c, PROXY_CONTAINER));
    inits.retain(|c| !named(c, INIT_CONTAINER) && !named(c, PROXY_CONTAINER));
    // The rules, then the proxy (started, and certified, before anything
    // else in the pod makes a connection through the rules).
    inits.insert(0, init_container(config, &ports));
    inits.insert(1, proxy_container(config, &ports, threads));
    let volumes = list(spec, "volumes").ok_or_else(|| shape("spec.volumes", "list"))?;
    volumes.retain(|v| !named(v, TOKEN_VOLUME) && !named(v, INIT_RUN_VOLUME));
    volumes.push(json!({
        "name": TOKEN_VOLUME,
        "projected": {"sources": [{"serviceAccountToken": {
            "path": TOKEN_VOLUME,
            "audience": config.token_audience,
            "expirationSeconds": 3600,
        }}]},
    }));
    volumes.push(json!({"name": INIT_RUN_VOLUME, "emptyDir": {}}));
    let unchanged = already && *spec == before;
    let metadata = pod
        .get_mut("metadata")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| shape("metadata", "mapping"))?;
    let metadata_before = metadata.clone();
    // The image injected; and the label the gateway watches to serve the
    // pod's endpoints with its identity (sidecars then reach it with
    // mutual TLS).
    for (field, path, key, value) in [
        (
            "annotations",
            "metadata.annotations",
            INJECTED_ANNOTATION,
            config.image.as_str(),
        ),
        (
            "labels",
            "metadata.labels",
            crate::k8s::labels::MESHED,
            "true",
        ),
    ] {
        metadata
            .entry(field)
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .ok_or_else(|| shape(path, "mapping"))?
            .insert(key.into(), Value::String(value.into()));
    }
    Ok(match (already, unchanged && *metadata == metadata_before) {
        (false, _) => Outcome::Injected,
        (true, true) => Outcome::Skipped("already injected"),
        (true, false) => Outcome::Updated,
    })
}

/// The list at `key` of `spec`, created empty when absent.
fn list<'a>(spec: &'a mut Map<String, Value>, key: &str) -> Option<&'a mut Vec<Value>> {
    let v = spec.entry(key).or_insert_with(|| json!([]));
    if v.is_null() {
        *v = json!([]);
    }
    v.as_array_mut()
}

/// `value` as a canonical comma-separated list of ports.
fn checked_ports(
    value: &str,
    annotation: &'static str,
    object: &str,
) -> Result<String, InjectError> {
    let ports: Result<Vec<u16>, _> = value
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| strait_proxy::net::port_number(p).ok_or(()))
        .collect();
    match ports {
        Ok(ports) if !ports.is_empty() => Ok(ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(",")),
        _ => Err(InjectError::BadPorts {
            object: object.to_string(),
            annotation,
            value: value.to_string(),
        }),
    }
}

fn proxy_container(config: &InjectConfig, ports: &[(&str, String)], threads: u16) -> Value {
    let ns = &config.control_plane_namespace;
    let mut env = vec![
        json!({"name": "STRAIT_POD_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}),
        json!({"name": "STRAIT_POD_SA", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}}),
        json!({"name": "STRAIT_PROXY_IDENTITY", "value": format!(
            "spiffe://{}/ns/$(STRAIT_POD_NS)/sa/$(STRAIT_POD_SA)", config.trust_domain)}),
        json!({"name": "STRAIT_PROXY_IDENTITY_ADDR", "value": format!("strait-identity.{ns}.svc:8080")}),
        json!({"name": "STRAIT_PROXY_IDENTITY_TOKEN_FILE", "value": format!("{TOKEN_DIR}/{TOKEN_VOLUME}")}),
        json!({"name": "STRAIT_PROXY_DESTINATION_ADDR", "value": format!("strait-destination.{ns}.svc:8086")}),
        json!({"name": "STRAIT_PROXY_TRUST_ANCHORS_PEM", "value": config.trust_anchors_pem}),
        json!({"name": "STRAIT_THREADS", "value": threads.to_string()}),
        // The pod's addresses (both families in a dual-stack cluster): the
        // inbound side refuses connections to anything else.
        json!({"name": "STRAIT_PROXY_INBOUND_IPS", "valueFrom": {"fieldRef": {"fieldPath": "status.podIPs"}}}),
    ];
    let inbound = config.proxy_inbound_port;
    if config.ipv6 {
        env.extend([
            json!({"name": "STRAIT_PROXY_INBOUND_LISTEN", "value": format!("[::]:{inbound}")}),
            json!({"name": "STRAIT_PROXY_ADMIN_LISTEN", "value": "[::]:4191"}),
            json!({"name": "STRAIT_PROXY_OUTBOUND_LISTEN_IPV6", "value": "[::1]:4140"}),
        ]);
    } else if inbound != DEFAULT_INBOUND_PORT {
        env.push(
            json!({"name": "STRAIT_PROXY_INBOUND_LISTEN", "value": format!("0.0.0.0:{inbound}")}),
        );
    }
    if inbound != DEFAULT_INBOUND_PORT {
        // Where this proxy reaches the others, too.
        env.push(json!({"name": "STRAIT_PROXY_PEER_INBOUND_PORT", "value": inbound.to_string()}));
    }
    if config.destination_mtls {
        let gateway = format!(
            "spiffe://{}/ns/{}/sa/{}",
            config.trust_domain,
            crate::config::GATEWAY_NAMESPACE,
            crate::config::GATEWAY_SERVICE_ACCOUNT
        );
        env.push(json!({"name": "STRAIT_PROXY_DESTINATION_IDENTITY", "value": gateway}));
    }
    for (flag, value) in ports {
        if flag.starts_with("STRAIT_") {
            env.push(json!({"name": flag, "value": value}));
        }
    }
    json!({
        "name": PROXY_CONTAINER,
        "image": config.image,
        "imagePullPolicy": "IfNotPresent",
        "args": ["run", "--transparent"],
        // A native sidecar: runs beside the application containers.
        "restartPolicy": "Always",
        "env": env,
        "ports": [
            {"name": "strait-proxy", "containerPort": inbound, "protocol": "TCP"},
            {"name": "strait-admin", "containerPort": 4191, "protocol": "TCP"},
        ],
        // Up to two minutes to be certified before the pod's other
        // containers start.
        "startupProbe": {"httpGet": {"path": "/ready", "port": 4191}, "periodSeconds": 1, "failureThreshold": 120},
        "readinessProbe": {"httpGet": {"path": "/ready", "port": 4191}, "periodSeconds": 2},
        "livenessProbe": {"httpGet": {"path": "/live", "port": 4191}, "initialDelaySeconds": 10},
        "resources": {
            "requests": {"cpu": "10m", "memory": "20Mi"},
            "limits": {"memory": "250Mi"},
        },
        "securityContext": {
            "runAsUser": PROXY_UID,
            "runAsNonRoot": true,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true}],
    })
}

fn init_container(config: &InjectConfig, ports: &[(&str, String)]) -> Value {
    let mut args = vec![
        "init".to_string(),
        "--proxy-uid".to_string(),
        PROXY_UID.to_string(),
    ];
    for (flag, value) in ports {
        if flag.starts_with("--") {
            args.push((*flag).to_string());
            args.push(value.clone());
        }
    }
    if config.ipv6 {
        args.push("--ipv6".to_string());
    }
    if config.proxy_inbound_port != DEFAULT_INBOUND_PORT {
        args.push("--inbound-port".to_string());
        args.push(config.proxy_inbound_port.to_string());
    }
    json!({
        "name": INIT_CONTAINER,
        "image": config.image,
        "imagePullPolicy": "IfNotPresent",
        "args": args,
        "resources": {
            "requests": {"cpu": "10m", "memory": "10Mi"},
            "limits": {"memory": "50Mi"},
        },
        // iptables needs root and these two capabilities, nothing more;
        // its lock file goes to the emptyDir at /run.
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": false,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": INIT_RUN_VOLUME, "mountPath": "/run"}],
    })
}

/// A config for tests: a fixed image, trust domain `west.strait.local`,
/// a placeholder anchor.
#[cfg(test)]
pub(crate) fn test_config() -> InjectConfig {
    InjectConfig {
        image: "example.test/strait-proxy:1".into(),
        trust_domain: "west.strait.local".into(),
        trust_anchors_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
        control_plane_namespace: "strait-system".into(),
        destination_mtls: false,
        ipv6: false,
        ..InjectConfig::default()
    }
}

#[cfg(test)]
mod tests;
