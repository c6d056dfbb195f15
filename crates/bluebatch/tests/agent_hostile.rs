//! The hostile client: the agent endpoints and the operator's join-token and host controls of the
//! real binary (`serve --nodes agents`), fed what a broken or malicious agent or operator script
//! sends — malformed, wrong-typed and unknown-field JSON, huge bodies, 100,000 reserved names,
//! addresses that are not IPs, absurd slots, revisions and ports, duplicate and foreign keys,
//! tampered credentials, garbage poll queries, racing joins, another account's Shared Key, absurd
//! token lifetimes and pool scopes. Every answer must be a Batch error JSON with a 4xx status and
//! the documented code (never a 5xx, never a panic in the server's stderr), and a refused request
//! leaves the tokens and hosts as they were.

mod common;

use common::agents::{create_token, report, token, wait_nodes};
use common::{Client, KEY, Resp, raw_request, respond, text, within};
use serde_json::{Value, json};
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);
/// A second account (Shared Key), for the cross-account cases.
const OTHER: &str = "otheraccount";
const OTHER_KEY: &str = "b3RoZXJhY2NvdW50LWtleS1mb3ItdGhlLWhvc3RpbGUtdGVzdHMtMDEyMzQ1Njc4OQ==";

/// `bluebatch serve --nodes agents` (two accounts) whose stderr goes to a file, so that a test
/// can tell whether any request made the server panic.
struct Hostile {
    child: Child,
    url: String,
    stderr: tempfile::NamedTempFile,
}

impl Hostile {
    fn launch() -> Self {
        Self::launch_with(&[])
    }

    fn launch_with(extra: &[&str]) -> Self {
        let stderr = tempfile::NamedTempFile::new().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_bluebatch"))
            .args([
                "serve",
                "--port",
                "0",
                "--node-step-ms",
                "20",
                "--in-memory",
                "--nodes",
                "agents",
            ])
            .args(extra)
            .env("BLUEBATCH_LOG", "warn")
            .env("BLUEBATCH_ACCOUNTS", format!("{OTHER}:{OTHER_KEY}"))
            .env_remove("BLUEBATCH_ACCOUNTS_FILE")
            .stdout(Stdio::piped())
            .stderr(stderr.reopen().unwrap())
            .spawn()
            .expect("starting bluebatch");
        let url = common::listening_url_within(&mut child, T);
        Hostile { child, url, stderr }
    }

    fn client(&self) -> Client {
        Client::new(&self.url, common::ACCOUNT, KEY)
    }

    fn other(&self) -> Client {
        Client::new(&self.url, OTHER, OTHER_KEY)
    }

    /// Fails the test if the server panicked (or is gone) at any point so far.
    fn assert_no_panic(&mut self) {
        let mut log = String::new();
        self.stderr
            .reopen()
            .unwrap()
            .read_to_string(&mut log)
            .unwrap();
        assert!(
            !log.contains("panicked"),
            "the server panicked:\n{}",
            log.chars().take(4000).collect::<String>()
        );
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "the server exited:\n{log}"
        );
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(T).build().unwrap()
}

/// POST an agent path with `body` as is and `authorization` when given.
async fn agent_post(base: &str, path: &str, auth: Option<&str>, body: Vec<u8>) -> Resp {
    let mut rb = http()
        .post(format!("{base}/_bluebatch/agent/{path}"))
        .header("content-type", "application/json")
        .body(body);
    if let Some(a) = auth {
        rb = rb.header("authorization", a);
    }
    respond(rb.send().await.expect("agent post: no answer")).await
}

async fn join_raw(base: &str, body: &[u8]) -> Resp {
    agent_post(base, "join", None, body.to_vec()).await
}

async fn join(base: &str, token: &str, host: Value) -> Resp {
    join_raw(
        base,
        json!({"token": token, "host": host}).to_string().as_bytes(),
    )
    .await
}

/// Joins; panics unless 200; (host id, `BluebatchNode CREDENTIAL`).
async fn joined(base: &str, token: &str, host: Value) -> (String, String) {
    let r = join(base, token, host).await;
    assert_eq!(r.status, 200, "join: {}", text(&r));
    let v = r.json();
    (
        v["hostId"].as_str().unwrap().to_string(),
        format!("BluebatchNode {}", v["credential"].as_str().unwrap()),
    )
}

async fn desired(base: &str, auth: &str, query: &str) -> Resp {
    let r = http()
        .get(format!("{base}/_bluebatch/agent/desired?{query}"))
        .header("authorization", auth)
        .send()
        .await
        .expect("desired: no answer");
    respond(r).await
}

/// A Batch error: this status and code, the JSON shape every Batch error has.
fn assert_error(r: &Resp, status: u16, code: &str, what: &str) {
    assert_eq!(r.status, status, "{what}: {}", text(r));
    let v = r.json();
    assert_eq!(v["code"], code, "{what}: {v}");
    assert!(
        v["message"]["value"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{what}: a Batch error has message.value: {v}"
    );
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{what}: {:?}",
        r.header("content-type")
    );
}

/// The tokens and hosts of the account, without what moves by itself (last poll, connected).
async fn state(c: &Client) -> (Value, Value) {
    let tokens = c.control("GET", "/join-tokens").send_within(T).await;
    assert_eq!(tokens.status, 200, "{}", text(&tokens));
    let hosts = c.control("GET", "/hosts").send_within(T).await;
    assert_eq!(hosts.status, 200, "{}", text(&hosts));
    let mut hosts = hosts.json();
    for h in hosts["value"].as_array_mut().unwrap() {
        let h = h.as_object_mut().unwrap();
        h.remove("lastSeen");
        h.remove("connected");
    }
    let mut tokens = tokens.json();
    tokens["value"]
        .as_array_mut()
        .unwrap()
        .sort_by_key(|t| t["id"].as_str().unwrap_or_default().to_string());
    (tokens, hosts)
}

/// The node's applied revision, from the node users control endpoint.
async fn applied(c: &Client, pool: &str, node: &str) -> Value {
    let r = c
        .control("GET", &format!("/pools/{pool}/nodes/{node}/users"))
        .send_within(T)
        .await;
    assert_eq!(r.status, 200, "{}", text(&r));
    r.json()["appliedRevision"].clone()
}

