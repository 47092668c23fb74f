//! The outbound side: the application's connections out. HTTP requests
//! are resolved by authority, balanced over the destination's endpoints
//! (P2C peak-EWMA), and sent over mTLS HTTP/2 to meshed endpoints' proxies
//! or directly to unmeshed ones; other traffic goes byte for byte to its
//! original destination.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use http::{Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use tokio::net::TcpStream;

use super::{Active, HttpVersion, PlainClient, Shared, StartError, UpstreamError};
use crate::balance::{BalanceConfig, Balancer};
use crate::detect::{detect, Detected, PrefixedIo};
use crate::discovery::Endpoint;
use crate::http::{authority_of, error_response, strip_hop_by_hop, to_mesh, Body, Observed};
use crate::mesh::MeshClient;
use crate::metrics::{TcpCloseLabels, TcpLabels};
use crate::net::connect_within;
use crate::recent::Recent;
use crate::retry::{is_idempotent, Budget, BudgetConfig, MAX_BUFFERED_BODY};
use crate::transport::ProtocolHint;
use crate::FastMap;

const DIRECTION: &str = "outbound";
/// How long an authority no request names keeps its balancer (latency
/// estimates, ejections) and retry budget.
const FORGET_AFTER: std::time::Duration = std::time::Duration::from_secs(300);
/// Attempts per request at most (the first and two retries).
const MAX_ATTEMPTS: u32 = 3;

/// Whether a response is the peer proxy saying it could not reach its
/// application (as opposed to the application's own answer).
fn peer_proxy_failed(rsp: &Response<Body>) -> bool {
    rsp.headers().contains_key(crate::http::PROXY_ERROR)
        && matches!(
            rsp.status(),
            StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE
        )
}

/// A request to send, and to send again when it is idempotent and its
/// body was small enough to buffer.
struct Replay {
    /// The request as received, for the first attempt. Its header map has
    /// the room hyper left for the header added for a peer proxy; a clone
    /// has none, and adding one reallocates it.
    first: Option<Request<Body>>,
    /// What later attempts are built from; `None` when the request can be
    /// sent only once.
    again: Option<Buffered>,
}

/// A copy of a request whose body was buffered whole.
struct Buffered {
    method: http::Method,
    uri: http::Uri,
    version: Version,
    headers: http::HeaderMap,
    body: bytes::Bytes,
    trailers: Option<http::HeaderMap>,
}

impl Replay {
    async fn new(req: Request<Body>) -> Result<Self, Response<Body>> {
        use hyper::body::Body as _;
        let small = req
            .body()
            .size_hint()
            .upper()
            .is_some_and(|n| n <= MAX_BUFFERED_BODY as u64);
        if !is_idempotent(req.method()) || !small {
            return Ok(Self {
                first: Some(req),
                again: None,
            });
        }
        let (parts, body) = req.into_parts();
        // Bounded by its size hint, which the server connection enforces
        // (a body longer than its content-length is an error). Most have
        // none at all: nothing to collect.
        // An empty body is sent as it is; a collected one shares its bytes
        // with the copy kept for a retry.
        let (first, body, trailers) = if body.is_end_stream() {
            (body, bytes::Bytes::new(), None)
        } else {
            let collected =
                body.collect().await.ok().ok_or_else(|| {
                    error_response(StatusCode::BAD_REQUEST, "request body failed")
                })?;
            // Trailers (an HTTP/2 client's) go with the body, every time.
            let trailers = collected.trailers().cloned();
            let bytes = Some(collected.to_bytes())
                .filter(|b| b.len() <= MAX_BUFFERED_BODY)
                .ok_or_else(|| error_response(StatusCode::BAD_REQUEST, "request body failed"))?;
            let first = crate::http::whole_with_trailers(bytes.clone(), trailers.clone());
            (first, bytes, trailers)
        };
        let again = Buffered {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
            body,
            trailers,
        };
        Ok(Self {
            first: Some(Request::from_parts(parts, first)),
            again: Some(again),
        })
    }

    fn can_replay(&self) -> bool {
        self.again.is_some()
    }

