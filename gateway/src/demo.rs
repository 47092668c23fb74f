//! `strait demo`: two clusters, west and east, linked on one machine with
//! freshly made certificates. East runs a sample HTTP service `hello` in
//! namespace `demo` (two endpoints, each answering with its cluster and
//! name, each behind its own sidecar proxy, which gets its certificate
//! from east's identity service) and exports it; west imports it, resolves
//! `hello.demo.svc.clusterset.local` through its own DNS and sends requests
//! to the answer, through both gateways, the QUIC tunnel and a sidecar.
//!
//! The pieces (certificate files, sample endpoints, a DNS lookup, an HTTP
//! GET) are public so that tests and benchmarks build the same setup.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::config::{default_trust_domain, gateway_identity, GatewayConfig};
use crate::Gateway;
use strait_proxy::identity::{
    generate_issuer, generate_root, spawn_certify, CertStore, Certifier, PemPair, SpiffeId,
    TrustAnchors,
};
use strait_proxy::sidecar::{Proxy, ProxyConfig};

/// Addresses of the demo.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// West's DNS (default 127.0.0.1:15353).
    pub west_dns: SocketAddr,
    /// West's admin (default 127.0.0.1:14191).
    pub west_admin: SocketAddr,
    /// West's tunnel (default 127.0.0.1:14143).
    pub west_tunnel: SocketAddr,
    /// West's destination discovery (default 127.0.0.1:18086).
    pub west_destination: SocketAddr,
    /// East's DNS (default 127.0.0.1:25353).
    pub east_dns: SocketAddr,
    /// East's admin (default 127.0.0.1:24191).
    pub east_admin: SocketAddr,
    /// East's tunnel (default 127.0.0.1:24143).
    pub east_tunnel: SocketAddr,
    /// East's destination discovery (default 127.0.0.1:28086).
    pub east_destination: SocketAddr,
    /// Requests to send (default 6).
    pub requests: usize,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            west_dns: ([127, 0, 0, 1], 15353).into(),
            west_admin: ([127, 0, 0, 1], 14191).into(),
            west_tunnel: ([127, 0, 0, 1], 14143).into(),
            west_destination: ([127, 0, 0, 1], 18086).into(),
            east_dns: ([127, 0, 0, 1], 25353).into(),
            east_admin: ([127, 0, 0, 1], 24191).into(),
            east_tunnel: ([127, 0, 0, 1], 24143).into(),
            east_destination: ([127, 0, 0, 1], 28086).into(),
            requests: 6,
        }
    }
}

/// Writes `root.pem`/`root.key` and, per cluster, `<c>-issuer.pem` and
/// `<c>-issuer.key` into `dir`.
pub fn write_certs(dir: &Path, clusters: &[&str]) -> anyhow::Result<PemPair> {
    let root = generate_root("strait demo")?;
    std::fs::write(dir.join("root.pem"), &root.cert_pem)?;
    std::fs::write(dir.join("root.key"), &root.key_pem)?;
    for c in clusters {
        let issuer = generate_issuer(&root, &default_trust_domain(c))?;
        std::fs::write(dir.join(format!("{c}-issuer.pem")), &issuer.cert_pem)?;
        std::fs::write(dir.join(format!("{c}-issuer.key")), &issuer.key_pem)?;
    }
    Ok(root)
}

/// Starts a sample HTTP/1.1 endpoint on `127.0.0.1:0` that answers every
/// request with `hello from <cluster>/<name>` and closes.
pub async fn spawn_hello_endpoint(cluster: &str, name: &str) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    let body = format!("hello from {cluster}/{name}\n");
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                // Out of descriptors and the like: do not spin.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            };
            let body = body.clone();
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16 * 1024 {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// Asks `dns` (UDP) for the A record of `name`.
pub async fn resolve_a(dns: SocketAddr, name: &str) -> anyhow::Result<Ipv4Addr> {
    let mut q = Message::query();
    q.add_query(Query::query(Name::from_ascii(name)?, RecordType::A));
    q.metadata.id = rand::random();
    let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    sock.send_to(&q.to_vec()?, dns).await?;
    let mut buf = vec![0u8; 4096];
    let (n, _) = tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf))
        .await
        .map_err(|_| anyhow!("no DNS answer from {dns} within 2 s"))??;
    let resp = Message::from_vec(&buf[..n])?;
    if resp.metadata.response_code != ResponseCode::NoError {
        bail!("{name}: {}", resp.metadata.response_code);
    }
    resp.answers
        .iter()
        .find_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .ok_or_else(|| anyhow!("{name}: no A record in the answer"))
}

