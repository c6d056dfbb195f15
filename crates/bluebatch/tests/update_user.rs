//! Compute Node – Update User over real HTTP, status codes, headers and Batch errors.

mod common;

use common::{Client, Server, V};
use serde_json::json;

const KEY_ED25519: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl me@host";

fn is_guid(s: &str) -> bool {
    uuid_like(s)
}

fn uuid_like(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && [8, 4, 4, 4, 12]
            .iter()
            .zip(&parts)
            .all(|(n, p)| p.len() == *n && p.chars().all(|c| c.is_ascii_hexdigit()))
}

#[tokio::test]
async fn update_user_answers_200_with_azure_headers() {
    let srv = Server::start();
    let c = srv.client();
    let nodes = c.ready_pool("pool1", "linux", 1).await;
    let path = Client::user_path("pool1", &nodes[0], "alice");
    let r = c
        .req("POST", &format!("/pools/pool1/nodes/{}/users", nodes[0]))
        .json(&json!({"name": "alice", "password": "first", "isAdmin": true}))
        .send()
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let etag_add = r.header("etag").unwrap().to_string();

    // The seed's own example, with a client-request-id echoed on request.
    let crid = "9c4d50ee-2d56-4cd3-8152-34347dc9f2b0";
    let r = c
        .req("PUT", &path)
        .query(&format!("api-version={V}&timeout=30"))
        .header("client-request-id", crid)
        .header("return-client-request-id", "true")
        .json(&json!({"password": "12345", "expiryTime": "2016-11-27T00:45:48.7320857Z"}))
        .send()
        .await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert!(r.body.is_empty());
    assert!(is_guid(r.header("request-id").unwrap()));
    assert_eq!(r.header("client-request-id"), Some(crid));
    let etag = r.header("etag").unwrap();
    assert!(etag.starts_with("0x8D") && !etag.contains('"'), "{etag}");
    assert_ne!(etag, etag_add, "the ETag changes on every write");
    assert!(r.header("last-modified").unwrap().ends_with(" GMT"));
    assert_eq!(
        r.header("dataserviceid").unwrap(),
        format!("{}{path}", srv.url)
    );

    // Without return-client-request-id the id is not echoed.
    let r = c
        .req("PUT", &path)
        .header("client-request-id", crid)
        .json(&json!({}))
        .send()
        .await;
    assert_eq!(r.status, 200);
    assert!(r.header("client-request-id").is_none());

    // Key only; every published api-version works, and the 15.x spelling of timeout.
    for v in [
        "2025-06-01",
        "2024-02-01.19.0",
        "2022-10-01.16.0",
        "2017-01-01.4.0",
    ] {
        let r = c
            .req("PUT", &path)
            .query(&format!("api-version={v}&timeOut=10"))
            .json(&json!({"sshPublicKey": KEY_ED25519}))
            .send()
            .await;
        assert_eq!(r.status, 200, "{v}: {:?}", String::from_utf8_lossy(&r.body));
    }
}

/// (what, path, body, status, code, expected value)
type Case<'a> = (
    &'a str,
    String,
    Option<&'a [u8]>,
    u16,
    &'a str,
    Option<(&'a str, &'a str)>,
);

