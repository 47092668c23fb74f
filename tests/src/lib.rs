//! Test support for Strait's end-to-end tests: several clusters on one
//! machine, each a real gateway on loopback with its own certificates,
//! config and cluster file, on ports the kernel picks.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use strait_gateway::config::{default_trust_domain, gateway_identity};
use strait_gateway::demo::write_certs;
use strait_gateway::tunnel::{TunnelConfig, TunnelEndpoint};
use strait_gateway::{Gateway, GatewayConfig};
use strait_proxy::identity::{
    AllowedPeers, CertStore, ExpectedPeerVerifier, Issuer, LinkedPeersVerifier, SpiffeId,
    TrustAnchors,
};
use strait_proxy::tls;

/// A stateful fake Kubernetes API server for running kube-rs clients
/// against.
pub mod fake_kube;

pub use strait_gateway::demo::{
    hello_cluster_yaml, http_get, http_get_path, resolve_a, spawn_hello_endpoint,
};

/// A folder of certificates (one root, one issuer per cluster) and configs.
pub struct Testbed {
    dir: tempfile::TempDir,
    vips: ipnet::Ipv4Net,
    grace_seconds: std::sync::atomic::AtomicU64,
}

/// A /16 of loopback of its own for each testbed, so that tests running at
/// once (threads or processes) never fight over an import's VIP:port.
fn unique_vip_range() -> ipnet::Ipv4Net {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed) + std::process::id() * 37;
    let second = 80 + (n % 170) as u8;
    ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(127, second, 0, 0), 16).expect("cidr")
}

impl Testbed {
    /// A testbed whose root signs issuers for `clusters`.
    pub fn new(clusters: &[&str]) -> Self {
        tls::install_default_provider();
        // STRAIT_TEST_LOG=debug shows the gateways' logs.
        strait_proxy::cli::test_logs();
        let dir = tempfile::tempdir().expect("tempdir");
        write_certs(dir.path(), clusters).expect("certificates");
        Self {
            dir,
            vips: unique_vip_range(),
            grace_seconds: std::sync::atomic::AtomicU64::new(30),
        }
    }

    /// Sets the grace period of configs made from now on.
    pub fn set_grace_period(&self, seconds: u64) {
        self.grace_seconds
            .store(seconds, std::sync::atomic::Ordering::Relaxed);
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a cluster's source file.
    pub fn write_cluster(&self, cluster: &str, yaml: &str) {
        let path = self.cluster_file(cluster);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, yaml).expect("write cluster file");
        std::fs::rename(&tmp, &path).expect("rename cluster file");
    }

    fn cluster_file(&self, cluster: &str) -> PathBuf {
        self.path().join(format!("{cluster}-cluster.yaml"))
    }

    /// A gateway config with loopback listeners on kernel-picked ports
    /// (unless `tunnel` is given), short timeouts, and `links` as
    /// `(name, address to dial, identity override)`.
    pub fn config(
        &self,
        cluster: &str,
        tunnel: Option<SocketAddr>,
        links: &[(&str, Option<SocketAddr>, Option<&str>)],
    ) -> GatewayConfig {
        let loopback = std::net::Ipv4Addr::LOCALHOST.into();
        self.config_on(cluster, loopback, tunnel, links)
    }

    /// [`Testbed::config`] with every listener on `listen` (port 0 each,
    /// the tunnel's too unless given).
    pub fn config_on(
        &self,
        cluster: &str,
        listen: std::net::IpAddr,
        tunnel: Option<SocketAddr>,
        links: &[(&str, Option<SocketAddr>, Option<&str>)],
    ) -> GatewayConfig {
        if !self.cluster_file(cluster).exists() {
            self.write_cluster(cluster, "services: []\n");
        }
        let tunnel = tunnel.unwrap_or_else(|| SocketAddr::new(listen, 0));
        let vips = self.vips;
        let grace = self
            .grace_seconds
            .load(std::sync::atomic::Ordering::Relaxed);
        let mut y = format!(
            "{}source:
  file: {cluster}-cluster.yaml
  pollIntervalMs: 50
imports:
  gracePeriodSeconds: {grace}
  vipRange: {vips}
tunnel:
  idleTimeoutMs: 3000
  keepAliveMs: 500
  reconnectMinMs: 50
  reconnectMaxMs: 400
links:
",
            config_head(cluster, listen, tunnel)
        );
        if links.is_empty() {
            y.push_str("  []\n");
        }
        for (name, addr, identity) in links {
            y.push_str(&format!("  - name: {name}\n"));
            if let Some(a) = addr {
                y.push_str(&format!("    addresses: [\"{a}\"]\n"));
            }
            if let Some(id) = identity {
                y.push_str(&format!("    identity: \"{id}\"\n"));
            }
        }
        let path = self.path().join(format!("{cluster}.yaml"));
        std::fs::write(&path, y).expect("write config");
        GatewayConfig::load(&path).expect("valid config")
    }

