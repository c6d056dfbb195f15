//! Login activity of embedded nodes (issue 16, first step): every SSH authentication outcome a
//! node decides is kept (its last 256) and shown, newest first, by
//! `GET /_bluebatch/pools/{p}/nodes/{n}/logins`, with the service clock's time, the user, the
//! source, the method, the outcome and the reason, through the real binary and the real OpenSSH
//! client. Never a password or key material in it.

mod common;

use common::{
    Client, Server, add_user, keypair, loopback_source, require_ssh, ssh_key_outcome,
    ssh_password_outcome, within,
};
use serde_json::{Value, json};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(10);
/// Each test as a whole: a hang fails it.
const WHOLE: Duration = Duration::from_secs(150);

fn server(extra: &[&str]) -> Server {
    let mut args = vec!["--in-memory"];
    args.extend_from_slice(extra);
    Server::launch(&args)
}

async fn logins(c: &Client, pool: &str, node: &str) -> Vec<Value> {
    let r = c
        .control("GET", &format!("/pools/{pool}/nodes/{node}/logins"))
        .send_within(T)
        .await;
    assert_eq!(r.status, 200, "{}", common::text(&r));
    assert_eq!(
        r.header("content-type")
            .map(|v| v.starts_with("application/json")),
        Some(true)
    );
    r.json()["value"].as_array().expect("value").clone()
}

async fn ready_node(c: &Client) -> (String, u16) {
    let nodes = within(T * 3, "the pool to be ready", c.ready_pool("p", "linux", 1)).await;
    let n = nodes[0].clone();
    let port = within(T, "the node's port", c.ssh_port("p", &n)).await;
    (n, port)
}

/// `SHA256:…` of a public key file, as `ssh-keygen -l` shows it.
fn fingerprint_of(private: &Path) -> String {
    let out = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(private.with_extension("pub"))
        .output()
        .expect("running ssh-keygen -l");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split_whitespace()
        .nth(1)
        .filter(|f| f.starts_with("SHA256:"))
        .unwrap_or_else(|| panic!("no fingerprint in {text:?}"))
        .to_string()
}

/// The entry's fields other than its time and number, for comparing whole entries.
fn without_time(e: &Value) -> Value {
    let mut e = e.clone();
    assert!(e["seq"].as_u64().is_some_and(|n| n >= 1), "numbered: {e}");
    e.as_object_mut().unwrap().remove("seq");
    let time = e
        .as_object_mut()
        .unwrap()
        .remove("time")
        .expect("every entry has a time");
    assert!(
        time.as_str()
            .is_some_and(|t| t.len() >= 20 && t.ends_with('Z')),
        "an ISO 8601 UTC time: {time}"
    );
    e
}

fn refused(user: &str, source: &str, method: &str, reason: &str, key: Option<&str>) -> Value {
    json!({"user": user, "source": source, "method": method, "outcome": "refused",
           "reason": reason, "keyFingerprint": key})
}

fn accepted(user: &str, source: &str, method: &str, key: Option<&str>) -> Value {
    json!({"user": user, "source": source, "method": method, "outcome": "accepted",
           "reason": null, "keyFingerprint": key})
}

#[tokio::test]
async fn password_logins_are_listed_newest_first_with_their_reasons() {
    require_ssh();
    let srv = server(&[]);
    let c = srv.client();
    within(WHOLE, "the test", async {
        let (n, port) = ready_node(&c).await;
        assert_eq!(
            logins(&c, "p", &n).await,
            Vec::<Value>::new(),
            "nothing yet"
        );
        add_user(
            &c,
            "p",
            &n,
            json!({"name": "alice", "password": "right-pw-7"}),
        )
        .await;
        let (a, b, d) = (
            loopback_source(1601),
            loopback_source(1602),
            loopback_source(1603),
        );
        let ok = ssh_password_outcome(port, "alice", "right-pw-7", &a, "echo ok").await;
        assert_eq!(ok.stdout("the right password").trim(), "ok");
        let wrong = ssh_password_outcome(port, "alice", "wrong-pw-8", &b, "true").await;
        assert_eq!(wrong, common::SshOutcome::Refused);
        let unknown = ssh_password_outcome(port, "nobody", "right-pw-7", &d, "true").await;
        assert_eq!(unknown, common::SshOutcome::Refused);

        let list = logins(&c, "p", &n).await;
        let got: Vec<Value> = list.iter().map(without_time).collect();
        assert_eq!(
            got,
            vec![
                refused("nobody", &d, "password", "unknown user", None),
                refused("alice", &b, "password", "wrong password", None),
                accepted("alice", &a, "password", None),
            ],
            "newest first, one entry per attempt (the `none` probe is not one)"
        );
        let seqs: Vec<u64> = list.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, [3, 2, 1], "numbered from the node's first outcome on");
        let times: Vec<&str> = list.iter().map(|e| e["time"].as_str().unwrap()).collect();
        assert!(
            times.windows(2).all(|w| w[0] >= w[1]),
            "newest first: {times:?}"
        );
        let clock = c.control("GET", "/clock").send_within(T).await.json();
        let now = clock["now"].as_str().unwrap();
        assert!(times[0][..19] <= now[..19], "{times:?} vs the clock {now}");
        let text = serde_json::to_string(&list).unwrap();
        assert!(
            !text.contains("right-pw-7") && !text.contains("wrong-pw-8"),
            "never a password: {text}"
        );
    })
    .await;
}

