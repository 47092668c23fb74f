//! `strait`: the Strait gateway binary.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use strait_gateway::config::default_trust_domain;
use strait_gateway::demo::{Demo, DemoOptions};
use strait_gateway::k8s::crd::LinkTransport;
use strait_gateway::k8s::ctl;
use strait_gateway::{Gateway, GatewayConfig};
use strait_proxy::identity::{generate_issuer, generate_root, PemPair};

/// Strait links Kubernetes clusters: an edge gateway per cluster, mutually
/// authenticated QUIC tunnels between them, and clusterset DNS.
#[derive(Parser, Debug)]
#[command(name = "strait", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run one gateway from a config file.
    Gateway {
        /// The gateway config (YAML).
        #[arg(long, short)]
        config: PathBuf,
        /// Worker threads (default: one per CPU; 1 runs the single-threaded scheduler).
        #[arg(long, env = "STRAIT_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
        threads: Option<u16>,
    },
    /// Run two linked clusters (west, east) on this machine.
    Demo {
        /// Make one round trip, print a summary and exit.
        #[arg(long)]
        once: bool,
        /// Requests to send.
        #[arg(long, default_value_t = 6)]
        requests: usize,
        /// West's DNS address.
        #[arg(long, default_value = "127.0.0.1:15353")]
        west_dns: SocketAddr,
        /// West's admin address.
        #[arg(long, default_value = "127.0.0.1:14191")]
        west_admin: SocketAddr,
        /// West's tunnel address.
        #[arg(long, default_value = "127.0.0.1:14143")]
        west_tunnel: SocketAddr,
        /// West's destination discovery (gRPC) address.
        #[arg(long, default_value = "127.0.0.1:18086")]
        west_destination: SocketAddr,
        /// East's DNS address.
        #[arg(long, default_value = "127.0.0.1:25353")]
        east_dns: SocketAddr,
        /// East's admin address.
        #[arg(long, default_value = "127.0.0.1:24191")]
        east_admin: SocketAddr,
        /// East's tunnel address.
        #[arg(long, default_value = "127.0.0.1:24143")]
        east_tunnel: SocketAddr,
        /// East's destination discovery (gRPC) address.
        #[arg(long, default_value = "127.0.0.1:28086")]
        east_destination: SocketAddr,
    },
    /// Make certificates.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Print the custom resource definitions (Link, ServiceExport,
    /// ServiceImport) as YAML, for `kubectl apply -f -` or the chart.
    Crds,
    /// Print a Link to THIS cluster, to apply in a peer cluster:
    /// `strait link --name west | kubectl --context east apply -f -`
    /// (east's gateway then dials west's).
    Link {
        /// This cluster's name, which must match the `cluster` of its
        /// gateway config (a guard against the wrong --context); the
        /// Link's name and spec.cluster.
        #[arg(long, value_parser = label)]
        name: String,
        #[command(flatten)]
        cluster: ClusterArgs,
        /// An address peers dial, HOST[:PORT] (repeatable); default: the
        /// strait-gateway Service's load balancer addresses.
        #[arg(long = "address", value_name = "HOST[:PORT]", value_parser = address)]
        addresses: Vec<String>,
        /// The peer imports only this namespace's exports (repeatable;
        /// default: all).
        #[arg(long = "accept-namespace", value_name = "NS", value_parser = label)]
        accept_namespaces: Vec<String>,
        /// How the peer's gateway reaches this one: quic, tcp (TLS over
        /// TCP, where UDP is blocked) or auto (QUIC, else TCP).
        #[arg(long, value_enum, default_value_t = LinkTransport::Quic)]
        transport: LinkTransport,
        /// The issuer Secret (tls.crt, tls.key, ca.crt), if not the chart's.
        #[arg(long, default_value = ctl::objects::ISSUER_SECRET)]
        issuer_secret: String,
    },
    /// Add the sidecar proxy to the pods of Kubernetes manifests (like
    /// `linkerd inject`): `strait inject --cluster west --trust-anchors
    /// root.pem deploy.yaml | kubectl apply -f -`. Prints what it did to
    /// each object on stderr.
    Inject {
        /// Manifests (YAML, several documents allowed); `-` for stdin.
        #[arg(default_value = "-")]
        file: PathBuf,
        /// This cluster's name (its trust domain is `<name>.strait.local`).
        #[arg(long, value_parser = label, required_unless_present = "trust_domain")]
        cluster: Option<String>,
        /// The trust domain, if not `<cluster>.strait.local`.
        #[arg(long, conflicts_with = "cluster")]
        trust_domain: Option<String>,
        /// The trust anchors (the root the chart was installed with).
        #[arg(long)]
        trust_anchors: PathBuf,
        /// The `strait-proxy` image.
        #[arg(long, default_value = strait_gateway::config::PROXY_IMAGE)]
        image: String,
        /// The gateway's namespace.
        #[arg(long, default_value = "strait-system", value_parser = label)]
        control_plane_namespace: String,
        /// Speak mTLS to destination discovery (for a gateway with
        /// `listen.destinationMtls`).
        #[arg(long)]
        destination_mtls: bool,
        /// Pods have IPv6 addresses (dual-stack or IPv6 cluster): redirect
        /// and serve IPv6 too.
        #[arg(long)]
        ipv6: bool,
        /// The token audience the identity service checks (the gateway's
        /// `identity.tokenAudience`).
        #[arg(long, default_value = strait_gateway::k8s::inject::TOKEN_AUDIENCE)]
        token_audience: String,
        /// The proxies' inbound port (the gateway's `mesh.proxyInboundPort`).
        #[arg(long, default_value_t = 4143, value_parser = clap::value_parser!(u16).range(1..))]
        proxy_inbound_port: u16,
    },
    /// The linked peer gateways as this cluster sees them: alive, imports,
    /// round-trip time (from the Links' status).
    Gateways {
        #[command(flatten)]
        cluster: ClusterArgs,
        /// text or json.
        #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Check this cluster's Strait install: CRDs, gateway, links,
    /// certificates, clusterset DNS, CoreDNS stub domain. Exits 1 if a
    /// check fails (warnings are fine).
    Check {
        #[command(flatten)]
        cluster: ClusterArgs,
        /// `text` or `json` (an array of {name, status, detail}).
        #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
        output: Output,
        /// Certificates must stay valid for more than this many days.
        #[arg(long, default_value_t = 7, allow_negative_numbers = true, value_parser = clap::value_parser!(u64).range(0..=36_500))]
        min_cert_days: u64,
        /// Where to ask for dns-version.clusterset.local, IP[:PORT]
        /// (default: the strait-dns ClusterIP, port 53, reachable only
        /// inside the cluster; from outside, `kubectl -n strait-system
        /// port-forward service/strait-dns 5353:53` and 127.0.0.1:5353).
        #[arg(long, value_name = "IP[:PORT]", value_parser = dns_server)]
        dns_server: Option<SocketAddr>,
        /// The issuer Secret (tls.crt, tls.key, ca.crt), if not the chart's.
        #[arg(long, default_value = ctl::objects::ISSUER_SECRET)]
        issuer_secret: String,
    },
}

