//! Sandboxed nodes end to end: `bluebatch serve --nodes sandbox` gives each Linux node a small
//! Linux machine of its own (network, mount and PID namespaces, an address of 198.19.0.0/16, a
//! real OpenSSH sshd on port 22, the linux provider applying the node's accounts to the node's
//! private `/etc`). Everything is checked from outside, the way a user sees it: the Batch API,
//! the real OpenSSH client (`ssh`, `sshpass`, `ssh-keyscan`) to the node's remote login address,
//! and this machine's `ip -o link`, `/proc` and mount table for what is left after tear-down.
//! This machine's own accounts and `/etc` are never touched (root only; a loud skip otherwise, a
//! failure under CI).

mod common;

use common::replicas::add_pool;
use common::sandboxed::{self, machine_dirs, machine_logs, scratch, serve};
use common::*;
use serde_json::{Value, json};
use sha2::Digest;
use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use time::OffsetDateTime;

/// Every request of these tests.
const T: Duration = Duration::from_secs(30);
/// How long what a machine was may take to be gone after its pool was deleted (Get Pool 404)
/// or its serve was killed.
const GONE: Duration = Duration::from_secs(15);

/// The suites that run machines take it shared; the refusal suite takes it alone, so that a
/// veth appearing while it runs can only be the refused serve's.
static MACHINES: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

// ---------------------------------------------------------------------------------------------
// Prerequisites.

/// Root, the OpenSSH client and sshpass, and what a sandboxed node needs of this machine.
fn prerequisites() -> bool {
    if !require_root("sandboxed nodes (network, mount and PID namespaces)") || !have_ssh_client() {
        return false;
    }
    let tools = [
        "/usr/sbin/sshd",
        "/usr/bin/sudo",
        "/usr/sbin/visudo",
        "/usr/bin/unshare",
        "/usr/bin/setpriv",
        "/usr/sbin/useradd",
    ];
    let ip = Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    require(
        cfg!(target_os = "linux") && ip && tools.iter().all(|t| Path::new(t).exists()),
        "Linux with openssh-server (/usr/sbin/sshd), sudo, iproute2 (ip), util-linux (unshare, \
         setpriv) and passwd (apt-get install openssh-server sudo iproute2 util-linux passwd)",
    )
}

// ---------------------------------------------------------------------------------------------
// A serve with sandboxed nodes.

/// A node of a pool as the API shows it, with its remote login address.
#[derive(Debug, Clone)]
struct Node {
    id: String,
    ip: String,
}

/// A serve with sandboxed nodes (`extra` arguments) on a data directory of its own, whose
/// machines' logs a panic shows. Bind all four, in this order: the serve drops first, then the
/// logs are shown, then the directory goes.
fn serve_logged(extra: &[&str]) -> (tempfile::TempDir, PathBuf, Logs, Server) {
    let tmp = scratch("sandbox-nodes-");
    let data = tmp.path().join("data");
    let logs = Logs(data.clone());
    let server = serve(&data, extra);
    (tmp, data, logs, server)
}

/// On a panic, the logs of every machine of `data` (init, sshd, agent), for the message.
struct Logs(PathBuf);

impl Drop for Logs {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- machine logs of {} ---\n{}",
                self.0.display(),
                machine_logs(&self.0)
            );
        }
    }
}

/// The nodes of `pool` once there are `n` and all are idle (at most [`sandboxed::READY`]).
async fn idle_nodes(c: &Client, pool: &str, n: usize, data: &Path) -> Vec<Node> {
    sandboxed::idle_nodes(c, pool, n, data)
        .await
        .into_iter()
        .map(|(id, ip)| Node { id, ip })
        .collect()
}

/// The node `node` of `pool` (Get Node, 200).
async fn get_node(c: &Client, pool: &str, node: &str) -> Value {
    let r = c
        .req("GET", &format!("/pools/{pool}/nodes/{node}"))
        .send_within(T)
        .await;
    assert_eq!(r.status, 200, "{}", text(&r));
    r.json()
}

