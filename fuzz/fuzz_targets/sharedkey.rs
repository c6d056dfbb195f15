//! The Shared Key canonicalizer (`bluebatch_wire::sharedkey::strings_to_sign`) and the whole
//! verification on arbitrary requests: never panics, and the string to sign always starts with
//! the verb and ends with the account's canonicalized resource.
//!
//! Input: line 1 picks the method, line 2 is the raw path, line 3 the raw query, the other lines
//! are `name: value` headers (those `http` refuses are skipped).
#![no_main]

use bluebatch_wire::Accounts;
use bluebatch_wire::sharedkey::{Signed, strings_to_sign, verify};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let method = match lines.next().unwrap_or("").len() % 5 {
        0 => Method::GET,
        1 => Method::PUT,
        2 => Method::POST,
        3 => Method::DELETE,
        _ => Method::HEAD,
    };
    let raw_path = lines.next().unwrap_or("/");
    let raw_query = lines.next().unwrap_or("");
    let mut headers = HeaderMap::new();
    for line in lines {
        if let Some((n, v)) = line.split_once(':')
            && let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(n.trim().as_bytes()),
                HeaderValue::from_str(v.trim_start()),
            )
        {
            headers.append(n, v);
        }
    }
    let req = Signed {
        method: &method,
        raw_path,
        raw_query,
        headers: &headers,
    };
    let all = strings_to_sign(&req, "bluebatchdev");
    assert!(!all.is_empty());
    for s in &all {
        assert!(s.starts_with(method.as_str()));
        assert!(s.contains("\n/bluebatchdev"));
    }
    let now = time::OffsetDateTime::from_unix_timestamp(1_795_000_000).unwrap();
    let _ = verify(&req, &Accounts::dev(), now);
});
