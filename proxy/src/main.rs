//! `strait-proxy`: the sidecar. `run` serves; `init` installs the iptables
//! rules of transparent mode (run as an init container, like linkerd-init).
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use prometheus_client::registry::Registry;
use strait_proxy::discovery::{Chain, DnsResolver, GrpcResolver, Resolve, StaticResolver};
use strait_proxy::identity::{
    spawn_certify, spawn_rotation, CertStore, Certifier, Issuer, Leaf, SpiffeId, TrustAnchors,
};
use strait_proxy::metrics::IdentityMetrics;
use strait_proxy::sidecar::{Proxy, ProxyConfig};
use strait_proxy::transparent::{apply, InitConfig};

// jemalloc: the buffers idle connections give back are returned to the
// system (glibc's heap keeps them as holes between live allocations: 12 KB
// per parked connection instead of 7), and requests are a few per cent
// faster (bench/proxy.sh).
#[cfg(all(target_os = "linux", not(target_env = "musl")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The Strait sidecar proxy.
#[derive(Parser, Debug)]
#[command(name = "strait-proxy", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the proxy.
    Run(Box<RunArgs>),
    /// Install the iptables rules that send the pod's TCP through the proxy.
    Init(InitArgs),
}

fn ms(s: &str) -> Result<Duration, String> {
    s.parse::<u64>().map_err(|e| e.to_string()).and_then(|n| {
        if n == 0 {
            Err("must be positive".into())
        } else {
            Ok(Duration::from_millis(n))
        }
    })
}

