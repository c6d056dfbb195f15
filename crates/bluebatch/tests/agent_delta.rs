//! The delta long poll (`delta=1`): over real HTTP with a real node credential, a poll whose
//! `after` is the cursor this server answered last carries only the nodes that changed and the
//! keys of those removed, with the cursor of the whole state; an unknown cursor or a poll
//! without `delta=1` gets the whole state. End to end, `bluebatch agent --simulate 50` keeps
//! converging through pools added and deleted and users added, updated and deleted.

mod common;

use common::agents::{agent_log, report, token};
use common::{
    Client, Resp, Server, have_ssh_client, loopback_source, ssh_password_login, text, within,
};
use serde_json::{Value, json};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

struct Agent {
    base: String,
    http: reqwest::Client,
    credential: String,
}

impl Agent {
    async fn join(base: &str, token: &str, slots: u32) -> Agent {
        let http = reqwest::Client::builder().timeout(T).build().unwrap();
        let r = http
            .post(format!("{base}/_bluebatch/agent/join"))
            .json(&json!({"token": token, "host": report("h", slots)}))
            .send()
            .await
            .expect("join: no answer");
        let r = common::respond(r).await;
        assert_eq!(r.status, 200, "join: {}", text(&r));
        Agent {
            base: base.to_string(),
            http,
            credential: r.json()["credential"].as_str().unwrap().to_string(),
        }
    }

    async fn desired(&self, query: &str) -> Value {
        let r = self
            .http
            .get(format!("{}/_bluebatch/agent/desired?{query}", self.base))
            .header(
                "authorization",
                format!("BluebatchNode {}", self.credential),
            )
            .send()
            .await
            .expect("desired: no answer");
        let r = common::respond(r).await;
        assert_eq!(r.status, 200, "{query}: {}", text(&r));
        r.json()
    }

    async fn ack(&self, nodes: &[Value]) {
        let acks: Vec<Value> = nodes
            .iter()
            .map(|n| json!({"key": n["key"], "revision": n["revision"], "image": n["image"]}))
            .collect();
        let r = self
            .http
            .post(format!("{}/_bluebatch/agent/ack", self.base))
            .header(
                "authorization",
                format!("BluebatchNode {}", self.credential),
            )
            .json(&json!({ "nodes": acks }))
            .send()
            .await
            .expect("ack: no answer");
        let r = common::respond(r).await;
        assert_eq!(r.status, 200, "ack: {}", text(&r));
    }
}

fn nodes(v: &Value) -> &Vec<Value> {
    v["nodes"].as_array().expect("nodes")
}

fn pools_of(v: &Value) -> Vec<String> {
    let mut p: Vec<String> = nodes(v)
        .iter()
        .map(|n| n["poolId"].as_str().unwrap().to_string())
        .collect();
    p.sort();
    p
}

