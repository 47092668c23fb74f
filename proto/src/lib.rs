//! Strait's wire types, generated at build time from `proto/` with protox
//! (no `protoc` needed): the tunnel [`tunnel::v1::StreamHeader`] that opens
//! every QUIC stream between gateways, the [`peer::v1`] `Peering`
//! service through which gateways exchange export catalogs, and the
//! [`destination::v1`] `Destination` service through which sidecar proxies
//! learn endpoints from their cluster's gateway, and the [`identity::v1`]
//! `Identity` service from which they get their certificates.
#![forbid(unsafe_code)]
#![allow(missing_docs)]

/// Tunnel framing types.
pub mod tunnel {
    /// Version 1 of the tunnel framing.
    pub mod v1 {
        tonic::include_proto!("strait.tunnel.v1");
    }
}

/// Peering (catalog exchange) types and the `Peering` gRPC service.
pub mod peer {
    /// Version 1 of the peering API.
    pub mod v1 {
        tonic::include_proto!("strait.peer.v1");
    }
}

/// Discovery types and the `Destination` gRPC service (sidecar proxies ask
/// their cluster's gateway where an authority's endpoints are).
pub mod destination {
    /// Version 1 of the destination API.
    pub mod v1 {
        tonic::include_proto!("strait.destination.v1");
    }
}

/// The `Identity` gRPC service: sidecar proxies send a certificate signing
/// request and a token and get a leaf certificate from their cluster's
/// gateway.
pub mod identity {
    /// Version 1 of the identity API.
    pub mod v1 {
        tonic::include_proto!("strait.identity.v1");
    }
}
