//! Test harness: the real `bluebatch serve` binary on port 0, and a client that signs requests
//! with Shared Key the way the Azure SDKs do.
#![allow(dead_code)]

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::Value;
use sha2::Sha256;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod agents;
pub mod replicas;
pub mod sandbox;
pub mod sandboxed;

pub const ACCOUNT: &str = "bluebatchdev";
pub const KEY: &str =
    "msn4CXagmnuee1CykUmurwWY6CRu19fKDokfMNT5AJ+LT4lM+P8MqEYH0USzDq3pUGzaJUiEfj51equ/VeT60Q==";
pub const V: &str = "2023-11-01.18.0";

pub struct Server {
    pub child: Child,
    pub url: String,
}

impl Server {
    /// Starts with an in-memory store.
    pub fn start() -> Self {
        Self::start_with(&["--in-memory"])
    }

    pub fn start_in(dir: &Path) -> Self {
        Self::start_with(&["--data-dir", dir.to_str().unwrap()])
    }

    pub fn start_with(extra: &[&str]) -> Self {
        if replicas::replica_mode() {
            // BLUEBATCH_TEST_REPLICAS: two replicas on PostgreSQL behind a round-robin proxy.
            return replicas::fleet(extra);
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_bluebatch"))
            .args(["serve", "--port", "0", "--node-step-ms", "20"])
            .args(extra)
            .env("BLUEBATCH_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting bluebatch");
        let url = listening_url(&mut child);
        Server { child, url }
    }

    pub fn client(&self) -> Client {
        Client::new(&self.url, ACCOUNT, KEY)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

/// Reads `child`'s stdout (piped) up to its `bluebatch listening on <url>` line and returns the
/// URL; stdout is kept draining afterwards so the server never blocks on a full pipe.
pub fn listening_url(child: &mut Child) -> String {
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = loop {
        let line = lines
            .next()
            .expect("bluebatch exited before listening")
            .unwrap();
        if let Some(u) = line.strip_prefix("bluebatch listening on ") {
            break u.trim().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    url
}

/// [`listening_url`] with a deadline: a thread reads `child`'s stdout (piped, drained to its
/// end) and the test fails when no `bluebatch listening on <url>` line came within `limit`.
pub fn listening_url_within(child: &mut Child, limit: Duration) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(u) = line.strip_prefix("bluebatch listening on ") {
                let _ = tx.send(u.trim().to_string());
            }
        }
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("bluebatch did not listen within {} s", limit.as_secs_f64()))
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        replicas::release(self.child.id());
    }
}

pub struct Client {
    pub base: String,
    pub account: String,
    key: Vec<u8>,
    http: reqwest::Client,
}

/// `r` read whole: its status, headers and body.
pub async fn respond(r: reqwest::Response) -> Resp {
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.bytes().await.unwrap().to_vec();
    Resp {
        status,
        headers,
        body,
    }
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
    pub fn code(&self) -> String {
        self.json()["code"].as_str().unwrap_or_default().to_string()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    /// The `values` of a Batch error as (key, value) pairs.
    pub fn values(&self) -> Vec<(String, String)> {
        self.json()["values"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|kv| {
                        (
                            kv["key"].as_str().unwrap().to_string(),
                            kv["value"].as_str().unwrap().to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
    pub fn value(&self, key: &str) -> Option<String> {
        self.values()
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }
}

pub fn http_date() -> String {
    let f = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    time::OffsetDateTime::now_utc().format(f).unwrap()
}

/// A request being built.
pub struct Req<'a> {
    client: &'a Client,
    pub method: &'a str,
    pub path: String,
    pub query: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
    pub sign: bool,
}

impl<'a> Req<'a> {
    pub fn query(mut self, q: &str) -> Self {
        self.query = q.to_string();
        self
    }
    pub fn header(mut self, n: &str, v: &str) -> Self {
        self.headers.push((n.to_string(), v.to_string()));
        self
    }
    pub fn json(self, v: &Value) -> Self {
        self.raw(v.to_string().into_bytes())
    }
    pub fn raw(mut self, b: Vec<u8>) -> Self {
        self.body = Some(b);
        self
    }
    pub fn unsigned(mut self) -> Self {
        self.sign = false;
        self
    }

    pub fn string_to_sign(&self, account: &str) -> String {
        let get = |n: &str| {
            self.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(n))
                .map(|(_, v)| v.as_str())
                .unwrap_or("")
        };
        let mut s = format!("{}\n", self.method);
        for h in [
            "content-encoding",
            "content-language",
            "content-length",
            "content-md5",
            "content-type",
            "date",
            "if-modified-since",
            "if-match",
            "if-none-match",
            "if-unmodified-since",
            "range",
        ] {
            s.push_str(get(h));
            s.push('\n');
        }
        let mut ocp: Vec<(String, &str)> = self
            .headers
            .iter()
            .filter(|(k, _)| k.to_ascii_lowercase().starts_with("ocp-"))
            .map(|(k, v)| (k.to_ascii_lowercase(), v.as_str()))
            .collect();
        ocp.sort();
        for (k, v) in ocp {
            s.push_str(&format!("{k}:{v}\n"));
        }
        s.push_str(&format!("/{account}{}", self.path));
        let mut params: Vec<(String, String)> = self
            .query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (n, v) = p.split_once('=').unwrap_or((p, ""));
                (pct_decode(n), pct_decode(v))
            })
            .filter(|(_, v)| !v.is_empty())
            .collect();
        params.sort();
        for (n, v) in params {
            s.push_str(&format!("\n{n}:{v}"));
        }
        s
    }

    /// Adds what a client adds before sending: `ocp-date`, the body's content type and length
    /// (unless the test set them, or a transfer-encoding), and the Shared Key signature.
    fn prepare(&mut self) {
        if !self
            .headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("ocp-date") || k.eq_ignore_ascii_case("date"))
        {
            self.headers.push(("ocp-date".into(), http_date()));
        }
        if let Some(b) = &self.body {
            if !self
                .headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            {
                self.headers.push((
                    "content-type".into(),
                    "application/json; odata=minimalmetadata".into(),
                ));
            }
            if !self.headers.iter().any(|(k, _)| {
                k.eq_ignore_ascii_case("content-length")
                    || k.eq_ignore_ascii_case("transfer-encoding")
            }) {
                self.headers
                    .push(("content-length".into(), b.len().to_string()));
            }
        }
        if self.sign {
            let sts = self.string_to_sign(&self.client.account);
            let auth = self.client.authorization(&sts);
            self.headers.push(("authorization".into(), auth));
        }
    }

    pub async fn send(mut self) -> Resp {
        self.prepare();
        let url = if self.query.is_empty() {
            format!("{}{}", self.client.base, self.path)
        } else {
            format!("{}{}?{}", self.client.base, self.path, self.query)
        };
        let method = reqwest::Method::from_bytes(self.method.as_bytes()).unwrap();
        let mut rb = self.client.http.request(method, url);
        for (k, v) in &self.headers {
            rb = rb.header(k.as_str(), v.as_str());
        }
        if let Some(b) = self.body {
            rb = rb.body(b);
        }
        let r = rb.send().await.expect("request failed");
        respond(r).await
    }
}

pub fn pct_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            out.push(
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap(), 16).unwrap(),
            );
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

