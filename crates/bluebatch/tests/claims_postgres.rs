//! The claims of docs/postgres.md and of the README's "Many replicas on PostgreSQL" that no other
//! suite covers, and the edge cases a user of two replicas hits: the `store:` banner line never
//! shows a password, `--store sqlite` (or none) keeps the embedded store, `--in-memory` with
//! `--store` and a non-PostgreSQL URL are refused, readiness on the embedded store, the
//! database's account keys outliving a later file's, the `background` lease moving at once on
//! SIGTERM, `host list` seeing a host connected from every replica, Delete Pool on one replica
//! while the agent polls the other, Reboot through one replica, the service clock moved through
//! one replica (the other's answers and the agent's SSH expiry follow), join tokens and hosts
//! revoked on one replica refused on the other, a Windows pool on simulated agents, and a replica
//! behind a pruned change log reading the snapshot.
//!
//! Needs `BLUEBATCH_TEST_PG` (scripts/pg.sh); without it each test prints a loud skip and
//! passes, except under CI=true.

mod common;

use common::replicas::*;
use common::*;
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The deadline of each request.
const T: Duration = Duration::from_secs(20);

/// `bluebatch serve --port 0` with `args` and `env`, its stdout lines until the `nodes:` line
/// (the banner's last line), at most 40 s.
fn serve_banner(args: &[&str], env: &[(&str, &str)]) -> (KillOnDrop, Vec<String>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bluebatch"))
        .args(["serve", "--port", "0"])
        .args(args)
        .env("BLUEBATCH_LOG", "info")
        .env_remove("BLUEBATCH_STORE")
        .env_remove("BLUEBATCH_NODES")
        .env_remove("BLUEBATCH_ACCOUNTS")
        .env_remove("BLUEBATCH_ACCOUNTS_FILE")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting bluebatch serve");
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let l2 = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let mut g = l2.lock().unwrap();
            g.push_str(&line);
            g.push('\n');
        }
    });
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(l) => {
                let last = l.starts_with("nodes:");
                lines.push(l);
                if last {
                    break;
                }
            }
            Err(_) => {
                assert!(
                    Instant::now() < deadline,
                    "no banner within 40 s: {lines:?}"
                );
                if let Some(st) = child.try_wait().unwrap() {
                    panic!("serve {args:?} exited: {st}: {lines:?}");
                }
            }
        }
    }
    // Let the startup log lines arrive too.
    std::thread::sleep(Duration::from_millis(300));
    let text = log.lock().unwrap().clone();
    (KillOnDrop(child), lines, text)
}

fn url_of(lines: &[String]) -> String {
    lines
        .iter()
        .find_map(|l| l.strip_prefix("bluebatch listening on "))
        .expect("a listening line")
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_flag_banner_and_refusals() {
    // The embedded store: no --store, and --store sqlite; ready answers 200 there too.
    for extra in [vec![], vec!["--store", "sqlite"]] {
        let dir = tempfile::tempdir().unwrap();
        let mut args = vec!["--data-dir", dir.path().to_str().unwrap()];
        args.extend(extra.iter().copied());
        let (_srv, lines, _) = serve_banner(&args, &[]);
        let store = lines.iter().find(|l| l.starts_with("store: ")).unwrap();
        assert!(store.ends_with("state.db"), "{extra:?}: {store}");
        assert!(dir.path().join("state.db").exists(), "{extra:?}");
        let r = ready(&url_of(&lines)).await.expect("ready answers");
        assert_eq!(r.status, 200, "{extra:?}: {}", text(&r));
        assert_eq!(r.json()["status"], "ready");
    }
    // Refused: --in-memory with a PostgreSQL store, a URL of another kind.
    let Some(db) = TestDb::create() else { return };
    let (code, err) = serve_exits(
        &["--store", &db.url, "--nodes", "agents", "--in-memory"],
        &[],
    );
    assert!(matches!(code, Some(c) if c != 0), "{code:?} {err}");
    assert!(err.contains("--in-memory"), "{err}");
    for bad in ["mysql://db/x", "state.db", "http://127.0.0.1:1/x"] {
        let (code, err) = serve_exits(&["--store", bad, "--nodes", "agents"], &[]);
        assert!(matches!(code, Some(c) if c != 0), "{bad}: {code:?} {err}");
        assert!(err.contains("not a PostgreSQL URL"), "{bad}: {err}");
    }
    // The banner names the database and never the password (PGPASSWORD and a password file).
    let dir = tempfile::tempdir().unwrap();
    let pwfile = dir.path().join("pw");
    std::fs::write(&pwfile, "file-secret-pw-42\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&pwfile, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let data = dir.path().join("d");
    let (_srv, lines, log) = serve_banner(
        &[
            "--store",
            &db.url,
            "--nodes",
            "agents",
            "--data-dir",
            data.to_str().unwrap(),
            "--store-password-file",
            pwfile.to_str().unwrap(),
        ],
        &[("PGPASSWORD", "env-secret-pw-42")],
    );
    let store = lines.iter().find(|l| l.starts_with("store: ")).unwrap();
    assert!(store.starts_with("store: postgres://"), "{store}");
    assert!(store.contains(&db.name), "{store}");
    let all = format!("{}\n{log}", lines.join("\n"));
    assert!(!all.contains("secret-pw-42"), "a password shown: {all}");
    assert!(
        !all.contains(":env-secret") && !all.contains("PGPASSWORD="),
        "{all}"
    );
}

/// The database's keys win over a later file's: the file's key for an account already stored is
/// refused on every replica, the stored key keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_keys_in_the_database_win_over_a_later_file() {
    let Some(mut rs) = Replicas::start(1) else {
        return;
    };
    let later = "bGF0ZXIgZmlsZSBrZXkgdGhhdCBtdXN0IG5vdCB3aW4gYW55dGhpbmc=";
    let file = rs.dir.path().join("accounts.json");
    std::fs::write(
        &file,
        json!({"accounts": [{"name": ACCOUNT, "keys": [later]}]}).to_string(),
    )
    .unwrap();
    rs.extra = vec![
        "--no-dev-account".into(),
        "--accounts-file".into(),
        file.to_str().unwrap().into(),
    ];
    let second = rs.add();
    for i in [0, second] {
        let r = rs.at(i).req("GET", "/pools").send_within(T).await;
        assert_eq!(r.status, 200, "replica {i}, stored key: {}", text(&r));
        let c = Client::new(rs.url(i), ACCOUNT, later);
        let r = c.req("GET", "/pools").send_within(T).await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (403, "AuthenticationFailed"),
            "replica {i}: the later file's key must not authenticate"
        );
    }
}

