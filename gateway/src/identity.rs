//! The identity service for the sidecar proxies of this cluster:
//! `strait.identity.v1.Identity.Certify`, as Linkerd's identity controller.
//!
//! A proxy makes its own key pair and sends a certificate signing request
//! for its SPIFFE ID with a bearer token. The gateway finds out whom the
//! token belongs to — in Kubernetes with a `TokenReview` (the proxy sends
//! its service account's projected token, issued for the audience
//! `identity.strait.io`); outside it from a static tokens file — and signs
//! a leaf for `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`
//! over the request's key, if and only if that is the identity asked for.
//! The issuer's key stays in the gateway.
//!
//! The listener speaks TLS with the gateway's own certificate and asks
//! for none (a proxy comes here because it has none yet); proxies pin the
//! gateway's SPIFFE ID. Every request is counted by result in
//! `strait_identity_certify_requests_total`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::Deserialize;
use strait_proto::identity::v1::identity_server::{Identity, IdentityServer as GrpcServer};
use strait_proto::identity::v1::{CertifyRequest, CertifyResponse};
use strait_proxy::identity::{CertStore, Issuer, SpiffeId};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::catalog::validate_label;
use crate::metrics::ResultLabels;
use crate::source::file::{PolledFile, ReloadCounter};

/// The audience sidecars' tokens are issued for, unless configured.
pub const TOKEN_AUDIENCE: &str = "identity.strait.io";

/// Largest request accepted (a CSR and a token are a few KiB).
const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Requests one connection may have in flight.
const MAX_CONCURRENT_PER_CONNECTION: usize = 8;

/// How long a token review may take.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);

/// Token reviews in flight at once, at most (callers need no credentials
/// to reach the service: the API server is not theirs to load).
const MAX_REVIEWS: usize = 16;

/// A Kubernetes service account: whom a token belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceAccount {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    #[serde(rename = "serviceAccount")]
    pub name: String,
}

/// The service account of a Kubernetes user name
/// (`system:serviceaccount:<namespace>:<name>`), if it is one (pure).
pub fn service_account_of(username: &str) -> Option<ServiceAccount> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (namespace, name) = rest.split_once(':')?;
    (validate_label("namespace", namespace).is_ok() && !name.is_empty() && !name.contains(':'))
        .then(|| ServiceAccount {
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
}

/// Why a request is refused (pure decisions; each maps to a gRPC code and
/// a metric label).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// The token is not valid (unknown, expired, another audience).
    #[error("token not accepted: {0}")]
    Unauthenticated(String),
    /// The token is valid for another identity.
    #[error("{0}")]
    Forbidden(String),
    /// The identity or the signing request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// Tokens cannot be checked now (the API server is unreachable).
    #[error("cannot check tokens: {0}")]
    Unavailable(String),
    /// Signing failed.
    #[error("cannot issue: {0}")]
    Error(String),
}

impl Refusal {
    /// The metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Unauthenticated(_) => "unauthenticated",
            Self::Forbidden(_) => "forbidden",
            Self::Invalid(_) => "invalid",
            Self::Unavailable(_) => "unavailable",
            Self::Error(_) => "error",
        }
    }

    fn status(&self) -> Status {
        let message = self.to_string();
        match self {
            Self::Unauthenticated(_) => Status::unauthenticated(message),
            Self::Forbidden(_) => Status::permission_denied(message),
            Self::Invalid(_) => Status::invalid_argument(message),
            Self::Unavailable(_) => Status::unavailable(message),
            Self::Error(_) => Status::internal(message),
        }
    }
}

/// Parses the identity asked for and checks that `account` may have it:
/// exactly `spiffe://<trust_domain>/ns/<namespace>/sa/<name>` (pure).
pub fn authorize(
    requested: &str,
    trust_domain: &str,
    account: &ServiceAccount,
) -> Result<SpiffeId, Refusal> {
    let id = SpiffeId::parse(requested)
        .map_err(|e| Refusal::Invalid(format!("identity {requested:?}: {e}")))?;
    let own = SpiffeId::workload(trust_domain, &account.namespace, &account.name)
        .map_err(|e| Refusal::Forbidden(format!("service account has no identity here: {e}")))?;
    if id != own {
        return Err(Refusal::Forbidden(format!(
            "the token is for {own}, not {id}"
        )));
    }
    Ok(id)
}

