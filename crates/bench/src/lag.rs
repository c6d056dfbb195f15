//! The node-protocol lag (issue 15, item 4): from a write's API 200 to the change being in
//! force on the node.
//!
//! - Embedded nodes apply a user change inside the write, before it is answered: the bench
//!   switches a user's key back and forth with Update User and, right after each 200, logs in
//!   over the real OpenSSH client with the new key (must be accepted at the first try) and with
//!   the old one (must be refused). Extra delay: none if every probe holds.
//! - Agent nodes (`bluebatch agent --simulate N`) polling replica B of two PostgreSQL replicas
//!   while the write goes through replica A: a write waits for the node's acknowledgement, so its
//!   200 comes after the change is in force, and what the node protocol costs shows as the
//!   write's latency. The lag measured here is the Update User latency through A (request sent
//!   → 200: commit on A, NOTIFY, B's follower, the long poll answered, the agent's apply and ack
//!   to B, B's commit, NOTIFY, A's follower, the 200), an upper bound of commit → in force; the
//!   server's own commit → acknowledged histogram (`bluebatch_node_apply_lag_seconds{kind=
//!   "agent"}` of A's `/_bluebatch/metrics`) is shown beside it when the build records it. One
//!   connection, requests one after another (a quiet machine, as the target says), alternating
//!   with Get Node through A (one HTTP round trip of the same stack, the ratio's unit) and with
//!   Update User through B (the replica the agent polls), with 1,000 and 10,000 simulated nodes
//!   on one agent.

use crate::load::{self, Conn, Op, Outcome, Plan, Single, Spec};
use crate::pg::{self, Agent, Cluster};
use crate::server::Server;
use crate::sign::Signer;
use crate::{Report, Settings, V};
use hyper::Method;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

const TARGET_MS: f64 = 20.0;

pub async fn measure(s: &Settings, rep: &mut Report) -> Result<(), String> {
    println!("\n== node protocol: API 200 → change in force on the node ==");
    let work = s.work.join("lag");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    if let Err(e) = embedded(s, rep, &work).await {
        println!("  !! embedded nodes: {e}");
        rep.errors.push(format!("lag, embedded nodes: {e}"));
    }
    let sizes: &[u32] = if s.quick { &[50, 200] } else { &[1000, 10_000] };
    for &n in sizes {
        if let Err(e) = agent(s, rep, &work, n).await {
            println!("  !! agent with {n} simulated nodes: {e}");
            rep.errors.push(format!("lag, agent with {n} nodes: {e}"));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Embedded nodes.

fn keygen(dir: &Path, name: &str) -> Result<(PathBuf, String), String> {
    let key = dir.join(name);
    let st = std::process::Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "bench@bluebatch",
            "-f",
        ])
        .arg(&key)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("ssh-keygen: {e}"))?;
    if !st.success() {
        return Err("ssh-keygen failed".into());
    }
    let public = std::fs::read_to_string(key.with_extension("pub"))
        .map_err(|e| e.to_string())?
        .trim()
        .to_string();
    Ok((key, public))
}

#[derive(Debug, PartialEq)]
enum Login {
    Accepted,
    Refused,
    Unreachable(String),
}

/// One login over OpenSSH with `key` only, from the loopback address `source` (the node limits
/// failures per source address), running `true`.
async fn login(ip: &str, port: u16, user: &str, key: &Path, source: &str) -> Login {
    let mut c = tokio::process::Command::new("ssh");
    c.args([
        "-F",
        "/dev/null",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "ConnectTimeout=10",
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "PreferredAuthentications=publickey",
        "-o",
        "PasswordAuthentication=no",
        "-b",
        source,
        "-p",
        &port.to_string(),
        "-i",
    ])
    .arg(key)
    .arg(format!("{user}@{ip}"))
    .arg("true")
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    match tokio::time::timeout(Duration::from_secs(20), c.output()).await {
        Err(_) => Login::Unreachable("no outcome within 20 s".into()),
        Ok(Err(e)) => Login::Unreachable(format!("ssh: {e}")),
        Ok(Ok(out)) => {
            let code = out.status.code().unwrap_or(-1);
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            if code == 255 && err.contains("Permission denied") {
                Login::Refused
            } else if code == 255 || code == -1 {
                Login::Unreachable(err.trim().to_string())
            } else {
                Login::Accepted
            }
        }
    }
}

