//! Workload identity: SPIFFE IDs in X.509 certificates.
//!
//! A clusterset has one trust anchor (root CA); each cluster has an issuer
//! (intermediate CA) whose own URI SAN is `spiffe://<trust-domain>`; every
//! gateway mints itself a short-lived leaf from that issuer with its SPIFFE
//! ID (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`) in the URI SAN, and renews
//! it at two thirds of its life; sidecar proxies get theirs from the
//! gateway's identity service ([`Certifier`]) without holding the issuer. Peers are verified against the
//! anchor, and additionally the leaf's trust domain must be the one its
//! issuer is bound to, so one cluster's issuer cannot mint another cluster's
//! identities.

mod certify;
mod certs;
mod spiffe;
mod store;
mod verify;

#[cfg(test)]
mod tests;

pub use certify::{renew_after, spawn_certify, Certifier, CertifyError};
pub use certs::{
    generate_issuer, generate_root, CertError, CertRequest, Issuer, Leaf, PemPair, TrustAnchors,
    DEFAULT_LEAF_LIFETIME,
};
pub use spiffe::{SpiffeId, SpiffeIdError};
pub use store::{spawn_rotation, CertStore};
pub use verify::{
    identity_of, AllowedPeers, ExpectedPeerVerifier, LinkedPeersVerifier, RefusalReason,
    RefusalSink,
};
