//! The Strait edge gateway.
//!
//! A gateway watches its own cluster through a [`source`], serves the
//! services it exports to linked peers over the [`tunnel`] (QUIC, mTLS),
//! learns the peers' exports through [`peering`], turns them into
//! [`imports`] with local virtual IPs answered in DNS, and carries each
//! connection to an import across the tunnel to the exporting peer. It
//! also tells its own cluster's sidecar proxies where local services'
//! endpoints are ([`destination`]).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod catalog;
pub mod config;
pub mod destination;
pub mod egress;
pub mod gateway;
pub mod identity;
pub mod imports;
pub mod ingress;
pub mod k8s;
pub mod links;
pub mod metrics;
pub mod peering;
pub mod source;
pub mod state;
pub mod tunnel;

pub use config::GatewayConfig;
pub use gateway::Gateway;
pub mod demo;

#[cfg(test)]
mod testing;
