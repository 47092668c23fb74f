use super::*;

#[test]
fn hop_by_hop_headers_are_removed_te_trailers_kept() {
    let mut h = HeaderMap::new();
    h.insert(
        "connection",
        HeaderValue::from_static("keep-alive, x-secret"),
    );
    h.insert("x-secret", HeaderValue::from_static("1"));
    h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
    h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
    h.insert("te", HeaderValue::from_static("trailers"));
    h.insert("x-kept", HeaderValue::from_static("yes"));
    strip_hop_by_hop(&mut h);
    let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert_eq!(h["te"], "trailers");
    assert_eq!(h["x-kept"], "yes");
}

#[test]
fn http1_requests_round_trip_through_the_mesh_marking() {
    let mut req = Request::builder()
        .uri("/a/b?c=d")
        .version(Version::HTTP_11)
        .header("host", "web.demo:8080")
        .header("connection", "close")
        .body(empty())
        .expect("request");
    let authority = authority_of(&req).expect("host");
    assert_eq!(authority, "web.demo:8080");
    req = to_mesh(req, &authority).expect("to mesh");
    assert_eq!(req.version(), Version::HTTP_2);
    assert_eq!(req.uri().to_string(), "http://web.demo:8080/a/b?c=d");
    assert!(req.headers().get("connection").is_none());
    let back = from_mesh(req);
    assert_eq!(back.version(), Version::HTTP_11);
    assert!(back.headers().get(ORIG_PROTO).is_none());
}

#[test]
fn status_classes() {
    assert_eq!(status_class(StatusCode::OK), "2xx");
    assert_eq!(status_class(StatusCode::NOT_FOUND), "4xx");
    assert_eq!(status_class(StatusCode::BAD_GATEWAY), "5xx");
}
