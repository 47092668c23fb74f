//! HTTP forwarding pieces shared by the inbound and outbound proxies:
//! body and error types, hop-by-hop header handling, the HTTP/1-over-HTTP/2
//! marking between proxies, and per-request metrics (a body wrapper sees
//! the end of every response, trailers and `grpc-status` included).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use crate::metrics::RouteMetrics;

/// The error of a body (hyper's, h2's, or a client's).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type everywhere in the proxy.
pub type Body = BoxBody<Bytes, BoxError>;

/// Boxes any body with bytes as data into a [`Body`].
pub fn boxed<B>(body: B) -> Body
where
    B: HttpBody<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(into_box_error).boxed()
}

fn into_box_error<E: Into<BoxError>>(e: E) -> BoxError {
    e.into()
}

/// Marks an HTTP/1 request carried over the HTTP/2 connection between two
/// proxies, so the receiving proxy sends it on as HTTP/1.
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("strait-orig-proto");

/// Marks a response the proxy made itself (it could not reach the
/// application), as opposed to the application's own.
pub const PROXY_ERROR: HeaderName = HeaderName::from_static("strait-proxy-error");

/// Headers that belong to one hop only (RFC 9110, 7.6.1) and must not be
/// forwarded; HTTP/2 forbids them outright. (`Trailer` is not one: it says
/// which trailers follow, end to end, and an HTTP/1 encoder writes only
/// the trailers it names.)
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "upgrade",
];

/// Removes hop-by-hop headers, and any header named in `Connection`.
/// `te: trailers` is kept (gRPC needs it).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one look at each name instead of a lookup
    // (and a removal attempt) per hop-by-hop name.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    let keep_te = headers
        .get(http::header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for h in HOP_BY_HOP {
        headers.remove(*h);
    }
    if keep_te {
        headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
    }
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
}

/// An empty body.
pub fn empty() -> Body {
    whole(Bytes::new())
}

