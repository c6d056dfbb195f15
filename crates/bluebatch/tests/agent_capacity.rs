//! Joined hosts as pool capacity, at the HTTP level against the real binary
//! (`serve --nodes agents`) with a hand-driven agent speaking the node protocol: a pool short of
//! hosts stays `resizing` until the `resizeTimeout` of its most recent Add Pool or Resize, then
//! `steady` with `resizeErrors`; the `bluebatch.nodes` metadata item; node address and remote
//! login from the host; a name the host reserves refused by Add User.

mod common;

use common::{Client, Server, pool_body, text, within};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);

/// A hand-driven agent that acknowledges whatever it is given, with `port + slot` as each
/// node's SSH port.
struct HandAgent {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HandAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn join(c: &Client, base: &str, slots: u32, reserved: &[&str]) -> (reqwest::Client, String) {
    let r = c
        .control("POST", "/join-tokens")
        .json(&json!({"ttl": "1h"}))
        .send_within(T)
        .await;
    assert_eq!(r.status, 200, "{}", text(&r));
    let token = r.json()["token"].as_str().unwrap().to_string();
    let http = reqwest::Client::builder().timeout(T).build().unwrap();
    let body = json!({"token": token, "host": {"hostname": "hand", "provider": "simulate",
        "slots": slots, "address": "127.0.0.1", "reservedNames": reserved, "version": "test"}});
    let r = http
        .post(format!("{base}/_bluebatch/agent/join"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    (http, v["credential"].as_str().unwrap().to_string())
}

fn run_agent(base: &str, http: reqwest::Client, cred: String, port: u16) -> HandAgent {
    let base = base.to_string();
    let task = tokio::spawn(async move {
        let mut cursor = String::new();
        loop {
            let r = http
                .get(format!(
                    "{base}/_bluebatch/agent/desired?after={cursor}&wait=2"
                ))
                .header("authorization", format!("BluebatchNode {cred}"))
                .send()
                .await;
            let Ok(r) = r else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let Ok(d) = r.json::<Value>().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let nodes: Vec<Value> = d["nodes"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|n| {
                    json!({"key": n["key"], "revision": n["revision"], "image": n["image"],
                       "sshPort": port + n["slot"].as_u64().unwrap() as u16, "failures": []})
                })
                .collect();
            let _ = http
                .post(format!("{base}/_bluebatch/agent/ack"))
                .header("authorization", format!("BluebatchNode {cred}"))
                .json(&json!({"nodes": nodes}))
                .send()
                .await;
            cursor = d["cursor"].as_str().unwrap_or("").to_string();
        }
    });
    HandAgent { task }
}

fn agents_pool(id: &str, nodes: u32, resize_timeout: &str) -> Value {
    let mut b = pool_body(id, nodes);
    b["resizeTimeout"] = json!(resize_timeout);
    b["metadata"] = json!([{"name": "bluebatch.nodes", "value": "agents"}]);
    b
}

async fn get_pool(c: &Client, id: &str) -> Value {
    let r = c.req("GET", &format!("/pools/{id}")).send_within(T).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    r.json()
}

async fn until_pool(c: &Client, id: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let limit = Instant::now() + T;
    loop {
        let v = get_pool(c, id).await;
        if ok(&v) {
            return v;
        }
        assert!(Instant::now() < limit, "{what}: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn idle_nodes(c: &Client, pool: &str, n: usize) -> Vec<Value> {
    let limit = Instant::now() + T;
    loop {
        let r = c
            .req("GET", &format!("/pools/{pool}/nodes"))
            .send_within(T)
            .await;
        let list = r.json()["value"].as_array().cloned().unwrap_or_default();
        if list.len() == n && list.iter().all(|x| x["state"] == "idle") {
            return list;
        }
        assert!(Instant::now() < limit, "nodes never idle: {list:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_pool_short_of_hosts_resizes_until_its_timeout_then_reports_resize_errors() {
    within(Duration::from_secs(60), "the test", async {
        let s = Server::launch(&["--in-memory", "--nodes", "agents"]);
        let c = s.client();
        let (http, cred) = join(&c, &s.url, 1, &[]).await;
        let _agent = run_agent(&s.url, http, cred, 41_000);
        let r = c
            .req("POST", "/pools")
            .json(&agents_pool("short", 2, "PT2S"))
            .send_within(T)
            .await;
        assert_eq!(r.status, 201, "{}", text(&r));
        let v = until_pool(&c, "short", "one node while resizing", |v| {
            v["currentDedicatedNodes"] == 1
        })
        .await;
        assert_eq!(v["allocationState"], "resizing");
        assert!(v.get("resizeErrors").is_none(), "{v}");
        let v = until_pool(&c, "short", "steady at the timeout", |v| {
            v["allocationState"] == "steady"
        })
        .await;
        assert_eq!(v["currentDedicatedNodes"], 1);
        assert_eq!(v["targetDedicatedNodes"], 2);
        let errors = v["resizeErrors"].as_array().expect("resizeErrors");
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0]["code"], "AllocationTimedout");
        assert!(
            errors[0]["message"]
                .as_str()
                .unwrap()
                .contains("joined hosts")
        );
        // A resize that can be met clears them.
        let r = c
            .req("POST", "/pools/short/resize")
            .json(&json!({"targetDedicatedNodes": 1}))
            .send_within(T)
            .await;
        assert_eq!(r.status, 202, "{}", text(&r));
        let v = until_pool(&c, "short", "steady again", |v| {
            v["allocationState"] == "steady"
        })
        .await;
        assert!(v.get("resizeErrors").is_none(), "{v}");
        assert_eq!(v["currentDedicatedNodes"], 1);
    })
    .await
}

#[tokio::test]
async fn a_resize_is_bounded_by_its_own_resize_timeout_not_the_pools_from_add_pool() {
    within(Duration::from_secs(60), "the test", async {
        let s = Server::launch(&["--in-memory", "--nodes", "agents"]);
        let c = s.client();
        let (http, cred) = join(&c, &s.url, 1, &[]).await;
        let _agent = run_agent(&s.url, http, cred, 41_100);
        // Add Pool's timeout is long: only the Resize's own can end the resize in time.
        let r = c
            .req("POST", "/pools")
            .json(&agents_pool("grow", 1, "PT15M"))
            .send_within(T)
            .await;
        assert_eq!(r.status, 201, "{}", text(&r));
        until_pool(&c, "grow", "one node, steady", |v| {
            v["allocationState"] == "steady" && v["currentDedicatedNodes"] == 1
        })
        .await;
        let r = c
            .req("POST", "/pools/grow/resize")
            .json(&json!({"targetDedicatedNodes": 2, "resizeTimeout": "PT2S"}))
            .send_within(T)
            .await;
        assert_eq!(r.status, 202, "{}", text(&r));
        let resized = Instant::now();
        let v = get_pool(&c, "grow").await;
        assert_eq!(v["allocationState"], "resizing", "{v}");
        // The pool's resizeTimeout is that of its most recent resize, as on Azure.
        assert_eq!(v["resizeTimeout"], "PT2S", "{v}");
        assert!(v.get("resizeErrors").is_none(), "{v}");
        let v = until_pool(&c, "grow", "steady at the resize's timeout", |v| {
            v["allocationState"] == "steady"
        })
        .await;
        assert!(
            resized.elapsed() >= Duration::from_millis(1_500),
            "steady before the resize's timeout: {v}"
        );
        assert_eq!(v["currentDedicatedNodes"], 1);
        assert_eq!(v["targetDedicatedNodes"], 2);
        let errors = v["resizeErrors"].as_array().expect("resizeErrors");
        assert_eq!(errors.len(), 1, "{v}");
        assert_eq!(errors[0]["code"], "AllocationTimedout");
        // A Resize without one gets Azure's default (15 minutes), not the last resize's 2 s.
        let r = c
            .req("POST", "/pools/grow/resize")
            .json(&json!({"targetDedicatedNodes": 2}))
            .send_within(T)
            .await;
        assert_eq!(r.status, 202, "{}", text(&r));
        let v = get_pool(&c, "grow").await;
        assert_eq!(v["resizeTimeout"], "PT15M", "{v}");
        tokio::time::sleep(Duration::from_secs(4)).await;
        let v = get_pool(&c, "grow").await;
        assert_eq!(v["allocationState"], "resizing", "{v}");
        assert!(v.get("resizeErrors").is_none(), "{v}");
        assert_eq!(v["currentDedicatedNodes"], 1);
    })
    .await
}

#[tokio::test]
async fn the_nodes_metadata_item_chooses_or_is_refused() {
    within(Duration::from_secs(60), "the test", async {
        // An embedded server: a pool asking for agents waits for hosts (none joined).
        let s = Server::launch(&["--in-memory"]);
        let c = s.client();
        for bad in ["sandbox", "Agents", "vm"] {
            let mut b = pool_body(&format!("bad-{bad}"), 1);
            b["metadata"] = json!([{"name": "bluebatch.nodes", "value": bad}]);
            let r = c.req("POST", "/pools").json(&b).send_within(T).await;
            assert_eq!(r.status, 400, "{bad}: {}", text(&r));
            assert_eq!(r.code(), "InvalidPropertyValue");
            assert_eq!(r.value("PropertyName").as_deref(), Some("metadata"));
        }
        let r = c
            .req("POST", "/pools")
            .json(&agents_pool("waits", 1, "PT15M"))
            .send_within(T)
            .await;
        assert_eq!(r.status, 201, "{}", text(&r));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let v = get_pool(&c, "waits").await;
        assert_eq!(v["allocationState"], "resizing");
        assert_eq!(v["currentDedicatedNodes"], 0);
        // The item is kept as metadata like any other.
        assert_eq!(v["metadata"][0]["value"], "agents");
        // A plain pool of the same server is embedded, as before.
        c.ready_pool("plain", "linux", 1).await;
    })
    .await
}

#[tokio::test]
async fn agent_nodes_take_their_address_and_port_from_the_host_and_refuse_reserved_names() {
    within(Duration::from_secs(60), "the test", async {
        let s = Server::launch(&["--in-memory", "--nodes", "agents"]);
        let c = s.client();
        let (http, cred) = join(&c, &s.url, 2, &["ubuntu", "root"]).await;
        let _agent = run_agent(&s.url, http, cred, 42_000);
        let r = c
            .req("POST", "/pools")
            .json(&pool_body("p", 2))
            .send_within(T)
            .await;
        assert_eq!(r.status, 201, "{}", text(&r));
        let nodes = idle_nodes(&c, "p", 2).await;
        let mut ports = Vec::new();
        for n in &nodes {
            assert_eq!(n["ipAddress"], "127.0.0.1");
            let id = n["id"].as_str().unwrap();
            let r = c
                .req("GET", &format!("/pools/p/nodes/{id}/remoteloginsettings"))
                .send_within(T)
                .await;
            assert_eq!(r.status, 200, "{}", text(&r));
            assert_eq!(r.json()["remoteLoginIPAddress"], "127.0.0.1");
            ports.push(r.json()["remoteLoginPort"].as_u64().unwrap());
        }
        ports.sort();
        assert_eq!(ports, [42_000, 42_001]);
        let id = nodes[0]["id"].as_str().unwrap();
        let r = c
            .req("POST", &format!("/pools/p/nodes/{id}/users"))
            .json(&json!({"name": "ubuntu", "password": "Pw-123456"}))
            .send_within(T)
            .await;
        assert_eq!(r.status, 400, "{}", text(&r));
        assert_eq!(r.code(), "InvalidPropertyValue");
        assert!(text(&r).contains("reserved on this node"), "{}", text(&r));
        let r = c
            .req("POST", &format!("/pools/p/nodes/{id}/users"))
            .json(&json!({"name": "ann", "password": "Pw-123456"}))
            .send_within(T)
            .await;
        assert_eq!(r.status, 201, "{}", text(&r));
    })
    .await
}