#[tokio::test]
async fn join_refuses_hostile_bodies_with_400_and_leaves_the_token_unused() {
    let mut s = Hostile::launch();
    let c = s.client();
    let tok = token(&c, None).await;
    let host = report("h", 1);
    let before = state(&c).await;

    // Not the shape of a JoinRequest: 400 InvalidRequestBody, serde's reason.
    let mut deep = "[".repeat(100_000);
    deep.push_str(&"]".repeat(100_000));
    let with_host = |field: &str, v: Value| {
        let mut h = host.clone();
        h[field] = v;
        json!({"token": tok, "host": h}).to_string()
    };
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("array", b"[]".to_vec()),
        ("null", b"null".to_vec()),
        ("number", b"42".to_vec()),
        ("string", b"\"token\"".to_vec()),
        ("nested 100k deep", deep.into_bytes()),
        (
            "token null",
            json!({"token": null, "host": host}).to_string().into(),
        ),
        (
            "host null",
            json!({"token": tok, "host": null}).to_string().into(),
        ),
        (
            "unknown top field",
            json!({"token": tok, "host": host, "admin": true})
                .to_string()
                .into(),
        ),
        ("unknown host field", with_host("root", json!(true)).into()),
        ("slots negative", with_host("slots", json!(-1)).into()),
        ("slots fraction", with_host("slots", json!(1.5)).into()),
        ("slots string", with_host("slots", json!("1")).into()),
        (
            "slots beyond u32",
            with_host("slots", json!(4_294_967_296u64)).into(),
        ),
        ("slots 1e3", with_host("slots", json!(1e3)).into()),
        (
            "provider case",
            with_host("provider", json!("Simulate")).into(),
        ),
        (
            "provider unknown",
            with_host("provider", json!("windows")).into(),
        ),
        ("hostname number", with_host("hostname", json!(5)).into()),
        (
            "reservedNames string",
            with_host("reservedNames", json!("root")).into(),
        ),
        (
            "reservedNames numbers",
            with_host("reservedNames", json!([1, 2])).into(),
        ),
        (
            "sshPort beyond u16",
            with_host("sshPort", json!(70_000)).into(),
        ),
        ("sshPort negative", with_host("sshPort", json!(-22)).into()),
        (
            "address number",
            with_host("address", json!(2130706433)).into(),
        ),
        (
            "duplicate field",
            format!(r#"{{"token":"{tok}","token":"{tok}","host":{host}}}"#).into(),
        ),
        (
            "trailing garbage",
            format!("{} x", json!({"token": tok, "host": host})).into(),
        ),
        (
            "two documents",
            format!("{0}{0}", json!({"token": tok, "host": host})).into(),
        ),
        (
            "invalid UTF-8 in a string",
            [
                br#"{"token":""#.as_slice(),
                b"\xff\xfe",
                format!(r#"","host":{host}}}"#).as_bytes(),
            ]
            .concat(),
        ),
        (
            "a lone surrogate",
            format!(r#"{{"token":"\ud800","host":{host}}}"#).into(),
        ),
        (
            "a byte order mark",
            [
                b"\xef\xbb\xbf".as_slice(),
                json!({"token": tok, "host": host}).to_string().as_bytes(),
            ]
            .concat(),
        ),
        ("NUL bytes", vec![0u8; 64]),
        ("whitespace only", b"   \n".to_vec()),
    ];
    for (what, body) in &bodies {
        let r = join_raw(&s.url, body).await;
        assert_error(&r, 400, "InvalidRequestBody", what);
    }

    // Well-formed, but what no host is: 400 InvalidPropertyValue naming the property.
    let cases: Vec<(&str, &str, Value)> = vec![
        ("slots", "host.slots", json!(0)),
        ("slots", "host.slots", json!(u32::MAX)),
        ("slots", "host.slots", json!(10_001)),
        ("hostname", "host.hostname", json!("h".repeat(256))),
        ("hostname", "host.hostname", json!("\u{1b}]0;pwned\u{7}")),
        ("hostname", "host.hostname", json!("two\nlines")),
        ("version", "host.version", json!("v\u{1b}[2J")),
        ("sshPort", "host.sshPort", json!(0)),
    ];
    for (field, property, v) in cases {
        let r = join_raw(&s.url, with_host(field, v.clone()).as_bytes()).await;
        let what = format!("{field} = {v}");
        assert_error(&r, 400, "InvalidPropertyValue", &what);
        assert!(text(&r).contains(property), "{what}: {}", text(&r));
    }
    let mut linux = report("h", 2);
    linux["provider"] = json!("linux");
    let r = join(&s.url, &tok, linux).await;
    assert_error(&r, 400, "InvalidPropertyValue", "linux with 2 slots");

    // Addresses that are not IPs, or not one a client can reach: a clear 400 naming it.
    for address in [
        "",
        "localhost",
        "node1.example.com",
        "1.2.3",
        "1.2.3.4.5",
        "256.0.0.1",
        "01.2.3.4",
        "1.2.3.4:22",
        "[::1]",
        "[::1]:22",
        "fe80::1%eth0",
        " 127.0.0.1",
        "127.0.0.1\n",
        "127.0.0.1/32",
        "0x7f000001",
        "١٢٧.0.0.1",
        "0.0.0.0",
        "::",
        "224.0.0.1",
        "ff02::1",
        "255.255.255.255",
    ] {
        let mut h = host.clone();
        h["address"] = json!(address);
        let r = join(&s.url, &tok, h).await;
        let what = format!("address {address:?}");
        assert_error(&r, 400, "InvalidPropertyValue", &what);
        let v = r.json();
        assert!(
            v.to_string().contains("host.address"),
            "{what}: names the property: {v}"
        );
    }

    // Bodies beyond --max-body-bytes (1 MiB): 413, declared or streamed.
    let big = json!({"token": tok, "host": host, "pad": "x".repeat(2 << 20)}).to_string();
    let r = join_raw(&s.url, big.as_bytes()).await;
    assert_error(&r, 413, "RequestBodyTooLarge", "2 MiB body");
    let host_port = s.url.trim_start_matches("http://").to_string();
    let mut chunked = format!(
        "POST /_bluebatch/agent/join HTTP/1.1\r\nHost: {host_port}\r\nContent-Type: \
         application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    for chunk in big.as_bytes().chunks(64 * 1024) {
        chunked.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        chunked.extend_from_slice(chunk);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let r = within(T, "a chunked 2 MiB body", raw_request(&s.url, &chunked))
        .await
        .expect("an answer to a chunked 2 MiB body");
    assert_error(&r, 413, "RequestBodyTooLarge", "2 MiB chunked body");
    let lie = format!(
        "POST /_bluebatch/agent/join HTTP/1.1\r\nHost: {host_port}\r\nContent-Type: \
         application/json\r\nContent-Length: 1000000000000\r\nConnection: close\r\n\r\n{{}}"
    );
    let r = within(
        T,
        "a declared 1 TB body",
        raw_request(&s.url, lie.as_bytes()),
    )
    .await
    .expect("an answer to a declared 1 TB body");
    assert_error(&r, 413, "RequestBodyTooLarge", "Content-Length of 1 TB");

    // None of it left a trace: the token is unused, no host joined.
    assert_eq!(state(&c).await, before);
    // The token still joins (with an IPv6 and a mapped address being fine too).
    let mut h6 = host.clone();
    h6["address"] = json!("::ffff:198.18.0.5");
    let r = join(&s.url, &tok, h6).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    s.assert_no_panic();
}

#[tokio::test]
async fn a_hundred_thousand_reserved_names_join_and_are_refused_through_the_api() {
    let mut s = Hostile::launch();
    let c = s.client();
    // 100,000 short names fit in a join (1 MiB); each is then refused by Add User.
    let names: Vec<String> = (0..100_000).map(|i| format!("u{i:05}")).collect();
    let mut h = report("many", 1);
    h["reservedNames"] = json!(names);
    let started = Instant::now();
    let (_, auth) = joined(&s.url, &token(&c, None).await, h.clone()).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "join took {:?}",
        started.elapsed()
    );
    // One more is refused (at hello, where the body may be larger than at join).
    let mut more = h.clone();
    let mut names_plus = names.clone();
    names_plus.push("extra".into());
    more["reservedNames"] = json!(names_plus);
    let r = agent_post(&s.url, "hello", Some(&auth), more.to_string().into_bytes()).await;
    assert_error(&r, 400, "InvalidPropertyValue", "100,001 reserved names");
    // A name longer than any passwd name.
    let mut long = h.clone();
    long["reservedNames"] = json!(["x".repeat(257)]);
    let r = agent_post(&s.url, "hello", Some(&auth), long.to_string().into_bytes()).await;
    assert_error(&r, 400, "InvalidPropertyValue", "a 257-byte reserved name");
    // 100,000 longer names (1.6 MB): beyond the join's limit, fine at hello.
    let names: Vec<String> = (0..100_000).map(|i| format!("user{i:06}x")).collect();
    let mut h2 = h.clone();
    h2["reservedNames"] = json!(names);
    let r = agent_post(&s.url, "hello", Some(&auth), h2.to_string().into_bytes()).await;
    assert_eq!(r.status, 200, "{}", text(&r));

    let r = c.create_pool("p", "linux", 1).await;
    assert_eq!(r.status, 201, "{}", text(&r));
    let node = wait_nodes(&c, "p", 1).await[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    for name in ["user099999x", "user000000x"] {
        let started = Instant::now();
        let r = c
            .req("POST", &format!("/pools/p/nodes/{node}/users"))
            .json(&json!({"name": name, "password": "Secret-123456"}))
            .send_within(T)
            .await;
        assert_error(&r, 400, "InvalidPropertyValue", name);
        assert!(text(&r).contains("reserved on this node"), "{}", text(&r));
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    // The earlier report was replaced: its names are free again (the write waits for the
    // agent, which never acknowledges here: a short timeout answers OperationTimedOut).
    let r = c
        .req("POST", &format!("/pools/p/nodes/{node}/users"))
        .query(&format!("api-version={}&timeout=1", common::V))
        .json(&json!({"name": "u00001", "password": "Secret-123456"}))
        .send_within(T)
        .await;
    assert_ne!(r.code(), "InvalidPropertyValue", "{}", text(&r));
    s.assert_no_panic();
}

#[tokio::test]
async fn tampered_credentials_are_refused_and_the_real_one_keeps_working() {
    let mut s = Hostile::launch();
    let c = s.client();
    let (host_a, auth_a) = joined(&s.url, &token(&c, None).await, report("a", 1)).await;
    let (host_b, auth_b) = joined(&s.url, &token(&c, None).await, report("b", 1)).await;
    let cred_a = auth_a.strip_prefix("BluebatchNode ").unwrap().to_string();
    let cred_b = auth_b.strip_prefix("BluebatchNode ").unwrap().to_string();
    let parts: Vec<&str> = cred_a.split('.').collect();
    assert_eq!(parts.len(), 3, "HOST.EXPIRES.SIGNATURE: {cred_a}");
    let (host, exp, sig) = (parts[0], parts[1], parts[2]);
    assert_eq!(host, host_a);
    let sig_b = cred_b.split('.').nth(2).unwrap();

    let mut forged: Vec<(String, String)> = Vec::new();
    // Every position of the signature changed to another hex digit.
    for i in 0..sig.len() {
        let mut b = sig.as_bytes().to_vec();
        b[i] = if b[i] == b'0' { b'1' } else { b'0' };
        let s2 = String::from_utf8(b).unwrap();
        forged.push((format!("signature digit {i}"), format!("{host}.{exp}.{s2}")));
    }
    let far: i64 = exp.parse::<i64>().unwrap() + 10 * 365 * 86_400;
    for (what, cred) in [
        (
            "another host's id, A's signature",
            format!("{host_b}.{exp}.{sig}"),
        ),
        ("A's id, B's signature", format!("{host}.{exp}.{sig_b}")),
        (
            "expiry in 10 years, old signature",
            format!("{host}.{far}.{sig}"),
        ),
        (
            "expiry +1 s, old signature",
            format!("{host}.{}.{sig}", exp.parse::<i64>().unwrap() + 1),
        ),
        ("expiry with a plus sign", format!("{host}.+{exp}.{sig}")),
        ("expiry with a leading zero", format!("{host}.0{exp}.{sig}")),
        ("expiry i64::MAX", format!("{host}.{}.{sig}", i64::MAX)),
        (
            "expiry beyond i64",
            format!("{host}.99999999999999999999.{sig}"),
        ),
        (
            "signature truncated",
            format!("{host}.{exp}.{}", &sig[..sig.len() - 2]),
        ),
        (
            "signature odd length",
            format!("{host}.{exp}.{}", &sig[..sig.len() - 1]),
        ),
        ("signature doubled", format!("{host}.{exp}.{sig}{sig}")),
        ("signature empty", format!("{host}.{exp}.")),
        (
            "signature not hex",
            format!("{host}.{exp}.{}", "z".repeat(sig.len())),
        ),
        ("empty host", format!(".{exp}.{sig}")),
        ("empty expiry", format!("{host}..{sig}")),
        ("only dots", "..".to_string()),
        ("one dot", ".".to_string()),
        ("extra dot at the end", format!("{cred_a}.")),
        ("extra part", format!("{cred_a}.x")),
        ("leading dot", format!(".{cred_a}")),
        ("two parts", format!("{host}.{sig}")),
        ("no dots", host.to_string()),
        ("8 KB", "x".repeat(8 * 1024)),
        (
            "the join token shape",
            "abcdef.0123456789abcdef0123456789abcdef".to_string(),
        ),
    ] {
        forged.push((what.to_string(), cred));
    }
    for (what, cred) in &forged {
        let r = desired(&s.url, &format!("BluebatchNode {cred}"), "").await;
        assert_error(&r, 403, "AuthenticationFailed", what);
        let r = agent_post(
            &s.url,
            "ack",
            Some(&format!("BluebatchNode {cred}")),
            br#"{"nodes":[]}"#.to_vec(),
        )
        .await;
        assert_error(&r, 403, "AuthenticationFailed", what);
    }
    // Headers that are not a BluebatchNode credential at all.
    for (what, value, status, code) in [
        (
            "no credential",
            b"BluebatchNode".to_vec(),
            401,
            "AuthenticationFailed",
        ),
        (
            "only spaces after the scheme",
            b"BluebatchNode    ".to_vec(),
            401,
            "AuthenticationFailed",
        ),
        (
            "another scheme",
            format!("Bearer {cred_a}").into_bytes(),
            400,
            "InvalidAuthenticationInfo",
        ),
        (
            "Shared Key",
            b"SharedKey bluebatchdev:abc=".to_vec(),
            400,
            "InvalidAuthenticationInfo",
        ),
        (
            "scheme glued to it",
            format!("BluebatchNode{cred_a}").into_bytes(),
            400,
            "InvalidAuthenticationInfo",
        ),
        (
            "non-ASCII bytes",
            [b"BluebatchNode ".as_slice(), cred_a.as_bytes(), b"\xe9"].concat(),
            400,
            "InvalidAuthenticationInfo",
        ),
        (
            "non-ASCII host",
            "BluebatchNode hôst.1.00".as_bytes().to_vec(),
            400,
            "InvalidAuthenticationInfo",
        ),
    ] {
        let r = respond(
            http()
                .get(format!("{}/_bluebatch/agent/desired", s.url))
                .header(
                    "authorization",
                    reqwest::header::HeaderValue::from_bytes(&value).unwrap(),
                )
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_error(&r, status, code, what);
    }
    // The real ones still work (the scheme's case does not matter), each for its own host.
    for (auth, id) in [(&auth_a, &host_a), (&auth_b, &host_b)] {
        let r = desired(&s.url, auth, "").await;
        assert_eq!(r.status, 200, "{}", text(&r));
        let r = agent_post(
            &s.url,
            "hello",
            Some(auth),
            report("x", 1).to_string().into(),
        )
        .await;
        assert_eq!(r.json()["hostId"], id.as_str(), "{}", text(&r));
    }
    let r = desired(&s.url, &format!("bluebatchnode {cred_a}"), "").await;
    assert_eq!(r.status, 200, "{}", text(&r));

    // A refused hello changes nothing of the host (its name, address, slots).
    let before = state(&c).await;
    for (field, v) in [
        ("address", json!("example.com")),
        ("address", json!("0.0.0.0")),
        ("slots", json!(0)),
        ("sshPort", json!(0)),
        ("hostname", json!("bad\u{7}")),
    ] {
        let mut h = report("renamed", 5);
        h[field] = v.clone();
        let r = agent_post(&s.url, "hello", Some(&auth_a), h.to_string().into()).await;
        assert_error(
            &r,
            400,
            "InvalidPropertyValue",
            &format!("hello {field} = {v}"),
        );
    }
    let r = agent_post(&s.url, "hello", Some(&auth_a), b"{\"hostname\":1}".to_vec()).await;
    assert_error(&r, 400, "InvalidRequestBody", "hello of the wrong type");
    assert_eq!(state(&c).await, before, "no refused hello changed a host");
    s.assert_no_panic();
}

#[tokio::test]
async fn the_poll_query_refuses_garbage_and_cuts_long_waits() {
    let mut s = Hostile::launch();
    let c = s.client();
    let (_, auth) = joined(&s.url, &token(&c, None).await, report("h", 1)).await;
    let r = desired(&s.url, &auth, "").await;
    assert_eq!(r.status, 200, "{}", text(&r));
    let cursor = r.json()["cursor"].as_str().unwrap().to_string();

    let ten_kb = "a".repeat(10 * 1024);
    for (what, query, code) in [
        (
            "wait=abc",
            "wait=abc".to_string(),
            "InvalidQueryParameterValue",
        ),
        (
            "wait=-1",
            "wait=-1".to_string(),
            "InvalidQueryParameterValue",
        ),
        (
            "wait=+5",
            "wait=%2B5".to_string(),
            "InvalidQueryParameterValue",
        ),
        (
            "wait=1.5",
            "wait=1.5".to_string(),
            "InvalidQueryParameterValue",
        ),
        (
            "wait=1e3",
            "wait=1e3".to_string(),
            "InvalidQueryParameterValue",
        ),
        (
            "wait=30ms",
            "wait=30ms".to_string(),
            "InvalidQueryParameterValue",
        ),
        (
            "wait=PT30S",
            "wait=PT30S".to_string(),
            "InvalidQueryParameterValue",
        ),
        (
            "wait with spaces",
            "wait=+30+".to_string(),
            "InvalidQueryParameterValue",
        ),
        (
            "empty wait",
            "wait=".to_string(),
            "InvalidQueryParameterValue",
        ),
        (
            "wait twice",
            "wait=1&wait=1".to_string(),
            "InvalidQueryParameterValue",
        ),
        (
            "after of 10 KB",
            format!("after={ten_kb}"),
            "InvalidQueryParameterValue",
        ),
        (
            "after twice",
            format!("after={cursor}&after={cursor}"),
            "InvalidQueryParameterValue",
        ),
        (
            "bad escape",
            "after=%ZZ".to_string(),
            "InvalidQueryParameterValue",
        ),
        (
            "truncated escape",
            "after=%4".to_string(),
            "InvalidQueryParameterValue",
        ),
        (
            "escape of invalid UTF-8",
            "after=%FF%FE".to_string(),
            "InvalidQueryParameterValue",
        ),
        (
            "unknown parameter",
            "timeout=5".to_string(),
            "UnsupportedQueryParameter",
        ),
        (
            "api-version",
            format!("api-version={}", common::V),
            "UnsupportedQueryParameter",
        ),
        (
            "10 KB parameter name",
            format!("{ten_kb}=1"),
            "UnsupportedQueryParameter",
        ),
    ] {
        let r = desired(&s.url, &auth, &query).await;
        assert_error(&r, 400, code, what);
        let v = r.json();
        assert!(
            v.to_string().len() < 2048,
            "{what}: the answer does not echo 10 KB back: {} bytes",
            v.to_string().len()
        );
    }
    // A wait of 20 digits is a long wait: cut to the longest one, answered at once on a change
    // (no `after`: the state differs from "nothing").
    let started = Instant::now();
    let r = desired(&s.url, &auth, "wait=99999999999999999999").await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(r.json()["changed"], true);
    assert!(started.elapsed() < Duration::from_secs(5));
    // An `after` that names no state the service gave: answered at once, as changed.
    for after in ["nonsense", "%E2%9C%93", "a+b", "&&"] {
        let r = desired(&s.url, &auth, &format!("after={after}&wait=30")).await;
        assert_eq!(r.status, 200, "after={after}: {}", text(&r));
        assert_eq!(r.json()["changed"], true, "after={after}");
    }
    // Empty pairs are nothing; a percent-encoded wait is a wait.
    let started = Instant::now();
    let r = desired(&s.url, &auth, &format!("&&after={cursor}&&wait=%31&")).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(r.json()["changed"], false);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    s.assert_no_panic();
}

#[tokio::test]
async fn hostile_acknowledgements_are_refused_and_never_move_a_node() {
    let mut s = Hostile::launch();
    let c = s.client();
    let o = s.other();
    let (host_a, auth_a) = joined(&s.url, &token(&c, None).await, report("a", 1)).await;
    let (_, auth_o) = joined(&s.url, &token(&o, None).await, report("o", 1)).await;
    assert_eq!(c.create_pool("p", "linux", 1).await.status, 201);
    assert_eq!(o.create_pool("p", "linux", 1).await.status, 201);
    let node = wait_nodes(&c, "p", 1).await[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let onode = wait_nodes(&o, "p", 1).await[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let d = desired(&s.url, &auth_a, "").await.json();
    let key = d["nodes"][0]["key"].as_str().unwrap().to_string();
    let rev = d["nodes"][0]["revision"].as_u64().unwrap();
    let od = desired(&s.url, &auth_o, "").await.json();
    let okey = od["nodes"][0]["key"].as_str().unwrap().to_string();
    let orev = od["nodes"][0]["revision"].as_u64().unwrap();
    assert_ne!(key, okey);
    let before = (
        applied(&c, "p", &node).await,
        applied(&o, "p", &onode).await,
    );

    // Refused entries, each named in `refused`, nothing recorded.
    for (what, entry) in [
        (
            "revision u64::MAX",
            json!({"key": key, "revision": u64::MAX, "image": 0}),
        ),
        (
            "revision + 1",
            json!({"key": key, "revision": rev + 1, "image": 0}),
        ),
        (
            "image u64::MAX",
            json!({"key": key, "revision": rev, "image": u64::MAX}),
        ),
        (
            "ssh port 0",
            json!({"key": key, "revision": rev, "image": 0, "sshPort": 0}),
        ),
        (
            "another account's node",
            json!({"key": okey, "revision": orev, "image": 0}),
        ),
        (
            "a key in another case",
            json!({"key": key.to_uppercase(), "revision": rev, "image": 0}),
        ),
        (
            "an empty key",
            json!({"key": "", "revision": rev, "image": 0}),
        ),
        (
            "a 10 KB key",
            json!({"key": "k".repeat(10_240), "revision": rev, "image": 0}),
        ),
    ] {
        let r = agent_post(
            &s.url,
            "ack",
            Some(&auth_a),
            json!({"nodes": [entry]}).to_string().into(),
        )
        .await;
        assert_eq!(r.status, 200, "{what}: {}", text(&r));
        assert_eq!(r.json()["refused"], json!([entry["key"]]), "{what}");
    }
    // Not an acknowledgement at all: 400.
    for (what, body) in [
        (
            "revision beyond u64",
            format!(r#"{{"nodes":[{{"key":"{key}","revision":18446744073709551616,"image":0}}]}}"#),
        ),
        (
            "negative revision",
            format!(r#"{{"nodes":[{{"key":"{key}","revision":-1,"image":0}}]}}"#),
        ),
        (
            "revision as a string",
            format!(r#"{{"nodes":[{{"key":"{key}","revision":"1","image":0}}]}}"#),
        ),
        (
            "failures not a list",
            format!(r#"{{"nodes":[{{"key":"{key}","revision":1,"image":0,"failures":"x"}}]}}"#),
        ),
        (
            "a failure without a reason",
            format!(
                r#"{{"nodes":[{{"key":"{key}","revision":1,"image":0,"failures":[{{"name":"u"}}]}}]}}"#
            ),
        ),
        ("nodes null", r#"{"nodes":null}"#.to_string()),
        ("no nodes", "{}".to_string()),
        ("empty body", String::new()),
    ] {
        let r = agent_post(&s.url, "ack", Some(&auth_a), body.into_bytes()).await;
        assert_error(&r, 400, "InvalidRequestBody", what);
    }
    assert_eq!(
        (
            applied(&c, "p", &node).await,
            applied(&o, "p", &onode).await
        ),
        before,
        "no refused acknowledgement moved a node"
    );

    // Duplicate keys in one acknowledgement: a failure, then the success of the same revision.
    let dup = json!({"nodes": [
        {"key": key, "revision": rev, "image": 0, "failures": [{"name": "u", "reason": "boom"}]},
        {"key": key, "revision": rev, "image": 0},
        {"key": key, "revision": 0, "image": 0},
    ]});
    let r = agent_post(&s.url, "ack", Some(&auth_a), dup.to_string().into()).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(r.json()["refused"], json!([]));
    assert_eq!(
        applied(&c, "p", &node).await,
        json!(rev),
        "the newest revision wins"
    );
    let users = c
        .control("GET", &format!("/pools/p/nodes/{node}/users"))
        .send_within(T)
        .await
        .json();
    assert_eq!(
        users["applyFailures"],
        json!([]),
        "the success cleared it: {users}"
    );

    // 100,000 entries (about 7 MB): answered in time, every foreign key refused, own taken.
    let mut nodes: Vec<Value> = (0..100_000)
        .map(|i| json!({"key": format!("{}/p/n{i}", common::ACCOUNT), "revision": 1, "image": 0}))
        .collect();
    nodes.push(json!({"key": key, "revision": rev, "image": 0}));
    let body = json!({"nodes": nodes}).to_string();
    let started = Instant::now();
    let r = agent_post(&s.url, "ack", Some(&auth_a), body.into_bytes()).await;
    assert_eq!(r.status, 200, "{}", &text(&r)[..200.min(r.body.len())]);
    assert_eq!(r.json()["refused"].as_array().unwrap().len(), 100_000);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    // Beyond an authenticated agent's 32 MiB: 413 (declared; the server answers before it
    // reads, so only the head and a little of the body are sent).
    let host_port = s.url.trim_start_matches("http://").to_string();
    let big = format!(
        "POST /_bluebatch/agent/ack HTTP/1.1\r\nHost: {host_port}\r\nAuthorization: \
         {auth_a}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: \
         close\r\n\r\n{{\"nodes\":[",
        33 << 20
    );
    let r = within(
        T,
        "a declared 33 MiB ack",
        raw_request(&s.url, big.as_bytes()),
    )
    .await
    .expect("an answer to a declared 33 MiB ack");
    assert_error(&r, 413, "RequestBodyTooLarge", "33 MiB acknowledgement");

    // The other account's node is as it was; host A still backs its node.
    assert_eq!(applied(&o, "p", &onode).await, before.1);
    let hosts = c.control("GET", "/hosts").send_within(T).await.json();
    assert_eq!(hosts["value"][0]["id"], host_a.as_str());
    assert_eq!(hosts["value"][0]["nodes"][0]["nodeId"], node.as_str());
    s.assert_no_panic();
}

#[tokio::test]
async fn concurrent_joins_with_one_token_let_exactly_one_in() {
    let mut s = Hostile::launch();
    let c = s.client();
    for round in 0..3 {
        let tok = token(&c, None).await;
        let joins = (0..16).map(|i| {
            let (url, tok) = (s.url.clone(), tok.clone());
            tokio::spawn(async move { join(&url, &tok, report(&format!("racer{i}"), 1)).await })
        });
        let handles: Vec<_> = joins.collect();
        let mut answers: Vec<Resp> = Vec::new();
        for h in handles {
            answers.push(within(T, "a racing join", h).await.unwrap());
        }
        let won = answers.iter().filter(|r| r.status == 200).count();
        assert_eq!(won, 1, "round {round}: exactly one join wins");
        for r in answers.iter().filter(|r| r.status != 200) {
            assert_error(r, 403, "AuthenticationFailed", "a losing join");
        }
    }
    let hosts = c.control("GET", "/hosts").send_within(T).await.json();
    assert_eq!(hosts["value"].as_array().unwrap().len(), 3, "{hosts}");
    s.assert_no_panic();
}

#[tokio::test]
async fn another_accounts_shared_key_never_touches_this_accounts_hosts_or_tokens() {
    let mut s = Hostile::launch();
    let a = s.client();
    let b = s.other();
    let (host_a, auth_a) = joined(&s.url, &token(&a, None).await, report("a", 1)).await;
    let spare = create_token(&a, json!({"pool": "p"})).await.json();
    let spare_id = spare["id"].as_str().unwrap().to_string();
    let used_id = a.control("GET", "/join-tokens").send_within(T).await.json()["value"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["used"] == true)
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(a.create_pool("p", "linux", 1).await.status, 201);
    wait_nodes(&a, "p", 1).await;
    let before = state(&a).await;

    for (method, path) in [
        ("POST", format!("/hosts/{host_a}/revoke")),
        ("POST", format!("/hosts/{host_a}/drain")),
        ("DELETE", format!("/join-tokens/{spare_id}")),
        ("DELETE", format!("/join-tokens/{used_id}")),
    ] {
        let r = b.control(method, &path).send_within(T).await;
        assert_error(&r, 404, "ResourceNotFound", &format!("B: {method} {path}"));
    }
    // B sees none of A's.
    assert_eq!(
        b.control("GET", "/hosts").send_within(T).await.json()["value"],
        json!([])
    );
    assert_eq!(
        b.control("GET", "/join-tokens").send_within(T).await.json()["value"],
        json!([])
    );
    // A's token does not back B's pools, nor does its host.
    let (_, _) = joined(&s.url, &token(&b, None).await, report("b", 1)).await;
    assert_eq!(state(&a).await, before, "A's hosts and tokens untouched");
    let r = desired(&s.url, &auth_a, "").await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(r.json()["nodes"].as_array().unwrap().len(), 1);
    // Unsigned, or signed with a wrong key: 403, before anything is looked at.
    let r = a
        .control("POST", &format!("/hosts/{host_a}/revoke"))
        .unsigned()
        .send_within(T)
        .await;
    assert!(matches!(r.status, 401 | 403), "{}", text(&r));
    let forger = Client::new(&s.url, common::ACCOUNT, OTHER_KEY);
    let r = forger
        .control("DELETE", &format!("/join-tokens/{spare_id}"))
        .send_within(T)
        .await;
    assert_error(&r, 403, "AuthenticationFailed", "a wrong key");
    assert_eq!(state(&a).await, before);
    s.assert_no_panic();
}

#[tokio::test]
async fn join_token_create_refuses_absurd_lifetimes_and_scopes() {
    let mut s = Hostile::launch();
    let c = s.client();
    let before = state(&c).await;
    for (what, body) in [
        ("ttl 0", json!({"ttl": 0})),
        ("ttl 0s", json!({"ttl": "0s"})),
        ("ttl 0d0h", json!({"ttl": "0d0h"})),
        ("ttl -1", json!({"ttl": -1})),
        ("ttl -1h", json!({"ttl": "-1h"})),
        ("ttl 1000 days", json!({"ttl": "1000d"})),
        ("ttl 1000 days in seconds", json!({"ttl": 1000 * 86_400})),
        ("ttl 367 days", json!({"ttl": "367d"})),
        ("ttl i64::MAX", json!({"ttl": i64::MAX})),
        ("ttl u64::MAX", json!({"ttl": u64::MAX})),
        ("ttl 1e9", json!({"ttl": 1e9})),
        ("ttl 1.5", json!({"ttl": 1.5})),
        ("ttl beyond i32 units", json!({"ttl": "99999999999s"})),
        ("ttl 20 digits", json!({"ttl": "99999999999999999999h"})),
        ("ttl garbage", json!({"ttl": "soon"})),
        ("ttl unit only", json!({"ttl": "h"})),
        ("ttl number only", json!({"ttl": "5"})),
        ("ttl years", json!({"ttl": "1y"})),
        ("ttl ISO 8601", json!({"ttl": "PT1H"})),
        ("ttl empty", json!({"ttl": ""})),
        ("ttl true", json!({"ttl": true})),
        ("ttl list", json!({"ttl": ["1h"]})),
        ("ttl object", json!({"ttl": {"h": 1}})),
        ("pool empty", json!({"pool": ""})),
        ("pool number", json!({"pool": 5})),
        ("pool list", json!({"pool": ["p"]})),
        ("pool with a slash", json!({"pool": "a/b"})),
        ("pool with a space", json!({"pool": "my pool"})),
        ("pool of 65 characters", json!({"pool": "p".repeat(65)})),
        ("pool with an escape", json!({"pool": "p\u{1b}[31m"})),
        ("pool non-ASCII", json!({"pool": "pööl"})),
        ("pool with a dot", json!({"pool": "a.b"})),
    ] {
        let r = create_token(&c, body).await;
        assert_error(&r, 400, "InvalidPropertyValue", what);
    }
    for (what, body) in [
        ("unknown property", br#"{"pool":"p","admin":true}"#.to_vec()),
        ("an array", b"[]".to_vec()),
        ("not JSON", b"{ttl: 1h}".to_vec()),
        ("a string", b"\"1h\"".to_vec()),
    ] {
        let r = c
            .control("POST", "/join-tokens")
            .raw(body)
            .send_within(T)
            .await;
        assert_eq!(r.status, 400, "{what}: {}", text(&r));
        assert!(
            matches!(
                r.code().as_str(),
                "InvalidRequestBody" | "InvalidPropertyValue"
            ),
            "{what}: {}",
            text(&r)
        );
    }
    let r = c
        .control("POST", "/join-tokens")
        .raw(format!(r#"{{"pad":"{}"}}"#, "x".repeat(100 * 1024)).into_bytes())
        .send_within(T)
        .await;
    assert_error(&r, 413, "RequestBodyTooLarge", "100 KB body");
    // Revoking tokens that are not there.
    for id in ["nope00", "", "..", "%2e%2e", &"x".repeat(10 * 1024)] {
        let r = c
            .control("DELETE", &format!("/join-tokens/{id}"))
            .send_within(T)
            .await;
        assert!(
            matches!(r.status, 400 | 404 | 405),
            "DELETE /join-tokens/{}: {}",
            &id[..id.len().min(20)],
            text(&r)
        );
        assert!(!r.code().is_empty(), "a Batch error: {}", text(&r));
    }
    assert_eq!(state(&c).await, before, "nothing was created or revoked");

    // The edges that are fine: 1 second, 366 days, whitespace around a duration, a pool that
    // does not exist (yet).
    for body in [
        json!({"ttl": 1}),
        json!({"ttl": "366d"}),
        json!({"ttl": " 2h "}),
        json!({"pool": "not-there-yet"}),
        json!({"pool": "p".repeat(64), "ttl": "1w"}),
        json!({"pool": null, "ttl": null}),
    ] {
        let r = create_token(&c, body.clone()).await;
        assert_eq!(r.status, 200, "{body}: {}", text(&r));
    }
    s.assert_no_panic();
}

#[tokio::test]
async fn a_token_for_a_pool_not_there_yet_backs_it_when_added_and_again_after_it_is_deleted() {
    let mut s = Hostile::launch();
    let c = s.client();
    // Allowed: an operator may provision hosts before the pool they are for. Pool ids compare
    // as Batch compares them, ignoring case.
    let (host, auth) = joined(&s.url, &token(&c, Some("Later")).await, report("h", 1)).await;
    assert_eq!(c.create_pool("other", "linux", 1).await.status, 201);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(wait_nodes(&c, "other", 0).await.len(), 0);
    assert_eq!(c.create_pool("later", "linux", 1).await.status, 201);
    let first = wait_nodes(&c, "later", 1).await;
    let d = desired(&s.url, &auth, "").await.json();
    assert_eq!(d["nodes"][0]["poolId"], "later", "{d}");

    // The pool is deleted: the host stays joined and backs nothing …
    let r = c.req("DELETE", "/pools/later").send_within(T).await;
    assert_eq!(r.status, 202, "{}", text(&r));
    within(T, "the deleted pool's node to leave the host", async {
        loop {
            let hosts = c.control("GET", "/hosts").send_within(T).await.json();
            if hosts["value"][0]["nodes"] == json!([]) {
                assert_eq!(hosts["value"][0]["id"], host.as_str());
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let d = desired(&s.url, &auth, "").await;
    assert_eq!(d.status, 200, "{}", text(&d));
    assert_eq!(d.json()["nodes"], json!([]));
    // … and backs the pool of that id again once it is added again (once the old one is gone).
    let readded = within(T, "the pool to be added again", async {
        loop {
            let r = c.create_pool("LATER", "linux", 1).await;
            if r.status == 201 {
                return r;
            }
            assert_eq!(r.code(), "PoolBeingDeleted", "{}", text(&r));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!(readded.status, 201);
    let again = wait_nodes(&c, "LATER", 1).await;
    assert_ne!(again[0]["id"], first[0]["id"], "a new node");
    assert_eq!(
        desired(&s.url, &auth, "").await.json()["nodes"][0]["poolId"],
        "LATER"
    );
    s.assert_no_panic();
}

#[tokio::test]
async fn an_agents_flood_of_failure_reasons_answers_the_write_with_a_bounded_message() {
    let mut s = Hostile::launch();
    let c = s.client();
    let (_, auth) = joined(&s.url, &token(&c, None).await, report("h", 1)).await;
    assert_eq!(c.create_pool("p", "linux", 1).await.status, 201);
    let node = wait_nodes(&c, "p", 1).await[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    // The node starts once the agent acknowledges it.
    let first = desired(&s.url, &auth, "").await.json();
    let rev0 = first["nodes"][0]["revision"].as_u64().unwrap();
    let start = json!({"nodes": [{"key": first["nodes"][0]["key"], "revision": rev0, "image": 0}]});
    let r = agent_post(&s.url, "ack", Some(&auth), start.to_string().into()).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    within(T, "the node to be idle", async {
        while wait_nodes(&c, "p", 1).await[0]["state"] != "idle" {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let cursor = desired(&s.url, &auth, "").await.json()["cursor"]
        .as_str()
        .unwrap()
        .to_string();
    // A write waiting for the node …
    let base = s.url.clone();
    let node2 = node.clone();
    let write = tokio::spawn(async move {
        let c = Client::new(&base, common::ACCOUNT, KEY);
        c.req("POST", &format!("/pools/p/nodes/{node2}/users"))
            .query(&format!("api-version={}&timeout=15", common::V))
            .json(&json!({"name": "victim", "password": "Secret-123456"}))
            .send_within(T)
            .await
    });
    let d = desired(&s.url, &auth, &format!("after={cursor}&wait=10"))
        .await
        .json();
    let n = &d["nodes"][0];
    let rev = n["revision"].as_u64().unwrap();
    assert!(rev > rev0, "{d}");
    // … and an agent that answers it with 200 failures of 40 KB each (8 MB), the write's own
    // user last: the answer still names it (first).
    let failures: Vec<Value> = (0..199)
        .map(|i| json!({"name": format!("u{i}"), "reason": "\u{1b}[2J".repeat(10_000)}))
        .chain(std::iter::once(
            json!({"name": "victim", "reason": "r".repeat(40_000)}),
        ))
        .collect();
    let ack =
        json!({"nodes": [{"key": n["key"], "revision": rev, "image": 0, "failures": failures}]});
    let r = agent_post(&s.url, "ack", Some(&auth), ack.to_string().into()).await;
    assert_eq!(r.status, 200, "{}", &text(&r)[..text(&r).len().min(300)]);
    let r = within(T, "the waiting write", write).await.unwrap();
    assert_error(&r, 500, "InternalError", "the failed write");
    let message = r.json()["message"]["value"].as_str().unwrap().to_string();
    assert!(
        message.contains("(victim: rrr"),
        "the write's own user is named first: {}",
        &message[..200]
    );
    assert!(
        message.contains("and 195 more"),
        "{}",
        &message[message.len() - 300..]
    );
    assert!(
        r.body.len() < 16 * 1024,
        "a bounded answer: {} bytes",
        r.body.len()
    );
    // The control endpoint shows them all, each reason cut to 1024 characters.
    let users = c
        .control("GET", &format!("/pools/p/nodes/{node}/users"))
        .send_within(T)
        .await
        .json();
    let shown = users["applyFailures"].as_array().unwrap();
    assert_eq!(shown.len(), 200);
    assert!(
        shown
            .iter()
            .all(|f| f["reason"].as_str().unwrap().chars().count() <= 1024),
        "reasons are cut"
    );
    s.assert_no_panic();
}

#[tokio::test]
async fn a_stalled_control_or_agent_body_is_400_not_413() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = Hostile::launch_with(&["--http-stall-timeout", "1s"]);
    let c = s.client();
    let before = state(&c).await;
    let host_port = s.url.trim_start_matches("http://").to_string();
    // Signed as the SDKs sign, then only the first byte of the declared body is sent.
    let signed = c
        .control("POST", "/join-tokens")
        .header("content-type", "application/json")
        .raw(br#"{"ttl":"1h"}        "#.to_vec())
        .into_raw_bytes(&[]);
    let head_end = signed.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8(signed[..head_end].to_vec()).unwrap();
    let agent_head = format!(
        "POST /_bluebatch/agent/join HTTP/1.1\r\nHost: {host_port}\r\nContent-Type: \
         application/json\r\nContent-Length: 20\r\n\r\n"
    );
    for (what, head) in [("join-token create", head), ("agent join", agent_head)] {
        let mut conn = tokio::net::TcpStream::connect(&host_port).await.unwrap();
        conn.write_all(head.as_bytes()).await.unwrap();
        conn.write_all(b"{").await.unwrap();
        let started = Instant::now();
        let mut buf = Vec::new();
        within(T, what, conn.read_to_end(&mut buf)).await.unwrap();
        let r = common::parse_http_response(&buf)
            .unwrap_or_else(|| panic!("{what}: no answer: {:?}", String::from_utf8_lossy(&buf)));
        assert_error(&r, 400, "InvalidRequestBody", what);
        assert!(started.elapsed() < Duration::from_secs(10), "{what}");
    }
    assert_eq!(state(&c).await, before);
    s.assert_no_panic();
}

#[tokio::test]
async fn a_host_that_comes_back_smaller_or_as_linux_lets_go_of_the_nodes_it_cannot_back() {
    let mut s = Hostile::launch();
    let c = s.client();
    let (a, auth_a) = joined(&s.url, &token(&c, None).await, report("a", 2)).await;
    assert_eq!(c.create_pool("p", "linux", 2).await.status, 201);
    wait_nodes(&c, "p", 2).await;
    let (b, _) = joined(&s.url, &token(&c, None).await, report("b", 1)).await;
    let backs = |hosts: &Value, id: &str| {
        hosts["value"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["id"] == id)
            .map_or(0, |h| h["nodes"].as_array().unwrap().len())
    };
    let hosts = c.control("GET", "/hosts").send_within(T).await.json();
    assert_eq!((backs(&hosts, &a), backs(&hosts, &b)), (2, 0), "{hosts}");

    // Host A restarts with `--simulate 1`: its slot 1 is gone, that node moves to host B.
    let r = agent_post(
        &s.url,
        "hello",
        Some(&auth_a),
        report("a", 1).to_string().into(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", text(&r));
    within(T, "the pool to be met by A's slot 0 and B", async {
        loop {
            let hosts = c.control("GET", "/hosts").send_within(T).await.json();
            let nodes = c.req("GET", "/pools/p/nodes").send_within(T).await.json();
            if (backs(&hosts, &a), backs(&hosts, &b)) == (1, 1)
                && nodes["value"].as_array().unwrap().len() == 2
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let d = desired(&s.url, &auth_a, "").await.json();
    let slots: Vec<&Value> = d["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| &n["slot"])
        .collect();
    assert_eq!(slots, [&json!(0)], "only slots below the host's count: {d}");

    // A simulated host backing a Windows node comes back as a linux host: the node leaves.
    let (w, auth_w) = joined(&s.url, &token(&c, Some("win")).await, report("w", 1)).await;
    assert_eq!(c.create_pool("win", "windows", 1).await.status, 201);
    wait_nodes(&c, "win", 1).await;
    let mut linux = report("w", 1);
    linux["provider"] = json!("linux");
    linux["sshPort"] = json!(22);
    let r = agent_post(&s.url, "hello", Some(&auth_w), linux.to_string().into()).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    wait_nodes(&c, "win", 0).await;
    let hosts = c.control("GET", "/hosts").send_within(T).await.json();
    assert_eq!(backs(&hosts, &w), 0, "{hosts}");
    assert_eq!(
        desired(&s.url, &auth_w, "").await.json()["nodes"],
        json!([])
    );
    s.assert_no_panic();
}

#[tokio::test]
async fn wrong_verbs_and_paths_under_the_agent_and_control_namespaces_are_batch_errors() {
    let mut s = Hostile::launch();
    let c = s.client();
    let (host, auth) = joined(&s.url, &token(&c, None).await, report("h", 1)).await;
    let before = state(&c).await;
    let client = http();
    for (method, path, status, code) in [
        ("PUT", "join", 405, "UnsupportedHttpVerb"),
        ("DELETE", "ack", 405, "UnsupportedHttpVerb"),
        ("PATCH", "hello", 405, "UnsupportedHttpVerb"),
        ("POST", "desired", 405, "UnsupportedHttpVerb"),
        ("OPTIONS", "desired", 405, "UnsupportedHttpVerb"),
        ("POST", "join/", 400, "InvalidUri"),
        ("GET", "desired/", 400, "InvalidUri"),
        ("POST", "JOIN", 400, "InvalidUri"),
        ("POST", "%6Aoin", 400, "InvalidUri"),
        // The client resolves the dots: this is POST /_bluebatch/reset, which a node
        // credential cannot authorize.
        ("POST", "../reset", 400, "InvalidAuthenticationInfo"),
        ("POST", "%2e%2e/reset", 400, "InvalidAuthenticationInfo"),
        ("GET", "", 400, "InvalidUri"),
    ] {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let url = format!("{}/_bluebatch/agent/{path}", s.url);
        let r = respond(
            client
                .request(m, &url)
                .header("authorization", &auth)
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_error(
            &r,
            status,
            code,
            &format!("{method} /_bluebatch/agent/{path}"),
        );
    }
    // Sent as is (no client resolving the dots): still no way out of the agent namespace.
    let host_port = s.url.trim_start_matches("http://").to_string();
    for path in ["%2e%2e/reset", "../reset", "./join", "join%00"] {
        let raw = format!(
            "POST /_bluebatch/agent/{path} HTTP/1.1\r\nHost: {host_port}\r\nAuthorization: \
             {auth}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
        );
        let r = within(T, path, raw_request(&s.url, raw.as_bytes()))
            .await
            .expect("an answer");
        assert_error(
            &r,
            400,
            "InvalidUri",
            &format!("raw POST /_bluebatch/agent/{path}"),
        );
    }
    let hosts = format!("/hosts/{host}");
    for (method, path, status, code) in [
        (
            "PUT",
            "/join-tokens".to_string(),
            405,
            "UnsupportedHttpVerb",
        ),
        (
            "GET",
            "/join-tokens/abcdef".to_string(),
            405,
            "UnsupportedHttpVerb",
        ),
        (
            "POST",
            "/join-tokens/abcdef".to_string(),
            405,
            "UnsupportedHttpVerb",
        ),
        ("DELETE", "/hosts".to_string(), 405, "UnsupportedHttpVerb"),
        (
            "DELETE",
            format!("{hosts}/revoke"),
            405,
            "UnsupportedHttpVerb",
        ),
        ("GET", format!("{hosts}/revoke"), 405, "UnsupportedHttpVerb"),
        ("PUT", format!("{hosts}/drain"), 405, "UnsupportedHttpVerb"),
        ("GET", hosts.clone(), 400, "InvalidUri"),
        ("POST", format!("{hosts}/reboot"), 400, "InvalidUri"),
        ("POST", format!("{hosts}/revoke/now"), 400, "InvalidUri"),
        ("POST", "/hosts//revoke".to_string(), 400, "InvalidUri"),
    ] {
        let r = c.control(method, &path).send_within(T).await;
        assert_error(&r, status, code, &format!("{method} {path}"));
    }
    assert_eq!(
        state(&c).await,
        before,
        "no refused request changed anything"
    );
    s.assert_no_panic();
}

#[tokio::test]
async fn a_hundred_long_polls_of_one_host_all_wake_on_a_change_and_all_end_at_its_revoke() {
    let mut s = Hostile::launch();
    let c = s.client();
    let (host, auth) = joined(&s.url, &token(&c, None).await, report("h", 1)).await;
    let cursor = desired(&s.url, &auth, "").await.json()["cursor"]
        .as_str()
        .unwrap()
        .to_string();
    // A change wakes every one of them at once.
    let waiting = spawn_polls(&s.url, &auth, &cursor, 100);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    assert_eq!(c.create_pool("p", "linux", 1).await.status, 201);
    for h in waiting {
        let r = within(T, "a woken poll", h).await.unwrap();
        assert_eq!(r.status, 200, "{}", text(&r));
        assert_eq!(r.json()["changed"], true);
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // The revoke ends every poll waiting on the new state, with 403 (once the node is idle, so
    // that its start does not answer them first).
    let d = desired(&s.url, &auth, "").await.json();
    let n = &d["nodes"][0];
    let start = json!({"nodes": [{"key": n["key"], "revision": n["revision"], "image": 0}]});
    let r = agent_post(&s.url, "ack", Some(&auth), start.to_string().into()).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    within(T, "the node to be idle", async {
        while wait_nodes(&c, "p", 1).await[0]["state"] != "idle" {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let cursor = desired(&s.url, &auth, "").await.json()["cursor"]
        .as_str()
        .unwrap()
        .to_string();
    let waiting = spawn_polls(&s.url, &auth, &cursor, 100);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = c
        .control("POST", &format!("/hosts/{host}/revoke"))
        .send_within(T)
        .await;
    assert_eq!(r.status, 200, "{}", text(&r));
    for h in waiting {
        let r = within(T, "a poll ended by the revoke", h).await.unwrap();
        assert_error(&r, 403, "AuthenticationFailed", "a poll of a revoked host");
    }
    s.assert_no_panic();
}

/// `n` long polls of one host waiting on `cursor` (60 s).
fn spawn_polls(
    url: &str,
    auth: &str,
    cursor: &str,
    n: usize,
) -> Vec<tokio::task::JoinHandle<Resp>> {
    (0..n)
        .map(|_| {
            let (url, auth) = (url.to_string(), auth.to_string());
            let q = format!("after={cursor}&wait=60");
            tokio::spawn(async move { desired(&url, &auth, &q).await })
        })
        .collect()
}
