//! Harness of the multi-replica suites (replicas*.rs): a fresh PostgreSQL database per test on
//! the cluster `BLUEBATCH_TEST_PG` names (dropped at the end), N `bluebatch serve --store
//! postgres://… --nodes agents` replicas on it, a client that alternates its requests between
//! them, `bluebatch agent --simulate N` joined to a chosen replica, SIGKILL and restart of a
//! replica, and a PostgreSQL cluster of a test's own for the tests that stop or restart it (the
//! shared cluster is never restarted: other tests use it at the same time).
//!
//! Without `BLUEBATCH_TEST_PG` every test here prints a loud skip and passes, except under CI
//! (`CI=true`), where that is a failure.
#![allow(dead_code)]

use super::{ACCOUNT, Client, KEY, Req, Resp, agents, in_ci, text, within};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The deadline of one request of the harness.
const T: Duration = Duration::from_secs(20);
/// How long a replica may take to listen (it connects and migrates first).
const START: Duration = Duration::from_secs(40);

/// `bluebatch serve` with `args` (and `env`), expected to exit by itself within 30 s: its exit
/// code and stderr.
pub fn serve_exits(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("timeout")
        .args(["-k", "5", "30"])
        .arg(env!("CARGO_BIN_EXE_bluebatch"))
        .args(["serve", "--port", "0", "--data-dir"])
        .arg(dir.path())
        .args(args)
        .env("BLUEBATCH_LOG", "warn")
        .env_remove("BLUEBATCH_STORE")
        .env_remove("BLUEBATCH_NODES")
        .env_remove("BLUEBATCH_ACCOUNTS")
        .env_remove("BLUEBATCH_ACCOUNTS_FILE")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("running bluebatch serve");
    let code = out.status.code();
    assert_ne!(
        code,
        Some(124),
        "bluebatch serve {args:?} did not exit within 30 s"
    );
    (code, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Where Debian's PostgreSQL 15 binaries are (`BLUEBATCH_PG_BIN` overrides).
pub fn pg_bin(tool: &str) -> PathBuf {
    let dir = std::env::var("BLUEBATCH_PG_BIN")
        .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".to_string());
    let p = Path::new(&dir).join(tool);
    if p.exists() { p } else { PathBuf::from(tool) }
}

/// `BLUEBATCH_TEST_PG` (a base URL such as `postgres://postgres@127.0.0.1:54329/postgres`, a
/// password if any in PGPASSWORD/PGPASSFILE), or `None` after a loud skip note; under CI its
/// absence fails the test.
pub fn pg_base() -> Option<String> {
    match std::env::var("BLUEBATCH_TEST_PG") {
        Ok(v) if !v.trim().is_empty() => Some(v.trim().to_string()),
        _ => {
            if in_ci() {
                panic!(
                    "missing prerequisite: BLUEBATCH_TEST_PG (a PostgreSQL 15 cluster; \
                     scripts/pg.sh start; CI is set: this is a failure, not a skip)"
                );
            }
            eprintln!(
                "\n!!! SKIPPED (no BLUEBATCH_TEST_PG): the multi-replica checks need a PostgreSQL \
                 15 cluster (scripts/pg.sh start, then BLUEBATCH_TEST_PG=$(scripts/pg.sh url)); \
                 under CI=true this fails.\n"
            );
            None
        }
    }
}

/// `url` with its database (the path) replaced by `db`; the query string is kept.
pub fn with_database(url: &str, db: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a postgres:// URL");
    let (before_query, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    let authority = before_query.split('/').next().unwrap();
    match query {
        Some(q) => format!("{scheme}://{authority}/{db}?{q}"),
        None => format!("{scheme}://{authority}/{db}"),
    }
}

/// Runs one SQL statement with psql against `url` (at most 30 s); its output, unaligned and
/// tuples only. Panics when psql fails.
pub fn psql(url: &str, sql: &str) -> String {
    try_psql(url, sql).unwrap_or_else(|e| panic!("psql {sql:?}: {e}"))
}

/// [`psql`], an error instead of a panic.
pub fn try_psql(url: &str, sql: &str) -> Result<String, String> {
    let out = Command::new("timeout")
        .args(["-k", "5", "30"])
        .arg(pg_bin("psql"))
        .args([
            "-X",
            "-q",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            url,
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
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

static DATABASES: AtomicU32 = AtomicU32::new(0);

/// A database of this test alone, `bbtest_<pid>_<n>`; dropped (best effort) when dropped.
pub struct TestDb {
    /// The URL of the database the database was created from (its cluster).
    pub base: String,
    pub name: String,
    /// The URL of this database (what `--store` takes).
    pub url: String,
}

impl TestDb {
    /// A fresh database on `BLUEBATCH_TEST_PG`, or `None` (skipped, see [`pg_base`]).
    pub fn create() -> Option<TestDb> {
        Some(Self::create_on(&pg_base()?))
    }

    /// A fresh database on the cluster of `base`.
    pub fn create_on(base: &str) -> TestDb {
        let name = format!(
            "bbtest_{}_{}",
            std::process::id(),
            DATABASES.fetch_add(1, Ordering::Relaxed)
        );
        psql(
            base,
            &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        );
        psql(base, &format!("CREATE DATABASE {name}"));
        TestDb {
            base: base.to_string(),
            url: with_database(base, &name),
            name,
        }
    }

    /// [`psql`] on this database.
    pub fn sql(&self, sql: &str) -> String {
        psql(&self.url, sql)
    }

    /// Freezes process `pid` (SIGSTOP) at a moment when it holds no transaction open on this
    /// database (a replica frozen inside one would hold the store-wide write lock, and every
    /// other replica's writes would wait for the server to end it): stopped, then, if a session
    /// of the database has sat idle in a transaction for over 300 ms (only a frozen client does),
    /// resumed and stopped again a moment later.
    pub async fn freeze_outside_transaction(&self, pid: u32) {
        for _ in 0..50 {
            unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
            tokio::time::sleep(std::time::Duration::from_millis(400)).await;
            let stuck = self.sql(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND state LIKE 'idle in transaction%' AND now() - state_change > interval '300 ms'",
            );
            if stuck == "0" {
                return;
            }
            unsafe { libc::kill(pid as i32, libc::SIGCONT) };
            tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        }
        panic!("process {pid} was inside a transaction at every one of 50 tries to freeze it");
    }

    /// Who holds lease `name` now (an unexpired row of `bb_leases`), if anyone.
    pub fn lease_holder(&self, name: &str) -> Option<String> {
        let out = try_psql(
            &self.url,
            &format!(
                "SELECT holder FROM bb_leases WHERE name = '{name}' AND expires > now() \
                 AND holder IS NOT NULL AND holder <> ''"
            ),
        )
        .ok()?;
        let h = out.lines().next().unwrap_or("").trim().to_string();
        (!h.is_empty()).then_some(h)
    }

    /// Waits (at most `limit`) until lease `name` is held by someone other than `not`.
    pub async fn wait_lease(&self, name: &str, not: Option<&str>, limit: Duration) -> String {
        within(
            limit,
            &format!("lease {name} held (not by {not:?})"),
            async {
                loop {
                    if let Some(h) = self.lease_holder(name)
                        && Some(h.as_str()) != not
                    {
                        return h;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            },
        )
        .await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let _ = try_psql(
            &self.base,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

/// A free loopback TCP port (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One `bluebatch serve --store postgres://… --nodes agents` process on a fixed port (so it
/// can be restarted where clients and agents find it again), with its own data directory.
pub struct Replica {
    pub child: Option<Child>,
    pub url: String,
    pub port: u16,
    /// Every line the replica printed on stdout (its banner).
    pub banner: Arc<Mutex<Vec<String>>>,
    args: Vec<String>,
}

impl Replica {
    /// Starts a replica on `store` with `--data-dir data` and `extra` (and `--node-step-ms 20`
    /// unless `extra` sets it); waits (at most 40 s) for it to listen.
    pub fn start(store: &str, data: &Path, extra: &[&str]) -> Replica {
        let mut args: Vec<String> = Vec::new();
        if !extra.contains(&"--node-step-ms") {
            args.extend(["--node-step-ms".to_string(), "20".to_string()]);
        }
        args.extend([
            "--store".into(),
            store.into(),
            "--nodes".into(),
            "agents".into(),
            "--data-dir".into(),
            data.to_str().unwrap().into(),
        ]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut r = Replica {
            child: None,
            url: String::new(),
            port: free_port(),
            banner: Arc::new(Mutex::new(Vec::new())),
            args,
        };
        r.launch();
        r
    }

    fn launch(&mut self) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_bluebatch"))
            .args(["serve", "--port", &self.port.to_string()])
            .args(&self.args)
            .env("BLUEBATCH_LOG", "warn")
            .env_remove("BLUEBATCH_ACCOUNTS")
            .env_remove("BLUEBATCH_ACCOUNTS_FILE")
            .env_remove("BLUEBATCH_STORE")
            .env_remove("BLUEBATCH_NODES")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting bluebatch serve");
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let banner = self.banner.clone();
        banner.lock().unwrap().clear();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(u) = line.strip_prefix("bluebatch listening on ") {
                    let _ = tx.send(u.trim().to_string());
                }
                banner.lock().unwrap().push(line);
            }
        });
        let deadline = Instant::now() + START;
        let url = loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(u) => break u,
                Err(_) if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "bluebatch serve {:?} did not listen within {START:?}",
                        self.args
                    );
                }
                Err(_) => {
                    if let Some(st) = child.try_wait().unwrap() {
                        panic!(
                            "bluebatch serve {:?} exited before listening: {st}",
                            self.args
                        );
                    }
                }
            }
        };
        self.url = url;
        self.child = Some(child);
    }

    /// The banner line that starts with `prefix`, waited for (at most 5 s).
    pub fn banner_line(&self, prefix: &str) -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(l) = self
                .banner
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.starts_with(prefix))
            {
                return Some(l.clone());
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn client(&self) -> Client {
        Client::new(&self.url, ACCOUNT, KEY)
    }

    /// SIGKILL (nothing drained, nothing released: its leases run out by themselves).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits (at most `limit`) for it to exit; its exit status.
    pub fn terminate(&mut self, limit: Duration) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("the replica is running");
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("the replica did not exit within {limit:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts it again (after [`Replica::kill`]) on the same port, store and data directory.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// N replicas on one fresh database, and a client per replica.
pub struct Replicas {
    pub replicas: Vec<Replica>,
    pub clients: Vec<Client>,
    turn: AtomicUsize,
    pub extra: Vec<String>,
    /// Declared last: dropped after the replicas stopped.
    pub db: TestDb,
    pub dir: tempfile::TempDir,
}

impl Replicas {
    /// `n` replicas on a fresh database of `BLUEBATCH_TEST_PG`, or `None` (skipped).
    pub fn start(n: usize) -> Option<Replicas> {
        Self::start_with(n, &[])
    }

    /// As [`Replicas::start`], each replica with the `serve` arguments `extra`.
    pub fn start_with(n: usize, extra: &[&str]) -> Option<Replicas> {
        Some(Self::start_on(TestDb::create()?, n, extra))
    }

    /// `n` replicas on `db`; they start at the same time (migrations race, as in a rollout).
    pub fn start_on(db: TestDb, n: usize, extra: &[&str]) -> Replicas {
        let dir = tempfile::tempdir().unwrap();
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let store = db.url.clone();
                let data = dir.path().join(format!("replica{i}"));
                let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
                std::thread::spawn(move || {
                    let e: Vec<&str> = extra.iter().map(String::as_str).collect();
                    Replica::start(&store, &data, &e)
                })
            })
            .collect();
        let replicas: Vec<Replica> = handles
            .into_iter()
            .map(|h| h.join().expect("a replica did not start"))
            .collect();
        let clients = replicas.iter().map(Replica::client).collect();
        Replicas {
            replicas,
            clients,
            turn: AtomicUsize::new(0),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            db,
            dir,
        }
    }

    /// Starts one more replica on the same database; its index.
    pub fn add(&mut self) -> usize {
        let i = self.replicas.len();
        let data = self.dir.path().join(format!("replica{i}"));
        let e: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let r = Replica::start(&self.db.url, &data, &e);
        self.clients.push(r.client());
        self.replicas.push(r);
        i
    }

    /// The client of replica `i`.
    pub fn at(&self, i: usize) -> &Client {
        &self.clients[i]
    }

    /// The client of the next replica in turn (every call moves to the next one).
    pub fn next(&self) -> &Client {
        let i = self.turn.fetch_add(1, Ordering::Relaxed) % self.clients.len();
        &self.clients[i]
    }

    /// A request to the next replica in turn.
    pub fn req<'a>(&'a self, method: &'a str, path: &str) -> Req<'a> {
        self.next().req(method, path)
    }

    pub fn url(&self, i: usize) -> &str {
        &self.replicas[i].url
    }

    /// `bluebatch agent --simulate n` (ports `ports`) joined with a token minted through replica
    /// `via`, polling replica `polls`, its state in a fresh directory (kept while both live).
    pub async fn agent(
        &self,
        via: usize,
        polls: usize,
        n: u32,
        ports: &str,
    ) -> (tempfile::TempDir, SimAgent) {
        let dir = tempfile::tempdir().unwrap();
        let agent = within(T, "the agent to start", async {
            SimAgent::join(
                self.at(via),
                self.url(polls),
                &dir.path().join("agent"),
                n,
                ports,
            )
            .await
        })
        .await;
        (dir, agent)
    }

    pub fn kill(&mut self, i: usize) {
        self.replicas[i].kill();
    }

    pub fn restart(&mut self, i: usize) {
        self.replicas[i].restart();
    }
}

/// `GET /_bluebatch/ready` (no auth) on `base`: the answer, or `None` without one within 10 s.
pub async fn ready(base: &str) -> Option<Resp> {
    let r = reqwest::Client::new()
        .get(format!("{base}/_bluebatch/ready"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .ok()?;
    Some(super::respond(r).await)
}

/// Waits (at most `limit`) until `base` answers `GET /_bluebatch/ready` with `status`.
pub async fn wait_ready(base: &str, status: u16, limit: Duration) -> Resp {
    within(
        limit,
        &format!("{base}/_bluebatch/ready to be {status}"),
        async {
            loop {
                if let Some(r) = ready(base).await
                    && r.status == status
                {
                    return r;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        },
    )
    .await
}

/// A running `bluebatch agent --simulate N`; killed (SIGKILL) when dropped.
pub struct SimAgent {
    pub child: Child,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl SimAgent {
    /// `bluebatch agent --server url --simulate n` with its state in `state`, joined with a
    /// token made through `via` (any replica: the token is in the database) and SSH ports from
    /// `ports` (`A-B`).
    pub async fn join(via: &Client, url: &str, state: &Path, n: u32, ports: &str) -> SimAgent {
        let token = agents::token(via, None).await;
        Self::spawn(url, state, Some(&token), n, ports)
    }

    /// Starts the agent again with its stored identity (no token).
    pub fn resume(url: &str, state: &Path, n: u32, ports: &str) -> SimAgent {
        Self::spawn(url, state, None, n, ports)
    }

    fn spawn(url: &str, state: &Path, token: Option<&str>, n: u32, ports: &str) -> SimAgent {
        let mut c = Command::new(env!("CARGO_BIN_EXE_bluebatch"));
        c.args(["agent", "--server", url, "--simulate", &n.to_string()])
            .args(["--ssh-ports", ports])
            .arg("--state-dir")
            .arg(state)
            .env("BLUEBATCH_LOG", "warn,russh=warn")
            .env_remove("BLUEBATCH_JOIN_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(t) = token {
            // In the environment, never in the arguments.
            c.env("BLUEBATCH_JOIN_TOKEN", format!("{t}\n"));
        }
        let mut child = c.spawn().expect("starting bluebatch agent");
        let log = agents::agent_log(&mut child);
        SimAgent { child, log }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for SimAgent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Add Pool `id` (`pool_body`, `nodes` dedicated nodes) through `c`: 201 or the test fails.
pub async fn add_pool(c: &Client, id: &str, nodes: u32) {
    let r = c
        .req("POST", "/pools")
        .json(&super::pool_body(id, nodes))
        .send_within(T)
        .await;
    assert_eq!(r.status, 201, "Add Pool {id}: {}", text(&r));
}

/// Add Pool `id` with `nodes` nodes through `make`, then its node ids once `seen_on` shows it
/// steady with them all idle (at most 30 s).
pub async fn add_steady_pool(make: &Client, id: &str, nodes: u32, seen_on: &Client) -> Vec<String> {
    add_pool(make, id, nodes).await;
    steady_nodes(seen_on, id, nodes as usize, Duration::from_secs(30)).await
}

/// Waits (at most `limit`) until `pool` is steady with `n` nodes, all idle (asking `c`); their
/// ids.
pub async fn steady_nodes(c: &Client, pool: &str, n: usize, limit: Duration) -> Vec<String> {
    within(
        limit,
        &format!("{pool}: steady with {n} idle nodes"),
        async {
            loop {
                let p = c
                    .req("GET", &format!("/pools/{pool}"))
                    .try_send_within(T)
                    .await;
                let l = c
                    .req("GET", &format!("/pools/{pool}/nodes"))
                    .try_send_within(T)
                    .await;
                if let (Ok(p), Ok(l)) = (p, l)
                    && p.status == 200
                    && l.status == 200
                {
                    let list = l.json()["value"].as_array().cloned().unwrap_or_default();
                    if p.json()["allocationState"] == "steady"
                        && list.len() == n
                        && list.iter().all(|x| x["state"] == "idle")
                    {
                        return list
                            .iter()
                            .map(|x| x["id"].as_str().unwrap().to_string())
                            .collect();
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        },
    )
    .await
}

/// Every id of a list at `path`, `page` per page, each page asked of the next of `clients` in
/// turn (an `odata.nextLink` of one replica followed on another). Asserts 200 and page sizes.
pub async fn list_across(clients: &[&Client], path: &str, page: u32) -> Vec<String> {
    let mut ids = Vec::new();
    let mut query = format!("api-version={}&maxresults={page}", super::V);
    for n in 0..10_000usize {
        let c = clients[n % clients.len()];
        let r = c.req("GET", path).query(&query).send_within(T).await;
        assert_eq!(
            r.status,
            200,
            "page {n} of {path} on {}: {}",
            c.base,
            text(&r)
        );
        let v = r.json();
        let list = v["value"].as_array().unwrap();
        assert!(list.len() <= page as usize, "{v}");
        ids.extend(list.iter().map(|p| p["id"].as_str().unwrap().to_string()));
        match v["odata.nextLink"].as_str() {
            None => return ids,
            Some(next) => {
                let (_, q) = next.split_once('?').expect("a nextLink with a query");
                assert!(next.contains(path), "{next}");
                query = q.to_string();
            }
        }
    }
    panic!("paging of {path} does not end");
}

/// A PostgreSQL cluster of a test's own (for tests that stop or restart the database; the
/// shared cluster is never restarted): `initdb` (as the `postgres` user when run as root,
/// initdb refuses root) in a fresh directory, listening on 127.0.0.1 and a free port, trust
/// authentication. Stopped (immediately) and removed when dropped.
pub struct PgCluster {
    pub dir: PathBuf,
    pub port: u16,
    as_postgres: bool,
}

static CLUSTERS: AtomicU32 = AtomicU32::new(0);

impl PgCluster {
    /// A running cluster of this test, or `None` (skipped: see [`pg_base`]; the tests that
    /// need one are the PostgreSQL tests, which `BLUEBATCH_TEST_PG` turns on).
    pub fn start() -> Option<PgCluster> {
        pg_base()?;
        let root = super::running_as_root();
        let dir = std::env::temp_dir().join(format!(
            "bbtest-pg-{}-{}",
            std::process::id(),
            CLUSTERS.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let c = PgCluster {
            dir,
            port: free_port(),
            as_postgres: root,
        };
        if root {
            let st = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&c.dir)
                .status()
                .unwrap();
            assert!(st.success(), "chown postgres {}", c.dir.display());
        }
        let out = c
            .run("initdb")
            .args(["-D"])
            .arg(c.dir.join("data"))
            .args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"])
            .output()
            .expect("running initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        c.start_again();
        Some(c)
    }

    /// `tool` of the PostgreSQL binaries, as the `postgres` user when the tests run as root.
    fn run(&self, tool: &str) -> Command {
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(pg_bin(tool));
            c
        } else {
            Command::new(pg_bin(tool))
        };
        cmd.current_dir(&self.dir).stdin(Stdio::null());
        cmd
    }

    /// The base URL (database `postgres`, user `postgres`).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the (stopped) cluster; waits (at most 60 s) until it accepts connections.
    pub fn start_again(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=off",
            self.port,
            self.dir.display()
        );
        let out = self
            .run("pg_ctl")
            .args(["-D"])
            .arg(self.dir.join("data"))
            .args(["-o", &opts, "-l"])
            .arg(self.dir.join("log"))
            .args(["-w", "-t", "60", "start"])
            .output()
            .expect("running pg_ctl start");
        assert!(
            out.status.success(),
            "pg_ctl start: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops the cluster (`-m immediate`: connections cut as in a crash; committed work is in
    /// the WAL); waits (at most 60 s).
    pub fn stop(&self) {
        let _ = self
            .run("pg_ctl")
            .args(["-D"])
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "-w", "-t", "60", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------
// Replica mode of the single-server suites: with BLUEBATCH_TEST_REPLICAS=1, `Server::start`,
// `Server::start_in` and `Server::start_with` start two replicas on one database of
// BLUEBATCH_TEST_PG behind tests/lb/rr_proxy.py (every request alternating between them) and a
// `bluebatch agent --simulate` for their nodes; the `Server`'s process is the proxy, its URL the
// proxy's. A data directory maps to one database (and one agent state), so a suite that restarts
// the service on its data directory finds its state again.

/// Whether the single-server suites run against two replicas (BLUEBATCH_TEST_REPLICAS set to
/// anything but empty or 0).
pub fn replica_mode() -> bool {
    std::env::var("BLUEBATCH_TEST_REPLICAS").is_ok_and(|v| !v.trim().is_empty() && v.trim() != "0")
}

/// What a replica-mode `Server` keeps running besides its proxy.
struct Fleet {
    _agent: SimAgent,
    _replicas: Vec<Replica>,
    /// Dropped (the database with it) after the replicas, when the server was in memory.
    _db: Option<TestDb>,
    _dir: Option<tempfile::TempDir>,
}

static FLEETS: Mutex<Vec<(u32, Fleet)>> = Mutex::new(Vec::new());
static FLEET_PORTS: AtomicU32 = AtomicU32::new(0);

/// Stops what the replica-mode server whose proxy is `pid` keeps running (none: nothing).
pub fn release(pid: u32) {
    let fleet = {
        let mut all = FLEETS.lock().unwrap_or_else(|e| e.into_inner());
        all.iter()
            .position(|(p, _)| *p == pid)
            .map(|i| all.remove(i).1)
    };
    drop(fleet);
}

/// The databases of data directories, dropped when the test process exits (a data directory
/// outlives each server started on it).
static AT_EXIT: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

extern "C" fn drop_databases() {
    let all = std::mem::take(&mut *AT_EXIT.lock().unwrap_or_else(|e| e.into_inner()));
    for (base, name) in all {
        let _ = try_psql(
            &base,
            &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        );
    }
}

fn drop_at_exit(base: &str, name: &str) {
    let mut all = AT_EXIT.lock().unwrap_or_else(|e| e.into_inner());
    if all.is_empty() {
        unsafe {
            libc::atexit(drop_databases);
        }
    }
    all.push((base.to_string(), name.to_string()));
}

/// tests/lb/rr_proxy.py in front of `upstreams` (each request to the next in turn); the proxy's
/// process and URL once it listens (at most 20 s).
pub fn start_proxy(upstreams: &[String]) -> (Child, String) {
    let mut proxy = Command::new("python3")
        .arg(repo_root().join("tests/lb/rr_proxy.py"))
        .args(["--port", "0"])
        .args(upstreams.iter().flat_map(|u| ["--upstream", u.as_str()]))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting tests/lb/rr_proxy.py");
    let (tx, rx) = std::sync::mpsc::channel();
    let out = proxy.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Some(u) = line.strip_prefix("rr_proxy listening on ") {
                let _ = tx.send(u.trim().to_string());
            }
        }
    });
    match rx.recv_timeout(T) {
        Ok(url) => (proxy, url),
        Err(_) => {
            let _ = proxy.kill();
            let _ = proxy.wait();
            panic!("rr_proxy did not listen within {T:?}");
        }
    }
}

/// A process killed (SIGKILL) and reaped when dropped.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The repository's root (for tests/lb).
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A replica-mode server for `Server::start_with(extra)`: `--in-memory` → a fresh database,
/// dropped with the server; `--data-dir D` → the database (and agent state) of D, kept.
pub fn fleet(extra: &[&str]) -> super::Server {
    let base = pg_base().expect("BLUEBATCH_TEST_REPLICAS needs BLUEBATCH_TEST_PG");
    let mut pass: Vec<&str> = Vec::new();
    let mut data: Option<PathBuf> = None;
    let mut it = extra.iter();
    while let Some(a) = it.next() {
        match *a {
            "--in-memory" => {}
            "--data-dir" => data = it.next().map(PathBuf::from),
            other => pass.push(other),
        }
    }
    let (db, url, root, dir) = match &data {
        None => {
            let db = TestDb::create_on(&base);
            let url = db.url.clone();
            let dir = tempfile::tempdir().unwrap();
            (Some(db), url, dir.path().to_path_buf(), Some(dir))
        }
        Some(d) => {
            use std::hash::{Hash, Hasher};
            std::fs::create_dir_all(d).unwrap();
            let mut h = std::collections::hash_map::DefaultHasher::new();
            std::fs::canonicalize(d).unwrap().hash(&mut h);
            let name = format!("bbtest_dir_{:016x}", h.finish());
            let exists = psql(
                &base,
                &format!("SELECT 1 FROM pg_database WHERE datname = '{name}'"),
            );
            if exists.trim() != "1" {
                psql(&base, &format!("CREATE DATABASE {name}"));
                drop_at_exit(&base, &name);
            }
            (None, with_database(&base, &name), d.clone(), None)
        }
    };
    let replicas: Vec<Replica> = (0..2)
        .map(|i| Replica::start(&url, &root.join(format!("replica{i}")), &pass))
        .collect();
    let urls: Vec<String> = replicas.iter().map(|r| r.url.clone()).collect();

    let (proxy, proxy_url) = start_proxy(&urls);

    // The agent: its state beside the data, so a restart on the same data finds its nodes.
    let state = root.join("fleet-agent");
    let first = FLEET_PORTS.fetch_add(1, Ordering::Relaxed) % 40;
    let ports = format!(
        "{}-{}",
        33000 + (std::process::id() % 20) * 1000 + first * 25,
        33000 + (std::process::id() % 20) * 1000 + first * 25 + 24
    );
    let ports_file = root.join("fleet-agent.ports");
    let ports = std::fs::read_to_string(&ports_file).unwrap_or(ports);
    std::fs::write(&ports_file, &ports).unwrap();
    let agent = if state.join("identity.json").exists() {
        SimAgent::resume(&proxy_url, &state, 16, &ports)
    } else {
        let out = Command::new(env!("CARGO_BIN_EXE_bluebatch"))
            .args(["join-token", "create", "--url", &proxy_url])
            .env_remove("BLUEBATCH_KEY")
            .env_remove("BLUEBATCH_ACCOUNT")
            .stdin(Stdio::null())
            .output()
            .expect("bluebatch join-token create");
        assert!(
            out.status.success(),
            "join-token create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let token = text.lines().next().unwrap_or_default().trim().to_string();
        SimAgent::spawn(&proxy_url, &state, Some(&token), 16, &ports)
    };
    // Wait (at most 30 s) until a host is connected.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new("timeout")
            .args(["-k", "5", "20"])
            .arg(env!("CARGO_BIN_EXE_bluebatch"))
            .args(["host", "list", "--json", "--url", &proxy_url])
            .env_remove("BLUEBATCH_KEY")
            .env_remove("BLUEBATCH_ACCOUNT")
            .stdin(Stdio::null())
            .output()
            .expect("bluebatch host list");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let hosts = v.get("value").cloned().unwrap_or(v);
        if hosts
            .as_array()
            .is_some_and(|a| a.iter().any(|h| h["connected"] == true))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the fleet's agent did not connect within 30 s: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    FLEETS.lock().unwrap_or_else(|e| e.into_inner()).push((
        proxy.id(),
        Fleet {
            _agent: agent,
            _replicas: replicas,
            _db: db,
            _dir: dir,
        },
    ));
    super::Server {
        child: proxy,
        url: proxy_url,
    }
}
