//! The races users can hit, over HTTP against the real binary, each repeated enough rounds to have
//! a chance to hit the race, each operation with a deadline:
//! - two concurrent Add User of one name: exactly one 201, one 409 NodeUserExists, and the stored
//!   user (and the node, over SSH) is the winner's;
//! - Delete User vs Update User: either both 200 (update first) or delete 200 and update 404
//!   NodeUserNotFound; either way the user is gone, in the store and on the node;
//! - Update User vs Reboot of its node: the update is 200 and applied, or 409 (the node is being
//!   rebooted) and not applied, never half: once the node is idle again its account is the old
//!   or the new one entirely (control and SSH: password, key, expiry);
//! - Resize with `If-Match` on one ETag from several clients (and Resize against Remove Nodes):
//!   exactly one 202, the others 412 ConditionNotMet, and the pool holds the winner's change;
//! - concurrent Add Pool of one id spelled in different cases: one 201, the others 409
//!   PoolExists, the winner's spelling kept; two Delete User of one user: one 200, one 404; two
//!   Add User on a Windows node of names differing only in case: one 201, one 409;
//! - Add User vs Reimage of its node: the add is refused (409 NodeBeingReimaged), or made before
//!   the reimage and wiped by it, or made after it (the later revision) and then there entirely;
//!   never a user that the reimage should have removed (control, API and SSH agree);
//! - list paging (`maxresults` small) of pools while pools are added and deleted, and of nodes
//!   while the pool grows and loses nodes: no item twice, none of those present throughout
//!   missing.

mod common;

use common::{
    Client, Resp, Server, SshOutcome, keypair, loopback_source, ssh_key_outcome,
    ssh_password_outcome, text, within,
};
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Deadline of one request.
const REQ: Duration = Duration::from_secs(10);

fn rounds(short: usize, long: usize) -> usize {
    if std::env::var("BLUEBATCH_LONG").is_ok_and(|v| v == "1") {
        long
    } else {
        short
    }
}

static SOURCE: AtomicU32 = AtomicU32::new(40_000);

fn source() -> String {
    loopback_source(SOURCE.fetch_add(1, Ordering::Relaxed))
}

/// A server with a data dir (the real store) and no failed-login lockout, so that the refusals
/// these tests provoke never lock a check out.
fn server(dir: &std::path::Path) -> Server {
    Server::start_with(&[
        "--data-dir",
        dir.to_str().unwrap(),
        "--max-failed-logins",
        "0",
    ])
}

/// A distinct expiry per (round, writer), as the control prints it.
fn expiry(round: usize, writer: usize) -> String {
    let day =
        time::macros::date!(2033 - 01 - 01) + time::Duration::days((round * 10 + writer) as i64);
    format!("{day}T00:00:00Z")
}

