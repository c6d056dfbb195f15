//! The agent endpoints' input: the desired-state poll query (`after`, `wait`, `delta`) and the node
//! protocol's JSON bodies as the service parses them (`bluebatch_wire::agents::parse`). The
//! first byte picks what the rest is. Never panics; an accepted query has a `wait` of at most
//! `MAX_WAIT_SECONDS` and a non-empty `after` of at most 512 bytes; an accepted body serializes
//! and parses back to the same value (so what the service sends, a peer reads back unchanged),
//! and its serialized form is itself accepted.
#![no_main]

use bluebatch_protocol::{
    AckAnswer, AckRequest, DesiredState, HostReport, HostReportAnswer, JoinRequest, JoinResponse,
    MAX_WAIT_SECONDS,
};
use bluebatch_wire::agents::{desired_query, parse};
use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::time::Duration;

fn round_trip<T: DeserializeOwned + Serialize + PartialEq + Debug>(body: &[u8]) {
    let Ok(v) = parse::<T>(body) else {
        return;
    };
    let text = serde_json::to_vec(&v).expect("an accepted body serializes");
    let back: T = parse(&text).expect("the serialized body is accepted");
    assert_eq!(v, back, "{}", String::from_utf8_lossy(&text));
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 8 {
        0 => {
            let Ok(query) = std::str::from_utf8(rest) else {
                return;
            };
            let a = desired_query(query);
            if let Ok((after, wait, _delta)) = &a {
                assert!(*wait <= Duration::from_secs(MAX_WAIT_SECONDS), "{query:?}");
                if let Some(after) = after {
                    assert!(!after.is_empty() && after.len() <= 512, "{query:?}");
                }
            }
            let b = desired_query(query);
            assert_eq!(a.is_ok(), b.is_ok());
            if let (Ok(a), Ok(b)) = (a, b) {
                assert_eq!(a, b);
            }
        }
        1 => round_trip::<JoinRequest>(rest),
        2 => round_trip::<HostReport>(rest),
        3 => round_trip::<AckRequest>(rest),
        4 => round_trip::<DesiredState>(rest),
        5 => round_trip::<JoinResponse>(rest),
        6 => round_trip::<AckAnswer>(rest),
        _ => round_trip::<HostReportAnswer>(rest),
    }
});