fn source(n: u32) -> String {
    format!("127.{}.{}.{}", 1 + n / 62_500, (n / 250) % 250, 2 + n % 250)
}

async fn embedded(s: &Settings, rep: &mut Report, work: &Path) -> Result<(), String> {
    let keys = work.join("keys");
    std::fs::create_dir_all(&keys).map_err(|e| e.to_string())?;
    let pair = [keygen(&keys, "a")?, keygen(&keys, "b")?];
    let extra: Vec<String> = ["--node-step-ms", "5"].map(String::from).to_vec();
    let dir = work.join("embedded");
    let srv = Server::spawn(&crate::launch(s, &dir, &extra)).await?;
    let signer = Arc::new(Signer::new(&srv.account, &srv.key)?);
    let mut c = Conn::connect(srv.addr, signer.clone()).await?;
    let result = async {
        crate::create_pool(&mut c, "lag", true, 1, Duration::from_secs(60)).await?;
        let node = pg::wait_idle(&mut c, "lag", 1, Duration::from_secs(60)).await?[0].clone();
        let body = serde_json::json!({"name": "probe", "sshPublicKey": pair[0].1}).to_string();
        c.expect(
            &Spec::with(
                Method::POST,
                format!("/pools/lag/nodes/{node}/users?api-version={V}"),
                body,
            ),
            201,
        )
        .await?;
        let a = c
            .expect(
                &Spec::get(format!(
                    "/pools/lag/nodes/{node}/remoteloginsettings?api-version={V}"
                )),
                200,
            )
            .await?;
        let v: serde_json::Value = serde_json::from_slice(&a.body).map_err(|e| e.to_string())?;
        let ip = v["remoteLoginIPAddress"]
            .as_str()
            .ok_or("no remoteLoginIPAddress")?
            .to_string();
        let port = v["remoteLoginPort"].as_u64().ok_or("no remoteLoginPort")? as u16;
        let before = scrape_lag(srv.addr, "embedded").await;
        let samples = if s.quick { 4 } else { 20 };
        let (mut new_ok, mut old_refused) = (0, 0);
        let mut put = Outcome::default();
        let mut to_login = Vec::new();
        let mut odd = Vec::new();
        for i in 0..samples {
            let (new, old) = if i % 2 == 0 {
                (&pair[1], &pair[0])
            } else {
                (&pair[0], &pair[1])
            };
            let spec = Spec::with(
                Method::PUT,
                format!("/pools/lag/nodes/{node}/users/probe?api-version={V}"),
                serde_json::json!({ "sshPublicKey": new.1 }).to_string(),
            );
            let t = Instant::now();
            c.expect(&spec, 200).await?;
            put.lat_us.push(t.elapsed().as_micros() as u32);
            let answered = Instant::now();
            // Right after the 200: the new key in, the old one out, at the first try.
            match login(&ip, port, "probe", &new.0, &source(2 * i)).await {
                Login::Accepted => {
                    new_ok += 1;
                    to_login.push(answered.elapsed().as_micros() as u32);
                }
                other => odd.push(format!("new key after 200 #{i}: {other:?}")),
            }
            match login(&ip, port, "probe", &old.0, &source(2 * i + 1)).await {
                Login::Refused => old_refused += 1,
                other => odd.push(format!("old key after 200 #{i}: {other:?}")),
            }
        }
        put.ops = samples.into();
        put.requests = put.ops;
        put.elapsed = Duration::from_secs(1);
        put.finish();
        to_login.sort_unstable();
        let after = scrape_lag(srv.addr, "embedded").await;
        println!(
            "  embedded node, {samples} key switches: the new key logged in at the first try right after \
             the 200 {new_ok}/{samples}, the old key refused {old_refused}/{samples} (OpenSSH login \
             incl. process start: p50 {:.1} ms); Update User p50 {:.2} ms, p99 {:.2} ms",
            load::percentile_ms(&to_login, 0.5),
            put.pct_ms(0.5),
            put.pct_ms(0.99),
        );
        for o in &odd {
            println!("    !! {o}");
        }
        if let Some(h) = delta(&before, &after) {
            println!("  server's embedded apply histogram during them: {}", h.describe());
        }
        let all = new_ok == samples && old_refused == samples;
        rep.check(
            "Node lag, embedded: the change in force when the 200 arrives (SSH probe right after)",
            "every probe, 0 extra delay",
            format!(
                "new key {new_ok}/{samples}, old key refused {old_refused}/{samples}; extra delay {}",
                if all { "0 (no retry needed)" } else { "probes failed" }
            ),
            all,
        );
        Ok::<(), String>(())
    }
    .await;
    drop(c);
    srv.stop().await;
    result
}

