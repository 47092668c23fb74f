//! The transport header a meshed client sends first inside mTLS: the body
//! after the two-octet length prefix, through [`decode`]. Checked: no panic,
//! and a header it accepts encodes again ([`encode`]) to one that decodes
//! to the same header.

#![no_main]

use libfuzzer_sys::fuzz_target;
use strait_proxy::transport::{decode, encode, MAX_HEADER_BYTES};

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_HEADER_BYTES {
        return;
    }
    let Ok(header) = decode(data) else {
        return;
    };
    let framed = encode(&header).expect("an accepted header encodes");
    let again = decode(&framed[2..]).expect("its encoding decodes");
    assert_eq!(again, header);
    assert_eq!(
        usize::from(u16::from_be_bytes([framed[0], framed[1]])),
        framed.len() - 2
    );
});
