//! `bluebatch-bench`: measures the real release server side by side with its baselines, in one
//! run, and prints throughput, p50/p99 latency and the ratios the performance targets are set in.
//!
//! Baselines (ceilings): the same HTTP stack answering a do-nothing request
//! (`GET /_bluebatch/health`, no auth, no store), and the crypt hash alone on every core.
//! Each ceiling is measured in alternating slices with what is divided by it, at the same
//! concurrency (16 and 128 connections) and, for the paced rows, at the same rate.
//! The machine is shared: absolute numbers are informational, the ratios are what counts.
//! Every target is printed under `== targets ==` as PASS, MISS or `----` (not measured in this
//! run, e.g. an endpoint the server does not serve), with the figure measured.
//!
//! `--quick` is a smoke run of a few seconds (CI); the default full run takes a few minutes.

mod lag;
mod load;
mod pg;
mod sandbox;
mod server;
mod sign;

use clap::Parser;
use hyper::Method;
use load::{Conn, Op, Outcome, Plan, Single, Spec};
use server::{Launch, Server};
use sign::Signer;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const V: &str = "2023-11-01.18.0";

/// Bumped before every load phase, so names made per phase (Add User) never collide.
static RUN: AtomicU64 = AtomicU64::new(0);
const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl bench@bluebatch";

#[derive(Parser, Debug)]
#[command(
    name = "bluebatch-bench",
    about = "Throughput, latency, start-up and memory of the real bluebatch server, with ratios to baselines"
)]
struct Args {
    /// A smoke run of a few seconds in total (CI).
    #[arg(long)]
    quick: bool,
    /// The server binary. Default: `bluebatch` next to this binary if it is there (same target
    /// directory), else `target/release/bluebatch` of the workspace.
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Concurrent connections of the load generator.
    #[arg(long, default_value_t = 16)]
    conns: usize,
    /// Seconds each throughput scenario runs (default 5, quick 0.3).
    #[arg(long)]
    seconds: Option<f64>,
    /// Nodes of the pool that List Nodes pages through (default 10000, quick 500).
    #[arg(long)]
    list_nodes: Option<u32>,
    /// Linux (SSH-backed) nodes created to measure memory per node (default 1000, quick 20).
    #[arg(long)]
    ssh_nodes: Option<u32>,
    /// Sandboxed nodes (`serve --nodes sandbox`, root only) of the sandbox scenario: start-up
    /// time and memory per node against embedded nodes (default 50, quick 4).
    #[arg(long)]
    sandbox_nodes: Option<u32>,
    /// Where the servers' data directories go (default: a new temporary directory).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Exit with status 2 when a target is missed (by default only errors fail the run).
    #[arg(long)]
    strict: bool,
    /// Put the load generator on CPU 0 and the servers on CPU 1 (taskset), so that client and
    /// server do not compete for the same core; ratios then compare server cost on one core.
    #[arg(long)]
    pin: bool,
    /// Run only these scenarios (comma-separated; for profiling): startup, disk, health,
    /// update-key, update-key-paced, update-key-many, metrics-scrape, update-key-memory, hash,
    /// update-password, refused-before-hash, add-delete, get-node, list, get-pool,
    /// startup-stored, ssh-memory, sandbox, pg (PostgreSQL, one replica, against pgbench), pg2 (two
    /// replicas), lag (node-protocol lag; pg, pg2 and lag run in --quick only when named here).
    #[arg(long, value_delimiter = ',')]
    only: Option<Vec<String>>,
}

struct Settings {
    quick: bool,
    conns: usize,
    secs: Duration,
    warmup: Duration,
    list_nodes: u32,
    ssh_nodes: u32,
    sandbox_nodes: u32,
    startup_reps: usize,
    /// Alternating slices of a scenario and its baseline.
    rounds: usize,
    bin: PathBuf,
    work: PathBuf,
    only: Option<Vec<String>>,
    pin: bool,
}

impl Settings {
    fn want(&self, scenario: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|x| x == scenario))
    }
}

