//! The node protocol's HTTP endpoints and the operator's control endpoints and CLI for agent
//! capacity, against the real binary (`serve --nodes agents`), with a hand-driven agent (plain
//! HTTP requests, as `bluebatch agent` sends them): join with forged, expired, reused, revoked
//! and pool-scoped tokens; credentials of another host and of a revoked host; malformed bodies,
//! verbs and queries; the long poll (at once on a change, `changed: false` at the end of the
//! wait, at once when the server shuts down); the control endpoints' exact JSON; the CLI's
//! output; agents exempt from the per-source connection cap; secrets never in the log.

mod common;

use common::agents::{create_token, report, token, wait_nodes};
use common::{Client, Resp, Server, bluebatch_cli, respond, text, within};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);

fn agents_server() -> Server {
    Server::launch(&["--in-memory", "--nodes", "agents"])
}

/// A hand-driven agent: the protocol's requests, sent as the real agent sends them.
struct Agent {
    base: String,
    http: reqwest::Client,
    credential: Option<String>,
    host_id: Option<String>,
}

impl Agent {
    fn new(base: &str) -> Self {
        Agent {
            base: base.to_string(),
            http: reqwest::Client::builder().timeout(T).build().unwrap(),
            credential: None,
            host_id: None,
        }
    }

    /// POST /_bluebatch/agent/join with `body` as is.
    async fn join_raw(&self, body: &[u8]) -> Resp {
        let r = self
            .http
            .post(format!("{}/_bluebatch/agent/join", self.base))
            .header("content-type", "application/json")
            .body(body.to_vec())
            .send()
            .await
            .expect("join: no answer");
        respond(r).await
    }

    async fn join(&self, token: &str, hostname: &str, slots: u32) -> Resp {
        let body = json!({"token": token, "host": report(hostname, slots)});
        self.join_raw(body.to_string().as_bytes()).await
    }

    /// Joins; panics unless 200, keeps the credential.
    async fn joined(base: &str, token: &str, hostname: &str, slots: u32) -> Agent {
        let mut a = Agent::new(base);
        let r = a.join(token, hostname, slots).await;
        assert_eq!(r.status, 200, "join: {}", text(&r));
        let v = r.json();
        a.credential = Some(v["credential"].as_str().unwrap().to_string());
        a.host_id = Some(v["hostId"].as_str().unwrap().to_string());
        a
    }

    fn authorized(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.credential {
            Some(c) => rb.header("authorization", format!("BluebatchNode {c}")),
            None => rb,
        }
    }

    async fn desired(&self, query: &str) -> Resp {
        self.desired_within(query, T).await
    }

    async fn desired_within(&self, query: &str, limit: Duration) -> Resp {
        let rb = self
            .http
            .get(format!("{}/_bluebatch/agent/desired?{query}", self.base))
            .timeout(limit);
        respond(
            self.authorized(rb)
                .send()
                .await
                .expect("desired: no answer"),
        )
        .await
    }

    async fn post(&self, path: &str, body: &[u8]) -> Resp {
        let rb = self
            .http
            .post(format!("{}/_bluebatch/agent/{path}", self.base))
            .header("content-type", "application/json")
            .body(body.to_vec());
        respond(self.authorized(rb).send().await.expect("post: no answer")).await
    }

    async fn ack(&self, body: &Value) -> Resp {
        self.post("ack", body.to_string().as_bytes()).await
    }
}

fn assert_error(r: &Resp, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", text(r));
    assert_eq!(r.code(), code, "{}", text(r));
}

