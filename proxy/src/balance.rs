//! Load balancing: power of two choices over peak-EWMA cost, with failing
//! endpoints taken out and probed back.
//!
//! Sans-IO in the quinn spirit: the balancer never reads a clock or a
//! socket. Callers pass `now` and report what they observed (a latency, a
//! failure), so tests drive it with a virtual clock.
//!
//! Cost of an endpoint = its peak-EWMA latency × (requests in flight + 1).
//! Peak EWMA (Finagle's, as in linkerd2-proxy) jumps up to a slower sample
//! at once and decays towards faster ones with time constant `decay`, so a
//! slow endpoint loses traffic immediately and earns it back gradually.

use crate::FastMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Balancer settings, with documented defaults.
#[derive(Clone, Debug)]
pub struct BalanceConfig {
    /// EWMA time constant (default 10 s).
    pub decay: Duration,
    /// Latency assumed for an endpoint never measured (default 1 ms); a
    /// low value lets new endpoints get traffic at once.
    pub default_rtt: Duration,
    /// Consecutive failures that take an endpoint out (default 3).
    pub failures_to_eject: u32,
    /// First time an endpoint stays out (default 1 s); doubles with each
    /// ejection in a row, up to `max_ejection`.
    pub base_ejection: Duration,
    /// Longest time an endpoint stays out (default 30 s).
    pub max_ejection: Duration,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        Self {
            decay: Duration::from_secs(10),
            default_rtt: Duration::from_millis(1),
            failures_to_eject: 3,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(30),
        }
    }
}

/// Peak-EWMA latency estimate, in nanoseconds.
#[derive(Clone, Copy, Debug)]
struct PeakEwma {
    cost_ns: f64,
    stamp: Instant,
}

impl PeakEwma {
    fn observe(&mut self, rtt: Duration, now: Instant, decay: Duration) {
        let rtt = rtt.as_nanos() as f64;
        if rtt > self.cost_ns {
            self.cost_ns = rtt;
        } else {
            let elapsed = now.saturating_duration_since(self.stamp).as_nanos() as f64;
            let w = (-elapsed / decay.as_nanos().max(1) as f64).exp();
            self.cost_ns = self.cost_ns * w + rtt * (1.0 - w);
        }
        self.stamp = now;
    }

    /// The estimate decayed to `now` (towards zero, like linkerd2-proxy,
    /// so an endpoint that is not picked becomes attractive again).
    fn at(&self, now: Instant, decay: Duration) -> f64 {
        let elapsed = now.saturating_duration_since(self.stamp).as_nanos() as f64;
        self.cost_ns * (-elapsed / decay.as_nanos().max(1) as f64).exp()
    }
}

#[derive(Clone, Debug)]
struct Endpoint {
    ewma: PeakEwma,
    pending: u32,
    consecutive_failures: u32,
    ejections_in_a_row: u32,
    ejected_until: Option<Instant>,
}

/// A P2C peak-EWMA balancer over endpoints identified by `K`.
///
/// Endpoints are kept in a vector in the order given, with a map from key
/// to position for the reports: a pick (once per request) draws positions
/// and hashes nothing.
#[derive(Debug)]
pub struct Balancer<K> {
    config: BalanceConfig,
    endpoints: Vec<(K, Endpoint)>,
    index: FastMap<K, usize>,
    rng: u64,
}

/// What [`Balancer::pick`] chose.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pick<K> {
    /// The endpoint.
    pub key: K,
    /// Whether it was ejected and this is a probe to see if it is back.
    pub probe: bool,
}

impl<K: Clone + Eq + Hash> Balancer<K> {
    /// An empty balancer; `seed` makes choices reproducible in tests.
    pub fn new(config: BalanceConfig, seed: u64) -> Self {
        Self {
            config,
            endpoints: Vec::new(),
            index: FastMap::default(),
            rng: seed | 1,
        }
    }

    /// Replaces the endpoint set, keeping what is known of endpoints that
    /// stay.
    pub fn update<I>(&mut self, keys: I, now: Instant)
    where
        I: IntoIterator<Item = K>,
        I::IntoIter: Clone,
    {
        let keys = keys.into_iter();
        // The common case, once per request: nothing changed.
        let mut same = keys.clone();
        if self
            .endpoints
            .iter()
            .all(|(k, _)| same.next().as_ref() == Some(k))
            && same.next().is_none()
        {
            return;
        }
        let mut known: FastMap<K, Endpoint> = self.endpoints.drain(..).collect();
        self.index.clear();
        let default_ns = self.config.default_rtt.as_nanos() as f64;
        for k in keys {
            if self.index.contains_key(&k) {
                continue;
            }
            let e = known.remove(&k).unwrap_or(Endpoint {
                ewma: PeakEwma {
                    cost_ns: default_ns,
                    stamp: now,
                },
                pending: 0,
                consecutive_failures: 0,
                ejections_in_a_row: 0,
                ejected_until: None,
            });
            self.index.insert(k.clone(), self.endpoints.len());
            self.endpoints.push((k, e));
        }
    }

    /// Number of endpoints.
    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    /// Whether there are no endpoints.
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*: plenty for choosing two of n.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn cost(&self, i: usize, now: Instant) -> f64 {
        let e = &self.endpoints[i].1;
        e.ewma.at(now, self.config.decay).max(1.0) * f64::from(e.pending + 1)
    }

    /// An endpoint's requests in flight and its latency estimate at `now`
    /// (for tests).
    #[cfg(test)]
    pub(crate) fn state(&self, key: &K, now: Instant) -> Option<(u32, Duration)> {
        let i = *self.index.get(key)?;
        let e = &self.endpoints.get(i)?.1;
        let ns = e.ewma.at(now, self.config.decay);
        Some((e.pending, Duration::from_nanos(ns as u64)))
    }

