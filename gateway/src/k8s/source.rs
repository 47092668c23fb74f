//! The kube cluster source: reflectors over Services, EndpointSlices and
//! ServiceExports in every namespace, folded by the pure [`cluster_state`]
//! into the same [`ClusterState`] the file source produces.
//!
//! A Service is exported when a ServiceExport of the same namespace and name
//! exists (MCS API) or when it carries the export label set to `true`.
//! Services Strait itself writes (mirrors, clusterset Services) are never
//! exported again: that would loop imports back to their origin.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource};
use tokio::sync::watch;

use super::crd::{Link, ServiceExport, ServiceImport};
use super::labels;
use crate::catalog::{
    validate_label, validate_ports, ClusterState, Endpoint, LocalService, Port, Protocol,
    ServiceKey, ServiceType,
};
use crate::source::ClusterSource;
use strait_proxy::identity::SpiffeId;

/// Why a Service is left out of the cluster state (counted, logged once).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// The Service.
    pub key: ServiceKey,
    /// Why.
    pub reason: String,
}

/// The SPIFFE IDs of meshed pods' sidecars, by pod IP
/// (`spiffe://<td>/ns/<ns>/sa/<serviceAccount>`).
///
/// Keyed by address, not by an EndpointSlice's `targetRef`: whoever may
/// write a slice in some namespace can list any address under any name,
/// but an address belongs to one running pod, and a connection to it
/// reaches that pod's sidecar.
pub type MeshedPods = BTreeMap<IpAddr, SpiffeId>;

/// The identities of `pods` (pure): those labelled [`labels::MESHED`],
/// running or about to (a finished pod's address may already be another
/// pod's), off the host's network (their address is the node's), by each
/// of their addresses. A pod without a service account name runs as
/// `default`.
pub fn meshed_pods<'a>(pods: impl IntoIterator<Item = &'a Pod>, trust_domain: &str) -> MeshedPods {
    let mut out = MeshedPods::new();
    for pod in pods {
        let meta = &pod.metadata;
        let meshed = meta
            .labels
            .as_ref()
            .and_then(|l| l.get(labels::MESHED))
            .is_some_and(|v| v == "true");
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
        let finished = matches!(
            status.and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        );
        let (Some(ns), Some(name), true, false, false) =
            (&meta.namespace, &meta.name, meshed, host_network, finished)
        else {
            continue;
        };
        let sa = spec
            .and_then(|s| s.service_account_name.as_deref())
            .filter(|sa| !sa.is_empty())
            .unwrap_or("default");
        let id = match SpiffeId::workload(trust_domain, ns, sa) {
            Ok(id) => id,
            Err(error) => {
                tracing::debug!(pod = %name, %ns, %error, "no SPIFFE ID for a meshed pod");
                continue;
            }
        };
        let ips = status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .map(|i| i.ip.as_str())
            .chain(status.and_then(|s| s.pod_ip.as_deref()));
        for ip in ips {
            if let Ok(ip) = ip.parse::<IpAddr>() {
                out.insert(ip, id.clone());
            }
        }
    }
    out
}

/// Folds Services, EndpointSlices and ServiceExports into a cluster state
/// (pure); endpoints at a `meshed` pod's address carry its identity. Services
/// that cannot be represented (ExternalName, invalid ports) are returned as
/// [`Skipped`] instead of failing the whole state.
pub fn cluster_state<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    exports: impl IntoIterator<Item = &'a ServiceExport>,
    meshed: &MeshedPods,
    export_label: &str,
) -> (ClusterState, Vec<Skipped>) {
    let exported: BTreeSet<ServiceKey> = exports.into_iter().filter_map(key_of).collect();
    let mut by_service: BTreeMap<ServiceKey, Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in slices {
        let labels = slice.metadata.labels.as_ref();
        let (Some(ns), Some(name)) = (
            slice.metadata.namespace.as_ref(),
            labels.and_then(|l| l.get(labels::SERVICE_NAME_K8S)),
        ) else {
            continue;
        };
        by_service
            .entry(ServiceKey::new(ns, name))
            .or_default()
            .push(slice);
    }
    let mut state = ClusterState::default();
    let mut skipped = Vec::new();
    for svc in services {
        let Some(key) = key_of(svc) else { continue };
        let labels = svc.metadata.labels.as_ref();
        if labels.is_some_and(|l| l.contains_key(labels::MIRROR)) {
            continue;
        }
        let wants_export = exported.contains(&key)
            || labels.and_then(|l| l.get(export_label)).map(String::as_str) == Some("true");
        match local_service(svc, &key, by_service.get(&key).map(Vec::as_slice), meshed) {
            Ok(mut local) => {
                local.exported = wants_export;
                state.services.insert(key, local);
            }
            // Only an exported service's problems are worth reporting.
            Err(reason) if wants_export => skipped.push(Skipped { key, reason }),
            Err(_) => {}
        }
    }
    (state, skipped)
}

