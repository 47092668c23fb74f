//! [`ZoneHandle`]: the lock-free holder of the currently served zone.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, Guard};
use tracing::{debug, info};

use crate::{DnsMetrics, Responder, Zone};

/// Shared handle to the served [`Zone`]. Cloning is cheap and every clone
/// sees the same zone.
///
/// Readers ([`ZoneHandle::current`], the DNS server) never lock;
/// [`ZoneHandle::publish`] swaps the whole snapshot atomically. The handle
/// holds each snapshot as a [`Responder`], whose answers are encoded when
/// it is published, not when it is first asked.
///
/// A handle reports `strait_dns_zone_records` and
/// `strait_dns_zone_last_update_timestamp_seconds` to the first
/// [`DnsMetrics`] attached to it, either with [`ZoneHandle::with_metrics`]
/// or by passing it to [`DnsServer::bind`](crate::DnsServer::bind); later
/// attachments are ignored.
#[derive(Clone)]
pub struct ZoneHandle {
    inner: Arc<Inner>,
}

struct Inner {
    responder: ArcSwap<Responder>,
    /// Unix time of the last publication, in nanoseconds.
    published_at_nanos: AtomicU64,
    metrics: OnceLock<DnsMetrics>,
}

impl ZoneHandle {
    /// Creates a handle serving `zone`.
    pub fn new(zone: Zone) -> Self {
        Self {
            inner: Arc::new(Inner {
                responder: ArcSwap::from_pointee(Responder::new(zone)),
                published_at_nanos: AtomicU64::new(now_nanos()),
                metrics: OnceLock::new(),
            }),
        }
    }

    /// Creates a handle serving `zone` that keeps the zone gauges of
    /// `metrics` up to date.
    pub fn with_metrics(zone: Zone, metrics: DnsMetrics) -> Self {
        let handle = Self::new(zone);
        handle.attach_metrics(&metrics);
        handle
    }

    /// Atomically replaces the served zone; queries already in flight finish
    /// with the snapshot they started with.
    ///
    /// The new zone's answers are encoded here, before the swap (see
    /// [`Responder::new`]).
    pub fn publish(&self, zone: Zone) {
        let serial = zone.serial();
        let records = zone.record_count();
        let start = Instant::now();
        let responder = Responder::new(zone);
        let precomputed = start.elapsed();
        self.inner.responder.store(Arc::new(responder));
        let now = now_nanos();
        self.inner.published_at_nanos.store(now, Ordering::Release);
        if let Some(metrics) = self.inner.metrics.get() {
            metrics.record_zone(records, from_nanos(now));
        }
        info!(serial, records, ?precomputed, "published DNS zone");
    }

    /// The zone currently served.
    pub fn current(&self) -> Arc<Zone> {
        self.inner.responder.load().zone().clone()
    }

    /// The snapshot currently served, ready to answer queries.
    pub fn responder(&self) -> Arc<Responder> {
        self.inner.responder.load_full()
    }

    /// The snapshot currently served, without touching its reference count
    /// (for the server's per-query path; do not hold it across an `.await`).
    pub(crate) fn load(&self) -> Guard<Arc<Responder>> {
        self.inner.responder.load()
    }

    /// Attaches `metrics` unless some metrics are already attached, and
    /// reports the current zone to them.
    pub(crate) fn attach_metrics(&self, metrics: &DnsMetrics) {
        if self.inner.metrics.set(metrics.clone()).is_err() {
            debug!("zone handle already reports to other metrics");
            return;
        }
        let zone = self.current();
        let at = from_nanos(self.inner.published_at_nanos.load(Ordering::Acquire));
        metrics.record_zone(zone.record_count(), at);
    }
}

impl fmt::Debug for ZoneHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let zone = self.current();
        f.debug_struct("ZoneHandle")
            .field("origin", &zone.origin().to_string())
            .field("serial", &zone.serial())
            .field("records", &zone.record_count())
            .field("metrics", &self.inner.metrics.get().is_some())
            .finish()
    }
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn from_nanos(nanos: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(nanos)
}
