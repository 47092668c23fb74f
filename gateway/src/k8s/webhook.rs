//! The sidecar injector as a mutating admission webhook (what
//! `linkerd-proxy-injector` is to `linkerd inject`): the API server sends
//! every Pod being created in an opted-in namespace as an `AdmissionReview`
//! (`admission.k8s.io/v1`) over HTTPS; the answer is the same injection
//! `strait inject` makes, as a JSON Patch (RFC 6902).
//!
//! The decision is the pure [`review`]; [`serve`] is the HTTPS listener
//! around it. A pod the injector leaves alone (opted out, on the host
//! network, already current) is admitted unchanged; a pod whose annotations
//! are wrong is admitted unchanged with a warning the client sees (`kubectl`
//! prints it), never refused: a broken annotation must not stop a rollout.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::core::DynamicObject;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;
use tokio::net::TcpListener;

use super::inject::{inject_object, InjectConfig, Outcome, INJECTED_ANNOTATION, PROXY_CONTAINER};
use crate::metrics::ResultLabels;

/// Where the API server posts reviews.
pub const PATH: &str = "/inject";
/// The largest review body read (the API server's own request limit is
/// 3 MiB; a review carries the object once).
const MAX_BODY: usize = 4 * 1024 * 1024;
/// Connections served at once; more wait to be accepted. The API server
/// keeps a few; anyone else in the cluster may connect too (admission
/// webhooks take no client certificates), and must not be able to
/// exhaust the gateway.
const MAX_CONNECTIONS: usize = 32;
/// The TLS handshake and a request's head each get this long.
const HEAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// How long a connection takes new reviews (the API server gives a webhook
/// at most 30 s per call, and reconnects as it needs); the review then in
/// flight is answered, within as long again.
const CONNECTION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(60);

/// Why a review could not be answered (HTTP 400; the API server then
/// applies the webhook's failure policy).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReviewError {
    /// The body is not an `AdmissionReview` with a request.
    #[error("not an AdmissionReview request: {0}")]
    Invalid(String),
}

/// What became of one review: the answer and its result for
/// `strait_injector_requests_total` (`injected`, `updated`, `skipped`,
/// `refused`: admitted unchanged with a warning).
#[derive(Debug)]
pub struct Answer {
    /// The `AdmissionReview` to send back (JSON).
    pub body: Vec<u8>,
    /// The result label.
    pub result: &'static str,
}

/// Answers one `AdmissionReview` body (pure).
pub fn review(body: &[u8], config: &InjectConfig) -> Result<Answer, ReviewError> {
    let invalid = |e: &dyn std::fmt::Display| ReviewError::Invalid(e.to_string());
    let review: AdmissionReview<DynamicObject> =
        serde_json::from_slice(body).map_err(|e| invalid(&e))?;
    let request: AdmissionRequest<DynamicObject> = review.try_into().map_err(|e| invalid(&e))?;
    let response = AdmissionResponse::from(&request);
    let pod = match (
        &request.object,
        &request.operation,
        request.kind.kind.as_str(),
    ) {
        (Some(object), Operation::Create, "Pod") if request.kind.group.is_empty() => object,
        _ => return answer(response, "skipped"),
    };
    let mut before = serde_json::to_value(pod).map_err(|e| invalid(&e))?;
    // The object as sent may leave out its type; injection goes by kind.
    if let Some(obj) = before.as_object_mut() {
        obj.insert("apiVersion".into(), "v1".into());
        obj.insert("kind".into(), "Pod".into());
    }
    // Already injected with this image (by `strait inject`, or by this
    // webhook when the API server calls again after another webhook's
    // change): admitted as it is. Comparing with a fresh injection would
    // see the API server's defaults (filled in before every call) as
    // differences, and undo other webhooks' changes to the proxy.
    if injected_with(&before, &config.image) {
        return answer(response, "skipped");
    }
    let mut after = before.clone();
    let mut reports = Vec::new();
    if let Err(error) = inject_object(&mut after, config, &mut reports) {
        let mut response = response;
        response.warnings = Some(vec![format!("strait: sidecar not injected: {error}")]);
        return answer(response, "refused");
    }
    let result = match reports.first().map(|r| &r.outcome) {
        Some(Outcome::Injected) => "injected",
        Some(Outcome::Updated) => "updated",
        _ => return answer(response, "skipped"),
    };
    let patch = json_patch::diff(&before, &after);
    let response = response.with_patch(patch).map_err(|e| invalid(&e))?;
    answer(response, result)
}

