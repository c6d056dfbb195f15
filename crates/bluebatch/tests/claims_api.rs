//! README and docs/contract.md claims about the Batch API, each against the real binary at the
//! HTTP level: every listed api-version on a read and a write, lists' `ETag`/`Last-Modified`,
//! every `$filter` property listed, remote login settings of Windows and cloud-service pools,
//! the 1 000-user limit per node, and `Connection: close` after an early answer whose body was
//! not read.

mod common;

use common::{Client, Resp, Server, V, within};
use serde_json::{Value, json};
use std::time::Duration;

const T: Duration = Duration::from_secs(10);

/// docs/contract.md §1: "The list runs from `2015-12-01.2.2` … to `2025-06-01`" (every
/// published data-plane version; README: "every published version back to `2015-12-01.2.2`").
const LISTED: &[&str] = &[
    "2015-12-01.2.2",
    "2016-02-01.3.0",
    "2016-07-01.3.1",
    "2017-01-01.4.0",
    "2017-05-01.5.0",
    "2017-06-01.5.1",
    "2017-09-01.6.0",
    "2018-03-01.6.1",
    "2018-08-01.7.0",
    "2018-12-01.8.0",
    "2019-06-01.9.0",
    "2019-08-01.10.0",
    "2020-03-01.11.0",
    "2020-09-01.12.0",
    "2021-06-01.14.0",
    "2022-01-01.15.0",
    "2022-10-01.16.0",
    "2023-05-01.17.0",
    "2023-11-01.18.0",
    "2024-02-01.19.0",
    "2024-07-01.20.0",
    "2025-06-01",
];

fn text(r: &Resp) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

fn pool_body(id: &str, nodes: u32) -> Value {
    json!({"id": id, "vmSize": "STANDARD_D2S_V3", "targetDedicatedNodes": nodes,
           "virtualMachineConfiguration": {"imageReference": {"publisher": "Canonical",
               "offer": "0001-com-ubuntu-server-jammy", "sku": "22_04-lts"},
               "nodeAgentSKUId": "batch.node.ubuntu 22.04"}})
}

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