/// One entry of a tokens file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TokenEntry {
    token: String,
    #[serde(flatten)]
    account: ServiceAccount,
}

/// Why a tokens file was refused.
#[derive(Debug, thiserror::Error)]
#[error("tokens file {path}: {message}")]
pub struct TokensFileError {
    /// The file.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

/// Bearer tokens known from a file, outside Kubernetes: each names one
/// service account. Only their SHA-256 digests are kept.
#[derive(Clone, Default)]
pub struct StaticTokens(Arc<HashMap<[u8; 32], ServiceAccount>>);

impl std::fmt::Debug for StaticTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticTokens")
            .field("count", &self.0.len())
            .finish()
    }
}

fn digest(token: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token);
    let mut out = [0; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl StaticTokens {
    /// Parses a YAML list of `{token, namespace, serviceAccount}` (pure);
    /// `path` names the file in errors. Tokens must be at least 16
    /// characters and unique.
    pub fn parse(text: &str, path: &Path) -> Result<Self, TokensFileError> {
        let error = |message: String| TokensFileError {
            path: path.display().to_string(),
            message,
        };
        let entries: Vec<TokenEntry> =
            serde_saphyr::from_str(text).map_err(|e| error(e.to_string()))?;
        let mut map = HashMap::new();
        for (i, e) in entries.into_iter().enumerate() {
            let token = e.token.trim();
            if token.len() < 16 {
                return Err(error(format!(
                    "entry {i}: token shorter than 16 characters"
                )));
            }
            validate_label("namespace", &e.account.namespace)
                .map_err(|err| error(format!("entry {i}: {err}")))?;
            validate_label("serviceAccount", &e.account.name)
                .map_err(|err| error(format!("entry {i}: {err}")))?;
            if map.insert(digest(token.as_bytes()), e.account).is_some() {
                return Err(error(format!("entry {i}: token listed twice")));
            }
        }
        Ok(Self(Arc::new(map)))
    }

    /// Reads a tokens file: the tokens, and the text they came from (for
    /// [`spawn_tokens_reload`]).
    pub fn load(path: &Path) -> Result<(Self, String), TokensFileError> {
        let text = std::fs::read_to_string(path).map_err(|e| TokensFileError {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Ok((Self::parse(&text, path)?, text))
    }

    /// The service account `token` belongs to.
    pub fn lookup(&self, token: &[u8]) -> Option<&ServiceAccount> {
        self.0.get(&digest(token.trim_ascii()))
    }
}

/// Re-reads the tokens file at `path` every `every`, `applied` being the
/// text of the tokens in force: a changed file that parses replaces the
/// tokens (new workloads without a gateway restart, a removed token
/// refused from then on); one that does not, or a file that cannot be read,
/// is logged, counted in `reloads` as an error and the last good tokens
/// kept. A change is applied once two reads agree ([`PolledFile`]): a file read
/// while it is being rewritten (empty after the truncation, which parses
/// as no tokens) never revokes them all.
pub fn spawn_tokens_reload(
    path: std::path::PathBuf,
    applied: String,
    tokens: watch::Sender<StaticTokens>,
    every: Duration,
    reloads: ReloadCounter,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut file = PolledFile::new(path, "tokens file", Some(applied), reloads);
        loop {
            tokio::time::sleep(every).await;
            let Some(text) = file.changed().await else {
                continue;
            };
            match StaticTokens::parse(&text, file.path()) {
                Ok(new) => {
                    tracing::info!(path = %file.path().display(), tokens = new.0.len(), "tokens file reloaded");
                    tokens.send_replace(new);
                    file.count("ok");
                }
                Err(error) => {
                    tracing::warn!(%error, "tokens file refused; keeping the last tokens");
                    file.count("error");
                }
            }
        }
    })
}

/// Finds out whom a bearer token belongs to.
#[derive(Clone)]
pub enum Authenticator {
    /// Kubernetes: a `TokenReview` for the token and this audience.
    TokenReview {
        /// The API client (needs `create` on `tokenreviews`).
        client: kube::Client,
        /// The audience the token must be issued for.
        audience: String,
        /// Bounds the reviews in flight.
        reviews: Arc<tokio::sync::Semaphore>,
    },
    /// Outside Kubernetes: a tokens file, as last read (see
    /// [`spawn_tokens_reload`]).
    Static(watch::Receiver<StaticTokens>),
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TokenReview { audience, .. } => f
                .debug_struct("TokenReview")
                .field("audience", audience)
                .finish_non_exhaustive(),
            Self::Static(t) => t.borrow().fmt(f),
        }
    }
}