    fn next(&mut self) -> Option<Request<Body>> {
        if let Some(first) = self.first.take() {
            return Some(first);
        }
        let again = self.again.as_ref()?;
        let mut req = Request::new(crate::http::whole_with_trailers(
            again.body.clone(),
            again.trailers.clone(),
        ));
        *req.method_mut() = again.method.clone();
        *req.uri_mut() = again.uri.clone();
        *req.version_mut() = again.version;
        *req.headers_mut() = again.headers.clone();
        Some(req)
    }
}

/// The outbound proxy; cheap to clone.
#[derive(Clone)]
pub(super) struct Outbound(Arc<Inner>);

struct Inner {
    shared: Arc<Shared>,
    mesh: MeshClient,
    plain: PlainClient,
    /// By authority; forgotten once unused for [`FORGET_AFTER`].
    balancers: Mutex<Recent<Balancer<SocketAddr>>>,
    /// By authority; pruned with the balancers.
    budgets: Mutex<FastMap<String, Budget>>,
}

impl Outbound {
    pub(super) fn new(shared: Arc<Shared>) -> Result<Self, StartError> {
        let plain = PlainClient::new(&shared.config);
        let mesh = MeshClient::new(
            shared.identity.clone(),
            shared.anchors.roots(),
            shared.tls.sink("connect"),
            shared.config.connect_timeout,
        );
        Ok(Self(Arc::new(Inner {
            shared,
            mesh,
            plain,
            balancers: Mutex::new(Recent::new(FORGET_AFTER)),
            budgets: Mutex::default(),
        })))
    }

    /// Serves one accepted connection.
    pub(super) async fn serve(&self, tcp: TcpStream, shared: Arc<Shared>) {
        let _active = Active::new(&shared.active);
        let started = Instant::now();
        let orig = super::original_dst(
            &tcp,
            shared.config.transparent,
            shared.config.outbound_target,
        );
        let labels = TcpLabels {
            direction: DIRECTION,
            tls: "false",
        };
        shared.tcp.opens.get_or_create(&labels).inc();
        // Opaque by configuration, or because discovery already says so
        // for the original destination (never waited for: a name not yet
        // known is detected as usual, and asked about for next time).
        let opaque = orig.is_some_and(|o| {
            shared.config.opaque_ports.contains(&o.port())
                || shared
                    .resolver
                    .peek(&o.to_string())
                    .is_some_and(|d| d.opaque)
        });
        let mut tcp = tcp;
        let (proto, prefix) = if opaque {
            (Detected::Opaque, bytes::Bytes::new())
        } else {
            match detect(&mut tcp, shared.config.detect_timeout).await {
                Ok(d) => d,
                Err(error) => {
                    tracing::debug!(%error, "outbound detection failed");
                    self.closed(&labels, started, "error");
                    return;
                }
            }
        };
        let io = PrefixedIo::new(prefix, tcp);
        let result = match proto {
            // Boxed: a connection's task then holds only the branch it
            // takes, not the largest of both (it is alive as long as the
            // connection, often idle).
            Detected::Http1 => Box::pin(self.serve_http(io, HttpVersion::Http1, orig)).await,
            Detected::Http2 => Box::pin(self.serve_http(io, HttpVersion::Http2, orig)).await,
            Detected::Tls | Detected::Opaque => Box::pin(self.forward_tcp(io, orig)).await,
        };
        self.closed(&labels, started, if result { "ok" } else { "error" });
    }

    fn closed(&self, labels: &TcpLabels, started: Instant, result: &'static str) {
        let tcp = &self.0.shared.tcp;
        tcp.closes
            .get_or_create(&TcpCloseLabels {
                direction: labels.direction,
                tls: labels.tls,
                result,
            })
            .inc();
        tcp.duration
            .get_or_create(labels)
            .observe(started.elapsed().as_secs_f64());
    }

    async fn serve_http(
        &self,
        io: PrefixedIo<TcpStream>,
        version: HttpVersion,
        orig: Option<SocketAddr>,
    ) -> bool {
        let this = self.clone();
        let shared = self.0.shared.clone();
        let handle: super::Handler = Arc::new(move |req| {
            let this = this.clone();
            Box::pin(async move { this.handle(req, orig).await })
        });
        super::serve_http(Box::new(io), version, &shared, DIRECTION, handle).await
    }

