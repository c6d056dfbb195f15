//! The wire protocol around every operation: api-version, Shared Key, query parameters,
//! headers, body limits, routing, pools and their lists.

mod common;

use common::{Client, Server, V, http_date};
use serde_json::json;

#[tokio::test]
async fn api_version_is_checked_before_authentication() {
    let srv = Server::start();
    let c = srv.client();
    let r = c.req("GET", "/pools").query("").unsigned().send().await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (400, "MissingRequiredQueryParameter")
    );
    assert_eq!(
        r.value("QueryParameterName").as_deref(),
        Some("api-version")
    );
    let r = c
        .req("GET", "/pools")
        .query("api-version=2099-01-01.1.0")
        .send()
        .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (400, "UnsupportedRequestVersion")
    );
    assert_eq!(
        r.value("QueryParameterValue").as_deref(),
        Some("2099-01-01.1.0")
    );
    let any = Server::start_with(&["--in-memory", "--accept-any-api-version"]);
    let r = any
        .client()
        .req("GET", "/pools")
        .query("api-version=2099-01-01.1.0")
        .send()
        .await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn shared_key_refusals() {
    let srv = Server::start();
    let c = srv.client();
    let r = c.req("GET", "/pools").unsigned().send().await;
    assert_eq!((r.status, r.code().as_str()), (401, "AuthenticationFailed"));
    assert!(r.header("www-authenticate").is_some());
    let r = c
        .req("GET", "/pools")
        .unsigned()
        .header("authorization", "Basic dXNlcjpwYXNz")
        .send()
        .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (400, "InvalidAuthenticationInfo")
    );
    let wrong = Client::new(&srv.url, "bluebatchdev", "d3Jvbmcga2V5IHdyb25nIGtleQ==");
    let r = wrong.req("GET", "/pools").send().await;
    assert_eq!((r.status, r.code().as_str()), (403, "AuthenticationFailed"));
    let detail = r.value("AuthenticationErrorDetail").unwrap();
    assert!(detail.contains("signature"), "{detail}");
    let stranger = Client::new(&srv.url, "nosuchaccount", common::KEY);
    assert_eq!(stranger.req("GET", "/pools").send().await.status, 403);
    let stale = "Wed, 25 Nov 2020 12:00:00 GMT";
    let r = c
        .req("GET", "/pools")
        .header("ocp-date", stale)
        .send()
        .await;
    assert_eq!((r.status, r.code().as_str()), (403, "AuthenticationFailed"));
    let r = c
        .req("GET", "/pools")
        .header("ocp-date", "yesterday")
        .send()
        .await;
    assert_eq!((r.status, r.code().as_str()), (400, "InvalidHeaderValue"));
    // A signature over another path does not verify here.
    let mut req = c.req("GET", "/pools");
    req.path = "/pools/other".into();
    let sts = req.string_to_sign("bluebatchdev");
    assert!(sts.contains("/bluebatchdev/pools/other"));
    // The Date header (instead of ocp-date) is signed in the standard lines.
    let r = c
        .req("GET", "/pools")
        .header("date", &http_date())
        .send()
        .await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
}

#[tokio::test]
async fn query_parameters_and_headers() {
    let srv = Server::start();
    let c = srv.client();
    let q = |s: &str| format!("api-version={V}&{s}");
    for (query, status, code) in [
        (q("timeout=abc"), 400, "InvalidQueryParameterValue"),
        (q("timeout=0"), 400, "OutOfRangeQueryParameterValue"),
        (q("maxresults=0"), 400, "OutOfRangeQueryParameterValue"),
        (q("frobnicate=1"), 400, "UnsupportedQueryParameter"),
        (
            q("%24filter=color%20eq%20%27red%27"),
            400,
            "InvalidQueryParameterValue",
        ),
    ] {
        let r = c.req("GET", "/pools").query(&query).send().await;
        assert_eq!((r.status, r.code().as_str()), (status, code), "{query}");
    }
    let r = c
        .req("GET", "/pools/p1")
        .query(&q("maxresults=3"))
        .send()
        .await;
    assert_eq!(
        r.code(),
        "UnsupportedQueryParameter",
        "maxresults is for lists only"
    );
    let r = c
        .req("GET", "/pools")
        .header("client-request-id", "not-a-guid")
        .send()
        .await;
    assert_eq!((r.status, r.code().as_str()), (400, "InvalidHeaderValue"));
    assert_eq!(r.value("HeaderName").as_deref(), Some("client-request-id"));
    let r = c
        .req("GET", "/pools")
        .header("x-ms-client-request-id", "anything")
        .send()
        .await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn routing_errors() {
    let srv = Server::start();
    let c = srv.client();
    let r = c.req("GET", "/nonsense").send().await;
    assert_eq!((r.status, r.code().as_str()), (400, "InvalidUri"));
    // A published operation bluebatch does not serve: 501 naming it.
    let r = c.req("GET", "/jobs").send().await;
    assert_eq!((r.status, r.code().as_str()), (501, "NotImplemented"));
    assert_eq!(r.value("Operation").as_deref(), Some("Job_List"));
    let r = c.req("PATCH", "/pools/p/nodes/n/users/u").send().await;
    assert_eq!((r.status, r.code().as_str()), (405, "UnsupportedHttpVerb"));
    let r = c.req("GET", "/pools/..%2F..%2Fetc%2Fpasswd").send().await;
    assert_eq!((r.status, r.code().as_str()), (404, "PoolNotFound"));
    // Health needs no authentication.
    let r = c
        .req("GET", "/_bluebatch/health")
        .query("")
        .unsigned()
        .send()
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "ok");
}