impl Authenticator {
    /// Kubernetes: reviews tokens for `audience` with `client`.
    pub fn token_review(client: kube::Client, audience: String) -> Self {
        Self::TokenReview {
            client,
            audience,
            reviews: Arc::new(tokio::sync::Semaphore::new(MAX_REVIEWS)),
        }
    }

    /// The service account `token` belongs to.
    pub async fn authenticate(&self, token: &[u8]) -> Result<ServiceAccount, Refusal> {
        match self {
            Self::Static(tokens) => tokens
                .borrow()
                .lookup(token)
                .cloned()
                .ok_or_else(|| Refusal::Unauthenticated("unknown token".into())),
            Self::TokenReview {
                client,
                audience,
                reviews,
            } => {
                let token = std::str::from_utf8(token)
                    .map_err(|_| Refusal::Unauthenticated("token is not text".into()))?;
                let _permit = tokio::time::timeout(REVIEW_TIMEOUT, reviews.acquire())
                    .await
                    .map_err(|_| Refusal::Unavailable("too many token reviews".into()))?
                    .map_err(|_| Refusal::Unavailable("token reviews stopped".into()))?;
                review(client, token.trim(), audience).await
            }
        }
    }
}

async fn review(
    client: &kube::Client,
    token: &str,
    audience: &str,
) -> Result<ServiceAccount, Refusal> {
    let api: kube::Api<TokenReview> = kube::Api::all(client.clone());
    let request = TokenReview {
        spec: TokenReviewSpec {
            token: token.to_string(),
            audiences: Some(vec![audience.to_string()]),
        },
        ..TokenReview::default()
    };
    let created = tokio::time::timeout(
        REVIEW_TIMEOUT,
        api.create(&kube::api::PostParams::default(), &request),
    )
    .await
    .map_err(|_| Refusal::Unavailable("token review timed out".into()))?
    .map_err(|e| Refusal::Unavailable(format!("token review: {e}")))?;
    judge_review(created.status.as_ref(), audience)
}

/// What a TokenReview's status says about the token (pure): authenticated,
/// for `audience` (the API server must say so: a review answered without
/// audiences vouches only for the API server's own), and a service
/// account's.
pub fn judge_review(
    status: Option<&k8s_openapi::api::authentication::v1::TokenReviewStatus>,
    audience: &str,
) -> Result<ServiceAccount, Refusal> {
    let Some(status) = status else {
        return Err(Refusal::Unavailable("token review without a status".into()));
    };
    if status.authenticated != Some(true) {
        let why = status
            .error
            .clone()
            .unwrap_or_else(|| "not authenticated".into());
        return Err(Refusal::Unauthenticated(why));
    }
    if !status.audiences.iter().flatten().any(|a| a == audience) {
        return Err(Refusal::Unauthenticated(format!(
            "token is not for the audience {audience}"
        )));
    }
    let username = status
        .user
        .as_ref()
        .and_then(|u| u.username.as_deref())
        .unwrap_or_default();
    service_account_of(username)
        .ok_or_else(|| Refusal::Forbidden(format!("{username:?} is not a service account")))
}

/// The `Identity` service.
pub struct IdentityService {
    issuer: Arc<Issuer>,
    gateway: SpiffeId,
    authenticator: Authenticator,
    lifetime: Duration,
    requests: Family<ResultLabels, Counter>,
}

impl std::fmt::Debug for IdentityService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityService")
            .field("trust_domain", &self.issuer.trust_domain())
            .field("authenticator", &self.authenticator)
            .finish_non_exhaustive()
    }
}

