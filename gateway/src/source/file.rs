//! The file cluster source: a YAML document of services, their ports and
//! endpoints, and which are exported. Polled for changes (robust to editors
//! that replace files and to Kubernetes ConfigMap symlink swaps); a document
//! that fails to parse or validate is refused, counted and logged, and the
//! last good state stays in force.
//!
//! ```yaml
//! services:
//!   - namespace: demo
//!     name: hello
//!     export: true
//!     type: ClusterSetIP          # or Headless
//!     ports:
//!       - { name: http, port: 8080, protocol: TCP, appProtocol: http }
//!     endpoints:
//!       - { name: hello-0, ip: 127.0.0.1, ports: { http: 18080 } }
//!       # optional: the SPIFFE ID of the endpoint's proxy, when meshed
//!       - { name: hello-1, ip: 127.0.0.2, identity: "spiffe://west.strait.local/ns/demo/sa/hello" }
//!       # `ready: false` keeps an endpoint out of traffic (default true)
//! ```

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::Deserialize;
use strait_proxy::identity::SpiffeId;
use tokio::sync::watch;

use super::ClusterSource;
use crate::catalog::{
    validate_label, validate_ports, ClusterState, Endpoint, LocalService, Port, Protocol,
    ServiceKey, ServiceType,
};
use crate::metrics::ResultLabels;

