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
use k8s_openapi::jiff::{SignedDuration, Timestamp};
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

/// Decides from the Lease as read (pure).
pub fn decide(spec: Option<&LeaseSpec>, me: &str, now: Timestamp) -> Decision {
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
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(0).max(0));
    let renewed = spec
        .renew_time
        .as_ref()
        .or(spec.acquire_time.as_ref())
        .map(|t| t.0);
    match renewed {
        Some(t) if t + SignedDuration::from_secs(duration) > now => Decision::Follow {
            holder: holder.to_string(),
        },
        _ => Decision::Acquire,
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

/// Runs the election until the task is aborted, publishing whether this
/// replica leads. A leader that fails to renew before its Lease would
/// expire steps down at once, so two writers never overlap by design.
pub async fn run(client: Client, settings: LeaseSettings, leading: watch::Sender<bool>) {
    let api: Api<Lease> = Api::namespaced(client, &settings.namespace);
    let mut last_renewal: Option<std::time::Instant> = None;
    loop {
        let result = step(&api, &settings).await;
        let now = std::time::Instant::now();
        let lead = match result {
            Ok(lead) => {
                if lead {
                    last_renewal = Some(now);
                }
                lead
            }
            Err(error) => {
                tracing::warn!(%error, lease = %settings.name, "lease check failed");
                // Keep leading only while the last renewal is surely live.
                last_renewal.is_some_and(|t| now.duration_since(t) < settings.duration / 2)
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
        tokio::time::sleep(settings.renew_every).await;
    }
}

/// One read-decide-write round; `Ok(true)` when we hold the Lease after it.
async fn step(api: &Api<Lease>, s: &LeaseSettings) -> Result<bool, kube::Error> {
    let current = api.get_opt(&s.name).await?;
    let now = Timestamp::now();
    let decision = decide(
        current.as_ref().and_then(|l| l.spec.as_ref()),
        &s.identity,
        now,
    );
    let Decision::Follow { .. } = decision else {
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
        return match written {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, renewed: Timestamp, secs: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            renew_time: Some(MicroTime(renewed)),
            lease_duration_seconds: Some(secs),
            ..Default::default()
        }
    }

    #[test]
    fn absent_released_or_expired_leases_are_taken() {
        let now = Timestamp::now();
        assert_eq!(decide(None, "a", now), Decision::Acquire);
        assert_eq!(
            decide(Some(&lease("", now, 15)), "a", now),
            Decision::Acquire
        );
        let old = now - SignedDuration::from_secs(16);
        assert_eq!(
            decide(Some(&lease("b", old, 15)), "a", now),
            Decision::Acquire
        );
        let spec = LeaseSpec {
            holder_identity: Some("b".into()),
            ..Default::default()
        };
        assert_eq!(
            decide(Some(&spec), "a", now),
            Decision::Acquire,
            "never renewed"
        );
    }

    #[test]
    fn live_leases_are_followed_or_renewed() {
        let now = Timestamp::now();
        let recent = now - SignedDuration::from_secs(5);
        assert_eq!(
            decide(Some(&lease("b", recent, 15)), "a", now),
            Decision::Follow { holder: "b".into() }
        );
        assert_eq!(
            decide(Some(&lease("a", recent, 15)), "a", now),
            Decision::Renew
        );
        // Our own lease is renewed even when it lapsed: nobody took it.
        let old = now - SignedDuration::from_secs(60);
        assert_eq!(
            decide(Some(&lease("a", old, 15)), "a", now),
            Decision::Renew
        );
    }
}