/// Waits (at most 60 s) until `node` of `pool` is idle again.
async fn wait_idle(c: &Client, pool: &str, node: &str, data: &Path) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = get_node(c, pool, node).await;
        if v["state"] == "idle" {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{node} not idle again within 60 s: {v}\n{}",
            machine_logs(data)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Checks a node's address and remote login settings: in 198.19.0.0/16, port 22, an OpenSSH
/// server answering there from this machine.
async fn check_address(c: &Client, pool: &str, node: &Node) {
    let ip: Ipv4Addr = node
        .ip
        .parse()
        .unwrap_or_else(|_| panic!("{}: ipAddress {:?} is an IPv4 address", node.id, node.ip));
    assert_eq!(
        &ip.octets()[..2],
        &[198, 19],
        "{}: ipAddress {ip} is in 198.19.0.0/16",
        node.id
    );
    let r = c
        .req(
            "GET",
            &format!("/pools/{pool}/nodes/{}/remoteloginsettings", node.id),
        )
        .send_within(T)
        .await;
    assert_eq!(r.status, 200, "{}", text(&r));
    let v = r.json();
    assert_eq!(v["remoteLoginIPAddress"], node.ip, "{v}");
    assert_eq!(v["remoteLoginPort"], 22, "{v}");
    let banner = ssh_banner(&node.ip);
    assert!(
        banner.starts_with("SSH-2.0-OpenSSH_"),
        "{}: a real OpenSSH sshd answers on {}:22, got {banner:?}",
        node.id,
        node.ip
    );
}

/// Waits (at most `limit`) until this host routes `ip` through a `bbs*` link that is up and
/// an SSH server answers on `ip:22`.
async fn routed_and_answering(ip: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let out = sandbox::run_bounded(
            Command::new("ip").args(["-o", "route", "get", ip]),
            "ip route get",
        );
        let route = String::from_utf8_lossy(&out.stdout).into_owned();
        let dev = route
            .split_whitespace()
            .skip_while(|w| *w != "dev")
            .nth(1)
            .unwrap_or_default()
            .to_string();
        if dev.starts_with("bbs")
            && links().lines().any(|l| {
                l.split(": ")
                    .nth(1)
                    .is_some_and(|n| n.split('@').next() == Some(dev.as_str()))
                    && l.contains(",UP,LOWER_UP>")
            })
        {
            let addr = format!("{ip}:22").parse().unwrap();
            if let Ok(s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                use std::io::Read;
                s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                let mut buf = [0u8; 8];
                if (&s).read_exact(&mut buf).is_ok() && &buf == b"SSH-2.0-" {
                    return;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "{ip}: not routed to a node's veth with an sshd answering within {limit:?} (route: {route})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The first line an SSH server sends on `ip:22` (at most 10 s).
fn ssh_banner(ip: &str) -> String {
    use std::io::{BufRead, BufReader};
    let addr = format!("{ip}:22").parse().unwrap();
    let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{ip}:22 is not reachable from this host: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut line = String::new();
    let _ = BufReader::new(s).read_line(&mut line);
    line.trim().to_string()
}

// ---------------------------------------------------------------------------------------------
// The real OpenSSH client against a node's address.

enum Auth<'a> {
    Password(&'a str),
    Key(&'a Path),
}

fn ssh_base() -> Vec<String> {
    [
        "-F",
        "/dev/null",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=INFO",
        "-o",
        "ConnectTimeout=10",
        "-o",
        "NumberOfPasswordPrompts=1",
        "-p",
        "22",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// `ssh USER@IP` with `auth` only (a password through sshpass and its environment, never in
/// arguments; or one key file), `extra` options, running `cmd`.
fn ssh_command(
    ip: &str,
    user: &str,
    auth: &Auth,
    extra: &[&str],
    cmd: &str,
) -> tokio::process::Command {
    let mut c = match auth {
        Auth::Password(pw) => {
            let mut c = tokio::process::Command::new("sshpass");
            c.arg("-e")
                .env("SSHPASS", pw)
                .arg("ssh")
                .args(ssh_base())
                .args([
                    "-o",
                    "PreferredAuthentications=password,keyboard-interactive",
                    "-o",
                    "PubkeyAuthentication=no",
                ]);
            c
        }
        Auth::Key(k) => {
            let mut c = tokio::process::Command::new("ssh");
            c.args(ssh_base())
                .args([
                    "-o",
                    "BatchMode=yes",
                    "-o",
                    "IdentitiesOnly=yes",
                    "-o",
                    "PreferredAuthentications=publickey",
                    "-o",
                    "PasswordAuthentication=no",
                    "-i",
                ])
                .arg(k);
            c
        }
    };
    c.args(extra).arg(format!("{user}@{ip}")).arg(cmd);
    c
}

/// One login attempt: accepted (the command's status and stdout), refused by sshd, or no SSH
/// conversation at all (which a check of refusal must not take for one).
async fn ssh_x(ip: &str, user: &str, auth: Auth<'_>, extra: &[&str], cmd: &str) -> SshOutcome {
    sandbox::outcome(ssh_command(ip, user, &auth, extra, cmd)).await
}

async fn ssh(ip: &str, user: &str, auth: Auth<'_>, cmd: &str) -> SshOutcome {
    ssh_x(ip, user, auth, &[], cmd).await
}

/// The stdout of `cmd` run as `user` (it must log in and exit 0).
async fn run_as(ip: &str, user: &str, auth: Auth<'_>, cmd: &str) -> String {
    let o = ssh(ip, user, auth, cmd).await;
    o.stdout(&format!("{user}@{ip}: {cmd}")).to_string()
}

/// A session that stays open (a key login running `sleep`); returns once it printed `open`.
/// The local `ssh` is killed on drop.
async fn open_session(ip: &str, user: &str, key: &Path) -> tokio::process::Child {
    use tokio::io::AsyncBufReadExt;
    let mut c = ssh_command(
        ip,
        user,
        &Auth::Key(key),
        &["-o", "ServerAliveInterval=2", "-o", "ServerAliveCountMax=3"],
        "echo open; exec sleep 300",
    );
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let mut child = c.spawn().expect("running ssh");
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let first = within(
        Duration::from_secs(20),
        "a session to open",
        lines.next_line(),
    )
    .await
    .unwrap();
    assert_eq!(
        first.as_deref(),
        Some("open"),
        "{user}@{ip}: the session opens"
    );
    // Keep draining (nothing more is printed).
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    child
}

/// Waits (at most 30 s) for an open session to end, naming `why`.
async fn session_ends(mut s: tokio::process::Child, why: &str) {
    within(Duration::from_secs(30), why, s.wait())
        .await
        .unwrap();
}

/// The node's ed25519 host key (ssh-keyscan, at most 20 s); never empty.
async fn host_key(ip: &str) -> String {
    let mut c = tokio::process::Command::new("ssh-keyscan");
    c.args(["-T", "10", "-t", "ed25519", "-p", "22", ip])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let out = within(SSH_DEADLINE, &format!("ssh-keyscan {ip}"), c.output())
        .await
        .expect("running ssh-keyscan");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let key = text
        .lines()
        .find(|l| l.contains("ssh-ed25519"))
        .and_then(|l| l.split_whitespace().last())
        .unwrap_or_default()
        .to_string();
    assert!(!key.is_empty(), "no host key read from {ip}:22: {text:?}");
    key
}

/// Polls `cond` (at most `limit`) until it holds, naming `what` otherwise.
async fn eventually<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if cond().await {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `eve` (password `Eve-pw-1`, expiring within 8 days) logs in at `ip`; once the service's clock
/// advanced 8 days she is refused (at most 45 s), the node answering all along.
async fn eve_refused_once_expired(c: &Client, ip: &str, what: &str) {
    assert!(
        ssh(ip, "eve", Auth::Password("Eve-pw-1"), "true")
            .await
            .accepted()
    );
    let r = c
        .control("POST", "/clock/advance")
        .json(&json!({"by": "8d"}))
        .send_within(T)
        .await;
    assert_eq!(r.status, 200, "{}", text(&r));
    eventually(Duration::from_secs(45), what, || async move {
        let o = ssh(ip, "eve", Auth::Password("Eve-pw-1"), "true").await;
        assert!(
            !matches!(o, SshOutcome::Unreachable(_)),
            "the node must answer: {o:?}"
        );
        o == SshOutcome::Refused
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Users through the Batch API.

fn users(pool: &str, node: &str) -> String {
    format!("/pools/{pool}/nodes/{node}/users")
}

async fn add(c: &Client, pool: &str, node: &str, body: Value) -> Resp {
    c.req("POST", &users(pool, node))
        .query(&format!("api-version={V}&timeout=20"))
        .json(&body)
        .send_within(T)
        .await
}

async fn update(c: &Client, pool: &str, node: &str, user: &str, body: Value) -> Resp {
    c.req("PUT", &format!("{}/{user}", users(pool, node)))
        .query(&format!("api-version={V}&timeout=20"))
        .json(&body)
        .send_within(T)
        .await
}

async fn delete(c: &Client, pool: &str, node: &str, user: &str) -> Resp {
    c.req("DELETE", &format!("{}/{user}", users(pool, node)))
        .query(&format!("api-version={V}&timeout=20"))
        .send_within(T)
        .await
}

fn iso(t: OffsetDateTime) -> String {
    bluebatch_core::timefmt::iso(t)
}

// ---------------------------------------------------------------------------------------------
// What this machine shows of the machines.

/// `ip -o link` of this machine.
fn links() -> String {
    let out = sandbox::run_bounded(Command::new("ip").args(["-o", "link"]), "ip -o link");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The names of this machine's `bbs*` links (veths of sandboxed nodes, of any serve).
fn bbs_links() -> BTreeSet<String> {
    links()
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap().to_string())
        .filter(|n| n.starts_with("bbs"))
        .collect()
}

/// The interface of this machine holding `addr` (IPv4), if any.
fn link_with_address(addr: &str) -> Option<String> {
    let out = sandbox::run_bounded(
        Command::new("ip").args(["-o", "-4", "addr", "show"]),
        "ip -o -4 addr show",
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains(&format!("inet {addr}/")))
        .and_then(|l| l.split_whitespace().nth(1))
        .map(str::to_string)
}

/// The host side of a node's veth: the address before the node's (its /30's first).
fn host_side(node_ip: &str) -> String {
    let ip: Ipv4Addr = node_ip.parse().unwrap();
    Ipv4Addr::from(u32::from(ip) - 1).to_string()
}

fn pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

fn ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Every descendant of `root` (children, their children, …).
fn descendants(root: u32) -> Vec<u32> {
    let all: Vec<(u32, u32)> = pids()
        .into_iter()
        .filter_map(|p| Some((p, ppid(p)?)))
        .collect();
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        for (p, pp) in &all {
            if *pp == parent && !found.contains(p) {
                found.push(*p);
            }
        }
        i += 1;
    }
    found.remove(0);
    found
}

fn ns_of(pid: u32, ns: &str) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/ns/{ns}"))
        .ok()
        .map(|p| p.display().to_string())
}

/// What a serve's machines are on this machine: the namespaces (net, mnt, pid) their processes
/// live in that are not this machine's, the host sides of their veths.
#[derive(Debug)]
struct Footprint {
    namespaces: BTreeSet<String>,
    veths: Vec<String>,
    host_ips: Vec<String>,
    whole: bool,
}

/// `ip:port` as /proc/net/tcp writes a local address (IPv4, host byte order on little-endian).
fn proc_net_addr(ip: &str, port: u16) -> String {
    let o = ip.parse::<Ipv4Addr>().unwrap().octets();
    format!(
        "{:02X}{:02X}{:02X}{:02X}:{port:04X}",
        o[3], o[2], o[1], o[0]
    )
}

/// The ports listening (TCP) on `ip` in the network namespace of process `pid`.
fn listening_ports(pid: u32, ip: &str) -> Vec<u16> {
    let o = ip.parse::<Ipv4Addr>().unwrap().octets();
    let want = format!("{:02X}{:02X}{:02X}{:02X}:", o[3], o[2], o[1], o[0]);
    std::fs::read_to_string(format!("/proc/{pid}/net/tcp"))
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local = f.get(1)?;
            (f.get(3) == Some(&"0A") && local.starts_with(&want))
                .then(|| u16::from_str_radix(&local[want.len()..], 16).ok())
                .flatten()
        })
        .collect()
}

/// Reads the footprint of the machines of the nodes `nodes` of the serve `serve_pid`: the
/// namespaces of its descendants whose network listens on a node's address, port 22 (each
/// node's own, none this machine's), and each node's veth on this machine (a `bbs*` link
/// holding the host side of its /30). `whole`: these are all of the serve's nodes (then what
/// names the data directory counts too).
fn footprint(serve_pid: u32, nodes: &[Node], whole: bool) -> Footprint {
    let mine: BTreeSet<String> = ["net", "mnt", "pid"]
        .iter()
        .filter_map(|ns| ns_of(std::process::id(), ns))
        .collect();
    let mut namespaces = BTreeSet::new();
    let mut nets = BTreeSet::new();
    let procs = descendants(serve_pid);
    let mut veths = Vec::new();
    let mut host_ips = Vec::new();
    for n in nodes {
        let sshd = proc_net_addr(&n.ip, 22);
        let of_node: Vec<u32> = procs
            .iter()
            .copied()
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/net/tcp"))
                    .unwrap_or_default()
                    .lines()
                    .any(|l| l.split_whitespace().nth(1) == Some(sshd.as_str()))
            })
            .collect();
        assert!(
            !of_node.is_empty(),
            "{}: no process of the serve listens on {}:22 in its network namespace",
            n.id,
            n.ip
        );
        let mut net = BTreeSet::new();
        for p in &of_node {
            for ns in ["net", "mnt", "pid"] {
                // `unshare` itself stays in this machine's PID namespace (only its child is
                // in the node's); a namespace of this machine is none of the node's.
                if let Some(x) = ns_of(*p, ns)
                    && !mine.contains(&x)
                {
                    if ns == "net" {
                        net.insert(x.clone());
                    }
                    namespaces.insert(x);
                }
            }
        }
        assert_eq!(net.len(), 1, "{}: one network namespace: {net:?}", n.id);
        assert!(
            nets.insert(net.into_iter().next().unwrap()),
            "{}: a network namespace of its own",
            n.id
        );
        let h = host_side(&n.ip);
        let veth = link_with_address(&h)
            .unwrap_or_else(|| panic!("{}: no interface here holds the host side {h}", n.id));
        assert!(
            veth.starts_with("bbs"),
            "{}: the host side of the node's veth is a bbs* link: {veth}",
            n.id
        );
        veths.push(veth.split('@').next().unwrap().to_string());
        host_ips.push(h);
    }
    Footprint {
        namespaces,
        veths,
        host_ips,
        whole,
    }
}

/// What of `fp` (and of the data directory `data`) is still there: processes in its
/// namespaces, processes naming the data directory, its veths and host addresses, mounts under
/// the data directory (the serve `serve_pid` itself, which names it, aside). Empty when nothing
/// is left.
fn leftovers(fp: &Footprint, data: &Path, serve_pid: Option<u32>) -> Vec<String> {
    let mut left = Vec::new();
    let data_s = data.display().to_string();
    for p in pids() {
        if p == std::process::id() || Some(p) == serve_pid {
            continue;
        }
        for ns in ["net", "mnt", "pid"] {
            if let Some(n) = ns_of(p, ns)
                && fp.namespaces.contains(&n)
            {
                left.push(format!("process {p} ({}) in {n}", comm(p)));
            }
        }
        let cmdline = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let cwd = std::fs::read_link(format!("/proc/{p}/cwd"))
            .map(|c| c.display().to_string())
            .unwrap_or_default();
        if fp.whole && (cmdline.contains(&data_s) || cwd.starts_with(&data_s)) {
            left.push(format!("process {p}: {cmdline} (cwd {cwd})"));
        }
    }
    let links = bbs_links();
    for v in &fp.veths {
        if links.contains(v) || links.contains(&format!("{v}p")) {
            left.push(format!("veth {v}"));
        }
    }
    for h in &fp.host_ips {
        if let Some(l) = link_with_address(h) {
            left.push(format!("address {h} on {l}"));
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for m in mounts.lines().filter(|l| fp.whole && l.contains(&data_s)) {
        left.push(format!("mount {m}"));
    }
    // A namespace kept by a bind mount (a named netns) outlives its processes.
    for m in mounts
        .lines()
        .filter(|l| fp.namespaces.iter().any(|n| l.contains(n.as_str())))
    {
        left.push(format!("namespace mount {m}"));
    }
    for e in std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
    {
        use std::os::unix::fs::MetadataExt;
        if let Ok(md) = std::fs::metadata(e.path())
            && fp.namespaces.contains(&format!("net:[{}]", md.ino()))
        {
            left.push(format!("named network namespace {}", e.path().display()));
        }
    }
    left
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Waits (at most [`GONE`]) until nothing of `fp` is left, naming `after`.
async fn nothing_left(fp: &Footprint, data: &Path, serve_pid: Option<u32>, after: &str) {
    let start = Instant::now();
    loop {
        let left = leftovers(fp, data, serve_pid);
        if left.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < GONE,
            "{after}: still there after {GONE:?}:\n{}",
            left.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Deletes `pool` (202) and waits (at most 60 s) until Get Pool answers 404 PoolNotFound.
async fn delete_pool(c: &Client, pool: &str) {
    let r = c
        .req("DELETE", &format!("/pools/{pool}"))
        .send_within(T)
        .await;
    assert_eq!(r.status, 202, "{}", text(&r));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = c.req("GET", &format!("/pools/{pool}")).send_within(T).await;
        if r.status == 404 {
            assert_eq!(r.code(), "PoolNotFound", "{}", text(&r));
            return;
        }
        assert_eq!(r.status, 200, "{}", text(&r));
        assert!(
            Instant::now() < deadline,
            "{pool} still there 60 s after Delete Pool: {}",
            text(&r)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn digest(path: &str) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// This machine's account files, hashed.
fn host_accounts() -> Vec<(String, String)> {
    ["/etc/passwd", "/etc/shadow", "/etc/group", "/etc/gshadow"]
        .iter()
        .filter(|p| Path::new(p).exists())
        .map(|p| (p.to_string(), digest(p)))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The tests.

/// A pool of two sandboxed nodes: real addresses and remote login settings; Add User gives a
/// real account (`whoami`, `id`, `$HOME`, `sudo -n` for an admin only, a tty with `ssh -t`); one
/// node's `/tmp` and homes are invisible from the other, the server's data directory and its
/// API port from both; Update User, expiry (the service clock) and Delete reach the logins; this
/// machine's account files never change; each node has a host key of its own and a read-only
/// `/usr`; the agents' listener on each veth serves no Batch API; Delete Pool leaves nothing
/// (veths, processes, namespaces, mounts, machine directories).
#[tokio::test(flavor = "multi_thread")]
async fn sandboxed_nodes_are_machines_with_real_accounts() {
    if !prerequisites() {
        return;
    }
    let _shared = MACHINES.read().await;
    let host_before = host_accounts();
    let (_tmp, data, _logs, server) = serve_logged(&[]);
    let c = server.client();
    // A file of the server's own, which no node may see.
    let marker = data.join("server-only-marker");
    std::fs::write(&marker, "the server's").unwrap();
    let api_port = server
        .url
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .to_string();

    add_pool(&c, "p", 2).await;
    let nodes = idle_nodes(&c, "p", 2, &data).await;
    assert_ne!(
        nodes[0].ip, nodes[1].ip,
        "each node has an address of its own"
    );
    for n in &nodes {
        check_address(&c, "p", n).await;
    }
    let fp = footprint(server.child.id(), &nodes, true);
    let (a, b) = (&nodes[0], &nodes[1]);

    // The agents reach the service on the host side of their veth, where only the node
    // protocol is served; the Batch API stays on loopback.
    let r = c.req("GET", "/pools").send_within(T).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    for n in &nodes {
        let h = host_side(&n.ip);
        let ports = listening_ports(std::process::id(), &h);
        assert!(
            !ports.is_empty(),
            "{}: the service listens on the host side {h} for the node's agent",
            n.id
        );
        assert!(
            !ports.contains(&api_port.parse().unwrap()),
            "the Batch API port is not served on {h}"
        );
        for port in ports {
            let side = Client::new(&format!("http://{h}:{port}"), ACCOUNT, KEY);
            let r = side.req("GET", "/pools").send_within(T).await;
            assert_eq!(r.status, 404, "GET /pools on {h}:{port}: {}", text(&r));
            assert_eq!(r.code(), "ResourceNotFound", "{}", text(&r));
        }
    }
    // Each node has a host key of its own, never this machine's.
    let (ka, kb) = (host_key(&a.ip).await, host_key(&b.ip).await);
    assert_ne!(ka, kb, "each node has a host key of its own");
    if let Ok(own) = std::fs::read_to_string("/etc/ssh/ssh_host_ed25519_key.pub") {
        let own = own
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_string();
        assert!(
            own != ka && own != kb,
            "a node never holds this machine's host key"
        );
    }

    let keys = tempfile::tempdir().unwrap();
    let (k1, pub1) = keypair(keys.path(), "ann1");
    let (k2, pub2) = keypair(keys.path(), "ann2");
    // ann: an admin with a password and a key; bob: a plain user with a password, on both nodes.
    let r = add(
        &c,
        "p",
        &a.id,
        json!({"name": "ann", "password": "Ann-pw-1",
        "sshPublicKey": pub1, "isAdmin": true}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", text(&r));
    let r = add(
        &c,
        "p",
        &a.id,
        json!({"name": "bob", "password": "Bob-pw-1", "isAdmin": false}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", text(&r));
    let r = add(
        &c,
        "p",
        &b.id,
        json!({"name": "bob", "password": "Bob-pw-B"}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", text(&r));

    // Who a user is on the node.
    let probe = "whoami; echo $HOME; id -u; id -g; id -Gn; getent passwd $(whoami) | cut -d: -f3,6; \
                 if sudo -n true 2>/dev/null; then echo sudo-yes; else echo sudo-no; fi; hostname";
    let ann = run_as(&a.ip, "ann", Auth::Key(&k1), probe).await;
    let l: Vec<&str> = ann.lines().collect();
    assert_eq!(l.len(), 8, "{ann}");
    assert_eq!(l[0], "ann", "whoami: {ann}");
    assert_eq!(l[1], "/home/ann", "$HOME: {ann}");
    let uid: u32 = l[2].parse().unwrap();
    assert_ne!(uid, 0, "ann is not root: {ann}");
    assert_eq!(
        l[5],
        format!("{uid}:/home/ann"),
        "id -u is the node's passwd uid: {ann}"
    );
    assert!(
        l[4].split_whitespace().any(|g| g == "bluebatch-admin"),
        "an admin is in the admin group: {ann}"
    );
    assert_eq!(
        l[6], "sudo-yes",
        "an admin runs sudo -n without a password: {ann}"
    );
    let root = run_as(&a.ip, "ann", Auth::Password("Ann-pw-1"), "sudo -n id -u").await;
    assert_eq!(root.trim(), "0", "an admin's sudo is the node's root");
    let bob = run_as(&a.ip, "bob", Auth::Password("Bob-pw-1"), probe).await;
    let l: Vec<&str> = bob.lines().collect();
    assert_eq!(l.len(), 8, "{bob}");
    assert_eq!((l[0], l[1]), ("bob", "/home/bob"), "{bob}");
    let bob_uid: u32 = l[2].parse().unwrap();
    assert!(
        bob_uid != 0 && bob_uid != uid,
        "bob's uid is his own: {bob}"
    );
    assert_eq!(l[5], format!("{bob_uid}:/home/bob"), "{bob}");
    assert!(
        !l[4].split_whitespace().any(|g| g == "bluebatch-admin"),
        "a non-admin is not in the admin group: {bob}"
    );
    assert_eq!(l[6], "sudo-no", "a non-admin's sudo -n is refused: {bob}");
    let host_a = l[7].to_string();
    // The host's /usr is read-only in a node, even to its root.
    let usr = run_as(
        &a.ip,
        "ann",
        Auth::Key(&k1),
        "if sudo -n touch /usr/bb-sandbox-probe 2>/dev/null; then echo usr-rw; else echo usr-ro; fi",
    )
    .await;
    assert_eq!(usr.trim(), "usr-ro", "a node's /usr is read-only");
    assert!(!Path::new("/usr/bb-sandbox-probe").exists());
    // ssh -t gets a terminal.
    let tty = ssh_x(&a.ip, "ann", Auth::Key(&k1), &["-tt"], "tty").await;
    let tty = tty.stdout("ssh -tt ann@A tty");
    assert!(
        tty.trim().starts_with("/dev/pts/"),
        "ssh -t gets a pty: {tty:?}"
    );

    // Isolation: bob's files on A are not on B (same name, another machine).
    run_as(
        &a.ip,
        "bob",
        Auth::Password("Bob-pw-1"),
        "echo a > /tmp/bb-iso-tmp && echo a > ~/bb-iso-home && test -e /tmp/bb-iso-tmp",
    )
    .await;
    let seen = run_as(
        &b.ip,
        "bob",
        Auth::Password("Bob-pw-B"),
        "echo $HOME; for f in /tmp/bb-iso-tmp /home/bob/bb-iso-home; do \
         if test -e $f; then echo seen; else echo unseen; fi; done; hostname",
    )
    .await;
    let l: Vec<&str> = seen.lines().collect();
    assert_eq!(
        &l[..3],
        &["/home/bob", "unseen", "unseen"],
        "node A's /tmp and /home are not node B's: {seen}"
    );
    assert_ne!(l[3], host_a, "each node has a hostname of its own");
    // Node A does not know B's bob's password, nor B A's.
    assert_eq!(
        ssh(&b.ip, "bob", Auth::Password("Bob-pw-1"), "true").await,
        SshOutcome::Refused,
        "A's password is not B's"
    );
    // This machine's own users (UID 1000..60000, e.g. a developer's account) are no node's.
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let human = passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        let uid: u32 = f.get(2)?.parse().ok()?;
        ((1000..60000).contains(&uid) && f[0].chars().all(|c| c.is_ascii_alphanumeric()))
            .then(|| f[0].to_string())
    });
    if let Some(name) = human {
        let out = run_as(
            &b.ip,
            "bob",
            Auth::Password("Bob-pw-B"),
            &format!("getent passwd {name}; echo rc=$?"),
        )
        .await;
        assert_eq!(
            out.trim(),
            "rc=2",
            "this machine's user {name} is not a node's: {out}"
        );
    }

    // The server's data directory and its API are invisible from a node, even to its root.
    let d = data.display();
    let m = marker.display();
    let inside = run_as(
        &a.ip,
        "ann",
        Auth::Key(&k1),
        &format!(
            "for p in {m} {d} {d}/sandbox; do if sudo -n test -e $p; then echo seen; else echo unseen; fi; done; \
             if sudo -n ls {d} >/dev/null 2>&1; then echo listed; else echo unlisted; fi; \
             for h in 127.0.0.1 {hs}; do if timeout 3 bash -c 'echo > /dev/tcp/'$h'/{api_port}' 2>/dev/null; \
             then echo api-open; else echo api-closed; fi; done; \
             pgrep -fc 'bluebatch serv[e]' || true",
            hs = host_side(&a.ip)
        ),
    )
    .await;
    assert_eq!(
        inside.lines().collect::<Vec<_>>(),
        [
            "unseen",
            "unseen",
            "unseen",
            "unlisted",
            "api-closed",
            "api-closed",
            "0"
        ],
        "the server's data directory ({d}), its Batch API port and its process are invisible \
         from a node"
    );

    // Update User: the old password is refused, the new one taken; a key replaced.
    let r = update(&c, "p", &a.id, "bob", json!({"password": "Bob-pw-2"})).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(
        ssh(&a.ip, "bob", Auth::Password("Bob-pw-1"), "true").await,
        SshOutcome::Refused,
        "bob's old password after Update User"
    );
    assert!(
        ssh(&a.ip, "bob", Auth::Password("Bob-pw-2"), "true")
            .await
            .accepted()
    );
    let r = update(
        &c,
        "p",
        &a.id,
        "ann",
        json!({"password": "Ann-pw-1", "sshPublicKey": pub2}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(
        ssh(&a.ip, "ann", Auth::Key(&k1), "true").await,
        SshOutcome::Refused,
        "ann's replaced key"
    );
    assert_eq!(
        run_as(&a.ip, "ann", Auth::Key(&k2), "whoami").await.trim(),
        "ann"
    );

    // Delete ends ann's open session and removes the account.
    let session = open_session(&a.ip, "ann", &k2).await;
    let r = delete(&c, "p", &a.id, "ann").await;
    assert_eq!(r.status, 200, "{}", text(&r));
    session_ends(session, "Delete User to end the open session").await;
    let gone = ssh(
        &a.ip,
        "bob",
        Auth::Password("Bob-pw-2"),
        "getent passwd ann; echo rc=$?; test -e /home/ann && echo home || echo nohome",
    )
    .await;
    assert_eq!(
        gone.stdout("bob@A getent").lines().collect::<Vec<_>>(),
        ["rc=2", "nohome"],
        "ann's account and home are gone from the node"
    );
    assert_eq!(
        ssh(&a.ip, "ann", Auth::Key(&k2), "true").await,
        SshOutcome::Refused,
        "a deleted user's key"
    );

    // Expiry: the service clock moved past eve's expiry refuses her login.
    let expiry = OffsetDateTime::now_utc() + time::Duration::days(2);
    let r = add(
        &c,
        "p",
        &b.id,
        json!({"name": "eve", "password": "Eve-pw-1",
        "expiryTime": iso(expiry)}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", text(&r));
    eve_refused_once_expired(&c, &b.ip, "eve refused once her expiry passed").await;

    assert_eq!(
        host_accounts(),
        host_before,
        "this machine's account files never change"
    );

    // Delete Pool: nothing of the machines is left.
    delete_pool(&c, "p").await;
    nothing_left(
        &fp,
        &data,
        Some(server.child.id()),
        "after Delete Pool (Get Pool 404)",
    )
    .await;
    eventually(GONE, "DATA/sandbox empty after Delete Pool", || {
        let left = machine_dirs(&data);
        async move { left.is_empty() }
    })
    .await;
    assert_eq!(
        host_accounts(),
        host_before,
        "this machine's account files never change"
    );
}

/// Reboot ends an open session and keeps accounts and host key; reimage ends a session too and
/// gives a new host key, no accounts and a fresh home; a serve killed with SIGKILL leaves no
/// process, veth or mount (only the machines' directories), and a serve started again on the
/// data directory brings the same nodes back, with their logins; Remove Nodes tears down that
/// node's machine only; Delete Pool ends a session and then leaves nothing.
#[tokio::test(flavor = "multi_thread")]
async fn sandboxed_nodes_reboot_reimage_and_outlive_no_serve() {
    if !prerequisites() {
        return;
    }
    let _shared = MACHINES.read().await;
    let (_tmp, data, _logs, mut server) = serve_logged(&[]);
    let c = server.client();
    add_pool(&c, "q", 2).await;
    let nodes = idle_nodes(&c, "q", 2, &data).await;
    for n in &nodes {
        check_address(&c, "q", n).await;
    }
    let (a, b) = (&nodes[0], &nodes[1]);
    let keys = tempfile::tempdir().unwrap();
    let (k, public) = keypair(keys.path(), "kim");
    let r = add(
        &c,
        "q",
        &a.id,
        json!({"name": "kim", "password": "Kim-pw-1",
        "sshPublicKey": public}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", text(&r));
    let r = add(
        &c,
        "q",
        &b.id,
        json!({"name": "lee", "password": "Lee-pw-1"}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", text(&r));
    let uid = run_as(
        &a.ip,
        "kim",
        Auth::Key(&k),
        "echo x > ~/bb-before-reimage; id -u",
    )
    .await;

    // Reboot: the open session ends, the account and host key stay.
    let key_before = host_key(&a.ip).await;
    let session = open_session(&a.ip, "kim", &k).await;
    let r = c
        .req("POST", &format!("/pools/q/nodes/{}/reboot", a.id))
        .json(&json!({}))
        .send_within(T)
        .await;
    assert_eq!(r.status, 202, "{}", text(&r));
    session_ends(session, "reboot to end the open session").await;
    wait_idle(&c, "q", &a.id, &data).await;
    let (aip, kp) = (a.ip.as_str(), k.as_path());
    eventually(
        Duration::from_secs(30),
        "kim logs in after the reboot",
        || async move { ssh(aip, "kim", Auth::Key(kp), "true").await.accepted() },
    )
    .await;
    assert_eq!(
        run_as(&a.ip, "kim", Auth::Key(&k), "id -u").await,
        uid,
        "the account is kept"
    );
    assert_eq!(
        host_key(&a.ip).await,
        key_before,
        "a reboot keeps the host key"
    );

    // Reimage: the open session ends, a new host key, no accounts.
    let session = open_session(&a.ip, "kim", &k).await;
    let r = c
        .req("POST", &format!("/pools/q/nodes/{}/reimage", a.id))
        .json(&json!({}))
        .send_within(T)
        .await;
    assert_eq!(r.status, 202, "{}", text(&r));
    session_ends(session, "reimage to end the open session").await;
    let (cr, aid, kb) = (&c, a.id.as_str(), key_before.as_str());
    eventually(
        Duration::from_secs(60),
        "reimage to end in idle with a new host key",
        || async move {
            let idle = get_node(cr, "q", aid).await["state"] == "idle";
            idle && host_key_maybe(aip).await.is_some_and(|h| h != kb)
        },
    )
    .await;
    assert_eq!(
        ssh(&a.ip, "kim", Auth::Password("Kim-pw-1"), "true").await,
        SshOutcome::Refused,
        "a reimaged node has no accounts"
    );
    let r = update(&c, "q", &a.id, "kim", json!({"password": "Kim-pw-9"})).await;
    assert_eq!(r.status, 404, "{}", text(&r));
    let r = add(
        &c,
        "q",
        &a.id,
        json!({"name": "kim", "password": "Kim-pw-2", "sshPublicKey": public}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", text(&r));
    let home = run_as(
        &a.ip,
        "kim",
        Auth::Password("Kim-pw-2"),
        "if test -e ~/bb-before-reimage; then echo old; else echo fresh; fi",
    )
    .await;
    assert_eq!(
        home.trim(),
        "fresh",
        "a reimaged node's home is a fresh one"
    );

    // SIGKILL the serve: its machines go with it (the lifeline), their directories stay.
    let fp = footprint(server.child.id(), &nodes, true);
    let dirs = machine_dirs(&data);
    assert_eq!(dirs.len(), 2, "one directory per machine: {dirs:?}");
    server.kill();
    nothing_left(&fp, &data, None, "after SIGKILL of serve").await;
    let mut after = machine_dirs(&data);
    after.sort();
    let mut before = dirs.clone();
    before.sort();
    assert_eq!(after, before, "a killed serve's machine directories stay");

    // A serve started again on the data directory brings the nodes back, with their accounts.
    let server = serve(&data, &[]);
    let c = server.client();
    let back = idle_nodes(&c, "q", 2, &data).await;
    let ids: Vec<&str> = back.iter().map(|n| n.id.as_str()).collect();
    assert_eq!(
        ids,
        [a.id.as_str(), b.id.as_str()],
        "the same nodes come back"
    );
    for n in &back {
        // serve answers only once the machines of its last run are back: a node listed idle
        // is routed through its veth and its sshd answers at once (no packet to a 198.19
        // address may take the default route).
        routed_and_answering(&n.ip, Duration::ZERO).await;
        check_address(&c, "q", n).await;
    }
    let (a2, b2) = (&back[0], &back[1]);
    let a2ip = a2.ip.as_str();
    eventually(
        Duration::from_secs(30),
        "kim logs in to the node brought back",
        || async move {
            ssh(a2ip, "kim", Auth::Password("Kim-pw-2"), "true")
                .await
                .accepted()
        },
    )
    .await;
    assert_eq!(
        run_as(&b2.ip, "lee", Auth::Password("Lee-pw-1"), "whoami")
            .await
            .trim(),
        "lee"
    );

    // Remove Nodes: the removed node's machine goes, the other stays.
    let fp_b = footprint(server.child.id(), std::slice::from_ref(b2), false);
    let r = c
        .req("POST", "/pools/q/removenodes")
        .json(&json!({"nodeList": [b2.id]}))
        .send_within(T)
        .await;
    assert_eq!(r.status, 202, "{}", text(&r));
    let (cr, b2id) = (&c, b2.id.as_str());
    eventually(
        Duration::from_secs(60),
        "the removed node gone (404)",
        || async move {
            let r = cr
                .req("GET", &format!("/pools/q/nodes/{b2id}"))
                .send_within(T)
                .await;
            r.status == 404
        },
    )
    .await;
    nothing_left(
        &fp_b,
        &data,
        Some(server.child.id()),
        "after Remove Nodes (Get Node 404)",
    )
    .await;
    eventually(
        GONE,
        "one machine directory left after Remove Nodes",
        || {
            let n = machine_dirs(&data).len();
            async move { n == 1 }
        },
    )
    .await;
    let r = c.req("GET", "/pools/q/nodes").send_within(T).await;
    let v = r.json();
    let left: Vec<&str> = v["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    assert_eq!(left, [a2.id.as_str()], "the other node stays: {v}");
    assert!(
        ssh(&a2.ip, "kim", Auth::Password("Kim-pw-2"), "true")
            .await
            .accepted(),
        "the other node's logins stay"
    );

    let fp = footprint(server.child.id(), std::slice::from_ref(a2), true);
    let session = open_session(&a2.ip, "kim", &k).await;
    delete_pool(&c, "q").await;
    session_ends(session, "Delete Pool to end an open session").await;
    nothing_left(
        &fp,
        &data,
        Some(server.child.id()),
        "after Delete Pool (Get Pool 404)",
    )
    .await;
    eventually(GONE, "DATA/sandbox empty after Delete Pool", || {
        let left = machine_dirs(&data);
        async move { left.is_empty() }
    })
    .await;
}

/// [`host_key`] that answers None instead of failing (a node restarting its sshd).
async fn host_key_maybe(ip: &str) -> Option<String> {
    let mut c = tokio::process::Command::new("ssh-keyscan");
    c.args(["-T", "5", "-t", "ed25519", "-p", "22", ip])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(10), c.output())
        .await
        .ok()?
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains("ssh-ed25519"))
        .and_then(|l| l.split_whitespace().last())
        .map(str::to_string)
}

/// The `bbs*` veths made since `before` whose two ends both stay on this host (for 3 s): a
/// pair no machine took (other serves' machines on this host hold one end each, and a pair
/// being made moves its peer within moments).
fn half_made_veths(before: &BTreeSet<String>) -> Vec<String> {
    let mut stuck: Vec<String> = Vec::new();
    for round in 0..4 {
        let now = bbs_links();
        let pairs: Vec<String> = now
            .iter()
            .filter(|l| !before.contains(*l) && !l.ends_with('p'))
            .filter(|l| now.contains(&format!("{l}p")))
            .cloned()
            .collect();
        if round > 0 {
            stuck.retain(|l| pairs.contains(l));
        } else {
            stuck = pairs;
        }
        if stuck.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    stuck
}

/// `bluebatch serve --nodes sandbox` run with `wrap` (e.g. setpriv) before it and `extra` after;
/// (exit code, stderr) once it exited (at most 30 s: a serve that starts is a failure).
fn refused_serve(wrap: &[&str], data: &Path, extra: &[&str]) -> (i32, String) {
    let exe = env!("CARGO_BIN_EXE_bluebatch");
    let mut cmd = if wrap.is_empty() {
        Command::new(exe)
    } else {
        let mut c = Command::new(wrap[0]);
        c.args(&wrap[1..]).arg(exe);
        c
    };
    cmd.args(["serve", "--port", "0", "--nodes", "sandbox", "--data-dir"])
        .arg(data)
        .args(extra)
        .env("BLUEBATCH_LOG", "warn")
        .env_remove("BLUEBATCH_NODES")
        .env_remove("BLUEBATCH_ACCOUNTS")
        .env_remove("BLUEBATCH_ACCOUNTS_FILE")
        .current_dir("/");
    let out = sandbox::run_bounded(&mut cmd, "a refused serve --nodes sandbox");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Without root, or without sshd, `serve --nodes sandbox` refuses to start (exit 2) naming what
/// is missing, and leaves nothing: no data directory, no veth, no machine directory.
#[tokio::test(flavor = "multi_thread")]
async fn sandboxed_nodes_refuse_without_root_or_sshd() {
    if !running_as_root() {
        // Not root: this user's own serve is the non-root case.
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data-user");
        let (code, stderr) = refused_serve(&[], &data, &[]);
        assert_eq!(
            code, 2,
            "a non-root serve --nodes sandbox exits 2: {stderr}"
        );
        assert!(stderr.contains("root"), "the refusal names root: {stderr}");
        assert!(!data.exists(), "no data directory made by a refused serve");
    }
    if !prerequisites() {
        return;
    }
    let _alone = MACHINES.write().await;
    let tmp = scratch("sandbox-nodes-");
    // A directory the unprivileged user may write, the data directory not yet made in it.
    std::os::unix::fs::chown(tmp.path(), Some(65534), Some(65534)).unwrap();
    let links_before = bbs_links();

    let data = tmp.path().join("data-nobody");
    let (code, stderr) = refused_serve(
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ],
        &data,
        &[],
    );
    assert_eq!(
        code, 2,
        "a non-root serve --nodes sandbox exits 2: {stderr}"
    );
    assert!(stderr.contains("root"), "the refusal names root: {stderr}");
    assert!(!data.exists(), "no data directory made by a refused serve");

    let data = tmp.path().join("data-nosshd");
    let (code, stderr) = refused_serve(&[], &data, &["--sandbox-sshd", "/nonexistent/sshd"]);
    assert_eq!(
        code, 2,
        "serve --sandbox-sshd /nonexistent/sshd exits 2: {stderr}"
    );
    assert!(
        stderr.contains("/nonexistent/sshd"),
        "the refusal names the missing sshd: {stderr}"
    );
    assert!(!data.exists(), "no data directory made by a refused serve");
    assert!(machine_dirs(&data).is_empty());
    assert!(
        half_made_veths(&links_before).is_empty(),
        "a refused serve makes no veth: {:?}",
        half_made_veths(&links_before)
    );
}

/// `bluebatch serve` given SIGTERM: it must exit 0 within 20 s.
fn terminate(server: &mut Server) {
    // SAFETY: kill(2) of the serve this test started.
    unsafe {
        libc::kill(server.child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(st) = server.child.try_wait().unwrap() {
            assert!(st.success(), "serve after SIGTERM: {st}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "serve did not exit within 20 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `--sandbox-use-pam no`: the node's sshd runs without PAM, and expiry (shadow's, the day
/// before PAM's) still refuses a login once the service clock passed it. A SIGTERMed serve
/// stops its machines: nothing is left but their directories.
#[tokio::test(flavor = "multi_thread")]
async fn sandboxed_nodes_without_pam_keep_expiry_and_stop_with_serve() {
    if !prerequisites() {
        return;
    }
    let _shared = MACHINES.read().await;
    let (_tmp, data, _logs, mut server) = serve_logged(&["--sandbox-use-pam", "no"]);
    let c = server.client();
    add_pool(&c, "r", 1).await;
    let nodes = idle_nodes(&c, "r", 1, &data).await;
    let n = &nodes[0];
    check_address(&c, "r", n).await;
    let r = c.req("GET", "/pools/r").send_within(T).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    let v = r.json();
    assert_eq!(v["allocationState"], "steady", "{v}");
    assert_eq!(v["currentDedicatedNodes"], 1, "{v}");

    let expiry = OffsetDateTime::now_utc() + time::Duration::days(2);
    let far = OffsetDateTime::now_utc() + time::Duration::days(30);
    let r = add(
        &c,
        "r",
        &n.id,
        json!({"name": "eve", "password": "Eve-pw-1",
        "expiryTime": iso(expiry)}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", text(&r));
    let r = add(
        &c,
        "r",
        &n.id,
        json!({"name": "root2", "password": "Root2-pw-1",
        "isAdmin": true, "expiryTime": iso(far)}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", text(&r));
    let pam = run_as(
        &n.ip,
        "root2",
        Auth::Password("Root2-pw-1"),
        "sudo -n /usr/sbin/sshd -T | grep -i '^usepam '",
    )
    .await;
    assert_eq!(pam.trim(), "usepam no", "the node's sshd runs without PAM");
    eve_refused_once_expired(&c, &n.ip, "eve refused once her expiry passed (UsePAM no)").await;
    assert!(
        ssh(&n.ip, "root2", Auth::Password("Root2-pw-1"), "true")
            .await
            .accepted(),
        "a user whose expiry is still ahead logs in"
    );

    // SIGTERM: the machines stop with the serve; their directories stay for the next start.
    let fp = footprint(server.child.id(), &nodes, true);
    let dirs = machine_dirs(&data);
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    terminate(&mut server);
    nothing_left(&fp, &data, None, "after SIGTERM of serve").await;
    assert_eq!(
        machine_dirs(&data),
        dirs,
        "a stopped serve's machine directories stay"
    );
}

/// Delete Pool while its machines are still starting: once Get Pool answers 404, nothing of
/// them is left (no process of the serve's, none naming the data directory, no machine
/// directory, no veth pair left on this host), and the serve still gives the next pool working
/// nodes.
#[tokio::test(flavor = "multi_thread")]
async fn sandboxed_nodes_deleted_while_starting_leave_nothing() {
    if !prerequisites() {
        return;
    }
    let _shared = MACHINES.read().await;
    let (_tmp, data, _logs, server) = serve_logged(&[]);
    let c = server.client();
    let links_before = bbs_links();
    add_pool(&c, "s", 2).await;
    // Let the machines get under way (a directory made), then delete the pool.
    let d = data.clone();
    eventually(Duration::from_secs(30), "a machine directory made", || {
        let n = machine_dirs(&d).len();
        async move { n > 0 }
    })
    .await;
    delete_pool(&c, "s").await;
    let serve_pid = server.child.id();
    let data_s = data.display().to_string();
    eventually(
        Duration::from_secs(30),
        "the starting machines gone after Delete Pool (Get Pool 404)",
        || {
            let kids = descendants(serve_pid);
            let naming: Vec<u32> = pids()
                .into_iter()
                .filter(|p| *p != serve_pid && *p != std::process::id())
                .filter(|p| {
                    String::from_utf8_lossy(
                        &std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default(),
                    )
                    .contains(&data_s)
                })
                .collect();
            let dirs = machine_dirs(&data);
            let done = kids.is_empty() && naming.is_empty() && dirs.is_empty();
            if !done {
                eprintln!("still there: children {kids:?}, naming {naming:?}, dirs {dirs:?}");
            }
            async move { done }
        },
    )
    .await;
    assert!(
        half_made_veths(&links_before).is_empty(),
        "no veth pair left: {:?}",
        half_made_veths(&links_before)
    );

    // The next pool gets working nodes.
    add_pool(&c, "s2", 1).await;
    let nodes = idle_nodes(&c, "s2", 1, &data).await;
    check_address(&c, "s2", &nodes[0]).await;
    let r = add(
        &c,
        "s2",
        &nodes[0].id,
        json!({"name": "ivy", "password": "Ivy-pw-1"}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", text(&r));
    assert_eq!(
        run_as(&nodes[0].ip, "ivy", Auth::Password("Ivy-pw-1"), "whoami")
            .await
            .trim(),
        "ivy"
    );
    let fp = footprint(serve_pid, &nodes, true);
    delete_pool(&c, "s2").await;
    nothing_left(
        &fp,
        &data,
        Some(serve_pid),
        "after Delete Pool (Get Pool 404)",
    )
    .await;
}