// ---------------------------------------------------------------------------------------------
// Agent nodes, another replica.

/// Cumulative bucket counts of a histogram by `le` bound, its count and sum (seconds).
#[derive(Clone, Debug, Default)]
struct Hist {
    buckets: Vec<(f64, u64)>,
    count: u64,
    sum: f64,
}

impl Hist {
    /// The bound of the bucket holding quantile `q` (an upper bound of it).
    fn quantile_bound(&self, q: f64) -> f64 {
        let want = (self.count as f64 * q).ceil() as u64;
        self.buckets
            .iter()
            .find(|(_, c)| *c >= want.max(1))
            .map_or(f64::INFINITY, |(b, _)| *b)
    }

    fn describe(&self) -> String {
        if self.count == 0 {
            return "no observation recorded by this build".into();
        }
        format!(
            "{} observations, mean {:.2} ms, p50 ≤ {} ms, p99 ≤ {} ms (bucket bounds)",
            self.count,
            self.sum / self.count as f64 * 1000.0,
            self.quantile_bound(0.5) * 1000.0,
            self.quantile_bound(0.99) * 1000.0
        )
    }
}

/// The text of `addr`'s `GET /_bluebatch/metrics`, or `None` if not served.
pub async fn metrics_text(addr: std::net::SocketAddr) -> Option<String> {
    let signer = Arc::new(Signer::new("x", "AAAA").ok()?);
    let mut c = Conn::connect(addr, signer).await.ok()?;
    let a = c
        .send(&Spec::get("/_bluebatch/metrics").unsigned())
        .await
        .ok()?;
    if a.status != 200 {
        return None;
    }
    Some(String::from_utf8_lossy(&a.body).into_owned())
}

/// `bluebatch_node_apply_lag_seconds{kind=…}` of `addr`'s metrics, or `None` if not served.
async fn scrape_lag(addr: std::net::SocketAddr, kind: &str) -> Option<Hist> {
    let text = metrics_text(addr).await?;
    let name = "bluebatch_node_apply_lag_seconds";
    let label = format!("kind=\"{kind}\"");
    let mut h = Hist::default();
    for l in text.lines() {
        let Some((k, v)) = l.rsplit_once(' ') else {
            continue;
        };
        if !k.starts_with(name) || !k.contains(&label) {
            continue;
        }
        if k.starts_with(&format!("{name}_bucket")) {
            let le = k.split("le=\"").nth(1).and_then(|r| r.split('"').next());
            let b = match le {
                Some("+Inf") => f64::INFINITY,
                Some(x) => x.parse().ok()?,
                None => continue,
            };
            h.buckets.push((b, v.parse().ok()?));
        } else if k.starts_with(&format!("{name}_count")) {
            h.count = v.parse().ok()?;
        } else if k.starts_with(&format!("{name}_sum")) {
            h.sum = v.parse().ok()?;
        }
    }
    Some(h)
}