#[tokio::test]
async fn an_expired_account_is_refused_as_expired_at_the_service_clock() {
    require_ssh();
    let srv = server(&[]);
    let c = srv.client();
    within(WHOLE, "the test", async {
        let (n, port) = ready_node(&c).await;
        // No expiryTime: one day from now, as in Azure.
        add_user(
            &c,
            "p",
            &n,
            json!({"name": "carol", "password": "carol-pw-1"}),
        )
        .await;
        let r = c
            .control("POST", "/clock/advance")
            .json(&json!({"by": "2d"}))
            .send_within(T)
            .await;
        assert_eq!(r.status, 200, "{}", common::text(&r));
        let moved = r.json()["now"].as_str().unwrap().to_string();
        let src = loopback_source(1611);
        let out = ssh_password_outcome(port, "carol", "carol-pw-1", &src, "true").await;
        assert_eq!(out, common::SshOutcome::Refused);

        let list = logins(&c, "p", &n).await;
        assert_eq!(list.len(), 1, "{list:?}");
        assert_eq!(
            without_time(&list[0]),
            refused("carol", &src, "password", "expired", None)
        );
        let at = list[0]["time"].as_str().unwrap();
        assert!(
            at[..19] >= moved[..19],
            "the service clock's time ({at}), not the wall clock's (the clock was moved to {moved})"
        );
    })
    .await;
}

