//! What the suites of `bluebatch serve --nodes sandbox` (sandbox_nodes.rs, sandbox_edges.rs)
//! share: a serve with sandboxed nodes on a data directory under the build's scratch directory,
//! the wait for a pool's nodes to be idle, and what a data directory shows of its machines.
#![allow(dead_code)]

use super::{Client, Server, text};
use std::path::Path;
use std::time::{Duration, Instant};

/// Every request.
const T: Duration = Duration::from_secs(30);
/// How long a pool of sandboxed nodes may take to be idle.
pub const READY: Duration = Duration::from_secs(90);

/// A data directory's parent under the build's own scratch directory (not /tmp: a node has a
/// /tmp of its own, so a data directory there would be invisible for the wrong reason).
pub fn scratch(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
}

/// The arguments of `bluebatch serve --nodes sandbox --data-dir DATA` (fast node steps).
pub fn serve_args(data: &Path) -> Vec<String> {
    [
        "--node-step-ms",
        "20",
        "--nodes",
        "sandbox",
        "--data-dir",
        data.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// `bluebatch serve --port 0 --nodes sandbox --data-dir DATA EXTRA…` (listening within 20 s).
pub fn serve(data: &Path, extra: &[&str]) -> Server {
    let args = serve_args(data);
    let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
    a.extend_from_slice(extra);
    Server::start_exact(&a, &[])
}

/// The nodes of `pool` once there are `n` and all are idle (at most [`READY`]): (id, ip) by id.
/// The failure carries the logs of `data`'s machines.
pub async fn idle_nodes(c: &Client, pool: &str, n: usize, data: &Path) -> Vec<(String, String)> {
    let deadline = Instant::now() + READY;
    loop {
        let r = c
            .req("GET", &format!("/pools/{pool}/nodes"))
            .send_within(T)
            .await;
        assert_eq!(r.status, 200, "{}", text(&r));
        let v = r.json();
        let list = v["value"].as_array().cloned().unwrap_or_default();
        if list.len() == n && list.iter().all(|x| x["state"] == "idle") {
            let mut nodes: Vec<(String, String)> = list
                .iter()
                .map(|x| {
                    (
                        x["id"].as_str().unwrap().to_string(),
                        x["ipAddress"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect();
            nodes.sort();
            return nodes;
        }
        assert!(
            Instant::now() < deadline,
            "{pool}: {n} idle node(s) not within {READY:?}: {v}\n{}",
            machine_logs(data)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The tail of each log file under DATA/sandbox/*/{log,var/log}.
pub fn machine_logs(data: &Path) -> String {
    let mut out = String::new();
    let Ok(machines) = std::fs::read_dir(data.join("sandbox")) else {
        return "(no DATA/sandbox)".into();
    };
    for m in machines.flatten() {
        for sub in ["log", "var/log"] {
            let Ok(files) = std::fs::read_dir(m.path().join(sub)) else {
                continue;
            };
            for f in files.flatten() {
                let text = std::fs::read_to_string(f.path()).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                out.push_str(&format!("== {} ==\n", f.path().display()));
                for l in tail.into_iter().rev() {
                    out.push_str(l);
                    out.push('\n');
                }
            }
        }
    }
    out
}

/// The entries of DATA/sandbox (none when it does not exist).
pub fn machine_dirs(data: &Path) -> Vec<String> {
    std::fs::read_dir(data.join("sandbox"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}
