//! Leader election on a `coordination.k8s.io/v1` Lease: one gateway
//! replica writes the mirror objects; every replica carries traffic.
//!
//! [`decide`] is pure: given the Lease as read and the time, it says
//! whether to take it, renew it or follow its holder. [`Elector`] reads and
//! writes the Lease with optimistic concurrency (a replace carries the
//! resourceVersion read, so of two replicas racing for an expired Lease
//! exactly one wins; the other gets 409 Conflict and follows).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::watch;

/// What a replica should do with the Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nobody holds it (absent, released or expired): take it.
    Acquire,
    /// We hold it: renew it.
    Renew,
    /// Someone else holds it and it is live.
    Follow {
        /// The holder.
        holder: String,
    },
}

/// Decides from the Lease as read (pure). `unchanged_for` is how long
/// this replica has seen the same Lease record (holder, renew time,
/// version) on its own monotonic clock: expiry is judged by that, never by
/// comparing another machine's timestamps with ours, so clock skew cannot
/// make two leaders (client-go does the same).
pub fn decide(spec: Option<&LeaseSpec>, me: &str, unchanged_for: Duration) -> Decision {
    let Some(spec) = spec else {
        return Decision::Acquire;
    };
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder.is_empty() {
        return Decision::Acquire;
    }
    if holder == me {
        return Decision::Renew;
    }
    let duration = u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0);
    if unchanged_for < Duration::from_secs(duration) {
        Decision::Follow {
            holder: holder.to_string(),
        }
    } else {
        Decision::Acquire
    }
}

/// Lease timings.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    /// The Lease's namespace.
    pub namespace: String,
    /// The Lease's name.
    pub name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a Lease lasts without renewal.
    pub duration: Duration,
    /// How often the holder renews, and others check.
    pub renew_every: Duration,
}

/// The Lease record as last seen, and since when (local monotonic time).
#[derive(Default)]
struct Observed {
    record: Option<String>,
    since: Option<std::time::Instant>,
}

impl Observed {
    fn see(&mut self, lease: Option<&Lease>) -> Duration {
        let record = lease.map(|l| {
            let spec = l.spec.as_ref();
            format!(
                "{:?}/{:?}/{:?}",
                spec.and_then(|s| s.holder_identity.as_ref()),
                spec.and_then(|s| s.renew_time.as_ref()),
                l.metadata.resource_version
            )
        });
        let now = std::time::Instant::now();
        if self.record != record || self.since.is_none() {
            self.record = record;
            self.since = Some(now);
        }
        self.since.map_or(Duration::ZERO, |t| now.duration_since(t))
    }
}

/// Runs the election until the task is aborted, publishing whether this
/// replica leads. Every round is bounded by the renew interval, and a
/// leader keeps leading only while its last successful renewal — timed
/// from when the request was sent — is less than half a Lease old: it
/// steps down before anyone else could take the Lease.
pub async fn run(client: Client, settings: LeaseSettings, leading: watch::Sender<bool>) {
    let api: Api<Lease> = Api::namespaced(client, &settings.namespace);
    let mut last_renewal: Option<std::time::Instant> = None;
    let mut observed = Observed::default();
    loop {
        let sent = std::time::Instant::now();
        let result =
            tokio::time::timeout(settings.renew_every, step(&api, &settings, &mut observed)).await;
        let lead = match result {
            Ok(Ok(true)) => {
                last_renewal = Some(sent);
                true
            }
            Ok(Ok(false)) => false,
            Ok(Err(error)) => {
                tracing::warn!(%error, lease = %settings.name, "lease check failed");
                last_renewal.is_some_and(|t| t.elapsed() < settings.duration / 2)
                    && *leading.borrow()
            }
            Err(_) => {
                tracing::warn!(lease = %settings.name, "lease check timed out");
                last_renewal.is_some_and(|t| t.elapsed() < settings.duration / 2)
                    && *leading.borrow()
            }
        };
        leading.send_if_modified(|cur| {
            if *cur != lead {
                tracing::info!(leading = lead, lease = %settings.name, "mirror writer election");
                *cur = lead;
                true
            } else {
                false
            }
        });
        tokio::time::sleep(settings.renew_every.saturating_sub(sent.elapsed())).await;
    }
}

