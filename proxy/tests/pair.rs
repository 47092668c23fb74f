//! A client proxy and a server proxy with mutual TLS between them, for
//! HTTP/1.1, HTTP/2, gRPC (unary and streaming, trailers and error status)
//! and raw TCP; plus bad input and the wrong identity.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Version};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::registry::Registry;
use strait_proxy::discovery::{Destination, Endpoint, StaticResolver};
use strait_proxy::identity::{
    generate_issuer, generate_root, CertStore, Issuer, SpiffeId, TrustAnchors,
};
use strait_proxy::sidecar::{Proxy, ProxyConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TD: &str = "test.strait.local";

static HITS: std::sync::LazyLock<std::sync::Mutex<HashMap<String, u32>>> =
    std::sync::LazyLock::new(Default::default);

fn hits(tag: &str) -> u32 {
    HITS.lock().expect("lock").get(tag).copied().unwrap_or(0)
}

fn identity(issuer: &Issuer, sa: &str) -> Arc<CertStore> {
    let id = SpiffeId::workload(TD, "demo", sa).expect("id");
    CertStore::new(&issuer.issue(&id, Duration::from_secs(3600)).expect("leaf")).expect("store")
}

/// The application behind the server proxy: HTTP/1 and HTTP/2; `/grpc/*`
/// answers like gRPC (trailers), `/slow` waits, everything else echoes
/// the version and path.
async fn app() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|mut req: Request<Incoming>| async move {
                    let path = req.uri().path().to_string();
                    if path == "/ws" && req.headers().contains_key("upgrade") {
                        let upgrade = hyper::upgrade::on(&mut req);
                        tokio::spawn(async move {
                            if let Ok(up) = upgrade.await {
                                let mut io = TokioIo::new(up);
                                let mut buf = [0u8; 64];
                                while let Ok(n) = io.read(&mut buf).await {
                                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                                        break;
                                    }
                                }
                            }
                        });
                        let rsp = Response::builder()
                            .status(101)
                            .header("connection", "upgrade")
                            .header("upgrade", "echo")
                            .body(
                                Full::new(Bytes::new())
                                    .map_err(|never| match never {})
                                    .boxed(),
                            )
                            .expect("101");
                        return Ok::<_, String>(rsp);
                    }
                    if let Some(tag) = path.strip_prefix("/marked/") {
                        // An application's 502 dressed as a proxy's.
                        *HITS
                            .lock()
                            .expect("lock")
                            .entry(tag.to_string())
                            .or_insert(0) += 1;
                        let rsp = Response::builder()
                            .status(502)
                            .header("strait-proxy-error", "true")
                            .body(
                                Full::new(Bytes::from_static(b"app says no"))
                                    .map_err(|never| match never {})
                                    .boxed(),
                            )
                            .expect("502");
                        return Ok::<_, String>(rsp);
                    }
                    if let Some(tag) = path.strip_prefix("/once/") {
                        // Fails (closes the connection) the first time a
                        // tag is seen; counts every hit.
                        let first = {
                            let mut hits = HITS.lock().expect("lock");
                            let n = hits.entry(tag.to_string()).or_insert(0);
                            *n += 1;
                            *n == 1
                        };
                        if first {
                            return Err("first hit fails".to_string());
                        }
                    }
                    let version = format!("{:?}", req.version());
                    let host = req
                        .headers()
                        .get("host")
                        .and_then(|h| h.to_str().ok())
                        .unwrap_or(req.uri().authority().map_or("", |a| a.as_str()))
                        .to_string();
                    let body = req
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    if path.starts_with("/grpc/") {
                        let code = if path.ends_with("fail") { "7" } else { "0" };
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", code.parse().expect("value"));
                        let frames = vec![
                            Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"\0\0\0\0\x02hi"))),
                            Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\x02yo"))),
                            Ok(Frame::trailers(trailers)),
                        ];
                        let rsp = Response::builder()
                            .header("content-type", "application/grpc")
                            .body(StreamBody::new(futures::stream::iter(frames)).boxed())
                            .expect("response");
                        return Ok::<_, String>(rsp);
                    }
                    let text = format!("{version} {path} host={host} body={}", body.len());
                    Ok(Response::new(
                        Full::new(Bytes::from(text))
                            .map_err(|never| match never {})
                            .boxed(),
                    ))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

async fn echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

struct Pair {
    client: Proxy,
    server: Proxy,
    app: SocketAddr,
    client_registry: Registry,
}

/// Every listener on a free loopback port.
fn local_config() -> ProxyConfig {
    ProxyConfig {
        outbound: loopback(),
        inbound: loopback(),
        admin: loopback(),
        ..Default::default()
    }
}

/// A proxy with no discovery, as the server side of a test.
async fn server_proxy(config: ProxyConfig, id: &Arc<CertStore>, anchors: &TrustAnchors) -> Proxy {
    Proxy::start(
        config,
        id.clone(),
        anchors.clone(),
        Arc::new(StaticResolver::default()),
        Registry::default(),
    )
    .await
    .expect("server proxy")
}