impl Client {
    pub fn new(base: &str, account: &str, key: &str) -> Self {
        Client {
            base: base.to_string(),
            account: account.to_string(),
            key: STANDARD.decode(key).unwrap(),
            http: reqwest::Client::builder().build().unwrap(),
        }
    }

    pub fn req<'a>(&'a self, method: &'a str, path: &str) -> Req<'a> {
        Req {
            client: self,
            method,
            path: path.to_string(),
            query: format!("api-version={V}"),
            headers: Vec::new(),
            body: None,
            sign: true,
        }
    }

    pub async fn create_pool(&self, id: &str, os: &str, nodes: u32) -> Resp {
        let body = match os {
            "linux" => {
                serde_json::json!({"id": id, "vmSize": "STANDARD_D2S_V3", "targetDedicatedNodes": nodes,
                "virtualMachineConfiguration": {"imageReference": {"publisher": "Canonical", "offer": "0001-com-ubuntu-server-jammy", "sku": "22_04-lts"}, "nodeAgentSKUId": "batch.node.ubuntu 22.04"}})
            }
            _ => {
                serde_json::json!({"id": id, "vmSize": "STANDARD_D2S_V3", "targetDedicatedNodes": nodes,
                "virtualMachineConfiguration": {"imageReference": {"publisher": "MicrosoftWindowsServer", "offer": "WindowsServer", "sku": "2022-datacenter"}, "nodeAgentSKUId": "batch.node.windows amd64"}})
            }
        };
        self.req("POST", "/pools").json(&body).send().await
    }

