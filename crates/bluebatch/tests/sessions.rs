//! Node sessions through the whole server and the real OpenSSH client: each user's own absolute
//! home, each node's own uid, isAdmin as a bare supplementary gid, no way into another node's
//! files or the service's secrets, and the host's /etc untouched.

mod common;

use common::{Client, Server, keypair};
use serde_json::json;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// Every ssh run is bounded by this.
const SSH_DEADLINE: Duration = Duration::from_secs(30);

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `cmd` on the node as `user` with the key; a hang fails the test.
async fn run(port: u16, user: &str, key: &Path, cmd: &str) -> Out {
    let mut ssh = tokio::process::Command::new("ssh");
    ssh.args(["-F", "/dev/null", "-p", &port.to_string()])
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
        ])
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "LogLevel=ERROR",
        ])
        .args(["-o", "ConnectTimeout=10", "-i"])
        .arg(key)
        .arg(format!("{user}@127.0.0.1"))
        .arg(cmd)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(SSH_DEADLINE, ssh.output())
        .await
        .expect("ssh did not finish in time")
        .expect("running ssh");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn add_user(c: &Client, pool: &str, node: &str, name: &str, admin: bool, public: &str) {
    let r = c
        .req("POST", &format!("/pools/{pool}/nodes/{node}/users"))
        .json(&json!({"name": name, "isAdmin": admin, "sshPublicKey": public}))
        .send()
        .await;
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
}

/// /etc/passwd and /etc/group, to show nothing changed them.
fn etc_accounts() -> (Vec<u8>, Vec<u8>) {
    (
        std::fs::read("/etc/passwd").unwrap_or_default(),
        std::fs::read("/etc/group").unwrap_or_default(),
    )
}

