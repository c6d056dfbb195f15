//! Node and store agree, seen from the node. Concurrent Add/Update/Delete User load on two nodes
//! (every other cycle with reboots of the nodes meanwhile), SIGKILL of the real server at a
//! random moment, restart, nodes idle again; after each cycle every user is checked
//! over the real OpenSSH client, not through the server's report of itself:
//! - the current password logs in (sshpass), the current key logs in (BatchMode); an earlier
//!   password, another key, and every credential of a deleted user are refused — by sshd
//!   answering "Permission denied", never by a node that does not answer;
//! - `isAdmin` is what the session's `id -G` shows: the `--admin-gid` gid is there for admins and
//!   only for them;
//! - the host key of each node is the same as before the crashes (a key was read each time);
//! - expiry: with the service clock moved (`POST /_bluebatch/clock/advance`) into the middle of
//!   the users' expiry days, exactly the users whose expiry day has passed are refused, and so
//!   after another SIGKILL and restart.
//!
//! The node-users control is read only to learn which of two allowed states a request without
//! an answer left (every write has an expiry of its own day, which names it).

mod common;

use bluebatch_core::timefmt::{iso, parse_iso};
use common::{
    Client, Server, SshOutcome, host_key_read, keypair, loopback_source, ssh_key_outcome,
    ssh_password_outcome, within,
};
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use time::OffsetDateTime;

const POOL: &str = "agree";
const TASKS: usize = 4;
const USERS_PER_TASK: usize = 3;
const KEYS: usize = 4;
/// The bare supplementary gid admin sessions get (no group of this host has it).
const ADMIN_GID: &str = "1987654321";
const REQ: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, PartialEq)]
struct Acct {
    admin: bool,
    password: Option<String>,
    /// Index into the test's key pairs.
    key: Option<usize>,
    /// Midnight UTC of a day of its own: names the request that wrote it.
    expiry: OffsetDateTime,
}

#[derive(Clone, Debug, PartialEq)]
enum St {
    Absent,
    Present(Acct),
}

#[derive(Clone, Debug)]
struct Track {
    name: String,
    node: usize,
    acked: St,
    maybe: Option<St>,
    /// The last password and key the user had (refused once they are gone).
    last_password: Option<String>,
    last_key: Option<usize>,
}

impl Track {
    fn settle(&mut self, st: St) {
        if let St::Present(a) = &st {
            if a.password.is_some() {
                self.last_password = a.password.clone();
            }
            if a.key.is_some() {
                self.last_key = a.key;
            }
        }
        self.acked = st;
    }
}

struct Fixture {
    keys: Vec<(PathBuf, String)>,
    nodes: Vec<String>,
    first_day: OffsetDateTime,
}

static SEQ: AtomicU32 = AtomicU32::new(0);
static SOURCE: AtomicU32 = AtomicU32::new(60_000);

fn source() -> String {
    loopback_source(SOURCE.fetch_add(1, Ordering::Relaxed))
}

fn fresh_expiry(f: &Fixture) -> OffsetDateTime {
    f.first_day + time::Duration::days(i64::from(SEQ.fetch_add(1, Ordering::Relaxed)))
}

