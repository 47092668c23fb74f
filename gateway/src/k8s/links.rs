//! Links from `Link` objects: the pure [`link_entries`] turns the Links in
//! the gateway's namespace into the desired link set (refusing invalid ones
//! with a reason that ends up in the Link's status), and [`run`] publishes
//! it whenever the Links change.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use strait_proxy::identity::{SpiffeId, TrustAnchors};
use tokio::sync::watch;

use super::crd::{Link, LinkTransport};
use super::source::Caches;
use crate::catalog::validate_label;
use crate::config::{default_trust_domain, gateway_identity, Transport};
use crate::links::LinkEntry;

/// A Link that could not be used: its object name and why.
pub type LinkErrors = BTreeMap<String, String>;

/// `host`, `host:port`, `ip` or `[v6]:port`, with `port` filled in when
/// missing.
pub fn with_port(address: &str, port: u16) -> String {
    if address.parse::<SocketAddr>().is_ok() {
        return address.to_string();
    }
    if let Ok(ip) = address.parse::<IpAddr>() {
        return SocketAddr::new(ip, port).to_string();
    }
    match address.rsplit_once(':') {
        Some((host, p)) if !host.contains(':') && p.parse::<u16>().is_ok() => address.to_string(),
        _ => format!("{address}:{port}"),
    }
}

/// Looks up the PEM trust bundle in a Secret of the Links' namespace.
pub trait BundleLookup {
    /// The `ca.crt` of Secret `name`, or why not.
    fn bundle(&self, name: &str) -> Result<String, String>;
}

impl<F: Fn(&str) -> Result<String, String>> BundleLookup for F {
    fn bundle(&self, name: &str) -> Result<String, String> {
        self(name)
    }
}

/// The key of a trust-bundle Secret holding the PEM anchors.
pub const BUNDLE_KEY: &str = "ca.crt";

/// Reads [`BUNDLE_KEY`] from a Secret (pure).
pub fn bundle_of(secret: Option<&Secret>, name: &str) -> Result<String, String> {
    let secret = secret.ok_or_else(|| format!("Secret {name} not found"))?;
    let data = secret
        .data
        .as_ref()
        .and_then(|d| d.get(BUNDLE_KEY))
        .ok_or_else(|| format!("Secret {name} has no {BUNDLE_KEY}"))?;
    String::from_utf8(data.0.clone())
        .map_err(|_| format!("Secret {name}: {BUNDLE_KEY} is not PEM text"))
}

fn entry(link: &Link, own_cluster: &str, bundle: &dyn BundleLookup) -> Result<LinkEntry, String> {
    let spec = &link.spec;
    validate_label("cluster", &spec.cluster).map_err(|e| format!("spec.cluster: {e}"))?;
    if spec.cluster == own_cluster {
        return Err("spec.cluster: a cluster cannot link to itself".into());
    }
    if spec.cluster == super::labels::CLUSTERSET {
        return Err("spec.cluster: `clusterset` is reserved (`<svc>-clusterset` Services)".into());
    }
    let trust_bundle = match &spec.trust_bundle_secret {
        None => None,
        Some(secret) => {
            let pem = bundle
                .bundle(secret)
                .map_err(|e| format!("spec.trustBundleSecret: {e}"))?;
            TrustAnchors::from_pem(pem.as_bytes(), secret)
                .map_err(|e| format!("spec.trustBundleSecret: {e}"))?;
            Some(pem)
        }
    };
    if spec.port == 0 {
        return Err("spec.port: must be 1 to 65535".into());
    }
    let identity = match &spec.identity {
        Some(id) => SpiffeId::parse(id).map_err(|e| format!("spec.identity: {e}"))?,
        None => gateway_identity(&default_trust_domain(&spec.cluster))
            .map_err(|e| format!("spec.identity: {e}"))?,
    };
    let mut addresses = Vec::new();
    for (i, a) in spec.addresses.iter().enumerate() {
        let a = a.trim();
        if a.is_empty() || a.contains('/') || a.chars().any(char::is_whitespace) {
            return Err(format!(
                "spec.addresses[{i}]: {a:?} is not a host or host:port"
            ));
        }
        addresses.push(with_port(a, spec.port));
    }
    Ok(LinkEntry {
        name: spec.cluster.clone(),
        identity,
        addresses,
        accept: spec.accept.clone(),
        trust_bundle,
        transport: match spec.transport {
            LinkTransport::Quic => Transport::Quic,
            LinkTransport::Tcp => Transport::Tcp,
            LinkTransport::Auto => Transport::Auto,
        },
    })
}

/// The desired link set from Link objects (pure). Invalid Links, and every
/// Link after the first for the same cluster or identity, are refused with
/// a reason, by object name.
pub fn link_entries<'a>(
    links: impl IntoIterator<Item = &'a Link>,
    own_cluster: &str,
    bundle: &dyn BundleLookup,
) -> (Vec<LinkEntry>, LinkErrors) {
    let mut sorted: Vec<&Link> = links.into_iter().collect();
    sorted.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut out: Vec<LinkEntry> = Vec::new();
    let mut errors = LinkErrors::new();
    for link in sorted {
        let name = link.metadata.name.clone().unwrap_or_default();
        match entry(link, own_cluster, bundle) {
            Ok(e) => {
                if let Some(other) = out
                    .iter()
                    .find(|o| o.name == e.name || o.identity == e.identity)
                {
                    errors.insert(
                        name,
                        format!(
                            "another Link already links cluster {} ({})",
                            other.name, other.identity
                        ),
                    );
                } else {
                    out.push(e);
                }
            }
            Err(why) => {
                errors.insert(name, why);
            }
        }
    }
    (out, errors)
}