async fn wait_steady(c: &Client, pool: &str) {
    within(Duration::from_secs(20), "the pool to be steady", async {
        loop {
            let v = c
                .req("GET", &format!("/pools/{pool}"))
                .send_within(T)
                .await
                .json();
            let nodes = c
                .req("GET", &format!("/pools/{pool}/nodes"))
                .send_within(T)
                .await
                .json();
            let all_idle = nodes["value"]
                .as_array()
                .unwrap()
                .iter()
                .all(|n| n["state"] == "idle");
            if v["allocationState"] == "steady" && all_idle {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn every_listed_api_version_is_accepted_on_a_read_and_a_write() {
    within(Duration::from_secs(60), "the test", async {
        let srv = Server::start();
        let c = srv.client();
        for (i, v) in LISTED.iter().enumerate() {
            let q = format!("api-version={v}");
            let r = c.req("GET", "/pools").query(&q).send_within(T).await;
            assert_eq!(r.status, 200, "read with {v}: {}", text(&r));
            let r = c
                .req("POST", "/pools")
                .query(&q)
                .json(&pool_body(&format!("v{i}"), 0))
                .send_within(T)
                .await;
            assert_eq!(r.status, 201, "write with {v}: {}", text(&r));
            let r = c
                .req("DELETE", &format!("/pools/v{i}"))
                .query(&q)
                .send_within(T)
                .await;
            assert_eq!(r.status, 202, "delete with {v}: {}", text(&r));
        }
        // Near misses and future versions are not listed: 400 UnsupportedRequestVersion naming
        // the value, on reads and writes alike, and the write does nothing.
        for v in [
            "2023-11-01.18.1",
            "2023-11-01",
            "2025-06-01.21.0",
            "2021-01-01.13.0",
            "2014-01-01.1.0",
            "latest",
        ] {
            let q = format!("api-version={v}");
            for r in [
                c.req("GET", "/pools").query(&q).send_within(T).await,
                c.req("POST", "/pools")
                    .query(&q)
                    .json(&pool_body("never", 0))
                    .send_within(T)
                    .await,
            ] {
                assert_eq!(
                    (r.status, r.code().as_str()),
                    (400, "UnsupportedRequestVersion"),
                    "{v}: {}",
                    text(&r)
                );
                assert_eq!(
                    r.value("QueryParameterName").as_deref(),
                    Some("api-version")
                );
                assert_eq!(r.value("QueryParameterValue").as_deref(), Some(v));
            }
        }
        assert_eq!(
            c.req("GET", "/pools/never").send_within(T).await.status,
            404
        );
        // `timeout` and `timeOut` (azure-batch 15.x) are both accepted; above 30 is capped.
        for q in ["timeout=5", "timeOut=5", "timeout=300"] {
            let r = c
                .req("GET", "/pools")
                .query(&format!("api-version=2025-06-01&{q}"))
                .send_within(T)
                .await;
            assert_eq!(r.status, 200, "{q}: {}", text(&r));
        }

        // --accept-any-api-version: an unlisted version works for a write too (and still none
        // is required to be missing: a missing one stays 400).
        let any = Server::start_with(&["--in-memory", "--accept-any-api-version"]);
        let a = any.client();
        let r = a
            .req("POST", "/pools")
            .query("api-version=2099-01-01.99.0")
            .json(&pool_body("any", 0))
            .send_within(T)
            .await;
        assert_eq!(r.status, 201, "{}", text(&r));
        let r = a
            .req("GET", "/pools/any")
            .query("api-version=whatever")
            .send_within(T)
            .await;
        assert_eq!(r.status, 200, "{}", text(&r));
        let r = a.req("GET", "/pools").query("").send_within(T).await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (400, "MissingRequiredQueryParameter")
        );
    })
    .await;
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
        let srv = Server::start();
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
        let srv = Server::start();
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
        assert_eq!(n("state ne 'idle'".into()).await, [d1.clone()]);
        assert_eq!(n("state eq 'offline'".into()).await, [d1.clone()]);
        assert_eq!(
            n("schedulingState eq 'disabled'".into()).await,
            [d1.clone()]
        );
        assert_eq!(
            n("schedulingState eq 'enabled'".into()).await,
            sorted(vec![d0, &low])
        );
        assert_eq!(n(format!("id eq '{d0}'")).await, [d0.clone()]);
        assert_eq!(n(format!("id ne '{d0}'")).await, sorted(vec![d1, &low]));
        assert_eq!(n("isDedicated eq false".into()).await, [low.clone()]);
        assert_eq!(n("isDedicated eq true".into()).await, sorted(vec![d0, d1]));
        assert_eq!(n(format!("ipAddress eq '{ip0}'")).await, [d0.clone()]);
        assert_eq!(
            n(format!(
                "isDedicated eq true and not (ipAddress eq '{ip0}')"
            ))
            .await,
            [d1.clone()]
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

/// README: "Windows VM nodes: the login address and port 3389 (nothing listens).
/// `cloudServiceConfiguration` pools → 409 `OperationNotValidOnPool`."
#[tokio::test]
async fn remote_login_settings_of_windows_and_cloud_service_pools() {
    within(Duration::from_secs(60), "the test", async {
        let srv = Server::start_with(&["--in-memory", "--remote-login-ip", "127.0.0.9"]);
        let c = srv.client();
        let win = c.ready_pool("win", "windows", 1).await;
        let r = c
            .req(
                "GET",
                &format!("/pools/win/nodes/{}/remoteloginsettings", win[0]),
            )
            .send_within(T)
            .await;
        assert_eq!(r.status, 200, "{}", text(&r));
        let v = r.json();
        assert_eq!(v["remoteLoginPort"], 3389, "{v}");
        assert_eq!(v["remoteLoginIPAddress"], "127.0.0.9", "{v}");

        let body = json!({"id": "cs", "vmSize": "small", "targetDedicatedNodes": 1,
                          "cloudServiceConfiguration": {"osFamily": "6"}});
        let r = c.req("POST", "/pools").json(&body).send_within(T).await;
        assert_eq!(r.status, 201, "{}", text(&r));
        wait_steady(&c, "cs").await;
        let nodes = c.req("GET", "/pools/cs/nodes").send_within(T).await.json();
        let node = nodes["value"][0]["id"]
            .as_str()
            .expect("a node")
            .to_string();
        let r = c
            .req(
                "GET",
                &format!("/pools/cs/nodes/{node}/remoteloginsettings"),
            )
            .send_within(T)
            .await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (409, "OperationNotValidOnPool"),
            "{}",
            text(&r)
        );
    })
    .await;
}

/// README Limits: "1 000 users per node (409 `OperationNotValidOnNode`)".
#[tokio::test(flavor = "multi_thread")]
async fn the_thousand_and_first_user_of_a_node_is_refused() {
    within(Duration::from_secs(240), "the test", async {
        let srv = Server::start();
        let c = std::sync::Arc::new(srv.client());
        let nodes = c.ready_pool("p", "linux", 2).await;
        let node = nodes[0].clone();
        let path = format!("/pools/p/nodes/{node}/users");
        // Users without a password or key (allowed on Linux) cost no hash: 1 000 adds, 16 at a
        // time.
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..16 {
            let (c, path) = (c.clone(), path.clone());
            tasks.spawn(async move {
                for i in (w..1000).step_by(16) {
                    let r = c
                        .req("POST", &path)
                        .json(&json!({"name": format!("u{i:04}")}))
                        .send_within(T)
                        .await;
                    assert_eq!(
                        r.status,
                        201,
                        "user {i}: {}",
                        String::from_utf8_lossy(&r.body)
                    );
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        let r = c
            .req("POST", &path)
            .json(&json!({"name": "one-too-many"}))
            .send_within(T)
            .await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (409, "OperationNotValidOnNode"),
            "{}",
            text(&r)
        );
        // Nothing was added; an update of an existing user is still fine; after a delete, one
        // more fits; the other node is not limited by this one.
        let v = c
            .control("GET", &format!("/pools/p/nodes/{node}/users"))
            .send_within(T)
            .await
            .json();
        assert_eq!(v["users"].as_array().unwrap().len(), 1000);
        let r = c
            .req("PUT", &format!("{path}/u0007"))
            .json(&json!({"password": "Pw-7"}))
            .send_within(T)
            .await;
        assert_eq!(r.status, 200, "{}", text(&r));
        let r = c
            .req("DELETE", &format!("{path}/u0001"))
            .send_within(T)
            .await;
        assert_eq!(r.status, 200, "{}", text(&r));
        let r = c
            .req("POST", &path)
            .json(&json!({"name": "one-too-many"}))
            .send_within(T)
            .await;
        assert_eq!(r.status, 201, "{}", text(&r));
        let r = c
            .req("POST", &format!("/pools/p/nodes/{}/users", nodes[1]))
            .json(&json!({"name": "elsewhere"}))
            .send_within(T)
            .await;
        assert_eq!(r.status, 201, "{}", text(&r));
    })
    .await;
}

/// An early answer (401 before authentication succeeds) to a request whose declared body is
/// past what the server drains: the server does not read it and says `Connection: close`
/// (docs/contract.md: bodies past the bound are cut off; early_answers.rs covers the 413).
#[tokio::test]
async fn an_early_401_with_a_body_the_server_does_not_read_closes_the_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    within(Duration::from_secs(30), "the test", async {
        let srv = Server::start();
        let c = srv.client();
        let head = c
            .req("PUT", "/pools/p/nodes/n/users/u")
            .unsigned()
            .header("content-length", &(64u64 << 20).to_string())
            .header("content-type", "application/json; odata=minimalmetadata")
            .into_raw_bytes(&[]);
        // into_raw_bytes asks for connection: close itself; send without it, so the close is
        // the server's decision.
        let head = String::from_utf8(head)
            .unwrap()
            .replace("connection: close\r\n", "");
        let addr = srv.url.trim_start_matches("http://");
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(&[b'x'; 4096]).await.unwrap();
        let mut buf = Vec::new();
        // The server closes the connection: read_to_end returns (a reset after the answer is
        // fine too), well before the 64 MiB could have been sent.
        let _ = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut buf))
            .await
            .expect("the server kept the connection open");
        let r = common::parse_http_response(&buf).expect("an HTTP answer");
        assert_eq!((r.status, r.code().as_str()), (401, "AuthenticationFailed"));
        assert_eq!(r.header("connection"), Some("close"));
    })
    .await;
}

/// Differences table: "Auto-scale: stored and returned; the formula is not evaluated, targets
/// stay 0"; "Pool bodies keep unknown properties and return them".
#[tokio::test]
async fn auto_scale_is_stored_not_evaluated_and_unknown_pool_properties_come_back() {
    within(Duration::from_secs(30), "the test", async {
        let srv = Server::start();
        let c = srv.client();
        let mut body = pool_body("auto", 0);
        body.as_object_mut().unwrap().remove("targetDedicatedNodes");
        body["enableAutoScale"] = json!(true);
        body["autoScaleFormula"] = json!("$TargetDedicatedNodes = 5;");
        body["autoScaleEvaluationInterval"] = json!("PT5M");
        body["futureProperty"] = json!({"nested": [1, "two"]});
        let r = c.req("POST", "/pools").json(&body).send_within(T).await;
        assert_eq!(r.status, 201, "{}", text(&r));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let p = c.req("GET", "/pools/auto").send_within(T).await.json();
        assert_eq!(p["enableAutoScale"], true, "{p}");
        assert_eq!(p["autoScaleFormula"], "$TargetDedicatedNodes = 5;", "{p}");
        assert_eq!(p["autoScaleEvaluationInterval"], "PT5M", "{p}");
        assert_eq!(p["futureProperty"], json!({"nested": [1, "two"]}), "{p}");
        assert_eq!(
            (
                p["targetDedicatedNodes"].as_u64(),
                p["currentDedicatedNodes"].as_u64()
            ),
            (Some(0), Some(0)),
            "{p}"
        );
        assert_eq!(p["allocationState"], "steady", "{p}");
        let nodes = c
            .req("GET", "/pools/auto/nodes")
            .send_within(T)
            .await
            .json();
        assert_eq!(nodes["value"], json!([]), "{nodes}");
    })
    .await;
}

/// Differences table, Linux expiry precision: "usable to the end of the UTC day containing
/// `expiryTime`, refused from 00:00 UTC of the next day … Windows keeps the instant"; the
/// node-users control reports it as `loginRefusedFrom`.
#[tokio::test]
async fn linux_refuses_from_the_next_midnight_windows_at_the_instant() {
    within(Duration::from_secs(60), "the test", async {
        let srv = Server::start();
        let c = srv.client();
        let lin = c.ready_pool("lin", "linux", 1).await;
        let win = c.ready_pool("win", "windows", 1).await;
        let expiry = time::OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .unwrap()
            + time::Duration::days(3);
        let expiry = expiry.replace_time(time::macros::time!(13:45:10));
        let iso = bluebatch_core::timefmt::iso;
        for (pool, node) in [("lin", &lin[0]), ("win", &win[0])] {
            let r = c
                .req("POST", &format!("/pools/{pool}/nodes/{node}/users"))
                .json(&json!({"name": "eve", "password": "Eve-pw-1", "expiryTime": iso(expiry)}))
                .send_within(T)
                .await;
            assert_eq!(r.status, 201, "{pool}: {}", text(&r));
        }
        let refused = |pool: &'static str, node: String| {
            let c = &c;
            async move {
                let v = c
                    .control("GET", &format!("/pools/{pool}/nodes/{node}/users"))
                    .send_within(T)
                    .await
                    .json();
                let u = &v["users"][0];
                let parse = |s: &Value| {
                    time::OffsetDateTime::parse(
                        s.as_str().unwrap(),
                        &time::format_description::well_known::Rfc3339,
                    )
                    .unwrap()
                };
                (parse(&u["expiryTime"]), parse(&u["loginRefusedFrom"]))
            }
        };
        let next_midnight = expiry.replace_time(time::Time::MIDNIGHT) + time::Duration::days(1);
        assert_eq!(
            refused("lin", lin[0].clone()).await,
            (expiry, next_midnight),
            "Linux: refused from 00:00 UTC after the expiry's day"
        );
        assert_eq!(
            refused("win", win[0].clone()).await,
            (expiry, expiry),
            "Windows: refused from the instant"
        );
    })
    .await;
}
