//! Sandbox pools through the service API, as `serve --nodes sandbox`'s manager sees them: the
//! demand of a pool short of sandboxed nodes, the hosts of kind `sandbox` that back nothing any
//! more, the watch that wakes the manager, and the pool rules (which hosts back which pools,
//! Windows pools, services without sandboxed nodes, shared stores). Hosts are fake agents that
//! join, poll and acknowledge through the service, as a sandboxed node's agent does.

mod common;

use bluebatch_core::ServiceClock;
use bluebatch_core::error::Code;
use bluebatch_core::model::{AllocationState, NodeSource, NodeState, Os};
use bluebatch_core::pools::{parse_add_pool, parse_resize};
use bluebatch_protocol::{AckRequest, HostReport, JoinRequest, NodeAck, ProviderKind};
use bluebatch_service::{Config, SandboxDemand, Service};
use common::*;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

fn sandbox_config() -> Config {
    Config {
        sandbox_nodes: true,
        ..config()
    }
}

fn report(provider: ProviderKind, slots: u32, address: &str) -> HostReport {
    HostReport {
        hostname: "sandbox-under-test".into(),
        provider,
        slots,
        address: address.into(),
        ssh_port: (provider != ProviderKind::Simulate).then_some(22),
        reserved_names: Vec::new(),
        version: "test".into(),
    }
}

