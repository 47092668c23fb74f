//! Wiring: [`Gateway::start`] turns a [`GatewayConfig`] into running
//! tasks (identity and rotation, cluster source, tunnel endpoint, peering,
//! links, egress listeners, DNS, admin) sharing one [`Shared`] context.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::registry::Registry;
use strait_dns::{
    DnsMetrics, DnsServer, ServiceKind, ServicePort, ServiceRecord, Zone, ZoneHandle,
};
use strait_proxy::admin::{AdminServer, Readiness};
use strait_proxy::identity::{
    spawn_rotation, AllowedPeers, CertStore, Issuer, LinkedPeersVerifier, SpiffeId, TrustAnchors,
};
use strait_proxy::tls;
use tokio::sync::{mpsc, watch};

use crate::catalog::{ClusterState, Protocol, ServiceType};
use crate::config::GatewayConfig;
use crate::imports::{ImportTable, VipAllocator};
use crate::links::{self, DialedLink};
use crate::metrics::GatewayMetrics;
use crate::peering::CatalogService;
use crate::source::file::FileSource;
use crate::source::ClusterSource;
use crate::state::{Imports, Peers};
use crate::tunnel::{QuicIo, TunnelEndpoint};
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
    pub links_by_identity: HashMap<SpiffeId, String>,
    /// Where accepted peering streams go.
    pub peering_tx: mpsc::Sender<QuicIo>,
    /// The connection each peer dialed to us.
    pub accepted: crate::state::Accepted,
    /// Endpoint balancers per exported service and port.
    pub balancers: crate::state::Balancers,
    /// The import table both the egress listeners and DNS last caught up
    /// with (set by the egress task once DNS has it too).
    pub egress_synced: watch::Sender<Arc<ImportTable>>,
    /// The import table DNS last published.
    pub dns_synced: Arc<watch::Sender<Arc<ImportTable>>>,
    /// First reconnect delay.
    pub reconnect_min: Duration,
    /// Longest reconnect delay.
    pub reconnect_max: Duration,
    /// How long a lost peer's imports are kept.
    pub grace_period: Duration,
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
    tunnel_addr: SocketAddr,
    ready: Readiness,
    _source: FileSource,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("cluster", &self.shared.cluster)
            .field("tunnel", &self.tunnel_addr)
            .finish_non_exhaustive()
    }
}

fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The DNS records for an import table (pure).
pub fn dns_records(table: &ImportTable) -> Vec<ServiceRecord> {
    table
        .values()
        .map(|i| ServiceRecord {
            namespace: i.key.namespace.clone(),
            name: i.key.name.clone(),
            kind: match i.service_type {
                ServiceType::ClusterSetIp => ServiceKind::ClusterSetIp,
                ServiceType::Headless => ServiceKind::Headless,
            },
            ips: vec![i.vip.into()],
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
    /// Starts a gateway.
    pub async fn start(config: GatewayConfig) -> Result<Self, StartError> {
        tls::install_default_provider();
        config.validate()?;
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
        metrics.cert_expiry.set(unix_seconds(leaf.not_after));
        let expiry = metrics.cert_expiry.clone();
        let mut tasks = Tasks::default();
        tasks.push(spawn_rotation(
            issuer,
            certs.clone(),
            lifetime,
            Duration::from_secs(30),
            move |t| {
                expiry.set(unix_seconds(t));
            },
        ));

        // Cluster source.
        let source = FileSource::start(
            config.source.file.clone(),
            Duration::from_millis(config.source.poll_interval_ms),
            metrics.source_reloads.clone(),
        )?;
        let local = source.watch();

        // Links and the tunnel endpoint.
        let peers = Arc::new(Peers::default());
        let allowed = AllowedPeers::default();
        let mut links_by_identity = HashMap::new();
        let mut dialed = Vec::new();
        for link in &config.links {
            let id = config.link_identity(link)?;
            peers.add(&link.name, id.as_str(), link.addresses.clone());
            links_by_identity.insert(id.clone(), link.name.clone());
            if !link.addresses.is_empty() {
                dialed.push(DialedLink {
                    name: link.name.clone(),
                    identity: id,
                    addresses: link.addresses.clone(),
                });
            }
        }
        allowed.set(links_by_identity.keys().cloned());
        let server_tls = tls::server_config(
            LinkedPeersVerifier::new(anchors.roots(), allowed, metrics.tls.sink("accept"))?,
            certs.clone(),
            &[tls::TUNNEL_ALPN],
        )?;
        let endpoint =
            TunnelEndpoint::bind(config.listen.tunnel, server_tls, &config.tunnel_config())?;
        let tunnel_addr =
            endpoint
                .local_addr()
                .map_err(|source| crate::tunnel::endpoint::TunnelError::Bind {
                    addr: config.listen.tunnel,
                    source,
                })?;

        let imports = Arc::new(Imports::new(
            VipAllocator::new(config.imports.vip_range, config.imports.state_file.clone()),
            peers.clone(),
            metrics.clone(),
        ));
        let (peering_tx, peering_rx) = mpsc::channel(64);
        let shared = Arc::new(Shared {
            cluster: config.cluster.clone(),
            anchors,
            certs,
            endpoint,
            peers,
            imports: imports.clone(),
            local: local.clone(),
            metrics: metrics.clone(),
            links_by_identity,
            peering_tx,
            accepted: Default::default(),
            balancers: Default::default(),
            egress_synced: watch::channel(Arc::new(ImportTable::new())).0,
            dns_synced: Arc::new(watch::channel(Arc::new(ImportTable::new())).0),
            reconnect_min: Duration::from_millis(config.tunnel.reconnect_min_ms),
            reconnect_max: Duration::from_millis(config.tunnel.reconnect_max_ms),
            grace_period: Duration::from_secs(config.imports.grace_period_seconds),
        });

        // DNS, following the import table.
        let ttl = config.imports.dns_ttl_seconds;
        let zone =
            ZoneHandle::with_metrics(Zone::build(CLUSTERSET_ZONE, &[], ttl)?, dns_metrics.clone());
        let dns = DnsServer::bind(config.listen.dns, zone.clone(), dns_metrics).await?;
        let mut table_rx = imports.watch();
        let dns_synced = shared.dns_synced.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let table = table_rx.borrow_and_update().clone();
                let records = dns_records(&table);
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
                dns_synced.send_replace(table);
                if table_rx.changed().await.is_err() {
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
        tasks.push(tokio::spawn(egress::run(shared.clone())));
        for link in dialed {
            tasks.push(tokio::spawn(links::run(link, shared.clone())));
        }

        let destination = crate::destination::DestinationServer::bind(
            config.listen.destination,
            shared.local.clone(),
        )
        .await
        .map_err(|source| StartError::Destination {
            addr: config.listen.destination,
            source,
        })?;

        let ready = Readiness::default();
        let router = strait_proxy::admin::router(Arc::new(registry), ready.clone())
            .merge(admin::api(shared.clone()));
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

impl Drop for Gateway {
    fn drop(&mut self) {
        // Tasks abort with `self.tasks`; connections held by per-stream
        // tasks close with the endpoint.
        self.shared.endpoint.close();
    }
}
