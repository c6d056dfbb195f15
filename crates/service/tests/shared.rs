//! Two replicas of the service on one shared store (the in-process `MemShared`, which behaves as
//! PostgreSQL does for them): reads see every replica's writes, conflicting writes on two
//! replicas resolve as on one, acknowledgements cross replicas, background work moves to the
//! other replica when its holder goes, and a store outage answers `ServerBusy`.

mod common;

use bluebatch_core::ServiceClock;
use bluebatch_core::error::Code;
use bluebatch_core::model::{AllocationState, NodeState};
use bluebatch_core::pools::parse_add_pool;
use bluebatch_protocol::{AckRequest, HostReport, JoinRequest, NodeAck, ProviderKind};
use bluebatch_service::{Config, Service};
use bluebatch_store::MemShared;
use common::*;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

fn shared_config() -> Config {
    Config {
        ack_timeout: Duration::from_secs(5),
        ..config()
    }
}

async fn replica(store: &MemShared, name: &str) -> Service {
    replica_with(store, name, shared_config()).await
}

async fn replica_with(store: &MemShared, name: &str, config: Config) -> Service {
    let fabric = TestNodes::new(AckMode::AtOnce);
    Service::start_shared(
        Arc::new(store.clone()),
        name.to_string(),
        Arc::new(ServiceClock::new()),
        fabric,
        config,
    )
    .await
    .expect("replica starts")
}

/// Which replica a test's pool is made through.
enum Through {
    A,
    B,
}

/// Replicas A and B on one store, a one-slot host joined and polling through A, and pool `p`
/// of one node made through `via`, idle: (store, A, B, the node, the agent's task).
async fn one_node_pool(
    via: Through,
) -> (
    MemShared,
    Service,
    Service,
    String,
    tokio::task::JoinHandle<()>,
) {
    let store = MemShared::new();
    let a = replica(&store, "a").await;
    let b = replica(&store, "b").await;
    let agent = agent(&a, &a, 1).await;
    add_agents_pool(
        match via {
            Through::A => &a,
            Through::B => &b,
        },
        "p",
        1,
    )
    .await;
    let node = idle_nodes(&a, "p", 1, Duration::from_secs(10))
        .await
        .remove(0);
    (store, a, b, node, agent)
}

/// Replica A, holding the background lease (it starts first and renews it every second),
/// then replica B, both with `config`.
async fn holder_then_other(store: &MemShared, config: Config) -> (Service, Service) {
    let a = replica_with(store, "a", config.clone()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    (a, replica_with(store, "b", config).await)
}

/// A simulated host joined through `on`, polling and acknowledging through `polls` (another
/// replica, if the test wants), until the task is dropped.
async fn agent(on: &Service, polls: &Service, slots: u32) -> tokio::task::JoinHandle<()> {
    agent_failing(on, polls, slots, None).await
}

/// [`agent`] whose provider fails every account with `fail` (when given).
async fn agent_failing(
    on: &Service,
    polls: &Service,
    slots: u32,
    fail: Option<&str>,
) -> tokio::task::JoinHandle<()> {
    let id = join_sim(on, slots).await;
    poll_and_ack(polls.clone(), id, Duration::from_secs(2), fail)
}

/// Joins a simulated host of `slots` nodes through `on`: its host id.
async fn join_sim(on: &Service, slots: u32) -> String {
    let token = on
        .create_join_token(ACCOUNT, None, Duration::from_secs(600))
        .await
        .expect("token")
        .token;
    let host = HostReport {
        hostname: "sim".into(),
        provider: ProviderKind::Simulate,
        slots,
        address: "198.18.0.9".into(),
        ssh_port: None,
        reserved_names: Vec::new(),
        version: "test".into(),
    };
    on.join(JoinRequest { token, host })
        .await
        .expect("join")
        .host_id
}

/// Long-polls (`wait` each) and acknowledges host `id`'s desired state through `svc`, as an
/// agent does, until the task is aborted; with `fail`, every account fails with that reason.
fn poll_and_ack(
    svc: Service,
    id: String,
    wait: Duration,
    fail: Option<&str>,
) -> tokio::task::JoinHandle<()> {
    let fail = fail.map(str::to_string);
    tokio::spawn(async move {
        let mut cursor: Option<String> = None;
        loop {
            let Ok(d) = svc.desired(&id, cursor.as_deref(), wait).await else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
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
                        failures: match &fail {
                            Some(reason) => n
                                .accounts
                                .iter()
                                .map(|a| bluebatch_protocol::UserFailure {
                                    name: a.name.clone(),
                                    reason: reason.clone(),
                                })
                                .collect(),
                            None => Vec::new(),
                        },
                    })
                    .collect(),
            };
            if svc.ack(&id, ack).await.is_ok() && fail.is_none() {
                cursor = Some(d.cursor);
            } else {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    })
}

