//! Slow and idle HTTP(S) clients against the real binary (docs/contract.md §7): thousands of
//! slowloris connections from one loopback address (127.0.0.2) while a client on 127.0.0.1 is
//! served; the head deadline, the idle keep-alive timeout, the stalled-body deadline, room made
//! at the connection bound, the per-source cap, and the Batch error for oversized heads. Writes
//! answered during a flood are durable; the server's memory stays bounded.
//!
//! The tests of this file run one at a time (they load a 2-core machine on purpose); every
//! operation has a deadline.

mod common;

use common::{Client, Server, V, within};
use serde_json::json;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// How long a request from the well-behaved client may take under a flood: a functional
/// bound on a loaded 2-core machine (the issue asks for "within a second"), not a benchmark.
const SERVED_WITHIN: Duration = Duration::from_secs(2);

/// Held by each test of this file for its whole run (tokio's lock: it is held across awaits and
/// is not poisoned by a failed test).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Raises this process's open-file limit (its soft value, up to the hard one) so that it can
/// hold thousands of sockets; the server started afterwards inherits it. Returns the limit.
fn raise_fd_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        let want = r.rlim_max.min(20_000);
        if r.rlim_cur < want {
            r.rlim_cur = want;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        }
    }
    r.rlim_cur
}

fn addr_of(base: &str) -> SocketAddr {
    base.trim_start_matches("http://")
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .parse()
        .unwrap()
}

/// A TCP connection to `to` from the loopback address `from`, within 10 s.
async fn connect_from(from: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(from.parse().unwrap(), 0))?;
    match tokio::time::timeout(Duration::from_secs(10), s.connect(to)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::other("connect: no answer within 10 s")),
    }
}

/// One slow client: connected, sent `first` (one line of a request, or nothing), then silent.
struct Slow {
    stream: TcpStream,
    connected: Instant,
}

/// Opens `n` slow connections from `from` (64 connecting at a time), each sending `first`;
/// panics unless every one connects.
async fn flood(n: usize, from: &'static str, to: SocketAddr, first: &'static [u8]) -> Vec<Slow> {
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let gate = gate.clone();
        set.spawn(async move {
            let _p = gate.acquire_owned().await.unwrap();
            let t = Instant::now();
            let mut stream = connect_from(from, to).await?;
            let connected = Instant::now();
            if connected - t > Duration::from_millis(500) {
                eprintln!("slow connect: {:?}", connected - t);
            }
            if !first.is_empty() {
                stream.write_all(first).await?;
            }
            Ok::<_, std::io::Error>(Slow { stream, connected })
        });
    }
    let mut out = Vec::with_capacity(n);
    while let Some(r) = set.join_next().await {
        out.push(
            r.unwrap()
                .unwrap_or_else(|e| panic!("a slow client could not connect: {e}")),
        );
    }
    out
}

/// Whether the server has closed `s` (EOF or reset) by now, without waiting.
fn closed_now(s: &TcpStream) -> bool {
    let mut b = [0u8; 64];
    match s.try_read(&mut b) {
        Ok(0) => true,
        Ok(_) => false, // an answer: still open
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
        Err(_) => true,
    }
}

/// When the server closed `s` (EOF or reset), waiting at most until `limit`; `None` if it
/// was still open then. Bytes the server sends before closing are skipped.
async fn closed_at(mut s: TcpStream, limit: Instant) -> Option<Instant> {
    let mut b = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(limit.into(), s.read(&mut b)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(Instant::now()),
            Ok(Ok(_)) => {}
        }
    }
}

/// The server's resident memory (VmRSS), in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// GET /_bluebatch/health on a new connection from 127.0.0.1: 200 within [`SERVED_WITHIN`].
async fn health_served(base: &str) -> Duration {
    let t = Instant::now();
    let r = Client::new(base, common::ACCOUNT, common::KEY)
        .control("GET", "/health")
        .send_within(SERVED_WITHIN)
        .await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    t.elapsed()
}

