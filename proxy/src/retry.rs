//! Retries: which requests may be retried, and a budget so that retries
//! never multiply an outage.
//!
//! Only idempotent requests (RFC 9110: GET, HEAD, OPTIONS, TRACE, PUT,
//! DELETE) whose body is small enough to have been buffered are retried.
//! The [`Budget`] allows retries up to a share of recent live requests plus
//! a small floor per second (Finagle's and Linkerd's retry budget), over a
//! sliding window; it is sans-IO: callers pass `now`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use http::Method;

/// Largest request body buffered so the request can be replayed.
pub const MAX_BUFFERED_BODY: usize = 64 * 1024;

/// Whether `method` may be sent twice without changing the outcome.
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Budget settings, with documented defaults.
#[derive(Clone, Debug)]
pub struct BudgetConfig {
    /// Retries allowed per live request (default 0.2: at most 20 % extra
    /// load).
    pub ratio: f64,
    /// Retries allowed per second whatever the traffic (default 10), so a
    /// quiet service can still retry.
    pub min_per_second: u32,
    /// The window both are counted over (default 10 s).
    pub window: Duration,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            ratio: 0.2,
            min_per_second: 10,
            window: Duration::from_secs(10),
        }
    }
}

/// A retry budget over a sliding window.
#[derive(Debug)]
pub struct Budget {
    config: BudgetConfig,
    requests: VecDeque<Instant>,
    retries: VecDeque<Instant>,
}

impl Budget {
    /// A budget with nothing spent.
    pub fn new(config: BudgetConfig) -> Self {
        Self {
            config,
            requests: VecDeque::new(),
            retries: VecDeque::new(),
        }
    }

    fn expire(&mut self, now: Instant) {
        let window = self.config.window;
        for q in [&mut self.requests, &mut self.retries] {
            while q
                .front()
                .is_some_and(|t| now.saturating_duration_since(*t) > window)
            {
                q.pop_front();
            }
        }
        // Bounded memory whatever the rate: beyond this many entries the
        // oldest are forgotten (the budget only gets a little stricter).
        const CAP: usize = 100_000;
        while self.requests.len() > CAP {
            self.requests.pop_front();
        }
    }

    /// Records a live (first-attempt) request.
    pub fn deposit(&mut self, now: Instant) {
        self.expire(now);
        self.requests.push_back(now);
    }

    /// Takes one retry from the budget, if there is one left.
    pub fn withdraw(&mut self, now: Instant) -> bool {
        self.expire(now);
        let floor = f64::from(self.config.min_per_second) * self.config.window.as_secs_f64();
        let allowed = (self.requests.len() as f64 * self.config.ratio).max(floor);
        if (self.retries.len() as f64) < allowed {
            self.retries.push_back(now);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_idempotent_methods() {
        for m in [
            Method::GET,
            Method::HEAD,
            Method::PUT,
            Method::DELETE,
            Method::OPTIONS,
        ] {
            assert!(is_idempotent(&m), "{m}");
        }
        for m in [Method::POST, Method::PATCH, Method::CONNECT] {
            assert!(!is_idempotent(&m), "{m}");
        }
    }

    #[test]
    fn the_floor_allows_retries_on_a_quiet_service() {
        let mut b = Budget::new(BudgetConfig {
            ratio: 0.2,
            min_per_second: 1,
            window: Duration::from_secs(10),
        });
        let now = Instant::now();
        let granted = (0..20).filter(|_| b.withdraw(now)).count();
        assert_eq!(granted, 10, "1/s over 10 s");
        // The window slides: later, the floor is available again.
        assert!(b.withdraw(now + Duration::from_secs(11)));
    }

    #[test]
    fn busy_services_get_a_share_of_their_traffic() {
        let mut b = Budget::new(BudgetConfig {
            ratio: 0.2,
            min_per_second: 0,
            window: Duration::from_secs(10),
        });
        let now = Instant::now();
        for _ in 0..1000 {
            b.deposit(now);
        }
        let granted = (0..1000).filter(|_| b.withdraw(now)).count();
        assert_eq!(granted, 200);
    }
}