/// `strait inject`: manifests from `file` (or stdin) to stdout, with the
/// proxy added; a line per object on stderr.
fn inject(
    file: &std::path::Path,
    (cluster, trust_domain): (Option<String>, Option<String>),
    trust_anchors: &std::path::Path,
    settings: strait_gateway::k8s::inject::InjectConfig,
) -> anyhow::Result<()> {
    use std::io::Read;
    use strait_gateway::k8s::inject::{inject_yaml, InjectConfig, Outcome};
    let input = if file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading stdin")?;
        s
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    let trust_anchors_pem = std::fs::read_to_string(trust_anchors)
        .with_context(|| format!("reading {}", trust_anchors.display()))?;
    // The proxy would refuse them at start; better now.
    strait_proxy::identity::TrustAnchors::from_pem(
        trust_anchors_pem.as_bytes(),
        &trust_anchors.display().to_string(),
    )?;
    let trust_domain = match (trust_domain, cluster) {
        (Some(td), _) => td,
        (None, Some(c)) => strait_gateway::config::default_trust_domain(&c),
        (None, None) => anyhow::bail!("--cluster or --trust-domain is required"),
    };
    strait_proxy::identity::SpiffeId::workload(&trust_domain, "ns", "sa")
        .with_context(|| format!("trust domain {trust_domain:?}"))?;
    let config = InjectConfig {
        trust_domain,
        trust_anchors_pem,
        ..settings
    };
    let (yaml, reports) = inject_yaml(&input, &config)?;
    print!("{yaml}");
    for r in reports {
        match r.outcome {
            Outcome::Injected => eprintln!("{} injected", r.object),
            Outcome::Updated => {
                eprintln!("{} injected again (its proxy was out of date)", r.object)
            }
            Outcome::Skipped(why) => eprintln!("{} skipped: {why}", r.object),
        }
    }
    Ok(())
}