#[tokio::test]
async fn bodies_over_the_limit_are_refused() {
    let srv = Server::start();
    let c = srv.client();
    let big = format!(r#"{{"password":"{}"}}"#, "x".repeat(2 << 20));
    let r = c
        .req("PUT", "/pools/p/nodes/n/users/u")
        .raw(big.into_bytes())
        .send()
        .await;
    assert_eq!((r.status, r.code().as_str()), (413, "RequestBodyTooLarge"));
    let r = c
        .req("POST", "/pools")
        .header("content-type", "text/plain")
        .raw(b"{}".to_vec())
        .send()
        .await;
    assert_eq!((r.status, r.code().as_str()), (400, "InvalidHeaderValue"));
}

#[tokio::test]
async fn pools_add_get_exists_list_delete() {
    let srv = Server::start();
    let c = srv.client();
    let r = c.create_pool("Pool-A", "linux", 0).await;
    assert_eq!(r.status, 201);
    assert!(
        r.header("dataserviceid")
            .unwrap()
            .ends_with("/pools/Pool-A")
    );
    let r = c.create_pool("pool-a", "linux", 0).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (409, "PoolExists"),
        "ids are unique case-insensitively"
    );
    for (body, status, code) in [
        (
            json!({"vmSize": "x", "cloudServiceConfiguration": {"osFamily": "6"}}),
            400,
            "MissingRequiredProperty",
        ),
        (
            json!({"id": "bad id", "vmSize": "x", "cloudServiceConfiguration": {"osFamily": "6"}}),
            400,
            "InvalidPropertyValue",
        ),
        (
            json!({"id": "p", "vmSize": "x", "cloudServiceConfiguration": {"osFamily": "6"}, "targetDedicatedNodes": -1}),
            400,
            "InvalidPropertyValue",
        ),
        (
            // A string holding a decimal integer is read as one (the az CLI sends them); others
            // are the wrong type.
            json!({"id": "p", "vmSize": "x", "cloudServiceConfiguration": {"osFamily": "6"}, "targetDedicatedNodes": "2.0"}),
            400,
            "InvalidRequestBody",
        ),
    ] {
        let r = c.req("POST", "/pools").json(&body).send().await;
        assert_eq!((r.status, r.code().as_str()), (status, code), "{body}");
    }
    let g = c.req("GET", "/pools/pool-a").send().await;
    assert_eq!(g.status, 200);
    let p = g.json();
    assert_eq!(p["id"], "Pool-A");
    assert_eq!(
        p["odata.metadata"],
        format!("{}/$metadata#pools/@Element", srv.url)
    );
    for (k, v) in [
        ("resizeTimeout", json!("PT15M")),
        ("taskSlotsPerNode", json!(1)),
        ("enableAutoScale", json!(false)),
        ("state", json!("active")),
        ("allocationState", json!("steady")),
    ] {
        assert_eq!(p[k], v, "{k}");
    }
    let etag = g.header("etag").unwrap().to_string();
    assert_eq!(p["eTag"], etag.as_str());
    let sel = c
        .req("GET", "/pools/Pool-A")
        .query(&format!("api-version={V}&%24select=id,state"))
        .send()
        .await
        .json();
    assert_eq!(
        sel.as_object()
            .unwrap()
            .keys()
            .filter(|k| !k.starts_with("odata"))
            .count(),
        2,
        "{sel}"
    );
    // Conditional GET.
    let r = c
        .req("GET", "/pools/Pool-A")
        .header("if-none-match", &etag)
        .send()
        .await;
    assert_eq!(r.status, 304);
    let r = c
        .req("GET", "/pools/Pool-A")
        .header("if-match", "0x8D0000000000000")
        .send()
        .await;
    assert_eq!((r.status, r.code().as_str()), (412, "ConditionNotMet"));
    // HEAD: 200 or 404, never a body.
    let r = c.req("HEAD", "/pools/Pool-A").send().await;
    assert_eq!((r.status, r.body.len()), (200, 0));
    let r = c.req("HEAD", "/pools/none").send().await;
    assert_eq!((r.status, r.body.len()), (404, 0));
    // Lists with paging and filters.
    for i in 0..5 {
        assert_eq!(
            c.create_pool(&format!("page{i}"), "linux", 0).await.status,
            201
        );
    }
    let mut seen = Vec::new();
    let mut query = format!("api-version={V}&maxresults=2&%24filter=startswith(id%2C%27page%27)");
    loop {
        let r = c.req("GET", "/pools").query(&query).send().await;
        assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
        let v = r.json();
        assert_eq!(v["odata.metadata"], format!("{}/$metadata#pools", srv.url));
        seen.extend(
            v["value"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["id"].as_str().unwrap().to_string()),
        );
        match v["odata.nextLink"].as_str() {
            Some(next) => query = next.split_once('?').unwrap().1.to_string(),
            None => break,
        }
    }
    assert_eq!(seen, ["page0", "page1", "page2", "page3", "page4"]);
    let v = c
        .req("GET", "/pools")
        .query(&format!(
            "api-version={V}&%24filter=id%20eq%20%27page3%27%20or%20id%20eq%20%27Pool-A%27"
        ))
        .send()
        .await
        .json();
    assert_eq!(v["value"].as_array().unwrap().len(), 2);
    // Delete: 202, then it goes.
    let r = c
        .req("DELETE", "/pools/Pool-A")
        .header("if-match", "0x8D0000000000000")
        .send()
        .await;
    assert_eq!((r.status, r.code().as_str()), (412, "ConditionNotMet"));
    assert_eq!(c.req("DELETE", "/pools/Pool-A").send().await.status, 202);
    for _ in 0..100 {
        if c.req("GET", "/pools/Pool-A").send().await.status == 404 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("the pool was never deleted");
}

#[tokio::test]
async fn nodes_list_filter_resize_and_remove() {
    let srv = Server::start();
    let c = srv.client();
    let nodes = c.ready_pool("p", "linux", 3).await;
    let n = c
        .req("GET", &format!("/pools/p/nodes/{}", nodes[0]))
        .send()
        .await;
    assert_eq!(n.status, 200);
    let v = n.json();
    assert_eq!(
        v["odata.metadata"],
        format!("{}/$metadata#nodes/@Element", srv.url)
    );
    assert!(
        v["id"].as_str().unwrap().starts_with("tvmps_")
            && v["id"].as_str().unwrap().ends_with("_d")
    );
    assert_eq!(v["affinityId"], format!("TVM:{}", nodes[0]));
    assert_eq!(
        (v["vmSize"].as_str(), v["isDedicated"].as_bool()),
        (Some("STANDARD_D2S_V3"), Some(true))
    );
    if common::replicas::replica_mode() {
        // BLUEBATCH_TEST_REPLICAS: an agent's node has the address of the agent's connection.
        assert_eq!(v["ipAddress"], "127.0.0.1");
    } else {
        assert!(v["ipAddress"].as_str().unwrap().starts_with("10."));
    }
    let page = c
        .req("GET", "/pools/p/nodes")
        .query(&format!(
            "api-version={V}&maxresults=2&%24filter=state%20eq%20%27idle%27"
        ))
        .send()
        .await
        .json();
    assert_eq!(page["value"].as_array().unwrap().len(), 2);
    assert!(
        page["odata.nextLink"]
            .as_str()
            .unwrap()
            .contains("$skiptoken=")
    );
    let r = c.req("GET", "/pools/nope/nodes").send().await;
    assert_eq!(r.code(), "PoolNotFound");
    let r = c.req("GET", "/pools/p/nodes/nope").send().await;
    assert_eq!(r.code(), "NodeNotFound");
    // Remove one node by id; an unknown id is 404 and removes nothing.
    let r = c
        .req("POST", "/pools/p/removenodes")
        .json(&json!({"nodeList": [nodes[0], "tvmps_nope_d"]}))
        .send()
        .await;
    assert_eq!((r.status, r.code().as_str()), (404, "NodeNotFound"));
    let r = c
        .req("POST", "/pools/p/removenodes")
        .json(&json!({"nodeList": [nodes[0]]}))
        .send()
        .await;
    assert_eq!(r.status, 202, "{:?}", String::from_utf8_lossy(&r.body));
    let r = c
        .req("POST", "/pools/p/resize")
        .json(&json!({"targetDedicatedNodes": 5}))
        .send()
        .await;
    assert_eq!((r.status, r.code().as_str()), (409, "PoolBeingResized"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let p = c.req("GET", "/pools/p").send().await.json();
        if p["allocationState"] == "steady" {
            assert_eq!(
                (
                    p["currentDedicatedNodes"].as_u64(),
                    p["targetDedicatedNodes"].as_u64()
                ),
                (Some(2), Some(2))
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        c.req("GET", &format!("/pools/p/nodes/{}", nodes[0]))
            .send()
            .await
            .code(),
        "NodeNotFound"
    );
    let r = c
        .req("POST", "/pools/p/resize")
        .json(&json!({"targetDedicatedNodes": 4, "targetLowPriorityNodes": 1}))
        .send()
        .await;
    assert_eq!(r.status, 202);
    let all = loop {
        let v = c.req("GET", "/pools/p/nodes").send().await.json();
        let list = v["value"].as_array().unwrap().clone();
        if list.len() == 5 && list.iter().all(|n| n["state"] == "idle") {
            break list;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(all.iter().filter(|n| n["isDedicated"] == false).count(), 1);
}
