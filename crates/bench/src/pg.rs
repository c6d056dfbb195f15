//! The PostgreSQL path (issue 15, item 3): Update User through one and through two `serve
//! --store postgres://…` replicas on one private PostgreSQL 15 cluster, each against `pgbench`
//! replaying, at the same concurrency and in alternating slices, the very SQL statements one
//! Update User issues (the agent's acknowledgement included), captured from the server's own
//! statement log at every run.
//!
//! The cluster is the bench's own (`initdb` in a fresh directory, 127.0.0.1 and a free port,
//! trust authentication) with `fsync`, `synchronous_commit` and `full_page_writes` ON: the
//! store's durability is what is measured, on both sides alike (every commit waits for its WAL
//! flush).
//!
//! Capture: `log_statement = all` is switched on for a few sequential Update User requests; the
//! log lines whose timestamps fall between a request's send and its 200 (± 1 ms, the log's
//! resolution) are that request's statements; the statement list most requests share is kept
//! (a background statement of a replica that happened to fall in one window is outside it).
//! Replay script: every statement with its captured parameter values as literals (prepared by
//! `pgbench -M prepared`); a revision (in `bb_head`/`bb_changes`) is taken from `bb_head` at
//! replay time, as the server's is; reads are one round trip each (their answer is needed);
//! the writes of a transaction after its last read, up to COMMIT, go in one pipeline
//! (`\startpipeline`), as pgstore sends its commit; `BEGIN; SELECT … FOR UPDATE` (one simple
//! query on the server) is one pipeline.

use crate::load::{self, BoxFut, Conn, Op, Outcome, Plan, Spec};
use crate::server::{Launch, Server};
use crate::sign::Signer;
use crate::{KEY, Report, Settings, V};
use hyper::Method;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Where Debian's PostgreSQL 15 binaries are (`BLUEBATCH_PG_BIN` overrides).
pub fn pg_bin(tool: &str) -> PathBuf {
    let dir = std::env::var("BLUEBATCH_PG_BIN")
        .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".to_string());
    let p = Path::new(&dir).join(tool);
    if p.exists() { p } else { PathBuf::from(tool) }
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// A private PostgreSQL cluster: stopped (immediately) and removed when dropped.
pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
    as_postgres: bool,
}