/// One read-decide-write round; `Ok(true)` when we hold the Lease after it.
async fn step(
    api: &Api<Lease>,
    s: &LeaseSettings,
    observed: &mut Observed,
) -> Result<bool, kube::Error> {
    let current = api.get_opt(&s.name).await?;
    let unchanged_for = observed.see(current.as_ref());
    let decision = decide(
        current.as_ref().and_then(|l| l.spec.as_ref()),
        &s.identity,
        unchanged_for,
    );
    if let Decision::Follow { .. } = decision {
        return Ok(false);
    }
    let now = Timestamp::now();
    let mut lease = current.clone().unwrap_or_else(|| Lease {
        metadata: ObjectMeta {
            name: Some(s.name.clone()),
            namespace: Some(s.namespace.clone()),
            ..Default::default()
        },
        spec: None,
    });
    let mut spec = lease.spec.take().unwrap_or_default();
    if decision == Decision::Acquire {
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.holder_identity = Some(s.identity.clone());
    spec.lease_duration_seconds = Some(i32::try_from(s.duration.as_secs()).unwrap_or(i32::MAX));
    spec.renew_time = Some(MicroTime(now));
    lease.spec = Some(spec);
    let written = if current.is_some() {
        // Carries the resourceVersion read: a racing writer gets 409.
        api.replace(&s.name, &PostParams::default(), &lease).await
    } else {
        api.create(&PostParams::default(), &lease).await
    };
    match written {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::SignedDuration;

    use super::*;

    fn lease(holder: &str, secs: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            renew_time: Some(MicroTime(Timestamp::now())),
            lease_duration_seconds: Some(secs),
            ..Default::default()
        }
    }

    #[test]
    fn absent_released_or_expired_leases_are_taken() {
        let s = Duration::from_secs;
        assert_eq!(decide(None, "a", s(0)), Decision::Acquire);
        assert_eq!(decide(Some(&lease("", 15)), "a", s(0)), Decision::Acquire);
        assert_eq!(decide(Some(&lease("b", 15)), "a", s(16)), Decision::Acquire);
        let spec = LeaseSpec {
            holder_identity: Some("b".into()),
            ..Default::default()
        };
        assert_eq!(
            decide(Some(&spec), "a", s(0)),
            Decision::Acquire,
            "no duration"
        );
    }

    #[test]
    fn live_leases_are_followed_or_renewed() {
        let s = Duration::from_secs;
        assert_eq!(
            decide(Some(&lease("b", 15)), "a", s(5)),
            Decision::Follow { holder: "b".into() }
        );
        // Judged by how long we have seen it unchanged, not its timestamp:
        // a renewal stamped by a clock far behind ours still counts.
        let mut skewed = lease("b", 15);
        skewed.renew_time = Some(MicroTime(
            Timestamp::now() - SignedDuration::from_secs(3600),
        ));
        assert_eq!(
            decide(Some(&skewed), "a", s(1)),
            Decision::Follow { holder: "b".into() }
        );
        assert_eq!(decide(Some(&lease("a", 15)), "a", s(60)), Decision::Renew);
    }

    #[test]
    fn the_clock_restarts_whenever_the_record_changes() {
        let mut o = Observed::default();
        let mut l = Lease {
            metadata: ObjectMeta {
                resource_version: Some("1".into()),
                ..Default::default()
            },
            spec: Some(lease("b", 15)),
        };
        assert_eq!(o.see(Some(&l)), Duration::ZERO);
        std::thread::sleep(Duration::from_millis(20));
        assert!(o.see(Some(&l)) >= Duration::from_millis(20));
        l.metadata.resource_version = Some("2".into());
        assert!(
            o.see(Some(&l)) < Duration::from_millis(20),
            "renewed: counting again"
        );
    }
}