#[derive(Args, Debug)]
#[command(group = clap::ArgGroup::new("identity_source").args(["identity_addr", "issuer_cert"]))]
struct RunArgs {
    /// Outbound listener.
    #[arg(
        long,
        env = "STRAIT_PROXY_OUTBOUND_LISTEN",
        default_value = "127.0.0.1:4140"
    )]
    outbound_listen: SocketAddr,
    /// A second outbound listener, on IPv6 loopback, for a dual-stack pod
    /// (`init --ipv6` redirects IPv6 connections to `[::1]`).
    #[arg(long, env = "STRAIT_PROXY_OUTBOUND_LISTEN_IPV6")]
    outbound_listen_ipv6: Option<SocketAddr>,
    /// Inbound listener (`[::]:4143` takes IPv4 and IPv6).
    #[arg(
        long,
        env = "STRAIT_PROXY_INBOUND_LISTEN",
        default_value = "0.0.0.0:4143"
    )]
    inbound_listen: SocketAddr,
    /// Admin listener (/metrics, /ready, /live, /shutdown from loopback).
    #[arg(
        long,
        env = "STRAIT_PROXY_ADMIN_LISTEN",
        default_value = "0.0.0.0:4191"
    )]
    admin_listen: SocketAddr,
    /// Use SO_ORIGINAL_DST (after `strait-proxy init`).
    #[arg(long, env = "STRAIT_PROXY_TRANSPARENT")]
    transparent: bool,
    /// Where inbound connections go when not transparent.
    #[arg(long, env = "STRAIT_PROXY_INBOUND_TARGET")]
    inbound_target: Option<SocketAddr>,
    /// The pod's own addresses (comma separated; the injector passes
    /// `status.podIPs`): with --transparent, inbound connections to any
    /// other address are refused.
    #[arg(long, env = "STRAIT_PROXY_INBOUND_IPS", value_delimiter = ',')]
    inbound_ips: Vec<std::net::IpAddr>,
    /// Where undetected outbound connections go when not transparent.
    #[arg(long, env = "STRAIT_PROXY_OUTBOUND_TARGET")]
    outbound_target: Option<SocketAddr>,
    /// The inbound port of peer proxies.
    #[arg(long, env = "STRAIT_PROXY_PEER_INBOUND_PORT", default_value_t = 4143)]
    peer_inbound_port: u16,
    /// Ports never inspected (comma separated).
    #[arg(long, env = "STRAIT_PROXY_OPAQUE_PORTS", value_delimiter = ',')]
    opaque_ports: Vec<u16>,
    /// Protocol detection timeout, ms.
    #[arg(long, env = "STRAIT_PROXY_DETECT_TIMEOUT_MS", default_value = "1000", value_parser = ms)]
    detect_timeout_ms: Duration,
    /// Connect timeout, ms.
    #[arg(long, env = "STRAIT_PROXY_CONNECT_TIMEOUT_MS", default_value = "1000", value_parser = ms)]
    connect_timeout_ms: Duration,
    /// Request timeout (to response headers), ms.
    #[arg(long, env = "STRAIT_PROXY_REQUEST_TIMEOUT_MS", default_value = "10000", value_parser = ms)]
    request_timeout_ms: Duration,
    /// How long an HTTP/1 client may take to send a request head, ms.
    #[arg(long, env = "STRAIT_PROXY_HTTP1_HEADER_TIMEOUT_MS", default_value = "10000", value_parser = ms)]
    http1_header_timeout_ms: Duration,
    /// HTTP/2 server connections: ping interval, and how long a ping may go unanswered, ms.
    #[arg(long, env = "STRAIT_PROXY_HTTP2_KEEPALIVE_MS", default_value = "10000", value_parser = ms)]
    http2_keepalive_ms: Duration,
    /// Refuse plaintext inbound connections.
    #[arg(long, env = "STRAIT_PROXY_REQUIRE_MTLS")]
    require_mtls: bool,
    /// Connections served at once in each direction; beyond it new ones wait in the listen backlog.
    #[arg(long, env = "STRAIT_PROXY_MAX_CONNECTIONS", default_value_t = 20_000)]
    max_connections: u32,
    /// Drain deadline after SIGTERM, ms.
    #[arg(long, env = "STRAIT_PROXY_SHUTDOWN_GRACE_MS", default_value = "30000", value_parser = ms)]
    shutdown_grace_ms: Duration,
    /// Worker threads (default: one per CPU; 1 runs the single-threaded scheduler).
    #[arg(long, env = "STRAIT_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,
    /// The cluster gateway's destination service (host:port or
    /// http://host:port), e.g. strait-gateway.strait-system.svc:8086.
    #[arg(long, env = "STRAIT_PROXY_DESTINATION_ADDR")]
    destination_addr: Option<String>,
    /// Speak mTLS to the destination service, which must present this
    /// SPIFFE ID (the gateway's, e.g.
    /// spiffe://west.strait.local/ns/strait-system/sa/strait-gateway).
    #[arg(
        long,
        env = "STRAIT_PROXY_DESTINATION_IDENTITY",
        requires = "destination_addr"
    )]
    destination_identity: Option<String>,
    /// Static destinations (YAML); DNS is the fallback.
    #[arg(long, env = "STRAIT_PROXY_DESTINATIONS")]
    destinations: Option<PathBuf>,
    /// Trust anchors (PEM bundle file)...
    #[arg(
        long,
        env = "STRAIT_PROXY_TRUST_ANCHORS",
        required_unless_present = "trust_anchors_pem"
    )]
    trust_anchors: Option<PathBuf>,
    /// ...or the bundle itself (how `strait inject` hands a pod the
    /// cluster's anchors without a ConfigMap in every namespace).
    #[arg(
        long,
        env = "STRAIT_PROXY_TRUST_ANCHORS_PEM",
        conflicts_with = "trust_anchors"
    )]
    trust_anchors_pem: Option<String>,
    /// This proxy's certificate chain (PEM, leaf first)...
    #[arg(long, env = "STRAIT_PROXY_IDENTITY_CERT", requires = "identity_key")]
    identity_cert: Option<PathBuf>,
    /// ...and its key (PKCS#8 PEM).
    #[arg(long, env = "STRAIT_PROXY_IDENTITY_KEY")]
    identity_key: Option<PathBuf>,
    /// Or: this SPIFFE ID (spiffe://<trust-domain>/ns/<ns>/sa/<sa>),
    /// certified by the control plane (--identity-addr) or minted from an
    /// issuer held locally (--issuer-cert/--issuer-key; tests and hosts
    /// outside a cluster).
    #[arg(
        long,
        env = "STRAIT_PROXY_IDENTITY",
        conflicts_with = "identity_cert",
        requires = "identity_source"
    )]
    identity: Option<String>,
    /// The gateway's identity service (host:port), e.g.
    /// strait-identity.strait-system.svc:8080...
    #[arg(
        long,
        env = "STRAIT_PROXY_IDENTITY_ADDR",
        requires_all = ["identity", "identity_token_file"],
        conflicts_with = "issuer_cert"
    )]
    identity_addr: Option<String>,
    /// ...with this bearer token, re-read at every renewal (in Kubernetes,
    /// a projected service account token for the audience
    /// identity.strait.io)...
    #[arg(
        long,
        env = "STRAIT_PROXY_IDENTITY_TOKEN_FILE",
        requires = "identity_addr"
    )]
    identity_token_file: Option<PathBuf>,
    /// ...and pinned on this SPIFFE ID (default: the gateway's in the
    /// proxy's trust domain,
    /// spiffe://<trust-domain>/ns/strait-system/sa/strait-gateway).
    #[arg(
        long,
        env = "STRAIT_PROXY_IDENTITY_SERVER_ID",
        requires = "identity_addr"
    )]
    identity_server_id: Option<String>,
    /// Or mint and rotate our own 24 h leaf from this issuer
    /// certificate...
    #[arg(long, env = "STRAIT_PROXY_ISSUER_CERT", requires_all = ["identity", "issuer_key"])]
    issuer_cert: Option<PathBuf>,
    /// ...and key.
    #[arg(long, env = "STRAIT_PROXY_ISSUER_KEY", requires = "issuer_cert")]
    issuer_key: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct InitArgs {
    /// The UID the proxy runs as (its traffic is not redirected).
    #[arg(long, env = "STRAIT_PROXY_UID")]
    proxy_uid: u32,
    /// The proxy's inbound port.
    #[arg(long, default_value_t = 4143)]
    inbound_port: u16,
    /// The proxy's outbound port.
    #[arg(long, default_value_t = 4140)]
    outbound_port: u16,
    /// The proxy's admin port (never redirected).
    #[arg(long, default_value_t = 4191)]
    admin_port: u16,
    /// Inbound ports that bypass the proxy (comma separated).
    #[arg(long, value_delimiter = ',')]
    skip_inbound_ports: Vec<u16>,
    /// Outbound ports that bypass the proxy (comma separated).
    #[arg(long, value_delimiter = ',')]
    skip_outbound_ports: Vec<u16>,
    /// Install IPv6 rules too.
    #[arg(long)]
    ipv6: bool,
}

