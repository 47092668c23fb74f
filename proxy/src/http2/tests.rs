use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use futures::channel::{mpsc, oneshot};
use futures::SinkExt;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

use super::{handshake, send, Sender};
use crate::http::{boxed, Body, BoxError};

/// An HTTP/2 server (hyper's) answering every request with `handle`.
async fn server<F, Fut>(handle: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let handle = handle.clone();
            let svc = hyper::service::service_fn(move |req| {
                let rsp = handle(req);
                async move { Ok::<_, Infallible>(rsp.await) }
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc),
            );
        }
    });
    addr
}

/// Answers with the request's own body, frame by frame, trailers included.
async fn echo(req: Request<Incoming>) -> Response<Body> {
    Response::new(boxed(req.into_body()))
}

async fn client(addr: SocketAddr) -> Sender {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    handshake(tcp, 64 * 1024, super::Keepalive::Ping, addr.to_string())
        .await
        .expect("handshake")
}

fn request(body: Body) -> Request<Body> {
    Request::builder()
        .method("POST")
        .uri("http://test.local/echo")
        .version(http::Version::HTTP_2)
        .body(body)
        .expect("request")
}

/// A body fed frame by frame from the test.
fn channel_body() -> (mpsc::Sender<Result<Frame<Bytes>, BoxError>>, Body) {
    let (tx, rx) = mpsc::channel(1);
    (tx, boxed(StreamBody::new(rx)))
}

#[tokio::test]
async fn bodies_larger_than_every_window_arrive_whole() {
    let addr = server(echo).await;
    let mut sender = client(addr).await;
    // Over the connection window (5 MiB) and the stream window (2 MiB)
    // both ways; not a multiple of the frame size.
    let data: Bytes = (0..6 * 1024 * 1024 + 7).map(|i| (i % 251) as u8).collect();
    let rsp = send(&mut sender, request(boxed(Full::new(data.clone()))))
        .await
        .expect("response");
    let got = rsp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "the echoed body differs");
}

#[tokio::test]
async fn a_request_body_keeps_streaming_after_the_response_head() {
    let addr = server(echo).await;
    let mut sender = client(addr).await;
    let (mut tx, body) = channel_body();
    tx.send(Ok(Frame::data(Bytes::from_static(b"one"))))
        .await
        .expect("first");
    // The response head comes back while the request is still open.
    let rsp = send(&mut sender, request(body)).await.expect("response");
    let mut rsp = rsp.into_body();
    let first = rsp.frame().await.expect("frame").expect("ok");
    assert_eq!(first.into_data().expect("data"), "one");
    // Each later piece is echoed before the next is sent: a conversation,
    // as a gRPC bidirectional stream would have.
    tx.send(Ok(Frame::data(Bytes::from_static(b"two"))))
        .await
        .expect("second");
    let second = rsp.frame().await.expect("frame").expect("ok");
    assert_eq!(second.into_data().expect("data"), "two");
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().expect("value"));
    tx.send(Ok(Frame::trailers(trailers)))
        .await
        .expect("trailers");
    drop(tx);
    let last = rsp.frame().await.expect("frame").expect("ok");
    let echoed = last.into_trailers().expect("the request's trailers echoed");
    assert_eq!(echoed["grpc-status"], "0");
    assert!(rsp.frame().await.is_none());
}

#[tokio::test]
async fn a_request_body_that_fails_resets_the_stream() {
    // The server reports when the request's first piece has arrived, then
    // what became of the rest.
    let (first_tx, first_rx) = oneshot::channel::<()>();
    let (seen_tx, seen_rx) = oneshot::channel::<Result<usize, String>>();
    let slots = std::sync::Arc::new(std::sync::Mutex::new(Some((first_tx, seen_tx))));
    let addr = server(move |req: Request<Incoming>| {
        let slots = slots.clone();
        async move {
            let Some((first_tx, seen_tx)) = slots.lock().expect("lock").take() else {
                return Response::new(crate::http::empty());
            };
            let mut body = req.into_body();
            let _ = body.frame().await;
            let _ = first_tx.send(());
            let rest = body
                .collect()
                .await
                .map(|c| c.to_bytes().len())
                .map_err(|e| e.to_string());
            let _ = seen_tx.send(rest);
            Response::new(crate::http::empty())
        }
    })
    .await;
    let mut sender = client(addr).await;
    let (mut tx, body) = channel_body();
    tx.send(Ok(Frame::data(Bytes::from_static(b"partial"))))
        .await
        .expect("data");
    let mut first = sender.clone();
    let sent = tokio::spawn(async move { send(&mut first, request(body)).await });
    first_rx.await.expect("the server saw the request");
    tx.send(Err("the client went away".into()))
        .await
        .expect("error");
    let sent = sent.await.expect("joined");
    assert!(sent.is_err(), "no response to a request that was cut off");
    let seen = seen_rx.await.expect("the server saw the end");
    assert!(
        seen.is_err(),
        "a cut-off body must not look whole: {seen:?}"
    );
    // The connection still serves other requests.
    let rsp = send(
        &mut sender,
        request(boxed(Full::new(Bytes::from_static(b"x")))),
    )
    .await
    .expect("response");
    assert_eq!(rsp.status(), 200);
}

