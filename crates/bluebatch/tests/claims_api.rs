//! README and docs/contract.md claims about the Batch API, each against the real binary at the
//! HTTP level: every listed api-version on a read and a write, remote login settings of Windows
//! and cloud-service pools, the 1 000-user limit per node, `Connection: close` after an early
//! answer whose body was not read, auto-scale and unknown pool properties kept, expiry precision
//! (lists and `$filter`: claims_lists.rs).

mod common;

use common::{Server, pool_body, text, wait_steady, within};
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

#[tokio::test]
async fn every_listed_api_version_is_accepted_on_a_read_and_a_write() {
    within(Duration::from_secs(60), "the test", async {
        let srv = Server::launch(&["--in-memory"]);
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
        let any = Server::launch(&["--in-memory", "--accept-any-api-version"]);
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

/// README: "Windows VM nodes: the login address and port 3389 (nothing listens).
/// `cloudServiceConfiguration` pools → 409 `OperationNotValidOnPool`."
#[tokio::test]
async fn remote_login_settings_of_windows_and_cloud_service_pools() {
    within(Duration::from_secs(60), "the test", async {
        let srv = Server::launch(&["--in-memory", "--remote-login-ip", "127.0.0.9"]);
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
        // "Windows nodes have no endpoint": no SSH endpoint in the node either.
        let node = c
            .req("GET", &format!("/pools/win/nodes/{}", win[0]))
            .send_within(T)
            .await
            .json();
        assert!(node.get("endpointConfiguration").is_none(), "{node}");

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
        let srv = Server::launch(&["--in-memory"]);
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
        let srv = Server::launch(&["--in-memory"]);
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
        let srv = Server::launch(&["--in-memory"]);
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
        let srv = Server::launch(&["--in-memory"]);
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
