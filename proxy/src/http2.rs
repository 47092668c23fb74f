//! HTTP/2 client connections driven with the `h2` crate directly, for the
//! connections between proxies and to HTTP/2 upstreams.
//!
//! hyper's HTTP/2 client hands every request to the connection's task over
//! a channel and spawns one more task per request to wait for its response.
//! Here a request opens its stream from the caller's own task and awaits
//! the response there; a request body is piped in that same future while
//! the response is awaited, and only a body still streaming after the
//! response head has arrived (gRPC streaming, uploads) moves to a task of
//! its own.
//!
//! [`server`] is the other side: HTTP/2 server connections on `h2`.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::future::{select, Either};
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::http::{Body, BoxError};

pub mod server;

/// A handle to send requests on one HTTP/2 connection; cheap to clone.
pub type Sender = h2::client::SendRequest<Bytes>;

/// Stream flow-control window of client connections: large enough that
/// one stream is not held to 64 KiB in flight (hyper's client default too).
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
/// Connection flow-control window.
const CONN_WINDOW: u32 = 5 * 1024 * 1024;
/// How often an open connection is pinged, and how long a ping may go
/// unanswered before the connection is dropped as dead.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Streams opened before the server's SETTINGS say how many it takes
/// (hyper's figure; h2's own default is unbounded, and a burst beyond the
/// server's limit would be refused).
const INITIAL_MAX_SEND_STREAMS: usize = 100;
/// Request body bytes buffered per stream ahead of the peer's window.
const MAX_SEND_BUFFER: usize = 1024 * 1024;

/// Whether a connection pings its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keepalive {
    /// Every few seconds, dropping the connection when a ping goes
    /// unanswered: for peers known to take it (another Strait proxy).
    Ping,
    /// Never: gRPC servers, among others, answer frequent pings with
    /// GOAWAY `too_many_pings`.
    Off,
}

/// Performs the HTTP/2 handshake on `io` and spawns the task that drives
/// the connection (pinging the peer, if asked, so a dead one is noticed);
/// `max_header` bounds response heads. Returns once the connection is ready
/// for requests.
pub async fn handshake<I>(
    io: I,
    max_header: u32,
    keepalive: Keepalive,
    name: String,
) -> Result<Sender, h2::Error>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, mut conn) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .initial_max_send_streams(INITIAL_MAX_SEND_STREAMS)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_header_list_size(max_header)
        .enable_push(false)
        .handshake::<_, Bytes>(io)
        .await?;
    let ping = match keepalive {
        Keepalive::Ping => conn.ping_pong(),
        Keepalive::Off => None,
    };
    tokio::spawn(async move {
        let pings = pings(ping, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT);
        tokio::pin!(pings);
        match select(Batched::new(conn), pings).await {
            Either::Left((Err(error), _)) => {
                tracing::debug!(peer = %name, %error, "HTTP/2 connection closed");
            }
            Either::Left((Ok(()), _)) => {}
            Either::Right(((), _)) => {
                tracing::info!(peer = %name, "HTTP/2 peer stopped answering pings");
            }
        }
    });
    sender.ready().await
}

/// Polls a connection only after every task woken with it has run: the
/// connection is woken by each request that opens a stream or each
/// response read, and polled at once it would write one request's frames
/// per system call. Yielding to the back of the run queue once per wake-up
/// lets the other requests of the same moment queue theirs first, so one
/// write carries them all.
pub struct Batched<F> {
    inner: F,
    yielded: bool,
}

impl<F> Batched<F> {
    /// Wraps a connection future.
    pub fn new(inner: F) -> Self {
        Self {
            inner,
            yielded: false,
        }
    }
}

impl<F: Future + Unpin> Future for Batched<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        if !self.yielded {
            self.yielded = true;
            // Woken while running, a tokio task goes to the back of the
            // run queue.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.yielded = false;
        Pin::new(&mut self.inner).poll(cx)
    }
}

/// HTTP/2 connections by key, one multiplexed connection each: a request
/// takes the pooled one while it is ready, else dials one, which replaces
/// it.
#[derive(Debug)]
pub struct Pool<K> {
    conns: std::sync::Mutex<crate::FastMap<K, Sender>>,
}

