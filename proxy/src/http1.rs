//! Plaintext HTTP/1.1 connections to upstreams (the application behind an
//! inbound proxy, unmeshed destinations), pooled by address.
//!
//! A request takes the connection used most recently (its socket and
//! buffers are the warmest) or dials one; it goes back to the pool when its
//! response body has been read to the end. Nothing is spawned per request
//! and no connection is dialed while an idle one exists (hyper-util's pool
//! races a dial against every checkout that finds none ready, and its
//! connections come back through a task of their own per response).

use crate::net::Target;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use crate::http::{Body, BoxError};

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Http1Error {
    /// Connecting failed or timed out.
    #[error("connecting to {target}: {source}")]
    Connect {
        /// The upstream.
        target: Target,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The connection failed before a response head arrived.
    #[error("http/1.1 to {target}: {source}")]
    Http {
        /// The upstream.
        target: Target,
        /// The cause.
        #[source]
        source: hyper::Error,
    },
}

/// Limits of a [`Pool`].
#[derive(Debug, Clone, Copy)]
pub struct PoolConfig {
    /// Idle connections kept per address.
    pub max_idle: usize,
    /// How long an idle connection may wait for its next request.
    pub idle_timeout: Duration,
    /// How long a dial may take.
    pub connect_timeout: Duration,
}

struct Idle {
    sender: SendRequest<Body>,
    since: Instant,
}

#[derive(Default)]
struct Conns {
    /// Keyed by the whole target: a connection that went to a fallback
    /// serves only requests that allow it.
    by_addr: crate::FastMap<Target, VecDeque<Idle>>,
    last_sweep: Option<Instant>,
}

struct Shared {
    config: PoolConfig,
    idle: Mutex<Conns>,
}

impl Shared {
    /// The most recent idle connection for `addr` (a whole target) ready
    /// for a request, if any. One still busy (the upstream answered before
    /// it had read the whole request body, which hyper is still sending) is
    /// kept for later.
    fn checkout(&self, addr: Target) -> Option<SendRequest<Body>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let conns = idle.by_addr.get_mut(&addr)?;
        let now = Instant::now();
        let mut busy = Vec::new();
        let mut found = None;
        while let Some(c) = conns.pop_back() {
            if c.sender.is_closed() || now.duration_since(c.since) >= self.config.idle_timeout {
                continue;
            }
            if c.sender.is_ready() {
                found = Some(c.sender);
                break;
            }
            busy.push(c);
        }
        // Back in their order (oldest at the front).
        while let Some(c) = busy.pop() {
            conns.push_back(c);
        }
        found
    }

    fn checkin(&self, addr: Target, sender: SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let timeout = self.config.idle_timeout;
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        // Now and then, every address: connections to upstreams no
        // request goes to any more are closed, and the addresses forgotten.
        if idle
            .last_sweep
            .is_none_or(|t| now.duration_since(t) >= timeout)
        {
            idle.last_sweep = Some(now);
            idle.by_addr.retain(|_, conns| {
                conns.retain(|c| !c.sender.is_closed() && now.duration_since(c.since) < timeout);
                !conns.is_empty()
            });
        }
        let conns = idle.by_addr.entry(addr).or_default();
        // Oldest first: the expired ones are at the front.
        while conns
            .front()
            .is_some_and(|c| now.duration_since(c.since) >= timeout)
        {
            conns.pop_front();
        }
        if conns.len() < self.config.max_idle {
            conns.push_back(Idle { sender, since: now });
        }
    }
}

/// HTTP/1.1 connections by address; cheap to clone.
#[derive(Clone)]
pub struct Pool(Arc<Shared>);

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("config", &self.0.config)
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// An empty pool.
    pub fn new(config: PoolConfig) -> Self {
        Self(Arc::new(Shared {
            config,
            idle: Mutex::default(),
        }))
    }

    /// Sends `req` (origin-form URI, `Host` set) to `target` on an idle
    /// connection, or a new one. A request an idle connection closed
    /// under before taking it is sent again on a new connection (it was
    /// never written).
    pub async fn send(
        &self,
        target: impl Into<Target>,
        req: Request<Body>,
    ) -> Result<Response<Body>, Http1Error> {
        let target = target.into();
        let mut req = req;
        while let Some(mut sender) = self.0.checkout(target) {
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(rsp) => return Ok(self.pooled(target, sender, rsp)),
                Err(mut e) => match e.take_message() {
                    Some(unsent) => req = unsent,
                    None => {
                        return Err(Http1Error::Http {
                            target,
                            source: e.into_error(),
                        })
                    }
                },
            }
        }
        // Dialing is rare and its state large: boxed, so the per-request
        // future stays small.
        let mut sender = Box::pin(self.dial(target)).await?;
        match sender.send_request(req).await {
            Ok(rsp) => Ok(self.pooled(target, sender, rsp)),
            Err(source) => Err(Http1Error::Http { target, source }),
        }
    }

    async fn dial(&self, target: Target) -> Result<SendRequest<Body>, Http1Error> {
        let err = |source| Http1Error::Connect { target, source };
        let tcp = target
            .connect(self.0.config.connect_timeout)
            .await
            .map_err(err)?;
        tcp.set_nodelay(true).map_err(err)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|source| Http1Error::Http { target, source })?;
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%target, %error, "upstream HTTP/1.1 connection closed");
            }
        });
        Ok(sender)
    }

    /// The response with a body that returns the connection to the pool
    /// once read to the end.
    fn pooled(
        &self,
        addr: Target,
        sender: SendRequest<Body>,
        rsp: Response<Incoming>,
    ) -> Response<Body> {
        rsp.map(|inner| {
            let mut body = PooledBody {
                inner,
                slot: Some((self.0.clone(), addr, sender)),
            };
            if body.inner.is_end_stream() {
                body.release();
            }
            crate::http::boxed(body)
        })
    }
}

/// A response body holding its connection until the body ends; a body
/// dropped before its end takes the connection with it (hyper closes a
/// connection whose response was not read through).
struct PooledBody {
    inner: Incoming,
    slot: Option<(Arc<Shared>, Target, SendRequest<Body>)>,
}

impl PooledBody {
    fn release(&mut self) {
        if let Some((pool, addr, sender)) = self.slot.take() {
            pool.checkin(addr, sender);
        }
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // Read to the end without the final poll for `None`.
        if self.inner.is_end_stream() {
            self.release();
        }
    }
}

impl HttpBody for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            Some(Err(_)) => self.slot = None,
            None => self.release(),
            // The last frame (data that ends the length, or trailers):
            // whoever reads the body may stop here.
            Some(Ok(f)) if f.is_trailers() || self.inner.is_end_stream() => self.release(),
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests;
