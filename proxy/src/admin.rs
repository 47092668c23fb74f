//! The admin HTTP server: `/metrics`, `/ready` and `/live`; components add
//! their own routes (the gateway's `/api/...`) to [`router`]'s result.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::registry::Registry;

/// Whether the component is ready for traffic; cheap to clone and share.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Marks ready (`true`) or not.
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }

    /// Whether ready.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// The OpenMetrics content type served by `/metrics`.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The base admin routes over `registry` and `ready`.
pub fn router(registry: Arc<Registry>, ready: Readiness) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move {
                    (
                        [(header::CONTENT_TYPE, OPENMETRICS)],
                        crate::metrics::encode(&registry),
                    )
                }
            }),
        )
        .route(
            "/ready",
            get(move || {
                let ready = ready.clone();
                async move {
                    if ready.get() {
                        (StatusCode::OK, "ready\n").into_response()
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
                    }
                }
            }),
        )
        .route("/live", get(|| async { "live\n" }))
}

/// A running admin server.
#[derive(Debug)]
pub struct AdminServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl AdminServer {
    /// Binds `addr` ([`crate::net::bind_listener`]: `[::]` takes IPv4
    /// too) and serves `router` until dropped. Handlers may take the
    /// client's address (`ConnectInfo<SocketAddr>`), e.g. to allow an
    /// endpoint from loopback only (an IPv4 client of `[::]` is an
    /// IPv4-mapped address: compare `to_canonical()`).
    ///
    /// The port is reachable from the whole cluster (probes, Prometheus),
    /// so it is served with [`AdminLimits`], which `axum::serve` does not
    /// set, over HTTP/1.1 only.
    pub async fn bind(addr: SocketAddr, router: Router) -> std::io::Result<Self> {
        Self::bind_with(addr, router, AdminLimits::default()).await
    }

