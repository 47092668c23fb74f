//! A stateful fake Kubernetes API server speaking the real HTTP wire
//! protocol, for running kube-rs clients, watchers and controllers
//! against in tests. One [`FakeKube`] is one cluster.
//!
//! It serves a fixed table of kinds (core Services, Pods, Secrets,
//! ConfigMaps, Namespaces, Endpoints; EndpointSlices; Leases;
//! Deployments; CRDs; Strait Links; MCS ServiceExports/ServiceImports),
//! stored as JSON, with discovery, get/list (selectors, pages)/watch
//! (bookmarks, 410 after compaction, streaming lists), create, update with
//! optimistic concurrency, merge/JSON patch, server-side apply with field
//! ownership, status subresources, delete/deletecollection, owner
//! garbage collection and ClusterIP allocation; and TokenReview for
//! service account tokens it issued ([`FakeKube::issue_token`]).
//!
//! Simplifications: namespaces need not exist before objects are created
//! in them (deleting one still deletes its objects, at once); deletion is
//! immediate (finalizers are ignored); strategic merge patch is a JSON
//! merge patch; in server-side apply every list is atomic; `dryRun` is
//! not supported; no authentication or admission.

mod apply;
mod http;
mod resources;
mod selector;
mod status;
mod store;
mod verbs;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use http::Shared;
use store::Store;

/// Requests served so far, counted by verb (`get`, `list`, `watch`,
/// `create`, `update`, `patch`, `delete`, `deletecollection`,
/// `discovery`) and resource plural.
#[derive(Debug, Clone, Default)]
pub struct Requests(BTreeMap<(String, String), u64>);

impl Requests {
    /// Requests with this verb, on any resource.
    pub fn count(&self, verb: &str) -> u64 {
        self.0
            .iter()
            .filter(|((v, _), _)| v == verb)
            .map(|(_, n)| n)
            .sum()
    }

    /// Requests with this verb on one resource (plural, e.g. `services`).
    pub fn count_for(&self, verb: &str, plural: &str) -> u64 {
        self.0
            .get(&(verb.to_string(), plural.to_string()))
            .copied()
            .unwrap_or(0)
    }
}

/// A running fake API server on a loopback port; stops when dropped.
pub struct FakeKube {
    shared: Arc<Shared>,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl FakeKube {
    /// Starts a server on 127.0.0.1 and a port the kernel picks.
    pub async fn start() -> anyhow::Result<Self> {
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new()),
            bookmark_ms: AtomicU64::new(1000),
            tokens: Mutex::default(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = http::router(shared.clone());
        let task = tokio::spawn(serve(listener, app));
        Ok(Self { shared, addr, task })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client for this server (default namespace `default`).
    pub fn client(&self) -> kube::Client {
        strait_proxy::tls::install_default_provider();
        let uri = self.url().parse().expect("a valid URL");
        kube::Client::try_from(kube::Config::new(uri)).expect("a kube client")
    }

    /// Forgets the event history: a watch (or a list's continue token)
    /// from any resourceVersion handed out so far gets 410 Expired; lists
    /// are unaffected.
    pub fn compact(&self) {
        self.shared.lock().compact();
    }

    /// Breaks off every open watch stream (the connection ends
    /// mid-response), so clients must watch again.
    pub fn drop_watches(&self) {
        self.shared.lock().drop_watches();
    }

    /// Sets the bookmark period of watches started from now on (1 s by
    /// default).
    pub fn set_bookmark_interval(&self, every: Duration) {
        let ms = u64::try_from(every.as_millis()).unwrap_or(u64::MAX);
        self.shared.bookmark_ms.store(ms, Ordering::Relaxed);
    }

    /// The stored objects of a kind (all namespaces), ordered by namespace
    /// and name; empty for an unknown kind.
    pub fn objects(&self, group: &str, version: &str, plural: &str) -> Vec<Value> {
        let Some(rt) = resources::find(group, version, plural) else {
            return Vec::new();
        };
        self.shared
            .lock()
            .list(rt, None)
            .into_iter()
            .map(|(_, v)| v)
            .collect()
    }

    /// Issues a bearer token for a service account, valid for `audiences`
    /// (the API server's own audience when empty), as the TokenRequest API
    /// would; TokenReview accepts it until [`Self::revoke_token`].
    pub fn issue_token(
        &self,
        namespace: &str,
        service_account: &str,
        audiences: &[&str],
    ) -> String {
        let token = format!("fake.{:032x}", rand::random::<u128>());
        let audiences = if audiences.is_empty() {
            vec![http::API_AUDIENCE.to_string()]
        } else {
            audiences.iter().map(|a| a.to_string()).collect()
        };
        self.shared
            .tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                token.clone(),
                http::IssuedToken {
                    namespace: namespace.to_string(),
                    service_account: service_account.to_string(),
                    audiences,
                },
            );
        token
    }

    /// Makes a token invalid (its pod or service account was deleted).
    pub fn revoke_token(&self, token: &str) {
        self.shared
            .tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(token);
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv()
    }

    /// The requests served so far.
    pub fn requests(&self) -> Requests {
        Requests(self.shared.lock().requests.clone())
    }
}

/// Accepts connections until aborted; aborting drops the connections too,
/// so a dropped server is gone for its clients at once.
async fn serve(listener: tokio::net::TcpListener, app: axum::Router) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        conns.spawn(async move {
            let _ = Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        while conns.try_join_next().is_some() {}
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.drop_watches();
        self.task.abort();
    }
}