fn key_of<K: Resource>(obj: &K) -> Option<ServiceKey> {
    let meta = obj.meta();
    Some(ServiceKey::new(
        meta.namespace.as_ref()?,
        meta.name.as_ref()?,
    ))
}

fn local_service(
    svc: &Service,
    key: &ServiceKey,
    slices: Option<&[&EndpointSlice]>,
    meshed: &MeshedPods,
) -> Result<LocalService, String> {
    validate_label("namespace", &key.namespace).map_err(|e| e.to_string())?;
    validate_label("name", &key.name).map_err(|e| e.to_string())?;
    let spec = svc.spec.as_ref().ok_or("no spec")?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return Err("ExternalName services cannot be exported".into());
    }
    let service_type = if spec.cluster_ip.as_deref() == Some("None") {
        ServiceType::Headless
    } else {
        ServiceType::ClusterSetIp
    };
    let mut ports = Vec::new();
    for p in spec.ports.iter().flatten() {
        let protocol = match p.protocol.as_deref() {
            None | Some("TCP") => Protocol::Tcp,
            Some("UDP") => Protocol::Udp,
            Some("SCTP") => Protocol::Sctp,
            Some(other) => return Err(format!("port {}: unknown protocol {other}", p.port)),
        };
        let port = u16::try_from(p.port).map_err(|_| format!("port {} out of range", p.port))?;
        ports.push(Port {
            name: p.name.clone().unwrap_or_default(),
            port,
            protocol,
            app_protocol: p.app_protocol.clone(),
        });
    }
    validate_ports(&ports).map_err(|e| e.to_string())?;
    let mut endpoints: BTreeMap<(IpAddr, String), Endpoint> = BTreeMap::new();
    for slice in slices.into_iter().flatten() {
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue;
        }
        // A slice's port names are the Service's port names; its numbers
        // are the endpoints' target ports.
        let mut target_ports = BTreeMap::new();
        for sp in slice.ports.iter().flatten() {
            if let Some(n) = sp
                .port
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n != 0)
            {
                target_ports.insert(sp.name.clone().unwrap_or_default(), n);
            }
        }
        for ep in slice.endpoints.iter().flatten() {
            // Ready unless said otherwise (the API's convention); a
            // terminating endpoint takes no new connections.
            let cond = ep.conditions.as_ref();
            let ready = cond.and_then(|c| c.ready).unwrap_or(true)
                && !cond.and_then(|c| c.terminating).unwrap_or(false);
            for addr in &ep.addresses {
                let Ok(ip) = addr.parse::<IpAddr>() else {
                    continue;
                };
                let name = ep
                    .target_ref
                    .as_ref()
                    .and_then(|r| r.name.clone())
                    .or_else(|| ep.hostname.clone())
                    .unwrap_or_else(|| addr.clone());
                let identity = meshed.get(&ip).cloned();
                // The same address in two slices (during a slice
                // rebalance) is one endpoint; ready wins.
                let entry = endpoints
                    .entry((ip, name.clone()))
                    .or_insert_with(|| Endpoint {
                        name,
                        ip,
                        target_ports: target_ports.clone(),
                        ready,
                        identity,
                    });
                entry.ready |= ready;
            }
        }
    }
    Ok(LocalService {
        key: key.clone(),
        service_type,
        ports,
        endpoints: endpoints.into_values().collect(),
        exported: false,
    })
}

