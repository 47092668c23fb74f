//! Making and loading certificates: trust anchors, issuers and leaves.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use super::spiffe::SpiffeId;

/// Leaf certificates live 24 hours unless configured otherwise.
pub const DEFAULT_LEAF_LIFETIME: Duration = Duration::from_secs(24 * 3600);
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const ISSUER_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// Backdating absorbs clock skew between clusters.
const BACKDATE: Duration = Duration::from_secs(300);

/// Errors making or loading certificates.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The PEM had no certificate, or was malformed.
    #[error("no PEM certificate found in {0}")]
    NoCertificate(String),
    /// The PEM had no private key, or was malformed.
    #[error("no PEM private key found in {0}")]
    NoKey(String),
    /// The issuer certificate does not name its trust domain.
    #[error("issuer certificate has no spiffe://<trust-domain> URI SAN")]
    IssuerWithoutTrustDomain,
    /// The certificate could not be parsed.
    #[error("malformed certificate: {0}")]
    Malformed(String),
    /// The issuer's certificate has expired.
    #[error("issuer certificate expired")]
    IssuerExpired,
    /// rcgen failed to make or sign a certificate.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the key.
    #[error("private key refused: {0}")]
    Key(#[from] rustls::Error),
    /// A certificate signing request was malformed, badly signed, or asked
    /// for a name other than the identity.
    #[error("certificate signing request refused: {0}")]
    Request(String),
    /// An issued certificate is not the one asked for (another identity,
    /// or another key).
    #[error("issued certificate does not match the request: {0}")]
    Mismatch(String),
}

/// A certificate and its private key, both PEM-encoded, as written to files.
#[derive(Clone, Debug)]
pub struct PemPair {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The PKCS#8 private key, PEM.
    pub key_pem: String,
}