/// `--replace-stored-accounts`: the database's accounts become exactly the starting replica's:
/// a rotated key replaces the stored one and an account not named (the development account,
/// with `--no-dev-account`) goes, on the replicas already running too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_stored_accounts_rotates_keys_and_removes_accounts_on_every_replica() {
    let Some(mut rs) = Replicas::start(1) else {
        return;
    };
    let rotated = "cm90YXRlZCBrZXkgb2YgdGhlIG90aGVyIGFjY291bnQgZm9yIHRlc3Rz";
    let file = rs.dir.path().join("accounts.json");
    std::fs::write(
        &file,
        json!({"accounts": [{"name": "rotatedacct", "keys": [rotated]}]}).to_string(),
    )
    .unwrap();
    rs.extra = vec![
        "--no-dev-account".into(),
        "--accounts-file".into(),
        file.to_str().unwrap().into(),
        "--replace-stored-accounts".into(),
    ];
    let second = rs.add();
    let deadline = Instant::now() + Duration::from_secs(10);
    for i in [0, second] {
        let fresh = Client::new(rs.url(i), "rotatedacct", rotated);
        loop {
            let dev = rs.at(i).req("GET", "/pools").send_within(T).await;
            let new = fresh.req("GET", "/pools").send_within(T).await;
            if (dev.status, new.status) == (403, 200) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "replica {i}: dev account {} (want 403), rotated account {} (want 200)",
                dev.status,
                new.status
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// SIGTERM on the holder of `background` hands it over at once (well under its 5 s lease), and
/// the other replica then runs the lifecycle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_background_lease_moves_at_once_on_sigterm() {
    let Some(db) = TestDb::create() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut a = Replica::start(
        &db.url,
        &dir.path().join("a"),
        &["--replica-id", "replica-a"],
    );
    let holder = db.wait_lease("background", None, T).await;
    assert_eq!(holder, "replica-a", "the only replica holds it");
    let b = Replica::start(
        &db.url,
        &dir.path().join("b"),
        &["--replica-id", "replica-b"],
    );
    let _agent = SimAgent::join(
        &b.client(),
        &b.url,
        &dir.path().join("agent"),
        2,
        "32400-32449",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(db.lease_holder("background").as_deref(), Some("replica-a"));
    let t0 = Instant::now();
    let st = a.terminate(T);
    assert!(st.success(), "{st}");
    let next = db
        .wait_lease("background", Some("replica-a"), Duration::from_secs(4))
        .await;
    assert_eq!(next, "replica-b");
    assert!(
        t0.elapsed() < Duration::from_millis(3500),
        "the lease moved only after {:?}",
        t0.elapsed()
    );
    // B runs the lifecycle now.
    let c = b.client();
    add_steady_pool(&c, "after", 2, &c).await;
}

async fn hosts(c: &Client) -> Vec<serde_json::Value> {
    let r = c.control("GET", "/hosts").send_within(T).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    r.json()["value"].as_array().cloned().unwrap_or_default()
}

/// Waits (at most `T`) until `pool` answers 404 on both `a` and `b` and the one host's slots are
/// free on both.
async fn pool_gone_and_slots_free(a: &Client, b: &Client, pool: &str) {
    let path = format!("/pools/{pool}");
    let free = |h: &Vec<serde_json::Value>| h[0]["nodes"].as_array().is_some_and(|n| n.is_empty());
    within(
        T,
        &format!("{pool} gone and the host's slots free on both"),
        async {
            loop {
                let ga = a.req("GET", &path).send_within(T).await;
                let gb = b.req("GET", &path).send_within(T).await;
                let ha = hosts(a).await;
                let hb = hosts(b).await;
                if ga.status == 404 && gb.status == 404 && free(&ha) && free(&hb) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        },
    )
    .await;
}

/// The agent polls B; `host list` is asked of A and B in turn: connected on both; Delete Pool on
/// A frees the host's slots on both, and a new pool made on A takes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_list_and_delete_pool_across_replicas() {
    let Some(rs) = Replicas::start(2) else { return };
    let (a, b) = (rs.at(0), rs.at(1));
    let (_dir, _agent) = rs.agent(0, 1, 2, "32450-32499").await;
    within(
        T,
        "the host to be listed connected on both replicas",
        async {
            loop {
                let ha = hosts(a).await;
                let hb = hosts(b).await;
                if ha.len() == 1
                    && hb.len() == 1
                    && ha[0]["connected"] == true
                    && hb[0]["connected"] == true
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        },
    )
    .await;
    // Asked many times, it stays connected on the replica the agent does not poll.
    for _ in 0..20 {
        let ha = hosts(a).await;
        assert_eq!(ha[0]["connected"], true, "A: {ha:?}");
        let hb = hosts(b).await;
        assert_eq!(hb[0]["connected"], true, "B: {hb:?}");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }

    add_steady_pool(a, "p1", 2, b).await;
    // No slot left: a pool made now waits.
    let r = b.req("DELETE", "/pools/p1").send_within(T).await;
    assert_eq!(r.status, 202, "{}", text(&r));
    pool_gone_and_slots_free(a, b, "p1").await;
    add_steady_pool(a, "p2", 2, a).await;
    steady_nodes(b, "p2", 2, T).await;
}

/// Reboot and Reimage through A of a node whose agent polls B: 202, the node goes through
/// `rebooting`/`reimaging` and back to idle, seen alike on both; a user added through B after
/// is applied (the agent still serves the node).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reboot_and_reimage_through_the_replica_the_agent_does_not_poll() {
    let Some(rs) = Replicas::start_with(2, &["--node-step-ms", "300"]) else {
        return;
    };
    let (a, b) = (rs.at(0), rs.at(1));
    let (_dir, _agent) = rs.agent(0, 1, 1, "32500-32549").await;
    let node = add_steady_pool(a, "p", 1, b).await.remove(0);
    for (op, mid) in [("reboot", "rebooting"), ("reimage", "reimaging")] {
        let r = a
            .req("POST", &format!("/pools/p/nodes/{node}/{op}"))
            .json(&json!({}))
            .send_within(T)
            .await;
        assert_eq!(r.status, 202, "{op}: {}", text(&r));
        let g = b
            .req("GET", &format!("/pools/p/nodes/{node}"))
            .send_within(T)
            .await;
        assert_eq!(
            g.json()["state"],
            mid,
            "{op} read at once on B: {}",
            text(&g)
        );
        steady_nodes(a, "p", 1, Duration::from_secs(30)).await;
        steady_nodes(b, "p", 1, T).await;
    }
    let r = b
        .req("POST", &format!("/pools/p/nodes/{node}/users"))
        .json(&json!({"name": "after", "password": "After-pw-1"}))
        .send_within(T)
        .await;
    assert_eq!(r.status, 201, "{}", text(&r));
    // The 201 came with the node's acknowledgement; its record (what `appliedOnNode` reads)
    // follows in a commit of its own, milliseconds later.
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let u = a
            .control("GET", &format!("/pools/p/nodes/{node}/users"))
            .send_within(T)
            .await;
        assert_eq!(u.status, 200, "{}", text(&u));
        let users = u.json()["users"].as_array().cloned().unwrap_or_default();
        let after = users
            .iter()
            .find(|x| x["name"] == "after")
            .unwrap_or_else(|| panic!("{}", text(&u)));
        if after["appliedOnNode"] == true {
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "not applied on the node 5 s after its 201: {}",
            text(&u)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The service clock advanced through A: B's clock follows at once, and a user whose expiry the
/// offset passed can no longer log in over SSH to the simulated node whose agent polls B; reset
/// through B lets her in again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clock_moved_through_one_replica_is_the_others_and_the_agents() {
    require_ssh();
    let Some(rs) = Replicas::start(2) else { return };
    let (a, b) = (rs.at(0), rs.at(1));
    let (_dir, _agent) = rs.agent(0, 1, 1, "32550-32599").await;
    let node = add_steady_pool(a, "p", 1, b).await.remove(0);
    let expiry = time::OffsetDateTime::now_utc() + time::Duration::days(2);
    let r = a
        .req("POST", &format!("/pools/p/nodes/{node}/users"))
        .json(&json!({"name": "alice", "password": "Alice-pw-1",
                      "expiryTime": bluebatch_core::timefmt::iso(expiry)}))
        .send_within(T)
        .await;
    assert_eq!(r.status, 201, "{}", text(&r));
    let port = b.ssh_port("p", &node).await;
    assert!(ssh_password_login(port, "alice", "Alice-pw-1", &loopback_source(1)).await);

    let r = a
        .control("POST", "/clock/advance")
        .json(&json!({"by": "5d"}))
        .send_within(T)
        .await;
    assert_eq!(r.status, 200, "{}", text(&r));
    let cb = b.control("GET", "/clock").send_within(T).await;
    assert_eq!(cb.status, 200, "{}", text(&cb));
    let off = cb.json()["offsetSeconds"].as_f64().unwrap_or(0.0);
    assert!((off - 432000.0).abs() < 60.0, "B's clock: {}", text(&cb));
    within(
        T,
        "alice refused once the offset passed her expiry",
        async {
            let mut n = 2;
            loop {
                if !ssh_password_login(port, "alice", "Alice-pw-1", &loopback_source(n)).await {
                    return;
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        },
    )
    .await;
    let r = b.control("POST", "/clock/reset").send_within(T).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    let ca = a.control("GET", "/clock").send_within(T).await;
    assert_eq!(
        ca.json()["offsetSeconds"].as_f64(),
        Some(0.0),
        "{}",
        text(&ca)
    );
    within(T, "alice back once the clock is reset", async {
        let mut n = 20;
        loop {
            if ssh_password_login(port, "alice", "Alice-pw-1", &loopback_source(n)).await {
                return;
            }
            n += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
}

/// A join token revoked on A is refused on B (403); a host revoked on A loses its nodes on both
/// and its long poll on B ends with its credential refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_hosts_revoked_on_one_replica_are_refused_on_the_other() {
    let Some(rs) = Replicas::start(2) else { return };
    let (a, b) = (rs.at(0), rs.at(1));
    let r = agents::create_token(a, json!({})).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    let (id, token) = (
        r.json()["id"].as_str().unwrap().to_string(),
        r.json()["token"].as_str().unwrap().to_string(),
    );
    let d = a
        .control("DELETE", &format!("/join-tokens/{id}"))
        .send_within(T)
        .await;
    assert_eq!(d.status, 200, "{}", text(&d));
    let j = reqwest::Client::new()
        .post(format!("{}/_bluebatch/agent/join", rs.url(1)))
        .json(&json!({"token": token, "host": agents::report("h1", 1)}))
        .timeout(T)
        .send()
        .await
        .unwrap();
    let j = respond(j).await;
    assert_eq!(
        j.status,
        403,
        "a revoked token joined through B: {}",
        text(&j)
    );
    let l = b.control("GET", "/join-tokens").send_within(T).await;
    assert!(!text(&l).contains(&id), "B still lists it: {}", text(&l));

    // A host polling B, revoked through A.
    let (_dir, mut agent) = rs.agent(1, 1, 1, "32600-32649").await;
    add_steady_pool(a, "p", 1, b).await;
    let hs = hosts(b).await;
    let host = hs[0]["id"].as_str().unwrap().to_string();
    let r = a
        .control("POST", &format!("/hosts/{host}/revoke"))
        .send_within(T)
        .await;
    assert_eq!(r.status, 200, "{}", text(&r));
    within(T, "the revoked host's node gone on both replicas", async {
        loop {
            let na = a.req("GET", "/pools/p/nodes").send_within(T).await;
            let nb = b.req("GET", "/pools/p/nodes").send_within(T).await;
            let empty = |r: &Resp| r.json()["value"].as_array().is_some_and(|v| v.is_empty());
            if empty(&na) && empty(&nb) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    // The agent's poll on B is refused from now on: it stops or says so within a few seconds.
    within(
        Duration::from_secs(15),
        "the agent to learn it is revoked",
        async {
            loop {
                if agent.child.try_wait().unwrap().is_some() {
                    return;
                }
                let log = agent.log_text().to_lowercase();
                if log.contains("revoked") || log.contains("403") || log.contains("refused") {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        },
    )
    .await;
    agent.kill();
}

/// A Windows pool on simulated agents through two replicas: steady on both, a user added on B,
/// its remote login settings the same on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_windows_pool_on_simulated_agents_across_replicas() {
    let Some(rs) = Replicas::start(2) else { return };
    let (a, b) = (rs.at(0), rs.at(1));
    let (_dir, _agent) = rs.agent(0, 0, 1, "32650-32699").await;
    let r = b.create_pool("win", "windows", 1).await;
    assert_eq!(r.status, 201, "{}", text(&r));
    let node = steady_nodes(a, "win", 1, Duration::from_secs(30))
        .await
        .remove(0);
    let r = b
        .req("POST", &format!("/pools/win/nodes/{node}/users"))
        .json(&json!({"name": "wuser", "password": "Windows-pw1"}))
        .send_within(T)
        .await;
    assert_eq!(r.status, 201, "{}", text(&r));
    let la = a
        .req(
            "GET",
            &format!("/pools/win/nodes/{node}/remoteloginsettings"),
        )
        .send_within(T)
        .await;
    let lb = b
        .req(
            "GET",
            &format!("/pools/win/nodes/{node}/remoteloginsettings"),
        )
        .send_within(T)
        .await;
    assert_eq!(la.status, lb.status, "{} / {}", text(&la), text(&lb));
    assert_eq!(la.json(), lb.json());
    let p = a.req("GET", "/pools/win").send_within(T).await;
    assert_eq!(
        p.json()["virtualMachineConfiguration"]["nodeAgentSKUId"],
        "batch.node.windows amd64"
    );
}

/// A replica frozen (SIGSTOP) while the other writes and the change log is pruned past it reads
/// the snapshot when it resumes: every write there, deletes included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_behind_a_pruned_change_log_reads_the_snapshot() {
    let Some(rs) = Replicas::start(2) else { return };
    let (a, b) = (rs.at(0), rs.at(1));
    for i in 0..3 {
        add_pool(a, &format!("old{i}"), 0).await;
    }
    let g = b.req("GET", "/pools/old0").send_within(T).await;
    assert_eq!(g.status, 200);
    let pid = rs.replicas[1].child.as_ref().unwrap().id();
    rs.db.freeze_outside_transaction(pid).await;
    let pid = pid as i32;
    let r = a.req("DELETE", "/pools/old0").send_within(T).await;
    assert_eq!(r.status, 202, "{}", text(&r));
    for i in 0..3 {
        add_pool(a, &format!("new{i}"), 0).await;
    }
    within(T, "old0 gone on A", async {
        while a.req("GET", "/pools/old0").send_within(T).await.status != 404 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    // Prune the whole log: its low mark at the head.
    rs.db
        .sql("DELETE FROM bb_changes; UPDATE bb_head SET low = rev WHERE id = 1;");
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let ids = list_across(&[b], "/pools", 100).await;
    let mut ids: Vec<_> = ids.into_iter().collect();
    ids.sort();
    assert_eq!(
        ids,
        ["new0", "new1", "new2", "old1", "old2"],
        "B after the snapshot"
    );
    // And it writes on from there.
    add_pool(b, "later", 0).await;
    let g = a.req("GET", "/pools/later").send_within(T).await;
    assert_eq!(g.status, 200, "{}", text(&g));
}

/// Clock advances taken at once by both replicas add up: none is lost to the other's cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_advances_on_both_replicas_at_once_add_up() {
    let Some(rs) = Replicas::start(2) else { return };
    let (a, b) = (rs.at(0), rs.at(1));
    for _ in 0..4 {
        let (x, y) = tokio::join!(advance_1h(a), advance_1h(b));
        assert_eq!(
            (x.status, y.status),
            (200, 200),
            "{} / {}",
            text(&x),
            text(&y)
        );
    }
    for c in [a, b] {
        let r = c.control("GET", "/clock").send_within(T).await;
        let off = r.json()["offsetSeconds"].as_f64().unwrap();
        assert!((off - 8.0 * 3600.0).abs() < 1.0, "{}: {}", c.base, text(&r));
    }
}

/// One join token sent to both replicas at once joins exactly one host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_join_token_on_two_replicas_at_once_joins_one_host() {
    let Some(rs) = Replicas::start(2) else { return };
    for round in 0..5 {
        let token = agents::token(rs.at(round % 2), None).await;
        let join = |i: usize| {
            let url = format!("{}/_bluebatch/agent/join", rs.url(i));
            let body = json!({"token": token, "host": agents::report(&format!("h{round}-{i}"), 1)});
            async move {
                let r = reqwest::Client::new()
                    .post(url)
                    .json(&body)
                    .timeout(T)
                    .send()
                    .await
                    .unwrap();
                respond(r).await
            }
        };
        let (x, y) = tokio::join!(join(0), join(1));
        let mut st = [x.status, y.status];
        st.sort();
        assert_eq!(st, [200, 403], "round {round}: {} / {}", text(&x), text(&y));
    }
    let hs = hosts(rs.at(0)).await;
    assert_eq!(hs.len(), 5, "{hs:?}");
}

/// One ETag, two conditional writes (Resize Pool with If-Match) on two replicas at once: one
/// 202, one 412 ConditionNotMet, and both replicas show the winner's target; a Delete Pool with
/// the stale ETag is refused on either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_etag_two_conditional_writes_on_two_replicas_one_wins() {
    let Some(rs) = Replicas::start(2) else { return };
    let (a, b) = (rs.at(0), rs.at(1));
    for round in 0..6u32 {
        let id = format!("p{round}");
        add_pool(a, &id, 0).await;
        let g = b.req("GET", &format!("/pools/{id}")).send_within(T).await;
        let etag = g.header("etag").unwrap().to_string();
        let (x, y) = tokio::join!(resize_if(a, &id, &etag, 1), resize_if(b, &id, &etag, 2));
        let mut st = [x.status, y.status];
        st.sort();
        assert_eq!(st, [202, 412], "round {round}: {} / {}", text(&x), text(&y));
        let loser = if x.status == 412 { &x } else { &y };
        assert_eq!(loser.code(), "ConditionNotMet", "{}", text(loser));
        let winner = if x.status == 202 { 1 } else { 2 };
        for c in [a, b] {
            let g = c.req("GET", &format!("/pools/{id}")).send_within(T).await;
            assert_eq!(g.json()["targetDedicatedNodes"], winner, "{}", text(&g));
            assert_ne!(g.header("etag"), Some(etag.as_str()));
            let d = c
                .req("DELETE", &format!("/pools/{id}"))
                .header("if-match", &etag)
                .send_within(T)
                .await;
            assert_eq!(d.status, 412, "a stale delete: {}", text(&d));
        }
    }
}

async fn resize_if(c: &Client, pool: &str, etag: &str, n: u32) -> Resp {
    c.req("POST", &format!("/pools/{pool}/resize"))
        .header("if-match", etag)
        .json(&json!({"targetDedicatedNodes": n}))
        .send_within(T)
        .await
}

async fn advance_1h(c: &Client) -> Resp {
    c.control("POST", "/clock/advance")
        .json(&json!({"by": "1h"}))
        .send_within(T)
        .await
}

fn signal(pid: u32, sig: i32) {
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// The agent polling B is frozen: an Update User through A is not answered 200 (it times out
/// with 500 OperationTimedOut within the request's `timeout`); once the agent runs again it
/// applies the stored change, and B's listing says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_is_never_acknowledged_by_a_replica_whose_agent_is_gone() {
    let Some(rs) = Replicas::start(2) else { return };
    let (a, b) = (rs.at(0), rs.at(1));
    let (_dir, agent) = rs.agent(0, 1, 1, "32700-32749").await;
    let node = add_steady_pool(a, "p", 1, b).await.remove(0);
    add_user(
        a,
        "p",
        &node,
        json!({"name": "u", "password": "First-pw-1"}),
    )
    .await;
    signal(agent.child.id(), libc::SIGSTOP);
    let t0 = Instant::now();
    let r = a
        .req("PUT", &Client::user_path("p", &node, "u"))
        .query(&format!("api-version={V}&timeout=3"))
        .json(&json!({"password": "Second-pw-2"}))
        .send_within(T)
        .await;
    signal(agent.child.id(), libc::SIGCONT);
    assert_eq!(
        (r.status, r.code().as_str()),
        (500, "OperationTimedOut"),
        "{}",
        text(&r)
    );
    assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
    within(T, "the change applied once the agent runs again", async {
        loop {
            let u = b
                .control("GET", &format!("/pools/p/nodes/{node}/users"))
                .send_within(T)
                .await;
            let v = u.json();
            if v["users"]
                .as_array()
                .and_then(|l| l.iter().find(|x| x["name"] == "u"))
                .is_some_and(|x| x["appliedOnNode"] == true)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
}

/// `bluebatch reset` (POST /_bluebatch/reset) through A while the agent polls B: every pool gone
/// on both, the host's slots free, and a new pool made through B takes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_through_one_replica_frees_the_hosts_of_the_other() {
    let Some(rs) = Replicas::start(2) else { return };
    let (a, b) = (rs.at(0), rs.at(1));
    let (_dir, _agent) = rs.agent(0, 1, 2, "32750-32799").await;
    add_steady_pool(a, "p", 2, b).await;
    let r = a.control("POST", "/reset").send_within(T).await;
    assert!(r.status == 200 || r.status == 204, "{}", text(&r));
    for c in [a, b] {
        let g = c.req("GET", "/pools/p").send_within(T).await;
        assert_eq!(g.status, 404, "{}: {}", c.base, text(&g));
    }
    add_steady_pool(b, "q", 2, a).await;
    for c in [a, b] {
        let hs = hosts(c).await;
        let n = hs[0]["nodes"].as_array().cloned().unwrap_or_default();
        assert_eq!(n.len(), 2, "{}: {hs:?}", c.base);
        assert!(n.iter().all(|x| x["poolId"] == "q"), "{hs:?}");
    }
}

/// The holder of `background` frozen (SIGSTOP, a long GC-like pause) in the middle of an
/// allocation: B takes the lease over and finishes; when A runs again the pool has exactly its
/// target of nodes (no step done twice, no extra node), on both replicas, and A gives up the
/// lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_background_holder_coming_back_does_no_step_twice() {
    let Some(db) = TestDb::create() else { return };
    let dir = tempfile::tempdir().unwrap();
    let a = Replica::start(
        &db.url,
        &dir.path().join("a"),
        &["--replica-id", "replica-a", "--node-step-ms", "400"],
    );
    assert_eq!(db.wait_lease("background", None, T).await, "replica-a");
    let b = Replica::start(
        &db.url,
        &dir.path().join("b"),
        &["--replica-id", "replica-b", "--node-step-ms", "400"],
    );
    let (ca, cb) = (a.client(), b.client());
    let _agent = SimAgent::join(&cb, &b.url, &dir.path().join("agent"), 6, "32800-32849").await;
    add_pool(&ca, "p", 3).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = a.child.as_ref().unwrap().id();
    signal(pid, libc::SIGSTOP);
    let next = db
        .wait_lease("background", Some("replica-a"), Duration::from_secs(10))
        .await;
    assert_eq!(next, "replica-b");
    // B finishes the allocation while A sleeps, and takes a resize.
    steady_nodes(&cb, "p", 3, Duration::from_secs(40)).await;
    let r = cb
        .req("POST", "/pools/p/resize")
        .json(&json!({"targetDedicatedNodes": 4}))
        .send_within(T)
        .await;
    assert_eq!(r.status, 202, "{}", text(&r));
    signal(pid, libc::SIGCONT);
    let nb = steady_nodes(&cb, "p", 4, Duration::from_secs(40)).await;
    // A few more steps' worth of time: A must not add or move anything.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let na = steady_nodes(&ca, "p", 4, T).await;
    let (mut na, mut nb) = (na, nb);
    na.sort();
    nb.sort();
    assert_eq!(na, nb);
    let hs = hosts(&ca).await;
    let used: usize = hs
        .iter()
        .map(|h| h["nodes"].as_array().map_or(0, |n| n.len()))
        .sum();
    assert_eq!(used, 4, "slots used: {hs:?}");
    assert_eq!(db.lease_holder("background").as_deref(), Some("replica-b"));
}

/// `BLUEBATCH_STORE`, `postgresql://` and a URL without a user (PGUSER) start a replica; the
/// database down at start is exit status 1; a database two schema versions ahead is refused
/// naming both versions, one ahead is accepted; `--store-connections` bounds this replica's
/// connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_settings_schema_versions_and_connections() {
    let Some(db) = TestDb::create() else { return };
    let dir = tempfile::tempdir().unwrap();
    // BLUEBATCH_STORE, with postgresql:// and the user from PGUSER.
    let (scheme_rest, user) = {
        let (_, rest) = db.url.split_once("://").unwrap();
        let (userinfo, hostpart) = rest.split_once('@').expect("a user in BLUEBATCH_TEST_PG");
        (hostpart.to_string(), userinfo.to_string())
    };
    let no_user = format!("postgresql://{scheme_rest}");
    let data = dir.path().join("env");
    let (srv, lines, _) = serve_banner(
        &["--nodes", "agents", "--data-dir", data.to_str().unwrap()],
        &[
            ("BLUEBATCH_STORE", no_user.as_str()),
            ("PGUSER", user.as_str()),
        ],
    );
    let store = lines.iter().find(|l| l.starts_with("store: ")).unwrap();
    assert!(
        store.contains(&db.name) && store.contains("postgres"),
        "{store}"
    );
    let r = ready(&url_of(&lines)).await.expect("ready");
    assert_eq!(r.status, 200, "{}", text(&r));
    drop(srv);

    // Down at start: exit 1, naming the address.
    let port = free_port();
    let down = format!("postgres://postgres@127.0.0.1:{port}/nothing");
    let (code, err) = serve_exits(&["--store", &down, "--nodes", "agents"], &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("127.0.0.1:{port}")) || err.contains(&port.to_string()),
        "{err}"
    );

    // Schema one ahead: accepted; two ahead: refused naming both versions.
    let v: i32 = db
        .sql("SELECT version FROM bb_schema WHERE id = 1")
        .trim()
        .parse()
        .unwrap();
    db.sql(&format!(
        "UPDATE bb_schema SET version = {} WHERE id = 1",
        v + 1
    ));
    let data = dir.path().join("one-ahead");
    let (srv, _, _) = serve_banner(
        &[
            "--store",
            &db.url,
            "--nodes",
            "agents",
            "--data-dir",
            data.to_str().unwrap(),
        ],
        &[],
    );
    drop(srv);
    db.sql(&format!(
        "UPDATE bb_schema SET version = {} WHERE id = 1",
        v + 2
    ));
    let (code, err) = serve_exits(&["--store", &db.url, "--nodes", "agents"], &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("version {}", v + 2)) && err.contains(&format!("({v})")),
        "{err}"
    );
    db.sql(&format!("UPDATE bb_schema SET version = {v} WHERE id = 1"));

    // --store-connections 2: under 16 concurrent requests the replica holds at most 2 (and its
    // LISTEN connection).
    let rep = Replica::start(
        &db.url,
        &dir.path().join("conns"),
        &["--store-connections", "2", "--replica-id", "conns"],
    );
    let c = rep.client();
    let mut max = 0usize;
    for round in 0..4 {
        let mut handles = Vec::new();
        for i in 0..8 {
            let url = rep.url.clone();
            handles.push(tokio::spawn(async move {
                let c = Client::new(&url, ACCOUNT, KEY);
                let id = format!("c{round}x{i}");
                c.req("POST", "/pools")
                    .json(&pool_body(&id, 0))
                    .send_within(T)
                    .await
                    .status
            }));
        }
        let n: usize = db
            .sql(&format!(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' AND pid <> pg_backend_pid()",
                db.name
            ))
            .trim()
            .parse()
            .unwrap();
        max = max.max(n);
        for h in handles {
            assert_eq!(h.await.unwrap(), 201);
        }
    }
    let r = c.req("GET", "/pools").send_within(T).await;
    assert_eq!(r.json()["value"].as_array().unwrap().len(), 32);
    assert!(
        max <= 3,
        "{max} connections of a replica with --store-connections 2"
    );
}

/// The liveness sweep across replicas: the agent polling B is killed; with `--agent-grace 2s`
/// its node goes `unknown` on both replicas, and back to `idle` on both once the agent, started
/// again with its identity, polls A.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_host_goes_unknown_on_every_replica_and_comes_back() {
    let Some(rs) = Replicas::start_with(2, &["--agent-grace", "2s"]) else {
        return;
    };
    let (a, b) = (rs.at(0), rs.at(1));
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("agent");
    let mut agent = SimAgent::join(a, rs.url(1), &state, 1, "32850-32899").await;
    let node = add_steady_pool(a, "p", 1, b).await.remove(0);
    agent.kill();
    let t0 = Instant::now();
    within(Duration::from_secs(40), "unknown on both", async {
        loop {
            let sa = a
                .req("GET", &format!("/pools/p/nodes/{node}"))
                .send_within(T)
                .await;
            let sb = b
                .req("GET", &format!("/pools/p/nodes/{node}"))
                .send_within(T)
                .await;
            if sa.json()["state"] == "unknown" && sb.json()["state"] == "unknown" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    eprintln!("unknown on both {:?} after the agent died", t0.elapsed());
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    let _back = SimAgent::resume(rs.url(0), &state, 1, "32850-32899");
    steady_nodes(a, "p", 1, Duration::from_secs(20)).await;
    steady_nodes(b, "p", 1, T).await;
}

/// The SQL the PostgreSQL store sends avoids what CockroachDB and YugabyteDB do not run alike:
/// advisory locks, LOCK TABLE, sequences (nextval, SERIAL, identity columns).
#[test]
fn the_store_sql_avoids_advisory_locks_lock_table_and_sequences() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../pgstore/src");
    let mut seen = 0;
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "rs") {
            // The code, not its comments (which name what is avoided).
            let t: String = std::fs::read_to_string(&p)
                .unwrap()
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n")
                .to_uppercase();
            seen += 1;
            for bad in [
                "PG_ADVISORY",
                "PG_TRY_ADVISORY",
                "LOCK TABLE",
                "NEXTVAL(",
                "CREATE SEQUENCE",
                " SERIAL",
                "BIGSERIAL",
                "GENERATED ALWAYS AS IDENTITY",
                "GENERATED BY DEFAULT AS IDENTITY",
            ] {
                assert!(!t.contains(bad), "{} uses {bad}", p.display());
            }
        }
    }
    assert!(seen > 0, "no source in {}", src.display());
}

/// Pool ids are case-insensitive across replicas: `Race{n}` on A and `race{n}` on B at once →
/// one 201, one 409 `PoolExists`, and both replicas list one pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_pool_id_in_two_cases_on_two_replicas_is_created_once() {
    let Some(rs) = Replicas::start(2) else { return };
    let (a, b) = (rs.at(0), rs.at(1));
    for n in 0..8 {
        let (x, y) = tokio::join!(
            a.req("POST", "/pools")
                .json(&pool_body(&format!("Race{n}"), 0))
                .send_within(T),
            b.req("POST", "/pools")
                .json(&pool_body(&format!("race{n}"), 0))
                .send_within(T)
        );
        let mut st = [x.status, y.status];
        st.sort();
        assert_eq!(st, [201, 409], "round {n}: {} / {}", text(&x), text(&y));
        let loser = if x.status == 409 { &x } else { &y };
        assert_eq!(loser.code(), "PoolExists", "{}", text(loser));
    }
    for c in [a, b] {
        let ids = list_across(&[c], "/pools", 100).await;
        assert_eq!(ids.len(), 8, "{ids:?}");
    }
}

/// Remove Nodes through A of a node whose agent polls B, and Delete Pool through A racing Add
/// User through B: no 5xx, the pool ends as asked on both, and the host's slots are free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_nodes_and_delete_racing_add_user_across_replicas() {
    let Some(rs) = Replicas::start(2) else { return };
    let (a, b) = (rs.at(0), rs.at(1));
    let (_dir, _agent) = rs.agent(0, 1, 3, "32900-32949").await;
    let nodes = add_steady_pool(a, "p", 3, b).await;
    let r = a
        .req("POST", "/pools/p/removenodes")
        .json(&json!({"nodeList": [nodes[0]]}))
        .send_within(T)
        .await;
    assert_eq!(r.status, 202, "{}", text(&r));
    let left = steady_nodes(b, "p", 2, Duration::from_secs(30)).await;
    assert!(!left.contains(&nodes[0]), "{left:?}");
    steady_nodes(a, "p", 2, T).await;
    within(T, "the removed node's slot free on both", async {
        loop {
            let ha = hosts(a).await;
            let hb = hosts(b).await;
            let used = |h: &Vec<serde_json::Value>| h[0]["nodes"].as_array().map_or(0, |n| n.len());
            if used(&ha) == 2 && used(&hb) == 2 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    // Delete Pool on A while Add User on B.
    let (d, u) = tokio::join!(
        a.req("DELETE", "/pools/p").send_within(T),
        b.req("POST", &format!("/pools/p/nodes/{}/users", left[0]))
            .json(&json!({"name": "late", "password": "Late-pw-1"}))
            .send_within(T)
    );
    assert_eq!(d.status, 202, "{}", text(&d));
    assert!(
        [201, 404, 409].contains(&u.status),
        "Add User racing Delete Pool: {} {}",
        u.status,
        text(&u)
    );
    pool_gone_and_slots_free(a, b, "p").await;
    add_steady_pool(b, "q", 3, a).await;
}

/// `node set-state` to `unknown` through A of a node whose agent polls B stays there (as on one
/// server: "it stays there until something moves it"), and the host stays connected on both:
/// another replica must not take the node's state for the host being away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_set_unknown_through_one_replica_stays_while_its_agent_polls_the_other() {
    let Some(rs) = Replicas::start(2) else { return };
    let (a, b) = (rs.at(0), rs.at(1));
    let (_dir, _agent) = rs.agent(0, 1, 2, "32950-32999").await;
    let nodes = add_steady_pool(a, "p", 2, b).await;
    let r = a
        .control("PUT", &format!("/pools/p/nodes/{}/state", nodes[0]))
        .json(&json!({"state": "unknown"}))
        .send_within(T)
        .await;
    assert_eq!(r.status, 200, "{}", text(&r));
    // Several polls of the agent later (its long polls answer on every change).
    let other = b
        .req("POST", &format!("/pools/p/nodes/{}/users", nodes[1]))
        .json(&json!({"name": "poke", "password": "Poke-pw-1"}))
        .send_within(T)
        .await;
    assert_eq!(other.status, 201, "{}", text(&other));
    tokio::time::sleep(Duration::from_secs(2)).await;
    for c in [a, b] {
        let g = c
            .req("GET", &format!("/pools/p/nodes/{}", nodes[0]))
            .send_within(T)
            .await;
        assert_eq!(g.json()["state"], "unknown", "{}: {}", c.base, text(&g));
        let g = c
            .req("GET", &format!("/pools/p/nodes/{}", nodes[1]))
            .send_within(T)
            .await;
        assert_eq!(g.json()["state"], "idle", "{}: {}", c.base, text(&g));
        let hs = hosts(c).await;
        assert_eq!(hs[0]["connected"], true, "{}: {hs:?}", c.base);
    }
}

/// Mixed writes at once on both replicas (users added, updated and deleted on two agent nodes,
/// resizes, reboots) with the database healthy: never a 5xx (a 503 here would be a write lost to
/// the other replica's commit), and both replicas end with the same nodes and users.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_writes_on_both_replicas_never_answer_5xx() {
    let Some(rs) = Replicas::start(2) else { return };
    let (a, b) = (rs.at(0), rs.at(1));
    let (_dir, _agent) = rs.agent(0, 1, 4, "33000-33049").await;
    let nodes = add_steady_pool(a, "p", 2, b).await;
    let work = |w: usize| {
        let c = rs.at(w % 2);
        let nodes = nodes.clone();
        async move {
            let mut bad = Vec::new();
            for k in 0..12 {
                let node = &nodes[k % 2];
                let name = format!("w{w}u{}", k % 3);
                let users = format!("/pools/p/nodes/{node}/users");
                let r = match (k + w) % 6 {
                    0 | 1 => {
                        c.req("POST", &users)
                            .json(&json!({"name": name, "password": "Mixed-pw-1"}))
                            .send_within(T)
                            .await
                    }
                    2 => {
                        c.req("PUT", &format!("{users}/{name}"))
                            .json(&json!({"password": format!("Mixed-pw-{k}")}))
                            .send_within(T)
                            .await
                    }
                    3 => {
                        c.req("DELETE", &format!("{users}/{name}"))
                            .send_within(T)
                            .await
                    }
                    4 if w == 0 => {
                        c.req("POST", &format!("/pools/p/nodes/{node}/reboot"))
                            .json(&json!({}))
                            .send_within(T)
                            .await
                    }
                    _ => {
                        let id = format!("side{w}x{k}");
                        let r = c
                            .req("POST", "/pools")
                            .json(&pool_body(&id, 0))
                            .send_within(T)
                            .await;
                        if r.status == 201 {
                            c.req("DELETE", &format!("/pools/{id}"))
                                .send_within(T)
                                .await
                        } else {
                            r
                        }
                    }
                };
                if r.status >= 500 {
                    bad.push(format!("{} {}", r.status, text(&r)));
                }
            }
            bad
        }
    };
    let (x, y, z, u) = tokio::join!(work(0), work(1), work(2), work(3));
    let bad: Vec<String> = [x, y, z, u].concat();
    assert!(
        bad.is_empty(),
        "5xx answers with a healthy database: {bad:#?}"
    );
    steady_nodes(a, "p", 2, Duration::from_secs(30)).await;
    for node in &nodes {
        let path = format!("/pools/p/nodes/{node}/users");
        let ua = a.control("GET", &path).send_within(T).await;
        let ub = b.control("GET", &path).send_within(T).await;
        let names = |r: &Resp| {
            let mut v: Vec<String> = r.json()["users"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|u| u["name"].as_str().unwrap_or("").to_string())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(&ua), names(&ub), "{node}");
    }
}

/// A client that gives up while its write's commit waits in the database (a row of the pool
/// locked by another session): the commit is rolled back, and the replica must not keep the
/// write in its cache: afterwards both replicas answer the database's state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_abandoned_by_its_client_mid_commit_leaves_no_trace_in_the_cache() {
    let Some(rs) = Replicas::start(2) else { return };
    let (a, b) = (rs.at(0), rs.at(1));
    add_pool(a, "p", 0).await;
    // Another session holds the pool's row for 4 s.
    let url = rs.db.url.clone();
    let locker = std::thread::spawn(move || {
        psql(
            &url,
            "BEGIN; SELECT 1 FROM bb_pools WHERE pool_key = 'p' FOR UPDATE; SELECT pg_sleep(4); COMMIT;",
        )
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The resize's commit waits on that row; its client gives up after 1 s.
    let gave_up = a
        .req("POST", "/pools/p/resize")
        .json(&json!({"targetDedicatedNodes": 5}))
        .try_send_within(Duration::from_secs(1))
        .await;
    assert!(
        gave_up.is_err(),
        "answered while the row was locked: {:?}",
        gave_up.map(|r| r.status)
    );
    locker.join().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let in_db = rs
        .db
        .sql("SELECT doc->>'target_dedicated' FROM bb_pools WHERE pool_key = 'p'");
    for c in [a, b] {
        let g = c.req("GET", "/pools/p").send_within(T).await;
        assert_eq!(
            g.json()["targetDedicatedNodes"].to_string(),
            in_db,
            "{}: the cache and the database disagree: {}",
            c.base,
            text(&g)
        );
    }
}

/// An account seeded by a new replica while B was frozen and the change log was pruned past B:
/// B reads the snapshot when it resumes, and serves the new account too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_added_while_a_replica_was_behind_the_log_is_served_after_its_reload() {
    let Some(mut rs) = Replicas::start(2) else {
        return;
    };
    let key = "YW4gYWNjb3VudCBhZGRlZCB3aGlsZSBhIHJlcGxpY2Egd2FzIGJlaGluZA==";
    let pid = rs.replicas[1].child.as_ref().unwrap().id();
    rs.db.freeze_outside_transaction(pid).await;
    let file = rs.dir.path().join("accounts.json");
    std::fs::write(
        &file,
        json!({"accounts": [{"name": "lateaccount", "keys": [key]}]}).to_string(),
    )
    .unwrap();
    rs.extra = vec!["--accounts-file".into(), file.to_str().unwrap().into()];
    let third = rs.add();
    let c = Client::new(rs.url(third), "lateaccount", key);
    let r = c.req("GET", "/pools").send_within(T).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    rs.db
        .sql("DELETE FROM bb_changes; UPDATE bb_head SET low = rev WHERE id = 1;");
    signal(pid, libc::SIGCONT);
    let c = Client::new(rs.url(1), "lateaccount", key);
    within(T, "B to serve the account after its reload", async {
        loop {
            let r = c.req("GET", "/pools").send_within(T).await;
            if r.status == 200 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
}

/// `--store-connections 2` (the least; 1 is refused at start): writes, reads and an agent's
/// polls at once still all answer (a write holding a connection for the write lock must not
/// leave reads without one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_store_connection_serves_writes_reads_and_polls_at_once() {
    let Some(rs) = Replicas::start_with(1, &["--store-connections", "2"]) else {
        return;
    };
    let (code, err) = serve_exits(
        &[
            "--store",
            &rs.db.url,
            "--nodes",
            "agents",
            "--store-connections",
            "1",
        ],
        &[],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--store-connections"), "{err}");
    let a = rs.at(0);
    let (_dir, _agent) = rs.agent(0, 0, 2, "33050-33099").await;
    let nodes = add_steady_pool(a, "p", 2, a).await;
    let writer = async {
        for k in 0..10 {
            let r = a
                .req("POST", &format!("/pools/p/nodes/{}/users", nodes[k % 2]))
                .json(&json!({"name": format!("one{k}"), "password": "One-pw-1"}))
                .send_within(T)
                .await;
            assert_eq!(r.status, 201, "{}", text(&r));
        }
    };
    let reader = async {
        for _ in 0..30 {
            let r = a.req("GET", "/pools/p/nodes").send_within(T).await;
            assert_eq!(r.status, 200, "{}", text(&r));
        }
    };
    let creator = async {
        for k in 0..10 {
            add_pool(a, &format!("e{k}"), 0).await;
        }
    };
    within(Duration::from_secs(60), "two connections' load", async {
        tokio::join!(writer, reader, creator)
    })
    .await;
}

/// A host drained through A takes no new pool made through B (the pool waits, `resizing`), its
/// current nodes stay; the token it joined with is listed used on both replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_drained_through_one_replica_takes_no_pool_made_through_the_other() {
    let Some(rs) = Replicas::start(2) else { return };
    let (a, b) = (rs.at(0), rs.at(1));
    let (_dir, _agent) = rs.agent(0, 1, 3, "33100-33149").await;
    add_steady_pool(a, "p", 1, b).await;
    for c in [a, b] {
        let l = c.control("GET", "/join-tokens").send_within(T).await;
        let v = l.json()["value"].as_array().cloned().unwrap_or_default();
        assert!(
            v.len() == 1 && v[0]["used"] == true,
            "{}: {}",
            c.base,
            text(&l)
        );
    }
    let host = hosts(b).await[0]["id"].as_str().unwrap().to_string();
    let r = a
        .control("POST", &format!("/hosts/{host}/drain"))
        .send_within(T)
        .await;
    assert_eq!(r.status, 200, "{}", text(&r));
    add_pool(b, "q", 1).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for c in [a, b] {
        let q = c.req("GET", "/pools/q/nodes").send_within(T).await;
        assert_eq!(
            q.json()["value"].as_array().map(|v| v.len()),
            Some(0),
            "{}: a drained host took a new pool: {}",
            c.base,
            text(&q)
        );
        let hs = hosts(c).await;
        assert_eq!(hs[0]["drained"], true, "{hs:?}");
        let p = c.req("GET", "/pools/p/nodes").send_within(T).await;
        assert_eq!(p.json()["value"].as_array().map(|v| v.len()), Some(1));
    }
}

/// With HTTPS, replicas given the same `--tls-cert` (the chain up to its CA) and `--tls-key`
/// hand out one CA fingerprint: a token made through A (its fingerprint) joins an agent over
/// HTTPS to B, whose nodes fill a pool made through A.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_with_one_certificate_take_agents_pinned_through_any_of_them() {
    let Some(db) = TestDb::create() else { return };
    let dir = tempfile::tempdir().unwrap();
    // Material: what a --tls replica generates (a CA and a certificate for 127.0.0.1).
    let gen_dir = dir.path().join("gen");
    let gport = free_port().to_string();
    let mut r#gen = Replica::start(&db.url, &gen_dir, &["--tls", "--tls-port", &gport]);
    r#gen.kill();
    let tls = gen_dir.join("tls");
    let chain = dir.path().join("chain.pem");
    let mut pem = std::fs::read_to_string(tls.join("cert.pem")).unwrap();
    pem.push_str(&std::fs::read_to_string(tls.join("ca.pem")).unwrap());
    std::fs::write(&chain, pem).unwrap();
    let key = tls.join("key.pem");
    let (pa, pb) = (free_port().to_string(), free_port().to_string());
    let flags = |p: &str| {
        vec![
            "--tls-cert".to_string(),
            chain.to_str().unwrap().to_string(),
            "--tls-key".to_string(),
            key.to_str().unwrap().to_string(),
            "--tls-port".to_string(),
            p.to_string(),
        ]
    };
    let fa = flags(&pa);
    let fb = flags(&pb);
    let a = Replica::start(
        &db.url,
        &dir.path().join("a"),
        &fa.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let b = Replica::start(
        &db.url,
        &dir.path().join("b"),
        &fb.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let (ca, cb) = (a.client(), b.client());
    let ta = agents::create_token(&ca, json!({})).await;
    assert_eq!(ta.status, 200, "{}", text(&ta));
    let fp = ta.json()["caFingerprint"]
        .as_str()
        .expect("a fingerprint with HTTPS")
        .to_string();
    let tb = agents::create_token(&cb, json!({})).await;
    assert_eq!(
        tb.json()["caFingerprint"],
        fp.as_str(),
        "one fingerprint on every replica"
    );
    let token = ta.json()["token"].as_str().unwrap().to_string();
    let url_b = format!("https://127.0.0.1:{pb}");
    let state = dir.path().join("agent");
    let mut c = Command::new(env!("CARGO_BIN_EXE_bluebatch"));
    c.args([
        "agent",
        "--server",
        &url_b,
        "--simulate",
        "1",
        "--ssh-ports",
        "33150-33199",
    ])
    .arg("--state-dir")
    .arg(&state)
    .env("BLUEBATCH_LOG", "warn")
    .env("BLUEBATCH_JOIN_TOKEN", format!("{token}\n{fp}\n"))
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let _log = agents::agent_log(&mut child);
    let _agent = KillOnDrop(child);
    add_steady_pool(&ca, "p", 1, &ca).await;
    steady_nodes(&cb, "p", 1, T).await;
}