/// Settings of the kube source.
#[derive(Clone, Debug)]
pub struct KubeSourceSettings {
    /// Label that exports a Service when set to `true`.
    pub export_label: String,
    /// Quiet time after a change before a new state is computed (a burst of
    /// events becomes one state).
    pub debounce: Duration,
    /// The cluster's SPIFFE trust domain (meshed pods' identities).
    pub trust_domain: String,
}

/// Aborts its tasks when dropped.
#[derive(Debug, Default)]
pub struct TaskSet(Vec<tokio::task::JoinHandle<()>>);

impl TaskSet {
    /// Adds a task.
    pub fn push(&mut self, t: tokio::task::JoinHandle<()>) {
        self.0.push(t);
    }
}

impl Drop for TaskSet {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// The gateway's caches of its own cluster: one reflector per kind, all
/// bumping one change signal. Services, EndpointSlices and ServiceExports
/// are cluster-wide; gateway Pods and Links are in the gateway's namespace.
#[derive(Clone, Debug)]
pub struct Caches {
    /// Every Service (local ones and Strait's mirrors).
    pub services: Store<Service>,
    /// Every EndpointSlice owned by a Service.
    pub slices: Store<EndpointSlice>,
    /// Every ServiceExport.
    pub exports: Store<ServiceExport>,
    /// ServiceImports Strait wrote.
    pub imports: Store<ServiceImport>,
    /// This gateway's pods (the endpoints of mirror slices).
    pub pods: Store<Pod>,
    /// Meshed pods in every namespace ([`labels::MESHED`]), each cut down
    /// to its name, namespace, labels, service account, host networking,
    /// phase and addresses.
    pub meshed: Store<Pod>,
    /// Links in the gateway's namespace.
    pub links: Store<Link>,
    /// Secrets in the gateway's namespace (Links' trust bundles).
    pub secrets: Store<Secret>,
    /// Bumped on every change of any cache (an update that leaves an
    /// object as it was stored, such as a meshed pod's status churn once
    /// trimmed, is none).
    pub changed: watch::Receiver<()>,
    /// Watch failures (counted once per failing streak and kind).
    pub watch_errors: prometheus_client::metrics::counter::Counter,
}

/// Stores an object as it came.
fn keep<K>(_: &mut K) {}

/// Keeps of a meshed pod what [`meshed_pods`] reads (a cluster's pods are
/// many; their specs and statuses are large).
fn trim_pod(pod: &mut Pod) {
    use k8s_openapi::api::core::v1::{PodSpec, PodStatus};
    let meta = &mut pod.metadata;
    meta.annotations = None;
    meta.managed_fields = None;
    meta.owner_references = None;
    // Every update bumps it: without it, an update of nothing kept here
    // (conditions, container statuses) leaves an equal object, which
    // [`reflect`] does not signal.
    meta.resource_version = None;
    let spec = pod.spec.take().unwrap_or_default();
    pod.spec = Some(PodSpec {
        service_account_name: spec.service_account_name,
        host_network: spec.host_network,
        ..Default::default()
    });
    let status = pod.status.take().unwrap_or_default();
    pod.status = Some(PodStatus {
        phase: status.phase,
        pod_ip: status.pod_ip,
        pod_ips: status.pod_ips,
        ..Default::default()
    });
}

/// How long every cache may take to list for the first time.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

fn wait<K>(
    store: &Store<K>,
) -> std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<(), reflector::store::WriterDropped>> + Send + '_>,
>
where
    K: Resource + Clone + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    Box::pin(store.wait_until_ready())
}

