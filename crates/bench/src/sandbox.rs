//! The cost of sandboxed nodes (`bluebatch serve --nodes sandbox`, root only), against the
//! embedded nodes of the same server measured in the same run.
//!
//! For each kind, one pool of N Linux nodes (default 50) on a fresh server:
//! - start-up: from Add Pool until every node is `idle` in List Nodes AND answers an SSH banner
//!   (sandbox: the node's own sshd on `ipAddress:22`; embedded: the node's endpoint from Get
//!   Remote Login Settings); each node's own ready time is the moment its banner first came, so
//!   the p50 and the max of those are shown with the total and the total / N;
//! - memory: the growth of the server's RSS, and for sandboxed nodes the PSS
//!   (`/proc/PID/smaps_rollup`) of every process of the machines (the server's descendants, which
//!   live in the nodes' PID namespaces, plus the `unshare` parent of each), per node;
//! - teardown: from Delete Pool until Get Pool answers 404 and, for sandboxed nodes, no process of
//!   the nodes' PID namespaces, none of their veths and no mount of the data directory is left.
//!
//! Ratios are sandbox / embedded.

use crate::load::{Conn, Spec};
use crate::server::Server;
use crate::sign::Signer;
use crate::{Report, Settings, V, launch, median, pool_body, wait_pool};
use hyper::Method;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long N nodes may take to come up (each kind) before the run fails.
const READY_LIMIT: Duration = Duration::from_secs(600);
/// How long the teardown may take before the run fails.
const TEARDOWN_LIMIT: Duration = Duration::from_secs(120);
const POOL: &str = "sbx";
/// The server's log filter in the sandbox run: warnings, and the manager's lines per machine.
const MANAGER_LOG: &str = "warn,bluebatch::sandbox::manager=info";

/// What one run (one kind of node) measured.
struct Run {
    /// Add Pool → every node idle and answering a banner.
    total: Duration,
    /// Each node's own ready time since Add Pool, sorted.
    ready: Vec<Duration>,
    /// Server RSS before the pool and once it is up, kB.
    rss0: u64,
    rss1: u64,
    /// The machines' processes (sandbox only).
    machines: Option<Machines>,
    /// `MemAvailable` before the pool and once it is up, kB (whole machine: noisy).
    avail0: u64,
    avail1: u64,
    /// Delete Pool → 404 (and, for sandboxed nodes, nothing left).
    teardown: Duration,
    /// Delete Pool → Get Pool 404 only.
    teardown_api: Duration,
    /// A banner seen (the first node's).
    banner: String,
    /// Server spawn → first 200.
    startup: Duration,
    /// Per machine, from the server's log (sandbox only): start (veth, listener, token, init,
    /// sshd answering) and then the agent's join, ms, each sorted.
    machine_start_ms: Vec<f64>,
    machine_join_ms: Vec<f64>,
}

#[derive(Default)]
struct Machines {
    /// PID namespaces (inode numbers) other than the server's, among its descendants.
    namespaces: BTreeSet<u64>,
    /// Processes in those namespaces, and their PSS, kB.
    inside: usize,
    inside_pss: u64,
    /// The server's other descendants (`unshare` parents), and their PSS, kB.
    outside: usize,
    outside_pss: u64,
    /// Process count by command name, inside the nodes.
    by_comm: BTreeMap<String, (usize, u64)>,
    /// The nodes' files under DATA/sandbox, kB allocated.
    disk_kb: u64,
}

