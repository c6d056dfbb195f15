//! Answers given before the request body is read (413 over the limit, 401, 501, …) reach a
//! client that writes its whole body before it reads anything, as Python's http.client does: the
//! server reads and discards the rest of the body (bounded in size and time) before answering,
//! instead of closing on a client still writing (which it sees as a broken pipe or a reset).

mod common;

use common::{Resp, Server, parse_http_response};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

const TWO_MIB: usize = 2 << 20;

fn connect(url: &str) -> TcpStream {
    let s = TcpStream::connect(url.trim_start_matches("http://")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// Writes all of `request` (failing the test on a broken pipe or reset), then reads the answer
/// to the end of the connection. The writer pauses after the first 64 KiB, as a client on a
/// real network is slower than the server: the server has its answer by then.
fn write_all_then_read(url: &str, request: &[u8]) -> Resp {
    let mut s = connect(url);
    write_slowly(&mut s, request);
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .unwrap_or_else(|e| panic!("reading the answer failed: {e} (got {} bytes)", buf.len()));
    parse_http_response(&buf).expect("an HTTP answer")
}

fn write_slowly(s: &mut TcpStream, request: &[u8]) {
    let (first, rest) = request.split_at(request.len().min(64 * 1024));
    s.write_all(first).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    for piece in rest.chunks(256 * 1024) {
        s.write_all(piece)
            .unwrap_or_else(|e| panic!("writing the whole request failed: {e}"));
    }
}

/// Reads one answer (headers and a Content-Length body) from a connection left open.
fn read_one(s: &mut TcpStream) -> Resp {
    let mut buf = Vec::new();
    let mut byte = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return parse_http_response(&buf[..end + 4 + len]).unwrap();
            }
        }
        let n = s.read(&mut byte).expect("reading the answer");
        assert!(n > 0, "the server closed before answering: {buf:?}");
        buf.extend_from_slice(&byte[..n]);
    }
}

