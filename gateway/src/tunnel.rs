//! The tunnel between gateways: one QUIC connection per linked peer, mTLS
//! both ways, one bidirectional stream per proxied connection (or for the
//! peering control channel), each opened by a length-prefixed
//! [`StreamHeader`](strait_proto::tunnel::v1::StreamHeader); or, where UDP
//! is blocked, the same over one TLS-over-TCP connection per stream
//! ([`tcp`]).

pub mod endpoint;
pub mod frame;
pub mod io;
pub mod tcp;

pub use endpoint::{TunnelConfig, TunnelEndpoint};
pub use frame::{FrameError, Refusal, MAX_HEADER_BYTES};
pub use io::{QuicIo, TunnelIo};
