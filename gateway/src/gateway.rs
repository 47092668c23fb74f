//! Wiring: [`Gateway::start`] turns a [`GatewayConfig`] into running
//! tasks (identity and rotation, cluster source, tunnel endpoint, peering,
//! links, egress listeners, DNS, admin) sharing one [`Shared`] context.

use std::collections::HashMap;
use std::net::IpAddr;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus_client::registry::Registry;
use strait_dns::{
    DnsMetrics, DnsServer, ServiceKind, ServicePort, ServiceRecord, Zone, ZoneHandle,
};
use strait_proxy::admin::{AdminServer, Readiness};
use strait_proxy::identity::{
    spawn_rotation, AllowedPeers, CertStore, Issuer, LinkedPeersVerifier, SpiffeId, TrustAnchors,
};
use strait_proxy::net::Limit;
use strait_proxy::tls;
use tokio::sync::{mpsc, watch, Semaphore};

use crate::catalog::{ClusterState, Protocol, ServiceType};
use crate::config::GatewayConfig;
use crate::egress::{vip_listeners, Realized};
use crate::imports::Import;
use crate::imports::{ImportTable, VipAllocator};
use crate::k8s::source::{Caches, KubeSource, KubeSourceSettings, TaskSet};
use crate::links::{self, LinkEntry};
use crate::metrics::GatewayMetrics;
use crate::peering::CatalogService;
use crate::source::file::FileSource;
use crate::source::ClusterSource;
use crate::state::{Imports, Peers};
use crate::tunnel::{TunnelEndpoint, TunnelIo};
use crate::{admin, egress, ingress};

/// The clusterset DNS zone.
pub const CLUSTERSET_ZONE: &str = "clusterset.local";

