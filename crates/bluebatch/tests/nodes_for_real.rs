//! Issues 3 and 4 through the whole server: accounts set over the API log in (or not) with the
//! real OpenSSH client; node states, the movable clock, the seed file and the control CLI.

mod common;

use common::{Client, Server, SshOutcome, host_key_read, keypair, ssh_key_outcome};
use serde_json::{Value, json};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

async fn user(c: &Client, pool: &str, node: &str, body: Value) {
    let r = c
        .req("POST", &format!("/pools/{pool}/nodes/{node}/users"))
        .json(&body)
        .send()
        .await;
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
}

async fn update(c: &Client, pool: &str, node: &str, name: &str, body: Value) {
    let r = c
        .req("PUT", &Client::user_path(pool, node, name))
        .json(&body)
        .send()
        .await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
}

/// A password login over the real OpenSSH client running `echo ok` (bounded by
/// `common::SSH_DEADLINE`): accepted, refused by sshd, or no answer, told apart.
async fn pw(port: u16, user: &str, password: &str) -> SshOutcome {
    common::ssh_password_outcome(port, user, password, "127.0.0.1", "echo ok").await
}

/// Panics unless the login was accepted and ran the command.
async fn accepted(port: u16, user: &str, password: &str, what: &str) {
    let out = pw(port, user, password).await;
    assert_eq!(out.stdout(what).trim(), "ok", "{what}");
}

/// Panics unless the node answered and refused the login (a node that did not answer fails).
async fn refused(port: u16, user: &str, password: &str, what: &str) {
    assert_eq!(
        pw(port, user, password).await,
        SshOutcome::Refused,
        "{what}"
    );
}

/// A login with one key file only, running `echo ok`.
async fn with_key(port: u16, user: &str, key: &std::path::Path) -> SshOutcome {
    ssh_key_outcome(port, user, key, "127.0.0.1", "echo ok").await
}

#[tokio::test]
async fn update_user_takes_effect_on_the_node_before_200() {
    let srv = Server::start();
    let c = srv.client();
    let nodes = c.ready_pool("p", "linux", 1).await;
    let n = &nodes[0];
    let port = c.ssh_port("p", n).await;
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keypair(dir.path(), "k1");

    user(&c, "p", n, json!({"name": "alice", "password": "first-pw"})).await;
    accepted(port, "alice", "first-pw", "the first password").await;
    update(&c, "p", n, "alice", json!({"password": "second-pw"})).await;
    refused(port, "alice", "first-pw", "the old password stops at once").await;
    accepted(port, "alice", "second-pw", "the new password").await;
    // Key only: the password is removed, the key works.
    update(&c, "p", n, "alice", json!({"sshPublicKey": public})).await;
    refused(port, "alice", "second-pw", "the password is removed").await;
    assert_eq!(
        with_key(port, "alice", &key).await.stdout("the key").trim(),
        "ok"
    );
    // An update without the key removes it.
    update(&c, "p", n, "alice", json!({"password": "third-pw"})).await;
    assert_eq!(
        with_key(port, "alice", &key).await,
        SshOutcome::Refused,
        "the key is removed"
    );
    accepted(port, "alice", "third-pw", "the third password").await;
    // A bad request changes nothing on the node.
    let r = c
        .req("PUT", &Client::user_path("p", n, "alice"))
        .json(&json!({"password": 5}))
        .send()
        .await;
    assert_eq!(r.status, 400);
    accepted(port, "alice", "third-pw", "a bad request changes nothing").await;
    // A past expiry is accepted, and the account cannot log in.
    update(
        &c,
        "p",
        n,
        "alice",
        json!({"password": "third-pw", "expiryTime": "2016-11-27T00:45:48.7320857Z"}),
    )
    .await;
    refused(port, "alice", "third-pw", "an expired account").await;
    // What the node applied agrees with what the API recorded.
    let users = c
        .control("GET", &format!("/pools/p/nodes/{n}/users"))
        .send()
        .await
        .json();
    let u = &users["users"][0];
    assert_eq!(
        (
            u["name"].as_str(),
            u["hasPassword"].as_bool(),
            u["appliedOnNode"].as_bool()
        ),
        (Some("alice"), Some(true), Some(true))
    );
    assert_eq!(u["loginRefusedFrom"], "2016-11-28T00:00:00Z");
    assert!(u.get("password").is_none() && !users.to_string().contains("third-pw"));
}