/// A fake agent: joins with a token (scoped to `pool` when given), then polls and acknowledges
/// whatever it is given until dropped.
struct Agent {
    host: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn join(svc: &Service, pool: Option<&str>, provider: ProviderKind, slots: u32) -> Agent {
    join_at(svc, pool, provider, slots, "198.19.0.2").await
}

async fn join_at(
    svc: &Service,
    pool: Option<&str>,
    provider: ProviderKind,
    slots: u32,
    address: &str,
) -> Agent {
    let token = svc
        .create_join_token(ACCOUNT, pool, Duration::from_secs(600))
        .await
        .expect("create join token")
        .token;
    let joined = tokio::time::timeout(
        Duration::from_secs(10),
        svc.join(JoinRequest {
            token,
            host: report(provider, slots, address),
        }),
    )
    .await
    .expect("join answered in time")
    .expect("join");
    resume(svc, &joined.host_id)
}

/// The agent of a host that joined earlier, polling and acknowledging from now on (after a
/// restart of the service, as a sandboxed node's agent resumes with its identity).
fn resume(svc: &Service, host: &str) -> Agent {
    let (svc, host) = (svc.clone(), host.to_string());
    let task = {
        let host = host.clone();
        tokio::spawn(async move {
            let mut cursor: Option<String> = None;
            loop {
                let Ok(d) = svc
                    .desired(&host, cursor.as_deref(), Duration::from_secs(5))
                    .await
                else {
                    return;
                };
                let ack = AckRequest {
                    nodes: d
                        .nodes
                        .iter()
                        .map(|n| NodeAck {
                            key: n.key.clone(),
                            revision: n.revision,
                            image: n.image,
                            ssh_port: None,
                            failures: Vec::new(),
                        })
                        .collect(),
                };
                let _ = svc.ack(&host, ack).await;
                cursor = Some(d.cursor);
            }
        })
    };
    Agent { host, task }
}

fn pool_body(id: &str, os: Os, dedicated: u32, nodes: Option<&str>) -> serde_json::Value {
    let image = match os {
        Os::Linux => json!({
            "imageReference": {"publisher": "Canonical",
                "offer": "0001-com-ubuntu-server-jammy", "sku": "22_04-lts"},
            "nodeAgentSKUId": "batch.node.ubuntu 22.04"}),
        Os::Windows => json!({
            "imageReference": {"publisher": "MicrosoftWindowsServer",
                "offer": "WindowsServer", "sku": "2022-datacenter"},
            "nodeAgentSKUId": "batch.node.windows amd64"}),
    };
    let mut body = json!({
        "id": id, "vmSize": "standard_d2s_v3",
        "virtualMachineConfiguration": image,
        "targetDedicatedNodes": dedicated,
    });
    if let Some(v) = nodes {
        body["metadata"] = json!([{"name": "bluebatch.nodes", "value": v}]);
    }
    body
}

async fn add(svc: &Service, body: serde_json::Value) -> Result<()> {
    let new = parse_add_pool(body.to_string().as_bytes(), 10_000).expect("a valid pool");
    svc.add_pool(ACCOUNT, new).await
}

/// A pool of `dedicated` nodes asking for sandboxed nodes, with `extra` properties.
async fn sandbox_pool(svc: &Service, id: &str, dedicated: u32, extra: serde_json::Value) {
    let mut body = pool_body(id, Os::Linux, dedicated, Some("sandbox"));
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    add(svc, body).await.expect("Add Pool");
}

async fn resize(svc: &Service, pool: &str, body: serde_json::Value) {
    let r = parse_resize(body.to_string().as_bytes(), 10_000).unwrap();
    svc.resize_pool(ACCOUNT, pool, r, &|_| Ok(()))
        .await
        .expect("Resize Pool");
}

async fn in_memory(cfg: Config) -> Harness {
    Harness::in_memory(cfg, AckMode::AtOnce).await
}

/// Waits for the pool to stop resizing (it gave up at its resize timeout) and returns it.
async fn gave_up(svc: &Service, pool: &str, what: &str) -> bluebatch_service::PoolView {
    eventually(what, || {
        svc.get_pool(ACCOUNT, pool).unwrap().pool.allocation_state == AllocationState::Steady
    })
    .await;
    svc.get_pool(ACCOUNT, pool).unwrap()
}

/// An Add Pool refused as InvalidPropertyValue, naming the metadata.
fn refused_naming_metadata(e: &bluebatch_core::error::BatchError, what: &str) {
    assert_eq!(e.code, Code::InvalidPropertyValue, "{what}");
    assert!(
        e.values
            .iter()
            .any(|(k, v)| k == "PropertyName" && v == "metadata"),
        "{what}: {:?}",
        e.values
    );
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < until, "{what}: not within 10 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn demand(svc: &Service) -> Vec<(String, u32)> {
    svc.sandbox_demand()
        .into_iter()
        .map(|d| {
            assert_eq!(d.account, ACCOUNT);
            (d.pool_id, d.missing)
        })
        .collect()
}

fn idle(svc: &Service) -> Vec<String> {
    let mut v: Vec<String> = svc
        .idle_sandbox_hosts()
        .into_iter()
        .map(|(account, host)| {
            assert_eq!(account, ACCOUNT);
            host
        })
        .collect();
    v.sort();
    v
}

/// The pool's nodes (id, host) whatever their state.
fn nodes_of(svc: &Service, pool: &str) -> Vec<(String, Option<String>, NodeState)> {
    let (nodes, _) = svc
        .list_nodes(ACCOUNT, pool, &|_| true, None, 10_000)
        .expect("List Nodes");
    nodes
        .into_iter()
        .map(|n| (n.node.id, n.node.host, n.node.state))
        .collect()
}

#[tokio::test]
async fn demand_is_the_nodes_a_sandbox_pool_lacks_and_drops_as_sandboxed_hosts_join() {
    deadline(async {
        // On disk: each commit takes a while, so the watcher below runs between a join's change
        // and the pool taking the host.
        let h = Harness::on_disk(sandbox_config(), AckMode::AtOnce).await;
        let mut watch = h.svc.capacity_changed();
        watch.borrow_and_update();
        assert!(demand(&h.svc).is_empty());
        sandbox_pool(
            &h.svc,
            "Sb",
            2,
            json!({"targetLowPriorityNodes": 1, "resizeTimeout": "PT1M"}),
        )
        .await;
        // The manager's watch moved: it wakes at once.
        assert!(watch.has_changed().unwrap());
        watch.borrow_and_update();
        assert_eq!(demand(&h.svc), vec![("Sb".to_string(), 3)]);
        assert_eq!(
            h.svc.sandbox_demand()[0],
            SandboxDemand {
                account: ACCOUNT.into(),
                pool_id: "Sb".into(),
                missing: 3
            }
        );
        let p = h.svc.get_pool(ACCOUNT, "Sb").unwrap();
        assert_eq!(p.pool.source, NodeSource::Sandbox);
        assert_eq!(p.pool.allocation_state, AllocationState::Resizing);
        assert!(
            h.nodes.told().is_empty(),
            "no embedded node: {:?}",
            h.nodes.told()
        );

        // While hosts join, none is ever idle: on every move of the watch (each state change,
        // the join's own included, before the pool takes the host) nothing is reported idle.
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let watcher = {
            let (svc, seen) = (h.svc.clone(), seen.clone());
            let mut rx = h.svc.capacity_changed();
            tokio::spawn(async move {
                while rx.changed().await.is_ok() {
                    let idle = svc.idle_sandbox_hosts();
                    seen.lock().unwrap().extend(idle);
                }
            })
        };
        let a = join_at(&h.svc, Some("sb"), ProviderKind::Sandbox, 1, "198.19.0.2").await;
        assert_eq!(demand(&h.svc), vec![("Sb".to_string(), 2)]);
        let b = join_at(&h.svc, Some("Sb"), ProviderKind::Sandbox, 1, "198.19.0.6").await;
        assert_eq!(demand(&h.svc), vec![("Sb".to_string(), 1)]);
        let c = join_at(&h.svc, Some("SB"), ProviderKind::Sandbox, 1, "198.19.0.10").await;
        assert!(demand(&h.svc).is_empty());
        let ids = h.wait_idle("Sb", 3).await;
        assert_eq!(ids.len(), 3);
        assert!(idle(&h.svc).is_empty());
        // Each sandboxed node is its own host, at its own address, port 22.
        let mut hosts: Vec<String> = Vec::new();
        for id in &ids {
            let v = h.svc.get_node(ACCOUNT, "Sb", id).unwrap();
            let host = v.node.host.clone().expect("host-backed");
            let addr = [(&a, "198.19.0.2"), (&b, "198.19.0.6"), (&c, "198.19.0.10")]
                .iter()
                .find(|(x, _)| x.host == host)
                .map(|(_, ip)| *ip)
                .expect("one of the sandboxed hosts");
            assert_eq!(v.node.ip_address, addr);
            assert_eq!(v.node.ssh_port, Some(22));
            let (ip, port, _) = h.svc.remote_login_settings(ACCOUNT, "Sb", id).unwrap();
            assert_eq!((ip.as_str(), port), (addr, 22));
            hosts.push(host);
        }
        hosts.sort();
        hosts.dedup();
        assert_eq!(hosts.len(), 3);
        watcher.abort();
        let seen = seen.lock().unwrap().clone();
        assert!(
            seen.is_empty(),
            "hosts reported idle while joining: {seen:?}"
        );

        // A machine that dies is revoked by the manager: the pool lacks a node again.
        watch.borrow_and_update();
        h.svc.revoke_host(ACCOUNT, &a.host).await.unwrap();
        assert!(watch.has_changed().unwrap());
        eventually("the pool asks for one node again", || {
            demand(&h.svc) == vec![("Sb".to_string(), 1)]
        })
        .await;
        let d = join_at(&h.svc, Some("Sb"), ProviderKind::Sandbox, 1, "198.19.0.14").await;
        h.wait_idle("Sb", 3).await;
        assert!(demand(&h.svc).is_empty());
        assert!(
            nodes_of(&h.svc, "Sb")
                .iter()
                .any(|(_, host, _)| host.as_deref() == Some(d.host.as_str()))
        );
        assert!(
            h.svc
                .get_pool(ACCOUNT, "Sb")
                .unwrap()
                .pool
                .resize_errors
                .is_empty()
        );
    })
    .await
}

#[tokio::test]
async fn sandbox_pools_take_only_sandboxed_hosts_and_other_pools_never_take_them() {
    deadline(async {
        let h = in_memory(sandbox_config()).await;
        let linux = join(&h.svc, None, ProviderKind::Linux, 1).await;
        let sim = join(&h.svc, None, ProviderKind::Simulate, 4).await;
        let sandbox = join(&h.svc, None, ProviderKind::Sandbox, 1).await;
        // Nothing to back yet: the unscoped sandboxed host is idle.
        assert_eq!(idle(&h.svc), vec![sandbox.host.clone()]);

        // Five free slots of linux and simulated hosts, one sandboxed host: the sandbox pool of
        // two takes the sandboxed host only, then gives up at its resize timeout.
        sandbox_pool(&h.svc, "sb", 2, json!({"resizeTimeout": "PT0.5S"})).await;
        let p = gave_up(&h.svc, "sb", "the sandbox pool gave up").await;
        assert_eq!(p.current_dedicated, 1);
        assert_eq!(p.pool.resize_errors.len(), 1);
        assert_eq!(p.pool.resize_errors[0].code, "AllocationTimedout");
        let nodes = nodes_of(&h.svc, "sb");
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].1.as_deref(), Some(sandbox.host.as_str()));
        for other in [&linux, &sim] {
            let v = h
                .svc
                .list_hosts(ACCOUNT)
                .into_iter()
                .find(|x| x.id == other.host)
                .unwrap();
            assert!(v.nodes.is_empty(), "{v:?}");
        }
        // It gave up: no demand until it is resized again.
        assert!(demand(&h.svc).is_empty());
        assert!(idle(&h.svc).is_empty());

        // Free the sandboxed host: an agents pool of seven takes every linux and simulated slot
        // (five) and never the sandboxed host.
        resize(&h.svc, "sb", json!({"targetDedicatedNodes": 0})).await;
        h.wait_idle("sb", 0).await;
        assert_eq!(idle(&h.svc), vec![sandbox.host.clone()]);
        let mut ag = pool_body("ag", Os::Linux, 7, Some("agents"));
        ag["resizeTimeout"] = json!("PT0.5S");
        add(&h.svc, ag).await.unwrap();
        gave_up(&h.svc, "ag", "the agents pool gave up").await;
        let nodes = nodes_of(&h.svc, "ag");
        assert_eq!(nodes.len(), 5, "{nodes:?}");
        assert!(
            nodes
                .iter()
                .all(|(_, host, _)| host.as_deref() != Some(sandbox.host.as_str())),
            "{nodes:?}"
        );
        assert_eq!(
            h.svc.get_pool(ACCOUNT, "ag").unwrap().pool.resize_errors[0].code,
            "AllocationTimedout"
        );
        // A sandbox pool is never short of what an agents pool lacks: no demand for it.
        assert!(demand(&h.svc).is_empty());
        assert_eq!(idle(&h.svc), vec![sandbox.host.clone()]);
    })
    .await
}

