//! A listener with `WireConfig::agent_paths_only` (the one `serve --nodes sandbox` binds on a
//! sandboxed node's veth), over real HTTP: it serves the node protocol (join, desired state)
//! over plain HTTP even when the service has HTTPS, and answers every other path 404
//! `ResourceNotFound` with a Batch error body. The same service's ordinary listener keeps its
//! rules (the Batch API served, agents refused over plain HTTP when HTTPS exists), and only it
//! serves `GET /_bluebatch/metrics`.

use bluebatch_core::ServiceClock;
use bluebatch_core::model::NodeState;
use bluebatch_core::{NodeAccount, error::Code};
use bluebatch_protocol::{HostReport, JoinRequest, JoinResponse, ProviderKind};
use bluebatch_service::{BoxFuture, Config, NodeFabric, Service};
use bluebatch_wire::{App, WireConfig};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Every operation of a test is bounded by this.
const DEADLINE: Duration = Duration::from_secs(20);

/// No embedded nodes here: the pools of these tests are never made.
struct NoNodes;

impl NodeFabric for NoNodes {
    fn start_node<'a>(
        &'a self,
        _key: &'a str,
        _port: Option<u16>,
    ) -> BoxFuture<'a, std::io::Result<SocketAddr>> {
        Box::pin(async { Err(std::io::Error::other("no embedded nodes in this test")) })
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

async fn service() -> Service {
    let backend = bluebatch_store::SqliteBackend::in_memory().expect("an in-memory store");
    Service::start(
        backend,
        Arc::new(ServiceClock::new()),
        Arc::new(NoNodes),
        Config {
            sandbox_nodes: true,
            ..Config::default()
        },
    )
    .await
    .expect("the service starts")
}

/// Serves `config` for `svc` on a fresh loopback port until the test ends.
async fn listen(svc: &Service, config: WireConfig) -> SocketAddr {
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
    addr
}

/// As the service would be configured with HTTPS: its fingerprint set.
fn with_https() -> WireConfig {
    WireConfig {
        ca_fingerprint: Some(format!("sha256:{}", "ab".repeat(32))),
        ..WireConfig::default()
    }
}

