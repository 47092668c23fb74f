//! The transport header: the first frame on every gateway tunnel stream
//! and on every proxy-to-proxy connection, saying what the stream carries
//! and where it goes. A two-byte big-endian length, then a prost
//! [`StreamHeader`] of at most [`MAX_HEADER_BYTES`]; the destination thus
//! travels inside the encrypted channel, never in SNI.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
pub use strait_proto::tunnel::v1::{ProtocolHint, StreamHeader, StreamKind};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The largest header a receiver accepts.
pub const MAX_HEADER_BYTES: usize = 4096;
/// The header version spoken here.
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
            // Gateways name a service; proxies only a port on the peer.
            for (what, v) in [
                ("namespace", &header.namespace),
                ("service", &header.service),
            ] {
                if !v.is_empty() && !is_label(v) {
                    return Err(FrameError::Target(format!(
                        "{what} {v:?} is not a DNS label"
                    )));
                }
            }
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

/// An RFC 1123 label: 1-63 of `a-z`, `0-9`, `-`, alphanumeric at both ends.
fn is_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// A header for a proxy-to-proxy connection to `port` on the peer, carrying
/// `protocol`.
pub fn to_port(port: u16, protocol: ProtocolHint, source_identity: &str) -> StreamHeader {
    StreamHeader {
        version: VERSION,
        kind: StreamKind::Tcp as i32,
        port: u32::from(port),
        protocol: protocol as i32,
        source_identity: source_identity.to_string(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip_and_limits() {
        let h = to_port(8080, ProtocolHint::Http2, "spiffe://a/ns/b/sa/c");
        let bytes = encode(&h).expect("encode");
        assert_eq!(read(&mut &bytes[..]).await.expect("decode"), h);
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
        let mut bad = to_port(1, ProtocolHint::Opaque, "");
        bad.service = "Not A Label".into();
        assert!(matches!(
            decode(&bad.encode_to_vec()),
            Err(FrameError::Target(_))
        ));
        let mut v2 = to_port(1, ProtocolHint::Opaque, "");
        v2.version = 2;
        assert!(matches!(
            decode(&v2.encode_to_vec()),
            Err(FrameError::Version(2))
        ));
    }

    /// A label as [`is_label`] takes it, or nothing (proxies name no
    /// service).
    fn label() -> impl proptest::strategy::Strategy<Value = String> {
        proptest::prop_oneof![
            proptest::strategy::Just(String::new()),
            "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?",
        ]
    }

    fn header() -> impl proptest::strategy::Strategy<Value = StreamHeader> {
        (
            label(),
            label(),
            1..=u32::from(u16::MAX),
            0..=4i32,
            ".{0,200}",
            proptest::option::of(("[ -~]{0,80}", "[ -~]{0,80}")),
        )
            .prop_map(
                |(service, namespace, port, protocol, source_identity, trace)| StreamHeader {
                    version: VERSION,
                    kind: StreamKind::Tcp as i32,
                    service,
                    namespace,
                    port,
                    protocol,
                    source_identity,
                    trace: trace.map(|(traceparent, tracestate)| {
                        strait_proto::tunnel::v1::TraceContext {
                            traceparent,
                            tracestate,
                        }
                    }),
                },
            )
    }

    /// Reads one header from `bytes` at once; the header (or error) and
    /// the bytes left unread.
    fn read_from(bytes: &[u8]) -> (Result<StreamHeader, FrameError>, &[u8]) {
        let mut rest = bytes;
        let got = futures::executor::block_on(read(&mut rest));
        (got, rest)
    }

    use proptest::prelude::*;

    proptest::proptest! {
        /// Every valid header comes back as sent, and the stream's bytes
        /// after it are left for the stream.
        #[test]
        fn valid_headers_round_trip_and_leave_the_payload(
            h in header(),
            payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
        ) {
            let mut bytes = encode(&h).expect("encode").to_vec();
            bytes.extend_from_slice(&payload);
            let (got, rest) = read_from(&bytes);
            proptest::prop_assert_eq!(got.expect("read"), h);
            proptest::prop_assert_eq!(rest, &payload[..]);
        }

        /// Any bytes at all: an answer, never a panic; never more read than
        /// the length prefix declares; and what is accepted is a header
        /// this side would have sent.
        #[test]
        fn any_bytes_get_an_answer_and_lose_nothing_past_the_header(
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let (got, rest) = read_from(&bytes);
            let read = bytes.len() - rest.len();
            let declared = match bytes.get(..2) {
                Some(p) => 2 + usize::from(u16::from_be_bytes([p[0], p[1]])),
                None => 2,
            };
            proptest::prop_assert!(read <= declared);
            if got.is_ok() {
                proptest::prop_assert_eq!(read, declared);
            }
        }

        /// A header that decodes is taken exactly when its fields are ones
        /// this side sends: version 1, a known kind, and for TCP a port
        /// and DNS-label names.
        #[test]
        fn headers_are_taken_exactly_when_their_fields_are_valid(
            version in 0..=2u32,
            kind in -1..=3i32,
            port in proptest::prop_oneof![1..=u32::from(u16::MAX), any::<u32>()],
            service in proptest::prop_oneof![label(), ".{0,70}"],
            namespace in proptest::prop_oneof![label(), ".{0,70}"],
        ) {
            let h = StreamHeader { version, kind, service, namespace, port, ..Default::default() };
            let valid = version == VERSION
                && match StreamKind::try_from(kind) {
                    Ok(StreamKind::Peering) => true,
                    Ok(StreamKind::Tcp) => {
                        u16::try_from(port).is_ok_and(|p| p != 0)
                            && [&h.service, &h.namespace].iter().all(|n| n.is_empty() || is_label(n))
                    }
                    _ => false,
                };
            let body = h.encode_to_vec();
            let mut bytes = (body.len() as u16).to_be_bytes().to_vec();
            bytes.extend_from_slice(&body);
            match read_from(&bytes).0 {
                Ok(got) => {
                    proptest::prop_assert!(valid, "took {:?}", h);
                    proptest::prop_assert_eq!(got, h);
                }
                Err(e) => proptest::prop_assert!(!valid, "refused {:?}: {}", h, e),
            }
        }
    }
}
