//! HTTP/1.1 on the wire for requests without a body (sans-IO; the parent
//! module does the reading and writing): the request head encoded, the
//! response head parsed with httparse, and the response body's framing
//! decided and decoded as RFC 9112 §6 says.

use std::mem::MaybeUninit;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Version};

/// The largest response head, or trailer section, taken (bytes).
pub(super) const MAX_HEAD: usize = 64 * 1024;
/// The most header fields in a response head or trailer section (hyper's
/// default too).
const MAX_HEADERS: usize = 100;
/// The longest chunk extension taken (bytes).
const MAX_CHUNK_EXTENSION: usize = 4096;

/// What was wrong with an upstream's response.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// Reading or writing failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The response head is not HTTP/1.x.
    #[error("malformed response head: {0}")]
    Head(httparse::Error),
    /// The response head, or its trailers, went over 64 KiB.
    #[error("response head over {MAX_HEAD} bytes")]
    HeadTooLarge,
    /// A status code outside 100–999.
    #[error("invalid status code")]
    Status,
    /// A header name or value no HTTP message may carry.
    #[error("invalid header field in the response")]
    Header,
    /// A `Content-Length` that is not a number, or two that differ.
    #[error("invalid content-length")]
    ContentLength,
    /// `101 Switching Protocols`: upgrades are not carried this way (the
    /// proxy splices them), so nothing here asked for one.
    #[error("switching protocols without an upgrade")]
    Upgrade,
    /// A chunked body that breaks the chunked coding.
    #[error("malformed chunked body")]
    Chunked,
    /// The connection closed before the response ended.
    #[error("connection closed before the response ended")]
    Incomplete,
}

/// Whether this module can carry `req`: a request without a body (no
/// content on the way and none announced) and not CONNECT, which opens a
/// tunnel.
pub(super) fn suits<B: hyper::body::Body>(req: &http::Request<B>) -> bool {
    req.method() != Method::CONNECT
        && req.body().is_end_stream()
        && !req.headers().contains_key(TRANSFER_ENCODING)
        && req
            .headers()
            .get(CONTENT_LENGTH)
            .is_none_or(|v| v.as_bytes() == b"0")
}

/// Appends the head of a request without a body to `dst`: origin form
/// (path `/` when the URI has none), HTTP/1.0 for an HTTP/1.0 request and
/// HTTP/1.1 for any other, the header fields as they are, and `Content-Length: 0` for the methods whose requests carry
/// content (RFC 9110 §8.6), so the upstream does not wait for any.
pub(super) fn encode_request(parts: &http::request::Parts, dst: &mut Vec<u8>) {
    dst.extend_from_slice(parts.method.as_str().as_bytes());
    dst.push(b' ');
    // (`Uri::path` is `/` when the URI has no path.)
    dst.extend_from_slice(parts.uri.path().as_bytes());
    if let Some(query) = parts.uri.query() {
        dst.push(b'?');
        dst.extend_from_slice(query.as_bytes());
    }
    dst.extend_from_slice(if parts.version == Version::HTTP_10 {
        b" HTTP/1.0\r\n"
    } else {
        b" HTTP/1.1\r\n"
    });
    for (name, value) in &parts.headers {
        dst.extend_from_slice(name.as_str().as_bytes());
        dst.extend_from_slice(b": ");
        dst.extend_from_slice(value.as_bytes());
        dst.extend_from_slice(b"\r\n");
    }
    let carries_content = matches!(parts.method, Method::POST | Method::PUT | Method::PATCH);
    if carries_content && !parts.headers.contains_key(CONTENT_LENGTH) {
        dst.extend_from_slice(b"content-length: 0\r\n");
    }
    dst.extend_from_slice(b"\r\n");
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    /// No body: a response to HEAD, a 204 or 304, or a length of 0.
    Empty,
    /// This many bytes.
    Length(u64),
    /// The chunked coding.
    Chunked,
    /// Everything until the upstream closes the connection.
    Close,
}

/// A final response head.
#[derive(Debug)]
pub(super) struct Head {
    /// Status, version and header fields (as received, hop-by-hop ones
    /// too: the caller strips them).
    pub(super) response: Response<()>,
    /// How its body is delimited.
    pub(super) framing: Framing,
    /// Whether the connection may carry another request after this
    /// response's body.
    pub(super) keep_alive: bool,
}

