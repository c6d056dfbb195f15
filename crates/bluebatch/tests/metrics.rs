//! `GET /_bluebatch/metrics` of a real `bluebatch serve`, scraped as Prometheus does (plain
//! HTTP, no credentials): every answer is valid text exposition format 0.0.4 (each family with
//! HELP and TYPE, samples that parse, cumulative buckets ending in `+Inf` = `_count`); requests
//! counted exactly by operation and status, each with one latency observation; connection and
//! SSH gauges following held connections and a real OpenSSH session; shed connections counted
//! by reason; node applies and commits observed (embedded nodes, agents, PostgreSQL replicas);
//! agents connected and known following `bluebatch agent --simulate 2` processes
//! started, killed and revoked; HEAD, 405 for other verbs, no id or account name in the text.
//!
//! The figures are per process: each test starts its own serve (never the replicas fleet of
//! `BLUEBATCH_TEST_REPLICAS`), so the deltas asserted are exact.

mod common;

use common::*;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The tests of this file run one at a time: the PostgreSQL replicas harness picks a free port
/// before the replica binds it, and the other tests' many short connections (each on an
/// ephemeral port of 127.0.0.1) could take it in between.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The deadline of every request and wait of these tests.
const T: Duration = Duration::from_secs(20);

const KEY_LINE: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIH9wS+tM/r/10YNGJiHozDKRUN3jv3vxfhXUlqoufUKB metrics";

/// `bluebatch serve` with `args`, on its own (figures are per process).
fn serve(args: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bluebatch"))
        .args(["serve", "--port", "0", "--node-step-ms", "20"])
        .args(args)
        .env("BLUEBATCH_LOG", "warn")
        .env_remove("BLUEBATCH_ACCOUNTS")
        .env_remove("BLUEBATCH_ACCOUNTS_FILE")
        .env_remove("BLUEBATCH_NODES")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting bluebatch serve");
    let url = listening_url_within(&mut child, T);
    Server { child, url }
}

fn addr_of(url: &str) -> SocketAddr {
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .expect("an http://ip:port URL")
}

/// One answer read off the wire.
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn parse_raw(raw: &[u8]) -> Raw {
    let text = String::from_utf8(raw.to_vec()).expect("a UTF-8 answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Raw {
        status,
        headers,
        body: body.to_string(),
    }
}

/// `method path` on a connection of its own (`Connection: close`), no credentials.
async fn raw(url: &str, method: &str, path: &str) -> Raw {
    let addr = addr_of(url);
    within(T, &format!("{method} {path}"), async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        parse_raw(&buf)
    })
    .await
}

/// One parsed and checked scrape: samples by `name{labels sorted by name}`.
#[derive(Debug)]
struct Scrape {
    samples: BTreeMap<String, f64>,
    types: HashMap<String, String>,
    text: String,
}