impl<K> Default for Pool<K> {
    fn default() -> Self {
        Self {
            conns: std::sync::Mutex::default(),
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone> Pool<K> {
    /// The connection for `key`: the pooled one if still ready, else
    /// `dial`'s (which callers box: dialing is rare and its state large,
    /// and every request's future would otherwise carry it).
    pub async fn get<E, D>(&self, key: &K, dial: impl FnOnce() -> D) -> Result<Sender, E>
    where
        D: Future<Output = Result<Sender, E>>,
    {
        let pooled = self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned();
        if let Some(s) = pooled {
            if let Ok(s) = s.ready().await {
                return Ok(s);
            }
        }
        let sender = dial().await?;
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        // Dialing is rare: a look over the others then forgets those whose
        // connection has ended (endpoints come and go, and a key that is
        // never asked for again would otherwise keep its closed
        // connection's state for the proxy's life).
        conns.retain(|_, s| !is_closed(s));
        conns.insert(key.clone(), sender.clone());
        Ok(sender)
    }
}

/// Whether `sender`'s connection has ended (an error, a GOAWAY, EOF): its
/// readiness, polled once without waiting (no stream is pending, so no
/// waker is kept).
fn is_closed(sender: &Sender) -> bool {
    let mut sender = sender.clone();
    let mut cx = Context::from_waker(std::task::Waker::noop());
    matches!(sender.poll_ready(&mut cx), Poll::Ready(Err(_)))
}

/// Pings the peer every `interval`; resolves when one goes unanswered for
/// `timeout`.
async fn pings(ping: Option<h2::PingPong>, interval: Duration, timeout: Duration) {
    let Some(mut ping) = ping else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            // The connection is gone: its own future reports why.
            Ok(Err(_)) => return std::future::pending().await,
            Err(_) => return,
        }
    }
}

/// Sends `req` (absolute URI, HTTP/2-legal headers) on `sender`, which must
/// be ready, and returns the response head with a body streaming from the
/// peer.
pub async fn send(sender: &mut Sender, req: Request<Body>) -> Result<Response<Body>, h2::Error> {
    let (parts, body) = req.into_parts();
    let head = parts.method == http::Method::HEAD;
    let eos = body.is_end_stream();
    let (response, stream) = sender.send_request(Request::from_parts(parts, ()), eos)?;
    let response = if eos {
        response.await?
    } else {
        // Piped here while the response head is awaited; a body that is
        // still streaming when the head arrives carries on in its own task.
        let pipe = Box::pin(pipe(body, stream, h2::Reason::CANCEL));
        match select(response, pipe).await {
            Either::Left((response, pipe)) => {
                tokio::spawn(pipe);
                response?
            }
            // A body that failed reset the stream: h2 does not complete
            // the response future of a stream reset on this side.
            Either::Right((Err(reset), _)) => return Err(reset),
            Either::Right((Ok(()), response)) => response.await?,
        }
    };
    // A HEAD or 304 response carries the length of a body it has not.
    let bodiless = head || response.status() == http::StatusCode::NOT_MODIFIED;
    let length = if bodiless {
        Some(0)
    } else {
        content_length(response.headers())
    };
    Ok(response.map(|recv| RecvBody::boxed(recv, length)))
}

fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Copies `body` into `stream` under the stream's flow control; trailers
/// are sent as trailers. A body that fails resets the stream with
/// `failed` (the peer must not take a cut-off body for a whole one) and is
/// the error; a stream the peer resets, or a connection gone, stops the
/// copy (the response reports why).
async fn pipe(
    mut body: Body,
    mut stream: h2::SendStream<Bytes>,
    failed: h2::Reason,
) -> Result<(), h2::Error> {
    loop {
        let frame = {
            let next = body.frame();
            let reset = poll_fn(|cx| stream.poll_reset(cx));
            tokio::pin!(next, reset);
            match select(reset, next).await {
                Either::Left(_) => return Ok(()),
                Either::Right((frame, _)) => frame,
            }
        };
        match frame {
            None => {
                let _ = stream.send_data(Bytes::new(), true);
                return Ok(());
            }
            Some(Err(error)) => {
                tracing::debug!(%error, "body failed; resetting the stream");
                stream.send_reset(failed);
                return Err(failed.into());
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    let last = body.is_end_stream();
                    if send_data(&mut stream, data, last).await.is_err() || last {
                        return Ok(());
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        let _ = stream.send_trailers(trailers);
                    }
                    return Ok(());
                }
            },
        }
    }
}

/// Sends `data` as the stream's window allows; `last` ends the stream with
/// its final piece.
async fn send_data(
    stream: &mut h2::SendStream<Bytes>,
    mut data: Bytes,
    last: bool,
) -> Result<(), h2::Error> {
    if data.is_empty() {
        return if last {
            stream.send_data(data, true)
        } else {
            Ok(())
        };
    }
    while !data.is_empty() {
        stream.reserve_capacity(data.len());
        let granted = match poll_fn(|cx| stream.poll_capacity(cx)).await {
            Some(granted) => granted?,
            None => return Err(h2::Reason::STREAM_CLOSED.into()),
        };
        if granted == 0 {
            continue;
        }
        let piece = data.split_to(granted.min(data.len()));
        stream.send_data(piece, last && data.is_empty())?;
    }
    Ok(())
}

/// A response body read from an `h2` stream: data frames (their window
/// released as they are handed on), then trailers.
struct RecvBody {
    recv: h2::RecvStream,
    /// What `content-length` says is still to come (h2 itself refuses a
    /// body that does not match it).
    length: Option<u64>,
    data_done: bool,
    done: bool,
}

impl RecvBody {
    /// `recv` as a [`Body`], `length` bytes long if known.
    fn boxed(recv: h2::RecvStream, length: Option<u64>) -> Body {
        BodyExt::boxed(Self {
            recv,
            length,
            data_done: false,
            done: false,
        })
    }
}

impl HttpBody for RecvBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    if let Some(left) = &mut this.length {
                        *left = left.saturating_sub(data.len() as u64);
                    }
                    // Only fails if the stream is gone, which the next
                    // poll reports.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(error)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(error.into())));
                }
                None => this.data_done = true,
            }
        }
        let trailers = ready!(this.recv.poll_trailers(cx));
        this.done = true;
        Poll::Ready(match trailers {
            Ok(Some(trailers)) => Some(Ok(Frame::trailers(trailers))),
            Ok(None) => None,
            Err(error) => Some(Err(error.into())),
        })
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.is_end_stream() {
            return SizeHint::with_exact(0);
        }
        match self.length {
            Some(n) if !self.data_done => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests;