/// (uid, supplementary gids, $HOME) of a session.
async fn identity(port: u16, user: &str, key: &Path) -> (String, Vec<String>, String) {
    let out = run(port, user, key, "id -u; id -G; echo \"$HOME\"").await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{:?}", out.stdout);
    (
        lines[0].to_string(),
        lines[1].split(' ').map(str::to_string).collect(),
        lines[2].to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_have_own_homes_and_uids_and_cannot_reach_other_nodes_or_secrets() {
    let etc_before = etc_accounts();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut srv = Server::start_in(&data);
    let c = srv.client();
    let nodes = c.ready_pool("p", "linux", 2).await;
    let (key, public) = keypair(dir.path(), "k");
    add_user(&c, "p", &nodes[0], "alice", true, &public).await;
    add_user(&c, "p", &nodes[0], "bob", false, &public).await;
    add_user(&c, "p", &nodes[1], "carol", false, &public).await;
    let port0 = c.ssh_port("p", &nodes[0]).await;
    let port1 = c.ssh_port("p", &nodes[1]).await;

    let (alice_uid, alice_groups, alice_home) = identity(port0, "alice", &key).await;
    let (bob_uid, bob_groups, bob_home) = identity(port0, "bob", &key).await;
    let (carol_uid, carol_groups, carol_home) = identity(port1, "carol", &key).await;

    // $HOME is absolute, one per user, under the data directory's nodes, and is where the
    // session starts.
    let data_real = std::fs::canonicalize(&data).unwrap();
    for (user, home) in [
        ("alice", &alice_home),
        ("bob", &bob_home),
        ("carol", &carol_home),
    ] {
        assert!(
            home.starts_with('/'),
            "{user}: HOME {home:?} is not absolute"
        );
        assert!(home.ends_with(&format!("/home/{user}")), "{home}");
        let real = std::fs::canonicalize(home).unwrap();
        assert!(real.starts_with(data_real.join("nodes")), "{home}");
        let pwd = run(
            if user == "carol" { port1 } else { port0 },
            user,
            &key,
            "pwd",
        )
        .await;
        assert_eq!(pwd.stdout.trim(), home.as_str());
    }
    assert_ne!(alice_home, bob_home);

    // The environment holds only what a login gives.
    let env = run(port0, "bob", &key, "env").await;
    for line in env.stdout.lines() {
        let name = line.split('=').next().unwrap();
        assert!(
            [
                "HOME", "USER", "LOGNAME", "SHELL", "PATH", "PWD", "SHLVL", "_"
            ]
            .contains(&name),
            "unexpected variable in the session: {line}"
        );
    }

    // Sessions never read the service's secrets: the store and the nodes' private files.
    let node0_dir = PathBuf::from(&alice_home)
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .to_path_buf();
    let host_key = node0_dir.join("private").join("ssh_host_ed25519_key");
    assert!(host_key.exists(), "{}", host_key.display());
    assert!(data.join("state.db").exists());
    if !common::require_root("sessions reading the store and host keys are refused") {
        // Sessions run as the server's own user, which owns these files: nothing to show.
        assert_eq!(etc_accounts(), etc_before);
        return;
    }
    for (port, user) in [(port0, "bob"), (port0, "alice"), (port1, "carol")] {
        for secret in [data.join("state.db"), host_key.clone()] {
            let out = run(port, user, &key, &format!("cat '{}'", secret.display())).await;
            assert_ne!(out.code, 0, "{user} read {}", secret.display());
            assert!(out.stderr.contains("Permission denied"), "{}", out.stderr);
        }
    }
    let out = run(port0, "bob", &key, &format!("ls '{}'", data.display())).await;
    assert_ne!(out.code, 0, "the data directory was listed: {}", out.stdout);

    // A uid per user, a gid per node (the primary group, first of `id -G`); never root.
    let (gid0, carol_gid) = (bob_groups[0].clone(), carol_groups[0].clone());
    let numbers = [&alice_uid, &bob_uid, &carol_uid, &gid0, &carol_gid];
    for (i, a) in numbers.iter().enumerate() {
        let n: u32 = a.parse().unwrap();
        assert!((2_000_000_001..=2_000_099_999).contains(&n), "{a}");
        for b in &numbers[i + 1..] {
            assert_ne!(a, b, "two users or nodes share a number: {numbers:?}");
        }
    }
    // isAdmin: the bare admin gid, for admins only.
    assert_eq!(alice_groups, [gid0.as_str(), "2000000000"]);
    assert_eq!(bob_groups, [gid0.as_str()]);

    // Each home belongs to its user (and the node's gid), 0700.
    for (home, uid) in [(&alice_home, &alice_uid), (&bob_home, &bob_uid)] {
        let meta = std::fs::metadata(home).unwrap();
        assert_eq!(meta.uid().to_string(), *uid);
        assert_eq!(meta.gid().to_string(), gid0);
        assert_eq!(meta.mode() & 0o777, 0o700, "{home}");
    }
    // Users of one node cannot read or write each other's homes either.
    let out = run(port0, "bob", &key, &format!("ls '{alice_home}'")).await;
    assert_ne!(out.code, 0, "bob listed alice's home");
    let out = run(
        port0,
        "bob",
        &key,
        &format!("touch '{alice_home}/from-bob'"),
    )
    .await;
    assert!(out.stderr.contains("Permission denied"), "{}", out.stderr);
    // But see who else has a home on the node (home/ is readable by the node's group).
    let homes = PathBuf::from(&alice_home).parent().unwrap().to_path_buf();
    let out = run(port0, "bob", &key, &format!("ls '{}'", homes.display())).await;
    assert_eq!(out.stdout, "alice\nbob\n", "{}", out.stderr);

    // Node 1's session cannot write into node 0's files, nor list node 0's homes or the data dir.
    let homes0 = PathBuf::from(&alice_home).parent().unwrap().to_path_buf();
    for target in [
        format!("{alice_home}/from-carol"),
        format!("{}/from-carol", homes0.display()),
        format!("{}/from-carol", node0_dir.display()),
    ] {
        let out = run(port1, "carol", &key, &format!("touch '{target}'")).await;
        assert_ne!(out.code, 0, "carol wrote {target}");
        assert!(out.stderr.contains("Permission denied"), "{}", out.stderr);
        assert!(!Path::new(&target).exists());
    }
    for listed in [
        homes0.clone(),
        data.clone(),
        data.join("nodes"),
        node0_dir.join("private"),
    ] {
        let out = run(port1, "carol", &key, &format!("ls '{}'", listed.display())).await;
        assert_ne!(out.code, 0, "carol listed {}", listed.display());
    }
    // Node 0's own sessions can write their home.
    let out = run(port0, "bob", &key, "echo hi > mine && cat mine").await;
    assert_eq!(out.stdout, "hi\n", "{}", out.stderr);

    // The assignment survives a restart.
    srv.stop();
    let srv = Server::start_in(&data);
    let c = srv.client();
    let port1 = c.ssh_port("p", &nodes[1]).await;
    let (again, _, home) = identity(port1, "carol", &key).await;
    assert_eq!(again, carol_uid, "the node's uid changed across a restart");
    assert_eq!(home, carol_home);

    assert_eq!(etc_accounts(), etc_before, "the host's /etc changed");
}

/// Kills the server when the test ends, however it ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the server in `cwd` with `args`; returns it, its URL and what it logs on stderr.
fn spawn_server(
    cwd: &Path,
    args: &[&str],
) -> (Killed, String, std::sync::Arc<std::sync::Mutex<String>>) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_bluebatch"))
        .args(["serve", "--port", "0", "--node-step-ms", "20"])
        .args(args)
        .current_dir(cwd)
        .env("BLUEBATCH_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let logged = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = logged.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            eprintln!("{line}");
            sink.lock().unwrap().push_str(&(line + "\n"));
        }
    });
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if let Some(url) = line.strip_prefix("bluebatch listening on ") {
                let _ = tx.send(url.trim().to_string());
            }
        }
    });
    let server = Killed(child);
    let url = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the server did not start");
    (server, url, logged)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn home_is_absolute_with_a_relative_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, url, _) = spawn_server(dir.path(), &["--data-dir", "relative-data"]);
    let c = Client::new(&url, common::ACCOUNT, common::KEY);
    let nodes = c.ready_pool("p", "linux", 1).await;
    let (key, public) = keypair(dir.path(), "k");
    add_user(&c, "p", &nodes[0], "rel", false, &public).await;
    let port = c.ssh_port("p", &nodes[0]).await;
    let (_, _, home) = identity(port, "rel", &key).await;
    let expected = std::fs::canonicalize(dir.path().join("relative-data")).unwrap();
    assert!(home.starts_with('/'), "HOME {home:?} is not absolute");
    assert!(
        std::fs::canonicalize(&home).unwrap().starts_with(&expected),
        "{home}"
    );
    let out = run(port, "rel", &key, "cd && pwd && touch here").await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout.trim(), home);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_session_uid_range_is_refused_at_start() {
    for bad in ["0-10", "10-5", "x-9", "100", "1-4294967295"] {
        let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_bluebatch"))
            .args(["serve", "--in-memory", "--port", "0", "--session-uids", bad])
            .env("BLUEBATCH_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(30), run)
            .await
            .expect("the server did not refuse in time")
            .unwrap();
        assert!(!out.status.success(), "{bad} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--session-uids"), "{bad}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_sessions_cannot_reach_is_named_in_a_warning() {
    if !common::require_root("the warning about a data dir sessions cannot reach") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let closed = dir.path().join("closed");
    std::fs::create_dir(&closed).unwrap();
    std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
    let data = closed.join("data");
    let (_server, url, logged) = spawn_server(dir.path(), &["--data-dir", data.to_str().unwrap()]);
    let c = Client::new(&url, common::ACCOUNT, common::KEY);
    c.ready_pool("p", "linux", 2).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = logged.lock().unwrap().clone();
        if text.contains("cannot pass through") {
            assert!(text.contains(closed.to_str().unwrap()), "{text}");
            assert_eq!(text.matches("cannot pass through").count(), 1, "{text}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no warning: {text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
