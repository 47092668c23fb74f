//! Discovery from the control plane: [`GrpcResolver`] asks the gateway of
//! the proxy's cluster (`strait.destination.v1.Destination.Get`) where an
//! authority's endpoints are, and which are meshed.
//!
//! The first resolve of an authority opens a `Get` stream; a background
//! task keeps the latest answer in a cache that later resolves read at
//! once, so only the first request to a name waits for the control plane,
//! and never longer than a short timeout (500 ms by default). Whenever the
//! control plane has no answer (it does not know the name, the service has
//! no ready endpoint, it is unreachable, slow, or refuses the name),
//! [`Resolve::resolve`] returns `None`, so a [`Chain`](super::Chain) falls
//! through to the next resolver (a static file, DNS) and the proxy to the
//! original destination.
//!
//! - A stream that fails or ends is dropped from the cache: the next
//!   resolve of that name opens a new one.
//! - When the control plane is unreachable (connect failure or timeout),
//!   resolves of names not in the cache answer `None` at once, without
//!   waiting, for one second; then the next resolve tries again.
//! - A name the control plane refuses as never resolvable
//!   (`INVALID_ARGUMENT`, e.g. `api.example.com:443`) is remembered as such.
//! - Names not resolved for a minute are dropped (their streams closed);
//!   at most [`MAX_WATCHES`] names are followed at once, further names go
//!   straight to the fallback.
//!
//! All streams share one HTTP/2 connection (a lazily connected tonic
//! channel, plain TCP: mTLS to the control plane is future work).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use strait_proto::destination::v1::destination_client::DestinationClient;
use strait_proto::destination::v1::{update, GetDestination, Update};
use tokio::sync::watch;
use tonic::transport::Channel;

use super::{Destination, Endpoint, Known, Resolve};
use crate::identity::SpiffeId;
use strait_proto::tunnel::v1::ProtocolHint;

/// The most authorities one resolver follows at once.
pub const MAX_WATCHES: usize = 1000;

pub use crate::control::ControlPlaneAddrError;

/// Resolves authorities through the control plane's `Destination` service,
/// caching one watch per authority. Clones share the cache and connection.
#[derive(Clone, Debug)]
pub struct GrpcResolver {
    uri: http::Uri,
    channel: Arc<OnceLock<Channel>>,
    cache: Arc<Mutex<Cache>>,
    timeout: Duration,
    retry_after: Duration,
    idle_timeout: Duration,
    context_token: String,
    /// mTLS to the control plane (its identity pinned by the config's
    /// verifier); plaintext when `None`.
    tls: Option<Arc<rustls::ClientConfig>>,
}

/// What the cache knows of an authority.
#[derive(Clone, Debug)]
enum State {
    /// Asked; no answer yet.
    Pending,
    /// The control plane's latest answer: the endpoints, or none.
    Current(Option<Destination>),
    /// The control plane will never resolve this name.
    NotServed,
}

#[derive(Debug)]
struct Watch {
    id: u64,
    rx: watch::Receiver<State>,
    last_used: Instant,
}

#[derive(Debug)]
struct Cache {
    watches: crate::FastMap<String, Watch>,
    next_id: u64,
    /// The control plane is unreachable until then: do not wait for it.
    down_until: Option<Instant>,
    last_sweep: Instant,
}

/// How a watch ended.
#[derive(Debug, PartialEq, Eq)]
enum Ending {
    /// Nobody resolves this name any more.
    Unused,
    /// The control plane refuses the name for good.
    NotServed,
    /// The control plane could not be reached, or did not answer in time.
    Unreachable,
    /// The stream failed or ended otherwise.
    Failed,
}

impl GrpcResolver {
    /// A resolver asking the control plane at `uri` (`http://host:port`).
    /// Nothing connects until the first resolve.
    pub fn new(uri: http::Uri) -> Self {
        Self {
            uri,
            channel: Arc::default(),
            cache: Arc::new(Mutex::new(Cache {
                watches: crate::FastMap::default(),
                next_id: 0,
                down_until: None,
                last_sweep: Instant::now(),
            })),
            timeout: Duration::from_millis(500),
            retry_after: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(60),
            context_token: String::new(),
            tls: None,
        }
    }

