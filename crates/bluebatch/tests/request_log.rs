//! One info line per request (target `bluebatch::http`): method, path, api-version, status, the
//! Batch error code of an error, duration, request-id and account; never the Authorization
//! header, the signature, other query values or bodies.

mod common;

use common::{Client, listening_url_within};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Logged {
    child: Child,
    url: String,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(extra: &[&str]) -> Logged {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bluebatch"))
        .args([
            "serve",
            "--in-memory",
            "--port",
            "0",
            "--node-step-ms",
            "20",
        ])
        .args(extra)
        .env("BLUEBATCH_LOG", "info")
        .env_remove("BLUEBATCH_LOG_FORMAT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let lines = stderr.clone();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            lines.lock().unwrap().push(l);
        }
    });
    let url = listening_url_within(&mut child, Duration::from_secs(30));
    Logged { child, url, stderr }
}

impl Logged {
    /// The log line that carries `request_id`, waiting for it at most 10 s.
    fn line_of(&self, request_id: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(l) = self
                .stderr
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(request_id) && l.contains("bluebatch::http"))
            {
                return l.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no request log line for {request_id}:\n{}",
                self.all()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn all(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }
}

const SECRET_PASSWORD: &str = "Pw-never-logged-42";
const SECRET_FILTER: &str = "never-logged-filter-value";

#[tokio::test(flavor = "multi_thread")]
async fn one_line_per_request_with_status_code_request_id_and_account() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let srv = serve(&[]);
        let c = Client::new(&srv.url, common::ACCOUNT, common::KEY);

        let r = c.req("GET", "/pools/nope").send().await;
        assert_eq!(r.status, 404);
        let id = r.header("request-id").unwrap().to_string();
        let line = srv.line_of(&id);
        for want in [
            "INFO",
            "bluebatch::http",
            "method=GET",
            "path=/pools/nope",
            "api_version=2023-11-01.18.0",
            "status=404",
            "code=PoolNotFound",
            "duration_ms=",
            &format!("request_id={id}"),
            "account=bluebatchdev",
        ] {
            assert!(line.contains(want), "{want:?} missing from {line:?}");
        }
        assert!(!line.contains("\x1b["), "colour in a piped log: {line:?}");

        // A success: no code; the query's other values are left out.
        let r = c
            .req("GET", "/pools")
            .query(&format!(
                "api-version={}&$filter=id%20eq%20'{SECRET_FILTER}'",
                common::V
            ))
            .send()
            .await;
        assert_eq!(r.status, 200);
        let line = srv.line_of(r.header("request-id").unwrap());
        assert!(
            line.contains("status=200") && line.contains("path=/pools "),
            "{line}"
        );
        assert!(!line.contains("code="), "{line}");

        // A write with a password in its body, and a refused signature.
        c.ready_pool("p", "linux", 1).await;
        let node = c.req("GET", "/pools/p/nodes").send().await.json()["value"][0]["id"]
            .as_str()
            .unwrap()
            .to_string();
        let r = c
            .req("POST", &format!("/pools/p/nodes/{node}/users"))
            .json(&json!({"name": "alice", "password": SECRET_PASSWORD}))
            .send()
            .await;
        assert_eq!(r.status, 201);
        let line = srv.line_of(r.header("request-id").unwrap());
        assert!(
            line.contains("method=POST") && line.contains("status=201"),
            "{line}"
        );
        let wrong = Client::new(&srv.url, common::ACCOUNT, "d3Jvbmcta2V5LXdyb25nLWtleQ==");
        let r = wrong.req("GET", "/pools").send().await;
        assert_eq!(r.status, 403);
        let line = srv.line_of(r.header("request-id").unwrap());
        assert!(
            line.contains("status=403") && line.contains("code=AuthenticationFailed"),
            "{line}"
        );
        // Unauthenticated: no account.
        let r = c.req("GET", "/pools").unsigned().send().await;
        let line = srv.line_of(r.header("request-id").unwrap());
        assert!(line.contains("status=401"), "{line}");
        assert!(!line.contains("account="), "{line}");

        let all = srv.all();
        for secret in [
            "SharedKey",
            "authorization",
            "Authorization",
            SECRET_PASSWORD,
            SECRET_FILTER,
            common::KEY,
        ] {
            assert!(!all.contains(secret), "the log holds {secret:?}:\n{all}");
        }
    })
    .await
    .expect("the test did not finish within 60 s");
}

#[tokio::test(flavor = "multi_thread")]
async fn json_request_lines_carry_the_fields() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let srv = serve(&["--log-format", "json"]);
        let c = Client::new(&srv.url, common::ACCOUNT, common::KEY);
        let r = c.req("POST", "/jobs").send().await;
        assert_eq!(r.status, 501);
        let id = r.header("request-id").unwrap().to_string();
        let line = srv.line_of(&id);
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        let field = |k: &str| {
            v.get(k)
                .or_else(|| v["fields"].get(k))
                .cloned()
                .unwrap_or(Value::Null)
        };
        assert_eq!(v["target"], "bluebatch::http", "{line}");
        assert_eq!(v["level"], "INFO", "{line}");
        assert_eq!(field("status"), 501, "{line}");
        assert_eq!(field("code"), "NotImplemented", "{line}");
        assert_eq!(field("method"), "POST", "{line}");
        assert_eq!(field("path"), "/jobs", "{line}");
        assert_eq!(field("request_id"), json!(id), "{line}");
        assert!(field("duration_ms").is_number(), "{line}");
    })
    .await
    .expect("the test did not finish within 60 s");
}
