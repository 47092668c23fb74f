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
    // End to end (RFC 9110, 6.6.2): an HTTP/1 encoder writes only the
    // trailers it names.
    h.insert("trailer", HeaderValue::from_static("x-sum"));
    strip_hop_by_hop(&mut h);
    let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
    assert_eq!(names.len(), 3, "{names:?}");
    assert_eq!(h["te"], "trailers");
    assert_eq!(h["x-kept"], "yes");
    assert_eq!(h["trailer"], "x-sum");
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
    let authority = authority_of(&req).expect("valid").expect("host");
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

#[test]
fn a_host_header_names_one_valid_authority_or_is_refused() {
    let req = |uri: &str, hosts: &[&[u8]]| {
        let mut b = Request::builder().uri(uri);
        for h in hosts {
            b = b.header("host", http::HeaderValue::from_bytes(h).expect("value"));
        }
        b.body(empty()).expect("request")
    };
    let ok = |r| authority_of(&r).expect("valid");
    assert_eq!(ok(req("/", &[b"Web.Demo:80"])), Some("web.demo:80".into()));
    assert_eq!(ok(req("/", &[b"[::1]:8080"])), Some("[::1]:8080".into()));
    assert_eq!(
        ok(req("/", &[b"[fe80::1%25eth0]:80"])),
        Some("[fe80::1%25eth0]:80".into())
    );
    assert_eq!(ok(req("/", &[b"web"])), Some("web".into()));
    assert_eq!(
        ok(req("/", &[b"web_1.demo.:0080"])),
        Some("web_1.demo.:0080".into())
    );
    assert_eq!(
        ok(req("/", &[b"web.demo:"])),
        Some("web.demo".into()),
        "empty port"
    );
    let longest = format!("{}.demo", "a".repeat(MAX_HOST_LEN - 5));
    assert_eq!(
        ok(req("/", &[format!("{longest}:80").as_bytes()])),
        Some(format!("{longest}:80"))
    );
    assert_eq!(ok(req("/", &[])), None);
    assert_eq!(ok(req("/", &[b""])), None, "an empty Host names nothing");
    // The URI's authority wins (absolute form, HTTP/2).
    assert_eq!(
        ok(req("http://api.demo:81/x", &[b"web.demo"])),
        Some("api.demo:81".into())
    );
    let too_long = format!("a{longest}");
    assert_eq!(
        authority_of(&req("/", &[too_long.as_bytes()])),
        Err(InvalidHost),
        "longer than a DNS name"
    );
    for bad in [
        &b"web.demo:80 extra"[..],
        b"wb.: wb.dmo:80:80",
        b"user@web.demo",
        b"@",
        b"web.demo:8o",
        b"web.demo:80-",
        b"web.demo:65536",
        b":80",
        b"[x]:80",
        b"[]",
        b"web[x]",
        b"[::1]x",
        b"web.demo/path",
        b"web<demo>",
    ] {
        assert_eq!(
            authority_of(&req("/", &[bad])),
            Err(InvalidHost),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
    // The URI's authority is held to the same rules.
    for bad in ["http://user@web.demo/", "http://web.demo:8o/"] {
        if let Ok(r) = Request::builder().uri(bad).body(empty()) {
            assert_eq!(authority_of(&r), Err(InvalidHost), "{bad}");
        }
    }
    for uri in ["/", "http://web.demo/"] {
        assert_eq!(
            authority_of(&req(uri, &[b"web.demo", b"web.demo"])),
            Err(InvalidHost),
            "two Host headers, {uri}"
        );
    }
}

#[test]
fn an_absolute_target_is_the_host_sent_on() {
    let mut r = Request::builder()
        .uri("http://api.demo:81/x")
        .header("host", "web.demo")
        .header("host", "other")
        .body(empty())
        .expect("request");
    host_from_target(&mut r);
    let hosts: Vec<_> = r.headers().get_all("host").iter().collect();
    assert_eq!(hosts, ["api.demo:81"]);
    let mut r = Request::builder()
        .uri("/x")
        .header("host", "web.demo")
        .body(empty())
        .expect("request");
    host_from_target(&mut r);
    assert_eq!(r.headers()["host"], "web.demo", "origin form: untouched");
}

#[test]
fn plain_hosts_take_the_short_way_to_the_same_answer() {
    // Every host[:port] built from these parts that the short way takes
    // gets the general parse's answer.
    let hosts = [
        "web", "Web.Demo", "a-b_c.d", "10.0.0.1", "x", "-", "..", "[::1]", "a@b", "",
    ];
    let ports = [
        "", ":", ":80", ":08080", ":65535", ":65536", ":99999", ":123456", ":8a", "::80",
    ];
    let mut taken = 0;
    for h in hosts {
        for p in ports {
            let text = format!("{h}{p}");
            if let Some(short) = plain_routable(text.as_bytes()) {
                taken += 1;
                assert_eq!(Ok(short), parsed_routable(text.as_bytes()), "{text}");
            }
        }
    }
    assert!(taken > 30, "{taken}");
    let long = "a".repeat(MAX_HOST_LEN + 1);
    assert_eq!(plain_routable(long.as_bytes()), None);
    assert_eq!(plain_routable(b"web:65536"), None);
    assert_eq!(plain_routable(b"[::1]:80"), None);
    assert_eq!(plain_routable(b"Web:80").as_deref(), Some("web:80"));
    assert_eq!(plain_routable(b"web:").as_deref(), Some("web"));
}

/// Authority text: mostly the characters authorities are made of, with
/// the odd byte of anything.
fn authority_text() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
    use proptest::prelude::*;
    let piece = prop_oneof![
        8 => proptest::sample::select(b"aZ09.-_:[]@%".to_vec()),
        2 => b'0'..=b'9',
        1 => any::<u8>(),
    ];
    prop_oneof![
        proptest::collection::vec(piece, 0..24),
        // Near the length limit.
        ("[a-z.]{250,262}", proptest::option::of(0..=99999u32)).prop_map(|(h, p)| {
            let mut t = h.into_bytes();
            if let Some(p) = p {
                t.extend_from_slice(format!(":{p}").as_bytes());
            }
            t
        }),
    ]
}

proptest::proptest! {
    /// The short way and the general parse agree wherever the short way
    /// answers.
    #[test]
    fn the_short_way_agrees_with_the_general_parse(text in authority_text()) {
        if let Some(short) = plain_routable(&text) {
            proptest::prop_assert_eq!(Ok(short), parsed_routable(&text));
        }
    }

    /// Whatever a client sends as its authority, the answer is an error or
    /// a bounded lowercase authority that maps to itself (it is routed on,
    /// sent on, and read again by the peer proxy).
    #[test]
    fn a_routable_authority_is_bounded_lowercase_and_stable(text in authority_text()) {
        if let Ok(a) = routable(&text) {
            proptest::prop_assert!(a.len() <= MAX_HOST_LEN + 6, "{}", a);
            proptest::prop_assert_eq!(a.to_ascii_lowercase(), a.clone());
            proptest::prop_assert_eq!(routable(a.as_bytes()), Ok(a));
        }
    }
}