#[tokio::test]
async fn delete_refuses_login_and_ends_open_sessions() {
    let srv = Server::start();
    let c = srv.client();
    let nodes = c.ready_pool("p", "linux", 1).await;
    let n = &nodes[0];
    let port = c.ssh_port("p", n).await;
    user(&c, "p", n, json!({"name": "bob", "password": "pw-bob"})).await;
    let mut session = Command::new("sshpass")
        .arg("-e")
        .arg("ssh")
        .args(common::ssh_opts(port, "password"))
        .args(["bob@127.0.0.1", "echo started; sleep 30"])
        .env("SSHPASS", "pw-bob")
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the session runs.
    let mut out = std::io::BufReader::new(session.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "started");
    let t0 = Instant::now();
    assert_eq!(
        c.req("DELETE", &Client::user_path("p", n, "bob"))
            .send()
            .await
            .status,
        200
    );
    let status = loop {
        if let Some(st) = session.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the session outlived the account"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!status.success());
    refused(port, "bob", "pw-bob", "a deleted account").await;
}

#[tokio::test]
async fn each_state_gives_its_409_and_reboot_keeps_users_reimage_removes_them() {
    let srv = Server::start();
    let c = srv.client();
    let nodes = c.ready_pool("p", "linux", 1).await;
    let n = &nodes[0];
    user(&c, "p", n, json!({"name": "u", "password": "pw"})).await;
    for (state, code) in [
        ("creating", "NodeBeingCreated"),
        ("starting", "NodeBeingStarted"),
        ("waitingforstarttask", "NodeBeingStarted"),
        ("rebooting", "NodeBeingRebooted"),
        ("reimaging", "NodeBeingReimaged"),
        ("unusable", "NodeStateUnusable"),
        ("starttaskfailed", "OperationInvalidForCurrentState"),
        ("leavingpool", "OperationInvalidForCurrentState"),
        ("offline", "OperationInvalidForCurrentState"),
        ("preempted", "OperationInvalidForCurrentState"),
        ("unknown", "OperationInvalidForCurrentState"),
    ] {
        let r = c
            .control("PUT", &format!("/pools/p/nodes/{n}/state"))
            .json(&json!({"state": state}))
            .send()
            .await;
        assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
        assert_eq!(
            c.req("GET", &format!("/pools/p/nodes/{n}"))
                .send()
                .await
                .json()["state"],
            state
        );
        let add = c
            .req("POST", &format!("/pools/p/nodes/{n}/users"))
            .json(&json!({"name": "v"}))
            .send()
            .await;
        let upd = c
            .req("PUT", &Client::user_path("p", n, "u"))
            .json(&json!({}))
            .send()
            .await;
        let del = c
            .req("DELETE", &Client::user_path("p", n, "u"))
            .send()
            .await;
        for r in [&add, &upd, &del] {
            assert_eq!((r.status, r.code()), (409, code.to_string()), "{state}");
        }
    }
    let r = c
        .control("PUT", &format!("/pools/p/nodes/{n}/state"))
        .json(&json!({"state": "running"}))
        .send()
        .await;
    assert_eq!(r.status, 200);
    update(&c, "p", n, "u", json!({"password": "pw"})).await;
    let port = c.ssh_port("p", n).await;
    accepted(port, "u", "pw", "before the reboot").await;
    // host_key_read panics when no key was read: the comparisons below cannot pass on nothing.
    let key_before = host_key_read(port).await;
    // Reboot: the node is `rebooting` at once (SDK pollers look right away), then idle, users kept.
    assert_eq!(
        c.req("POST", &format!("/pools/p/nodes/{n}/reboot"))
            .json(&json!({"nodeRebootOption": "requeue"}))
            .send()
            .await
            .status,
        202
    );
    assert_eq!(
        c.req("GET", &format!("/pools/p/nodes/{n}"))
            .send()
            .await
            .json()["state"],
        "rebooting"
    );
    wait_state(&c, "p", n, "idle").await;
    accepted(port, "u", "pw", "a reboot keeps the users").await;
    assert_eq!(
        host_key_read(port).await,
        key_before,
        "a reboot keeps the host key"
    );
    // Reimage: users gone, new host key.
    assert_eq!(
        c.req("POST", &format!("/pools/p/nodes/{n}/reimage"))
            .send()
            .await
            .status,
        202
    );
    assert_eq!(
        c.req("GET", &format!("/pools/p/nodes/{n}"))
            .send()
            .await
            .json()["state"],
        "reimaging"
    );
    wait_state(&c, "p", n, "idle").await;
    assert_ne!(
        host_key_read(port).await,
        key_before,
        "a reimage gives a new host key"
    );
    refused(port, "u", "pw", "a reimage removes the users").await;
    assert_eq!(
        c.req("PUT", &Client::user_path("p", n, "u"))
            .json(&json!({}))
            .send()
            .await
            .code(),
        "NodeUserNotFound"
    );
}

async fn wait_state(c: &Client, pool: &str, node: &str, state: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while c
        .req("GET", &format!("/pools/{pool}/nodes/{node}"))
        .send()
        .await
        .json()["state"]
        != state
    {
        assert!(Instant::now() < deadline, "node never reached {state}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn clock_now(c: &Client) -> time::OffsetDateTime {
    let v = c.control("GET", "/clock").send().await.json();
    time::OffsetDateTime::parse(
        v["now"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap()
}

async fn advance(c: &Client, seconds: i64) {
    let r = c
        .control("POST", "/clock/advance")
        .json(&json!({"by": seconds}))
        .send()
        .await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
}

#[tokio::test]
async fn moving_the_clock_expires_accounts_exactly_at_the_day_boundary() {
    let srv = Server::start();
    let c = srv.client();
    let nodes = c.ready_pool("p", "linux", 1).await;
    let n = &nodes[0];
    let port = c.ssh_port("p", n).await;
    // Default expiry (now + 1 day): usable to the end of that UTC day, refused from the next 00:00.
    user(&c, "p", n, json!({"name": "dflt", "password": "pw"})).await;
    let now = clock_now(&c).await;
    let refused_from = (now + time::Duration::days(1)).replace_time(time::Time::MIDNIGHT)
        + time::Duration::days(1);
    let users = c
        .control("GET", &format!("/pools/p/nodes/{n}/users"))
        .send()
        .await
        .json();
    assert_eq!(
        users["users"][0]["loginRefusedFrom"],
        bluebatch_core::timefmt::iso(refused_from)
    );
    // One minute before the boundary: still in. Two minutes later: out.
    advance(
        &c,
        (refused_from - clock_now(&c).await).whole_seconds() - 60,
    )
    .await;
    accepted(port, "dflt", "pw", "usable until the end of the day").await;
    advance(&c, 120).await;
    refused(port, "dflt", "pw", "refused from 00:00 UTC of the next day").await;
    // An explicit expiry at 00:30 today: usable until midnight, not beyond.
    let now = clock_now(&c).await;
    let expiry = now.replace_time(time::macros::time!(0:30));
    user(&c, "p", n, json!({"name": "expl", "password": "pw", "expiryTime": bluebatch_core::timefmt::iso(expiry)})).await;
    let midnight = now.replace_time(time::Time::MIDNIGHT) + time::Duration::days(1);
    advance(&c, (midnight - clock_now(&c).await).whole_seconds() - 60).await;
    accepted(
        port,
        "expl",
        "pw",
        "day precision: still usable after 00:30",
    )
    .await;
    advance(&c, 120).await;
    refused(port, "expl", "pw", "refused from the next midnight").await;
}

#[tokio::test]
async fn seed_file_and_control_cli() {
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().join("seed.json");
    std::fs::write(
        &seed,
        json!({"pools": [{"pool": {"id": "ci", "vmSize": "STANDARD_D2S_V3", "targetDedicatedNodes": 2,
            "virtualMachineConfiguration": {"imageReference": {"publisher": "Canonical", "offer": "0001-com-ubuntu-server-jammy", "sku": "22_04-lts"}, "nodeAgentSKUId": "batch.node.ubuntu 22.04"}},
            "users": [{"name": "ci", "password": "seeded-pw", "isAdmin": true}]}]})
        .to_string(),
    )
    .unwrap();
    let data = dir.path().join("data");
    let srv = Server::start_with(&[
        "--data-dir",
        data.to_str().unwrap(),
        "--seed",
        seed.to_str().unwrap(),
    ]);
    let c = srv.client();
    let v = c.req("GET", "/pools/ci/nodes").send().await.json();
    let nodes: Vec<String> = v["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        nodes.len(),
        2,
        "the seeded pool is there when the server answers"
    );
    for n in &nodes {
        let port = c.ssh_port("ci", n).await;
        accepted(port, "ci", "seeded-pw", "the seeded account").await;
    }
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_bluebatch"))
            .args(args)
            .env("BLUEBATCH_URL", &srv.url)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = cli(&["clock", "advance", "2d"]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["offsetSeconds"], 2 * 86400);
    let (ok, out, _) = cli(&["node", "users", "ci", &nodes[0]]);
    assert!(ok);
    assert!(out.contains("\"isAdmin\": true") && !out.contains("seeded-pw"));
    let (ok, _, _) = cli(&["node", "set-state", "ci", &nodes[0], "unusable"]);
    assert!(ok);
    assert_eq!(
        c.req("GET", &format!("/pools/ci/nodes/{}", nodes[0]))
            .send()
            .await
            .json()["state"],
        "unusable"
    );
    // The CLI knows the states (and lists them); the server refuses an unknown one too.
    let (ok, _, err) = cli(&["node", "set-state", "ci", &nodes[0], "sideways"]);
    assert!(
        !ok && err.contains("sideways") && err.contains("waitingforstarttask"),
        "{err}"
    );
    let r = c
        .control("PUT", &format!("/pools/ci/nodes/{}/state", nodes[0]))
        .json(&json!({"state": "sideways"}))
        .send()
        .await;
    assert_eq!(
        (r.status, r.code()),
        (400, "InvalidPropertyValue".to_string())
    );
    // The clock moved two days: the seeded accounts (default expiry) no longer log in.
    let port = c.ssh_port("ci", &nodes[1]).await;
    refused(port, "ci", "seeded-pw", "a seeded account two days later").await;
    let (ok, _, _) = cli(&["reset"]);
    assert!(ok);
    assert_eq!(
        c.req("GET", "/pools/ci").send().await.code(),
        "PoolNotFound"
    );
    // Controls need the account's key.
    let stranger = Client::new(&srv.url, "bluebatchdev", "d3Jvbmcga2V5IHdyb25nIGtleQ==");
    assert_eq!(stranger.control("POST", "/reset").send().await.status, 403);
}

#[tokio::test]
async fn after_a_restart_every_node_is_back_with_its_accounts_port_and_host_key() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_string();
    let (nodes, ports, keys) = {
        let mut srv = Server::start_with(&["--data-dir", &data]);
        let c = srv.client();
        let nodes = c.ready_pool("p", "linux", 2).await;
        let mut ports = Vec::new();
        for n in &nodes {
            user(&c, "p", n, json!({"name": "keeper", "password": "pw-1"})).await;
            update(&c, "p", n, "keeper", json!({"password": "pw-2"})).await;
            ports.push(c.ssh_port("p", n).await);
        }
        let mut keys = Vec::new();
        for p in &ports {
            keys.push(host_key_read(*p).await);
        }
        srv.stop(); // SIGTERM: endpoints go down with the server
        (nodes, ports, keys)
    };
    for p in &ports {
        let out = pw(*p, "keeper", "pw-2").await;
        assert!(
            matches!(out, SshOutcome::Unreachable(_)),
            "nothing listens while the server is down: {out:?}"
        );
    }
    let srv = Server::start_with(&["--data-dir", &data]);
    let c = srv.client();
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(c.ssh_port("p", n).await, ports[i]);
        accepted(
            ports[i],
            "keeper",
            "pw-2",
            "the account is back, with its last password",
        )
        .await;
        refused(ports[i], "keeper", "pw-1", "the old password").await;
        assert_eq!(host_key_read(ports[i]).await, keys[i], "same host key");
    }
}