/// A body of `bytes`, whole.
pub fn whole(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// A body of `bytes`, whole, then `trailers` if any (a buffered request
/// sent again as it came).
pub fn whole_with_trailers(bytes: Bytes, trailers: Option<HeaderMap>) -> Body {
    match trailers {
        None => whole(bytes),
        Some(t) => Full::new(bytes)
            .with_trailers(std::future::ready(Some(Ok(t))))
            .map_err(|never| match never {})
            .boxed(),
    }
}

/// A short plain-text error response produced by the proxy itself.
pub fn error_response(status: StatusCode, why: &str) -> Response<Body> {
    let mut rsp = Response::new(whole(Bytes::from(format!("{why}\n"))));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    rsp.headers_mut()
        .insert(PROXY_ERROR, HeaderValue::from_static("true"));
    rsp
}

/// The request's authority, lowercased: the URI's (absolute form, HTTP/2
/// `:authority`), else the `Host` header's; `None` when neither names one
/// (no `Host`, or an empty one). An authority that is not a valid
/// `host[:port]` (user information, an empty host, a port that is no
/// number, brackets around anything but an IPv6 address) or a repeated
/// `Host` is an error (RFC 9112, section 3.2): it must not be looked up or
/// made a metric label. An empty port is dropped (`web:` is `web`).
pub fn authority_of<B>(req: &Request<B>) -> Result<Option<String>, InvalidHost> {
    let mut hosts = req.headers().get_all(http::header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(InvalidHost);
    }
    if let Some(a) = req.uri().authority() {
        return routable(a.as_str().as_bytes()).map(Some);
    }
    match host {
        Some(h) if !h.is_empty() => routable(h.as_bytes()).map(Some),
        _ => Ok(None),
    }
}

/// The longest host a request may name: a DNS name's 253 characters (and
/// a root dot). Anything longer names nothing that can be resolved, and
/// would otherwise become a lookup key and a metric label as it is.
pub const MAX_HOST_LEN: usize = 254;

/// `text` as a lowercase `host[:port]`, if it is one.
fn routable(text: &[u8]) -> Result<String, InvalidHost> {
    match plain_routable(text) {
        Some(plain) => Ok(plain),
        None => parsed_routable(text),
    }
}

/// [`routable`] by way of the `http` crate's authority parse.
fn parsed_routable(text: &[u8]) -> Result<String, InvalidHost> {
    // The `http` crate takes user information and any port text; its
    // `host()` needs a host after an `@`, so that is refused first.
    if text.contains(&b'@') {
        return Err(InvalidHost);
    }
    // The host, a colon and a port of five digits at most.
    if text.len() > MAX_HOST_LEN + 6 {
        return Err(InvalidHost);
    }
    let a = http::uri::Authority::try_from(text).map_err(|_| InvalidHost)?;
    let (s, host) = (a.as_str(), a.host());
    let port = s.get(host.len()..).ok_or(InvalidHost)?;
    let host_ok = match host.strip_prefix('[') {
        // An IPv6 literal, perhaps with a zone (`%25eth0`).
        Some(inner) => inner.strip_suffix(']').is_some_and(|ip| {
            let ip = ip.split_once("%25").map_or(ip, |(ip, _zone)| ip);
            ip.parse::<std::net::Ipv6Addr>().is_ok()
        }),
        None => !host.is_empty() && host.len() <= MAX_HOST_LEN && !host.contains(['[', ']']),
    };
    let port_ok = match port.strip_prefix(':') {
        None => port.is_empty(),
        Some(p) => {
            p.is_empty() || p.parse::<u16>().is_ok() && p.bytes().all(|b| b.is_ascii_digit())
        }
    };
    if !host_ok || !port_ok {
        return Err(InvalidHost);
    }
    let kept = if port == ":" { host } else { s };
    Ok(kept.to_ascii_lowercase())
}

/// [`routable`] for the common case, a host of letters, digits, dots,
/// hyphens and underscores with perhaps a port, without the general parse
/// and its copy; `None` for anything else, which the general parse
/// decides (it accepts everything this does, with the same result).
fn plain_routable(text: &[u8]) -> Option<String> {
    let (host, port) = match text.iter().rposition(|&b| b == b':') {
        Some(i) => (&text[..i], &text[i + 1..]),
        None => (text, &b""[..]),
    };
    let host_ok = !host.is_empty()
        && host.len() <= MAX_HOST_LEN
        && host
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    let port_ok = port.len() <= 5
        && port.iter().all(u8::is_ascii_digit)
        && port.iter().fold(0u32, |n, &d| n * 10 + u32::from(d - b'0')) <= u32::from(u16::MAX);
    if !host_ok || !port_ok {
        return None;
    }
    // An empty port is dropped, as the general parse drops it.
    let kept = if port.is_empty() { host } else { text };
    Some(std::str::from_utf8(kept).ok()?.to_ascii_lowercase())
}

/// An authority (URI or `Host`) that cannot name the request's target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidHost;

impl std::fmt::Display for InvalidHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request's Host or authority is not a valid host[:port]")
    }
}

impl std::error::Error for InvalidHost {}

/// Gives a request whose target names an authority (absolute form, HTTP/2
/// `:authority`) that authority as its `Host` too: what a proxy must do
/// (RFC 9112, section 3.2.2), so that the upstream sees the target that
/// was routed on.
pub fn host_from_target<B>(req: &mut Request<B>) {
    let Some(a) = req.uri().authority() else {
        return;
    };
    let mut hosts = req.headers().get_all(http::header::HOST).iter();
    let agrees = match (hosts.next(), hosts.next()) {
        (None, _) => true,
        (Some(h), None) => h.as_bytes().eq_ignore_ascii_case(a.as_str().as_bytes()),
        (Some(_), Some(_)) => false,
    };
    if !agrees {
        if let Ok(v) = HeaderValue::from_str(a.as_str()) {
            req.headers_mut().insert(http::header::HOST, v);
        }
    }
}

