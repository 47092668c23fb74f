//! The mirror writer: while this replica holds the Lease, bring the
//! cluster in line with [`super::plan`] by server-side apply (field manager
//! `strait`), delete orphans, and write ServiceExport and Link status.
//!
//! Objects are read from the shared caches and written only when what we
//! would apply differs from what we last applied (or the object is gone),
//! so an idle clusterset costs no API writes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use tokio::sync::watch;

use super::{
    allocate, export_conditions, merge_conditions, observe, plan, wanted, Allocations, NewCondition,
};
use crate::catalog::{ClusterState, ServiceKey};
use crate::k8s::crd::{Condition, Link, ServiceExport, ServiceImport, ServiceImportStatus};
use crate::k8s::labels;
use crate::k8s::links::LinkErrors;
use crate::k8s::source::Caches;
use crate::metrics::MirrorMetrics;
use crate::state::{Imports, Peers};

/// What the writer reads and where it writes.
pub struct WriterContext {
    /// The API client.
    pub client: Client,
    /// The shared caches.
    pub caches: Caches,
    /// The import registry.
    pub imports: Arc<Imports>,
    /// Linked peers' status.
    pub peers: Arc<Peers>,
    /// The local cluster state.
    pub local: watch::Receiver<Arc<ClusterState>>,
    /// Exported services left out of the state, and why.
    pub skipped: watch::Receiver<Arc<BTreeMap<ServiceKey, String>>>,
    /// Links refused, by object name.
    pub link_errors: watch::Receiver<Arc<LinkErrors>>,
    /// Whether this replica holds the Lease.
    pub leading: watch::Receiver<bool>,
    /// Egress ports to allocate from.
    pub egress_ports: RangeInclusive<u16>,
    /// Status (RTT, connection) is refreshed at least this often.
    pub resync: Duration,
    /// How long a lost peer's imports are kept; also how long a new writer
    /// waits for a silent peer's first catalog before removing anything.
    pub grace_period: Duration,
    /// Metrics.
    pub metrics: MirrorMetrics,
}

fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

fn apply_params() -> PatchParams {
    // Force: we are the only writer of these fields; foreign objects are
    // never applied to (see `conflicts`).
    PatchParams::apply(labels::MANAGER).force()
}

/// The namespaced kinds the writer reads and writes.
trait Kind:
    Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
    + Clone
    + Serialize
    + serde::de::DeserializeOwned
    + std::fmt::Debug
{
}

impl<K> Kind for K where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug
{
}

/// What this leadership term wrote: the last applied content per object,
/// so unchanged objects are not written again, and the egress ports it
/// allocated.
#[derive(Default)]
struct Applied {
    objects: HashMap<String, serde_json::Value>,
    allocations: Allocations,
}

impl Applied {
    fn fresh(&self, id: &str, value: &serde_json::Value) -> bool {
        self.objects.get(id) == Some(value)
    }
}

/// The allocations to allocate from: what the Services cache shows, and
/// what this term allocated that it does not show yet (a Service applied
/// a moment ago, its watch event still on the way). Without the second, a
/// pass that ran before the event came would hand the port to another key
/// and move this one: connections kube-proxy still sends to the first
/// Service's port would reach another service.
fn known_allocations(observed: &Allocations, given: &Allocations) -> Allocations {
    let mut known = observed.clone();
    for (key, port) in given {
        known.entry(key.clone()).or_insert(*port);
    }
    known
}

struct Sync<'a> {
    ctx: &'a WriterContext,
    applied: &'a mut Applied,
    errors: Vec<String>,
}

