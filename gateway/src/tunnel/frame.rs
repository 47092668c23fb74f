//! Tunnel stream headers: the codec is the shared transport header of
//! [`strait_proxy::transport`]; this module adds the gateway's headers
//! (a TCP stream to an exported service, the peering stream) and the
//! refusal codes sent as QUIC stream resets ([`Refusal`]).

use strait_proto::tunnel::v1::{StreamHeader, StreamKind};

use crate::catalog::ServiceKey;

pub use strait_proxy::transport::{decode, encode, read, FrameError, MAX_HEADER_BYTES, VERSION};

/// A header for a TCP stream to `key:port`.
pub fn tcp_header(key: &ServiceKey, port: u16, source_identity: &str) -> StreamHeader {
    StreamHeader {
        version: VERSION,
        kind: StreamKind::Tcp as i32,
        service: key.name.clone(),
        namespace: key.namespace.clone(),
        port: u32::from(port),
        protocol: 0,
        source_identity: source_identity.to_string(),
        trace: None,
    }
}

/// A header for the peering control stream.
pub fn peering_header(source_identity: &str) -> StreamHeader {
    StreamHeader {
        version: VERSION,
        kind: StreamKind::Peering as i32,
        source_identity: source_identity.to_string(),
        ..Default::default()
    }
}

/// Why the receiving gateway refused a stream; sent as the QUIC stream
/// reset (and stop-sending) code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// The header was malformed, oversized or of an unknown version.
    BadHeader,
    /// The service is not exported to this peer, or the port is not one of
    /// its ports.
    NotExported,
    /// The service has no ready endpoint.
    NoEndpoints,
    /// No endpoint accepted the connection.
    ConnectFailed,
    /// The connection broke midway (the other side's TCP connection was
    /// reset or failed); without this the peer would see a clean end of
    /// stream and take a truncated response for a whole one.
    Aborted,
    /// Too many streams of this kind on the connection (peering: one).
    Busy,
}

impl Refusal {
    /// The wire code.
    pub fn code(self) -> u32 {
        match self {
            Self::BadHeader => 0x10,
            Self::NotExported => 0x11,
            Self::NoEndpoints => 0x12,
            Self::ConnectFailed => 0x13,
            Self::Aborted => 0x14,
            Self::Busy => 0x15,
        }
    }

    /// From a wire code.
    pub fn from_code(code: u64) -> Option<Self> {
        Some(match code {
            0x10 => Self::BadHeader,
            0x11 => Self::NotExported,
            0x12 => Self::NoEndpoints,
            0x13 => Self::ConnectFailed,
            0x14 => Self::Aborted,
            0x15 => Self::Busy,
            _ => return None,
        })
    }

    /// The bounded metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadHeader => "bad_header",
            Self::NotExported => "not_exported",
            Self::NoEndpoints => "no_endpoints",
            Self::ConnectFailed => "connect_failed",
            Self::Aborted => "aborted",
            Self::Busy => "busy",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn hello() -> StreamHeader {
        tcp_header(
            &ServiceKey::new("demo", "hello"),
            8080,
            "spiffe://w/ns/a/sa/b",
        )
    }

    #[tokio::test]
    async fn round_trip() {
        let bytes = encode(&hello()).expect("encode");
        let mut rd = &bytes[..];
        assert_eq!(read(&mut rd).await.expect("decode"), hello());
    }

    #[test]
    fn semantic_validation() {
        let mut h = hello();
        h.version = 2;
        assert!(matches!(
            decode(&h.encode_to_vec()),
            Err(FrameError::Version(2))
        ));
        let mut h = hello();
        h.kind = 99;
        assert!(matches!(
            decode(&h.encode_to_vec()),
            Err(FrameError::Kind(99))
        ));
        let mut h = hello();
        h.port = 70000;
        assert!(matches!(
            decode(&h.encode_to_vec()),
            Err(FrameError::Target(_))
        ));
        let mut h = hello();
        h.namespace = "../etc".into();
        assert!(matches!(
            decode(&h.encode_to_vec()),
            Err(FrameError::Target(_))
        ));
        let mut h = hello();
        h.source_identity = "x".repeat(MAX_HEADER_BYTES);
        assert!(matches!(encode(&h), Err(FrameError::TooLarge(_))));
    }

    #[test]
    fn refusal_codes_round_trip() {
        for r in [
            Refusal::BadHeader,
            Refusal::NotExported,
            Refusal::NoEndpoints,
            Refusal::ConnectFailed,
        ] {
            assert_eq!(Refusal::from_code(u64::from(r.code())), Some(r));
        }
        assert_eq!(Refusal::from_code(0), None);
    }
}