/// The gateway's SPIFFE ID in the trust domain of `id`.
fn default_gateway_id(id: &SpiffeId) -> anyhow::Result<SpiffeId> {
    Ok(SpiffeId::workload(
        id.trust_domain(),
        "strait-system",
        "strait-gateway",
    )?)
}

/// This proxy's certificate store, with what keeps it current: nothing
/// (files), a local rotation, or the control plane's identity service (the
/// store starts pending; the proxy is not ready until it is certified).
fn identity(
    args: &RunArgs,
    anchors: &TrustAnchors,
    metrics: &IdentityMetrics,
) -> anyhow::Result<(Arc<CertStore>, Option<tokio::task::JoinHandle<()>>)> {
    if let (Some(cert), Some(key)) = (&args.identity_cert, &args.identity_key) {
        let read =
            |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        let leaf = Leaf::from_pem(&read(cert)?, &read(key)?)?;
        metrics.renewed(leaf.not_after);
        return Ok((CertStore::new(&leaf)?, None));
    }
    let Some(id) = &args.identity else {
        bail!("an identity is required: --identity-cert/--identity-key, or --identity with --identity-addr/--identity-token-file or --issuer-cert/--issuer-key");
    };
    let id = SpiffeId::parse(id).context("--identity")?;
    if let (Some(addr), Some(token)) = (&args.identity_addr, &args.identity_token_file) {
        let uri = strait_proxy::control::parse_addr(addr).context("--identity-addr")?;
        let server = match &args.identity_server_id {
            Some(s) => SpiffeId::parse(s).context("--identity-server-id")?,
            None => default_gateway_id(&id)?,
        };
        let (certifier, store) =
            Certifier::for_control_plane(id, &uri, server, token.clone(), anchors)?;
        let metrics = metrics.clone();
        let task = spawn_certify(certifier, store.clone(), move |r| match r {
            Ok(t) => metrics.renewed(t),
            Err(e) => metrics.failed(e.kind()),
        });
        return Ok((store, Some(task)));
    }
    let (Some(cert), Some(key)) = (&args.issuer_cert, &args.issuer_key) else {
        bail!("--identity needs --identity-addr and --identity-token-file (the control plane), or --issuer-cert and --issuer-key");
    };
    let issuer = Arc::new(Issuer::load(cert, key)?);
    let lifetime = Duration::from_secs(24 * 3600);
    let leaf = issuer.issue(&id, lifetime)?;
    metrics.renewed(leaf.not_after);
    let store = CertStore::new(&leaf)?;
    let metrics = metrics.clone();
    let task = spawn_rotation(
        issuer,
        store.clone(),
        lifetime,
        Duration::from_secs(30),
        move |t| metrics.renewed(t),
    );
    Ok((store, Some(task)))
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = ProxyConfig {
        outbound: args.outbound_listen,
        outbound_ipv6: args.outbound_listen_ipv6,
        inbound: args.inbound_listen,
        admin: args.admin_listen,
        transparent: args.transparent,
        inbound_target: args.inbound_target,
        inbound_ips: args.inbound_ips.clone(),
        outbound_target: args.outbound_target,
        peer_inbound_port: args.peer_inbound_port,
        opaque_ports: args.opaque_ports.clone(),
        detect_timeout: args.detect_timeout_ms,
        connect_timeout: args.connect_timeout_ms,
        request_timeout: args.request_timeout_ms,
        http1_header_timeout: args.http1_header_timeout_ms,
        http2_keepalive: args.http2_keepalive_ms,
        require_mtls: args.require_mtls,
        shutdown_grace: args.shutdown_grace_ms,
        max_connections: args.max_connections as usize,
    };
    config.validate()?;
    strait_proxy::net::raise_descriptor_limit(config.max_connections, "--max-connections");
    let anchors = match (&args.trust_anchors, &args.trust_anchors_pem) {
        (Some(path), _) => TrustAnchors::load(path)?,
        (None, Some(pem)) => {
            TrustAnchors::from_pem(pem.as_bytes(), "STRAIT_PROXY_TRUST_ANCHORS_PEM")?
        }
        // clap requires one of them.
        (None, None) => anyhow::bail!("--trust-anchors or --trust-anchors-pem is required"),
    };
    let mut registry = Registry::default();
    let identity_metrics = IdentityMetrics::register(&mut registry);
    let (store, _rotation) = identity(&args, &anchors, &identity_metrics)?;
    // Discovery first, then the static file, then DNS (and, for a name
    // nothing knows, the original destination).
    let mut resolvers: Vec<Box<dyn Resolve>> = Vec::new();
    if let Some(addr) = &args.destination_addr {
        let mut resolver = GrpcResolver::parse(addr)?;
        if let Some(id) = &args.destination_identity {
            let id = SpiffeId::parse(id).context("--destination-identity")?;
            let sink: strait_proxy::identity::RefusalSink = Arc::new(|_| {});
            let tls = strait_proxy::tls::client_config(
                strait_proxy::identity::ExpectedPeerVerifier::new(anchors.roots(), id, sink),
                store.clone(),
                &[strait_proxy::tls::CONTROL_PLANE_ALPN],
            )?;
            resolver = resolver.with_tls(Arc::new(tls));
        }
        resolvers.push(Box::new(resolver));
    }
    if let Some(path) = &args.destinations {
        resolvers.push(Box::new(StaticResolver::load(path)?));
    }
    resolvers.push(Box::new(DnsResolver::default().with_metrics(&mut registry)));
    let proxy = Proxy::start(config, store, anchors, Arc::new(Chain(resolvers)), registry).await?;
    let v6 = proxy
        .outbound_ipv6_addr()
        .map(|a| format!(" and {a}"))
        .unwrap_or_default();
    println!(
        "strait-proxy up: outbound {}{v6}, inbound {}, admin http://{}",
        proxy.outbound_addr(),
        proxy.inbound_addr(),
        proxy.admin_addr()
    );
    tokio::select! {
        () = strait_proxy::admin::terminated() => tracing::info!("SIGTERM: draining"),
        () = proxy.drain_requested() => tracing::info!("/shutdown: draining"),
    }
    let cut = proxy.shutdown().await;
    if cut > 0 {
        tracing::warn!(connections = cut, "drain deadline passed; closing the rest");
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli: Cli = match strait_proxy::cli::parse() {
        Ok(c) => c,
        Err(code) => return code,
    };
    strait_proxy::cli::init("warn,strait_proxy=info");
    strait_proxy::cli::exit(match cli.command {
        Command::Init(a) => {
            let mut cfg = InitConfig::new(a.proxy_uid);
            cfg.inbound_port = a.inbound_port;
            cfg.outbound_port = a.outbound_port;
            cfg.admin_port = a.admin_port;
            cfg.skip_inbound_ports = a.skip_inbound_ports;
            cfg.skip_outbound_ports = a.skip_outbound_ports;
            cfg.ipv6 = a.ipv6;
            apply(&cfg)
                .map(|applied| println!("{applied}"))
                .map_err(anyhow::Error::from)
        }
        Command::Run(a) => strait_proxy::cli::run_async(a.threads.map(usize::from), run(*a)),
    })
}
