//! The inbound side: connections to the application. Mesh connections
//! (a TLS ClientHello for the mesh name and ALPN) are terminated with
//! mutual TLS, their transport header read, and served as HTTP/2 or
//! forwarded as TCP to the application. Plaintext connections from
//! unmeshed clients are detected and forwarded the same way, unless policy
//! requires mTLS. Any other TLS passes through untouched.
//!
//! When transparent, the application is reached at the address the client
//! dialled (the original destination, one of the pod's own addresses),
//! never on loopback: a port the application binds on `127.0.0.1` only is
//! private to the pod and stays so (as in Linkerd since 2.11 and Istio
//! since 1.10). A mesh connection falls back to the pod's address of the
//! other family when its own refuses (see [`Inbound::target`]). A
//! connection whose original destination is loopback, or not one of the
//! pod's addresses (see [`app_ip`]), is refused and counted
//! (`strait_proxy_errors_total{reason="not_inbound_ip"}`), and so is a
//! target that is one of the proxy's own listeners (`reason="loop"`).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use http::{Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::LazyConfigAcceptor;

use super::{Active, BoxedIo, HttpVersion, PlainClient, Shared, StartError, UpstreamError};
use crate::detect::{detect, Detected, PrefixedIo};
use crate::http::{authority_of, error_response, from_mesh, Body, Observed};
use crate::identity::{identity_of, AllowedPeers, LinkedPeersVerifier};
use crate::mesh::MESH_ALPN;
use crate::metrics::{TcpCloseLabels, TcpLabels};
use crate::net::Target;
use crate::transport::{self, ProtocolHint};

const DIRECTION: &str = "inbound";
/// The TLS server name proxies dial each other with.
pub const MESH_SNI: &str = "strait-proxy";

/// The inbound proxy; cheap to clone.
#[derive(Clone)]
pub(super) struct Inbound(Arc<Inner>);

struct Inner {
    shared: Arc<Shared>,
    tls: Arc<rustls::ServerConfig>,
    plain: PlainClient,
}

impl Inbound {
    pub(super) fn new(shared: Arc<Shared>) -> Result<Self, StartError> {
        let verifier = LinkedPeersVerifier::new(
            shared.anchors.roots(),
            AllowedPeers::any(),
            shared.tls.sink("accept"),
        )?;
        let tls = Arc::new(crate::tls::server_config(
            verifier,
            shared.identity.clone(),
            &[MESH_ALPN],
        )?);
        let plain = PlainClient::new(&shared.config);
        Ok(Self(Arc::new(Inner { shared, tls, plain })))
    }