/// Whether `pod` carries the proxy, injected as `image`.
fn injected_with(pod: &Value, image: &str) -> bool {
    let has_proxy = ["/spec/initContainers", "/spec/containers"]
        .iter()
        .any(|path| {
            pod.pointer(path)
                .and_then(Value::as_array)
                .is_some_and(|cs| cs.iter().any(|c| c["name"] == PROXY_CONTAINER))
        });
    let injected = pod
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(INJECTED_ANNOTATION))
        .and_then(Value::as_str);
    has_proxy && injected == Some(image)
}

fn answer(response: AdmissionResponse, result: &'static str) -> Result<Answer, ReviewError> {
    let error = |e: serde_json::Error| ReviewError::Invalid(e.to_string());
    let mut review = serde_json::to_value(response.into_review()).map_err(error)?;
    // The API wants the patch as base64 (a Go `[]byte`); kube-core writes
    // it as an array of numbers (kube-rs issue 1781).
    if let Some(patch) = review.pointer_mut("/response/patch") {
        let bytes: Vec<u8> = serde_json::from_value(patch.take()).map_err(error)?;
        *patch = Value::String(base64::engine::general_purpose::STANDARD.encode(bytes));
    }
    let body = serde_json::to_vec(&review).map_err(error)?;
    Ok(Answer { body, result })
}

/// The webhook's server certificate and key (PEM files, as a
/// `kubernetes.io/tls` Secret mounts them), read again whenever they change
/// on disk (a renewed Secret reaches a running gateway without a restart).
#[derive(Debug)]
pub struct ReloadingCert {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    current: arc_swap::ArcSwap<rustls::sign::CertifiedKey>,
    /// The PEM text `current` was made from.
    loaded: std::sync::Mutex<(Vec<u8>, Vec<u8>)>,
}

impl ReloadingCert {
    /// Loads `cert` and `key`; an error names the file at fault.
    pub fn load(cert: &Path, key: &Path) -> anyhow::Result<Arc<Self>> {
        let (cert_pem, key_pem) = read_pair(cert, key)?;
        let certified = certified_key(&cert_pem, &key_pem, cert, key)?;
        Ok(Arc::new(Self {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: arc_swap::ArcSwap::from_pointee(certified),
            loaded: std::sync::Mutex::new((cert_pem, key_pem)),
        }))
    }

    /// Reads the files again; when they changed and make a valid pair,
    /// serves them from the next handshake on. Whether it changed.
    pub fn reload(&self) -> anyhow::Result<bool> {
        let (cert_pem, key_pem) = read_pair(&self.cert, &self.key)?;
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if loaded.0 == cert_pem && loaded.1 == key_pem {
            return Ok(false);
        }
        let certified = certified_key(&cert_pem, &key_pem, &self.cert, &self.key)?;
        self.current.store(Arc::new(certified));
        *loaded = (cert_pem, key_pem);
        Ok(true)
    }

    /// A TLS server config serving this certificate (HTTP/1.1).
    pub fn server_config(self: &Arc<Self>) -> Result<rustls::ServerConfig, rustls::Error> {
        let mut config = rustls::ServerConfig::builder_with_provider(strait_proxy::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

impl rustls::server::ResolvesServerCert for ReloadingCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn read_pair(cert: &Path, key: &Path) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()));
    Ok((read(cert)?, read(key)?))
}

fn certified_key(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert: &Path,
    key: &Path,
) -> anyhow::Result<rustls::sign::CertifiedKey> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        anyhow::bail!("{}: no certificate", cert.display());
    }
    let key_der = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| anyhow::anyhow!("{}: {e}", key.display()))?;
    let certified =
        rustls::sign::CertifiedKey::from_der(chain, key_der, &strait_proxy::tls::provider())
            .map_err(|e| anyhow::anyhow!("{} and {}: {e}", cert.display(), key.display()))?;
    Ok(certified)
}

/// What the injector injects now (the trust anchors change under it).
pub type Injecting = Arc<arc_swap::ArcSwap<InjectConfig>>;

/// Every `every`, reads again the webhook's certificate and the trust
/// anchors `config` injects (from `anchors`): a renewed certificate or a
/// rotated bundle (a new root added beside the old, then the old removed)
/// takes effect without a gateway restart. A file that does not parse is
/// logged and the last good one kept.
pub async fn watch_files(
    cert: Arc<ReloadingCert>,
    anchors: std::path::PathBuf,
    config: Injecting,
    every: std::time::Duration,
) {
    loop {
        tokio::time::sleep(every).await;
        match cert.reload() {
            Ok(true) => {
                tracing::info!(cert = %cert.cert.display(), "injector certificate reloaded")
            }
            Ok(false) => {}
            Err(error) => tracing::warn!(%error, "injector certificate not reloaded"),
        }
        if let Err(error) = reload_anchors(&anchors, &config) {
            tracing::warn!(%error, "injector trust anchors not reloaded");
        }
    }
}