    /// A Kubernetes-mode gateway config for one replica: loopback
    /// listeners on kernel-picked ports, egress on `egress` within `ports`,
    /// and a 2 s writer Lease renewed every second.
    pub fn kube_config(
        &self,
        cluster: &str,
        replica: &str,
        egress: std::net::IpAddr,
        ports: std::ops::RangeInclusive<u16>,
    ) -> GatewayConfig {
        let grace = self
            .grace_seconds
            .load(std::sync::atomic::Ordering::Relaxed);
        let y = format!(
            "{}source:
  kubernetes:
    namespace: strait-system
    egressPortMin: {min}
    egressPortMax: {max}
    egressAddress: {egress}
    leaseDurationSeconds: 2
    leaseRenewSeconds: 1
    replica: {replica}
imports:
  gracePeriodSeconds: {grace}
tunnel:
  idleTimeoutMs: 3000
  keepAliveMs: 500
  reconnectMinMs: 50
  reconnectMaxMs: 400
",
            config_head(
                cluster,
                std::net::Ipv4Addr::LOCALHOST.into(),
                "127.0.0.1:0".parse().expect("addr")
            ),
            min = ports.start(),
            max = ports.end(),
        );
        let path = self.path().join(format!("{cluster}-{replica}.yaml"));
        std::fs::write(&path, y).expect("write config");
        GatewayConfig::load(&path).expect("valid config")
    }

    /// Starts east exporting `demo/hello` (one endpoint, `hello-0`) and
    /// letting west in.
    pub async fn start_hello_east(&self) -> Gateway {
        self.start_hello_east_on(std::net::Ipv4Addr::LOCALHOST.into())
            .await
    }

    /// [`Testbed::start_hello_east`] with east's listeners on `listen`.
    pub async fn start_hello_east_on(&self, listen: std::net::IpAddr) -> Gateway {
        self.start(self.hello_east_config_on(listen).await).await
    }

    /// The config [`Testbed::start_hello_east_on`] starts east with (its
    /// endpoint started), to change before starting it.
    pub async fn hello_east_config_on(&self, listen: std::net::IpAddr) -> GatewayConfig {
        let endpoint = spawn_hello_endpoint("east", "hello-0")
            .await
            .expect("endpoint");
        self.write_cluster(
            "east",
            &hello_cluster_yaml(&[("hello-0".to_string(), endpoint)], true),
        );
        self.config_on("east", listen, None, &[("west", None, None)])
    }

    /// Starts a gateway.
    pub async fn start(&self, config: GatewayConfig) -> Gateway {
        Gateway::start(config).await.expect("gateway starts")
    }

    /// A raw tunnel client acting as `cluster`'s gateway, expecting to reach
    /// `peer`'s gateway: for sending hand-made stream headers.
    pub fn raw_client(&self, cluster: &str, peer: &str) -> (TunnelEndpoint, rustls::ClientConfig) {
        let dir = self.path();
        let anchors = TrustAnchors::load(&dir.join("root.pem")).expect("anchors");
        let issuer = Issuer::load(
            &dir.join(format!("{cluster}-issuer.pem")),
            &dir.join(format!("{cluster}-issuer.key")),
        )
        .expect("issuer");
        let id = gateway_identity(&default_trust_domain(cluster)).expect("id");
        let store = CertStore::new(&issuer.issue(&id, Duration::from_secs(3600)).expect("leaf"))
            .expect("store");
        let peer_id: SpiffeId = gateway_identity(&default_trust_domain(peer)).expect("id");
        let sink: strait_proxy::identity::RefusalSink = Arc::new(|_| {});
        let client = tls::client_config(
            ExpectedPeerVerifier::new(anchors.roots(), peer_id, sink.clone()),
            store.clone(),
            &[tls::TUNNEL_ALPN],
        )
        .expect("client tls");
        let server = tls::server_config(
            LinkedPeersVerifier::new(anchors.roots(), AllowedPeers::default(), sink)
                .expect("verifier"),
            store,
            &[tls::TUNNEL_ALPN],
        )
        .expect("server tls");
        let ep = TunnelEndpoint::bind(
            "127.0.0.1:0".parse().expect("addr"),
            server,
            &TunnelConfig::default(),
        )
        .expect("endpoint");
        (ep, client)
    }
}

/// The identity and listener part of a test gateway config: the tunnel
/// on `tunnel`, the other listeners on `listen`, port 0.
fn config_head(cluster: &str, listen: std::net::IpAddr, tunnel: SocketAddr) -> String {
    let any = SocketAddr::new(listen, 0);
    format!(
        "cluster: {cluster}
identity:
  trustAnchors: root.pem
  issuerCert: {cluster}-issuer.pem
  issuerKey: {cluster}-issuer.key
listen:
  tunnel: \"{tunnel}\"
  admin: \"{any}\"
  dns: \"{any}\"
  destination: \"{any}\"
  identity: \"{any}\"
"
    )
}