/// What [`parse_head`] found at the front of a buffer.
#[derive(Debug)]
pub(super) enum Parsed {
    /// Not a whole head yet.
    Partial,
    /// An interim (1xx) response of this many bytes, to be skipped.
    Interim(usize),
    /// A final response head of this many bytes.
    Final(usize, Head),
}

/// Parses the response head at the front of `buf`, the answer to a
/// `method` request.
pub(super) fn parse_head(buf: &[u8], method: &Method) -> Result<Parsed, WireError> {
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut rsp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut rsp,
        buf,
        &mut fields,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            return Err(WireError::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(e) => return Err(WireError::Head(e)),
    };
    if len > MAX_HEAD {
        return Err(WireError::HeadTooLarge);
    }
    let status = rsp
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(WireError::Status)?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err(WireError::Upgrade);
    }
    if status.is_informational() {
        return Ok(Parsed::Interim(len));
    }
    let version = if rsp.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let mut headers = HeaderMap::with_capacity(rsp.headers.len());
    let mut has_length = false;
    let mut transfer_encoding = false;
    let mut chunked = false;
    let mut close = false;
    let mut keep_alive_asked = false;
    for field in rsp.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes()).map_err(|_| WireError::Header)?;
        let value = HeaderValue::from_bytes(field.value).map_err(|_| WireError::Header)?;
        if name == CONTENT_LENGTH {
            has_length = true;
        } else if name == TRANSFER_ENCODING {
            transfer_encoding = true;
            // The coding applied last decides (of the last field line).
            chunked = field
                .value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name == CONNECTION {
            for token in field.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive_asked |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        }
        headers.append(name, value);
    }
    // Transfer-Encoding next to Content-Length, or in an HTTP/1.0
    // response, is framing nobody should trust for a next response; and
    // the length is not passed on, the coding having decided the body
    // (RFC 9112 §6.1, §6.3).
    let doubtful = transfer_encoding && (has_length || version == Version::HTTP_10);
    if transfer_encoding && has_length {
        headers.remove(CONTENT_LENGTH);
    }
    // (A response that has no body whatever its fields say is framed
    // before any length is read: a wrong one there breaks nothing.)
    let framing = if method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Empty
    } else if transfer_encoding {
        if chunked {
            Framing::Chunked
        } else {
            Framing::Close
        }
    } else {
        match content_length(&headers)? {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => Framing::Close,
        }
    };
    let keep_alive = !close
        && !doubtful
        && framing != Framing::Close
        && (version == Version::HTTP_11 || keep_alive_asked);
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.version_mut() = version;
    *response.headers_mut() = headers;
    Ok(Parsed::Final(
        len,
        Head {
            response,
            framing,
            keep_alive,
        },
    ))
}

/// The length the `Content-Length` fields give, if any: digits, or lists
/// of the same digits (which some senders repeat), as RFC 9110 §8.6 allows
/// a recipient to take; fields that disagree are an error.
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, WireError> {
    let mut found = None;
    let items = headers
        .get_all(CONTENT_LENGTH)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','));
    for item in items {
        let digits = item.trim_ascii();
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return Err(WireError::ContentLength);
        }
        let n = digits.iter().try_fold(0u64, |n, d| {
            n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        });
        let n = n.ok_or(WireError::ContentLength)?;
        if found.is_some_and(|f| f != n) {
            return Err(WireError::ContentLength);
        }
        found = Some(n);
    }
    Ok(found)
}

/// What [`Chunked::decode`] took from the buffer.
#[derive(Debug, PartialEq)]
pub(super) enum Decoded {
    /// Body bytes.
    Data(Bytes),
    /// The trailer section; the body has ended.
    Trailers(HeaderMap),
    /// The body has ended, without trailers.
    End,
    /// More bytes are needed.
    More,
}