fn default_server_bin() -> PathBuf {
    if let Ok(me) = std::env::current_exe()
        && let Some(dir) = me.parent()
    {
        let sibling = dir.join("bluebatch");
        if sibling.is_file() {
            return sibling;
        }
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/release/bluebatch")
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// One printed line of results.
struct Row {
    name: String,
    conns: usize,
    ops: f64,
    reqs: f64,
    p50: f64,
    p99: f64,
    ratio: String,
}

/// One target of the `== targets ==` summary. Scenario functions (here and in the other modules)
/// push these through [`Report::push`] (or [`Report::check`]); the summary prints them in order.
pub struct Target {
    /// What is measured, e.g. "Update User (key only), 16 connections".
    pub name: String,
    /// The figure measured, as printed (e.g. "0.412 of the ceiling", "3.1× the ceiling's p99").
    pub measured: String,
    /// The goal, as printed (e.g. "≥ 0.40").
    pub goal: String,
    /// `Some(true)` PASS, `Some(false)` MISS, `None` not measured in this run (the reason is in
    /// `measured`, e.g. "not served"): printed as "----" and never a miss for `--strict`.
    pub pass: Option<bool>,
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    targets: Vec<Target>,
    errors: Vec<String>,
}

impl Report {
    fn header() {
        println!(
            "{:<44} {:>5} {:>10} {:>10} {:>9} {:>9}  ratio",
            "scenario", "conns", "ops/s", "req/s", "p50 ms", "p99 ms"
        );
    }

    fn row(&mut self, name: &str, conns: usize, o: &Outcome, ratio: String) {
        let r = Row {
            name: name.to_string(),
            conns,
            ops: o.ops_per_sec(),
            reqs: o.requests_per_sec(),
            p50: o.pct_ms(0.50),
            p99: o.pct_ms(0.99),
            ratio,
        };
        println!(
            "{:<44} {:>5} {:>10.0} {:>10.0} {:>9.2} {:>9.2}  {}",
            r.name, r.conns, r.ops, r.reqs, r.p50, r.p99, r.ratio
        );
        if let Some((server, client)) = o.cpu_per_op_us() {
            println!(
                "  CPU per operation: server {server:.1} µs, load generator {client:.1} µs (all threads, during its slices)"
            );
        }
        if o.errors > 0 {
            let e = format!(
                "{name}: {} failed operations; first: {}",
                o.errors,
                o.first_error.as_deref().unwrap_or("?")
            );
            println!("  !! {e}");
            self.errors.push(e);
        }
        self.rows.push(r);
    }

    /// Adds a target to the summary.
    fn push(&mut self, t: Target) {
        self.targets.push(t);
    }

    /// A measured target: `name`, its `goal` and the figure `measured`, met or not.
    fn check(&mut self, name: &str, goal: &str, measured: String, pass: bool) {
        self.push(Target {
            name: name.into(),
            measured,
            goal: goal.into(),
            pass: Some(pass),
        });
    }

    /// A target this run could not measure, and why (printed instead of a figure).
    fn unmeasured(&mut self, name: &str, goal: &str, why: String) {
        self.push(Target {
            name: name.into(),
            measured: why,
            goal: goal.into(),
            pass: None,
        });
    }

    /// A target whose goal is written into its name (the older rows: start-up, memory).
    fn target(&mut self, what: &str, measured: String, ok: bool) {
        self.check(what, "", measured, ok);
    }

    fn print_targets(&self) {
        println!("\n== targets ==");
        for t in &self.targets {
            let verdict = match t.pass {
                Some(true) => "PASS",
                Some(false) => "MISS",
                None => "----",
            };
            if t.goal.is_empty() {
                println!("{verdict:<4} {}: {}", t.name, t.measured);
            } else {
                println!("{verdict:<4} {} {}: {}", t.name, t.goal, t.measured);
            }
        }
    }

    fn missed(&self) -> bool {
        self.targets.iter().any(|t| t.pass == Some(false))
    }
}

/// One thing to measure: load against the server, or the crypt hash alone on OS threads.
#[derive(Clone)]
enum Phase {
    Load {
        op: Arc<dyn Op>,
        conns: usize,
        rate: Option<f64>,
        scrape: Option<load::Scrape>,
    },
    Hash {
        threads: usize,
    },
}

impl Phase {
    fn load(op: Arc<dyn Op>, conns: usize) -> Phase {
        Phase::Load {
            op,
            conns,
            rate: None,
            scrape: None,
        }
    }

    /// `op` on `conns` connections at `rate` operations per second in all (open loop).
    fn paced(op: Arc<dyn Op>, conns: usize, rate: f64) -> Phase {
        Phase::Load {
            op,
            conns,
            rate: Some(rate),
            scrape: None,
        }
    }

    /// `op` as fast as it goes on `conns` connections, with a scraper beside it.
    fn scraped(op: Arc<dyn Op>, conns: usize, scrape: load::Scrape) -> Phase {
        Phase::Load {
            op,
            conns,
            rate: None,
            scrape: Some(scrape),
        }
    }
}

async fn phase(
    srv: &Server,
    signer: &Arc<Signer>,
    p: &Phase,
    duration: Duration,
) -> Result<Outcome, String> {
    RUN.fetch_add(1, Ordering::Relaxed);
    let cpu0 = (srv.cpu_ns(), server::own_cpu_ns());
    let mut o = phase_run(srv, signer, p, duration).await?;
    o.server_cpu_ns = srv.cpu_ns().saturating_sub(cpu0.0);
    o.client_cpu_ns = server::own_cpu_ns().saturating_sub(cpu0.1);
    Ok(o)
}

async fn phase_run(
    srv: &Server,
    signer: &Arc<Signer>,
    p: &Phase,
    duration: Duration,
) -> Result<Outcome, String> {
    match p {
        Phase::Load {
            op,
            conns,
            rate,
            scrape,
        } => {
            let plan = Plan {
                conns: *conns,
                duration,
                rate: *rate,
                scrape: scrape.clone(),
            };
            load::run(srv.addr, signer.clone(), op.clone(), plan).await
        }
        Phase::Hash { threads } => {
            let threads = *threads;
            tokio::task::spawn_blocking(move || load::hash_ceiling(threads, duration))
                .await
                .map_err(|e| e.to_string())
        }
    }
}

/// A scenario and its baseline, measured in alternating slices (`s.rounds` of each, `s.secs` in
/// total for each) so that the noise of a shared machine falls on both alike.
async fn measure_pair(
    s: &Settings,
    srv: &Server,
    signer: &Arc<Signer>,
    base: Phase,
    op: Phase,
) -> Result<(Outcome, Outcome), String> {
    let mut v = measure_alternating(s, srv, signer, &[base, op], s.rounds, false).await?;
    let b = v.pop().expect("two outcomes");
    let a = v.pop().expect("two outcomes");
    Ok((a, b))
}

/// Several phases measured in alternating slices (`rounds` of each, `s.secs` in total for each),
/// after a warm-up of each (half of it for the first, the baseline); one outcome per phase. With
/// `rotate`, round r starts with phase r mod n, so that no phase always follows the same one
/// (a drift of the machine's load within a round then falls on every phase alike).
async fn measure_alternating(
    s: &Settings,
    srv: &Server,
    signer: &Arc<Signer>,
    phases: &[Phase],
    rounds: usize,
    rotate: bool,
) -> Result<Vec<Outcome>, String> {
    if !s.warmup.is_zero() {
        for (i, p) in phases.iter().enumerate() {
            let w = if i == 0 { s.warmup / 2 } else { s.warmup };
            phase(srv, signer, p, w).await?;
        }
    }
    let rounds = rounds.max(1);
    let slice = s.secs / rounds as u32;
    let mut out: Vec<Outcome> = phases.iter().map(|_| Outcome::default()).collect();
    for r in 0..rounds {
        for i in slice_order(r, phases.len(), rotate) {
            out[i].merge(phase(srv, signer, &phases[i], slice).await?);
        }
    }
    for o in &mut out {
        o.finish();
    }
    Ok(out)
}

/// A scraper costs no measurable throughput when the load with it keeps 0.97 of the load
/// without, or when its own CPU (measured directly) is at most 0.5 % of what the server spends
/// under the load and 0.97 is within two standard errors (`se`) of the rounds' ratios: on a
/// shared machine a 3 % difference in throughput is often below what a run can measure.
fn scrape_verdict(ratio: f64, se: f64, scrape_share: f64) -> bool {
    ratio >= 0.97 || (scrape_share <= 0.005 && ratio + 2.0 * se >= 0.97)
}

/// The standard error of the mean of the per-round ratios of [`paired_median`] (0 with fewer
/// than two rounds).
fn paired_se(x: &[f64], a: &[f64], b: &[f64]) -> f64 {
    let r = paired_ratios(x, a, b);
    if r.len() < 2 {
        return 0.0;
    }
    let n = r.len() as f64;
    let mean = r.iter().sum::<f64>() / n;
    let var = r.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (var / n).sqrt()
}

/// Each round's `x[r]` against the mean of `a[r]` and `b[r]` (rounds without a base left out).
fn paired_ratios(x: &[f64], a: &[f64], b: &[f64]) -> Vec<f64> {
    x.iter()
        .zip(a.iter().zip(b))
        .filter_map(|(x, (a, b))| {
            let base = (a + b) / 2.0;
            (base > 0.0).then(|| x / base)
        })
        .collect()
}

/// The median over rounds of `x[r]` against the mean of `a[r]` and `b[r]` (the slices of one
/// round of [`measure_alternating`]); `None` without a complete round.
fn paired_median(x: &[f64], a: &[f64], b: &[f64]) -> Option<f64> {
    let mut r = paired_ratios(x, a, b);
    if r.is_empty() {
        return None;
    }
    r.sort_by(f64::total_cmp);
    let m = r.len() / 2;
    Some(if r.len() % 2 == 1 {
        r[m]
    } else {
        (r[m - 1] + r[m]) / 2.0
    })
}

/// The order of the `n` phases in round `r` of [`measure_alternating`].
fn slice_order(r: usize, n: usize, rotate: bool) -> Vec<usize> {
    (0..n)
        .map(|k| if rotate { (r + k) % n } else { k })
        .collect()
}

/// Polls Get Pool until the pool is steady with `nodes` dedicated nodes.
async fn wait_pool(c: &mut Conn, pool: &str, nodes: u32, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    loop {
        let a = c
            .expect(&Spec::get(format!("/pools/{pool}?api-version={V}")), 200)
            .await?;
        let v: serde_json::Value = serde_json::from_slice(&a.body).map_err(|e| e.to_string())?;
        if v["allocationState"] == "steady" && v["currentDedicatedNodes"] == nodes {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("pool {pool} not steady with {nodes} nodes: {v}"));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The path and query of an `odata.nextLink`, found without parsing the whole page.
fn next_link(body: &[u8]) -> Option<String> {
    const TAG: &[u8] = b"\"odata.nextLink\":\"";
    let at = body.windows(TAG.len()).rposition(|w| w == TAG)? + TAG.len();
    let end = body[at..].iter().position(|&b| b == b'"')? + at;
    let url = std::str::from_utf8(&body[at..end]).ok()?;
    let after_scheme = url.split_once("://").map_or(url, |(_, r)| r);
    after_scheme
        .find('/')
        .map(|i| after_scheme[i..].to_string())
}

/// Every node id of a pool, following `odata.nextLink` (pages of 1000).
async fn list_all(c: &mut Conn, pool: &str) -> Result<(Vec<String>, u32), String> {
    let mut ids = Vec::new();
    let mut pages = 0;
    let mut next = Some(format!(
        "/pools/{pool}/nodes?api-version={V}&maxresults=1000"
    ));
    while let Some(pq) = next {
        let a = c.expect(&Spec::get(pq), 200).await?;
        pages += 1;
        let v: serde_json::Value = serde_json::from_slice(&a.body).map_err(|e| e.to_string())?;
        for n in v["value"].as_array().ok_or("no value array")? {
            ids.push(n["id"].as_str().ok_or("a node without id")?.to_string());
        }
        next = next_link(&a.body);
    }
    Ok((ids, pages))
}

/// List Nodes of a whole pool, page by page: one operation, several requests.
struct ListAll {
    pool: String,
    expect_pages: u32,
}

impl Op for ListAll {
    fn run<'a>(
        &'a self,
        c: &'a mut Conn,
        _worker: usize,
        _seq: u64,
    ) -> load::BoxFut<'a, Result<u32, String>> {
        Box::pin(async move {
            let mut next = Some(format!(
                "/pools/{}/nodes?api-version={V}&maxresults=1000",
                self.pool
            ));
            let mut pages = 0;
            while let Some(pq) = next {
                let a = c.expect(&Spec::get(pq), 200).await?;
                pages += 1;
                next = next_link(&a.body);
            }
            if pages != self.expect_pages {
                return Err(format!("{pages} pages instead of {}", self.expect_pages));
            }
            Ok(pages)
        })
    }
}

fn pool_body(id: &str, linux: bool, nodes: u32) -> String {
    let (publisher, offer, sku, agent) = if linux {
        (
            "Canonical",
            "0001-com-ubuntu-server-jammy",
            "22_04-lts",
            "batch.node.ubuntu 22.04",
        )
    } else {
        (
            "MicrosoftWindowsServer",
            "WindowsServer",
            "2022-datacenter",
            "batch.node.windows amd64",
        )
    };
    serde_json::json!({
        "id": id, "vmSize": "STANDARD_D2S_V3", "targetDedicatedNodes": nodes,
        "virtualMachineConfiguration": {
            "imageReference": {"publisher": publisher, "offer": offer, "sku": sku},
            "nodeAgentSKUId": agent
        }
    })
    .to_string()
}

async fn create_pool(
    c: &mut Conn,
    id: &str,
    linux: bool,
    nodes: u32,
    limit: Duration,
) -> Result<Duration, String> {
    let t = Instant::now();
    c.expect(
        &Spec::with(
            Method::POST,
            format!("/pools?api-version={V}"),
            pool_body(id, linux, nodes),
        ),
        201,
    )
    .await?;
    wait_pool(c, id, nodes, limit).await?;
    Ok(t.elapsed())
}

fn launch<'a>(s: &'a Settings, dir: &'a Path, extra: &'a [String]) -> Launch<'a> {
    Launch {
        bin: &s.bin,
        data_dir: dir,
        extra,
        cpus: s.pin.then_some("1"),
        log_filter: None,
    }
}