/// Writes `request` on a new connection and reads one whole answer (head and Content-Length
/// body), within 10 s; the stream stays open for the caller.
async fn exchange(to: SocketAddr, request: &[u8]) -> (common::Resp, TcpStream) {
    within(
        Duration::from_secs(10),
        "one request and its answer",
        async {
            let mut s = TcpStream::connect(to).await.unwrap();
            let r = answer_on(&mut s, request).await;
            (r, s)
        },
    )
    .await
}

async fn answer_on(s: &mut TcpStream, request: &[u8]) -> common::Resp {
    s.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    let mut b = [0u8; 8192];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b))
            .await
            .expect("an answer within 10 s")
            .unwrap();
        assert!(n > 0, "closed before a whole answer: {buf:?}");
        buf.extend_from_slice(&b[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if buf.len() >= end + 4 + len {
                return common::parse_http_response(&buf).unwrap();
            }
        }
    }
}

fn health_request(extra: &str) -> Vec<u8> {
    format!("GET /_bluebatch/health HTTP/1.1\r\nhost: 127.0.0.1\r\n{extra}\r\n").into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_flood_from_one_address_is_shed_while_another_is_served_and_nothing_is_lost() {
    let _serial = SERIAL.lock().await;
    let fds = raise_fd_limit();
    assert!(
        fds >= 8_000,
        "the test needs 8 000 open files, the limit is {fds}"
    );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    // No per-source cap here: this is the head deadline's work (the cap has its own test).
    let head = Duration::from_secs(8);
    let args = [
        "--data-dir",
        d,
        "--http-head-timeout",
        "8s",
        "--max-connections-per-source",
        "none",
    ];
    within(Duration::from_secs(150), "the flood test", async {
        let mut srv = Server::start_with(&args);
        let c = srv.client();
        let to = addr_of(&srv.url);
        let nodes = c.ready_pool("p1", "linux", 1).await;
        let user_path = Client::user_path("p1", &nodes[0], "alice");
        let r = c
            .req("POST", &format!("/pools/p1/nodes/{}/users", nodes[0]))
            .json(&json!({"name": "alice", "password": "before-the-flood"}))
            .send_within(Duration::from_secs(10))
            .await;
        assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
        let rss_before = rss_kib(srv.child.id());

        // 3 000 connections from 127.0.0.2 that send one line of a request and then nothing.
        let started = Instant::now();
        let slow = flood(
            3_000,
            "127.0.0.2",
            to,
            b"GET /pools?api-version=2023-11-01.18.0 HTTP/1.1\r\n",
        )
        .await;
        let flood_took = started.elapsed();
        assert!(
            flood_took < head - Duration::from_secs(2),
            "opening the flood took {flood_took:?}: too slow to hold it before the deadline"
        );

        // While it is held: health and signed writes from 127.0.0.1, each on a new connection.
        let mut slowest = Duration::ZERO;
        let mut written = Vec::new();
        for i in 0..3 {
            slowest = slowest.max(health_served(&srv.url).await);
            let fresh = Client::new(&srv.url, common::ACCOUNT, common::KEY);
            let t = Instant::now();
            let r = fresh
                .req("PUT", &user_path)
                .json(&json!({"password": format!("during-the-flood-{i}")}))
                .send_within(SERVED_WITHIN)
                .await;
            assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
            slowest = slowest.max(t.elapsed());
            let t = Instant::now();
            let pool = format!("flood{i}");
            let r = fresh.create_pool(&pool, "linux", 0).await;
            assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
            assert!(
                t.elapsed() < SERVED_WITHIN,
                "Add Pool took {:?}",
                t.elapsed()
            );
            slowest = slowest.max(t.elapsed());
            written.push(pool);
        }
        let held = slow.iter().filter(|s| !closed_now(&s.stream)).count();
        let rss = rss_kib(srv.child.id());
        eprintln!(
            "flood: 3000 slow connections opened in {flood_took:?}, {held} held open; slowest \
             request from 127.0.0.1 {slowest:?}; server VmRSS {rss} KiB (before the flood \
             {rss_before} KiB)"
        );
        assert_eq!(
            held, 3_000,
            "the head deadline closed slow connections early"
        );
        assert!(
            rss < 200 * 1024,
            "the server's memory with the flood held: {rss} KiB"
        );

        // Every slow connection is closed by the server at the head deadline (not before).
        let margin = Duration::from_secs(4);
        let mut set = tokio::task::JoinSet::new();
        for s in slow {
            let limit = s.connected + head + margin;
            set.spawn(async move { (s.connected, closed_at(s.stream, limit).await) });
        }
        let (mut open, mut early, mut latest) = (0, 0, Duration::ZERO);
        while let Some(r) = set.join_next().await {
            match r.unwrap() {
                (_, None) => open += 1,
                (connected, Some(at)) => {
                    let after = at - connected;
                    if after + Duration::from_millis(200) < head {
                        early += 1;
                    }
                    latest = latest.max(after);
                }
            }
        }
        eprintln!("flood: the last slow connection was closed {latest:?} after its connect");
        assert_eq!(
            open, 0,
            "slow connections still open past the deadline + {margin:?}"
        );
        assert_eq!(early, 0, "slow connections closed before the head deadline");
        health_served(&srv.url).await;

        // Writes answered during the flood are durable: a restart has them.
        srv.stop();
        let srv = Server::start_with(&args);
        let c = srv.client();
        for pool in &written {
            let r = c
                .req("GET", &format!("/pools/{pool}"))
                .send_within(Duration::from_secs(10))
                .await;
            assert_eq!(r.status, 200, "{pool} lost: {:?}", r.body);
        }
        if common::require(
            common::have_ssh_client(),
            "the OpenSSH client and sshpass (the flood's last password, after the restart)",
        ) {
            let deadline = Instant::now() + Duration::from_secs(20);
            let port = loop {
                let r = c
                    .req("GET", &format!("/pools/p1/nodes/{}", nodes[0]))
                    .send_within(Duration::from_secs(10))
                    .await;
                if r.json()["state"] == "idle" {
                    break c.ssh_port("p1", &nodes[0]).await;
                }
                assert!(Instant::now() < deadline, "node not idle after the restart");
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            let out = common::ssh_password_outcome(
                port,
                "alice",
                "during-the-flood-2",
                "127.0.0.1",
                "echo in",
            )
            .await;
            assert_eq!(
                out.stdout("the last password set during the flood").trim(),
                "in"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_bound_slow_connections_make_room_for_a_new_client() {
    let _serial = SERIAL.lock().await;
    raise_fd_limit();
    within(Duration::from_secs(90), "the bound test", async {
        // A head deadline far off: room is made by closing slow connections, not by the clock.
        let srv = Server::start_with(&[
            "--in-memory",
            "--max-connections",
            "500",
            "--max-connections-per-source",
            "none",
            "--http-head-timeout",
            "60s",
        ]);
        let to = addr_of(&srv.url);
        // In 15 waves of 100, each connected only once the one before is: the server accepts
        // them in that order (the kernel's accept queue is first in, first out), whatever the
        // order in which this process's tasks saw their connects return.
        let mut slow = Vec::with_capacity(1_500);
        for _ in 0..15 {
            slow.extend(flood(100, "127.0.0.2", to, b"GET / HTTP/1.1\r\n").await);
        }
        let t = health_served(&srv.url).await;
        let r = Client::new(&srv.url, common::ACCOUNT, common::KEY)
            .req("GET", "/pools")
            .send_within(SERVED_WITHIN)
            .await;
        assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
        // The server holds at most its bound: the others were closed to make room.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let open = slow.iter().filter(|s| !closed_now(&s.stream)).count();
        eprintln!("bound 500: {open} of 1500 slow connections open; health in {t:?}");
        assert!(
            open < 500,
            "{open} slow connections open beyond the bound of 500"
        );
        assert!(
            open > 300,
            "only {open} slow connections open: more closed than needed"
        );
        // The oldest went first (of waiting connections, the one that has used the largest share
        // of its deadline): the first 8 waves are closed, the last 3 are open.
        let first_open = slow[..800]
            .iter()
            .filter(|s| !closed_now(&s.stream))
            .count();
        let last_closed = slow[1_200..]
            .iter()
            .filter(|s| closed_now(&s.stream))
            .count();
        assert_eq!(first_open, 0, "of the 800 oldest, {first_open} still open");
        assert_eq!(last_closed, 0, "of the 300 newest, {last_closed} closed");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_source_cap_refuses_the_excess_from_one_address_while_others_are_served() {
    let _serial = SERIAL.lock().await;
    raise_fd_limit();
    within(Duration::from_secs(60), "the per-source test", async {
        let srv = Server::start_with(&[
            "--in-memory",
            "--max-connections-per-source",
            "50",
            "--http-head-timeout",
            "60s",
        ]);
        let to = addr_of(&srv.url);
        let mut from2 = Vec::new();
        for _ in 0..200 {
            from2.push(connect_from("127.0.0.2", to).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let open = from2.iter().filter(|s| !closed_now(s)).count();
        assert_eq!(
            open, 50,
            "connections from 127.0.0.2 held past its cap of 50"
        );
        // The first 50 are the ones kept; the excess was closed at once.
        assert!(from2[..50].iter().all(|s| !closed_now(s)));
        // 127.0.0.1 is served, and another address holds connections of its own.
        health_served(&srv.url).await;
        let mut from3 = Vec::new();
        for _ in 0..20 {
            from3.push(connect_from("127.0.0.3", to).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(from3.iter().all(|s| !closed_now(s)));
        // Once 127.0.0.2 lets go of its connections, it is served again.
        drop(from2);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut s = connect_from("127.0.0.2", to).await.unwrap();
        let r = within(
            Duration::from_secs(10),
            "a request from 127.0.0.2",
            answer_on(&mut s, &health_request("")),
        )
        .await;
        assert_eq!(r.status, 200);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let _serial = SERIAL.lock().await;
    within(Duration::from_secs(60), "the idle test", async {
        let srv = Server::start_with(&["--in-memory", "--http-idle-timeout", "2s"]);
        let to = addr_of(&srv.url);
        // Idle after an answer: closed after 2 s.
        let (r, s) = exchange(to, &health_request("")).await;
        assert_eq!(r.status, 200);
        let answered = Instant::now();
        let at = closed_at(s, answered + Duration::from_secs(6))
            .await
            .expect("the idle connection still open 6 s after its answer");
        let after = at - answered;
        assert!(
            after >= Duration::from_millis(1_800) && after < Duration::from_secs(4),
            "closed {after:?} after the answer, the idle timeout is 2 s"
        );
        // A connection used every second stays open past the idle timeout.
        let (_, mut s) = exchange(to, &health_request("")).await;
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let r = answer_on(&mut s, &health_request("")).await;
            assert_eq!(r.status, 200);
        }
        // A head begun and not finished is held to the head deadline (default 15 s), not the
        // idle timeout: still open 3 s after its first byte.
        s.write_all(b"GET /_bluebatch/health HTTP/1.1\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            !closed_now(&s),
            "a request head in progress was cut at the idle timeout"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_heads_are_answered_with_a_batch_error() {
    let _serial = SERIAL.lock().await;
    within(Duration::from_secs(60), "the head-size test", async {
        let srv = Server::start();
        let to = addr_of(&srv.url);
        let many = |n: usize| -> String { (0..n).map(|i| format!("x-h{i}: v\r\n")).collect() };
        // host + 98 = 99 fields, then 100: served; 101: refused.
        for (extra, ok) in [(98, true), (99, true), (100, false)] {
            let (r, _) = exchange(to, &health_request(&many(extra))).await;
            if ok {
                assert_eq!(r.status, 200, "{} fields", extra + 1);
            } else {
                assert_eq!(r.status, 400, "{:?}", String::from_utf8_lossy(&r.body));
                assert_eq!(r.code(), "InvalidHeaderValue");
                assert_eq!(r.value("MaxLimit").as_deref(), Some("100"));
                assert!(r.value("Reason").unwrap().contains("101 header fields"));
                assert!(r.header("request-id").is_some());
            }
        }
        // 32 KiB for the request line and the fields: 30 000 bytes pass, 40 000 do not.
        let big = |n: usize| format!("x-big: {}\r\n", "a".repeat(n));
        let (r, _) = exchange(to, &health_request(&big(30_000))).await;
        assert_eq!(r.status, 200);
        let (r, _) = exchange(to, &health_request(&big(40_000))).await;
        assert_eq!(r.status, 400, "{:?}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.code(), "InvalidHeaderValue");
        assert_eq!(r.value("MaxLimit").as_deref(), Some("32768"));
        assert_eq!(r.value("HeaderName").as_deref(), Some("x-big"));
        // A signed request is refused the same way, before its authentication is looked at.
        let c = srv.client();
        let raw = c
            .req("GET", "/pools")
            .query(&format!("api-version={V}"))
            .into_raw_bytes(&[format!("x-big: {}", "a".repeat(40_000)).as_bytes()]);
        let r = common::raw_request(&srv.url, &raw).await.unwrap();
        assert_eq!(r.status, 400);
        assert_eq!(r.code(), "InvalidHeaderValue");
        // Far beyond (past twice the limit and 96 KiB), hyper itself answers a bare 431.
        let r = common::raw_request(&srv.url, &health_request(&big(100_000)))
            .await
            .unwrap();
        assert_eq!(r.status, 431);

        // The limits are flags.
        let srv = Server::start_with(&[
            "--in-memory",
            "--max-header-bytes",
            "4096",
            "--max-headers",
            "10",
        ]);
        let to = addr_of(&srv.url);
        let (r, _) = exchange(to, &health_request(&many(10))).await;
        assert_eq!(r.status, 400);
        assert_eq!(r.value("MaxLimit").as_deref(), Some("10"));
        let (r, _) = exchange(to, &health_request(&big(5_000))).await;
        assert_eq!(r.status, 400);
        assert_eq!(r.value("MaxLimit").as_deref(), Some("4096"));
        let (r, _) = exchange(to, &health_request(&big(3_000))).await;
        assert_eq!(r.status, 200);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_body_fails_with_a_batch_error_and_the_connection_closes() {
    let _serial = SERIAL.lock().await;
    within(Duration::from_secs(60), "the stalled-body test", async {
        let srv = Server::start_with(&["--in-memory", "--http-stall-timeout", "2s"]);
        let c = srv.client();
        let to = addr_of(&srv.url);
        let body = json!({"id": "stalled", "vmSize": "STANDARD_D2S_V3"}).to_string();
        let raw = c
            .req("POST", "/pools")
            .raw(body.into_bytes())
            .into_raw_bytes(&[]);
        let mut s = TcpStream::connect(to).await.unwrap();
        // Everything but the body's last 5 bytes, then nothing.
        s.write_all(&raw[..raw.len() - 5]).await.unwrap();
        let sent = Instant::now();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
        let took = sent.elapsed();
        let r = common::parse_http_response(&buf).expect("an answer to the stalled request");
        assert_eq!(r.status, 400, "{:?}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.code(), "InvalidRequestBody");
        assert!(
            r.value("Reason").unwrap().contains("2 s"),
            "{:?}",
            r.values()
        );
        assert_eq!(r.header("connection"), Some("close"));
        assert!(
            took >= Duration::from_millis(1_800) && took < Duration::from_secs(6),
            "answered {took:?} after the body stalled; the deadline is 2 s"
        );
        // Nothing was applied.
        let r = c
            .req("GET", "/pools/stalled")
            .send_within(Duration::from_secs(10))
            .await;
        assert_eq!(r.status, 404);
        // A body that keeps coming, slower than the deadline in total, is read.
        let body = json!({"id": "trickled", "vmSize": "STANDARD_D2S_V3"}).to_string();
        let raw = c
            .req("POST", "/pools")
            .raw(body.into_bytes())
            .into_raw_bytes(&[]);
        let mut s = TcpStream::connect(to).await.unwrap();
        let (head, body) = raw.split_at(raw.len() - 40);
        s.write_all(head).await.unwrap();
        for chunk in body.chunks(10) {
            tokio::time::sleep(Duration::from_millis(900)).await;
            s.write_all(chunk).await.unwrap();
        }
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
        let r = common::parse_http_response(&buf).expect("an answer to the trickled request");
        assert_eq!(r.status, 400, "{:?}", String::from_utf8_lossy(&r.body));
        // (the pool lacks its image: the body was read to its end and judged)
        assert_ne!(r.code(), "InvalidRequestBody", "{:?}", r.values());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_https_listener_has_the_same_limits() {
    let _serial = SERIAL.lock().await;
    within(Duration::from_secs(60), "the HTTPS test", async {
        let tls = Server::start_tls(&[
            "--in-memory",
            "--http-head-timeout",
            "2s",
            "--max-connections-per-source",
            "20",
        ]);
        let to = addr_of(&tls.https);
        // 30 connections from 127.0.0.2 that never start their TLS handshake.
        let mut held = Vec::new();
        for _ in 0..30 {
            held.push(connect_from("127.0.0.2", to).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let open = held.iter().filter(|s| !closed_now(s)).count();
        assert_eq!(open, 20, "the per-source cap of 20 on the HTTPS listener");
        // HTTPS from 127.0.0.1 is served meanwhile.
        let c = Client::with_ca(
            &tls.https,
            common::ACCOUNT,
            common::KEY,
            tls.ca.as_ref().unwrap(),
        );
        let r = c.control("GET", "/health").send_within(SERVED_WITHIN).await;
        assert_eq!(r.status, 200);
        // The silent ones are closed at the head deadline (the handshake counts within it).
        let start = Instant::now();
        for s in held {
            let at = closed_at(s, start + Duration::from_secs(6)).await;
            assert!(
                at.is_some(),
                "a silent TLS connection open past the head deadline"
            );
        }
        assert!(start.elapsed() >= Duration::from_millis(1_300));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_its_answers_is_closed_after_the_stall_timeout() {
    let _serial = SERIAL.lock().await;
    within(Duration::from_secs(90), "the unread-answer test", async {
        let srv = Server::start_with(&["--in-memory", "--http-stall-timeout", "2s"]);
        let to = addr_of(&srv.url);
        // A small receive buffer, and requests pipelined without reading a single answer: the
        // server's writes soon wait on the client.
        let s = TcpSocket::new_v4().unwrap();
        s.set_recv_buffer_size(4096).unwrap();
        let stream = tokio::time::timeout(Duration::from_secs(10), s.connect(to))
            .await
            .unwrap()
            .unwrap();
        let (mut rd, mut wr) = stream.into_split();
        let writer = tokio::spawn(async move {
            let one = health_request("");
            let batch: Vec<u8> = one
                .iter()
                .copied()
                .cycle()
                .take(one.len() * 1_000)
                .collect();
            let started = Instant::now();
            // At most 100 000 requests or 40 s; a write error means the server closed.
            for _ in 0..100 {
                if started.elapsed() > Duration::from_secs(40) {
                    return None;
                }
                match tokio::time::timeout(Duration::from_secs(40), wr.write_all(&batch)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return Some(Instant::now()),
                    Err(_) => return None,
                }
            }
            None
        });
        // Wait for the server to close: the writer's writes fail (within the stall timeout
        // after the server's writes began to wait, plus the time to fill the buffers).
        let closed = tokio::time::timeout(Duration::from_secs(45), writer)
            .await
            .expect("the writer is bounded")
            .unwrap();
        assert!(
            closed.is_some(),
            "the server kept a connection whose client reads nothing"
        );
        // What had been sent before the close reads, then the end (no endless stream).
        let mut buf = vec![0u8; 1 << 16];
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout_at(end.into(), rd.read(&mut buf)).await {
                Err(_) => panic!("the connection still delivers answers 10 s after its close"),
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(_)) => {}
            }
        }
        health_served(&srv.url).await;
    })
    .await;
}
