//! Metric families shared by the sidecar and the gateway, and the text
//! encoder behind `/metrics`. Every name starts with `strait_`; label values
//! come from bounded sets.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::identity::{RefusalReason, RefusalSink};

/// Labels of a TLS peer refusal.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// `accept` (a peer dialed us) or `connect` (we dialed a peer).
    pub side: &'static str,
    /// [`RefusalReason::as_str`].
    pub reason: &'static str,
}

/// TLS metrics: refused peer certificates by side and reason.
#[derive(Clone, Debug, Default)]
pub struct TlsMetrics {
    refusals: Family<RefusalLabels, Counter>,
}

impl TlsMetrics {
    /// Registers the families in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "strait_tls_handshake_failures",
            "Peer certificates refused during TLS handshakes, by side and reason",
            m.refusals.clone(),
        );
        m
    }

    /// A sink that counts refusals on `side` (`accept` or `connect`).
    pub fn sink(&self, side: &'static str) -> RefusalSink {
        let refusals = self.refusals.clone();
        Arc::new(move |reason: RefusalReason| {
            refusals
                .get_or_create(&RefusalLabels {
                    side,
                    reason: reason.as_str(),
                })
                .inc();
        })
    }

    /// Refusals counted so far for one side and reason (for tests and
    /// status pages).
    pub fn refusals(&self, side: &'static str, reason: RefusalReason) -> u64 {
        self.refusals
            .get_or_create(&RefusalLabels {
                side,
                reason: reason.as_str(),
            })
            .get()
    }
}

/// Encodes a registry in the OpenMetrics text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}
