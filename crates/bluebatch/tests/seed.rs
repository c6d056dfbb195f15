//! `serve --seed`: a bad seed stops the start with a message naming the pool, the user and the
//! property; a changed seed on restart creates what is new, keeps stored pools as they are,
//! updates users whose credentials changed (so the seed's credentials log in over real SSH) and
//! logs one line per pool and per user saying what it did.

mod common;

use common::{Client, have_ssh_client, loopback_source, ssh_password_login};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn linux_pool(id: &str, nodes: u32) -> Value {
    json!({"id": id, "vmSize": "STANDARD_D2S_V3", "targetDedicatedNodes": nodes,
           "virtualMachineConfiguration": {"imageReference": {"publisher": "Canonical",
             "offer": "0001-com-ubuntu-server-jammy", "sku": "22_04-lts"},
             "nodeAgentSKUId": "batch.node.ubuntu 22.04"}})
}

fn serve_cmd(seed: &Path, data: Option<&Path>) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bluebatch"));
    cmd.args([
        "--log-format",
        "json",
        "serve",
        "--port",
        "0",
        "--node-step-ms",
        "20",
    ])
    .arg("--seed")
    .arg(seed)
    .env("BLUEBATCH_LOG", "info")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    match data {
        Some(d) => cmd.arg("--data-dir").arg(d),
        None => cmd.arg("--in-memory"),
    };
    cmd
}

struct Running {
    child: Child,
    url: String,
    stderr: std::thread::JoinHandle<String>,
}

fn start(seed: &Path, data: &Path) -> Running {
    let mut child = serve_cmd(seed, Some(data)).spawn().unwrap();
    let err = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        BufReader::new(err).read_to_string(&mut s).ok();
        s
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Some(u) = line.strip_prefix("bluebatch listening on ") {
                let _ = tx.send(u.trim().to_string());
            }
        }
    });
    let Ok(url) = rx.recv_timeout(Duration::from_secs(60)) else {
        let _ = child.kill();
        panic!("not listening within 60 s: {}", stderr.join().unwrap());
    };
    Running { child, url, stderr }
}

impl Running {
    /// SIGTERM; the log lines (JSON objects) it wrote.
    fn stop(mut self) -> Vec<Value> {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("did not stop on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stderr
            .join()
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

/// The seed log line for `pool` (and `user`), if any.
fn seed_line<'a>(logs: &'a [Value], pool: &str, user: Option<&str>) -> &'a Value {
    logs.iter()
        .find(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("seed:"))
                && l["pool"] == pool
                && match user {
                    Some(u) => l["user"] == u,
                    None => l["user"].is_null(),
                }
        })
        .unwrap_or_else(|| panic!("no seed line for {pool} {user:?} in {logs:#?}"))
}

#[test]
fn a_bad_seed_names_the_pool_the_user_and_the_property() {
    let tmp = tempfile::tempdir().unwrap();
    let seed = tmp.path().join("seed.json");
    let cases = [
        (
            json!({"pools": [{"pool": linux_pool("ci", 1),
                              "users": [{"name": "bob", "password": 5}]}]}),
            ["pool \"ci\"", "user \"bob\"", "property \"password\""],
        ),
        (
            json!({"pools": [{"pool": linux_pool("ci", 1),
                              "users": [{"name": "carol", "password": "pw", "isAdmin": "maybe"}]}]}),
            ["pool \"ci\"", "user \"carol\"", "property \"isAdmin\""],
        ),
        (
            json!({"pools": [{"pool": {"id": "nosize", "targetDedicatedNodes": 1}}]}),
            ["pool \"nosize\"", "", "property \"vmSize\""],
        ),
    ];
    for (body, wants) in cases {
        std::fs::write(&seed, body.to_string()).unwrap();
        let mut child = serve_cmd(&seed, None).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("a bad seed did not stop the start within 30 s: {body}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{stderr}");
        assert!(!stdout.contains("listening"), "{stdout}");
        assert!(stderr.contains(&seed.display().to_string()), "{stderr}");
        for w in wants {
            assert!(stderr.contains(w), "{w} missing from {stderr}");
        }
    }
}

