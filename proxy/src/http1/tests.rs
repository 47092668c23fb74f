use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Body as _, Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::{Pool, PoolConfig};
use crate::http::{boxed, Body};

/// An HTTP/1.1 server counting the connections it accepted. `/close`
/// answers with `Connection: close`; `/big` streams a large body (chunked),
/// `/sized` sends one with a length; anything
/// else gets a short answer.
async fn server() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                let rsp: Response<Body> = match req.uri().path() {
                    "/close" => Response::builder()
                        .header("connection", "close")
                        .body(boxed(Full::new(Bytes::from_static(b"bye"))))
                        .expect("response"),
                    "/trailers" => {
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", "0".parse().expect("value"));
                        let frames = vec![
                            Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"t"))),
                            Ok(Frame::trailers(trailers)),
                        ];
                        Response::new(boxed(StreamBody::new(futures::stream::iter(frames))))
                    }
                    "/sized" => {
                        Response::new(boxed(Full::new(Bytes::from(vec![b'y'; 256 * 1024]))))
                    }
                    "/big" => {
                        let chunks = (0..64).map(|_| {
                            Ok::<_, Infallible>(Frame::data(Bytes::from(vec![b'x'; 64 * 1024])))
                        });
                        Response::new(boxed(StreamBody::new(futures::stream::iter(chunks))))
                    }
                    _ => Response::new(boxed(Full::new(Bytes::from_static(b"ok")))),
                };
                Ok::<_, Infallible>(rsp)
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc),
            );
        }
    });
    (addr, accepted)
}

fn pool(max_idle: usize, idle_timeout: Duration) -> Pool {
    Pool::new(PoolConfig {
        max_idle,
        idle_timeout,
        connect_timeout: Duration::from_secs(1),
    })
}

fn get(path: &str) -> Request<Body> {
    Request::builder()
        .uri(path)
        .header("host", "app.local")
        .body(crate::http::empty())
        .expect("request")
}

async fn body(rsp: Response<Body>) -> Bytes {
    rsp.into_body().collect().await.expect("body").to_bytes()
}

fn idle(pool: &Pool, addr: SocketAddr) -> usize {
    pool.0
        .idle
        .lock()
        .expect("lock")
        .by_addr
        .get(&crate::net::Target::from(addr))
        .map_or(0, |c| c.len())
}

#[tokio::test]
async fn a_connection_is_reused_once_its_response_is_read() {
    let (addr, accepted) = server().await;
    let pool = pool(8, Duration::from_secs(30));
    for _ in 0..5 {
        let rsp = pool.send(addr, get("/")).await.expect("response");
        assert_eq!(body(rsp).await, "ok");
    }
    // A body read frame by frame to its last one, as a server relaying it
    // would, without a final poll.
    let rsp = pool.send(addr, get("/sized")).await.expect("response");
    let mut b = rsp.into_body();
    let mut n = 0;
    while !b.is_end_stream() {
        n += b
            .frame()
            .await
            .expect("frame")
            .expect("ok")
            .into_data()
            .map_or(0, |d| d.len());
    }
    drop(b);
    assert_eq!(n, 256 * 1024);
    // A chunked one that may end in trailers, read up to them (a relay
    // stops there).
    let mut req = get("/trailers");
    req.headers_mut()
        .insert("te", "trailers".parse().expect("value"));
    let rsp = pool.send(addr, req).await.expect("response");
    let mut b = rsp.into_body();
    while let Some(frame) = b.frame().await {
        if frame.expect("ok").is_trailers() {
            break;
        }
    }
    drop(b);
    // A chunked one, read to its end.
    let rsp = pool.send(addr, get("/big")).await.expect("response");
    assert_eq!(body(rsp).await.len(), 64 * 64 * 1024);
    let rsp = pool.send(addr, get("/")).await.expect("response");
    assert_eq!(body(rsp).await, "ok");
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection for all");
}