/// Prepares a request received from an application for the HTTP/2
/// connection to a peer proxy: absolute URI, hop-by-hop headers gone, and
/// HTTP/1 requests marked so the peer can send them on as HTTP/1.
pub fn to_mesh(mut req: Request<Body>, authority: &str) -> Result<Request<Body>, http::Error> {
    if req.version() != Version::HTTP_2 {
        let v = if req.version() == Version::HTTP_10 {
            "HTTP/1.0"
        } else {
            "HTTP/1.1"
        };
        req.headers_mut()
            .insert(ORIG_PROTO, HeaderValue::from_static(v));
    } else {
        // Only this proxy marks a request: an application's own marking
        // would make the peer speak HTTP/1 to its application.
        req.headers_mut().remove(ORIG_PROTO);
    }
    strip_hop_by_hop(req.headers_mut());
    retarget(&mut req, authority)?;
    *req.version_mut() = Version::HTTP_2;
    Ok(req)
}

/// Makes the request's URI absolute, `http://<authority><path and query>`.
pub fn retarget<B>(req: &mut Request<B>, authority: &str) -> Result<(), http::Error> {
    let authority = authority.parse()?;
    // The path is kept as it is (no copy, no second parse).
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    parts.scheme = Some(http::uri::Scheme::HTTP);
    parts.authority = Some(authority);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    *req.uri_mut() = http::Uri::from_parts(parts)?;
    Ok(())
}

/// Undoes [`to_mesh`] on the receiving proxy: the version the application
/// spoke, and no marking.
pub fn from_mesh(mut req: Request<Body>) -> Request<Body> {
    match req
        .headers_mut()
        .remove(ORIG_PROTO)
        .as_ref()
        .map(|v| v.as_bytes())
    {
        Some(b"HTTP/1.0") => *req.version_mut() = Version::HTTP_10,
        Some(_) => *req.version_mut() = Version::HTTP_11,
        None => {}
    }
    req
}

/// Records the response of one request when its body ends (or is dropped):
/// status class, `grpc-status` (from headers for trailers-only responses,
/// else from trailers) and latency to the response headers.
pub struct Observed {
    inner: Body,
    route: std::sync::Arc<RouteMetrics>,
    status_class: &'static str,
    grpc_status: &'static str,
    done: bool,
}

impl Observed {
    /// Wraps `rsp`'s body, counting it in `route`'s series. `started` is
    /// when the request arrived.
    pub fn wrap(
        rsp: Response<Body>,
        route: std::sync::Arc<RouteMetrics>,
        started: Instant,
    ) -> Response<Body> {
        let status_class = status_class(rsp.status());
        route.latency(status_class, started.elapsed().as_secs_f64());
        let grpc_status = grpc_status(rsp.headers()).unwrap_or_default();
        let end_now = rsp.body().is_end_stream();
        rsp.map(|inner| {
            let mut o = Observed {
                inner,
                route,
                status_class,
                grpc_status,
                done: false,
            };
            if end_now {
                o.finish();
            }
            o.boxed()
        })
    }

    fn finish(&mut self) {
        if !self.done {
            self.done = true;
            self.route.response(self.status_class, self.grpc_status);
        }
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        self.finish();
    }
}

impl HttpBody for Observed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    if let Some(code) = grpc_status(trailers) {
                        self.grpc_status = code;
                    }
                }
            }
            Poll::Ready(None) => self.finish(),
            Poll::Ready(Some(Err(_))) => {
                self.status_class = "error";
                self.finish();
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The `grpc-status` label value of `headers`: one of the codes 0-16, or
/// `invalid` (a bounded set, no allocation).
fn grpc_status(headers: &HeaderMap) -> Option<&'static str> {
    const CODES: [&str; 17] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    ];
    let v = headers.get(GRPC_STATUS)?;
    Some(
        std::str::from_utf8(v.as_bytes())
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .and_then(|n| CODES.get(n).copied())
            .unwrap_or("invalid"),
    )
}