#[tokio::test]
async fn response_trailers_and_length_are_kept() {
    let addr = server(|_req: Request<Incoming>| async move {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "7".parse().expect("value"));
        let frames = futures::stream::iter(vec![
            Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"hello"))),
            Ok(Frame::trailers(trailers)),
        ]);
        Response::new(boxed(StreamBody::new(frames)))
    })
    .await;
    let mut sender = client(addr).await;
    let rsp = send(&mut sender, request(crate::http::empty()))
        .await
        .expect("response");
    let collected = rsp.into_body().collect().await.expect("body");
    assert_eq!(collected.trailers().expect("trailers")["grpc-status"], "7");
    assert_eq!(collected.to_bytes(), "hello");

    let addr = server(|_req: Request<Incoming>| async move {
        let mut rsp = Response::new(boxed(Full::new(Bytes::from_static(b"12345"))));
        rsp.headers_mut()
            .insert(http::header::CONTENT_LENGTH, "5".parse().expect("value"));
        rsp
    })
    .await;
    let mut sender = client(addr).await;
    let rsp = send(&mut sender, request(crate::http::empty()))
        .await
        .expect("response");
    use hyper::body::Body as _;
    assert_eq!(rsp.body().size_hint().exact(), Some(5));
    // A HEAD response: the length, and no body.
    let mut head = request(crate::http::empty());
    *head.method_mut() = http::Method::HEAD;
    let rsp = send(&mut sender, head).await.expect("response");
    assert_eq!(rsp.headers()["content-length"], "5");
    assert_eq!(rsp.body().size_hint().exact(), Some(0));
}

#[tokio::test]
async fn a_closed_connection_is_not_ready() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (closed_tx, closed_rx) = oneshot::channel();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let svc =
            hyper::service::service_fn(|req| async move { Ok::<_, Infallible>(echo(req).await) });
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(tcp), svc);
        // Serve the handshake for a moment, then close (the connection
        // future is dropped with the timeout).
        let _ = tokio::time::timeout(std::time::Duration::from_millis(200), conn).await;
        let _ = closed_tx.send(());
    });
    let sender = client(addr).await;
    closed_rx.await.expect("closed");
    let ready = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        loop {
            match sender.clone().ready().await {
                Err(_) => return,
                Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        }
    })
    .await;
    assert!(ready.is_ok(), "a closed connection kept reporting ready");
}

#[tokio::test]
async fn the_pool_forgets_ended_connections_when_it_dials() {
    // A server that closes each connection after 200 ms, and one that
    // keeps them.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let brief = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let svc =
                hyper::service::service_fn(
                    |req| async move { Ok::<_, Infallible>(echo(req).await) },
                );
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc);
            tokio::spawn(tokio::time::timeout(
                std::time::Duration::from_millis(200),
                conn,
            ));
        }
    });
    let lasting = server(echo).await;
    let pool = super::Pool::<SocketAddr>::default();
    let pooled = || pool.conns.lock().expect("lock").len();
    let closed = || {
        pool.conns
            .lock()
            .expect("lock")
            .get(&brief)
            .map(super::is_closed)
    };
    let dial = |addr| async move { Ok::<_, std::convert::Infallible>(client(addr).await) };
    pool.get(&brief, || dial(brief)).await.expect("brief");
    assert_eq!(pooled(), 1);
    // Once the first connection has ended, the next dial sweeps it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while closed() == Some(false) {
        assert!(std::time::Instant::now() < deadline, "never closed");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    pool.get(&lasting, || dial(lasting)).await.expect("lasting");
    assert_eq!(pooled(), 1, "the ended connection is forgotten");
    // A live one stays: asking again reuses it.
    pool.get(&lasting, || async { panic!("dialed again") })
        .await
        .map(|_| ())
        .unwrap_or_else(|never: std::convert::Infallible| match never {});
    assert_eq!(pooled(), 1);
}