impl Sync<'_> {
    /// Whether this replica still holds the Lease: checked before every
    /// write, so a replica that lost it mid-pass stops writing at once.
    fn leading(&self) -> bool {
        *self.ctx.leading.borrow()
    }

    fn fail(&mut self, kind: &'static str, what: String) {
        tracing::warn!(%kind, "{what}");
        self.ctx.metrics.error(kind);
        self.errors.push(what);
    }

    /// Applies `obj` unless it is what we last applied and still exists;
    /// returns its uid.
    async fn apply<K>(&mut self, obj: &K, cached_uid: Option<String>) -> Option<String>
    where
        K: Kind,
    {
        let (ns, name) = (obj.namespace().unwrap_or_default(), obj.name_any());
        let kind = K::kind(&()).to_string();
        let id = format!("{kind}/{ns}/{name}");
        if !self.leading() {
            return cached_uid;
        }
        let value = match serde_json::to_value(obj) {
            Ok(v) => v,
            Err(e) => {
                self.fail("apply", format!("{id}: cannot encode: {e}"));
                return None;
            }
        };
        if let Some(uid) = cached_uid.clone() {
            if self.applied.fresh(&id, &value) {
                return Some(uid);
            }
        }
        let api: Api<K> = Api::namespaced(self.ctx.client.clone(), &ns);
        match api
            .patch(&name, &apply_params(), &Patch::Apply(&value))
            .await
        {
            Ok(written) => {
                self.ctx.metrics.write("apply");
                self.applied.objects.insert(id, value);
                written.uid()
            }
            Err(e) => {
                self.applied.objects.remove(&id);
                self.fail("apply", format!("{id}: apply failed: {e}"));
                cached_uid
            }
        }
    }

    /// Whether `k` exists on the server without Strait's labels (a GET;
    /// an error counts as foreign, to be safe, and is reported).
    async fn foreign<K>(&mut self, k: &(String, String)) -> bool
    where
        K: Kind,
    {
        let api: Api<K> = Api::namespaced(self.ctx.client.clone(), &k.0);
        match api.get_opt(&k.1).await {
            Ok(None) => false,
            Ok(Some(obj)) => {
                let l = obj.labels();
                let ours = l.get(labels::MANAGED_BY).map(String::as_str) == Some(labels::MANAGER)
                    && l.contains_key(labels::MIRROR);
                if !ours {
                    let kind = K::kind(&()).to_string();
                    self.fail(
                        "conflict",
                        format!(
                            "{kind} {}/{} exists and is not Strait's: not written",
                            k.0, k.1
                        ),
                    );
                }
                !ours
            }
            Err(e) => {
                self.fail(
                    "apply",
                    format!("{}/{}: cannot check before writing: {e}", k.0, k.1),
                );
                true
            }
        }
    }

    async fn apply_status<K>(&mut self, ns: &str, name: &str, status: serde_json::Value)
    where
        K: Kind,
    {
        if !self.leading() {
            return;
        }
        let body = serde_json::json!({
            "apiVersion": K::api_version(&()),
            "kind": K::kind(&()),
            "metadata": {"name": name, "namespace": ns},
            "status": status,
        });
        let api: Api<K> = Api::namespaced(self.ctx.client.clone(), ns);
        match api
            .patch_status(name, &apply_params(), &Patch::Apply(&body))
            .await
        {
            Ok(_) => self.ctx.metrics.write("status"),
            Err(e) => self.fail(
                "status",
                format!("{}/{ns}/{name}: status: {e}", K::kind(&())),
            ),
        }
    }

    async fn delete<K>(&mut self, ns: &str, name: &str)
    where
        K: Kind,
    {
        let kind = K::kind(&()).to_string();
        if !self.leading() {
            return;
        }
        let api: Api<K> = Api::namespaced(self.ctx.client.clone(), ns);
        match api.delete(name, &DeleteParams::background()).await {
            Ok(_) => {
                self.ctx.metrics.write("delete");
                tracing::info!(%kind, %ns, %name, "mirror object removed");
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => self.fail("delete", format!("{kind}/{ns}/{name}: delete: {e}")),
        }
        self.applied.objects.remove(&format!("{kind}/{ns}/{name}"));
    }
}

