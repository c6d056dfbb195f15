//! README claims about the logs, against the real binary and the real OpenSSH client:
//! "Passwords, hashes, account keys and key material are never logged", and `BLUEBATCH_LOG`
//! takes tracing's filter syntax (`warn,bluebatch::ssh=info` for logins only).

mod common;

use common::{
    Client, SshOutcome, add_user, loopback_source, require_ssh, ssh_password_outcome, within,
};
use serde_json::json;
use std::process::Stdio;
use std::time::Duration;

const T: Duration = Duration::from_secs(10);

/// A server with `args` after `serve` (and `before` it), `BLUEBATCH_LOG` = `filter`; its URL,
/// the child and a task collecting its stderr until it exits.
async fn serve_logged(
    before: &[&str],
    args: &[&str],
    filter: &str,
) -> (
    String,
    tokio::process::Child,
    tokio::task::JoinHandle<String>,
) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_bluebatch"))
        .args(before)
        .args(["serve", "--port", "0", "--node-step-ms", "20"])
        .args(args)
        .env("BLUEBATCH_LOG", filter)
        .env_remove("BLUEBATCH_ACCOUNTS")
        .env_remove("BLUEBATCH_LOG_FORMAT")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(child.stdout.take().unwrap()));
    let url = within(T, "the listening line", async {
        loop {
            let l = out.next_line().await.unwrap().expect("exited early");
            if let Some(u) = l.strip_prefix("bluebatch listening on ") {
                break u.trim().to_string();
            }
        }
    })
    .await;
    tokio::spawn(async move { while let Ok(Some(_)) = out.next_line().await {} });
    let mut err = child.stderr.take().unwrap();
    let log = tokio::spawn(async move {
        let mut s = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut err, &mut s).await;
        s
    });
    (url, child, log)
}

/// SIGTERM, wait for the exit, and the whole log.
async fn stop(mut child: tokio::process::Child, log: tokio::task::JoinHandle<String>) -> String {
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    within(T, "the server stopping", child.wait())
        .await
        .unwrap();
    within(T, "the log", log).await.unwrap()
}

/// README, Logs: "Passwords, hashes, account keys and key material are never logged", checked
/// with the most verbose filter bluebatch's own targets have (`BLUEBATCH_LOG=debug`) over adds,
/// updates and logins with a password and a key, in text and JSON.
#[tokio::test(flavor = "multi_thread")]
async fn no_secret_reaches_the_log_even_at_debug() {
    require_ssh();
    within(Duration::from_secs(120), "the test", async {
        let dir = tempfile::tempdir().unwrap();
        let (key, public) = common::keypair(dir.path(), "logkey");
        let private = std::fs::read_to_string(&key).unwrap();
        let key_body = public.split_whitespace().nth(1).unwrap().to_string();
        for format in ["text", "json"] {
            let data = dir.path().join(format!("data-{format}"));
            let (url, child, log) = serve_logged(
                &["--log-format", format],
                &["--data-dir", data.to_str().unwrap()],
                "debug",
            )
            .await;
            let c = Client::new(&url, common::ACCOUNT, common::KEY);
            let nodes = c.ready_pool("p", "linux", 1).await;
            let n = &nodes[0];
            let port = c.ssh_port("p", n).await;
            add_user(
                &c,
                "p",
                n,
                json!({"name": "alice", "password": "First-secret-81x", "sshPublicKey": public}),
            )
            .await;
            let r = c
                .req("PUT", &Client::user_path("p", n, "alice"))
                .json(&json!({"password": "Second-secret-92y", "sshPublicKey": public}))
                .send_within(T)
                .await;
            assert_eq!(r.status, 200);
            let src = loopback_source(if format == "text" { 7301 } else { 7302 });
            let ok = ssh_password_outcome(port, "alice", "Second-secret-92y", &src, "echo a").await;
            assert_eq!(ok.stdout("password login").trim(), "a");
            assert_eq!(
                ssh_password_outcome(port, "alice", "Third-wrong-03z", &src, "true").await,
                SshOutcome::Refused
            );
            let ok = common::ssh_key_outcome(port, "alice", &key, &src, "echo k").await;
            assert_eq!(ok.stdout("key login").trim(), "k");
            let log = stop(child, log).await;
            assert!(
                log.contains("ssh login accepted"),
                "{format}: the log has the logins"
            );
            let key_b64 = common::KEY;
            for (what, secret) in [
                ("first password", "First-secret-81x"),
                ("second password", "Second-secret-92y"),
                ("wrong password", "Third-wrong-03z"),
                ("a crypt hash", "$6$"),
                ("the account key", key_b64),
                ("the public key's body", key_body.as_str()),
            ] {
                assert!(!log.contains(secret), "{format}: {what} in the log");
            }
            for line in private.lines().filter(|l| !l.starts_with("-----")) {
                assert!(
                    !log.contains(line),
                    "{format}: private key material in the log"
                );
            }
        }
    })
    .await;
}

/// `BLUEBATCH_LOG` "sets the filter in tracing's EnvFilter syntax … `warn,bluebatch::ssh=info`
/// for logins only": with it, logins are logged and requests are not; with `info`, both.
#[tokio::test(flavor = "multi_thread")]
async fn bluebatch_log_filters_by_target() {
    require_ssh();
    within(Duration::from_secs(90), "the test", async {
        for (filter, requests_logged) in [("warn,bluebatch::ssh=info", false), ("info", true)] {
            let (url, child, log) = serve_logged(&[], &["--in-memory"], filter).await;
            let c = Client::new(&url, common::ACCOUNT, common::KEY);
            let nodes = c.ready_pool("p", "linux", 1).await;
            let n = &nodes[0];
            add_user(
                &c,
                "p",
                n,
                json!({"name": "alice", "password": "Alice-pw-1"}),
            )
            .await;
            let port = c.ssh_port("p", n).await;
            let src = loopback_source(if requests_logged { 7701 } else { 7702 });
            let ok = ssh_password_outcome(port, "alice", "Alice-pw-1", &src, "echo in").await;
            assert_eq!(ok.stdout("login").trim(), "in");
            assert_eq!(
                ssh_password_outcome(port, "alice", "Wrong-pw-1", &src, "true").await,
                SshOutcome::Refused
            );
            let log = stop(child, log).await;
            assert!(log.contains("ssh login accepted"), "{filter}: {log}");
            assert!(log.contains("ssh login refused"), "{filter}: {log}");
            assert_eq!(
                log.contains("bluebatch::http"),
                requests_logged,
                "{filter}: request lines: {log}"
            );
        }
    })
    .await;
}
