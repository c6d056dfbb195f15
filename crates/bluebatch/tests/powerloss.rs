//! Durability against power loss and a failing disk, with the data directory on `powerfail`, an
//! in-memory FUSE filesystem that keeps only what `fsync`/`fdatasync` saw across a simulated
//! power cut and fails `write` or `fsync` with EIO on demand (see crates/powerfail).
//!
//! * Power loss: several clients send Add User, Update User (each with a unique `expiryTime`) and
//!   Add Pool; at a random moment the server is SIGKILLed and the power cut (everything not
//!   synced is lost, data and directory entries alike); the server restarts on what is left, and
//!   every acknowledged change must be there: each user with its latest acknowledged expiry (read
//!   through the node-users control), each pool. A request that got no answer is either wholly
//!   there or not at all. A store that does not sync before answering fails this test.
//! * A failing disk: the store's files start failing `fsync` (once) or `write` (for good) while
//!   the clients write; the server must stop with exit status 70, no write sent after the first
//!   failure may be answered 2xx or be stored, and a restart on the healed filesystem (after the
//!   failed fsync: with what was not synced lost) serves every acknowledged change.
//!
//! Needs root and /dev/fuse (as CI has): without them the tests fail with the reason. The
//! server binary is the one Cargo built, or `BLUEBATCH_BIN` (to run these tests against another
//! build of the server, e.g. one with a weakened store).

mod common;

use common::{ACCOUNT, Client, KEY, Server};
use powerfail::{Fault, PowerFail};
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TASKS: usize = 4;
const BASE_POOL: &str = "base";
/// Each operation's deadline.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Acknowledged writes each cycle must reach, so the test cannot pass on no work.
const MIN_ACKED_PER_CYCLE: usize = 10;
/// Past these, a task only updates (nodes hold at most 1 000 users; every pool is checked after
/// each cycle).
const MAX_USERS_PER_TASK: usize = 150;
const MAX_POOLS_PER_TASK: usize = 40;

static SEQ: AtomicU32 = AtomicU32::new(0);

fn next() -> u32 {
    SEQ.fetch_add(1, Ordering::Relaxed)
}

/// A unique expiry per write (whole days from 2032-01-01), so a stored user names its request.
fn fresh_expiry() -> String {
    let day = time::macros::date!(2032 - 01 - 01) + time::Duration::days(i64::from(next()));
    format!("{day}T00:00:00Z")
}

fn mount(dir: &Path) -> PowerFail {
    if let Some(why) = powerfail::unavailable() {
        panic!(
            "the power-loss tests need root and /dev/fuse: {why} (they run as root in CI; \
             this is a failure, not a skip)"
        );
    }
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    PowerFail::mount(&mnt).expect("mounting powerfail")
}

fn server_bin() -> PathBuf {
    std::env::var_os("BLUEBATCH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_bluebatch")))
}

/// `bluebatch serve --data-dir <data>`, waiting (bounded) until it listens.
fn start(data: &Path) -> Server {
    let mut child = Command::new(server_bin())
        .args(["serve", "--port", "0", "--node-step-ms", "20", "--data-dir"])
        .arg(data)
        .env("BLUEBATCH_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting bluebatch");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        for line in lines.by_ref() {
            let Ok(line) = line else { break };
            if let Some(u) = line.strip_prefix("bluebatch listening on ") {
                let _ = tx.send(u.trim().to_string());
                break;
            }
        }
        for _ in lines {}
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(url) => Server { child, url },
        Err(_) => {
            let _ = child.kill();
            let status = child.wait().ok();
            panic!("bluebatch did not listen within 20 s (exit status {status:?})");
        }
    }
}

/// What the test knows of one user: the expiry it has (None: absent) and, after a request that
/// got no answer, the expiry that request would have given.
#[derive(Clone, Debug)]
struct User {
    node: String,
    expiry: Option<String>,
    maybe: Option<String>,
}

#[derive(Clone, Debug)]
struct Pool {
    present: bool,
    maybe: bool,
}

#[derive(Default, Debug)]
struct Known {
    users: BTreeMap<String, User>,
    pools: BTreeMap<String, Pool>,
}

