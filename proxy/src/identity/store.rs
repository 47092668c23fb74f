//! The current leaf, swapped atomically on renewal so that live tunnels
//! keep their sessions and new handshakes pick up the new certificate.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;

use super::certs::{CertError, Issuer, Leaf};
use super::spiffe::SpiffeId;

/// Holds the current certified key for one identity; usable as both the
/// server and the client certificate resolver of rustls configs.
#[derive(Debug)]
pub struct CertStore {
    id: SpiffeId,
    current: ArcSwap<CertifiedKey>,
    not_after: ArcSwap<SystemTime>,
}

impl CertStore {
    /// A store holding `leaf`.
    pub fn new(leaf: &Leaf) -> Result<Arc<Self>, CertError> {
        Ok(Arc::new(Self {
            id: leaf.id.clone(),
            current: ArcSwap::new(leaf.certified_key()?),
            not_after: ArcSwap::new(Arc::new(leaf.not_after)),
        }))
    }

    /// Replaces the current leaf.
    pub fn store(&self, leaf: &Leaf) -> Result<(), CertError> {
        self.current.store(leaf.certified_key()?);
        self.not_after.store(Arc::new(leaf.not_after));
        Ok(())
    }

    /// The identity this store serves.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// When the current leaf expires.
    pub fn not_after(&self) -> SystemTime {
        **self.not_after.load()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl ResolvesClientCert for CertStore {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Renews the store's leaf at two thirds of its life, forever; on failure
/// retries every `retry` until the old leaf would expire. `on_renew` gets
/// each new expiry (for the certificate expiry metric).
pub fn spawn_rotation(
    issuer: Arc<Issuer>,
    store: Arc<CertStore>,
    lifetime: Duration,
    retry: Duration,
    on_renew: impl Fn(SystemTime) + Send + Sync + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut renew_at = {
            let not_after = store.not_after();
            let left = not_after
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            SystemTime::now() + left * 2 / 3
        };
        loop {
            let wait = renew_at
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            tokio::time::sleep(wait).await;
            match issuer.issue(store.id(), lifetime) {
                Ok(leaf) => match store.store(&leaf) {
                    Ok(()) => {
                        tracing::info!(id = %store.id(), not_after = ?leaf.not_after, "renewed certificate");
                        on_renew(leaf.not_after);
                        renew_at = leaf.renew_at();
                    }
                    Err(error) => {
                        tracing::warn!(%error, "renewed certificate refused");
                        renew_at = SystemTime::now() + retry;
                    }
                },
                Err(error) => {
                    tracing::warn!(%error, "certificate renewal failed; retrying");
                    renew_at = SystemTime::now() + retry;
                }
            }
        }
    })
}