/// Runs a reflector for `K`, bumping `changed` on every event that
/// changes the store (see [`is_unchanged`]); `trim` cuts each object down
/// to what is used before it is stored.
fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    trim: fn(&mut K),
    changed: Arc<watch::Sender<()>>,
    errors: prometheus_client::metrics::counter::Counter,
    tasks: &mut TaskSet,
) -> Store<K>
where
    K: Resource
        + Clone
        + PartialEq
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (reader, mut writer) = reflector::store();
    let kind = K::kind(&K::DynamicType::default()).to_string();
    let stream = watcher(api, config).modify(trim).default_backoff();
    let store = reader.clone();
    tasks.push(tokio::spawn(async move {
        futures::pin_mut!(stream);
        let mut failing = false;
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => {
                    failing = false;
                    let unchanged = is_unchanged(&store, &event);
                    writer.apply_watcher_event(&event);
                    if unchanged {
                        continue;
                    }
                }
                Err(error) => {
                    if !failing {
                        tracing::warn!(%kind, %error, "watch failed; retrying with backoff");
                        errors.inc();
                    }
                    failing = true;
                }
            }
            changed.send_replace(());
        }
    }));
    reader
}

/// Whether `event` updates an object to exactly what `store` holds (as
/// trimmed: a meshed pod's status churn, say), which changes nothing
/// downstream.
fn is_unchanged<K>(store: &Store<K>, event: &watcher::Event<K>) -> bool
where
    K: Resource + Clone + PartialEq,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    match event {
        watcher::Event::Apply(obj) => store
            .get(&reflector::ObjectRef::from_obj(obj))
            .is_some_and(|held| *held == *obj),
        _ => false,
    }
}

impl Caches {
    /// Starts every reflector and waits until each has listed once, so
    /// nothing downstream ever sees a half-read cluster.
    pub async fn start(
        client: Client,
        namespace: &str,
        gateway_selector: &str,
        watch_errors: prometheus_client::metrics::counter::Counter,
        tasks: &mut TaskSet,
    ) -> Result<Self, String> {
        let (tx, changed) = watch::channel(());
        let tx = Arc::new(tx);
        let e = &watch_errors;
        let all = watcher::Config::default;
        let caches = Self {
            services: reflect(
                Api::all(client.clone()),
                all(),
                keep,
                tx.clone(),
                e.clone(),
                tasks,
            ),
            slices: reflect(
                Api::all(client.clone()),
                all().labels(labels::SERVICE_NAME_K8S),
                keep,
                tx.clone(),
                e.clone(),
                tasks,
            ),
            exports: reflect(
                Api::all(client.clone()),
                all(),
                keep,
                tx.clone(),
                e.clone(),
                tasks,
            ),
            imports: reflect(
                Api::all(client.clone()),
                all().labels(&format!("{}={}", labels::MANAGED_BY, labels::MANAGER)),
                keep,
                tx.clone(),
                e.clone(),
                tasks,
            ),
            pods: reflect(
                Api::namespaced(client.clone(), namespace),
                all().labels(gateway_selector),
                keep,
                tx.clone(),
                e.clone(),
                tasks,
            ),
            meshed: reflect(
                Api::all(client.clone()),
                all().labels(&format!("{}=true", labels::MESHED)),
                trim_pod,
                tx.clone(),
                e.clone(),
                tasks,
            ),
            links: reflect(
                Api::namespaced(client.clone(), namespace),
                all(),
                keep,
                tx.clone(),
                e.clone(),
                tasks,
            ),
            secrets: reflect(
                Api::namespaced(client, namespace),
                all(),
                keep,
                tx,
                e.clone(),
                tasks,
            ),
            changed,
            watch_errors,
        };
        // A kind that cannot be listed (its CRD missing, RBAC refusing)
        // would leave its cache unready for ever: fail start instead.
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        let waits = [
            ("Services", wait(&caches.services)),
            ("EndpointSlices", wait(&caches.slices)),
            ("ServiceExports", wait(&caches.exports)),
            ("ServiceImports", wait(&caches.imports)),
            ("gateway Pods", wait(&caches.pods)),
            ("meshed Pods", wait(&caches.meshed)),
            ("Links", wait(&caches.links)),
            ("Secrets", wait(&caches.secrets)),
        ];
        for (kind, ready) in waits {
            match tokio::time::timeout_at(deadline, ready).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(format!("{kind}: {e}")),
                Err(_) => {
                    return Err(format!(
                        "{kind} could not be listed within {} s: are the CRDs installed and may the gateway's ServiceAccount list them?",
                        READY_TIMEOUT.as_secs()
                    ))
                }
            }
        }
        Ok(caches)
    }

    /// The cluster state the caches hold now (and what was left out).
    pub fn cluster_state(
        &self,
        export_label: &str,
        trust_domain: &str,
    ) -> (ClusterState, Vec<Skipped>) {
        let (svcs, sls, exps) = (
            self.services.state(),
            self.slices.state(),
            self.exports.state(),
        );
        let meshed = meshed_pods(self.meshed.state().iter().map(|p| &**p), trust_domain);
        cluster_state(
            svcs.iter().map(|s| &**s),
            sls.iter().map(|s| &**s),
            exps.iter().map(|s| &**s),
            &meshed,
            export_label,
        )
    }

    /// The addresses of this gateway's ready pods.
    pub fn gateway_ips(&self) -> Vec<IpAddr> {
        ready_pod_ips(self.pods.state().iter().map(|p| &**p))
    }
}