    /// Speaks mTLS to the control plane with `config` (which presents this
    /// proxy's certificate and pins the control plane's identity, see
    /// [`crate::tls::client_config`]).
    pub fn with_tls(mut self, config: Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    /// A resolver asking the control plane at `addr`.
    pub fn for_addr(addr: SocketAddr) -> Self {
        let uri = format!("http://{addr}")
            .parse()
            .expect("a socket address is a valid URI authority");
        Self::new(uri)
    }

    /// A resolver asking the control plane at `host:port` or
    /// `http://host:port` (a command-line flag's value); the host may be a
    /// DNS name, resolved at every (re)connect.
    pub fn parse(addr: &str) -> Result<Self, ControlPlaneAddrError> {
        Ok(Self::new(crate::control::parse_addr(addr)?))
    }

    /// How long a resolve waits for the control plane's first answer about
    /// a name (default 500 ms); also its connect timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long resolves stop waiting for an unreachable control plane
    /// (default 1 s).
    pub fn with_retry_after(mut self, retry_after: Duration) -> Self {
        self.retry_after = retry_after;
        self
    }

    /// How long a name nobody resolves keeps its stream (default 60 s).
    pub fn with_idle_timeout(mut self, idle_timeout: Duration) -> Self {
        self.idle_timeout = idle_timeout;
        self
    }

    /// Context sent with every request (`GetDestination.context_token`).
    pub fn with_context_token(mut self, token: impl Into<String>) -> Self {
        self.context_token = token.into();
        self
    }

    /// How many names are followed now (for tests and metrics).
    pub fn watches(&self) -> usize {
        lock(&self.cache).watches.len()
    }

    fn channel(&self) -> Channel {
        self.channel
            .get_or_init(|| crate::control::channel(&self.uri, self.tls.clone(), self.timeout))
            .clone()
    }

    /// The cached watch of `authority`, or a new one; `None` when the
    /// control plane is known to be down or too many names are followed.
    fn watch(&self, authority: &str) -> Option<watch::Receiver<State>> {
        let now = Instant::now();
        let mut cache = lock(&self.cache);
        if now.duration_since(cache.last_sweep) >= Duration::from_secs(1) {
            cache.last_sweep = now;
            let idle = self.idle_timeout;
            cache
                .watches
                .retain(|_, w| now.duration_since(w.last_used) < idle);
        }
        if let Some(w) = cache.watches.get_mut(authority) {
            w.last_used = now;
            return Some(w.rx.clone());
        }
        if cache.down_until.is_some_and(|t| now < t) || cache.watches.len() >= MAX_WATCHES {
            return None;
        }
        let (tx, rx) = watch::channel(State::Pending);
        let id = cache.next_id;
        cache.next_id += 1;
        cache.watches.insert(
            authority.to_string(),
            Watch {
                id,
                rx: rx.clone(),
                last_used: now,
            },
        );
        drop(cache);
        let request = GetDestination {
            authority: authority.to_string(),
            context_token: self.context_token.clone(),
        };
        let (channel, timeout, retry_after) = (self.channel(), self.timeout, self.retry_after);
        let cache = Arc::downgrade(&self.cache);
        tokio::spawn(async move {
            let authority = request.authority.clone();
            let ending = follow(channel, request, &tx, timeout).await;
            tracing::debug!(%authority, ?ending, "destination watch ended");
            if ending == Ending::NotServed {
                // Kept (until idle): the name will not become resolvable.
                tx.send_replace(State::NotServed);
                return;
            }
            forget(
                &cache,
                &authority,
                id,
                ending == Ending::Unreachable,
                retry_after,
            );
        });
        Some(rx)
    }
}

fn lock(cache: &Mutex<Cache>) -> std::sync::MutexGuard<'_, Cache> {
    cache.lock().unwrap_or_else(|e| e.into_inner())
}

/// Drops watch `id` of `authority` from the cache (if it is still there)
/// and, when the control plane was unreachable, stops waiting for it for
/// `retry_after`.
fn forget(cache: &Weak<Mutex<Cache>>, authority: &str, id: u64, down: bool, retry_after: Duration) {
    let Some(cache) = cache.upgrade() else {
        return;
    };
    let mut cache = lock(&cache);
    if cache.watches.get(authority).is_some_and(|w| w.id == id) {
        cache.watches.remove(authority);
    }
    if down {
        let now = Instant::now();
        if cache.down_until.is_none_or(|t| t <= now) {
            tracing::warn!(
                retry_in = ?retry_after,
                "destination control plane unreachable; falling back to DNS"
            );
        }
        cache.down_until = Some(now + retry_after);
    }
}

fn ending_of(status: &tonic::Status) -> Ending {
    match status.code() {
        tonic::Code::InvalidArgument => Ending::NotServed,
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => Ending::Unreachable,
        _ => Ending::Failed,
    }
}