/// Publishes the link set (and refusals) from the Link cache until aborted.
pub async fn run(
    caches: Caches,
    own_cluster: String,
    desired: watch::Sender<Arc<Vec<LinkEntry>>>,
    refused: watch::Sender<Arc<LinkErrors>>,
) {
    let mut changed = caches.changed.clone();
    loop {
        changed.borrow_and_update();
        let state = caches.links.state();
        let secrets = caches.secrets.state();
        let lookup = |name: &str| {
            bundle_of(
                secrets
                    .iter()
                    .find(|s| s.metadata.name.as_deref() == Some(name))
                    .map(|s| &**s),
                name,
            )
        };
        let (entries, errors) = link_entries(state.iter().map(|l| &**l), &own_cluster, &lookup);
        desired.send_if_modified(|cur| {
            let differs = **cur != entries;
            if differs {
                *cur = Arc::new(entries);
            }
            differs
        });
        refused.send_if_modified(|cur| {
            let differs = **cur != errors;
            if differs {
                for (name, why) in &errors {
                    tracing::warn!(link = %name, %why, "Link refused");
                }
                *cur = Arc::new(errors);
            }
            differs
        });
        if changed.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::crd::{AcceptPolicy, LinkSpec};

    fn link(name: &str, cluster: &str, addresses: &[&str]) -> Link {
        let mut l = Link::new(
            name,
            LinkSpec {
                cluster: cluster.into(),
                addresses: addresses.iter().map(|s| s.to_string()).collect(),
                port: 4143,
                transport: LinkTransport::Quic,
                identity: None,
                trust_bundle_secret: None,
                accept: None,
            },
        );
        l.metadata.namespace = Some("strait-system".into());
        l
    }

    fn no_secrets(name: &str) -> Result<String, String> {
        Err(format!("Secret {name} not found"))
    }

    #[test]
    fn trust_bundles_come_from_secrets_and_must_be_anchors() {
        let root = strait_proxy::identity::generate_root("east").expect("root");
        let mut with = link("east", "east", &[]);
        with.spec.trust_bundle_secret = Some("east-anchors".into());
        let mut garbage = link("north", "north", &[]);
        garbage.spec.trust_bundle_secret = Some("junk".into());
        let mut missing = link("south", "south", &[]);
        missing.spec.trust_bundle_secret = Some("nope".into());
        let pem = root.cert_pem.clone();
        let lookup = move |name: &str| match name {
            "east-anchors" => Ok(pem.clone()),
            "junk" => Ok("not a certificate".to_string()),
            other => Err(format!("Secret {other} not found")),
        };
        let (entries, errors) = link_entries(&[with, garbage, missing], "west", &lookup);
        assert_eq!(entries.len(), 1, "{errors:?}");
        assert_eq!(
            entries[0].trust_bundle.as_deref(),
            Some(root.cert_pem.as_str())
        );
        assert!(errors["north"].contains("trustBundleSecret"), "{errors:?}");
        assert!(errors["south"].contains("not found"), "{errors:?}");
    }

    #[test]
    fn addresses_get_the_default_port_and_keep_their_own() {
        assert_eq!(with_port("gw.example.com", 4143), "gw.example.com:4143");
        assert_eq!(with_port("gw.example.com:443", 4143), "gw.example.com:443");
        assert_eq!(with_port("10.0.0.1", 4143), "10.0.0.1:4143");
        assert_eq!(with_port("fd00::1", 4143), "[fd00::1]:4143");
        assert_eq!(with_port("[fd00::1]:99", 4143), "[fd00::1]:99");
    }

    #[test]
    fn valid_links_become_entries_with_the_default_identity() {
        let (entries, errors) = link_entries(
            &[link("east", "east", &["lb.east.example", "10.1.2.3:5000"])],
            "west",
            &no_secrets,
        );
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(entries.len(), 1);
        assert_eq!(
            entries[0].identity.as_str(),
            "spiffe://east.strait.local/ns/strait-system/sa/strait-gateway"
        );
        assert_eq!(
            entries[0].addresses,
            ["lb.east.example:4143", "10.1.2.3:5000"]
        );
    }

    #[test]
    fn invalid_and_duplicate_links_are_refused_with_a_reason() {
        let mut tcp = link("tcp", "north", &["north.example"]);
        tcp.spec.transport = LinkTransport::Tcp;
        let mut bad_id = link("bad-id", "south", &[]);
        bad_id.spec.identity = Some("not a spiffe id".into());
        let mut accept = link("a-east", "east", &[]);
        accept.spec.accept = Some(AcceptPolicy {
            namespaces: vec!["shop".into()],
            services: vec![],
        });
        let links = [
            accept,
            link("b-east", "east", &[]),
            link("self", "west", &[]),
            link("caps", "East", &[]),
            tcp,
            bad_id,
        ];
        let (entries, errors) = link_entries(&links, "west", &no_secrets);
        assert_eq!(entries.len(), 2, "{errors:?}");
        assert!(entries[0].accept.is_some());
        assert_eq!(entries[1].transport, Transport::Tcp, "tcp links are taken");
        assert!(errors["b-east"].contains("already links"), "{errors:?}");
        assert!(errors["self"].contains("itself"));
        assert!(errors["caps"].contains("spec.cluster"));
        assert!(errors["bad-id"].contains("spec.identity"));
    }
}