fn server(dir: &Path) -> Server {
    Server::start_with(&[
        "--data-dir",
        dir.to_str().unwrap(),
        "--admin-gid",
        ADMIN_GID,
        "--max-failed-logins",
        "0",
    ])
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

enum Outcome {
    Acked(St),
    Unanswered(St),
}

/// One request chosen from the user's acknowledged state.
async fn one_op(c: &Client, f: &Fixture, t: &Track, rng: &mut rand::rngs::StdRng) -> Outcome {
    let node = &f.nodes[t.node];
    let users = format!("/pools/{POOL}/nodes/{node}/users");
    let path = Client::user_path(POOL, node, &t.name);
    let expiry = fresh_expiry(f);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    // Password, key or both.
    let (password, key) = match rng.random_range(0..3) {
        0 => (Some(format!("pw-{n}")), None),
        1 => (None, Some(rng.random_range(0..KEYS))),
        _ => (Some(format!("pw-{n}")), Some(rng.random_range(0..KEYS))),
    };
    let mut body = json!({"expiryTime": iso(expiry)});
    if let Some(p) = &password {
        body["password"] = json!(p);
    }
    if let Some(k) = key {
        body["sshPublicKey"] = json!(f.keys[k].1);
    }
    let (req, next, expect) = match &t.acked {
        St::Absent => {
            let admin = rng.random_bool(0.5);
            body["name"] = json!(t.name);
            body["isAdmin"] = json!(admin);
            let next = St::Present(Acct {
                admin,
                password,
                key,
                expiry,
            });
            (c.req("POST", &users).json(&body), next, 201)
        }
        St::Present(a) if rng.random_range(0..10) < 7 => {
            let next = St::Present(Acct {
                admin: a.admin,
                password,
                key,
                expiry,
            });
            (c.req("PUT", &path).json(&body), next, 200)
        }
        St::Present(_) => (c.req("DELETE", &path), St::Absent, 200),
    };
    match req.try_send_within(REQ).await {
        Ok(r) if r.status == expect => Outcome::Acked(next),
        // The node is being rebooted (or starting after it): refused, nothing changed.
        Ok(r)
            if r.status == 409
                && matches!(r.code().as_str(), "NodeBeingRebooted" | "NodeBeingStarted") =>
        {
            Outcome::Acked(t.acked.clone())
        }
        Ok(r) => panic!(
            "{}: {next:?} answered {} instead of {expect}: {}",
            t.name,
            r.status,
            String::from_utf8_lossy(&r.body)
        ),
        Err(_) => Outcome::Unanswered(next),
    }
}

/// Drives the task's users until a request gets no answer; returns the acknowledged count.
async fn load(
    c: Arc<Client>,
    f: Arc<Fixture>,
    tracks: Arc<Mutex<Vec<Track>>>,
    task: usize,
) -> usize {
    let mut rng = rand::rngs::StdRng::from_os_rng();
    let mut acked = 0;
    loop {
        let i = task * USERS_PER_TASK + rng.random_range(0..USERS_PER_TASK);
        let t = tracks.lock().unwrap()[i].clone();
        match one_op(&c, &f, &t, &mut rng).await {
            Outcome::Acked(st) => {
                tracks.lock().unwrap()[i].settle(st);
                acked += 1;
            }
            Outcome::Unanswered(st) => {
                tracks.lock().unwrap()[i].maybe = Some(st);
                return acked;
            }
        }
    }
}

/// Reboots a random node now and then until a request gets no answer; returns how many
/// reboots were accepted.
async fn rebooter(c: Arc<Client>, f: Arc<Fixture>) -> usize {
    let mut rng = rand::rngs::StdRng::from_os_rng();
    let mut accepted = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(rng.random_range(20..80))).await;
        let node = &f.nodes[rng.random_range(0..f.nodes.len())];
        match c
            .req("POST", &format!("/pools/{POOL}/nodes/{node}/reboot"))
            .try_send_within(REQ)
            .await
        {
            Ok(r) if r.status == 202 => accepted += 1,
            // Already rebooting or starting.
            Ok(r) if r.status == 409 => {}
            Ok(r) => panic!(
                "reboot answered {}: {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            ),
            Err(_) => return accepted,
        }
    }
}