fn valid_name(n: &str) -> bool {
    let mut chars = n.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// `{a="x",b="y"}` (the braces' inside) → sorted pairs; panics on a malformed label set.
fn parse_labels(s: &str, line: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let (name, after) = rest
            .split_once("=\"")
            .unwrap_or_else(|| panic!("a label without =\": {line}"));
        assert!(
            valid_name(name) && !name.starts_with("__"),
            "label {name:?}: {line}"
        );
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            let (i, c) = chars
                .next()
                .unwrap_or_else(|| panic!("an unterminated label value: {line}"));
            match c {
                '\\' => match chars.next().map(|(_, c)| c) {
                    Some('\\') => value.push('\\'),
                    Some('"') => value.push('"'),
                    Some('n') => value.push('\n'),
                    other => panic!("escape \\{other:?} in a label value: {line}"),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        out.push((name.to_string(), value));
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
    let names: BTreeSet<&str> = out.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names.len(), out.len(), "a label given twice: {line}");
    out.sort();
    out
}

fn key(name: &str, labels: &[(String, String)]) -> String {
    if labels.is_empty() {
        return name.to_string();
    }
    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    format!("{name}{{{}}}", inner.join(","))
}

/// Parses `text` as the Prometheus text format 0.0.4 and checks what a scraper relies on.
fn parse_exposition(text: &str) -> Scrape {
    assert!(text.ends_with('\n'), "the text ends with a line feed");
    let mut helps = HashSet::new();
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = BTreeMap::new();
    let mut done: HashSet<String> = HashSet::new();
    let mut current: Option<String> = None;
    // histogram family → label set (without le) → [(le, cumulative)], sum, count
    let mut buckets: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut counts: BTreeMap<String, f64> = BTreeMap::new();
    let mut sums: BTreeSet<String> = BTreeSet::new();
    let mut enter = |family: &str, current: &mut Option<String>| {
        if current.as_deref() != Some(family) {
            if let Some(prev) = current.take() {
                done.insert(prev);
            }
            assert!(
                !done.contains(family),
                "family {family} is split in two parts"
            );
            *current = Some(family.to_string());
        }
    };
    for line in text.lines() {
        assert!(!line.is_empty(), "an empty line in:\n{text}");
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect(line);
            assert!(valid_name(name), "{line}");
            assert!(!help.trim().is_empty(), "an empty HELP: {line}");
            assert!(helps.insert(name.to_string()), "HELP twice: {line}");
            enter(name, &mut current);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect(line);
            assert!(valid_name(name), "{line}");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            assert!(helps.contains(name), "TYPE before HELP: {line}");
            assert!(
                types.insert(name.to_string(), kind.to_string()).is_none(),
                "TYPE twice: {line}"
            );
            enter(name, &mut current);
            continue;
        }
        assert!(!line.starts_with('#'), "an unknown comment: {line}");
        let (series, value) = line.rsplit_once(' ').expect(line);
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("a value that is no number: {line}")),
        };
        assert!(value.is_finite() && value >= 0.0, "{line}");
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, parse_labels(l.strip_suffix('}').expect(line), line)),
            None => (series, Vec::new()),
        };
        assert!(valid_name(name), "{line}");
        let family = if types.contains_key(name) {
            name.to_string()
        } else {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or_else(|| panic!("a sample of no declared family: {line}"));
            assert_eq!(
                types.get(base).map(String::as_str),
                Some("histogram"),
                "{line}"
            );
            base.to_string()
        };
        assert_eq!(
            current.as_deref(),
            Some(family.as_str()),
            "a sample away from its family's TYPE: {line}"
        );
        if types[&family] == "histogram" {
            let without_le: Vec<(String, String)> =
                labels.iter().filter(|(k, _)| k != "le").cloned().collect();
            let id = key(&family, &without_le);
            if name.ends_with("_bucket") {
                let le = labels
                    .iter()
                    .find(|(k, _)| k == "le")
                    .map(|(_, v)| v.as_str())
                    .unwrap_or_else(|| panic!("a bucket without le: {line}"));
                let le: f64 = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().expect(line)
                };
                buckets.entry(id).or_default().push((le, value));
            } else if name.ends_with("_count") {
                counts.insert(id, value);
            } else {
                sums.insert(id);
            }
        }
        assert!(
            samples.insert(key(name, &labels), value).is_none(),
            "a sample twice: {line}"
        );
    }
    assert_eq!(helps.len(), types.len(), "every family has HELP and TYPE");
    for (id, bs) in &buckets {
        assert!(
            bs.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
            "{id}: buckets in order of le, cumulative: {bs:?}"
        );
        let last = bs.last().unwrap();
        assert!(last.0.is_infinite(), "{id}: the last bucket is +Inf");
        assert_eq!(
            counts.get(id),
            Some(&last.1),
            "{id}: _count = the +Inf bucket"
        );
        assert!(sums.contains(id), "{id}: has a _sum");
    }
    assert_eq!(
        counts.keys().collect::<Vec<_>>(),
        buckets.keys().collect::<Vec<_>>(),
        "a _count for every histogram series and no other"
    );
    Scrape {
        samples,
        types,
        text: text.to_string(),
    }
}

impl Scrape {
    /// The sample `name{labels}`, or `None` (a counter not yet counted is left out).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut l: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        l.sort();
        self.samples.get(&key(name, &l)).copied()
    }
    /// [`Scrape::get`], 0 when absent.
    fn n(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }
    /// Every `(operation, status)` of `bluebatch_http_requests_total` with its count.
    fn requests(&self) -> BTreeMap<(String, String), f64> {
        let prefix = "bluebatch_http_requests_total{";
        self.samples
            .iter()
            .filter_map(|(k, v)| {
                let inner = k.strip_prefix(prefix)?.strip_suffix('}')?;
                let l = parse_labels(inner, k);
                let get = |n: &str| l.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
                Some(((get("operation")?, get("status")?), *v))
            })
            .collect()
    }
}

/// GET /_bluebatch/metrics, checked: 200, the exposition media type, a valid text.
async fn scrape(url: &str) -> Scrape {
    let r = raw(url, "GET", "/_bluebatch/metrics").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert_eq!(
        r.header("content-length").and_then(|v| v.parse().ok()),
        Some(r.body.len())
    );
    parse_exposition(&r.body)
}

