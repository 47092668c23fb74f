//! A request's `Host` header through [`authority_of`], which names the
//! authority the proxy routes by, looks up and uses as a metric label.
//! Checked: no panic; an authority it accepts is a valid, lowercase
//! `host[:port]` with a non-empty host and a numeric port that forms a
//! URI, and a repeated Host is refused.

#![no_main]

use libfuzzer_sys::fuzz_target;
use strait_proxy::http::authority_of;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = http::HeaderValue::from_bytes(data) else {
        return;
    };
    let request = |hosts: usize| {
        let mut b = http::Request::builder().uri("/");
        for _ in 0..hosts {
            b = b.header(http::header::HOST, value.clone());
        }
        b.body(()).expect("a request")
    };
    match authority_of(&request(1)) {
        Ok(Some(a)) => {
            let parsed = http::uri::Authority::try_from(a.as_str()).expect("valid");
            assert_eq!(a, a.to_ascii_lowercase());
            assert!(!a.contains('@'), "{a}");
            assert!(!parsed.host().is_empty(), "{a}");
            let rest = &a[parsed.host().len()..];
            assert!(
                rest.is_empty() || (rest.starts_with(':') && parsed.port_u16().is_some()),
                "{a}"
            );
            // What the proxy makes of it towards a peer proxy.
            http::Uri::builder()
                .scheme("http")
                .authority(a.as_str())
                .path_and_query("/")
                .build()
                .expect("forms a URI");
        }
        Ok(None) => assert!(data.is_empty(), "only an empty Host names nothing"),
        Err(_) => {}
    }
    assert!(authority_of(&request(2)).is_err(), "two Host headers");
});
