use std::error::Error as _;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures::channel::mpsc;
use futures::SinkExt;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Body as _, Frame};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use super::{handshake, Connection, ServeError, Settings};
use crate::http::{boxed, Body, BoxError};

const SETTINGS: Settings = Settings {
    max_header: 16 * 1024,
    keepalive: Duration::from_secs(10),
};

/// Serves every connection accepted on a fresh port with `handle`; each
/// connection's outcome is sent on the returned channel.
async fn server<F, Fut>(
    handle: F,
) -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Result<(), ServeError>>,
)
where
    F: Fn(Request<Body>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (done, ended) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let handle = handle.clone();
            let done = done.clone();
            tokio::spawn(async move {
                let r = match handshake(tcp, SETTINGS).await {
                    Ok(mut conn) => conn.serve(&handle).await,
                    Err(e) => Err(e.into()),
                };
                let _ = done.send(r);
            });
        }
    });
    (addr, ended)
}

/// A hyper HTTP/2 client connection to `addr`.
async fn client(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Body> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    send
}

fn post(body: Body) -> Request<Body> {
    Request::builder()
        .method("POST")
        .uri("http://test.local/echo")
        .body(body)
        .expect("request")
}

/// Answers with the request's own body (trailers included), with a
/// hop-by-hop field an HTTP/1 upstream might have sent, and the id of the
/// task it ran in.
async fn echo(req: Request<Body>) -> Response<Body> {
    let mut rsp = Response::new(req.into_body());
    rsp.headers_mut()
        .insert("connection", "keep-alive".parse().expect("value"));
    rsp.headers_mut()
        .insert("keep-alive", "timeout=5".parse().expect("value"));
    let task = tokio::task::id().to_string();
    rsp.headers_mut()
        .insert("task", task.parse().expect("value"));
    rsp
}

/// A body sent frame by frame as the test pushes them.
fn streamed() -> (mpsc::Sender<Result<Frame<Bytes>, BoxError>>, Body) {
    let (tx, rx) = mpsc::channel(4);
    (tx, boxed(StreamBody::new(rx)))
}

/// Many requests at once on one connection, each echoed frame by frame
/// with its trailers, on both runtimes: in the connection's task
/// (current-thread: one task for all) and in a task per stream
/// (multi-threaded: as many tasks as streams).
async fn echoes_concurrent_streams_with_trailers(tasks: usize) {
    let (addr, _) = server(echo).await;
    let send = client(addr).await;
    let mut all = Vec::new();
    for i in 0..40 {
        let mut send = send.clone();
        all.push(tokio::spawn(async move {
            let (mut tx, body) = streamed();
            let rsp = send.send_request(post(body));
            let data = Bytes::from(format!("request {i} "));
            tx.send(Ok(Frame::data(data.clone()))).await.expect("send");
            tx.send(Ok(Frame::data(data))).await.expect("send");
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", i.to_string().parse().expect("value"));
            tx.send(Ok(Frame::trailers(trailers))).await.expect("send");
            drop(tx);
            let rsp = rsp.await.expect("response");
            assert_eq!(rsp.status(), StatusCode::OK);
            let task = rsp.headers()["task"].to_str().expect("task").to_string();
            assert!(rsp.headers().get("connection").is_none());
            assert!(rsp.headers().get("keep-alive").is_none());
            let body = rsp.into_body().collect().await.expect("body");
            let status = body.trailers().and_then(|t| t.get("grpc-status")).cloned();
            assert_eq!(status, Some(i.to_string().parse().expect("value")));
            assert_eq!(body.to_bytes(), format!("request {i} request {i} "));
            task
        }));
    }
    let mut ran_in = std::collections::HashSet::new();
    for t in all {
        ran_in.insert(t.await.expect("stream"));
    }
    assert_eq!(ran_in.len(), tasks, "{ran_in:?}");
}