/// Why a cluster file was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FileSourceError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The YAML did not parse into the expected shape.
    #[error("parsing {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (with line and column).
        message: String,
    },
    /// A service is invalid.
    #[error("{path}: service {service}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Which service (`namespace/name`, or its index).
        service: String,
        /// What is wrong.
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    #[serde(default)]
    services: Vec<ServiceDoc>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceDoc {
    namespace: String,
    name: String,
    #[serde(default)]
    export: bool,
    #[serde(default, rename = "type")]
    service_type: ServiceType,
    ports: Vec<PortDoc>,
    #[serde(default)]
    endpoints: Vec<EndpointDoc>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PortDoc {
    #[serde(default)]
    name: String,
    port: u16,
    #[serde(default)]
    protocol: Protocol,
    #[serde(default)]
    app_protocol: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointDoc {
    name: String,
    ip: IpAddr,
    #[serde(default)]
    ports: BTreeMap<String, u16>,
    #[serde(default = "yes")]
    ready: bool,
    #[serde(default)]
    identity: Option<String>,
}

fn yes() -> bool {
    true
}

/// Parses and validates a cluster document (pure; no I/O).
pub fn parse(text: &str, path: &Path) -> Result<ClusterState, FileSourceError> {
    let doc: Document = serde_saphyr::from_str(text).map_err(|e| FileSourceError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut state = ClusterState::default();
    for (i, s) in doc.services.into_iter().enumerate() {
        let invalid = |message: String| FileSourceError::Invalid {
            path: path.to_path_buf(),
            service: format!("#{i} ({}/{})", s.namespace, s.name),
            message,
        };
        validate_label("namespace", &s.namespace).map_err(|e| invalid(e.to_string()))?;
        validate_label("name", &s.name).map_err(|e| invalid(e.to_string()))?;
        let ports: Vec<Port> = s
            .ports
            .iter()
            .map(|p| Port {
                name: p.name.clone(),
                port: p.port,
                protocol: p.protocol,
                app_protocol: p.app_protocol.clone(),
            })
            .collect();
        validate_ports(&ports).map_err(|e| invalid(e.to_string()))?;
        let mut endpoints = Vec::new();
        for e in &s.endpoints {
            if let Some(unknown) = e
                .ports
                .keys()
                .find(|n| !ports.iter().any(|p| &p.name == *n))
            {
                return Err(invalid(format!(
                    "endpoint {} maps unknown port {unknown:?}",
                    e.name
                )));
            }
            if e.ports.values().any(|p| *p == 0) {
                return Err(invalid(format!("endpoint {} maps a port to 0", e.name)));
            }
            let identity = match &e.identity {
                Some(id) => Some(
                    SpiffeId::parse(id)
                        .map_err(|err| invalid(format!("endpoint {} identity: {err}", e.name)))?,
                ),
                None => None,
            };
            endpoints.push(Endpoint {
                name: e.name.clone(),
                ip: e.ip,
                target_ports: e.ports.clone(),
                ready: e.ready,
                identity,
            });
        }
        let key = ServiceKey::new(&s.namespace, &s.name);
        if state.services.contains_key(&key) {
            return Err(invalid("defined twice".into()));
        }
        state.services.insert(
            key.clone(),
            LocalService {
                key,
                service_type: s.service_type,
                ports,
                endpoints,
                exported: s.export,
            },
        );
    }
    Ok(state)
}

/// Reads and parses a cluster file.
pub fn load(path: &Path) -> Result<ClusterState, FileSourceError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileSourceError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path)
}

/// Reload outcomes, by result (`ok`, `error`).
pub type ReloadCounter = Family<ResultLabels, Counter>;

/// Decides when a polled file's text is to be applied: once two reads in a
/// row agree and differ from the text last applied. A file caught
/// mid-write (truncated, or cut at a list item, which may still parse) is
/// never applied.
#[derive(Debug)]
struct Settle {
    last: Option<String>,
    pending: Option<String>,
}

impl Settle {
    /// Starts from `applied`, the text in force (`None`: none yet).
    fn new(applied: Option<String>) -> Self {
        Self {
            last: applied,
            pending: None,
        }
    }

    /// One read of the file: the text to apply now, if any (it becomes the
    /// text in force, whether or not it then parses).
    fn read(&mut self, text: String) -> Option<String> {
        if self.last.as_deref() == Some(text.as_str()) {
            self.pending = None;
            return None;
        }
        if self.pending.as_deref() != Some(text.as_str()) {
            self.pending = Some(text);
            return None;
        }
        self.pending = None;
        self.last = Some(text.clone());
        Some(text)
    }
}

/// A file polled for changes (a change applies once two reads agree), its
/// reloads counted by result: an unreadable file is logged and counted
/// once until it can be read again.
#[derive(Debug)]
pub struct PolledFile {
    path: PathBuf,
    what: &'static str,
    settle: Settle,
    unreadable: bool,
    reloads: ReloadCounter,
}

impl PolledFile {
    /// Polls `path` (`what` names it in logs), `applied` being the text in
    /// force.
    pub fn new(
        path: PathBuf,
        what: &'static str,
        applied: Option<String>,
        reloads: ReloadCounter,
    ) -> Self {
        Self {
            path,
            what,
            settle: Settle::new(applied),
            unreadable: false,
            reloads,
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the file once: its text, when a change is to be applied.
    pub async fn changed(&mut self) -> Option<String> {
        match tokio::fs::read_to_string(&self.path).await {
            Ok(text) => {
                self.unreadable = false;
                self.settle.read(text)
            }
            Err(error) => {
                if !self.unreadable {
                    tracing::warn!(path = %self.path.display(), %error, "{} unreadable; keeping the last", self.what);
                    self.count("error");
                    self.unreadable = true;
                }
                None
            }
        }
    }

    /// Counts a change applied (`ok`) or refused (`error`).
    pub fn count(&self, result: &'static str) {
        self.reloads.get_or_create(&ResultLabels { result }).inc();
    }
}

/// A running file source.
#[derive(Debug)]
pub struct FileSource {
    rx: watch::Receiver<Arc<ClusterState>>,
    task: tokio::task::JoinHandle<()>,
}

impl FileSource {
    /// Loads `path` (an error here is fatal: there is no last good state
    /// yet), then polls it every `interval`.
    pub fn start(
        path: PathBuf,
        interval: Duration,
        reloads: ReloadCounter,
    ) -> Result<Self, FileSourceError> {
        let text = std::fs::read_to_string(&path).map_err(|source| FileSourceError::Read {
            path: path.clone(),
            source,
        })?;
        let state = parse(&text, &path)?;
        let (tx, rx) = watch::channel(Arc::new(state));
        let task = tokio::spawn(async move {
            let mut file = PolledFile::new(path, "cluster file", Some(text), reloads);
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                if tx.is_closed() {
                    break;
                }
                let Some(text) = file.changed().await else {
                    continue;
                };
                match parse(&text, file.path()) {
                    Ok(state) => {
                        tracing::info!(path = %file.path().display(), services = state.services.len(), "cluster file reloaded");
                        tx.send_if_modified(|cur| {
                            if **cur == state {
                                false
                            } else {
                                *cur = Arc::new(state);
                                true
                            }
                        });
                        // Counted once published: whoever sees the count
                        // reads the new state.
                        file.count("ok");
                    }
                    Err(error) => {
                        tracing::warn!(%error, "cluster file refused; keeping last state");
                        file.count("error");
                    }
                }
            }
        });
        Ok(Self { rx, task })
    }
}

impl ClusterSource for FileSource {
    fn watch(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.rx.clone()
    }
}

impl Drop for FileSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_applied_once_two_reads_agree() {
        let mut settle = Settle::new(Some("a".into()));
        assert_eq!(settle.read("a".into()), None, "unchanged");
        // Caught mid-write: truncated, then complete.
        assert_eq!(settle.read(String::new()), None);
        assert_eq!(settle.read("b".into()), None);
        assert_eq!(settle.read("b".into()), Some("b".into()));
        assert_eq!(settle.read("b".into()), None, "applied once");
        // A read back at the text in force drops a pending change.
        assert_eq!(settle.read("c".into()), None);
        assert_eq!(settle.read("b".into()), None);
        assert_eq!(settle.read("c".into()), None);
        assert_eq!(settle.read("c".into()), Some("c".into()));
        // An empty file, read twice, is a change like any other.
        assert_eq!(settle.read(String::new()), None);
        assert_eq!(settle.read(String::new()), Some(String::new()));
        let mut first = Settle::new(None);
        assert_eq!(first.read("x".into()), None);
        assert_eq!(first.read("x".into()), Some("x".into()));
    }

    const GOOD: &str = r#"
services:
  - namespace: demo
    name: hello
    export: true
    ports:
      - { name: http, port: 8080, appProtocol: http }
    endpoints:
      - { name: hello-0, ip: 127.0.0.1, ports: { http: 18080 } }
      - { name: hello-1, ip: 127.0.0.2, identity: "spiffe://west.strait.local/ns/demo/sa/hello" }
  - namespace: demo
    name: private
    ports: [{ port: 9000 }]
"#;

    proptest::proptest! {
        /// A mangled cluster document gets a clear error (naming the file)
        /// or a cluster state, never a panic.
        #[test]
        fn mangled_cluster_documents_get_an_answer(text in crate::testing::edited_yaml(GOOD)) {
            if let Err(e) = parse(&text, Path::new("x.yaml")) {
                proptest::prop_assert!(e.to_string().contains("x.yaml"), "{}", e);
            }
        }
    }

    #[test]
    fn parses_services_ports_and_endpoints() {
        let s = parse(GOOD, Path::new("x.yaml")).expect("valid");
        let hello = &s.services[&ServiceKey::new("demo", "hello")];
        assert!(hello.exported);
        assert_eq!(hello.endpoints[0].target(&hello.ports[0]).port(), 18080);
        assert_eq!(hello.endpoints[1].target(&hello.ports[0]).port(), 8080);
        assert_eq!(hello.endpoints[0].identity, None);
        assert_eq!(
            hello.endpoints[1].identity.as_ref().map(SpiffeId::as_str),
            Some("spiffe://west.strait.local/ns/demo/sa/hello")
        );
        assert_eq!(
            s.catalog().len(),
            1,
            "only exported services are in the catalog"
        );
    }

    #[test]
    fn bad_documents_are_refused_with_a_reason() {
        for (doc, needle) in [
            ("services: [{namespace: demo, name: x, ports: [{port: 0}]}]", "port 0"),
            ("services: [{namespace: Demo, name: x, ports: [{port: 1}]}]", "namespace"),
            ("services: [{namespace: demo, name: x, ports: []}]", "no ports"),
            ("services: [{namespace: demo, name: x, ports: [{port: 99999}]}]", "parsing"),
            ("services: [{namespace: demo, name: x, bogus: 1, ports: [{port: 1}]}]", "bogus"),
            ("services: [{namespace: demo, name: x, ports: [{port: 1}], endpoints: [{name: e, ip: nope}]}]", "parsing"),
            ("services: [{namespace: demo, name: x, ports: [{name: a, port: 1}], endpoints: [{name: e, ip: 1.2.3.4, ports: {b: 2}}]}]", "unknown port"),
            ("services: [{namespace: demo, name: x, ports: [{port: 1}], endpoints: [{name: e, ip: 1.2.3.4, identity: \"http://x\"}]}]", "endpoint e identity"),
            ("services: [{namespace: demo, name: x, ports: [{port: 1}], endpoints: [{name: e, ip: 1.2.3.4, identty: \"spiffe://a/b\"}]}]", "identty"),
            (": : :", "parsing"),
        ] {
            let err = parse(doc, Path::new("x.yaml")).expect_err(doc).to_string();
            assert!(err.contains(needle), "{doc}: {err}");
        }
    }

    #[tokio::test]
    async fn reloads_on_change_and_keeps_last_good_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, GOOD).expect("write");
        let reloads = ReloadCounter::default();
        let src = FileSource::start(path.clone(), Duration::from_millis(20), reloads.clone())
            .expect("start");
        let mut rx = src.watch();
        assert_eq!(rx.borrow().catalog().len(), 1);
        std::fs::write(
            &path,
            "services: [{namespace: demo, name: x, ports: [{port: 0}]}]",
        )
        .expect("write");
        let errors = || {
            reloads
                .get_or_create(&ResultLabels { result: "error" })
                .get()
        };
        crate::testing::until("the bad file refused", || errors() > 0).await;
        assert_eq!(
            rx.borrow().catalog().len(),
            1,
            "bad file keeps the last state"
        );
        // Two more polls: the refused file is counted once, not per poll.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(errors(), 1);
        std::fs::write(&path, GOOD.replace("export: true", "export: false")).expect("write");
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .expect("reload in time")
            .expect("changed");
        assert_eq!(rx.borrow().catalog().len(), 0);
    }
}