    /// Creates a pool and waits until its nodes are idle; returns their ids.
    pub async fn ready_pool(&self, id: &str, os: &str, nodes: u32) -> Vec<String> {
        let r = self.create_pool(id, os, nodes).await;
        assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let r = self.req("GET", &format!("/pools/{id}/nodes")).send().await;
            let v = r.json();
            let list = v["value"].as_array().unwrap();
            if list.len() == nodes as usize && list.iter().all(|n| n["state"] == "idle") {
                return list
                    .iter()
                    .map(|n| n["id"].as_str().unwrap().to_string())
                    .collect();
            }
            assert!(Instant::now() < deadline, "nodes never became idle: {v}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn user_path(pool: &str, node: &str, user: &str) -> String {
        format!("/pools/{pool}/nodes/{node}/users/{user}")
    }
}

/// Runs `cmd` on a node over real OpenSSH with a password (given to sshpass through the
/// environment, never argv). Returns (exit status, stdout); at most 60 s (then exit 124).
pub fn ssh_password(port: u16, user: &str, password: &str, cmd: &str) -> (i32, String) {
    let out = Command::new("timeout")
        .args(["-k", "5", "60", "sshpass"])
        .arg("-e")
        .arg("ssh")
        .args(ssh_opts(port, "password"))
        .arg(format!("{user}@127.0.0.1"))
        .arg(cmd)
        .env("SSHPASS", password)
        .stdin(Stdio::null())
        .output()
        .expect("running sshpass/ssh");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Runs `cmd` on a node over real OpenSSH with a private key file; at most 60 s (then exit 124).
pub fn ssh_key(port: u16, user: &str, key: &Path, cmd: &str) -> (i32, String) {
    let out = Command::new("timeout")
        .args(["-k", "5", "60", "ssh"])
        .args(ssh_opts(port, "publickey"))
        .args(["-o", "IdentitiesOnly=yes", "-i"])
        .arg(key)
        .arg(format!("{user}@127.0.0.1"))
        .arg(cmd)
        .stdin(Stdio::null())
        .output()
        .expect("running ssh");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

pub fn ssh_opts(port: u16, method: &str) -> Vec<String> {
    [
        "-p",
        &port.to_string(),
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "ConnectTimeout=5",
        "-o",
        &format!("PreferredAuthentications={method}"),
        "-o",
        "NumberOfPasswordPrompts=1",
        "-o",
        "BatchMode=no",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A fresh ed25519 key pair in `dir`; returns (private key path, public key line).
pub fn keypair(dir: &Path, name: &str) -> (std::path::PathBuf, String) {
    let path = dir.join(name);
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&path)
        .status()
        .unwrap();
    assert!(st.success());
    let public = std::fs::read_to_string(path.with_extension("pub")).unwrap();
    (path, public.trim().to_string())
}

impl Client {
    /// The node's SSH port from Get Remote Login Settings.
    pub async fn ssh_port(&self, pool: &str, node: &str) -> u16 {
        let r = self
            .req(
                "GET",
                &format!("/pools/{pool}/nodes/{node}/remoteloginsettings"),
            )
            .send()
            .await;
        assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
        r.json()["remoteLoginPort"].as_u64().unwrap() as u16
    }

    /// A control request under /_bluebatch (no api-version).
    pub fn control<'a>(&'a self, method: &'a str, path: &str) -> Req<'a> {
        let mut r = self.req(method, &format!("/_bluebatch{path}"));
        r.query = String::new();
        r
    }
}

/// The node's ed25519 host key as `ssh-keyscan` reads it (at most 30 s); panics when no key was
/// read, so that a comparison of host keys cannot pass on an empty string.
pub fn host_key(port: u16) -> String {
    let out = Command::new("timeout")
        .args([
            "-k",
            "5",
            "30",
            "ssh-keyscan",
            "-T",
            "10",
            "-t",
            "ed25519",
            "-p",
        ])
        .arg(port.to_string())
        .arg("127.0.0.1")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .expect("running ssh-keyscan");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let key = text
        .lines()
        .find(|l| l.contains("ssh-ed25519"))
        .and_then(|l| l.split_whitespace().last())
        .unwrap_or_default()
        .to_string();
    assert!(
        !key.is_empty(),
        "no host key read from port {port} ({}): {text:?}",
        out.status
    );
    key
}
// ---- HTTPS and bearer tokens (issue 5) ----

/// A server serving HTTPS beside HTTP.
pub struct TlsServer {
    pub server: Server,
    /// `https://127.0.0.1:{port}`
    pub https: String,
    /// The generated CA certificate the server says to trust (None with --tls-cert).
    pub ca: Option<std::path::PathBuf>,
}

impl Server {
    /// Starts with `--tls --tls-port 0` and `extra`; reads the HTTP and HTTPS URLs and the CA
    /// file from the start-up lines.
    pub fn start_tls(extra: &[&str]) -> TlsServer {
        let mut child = Command::new(env!("CARGO_BIN_EXE_bluebatch"))
            .args(["serve", "--port", "0", "--node-step-ms", "20"])
            .args(["--tls", "--tls-port", "0"])
            .args(extra)
            .env("BLUEBATCH_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting bluebatch");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut url, mut https, mut ca, mut user_cert) = (None, None, None, false);
        while url.is_none() || https.is_none() || !(ca.is_some() || user_cert) {
            let line = lines
                .next()
                .expect("bluebatch exited before listening")
                .unwrap();
            if let Some(u) = line.strip_prefix("bluebatch listening on ") {
                if u.starts_with("https://") {
                    https = Some(u.trim().to_string());
                } else {
                    url = Some(u.trim().to_string());
                }
            } else if let Some((_, path)) = line.split_once("export REQUESTS_CA_BUNDLE=") {
                ca = Some(std::path::PathBuf::from(path.trim()));
            } else if line.starts_with("tls: certificate ") {
                user_cert = true;
            }
        }
        std::thread::spawn(move || for _ in lines {});
        TlsServer {
            server: Server {
                child,
                url: url.unwrap(),
            },
            https: https.unwrap(),
            ca,
        }
    }
}

impl Client {
    /// A client for `base` (https) that trusts only the PEM CA certificate at `ca`.
    pub fn with_ca(base: &str, account: &str, key: &str, ca: &Path) -> Self {
        let pem = std::fs::read(ca).unwrap();
        let http = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
            .build()
            .unwrap();
        Client {
            base: base.to_string(),
            account: account.to_string(),
            key: STANDARD.decode(key).unwrap(),
            http,
        }
    }
}

impl<'a> Req<'a> {
    /// Sends `Authorization: Bearer {token}` instead of a Shared Key signature.
    pub fn bearer(self, token: &str) -> Self {
        self.unsigned()
            .header("authorization", &format!("Bearer {token}"))
    }
}

/// Runs `bluebatch token` with `args` (and `env`); returns its stdout (the token) on success,
/// or its stderr on failure.
pub fn mint(args: &[&str], env: &[(&str, &str)]) -> Result<String, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_bluebatch"))
        .arg("token")
        .args(args)
        .env_remove("BLUEBATCH_ACCOUNTS_FILE")
        .envs(env.iter().copied())
        .output()
        .expect("running bluebatch token");
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap().trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}
// ---------------------------------------------------------------------------------------------
// Helpers for the reliability suites (crash, concurrency, hostile input).

/// What went wrong with a request that got no answer (connection refused, reset, timeout).
pub type SendError = String;

impl Req<'_> {
    /// As [`Req::send`], but a request that gets no answer is an `Err` instead of a panic (a
    /// server killed mid-request). Bounded by `timeout`.
    pub async fn try_send_within(mut self, timeout: Duration) -> Result<Resp, SendError> {
        self.prepare();
        let url = if self.query.is_empty() {
            format!("{}{}", self.client.base, self.path)
        } else {
            format!("{}{}?{}", self.client.base, self.path, self.query)
        };
        let method =
            reqwest::Method::from_bytes(self.method.as_bytes()).map_err(|e| e.to_string())?;
        let mut rb = self.client.http.request(method, url).timeout(timeout);
        for (k, v) in &self.headers {
            rb = rb.header(k.as_str(), v.as_str());
        }
        if let Some(b) = self.body {
            rb = rb.body(b);
        }
        let r = rb.send().await.map_err(|e| format!("{e:?}"))?;
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let body = r.bytes().await.map_err(|e| format!("{e:?}"))?.to_vec();
        Ok(Resp {
            status,
            headers,
            body,
        })
    }

    /// The whole request as raw HTTP/1.1 bytes (signed as [`Req::send`] signs), for requests a
    /// well-behaved client library would refuse to send. `extra_raw` lines are added verbatim
    /// after the signature (each without its CRLF).
    pub fn into_raw_bytes(mut self, extra_raw: &[&[u8]]) -> Vec<u8> {
        self.prepare();
        let host = self
            .client
            .base
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let target = if self.query.is_empty() {
            self.path.clone()
        } else {
            format!("{}?{}", self.path, self.query)
        };
        let mut out = format!("{} {target} HTTP/1.1\r\nhost: {host}\r\n", self.method).into_bytes();
        for (k, v) in &self.headers {
            out.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
        }
        for line in extra_raw {
            out.extend_from_slice(line);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"connection: close\r\n\r\n");
        if let Some(b) = self.body {
            out.extend_from_slice(&b);
        }
        out
    }
}

impl Client {
    /// `SharedKey {account}:{signature}` for a string to sign.
    pub fn authorization(&self, string_to_sign: &str) -> String {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.key).unwrap();
        mac.update(string_to_sign.as_bytes());
        format!(
            "SharedKey {}:{}",
            self.account,
            STANDARD.encode(mac.finalize().into_bytes())
        )
    }
}