fn offset(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

fn ca_params(cn: &str, lifetime: Duration, path_len: Option<u8>) -> CertificateParams {
    let now = SystemTime::now();
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.distinguished_name
        .push(DnType::OrganizationName, "Strait");
    p.not_before = offset(now - BACKDATE);
    p.not_after = offset(now + lifetime);
    p.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.use_authority_key_identifier_extension = true;
    p
}

/// Makes a new self-signed trust anchor (root CA) for a clusterset.
pub fn generate_root(name: &str) -> Result<PemPair, CertError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    // A unique subject per anchor, so that a chain from another anchor of
    // the same name is reported as from an unknown issuer.
    let tag: u32 = rand::random();
    let mut params = ca_params(
        &format!("{name} trust anchor {tag:08x}"),
        ROOT_LIFETIME,
        None,
    );
    params.use_authority_key_identifier_extension = false;
    let cert = params.self_signed(&key)?;
    Ok(PemPair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Makes a cluster's issuer (intermediate CA) signed by the root, bound to
/// `trust_domain` by its `spiffe://<trust-domain>` URI SAN.
pub fn generate_issuer(root: &PemPair, trust_domain: &str) -> Result<PemPair, CertError> {
    let td =
        SpiffeId::trust_domain_id(trust_domain).map_err(|e| CertError::Malformed(e.to_string()))?;
    let root_key = KeyPair::from_pem(&root.key_pem)?;
    let root_der = first_cert(root.cert_pem.as_bytes(), "root certificate")?;
    let root_issuer = rcgen::Issuer::from_ca_cert_der(&root_der, root_key)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = ca_params(&format!("{trust_domain} issuer"), ISSUER_LIFETIME, Some(0));
    params.subject_alt_names = vec![SanType::URI(td.as_str().try_into()?)];
    let cert = params.signed_by(&key, &root_issuer)?;
    Ok(PemPair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn first_cert(pem: &[u8], what: &str) -> Result<CertificateDer<'static>, CertError> {
    CertificateDer::pem_slice_iter(pem)
        .next()
        .and_then(|r| r.ok())
        .ok_or_else(|| CertError::NoCertificate(what.to_string()))
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|source| CertError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// The set of trust anchors peers are verified against.
#[derive(Clone, Debug)]
pub struct TrustAnchors {
    roots: Arc<RootCertStore>,
}

impl TrustAnchors {
    /// Parses one or more PEM certificates (a bundle).
    pub fn from_pem(pem: &[u8], what: &str) -> Result<Self, CertError> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| CertError::Malformed(format!("{what}: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| CertError::Malformed(format!("{what}: {e}")))?;
        }
        if roots.is_empty() {
            return Err(CertError::NoCertificate(what.to_string()));
        }
        Ok(Self {
            roots: Arc::new(roots),
        })
    }

    /// Reads a PEM bundle from a file.
    pub fn load(path: &std::path::Path) -> Result<Self, CertError> {
        Self::from_pem(&read(path)?, &path.display().to_string())
    }

    /// The anchors as a rustls root store.
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.roots.clone()
    }
}

/// A cluster's issuer: mints leaf certificates for identities of its trust
/// domain.
pub struct Issuer {
    cert: CertificateDer<'static>,
    signer: rcgen::Issuer<'static, KeyPair>,
    trust_domain: String,
    not_after: SystemTime,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("trust_domain", &self.trust_domain)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Issuer {
    /// Parses an issuer from its PEM certificate and PKCS#8 PEM key.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, CertError> {
        let cert = first_cert(cert_pem, "issuer certificate")?;
        let key_text =
            std::str::from_utf8(key_pem).map_err(|_| CertError::NoKey("issuer key".into()))?;
        let key = KeyPair::from_pem(key_text).map_err(|_| CertError::NoKey("issuer key".into()))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert)
            .map_err(|e| CertError::Malformed(e.to_string()))?;
        let td = super::verify::uri_sans(&parsed)
            .into_iter()
            .filter_map(|u| SpiffeId::parse(&u).ok())
            .find(|id| id.as_str() == format!("spiffe://{}", id.trust_domain()))
            .ok_or(CertError::IssuerWithoutTrustDomain)?;
        let not_after = SystemTime::UNIX_EPOCH
            + Duration::from_secs(parsed.validity().not_after.timestamp().max(0) as u64);
        let signer = rcgen::Issuer::from_ca_cert_der(&cert, key)?;
        Ok(Self {
            cert,
            signer,
            trust_domain: td.trust_domain().to_string(),
            not_after,
        })
    }

    /// Reads an issuer from certificate and key files.
    pub fn load(cert: &std::path::Path, key: &std::path::Path) -> Result<Self, CertError> {
        Self::from_pem(&read(cert)?, &read(key)?)
    }

    /// The trust domain this issuer may mint identities for.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// When the issuer itself expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Mints a fresh key and a leaf certificate for `id`, valid for
    /// `lifetime` (never past the issuer's own expiry).
    pub fn issue(&self, id: &SpiffeId, lifetime: Duration) -> Result<Leaf, CertError> {
        let now = SystemTime::now();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let (chain, not_after) = self.sign(id, &key, lifetime)?;
        Ok(Leaf {
            id: id.clone(),
            chain,
            key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
            not_before: now,
            not_after,
        })
    }

    /// Signs a leaf for `id` over the public key of a PKCS#10 request
    /// (DER) whose signature proves the caller holds the key; valid for
    /// `lifetime`, never past the issuer's expiry. The key must be ECDSA
    /// P-256 and the request signed with ECDSA-SHA256 (what
    /// [`CertRequest`] makes). Only the key is taken from the request: URI
    /// SANs in it must name `id` and nothing else, and every other field is
    /// the issuer's. Returns the chain (leaf, issuer) and the leaf's
    /// expiry.
    pub fn certify(
        &self,
        id: &SpiffeId,
        csr_der: &[u8],
        lifetime: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, SystemTime), CertError> {
        check_p256_request(csr_der)?;
        let csr = rcgen::CertificateSigningRequestParams::from_der(&csr_der.into())
            .map_err(|e| CertError::Request(e.to_string()))?;
        for san in &csr.params.subject_alt_names {
            match san {
                SanType::URI(uri) if uri.as_str() == id.as_str() => {}
                other => {
                    return Err(CertError::Request(format!(
                        "asks for {other:?}, not only {id}"
                    )))
                }
            }
        }
        self.sign(id, &csr.public_key, lifetime)
    }

    fn sign(
        &self,
        id: &SpiffeId,
        key: &impl rcgen::PublicKeyData,
        lifetime: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, SystemTime), CertError> {
        let now = SystemTime::now();
        if now >= self.not_after {
            return Err(CertError::IssuerExpired);
        }
        if id.trust_domain() != self.trust_domain {
            return Err(CertError::Malformed(format!(
                "issuer of {} cannot mint {id}",
                self.trust_domain
            )));
        }
        let not_after = (now + lifetime).min(self.not_after);
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.not_before = offset(now - BACKDATE);
        p.not_after = offset(not_after);
        p.is_ca = IsCa::ExplicitNoCa;
        p.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(key, &self.signer)?;
        Ok((vec![cert.der().clone(), self.cert.clone()], not_after))
    }
}

/// Refuses a request whose key is not ECDSA P-256 or whose signature is not
/// ECDSA-SHA256 (rcgen would take the key's algorithm from the signature's,
/// and label another curve's key P-256).
fn check_p256_request(csr_der: &[u8]) -> Result<(), CertError> {
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::oid_registry::{
        OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ECDSA_WITH_SHA256,
    };
    use x509_parser::prelude::FromDer;
    let (rest, req) = X509CertificationRequest::from_der(csr_der)
        .map_err(|e| CertError::Request(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CertError::Request(
            "trailing bytes after the request".into(),
        ));
    }
    let spki = &req.certification_request_info.subject_pki;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY || curve != Some(OID_EC_P256) {
        return Err(CertError::Request("the key must be ECDSA P-256".into()));
    }
    if req.signature_algorithm.algorithm != OID_SIG_ECDSA_WITH_SHA256 {
        return Err(CertError::Request(
            "the request must be signed with ECDSA-SHA256".into(),
        ));
    }
    Ok(())
}

/// A fresh key pair and a certificate signing request for one identity:
/// what a proxy sends its control plane (the key never leaves it).
pub struct CertRequest {
    id: SpiffeId,
    key: KeyPair,
    csr: Vec<u8>,
}

impl std::fmt::Debug for CertRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertRequest")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl CertRequest {
    /// Makes an ECDSA P-256 key and a request for `id` (its URI SAN)
    /// signed with it.
    pub fn new(id: &SpiffeId) -> Result<Self, CertError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
        let csr = p.serialize_request(&key)?;
        Ok(Self {
            id: id.clone(),
            key,
            csr: csr.der().to_vec(),
        })
    }

    /// The request, DER.
    pub fn csr_der(&self) -> &[u8] {
        &self.csr
    }

    /// The leaf for this request from its issued chain (leaf first): the
    /// leaf must name this request's identity and carry its public key.
    pub fn into_leaf(self, chain: Vec<CertificateDer<'static>>) -> Result<Leaf, CertError> {
        let key: PrivateKeyDer<'static> = PrivatePkcs8KeyDer::from(self.key.serialize_der()).into();
        let leaf = Leaf::from_parts(chain, key)?;
        if leaf.id != self.id {
            return Err(CertError::Mismatch(format!(
                "names {}, asked for {}",
                leaf.id, self.id
            )));
        }
        let first = leaf.chain.first().map(|c| c.as_ref()).unwrap_or_default();
        let (_, parsed) = x509_parser::parse_x509_certificate(first)
            .map_err(|e| CertError::Malformed(e.to_string()))?;
        if parsed.public_key().subject_public_key.data.as_ref() != self.key.public_key_raw() {
            return Err(CertError::Mismatch("another public key".into()));
        }
        Ok(leaf)
    }
}