    /// [`AdminServer::bind`] with other limits.
    pub async fn bind_with(
        addr: SocketAddr,
        router: Router,
        limits: AdminLimits,
    ) -> std::io::Result<Self> {
        let listener = crate::net::bind_listener(addr)?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(serve(listener, router, limits));
        Ok(Self { addr, task })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What admin clients may hold.
#[derive(Clone, Copy, Debug)]
pub struct AdminLimits {
    /// Connections served at once (default 64); more wait in the listen
    /// queue.
    pub max_connections: usize,
    /// Connections served at once from one client address (default 8);
    /// more are closed when accepted. The kubelet's probes, from the
    /// node's address, and Prometheus each need one or two, and a client
    /// holding many cannot starve them.
    pub per_source: usize,
    /// How long a client may take to send a request head, and so stay
    /// idle between requests, or to take an answer (default 10 s).
    pub header_timeout: std::time::Duration,
}

impl Default for AdminLimits {
    fn default() -> Self {
        Self {
            max_connections: 64,
            per_source: 8,
            header_timeout: std::time::Duration::from_secs(10),
        }
    }
}

async fn serve(listener: tokio::net::TcpListener, router: Router, limits: AdminLimits) {
    use tower::ServiceExt as _;
    let listener = crate::net::LimitedAccept::new(listener, limits.max_connections, "admin")
        .per_source(limits.per_source);
    loop {
        let (tcp, remote, slot) = listener.accept().await;
        let router = router.clone();
        tokio::spawn(async move {
            let _slot = slot;
            // What `ConnectInfo<SocketAddr>` extracts.
            let service = hyper::service::service_fn(move |mut req: http::Request<_>| {
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo(remote));
                router.clone().oneshot(req)
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(
                    hyper_util::rt::TokioIo::new(crate::net::WriteDeadline::new(
                        tcp,
                        limits.header_timeout,
                    )),
                    service,
                )
                .await;
            if let Err(error) = served {
                tracing::debug!(%remote, %error, "admin connection ended");
            }
        });
    }
}

/// Resolves on SIGTERM (how Kubernetes stops a pod) or Ctrl-C: what every
/// Strait binary waits for before draining.
pub async fn terminated() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// Reads until the peer closes (or 10 s pass): what arrived.
    async fn read_all(s: &mut TcpStream) -> String {
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Idle or slow clients cannot hold the admin port: beyond the
    /// connection limit a client waits, and a connection that sends no
    /// complete head within the header timeout is closed, letting it in.
    /// The client's address reaches the handlers.
    #[tokio::test]
    async fn slow_clients_are_limited_and_cut_off() {
        let router = router(Arc::new(Registry::default()), Readiness::default()).route(
            "/whoami",
            get(
                |axum::extract::ConnectInfo(remote): axum::extract::ConnectInfo<SocketAddr>| async move {
                    remote.to_string()
                },
            ),
        );
        let limits = AdminLimits {
            max_connections: 2,
            per_source: 2,
            header_timeout: Duration::from_secs(1),
        };
        let server = AdminServer::bind_with("127.0.0.1:0".parse().expect("addr"), router, limits)
            .await
            .expect("bind");
        let addr = server.local_addr();
        let started = Instant::now();
        let mut silent = TcpStream::connect(addr).await.expect("connect");
        let mut partial = TcpStream::connect(addr).await.expect("connect");
        partial
            .write_all(b"GET /live HTTP/1.1\r\n")
            .await
            .expect("write");
        let mut third = TcpStream::connect(addr).await.expect("connect");
        let request = "GET /whoami HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n";
        third.write_all(request.as_bytes()).await.expect("write");
        let mut early = [0u8; 1];
        let waited = tokio::time::timeout(Duration::from_millis(300), third.read(&mut early)).await;
        assert!(waited.is_err(), "served beyond the limit");
        // Both slow connections are closed at the header timeout.
        assert_eq!(read_all(&mut silent).await, "");
        assert_eq!(read_all(&mut partial).await, "");
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(900), "{took:?}");
        let rsp = read_all(&mut third).await;
        assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
        let me = third.local_addr().expect("addr").to_string();
        assert!(rsp.ends_with(&me), "{rsp} (from {me})");
    }

    /// A client that sends requests and never reads the answers is cut off
    /// once its answers stall, and its slot taken again.
    #[tokio::test]
    async fn a_client_that_never_reads_is_cut_off() {
        let limits = AdminLimits {
            max_connections: 8,
            per_source: 1,
            header_timeout: Duration::from_millis(300),
        };
        let router = router(Arc::new(Registry::default()), Readiness::default());
        let server = AdminServer::bind_with("127.0.0.1:0".parse().expect("addr"), router, limits)
            .await
            .expect("bind");
        let addr = server.local_addr();
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("small buffer");
        let stalled = socket.connect(addr).await.expect("connect");
        let (_unread, mut writer) = stalled.into_split();
        let flood = tokio::spawn(async move {
            let get = b"GET /live HTTP/1.1\r\nhost: a\r\n\r\n".repeat(1000);
            for _ in 0..1000 {
                if writer.write_all(&get).await.is_err() {
                    break;
                }
            }
        });
        let get = "GET /live HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n";
        let started = Instant::now();
        let mut served = false;
        while started.elapsed() < Duration::from_secs(10) {
            let mut again = TcpStream::connect(addr).await.expect("connect");
            let _ = again.write_all(get.as_bytes()).await;
            if read_all(&mut again).await.starts_with("HTTP/1.1 200") {
                served = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        flood.abort();
        assert!(served, "the stalled connection kept its address's slot");
    }

    /// One address holding its share of connections cannot keep another
    /// out: its next connection is closed at once, another address's is
    /// served, and a slot given back is taken again.
    #[tokio::test]
    async fn one_address_cannot_take_every_slot() {
        let limits = AdminLimits {
            max_connections: 8,
            per_source: 2,
            header_timeout: Duration::from_secs(30),
        };
        let router = router(Arc::new(Registry::default()), Readiness::default());
        let server = AdminServer::bind_with("127.0.0.1:0".parse().expect("addr"), router, limits)
            .await
            .expect("bind");
        let addr = server.local_addr();
        let from = |ip: &str| {
            let ip: std::net::IpAddr = ip.parse().expect("ip");
            async move {
                let socket = tokio::net::TcpSocket::new_v4().expect("socket");
                socket.bind(SocketAddr::new(ip, 0)).expect("bind");
                socket.connect(addr).await.expect("connect")
            }
        };
        let get = "GET /live HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n";
        let held = [from("127.0.0.1").await, from("127.0.0.1").await];
        let mut third = from("127.0.0.1").await;
        let _ = third.write_all(get.as_bytes()).await;
        let started = Instant::now();
        assert_eq!(read_all(&mut third).await, "", "closed, not served");
        assert!(started.elapsed() < Duration::from_secs(5));
        let mut other = from("127.0.0.2").await;
        other.write_all(get.as_bytes()).await.expect("write");
        assert!(read_all(&mut other).await.starts_with("HTTP/1.1 200"));
        drop(held);
        // The server sees the close, then the address has room again.
        let mut served = false;
        for _ in 0..50 {
            let mut again = from("127.0.0.1").await;
            let _ = again.write_all(get.as_bytes()).await;
            if read_all(&mut again).await.starts_with("HTTP/1.1 200") {
                served = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(served, "slots given back");
    }
}