fn owner<K: Resource<DynamicType = ()>>(name: &str, uid: String) -> OwnerReference {
    OwnerReference {
        api_version: K::api_version(&()).into_owned(),
        kind: K::kind(&()).into_owned(),
        name: name.to_string(),
        uid,
        controller: Some(true),
        block_owner_deletion: Some(false),
    }
}

fn key(ns: Option<String>, name: String) -> (String, String) {
    (ns.unwrap_or_default(), name)
}

/// The (namespace, name) of each object.
fn keys<'a, K: Resource + 'a>(objects: impl Iterator<Item = &'a K>) -> BTreeSet<(String, String)> {
    objects.map(|o| key(o.namespace(), o.name_any())).collect()
}

/// Each cached object's uid by (namespace, name).
fn uids<K>(store: &kube::runtime::reflector::Store<K>) -> HashMap<(String, String), Option<String>>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    store
        .state()
        .iter()
        .map(|o| (key(o.namespace(), o.name_any()), o.uid()))
        .collect()
}

/// Whether the import table is complete enough to remove what it lacks:
/// every Link this cluster dials has delivered a catalog since this writer
/// started leading, or the grace period has run out. Before, a new leader
/// (or a restarted one) would delete every import of a peer it simply has
/// not heard from yet — and new ClusterIPs would follow.
fn may_prune(ctx: &WriterContext, leading_since: std::time::Instant) -> bool {
    if leading_since.elapsed() >= ctx.grace_period {
        return true;
    }
    let received: BTreeSet<String> = ctx
        .peers
        .statuses()
        .into_iter()
        .filter(|p| p.catalog_received)
        .map(|p| p.name)
        .collect();
    ctx.caches
        .links
        .state()
        .iter()
        .filter(|l| !l.spec.addresses.is_empty())
        .all(|l| received.contains(&l.spec.cluster))
}

