//! What the wire tests share: nodes that come up at once, a real service on an in-memory
//! SQLite store behind a real loopback listener, and Shared Key signed HTTP/1.1 calls.
#![allow(dead_code)]

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bluebatch_core::NodeAccount;
use bluebatch_core::ServiceClock;
use bluebatch_core::model::NodeState;
use bluebatch_service::{BoxFuture, Config, NodeFabric, Service};
use bluebatch_wire::http::{HeaderMap, HeaderValue, Method};
use bluebatch_wire::sharedkey::{Signed, authorization};
use bluebatch_wire::{App, DEV_ACCOUNT, DEV_KEY, WireConfig};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Every operation of the test is bounded by this.
pub const DEADLINE: Duration = Duration::from_secs(20);
pub const API: &str = "api-version=2023-11-01.18.0";

/// Nodes that come up at once and apply whatever they are told (no SSH endpoint is needed
/// here: nobody logs in).
pub struct InstantNodes;

impl NodeFabric for InstantNodes {
    fn start_node<'a>(
        &'a self,
        _key: &'a str,
        _port: Option<u16>,
    ) -> BoxFuture<'a, std::io::Result<SocketAddr>> {
        Box::pin(async { Ok(SocketAddr::from(([127, 0, 0, 1], 9))) })
    }
    fn stop_node<'a>(&'a self, _key: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
    fn remove_node<'a>(&'a self, _key: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
    fn reimage_node<'a>(&'a self, _key: &'a str) -> BoxFuture<'a, std::io::Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn apply(&self, _key: &str, revision: u64, _accounts: Arc<[NodeAccount]>) -> u64 {
        revision
    }
    fn acknowledged<'a>(&'a self, _key: &'a str, _revision: u64) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
    fn applied_revision(&self, _key: &str) -> Option<u64> {
        None
    }
    fn accounts(&self, _key: &str) -> Vec<NodeAccount> {
        Vec::new()
    }
    fn set_state(&self, _key: &str, _state: NodeState) {}
}

/// One Shared Key signed HTTP/1.1 request on its own connection: (status, body as JSON, or
/// Null when empty).
pub async fn call(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    let (status, _, json) = call_full(addr, method, path, body).await;
    (status, json)
}

/// [`call`], with the answer's header fields (names lower-cased).
pub async fn call_full(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: &str,
) -> (u16, Vec<(String, String)>, serde_json::Value) {
    let date = bluebatch_core::timefmt::rfc1123(time::OffsetDateTime::now_utc());
    let mut h = HeaderMap::new();
    h.insert("ocp-date", HeaderValue::from_str(&date).unwrap());
    h.insert(
        "content-length",
        HeaderValue::from_str(&body.len().to_string()).unwrap(),
    );
    if !body.is_empty() {
        h.insert(
            "content-type",
            HeaderValue::from_static("application/json; odata=minimalmetadata"),
        );
    }
    let key = STANDARD.decode(DEV_KEY).unwrap();
    let auth = authorization(
        &Signed {
            method: &method,
            raw_path: path,
            raw_query: API,
            headers: &h,
        },
        DEV_ACCOUNT,
        &key,
    );
    let mut req = format!(
        "{method} {path}?{API} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAuthorization: {auth}\r\n"
    );
    for (k, v) in &h {
        req.push_str(&format!("{k}: {}\r\n", v.to_str().unwrap()));
    }
    req.push_str(&format!("\r\n{body}"));
    let raw = exchange(addr, &req).await;
    let json = if raw.body.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&raw.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", raw.body))
    };
    (raw.status, raw.headers, json)
}

/// An answer as read off the wire.
pub struct RawAnswer {
    pub status: u16,
    /// Header fields in order, names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl RawAnswer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `request` (a whole HTTP/1.1 request with `Connection: close`) on a connection of its
/// own and reads the answer to its end, within [`DEADLINE`].
pub async fn exchange(addr: SocketAddr, request: &str) -> RawAnswer {
    tokio::time::timeout(DEADLINE, async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.unwrap();
        let text = String::from_utf8(raw).expect("a UTF-8 answer");
        let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status line");
        let headers = head
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(": "))
            .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
            .collect();
        RawAnswer {
            status,
            headers,
            body: body.to_string(),
        }
    })
    .await
    .expect("the request answered in time")
}

/// A service with [`InstantNodes`] whose nodes move a step every `step`, served on a fresh
/// loopback port until the test ends.
pub async fn serve(step: Duration) -> (Service, SocketAddr) {
    serve_with(step, WireConfig::default()).await
}

/// [`serve`] with the wire settings `config` (accounts, limits).
pub async fn serve_with(step: Duration, config: WireConfig) -> (Service, SocketAddr) {
    let backend = bluebatch_store::SqliteBackend::in_memory().expect("an in-memory store");
    let svc = Service::start(
        backend,
        Arc::new(ServiceClock::new()),
        Arc::new(InstantNodes),
        Config {
            node_step: step,
            ..Config::default()
        },
    )
    .await
    .expect("the service starts");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Arc::new(App {
        service: svc.clone(),
        config,
    });
    tokio::spawn(bluebatch_wire::serve(
        listener,
        app,
        std::future::pending::<()>(),
    ));
    (svc, addr)
}

/// An Add Pool body: a Linux pool of `nodes` dedicated nodes.
pub fn pool_body(id: &str, nodes: u32) -> String {
    serde_json::json!({
        "id": id, "vmSize": "standard_d2s_v3",
        "virtualMachineConfiguration": {
            "imageReference": {"publisher": "Canonical",
                "offer": "0001-com-ubuntu-server-jammy", "sku": "22_04-lts"},
            "nodeAgentSKUId": "batch.node.ubuntu 22.04"},
        "targetDedicatedNodes": nodes,
    })
    .to_string()
}

/// Waits until the pool has `count` nodes (in any state); their ids.
pub async fn wait_nodes(svc: &Service, pool: &str, count: usize, idle: bool) -> Vec<String> {
    let until = Instant::now() + DEADLINE;
    loop {
        let (nodes, _) = svc
            .list_nodes(DEV_ACCOUNT, pool, &|_| true, None, 10_000)
            .expect("List Nodes");
        if nodes.len() == count && (!idle || nodes.iter().all(|n| n.node.state == NodeState::Idle))
        {
            return nodes.into_iter().map(|n| n.node.id).collect();
        }
        assert!(
            Instant::now() < until,
            "pool {pool}: not {count} nodes in {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
