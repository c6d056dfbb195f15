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
