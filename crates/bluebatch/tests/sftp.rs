//! `scp` and `sftp` with the stock OpenSSH client against the real server: served by the node
//! itself (a bluebatch child process running as the session's uid), with no sftp-server of the
//! host involved.

mod common;

use common::{Client, Server, keypair};
use serde_json::json;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Every client run is bounded by this.
const DEADLINE: Duration = Duration::from_secs(30);

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn client_opts(port: u16, key: &Path, port_flag: &str) -> Vec<String> {
    let mut v: Vec<String> = ["-F", "/dev/null", port_flag, &port.to_string()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for o in [
        "StrictHostKeyChecking=no",
        "UserKnownHostsFile=/dev/null",
        "BatchMode=yes",
        "IdentitiesOnly=yes",
        "LogLevel=ERROR",
        "ConnectTimeout=10",
    ] {
        v.push("-o".into());
        v.push(o.into());
    }
    v.push("-i".into());
    v.push(key.to_str().unwrap().into());
    v
}

async fn output(mut cmd: tokio::process::Command, stdin: Option<&[u8]>) -> Out {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    let mut child = cmd.spawn().expect("starting the OpenSSH client");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(input).await.unwrap();
        drop(pipe);
    }
    let out = tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .expect("the OpenSSH client did not finish in time")
        .unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `sftp -b -` with the batch on stdin (each failing command ends the batch with an error).
async fn sftp_batch(port: u16, user: &str, key: &Path, batch: &str) -> Out {
    let mut cmd = tokio::process::Command::new("sftp");
    cmd.args(client_opts(port, key, "-P"))
        .args(["-b", "-"])
        .arg(format!("{user}@127.0.0.1"));
    output(cmd, Some(batch.as_bytes())).await
}

async fn scp(port: u16, key: &Path, from: &str, to: &str) -> Out {
    let mut cmd = tokio::process::Command::new("scp");
    cmd.args(client_opts(port, key, "-P")).arg(from).arg(to);
    output(cmd, None).await
}

async fn ssh(port: u16, user: &str, key: &Path, command: &str) -> Out {
    let mut cmd = tokio::process::Command::new("ssh");
    cmd.args(client_opts(port, key, "-p"))
        .arg(format!("{user}@127.0.0.1"))
        .arg(command);
    output(cmd, None).await
}

async fn add_user(c: &Client, pool: &str, node: &str, name: &str, public: &str) {
    let r = c
        .req("POST", &format!("/pools/{pool}/nodes/{node}/users"))
        .json(&json!({"name": name, "sshPublicKey": public}))
        .send()
        .await;
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
}

/// Root, as the uid and secrets checks need (a loud note locally without it; a failure in CI).
fn is_root() -> bool {
    common::require_root("the uid and secrets checks of sftp sessions")
}

/// Processes whose real uid is `uid`, with their executables.
fn processes_of(uid: u32) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let path = entry.path();
        let Ok(status) = std::fs::read_to_string(path.join("status")) else {
            continue;
        };
        let real = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|u| u.parse::<u32>().ok());
        if real == Some(uid)
            && let Ok(exe) = std::fs::read_link(path.join("exe"))
        {
            found.push(exe);
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scp_and_sftp_work_without_the_hosts_sftp_server() {
    for path in [
        "/usr/lib/openssh/sftp-server",
        "/usr/libexec/openssh/sftp-server",
        "/usr/lib/ssh/sftp-server",
    ] {
        if Path::new(path).exists() {
            eprintln!("note: {path} exists on this host; the node must not use it");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let srv = Server::start_in(&data);
    let c = srv.client();
    let nodes = c.ready_pool("p", "linux", 1).await;
    let (key, public) = keypair(dir.path(), "k");
    add_user(&c, "p", &nodes[0], "sam", &public).await;
    let port = c.ssh_port("p", &nodes[0]).await;
    let who = ssh(port, "sam", &key, "id -u; echo \"$HOME\"").await;
    assert_eq!(who.code, 0, "{}", who.stderr);
    let mut lines = who.stdout.lines();
    let uid: u32 = lines.next().unwrap().parse().unwrap();
    let home = PathBuf::from(lines.next().unwrap());

    // scp (SFTP protocol, OpenSSH 9's default) up and back down: the same bytes.
    let payload: Vec<u8> = (0..700_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let local = dir.path().join("up.bin");
    std::fs::write(&local, &payload).unwrap();
    let up = scp(port, &key, local.to_str().unwrap(), "sam@127.0.0.1:up.bin").await;
    assert_eq!(up.code, 0, "scp upload: {}", up.stderr);
    let on_node = home.join("up.bin");
    assert_eq!(std::fs::read(&on_node).unwrap(), payload);
    let meta = std::fs::metadata(&on_node).unwrap();
    if is_root() {
        assert_eq!(meta.uid(), uid, "the upload is not the session's");
        assert_ne!(meta.uid(), 0);
    }
    let back = dir.path().join("down.bin");
    let down = scp(port, &key, "sam@127.0.0.1:up.bin", back.to_str().unwrap()).await;
    assert_eq!(down.code, 0, "scp download: {}", down.stderr);
    assert_eq!(std::fs::read(&back).unwrap(), payload);

    // An sftp batch: mkdir, put, ls, rename, get, rm, rmdir.
    let small = dir.path().join("small.txt");
    std::fs::write(&small, b"hello over sftp\n").unwrap();
    let fetched = dir.path().join("fetched.txt");
    let batch = format!(
        "pwd\nmkdir d\nput {} d/one.txt\nls -l d\nrename d/one.txt d/two.txt\nls d\nget d/two.txt {}\n",
        small.display(),
        fetched.display()
    );
    let out = sftp_batch(port, "sam", &key, &batch).await;
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains(home.to_str().unwrap()),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("one.txt"), "{}", out.stdout);
    assert!(out.stdout.contains("two.txt"), "{}", out.stdout);
    assert_eq!(std::fs::read(&fetched).unwrap(), b"hello over sftp\n");
    assert!(home.join("d/two.txt").exists() && !home.join("d/one.txt").exists());
    if is_root() {
        assert_eq!(std::fs::metadata(home.join("d")).unwrap().uid(), uid);
        assert_eq!(
            std::fs::metadata(home.join("d/two.txt")).unwrap().uid(),
            uid
        );
    }
    // chmod, symlinks, df; scp -r -p keeps modes and times.
    let out = sftp_batch(
        port,
        "sam",
        &key,
        "chmod 600 d/two.txt\nln -s two.txt d/link\nls -l d\ndf\n",
    )
    .await;
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("link"), "{}", out.stdout);
    let two = std::fs::symlink_metadata(home.join("d/two.txt")).unwrap();
    assert_eq!(two.mode() & 0o777, 0o600);
    assert_eq!(
        std::fs::read_link(home.join("d/link")).unwrap(),
        Path::new("two.txt")
    );
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("sub/leaf"), b"leaf\n").unwrap();
    let leaf = std::fs::File::options()
        .write(true)
        .open(tree.join("sub/leaf"))
        .unwrap();
    let old = std::time::UNIX_EPOCH + Duration::from_secs(1_577_934_245);
    leaf.set_modified(old).unwrap();
    drop(leaf);
    let mut cmd = tokio::process::Command::new("scp");
    cmd.args(client_opts(port, &key, "-P"))
        .args(["-r", "-p"])
        .arg(&tree)
        .arg("sam@127.0.0.1:d/");
    let out = output(cmd, None).await;
    assert_eq!(out.code, 0, "scp -r -p: {}", out.stderr);
    let copied = std::fs::metadata(home.join("d/tree/sub/leaf")).unwrap();
    assert_eq!(
        std::fs::read(home.join("d/tree/sub/leaf")).unwrap(),
        b"leaf\n"
    );
    assert_eq!(copied.modified().unwrap(), old);
    std::fs::remove_dir_all(home.join("d/tree")).unwrap();

    let out = sftp_batch(port, "sam", &key, "rm d/link\nrm d/two.txt\nrmdir d\nls\n").await;
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    assert!(!home.join("d").exists());

    // The service's secrets stay out of reach: the store cannot be fetched (when the server is
    // not root, sessions are the server's own user, which owns the store).
    if is_root() {
        let stolen = dir.path().join("stolen.db");
        let out = sftp_batch(
            port,
            "sam",
            &key,
            &format!(
                "get {} {}\n",
                data.join("state.db").display(),
                stolen.display()
            ),
        )
        .await;
        assert_ne!(out.code, 0, "state.db was fetched: {}", out.stdout);
        assert!(!stolen.exists() || std::fs::read(&stolen).unwrap().is_empty());
        assert!(
            out.stderr.contains("Permission denied"),
            "{}\n{}",
            out.stdout,
            out.stderr
        );
        // Nor the node's host key, nor a listing of the data directory.
        let host_key = home
            .parent()
            .and_then(Path::parent)
            .unwrap()
            .join("private/ssh_host_ed25519_key");
        assert!(host_key.exists());
        for batch in [
            format!("get {} {}\n", host_key.display(), stolen.display()),
            format!("ls {}\n", data.display()),
        ] {
            let out = sftp_batch(port, "sam", &key, &batch).await;
            assert_ne!(out.code, 0, "{batch}: {}", out.stdout);
            assert!(!stolen.exists() || std::fs::read(&stolen).unwrap().is_empty());
        }
        // Nor written into.
        let out = sftp_batch(
            port,
            "sam",
            &key,
            &format!("put {} {}/x\n", small.display(), data.display()),
        )
        .await;
        assert_ne!(out.code, 0, "wrote into the data directory");
    }

    // While a transfer session is open, the server side is a bluebatch process running as the
    // session's uid (not the host's sftp-server, not root).
    if is_root() {
        let mut cmd = tokio::process::Command::new("sftp");
        cmd.args(client_opts(port, &key, "-P"))
            .args(["-b", "-"])
            .arg("sam@127.0.0.1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let mut child = cmd.spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"pwd\n").await.unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut seen = Vec::new();
        let deadline = Instant::now() + DEADLINE;
        while !String::from_utf8_lossy(&seen).contains("Remote working directory") {
            assert!(Instant::now() < deadline, "no answer from sftp");
            let mut buf = [0u8; 256];
            let n = tokio::time::timeout(DEADLINE, stdout.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "sftp ended early");
            seen.extend_from_slice(&buf[..n]);
        }
        let ours = std::fs::canonicalize(env!("CARGO_BIN_EXE_bluebatch")).unwrap();
        let exes = processes_of(uid);
        assert!(
            exes.iter().any(|e| e == &ours),
            "no bluebatch process runs as uid {uid}: {exes:?}"
        );
        assert!(
            !exes
                .iter()
                .any(|e| e.to_string_lossy().contains("sftp-server")),
            "{exes:?}"
        );
        drop(stdin);
        let status = tokio::time::timeout(DEADLINE, child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success());
    }
}
