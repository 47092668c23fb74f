//! Peer verification: the chain must lead to a trust anchor, the leaf must
//! carry exactly one SPIFFE ID, its issuer must be bound to the same trust
//! domain, and the ID must be the one expected (dialing) or one of the
//! linked peers (accepting). Every refusal is reported to a [`RefusalSink`].

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, RootCertStore,
    SignatureScheme,
};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use super::spiffe::SpiffeId;

/// Why a peer's certificate was refused; a bounded set, used as a metric
/// label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RefusalReason {
    /// The chain does not lead to a trust anchor.
    UnknownIssuer,
    /// A certificate in the chain has expired or is not valid yet.
    Expired,
    /// The certificate is malformed or unfit for its use.
    BadCertificate,
    /// The leaf has no (or more than one) SPIFFE ID.
    NoIdentity,
    /// The leaf's trust domain is not the one its issuer is bound to.
    TrustDomainMismatch,
    /// A valid identity, but not one this side is linked with.
    UnexpectedIdentity,
}

impl RefusalReason {
    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownIssuer => "unknown_issuer",
            Self::Expired => "expired",
            Self::BadCertificate => "bad_certificate",
            Self::NoIdentity => "no_identity",
            Self::TrustDomainMismatch => "trust_domain_mismatch",
            Self::UnexpectedIdentity => "unexpected_identity",
        }
    }

    fn from_rustls(e: &Error) -> Self {
        match e {
            // A chain that names a trust anchor but is not signed by it is as
            // untrusted as one that names none.
            Error::InvalidCertificate(
                CertificateError::UnknownIssuer | CertificateError::BadSignature,
            ) => Self::UnknownIssuer,
            Error::InvalidCertificate(
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. },
            ) => Self::Expired,
            _ => Self::BadCertificate,
        }
    }
}

/// Receives every refusal (for counting and logging).
pub type RefusalSink = Arc<dyn Fn(RefusalReason) + Send + Sync>;

/// Every URI subject alternative name of a certificate.
pub(crate) fn uri_sans(cert: &X509Certificate<'_>) -> Vec<String> {
    match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some((*u).to_string()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The SPIFFE ID of a leaf certificate: exactly one `spiffe://` URI SAN.
fn leaf_id(der: &[u8]) -> Result<SpiffeId, RefusalReason> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|_| RefusalReason::BadCertificate)?;
    let mut ids = uri_sans(&cert)
        .into_iter()
        .filter(|u| u.starts_with("spiffe://"));
    let first = ids.next().ok_or(RefusalReason::NoIdentity)?;
    if ids.next().is_some() {
        return Err(RefusalReason::NoIdentity);
    }
    SpiffeId::parse(&first).map_err(|_| RefusalReason::NoIdentity)
}

/// Checks the identity binding of a chain that already verified against
/// the anchors: the leaf's SPIFFE ID, and that the certificate that
/// actually signed the leaf names the same trust domain.
///
/// The peer chooses which intermediates it sends and in what order, and
/// path building uses whichever signed the leaf; so exactly one
/// intermediate is accepted, and the leaf's issuer name and signature are
/// checked against it here, rather than trusting its position.
fn chain_identity(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> Result<SpiffeId, RefusalReason> {
    let id = leaf_id(end_entity)?;
    let [issuer] = intermediates else {
        return Err(RefusalReason::TrustDomainMismatch);
    };
    let (_, leaf) = x509_parser::parse_x509_certificate(end_entity)
        .map_err(|_| RefusalReason::BadCertificate)?;
    let (_, issuer) =
        x509_parser::parse_x509_certificate(issuer).map_err(|_| RefusalReason::BadCertificate)?;
    if leaf.issuer() != issuer.subject()
        || leaf.verify_signature(Some(issuer.public_key())).is_err()
    {
        return Err(RefusalReason::TrustDomainMismatch);
    }
    let bound = format!("spiffe://{}", id.trust_domain());
    if uri_sans(&issuer).contains(&bound) {
        Ok(id)
    } else {
        Err(RefusalReason::TrustDomainMismatch)
    }
}

/// The SPIFFE ID in a peer's presented chain (leaf first), after the
/// handshake verified it.
pub fn identity_of(chain: &[CertificateDer<'_>]) -> Option<SpiffeId> {
    leaf_id(chain.first()?).ok()
}

fn refuse(sink: &RefusalSink, reason: RefusalReason, detail: &dyn fmt::Display) -> Error {
    tracing::warn!(reason = reason.as_str(), %detail, "peer certificate refused");
    sink(reason);
    match reason {
        RefusalReason::UnknownIssuer => Error::InvalidCertificate(CertificateError::UnknownIssuer),
        RefusalReason::Expired => Error::InvalidCertificate(CertificateError::Expired),
        RefusalReason::BadCertificate => Error::InvalidCertificate(CertificateError::BadEncoding),
        _ => Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure),
    }
}

/// Dialing side: accepts exactly one expected peer identity.
pub struct ExpectedPeerVerifier {
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
    provider: Arc<CryptoProvider>,
    sink: RefusalSink,
}

impl fmt::Debug for ExpectedPeerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExpectedPeerVerifier")
            .field("expected", &self.expected)
            .finish_non_exhaustive()
    }
}