    async fn handle(&self, mut req: Request<Body>, orig: Option<SocketAddr>) -> Response<Body> {
        let started = Instant::now();
        let shared = &self.0.shared;
        let named = match authority_of(&req) {
            Ok(named) => {
                crate::http::host_from_target(&mut req);
                named
            }
            // Where the application was going anyway: passed on as is (the
            // server there answers it), routed and counted by address.
            Err(_) if orig.is_some() => None,
            Err(_) => {
                shared.http.error(DIRECTION, "bad_host");
                return error_response(StatusCode::BAD_REQUEST, "invalid Host header");
            }
        };
        let Some(authority) = named.or_else(|| orig.map(|o| o.to_string())) else {
            shared.http.error(DIRECTION, "no_authority");
            return error_response(StatusCode::BAD_REQUEST, "request has no authority");
        };
        // Routed, balanced and counted with a port; sent on as the client
        // named it (an HTTP/2 server matching `:authority` exactly must
        // see what the client sent, not `web:80`).
        let (authority, named_len) =
            with_port(authority, orig.filter(|_| shared.config.transparent));
        let sent_as = &authority[..named_len];
        // Counted once its first endpoint is picked (its `tls` known), or,
        // when none is, with the proxy's own answer.
        let mut counted = None;
        let rsp = if crate::http::is_upgrade(&req) {
            // Rare, and its TLS connect state is large: boxed, so every
            // plain request's future stays small.
            Box::pin(self.upgrade(req, &authority, orig, &mut counted)).await
        } else {
            let to = Names {
                routed: &authority,
                sent_as,
            };
            self.route(req, to, orig, started, &mut counted).await
        };
        let route = counted.unwrap_or_else(|| self.counted(&authority, "false"));
        Observed::wrap(rsp, route, started)
    }

    /// The series of `authority` and `tls`, a request counted in it.
    fn counted(&self, authority: &str, tls: &'static str) -> Arc<crate::metrics::RouteMetrics> {
        let route = self.0.shared.http.route(DIRECTION, authority, tls);
        route.request();
        route
    }

    /// Counts a request when its first endpoint is picked, under that
    /// endpoint's `tls`: before anything is sent, so a request whose client
    /// goes away before the response is counted too.
    fn count(
        &self,
        authority: &str,
        endpoint: &Endpoint,
        counted: &mut Option<Arc<crate::metrics::RouteMetrics>>,
    ) {
        if counted.is_none() {
            let tls = if endpoint.identity.is_some() {
                "true"
            } else {
                "false"
            };
            *counted = Some(self.counted(authority, tls));
        }
    }

    /// An upgrade (WebSocket...): a fresh connection to one endpoint (an
    /// opaque mesh connection when meshed), the request sent as HTTP/1.1,
    /// and on 101 the two sides spliced.
    async fn upgrade(
        &self,
        req: Request<Body>,
        authority: &str,
        orig: Option<SocketAddr>,
        counted: &mut Option<Arc<crate::metrics::RouteMetrics>>,
    ) -> Response<Body> {
        let shared = &self.0.shared;
        let endpoints = match self.endpoints(authority, orig).await {
            Ok(endpoints) => endpoints,
            Err(rsp) => return rsp,
        };
        let started = Instant::now();
        let Some(picked) = self.pick(authority, &endpoints, &[], started) else {
            shared.http.error(DIRECTION, "no_endpoints");
            return error_response(StatusCode::SERVICE_UNAVAILABLE, "no endpoints");
        };
        let endpoint = picked.endpoint.clone();
        self.count(authority, &endpoint, counted);
        let result = match &endpoint.identity {
            Some(id) => {
                let peer = SocketAddr::new(endpoint.addr.ip(), shared.config.peer_inbound_port);
                match self
                    .0
                    .mesh
                    .connect(peer, id, endpoint.addr.port(), ProtocolHint::Opaque)
                    .await
                {
                    Ok(tls) => {
                        let on_end = super::upgraded(shared, DIRECTION, "true");
                        crate::http::upgrade_via(req, tls, shared.config.request_timeout, on_end)
                            .await
                    }
                    Err(e) => Err(std::io::Error::other(e)),
                }
            }
            // (A connect that times out is a 502, like any failed connect;
            // only a response head that does not come in time is a 504.)
            None => match connect_within(endpoint.addr, shared.config.connect_timeout)
                .await
                .map_err(std::io::Error::other)
            {
                Ok(tcp) => {
                    let on_end = super::upgraded(shared, DIRECTION, "false");
                    crate::http::upgrade_via(req, tcp, shared.config.request_timeout, on_end).await
                }
                Err(e) => Err(e),
            },
        };
        let ended = Instant::now();
        match result {
            Ok(rsp) => {
                // The time to the response head, as for any request.
                picked.report(Some(ended - started), ended);
                rsp
            }
            Err(error) => {
                tracing::info!(%authority, %error, "upgrade failed");
                picked.report(None, ended);
                if error.kind() == std::io::ErrorKind::TimedOut {
                    shared.http.error(DIRECTION, "timeout");
                    return error_response(StatusCode::GATEWAY_TIMEOUT, "upstream timed out");
                }
                shared.http.error(DIRECTION, "upstream");
                error_response(StatusCode::BAD_GATEWAY, "upstream failed")
            }
        }
    }