/// Sends `GET /` to `addr` with `Host: host` and returns the body.
pub async fn http_get(addr: SocketAddr, host: &str) -> anyhow::Result<String> {
    http_get_path(addr, host, "/").await
}

/// Sends `GET path` to `addr` with `Host: host` and returns the body of a
/// 200 response.
pub async fn http_get_path(addr: SocketAddr, host: &str, path: &str) -> anyhow::Result<String> {
    let mut s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow!("connect to {addr} timed out"))??;
    let req = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut resp = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut resp))
        .await
        .map_err(|_| anyhow!("response from {addr} timed out"))??;
    let text = String::from_utf8_lossy(&resp);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("malformed HTTP response from {addr} ({} bytes)", resp.len()))?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("unexpected response: {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.trim_end().to_string())
}

/// A gateway's listen addresses in the demo.
#[derive(Clone, Copy, Debug)]
pub struct DemoListen {
    /// QUIC tunnel.
    pub tunnel: SocketAddr,
    /// Admin HTTP.
    pub admin: SocketAddr,
    /// DNS.
    pub dns: SocketAddr,
    /// Destination discovery (gRPC).
    pub destination: SocketAddr,
    /// The identity service for sidecars, with the tokens in
    /// `<cluster>-tokens.yaml`; none if not served.
    pub identity: Option<SocketAddr>,
}

/// A gateway config for one demo cluster (YAML, relative file names).
pub fn gateway_yaml(
    cluster: &str,
    listen: DemoListen,
    links: &[(&str, Option<SocketAddr>)],
) -> String {
    let DemoListen {
        tunnel,
        admin,
        dns,
        destination,
        identity,
    } = listen;
    let (tokens, identity) = match identity {
        Some(a) => (
            format!("  tokensFile: {cluster}-tokens.yaml\n"),
            format!("  identity: {a}\n"),
        ),
        None => (String::new(), String::new()),
    };
    let mut y = format!(
        "cluster: {cluster}\nidentity:\n  trustAnchors: root.pem\n  issuerCert: {cluster}-issuer.pem\n  issuerKey: {cluster}-issuer.key\n{tokens}listen:\n  tunnel: {tunnel}\n  admin: {admin}\n  dns: {dns}\n  destination: {destination}\n{identity}source:\n  file: {cluster}-cluster.yaml\n  pollIntervalMs: 200\nimports:\n  stateFile: {cluster}-vips.json\nlinks:\n"
    );
    if links.is_empty() {
        y.push_str("  []\n");
    }
    for (name, addr) in links {
        y.push_str(&format!("  - name: {name}\n"));
        if let Some(a) = addr {
            y.push_str(&format!("    addresses: [\"{a}\"]\n"));
        }
    }
    y
}

/// The east cluster file: `hello` in `demo`, exported, with `endpoints`.
pub fn hello_cluster_yaml(endpoints: &[(String, SocketAddr)], export: bool) -> String {
    cluster_yaml(endpoints, export, None)
}

/// [`hello_cluster_yaml`], the endpoints meshed as `identity` when given.
fn cluster_yaml(
    endpoints: &[(String, SocketAddr)],
    export: bool,
    identity: Option<&SpiffeId>,
) -> String {
    let mut y = format!(
        "services:\n  - namespace: demo\n    name: hello\n    export: {export}\n    ports:\n      - {{ name: http, port: 8080, appProtocol: http }}\n    endpoints:\n"
    );
    let identity = identity
        .map(|id| format!(", identity: \"{id}\""))
        .unwrap_or_default();
    for (name, addr) in endpoints {
        y.push_str(&format!(
            "      - {{ name: {name}, ip: {}, ports: {{ http: {} }}{identity} }}\n",
            addr.ip(),
            addr.port()
        ));
    }
    y
}

/// A sample endpoint's sidecar proxy in the demo.
#[derive(Debug)]
pub struct DemoSidecar {
    /// The endpoint's name.
    pub name: String,
    /// The proxy: its inbound listener is on the endpoint's own loopback
    /// address (127.0.0.2, 127.0.0.3: one per "pod"), at the port east's
    /// gateway is told the sidecars listen on.
    pub proxy: Proxy,
    /// Its certificate store, kept current by east's identity service.
    pub store: std::sync::Arc<CertStore>,
}

