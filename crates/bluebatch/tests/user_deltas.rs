//! An embedded node takes a user write as the change of that one account when it is at the
//! revision before (no snapshot of every account), and the whole set otherwise (after a reboot
//! moved the revision, after a restart): whichever way, what it enforces over the real OpenSSH
//! client is exactly the stored set, the other accounts untouched.

mod common;

use common::{Client, Server, add_user, loopback_source, require_ssh, ssh_password_login, within};
use serde_json::{Value, json};
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

/// Update User (replace-all) with a new password; asserts 200.
async fn set_password(c: &Client, node: &str, user: &str, password: &str) {
    let r = c
        .req("PUT", &format!("/pools/p/nodes/{node}/users/{user}"))
        .json(&json!({ "password": password }))
        .send_within(T)
        .await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
}

async fn delete_user(c: &Client, node: &str, user: &str) {
    let r = c
        .req("DELETE", &format!("/pools/p/nodes/{node}/users/{user}"))
        .send_within(T)
        .await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
}

/// The node-users control: every stored user applied on the node, the node at the latest
/// revision; returns the stored names.
async fn all_applied(c: &Client, node: &str) -> Vec<String> {
    let r = c
        .control("GET", &format!("/pools/p/nodes/{node}/users"))
        .send_within(T)
        .await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    let v: Value = r.json();
    let users = v["users"].as_array().cloned().unwrap_or_default();
    let latest = users.iter().filter_map(|u| u["revision"].as_u64()).max();
    assert!(
        users.iter().all(|u| u["appliedOnNode"] == true),
        "every stored account in force on the node: {v}"
    );
    assert!(
        v["appliedRevision"].as_u64() >= latest,
        "the node at the latest revision: {v}"
    );
    users
        .iter()
        .map(|u| u["name"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Each (user, password, expected) login over OpenSSH, each from its own source address.
async fn logins(port: u16, cases: &[(&str, &str, bool)], first_source: u32) {
    for (i, (user, password, want)) in cases.iter().enumerate() {
        let src = loopback_source(first_source + i as u32);
        let got = within(
            Duration::from_secs(40),
            "ssh login",
            ssh_password_login(port, user, password, &src),
        )
        .await;
        assert_eq!(got, *want, "{user} with {password}: logged in {got}");
    }
}

#[tokio::test]
async fn one_account_changes_and_whole_sets_leave_the_node_enforcing_the_stored_set() {
    require_ssh();
    let dir = tempfile::tempdir().unwrap();
    let mut srv = Server::start_in(dir.path());
    let c = srv.client();
    let nodes = within(T, "pool ready", c.ready_pool("p", "linux", 1)).await;
    let n = nodes[0].as_str();
    let port = c.ssh_port("p", n).await;
    for (name, pw) in [
        ("alice", "alice-Pw1"),
        ("bob", "bob-Pw1"),
        ("carol", "carol-Pw1"),
    ] {
        add_user(&c, "p", n, json!({"name": name, "password": pw})).await;
    }
    set_password(&c, n, "bob", "bob-Pw2").await;
    delete_user(&c, n, "alice").await;
    add_user(
        &c,
        "p",
        n,
        json!({"name": "aaron", "password": "aaron-Pw1"}),
    )
    .await;
    assert_eq!(all_applied(&c, n).await, ["aaron", "bob", "carol"]);
    logins(
        port,
        &[
            ("alice", "alice-Pw1", false),
            ("bob", "bob-Pw1", false),
            ("bob", "bob-Pw2", true),
            ("carol", "carol-Pw1", true),
            ("aaron", "aaron-Pw1", true),
        ],
        10,
    )
    .await;

    // A reboot moves the node's users revision without a change of accounts (and restarts the
    // node's endpoint with the whole set): the writes after it are still enforced exactly.
    let r = c
        .req("POST", &format!("/pools/p/nodes/{n}/reboot"))
        .send_within(T)
        .await;
    assert_eq!(r.status, 202, "{:?}", String::from_utf8_lossy(&r.body));
    within(T, "node idle again", c.ready_pool_nodes_idle(n)).await;
    set_password(&c, n, "carol", "carol-Pw2").await;
    delete_user(&c, n, "aaron").await;
    assert_eq!(all_applied(&c, n).await, ["bob", "carol"]);
    logins(
        port,
        &[
            ("carol", "carol-Pw1", false),
            ("carol", "carol-Pw2", true),
            ("aaron", "aaron-Pw1", false),
            ("bob", "bob-Pw2", true),
        ],
        20,
    )
    .await;

    // After a restart the node starts from the stored set; later writes change one account.
    srv.kill();
    let srv = Server::start_in(dir.path());
    let c = srv.client();
    within(T, "node idle after restart", c.ready_pool_nodes_idle(n)).await;
    let port = c.ssh_port("p", n).await;
    set_password(&c, n, "bob", "bob-Pw3").await;
    add_user(&c, "p", n, json!({"name": "dave", "password": "dave-Pw1"})).await;
    assert_eq!(all_applied(&c, n).await, ["bob", "carol", "dave"]);
    logins(
        port,
        &[
            ("bob", "bob-Pw2", false),
            ("bob", "bob-Pw3", true),
            ("carol", "carol-Pw2", true),
            ("dave", "dave-Pw1", true),
        ],
        30,
    )
    .await;
}

trait NodeIdle {
    async fn ready_pool_nodes_idle(&self, node: &str);
}

impl NodeIdle for Client {
    /// Waits until the pool's `node` is idle (the caller bounds the wait).
    async fn ready_pool_nodes_idle(&self, node: &str) {
        loop {
            let r = self
                .req("GET", &format!("/pools/p/nodes/{node}"))
                .send_within(T)
                .await;
            if r.status == 200 && r.json()["state"] == "idle" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
