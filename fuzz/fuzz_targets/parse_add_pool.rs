//! `bluebatch_core::pools::parse_add_pool` (and the resize and remove-nodes bodies) on arbitrary
//! bytes: never panics; an accepted pool has a valid id and node counts within the limit.
#![no_main]

use bluebatch_core::pools::{parse_add_pool, parse_remove_nodes, parse_resize, valid_pool_id};
use libfuzzer_sys::fuzz_target;

const MAX_NODES: u32 = 10_000;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = parse_add_pool(data, MAX_NODES) {
        assert!(valid_pool_id(&p.id), "{:?}", p.id);
        assert!(!p.vm_size.is_empty());
        assert!(p.target_dedicated + p.target_low_priority <= MAX_NODES);
    }
    if let Ok(r) = parse_resize(data, MAX_NODES) {
        assert!(r.target_dedicated + r.target_low_priority <= MAX_NODES);
    }
    if let Ok(ids) = parse_remove_nodes(data) {
        assert!((1..=100).contains(&ids.len()));
    }
});