#[tokio::test]
async fn a_host_that_comes_back_as_another_provider_gives_up_the_nodes_it_cannot_back() {
    deadline(async {
        let h = in_memory(sandbox_config()).await;
        let a = join(&h.svc, Some("sb"), ProviderKind::Sandbox, 1).await;
        sandbox_pool(&h.svc, "sb", 1, json!({})).await;
        h.wait_idle("sb", 1).await;
        // The same host says it runs the plain linux provider now: a sandbox pool's node is
        // not its to back any more; the pool lacks it again.
        h.svc
            .hello(&a.host, report(ProviderKind::Linux, 1, "198.19.0.2"))
            .await
            .unwrap();
        eventually("the node left", || nodes_of(&h.svc, "sb").is_empty()).await;
        assert_eq!(demand(&h.svc), vec![("sb".to_string(), 1)]);
        // A linux host is never a sandboxed node's host: never idle in the manager's eyes.
        assert!(idle(&h.svc).is_empty());
    })
    .await
}

#[tokio::test]
async fn shrink_remove_nodes_and_delete_pool_make_hosts_idle_once_their_nodes_are_gone() {
    deadline(async {
        // Steps long enough to see a leaving node's host still busy.
        let cfg = Config {
            node_step: Duration::from_millis(400),
            ..sandbox_config()
        };
        let h = in_memory(cfg).await;
        sandbox_pool(&h.svc, "sb", 3, json!({})).await;
        let mut agents = Vec::new();
        for _ in 0..3 {
            agents.push(join(&h.svc, Some("sb"), ProviderKind::Sandbox, 1).await);
        }
        let ids = h.wait_idle("sb", 3).await;
        assert!(idle(&h.svc).is_empty());
        assert!(demand(&h.svc).is_empty());
        let host_of = |node: &str| {
            h.svc
                .get_node(ACCOUNT, "sb", node)
                .unwrap()
                .node
                .host
                .unwrap()
        };

        // Shrink to two: the leaving node's host is busy until the node is gone.
        let mut watch = h.svc.capacity_changed();
        watch.borrow_and_update();
        resize(&h.svc, "sb", json!({"targetDedicatedNodes": 2})).await;
        let leaving: Vec<_> = nodes_of(&h.svc, "sb")
            .into_iter()
            .filter(|(_, _, s)| *s == NodeState::LeavingPool)
            .collect();
        assert_eq!(leaving.len(), 1);
        let first = leaving[0].1.clone().unwrap();
        assert!(idle(&h.svc).is_empty(), "idle while its node is leaving");
        assert!(demand(&h.svc).is_empty());
        // The node's removal moves the watch: the manager learns the host is idle at once.
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                watch.changed().await.unwrap();
                if !idle(&h.svc).is_empty() {
                    break;
                }
            }
        })
        .await
        .expect("the watch moved as the host became idle");
        assert_eq!(idle(&h.svc), vec![first.clone()]);
        assert!(demand(&h.svc).is_empty());
        // Its desired state is empty: its agent removes the node's accounts.
        let d = h.svc.desired(&first, None, Duration::ZERO).await.unwrap();
        assert!(d.nodes.is_empty());

        // Remove Nodes: that node's host, once the node is gone.
        let remaining: Vec<String> = ids
            .iter()
            .filter(|id| nodes_of(&h.svc, "sb").iter().any(|(n, _, _)| n == *id))
            .cloned()
            .collect();
        assert_eq!(remaining.len(), 2);
        let second = host_of(&remaining[0]);
        h.svc
            .remove_nodes(ACCOUNT, "sb", &remaining[..1], &|_| Ok(()))
            .await
            .unwrap();
        assert_eq!(idle(&h.svc), vec![first.clone()]);
        eventually("the removed node's host is idle", || {
            idle(&h.svc).len() == 2
        })
        .await;
        let mut want = vec![first.clone(), second.clone()];
        want.sort();
        assert_eq!(idle(&h.svc), want);
        assert!(demand(&h.svc).is_empty());

        // Delete Pool: the last host is idle once its node is gone (the pool with it).
        h.wait_idle("sb", 1).await;
        let third = host_of(&remaining[1]);
        h.svc.delete_pool(ACCOUNT, "sb", &|_| Ok(())).await.unwrap();
        assert_eq!(
            idle(&h.svc).len(),
            2,
            "idle while the deleting pool's node is leaving"
        );
        eventually("every host idle", || idle(&h.svc).len() == 3).await;
        let mut want = vec![first, second, third];
        want.sort();
        assert_eq!(idle(&h.svc), want);
        eventually("the pool is gone", || {
            h.svc.get_pool(ACCOUNT, "sb").is_err()
        })
        .await;
        assert!(demand(&h.svc).is_empty());

        // The manager revokes idle hosts: nothing is left.
        for host in idle(&h.svc) {
            h.svc.revoke_host(ACCOUNT, &host).await.unwrap();
        }
        assert!(h.svc.list_hosts(ACCOUNT).is_empty());
        assert!(idle(&h.svc).is_empty());
        drop(agents);
    })
    .await
}

