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
use serde::Deserialize;

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

    /// What is already known of `authority`, without waiting (and, where
    /// answers come from a control plane, starting to ask so the next
    /// connection knows). Default: nothing.
    fn peek(&self, _authority: &str) -> Option<Destination> {
        None
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
}

/// How long a DNS answer is used (the system resolver gives no TTL).
pub const DNS_ANSWER_FOR: Duration = Duration::from_secs(5);
/// How long a failed lookup is remembered.
pub const DNS_FAILURE_FOR: Duration = Duration::from_secs(1);
/// How long a lookup may take before it counts as failed.
pub const DNS_TIMEOUT: Duration = Duration::from_secs(2);
/// Names whose answers are kept at most.
const DNS_MAX_CACHED: usize = 1024;

/// A lookup of `host:port`.
type Lookup =
    Arc<dyn Fn(String) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>> + Send + Sync>;

/// Resolves `host:port` with the system resolver; endpoints are unmeshed.
///
/// Every request to a name nothing else knows comes here, and the system
/// resolver (`getaddrinfo`, on tokio's blocking pool) neither caches nor
/// bounds its time: each would be one more query to the cluster DNS (one
/// per search domain), and a slow server would hold requests beyond their
/// timeout. So an answer is kept for [`DNS_ANSWER_FOR`] (a failure for
/// [`DNS_FAILURE_FOR`]) and a lookup has [`DNS_TIMEOUT`].
pub struct DnsResolver {
    lookup: Lookup,
    timeout: Duration,
    cache: Mutex<crate::FastMap<String, (Instant, Option<Destination>)>>,
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
    fn with_lookup(lookup: Lookup, timeout: Duration) -> Self {
        Self {
            lookup,
            timeout,
            cache: Mutex::default(),
        }
    }

    fn cached(&self, authority: &str, now: Instant) -> Option<Option<Destination>> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let (at, answer) = cache.get(authority)?;
        let keep = if answer.is_some() {
            DNS_ANSWER_FOR
        } else {
            DNS_FAILURE_FOR
        };
        (now.saturating_duration_since(*at) < keep).then(|| answer.clone())
    }

    fn remember(&self, authority: &str, now: Instant, answer: Option<Destination>) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= DNS_MAX_CACHED && !cache.contains_key(authority) {
            cache.retain(|_, (at, _)| now.saturating_duration_since(*at) < DNS_ANSWER_FOR);
            if cache.len() >= DNS_MAX_CACHED {
                // All fresh: start over rather than grow.
                cache.clear();
            }
        }
        cache.insert(authority.to_string(), (now, answer));
    }
}

impl Resolve for DnsResolver {
    fn resolve<'a>(&'a self, authority: &'a str) -> BoxFuture<'a, Option<Destination>> {
        Box::pin(async move {
            if let Some(answer) = self.cached(authority, Instant::now()) {
                return answer;
            }
            let lookup = (self.lookup)(authority.to_string());
            let addrs = match tokio::time::timeout(self.timeout, lookup).await {
                Ok(Ok(addrs)) => addrs,
                Ok(Err(error)) => {
                    tracing::debug!(%authority, %error, "DNS lookup failed");
                    Vec::new()
                }
                Err(_) => {
                    tracing::debug!(%authority, "DNS lookup timed out");
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
            self.remember(authority, Instant::now(), answer.clone());
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
    /// (port 0: nothing) after `delay`.
    fn counting(delay: Duration) -> (DnsResolver, Arc<std::sync::atomic::AtomicUsize>) {
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = calls.clone();
        let lookup: Lookup = Arc::new(move |authority: String| {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async move {
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
            DnsResolver::with_lookup(lookup, Duration::from_millis(200)),
            calls,
        )
    }

    #[tokio::test]
    async fn dns_answers_are_kept_briefly_and_lookups_bounded() {
        use std::sync::atomic::Ordering::SeqCst;
        let (dns, calls) = counting(Duration::ZERO);
        let addr = |d: Option<Destination>| d.map(|d| d.endpoints[0].addr.port());
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
        let kept = |name: &str, after: Duration| dns.cached(name, now + after).is_some();
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
