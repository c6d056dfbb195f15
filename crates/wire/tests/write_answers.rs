//! The answer of a pool or node write (Add Pool, Resize, Remove Nodes, Reboot, Reimage,
//! Disable/Enable Scheduling) carries the resource's ETag, Last-Modified and DataServiceId as
//! the write left them, taken from the write itself: a Get right after shows the same ETag and
//! Last-Modified, and the DataServiceId names the resource by its ids as stored (the pool's case
//! kept), whatever case the request used.

mod common;

use bluebatch_core::model::{AllocationState, NodeState};
use bluebatch_wire::DEV_ACCOUNT;
use bluebatch_wire::http::Method;
use common::{DEADLINE, call_full, pool_body, serve, wait_nodes};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

fn header<'a>(headers: &'a [(String, String)], name: &str) -> &'a str {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {name} in {headers:?}"))
}

/// `write` answers `status` with the ETag and Last-Modified a Get of `get` shows right after,
/// and a DataServiceId of `data_service_id`.
async fn answered_as_stored(
    addr: SocketAddr,
    write: (Method, &str, &str),
    status: u16,
    get: &str,
    data_service_id: &str,
) {
    let what = format!("{} {}", write.0, write.1);
    let (got, headers, body) = call_full(addr, write.0, write.1, write.2).await;
    assert_eq!(got, status, "{what}: {body}");
    let (got, after, body) = call_full(addr, Method::GET, get, "").await;
    assert_eq!(got, 200, "GET {get}: {body}");
    for name in ["etag", "last-modified"] {
        assert_eq!(
            header(&headers, name),
            header(&after, name),
            "{what}: the answer's {name} against GET {get}"
        );
    }
    assert_eq!(
        header(&headers, "dataserviceid"),
        format!("http://{addr}{data_service_id}"),
        "{what}"
    );
}

async fn wait_steady(svc: &bluebatch_service::Service, pool: &str) {
    let until = Instant::now() + DEADLINE;
    while svc
        .get_pool(DEV_ACCOUNT, pool)
        .unwrap()
        .pool
        .allocation_state
        != AllocationState::Steady
    {
        assert!(
            Instant::now() < until,
            "pool {pool} not steady in {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_and_node_writes_answer_with_the_resource_as_the_write_left_it() {
    // Steps far apart compared with a loopback round trip: nothing moves between a write's
    // answer and the Get that follows it.
    let (svc, addr) = serve(Duration::from_millis(400)).await;
    answered_as_stored(
        addr,
        (Method::POST, "/pools", &pool_body("Pool1", 1)),
        201,
        "/pools/pool1",
        "/pools/Pool1",
    )
    .await;
    let node = wait_nodes(&svc, "pool1", 1, true).await.remove(0);
    wait_steady(&svc, "pool1").await;
    answered_as_stored(
        addr,
        (
            Method::POST,
            "/pools/POOL1/resize",
            r#"{"targetDedicatedNodes":1}"#,
        ),
        202,
        "/pools/pool1",
        "/pools/Pool1",
    )
    .await;
    wait_steady(&svc, "pool1").await;
    let node_path = format!("/pools/pool1/nodes/{node}");
    let node_url = format!("/pools/Pool1/nodes/{node}");
    for (op, status) in [
        ("disablescheduling", 200),
        ("enablescheduling", 200),
        ("reboot", 202),
        ("reimage", 202),
    ] {
        answered_as_stored(
            addr,
            (Method::POST, &format!("/pools/POOL1/nodes/{node}/{op}"), ""),
            status,
            &node_path,
            &node_url,
        )
        .await;
        let until = Instant::now() + DEADLINE;
        // Idle again (offline while scheduling is disabled).
        while !matches!(
            svc.get_node(DEV_ACCOUNT, "pool1", &node)
                .unwrap()
                .node
                .state,
            NodeState::Idle | NodeState::Offline
        ) {
            assert!(
                Instant::now() < until,
                "{op}: node not idle in {DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    answered_as_stored(
        addr,
        (
            Method::POST,
            "/pools/pool1/removenodes",
            &format!(r#"{{"nodeList":["{node}"]}}"#),
        ),
        202,
        "/pools/pool1",
        "/pools/Pool1",
    )
    .await;
}