#[tokio::test]
async fn a_response_dropped_halfway_takes_its_connection_along() {
    let (addr, accepted) = server().await;
    let pool = pool(8, Duration::from_secs(30));
    let rsp = pool.send(addr, get("/big")).await.expect("response");
    let mut b = rsp.into_body();
    let _ = b.frame().await;
    drop(b);
    assert_eq!(idle(&pool, addr), 0, "a half-read connection is not pooled");
    let rsp = pool.send(addr, get("/")).await.expect("response");
    assert_eq!(body(rsp).await, "ok");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_connection_the_upstream_closes_is_not_used_again() {
    let (addr, accepted) = server().await;
    let pool = pool(8, Duration::from_secs(30));
    let rsp = pool.send(addr, get("/close")).await.expect("response");
    assert_eq!(body(rsp).await, "bye");
    for _ in 0..3 {
        let rsp = pool.send(addr, get("/")).await.expect("response");
        assert_eq!(body(rsp).await, "ok");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn idle_connections_are_bounded_and_expire() {
    let (addr, accepted) = server().await;
    let pool = pool(2, Duration::from_millis(300));
    // Four at once: four connections, two kept.
    let responses = futures::future::join_all((0..4).map(|_| pool.send(addr, get("/big")))).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 4);
    for rsp in responses {
        assert_eq!(body(rsp.expect("response")).await.len(), 64 * 64 * 1024);
    }
    assert_eq!(idle(&pool, addr), 2);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let rsp = pool.send(addr, get("/")).await.expect("response");
    assert_eq!(body(rsp).await, "ok");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        5,
        "expired ones are not used"
    );
    assert_eq!(idle(&pool, addr), 1, "expired ones are dropped");
}

#[tokio::test]
async fn a_refused_connection_is_a_connect_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let pool = pool(8, Duration::from_secs(30));
    let err = pool.send(addr, get("/")).await.expect_err("nobody listens");
    assert!(matches!(err, super::Http1Error::Connect { .. }), "{err}");
}

/// A target whose address refuses is served by its fallback, and the
/// connection is pooled for that target only: a request to the bare
/// address (which allows no fallback) never rides it.
#[tokio::test]
async fn a_fallback_connection_serves_its_own_target_only() {
    let (open, accepted) = server().await;
    // Bound, not listening: it refuses, and no other test can take it.
    let reserved = tokio::net::TcpSocket::new_v4().expect("socket");
    reserved
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let closed = reserved.local_addr().expect("addr");
    let pool = pool(8, Duration::from_secs(30));
    let target = crate::net::Target {
        addr: closed,
        fallback: Some(open),
    };
    for _ in 0..3 {
        let rsp = pool.send(target, get("/")).await.expect("via the fallback");
        assert_eq!(body(rsp).await, "ok");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "one pooled connection");
    let err = pool
        .send(closed, get("/"))
        .await
        .expect_err("the bare address refuses");
    assert!(matches!(err, super::Http1Error::Connect { .. }), "{err}");
    assert!(err.to_string().contains(&closed.to_string()), "{err}");
    let err = pool
        .send(
            crate::net::Target {
                addr: closed,
                fallback: Some(closed),
            },
            get("/"),
        )
        .await
        .expect_err("both refuse");
    assert!(err.to_string().contains("(else "), "both named: {err}");
}

#[tokio::test]
async fn connections_to_addresses_no_longer_used_are_swept() {
    let (a, _) = server().await;
    let (b, _) = server().await;
    let pool = pool(8, Duration::from_millis(200));
    let rsp = pool.send(a, get("/")).await.expect("response");
    assert_eq!(body(rsp).await, "ok");
    assert_eq!(idle(&pool, a), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rsp = pool.send(b, get("/")).await.expect("response");
    assert_eq!(body(rsp).await, "ok");
    assert!(
        !pool
            .0
            .idle
            .lock()
            .expect("lock")
            .by_addr
            .contains_key(&crate::net::Target::from(a)),
        "the expired address is forgotten"
    );
    assert_eq!(idle(&pool, b), 1);
}