/// Polls (no wait) until the whole state has `n` nodes, all idle or all of `want`.
async fn whole_with(a: &Agent, n: usize) -> Value {
    within(T, "the whole state", async {
        loop {
            let v = a.desired("wait=0").await;
            if nodes(&v).len() == n {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

#[tokio::test]
async fn a_delta_poll_carries_only_what_changed_and_the_removed_keys() {
    let s = Server::launch(&["--in-memory", "--nodes", "agents"]);
    let c = s.client();
    let a = Agent::join(&s.url, &token(&c, None).await, 4).await;
    let r = c.create_pool("p1", "linux", 1).await;
    assert_eq!(r.status, 201, "{}", text(&r));
    whole_with(&a, 1).await;

    // The first delta-taking poll (no `after`): the whole state, not marked a delta.
    let v = a.delta_poll(None).await;
    assert!(v.get("delta").is_none(), "{v}");
    assert!(v.get("removed").is_none(), "{v}");
    assert_eq!(pools_of(&v), ["p1"]);
    a.ack(nodes(&v)).await;

    // The node goes creating → starting → (acknowledged) idle: each a delta of that node.
    let first_cursor = v["cursor"].as_str().unwrap().to_string();
    let mut cursor = first_cursor.clone();
    let v = within(T, "p1's node idle", async {
        loop {
            let v = a.delta_poll(Some(&cursor)).await;
            assert_eq!(v["delta"], true, "{v}");
            assert_eq!(v["changed"], true, "{v}");
            assert_eq!(pools_of(&v), ["p1"], "{v}");
            cursor = v["cursor"].as_str().unwrap().to_string();
            if nodes(&v)[0]["state"] == "idle" {
                return v;
            }
            a.ack(nodes(&v)).await;
        }
    })
    .await;
    // The cursor is the whole state's, as a poll without delta=1 gives it.
    let whole = a.desired("wait=0").await;
    assert_eq!(whole["cursor"], v["cursor"]);
    assert!(whole.get("delta").is_none(), "{whole}");
    cursor = v["cursor"].as_str().unwrap().to_string();

    // A second pool: the delta carries its node only, not p1's.
    let r = c.create_pool("p2", "linux", 2).await;
    assert_eq!(r.status, 201, "{}", text(&r));
    let v = a.delta_poll(Some(&cursor)).await;
    assert_eq!(v["delta"], true, "{v}");
    assert_eq!(pools_of(&v), ["p2", "p2"], "{v}");
    assert!(v.get("removed").is_none(), "{v}");
    let p2_keys: Vec<String> = nodes(&v)
        .iter()
        .map(|n| n["key"].as_str().unwrap().to_string())
        .collect();
    let whole = a.desired("wait=0").await;
    assert_eq!(whole["cursor"], v["cursor"]);
    assert_eq!(pools_of(&whole), ["p1", "p2", "p2"]);
    cursor = v["cursor"].as_str().unwrap().to_string();
    // p2's nodes go idle: deltas of p2's nodes only.
    let mut v = v;
    within(T, "p2's nodes idle", async {
        loop {
            if nodes(&v).iter().all(|n| n["state"] == "idle")
                && a.desired("wait=0").await["nodes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|n| n["state"] == "idle")
            {
                return;
            }
            a.ack(nodes(&v)).await;
            v = a.delta_poll(Some(&cursor)).await;
            assert_eq!(v["delta"], true, "{v}");
            for n in nodes(&v) {
                assert_eq!(n["poolId"], "p2", "{v}");
            }
            cursor = v["cursor"].as_str().unwrap().to_string();
        }
    })
    .await;

    // Nothing new: the wait ends with an empty delta, unchanged.
    let v = a.delta_poll_wait(Some(&cursor), 1).await;
    assert_eq!(v["changed"], false, "{v}");
    assert_eq!(v["delta"], true, "{v}");
    assert_eq!(nodes(&v).len(), 0, "{v}");
    assert_eq!(v["cursor"], cursor.as_str());

    // p2 deleted: its nodes arrive as `removed`, nothing else is carried.
    let r = c.req("DELETE", "/pools/p2").send_within(T).await;
    assert_eq!(r.status, 202, "{}", text(&r));
    let v = within(T, "p2's nodes removed", async {
        loop {
            let v = a.delta_poll(Some(&cursor)).await;
            if v.get("removed").is_some() || v.get("delta").is_none() {
                return v;
            }
            // A delta of the nodes' state change while they leave: keep its cursor.
            cursor = v["cursor"].as_str().unwrap().to_string();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(v["delta"], true, "{v}");
    let mut removed: Vec<String> = v["removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    removed.sort();
    let mut want = p2_keys.clone();
    want.sort();
    assert_eq!(removed, want, "{v}");
    assert_eq!(nodes(&v).len(), 0, "{v}");
    let whole = a.desired("wait=0").await;
    assert_eq!(whole["cursor"], v["cursor"]);
    assert_eq!(pools_of(&whole), ["p1"]);
    cursor = v["cursor"].as_str().unwrap().to_string();

    // A cursor this server did not answer last (another replica's, a stale one): the whole
    // state, even with delta=1.
    let v = a.delta_poll(Some("0123456789abcdef0123456789abcdef")).await;
    assert!(v.get("delta").is_none(), "{v}");
    assert_eq!(pools_of(&v), ["p1"]);
    // Without delta=1: the whole state, as before deltas existed.
    let r = c.create_pool("p3", "linux", 1).await;
    assert_eq!(r.status, 201, "{}", text(&r));
    let v = a
        .desired(&format!("after={}&wait=10", v["cursor"].as_str().unwrap()))
        .await;
    assert!(v.get("delta").is_none(), "{v}");
    assert_eq!(pools_of(&v), ["p1", "p3"]);
    // A poll without delta=1 leaves what delta polls were answered: from that cursor, p3's
    // node alone.
    let v = a.delta_poll(Some(&cursor)).await;
    assert_eq!(v["delta"], true, "{v}");
    assert_eq!(pools_of(&v), ["p3"], "{v}");
    // An older cursor of this very host (answered before, not last): the whole state.
    let v = a.delta_poll(Some(&first_cursor)).await;
    assert_eq!(v["changed"], true, "{v}");
    assert!(v.get("delta").is_none(), "{v}");
    assert_eq!(pools_of(&v), ["p1", "p3"], "{v}");

    // The parameter is checked.
    let r = a
        .http
        .get(format!("{}/_bluebatch/agent/desired?delta=yes", a.base))
        .header("authorization", format!("BluebatchNode {}", a.credential))
        .send()
        .await
        .unwrap();
    let r: Resp = common::respond(r).await;
    assert_eq!(r.status, 400, "{}", text(&r));
    assert_eq!(r.code(), "InvalidQueryParameterValue");
}

impl Agent {
    async fn delta_poll(&self, after: Option<&str>) -> Value {
        self.delta_poll_wait(after, 10).await
    }
    async fn delta_poll_wait(&self, after: Option<&str>, wait: u64) -> Value {
        let q = match after {
            Some(a) => format!("after={a}&wait={wait}&delta=1"),
            None => format!("wait={wait}&delta=1"),
        };
        self.desired(&q).await
    }
}

/// Every node of `pool` once there are `n` of them, all idle: (id).
async fn idle_nodes(c: &Client, pool: &str, n: usize, limit: Duration) -> Vec<String> {
    within(limit, &format!("{pool}: {n} idle node(s)"), async {
        loop {
            let r = c
                .req("GET", &format!("/pools/{pool}/nodes"))
                .send_within(T)
                .await;
            let nodes = r.json()["value"].as_array().cloned().unwrap_or_default();
            if nodes.len() == n && nodes.iter().all(|v| v["state"] == "idle") {
                return nodes
                    .iter()
                    .map(|v| v["id"].as_str().unwrap().to_string())
                    .collect();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
}

/// A `bluebatch agent --simulate N` joined to `s` with a fresh token, its debug log collected;
/// it is killed when the returned guard drops (the guard also keeps its state directory).
async fn simulating_agent(
    s: &Server,
    c: &Client,
    nodes: &str,
    ports: &str,
) -> (SimulatingAgent, Arc<Mutex<Vec<String>>>) {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{}\n-\n", token(c, None).await)).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_bluebatch"))
        .args(["agent", "--server", &s.url, "--simulate", nodes])
        .args(["--ssh-ports", ports])
        .arg("--state-dir")
        .arg(dir.path().join("agent"))
        .arg("--join-token-file")
        .arg(&token_file)
        .env("BLUEBATCH_LOG", "info,bluebatch::agent=debug,russh=warn")
        .env_remove("BLUEBATCH_JOIN_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting bluebatch agent");
    let log = agent_log(&mut child);
    (SimulatingAgent { child, _state: dir }, log)
}

struct SimulatingAgent {
    child: std::process::Child,
    _state: tempfile::TempDir,
}

impl Drop for SimulatingAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn a_simulating_agent_converges_through_deltas() {
    let s = Server::launch(&["--in-memory", "--nodes", "agents"]);
    let c = s.client();
    let (_agent, log) = simulating_agent(&s, &c, "50", "26600-26699").await;
    let long = Duration::from_secs(60);

    let r = c.create_pool("a", "linux", 20).await;
    assert_eq!(r.status, 201, "{}", text(&r));
    let r = c.create_pool("w", "windows", 5).await;
    assert_eq!(r.status, 201, "{}", text(&r));
    let a = idle_nodes(&c, "a", 20, long).await;
    idle_nodes(&c, "w", 5, long).await;

    let add = |pool: &'static str, node: String, name: &'static str, pw: &'static str| {
        let c = &c;
        async move {
            let r = c
                .req("POST", &format!("/pools/{pool}/nodes/{node}/users"))
                .json(&json!({"name": name, "password": pw}))
                .send_within(Duration::from_secs(40))
                .await;
            assert_eq!(r.status, 201, "{pool}/{node}: {}", text(&r));
        }
    };
    // Each write is answered once the agent acknowledges it: applied through a delta.
    for i in [0, 7, 19] {
        add("a", a[i].clone(), "alice", "first-pw").await;
    }
    let r = c
        .req("PUT", &Client::user_path("a", &a[7], "alice"))
        .json(&json!({"password": "second-pw"}))
        .send_within(Duration::from_secs(40))
        .await;
    assert_eq!(r.status, 200, "{}", text(&r));
    let mut n = 0;
    if have_ssh_client() {
        let port = c.ssh_port("a", &a[7]).await;
        n += 1;
        assert!(ssh_password_login(port, "alice", "second-pw", &loopback_source(n)).await);
        n += 1;
        assert!(!ssh_password_login(port, "alice", "first-pw", &loopback_source(n)).await);
    }
    let r = c
        .req("DELETE", &Client::user_path("a", &a[0], "alice"))
        .send_within(Duration::from_secs(40))
        .await;
    assert_eq!(r.status, 200, "{}", text(&r));

    // Nodes removed (pool a deleted) and added (pool b) while the agent polls deltas.
    let r = c.req("DELETE", "/pools/a").send_within(T).await;
    assert_eq!(r.status, 202, "{}", text(&r));
    within(long, "pool a gone", async {
        loop {
            let r = c.req("GET", "/pools/a").send_within(T).await;
            if r.status == 404 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let r = c.create_pool("b", "linux", 30).await;
    assert_eq!(r.status, 201, "{}", text(&r));
    let b = idle_nodes(&c, "b", 30, long).await;
    for i in [0, 29] {
        add("b", b[i].clone(), "bob", "bob-pw").await;
    }
    if have_ssh_client() {
        let port = c.ssh_port("b", &b[29]).await;
        n += 1;
        assert!(ssh_password_login(port, "bob", "bob-pw", &loopback_source(n)).await);
    }
    let r = c
        .req("DELETE", &Client::user_path("b", &b[0], "bob"))
        .send_within(Duration::from_secs(40))
        .await;
    assert_eq!(r.status, 200, "{}", text(&r));

    let text = log.lock().unwrap().join("\n");
    assert!(
        !text.contains("did not fit"),
        "every delta fitted the state held:\n{text}"
    );
    assert!(!text.contains("whole states only"), "{text}");
    assert!(text.contains("merged a delta answer"), "{text}");
}

/// A user written on one node of a host's many: the delta carries that node and no other, at
/// every write (also once the server has looked at one node only since its last answer), the
/// acknowledgement of it is taken, and the write it answers is 200.
#[tokio::test]
async fn a_write_to_one_node_of_many_is_a_delta_of_that_node_alone() {
    let s = Server::launch(&["--in-memory", "--nodes", "agents"]);
    let c = s.client();
    let a = Agent::join(&s.url, &token(&c, None).await, 12).await;
    let r = c.create_pool("many", "linux", 12).await;
    assert_eq!(r.status, 201, "{}", text(&r));
    // Acknowledge every poll's nodes until all twelve are idle (whole states).
    let mut v = a.delta_poll(None).await;
    let v = within(T, "twelve idle nodes", async {
        loop {
            a.ack(nodes(&v)).await;
            let whole = a.desired("wait=0").await;
            if nodes(&whole).len() == 12 && nodes(&whole).iter().all(|n| n["state"] == "idle") {
                return whole;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            v = a.delta_poll(None).await;
        }
    })
    .await;
    let ids: Vec<String> = nodes(&v)
        .iter()
        .map(|n| n["nodeId"].as_str().unwrap().to_string())
        .collect();
    // A delta-taking poll without a cursor: the whole state, and the base of the deltas.
    let base = a.delta_poll(None).await;
    assert_eq!(nodes(&base).len(), 12, "{base}");
    let mut cursor = base["cursor"].as_str().unwrap().to_string();
    let mut has_user = std::collections::HashSet::new();
    for (round, i) in [3usize, 3, 8, 0, 11].into_iter().enumerate() {
        let node = ids[i].clone();
        let (method, path, body) = if has_user.insert(i) {
            (
                "POST",
                format!("/pools/many/nodes/{node}/users"),
                json!({"name": "u", "password": format!("pw-{round}")}),
            )
        } else {
            (
                "PUT",
                Client::user_path("many", &node, "u"),
                json!({"password": format!("pw-{round}")}),
            )
        };
        let write = c
            .req(method, &path)
            .json(&body)
            .send_within(Duration::from_secs(20));
        let poll = async {
            let d = within(T, "the write's delta", async {
                loop {
                    let d = a.delta_poll(Some(&cursor)).await;
                    if d["changed"] == true {
                        return d;
                    }
                }
            })
            .await;
            // The whole state agrees with the delta's cursor.
            let whole = a.desired("wait=0").await;
            assert_eq!(whole["cursor"], d["cursor"], "round {round}");
            a.ack(nodes(&d)).await;
            d
        };
        let (r, d) = tokio::join!(write, poll);
        assert_eq!(d["delta"], true, "round {round}: {d}");
        assert!(d.get("removed").is_none(), "round {round}: {d}");
        let sent: Vec<&str> = nodes(&d)
            .iter()
            .map(|n| n["nodeId"].as_str().unwrap())
            .collect();
        assert_eq!(
            sent,
            [node.as_str()],
            "round {round}: only the written node: {d}"
        );
        assert_eq!(
            nodes(&d)[0]["accounts"][0]["name"],
            "u",
            "round {round}: {d}"
        );
        assert!(
            r.status == 200 || r.status == 201,
            "round {round}: {}",
            text(&r)
        );
        cursor = d["cursor"].as_str().unwrap().to_string();
        // Nothing else changed: the next poll (no wait) carries nothing.
        let quiet = a.delta_poll_wait(Some(&cursor), 0).await;
        assert_eq!(quiet["changed"], false, "round {round}: {quiet}");
        assert!(nodes(&quiet).is_empty(), "round {round}: {quiet}");
    }
}

/// `bluebatch agent --simulate 20`: a user written on one node is merged as a delta of that
/// node alone and enforced as that change, without the provider being handed (or applying
/// again) the other nineteen.
#[tokio::test]
async fn a_simulating_agent_enforces_a_write_as_the_change_of_one_node() {
    let s = Server::launch(&["--in-memory", "--nodes", "agents"]);
    let c = s.client();
    let (_agent, log) = simulating_agent(&s, &c, "20", "26700-26719").await;
    let r = c.create_pool("s", "linux", 20).await;
    assert_eq!(r.status, 201, "{}", text(&r));
    let ids = idle_nodes(&c, "s", 20, Duration::from_secs(60)).await;
    let node = ids[13].clone();
    let r = c
        .req("POST", &format!("/pools/s/nodes/{node}/users"))
        .json(&json!({"name": "carol", "password": "pw-0"}))
        .send_within(Duration::from_secs(40))
        .await;
    assert_eq!(r.status, 201, "{}", text(&r));
    for i in 1..=3 {
        let from = log.lock().unwrap().len();
        let r = c
            .req("PUT", &Client::user_path("s", &node, "carol"))
            .json(&json!({"password": format!("pw-{i}")}))
            .send_within(Duration::from_secs(40))
            .await;
        assert_eq!(r.status, 200, "{}", text(&r));
        let lines: Vec<String> = log.lock().unwrap()[from..].to_vec();
        let text = lines.join("\n");
        let merged: Vec<&String> = lines
            .iter()
            .filter(|l| l.contains("merged a delta answer"))
            .collect();
        assert!(!merged.is_empty(), "write {i}: no delta merged:\n{text}");
        for l in &merged {
            assert!(
                l.contains("nodes=1 ") && l.contains("removed=0"),
                "write {i}: the delta carried other nodes: {l}\n{text}"
            );
        }
        assert!(
            lines
                .iter()
                .any(|l| l.contains("enforced a change") && l.contains("changed=1")),
            "write {i}: not enforced as a change of one node:\n{text}"
        );
        assert!(
            !text.contains("enforced the whole state"),
            "write {i}: the whole state was handed to the provider:\n{text}"
        );
        let applied: Vec<&String> = lines
            .iter()
            .filter(|l| l.contains(" applied ") || l.ends_with(" applied"))
            .collect();
        assert!(
            applied.iter().all(|l| l.contains(&node)),
            "write {i}: another node was applied again:\n{text}"
        );
    }
    if have_ssh_client() {
        let port = c.ssh_port("s", &node).await;
        assert!(ssh_password_login(port, "carol", "pw-3", &loopback_source(1)).await);
    }
}
