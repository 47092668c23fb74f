//! HTTP/2 server connections driven with the `h2` crate directly: the
//! inbound side of the connections between proxies, and applications that
//! speak HTTP/2 to their sidecar.
//!
//! hyper's HTTP/2 server spawns a task for every stream: the connection's
//! task accepts it, the stream's task runs the request and hands the
//! response back, and the connection's task is woken again to write it.
//! Here, on the single-threaded runtime, a stream runs inside the
//! connection's own task: the streams woken together run one after another
//! and their frames leave in one write, with no task to create, schedule
//! or wake per request. On a multi-threaded runtime each stream still gets
//! a task of its own, so that the streams of one connection (all the
//! traffic from one peer proxy) spread over the workers. A stream that
//! panics is reset alone either way.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use http::{HeaderValue, Request, Response};
use hyper::body::Body as HttpBody;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::runtime::RuntimeFlavor;

use super::{pipe, RecvBody};
use crate::http::Body;

/// Streams a client may have open at once (hyper's figure).
const MAX_CONCURRENT_STREAMS: u32 = 200;
/// Request body bytes a client may send ahead of the proxy's reading, per
/// stream and per connection (hyper's server figures: the client side's
/// larger windows would let each connection pin 5 MiB).
const STREAM_WINDOW: u32 = 1024 * 1024;
const CONN_WINDOW: u32 = 1024 * 1024;
/// Response bytes buffered per stream ahead of the client's window
/// (hyper's figure: at most 80 MB over all of a connection's streams).
const MAX_SEND_BUFFER: usize = 400 * 1024;

/// How a connection is served.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// The largest request head taken (SETTINGS_MAX_HEADER_LIST_SIZE).
    pub max_header: u32,
    /// How often the client is pinged; a ping unanswered for as long again
    /// closes the connection (a client gone without a FIN).
    pub keepalive: Duration,
}

/// Why a connection ended badly.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The client broke the protocol, or the connection failed.
    #[error(transparent)]
    H2(#[from] h2::Error),
    /// The client did not answer a ping in time.
    #[error("the client did not answer a ping within {0:?}")]
    PingTimeout(Duration),
}

/// Performs the server side of the HTTP/2 handshake on `io` (the client's
/// preface not yet read) and returns the connection to serve.
pub async fn handshake<I>(io: I, settings: Settings) -> Result<Connection<I>, h2::Error>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let mut conn = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_header_list_size(settings.max_header)
        .handshake::<_, Bytes>(io)
        .await?;
    let pings = Box::pin(super::pings(
        conn.ping_pong(),
        settings.keepalive,
        settings.keepalive,
    ));
    let in_task = tokio::runtime::Handle::try_current()
        .map_or(true, |h| h.runtime_flavor() == RuntimeFlavor::CurrentThread);
    Ok(Connection {
        conn,
        streams: FuturesUnordered::new(),
        pings,
        keepalive: settings.keepalive,
        in_task,
    })
}

type Stream = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One HTTP/2 server connection, served by [`Connection::serve`].
pub struct Connection<I> {
    conn: h2::server::Connection<I, Bytes>,
    /// The streams run in this connection's task (single-threaded runtime).
    streams: FuturesUnordered<Stream>,
    /// Resolves when a ping goes unanswered.
    pings: Pin<Box<dyn Future<Output = ()> + Send>>,
    keepalive: Duration,
    /// Whether streams run in this task rather than in their own.
    in_task: bool,
}

