//! Logs a user can read: no ANSI colour when stderr is not a terminal, and `--log-format json`
//! (global flag, after or before the subcommand, or BLUEBATCH_LOG_FORMAT) gives one JSON object
//! per line.

mod common;

use common::{Client, listening_url_within};
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Starts `bluebatch [before] serve … [after]` with stderr to a pipe; returns it and its URL.
fn serve(before: &[&str], after: &[&str], env: &[(&str, &str)]) -> (Child, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bluebatch"));
    cmd.args(before)
        .args([
            "serve",
            "--in-memory",
            "--port",
            "0",
            "--node-step-ms",
            "20",
        ])
        .args(after)
        .env("BLUEBATCH_LOG", "info")
        .env_remove("BLUEBATCH_LOG_FORMAT")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let url = listening_url_within(&mut child, Duration::from_secs(30));
    (child, url)
}

/// Some traffic (a pool, a 404, an unauthenticated request), then SIGTERM; stderr as written.
async fn exercise_and_stop(mut child: Child, url: &str) -> String {
    let c = Client::new(url, common::ACCOUNT, common::KEY);
    c.ready_pool("logs", "linux", 1).await;
    assert_eq!(c.req("GET", "/pools/nope").send().await.status, 404);
    assert_eq!(c.req("GET", "/pools").unsigned().send().await.status, 401);
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "bluebatch did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    err
}

#[tokio::test(flavor = "multi_thread")]
async fn text_logs_to_a_pipe_have_no_colour() {
    let (child, url) = serve(&[], &[], &[]);
    let err = exercise_and_stop(child, &url).await;
    assert!(err.contains("ready"), "{err}");
    assert!(err.contains("INFO"), "{err}");
    assert!(
        !err.contains("\x1b["),
        "ANSI escapes in piped logs:\n{err:?}"
    );
}

fn assert_json_lines(err: &str) {
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty());
    let mut ready = false;
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}\nall:\n{err}"));
        assert!(v.is_object(), "{l}");
        assert!(v["timestamp"].is_string(), "{l}");
        assert!(v["level"].is_string(), "{l}");
        assert!(v["target"].is_string(), "{l}");
        if v["message"] == "ready" {
            ready = true;
            assert_eq!(v["level"], "INFO");
            assert!(v["elapsed_ms"].is_u64(), "fields are top-level: {l}");
        }
    }
    assert!(ready, "no ready line:\n{err}");
    assert!(!err.contains("\x1b["), "{err:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn log_format_json_gives_one_json_object_per_line() {
    let (child, url) = serve(&[], &["--log-format", "json"], &[]);
    assert_json_lines(&exercise_and_stop(child, &url).await);
    // Before the subcommand, and from the environment.
    let (child, url) = serve(&["--log-format", "json"], &[], &[]);
    assert_json_lines(&exercise_and_stop(child, &url).await);
    let (child, url) = serve(&[], &[], &[("BLUEBATCH_LOG_FORMAT", "json")]);
    assert_json_lines(&exercise_and_stop(child, &url).await);
}

#[test]
fn an_unknown_log_format_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_bluebatch"))
        .args(["--log-format", "xml", "pool", "list"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("text") && err.contains("json"), "{err}");
}
