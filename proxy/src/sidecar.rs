//! The sidecar proxy: an outbound listener for the application's
//! connections out, an inbound listener for connections to it, and the
//! admin server; [`Proxy::start`] wires them from a [`ProxyConfig`].
//!
//! Every accepted connection goes through protocol detection. HTTP is
//! served (HTTP/1 with hyper, HTTP/2 with `h2` directly) and forwarded
//! request by request (balanced, timed, measured); anything else is
//! forwarded byte for byte. Between two
//! proxies the connection is mutual TLS with a transport header, and HTTP
//! rides one multiplexed HTTP/2 connection per peer and port.

mod inbound;
mod outbound;
mod serve;

pub(crate) use serve::{serve_http, BoxedIo, Handler, Version as HttpVersion};

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::admin::{AdminServer, Readiness};
use crate::discovery::Resolve;
use crate::identity::{CertStore, TrustAnchors};
use crate::metrics::{HttpMetrics, TcpMetrics, TlsMetrics};
use crate::net::LimitedAccept;

/// Everything the sidecar needs; validated by [`ProxyConfig::validate`].
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Outbound listener (default `127.0.0.1:4140`).
    pub outbound: SocketAddr,
    /// A second outbound listener for the application's IPv6 connections
    /// (default none). In a dual-stack pod `ip6tables` redirects them to
    /// `[::1]` on the outbound port, where an IPv4 listener never sees
    /// them; an unspecified address would take connections from the
    /// network, so it must be loopback.
    pub outbound_ipv6: Option<SocketAddr>,
    /// Inbound listener (default `0.0.0.0:4143`).
    pub inbound: SocketAddr,
    /// Admin listener (default `0.0.0.0:4191`).
    pub admin: SocketAddr,
    /// Read the original destination with `SO_ORIGINAL_DST` (iptables
    /// redirect, see `strait-proxy init`).
    pub transparent: bool,
    /// Where inbound connections go when not transparent (the application).
    pub inbound_target: Option<SocketAddr>,
    /// The pod's own addresses (default: none given; only with
    /// `transparent`). When transparent, the application is reached at
    /// each connection's original destination, never on loopback (a port
    /// the application binds on `127.0.0.1` only stays private to the pod);
    /// a connection whose original destination is not one of these
    /// addresses is refused. With none given, a connection is refused
    /// unless its original destination is the address it was delivered to
    /// (for a redirected one, the incoming interface's primary address).
    pub inbound_ips: Vec<IpAddr>,
    /// Where outbound connections go when not transparent and nothing
    /// else names a destination (opaque TCP; HTTP routes by authority).
    pub outbound_target: Option<SocketAddr>,
    /// The port peer proxies listen on for mesh connections (default 4143).
    pub peer_inbound_port: u16,
    /// Ports whose traffic is never inspected (default: none).
    pub opaque_ports: Vec<u16>,
    /// How long protocol detection waits for the first bytes (default 1 s).
    pub detect_timeout: Duration,
    /// Connect timeout (default 1 s).
    pub connect_timeout: Duration,
    /// Per-request timeout, to the response headers (default 10 s).
    pub request_timeout: Duration,
    /// How long an HTTP/1 client may take to send a whole request head,
    /// from when the proxy starts waiting for it (default 10 s, as
    /// HAProxy's recommended `timeout http-request`); a head split by a
    /// park gets at most twice this. A connection that sends a head slower
    /// (slowloris) is closed and counted as `http_timeout`. An idle
    /// keep-alive connection is parked long before (its hyper state
    /// dropped) and waits without this limit, unless its last request had
    /// a body: then this is also its idle timeout, as in HAProxy, whose
    /// `timeout http-keep-alive` defaults to it.
    pub http1_header_timeout: Duration,
    /// How often an HTTP/2 client connection (a peer proxy's, the
    /// application's, an unmeshed client's) is pinged, and how long a ping
    /// may go unanswered before the connection is closed as dead (default
    /// 10 s): a client gone without a FIN or RST would otherwise hold its
    /// connection until the kernel gives up on it, if ever.
    pub http2_keepalive: Duration,
    /// Refuse plaintext inbound connections (default: allowed from
    /// unmeshed clients).
    pub require_mtls: bool,
    /// How long in-flight work may take after SIGTERM (default 30 s).
    pub shutdown_grace: Duration,
    /// Connections served at once in each direction (default 20,000, both
    /// outbound listeners together). Beyond it a listener stops accepting
    /// until one closes, and new connections wait in the kernel's listen
    /// backlog (see [`LimitedAccept::accept`]), as with HAProxy's `maxconn`: a client opening connections
    /// without end cannot run the proxy out of descriptors or memory (an
    /// idle HTTP/1 connection costs about 8 KB, a busy one more). Each
    /// pause is counted as `strait_proxy_errors_total{reason=
    /// "connection_limit"}`.
    pub max_connections: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            outbound: ([127, 0, 0, 1], 4140).into(),
            outbound_ipv6: None,
            inbound: ([0, 0, 0, 0], 4143).into(),
            admin: ([0, 0, 0, 0], 4191).into(),
            transparent: false,
            inbound_target: None,
            inbound_ips: Vec::new(),
            outbound_target: None,
            peer_inbound_port: 4143,
            opaque_ports: Vec::new(),
            detect_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(10),
            http1_header_timeout: Duration::from_secs(10),
            http2_keepalive: Duration::from_secs(10),
            require_mtls: false,
            shutdown_grace: Duration::from_secs(30),
            max_connections: 20_000,
        }
    }
}

