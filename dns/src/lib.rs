//! Strait's authoritative DNS for the Multi-Cluster Services zone
//! `clusterset.local` (KEP-1645).
//!
//! * [`Zone`] is an immutable snapshot built by the pure function
//!   [`Zone::build`] from imported [`ServiceRecord`]s, and answers questions
//!   with [`Zone::lookup`] (no I/O).
//! * [`ZoneHandle`] holds the current snapshot in an [`arc_swap::ArcSwap`]:
//!   readers never lock and [`ZoneHandle::publish`] swaps the whole zone
//!   atomically.
//! * [`Responder`] answers wire-format queries from one snapshot, without
//!   I/O: plain queries from answers encoded in advance, everything else
//!   through hickory-server's request decoding and response building.
//! * [`DnsServer`] serves the handle over UDP and TCP with the responder.
//! * [`DnsMetrics`] are the Prometheus metrics of all of the above.
//!
//! Served names, for origin `clusterset.local`:
//!
//! * `<svc>.<ns>.svc.clusterset.local`: A and AAAA with the service IPs, and
//!   SRV listing every port;
//! * `_<port>._<tcp|udp|sctp>.<svc>.<ns>.svc.clusterset.local`: SRV for each
//!   named port, target `<svc>.<ns>.svc.clusterset.local.` (whose A/AAAA go
//!   in the additional section);
//! * headless services: `<svc>.<ns>.svc.clusterset.local` answers every
//!   endpoint's address, each endpoint has
//!   `<hostname>.<clusterid>.<svc>.<ns>.svc.clusterset.local`, and SRV
//!   records target those names;
//! * `dns-version.clusterset.local`: TXT `1.0.0`;
//! * the apex: SOA and NS (`ns.dns.clusterset.local.`).
//!
//! `<clusterid>.<svc>.<ns>.svc.clusterset.local` never has records: it is
//! NXDOMAIN, or NODATA where a headless endpoint below it makes it an empty
//! non-terminal (RFC 8020).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod handle;
mod metrics;
mod respond;
pub mod sample;
mod server;
mod zone;

pub use handle::ZoneHandle;
pub use metrics::DnsMetrics;
pub use respond::{Responder, Transport};
pub use server::{DnsError, DnsServer, TcpLimits};
pub use zone::{
    HeadlessEndpoint, Lookup, PortProtocol, ServiceKind, ServicePort, ServiceRecord, Zone,
    ZoneError, NEGATIVE_TTL, SCHEMA_VERSION,
};