/// One pass: mirror objects, orphans, statuses. Returns the failures.
async fn sync_once(
    ctx: &WriterContext,
    applied: &mut Applied,
    leading_since: std::time::Instant,
) -> Vec<String> {
    let mut s = Sync {
        ctx,
        applied,
        errors: Vec::new(),
    };
    let table = ctx.imports.current();
    let services = ctx.caches.services.state();
    let observed = observe(services.iter().map(|s| &**s));
    let (allocations, exhausted) = allocate(
        &known_allocations(&observed.allocations, &s.applied.allocations),
        &wanted(&table),
        ctx.egress_ports.clone(),
    );
    s.applied.allocations = allocations.clone();
    if !exhausted.is_empty() {
        s.fail(
            "exhausted",
            format!(
                "egress port range {}-{} is full: {} ports left unallocated",
                ctx.egress_ports.start(),
                ctx.egress_ports.end(),
                exhausted.len()
            ),
        );
    }
    let desired = plan(
        &table,
        &allocations,
        &observed.clusterset_ips,
        &ctx.caches.gateway_ips(),
    );
    for collision in &desired.collisions {
        s.fail("conflict", collision.clone());
    }
    let svc_cache: HashMap<(String, String), Arc<Service>> = services
        .iter()
        .map(|s| (key(s.namespace(), s.name_any()), s.clone()))
        .collect();
    let import_uids = uids(&ctx.caches.imports);
    let import_status: HashMap<(String, String), Option<ServiceImportStatus>> = ctx
        .caches
        .imports
        .state()
        .iter()
        .map(|i| (key(i.namespace(), i.name_any()), i.status.clone()))
        .collect();
    let slice_uids = uids(&ctx.caches.slices);

    // ServiceImports first: they own the rest.
    let mut owners: HashMap<(String, String), String> = HashMap::new();
    for si in &desired.imports {
        let k = key(si.namespace(), si.name_any());
        let cached = import_uids.get(&k).cloned().flatten();
        // Our cache holds only Strait's ServiceImports: one made by another
        // MCS controller is looked up before the first apply, never taken.
        if cached.is_none() && s.foreign::<ServiceImport>(&k).await {
            continue;
        }
        if let Some(uid) = s.apply(si, cached).await {
            owners.insert(k.clone(), uid);
        }
        let status = serde_json::to_value(&si.status).unwrap_or_default();
        let current = import_status
            .get(&k)
            .map(|c| serde_json::to_value(c).unwrap_or_default());
        if current.as_ref() != Some(&status) {
            s.apply_status::<ServiceImport>(&k.0, &k.1, status).await;
        }
    }
    // Services, each owned by its ServiceImport; never over a Service
    // someone else made.
    let mut service_uids: HashMap<(String, String), String> = HashMap::new();
    let mut blocked: BTreeSet<(String, String)> = BTreeSet::new();
    for svc in &desired.services {
        let k = key(svc.namespace(), svc.name_any());
        let existing = svc_cache.get(&k);
        // Not in the cache yet (made a moment ago?): ask the server before
        // the first apply, which would otherwise take the object over.
        if existing.is_none() && s.foreign::<Service>(&k).await {
            blocked.insert(k);
            continue;
        }
        if existing.is_some_and(|e| !super::is_ours(e)) {
            s.fail(
                "conflict",
                format!(
                    "Service {}/{} exists and is not Strait's: mirror not written",
                    k.0, k.1
                ),
            );
            blocked.insert(k);
            continue;
        }
        let import = svc
            .labels()
            .get(labels::MCS_SERVICE_NAME)
            .cloned()
            .unwrap_or_default();
        let mut svc = svc.clone();
        if let Some(uid) = owners.get(&(k.0.clone(), import.clone())) {
            svc.metadata.owner_references =
                Some(vec![owner::<ServiceImport>(&import, uid.clone())]);
        }
        let cached = existing.and_then(|e| e.uid());
        if let Some(uid) = s.apply(&svc, cached).await {
            service_uids.insert(k, uid);
        }
    }
    for (service, slice) in &desired.slices {
        let ns = slice.namespace().unwrap_or_default();
        let owner_key = (ns.clone(), service.clone());
        if blocked.contains(&owner_key) {
            continue;
        }
        let mut slice = slice.clone();
        if let Some(uid) = service_uids.get(&owner_key) {
            slice.metadata.owner_references = Some(vec![owner::<Service>(service, uid.clone())]);
        }
        let cached = slice_uids
            .get(&key(Some(ns), slice.name_any()))
            .cloned()
            .flatten();
        s.apply(&slice, cached).await;
    }

    // Orphans: ours, and no longer desired (once the table is complete).
    if !may_prune(ctx, leading_since) {
        tracing::debug!("waiting for every linked peer's catalog before removing mirrors");
        return export_statuses(&mut s).await;
    }
    let want_services = keys(desired.services.iter());
    for svc in services.iter().filter(|x| super::is_ours(x)) {
        let k = key(svc.namespace(), svc.name_any());
        if !want_services.contains(&k) {
            s.delete::<Service>(&k.0, &k.1).await;
        }
    }
    let want_slices = keys(desired.slices.iter().map(|(_, x)| x));
    for slice in ctx.caches.slices.state().iter().filter(|x| {
        x.labels().get(labels::SLICE_MANAGED_BY).map(String::as_str) == Some(labels::SLICE_MANAGER)
    }) {
        let k = key(slice.namespace(), slice.name_any());
        if !want_slices.contains(&k) {
            s.delete::<EndpointSlice>(&k.0, &k.1).await;
        }
    }
    let want_imports = keys(desired.imports.iter());
    for si in ctx.caches.imports.state().iter() {
        let k = key(si.namespace(), si.name_any());
        if !want_imports.contains(&k) {
            s.delete::<ServiceImport>(&k.0, &k.1).await;
        }
    }

    export_statuses(&mut s).await
}