/// An invalid configuration.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ConfigError {
    /// The setting.
    pub field: &'static str,
    /// What is wrong.
    pub message: String,
}

impl ProxyConfig {
    /// How long each step of a connection's set-up may take once its
    /// protocol is known (a mesh TLS handshake, the transport header, an
    /// HTTP/2 preface): five detection timeouts.
    pub fn setup_timeout(&self) -> Duration {
        self.detect_timeout.saturating_mul(5)
    }

    /// Checks the settings against each other.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, message: &str| {
            Err(ConfigError {
                field,
                message: message.to_string(),
            })
        };
        if !self.transparent && self.inbound_target.is_none() {
            return bad(
                "inbound-target",
                "required unless --transparent (where else would inbound traffic go?)",
            );
        }
        if !self.inbound_ips.is_empty() && !self.transparent {
            return bad(
                "inbound-ips",
                "only with --transparent (without it --inbound-target names the application)",
            );
        }
        if let Some(ip) = self.inbound_ips.iter().find(|ip| {
            let ip = ip.to_canonical();
            ip.is_loopback() || ip.is_unspecified() || ip.is_multicast()
        }) {
            return Err(ConfigError {
                field: "inbound-ips",
                message: format!("{ip} is not a pod address"),
            });
        }
        if !(1..=Semaphore::MAX_PERMITS).contains(&self.max_connections) {
            return Err(ConfigError {
                field: "max-connections",
                message: format!("must be from 1 to {}", Semaphore::MAX_PERMITS),
            });
        }
        if self.peer_inbound_port == 0 {
            return bad("peer-inbound-port", "must not be 0");
        }
        if let Some(v6) = self.outbound_ipv6 {
            if !(v6.is_ipv6() && v6.ip().is_loopback()) {
                return bad(
                    "outbound-listen-ipv6",
                    "must be an IPv6 loopback address such as [::1]:4140 (the outbound side is for this pod's application only)",
                );
            }
            if v6.port() != self.outbound.port() {
                return bad(
                    "outbound-listen-ipv6",
                    "must use the outbound listener's port (ip6tables redirects to the same port as iptables)",
                );
            }
        }
        let ports = [self.outbound.port(), self.inbound.port(), self.admin.port()];
        if ports.iter().all(|p| *p != 0)
            && (ports[0] == ports[1] || ports[0] == ports[2] || ports[1] == ports[2])
        {
            return bad(
                "listeners",
                "outbound, inbound and admin need distinct ports",
            );
        }
        for (field, d) in [
            ("detect-timeout", self.detect_timeout),
            ("connect-timeout", self.connect_timeout),
            ("request-timeout", self.request_timeout),
            ("http1-header-timeout", self.http1_header_timeout),
            ("http2-keepalive", self.http2_keepalive),
        ] {
            if d.is_zero() {
                return bad(field, "must be positive");
            }
        }
        if self.http1_header_timeout <= serve::PARK_AFTER {
            // hyper's header timer also runs while a connection waits for
            // its next request: it must leave idle connections time to be
            // parked.
            return bad(
                "http1-header-timeout",
                "must be more than the second after which idle HTTP/1 connections are parked",
            );
        }
        Ok(())
    }
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// Invalid settings.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listener could not bind.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// TLS settings failed.
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
}