/// Waits until every node is idle (a restart may find one rebooting).
async fn nodes_idle(c: &Client, f: &Fixture, cycle: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = c
            .req("GET", &format!("/pools/{POOL}/nodes"))
            .send_within(REQ)
            .await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let v = r.json();
        let list = v["value"].as_array().unwrap();
        if list.len() == f.nodes.len() && list.iter().all(|n| n["state"] == "idle") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "cycle {cycle}: nodes never idle again: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The control's view of the users, only to resolve requests that got no answer.
async fn stored(c: &Client, f: &Fixture) -> HashMap<String, Value> {
    let mut out = HashMap::new();
    for n in &f.nodes {
        let r = c
            .control("GET", &format!("/pools/{POOL}/nodes/{n}/users"))
            .send_within(REQ)
            .await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        for u in r.json()["users"].as_array().unwrap() {
            out.insert(u["name"].as_str().unwrap().to_string(), u.clone());
        }
    }
    out
}

fn same_request(st: &St, shown: Option<&Value>) -> bool {
    match (st, shown) {
        (St::Absent, None) => true,
        (St::Present(a), Some(u)) => {
            u["expiryTime"].as_str().and_then(parse_iso) == Some(a.expiry)
                && u["isAdmin"] == a.admin
                && u["hasPassword"] == a.password.is_some()
                && u["sshPublicKeyFingerprint"].is_null() != a.key.is_some()
        }
        _ => false,
    }
}

/// After a restart: what each user is now (the acknowledged state, or the one its unanswered
/// request would have made).
async fn resolve(c: &Client, f: &Fixture, tracks: &mut [Track], cycle: usize) {
    let shown = stored(c, f).await;
    for t in tracks.iter_mut() {
        let got = shown.get(&t.name);
        if let Some(m) = t.maybe.take()
            && same_request(&m, got)
        {
            t.settle(m);
        }
        assert!(
            same_request(&t.acked, got),
            "cycle {cycle}: {} is {got:?}; acknowledged {:?}",
            t.name,
            t.acked
        );
    }
}

/// One SSH check: what is tried and what must come of it.
struct Check {
    what: String,
    port: u16,
    user: String,
    password: Option<String>,
    key: Option<PathBuf>,
    /// `Some(admin)`: the login must be accepted and `id -G` must show the admin gid iff
    /// admin. `None`: sshd must refuse.
    accept: Option<bool>,
}

/// How many checks ran: [refused, accepted non-admin, accepted admin].
type Tally = [usize; 3];

fn add(a: &mut Tally, b: Tally) {
    for i in 0..3 {
        a[i] += b[i];
    }
}

async fn run_checks(checks: Vec<Check>, label: &str) -> Tally {
    let mut tally = [0; 3];
    let limit = Arc::new(tokio::sync::Semaphore::new(8));
    let tasks: Vec<_> = checks
        .into_iter()
        .map(|ch| {
            let limit = limit.clone();
            tokio::spawn(async move {
                let _permit = limit.acquire().await.unwrap();
                let src = source();
                let out = match (&ch.password, &ch.key) {
                    (Some(p), _) => ssh_password_outcome(ch.port, &ch.user, p, &src, "id -G").await,
                    (None, Some(k)) => ssh_key_outcome(ch.port, &ch.user, k, &src, "id -G").await,
                    (None, None) => unreachable!(),
                };
                (ch, out)
            })
        })
        .collect();
    for t in tasks {
        let (ch, out) = t.await.unwrap();
        match ch.accept {
            None => {
                assert_eq!(
                    out,
                    SshOutcome::Refused,
                    "{label}: {}: sshd must answer and refuse",
                    ch.what
                );
                tally[0] += 1;
            }
            Some(admin) => {
                tally[1 + usize::from(admin)] += 1;
                let groups: Vec<String> = out
                    .stdout(&format!("{label}: {}", ch.what))
                    .split_whitespace()
                    .map(str::to_string)
                    .collect();
                if is_root() {
                    assert_eq!(
                        groups.iter().any(|g| g == ADMIN_GID),
                        admin,
                        "{label}: {}: id -G is {groups:?}, isAdmin {admin}",
                        ch.what
                    );
                }
            }
        }
    }
    tally
}

/// Every user's credentials over SSH: current ones accepted (with `id -G` matching isAdmin),
/// earlier or other ones refused. `expired_before`: users whose expiry is earlier must be
/// refused even with their current credentials.
async fn verify_on_nodes(
    c: &Client,
    f: &Fixture,
    tracks: &[Track],
    label: &str,
    expired_before: Option<OffsetDateTime>,
) -> Tally {
    let mut ports = Vec::new();
    for n in &f.nodes {
        ports.push(c.ssh_port(POOL, n).await);
    }
    let mut checks = Vec::new();
    for t in tracks {
        let port = ports[t.node];
        let check = |what: String, password: Option<String>, key: Option<usize>, accept| Check {
            what: format!("{} {what}", t.name),
            port,
            user: t.name.clone(),
            password,
            key: key.map(|k| f.keys[k].0.clone()),
            accept,
        };
        match &t.acked {
            St::Present(a) => {
                let live = expired_before.is_none_or(|cut| a.expiry >= cut);
                let accept = live.then_some(a.admin);
                if let Some(p) = &a.password {
                    checks.push(check(
                        format!("password {p}"),
                        Some(p.clone()),
                        None,
                        accept,
                    ));
                } else if let Some(p) = &t.last_password {
                    checks.push(check(
                        format!("removed password {p}"),
                        Some(p.clone()),
                        None,
                        None,
                    ));
                }
                if let Some(k) = a.key {
                    checks.push(check(format!("key {k}"), None, Some(k), accept));
                }
                let other = (a.key.unwrap_or(0) + 1) % KEYS;
                checks.push(check(format!("other key {other}"), None, Some(other), None));
                if let Some(p) = &t.last_password
                    && a.password.as_ref() != Some(p)
                {
                    checks.push(check(
                        format!("earlier password {p}"),
                        Some(p.clone()),
                        None,
                        None,
                    ));
                }
            }
            St::Absent => {
                let p = t.last_password.clone().unwrap_or("never-set".to_string());
                checks.push(check(format!("deleted, password {p}"), Some(p), None, None));
                let k = t.last_key.unwrap_or(0);
                checks.push(check(format!("deleted, key {k}"), None, Some(k), None));
            }
        }
    }
    run_checks(checks, label).await
}

async fn host_keys(c: &Client, f: &Fixture) -> Vec<String> {
    let mut out = Vec::new();
    for n in &f.nodes {
        out.push(host_key_read(c.ssh_port(POOL, n).await).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_crashes_every_user_is_on_the_node_as_the_store_has_it() {
    within(Duration::from_secs(300), "the test", test_body()).await;
}

async fn test_body() {
    let long = std::env::var("BLUEBATCH_LONG").is_ok_and(|v| v == "1");
    let cycles = if long { 25 } else { 5 };
    common::require_root("isAdmin seen on the node (id -G shows the admin gid)");
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let keys_dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut srv = server(&data);
    let c = srv.client();
    let nodes = c.ready_pool(POOL, "linux", 2).await;
    let today = OffsetDateTime::now_utc().replace_time(time::Time::MIDNIGHT);
    let f = Arc::new(Fixture {
        keys: (0..KEYS)
            .map(|i| keypair(keys_dir.path(), &format!("k{i}")))
            .collect(),
        nodes,
        first_day: today + time::Duration::days(3),
    });
    let keys_before = host_keys(&c, &f).await;
    let mut tracks: Vec<Track> = (0..TASKS * USERS_PER_TASK)
        .map(|i| Track {
            name: format!("agent{i}"),
            node: i % f.nodes.len(),
            acked: St::Absent,
            maybe: None,
            last_password: None,
            last_key: None,
        })
        .collect();
    let (mut total_acked, mut ssh_checks, mut total_reboots) = (0, [0; 3], 0);
    const FLOOR: usize = 5;
    for cycle in 0..cycles {
        let c = Arc::new(srv.client());
        let shared = Arc::new(Mutex::new(tracks.clone()));
        let tasks: Vec<_> = (0..TASKS)
            .map(|task| tokio::spawn(load(c.clone(), f.clone(), shared.clone(), task)))
            .collect();
        // Odd cycles also reboot nodes meanwhile.
        let reboots = (cycle % 2 == 1).then(|| tokio::spawn(rebooter(c.clone(), f.clone())));
        let wait = rand::rng().random_range(150..400u64);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        srv.kill(); // SIGKILL
        let mut acked = 0;
        for t in tasks {
            acked += within(Duration::from_secs(30), "a load task", t)
                .await
                .unwrap();
        }
        assert!(
            acked >= FLOOR,
            "cycle {cycle}: only {acked} writes acknowledged in {wait} ms (floor {FLOOR})"
        );
        total_acked += acked;
        if let Some(r) = reboots {
            total_reboots += within(Duration::from_secs(30), "the rebooter", r)
                .await
                .unwrap();
        }
        tracks = shared.lock().unwrap().clone();
        srv = server(&data);
        let c = srv.client();
        nodes_idle(&c, &f, cycle).await;
        resolve(&c, &f, &mut tracks, cycle).await;
        let t = verify_on_nodes(&c, &f, &tracks, &format!("cycle {cycle}"), None).await;
        add(&mut ssh_checks, t);
        assert_eq!(
            host_keys(&c, &f).await,
            keys_before,
            "cycle {cycle}: host keys"
        );
    }
    // Expiry: move the service clock to noon of the median expiry day of the present users.
    let mut days: Vec<OffsetDateTime> = tracks
        .iter()
        .filter_map(|t| match &t.acked {
            St::Present(a) => Some(a.expiry),
            St::Absent => None,
        })
        .collect();
    days.sort();
    assert!(
        days.len() >= 2,
        "too few users present to check expiry: {tracks:?}"
    );
    let cut = days[days.len() / 2];
    let by = (cut + time::Duration::hours(12) - OffsetDateTime::now_utc()).whole_seconds();
    let c = srv.client();
    let r = c
        .control("POST", "/clock/advance")
        .json(&json!({"by": by}))
        .send_within(REQ)
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let expired = days.iter().filter(|d| **d < cut).count();
    assert!(expired >= 1 && expired < days.len(), "{days:?}");
    let t = verify_on_nodes(&c, &f, &tracks, "clock advanced", Some(cut)).await;
    add(&mut ssh_checks, t);
    // The offset is stored: after a SIGKILL the same users are out.
    srv.kill();
    srv = server(&data);
    let c = srv.client();
    let t = verify_on_nodes(&c, &f, &tracks, "clock advanced, after SIGKILL", Some(cut)).await;
    add(&mut ssh_checks, t);
    assert!(total_reboots > 0, "no reboot was accepted during the load");
    // The checks covered refusals and logins of admins and non-admins alike.
    assert!(
        ssh_checks.iter().all(|n| *n > 0),
        "SSH checks [refused, user, admin]: {ssh_checks:?}"
    );
    drop(srv);
    eprintln!(
        "{cycles} SIGKILL cycles in {:.1} s: {total_acked} acknowledged writes, {total_reboots} reboots, SSH checks \
         [refused, user, admin] {ssh_checks:?}, {expired} of {} users expired by the clock",
        started.elapsed().as_secs_f64(),
        days.len()
    );
}