#[tokio::test]
async fn a_sandbox_pool_without_hosts_times_out_with_allocation_timedout() {
    deadline(async {
        let h = in_memory(sandbox_config()).await;
        sandbox_pool(&h.svc, "sb", 2, json!({"resizeTimeout": "PT0.3S"})).await;
        assert_eq!(demand(&h.svc), vec![("sb".to_string(), 2)]);
        let p = gave_up(&h.svc, "sb", "the pool gave up").await;
        assert_eq!(p.current_dedicated, 0);
        assert_eq!(p.pool.resize_errors.len(), 1);
        assert_eq!(p.pool.resize_errors[0].code, "AllocationTimedout");
        assert!(
            p.pool.resize_errors[0].message.contains("sandboxed nodes"),
            "{}",
            p.pool.resize_errors[0].message
        );
        assert!(demand(&h.svc).is_empty());
        // A new resize asks again, without the last one's errors.
        resize(
            &h.svc,
            "sb",
            json!({"targetDedicatedNodes": 1, "resizeTimeout": "PT1M"}),
        )
        .await;
        assert_eq!(demand(&h.svc), vec![("sb".to_string(), 1)]);
        let p = h.svc.get_pool(ACCOUNT, "sb").unwrap();
        assert_eq!(p.pool.allocation_state, AllocationState::Resizing);
        assert!(p.pool.resize_errors.is_empty());
        let _a = join(&h.svc, Some("sb"), ProviderKind::Sandbox, 1).await;
        h.wait_idle("sb", 1).await;
        assert!(demand(&h.svc).is_empty());
    })
    .await
}