/// A fresh root and issuer for the test trust domain: the issuer and the
/// anchors.
fn trust() -> (Issuer, TrustAnchors) {
    strait_proxy::tls::install_default_provider();
    let root = generate_root("test").expect("root");
    let pem = generate_issuer(&root, TD).expect("issuer");
    let issuer = Issuer::from_pem(pem.cert_pem.as_bytes(), pem.key_pem.as_bytes()).expect("issuer");
    let anchors = TrustAnchors::from_pem(root.cert_pem.as_bytes(), "root").expect("anchors");
    (issuer, anchors)
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

async fn pair(server_id_expected: Option<SpiffeId>) -> Pair {
    pair_listening(server_id_expected, loopback(), None).await
}

/// [`pair`] with the server proxy's inbound listener on `server_inbound`
/// and the client proxy's IPv6 outbound listener on `client_outbound_v6`.
async fn pair_listening(
    server_id_expected: Option<SpiffeId>,
    server_inbound: SocketAddr,
    client_outbound_v6: Option<SocketAddr>,
) -> Pair {
    strait_proxy::tls::install_default_provider();
    strait_proxy::cli::test_logs();
    let (issuer, anchors) = trust();
    let app = app().await;
    let echo = echo().await;
    let server_identity = identity(&issuer, "web");
    let server = server_proxy(
        ProxyConfig {
            inbound: server_inbound,
            inbound_target: Some(app),
            ..local_config()
        },
        &server_identity,
        &anchors,
    )
    .await;
    let expected = server_id_expected.unwrap_or_else(|| server_identity.id().clone());
    let mut table = HashMap::new();
    table.insert(
        "web.demo:80".to_string(),
        one_endpoint(app, Some(expected.clone()), false),
    );
    table.insert(echo.to_string(), one_endpoint(echo, Some(expected), false));
    table.insert("plain.demo:80".to_string(), one_endpoint(app, None, false));
    let client_registry = Registry::default();
    let client = Proxy::start(
        ProxyConfig {
            outbound: loopback(),
            outbound_ipv6: client_outbound_v6,
            inbound: loopback(),
            admin: loopback(),
            inbound_target: Some(app),
            outbound_target: Some(echo),
            peer_inbound_port: server.inbound_addr().port(),
            ..Default::default()
        },
        identity(&issuer, "client"),
        anchors,
        Arc::new(strait_proxy::discovery::Chain(vec![
            Box::new(StaticResolver::new(table)),
            Box::new(strait_proxy::discovery::DnsResolver::default()),
        ])),
        Registry::default(),
    )
    .await
    .expect("client proxy");
    Pair {
        client,
        server,
        app,
        client_registry,
    }
}

async fn raw_http1(addr: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The metrics text once it contains `needle` (counters of a finished
/// response or connection land a moment after the client is done), or as
/// it is after 10 s.
async fn metrics_containing(proxy: &Proxy, needle: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = metrics(proxy).await;
        if m.contains(needle) || std::time::Instant::now() > deadline {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn metrics(proxy: &Proxy) -> String {
    let rsp = raw_http1(
        proxy.admin_addr(),
        "GET /metrics HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .await;
    rsp.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_through_the_mesh() {
    let p = pair(None).await;
    let rsp = raw_http1(
        p.client.outbound_addr(),
        "POST /hello HTTP/1.1\r\nhost: web.demo\r\ncontent-length: 5\r\nconnection: close\r\n\r\nabcde",
    )
    .await;
    assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
    assert!(
        rsp.ends_with("HTTP/1.1 /hello host=web.demo body=5"),
        "{rsp}"
    );
    let c = metrics_containing(
        &p.client,
        r#"strait_proxy_requests_total{direction="outbound",authority="web.demo:80",tls="true"} 1"#,
    )
    .await;
    assert!(c.contains(r#"strait_proxy_requests_total{direction="outbound",authority="web.demo:80",tls="true"} 1"#), "{c}");
    // The server side counts the authority the client named.
    let s = metrics_containing(&p.server, r#"strait_proxy_responses_total{direction="inbound",authority="web.demo",tls="true",status_class="2xx",grpc_status=""} 1"#).await;
    assert!(s.contains(r#"strait_proxy_responses_total{direction="inbound",authority="web.demo",tls="true",status_class="2xx",grpc_status=""} 1"#), "{s}");
    let _ = (&p.app, &p.client_registry);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_and_grpc_through_the_mesh() {
    let p = pair(None).await;
    let tcp = TcpStream::connect(p.client.outbound_addr())
        .await
        .expect("connect");
    let (mut send, conn) = hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await
    .expect("h2");
    tokio::spawn(conn);
    // Without a port, the server sees what the client sent, not the port
    // the proxy routes with.
    for (uri, seen) in [
        (
            "http://web.demo:80/two",
            &b"HTTP/2.0 /two host=web.demo:80 body=0"[..],
        ),
        (
            "http://web.demo/two",
            &b"HTTP/2.0 /two host=web.demo body=0"[..],
        ),
    ] {
        let req = Request::builder()
            .uri(uri)
            .version(Version::HTTP_2)
            .body(Full::new(Bytes::new()))
            .expect("req");
        let rsp = send.send_request(req).await.expect("response");
        let body = rsp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], seen, "{uri}");
    }
    for (path, status) in [("/grpc/ok", "0"), ("/grpc/fail", "7")] {
        let req = Request::builder()
            .method("POST")
            .uri(format!("http://web.demo:80{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
            .expect("req");
        let rsp = send.send_request(req).await.expect("response");
        let collected = rsp.into_body().collect().await.expect("body");
        let trailers = collected.trailers().cloned().expect("trailers kept");
        assert_eq!(trailers["grpc-status"], status);
        assert_eq!(collected.to_bytes().len(), 14, "both messages");
    }
    // Each response is counted when its body ends, after the trailers
    // the client waited for: wait for both counts.
    for status in ["7", "0"] {
        let needle = format!(r#"grpc_status="{status}"}} 1"#);
        let c = metrics_containing(&p.client, &needle).await;
        assert!(c.contains(&needle), "{c}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tcp_through_the_mesh() {
    let p = pair(None).await;
    let mut s = TcpStream::connect(p.client.outbound_addr())
        .await
        .expect("connect");
    // A server-speaks-first style pause, then binary bytes.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let payload: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    s.write_all(&payload).await.expect("write");
    s.shutdown().await.expect("half-close");
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.expect("read");
    assert_eq!(back, payload, "byte for byte through mTLS");
    // The bytes are counted once the splice has shut the stream down,
    // which is what ended the read above: wait for the count.
    let counted = r#"strait_tcp_bytes_total{direction="inbound",tls="true",flow="read"} 100000"#;
    let srv = metrics_containing(&p.server, counted).await;
    assert!(srv.contains(counted), "{srv}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmeshed_destinations_get_plain_http() {
    let p = pair(None).await;
    let rsp = raw_http1(
        p.client.outbound_addr(),
        "GET /p HTTP/1.1\r\nhost: plain.demo\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(rsp.ends_with("HTTP/1.1 /p host=plain.demo body=0"), "{rsp}");
    let c = metrics_containing(&p.client, r#"authority="plain.demo:80",tls="false"} 1"#).await;
    assert!(
        c.contains(r#"authority="plain.demo:80",tls="false"} 1"#),
        "{c}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_the_wrong_identity_is_refused_and_counted() {
    let wrong = SpiffeId::workload(TD, "demo", "impostor").expect("id");
    let p = pair(Some(wrong)).await;
    let rsp = raw_http1(
        p.client.outbound_addr(),
        "GET / HTTP/1.1\r\nhost: web.demo\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(rsp.starts_with("HTTP/1.1 502"), "{rsp}");
    let c = metrics(&p.client).await;
    assert!(
        c.contains(
            r#"strait_tls_handshake_failures_total{side="connect",reason="unexpected_identity"}"#
        ),
        "{c}"
    );
    // Still serving.
    let rsp = raw_http1(
        p.client.outbound_addr(),
        "GET /p HTTP/1.1\r\nhost: plain.demo\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_requests() {
    let p = pair(None).await;
    let bad = raw_http1(
        p.client.outbound_addr(),
        "GET / HTTP/1.1\r\nhost: web.demo\r\nbad header line\r\n\r\n",
    )
    .await;
    assert!(bad.starts_with("HTTP/1.1 400"), "{bad:?}");
    let big = format!(
        "GET / HTTP/1.1\r\nhost: web.demo\r\nx-big: {}\r\n\r\n",
        "a".repeat(200_000)
    );
    let rsp = raw_http1(p.client.outbound_addr(), &big).await;
    assert!(rsp.starts_with("HTTP/1.1 431"), "{rsp:?}");
    // A Host that is no authority, or two of them, is never looked up or
    // made a metric label. With no original destination to fall back
    // on, it is refused (400, counted).
    let hosts = ["host: web demo\r\n", "host: web.demo\r\nhost: api.demo\r\n"];
    let request = |h: &str| format!("GET / HTTP/1.1\r\n{h}connection: close\r\n\r\n");
    let lone = served().await;
    for h in hosts {
        let rsp = raw_http1(lone.server.outbound_addr(), &request(h)).await;
        assert!(rsp.starts_with("HTTP/1.1 400"), "{rsp:?}");
    }
    let m = metrics(&lone.server).await;
    assert!(m.contains("reason=\"bad_host\"} 2\n"), "{m}");
    // Otherwise it goes where it was going, as it is, and the server there
    // answers it: the application behind the inbound side, or the
    // original destination (here an echo server, which is no HTTP server).
    for h in hosts {
        let rsp = raw_http1(p.server.inbound_addr(), &request(h)).await;
        assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp:?}");
        let rsp = raw_http1(p.client.outbound_addr(), &request(h)).await;
        assert!(rsp.starts_with("HTTP/1.1 502"), "{rsp:?}");
    }
    for proxy in [&p.client, &p.server, &lone.server] {
        let m = metrics(proxy).await;
        assert!(!m.contains("web demo") && !m.contains("api.demo"), "{m}");
    }
    let ok = raw_http1(
        p.client.outbound_addr(),
        "GET /x HTTP/1.1\r\nhost: web.demo\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200"), "still serving: {ok}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_is_retried_when_its_endpoint_fails_and_a_post_is_not() {
    let p = pair(None).await;
    for host in ["web.demo", "plain.demo"] {
        let get = format!("get-{host}");
        let rsp = raw_http1(
            p.client.outbound_addr(),
            &format!("GET /once/{get} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n"),
        )
        .await;
        assert!(rsp.starts_with("HTTP/1.1 200"), "{host}: {rsp}");
        assert_eq!(hits(&get), 2, "{host}: retried once");
        let post = format!("post-{host}");
        let rsp = raw_http1(
            p.client.outbound_addr(),
            &format!("POST /once/{post} HTTP/1.1\r\nhost: {host}\r\ncontent-length: 2\r\nconnection: close\r\n\r\nhi"),
        )
        .await;
        assert!(rsp.starts_with("HTTP/1.1 502"), "{host}: {rsp}");
        assert_eq!(hits(&post), 1, "{host}: a POST is never retried");
    }
    let c = metrics_containing(
        &p.client,
        r#"strait_proxy_retries_total{direction="outbound",result="retried"} 2"#,
    )
    .await;
    assert!(
        c.contains(r#"strait_proxy_retries_total{direction="outbound",result="retried"} 2"#),
        "{c}"
    );
}

/// The body of an HTTP/2 `GET http://web.demo{path}` sent to `addr` in
/// plaintext, marked `strait-orig-proto: HTTP/1.1` as a client proxy marks
/// an HTTP/1.1 request.
async fn marked_h2_get(addr: SocketAddr, path: &str) -> Bytes {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (mut h2, conn) = hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await
    .expect("handshake");
    tokio::spawn(conn);
    let req = Request::get(format!("http://web.demo{path}"))
        .header("strait-orig-proto", "HTTP/1.1")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let rsp = h2.send_request(req).await.expect("response");
    rsp.into_body().collect().await.expect("body").to_bytes()
}

/// Marks only a proxy may set are not taken from anyone else: an
/// application's `strait-proxy-error` does not make its 502 look like the
/// server proxy's (which the client proxy would retry), and a plaintext
/// client's or an application's `strait-orig-proto` does not choose the
/// version spoken to the application (and HTTP/1.0 reaches it as HTTP/1.0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_marks_are_not_taken_from_applications_or_plain_clients() {
    let p = pair(None).await;
    for host in ["web.demo", "plain.demo"] {
        let tag = format!("marked-{host}");
        let rsp = raw_http1(
            p.client.outbound_addr(),
            &format!("GET /marked/{tag} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n"),
        )
        .await;
        assert!(rsp.starts_with("HTTP/1.1 502"), "{host}: {rsp}");
        assert!(
            rsp.ends_with("app says no"),
            "the application's own answer: {rsp}"
        );
        assert!(!rsp.contains("strait-proxy-error"), "{host}: {rsp}");
        assert_eq!(
            hits(&tag),
            1,
            "{host}: the application's 502 is not retried"
        );
    }
    // A plaintext HTTP/2 client of the server proxy's inbound listener,
    // then an application's HTTP/2 request through the mesh: neither
    // marking is taken for the client proxy's.
    for (addr, path) in [
        (p.server.inbound_addr(), "/v"),
        (p.client.outbound_addr(), "/m"),
    ] {
        let body = marked_h2_get(addr, path).await;
        assert!(
            body.starts_with(format!("HTTP/2.0 {path}").as_bytes()),
            "sent on as HTTP/2: {}",
            String::from_utf8_lossy(&body)
        );
    }
    // And HTTP/1.0 reaches the application as HTTP/1.0.
    let rsp = raw_http1(
        p.client.outbound_addr(),
        "GET /old HTTP/1.0\r\nhost: web.demo\r\n\r\n",
    )
    .await;
    assert!(rsp.contains("HTTP/1.0 /old"), "{rsp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_pass_through_meshed_and_plain() {
    let p = pair(None).await;
    let mut upgraded = Vec::new();
    for host in ["web.demo", "plain.demo"] {
        let mut s = TcpStream::connect(p.client.outbound_addr())
            .await
            .expect("connect");
        s.write_all(
            format!(
                "GET /ws HTTP/1.1\r\nhost: {host}\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .expect("write");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).await.expect("head");
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_string();
        assert!(head.starts_with("HTTP/1.1 101"), "{host}: {head}");
        s.write_all(b"ping over the upgraded connection")
            .await
            .expect("write");
        let mut back = vec![0u8; 33];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
            .await
            .expect("in time")
            .expect("echo");
        assert_eq!(&back, b"ping over the upgraded connection", "{host}");
        upgraded.push(s);
    }
    // Closed, an upgraded connection's bytes are counted as TCP's.
    let close = |mut s: TcpStream| async move {
        s.shutdown().await.expect("half-close");
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    };
    let (meshed, plain) = (upgraded.remove(0), upgraded.remove(0));
    close(plain).await;
    let counted = r#"strait_tcp_bytes_total{direction="outbound",tls="false",flow="read"} 33"#;
    let m = metrics_containing(&p.client, counted).await;
    assert!(m.contains(counted), "{m}");
    // Open, it is in flight: a drain waits for it.
    let drain = tokio::spawn(p.client.shutdown());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!drain.is_finished(), "the drain did not wait");
    close(meshed).await;
    let cut = tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .expect("drained once closed")
        .expect("join");
    assert_eq!(cut, 0);
    // The server proxy got the meshed one as an opaque mesh stream: all
    // of it, the upgrade request (72 bytes) too, is TCP there.
    let counted = r#"strait_tcp_bytes_total{direction="inbound",tls="true",flow="read"} 105"#;
    let m = metrics_containing(&p.server, counted).await;
    assert!(m.contains(counted), "{m}");
}

/// An application that takes connections and never answers: an upgrade
/// waits for its response head no longer than the request timeout (504,
/// counted), and the proxy keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_the_application_never_answers_times_out() {
    let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = silent.accept().await {
            held.push(tcp);
        }
    });
    let (issuer, anchors) = trust();
    let proxy = server_proxy(
        ProxyConfig {
            inbound_target: Some(silent_addr),
            request_timeout: Duration::from_millis(500),
            ..local_config()
        },
        &identity(&issuer, "web"),
        &anchors,
    )
    .await;
    let mut s = TcpStream::connect(proxy.inbound_addr())
        .await
        .expect("connect");
    let started = std::time::Instant::now();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nhost: web.demo\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n",
    )
    .await
    .expect("write");
    let rsp = read_response(&mut s, &mut Vec::new()).await;
    assert!(rsp.starts_with("HTTP/1.1 504"), "{rsp}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    let timeouts = r#"strait_proxy_errors_total{direction="inbound",reason="timeout"} 1"#;
    let m = metrics_containing(&proxy, timeouts).await;
    assert!(m.contains(timeouts), "{m}");
}

/// An HTTP/2 client that stops answering pings (gone without a FIN) is
/// closed after the keepalive interval and timeout; one that answers keeps
/// its connection, idle, and can still send requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_stops_answering_pings_is_closed() {
    const KEEPALIVE: Duration = Duration::from_millis(500);
    let served = served_with(ProxyConfig {
        http2_keepalive: KEEPALIVE,
        ..local_config()
    })
    .await;
    let addr = served.server.inbound_addr();
    // A client that completes the handshake, then neither reads nor
    // writes: the server's pings go unanswered.
    let mut dead = TcpStream::connect(addr).await.expect("connect");
    let settings = [0u8, 0, 0, 4, 0, 0, 0, 0, 0];
    let settings_ack = [0u8, 0, 0, 4, 1, 0, 0, 0, 0];
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&settings);
    hello.extend_from_slice(&settings_ack);
    dead.write_all(&hello).await.expect("write");
    let started = std::time::Instant::now();
    // A live client alongside.
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await
    .expect("h2");
    let live = tokio::spawn(conn);
    // (Reading only to see the end: what arrives is never answered.)
    let mut sink = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(10), dead.read_to_end(&mut sink)).await;
    assert!(ended.is_ok(), "still open 10 s later");
    let took = started.elapsed();
    assert!(took >= KEEPALIVE, "{took:?}");
    assert!(took < KEEPALIVE * 6, "{took:?}");
    tokio::time::sleep(KEEPALIVE * 3).await;
    assert!(!live.is_finished(), "the live connection was closed");
    let req = Request::builder()
        .uri("http://web.demo/still")
        .version(Version::HTTP_2)
        .body(Full::new(Bytes::new()))
        .expect("req");
    let rsp = send.send_request(req).await.expect("response");
    let body = rsp.into_body().collect().await.expect("body").to_bytes();
    assert!(body.ends_with(b"/still host=web.demo body=0"), "{body:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_reset_before_it_is_detected_is_counted() {
    let p = pair(None).await;
    // Its first byte, then a reset: no protocol, no bytes for anyone, but
    // a connection all the same.
    for first in [&b"G"[..], &[0x16, 0x03, 0x01, 0x40, 0x00, 0x01][..]] {
        let s = TcpStream::connect(p.server.inbound_addr())
            .await
            .expect("connect");
        let _ = s.try_write(first);
        tokio::time::sleep(Duration::from_millis(50)).await;
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .expect("linger");
        drop(s);
    }
    let detect = r#"strait_proxy_errors_total{direction="inbound",reason="detect"} 2"#;
    let m = metrics_containing(&p.server, detect).await;
    assert!(m.contains(detect), "{m}");
    // Still serving.
    let rsp = raw_http1(
        p.client.outbound_addr(),
        "GET / HTTP/1.1\r\nhost: web.demo\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_to_the_proxy_itself_is_refused_not_looped() {
    let p = pair(None).await;
    let own = p.client.outbound_addr();
    let rsp = raw_http1(
        own,
        &format!("GET / HTTP/1.1\r\nhost: {own}\r\nconnection: close\r\n\r\n"),
    )
    .await;
    assert!(rsp.starts_with("HTTP/1.1 508"), "{rsp}");
    // An upgrade too (it takes its endpoints the same way).
    let rsp = raw_http1(
        own,
        &format!(
            "GET / HTTP/1.1\r\nhost: {own}\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"
        ),
    )
    .await;
    assert!(rsp.starts_with("HTTP/1.1 508"), "{rsp}");
}

/// A server that speaks first: it sends a banner on connect.
async fn banner() -> SocketAddr {
    let l = TcpListener::bind(loopback()).await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = s.write_all(b"220 hello\r\n").await;
                let mut buf = [0u8; 64];
                let _ = s.read(&mut buf).await;
            });
        }
    });
    addr
}

/// How long a client of an outbound proxy (whose original destination is
/// the banner server) waits for the banner.
async fn banner_wait(opaque: bool) -> Duration {
    let (issuer, anchors) = trust();
    let target = banner().await;
    let mut table = HashMap::new();
    table.insert(target.to_string(), one_endpoint(target, None, opaque));
    let client = Proxy::start(
        ProxyConfig {
            outbound: loopback(),
            inbound: loopback(),
            admin: loopback(),
            outbound_target: Some(target),
            inbound_target: Some(target),
            detect_timeout: Duration::from_secs(3),
            ..Default::default()
        },
        identity(&issuer, "client"),
        anchors,
        Arc::new(StaticResolver::new(table)),
        Registry::default(),
    )
    .await
    .expect("client proxy");
    let started = std::time::Instant::now();
    let mut s = TcpStream::connect(client.outbound_addr())
        .await
        .expect("connect");
    let mut buf = [0u8; 11];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .expect("the banner within 5 s")
        .expect("read");
    assert_eq!(&buf, b"220 hello\r\n");
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_marks_a_server_speaks_first_port_opaque() {
    // Opaque by discovery: forwarded at once, never held for detection.
    let fast = banner_wait(true).await;
    assert!(fast < Duration::from_secs(2), "{fast:?}");
    // Without the hint the proxy waits for the client's first bytes until
    // the detection timeout, then forwards as TCP (the same bytes).
    let slow = banner_wait(false).await;
    assert!(slow >= Duration::from_millis(2900), "{slow:?}");
}

/// Reads one HTTP/1 response (head and content-length body) from `s`;
/// `buf` carries bytes read past it (the next of pipelined responses).
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> String {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|v| v.trim().parse().ok())
                .expect("a content-length");
            if buf.len() >= end + 4 + len {
                let rsp = String::from_utf8_lossy(&buf[..end + 4 + len]).into_owned();
                buf.drain(..end + 4 + len);
                return rsp;
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("a response in time")
            .expect("read");
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(buf));
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Waits (up to 10 s) for the client proxy to have `n` parked connections
/// (no sample at all counts as none).
async fn parked(proxy: &Proxy, n: u32) {
    let prefix = "strait_proxy_parked_connections{direction=\"outbound\"} ";
    let count = |m: &str| {
        m.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|v| v.trim().parse::<u32>().ok())
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = metrics(proxy).await;
        if count(&m) == n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "expected {n} parked: {m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_parked_and_resumed() {
    let p = pair(None).await;
    let mut s = TcpStream::connect(p.client.outbound_addr())
        .await
        .expect("connect");
    let mut carry = Vec::new();
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nhost: web.demo\r\n\r\n");
    s.write_all(get("/one").as_bytes()).await.expect("write");
    let rsp = read_response(&mut s, &mut carry).await;
    assert!(rsp.ends_with("/one host=web.demo body=0"), "{rsp}");

    // Idle past PARK_AFTER: hyper's state is dropped, the socket kept.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    parked(&p.client, 1).await;
    s.write_all(get("/two").as_bytes()).await.expect("write");
    let rsp = read_response(&mut s, &mut carry).await;
    assert!(rsp.ends_with("/two host=web.demo body=0"), "{rsp}");

    // A request head cut in two around a park: what hyper had read is
    // replayed into the next connection.
    let three = get("/three");
    let (a, b) = three.split_at(10);
    s.write_all(a.as_bytes()).await.expect("write");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    parked(&p.client, 1).await;
    s.write_all(b.as_bytes()).await.expect("write");
    let rsp = read_response(&mut s, &mut carry).await;
    assert!(rsp.ends_with("/three host=web.demo body=0"), "{rsp}");

    // Pipelined requests after a park are answered in order; keep-alive
    // is never refused.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    parked(&p.client, 1).await;
    s.write_all(format!("{}{}", get("/four"), get("/five")).as_bytes())
        .await
        .expect("write");
    let four = read_response(&mut s, &mut carry).await;
    let five = read_response(&mut s, &mut carry).await;
    assert!(carry.is_empty(), "nothing after the second response");
    assert!(four.ends_with("/four host=web.demo body=0"), "{four}");
    assert!(five.ends_with("/five host=web.demo body=0"), "{five}");
    for rsp in [&four, &five] {
        assert!(
            !rsp.to_ascii_lowercase().contains("connection: close"),
            "{rsp}"
        );
    }
    // Closed while parked: the connection ends cleanly.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    parked(&p.client, 1).await;
    drop(s);
    parked(&p.client, 0).await;
    let m = metrics(&p.client).await;
    assert!(
        !m.contains("strait_proxy_errors_total{direction=\"outbound\""),
        "{m}"
    );
    let _ = (&p.app, &p.client_registry);
}

/// Past `max_connections` in a direction the listener stops accepting:
/// the next connection waits in the listen backlog, unanswered, until one
/// closes, and the pause is counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_wait_for_one_to_close() {
    let s = served_with(ProxyConfig {
        max_connections: 2,
        ..local_config()
    })
    .await;
    let inbound = s.server.inbound_addr();
    let first = answered_once(inbound).await;
    let mut second = answered_once(inbound).await;
    let mut third = TcpStream::connect(inbound).await.expect("connect");
    third
        .write_all(b"GET /three HTTP/1.1\r\nhost: web.demo\r\n\r\n")
        .await
        .expect("write");
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(500), third.read(&mut byte)).await;
    assert!(early.is_err(), "answered past the limit: {early:?}");
    let paused = "strait_proxy_errors_total{direction=\"inbound\",reason=\"connection_limit\"} 1\n";
    let m = metrics_containing(&s.server, paused).await;
    assert!(m.contains(paused), "{m}");
    // The connections held still serve, and the limit is per direction:
    // the outbound listener has slots of its own.
    second
        .write_all(b"GET /again HTTP/1.1\r\nhost: web.demo\r\n\r\n")
        .await
        .expect("write");
    let rsp = read_response(&mut second, &mut Vec::new()).await;
    assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
    let out = raw_http1(
        s.server.outbound_addr(),
        "GET / HTTP/1.1\r\nhost: nowhere.demo\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 "), "outbound not served: {out:?}");
    drop(first);
    let rsp = read_response(&mut third, &mut Vec::new()).await;
    assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
}

/// The IPv4 and IPv6 outbound listeners share one limit without either
/// holding a slot while idle: with a limit of one, connections taking
/// turns on both are each served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_listeners_share_their_limit_without_holding_it() {
    let s = served_with(ProxyConfig {
        max_connections: 1,
        outbound_ipv6: Some("[::1]:0".parse().expect("addr")),
        ..local_config()
    })
    .await;
    let v4 = s.server.outbound_addr();
    let v6 = s.server.outbound_ipv6_addr().expect("an IPv6 listener");
    for addr in [v4, v4, v6, v6, v4] {
        let rsp = raw_http1(
            addr,
            "GET / HTTP/1.1\r\nhost: nowhere.demo\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(rsp.starts_with("HTTP/1.1 "), "{addr} not served: {rsp:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_last_request_had_a_body_is_not_parked() {
    let p = pair(None).await;
    let mut s = TcpStream::connect(p.client.outbound_addr())
        .await
        .expect("connect");
    let mut carry = Vec::new();
    let post = "POST /p HTTP/1.1\r\nhost: web.demo\r\ncontent-length: 3\r\n\r\nabc";
    s.write_all(post.as_bytes()).await.expect("write");
    let rsp = read_response(&mut s, &mut carry).await;
    assert!(rsp.ends_with("/p host=web.demo body=3"), "{rsp}");
    // Its body may not have been read to the end (hyper would close the
    // connection then): it stays with hyper, and keeps working.
    tokio::time::sleep(Duration::from_millis(2300)).await;
    parked(&p.client, 0).await;
    s.write_all(b"GET /after HTTP/1.1\r\nhost: web.demo\r\n\r\n")
        .await
        .expect("write");
    let rsp = read_response(&mut s, &mut carry).await;
    assert!(rsp.ends_with("/after host=web.demo body=0"), "{rsp}");
    // After a bodiless request it is parked again.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    parked(&p.client, 1).await;
    let _ = (&p.app, &p.client_registry);
}

/// How long after `since` the proxy closed `s` (a read of end of file or
/// an error); fails if it is still open 10 s later.
async fn closed_after(s: &mut TcpStream, since: std::time::Instant) -> Duration {
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "still open 10 s later");
    since.elapsed()
}

/// Writes a byte to `s` every 200 ms until a write fails.
async fn drip(mut s: TcpStream) -> TcpStream {
    let mut ticks = tokio::time::interval(Duration::from_millis(200));
    loop {
        ticks.tick().await;
        if s.write_all(b"a").await.is_err() {
            return s;
        }
    }
}

/// A keep-alive connection to `addr` that has had `request` answered
/// (200), and the answer.
async fn answered(addr: SocketAddr, request: &[u8]) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write");
    let rsp = read_response(&mut s, &mut Vec::new()).await;
    assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
    (s, rsp)
}

/// [`answered`] for a GET.
async fn answered_once(addr: SocketAddr) -> TcpStream {
    answered(addr, b"GET /one HTTP/1.1\r\nhost: web.demo\r\n\r\n")
        .await
        .0
}

/// A client that sends a request head slower than the header timeout is
/// cut off and counted, whether it dribbles the head out or pauses long
/// enough to be parked halfway (the head's time runs on while parked); an
/// idle connection is not, and one that cannot be parked is closed at the
/// same timeout without being counted. The cases run side by side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_heads_time_out() {
    const TIMEOUT: Duration = Duration::from_secs(3);
    // Closed no earlier than the timeout, and no later than twice it (a
    // head split by a park: its time before the park, then hyper's timer
    // anew), with room for a loaded machine.
    let in_time = |took: Duration| {
        assert!(took >= TIMEOUT - Duration::from_millis(100), "{took:?}");
        assert!(took < TIMEOUT * 2 + Duration::from_millis(1500), "{took:?}");
    };
    let served = served_with(ProxyConfig {
        http1_header_timeout: TIMEOUT,
        ..local_config()
    })
    .await;
    let proxy = &served.server;
    let addr = proxy.inbound_addr();

    // A head dribbled out a byte at a time, never finished.
    let dribbled = async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let started = std::time::Instant::now();
        s.write_all(b"GET /drip HTTP/1.1\r\nhost: web.demo\r\nx-drip: ")
            .await
            .expect("write");
        let mut s = tokio::time::timeout(Duration::from_secs(10), drip(s))
            .await
            .expect("cut off within 10 s");
        in_time(closed_after(&mut s, started).await);
    };
    // Half a next head, then silence: parked, and closed when the head is
    // due.
    let parked_halfway = async {
        let mut s = answered_once(addr).await;
        let started = std::time::Instant::now();
        s.write_all(b"GET /two HTTP/1.1\r\n").await.expect("write");
        in_time(closed_after(&mut s, started).await);
    };
    // Half a next head, parked, then dribbled: the connection hyper resumes
    // it on has its own timer.
    let resumed = async {
        let mut s = answered_once(addr).await;
        let started = std::time::Instant::now();
        s.write_all(b"GET /three HTTP/1.1\r\n")
            .await
            .expect("write");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut s = tokio::time::timeout(Duration::from_secs(10), drip(s))
            .await
            .expect("cut off within 10 s");
        in_time(closed_after(&mut s, started).await);
    };
    // Half a head pipelined behind a whole one, then silence: it began
    // before the park, and is held to its time there too.
    let pipelined = async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let started = std::time::Instant::now();
        s.write_all(b"GET /p1 HTTP/1.1\r\nhost: web.demo\r\n\r\nGET /p2 HTTP/1.1\r\n")
            .await
            .expect("write");
        let rsp = read_response(&mut s, &mut Vec::new()).await;
        assert!(rsp.ends_with("/p1 host=web.demo body=0"), "{rsp}");
        in_time(closed_after(&mut s, started).await);
    };
    // Not parked after a request with a body: closed at the header
    // timeout, as an idle keep-alive connection may be, and not counted.
    let idle_after_body = async {
        let post = b"POST /p HTTP/1.1\r\nhost: web.demo\r\ncontent-length: 3\r\n\r\nabc";
        let (mut s, rsp) = answered(addr, post).await;
        assert!(rsp.ends_with("body=3"), "{rsp}");
        let took = closed_after(&mut s, std::time::Instant::now()).await;
        assert!(took >= TIMEOUT - Duration::from_millis(500), "{took:?}");
    };
    // Idle and parked, a connection waits as long as it likes.
    let idle_parked = async {
        let mut s = answered_once(addr).await;
        tokio::time::sleep(TIMEOUT + Duration::from_secs(1)).await;
        s.write_all(b"GET /b HTTP/1.1\r\nhost: web.demo\r\n\r\n")
            .await
            .expect("write");
        let rsp = read_response(&mut s, &mut Vec::new()).await;
        assert!(rsp.ends_with("/b host=web.demo body=0"), "{rsp}");
    };
    tokio::join!(
        dribbled,
        parked_halfway,
        resumed,
        pipelined,
        idle_after_body,
        idle_parked
    );
    let timeouts = r#"strait_proxy_errors_total{direction="inbound",reason="http_timeout"} 4"#;
    let m = metrics_containing(proxy, timeouts).await;
    assert!(m.contains(&format!("{timeouts}\n")), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_makes_the_proxy_unready() {
    strait_proxy::tls::install_default_provider();
    let root = generate_root("test").expect("root");
    let pem = generate_issuer(&root, TD).expect("issuer");
    let issuer = Issuer::from_pem(pem.cert_pem.as_bytes(), pem.key_pem.as_bytes()).expect("issuer");
    let id = SpiffeId::workload(TD, "demo", "short").expect("id");
    let leaf = issuer.issue(&id, Duration::from_secs(4)).expect("leaf");
    let proxy = Proxy::start(
        ProxyConfig {
            outbound: loopback(),
            inbound: loopback(),
            admin: loopback(),
            inbound_target: Some(loopback()),
            ..Default::default()
        },
        CertStore::new(&leaf).expect("store"),
        TrustAnchors::from_pem(root.cert_pem.as_bytes(), "root").expect("anchors"),
        Arc::new(StaticResolver::default()),
        Registry::default(),
    )
    .await
    .expect("proxy");
    let ready = || async {
        raw_http1(
            proxy.admin_addr(),
            "GET /ready HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
        )
        .await
    };
    assert!(ready().await.starts_with("HTTP/1.1 200"));
    // Unready once the leaf expires (4 s), and no later than a loaded
    // machine lets the expiry timer run.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let rsp = ready().await;
        if rsp.starts_with("HTTP/1.1 503") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still: {rsp}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A mesh connection whose client does not know the protocol (a gateway
/// relaying a peer cluster's stream): the server proxy detects HTTP inside
/// the TLS and serves and counts it as requests; on an opaque port it
/// forwards at once (a server-speaks-first banner is not held).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_stream_of_unknown_protocol_is_detected_unless_its_port_is_opaque() {
    use strait_proxy::transport::ProtocolHint;

    let (issuer, anchors) = trust();
    let app = app().await;
    let banner = banner().await;
    let server_identity = identity(&issuer, "web");
    let server = server_proxy(
        ProxyConfig {
            inbound_target: Some(app),
            opaque_ports: vec![banner.port()],
            detect_timeout: Duration::from_secs(10),
            ..local_config()
        },
        &server_identity,
        &anchors,
    )
    .await;
    let mesh = mesh_client(&issuer, &anchors, "gateway");

    let mut tls = mesh
        .connect(
            server.inbound_addr(),
            server_identity.id(),
            app.port(),
            ProtocolHint::Unknown,
        )
        .await
        .expect("mesh connect");
    tls.write_all(b"GET /hello HTTP/1.1\r\nhost: web.demo\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    tls.flush().await.expect("flush");
    let mut rsp = Vec::new();
    let _ = tls.read_to_end(&mut rsp).await;
    let rsp = String::from_utf8_lossy(&rsp);
    assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
    let m = metrics_containing(&server, r#"tls="true""#).await;
    assert!(
        m.lines()
            .any(|l| l.starts_with("strait_proxy_requests_total{")
                && l.contains(r#"direction="inbound""#)
                && l.contains(r#"tls="true""#)),
        "an HTTP request, counted: {m}"
    );

    // The opaque port: the banner arrives long before the detection
    // timeout (10 s) would have let it through.
    let started = std::time::Instant::now();
    let mut tls = mesh
        .connect(
            server.inbound_addr(),
            server_identity.id(),
            banner.port(),
            ProtocolHint::Unknown,
        )
        .await
        .expect("mesh connect");
    let mut buf = [0u8; 11];
    tokio::time::timeout(Duration::from_secs(5), tls.read_exact(&mut buf))
        .await
        .expect("the banner within 5 s")
        .expect("read");
    assert_eq!(&buf, b"220 hello\r\n");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// A destination of one endpoint, `identity` when meshed.
fn one_endpoint(addr: SocketAddr, identity: Option<SpiffeId>, opaque: bool) -> Destination {
    Destination {
        endpoints: vec![Endpoint {
            addr,
            identity,
            weight: 1,
        }],
        opaque,
    }
}

/// A server proxy (identity `web`) in front of [`app`], and its trust.
struct Served {
    issuer: Issuer,
    anchors: TrustAnchors,
    app: SocketAddr,
    server_identity: Arc<CertStore>,
    server: Proxy,
}

async fn served() -> Served {
    served_with(local_config()).await
}

/// [`served`], the server proxy configured by `config` (its inbound
/// target set to the application).
async fn served_with(config: ProxyConfig) -> Served {
    let (issuer, anchors) = trust();
    let app = app().await;
    let server_identity = identity(&issuer, "web");
    let server = server_proxy(
        ProxyConfig {
            inbound_target: Some(app),
            ..config
        },
        &server_identity,
        &anchors,
    )
    .await;
    Served {
        issuer,
        anchors,
        app,
        server_identity,
        server,
    }
}

/// A raw mesh client (as a gateway relaying a peer's stream is) with the
/// identity of service account `sa`.
fn mesh_client(
    issuer: &Issuer,
    anchors: &TrustAnchors,
    sa: &str,
) -> strait_proxy::mesh::MeshClient {
    strait_proxy::mesh::MeshClient::new(
        identity(issuer, sa),
        anchors.roots(),
        strait_proxy::metrics::TlsMetrics::register(&mut Registry::default()).sink("test"),
        Duration::from_secs(3),
    )
}

/// A mesh header naming the server proxy's own inbound port, or its
/// admin port on loopback (where `POST /shutdown` would pass for the
/// pod's own), is refused and counted as a loop; the proxy keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_header_naming_the_proxys_own_ports_is_refused() {
    use strait_proxy::transport::ProtocolHint;

    let Served {
        issuer,
        anchors,
        app: _,
        server_identity,
        server,
    } = served().await;
    let mesh = mesh_client(&issuer, &anchors, "peer");
    for (n, port) in [server.admin_addr().port(), server.inbound_addr().port()]
        .into_iter()
        .enumerate()
    {
        let mut tls = mesh
            .connect(
                server.inbound_addr(),
                server_identity.id(),
                port,
                ProtocolHint::Unknown,
            )
            .await
            .expect("mesh connect");
        let _ = tls
            .write_all(b"POST /shutdown HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
            .await;
        let _ = tls.flush().await;
        let mut rsp = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rsp)).await;
        assert!(
            rsp.is_empty(),
            "port {port}: {}",
            String::from_utf8_lossy(&rsp)
        );
        let loops = format!(
            r#"strait_proxy_errors_total{{direction="inbound",reason="loop"}} {}"#,
            n + 1
        );
        metrics_containing(&server, &loops).await;
    }
    // Still serving: the admin port was never reached.
    let ready = raw_http1(
        server.admin_addr(),
        "GET /ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack_listeners() {
    // The server's inbound listener on [::] takes the client proxy's IPv4
    // mesh connection; the client's IPv6 outbound listener serves an
    // application connecting over IPv6 loopback.
    let p = pair_listening(
        None,
        "[::]:0".parse().expect("addr"),
        Some("[::1]:0".parse().expect("addr")),
    )
    .await;
    assert!(p.server.inbound_addr().is_ipv6());
    let v6 = p
        .client
        .outbound_ipv6_addr()
        .expect("an IPv6 outbound listener");
    assert!(v6.ip().is_loopback() && v6.is_ipv6(), "{v6}");
    for addr in [p.client.outbound_addr(), v6] {
        let rsp = raw_http1(
            addr,
            "GET /dual HTTP/1.1\r\nhost: web.demo\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(rsp.starts_with("HTTP/1.1 200"), "{addr}: {rsp}");
        assert!(rsp.ends_with("/dual host=web.demo body=0"), "{addr}: {rsp}");
    }
    let m = metrics_containing(
        &p.client,
        "strait_proxy_requests_total{direction=\"outbound\",authority=\"web.demo:80\",tls=\"true\"} 2",
    )
    .await;
    assert!(
        m.contains("strait_proxy_requests_total{direction=\"outbound\",authority=\"web.demo:80\",tls=\"true\"} 2"),
        "{m}"
    );
    let _ = (&p.app, &p.client_registry);
}

/// Seeded random input (rand's `StdRng`: a failure reproduces).
struct Rng(rand::rngs::StdRng);

impl Rng {
    fn seeded(seed: u64) -> Self {
        use rand::SeedableRng;
        Self(rand::rngs::StdRng::seed_from_u64(seed))
    }

    fn below(&mut self, n: usize) -> usize {
        use rand::Rng as _;
        self.0.random_range(0..n.max(1))
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        use rand::Rng as _;
        let mut v = vec![0u8; len];
        self.0.fill(&mut v[..]);
        v
    }

    /// `seed` with a few random edits: flipped, inserted, deleted or
    /// repeated bytes, or cut short.
    fn mutate(&mut self, seed: &[u8]) -> Vec<u8> {
        let mut v = seed.to_vec();
        for _ in 0..=self.below(4) {
            let at = self.below(v.len() + 1);
            match self.below(5) {
                0 if at < v.len() => v[at] ^= 1 << self.below(8),
                1 => v.insert(at, self.bytes(1)[0]),
                2 if at < v.len() => {
                    v.remove(at);
                }
                3 => {
                    let end = (at + self.below(16)).min(v.len());
                    let chunk = v[at..end].to_vec();
                    v.splice(at..at, chunk);
                }
                _ => v.truncate(at),
            }
        }
        v
    }

    /// The HTTP/2 preface (sometimes damaged) and a few frames with random
    /// type, flags, stream and payload.
    fn h2_frames(&mut self) -> Vec<u8> {
        let mut v = if self.below(8) == 0 {
            self.mutate(strait_proxy::detect::H2_PREFACE)
        } else {
            strait_proxy::detect::H2_PREFACE.to_vec()
        };
        for _ in 0..=self.below(6) {
            let len = self.below(64);
            let declared = if self.below(6) == 0 {
                self.below(1 << 24)
            } else {
                len
            };
            v.extend_from_slice(&(declared as u32).to_be_bytes()[1..]);
            v.push(self.below(12) as u8);
            v.push(self.bytes(1)[0]);
            let stream = (self.below(8) as u32) | if self.below(10) == 0 { 1 << 31 } else { 0 };
            v.extend_from_slice(&stream.to_be_bytes());
            let payload = self.bytes(len);
            v.extend_from_slice(&payload);
        }
        v
    }
}

/// Records panics raised outside this file's code (in the proxy or a
/// library it calls) from now on: tokio would swallow a panicking task's.
fn library_panics() -> Arc<std::sync::Mutex<Vec<String>>> {
    static SEEN: std::sync::OnceLock<Arc<std::sync::Mutex<Vec<String>>>> =
        std::sync::OnceLock::new();
    SEEN.get_or_init(|| {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = seen.clone();
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.location().is_none_or(|l| l.file() != file!()) {
                let mut seen = record.lock().unwrap_or_else(|e| e.into_inner());
                seen.push(info.to_string());
            }
            previous(info);
        }));
        seen
    })
    .clone()
}

/// Writes `payload` (errors ignored: the proxy may close first), half-closes,
/// and reads until the proxy closes. False if it was still open after 10 s.
async fn throw<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
    payload: &[u8],
) -> bool {
    let _ = s.write_all(payload).await;
    let _ = s.flush().await;
    let _ = s.shutdown().await;
    let mut sink = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(n) = s.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await
    .is_ok()
}

/// Bounded random input at every listener, with a fixed seed so that a
/// failure reproduces: random bytes, mutated HTTP/1 requests and HTTP/2
/// frames at the outbound and inbound listeners in plaintext, and inside
/// mutual TLS after a random or a valid transport header. Nothing panics,
/// every connection is closed in bounded time, the bad headers are
/// counted, and the proxies still serve. Also the parsers alone, on many
/// more inputs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_input_never_breaks_the_proxies() {
    use strait_proxy::transport::ProtocolHint;

    let panics = library_panics();
    let before = panics.lock().expect("panics").len();
    let mut rng = Rng::seeded(0x5354_5241_4954_5058);

    // The parsers alone.
    for _ in 0..20_000 {
        let len = rng.below(80);
        let b = rng.bytes(len);
        let _ = strait_proxy::detect::classify(&b);
        let _ = strait_proxy::transport::decode(&b);
        let _ = SpiffeId::parse(&String::from_utf8_lossy(&b));
        let id = rng.mutate(b"spiffe://test.strait.local/ns/demo/sa/web");
        let _ = SpiffeId::parse(&String::from_utf8_lossy(&id));
    }

    let Served {
        issuer,
        anchors,
        app,
        server_identity,
        server,
    } = served().await;
    let echo = echo().await;
    let mut table = HashMap::new();
    table.insert(
        "web.demo:80".to_string(),
        one_endpoint(app, Some(server_identity.id().clone()), false),
    );
    // No DNS: a damaged name falls back to the original destination (the
    // echo server) at once.
    let client = Proxy::start(
        ProxyConfig {
            outbound_target: Some(echo),
            inbound_target: Some(app),
            peer_inbound_port: server.inbound_addr().port(),
            ..local_config()
        },
        identity(&issuer, "client"),
        anchors.clone(),
        Arc::new(StaticResolver::new(table)),
        Registry::default(),
    )
    .await
    .expect("client proxy");
    let mesh = Arc::new(mesh_client(&issuer, &anchors, "fuzzer"));
    let raw_tls = tokio_rustls::TlsConnector::from(Arc::new(
        strait_proxy::tls::client_config(
            strait_proxy::identity::ExpectedPeerVerifier::new(
                anchors.roots(),
                server_identity.id().clone(),
                Arc::new(|_| {}),
            ),
            identity(&issuer, "fuzzer"),
            &[strait_proxy::mesh::MESH_ALPN],
        )
        .expect("client tls"),
    ));

    const REQUESTS: &[&[u8]] = &[
        b"GET / HTTP/1.1\r\nhost: web.demo:80\r\n\r\n",
        b"POST /x HTTP/1.1\r\nhost: web.demo:80\r\ncontent-length: 5\r\n\r\nhello",
        b"PUT /c HTTP/1.1\r\nhost: web.demo:80\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nhost: web.demo:80\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n",
        b"GET /grpc/x HTTP/1.1\r\nhost: web.demo:80\r\nte: trailers\r\n\r\n",
    ];
    let mut cases = tokio::task::JoinSet::new();
    for case in 0..2000 {
        // What to send: random bytes, a damaged HTTP/1 request, or HTTP/2.
        let payload = match rng.below(3) {
            0 => {
                let len = rng.below(3000);
                rng.bytes(len)
            }
            1 => {
                let seed = REQUESTS[rng.below(REQUESTS.len())];
                rng.mutate(seed)
            }
            _ => rng.h2_frames(),
        };
        // Where: outbound, inbound in plaintext, or inside mTLS after a
        // random header or a valid one.
        let target = rng.below(4);
        let header = {
            let len = rng.below(48);
            let mut h = (len as u16).to_be_bytes().to_vec();
            h.extend(rng.bytes(len));
            if rng.below(4) == 0 {
                let len = rng.below(8);
                h = rng.bytes(len);
            }
            h
        };
        let hint = [
            ProtocolHint::Unknown,
            ProtocolHint::Http2,
            ProtocolHint::Opaque,
        ][rng.below(3)];
        let (outbound, inbound) = (client.outbound_addr(), server.inbound_addr());
        let (mesh, raw_tls, id) = (mesh.clone(), raw_tls.clone(), server_identity.id().clone());
        cases.spawn(async move {
            match target {
                0 | 1 => {
                    let addr = if target == 0 { outbound } else { inbound };
                    let tcp = TcpStream::connect(addr).await.expect("connect");
                    throw(tcp, &payload).await
                }
                2 => {
                    let tcp = TcpStream::connect(inbound).await.expect("connect");
                    let name =
                        rustls::pki_types::ServerName::try_from("strait-proxy").expect("name");
                    let tls = raw_tls.connect(name, tcp).await.expect("mtls");
                    let mut input = header;
                    input.extend_from_slice(&payload);
                    throw(tls, &input).await
                }
                _ => {
                    let tls = mesh
                        .connect(inbound, &id, app.port(), hint)
                        .await
                        .expect("mesh connect");
                    throw(tls, &payload).await
                }
            }
        });
        // At most 16 at once; the first connection left open fails the
        // test at once.
        while cases.len() >= 16 || (case == 1999 && !cases.is_empty()) {
            if let Some(done) = cases.join_next().await {
                assert!(
                    done.expect("case task"),
                    "a connection still open after 10 s"
                );
            }
        }
    }
    let panicked = panics.lock().expect("panics")[before..].to_vec();
    assert!(panicked.is_empty(), "panics in the proxy: {panicked:#?}");
    // Bad transport headers, counted.
    let m = metrics_containing(&server, r#"reason="bad_header"}"#).await;
    assert!(
        m.contains(r#"strait_proxy_errors_total{direction="inbound",reason="bad_header"}"#),
        "{m}"
    );
    // Both still serve, through the mesh.
    let rsp = raw_http1(
        client.outbound_addr(),
        "GET /after HTTP/1.1\r\nhost: web.demo:80\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
}