    /// The endpoints of `authority` (the original destination when nothing
    /// knows the name), never this proxy's own listeners: a name that
    /// resolves to one would loop until every socket is gone. `Err` is the
    /// proxy's own answer.
    async fn endpoints(
        &self,
        authority: &str,
        orig: Option<SocketAddr>,
    ) -> Result<Vec<Endpoint>, Response<Body>> {
        let shared = &self.0.shared;
        let endpoints = match crate::discovery::destination(&*shared.resolver, authority).await {
            Some(d) if !d.endpoints.is_empty() => d.endpoints,
            _ => match orig {
                Some(o) => vec![Endpoint {
                    addr: o,
                    identity: None,
                    weight: 1,
                }],
                None => {
                    shared.http.error(DIRECTION, "no_endpoints");
                    return Err(error_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &format!("no endpoints for {authority}"),
                    ));
                }
            },
        };
        let endpoints: Vec<Endpoint> = endpoints
            .into_iter()
            .filter(|e| !shared.is_own_listener(e.addr, false))
            .collect();
        if endpoints.is_empty() {
            shared.http.error(DIRECTION, "loop");
            return Err(error_response(
                StatusCode::LOOP_DETECTED,
                &format!("{authority} resolves to this proxy"),
            ));
        }
        Ok(endpoints)
    }

    /// Picks an endpoint at `now`, avoiding those already `tried` for this
    /// request when others exist.
    fn pick<'a>(
        &'a self,
        authority: &'a str,
        endpoints: &[Endpoint],
        tried: &[SocketAddr],
        now: Instant,
    ) -> Option<Picked<'a>> {
        let mut balancers = self.0.balancers.lock().unwrap_or_else(|e| e.into_inner());
        // Looked up by reference: the key is allocated only for a new name.
        let new = !balancers.contains(authority);
        let balancer = || Balancer::new(BalanceConfig::default(), rand::random());
        if new && balancers.insert(authority, now, balancer()) {
            // Budgets of forgotten authorities go too.
            let mut budgets = self.0.budgets.lock().unwrap_or_else(|e| e.into_inner());
            budgets.retain(|name, _| name == authority || balancers.contains(name));
        }
        let b = balancers.use_mut(authority, now)?;
        b.update(endpoints.iter().map(|e| e.addr), now);
        // A retry goes to an endpoint not tried yet, while one is left.
        let key = if tried.is_empty() {
            b.pick(now)?.key
        } else {
            b.pick_untried(now, tried)?.key
        };
        let Some(endpoint) = endpoints.iter().find(|e| e.addr == key).cloned() else {
            b.release(&key);
            return None;
        };
        Some(Picked {
            outbound: self,
            authority,
            endpoint,
            reported: false,
        })
    }

    /// Reports how an attempt at `addr` ended at `now`: its latency, or
    /// `None` for a failure.
    fn report(
        &self,
        authority: &str,
        addr: SocketAddr,
        ok: Option<std::time::Duration>,
        now: Instant,
    ) {
        let mut balancers = self.0.balancers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = balancers.get_mut(authority) {
            match ok {
                Some(latency) => b.observe(&addr, latency, now),
                None => b.failed(&addr, now),
            }
        }
    }

    /// Sends the request to an endpoint, retrying idempotent requests with
    /// small bodies on another endpoint when an attempt fails (within the
    /// retry budget); the response, or the proxy's own answer.
    async fn route(
        &self,
        req: Request<Body>,
        to: Names<'_>,
        orig: Option<SocketAddr>,
        started: Instant,
        counted: &mut Option<Arc<crate::metrics::RouteMetrics>>,
    ) -> Response<Body> {
        let shared = &self.0.shared;
        let authority = to.routed;
        let endpoints = match self.endpoints(authority, orig).await {
            Ok(endpoints) => endpoints,
            Err(rsp) => return rsp,
        };
        // One deadline for the whole request, its body and its retries
        // included (as Linkerd's and Envoy's request timeouts are).
        let deadline = started + shared.config.request_timeout;
        let retry_floor = shared.config.request_timeout / 4;
        let mut replay = match tokio::time::timeout_at(deadline.into(), Replay::new(req)).await {
            Ok(Ok(replay)) => replay,
            Ok(Err(rsp)) => return rsp,
            // The client's slowness, not the upstream's.
            Err(_) => {
                shared.http.error(DIRECTION, "body_timeout");
                return error_response(
                    StatusCode::REQUEST_TIMEOUT,
                    "the request body did not come in time",
                );
            }
        };
        // (The clock is read as seldom as it can be: once for the deposit
        // and the first pick, after the body is buffered, and once at each
        // attempt's end, which is the next attempt's start.)
        let mut now = Instant::now();
        self.budget(authority, |b| b.deposit(now));
        let mut tried: Vec<SocketAddr> = Vec::new();
        for attempt in 1..=MAX_ATTEMPTS {
            let Some(req) = replay.next() else {
                break;
            };
            let Some(picked) = self.pick(authority, &endpoints, &tried, now) else {
                shared.http.error(DIRECTION, "no_endpoints");
                return error_response(StatusCode::SERVICE_UNAVAILABLE, "no endpoints");
            };
            self.count(authority, &picked.endpoint, counted);
            let result = self
                .attempt(req, to.sent_as, &picked.endpoint, deadline)
                .await;
            let failed = match &result {
                Ok(rsp) => peer_proxy_failed(rsp),
                Err(_) => true,
            };
            let result = result.unwrap_or_else(|rsp| rsp);
            let ended = Instant::now();
            let addr = picked.endpoint.addr;
            if !failed {
                // This attempt's own time: not the body's upload, nor
                // the attempts before it.
                picked.report(Some(ended - now), ended);
                return result;
            }
            picked.report(None, ended);
            // A retry needs a fair share of the request's time: one that
            // starts with little left would time out for certain, and
            // count against an endpoint that did nothing wrong.
            let time_left = deadline.saturating_duration_since(ended) >= retry_floor;
            let retry = replay.can_replay()
                && attempt < MAX_ATTEMPTS
                && time_left
                && self.budget(authority, |b| b.withdraw(ended));
            if !retry {
                if replay.can_replay() && attempt < MAX_ATTEMPTS && time_left {
                    self.retried("budget_exhausted");
                }
                return result;
            }
            self.retried("retried");
            now = ended;
            tracing::debug!(%authority, endpoint = %addr, attempt, "retrying");
            tried.push(addr);
        }
        error_response(StatusCode::BAD_GATEWAY, "upstream failed")
    }

    fn budget<T>(&self, authority: &str, f: impl FnOnce(&mut Budget) -> T) -> T {
        let mut budgets = self.0.budgets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = budgets.get_mut(authority) {
            return f(b);
        }
        f(budgets
            .entry(authority.to_string())
            .or_insert_with(|| Budget::new(BudgetConfig::default())))
    }

    fn retried(&self, result: &'static str) {
        self.0
            .shared
            .http
            .retries
            .get_or_create(&crate::metrics::RetryLabels {
                direction: DIRECTION,
                result,
            })
            .inc();
    }

    /// One attempt at one endpoint.
    async fn attempt(
        &self,
        req: Request<Body>,
        authority: &str,
        endpoint: &Endpoint,
        deadline: Instant,
    ) -> Result<Response<Body>, Response<Body>> {
        let shared = &self.0.shared;
        let sent = match &endpoint.identity {
            Some(id) => {
                let req = to_mesh(req, authority).map_err(|_| {
                    error_response(StatusCode::BAD_REQUEST, "cannot form the request URI")
                })?;
                let peer = SocketAddr::new(endpoint.addr.ip(), shared.config.peer_inbound_port);
                let f = self.0.mesh.send(peer, id, endpoint.addr.port(), req);
                match tokio::time::timeout_at(deadline.into(), f).await {
                    Ok(Ok(mut rsp)) => {
                        strip_hop_by_hop(rsp.headers_mut());
                        Ok(rsp)
                    }
                    Ok(Err(e)) => Err(UpstreamError::Failed(e.to_string())),
                    Err(_) => Err(UpstreamError::Timeout),
                }
            }
            // Boxed: the plaintext client's state is twice the mesh
            // client's, and every request's future (copied as it is built
            // and boxed) would carry it.
            None => Box::pin(self.0.plain.send(req, authority, endpoint.addr, deadline)).await,
        };
        match sent {
            Ok(rsp) => Ok(rsp),
            Err(UpstreamError::BadTarget) => Err(error_response(
                StatusCode::BAD_REQUEST,
                "bad request target",
            )),
            Err(UpstreamError::Failed(error)) => {
                tracing::info!(%authority, endpoint = %endpoint.addr, %error, "request failed");
                shared.http.error(DIRECTION, "upstream");
                Err(error_response(StatusCode::BAD_GATEWAY, "upstream failed"))
            }
            Err(UpstreamError::Timeout) => {
                shared.http.error(DIRECTION, "timeout");
                Err(error_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream timed out",
                ))
            }
        }
    }

    /// Forwards an undetected connection to its original destination (mTLS
    /// to its proxy when discovery says it is meshed).
    async fn forward_tcp(&self, mut io: PrefixedIo<TcpStream>, orig: Option<SocketAddr>) -> bool {
        let shared = &self.0.shared;
        let Some(orig) = orig else {
            shared.http.error(DIRECTION, "no_destination");
            return false;
        };
        let meshed = shared
            .resolver
            .resolve(&orig.to_string())
            .await
            .and_then(|d| d.endpoints.into_iter().find(|e| e.addr == orig))
            .and_then(|e| e.identity);
        let tls = if meshed.is_some() { "true" } else { "false" };
        let spliced = match meshed {
            Some(id) => {
                let peer = SocketAddr::new(orig.ip(), shared.config.peer_inbound_port);
                match self
                    .0
                    .mesh
                    .connect(peer, &id, orig.port(), ProtocolHint::Opaque)
                    .await
                {
                    Ok(mut tls) => crate::forward::splice(&mut io, &mut tls).await,
                    Err(error) => (Default::default(), Err(std::io::Error::other(error))),
                }
            }
            None => match connect_within(orig, shared.config.connect_timeout).await {
                Ok(mut up) => crate::forward::splice(&mut io, &mut up).await,
                Err(e) => (Default::default(), Err(e)),
            },
        };
        let (moved, result) = spliced;
        super::count_tcp_bytes(shared, DIRECTION, tls, moved);
        match result {
            Ok(()) => true,
            Err(error) => {
                tracing::debug!(%orig, %error, "outbound TCP forwarding failed");
                false
            }
        }
    }
}

