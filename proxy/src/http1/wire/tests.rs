use bytes::{Bytes, BytesMut};
use http::{Method, Request, StatusCode, Version};
use proptest::prelude::*;

use super::{
    encode_request, parse_head, suits, Chunked, Decoded, Framing, Head, Parsed, WireError,
};

fn encoded(req: Request<()>) -> String {
    let (parts, ()) = req.into_parts();
    let mut dst = Vec::new();
    encode_request(&parts, &mut dst);
    String::from_utf8(dst).expect("ascii")
}

fn head(bytes: &[u8], method: &Method) -> Head {
    match parse_head(bytes, method) {
        Ok(Parsed::Final(len, head)) => {
            assert_eq!(len, bytes.len(), "the whole head is taken");
            head
        }
        other => panic!("not a final head: {other:?}"),
    }
}

fn get(bytes: &[u8]) -> Head {
    head(bytes, &Method::GET)
}

fn refused(bytes: &[u8]) -> WireError {
    match parse_head(bytes, &Method::GET) {
        Err(e) => e,
        Ok(p) => panic!("taken: {p:?}"),
    }
}

#[test]
fn a_request_head_is_origin_form_http11_with_its_fields() {
    let req = Request::get("/a/b?c=d")
        .header("host", "app.local")
        .header("accept", "text/plain")
        .header("accept", "text/html")
        .body(())
        .expect("request");
    assert_eq!(
        encoded(req),
        "GET /a/b?c=d HTTP/1.1\r\nhost: app.local\r\naccept: text/plain\r\naccept: text/html\r\n\r\n"
    );
    let req = Request::delete("http://app.local")
        .body(())
        .expect("request");
    assert_eq!(encoded(req), "DELETE / HTTP/1.1\r\n\r\n");
    let req = Request::get("http://app.local?x=1")
        .body(())
        .expect("request");
    assert_eq!(encoded(req), "GET /?x=1 HTTP/1.1\r\n\r\n");
    let req = Request::get("/")
        .version(Version::HTTP_10)
        .body(())
        .expect("request");
    assert_eq!(encoded(req), "GET / HTTP/1.0\r\n\r\n");
}

#[test]
fn an_empty_post_says_its_length_is_zero() {
    for method in [Method::POST, Method::PUT, Method::PATCH] {
        let req = Request::builder()
            .method(method.clone())
            .uri("/")
            .body(())
            .expect("request");
        assert_eq!(
            encoded(req),
            format!("{method} / HTTP/1.1\r\ncontent-length: 0\r\n\r\n")
        );
    }
    let req = Request::post("/")
        .header("content-length", "0")
        .body(())
        .expect("request");
    assert_eq!(encoded(req), "POST / HTTP/1.1\r\ncontent-length: 0\r\n\r\n");
}

#[test]
fn only_requests_without_a_body_suit() {
    let empty = || crate::http::empty();
    let req = |b: http::request::Builder| b.body(empty()).expect("request");
    assert!(suits(&req(Request::get("/"))));
    assert!(suits(
        &req(Request::post("/").header("content-length", "0"))
    ));
    assert!(!suits(&req(
        Request::post("/").header("content-length", "3")
    )));
    assert!(!suits(&req(
        Request::post("/").header("transfer-encoding", "chunked")
    )));
    assert!(!suits(&req(Request::connect("app.local:443"))));
    let with_body = Request::post("/")
        .body(crate::http::whole(Bytes::from_static(b"abc")))
        .expect("request");
    assert!(!suits(&with_body));
}

#[test]
fn a_head_is_taken_once_whole() {
    let bytes = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-a: 1\r\n\r\nok";
    for cut in 0..bytes.len() - 2 {
        assert!(
            matches!(parse_head(&bytes[..cut], &Method::GET), Ok(Parsed::Partial)),
            "{cut}"
        );
    }
    let Ok(Parsed::Final(len, head)) = parse_head(bytes, &Method::GET) else {
        panic!("a whole head");
    };
    assert_eq!(len, bytes.len() - 2, "the body is not part of it");
    assert_eq!(head.response.status(), StatusCode::OK);
    assert_eq!(head.response.version(), Version::HTTP_11);
    assert_eq!(head.response.headers()["x-a"], "1");
    assert_eq!(head.framing, Framing::Length(2));
    assert!(head.keep_alive);
}