impl ExpectedPeerVerifier {
    /// A verifier for a connection that must reach `expected`.
    pub fn new(roots: Arc<RootCertStore>, expected: SpiffeId, sink: RefusalSink) -> Arc<Self> {
        Arc::new(Self {
            roots,
            expected,
            provider: crate::tls::provider(),
            sink,
        })
    }
}

impl ServerCertVerifier for ExpectedPeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let parsed = ParsedCertificate::try_from(end_entity)
            .map_err(|e| refuse(&self.sink, RefusalReason::BadCertificate, &e))?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )
        .map_err(|e| refuse(&self.sink, RefusalReason::from_rustls(&e), &e))?;
        let id = chain_identity(end_entity, intermediates)
            .map_err(|r| refuse(&self.sink, r, &"server chain"))?;
        if id != self.expected {
            let detail = format!("presented {id}, expected {}", self.expected);
            return Err(refuse(
                &self.sink,
                RefusalReason::UnexpectedIdentity,
                &detail,
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The identities an accepting side lets in, each optionally with its own
/// trust anchors (a per-link trust bundle: that peer's chain must lead to
/// those anchors and no others); shared with whatever keeps the list of
/// links, and updated live.
#[derive(Clone, Default)]
pub struct AllowedPeers {
    ids: Arc<ArcSwap<PeerVerifiers>>,
    any: bool,
}

/// Each allowed identity, with the verifier of its own anchors if it has
/// some.
type PeerVerifiers = HashMap<SpiffeId, Option<Arc<dyn ClientCertVerifier>>>;

impl fmt::Debug for AllowedPeers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids = self.ids.load();
        f.debug_struct("AllowedPeers")
            .field("ids", &ids.keys().collect::<Vec<_>>())
            .field("any", &self.any)
            .finish()
    }
}

impl AllowedPeers {
    /// Every identity that chains to the anchors with a bound trust domain
    /// (a sidecar's inbound side: any meshed workload may call).
    pub fn any() -> Self {
        Self {
            ids: Arc::default(),
            any: true,
        }
    }

    /// Replaces the set; every identity chains to the verifier's anchors.
    pub fn set(&self, ids: impl IntoIterator<Item = SpiffeId>) {
        self.ids
            .store(Arc::new(ids.into_iter().map(|id| (id, None)).collect()));
    }

    /// Replaces the set, giving some identities their own trust anchors.
    pub fn set_with_roots(
        &self,
        ids: impl IntoIterator<Item = (SpiffeId, Option<Arc<RootCertStore>>)>,
    ) -> Result<(), Error> {
        let mut map = HashMap::new();
        for (id, roots) in ids {
            let verifier = match roots {
                Some(roots) => Some(
                    WebPkiClientVerifier::builder_with_provider(roots, crate::tls::provider())
                        .build()
                        .map_err(|e| Error::General(format!("{id}: {e}")))?,
                ),
                None => None,
            };
            map.insert(id, verifier);
        }
        self.ids.store(Arc::new(map));
        Ok(())
    }

    /// Whether `id` is allowed.
    pub fn contains(&self, id: &SpiffeId) -> bool {
        self.any || self.ids.load().contains_key(id)
    }

    /// The verifier of `id`'s own anchors, if it has some.
    fn roots_of(&self, id: &SpiffeId) -> Option<Arc<dyn ClientCertVerifier>> {
        self.ids.load().get(id).cloned().flatten()
    }
}

/// Accepting side: requires a client certificate from one of the linked
/// peers.
pub struct LinkedPeersVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: AllowedPeers,
    sink: RefusalSink,
}

impl fmt::Debug for LinkedPeersVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkedPeersVerifier")
            .field("allowed", &self.allowed)
            .finish_non_exhaustive()
    }
}

impl LinkedPeersVerifier {
    /// A verifier that lets in only `allowed` identities chained to `roots`.
    pub fn new(
        roots: Arc<RootCertStore>,
        allowed: AllowedPeers,
        sink: RefusalSink,
    ) -> Result<Arc<Self>, Error> {
        let inner = WebPkiClientVerifier::builder_with_provider(roots, crate::tls::provider())
            .build()
            .map_err(|e| Error::General(e.to_string()))?;
        Ok(Arc::new(Self {
            inner,
            allowed,
            sink,
        }))
    }
}

impl ClientCertVerifier for LinkedPeersVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        // A peer with its own trust bundle is verified against it alone:
        // its claimed identity picks the anchors, and the chain must then
        // lead there (and bind the same trust domain, below).
        let claimed = leaf_id(end_entity).ok();
        let inner = claimed
            .as_ref()
            .and_then(|id| self.allowed.roots_of(id))
            .unwrap_or_else(|| self.inner.clone());
        inner
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(|e| refuse(&self.sink, RefusalReason::from_rustls(&e), &e))?;
        let id = chain_identity(end_entity, intermediates)
            .map_err(|r| refuse(&self.sink, r, &"client chain"))?;
        if !self.allowed.contains(&id) {
            let detail = format!("{id} is not a linked peer");
            return Err(refuse(
                &self.sink,
                RefusalReason::UnexpectedIdentity,
                &detail,
            ));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