/// An authority with an explicit port: the original destination's, else
/// 80 (HTTP/1 `Host` headers often omit it).
fn with_port(mut authority: String, orig: Option<SocketAddr>) -> (String, usize) {
    let named = authority.len();
    // A port is digits after the last colon, unless that colon is inside
    // an IPv6 literal (`[::1]` has none, `[::1]:80` has one).
    let has_port = authority.rsplit_once(':').is_some_and(|(host, port)| {
        !port.is_empty()
            && port.bytes().all(|b| b.is_ascii_digit())
            && (!host.contains(':') || host.ends_with(']'))
    });
    if !has_port {
        use std::fmt::Write as _;
        let _ = write!(authority, ":{}", orig.map_or(80, |o| o.port()));
    }
    (authority, named)
}

/// The names of a request's destination: `routed` (with a port) for
/// discovery, balancing and metrics; `sent_as` (as the client named it)
/// on the wire.
#[derive(Clone, Copy)]
struct Names<'a> {
    routed: &'a str,
    sent_as: &'a str,
}

/// An endpoint picked for one attempt. Its balancer counts it in flight
/// until the attempt is reported, or, should the request be dropped first
/// (its client gone, a gRPC deadline), until this is dropped: a count that
/// never came down would price the endpoint out for good.
struct Picked<'a> {
    outbound: &'a Outbound,
    authority: &'a str,
    endpoint: Endpoint,
    reported: bool,
}