/// A leaf certificate with its chain (leaf first, then the issuer) and key.
#[derive(Debug)]
pub struct Leaf {
    /// The identity in the certificate.
    pub id: SpiffeId,
    /// Leaf, then issuer.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
    /// When the leaf was made.
    pub not_before: SystemTime,
    /// When the leaf expires.
    pub not_after: SystemTime,
}

impl Leaf {
    /// Parses a leaf issued elsewhere (by a control plane, or files on
    /// disk): its PEM chain (leaf first) and PKCS#8 key. The identity and
    /// validity are read from the leaf.
    pub fn from_pem(chain_pem: &[u8], key_pem: &[u8]) -> Result<Self, CertError> {
        let chain = CertificateDer::pem_slice_iter(chain_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CertError::Malformed(e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|_| CertError::NoKey("identity key".into()))?;
        Self::from_parts(chain, key)
    }

    /// A leaf from its DER chain (leaf first) and key; the identity and
    /// validity are read from the leaf.
    pub fn from_parts(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, CertError> {
        let first = chain
            .first()
            .ok_or_else(|| CertError::NoCertificate("identity certificate".into()))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(first)
            .map_err(|e| CertError::Malformed(e.to_string()))?;
        let id = super::verify::uri_sans(&parsed)
            .into_iter()
            .find_map(|u| SpiffeId::parse(&u).ok())
            .ok_or_else(|| CertError::Malformed("no SPIFFE ID in the certificate".into()))?;
        let at = |t: x509_parser::time::ASN1Time| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
        };
        Ok(Self {
            id,
            not_before: at(parsed.validity().not_before),
            not_after: at(parsed.validity().not_after),
            chain,
            key,
        })
    }

    /// When to renew: two thirds into the leaf's life.
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life * 2 / 3
    }

    /// Converts the leaf into a rustls signing identity.
    pub fn certified_key(&self) -> Result<Arc<rustls::sign::CertifiedKey>, CertError> {
        let signer = crate::tls::provider()
            .key_provider
            .load_private_key(self.key.clone_key())?;
        Ok(Arc::new(rustls::sign::CertifiedKey::new(
            self.chain.clone(),
            signer,
        )))
    }
}
