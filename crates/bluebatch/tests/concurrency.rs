//! Concurrency: many writers racing on one user end in the state of exactly one of their
//! requests (never a mix), every answer's ETag is distinct, and writers on different users never
//! lose each other's updates. State is read back through the node-users control (what the store
//! holds and whether the node applied exactly that) and, where OpenSSH is installed, by logging
//! in on the node (a refusal counts only when sshd answered "Permission denied"). Every request
//! and each test have deadlines, so a hang fails. `BLUEBATCH_LONG=1` runs more rounds.

mod common;

use base64::Engine;
use common::{
    Client, Server, SshOutcome, have_ssh_client, keypair, loopback_source, ssh_key_outcome,
    ssh_password_outcome, within,
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

fn long() -> bool {
    std::env::var("BLUEBATCH_LONG").is_ok_and(|v| v == "1")
}

/// `SHA256:…` as `ssh-keygen -l` prints it, for comparing with the control's fingerprint.
fn fingerprint(public_line: &str) -> String {
    let b64 = public_line.split_whitespace().nth(1).unwrap();
    let blob = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    format!(
        "SHA256:{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(Sha256::digest(&blob))
    )
}

/// The node's users as the control shows them, by name.
///
/// On the replica fleet (`BLUEBATCH_TEST_REPLICAS`) a write answers at its node's
/// acknowledgement and the acknowledgement's record (what `appliedOnNode` reads) commits just
/// after: there the read is repeated, for up to 5 s, until every user shows it applied. One
/// server records it before the answer, so there the first read must already show it.
async fn node_users(c: &Client, pool: &str, node: &str) -> (Value, HashMap<String, Value>) {
    let until = std::time::Instant::now() + Duration::from_secs(5);
    let v = loop {
        let r = c
            .control("GET", &format!("/pools/{pool}/nodes/{node}/users"))
            .send_within(REQ)
            .await;
        assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
        let v = r.json();
        let applied = v["users"]
            .as_array()
            .is_some_and(|l| l.iter().all(|u| u["appliedOnNode"] == true));
        if applied || !common::replicas::replica_mode() || std::time::Instant::now() > until {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let by_name = v["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| (u["name"].as_str().unwrap().to_string(), u.clone()))
        .collect();
    (v, by_name)
}

/// A distinct expiry per (round, writer): whole days from 2031-01-01, as the control prints it.
fn expiry(round: usize, writer: usize) -> String {
    let day =
        time::macros::date!(2031 - 01 - 01) + time::Duration::days((round * 100 + writer) as i64);
    format!("{day}T00:00:00Z")
}

static SOURCE: AtomicU32 = AtomicU32::new(1000);

fn next_source() -> String {
    loopback_source(SOURCE.fetch_add(1, Ordering::Relaxed))
}

/// Deadline of one request.
const REQ: Duration = Duration::from_secs(10);

/// Deadline of each test.
fn limit() -> Duration {
    Duration::from_secs(if long() { 600 } else { 180 })
}

/// A login's outcome: true accepted, false refused by sshd; a node that
/// did not answer fails the test at once.
fn answered(out: SshOutcome, what: &str) -> bool {
    match out {
        SshOutcome::Accepted { .. } => true,
        SshOutcome::Refused => false,
        SshOutcome::Unreachable(e) => panic!("{what}: the node did not answer: {e}"),
    }
}

async fn password_login(port: u16, user: &str, password: String) -> bool {
    let out = ssh_password_outcome(port, user, &password, &next_source(), "true").await;
    answered(out, &format!("{user} with password {password}"))
}

async fn key_login(port: u16, user: &str, key: &std::path::Path) -> bool {
    let out = ssh_key_outcome(port, user, key, &next_source(), "true").await;
    answered(out, &format!("{user} with key {}", key.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_writers_on_one_user_leave_exactly_one_requests_state() {
    within(limit(), "the test", racing_writers()).await;
}

async fn racing_writers() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start_in(dir.path());
    let c = Arc::new(srv.client());
    let nodes = c.ready_pool("race", "linux", 1).await;
    let node = nodes[0].clone();
    let users_path = format!("/pools/race/nodes/{node}/users");
    let r = c
        .req("POST", &users_path)
        .json(&json!({"name": "racer", "password": "initial-pw"}))
        .send_within(REQ)
        .await;
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
    let mut etags: HashSet<String> = HashSet::new();
    etags.insert(r.header("etag").unwrap().to_string());

    const WRITERS: usize = 16;
    let keys_dir = tempfile::tempdir().unwrap();
    let keys: Vec<(std::path::PathBuf, String)> = (0..WRITERS)
        .map(|i| keypair(keys_dir.path(), &format!("writer{i}")))
        .collect();
    let ssh = have_ssh_client();
    if !ssh {
        eprintln!("note: OpenSSH client or sshpass missing; checking through the control only");
    }
    let port = c.ssh_port("race", &node).await;
    let rounds = if long() { 25 } else { 4 };
    for round in 0..rounds {
        let barrier = Arc::new(tokio::sync::Barrier::new(WRITERS));
        let mut tasks = Vec::new();
        for (w, (_, public)) in keys.iter().enumerate() {
            let (c, barrier, node) = (c.clone(), barrier.clone(), node.clone());
            let key = public.clone();
            tasks.push(tokio::spawn(async move {
                let body = json!({
                    "password": format!("pw-{round}-{w}"),
                    "expiryTime": expiry(round, w),
                    "sshPublicKey": key,
                });
                barrier.wait().await;
                let r = c
                    .req("PUT", &Client::user_path("race", &node, "racer"))
                    .json(&body)
                    .send_within(REQ)
                    .await;
                (r.status, r.header("etag").map(str::to_string), r.body)
            }));
        }
        for t in tasks {
            let (status, etag, body) = t.await.unwrap();
            assert_eq!(status, 200, "{:?}", String::from_utf8_lossy(&body));
            let etag = etag.expect("an ETag on every 200");
            assert!(etags.insert(etag.clone()), "ETag {etag} answered twice");
        }
        // The stored state is one writer's, entirely, and the node applied exactly it.
        let (all, users) = node_users(&c, "race", &node).await;
        let u = &users["racer"];
        let winners: Vec<usize> = (0..WRITERS)
            .filter(|w| u["expiryTime"] == expiry(round, *w))
            .collect();
        assert_eq!(
            winners.len(),
            1,
            "round {round}: expiry of no single writer: {u}"
        );
        let w = winners[0];
        assert_eq!(
            u["sshPublicKeyFingerprint"].as_str(),
            Some(fingerprint(&keys[w].1).as_str()),
            "round {round}: the key is not from the writer whose expiry won ({w}): {u}"
        );
        assert_eq!(u["hasPassword"], true, "{u}");
        assert_eq!(
            u["appliedOnNode"], true,
            "the node disagrees with the store: {all}"
        );
        assert!(
            all["appliedRevision"].as_u64() >= u["revision"].as_u64(),
            "{all}"
        );
        // On the node: the winner's password and key log in; another writer's do not.
        if ssh && (round == 0 || round == rounds - 1) {
            let loser = (w + 1) % WRITERS;
            let (ok_pw, bad_pw, ok_key, bad_key) = tokio::join!(
                password_login(port, "racer", format!("pw-{round}-{w}")),
                password_login(port, "racer", format!("pw-{round}-{loser}")),
                key_login(port, "racer", &keys[w].0),
                key_login(port, "racer", &keys[loser].0),
            );
            assert_eq!(
                (ok_pw, bad_pw, ok_key, bad_key),
                (true, false, true, false),
                "round {round}: login with the winner's ({w}) password and key only"
            );
        }
    }
}

/// What a churn task last did to its user: the user is there or not.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Last {
    Added,
    Deleted,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writers_on_different_users_lose_no_update() {
    within(limit(), "the test", different_users()).await;
}

async fn different_users() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start_in(dir.path());
    let c = Arc::new(srv.client());
    let nodes = Arc::new(c.ready_pool("many", "linux", 2).await);
    const USERS: usize = 12;
    const CHURN: usize = 4;
    let updates = if long() { 60 } else { 15 };
    for u in 0..USERS {
        let n = &nodes[u % nodes.len()];
        let r = c
            .req("POST", &format!("/pools/many/nodes/{n}/users"))
            .json(&json!({"name": format!("user{u}"), "password": "start"}))
            .send_within(REQ)
            .await;
        assert_eq!(r.status, 201);
    }
    // Updaters: each drives its own user through `updates` sequential updates. Churners: add and
    // delete users of their own on the same nodes meanwhile.
    let mut tasks = Vec::new();
    for u in 0..USERS {
        let (c, nodes) = (c.clone(), nodes.clone());
        tasks.push(tokio::spawn(async move {
            let n = &nodes[u % nodes.len()];
            let mut etags = Vec::new();
            for k in 0..updates {
                let r = c
                    .req("PUT", &Client::user_path("many", n, &format!("user{u}")))
                    .json(&json!({"password": format!("pw-{u}-{k}"), "expiryTime": expiry(k, u)}))
                    .send_within(REQ)
                    .await;
                assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
                etags.push(r.header("etag").unwrap().to_string());
            }
            (etags, None)
        }));
    }
    for j in 0..CHURN {
        let (c, nodes) = (c.clone(), nodes.clone());
        tasks.push(tokio::spawn(async move {
            let n = &nodes[j % nodes.len()];
            let mut etags = Vec::new();
            let mut last = Last::Deleted;
            for k in 0..(updates * 2 + j) {
                let name = format!("churn{j}");
                if last == Last::Deleted {
                    let r = c
                        .req("POST", &format!("/pools/many/nodes/{n}/users"))
                        .json(&json!({"name": name, "password": format!("c-{k}")}))
                        .send_within(REQ)
                        .await;
                    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
                    etags.push(r.header("etag").unwrap().to_string());
                    last = Last::Added;
                } else {
                    let r = c
                        .req("DELETE", &Client::user_path("many", n, &name))
                        .send_within(REQ)
                        .await;
                    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
                    last = Last::Deleted;
                }
            }
            (etags, Some(last))
        }));
    }
    let mut etags = HashSet::new();
    let mut churn_last = Vec::new();
    for t in tasks {
        let (e, last) = t.await.unwrap();
        for tag in e {
            assert!(etags.insert(tag.clone()), "ETag {tag} answered twice");
        }
        if let Some(l) = last {
            churn_last.push(l);
        }
    }
    // Every user holds its own last update, and the node applied it.
    let mut seen = HashMap::new();
    for n in nodes.iter() {
        let (all, users) = node_users(&c, "many", n).await;
        for (name, u) in users {
            assert_eq!(u["appliedOnNode"], true, "{all}");
            seen.insert(name, u);
        }
    }
    for u in 0..USERS {
        let got = &seen[&format!("user{u}")];
        assert_eq!(
            got["expiryTime"],
            expiry(updates - 1, u),
            "user{u} lost its last update: {got}"
        );
    }
    for (j, last) in churn_last.iter().enumerate() {
        assert_eq!(
            seen.contains_key(&format!("churn{j}")),
            *last == Last::Added,
            "churn{j}: last acknowledged {last:?}"
        );
    }
    if have_ssh_client() {
        for u in [0, USERS - 1] {
            let port = c.ssh_port("many", &nodes[u % nodes.len()]).await;
            let name = format!("user{u}");
            let (last, before) = tokio::join!(
                password_login(port, &name, format!("pw-{u}-{}", updates - 1)),
                password_login(port, &name, format!("pw-{u}-{}", updates - 2)),
            );
            assert_eq!((last, before), (true, false), "{name}");
        }
    }
    // Everything above is durable: a restart shows the same.
    drop(srv);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let srv = Server::start_in(dir.path());
    let c = srv.client();
    for u in 0..USERS {
        let (_, users) = node_users(&c, "many", &nodes[u % nodes.len()]).await;
        assert_eq!(
            users[&format!("user{u}")]["expiryTime"],
            expiry(updates - 1, u)
        );
    }
}
