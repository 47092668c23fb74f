//! Discovery: where an authority's endpoints are, and which are meshed
//! (have an identity, so the proxy speaks mTLS to their proxy).
//!
//! A [`Resolve`] answers an authority with a [`Destination`]. Three backends
//! here: the control plane ([`GrpcResolver`], the gateway's `Destination`
//! service), a static table (from a YAML file; tests and hosts outside
//! Kubernetes) and DNS, the fallback when nothing else knows the name.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use tokio::sync::{watch, Semaphore};

use crate::identity::SpiffeId;

mod grpc;
pub use grpc::{ControlPlaneAddrError, GrpcResolver, MAX_WATCHES};

/// One endpoint of a destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// The workload's address.
    pub addr: SocketAddr,
    /// Its proxy's identity, when meshed.
    pub identity: Option<SpiffeId>,
    /// Relative weight (default 1; unused by P2C but kept for discovery).
    pub weight: u32,
}

/// What an authority resolves to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Destination {
    /// The endpoints.
    pub endpoints: Vec<Endpoint>,
    /// The port speaks an opaque protocol (the control plane's protocol
    /// hint, from the Service port's `appProtocol`): connections to it are
    /// forwarded as TCP without protocol detection, so server-speaks-first
    /// protocols (MySQL, SMTP) are not held for the detection timeout.
    pub opaque: bool,
}

/// Resolves authorities (`host:port`).
pub trait Resolve: Send + Sync {
    /// The destination for `authority`, if known.
    fn resolve<'a>(&'a self, authority: &'a str) -> BoxFuture<'a, Option<Destination>>;

    /// What any resolver already knows of `authority`, without waiting
    /// (and, where answers come from a control plane, starting to ask so
    /// the next connection knows). A hint: unlike [`Resolve::known`], it
    /// takes a later resolver's answer while an earlier one would wait.
    /// Default: nothing.
    fn peek(&self, _authority: &str) -> Option<Destination> {
        None
    }

    /// [`Resolve::resolve`]'s answer if it would come at once, with the
    /// same side effects (a lookup or watch started); [`Known::Later`] if
    /// it would wait. Default: it would.
    fn known(&self, _authority: &str) -> Known {
        Known::Later
    }
}

/// What a resolver can answer without waiting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Known {
    /// [`Resolve::resolve`] would answer this at once.
    Now(Option<Destination>),
    /// It would wait (for a lookup, for the control plane).
    Later,
}

/// `resolver`'s answer for `authority`: [`Resolve::known`] when it has
/// one, else [`Resolve::resolve`]. The same answer, without a boxed future
/// for a name already known.
pub async fn destination(resolver: &dyn Resolve, authority: &str) -> Option<Destination> {
    match resolver.known(authority) {
        Known::Now(d) => d,
        Known::Later => resolver.resolve(authority).await,
    }
}

