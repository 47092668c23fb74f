//! Certificates from the control plane: the proxy makes its own key,
//! sends a certificate signing request with its bearer token to the
//! gateway's `strait.identity.v1.Identity` service, checks what comes back
//! (it chains to the trust anchors, names this identity, carries this key)
//! and keeps renewing it at two thirds of its life. The issuer's key never
//! leaves the gateway.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use strait_proto::identity::v1::identity_client::IdentityClient;
use strait_proto::identity::v1::CertifyRequest;
use tonic::transport::Channel;

use super::certs::{CertError, CertRequest, Leaf, TrustAnchors};
use super::spiffe::SpiffeId;
use super::store::CertStore;
use super::verify::ExpectedPeerVerifier;

/// Why one certification attempt failed; [`CertifyError::kind`] is a
/// bounded metric label.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertifyError {
    /// The token file could not be read, or was empty.
    #[error("token {path}: {detail}")]
    Token {
        /// The token file.
        path: String,
        /// What went wrong.
        detail: String,
    },
    /// Making the key or request failed.
    #[error(transparent)]
    Request(CertError),
    /// The control plane could not be reached or did not answer in time.
    #[error("control plane unreachable: {0}")]
    Unreachable(String),
    /// The control plane refused (bad token, another identity, ...).
    #[error("control plane refused: {0}")]
    Refused(String),
    /// The control plane's answer is not a valid certificate for us.
    #[error("invalid certificate from the control plane: {0}")]
    Invalid(String),
}

impl CertifyError {
    /// `token`, `request`, `unreachable`, `refused` or `invalid`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Token { .. } => "token",
            Self::Request(_) => "request",
            Self::Unreachable(_) => "unreachable",
            Self::Refused(_) => "refused",
            Self::Invalid(_) => "invalid",
        }
    }
}

/// Asks the control plane for certificates for one identity.
#[derive(Clone)]
pub struct Certifier {
    id: SpiffeId,
    token_file: PathBuf,
    channel: Channel,
    verifier: Arc<ExpectedPeerVerifier>,
    timeout: Duration,
}

impl std::fmt::Debug for Certifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certifier")
            .field("id", &self.id)
            .field("token_file", &self.token_file)
            .finish_non_exhaustive()
    }
}

impl Certifier {
    /// A certifier for `id` asking the control plane at `uri` over `tls`
    /// (see [`crate::tls::client_config`]: it must pin the control
    /// plane's identity), proving who it is with the token read from
    /// `token_file` at every attempt (projected tokens are rotated on
    /// disk). Issued chains must lead to `anchors`.
    pub fn new(
        id: SpiffeId,
        uri: &http::Uri,
        tls: Arc<rustls::ClientConfig>,
        token_file: PathBuf,
        anchors: &TrustAnchors,
    ) -> Self {
        let timeout = Duration::from_secs(5);
        let sink: super::RefusalSink = Arc::new(|_| {});
        Self {
            verifier: ExpectedPeerVerifier::new(anchors.roots(), id.clone(), sink),
            id,
            token_file,
            channel: crate::control::channel(uri, Some(tls), timeout),
            timeout,
        }
    }

    /// A certifier for `id` from the control plane at `uri`, which must
    /// present the identity `server`, and the pending store it keeps
    /// current once [`spawn_certify`]d (the same store is this client's
    /// TLS identity: none until certified).
    pub fn for_control_plane(
        id: SpiffeId,
        uri: &http::Uri,
        server: SpiffeId,
        token_file: PathBuf,
        anchors: &TrustAnchors,
    ) -> Result<(Self, Arc<CertStore>), rustls::Error> {
        let store = CertStore::pending(id.clone());
        let sink: super::RefusalSink = Arc::new(|_| {});
        let tls = crate::tls::client_config(
            ExpectedPeerVerifier::new(anchors.roots(), server, sink),
            store.clone(),
            &[crate::tls::CONTROL_PLANE_ALPN],
        )?;
        let certifier = Self::new(id, uri, Arc::new(tls), token_file, anchors);
        Ok((certifier, store))
    }

