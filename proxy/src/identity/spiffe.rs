//! SPIFFE IDs: `spiffe://<trust-domain>/<path>`.

use std::fmt;

/// A parsed, normalised SPIFFE ID.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(into = "String")]
pub struct SpiffeId {
    /// Shared: an ID is cloned into pool keys and endpoint sets on every
    /// request, and never changes.
    uri: std::sync::Arc<str>,
    domain_len: usize,
}

/// Why a string is not a SPIFFE ID.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum SpiffeIdError {
    /// The scheme is not `spiffe://`.
    #[error("a SPIFFE ID starts with spiffe:// (got {0:?})")]
    Scheme(String),
    /// The trust domain is empty or has characters SPIFFE forbids.
    #[error("invalid SPIFFE trust domain in {0:?}: lowercase letters, digits, '.', '-', '_' only")]
    TrustDomain(String),
    /// The path has an empty, `.` or `..` segment or a forbidden character.
    #[error("invalid SPIFFE path in {0:?}")]
    Path(String),
    /// Longer than the 2048 bytes SPIFFE allows.
    #[error("SPIFFE ID longer than 2048 bytes")]
    TooLong,
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID per the SPIFFE-ID specification.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.len() > 2048 {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| SpiffeIdError::Scheme(s.to_string()))?;
        let (domain, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let domain_ok = !domain.is_empty()
            && domain
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
        if !domain_ok {
            return Err(SpiffeIdError::TrustDomain(s.to_string()));
        }
        if !path.is_empty() {
            let ok = path[1..].split('/').all(|seg| {
                !seg.is_empty()
                    && seg != "."
                    && seg != ".."
                    && seg
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
            });
            if !ok {
                return Err(SpiffeIdError::Path(s.to_string()));
            }
        }
        Ok(Self {
            uri: s.into(),
            domain_len: domain.len(),
        })
    }

    /// The ID of a workload running as `sa` in namespace `ns`.
    pub fn workload(trust_domain: &str, ns: &str, sa: &str) -> Result<Self, SpiffeIdError> {
        Self::parse(&format!("spiffe://{trust_domain}/ns/{ns}/sa/{sa}"))
    }

    /// The ID of a trust domain itself (`spiffe://<td>`), carried by issuers.
    pub fn trust_domain_id(trust_domain: &str) -> Result<Self, SpiffeIdError> {
        Self::parse(&format!("spiffe://{trust_domain}"))
    }

    /// The trust domain part.
    pub fn trust_domain(&self) -> &str {
        &self.uri["spiffe://".len().."spiffe://".len() + self.domain_len]
    }

    /// The whole URI.
    pub fn as_str(&self) -> &str {
        &self.uri
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl From<SpiffeId> for String {
    fn from(id: SpiffeId) -> String {
        id.uri.to_string()
    }
}

impl std::str::FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}