#[tokio::test]
async fn join_tokens_have_the_documented_json_and_are_listed_and_revoked() {
    let s = agents_server();
    let c = s.client();
    let r = create_token(&c, json!({"pool": "p1", "ttl": "2h"})).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    let v = r.json();
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, ["id", "token", "pool", "expires", "caFingerprint"]);
    let id = v["id"].as_str().unwrap();
    assert_eq!(id.len(), 6, "{v}");
    assert!(
        id.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
        "{v}"
    );
    let token = v["token"].as_str().unwrap();
    let (tid, secret) = token.split_once('.').unwrap();
    assert_eq!(tid, id);
    assert!(secret.len() >= 32, "{v}");
    assert_eq!(v["pool"], "p1");
    assert_eq!(v["caFingerprint"], Value::Null, "no HTTPS: no fingerprint");
    let expires = time::OffsetDateTime::parse(
        v["expires"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let left = expires - time::OffsetDateTime::now_utc();
    assert!(
        left > time::Duration::minutes(119) && left <= time::Duration::hours(2),
        "{left}"
    );

    // Listed without the secret; any pool and the default expiry of 24 h.
    let any = create_token(&c, json!({})).await.json();
    assert_eq!(any["pool"], Value::Null);
    let list = c.control("GET", "/join-tokens").send_within(T).await;
    assert_eq!(list.status, 200, "{}", text(&list));
    let list = list.json();
    assert!(!list.to_string().contains(secret), "{list}");
    let entry = list["value"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id)
        .cloned()
        .unwrap();
    assert_eq!(
        entry,
        json!({"id": id, "pool": "p1", "expires": v["expires"], "used": false})
    );

    // Revoked: listed no more, and joining with it is refused.
    let r = c
        .control("DELETE", &format!("/join-tokens/{id}"))
        .send_within(T)
        .await;
    assert_eq!(r.status, 200, "{}", text(&r));
    let list = c.control("GET", "/join-tokens").send_within(T).await.json();
    assert!(
        !list["value"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["id"] == id),
        "{list}"
    );
    let r = Agent::new(&s.url).join(token, "h1", 1).await;
    assert_error(&r, 403, "AuthenticationFailed");
    let r = c
        .control("DELETE", "/join-tokens/zzzzzz")
        .send_within(T)
        .await;
    assert_eq!(r.status, 404, "{}", text(&r));

    // Bad bodies.
    for (body, status, code) in [
        (json!({"ttl": "soon"}), 400, "InvalidPropertyValue"),
        (json!({"ttl": "0s"}), 400, "InvalidPropertyValue"),
        (json!({"pool": 7}), 400, "InvalidPropertyValue"),
        (json!({"pool": ""}), 400, "InvalidPropertyValue"),
        (json!({"tll": "1h"}), 400, "InvalidRequestBody"),
    ] {
        let r = create_token(&c, body.clone()).await;
        assert_error(&r, status, code);
    }
    // The same Shared Key as the Batch API: unsigned is refused.
    let r = c
        .control("POST", "/join-tokens")
        .unsigned()
        .json(&json!({}))
        .send_within(T)
        .await;
    assert_eq!(r.status, 401, "{}", text(&r));
    // Verbs.
    let r = c.control("PUT", "/join-tokens").send_within(T).await;
    assert_error(&r, 405, "UnsupportedHttpVerb");
}

#[tokio::test]
async fn join_refuses_forged_expired_reused_and_malformed_tokens() {
    let s = agents_server();
    let c = s.client();
    let good = token(&c, None).await;
    let (id, secret) = good.split_once('.').unwrap();
    let a = Agent::new(&s.url);

    // Forged: the right id with another secret, an unknown id, no dot, empty.
    let mut flipped = secret.to_string().into_bytes();
    flipped[0] = if flipped[0] == b'a' { b'b' } else { b'a' };
    let forged = format!("{id}.{}", String::from_utf8(flipped).unwrap());
    for t in [
        forged.as_str(),
        "abcdef.0123456789abcdef0123456789abcdef",
        "nodot",
        "",
    ] {
        let r = a.join(t, "h1", 1).await;
        assert_error(&r, 403, "AuthenticationFailed");
    }
    // The forged attempts did not use the token up.
    let first = a.join(&good, "h1", 1).await;
    assert_eq!(first.status, 200, "{}", text(&first));
    let v = first.json();
    assert_eq!(v["account"], common::ACCOUNT);
    assert!(v["credential"].as_str().is_some_and(|c| !c.is_empty()));
    assert!(v["graceSeconds"].as_u64().is_some(), "{v}");
    // Reused.
    let again = a.join(&good, "h2", 1).await;
    assert_error(&again, 403, "AuthenticationFailed");
    // Listed as used.
    let list = c.control("GET", "/join-tokens").send_within(T).await.json();
    let entry = list["value"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id)
        .cloned()
        .unwrap();
    assert_eq!(entry["used"], true, "{list}");

    // Expired.
    let r = create_token(&c, json!({"ttl": "1s"})).await;
    let short = r.json()["token"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let r = a.join(&short, "h3", 1).await;
    assert_error(&r, 403, "AuthenticationFailed");

    // Malformed bodies: unknown property, missing property, wrong type, not JSON, empty.
    let fresh = token(&c, None).await;
    let host = report("h4", 1);
    for body in [
        json!({"token": fresh, "host": host, "extra": 1}).to_string(),
        json!({"token": fresh}).to_string(),
        json!({"token": 5, "host": host}).to_string(),
        json!({"token": fresh, "host": {"hostname": "h", "provider": "windows", "slots": 1,
               "address": "127.0.0.1"}})
        .to_string(),
        "{not json".to_string(),
        String::new(),
    ] {
        let r = a.join_raw(body.as_bytes()).await;
        assert_error(&r, 400, "InvalidRequestBody");
    }
    // Beyond --max-body-bytes (1 MiB by default): 413 before any token is looked at.
    let huge = json!({"token": fresh, "host": {"hostname": "h", "provider": "simulate",
        "slots": 1, "address": "127.0.0.1", "reservedNames": vec!["x".repeat(1000); 1100]}});
    let r = a.join_raw(huge.to_string().as_bytes()).await;
    assert_error(&r, 413, "RequestBodyTooLarge");
    // Not JSON by its content type.
    let r = respond(
        a.http
            .post(format!("{}/_bluebatch/agent/join", s.url))
            .header("content-type", "text/plain")
            .body(json!({"token": fresh, "host": host}).to_string())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_error(&r, 400, "InvalidHeaderValue");
    // None of them used the token.
    let r = a.join(&fresh, "h4", 1).await;
    assert_eq!(r.status, 200, "{}", text(&r));

    // Wrong verb; unknown agent path; no api-version needed anywhere.
    let r = a
        .http
        .get(format!("{}/_bluebatch/agent/join", s.url))
        .send()
        .await
        .unwrap();
    let r = respond(r).await;
    assert_error(&r, 405, "UnsupportedHttpVerb");
    let r = a.post("nothing-here", b"{}").await;
    assert_error(&r, 400, "InvalidUri");
}

#[tokio::test]
async fn node_credentials_are_checked_per_host_and_die_with_a_revoked_host() {
    let s = agents_server();
    let c = s.client();
    let a = Agent::joined(&s.url, &token(&c, None).await, "ha", 1).await;
    let b = Agent::joined(&s.url, &token(&c, None).await, "hb", 1).await;
    assert_ne!(a.host_id, b.host_id);

    // No credential, another scheme, a garbage credential.
    let mut anon = Agent::new(&s.url);
    let r = anon.desired("").await;
    assert_error(&r, 401, "AuthenticationFailed");
    assert_eq!(r.header("www-authenticate"), Some("BluebatchNode"));
    let r = respond(
        anon.http
            .get(format!("{}/_bluebatch/agent/desired", s.url))
            .header("authorization", "Bearer abc")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_error(&r, 400, "InvalidAuthenticationInfo");
    anon.credential = Some("garbage".into());
    let r = anon.desired("").await;
    assert_error(&r, 403, "AuthenticationFailed");
    // A credential with one character of its signature changed (to another hex digit: hex is
    // read in either case, so `a` → `A` would not change it).
    let mut cred = a.credential.clone().unwrap().into_bytes();
    let last = cred.len() - 1;
    cred[last] = if cred[last] == b'0' { b'1' } else { b'0' };
    anon.credential = Some(String::from_utf8(cred).unwrap());
    let r = anon.desired("").await;
    assert_error(&r, 403, "AuthenticationFailed");

    // A pool of two nodes: one on each host.
    let r = c.create_pool("p", "linux", 2).await;
    assert_eq!(r.status, 201, "{}", text(&r));
    let da = a.desired("").await;
    assert_eq!(da.status, 200, "{}", text(&da));
    let da = da.json();
    let db = b.desired("").await.json();
    let key_a = da["nodes"][0]["key"].as_str().unwrap().to_string();
    let key_b = db["nodes"][0]["key"].as_str().unwrap().to_string();
    let rev_b = db["nodes"][0]["revision"].as_u64().unwrap();
    // Host A acknowledging host B's node: refused; its own: taken.
    let r = a
        .ack(&json!({"nodes": [{"key": key_b, "revision": rev_b, "image": 0}]}))
        .await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(r.json()["refused"], json!([key_b]));
    let rev_a = da["nodes"][0]["revision"].as_u64().unwrap();
    let r = a
        .ack(&json!({"nodes": [{"key": key_a, "revision": rev_a, "image": 0}]}))
        .await;
    assert_eq!(r.json()["refused"], json!([]), "{}", text(&r));
    // A revision above the desired one: refused.
    let r = a
        .ack(&json!({"nodes": [{"key": key_a, "revision": rev_a + 5, "image": 0}]}))
        .await;
    assert_eq!(r.json()["refused"], json!([key_a]), "{}", text(&r));
    // Malformed acknowledgements.
    for body in [
        json!({"nodes": [{"key": key_a, "revision": rev_a, "image": 0, "x": 1}]}).to_string(),
        json!({"nodes": [{"key": key_a}]}).to_string(),
        json!({"nodes": "all"}).to_string(),
        "[]".to_string(),
    ] {
        let r = a.post("ack", body.as_bytes()).await;
        assert_error(&r, 400, "InvalidRequestBody");
    }
    let r = a.post("hello", b"{\"hostname\":\"ha\"}").await;
    assert_error(&r, 400, "InvalidRequestBody");
    let r = a
        .post("hello", report("ha", 1).to_string().as_bytes())
        .await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(r.json()["hostId"], json!(a.host_id));

    // Revoke host B: its credential is refused, its node leaves the pool.
    let hb = b.host_id.clone().unwrap();
    let r = c
        .control("POST", &format!("/hosts/{hb}/revoke"))
        .send_within(T)
        .await;
    assert_eq!(r.status, 200, "{}", text(&r));
    let r = b.desired("").await;
    assert_error(&r, 403, "AuthenticationFailed");
    let r = b
        .ack(&json!({"nodes": [{"key": key_b, "revision": rev_b, "image": 0}]}))
        .await;
    assert_error(&r, 403, "AuthenticationFailed");
    let left = wait_nodes(&c, "p", 1).await;
    assert_ne!(left[0]["id"], db["nodes"][0]["nodeId"], "{left:?}");
    // Host A is untouched.
    assert_eq!(a.desired("").await.status, 200);
}

#[tokio::test]
async fn the_long_poll_answers_at_once_on_a_change_and_unchanged_at_the_end_of_the_wait() {
    let s = agents_server();
    let c = s.client();
    let a = Agent::joined(&s.url, &token(&c, None).await, "h", 2).await;
    let first = a.desired("").await;
    assert_eq!(first.status, 200, "{}", text(&first));
    let first = first.json();
    assert_eq!(first["nodes"], json!([]));
    let cursor = first["cursor"].as_str().unwrap().to_string();

    // Nothing changes: `changed: false` at the end of the wait (2 s), not before.
    let t0 = Instant::now();
    let r = a.desired(&format!("after={cursor}&wait=2")).await;
    let took = t0.elapsed();
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(r.json()["changed"], false);
    assert_eq!(r.json()["cursor"], cursor.as_str());
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(8),
        "{took:?}"
    );
    // `30s` spelled with its unit is accepted too.
    let r = a.desired(&format!("after={cursor}&wait=1s")).await;
    assert_eq!(r.status, 200, "{}", text(&r));

    // A change while a poll waits: answered at once.
    let poll = {
        let q = format!("after={cursor}&wait=30");
        let base = s.url.clone();
        let cred = a.credential.clone();
        tokio::spawn(async move {
            let mut b = Agent::new(&base);
            b.credential = cred;
            let t0 = Instant::now();
            (b.desired(&q).await, t0.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = c.create_pool("p", "linux", 1).await;
    assert_eq!(r.status, 201, "{}", text(&r));
    let (r, took) = within(T, "the waiting poll", poll).await.unwrap();
    assert_eq!(r.status, 200, "{}", text(&r));
    let v = r.json();
    assert_eq!(v["changed"], true, "{v}");
    assert_ne!(v["cursor"], cursor.as_str());
    assert_eq!(v["nodes"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["nodes"][0]["poolId"], "p");
    assert!(took < Duration::from_secs(10), "{took:?}");
    // A different cursor than the current state's: answered at once.
    let t0 = Instant::now();
    let r = a.desired("after=stale&wait=30").await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(r.json()["changed"], true);
    assert!(t0.elapsed() < Duration::from_secs(10));

    // Bad queries.
    for q in [
        "wait=-1",
        "wait=1.5",
        "wait=forever",
        "wait=1&wait=2",
        "after=a&after=b",
    ] {
        let r = a.desired(q).await;
        assert_error(&r, 400, "InvalidQueryParameterValue");
    }
    let r = a.desired("api-version=2023-11-01.18.0").await;
    assert_error(&r, 400, "UnsupportedQueryParameter");
    let r = a.post("desired", b"").await;
    assert_error(&r, 405, "UnsupportedHttpVerb");
}

#[tokio::test]
async fn a_long_poll_answers_at_once_when_the_server_shuts_down() {
    let mut s = agents_server();
    let c = s.client();
    let a = Agent::joined(&s.url, &token(&c, None).await, "h", 1).await;
    let cursor = a.desired("").await.json()["cursor"]
        .as_str()
        .unwrap()
        .to_string();
    let poll = {
        let q = format!("after={cursor}&wait=60");
        let base = s.url.clone();
        let cred = a.credential.clone();
        tokio::spawn(async move {
            let mut b = Agent::new(&base);
            b.credential = cred;
            b.desired_within(&q, Duration::from_secs(70)).await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = Instant::now();
    Command::new("kill")
        .arg(s.child.id().to_string())
        .status()
        .unwrap();
    let r = within(Duration::from_secs(15), "the poll at shutdown", poll)
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(r.json()["changed"], false);
    within(Duration::from_secs(15), "serve to exit", async {
        loop {
            if s.child.try_wait().unwrap().is_some() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
}

#[tokio::test]
async fn hosts_are_listed_drained_and_revoked_with_the_documented_json() {
    let s = agents_server();
    let c = s.client();
    let a = Agent::joined(&s.url, &token(&c, None).await, "host-a", 2).await;
    let id = a.host_id.clone().unwrap();
    let r = c.create_pool("p", "linux", 1).await;
    assert_eq!(r.status, 201, "{}", text(&r));
    let nodes = wait_nodes(&c, "p", 1).await;
    assert_eq!(a.desired("").await.status, 200);

    let list = c.control("GET", "/hosts").send_within(T).await;
    assert_eq!(list.status, 200, "{}", text(&list));
    let list = list.json();
    let h = &list["value"][0];
    let keys: Vec<&str> = h.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "id",
            "account",
            "hostname",
            "provider",
            "address",
            "sshPort",
            "slots",
            "nodes",
            "drained",
            "connected",
            "lastSeen"
        ]
    );
    assert_eq!(h["id"], id.as_str());
    assert_eq!(h["account"], common::ACCOUNT);
    assert_eq!(h["hostname"], "host-a");
    assert_eq!(h["provider"], "simulate");
    assert_eq!(h["address"], "127.0.0.1");
    assert_eq!(h["sshPort"], Value::Null);
    assert_eq!(h["slots"], 2);
    assert_eq!(
        h["nodes"],
        json!([{"poolId": "p", "nodeId": nodes[0]["id"]}])
    );
    assert_eq!(h["drained"], false);
    assert_eq!(h["connected"], true);
    assert!(h["lastSeen"].is_string(), "{h}");
    assert!(!list.to_string().contains(a.credential.as_deref().unwrap()));

    // Drained: answered with the host; it keeps its node but takes no new pool.
    let r = c
        .control("POST", &format!("/hosts/{id}/drain"))
        .send_within(T)
        .await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(r.json()["drained"], true);
    assert_eq!(r.json()["nodes"].as_array().unwrap().len(), 1);
    let r = c.create_pool("q", "linux", 1).await;
    assert_eq!(r.status, 201, "{}", text(&r));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let q = c.req("GET", "/pools/q/nodes").send_within(T).await.json();
    assert_eq!(q["value"], json!([]), "a drained host backs no new pool");
    assert_eq!(wait_nodes(&c, "p", 1).await[0]["id"], nodes[0]["id"]);

    // Unknown hosts; verbs.
    for path in ["/hosts/nope/drain", "/hosts/nope/revoke"] {
        let r = c.control("POST", path).send_within(T).await;
        assert_eq!(r.status, 404, "{}", text(&r));
    }
    let r = c.control("POST", "/hosts").send_within(T).await;
    assert_error(&r, 405, "UnsupportedHttpVerb");
    let r = c
        .control("GET", &format!("/hosts/{id}/drain"))
        .send_within(T)
        .await;
    assert_error(&r, 405, "UnsupportedHttpVerb");

    // Revoked: gone from the list, its node left the pool.
    let r = c
        .control("POST", &format!("/hosts/{id}/revoke"))
        .send_within(T)
        .await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(r.json(), json!({"id": id, "revoked": true}));
    let list = c.control("GET", "/hosts").send_within(T).await.json();
    assert_eq!(list["value"], json!([]), "{list}");
    wait_nodes(&c, "p", 0).await;
}

#[tokio::test]
async fn a_pool_scoped_token_backs_only_its_pool() {
    let s = agents_server();
    let c = s.client();
    let scoped = Agent::joined(&s.url, &token(&c, Some("mine")).await, "scoped", 1).await;
    let r = c.create_pool("other", "linux", 1).await;
    assert_eq!(r.status, 201, "{}", text(&r));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let other = c
        .req("GET", "/pools/other/nodes")
        .send_within(T)
        .await
        .json();
    assert_eq!(other["value"], json!([]), "{other}");
    let r = c.create_pool("mine", "linux", 1).await;
    assert_eq!(r.status, 201, "{}", text(&r));
    wait_nodes(&c, "mine", 1).await;
    let d = scoped.desired("").await.json();
    assert_eq!(d["nodes"][0]["poolId"], "mine", "{d}");
}

#[tokio::test]
async fn authenticated_agents_are_exempt_from_the_per_source_connection_cap() {
    let s = Server::launch(&[
        "--in-memory",
        "--nodes",
        "agents",
        "--max-connections-per-source",
        "2",
    ]);
    let c = s.client();
    let a = Agent::joined(&s.url, &token(&c, None).await, "h", 1).await;
    let cursor = a.desired("").await.json()["cursor"]
        .as_str()
        .unwrap()
        .to_string();
    // Three long polls from 127.0.0.1, each on a connection of its own (three agents behind
    // one address), one after the other.
    let mut polls = Vec::new();
    for _ in 0..3 {
        let q = format!("after={cursor}&wait=8");
        let base = s.url.clone();
        let cred = a.credential.clone();
        polls.push(tokio::spawn(async move {
            let mut b = Agent::new(&base);
            b.credential = cred;
            b.desired(&q).await
        }));
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    // With all three waiting, the same address still gets ordinary requests answered.
    let fresh = Client::new(&s.url, common::ACCOUNT, common::KEY);
    let r = within(
        Duration::from_secs(5),
        "health beside three long polls",
        fresh
            .control("GET", "/health")
            .try_send_within(Duration::from_secs(5)),
    )
    .await;
    assert_eq!(r.map(|r| r.status), Ok(200));
    for p in polls {
        let r = within(T, "a long poll", p).await.unwrap();
        assert_eq!(r.status, 200, "{}", text(&r));
    }
}

#[tokio::test]
async fn secrets_never_reach_the_log() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bluebatch"))
        .args(["serve", "--port", "0", "--in-memory", "--nodes", "agents"])
        .env("BLUEBATCH_LOG", "debug,russh=warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let url = common::listening_url_within(&mut child, T);
    let stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
            .join("\n")
    });
    let c = Client::new(&url, common::ACCOUNT, common::KEY);
    let tok = token(&c, None).await;
    let a = Agent::joined(&url, &tok, "h", 1).await;
    let cred = a.credential.clone().unwrap();
    assert_eq!(a.desired("").await.status, 200);
    // Refused attempts with secrets in them too.
    let _ = a.join(&tok, "h", 1).await;
    let mut bad = Agent::new(&url);
    bad.credential = Some(format!("{cred}x"));
    let _ = bad.desired("").await;
    let _ = child.kill();
    let _ = child.wait();
    let log = log.join().unwrap();
    assert!(log.contains("/_bluebatch/agent/desired"), "{log}");
    let (_, secret) = tok.split_once('.').unwrap();
    assert!(
        !log.contains(secret),
        "the join token's secret is in the log"
    );
    assert!(!log.contains(&cred), "the node credential is in the log");
}

/// The `bluebatch` CLI for agent capacity, against `url`.
async fn cli(url: &str, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["--url", url];
    all.extend_from_slice(args);
    let o = bluebatch_cli(&all, &[("BLUEBATCH_LOG", "warn")]).await;
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_cli_prints_the_token_and_the_fingerprint_and_manages_hosts() {
    let s = agents_server();
    let c = s.client();
    // Without HTTPS: the token, then `-`, and a note on stderr.
    let (code, out, err) = cli(
        &s.url,
        &["join-token", "create", "--pool", "p", "--ttl", "1h"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    let (id, secret) = lines[0].split_once('.').unwrap();
    assert_eq!(id.len(), 6);
    assert!(secret.len() >= 32);
    assert_eq!(lines[1], "-");
    assert!(err.contains("no HTTPS"), "{err}");
    // The printed token joins.
    let a = Agent::joined(&s.url, lines[0], "cli-host", 1).await;
    let host = a.host_id.clone().unwrap();

    let (code, out, err) = cli(&s.url, &["join-token", "list"]).await;
    assert_eq!(code, 0, "{err}");
    let row: Vec<&str> = out
        .lines()
        .find(|l| l.starts_with(id))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(row[1], "p");
    assert_eq!(row[3], "yes");
    assert!(out.starts_with("ID"), "{out}");
    assert!(!out.contains(secret));

    let (code, out, err) = cli(&s.url, &["host", "list"]).await;
    assert_eq!(code, 0, "{err}");
    let row: Vec<&str> = out
        .lines()
        .find(|l| l.starts_with(&host))
        .unwrap_or_else(|| panic!("{out}"))
        .split_whitespace()
        .collect();
    assert_eq!(
        &row[1..7],
        ["cli-host", "simulate", "127.0.0.1", "-", "0/1", "no"]
    );
    let (code, out, _) = cli(&s.url, &["host", "list", "--json"]).await;
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["value"][0]["id"], host.as_str());

    let (code, out, err) = cli(&s.url, &["host", "drain", &host]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with(&format!("host {host} drained")), "{out}");
    let list = c.control("GET", "/hosts").send_within(T).await.json();
    assert_eq!(list["value"][0]["drained"], true);
    let (code, out, err) = cli(&s.url, &["host", "revoke", &host]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with(&format!("host {host} revoked")), "{out}");
    let (code, _, err) = cli(&s.url, &["host", "revoke", &host]).await;
    assert_ne!(code, 0);
    assert!(err.contains("404"), "{err}");

    let (_, out, _) = cli(&s.url, &["join-token", "create"]).await;
    let id2 = out
        .lines()
        .next()
        .unwrap()
        .split_once('.')
        .unwrap()
        .0
        .to_string();
    let (code, out, err) = cli(&s.url, &["join-token", "revoke", &id2]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), format!("join token {id2} revoked"));
    let (code, _, err) = cli(&s.url, &["join-token", "create", "--ttl", "soon"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("InvalidPropertyValue"), "{err}");
}

/// `sha256:` + hex of the DER of the (last) certificate in a PEM file.
fn pem_fingerprint(path: &std::path::Path) -> String {
    use base64::Engine;
    use sha2::Digest;
    let pem = std::fs::read_to_string(path).unwrap();
    let begin = pem.rfind("-----BEGIN CERTIFICATE-----").unwrap();
    let last = &pem[begin + "-----BEGIN CERTIFICATE-----".len()..];
    let b64: String = last
        .split("-----END CERTIFICATE-----")
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    let hex: String = sha2::Sha256::digest(&der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

#[tokio::test]
async fn with_https_the_fingerprint_is_the_ca_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let t = Server::launch_tls(&[
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--nodes",
        "agents",
    ]);
    let ca = t.ca.clone().unwrap();
    let want = pem_fingerprint(&ca);
    assert_eq!(want.len(), 7 + 64);
    // The control endpoint, over HTTPS and over HTTP alike.
    let https = Client::with_ca(&t.https, common::ACCOUNT, common::KEY, &ca);
    let r = create_token(&https, json!({})).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(r.json()["caFingerprint"], want.as_str());
    let r = create_token(&t.server.client(), json!({})).await;
    assert_eq!(r.json()["caFingerprint"], want.as_str());
    // Agents must use the HTTPS listener: on plain HTTP even a good token is refused (and
    // not used up).
    let tok = r.json()["token"].as_str().unwrap().to_string();
    let r = Agent::new(&t.server.url).join(&tok, "h", 1).await;
    assert_error(&r, 403, "AuthenticationFailed");
    assert!(
        r.value("AuthenticationErrorDetail")
            .is_some_and(|d| d.contains("HTTPS")),
        "{}",
        text(&r)
    );
    let mut over_https = Agent::new(&t.https);
    over_https.http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&ca).unwrap()).unwrap())
        .timeout(T)
        .build()
        .unwrap();
    let r = over_https.join(&tok, "h", 1).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    // The CLI's second line.
    let (code, out, err) = cli(&t.server.url, &["join-token", "create"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().nth(1), Some(want.as_str()), "{out}");
    // The CLI over HTTPS: trusting the CA from BLUEBATCH_CA_FILE; without it, a hint.
    let ca_text = ca.to_str().unwrap();
    let o = bluebatch_cli(
        &["--url", &t.https, "join-token", "create"],
        &[("BLUEBATCH_LOG", "warn"), ("BLUEBATCH_CA_FILE", ca_text)],
    )
    .await;
    assert!(o.status.success(), "{o:?}");
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(out.lines().nth(1), Some(want.as_str()), "{out}");
    let o = bluebatch_cli(
        &["--url", &t.https, "host", "list"],
        &[("BLUEBATCH_LOG", "warn")],
    )
    .await;
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("BLUEBATCH_CA_FILE"), "{err}");
    // The user's own chain: the last certificate of --tls-cert's file.
    let cert = dir.path().join("tls/cert.pem");
    let key = dir.path().join("tls/key.pem");
    let other = tempfile::tempdir().unwrap();
    let u = Server::launch_tls(&[
        "--data-dir",
        other.path().to_str().unwrap(),
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    let r = create_token(&u.server.client(), json!({})).await;
    assert_eq!(r.json()["caFingerprint"], pem_fingerprint(&cert).as_str());
    assert_eq!(pem_fingerprint(&cert), want, "cert.pem ends with the CA");
}

#[tokio::test]
async fn serve_says_where_nodes_come_from_and_refuses_an_unknown_source() {
    // The banner, with --nodes agents (and BLUEBATCH_NODES alike).
    for (args, env) in [
        (vec!["--nodes", "agents"], vec![]),
        (vec![], vec![("BLUEBATCH_NODES", "agents")]),
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_bluebatch"))
            .args([
                "serve",
                "--port",
                "0",
                "--in-memory",
                "--agent-grace",
                "45s",
            ])
            .args(&args)
            .envs(env.iter().copied())
            .env("BLUEBATCH_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let done = line.starts_with("agents: ");
                lines.push(line);
                if done {
                    let _ = tx.send(lines.clone());
                }
            }
        });
        let lines = rx.recv_timeout(T).expect("no agents: line within 20 s");
        let _ = child.kill();
        let _ = child.wait();
        let url = lines
            .iter()
            .find_map(|l| l.strip_prefix("bluebatch listening on "))
            .unwrap();
        assert!(
            lines.iter().any(|l| l.starts_with("nodes: agents (")),
            "{lines:?}"
        );
        let agents = lines.last().unwrap();
        assert!(
            agents.contains(&format!("bluebatch join-token create --url {url}")),
            "{agents}"
        );
        assert!(agents.contains("silent for 45s"), "{agents}");
    }
    // The default: embedded, and a pool fills without any host.
    let s = Server::launch(&["--in-memory"]);
    let c = s.client();
    assert_eq!(c.create_pool("p", "linux", 1).await.status, 201);
    wait_nodes(&c, "p", 1).await;
    // An unknown source: refused at start, naming the choices.
    let out = bluebatch_cli(
        &["serve", "--port", "0", "--in-memory", "--nodes", "cloud"],
        &[],
    )
    .await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("one of embedded, agents, sandbox"), "{err}");
}

#[tokio::test]
async fn help_describes_the_agent_capacity_commands_and_flags() {
    let help = |args: &'static [&'static str]| async move {
        let out = bluebatch_cli(args, &[]).await;
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let top = help(&["--help"]).await;
    for sub in ["join-token", "host"] {
        assert!(top.contains(&format!("  {sub} ")), "{sub} in\n{top}");
    }
    for (args, want) in [
        (&["join-token", "revoke", "-h"][..], "<ID>"),
        (&["host", "drain", "-h"][..], "<HOST>"),
        (&["host", "revoke", "-h"][..], "<HOST>"),
        (&["join-token", "create", "-h"][..], "--ttl <DURATION>"),
        (&["join-token", "create", "-h"][..], "--pool <POOL>"),
        (&["join-token", "list", "-h"][..], "--json"),
        (&["host", "list", "-h"][..], "--json"),
    ] {
        let text = help(args).await;
        assert!(text.contains(want), "{args:?}: {want} in\n{text}");
        assert!(text.contains("--url"), "{text}");
    }
    let serve = help(&["serve", "--help"]).await;
    for (flag, default) in [
        ("--nodes <embedded|agents|sandbox>", "[default: embedded]"),
        ("--agent-grace <DURATION>", "[default: 60s]"),
    ] {
        let start = serve
            .find(flag)
            .unwrap_or_else(|| panic!("{flag} in\n{serve}"));
        let rest = &serve[start..];
        let end = rest[1..].find("\n  -").map_or(rest.len(), |e| e + 1);
        assert!(rest[..end].contains(default), "{flag}: {}", &rest[..end]);
    }
}

/// Kills the agent when the test ends, however it ends.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_output_of_join_token_create_is_the_agents_token_file_over_pinned_https() {
    let dir = tempfile::tempdir().unwrap();
    let t = Server::launch_tls(&[
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--nodes",
        "agents",
    ]);
    let (code, out, err) = cli(&t.server.url, &["join-token", "create", "--ttl", "10m"]).await;
    assert_eq!(code, 0, "{err}");
    let file = dir.path().join("token");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&file)
            .unwrap();
        f.write_all(out.as_bytes()).unwrap();
    }
    let state = dir.path().join("agent-state");
    let _agent = Reaped(
        Command::new(env!("CARGO_BIN_EXE_bluebatch"))
            .args(["agent", "--server", &t.https, "--join-token-file"])
            .arg(&file)
            .arg("--state-dir")
            .arg(&state)
            .args(["--simulate", "1", "--ssh-ports", "31000-31999"])
            .env("BLUEBATCH_LOG", "warn")
            .env_remove("BLUEBATCH_JOIN_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let c = t.server.client();
    let host = within(T, "the agent to join over HTTPS", async {
        loop {
            let v = c.control("GET", "/hosts").send_within(T).await.json();
            if let Some(h) = v["value"].as_array().and_then(|a| a.first())
                && h["connected"] == true
            {
                return h.clone();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!(host["provider"], "simulate");
    assert_eq!(
        host["address"], "127.0.0.1",
        "the agent's own address: {host}"
    );
    // The token is used up; a pool takes the host's node, which comes up idle.
    let list = c.control("GET", "/join-tokens").send_within(T).await.json();
    assert_eq!(list["value"][0]["used"], true, "{list}");
    assert_eq!(c.create_pool("p", "linux", 1).await.status, 201);
    common::wait_steady(&c, "p").await;
    assert_eq!(wait_nodes(&c, "p", 1).await[0]["state"], "idle");
}

#[tokio::test]
async fn a_write_the_host_fails_answers_500_naming_the_reason_and_the_control_endpoint_shows_it() {
    let s = agents_server();
    let c = s.client();
    let a = Agent::joined(&s.url, &token(&c, None).await, "h", 1).await;
    assert_eq!(c.create_pool("p", "linux", 1).await.status, 201);
    // The host takes its node: acknowledged, the node comes up idle.
    let d = a.desired("").await.json();
    let node = &d["nodes"][0];
    let (key, node_id) = (
        node["key"].as_str().unwrap().to_string(),
        node["nodeId"].as_str().unwrap().to_string(),
    );
    let ack = |rev: u64, failures: Value| json!({"nodes": [{"key": key, "revision": rev, "image": node["image"], "failures": failures}]});
    let r = a
        .ack(&ack(node["revision"].as_u64().unwrap(), json!([])))
        .await;
    assert_eq!(r.json()["refused"], json!([]), "{}", text(&r));
    common::wait_steady(&c, "p").await;
    let cursor = a.desired("").await.json()["cursor"]
        .as_str()
        .unwrap()
        .to_string();

    // Add User waits for the host; the host reports that the account failed.
    let add = {
        let base = s.url.clone();
        let path = format!("/pools/p/nodes/{node_id}/users");
        tokio::spawn(async move {
            let c = Client::new(&base, common::ACCOUNT, common::KEY);
            c.req("POST", &path)
                .json(&json!({"name": "alice", "password": "Secret-pass1"}))
                .send_within(T)
                .await
        })
    };
    let d = a.desired(&format!("after={cursor}&wait=15")).await.json();
    assert_eq!(d["changed"], true, "{d}");
    let rev = d["nodes"][0]["revision"].as_u64().unwrap();
    assert_eq!(d["nodes"][0]["accounts"][0]["name"], "alice", "{d}");
    assert!(
        !d.to_string().contains("Secret-pass1"),
        "only the hash travels: {d}"
    );
    let failures = json!([{"name": "alice", "reason": "useradd exited 1: no space left"}]);
    let r = a.ack(&ack(rev, failures)).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    let r = within(T, "Add User", add).await.unwrap();
    assert_error(&r, 500, "InternalError");
    assert!(
        text(&r).contains("useradd exited 1: no space left"),
        "{}",
        text(&r)
    );
    let users = c
        .control("GET", &format!("/pools/p/nodes/{node_id}/users"))
        .send_within(T)
        .await;
    assert_eq!(users.status, 200, "{}", text(&users));
    let v = users.json();
    assert_eq!(
        v["applyFailures"],
        json!([{"name": "alice", "reason": "useradd exited 1: no space left"}]),
        "{v}"
    );
    assert_eq!(v["users"][0]["name"], "alice", "the write is kept: {v}");
    // The retry succeeds: the failure is gone.
    let r = a.ack(&ack(rev, json!([]))).await;
    assert_eq!(r.json()["refused"], json!([]), "{}", text(&r));
    let v = c
        .control("GET", &format!("/pools/p/nodes/{node_id}/users"))
        .send_within(T)
        .await
        .json();
    assert_eq!(v["applyFailures"], json!([]), "{v}");
    assert_eq!(v["appliedRevision"], rev, "{v}");
}
