//! The success paths of conditional requests on pools, over HTTP against the real binary: a
//! condition that holds gives the operation's normal answer (Get 200 with the pool, Exists 200,
//! Resize/Remove Nodes/Delete 202), with the ETag quoted, unquoted or in a list, and with the
//! precedence HTTP defines (If-Unmodified-Since is ignored beside If-Match, If-Modified-Since
//! beside If-None-Match). `If-None-Match: *` on an absent pool holds (HTTP: "*" is false only
//! when a current representation exists), so the answer is the normal one for an absent pool:
//! 404 PoolNotFound (HEAD: 404 with no body), never 304 or 412.

mod common;

use bluebatch_core::timefmt::{parse_iso, rfc1123};
use common::{Client, Server, text, within};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const REQ: Duration = Duration::from_secs(10);

async fn get(c: &Client, pool: &str) -> Value {
    let r = c
        .req("GET", &format!("/pools/{pool}"))
        .send_within(REQ)
        .await;
    assert_eq!(r.status, 200, "{}", text(&r));
    r.json()
}

async fn steady(c: &Client, pool: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = get(c, pool).await;
        if v["allocationState"] == "steady" {
            return v;
        }
        assert!(Instant::now() < deadline, "{pool} never became steady: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The pool's ETag and its lastModified moved by `seconds`, as an HTTP date.
fn etag_and_date(v: &Value, seconds: i64) -> (String, String) {
    let lm = parse_iso(v["lastModified"].as_str().unwrap()).unwrap();
    (
        v["eTag"].as_str().unwrap().to_string(),
        rfc1123(lm + time::Duration::seconds(seconds)),
    )
}

/// The three spellings of a matching ETag in If-Match.
fn spellings(etag: &str) -> [String; 3] {
    [
        etag.to_string(),
        format!("\"{etag}\""),
        format!("\"0x8D0000000000001\", \"{etag}\""),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_with_conditions_that_hold_answer_normally() {
    within(Duration::from_secs(60), "the test", async {
        let srv = Server::start();
        let c = srv.client();
        c.ready_pool("cr", "linux", 0).await;
        let v = get(&c, "cr").await;
        let (etag, _) = etag_and_date(&v, 0);
        let (_, earlier) = etag_and_date(&v, -60);
        let (_, later) = etag_and_date(&v, 60);
        let conditions: Vec<(&str, String)> = spellings(&etag)
            .into_iter()
            .map(|t| ("if-match", t))
            .chain([
                ("if-match", "*".to_string()),
                ("if-none-match", "0x8D0000000000001".to_string()),
                ("if-none-match", "\"0x8D0000000000001\"".to_string()),
                ("if-modified-since", earlier.clone()),
                ("if-unmodified-since", later.clone()),
            ])
            .collect();
        for (name, value) in &conditions {
            let r = c
                .req("GET", "/pools/cr")
                .header(name, value)
                .send_within(REQ)
                .await;
            assert_eq!(r.status, 200, "GET {name}: {value}: {}", text(&r));
            assert_eq!(r.json()["id"], "cr", "GET {name}: {value}");
            assert_eq!(r.header("etag"), Some(etag.as_str()), "GET {name}: {value}");
            assert!(r.header("last-modified").is_some(), "GET {name}: {value}");
            let r = c
                .req("HEAD", "/pools/cr")
                .header(name, value)
                .send_within(REQ)
                .await;
            assert_eq!((r.status, r.body.len()), (200, 0), "HEAD {name}: {value}");
            assert_eq!(
                r.header("etag"),
                Some(etag.as_str()),
                "HEAD {name}: {value}"
            );
        }
        // HTTP's precedence: If-Match decides, a failing If-Unmodified-Since beside it is
        // ignored; If-None-Match decides, a failing If-Modified-Since beside it is ignored.
        let r = c
            .req("GET", "/pools/cr")
            .header("if-match", &etag)
            .header("if-unmodified-since", &earlier)
            .send_within(REQ)
            .await;
        assert_eq!(r.status, 200, "{}", text(&r));
        let r = c
            .req("GET", "/pools/cr")
            .header("if-none-match", "0x8D0000000000001")
            .header("if-modified-since", &later)
            .send_within(REQ)
            .await;
        assert_eq!(r.status, 200, "{}", text(&r));
        // The failing counterparts, so that the above cannot pass by conditions being ignored.
        for (name, value, status) in [
            ("if-match", "0x8D0000000000001".to_string(), 412),
            ("if-none-match", etag.clone(), 304),
            ("if-modified-since", later.clone(), 304),
            ("if-unmodified-since", earlier.clone(), 412),
        ] {
            let r = c
                .req("GET", "/pools/cr")
                .header(name, &value)
                .send_within(REQ)
                .await;
            assert_eq!(r.status, status, "GET {name}: {value}: {}", text(&r));
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn if_none_match_star_on_an_absent_pool_gives_the_normal_404() {
    within(Duration::from_secs(60), "the test", async {
        let srv = Server::start();
        let c = srv.client();
        for value in ["*", "0x8D0000000000001"] {
            let r = c
                .req("GET", "/pools/absent")
                .header("if-none-match", value)
                .send_within(REQ)
                .await;
            assert_eq!(
                (r.status, r.code().as_str()),
                (404, "PoolNotFound"),
                "GET If-None-Match: {value}: {}",
                text(&r)
            );
            let r = c
                .req("HEAD", "/pools/absent")
                .header("if-none-match", value)
                .send_within(REQ)
                .await;
            assert_eq!(
                (r.status, r.body.len()),
                (404, 0),
                "HEAD If-None-Match: {value}"
            );
        }
        // …and on a pool that exists, `*` matches: 304 on reads, 412 on writes.
        c.ready_pool("here", "linux", 0).await;
        let r = c
            .req("GET", "/pools/here")
            .header("if-none-match", "*")
            .send_within(REQ)
            .await;
        assert_eq!((r.status, r.body.len()), (304, 0));
        let r = c
            .req("POST", "/pools/here/resize")
            .header("if-none-match", "*")
            .json(&json!({"targetDedicatedNodes": 1}))
            .send_within(REQ)
            .await;
        assert_eq!((r.status, r.code().as_str()), (412, "ConditionNotMet"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_with_conditions_that_hold_succeed() {
    within(Duration::from_secs(120), "the test", async {
        let srv = Server::start();
        let c = srv.client();
        c.ready_pool("cw", "linux", 0).await;
        // Resize with each condition that holds: 202, and the new target is there.
        let mut target = 0u64;
        let conditions = |v: &Value| -> Vec<(&'static str, String)> {
            let (etag, _) = etag_and_date(v, 0);
            let (_, later) = etag_and_date(v, 60);
            let [plain, quoted, list] = spellings(&etag);
            vec![
                ("if-match", plain),
                ("if-match", quoted),
                ("if-match", list),
                ("if-none-match", "0x8D0000000000001".to_string()),
                ("if-unmodified-since", later),
            ]
        };
        let n = conditions(&steady(&c, "cw").await).len();
        for i in 0..n {
            let before = steady(&c, "cw").await;
            let (name, value) = conditions(&before).swap_remove(i);
            target = 1 - target;
            let r = c
                .req("POST", "/pools/cw/resize")
                .header(name, &value)
                .json(&json!({"targetDedicatedNodes": target}))
                .send_within(REQ)
                .await;
            assert_eq!(r.status, 202, "Resize {name}: {value}: {}", text(&r));
            let etag = r.header("etag").expect("an ETag on Resize").to_string();
            assert_ne!(Some(etag.as_str()), before["eTag"].as_str());
            let after = steady(&c, "cw").await;
            assert_eq!(after["targetDedicatedNodes"], target, "{after}");
            assert_eq!(after["currentDedicatedNodes"], target, "{after}");
        }
        // Remove Nodes with each condition that holds: 202, and the node goes.
        for i in 0..n {
            let before = steady(&c, "cw").await;
            if before["currentDedicatedNodes"] == 0 {
                let r = c
                    .req("POST", "/pools/cw/resize")
                    .json(&json!({"targetDedicatedNodes": 1}))
                    .send_within(REQ)
                    .await;
                assert_eq!(r.status, 202, "{}", text(&r));
            }
            let before = steady(&c, "cw").await;
            let nodes = c
                .req("GET", "/pools/cw/nodes")
                .send_within(REQ)
                .await
                .json();
            let node = nodes["value"][0]["id"].as_str().unwrap().to_string();
            let (name, value) = conditions(&before).swap_remove(i);
            let r = c
                .req("POST", "/pools/cw/removenodes")
                .header(name, &value)
                .json(&json!({"nodeList": [node]}))
                .send_within(REQ)
                .await;
            assert_eq!(r.status, 202, "Remove Nodes {name}: {value}: {}", text(&r));
            let after = steady(&c, "cw").await;
            assert_eq!(after["currentDedicatedNodes"], 0, "{after}");
        }
        // Delete with each condition that holds (one pool per condition): 202, and it goes.
        for i in 0..n {
            let id = format!("del{i}");
            c.ready_pool(&id, "linux", 0).await;
            let v = get(&c, &id).await;
            let (name, value) = conditions(&v).swap_remove(i);
            let r = c
                .req("DELETE", &format!("/pools/{id}"))
                .header(name, &value)
                .send_within(REQ)
                .await;
            assert_eq!(r.status, 202, "Delete {name}: {value}: {}", text(&r));
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let r = c
                    .req("HEAD", &format!("/pools/{id}"))
                    .send_within(REQ)
                    .await;
                if r.status == 404 {
                    break;
                }
                assert!(Instant::now() < deadline, "{id} was never deleted");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        // If-Match decides: a failing If-Unmodified-Since beside a matching If-Match is ignored.
        let v = steady(&c, "cw").await;
        let (etag, earlier) = etag_and_date(&v, -60);
        let r = c
            .req("POST", "/pools/cw/resize")
            .header("if-match", &etag)
            .header("if-unmodified-since", &earlier)
            .json(&json!({"targetDedicatedNodes": 0}))
            .send_within(REQ)
            .await;
        assert_eq!(r.status, 202, "{}", text(&r));
        // The failing counterparts on a write: all 412 ConditionNotMet, nothing changed.
        let v = steady(&c, "cw").await;
        let (etag, earlier) = etag_and_date(&v, -60);
        for (name, value) in [
            ("if-match", "0x8D0000000000001".to_string()),
            ("if-none-match", etag.clone()),
            ("if-unmodified-since", earlier),
        ] {
            let r = c
                .req("POST", "/pools/cw/resize")
                .header(name, &value)
                .json(&json!({"targetDedicatedNodes": 1}))
                .send_within(REQ)
                .await;
            assert_eq!(
                (r.status, r.code().as_str()),
                (412, "ConditionNotMet"),
                "Resize {name}: {value}"
            );
        }
        assert_eq!(get(&c, "cw").await["eTag"], v["eTag"]);
    })
    .await;
}

/// If-Match compares strongly (RFC 9110 §13.1.1): a weak entity tag never matches, even the
/// pool's own, so reads and writes answer 412 ConditionNotMet and nothing changes; a strong tag
/// beside it in the list still matches. If-None-Match compares weakly: `W/"<etag>"` matches the
/// pool's ETag (304 on reads, 412 on writes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weak_etag_never_satisfies_if_match_but_satisfies_if_none_match() {
    within(Duration::from_secs(60), "the test", async {
        let srv = Server::start();
        let c = srv.client();
        c.ready_pool("weak", "linux", 0).await;
        let v = steady(&c, "weak").await;
        let (etag, _) = etag_and_date(&v, 0);
        let weak = [format!("W/\"{etag}\""), format!("W/{etag}")];
        for value in &weak {
            for method in ["GET", "HEAD"] {
                let r = c
                    .req(method, "/pools/weak")
                    .header("if-match", value)
                    .send_within(REQ)
                    .await;
                assert_eq!(r.status, 412, "{method} If-Match: {value}: {}", text(&r));
                if method == "GET" {
                    assert_eq!(r.code(), "ConditionNotMet", "{method} If-Match: {value}");
                }
            }
            let r = c
                .req("POST", "/pools/weak/resize")
                .header("if-match", value)
                .json(&json!({"targetDedicatedNodes": 1}))
                .send_within(REQ)
                .await;
            assert_eq!(
                (r.status, r.code().as_str()),
                (412, "ConditionNotMet"),
                "Resize If-Match: {value}: {}",
                text(&r)
            );
            let r = c
                .req("DELETE", "/pools/weak")
                .header("if-match", value)
                .send_within(REQ)
                .await;
            assert_eq!(
                (r.status, r.code().as_str()),
                (412, "ConditionNotMet"),
                "Delete If-Match: {value}: {}",
                text(&r)
            );
        }
        // Nothing changed: same ETag, no resize, the pool still there.
        let after = get(&c, "weak").await;
        assert_eq!(after["eTag"], v["eTag"]);
        assert_eq!(after["targetDedicatedNodes"], 0);
        assert_eq!(after["state"], "active");
        // A strong tag in the same list matches.
        let list = format!("W/\"{etag}\", \"{etag}\"");
        let r = c
            .req("GET", "/pools/weak")
            .header("if-match", &list)
            .send_within(REQ)
            .await;
        assert_eq!(r.status, 200, "If-Match: {list}: {}", text(&r));
        // If-None-Match compares weakly: the weak spelling of the pool's ETag matches.
        for value in &weak {
            let r = c
                .req("GET", "/pools/weak")
                .header("if-none-match", value)
                .send_within(REQ)
                .await;
            assert_eq!(
                (r.status, r.body.len()),
                (304, 0),
                "GET If-None-Match: {value}"
            );
            let r = c
                .req("POST", "/pools/weak/resize")
                .header("if-none-match", value)
                .json(&json!({"targetDedicatedNodes": 1}))
                .send_within(REQ)
                .await;
            assert_eq!(
                (r.status, r.code().as_str()),
                (412, "ConditionNotMet"),
                "Resize If-None-Match: {value}"
            );
        }
        assert_eq!(get(&c, "weak").await["eTag"], v["eTag"]);
    })
    .await;
}