    /// Serves one accepted connection.
    pub(super) async fn serve(&self, mut tcp: TcpStream, shared: Arc<Shared>) {
        let _active = Active::new(&shared.active);
        let started = Instant::now();
        let orig = if shared.config.transparent {
            // No conntrack entry: the connection was not redirected, so it
            // was going where it arrived.
            crate::transparent::original_dst(&tcp)
                .or_else(|_| tcp.local_addr())
                .ok()
        } else {
            shared.config.inbound_target
        };
        let Some(orig) = orig else {
            shared.http.error(DIRECTION, "no_destination");
            return;
        };
        let local = tcp.local_addr().ok();
        let Some(app) = app_ip(&shared.config, orig.ip(), local.map(|a| a.ip())) else {
            // Anyone who can send the pod a packet can make these: counted,
            // and logged at debug only.
            tracing::debug!(%orig, "refusing an inbound connection to an address not the pod's");
            shared.http.error(DIRECTION, "not_inbound_ip");
            return;
        };
        if shared.config.transparent && redirected_from_itself(orig, local, tcp.peer_addr().ok()) {
            // Only the proxy's own connection to the application, sent
            // back here by a rule that should not exist (`init` from
            // another version), looks like this; forwarding it would loop.
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| tracing::warn!(%orig, "refusing connections from this pod redirected to the inbound port (counted as loops): are the iptables rules from another version of strait-proxy init?"));
            shared.http.error(DIRECTION, "loop");
            return;
        }
        // A connection that fails before it is known for what it is (a
        // reset in its first bytes) is counted: as a `detect` error, the
        // kind the mesh path counts (its TCP open is not counted yet).
        let (proto, prefix) = match detect(&mut tcp, shared.config.detect_timeout).await {
            Ok(d) => d,
            Err(error) => {
                tracing::debug!(%error, "inbound detection failed");
                shared.http.error(DIRECTION, "detect");
                return;
            }
        };
        let prefix = if proto == Detected::Tls {
            match crate::detect::complete_tls_record(&mut tcp, prefix, shared.config.detect_timeout)
                .await
            {
                Ok(p) => p,
                Err(error) => {
                    tracing::debug!(%error, "reading an inbound ClientHello failed");
                    shared.http.error(DIRECTION, "detect");
                    return;
                }
            }
        } else {
            prefix
        };
        let mesh = proto == Detected::Tls && is_mesh_hello(&prefix);
        let tls = if mesh { "true" } else { "false" };
        let labels = TcpLabels {
            direction: DIRECTION,
            tls,
        };
        shared.tcp.opens.get_or_create(&labels).inc();
        let io = PrefixedIo::new(prefix, tcp);
        let ok = if mesh {
            self.serve_mesh(io, app).await
        } else if shared.config.require_mtls {
            tracing::info!("refusing a plaintext inbound connection (mTLS required)");
            shared.http.error(DIRECTION, "mtls_required");
            false
        } else {
            match self.target(app, orig.port(), false) {
                Some(target) => self.serve_detected(io, proto, target, "false").await,
                None => false,
            }
        };
        shared
            .tcp
            .closes
            .get_or_create(&TcpCloseLabels {
                direction: DIRECTION,
                tls,
                result: if ok { "ok" } else { "error" },
            })
            .inc();
        shared
            .tcp
            .duration
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
    }

    /// The application's socket address for `port`, unless that is one of
    /// this proxy's own listeners (counted as a loop). For a `mesh`
    /// connection in a dual-stack pod, the pod's address of the other
    /// family is the fallback: the client's proxy or the gateway picked
    /// the endpoint's family, not the application, so an application on
    /// `0.0.0.0` must not be lost to an IPv6 endpoint (nor one on IPv6 only
    /// to an IPv4 endpoint). Plaintext clients picked their family
    /// themselves and get no fallback, as without a mesh.
    fn target(&self, app: IpAddr, port: u16, mesh: bool) -> Option<Target> {
        let shared = &self.0.shared;
        let own = |addr: SocketAddr| {
            shared.is_own_listener(addr, shared.config.transparent)
                || shared.is_admin_on_loopback(addr)
        };
        let addr = SocketAddr::new(app, port);
        if own(addr) {
            tracing::info!(target = %addr, "refusing an inbound connection to this proxy's own listener");
            shared.http.error(DIRECTION, "loop");
            return None;
        }
        let fallback = mesh
            .then(|| other_family(&shared.config, app))
            .flatten()
            .map(|ip| SocketAddr::new(ip, port))
            .filter(|a| !own(*a));
        Some(Target { addr, fallback })
    }

    async fn serve_mesh(&self, io: PrefixedIo<TcpStream>, app: IpAddr) -> bool {
        let shared = &self.0.shared;
        let handshake = async {
            let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io).await?;
            let tls = start.into_stream(self.0.tls.clone()).await?;
            Ok::<_, std::io::Error>(tls)
        };
        let mut tls = match tokio::time::timeout(shared.config.setup_timeout(), handshake).await {
            Ok(Ok(t)) => t,
            Ok(Err(error)) => {
                tracing::info!(%error, "inbound mesh handshake failed");
                shared.http.error(DIRECTION, "tls_handshake");
                return false;
            }
            Err(_) => {
                shared.http.error(DIRECTION, "tls_handshake_timeout");
                return false;
            }
        };
        let client = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(identity_of)
            .map(|id| id.to_string())
            .unwrap_or_default();
        let header =
            match tokio::time::timeout(shared.config.setup_timeout(), transport::read(&mut tls))
                .await
            {
                Ok(Ok(h)) => h,
                Ok(Err(error)) => {
                    tracing::info!(%client, %error, "bad transport header");
                    shared.http.error(DIRECTION, error.reason());
                    return false;
                }
                Err(_) => {
                    shared.http.error(DIRECTION, "header_timeout");
                    return false;
                }
            };
        let Ok(port) = u16::try_from(header.port) else {
            return false;
        };
        let Some(target) = self.target(app, port, true) else {
            return false;
        };
        match ProtocolHint::try_from(header.protocol) {
            Ok(ProtocolHint::Http2) => {
                self.serve_detected(tls, Detected::Http2, target, "true")
                    .await
            }
            // The client does not know what it carries (a gateway relaying
            // a peer cluster's stream): detected here, as a plaintext
            // client's connection is, unless the port is opaque.
            Ok(ProtocolHint::Unknown) if !shared.config.opaque_ports.contains(&port) => {
                let (proto, prefix) = match detect(&mut tls, shared.config.detect_timeout).await {
                    Ok(d) => d,
                    Err(error) => {
                        tracing::debug!(%client, %error, "detection in a mesh stream failed");
                        shared.http.error(DIRECTION, "detect");
                        return false;
                    }
                };
                self.serve_detected(PrefixedIo::new(prefix, tls), proto, target, "true")
                    .await
            }
            _ => self.forward_tcp(tls, target, "true").await,
        }
    }

    /// Serves a connection by its protocol: HTTP/1, HTTP/2 (its frames
    /// gathered into fewer writes, and over TLS fewer records), or the
    /// bytes as they come.
    async fn serve_detected<I>(
        &self,
        io: I,
        proto: Detected,
        target: Target,
        tls: &'static str,
    ) -> bool
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        // HTTP is served over a boxed connection: one copy of hyper's and
        // h2's server code for the six kinds of connection (plain or TLS,
        // bytes read ahead or not, HTTP/2 buffered), and outbound's, rather
        // than one each saves 430 KB of the executable, nearly all of it
        // resident, for a virtual call per read or write.
        match proto {
            Detected::Http1 => {
                self.serve_http(Box::new(io), HttpVersion::Http1, target, tls)
                    .await
            }
            Detected::Http2 => {
                let buffered = tokio::io::BufWriter::with_capacity(crate::mesh::WRITE_BUFFER, io);
                self.serve_http(Box::new(buffered), HttpVersion::Http2, target, tls)
                    .await
            }
            _ => self.forward_tcp(io, target, tls).await,
        }
    }

    async fn serve_http(
        &self,
        io: Box<dyn BoxedIo>,
        version: HttpVersion,
        target: Target,
        tls: &'static str,
    ) -> bool {
        let this = self.clone();
        let shared = self.0.shared.clone();
        let handle: super::Handler = Arc::new(move |req| {
            let this = this.clone();
            Box::pin(async move { this.handle(req, target, tls).await })
        });
        super::serve_http(io, version, &shared, DIRECTION, handle).await
    }

    async fn handle(
        &self,
        mut req: Request<Body>,
        target: Target,
        tls: &'static str,
    ) -> Response<Body> {
        let started = Instant::now();
        let shared = &self.0.shared;
        // The application answers a request whatever its Host; one that
        // names no valid authority is counted under the application's
        // port, never under a label of the client's making.
        let authority = authority_of(&req)
            .ok()
            .flatten()
            .unwrap_or_else(|| format!("localhost:{}", target.addr.port()));
        let route = shared.http.route(DIRECTION, &authority, tls);
        route.request();
        if crate::http::is_upgrade(&req) {
            // Rare, and its state large: boxed, so every plain request's
            // future stays small.
            let on_end = super::upgraded(shared, DIRECTION, tls);
            let upgrade = Box::pin(async move {
                // (A connect that times out is a 502; only a response head
                // that does not come in time is a 504.)
                let tcp = target
                    .connect(shared.config.connect_timeout)
                    .await
                    .map_err(std::io::Error::other)?;
                crate::http::upgrade_via(req, tcp, shared.config.request_timeout, on_end).await
            });
            let rsp = upgrade.await.unwrap_or_else(|error| {
                tracing::info!(%target, %error, "upgrade to the application failed");
                if error.kind() == std::io::ErrorKind::TimedOut {
                    shared.http.error(DIRECTION, "timeout");
                    return error_response(StatusCode::GATEWAY_TIMEOUT, "application timed out");
                }
                shared.http.error(DIRECTION, "upstream");
                error_response(StatusCode::BAD_GATEWAY, "application unavailable")
            });
            return Observed::wrap(rsp, route, started);
        }
        // Only a peer proxy says which version the application spoke; from
        // any other client the marking is dropped, not followed.
        let req = if tls == "true" {
            from_mesh(req)
        } else {
            req.headers_mut().remove(crate::http::ORIG_PROTO);
            req
        };
        let rsp = match self
            .0
            .plain
            .send(
                req,
                &authority,
                target,
                started + shared.config.request_timeout,
            )
            .await
        {
            Ok(rsp) => rsp,
            Err(UpstreamError::BadTarget) => {
                error_response(StatusCode::BAD_REQUEST, "bad request target")
            }
            Err(UpstreamError::Failed(error)) => {
                tracing::info!(%target, %error, "application request failed");
                shared.http.error(DIRECTION, "upstream");
                error_response(StatusCode::BAD_GATEWAY, "application unavailable")
            }
            Err(UpstreamError::Timeout) => {
                shared.http.error(DIRECTION, "timeout");
                error_response(StatusCode::GATEWAY_TIMEOUT, "application timed out")
            }
        };
        Observed::wrap(rsp, route, started)
    }

    async fn forward_tcp<I>(&self, mut io: I, target: Target, tls: &'static str) -> bool
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        let shared = &self.0.shared;
        let mut app = match target.connect(shared.config.connect_timeout).await {
            Ok(a) => a,
            Err(error) => {
                tracing::info!(%target, %error, "application refused the connection");
                shared.http.error(DIRECTION, "connect");
                return false;
            }
        };
        let (moved, result) = crate::forward::splice(&mut io, &mut app).await;
        super::count_tcp_bytes(shared, DIRECTION, tls, moved);
        result.is_ok()
    }
}