/// A range of 100 egress ports of its own for each caller, so tests
/// running at once never fight over a port (below Linux's ephemeral range).
pub fn unique_egress_ports() -> std::ops::RangeInclusive<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed) + std::process::id() * 7;
    let first = 20_000 + (n % 120) as u16 * 100;
    first..=first + 99
}

/// Polls `check` every 25 ms until it returns `Some`, or panics with
/// `what` after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Fetches a gateway's `/metrics` text.
pub async fn metrics(gw: &Gateway) -> String {
    http_get_path(gw.admin_addr(), "admin", "/metrics")
        .await
        .expect("metrics")
}

/// The value of the sample line starting with `prefix` (a metric name
/// with its labels), if present.
pub fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix) && l[prefix.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Runs `dig @server -p port name qtype` (over TCP if `tcp`) with `extra`
/// flags.
fn run_dig(
    server: SocketAddr,
    name: &str,
    qtype: &str,
    tcp: bool,
    extra: &[&str],
) -> std::process::Output {
    let mut cmd = std::process::Command::new("dig");
    cmd.arg(format!("@{}", server.ip()))
        .arg("-p")
        .arg(server.port().to_string())
        .arg(name)
        .arg(qtype)
        .args(extra)
        // Generous: one slow answer on a loaded machine is not a failure.
        .arg("+time=5")
        .arg("+tries=2");
    if tcp {
        cmd.arg("+tcp");
    }
    cmd.output()
        .expect("dig must be installed: run scripts/test.sh, which installs it")
}

/// Runs `dig` against a DNS server and returns `+short` output lines.
pub fn dig(server: SocketAddr, name: &str, qtype: &str, tcp: bool) -> Vec<String> {
    let out = run_dig(server, name, qtype, tcp, &["+short"]);
    assert!(
        out.status.success(),
        "dig failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Runs `dig` and returns its whole output (for status and sections).
pub fn dig_full(server: SocketAddr, name: &str, qtype: &str, tcp: bool) -> String {
    String::from_utf8_lossy(&run_dig(server, name, qtype, tcp, &[]).stdout).into_owned()
}

/// The virtual IP `gw` listens on for the import named `dns_name`, once
/// it is imported and listening (within 20 s).
pub async fn import_vip(gw: &Gateway, dns_name: &str) -> std::net::IpAddr {
    eventually(LIMIT_WAIT, "the import listening", || async {
        let synced = gw.egress_synced().borrow().clone();
        synced
            .values()
            .find(|i| i.dns_name() == dns_name)
            .map(|i| std::net::IpAddr::V4(i.vip))
    })
    .await
}

/// How long the helpers below wait for what they expect.
const LIMIT_WAIT: Duration = Duration::from_secs(20);

/// A connection to an egress `vip` (port 8080), held open until
/// dropped, once `gw` counts it among its streams open with `peer` in
/// `direction`.
pub async fn hold(
    vip: std::net::IpAddr,
    gw: &Gateway,
    peer: &str,
    direction: &str,
) -> tokio::net::TcpStream {
    let open = format!("strait_tunnel_streams_open{{peer=\"{peer}\",direction=\"{direction}\"}}");
    // Earlier streams gone first: one still closing would pass for the
    // held one, and free its slot a moment later.
    eventually(LIMIT_WAIT, "earlier streams closed", || async {
        (sample(&metrics(gw).await, &open).unwrap_or(0.0) == 0.0).then_some(())
    })
    .await;
    let held = tokio::net::TcpStream::connect((vip, 8080))
        .await
        .expect("connect");
    eventually(LIMIT_WAIT, "the held connection's stream open", || async {
        (sample(&metrics(gw).await, &open) == Some(1.0)).then_some(())
    })
    .await;
    held
}

/// Past `maxConnections` on `east` (the exporting side), a stream from
/// west to an endpoint is refused at once, and counted; once the `held`
/// connection closes, requests through `vip` are served again.
pub async fn refused_while_held(
    vip: std::net::IpAddr,
    host: &str,
    held: tokio::net::TcpStream,
    east: &Gateway,
) {
    let reached = "strait_connection_limit_reached_total{direction=\"inbound\"}";
    let busy = "strait_tunnel_streams_total{peer=\"west\",direction=\"inbound\",result=\"busy\"}";
    let before = sample(&metrics(east).await, reached).unwrap_or(0.0);
    let refused = http_get((vip, 8080).into(), host).await;
    assert!(refused.is_err(), "served past the limit: {refused:?}");
    let m = eventually(LIMIT_WAIT, "the refusal counted", || async {
        let m = metrics(east).await;
        (sample(&m, busy) == Some(1.0)).then_some(m)
    })
    .await;
    assert_eq!(sample(&m, reached), Some(before + 1.0), "{m}");
    drop(held);
    let body = eventually(LIMIT_WAIT, "served once a slot is free", || async {
        http_get((vip, 8080).into(), host).await.ok()
    })
    .await;
    assert!(body.starts_with("hello from east/"), "{body}");
}
