//! README claims about lists, against the real binary at the HTTP level: lists' `ETag` and
//! `Last-Modified` are the newest listed item's, and every `$filter` property the README lists
//! for pools and nodes selects what it names.

mod common;

use common::{Client, Resp, Server, V, pool_body, text, wait_steady, within};
use serde_json::json;
use std::time::Duration;

const T: Duration = Duration::from_secs(10);

async fn ids(c: &Client, path: &str, filter: &str) -> Vec<String> {
    let q = format!("api-version={V}&%24filter={}", enc(filter));
    let r = c.req("GET", path).query(&q).send_within(T).await;
    assert_eq!(r.status, 200, "{filter}: {}", text(&r));
    let mut out: Vec<String> = r.json()["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_string())
        .collect();
    out.sort();
    out
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn rfc1123(iso: &str) -> String {
    let t = time::OffsetDateTime::parse(iso, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{iso}: {e}"));
    let f = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    t.format(f).unwrap()
}

fn httpdate(s: &str) -> time::OffsetDateTime {
    let f = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    time::PrimitiveDateTime::parse(s, f)
        .unwrap_or_else(|e| panic!("{s}: {e}"))
        .assume_utc()
}

/// README: lists' `ETag`/`Last-Modified` are "those of the newest item listed".
#[tokio::test]
async fn list_etag_and_last_modified_are_those_of_the_newest_item_listed() {
    within(Duration::from_secs(60), "the test", async {
        let srv = Server::launch(&["--in-memory"]);
        let c = srv.client();
        for id in ["a", "b", "c"] {
            let r = c
                .req("POST", "/pools")
                .json(&pool_body(id, 0))
                .send_within(T)
                .await;
            assert_eq!(r.status, 201, "{}", text(&r));
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        let get = |id: &'static str| {
            let c = &c;
            async move { c.req("GET", &format!("/pools/{id}")).send_within(T).await }
        };
        let (a, c_pool) = (get("a").await, get("c").await);
        let check = |list: &Resp, newest: &Resp, what: &str| {
            let v = newest.json();
            assert_eq!(list.header("etag"), newest.header("etag"), "{what}");
            assert_eq!(list.header("etag"), v["eTag"].as_str(), "{what}");
            assert_eq!(
                list.header("last-modified").map(str::to_string),
                Some(rfc1123(v["lastModified"].as_str().unwrap())),
                "{what}"
            );
        };
        let all = c.req("GET", "/pools").send_within(T).await;
        assert_eq!(all.status, 200);
        check(&all, &c_pool, "all pools: c is the newest");
        // Of the items listed: a filter or a page that leaves c out answers with a's.
        let only_a = c
            .req("GET", "/pools")
            .query(&format!("api-version={V}&%24filter={}", enc("id eq 'a'")))
            .send_within(T)
            .await;
        check(&only_a, &a, "filtered to a");
        let page = c
            .req("GET", "/pools")
            .query(&format!("api-version={V}&maxresults=1"))
            .send_within(T)
            .await;
        assert_eq!(page.json()["value"][0]["id"], "a");
        check(&page, &a, "first page of one");
        // A write makes its item the newest.
        let r = c
            .req("POST", "/pools/a/resize")
            .json(&json!({"targetDedicatedNodes": 0}))
            .send_within(T)
            .await;
        assert_eq!(r.status, 202, "{}", text(&r));
        wait_steady(&c, "a").await;
        let a2 = get("a").await;
        assert_ne!(a2.header("etag"), a.header("etag"), "resize changed a");
        let all = c.req("GET", "/pools").send_within(T).await;
        check(&all, &a2, "a after its resize");

        // Nodes: the list carries the ETag and Last-Modified of the node last modified, as its
        // own Get answers them.
        let nodes = c.ready_pool("np", "linux", 3).await;
        let list = c.req("GET", "/pools/np/nodes").send_within(T).await;
        let mut got = Vec::new();
        for n in &nodes {
            let g = c
                .req("GET", &format!("/pools/np/nodes/{n}"))
                .send_within(T)
                .await;
            let lm = httpdate(g.header("last-modified").expect("Get Node's Last-Modified"));
            got.push((lm, g.header("etag").unwrap().to_string()));
        }
        let newest = got.iter().map(|(t, _)| *t).max().unwrap();
        let list_lm = httpdate(
            list.header("last-modified")
                .expect("the list's Last-Modified"),
        );
        assert_eq!(
            list_lm, newest,
            "nodes list: the newest node's Last-Modified"
        );
        let etag = list.header("etag").expect("the list's ETag");
        assert!(
            got.iter().any(|(t, e)| *t == newest && e == etag),
            "nodes list ETag {etag} is that of a newest node: {got:?}"
        );
    })
    .await;
}

/// README: pools' `$filter` with `eq`/`ne` on `id`, `state`, `allocationState`, `vmSize`,
/// `displayName`, `startswith(id,'…')`, `and`/`or`/`not`; nodes' on `state`,
/// `schedulingState`, `id`, `isDedicated`, `ipAddress`.
#[tokio::test]
async fn every_listed_filter_property_selects_what_it_names() {
    within(Duration::from_secs(90), "the test", async {
        let srv = Server::launch(&["--in-memory"]);
        let c = srv.client();
        let mut big = pool_body("big-1", 0);
        big["vmSize"] = json!("STANDARD_D4S_V3");
        big["displayName"] = json!("The big one");
        let mut small = pool_body("small-1", 0);
        small["displayName"] = json!("Small");
        for body in [&big, &small, &pool_body("small-2", 0)] {
            let r = c.req("POST", "/pools").json(body).send_within(T).await;
            assert_eq!(r.status, 201, "{}", text(&r));
        }
        let nodes = c.ready_pool("nodes", "linux", 2).await;
        let all = ["big-1", "nodes", "small-1", "small-2"];
        let p = |f: &'static str| {
            let c = &c;
            async move { ids(c, "/pools", f).await }
        };
        assert_eq!(p("id eq 'small-1'").await, ["small-1"]);
        assert_eq!(p("id ne 'small-1'").await, ["big-1", "nodes", "small-2"]);
        assert_eq!(p("state eq 'active'").await, all);
        assert_eq!(p("state ne 'active'").await, Vec::<String>::new());
        assert_eq!(p("allocationState eq 'steady'").await, all);
        assert_eq!(
            p("allocationState eq 'resizing'").await,
            Vec::<String>::new()
        );
        assert_eq!(p("vmSize eq 'STANDARD_D4S_V3'").await, ["big-1"]);
        assert_eq!(
            p("vmSize ne 'STANDARD_D4S_V3'").await,
            ["nodes", "small-1", "small-2"]
        );
        assert_eq!(p("displayName eq 'The big one'").await, ["big-1"]);
        assert_eq!(
            p("displayName ne 'Small'").await,
            ["big-1", "nodes", "small-2"]
        );
        assert_eq!(p("startswith(id,'small')").await, ["small-1", "small-2"]);
        assert_eq!(
            p("startswith(id,'small') and id ne 'small-2'").await,
            ["small-1"]
        );
        assert_eq!(
            p("id eq 'big-1' or id eq 'nodes'").await,
            ["big-1", "nodes"]
        );
        assert_eq!(p("not startswith(id,'small')").await, ["big-1", "nodes"]);
        assert_eq!(
            p("not (id eq 'big-1' or vmSize eq 'STANDARD_D4S_V3') and startswith(id,'s')").await,
            ["small-1", "small-2"]
        );
        // A property that is not listed is refused, naming it.
        let r = c
            .req("GET", "/pools")
            .query(&format!(
                "api-version={V}&%24filter={}",
                enc("creationTime eq 'x'")
            ))
            .send_within(T)
            .await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (400, "InvalidQueryParameterValue"),
            "{}",
            text(&r)
        );

        // Nodes: one dedicated and one low-priority node, one with scheduling disabled.
        let r = c
            .req("POST", "/pools/nodes/resize")
            .json(&json!({"targetDedicatedNodes": 2, "targetLowPriorityNodes": 1}))
            .send_within(T)
            .await;
        assert_eq!(r.status, 202, "{}", text(&r));
        wait_steady(&c, "nodes").await;
        let (d0, d1) = (&nodes[0], &nodes[1]);
        let r = c
            .req(
                "POST",
                &format!("/pools/nodes/nodes/{d1}/disablescheduling"),
            )
            .json(&json!({}))
            .send_within(T)
            .await;
        assert_eq!(r.status, 200, "{}", text(&r));
        let listing = c
            .req("GET", "/pools/nodes/nodes")
            .send_within(T)
            .await
            .json();
        let list = listing["value"].as_array().unwrap();
        assert_eq!(list.len(), 3, "{listing}");
        let low = list
            .iter()
            .find(|n| n["isDedicated"] == false)
            .expect("a low-priority node")["id"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(low.ends_with("_p") && d0.ends_with("_d"), "{low} {d0}");
        let ip0 = list.iter().find(|n| n["id"] == d0.as_str()).unwrap()["ipAddress"]
            .as_str()
            .unwrap()
            .to_string();
        let sorted = |v: Vec<&str>| {
            let mut v: Vec<String> = v.into_iter().map(String::from).collect();
            v.sort();
            v
        };
        let n = |f: String| {
            let c = &c;
            async move { ids(c, "/pools/nodes/nodes", &f).await }
        };
        // A node with scheduling disabled is `offline` (as on Azure).
        assert_eq!(n("state eq 'idle'".into()).await, sorted(vec![d0, &low]));
        assert_eq!(n("state ne 'idle'".into()).await, std::slice::from_ref(d1));
        assert_eq!(
            n("state eq 'offline'".into()).await,
            std::slice::from_ref(d1)
        );
        assert_eq!(
            n("schedulingState eq 'disabled'".into()).await,
            std::slice::from_ref(d1)
        );
        assert_eq!(
            n("schedulingState eq 'enabled'".into()).await,
            sorted(vec![d0, &low])
        );
        assert_eq!(n(format!("id eq '{d0}'")).await, std::slice::from_ref(d0));
        assert_eq!(n(format!("id ne '{d0}'")).await, sorted(vec![d1, &low]));
        assert_eq!(
            n("isDedicated eq false".into()).await,
            std::slice::from_ref(&low)
        );
        assert_eq!(n("isDedicated eq true".into()).await, sorted(vec![d0, d1]));
        assert_eq!(
            n(format!("ipAddress eq '{ip0}'")).await,
            std::slice::from_ref(d0)
        );
        assert_eq!(
            n(format!(
                "isDedicated eq true and not (ipAddress eq '{ip0}')"
            ))
            .await,
            std::slice::from_ref(d1)
        );
        let r = c
            .req("GET", "/pools/nodes/nodes")
            .query(&format!(
                "api-version={V}&%24filter={}",
                enc("vmSize eq 'x'")
            ))
            .send_within(T)
            .await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (400, "InvalidQueryParameterValue")
        );
    })
    .await;
}
