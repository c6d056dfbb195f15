//! README claims of "Real hosts as nodes: `bluebatch agent`" that no other suite covered,
//! against the real binaries (`bluebatch serve --nodes agents`, `bluebatch agent --simulate N`,
//! the CLI, and a hand-driven agent speaking the node protocol over HTTP): join tokens stored
//! as their SHA-256 only, their lifetimes (24 h by default, whole seconds, at most 366 days),
//! `join-token list --json` and revoke's answers, `host list`'s CONNECTED and LAST SEEN, the
//! agent's environment variables, `--advertise-address`, `--ssh-port`, the `--simulate` bound,
//! one agent per state directory, the agent stopping after `host revoke`, the plain listener of
//! a `--tls` server refusing every agent call, low-priority nodes from agents, accounts kept
//! apart, and an `embedded` pool on an agents server. Simulated nodes take ports of 17000-17999.

mod common;

use common::agents::{agent_log, create_token, report};
use common::sandbox::{self, Sandbox, SandboxOptions};
use common::{Client, Resp, Server, bluebatch_cli, pool_body, respond, text, within};
use serde_json::{Value, json};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Every request of these tests.
const T: Duration = Duration::from_secs(20);

fn agents_server() -> Server {
    Server::launch(&["--in-memory", "--nodes", "agents"])
}

fn iso(v: &Value) -> OffsetDateTime {
    OffsetDateTime::parse(v.as_str().unwrap_or_else(|| panic!("{v}")), &Rfc3339)
        .unwrap_or_else(|e| panic!("{v}: {e}"))
}

async fn token(c: &Client) -> String {
    let r = create_token(c, json!({})).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    r.json()["token"].as_str().unwrap().to_string()
}

/// A hand-driven agent's calls (as `bluebatch agent` sends them) with `http` to `base`.
struct Hand {
    base: String,
    http: reqwest::Client,
    credential: String,
    host_id: String,
}

impl Hand {
    async fn join_with(http: reqwest::Client, base: &str, token: &str, slots: u32) -> Hand {
        let r = http
            .post(format!("{base}/_bluebatch/agent/join"))
            .header("content-type", "application/json")
            .body(json!({"token": token, "host": report("hand", slots)}).to_string())
            .send()
            .await
            .expect("join: no answer");
        let r = respond(r).await;
        assert_eq!(r.status, 200, "join: {}", text(&r));
        let v = r.json();
        Hand {
            base: base.to_string(),
            http,
            credential: v["credential"].as_str().unwrap().to_string(),
            host_id: v["hostId"].as_str().unwrap().to_string(),
        }
    }

    async fn join(base: &str, token: &str, slots: u32) -> Hand {
        let http = reqwest::Client::builder().timeout(T).build().unwrap();
        Self::join_with(http, base, token, slots).await
    }

    /// The same host's calls sent to another listener of the service.
    fn at(&self, base: &str, http: reqwest::Client) -> Hand {
        Hand {
            base: base.to_string(),
            http,
            credential: self.credential.clone(),
            host_id: self.host_id.clone(),
        }
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Resp {
        let url = format!("{}/_bluebatch/agent/{path}", self.base);
        let rb = match method {
            "GET" => self.http.get(url),
            _ => self.http.post(url),
        }
        .header(
            "authorization",
            format!("BluebatchNode {}", self.credential),
        );
        let rb = match body {
            Some(b) => rb
                .header("content-type", "application/json")
                .body(b.to_string()),
            None => rb,
        };
        respond(rb.send().await.expect("agent call: no answer")).await
    }
}

/// A running `bluebatch agent`; its stderr kept; killed (SIGKILL) when dropped.
struct Agent {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Agent {
    /// `bluebatch agent` with exactly `args` and `env` (the agent variables of this process
    /// removed first).
    fn spawn(args: &[&str], env: &[(&str, &str)]) -> Agent {
        let mut child = Command::new(env!("CARGO_BIN_EXE_bluebatch"))
            .arg("agent")
            .args(args)
            .env("BLUEBATCH_LOG", "info,russh=warn")
            .env_remove("BLUEBATCH_JOIN_TOKEN")
            .env_remove("BLUEBATCH_AGENT_SERVER")
            .env_remove("BLUEBATCH_AGENT_STATE_DIR")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting bluebatch agent");
        let log = agent_log(&mut child);
        Agent { child, log }
    }

