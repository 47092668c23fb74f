//! Per-name state that forgets names no longer used.
//!
//! The outbound side keeps a balancer for every authority it has routed.
//! Applications may name many (a host per tenant, per bucket, per
//! user-supplied URL); kept forever, their state would only grow. A name
//! unused for the idle time is dropped, and a sweep for such names runs at
//! most once per idle time, when a new name arrives: nothing on the path of
//! a request to a known name.

use std::time::{Duration, Instant};

use crate::FastMap;

/// Values by name, each dropped once unused for the idle time.
#[derive(Debug)]
pub(crate) struct Recent<V> {
    entries: FastMap<String, (V, Instant)>,
    idle: Duration,
    last_sweep: Option<Instant>,
}

impl<V> Recent<V> {
    /// An empty map forgetting names unused for `idle`.
    pub(crate) fn new(idle: Duration) -> Self {
        Self {
            entries: FastMap::default(),
            idle,
            last_sweep: None,
        }
    }

    /// Adds `value` for a new `name` (one not [`Recent::contains`]),
    /// used `now`; first, at most once per idle time, sweeps out the names
    /// unused for that long. Returns whether it swept.
    pub(crate) fn insert(&mut self, name: &str, now: Instant, value: V) -> bool {
        let sweep = self
            .last_sweep
            .is_none_or(|t| now.saturating_duration_since(t) >= self.idle);
        if sweep {
            let idle = self.idle;
            self.entries
                .retain(|_, (_, used)| now.saturating_duration_since(*used) < idle);
            self.last_sweep = Some(now);
        }
        self.entries.insert(name.to_string(), (value, now));
        sweep
    }

    /// The value for `name`, if kept, marked used `now`.
    pub(crate) fn use_mut(&mut self, name: &str, now: Instant) -> Option<&mut V> {
        let (value, used) = self.entries.get_mut(name)?;
        *used = now;
        Some(value)
    }

    /// The value for `name`, if kept (not marked used).
    pub(crate) fn get_mut(&mut self, name: &str) -> Option<&mut V> {
        self.entries.get_mut(name).map(|(v, _)| v)
    }

    /// Whether `name` is kept.
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// How many names are kept.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_unused_for_the_idle_time_are_forgotten_when_a_new_one_comes() {
        let idle = Duration::from_secs(60);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut m = Recent::new(idle);
        // What a caller does: add a new name, then use it.
        let mut put = |name: &str, s: u64, v: u64| {
            let swept = !m.contains(name) && m.insert(name, at(s), v);
            (*m.use_mut(name, at(s)).expect("kept"), swept)
        };
        let (v, swept) = put("a", 0, 1);
        assert_eq!((v, swept), (1, true), "the first insert sweeps (nothing)");
        put("b", 10, 2);
        // Used again: kept, value unchanged.
        assert_eq!(put("a", 50, 99).0, 1);
        // Known names never sweep, however late.
        assert!(!put("a", 100, 99).1);
        // A new name after the idle time: `b` (last used at 10) goes, `a`
        // (at 100) stays.
        assert!(put("c", 110, 3).1);
        // Within the idle time of that sweep, new names do not sweep.
        assert!(!put("d", 150, 4).1);
        // A forgotten name comes back fresh.
        assert_eq!(put("b", 151, 20), (20, false));
        assert!(m.contains("a") && m.contains("c") && m.contains("d"));
        assert_eq!(m.get_mut("b").copied(), Some(20));
        assert_eq!(m.len(), 4);
    }

    #[test]
    fn many_names_once_each_stay_bounded_by_the_idle_time() {
        let idle = Duration::from_secs(60);
        let t0 = Instant::now();
        let mut m = Recent::new(idle);
        // One new name a second for an hour: at most about two idle
        // times' worth are ever kept.
        let mut most = 0;
        for s in 0..3600u64 {
            let name = format!("tenant-{s}.example");
            m.insert(&name, t0 + Duration::from_secs(s), s);
            most = most.max(m.len());
        }
        assert!(most <= 121, "{most}");
    }
}
