//! Each node between states moves on after its own step, through the real binary
//! (`--node-step-ms 500`): with another node's step timer pending, a node just rebooted or
//! reimaged stays `rebooting`/`reimaging` for a whole step (sampled with Get Node), refuses Add
//! User with 409 NodeBeingRebooted/NodeBeingReimaged meanwhile, and is then idle again.

mod common;

use common::{Client, Server, within};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const STEP: Duration = Duration::from_millis(500);
const REQ: Duration = Duration::from_secs(10);

async fn state(c: &Client, node: &str) -> String {
    let r = c
        .req("GET", &format!("/pools/p/nodes/{node}"))
        .send_within(REQ)
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()["state"].as_str().unwrap_or_default().to_string()
}

async fn restart(c: &Client, node: &str, how: &str) {
    let req = c.req("POST", &format!("/pools/p/nodes/{node}/{how}"));
    let req = if how == "reboot" {
        req.json(&json!({"nodeRebootOption": "requeue"}))
    } else {
        req
    };
    let r = req.send_within(REQ).await;
    assert_eq!(
        r.status,
        202,
        "{how} {node}: {}",
        String::from_utf8_lossy(&r.body)
    );
}

async fn wait_all_idle(c: &Client) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v: Value = c.req("GET", "/pools/p/nodes").send_within(REQ).await.json();
        if v["value"]
            .as_array()
            .is_some_and(|a| a.iter().all(|n| n["state"] == "idle"))
        {
            return;
        }
        assert!(Instant::now() < deadline, "nodes never idle again: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reboot_or_reimage_lasts_a_step_while_another_nodes_timer_fires() {
    within(Duration::from_secs(90), "the test", async {
        let srv = Server::start_exact(&["--in-memory", "--node-step-ms", "500"], &[]);
        let c = srv.client();
        let nodes = c.ready_pool("p", "linux", 2).await;
        let (a, b) = (nodes[0].as_str(), nodes[1].as_str());
        for (how, during, code) in [
            ("reboot", "rebooting", "NodeBeingRebooted"),
            ("reimage", "reimaging", "NodeBeingReimaged"),
        ] {
            restart(&c, b, how).await;
            tokio::time::sleep(STEP * 6 / 10).await;
            let asked = Instant::now();
            restart(&c, a, how).await;
            // B's step ends 40 % into A's; A must not follow it.
            let mut last_seen = asked;
            let mut refused = false;
            let give_up = asked + STEP * 6;
            loop {
                let now = Instant::now();
                let s = state(&c, a).await;
                if s != during {
                    assert_eq!(s, "idle", "A after its {how}");
                    break;
                }
                last_seen = now;
                if !refused && now >= asked + STEP * 6 / 10 {
                    let r = c
                        .req("POST", &format!("/pools/p/nodes/{a}/users"))
                        .json(&json!({"name": "during", "password": "Passw0rd!during"}))
                        .send_within(REQ)
                        .await;
                    assert_eq!(
                        (r.status, r.code().as_str()),
                        (409, code),
                        "Add User on A during its {how}"
                    );
                    refused = true;
                }
                assert!(now < give_up, "A still {during} after {:?}", STEP * 6);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let lasted = last_seen - asked;
            assert!(
                lasted >= STEP * 9 / 10,
                "A was {during} only {lasted:?} after its {how} was asked; the step is {STEP:?}"
            );
            assert!(refused, "A left {during} before the Add User check");
            wait_all_idle(&c).await;
        }
    })
    .await;
}