/// Pins this process (the load generator) to CPU 0 with `taskset`; the servers go to CPU 1.
fn pin_self() -> Result<(), String> {
    let st = std::process::Command::new("taskset")
        .args(["-a", "-cp", "0", &std::process::id().to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|e| format!("taskset: {e}"))?;
    if st.success() {
        Ok(())
    } else {
        Err("taskset could not pin the load generator to CPU 0".into())
    }
}

const SCENARIOS: &[&str] = &[
    "startup",
    "disk",
    "health",
    "update-key",
    "update-key-paced",
    "update-key-many",
    "update-key-memory",
    "hash",
    "update-password",
    "refused-before-hash",
    "metrics-scrape",
    "add-delete",
    "get-node",
    "list",
    "get-pool",
    "startup-stored",
    "ssh-memory",
    "sandbox",
    "pg",
    "pg2",
    "lag",
];

const BENCH_NODES: u32 = 4;

/// A Linux pool `bench` of a few nodes with users `u0…u{users-1}` (key only); returns node ids.
async fn setup_bench_pool(c: &mut Conn, users: usize) -> Result<Arc<Vec<String>>, String> {
    create_pool(c, "bench", true, BENCH_NODES, Duration::from_secs(60)).await?;
    let (nodes, _) = list_all(c, "bench").await?;
    for w in 0..users {
        let n = &nodes[w % nodes.len()];
        let body = serde_json::json!({"name": format!("u{w}"), "sshPublicKey": KEY}).to_string();
        c.expect(
            &Spec::with(
                Method::POST,
                format!("/pools/bench/nodes/{n}/users?api-version={V}"),
                body,
            ),
            201,
        )
        .await?;
    }
    Ok(Arc::new(nodes))
}

fn update_key_op(nodes: Arc<Vec<String>>) -> Arc<dyn Op> {
    let key_body = bytes::Bytes::from(serde_json::json!({ "sshPublicKey": KEY }).to_string());
    Arc::new(Single {
        make: move |w, _s| {
            let n = &nodes[w % nodes.len()];
            (
                Spec::with(
                    Method::PUT,
                    format!("/pools/bench/nodes/{n}/users/u{w}?api-version={V}"),
                    key_body.clone(),
                ),
                200,
            )
        },
    })
}

/// 4 KiB overwritten in place and `fdatasync`ed, `n` times, in a preallocated file in `dir` (as
/// a SQLite WAL is rewritten once it has grown): what one durable commit costs at least.
fn disk_probe(dir: &Path, n: usize) -> Result<Outcome, String> {
    use std::os::unix::fs::FileExt;
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let path = dir.join("fsync-probe");
    let f = std::fs::File::create(&path).map_err(|e| e.to_string())?;
    const SLOTS: u64 = 256;
    f.write_all_at(&vec![0u8; 4096 * SLOTS as usize], 0)
        .and_then(|_| f.sync_all())
        .map_err(|e| e.to_string())?;
    let block = [0x5au8; 4096];
    let mut out = Outcome::default();
    let t0 = Instant::now();
    for i in 0..n as u64 {
        let t = Instant::now();
        f.write_all_at(&block, (i % SLOTS) * 4096)
            .map_err(|e| e.to_string())?;
        f.sync_data().map_err(|e| e.to_string())?;
        out.lat_us.push(t.elapsed().as_micros() as u32);
    }
    out.elapsed = t0.elapsed();
    out.ops = n as u64;
    out.requests = n as u64;
    out.lat_us.sort_unstable();
    let _ = std::fs::remove_file(&path);
    Ok(out)
}

async fn run(s: Settings) -> Result<Report, String> {
    let mut rep = Report::default();
    let fast_nodes: Vec<String> = ["--node-step-ms", "5"].map(String::from).to_vec();

    // (e) Start-up with an empty data dir, and idle RSS.
    if s.want("startup") {
        println!("\n== start-up and idle memory (empty data dir) ==");
        let mut startup = Vec::new();
        let mut listening = Vec::new();
        let mut idle_rss = Vec::new();
        let mut idle_fds = 0;
        for i in 0..s.startup_reps {
            let dir = s.work.join(format!("empty{i}"));
            let srv = Server::spawn(&launch(&s, &dir, &[])).await?;
            let first = srv.first_answer().await?;
            startup.push(first.as_secs_f64() * 1000.0);
            listening.push(srv.to_listening.as_secs_f64() * 1000.0);
            tokio::time::sleep(Duration::from_millis(if s.quick { 100 } else { 500 })).await;
            idle_rss.push(srv.rss_kb() as f64);
            idle_fds = srv.fds();
            srv.stop().await;
        }
        let startup_ms = median(startup.clone());
        let idle_kb = median(idle_rss);
        println!(
            "spawn → first 200 from health: median {startup_ms:.1} ms over {} runs (all: {}); \
             spawn → 'listening' line: median {:.1} ms",
            startup.len(),
            join_ms(&startup),
            median(listening)
        );
        println!(
            "idle RSS: {:.1} MB ({idle_kb:.0} kB), open fds: {idle_fds}",
            idle_kb / 1024.0
        );
        rep.target(
            "start-up (empty data dir) < 50 ms",
            format!("{startup_ms:.1} ms"),
            startup_ms < 50.0,
        );
        rep.target(
            "idle RSS < 20 MB",
            format!("{:.1} MB", idle_kb / 1024.0),
            idle_kb < 20.0 * 1024.0,
        );
    }

    println!("\n== throughput ({} connections unless said) ==", s.conns);
    Report::header();
    if s.want("disk") {
        let d = tokio::task::spawn_blocking({
            let dir = s.work.join("disk");
            let n = if s.quick { 20 } else { 400 };
            move || disk_probe(&dir, n)
        })
        .await
        .map_err(|e| e.to_string())??;
        rep.row(
            "(x) disk: write 4 KiB + fdatasync",
            1,
            &d,
            format!(
                "p99.9 {:.2}, max {:.2} ms; bounds a durable commit",
                d.pct_ms(0.999),
                d.pct_ms(1.0)
            ),
        );
    }

    // (g) The PostgreSQL store against pgbench of its own SQL, and (h) the node-protocol lag
    // (crates/bench/src/pg.rs, lag.rs); in --quick only when named by --only.
    let named = |x: &str| s.only.as_ref().is_some_and(|o| o.iter().any(|y| y == x));
    if (s.want("pg") || s.want("pg2"))
        && (!s.quick || named("pg") || named("pg2"))
        && let Err(e) = pg::measure(&s, &mut rep).await
    {
        println!("  !! PostgreSQL scenarios: {e}");
        rep.errors.push(format!("PostgreSQL scenarios: {e}"));
    }
    if s.want("lag")
        && (!s.quick || named("lag"))
        && let Err(e) = lag::measure(&s, &mut rep).await
    {
        println!("  !! node-protocol lag: {e}");
        rep.errors.push(format!("node-protocol lag: {e}"));
    }

    let main_dir = s.work.join("main");
    let srv = Server::spawn(&launch(&s, &main_dir, &fast_nodes)).await?;
    let signer = Arc::new(Signer::new(&srv.account, &srv.key)?);
    let mut c = Conn::connect(srv.addr, signer.clone()).await?;
    let many = s.conns * 8;
    let nodes = setup_bench_pool(&mut c, many).await?;

    // (a) The do-nothing ceiling, measured in alternation with each scenario it is compared to.
    let health: Arc<dyn Op> = Arc::new(Single {
        make: |_w, _s| (Spec::get("/_bluebatch/health").unsigned(), 200),
    });
    let ceiling_of = |conns: usize| Phase::load(health.clone(), conns);
    let mut shown_ceiling = false;
    let mut show_ceiling = |rep: &mut Report, base: &Outcome, conns: usize| {
        if !shown_ceiling {
            rep.row(
                "(a) GET /_bluebatch/health [ceiling]",
                conns,
                base,
                "1.00".into(),
            );
            shown_ceiling = true;
        }
    };
    let vs = |o: &Outcome, base: &Outcome| {
        format!(
            "{:.3} of (a) [(a) = {:.0}/s alongside]",
            o.requests_per_sec() / base.ops_per_sec(),
            base.ops_per_sec()
        )
    };

    // (b) Update User, key only: at the standard concurrency, paced at half its peak, with many
    // more connections (group commit batches more), and against an in-memory store. Each is
    // divided by a ceiling measured in alternation with it, at the same concurrency (and rate).
    let key_goal = "≥ 0.40 of the ceiling";
    if s.want("update-key") || s.want("update-key-paced") {
        let (base, upd) = measure_pair(
            &s,
            &srv,
            &signer,
            ceiling_of(s.conns),
            Phase::load(update_key_op(nodes.clone()), s.conns),
        )
        .await?;
        show_ceiling(&mut rep, &base, s.conns);
        let key_ratio = upd.ops_per_sec() / base.ops_per_sec();
        rep.row(
            "(b) Update User, sshPublicKey only",
            s.conns,
            &upd,
            vs(&upd, &base),
        );
        rep.check(
            &format!("Update User (key only), {} connections", s.conns),
            key_goal,
            format!("{key_ratio:.3}"),
            key_ratio >= 0.40,
        );
        if s.want("update-key-paced") {
            // Both paced at the same rate: half of Update User's peak just measured.
            let half = upd.ops_per_sec() / 2.0;
            let (pbase, paced) = measure_pair(
                &s,
                &srv,
                &signer,
                Phase::paced(health.clone(), s.conns, half),
                Phase::paced(update_key_op(nodes.clone()), s.conns, half),
            )
            .await?;
            rep.row(
                &format!("(a) same ceiling, paced at {half:.0}/s"),
                s.conns,
                &pbase,
                format!(
                    "p99.9 {:.2} ms{}",
                    pbase.pct_ms(0.999),
                    behind(&pbase, half)
                ),
            );
            let p99_ratio = paced.pct_ms(0.99) / pbase.pct_ms(0.99);
            rep.row(
                &format!("(b) Update User paced at 50% of peak ({half:.0}/s)"),
                s.conns,
                &paced,
                format!(
                    "p99 {p99_ratio:.1}× the paced ceiling's; p99.9 {:.2}, max {:.2} ms{}",
                    paced.pct_ms(0.999),
                    paced.pct_ms(1.0),
                    behind(&paced, half)
                ),
            );
            rep.check(
                &format!(
                    "Update User (key only) p99 at half its peak ({half:.0}/s), to the ceiling's p99 at that rate"
                ),
                "≤ 5×",
                format!(
                    "{p99_ratio:.1}× ({:.2} ms against {:.2} ms)",
                    paced.pct_ms(0.99),
                    pbase.pct_ms(0.99)
                ),
                p99_ratio <= 5.0,
            );
        }
    }
    if s.want("update-key-many") {
        let (base, upd) = measure_pair(
            &s,
            &srv,
            &signer,
            ceiling_of(many),
            Phase::load(update_key_op(nodes.clone()), many),
        )
        .await?;
        rep.row(
            &format!("(a) same ceiling, {many} connections"),
            many,
            &base,
            "1.00".into(),
        );
        let many_ratio = upd.ops_per_sec() / base.ops_per_sec();
        rep.row(
            &format!("(b) Update User, key only, {many} connections"),
            many,
            &upd,
            vs(&upd, &base),
        );
        rep.check(
            &format!("Update User (key only), {many} connections"),
            key_goal,
            format!("{many_ratio:.3}"),
            many_ratio >= 0.40,
        );
    }
    // (b) What a metrics scraper costs: Update User without a scraper, with one scraping
    // `GET /_bluebatch/metrics` 10 times a second (Prometheus' usual interval is 15 s), and
    // without again, alternating; the two equal runs show the noise "measurable" is set against.
    if s.want("metrics-scrape") {
        let goal = "≥ 0.97 of without, or the scrapes' own CPU ≤ 0.5 % of the server's and 0.97 within 2 standard errors";
        let name = format!(
            "Update User (key only), {} connections, with a 10/s scraper of GET /_bluebatch/metrics, to without",
            s.conns
        );
        let scrape_spec = Spec::get("/_bluebatch/metrics").unsigned();
        let probe = c.send(&scrape_spec).await?;
        let ctype = probe
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let text = String::from_utf8_lossy(&probe.body);
        if probe.status != 200 || !ctype.starts_with("text/plain") || !text.contains("# TYPE ") {
            let why = format!(
                "not served (GET /_bluebatch/metrics answered {} {ctype})",
                probe.status
            );
            println!("{:<44} {why}", "(b) Update User with a metrics scraper");
            rep.unmeasured(&name, goal, why);
        } else {
            // What one scrape costs the server, measured directly: the CPU time of all its
            // threads over scrapes sent one after the other to the otherwise idle server.
            const PROBES: u32 = 500;
            let cpu0 = srv.cpu_ns();
            for _ in 0..PROBES {
                c.expect(&scrape_spec, 200).await?;
            }
            let per_scrape_us = (srv.cpu_ns().saturating_sub(cpu0)) as f64 / 1e3 / PROBES as f64;
            let loaded_cpu0 = (srv.cpu_ns(), Instant::now());
            let op = update_key_op(nodes.clone());
            let scrape = load::Scrape {
                spec: scrape_spec,
                per_sec: 10.0,
            };
            let out = measure_alternating(
                &s,
                &srv,
                &signer,
                &[
                    Phase::load(op.clone(), s.conns),
                    Phase::scraped(op.clone(), s.conns, scrape),
                    Phase::load(op, s.conns),
                ],
                s.rounds * 2,
                true,
            )
            .await?;
            // The server's CPU per second under the load (warm-up and all three phases).
            let loaded_cpu_per_s = (srv.cpu_ns().saturating_sub(loaded_cpu0.0)) as f64
                / 1e9
                / loaded_cpu0.1.elapsed().as_secs_f64().max(1e-9);
            // 10 scrapes a second of that cost, as a share of what the server spends under load.
            let scrape_share = per_scrape_us * 10.0 / 1e6 / loaded_cpu_per_s.max(1e-9);
            let (a, with, a2) = (&out[0], &out[1], &out[2]);
            let without = (a.ops_per_sec() + a2.ops_per_sec()) / 2.0;
            let noise = a2.ops_per_sec() / a.ops_per_sec();
            let pooled = with.ops_per_sec() / without;
            // The verdict: the median over rounds of each round's "with" slice against the two
            // "without" slices of the same round (measured right beside it), so the machine's
            // drift between rounds cancels; the pooled ratio is printed beside it.
            let ratio = paired_median(&with.slices, &a.slices, &a2.slices).unwrap_or(pooled);
            // How far the per-round ratios scatter: twice their standard error is what this
            // run can tell apart from 1.
            let se = paired_se(&with.slices, &a.slices, &a2.slices);
            let noise_paired = paired_median(&a2.slices, &a.slices, &a.slices).unwrap_or(noise);
            rep.row(
                "(b) Update User, no scraper (run 1)",
                s.conns,
                a,
                String::new(),
            );
            rep.row(
                "(b) Update User, no scraper (run 2)",
                s.conns,
                a2,
                format!("{noise:.3} of run 1 (the noise); by round, median {noise_paired:.3}"),
            );
            rep.row(
                "(b) Update User, metrics scraped 10/s",
                s.conns,
                with,
                format!(
                    "{ratio:.3} of without (median by round; pooled {pooled:.3}); {} scrapes of {:.1} kB, p50 {:.2} ms, max {:.2} ms",
                    with.scrapes.len(),
                    with.scrape_bytes as f64 / 1024.0,
                    load::percentile_ms(&with.scrapes, 0.5),
                    load::percentile_ms(&with.scrapes, 1.0)
                ),
            );
            println!(
                "  one scrape costs the server {per_scrape_us:.1} µs of CPU (all threads, {PROBES} scrapes in a row, idle server); under the load the server spends {loaded_cpu_per_s:.2} CPU-s per s: 10 scrapes/s are {:.3} % of that",
                scrape_share * 100.0
            );
            let spread = (noise - 1.0).abs().max((noise_paired - 1.0).abs());
            rep.check(
                &name,
                goal,
                format!(
                    "{ratio:.3}, median by round, ± {:.3} (2 standard errors of the rounds' ratios; pooled {pooled:.3}; two equal runs without: {noise:.3}, by round {noise_paired:.3}, i.e. up to {:.1} % apart); the scrapes' own CPU {:.3} % of the server's{}",
                    2.0 * se,
                    spread * 100.0,
                    scrape_share * 100.0,
                    if ratio < 0.97 && ratio + 2.0 * se >= 0.97 {
                        "; the shortfall is within what this run can measure"
                    } else {
                        ""
                    }
                ),
                scrape_verdict(ratio, se, scrape_share) && !with.scrapes.is_empty(),
            );
        }
    }
    if s.want("update-key-memory") {
        let mem_dir = s.work.join("memory");
        let mut extra = fast_nodes.clone();
        extra.push("--in-memory".into());
        let msrv = Server::spawn(&launch(&s, &mem_dir, &extra)).await?;
        // A server of its own: its failure is this row's error, and the run goes on.
        let measured = async {
            let msigner = Arc::new(Signer::new(&msrv.account, &msrv.key)?);
            let mut mc = Conn::connect(msrv.addr, msigner.clone()).await?;
            let mnodes = setup_bench_pool(&mut mc, s.conns).await?;
            drop(mc);
            measure_pair(
                &s,
                &msrv,
                &msigner,
                ceiling_of(s.conns),
                Phase::load(update_key_op(mnodes), s.conns),
            )
            .await
        }
        .await;
        match measured {
            Ok((base, upd)) => rep.row(
                "(b) Update User, key only, --in-memory store",
                s.conns,
                &upd,
                vs(&upd, &base),
            ),
            Err(e) => {
                let e = format!("--in-memory server: {e}{}", log_tail(&msrv.log));
                println!("  !! {e}");
                rep.errors.push(e);
            }
        }
        msrv.stop().await;
    }

    // (c) The hash alone on every core, alternating with Update User with a password. The pool
    // has as many threads as the load has connections: the server hashes each request on its
    // own blocking thread, and on a shared machine CPU time is shared per thread, so fewer
    // threads would understate the ceiling (on an idle machine any count ≥ the cores is equal).
    if s.want("update-password") {
        let cores = s
            .conns
            .max(std::thread::available_parallelism().map_or(1, |n| n.get()));
        let n3 = nodes.clone();
        let update_pw: Arc<dyn Op> = Arc::new(Single {
            make: move |w, seq| {
                let n = &n3[w % n3.len()];
                let body = serde_json::json!({ "password": format!("pw-{w}-{seq}") }).to_string();
                (
                    Spec::with(
                        Method::PUT,
                        format!("/pools/bench/nodes/{n}/users/u{w}?api-version={V}"),
                        body,
                    ),
                    200,
                )
            },
        });
        let (hash, pw) = measure_pair(
            &s,
            &srv,
            &signer,
            Phase::Hash { threads: cores },
            Phase::load(update_pw, s.conns),
        )
        .await?;
        rep.row(
            &format!("(c) crypt hash alone, {cores} threads [ceiling]"),
            cores,
            &hash,
            "1.00".into(),
        );
        let pw_ratio = pw.ops_per_sec() / hash.ops_per_sec();
        rep.row(
            "(c) Update User, password",
            s.conns,
            &pw,
            format!("{pw_ratio:.2} of the hash ceiling"),
        );
        rep.check(
            &format!("Update User (password), {} connections", s.conns),
            "≥ 0.85 of the hash ceiling",
            format!("{pw_ratio:.3}"),
            pw_ratio >= 0.85,
        );
    }

    // (c) Update User with a password whose pool, node or user does not exist: refused before
    // the hash, so answered at many times the rate of the hash alone (a server that hashes first
    // answers at about 1× it). Each answer must be the 404 of the missing resource.
    if s.want("refused-before-hash") {
        let cores = s
            .conns
            .max(std::thread::available_parallelism().map_or(1, |n| n.get()));
        let missing = [
            (Missing::User, "user"),
            (Missing::Node, "node"),
            (Missing::Pool, "pool"),
        ];
        let mut phases = vec![Phase::Hash { threads: cores }];
        for (m, _) in missing {
            let op: Arc<dyn Op> = Arc::new(Refused {
                nodes: nodes.clone(),
                missing: m,
            });
            phases.push(Phase::load(op, s.conns));
        }
        let out = measure_alternating(&s, &srv, &signer, &phases, s.rounds, false).await?;
        let hash = &out[0];
        rep.row(
            &format!("(c) crypt hash alone, {cores} threads [ceiling]"),
            cores,
            hash,
            "1.00".into(),
        );
        let mut ratios = Vec::new();
        for ((m, what), o) in missing.iter().zip(&out[1..]) {
            let r = o.ops_per_sec() / hash.ops_per_sec();
            rep.row(
                &format!("(c) Update User, password, no such {what}"),
                s.conns,
                o,
                format!("{r:.1}× the hash ceiling; every answer 404 {}", m.code()),
            );
            ratios.push(format!("{what} {r:.1}×"));
        }
        let worst = out[1..]
            .iter()
            .map(|o| o.ops_per_sec() / hash.ops_per_sec())
            .fold(f64::INFINITY, f64::min);
        let failed = out[1..].iter().any(|o| o.errors > 0);
        rep.check(
            "Update User (password) of a missing pool, node or user: 404 before hashing",
            "≥ 5× the hash ceiling",
            format!(
                "{}{}",
                ratios.join(", "),
                if failed {
                    "; some answers were not the 404"
                } else {
                    ""
                }
            ),
            worst >= 5.0 && !failed,
        );
    }

    // (d) Add/Delete User (alternating, key only), Get Node, List Nodes.
    if s.want("add-delete") {
        let add_delete: Arc<dyn Op> = Arc::new(AddDelete {
            nodes: nodes.clone(),
        });
        let (base, ad) = measure_pair(
            &s,
            &srv,
            &signer,
            ceiling_of(s.conns),
            Phase::load(add_delete, s.conns),
        )
        .await?;
        show_ceiling(&mut rep, &base, s.conns);
        rep.row(
            "(d) Add User / Delete User, alternating",
            s.conns,
            &ad,
            vs(&ad, &base),
        );
        let r = ad.requests_per_sec() / base.ops_per_sec();
        rep.check(
            &format!("Add User / Delete User (key only), {} connections", s.conns),
            key_goal,
            format!("{r:.3}"),
            r >= 0.40,
        );
    }
    if s.want("get-node") {
        let n5 = nodes.clone();
        let get_node: Arc<dyn Op> = Arc::new(Single {
            make: move |w, _s| {
                let n = &n5[w % n5.len()];
                (
                    Spec::get(format!("/pools/bench/nodes/{n}?api-version={V}")),
                    200,
                )
            },
        });
        let (base, gn) = measure_pair(
            &s,
            &srv,
            &signer,
            ceiling_of(s.conns),
            Phase::load(get_node, s.conns),
        )
        .await?;
        show_ceiling(&mut rep, &base, s.conns);
        rep.row("(d) Get Node", s.conns, &gn, vs(&gn, &base));
        let r = gn.requests_per_sec() / base.ops_per_sec();
        rep.check(
            &format!("Get Node, {} connections", s.conns),
            key_goal,
            format!("{r:.3}"),
            r >= 0.40,
        );
    }
    let big = s.list_nodes;
    let mut have_big = false;
    if s.want("list") || s.want("get-pool") || s.want("startup-stored") {
        let took = create_pool(&mut c, "big", false, big, Duration::from_secs(120)).await?;
        have_big = true;
        let (ids, pages) = list_all(&mut c, "big").await?;
        let unique: std::collections::HashSet<&String> = ids.iter().collect();
        if ids.len() != big as usize || unique.len() != ids.len() {
            return Err(format!(
                "paging the big pool gave {} ids ({} distinct) instead of {big}",
                ids.len(),
                unique.len()
            ));
        }
        println!(
            "  ({big}-node Windows pool allocated and idle in {:.2} s; server RSS now {:.1} MB)",
            took.as_secs_f64(),
            srv.rss_kb() as f64 / 1024.0
        );
        if s.want("list") {
            let list: Arc<dyn Op> = Arc::new(ListAll {
                pool: "big".into(),
                expect_pages: pages,
            });
            let list_conns = s.conns.min(4);
            let (base, lo) = measure_pair(
                &s,
                &srv,
                &signer,
                ceiling_of(s.conns),
                Phase::load(list, list_conns),
            )
            .await?;
            show_ceiling(&mut rep, &base, s.conns);
            rep.row(
                &format!("(d) List Nodes, all {big} ({pages} pages of ≤1000)"),
                list_conns,
                &lo,
                format!(
                    "{}; {:.0} nodes/s",
                    vs(&lo, &base),
                    lo.ops_per_sec() * f64::from(big)
                ),
            );
        }
        if s.want("get-pool") {
            // Get Pool reports node counts: its cost against the pool's size.
            for (pool, size) in [("bench", BENCH_NODES), ("big", big)] {
                let get_pool: Arc<dyn Op> = Arc::new(Single {
                    make: move |_w, _s| (Spec::get(format!("/pools/{pool}?api-version={V}")), 200),
                });
                let (base, gp) = measure_pair(
                    &s,
                    &srv,
                    &signer,
                    ceiling_of(s.conns),
                    Phase::load(get_pool, s.conns),
                )
                .await?;
                show_ceiling(&mut rep, &base, s.conns);
                rep.row(
                    &format!("(d) Get Pool ({size}-node pool)"),
                    s.conns,
                    &gp,
                    vs(&gp, &base),
                );
            }
        }
    }
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await; // let background node writes land
    srv.stop().await;

    // (e) Start-up with the stored big pool.
    if s.want("startup-stored") && have_big {
        println!("\n== start-up with stored nodes ==");
        let mut warm = Vec::new();
        let mut rss_loaded = 0;
        for _ in 0..s.startup_reps.min(3) {
            let srv = Server::spawn(&launch(&s, &main_dir, &[])).await?;
            let first = srv.first_answer().await?;
            warm.push(first.as_secs_f64() * 1000.0);
            tokio::time::sleep(Duration::from_millis(200)).await;
            rss_loaded = srv.rss_kb();
            srv.stop().await;
        }
        println!(
            "{big} stored Windows nodes + {BENCH_NODES} Linux nodes: spawn → first 200 median {:.1} ms \
             (all: {}); RSS after start {:.1} MB",
            median(warm.clone()),
            join_ms(&warm),
            rss_loaded as f64 / 1024.0
        );
    }

    // (e) Memory and descriptors per SSH-backed node.
    if s.want("ssh-memory") {
        println!("\n== memory per SSH-backed (Linux) node ==");
        let ssh_dir = s.work.join("ssh");
        let srv = Server::spawn(&launch(&s, &ssh_dir, &fast_nodes)).await?;
        srv.first_answer().await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (rss0, fds0, thr0) = (srv.rss_kb(), srv.fds(), srv.threads());
        let signer2 = Arc::new(Signer::new(&srv.account, &srv.key)?);
        let mut c = Conn::connect(srv.addr, signer2).await?;
        let n = s.ssh_nodes;
        let took = create_pool(&mut c, "ssh", true, n, Duration::from_secs(600)).await?;
        let found = c
            .expect(
                &Spec::get(format!(
                    "/pools/ssh/nodes?api-version={V}&%24filter=state%20eq%20%27unusable%27&%24select=id"
                )),
                200,
            )
            .await?;
        let unusable = serde_json::from_slice::<serde_json::Value>(&found.body)
            .ok()
            .and_then(|v| v["value"].as_array().map(Vec::len))
            .unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (rss1, fds1, thr1) = (srv.rss_kb(), srv.fds(), srv.threads());
        let per_node_kb = (rss1.saturating_sub(rss0)) as f64 / f64::from(n);
        let fds_per_node = (fds1 as f64 - fds0 as f64) / f64::from(n);
        println!(
            "{n} Linux nodes allocated and idle in {:.2} s ({unusable} unusable); RSS {:.1} → {:.1} MB: \
             {per_node_kb:.1} kB per node; open fds {fds0} → {fds1} ({fds_per_node:.2} per node); \
             threads {thr0} → {thr1}",
            took.as_secs_f64(),
            rss0 as f64 / 1024.0,
            rss1 as f64 / 1024.0,
        );
        if unusable > 0 {
            rep.errors
                .push(format!("{unusable} of {n} Linux nodes came up unusable"));
        }
        println!(
            "  → 10,000 SSH nodes: about {:.0} MB and {} fds (open-files limit here: {})",
            per_node_kb * 10_000.0 / 1024.0,
            fds0 + (fds_per_node * 10_000.0) as usize,
            nofile_limit()
        );
        drop(c);
        tokio::time::sleep(Duration::from_millis(300)).await;
        srv.stop().await;
        let srv = Server::spawn(&launch(&s, &ssh_dir, &[])).await?;
        let first = srv.first_answer().await?;
        println!(
            "start-up with {n} stored Linux nodes (their SSH endpoints come up before the API \
             listens): spawn → first 200 {:.1} ms",
            first.as_secs_f64() * 1000.0
        );
        srv.stop().await;
    }

    // (f) Sandboxed nodes against embedded ones: start-up, memory, teardown (root only).
    if s.want("sandbox")
        && let Err(e) = sandbox::measure(&s, &mut rep).await
    {
        println!("  !! sandboxed nodes: {e}");
        rep.errors.push(format!("sandboxed nodes: {e}"));
    }

    // (g) Scenarios of their own modules (PostgreSQL replicas, node-protocol lag) go here, each
    // as `if s.want("name") && let Err(e) = module::measure(&s, &mut rep).await { … }`, printing
    // its rows and pushing its `Target`s to `rep` (the summary prints every target pushed).
    Ok(rep)
}

/// A note when a paced run fell behind its schedule (fewer than 95 % of the operations due).
fn behind(o: &Outcome, rate: f64) -> String {
    let done = o.ops_per_sec();
    if done < rate * 0.95 {
        format!("; FELL BEHIND: {done:.0}/s of {rate:.0}/s")
    } else {
        String::new()
    }
}

/// The last lines of a server's log (stderr), to say why it failed.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return String::new();
    }
    format!(
        "; its log ({}) ends: {}",
        log.display(),
        lines[lines.len().saturating_sub(2)..].join(" | ")
    )
}