#[test]
fn interim_responses_are_skipped_and_an_unasked_upgrade_refused() {
    assert!(matches!(
        parse_head(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n",
            &Method::GET
        ),
        Ok(Parsed::Interim(25))
    ));
    assert!(matches!(
        parse_head(
            b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n",
            &Method::GET
        ),
        Ok(Parsed::Interim(_))
    ));
    assert!(matches!(
        refused(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n"),
        WireError::Upgrade
    ));
}

#[test]
fn the_framing_follows_rfc_9112() {
    let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n";
    assert_eq!(get(chunked).framing, Framing::Chunked);
    assert!(get(chunked).keep_alive);
    // A coding other than chunked last: the body runs to the close.
    let gzip = get(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n");
    assert_eq!(gzip.framing, Framing::Close);
    assert!(!gzip.keep_alive);
    // Neither length nor coding: to the close.
    let unframed = get(b"HTTP/1.1 200 OK\r\n\r\n");
    assert_eq!(unframed.framing, Framing::Close);
    assert!(!unframed.keep_alive);
    // No body whatever the fields say.
    let head_rsp = head(
        b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n",
        &Method::HEAD,
    );
    assert_eq!(head_rsp.framing, Framing::Empty);
    assert_eq!(head_rsp.response.headers()["content-length"], "9");
    for status in ["204 No Content", "304 Not Modified"] {
        let bytes = format!("HTTP/1.1 {status}\r\ncontent-length: 9\r\n\r\n");
        assert_eq!(get(bytes.as_bytes()).framing, Framing::Empty, "{status}");
        assert!(get(bytes.as_bytes()).keep_alive, "{status}");
    }
    assert_eq!(
        get(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").framing,
        Framing::Empty
    );
    // Both: the coding wins, the length is not passed on, and the
    // connection is not trusted again.
    let both = get(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n");
    assert_eq!(both.framing, Framing::Chunked);
    assert!(!both.response.headers().contains_key("content-length"));
    assert!(!both.keep_alive);
    // A length no body follows is not read.
    let head_rsp = head(
        b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n",
        &Method::HEAD,
    );
    assert_eq!(head_rsp.framing, Framing::Empty);
    // A repeated length that agrees is one length.
    assert_eq!(
        get(b"HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\ncontent-length: 5\r\n\r\n").framing,
        Framing::Length(5)
    );
}

#[test]
fn keep_alive_follows_the_version_and_connection_field() {
    assert!(!get(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: Close\r\n\r\n").keep_alive);
    assert!(
        !get(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: x-a, close\r\n\r\n").keep_alive
    );
    let old = get(b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n");
    assert_eq!(old.response.version(), Version::HTTP_10);
    assert!(!old.keep_alive);
    assert!(
        get(b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\nconnection: keep-alive\r\n\r\n").keep_alive
    );
    assert!(
        !get(b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\nconnection: keep-alive\r\n\r\n")
            .keep_alive,
        "chunked in HTTP/1.0 is not trusted for another response"
    );
}

#[test]
fn malformed_heads_are_refused() {
    assert!(matches!(
        refused(b"HTTP/1.1 2OO OK\r\n\r\n"),
        WireError::Head(_)
    ));
    assert!(matches!(
        refused(b"SSH-2.0-OpenSSH\r\n\r\n"),
        WireError::Head(_)
    ));
    assert!(matches!(
        refused(b"HTTP/1.1 200 OK\r\nbad name: x\r\n\r\n"),
        WireError::Head(_)
    ));
    for length in ["-1", "1x", "", "18446744073709551616", "3, 4"] {
        let bytes = format!("HTTP/1.1 200 OK\r\ncontent-length: {length}\r\n\r\n");
        assert!(
            matches!(refused(bytes.as_bytes()), WireError::ContentLength),
            "{length:?}"
        );
    }
    assert!(matches!(
        refused(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n"),
        WireError::ContentLength
    ));
    let huge = format!(
        "HTTP/1.1 200 OK\r\nx-a: {}\r\n",
        "a".repeat(super::MAX_HEAD)
    );
    assert!(matches!(refused(huge.as_bytes()), WireError::HeadTooLarge));
    let whole = format!("{huge}\r\n");
    assert!(matches!(refused(whole.as_bytes()), WireError::HeadTooLarge));
    let many: String = (0..101).map(|i| format!("x-{i}: v\r\n")).collect();
    let bytes = format!("HTTP/1.1 200 OK\r\n{many}\r\n");
    assert!(matches!(refused(bytes.as_bytes()), WireError::Head(_)));
}

/// Everything `decoder` gives for `input` fed in pieces of `cuts`: the
/// data joined, the trailers, and whether it ended.
fn decode_all(
    input: &[u8],
    cuts: &[usize],
) -> Result<(Vec<u8>, Option<http::HeaderMap>, bool), WireError> {
    let mut decoder = Chunked::default();
    let mut buf = BytesMut::new();
    let mut data = Vec::new();
    let mut trailers = None;
    let mut fed = 0;
    let mut cuts = cuts.iter().copied().chain(std::iter::once(input.len()));
    loop {
        match decoder.decode(&mut buf)? {
            Decoded::Data(d) => {
                assert!(!d.is_empty(), "no empty data frames");
                data.extend_from_slice(&d);
            }
            Decoded::Trailers(t) => trailers = Some(t),
            Decoded::End => return Ok((data, trailers, true)),
            Decoded::More => {
                let Some(cut) = cuts.next() else {
                    return Ok((data, trailers, false));
                };
                let cut = cut.clamp(fed, input.len());
                buf.extend_from_slice(&input[fed..cut]);
                fed = cut;
            }
        }
    }
}

#[test]
fn chunks_are_decoded_with_extensions_and_trailers() {
    let input = b"5;name=value\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n0\r\ngrpc-status: 0\r\ngrpc-message: ok\r\n\r\n";
    let (data, trailers, ended) = decode_all(input, &[]).expect("decoded");
    assert_eq!(data, b"hello 0123456789");
    let trailers = trailers.expect("trailers");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "ok");
    assert!(ended);
    let (data, trailers, ended) = decode_all(b"3\r\nabc\r\n0\r\n\r\n", &[]).expect("decoded");
    assert_eq!(data, b"abc");
    assert!(trailers.is_none());
    assert!(ended);
    // Nothing past the end is taken.
    let mut decoder = Chunked::default();
    let mut buf = BytesMut::from(&b"0\r\n\r\nHTTP/1.1"[..]);
    assert_eq!(decoder.decode(&mut buf).expect("end"), Decoded::End);
    assert_eq!(&buf[..], b"HTTP/1.1");
}

#[test]
fn malformed_chunks_are_refused() {
    for bad in [
        &b"\r\n"[..],
        b"g\r\n",
        b"3\nabc\r\n",
        b"3\r\nabcd\r\n",
        b"3\r\nabc\n0\r\n\r\n",
        b"11111111111111111\r\n",
        b"3;a\nb\r\n",
        b"0\r\nbad trailer\r\n\r\n",
    ] {
        assert!(
            decode_all(bad, &[]).is_err(),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    let long = format!(
        "3;{}\r\nabc\r\n0\r\n\r\n",
        "x".repeat(super::MAX_CHUNK_EXTENSION)
    );
    assert!(matches!(
        decode_all(long.as_bytes(), &[]),
        Err(WireError::Chunked)
    ));
    // Cut short: no end, no error (the caller tells a closed connection).
    let (data, _, ended) = decode_all(b"5\r\nhel", &[]).expect("partial");
    assert_eq!(data, b"hel");
    assert!(!ended);
}

proptest! {
    /// However the bytes arrive, the decoder gives the same data, the same
    /// trailers and the same end.
    #[test]
    fn chunked_decoding_does_not_depend_on_how_bytes_arrive(
        chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..40), 0..6),
        trailer in any::<bool>(),
        mut cuts in prop::collection::vec(0usize..400, 0..12),
    ) {
        let mut input = Vec::new();
        let mut want = Vec::new();
        for c in &chunks {
            input.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
            input.extend_from_slice(c);
            input.extend_from_slice(b"\r\n");
            want.extend_from_slice(c);
        }
        input.extend_from_slice(b"0\r\n");
        if trailer {
            input.extend_from_slice(b"x-sum: 1\r\n");
        }
        input.extend_from_slice(b"\r\n");
        cuts.sort_unstable();
        let (data, trailers, ended) = decode_all(&input, &cuts).expect("valid input");
        prop_assert_eq!(data, want);
        prop_assert_eq!(trailers.is_some(), trailer);
        prop_assert!(ended);
    }

    /// Any bytes get an answer, never a panic, and a head is taken only
    /// whole and within bounds.
    #[test]
    fn any_bytes_get_an_answer(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(Parsed::Final(len, _) | Parsed::Interim(len)) = parse_head(&bytes, &Method::GET) {
            prop_assert!(len <= bytes.len());
        }
        let mut buf = BytesMut::from(&bytes[..]);
        let mut decoder = Chunked::default();
        while let Ok(Decoded::Data(_) | Decoded::Trailers(_)) = decoder.decode(&mut buf) {}
    }
}
