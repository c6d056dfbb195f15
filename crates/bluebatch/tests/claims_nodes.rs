//! README claims about node accounts and the `bluebatch ssh` client, against the real binary and
//! the real OpenSSH client: "a user's home stays after the user is deleted, until the node is
//! reimaged or removed" (Differences, Node accounts); the home is
//! `<data-dir>/nodes/<account>.<pool>.<node>/home/<user>`, created at the first login, mode
//! 0700; `bluebatch ssh` does not check host keys unless `--strict-host-keys`.

mod common;

use common::{
    ACCOUNT, Client, Server, have_ssh_client, loopback_source, ssh_password_outcome, within,
};
use serde_json::json;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

const T: Duration = Duration::from_secs(10);

async fn add_user(c: &Client, pool: &str, node: &str, name: &str, pw: &str) {
    let r = c
        .req("POST", &format!("/pools/{pool}/nodes/{node}/users"))
        .json(&json!({"name": name, "password": pw}))
        .send_within(T)
        .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
}

async fn wait_idle(c: &Client, pool: &str, node: &str) {
    within(Duration::from_secs(20), "the node to be idle", async {
        loop {
            let v = c
                .req("GET", &format!("/pools/{pool}/nodes/{node}"))
                .send_within(T)
                .await
                .json();
            if v["state"] == "idle" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

fn home(data: &Path, pool: &str, node: &str, user: &str) -> PathBuf {
    data.join("nodes")
        .join(format!("{ACCOUNT}.{pool}.{node}"))
        .join("home")
        .join(user)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_home_stays_after_its_user_is_deleted_until_reimage_or_removal() {
    assert!(have_ssh_client(), "needs the OpenSSH client and sshpass");
    within(Duration::from_secs(120), "the test", async {
        let dir = tempfile::tempdir().unwrap();
        let data = std::fs::canonicalize(dir.path()).unwrap().join("data");
        let srv = Server::launch(&["--data-dir", data.to_str().unwrap()]);
        let c = srv.client();
        let nodes = c.ready_pool("p", "linux", 2).await;
        let (a, b) = (&nodes[0], &nodes[1]);
        let mut src = 7500;
        for n in [a, b] {
            add_user(&c, "p", n, "alice", "Alice-pw-1").await;
            let h = home(&data, "p", n, "alice");
            assert!(
                !h.exists(),
                "the home is created at the first login, not before"
            );
            let port = c.ssh_port("p", n).await;
            src += 1;
            let o = ssh_password_outcome(
                port,
                "alice",
                "Alice-pw-1",
                &loopback_source(src),
                "echo kept > notes.txt && pwd",
            )
            .await;
            assert_eq!(
                o.stdout("writing in the home").trim(),
                h.to_str().unwrap(),
                "$HOME is <data-dir>/nodes/<account>.<pool>.<node>/home/<user>"
            );
            let mode = std::fs::metadata(&h).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", h.display());
            let r = c
                .req("DELETE", &Client::user_path("p", n, "alice"))
                .send_within(T)
                .await;
            assert_eq!(r.status, 200);
            assert_eq!(
                std::fs::read_to_string(h.join("notes.txt")).unwrap(),
                "kept\n",
                "the home stays after Delete User"
            );
        }

        // Reimage: the home goes.
        let r = c
            .req("POST", &format!("/pools/p/nodes/{a}/reimage"))
            .send_within(T)
            .await;
        assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
        wait_idle(&c, "p", a).await;
        assert!(
            !home(&data, "p", a, "alice").exists(),
            "the home is gone after a reimage"
        );
        // Remove Nodes: the node's directory goes with it.
        assert!(home(&data, "p", b, "alice").exists());
        let r = c
            .req("POST", "/pools/p/removenodes")
            .json(&json!({"nodeList": [b]}))
            .send_within(T)
            .await;
        assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
        within(Duration::from_secs(20), "the node's files to go", async {
            while home(&data, "p", b, "alice").exists() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
    })
    .await;
}

/// "`bluebatch ssh` does not check host keys by default (`StrictHostKeyChecking=no`,
/// `UserKnownHostsFile=/dev/null`) …; `--strict-host-keys` turns checking on."
#[tokio::test]
async fn bluebatch_ssh_checks_host_keys_only_with_strict_host_keys() {
    within(Duration::from_secs(60), "the test", async {
        let srv = Server::launch(&["--in-memory"]);
        let c = srv.client();
        let nodes = c.ready_pool("p", "linux", 1).await;
        let run = async |extra: &[&str]| {
            let mut args = vec!["ssh", "p", nodes[0].as_str(), "alice", "--print"];
            args.extend_from_slice(extra);
            args.extend_from_slice(&["--url", srv.url.as_str()]);
            let out = common::bluebatch_cli(&args, &[]).await;
            assert!(out.status.success(), "{out:?}");
            String::from_utf8(out.stdout).unwrap()
        };
        let plain = run(&[]).await;
        assert!(
            plain.contains("StrictHostKeyChecking=no")
                && plain.contains("UserKnownHostsFile=/dev/null"),
            "{plain}"
        );
        let strict = run(&["--strict-host-keys"]).await;
        assert!(
            !strict.contains("StrictHostKeyChecking=no") && !strict.contains("UserKnownHostsFile"),
            "{strict}"
        );
        assert!(
            strict.contains(" -p ") && strict.contains("alice@"),
            "{strict}"
        );
    })
    .await;
}

/// The numbers named in /etc/passwd (users) and /etc/group (groups).
fn host_ids(file: &str) -> Vec<u32> {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .filter_map(|l| l.split(':').nth(2)?.parse().ok())
        .collect()
}

/// `--session-uids A-B`: "when bluebatch runs as root: a uid for each user of each node and a
/// gid for each node … numbers the host already uses are skipped". The range starts at the
/// host's `nobody` (65534, also `nogroup`): no session runs as a uid or gid the host names.
#[tokio::test(flavor = "multi_thread")]
async fn session_uids_skip_numbers_the_host_already_uses() {
    assert!(have_ssh_client(), "needs the OpenSSH client and sshpass");
    let is_root = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    assert!(
        is_root,
        "--session-uids applies only when bluebatch runs as root"
    );
    let (users, groups) = (host_ids("/etc/passwd"), host_ids("/etc/group"));
    assert!(
        users.contains(&65534) && groups.contains(&65534),
        "the host has nobody/nogroup"
    );
    within(Duration::from_secs(90), "the test", async {
        let dir = tempfile::tempdir().unwrap();
        let data = std::fs::canonicalize(dir.path()).unwrap().join("data");
        let srv = Server::launch(&[
            "--data-dir",
            data.to_str().unwrap(),
            "--session-uids",
            "65534-65600",
            "--admin-gid",
            "2000000000",
        ]);
        let c = srv.client();
        let nodes = c.ready_pool("p", "linux", 2).await;
        let mut seen = Vec::new();
        let mut src = 7600;
        for n in &nodes {
            let port = c.ssh_port("p", n).await;
            for user in ["alice", "bob"] {
                add_user(&c, "p", n, user, "User-pw-1").await;
                src += 1;
                let o = ssh_password_outcome(
                    port,
                    user,
                    "User-pw-1",
                    &loopback_source(src),
                    "id -u; id -g",
                )
                .await;
                let out = o.stdout("id").to_string();
                let ids: Vec<u32> = out.lines().map(|l| l.trim().parse().unwrap()).collect();
                let (uid, gid) = (ids[0], ids[1]);
                assert!(
                    (65534..=65600).contains(&uid),
                    "uid {uid} outside the range"
                );
                assert!(!users.contains(&uid), "uid {uid} is a host user's");
                assert!(!groups.contains(&gid), "gid {gid} is a host group's");
                seen.push((n.clone(), user, uid, gid));
            }
        }
        let mut uids: Vec<u32> = seen.iter().map(|s| s.2).collect();
        uids.sort();
        uids.dedup();
        assert_eq!(uids.len(), 4, "a uid for each user of each node: {seen:?}");
        assert_eq!(seen[0].3, seen[1].3, "one gid per node: {seen:?}");
        assert_ne!(seen[0].3, seen[2].3, "one gid per node: {seen:?}");
    })
    .await;
}
