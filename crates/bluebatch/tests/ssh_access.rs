//! Issue 9, items 2, 7 and 8 (SSH) through the real binary and the real OpenSSH client: the
//! failed-login lockout (tunable, logged, visible in the node-users control), node states that
//! take no logins (and end sessions), and one info log line per login accepted or refused.

mod common;

use common::{ACCOUNT, Client, KEY, keypair, listening_url, loopback_source, ssh_args};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The real server with its log (stderr, at info) kept for the assertions.
struct LogServer {
    child: Child,
    url: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl LogServer {
    fn start(extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_bluebatch"))
            .args(["serve", "--port", "0", "--in-memory"])
            .args(extra)
            .env("BLUEBATCH_LOG", "info,russh=warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .expect("starting bluebatch");
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(strip_ansi(&line));
            }
        });
        let url = listening_url(&mut child);
        LogServer { child, url, log }
    }

    fn client(&self) -> Client {
        Client::new(&self.url, ACCOUNT, KEY)
    }

    fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// The first log line holding every one of `parts`, waiting up to 5 s for it.
    async fn log_line(&self, parts: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(l) = self
                .log
                .lock()
                .unwrap()
                .iter()
                .find(|l| parts.iter().all(|p| l.contains(p)))
            {
                return l.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {parts:?} in:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for LogServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Colour codes out (the log may be coloured), so fields read as `name=value`.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// What one ssh run gave: whether it succeeded, its stdout and its stderr.
struct Ran {
    ok: bool,
    stdout: String,
    stderr: String,
}

async fn run(mut cmd: tokio::process::Command) -> Ran {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("ssh did not finish within 30 s")
        .expect("running ssh");
    Ran {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn pw_cmd(
    port: u16,
    user: &str,
    password: &str,
    source: &str,
    remote: &str,
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("sshpass");
    cmd.arg("-e")
        .env("SSHPASS", password)
        .arg("ssh")
        .args(ssh_args(port, source))
        .args([
            "-o",
            "PreferredAuthentications=password",
            "-o",
            "PubkeyAuthentication=no",
        ])
        .arg(format!("{user}@127.0.0.1"))
        .arg(remote);
    cmd
}

/// Logs in with a password (given to sshpass through the environment) and runs `echo ok`.
async fn pw(port: u16, user: &str, password: &str, source: &str) -> Ran {
    run(pw_cmd(port, user, password, source, "echo ok")).await
}

async fn key_login(port: u16, user: &str, key: &std::path::Path, source: &str) -> Ran {
    let mut cmd = tokio::process::Command::new("ssh");
    cmd.args(ssh_args(port, source))
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "PreferredAuthentications=publickey",
            "-i",
        ])
        .arg(key)
        .arg(format!("{user}@127.0.0.1"))
        .arg("echo ok");
    run(cmd).await
}

fn logged_in(r: &Ran) -> bool {
    r.ok && r.stdout.trim() == "ok"
}

async fn add_user(c: &Client, pool: &str, node: &str, body: Value) {
    let r = c
        .req("POST", &format!("/pools/{pool}/nodes/{node}/users"))
        .json(&body)
        .send()
        .await;
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
}

async fn node_users(c: &Client, pool: &str, node: &str) -> Value {
    let r = c
        .control("GET", &format!("/pools/{pool}/nodes/{node}/users"))
        .send()
        .await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    r.json()
}

async fn state_of(c: &Client, pool: &str, node: &str) -> String {
    c.req("GET", &format!("/pools/{pool}/nodes/{node}"))
        .send()
        .await
        .json()["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

async fn wait_state(c: &Client, pool: &str, node: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = state_of(c, pool, node).await;
        if s == want {
            return;
        }
        assert!(Instant::now() < deadline, "node stayed {s}, never {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

trait ReadyPool {
    async fn ready_pool_nodes(&self, pool: &str, count: usize) -> Vec<String>;
}

impl ReadyPool for Client {
    /// Waits (up to 30 s) until the pool has `count` nodes, all idle; returns their ids.
    async fn ready_pool_nodes(&self, pool: &str, count: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self
                .req("GET", &format!("/pools/{pool}/nodes"))
                .send()
                .await
                .json();
            let list = v["value"].as_array().cloned().unwrap_or_default();
            if list.len() == count && list.iter().all(|n| n["state"] == "idle") {
                return list
                    .iter()
                    .map(|n| n["id"].as_str().unwrap().to_string())
                    .collect();
            }
            assert!(Instant::now() < deadline, "{pool}: never idle: {v}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A long exec session (`echo started; sleep 60`), returned once it runs.
struct Open {
    child: tokio::process::Child,
}

async fn open_session(port: u16, user: &str, password: &str, source: &str) -> Open {
    let mut cmd = pw_cmd(port, user, password, source, "echo started; sleep 60");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("running ssh");
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("the session did not start within 20 s")
        .unwrap();
    assert_eq!(first.as_deref(), Some("started"));
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Open { child }
}

impl Open {
    /// Waits (up to `within`) for the session to end; its stderr and how long it took.
    async fn ended(mut self, within: Duration) -> (String, Duration) {
        let t0 = Instant::now();
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("the session outlived the node state by {within:?}"))
            .unwrap();
        assert!(!status.success(), "the session was ended, not finished");
        // read_to_end keeps what it read if the timeout cuts it short (read_to_string would
        // keep nothing), and a loaded machine gets 5 s to flush ssh's last words.
        let mut err = Vec::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                tokio::io::AsyncReadExt::read_to_end(&mut e, &mut err),
            )
            .await;
        }
        (String::from_utf8_lossy(&err).into_owned(), t0.elapsed())
    }
}

fn cli(url: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bluebatch"))
        .args(args)
        .env("BLUEBATCH_URL", url)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

// ---- item 2: failed-login lockout ---------------------------------------------------------

#[tokio::test]
async fn failed_logins_lock_a_source_out_visibly_then_let_it_in_again() {
    let srv = LogServer::start(&["--max-failed-logins", "3", "--failed-login-window", "8s"]);
    let c = srv.client();
    let nodes = c.ready_pool("p", "linux", 1).await;
    let n = &nodes[0];
    let port = c.ssh_port("p", n).await;
    add_user(&c, "p", n, json!({"name": "alice", "password": "right-pw"})).await;
    let (bad, good) = (loopback_source(901), loopback_source(902));

    assert!(logged_in(&pw(port, "alice", "right-pw", &bad).await));
    for _ in 0..3 {
        assert!(!pw(port, "alice", "wrong-pw", &bad).await.ok);
    }
    let locked_at = Instant::now();
    // Locked out: the right password is refused from that source, not from another one.
    assert!(
        !pw(port, "alice", "right-pw", &bad).await.ok,
        "the right password must be refused while the source is locked out"
    );
    assert!(logged_in(&pw(port, "alice", "right-pw", &good).await));

    let line = srv
        .log_line(&["too many failed logins", &bad, "failures=3"])
        .await;
    assert!(line.contains("INFO") && line.contains(n.as_str()), "{line}");
    assert!(line.contains("refused_for_secs=8"), "{line}");
    srv.log_line(&["ssh login refused", &bad, "locked out"])
        .await;

    // The node-users control shows the lockout.
    let v = node_users(&c, "p", n).await;
    let lockouts = v["loginLockouts"].as_array().expect("loginLockouts");
    assert_eq!(lockouts.len(), 1, "{v}");
    assert_eq!(lockouts[0]["source"], bad.as_str());
    assert_eq!(lockouts[0]["failures"], 3);
    let until = lockouts[0]["refusedUntil"].as_str().unwrap();
    let until =
        time::OffsetDateTime::parse(until, &time::format_description::well_known::Rfc3339).unwrap();
    let left = until - time::OffsetDateTime::now_utc();
    assert!(
        left > time::Duration::ZERO && left <= time::Duration::seconds(9),
        "refusedUntil {until} is within the 8 s window"
    );

    // After the window, the right password works again and the log says so.
    let wait = Duration::from_millis(8300).saturating_sub(locked_at.elapsed());
    tokio::time::sleep(wait).await;
    assert!(logged_in(&pw(port, "alice", "right-pw", &bad).await));
    srv.log_line(&["let in again", &bad]).await;
    let v = node_users(&c, "p", n).await;
    assert_eq!(v["loginLockouts"], json!([]), "{v}");
    assert!(!srv.log_text().contains("right-pw") && !srv.log_text().contains("wrong-pw"));
}

#[tokio::test]
async fn max_failed_logins_zero_never_locks_out() {
    let srv = LogServer::start(&["--max-failed-logins", "0"]);
    let c = srv.client();
    let nodes = c.ready_pool("p", "linux", 1).await;
    let n = &nodes[0];
    let port = c.ssh_port("p", n).await;
    add_user(&c, "p", n, json!({"name": "alice", "password": "right-pw"})).await;
    let src = loopback_source(903);
    for _ in 0..12 {
        assert!(!pw(port, "alice", "wrong-pw", &src).await.ok);
    }
    assert!(
        logged_in(&pw(port, "alice", "right-pw", &src).await),
        "no lockout with --max-failed-logins 0"
    );
    assert_eq!(node_users(&c, "p", n).await["loginLockouts"], json!([]));
    assert!(!srv.log_text().contains("too many failed logins"));
}

#[test]
fn a_bad_window_is_refused_at_start() {
    let out = Command::new(env!("CARGO_BIN_EXE_bluebatch"))
        .args([
            "serve",
            "--in-memory",
            "--port",
            "0",
            "--failed-login-window",
            "0s",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--failed-login-window"), "{err}");
}

// ---- item 7: node states on SSH -----------------------------------------------------------

#[tokio::test]
async fn reboot_ends_sessions_and_refuses_logins_until_idle() {
    // Long steps so that `rebooting` can be observed.
    let srv = LogServer::start(&["--node-step-ms", "4000"]);
    let c = srv.client();
    let nodes = c.ready_pool("p", "linux", 1).await;
    let n = &nodes[0];
    let port = c.ssh_port("p", n).await;
    add_user(&c, "p", n, json!({"name": "bob", "password": "pw-bob"})).await;
    let src = loopback_source(904);
    let session = open_session(port, "bob", "pw-bob", &src).await;

    let r = c
        .req("POST", &format!("/pools/p/nodes/{n}/reboot"))
        .send()
        .await;
    assert_eq!(r.status, 202, "{:?}", String::from_utf8_lossy(&r.body));
    let (err, took) = session.ended(Duration::from_secs(10)).await;
    assert!(took < Duration::from_secs(10));
    assert!(err.contains("node is rebooting"), "ssh said: {err}");

    assert_eq!(state_of(&c, "p", n).await, "rebooting");
    let refused = pw(port, "bob", "pw-bob", &src).await;
    assert!(!refused.ok, "no login while rebooting");
    assert!(
        refused
            .stderr
            .contains("kex_exchange_identification: Connection closed by remote host"),
        "closed before the banner, as a host that is down: {}",
        refused.stderr
    );
    assert_eq!(
        state_of(&c, "p", n).await,
        "rebooting",
        "checked while rebooting"
    );
    srv.log_line(&[
        "refused before the banner",
        "node state rebooting",
        n.as_str(),
    ])
    .await;
    let v = node_users(&c, "p", n).await;
    assert_eq!(
        (v["sshNodeState"].as_str(), v["acceptsLogins"].as_bool()),
        (Some("rebooting"), Some(false))
    );

    wait_state(&c, "p", n, "idle").await;
    assert!(
        logged_in(&pw(port, "bob", "pw-bob", &src).await),
        "back once idle"
    );
    let v = node_users(&c, "p", n).await;
    assert_eq!(
        (v["sshNodeState"].as_str(), v["acceptsLogins"].as_bool()),
        (Some("idle"), Some(true))
    );
}

#[tokio::test]
async fn reimage_ends_sessions_and_closes_connections_until_idle() {
    let srv = LogServer::start(&["--node-step-ms", "4000"]);
    let c = srv.client();
    let nodes = c.ready_pool("p", "linux", 1).await;
    let n = &nodes[0];
    let port = c.ssh_port("p", n).await;
    add_user(&c, "p", n, json!({"name": "rita", "password": "pw-rita"})).await;
    let src = loopback_source(908);
    let session = open_session(port, "rita", "pw-rita", &src).await;
    let r = c
        .req("POST", &format!("/pools/p/nodes/{n}/reimage"))
        .send()
        .await;
    assert_eq!(r.status, 202, "{:?}", String::from_utf8_lossy(&r.body));
    let (err, _) = session.ended(Duration::from_secs(10)).await;
    assert!(err.contains("node is reimaging"), "ssh said: {err}");
    assert_eq!(state_of(&c, "p", n).await, "reimaging");
    let refused = pw(port, "rita", "pw-rita", &src).await;
    assert!(!refused.ok);
    assert!(
        refused
            .stderr
            .contains("kex_exchange_identification: Connection closed by remote host"),
        "closed before the banner: {}",
        refused.stderr
    );
    srv.log_line(&["refused before the banner", "node state reimaging"])
        .await;
    // Back once idle, as a fresh image: the user is gone (reimage removes users), a new one
    // logs in.
    wait_state(&c, "p", n, "idle").await;
    add_user(&c, "p", n, json!({"name": "rita", "password": "pw-rita-2"})).await;
    assert!(logged_in(&pw(port, "rita", "pw-rita-2", &src).await));
}

#[tokio::test]
async fn set_state_refuses_or_accepts_logins_and_offline_accepts() {
    let srv = LogServer::start(&[]);
    let c = srv.client();
    let nodes = c.ready_pool("p", "linux", 1).await;
    let n = &nodes[0];
    let port = c.ssh_port("p", n).await;
    add_user(&c, "p", n, json!({"name": "carol", "password": "pw-carol"})).await;
    let src = loopback_source(905);

    // The emulator control (through the CLI) puts the node in `unusable`: the session ends,
    // logins are refused.
    let session = open_session(port, "carol", "pw-carol", &src).await;
    let (ok, out) = cli(&srv.url, &["node", "set-state", "p", n, "unusable"]);
    assert!(ok, "{out}");
    let (err, _) = session.ended(Duration::from_secs(10)).await;
    assert!(err.contains("node is unusable"), "ssh said: {err}");
    assert!(
        !pw(port, "carol", "pw-carol", &src).await.ok,
        "unusable takes no logins"
    );

    // Every state that takes no logins, and those that do.
    for (state, accepts) in [
        ("creating", false),
        ("starting", false),
        ("waitingforstarttask", false),
        ("reimaging", false),
        ("unknown", false),
        ("leavingpool", false),
        ("preempted", false),
        ("starttaskfailed", true),
        ("running", true),
        ("idle", true),
    ] {
        let (ok, out) = cli(&srv.url, &["node", "set-state", "p", n, state]);
        assert!(ok, "{out}");
        let r = pw(port, "carol", "pw-carol", &src).await;
        assert_eq!(logged_in(&r), accepts, "{state}: {}", r.stderr);
    }

    // Disable scheduling (offline) through the API: logins are taken, sessions stay.
    let session = open_session(port, "carol", "pw-carol", &src).await;
    let r = c
        .req("POST", &format!("/pools/p/nodes/{n}/disablescheduling"))
        .json(&json!({}))
        .send()
        .await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(state_of(&c, "p", n).await, "offline");
    assert!(
        logged_in(&pw(port, "carol", "pw-carol", &src).await),
        "offline takes logins"
    );
    let mut child = session.child;
    assert!(
        child.try_wait().unwrap().is_none(),
        "offline keeps sessions"
    );
    let _ = child.kill().await;
    let r = c
        .req("POST", &format!("/pools/p/nodes/{n}/enablescheduling"))
        .send()
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(state_of(&c, "p", n).await, "idle");
    assert!(logged_in(&pw(port, "carol", "pw-carol", &src).await));
}

#[tokio::test]
async fn leaving_the_pool_ends_sessions_at_once() {
    // Long steps: the sessions must end when the node starts leaving, not when it is gone.
    let srv = LogServer::start(&["--node-step-ms", "3000"]);
    let c = srv.client();
    // Three pools, one per way of leaving: Remove Nodes, Resize down, Delete Pool.
    for p in ["rm", "rs", "del"] {
        let r = c.create_pool(p, "linux", 1).await;
        assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
    }
    let mut open = Vec::new();
    for (i, p) in ["rm", "rs", "del"].into_iter().enumerate() {
        let n = c.ready_pool_nodes(p, 1).await.remove(0);
        let port = c.ssh_port(p, &n).await;
        add_user(&c, p, &n, json!({"name": "dave", "password": "pw-dave"})).await;
        let src = loopback_source(906 + 10 * i as u32);
        let session = open_session(port, "dave", "pw-dave", &src).await;
        open.push((p, n, port, src, session));
    }
    for (p, n, port, src, session) in open {
        let r = match p {
            "rm" => {
                c.req("POST", "/pools/rm/removenodes")
                    .json(&json!({"nodeList": [n]}))
                    .send()
                    .await
            }
            "rs" => {
                c.req("POST", "/pools/rs/resize")
                    .json(&json!({"targetDedicatedNodes": 0}))
                    .send()
                    .await
            }
            _ => c.req("DELETE", "/pools/del").send().await,
        };
        assert_eq!(r.status, 202, "{p}: {:?}", String::from_utf8_lossy(&r.body));
        assert_eq!(state_of(&c, p, &n).await, "leavingpool", "{p}");
        let (err, took) = session.ended(Duration::from_secs(2)).await;
        assert!(
            took < Duration::from_secs(2),
            "{p}: ended before the node is gone"
        );
        assert!(err.contains("node is leavingpool"), "{p}: ssh said: {err}");
        assert!(!pw(port, "dave", "pw-dave", &src).await.ok, "{p}");
        assert_eq!(
            state_of(&c, p, &n).await,
            "leavingpool",
            "{p}: checked while leaving"
        );
    }
}

// ---- item 8: one log line per login --------------------------------------------------------

#[tokio::test]
async fn every_login_accepted_or_refused_gets_one_info_line_with_its_reason() {
    let srv = LogServer::start(&[]);
    let c = srv.client();
    let nodes = c.ready_pool("p", "linux", 1).await;
    let n = &nodes[0];
    let port = c.ssh_port("p", n).await;
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keypair(dir.path(), "k1");
    let (other_key, _) = keypair(dir.path(), "k2");
    add_user(
        &c,
        "p",
        n,
        json!({"name": "erin", "password": "secret-pw-1", "sshPublicKey": public}),
    )
    .await;
    add_user(
        &c,
        "p",
        n,
        json!({"name": "old", "password": "secret-pw-2", "expiryTime": "2020-01-01T00:00:00Z"}),
    )
    .await;
    let src = loopback_source(907);

    assert!(logged_in(&pw(port, "erin", "secret-pw-1", &src).await));
    let l = srv
        .log_line(&["ssh login accepted", "erin", "password"])
        .await;
    assert!(
        l.contains("INFO")
            && l.contains("bluebatch::ssh")
            && l.contains(&src)
            && l.contains(n.as_str()),
        "{l}"
    );

    assert!(!pw(port, "erin", "not-it", &src).await.ok);
    srv.log_line(&["ssh login refused", "erin", "password", "wrong password"])
        .await;
    assert!(!pw(port, "nobody-here", "secret-pw-1", &src).await.ok);
    srv.log_line(&["ssh login refused", "nobody-here", "unknown user"])
        .await;
    assert!(!pw(port, "old", "secret-pw-2", &src).await.ok);
    srv.log_line(&["ssh login refused", "old", "expired"]).await;

    assert!(logged_in(&key_login(port, "erin", &key, &src).await));
    let l = srv
        .log_line(&["ssh login accepted", "erin", "publickey"])
        .await;
    assert!(
        l.contains("SHA256:"),
        "the key shows as its fingerprint: {l}"
    );
    assert!(!key_login(port, "erin", &other_key, &src).await.ok);
    srv.log_line(&[
        "ssh login refused",
        "erin",
        "publickey",
        "no such key",
        "SHA256:",
    ])
    .await;

    let log = srv.log_text();
    assert!(
        !log.contains("secret-pw") && !log.contains("not-it"),
        "no password in the log"
    );
    let blob = public.split_whitespace().nth(1).unwrap();
    assert!(!log.contains(blob), "no key material in the log");
    // One line per login, not one per protocol step.
    let accepted = log
        .lines()
        .filter(|l| l.contains("ssh login accepted"))
        .count();
    assert_eq!(accepted, 2, "{log}");
}
