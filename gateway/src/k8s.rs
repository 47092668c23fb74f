//! Kubernetes: the custom resources ([`crd`]), the kube cluster source
//! ([`source`]: reflectors over Services, EndpointSlices and
//! ServiceExports), the mirror writer ([`mirror`]: ServiceImports,
//! clusterset and per-cluster Services and their EndpointSlices, written by
//! server-side apply under one [`lease`]), and [`links`] from Link objects.
//!
//! Planning is pure ([`mirror::plan`], [`mirror::allocate`],
//! [`source::cluster_state`], [`lease::decide`]); the runtime around it
//! only reads caches and applies what the plan says.
//!
//! [`ctl`] is the command line's side: `strait link` and `strait check`.

pub mod crd;
pub mod ctl;
pub mod inject;
pub mod lease;
pub mod links;
pub mod mirror;
pub mod source;
pub mod webhook;

/// Label and annotation keys Strait reads and writes.
pub mod labels {
    /// The Service an EndpointSlice belongs to (Kubernetes).
    pub const SERVICE_NAME_K8S: &str = "kubernetes.io/service-name";
    /// The imported service an object derives from (MCS API).
    pub const MCS_SERVICE_NAME: &str = "multicluster.kubernetes.io/service-name";
    /// The cluster an EndpointSlice's endpoints lead to (MCS API).
    pub const MCS_SOURCE_CLUSTER: &str = "multicluster.kubernetes.io/source-cluster";
    /// Who manages an EndpointSlice; the built-in controller leaves ours alone.
    pub const SLICE_MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
    /// Our value of [`SLICE_MANAGED_BY`].
    pub const SLICE_MANAGER: &str = "strait.io/gateway";
    /// The standard managed-by label.
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
    /// Our value of [`MANAGED_BY`] and the server-side-apply field manager.
    pub const MANAGER: &str = "strait";
    /// On objects Strait writes for an import: `clusterset` for the
    /// clusterset Service, else the pinned cluster's name. Such Services
    /// are never exported.
    pub const MIRROR: &str = "strait.io/mirror";
    /// The value of [`MIRROR`] on clusterset Services and ServiceImports.
    pub const CLUSTERSET: &str = "clusterset";
    /// On mirror Services: the egress port allocated on the gateway pods
    /// for each service port, `80=20001,443=20002`.
    pub const EGRESS_PORTS: &str = "strait.io/egress-ports";
    /// On pods `strait inject` gave a sidecar proxy (`true`): their
    /// endpoints are served to other sidecars with the pod's SPIFFE ID, so
    /// connections to them are mutual TLS.
    pub const MESHED: &str = "strait.io/meshed";
}

/// Object names derived from an imported service's name, kept to the 63
/// characters of a DNS label: a name that would be longer is cut and given
/// a stable hash of the whole, so two long names never collide by
/// truncation (DESIGN.md, pitfalls).
pub mod names {
    use crate::imports::fnv1a;

    /// The longest Service name.
    pub const MAX: usize = 63;

    /// `<base>-<suffix>`, shortened with a hash when over [`MAX`].
    pub fn derived(base: &str, suffix: &str) -> String {
        let full = format!("{base}-{suffix}");
        if full.len() <= MAX {
            return full;
        }
        let hash = format!("{:08x}", fnv1a(full.as_bytes()));
        // Names are ASCII (RFC 1123), so byte slicing is safe.
        let keep = MAX - 1 - hash.len();
        let head = full[..keep].trim_end_matches('-');
        format!("{head}-{hash}")
    }

    /// The clusterset Service of an import: one ClusterIP for the service
    /// across every exporting cluster.
    pub fn clusterset(service: &str) -> String {
        derived(service, super::labels::CLUSTERSET)
    }

    /// The mirror Service pinning an import to one cluster (Linkerd's
    /// `<svc>-<cluster>` convention).
    pub fn mirror(service: &str, cluster: &str) -> String {
        derived(service, cluster)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn short_names_are_kept_long_ones_hashed_apart() {
            assert_eq!(mirror("web", "east"), "web-east");
            assert_eq!(clusterset("web"), "web-clusterset");
            let a = mirror(&"a".repeat(60), "east");
            let b = mirror(&"a".repeat(60), "eastern");
            assert_eq!(a.len(), MAX);
            assert_ne!(a, b);
            assert_eq!(a, mirror(&"a".repeat(60), "east"), "stable");
            // A cut that ends on a dash does not leave `--` before the hash.
            let dashy = derived(&format!("{}{}", "b".repeat(53), "-c".repeat(5)), "x");
            assert!(dashy.len() <= MAX && !dashy.contains("--"), "{dashy}");
        }
    }
}