fn big_user_body() -> Vec<u8> {
    format!(r#"{{"password":"{}"}}"#, "x".repeat(TWO_MIB)).into_bytes()
}

fn chunked(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for c in body.chunks(64 * 1024) {
        out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        out.extend_from_slice(c);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

fn assert_code(r: &Resp, status: u16, code: &str) {
    assert_eq!(
        (r.status, r.code().as_str()),
        (status, code),
        "{:?}",
        String::from_utf8_lossy(&r.body)
    );
    assert!(r.header("request-id").is_some());
}

#[test]
fn a_client_that_writes_2_mib_first_reads_its_413() {
    let srv = Server::start();
    let c = srv.client();
    // Content-Length over the limit: refused before reading, then the rest is drained.
    let req = c
        .req("PUT", "/pools/p/nodes/n/users/u")
        .raw(big_user_body())
        .into_raw_bytes(&[]);
    let r = write_all_then_read(&srv.url, &req);
    assert_code(&r, 413, "RequestBodyTooLarge");
    assert_eq!(r.value("MaxLimit").as_deref(), Some("1048576"));

    // Chunked: refused once the limit is passed while reading, then the rest is drained.
    let req = c
        .req("PUT", "/pools/p/nodes/n/users/u")
        .header("transfer-encoding", "chunked")
        .raw(chunked(&big_user_body()))
        .into_raw_bytes(&[]);
    let r = write_all_then_read(&srv.url, &req);
    assert_code(&r, 413, "RequestBodyTooLarge");

    // Other answers given before the body is read: no credentials (401), a published operation
    // that is not served (501), a route that does not exist (400).
    let body = vec![b' '; TWO_MIB];
    let req = c
        .req("POST", "/pools")
        .unsigned()
        .raw(body.clone())
        .into_raw_bytes(&[]);
    assert_code(
        &write_all_then_read(&srv.url, &req),
        401,
        "AuthenticationFailed",
    );
    let req = c.req("POST", "/jobs").raw(body.clone()).into_raw_bytes(&[]);
    assert_code(&write_all_then_read(&srv.url, &req), 501, "NotImplemented");
    let req = c
        .req("POST", "/nonsense")
        .header("transfer-encoding", "chunked")
        .raw(chunked(&body))
        .into_raw_bytes(&[]);
    assert_code(&write_all_then_read(&srv.url, &req), 400, "InvalidUri");
}

/// The agent and control endpoints answer early as the Batch API does: the rest of the body is
/// drained, so the client reads its 413 (a join of more than `--max-body-bytes`) or its 401.
#[test]
fn agent_and_control_endpoints_drain_before_answering_early() {
    let srv = Server::start();
    let c = srv.client();
    let join = format!(r#"{{"token":"{}"}}"#, "x".repeat(TWO_MIB)).into_bytes();
    let req = c
        .req("POST", "/_bluebatch/agent/join")
        .unsigned()
        .header("content-type", "application/json")
        .raw(join.clone())
        .into_raw_bytes(&[]);
    assert_code(
        &write_all_then_read(&srv.url, &req),
        413,
        "RequestBodyTooLarge",
    );
    let req = c
        .req("POST", "/_bluebatch/agent/join")
        .unsigned()
        .header("transfer-encoding", "chunked")
        .raw(chunked(&join))
        .into_raw_bytes(&[]);
    assert_code(
        &write_all_then_read(&srv.url, &req),
        413,
        "RequestBodyTooLarge",
    );
    // An acknowledgement without a node credential: 401 before the body is looked at.
    let req = c
        .req("POST", "/_bluebatch/agent/ack")
        .unsigned()
        .raw(vec![b' '; TWO_MIB])
        .into_raw_bytes(&[]);
    assert_code(
        &write_all_then_read(&srv.url, &req),
        401,
        "AuthenticationFailed",
    );
    // A control call: unsigned → 401; signed but over its 64 KiB → 413.
    let req = c
        .req("POST", "/_bluebatch/join-tokens")
        .unsigned()
        .raw(vec![b' '; TWO_MIB])
        .into_raw_bytes(&[]);
    assert_code(
        &write_all_then_read(&srv.url, &req),
        401,
        "AuthenticationFailed",
    );
    let req = c
        .req("POST", "/_bluebatch/join-tokens")
        .raw(vec![b' '; TWO_MIB])
        .into_raw_bytes(&[]);
    assert_code(
        &write_all_then_read(&srv.url, &req),
        413,
        "RequestBodyTooLarge",
    );
}

#[test]
fn after_a_drained_body_the_connection_serves_the_next_request() {
    let srv = Server::start();
    let c = srv.client();
    let strip_close = |mut raw: Vec<u8>| {
        let needle = b"connection: close\r\n";
        let at = raw.windows(needle.len()).position(|w| w == needle).unwrap();
        raw.drain(at..at + needle.len());
        raw
    };
    let first = strip_close(
        c.req("PUT", "/pools/p/nodes/n/users/u")
            .raw(big_user_body())
            .into_raw_bytes(&[]),
    );
    let mut s = connect(&srv.url);
    write_slowly(&mut s, &first);
    let r = read_one(&mut s);
    assert_code(&r, 413, "RequestBodyTooLarge");
    assert_ne!(
        r.header("connection"),
        Some("close"),
        "the body was drained to its end: the connection stays usable"
    );
    let second = c.req("GET", "/pools").into_raw_bytes(&[]);
    s.write_all(&second).unwrap();
    let r = read_one(&mut s);
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
}

#[test]
fn a_body_past_the_drain_bound_is_cut_off_with_connection_close() {
    let srv = Server::start();
    let c = srv.client();
    // Declared larger than the 8 MiB drained: answered at once, and the connection closes.
    let mut s = connect(&srv.url);
    let head = c
        .req("PUT", "/pools/p/nodes/n/users/u")
        .header("content-length", &(64u64 << 20).to_string())
        .into_raw_bytes(&[]);
    s.write_all(&head).unwrap();
    s.write_all(&[b'x'; 4096]).unwrap();
    let r = read_one(&mut s);
    assert_code(&r, 413, "RequestBodyTooLarge");
    assert_eq!(r.header("connection"), Some("close"));
}

/// Python's http.client sends the whole body before it reads the answer (the case users hit).
#[test]
fn python_http_client_with_a_2_mib_body_reads_the_413() {
    if !common::require(
        Command::new("python3").arg("-V").output().is_ok(),
        "python3 (for Python's http.client)",
    ) {
        return;
    }
    let srv = Server::start();
    let hostport = srv.url.trim_start_matches("http://").to_string();
    // Signed with Shared Key as the SDKs sign, so the answer is the 413 itself.
    let script = r#"
import base64, hashlib, hmac, http.client, json, sys, time
from email.utils import formatdate
host, port = sys.argv[1].rsplit(":", 1)
account, key = sys.argv[2], base64.b64decode(sys.argv[3])
body = b'{"password":"' + b"x" * (2 << 20) + b'"}'
path, version = "/pools/p/nodes/n/users/u", "2023-11-01.18.0"
date = formatdate(usegmt=True)
sts = "PUT\n\n\n%d\n\napplication/json\n\n\n\n\n\n\nocp-date:%s\n/%s%s\napi-version:%s" % (
    len(body), date, account, path, version)
sig = base64.b64encode(hmac.new(key, sts.encode(), hashlib.sha256).digest()).decode()
def pieces():
    # A client on a real network is slower than the server: pause after the first 64 KiB.
    yield body[:65536]
    time.sleep(0.3)
    for i in range(65536, len(body), 262144):
        yield body[i:i + 262144]
c = http.client.HTTPConnection(host, int(port), timeout=20)
c.request("PUT", path + "?api-version=" + version, body=pieces(),
          headers={"Content-Type": "application/json", "ocp-date": date,
                   "Content-Length": str(len(body)),
                   "Authorization": "SharedKey %s:%s" % (account, sig)})
r = c.getresponse()
print(r.status, json.loads(r.read())["code"])
"#;
    let mut child = Command::new("python3")
        .args(["-c", script, &hostport, common::ACCOUNT, common::KEY])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("python did not finish within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "413 RequestBodyTooLarge",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