/// The running demo.
#[derive(Debug)]
pub struct Demo {
    /// West's gateway.
    pub west: Gateway,
    /// East's gateway.
    pub east: Gateway,
    /// The sidecars in front of east's `hello` endpoints.
    pub sidecars: Vec<DemoSidecar>,
    /// Where the certificates and configs were written.
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

/// What a demo round trip saw.
#[derive(Debug)]
pub struct Summary {
    /// The address DNS answered.
    pub vip: Ipv4Addr,
    /// Responses per endpoint.
    pub served: BTreeMap<String, usize>,
    /// Time from start to the first response.
    pub first_response: Duration,
    /// Each sidecar's identity and the requests its inbound side served
    /// over mutual TLS.
    pub sidecars: Vec<(String, SpiffeId, u64)>,
}

const HELLO: &str = "hello.demo.svc.clusterset.local";
/// The `hello` workload's token for east's identity service.
const HELLO_TOKEN: &str = "demo-hello-token-6c1f0e2a";

impl Demo {
    /// Writes certificates, configs and cluster files into a temporary
    /// folder, starts the sample endpoints and both gateways.
    pub async fn start(opts: &DemoOptions) -> anyhow::Result<Self> {
        let tmp = tempfile::Builder::new().prefix("strait-demo-").tempdir()?;
        let dir = tmp.path().to_path_buf();
        write_certs(&dir, &["west", "east"])?;
        // Each endpoint behind its own sidecar, certified once east's
        // identity service is up (the tokens file stands in for
        // Kubernetes' projected service account tokens). Each "pod" has
        // its own loopback address, where its sidecar listens on the port
        // east's gateway knows as the proxies' inbound port; the cluster
        // file names the endpoints meshed, so the gateway speaks mutual
        // TLS to the sidecar, which hands the stream to the application
        // (on the shared 127.0.0.1, at the endpoint's port).
        std::fs::write(
            dir.join("east-tokens.yaml"),
            format!("- {{token: {HELLO_TOKEN}, namespace: demo, serviceAccount: hello}}\n"),
        )?;
        std::fs::write(dir.join("hello-token"), format!("{HELLO_TOKEN}\n"))?;
        let anchors = TrustAnchors::load(&dir.join("root.pem"))?;
        let hello_id = SpiffeId::workload(&default_trust_domain("east"), "demo", "hello")?;
        let mut endpoints = Vec::new();
        let mut pending = Vec::new();
        let mut proxy_port = 0;
        for (pod, name) in [(2, "hello-east-0"), (3, "hello-east-1")] {
            let app = spawn_hello_endpoint("east", name).await?;
            let store = CertStore::pending(hello_id.clone());
            let loopback: SocketAddr = (Ipv4Addr::LOCALHOST, 0).into();
            let pod_ip = Ipv4Addr::new(127, 0, 0, pod);
            let proxy = Proxy::start(
                ProxyConfig {
                    outbound: loopback,
                    inbound: (pod_ip, proxy_port).into(),
                    admin: loopback,
                    inbound_target: Some(app),
                    ..ProxyConfig::default()
                },
                store.clone(),
                anchors.clone(),
                std::sync::Arc::new(strait_proxy::discovery::StaticResolver::default()),
                prometheus_client::registry::Registry::default(),
            )
            .await
            .with_context(|| format!("starting {name}'s sidecar"))?;
            proxy_port = proxy.inbound_addr().port();
            endpoints.push((name.to_string(), SocketAddr::new(pod_ip.into(), app.port())));
            pending.push((name.to_string(), proxy, store));
        }
        std::fs::write(
            dir.join("east-cluster.yaml"),
            cluster_yaml(&endpoints, true, Some(&hello_id)),
        )?;
        std::fs::write(dir.join("west-cluster.yaml"), "services: []\n")?;
        std::fs::write(
            dir.join("east.yaml"),
            gateway_yaml(
                "east",
                DemoListen {
                    tunnel: opts.east_tunnel,
                    admin: opts.east_admin,
                    dns: opts.east_dns,
                    destination: opts.east_destination,
                    identity: Some((Ipv4Addr::LOCALHOST, 0).into()),
                },
                &[("west", None)],
            ) + &format!("mesh:\n  proxyInboundPort: {proxy_port}\n"),
        )?;
        std::fs::write(
            dir.join("west.yaml"),
            gateway_yaml(
                "west",
                DemoListen {
                    tunnel: opts.west_tunnel,
                    admin: opts.west_admin,
                    dns: opts.west_dns,
                    destination: opts.west_destination,
                    identity: None,
                },
                &[("east", Some(opts.east_tunnel))],
            ),
        )?;
        let east = Gateway::start(GatewayConfig::load(&dir.join("east.yaml"))?)
            .await
            .context("starting east")?;
        let west = Gateway::start(GatewayConfig::load(&dir.join("west.yaml"))?)
            .await
            .context("starting west")?;
        let identity = east
            .identity_addr()
            .ok_or_else(|| anyhow!("east serves no identity service"))?;
        let uri: http::Uri = format!("http://{identity}").parse()?;
        let mut sidecars = Vec::new();
        for (name, proxy, store) in pending {
            // The certifier's own store is its TLS client identity, which
            // the identity service does not ask for: it stays pending.
            let (certifier, _) = Certifier::for_control_plane(
                hello_id.clone(),
                &uri,
                gateway_identity(&default_trust_domain("east"))?,
                dir.join("hello-token"),
                &anchors,
            )?;
            spawn_certify(certifier, store.clone(), |_| {});
            sidecars.push(DemoSidecar { name, proxy, store });
        }
        Ok(Self {
            west,
            east,
            sidecars,
            dir,
            _tmp: Some(tmp),
        })
    }