/// Sends raw bytes to the server at `base_url` and reads the answer until the server closes the
/// connection (send `connection: close`). `None` when nothing came back (the connection was
/// closed or reset without an answer).
pub async fn raw_request(base_url: &str, request: &[u8]) -> Option<Resp> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base_url.trim_start_matches("http://").trim_end_matches('/');
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    // The server may answer (and close) before it has read everything: ignore write errors.
    let _ = s.write_all(request).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut buf)).await;
    parse_http_response(&buf)
}

/// Parses one HTTP/1.1 response (Content-Length, chunked, or until close).
pub fn parse_http_response(buf: &[u8]) -> Option<Resp> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let mut headers = reqwest::header::HeaderMap::new();
    for l in lines {
        let (k, v) = l.split_once(':')?;
        if let (Ok(k), Ok(v)) = (
            reqwest::header::HeaderName::from_bytes(k.trim().as_bytes()),
            reqwest::header::HeaderValue::from_str(v.trim()),
        ) {
            headers.append(k, v);
        }
    }
    let rest = &buf[end + 4..];
    let chunked = headers
        .get("transfer-encoding")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        let mut out = Vec::new();
        let mut r = rest;
        loop {
            let nl = r.windows(2).position(|w| w == b"\r\n")?;
            let size =
                usize::from_str_radix(std::str::from_utf8(&r[..nl]).ok()?.trim(), 16).ok()?;
            r = &r[nl + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(r.get(..size)?);
            r = r.get(size + 2..)?;
        }
        out
    } else if let Some(len) = headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
    {
        rest.get(..len).unwrap_or(rest).to_vec()
    } else {
        rest.to_vec()
    };
    Some(Resp {
        status,
        headers,
        body,
    })
}

