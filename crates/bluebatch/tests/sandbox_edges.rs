//! Sandboxed nodes at their edges: what an unlucky or hostile user of `bluebatch serve --nodes
//! sandbox` runs into (odd data directory paths, …). Root only; a loud skip otherwise.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);
const READY: Duration = Duration::from_secs(90);

fn prerequisites() -> bool {
    if !require_root("sandboxed nodes (network, mount and PID namespaces)") {
        return false;
    }
    require(
        cfg!(target_os = "linux")
            && ["/usr/sbin/sshd", "/usr/bin/sudo", "/usr/bin/unshare"]
                .iter()
                .all(|t| Path::new(t).exists()),
        "Linux with openssh-server, sudo, util-linux",
    )
}

fn serve(data: &Path, extra: &[&str]) -> Server {
    let mut a = vec![
        "--node-step-ms",
        "20",
        "--nodes",
        "sandbox",
        "--data-dir",
        data.to_str().unwrap(),
    ];
    a.extend_from_slice(extra);
    Server::start_exact(&a, &[])
}

/// The nodes of `pool` once there are `n` and all are idle (at most [`READY`]): (id, ip).
async fn idle_nodes(c: &Client, pool: &str, n: usize) -> Vec<(String, String)> {
    let deadline = Instant::now() + READY;
    loop {
        let r = c
            .req("GET", &format!("/pools/{pool}/nodes"))
            .send_within(T)
            .await;
        assert_eq!(r.status, 200);
        let v = r.json();
        let list = v["value"].as_array().cloned().unwrap_or_default();
        if list.len() == n && list.iter().all(|x| x["state"] == "idle") {
            return list
                .iter()
                .map(|x| {
                    (
                        x["id"].as_str().unwrap().to_string(),
                        x["ipAddress"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect();
        }
        assert!(
            Instant::now() < deadline,
            "{pool}: {n} idle node(s) not within {READY:?}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The first line an SSH server at `ip:22` sends (within 10 s), or "".
fn ssh_banner(ip: &str) -> String {
    use std::io::Read;
    let addr: std::net::SocketAddr = format!("{ip}:22").parse().unwrap();
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

async fn delete_pool_and_wait(c: &Client, pool: &str, data: &Path) {
    let r = c
        .req("DELETE", &format!("/pools/{pool}"))
        .send_within(T)
        .await;
    assert_eq!(r.status, 202);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let gone = c
            .req("GET", &format!("/pools/{pool}"))
            .send_within(T)
            .await
            .status
            == 404;
        let dirs = machine_dirs(data);
        if gone && dirs.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "pool {pool} not gone: {dirs:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn machine_dirs(data: &Path) -> Vec<String> {
    std::fs::read_dir(data.join("sandbox"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// A data directory whose path holds `,` `:` `\` and a space (an overlay mount option's
/// separators): its nodes still start and answer SSH, and Delete Pool leaves nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_data_dir_with_odd_characters_still_gives_working_nodes() {
    if !prerequisites() {
        return;
    }
    let base = tempfile::Builder::new()
        .prefix("sandbox-edges-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let data = base.path().join("my data,v1:x\\y");
    let mut server = serve(&data, &[]);
    let c = server.client();
    let r = c
        .req("POST", "/pools")
        .json(&pool_body("odd", 1))
        .send_within(T)
        .await;
    assert_eq!(r.status, 201);
    let nodes = idle_nodes(&c, "odd", 1).await;
    let banner = ssh_banner(&nodes[0].1);
    assert!(banner.starts_with("SSH-2.0-OpenSSH"), "{banner:?}");
    eprintln!("node {nodes:?} answers {banner}");
    delete_pool_and_wait(&c, "odd", &data).await;
    server.stop();
    let _ = Value::Null;
    let _ = (Command::new("true"), Stdio::null());
}

/// `bluebatch serve ARGS` run inside a private mount namespace where `MERGED` is an overlayfs
/// (nothing mounted on this host's own namespace); its exit code and stderr (at most 30 s).
fn serve_on_overlay(base: &Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    for d in ["lower", "upper", "work", "merged"] {
        std::fs::create_dir_all(base.join(d)).unwrap();
    }
    let script = format!(
        "mount -t overlay overlay -o lowerdir={b}/lower,upperdir={b}/upper,workdir={b}/work \
         {b}/merged && exec \"$0\" \"$@\"",
        b = base.display()
    );
    let mut child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .arg(env!("CARGO_BIN_EXE_bluebatch"))
        .args(["serve", "--port", "0", "--nodes", "sandbox"])
        .args(args)
        .envs(env.iter().copied())
        .env("BLUEBATCH_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("serve --nodes sandbox on an overlayfs data directory still runs after 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A data directory on an overlayfs (a container's root, often) cannot hold a node's /etc
/// overlay: serve refuses at start (exit 2, naming it and what to do), making nothing; so does
/// --in-memory when TMPDIR is there.
#[tokio::test(flavor = "multi_thread")]
async fn a_data_dir_on_overlayfs_is_refused_at_start() {
    if !prerequisites() {
        return;
    }
    let base = tempfile::Builder::new()
        .prefix("sandbox-edges-ovl-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let b = base.path();
    let data = b.join("merged/data");
    let (code, err) = serve_on_overlay(b, &["--data-dir", data.to_str().unwrap()], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("is on an overlayfs"), "{err}");
    assert!(err.contains("--data-dir"), "{err}");
    assert!(
        !b.join("upper/data").exists(),
        "the data directory was made"
    );
    let tmp = b.join("merged");
    let (code, err) = serve_on_overlay(b, &["--in-memory"], &[("TMPDIR", tmp.to_str().unwrap())]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("is on an overlayfs"), "{err}");
    let left: Vec<_> = std::fs::read_dir(b.join("upper"))
        .unwrap()
        .flatten()
        .collect();
    assert!(left.is_empty(), "left in the overlay: {left:?}");
}