impl IdentityService {
    /// Issues leaves of `lifetime` from `issuer` to callers `authenticator`
    /// vouches for, except the gateway's own identity `gateway` (a
    /// workload running as the gateway's service account must not become
    /// the control plane its proxies pin), counting requests in
    /// `requests`.
    pub fn new(
        issuer: Arc<Issuer>,
        gateway: SpiffeId,
        authenticator: Authenticator,
        lifetime: Duration,
        requests: Family<ResultLabels, Counter>,
    ) -> Self {
        Self {
            issuer,
            gateway,
            authenticator,
            lifetime,
            requests,
        }
    }

    /// Handles one request.
    pub async fn handle(&self, request: CertifyRequest) -> Result<CertifyResponse, Refusal> {
        if request.token.is_empty() {
            return Err(Refusal::Unauthenticated("no token".into()));
        }
        let account = self.authenticator.authenticate(&request.token).await?;
        let id = authorize(&request.identity, self.issuer.trust_domain(), &account)?;
        if id == self.gateway {
            return Err(Refusal::Forbidden(format!(
                "{id} is the gateway's own identity"
            )));
        }
        let (chain, not_after) = self
            .issuer
            .certify(&id, &request.certificate_signing_request, self.lifetime)
            .map_err(|e| match e {
                strait_proxy::identity::CertError::Request(_) => Refusal::Invalid(e.to_string()),
                other => Refusal::Error(other.to_string()),
            })?;
        let mut chain = chain.into_iter().map(|c| c.to_vec());
        let leaf_certificate = chain.next().unwrap_or_default();
        let valid_until_unix_seconds = strait_proxy::metrics::unix_seconds(not_after);
        tracing::info!(%id, "issued a workload certificate");
        Ok(CertifyResponse {
            leaf_certificate,
            intermediate_certificates: chain.collect(),
            valid_until_unix_seconds,
        })
    }

    fn count(&self, result: &'static str) {
        self.requests.get_or_create(&ResultLabels { result }).inc();
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let remote = request.remote_addr();
        match self.handle(request.into_inner()).await {
            Ok(response) => {
                self.count("ok");
                Ok(Response::new(response))
            }
            Err(refusal) => {
                self.count(refusal.as_str());
                tracing::info!(?remote, %refusal, "certificate request refused");
                Err(refusal.status())
            }
        }
    }
}

/// The running identity listener; stops when dropped.
#[derive(Debug)]
pub struct IdentityServer {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
}

impl IdentityServer {
    /// Binds `addr` and serves `service` over TLS presenting `certs` (no
    /// client certificate asked).
    pub async fn bind(
        addr: SocketAddr,
        service: IdentityService,
        certs: Arc<CertStore>,
        at_limit: impl Fn() + Send + Sync + 'static,
    ) -> std::io::Result<Self> {
        let tls = strait_proxy::tls::server_auth_only_config(
            certs,
            &[strait_proxy::tls::CONTROL_PLANE_ALPN],
        )
        .map_err(std::io::Error::other)?;
        let listener = strait_proxy::net::bind_listener(addr)?;
        let bound = listener.local_addr()?;
        let (stop, stopping) = watch::channel(false);
        let server = tonic::transport::Server::builder()
            .concurrency_limit_per_connection(MAX_CONCURRENT_PER_CONNECTION)
            .timeout(Duration::from_secs(10))
            .add_service(GrpcServer::new(service).max_decoding_message_size(MAX_REQUEST_BYTES));
        let incoming = crate::destination::control_incoming(
            "identity",
            listener,
            Some(Arc::new(tls)),
            at_limit,
            stopping.clone(),
        );
        let mut shutdown = stopping;
        tokio::spawn(async move {
            let stopped = async move {
                let _ = shutdown.wait_for(|s| *s).await;
            };
            if let Err(error) = server.serve_with_incoming_shutdown(incoming, stopped).await {
                tracing::warn!(%error, "identity server stopped");
            }
        });
        tracing::info!(addr = %bound, "identity service listening");
        Ok(Self { addr: bound, stop })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for IdentityServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

#[cfg(test)]
mod tests;
