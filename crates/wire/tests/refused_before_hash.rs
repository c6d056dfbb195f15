//! Add User and Update User with a password: the crypt hash (milliseconds of CPU) runs only for
//! a request the write would not refuse. A missing pool, node or user, a user already there, or
//! a node in a state that takes no user changes is answered as the write answers it (same
//! status, same Batch code) without hashing: the process's count of hashed passwords does not
//! move. Real HTTP over loopback, Shared Key signed, a real service on an in-memory SQLite store.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bluebatch_core::ServiceClock;
use bluebatch_core::crypt::passwords_hashed;
use bluebatch_core::model::NodeState;
use bluebatch_core::{NodeAccount, error::Code};
use bluebatch_service::{BoxFuture, Config, NodeFabric, Service};
use bluebatch_wire::http::{HeaderMap, HeaderValue, Method};
use bluebatch_wire::sharedkey::{Signed, authorization};
use bluebatch_wire::{App, DEV_ACCOUNT, DEV_KEY, WireConfig};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Every operation of the test is bounded by this.
const DEADLINE: Duration = Duration::from_secs(20);
const API: &str = "api-version=2023-11-01.18.0";

/// Nodes that come up at once and apply whatever they are told (no SSH endpoint is needed
/// here: nobody logs in).
struct InstantNodes;

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
async fn call(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: &str,
) -> (u16, serde_json::Value) {
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
    tokio::time::timeout(DEADLINE, async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut req = format!(
            "{method} {path}?{API} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAuthorization: {auth}\r\n"
        );
        for (k, v) in &h {
            req.push_str(&format!("{k}: {}\r\n", v.to_str().unwrap()));
        }
        req.push_str(&format!("\r\n{body}"));
        s.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.unwrap();
        let text = String::from_utf8(raw).expect("a UTF-8 answer");
        let (head, rest) = text.split_once("\r\n\r\n").expect("a head and a body");
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status line");
        let json = if rest.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(rest).unwrap_or_else(|e| panic!("not JSON ({e}): {rest}"))
        };
        (status, json)
    })
    .await
    .expect("the request answered in time")
}

/// `what` answered `status` with Batch error `code`, and hashed no password.
async fn refused_unhashed(
    addr: SocketAddr,
    what: &str,
    (method, path, body): (Method, &str, &str),
    status: u16,
    code: Code,
) {
    let before = passwords_hashed();
    let (got, answer) = call(addr, method, path, body).await;
    assert_eq!(got, status, "{what}: {answer}");
    assert_eq!(answer["code"], code.as_str(), "{what}: {answer}");
    assert_eq!(passwords_hashed(), before, "{what}: a password was hashed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_write_the_service_would_refuse_is_answered_without_hashing() {
    let backend = bluebatch_store::SqliteBackend::in_memory().expect("an in-memory store");
    let svc = Service::start(
        backend,
        Arc::new(ServiceClock::new()),
        Arc::new(InstantNodes),
        Config {
            node_step: Duration::from_millis(5),
            ..Config::default()
        },
    )
    .await
    .expect("the service starts");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Arc::new(App {
        service: svc.clone(),
        config: WireConfig::default(),
    });
    tokio::spawn(bluebatch_wire::serve(
        listener,
        app,
        std::future::pending::<()>(),
    ));

    let pool = serde_json::json!({
        "id": "p1", "vmSize": "standard_d2s_v3",
        "virtualMachineConfiguration": {
            "imageReference": {"publisher": "Canonical",
                "offer": "0001-com-ubuntu-server-jammy", "sku": "22_04-lts"},
            "nodeAgentSKUId": "batch.node.ubuntu 22.04"},
        "targetDedicatedNodes": 1,
    })
    .to_string();
    let (status, body) = call(addr, Method::POST, "/pools", &pool).await;
    assert_eq!(status, 201, "{body}");
    let until = Instant::now() + DEADLINE;
    let node = loop {
        let (nodes, _) = svc
            .list_nodes(DEV_ACCOUNT, "p1", &|_| true, None, 10)
            .expect("List Nodes");
        if let Some(n) = nodes.iter().find(|n| n.node.state == NodeState::Idle) {
            break n.node.id.clone();
        }
        assert!(Instant::now() < until, "no idle node in {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let users = format!("/pools/p1/nodes/{node}/users");
    let (status, body) = call(
        addr,
        Method::POST,
        &users,
        r#"{"name":"alice","password":"Pa55word!first"}"#,
    )
    .await;
    assert_eq!(status, 201, "{body}");

    let password = r#"{"password":"Pa55word!again"}"#;
    let add = r#"{"name":"bob","password":"Pa55word!again"}"#;
    let alice = format!("{users}/alice");
    let nobody = format!("{users}/nobody");
    for (what, request, status, code) in [
        (
            "Update User, missing pool",
            (Method::PUT, "/pools/nopool/nodes/n/users/alice", password),
            404,
            Code::PoolNotFound,
        ),
        (
            "Update User, missing node",
            (Method::PUT, "/pools/p1/nodes/nonode/users/alice", password),
            404,
            Code::NodeNotFound,
        ),
        (
            "Update User, missing user",
            (Method::PUT, nobody.as_str(), password),
            404,
            Code::NodeUserNotFound,
        ),
        (
            "Add User, missing pool",
            (Method::POST, "/pools/nopool/nodes/n/users", add),
            404,
            Code::PoolNotFound,
        ),
        (
            "Add User, missing node",
            (Method::POST, "/pools/p1/nodes/nonode/users", add),
            404,
            Code::NodeNotFound,
        ),
        (
            "Add User, user already there",
            (
                Method::POST,
                users.as_str(),
                r#"{"name":"alice","password":"Pa55word!again"}"#,
            ),
            409,
            Code::NodeUserExists,
        ),
    ] {
        refused_unhashed(addr, what, request, status, code).await;
    }

    // A node that takes no user changes in its state: refused (409) before the hash too.
    svc.set_node_state(DEV_ACCOUNT, "p1", &node, NodeState::Rebooting)
        .await
        .expect("the node's state set");
    refused_unhashed(
        addr,
        "Update User, node rebooting",
        (Method::PUT, alice.as_str(), password),
        409,
        Code::NodeBeingRebooted,
    )
    .await;
    refused_unhashed(
        addr,
        "Add User, node rebooting",
        (Method::POST, users.as_str(), add),
        409,
        Code::NodeBeingRebooted,
    )
    .await;
    svc.set_node_state(DEV_ACCOUNT, "p1", &node, NodeState::Idle)
        .await
        .expect("the node's state set");

    // The count does move for a write that goes ahead: one hash per accepted password.
    let before = passwords_hashed();
    let (status, body) = call(addr, Method::PUT, &alice, password).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(passwords_hashed(), before + 1);
    // A key-only update hashes nothing at all.
    let (status, body) = call(
        addr,
        Method::PUT,
        &alice,
        r#"{"sshPublicKey":"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDqfRXUCdfWYXiPUr6M5ilX4CZnWLqKtHdvxOBd7pxZ8 a@b"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(passwords_hashed(), before + 1);
}
