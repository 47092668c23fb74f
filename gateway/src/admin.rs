//! The gateway's admin API: `/api/peers`, `/api/imports`, `/api/exports`
//! (JSON), added to the shared admin routes (`/metrics`, `/ready`, `/live`).

use std::sync::Arc;

use axum::routing::get;
use axum::{Json, Router};

use crate::gateway::Shared;

/// One import as the API shows it.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImportView {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Clusterset DNS name.
    pub dns_name: String,
    /// Local virtual IP.
    pub vip: std::net::Ipv4Addr,
    /// ClusterSetIP or Headless.
    pub service_type: crate::catalog::ServiceType,
    /// Ports.
    pub ports: Vec<crate::catalog::Port>,
    /// Exporting peers.
    pub peers: Vec<String>,
}

/// The `/api` routes.
pub fn api(shared: Arc<Shared>) -> Router {
    let peers = shared.clone();
    let imports = shared.clone();
    let exports = shared;
    Router::new()
        .route(
            "/api/peers",
            get(move || {
                let peers = peers.clone();
                async move { Json(peers.peers.statuses()) }
            }),
        )
        .route(
            "/api/imports",
            get(move || {
                let imports = imports.clone();
                async move {
                    let table = imports.imports.current();
                    let views: Vec<ImportView> = table
                        .values()
                        .map(|i| ImportView {
                            namespace: i.key.namespace.clone(),
                            name: i.key.name.clone(),
                            dns_name: i.dns_name(),
                            vip: i.vip,
                            service_type: i.service_type,
                            ports: i.ports.clone(),
                            peers: i.peers.clone(),
                        })
                        .collect();
                    Json(views)
                }
            }),
        )
        .route(
            "/api/exports",
            get(move || {
                let exports = exports.clone();
                async move {
                    let catalog = exports.local.borrow().catalog();
                    Json(catalog.into_values().collect::<Vec<_>>())
                }
            }),
        )
}