#[tokio::test]
async fn streams_run_in_the_connections_task() {
    echoes_concurrent_streams_with_trailers(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_run_in_tasks_of_their_own_on_several_workers() {
    echoes_concurrent_streams_with_trailers(40).await;
}

/// Bodies larger than the windows, both ways: the request body's window is
/// released as the handler reads it.
#[tokio::test]
async fn bodies_larger_than_the_windows_flow_both_ways() {
    let (addr, _) = server(echo).await;
    let mut send = client(addr).await;
    let (mut tx, body) = streamed();
    let rsp = send.send_request(post(body));
    const PIECE: usize = 64 * 1024;
    const PIECES: usize = 96; // 6 MiB
    let feed = tokio::spawn(async move {
        for i in 0..PIECES {
            let piece = Bytes::from(vec![(i % 251) as u8; PIECE]);
            tx.send(Ok(Frame::data(piece))).await.expect("send");
        }
    });
    let echoed = async {
        let rsp = rsp.await.expect("response");
        let mut body = rsp.into_body();
        let mut got = Vec::with_capacity(PIECE * PIECES);
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.expect("frame").into_data() {
                got.extend_from_slice(&data);
            }
        }
        got
    };
    // (A window never released would stall it for good.)
    let got = tokio::time::timeout(Duration::from_secs(30), echoed)
        .await
        .expect("stalled");
    feed.await.expect("feed");
    assert_eq!(got.len(), PIECE * PIECES);
    assert!(got
        .chunks(PIECE)
        .enumerate()
        .all(|(i, c)| c.iter().all(|b| *b == (i % 251) as u8)));
}

/// A handler that panics takes its own stream down, not the connection's
/// other streams (which share its task on this runtime).
#[tokio::test]
async fn a_panicking_stream_is_reset_alone() {
    let (addr, mut ended) = server(|req: Request<Body>| async move {
        if req.uri().path() == "/panic" {
            panic!("a handler's bug");
        }
        echo(req).await
    })
    .await;
    let mut send = client(addr).await;
    let (mut tx, body) = streamed();
    let open = send.send_request(post(body));
    let open = tokio::spawn(open);
    let panicked = send
        .send_request(
            Request::post("http://test.local/panic")
                .body(crate::http::empty())
                .expect("request"),
        )
        .await;
    assert!(panicked.is_err(), "{panicked:?}");
    tx.send(Ok(Frame::data(Bytes::from_static(b"still here"))))
        .await
        .expect("send");
    drop(tx);
    let rsp = open.await.expect("task").expect("response");
    let body = rsp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(body, "still here");
    // The connection still takes new streams.
    let rsp = send
        .send_request(post(crate::http::whole(Bytes::from_static(b"next"))))
        .await
        .expect("response");
    let body = rsp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(body, "next");
    assert!(ended.try_recv().is_err(), "the connection ended");
}

/// A response body whose length is known gets its `content-length`; an
/// empty one ends the stream with the head.
#[tokio::test]
async fn a_known_length_is_sent_and_an_empty_body_ends_with_the_head() {
    let (addr, _) = server(|req: Request<Body>| async move {
        let body = if req.uri().path() == "/empty" {
            Bytes::new()
        } else {
            Bytes::from_static(b"twelve bytes")
        };
        Response::new(boxed(Full::new(body)))
    })
    .await;
    let mut send = client(addr).await;
    let get = |path: &str| {
        Request::get(format!("http://test.local{path}"))
            .body(crate::http::empty())
            .expect("request")
    };
    let rsp = send.send_request(get("/full")).await.expect("response");
    assert_eq!(rsp.headers()["content-length"], "12");
    let date = rsp.headers()["date"].to_str().expect("date");
    httpdate::parse_http_date(date).expect("an HTTP date");
    let rsp = send.send_request(get("/empty")).await.expect("response");
    assert!(rsp.body().is_end_stream());
}

/// A client that resets its stream while the response is awaited cancels
/// the request: the handler's future is dropped, and the connection
/// serves on.
#[tokio::test]
async fn a_stream_reset_by_the_client_drops_its_request() {
    let (dropped_tx, dropped) = signal();
    let (addr, _) = server(move |req: Request<Body>| {
        let dropped_tx = dropped_tx.clone();
        async move {
            if req.uri().path() == "/hang" {
                let _guard = OnDrop(dropped_tx);
                std::future::pending::<()>().await;
            }
            Response::new(crate::http::empty())
        }
    })
    .await;
    let (mut h2, _conn) = h2_client(addr).await;
    let (response, mut stream) = h2.send_request(get_head("/hang"), true).expect("send");
    tokio::time::sleep(Duration::from_millis(50)).await;
    stream.send_reset(h2::Reason::CANCEL);
    tokio::time::timeout(Duration::from_secs(5), dropped)
        .await
        .expect("the handler's future was not dropped")
        .expect("dropped");
    assert!(response.await.is_err());
    let mut h2 = h2.ready().await.expect("ready");
    let (response, _) = h2.send_request(get_head("/next"), true).expect("send");
    let rsp = response.await.expect("response");
    assert_eq!(rsp.status(), StatusCode::OK);
}

/// A client that resets its stream while the response body streams stops
/// it: the body is dropped.
#[tokio::test]
async fn a_stream_reset_during_the_body_drops_the_body() {
    let (dropped_tx, dropped) = signal();
    let (addr, _) = server(move |_req: Request<Body>| {
        let (mut tx, body) = streamed();
        let dropped_tx = dropped_tx.lock().expect("lock").take();
        tokio::spawn(async move {
            // Pieces until the body is gone (a send then fails).
            while tx
                .send(Ok(Frame::data(Bytes::from_static(b"more"))))
                .await
                .is_ok()
            {}
            if let Some(d) = dropped_tx {
                let _ = d.send(());
            }
        });
        async move { Response::new(body) }
    })
    .await;
    let (mut h2, _conn) = h2_client(addr).await;
    let (response, mut stream) = h2.send_request(get_head("/endless"), true).expect("send");
    let mut body = response.await.expect("response").into_body();
    body.data().await.expect("data").expect("data");
    stream.send_reset(h2::Reason::CANCEL);
    tokio::time::timeout(Duration::from_secs(5), dropped)
        .await
        .expect("the body was not dropped")
        .expect("dropped");
}

/// A client that goes away with a stream in flight ends the connection
/// (a close between frames as a clean end, a reset or a cut frame as an
/// error, as with hyper) and drops the request it left.
#[tokio::test]
async fn a_client_that_goes_away_drops_its_requests() {
    let (dropped_tx, dropped) = signal();
    let (running_tx, running) = signal();
    let (addr, mut ended) = server(move |_req: Request<Body>| {
        let dropped_tx = dropped_tx.clone();
        let running_tx = running_tx.lock().expect("lock").take();
        async move {
            let _guard = OnDrop(dropped_tx);
            if let Some(tx) = running_tx {
                let _ = tx.send(());
            }
            std::future::pending::<Response<Body>>().await
        }
    })
    .await;
    // With a request in flight: the socket closed under it.
    let (mut h2, conn) = h2_client(addr).await;
    let (_response, _stream) = h2.send_request(get_head("/hang"), true).expect("send");
    running.await.expect("the request is being answered");
    conn.abort();
    tokio::time::timeout(Duration::from_secs(5), dropped)
        .await
        .expect("the request was not dropped")
        .expect("dropped");
    let r = tokio::time::timeout(Duration::from_secs(5), ended.recv()).await;
    assert!(r.is_ok(), "the connection did not end");
}

/// A one-shot signal the handler's calls share: whichever takes the
/// sender first fires it.
type Signal = std::sync::Arc<std::sync::Mutex<Option<oneshot::Sender<()>>>>;

fn signal() -> (Signal, oneshot::Receiver<()>) {
    let (tx, rx) = oneshot::channel();
    (std::sync::Arc::new(std::sync::Mutex::new(Some(tx))), rx)
}

/// An `h2` client connection to `addr` (its streams reset at will), and
/// the task driving it.
async fn h2_client(
    addr: SocketAddr,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (h2, conn) = h2::client::handshake(tcp).await.expect("handshake");
    (h2, tokio::spawn(conn))
}

/// The head of a GET of `path`.
fn get_head(path: &str) -> Request<()> {
    Request::get(format!("http://test.local{path}"))
        .body(())
        .expect("request")
}

/// Fires its signal when dropped (a handler's future cancelled).
struct OnDrop(Signal);

impl Drop for OnDrop {
    fn drop(&mut self) {
        if let Some(tx) = self.0.lock().expect("lock").take() {
            let _ = tx.send(());
        }
    }
}

/// A response body that fails resets the stream: the client never takes
/// what it got for the whole body.
#[tokio::test]
async fn a_failed_response_body_resets_the_stream() {
    let (addr, _) = server(|_req: Request<Body>| async move {
        let (mut tx, body) = streamed();
        tokio::spawn(async move {
            let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"part")))).await;
            let _ = tx.send(Err("upstream went away".into())).await;
        });
        Response::new(body)
    })
    .await;
    let mut send = client(addr).await;
    let rsp = send
        .send_request(post(crate::http::empty()))
        .await
        .expect("response head");
    let error = rsp.into_body().collect().await.expect_err("a whole body");
    let reason = error
        .source()
        .and_then(|e| e.downcast_ref::<h2::Error>())
        .and_then(h2::Error::reason);
    assert_eq!(reason, Some(h2::Reason::INTERNAL_ERROR), "{error:?}");
}

