//! Real hosts as compute nodes, end to end: `bluebatch agent` with the linux provider runs in a
//! sandboxed host of the test's own (network namespace with a 198.18.0.0/15 address, private
//! `/etc` and `/home`, a real sshd; see `common/sandbox.rs`), joined to a `bluebatch serve
//! --nodes agents` listening on this machine's side of the veth pair. Users set through the
//! Batch API log in with the real OpenSSH client to the sandbox's address. This machine's own
//! accounts and `/etc` are never touched (root only; a loud skip otherwise, a failure under CI).

mod common;

use common::sandbox::{self, Inside, Sandbox, SandboxOptions};
use common::*;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use time::OffsetDateTime;

/// Every request of these tests.
const T: Duration = Duration::from_secs(30);
/// At most two sandboxes (each a serve, an agent and an sshd) at once on a small machine.
static GATE: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

const POOL: &str = "hosts";

/// A sandboxed host with an agent, joined to a service on this machine's side of the veth.
struct Rig {
    sb: Sandbox,
    server: Server,
    c: Client,
    data: tempfile::TempDir,
    port: u16,
    tls_port: u16,
    /// The URL the agent is given (HTTPS when the service serves it).
    agent_url: String,
    serve_extra: Vec<String>,
    token_file: PathBuf,
    agent: Option<Inside>,
    agent_env: Vec<(String, String)>,
    node: String,
    /// Key pairs of the test (on this machine).
    keys: tempfile::TempDir,
}

/// `bluebatch serve --nodes agents` on `host:port` (and, with `--tls` in `extra`, HTTPS on
/// `tls_port`); the server and its HTTPS URL, once it listens (at most 20 s).
fn serve(
    host: &str,
    port: u16,
    tls_port: u16,
    data: &Path,
    extra: &[String],
) -> (Server, Option<String>) {
    let tls = extra.iter().any(|a| a == "--tls");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bluebatch"));
    cmd.args(["serve", "--node-step-ms", "20", "--nodes", "agents"])
        .args(["--host", host, "--port", &port.to_string()])
        .arg("--data-dir")
        .arg(data)
        .args(extra)
        .env("BLUEBATCH_LOG", "warn")
        .env_remove("BLUEBATCH_ACCOUNTS")
        .env_remove("BLUEBATCH_ACCOUNTS_FILE")
        .env_remove("BLUEBATCH_NODES")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if tls {
        cmd.args(["--tls-port", &tls_port.to_string()]);
    }
    let mut child = cmd.spawn().expect("starting bluebatch serve");
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(u) = line.strip_prefix("bluebatch listening on ") {
                let _ = tx.send(u.trim().to_string());
            }
        }
    });
    let (mut http, mut https) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(20);
    while http.is_none() || (tls && https.is_none()) {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(url) = rx.recv_timeout(left) else {
            let _ = child.kill();
            panic!("bluebatch serve {extra:?} did not listen within 20 s");
        };
        if url.starts_with("https://") {
            https = Some(url);
        } else {
            http = Some(url);
        }
    }
    let url = http.unwrap();
    (Server { child, url }, https)
}

fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Rig {
    /// A sandbox (sshd with `UsePAM use_pam`), `prepare` run on it before the agent starts (to
    /// give it accounts of its own), a service with `serve_extra`, a one-node agents pool, a
    /// join token made with the CLI, and the agent joined; returns once the node is idle. None
    /// (a loud skip) without root or the tools.
    async fn new(
        use_pam: bool,
        serve_extra: &[&str],
        prepare: impl FnOnce(&Sandbox),
    ) -> Option<Rig> {
        Self::new_env(use_pam, serve_extra, &[], prepare).await
    }

    /// [`Rig::new`] with `agent_env` added to the agent's environment (e.g. its PATH).
    async fn new_env(
        use_pam: bool,
        serve_extra: &[&str],
        agent_env: &[(&str, &str)],
        prepare: impl FnOnce(&Sandbox),
    ) -> Option<Rig> {
        if !sandbox::available() || !have_ssh_client() {
            return None;
        }
        let sb = Sandbox::start(SandboxOptions { use_pam });
        prepare(&sb);
        let (port, tls_port) = (free_port(&sb.host_ip), free_port(&sb.host_ip));
        let data = tempfile::tempdir().unwrap();
        let serve_extra: Vec<String> = serve_extra.iter().map(|s| s.to_string()).collect();
        let (server, https) = serve(&sb.host_ip, port, tls_port, data.path(), &serve_extra);
        // Agents talk HTTPS when the service serves it (its plain listener refuses them).
        let agent_url = https.clone().unwrap_or_else(|| server.url.clone());
        let c = server.client();
        // The pool asks for agent nodes itself too (the flag says so already).
        let mut body = pool_body(POOL, 1);
        body["metadata"] = json!([{"name": "bluebatch.nodes", "value": "agents"}]);
        let r = c.req("POST", "/pools").json(&body).send_within(T).await;
        assert_eq!(r.status, 201, "{}", text(&r));
        // The operator's flow: `join-token create` → a file → `agent --join-token-file`.
        let out = bluebatch_cli(
            &["join-token", "create", "--pool", POOL, "--ttl", "10m"],
            &[
                ("BLUEBATCH_URL", server.url.as_str()),
                ("BLUEBATCH_KEY", KEY),
            ],
        )
        .await;
        assert!(
            out.status.success(),
            "join-token create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let printed = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = printed.lines().collect();
        assert_eq!(
            lines.len(),
            2,
            "join-token create prints two lines: {printed:?}"
        );
        assert!(lines[0].contains('.'), "line 1 is ID.SECRET");
        if https.is_some() {
            assert!(
                lines[1].starts_with("sha256:") && lines[1].len() == 7 + 64,
                "line 2 is the CA fingerprint to pin: {:?}",
                lines[1]
            );
        } else {
            assert_eq!(lines[1], "-", "no HTTPS: no CA fingerprint");
        }
        let token_file = sb.dir.path().join("join-token");
        std::fs::write(&token_file, &printed).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut rig = Rig {
            sb,
            server,
            c,
            data,
            port,
            tls_port,
            agent_url,
            serve_extra,
            token_file,
            agent: None,
            agent_env: agent_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            node: String::new(),
            keys: tempfile::tempdir().unwrap(),
        };
        rig.start_agent(true);
        rig.node = rig.wait_node("idle").await["id"]
            .as_str()
            .unwrap()
            .to_string();
        Some(rig)
    }

    /// Starts `bluebatch agent` inside the sandbox; with the token file the first time, without
    /// it later (the state directory holds the identity).
    fn start_agent(&mut self, with_token: bool) {
        let bin = env!("CARGO_BIN_EXE_bluebatch");
        let state = self.sb.state_dir();
        let mut args = vec![
            "agent".to_string(),
            "--server".into(),
            self.agent_url.clone(),
            "--state-dir".into(),
            state.display().to_string(),
        ];
        if with_token {
            args.push("--join-token-file".into());
            args.push(self.token_file.display().to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut env = vec![("BLUEBATCH_LOG", "info,russh=warn")];
        env.extend(self.agent_env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        self.agent = Some(self.sb.spawn(bin, &args, &env, "agent.log"));
    }

    fn kill_agent(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.kill_hard();
        }
    }

    /// The pool's one node once it is in `state` (at most 45 s).
    async fn wait_node(&self, state: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(45);
        loop {
            let r = self
                .c
                .req("GET", &format!("/pools/{POOL}/nodes"))
                .send_within(T)
                .await;
            assert_eq!(r.status, 200, "{}", text(&r));
            let v = r.json();
            let list = v["value"].as_array().unwrap();
            if list.len() == 1 && list[0]["state"] == state {
                return list[0].clone();
            }
            assert!(
                Instant::now() < deadline,
                "the node never became {state}: {v}\nagent log:\n{}",
                self.sb.read_log("agent.log")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn users(&self) -> String {
        format!("/pools/{POOL}/nodes/{}/users", self.node)
    }

    fn user(&self, name: &str) -> String {
        format!("{}/{name}", self.users())
    }

    async fn add(&self, body: Value) -> Resp {
        self.c
            .req("POST", &self.users())
            .query(&format!("api-version={V}&timeout=20"))
            .json(&body)
            .send_within(T)
            .await
    }

    async fn update(&self, name: &str, body: Value) -> Resp {
        self.c
            .req("PUT", &self.user(name))
            .query(&format!("api-version={V}&timeout=20"))
            .json(&body)
            .send_within(T)
            .await
    }

    async fn delete(&self, name: &str) -> Resp {
        self.c
            .req("DELETE", &self.user(name))
            .query(&format!("api-version={V}&timeout=20"))
            .send_within(T)
            .await
    }

    fn keypair(&self, name: &str) -> (PathBuf, String) {
        keypair(self.keys.path(), name)
    }

    /// Waits (at most `limit`) until `check` holds of the sandbox, naming `what` otherwise.
    async fn until(&self, limit: Duration, what: &str, check: impl Fn(&Sandbox) -> bool) {
        let deadline = Instant::now() + limit;
        while !check(&self.sb) {
            assert!(
                Instant::now() < deadline,
                "{what}: not within {limit:?}\nagent log:\n{}",
                self.sb.read_log("agent.log")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn restart_server(&mut self) {
        self.server.kill();
        self.server = serve(
            &self.sb.host_ip,
            self.port,
            self.tls_port,
            self.data.path(),
            &self.serve_extra,
        )
        .0;
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.kill_agent();
        if std::thread::panicking() {
            eprintln!(
                "--- agent log ---\n{}\n--- sshd log ---\n{}",
                self.sb.read_log("agent.log"),
                self.sb.read_log("sshd.log")
            );
        }
    }
}

fn iso(t: OffsetDateTime) -> String {
    bluebatch_core::timefmt::iso(t)
}

/// Days since 1970-01-01 of `t`'s UTC date (shadow's day numbers).
fn day(t: OffsetDateTime) -> i64 {
    t.unix_timestamp().div_euclid(86_400)
}

/// shadow's field `i` (0-based) of `user` in the sandbox.
fn shadow_field(sb: &Sandbox, user: &str, i: usize) -> Option<String> {
    sb.shadow_entry(user)
        .and_then(|l| l.split(':').nth(i).map(str::to_string))
}

fn uid_of(sb: &Sandbox, user: &str) -> u32 {
    sb.passwd_entry(user)
        .unwrap_or_else(|| panic!("{user} has no passwd entry"))
        .split(':')
        .nth(2)
        .unwrap()
        .parse()
        .unwrap()
}

/// The harness itself: an account made inside with the real shadow tools logs in over the real
/// OpenSSH client to the sandbox's address (sshd with and without PAM), a wrong password is
/// refused, this machine's `/etc/passwd` never sees the account, and tear-down leaves no
/// namespace, veth, mount or process behind.
#[tokio::test]
async fn sandbox_host_logs_in_its_own_accounts_and_leaves_nothing() {
    if !sandbox::available() || !have_ssh_client() {
        return;
    }
    let _gate = GATE.acquire().await.unwrap();
    for use_pam in [true, false] {
        let sb = Sandbox::start(SandboxOptions { use_pam });
        let user = format!("bbprobe{}", u8::from(use_pam));
        sb.useradd(&user, Some("Probe-pw-1"));
        assert!(
            sb.passwd_entry(&user).is_some(),
            "the sandbox's /etc/passwd has the account"
        );
        assert!(
            sandbox::entry(&std::fs::read_to_string("/etc/passwd").unwrap(), &user).is_none(),
            "this machine's /etc/passwd never sees a sandbox's account"
        );
        let who = sb
            .ssh_password(&user, "Probe-pw-1", "echo $(whoami) $HOME")
            .await;
        assert_eq!(
            who.stdout("password login to the sandbox").trim(),
            format!("{user} /home/{user}"),
            "UsePAM {use_pam}: {}",
            sb.read_log("sshd.log")
        );
        assert_eq!(
            sb.ssh_password(&user, "wrong-pw", "true").await,
            SshOutcome::Refused,
            "UsePAM {use_pam}: a wrong password is refused"
        );
        // sshd inside reads the sandbox's config, as the agent's `sshd -T` does.
        let t = sb.run_ok("/usr/sbin/sshd", &["-T"]);
        let want = format!("usepam {}", if use_pam { "yes" } else { "no" });
        assert!(t.lines().any(|l| l == want), "sshd -T inside: {t}");
        // A process started inside runs in the sandbox's namespaces, and sees only its
        // processes.
        let mut p = sb.spawn("sleep", &["60"], &[], "sleep.log");
        for ns in ["net", "mnt", "pid"] {
            assert_eq!(
                std::fs::read_link(format!("/proc/{}/ns/{ns}", p.pid)).unwrap(),
                std::fs::read_link(format!("/proc/{}/ns/{ns}", sb.init_pid())).unwrap(),
                "{ns} namespace"
            );
        }
        let seen = sb.run_ok("pgrep", &["-x", "sleep"]);
        assert!(
            seen.lines().count() <= 2,
            "pgrep inside sees the sandbox's processes only: {seen}"
        );
        assert!(p.running());
        p.kill_hard();
        assert!(!p.running());

        let (netns, veth, home) = (
            sb.netns.clone(),
            sb.veth.clone(),
            sb.dir.path().join("home"),
        );
        let init = sb.init_pid();
        let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
        assert!(
            String::from_utf8_lossy(&links.stdout).contains(&format!(" {veth}@")),
            "the veth pair while the sandbox runs"
        );
        drop(sb);
        let ns = Command::new("ip").args(["netns", "list"]).output().unwrap();
        assert!(
            !String::from_utf8_lossy(&ns.stdout).contains(&netns),
            "the network namespace is gone"
        );
        let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
        assert!(
            !String::from_utf8_lossy(&links.stdout).contains(&format!(" {veth}@")),
            "the veth pair is gone"
        );
        assert!(
            !Path::new(&format!("/proc/{init}")).exists(),
            "the sandbox's processes are gone"
        );
        assert!(!home.exists(), "the sandbox's files are gone");
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !mounts.contains("bluebatch-sandbox-"),
            "no mount of the sandbox is visible here"
        );
    }
}

/// Add/Update/Delete User through the Batch API become a real account of the host: password and
/// key logins over OpenSSH, the old password and key refused after Update, a removed password
/// is `*` (key logins keep working), Delete of a logged-in user ends the session and removes
/// the account and home; the host's own account is never touched and its name is refused.
#[tokio::test]
async fn accounts_set_through_the_api_log_in_to_the_hosts_sshd() {
    let _gate = GATE.acquire().await.unwrap();
    let Some(rig) = Rig::new(true, &[], |sb| sb.useradd("carol", Some("Carol-own-pw-1"))).await
    else {
        return;
    };
    let sb = &rig.sb;
    let carol = (sb.passwd_entry("carol"), sb.shadow_entry("carol"));

    // The node is the host: its address and its sshd's port.
    let node = rig.wait_node("idle").await;
    assert_eq!(node["ipAddress"], sb.node_ip.as_str(), "{node}");
    let r = rig
        .c
        .req(
            "GET",
            &format!("/pools/{POOL}/nodes/{}/remoteloginsettings", rig.node),
        )
        .send_within(T)
        .await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(r.json()["remoteLoginIPAddress"], sb.node_ip.as_str());
    assert_eq!(r.json()["remoteLoginPort"], 22);

    let (k1, pub1) = rig.keypair("k1");
    let (k2, pub2) = rig.keypair("k2");
    let r = rig
        .add(json!({"name": "alice", "password": "Alice-pw-1", "sshPublicKey": pub1}))
        .await;
    assert_eq!(r.status, 201, "{}", text(&r));
    // 201 means the host enforces it already.
    let who = sb
        .ssh_password("alice", "Alice-pw-1", "id -un; echo $HOME")
        .await;
    assert_eq!(who.stdout("alice's password").trim(), "alice\n/home/alice");
    let who = sb.ssh_key("alice", &k1, "id -un").await;
    assert_eq!(who.stdout("alice's key").trim(), "alice");
    let hash = shadow_field(sb, "alice", 1).unwrap();
    assert!(hash.starts_with('$'), "a crypt hash in shadow: {hash:.3}…");
    assert!(!hash.contains("Alice-pw-1"));
    let uid = uid_of(sb, "alice");
    let ak = sb.dir.path().join("home/alice/.ssh/authorized_keys");
    {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&ak).expect("authorized_keys");
        assert_eq!(m.mode() & 0o777, 0o600, "authorized_keys mode");
        assert_eq!(m.uid(), uid, "authorized_keys owned by the user");
        let d = std::fs::metadata(ak.parent().unwrap()).unwrap();
        assert_eq!(d.mode() & 0o777, 0o700, ".ssh mode");
        assert_eq!(d.uid(), uid);
    }
    assert!(
        std::fs::read_to_string(&ak)
            .unwrap()
            .contains(pub1.split_whitespace().nth(1).unwrap())
    );
    assert!(
        sandbox::entry(&std::fs::read_to_string("/etc/passwd").unwrap(), "alice").is_none(),
        "this machine's /etc/passwd never gets the node's account"
    );

    // Update replaces password and key: the old ones are refused at once.
    let r = rig
        .update(
            "alice",
            json!({"password": "Alice-pw-2", "sshPublicKey": pub2}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(
        sb.ssh_password("alice", "Alice-pw-1", "true").await,
        SshOutcome::Refused,
        "the old password"
    );
    assert_eq!(
        sb.ssh_key("alice", &k1, "true").await,
        SshOutcome::Refused,
        "the old key"
    );
    assert!(
        sb.ssh_password("alice", "Alice-pw-2", "true")
            .await
            .accepted()
    );
    assert!(sb.ssh_key("alice", &k2, "true").await.accepted());

    // Update without a password: `*`, and the key still logs in.
    let r = rig.update("alice", json!({"sshPublicKey": pub2})).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(shadow_field(sb, "alice", 1).as_deref(), Some("*"));
    assert_eq!(
        sb.ssh_password("alice", "Alice-pw-2", "true").await,
        SshOutcome::Refused,
        "a removed password"
    );
    assert!(sb.ssh_key("alice", &k2, "true").await.accepted());

    // Update without a key: the key goes (authorized_keys emptied), the password logs in.
    let r = rig.update("alice", json!({"password": "Alice-pw-3"})).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(
        sb.ssh_key("alice", &k2, "true").await,
        SshOutcome::Refused,
        "a removed key"
    );
    assert!(
        sb.ssh_password("alice", "Alice-pw-3", "true")
            .await
            .accepted()
    );
    let r = rig.update("alice", json!({"sshPublicKey": pub2})).await;
    assert_eq!(r.status, 200, "{}", text(&r));

    // Delete while logged in: the session ends, the account and its home go.
    let mut session = sb.ssh_key_session("alice", &k2, 300);
    {
        use tokio::io::AsyncBufReadExt;
        let stdout = session.stdout.take().unwrap();
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let first = within(
            Duration::from_secs(20),
            "the session to open",
            lines.next_line(),
        )
        .await
        .unwrap();
        assert_eq!(first.as_deref(), Some("open"));
    }
    let r = rig.delete("alice").await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(
        sb.passwd_entry("alice"),
        None,
        "gone from the host's /etc/passwd"
    );
    assert_eq!(
        sb.shadow_entry("alice"),
        None,
        "gone from the host's /etc/shadow"
    );
    assert!(!sb.dir.path().join("home/alice").exists(), "home removed");
    within(
        Duration::from_secs(20),
        "the open session to end",
        session.wait(),
    )
    .await
    .unwrap();
    let left = sb.run("pgrep", &["-u", &uid.to_string()]);
    assert!(
        String::from_utf8_lossy(&left.stdout).trim().is_empty(),
        "no process of the deleted user is left"
    );
    let r = rig.update("alice", json!({})).await;
    assert_eq!(r.status, 404, "{}", text(&r));

    // The host's own account: never touched, and its name refused before anything is stored.
    let r = rig
        .add(json!({"name": "carol", "password": "Api-pw-1234"}))
        .await;
    assert_eq!(r.status, 400, "{}", text(&r));
    assert_eq!(r.code(), "InvalidPropertyValue", "{}", text(&r));
    assert!(text(&r).contains("reserved on this node"), "{}", text(&r));
    let r = rig
        .add(json!({"name": "root", "password": "Api-pw-1234"}))
        .await;
    assert_eq!(r.status, 400, "{}", text(&r));
    assert_eq!(
        (sb.passwd_entry("carol"), sb.shadow_entry("carol")),
        carol,
        "the host's own account is untouched"
    );
    assert!(
        sb.ssh_password("carol", "Carol-own-pw-1", "true")
            .await
            .accepted(),
        "and logs in as before"
    );
}

/// `expiryTime` reaches shadow's expire day: with `UsePAM yes` the day after the expiry's
/// date, with `UsePAM no` the date itself, so that logins stop from 00:00 UTC of the day after
/// either way; a moved service clock shifts it, and the real OpenSSH client is then refused.
async fn expiry_reaches_shadow(use_pam: bool) {
    let _gate = GATE.acquire().await.unwrap();
    let Some(rig) = Rig::new(use_pam, &[], |_| {}).await else {
        return;
    };
    let sb = &rig.sb;
    let expiry = OffsetDateTime::now_utc() + time::Duration::days(2);
    let r = rig
        .add(json!({"name": "dave", "password": "Dave-pw-1", "expiryTime": iso(expiry)}))
        .await;
    assert_eq!(r.status, 201, "{}", text(&r));
    let d = day(expiry);
    let want = if use_pam { d + 1 } else { d };
    assert_eq!(
        shadow_field(sb, "dave", 7).as_deref(),
        Some(want.to_string().as_str()),
        "UsePAM {use_pam}: shadow's expire day for an expiry on day {d}"
    );
    assert!(
        sb.ssh_password("dave", "Dave-pw-1", "true")
            .await
            .accepted()
    );

    // Update moves it.
    let later = expiry + time::Duration::days(5);
    let r = rig
        .update(
            "dave",
            json!({"password": "Dave-pw-1", "expiryTime": iso(later)}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", text(&r));
    let want = if use_pam { day(later) + 1 } else { day(later) };
    assert_eq!(
        shadow_field(sb, "dave", 7).as_deref(),
        Some(want.to_string().as_str())
    );

    // The service clock moves 8 days on: the host's expiry follows, and sshd refuses.
    let r = rig
        .c
        .control("POST", "/clock/advance")
        .json(&json!({"by": "8d"}))
        .send_within(T)
        .await;
    assert_eq!(r.status, 200, "{}", text(&r));
    let shifted = want - 8;
    rig.until(
        Duration::from_secs(45),
        "shadow's expire day follows the service clock",
        |sb| shadow_field(sb, "dave", 7).as_deref() == Some(shifted.to_string().as_str()),
    )
    .await;
    assert_eq!(
        sb.ssh_password("dave", "Dave-pw-1", "true").await,
        SshOutcome::Refused,
        "UsePAM {use_pam}: an expired account is refused"
    );
}

#[tokio::test]
async fn expiry_reaches_shadow_with_pam() {
    expiry_reaches_shadow(true).await;
}

#[tokio::test]
async fn expiry_reaches_shadow_without_pam() {
    expiry_reaches_shadow(false).await;
}

/// `isAdmin`: a key-only admin can `sudo -n` (the managed group and its sudoers drop-in), a
/// non-admin cannot; `bluebatch agent uninstall` then removes every managed account, the
/// groups and the drop-in, and leaves the host's own account alone.
#[tokio::test]
async fn admins_sudo_and_uninstall_removes_what_the_agent_made() {
    if !Path::new("/usr/bin/sudo").exists() && !require(false, "sudo (apt-get install sudo)") {
        return;
    }
    let _gate = GATE.acquire().await.unwrap();
    let Some(mut rig) =
        Rig::new(false, &[], |sb| sb.useradd("carol", Some("Carol-own-pw-1"))).await
    else {
        return;
    };
    let (ka, puba) = rig.keypair("admin");
    let (ku, pubu) = rig.keypair("user");
    let r = rig
        .add(json!({"name": "erin", "isAdmin": true, "sshPublicKey": puba}))
        .await;
    assert_eq!(r.status, 201, "{}", text(&r));
    let r = rig
        .add(json!({"name": "frank", "isAdmin": false, "sshPublicKey": pubu}))
        .await;
    assert_eq!(r.status, 201, "{}", text(&r));
    let sb = &rig.sb;
    let erin = sb.ssh_key("erin", &ka, "sudo -n id -u").await;
    assert_eq!(erin.stdout("sudo as the admin").trim(), "0");
    match sb.ssh_key("frank", &ku, "sudo -n true").await {
        SshOutcome::Accepted { code, .. } => assert_ne!(code, 0, "a non-admin cannot sudo"),
        other => panic!("frank's login: {other:?}"),
    }
    let admins = sb
        .group_entry("bluebatch-admin")
        .expect("the managed admin group");
    assert!(
        admins.ends_with(":erin") || admins.contains("erin"),
        "{admins}"
    );
    assert!(!admins.contains("frank"), "{admins}");
    let dropins: Vec<String> =
        std::fs::read_dir(format!("/proc/{}/root/etc/sudoers.d", sb.init_pid()))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("bluebatch"))
            .collect();
    assert_eq!(dropins.len(), 1, "one sudoers drop-in: {dropins:?}");
    assert!(
        !Path::new("/etc/sudoers.d").join(&dropins[0]).exists(),
        "this machine's /etc/sudoers.d is untouched"
    );
    let out = sb.run(
        "visudo",
        &["-cf", &format!("/etc/sudoers.d/{}", dropins[0])],
    );
    assert!(out.status.success(), "the drop-in passes visudo -c");

    // Uninstall (agent stopped first): every trace of the agent goes, the host's own stays.
    let carol = (sb.passwd_entry("carol"), sb.shadow_entry("carol"));
    let dropin = dropins[0].clone();
    rig.kill_agent();
    let sb = &rig.sb;
    let state = sb.state_dir().display().to_string();
    let out = sb.run(
        env!("CARGO_BIN_EXE_bluebatch"),
        &["agent", "uninstall", "--state-dir", &state],
    );
    assert!(
        out.status.success(),
        "agent uninstall: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for u in ["erin", "frank"] {
        assert_eq!(sb.passwd_entry(u), None, "{u} removed");
        assert!(
            !sb.dir.path().join("home").join(u).exists(),
            "{u}'s home removed"
        );
    }
    for g in ["bluebatch-admin", "bluebatch-managed"] {
        assert_eq!(sb.group_entry(g), None, "group {g} removed");
    }
    assert!(
        sb.read(&format!("/etc/sudoers.d/{dropin}")).is_none(),
        "the drop-in removed"
    );
    assert_eq!(
        (sb.passwd_entry("carol"), sb.shadow_entry("carol")),
        carol,
        "the host's own account is untouched"
    );
    assert!(sb.passwd_entry("root").is_some());
}

/// The agent killed (SIGKILL) while it applies a burst of writes, then restarted (no token: its
/// state directory holds the identity): every write ends applied, nothing half-applied (each
/// account has its password hash and logs in with it).
#[tokio::test]
async fn agent_killed_mid_revision_converges_after_restart() {
    let _gate = GATE.acquire().await.unwrap();
    let Some(mut rig) = Rig::new(true, &[], |_| {}).await else {
        return;
    };
    let names: Vec<String> = (0..8).map(|i| format!("burst{i}")).collect();
    let url = rig.server.url.clone();
    let users = rig.users();
    let writes: Vec<_> = names
        .iter()
        .map(|n| {
            let c = Client::new(&url, ACCOUNT, KEY);
            let users = users.clone();
            let body = json!({"name": n, "password": format!("{n}-Pw-1")});
            tokio::spawn(async move {
                c.req("POST", &users)
                    .query(&format!("api-version={V}&timeout=8"))
                    .json(&body)
                    .send_within(T)
                    .await
            })
        })
        .collect();
    // Kill as soon as the host has the first of them: the rest are in flight.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !names.iter().any(|n| rig.sb.passwd_entry(n).is_some()) {
        assert!(
            Instant::now() < deadline,
            "no account appeared\n{}",
            rig.sb.read_log("agent.log")
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    rig.kill_agent();
    let applied_before = names
        .iter()
        .filter(|n| rig.sb.passwd_entry(n).is_some())
        .count();
    assert!(
        applied_before < names.len(),
        "the agent was killed before it had applied every account ({applied_before})"
    );
    for w in writes {
        let r = w.await.unwrap();
        assert!(
            r.status == 201 || (r.status == 500 && r.code() == "OperationTimedOut"),
            "{} {}",
            r.status,
            text(&r)
        );
    }
    rig.start_agent(false);
    rig.until(
        Duration::from_secs(45),
        "every account applied after the restart",
        |sb| {
            names.iter().all(|n| {
                sb.shadow_entry(n)
                    .is_some_and(|l| l.split(':').nth(1).is_some_and(|h| h.starts_with('$')))
            })
        },
    )
    .await;
    for n in &names {
        let who = rig.sb.ssh_password(n, &format!("{n}-Pw-1"), "id -un").await;
        assert_eq!(who.stdout(n).trim(), n.as_str());
    }
    eprintln!("{applied_before} of 8 accounts were on the host when the agent was killed");
    // The service agrees: every user is applied on the node.
    let r = rig
        .c
        .control("GET", &format!("/pools/{POOL}/nodes/{}/users", rig.node))
        .send_within(T)
        .await;
    assert_eq!(r.status, 200, "{}", text(&r));
    let v = r.json();
    let list = v["users"]
        .as_array()
        .or_else(|| v["value"].as_array())
        .cloned()
        .unwrap_or_default();
    for u in &list {
        assert_eq!(u["appliedOnNode"], true, "{u}");
    }
}

/// The service killed and restarted on the same data directory: the agent reconnects by itself,
/// a write after the restart is applied (201) and what was there before still logs in.
#[tokio::test]
async fn service_restart_agent_reconnects_and_converges() {
    let _gate = GATE.acquire().await.unwrap();
    let Some(mut rig) = Rig::new(false, &[], |_| {}).await else {
        return;
    };
    let r = rig
        .add(json!({"name": "gina", "password": "Gina-pw-1"}))
        .await;
    assert_eq!(r.status, 201, "{}", text(&r));
    rig.restart_server();
    rig.c = rig.server.client();
    rig.wait_node("idle").await;
    let r = rig
        .add(json!({"name": "hank", "password": "Hank-pw-1"}))
        .await;
    assert_eq!(r.status, 201, "{}", text(&r));
    assert!(
        rig.sb
            .ssh_password("hank", "Hank-pw-1", "true")
            .await
            .accepted()
    );
    assert!(
        rig.sb
            .ssh_password("gina", "Gina-pw-1", "true")
            .await
            .accepted()
    );
    let r = rig.update("gina", json!({"password": "Gina-pw-2"})).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(
        rig.sb.ssh_password("gina", "Gina-pw-1", "true").await,
        SshOutcome::Refused
    );
}

/// An agent that stays away: its node goes `unknown` after the grace time, a write answers
/// `500 OperationTimedOut` and is kept; when the agent returns the node is idle again and the
/// host gets the change.
#[tokio::test]
async fn agent_away_times_out_and_applies_on_return() {
    let _gate = GATE.acquire().await.unwrap();
    let Some(mut rig) = Rig::new(true, &["--agent-grace", "8s"], |_| {}).await else {
        return;
    };
    rig.kill_agent();
    let away = |body: Value, method: &'static str, path: String| {
        let c = &rig.c;
        async move {
            let started = Instant::now();
            let r = c
                .req(method, &path)
                .query(&format!("api-version={V}&timeout=2"))
                .json(&body)
                .send_within(T)
                .await;
            assert_eq!(r.status, 500, "{}", text(&r));
            assert_eq!(r.code(), "OperationTimedOut", "{}", text(&r));
            assert!(
                started.elapsed() >= Duration::from_millis(1500),
                "it waited for the node"
            );
        }
    };
    away(
        json!({"name": "ivan", "password": "Ivan-pw-1"}),
        "POST",
        rig.users(),
    )
    .await;
    // The change is kept: the user exists through the API already, and takes an update.
    away(json!({"password": "Ivan-pw-2"}), "PUT", rig.user("ivan")).await;
    assert_eq!(rig.sb.passwd_entry("ivan"), None);
    // After the grace time the node is `unknown`, and takes no user writes (as Azure).
    rig.wait_node("unknown").await;
    let r = rig.update("ivan", json!({"password": "Ivan-pw-3"})).await;
    assert_eq!(r.status, 409, "{}", text(&r));
    assert_eq!(r.code(), "OperationInvalidForCurrentState", "{}", text(&r));

    rig.start_agent(false);
    rig.wait_node("idle").await;
    rig.until(
        Duration::from_secs(45),
        "the kept change reaches the host",
        |sb| sb.passwd_entry("ivan").is_some(),
    )
    .await;
    // The last write wins: the second password.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if rig
            .sb
            .ssh_password("ivan", "Ivan-pw-2", "true")
            .await
            .accepted()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ivan's latest password never logged in"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        rig.sb.ssh_password("ivan", "Ivan-pw-1", "true").await,
        SshOutcome::Refused
    );
}

/// A shadow tool that fails on the host: the write answers `500 InternalError` naming the
/// node's reason, nothing is left half-made, and once the tool works again the agent's retry
/// applies the kept write by itself.
#[tokio::test]
async fn a_failing_shadow_tool_answers_internal_error_and_the_retry_converges() {
    let _gate = GATE.acquire().await.unwrap();
    let shim = tempfile::Builder::new()
        .prefix("bluebatch-shim-")
        .tempdir()
        .unwrap();
    let flag = shim.path().join("fail");
    std::fs::write(&flag, "").unwrap();
    let script = format!(
        "#!/bin/sh\nif [ -e {flag} ]; then echo 'useradd: cannot lock /etc/passwd; try again later.' >&2; exit 1; fi\nexec /usr/sbin/useradd \"$@\"\n",
        flag = flag.display()
    );
    let tool = shim.path().join("useradd");
    std::fs::write(&tool, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        shim.path().display()
    );
    let Some(rig) = Rig::new_env(false, &[], &[("PATH", &path)], |_| {}).await else {
        return;
    };
    let r = rig
        .c
        .req("POST", &rig.users())
        .query(&format!("api-version={V}&timeout=15"))
        .json(&json!({"name": "jack", "password": "Jack-pw-1"}))
        .send_within(T)
        .await;
    assert_eq!(r.status, 500, "{}", text(&r));
    assert_eq!(r.code(), "InternalError", "{}", text(&r));
    assert!(
        text(&r).contains("cannot lock /etc/passwd"),
        "the answer names the node's reason: {}",
        text(&r)
    );
    assert!(!text(&r).contains("Jack-pw-1"));
    assert_eq!(rig.sb.passwd_entry("jack"), None, "nothing half-made");
    // The operator sees the host's reason on the node-users control.
    let control = format!("/pools/{POOL}/nodes/{}/users", rig.node);
    let v = rig.c.control("GET", &control).send_within(T).await.json();
    let failures = v["applyFailures"].as_array().cloned().unwrap_or_default();
    assert!(
        failures
            .iter()
            .any(|f| f["name"] == "jack"
                && f["reason"].as_str().unwrap_or("").contains("cannot lock")),
        "{v}"
    );

    // The tool works again: the agent retries by itself and the kept write lands.
    std::fs::remove_file(&flag).unwrap();
    rig.until(
        Duration::from_secs(60),
        "the retry to apply the kept write",
        |sb| sb.passwd_entry("jack").is_some(),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !rig
        .sb
        .ssh_password("jack", "Jack-pw-1", "true")
        .await
        .accepted()
    {
        assert!(Instant::now() < deadline, "jack never logged in");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let r = rig.update("jack", json!({"password": "Jack-pw-2"})).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    let v = rig.c.control("GET", &control).send_within(T).await.json();
    assert_eq!(v["applyFailures"], json!([]), "{v}");
}

/// Reboot of an agent node never reboots the host: it ends the sessions of managed accounts and
/// the node comes back idle with its accounts; Reimage recreates the node without them.
#[tokio::test]
async fn reboot_ends_sessions_and_reimage_clears_accounts_on_the_host() {
    let _gate = GATE.acquire().await.unwrap();
    let Some(rig) = Rig::new(true, &[], |sb| sb.useradd("carol", None)).await else {
        return;
    };
    let sb = &rig.sb;
    let (k, public) = rig.keypair("kim");
    let r = rig
        .add(json!({"name": "kim", "password": "Kim-pw-1", "sshPublicKey": public}))
        .await;
    assert_eq!(r.status, 201, "{}", text(&r));
    let uid = uid_of(sb, "kim");
    let mut session = sb.ssh_key_session("kim", &k, 300);
    {
        use tokio::io::AsyncBufReadExt;
        let stdout = session.stdout.take().unwrap();
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let first = within(
            Duration::from_secs(20),
            "the session to open",
            lines.next_line(),
        )
        .await
        .unwrap();
        assert_eq!(first.as_deref(), Some("open"));
    }
    let r = rig
        .c
        .req("POST", &format!("/pools/{POOL}/nodes/{}/reboot", rig.node))
        .json(&json!({}))
        .send_within(T)
        .await;
    assert_eq!(r.status, 202, "{}", text(&r));
    within(
        Duration::from_secs(30),
        "the session to end at reboot",
        session.wait(),
    )
    .await
    .unwrap();
    rig.wait_node("idle").await;
    assert_eq!(uid_of(sb, "kim"), uid, "the account stays across a reboot");
    assert!(sb.ssh_key("kim", &k, "true").await.accepted());
    assert!(
        Path::new(&format!("/proc/{}", sb.init_pid())).exists(),
        "the host itself never rebooted"
    );

    let r = rig
        .c
        .req("POST", &format!("/pools/{POOL}/nodes/{}/reimage", rig.node))
        .json(&json!({}))
        .send_within(T)
        .await;
    assert_eq!(r.status, 202, "{}", text(&r));
    rig.wait_node("idle").await;
    rig.until(
        Duration::from_secs(30),
        "reimage to remove the account",
        |sb| sb.passwd_entry("kim").is_none(),
    )
    .await;
    assert!(!sb.dir.path().join("home/kim").exists(), "its home too");
    assert!(
        sb.passwd_entry("carol").is_some(),
        "the host's own account stays"
    );
    let r = rig.update("kim", json!({})).await;
    assert_eq!(r.status, 404, "{}", text(&r));
    // The reimaged node takes new accounts.
    let r = rig
        .add(json!({"name": "kim", "password": "Kim-pw-2"}))
        .await;
    assert_eq!(r.status, 201, "{}", text(&r));
    assert!(sb.ssh_password("kim", "Kim-pw-2", "true").await.accepted());
}

/// Over HTTPS: `join-token create` prints the service's CA fingerprint, the agent on the host
/// pins it at join and keeps talking HTTPS; then, after `agent uninstall`, the host joins again
/// with a new token and `--admin-group`: admins become members of the host's existing group,
/// with no sudoers drop-in.
#[tokio::test]
async fn https_join_pins_the_ca_and_admin_group_uses_the_hosts_group() {
    let _gate = GATE.acquire().await.unwrap();
    let Some(mut rig) = Rig::new(false, &["--tls"], |sb| {
        sb.run_ok("groupadd", &["opsadmins"]);
    })
    .await
    else {
        return;
    };
    assert!(rig.agent_url.starts_with("https://"), "{}", rig.agent_url);
    let r = rig
        .add(json!({"name": "lena", "password": "Lena-pw-1", "isAdmin": true}))
        .await;
    assert_eq!(r.status, 201, "{}", text(&r));
    assert!(
        rig.sb
            .ssh_password("lena", "Lena-pw-1", "true")
            .await
            .accepted()
    );
    let admins = rig.sb.group_entry("bluebatch-admin").unwrap_or_default();
    assert!(admins.contains("lena"), "the managed admin group: {admins}");

    rig.kill_agent();
    let state = rig.sb.state_dir().display().to_string();
    let bin = env!("CARGO_BIN_EXE_bluebatch");
    let out = rig
        .sb
        .run(bin, &["agent", "uninstall", "--state-dir", &state]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(rig.sb.passwd_entry("lena"), None);
    // The old host is revoked at the service (its node leaves the pool); a new token joins
    // the host again.
    let v = rig.c.control("GET", "/hosts").send_within(T).await.json();
    let hosts = v["value"]
        .as_array()
        .or(v.as_array())
        .cloned()
        .unwrap_or_default();
    assert_eq!(hosts.len(), 1, "{v}");
    let id = hosts[0]["id"].as_str().unwrap().to_string();
    let r = rig
        .c
        .control("POST", &format!("/hosts/{id}/revoke"))
        .send_within(T)
        .await;
    assert!(r.status < 300, "{}", text(&r));
    let printed = bluebatch_cli(
        &["join-token", "create", "--pool", POOL],
        &[
            ("BLUEBATCH_URL", rig.server.url.as_str()),
            ("BLUEBATCH_KEY", KEY),
        ],
    )
    .await;
    assert!(printed.status.success());
    std::fs::write(&rig.token_file, &printed.stdout).unwrap();
    let token = rig.token_file.display().to_string();
    let args = [
        "agent",
        "--server",
        &rig.agent_url,
        "--state-dir",
        &state,
        "--join-token-file",
        &token,
        "--admin-group",
        "opsadmins",
    ];
    rig.agent = Some(
        rig.sb
            .spawn(bin, &args, &[("BLUEBATCH_LOG", "info")], "agent.log"),
    );
    let node = rig.wait_node("idle").await;
    rig.node = node["id"].as_str().unwrap().to_string();
    let r = rig
        .add(json!({"name": "milo", "password": "Milo-pw-1", "isAdmin": true}))
        .await;
    assert_eq!(r.status, 201, "{}", text(&r));
    let ops = rig.sb.group_entry("opsadmins").unwrap_or_default();
    assert!(ops.contains("milo"), "the host's group: {ops}");
    assert!(
        rig.sb.read("/etc/sudoers.d/bluebatch-admin").is_none(),
        "no drop-in with --admin-group"
    );
    let groups = rig.sb.ssh_password("milo", "Milo-pw-1", "id -Gn").await;
    assert!(groups.stdout("milo's groups").contains("opsadmins"));
}

/// A join token in the agent's environment never reaches the processes it starts: `sshd -T`
/// (here a wrapper, bind-mounted over the sandbox's `/usr/sbin/sshd`, that records its
/// environment and runs the real one) sees none of it.
#[tokio::test]
async fn the_join_token_in_the_environment_never_reaches_sshd_t() {
    let _gate = GATE.acquire().await.unwrap();
    let shim = tempfile::Builder::new()
        .prefix("bluebatch-sshd-shim-")
        .tempdir()
        .unwrap();
    let real = shim.path().join("sshd-real");
    let seen = shim.path().join("sshd-env");
    let wrapper = shim.path().join("sshd");
    const CANARY: &str = "canary.env-token-secret-0123456789";
    let prepare = |sb: &Sandbox| {
        std::fs::copy("/usr/sbin/sshd", &real).unwrap();
        let script = format!(
            "#!/bin/sh\nenv >> {seen}\nexec {real} \"$@\"\n",
            seen = seen.display(),
            real = real.display()
        );
        std::fs::write(&wrapper, script).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
        // Inside the sandbox's own mount namespace only.
        sb.run_ok(
            "mount",
            &["--bind", &wrapper.display().to_string(), "/usr/sbin/sshd"],
        );
    };
    let Some(rig) = Rig::new_env(false, &[], &[("BLUEBATCH_JOIN_TOKEN", CANARY)], prepare).await
    else {
        return;
    };
    let env = std::fs::read_to_string(&seen).unwrap_or_default();
    assert!(
        env.contains("PATH="),
        "the agent ran sshd -T through the wrapper: {env:?}"
    );
    assert!(
        !env.contains("BLUEBATCH_JOIN_TOKEN") && !env.contains(CANARY),
        "the join token reached sshd -T: {env}"
    );
    drop(rig);
}