#[tokio::test]
async fn update_user_errors_in_contract_order() {
    let srv = Server::start();
    let c = srv.client();
    let linux = c.ready_pool("lin", "linux", 1).await;
    let win = c.ready_pool("win", "windows", 1).await;
    let r = c
        .req("POST", &format!("/pools/lin/nodes/{}/users", linux[0]))
        .json(&json!({"name": "bob", "password": "pw"}))
        .send()
        .await;
    assert_eq!(r.status, 201);
    let r = c
        .req("POST", &format!("/pools/win/nodes/{}/users", win[0]))
        .json(&json!({"name": "Bob", "password": "pw"}))
        .send()
        .await;
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
    let lp = Client::user_path("lin", &linux[0], "bob");
    let wp = Client::user_path("win", &win[0], "bob");

    let cases: Vec<Case> = vec![
        // Lookups, in order pool → node → user.
        (
            "unknown pool",
            Client::user_path("nope", &linux[0], "bob"),
            Some(b"{}"),
            404,
            "PoolNotFound",
            None,
        ),
        (
            "unknown node",
            Client::user_path("lin", "tvmps_x_d", "bob"),
            Some(b"{}"),
            404,
            "NodeNotFound",
            None,
        ),
        (
            "unknown user",
            Client::user_path("lin", &linux[0], "carol"),
            Some(b"{}"),
            404,
            "NodeUserNotFound",
            None,
        ),
        (
            "user names are case-sensitive on Linux",
            Client::user_path("lin", &linux[0], "BOB"),
            Some(b"{}"),
            404,
            "NodeUserNotFound",
            None,
        ),
        // Body errors come before lookups.
        (
            "body before lookups",
            Client::user_path("nope", "n", "u"),
            Some(b"{"),
            400,
            "InvalidRequestBody",
            None,
        ),
        (
            "empty body",
            lp.clone(),
            Some(b""),
            400,
            "InvalidRequestBody",
            None,
        ),
        (
            "not an object",
            lp.clone(),
            Some(b"[1]"),
            400,
            "InvalidRequestBody",
            None,
        ),
        (
            "not UTF-8",
            lp.clone(),
            Some(b"{\"password\":\"\xff\"}"),
            400,
            "InvalidRequestBody",
            None,
        ),
        (
            "isAdmin is not updatable",
            lp.clone(),
            Some(br#"{"isAdmin":true}"#),
            400,
            "InvalidRequestBody",
            Some(("PropertyName", "isAdmin")),
        ),
        (
            "name is not updatable",
            lp.clone(),
            Some(br#"{"name":"x"}"#),
            400,
            "InvalidRequestBody",
            Some(("PropertyName", "name")),
        ),
        (
            "wrong type",
            lp.clone(),
            Some(br#"{"password":12345}"#),
            400,
            "InvalidRequestBody",
            Some(("PropertyName", "password")),
        ),
        (
            "bad date",
            lp.clone(),
            Some(br#"{"expiryTime":"next tuesday"}"#),
            400,
            "InvalidPropertyValue",
            Some(("PropertyName", "expiryTime")),
        ),
        (
            "date without zone",
            lp.clone(),
            Some(br#"{"expiryTime":"2030-01-01T00:00:00"}"#),
            400,
            "InvalidPropertyValue",
            Some(("PropertyName", "expiryTime")),
        ),
        (
            "empty password",
            lp.clone(),
            Some(br#"{"password":""}"#),
            400,
            "InvalidPropertyValue",
            Some(("PropertyName", "password")),
        ),
        (
            "not a key",
            lp.clone(),
            Some(br#"{"sshPublicKey":"hello"}"#),
            400,
            "InvalidPropertyValue",
            Some(("PropertyName", "sshPublicKey")),
        ),
        // Windows rules need the node: key first, then the missing password.
        (
            "key on Windows",
            wp.clone(),
            Some(
                format!(r#"{{"sshPublicKey":"{KEY_ED25519}"}}"#)
                    .into_bytes()
                    .leak(),
            ),
            400,
            "InvalidPropertyValue",
            Some(("PropertyName", "sshPublicKey")),
        ),
        (
            "Windows needs a password",
            wp.clone(),
            Some(b"{}"),
            400,
            "MissingRequiredProperty",
            Some(("PropertyName", "password")),
        ),
    ];
    for (what, path, body, status, code, value) in cases {
        let mut req = c.req("PUT", &path);
        if let Some(b) = body {
            req = req.raw(b.to_vec());
        }
        let r = req.send().await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (status, code),
            "{what}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let msg = r.json()["message"]["value"].as_str().unwrap().to_string();
        assert!(
            msg.contains("\nRequestId:") && msg.contains("\nTime:"),
            "{what}: {msg}"
        );
        assert_eq!(r.json()["message"]["lang"], "en-US");
        assert!(r.json()["odata.metadata"].as_str().unwrap().ends_with(
            "$metadata#Microsoft.Azure.Batch.Protocol.Entities.Container.errors/@Element"
        ));
        if let Some((k, v)) = value {
            assert_eq!(r.value(k).as_deref(), Some(v), "{what}: {:?}", r.values());
        }
    }
    // Windows names compare case-insensitively; a valid Windows update works.
    let r = c
        .req("PUT", &wp)
        .json(&json!({"password": "new", "expiryTime": "2030-01-01T00:00:00Z"}))
        .send()
        .await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    // A pasted private key is refused and never echoed.
    let private = "-----BEGIN OPENSSH PRIVATE KEY-----\nVERYSECRETMATERIAL\n-----END OPENSSH PRIVATE KEY-----";
    let r = c
        .req("PUT", &lp)
        .json(&json!({"sshPublicKey": private}))
        .send()
        .await;
    assert_eq!((r.status, r.code().as_str()), (400, "InvalidPropertyValue"));
    assert!(!String::from_utf8_lossy(&r.body).contains("VERYSECRET"));
    assert!(r.value("Reason").unwrap().contains("private key"));
}

#[tokio::test]
async fn user_operations_need_an_idle_or_running_node() {
    let srv = Server::start();
    let c = srv.client();
    let nodes = c.ready_pool("p", "linux", 1).await;
    let n = &nodes[0];
    assert_eq!(
        c.req("POST", &format!("/pools/p/nodes/{n}/users"))
            .json(&json!({"name": "u1", "password": "x"}))
            .send()
            .await
            .status,
        201
    );
    // Disable scheduling: an idle node goes offline; user operations are then refused with 409.
    let r = c
        .req("POST", &format!("/pools/p/nodes/{n}/disablescheduling"))
        .send()
        .await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    let node = c
        .req("GET", &format!("/pools/p/nodes/{n}"))
        .send()
        .await
        .json();
    assert_eq!(
        (node["state"].as_str(), node["schedulingState"].as_str()),
        (Some("offline"), Some("disabled"))
    );
    let r = c
        .req("PUT", &Client::user_path("p", n, "u1"))
        .json(&json!({}))
        .send()
        .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (409, "OperationInvalidForCurrentState")
    );
    let r = c
        .req("POST", &format!("/pools/p/nodes/{n}/users"))
        .json(&json!({"name": "u2"}))
        .send()
        .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (409, "OperationInvalidForCurrentState")
    );
    let r = c
        .req("DELETE", &Client::user_path("p", n, "u1"))
        .send()
        .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (409, "OperationInvalidForCurrentState")
    );
    let r = c
        .req("POST", &format!("/pools/p/nodes/{n}/disablescheduling"))
        .send()
        .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (409, "NodeAlreadyInTargetSchedulingState")
    );
    assert_eq!(
        c.req("POST", &format!("/pools/p/nodes/{n}/enablescheduling"))
            .send()
            .await
            .status,
        200
    );
    assert_eq!(
        c.req("PUT", &Client::user_path("p", n, "u1"))
            .json(&json!({}))
            .send()
            .await
            .status,
        200
    );
    // Rebooting: 409 NodeBeingRebooted until the node is back.
    assert_eq!(
        c.req("POST", &format!("/pools/p/nodes/{n}/reboot"))
            .send()
            .await
            .status,
        202
    );
    let r = c
        .req("PUT", &Client::user_path("p", n, "u1"))
        .json(&json!({}))
        .send()
        .await;
    assert_eq!((r.status, r.code().as_str()), (409, "NodeBeingRebooted"));
}

#[tokio::test]
async fn add_and_delete_user() {
    let srv = Server::start();
    let c = srv.client();
    let nodes = c.ready_pool("p", "linux", 1).await;
    let users = format!("/pools/p/nodes/{}/users", nodes[0]);
    let r = c.req("POST", &users).json(&json!({"name": "userName", "isAdmin": false, "expiryTime": "2017-08-01T00:00:00Z", "password": "Password"})).send().await;
    assert_eq!(r.status, 201);
    assert!(r.header("etag").is_some() && r.header("last-modified").is_some());
    assert!(
        r.header("dataserviceid")
            .unwrap()
            .ends_with(&format!("{users}/userName"))
    );
    let r = c
        .req("POST", &users)
        .json(&json!({"name": "userName", "password": "x"}))
        .send()
        .await;
    assert_eq!((r.status, r.code().as_str()), (409, "NodeUserExists"));
    for (body, code) in [
        (json!({"password": "x"}), "MissingRequiredProperty"),
        (json!({"name": "root"}), "InvalidPropertyValue"),
        (json!({"name": "has space"}), "InvalidPropertyValue"),
        (json!({"name": "ok", "bogus": 1}), "InvalidRequestBody"),
    ] {
        let r = c.req("POST", &users).json(&body).send().await;
        assert_eq!((r.status, r.code().as_str()), (400, code), "{body}");
    }
    let r = c.req("DELETE", &format!("{users}/userName")).send().await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("etag").is_none(),
        "Delete User lists only request ids"
    );
    let r = c.req("DELETE", &format!("{users}/userName")).send().await;
    assert_eq!((r.status, r.code().as_str()), (404, "NodeUserNotFound"));
    let r = c
        .req("PUT", &format!("{users}/userName"))
        .json(&json!({}))
        .send()
        .await;
    assert_eq!((r.status, r.code().as_str()), (404, "NodeUserNotFound"));
}

#[tokio::test]
async fn durable_across_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (node, port) = {
        let mut srv = Server::start_in(dir.path());
        let c = srv.client();
        let nodes = c.ready_pool("keep", "linux", 1).await;
        let users = format!("/pools/keep/nodes/{}/users", nodes[0]);
        assert_eq!(
            c.req("POST", &users)
                .json(&json!({"name": "stays", "password": "x"}))
                .send()
                .await
                .status,
            201
        );
        assert_eq!(
            c.req("POST", &users)
                .json(&json!({"name": "goes", "password": "x"}))
                .send()
                .await
                .status,
            201
        );
        assert_eq!(
            c.req("DELETE", &format!("{users}/goes"))
                .send()
                .await
                .status,
            200
        );
        let rl = c
            .req(
                "GET",
                &format!("/pools/keep/nodes/{}/remoteloginsettings", nodes[0]),
            )
            .send()
            .await
            .json();
        srv.kill(); // SIGKILL: acknowledged writes must already be on disk
        (nodes[0].clone(), rl["remoteLoginPort"].as_u64().unwrap())
    };
    let srv = Server::start_in(dir.path());
    let c = srv.client();
    let pool = c.req("GET", "/pools/keep").send().await;
    assert_eq!(pool.status, 200);
    assert_eq!(pool.json()["currentDedicatedNodes"], 1);
    let users = format!("/pools/keep/nodes/{node}/users");
    assert_eq!(
        c.req("PUT", &format!("{users}/stays"))
            .json(&json!({}))
            .send()
            .await
            .status,
        200
    );
    assert_eq!(
        c.req("PUT", &format!("{users}/goes"))
            .json(&json!({}))
            .send()
            .await
            .code(),
        "NodeUserNotFound"
    );
    let rl = c
        .req(
            "GET",
            &format!("/pools/keep/nodes/{node}/remoteloginsettings"),
        )
        .send()
        .await
        .json();
    assert_eq!(
        rl["remoteLoginPort"].as_u64().unwrap(),
        port,
        "the node keeps its SSH port"
    );
}
