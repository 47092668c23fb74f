//! The kinds the fake serves, and the discovery documents built from them.

use serde_json::{json, Value};

/// One kind of object the fake stores.
#[derive(Debug)]
pub(crate) struct ResourceType {
    /// API group, "" for core.
    pub group: &'static str,
    /// API version within the group.
    pub version: &'static str,
    /// Plural resource name, as in URLs.
    pub plural: &'static str,
    /// Kind, as in objects.
    pub kind: &'static str,
    /// Whether objects live in a namespace.
    pub namespaced: bool,
    /// Whether the kind has a `/status` subresource.
    pub status: bool,
}

const fn rt(
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    status: bool,
) -> ResourceType {
    ResourceType {
        group,
        version,
        plural,
        kind,
        namespaced,
        status,
    }
}

/// Every kind served. Status subresources follow the real API server.
pub(crate) static RESOURCES: &[ResourceType] = &[
    rt("", "v1", "services", "Service", true, true),
    rt("", "v1", "pods", "Pod", true, true),
    rt("", "v1", "secrets", "Secret", true, false),
    rt("", "v1", "configmaps", "ConfigMap", true, false),
    rt("", "v1", "namespaces", "Namespace", false, true),
    rt("", "v1", "endpoints", "Endpoints", true, false),
    rt(
        "discovery.k8s.io",
        "v1",
        "endpointslices",
        "EndpointSlice",
        true,
        false,
    ),
    rt("coordination.k8s.io", "v1", "leases", "Lease", true, false),
    rt("apps", "v1", "deployments", "Deployment", true, true),
    rt(
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        false,
        true,
    ),
    rt("strait.io", "v1alpha1", "links", "Link", true, true),
    rt(
        "multicluster.x-k8s.io",
        "v1alpha1",
        "serviceexports",
        "ServiceExport",
        true,
        true,
    ),
    rt(
        "multicluster.x-k8s.io",
        "v1alpha1",
        "serviceimports",
        "ServiceImport",
        true,
        true,
    ),
];

const VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

impl ResourceType {
    /// `v1` or `group/version`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `services` or `leases.coordination.k8s.io`, as in error messages.
    pub fn group_resource(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

/// The index into [`RESOURCES`] of a group, version and plural.
pub(crate) fn find(group: &str, version: &str, plural: &str) -> Option<usize> {
    RESOURCES
        .iter()
        .position(|r| r.group == group && r.version == version && r.plural == plural)
}

/// `GET /api`.
pub(crate) fn core_versions() -> Value {
    json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
        {"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1:6443"}]})
}

/// `GET /apis`.
pub(crate) fn group_list() -> Value {
    let mut groups: Vec<Value> = Vec::new();
    for r in RESOURCES.iter().filter(|r| !r.group.is_empty()) {
        if groups.iter().any(|g| g["name"] == r.group) {
            continue;
        }
        let gv = json!({"groupVersion": r.api_version(), "version": r.version});
        groups.push(json!({"name": r.group, "versions": [gv.clone()], "preferredVersion": gv}));
    }
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `GET /api/v1` or `GET /apis/<group>/<version>`, if the pair is served.
pub(crate) fn resource_list(group: &str, version: &str) -> Option<Value> {
    let mut resources = Vec::new();
    for r in RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
    {
        let singular = r.kind.to_lowercase();
        resources.push(json!({"name": r.plural, "singularName": singular,
            "namespaced": r.namespaced, "kind": r.kind, "verbs": VERBS}));
        if r.status {
            resources.push(
                json!({"name": format!("{}/status", r.plural), "singularName": "",
                "namespaced": r.namespaced, "kind": r.kind, "verbs": ["get", "patch", "update"]}),
            );
        }
    }
    if resources.is_empty() {
        return None;
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
        "resources": resources}),
    )
}

/// `GET /version`.
pub(crate) fn version() -> Value {
    json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-strait-fake",
        "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.24", "compiler": "gc",
        "platform": "linux/amd64"})
}