    /// `--simulate n` joined to `url` with `token`, its state in `state`, ports `ports`.
    fn simulate(url: &str, state: &Path, token: &str, n: u32, ports: &str) -> Agent {
        let n = n.to_string();
        Self::spawn(
            &[
                "--server",
                url,
                "--state-dir",
                state.to_str().unwrap(),
                "--simulate",
                &n,
                "--ssh-ports",
                ports,
            ],
            &[("BLUEBATCH_JOIN_TOKEN", token)],
        )
    }

    fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits (at most `limit`) for the agent to exit by itself; its exit status.
    async fn exits_within(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                // Let the stderr reader take the last lines.
                tokio::time::sleep(Duration::from_millis(200)).await;
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not exit within {limit:?}:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (at most `limit`) until the agent logged a line containing `what`.
    async fn logs_within(&self, what: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.log_text().contains(what) {
            assert!(
                Instant::now() < deadline,
                "the agent did not log {what:?} within {limit:?}:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls (at most `limit`) until `check` holds of the nodes of `pool`; those nodes.
async fn nodes_until(
    c: &Client,
    pool: &str,
    what: &str,
    limit: Duration,
    check: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    within(limit, &format!("{pool}: {what}"), async {
        loop {
            let r = c
                .req("GET", &format!("/pools/{pool}/nodes"))
                .send_within(T)
                .await;
            assert_eq!(r.status, 200, "{}", text(&r));
            let list = r.json()["value"].as_array().cloned().unwrap_or_default();
            if check(&list) {
                return list;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
}

fn all_idle(n: usize) -> impl Fn(&[Value]) -> bool {
    move |l: &[Value]| l.len() == n && l.iter().all(|x| x["state"] == "idle")
}

async fn get(c: &Client, path: &str) -> Value {
    let r = c.req("GET", path).send_within(T).await;
    assert_eq!(r.status, 200, "GET {path}: {}", text(&r));
    r.json()
}

async fn hosts(c: &Client) -> Vec<Value> {
    let r = c.control("GET", "/hosts").send_within(T).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    r.json()["value"].as_array().cloned().unwrap()
}

/// The CLI with `--url url` and `args`: exit code, stdout, stderr.
async fn cli(url: &str, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["--url", url];
    all.extend_from_slice(args);
    let o = bluebatch_cli(&all, &[("BLUEBATCH_LOG", "warn")]).await;
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Every byte of every file under `dir`.
fn all_bytes(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(all_bytes(&p));
        } else {
            out.extend(std::fs::read(&p).unwrap());
        }
    }
    out
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// "A join token `ID.SECRET` is stored hashed": after the server stopped, no file of its data
/// directory (state.db and its journal) holds a secret, used or not; each token's record holds
/// the SHA-256 of its secret.
#[tokio::test]
async fn join_tokens_are_stored_as_their_sha256_never_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut s = Server::launch(&["--data-dir", data.to_str().unwrap(), "--nodes", "agents"]);
    let c = s.client();
    let used = token(&c).await;
    let unused = token(&c).await;
    let scoped = create_token(&c, json!({"pool": "p1", "ttl": "2h"}))
        .await
        .json()["token"]
        .as_str()
        .unwrap()
        .to_string();
    Hand::join(&s.url, &used, 1).await;
    s.stop();
    assert!(data.join("state.db").exists(), "the store is state.db");
    let bytes = all_bytes(&data);
    for t in [&used, &unused, &scoped] {
        let (id, secret) = t.split_once('.').unwrap();
        assert!(secret.len() >= 32);
        assert!(
            !contains(&bytes, secret),
            "the secret of {id} is in the store"
        );
        assert!(!contains(&bytes, t), "the token {id} is in the store");
        assert!(
            contains(&bytes, &sha256_hex(secret)),
            "the store keeps {id} as the SHA-256 of its secret"
        );
        assert!(contains(&bytes, id), "the token {id} is stored");
    }
    // Restarted on the same store, the tokens still work as stored: the unused one joins, the
    // used one does not.
    let s = Server::launch(&["--data-dir", data.to_str().unwrap(), "--nodes", "agents"]);
    Hand::join(&s.url, &unused, 1).await;
    let r = reqwest::Client::new()
        .post(format!("{}/_bluebatch/agent/join", s.url))
        .json(&json!({"token": used, "host": report("again", 1)}))
        .timeout(T)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
}

/// "A token expires (default 24 h, at most 366 days)", and `ttl` as whole seconds: the
/// `expires` answered (and listed) for each, the CLI alike; beyond 366 days refused.
#[tokio::test]
async fn join_token_lifetime_is_a_day_by_default_seconds_as_a_number_and_at_most_366_days() {
    let s = agents_server();
    let c = s.client();
    let close = |v: &Value, want: time::Duration| {
        let left = iso(&v["expires"]) - OffsetDateTime::now_utc();
        assert!(
            left <= want && left > want - time::Duration::seconds(15),
            "expires in {left}, wanted {want}: {v}"
        );
    };
    for (body, want) in [
        (json!({}), time::Duration::hours(24)),
        (json!({"pool": "p"}), time::Duration::hours(24)),
        (json!({"ttl": 90}), time::Duration::seconds(90)),
        (json!({"ttl": 86_400 * 366}), time::Duration::days(366)),
        (json!({"ttl": "366d"}), time::Duration::days(366)),
    ] {
        let r = create_token(&c, body.clone()).await;
        assert_eq!(r.status, 200, "{body}: {}", text(&r));
        let v = r.json();
        close(&v, want);
        // Listed with the same expiry.
        let list = c.control("GET", "/join-tokens").send_within(T).await.json();
        let entry = list["value"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["id"] == v["id"])
            .cloned()
            .unwrap();
        assert_eq!(entry["expires"], v["expires"]);
    }
    for body in [
        json!({"ttl": 86_400 * 366 + 1}),
        json!({"ttl": "367d"}),
        json!({"ttl": "366d1s"}),
    ] {
        let r = create_token(&c, body.clone()).await;
        assert_eq!(r.status, 400, "{body}: {}", text(&r));
        assert_eq!(r.code(), "InvalidPropertyValue", "{body}: {}", text(&r));
        assert_eq!(
            r.value("PropertyName").as_deref(),
            Some("ttl"),
            "{}",
            text(&r)
        );
    }
    // A number is seconds (not milliseconds): a token of 3 joins at once.
    let r = create_token(&c, json!({"ttl": 3})).await.json();
    Hand::join(&s.url, r["token"].as_str().unwrap(), 1).await;

    // The CLI: no --ttl is a day; `366d` is taken, `367d` refused.
    let (code, out, err) = cli(&s.url, &["join-token", "create"]).await;
    assert_eq!(code, 0, "{err}");
    let id = json!(out.lines().next().unwrap().split_once('.').unwrap().0);
    let list = c.control("GET", "/join-tokens").send_within(T).await.json();
    let entry = list["value"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id)
        .cloned()
        .unwrap();
    close(&entry, time::Duration::hours(24));
    assert!(err.contains("usable once until"), "{err}");
    let (code, _, err) = cli(&s.url, &["join-token", "create", "--ttl", "366d"]).await;
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = cli(&s.url, &["join-token", "create", "--ttl", "367d"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("InvalidPropertyValue"), "{err}");
}

/// `DELETE /_bluebatch/join-tokens/{id}` → `{id, revoked: true}`, an unknown id 404
/// `ResourceNotFound` (Batch error JSON); `join-token list --json` prints the endpoint's JSON.
#[tokio::test]
async fn join_token_revoke_and_list_json_answer_the_documented_bodies() {
    let s = agents_server();
    let c = s.client();
    let a = create_token(&c, json!({"pool": "p1", "ttl": "2h"}))
        .await
        .json();
    let b = create_token(&c, json!({})).await.json();
    Hand::join(&s.url, b["token"].as_str().unwrap(), 1).await;

    let (code, out, err) = cli(&s.url, &["join-token", "list", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let endpoint = c.control("GET", "/join-tokens").send_within(T).await.json();
    assert_eq!(v, endpoint, "the CLI prints the endpoint's JSON");
    let mut listed = v["value"].as_array().unwrap().clone();
    listed.sort_by_key(|t| t["id"] != a["id"]);
    assert_eq!(
        listed,
        [
            json!({"id": a["id"], "pool": "p1", "expires": a["expires"], "used": false}),
            json!({"id": b["id"], "pool": null, "expires": b["expires"], "used": true}),
        ]
    );
    for t in [&a, &b] {
        let secret = t["token"].as_str().unwrap().split_once('.').unwrap().1;
        assert!(!out.contains(secret), "the secret is listed: {out}");
    }

    let id = a["id"].as_str().unwrap();
    let r = c
        .control("DELETE", &format!("/join-tokens/{id}"))
        .send_within(T)
        .await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(r.json(), json!({"id": id, "revoked": true}));
    for unknown in [id, "zzzzzz"] {
        let r = c
            .control("DELETE", &format!("/join-tokens/{unknown}"))
            .send_within(T)
            .await;
        assert_eq!(r.status, 404, "{}", text(&r));
        assert_eq!(r.code(), "ResourceNotFound", "{}", text(&r));
        assert_eq!(
            r.header("content-type")
                .map(|h| h.starts_with("application/json")),
            Some(true)
        );
    }
    let (code, _, err) = cli(&s.url, &["join-token", "revoke", "zzzzzz"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("ResourceNotFound"), "{err}");
}

/// The row of `host` in `bluebatch host list`, split on whitespace.
async fn host_row(url: &str, host: &str) -> Vec<String> {
    let (code, out, err) = cli(url, &["host", "list"]).await;
    assert_eq!(code, 0, "{err}");
    let header: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "ID",
            "HOSTNAME",
            "PROVIDER",
            "ADDRESS",
            "SSH",
            "NODES",
            "DRAINED",
            "CONNECTED",
            "LAST",
            "SEEN"
        ]
    );
    out.lines()
        .find(|l| l.starts_with(host))
        .unwrap_or_else(|| panic!("{host} not in {out}"))
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// `host list`'s CONNECTED (`yes` while the host polls or was seen within `--agent-grace`,
/// `no` once silent longer) and LAST SEEN (the time of its last call).
#[tokio::test]
async fn host_list_shows_connected_and_last_seen() {
    let s = Server::launch(&["--in-memory", "--nodes", "agents", "--agent-grace", "2s"]);
    let c = s.client();
    let before = OffsetDateTime::now_utc();
    let h = Hand::join(&s.url, &token(&c).await, 1).await;
    let r = h.call("GET", "desired", None).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    let cursor = r.json()["cursor"].as_str().unwrap().to_string();
    let row = host_row(&s.url, &h.host_id).await;
    assert_eq!(row[7], "yes", "{row:?}");
    let seen = iso(&json!(row[8]));
    assert!(
        seen >= before - time::Duration::seconds(1)
            && seen <= OffsetDateTime::now_utc() + time::Duration::seconds(1),
        "{row:?}"
    );

    // Silent past the grace: not connected, last seen unchanged.
    let gone = within(Duration::from_secs(15), "CONNECTED no", async {
        loop {
            let row = host_row(&s.url, &h.host_id).await;
            if row[7] == "no" {
                return row;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
    .await;
    assert_eq!(gone[8], row[8], "LAST SEEN is the last call: {gone:?}");
    let json_list = hosts(&c).await;
    assert_eq!(json_list[0]["connected"], false);
    assert_eq!(json_list[0]["lastSeen"], row[8].as_str());

    // A long poll in flight (longer than the grace) is connected; LAST SEEN moves on.
    let poll = {
        let h = h.at(
            &s.url,
            reqwest::Client::builder().timeout(T).build().unwrap(),
        );
        let q = format!("desired?after={cursor}&wait=6");
        tokio::spawn(async move { h.call("GET", &q, None).await })
    };
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let during = host_row(&s.url, &h.host_id).await;
    assert_eq!(during[7], "yes", "a waiting poll: {during:?}");
    assert!(iso(&json!(during[8])) > seen, "{during:?} after {row:?}");
    let r = within(T, "the long poll", poll).await.unwrap();
    assert_eq!(r.status, 200, "{}", text(&r));
}

/// `BLUEBATCH_AGENT_SERVER` and `BLUEBATCH_AGENT_STATE_DIR` stand for `--server` and
/// `--state-dir`; a second agent on a state directory in use is refused; after `host revoke`
/// the running agent stops saying to delete `STATE_DIR/identity.json` and join again.
#[tokio::test]
async fn agent_environment_one_agent_per_state_dir_and_stopping_after_host_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let s = agents_server();
    let c = s.client();
    let tok = token(&c).await;
    let env = [
        ("BLUEBATCH_AGENT_SERVER", s.url.as_str()),
        ("BLUEBATCH_AGENT_STATE_DIR", state.to_str().unwrap()),
        ("BLUEBATCH_JOIN_TOKEN", tok.as_str()),
    ];
    let mut agent = Agent::spawn(&["--simulate", "1", "--ssh-ports", "17000-17009"], &env);
    agent
        .logs_within("joined; identity saved", Duration::from_secs(20))
        .await;
    assert!(
        state.join("identity.json").exists(),
        "the state dir of the environment"
    );
    let r = c.create_pool("p", "linux", 1).await;
    assert_eq!(r.status, 201, "{}", text(&r));
    nodes_until(&c, "p", "1 idle node", Duration::from_secs(30), all_idle(1)).await;
    let listed = hosts(&c).await;
    assert_eq!(listed.len(), 1);
    let host = listed[0]["id"].as_str().unwrap().to_string();

    // A second agent on the same state directory (by flag, and by the environment).
    let st = state.to_str().unwrap();
    for (args, env) in [
        (
            vec!["--server", &s.url, "--state-dir", st, "--simulate", "1"],
            vec![],
        ),
        (vec!["--simulate", "1"], env.to_vec()),
    ] {
        let mut second = Agent::spawn(&args, &env);
        let code = second.exits_within(Duration::from_secs(20)).await;
        assert!(!code.success());
        assert!(
            second
                .log_text()
                .contains(&format!("another bluebatch agent uses the state dir {st}")),
            "{}",
            second.log_text()
        );
    }
    assert_eq!(hosts(&c).await.len(), 1, "no second host joined");
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "the first agent runs on"
    );

    // Revoked while it polls: it stops, naming the identity file to delete.
    let (code, out, err) = cli(&s.url, &["host", "revoke", &host]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("revoked"), "{out}");
    let code = agent.exits_within(Duration::from_secs(20)).await;
    assert!(!code.success(), "{code:?}");
    let log = agent.log_text();
    let identity = state.join("identity.json");
    assert!(
        log.contains(&format!(
            "To join again, delete {} and start the agent with a new join token",
            identity.display()
        )) && log.contains(&host),
        "{log}"
    );
}

/// `--advertise-address IP`: the node's `ipAddress` and Remote Login Settings say it (and a
/// simulated node listens there).
#[tokio::test]
async fn advertise_address_is_the_nodes_ip_address_and_remote_login_address() {
    let dir = tempfile::tempdir().unwrap();
    let s = agents_server();
    let c = s.client();
    let tok = token(&c).await;
    let _agent = Agent::spawn(
        &[
            "--server",
            &s.url,
            "--state-dir",
            dir.path().join("state").to_str().unwrap(),
            "--simulate",
            "1",
            "--ssh-ports",
            "17010-17019",
            "--advertise-address",
            "127.0.0.2",
        ],
        &[("BLUEBATCH_JOIN_TOKEN", tok.as_str())],
    );
    let r = c.create_pool("p", "linux", 1).await;
    assert_eq!(r.status, 201, "{}", text(&r));
    let nodes = nodes_until(&c, "p", "1 idle node", Duration::from_secs(30), all_idle(1)).await;
    let id = nodes[0]["id"].as_str().unwrap();
    assert_eq!(nodes[0]["ipAddress"], "127.0.0.2", "{}", nodes[0]);
    let node = get(&c, &format!("/pools/p/nodes/{id}")).await;
    assert_eq!(node["ipAddress"], "127.0.0.2", "{node}");
    let rl = get(&c, &format!("/pools/p/nodes/{id}/remoteloginsettings")).await;
    assert_eq!(rl["remoteLoginIPAddress"], "127.0.0.2", "{rl}");
    let port = rl["remoteLoginPort"].as_u64().unwrap() as u16;
    assert!((17010..=17019).contains(&port), "{rl}");
    assert_eq!(hosts(&c).await[0]["address"], "127.0.0.2");
    // The simulated node's endpoint is there, not on 127.0.0.1.
    let banner = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect_timeout(
            &(std::net::Ipv4Addr::new(127, 0, 0, 2), port).into(),
            Duration::from_secs(5),
        )
        .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 8];
        s.read_exact(&mut b).unwrap();
        b
    })
    .await
    .unwrap();
    assert_eq!(&banner, b"SSH-2.0-");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

/// `--simulate N` up to 10 000: 10 001 is refused before anything happens; 10 000 joins as one
/// host of 10 000 slots.
#[tokio::test]
async fn simulate_takes_up_to_ten_thousand_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let s = agents_server();
    let c = s.client();
    let tok = token(&c).await;
    let state = dir.path().join("too-many");
    let mut a = Agent::simulate(&s.url, &state, &tok, 10_001, "17020-17029");
    assert!(!a.exits_within(T).await.success());
    assert!(
        a.log_text().contains("10001 is not in 1..=10000"),
        "{}",
        a.log_text()
    );
    assert!(
        !state.exists(),
        "refused before the state directory is made"
    );
    assert!(hosts(&c).await.is_empty());
    // The token was not spent: 10 000 joins with it.
    let a = Agent::simulate(
        &s.url,
        &dir.path().join("ten-thousand"),
        &tok,
        10_000,
        "17030-17039",
    );
    a.logs_within("joined; identity saved", Duration::from_secs(30))
        .await;
    let h = hosts(&c).await;
    assert_eq!(h.len(), 1);
    assert_eq!(h[0]["slots"], 10_000);
    assert_eq!(h[0]["provider"], "simulate");
}

/// When the service serves HTTPS, its plain HTTP listener refuses every agent call — hello,
/// the poll and acknowledgements with a good credential, not only join — and the credential
/// keeps working over HTTPS.
#[tokio::test]
async fn the_plain_listener_of_a_tls_server_refuses_every_agent_call() {
    let t = Server::launch_tls(&["--in-memory", "--nodes", "agents"]);
    let c = t.server.client();
    let ca = std::fs::read(t.ca.clone().unwrap()).unwrap();
    let https_client = || {
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .timeout(T)
            .build()
            .unwrap()
    };
    let tok = token(&c).await;
    let h = Hand::join_with(https_client(), &t.https, &tok, 1).await;
    assert_eq!(c.create_pool("p", "linux", 1).await.status, 201);
    let d = nodes_until(&c, "p", "a node", T, |l| l.len() == 1).await;
    assert_eq!(d.len(), 1);
    let ds = h.call("GET", "desired", None).await;
    assert_eq!(ds.status, 200, "{}", text(&ds));
    let ds = ds.json();
    let n = &ds["nodes"][0];
    let ack = json!({"nodes": [{"key": n["key"], "revision": n["revision"], "image": n["image"]}]});

    let plain = h.at(
        &t.server.url,
        reqwest::Client::builder().timeout(T).build().unwrap(),
    );
    for (method, path, body) in [
        ("POST", "hello", Some(report("hand", 1))),
        ("GET", "desired", None),
        ("GET", "desired?wait=5", None),
        ("POST", "ack", Some(ack.clone())),
    ] {
        let r = plain.call(method, path, body).await;
        assert_eq!(r.status, 403, "{method} {path}: {}", text(&r));
        assert_eq!(r.code(), "AuthenticationFailed", "{}", text(&r));
        assert!(
            r.value("AuthenticationErrorDetail")
                .is_some_and(|d| d.contains("HTTPS")),
            "{method} {path}: {}",
            text(&r)
        );
    }
    // The refused acknowledgement did nothing; over HTTPS the same credential works.
    let node = get(
        &c,
        &format!("/pools/p/nodes/{}", n["nodeId"].as_str().unwrap()),
    )
    .await;
    assert_ne!(node["state"], "idle", "{node}");
    let r = h.call("POST", "ack", Some(ack)).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(r.json()["refused"], json!([]));
    let r = h.call("POST", "hello", Some(report("hand", 1))).await;
    assert_eq!(r.status, 200, "{}", text(&r));
}

/// An agents pool meets `targetDedicatedNodes`, then `targetLowPriorityNodes`, from free hosts:
/// low-priority nodes (`isDedicated: false`) only from what is left after the dedicated ones; a
/// host joining later makes up the rest.
#[tokio::test]
async fn low_priority_nodes_come_from_the_hosts_left_after_the_dedicated_ones() {
    let dir = tempfile::tempdir().unwrap();
    let s = agents_server();
    let c = s.client();
    let first = token(&c).await;
    let _a = Agent::simulate(&s.url, &dir.path().join("a"), &first, 2, "17040-17049");
    within(T, "the host to join", async {
        while hosts(&c).await.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let mut body = pool_body("lp", 2);
    body["targetLowPriorityNodes"] = json!(1);
    body["resizeTimeout"] = json!("PT15M");
    let r = c.req("POST", "/pools").json(&body).send_within(T).await;
    assert_eq!(r.status, 201, "{}", text(&r));
    let split = |l: &[Value]| {
        let d = l.iter().filter(|n| n["isDedicated"] == true).count();
        (d, l.len() - d)
    };
    let nodes = nodes_until(
        &c,
        "lp",
        "2 idle nodes",
        Duration::from_secs(30),
        all_idle(2),
    )
    .await;
    assert_eq!(split(&nodes), (2, 0), "dedicated first: {nodes:?}");
    // A host of one more slot: a low-priority node.
    let second = token(&c).await;
    let _b = Agent::simulate(&s.url, &dir.path().join("b"), &second, 1, "17050-17059");
    let nodes = nodes_until(
        &c,
        "lp",
        "3 idle nodes",
        Duration::from_secs(30),
        all_idle(3),
    )
    .await;
    assert_eq!(split(&nodes), (2, 1), "{nodes:?}");
    let low = nodes.iter().find(|n| n["isDedicated"] == false).unwrap();
    let node = get(
        &c,
        &format!("/pools/lp/nodes/{}", low["id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(node["isDedicated"], false, "{node}");
    let pool = within(T, "the pool to count its nodes", async {
        loop {
            let p = get(&c, "/pools/lp").await;
            if p["currentLowPriorityNodes"] == 1 {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!(pool["currentDedicatedNodes"], 2, "{pool}");
    assert_eq!(pool["targetLowPriorityNodes"], 1, "{pool}");
    within(T, "lp steady at its targets", async {
        while get(&c, "/pools/lp").await["allocationState"] != "steady" {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    // A pool of low-priority nodes only takes a host that joins now (lp has what it wants).
    let mut body = pool_body("lponly", 0);
    body["targetLowPriorityNodes"] = json!(1);
    let r = c.req("POST", "/pools").json(&body).send_within(T).await;
    assert_eq!(r.status, 201, "{}", text(&r));
    let third = token(&c).await;
    let _d = Agent::simulate(&s.url, &dir.path().join("d"), &third, 1, "17060-17069");
    let nodes = nodes_until(
        &c,
        "lponly",
        "1 idle node",
        Duration::from_secs(30),
        all_idle(1),
    )
    .await;
    assert_eq!(nodes[0]["isDedicated"], false, "{nodes:?}");
    let node = get(
        &c,
        &format!("/pools/lponly/nodes/{}", nodes[0]["id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(node["isDedicated"], false, "{node}");
}

const OTHER: &str = "otherclaims";
const OTHER_KEY: &str = "b3RoZXJjbGFpbXMta2V5LWZvci10aGUtYWdlbnQtY2xhaW1zLTAxMjM0NTY3ODk=";

/// Joined hosts are capacity of the account whose token they used: another account's agents
/// pool never gets the host, free as it is; the host's own account's pool does.
#[tokio::test]
async fn another_accounts_pool_never_gets_a_host() {
    let s = Server::start_exact(
        &["--in-memory", "--nodes", "agents", "--node-step-ms", "20"],
        &[("BLUEBATCH_ACCOUNTS", &format!("{OTHER}:{OTHER_KEY}"))],
    );
    let mine = s.client();
    let other = Client::new(&s.url, OTHER, OTHER_KEY);
    let h = Hand::join(&s.url, &token(&mine).await, 2).await;
    // The other account's pool first, with the host free.
    let r = other.create_pool("theirs", "linux", 1).await;
    assert_eq!(r.status, 201, "{}", text(&r));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let theirs = get(&other, "/pools/theirs/nodes").await;
    assert_eq!(theirs["value"], json!([]), "{theirs}");
    assert_eq!(
        get(&other, "/pools/theirs").await["allocationState"],
        "resizing"
    );
    assert_eq!(
        other.control("GET", "/hosts").send_within(T).await.json()["value"],
        json!([])
    );
    // The host's account gets it.
    let r = mine.create_pool("ours", "linux", 1).await;
    assert_eq!(r.status, 201, "{}", text(&r));
    nodes_until(&mine, "ours", "a node", T, |l| l.len() == 1).await;
    let d = h.call("GET", "desired", None).await.json();
    let pools: Vec<&Value> = d["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| &n["poolId"])
        .collect();
    assert_eq!(pools, [&json!("ours")], "{d}");
    // Still nothing for the other account, with a slot of the host free.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(get(&other, "/pools/theirs/nodes").await["value"], json!([]));
    assert_eq!(hosts(&mine).await[0]["nodes"].as_array().unwrap().len(), 1);
}

/// On a `--nodes agents` server, a pool with the metadata item `bluebatch.nodes: embedded` gets
/// embedded nodes (no host joined; SSH endpoints of the server), while a plain pool waits.
#[tokio::test]
async fn an_embedded_pool_on_an_agents_server_gets_embedded_nodes() {
    let s = agents_server();
    let c = s.client();
    let mut body = pool_body("emb", 2);
    body["metadata"] = json!([{"name": "bluebatch.nodes", "value": "embedded"}]);
    let r = c.req("POST", "/pools").json(&body).send_within(T).await;
    assert_eq!(r.status, 201, "{}", text(&r));
    assert_eq!(c.create_pool("plain", "linux", 1).await.status, 201);
    let nodes = nodes_until(
        &c,
        "emb",
        "2 idle nodes",
        Duration::from_secs(30),
        all_idle(2),
    )
    .await;
    for n in &nodes {
        let id = n["id"].as_str().unwrap();
        let port = c.ssh_port("emb", id).await;
        let banner = tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut b = [0u8; 8];
            s.read_exact(&mut b).unwrap();
            b
        })
        .await
        .unwrap();
        assert_eq!(&banner, b"SSH-2.0-", "{id}: an embedded endpoint");
    }
    let pool = get(&c, "/pools/emb").await;
    assert_eq!(pool["allocationState"], "steady");
    assert_eq!(pool["metadata"], body["metadata"]);
    assert!(hosts(&c).await.is_empty(), "no host backs them");
    assert_eq!(get(&c, "/pools/plain/nodes").await["value"], json!([]));
}

/// `--ssh-port` and `--advertise-address` given explicitly to an agent with the linux provider
/// (on a sandboxed host whose sshd listens on 22): Get Node's `ipAddress` and Remote Login
/// Settings say what was given. Root only (a loud skip otherwise).
#[tokio::test]
async fn a_linux_agent_reports_the_ssh_port_and_address_it_is_given() {
    if !sandbox::available() {
        return;
    }
    let sb = Sandbox::start(SandboxOptions { use_pam: true });
    let s = Server::launch(&["--in-memory", "--nodes", "agents", "--host", &sb.host_ip]);
    let c = s.client();
    let tok = token(&c).await;
    let r = c.create_pool("lin", "linux", 1).await;
    assert_eq!(r.status, 201, "{}", text(&r));
    // An address of the benchmarking range that nothing uses: only reported, never dialled.
    let advertised = "198.19.255.250";
    let state = sb.state_dir();
    let mut agent = sb.spawn(
        env!("CARGO_BIN_EXE_bluebatch"),
        &[
            "agent",
            "--server",
            &s.url,
            "--state-dir",
            state.to_str().unwrap(),
            "--ssh-port",
            "2222",
            "--advertise-address",
            advertised,
        ],
        &[("BLUEBATCH_LOG", "info"), ("BLUEBATCH_JOIN_TOKEN", &tok)],
        "agent.log",
    );
    let nodes = within(Duration::from_secs(45), "the linux node idle", async {
        loop {
            let l = get(&c, "/pools/lin/nodes").await;
            let l = l["value"].as_array().cloned().unwrap_or_default();
            if l.len() == 1 && l[0]["state"] == "idle" {
                return l;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    let id = nodes[0]["id"].as_str().unwrap();
    let node = get(&c, &format!("/pools/lin/nodes/{id}")).await;
    let rl = get(&c, &format!("/pools/lin/nodes/{id}/remoteloginsettings")).await;
    let h = hosts(&c).await;
    agent.stop();
    let log = sb.read_log("agent.log");
    assert_eq!(node["ipAddress"], advertised, "{node}\n{log}");
    assert_eq!(
        rl,
        json!({"remoteLoginIPAddress": advertised, "remoteLoginPort": 2222}),
        "{log}"
    );
    assert_eq!(h[0]["sshPort"], 2222, "{h:?}");
    assert_eq!(h[0]["address"], advertised, "{h:?}");
    assert_eq!(h[0]["provider"], "linux", "{h:?}");
}

/// A host released by one pool (Delete Pool) is free capacity: a pool of the account short of
/// hosts takes it at once (the lifecycle step that frees the slot refills the account's short
/// pools), not only when a host joins or returns.
#[tokio::test]
async fn a_host_released_by_delete_pool_backs_a_short_pool() {
    let dir = tempfile::tempdir().unwrap();
    let s = agents_server();
    let c = s.client();
    let tok = token(&c).await;
    let _a = Agent::simulate(&s.url, &dir.path().join("a"), &tok, 1, "17070-17079");
    assert_eq!(c.create_pool("one", "linux", 1).await.status, 201);
    nodes_until(
        &c,
        "one",
        "1 idle node",
        Duration::from_secs(30),
        all_idle(1),
    )
    .await;
    assert_eq!(c.create_pool("two", "linux", 1).await.status, 201);
    let r = c.req("DELETE", "/pools/one").send_within(T).await;
    assert_eq!(r.status, 202, "{}", text(&r));
    within(Duration::from_secs(20), "pool one deleted", async {
        while c.req("GET", "/pools/one").send_within(T).await.status != 404 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    nodes_until(
        &c,
        "two",
        "1 idle node",
        Duration::from_secs(20),
        all_idle(1),
    )
    .await;
}
