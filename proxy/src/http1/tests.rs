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
                        // Announced, or hyper's server leaves them out.
                        let mut rsp =
                            Response::new(boxed(StreamBody::new(futures::stream::iter(frames))));
                        rsp.headers_mut()
                            .insert("trailer", "grpc-status".parse().expect("value"));
                        rsp
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
    let mut trailers = None;
    while let Some(frame) = b.frame().await {
        if let Ok(t) = frame.expect("ok").into_trailers() {
            trailers = Some(t);
            break;
        }
    }
    assert_eq!(trailers.expect("trailers")["grpc-status"], "0");
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

/// A server answering each request head it reads, on any connection, with
/// the next of `answers` (raw bytes), then closing the connection if that
/// answer says so. Counts the connections it accepted.
async fn scripted(answers: Vec<(&'static [u8], bool)>) -> (SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let answers = Arc::new(answers);
    let next = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let (answers, next) = (answers.clone(), next.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        let mut chunk = [0u8; 1024];
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0);
                    buf.drain(..end + 4);
                    let Some(&(answer, close)) = answers.get(next.fetch_add(1, Ordering::SeqCst))
                    else {
                        return;
                    };
                    if tcp.write_all(answer).await.is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

fn wire_error(err: &super::Http1Error) -> &super::WireError {
    match err {
        super::Http1Error::Wire { source, .. } => source,
        other => panic!("not a response error: {other}"),
    }
}

#[tokio::test]
async fn a_request_with_a_body_takes_a_connection_over_for_hyper() {
    let (addr, accepted) = server().await;
    let pool = pool(8, Duration::from_secs(30));
    let rsp = pool.send(addr, get("/")).await.expect("response");
    assert_eq!(body(rsp).await, "ok");
    for _ in 0..2 {
        let post = Request::post("/")
            .header("host", "app.local")
            .header("content-length", "5")
            .body(crate::http::whole(Bytes::from_static(b"hello")))
            .expect("request");
        let rsp = pool.send(addr, post).await.expect("response");
        assert_eq!(body(rsp).await, "ok");
        let rsp = pool.send(addr, get("/")).await.expect("response");
        assert_eq!(body(rsp).await, "ok");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection for all");
}

#[tokio::test]
async fn bodies_are_framed_by_length_chunks_or_the_close() {
    let (addr, accepted) = scripted(vec![
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", false),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", false),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 11\r\n\r\n", false),
        (b"HTTP/1.1 200 OK\r\n\r\nuntil the end", true),
        (b"HTTP/1.1 204 No Content\r\n\r\n", false),
    ])
    .await;
    let pool = pool(8, Duration::from_secs(30));
    let rsp = pool.send(addr, get("/")).await.expect("response");
    assert_eq!(body(rsp).await, "ok", "the interim response is skipped");
    let head = Request::head("/")
        .header("host", "app.local")
        .body(crate::http::empty())
        .expect("request");
    let rsp = pool.send(addr, head).await.expect("response");
    assert_eq!(rsp.headers()["content-length"], "5");
    assert!(rsp.body().is_end_stream(), "no body after HEAD");
    let rsp = pool.send(addr, get("/")).await.expect("response");
    let collected = rsp.into_body().collect().await.expect("body");
    assert_eq!(collected.trailers().expect("trailers")["x-sum"], "11");
    assert_eq!(collected.to_bytes(), "hello world");
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "all kept alive so far");
    let rsp = pool.send(addr, get("/")).await.expect("response");
    assert_eq!(body(rsp).await, "until the end");
    assert_eq!(idle(&pool, addr), 0, "not pooled");
    let rsp = pool.send(addr, get("/")).await.expect("response");
    assert_eq!(rsp.status(), http::StatusCode::NO_CONTENT);
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "a body that ends at the close ends its connection"
    );
}