/// Why a gateway could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Certificates could not be loaded or issued.
    #[error("identity: {0}")]
    Identity(#[from] strait_proxy::identity::CertError),
    /// TLS configuration failed.
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
    /// The cluster source failed its first load.
    #[error("cluster source: {0}")]
    Source(#[from] crate::source::file::FileSourceError),
    /// The Kubernetes API could not be reached or read.
    #[error("kubernetes: {0}")]
    Kube(String),
    /// The tunnel endpoint could not start.
    #[error("tunnel: {0}")]
    Tunnel(#[from] crate::tunnel::endpoint::TunnelError),
    /// The DNS server could not start.
    #[error("dns: {0}")]
    Dns(#[from] strait_dns::DnsError),
    /// The DNS zone could not be built.
    #[error("dns zone: {0}")]
    Zone(#[from] strait_dns::ZoneError),
    /// The destination discovery listener could not bind.
    #[error("destination server on {addr}: {source}")]
    Destination {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The identity service could not bind.
    #[error("identity server on {addr}: {source}")]
    IdentityServer {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The identity service's tokens file was refused.
    #[error(transparent)]
    Tokens(#[from] crate::identity::TokensFileError),
    /// The sidecar injector could not start (its certificate, its
    /// listener, the trust anchors it injects).
    #[error("injector: {0}")]
    Injector(String),
    /// The admin server could not bind.
    #[error("admin server on {addr}: {source}")]
    Admin {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// What the gateway's tasks share.
#[derive(Debug)]
pub struct Shared {
    /// This cluster's name.
    pub cluster: String,
    /// Trust anchors.
    pub anchors: TrustAnchors,
    /// The gateway's own certificate.
    pub certs: Arc<CertStore>,
    /// The QUIC endpoint.
    pub endpoint: TunnelEndpoint,
    /// Linked peers.
    pub peers: Arc<Peers>,
    /// The import registry.
    pub imports: Arc<Imports>,
    /// The local cluster state.
    pub local: watch::Receiver<Arc<ClusterState>>,
    /// Metrics.
    pub metrics: GatewayMetrics,
    /// Link name by the identity its peer presents.
    pub links_by_identity: RwLock<HashMap<SpiffeId, String>>,
    /// The identities the tunnel listener admits (the linked peers').
    pub allowed: AllowedPeers,
    /// Each configured link's generation; a connection accepted under a
    /// generation ends when it changes ([`crate::links::revoked`]).
    pub link_generations: watch::Sender<HashMap<String, u64>>,
    /// The import table made real (listeners and DNS records).
    pub realized: watch::Sender<Arc<Realized>>,
    /// Where accepted peering streams go.
    pub peering_tx: mpsc::Sender<TunnelIo>,
    /// The connections each peer dialed to us.
    pub accepted: Arc<crate::state::Accepted>,
    /// Each peer's open TCP peering watches.
    pub tcp_watches: crate::tunnel::io::WatchSlots,
    /// Endpoint balancers per exported service and port.
    pub balancers: crate::state::Balancers,
    /// Mutual TLS to meshed endpoints' proxies, as the gateway.
    pub mesh: strait_proxy::mesh::MeshClient,
    /// The meshed endpoints' proxies' inbound port.
    pub proxy_inbound_port: u16,
    /// The import table both the egress listeners and DNS last caught up
    /// with (set by the egress task once DNS has it too).
    pub egress_synced: watch::Sender<Arc<ImportTable>>,
    /// The realized table DNS last published.
    pub dns_synced: Arc<watch::Sender<Arc<Realized>>>,
    /// First reconnect delay.
    pub reconnect_min: Duration,
    /// Longest reconnect delay.
    pub reconnect_max: Duration,
    /// How long a lost peer's imports are kept.
    pub grace_period: Duration,
    /// The egress listeners' connections, at most `maxConnections`.
    pub egress_slots: Arc<Semaphore>,
    /// Streams from peers to endpoints, at most `maxConnections`.
    pub stream_limit: Limit,
}

/// Tasks aborted when dropped: a gateway that fails half-way through
/// starting leaves nothing running.
#[derive(Debug, Default)]
struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Tasks {
    fn push(&mut self, t: tokio::task::JoinHandle<()>) {
        self.0.push(t);
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// A running gateway. Dropping it stops it at once, tunnels closed without
/// waiting; [`Gateway::shutdown`] drains politely first.
pub struct Gateway {
    shared: Arc<Shared>,
    tasks: Tasks,
    dns: Option<DnsServer>,
    admin: AdminServer,
    destination: crate::destination::DestinationServer,
    identity: Option<crate::identity::IdentityServer>,
    injector: Option<SocketAddr>,
    tunnel_addr: SocketAddr,
    ready: Readiness,
    _source: Source,
}

/// The running cluster source (kept alive with the gateway).
#[allow(dead_code)]
enum Source {
    File(FileSource, watch::Sender<Arc<Vec<LinkEntry>>>),
    Kube(KubeSource, TaskSet),
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("cluster", &self.shared.cluster)
            .field("tunnel", &self.tunnel_addr)
            .finish_non_exhaustive()
    }
}

/// The DNS records for an import table, each import answered with the
/// address `ip` gives it; an import without one is left out (pure).
pub fn dns_records(
    table: &ImportTable,
    ip: impl Fn(&Import) -> Option<IpAddr>,
) -> Vec<ServiceRecord> {
    table
        .values()
        .filter_map(|i| Some((i, ip(i)?)))
        .map(|(i, ip)| ServiceRecord {
            namespace: i.key.namespace.clone(),
            name: i.key.name.clone(),
            kind: match i.service_type {
                ServiceType::ClusterSetIp => ServiceKind::ClusterSetIp,
                ServiceType::Headless => ServiceKind::Headless,
            },
            ips: vec![ip],
            // Per-endpoint records need per-endpoint addresses across the
            // tunnel, which imports do not carry yet.
            endpoints: Vec::new(),
            ports: i
                .ports
                .iter()
                .filter(|p| !p.name.is_empty())
                .map(|p| ServicePort {
                    name: p.name.clone(),
                    port: p.port,
                    protocol: match p.protocol {
                        Protocol::Tcp => strait_dns::PortProtocol::Tcp,
                        Protocol::Udp => strait_dns::PortProtocol::Udp,
                        Protocol::Sctp => strait_dns::PortProtocol::Sctp,
                    },
                })
                .collect(),
        })
        .collect()
}

impl Gateway {
    /// Starts a gateway; in Kubernetes mode with in-cluster credentials
    /// (or the local kubeconfig).
    pub async fn start(config: GatewayConfig) -> Result<Self, StartError> {
        // The kube client's TLS needs the one provider installed first.
        tls::install_default_provider();
        let client = match &config.source.kubernetes {
            Some(_) => Some(
                kube::Client::try_default()
                    .await
                    .map_err(|e| StartError::Kube(format!("no API credentials: {e}")))?,
            ),
            None => None,
        };
        Self::start_with_client(config, client).await
    }

    /// Starts a gateway with the given API client (required in Kubernetes
    /// mode, ignored in file mode).
    pub async fn start_with_client(
        config: GatewayConfig,
        client: Option<kube::Client>,
    ) -> Result<Self, StartError> {
        tls::install_default_provider();
        config.validate()?;
        strait_proxy::net::raise_descriptor_limit(
            config.max_connections as usize,
            "maxConnections",
        );
        let mut registry = Registry::default();
        let metrics = GatewayMetrics::register(&mut registry);
        let dns_metrics = DnsMetrics::register(&mut registry);

        // Identity.
        let anchors = TrustAnchors::load(&config.identity.trust_anchors)?;
        let issuer = Arc::new(Issuer::load(
            &config.identity.issuer_cert,
            &config.identity.issuer_key,
        )?);
        let own_id = crate::config::gateway_identity(&config.trust_domain())?;
        let lifetime = Duration::from_secs(config.identity.leaf_lifetime_seconds);
        let leaf = issuer.issue(&own_id, lifetime)?;
        let certs = CertStore::new(&leaf)?;
        metrics
            .cert_expiry
            .set(strait_proxy::metrics::unix_seconds(leaf.not_after));
        let expiry = metrics.cert_expiry.clone();
        let mut tasks = Tasks::default();
        tasks.push(spawn_rotation(
            issuer.clone(),
            certs.clone(),
            lifetime,
            Duration::from_secs(30),
            move |t| {
                expiry.set(strait_proxy::metrics::unix_seconds(t));
            },
        ));

        // Cluster source and the desired links.
        let (links_tx, links_rx) = watch::channel(Arc::new(Vec::new()));
        let (link_errors_tx, link_errors_rx) = watch::channel(Arc::default());
        let (source, local, caches) = match (&config.source.kubernetes, &config.source.file) {
            (Some(k), _) => {
                let client = client
                    .clone()
                    .ok_or_else(|| StartError::Kube("no API client".into()))?;
                let mut kube_tasks = TaskSet::default();
                let caches = Caches::start(
                    client,
                    &k.namespace(),
                    &k.gateway_selector,
                    metrics
                        .mirror
                        .errors
                        .get_or_create(&crate::metrics::KindLabels { kind: "watch" })
                        .clone(),
                    &mut kube_tasks,
                )
                .await
                .map_err(|e| StartError::Kube(format!("caches: {e}")))?;
                let source = KubeSource::start(
                    caches.clone(),
                    KubeSourceSettings {
                        export_label: k.export_label.clone(),
                        debounce: Duration::from_millis(100),
                        trust_domain: config.trust_domain(),
                    },
                    metrics
                        .mirror
                        .errors
                        .get_or_create(&crate::metrics::KindLabels { kind: "skipped" })
                        .clone(),
                );
                kube_tasks.push(tokio::spawn(crate::k8s::links::run(
                    caches.clone(),
                    config.cluster.clone(),
                    links_tx,
                    link_errors_tx,
                )));
                let local = source.watch();
                (Source::Kube(source, kube_tasks), local, Some(caches))
            }
            (None, Some(file)) => {
                let source = FileSource::start(
                    file.clone(),
                    Duration::from_millis(config.source.poll_interval_ms),
                    metrics.source_reloads.clone(),
                )?;
                let mut entries = Vec::new();
                for link in &config.links {
                    entries.push(LinkEntry {
                        name: link.name.clone(),
                        identity: config.link_identity(link)?,
                        addresses: link.addresses.clone(),
                        accept: None,
                        trust_bundle: None,
                        transport: link.transport,
                    });
                }
                links_tx.send_replace(Arc::new(entries));
                let local = source.watch();
                (Source::File(source, links_tx), local, None)
            }
            (None, None) => {
                return Err(crate::config::ConfigError::Invalid {
                    field: "source".into(),
                    message: "set exactly one of `file` and `kubernetes`".into(),
                }
                .into())
            }
        };

        // The tunnel endpoint, admitting linked peers only.
        let peers = Arc::new(Peers::default());
        let allowed = AllowedPeers::default();
        let server_tls = tls::server_config(
            LinkedPeersVerifier::new(anchors.roots(), allowed.clone(), metrics.tls.sink("accept"))?,
            certs.clone(),
            &[tls::TUNNEL_ALPN],
        )?;
        let tcp_tls = Arc::new(server_tls.clone());
        let (endpoint, tunnel_addr, tcp_listener) =
            bind_tunnel(config.listen.tunnel, server_tls, &config.tunnel_config()).await?;

        let imports = Arc::new(Imports::new(
            VipAllocator::new(config.imports.vip_range, config.imports.state_file.clone()),
            peers.clone(),
            metrics.clone(),
        ));
        let (peering_tx, peering_rx) = mpsc::channel(64);
        let mesh = strait_proxy::mesh::MeshClient::new(
            certs.clone(),
            anchors.roots(),
            metrics.tls.sink("endpoint"),
            crate::ingress::CONNECT_TIMEOUT,
        );
        let max_connections = config.max_connections as usize;
        let shared = Arc::new(Shared {
            cluster: config.cluster.clone(),
            anchors,
            certs,
            endpoint,
            peers,
            imports: imports.clone(),
            local: local.clone(),
            metrics: metrics.clone(),
            links_by_identity: RwLock::default(),
            allowed,
            link_generations: watch::channel(HashMap::new()).0,
            realized: watch::channel(Arc::new(Realized::default())).0,
            peering_tx,
            accepted: Default::default(),
            tcp_watches: Default::default(),
            balancers: Default::default(),
            mesh,
            proxy_inbound_port: config.mesh.proxy_inbound_port,
            egress_synced: watch::channel(Arc::new(ImportTable::new())).0,
            dns_synced: Arc::new(watch::channel(Arc::new(Realized::default())).0),
            reconnect_min: Duration::from_millis(config.tunnel.reconnect_min_ms),
            reconnect_max: Duration::from_millis(config.tunnel.reconnect_max_ms),
            grace_period: Duration::from_secs(config.imports.grace_period_seconds),
            egress_slots: Arc::new(Semaphore::new(max_connections)),
            stream_limit: {
                let metrics = metrics.clone();
                Limit::new(
                    Arc::new(Semaphore::new(max_connections)),
                    "streams from peers",
                )
                .on_limit(move || metrics.limit_reached("inbound"))
            },
        });
        tasks.push(tokio::spawn(links::supervise(shared.clone(), links_rx)));

        // The import table made real: VIPs outside Kubernetes; the mirror's
        // allocations and ClusterIPs inside.
        match (&caches, &config.source.kubernetes) {
            (Some(caches), Some(k)) => {
                tasks.push(tokio::spawn(realize_kube(
                    shared.clone(),
                    caches.clone(),
                    k.egress_address,
                    k.egress_port_min..=k.egress_port_max,
                )));
                let (leading_tx, leading_rx) = watch::channel(false);
                let client = client
                    .clone()
                    .ok_or_else(|| StartError::Kube("no API client".into()))?;
                tasks.push(tokio::spawn(crate::k8s::lease::run(
                    client.clone(),
                    crate::k8s::lease::LeaseSettings {
                        namespace: k.namespace(),
                        name: k.lease_name.clone(),
                        identity: k.replica(),
                        duration: Duration::from_secs(k.lease_duration_seconds),
                        renew_every: Duration::from_secs(k.lease_renew_seconds),
                    },
                    leading_tx,
                )));
                let Source::Kube(source, _) = &source else {
                    return Err(StartError::Kube("source mismatch".into()));
                };
                tasks.push(tokio::spawn(crate::k8s::mirror::writer::run(
                    crate::k8s::mirror::writer::WriterContext {
                        client,
                        caches: caches.clone(),
                        imports: imports.clone(),
                        peers: shared.peers.clone(),
                        local: local.clone(),
                        skipped: source.skipped(),
                        link_errors: link_errors_rx,
                        leading: leading_rx,
                        egress_ports: k.egress_port_min..=k.egress_port_max,
                        resync: Duration::from_secs(5),
                        grace_period: Duration::from_secs(config.imports.grace_period_seconds),
                        metrics: metrics.mirror.clone(),
                    },
                )));
            }
            _ => tasks.push(tokio::spawn(realize_vips(shared.clone()))),
        }

        // DNS, following the realized table.
        let ttl = config.imports.dns_ttl_seconds;
        let zone =
            ZoneHandle::with_metrics(Zone::build(CLUSTERSET_ZONE, &[], ttl)?, dns_metrics.clone());
        let dns = DnsServer::bind(config.listen.dns, zone.clone(), dns_metrics).await?;
        let mut realized_rx = shared.realized.subscribe();
        let dns_synced = shared.dns_synced.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let realized = realized_rx.borrow_and_update().clone();
                let records = realized.records.clone();
                // Building and publishing a large zone takes a fraction of
                // a second of CPU: off the async workers.
                let zone = zone.clone();
                let built = tokio::task::spawn_blocking(move || {
                    match Zone::build(CLUSTERSET_ZONE, &records, ttl) {
                        Ok(z) => zone.publish(z),
                        Err(error) => {
                            tracing::error!(%error, "cannot build DNS zone; keeping the last one")
                        }
                    }
                })
                .await;
                if built.is_err() {
                    tracing::error!("DNS zone build panicked; keeping the last one");
                }
                dns_synced.send_replace(realized);
                if realized_rx.changed().await.is_err() {
                    return;
                }
            }
        }));

        // Exports gauge.
        let mut local_rx = local.clone();
        let exports = metrics.exports.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                exports.set(local_rx.borrow_and_update().catalog().len() as i64);
                if local_rx.changed().await.is_err() {
                    return;
                }
            }
        }));

        tasks.push(tokio::spawn(
            CatalogService::new(config.cluster.clone(), local).serve(peering_rx),
        ));
        tasks.push(tokio::spawn(ingress::run(shared.clone())));
        tasks.push(tokio::spawn(ingress::run_tcp(
            shared.clone(),
            tcp_listener,
            tcp_tls,
        )));
        tasks.push(tokio::spawn(egress::run(shared.clone())));

        let destination_tls = if config.listen.destination_mtls {
            Some(crate::destination::server_tls(
                &shared.anchors,
                shared.certs.clone(),
                metrics.tls.sink("destination"),
            )?)
        } else {
            None
        };
        let destination = crate::destination::DestinationServer::bind(
            config.listen.destination,
            shared.local.clone(),
            destination_tls,
            {
                let metrics = metrics.clone();
                move || metrics.limit_reached("destination")
            },
        )
        .await
        .map_err(|source| StartError::Destination {
            addr: config.listen.destination,
            source,
        })?;

        // Certificates for this cluster's sidecars: in Kubernetes their
        // tokens are reviewed by the API server, outside it a tokens file
        // lists them; with neither there is nobody to vouch for a caller.
        let authenticator = match (&client, &config.identity.tokens_file) {
            (Some(client), _) if config.source.kubernetes.is_some() => {
                Some(crate::identity::Authenticator::token_review(
                    client.clone(),
                    config.identity.token_audience.clone(),
                ))
            }
            (_, Some(path)) => {
                let (tokens, text) = crate::identity::StaticTokens::load(path)?;
                let (tx, rx) = watch::channel(tokens);
                tasks.push(crate::identity::spawn_tokens_reload(
                    path.clone(),
                    text,
                    tx,
                    Duration::from_secs(1),
                    metrics.tokens_reloads.clone(),
                ));
                Some(crate::identity::Authenticator::Static(rx))
            }
            _ => None,
        };
        let identity = match authenticator {
            Some(authenticator) => {
                let service = crate::identity::IdentityService::new(
                    issuer,
                    shared.certs.id().clone(),
                    authenticator,
                    lifetime,
                    metrics.identity_requests.clone(),
                );
                let addr = config.listen.identity;
                Some(
                    crate::identity::IdentityServer::bind(addr, service, shared.certs.clone(), {
                        let metrics = metrics.clone();
                        move || metrics.limit_reached("identity")
                    })
                    .await
                    .map_err(|source| StartError::IdentityServer { addr, source })?,
                )
            }
            None => None,
        };

        let injector = match &config.injector {
            Some(i) => {
                let failed = |e: &dyn std::fmt::Display| StartError::Injector(e.to_string());
                let cert = crate::k8s::webhook::ReloadingCert::load(&i.cert_file, &i.key_file)
                    .map_err(|e| failed(&e))?;
                let tls = cert.server_config().map_err(|e| failed(&e))?;
                let anchors =
                    std::fs::read_to_string(&config.identity.trust_anchors).map_err(|e| {
                        failed(&format!("{}: {e}", config.identity.trust_anchors.display()))
                    })?;
                let inject = crate::k8s::inject::InjectConfig {
                    image: i.image.clone(),
                    trust_domain: config.trust_domain(),
                    trust_anchors_pem: anchors,
                    control_plane_namespace: config.source.kubernetes.as_ref().map_or_else(
                        || crate::config::GATEWAY_NAMESPACE.to_string(),
                        |k| k.namespace(),
                    ),
                    destination_mtls: config.listen.destination_mtls,
                    ipv6: i.ipv6,
                    token_audience: config.identity.token_audience.clone(),
                    proxy_inbound_port: config.mesh.proxy_inbound_port,
                };
                let listener = strait_proxy::net::bind_listener(i.listen)
                    .map_err(|e| failed(&format!("{}: {e}", i.listen)))?;
                let addr = listener.local_addr().map_err(|e| failed(&e))?;
                let inject = Arc::new(arc_swap::ArcSwap::from_pointee(inject));
                tasks.push(tokio::spawn(crate::k8s::webhook::watch_files(
                    cert,
                    config.identity.trust_anchors.clone(),
                    inject.clone(),
                    Duration::from_secs(10),
                )));
                tasks.push(tokio::spawn(crate::k8s::webhook::serve(
                    listener,
                    Arc::new(tls),
                    inject,
                    metrics.injector_requests.clone(),
                )));
                Some(addr)
            }
            None => None,
        };

        let ready = Readiness::default();
        let router = strait_proxy::admin::router(Arc::new(registry), ready.clone())
            .merge(admin::api(shared.clone(), tunnel_addr));
        let admin = AdminServer::bind(config.listen.admin, router)
            .await
            .map_err(|source| StartError::Admin {
                addr: config.listen.admin,
                source,
            })?;
        ready.set(true);
        tracing::info!(
            cluster = %config.cluster,
            identity = %shared.certs.id(),
            tunnel = %tunnel_addr,
            dns = %dns.local_addr(),
            admin = %admin.local_addr(),
            "gateway started"
        );
        Ok(Self {
            shared,
            tasks,
            dns: Some(dns),
            admin,
            destination,
            identity,
            injector,
            tunnel_addr,
            ready,
            _source: source,
        })
    }

    /// The tunnel's UDP address.
    pub fn tunnel_addr(&self) -> SocketAddr {
        self.tunnel_addr
    }

    /// The DNS address (UDP and TCP).
    pub fn dns_addr(&self) -> SocketAddr {
        self.dns
            .as_ref()
            .map_or(self.tunnel_addr, DnsServer::local_addr)
    }

    /// The admin HTTP address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr()
    }

    /// The destination discovery (gRPC) address, for sidecar proxies.
    pub fn destination_addr(&self) -> SocketAddr {
        self.destination.local_addr()
    }

    /// The identity service's address, when it is served.
    pub fn identity_addr(&self) -> Option<SocketAddr> {
        self.identity
            .as_ref()
            .map(crate::identity::IdentityServer::local_addr)
    }

    /// The sidecar injector's HTTPS address, when it is served.
    pub fn injector_addr(&self) -> Option<SocketAddr> {
        self.injector
    }

    /// This gateway's identity.
    pub fn identity(&self) -> &SpiffeId {
        self.shared.certs.id()
    }

    /// The import table now and as it changes.
    pub fn imports(&self) -> watch::Receiver<Arc<ImportTable>> {
        self.shared.imports.watch()
    }

    /// The import table the egress listeners and DNS have both caught up
    /// with: an import in it is reachable by name and address.
    pub fn egress_synced(&self) -> watch::Receiver<Arc<ImportTable>> {
        self.shared.egress_synced.subscribe()
    }

    /// Linked peers' status.
    pub fn peers(&self) -> Vec<crate::state::PeerStatus> {
        self.shared.peers.statuses()
    }

    /// How many TCP peering watches `peer` holds open on this gateway.
    pub fn tcp_watches(&self, peer: &str) -> usize {
        self.shared.tcp_watches.held(peer)
    }

    /// The metric families (for tests and embedding).
    pub fn metrics(&self) -> &GatewayMetrics {
        &self.shared.metrics
    }

    /// Stops politely: not ready, tunnels closed with a reason, DNS stopped.
    pub async fn shutdown(mut self) {
        self.ready.set(false);
        self.tasks = Tasks::default();
        self.shared.endpoint.close();
        self.shared.endpoint.wait_idle(Duration::from_secs(2)).await;
        if let Some(dns) = self.dns.take() {
            dns.shutdown().await;
        }
    }
}

/// Binds the QUIC endpoint (UDP) and, on the same port number, the TLS
/// over TCP listener. When the port is the kernel's choice (0) and TCP
/// cannot have the number UDP got, both are bound again.
async fn bind_tunnel(
    addr: SocketAddr,
    server_tls: rustls::ServerConfig,
    tuning: &crate::tunnel::TunnelConfig,
) -> Result<(TunnelEndpoint, SocketAddr, tokio::net::TcpListener), StartError> {
    use crate::tunnel::endpoint::TunnelError;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let endpoint = TunnelEndpoint::bind(addr, server_tls.clone(), tuning)?;
        let bound = endpoint
            .local_addr()
            .map_err(|source| TunnelError::Bind { addr, source })?;
        match strait_proxy::net::bind_listener(bound) {
            Ok(tcp) => return Ok((endpoint, bound, tcp)),
            Err(_) if addr.port() == 0 && attempts < 8 => continue,
            Err(source) => {
                return Err(TunnelError::Bind {
                    addr: bound,
                    source,
                }
                .into())
            }
        }
    }
}