fn join_ms(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.1}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn nofile_limit() -> String {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .map(|l| l.split_whitespace().nth(3).unwrap_or("?").to_string())
        })
        .unwrap_or_else(|| "?".into())
}

/// Which resource of an Update User does not exist ([`Refused`]).
#[derive(Clone, Copy)]
enum Missing {
    User,
    Node,
    Pool,
}

impl Missing {
    fn code(self) -> &'static str {
        match self {
            Missing::User => "NodeUserNotFound",
            Missing::Node => "NodeNotFound",
            Missing::Pool => "PoolNotFound",
        }
    }
}

/// Update User with a password (a fresh one each time) where the pool, the node or the user
/// does not exist; the answer must be 404 with that resource's Batch error code.
struct Refused {
    nodes: Arc<Vec<String>>,
    missing: Missing,
}

impl Op for Refused {
    fn run<'a>(
        &'a self,
        c: &'a mut Conn,
        w: usize,
        seq: u64,
    ) -> load::BoxFut<'a, Result<u32, String>> {
        Box::pin(async move {
            let n = &self.nodes[w % self.nodes.len()];
            let path = match self.missing {
                Missing::User => format!("/pools/bench/nodes/{n}/users/nobody{w}"),
                Missing::Node => format!("/pools/bench/nodes/nosuchnode/users/u{w}"),
                Missing::Pool => format!("/pools/nosuchpool/nodes/{n}/users/u{w}"),
            };
            let body = format!(r#"{{"password":"pw-{w}-{seq}"}}"#);
            let spec = Spec::with(Method::PUT, format!("{path}?api-version={V}"), body);
            let a = c.expect(&spec, 404).await?;
            let code = serde_json::from_slice::<serde_json::Value>(&a.body)
                .ok()
                .and_then(|v| v["code"].as_str().map(String::from));
            if code.as_deref() != Some(self.missing.code()) {
                return Err(format!(
                    "PUT {path}: 404 with code {code:?} instead of {}",
                    self.missing.code()
                ));
            }
            Ok(1)
        })
    }
}