/// The application's address for a connection to `orig` that arrived on
/// `local` (pure): when transparent, `orig` itself, unless it is loopback
/// or not one of the pod's addresses ([`ProxyConfig::inbound_ips`], or
/// with none given the address the connection was delivered to, which
/// for a redirected one is the incoming interface's primary address: the
/// `nat` redirect takes a packet for any address, and the proxy must not
/// dial one a neighbour chose for it); else `--inbound-target`'s
/// (`orig`).
///
/// [`ProxyConfig::inbound_ips`]: super::ProxyConfig::inbound_ips
fn app_ip(config: &super::ProxyConfig, orig: IpAddr, local: Option<IpAddr>) -> Option<IpAddr> {
    if !config.transparent {
        return Some(orig);
    }
    let ip = orig.to_canonical();
    if ip.is_loopback() || ip.is_unspecified() {
        return None;
    }
    let allowed = if config.inbound_ips.is_empty() {
        local.map(|l| l.to_canonical()) == Some(ip)
    } else {
        config.inbound_ips.iter().any(|i| i.to_canonical() == ip)
    };
    allowed.then_some(ip)
}

/// Whether a connection was redirected to the inbound port from another
/// port (the original destination's port is not the one it arrived on)
/// although it comes from the very address it was going to: from this pod
/// to itself. The rules redirect no such connection (the proxy's own are
/// left alone, and `PREROUTING` never sees local ones), so it can only be
/// the inbound side's own connection to the application coming round
/// again. (A connection to the inbound port itself, the outbound side's
/// mesh connection to its own pod, is not one, however it was routed.)
fn redirected_from_itself(
    orig: SocketAddr,
    local: Option<SocketAddr>,
    peer: Option<SocketAddr>,
) -> bool {
    let redirected = local.is_some_and(|l| l.port() != orig.port());
    redirected && peer.is_some_and(|p| p.ip().to_canonical() == orig.ip().to_canonical())
}

