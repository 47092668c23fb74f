//! Protocol detection ([`classify`]) on every prefix of the input, as a
//! connection delivers it a few bytes at a time. Checked: no panic, and a
//! verdict once given never changes as more bytes arrive (the proxy acts on
//! the first one).

#![no_main]

use libfuzzer_sys::fuzz_target;
use strait_proxy::detect::{classify, Verdict, MAX_DETECT_BYTES};

fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(MAX_DETECT_BYTES)];
    let mut decided = None;
    for end in 0..=data.len() {
        match (classify(&data[..end]), decided) {
            (Verdict::Is(now), None) => decided = Some((now, end)),
            (Verdict::Is(now), Some((first, at))) => assert_eq!(
                now,
                first,
                "{first:?} after {at} bytes, {now:?} after {end}: {:?}",
                String::from_utf8_lossy(&data[..end])
            ),
            (Verdict::NeedMore, Some((first, at))) => panic!(
                "{first:?} after {at} bytes, undecided after {end}: {:?}",
                String::from_utf8_lossy(&data[..end])
            ),
            (Verdict::NeedMore, None) => {}
        }
    }
});