#[tokio::test]
async fn key_logins_accepted_then_a_removed_key_and_a_removed_password_refused() {
    require_ssh();
    let dir = tempfile::tempdir().unwrap();
    let (k1, pub1) = keypair(dir.path(), "k1");
    let (_k2, pub2) = keypair(dir.path(), "k2");
    let fp1 = fingerprint_of(&k1);
    let srv = server(&[]);
    let c = srv.client();
    within(WHOLE, "the test", async {
        let (n, port) = ready_node(&c).await;
        add_user(
            &c,
            "p",
            &n,
            json!({"name": "dave", "password": "dave-pw-1", "sshPublicKey": pub1}),
        )
        .await;
        let s1 = loopback_source(1621);
        let ok = ssh_key_outcome(port, "dave", &k1, &s1, "echo ok").await;
        assert_eq!(ok.stdout("the account's key").trim(), "ok");

        // Update User replaces everything: only k2 now, no password.
        let r = c
            .req("PUT", &Client::user_path("p", &n, "dave"))
            .json(&json!({"sshPublicKey": pub2}))
            .send_within(T)
            .await;
        assert_eq!(r.status, 200, "{}", common::text(&r));
        let s2 = loopback_source(1622);
        let out = ssh_key_outcome(port, "dave", &k1, &s2, "true").await;
        assert_eq!(out, common::SshOutcome::Refused);
        let s3 = loopback_source(1623);
        let out = ssh_password_outcome(port, "dave", "dave-pw-1", &s3, "true").await;
        assert_eq!(out, common::SshOutcome::Refused);

        let list = logins(&c, "p", &n).await;
        let got: Vec<Value> = list.iter().map(without_time).collect();
        assert_eq!(
            got,
            vec![
                refused("dave", &s3, "password", "no password", None),
                refused("dave", &s2, "publickey", "key not accepted", Some(&fp1)),
                accepted("dave", &s1, "publickey", Some(&fp1)),
            ]
        );
        let text = serde_json::to_string(&list).unwrap();
        let body1 = pub1.split_whitespace().nth(1).unwrap();
        let body2 = pub2.split_whitespace().nth(1).unwrap();
        assert!(
            !text.contains(body1) && !text.contains(body2) && !text.contains("dave-pw-1"),
            "never key material nor a password: {text}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_locked_out_source_is_listed_as_held_back_and_a_down_node_as_its_state() {
    require_ssh();
    let srv = server(&["--max-failed-logins", "2"]);
    let c = srv.client();
    within(WHOLE, "the test", async {
        let (n, port) = ready_node(&c).await;
        add_user(
            &c,
            "p",
            &n,
            json!({"name": "erin", "password": "erin-pw-1"}),
        )
        .await;
        let src = loopback_source(1631);
        for _ in 0..2 {
            let out = ssh_password_outcome(port, "erin", "not-it", &src, "true").await;
            assert_eq!(out, common::SshOutcome::Refused);
        }
        let out = ssh_password_outcome(port, "erin", "erin-pw-1", &src, "true").await;
        assert_eq!(out, common::SshOutcome::Refused, "locked out");
        let list = logins(&c, "p", &n).await;
        assert_eq!(
            list.iter().map(without_time).collect::<Vec<_>>(),
            vec![
                refused("erin", &src, "password", "source held back", None),
                refused("erin", &src, "password", "wrong password", None),
                refused("erin", &src, "password", "wrong password", None),
            ]
        );

        // A node whose state takes no logins closes connections before the SSH banner: no
        // user was given, no method tried.
        let r = c
            .control("PUT", &format!("/pools/p/nodes/{n}/state"))
            .json(&json!({"state": "unusable"}))
            .send_within(T)
            .await;
        assert_eq!(r.status, 200, "{}", common::text(&r));
        let other = loopback_source(1632);
        let out = ssh_password_outcome(port, "erin", "erin-pw-1", &other, "true").await;
        assert!(!out.accepted(), "{out:?}");
        let list = logins(&c, "p", &n).await;
        assert_eq!(
            without_time(&list[0]),
            json!({"user": null, "source": other, "method": "none", "outcome": "refused",
                   "reason": "node state unusable", "keyFingerprint": null})
        );
        assert_eq!(list.len(), 4);
        assert_eq!(list[0]["seq"], 4);
    })
    .await;
}

#[tokio::test]
async fn logins_are_the_calling_accounts_and_need_its_key() {
    const OTHER: &str = "otheraccount";
    const OTHER_KEY: &str = "b3RoZXJhY2NvdW50LWtleS1mb3ItdGhlLWxvZ2luLWFjdGl2aXR5LXRlc3Q=";
    let srv = Server::start_exact(
        &["--in-memory", "--node-step-ms", "20"],
        &[("BLUEBATCH_ACCOUNTS", &format!("{OTHER}:{OTHER_KEY}"))],
    );
    let c = srv.client();
    within(WHOLE, "the test", async {
        let (n, _) = ready_node(&c).await;
        let path = format!("/pools/p/nodes/{n}/logins");
        let other = Client::new(&srv.url, OTHER, OTHER_KEY);
        let r = other.control("GET", &path).send_within(T).await;
        assert_eq!((r.status, r.code()), (404, "PoolNotFound".to_string()));
        let r = c
            .control("GET", "/pools/p/nodes/tvmps_nosuchnode/logins")
            .send_within(T)
            .await;
        assert_eq!((r.status, r.code()), (404, "NodeNotFound".to_string()));
        let r = c.control("GET", &path).unsigned().send_within(T).await;
        assert_eq!(r.status, 401, "{}", common::text(&r));
        let r = c.control("POST", &path).send_within(T).await;
        assert_eq!(
            (r.status, r.code()),
            (405, "UnsupportedHttpVerb".to_string())
        );
    })
    .await;
}

#[tokio::test]
async fn a_node_of_a_joined_host_answers_an_empty_list() {
    let srv = Server::launch(&["--in-memory", "--nodes", "agents"]);
    let c = srv.client();
    within(WHOLE, "the test", async {
        let token = common::agents::token(&c, None).await;
        let body = json!({"token": token, "host": common::agents::report("h", 1)});
        let http = reqwest::Client::builder().timeout(T).build().unwrap();
        let r = http
            .post(format!("{}/_bluebatch/agent/join", srv.url))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("join: no answer");
        assert_eq!(r.status(), 200);
        assert_eq!(c.create_pool("p", "linux", 1).await.status, 201);
        let nodes = common::agents::wait_nodes(&c, "p", 1).await;
        let n = nodes[0]["id"].as_str().unwrap();
        assert_eq!(logins(&c, "p", n).await, Vec::<Value>::new());
    })
    .await;
}