/// A fixed table of destinations.
#[derive(Clone, Debug, Default)]
pub struct StaticResolver {
    table: crate::FastMap<String, Destination>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    destinations: Vec<FileDestination>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDestination {
    authority: String,
    endpoints: Vec<FileEndpoint>,
    #[serde(default)]
    opaque: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEndpoint {
    addr: SocketAddr,
    #[serde(default)]
    identity: Option<String>,
    #[serde(default = "one")]
    weight: u32,
}

fn one() -> u32 {
    1
}

/// Why a destinations file was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoveryError {
    /// Unreadable.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Malformed.
    #[error("parsing {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

impl StaticResolver {
    /// A resolver over `table` (authority → destination).
    pub fn new(table: HashMap<String, Destination>) -> Self {
        Self {
            table: table
                .into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect(),
        }
    }

    /// Parses a destinations YAML document:
    ///
    /// ```yaml
    /// destinations:
    ///   - authority: web.demo.svc.cluster.local:8080
    ///     endpoints:
    ///       - { addr: 10.0.0.7:8080, identity: "spiffe://east.strait.local/ns/demo/sa/web" }
    ///   - authority: 10.0.0.9:3306
    ///     opaque: true          # forwarded as TCP, never detected
    ///     endpoints: [{ addr: 10.0.0.9:3306 }]
    /// ```
    pub fn parse(text: &str, path: &str) -> Result<Self, DiscoveryError> {
        let parse = |message: String| DiscoveryError::Parse {
            path: path.to_string(),
            message,
        };
        let file: File = serde_saphyr::from_str(text).map_err(|e| parse(e.to_string()))?;
        let mut table = HashMap::new();
        for d in file.destinations {
            let mut endpoints = Vec::new();
            for e in d.endpoints {
                let identity = match e.identity {
                    Some(id) => Some(
                        SpiffeId::parse(&id)
                            .map_err(|err| parse(format!("{}: {err}", d.authority)))?,
                    ),
                    None => None,
                };
                endpoints.push(Endpoint {
                    addr: e.addr,
                    identity,
                    weight: e.weight,
                });
            }
            table.insert(
                d.authority,
                Destination {
                    endpoints,
                    opaque: d.opaque,
                },
            );
        }
        Ok(Self::new(table))
    }

    /// Reads a destinations file.
    pub fn load(path: &Path) -> Result<Self, DiscoveryError> {
        let text = std::fs::read_to_string(path).map_err(|source| DiscoveryError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }
}

impl Resolve for StaticResolver {
    fn resolve<'a>(&'a self, authority: &'a str) -> BoxFuture<'a, Option<Destination>> {
        Box::pin(async move { self.table.get(authority).cloned() })
    }

    fn peek(&self, authority: &str) -> Option<Destination> {
        self.table.get(authority).cloned()
    }

    fn known(&self, authority: &str) -> Known {
        Known::Now(self.peek(authority))
    }
}

/// How long a DNS answer is used (the system resolver gives no TTL).
pub const DNS_ANSWER_FOR: Duration = Duration::from_secs(5);
/// How long a failed lookup is remembered.
pub const DNS_FAILURE_FOR: Duration = Duration::from_secs(1);
/// How long a lookup may take before it counts as failed.
pub const DNS_TIMEOUT: Duration = Duration::from_secs(2);
/// Names whose answers are kept at most.
const DNS_MAX_CACHED: usize = 1024;
/// System-resolver lookups running at once, at most: each holds a thread
/// of tokio's blocking pool until `getaddrinfo` returns, which for an
/// unanswering server is long after [`DNS_TIMEOUT`].
pub const DNS_MAX_LOOKUPS: usize = 16;

/// A lookup of `host:port`.
type Lookup =
    Arc<dyn Fn(String) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>> + Send + Sync>;

/// What the cache holds for a name.
#[derive(Clone)]
enum Cached {
    /// An answer (`None`: the name failed) and when it came.
    Done(Instant, Option<Destination>),
    /// A lookup under way, started then; its answer arrives on the channel.
    Pending(Instant, watch::Receiver<Option<Option<Destination>>>),
}

type DnsCache = Arc<Mutex<crate::FastMap<String, Cached>>>;

/// Resolves `host:port` with the system resolver; endpoints are unmeshed.
///
/// Every request to a name nothing else knows comes here, and the system
/// resolver (`getaddrinfo`, on tokio's blocking pool) neither caches nor
/// bounds its time: each would be one more query to the cluster DNS (one
/// per search domain), and a slow server would hold requests beyond their
/// timeout. So:
/// - an answer is kept for [`DNS_ANSWER_FOR`], a failure for
///   [`DNS_FAILURE_FOR`];
/// - requests that miss the cache together share one lookup;
/// - a lookup has [`DNS_TIMEOUT`], and at most [`DNS_MAX_LOOKUPS`] run at
///   once, each counted until the system resolver returns, past its
///   timeout if need be, so a dead DNS server cannot fill the blocking
///   pool with stuck threads.
pub struct DnsResolver {
    lookup: Lookup,
    timeout: Duration,
    cache: DnsCache,
    running: Arc<Semaphore>,
    lookups: Family<DnsLookupLabels, Counter>,
}

/// Labels of the DNS fallback's lookups.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsLookupLabels {
    /// `ok` (addresses), `failed` (an error or no address), `timeout`, or
    /// `no_slot` (every lookup slot held past the timeout).
    pub result: &'static str,
}

impl Default for DnsResolver {
    fn default() -> Self {
        Self::with_lookup(
            Arc::new(|authority: String| {
                Box::pin(
                    async move { Ok(tokio::net::lookup_host(authority.as_str()).await?.collect()) },
                )
            }),
            DNS_TIMEOUT,
            DNS_MAX_LOOKUPS,
        )
    }
}

impl std::fmt::Debug for DnsResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsResolver")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl DnsResolver {
    fn with_lookup(lookup: Lookup, timeout: Duration, max_lookups: usize) -> Self {
        Self {
            lookup,
            timeout,
            cache: Arc::default(),
            running: Arc::new(Semaphore::new(max_lookups)),
            lookups: Family::default(),
        }
    }

    /// Counts lookups in `registry`, as `strait_proxy_dns_lookups_total`.
    pub fn with_metrics(self, registry: &mut Registry) -> Self {
        registry.register(
            "strait_proxy_dns_lookups",
            "Lookups of names only DNS knows, by result (ok, failed, timeout, no_slot)",
            self.lookups.clone(),
        );
        self
    }

    /// The cached answer for `authority` if still fresh at `now`, else a
    /// lookup of it: one already under way, or a new one.
    fn cached_or_lookup(
        &self,
        authority: &str,
        now: Instant,
    ) -> Result<Option<Destination>, watch::Receiver<Option<Option<Destination>>>> {
        // An address needs no lookup (and must not wait for a slot
        // behind lookups of names a dead DNS server holds).
        if let Ok(addr) = authority.parse::<SocketAddr>() {
            return Ok(Some(Destination {
                endpoints: vec![Endpoint {
                    addr,
                    identity: None,
                    weight: 1,
                }],
                opaque: false,
            }));
        }
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        match cache.get(authority) {
            Some(Cached::Done(at, answer)) if fresh(*at, answer, now) => return Ok(answer.clone()),
            // A lookup under way, unless its task is gone without an
            // answer (it never is but at runtime shutdown; then look
            // again rather than answer nothing for good).
            Some(Cached::Pending(at, rx))
                if rx.has_changed().is_ok()
                    && now.saturating_duration_since(*at) < self.timeout * 2 =>
            {
                return Err(rx.clone())
            }
            _ => {}
        }
        if cache.len() >= DNS_MAX_CACHED && !cache.contains_key(authority) {
            // Lookups end within their timeout, so a pending entry that
            // old belongs to a lookup task that is gone.
            cache.retain(|_, c| match c {
                Cached::Done(at, answer) => fresh(*at, answer, now),
                Cached::Pending(at, _) => now.saturating_duration_since(*at) < self.timeout * 2,
            });
            if cache.len() >= DNS_MAX_CACHED {
                // All fresh: start over rather than grow.
                cache.clear();
            }
        }
        let (tx, rx) = watch::channel(None);
        cache.insert(authority.to_string(), Cached::Pending(now, rx.clone()));
        drop(cache);
        tokio::spawn(self.lookup_task(authority.to_string(), tx, rx.clone()));
        Err(rx)
    }

    /// Looks `authority` up, within the timeout and a lookup slot, then
    /// caches the answer and hands it to whoever waits.
    fn lookup_task(
        &self,
        authority: String,
        tx: watch::Sender<Option<Option<Destination>>>,
        own: watch::Receiver<Option<Option<Destination>>>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let lookup = (self.lookup)(authority.clone());
        let running = self.running.clone();
        let cache = self.cache.clone();
        let lookups = self.lookups.clone();
        let count = move |result| lookups.get_or_create(&DnsLookupLabels { result }).inc();
        let timeout = self.timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        // Settles this lookup's cache entry: replaced by `done` (or
        // removed), unless a newer lookup has taken the name's entry since
        // (after the cache was cleared).
        let name = authority.clone();
        let settle = move |done: Option<Cached>| {
            let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
            let ours = match cache.get(&name) {
                Some(Cached::Pending(_, rx)) => rx.same_channel(&own),
                Some(Cached::Done(..)) => false,
                None => true,
            };
            if ours {
                match done {
                    Some(done) => cache.insert(name, done),
                    None => cache.remove(&name),
                };
            }
        };
        async move {
            // A slot freed too late to look up within the timeout is as
            // good as none: the lookup would be abandoned, and its slot
            // and thread held, for nothing.
            let slot = match tokio::time::timeout_at(deadline, running.acquire_owned()).await {
                Ok(Ok(slot)) if deadline - tokio::time::Instant::now() >= timeout / 2 => Some(slot),
                _ => None,
            };
            let Some(slot) = slot else {
                // Not the name's failure: nothing is cached, and the next
                // request asks again.
                tracing::debug!(%authority, "DNS lookup found no free slot in time");
                count("no_slot");
                settle(None);
                let _ = tx.send(Some(None));
                return;
            };
            // The lookup runs in a task of its own that keeps its slot
            // until the system resolver returns, even after the deadline.
            let looked_up = tokio::spawn(async move {
                let result = lookup.await;
                drop(slot);
                result
            });
            let addrs = match tokio::time::timeout_at(deadline, looked_up).await {
                Ok(Ok(Ok(addrs))) => {
                    count(if addrs.is_empty() { "failed" } else { "ok" });
                    addrs
                }
                Ok(Ok(Err(error))) => {
                    tracing::debug!(%authority, %error, "DNS lookup failed");
                    count("failed");
                    Vec::new()
                }
                Ok(Err(error)) => {
                    tracing::debug!(%authority, %error, "DNS lookup task failed");
                    count("failed");
                    Vec::new()
                }
                Err(_) => {
                    tracing::debug!(%authority, "DNS lookup timed out");
                    count("timeout");
                    Vec::new()
                }
            };
            let endpoints: Vec<Endpoint> = addrs
                .into_iter()
                .map(|addr| Endpoint {
                    addr,
                    identity: None,
                    weight: 1,
                })
                .collect();
            let answer = (!endpoints.is_empty()).then_some(Destination {
                endpoints,
                opaque: false,
            });
            settle(Some(Cached::Done(Instant::now(), answer.clone())));
            // No receiver left is fine: the answer is cached.
            let _ = tx.send(Some(answer));
        }
    }
}

/// An answer is used for [`DNS_ANSWER_FOR`], a failure for [`DNS_FAILURE_FOR`].
fn fresh(at: Instant, answer: &Option<Destination>, now: Instant) -> bool {
    let keep = if answer.is_some() {
        DNS_ANSWER_FOR
    } else {
        DNS_FAILURE_FOR
    };
    now.saturating_duration_since(at) < keep
}

impl Resolve for DnsResolver {
    fn known(&self, authority: &str) -> Known {
        // (A name not yet known is looked up; resolve() joins the lookup.)
        match self.cached_or_lookup(authority, Instant::now()) {
            Ok(answer) => Known::Now(answer),
            Err(_) => Known::Later,
        }
    }

