//! Peering: each gateway serves its export catalog to linked peers as the
//! gRPC service `strait.peer.v1.Peering`, over the QUIC tunnel itself: the
//! dialing gateway opens a bidirectional stream with a `PEERING` header and
//! speaks HTTP/2 on it, so the catalog rides the same mutually
//! authenticated connection as the traffic and needs no second port,
//! certificate check or firewall rule.

use std::sync::Arc;

use strait_proto::peer::v1::peering_client::PeeringClient;
use strait_proto::peer::v1::peering_server::{Peering, PeeringServer};
use strait_proto::peer::v1::{
    self as pb, catalog_update::Update, CatalogUpdate, WatchExportsRequest,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::catalog::{diff, Catalog, ClusterState, Export, ServiceKey};
use crate::metrics::{GatewayMetrics, PeerLabels};
use crate::state::PeerConn;
use crate::tunnel::io::PeerInfo;
use crate::tunnel::{frame, TunnelIo};

/// The exporting side: streams this cluster's catalog to a peer.
#[derive(Clone, Debug)]
pub struct CatalogService {
    cluster: String,
    local: watch::Receiver<Arc<ClusterState>>,
}

impl CatalogService {
    /// A service over the local cluster state.
    pub fn new(cluster: String, local: watch::Receiver<Arc<ClusterState>>) -> Self {
        Self { cluster, local }
    }

    /// Serves peering streams handed over by the tunnel until `streams`
    /// closes.
    pub async fn serve(self, streams: mpsc::Receiver<TunnelIo>) {
        use futures::StreamExt;
        let incoming = ReceiverStream::new(streams).map(Ok::<_, std::io::Error>);
        // One watch per tunnel connection is all a peer needs (ingress
        // refuses a second peering stream); bound HTTP/2 streams too.
        let result = tonic::transport::Server::builder()
            // Dead peers are found out even where the transport (TCP)
            // would wait for hours.
            .http2_keepalive_interval(Some(KEEPALIVE))
            .http2_keepalive_timeout(Some(KEEPALIVE))
            .max_concurrent_streams(4)
            .concurrency_limit_per_connection(4)
            .add_service(PeeringServer::new(self))
            .serve_with_incoming(incoming)
            .await;
        if let Err(error) = result {
            tracing::warn!(%error, "peering server stopped");
        }
    }
}

fn snapshot(cluster: &str, revision: u64, catalog: &Catalog) -> CatalogUpdate {
    CatalogUpdate {
        revision,
        update: Some(Update::Snapshot(pb::Snapshot {
            cluster: cluster.to_string(),
            exports: catalog.values().map(pb::Export::from).collect(),
        })),
    }
}

#[tonic::async_trait]
impl Peering for CatalogService {
    type WatchExportsStream = ReceiverStream<Result<CatalogUpdate, Status>>;

    async fn watch_exports(
        &self,
        request: Request<WatchExportsRequest>,
    ) -> Result<Response<Self::WatchExportsStream>, Status> {
        let peer = request
            .extensions()
            .get::<PeerInfo>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("peering is served only inside the tunnel"))?;
        tracing::info!(peer = %peer.name, "peer watching exports");
        let (tx, rx) = mpsc::channel(16);
        let mut local = self.local.clone();
        let cluster = self.cluster.clone();
        tokio::spawn(async move {
            let mut sent = local.borrow_and_update().catalog();
            let mut revision = 1;
            if tx
                .send(Ok(snapshot(&cluster, revision, &sent)))
                .await
                .is_err()
            {
                return;
            }
            loop {
                tokio::select! {
                    changed = local.changed() => if changed.is_err() { return },
                    _ = tx.closed() => return,
                }
                let now = local.borrow_and_update().catalog();
                let (upserted, removed) = diff(&sent, &now);
                if upserted.is_empty() && removed.is_empty() {
                    continue;
                }
                revision += 1;
                let update = CatalogUpdate {
                    revision,
                    update: Some(Update::Delta(pb::Delta {
                        upserted: upserted.iter().map(pb::Export::from).collect(),
                        removed: removed.iter().map(pb::ExportKey::from).collect(),
                    })),
                };
                if tx.send(Ok(update)).await.is_err() {
                    return;
                }
                sent = now;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// What a received update asks of the import registry.
#[derive(Debug, PartialEq)]
pub enum CatalogChange {
    /// Replace the peer's whole catalog.
    Snapshot(Vec<Export>),
    /// Apply changes.
    Delta(Vec<Export>, Vec<ServiceKey>),
}

/// Converts a received update, dropping (and counting in `invalid`) every
/// export that does not validate. Pure.
pub fn convert(update: CatalogUpdate, invalid: &mut u64) -> Option<CatalogChange> {
    let mut keep = |exports: Vec<pb::Export>| -> Vec<Export> {
        exports
            .iter()
            .filter_map(|e| match Export::try_from(e) {
                Ok(e) => Some(e),
                Err(error) => {
                    tracing::warn!(%error, namespace = %e.namespace, name = %e.name, "refusing invalid export");
                    *invalid += 1;
                    None
                }
            })
            .collect()
    };
    match update.update? {
        Update::Snapshot(s) => Some(CatalogChange::Snapshot(keep(s.exports))),
        Update::Delta(d) => {
            let removed = d.removed.iter().map(ServiceKey::from).collect();
            Some(CatalogChange::Delta(keep(d.upserted), removed))
        }
    }
}

/// HTTP/2 pings on the peering channel, both ways: a silent peer is
/// declared gone within two intervals.
const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(10);

/// The largest catalog message taken from a peer: a snapshot carries every
/// export at once, and the most a peer may export
/// ([`crate::state::MAX_EXPORTS_PER_PEER`] services of a few ports each)
/// is several times tonic's default of 4 MiB, past which the watch would
/// fail, and fail again, for as long as the catalog stays that large.
pub const MAX_CATALOG_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Why watching a peer's catalog stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WatchError {
    /// The gRPC channel could not be set up over the tunnel.
    #[error("peering channel: {0}")]
    Channel(#[from] tonic::transport::Error),
    /// The peer answered with an error status.
    #[error("peering call: {0}")]
    Status(#[from] Status),
    /// The peer ended the stream.
    #[error("peer ended the catalog stream")]
    Ended,
}

/// Watches a peer's catalog over `conn`, calling `apply` with every
/// change, until the stream or the connection fails.
pub async fn watch_peer(
    conn: PeerConn,
    first: Option<TunnelIo>,
    peer: PeerInfo,
    cluster: &str,
    source_identity: &str,
    metrics: &GatewayMetrics,
    mut apply: impl FnMut(CatalogChange),
) -> Result<(), WatchError> {
    let header = frame::encode(&frame::peering_header(source_identity))
        .map_err(|e| Status::internal(e.to_string()))?;
    let invalid_exports = metrics
        .invalid_exports
        .get_or_create(&PeerLabels {
            peer: peer.name.clone(),
        })
        .clone();
    // The first connection may already be open (TCP dials it to learn that
    // the tunnel is up); later ones are opened on demand.
    let first = Arc::new(std::sync::Mutex::new(first));
    let connector = tower::service_fn(move |_uri: http::Uri| {
        let conn = conn.clone();
        let ready = first.lock().unwrap_or_else(|e| e.into_inner()).take();
        let header = header.clone();
        let peer = peer.clone();
        async move {
            let io = match ready {
                Some(io) => io,
                None => conn.open(&header, peer).await?,
            };
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(io))
        }
    });
    let channel = tonic::transport::Endpoint::from_static("http://peer.strait.invalid")
        .http2_keep_alive_interval(KEEPALIVE)
        .keep_alive_timeout(KEEPALIVE)
        .keep_alive_while_idle(true)
        .connect_with_connector(connector)
        .await?;
    let mut client =
        PeeringClient::new(channel).max_decoding_message_size(MAX_CATALOG_MESSAGE_BYTES);
    let mut stream = client
        .watch_exports(WatchExportsRequest {
            cluster: cluster.to_string(),
        })
        .await?
        .into_inner();
    while let Some(update) = stream.message().await? {
        let mut invalid = 0;
        if let Some(change) = convert(update, &mut invalid) {
            apply(change);
        }
        invalid_exports.inc_by(invalid);
    }
    Err(WatchError::Ended)
}
