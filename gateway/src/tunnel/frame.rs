//! The stream header codec: a two-byte big-endian length, then a prost
//! `StreamHeader` of at most [`MAX_HEADER_BYTES`]. Pure functions plus one
//! async reader; refusals travel as QUIC stream reset codes ([`Refusal`]).

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use strait_proto::tunnel::v1::{StreamHeader, StreamKind};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::catalog::{validate_label, ServiceKey};

/// The largest header a receiver accepts.
pub const MAX_HEADER_BYTES: usize = 4096;
/// The header version this gateway speaks.
pub const VERSION: u32 = 1;

/// Why a header was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix exceeds [`MAX_HEADER_BYTES`].
    #[error("stream header of {0} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")]
    TooLarge(usize),
    /// A zero length prefix.
    #[error("empty stream header")]
    Empty,
    /// The protobuf did not decode.
    #[error("malformed stream header: {0}")]
    Decode(#[from] prost::DecodeError),
    /// A version this gateway does not speak.
    #[error("unsupported stream header version {0}")]
    Version(u32),
    /// An unknown or unspecified stream kind.
    #[error("unknown stream kind {0}")]
    Kind(i32),
    /// A TCP stream without a valid target.
    #[error("invalid target: {0}")]
    Target(String),
    /// The stream ended before the header did.
    #[error("stream ended inside the header")]
    Truncated,
    /// Reading failed.
    #[error("reading stream header: {0}")]
    Io(#[source] std::io::Error),
}

impl FrameError {
    /// The bounded metric label for this error.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooLarge(_) => "header_too_large",
            Self::Empty | Self::Decode(_) | Self::Kind(_) | Self::Target(_) => "bad_header",
            Self::Version(_) => "bad_version",
            Self::Truncated | Self::Io(_) => "header_read_error",
        }
    }
}

/// Encodes a header with its length prefix.
pub fn encode(header: &StreamHeader) -> Result<Bytes, FrameError> {
    let len = header.encoded_len();
    if len > MAX_HEADER_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    let mut buf = BytesMut::with_capacity(2 + len);
    buf.put_u16(len as u16);
    header
        .encode(&mut buf)
        .map_err(|_| FrameError::TooLarge(len))?;
    Ok(buf.freeze())
}

/// Decodes and validates a header body (without its length prefix).
pub fn decode(body: &[u8]) -> Result<StreamHeader, FrameError> {
    if body.is_empty() {
        return Err(FrameError::Empty);
    }
    let header = StreamHeader::decode(body)?;
    if header.version != VERSION {
        return Err(FrameError::Version(header.version));
    }
    match StreamKind::try_from(header.kind) {
        Ok(StreamKind::Tcp) => {
            validate_label("namespace", &header.namespace)
                .map_err(|e| FrameError::Target(e.to_string()))?;
            validate_label("service", &header.service)
                .map_err(|e| FrameError::Target(e.to_string()))?;
            if header.port == 0 || header.port > u32::from(u16::MAX) {
                return Err(FrameError::Target(format!("port {}", header.port)));
            }
        }
        Ok(StreamKind::Peering) => {}
        _ => return Err(FrameError::Kind(header.kind)),
    }
    Ok(header)
}

/// Reads one length-prefixed header from a stream.
pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<StreamHeader, FrameError> {
    let mut len = [0u8; 2];
    r.read_exact(&mut len).await.map_err(eof)?;
    let len = usize::from(u16::from_be_bytes(len));
    if len > MAX_HEADER_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(eof)?;
    decode(&body)
}

fn eof(e: std::io::Error) -> FrameError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        FrameError::Truncated
    } else {
        FrameError::Io(e)
    }
}

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
}

impl Refusal {
    /// The wire code.
    pub fn code(self) -> u32 {
        match self {
            Self::BadHeader => 0x10,
            Self::NotExported => 0x11,
            Self::NoEndpoints => 0x12,
            Self::ConnectFailed => 0x13,
        }
    }

    /// From a wire code.
    pub fn from_code(code: u64) -> Option<Self> {
        Some(match code {
            0x10 => Self::BadHeader,
            0x11 => Self::NotExported,
            0x12 => Self::NoEndpoints,
            0x13 => Self::ConnectFailed,
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[tokio::test]
    async fn oversized_truncated_and_garbage_headers_are_refused() {
        let mut big = vec![0xff, 0xff];
        big.extend(std::iter::repeat_n(0, 16));
        assert!(matches!(
            read(&mut &big[..]).await,
            Err(FrameError::TooLarge(65535))
        ));
        assert!(matches!(
            read(&mut &[0u8, 10, 1][..]).await,
            Err(FrameError::Truncated)
        ));
        assert!(matches!(
            read(&mut &[0u8][..]).await,
            Err(FrameError::Truncated)
        ));
        assert!(matches!(
            read(&mut &[0u8, 0][..]).await,
            Err(FrameError::Empty)
        ));
        let garbage = [0u8, 4, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            read(&mut &garbage[..]).await,
            Err(FrameError::Decode(_))
        ));
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