#[derive(Clone, Debug)]
enum Write {
    AddUser { name: String, expiry: String },
    UpdateUser { name: String, expiry: String },
    AddPool { id: String },
}

/// One request: what it was, when it was sent, the status it got (None: no answer).
#[derive(Clone, Debug)]
struct Record {
    write: Write,
    sent: Instant,
    status: Option<u16>,
}

fn pool_body(id: &str) -> serde_json::Value {
    json!({"id": id, "vmSize": "STANDARD_D2S_V3", "targetDedicatedNodes": 0,
        "virtualMachineConfiguration": {"imageReference": {"publisher": "Canonical",
        "offer": "0001-com-ubuntu-server-jammy", "sku": "22_04-lts"},
        "nodeAgentSKUId": "batch.node.ubuntu 22.04"}})
}

/// One task's writes, on its own users and pools only (so each user's requests are in order),
/// until a request gets no answer or an error. Every request is recorded.
async fn load(
    c: Arc<Client>,
    nodes: Arc<Vec<String>>,
    known: Arc<Mutex<Known>>,
    log: Arc<Mutex<Vec<Record>>>,
    task: usize,
) {
    let mut rng = rand::rngs::StdRng::from_os_rng();
    let mine = format!("t{task}x");
    loop {
        let present: Vec<(String, String)> = known
            .lock()
            .unwrap()
            .users
            .iter()
            .filter(|(n, u)| n.starts_with(&mine) && u.expiry.is_some())
            .map(|(n, u)| (n.clone(), u.node.clone()))
            .collect();
        let (users, pools) = {
            let k = known.lock().unwrap();
            let pools_prefix = format!("p{mine}");
            (
                k.users.keys().filter(|n| n.starts_with(&mine)).count(),
                k.pools
                    .keys()
                    .filter(|n| n.starts_with(&pools_prefix))
                    .count(),
            )
        };
        let pick = rng.random_range(0..100);
        let n = next();
        let (write, node) = if present.is_empty() || (pick < 25 && users < MAX_USERS_PER_TASK) {
            let name = format!("{mine}{n}");
            let node = nodes[n as usize % nodes.len()].clone();
            known.lock().unwrap().users.insert(
                name.clone(),
                User {
                    node: node.clone(),
                    expiry: None,
                    maybe: None,
                },
            );
            let expiry = fresh_expiry();
            (Write::AddUser { name, expiry }, node)
        } else if pick < 35 && pools < MAX_POOLS_PER_TASK {
            let id = format!("p{mine}{n}");
            known.lock().unwrap().pools.insert(
                id.clone(),
                Pool {
                    present: false,
                    maybe: false,
                },
            );
            (Write::AddPool { id }, String::new())
        } else {
            let (name, node) = present[rng.random_range(0..present.len())].clone();
            let expiry = fresh_expiry();
            (Write::UpdateUser { name, expiry }, node)
        };
        let password = format!("pw-{n}");
        let (req, expect) = match &write {
            Write::AddUser { name, expiry } => (
                c.req("POST", &format!("/pools/{BASE_POOL}/nodes/{node}/users"))
                    .json(&json!({"name": name, "password": password, "expiryTime": expiry})),
                201,
            ),
            Write::UpdateUser { name, expiry } => (
                c.req("PUT", &Client::user_path(BASE_POOL, &node, name))
                    .json(&json!({"password": password, "expiryTime": expiry})),
                200,
            ),
            Write::AddPool { id } => (c.req("POST", "/pools").json(&pool_body(id)), 201),
        };
        let sent = Instant::now();
        let outcome = req.try_send_within(REQUEST_TIMEOUT).await;
        let status = outcome.as_ref().ok().map(|r| r.status);
        log.lock().unwrap().push(Record {
            write: write.clone(),
            sent,
            status,
        });
        let mut k = known.lock().unwrap();
        match (&write, status) {
            (Write::AddUser { name, expiry } | Write::UpdateUser { name, expiry }, Some(s))
                if s == expect =>
            {
                k.users.get_mut(name).unwrap().expiry = Some(expiry.clone());
            }
            (Write::AddPool { id }, Some(s)) if s == expect => {
                k.pools.get_mut(id).unwrap().present = true;
            }
            (Write::AddUser { name, expiry } | Write::UpdateUser { name, expiry }, None) => {
                k.users.get_mut(name).unwrap().maybe = Some(expiry.clone());
                return;
            }
            (Write::AddPool { id }, None) => {
                k.pools.get_mut(id).unwrap().maybe = true;
                return;
            }
            (_, Some(s)) => {
                // An error answer: the change must not be there (recorded as not applied).
                let body = outcome.map(|r| String::from_utf8_lossy(&r.body).into_owned());
                eprintln!("{write:?} answered {s}: {body:?}");
                return;
            }
        }
    }
}