fn delta(before: &Option<Hist>, after: &Option<Hist>) -> Option<Hist> {
    let (b, a) = (before.as_ref()?, after.as_ref()?);
    let buckets = a
        .buckets
        .iter()
        .map(|(le, n)| {
            let was = b
                .buckets
                .iter()
                .find(|(x, _)| x == le)
                .map_or(0, |(_, c)| *c);
            (*le, n.saturating_sub(was))
        })
        .collect();
    Some(Hist {
        buckets,
        count: a.count.saturating_sub(b.count),
        sum: a.sum - b.sum,
    })
}

/// The users of the scenario: `l0…` on nodes spread over the pool.
const USERS: usize = 64;

fn update_op(users: Arc<Vec<(String, String)>>, key: &'static str) -> Arc<dyn Op> {
    Arc::new(Single {
        make: move |_w, seq| {
            let (node, user) = &users[seq as usize % users.len()];
            (
                Spec::with(
                    Method::PUT,
                    format!("/pools/lag/nodes/{node}/users/{user}?api-version={V}"),
                    serde_json::json!({ "sshPublicKey": key }).to_string(),
                ),
                200,
            )
        },
    })
}

async fn agent(s: &Settings, rep: &mut Report, work: &Path, n: u32) -> Result<(), String> {
    let t_all = Instant::now();
    let cl = Cluster::start()?;
    let store = cl.url("bench");
    let dir = work.join(format!("agent{n}"));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let a = pg::replica(s, &dir.join("replica-a"), &store).await?;
    let b = pg::replica(s, &dir.join("replica-b"), &store).await?;
    let signer = Arc::new(Signer::new(&a.account, &a.key)?);
    let mut ca = Conn::connect(a.addr, signer.clone()).await?;
    let ports = format!("10000-{}", 10_000 + n - 1);
    let agent = Agent::join(
        s,
        &mut ca,
        &format!("http://{}", b.addr),
        &dir.join("agent"),
        n,
        &ports,
    )
    .await?;
    let result = async {
        let t = Instant::now();
        pg::add_agents_pool(&mut ca, "lag", n).await?;
        let ids = pg::wait_idle(&mut ca, "lag", n, Duration::from_secs(900)).await?;
        println!(
            "  {n} simulated nodes on one agent (polling replica B), pool idle in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        let m = USERS.min(ids.len());
        let mut users = Vec::new();
        for j in 0..m {
            let node = ids[j * ids.len() / m].clone();
            let user = format!("l{j}");
            let body = serde_json::json!({"name": user, "sshPublicKey": crate::KEY}).to_string();
            ca.expect(
                &Spec::with(
                    Method::POST,
                    format!("/pools/lag/nodes/{node}/users?api-version={V}"),
                    body,
                ),
                201,
            )
            .await?;
            users.push((node, user));
        }
        let users = Arc::new(users);
        let upd = update_op(users.clone(), crate::KEY);
        let first = users[0].0.clone();
        let get: Arc<dyn Op> = Arc::new(Single {
            make: move |_w, _s| {
                (
                    Spec::get(format!("/pools/lag/nodes/{first}?api-version={V}")),
                    200,
                )
            },
        });
        let run1 = |addr, op: &Arc<dyn Op>, d| {
            let plan = Plan {
                conns: 1,
                duration: d,
                rate: None,
                scrape: None,
            };
            load::run(addr, signer.clone(), op.clone(), plan)
        };
        // Warm-up.
        let warm = s.warmup.max(Duration::from_millis(300));
        run1(a.addr, &get, warm / 2).await?;
        run1(a.addr, &upd, warm).await?;
        run1(b.addr, &upd, warm / 2).await?;
        let before = scrape_lag(a.addr, "agent").await;
        let slice = s.secs / s.rounds as u32;
        let (mut rt, mut other, mut same) =
            (Outcome::default(), Outcome::default(), Outcome::default());
        // CPU time of each process during the Update User slices through A: where time goes.
        let pids = [
            ("replica A", Some(a.pid)),
            ("replica B", Some(b.pid)),
            ("agent", agent.pid()),
        ];
        let cpu_now = || -> Vec<f64> {
            let mut v: Vec<f64> = pids
                .iter()
                .map(|(_, p)| p.map_or(0.0, pg::cpu_ms))
                .collect();
            v.push(cl.cpu_ms());
            v
        };
        let mut spent = vec![0.0; pids.len() + 1];
        // At least `s.rounds` rounds, and more (up to a minute in all) until the write through
        // A has 30 samples: a p99 of a handful is no p99.
        let began = Instant::now();
        let mut round = 0;
        while round < s.rounds
            || (other.ops < 30 && !s.quick && began.elapsed() < Duration::from_secs(60))
        {
            round += 1;
            rt.merge(run1(a.addr, &get, slice).await?);
            let c0 = cpu_now();
            other.merge(run1(a.addr, &upd, slice).await?);
            for (x, (now, was)) in spent.iter_mut().zip(cpu_now().iter().zip(&c0)) {
                *x += now - was;
            }
            same.merge(run1(b.addr, &upd, slice).await?);
        }
        let names: Vec<&str> = pids.iter().map(|(n, _)| *n).chain(["PostgreSQL"]).collect();
        println!(
            "  CPU per Update User via A ({} requests in {round} rounds; 10 ms ticks): {}",
            other.ops,
            names
                .iter()
                .zip(&spent)
                .map(|(n, ms)| format!("{n} {:.2} ms", ms / other.ops.max(1) as f64))
                .collect::<Vec<_>>()
                .join(", ")
        );
        rt.finish();
        other.finish();
        same.finish();
        let after = scrape_lag(a.addr, "agent").await;
        let unit = rt.pct_ms(0.5);
        rep.row(
            &format!("(h) Get Node via A [one HTTP round trip], {n} nodes"),
            1,
            &rt,
            "1.00 (p50 is the unit)".into(),
        );
        rep.row(
            &format!("(h) Update User via A, agent polls B, {n} nodes"),
            1,
            &other,
            format!(
                "lag p50 {:.1}×, p99 {:.1}× the round trip",
                other.pct_ms(0.5) / unit,
                other.pct_ms(0.99) / unit
            ),
        );
        rep.row(
            &format!("(h) Update User via B, the agent's replica, {n} nodes"),
            1,
            &same,
            format!(
                "p50 {:.1}×, p99 {:.1}× the round trip",
                same.pct_ms(0.5) / unit,
                same.pct_ms(0.99) / unit
            ),
        );
        match delta(&before, &after) {
            Some(h) => println!(
                "  A's commit → acknowledged histogram (kind=agent) during these slices: {}",
                h.describe()
            ),
            None => println!("  A's /_bluebatch/metrics: not served"),
        }
        let p99 = other.pct_ms(0.99);
        rep.check(
            &format!(
                "Node lag, agent polling another replica, {n} simulated nodes on one agent: \
                 p99 of request → 200 (an upper bound of commit → in force)"
            ),
            &format!("< {TARGET_MS:.0} ms"),
            format!(
                "p50 {:.2} ms, p99 {p99:.2} ms = {:.1}× one round trip (p50 {unit:.2} ms)",
                other.pct_ms(0.5),
                p99 / unit
            ),
            p99 < TARGET_MS,
        );
        Ok::<(), String>(())
    }
    .await;
    drop(ca);
    agent.stop().await;
    a.stop().await;
    b.stop().await;
    drop(cl);
    println!(
        "  (the {n}-node agent scenario took {:.1} s)",
        t_all.elapsed().as_secs_f64()
    );
    result
}