impl Cluster {
    fn tool(&self, tool: &str) -> Command {
        let mut c = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(pg_bin(tool));
            c
        } else {
            Command::new(pg_bin(tool))
        };
        c.current_dir(&self.dir).stdin(Stdio::null());
        c
    }

    /// `initdb` and start, fsync on. The directory is under the system temporary directory (the
    /// `postgres` user must be able to reach it; the bench's own work dir is private).
    pub fn start() -> Result<Cluster, String> {
        let dir = std::env::temp_dir().join(format!("bluebatch-bench-pg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let c = Cluster {
            dir,
            port,
            as_postgres: running_as_root(),
        };
        if c.as_postgres {
            let st = Command::new("chown")
                .arg("postgres:postgres")
                .arg(&c.dir)
                .status()
                .map_err(|e| format!("chown: {e}"))?;
            if !st.success() {
                return Err("chown postgres of the cluster directory failed".into());
            }
        }
        let out = c
            .tool("initdb")
            .arg("-D")
            .arg(c.dir.join("data"))
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ])
            .output()
            .map_err(|e| format!("running initdb ({}): {e}", pg_bin("initdb").display()))?;
        if !out.status.success() {
            return Err(format!(
                "initdb: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n\
             max_connections = 300\nshared_buffers = 128MB\n\
             fsync = on\nsynchronous_commit = on\nfull_page_writes = on\n\
             log_line_prefix = '%m [%p] '\nlog_statement = 'none'\nlog_min_messages = warning\n\
             log_parameter_max_length = -1\n",
            c.port,
            c.dir.display()
        );
        use std::io::Write;
        std::fs::OpenOptions::new()
            .append(true)
            .open(c.dir.join("data/postgresql.conf"))
            .and_then(|mut f| f.write_all(conf.as_bytes()))
            .map_err(|e| format!("postgresql.conf: {e}"))?;
        let out = c
            .tool("pg_ctl")
            .arg("-D")
            .arg(c.dir.join("data"))
            .arg("-l")
            .arg(c.log())
            .args(["-w", "-t", "60", "start"])
            .output()
            .map_err(|e| format!("pg_ctl start: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "pg_ctl start: {}{}",
                String::from_utf8_lossy(&out.stdout),
                std::fs::read_to_string(c.log()).unwrap_or_default()
            ));
        }
        c.psql("postgres", "CREATE DATABASE bench")?;
        Ok(c)
    }

    /// CPU time of the whole cluster (the postmaster and its children) so far.
    pub fn cpu_ms(&self) -> f64 {
        let Some(pm) = std::fs::read_to_string(self.dir.join("data/postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<u32>().ok()))
        else {
            return 0.0;
        };
        let mut total = cpu_ms(pm);
        if let Ok(d) = std::fs::read_dir("/proc") {
            for e in d.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                    continue;
                };
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let ppid = stat
                    .rsplit_once(')')
                    .and_then(|(_, r)| r.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<u32>().ok());
                if ppid == Some(pm) {
                    total += cpu_ms(pid);
                }
            }
        }
        total
    }

    pub fn log(&self) -> PathBuf {
        self.dir.join("log")
    }

    /// The `--store` URL of database `db`.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{db}?sslmode=disable",
            self.port
        )
    }

    /// One SQL command through psql; its unaligned, tuples-only output.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(pg_bin("psql"))
            .args([
                "-X",
                "-q",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
            ])
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                db,
                "-c",
                sql,
            ])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("running psql: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(format!(
                "psql {sql:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// A copy of database `from` named `to` (pg_dump | psql: `from` is in use by the replicas).
    pub fn copy_db(&self, from: &str, to: &str) -> Result<(), String> {
        self.psql("postgres", &format!("DROP DATABASE IF EXISTS {to}"))?;
        self.psql("postgres", &format!("CREATE DATABASE {to}"))?;
        let port = self.port.to_string();
        let dump = Command::new(pg_bin("pg_dump"))
            .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres", "-d", from])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("pg_dump: {e}"))?;
        let out = Command::new(pg_bin("psql"))
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
            .args(["-p", &port, "-U", "postgres", "-d", to])
            .stdin(dump.stdout.ok_or("pg_dump's output")?)
            .stdout(Stdio::null())
            .output()
            .map_err(|e| format!("psql restore: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "restoring {from} into {to}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self
            .tool("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "-w", "-t", "60", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `bluebatch agent --simulate N`, killed when dropped.
pub struct Agent {
    child: tokio::process::Child,
    #[allow(dead_code)]
    pub log: PathBuf,
}

impl Agent {
    /// Joins with a token made through `via` and polls `server` (`http://addr`).
    pub async fn join(
        s: &Settings,
        via: &mut Conn,
        server: &str,
        state: &Path,
        nodes: u32,
        ports: &str,
    ) -> Result<Agent, String> {
        let a = via
            .expect(
                &Spec::with(Method::POST, "/_bluebatch/join-tokens", "{}".to_string()),
                200,
            )
            .await?;
        let v: serde_json::Value = serde_json::from_slice(&a.body).map_err(|e| e.to_string())?;
        let token = v["token"]
            .as_str()
            .ok_or("a join token answer without token")?
            .to_string();
        // A fresh identity: a state directory of an earlier run names a host this database
        // never had.
        let _ = std::fs::remove_dir_all(state);
        std::fs::create_dir_all(state).map_err(|e| e.to_string())?;
        let log = state.with_extension("log");
        let log_file = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        let mut cmd = match s.pin {
            true => {
                let mut c = tokio::process::Command::new("taskset");
                c.args(["-c", "1"]).arg(&s.bin);
                c
            }
            false => tokio::process::Command::new(&s.bin),
        };
        let child = cmd
            .args([
                "agent",
                "--server",
                server,
                "--simulate",
                &nodes.to_string(),
            ])
            .args(["--ssh-ports", ports])
            .arg("--state-dir")
            .arg(state)
            // In the environment, never in the arguments.
            .env("BLUEBATCH_JOIN_TOKEN", format!("{token}\n"))
            .env("BLUEBATCH_LOG", "warn,russh=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting bluebatch agent: {e}"))?;
        Ok(Agent { child, log })
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

/// CPU time (user + system) a process has used so far, from /proc (clock ticks of 10 ms).
pub fn cpu_ms(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces, in parentheses).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    (ticks(11) + ticks(12)) * 10.0
}

/// The extra arguments of a replica on `store`.
pub fn replica_args(store: &str) -> Vec<String> {
    ["--store", store, "--nodes", "agents", "--node-step-ms", "5"]
        .map(String::from)
        .to_vec()
}

pub async fn replica(s: &Settings, dir: &Path, store: &str) -> Result<Server, String> {
    let extra = replica_args(store);
    Server::spawn(&Launch {
        bin: &s.bin,
        data_dir: dir,
        extra: &extra,
        cpus: s.pin.then_some("1"),
        log_filter: None,
    })
    .await
}

/// `op` with its worker numbers shifted by `add` (two loads side by side keep distinct users).
struct Shifted {
    inner: Arc<dyn Op>,
    add: usize,
}

impl Op for Shifted {
    fn run<'a>(
        &'a self,
        c: &'a mut Conn,
        worker: usize,
        seq: u64,
    ) -> BoxFut<'a, Result<u32, String>> {
        self.inner.run(c, worker + self.add, seq)
    }
}

/// `conns` connections spread over `addrs` (worker numbers distinct across them), run at once.
pub async fn run_split(
    addrs: &[std::net::SocketAddr],
    signer: &Arc<Signer>,
    op: &Arc<dyn Op>,
    conns: usize,
    duration: Duration,
) -> Result<Outcome, String> {
    let mut tasks = Vec::new();
    let mut given = 0;
    for (i, addr) in addrs.iter().enumerate() {
        let n = (conns - given) / (addrs.len() - i);
        let shifted: Arc<dyn Op> = Arc::new(Shifted {
            inner: op.clone(),
            add: given,
        });
        given += n;
        let plan = Plan {
            conns: n,
            duration,
            rate: None,
            scrape: None,
        };
        tasks.push(tokio::spawn(load::run(
            *addr,
            signer.clone(),
            shifted,
            plan,
        )));
    }
    let mut total = Outcome::default();
    for t in tasks {
        let o = t.await.map_err(|e| e.to_string())??;
        total.ops += o.ops;
        total.requests += o.requests;
        total.errors += o.errors;
        if total.first_error.is_none() {
            total.first_error = o.first_error;
        }
        total.elapsed = total.elapsed.max(o.elapsed);
        total.lat_us.extend(o.lat_us);
    }
    total.lat_us.sort_unstable();
    Ok(total)
}

/// Add Pool of a Linux pool `pool` of `n` dedicated nodes backed by joined hosts
/// (`bluebatch.nodes=agents`).
pub async fn add_agents_pool(c: &mut Conn, pool: &str, n: u32) -> Result<(), String> {
    let body = crate::pool_body(pool, true, n);
    let mut v: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    v["metadata"] = serde_json::json!([{"name": "bluebatch.nodes", "value": "agents"}]);
    c.expect(
        &Spec::with(
            Method::POST,
            format!("/pools?api-version={V}"),
            v.to_string(),
        ),
        201,
    )
    .await?;
    Ok(())
}

/// Waits until `pool` is steady with `n` nodes, every one idle; their ids.
pub async fn wait_idle(
    c: &mut Conn,
    pool: &str,
    n: u32,
    limit: Duration,
) -> Result<Vec<String>, String> {
    crate::wait_pool(c, pool, n, limit).await?;
    let deadline = Instant::now() + limit;
    loop {
        let mut ids = Vec::new();
        let mut idle = 0;
        let mut next = Some(format!(
            "/pools/{pool}/nodes?api-version={V}&maxresults=1000&%24select=id,state"
        ));
        while let Some(pq) = next {
            let a = c.expect(&Spec::get(pq), 200).await?;
            let v: serde_json::Value =
                serde_json::from_slice(&a.body).map_err(|e| e.to_string())?;
            for x in v["value"].as_array().ok_or("no value array")? {
                ids.push(x["id"].as_str().ok_or("a node without id")?.to_string());
                idle += usize::from(x["state"] == "idle");
            }
            next = crate::next_link(&a.body);
        }
        if ids.len() == n as usize && idle == ids.len() {
            return Ok(ids);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{pool}: {idle} of {} nodes idle after {limit:?}",
                ids.len()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Capture from the statement log.

/// One statement as the server's log shows it.
#[derive(Clone, Debug)]
pub struct Logged {
    /// Milliseconds since the epoch (the log's resolution).
    at_ms: i64,
    pid: String,
    /// Extended protocol (`execute <name>:`) rather than a simple query (`statement:`).
    prepared: bool,
    pub sql: String,
    /// `$n` values as the log renders them (`None`: NULL).
    params: Vec<Option<String>>,
}

/// `2026-12-01 21:30:00.123 UTC` → ms since the epoch.
fn parse_ts(s: &str) -> Option<i64> {
    let f = time::macros::format_description!(
        "[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:3]"
    );
    let s = s.strip_suffix(" UTC")?;
    let t = time::PrimitiveDateTime::parse(s, f).ok()?.assume_utc();
    Some((t.unix_timestamp_nanos() / 1_000_000) as i64)
}

/// `$1 = '…', $2 = NULL, …` → values.
fn parse_params(s: &str) -> Vec<Option<String>> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        // `$n = `
        while i < b.len() && b[i] != b'=' {
            i += 1;
        }
        i += 1;
        while i < b.len() && b[i] == b' ' {
            i += 1;
        }
        if i >= b.len() {
            break;
        }
        if b[i] == b'\'' {
            let mut v = Vec::new();
            i += 1;
            while i < b.len() {
                if b[i] == b'\'' {
                    if i + 1 < b.len() && b[i + 1] == b'\'' {
                        v.push(b'\'');
                        i += 2;
                        continue;
                    }
                    i += 1;
                    break;
                }
                v.push(b[i]);
                i += 1;
            }
            out.push(Some(String::from_utf8_lossy(&v).into_owned()));
        } else {
            // NULL
            i += 4;
            out.push(None);
        }
        // `, `
        while i < b.len() && b[i] != b'$' {
            i += 1;
        }
    }
    out
}

/// The statements of the server's log from byte `from` on.
fn read_log(path: &Path, from: u64) -> Result<Vec<Logged>, String> {
    let all = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let text = String::from_utf8_lossy(&all[(from as usize).min(all.len())..]).into_owned();
    let mut out: Vec<Logged> = Vec::new();
    // Whether the last entry pushed may take continuation lines (its statement text).
    let mut open = false;
    for line in text.lines() {
        let head = line.get(..27).and_then(parse_ts);
        let Some(at_ms) = head else {
            if open && let Some(l) = out.last_mut() {
                l.sql.push(' ');
                l.sql.push_str(line.trim());
            }
            continue;
        };
        open = false;
        let rest = &line[28..];
        let (pid, rest) = match rest.strip_prefix('[').and_then(|r| r.split_once("] ")) {
            Some((p, r)) => (p.to_string(), r),
            None => continue,
        };
        if let Some(sql) = rest.strip_prefix("LOG:  statement: ") {
            out.push(Logged {
                at_ms,
                pid,
                prepared: false,
                sql: sql.to_string(),
                params: Vec::new(),
            });
            open = true;
        } else if let Some(r) = rest.strip_prefix("LOG:  execute ") {
            let sql = r.split_once(": ").map_or(r, |(_, s)| s);
            out.push(Logged {
                at_ms,
                pid,
                prepared: true,
                sql: sql.to_string(),
                params: Vec::new(),
            });
            open = true;
        } else if let Some(p) = rest.strip_prefix("DETAIL:  parameters: ")
            && let Some(l) = out.iter_mut().rev().find(|l| l.pid == pid)
        {
            l.params = parse_params(p);
        }
    }
    Ok(out)
}

/// What one Update User issued, with the revision the database had before it.
pub struct Capture {
    pub statements: Vec<Logged>,
    pub head_before: i64,
    /// How many of the sampled requests issued exactly this list.
    pub agreeing: usize,
    pub sampled: usize,
}

impl Capture {
    /// The list as printed: one line per statement, parameters elided (`$n`), grouped by the
    /// backend (connection) that ran it.
    pub fn listing(&self) -> String {
        let mut pids: Vec<&str> = Vec::new();
        let mut out = String::new();
        for l in &self.statements {
            let conn = match pids.iter().position(|p| *p == l.pid) {
                Some(i) => i,
                None => {
                    pids.push(&l.pid);
                    pids.len() - 1
                }
            };
            let sql: String = if l.sql.chars().count() > 110 {
                l.sql.chars().take(108).collect::<String>() + " …"
            } else {
                l.sql.clone()
            };
            out.push_str(&format!(
                "    conn {conn} {} {sql}\n",
                if l.prepared { "prepared" } else { "simple  " },
            ));
        }
        out
    }

    /// The whole list, statements in full (saved beside the scripts).
    pub fn full(&self) -> String {
        self.statements
            .iter()
            .map(|l| {
                format!(
                    "[{}] {} {}\n",
                    l.pid,
                    if l.prepared { "prepared" } else { "simple" },
                    l.sql
                )
            })
            .collect()
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Switches statement logging on, sends `samples` Update User one after another through `conn`
/// (worker `w`'s user), and keeps the statement list most of them issued.
pub async fn capture(
    cl: &Cluster,
    conn: &mut Conn,
    nodes: &[String],
    w: usize,
    samples: usize,
) -> Result<Capture, String> {
    cl.psql(
        "postgres",
        "ALTER SYSTEM SET log_statement = 'all'; SELECT pg_reload_conf()",
    )
    .or_else(|_| {
        cl.psql("postgres", "ALTER SYSTEM SET log_statement = 'all'")?;
        cl.psql("postgres", "SELECT pg_reload_conf()")
    })?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let from = std::fs::metadata(cl.log()).map(|m| m.len()).unwrap_or(0);
    let n = &nodes[w % nodes.len()];
    let spec = Spec::with(
        Method::PUT,
        format!("/pools/bench/nodes/{n}/users/u{w}?api-version={V}"),
        serde_json::json!({ "sshPublicKey": KEY }).to_string(),
    );
    let mut windows = Vec::new();
    for _ in 0..samples {
        let head: i64 = cl
            .psql("bench", "SELECT rev FROM bb_head WHERE id = 1")?
            .parse()
            .map_err(|_| "bb_head.rev is not a number")?;
        tokio::time::sleep(Duration::from_millis(40)).await;
        let t0 = now_ms();
        conn.expect(&spec, 200).await?;
        let t1 = now_ms();
        windows.push((t0 - 1, t1 + 1, head));
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    cl.psql("postgres", "ALTER SYSTEM RESET log_statement")?;
    cl.psql("postgres", "SELECT pg_reload_conf()")?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let logged = read_log(&cl.log(), from)?;
    let mut lists: Vec<(Vec<Logged>, i64)> = Vec::new();
    for (a, b, head) in &windows {
        let l: Vec<Logged> = logged
            .iter()
            .filter(|l| l.at_ms >= *a && l.at_ms <= *b)
            // psql's own queries of bb_head are outside the windows; never take them
            .cloned()
            .collect();
        lists.push((l, *head));
    }
    let sig = |l: &[Logged]| -> Vec<String> {
        let mut v: Vec<String> = l.iter().map(|x| x.sql.clone()).collect();
        v.sort();
        v
    };
    let mut counts: HashMap<Vec<String>, usize> = HashMap::new();
    for (l, _) in &lists {
        *counts.entry(sig(l)).or_default() += 1;
    }
    let (best, agreeing) = counts
        .into_iter()
        .max_by_key(|(k, c)| (*c, usize::MAX - k.len()))
        .ok_or("no request captured")?;
    let (statements, head_before) = lists
        .into_iter()
        .find(|(l, _)| sig(l) == best)
        .expect("the most common list is one of them");
    if statements.is_empty() {
        return Err(
            "no statement in the log during Update User (log_statement not in force?)".into(),
        );
    }
    Ok(Capture {
        statements,
        head_before,
        agreeing,
        sampled: samples,
    })
}

// ---------------------------------------------------------------------------------------------
// The pgbench script.

fn is_read(sql: &str) -> bool {
    let s = sql.trim_start().to_ascii_uppercase();
    s.starts_with("SELECT") || s.starts_with("WITH")
}

fn is_commit(sql: &str) -> bool {
    let s = sql.trim().trim_end_matches(';').to_ascii_uppercase();
    s == "COMMIT" || s == "ROLLBACK" || s == "END"
}

fn touches_revisions(sql: &str) -> bool {
    sql.contains("bb_head") || sql.contains("bb_changes")
}

/// A literal pgbench sends as it is: E'…' with `\`, `'` and `:` (pgbench's variable marker)
/// escaped.
fn literal(v: &str) -> String {
    let mut s = String::with_capacity(v.len() + 4);
    s.push_str("E'");
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '\'' => s.push_str("''"),
            ':' => s.push_str("\\072"),
            c => s.push(c),
        }
    }
    s.push('\'');
    s
}

/// `sql` with `$n` replaced by `vals[n-1]`; a `:` outside those (a cast `::`) is kept.
fn substitute(sql: &str, vals: &[String]) -> String {
    let b = sql.as_bytes();
    let mut out = String::with_capacity(sql.len() + 64);
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$' {
            let mut j = i + 1;
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            if j > i + 1
                && let Ok(n) = sql[i + 1..j].parse::<usize>()
                && n >= 1
                && n <= vals.len()
            {
                out.push_str(&vals[n - 1]);
                i = j;
                continue;
            }
        }
        let ch = sql[i..].chars().next().expect("in bounds");
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

/// The pgbench script replaying `cap` (see the module's comment for the rules).
pub fn script(cap: &Capture) -> (String, usize) {
    // Units: a backend's transaction (BEGIN … COMMIT) or one statement outside a transaction,
    // in the order of their first statement.
    let mut units: Vec<Vec<&Logged>> = Vec::new();
    let mut open: HashMap<&str, usize> = HashMap::new();
    for l in &cap.statements {
        if let Some(&u) = open.get(l.pid.as_str()) {
            units[u].push(l);
            if is_commit(&l.sql) {
                open.remove(l.pid.as_str());
            }
            continue;
        }
        units.push(vec![l]);
        let upper = l.sql.trim_start().to_ascii_uppercase();
        if upper.starts_with("BEGIN") || upper.starts_with("START TRANSACTION") {
            open.insert(&l.pid, units.len() - 1);
        }
    }
    let mut head = cap.head_before;
    let mut out = String::new();
    out.push_str("-- the SQL of one Update User, captured from the server's statement log\n");
    let mut trips = 0;
    for u in units {
        let mut own_update = false;
        let mut lines: Vec<(bool, String)> = Vec::new(); // (is a read, the command)
        for l in &u {
            let view = head + i64::from(own_update);
            let vals: Vec<String> = l
                .params
                .iter()
                .map(|p| match p {
                    None => "NULL".to_string(),
                    Some(v) => match v.parse::<i64>() {
                        Ok(x) if touches_revisions(&l.sql) && x > head - 50 && x <= head + 5 => {
                            format!("(SELECT rev + ({}) FROM bb_head WHERE id = 1)", x - view)
                        }
                        _ => literal(v),
                    },
                })
                .collect();
            if l.sql.contains("UPDATE bb_head") {
                own_update = true;
            }
            if l.prepared {
                lines.push((is_read(&l.sql), substitute(&l.sql, &vals)));
            } else {
                // A simple query may hold several statements; they are one round trip.
                let parts: Vec<String> = l
                    .sql
                    .split(';')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .map(literal_colons)
                    .collect();
                if parts.len() > 1 {
                    lines.push((
                        true,
                        format!("\\startpipeline\n{};\n\\endpipeline", parts.join(";\n")),
                    ));
                } else if let Some(p) = parts.into_iter().next() {
                    lines.push((is_read(&p), p));
                }
            }
        }
        if own_update {
            head += 1;
        }
        // Reads one by one; the writes after the last read, through COMMIT, in one pipeline.
        let last_read = lines.iter().rposition(|(r, _)| *r);
        let tail_from = last_read.map_or(0, |i| i + 1);
        let in_tx = u.len() > 1;
        let piped = in_tx && lines.len() - tail_from > 1;
        trips += if piped { tail_from + 1 } else { lines.len() };
        for (i, (_, cmd)) in lines.iter().enumerate() {
            if piped && i == tail_from {
                out.push_str("\\startpipeline\n");
            }
            out.push_str(cmd);
            if !cmd.ends_with("\\endpipeline") {
                out.push(';');
            }
            out.push('\n');
        }
        if piped {
            out.push_str("\\endpipeline\n");
        }
    }
    (out, trips)
}

/// A simple-query statement's text with `:` escaped for pgbench where it is not a cast.
fn literal_colons(sql: &str) -> String {
    // The server's simple queries (BEGIN, COMMIT, NOTIFY, the lock) have no literal colons.
    sql.to_string()
}

// ---------------------------------------------------------------------------------------------
// pgbench.

/// One pgbench run of `scripts` (weighted alike) on `db`: transactions per second over the run
/// (pgbench's own, excluding connection set-up) and each transaction's latency.
async fn pgbench(
    cl: &Cluster,
    db: &str,
    scripts: &[PathBuf],
    conns: usize,
    secs: u64,
    logdir: &Path,
) -> Result<Outcome, String> {
    let _ = std::fs::remove_dir_all(logdir);
    std::fs::create_dir_all(logdir).map_err(|e| e.to_string())?;
    let mut cmd = tokio::process::Command::new(pg_bin("pgbench"));
    cmd.args(["-n", "-M", "prepared", "-l", "--log-prefix"])
        .arg(logdir.join("tx"))
        .args(["-c", &conns.to_string(), "-j", &conns.to_string()])
        .args(["-T", &secs.to_string()])
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &cl.port.to_string(),
            "-U",
            "postgres",
        ]);
    for s in scripts {
        cmd.arg("-f").arg(format!("{}@1", s.display()));
    }
    let out = cmd
        .arg(db)
        .current_dir(logdir)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| format!("running pgbench: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() || err.contains("error") {
        return Err(format!(
            "pgbench failed: {}",
            err.lines().take(5).collect::<Vec<_>>().join(" | ")
        ));
    }
    let tps: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no tps in pgbench's output: {text}"))?;
    let mut lat = Vec::new();
    for e in std::fs::read_dir(logdir)
        .map_err(|e| e.to_string())?
        .flatten()
    {
        let t = std::fs::read_to_string(e.path()).unwrap_or_default();
        for l in t.lines() {
            // client_id transaction_no time script_no time_epoch time_us
            if let Some(us) = l
                .split_whitespace()
                .nth(2)
                .and_then(|v| v.parse::<u64>().ok())
            {
                lat.push(us.min(u64::from(u32::MAX)) as u32);
            }
        }
    }
    lat.sort_unstable();
    let n = lat.len() as u64;
    Ok(Outcome {
        ops: n,
        requests: n,
        // pgbench's rate (connection set-up excluded) stands for the slice's: n / (n / tps).
        elapsed: Duration::from_secs_f64(n as f64 / tps.max(1e-9)),
        lat_us: lat,
        ..Outcome::default()
    })
}

// ---------------------------------------------------------------------------------------------
// The scenario.

const NODES: u32 = 4;

/// Items 3: `pg` (one replica) and `pg2` (two replicas); the verdicts go to `rep`.
pub async fn measure(s: &Settings, rep: &mut Report) -> Result<(), String> {
    println!("\n== PostgreSQL store: Update User through replicas vs pgbench of its own SQL ==");
    let t_all = Instant::now();
    let cl = Cluster::start()?;
    println!(
        "  private PostgreSQL 15 cluster on 127.0.0.1:{} (fsync=on, synchronous_commit=on, \
         full_page_writes=on); {} connections on both sides",
        cl.port, s.conns
    );
    let store = cl.url("bench");
    let work = s.work.join("pg");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let a = replica(s, &work.join("replica-a"), &store).await?;
    let b = if s.want("pg2") {
        Some(replica(s, &work.join("replica-b"), &store).await?)
    } else {
        None
    };
    let signer = Arc::new(Signer::new(&a.account, &a.key)?);
    let mut ca = Conn::connect(a.addr, signer.clone()).await?;
    let agent = Agent::join(
        s,
        &mut ca,
        &format!("http://{}", a.addr),
        &work.join("agent"),
        NODES,
        "9800-9899",
    )
    .await?;
    add_agents_pool(&mut ca, "bench", NODES).await?;
    let nodes = Arc::new(wait_idle(&mut ca, "bench", NODES, Duration::from_secs(120)).await?);
    for w in 0..s.conns {
        let n = &nodes[w % nodes.len()];
        let body = serde_json::json!({"name": format!("u{w}"), "sshPublicKey": KEY}).to_string();
        ca.expect(
            &Spec::with(
                Method::POST,
                format!("/pools/bench/nodes/{n}/users?api-version={V}"),
                body,
            ),
            201,
        )
        .await?;
    }
    let op = crate::update_key_op(nodes.clone());
    let slice_secs = ((s.secs.as_secs_f64() / s.rounds as f64).round() as u64).max(1);

    let mut procs: Vec<(&str, Option<u32>)> = vec![("replica A", Some(a.pid))];
    if let Some(b) = &b {
        procs.push(("replica B", Some(b.pid)));
    }
    procs.push(("agent", agent.pid()));
    let mut replicas = vec![("A", a.addr)];
    if let Some(b) = &b {
        replicas.push(("B", b.addr));
    }
    let result = async {
        let warm = s.warmup.max(Duration::from_millis(500));
        let mut one_rate = None;
        if s.want("pg") {
            // Warm-up (also gives the revisions a height no other parameter has).
            run_split(&[a.addr], &signer, &op, s.conns, warm).await?;
            let cap = capture(&cl, &mut ca, &nodes, 0, 12).await?;
            let v = versus(
                s,
                &cl,
                &work,
                "one",
                &[&cap],
                &[&[a.addr]],
                &signer,
                &op,
                slice_secs,
                &procs,
                &replicas,
            )
            .await?;
            let (bench, one) = (&v[0], &v[1]);
            report(rep, "one replica", s.conns, one, bench, &cap, None);
            let r1 = one.ops_per_sec() / bench.ops_per_sec();
            rep.check(
                "PostgreSQL: Update User through one replica, vs pgbench of its SQL",
                "≥ 0.6",
                format!(
                    "{r1:.3} ({:.0}/s vs {:.0}/s)",
                    one.ops_per_sec(),
                    bench.ops_per_sec()
                ),
                r1 >= 0.6,
            );
            one_rate = Some(one.ops_per_sec());
        }
        if let Some(b) = &b {
            run_split(&[a.addr, b.addr], &signer, &op, s.conns, warm).await?;
            // Half the requests are written through the replica the agent polls, half through
            // the other one (whose write learns of the acknowledgement through the database).
            let mut cb = Conn::connect(b.addr, signer.clone()).await?;
            let cap_a = capture(&cl, &mut ca, &nodes, 0, 12).await?;
            let cap_b = capture(&cl, &mut cb, &nodes, 1, 12).await?;
            drop(cb);
            // pgbench, the load split over both replicas, and the load on each of them alone,
            // alternating: "not slower than one" compares slices of the same minutes.
            let v = versus(
                s,
                &cl,
                &work,
                "two",
                &[&cap_a, &cap_b],
                &[&[a.addr, b.addr], &[a.addr], &[b.addr]],
                &signer,
                &op,
                slice_secs,
                &procs,
                &replicas,
            )
            .await?;
            let (bench, two, one, other) = (&v[0], &v[1], &v[2], &v[3]);
            report(
                rep,
                "two replicas",
                s.conns,
                two,
                bench,
                &cap_a,
                Some(&cap_b),
            );
            rep.row(
                "(g) Update User, one of the two replicas alone",
                s.conns,
                one,
                format!(
                    "two/one {:.3}{}",
                    two.ops_per_sec() / one.ops_per_sec(),
                    one_rate.map_or(String::new(), |r| format!(
                        "; one-replica run above: {r:.0}/s"
                    ))
                ),
            );
            // Through B alone, each change reaches the agent's replica and the acknowledgement
            // comes back by NOTIFY: what writing through a replica the agent does not poll costs.
            rep.row(
                "(g) Update User, the other replica alone",
                s.conns,
                other,
                format!(
                    "{:.3} of the agent's replica alone (the agent polls A; B learns of each acknowledgement by NOTIFY)",
                    other.ops_per_sec() / one.ops_per_sec()
                ),
            );
            let r2 = two.ops_per_sec() / bench.ops_per_sec();
            rep.check(
                "PostgreSQL: Update User through two replicas, vs pgbench of its SQL",
                "≥ 0.6",
                format!(
                    "{r2:.3} ({:.0}/s vs {:.0}/s)",
                    two.ops_per_sec(),
                    bench.ops_per_sec()
                ),
                r2 >= 0.6,
            );
            // Noise margin: 5 %, about what two equal alternating runs differ by here.
            let rel = two.ops_per_sec() / one.ops_per_sec();
            rep.check(
                "PostgreSQL: two replicas not slower than one (alternating slices)",
                "≥ 0.95 (5 % noise margin)",
                format!(
                    "{rel:.3} ({:.0}/s vs {:.0}/s)",
                    two.ops_per_sec(),
                    one.ops_per_sec()
                ),
                rel >= 0.95,
            );
        }
        Ok::<(), String>(())
    }
    .await;
    drop(ca);
    agent.stop().await;
    a.stop().await;
    if let Some(b) = b {
        b.stop().await;
    }
    drop(cl);
    println!(
        "  (PostgreSQL scenarios took {:.1} s)",
        t_all.elapsed().as_secs_f64()
    );
    result
}

/// A replica's store commits: how many, the writes they made durable, their time (sums of
/// `bluebatch_store_commit_batch_size` and `bluebatch_store_commit_duration_seconds`).
#[derive(Clone, Default)]
struct Commits {
    commits: f64,
    writes: f64,
    seconds: f64,
}

impl Commits {
    /// The totals `addr` serves now (zero if it does not answer: the line then says 0 commits).
    async fn scrape(addr: std::net::SocketAddr) -> Commits {
        let mut c = Commits::default();
        let Some(text) = crate::lag::metrics_text(addr).await else {
            return c;
        };
        for line in text.lines() {
            let Some((name, v)) = line.rsplit_once(' ') else {
                continue;
            };
            let v: f64 = v.parse().unwrap_or(0.0);
            match name {
                "bluebatch_store_commit_batch_size_count" => c.commits = v,
                "bluebatch_store_commit_batch_size_sum" => c.writes = v,
                "bluebatch_store_commit_duration_seconds_sum" => c.seconds = v,
                _ => {}
            }
        }
        c
    }

    fn add_difference(&mut self, after: &Commits, before: &Commits) {
        self.commits += after.commits - before.commits;
        self.writes += after.writes - before.writes;
        self.seconds += after.seconds - before.seconds;
    }

    fn describe(&self, name: &str, secs: f64) -> String {
        if self.commits < 0.5 {
            return format!("{name} none");
        }
        format!(
            "{name} {:.0}/s of {:.1} writes, {:.2} ms each",
            self.commits / secs,
            self.writes / self.commits,
            self.seconds / self.commits * 1000.0
        )
    }
}

/// Writes the scripts, copies the database for pgbench, and alternates pgbench and the load.
#[allow(clippy::too_many_arguments)]
async fn versus(
    s: &Settings,
    cl: &Cluster,
    work: &Path,
    tag: &str,
    caps: &[&Capture],
    loads: &[&[std::net::SocketAddr]],
    signer: &Arc<Signer>,
    op: &Arc<dyn Op>,
    slice_secs: u64,
    procs: &[(&str, Option<u32>)],
    replicas: &[(&str, std::net::SocketAddr)],
) -> Result<Vec<Outcome>, String> {
    let mut scripts = Vec::new();
    for (i, cap) in caps.iter().enumerate() {
        let p = work.join(format!("update-user-{tag}-{i}.sql"));
        let (text, trips) = script(cap);
        let commits = cap.statements.iter().filter(|l| is_commit(&l.sql)).count();
        println!(
            "  replay script {}: {} statements, {commits} transactions, {trips} round trips",
            p.display(),
            cap.statements.len()
        );
        std::fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))?;
        let _ = std::fs::write(p.with_extension("statements.txt"), cap.full());
        // Readable by pgbench only (it holds the records' values).
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600));
        scripts.push(p);
    }
    let replay = format!("replay_{tag}");
    cl.copy_db("bench", &replay)?;
    let logdir = work.join(format!("pgbench-{tag}"));
    // Warm-up of pgbench (its prepared statements, the copy's caches).
    pgbench(cl, &replay, &scripts, s.conns, 1, &logdir).await?;
    let mut out: Vec<Outcome> = (0..=loads.len()).map(|_| Outcome::default()).collect();
    // CPU time of each process (and of PostgreSQL) per phase: where the time goes.
    let cpu_now = || -> Vec<f64> {
        let mut v: Vec<f64> = procs.iter().map(|(_, p)| p.map_or(0.0, cpu_ms)).collect();
        v.push(cl.cpu_ms());
        v
    };
    let mut spent = vec![vec![0.0; procs.len() + 1]; out.len()];
    // Each replica's store commits during each load (a difference of two scrapes).
    let mut commits = vec![vec![Commits::default(); replicas.len()]; loads.len()];
    for _ in 0..s.rounds {
        let c0 = cpu_now();
        out[0].merge(pgbench(cl, &replay, &scripts, s.conns, slice_secs, &logdir).await?);
        for (x, (now, was)) in spent[0].iter_mut().zip(cpu_now().iter().zip(&c0)) {
            *x += now - was;
        }
        for (i, addrs) in loads.iter().enumerate() {
            let mut before = Vec::new();
            for (_, addr) in replicas {
                before.push(Commits::scrape(*addr).await);
            }
            let c0 = cpu_now();
            out[i + 1].merge(
                run_split(addrs, signer, op, s.conns, Duration::from_secs(slice_secs)).await?,
            );
            for (x, (now, was)) in spent[i + 1].iter_mut().zip(cpu_now().iter().zip(&c0)) {
                *x += now - was;
            }
            for (j, (_, addr)) in replicas.iter().enumerate() {
                let after = Commits::scrape(*addr).await;
                commits[i][j].add_difference(&after, &before[j]);
            }
        }
    }
    for o in &mut out {
        o.finish();
    }
    let names: Vec<&str> = procs
        .iter()
        .map(|(n, _)| *n)
        .chain(["PostgreSQL"])
        .collect();
    for (i, (o, sp)) in out.iter().zip(&spent).enumerate() {
        let what = if i == 0 {
            "pgbench transaction".to_string()
        } else {
            format!("Update User through {} replica(s)", loads[i - 1].len())
        };
        println!(
            "  CPU per {what} ({} done; 10 ms ticks): {}",
            o.ops,
            names
                .iter()
                .zip(sp)
                .map(|(n, ms)| format!("{n} {:.2} ms", ms / o.ops.max(1) as f64))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for (i, per) in commits.iter().enumerate() {
        let names: Vec<&str> = loads[i]
            .iter()
            .filter_map(|a| replicas.iter().find(|(_, r)| r == a).map(|(n, _)| *n))
            .collect();
        let secs = out[i + 1].elapsed.as_secs_f64().max(1e-9);
        let total: f64 = per.iter().map(|c| c.commits).sum();
        println!(
            "  store commits during Update User through {}: {} ({:.2} commits per Update User; from each replica's /_bluebatch/metrics)",
            names.join(" + "),
            replicas
                .iter()
                .zip(per)
                .map(|((n, _), c)| c.describe(n, secs))
                .collect::<Vec<_>>()
                .join("; "),
            total / out[i + 1].ops.max(1) as f64
        );
    }
    let _ = cl.psql(
        "postgres",
        &format!("DROP DATABASE IF EXISTS {replay} WITH (FORCE)"),
    );
    Ok(out)
}

fn report(
    rep: &mut Report,
    what: &str,
    conns: usize,
    srv: &Outcome,
    bench: &Outcome,
    cap: &Capture,
    cap2: Option<&Capture>,
) {
    println!(
        "  statements of one Update User ({what}; {} of {} sampled requests issued exactly these{}):",
        cap.agreeing,
        cap.sampled,
        if cap2.is_some() {
            "; written through the replica the agent polls"
        } else {
            ""
        }
    );
    print!("{}", cap.listing());
    if let Some(c2) = cap2 {
        println!(
            "  and written through the other replica ({} of {} agreeing):",
            c2.agreeing, c2.sampled
        );
        print!("{}", c2.listing());
    }
    rep.row(
        &format!("(g) pgbench, that SQL [{what}: ceiling]"),
        conns,
        bench,
        "1.00".into(),
    );
    rep.row(
        &format!("(g) Update User, PostgreSQL, {what}"),
        conns,
        srv,
        format!(
            "{:.3} of pgbench [{:.0}/s alongside]",
            srv.ops_per_sec() / bench.ops_per_sec(),
            bench.ops_per_sec()
        ),
    );
    if srv.ops_per_sec() > bench.ops_per_sec() {
        println!(
            "  (above 1: under load a replica commits the writes queued at its gate as one \
             transaction, one WAL flush for several requests; pgbench replays one request's \
             statements per transaction, as one request alone issues them)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_log_parameters() {
        assert_eq!(
            parse_params("$1 = 'a''b', $2 = NULL, $3 = '{\"x\": 1}'"),
            vec![Some("a'b".into()), None, Some("{\"x\": 1}".into())]
        );
    }

    #[test]
    fn substitutes_placeholders_and_escapes_colons() {
        let v = vec![literal("12:00"), "NULL".into()];
        assert_eq!(
            substitute("SELECT $1::text, $2, $10", &v),
            "SELECT E'12\\07200'::text, NULL, $10"
        );
    }

    fn logged(pid: &str, prepared: bool, sql: &str, params: &[Option<&str>]) -> Logged {
        Logged {
            at_ms: 0,
            pid: pid.into(),
            prepared,
            sql: sql.into(),
            params: params.iter().map(|p| p.map(String::from)).collect(),
        }
    }

    #[test]
    fn script_pipelines_writes_and_takes_revisions_from_the_head() {
        let cap = Capture {
            statements: vec![
                logged("1", true, "SELECT rev FROM bb_head WHERE id = 1", &[]),
                logged(
                    "2",
                    false,
                    "BEGIN; SELECT rev, low FROM bb_head WHERE id = 1 FOR UPDATE",
                    &[],
                ),
                logged(
                    "2",
                    true,
                    "INSERT INTO bb_users (a, t, v) VALUES ($1, $2, $3)",
                    &[Some("u:0"), Some("12:00"), None],
                ),
                logged(
                    "2",
                    true,
                    "INSERT INTO bb_changes (rev, seq) VALUES ($1, $2)",
                    &[Some("1001"), Some("0")],
                ),
                logged(
                    "2",
                    true,
                    "UPDATE bb_head SET rev = $1, low = $2 WHERE id = 1",
                    &[Some("1001"), Some("0")],
                ),
                logged("2", false, "COMMIT", &[]),
            ],
            head_before: 1000,
            agreeing: 1,
            sampled: 1,
        };
        let (text, trips) = script(&cap);
        assert_eq!(trips, 3, "{text}");
        let body: Vec<&str> = text.lines().skip(1).collect();
        assert_eq!(
            body,
            vec![
                "SELECT rev FROM bb_head WHERE id = 1;",
                "\\startpipeline",
                "BEGIN;",
                "SELECT rev, low FROM bb_head WHERE id = 1 FOR UPDATE;",
                "\\endpipeline",
                "\\startpipeline",
                "INSERT INTO bb_users (a, t, v) VALUES (E'u\\0720', E'12\\07200', NULL);",
                "INSERT INTO bb_changes (rev, seq) VALUES ((SELECT rev + (1) FROM bb_head WHERE id = 1), E'0');",
                "UPDATE bb_head SET rev = (SELECT rev + (1) FROM bb_head WHERE id = 1), low = E'0' WHERE id = 1;",
                "COMMIT;",
                "\\endpipeline",
            ]
        );
    }

    #[test]
    fn log_timestamps() {
        assert_eq!(parse_ts("1970-01-01 00:00:01.234 UTC"), Some(1234));
    }
}
