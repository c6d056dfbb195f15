//! Sandboxed nodes at their edges: what an unlucky or hostile user of `bluebatch serve --nodes
//! sandbox` runs into (odd data directory paths, …). Root only; a loud skip otherwise.

mod common;

use common::replicas::add_pool;
use common::sandboxed::{idle_nodes, machine_dirs, scratch, serve};
use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

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

/// Whether this is the child [`in_own_netns`] runs with `var` set; if so, its loopback is up.
fn child_of(var: &str) -> bool {
    if std::env::var_os(var).is_none() {
        return false;
    }
    assert!(
        Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .unwrap()
            .success()
    );
    true
}

/// Runs this binary's test `child` (at most `secs` s) in a network namespace of its own, with
/// `var` set.
fn in_own_netns(secs: &str, child: &str, var: &str) -> std::process::Output {
    Command::new("timeout")
        .args([secs, "unshare", "--net", "--"])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", child, "--nocapture"])
        .env(var, "1")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// The child succeeded and printed `marker`.
fn child_passed(out: &std::process::Output, marker: &str) {
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(marker),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits (at most `limit`) until `data` has exactly `n` machines: directories, `bbs*` links
/// (of this network namespace) and inits.
async fn exactly_machines(data: &Path, n: usize, limit: Duration, what: &str) {
    let deadline = Instant::now() + limit;
    loop {
        let (dirs, links, inits) = (machine_dirs(data), bbs_links(), inits_under(data));
        if dirs.len() == n && links.len() == n && inits.len() == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}, not {n} machines: dirs {dirs:?}, links {links:?}, inits {inits:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A data directory whose path holds `,` `:` `\` and a space (an overlay mount option's
/// separators): its nodes still start and answer SSH, and Delete Pool leaves nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_data_dir_with_odd_characters_still_gives_working_nodes() {
    if !prerequisites() {
        return;
    }
    let base = scratch("sandbox-edges-");
    let data = base.path().join("my data,v1:x\\y");
    let mut server = serve(&data, &[]);
    let c = server.client();
    add_pool(&c, "odd", 1).await;
    let nodes = idle_nodes(&c, "odd", 1, &data).await;
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
    let base = scratch("sandbox-edges-ovl-");
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

/// The PID of the sandbox-init whose node address is `node_ip`.
fn init_of(node_ip: &str) -> u32 {
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.get(1).is_some_and(|a| a == "sandbox-init")
            && args
                .windows(2)
                .any(|w| w[0] == "--node-ip" && w[1] == node_ip)
        {
            return pid;
        }
    }
    panic!("no sandbox-init for {node_ip}");
}

/// Whether a TCP connection from inside the network namespace of `pid` to `ip:port` is
/// accepted within 3 s.
fn reaches_from(pid: u32, ip: &str, port: u16) -> bool {
    Command::new("timeout")
        .args(["5", "nsenter", "-t", &pid.to_string(), "-n", "--"])
        .args([
            "bash",
            "-c",
            &format!("timeout 3 bash -c 'exec 3<>/dev/tcp/{ip}/{port}'"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `curl` from inside the network namespace of `pid`: the HTTP status of GET `url` ("000" when
/// nothing answered).
fn http_status_from(pid: u32, url: &str) -> String {
    let out = Command::new("timeout")
        .args(["10", "nsenter", "-t", &pid.to_string(), "-n", "--"])
        .args([
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-m",
            "5",
            "-w",
            "%{http_code}",
            url,
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Set in the child of [`a_node_reaches_no_other_node_even_with_ip_forward_on`].
const IN_OWN_NETNS: &str = "BB_SANDBOX_EDGES_IN_NETNS";

/// Not a test of its own: run by the next one in a network namespace of its own with
/// `net.ipv4.ip_forward=1`; prints what a node reaches.
#[tokio::test(flavor = "multi_thread")]
async fn reachability_child() {
    if !child_of(IN_OWN_NETNS) {
        return;
    }
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").unwrap();
    let base = scratch("sandbox-edges-net-");
    let data = base.path().join("data");
    let mut server = serve(&data, &[]);
    let c = server.client();
    let port: u16 = server.url.rsplit(':').next().unwrap().parse().unwrap();
    add_pool(&c, "net", 2).await;
    let nodes = idle_nodes(&c, "net", 2, &data).await;
    let (a, b) = (&nodes[0].1, &nodes[1].1);
    let init_a = init_of(a);
    let host_a = {
        let o: std::net::Ipv4Addr = a.parse().unwrap();
        std::net::Ipv4Addr::from(u32::from(o) - 1).to_string()
    };
    let host_b = {
        let o: std::net::Ipv4Addr = b.parse().unwrap();
        std::net::Ipv4Addr::from(u32::from(o) - 1).to_string()
    };
    // A listener of this host on every address (as many services are).
    let any = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let any_port = any.local_addr().unwrap().port();
    println!("RESULT own_sshd {}", reaches_from(init_a, a, 22));
    println!("RESULT other_sshd {}", reaches_from(init_a, b, 22));
    println!(
        "RESULT other_host_side_sshd {}",
        reaches_from(init_a, &host_b, 22)
    );
    println!(
        "RESULT batch_api_on_host_side {}",
        reaches_from(init_a, &host_a, port)
    );
    println!(
        "RESULT batch_api_on_loopback {}",
        reaches_from(init_a, "127.0.0.1", port)
    );
    println!(
        "RESULT host_any_listener {}",
        reaches_from(init_a, &host_a, any_port)
    );
    // The agents-only listener serves the node protocol only.
    let agents_port = listening_ports_on(&host_a);
    for p in agents_port {
        println!(
            "RESULT agents_listener_pools {}",
            http_status_from(
                init_a,
                &format!("http://{host_a}:{p}/pools?api-version={V}")
            )
        );
    }
    drop(any);
    server.stop();
}

/// The TCP ports listening on `ip` (from /proc/net/tcp of this network namespace).
fn listening_ports_on(ip: &str) -> Vec<u16> {
    let o: std::net::Ipv4Addr = ip.parse().unwrap();
    let hex = format!("{:08X}", u32::from_le_bytes(o.octets()));
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (addr, port) = f.get(1)?.split_once(':')?;
            (addr == hex && f.get(3) == Some(&"0A")).then(|| u16::from_str_radix(port, 16).ok())?
        })
        .collect()
}

/// What a node reaches, checked where this host forwards IPv4 (`ip_forward=1`, as on many
/// hosts that run containers): its own sshd, but not another node's (the host side of each
/// node's link forwards nothing); not the Batch API (loopback only); the agents-only listener
/// of its link answers the Batch API's paths 404. A listener of this host on every address
/// *is* reachable at the host side of the node's link (as from a container on a bridge).
#[tokio::test(flavor = "multi_thread")]
async fn a_node_reaches_no_other_node_even_with_ip_forward_on() {
    if !prerequisites() {
        return;
    }
    let out = in_own_netns("150", "reachability_child", IN_OWN_NETNS);
    let text = String::from_utf8_lossy(&out.stdout);
    let results: std::collections::BTreeMap<String, String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("RESULT "))
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let all = format!(
        "{results:?}\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the child failed: {all}");
    eprintln!("what a node reaches: {results:?}");
    assert_eq!(
        results.get("own_sshd").map(String::as_str),
        Some("true"),
        "{all}"
    );
    assert_eq!(
        results.get("other_sshd").map(String::as_str),
        Some("false"),
        "{all}"
    );
    assert_eq!(
        results.get("batch_api_on_host_side").map(String::as_str),
        Some("false"),
        "{all}"
    );
    assert_eq!(
        results.get("batch_api_on_loopback").map(String::as_str),
        Some("false"),
        "{all}"
    );
    assert_eq!(
        results.get("agents_listener_pools").map(String::as_str),
        Some("404"),
        "{all}"
    );
}

/// The `bbs*` links of this network namespace.
fn bbs_links() -> Vec<String> {
    let out = Command::new("ip").args(["-o", "link"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap().to_string())
        .filter(|n| n.starts_with("bbs"))
        .collect()
}

/// The sandbox-init processes whose machine directory lies under `data`.
fn inits_under(data: &Path) -> Vec<u32> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let text = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        // The inits themselves (not the `unshare … sandbox-init` wrapping each).
        if args.get(1) == Some(&&b"sandbox-init"[..]) && text.contains(data.to_str().unwrap()) {
            found.push(pid);
        }
    }
    found
}

/// POST /pools/{pool}/resize to `n` as soon as the pool takes it (409 while it resizes; Stop
/// Resize is not served), at most 60 s.
async fn resize(c: &Client, pool: &str, n: u32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = c
            .req("POST", &format!("/pools/{pool}/resize"))
            .json(&serde_json::json!({"targetDedicatedNodes": n}))
            .send_within(T)
            .await;
        if r.status == 202 {
            return;
        }
        assert_eq!(r.status, 409, "resize to {n}: {}", r.code());
        assert!(Instant::now() < deadline, "resize to {n}: still 409");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Set in the child of [`churn_ends_with_exactly_the_target_machines`].
const CHURN_CHILD: &str = "BB_SANDBOX_EDGES_CHURN";

/// Not a test of its own: the churn, run in a network namespace of its own (so that every
/// `bbs*` link there is this serve's).
#[tokio::test(flavor = "multi_thread")]
async fn churn_child() {
    if !child_of(CHURN_CHILD) {
        return;
    }
    let base = scratch("sandbox-edges-churn-");
    let data = base.path().join("data");
    let mut server = serve(&data, &[]);
    let c = server.client();
    add_pool(&c, "churn", 0).await;
    for (n, pause) in [(5, 700), (0, 300), (3, 200), (1, 500), (3, 0)] {
        resize(&c, "churn", n).await;
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    let nodes = idle_nodes(&c, "churn", 3, &data).await;
    exactly_machines(&data, 3, Duration::from_secs(60), "after the churn").await;
    for (_, ip) in &nodes {
        let b = ssh_banner(ip);
        assert!(b.starts_with("SSH-2.0-OpenSSH"), "{ip}: {b:?}");
    }
    // Delete Pool while a resize is starting machines.
    resize(&c, "churn", 5).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    delete_pool_and_wait(&c, "churn", &data).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (links, inits) = (bbs_links(), inits_under(&data));
        if links.is_empty() && inits.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left: links {links:?}, inits {inits:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    server.stop();
    println!("CHURN ok");
}

/// Resize 0 → 5 → 0 → 3 → 1 → 3 in quick succession ends with exactly 3 idle nodes, 3
/// machines (directories, veth pairs, inits) answering SSH; Delete Pool while it grows again
/// leaves no machine, link or process.
#[tokio::test(flavor = "multi_thread")]
async fn churn_ends_with_exactly_the_target_machines() {
    if !prerequisites() {
        return;
    }
    child_passed(&in_own_netns("240", "churn_child", CHURN_CHILD), "CHURN ok");
}

/// Set in the child of [`two_serves_never_touch_each_others_machines`].
const TWO_CHILD: &str = "BB_SANDBOX_EDGES_TWO";

/// Not a test of its own: two serves in one network namespace of their own.
#[tokio::test(flavor = "multi_thread")]
async fn two_serves_child() {
    if !child_of(TWO_CHILD) {
        return;
    }
    let base = scratch("sandbox-edges-two-");
    let (da, db) = (base.path().join("a"), base.path().join("b"));
    let mut a = serve(&da, &[]);
    let mut b = serve(&db, &[]);
    let (ca, cb) = (a.client(), b.client());
    for c in [&ca, &cb] {
        add_pool(c, "p", 2).await;
    }
    let na = idle_nodes(&ca, "p", 2, &da).await;
    let nb = idle_nodes(&cb, "p", 2, &db).await;
    let mut ips: Vec<&String> = na.iter().chain(nb.iter()).map(|(_, ip)| ip).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(
        ips.len(),
        4,
        "addresses shared between serves: {na:?} {nb:?}"
    );
    assert_eq!(bbs_links().len(), 4, "{:?}", bbs_links());
    let b_inits = inits_under(&db);
    assert_eq!(b_inits.len(), 2);
    let b_alive = |what: &str| {
        for (_, ip) in &nb {
            let s = ssh_banner(ip);
            assert!(
                s.starts_with("SSH-2.0-OpenSSH"),
                "{what}: B's node {ip}: {s:?}"
            );
        }
        assert_eq!(inits_under(&db), b_inits, "{what}: B's inits changed");
    };
    // A stopped and started again while B runs: A's machines come back, B's are untouched.
    a.stop();
    b_alive("after A stopped");
    let mut a = serve(&da, &[]);
    let ca = a.client();
    let again = idle_nodes(&ca, "p", 2, &da).await;
    for (_, ip) in &again {
        let s = ssh_banner(ip);
        assert!(
            s.starts_with("SSH-2.0-OpenSSH"),
            "A's node {ip} after restart: {s:?}"
        );
    }
    b_alive("after A restarted");
    // A killed (SIGKILL): its machines end themselves, B's stay.
    a.kill();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !inits_under(&da).is_empty() {
        assert!(Instant::now() < deadline, "A's machines outlive A");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b_alive("after A was killed");
    assert_eq!(bbs_links().len(), 2, "{:?}", bbs_links());
    delete_pool_and_wait(&cb, "p", &db).await;
    b.stop();
    println!("TWO ok");
}

/// Two serves with sandboxed nodes at once (different data directories) get distinct links and
/// addresses; one stopped, restarted and then killed never touches the other's machines.
#[tokio::test(flavor = "multi_thread")]
async fn two_serves_never_touch_each_others_machines() {
    if !prerequisites() {
        return;
    }
    child_passed(
        &in_own_netns("240", "two_serves_child", TWO_CHILD),
        "TWO ok",
    );
}

/// utime + stime of `pid` in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// A node whose sshd cannot start (an admin broke its sshd_config): init retries once a second
/// without spinning the CPU; the node stays idle in the API (as a VM whose sshd died), and a
/// reboot completes (idle again) instead of repeating for ever; a reimage gives the node its own
/// sshd_config back.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_whose_sshd_cannot_start_does_not_spin() {
    if !prerequisites() {
        return;
    }
    let base = scratch("sandbox-edges-sshd-");
    let data = base.path().join("data");
    let mut server = serve(&data, &[]);
    let c = server.client();
    add_pool(&c, "broken", 1).await;
    let nodes = idle_nodes(&c, "broken", 1, &data).await;
    let (id, ip) = nodes[0].clone();
    let init = init_of(&ip);
    // As an admin inside would: a broken sshd_config, then sshd ends.
    let conf = format!("/proc/{init}/root/etc/ssh/sshd_config");
    let mut text = std::fs::read_to_string(&conf).unwrap();
    assert!(text.contains("written by bluebatch sandbox-init"), "{text}");
    text.push_str("NoSuchOption yes\n");
    std::fs::write(&conf, text).unwrap();
    let ns = std::fs::read_link(format!("/proc/{init}/ns/pid")).unwrap();
    let sshds: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_link(format!("/proc/{p}/ns/pid"))
                .ok()
                .as_ref()
                == Some(&ns)
        })
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .unwrap_or_default()
                .trim()
                == "sshd"
        })
        .collect();
    assert!(!sshds.is_empty());
    for p in sshds {
        // SAFETY: kill(2) of the test's own node's sshd.
        unsafe { libc::kill(p as i32, libc::SIGKILL) };
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = cpu_ticks(init);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let used = cpu_ticks(init) - t0;
    assert!(used < 100, "init used {used} ticks in 5 s");
    let logs = |data: &Path| {
        let mut out = String::new();
        for d in machine_dirs(data) {
            for f in ["log/init.log", "var/log/sshd.log"] {
                let p = data.join("sandbox").join(&d).join(f);
                out.push_str(&format!(
                    "== {f}\n{}\n",
                    std::fs::read_to_string(p).unwrap_or_default()
                ));
            }
        }
        out
    };
    assert!(
        !ssh_banner(&ip).starts_with("SSH-"),
        "sshd still answers: {}",
        logs(&data)
    );
    let v = c
        .req("GET", &format!("/pools/broken/nodes/{id}"))
        .send_within(T)
        .await
        .json();
    eprintln!("node with a dead sshd: state {}", v["state"]);
    let r = c
        .req("POST", &format!("/pools/broken/nodes/{id}/reboot"))
        .json(&serde_json::json!({}))
        .send_within(T)
        .await;
    assert_eq!(r.status, 202);
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut last = Value::Null;
    while Instant::now() < deadline {
        last = c
            .req("GET", &format!("/pools/broken/nodes/{id}"))
            .send_within(T)
            .await
            .json();
        if last["state"] != "rebooting" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "after reboot: state {} errors {}",
        last["state"], last["errors"]
    );
    // Rebooted once, as a machine with a broken sshd boots: idle (SSH refused), not rebooting
    // for ever with its processes killed again and again.
    assert_eq!(last["state"], "idle", "{last}");
    assert!(
        !ssh_banner(&ip).starts_with("SSH-"),
        "sshd answers with a broken config"
    );
    // A reimage gives the node its own sshd_config back: SSH answers again, the node is idle.
    let r = c
        .req("POST", &format!("/pools/broken/nodes/{id}/reimage"))
        .json(&serde_json::json!({}))
        .send_within(T)
        .await;
    assert_eq!(r.status, 202);
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let v = c
            .req("GET", &format!("/pools/broken/nodes/{id}"))
            .send_within(T)
            .await
            .json();
        if v["state"] == "idle" && ssh_banner(&ip).starts_with("SSH-2.0-OpenSSH") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after a reimage: {v}, banner {:?}\n{}",
            ssh_banner(&ip),
            logs(&data)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let conf = std::fs::read_to_string(format!("/proc/{}/root/etc/ssh/sshd_config", init_of(&ip)))
        .unwrap();
    assert!(!conf.contains("NoSuchOption"), "{conf}");
    delete_pool_and_wait(&c, "broken", &data).await;
    server.stop();
}

/// Set in the child of [`removing_a_rebooting_node_leaves_exactly_the_rest`].
const REMOVE_CHILD: &str = "BB_SANDBOX_EDGES_REMOVE";

#[tokio::test(flavor = "multi_thread")]
async fn remove_rebooting_child() {
    if !child_of(REMOVE_CHILD) {
        return;
    }
    let base = scratch("sandbox-edges-rm-");
    let data = base.path().join("data");
    let mut server = serve(&data, &[]);
    let c = server.client();
    add_pool(&c, "rm", 3).await;
    let nodes = idle_nodes(&c, "rm", 3, &data).await;
    let (gone, _) = nodes[0].clone();
    let r = c
        .req("POST", &format!("/pools/rm/nodes/{gone}/reboot"))
        .json(&serde_json::json!({}))
        .send_within(T)
        .await;
    assert_eq!(r.status, 202);
    let r = c
        .req("POST", "/pools/rm/removenodes")
        .json(&serde_json::json!({"nodeList": [gone]}))
        .send_within(T)
        .await;
    assert_eq!(r.status, 202, "{}", r.code());
    let rest = idle_nodes(&c, "rm", 2, &data).await;
    assert!(rest.iter().all(|(id, _)| *id != gone));
    exactly_machines(&data, 2, Duration::from_secs(30), "after Remove Nodes").await;
    for (_, ip) in &rest {
        assert!(ssh_banner(ip).starts_with("SSH-2.0-OpenSSH"), "{ip}");
    }
    delete_pool_and_wait(&c, "rm", &data).await;
    server.stop();
    println!("REMOVE ok");
}

/// Remove Nodes of a node that is rebooting ends with exactly the other nodes idle, their
/// machines only (directories, links, inits).
#[tokio::test(flavor = "multi_thread")]
async fn removing_a_rebooting_node_leaves_exactly_the_rest() {
    if !prerequisites() {
        return;
    }
    child_passed(
        &in_own_netns("240", "remove_rebooting_child", REMOVE_CHILD),
        "REMOVE ok",
    );
}

/// The accounts of the node's own `/etc/passwd` (init rewrote it to the host's system accounts
/// at the node's first start, so it is in the overlay's upper layer).
fn accounts_of(data: &Path, machine: &str) -> Vec<String> {
    let upper = data.join("sandbox").join(machine).join("etc-upper/passwd");
    let passwd =
        std::fs::read_to_string(&upper).unwrap_or_else(|e| panic!("{}: {e}", upper.display()));
    passwd
        .lines()
        .filter_map(|l| l.split(':').next())
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .collect()
}

/// A pool body of `os` ("linux" or "windows") with `bluebatch.nodes=nodes` when given.
fn pool_of(id: &str, os: &str, nodes: Option<&str>) -> Value {
    let mut b = pool_body(id, 1);
    if os == "windows" {
        b["virtualMachineConfiguration"] = serde_json::json!({"imageReference": {
            "publisher": "MicrosoftWindowsServer", "offer": "WindowsServer",
            "sku": "2022-datacenter"}, "nodeAgentSKUId": "batch.node.windows amd64"});
    }
    if let Some(v) = nodes {
        b["metadata"] = serde_json::json!([{"name": "bluebatch.nodes", "value": v}]);
    }
    b
}

/// The remote login address of `pool`'s node `node`.
async fn remote_login_ip(c: &Client, pool: &str, node: &str) -> String {
    let r = c
        .req(
            "GET",
            &format!("/pools/{pool}/nodes/{node}/remoteloginsettings"),
        )
        .send_within(T)
        .await;
    assert_eq!(r.status, 200, "{}", text(&r));
    r.json()["remoteLoginIPAddress"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// One `serve --nodes sandbox`: a sandboxed node's agent joined, so its join-token file is gone
/// and its pool's token revoked (listed no more); Add User with any account the node has is
/// refused (as reserved on the node where the service's own list lacks the name); a Windows pool and a Linux pool asking for
/// `bluebatch.nodes=embedded` get embedded nodes (127.0.0.1, no machine directory); a Windows
/// pool asking for `sandbox` is refused. A serve without `--nodes sandbox` refuses `sandbox`.
#[tokio::test(flavor = "multi_thread")]
async fn a_sandbox_serve_spends_join_tokens_refuses_system_names_and_still_embeds() {
    if !prerequisites() {
        return;
    }
    within(Duration::from_secs(240), "the test", async {
        let base = scratch("sandbox-edges-");
        let data = base.path().join("data");
        let mut server = serve(&data, &[]);
        let c = server.client();

        // A sandboxed node: joined, so its token file is gone and the token spent.
        add_pool(&c, "sb", 1).await;
        let nodes = idle_nodes(&c, "sb", 1, &data).await;
        let dirs = machine_dirs(&data);
        assert_eq!(dirs.len(), 1, "{dirs:?}");
        let machine = dirs[0].clone();
        let token_file = data
            .join("sandbox")
            .join(&machine)
            .join("var/lib/bluebatch-agent/join-token");
        assert!(
            data.join("sandbox")
                .join(&machine)
                .join("var/lib/bluebatch-agent")
                .is_dir(),
            "the agent's state directory is where the token file was"
        );
        // The manager removes it once the host is seen: allow it a moment after idle.
        let deadline = Instant::now() + Duration::from_secs(10);
        while token_file.exists() {
            assert!(
                Instant::now() < deadline,
                "{} still there after the node joined",
                token_file.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let list = c.control("GET", "/join-tokens").send_within(T).await;
        assert_eq!(list.status, 200, "{}", text(&list));
        let list = list.json();
        // A used token stays listed (`used: true`); the manager revoked this one: not listed.
        assert!(
            !list["value"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["pool"] == "sb"),
            "the node's join token is still listed: {list}"
        );
        let hosts = c.control("GET", "/hosts").send_within(T).await;
        assert_eq!(hosts.status, 200, "{}", text(&hosts));
        assert_eq!(
            hosts.json()["value"].as_array().map(Vec::len),
            Some(1),
            "the node's agent joined as a host: {}",
            text(&hosts)
        );
        eprintln!("node {nodes:?} joined; tokens {list}");

        // Every account the node has is refused before anything reaches the node; those the
        // service's own list of system names does not hold (`postgres`, …) because the node
        // has them: "reserved on this node".
        let accounts = accounts_of(&data, &machine);
        assert!(
            accounts.iter().any(|a| a == "sshd" || a == "daemon"),
            "{accounts:?}"
        );
        let mut by_the_node = Vec::new();
        for name in &accounts {
            let r = c
                .req("POST", &format!("/pools/sb/nodes/{}/users", nodes[0].0))
                .json(&serde_json::json!({"name": name, "password": "Api-pw-1234"}))
                .send_within(T)
                .await;
            assert_eq!(r.status, 400, "{name}: {}", text(&r));
            assert_eq!(r.code(), "InvalidPropertyValue", "{name}: {}", text(&r));
            let body = text(&r);
            if body.contains("reserved on this node") {
                by_the_node.push(name.clone());
            } else {
                assert!(
                    body.contains("system account of the node"),
                    "{name}: {body}"
                );
            }
        }
        assert!(
            !by_the_node.is_empty(),
            "no account of the node was refused as reserved on it: {accounts:?}"
        );
        eprintln!("reserved on the node: {by_the_node:?}");

        // Windows, and Linux asking for embedded: embedded nodes, no machine of their own.
        for (pool, os, meta) in [("win", "windows", None), ("emb", "linux", Some("embedded"))] {
            let r = c
                .req("POST", "/pools")
                .json(&pool_of(pool, os, meta))
                .send_within(T)
                .await;
            assert_eq!(r.status, 201, "{pool}: {}", text(&r));
            let n = idle_nodes(&c, pool, 1, &data).await;
            // An embedded node's own address is its pool's made-up one, not a veth's.
            let ip: std::net::Ipv4Addr = n[0].1.parse().unwrap();
            let [a, b, ..] = ip.octets();
            assert!(!(a == 198 && b & 0xfe == 18), "{pool}: {n:?}");
            assert_eq!(remote_login_ip(&c, pool, &n[0].0).await, "127.0.0.1");
            let dirs = machine_dirs(&data);
            assert_eq!(dirs, [machine.as_str()], "{pool} made no machine");
        }

        // A Windows pool asking for sandboxed nodes: refused, naming metadata.
        let r = c
            .req("POST", "/pools")
            .json(&pool_of("winsb", "windows", Some("sandbox")))
            .send_within(T)
            .await;
        assert_eq!(r.status, 400, "{}", text(&r));
        assert_eq!(r.code(), "InvalidPropertyValue", "{}", text(&r));
        assert_eq!(r.value("PropertyName").as_deref(), Some("metadata"));
        let r = c.req("GET", "/pools/winsb").send_within(T).await;
        assert_eq!(r.status, 404, "nothing stored: {}", text(&r));
        server.stop();

        // Without --nodes sandbox, the value sandbox is refused.
        let plain = Server::launch(&["--in-memory"]);
        let c = plain.client();
        let r = c
            .req("POST", "/pools")
            .json(&pool_of("sb", "linux", Some("sandbox")))
            .send_within(T)
            .await;
        assert_eq!(r.status, 400, "{}", text(&r));
        assert_eq!(r.code(), "InvalidPropertyValue", "{}", text(&r));
        assert_eq!(r.value("PropertyName").as_deref(), Some("metadata"));
    })
    .await
}