/// Which cluster's Strait install a command reads.
#[derive(clap::Args, Debug)]
struct ClusterArgs {
    /// The namespace of Strait (for `link`, also the Link's in the peer).
    #[arg(long, short = 'n', default_value = ctl::objects::NAMESPACE, value_parser = label)]
    namespace: String,
    /// The kubeconfig context of this cluster (default: the current one).
    #[arg(long)]
    context: Option<String>,
}

/// How `strait check` and `strait gateways` print.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Output {
    /// Aligned lines for people.
    Text,
    /// A JSON array for programs.
    Json,
}

fn label(s: &str) -> Result<String, String> {
    strait_gateway::catalog::validate_label("name", s)
        .map(|()| s.to_string())
        .map_err(|_| {
            "must be an RFC 1123 label (lowercase letters, digits, '-'; at most 63)".into()
        })
}

fn address(s: &str) -> Result<String, String> {
    ctl::check_address(s).map_err(|e| match e {
        ctl::CtlError::InvalidFlag { message, .. } => message,
        other => other.to_string(),
    })
}

fn dns_server(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.parse::<std::net::IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| "must be IP or IP:PORT (e.g. 127.0.0.1:5353)".into())
}

#[derive(Subcommand, Debug)]
enum CertsCommand {
    /// Make a trust anchor (root CA) for a clusterset: root.pem, root.key.
    Root {
        /// Output folder.
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// A name for the clusterset (in the certificate's subject).
        #[arg(long, default_value = "strait")]
        name: String,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Make a cluster's issuer (intermediate CA): <cluster>-issuer.pem/.key.
    Issuer {
        /// The cluster's name.
        #[arg(long)]
        cluster: String,
        /// The cluster's trust domain (default <cluster>.strait.local).
        #[arg(long)]
        trust_domain: Option<String>,
        /// The root certificate.
        #[arg(long, default_value = "root.pem")]
        root: PathBuf,
        /// The root key.
        #[arg(long, default_value = "root.key")]
        root_key: PathBuf,
        /// Output folder.
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
}

fn write_new(
    path: &std::path::Path,
    contents: &str,
    force: bool,
    private: bool,
) -> anyhow::Result<()> {
    use std::io::Write;
    let mut open = std::fs::OpenOptions::new();
    open.write(true);
    if force {
        open.create(true).truncate(true);
    } else {
        // Never follow or clobber what is there.
        open.create_new(true);
    }
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        // The key is never readable by others, not even for a moment.
        open.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = open.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            anyhow::anyhow!("{} exists (use --force to overwrite)", path.display())
        } else {
            anyhow::anyhow!("writing {}: {e}", path.display())
        }
    })?;
    file.write_all(contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

fn certs(cmd: CertsCommand) -> anyhow::Result<()> {
    match cmd {
        CertsCommand::Root { out, name, force } => {
            let root = generate_root(&name)?;
            write_new(&out.join("root.pem"), &root.cert_pem, force, false)?;
            write_new(&out.join("root.key"), &root.key_pem, force, true)?;
        }
        CertsCommand::Issuer {
            cluster,
            trust_domain,
            root,
            root_key,
            out,
            force,
        } => {
            strait_gateway::catalog::validate_label("cluster", &cluster)?;
            let pair = PemPair {
                cert_pem: std::fs::read_to_string(&root)
                    .with_context(|| format!("reading {}", root.display()))?,
                key_pem: std::fs::read_to_string(&root_key)
                    .with_context(|| format!("reading {}", root_key.display()))?,
            };
            let td = trust_domain.unwrap_or_else(|| default_trust_domain(&cluster));
            let issuer = generate_issuer(&pair, &td)?;
            write_new(
                &out.join(format!("{cluster}-issuer.pem")),
                &issuer.cert_pem,
                force,
                false,
            )?;
            write_new(
                &out.join(format!("{cluster}-issuer.key")),
                &issuer.key_pem,
                force,
                true,
            )?;
            println!("issuer for trust domain {td}");
        }
    }
    Ok(())
}

async fn demo(opts: DemoOptions, once: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    let demo = Demo::start(&opts).await?;
    println!(
        "west gateway: tunnel {} (QUIC), DNS {}, admin http://{}",
        demo.west.tunnel_addr(),
        demo.west.dns_addr(),
        demo.west.admin_addr()
    );
    println!(
        "east gateway: tunnel {} (QUIC), DNS {}, admin http://{}",
        demo.east.tunnel_addr(),
        demo.east.dns_addr(),
        demo.east.admin_addr()
    );
    println!("certificates and configs: {}", demo.dir.display());
    let summary = demo
        .round_trip(opts.requests, |line| println!("{line}"))
        .await?;
    let endpoints: Vec<String> = summary
        .served
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!(
        "ok: {} requests from west reached east's hello through the tunnel ({}); first response after {:.2?}, total {:.2?}",
        opts.requests,
        endpoints.join(", "),
        summary.first_response,
        started.elapsed()
    );
    if once {
        demo.west.shutdown().await;
        demo.east.shutdown().await;
        return Ok(());
    }
    println!();
    println!("try:");
    println!(
        "  dig @{} -p {} hello.demo.svc.clusterset.local",
        opts.west_dns.ip(),
        opts.west_dns.port()
    );
    println!("  curl http://{}:8080/", summary.vip);
    println!("  curl http://{}/metrics", opts.west_admin);
    println!("  curl http://{}/api/imports", opts.west_admin);
    for s in &demo.sidecars {
        println!(
            "  curl http://{}/metrics   ({}'s sidecar)",
            s.proxy.admin_addr(),
            s.name
        );
    }
    println!(
        "  open http://{}/ in a browser (the gateway dashboard)",
        opts.west_admin
    );
    println!("Ctrl-C to stop.");
    strait_proxy::admin::terminated().await;
    println!("stopping");
    demo.west.shutdown().await;
    demo.east.shutdown().await;
    Ok(())
}

async fn gateway(config: PathBuf) -> anyhow::Result<()> {
    let config = GatewayConfig::load(&config)?;
    let gw = Gateway::start(config).await?;
    println!(
        "gateway {} up: tunnel {}, DNS {}, admin http://{}",
        gw.identity(),
        gw.tunnel_addr(),
        gw.dns_addr(),
        gw.admin_addr()
    );
    strait_proxy::admin::terminated().await;
    tracing::info!("shutting down");
    tokio::time::timeout(Duration::from_secs(10), gw.shutdown())
        .await
        .ok();
    Ok(())
}

async fn link(req: ctl::LinkRequest, context: Option<String>) -> anyhow::Result<()> {
    let client = ctl::client(context.as_deref()).await?;
    let objects = ctl::gather_link(&client, &req).await;
    print!("{}", ctl::link_manifest(&req, &objects)?);
    Ok(())
}

async fn gateways(cluster: ClusterArgs, output: Output) -> anyhow::Result<()> {
    let client = ctl::client(cluster.context.as_deref()).await?;
    let rows = ctl::gateway_rows(&ctl::gather_gateways(&client, &cluster.namespace).await?);
    match output {
        Output::Text => print!("{}", ctl::render_gateways(&rows)),
        Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
    }
    Ok(())
}

async fn check(
    cluster: ClusterArgs,
    output: Output,
    min_cert_days: u64,
    dns_server: Option<SocketAddr>,
    issuer_secret: String,
) -> anyhow::Result<()> {
    let client = ctl::client(cluster.context.as_deref()).await?;
    let inputs = ctl::gather(&client, &cluster.namespace, &issuer_secret, dns_server).await;
    let results = ctl::evaluate(&inputs, std::time::SystemTime::now(), min_cert_days);
    match output {
        Output::Text => print!("{}", ctl::render_text(&results)),
        Output::Json => println!("{}", ctl::render_json(&results)?),
    }
    let failed = results
        .iter()
        .filter(|r| r.status == ctl::Status::Fail)
        .count();
    if failed > 0 {
        bail!("{failed} of {} checks failed", results.len());
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli: Cli = match strait_proxy::cli::parse() {
        Ok(c) => c,
        Err(code) => return code,
    };
    // The demo prints its own story; a gateway logs what it does.
    let default_filter = match cli.command {
        Command::Demo { .. } => "warn",
        // Failures are reported once, as the command's result.
        Command::Link { .. } | Command::Check { .. } | Command::Gateways { .. } => {
            "warn,kube_client=off"
        }
        _ => "warn,strait_gateway=info,strait_proxy=info",
    };
    strait_proxy::cli::init(default_filter);
    let result = match cli.command {
        Command::Certs { command } => certs(command),
        Command::Inject {
            file,
            cluster,
            trust_domain,
            trust_anchors,
            image,
            control_plane_namespace,
            destination_mtls,
            ipv6,
            token_audience,
            proxy_inbound_port,
        } => inject(
            &file,
            (cluster, trust_domain),
            &trust_anchors,
            strait_gateway::k8s::inject::InjectConfig {
                image,
                control_plane_namespace,
                destination_mtls,
                ipv6,
                token_audience,
                proxy_inbound_port,
                ..Default::default()
            },
        ),
        Command::Crds => strait_gateway::k8s::crd::crds_yaml()
            .map(|y| print!("{y}"))
            .context("rendering the CRDs"),
        Command::Link {
            name,
            cluster,
            addresses,
            accept_namespaces,
            transport,
            issuer_secret,
        } => {
            let req = ctl::LinkRequest {
                name,
                namespace: cluster.namespace,
                addresses,
                accept_namespaces,
                transport,
                issuer_secret,
            };
            strait_proxy::cli::run_async(Some(2), link(req, cluster.context))
        }
        Command::Gateways { cluster, output } => {
            strait_proxy::cli::run_async(Some(2), gateways(cluster, output))
        }
        Command::Check {
            cluster,
            output,
            min_cert_days,
            dns_server,
            issuer_secret,
        } => strait_proxy::cli::run_async(
            Some(2),
            check(cluster, output, min_cert_days, dns_server, issuer_secret),
        ),
        Command::Gateway { config, threads } => {
            strait_proxy::cli::run_async(threads.map(usize::from), gateway(config))
        }
        Command::Demo {
            once,
            requests,
            west_dns,
            west_admin,
            west_tunnel,
            west_destination,
            east_dns,
            east_admin,
            east_tunnel,
            east_destination,
        } => {
            let opts = DemoOptions {
                west_dns,
                west_admin,
                west_tunnel,
                west_destination,
                east_dns,
                east_admin,
                east_tunnel,
                east_destination,
                requests,
            };
            strait_proxy::cli::run_async(None, async move {
                if once {
                    tokio::time::timeout(Duration::from_secs(60), demo(opts, true))
                        .await
                        .unwrap_or_else(|_| bail!("demo did not finish within 60 s"))
                } else {
                    demo(opts, false).await
                }
            })
        }
    };
    strait_proxy::cli::exit(result)
}