/// Follows one `Get` stream, publishing every answer on `tx`, until it
/// fails or nobody listens.
async fn follow(
    channel: Channel,
    request: GetDestination,
    tx: &watch::Sender<State>,
    timeout: Duration,
) -> Ending {
    let mut client = DestinationClient::new(channel);
    let authority = request.authority.clone();
    let first = async {
        let mut stream = client.get(request).await?.into_inner();
        let first = stream.message().await?;
        Ok::<_, tonic::Status>((stream, first))
    };
    let (mut stream, mut message) = tokio::select! {
        r = tokio::time::timeout(timeout, first) => match r {
            Err(_) => return Ending::Unreachable,
            Ok(Err(status)) => {
                tracing::debug!(%authority, %status, "destination lookup failed");
                return ending_of(&status);
            }
            Ok(Ok(first)) => first,
        },
        () = tx.closed() => return Ending::Unused,
    };
    loop {
        let Some(update) = message else {
            return Ending::Failed;
        };
        match answer(&update) {
            Some(a) => {
                tx.send_replace(State::Current(a));
            }
            None => tracing::debug!(%authority, "ignoring an empty destination update"),
        }
        message = tokio::select! {
            m = stream.message() => match m {
                Ok(m) => m,
                Err(status) => {
                    tracing::debug!(%authority, %status, "destination stream failed");
                    return ending_of(&status);
                }
            },
            () = tx.closed() => return Ending::Unused,
        };
    }
}

/// What an update says (pure): `Some(Some(_))` endpoints, `Some(None)` no
/// endpoints, `None` an empty update (ignored). Endpoints with an invalid
/// address or identity are left out (an unparsable identity never turns a
/// meshed endpoint into a plaintext one); a set left empty is no
/// endpoints. Weight 0 is the default, 1. The destination is opaque when
/// every address carries the opaque protocol hint.
fn answer(update: &Update) -> Option<Option<Destination>> {
    match update.update.as_ref()? {
        update::Update::NoEndpoints(_) => Some(None),
        update::Update::Set(set) => {
            let endpoints: Vec<Endpoint> = set
                .addrs
                .iter()
                .filter_map(|a| {
                    let Ok(addr) = a.addr.parse::<SocketAddr>() else {
                        tracing::warn!(addr = %a.addr, "ignoring an endpoint with an invalid address");
                        return None;
                    };
                    let identity = if a.identity.is_empty() {
                        None
                    } else {
                        match SpiffeId::parse(&a.identity) {
                            Ok(id) => Some(id),
                            Err(error) => {
                                tracing::warn!(%addr, %error, "ignoring an endpoint with an invalid identity");
                                return None;
                            }
                        }
                    };
                    Some(Endpoint {
                        addr,
                        identity,
                        weight: a.weight.max(1),
                    })
                })
                .collect();
            // A port's hint is its Service port's: every endpoint agrees.
            let opaque = !set.addrs.is_empty()
                && set
                    .addrs
                    .iter()
                    .all(|a| a.protocol_hint == ProtocolHint::Opaque as i32);
            Some((!endpoints.is_empty()).then_some(Destination { endpoints, opaque }))
        }
    }
}

impl GrpcResolver {
    /// The watch of `authority`, started if nobody follows it yet; `None`
    /// for a name the control plane is not asked about (no port, or no
    /// room for another watch).
    fn watched(&self, authority: &str) -> Option<watch::Receiver<State>> {
        let key = authority.to_ascii_lowercase();
        // Anything but `<host>:<port>` cannot be asked.
        if !crate::net::has_host_and_port(&key) {
            return None;
        }
        self.watch(&key)
    }
}

impl State {
    /// The destination this state answers (none while pending).
    fn answer(&self) -> Option<Destination> {
        match self {
            State::Current(d) => d.clone(),
            State::Pending | State::NotServed => None,
        }
    }
}

impl Resolve for GrpcResolver {
    fn peek(&self, authority: &str) -> Option<Destination> {
        // (Following the name from now on: the next connection will know.)
        self.watched(authority)?.borrow().answer()
    }

    fn known(&self, authority: &str) -> Known {
        let Some(rx) = self.watched(authority) else {
            return Known::Now(None);
        };
        let state = rx.borrow();
        match &*state {
            State::Pending => Known::Later,
            answered => Known::Now(answered.answer()),
        }
    }

    fn resolve<'a>(&'a self, authority: &'a str) -> BoxFuture<'a, Option<Destination>> {
        Box::pin(async move {
            let mut rx = self.watched(authority)?;
            // (At once when answered already.)
            let answered = rx.wait_for(|s| !matches!(s, State::Pending));
            let answer = match tokio::time::timeout(self.timeout, answered).await {
                Ok(Ok(state)) => state.answer(),
                _ => None,
            };
            answer
        })
    }
}

#[cfg(test)]
mod tests;