/// What both directions share.
pub(crate) struct Shared {
    pub(crate) config: ProxyConfig,
    pub(crate) identity: Arc<CertStore>,
    pub(crate) anchors: TrustAnchors,
    pub(crate) resolver: Arc<dyn Resolve>,
    pub(crate) http: HttpMetrics,
    pub(crate) tcp: TcpMetrics,
    pub(crate) tls: TlsMetrics,
    pub(crate) active: Arc<AtomicUsize>,
    pub(crate) draining: watch::Receiver<bool>,
    /// This proxy's own listener addresses (to refuse loops).
    pub(crate) listeners: std::sync::OnceLock<Vec<SocketAddr>>,
    /// The admin listener's address: a mesh header must not reach it on
    /// loopback, where `/shutdown` is allowed.
    pub(crate) admin_listener: std::sync::OnceLock<SocketAddr>,
}

impl Shared {
    /// Whether `addr` is one of this proxy's own listeners, where sending
    /// traffic would loop until every socket is gone. `local`: `addr` is
    /// known to be one of this host's addresses, so a listener on the
    /// unspecified address takes it whatever it is (otherwise only
    /// loopback is assumed local). IPv4-mapped addresses compare as the
    /// IPv4 ones they are.
    pub(crate) fn is_own_listener(&self, addr: SocketAddr, local: bool) -> bool {
        is_own_listener(self.listeners.get().map_or(&[], |l| l), addr, local)
    }

    /// Whether `addr` is the admin listener on loopback, where a request
    /// would pass for the pod's own (`POST /shutdown`). Elsewhere it is
    /// any meshed client's to reach, as the admin port is directly.
    pub(crate) fn is_admin_on_loopback(&self, addr: SocketAddr) -> bool {
        addr.ip().to_canonical().is_loopback()
            && self
                .admin_listener
                .get()
                .is_some_and(|a| is_own_listener(std::slice::from_ref(a), addr, false))
    }
}

/// [`Shared::is_own_listener`] over the listener addresses `own` (pure). A
/// listener on `0.0.0.0` takes IPv4 only; one on `[::]` both families
/// (every listener is bound dual-stack).
fn is_own_listener(own: &[SocketAddr], addr: SocketAddr, local: bool) -> bool {
    let ip = addr.ip().to_canonical();
    own.iter().any(|l| {
        let any = l.ip().is_unspecified() && (l.is_ipv6() || ip.is_ipv4());
        l.port() == addr.port()
            && (l.ip().to_canonical() == ip || (any && (local || ip.is_loopback())))
    })
}

/// Counts a connection in flight while alive.
pub(crate) struct Active(Arc<AtomicUsize>);

impl Active {
    pub(crate) fn new(n: &Arc<AtomicUsize>) -> Self {
        n.fetch_add(1, Ordering::AcqRel);
        Self(n.clone())
    }
}

/// What an upgraded connection's splice does when it ends: until then it
/// counts as in flight (a drain waits for it, as for any connection), and
/// its bytes are counted as TCP's, however it ended.
pub(crate) fn upgraded(
    shared: &Arc<Shared>,
    direction: &'static str,
    tls: &'static str,
) -> impl FnOnce(crate::forward::Transferred, std::io::Result<()>) + Send + 'static {
    let active = Active::new(&shared.active);
    let shared = shared.clone();
    move |moved, _result| {
        let _active = active;
        count_tcp_bytes(&shared, direction, tls, moved);
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A running sidecar proxy.
pub struct Proxy {
    shared: Arc<Shared>,
    outbound_addr: SocketAddr,
    outbound_v6_addr: Option<SocketAddr>,
    inbound_addr: SocketAddr,
    admin: AdminServer,
    ready: Readiness,
    drain: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("outbound", &self.outbound_addr)
            .field("inbound", &self.inbound_addr)
            .finish_non_exhaustive()
    }
}

/// Binds a listener ([`crate::net::bind_listener`]: `[::]` takes IPv4
/// too) and returns it with the address it got.
fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), StartError> {
    let err = |source| StartError::Bind { addr, source };
    let listener = crate::net::bind_listener(addr).map_err(err)?;
    let bound = listener.local_addr().map_err(err)?;
    Ok((listener, bound))
}