/// The pod's address of the other family than `ip`'s, if it has one
/// (pure).
fn other_family(config: &super::ProxyConfig, ip: IpAddr) -> Option<IpAddr> {
    if !config.transparent {
        return None;
    }
    config
        .inbound_ips
        .iter()
        .map(|i| i.to_canonical())
        .find(|i| i.is_ipv4() != ip.is_ipv4())
}

/// Whether a ClientHello (fully in `prefix`) is for the mesh: our server
/// name and ALPN. Anything else is the application's own TLS.
fn is_mesh_hello(prefix: &[u8]) -> bool {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rd = prefix;
    while !rd.is_empty() {
        if acceptor.read_tls(&mut rd).is_err() {
            return false;
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => {
            let hello = accepted.client_hello();
            hello.server_name() == Some(MESH_SNI)
                && hello
                    .alpn()
                    .is_some_and(|mut protos| protos.any(|p| p == MESH_ALPN))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::super::ProxyConfig;
    use super::{app_ip, other_family, redirected_from_itself};
    use std::net::{IpAddr, SocketAddr};

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn transparent(inbound_ips: &[&str]) -> ProxyConfig {
        ProxyConfig {
            transparent: true,
            inbound_ips: inbound_ips.iter().map(|s| ip(s)).collect(),
            ..ProxyConfig::default()
        }
    }

    #[test]
    fn the_application_is_reached_only_at_one_of_the_pods_addresses() {
        let pod = transparent(&["10.1.0.5", "fd00::5"]);
        let local = Some(ip("10.1.0.5"));
        for (orig, expected) in [
            ("10.1.0.5", Some("10.1.0.5")),
            ("fd00::5", Some("fd00::5")),
            // An IPv4 client of a dual-stack listener.
            ("::ffff:10.1.0.5", Some("10.1.0.5")),
            // A destination a neighbour chose: the metadata service...
            ("169.254.169.254", None),
            // ...loopback, directly or mapped.
            ("127.0.0.1", None),
            ("::ffff:127.0.0.1", None),
            ("::1", None),
            ("0.0.0.0", None),
        ] {
            assert_eq!(app_ip(&pod, ip(orig), local), expected.map(ip), "{orig}");
        }
        // No addresses given: only the one the connection arrived on.
        let bare = transparent(&[]);
        assert_eq!(app_ip(&bare, ip("10.1.0.5"), local), Some(ip("10.1.0.5")));
        assert_eq!(app_ip(&bare, ip("169.254.169.254"), local), None);
        assert_eq!(app_ip(&bare, ip("127.0.0.1"), Some(ip("127.0.0.1"))), None);
        assert_eq!(app_ip(&bare, ip("10.1.0.5"), None), None);
        // Not transparent: --inbound-target's address, whatever it is.
        let explicit = ProxyConfig::default();
        assert_eq!(
            app_ip(&explicit, ip("127.0.0.1"), None),
            Some(ip("127.0.0.1"))
        );
    }

    #[test]
    fn the_other_family_is_the_pods_other_address() {
        let dual = transparent(&["fd00::5", "10.1.0.5"]);
        assert_eq!(other_family(&dual, ip("fd00::5")), Some(ip("10.1.0.5")));
        assert_eq!(other_family(&dual, ip("10.1.0.5")), Some(ip("fd00::5")));
        let v6_only = transparent(&["fd00::5"]);
        assert_eq!(other_family(&v6_only, ip("fd00::5")), None);
        let explicit = ProxyConfig::default();
        assert_eq!(other_family(&explicit, ip("::1")), None);
    }

    #[test]
    fn a_connection_from_the_pod_to_itself_redirected_inbound_is_a_loop() {
        let a = |s: &str| Some(s.parse::<SocketAddr>().expect("addr"));
        let orig = "10.1.0.5:8080".parse().expect("addr");
        // The inbound side's own connection, redirected by a stale rule.
        assert!(redirected_from_itself(
            orig,
            a("127.0.0.1:4143"),
            a("10.1.0.5:40000")
        ));
        assert!(redirected_from_itself(
            orig,
            a("[::ffff:10.1.0.5]:4143"),
            a("[::ffff:10.1.0.5]:40000")
        ));
        // Another pod's connection, redirected as it should be.
        assert!(!redirected_from_itself(
            orig,
            a("10.1.0.5:4143"),
            a("10.1.0.9:40000")
        ));
        // The proxy's own mesh connection to its own inbound port, whether
        // or not a stale rule sent it through loopback.
        let mesh = "10.1.0.5:4143".parse().expect("addr");
        assert!(!redirected_from_itself(
            mesh,
            a("10.1.0.5:4143"),
            a("10.1.0.5:40000")
        ));
        assert!(!redirected_from_itself(
            mesh,
            a("127.0.0.1:4143"),
            a("10.1.0.5:40000")
        ));
    }
}