impl<I: AsyncRead + AsyncWrite + Unpin> Connection<I> {
    /// Serves requests with `handle` until the client closes the
    /// connection, a graceful shutdown has let every stream finish, or
    /// the connection fails. `handle`'s future of a response must not
    /// borrow it (a stream may outlive this call, in a task of its own).
    pub fn serve<'a, H, F>(
        &'a mut self,
        handle: &'a H,
    ) -> impl Future<Output = Result<(), ServeError>> + 'a
    where
        H: Fn(Request<Body>) -> F + ?Sized,
        F: Future<Output = Response<Body>> + Send + 'static,
    {
        poll_fn(move |cx| self.poll_serve(handle, cx))
    }

    /// Sends GOAWAY: no new streams are taken, those open finish, then
    /// [`Connection::serve`] returns.
    pub fn graceful_shutdown(&mut self) {
        self.conn.graceful_shutdown();
    }

    fn poll_serve<H, F>(&mut self, handle: &H, cx: &mut Context<'_>) -> Poll<Result<(), ServeError>>
    where
        H: Fn(Request<Body>) -> F + ?Sized,
        F: Future<Output = Response<Body>> + Send + 'static,
    {
        loop {
            // The streams woken first: what they send leaves with the
            // connection's next write, just below. (`FuturesUnordered`
            // yields on its own after a round of them.)
            while let Poll::Ready(Some(())) = self.streams.poll_next_unpin(cx) {}
            // Reads frames, writes what the streams queued, and hands out
            // new streams.
            match self.conn.poll_accept(cx) {
                Poll::Ready(Some(Ok((req, respond)))) => {
                    let connect = req.method() == http::Method::CONNECT;
                    let stream = answer(handle(request(req)), respond, connect);
                    if self.in_task {
                        // A panic unwinds out of this stream only (reset
                        // with CANCEL as its `SendResponse` drops), not
                        // through the connection and every other stream.
                        self.streams
                            .push(Box::pin(AssertUnwindSafe(stream).catch_unwind().map(|r| {
                                if r.is_err() {
                                    tracing::error!("HTTP/2 stream panicked; reset");
                                }
                            })));
                    } else {
                        tokio::spawn(stream);
                    }
                    // Round again: the new stream runs at once.
                }
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Err(error.into())),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => {
                    return match self.pings.as_mut().poll(cx) {
                        Poll::Ready(()) => {
                            Poll::Ready(Err(ServeError::PingTimeout(self.keepalive)))
                        }
                        Poll::Pending => Poll::Pending,
                    };
                }
            }
        }
    }
}

/// A stream's request with its body as the proxy's [`Body`].
fn request(req: Request<h2::RecvStream>) -> Request<Body> {
    let length = super::content_length(req.headers());
    req.map(|recv| RecvBody::boxed(recv, length))
}

/// Answers one stream with `response`'s outcome, piping its body under the
/// stream's flow control. A client that resets the stream before the
/// response is ready cancels the request (the handler's future is
/// dropped); one that resets it later stops the body. `connect`: the
/// request is a CONNECT, whose successful response has no length.
async fn answer<F>(response: F, mut respond: h2::server::SendResponse<Bytes>, connect: bool)
where
    F: Future<Output = Response<Body>>,
{
    let mut response = std::pin::pin!(response);
    let rsp = poll_fn(|cx| {
        if let Poll::Ready(rsp) = response.as_mut().poll(cx) {
            return Poll::Ready(Some(rsp));
        }
        respond.poll_reset(cx).map(|_| None)
    })
    .await;
    let Some(rsp) = rsp else {
        tracing::debug!("HTTP/2 stream reset by the client before its response");
        return;
    };
    let (mut parts, body) = rsp.into_parts();
    // Hop-by-hop fields have no place in HTTP/2 (and h2 refuses a head
    // with any).
    crate::http::strip_hop_by_hop(&mut parts.headers);
    // A proxy forwarding a response without a date adds one (RFC 9110
    // §6.6.1), as hyper's HTTP/1 server does on the other path.
    if !parts.headers.contains_key(http::header::DATE) {
        if let Some(date) = date() {
            parts.headers.insert(http::header::DATE, date);
        }
    }
    let eos = body.is_end_stream();
    // A CONNECT's successful response starts a tunnel: it has no length
    // (RFC 9110 §9.3.6).
    let tunnel = connect && parts.status.is_success();
    if tunnel {
        parts.headers.remove(http::header::CONTENT_LENGTH);
    } else if !eos {
        if let Some(n) = body.size_hint().exact() {
            parts
                .headers
                .entry(http::header::CONTENT_LENGTH)
                .or_insert_with(|| HeaderValue::from(n));
        }
    }
    match respond.send_response(Response::from_parts(parts, ()), eos) {
        Ok(stream) if !eos => {
            let _ = pipe(body, stream, h2::Reason::INTERNAL_ERROR).await;
        }
        Ok(_) => {}
        Err(error) => {
            tracing::debug!(%error, "HTTP/2 response not sent");
            // This side failed, not the client: not a CANCEL.
            respond.send_reset(h2::Reason::INTERNAL_ERROR);
        }
    }
}

/// Now as an HTTP date, formatted once a second per thread.
fn date() -> Option<HeaderValue> {
    thread_local! {
        static LAST: RefCell<Option<(u64, HeaderValue)>> = const { RefCell::new(None) };
    }
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).ok()?.as_secs();
    LAST.with_borrow_mut(|last| match last {
        Some((s, value)) if *s == second => Some(value.clone()),
        _ => {
            let value = HeaderValue::from_str(&httpdate::fmt_http_date(now)).ok()?;
            *last = Some((second, value.clone()));
            Some(value)
        }
    })
}

#[cfg(test)]
mod tests;