pub async fn measure(s: &Settings, rep: &mut Report) -> Result<(), String> {
    let n = s.sandbox_nodes;
    println!(
        "\n== sandboxed nodes: {n} Linux nodes, start-up, memory and teardown \
         (baseline: the same pool of embedded nodes) =="
    );
    if !is_root() {
        println!(
            "  skipped: `serve --nodes sandbox` needs root (network, mount and PID namespaces, \
             veths); run the bench as root to measure it"
        );
        return Ok(());
    }
    let step: Vec<String> = ["--node-step-ms", "5"].map(String::from).to_vec();
    let mut sbx_args = vec!["--nodes".to_string(), "sandbox".to_string()];
    sbx_args.extend(step.iter().cloned());
    let mut emb_args = vec!["--nodes".to_string(), "embedded".to_string()];
    emb_args.extend(step.iter().cloned());

    // The sandbox first: if it cannot run here, nothing else is worth doing.
    let sbx_dir = s.work.join("sandbox-nodes");
    let mut l = launch(s, &sbx_dir, &sbx_args);
    // The manager's own account of each machine: how long it took to start, then to join.
    l.log_filter = Some(MANAGER_LOG);
    let sbx = match Server::try_spawn(&l).await {
        Ok(srv) => srv,
        Err(e) if e.exit_code == Some(2) => {
            println!(
                "  skipped: `serve --nodes sandbox` refused to start here:\n{}",
                indent(e.message.trim())
            );
            return Ok(());
        }
        Err(e) => return Err(format!("serve --nodes sandbox: {}", e.message)),
    };
    let sbx_run = one_run(&sbx, &sbx_dir, n, true).await;
    sbx.stop().await;
    let sbx_run = sbx_run?;
    let left = leftovers(
        sbx_run
            .machines
            .as_ref()
            .map(|m| &m.namespaces)
            .unwrap_or(&BTreeSet::new()),
        &sbx_dir,
    );
    if !left.is_empty() {
        rep.errors.push(format!(
            "after Delete Pool and the server's stop, sandboxed nodes left: {}",
            left.join("; ")
        ));
    }

    let emb_dir = s.work.join("sandbox-baseline");
    let emb = Server::spawn(&launch(s, &emb_dir, &emb_args)).await?;
    let emb_run = one_run(&emb, &emb_dir, n, false).await;
    emb.stop().await;
    let emb_run = emb_run?;

    show(&sbx_run, &emb_run, n, s, rep);
    Ok(())
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn show(sbx: &Run, emb: &Run, n: u32, s: &Settings, rep: &mut Report) {
    let nf = f64::from(n);
    let p = |r: &Run, q: f64| -> f64 {
        let v: Vec<f64> = r.ready.iter().map(|d| d.as_secs_f64()).collect();
        if q >= 1.0 {
            v.last().copied().unwrap_or(f64::NAN)
        } else {
            median(v)
        }
    };
    let none = Machines::default();
    let m = sbx.machines.as_ref().unwrap_or(&none);
    let serve_growth = |r: &Run| r.rss1.saturating_sub(r.rss0) as f64 / nf;
    let sbx_serve = serve_growth(sbx);
    let emb_serve = serve_growth(emb);
    let machine_kb = (m.inside_pss + m.outside_pss) as f64 / nf;
    let sbx_total_kb = machine_kb + sbx_serve;
    let avail = |r: &Run| r.avail0.saturating_sub(r.avail1) as f64 / nf;
    println!(
        "server: spawn → first 200 {:.1} ms with --nodes sandbox (preflight included), {:.1} ms embedded",
        secs(sbx.startup) * 1000.0,
        secs(emb.startup) * 1000.0
    );
    println!(
        "{:<46} {:>12} {:>12} {:>10}",
        "", "sandbox", "embedded", "ratio"
    );
    let line = |what: &str, a: f64, b: f64, unit: &str| {
        let prec = if unit == "kB" { 0 } else { 3 };
        println!(
            "{:<46} {:>9.prec$} {unit:<2} {:>9.prec$} {unit:<2} {:>10}",
            what,
            a,
            b,
            if a > 0.0 && b > 0.0 {
                format!("{:.1}", a / b)
            } else {
                "-".into()
            }
        );
    };
    line(
        &format!("Add Pool → all {n} idle + SSH banner"),
        secs(sbx.total),
        secs(emb.total),
        "s",
    );
    line(
        "  per node (total / N)",
        secs(sbx.total) / nf,
        secs(emb.total) / nf,
        "s",
    );
    line(
        "  a node's own ready time, p50",
        p(sbx, 0.5),
        p(emb, 0.5),
        "s",
    );
    line(
        "  a node's own ready time, max",
        p(sbx, 1.0),
        p(emb, 1.0),
        "s",
    );
    let pm = |v: &[f64], q: f64| -> String {
        if v.is_empty() {
            return "-".into();
        }
        let i = ((v.len() - 1) as f64 * q).round() as usize;
        format!("{:.0}", v[i.min(v.len() - 1)])
    };
    println!(
        "  a machine's own start (veth, listener, token, init, sshd answering): p50 {} ms, max {} ms; \
         then its agent's join: p50 {} ms, max {} ms ({} machines in the server's log)",
        pm(&sbx.machine_start_ms, 0.5),
        pm(&sbx.machine_start_ms, 1.0),
        pm(&sbx.machine_join_ms, 0.5),
        pm(&sbx.machine_join_ms, 1.0),
        sbx.machine_start_ms.len()
    );
    line(
        "memory per node: server RSS growth",
        sbx_serve,
        emb_serve,
        "kB",
    );
    line(
        "memory per node: machine PSS + server growth",
        sbx_total_kb,
        emb_serve,
        "kB",
    );
    line(
        "MemAvailable drop per node (noisy: any process)",
        avail(sbx),
        avail(emb),
        "kB",
    );
    line(
        "Delete Pool → 404 and nothing left",
        secs(sbx.teardown),
        secs(emb.teardown),
        "s",
    );
    println!(
        "  (sandbox: Delete Pool → 404 in {:.3} s; the rest is the machines' teardown)",
        secs(sbx.teardown_api)
    );
    println!(
        "machines: {} PID namespaces; {} processes inside ({:.1} MB PSS), {} outside (unshare, \
         {:.1} MB PSS): {:.2} MB per node; files under DATA/sandbox {:.1} MB ({:.0} kB per node)",
        m.namespaces.len(),
        m.inside,
        m.inside_pss as f64 / 1024.0,
        m.outside,
        m.outside_pss as f64 / 1024.0,
        machine_kb / 1024.0,
        m.disk_kb as f64 / 1024.0,
        m.disk_kb as f64 / nf
    );
    let comms: Vec<String> = m
        .by_comm
        .iter()
        .map(|(c, (k, pss))| format!("{c} ×{k} {:.0} kB", *pss as f64 / *k as f64))
        .collect();
    println!(
        "  inside a node, by command (count, PSS each): {}",
        comms.join(", ")
    );
    println!("  banner of a sandboxed node: {}", sbx.banner);
    println!("  banner of an embedded node: {}", emb.banner);
    if !s.quick && n < 50 {
        println!("  (fewer than 50 nodes: the issue's figure is for --sandbox-nodes 50)");
    }
    if m.namespaces.len() != n as usize {
        rep.errors.push(format!(
            "{n} sandboxed nodes up but {} PID namespaces found among the server's processes",
            m.namespaces.len()
        ));
    }
    if !sbx.banner.starts_with("SSH-2.0-OpenSSH") {
        rep.errors.push(format!(
            "a sandboxed node's port 22 answered {:?}, not OpenSSH",
            sbx.banner
        ));
    }
}

/// Add Pool of `n` Linux nodes, wait until each is ready, measure, Delete Pool, wait until gone.
async fn one_run(srv: &Server, dir: &Path, n: u32, sandbox: bool) -> Result<Run, String> {
    let startup = srv.first_answer().await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let signer = Arc::new(Signer::new(&srv.account, &srv.key)?);
    let mut c = Conn::connect(srv.addr, signer.clone()).await?;
    let rss0 = srv.rss_kb();
    let avail0 = mem_available_kb();
    let t0 = Instant::now();
    c.expect(
        &Spec::with(
            Method::POST,
            format!("/pools?api-version={V}"),
            pool_body(POOL, true, n),
        ),
        201,
    )
    .await?;
    let (ready, banner, ips) = wait_ready(&mut c, srv.addr, n, t0, sandbox).await?;
    let total = t0.elapsed();
    wait_pool(&mut c, POOL, n, Duration::from_secs(60)).await?;
    // Let the agents' first polls and the server's background writes settle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss1 = srv.rss_kb();
    let avail1 = mem_available_kb();
    let machines = sandbox.then(|| machines(srv.pid, dir));
    let veths = if sandbox { our_veths(&ips) } else { Vec::new() };
    if sandbox && veths.len() != n as usize {
        return Err(format!(
            "{n} sandboxed nodes up but {} host-side veths carry their /30s",
            veths.len()
        ));
    }

    let t1 = Instant::now();
    c.expect(
        &Spec::with(
            Method::DELETE,
            format!("/pools/{POOL}?api-version={V}"),
            bytes::Bytes::new(),
        ),
        202,
    )
    .await?;
    let deadline = t1 + TEARDOWN_LIMIT;
    let mut teardown_api = None;
    let namespaces = machines
        .as_ref()
        .map(|m| m.namespaces.clone())
        .unwrap_or_default();
    loop {
        if teardown_api.is_none() {
            let a = c
                .send(&Spec::get(format!("/pools/{POOL}?api-version={V}")))
                .await?;
            if a.status == 404 {
                teardown_api = Some(t1.elapsed());
            }
        }
        let left = if teardown_api.is_some() && sandbox {
            let mut left = leftovers(&namespaces, dir);
            left.extend(
                veths
                    .iter()
                    .filter(|v| Path::new("/sys/class/net").join(v).exists())
                    .map(|v| format!("veth {v}")),
            );
            left
        } else {
            Vec::new()
        };
        if let Some(api) = teardown_api
            && left.is_empty()
        {
            let (machine_start_ms, machine_join_ms) = if sandbox {
                manager_times(&srv.log)
            } else {
                (Vec::new(), Vec::new())
            };
            return Ok(Run {
                machine_start_ms,
                machine_join_ms,
                total,
                ready,
                rss0,
                rss1,
                machines,
                avail0,
                avail1,
                teardown: t1.elapsed(),
                teardown_api: api,
                banner,
                startup,
            });
        }
        if Instant::now() > deadline {
            return Err(format!(
                "Delete Pool not finished within {TEARDOWN_LIMIT:?}: {}",
                if teardown_api.is_none() {
                    "Get Pool still answers".to_string()
                } else {
                    format!("left behind: {}", left.join("; "))
                }
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls List Nodes; each node seen `idle` gets a task that knocks on its SSH address until a
/// banner comes. Returns every node's ready time (sorted), the first banner, the nodes' IPs.
async fn wait_ready(
    c: &mut Conn,
    api: SocketAddr,
    n: u32,
    t0: Instant,
    sandbox: bool,
) -> Result<(Vec<Duration>, String, Vec<Ipv4Addr>), String> {
    let (tx, mut rx) =
        tokio::sync::mpsc::unbounded_channel::<(String, Result<(Duration, String), String>)>();
    let deadline = t0 + READY_LIMIT;
    let mut probing: HashMap<String, Ipv4Addr> = HashMap::new();
    let mut ready: HashMap<String, Duration> = HashMap::new();
    let mut banner = String::new();
    while ready.len() < n as usize {
        let a = c
            .expect(
                &Spec::get(format!(
                    "/pools/{POOL}/nodes?api-version={V}&maxresults=1000&%24select=id,state,ipAddress"
                )),
                200,
            )
            .await?;
        let v: serde_json::Value = serde_json::from_slice(&a.body).map_err(|e| e.to_string())?;
        let mut states: BTreeMap<String, u32> = BTreeMap::new();
        for node in v["value"].as_array().ok_or("List Nodes: no value array")? {
            let id = node["id"].as_str().unwrap_or_default().to_string();
            let state = node["state"].as_str().unwrap_or_default();
            *states.entry(state.to_string()).or_default() += 1;
            if matches!(state, "unusable" | "starttaskfailed" | "unknown") {
                return Err(format!("node {id} went {state}: {node}"));
            }
            if state != "idle" || probing.contains_key(&id) {
                continue;
            }
            let ip: Ipv4Addr = node["ipAddress"]
                .as_str()
                .unwrap_or_default()
                .parse()
                .map_err(|_| format!("node {id}: ipAddress {}", node["ipAddress"]))?;
            let target = if sandbox {
                SocketAddr::from((ip, 22))
            } else {
                remote_login(c, &id).await?
            };
            probing.insert(id.clone(), ip);
            let tx = tx.clone();
            tokio::spawn(async move {
                let r = knock_until(target, deadline)
                    .await
                    .map(|b| (t0.elapsed(), b))
                    .map_err(|e| format!("{target}: {e}"));
                let _ = tx.send((id, r));
            });
        }
        let last_states = format!("{states:?}");
        while let Ok((id, r)) = rx.try_recv() {
            let (at, b) = r.map_err(|e| format!("node {id}: no SSH banner: {e}"))?;
            if banner.is_empty() {
                banner = b;
            }
            ready.insert(id, at);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{} of {n} nodes ready after {READY_LIMIT:?} (states {last_states}; api {api})",
                ready.len()
            ));
        }
        if ready.len() < n as usize {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut times: Vec<Duration> = ready.into_values().collect();
    times.sort();
    Ok((times, banner, probing.into_values().collect()))
}

/// `started_in_ms` and `joined_in_ms` of the manager's lines in the server's log, each sorted.
fn manager_times(log: &Path) -> (Vec<f64>, Vec<f64>) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let field = |line: &str, key: &str| -> Option<f64> {
        let at = line.find(key)? + key.len();
        let rest = &line[at..];
        let end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        rest[..end].parse().ok()
    };
    let (mut start, mut join) = (Vec::new(), Vec::new());
    for l in text.lines() {
        if l.contains("sandboxed node started") {
            start.extend(field(l, "started_in_ms="));
        } else if l.contains("sandboxed node joined") {
            join.extend(field(l, "joined_in_ms="));
        }
    }
    start.sort_by(f64::total_cmp);
    join.sort_by(f64::total_cmp);
    (start, join)
}

/// Get Remote Login Settings of a node: where its SSH endpoint is.
async fn remote_login(c: &mut Conn, node: &str) -> Result<SocketAddr, String> {
    let a = c
        .expect(
            &Spec::get(format!(
                "/pools/{POOL}/nodes/{node}/remoteloginsettings?api-version={V}"
            )),
            200,
        )
        .await?;
    let v: serde_json::Value = serde_json::from_slice(&a.body).map_err(|e| e.to_string())?;
    let ip: Ipv4Addr = v["remoteLoginIPAddress"]
        .as_str()
        .unwrap_or_default()
        .parse()
        .map_err(|_| format!("remote login settings of {node}: {v}"))?;
    let port = v["remoteLoginPort"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .ok_or_else(|| format!("remote login settings of {node}: {v}"))?;
    Ok(SocketAddr::from((ip, port)))
}

/// Connects to `addr` and reads the SSH identification line, retrying until `deadline`.
async fn knock_until(addr: SocketAddr, deadline: Instant) -> Result<String, String> {
    loop {
        let last = match tokio::time::timeout(Duration::from_secs(2), banner_once(addr)).await {
            Ok(Ok(b)) => return Ok(b),
            Ok(Err(e)) => e,
            Err(_) => "no banner within 2 s".to_string(),
        };
        if Instant::now() > deadline {
            return Err(last);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn banner_once(addr: SocketAddr) -> Result<String, String> {
    use tokio::io::AsyncReadExt;
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') && buf.len() < 1024 {
        let k = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if k == 0 {
            return Err("closed before a banner".into());
        }
        buf.extend_from_slice(&chunk[..k]);
    }
    let line = String::from_utf8_lossy(&buf);
    let line = line
        .lines()
        .find(|l| l.starts_with("SSH-"))
        .unwrap_or_default();
    if line.is_empty() {
        Err(format!(
            "not an SSH banner: {:?}",
            String::from_utf8_lossy(&buf)
        ))
    } else {
        Ok(line.trim_end().to_string())
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

fn mem_available_kb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// The inode of a process's PID namespace.
fn pid_ns(pid: u32) -> Option<u64> {
    let l = std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok()?;
    let s = l.to_string_lossy();
    s.strip_prefix("pid:[")?.strip_suffix(']')?.parse().ok()
}

/// Every process: (pid, parent pid, command name).
fn processes() -> Vec<(u32, u32, String)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_string();
        let ppid = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        out.push((pid, ppid, comm));
    }
    out
}

fn pss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Pss:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// The server's descendants, split by PID namespace, with their PSS.
fn machines(serve: u32, dir: &Path) -> Machines {
    let procs = processes();
    let mut children: HashMap<u32, Vec<(u32, String)>> = HashMap::new();
    for (pid, ppid, comm) in &procs {
        children
            .entry(*ppid)
            .or_default()
            .push((*pid, comm.clone()));
    }
    let own = pid_ns(serve);
    let mut m = Machines::default();
    let mut stack = vec![serve];
    while let Some(p) = stack.pop() {
        for (c, comm) in children.get(&p).into_iter().flatten() {
            stack.push(*c);
            let pss = pss_kb(*c);
            let ns = pid_ns(*c);
            if ns.is_some() && ns != own {
                m.namespaces.insert(ns.unwrap_or_default());
                m.inside += 1;
                m.inside_pss += pss;
                let e = m.by_comm.entry(role(*c, comm)).or_default();
                e.0 += 1;
                e.1 += pss;
            } else {
                m.outside += 1;
                m.outside_pss += pss;
            }
        }
    }
    m.disk_kb = disk_kb(&dir.join("sandbox"));
    m
}

/// What a process of a node is: its command name, or for the bluebatch binary its subcommand
/// (`bluebatch sandbox-init`, `bluebatch agent`).
fn role(pid: u32, comm: &str) -> String {
    if comm != "bluebatch" {
        return comm.to_string();
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    match cmdline.split(|b| *b == 0).nth(1) {
        Some(sub) if !sub.is_empty() => format!("bluebatch {}", String::from_utf8_lossy(sub)),
        _ => comm.to_string(),
    }
}

/// Allocated size of everything under `dir`, kB (no symlinks followed).
fn disk_kb(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(md) = e.path().symlink_metadata() else {
                continue;
            };
            total += md.blocks() / 2;
            if md.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
}

/// The host-side veths of these nodes: a node at `.2` of its /30 has the host side at `.1`.
fn our_veths(node_ips: &[Ipv4Addr]) -> Vec<String> {
    let want: BTreeSet<Ipv4Addr> = node_ips
        .iter()
        .map(|ip| Ipv4Addr::from(u32::from(*ip).wrapping_sub(1)))
        .collect();
    let out = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output();
    let Ok(out) = out else {
        return Vec::new();
    };
    let mut veths = Vec::new();
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        // "7: bbs12    inet 198.19.0.49/30 scope global bbs12 ..."
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 4 || f[2] != "inet" {
            continue;
        }
        let Some(addr) = f[3].split('/').next().and_then(|a| a.parse().ok()) else {
            continue;
        };
        if want.contains(&addr) {
            veths.push(f[1].split('@').next().unwrap_or_default().to_string());
        }
    }
    veths
}

/// What is left of the machines: processes of their PID namespaces, their directories under
/// DATA/sandbox, mounts of the data directory.
fn leftovers(namespaces: &BTreeSet<u64>, dir: &Path) -> Vec<String> {
    let mut left = Vec::new();
    if !namespaces.is_empty() {
        let procs: Vec<String> = processes()
            .into_iter()
            .filter(|(pid, _, _)| pid_ns(*pid).is_some_and(|ns| namespaces.contains(&ns)))
            .map(|(pid, _, comm)| format!("process {pid} ({comm})"))
            .collect();
        left.extend(procs);
    }
    if let Ok(rd) = std::fs::read_dir(dir.join("sandbox")) {
        for e in rd.flatten() {
            left.push(format!("files {}", e.path().display()));
        }
    }
    let d = dir.to_string_lossy().to_string();
    if let Ok(mi) = std::fs::read_to_string("/proc/self/mountinfo") {
        for l in mi.lines() {
            if let Some(mp) = l.split_whitespace().nth(4)
                && mp.starts_with(d.as_str())
            {
                left.push(format!("mount {mp}"));
            }
        }
    }
    left
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manager_lines_give_each_machines_start_and_join_times() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serve.log");
        std::fs::write(
            &log,
            "2026-12-01T18:41:26.663461Z  INFO bluebatch::sandbox::manager: sandboxed node started node=n6400-fac3de53 ip=198.19.100.2 pool=p1 resumed=false started_in_ms=128\n\
             2026-12-01T18:41:26.675480Z  INFO bluebatch::sandbox::manager: sandboxed node started node=n1137-0d4e90be ip=198.19.17.198 pool=p1 resumed=false started_in_ms=40\n\
             2026-12-01T18:41:27.000000Z  INFO bluebatch::sandbox::manager: sandboxed node joined node=n1137-0d4e90be host=host-x pool=p1 joined_in_ms=300\n\
             2026-12-01T18:41:27.100000Z  WARN bluebatch::sandbox::manager: something else started_in_ms=9999\n",
        )
        .unwrap();
        let (start, join) = manager_times(&log);
        assert_eq!(start, [40.0, 128.0]);
        assert_eq!(join, [300.0]);
        assert_eq!(manager_times(&dir.path().join("absent")), (vec![], vec![]));
    }

    #[test]
    fn this_process_has_a_pid_namespace_and_a_role() {
        let me = std::process::id();
        assert!(pid_ns(me).is_some());
        assert_eq!(role(me, "cargo-test"), "cargo-test");
        assert!(processes().iter().any(|(pid, _, _)| *pid == me));
        assert!(pss_kb(me) > 0);
    }
}