/// After a graceful shutdown the open stream finishes, a new one is
/// refused, and the connection then ends cleanly.
#[tokio::test]
async fn a_graceful_shutdown_lets_open_streams_finish() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (release_tx, release) = oneshot::channel::<()>();
    let release = std::sync::Arc::new(tokio::sync::Mutex::new(Some(release)));
    let (started_tx, started) = oneshot::channel::<()>();
    let started_tx = std::sync::Mutex::new(Some(started_tx));
    let handle = move |_req: Request<Body>| {
        let release = release.clone();
        if let Some(tx) = started_tx.lock().expect("lock").take() {
            let _ = tx.send(());
        }
        async move {
            let rx = release.lock().await.take();
            if let Some(rx) = rx {
                let _ = rx.await;
            }
            Response::new(crate::http::whole(Bytes::from_static(b"finished")))
        }
    };
    let served = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut conn: Connection<TcpStream> = handshake(tcp, SETTINGS).await.expect("handshake");
        tokio::select! {
            r = conn.serve(&handle) => panic!("ended before the shutdown: {r:?}"),
            _ = started => {}
        }
        conn.graceful_shutdown();
        conn.serve(&handle).await
    });
    let mut send = client(addr).await;
    let first = send.send_request(post(crate::http::empty()));
    let first = tokio::spawn(first);
    // Once the shutdown's GOAWAY has reached the client, a new stream is
    // refused (those sent before it arrived are answered).
    let mut refused = false;
    for _ in 0..250 {
        if send.send_request(post(crate::http::empty())).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "streams still taken 5 s after the GOAWAY");
    release_tx.send(()).expect("release");
    let rsp = first.await.expect("task").expect("response");
    let body = rsp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(body, "finished");
    let ended = tokio::time::timeout(Duration::from_secs(5), served)
        .await
        .expect("still serving")
        .expect("task");
    assert!(ended.is_ok(), "{ended:?}");
}