/// Whether the OpenSSH client and sshpass are installed. When they are not, SSH login checks are
/// skipped with a loud note, and under CI (see [`require`]) the test fails instead.
pub fn have_ssh_client() -> bool {
    let present = ["ssh", "sshpass", "ssh-keygen", "ssh-keyscan"]
        .iter()
        .all(|tool| {
            Command::new(tool)
                .arg("-V")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok()
        });
    require(
        present,
        "the OpenSSH client (ssh, ssh-keygen, ssh-keyscan) and sshpass",
    )
}

fn ssh_base_args(port: u16, source: &str) -> Vec<String> {
    [
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "ConnectTimeout=15",
        "-o",
        "NumberOfPasswordPrompts=1",
        "-F",
        "/dev/null",
        "-b",
        source,
        "-p",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([port.to_string()])
    .collect()
}

/// OpenSSH client arguments for a node on `port` from the local address `source`: no config
/// file, no host-key checks, connect timeout 10 s, one password prompt (then the login options
/// and `user@127.0.0.1`).
pub fn ssh_args(port: u16, source: &str) -> Vec<String> {
    [
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
        "NumberOfPasswordPrompts=1",
        "-b",
        source,
        "-p",
        &port.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// `ssh` through sshpass (the password in the environment), password only, running `cmd`.
fn password_login_command(
    port: u16,
    user: &str,
    password: &str,
    source: &str,
    cmd: &str,
) -> tokio::process::Command {
    let mut c = tokio::process::Command::new("sshpass");
    c.arg("-e")
        .env("SSHPASS", password)
        .arg("ssh")
        .args(ssh_base_args(port, source))
        .args([
            "-o",
            "PreferredAuthentications=password,keyboard-interactive",
            "-o",
            "PubkeyAuthentication=no",
        ])
        .arg(format!("{user}@127.0.0.1"))
        .arg(cmd);
    c
}

/// `ssh` with one private key file only (BatchMode: no password prompt), running `cmd`.
fn key_login_command(
    port: u16,
    user: &str,
    key_file: &Path,
    source: &str,
    cmd: &str,
) -> tokio::process::Command {
    let mut c = tokio::process::Command::new("ssh");
    c.args(ssh_base_args(port, source))
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "PreferredAuthentications=publickey",
            "-o",
            "PasswordAuthentication=no",
            "-i",
        ])
        .arg(key_file)
        .arg(format!("{user}@127.0.0.1"))
        .arg(cmd);
    c
}

async fn ssh_run(mut cmd: tokio::process::Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    match tokio::time::timeout(Duration::from_secs(30), cmd.status()).await {
        Ok(Ok(st)) => st.success(),
        _ => false,
    }
}

/// Logs in to a node with a password and runs `true`; whether that worked. `source` is the local
/// address to connect from (any 127.x.y.z): the node refuses an address after 10 failures a
/// minute, so checks that expect failures use a fresh one each.
pub async fn ssh_password_login(port: u16, user: &str, password: &str, source: &str) -> bool {
    ssh_run(password_login_command(port, user, password, source, "true")).await
}

/// Logs in to a node with a private key file (nothing else offered) and runs `true`.
pub async fn ssh_key_login(port: u16, user: &str, key_file: &Path, source: &str) -> bool {
    ssh_run(key_login_command(port, user, key_file, source, "true")).await
}

/// A distinct loopback source address for the `n`th SSH attempt of a test (127.k.j.i, never
/// 127.0.0.1).
pub fn loopback_source(n: u32) -> String {
    let n = n % (250 * 250 * 250);
    format!("127.{}.{}.{}", 1 + n / 62_500, (n / 250) % 250, 2 + n % 250)
}

// ---------------------------------------------------------------------------------------------
// SSH outcomes that tell a refusal from a node that did not answer, and deadlines (issue 10).

/// What came of one SSH login attempt over the real OpenSSH client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SshOutcome {
    /// Logged in and ran the command; its exit status and stdout.
    Accepted { code: i32, stdout: String },
    /// sshd answered and refused authentication (ssh exit 255 with "Permission denied").
    Refused,
    /// No SSH conversation: connection refused or closed before authentication, timeout, … (the
    /// client's stderr). A check of refusal must not pass on this.
    Unreachable(String),
}