async fn add_agents_pool(svc: &Service, id: &str, nodes: u32) {
    let body = json!({
        "id": id, "vmSize": "standard_d2s_v3",
        "virtualMachineConfiguration": {"imageReference": {"publisher": "Canonical",
            "offer": "0001-com-ubuntu-server-jammy", "sku": "22_04-lts"},
            "nodeAgentSKUId": "batch.node.ubuntu 22.04"},
        "targetDedicatedNodes": nodes,
        "metadata": [{"name": "bluebatch.nodes", "value": "agents"}],
    });
    let new = parse_add_pool(body.to_string().as_bytes(), 10_000).expect("a valid pool");
    svc.add_pool(ACCOUNT, new).await.expect("Add Pool");
}

/// Waits (reading through `svc`) until the pool is steady with `count` idle nodes.
async fn idle_nodes(svc: &Service, pool: &str, count: usize, within: Duration) -> Vec<String> {
    let until = Instant::now() + within;
    loop {
        svc.sync().await.expect("sync");
        let (nodes, _) = svc
            .list_nodes(ACCOUNT, pool, &|_| true, None, 10_000)
            .expect("List Nodes");
        let steady = svc
            .get_pool(ACCOUNT, pool)
            .expect("Get Pool")
            .pool
            .allocation_state
            == AllocationState::Steady;
        if steady && nodes.len() == count && nodes.iter().all(|n| n.node.state == NodeState::Idle) {
            return nodes.into_iter().map(|n| n.node.id).collect();
        }
        assert!(
            Instant::now() < until,
            "pool {pool} not steady with {count} idle nodes: {:?}",
            nodes.iter().map(|n| n.node.state).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The node as `svc` reads it once the record of its acknowledgement is in: a write on a
/// shared store answers at the acknowledgement, and its record commits just after.
async fn applied_on(svc: &Service, pool: &str, node: &str) -> bluebatch_core::model::Node {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        svc.sync().await.unwrap();
        let n = svc.get_node(ACCOUNT, pool, node).expect("Get Node").node;
        if n.applied_revision >= Some(n.users_revision) {
            return n;
        }
        assert!(Instant::now() < until, "the ack's record never came: {n:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The outcome's error code (`None`: it succeeded).
fn outcome<T>(r: bluebatch_core::error::Result<T>) -> Option<Code> {
    r.err().map(|e| e.code)
}

fn user(name: &str) -> bluebatch_core::users::UserBody {
    bluebatch_core::users::parse_add_user(
        json!({"name": name, "sshPublicKey": KEY1})
            .to_string()
            .as_bytes(),
    )
    .expect("a valid user")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_on_one_replica_are_read_and_acknowledged_through_the_other() {
    deadline(async {
        let store = MemShared::new();
        let a = replica(&store, "a").await;
        let b = replica(&store, "b").await;
        // The host joins through A and polls B; the pool is made on A.
        let _agent = agent(&a, &b, 2).await;
        add_agents_pool(&a, "p", 2).await;
        let nodes = idle_nodes(&b, "p", 2, Duration::from_secs(10)).await;
        assert_eq!(idle_nodes(&a, "p", 2, Duration::from_secs(5)).await, nodes);
        // A write on A answers once the agent, polling B, applied it.
        let w = a
            .add_user(at("p", &nodes[0]), user("alice"), None)
            .await
            .expect("Add User through A");
        let n = applied_on(&b, "p", &nodes[0]).await;
        assert!(n.users_revision >= 1);
        // The user is there on B, with A's ETag.
        let users = b.node_users(ACCOUNT, "p", &nodes[0]).expect("users on B");
        assert!(
            users.stored.iter().any(|u| u.name == "alice"),
            "{:?}",
            users.stored.len()
        );
        assert!(!w.etag.is_empty());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_user_added_on_two_replicas_at_once_is_created_once() {
    deadline(async {
        let (_store, a, b, node, _agent) = one_node_pool(Through::B).await;
        for round in 0..20 {
            let name = format!("u{round}");
            let (ra, rb) = tokio::join!(
                a.add_user(at("p", &node), user(&name), None),
                b.add_user(at("p", &node), user(&name), None)
            );
            let codes = [outcome(ra), outcome(rb)];
            let created = codes.iter().filter(|c| c.is_none()).count();
            let exists = codes
                .iter()
                .filter(|c| **c == Some(Code::NodeUserExists))
                .count();
            assert_eq!((created, exists), (1, 1), "round {round}: {codes:?}");
        }
        a.sync().await.unwrap();
        b.sync().await.unwrap();
        let on_a = a.node_users(ACCOUNT, "p", &node).unwrap().stored.len();
        let on_b = b.node_users(ACCOUNT, "p", &node).unwrap().stored.len();
        assert_eq!((on_a, on_b), (20, 20));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_replica_finishes_the_allocation_of_a_replica_that_went() {
    deadline(async {
        let store = MemShared::new();
        // Steps slow enough that the allocation is still under way when A goes.
        let slow = Config {
            node_step: Duration::from_millis(300),
            ..shared_config()
        };
        let (a, b) = holder_then_other(&store, slow).await;
        let _agent = agent(&b, &b, 3).await;
        // A goes while its pool allocates (a replica shut down; one killed is the binary's
        // tests): the steps are B's from then on.
        add_agents_pool(&a, "p", 3).await;
        a.shutdown().await;
        b.sync().await.unwrap();
        assert_eq!(
            b.get_pool(ACCOUNT, "p").unwrap().pool.allocation_state,
            AllocationState::Resizing,
            "A went before the allocation was done"
        );
        let nodes = idle_nodes(&b, "p", 3, Duration::from_secs(15)).await;
        assert_eq!(nodes.len(), 3);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_answers_server_busy_and_loses_nothing_acknowledged() {
    deadline(async {
        let (store, a, b, node, _agent) = one_node_pool(Through::A).await;
        a.add_user(at("p", &node), user("kept"), None)
            .await
            .expect("before");
        store.set_down(true);
        assert_eq!(
            code(a.add_user(at("p", &node), user("lost"), None).await),
            Code::ServerBusy
        );
        assert_eq!(code(b.sync().await), Code::ServerBusy);
        assert_eq!(code(a.ready().await), Code::ServerBusy);
        store.set_down(false);
        a.ready().await.expect("ready again");
        // The refused write is nowhere, on either replica; the acknowledged one everywhere.
        for svc in [&a, &b] {
            svc.sync().await.expect("sync after the outage");
            let names: Vec<String> = svc
                .node_users(ACCOUNT, "p", &node)
                .unwrap()
                .stored
                .iter()
                .map(|u| u.name.clone())
                .collect();
            assert_eq!(names, ["kept"]);
        }
        // And writes work again.
        b.add_user(at("p", &node), user("after"), None)
            .await
            .expect("after");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_behind_the_change_log_reads_the_whole_snapshot() {
    deadline(async {
        let (store, a, b, node, _agent) = one_node_pool(Through::A).await;
        a.add_user(at("p", &node), user("one"), None).await.unwrap();
        store.prune();
        b.sync().await.unwrap();
        let names = b.node_users(ACCOUNT, "p", &node).unwrap().stored.len();
        assert_eq!(names, 1);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_acknowledged_to_one_replica_answers_the_write_waiting_on_the_other() {
    deadline(async {
        let store = MemShared::new();
        let a = replica(&store, "a").await;
        let b = replica(&store, "b").await;
        let _agent = agent_failing(&a, &b, 1, Some("useradd exited 1: disk full")).await;
        add_agents_pool(&a, "p", 1).await;
        let node = idle_nodes(&a, "p", 1, Duration::from_secs(10))
            .await
            .remove(0);
        let e = a
            .add_user(at("p", &node), user("carol"), None)
            .await
            .expect_err("the host failed it");
        assert_eq!(e.code, Code::InternalError);
        let msg = e.message.unwrap_or_default();
        assert!(msg.contains("carol: useradd exited 1: disk full"), "{msg}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_polling_one_replica_goes_unknown_and_back_by_the_holders_sweep_again_and_again() {
    deadline(async {
        let store = MemShared::new();
        let quick = Config {
            agent_grace: Duration::from_millis(400),
            ..shared_config()
        };
        // The host joins and polls through B.
        let (a, b) = holder_then_other(&store, quick).await;
        let id = join_sim(&b, 1).await;
        let poller =
            |svc: Service, id: String| poll_and_ack(svc, id, Duration::from_millis(200), None);
        let mut polling = poller(b.clone(), id.clone());
        add_agents_pool(&a, "p", 1).await;
        let node = idle_nodes(&a, "p", 1, Duration::from_secs(10))
            .await
            .remove(0);
        for round in 0..2 {
            polling.abort();
            let until = Instant::now() + Duration::from_secs(10);
            loop {
                a.sync().await.unwrap();
                if a.get_node(ACCOUNT, "p", &node).unwrap().node.state == NodeState::Unknown {
                    break;
                }
                assert!(Instant::now() < until, "round {round}: never unknown");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            polling = poller(b.clone(), id.clone());
            let back = idle_nodes(&a, "p", 1, Duration::from_secs(10)).await;
            assert_eq!(back, std::slice::from_ref(&node), "round {round}");
            // Keep polling a while: the holder must not call it away while it polls B.
            tokio::time::sleep(Duration::from_millis(900)).await;
            assert_eq!(
                idle_nodes(&a, "p", 1, Duration::from_secs(1)).await.len(),
                1
            );
        }
        polling.abort();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_nodes_on_a_shared_store_is_a_paged_query_of_the_store() {
    deadline(async {
        let store = MemShared::new();
        let a = replica(&store, "a").await;
        let b = replica(&store, "b").await;
        let _agent = agent(&a, &a, 5).await;
        add_agents_pool(&a, "p", 5).await;
        let mut all = idle_nodes(&a, "p", 5, Duration::from_secs(10)).await;
        all.sort();
        // Idle in the store too (A's cache shows a change as soon as it is decided, before the
        // batch that holds it commits): what B reads.
        idle_nodes(&b, "p", 5, Duration::from_secs(10)).await;
        // Pages of 2 through B, each continuing after the last id of the one before.
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let (page, more) = b
                .list_nodes_query(ACCOUNT, "p", &|_| true, after.as_deref(), None, 2)
                .await
                .expect("List Nodes");
            assert!(page.len() <= 2);
            seen.extend(page.iter().map(|v| v.node.id.clone()));
            after = seen.last().cloned();
            if !more {
                break;
            }
        }
        assert_eq!(seen, all);
        // The state narrows the query; the filter still decides.
        let (idle, _) = b
            .list_nodes_query(ACCOUNT, "p", &|_| true, None, Some("idle"), 100)
            .await
            .unwrap();
        assert_eq!(idle.len(), 5);
        let (none, more) = b
            .list_nodes_query(ACCOUNT, "p", &|_| true, None, Some("rebooting"), 100)
            .await
            .unwrap();
        assert!(none.is_empty() && !more);
        let (one, more) = b
            .list_nodes_query(ACCOUNT, "p", &|v| v.node.id == all[3], None, None, 100)
            .await
            .unwrap();
        assert_eq!((one.len(), more), (1, false));
        assert_eq!(one[0].pool_id, "p");
        assert_eq!(
            code(
                b.list_nodes_query(ACCOUNT, "nope", &|_| true, None, None, 10)
                    .await
            ),
            Code::PoolNotFound
        );
    })
    .await
}

/// [`MemShared`] whose commits take `delay`, as a database's round trip and WAL flush do.
/// The store with commits that take a while (a database's flush) and a lock taken only while
/// the third field is true (another replica holding it, as far as this one can tell).
struct SlowCommits(MemShared, Duration, tokio::sync::watch::Receiver<bool>);

struct SlowLocked(Box<dyn bluebatch_store::Locked>, Duration);

impl bluebatch_store::Locked for SlowLocked {
    fn rev(&self) -> u64 {
        self.0.rev()
    }
    fn changes_since(
        &mut self,
        after: u64,
    ) -> bluebatch_store::BoxFuture<'_, bluebatch_store::Result<Option<Vec<bluebatch_store::Change>>>>
    {
        self.0.changes_since(after)
    }
    fn snapshot(
        &mut self,
    ) -> bluebatch_store::BoxFuture<'_, bluebatch_store::Result<bluebatch_store::Snapshot>> {
        self.0.snapshot()
    }
    fn commit(
        self: Box<Self>,
        ops: Vec<bluebatch_store::Op>,
    ) -> bluebatch_store::BoxFuture<'static, bluebatch_store::Result<u64>> {
        let (inner, delay) = (self.0, self.1);
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            inner.commit(ops).await
        })
    }
}

impl bluebatch_store::SharedBackend for SlowCommits {
    fn snapshot(
        &self,
    ) -> bluebatch_store::BoxFuture<'_, bluebatch_store::Result<bluebatch_store::Snapshot>> {
        self.0.snapshot()
    }
    fn head(&self) -> bluebatch_store::BoxFuture<'_, bluebatch_store::Result<u64>> {
        self.0.head()
    }
    fn changes_since(
        &self,
        after: u64,
    ) -> bluebatch_store::BoxFuture<'_, bluebatch_store::Result<Option<Vec<bluebatch_store::Change>>>>
    {
        self.0.changes_since(after)
    }
    fn lock(
        &self,
    ) -> bluebatch_store::BoxFuture<'_, bluebatch_store::Result<Box<dyn bluebatch_store::Locked>>>
    {
        Box::pin(async move {
            let _ = self.2.clone().wait_for(|open| *open).await;
            let l = self.0.lock().await?;
            Ok(Box::new(SlowLocked(l, self.1)) as Box<dyn bluebatch_store::Locked>)
        })
    }
    fn claim_lease<'a>(
        &'a self,
        name: &'a str,
        holder: &'a str,
        ttl: Duration,
    ) -> bluebatch_store::BoxFuture<'a, bluebatch_store::Result<bool>> {
        self.0.claim_lease(name, holder, ttl)
    }
    fn release_lease<'a>(
        &'a self,
        name: &'a str,
        holder: &'a str,
    ) -> bluebatch_store::BoxFuture<'a, bluebatch_store::Result<()>> {
        self.0.release_lease(name, holder)
    }
    fn changed(&self, max: Duration) -> bluebatch_store::BoxFuture<'_, ()> {
        self.0.changed(max)
    }
    fn hosts_seen<'a>(
        &'a self,
        hosts: &'a [String],
    ) -> bluebatch_store::BoxFuture<'a, bluebatch_store::Result<()>> {
        self.0.hosts_seen(hosts)
    }
    fn host_ages(
        &self,
    ) -> bluebatch_store::BoxFuture<'_, bluebatch_store::Result<Vec<(String, Duration)>>> {
        self.0.host_ages()
    }
    fn ping(&self) -> bluebatch_store::BoxFuture<'_, bluebatch_store::Result<()>> {
        self.0.ping()
    }
    fn pool_nodes<'a>(
        &'a self,
        account: &'a str,
        pool_key: &'a str,
        after: Option<&'a str>,
        state: Option<&'a str>,
        limit: usize,
    ) -> bluebatch_store::BoxFuture<'a, bluebatch_store::Result<Vec<Vec<u8>>>> {
        self.0.pool_nodes(account, pool_key, after, state, limit)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_of_one_replica_commit_together_and_each_is_read_on_the_other() {
    use bluebatch_store::SharedBackend;
    deadline(async {
        // Commits take 20 ms (a database's flush): writers that come meanwhile queue at the
        // gate, and join one batch.
        let store = MemShared::new();
        let slow = Arc::new(SlowCommits(
            store.clone(),
            Duration::from_millis(20),
            tokio::sync::watch::channel(true).1,
        ));
        let a = Service::start_shared(
            slow,
            "a".to_string(),
            Arc::new(ServiceClock::new()),
            TestNodes::new(AckMode::AtOnce),
            shared_config(),
        )
        .await
        .expect("replica starts");
        let b = replica(&store, "b").await;
        let _agent = agent(&a, &b, 1).await;
        add_agents_pool(&a, "p", 1).await;
        let node = idle_nodes(&a, "p", 1, Duration::from_secs(10))
            .await
            .remove(0);
        let before = store.head().await.unwrap();
        let commits_before = bluebatch_metrics::global().commit_batch.count();
        const N: usize = 32;
        let writes: Vec<_> = (0..N)
            .map(|i| {
                let (a, node) = (a.clone(), node.clone());
                tokio::spawn(async move {
                    a.add_user(at("p", &node), user(&format!("g{i}")), None)
                        .await
                        .map(|w| w.etag)
                })
            })
            .collect();
        let mut etags = std::collections::HashSet::new();
        for w in writes {
            let etag = w
                .await
                .unwrap()
                .expect("every write of the batch answers 201");
            assert!(etags.insert(etag), "each write has its own ETag");
        }
        // Alone, each write would be a revision of its own (and each acknowledgement, on B,
        // another): writers queued at the gate joined one transaction.
        let revisions = store.head().await.unwrap() - before;
        assert!(
            revisions < N as u64 / 2,
            "{N} concurrent writes took {revisions} revisions"
        );
        // The replica's commits are in the process's metrics (batch sizes and durations).
        assert!(bluebatch_metrics::global().commit_batch.count() > commits_before);
        // Every one of them is in the store: the other replica reads them all.
        b.sync().await.unwrap();
        let users = b.node_users(ACCOUNT, "p", &node).unwrap();
        for i in 0..N {
            let name = format!("g{i}");
            assert!(
                users.stored.iter().any(|u| u.name == name),
                "{name} missing on B"
            );
        }
        applied_on(&b, "p", &node).await;
    })
    .await
}

/// A read on a replica whose writer waits for the store-wide lock (held, say, by the other
/// replica's batch during its flush) does not wait for that writer: it applies what the other
/// replica committed and answers at once; the writer then commits after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_does_not_wait_for_a_writer_of_its_replica_queued_for_the_lock() {
    deadline(async {
        let store = MemShared::new();
        let (open, rx) = tokio::sync::watch::channel(true);
        let a = Service::start_shared(
            Arc::new(SlowCommits(store.clone(), Duration::ZERO, rx)),
            "a".to_string(),
            Arc::new(ServiceClock::new()),
            TestNodes::new(AckMode::AtOnce),
            shared_config(),
        )
        .await
        .expect("replica starts");
        let b = replica(&store, "b").await;
        // A's writers cannot take the lock from now on: one queues for it, holding A's gate.
        open.send_replace(false);
        let writer = {
            let a = a.clone();
            tokio::spawn(async move {
                let body = json!({
                    "id": "from-a", "vmSize": "standard_d2s_v3",
                    "virtualMachineConfiguration": {"imageReference": {"publisher": "Canonical",
                        "offer": "0001-com-ubuntu-server-jammy", "sku": "22_04-lts"},
                        "nodeAgentSKUId": "batch.node.ubuntu 22.04"},
                    "targetDedicatedNodes": 0,
                    "metadata": [{"name": "bluebatch.nodes", "value": "agents"}],
                });
                let new = parse_add_pool(body.to_string().as_bytes(), 10_000).unwrap();
                a.add_pool(ACCOUNT, new).await
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!writer.is_finished(), "A's writer waits for the lock");
        // B commits meanwhile; a read through A sees it without waiting for A's writer.
        add_agents_pool(&b, "from-b", 0).await;
        tokio::time::timeout(Duration::from_secs(2), a.sync())
            .await
            .expect("A's read answers while its writer waits for the lock")
            .expect("sync");
        a.get_pool(ACCOUNT, "from-b")
            .expect("B's pool read through A");
        assert!(!writer.is_finished(), "A's writer still waits");
        // The lock free again: A's writer commits after B's write, and both replicas read both.
        open.send_replace(true);
        writer.await.unwrap().expect("A's Add Pool");
        b.sync().await.unwrap();
        a.sync().await.unwrap();
        for svc in [&a, &b] {
            svc.get_pool(ACCOUNT, "from-a").expect("A's pool");
            svc.get_pool(ACCOUNT, "from-b").expect("B's pool");
        }
    })
    .await
}

/// Polls `svc` for host `id` until node `key` is asked to enforce a revision above `after`:
/// that acknowledgement.
async fn desired_after(svc: &Service, id: &str, key: &str, after: u64) -> NodeAck {
    loop {
        let d = svc
            .desired(id, None, Duration::from_millis(200))
            .await
            .expect("poll");
        if let Some(n) = d.nodes.iter().find(|n| n.key == key && n.revision > after) {
            return NodeAck {
                key: n.key.clone(),
                revision: n.revision,
                image: n.image,
                ssh_port: None,
                failures: Vec::new(),
            };
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_write_answers_at_the_ack_on_either_replica_before_the_ack_is_recorded() {
    deadline(async {
        let store = MemShared::new();
        let a = replica(&store, "a").await;
        let b = replica(&store, "b").await;
        // The host joins through A and polls B; once the pool is idle, this test is its agent.
        let id = join_sim(&a, 1).await;
        let agent = poll_and_ack(b.clone(), id.clone(), Duration::from_secs(2), None);
        add_agents_pool(&a, "p", 1).await;
        let node = idle_nodes(&b, "p", 1, Duration::from_secs(10))
            .await
            .remove(0);
        agent.abort();
        let key = format!("{}.p.{node}", ACCOUNT.to_lowercase());
        let before = |svc: &Service| {
            svc.get_node(ACCOUNT, "p", &node)
                .expect("Get Node")
                .node
                .users_revision
        };
        for (through, name) in [(&a, "dana"), (&b, "erin")] {
            through.sync().await.unwrap();
            let was = before(through);
            let write = {
                let (svc, node) = (through.clone(), node.clone());
                tokio::spawn(async move { svc.add_user(at("p", &node), user(name), None).await })
            };
            let ack = desired_after(&b, &id, &key, was).await;
            // Nobody can record anything now: the ack's record waits for this lock.
            let held = bluebatch_store::SharedBackend::lock(&store)
                .await
                .expect("the write lock");
            let acking = {
                let (b, id) = (b.clone(), id.clone());
                tokio::spawn(async move { b.ack(&id, AckRequest { nodes: vec![ack] }).await })
            };
            let answered = tokio::time::timeout(Duration::from_secs(3), write)
                .await
                .unwrap_or_else(|_| panic!("the write of {name} waited for the ack's record"));
            answered.expect("task").expect("the write succeeds");
            assert!(
                !acking.is_finished(),
                "the ack's record did not wait for the lock"
            );
            drop(held);
            acking.await.expect("task").expect("the ack is recorded");
            b.sync().await.unwrap();
            let n = b.get_node(ACCOUNT, "p", &node).expect("Get Node").node;
            assert_eq!(n.applied_revision, Some(n.users_revision), "{n:?}");
        }
    })
    .await
}
