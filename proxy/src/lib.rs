//! The Strait data plane shared by the sidecar proxy and the edge gateway.
//!
//! It owns the one rustls crypto provider of the tree ([`tls`]), workload
//! identity (SPIFFE X.509 certificates, issuing, rotation and peer
//! verification in [`identity`]), byte-for-byte TCP forwarding with
//! half-close ([`forward`]), the metric families every component shares
//! ([`metrics`]) and the admin HTTP server ([`admin`]).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod balance;
pub mod cli;
pub mod control;
pub mod detect;
pub mod discovery;
pub mod forward;
pub mod http;
pub mod http1;
pub mod http2;
pub mod identity;
pub mod mesh;
pub mod metrics;
pub mod net;
pub(crate) mod recent;
pub mod retry;
pub mod sidecar;
pub mod tls;
pub mod transparent;
pub mod transport;

/// A hash map with foldhash's seeded hasher: the maps a request looks up
/// (balancers, pools, metric labels) hash a few short keys each time, where
/// SipHash cost more than the lookups themselves.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
