//! `bluebatch agent --simulate N` joined to `bluebatch serve --nodes agents`, through the real
//! binaries: a pool's nodes come from the agent, Add/Update User answer once the agent applied
//! them and the real OpenSSH client logs in to the simulated node with what was set; the agent
//! killed (SIGKILL) leaves writes answering OperationTimedOut, applied when it comes back (with
//! its stored identity: no token the second time); the service restarted, the agent reconnects
//! and converges by itself.

mod common;

use common::*;
use serde_json::json;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(10);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `bluebatch serve --nodes agents` on a fixed port (so an agent finds it again after a
/// restart), waiting (at most 20 s) for its listening line.
fn serve(data: &Path, port: u16) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bluebatch"))
        .args(["serve", "--node-step-ms", "20", "--nodes", "agents"])
        .args(["--port", &port.to_string()])
        .arg("--data-dir")
        .arg(data)
        .env("BLUEBATCH_LOG", "warn")
        .env_remove("BLUEBATCH_ACCOUNTS")
        .env_remove("BLUEBATCH_ACCOUNTS_FILE")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting bluebatch serve");
    let url = listening_url_within(&mut child, Duration::from_secs(20));
    Server { child, url }
}

/// A running `bluebatch agent`; killed (SIGKILL) when dropped.
struct Agent {
    child: Child,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Agent {
    fn start(url: &str, state: &Path, token_file: Option<&Path>, nodes: u32) -> Agent {
        Self::start_with(url, state, token_file, nodes, "24100-24399")
    }

    fn start_with(
        url: &str,
        state: &Path,
        token_file: Option<&Path>,
        nodes: u32,
        ports: &str,
    ) -> Agent {
        Self::spawn(url, state, token_file, None, nodes, ports)
    }

    /// With the join token (and pin) in BLUEBATCH_JOIN_TOKEN instead of a file.
    fn start_env(url: &str, state: &Path, token_text: &str, nodes: u32) -> Agent {
        Self::spawn(url, state, None, Some(token_text), nodes, "24100-24399")
    }

    fn spawn(
        url: &str,
        state: &Path,
        token_file: Option<&Path>,
        token_env: Option<&str>,
        nodes: u32,
        ports: &str,
    ) -> Agent {
        let mut c = Command::new(env!("CARGO_BIN_EXE_bluebatch"));
        c.args(["agent", "--server", url, "--simulate", &nodes.to_string()])
            .args(["--ssh-ports", ports])
            .arg("--state-dir")
            .arg(state)
            // debug: the secrets must stay out of even the most verbose logs
            .env("BLUEBATCH_LOG", "debug,russh=warn")
            .env_remove("BLUEBATCH_JOIN_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(f) = token_file {
            c.arg("--join-token-file").arg(f);
        }
        if let Some(t) = token_env {
            c.env("BLUEBATCH_JOIN_TOKEN", t);
        }
        let mut child = c.spawn().expect("starting bluebatch agent");
        let log = agents::agent_log(&mut child);
        Agent { child, log }
    }

    fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits (at most `limit`) for the agent to exit by itself; its exit status.
    fn exits_within(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `bluebatch join-token create` against `url`, saved (mode 0600) as the agent's token file;
/// returns the file and the CLI's two lines.
async fn join_token(url: &str, dir: &Path, name: &str) -> (std::path::PathBuf, Vec<String>) {
    let out = bluebatch_cli(&["join-token", "create", "--url", url], &[]).await;
    assert!(
        out.status.success(),
        "join-token create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<String> = stdout.lines().map(str::to_string).collect();
    assert_eq!(lines.len(), 2, "token and fingerprint lines: {stdout:?}");
    let path = dir.join(name);
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .unwrap();
        f.write_all(stdout.as_bytes()).unwrap();
    }
    (path, lines)
}

/// Waits (at most `limit`) until `pool` is steady with `n` idle nodes; their (id, ipAddress).
async fn pool_nodes(c: &Client, pool: &str, n: usize, limit: Duration) -> Vec<(String, String)> {
    within(limit, &format!("{pool}: {n} idle nodes"), async {
        loop {
            let p = c
                .req("GET", &format!("/pools/{pool}"))
                .send_within(T)
                .await
                .json();
            let v = c
                .req("GET", &format!("/pools/{pool}/nodes"))
                .send_within(T)
                .await
                .json();
            let list = v["value"].as_array().cloned().unwrap_or_default();
            if p["allocationState"] == "steady"
                && list.len() == n
                && list.iter().all(|x| x["state"] == "idle")
            {
                return list
                    .iter()
                    .map(|x| {
                        (
                            x["id"].as_str().unwrap().to_string(),
                            x["ipAddress"].as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
}

/// Waits (at most `limit`) until `node` of `pool` is in `state`.
async fn node_state(c: &Client, pool: &str, node: &str, state: &str, limit: Duration) {
    within(limit, &format!("{pool}/{node} to be {state}"), async {
        loop {
            let v = c
                .req("GET", &format!("/pools/{pool}/nodes/{node}"))
                .send_within(T)
                .await
                .json();
            if v["state"] == state {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
}

/// Whether a password login to `port` as `user` succeeds, tried until `limit` for `want`.
async fn login_becomes(port: u16, user: &str, pw: &str, want: bool, n: &mut u32, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        *n += 1;
        let got = ssh_password_login(port, user, pw, &loopback_source(*n)).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "password login as {user} on port {port}: expected {want} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_agent_backs_pools_applies_users_and_converges_after_kills_and_restarts() {
    require_ssh();
    let dir = tempfile::tempdir().unwrap();
    let (data, state) = (dir.path().join("data"), dir.path().join("agent"));
    let port = free_port();
    let mut srv = serve(&data, port);
    let c = srv.client();

    // A join token from the CLI; over HTTP the second line is `-` (no certificate to pin).
    let (token_file, lines) = join_token(&srv.url, dir.path(), "token").await;
    assert!(lines[0].contains('.'), "{lines:?}");
    assert_eq!(lines[1], "-");

    let mut agent = Agent::start(&srv.url, &state, Some(&token_file), 4);

    // The agent's nodes fill a Linux pool of 3 and a Windows pool of 1.
    let r = c.create_pool("lin", "linux", 3).await;
    assert_eq!(r.status, 201, "{}", text(&r));
    let r = c.create_pool("win", "windows", 1).await;
    assert_eq!(r.status, 201, "{}", text(&r));
    let lin = pool_nodes(&c, "lin", 3, Duration::from_secs(40)).await;
    let win = pool_nodes(&c, "win", 1, Duration::from_secs(20)).await;
    for (id, ip) in lin.iter().chain(win.iter()) {
        assert_eq!(
            ip, "127.0.0.1",
            "{id}: the address of the agent's connection"
        );
    }
    // The identity is kept in the state directory, private.
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(state.join("identity.json")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let text = std::fs::read_to_string(state.join("identity.json")).unwrap();
        assert!(
            !text.contains(lines[0].as_str()),
            "the join token is not kept"
        );
    }

    // Add User answers once the agent applied it; the real OpenSSH client logs in.
    let node = lin[0].0.clone();
    add_user(
        &c,
        "lin",
        &node,
        json!({"name": "alice", "password": "first-pw", "isAdmin": false}),
    )
    .await;
    let ssh = c.ssh_port("lin", &node).await;
    let mut n = 0;
    n += 1;
    assert!(ssh_password_login(ssh, "alice", "first-pw", &loopback_source(n)).await);
    // A Windows node of the agent takes users too (no endpoint, as embedded Windows nodes).
    add_user(
        &c,
        "win",
        &win[0].0,
        json!({"name": "wuser", "password": "Windows-pw1"}),
    )
    .await;

    // Update User: the new password logs in at once, the old one is refused.
    let path = Client::user_path("lin", &node, "alice");
    let r = c
        .req("PUT", &path)
        .json(&json!({"password": "second-pw"}))
        .send_within(T)
        .await;
    assert_eq!(r.status, 200, "{}", text(&r));
    n += 1;
    assert!(ssh_password_login(ssh, "alice", "second-pw", &loopback_source(n)).await);
    n += 1;
    assert!(!ssh_password_login(ssh, "alice", "first-pw", &loopback_source(n)).await);

    // The agent killed in the middle of things: a write answers OperationTimedOut (kept) ...
    agent.kill();
    let first_log = agent.log_text();
    let r = c
        .req("PUT", &path)
        .query(&format!("api-version={V}&timeout=2"))
        .json(&json!({"password": "third-pw"}))
        .send_within(T)
        .await;
    assert_eq!(r.status, 500, "{}", text(&r));
    assert_eq!(r.code(), "OperationTimedOut", "{}", text(&r));

    // ... and is applied when the agent comes back with its stored identity (no token now).
    let agent = Agent::start(&srv.url, &state, None, 4);
    let ssh = within(Duration::from_secs(30), "the node's endpoint back", async {
        loop {
            let p = c.ssh_port("lin", &node).await;
            n += 1;
            if ssh_password_login(p, "alice", "third-pw", &loopback_source(n)).await {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
    .await;
    login_becomes(ssh, "alice", "second-pw", false, &mut n, T).await;
    assert!(
        agent
            .log_text()
            .contains("reconnected with the stored identity"),
        "{}",
        agent.log_text()
    );
    // Neither the join token's secret nor the node credential is ever logged.
    let identity: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state.join("identity.json")).unwrap())
            .unwrap();
    let credential = identity["credential"].as_str().unwrap();
    let secret = lines[0].split_once('.').unwrap().1;
    assert!(credential.len() >= 16 && secret.len() >= 16);
    for log in [agent.log_text(), first_log.clone()] {
        assert!(!log.contains(credential), "the credential was logged");
        assert!(!log.contains(secret), "the join token was logged");
    }

    // The service restarted (same port, same store): the agent reconnects and converges.
    srv.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let srv = serve(&data, port);
    let c = srv.client();
    pool_nodes(&c, "lin", 3, Duration::from_secs(60)).await;
    let r = c
        .req("POST", &format!("/pools/lin/nodes/{}/users", lin[1].0))
        .json(&json!({"name": "bob", "password": "bob-pw"}))
        .send_within(Duration::from_secs(40))
        .await;
    assert_eq!(r.status, 201, "{}", text(&r));
    let ssh_b = c.ssh_port("lin", &lin[1].0).await;
    n += 1;
    assert!(ssh_password_login(ssh_b, "bob", "bob-pw", &loopback_source(n)).await);
    n += 1;
    assert!(ssh_password_login(ssh, "alice", "third-pw", &loopback_source(n)).await);

    // Delete User: the account is gone from the node.
    let r = c
        .req("DELETE", &Client::user_path("lin", &lin[1].0, "bob"))
        .send_within(T)
        .await;
    assert_eq!(r.status, 200, "{}", text(&r));
    login_becomes(ssh_b, "bob", "bob-pw", false, &mut n, T).await;

    // Reboot: the node's endpoint restarts (sessions end), accounts kept; back to idle.
    let key_before = host_key(ssh);
    let r = c
        .req("POST", &format!("/pools/lin/nodes/{node}/reboot"))
        .json(&json!({}))
        .send_within(T)
        .await;
    assert_eq!(r.status, 202, "{}", text(&r));
    node_state(&c, "lin", &node, "idle", Duration::from_secs(30)).await;
    login_becomes(ssh, "alice", "third-pw", true, &mut n, T).await;
    assert_eq!(host_key(ssh), key_before, "a reboot keeps the host key");
    // Reimage: a new host key and no accounts; back to idle.
    let r = c
        .req("POST", &format!("/pools/lin/nodes/{node}/reimage"))
        .json(&json!({}))
        .send_within(T)
        .await;
    assert_eq!(r.status, 202, "{}", text(&r));
    node_state(&c, "lin", &node, "idle", Duration::from_secs(30)).await;
    let ssh = c.ssh_port("lin", &node).await;
    let key_after = within(T, "a new host key", async {
        loop {
            let k = host_key(ssh);
            if k != key_before {
                return k;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert_ne!(key_after, key_before);
    login_becomes(ssh, "alice", "third-pw", false, &mut n, T).await;

    // A reused join token is refused with a clear error; the agent exits.
    let mut second = Agent::start(&srv.url, &dir.path().join("agent2"), Some(&token_file), 1);
    let st = second.exits_within(Duration::from_secs(20));
    assert!(!st.success());
    assert!(
        second.log_text().contains("refused the join token"),
        "{}",
        second.log_text()
    );

    // Shrinking the pool releases a node: its endpoint closes.
    let r = c
        .req("POST", "/pools/lin/resize")
        .json(&json!({"targetDedicatedNodes": 1}))
        .send_within(T)
        .await;
    assert_eq!(r.status, 202, "{}", text(&r));
    let left = pool_nodes(&c, "lin", 1, Duration::from_secs(30)).await;
    node_state(&c, "lin", &left[0].0, "idle", T).await;
    // The released nodes' endpoints close.
    for (gone, port) in [(&node, ssh), (&lin[1].0, ssh_b)] {
        if *gone == left[0].0 {
            continue;
        }
        within(T, &format!("{gone}'s endpoint to close"), async {
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
    }
    drop(agent);
}

/// Writes `text` as a token file (0600) in `dir`.
fn token_file(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_https_the_agent_trusts_only_the_pinned_ca() {
    let dir = tempfile::tempdir().unwrap();
    let tls = Server::launch_tls(&["--in-memory", "--nodes", "agents"]);
    let c = tls.server.client();
    let (_, lines) = join_token(&tls.server.url, dir.path(), "token").await;
    let (token, pin) = (&lines[0], &lines[1]);
    assert!(
        pin.starts_with("sha256:") && pin.len() == 71,
        "the CA fingerprint on line 2: {pin:?}"
    );

    // No fingerprint: HTTPS refuses to start rather than trust anything.
    let bare = token_file(dir.path(), "bare", &format!("{token}\n"));
    let mut a = Agent::start(&tls.https, &dir.path().join("s1"), Some(&bare), 1);
    assert!(!a.exits_within(Duration::from_secs(20)).success());
    assert!(
        a.log_text().contains("no CA fingerprint is pinned"),
        "{}",
        a.log_text()
    );

    // Another CA's fingerprint: the handshake fails and the token is not spent.
    let other = format!("sha256:{}", "ab".repeat(32));
    let wrong = token_file(dir.path(), "wrong", &format!("{token}\n{other}\n"));
    let mut a = Agent::start(&tls.https, &dir.path().join("s2"), Some(&wrong), 1);
    assert!(!a.exits_within(Duration::from_secs(20)).success());
    assert!(
        a.log_text()
            .contains("does not match the CA fingerprint of the join-token file"),
        "{}",
        a.log_text()
    );

    // The right one (here through BLUEBATCH_JOIN_TOKEN): the agent joins over HTTPS (the
    // certificate names 127.0.0.1; the agent checks no names, only the pinned CA) and its node
    // backs a pool.
    let state = dir.path().join("s3");
    let _agent = Agent::start_env(&tls.https, &state, &format!("{token}\n{pin}\n"), 1);
    let r = c.create_pool("p", "linux", 1).await;
    assert_eq!(r.status, 201, "{}", text(&r));
    pool_nodes(&c, "p", 1, Duration::from_secs(30)).await;
    let id = std::fs::read_to_string(state.join("identity.json")).unwrap();
    assert!(id.contains(pin.as_str()), "the pin is kept: {id}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_endpoint_cannot_start_is_retried_until_it_can() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::launch(&["--in-memory", "--nodes", "agents"]);
    let c = srv.client();
    let (token, _) = join_token(&srv.url, dir.path(), "token").await;
    // Two simulated nodes and one port for them: the second cannot listen yet.
    let port = free_port();
    let mut agent = Agent::start_with(
        &srv.url,
        &dir.path().join("state"),
        Some(&token),
        2,
        &format!("{port}-{port}"),
    );
    let r = c.create_pool("p", "linux", 2).await;
    assert_eq!(r.status, 201, "{}", text(&r));
    let stuck = within(Duration::from_secs(30), "one node idle, one not", async {
        loop {
            let v = c.req("GET", "/pools/p/nodes").send_within(T).await.json();
            let list = v["value"].as_array().cloned().unwrap_or_default();
            let idle: Vec<_> = list.iter().filter(|n| n["state"] == "idle").collect();
            let other: Vec<_> = list.iter().filter(|n| n["state"] != "idle").collect();
            if list.len() == 2 && idle.len() == 1 && other.len() == 1 {
                return (
                    idle[0]["id"].as_str().unwrap().to_string(),
                    other[0]["id"].as_str().unwrap().to_string(),
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    // Stays so: never acknowledged as serving without an endpoint.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let v = c
        .req("GET", &format!("/pools/p/nodes/{}", stuck.1))
        .send_within(T)
        .await
        .json();
    assert_ne!(v["state"], "idle", "{v}");
    // The port freed (the serving node removed), the agent's retry brings the other one up.
    let r = c
        .req("POST", "/pools/p/removenodes")
        .json(&json!({"nodeList": [stuck.0]}))
        .send_within(T)
        .await;
    assert_eq!(r.status, 202, "{}", text(&r));
    node_state(&c, "p", &stuck.1, "idle", Duration::from_secs(60)).await;
    assert_eq!(c.ssh_port("p", &stuck.1).await, port);
    assert!(
        agent.log_text().contains("will retry"),
        "{}",
        agent.log_text()
    );

    // One agent per state dir: uninstall waits for the running one to stop.
    let state = dir.path().join("state");
    let st = state.to_str().unwrap();
    let out = bluebatch_cli(&["agent", "uninstall", "--state-dir", st], &[]).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("another bluebatch agent uses the state dir"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    agent.kill();
    // Uninstall of a simulated host: its nodes' files and its identity are gone.
    assert!(state.join("nodes").exists() && state.join("identity.json").exists());
    let out = bluebatch_cli(&["agent", "uninstall", "--state-dir", st], &[]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("bluebatch host revoke host-"));
    assert!(!state.join("nodes").exists() && !state.join("identity.json").exists());
}

/// The join token given through `BLUEBATCH_JOIN_TOKEN` is taken out of the agent's environment
/// at its start: a session on one of its nodes (a process the agent starts) has no trace of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_join_token_from_the_environment_never_reaches_a_nodes_session() {
    require_ssh();
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::launch(&["--in-memory", "--nodes", "agents"]);
    let c = srv.client();
    let (_, lines) = join_token(&srv.url, dir.path(), "token").await;
    let secret = lines[0].split_once('.').unwrap().1.to_string();
    let _agent = Agent::spawn(
        &srv.url,
        &dir.path().join("state"),
        None,
        Some(&format!("{}\n{}\n", lines[0], lines[1])),
        1,
        "24400-24499",
    );
    let r = c.create_pool("p", "linux", 1).await;
    assert_eq!(r.status, 201, "{}", text(&r));
    let nodes = pool_nodes(&c, "p", 1, Duration::from_secs(30)).await;
    add_user(
        &c,
        "p",
        &nodes[0].0,
        json!({"name": "envuser", "password": "env-pw-1"}),
    )
    .await;
    let port = c.ssh_port("p", &nodes[0].0).await;
    let (status, out) =
        tokio::task::spawn_blocking(move || ssh_password(port, "envuser", "env-pw-1", "env"))
            .await
            .unwrap();
    assert_eq!(status, 0, "env over ssh: {out}");
    assert!(
        out.contains("USER=envuser"),
        "the session's environment: {out}"
    );
    assert!(
        !out.contains("BLUEBATCH_JOIN_TOKEN") && !out.contains(&secret),
        "the join token reached a session: {out}"
    );
}
