//! `bluebatch_wire::endpoint::route` on an arbitrary method and raw path: never panics, is
//! deterministic, every segment it yields is non-empty, and a path is accepted only if each `%`
//! starts a well-formed escape (`%` and two hex digits).
#![no_main]

use bluebatch_wire::endpoint::{route, route_segments};
use http::Method;
use libfuzzer_sys::fuzz_target;

const METHODS: [&str; 8] = [
    "GET", "PUT", "POST", "DELETE", "HEAD", "PATCH", "OPTIONS", "MKCOL",
];

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let Ok(path) = std::str::from_utf8(rest) else {
        return;
    };
    let method = Method::from_bytes(METHODS[first as usize % METHODS.len()].as_bytes())
        .expect("a valid method");
    let a = route(&method, path);
    let b = route(&method, path);
    assert_eq!(a, b);
    if let Ok(segs) = route_segments(path) {
        assert!(segs.iter().all(|s| !s.is_empty()));
        // Accepted only if every '%' starts an escape of exactly two hex digits.
        let b = path.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                assert!(
                    b.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                        && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit),
                    "malformed escape accepted in {path:?}"
                );
                i += 3;
            } else {
                i += 1;
            }
        }
    }
});