    /// One attempt: a fresh key, a request, the control plane's answer
    /// checked.
    pub async fn certify(&self) -> Result<Leaf, CertifyError> {
        let token_error = |detail: String| CertifyError::Token {
            path: self.token_file.display().to_string(),
            detail,
        };
        let token = tokio::fs::read(&self.token_file)
            .await
            .map_err(|e| token_error(e.to_string()))?;
        let token = token.trim_ascii().to_vec();
        if token.is_empty() {
            return Err(token_error("empty".into()));
        }
        let request = CertRequest::new(&self.id).map_err(CertifyError::Request)?;
        let mut client = IdentityClient::new(self.channel.clone());
        let call = client.certify(CertifyRequest {
            identity: self.id.to_string(),
            token,
            certificate_signing_request: request.csr_der().to_vec(),
        });
        let response = match tokio::time::timeout(self.timeout, call).await {
            Err(_) => return Err(CertifyError::Unreachable("timed out".into())),
            Ok(Err(status)) => {
                return Err(match status.code() {
                    tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Unknown
                    | tonic::Code::Cancelled => CertifyError::Unreachable(status.to_string()),
                    _ => {
                        CertifyError::Refused(format!("{:?}: {}", status.code(), status.message()))
                    }
                })
            }
            Ok(Ok(r)) => r.into_inner(),
        };
        let leaf = CertificateDer::from(response.leaf_certificate);
        let intermediates: Vec<CertificateDer<'static>> = response
            .intermediate_certificates
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        // The same checks a peer will make: chain to the anchors, the
        // issuer bound to the leaf's trust domain, this identity.
        let name = ServerName::try_from("strait-proxy")
            .map_err(|e| CertifyError::Invalid(e.to_string()))?;
        self.verifier
            .verify_server_cert(&leaf, &intermediates, &name, &[], UnixTime::now())
            .map_err(|e| CertifyError::Invalid(e.to_string()))?;
        let mut chain = vec![leaf];
        chain.extend(intermediates);
        request
            .into_leaf(chain)
            .map_err(|e| CertifyError::Invalid(e.to_string()))
    }
}

/// Longest wait between failed attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Keeps `store` certified through `certifier`, forever: at once (retrying
/// from 250 ms, doubling to 30 s, until the first leaf), then again at two
/// thirds of each leaf's life as received (retrying the same way; the old
/// leaf serves until it expires). `report` sees every attempt's outcome:
/// the new expiry, or the error.
pub fn spawn_certify(
    certifier: Certifier,
    store: Arc<CertStore>,
    report: impl Fn(Result<SystemTime, &CertifyError>) + Send + Sync + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(250);
        loop {
            let wait = match certifier.certify().await {
                Ok(leaf) => match store.store(&leaf) {
                    Ok(()) => {
                        tracing::info!(id = %store.id(), not_after = ?leaf.not_after, "certified by the control plane");
                        report(Ok(leaf.not_after));
                        backoff = Duration::from_millis(250);
                        let left = leaf
                            .not_after
                            .duration_since(SystemTime::now())
                            .unwrap_or_default();
                        renew_after(left, rand::random::<f64>())
                    }
                    Err(error) => {
                        let error = CertifyError::Invalid(error.to_string());
                        tracing::warn!(%error, "certificate not usable; retrying");
                        report(Err(&error));
                        next_backoff(&mut backoff)
                    }
                },
                Err(error) => {
                    tracing::warn!(%error, id = %store.id(), "certification failed; retrying");
                    report(Err(&error));
                    next_backoff(&mut backoff)
                }
            };
            tokio::time::sleep(wait).await;
        }
    })
}

/// When to renew a leaf with `left` to live: two thirds of it as received
/// (not as stamped: leaves are backdated for clock skew), ±10 % by `r`
/// (0 to 1) so that proxies started together do not renew together; at
/// least 30 s (or all the life left, if less), so that leaves shortened by
/// an expiring issuer do not make every proxy ask ever faster (pure).
pub fn renew_after(left: Duration, r: f64) -> Duration {
    let wait = (left * 2 / 3).mul_f64(0.9 + 0.2 * r.clamp(0.0, 1.0));
    wait.max(Duration::from_secs(30).min(left))
}

fn next_backoff(backoff: &mut Duration) -> Duration {
    let wait = *backoff;
    *backoff = (*backoff * 2).min(MAX_BACKOFF);
    wait
}