/// The addresses of ready pods (pure).
pub fn ready_pod_ips<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = pods
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| p.status.as_ref())
        .filter(|s| {
            s.conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
        .flat_map(|s| {
            s.pod_ips
                .iter()
                .flatten()
                .map(|i| i.ip.clone())
                .chain(s.pod_ip.clone())
                .collect::<Vec<_>>()
        })
        .filter_map(|ip| ip.parse().ok())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// A running kube source.
#[derive(Debug)]
pub struct KubeSource {
    rx: watch::Receiver<Arc<ClusterState>>,
    skipped: watch::Receiver<Arc<BTreeMap<ServiceKey, String>>>,
    _task: TaskSet,
}

impl KubeSource {
    /// Publishes the cluster state of `caches` now and after every change.
    pub fn start(
        caches: Caches,
        settings: KubeSourceSettings,
        skipped_total: prometheus_client::metrics::counter::Counter,
    ) -> Self {
        let (first, skipped) = caches.cluster_state(&settings.export_label, &settings.trust_domain);
        let (tx, rx) = watch::channel(Arc::new(first));
        let (skipped_tx, skipped_rx) = watch::channel(Arc::new(
            skipped.into_iter().map(|s| (s.key, s.reason)).collect(),
        ));
        let mut changed = caches.changed.clone();
        let mut task = TaskSet::default();
        task.push(tokio::spawn(async move {
            let mut reported: BTreeSet<(ServiceKey, String)> = BTreeSet::new();
            while changed.changed().await.is_ok() {
                tokio::time::sleep(settings.debounce).await;
                changed.borrow_and_update();
                let (state, skipped) = caches.cluster_state(&settings.export_label, &settings.trust_domain);
                for s in &skipped {
                    if reported.insert((s.key.clone(), s.reason.clone())) {
                        tracing::warn!(service = %s.key, reason = %s.reason, "exported service left out");
                        skipped_total.inc();
                    }
                }
                let skipped: BTreeMap<ServiceKey, String> =
                    skipped.into_iter().map(|s| (s.key, s.reason)).collect();
                skipped_tx.send_if_modified(|cur| {
                    let differs = **cur != skipped;
                    if differs {
                        *cur = Arc::new(skipped);
                    }
                    differs
                });
                tx.send_if_modified(|cur| {
                    if **cur == state {
                        false
                    } else {
                        *cur = Arc::new(state);
                        true
                    }
                });
            }
        }));
        Self {
            rx,
            skipped: skipped_rx,
            _task: task,
        }
    }

    /// Exported services left out of the state, with the reason.
    pub fn skipped(&self) -> watch::Receiver<Arc<BTreeMap<ServiceKey, String>>> {
        self.skipped.clone()
    }
}

impl ClusterSource for KubeSource {
    fn watch(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.rx.clone()
    }
}

#[cfg(test)]
mod tests;