/// One look at the anchors file; whether they changed.
pub fn reload_anchors(path: &Path, config: &Injecting) -> anyhow::Result<bool> {
    let pem =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    if pem == config.load().trust_anchors_pem {
        return Ok(false);
    }
    strait_proxy::identity::TrustAnchors::from_pem(pem.as_bytes(), &path.display().to_string())
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut next = InjectConfig::clone(&config.load());
    next.trust_anchors_pem = pem;
    config.store(Arc::new(next));
    tracing::info!(path = %path.display(), "injector trust anchors reloaded");
    Ok(true)
}

/// The injector's counters: reviews by result (`injected`, `updated`,
/// `skipped`, `refused`, `invalid`).
pub type Requests = Family<ResultLabels, Counter>;

/// Serves reviews on `listener` over TLS until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    config: Injecting,
    requests: Requests,
) {
    serve_for(listener, tls, config, requests, CONNECTION_LIFETIME).await;
}

/// [`serve`], each connection closed after `lifetime`: gracefully, the
/// review in flight answered first (with `connection: close`), or the
/// API server would see its call cut and apply the failure policy.
async fn serve_for(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    config: Injecting,
    requests: Requests,
    lifetime: std::time::Duration,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let listener = strait_proxy::net::LimitedAccept::new(listener, MAX_CONNECTIONS, "injector");
    loop {
        let (tcp, remote, slot) = listener.accept().await;
        let (acceptor, config, requests) = (acceptor.clone(), config.clone(), requests.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let handshake = tokio::time::timeout(HEAD_TIMEOUT, acceptor.accept(tcp));
            let tls = match handshake.await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    tracing::info!(%remote, %error, "injector TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let service = hyper::service::service_fn(move |req| {
                handle(req, config.clone(), requests.clone(), remote)
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service);
            tokio::pin!(conn);
            let ended = tokio::select! {
                ended = conn.as_mut() => ended,
                () = tokio::time::sleep(lifetime) => {
                    tracing::debug!(%remote, "injector connection closing after its lifetime");
                    conn.as_mut().graceful_shutdown();
                    // A review takes at most what the API server allows
                    // a call (30 s); its body, what `handle` allows.
                    match tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
                        Ok(ended) => ended,
                        Err(_) => return,
                    }
                }
            };
            if let Err(error) = ended {
                tracing::debug!(%remote, %error, "injector connection ended");
            }
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    config: Injecting,
    requests: Requests,
    remote: SocketAddr,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let reply = |status: StatusCode, body: Vec<u8>, json: bool| {
        let mut rsp = Response::new(Full::new(Bytes::from(body)));
        *rsp.status_mut() = status;
        if json {
            rsp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
        }
        Ok(rsp)
    };
    if req.uri().path() != PATH {
        return reply(StatusCode::NOT_FOUND, b"not found\n".to_vec(), false);
    }
    if req.method() != Method::POST {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            b"POST only\n".to_vec(),
            false,
        );
    }
    let count = |result: &'static str| requests.get_or_create(&ResultLabels { result }).inc();
    let read = tokio::time::timeout(
        CONNECTION_LIFETIME,
        Limited::new(req.into_body(), MAX_BODY).collect(),
    );
    let body = match read.await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(error)) => {
            count("invalid");
            tracing::info!(%remote, %error, "injector: unreadable review");
            return reply(
                StatusCode::BAD_REQUEST,
                b"unreadable body\n".to_vec(),
                false,
            );
        }
        Err(_) => {
            count("invalid");
            return reply(
                StatusCode::REQUEST_TIMEOUT,
                b"body too slow\n".to_vec(),
                false,
            );
        }
    };
    // Parsing and diffing a large pod is CPU work: off the runtime's
    // threads, which also carry the tunnel and DNS.
    let config = config.load_full();
    let reviewed = tokio::task::spawn_blocking(move || review(&body, &config)).await;
    let reviewed = match reviewed {
        Ok(r) => r,
        Err(error) => {
            count("invalid");
            tracing::warn!(%remote, %error, "injector: review task failed");
            return reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                b"review failed\n".to_vec(),
                false,
            );
        }
    };
    match reviewed {
        Ok(answer) => {
            count(answer.result);
            reply(StatusCode::OK, answer.body, true)
        }
        Err(error) => {
            count("invalid");
            tracing::info!(%remote, %error, "injector: bad review");
            reply(
                StatusCode::BAD_REQUEST,
                format!("{error}\n").into_bytes(),
                false,
            )
        }
    }
}

#[cfg(test)]
mod tests;