/// Writes the ServiceExport conditions; returns the pass's failures.
async fn export_statuses(s: &mut Sync<'_>) -> Vec<String> {
    let ctx = s.ctx;
    let local = ctx.local.borrow().clone();
    let skipped = ctx.skipped.borrow().clone();
    let catalogs = ctx.imports.catalogs();
    let now = now_rfc3339();
    for export in ctx.caches.exports.state().iter() {
        let k = ServiceKey::new(export.namespace().unwrap_or_default(), export.name_any());
        let new = export_conditions(&k, &local, skipped.get(&k).map(String::as_str), &catalogs);
        let old = export
            .status
            .as_ref()
            .map(|x| x.conditions.clone())
            .unwrap_or_default();
        if let Some(conditions) = changed_conditions(&old, &new, &now, export.metadata.generation) {
            s.apply_status::<ServiceExport>(
                &k.namespace,
                &k.name,
                serde_json::json!({ "conditions": conditions }),
            )
            .await;
        }
    }
    std::mem::take(&mut s.errors)
}

/// The conditions to write, or `None` when the object already says the
/// same (transition times and all).
fn changed_conditions(
    old: &[Condition],
    new: &[NewCondition],
    now: &str,
    generation: Option<i64>,
) -> Option<Vec<Condition>> {
    let mut merged = merge_conditions(old, new, now);
    for c in &mut merged {
        c.observed_generation = generation;
    }
    (merged != old).then_some(merged)
}

/// Writes every Link's status from the peers' state.
async fn link_statuses(ctx: &WriterContext, sync_errors: &[String], applied: &mut Applied) {
    let mut s = Sync {
        ctx,
        applied,
        errors: Vec::new(),
    };
    let refused = ctx.link_errors.borrow().clone();
    let peers: HashMap<String, crate::state::PeerStatus> = ctx
        .peers
        .statuses()
        .into_iter()
        .map(|p| (p.name.clone(), p))
        .collect();
    let now = now_rfc3339();
    let links: Vec<Arc<Link>> = ctx.caches.links.state();
    for link in links {
        let name = link.name_any();
        let ns = link.namespace().unwrap_or_default();
        let peer = peers.get(&link.spec.cluster);
        let connected = match (refused.get(&name), peer) {
            (Some(why), _) => NewCondition {
                type_: "Connected",
                status: false,
                reason: "Invalid",
                message: why.clone(),
            },
            (None, Some(p)) if p.connected => NewCondition {
                type_: "Connected",
                status: true,
                reason: "Connected",
                message: format!("tunnel up to {}", p.identity),
            },
            (None, Some(p)) => NewCondition {
                type_: "Connected",
                status: false,
                reason: if link.spec.addresses.is_empty() {
                    "WaitingForPeer"
                } else {
                    "Disconnected"
                },
                message: p.last_error.clone().unwrap_or_default(),
            },
            (None, None) => NewCondition {
                type_: "Connected",
                status: false,
                reason: "Pending",
                message: String::new(),
            },
        };
        let imports = peer.map_or(0, |p| p.imports);
        let synced = NewCondition {
            type_: "ImportsSynced",
            status: sync_errors.is_empty(),
            reason: if sync_errors.is_empty() {
                "Synced"
            } else {
                "SyncFailed"
            },
            message: if sync_errors.is_empty() {
                format!("{imports} services imported")
            } else {
                sync_errors.join("; ")
            },
        };
        let old = link
            .status
            .as_ref()
            .map(|x| x.conditions.clone())
            .unwrap_or_default();
        let rtt_ms = peer.and_then(|p| p.rtt_ms);
        let rtt = rtt_ms.map(|ms| format!("{ms:.1}ms"));
        let old_status = link.status.clone().unwrap_or_default();
        let conditions =
            changed_conditions(&old, &[connected, synced], &now, link.metadata.generation);
        if conditions.is_none()
            && old_status.import_count == u32::try_from(imports).unwrap_or(u32::MAX)
            && !rtt_moved(old_status.last_rtt.as_deref(), rtt_ms)
        {
            continue;
        }
        let status = serde_json::json!({
            "conditions": conditions.unwrap_or(old),
            "importCount": imports,
            "lastRtt": rtt,
            "observedGeneration": link.metadata.generation,
        });
        s.apply_status::<Link>(&ns, &name, status).await;
    }
}

