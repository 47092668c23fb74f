use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Simulates `n` sequential requests; `latency(k)` is each endpoint's
/// service time. Returns how many each endpoint got.
fn run(
    b: &mut Balancer<&'static str>,
    n: usize,
    now: &mut Instant,
    latency: impl Fn(&str) -> Duration,
) -> HashMap<&'static str, usize> {
    let mut got = HashMap::new();
    for _ in 0..n {
        let p = b.pick(*now).expect("an endpoint");
        let l = latency(p.key);
        *now += l;
        b.observe(&p.key, l, *now);
        *got.entry(p.key).or_default() += 1;
    }
    got
}

#[test]
fn most_traffic_goes_to_the_faster_endpoint() {
    let mut b = Balancer::new(BalanceConfig::default(), 7);
    let mut now = Instant::now();
    b.update(["fast", "slow"], now);
    let got = run(&mut b, 1000, &mut now, |k| {
        if k == "fast" {
            ms(1)
        } else {
            ms(20)
        }
    });
    assert!(got["fast"] > 900, "{got:?}");
    assert!(
        got.get("slow").copied().unwrap_or(0) > 0,
        "the slow one is still probed by decay: {got:?}"
    );
}

#[test]
fn in_flight_requests_spread_load() {
    // Equal latency but one endpoint has many requests in flight: P2C
    // prefers the idle one.
    let mut b = Balancer::new(BalanceConfig::default(), 3);
    let now = Instant::now();
    b.update(["a", "b"], now);
    for _ in 0..10 {
        let p = b.pick(now).expect("pick");
        assert_ne!(p.key, "", "picked");
    }
    // 10 in flight spread over both, never all on one.
    let pending = |k: &str| b.endpoints[b.index[k]].1.pending;
    let (a, bb) = (pending("a"), pending("b"));
    assert_eq!(a + bb, 10);
    assert!(a.abs_diff(bb) <= 2, "a={a} b={bb}");
}

#[test]
fn failing_endpoints_are_ejected_and_probed_back() {
    let cfg = BalanceConfig::default();
    let mut b = Balancer::new(cfg.clone(), 11);
    let mut now = Instant::now();
    b.update(["good", "bad"], now);
    for _ in 0..cfg.failures_to_eject {
        b.pick(now);
        b.failed(&"bad", now);
    }
    assert!(b.is_ejected(&"bad", now));
    for _ in 0..100 {
        let p = b.pick(now).expect("pick");
        assert_eq!(p.key, "good", "ejected endpoints get no traffic");
        b.observe(&p.key, ms(1), now);
    }
    // After the ejection, it is eligible again.
    now += cfg.base_ejection + ms(1);
    assert!(!b.is_ejected(&"bad", now));
    // Failing again while on probation doubles the time out.
    b.failed(&"bad", now);
    assert!(b.is_ejected(&"bad", now + cfg.base_ejection * 2 - ms(1)));
    assert!(!b.is_ejected(&"bad", now + cfg.base_ejection * 2 + ms(1)));
    // One success brings it fully back.
    b.observe(&"bad", ms(1), now + cfg.base_ejection * 3);
    assert!(!b.is_ejected(&"bad", now + cfg.base_ejection * 3));
}

#[test]
fn picks_skip_an_ejected_endpoint_wherever_it_stands() {
    let cfg = BalanceConfig::default();
    let mut b = Balancer::new(cfg.clone(), 3);
    let now = Instant::now();
    b.update(["bad", "x", "y"], now);
    for _ in 0..cfg.failures_to_eject {
        b.failed(&"bad", now);
    }
    let mut counts = std::collections::HashMap::new();
    for _ in 0..200 {
        let p = b.pick(now).expect("pick");
        assert!(!p.probe, "{p:?}");
        *counts.entry(p.key).or_insert(0) += 1;
        b.observe(&p.key, ms(1), now);
    }
    assert_eq!(counts.get("bad"), None, "{counts:?}");
    assert!(counts["x"] > 50 && counts["y"] > 50, "{counts:?}");
}

#[test]
fn when_everything_is_ejected_the_earliest_is_probed() {
    let mut b = Balancer::new(BalanceConfig::default(), 5);
    let now = Instant::now();
    b.update(["a", "b"], now);
    for k in ["a", "a", "a"] {
        b.failed(&k, now);
    }
    for k in ["b", "b", "b"] {
        b.failed(&k, now + ms(10));
    }
    let p = b.pick(now + ms(20)).expect("still a pick");
    assert_eq!(
        p,
        Pick {
            key: "a",
            probe: true
        }
    );
}

#[test]
fn updates_keep_what_is_known() {
    let mut b = Balancer::new(BalanceConfig::default(), 9);
    let now = Instant::now();
    b.update(["a", "b"], now);
    for _ in 0..3 {
        b.failed(&"a", now);
    }
    b.update(["a", "c"], now);
    assert_eq!(b.len(), 2);
    assert!(b.is_ejected(&"a", now), "a's state survives the update");
    assert!(!b.is_ejected(&"c", now));
    b.update(Vec::<&str>::new(), now);
    assert!(b.pick(now).is_none());
}

#[test]
fn peak_ewma_jumps_up_and_decays_down() {
    let now = Instant::now();
    let decay = Duration::from_secs(10);
    let mut e = PeakEwma {
        cost_ns: 1e6,
        stamp: now,
    };
    e.observe(ms(50), now, decay);
    assert_eq!(e.cost_ns, 50e6, "a slower sample is taken at once");
    e.observe(ms(1), now + Duration::from_secs(10), decay);
    assert!(e.cost_ns < 50e6 && e.cost_ns > 1e6, "{}", e.cost_ns);
}

#[test]
fn a_retry_is_drawn_among_the_endpoints_not_tried() {
    let now = Instant::now();
    let mut b = Balancer::new(BalanceConfig::default(), 3);
    b.update(["a", "b"], now);
    // `a` failed fast: still the cheaper, P2C over both would draw it again.
    let first = b.pick(now).expect("pick").key;
    b.failed(&first, now);
    let other = if first == "a" { "b" } else { "a" };
    b.observe(&other, Duration::from_millis(50), now);
    b.release(&other);
    for _ in 0..20 {
        let p = b.pick_untried(now, &[first]).expect("pick");
        assert_eq!(p.key, other);
        b.release(&p.key);
    }
    // Every endpoint tried: any may be drawn again.
    assert!(b.pick_untried(now, &["a", "b"]).is_some());
}

#[test]
fn a_retry_never_probes_an_ejected_endpoint_while_a_live_one_remains() {
    let now = Instant::now();
    let mut b = Balancer::new(BalanceConfig::default(), 5);
    b.update(["live", "out"], now);
    for _ in 0..3 {
        b.failed(&"out", now);
    }
    assert!(b.is_ejected(&"out", now));
    // `live` failed once (not out): the retry goes there again, not to
    // the endpoint that is out.
    for _ in 0..20 {
        let p = b.pick_untried(now, &["live"]).expect("pick");
        assert_eq!(p.key, "live");
        b.release(&p.key);
    }
}