    /// The endpoint known as `key`.
    fn get_mut(&mut self, key: &K) -> Option<&mut Endpoint> {
        let i = *self.index.get(key)?;
        self.endpoints.get_mut(i).map(|(_, e)| e)
    }

    /// Chooses an endpoint and counts a request in flight on it (end it
    /// with [`Balancer::observe`] or [`Balancer::failed`]). Two endpoints
    /// are drawn among those not ejected and the cheaper wins. When every
    /// endpoint is ejected, the one whose ejection ends first is probed, so
    /// a service never goes dark while its endpoints may have recovered.
    pub fn pick(&mut self, now: Instant) -> Option<Pick<K>> {
        self.choose(now, |_| true)
    }

    /// [`Balancer::pick`] among the live endpoints not in `tried` (a
    /// retry's earlier attempts), when any is left: P2C over every endpoint would
    /// draw a failing one again whenever it is the cheaper of the two, as
    /// a fast failure leaves it.
    pub fn pick_untried(&mut self, now: Instant, tried: &[K]) -> Option<Pick<K>> {
        let untried = |k: &K| !tried.contains(k);
        // Only a live one: a retry must not probe an ejected endpoint
        // while a live one (tried, but not out) remains.
        if self
            .endpoints
            .iter()
            .any(|(k, e)| untried(k) && e.ejected_until.is_none_or(|t| t <= now))
        {
            self.choose(now, untried)
        } else {
            self.pick(now)
        }
    }

    /// P2C over the endpoints `allowed` says may be picked.
    fn choose(&mut self, now: Instant, allowed: impl Fn(&K) -> bool) -> Option<Pick<K>> {
        let live = |k: &K, e: &Endpoint| allowed(k) && e.ejected_until.is_none_or(|t| t <= now);
        let n = self.endpoints.iter().filter(|(k, e)| live(k, e)).count();
        // The position of the `j`th endpoint in, when `n` are.
        let nth = |this: &Self, j: usize| {
            if n == this.endpoints.len() {
                return j;
            }
            let mut ins = this
                .endpoints
                .iter()
                .enumerate()
                .filter(|(_, (k, e))| live(k, e));
            ins.nth(j).map_or(0, |(i, _)| i)
        };
        let i = match n {
            0 => {
                self.endpoints
                    .iter()
                    .enumerate()
                    .filter(|(_, (k, _))| allowed(k))
                    .min_by_key(|(_, (_, e))| e.ejected_until)?
                    .0
            }
            1 => nth(self, 0),
            n => {
                let a = (self.next_random() % n as u64) as usize;
                let mut b = (self.next_random() % (n as u64 - 1)) as usize;
                if b >= a {
                    b += 1;
                }
                let (a, b) = (nth(self, a), nth(self, b));
                if self.cost(a, now) <= self.cost(b, now) {
                    a
                } else {
                    b
                }
            }
        };
        let (key, e) = &mut self.endpoints[i];
        e.pending += 1;
        Some(Pick {
            key: key.clone(),
            probe: n == 0 || e.ejected_until.is_some(),
        })
    }

    /// Reports a success that took `latency`; the endpoint is back in if
    /// it was out.
    pub fn observe(&mut self, key: &K, latency: Duration, now: Instant) {
        let decay = self.config.decay;
        if let Some(e) = self.get_mut(key) {
            e.pending = e.pending.saturating_sub(1);
            e.ewma.observe(latency, now, decay);
            e.consecutive_failures = 0;
            e.ejections_in_a_row = 0;
            e.ejected_until = None;
        }
    }

    /// Reports a latency sample for a request still in flight (a
    /// connection that was established and stays open): the endpoint's
    /// estimate moves and it is back in if it was out; call
    /// [`Balancer::release`] when it ends.
    pub fn sample(&mut self, key: &K, latency: Duration, now: Instant) {
        let decay = self.config.decay;
        if let Some(e) = self.get_mut(key) {
            e.ewma.observe(latency, now, decay);
            e.consecutive_failures = 0;
            e.ejections_in_a_row = 0;
            e.ejected_until = None;
        }
    }

    /// Reports a finished request without a latency sample (a long-lived
    /// stream ended, say).
    pub fn release(&mut self, key: &K) {
        if let Some(e) = self.get_mut(key) {
            e.pending = e.pending.saturating_sub(1);
        }
    }

    /// Reports a failure (refused connection, reset, timeout); enough in a
    /// row take the endpoint out, for longer each time.
    pub fn failed(&mut self, key: &K, now: Instant) {
        let config = self.config.clone();
        if let Some(e) = self.get_mut(key) {
            e.pending = e.pending.saturating_sub(1);
            e.consecutive_failures += 1;
            let was_out = e.ejected_until.is_some();
            if e.consecutive_failures >= config.failures_to_eject || was_out {
                let factor = 1u32 << e.ejections_in_a_row.min(16);
                let out = config
                    .base_ejection
                    .saturating_mul(factor)
                    .min(config.max_ejection);
                e.ejected_until = Some(now + out);
                e.ejections_in_a_row += 1;
                e.consecutive_failures = 0;
            }
        }
    }

    /// Whether `key` is taken out at `now`.
    pub fn is_ejected(&self, key: &K, now: Instant) -> bool {
        self.index
            .get(key)
            .and_then(|&i| self.endpoints[i].1.ejected_until)
            .is_some_and(|t| t > now)
    }
}

#[cfg(test)]
mod tests;