/// Whether a Link's round-trip time moved enough to be written again: by
/// a tenth, and at least a millisecond. It is sampled every few seconds
/// and nearly always differs in its last digit; each write is a watch
/// event every replica folds its caches over again for.
fn rtt_moved(written: Option<&str>, now_ms: Option<f64>) -> bool {
    let written = written.and_then(|w| w.strip_suffix("ms")?.parse::<f64>().ok());
    match (written, now_ms) {
        (Some(w), Some(n)) => (n - w).abs() > (w * 0.1).max(1.0),
        (None, None) => false,
        _ => true,
    }
}

/// Runs the writer until aborted: syncs whenever this replica leads and
/// anything it reads changes, and at least every `resync`.
pub async fn run(ctx: WriterContext) {
    let mut changed = ctx.caches.changed.clone();
    let mut table = ctx.imports.watch();
    let mut local = ctx.local.clone();
    let mut leading = ctx.leading.clone();
    let mut applied = Applied::default();
    let mut leading_since: Option<Instant> = None;
    loop {
        let lead = *leading.borrow_and_update();
        ctx.metrics.leader.set(i64::from(lead));
        if lead {
            let since = *leading_since.get_or_insert_with(Instant::now);
            let started = Instant::now();
            let errors = sync_once(&ctx, &mut applied, since).await;
            link_statuses(&ctx, &errors, &mut applied).await;
            ctx.metrics
                .sync_duration
                .observe(started.elapsed().as_secs_f64());
        } else {
            // A new leader must not trust what an old term applied.
            applied = Applied::default();
            leading_since = None;
        }
        tokio::select! {
            r = changed.changed() => if r.is_err() { return },
            r = table.changed() => if r.is_err() { return },
            r = local.changed() => if r.is_err() { return },
            r = leading.changed() => if r.is_err() { return },
            () = tokio::time::sleep(ctx.resync) => {}
        }
        // Let a burst of changes settle into one pass.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::mirror::AllocKey;

    fn key(svc: &str) -> AllocKey {
        AllocKey {
            service: ServiceKey::new("shop", svc),
            pin: None,
            port: 80,
        }
    }

    #[test]
    fn round_trip_times_are_written_when_they_move() {
        assert!(!rtt_moved(Some("35.2ms"), Some(35.3)));
        assert!(!rtt_moved(Some("0.1ms"), Some(0.4)), "loopback noise");
        assert!(rtt_moved(Some("35.2ms"), Some(40.0)));
        assert!(rtt_moved(Some("35.2ms"), None), "gone");
        assert!(rtt_moved(None, Some(3.0)), "first");
        assert!(rtt_moved(Some("garbled"), Some(3.0)));
        assert!(!rtt_moved(None, None));
    }

    /// A port this term gave, its Service not in the cache yet, stays with
    /// its key when a pass runs before the watch event: a new key sorting
    /// first gets another port.
    #[test]
    fn a_port_just_given_stays_given_while_the_cache_lags() {
        let range = 20_000..=20_010;
        let (first, _) = allocate(
            &Allocations::new(),
            &BTreeSet::from([key("web")]),
            range.clone(),
        );
        assert_eq!(first[&key("web")], 20_000);
        // The next pass: the cache shows nothing yet, and `api` is wanted too.
        let wanted = BTreeSet::from([key("api"), key("web")]);
        let (next, _) = allocate(
            &known_allocations(&Allocations::new(), &first),
            &wanted,
            range.clone(),
        );
        assert_eq!(next[&key("web")], 20_000, "kept");
        assert_eq!(next[&key("api")], 20_001);
        // What the cache shows wins over what this term remembers.
        let observed = Allocations::from([(key("web"), 20_005)]);
        assert_eq!(known_allocations(&observed, &first)[&key("web")], 20_005);
    }
}