    /// Waits for west to import `hello`, resolves it through west's DNS and
    /// sends `requests` requests to it.
    pub async fn round_trip(
        &self,
        requests: usize,
        mut log: impl FnMut(&str),
    ) -> anyhow::Result<Summary> {
        let started = Instant::now();
        let deadline = started + Duration::from_secs(20);
        let mut synced = self.west.egress_synced();
        loop {
            if synced
                .borrow_and_update()
                .values()
                .any(|i| i.dns_name() == HELLO)
            {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if tokio::time::timeout(left, synced.changed()).await.is_err() {
                let peers = serde_json::to_string(&self.west.peers())?;
                bail!("west did not import {HELLO} within 20 s; west's peers: {peers}");
            }
        }
        // East's gateway reaches the endpoints through their sidecars,
        // which need their certificates first.
        for s in &self.sidecars {
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::time::timeout(left, s.store.certified())
                .await
                .map_err(|_| anyhow!("{}'s sidecar was not certified within 20 s", s.name))?;
        }
        let vip = resolve_a(self.west.dns_addr(), HELLO).await?;
        log(&format!(
            "{HELLO} -> {vip} (answered by west's DNS at {})",
            self.west.dns_addr()
        ));
        let mut served = BTreeMap::new();
        let mut first_response = None;
        for i in 0..requests {
            let body = http_get((vip, 8080).into(), HELLO)
                .await
                .with_context(|| format!("request {} to {vip}:8080", i + 1))?;
            first_response.get_or_insert_with(|| started.elapsed());
            log(&format!("request {}: {body}", i + 1));
            let who = body.rsplit('/').next().unwrap_or(&body).to_string();
            *served.entry(who).or_insert(0) += 1;
        }
        let mut sidecars = Vec::new();
        for s in &self.sidecars {
            // Requests that came over mutual TLS (from east's gateway); a
            // response is counted as its last byte goes, so the count may
            // trail the client by a moment.
            let want = served.get(&s.name).copied().unwrap_or(0) as f64;
            let counted = Instant::now() + Duration::from_secs(2);
            let inbound = loop {
                let metrics = http_get_path(s.proxy.admin_addr(), "admin", "/metrics").await?;
                let inbound: f64 = metrics
                    .lines()
                    .filter(|l| l.starts_with("strait_proxy_requests_total{direction=\"inbound\""))
                    .filter(|l| l.contains("tls=\"true\""))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum();
                if inbound >= want || Instant::now() > counted {
                    break inbound;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            let id = s.store.id().clone();
            log(&format!(
                "{}'s sidecar: certified by east's identity service as {id}; inbound requests over mTLS from east's gateway: {inbound}",
                s.name
            ));
            sidecars.push((s.name.clone(), id, inbound as u64));
        }
        Ok(Summary {
            vip,
            served,
            first_response: first_response.unwrap_or_default(),
            sidecars,
        })
    }
}