/// Runs the load from `TASKS` clients until `stop` resolves, then waits for the tasks (which end
/// at their first request without an answer). Returns the requests made.
async fn run_load<F: std::future::Future<Output = ()>>(
    c: Client,
    nodes: &[String],
    known: &Arc<Mutex<Known>>,
    stop: F,
) -> Vec<Record> {
    let c = Arc::new(c);
    let nodes = Arc::new(nodes.to_vec());
    let log = Arc::new(Mutex::new(Vec::new()));
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            tokio::spawn(load(
                c.clone(),
                nodes.clone(),
                known.clone(),
                log.clone(),
                t,
            ))
        })
        .collect();
    stop.await;
    for t in tasks {
        tokio::time::timeout(REQUEST_TIMEOUT * 2, t)
            .await
            .expect("a client task did not end after the server stopped")
            .unwrap();
    }
    log.lock().unwrap().clone()
}

/// The stored users of every node of the base pool, name -> expiryTime, from the control.
async fn stored_users(c: &Client, nodes: &[String]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for n in nodes {
        let r = c
            .control("GET", &format!("/pools/{BASE_POOL}/nodes/{n}/users"))
            .try_send_within(REQUEST_TIMEOUT)
            .await
            .expect("node users control");
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        for u in r.json()["users"].as_array().unwrap() {
            out.insert(
                u["name"].as_str().unwrap().to_string(),
                u["expiryTime"].as_str().unwrap().to_string(),
            );
        }
    }
    out
}

async fn pool_exists(c: &Client, id: &str) -> bool {
    let r = c
        .req("GET", &format!("/pools/{id}"))
        .try_send_within(REQUEST_TIMEOUT)
        .await
        .expect("Get Pool");
    match r.status {
        200 => true,
        404 => false,
        s => panic!("Get Pool {id} answered {s}"),
    }
}

/// After a restart: every acknowledged change is there (the pools first: the users' nodes are in
/// one); an unanswered request is wholly there or not at all (then resolved to what is there).
async fn verify(c: &Client, nodes: &[String], known: &mut Known, when: &str) {
    for (id, p) in known.pools.iter_mut() {
        let there = pool_exists(c, id).await;
        assert!(
            there == p.present || p.maybe,
            "{when}: pool {id} exists: {there}; acknowledged: {}",
            p.present
        );
        p.present = there;
        p.maybe = false;
    }
    let shown = stored_users(c, nodes).await;
    for (name, u) in known.users.iter_mut() {
        let got = shown.get(name);
        let ok = got == u.expiry.as_ref() || (u.maybe.is_some() && got == u.maybe.as_ref());
        assert!(
            ok,
            "{when}: user {name} is stored with expiry {got:?}; acknowledged {:?}, unanswered \
             request {:?}",
            u.expiry, u.maybe
        );
        u.expiry = got.cloned();
        u.maybe = None;
    }
    for name in shown.keys() {
        assert!(
            known.users.contains_key(name),
            "{when}: unknown user {name}"
        );
    }
}

/// The nodes' host keys as ssh-keyscan reads them (it fails when none is read).
async fn node_host_keys(c: &Client, nodes: &[String]) -> Vec<String> {
    let mut keys = Vec::new();
    for n in nodes {
        keys.push(common::host_key_read(c.ssh_port(BASE_POOL, n).await).await);
    }
    keys
}

fn acked(records: &[Record]) -> usize {
    records
        .iter()
        .filter(|r| r.status.is_some_and(|s| (200..300).contains(&s)))
        .count()
}