#[tokio::test]
async fn windows_pools_get_embedded_nodes_by_default_and_are_refused_sandboxed_ones() {
    deadline(async {
        let cfg = Config {
            default_nodes: NodeSource::Sandbox,
            ..sandbox_config()
        };
        let h = in_memory(cfg).await;
        // Without the metadata item: a Windows pool's nodes are embedded ones.
        add(&h.svc, pool_body("win", Os::Windows, 2, None))
            .await
            .unwrap();
        assert_eq!(
            h.svc.get_pool(ACCOUNT, "win").unwrap().pool.source,
            NodeSource::Embedded
        );
        h.wait_idle("win", 2).await;
        // A Linux pool without it: sandboxed nodes, the default.
        add(&h.svc, pool_body("lin", Os::Linux, 1, None))
            .await
            .unwrap();
        assert_eq!(
            h.svc.get_pool(ACCOUNT, "lin").unwrap().pool.source,
            NodeSource::Sandbox
        );
        assert_eq!(demand(&h.svc), vec![("lin".to_string(), 1)]);
        // A Windows pool asking for them: refused, naming the metadata.
        let e = add(&h.svc, pool_body("win2", Os::Windows, 1, Some("sandbox")))
            .await
            .unwrap_err();
        refused_naming_metadata(&e, "a Windows pool of sandboxed nodes");
        let reason = e
            .values
            .iter()
            .find(|(k, _)| k == "Reason")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        assert!(reason.contains("Linux machines"), "{reason}");
        assert!(h.svc.get_pool(ACCOUNT, "win2").is_err());
        // A Windows pool asking for embedded or agents nodes is one as ever.
        add(&h.svc, pool_body("win3", Os::Windows, 1, Some("agents")))
            .await
            .unwrap();
        assert_eq!(
            h.svc.get_pool(ACCOUNT, "win3").unwrap().pool.source,
            NodeSource::Agents
        );
        assert_eq!(demand(&h.svc), vec![("lin".to_string(), 1)]);
    })
    .await
}

