//! `GET /_bluebatch/metrics` over real HTTP on the two kinds of listener of one service: the
//! ordinary one answers the Prometheus text; an agents-only listener (the one `serve --nodes
//! sandbox` binds on a sandboxed node's veth) refuses it as every non-agent path, 404
//! `ResourceNotFound`, so a sandboxed node cannot read the service's figures.

use bluebatch_core::ServiceClock;
use bluebatch_core::model::NodeState;
use bluebatch_core::{NodeAccount, error::Code};
use bluebatch_service::{BoxFuture, Config, NodeFabric, Service};
use bluebatch_wire::{App, WireConfig};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Every operation of the test is bounded by this.
const DEADLINE: Duration = Duration::from_secs(20);

/// No embedded nodes: the test makes no pool.
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

/// `GET target` on a connection of its own: (status, content-type, body).
async fn get(addr: SocketAddr, target: &str) -> (u16, String, String) {
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
    let backend = bluebatch_store::SqliteBackend::in_memory().expect("an in-memory store");
    let svc = Service::start(
        backend,
        Arc::new(ServiceClock::new()),
        Arc::new(NoNodes),
        Config {
            sandbox_nodes: true,
            ..Config::default()
        },
    )
    .await
    .expect("the service starts");
    let ordinary = listen(&svc, WireConfig::default()).await;
    let agents_only = listen(
        &svc,
        WireConfig {
            agent_paths_only: true,
            ..WireConfig::default()
        },
    )
    .await;

    let (status, content_type, body) = get(ordinary, "/_bluebatch/metrics").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    assert!(
        body.contains("# TYPE bluebatch_http_requests_total counter\n"),
        "{body}"
    );
    assert!(body.contains("\nbluebatch_agents_known 0\n"), "{body}");

    let (status, content_type, body) = get(agents_only, "/_bluebatch/metrics").await;
    assert_eq!(status, 404, "{body}");
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    let v: serde_json::Value = serde_json::from_str(&body).expect("a Batch error body");
    assert_eq!(v["code"], Code::ResourceNotFound.as_str(), "{body}");
    assert!(!body.contains("bluebatch_"), "{body}");
}