/// Frames that break the protocol end the connection with GOAWAY, as an
/// error this side found.
#[tokio::test]
async fn a_protocol_violation_is_an_error_of_this_side() {
    let (addr, mut ended) = server(echo).await;
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // SETTINGS, then a DATA frame on stream 0, which no DATA may use.
    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    hello.extend_from_slice(&[0, 0, 1, 0, 0, 0, 0, 0, 0, b'x']);
    tcp.write_all(&hello).await.expect("write");
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut sink)).await;
    let r = ended.recv().await.expect("outcome");
    match r {
        Err(ServeError::H2(e)) => {
            assert!(e.is_go_away() && e.is_library(), "{e:?}");
            assert_eq!(e.reason(), Some(h2::Reason::PROTOCOL_ERROR));
        }
        other => panic!("{other:?}"),
    }
}

/// A client that completes the handshake and then answers nothing is
/// closed once a ping has gone unanswered.
#[tokio::test]
async fn a_client_that_stops_answering_pings_is_closed() {
    let (server_io, mut client_io) = tokio::io::duplex(64 * 1024);
    let settings = Settings {
        keepalive: Duration::from_millis(200),
        ..SETTINGS
    };
    let served = tokio::spawn(async move {
        let mut conn = handshake(server_io, settings).await?;
        conn.serve(&echo).await
    });
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    hello.extend_from_slice(&[0, 0, 0, 4, 1, 0, 0, 0, 0]);
    client_io.write_all(&hello).await.expect("write");
    let ended = tokio::time::timeout(Duration::from_secs(5), served)
        .await
        .expect("still open")
        .expect("task");
    assert!(
        matches!(ended, Err(ServeError::PingTimeout(_))),
        "{ended:?}"
    );
}