    fn resolve<'a>(&'a self, authority: &'a str) -> BoxFuture<'a, Option<Destination>> {
        Box::pin(async move {
            let mut rx = match self.cached_or_lookup(authority, Instant::now()) {
                Ok(answer) => return answer,
                Err(rx) => rx,
            };
            let answer = match rx.wait_for(Option::is_some).await {
                Ok(answer) => answer.clone().flatten(),
                // The lookup task is gone without an answer (the runtime
                // is shutting down).
                Err(_) => None,
            };
            answer
        })
    }
}

/// Asks each resolver in turn.
pub struct Chain(pub Vec<Box<dyn Resolve>>);

impl Resolve for Chain {
    fn resolve<'a>(&'a self, authority: &'a str) -> BoxFuture<'a, Option<Destination>> {
        Box::pin(async move {
            for r in &self.0 {
                if let Some(d) = r.resolve(authority).await {
                    return Some(d);
                }
            }
            None
        })
    }

    fn peek(&self, authority: &str) -> Option<Destination> {
        self.0.iter().find_map(|r| r.peek(authority))
    }

    fn known(&self, authority: &str) -> Known {
        // In order, as resolve() asks: a resolver that would wait decides
        // that the chain would.
        for r in &self.0 {
            match r.known(authority) {
                Known::Now(None) => continue,
                answered => return answered,
            }
        }
        Known::Now(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn static_table_then_dns() {
        let r = StaticResolver::parse(
            "destinations:\n  - authority: web:80\n    endpoints:\n      - { addr: 127.0.0.1:8080, identity: \"spiffe://td/ns/a/sa/b\" }\n",
            "x",
        )
        .expect("valid");
        let chain = Chain(vec![Box::new(r), Box::new(DnsResolver::default())]);
        let d = chain.resolve("web:80").await.expect("static");
        assert_eq!(
            d.endpoints[0].identity.as_ref().map(|i| i.as_str()),
            Some("spiffe://td/ns/a/sa/b")
        );
        let d = chain.resolve("127.0.0.1:9").await.expect("dns");
        assert_eq!(d.endpoints[0].addr, "127.0.0.1:9".parse().expect("addr"));
        assert!(d.endpoints[0].identity.is_none());
        assert!(chain.resolve("no-such-host.invalid:80").await.is_none());
    }

    /// A lookup that counts its calls and answers `127.0.0.1:<port>`
    /// (port 0: nothing) once `gate` lets it through, after `delay`.
    fn gated(
        delay: Duration,
        gate: Arc<Semaphore>,
        max_lookups: usize,
        timeout: Duration,
    ) -> (DnsResolver, Arc<std::sync::atomic::AtomicUsize>) {
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = calls.clone();
        let lookup: Lookup = Arc::new(move |authority: String| {
            let gate = gate.clone();
            let counted = counted.clone();
            Box::pin(async move {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _pass = gate.acquire().await;
                tokio::time::sleep(delay).await;
                let port: u16 = authority
                    .rsplit_once(':')
                    .and_then(|(_, p)| p.parse().ok())
                    .unwrap_or(0);
                Ok(if port == 0 {
                    Vec::new()
                } else {
                    vec![SocketAddr::from(([127, 0, 0, 1], port))]
                })
            })
        });
        (
            DnsResolver::with_lookup(lookup, timeout, max_lookups),
            calls,
        )
    }

    /// A lookup that counts its calls and answers after `delay`.
    fn counting(delay: Duration) -> (DnsResolver, Arc<std::sync::atomic::AtomicUsize>) {
        gated(
            delay,
            Arc::new(Semaphore::new(Semaphore::MAX_PERMITS)),
            DNS_MAX_LOOKUPS,
            Duration::from_millis(200),
        )
    }

    fn port(d: Option<Destination>) -> Option<u16> {
        d.map(|d| d.endpoints[0].addr.port())
    }

    #[tokio::test]
    async fn a_known_answer_is_taken_at_once_and_an_unknown_one_waited_for_once() {
        use std::sync::atomic::Ordering::SeqCst;
        let (dns, calls) = counting(Duration::from_millis(20));
        assert_eq!(dns.known("a:80"), Known::Later, "not known yet");
        // That started the lookup; the wait joins it.
        assert_eq!(port(destination(&dns, "a:80").await), Some(80));
        assert_eq!(calls.load(SeqCst), 1);
        assert!(
            matches!(dns.known("a:80"), Known::Now(Some(_))),
            "known now"
        );
        assert_eq!(port(destination(&dns, "a:80").await), Some(80));
        assert_eq!(port(destination(&dns, "none:0").await), None);
        assert_eq!(port(destination(&dns, "none:0").await), None);
        assert_eq!(calls.load(SeqCst), 2, "one lookup per name");
    }

    #[tokio::test]
    async fn dns_answers_are_kept_briefly_and_lookups_bounded() {
        use std::sync::atomic::Ordering::SeqCst;
        let (dns, calls) = counting(Duration::ZERO);
        let addr = port;
        assert_eq!(addr(dns.resolve("a:80").await), Some(80));
        assert_eq!(addr(dns.resolve("a:80").await), Some(80));
        assert_eq!(
            calls.load(SeqCst),
            1,
            "the second answer came from the cache"
        );
        assert_eq!(addr(dns.resolve("none:0").await), None);
        assert_eq!(addr(dns.resolve("none:0").await), None);
        assert_eq!(calls.load(SeqCst), 2, "a failure is kept too");
        // An answer for five seconds, a failure for one.
        let now = Instant::now();
        let kept = |name: &str, after: Duration| match dns.cache.lock().expect("lock").get(name) {
            Some(Cached::Done(at, answer)) => fresh(*at, answer, now + after),
            _ => false,
        };
        assert!(kept("a:80", DNS_FAILURE_FOR) && !kept("a:80", DNS_ANSWER_FOR));
        assert!(!kept("none:0", DNS_FAILURE_FOR));
        // A lookup slower than the timeout fails, and is remembered as such.
        let (slow, calls) = counting(Duration::from_secs(30));
        let started = Instant::now();
        assert_eq!(addr(slow.resolve("a:80").await), None);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(addr(slow.resolve("a:80").await), None);
        assert_eq!(calls.load(SeqCst), 1);
        // The cache stays bounded.
        for i in 0..(DNS_MAX_CACHED as u16 + 10) {
            dns.resolve(&format!("n{i}:{}", i + 1)).await;
        }
        let kept = dns.cache.lock().expect("lock").len();
        assert!(kept <= DNS_MAX_CACHED, "{kept}");
    }

    #[tokio::test]
    async fn requests_that_miss_together_share_one_lookup() {
        use std::sync::atomic::Ordering::SeqCst;
        // Lookups answer when the test opens the gate, well within their
        // timeout however slow the machine.
        let gate = Arc::new(Semaphore::new(0));
        let (dns, calls) = gated(
            Duration::ZERO,
            gate.clone(),
            DNS_MAX_LOOKUPS,
            Duration::from_secs(30),
        );
        // A caller that gives up does not take the answer with it.
        let gave_up = tokio::time::timeout(Duration::from_millis(5), dns.resolve("b:81")).await;
        assert!(gave_up.is_err());
        let opened = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            gate.add_permits(Semaphore::MAX_PERMITS >> 1);
        };
        let all = futures::future::join_all((0..20).map(|_| dns.resolve("a:80")));
        let (answers, ()) = tokio::join!(all, opened);
        assert!(answers.into_iter().all(|a| port(a) == Some(80)));
        assert_eq!(port(dns.resolve("b:81").await), Some(81));
        assert_eq!(calls.load(SeqCst), 2, "one lookup per name");
    }

    #[tokio::test]
    async fn a_hanging_resolver_holds_at_most_the_lookup_slots() {
        use std::sync::atomic::Ordering::SeqCst;
        let gate = Arc::new(Semaphore::new(0));
        let (dns, calls) = gated(Duration::ZERO, gate.clone(), 2, Duration::from_millis(200));
        let started = Instant::now();
        let names: Vec<String> = (1..=5).map(|i| format!("n{i}:{i}")).collect();
        let answers = futures::future::join_all(names.iter().map(|n| dns.resolve(n))).await;
        assert!(answers.into_iter().all(|a| a.is_none()), "all timed out");
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(calls.load(SeqCst), 2, "two slots, two lookups");
        // The two names looked up are remembered as failed; the three that
        // found no slot are not (that was no failure of theirs).
        let remembered = names
            .iter()
            .filter(|n| {
                let cache = dns.cache.lock().expect("lock");
                matches!(cache.get(n.as_str()), Some(Cached::Done(_, None)))
            })
            .count();
        assert_eq!(remembered, 2);
        let counted = |result| dns.lookups.get_or_create(&DnsLookupLabels { result }).get();
        assert_eq!((counted("timeout"), counted("no_slot")), (2, 3));
        // The two hung lookups keep their slots past their timeout.
        assert!(dns.resolve("n6:6").await.is_none());
        assert_eq!(calls.load(SeqCst), 2);
        // An address needs no slot, nor a lookup.
        assert_eq!(port(dns.resolve("10.1.2.3:8080").await), Some(8080));
        assert_eq!(port(dns.resolve("[fd00::1]:8443").await), Some(8443));
        assert_eq!(calls.load(SeqCst), 2);
        // Once the resolver answers, the slots come back.
        gate.add_permits(Semaphore::MAX_PERMITS >> 1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(port(dns.resolve("n7:7").await), Some(7));
        assert_eq!(calls.load(SeqCst), 3);
        assert_eq!((counted("ok"), counted("no_slot")), (1, 4));
    }

    /// A slot that frees with less than half the timeout left is not
    /// used: the name is neither looked up nor remembered as failed.
    #[tokio::test]
    async fn a_slot_freed_too_late_is_no_slot() {
        use std::sync::atomic::Ordering::SeqCst;
        let gate = Arc::new(Semaphore::new(0));
        let (dns, calls) = gated(Duration::ZERO, gate.clone(), 1, Duration::from_millis(400));
        let opened = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            gate.add_permits(Semaphore::MAX_PERMITS >> 1);
        };
        let late = async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            dns.resolve("b:2").await
        };
        let (first, late, ()) = tokio::join!(dns.resolve("h:1"), late, opened);
        assert_eq!(port(first), Some(1));
        assert!(late.is_none());
        assert_eq!(calls.load(SeqCst), 1, "b:2 was not looked up");
        assert!(dns.cache.lock().expect("lock").get("b:2").is_none());
    }

    #[test]
    fn bad_files_are_refused() {
        assert!(StaticResolver::parse(
            "destinations: [{authority: a, endpoints: [{addr: nope}]}]",
            "x"
        )
        .is_err());
        assert!(StaticResolver::parse(
            "destinations: [{authority: a, endpoints: [{addr: \"1.2.3.4:5\", identity: bad}]}]",
            "x"
        )
        .is_err());
    }
}