#[derive(Debug, Clone, Copy)]
enum ChunkState {
    /// Hex digits of a chunk size.
    Size { size: u64, digits: u8 },
    /// A chunk extension, up to the CR ending the size line.
    Extension { size: u64, len: usize },
    /// The LF ending a size line.
    SizeLf { size: u64 },
    /// Chunk data still to come.
    Data(u64),
    /// The CR after a chunk's data.
    DataCr,
    /// The LF after a chunk's data.
    DataLf,
    /// The trailer section after the last chunk.
    Trailers,
    /// The body has ended.
    Done,
}

/// A decoder of the chunked transfer coding (RFC 9112 §7.1): fed the
/// bytes read so far, it gives the body's data as it comes, without
/// copying, and its trailers.
#[derive(Debug)]
pub(super) struct Chunked {
    state: ChunkState,
}

impl Default for Chunked {
    fn default() -> Self {
        Self {
            state: ChunkState::Size { size: 0, digits: 0 },
        }
    }
}

impl Chunked {
    /// Takes what it can from the front of `buf`: some data, the end of
    /// the body, or nothing if `buf` holds too little.
    pub(super) fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, WireError> {
        loop {
            match self.state {
                ChunkState::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    // (n ≤ left, so the cast back cannot lose anything.)
                    let rest = left - n as u64;
                    self.state = if rest == 0 {
                        ChunkState::DataCr
                    } else {
                        ChunkState::Data(rest)
                    };
                    return Ok(Decoded::Data(buf.split_to(n).freeze()));
                }
                ChunkState::Trailers => return self.trailers(buf),
                ChunkState::Done => return Ok(Decoded::End),
                _ => {}
            }
            let Some(&byte) = buf.first() else {
                return Ok(Decoded::More);
            };
            buf.advance(1);
            self.state = match (self.state, byte) {
                (ChunkState::Size { size, digits }, b) if b.is_ascii_hexdigit() => {
                    if digits == 16 {
                        return Err(WireError::Chunked);
                    }
                    let d = (b as char).to_digit(16).map_or(0, u64::from);
                    ChunkState::Size {
                        size: size << 4 | d,
                        digits: digits + 1,
                    }
                }
                (ChunkState::Size { digits: 0, .. }, _) => return Err(WireError::Chunked),
                (ChunkState::Size { size, .. }, b'\r') => ChunkState::SizeLf { size },
                (ChunkState::Size { size, .. }, b';' | b' ' | b'\t') => {
                    ChunkState::Extension { size, len: 1 }
                }
                (ChunkState::Extension { size, .. }, b'\r') => ChunkState::SizeLf { size },
                (ChunkState::Extension { size, len }, b)
                    if b != b'\n' && len < MAX_CHUNK_EXTENSION =>
                {
                    ChunkState::Extension { size, len: len + 1 }
                }
                (ChunkState::SizeLf { size: 0 }, b'\n') => ChunkState::Trailers,
                (ChunkState::SizeLf { size }, b'\n') => ChunkState::Data(size),
                (ChunkState::DataCr, b'\r') => ChunkState::DataLf,
                (ChunkState::DataLf, b'\n') => ChunkState::Size { size: 0, digits: 0 },
                _ => return Err(WireError::Chunked),
            };
        }
    }

    /// The trailer section: an empty line, or header fields and then one.
    fn trailers(&mut self, buf: &mut BytesMut) -> Result<Decoded, WireError> {
        if buf.starts_with(b"\r\n") {
            buf.advance(2);
            self.state = ChunkState::Done;
            return Ok(Decoded::End);
        }
        if buf.len() < 2 {
            return Ok(Decoded::More);
        }
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        match httparse::parse_headers(buf, &mut fields) {
            Ok(httparse::Status::Complete((len, fields))) => {
                let mut trailers = HeaderMap::with_capacity(fields.len());
                for field in fields {
                    let name = HeaderName::from_bytes(field.name.as_bytes())
                        .map_err(|_| WireError::Header)?;
                    let value =
                        HeaderValue::from_bytes(field.value).map_err(|_| WireError::Header)?;
                    trailers.append(name, value);
                }
                buf.advance(len);
                self.state = ChunkState::Done;
                Ok(Decoded::Trailers(trailers))
            }
            Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => Err(WireError::HeadTooLarge),
            Ok(httparse::Status::Partial) => Ok(Decoded::More),
            Err(_) => Err(WireError::Chunked),
        }
    }
}

#[cfg(test)]
mod tests;