async fn users_on(c: &Client, pool: &str) -> Vec<String> {
    let r = c.req("GET", &format!("/pools/{pool}/nodes")).send().await;
    let node = r.json()["value"][0]["id"].as_str().unwrap().to_string();
    let r = c
        .control("GET", &format!("/pools/{pool}/nodes/{node}/users"))
        .send()
        .await;
    assert_eq!(r.status, 200);
    let mut names: Vec<String> = r.json()["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

async fn node_port(c: &Client, pool: &str) -> u16 {
    let r = c.req("GET", &format!("/pools/{pool}/nodes")).send().await;
    let node = r.json()["value"][0]["id"].as_str().unwrap().to_string();
    c.ssh_port(pool, &node).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_changed_seed_on_restart_creates_keeps_and_updates() {
    let tmp = tempfile::tempdir().unwrap();
    let seed = tmp.path().join("seed.json");
    let data = tmp.path().join("data");
    let ssh = have_ssh_client();
    std::fs::write(
        &seed,
        json!({"pools": [{"pool": linux_pool("ci", 1),
                          "users": [{"name": "alice", "password": "Alice-pw-1"},
                                    {"name": "bob", "password": "Bob-pw-1", "isAdmin": true}]}]})
        .to_string(),
    )
    .unwrap();
    let s = start(&seed, &data);
    let c = Client::new(&s.url, common::ACCOUNT, common::KEY);
    assert_eq!(users_on(&c, "ci").await, ["alice", "bob"]);
    if ssh {
        let port = node_port(&c, "ci").await;
        assert!(ssh_password_login(port, "alice", "Alice-pw-1", &loopback_source(1)).await);
    }
    let logs = s.stop();
    assert_eq!(
        seed_line(&logs, "ci", None)["message"],
        "seed: pool created"
    );
    assert_eq!(seed_line(&logs, "ci", Some("alice"))["created"], 1);
    assert_eq!(seed_line(&logs, "ci", Some("bob"))["created"], 1);

    // The seed changes: alice's password, bob no longer admin, carol new, the pool asks for two
    // nodes, and a second pool.
    std::fs::write(
        &seed,
        json!({"pools": [{"pool": linux_pool("ci", 2),
                          "users": [{"name": "alice", "password": "Alice-pw-2"},
                                    {"name": "bob", "password": "Bob-pw-1"},
                                    {"name": "carol", "password": "Carol-pw-1"}]},
                         {"pool": linux_pool("ci2", 1)}]})
        .to_string(),
    )
    .unwrap();
    let s = start(&seed, &data);
    let c = Client::new(&s.url, common::ACCOUNT, common::KEY);
    // The stored pool is kept as it is (one node), the new one created.
    let r = c.req("GET", "/pools/ci").send().await;
    assert_eq!(r.json()["targetDedicatedNodes"], 1, "kept as stored");
    assert_eq!(c.req("GET", "/pools/ci2").send().await.status, 200);
    assert_eq!(users_on(&c, "ci").await, ["alice", "bob", "carol"]);
    let r = c.req("GET", "/pools/ci/nodes").send().await;
    let node = r.json()["value"][0]["id"].as_str().unwrap().to_string();
    let r = c
        .control("GET", &format!("/pools/ci/nodes/{node}/users"))
        .send()
        .await;
    let bob = r.json()["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "bob")
        .cloned()
        .unwrap();
    assert_eq!(bob["isAdmin"], false, "isAdmin follows the seed");
    if ssh {
        let port = node_port(&c, "ci").await;
        assert!(
            ssh_password_login(port, "alice", "Alice-pw-2", &loopback_source(2)).await,
            "the seed's new password logs in"
        );
        assert!(
            !ssh_password_login(port, "alice", "Alice-pw-1", &loopback_source(3)).await,
            "the old one no longer does"
        );
        assert!(ssh_password_login(port, "carol", "Carol-pw-1", &loopback_source(4)).await);
    }
    let logs = s.stop();
    let pool = seed_line(&logs, "ci", None);
    assert_eq!(pool["level"], "WARN", "{pool}");
    assert!(
        pool["differ"]
            .as_str()
            .unwrap()
            .contains("targetDedicatedNodes"),
        "{pool}"
    );
    assert!(pool["message"].as_str().unwrap().contains("kept"), "{pool}");
    assert_eq!(
        seed_line(&logs, "ci2", None)["message"],
        "seed: pool created"
    );
    let alice = seed_line(&logs, "ci", Some("alice"));
    assert_eq!(
        (alice["updated"].as_u64(), alice["kept"].as_u64()),
        (Some(1), Some(0))
    );
    assert_eq!(seed_line(&logs, "ci", Some("bob"))["updated"], 1);
    assert_eq!(seed_line(&logs, "ci", Some("carol"))["created"], 1);

    // The same seed again: everything kept, nothing rewritten.
    let s = start(&seed, &data);
    let logs = s.stop();
    for u in ["alice", "bob", "carol"] {
        let l = seed_line(&logs, "ci", Some(u));
        assert_eq!(
            (
                l["kept"].as_u64(),
                l["updated"].as_u64(),
                l["created"].as_u64()
            ),
            (Some(1), Some(0), Some(0)),
            "{l}"
        );
    }
    assert_eq!(seed_line(&logs, "ci2", None)["level"], "INFO");
}