#[tokio::test]
async fn without_sandboxed_nodes_a_pool_asking_for_them_is_refused() {
    deadline(async {
        let h = in_memory(config()).await;
        assert!(!h.svc.config().sandbox_nodes);
        for os in [Os::Linux, Os::Windows] {
            let e = add(&h.svc, pool_body("sb", os, 1, Some("sandbox")))
                .await
                .unwrap_err();
            refused_naming_metadata(&e, &format!("{os:?}"));
            assert!(h.svc.get_pool(ACCOUNT, "sb").is_err());
        }
        assert!(demand(&h.svc).is_empty());
        // A sandboxed node's agent may still join (it backs nothing here).
        let a = join(&h.svc, None, ProviderKind::Sandbox, 1).await;
        add(&h.svc, pool_body("emb", Os::Linux, 1, None))
            .await
            .unwrap();
        h.wait_idle("emb", 1).await;
        assert_eq!(idle(&h.svc), vec![a.host.clone()]);
    })
    .await
}

#[tokio::test]
async fn a_shared_store_refuses_sandbox_pools() {
    deadline(async {
        let store = bluebatch_store::MemShared::new();
        let svc = Service::start_shared(
            Arc::new(store.clone()),
            "a".into(),
            Arc::new(ServiceClock::new()),
            TestNodes::new(AckMode::AtOnce),
            sandbox_config(),
        )
        .await
        .expect("replica starts");
        let e = add(&svc, pool_body("sb", Os::Linux, 1, Some("sandbox")))
            .await
            .unwrap_err();
        refused_naming_metadata(&e, "a shared store");
        assert!(svc.get_pool(ACCOUNT, "sb").is_err());
        assert!(svc.sandbox_demand().is_empty());
    })
    .await
}

#[tokio::test]
async fn after_a_restart_sandboxed_hosts_keep_their_nodes_and_nothing_is_idle_or_missing() {
    deadline(async {
        let h = Harness::on_disk(sandbox_config(), AckMode::AtOnce).await;
        sandbox_pool(&h.svc, "sb", 2, json!({})).await;
        let a = join(&h.svc, Some("sb"), ProviderKind::Sandbox, 1).await;
        let b = join(&h.svc, Some("sb"), ProviderKind::Sandbox, 1).await;
        let before = h.wait_idle("sb", 2).await;
        let hosts = [a.host.clone(), b.host.clone()];
        drop((a, b));
        let h = h.restart(AckMode::AtOnce).await;
        // What the manager reads at its start: both hosts known, each backing its node.
        let listed = h.svc.list_hosts(ACCOUNT);
        assert_eq!(listed.len(), 2, "{listed:?}");
        for x in &listed {
            assert_eq!(x.provider, ProviderKind::Sandbox);
            assert_eq!(x.nodes.len(), 1, "{x:?}");
            assert!(hosts.contains(&x.id));
        }
        assert!(demand(&h.svc).is_empty());
        assert!(idle(&h.svc).is_empty());
        // Their agents resume: the same nodes, idle.
        let _agents: Vec<Agent> = hosts.iter().map(|x| resume(&h.svc, x)).collect();
        let mut after = h.wait_idle("sb", 2).await;
        let mut before = before;
        before.sort();
        after.sort();
        assert_eq!(before, after);
        resize(&h.svc, "sb", json!({"targetDedicatedNodes": 1})).await;
        eventually("one host idle", || idle(&h.svc).len() == 1).await;
    })
    .await
}