/// Scrapes until `ok` holds (at most [`T`]); the scrape that satisfied it.
async fn scrape_until(url: &str, what: &str, ok: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + T;
    loop {
        let s = scrape(url).await;
        if ok(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not so within {T:?}; last scrape:\n{}",
            s.text
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const REQS: &str = "bluebatch_http_requests_total";
const LATENCY: &str = "bluebatch_http_request_duration_seconds";
const OPEN: &str = "bluebatch_http_connections_open";
const SHED: &str = "bluebatch_http_connections_shed_total";
const SSH_CONNS: &str = "bluebatch_ssh_connections_open";
const SSH_SESSIONS: &str = "bluebatch_ssh_sessions_open";
const AGENTS_CONNECTED: &str = "bluebatch_agents_connected";
const AGENTS_KNOWN: &str = "bluebatch_agents_known";
const BATCH: &str = "bluebatch_store_commit_batch_size";
const COMMIT: &str = "bluebatch_store_commit_duration_seconds";
const LAG: &str = "bluebatch_node_apply_lag_seconds";

#[tokio::test]
async fn the_endpoint_speaks_the_exposition_format_without_credentials_and_names_nothing() {
    let _one_at_a_time = SERIAL.lock().await;
    let server = serve(&["--in-memory"]);
    let c = server.client();
    let nodes = c.ready_pool("quietpool", "linux", 1).await;
    add_user(
        &c,
        "quietpool",
        &nodes[0],
        json!({"name": "quietuser", "password": "Secret-Pa55word!"}),
    )
    .await;

    let s = scrape(&server.url).await;
    for (family, kind) in [
        (REQS, "counter"),
        (LATENCY, "histogram"),
        (OPEN, "gauge"),
        (SHED, "counter"),
        (BATCH, "histogram"),
        (COMMIT, "histogram"),
        (LAG, "histogram"),
        (SSH_SESSIONS, "gauge"),
        (SSH_CONNS, "gauge"),
        (AGENTS_CONNECTED, "gauge"),
        (AGENTS_KNOWN, "gauge"),
        ("bluebatch_build_info", "gauge"),
        ("process_cpu_seconds_total", "counter"),
        ("process_start_time_seconds", "gauge"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_virtual_memory_bytes", "gauge"),
        ("process_open_fds", "gauge"),
        ("process_max_fds", "gauge"),
    ] {
        assert_eq!(
            s.types.get(family).map(String::as_str),
            Some(kind),
            "{family}"
        );
    }
    assert_eq!(
        s.get(
            "bluebatch_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    // The serve started moments ago, holds descriptors (its listener, a node's, the scrape's)
    // and memory.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let started = s.n("process_start_time_seconds", &[]);
    assert!(
        started <= now + 1.0 && started > now - 600.0,
        "started {started}, now {now}"
    );
    assert!(s.n("process_open_fds", &[]) >= 3.0);
    assert!(s.n("process_max_fds", &[]) >= s.n("process_open_fds", &[]));
    assert!(s.n("process_resident_memory_bytes", &[]) > 1e6);
    // Counts only: no account, pool, node or user name, no secret.
    for word in [
        ACCOUNT,
        "quietpool",
        nodes[0].as_str(),
        "quietuser",
        "Secret-Pa55word!",
    ] {
        assert!(
            !s.text.contains(word),
            "{word:?} in the metrics:\n{}",
            s.text
        );
    }
    // A query string changes nothing; credentials are not asked for (a bad one is not looked at).
    let q = raw(&server.url, "GET", "/_bluebatch/metrics?name[]=x").await;
    assert_eq!(q.status, 200);
    parse_exposition(&q.body);

    // HEAD: the same head (its Content-Length that of a GET's text), no body.
    let h = raw(&server.url, "HEAD", "/_bluebatch/metrics").await;
    assert_eq!(h.status, 200);
    assert_eq!(
        h.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let len: usize = h.header("content-length").unwrap().parse().unwrap();
    assert!(len > 1000, "HEAD's Content-Length {len}");
    assert!(h.body.is_empty(), "HEAD has no body: {:?}", h.body);
    assert!(h.header("request-id").is_some());

    // Any other verb: 405 UnsupportedHttpVerb as a Batch error.
    for verb in ["POST", "PUT", "DELETE", "PATCH"] {
        let r = raw(&server.url, verb, "/_bluebatch/metrics").await;
        assert_eq!(r.status, 405, "{verb}: {}", r.body);
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["code"], "UnsupportedHttpVerb", "{verb}");
    }
    let after = scrape(&server.url).await;
    assert_eq!(
        after.n(REQS, &[("operation", "control"), ("status", "405")])
            - s.n(REQS, &[("operation", "control"), ("status", "405")]),
        4.0
    );
}

/// The exact expected deltas of `bluebatch_http_requests_total` between two scrapes.
type Expected = BTreeMap<(String, String), f64>;

fn expect(e: &mut Expected, op: &str, status: u16, n: f64) {
    *e.entry((op.to_string(), status.to_string())).or_default() += n;
}

#[tokio::test]
async fn requests_are_counted_by_operation_and_status_each_with_its_latency() {
    let _one_at_a_time = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let server = serve(&["--data-dir", dir.path().to_str().unwrap()]);
    let c = server.client();
    let nodes = c.ready_pool("p1", "linux", 1).await;
    let node = nodes[0].as_str();
    // Steady: no lifecycle write of the pool is left to land between the two scrapes.
    wait_steady(&c, "p1").await;
    let before = scrape(&server.url).await;

    let mut e = Expected::new();
    // The scrape above is counted once it is answered.
    expect(&mut e, "control", 200, 1.0);
    for _ in 0..3 {
        let r = c.req("GET", "/pools/p1").send_within(T).await;
        assert_eq!(r.status, 200);
    }
    expect(&mut e, "Pool_Get", 200, 3.0);
    for _ in 0..2 {
        let r = c.req("GET", "/pools/nopool").send_within(T).await;
        assert_eq!(r.status, 404);
    }
    expect(&mut e, "Pool_Get", 404, 2.0);
    let r = c.req("HEAD", "/pools/p1").send_within(T).await;
    assert_eq!(r.status, 200);
    expect(&mut e, "Pool_Exists", 200, 1.0);
    let r = c.req("HEAD", "/pools/nopool").send_within(T).await;
    assert_eq!(r.status, 404);
    expect(&mut e, "Pool_Exists", 404, 1.0);
    let r = c
        .req("GET", &format!("/pools/p1/nodes/{node}"))
        .send_within(T)
        .await;
    assert_eq!(r.status, 200);
    expect(&mut e, "ComputeNode_Get", 200, 1.0);
    add_user(
        &c,
        "p1",
        node,
        json!({"name": "alice", "sshPublicKey": KEY_LINE}),
    )
    .await;
    expect(&mut e, "ComputeNode_AddUser", 201, 1.0);
    let user = Client::user_path("p1", node, "alice");
    for _ in 0..2 {
        let r = c
            .req("PUT", &user)
            .json(&json!({"sshPublicKey": KEY_LINE}))
            .send_within(T)
            .await;
        assert_eq!(r.status, 200, "{}", text(&r));
    }
    expect(&mut e, "ComputeNode_UpdateUser", 200, 2.0);
    let r = c
        .req("PUT", &Client::user_path("p1", node, "ghost"))
        .json(&json!({"sshPublicKey": KEY_LINE}))
        .send_within(T)
        .await;
    assert_eq!(r.status, 404, "{}", text(&r));
    expect(&mut e, "ComputeNode_UpdateUser", 404, 1.0);
    let r = c.req("DELETE", &user).send_within(T).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    expect(&mut e, "ComputeNode_DeleteUser", 200, 1.0);
    // Refused before an operation is known: no credentials, a path no operation has.
    let r = c.req("GET", "/pools").unsigned().send_within(T).await;
    assert_eq!(r.status, 401);
    expect(&mut e, "unrouted", 401, 1.0);
    let r = c.req("GET", "/no/such/thing").send_within(T).await;
    expect(&mut e, "unrouted", r.status, 1.0);
    // The emulator's own endpoints.
    for _ in 0..2 {
        assert_eq!(
            raw(&server.url, "GET", "/_bluebatch/health").await.status,
            200
        );
    }
    expect(&mut e, "control", 200, 2.0);
    assert_eq!(
        raw(&server.url, "POST", "/_bluebatch/health").await.status,
        405
    );
    expect(&mut e, "control", 405, 1.0);

    let after = scrape(&server.url).await;
    let (b, a) = (before.requests(), after.requests());
    let keys: BTreeSet<&(String, String)> = b.keys().chain(a.keys()).collect();
    let mut got = Expected::new();
    for k in keys {
        let d = a.get(k).unwrap_or(&0.0) - b.get(k).unwrap_or(&0.0);
        if d != 0.0 {
            got.insert(k.clone(), d);
        }
    }
    assert_eq!(got, e, "request counts moved by exactly the requests made");
    // One latency observation per request, under the same operation label.
    let mut per_op: BTreeMap<&str, f64> = BTreeMap::new();
    for ((op, _), n) in &e {
        *per_op.entry(op).or_default() += n;
    }
    for (op, n) in per_op {
        let l = [("operation", op)];
        let count = |s: &Scrape| s.n(&format!("{LATENCY}_count"), &l);
        assert_eq!(count(&after) - count(&before), n, "{op}: latency count");
        let sum = |s: &Scrape| s.n(&format!("{LATENCY}_sum"), &l);
        assert!(sum(&after) > sum(&before), "{op}: latency sum grew");
        // A request of this test took well under 10 s: it is under the le="10" bucket.
        let under = |s: &Scrape| s.n(&format!("{LATENCY}_bucket"), &[l[0], ("le", "10")]);
        assert_eq!(under(&after) - under(&before), n, "{op}: bucket le=10");
    }

    // The durable writes (Add, Update ×2, Delete User), made one after the other, were each
    // committed on their own: four commits of one write, each with its duration.
    let d = |name: &str, l: &[(&str, &str)]| after.n(name, l) - before.n(name, l);
    let commits = d(&format!("{BATCH}_count"), &[]);
    assert_eq!(commits, 4.0, "commits:\n{}", after.text);
    assert_eq!(d(&format!("{BATCH}_sum"), &[]), 4.0, "writes committed");
    assert_eq!(
        d(&format!("{BATCH}_bucket"), &[("le", "1")]),
        4.0,
        "batches of 1"
    );
    assert_eq!(d(&format!("{COMMIT}_count"), &[]), commits);
    // Each of the four user writes was applied on the embedded node.
    let lag = d(&format!("{LAG}_count"), &[("kind", "embedded")]);
    assert_eq!(lag, 4.0, "embedded applies: {lag}\n{}", after.text);
    assert_eq!(d(&format!("{LAG}_count"), &[("kind", "agent")]), 0.0);
}

/// A connection opened and held: one request answered on it, then kept idle (keep-alive).
async fn held_connection(url: &str) -> tokio::net::TcpStream {
    let addr = addr_of(url);
    within(T, "a keep-alive request", async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET /_bluebatch/health HTTP/1.1\r\nHost: {addr}\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        read_one_answer(&mut s).await;
        s
    })
    .await
}

/// Reads one answer (with a Content-Length body) off `s`, leaving the connection open.
async fn read_one_answer(s: &mut tokio::net::TcpStream) -> Raw {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the connection closed before its answer");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let r = parse_raw(&buf[..at + 4]);
            let len: usize = r
                .header("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if buf.len() >= at + 4 + len {
                return parse_raw(&buf);
            }
        }
    }
}

#[tokio::test]
async fn connection_and_ssh_gauges_follow_held_connections_and_a_real_openssh_session() {
    let _one_at_a_time = SERIAL.lock().await;
    if !have_ssh_client() {
        return;
    }
    let server = serve(&["--in-memory"]);
    let url = server.url.clone();
    let c = server.client();
    let nodes = c.ready_pool("g1", "linux", 1).await;
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keypair(dir.path(), "id_metrics");
    add_user(
        &c,
        "g1",
        &nodes[0],
        json!({"name": "gauge", "sshPublicKey": public}),
    )
    .await;
    let port = c.ssh_port("g1", &nodes[0]).await;
    // The client's pooled keep-alive connections close with it.
    drop(c);

    // Only the scrape's own connection is open.
    let open_is = |n: f64| move |s: &Scrape| s.n(OPEN, &[]) == n;
    scrape_until(&url, "only the scrape open", open_is(1.0)).await;
    let first = held_connection(&url).await;
    scrape_until(&url, "one connection held", open_is(2.0)).await;
    let second = held_connection(&url).await;
    scrape_until(&url, "two connections held", open_is(3.0)).await;
    drop(first);
    scrape_until(&url, "one closed", open_is(2.0)).await;
    drop(second);
    scrape_until(&url, "both closed", open_is(1.0)).await;

    // SSH: nothing open; a TCP connection that has not logged in is a connection, not a session.
    let ssh_is = |conns: f64, sessions: f64| {
        move |s: &Scrape| s.n(SSH_CONNS, &[]) == conns && s.n(SSH_SESSIONS, &[]) == sessions
    };
    scrape_until(&url, "no SSH connection", ssh_is(0.0, 0.0)).await;
    let mut pending = within(T, "an SSH banner", async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let mut banner = [0u8; 64];
        let n = s.read(&mut banner).await.unwrap();
        assert!(banner[..n].starts_with(b"SSH-2.0-"), "an SSH banner");
        s
    })
    .await;
    scrape_until(&url, "one SSH startup", ssh_is(1.0, 0.0)).await;
    // A real OpenSSH login held open (no command: -N), then ended.
    // ssh itself is the child (killed below, or when the test fails), not a wrapper.
    let mut ssh = Killed(
        Command::new("ssh")
            .arg("-N")
            .args(ssh_opts(port, "publickey"))
            .args(["-o", "IdentitiesOnly=yes", "-i"])
            .arg(&key)
            .arg("gauge@127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("running ssh"),
    );
    scrape_until(&url, "one SSH session logged in", ssh_is(2.0, 1.0)).await;
    assert!(
        ssh.0.try_wait().unwrap().is_none(),
        "ssh -N stays connected"
    );
    ssh.kill();
    scrape_until(&url, "the session ended", ssh_is(1.0, 0.0)).await;
    let _ = pending.shutdown().await;
    drop(pending);
    scrape_until(&url, "no SSH connection left", ssh_is(0.0, 0.0)).await;
}

/// A child process killed (SIGKILL) and reaped when dropped.
struct Killed(Child);

impl Killed {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A connection from the loopback address `source` (127.x.y.z) to `url`.
async fn connect_from(url: &str, source: &str) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    within(T, "a connection", socket.connect(addr_of(url)))
        .await
        .unwrap()
}

/// Whether the server closes `s` (EOF or reset) within `limit` without it sending anything.
async fn closed_within(s: &mut tokio::net::TcpStream, limit: Duration) -> bool {
    let mut b = [0u8; 256];
    match tokio::time::timeout(limit, s.read(&mut b)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) => panic!("the server sent something on a connection it should close"),
        Err(_) => false,
    }
}

#[tokio::test]
async fn shed_connections_are_counted_by_reason() {
    let _one_at_a_time = SERIAL.lock().await;
    let server = serve(&[
        "--in-memory",
        "--http-head-timeout",
        "1s",
        "--max-connections-per-source",
        "2",
    ]);
    let url = server.url.clone();
    let before = scrape(&url).await;
    let shed = |s: &Scrape, reason: &str| s.n(SHED, &[("reason", reason)]);
    for reason in [
        "head_timeout",
        "idle_timeout",
        "stalled",
        "evicted",
        "refused_per_source",
    ] {
        assert!(
            before.get(SHED, &[("reason", reason)]).is_some(),
            "{reason}"
        );
    }
    // A connection that never sends a head is closed at the head timeout.
    let mut silent = connect_from(&url, "127.0.0.2").await;
    assert!(
        closed_within(&mut silent, Duration::from_secs(10)).await,
        "closed at the head timeout"
    );
    // A source holding its two connections has a third closed at once.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = connect_from(&url, "127.0.0.3").await;
        let req = "GET /_bluebatch/health HTTP/1.1\r\nHost: x\r\n\r\n";
        s.write_all(req.as_bytes()).await.unwrap();
        within(T, "an answer", read_one_answer(&mut s)).await;
        held.push(s);
    }
    let mut third = connect_from(&url, "127.0.0.3").await;
    assert!(
        closed_within(&mut third, Duration::from_secs(10)).await,
        "the third connection refused"
    );
    // The held ones (idle, within their idle timeout) stay open: 2 + the scrape's.
    let after = scrape_until(&url, "both counted, the held two open", |s| {
        shed(s, "head_timeout") - shed(&before, "head_timeout") == 1.0
            && shed(s, "refused_per_source") - shed(&before, "refused_per_source") == 1.0
            && s.n(OPEN, &[]) == 3.0
    })
    .await;
    for reason in ["idle_timeout", "stalled", "evicted"] {
        assert_eq!(shed(&after, reason), shed(&before, reason), "{reason}");
    }
    drop(held);
}

/// A join token of the dev account made with the CLI, saved (0600) as an agent's token file.
async fn token_file(url: &str, dir: &Path, name: &str) -> std::path::PathBuf {
    let out = bluebatch_cli(&["join-token", "create", "--url", url], &[]).await;
    assert!(
        out.status.success(),
        "join-token create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = dir.join(name);
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .unwrap()
        .write_all(&out.stdout)
        .unwrap();
    path
}

/// `bluebatch agent --simulate 2` joined with `token`; killed (SIGKILL) when dropped.
struct Agent(Child);

impl Agent {
    fn start(url: &str, state: &Path, token: &Path, ports: &str) -> Agent {
        let mut child = Command::new(env!("CARGO_BIN_EXE_bluebatch"))
            .args(["agent", "--server", url, "--simulate", "2"])
            .args(["--ssh-ports", ports])
            .arg("--state-dir")
            .arg(state)
            .arg("--join-token-file")
            .arg(token)
            .env("BLUEBATCH_LOG", "warn")
            .env_remove("BLUEBATCH_JOIN_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting bluebatch agent");
        agents::agent_log(&mut child);
        Agent(child)
    }
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test]
async fn agents_connected_and_known_follow_simulated_agents_joining_dying_and_revoked() {
    let _one_at_a_time = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = serve(&[
        "--nodes",
        "agents",
        "--agent-grace",
        "2s",
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    let url = server.url.clone();
    let c = server.client();
    let agents_are = |connected: f64, known: f64| {
        move |s: &Scrape| s.n(AGENTS_CONNECTED, &[]) == connected && s.n(AGENTS_KNOWN, &[]) == known
    };
    scrape_until(&url, "no agent", agents_are(0.0, 0.0)).await;

    let (sa, sb) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&sa).unwrap();
    std::fs::create_dir_all(&sb).unwrap();
    let ta = token_file(&url, dir.path(), "token-a").await;
    let tb = token_file(&url, dir.path(), "token-b").await;
    let _a = Agent::start(&url, &sa, &ta, "25410-25419");
    let mut b = Agent::start(&url, &sb, &tb, "25420-25429");
    let joined = scrape_until(&url, "two agents connected", agents_are(2.0, 2.0)).await;
    assert!(
        joined.n(REQS, &[("operation", "agent"), ("status", "200")]) >= 2.0,
        "the agents' join and polls are counted under agent:\n{}",
        joined.text
    );

    // A user change on an agent node is acknowledged by its agent: one agent apply observed.
    let r = c
        .req("POST", "/pools")
        .json(&pool_body("ap", 2))
        .send_within(T)
        .await;
    assert_eq!(r.status, 201, "{}", text(&r));
    let nodes = agents::wait_nodes(&c, "ap", 2).await;
    let node = nodes[0]["id"].as_str().unwrap().to_string();
    wait_steady(&c, "ap").await;
    let before = scrape(&url).await;
    add_user(
        &c,
        "ap",
        &node,
        json!({"name": "viaagent", "sshPublicKey": KEY_LINE}),
    )
    .await;
    let after = scrape(&url).await;
    let lag = |s: &Scrape| s.n(&format!("{LAG}_count"), &[("kind", "agent")]);
    assert_eq!(
        lag(&after) - lag(&before),
        1.0,
        "one agent apply observed:\n{}",
        after.text
    );
    let embedded = |s: &Scrape| s.n(&format!("{LAG}_count"), &[("kind", "embedded")]);
    assert_eq!(embedded(&after), 0.0, "no embedded node here");

    // One agent killed: still known, no longer connected once its grace is over.
    b.kill();
    scrape_until(&url, "one agent gone silent", agents_are(1.0, 2.0)).await;
    // Revoked: no longer known either.
    let hosts = c.control("GET", "/hosts").send_within(T).await;
    assert_eq!(hosts.status, 200, "{}", text(&hosts));
    let silent: Vec<String> = hosts.json()["value"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["connected"] == false)
        .map(|h| h["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(silent.len(), 1, "{}", text(&hosts));
    let r = c
        .control("POST", &format!("/hosts/{}/revoke", silent[0]))
        .send_within(T)
        .await;
    assert_eq!(r.status, 200, "{}", text(&r));
    scrape_until(&url, "the revoked agent forgotten", agents_are(1.0, 1.0)).await;
}

#[tokio::test]
async fn the_https_listener_serves_the_same_figures() {
    let _one_at_a_time = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let tls = Server::start_tls(&["--data-dir", dir.path().to_str().unwrap()]);
    let ca = tls.ca.clone().expect("the generated CA");
    let c = Client::with_ca(&tls.https, ACCOUNT, KEY, &ca);
    let r = c.control("GET", "/metrics").unsigned().send_within(T).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let s = parse_exposition(&text(&r));
    // The first request of this serve: nothing counted yet, this very connection open.
    assert_eq!(s.requests(), BTreeMap::new(), "{}", s.text);
    assert_eq!(s.n(OPEN, &[]), 1.0, "{}", s.text);
    // The HTTPS scrape is counted like any: the next one (over plain HTTP) shows it, and the
    // HTTPS connection the client keeps alive beside its own.
    let next = scrape(&tls.server.url).await;
    let one = BTreeMap::from([(("control".to_string(), "200".to_string()), 1.0)]);
    assert_eq!(next.requests(), one, "{}", next.text);
    assert_eq!(next.n(OPEN, &[]), 2.0, "{}", next.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_replicas_each_count_their_own_requests_and_commits_and_both_know_the_agent() {
    let _one_at_a_time = SERIAL.lock().await;
    let Some(rs) = replicas::Replicas::start(2) else {
        return;
    };
    let (a, b) = (rs.url(0).to_string(), rs.url(1).to_string());
    // The agent joins through A and polls B.
    let (_dir, _agent) = rs.agent(0, 1, 2, "25440-25449").await;
    for url in [&a, &b] {
        scrape_until(url, "the agent known and connected", |s| {
            s.n(AGENTS_KNOWN, &[]) == 1.0 && s.n(AGENTS_CONNECTED, &[]) == 1.0
        })
        .await;
    }
    replicas::add_pool(rs.at(0), "pgm", 2).await;
    let nodes = replicas::steady_nodes(rs.at(0), "pgm", 2, Duration::from_secs(40)).await;
    let (a0, b0) = (scrape(&a).await, scrape(&b).await);
    let r = rs
        .at(0)
        .req("POST", &format!("/pools/pgm/nodes/{}/users", nodes[0]))
        .json(&json!({"name": "pguser", "sshPublicKey": KEY_LINE}))
        .send_within(T)
        .await;
    assert_eq!(r.status, 201, "{}", text(&r));
    let commits = |s: &Scrape| s.n(&format!("{BATCH}_count"), &[]);
    let a1 = scrape(&a).await;
    // The write answers at the acknowledgement; its record's commit on B follows.
    let b1 = scrape_until(&b, "B to commit the agent's acknowledgement", |s| {
        commits(s) > commits(&b0)
    })
    .await;
    let add = [("operation", "ComputeNode_AddUser"), ("status", "201")];
    assert_eq!(a1.n(REQS, &add) - a0.n(REQS, &add), 1.0, "{}", a1.text);
    assert_eq!(b1.n(REQS, &add) - b0.n(REQS, &add), 0.0, "{}", b1.text);
    // A committed the user; B committed the agent's acknowledgement (the agent polls B).
    let writes = |s: &Scrape| s.n(&format!("{BATCH}_sum"), &[]);
    for (name, before, after) in [("A", &a0, &a1), ("B", &b0, &b1)] {
        assert!(
            commits(after) - commits(before) >= 1.0,
            "{name} committed:\n{}",
            after.text
        );
        assert!(writes(after) - writes(before) >= 1.0, "{name}");
        let durations = |s: &Scrape| s.n(&format!("{COMMIT}_count"), &[]);
        assert_eq!(
            durations(after) - durations(before),
            commits(after) - commits(before),
            "{name}: one duration per commit"
        );
    }
    // The wait for the agent's acknowledgement is observed where the write was taken.
    let lag = |s: &Scrape| s.n(&format!("{LAG}_count"), &[("kind", "agent")]);
    assert_eq!(lag(&a1) - lag(&a0), 1.0, "{}", a1.text);
    assert_eq!(lag(&b1) - lag(&b0), 0.0, "{}", b1.text);
    // Both still know the one agent, connected.
    for s in [&a1, &b1] {
        assert_eq!(s.n(AGENTS_KNOWN, &[]), 1.0, "{}", s.text);
        assert_eq!(s.n(AGENTS_CONNECTED, &[]), 1.0, "{}", s.text);
    }

    // The database refusing every connection: readiness says 503, the scrape still answers
    // (it never waits on the store).
    let db = &rs.db;
    replicas::psql(
        &db.base,
        &format!("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false", db.name),
    );
    replicas::psql(
        &db.base,
        &format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = '{}'",
            db.name
        ),
    );
    within(T, "A's readiness to say the store is gone", async {
        while raw(&a, "GET", "/_bluebatch/ready").await.status != 503 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let down = scrape(&a).await;
    assert_eq!(down.n(AGENTS_KNOWN, &[]), 1.0, "{}", down.text);
    assert!(
        down.n(REQS, &[("operation", "control"), ("status", "503")]) >= 1.0,
        "the 503 readiness answers are counted:\n{}",
        down.text
    );
    replicas::psql(
        &db.base,
        &format!("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true", db.name),
    );
}
