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

/// Resolves `host:port` with the system resolver; endpoints are unmeshed.
#[derive(Clone, Copy, Debug, Default)]
pub struct DnsResolver;

impl Resolve for DnsResolver {
    fn resolve<'a>(&'a self, authority: &'a str) -> BoxFuture<'a, Option<Destination>> {
        Box::pin(async move {
            let addrs = tokio::net::lookup_host(authority).await.ok()?;
            let endpoints: Vec<Endpoint> = addrs
                .map(|addr| Endpoint {
                    addr,
                    identity: None,
                    weight: 1,
                })
                .collect();
            (!endpoints.is_empty()).then_some(Destination {
                endpoints,
                opaque: false,
            })
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
        let chain = Chain(vec![Box::new(r), Box::new(DnsResolver)]);
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