impl SshOutcome {
    pub fn accepted(&self) -> bool {
        matches!(self, SshOutcome::Accepted { .. })
    }
    /// The command's stdout; panics (with `what`) unless the login was accepted and the command
    /// exited 0.
    pub fn stdout(&self, what: &str) -> &str {
        match self {
            SshOutcome::Accepted { code: 0, stdout } => stdout,
            other => panic!("{what}: expected a login running the command, got {other:?}"),
        }
    }
}

/// How long one SSH attempt may take before the check fails as [`SshOutcome::Unreachable`].
pub const SSH_DEADLINE: Duration = Duration::from_secs(20);

async fn ssh_outcome(mut cmd: tokio::process::Command) -> SshOutcome {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = match tokio::time::timeout(SSH_DEADLINE, cmd.output()).await {
        Err(_) => return SshOutcome::Unreachable(format!("no outcome within {SSH_DEADLINE:?}")),
        Ok(Err(e)) => return SshOutcome::Unreachable(format!("could not run ssh: {e}")),
        Ok(Ok(out)) => out,
    };
    let code = out.status.code().unwrap_or(-1);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    // sshpass exits 5 when the password prompt comes back: sshd answered and refused.
    if (code == 255 && stderr.contains("Permission denied")) || code == 5 {
        SshOutcome::Refused
    } else if code == 255 || code == -1 {
        SshOutcome::Unreachable(stderr)
    } else {
        SshOutcome::Accepted {
            code,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        }
    }
}