/// The node's users as the node-users control shows them, by name.
async fn stored(c: &Client, pool: &str, node: &str) -> HashMap<String, Value> {
    let r = c
        .control("GET", &format!("/pools/{pool}/nodes/{node}/users"))
        .send_within(REQ)
        .await;
    assert_eq!(r.status, 200, "{}", text(&r));
    r.json()["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| (u["name"].as_str().unwrap().to_string(), u.clone()))
        .collect()
}

async fn password(port: u16, user: &str, pw: String) -> SshOutcome {
    ssh_password_outcome(port, user, &pw, &source(), "true").await
}

async fn key_login(port: u16, user: &str, file: &std::path::Path) -> SshOutcome {
    ssh_key_outcome(port, user, file, &source(), "true").await
}

fn assert_refused(o: &SshOutcome, what: &str) {
    assert_eq!(
        o,
        &SshOutcome::Refused,
        "{what}: sshd must answer and refuse"
    );
}

fn assert_accepted(o: &SshOutcome, what: &str) {
    assert!(o.accepted(), "{what}: expected a login, got {o:?}");
}

/// How long one Update User takes when nothing competes (password hashing and the commit): the
/// racing operations are delayed by random parts of it, so that both orders happen.
async fn update_latency(c: &Client, path: &str, body: &Value) -> Duration {
    let mut worst = Duration::ZERO;
    for _ in 0..3 {
        let t = Instant::now();
        let r = c.req("PUT", path).json(body).send_within(REQ).await;
        assert_eq!(r.status, 200, "{}", text(&r));
        worst = worst.max(t.elapsed());
    }
    worst
}

fn jitter(up_to: Duration) -> Duration {
    use rand::Rng;
    let ms = up_to.as_micros().max(1) as u64 * 2;
    Duration::from_micros(rand::rng().random_range(0..ms))
}

async fn node_state(c: &Client, pool: &str, node: &str) -> String {
    let r = c
        .req("GET", &format!("/pools/{pool}/nodes/{node}"))
        .send_within(REQ)
        .await;
    assert_eq!(r.status, 200, "{}", text(&r));
    r.json()["state"].as_str().unwrap().to_string()
}

async fn wait_idle(c: &Client, pool: &str, node: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if node_state(c, pool, node).await == "idle" {
            return;
        }
        assert!(Instant::now() < deadline, "{node} never became idle again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_steady(c: &Client, pool: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = c
            .req("GET", &format!("/pools/{pool}"))
            .send_within(REQ)
            .await;
        assert_eq!(r.status, 200, "{}", text(&r));
        let v = r.json();
        if v["allocationState"] == "steady" {
            return v;
        }
        assert!(Instant::now() < deadline, "{pool} never became steady: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_concurrent_adds_of_one_name_give_one_201_and_one_409() {
    within(Duration::from_secs(120), "the test", async {
        let dir = tempfile::tempdir().unwrap();
        let srv = server(dir.path());
        let c = Arc::new(srv.client());
        let node = c.ready_pool("dup", "linux", 1).await.remove(0);
        let port = c.ssh_port("dup", &node).await;
        let users = format!("/pools/dup/nodes/{node}/users");
        let n = rounds(40, 200);
        let mut first_won = [0usize; 2];
        for round in 0..n {
            let name = format!("dup{round}");
            let barrier = Arc::new(tokio::sync::Barrier::new(2));
            let tasks: Vec<_> = (0..2)
                .map(|w| {
                    let (c, barrier, users, name) =
                        (c.clone(), barrier.clone(), users.clone(), name.clone());
                    tokio::spawn(async move {
                        let body = json!({"name": name, "password": format!("pw-{round}-{w}"),
                                          "expiryTime": expiry(round, w)});
                        barrier.wait().await;
                        c.req("POST", &users).json(&body).send_within(REQ).await
                    })
                })
                .collect();
            let mut answers = Vec::new();
            for t in tasks {
                answers.push(t.await.unwrap());
            }
            let statuses: Vec<u16> = answers.iter().map(|r| r.status).collect();
            let winner = match statuses.as_slice() {
                [201, 409] => 0,
                [409, 201] => 1,
                other => panic!(
                    "round {round}: {other:?}: {} / {}",
                    text(&answers[0]),
                    text(&answers[1])
                ),
            };
            first_won[winner] += 1;
            assert_eq!(
                answers[1 - winner].code(),
                "NodeUserExists",
                "{}",
                text(&answers[1 - winner])
            );
            assert!(answers[winner].header("etag").is_some());
            // The stored user is the winner's, and the node applied it.
            let u = &stored(&c, "dup", &node).await[&name];
            assert_eq!(u["expiryTime"], expiry(round, winner), "round {round}: {u}");
            assert_eq!(u["appliedOnNode"], true, "round {round}: {u}");
            // On the node: the winner's password logs in, the loser's is refused.
            if round < 3 || round == n - 1 {
                let (won, lost) = tokio::join!(
                    password(port, &name, format!("pw-{round}-{winner}")),
                    password(port, &name, format!("pw-{round}-{}", 1 - winner)),
                );
                assert_accepted(&won, &format!("round {round}: the winner's password"));
                assert_refused(&lost, &format!("round {round}: the loser's password"));
            }
        }
        eprintln!("{n} rounds: first writer won {first_won:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delete_vs_update_of_one_user_is_one_order_or_the_other() {
    within(Duration::from_secs(120), "the test", async {
        let dir = tempfile::tempdir().unwrap();
        let srv = server(dir.path());
        let c = Arc::new(srv.client());
        let node = c.ready_pool("du", "linux", 1).await.remove(0);
        let port = c.ssh_port("du", &node).await;
        let users = format!("/pools/du/nodes/{node}/users");
        let n = rounds(40, 200);
        let r = c
            .req("POST", &users)
            .json(&json!({"name": "calibration", "password": "x"}))
            .send_within(REQ)
            .await;
        assert_eq!(r.status, 201, "{}", text(&r));
        let latency = update_latency(
            &c,
            &Client::user_path("du", &node, "calibration"),
            &json!({"password": "y", "expiryTime": expiry(0, 0)}),
        )
        .await;
        let (mut update_first, mut delete_first) = (0, 0);
        for round in 0..n {
            let name = format!("du{round}");
            let r = c
                .req("POST", &users)
                .json(&json!({"name": name, "password": format!("old-{round}")}))
                .send_within(REQ)
                .await;
            assert_eq!(r.status, 201, "{}", text(&r));
            let barrier = Arc::new(tokio::sync::Barrier::new(2));
            let path = Client::user_path("du", &node, &name);
            // Odd rounds hold the delete back a random while, even rounds the update.
            let (del_delay, upd_delay) = if round % 2 == 1 {
                (jitter(latency), Duration::ZERO)
            } else {
                (Duration::ZERO, jitter(latency / 4))
            };
            let del = {
                let (c, b, path) = (c.clone(), barrier.clone(), path.clone());
                tokio::spawn(async move {
                    b.wait().await;
                    tokio::time::sleep(del_delay).await;
                    c.req("DELETE", &path).send_within(REQ).await
                })
            };
            let upd = {
                let (c, b, path) = (c.clone(), barrier.clone(), path.clone());
                tokio::spawn(async move {
                    let body =
                        json!({"password": format!("new-{round}"), "expiryTime": expiry(round, 1)});
                    b.wait().await;
                    tokio::time::sleep(upd_delay).await;
                    c.req("PUT", &path).json(&body).send_within(REQ).await
                })
            };
            let (d, u) = (del.await.unwrap(), upd.await.unwrap());
            assert_eq!(d.status, 200, "round {round}: delete: {}", text(&d));
            match u.status {
                200 => update_first += 1,
                404 => {
                    assert_eq!(u.code(), "NodeUserNotFound", "{}", text(&u));
                    delete_first += 1;
                }
                s => panic!("round {round}: update answered {s}: {}", text(&u)),
            }
            // Either order ends with the user gone: in the store, in the API, on the node.
            assert!(
                !stored(&c, "du", &node).await.contains_key(&name),
                "round {round}: {name} is still stored"
            );
            let again = c.req("PUT", &path).json(&json!({})).send_within(REQ).await;
            assert_eq!(
                (again.status, again.code().as_str()),
                (404, "NodeUserNotFound"),
                "round {round}"
            );
            if round < 3 || round == n - 1 {
                let (old, new) = tokio::join!(
                    password(port, &name, format!("old-{round}")),
                    password(port, &name, format!("new-{round}")),
                );
                assert_refused(&old, &format!("round {round}: the old password"));
                assert_refused(&new, &format!("round {round}: the updated password"));
            }
        }
        eprintln!(
            "{n} rounds (update {latency:?}): update first {update_first}, delete first {delete_first}"
        );
        assert!(
            update_first > 0 && delete_first > 0,
            "the race was not exercised both ways: update first {update_first}, delete first \
             {delete_first}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn update_vs_reboot_is_applied_or_refused_never_half() {
    within(Duration::from_secs(240), "the test", async {
        let dir = tempfile::tempdir().unwrap();
        let keys = tempfile::tempdir().unwrap();
        let srv = server(dir.path());
        let c = Arc::new(srv.client());
        let node = c.ready_pool("rb", "linux", 1).await.remove(0);
        let port = c.ssh_port("rb", &node).await;
        let path = Client::user_path("rb", &node, "ursula");
        let (old_key, old_pub) = keypair(keys.path(), "old");
        let (new_key, new_pub) = keypair(keys.path(), "new");
        let r = c
            .req("POST", &format!("/pools/rb/nodes/{node}/users"))
            .json(
                &json!({"name": "ursula", "password": "pw-start", "sshPublicKey": old_pub,
                          "expiryTime": expiry(0, 9)}),
            )
            .send_within(REQ)
            .await;
        assert_eq!(r.status, 201, "{}", text(&r));
        let latency = update_latency(
            &c,
            &path,
            &json!({"password": "pw-start", "sshPublicKey": old_pub, "expiryTime": expiry(0, 9)}),
        )
        .await;
        // What the account is now: (password, key file, expiry).
        let mut current = ("pw-start".to_string(), old_key.clone(), expiry(0, 9));
        let n = rounds(15, 60);
        let (mut applied, mut refused) = (0, 0);
        for round in 1..=n {
            // Alternate the keys so that each round's update changes the key too.
            let (key, public) = if round % 2 == 1 {
                (new_key.clone(), new_pub.clone())
            } else {
                (old_key.clone(), old_pub.clone())
            };
            let next = (format!("pw-{round}"), key, expiry(round, 1));
            let barrier = Arc::new(tokio::sync::Barrier::new(2));
            // Odd rounds hold the reboot back a random while, even rounds the update.
            let (reboot_delay, upd_delay) = if round % 2 == 1 {
                (jitter(latency), Duration::ZERO)
            } else {
                (Duration::ZERO, jitter(latency / 4))
            };
            let upd = {
                let (c, b, path) = (c.clone(), barrier.clone(), path.clone());
                let body =
                    json!({"password": next.0, "sshPublicKey": public, "expiryTime": next.2});
                tokio::spawn(async move {
                    b.wait().await;
                    tokio::time::sleep(upd_delay).await;
                    c.req("PUT", &path).json(&body).send_within(REQ).await
                })
            };
            let reboot = {
                let (c, b, node) = (c.clone(), barrier.clone(), node.clone());
                tokio::spawn(async move {
                    b.wait().await;
                    tokio::time::sleep(reboot_delay).await;
                    c.req("POST", &format!("/pools/rb/nodes/{node}/reboot"))
                        .send_within(REQ)
                        .await
                })
            };
            let (u, rb) = (upd.await.unwrap(), reboot.await.unwrap());
            assert_eq!(rb.status, 202, "round {round}: reboot: {}", text(&rb));
            let other = current.clone();
            match u.status {
                200 => {
                    applied += 1;
                    current = next;
                }
                409 => {
                    // Refused because of the reboot (or the start that follows it).
                    let code = u.code();
                    assert!(
                        code == "NodeBeingRebooted" || code == "NodeBeingStarted",
                        "round {round}: {}",
                        text(&u)
                    );
                    refused += 1;
                }
                s => panic!("round {round}: update answered {s}: {}", text(&u)),
            }
            let not_current = if u.status == 200 {
                other
            } else {
                (format!("pw-{round}"), current.1.clone(), expiry(round, 1))
            };
            wait_idle(&c, "rb", &node).await;
            // The stored account is the current one entirely, and the node applied it.
            let st = &stored(&c, "rb", &node).await["ursula"];
            assert_eq!(st["expiryTime"], current.2, "round {round}: {st}");
            assert_eq!(st["appliedOnNode"], true, "round {round}: {st}");
            // On the node: the current password and key log in, the other password does not;
            // when the key changed, the other key does not either.
            let other_key = if current.1 == old_key {
                &new_key
            } else {
                &old_key
            };
            let (pw_ok, pw_other, key_ok, key_other) = tokio::join!(
                password(port, "ursula", current.0.clone()),
                password(port, "ursula", not_current.0.clone()),
                key_login(port, "ursula", &current.1),
                key_login(port, "ursula", other_key),
            );
            assert_accepted(&pw_ok, &format!("round {round}: current password"));
            assert_refused(&pw_other, &format!("round {round}: the other password"));
            assert_accepted(&key_ok, &format!("round {round}: current key"));
            assert_refused(&key_other, &format!("round {round}: the other key"));
        }
        eprintln!(
            "{n} rounds (update {latency:?}): update applied {applied}, refused for the reboot \
             {refused}"
        );
        assert!(
            applied > 0 && refused > 0,
            "the race was not exercised both ways: applied {applied}, refused {refused}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resizes_with_if_match_on_one_etag_let_exactly_one_through() {
    within(Duration::from_secs(180), "the test", async {
        let dir = tempfile::tempdir().unwrap();
        let srv = server(dir.path());
        let c = Arc::new(srv.client());
        c.ready_pool("im", "linux", 0).await;
        const RACERS: usize = 4;
        let n = rounds(20, 80);
        let mut etags = HashSet::new();
        for round in 0..n {
            let before = wait_steady(&c, "im").await;
            let etag = before["eTag"].as_str().unwrap().to_string();
            assert!(etags.insert(etag.clone()), "ETag {etag} seen twice");
            let barrier = Arc::new(tokio::sync::Barrier::new(RACERS));
            // Racer w asks for w dedicated nodes (0..RACERS): the result names the winner.
            let tasks: Vec<_> = (0..RACERS)
                .map(|w| {
                    let (c, b) = (c.clone(), barrier.clone());
                    let tag = if w % 2 == 0 {
                        etag.clone()
                    } else {
                        format!("\"{etag}\"")
                    };
                    tokio::spawn(async move {
                        b.wait().await;
                        c.req("POST", "/pools/im/resize")
                            .header("if-match", &tag)
                            .json(&json!({"targetDedicatedNodes": w, "targetLowPriorityNodes": 0}))
                            .send_within(REQ)
                            .await
                    })
                })
                .collect();
            let mut winners = Vec::new();
            for (w, t) in tasks.into_iter().enumerate() {
                let r = t.await.unwrap();
                match r.status {
                    202 => winners.push(w),
                    412 => assert_eq!(r.code(), "ConditionNotMet", "{}", text(&r)),
                    s => panic!("round {round}: racer {w} got {s}: {}", text(&r)),
                }
            }
            assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
            let after = wait_steady(&c, "im").await;
            assert_eq!(
                after["targetDedicatedNodes"], winners[0],
                "round {round}: the pool does not hold the winner's target: {after}"
            );
            assert_eq!(after["currentDedicatedNodes"], winners[0], "{after}");
            assert_ne!(after["eTag"], before["eTag"]);
        }
    })
    .await;
}

/// Every id of a list, following `odata.nextLink` page by page (`maxresults` = `page`).
async fn list_all(c: &Client, path: &str, page: u32) -> Vec<String> {
    let mut ids = Vec::new();
    let mut query = format!("api-version={}&maxresults={page}", common::V);
    let mut pages = 0;
    loop {
        let r = c.req("GET", path).query(&query).send_within(REQ).await;
        assert_eq!(r.status, 200, "{query}: {}", text(&r));
        let v = r.json();
        let list = v["value"].as_array().unwrap();
        assert!(list.len() <= page as usize, "{v}");
        ids.extend(list.iter().map(|p| p["id"].as_str().unwrap().to_string()));
        pages += 1;
        assert!(pages < 10_000, "paging does not end");
        match v["odata.nextLink"].as_str() {
            None => return ids,
            Some(next) => {
                let (_, q) = next.split_once('?').expect("a nextLink with a query");
                assert!(next.contains(path), "{next}");
                query = q.to_string();
            }
        }
    }
}

fn assert_listing(ids: &[String], throughout: &HashSet<String>, what: &str) {
    let mut seen = HashSet::new();
    for id in ids {
        assert!(seen.insert(id), "{what}: {id} listed twice: {ids:?}");
    }
    for id in throughout {
        assert!(
            seen.contains(id),
            "{what}: {id} (present throughout) missing"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pool_paging_while_pools_come_and_go_lists_each_once_and_misses_none() {
    within(Duration::from_secs(180), "the test", async {
        let dir = tempfile::tempdir().unwrap();
        let srv = server(dir.path());
        let c = Arc::new(srv.client());
        // Stable pools s-00-b … s-29-b; churned pools s-NN-a / s-NN-c sort between them.
        let mut stable = HashSet::new();
        for i in 0..30 {
            let id = format!("s-{i:02}-b");
            let r = c.create_pool(&id, "linux", 0).await;
            assert_eq!(r.status, 201, "{}", text(&r));
            stable.insert(id);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let churned = Arc::new(AtomicU32::new(0));
        let churners: Vec<_> = (0..2)
            .map(|j| {
                let (c, stop, churned) = (c.clone(), stop.clone(), churned.clone());
                tokio::spawn(async move {
                    let mut k = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        let id = format!("s-{:02}-{}", (k * 7 + j * 13) % 30, ["a", "c"][j]);
                        let r = c
                            .req("POST", "/pools")
                            .json(&json!({"id": id, "vmSize": "STANDARD_D2S_V3",
                                "targetDedicatedNodes": 0,
                                "virtualMachineConfiguration": {"imageReference":
                                    {"publisher": "Canonical", "offer": "0001-com-ubuntu-server-jammy",
                                     "sku": "22_04-lts"}, "nodeAgentSKUId": "batch.node.ubuntu 22.04"}}))
                            .send_within(REQ)
                            .await;
                        // 409: the previous pool of that id is still being deleted.
                        assert!(matches!(r.status, 201 | 409), "{}", text(&r));
                        let r = c
                            .req("DELETE", &format!("/pools/{id}"))
                            .send_within(REQ)
                            .await;
                        assert!(matches!(r.status, 202 | 404 | 409), "{}", text(&r));
                        churned.fetch_add(1, Ordering::Relaxed);
                        k += 1;
                    }
                })
            })
            .collect();
        // At least n listings, and on until 20 pools came and went during them.
        let n = rounds(25, 100);
        let mut round = 0;
        while round < n || churned.load(Ordering::Relaxed) < 20 {
            let ids = list_all(&c, "/pools", 3).await;
            assert_listing(&ids, &stable, &format!("round {round}"));
            round += 1;
        }
        stop.store(true, Ordering::Relaxed);
        for t in churners {
            t.await.unwrap();
        }
        let churned = churned.load(Ordering::Relaxed);
        assert!(
            churned >= 20,
            "only {churned} pools added and deleted during the listing: no race"
        );
        eprintln!("{round} paged listings while {churned} pools came and went");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_paging_while_the_pool_resizes_lists_each_once_and_misses_none() {
    within(Duration::from_secs(180), "the test", async {
        let dir = tempfile::tempdir().unwrap();
        let srv = server(dir.path());
        let c = Arc::new(srv.client());
        let stable: HashSet<String> = c.ready_pool("np", "linux", 3).await.into_iter().collect();
        let stop = Arc::new(AtomicBool::new(false));
        let cycles = Arc::new(AtomicU32::new(0));
        // Grow the pool by 3, then remove exactly the new nodes, again and again.
        let resizer = {
            let (c, stop, cycles, stable) =
                (c.clone(), stop.clone(), cycles.clone(), stable.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let r = c
                        .req("POST", "/pools/np/resize")
                        .json(&json!({"targetDedicatedNodes": 6}))
                        .send_within(REQ)
                        .await;
                    assert_eq!(r.status, 202, "{}", text(&r));
                    wait_steady(&c, "np").await;
                    let all = list_all(&c, "/pools/np/nodes", 1000).await;
                    let new: Vec<&String> = all.iter().filter(|n| !stable.contains(*n)).collect();
                    assert_eq!(new.len(), 3, "{all:?}");
                    let r = c
                        .req("POST", "/pools/np/removenodes")
                        .json(&json!({"nodeList": new}))
                        .send_within(REQ)
                        .await;
                    assert_eq!(r.status, 202, "{}", text(&r));
                    wait_steady(&c, "np").await;
                    cycles.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        let n = rounds(60, 300);
        for round in 0..n {
            let ids = list_all(&c, "/pools/np/nodes", 2).await;
            assert_listing(&ids, &stable, &format!("round {round}"));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stop.store(true, Ordering::Relaxed);
        resizer.await.unwrap();
        let cycles = cycles.load(Ordering::Relaxed);
        assert!(
            cycles >= 1,
            "the pool never grew and shrank during the listing"
        );
        eprintln!("{n} paged node listings during {cycles} grow/shrink cycles");
    })
    .await;
}

/// `n` requests built by `make(i)`, released together; their answers in order.
async fn together<F>(c: &Arc<Client>, n: usize, make: F) -> Vec<Resp>
where
    F: Fn(&Client, usize) -> common::Req<'_> + Send + Sync + Clone + 'static,
{
    together_delayed(c, vec![Duration::ZERO; n], make).await
}

/// As [`together`], request `i` held back `delays[i]` after the release.
async fn together_delayed<F>(c: &Arc<Client>, delays: Vec<Duration>, make: F) -> Vec<Resp>
where
    F: Fn(&Client, usize) -> common::Req<'_> + Send + Sync + Clone + 'static,
{
    let barrier = Arc::new(tokio::sync::Barrier::new(delays.len()));
    let tasks: Vec<_> = delays
        .into_iter()
        .enumerate()
        .map(|(i, delay)| {
            let (c, b, make) = (c.clone(), barrier.clone(), make.clone());
            tokio::spawn(async move {
                b.wait().await;
                tokio::time::sleep(delay).await;
                make(&c, i).send_within(REQ).await
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// The statuses, and the error codes of the answers with status `of`.
fn tally(rs: &[Resp], of: u16) -> (Vec<u16>, Vec<String>) {
    let mut statuses: Vec<u16> = rs.iter().map(|r| r.status).collect();
    statuses.sort();
    let codes = rs
        .iter()
        .filter(|r| r.status == of)
        .map(Resp::code)
        .collect();
    (statuses, codes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_adds_of_one_pool_id_in_any_case_give_one_201() {
    within(Duration::from_secs(120), "the test", async {
        let dir = tempfile::tempdir().unwrap();
        let srv = server(dir.path());
        let c = Arc::new(srv.client());
        let n = rounds(25, 100);
        for round in 0..n {
            // Pool ids are unique case-insensitively: three spellings of one id race.
            let rs = together(&c, 3, move |c, i| {
                let id = [
                    format!("race-{round}"),
                    format!("RACE-{round}"),
                    format!("Race-{round}"),
                ][i]
                    .clone();
                c.req("POST", "/pools")
                    .json(&json!({"id": id, "vmSize": "STANDARD_D2S_V3",
                    "targetDedicatedNodes": 0,
                    "virtualMachineConfiguration": {"imageReference": {"publisher": "Canonical",
                        "offer": "0001-com-ubuntu-server-jammy", "sku": "22_04-lts"},
                        "nodeAgentSKUId": "batch.node.ubuntu 22.04"}}))
            })
            .await;
            let (statuses, codes) = tally(&rs, 409);
            assert_eq!(statuses, [201, 409, 409], "round {round}");
            assert_eq!(codes, ["PoolExists", "PoolExists"], "round {round}");
            let winner = rs.iter().position(|r| r.status == 201).unwrap();
            let v = c
                .req("GET", &format!("/pools/race-{round}"))
                .send_within(REQ)
                .await
                .json();
            let spelled = [
                format!("race-{round}"),
                format!("RACE-{round}"),
                format!("Race-{round}"),
            ];
            assert_eq!(
                v["id"], spelled[winner],
                "round {round}: the winner's spelling is kept"
            );
        }
        let list = list_all(&c, "/pools", 1000).await;
        assert_eq!(list.len(), n, "{list:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_deletes_of_one_user_give_one_200_and_windows_names_race_in_any_case() {
    within(Duration::from_secs(120), "the test", async {
        let dir = tempfile::tempdir().unwrap();
        let srv = server(dir.path());
        let c = Arc::new(srv.client());
        let linux = c.ready_pool("dl", "linux", 1).await.remove(0);
        let windows = c.ready_pool("dw", "windows", 1).await.remove(0);
        let port = c.ssh_port("dl", &linux).await;
        let n = rounds(25, 100);
        for round in 0..n {
            // Two Delete User of one user: one 200, one 404 NodeUserNotFound; the user is gone.
            let name = format!("del{round}");
            let r = c
                .req("POST", &format!("/pools/dl/nodes/{linux}/users"))
                .json(&json!({"name": name, "password": format!("pw-{round}")}))
                .send_within(REQ)
                .await;
            assert_eq!(r.status, 201, "{}", text(&r));
            let path = Client::user_path("dl", &linux, &name);
            let rs = together(&c, 2, move |c, _| c.req("DELETE", &path)).await;
            let (statuses, codes) = tally(&rs, 404);
            assert_eq!(statuses, [200, 404], "round {round}");
            assert_eq!(codes, ["NodeUserNotFound"], "round {round}");
            if round == 0 || round == n - 1 {
                let out = password(port, &name, format!("pw-{round}")).await;
                assert_refused(&out, &format!("round {round}: the deleted user"));
            }
            // Windows user names match in any case: "Win" and "WIN" added at once are one user.
            let users = format!("/pools/dw/nodes/{windows}/users");
            let rs = together(&c, 2, move |c, i| {
                let name = [format!("Win{round}"), format!("WIN{round}")][i].clone();
                c.req("POST", &users)
                    .json(&json!({"name": name, "password": "Windows-pw-1"}))
            })
            .await;
            let (statuses, codes) = tally(&rs, 409);
            assert_eq!(statuses, [201, 409], "round {round}: Windows");
            assert_eq!(codes, ["NodeUserExists"], "round {round}: Windows");
        }
        let shown = stored(&c, "dw", &windows).await;
        assert_eq!(shown.len(), n, "one Windows user per round: {shown:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resize_and_remove_nodes_with_if_match_on_one_etag_let_exactly_one_through() {
    within(Duration::from_secs(180), "the test", async {
        let dir = tempfile::tempdir().unwrap();
        let srv = server(dir.path());
        let c = Arc::new(srv.client());
        c.ready_pool("mx", "linux", 2).await;
        let n = rounds(12, 50);
        let (mut resized, mut removed) = (0, 0);
        for round in 0..n {
            let before = wait_steady(&c, "mx").await;
            let count = before["currentDedicatedNodes"].as_u64().unwrap();
            if count < 2 {
                let r = c
                    .req("POST", "/pools/mx/resize")
                    .json(&json!({"targetDedicatedNodes": 2}))
                    .send_within(REQ)
                    .await;
                assert_eq!(r.status, 202, "{}", text(&r));
                continue;
            }
            let nodes = list_all(&c, "/pools/mx/nodes", 1000).await;
            let etag = before["eTag"].as_str().unwrap().to_string();
            // Racers 0 and 1 resize to 3 and 4 nodes; racers 2 and 3 each remove one node.
            let rs = together(&c, 4, move |c, i| {
                let r = if i < 2 {
                    c.req("POST", "/pools/mx/resize")
                        .json(&json!({"targetDedicatedNodes": 3 + i}))
                } else {
                    c.req("POST", "/pools/mx/removenodes")
                        .json(&json!({"nodeList": [nodes[i - 2]]}))
                };
                r.header("if-match", &etag)
            })
            .await;
            let (statuses, codes) = tally(&rs, 412);
            assert_eq!(statuses, [202, 412, 412, 412], "round {round}");
            assert!(codes.iter().all(|c| c == "ConditionNotMet"), "{codes:?}");
            let winner = rs.iter().position(|r| r.status == 202).unwrap();
            let after = wait_steady(&c, "mx").await;
            let expect = if winner < 2 { 3 + winner as u64 } else { 1 };
            if winner < 2 {
                resized += 1;
            } else {
                removed += 1;
            }
            assert_eq!(
                after["targetDedicatedNodes"], expect,
                "round {round}: {after}"
            );
            assert_eq!(
                after["currentDedicatedNodes"], expect,
                "round {round}: {after}"
            );
            if expect > 2 {
                // Back to 2 for the next round.
                let r = c
                    .req("POST", "/pools/mx/resize")
                    .json(&json!({"targetDedicatedNodes": 2}))
                    .send_within(REQ)
                    .await;
                assert_eq!(r.status, 202, "{}", text(&r));
            }
        }
        eprintln!("{n} rounds: a resize won {resized}, a removal won {removed}");
    })
    .await;
}

/// The node-users control's whole answer.
async fn control_users(c: &Client, pool: &str, node: &str) -> Value {
    let r = c
        .control("GET", &format!("/pools/{pool}/nodes/{node}/users"))
        .send_within(REQ)
        .await;
    assert_eq!(r.status, 200, "{}", text(&r));
    r.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn add_user_vs_reimage_wipes_the_user_or_adds_it_after() {
    within(Duration::from_secs(240), "the test", async {
        let dir = tempfile::tempdir().unwrap();
        let srv = server(dir.path());
        let c = Arc::new(srv.client());
        let node = c.ready_pool("ri", "linux", 1).await.remove(0);
        let port = c.ssh_port("ri", &node).await;
        let users = format!("/pools/ri/nodes/{node}/users");
        // How long an Add User takes alone, to hold either side back by a part of it.
        let t = Instant::now();
        let r = c
            .req("POST", &users)
            .json(&json!({"name": "calibration", "password": "x"}))
            .send_within(REQ)
            .await;
        assert_eq!(r.status, 201, "{}", text(&r));
        let latency = t.elapsed();
        let n = rounds(12, 50);
        let (mut wiped, mut after, mut refused) = (0, 0, 0);
        for round in 0..n {
            wait_idle(&c, "ri", &node).await;
            // Every change of the node's accounts takes the next revision: R0 now, the reimage
            // and the add take R0+1 and R0+2 in the order they were made.
            let r0 = control_users(&c, "ri", &node).await["appliedRevision"]
                .as_u64()
                .unwrap();
            let name = format!("ri{round}");
            let (add_delay, reimage_delay) = if round % 2 == 1 {
                (Duration::ZERO, jitter(latency))
            } else {
                (jitter(latency / 4), Duration::ZERO)
            };
            let (u, b) = (users.clone(), node.clone());
            let rs = together_delayed(&c, vec![add_delay, reimage_delay], move |c, i| {
                if i == 0 {
                    c.req("POST", &u).json(
                        &json!({"name": format!("ri{round}"), "password": format!("pw-{round}")}),
                    )
                } else {
                    c.req("POST", &format!("/pools/ri/nodes/{b}/reimage"))
                }
            })
            .await;
            assert_eq!(
                rs[1].status,
                202,
                "round {round}: reimage: {}",
                text(&rs[1])
            );
            let added = match rs[0].status {
                201 => true,
                409 => {
                    assert_eq!(rs[0].code(), "NodeBeingReimaged", "{}", text(&rs[0]));
                    false
                }
                s => panic!("round {round}: Add User answered {s}: {}", text(&rs[0])),
            };
            wait_idle(&c, "ri", &node).await;
            let all = control_users(&c, "ri", &node).await;
            let listed = all["users"].as_array().unwrap();
            let path = Client::user_path("ri", &node, &name);
            let again = c
                .req("PUT", &path)
                .json(&json!({"password": format!("pw-{round}")}))
                .send_within(REQ)
                .await;
            let login = password(port, &name, format!("pw-{round}")).await;
            if listed.is_empty() {
                // Refused, or added before the reimage and wiped by it: gone everywhere.
                assert_eq!(
                    all["appliedRevision"].as_u64(),
                    Some(r0 + 1 + u64::from(added)),
                    "round {round}: {all}"
                );
                assert_eq!(
                    (again.status, again.code().as_str()),
                    (404, "NodeUserNotFound")
                );
                assert_refused(&login, &format!("round {round}: {name} after the reimage"));
                if added {
                    wiped += 1;
                } else {
                    refused += 1;
                }
            } else {
                // Kept: only if the add came after the reimage (the later revision), and then
                // entirely, on the node too.
                assert!(added, "round {round}: a refused user is there: {all}");
                assert_eq!(listed.len(), 1, "round {round}: {all}");
                let u = &listed[0];
                assert_eq!(u["name"], name.as_str(), "{all}");
                assert_eq!(
                    u["revision"].as_u64(),
                    Some(r0 + 2),
                    "round {round}: the user added before the reimage survived it: {all}"
                );
                assert_eq!(u["appliedOnNode"], true, "round {round}: {all}");
                assert_eq!(again.status, 200, "round {round}: {}", text(&again));
                assert_accepted(&login, &format!("round {round}: {name} added after"));
                after += 1;
            }
        }
        eprintln!(
            "{n} rounds ({latency:?}): added then wiped {wiped}, added after the reimage \
             {after}, refused {refused}"
        );
    })
    .await;
}