impl Proxy {
    /// Starts the listeners. `registry` gets the proxy's metrics and is
    /// served on the admin listener.
    pub async fn start(
        config: ProxyConfig,
        identity: Arc<CertStore>,
        anchors: TrustAnchors,
        resolver: Arc<dyn Resolve>,
        mut registry: Registry,
    ) -> Result<Self, StartError> {
        crate::tls::install_default_provider();
        config.validate()?;
        let http = HttpMetrics::register(&mut registry);
        let tcp = TcpMetrics::register(&mut registry);
        let tls = TlsMetrics::register(&mut registry);
        let (drain, draining) = watch::channel(false);
        let shared = Arc::new(Shared {
            config: config.clone(),
            identity,
            anchors,
            resolver,
            http,
            tcp,
            tls,
            active: Arc::new(AtomicUsize::new(0)),
            draining,
            listeners: std::sync::OnceLock::new(),
            admin_listener: std::sync::OnceLock::new(),
        });
        let (outbound, outbound_addr) = bind(config.outbound)?;
        let (inbound, inbound_addr) = bind(config.inbound)?;
        let (outbound_v6, outbound_v6_addr) = match config.outbound_ipv6 {
            Some(addr) => {
                let (l, a) = bind(addr)?;
                (Some(l), Some(a))
            }
            None => (None, None),
        };
        let ready = Readiness::default();
        let shutdown = drain.clone();
        let router = crate::admin::router(Arc::new(registry), ready.clone()).route(
            "/shutdown",
            axum::routing::post(
                move |axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<SocketAddr>| {
                    let shutdown = shutdown.clone();
                    async move {
                        // An IPv4 client of a dual-stack listener is an
                        // IPv4-mapped IPv6 address.
                        if !peer.ip().to_canonical().is_loopback() {
                            return (axum::http::StatusCode::FORBIDDEN, "loopback only\n");
                        }
                        let _ = shutdown.send(true);
                        (axum::http::StatusCode::OK, "shutting down\n")
                    }
                },
            ),
        );
        let admin = AdminServer::bind(config.admin, router)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.admin,
                source,
            })?;
        let _ = shared.listeners.set(
            [outbound_addr, inbound_addr]
                .into_iter()
                .chain(outbound_v6_addr)
                .collect(),
        );
        let _ = shared.admin_listener.set(admin.local_addr());
        let out = outbound::Outbound::new(shared.clone())?;
        let inn = inbound::Inbound::new(shared.clone())?;
        let mut tasks = Vec::new();
        let outbound_slots = Arc::new(Semaphore::new(config.max_connections));
        for listener in std::iter::once(outbound).chain(outbound_v6) {
            let out = out.clone();
            tasks.push(tokio::spawn(accept(
                limited(listener, "outbound", outbound_slots.clone(), &shared),
                shared.clone(),
                move |tcp, s| {
                    let out = out.clone();
                    async move { out.serve(tcp, s).await }
                },
            )));
        }
        tasks.push(tokio::spawn(accept(
            limited(
                inbound,
                "inbound",
                Arc::new(Semaphore::new(config.max_connections)),
                &shared,
            ),
            shared.clone(),
            move |tcp, s| {
                let inn = inn.clone();
                async move { inn.serve(tcp, s).await }
            },
        )));
        // Ready while this proxy has an unexpired certificate (at once,
        // unless the control plane has yet to certify it).
        let certified = shared.identity.clone();
        let readiness = ready.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                certified.certified().await;
                let left = certified
                    .not_after()
                    .duration_since(std::time::SystemTime::now());
                match left {
                    Ok(left) => {
                        readiness.set(true);
                        tokio::time::sleep(left.min(Duration::from_secs(60))).await;
                    }
                    Err(_) => {
                        // Expired: renewals are failing.
                        readiness.set(false);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }));
        if shared.identity.is_certified() {
            ready.set(true);
        }
        tracing::info!(%outbound_addr, outbound_ipv6 = ?outbound_v6_addr, %inbound_addr, admin = %admin.local_addr(), identity = %shared.identity.id(), "proxy started");
        Ok(Self {
            shared,
            outbound_addr,
            outbound_v6_addr,
            inbound_addr,
            admin,
            ready,
            drain,
            tasks,
        })
    }

    /// The outbound listener's address.
    pub fn outbound_addr(&self) -> SocketAddr {
        self.outbound_addr
    }

    /// The IPv6 outbound listener's address, if configured.
    pub fn outbound_ipv6_addr(&self) -> Option<SocketAddr> {
        self.outbound_v6_addr
    }

    /// The inbound listener's address.
    pub fn inbound_addr(&self) -> SocketAddr {
        self.inbound_addr
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr()
    }

    /// Resolves when a drain was asked for (SIGTERM handling is the
    /// binary's; `/shutdown` on the admin port asks too).
    pub async fn drain_requested(&self) {
        let mut rx = self.drain.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    /// Drains: not ready, listeners closed, in-flight connections given
    /// until `shutdown_grace` to finish. Returns how many were cut off.
    pub async fn shutdown(self) -> usize {
        for t in &self.tasks {
            t.abort();
        }
        self.ready.set(false);
        let _ = self.drain.send(true);
        let deadline = tokio::time::Instant::now() + self.shared.config.shutdown_grace;
        while self.shared.active.load(Ordering::Acquire) > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.shared.active.load(Ordering::Acquire)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Serves each connection `listener` accepts, holding its slot until the
/// connection is done.
async fn accept<F, Fut>(listener: LimitedAccept, shared: Arc<Shared>, serve: F)
where
    F: Fn(TcpStream, Arc<Shared>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let (tcp, _, slot) = listener.accept().await;
        let _ = tcp.set_nodelay(true);
        // `map`, not an async block: one awaiting the serving future holds it
        // twice over (captured, and pinned while polled), 0.5 KB more per
        // connection.
        tokio::spawn(serve(tcp, shared.clone()).map(move |()| drop(slot)));
    }
}

/// A data listener of `direction`, sharing `slots` with the direction's
/// other listener ([`ProxyConfig::max_connections`]); each pause at the
/// limit is counted as `connection_limit`.
fn limited(
    tcp: TcpListener,
    direction: &'static str,
    slots: Arc<Semaphore>,
    shared: &Arc<Shared>,
) -> LimitedAccept {
    let shared = shared.clone();
    LimitedAccept::sharing(tcp, slots, direction)
        .on_limit(move || shared.http.error(direction, "connection_limit"))
}

/// The destination of an accepted connection: `SO_ORIGINAL_DST` when
/// transparent, else `fallback`.
pub(crate) fn original_dst(
    tcp: &TcpStream,
    transparent: bool,
    fallback: Option<SocketAddr>,
) -> Option<SocketAddr> {
    if transparent {
        crate::transparent::original_dst(tcp).ok()
    } else {
        fallback
    }
}

/// Resolves once a drain is asked for.
pub(crate) async fn drained(rx: &mut watch::Receiver<bool>) {
    let drained = rx.wait_for(|d| *d).await.is_ok();
    if !drained {
        // The sender is gone: the proxy is being dropped; never resolve.
        std::future::pending::<()>().await;
    }
}

/// Idle pooled HTTP/1 connections kept per upstream: above the
/// concurrency an application usually sees, since a request finding no idle
/// connection opens a new one (at 50 concurrent requests a pool of 32 made
/// one request in seven connect and another connection close).
pub(crate) const MAX_IDLE_PER_HOST: usize = 256;
/// How long a pooled HTTP/1 connection may stay idle.
pub(crate) const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest request head (request line and headers) accepted: over it,
/// HTTP/1 clients get 431 and HTTP/2 clients a stream error.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// A bounded metric reason for a failed HTTP connection.
pub(crate) fn http_error_reason(error: &(dyn std::error::Error + 'static)) -> &'static str {
    match error.downcast_ref::<hyper::Error>() {
        Some(e) if e.is_parse_too_large() => "http_headers_too_large",
        Some(e) if e.is_parse() => "http_parse",
        Some(e) if e.is_timeout() => "http_timeout",
        Some(_) => "http_connection",
        None => "http_connection",
    }
}

/// Counts bytes of opaque forwarding.
pub(crate) fn count_tcp_bytes(
    shared: &Shared,
    direction: &'static str,
    tls: &'static str,
    moved: crate::forward::Transferred,
) {
    for (flow, n) in [("read", moved.a_to_b), ("write", moved.b_to_a)] {
        shared
            .tcp
            .bytes
            .get_or_create(&crate::metrics::TcpBytesLabels {
                direction,
                tls,
                flow,
            })
            .inc_by(n);
    }
}

/// Why a plaintext upstream request failed.
#[derive(Debug)]
pub(crate) enum UpstreamError {
    /// The request target could not be formed.
    BadTarget,
    /// The upstream failed (connect, reset, protocol error).
    Failed(String),
    /// No response headers within the request timeout.
    Timeout,
}

/// Plaintext HTTP to an upstream address, keeping the request's authority:
/// HTTP/1.1 over a bounded pool (the `Host` header carries the authority),
/// HTTP/2 over one multiplexed connection per address (`:authority`).
pub(crate) struct PlainClient {
    http1: crate::http1::Pool,
    http2: crate::http::H2Pool,
    connect_timeout: Duration,
}

impl PlainClient {
    pub(crate) fn new(config: &ProxyConfig) -> Self {
        let http1 = crate::http1::Pool::new(crate::http1::PoolConfig {
            // Bounded idle upstream connections: a burst of client
            // connections must not leave thousands pooled.
            max_idle: MAX_IDLE_PER_HOST,
            idle_timeout: POOL_IDLE_TIMEOUT,
            connect_timeout: config.connect_timeout,
        });
        Self {
            http1,
            http2: crate::http::H2Pool::default(),
            connect_timeout: config.connect_timeout,
        }
    }

    /// Sends `req` (for `authority`) to `target`, hop-by-hop headers
    /// stripped both ways (and the response's `strait-proxy-error`), its
    /// response headers due by `deadline`.
    pub(crate) async fn send(
        &self,
        mut req: http::Request<crate::http::Body>,
        authority: &str,
        target: impl Into<crate::net::Target>,
        deadline: std::time::Instant,
    ) -> Result<http::Response<crate::http::Body>, UpstreamError> {
        let deadline = tokio::time::Instant::from_std(deadline);
        let target = target.into();
        crate::http::strip_hop_by_hop(req.headers_mut());
        let sent = if req.version() == http::Version::HTTP_2 {
            crate::http::retarget(&mut req, authority).map_err(|_| UpstreamError::BadTarget)?;
            req.headers_mut().remove(http::header::HOST);
            // Boxed: HTTP/2 applications are the rarer kind, and every
            // HTTP/1 request's future would otherwise carry this state.
            let f = Box::pin(self.http2.send(target, req, self.connect_timeout));
            tokio::time::timeout_at(deadline, f)
                .await
                .map(|r| r.map_err(|e| e.to_string()))
        } else {
            // Origin form on the wire, the authority in `Host` (CONNECT
            // keeps its authority form).
            if req.method() != http::Method::CONNECT {
                let origin = req
                    .uri()
                    .path_and_query()
                    .map_or_else(|| http::Uri::from_static("/"), |p| p.clone().into());
                *req.uri_mut() = origin;
            }
            if !req.headers().contains_key(http::header::HOST) {
                if let Ok(v) = http::HeaderValue::from_str(authority) {
                    req.headers_mut().insert(http::header::HOST, v);
                }
            }
            tokio::time::timeout_at(deadline, self.http1.send(target, req))
                .await
                .map(|r| r.map_err(|e| e.to_string()))
        };
        match sent {
            Ok(Ok(mut rsp)) => {
                crate::http::strip_hop_by_hop(rsp.headers_mut());
                // Only this proxy marks its own answers: an upstream's
                // marking would make the client proxy take the upstream's
                // 502 for this proxy's and retry it.
                rsp.headers_mut().remove(crate::http::PROXY_ERROR);
                Ok(rsp)
            }
            Ok(Err(e)) => Err(UpstreamError::Failed(e)),
            Err(_) => Err(UpstreamError::Timeout),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_own_listener;
    use std::net::SocketAddr;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    #[test]
    fn own_listeners_are_recognised_by_port_address_and_family() {
        let own = [
            addr("127.0.0.1:4140"),
            addr("0.0.0.0:4143"),
            addr("[::]:4191"),
        ];
        for (target, local, expected) in [
            ("127.0.0.1:4140", false, true),
            ("[::ffff:127.0.0.1]:4140", false, true),
            ("10.1.0.5:4140", true, false),
            // Unspecified IPv4: loopback, or any local IPv4 address.
            ("127.0.0.1:4143", false, true),
            ("10.1.0.5:4143", false, false),
            ("10.1.0.5:4143", true, true),
            ("[fd00::5]:4143", true, false),
            // Unspecified IPv6 (dual-stack): both families.
            ("[fd00::5]:4191", true, true),
            ("10.1.0.5:4191", true, true),
            ("[::1]:4191", false, true),
            ("10.1.0.5:8080", true, false),
        ] {
            assert_eq!(
                is_own_listener(&own, addr(target), local),
                expected,
                "{target} local={local}"
            );
        }
    }
}
