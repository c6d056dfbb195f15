//! Helpers the agent suites share: the host report a hand-driven agent joins with, join tokens
//! made through the control endpoint, a pool's nodes polled until there are so many, and a
//! spawned agent's stderr echoed and kept.
#![allow(dead_code)]

use super::{Client, Resp, text, within};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The deadline of each request here, and of the whole of `wait_nodes`.
const T: Duration = Duration::from_secs(20);

/// A join's or heartbeat's host report: `hostname`, `slots`, the simulate provider on loopback.
pub fn report(hostname: &str, slots: u32) -> Value {
    json!({"hostname": hostname, "provider": "simulate", "slots": slots,
           "address": "127.0.0.1", "reservedNames": [], "version": "test"})
}

/// POST /_bluebatch/join-tokens with `body`; the answer.
pub async fn create_token(c: &Client, body: Value) -> Resp {
    c.control("POST", "/join-tokens")
        .json(&body)
        .send_within(T)
        .await
}

/// A token (ID.SECRET) for `pool` (or any pool).
pub async fn token(c: &Client, pool: Option<&str>) -> String {
    let body = match pool {
        Some(p) => json!({"pool": p}),
        None => json!({}),
    };
    let r = create_token(c, body).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    r.json()["token"].as_str().unwrap().to_string()
}

/// The nodes of `pool` (their JSON), polled until there are `n` of them.
pub async fn wait_nodes(c: &Client, pool: &str, n: usize) -> Vec<Value> {
    within(T, &format!("{pool} to have {n} node(s)"), async {
        loop {
            let r = c
                .req("GET", &format!("/pools/{pool}/nodes"))
                .send_within(T)
                .await;
            let nodes = r.json()["value"].as_array().cloned().unwrap_or_default();
            if nodes.len() == n {
                return nodes;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

/// Takes `child`'s piped stderr: each line echoed as `agent: ...` and kept in the returned log.
pub fn agent_log(child: &mut Child) -> Arc<Mutex<Vec<String>>> {
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = log.clone();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("agent: {line}");
            sink.lock().unwrap().push(line);
        }
    });
    log
}