/// Waits (bounded) for the server to exit on its own; its exit status, or None (it is then
/// killed) if it still runs after `within`.
fn wait_exit(srv: &mut Server, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = srv.child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > deadline {
            srv.kill();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_changes_survive_sigkill_and_power_loss() {
    let cycles = if std::env::var("BLUEBATCH_LONG").is_ok_and(|v| v == "1") {
        40
    } else {
        10
    };
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let mut pf = mount(dir.path());
    let data = pf.path().join("data");
    let mut srv = start(&data);
    let nodes = srv.client().ready_pool(BASE_POOL, "linux", 2).await;
    // Each node's host key is written durably at its first start: a power cut must not lose it
    // (clients that trusted it would see a changed key).
    let host_keys = node_host_keys(&srv.client(), &nodes).await;
    let known = Arc::new(Mutex::new(Known::default()));
    known.lock().unwrap().pools.insert(
        BASE_POOL.into(),
        Pool {
            present: true,
            maybe: false,
        },
    );
    let mut total = 0;
    for cycle in 0..cycles {
        let wait = Duration::from_millis(rand::rng().random_range(300..900));
        let pid = srv.child.id();
        let records = run_load(srv.client(), &nodes, &known, async {
            tokio::time::sleep(wait).await;
            // SIGKILL, then the power: nothing the server did not sync survives.
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        })
        .await;
        srv.kill();
        pf.cut_power().expect("power cut");
        let n = acked(&records);
        assert!(
            n >= MIN_ACKED_PER_CYCLE,
            "cycle {cycle}: only {n} writes acknowledged before the kill"
        );
        let refused: Vec<&Record> = records
            .iter()
            .filter(|r| r.status.is_some_and(|s| !(200..300).contains(&s)))
            .collect();
        assert!(
            refused.is_empty(),
            "cycle {cycle}: writes refused: {refused:?}"
        );
        total += n;
        srv = start(&data);
        let mut snapshot = std::mem::take(&mut *known.lock().unwrap());
        verify(
            &srv.client(),
            &nodes,
            &mut snapshot,
            &format!("cycle {cycle}"),
        )
        .await;
        *known.lock().unwrap() = snapshot;
        assert_eq!(
            node_host_keys(&srv.client(), &nodes).await,
            host_keys,
            "cycle {cycle}: a node's host key changed across the power cut"
        );
    }
    srv.kill();
    let k = known.lock().unwrap();
    let users = k.users.values().filter(|u| u.expiry.is_some()).count();
    eprintln!(
        "{cycles} SIGKILL + power-cut cycles in {:.1} s: {total} acknowledged writes, {users} \
         users and {} pools stored, all there after every cut ({} fsyncs seen)",
        started.elapsed().as_secs_f64(),
        k.pools.len(),
        pf.stats().fsyncs
    );
}

/// The store's files fail as `fault` says while clients write. With `cut`, what was not synced
/// is lost before the restart (the disk lost what it failed to sync: an answer given for a failed
/// sync would then show as an acknowledged write missing).
async fn store_failure(fault: Fault, cut: bool, within: Duration, what: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut pf = mount(dir.path());
    let data = pf.path().join("data");
    let mut srv = start(&data);
    let nodes = srv.client().ready_pool(BASE_POOL, "linux", 2).await;
    // Each node's host key is written durably at its first start: a power cut must not lose it
    // (clients that trusted it would see a changed key).
    let host_keys = node_host_keys(&srv.client(), &nodes).await;
    let known = Arc::new(Mutex::new(Known::default()));
    known.lock().unwrap().pools.insert(
        BASE_POOL.into(),
        Pool {
            present: true,
            maybe: false,
        },
    );
    let wait = Duration::from_millis(rand::rng().random_range(300..700));
    let pf_ref = &pf;
    let srv_child = &mut srv;
    let (records, status) = {
        let status = Arc::new(Mutex::new(None));
        let st = status.clone();
        let records = run_load(
            Client::new(&srv_child.url, ACCOUNT, KEY),
            &nodes,
            &known,
            async {
                tokio::time::sleep(wait).await;
                pf_ref.fail(fault.clone());
                let s = tokio::task::block_in_place(|| wait_exit(srv_child, within));
                *st.lock().unwrap() = Some(s);
            },
        )
        .await;
        let s = status.lock().unwrap().take().unwrap();
        (records, s)
    };
    let Some(status) = status else {
        panic!(
            "{what}: the server kept running {within:?} after the fault was set ({} operations \
             failed with EIO meanwhile, {} writes acknowledged)",
            pf.stats().failures,
            acked(&records)
        );
    };
    assert_eq!(
        status.code(),
        Some(70),
        "{what}: the server must stop with exit status 70, got {status}"
    );
    let failed_at = pf
        .first_failure()
        .unwrap_or_else(|| panic!("{what}: no operation failed: the fault was never hit"));
    let before = acked(&records);
    // An answer other than success may only be a server error, never a refusal of the request.
    for r in &records {
        if let Some(s) = r.status {
            assert!(
                (200..300).contains(&s) || s >= 500,
                "{what}: {:?} answered {s}",
                r.write
            );
        }
    }
    assert!(
        before >= MIN_ACKED_PER_CYCLE,
        "{what}: only {before} writes acknowledged before the failure"
    );
    let after: Vec<&Record> = records.iter().filter(|r| r.sent > failed_at).collect();
    for r in &after {
        assert!(
            !r.status.is_some_and(|s| (200..300).contains(&s)),
            "{what}: {:?}, sent after the store failed, was answered {:?}",
            r.write,
            r.status
        );
    }
    pf.heal();
    srv.kill();
    if cut {
        pf.cut_power().expect("power cut");
    }
    srv = start(&data);
    let c = srv.client();
    let mut k = std::mem::take(&mut *known.lock().unwrap());
    verify(&c, &nodes, &mut k, what).await;
    assert_eq!(
        node_host_keys(&c, &nodes).await,
        host_keys,
        "{what}: a node's host key changed across the failure and restart"
    );
    // Nothing sent after the failure reached the store.
    for r in &after {
        match &r.write {
            Write::AddUser { name, expiry } | Write::UpdateUser { name, expiry } => assert_ne!(
                k.users[name].expiry.as_ref(),
                Some(expiry),
                "{what}: {:?}, sent after the store failed, is stored",
                r.write
            ),
            Write::AddPool { id } => assert!(
                !k.pools[id].present,
                "{what}: pool {id}, sent after the store failed, is stored"
            ),
        }
    }
    // The restarted server writes again.
    let r = c
        .req("POST", "/pools")
        .json(&pool_body("after-restart"))
        .try_send_within(REQUEST_TIMEOUT)
        .await
        .expect("Add Pool after the restart");
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    srv.kill();
    eprintln!(
        "{what}: exit 70; {before} writes acknowledged before the failure, all there after the \
         restart; {} without an answer (each wholly there or not at all); {} sent after the \
         failure, none acknowledged or stored",
        records.iter().filter(|r| r.status.is_none()).count(),
        after.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_fsync_stops_the_server_with_70_and_nothing_later_is_acknowledged() {
    // Once: the disk works again at once, so only the server's own stop keeps later writes out.
    store_failure(
        Fault {
            fsync: true,
            prefix: "state.db".into(),
            once: true,
            ..Fault::default()
        },
        true,
        Duration::from_secs(10),
        "fsync EIO",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_write_stops_the_server_with_70_and_a_restart_serves_what_was_acknowledged() {
    store_failure(
        Fault {
            write: true,
            prefix: "state.db".into(),
            ..Fault::default()
        },
        false,
        Duration::from_secs(10),
        "write EIO",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_checkpoint_stops_the_server_with_70_too() {
    // Only the database file itself fails, and only once: it is synced by checkpoints alone
    // (every 256 commits), whose errors SQLite's automatic checkpoint would have dropped.
    store_failure(
        Fault {
            fsync: true,
            prefix: "state.db".into(),
            exact: true,
            once: true,
            ..Fault::default()
        },
        true,
        Duration::from_secs(30),
        "checkpoint fsync EIO",
    )
    .await;
}
