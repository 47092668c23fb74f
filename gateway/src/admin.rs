//! The gateway's admin API: `/api/info`, `/api/peers`, `/api/imports`,
//! `/api/exports` (JSON) and a dashboard at `/` that shows them (one
//! self-contained page, refreshed every 2 s), added to the shared admin
//! routes (`/metrics`, `/ready`, `/live`).

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
    /// Local virtual IP (outside Kubernetes).
    pub vip: std::net::Ipv4Addr,
    /// What DNS answers for it: the VIP, or in Kubernetes the clusterset
    /// Service's ClusterIP (absent until the mirror has one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<std::net::IpAddr>,
    /// ClusterSetIP or Headless.
    pub service_type: crate::catalog::ServiceType,
    /// Ports.
    pub ports: Vec<crate::catalog::Port>,
    /// Exporting peers.
    pub peers: Vec<String>,
}

/// Who this gateway is.
#[derive(Debug, serde::Serialize)]
pub struct InfoView {
    /// The cluster's name.
    pub cluster: String,
    /// The gateway's SPIFFE ID.
    pub identity: String,
    /// The tunnel's address (UDP, and TCP on the same port).
    pub tunnel: String,
    /// The software version.
    pub version: &'static str,
}

/// The dashboard page.
pub const DASHBOARD: &str = include_str!("dashboard.html");

/// The `/api` routes and the dashboard.
pub fn api(shared: Arc<Shared>, tunnel: std::net::SocketAddr) -> Router {
    let peers = shared.clone();
    let imports = shared.clone();
    let info = shared.clone();
    let exports = shared;
    Router::new()
        .route(
            "/",
            get(|| async {
                (
                    [
                        (http::header::CONTENT_TYPE, "text/html; charset=utf-8"),
                        // Nothing but this page's own inline code and the
                        // same-origin API.
                        (
                            http::header::CONTENT_SECURITY_POLICY,
                            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'",
                        ),
                    ],
                    DASHBOARD,
                )
            }),
        )
        .route(
            "/api/info",
            get(move || {
                let info = info.clone();
                async move {
                    Json(InfoView {
                        cluster: info.cluster.clone(),
                        identity: info.certs.id().to_string(),
                        tunnel: tunnel.to_string(),
                        version: env!("CARGO_PKG_VERSION"),
                    })
                }
            }),
        )
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
                    let realized = imports.realized.borrow().clone();
                    let address = |ns: &str, name: &str| {
                        realized
                            .records
                            .iter()
                            .find(|r| r.namespace == ns && r.name == name)
                            .and_then(|r| r.ips.first().copied())
                    };
                    let views: Vec<ImportView> = table
                        .values()
                        .map(|i| ImportView {
                            address: address(&i.key.namespace, &i.key.name),
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