/// Logs in with a password only (sshpass, the password in the environment) from the local
/// address `source` and runs `cmd`.
pub async fn ssh_password_outcome(
    port: u16,
    user: &str,
    password: &str,
    source: &str,
    cmd: &str,
) -> SshOutcome {
    ssh_outcome(password_login_command(port, user, password, source, cmd)).await
}

/// Logs in with one private key file only (BatchMode: no password prompt) from `source` and
/// runs `cmd`.
pub async fn ssh_key_outcome(
    port: u16,
    user: &str,
    key_file: &Path,
    source: &str,
    cmd: &str,
) -> SshOutcome {
    ssh_outcome(key_login_command(port, user, key_file, source, cmd)).await
}

/// The node's ed25519 host key as `ssh-keyscan` reads it (at most 20 s); panics when no key
/// was read, so that a comparison of host keys cannot pass on two empty strings.
pub async fn host_key_read(port: u16) -> String {
    let mut c = tokio::process::Command::new("ssh-keyscan");
    c.args([
        "-T",
        "10",
        "-t",
        "ed25519",
        "-p",
        &port.to_string(),
        "127.0.0.1",
    ])
    .stdin(Stdio::null())
    .stderr(Stdio::null())
    .kill_on_drop(true);
    let out = tokio::time::timeout(SSH_DEADLINE, c.output())
        .await
        .unwrap_or_else(|_| panic!("ssh-keyscan -p {port}: no answer within {SSH_DEADLINE:?}"))
        .expect("running ssh-keyscan");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let key = text
        .lines()
        .find(|l| l.contains("ssh-ed25519"))
        .and_then(|l| l.split_whitespace().last())
        .unwrap_or_default()
        .to_string();
    assert!(
        !key.is_empty(),
        "no host key read from port {port}: {text:?}"
    );
    key
}

/// Runs `fut`, failing the test (naming `what`) when it has not finished within `limit`.
pub async fn within<T>(
    limit: Duration,
    what: &str,
    fut: impl std::future::Future<Output = T>,
) -> T {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: not done within {limit:?} (a hang)"))
}

impl Req<'_> {
    /// As [`Req::send`], failing the test when no answer came within `limit`.
    pub async fn send_within(self, limit: Duration) -> Resp {
        let what = format!("{} {}", self.method, self.path);
        match self.try_send_within(limit).await {
            Ok(r) => r,
            Err(e) => panic!("{what}: no answer within {limit:?}: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The README-claims suites (claims_*.rs).

impl Server {
    /// `bluebatch serve --port 0` with exactly `args` (no `--node-step-ms` added, so a test can
    /// set its own) and the environment `env` added; waits (at most 20 s) for the HTTP listening
    /// line.
    pub fn start_exact(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_bluebatch"))
            .args(["serve", "--port", "0"])
            .args(args)
            .env("BLUEBATCH_LOG", "warn")
            .env_remove("BLUEBATCH_ACCOUNTS")
            .env_remove("BLUEBATCH_ACCOUNTS_FILE")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting bluebatch");
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if !sent && let Some(u) = line.strip_prefix("bluebatch listening on ") {
                    let _ = tx.send(u.trim().to_string());
                    sent = true;
                }
            }
        });
        let url = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                panic!("bluebatch serve {args:?} did not listen within 20 s");
            }
        };
        Server { child, url }
    }
}

// ---------------------------------------------------------------------------------------------
// Prerequisites: no silent skips in CI (issue 10).

/// Whether this is a CI run (`CI` set to anything but empty, `0` or `false`, as CI services and
/// `.ci/run` set it): there every prerequisite of a test must be present.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| {
        let v = v.trim().to_ascii_lowercase();
        !v.is_empty() && v != "0" && v != "false"
    })
}