impl Picked<'_> {
    /// How the attempt ended at `now`: its latency, or `None` for a
    /// failure.
    fn report(mut self, ok: Option<std::time::Duration>, now: Instant) {
        self.reported = true;
        self.outbound
            .report(self.authority, self.endpoint.addr, ok, now);
    }
}

impl Drop for Picked<'_> {
    fn drop(&mut self) {
        if self.reported {
            return;
        }
        let mut balancers = self
            .outbound
            .0
            .balancers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(b) = balancers.get_mut(self.authority) {
            b.release(&self.endpoint.addr);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::{Destination, StaticResolver};
    use crate::identity::{CertStore, Issuer, SpiffeId, TrustAnchors};
    use std::collections::HashMap;
    use std::time::Duration;

    /// An outbound proxy (not listening) whose static table sends
    /// `web:80` to `endpoints`, plaintext.
    fn outbound(endpoints: &[SocketAddr], request_timeout: Duration) -> Outbound {
        crate::tls::install_default_provider();
        let root = crate::identity::generate_root("test").expect("root");
        let pem = crate::identity::generate_issuer(&root, "test.strait.local").expect("issuer");
        let issuer =
            Issuer::from_pem(pem.cert_pem.as_bytes(), pem.key_pem.as_bytes()).expect("issuer");
        let id = SpiffeId::parse("spiffe://test.strait.local/ns/a/sa/b").expect("id");
        let leaf = issuer.issue(&id, Duration::from_secs(3600)).expect("leaf");
        let anchors = TrustAnchors::from_pem(root.cert_pem.as_bytes(), "root").expect("anchors");
        let table = HashMap::from([(
            "web:80".to_string(),
            Destination {
                endpoints: endpoints
                    .iter()
                    .map(|&addr| Endpoint {
                        addr,
                        identity: None,
                        weight: 1,
                    })
                    .collect(),
                opaque: false,
            },
        )]);
        let mut registry = prometheus_client::registry::Registry::default();
        let shared = Arc::new(Shared {
            config: crate::sidecar::ProxyConfig {
                request_timeout,
                ..Default::default()
            },
            identity: CertStore::new(&leaf).expect("store"),
            anchors,
            resolver: Arc::new(StaticResolver::new(table)),
            http: crate::metrics::HttpMetrics::register(&mut registry),
            tcp: crate::metrics::TcpMetrics::register(&mut registry),
            tls: crate::metrics::TlsMetrics::register(&mut registry),
            active: Arc::default(),
            draining: tokio::sync::watch::channel(false).1,
            listeners: std::sync::OnceLock::new(),
            admin_listener: std::sync::OnceLock::new(),
        });
        Outbound::new(shared).expect("outbound")
    }

    impl Outbound {
        /// `addr`'s requests in flight and latency estimate for `authority`.
        fn state(&self, authority: &str, addr: SocketAddr) -> Option<(u32, Duration)> {
            let mut balancers = self.0.balancers.lock().unwrap_or_else(|e| e.into_inner());
            balancers.get_mut(authority)?.state(&addr, Instant::now())
        }
    }

    const WEB: Names<'static> = Names {
        routed: "web:80",
        sent_as: "web",
    };

    fn get() -> Request<Body> {
        Request::get("http://web/")
            .body(crate::http::empty())
            .expect("request")
    }

    /// Accepts connections and, after `wait`, answers them with `answer`
    /// (or, with none, closes them unanswered).
    async fn server(wait: Duration, answer: Option<&'static str>) -> SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                    tokio::time::sleep(wait).await;
                    if let Some(a) = answer {
                        let _ = s.write_all(a.as_bytes()).await;
                    }
                });
            }
        });
        addr
    }

    const OK: &str = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

    #[tokio::test]
    async fn a_request_dropped_mid_attempt_gives_its_endpoint_back() {
        let hole = server(Duration::from_secs(3600), None).await;
        let out = outbound(&[hole], Duration::from_secs(10));
        // The client goes away while the attempt waits.
        let mut counted = None;
        let gone = tokio::time::timeout(
            Duration::from_millis(200),
            out.route(get(), WEB, None, Instant::now(), &mut counted),
        )
        .await;
        assert!(gone.is_err(), "still waiting");
        let (pending, _) = out.state("web:80", hole).expect("known");
        assert_eq!(pending, 0, "nothing in flight any more");
        // Counted all the same, under its endpoint's tls.
        let route = counted.expect("counted when its endpoint was picked");
        assert_eq!(route.labels().tls, "false");
        assert_eq!(route.labels().authority, "web:80");
    }

    #[tokio::test]
    async fn a_retry_reports_its_own_latency_not_the_attempts_before() {
        // A fails after 300 ms (closes unanswered); B answers at once.
        let a = server(Duration::from_millis(300), None).await;
        let b = server(Duration::ZERO, Some(OK)).await;
        let out = outbound(&[a, b], Duration::from_secs(10));
        // A goes first: B starts with a request in flight, so costs more.
        {
            let now = Instant::now();
            let mut balancers = out.0.balancers.lock().unwrap_or_else(|e| e.into_inner());
            let balancer = Balancer::new(BalanceConfig::default(), 7);
            balancers.insert("web:80", now, balancer);
            let balancer = balancers.get_mut("web:80").expect("balancer");
            balancer.update([a, b], now);
            while let Some(p) = balancer.pick(now) {
                if p.key == b {
                    break;
                }
                balancer.release(&p.key);
            }
        }
        let rsp = out.route(get(), WEB, None, Instant::now(), &mut None).await;
        assert_eq!(rsp.status(), StatusCode::OK);
        let (_, b_latency) = out.state("web:80", b).expect("known");
        assert!(
            b_latency < Duration::from_millis(150),
            "B charged with A's time: {b_latency:?}"
        );
    }

    #[tokio::test]
    async fn the_request_timeout_covers_the_retries() {
        // Every endpoint hangs: one 504 when the request's time is up, not
        // one per attempt.
        let holes = [
            server(Duration::from_secs(3600), None).await,
            server(Duration::from_secs(3600), None).await,
        ];
        let out = outbound(&holes, Duration::from_millis(300));
        let started = Instant::now();
        let answered = out.route(get(), WEB, None, started, &mut None).await;
        let took = started.elapsed();
        assert_eq!(answered.status(), StatusCode::GATEWAY_TIMEOUT);
        assert!(took < Duration::from_millis(550), "{took:?}");
    }

    #[test]
    fn authorities_get_a_port_unless_they_have_one() {
        let orig = Some("10.0.0.1:8080".parse().expect("addr"));
        for (authority, orig, expected) in [
            ("web", None, "web:80"),
            ("web", orig, "web:8080"),
            ("web:9090", orig, "web:9090"),
            ("[::1]", None, "[::1]:80"),
            ("[fd00::2]:8080", None, "[fd00::2]:8080"),
            ("10.0.0.2:81", None, "10.0.0.2:81"),
            ("web:", None, "web::80"),
        ] {
            let (routed, named) = with_port(authority.into(), orig);
            assert_eq!(routed, expected, "{authority}");
            assert_eq!(&routed[..named], authority, "the name as given");
        }
    }
}