#[tokio::test]
async fn a_broken_response_is_an_error_and_its_connection_is_not_reused() {
    let (addr, accepted) = scripted(vec![
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", false),
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokEXTRA",
            false,
        ),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\ncut", true),
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhelloX",
            false,
        ),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", false),
    ])
    .await;
    let pool = pool(8, Duration::from_secs(30));
    let err = pool.send(addr, get("/")).await.expect_err("not HTTP");
    assert!(
        matches!(wire_error(&err), super::WireError::Head(_)),
        "{err}"
    );
    // The answer is whole, but more follows it: the connection is not
    // trusted with another request.
    let rsp = pool.send(addr, get("/")).await.expect("response");
    assert_eq!(body(rsp).await, "ok");
    let rsp = pool.send(addr, get("/")).await.expect("response");
    let err = rsp.into_body().collect().await.expect_err("cut short");
    assert!(err.to_string().contains("closed before"), "{err}");
    let rsp = pool.send(addr, get("/")).await.expect("response");
    let err = rsp.into_body().collect().await.expect_err("bad chunk");
    assert!(err.to_string().contains("chunked"), "{err}");
    let rsp = pool.send(addr, get("/")).await.expect("response");
    assert_eq!(body(rsp).await, "ok");
    assert_eq!(accepted.load(Ordering::SeqCst), 5, "a connection each");
}

#[tokio::test]
async fn a_connection_closed_while_idle_is_not_used_again() {
    // The upstream closes each connection after its answer without saying
    // so: the pool finds out before writing the next request there.
    let ok: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
    let (addr, accepted) = scripted(vec![(ok, true), (ok, true), (ok, true)]).await;
    let pool = pool(8, Duration::from_secs(30));
    for _ in 0..3 {
        let rsp = pool.send(addr, get("/")).await.expect("response");
        assert_eq!(body(rsp).await, "ok");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
}

/// A request whose write fails on a reused connection that passed the
/// idle probe (its upstream reset it just after, say) goes out again on a
/// new connection: the upstream cannot have acted on a request it never
/// received whole.
#[tokio::test]
async fn a_request_a_reused_connection_fails_to_take_goes_out_on_a_new_one() {
    let (addr, accepted) = server().await;
    let pool = pool(8, Duration::from_secs(30));
    let rsp = pool.send(addr, get("/")).await.expect("response");
    assert_eq!(body(rsp).await, "ok");
    // The idle connection's sending side shut: a write fails (EPIPE) while
    // a read still finds nothing. (The server's task, on this same thread,
    // does not run to answer the FIN before the pool has probed and
    // written.)
    {
        let conns = pool.0.idle.lock().expect("lock");
        let idle = conns
            .by_addr
            .get(&crate::net::Target::from(addr))
            .and_then(|c| c.front())
            .expect("an idle connection");
        let super::Conn::Wire(wire) = &idle.conn else {
            panic!("not a connection of the wire path");
        };
        socket2::SockRef::from(&wire.tcp)
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
        // Taken by the probe: the write is what fails.
        assert!(wire.is_usable());
    }
    let rsp = pool.send(addr, get("/again")).await.expect("response");
    assert_eq!(body(rsp).await, "ok");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn idle_connections_are_swept_without_traffic() {
    // The upstream closes its first connection after answering, keeps
    // the second: with no request to find out, the sweeper lets the
    // closed one go, and later the expired one.
    let ok: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
    let (closing, _) = scripted(vec![(ok, true)]).await;
    let (keeping, _) = scripted(vec![(ok, false)]).await;
    // Swept every 500 ms.
    let pool = pool(8, Duration::from_secs(2));
    for addr in [closing, keeping] {
        let rsp = pool.send(addr, get("/")).await.expect("response");
        assert_eq!(body(rsp).await, "ok");
        assert_eq!(idle(&pool, addr), 1);
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(idle(&pool, closing), 0, "closed by its upstream");
    assert_eq!(idle(&pool, keeping), 1, "not expired yet");
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert_eq!(idle(&pool, keeping), 0, "expired");
    assert!(
        !pool.0.idle.lock().expect("lock").sweeping,
        "the sweeper stops with nothing left to sweep"
    );
}