/// One HTTP/1.1 request on its own connection: (status, body as JSON, or Null when empty).
async fn call(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, serde_json::Value) {
    tokio::time::timeout(DEADLINE, async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut req =
            format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() {
            req.push_str("Content-Type: application/json\r\n");
        }
        req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
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

fn host_report() -> HostReport {
    HostReport {
        hostname: "n0-0123abcd".into(),
        provider: ProviderKind::Sandbox,
        slots: 1,
        address: "198.19.0.2".into(),
        ssh_port: Some(22),
        reserved_names: Vec::new(),
        version: "test".into(),
    }
}

async fn join_body(svc: &Service) -> String {
    let token = svc
        .create_join_token(
            bluebatch_wire::DEV_ACCOUNT,
            Some("sb"),
            Duration::from_secs(600),
        )
        .await
        .expect("a join token")
        .token;
    serde_json::to_string(&JoinRequest {
        token,
        host: host_report(),
    })
    .unwrap()
}

fn assert_not_found(what: &str, (status, body): (u16, serde_json::Value)) {
    assert_eq!(status, 404, "{what}: {body}");
    assert_eq!(
        body["code"],
        Code::ResourceNotFound.as_str(),
        "{what}: {body}"
    );
    let message = body["message"]["value"].as_str().unwrap_or_default();
    assert!(message.contains("node protocol only"), "{what}: {message}");
    assert!(message.contains("RequestId:"), "{what}: {message}");
}

#[tokio::test]
async fn an_agents_only_listener_serves_the_node_protocol_and_nothing_else() {
    let svc = service().await;
    let addr = listen(
        &svc,
        WireConfig {
            agent_paths_only: true,
            ..with_https()
        },
    )
    .await;
    // The Batch API, the control endpoints, anything else: 404 ResourceNotFound.
    for (method, target) in [
        ("GET", "/pools?api-version=2023-11-01.18.0"),
        ("GET", "/"),
        ("GET", "/_bluebatch/health"),
        ("POST", "/_bluebatch/join-tokens"),
        ("GET", "/_bluebatch/accounts"),
        ("DELETE", "/pools/p?api-version=2023-11-01.18.0"),
    ] {
        assert_not_found(
            &format!("{method} {target}"),
            call(addr, method, target, &[], "").await,
        );
    }
    // A signed-looking request gets no further either.
    assert_not_found(
        "signed List Pools",
        call(
            addr,
            "GET",
            "/pools?api-version=2023-11-01.18.0",
            &[("Authorization", "SharedKey bluebatchdev:AAAA")],
            "",
        )
        .await,
    );

    // The node protocol over plain HTTP, though the service has HTTPS: join, then a poll.
    let (status, body) = call(
        addr,
        "POST",
        bluebatch_protocol::JOIN_PATH,
        &[],
        &join_body(&svc).await,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let joined: JoinResponse = serde_json::from_value(body).expect("a JoinResponse");
    let auth = format!("BluebatchNode {}", joined.credential);
    let (status, body) = call(
        addr,
        "GET",
        &format!("{}?wait=0", bluebatch_protocol::DESIRED_PATH),
        &[("Authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["nodes"], serde_json::json!([]));
    let hosts = svc.list_hosts(bluebatch_wire::DEV_ACCOUNT);
    assert_eq!(hosts.len(), 1);
    assert_eq!(hosts[0].provider, ProviderKind::Sandbox);
    // The node protocol's own errors are as on any listener.
    let (status, body) = call(addr, "GET", bluebatch_protocol::JOIN_PATH, &[], "").await;
    assert_eq!(status, 405, "{body}");
    assert_eq!(body["code"], "UnsupportedHttpVerb");
    let (status, body) = call(addr, "GET", bluebatch_protocol::DESIRED_PATH, &[], "").await;
    assert_eq!(status, 401, "{body}");
}

#[tokio::test]
async fn the_ordinary_listener_keeps_its_rules() {
    let svc = service().await;
    let addr = listen(&svc, with_https()).await;
    // The Batch API is there (unsigned: 401, not 404).
    let (status, body) = call(addr, "GET", "/pools?api-version=2023-11-01.18.0", &[], "").await;
    assert_eq!(status, 401, "{body}");
    // Plain HTTP to agents when the service has HTTPS: refused, the token left unused.
    let join = join_body(&svc).await;
    let (status, body) = call(addr, "POST", bluebatch_protocol::JOIN_PATH, &[], &join).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["code"], "AuthenticationFailed");
    assert!(svc.list_hosts(bluebatch_wire::DEV_ACCOUNT).is_empty());
    // The same token joins through an agents-only listener of the same service.
    let only = listen(
        &svc,
        WireConfig {
            agent_paths_only: true,
            ca_fingerprint: None,
            ..WireConfig::default()
        },
    )
    .await;
    let (status, body) = call(only, "POST", bluebatch_protocol::JOIN_PATH, &[], &join).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(svc.list_hosts(bluebatch_wire::DEV_ACCOUNT).len(), 1);
}

/// `GET target` on a connection of its own: (status, content-type, body).
async fn get_text(addr: SocketAddr, target: &str) -> (u16, String, String) {
    tokio::time::timeout(DEADLINE, async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.unwrap();
        let text = String::from_utf8(raw).expect("a UTF-8 answer");
        let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status line");
        let content_type = head
            .split("\r\n")
            .find_map(|l| {
                l.split_once(':')
                    .filter(|(k, _)| k.eq_ignore_ascii_case("content-type"))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_default();
        (status, content_type, body.to_string())
    })
    .await
    .expect("answered in time")
}

#[tokio::test]
async fn metrics_are_served_on_the_ordinary_listener_and_refused_on_an_agents_only_one() {
    let svc = service().await;
    let ordinary = listen(&svc, WireConfig::default()).await;
    let agents_only = listen(
        &svc,
        WireConfig {
            agent_paths_only: true,
            ..WireConfig::default()
        },
    )
    .await;

    let (status, content_type, body) = get_text(ordinary, "/_bluebatch/metrics").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    assert!(
        body.contains("# TYPE bluebatch_http_requests_total counter\n"),
        "{body}"
    );
    assert!(body.contains("\nbluebatch_agents_known 0\n"), "{body}");

    let (status, content_type, body) = get_text(agents_only, "/_bluebatch/metrics").await;
    assert_eq!(status, 404, "{body}");
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    let v: serde_json::Value = serde_json::from_str(&body).expect("a Batch error body");
    assert_eq!(v["code"], Code::ResourceNotFound.as_str(), "{body}");
    assert!(!body.contains("bluebatch_"), "{body}");
}