const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// Whether `req` asks to switch protocols (WebSocket and the like).
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(http::header::UPGRADE)
        && req
            .headers()
            .get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// Sends an upgrade request over `stream` (a fresh connection to the
/// upstream: plain, or a mesh connection carrying opaque bytes) as
/// HTTP/1.1; when the upstream switches protocols, the two upgraded
/// connections are spliced byte for byte. Returns the upstream's response
/// for the client (a 101 completes the client's upgrade), or `TimedOut`
/// if its head takes longer than `timeout`. `on_end` gets the splice's
/// outcome (or is dropped, if there is none).
pub async fn upgrade_via<S, E>(
    mut req: Request<Body>,
    stream: S,
    timeout: std::time::Duration,
    on_end: E,
) -> Result<Response<Body>, std::io::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    E: FnOnce(crate::forward::Transferred, std::io::Result<()>) + Send + 'static,
{
    let client_side = hyper::upgrade::on(&mut req);
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let (parts, body) = req.into_parts();
    let mut fwd = Request::from_parts(parts, body);
    if let Some(pq) = fwd.uri().path_and_query().cloned() {
        *fwd.uri_mut() = http::Uri::from(pq);
    }
    // This hop's headers stay here, but for the upgrade itself.
    let upgrade = fwd.headers_mut().remove(http::header::UPGRADE);
    strip_hop_by_hop(fwd.headers_mut());
    if let Some(protocol) = upgrade {
        let headers = fwd.headers_mut();
        headers.insert(http::header::UPGRADE, protocol);
        headers.insert(
            http::header::CONNECTION,
            HeaderValue::from_static("upgrade"),
        );
    }
    let mut rsp = crate::net::timed(timeout, async {
        sender
            .send_request(fwd)
            .await
            .map_err(std::io::Error::other)
    })
    .await?;
    if rsp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let server_side = hyper::upgrade::on(&mut rsp);
        tokio::spawn(async move {
            let (Ok(client), Ok(server)) = (client_side.await, server_side.await) else {
                return;
            };
            let mut client = hyper_util::rt::TokioIo::new(client);
            let mut server = hyper_util::rt::TokioIo::new(server);
            let (moved, result) = crate::forward::splice(&mut client, &mut server).await;
            on_end(moved, result);
        });
    }
    Ok(rsp.map(boxed))
}

/// `1xx` ... `5xx`.
pub fn status_class(s: StatusCode) -> &'static str {
    match s.as_u16() / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        _ => "5xx",
    }
}

/// Plaintext HTTP/2 connections by address, one multiplexed connection
/// each: requests keep their own authority (`:authority`) whatever address
/// they are sent to, which a URI-keyed client cannot do.
#[derive(Debug, Default)]
pub struct H2Pool {
    /// Keyed by the whole target (see [`crate::net::Target`]).
    conns: crate::http2::Pool<crate::net::Target>,
}

impl H2Pool {
    /// Sends `req` over the pooled connection to `target`, dialing one
    /// (within `connect_timeout`) if there is none or it closed.
    pub async fn send(
        &self,
        target: impl Into<crate::net::Target>,
        req: Request<Body>,
        connect_timeout: std::time::Duration,
    ) -> Result<Response<Body>, std::io::Error> {
        let target = target.into();
        let dial = || {
            Box::pin(async move {
                let connect = async {
                    let tcp = target.connect(connect_timeout).await?;
                    tcp.set_nodelay(true)?;
                    let max_header = crate::sidecar::MAX_HEADER_BYTES as u32;
                    let keepalive = crate::http2::Keepalive::Off;
                    crate::http2::handshake(tcp, max_header, keepalive, target.to_string())
                        .await
                        .map_err(std::io::Error::other)
                };
                crate::net::timed(connect_timeout, connect).await
            })
        };
        let mut sender = self.conns.get(&target, dial).await?;
        crate::http2::send(&mut sender, req)
            .await
            .map_err(std::io::Error::other)
    }
}

#[cfg(test)]
mod tests;