/// A prerequisite of a check: `present`, or else the check is skipped with a loud note naming
/// `what` (returns false) — except under CI, where a missing prerequisite fails the test.
pub fn require(present: bool, what: &str) -> bool {
    if present {
        return true;
    }
    if in_ci() {
        panic!("missing prerequisite: {what} (CI is set: this is a failure, not a skip)");
    }
    eprintln!(
        "\n!!! SKIPPED CHECKS: missing {what}; under CI=true this fails. Run scripts/setup.sh \
         (and the tests as root) to run them.\n"
    );
    false
}

/// Whether the tests run as root (sessions then switch to a uid of their own).
pub fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// [`require`] root: the checks of per-session uids need it (CI runs as root).
pub fn require_root(what: &str) -> bool {
    require(
        running_as_root(),
        &format!("root (the tests run as uid {}): {what}", current_uid()),
    )
}

fn current_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map_or(u32::MAX, |m| m.uid())
}

impl Server {
    /// [`Server::start_with`] with a deadline: `serve --port 0 --node-step-ms 20` and `args`,
    /// failing the test when it has not listened within 20 s (instead of blocking).
    pub fn launch(args: &[&str]) -> Self {
        let mut all = vec!["--node-step-ms", "20"];
        all.extend_from_slice(args);
        Self::start_exact(&all, &[])
    }

    /// [`Server::start_tls`] with a deadline of 20 s.
    pub fn launch_tls(args: &[&str]) -> TlsServer {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            let _ = tx.send(Server::start_tls(&a));
        });
        rx.recv_timeout(Duration::from_secs(20))
            .expect("bluebatch serve --tls did not listen within 20 s")
    }
}

/// Runs the `bluebatch` CLI with `args` and `env` (BLUEBATCH_URL, BLUEBATCH_KEY and
/// BLUEBATCH_ACCOUNT removed first); fails the test when it has not exited within 20 s.
pub async fn bluebatch_cli(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_bluebatch"));
    c.args(args)
        .env_remove("BLUEBATCH_URL")
        .env_remove("BLUEBATCH_KEY")
        .env_remove("BLUEBATCH_ACCOUNT")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    within(
        Duration::from_secs(20),
        &format!("bluebatch {args:?}"),
        c.output(),
    )
    .await
    .expect("running bluebatch")
}

// ---------------------------------------------------------------------------------------------
// Small helpers shared by the claims_* suites and others.

/// The response body as text (lossy), for assertion messages.
pub fn text(r: &Resp) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

/// An Add Pool body: a Linux (Ubuntu 22.04) virtual-machine pool `id` of `nodes` dedicated nodes.
pub fn pool_body(id: &str, nodes: u32) -> Value {
    serde_json::json!({"id": id, "vmSize": "STANDARD_D2S_V3", "targetDedicatedNodes": nodes,
           "virtualMachineConfiguration": {"imageReference": {"publisher": "Canonical",
               "offer": "0001-com-ubuntu-server-jammy", "sku": "22_04-lts"},
               "nodeAgentSKUId": "batch.node.ubuntu 22.04"}})
}

/// Waits (at most 20 s, each request 10 s) until `pool` is steady and all its nodes idle.
pub async fn wait_steady(c: &Client, pool: &str) {
    const T: Duration = Duration::from_secs(10);
    within(Duration::from_secs(20), "the pool to be steady", async {
        loop {
            let v = c
                .req("GET", &format!("/pools/{pool}"))
                .send_within(T)
                .await
                .json();
            let nodes = c
                .req("GET", &format!("/pools/{pool}/nodes"))
                .send_within(T)
                .await
                .json();
            let all_idle = nodes["value"]
                .as_array()
                .unwrap()
                .iter()
                .all(|n| n["state"] == "idle");
            if v["allocationState"] == "steady" && all_idle {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// Fails the test unless the OpenSSH client, ssh-keygen and sshpass are installed.
pub fn require_ssh() {
    assert!(
        have_ssh_client(),
        "these tests need the OpenSSH client, ssh-keygen and sshpass (scripts/setup.sh installs them)"
    );
}

/// Add User with `body` on `node` (at most 10 s); asserts 201.
pub async fn add_user(c: &Client, pool: &str, node: &str, body: Value) {
    let r = c
        .req("POST", &format!("/pools/{pool}/nodes/{node}/users"))
        .json(&body)
        .send_within(Duration::from_secs(10))
        .await;
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
}