/// Add User then Delete User of the same fresh name, alternating (seq even: add, odd: delete).
struct AddDelete {
    nodes: Arc<Vec<String>>,
}

impl Op for AddDelete {
    fn run<'a>(
        &'a self,
        c: &'a mut Conn,
        w: usize,
        seq: u64,
    ) -> load::BoxFut<'a, Result<u32, String>> {
        Box::pin(async move {
            let n = &self.nodes[w % self.nodes.len()];
            let run = RUN.load(Ordering::Relaxed);
            let name = format!("a{run}w{w}s{}", seq / 2);
            let spec = if seq.is_multiple_of(2) {
                let body = format!(r#"{{"name":"{name}","sshPublicKey":"{KEY}"}}"#);
                (
                    Spec::with(
                        Method::POST,
                        format!("/pools/bench/nodes/{n}/users?api-version={V}"),
                        body,
                    ),
                    201,
                )
            } else {
                (
                    Spec::with(
                        Method::DELETE,
                        format!("/pools/bench/nodes/{n}/users/{name}?api-version={V}"),
                        bytes::Bytes::new(),
                    ),
                    200,
                )
            };
            c.expect(&spec.0, spec.1).await.map(|_| 1)
        })
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let bin = args.server_bin.clone().unwrap_or_else(default_server_bin);
    if !bin.is_file() {
        eprintln!(
            "bluebatch-bench: no server binary at {} (build it with cargo build --release -p bluebatch, or pass --server-bin)",
            bin.display()
        );
        return std::process::ExitCode::from(1);
    }
    let tmp;
    let work = match &args.work_dir {
        Some(d) => {
            let _ = std::fs::create_dir_all(d);
            d.clone()
        }
        None => {
            tmp = match tempfile::Builder::new().prefix("bluebatch-bench").tempdir() {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("bluebatch-bench: temporary directory: {e}");
                    return std::process::ExitCode::from(1);
                }
            };
            tmp.path().to_path_buf()
        }
    };
    let s = Settings {
        quick: args.quick,
        conns: args.conns.max(1),
        secs: Duration::from_secs_f64(args.seconds.unwrap_or(if args.quick { 0.3 } else { 5.0 })),
        warmup: Duration::from_secs_f64(if args.quick { 0.05 } else { 1.0 }),
        list_nodes: args
            .list_nodes
            .unwrap_or(if args.quick { 500 } else { 10_000 }),
        ssh_nodes: args
            .ssh_nodes
            .unwrap_or(if args.quick { 20 } else { 1000 })
            .max(1),
        sandbox_nodes: args
            .sandbox_nodes
            .unwrap_or(if args.quick { 4 } else { 50 })
            .max(1),
        startup_reps: if args.quick { 1 } else { 5 },
        rounds: if args.quick { 1 } else { 5 },
        bin,
        work,
        only: args.only.clone(),
        pin: args.pin,
    };
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    if s.pin {
        if cpus < 2 {
            eprintln!("bluebatch-bench: --pin needs at least 2 CPUs");
            return std::process::ExitCode::from(1);
        }
        if let Err(e) = pin_self() {
            eprintln!("bluebatch-bench: {e}");
            return std::process::ExitCode::from(1);
        }
    }
    if let Some(o) = &s.only
        && let Some(bad) = o.iter().find(|x| !SCENARIOS.contains(&x.as_str()))
    {
        eprintln!(
            "bluebatch-bench: unknown scenario {bad}; known: {}",
            SCENARIOS.join(", ")
        );
        return std::process::ExitCode::from(1);
    }
    let mtime = std::fs::metadata(&s.bin)
        .and_then(|m| m.modified())
        .ok()
        .map(|t| time::OffsetDateTime::from(t).to_string())
        .unwrap_or_default();
    println!(
        "bluebatch-bench ({})",
        if s.quick { "quick" } else { "full" }
    );
    println!("server:   {} (built {mtime})", s.bin.display());
    println!(
        "machine:  {cpus} CPUs, {}; load average {}",
        cpu_model(),
        loadavg()
    );
    println!(
        "settings: {} connections, {:.1} s per scenario after {:.2} s warm-up; {}",
        s.conns,
        s.secs.as_secs_f64(),
        s.warmup.as_secs_f64(),
        if s.pin {
            "load generator pinned to CPU 0, server to CPU 1"
        } else {
            "load generator and server share the CPUs"
        }
    );
    let started = Instant::now();
    let strict = args.strict;
    match run(s).await {
        Ok(rep) => {
            rep.print_targets();
            println!(
                "\ntotal {:.1} s; load average now {}",
                started.elapsed().as_secs_f64(),
                loadavg()
            );
            if !rep.errors.is_empty() {
                println!("\nERRORS:");
                for e in &rep.errors {
                    println!("  {e}");
                }
                return std::process::ExitCode::from(1);
            }
            if strict && rep.missed() {
                return std::process::ExitCode::from(2);
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bluebatch-bench: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotated_rounds_start_each_phase_in_turn() {
        assert_eq!(slice_order(0, 3, true), [0, 1, 2]);
        assert_eq!(slice_order(1, 3, true), [1, 2, 0]);
        assert_eq!(slice_order(2, 3, true), [2, 0, 1]);
        assert_eq!(slice_order(3, 3, true), [0, 1, 2]);
        assert_eq!(slice_order(1, 2, false), [0, 1]);
    }

    #[test]
    fn only_a_measured_miss_fails_strict() {
        let mut rep = Report::default();
        rep.check("a", "≥ 1", "2".into(), true);
        rep.unmeasured("b", "≥ 1", "not served".into());
        assert!(!rep.missed(), "a target not measured is not a miss");
        rep.check("c", "≥ 1", "0.5".into(), false);
        assert!(rep.missed());
    }

    #[test]
    fn a_scraper_passes_on_throughput_or_on_its_own_tiny_cost_within_the_noise() {
        assert!(scrape_verdict(0.98, 0.0, 0.5));
        assert!(scrape_verdict(0.95, 0.015, 0.001));
        assert!(
            !scrape_verdict(0.95, 0.015, 0.02),
            "costly scrapes need the throughput"
        );
        assert!(
            !scrape_verdict(0.90, 0.015, 0.001),
            "a shortfall beyond the noise misses"
        );
        assert!((paired_se(&[1.0, 1.0], &[1.0, 1.0], &[1.0, 1.0])).abs() < 1e-12);
        // Ratios 0.9 and 1.1: mean 1.0, sd 0.1414, se 0.1.
        let se = paired_se(&[0.9, 1.1], &[1.0, 1.0], &[1.0, 1.0]);
        assert!((se - 0.1).abs() < 1e-9, "{se}");
    }

    #[test]
    fn paired_median_compares_each_round_with_its_neighbours() {
        // Round 2's slow machine slows all three slices alike: it stays near 1.
        let with = [90.0, 45.0, 99.0];
        let a = [100.0, 50.0, 100.0];
        let b = [100.0, 50.0, 100.0];
        assert_eq!(paired_median(&with, &a, &b), Some(0.9));
        assert_eq!(
            paired_median(&[1.0, 3.0], &[1.0, 1.0], &[1.0, 1.0]),
            Some(2.0)
        );
        assert_eq!(paired_median(&[], &[], &[]), None);
        assert_eq!(paired_median(&[5.0], &[0.0], &[0.0]), None);
    }

    #[test]
    fn a_paced_run_that_fell_behind_says_so() {
        let o = Outcome {
            ops: 900,
            requests: 900,
            elapsed: Duration::from_secs(1),
            ..Outcome::default()
        };
        assert_eq!(behind(&o, 900.0), "");
        assert!(behind(&o, 1000.0).contains("FELL BEHIND: 900/s of 1000/s"));
    }

    #[test]
    fn a_missing_resource_has_its_batch_code() {
        assert_eq!(Missing::User.code(), "NodeUserNotFound");
        assert_eq!(Missing::Node.code(), "NodeNotFound");
        assert_eq!(Missing::Pool.code(), "PoolNotFound");
    }
}
