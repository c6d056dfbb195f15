//! `bluebatch_wire::odata::parse_filter` on arbitrary text over both field sets, and evaluation of
//! whatever parses: never panics, never recurses without bound.
#![no_main]

use bluebatch_wire::dto::{NODE_FILTER_FIELDS, POOL_FILTER_FIELDS};
use bluebatch_wire::odata::parse_filter;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for fields in [NODE_FILTER_FIELDS, POOL_FILTER_FIELDS] {
        if let Ok(f) = parse_filter(text, fields) {
            let _ = f.eval(&|k| (k.len() % 2 == 0).then(|| text.chars().take(8).collect()));
            let _ = f.eval(&|_| None);
        }
    }
});
