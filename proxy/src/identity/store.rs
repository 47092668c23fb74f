//! The current leaf, swapped atomically on renewal so that live tunnels
//! keep their sessions and new handshakes pick up the new certificate.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;
use tokio::sync::watch;

use super::certs::{CertError, Issuer, Leaf};
use super::spiffe::SpiffeId;

/// Holds the current certified key for one identity; usable as both the
/// server and the client certificate resolver of rustls configs. A store
/// may start [`pending`](Self::pending) (the proxy is still waiting for
/// its control plane): until the first leaf arrives it offers no
/// certificate, so every handshake that needs one fails.
#[derive(Debug)]
pub struct CertStore {
    id: SpiffeId,
    current: ArcSwapOption<Current>,
    certified: watch::Sender<bool>,
}

#[derive(Debug)]
struct Current {
    key: Arc<CertifiedKey>,
    not_after: SystemTime,
}

impl CertStore {
    /// A store holding `leaf`.
    pub fn new(leaf: &Leaf) -> Result<Arc<Self>, CertError> {
        let store = Self::pending(leaf.id.clone());
        store.store(leaf)?;
        Ok(store)
    }

    /// A store for `id` without a certificate yet.
    pub fn pending(id: SpiffeId) -> Arc<Self> {
        Arc::new(Self {
            id,
            current: ArcSwapOption::empty(),
            certified: watch::Sender::new(false),
        })
    }

    /// Replaces the current leaf (which must be for this store's identity).
    pub fn store(&self, leaf: &Leaf) -> Result<(), CertError> {
        if leaf.id != self.id {
            return Err(CertError::Mismatch(format!(
                "a leaf for {} offered to the store of {}",
                leaf.id, self.id
            )));
        }
        self.current.store(Some(Arc::new(Current {
            key: leaf.certified_key()?,
            not_after: leaf.not_after,
        })));
        self.certified.send_replace(true);
        Ok(())
    }

    /// The identity this store serves.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// When the current leaf expires (the Unix epoch while pending).
    pub fn not_after(&self) -> SystemTime {
        self.current
            .load()
            .as_ref()
            .map_or(SystemTime::UNIX_EPOCH, |c| c.not_after)
    }

    /// Whether a leaf has arrived.
    pub fn is_certified(&self) -> bool {
        *self.certified.borrow()
    }

    /// Resolves once a leaf has arrived.
    pub async fn certified(&self) {
        let mut rx = self.certified.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }

    fn key(&self) -> Option<Arc<CertifiedKey>> {
        self.current.load().as_ref().map(|c| c.key.clone())
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.key()
    }
}

impl ResolvesClientCert for CertStore {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.key()
    }

    fn has_certs(&self) -> bool {
        self.is_certified()
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