/// Outside Kubernetes: every import on its VIP with its own ports.
async fn realize_vips(shared: Arc<Shared>) {
    let mut table_rx = shared.imports.watch();
    loop {
        let table = table_rx.borrow_and_update().clone();
        let realized = Realized {
            listeners: vip_listeners(&table),
            records: dns_records(&table, |i| Some(i.vip.into())),
            table,
        };
        shared.realized.send_replace(Arc::new(realized));
        if table_rx.changed().await.is_err() {
            return;
        }
    }
}

/// In Kubernetes: every import on the egress ports the mirror Services
/// record, answered in DNS with its clusterset Service's ClusterIP. Every
/// replica runs this (only the leader writes the Services).
async fn realize_kube(
    shared: Arc<Shared>,
    caches: Caches,
    listen: IpAddr,
    range: std::ops::RangeInclusive<u16>,
) {
    let mut table_rx = shared.imports.watch();
    let mut changed = caches.changed.clone();
    loop {
        let table = table_rx.borrow_and_update().clone();
        changed.borrow_and_update();
        let services = caches.services.state();
        let observed = crate::k8s::mirror::observe(services.iter().map(|s| &**s));
        let listeners = crate::k8s::mirror::listeners(&observed, &table, listen, &range);
        let records = dns_records(&table, |i| observed.clusterset_ips.get(&i.key).copied());
        let realized = Realized {
            table,
            listeners,
            records,
        };
        shared.realized.send_if_modified(|cur| {
            let differs = **cur != realized;
            if differs {
                *cur = Arc::new(realized);
            }
            differs
        });
        tokio::select! {
            r = table_rx.changed() => if r.is_err() { return },
            r = changed.changed() => if r.is_err() { return },
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // Tasks abort with `self.tasks`; connections held by per-stream
        // tasks close with the endpoint.
        self.shared.endpoint.close();
    }
}
