//! The service clock is durable: `bluebatch clock advance 5d` survives a restart (SIGTERM and
//! SIGKILL), so a user whose expiry the offset passed stays unable to log in over real SSH; and
//! `bluebatch clock reset` is durable too.

mod common;

use common::{Client, Server, have_ssh_client, loopback_source, ssh_password_login};
use serde_json::json;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs the `bluebatch` CLI (at most 30 s); (exit code, stdout, stderr).
fn cli(args: &[&str]) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bluebatch"))
        .args(args)
        .env_remove("BLUEBATCH_KEY")
        .env_remove("BLUEBATCH_ACCOUNT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("bluebatch {args:?} did not finish within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn offset_seconds(c: &Client) -> i64 {
    let r = c.control("GET", "/clock").send().await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    r.json()["offsetSeconds"].as_i64().unwrap()
}

async fn login(c: &Client, node: &str, n: u32) -> bool {
    let port = c.ssh_port("p", node).await;
    ssh_password_login(port, "alice", "Alice-pw-1", &loopback_source(n)).await
}

fn restart(s: &mut Server, dir: &Path, kill: bool) -> Server {
    if kill {
        s.kill();
    } else {
        s.stop();
    }
    Server::start_in(dir)
}

#[tokio::test(flavor = "multi_thread")]
async fn clock_offset_survives_restarts_and_keeps_expired_users_out() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut s = Server::start_in(&dir);
    let c = s.client();
    let nodes = c.ready_pool("p", "linux", 1).await;
    let node = nodes[0].clone();
    // Expires two days from now: five days on, it has expired.
    let expiry = time::OffsetDateTime::now_utc() + time::Duration::days(2);
    let r = c
        .req("POST", &format!("/pools/p/nodes/{node}/users"))
        .json(&json!({"name": "alice", "password": "Alice-pw-1",
                      "expiryTime": bluebatch_core::timefmt::iso(expiry)}))
        .send()
        .await;
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
    let ssh = have_ssh_client();
    if ssh {
        assert!(login(&c, &node, 1).await, "alice logs in before expiry");
    }

    // The control answers after the offset is durable.
    let (code, out, err) = cli(&["clock", "advance", "5d", "--url", &s.url]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"offsetSeconds\": 432000"), "{out}");
    if ssh {
        assert!(!login(&c, &node, 2).await, "expired by the offset");
    }

    for (i, kill) in [false, true].into_iter().enumerate() {
        s = restart(&mut s, &dir, kill);
        let c = s.client();
        assert_eq!(
            offset_seconds(&c).await,
            432_000,
            "offset after a restart by {}",
            if kill { "SIGKILL" } else { "SIGTERM" }
        );
        let (code, out, err) = cli(&["--url", &s.url, "clock", "show"]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("\"offsetSeconds\": 432000"), "{out}");
        if ssh {
            assert!(
                !login(&c, &node, 10 + i as u32).await,
                "alice stays expired after the restart"
            );
        }
    }

    // Reset is durable too: back to the wall clock, alice's expiry is ahead again.
    let (code, out, err) = cli(&["clock", "reset", "--url", &s.url]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"offsetSeconds\": 0"), "{out}");
    s = restart(&mut s, &dir, true);
    let c = s.client();
    assert_eq!(offset_seconds(&c).await, 0, "reset survives SIGKILL");
    if ssh {
        assert!(
            login(&c, &node, 20).await,
            "alice logs in again after reset"
        );
    }
    s.stop();
}

#[tokio::test]
async fn clock_reset_answers_and_advance_accumulates() {
    let s = Server::start();
    let c = s.client();
    for by in ["1d", "12h"] {
        let r = c
            .control("POST", "/clock/advance")
            .json(&json!({ "by": by }))
            .send()
            .await;
        assert_eq!(r.status, 200);
    }
    assert_eq!(offset_seconds(&c).await, 36 * 3600);
    let r = c.control("POST", "/clock/reset").send().await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["offsetSeconds"], 0);
    // At the limit (about 292 years) the offset stays there rather than wrapping back.
    for _ in 0..2 {
        let r = c
            .control("POST", "/clock/advance")
            .json(&json!({ "by": "1000000w" }))
            .send()
            .await;
        assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    }
    assert_eq!(offset_seconds(&c).await, i64::MAX / 1_000_000_000);
    let r = c.control("POST", "/clock/reset").send().await;
    assert_eq!(r.status, 200);
    let r = c.control("GET", "/clock/reset").send().await;
    assert_eq!(r.status, 405);
    assert_eq!(r.code(), "UnsupportedHttpVerb");
}
