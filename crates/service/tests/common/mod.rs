//! What the service's own tests share: a node provider that records everything it is told and
//! acknowledges at once, later, or only when the test says so; a service over a real SQLite
//! store (a file in a temporary directory, or in memory); helpers that bring pools to `idle`.
//!
//! Every wait here has a deadline: a hang fails the test instead of blocking it.

#![allow(dead_code)] // each test binary uses its own part of this

use bluebatch_core::error::{BatchError, Code};
use bluebatch_core::model::{NodeState, NodeUser, Os};
use bluebatch_core::pools::parse_add_pool;
use bluebatch_core::users::{UserBody, parse_add_user, parse_update_user};
use bluebatch_core::{NodeAccount, ServiceClock};
use bluebatch_service::{BoxFuture, Config, NodeFabric, Service, UserAddr, Written};
use bluebatch_store::SqliteBackend;
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

pub const ACCOUNT: &str = "acct";
pub const KEY1: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl one";
pub const KEY2: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGRlZmdoaWprbG1ub3BxcnN0dXZ3eHl6e3x9fn+AgYKD two";

/// The longest any single test may run.
pub const TEST_DEADLINE: Duration = Duration::from_secs(60);
/// The longest a wait for a state may take.
const WAIT: Duration = Duration::from_secs(10);

/// Runs a test body under [`TEST_DEADLINE`].
pub async fn deadline<F: std::future::Future>(body: F) -> F::Output {
    match tokio::time::timeout(TEST_DEADLINE, body).await {
        Ok(v) => v,
        Err(_) => panic!("the test did not finish within {TEST_DEADLINE:?}"),
    }
}

/// One thing the service told the provider, in the order it was told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Told {
    Start(String, Option<u16>),
    Stop(String),
    Remove(String),
    Reimage(String),
    /// The node's whole account set at that revision.
    Apply(String, u64, Vec<NodeAccount>),
    State(String, NodeState),
}

impl Told {
    pub fn key(&self) -> &str {
        match self {
            Told::Start(k, _)
            | Told::Stop(k)
            | Told::Remove(k)
            | Told::Reimage(k)
            | Told::Apply(k, _, _)
            | Told::State(k, _) => k,
        }
    }
}

/// How the provider acknowledges what it is handed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    /// Applied and acknowledged within `apply` (as the embedded SSH nodes do).
    AtOnce,
    /// Held until the test calls [`TestNodes::release`].
    Withhold,
    /// Applied and acknowledged this long after `apply`, by a task of the provider.
    After(Duration),
}

#[derive(Default)]
struct Sim {
    /// Snapshots handed to the node and not applied yet, in revision order.
    pending: Vec<(u64, Vec<NodeAccount>)>,
    /// The highest revision the node was handed.
    handed: u64,
    applied: Option<u64>,
    accounts: BTreeMap<String, NodeAccount>,
    /// When each revision was acknowledged (tokio's clock).
    acked_at: Vec<(u64, Instant)>,
}

impl Sim {
    /// Applies every pending change up to `upto`.
    fn apply_upto(&mut self, upto: u64) {
        let (now, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|(r, _)| *r <= upto);
        self.pending = later;
        for (rev, all) in now {
            self.accounts = all.into_iter().map(|a| (a.name.clone(), a)).collect();
            self.applied = Some(self.applied.map_or(rev, |a| a.max(rev)));
            self.acked_at.push((rev, Instant::now()));
        }
    }
}

struct Inner {
    told: Vec<Told>,
    nodes: HashMap<String, Sim>,
    mode: AckMode,
    /// Nodes that withhold whatever the mode.
    held: std::collections::HashSet<String>,
    next_port: u16,
}

/// The test's node provider: records every call, keeps each node's accounts as a node would
/// (in revision order, superseded changes ignored) and acknowledges per [`AckMode`].
pub struct TestNodes {
    inner: Mutex<Inner>,
    /// Bumped on every acknowledgement, to wake [`NodeFabric::acknowledged`] waiters.
    acks: watch::Sender<u64>,
    me: Weak<TestNodes>,
}

impl TestNodes {
    pub fn new(mode: AckMode) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            me: me.clone(),
            inner: Mutex::new(Inner {
                told: Vec::new(),
                nodes: HashMap::new(),
                mode,
                held: Default::default(),
                next_port: 40_000,
            }),
            acks: watch::Sender::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap()
    }

    pub fn set_mode(&self, mode: AckMode) {
        self.lock().mode = mode;
    }

    /// This node withholds its acknowledgements (until [`TestNodes::release`]) whatever the mode.
    pub fn hold(&self, key: &str) {
        self.lock().held.insert(key.to_string());
    }

    /// Applies and acknowledges everything the node was handed.
    pub fn release(&self, key: &str) {
        self.release_upto(key, u64::MAX);
    }

    /// Applies and acknowledges what the node was handed, up to `revision`.
    pub fn release_upto(&self, key: &str, revision: u64) {
        if let Some(sim) = self.lock().nodes.get_mut(key) {
            sim.apply_upto(revision);
        }
        self.acks.send_modify(|n| *n += 1);
    }

    /// Everything told so far.
    pub fn told(&self) -> Vec<Told> {
        self.lock().told.clone()
    }

    /// What was told about one node, in order.
    pub fn told_about(&self, key: &str) -> Vec<Told> {
        self.told().into_iter().filter(|t| t.key() == key).collect()
    }

    pub fn clear_told(&self) {
        self.lock().told.clear();
    }

    /// The highest revision the node was handed.
    pub fn handed(&self, key: &str) -> u64 {
        self.lock().nodes.get(key).map_or(0, |s| s.handed)
    }

    /// When the node acknowledged `revision`, if it has.
    pub fn acked_at(&self, key: &str, revision: u64) -> Option<Instant> {
        let g = self.lock();
        let sim = g.nodes.get(key)?;
        sim.acked_at
            .iter()
            .find(|(r, _)| *r == revision)
            .map(|(_, at)| *at)
    }

    fn applied(&self, key: &str) -> Option<u64> {
        self.lock().nodes.get(key).and_then(|s| s.applied)
    }
}

impl NodeFabric for TestNodes {
    fn start_node<'a>(
        &'a self,
        key: &'a str,
        preferred_port: Option<u16>,
    ) -> BoxFuture<'a, io::Result<SocketAddr>> {
        let port = {
            let mut g = self.lock();
            g.told.push(Told::Start(key.to_string(), preferred_port));
            preferred_port.unwrap_or_else(|| {
                g.next_port += 1;
                g.next_port
            })
        };
        Box::pin(async move { Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port))) })
    }

    fn stop_node<'a>(&'a self, key: &'a str) -> BoxFuture<'a, ()> {
        self.lock().told.push(Told::Stop(key.to_string()));
        Box::pin(async {})
    }

    fn remove_node<'a>(&'a self, key: &'a str) -> BoxFuture<'a, ()> {
        let mut g = self.lock();
        g.told.push(Told::Remove(key.to_string()));
        g.nodes.remove(key);
        Box::pin(async {})
    }

    fn reimage_node<'a>(&'a self, key: &'a str) -> BoxFuture<'a, io::Result<()>> {
        self.lock().told.push(Told::Reimage(key.to_string()));
        Box::pin(async { Ok(()) })
    }

    fn apply(&self, key: &str, revision: u64, accounts: Arc<[NodeAccount]>) -> u64 {
        let change = accounts.to_vec();
        let mut g = self.lock();
        g.told
            .push(Told::Apply(key.to_string(), revision, change.clone()));
        let mode = if g.held.contains(key) {
            AckMode::Withhold
        } else {
            g.mode
        };
        let sim = g.nodes.entry(key.to_string()).or_default();
        if revision > sim.handed && sim.applied.is_none_or(|a| revision > a) {
            sim.handed = revision;
            sim.pending.push((revision, change));
        }
        match mode {
            AckMode::AtOnce => {
                sim.apply_upto(revision);
                let applied = sim.applied.unwrap_or(0);
                drop(g);
                self.acks.send_modify(|n| *n += 1);
                applied
            }
            AckMode::Withhold => sim.applied.unwrap_or(0),
            AckMode::After(delay) => {
                let applied = sim.applied.unwrap_or(0);
                drop(g);
                let key = key.to_string();
                // The provider acknowledges from a task of its own, `delay` later.
                let me = self.me.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    if let Some(me) = me.upgrade() {
                        me.release_upto(&key, revision);
                    }
                });
                applied
            }
        }
    }

    fn acknowledged<'a>(&'a self, key: &'a str, revision: u64) -> BoxFuture<'a, ()> {
        let mut rx = self.acks.subscribe();
        Box::pin(async move {
            loop {
                if self.applied(key).is_some_and(|a| a >= revision) {
                    return;
                }
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        })
    }

    fn applied_revision(&self, key: &str) -> Option<u64> {
        self.applied(key)
    }

    fn accounts(&self, key: &str) -> Vec<NodeAccount> {
        self.lock()
            .nodes
            .get(key)
            .map(|s| s.accounts.values().cloned().collect())
            .unwrap_or_default()
    }

    fn set_state(&self, key: &str, state: NodeState) {
        self.lock().told.push(Told::State(key.to_string(), state));
    }
}

/// The configuration the tests run with: nodes move a step every 10 ms, a node has 500 ms to
/// acknowledge.
pub fn config() -> Config {
    Config {
        node_step: Duration::from_millis(10),
        ack_timeout: Duration::from_millis(500),
        ..Config::default()
    }
}

/// A service over a real SQLite store, with the test provider and the service clock.
pub struct Harness {
    pub svc: Service,
    pub nodes: Arc<TestNodes>,
    pub clock: Arc<ServiceClock>,
    config: Config,
    /// The store file's directory (`None`: the store is in memory).
    dir: Option<tempfile::TempDir>,
}

impl Harness {
    pub async fn in_memory(config: Config, mode: AckMode) -> Self {
        let backend = SqliteBackend::in_memory().expect("in-memory store");
        Self::start(backend, config, mode, None).await
    }

    /// [`Harness::in_memory`] whose service talks to `fabric`, a provider wrapping `nodes` (so
    /// what the service tells it is still recorded there).
    pub async fn in_memory_through(
        config: Config,
        nodes: Arc<TestNodes>,
        fabric: Arc<dyn NodeFabric>,
    ) -> Self {
        let backend = SqliteBackend::in_memory().expect("in-memory store");
        let clock = Arc::new(ServiceClock::new());
        let svc = tokio::time::timeout(
            WAIT,
            Service::start(backend, clock.clone(), fabric, config.clone()),
        )
        .await
        .expect("the service started in time")
        .expect("the service starts");
        Self {
            svc,
            nodes,
            clock,
            config,
            dir: None,
        }
    }

    pub async fn on_disk(config: Config, mode: AckMode) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let backend = SqliteBackend::open(&dir.path().join("state.db")).expect("store file");
        Self::start(backend, config, mode, Some(dir)).await
    }

    async fn start(
        backend: SqliteBackend,
        config: Config,
        mode: AckMode,
        dir: Option<tempfile::TempDir>,
    ) -> Self {
        let nodes = TestNodes::new(mode);
        let clock = Arc::new(ServiceClock::new());
        let svc = tokio::time::timeout(
            WAIT,
            Service::start(backend, clock.clone(), nodes.clone(), config.clone()),
        )
        .await
        .expect("the service started in time")
        .expect("the service starts");
        Self {
            svc,
            nodes,
            clock,
            config,
            dir,
        }
    }

    /// A process restart: this service goes, another starts over the same store file with a new
    /// provider and a new clock (which the stored offset moves).
    pub async fn restart(self, mode: AckMode) -> Self {
        let Harness {
            svc, config, dir, ..
        } = self;
        drop(svc);
        let dir = dir.expect("restart needs a store on disk");
        let backend = SqliteBackend::open(&dir.path().join("state.db")).expect("store file");
        Self::start(backend, config, mode, Some(dir)).await
    }

    /// Every record of the store file as it is now, read through a second connection.
    pub fn records(&self) -> BTreeMap<String, serde_json::Value> {
        use bluebatch_store::Backend;
        let dir = self.dir.as_ref().expect("records need a store on disk");
        let mut b = SqliteBackend::open(&dir.path().join("state.db")).expect("store file");
        b.load_all()
            .expect("records")
            .into_iter()
            .map(|(k, v)| (k, serde_json::from_slice(&v).expect("JSON records")))
            .collect()
    }

    /// Adds a pool of `nodes` dedicated nodes and waits until every one is `idle`; their ids.
    pub async fn pool(&self, id: &str, os: Os, nodes: u32) -> Vec<String> {
        let image = match os {
            Os::Linux => serde_json::json!({
                "imageReference": {"publisher": "Canonical",
                    "offer": "0001-com-ubuntu-server-jammy", "sku": "22_04-lts"},
                "nodeAgentSKUId": "batch.node.ubuntu 22.04"}),
            Os::Windows => serde_json::json!({
                "imageReference": {"publisher": "MicrosoftWindowsServer",
                    "offer": "WindowsServer", "sku": "2022-datacenter"},
                "nodeAgentSKUId": "batch.node.windows amd64"}),
        };
        let body = serde_json::json!({
            "id": id, "vmSize": "standard_d2s_v3",
            "virtualMachineConfiguration": image,
            "targetDedicatedNodes": nodes,
        });
        let new = parse_add_pool(body.to_string().as_bytes(), 10_000).expect("a valid pool");
        assert_eq!(new.os, os);
        self.svc.add_pool(ACCOUNT, new).await.expect("Add Pool");
        self.wait_idle(id, nodes as usize).await
    }

    /// Waits until the pool has `count` nodes, all `idle`, and is steady; their ids.
    pub async fn wait_idle(&self, pool: &str, count: usize) -> Vec<String> {
        let until = Instant::now() + WAIT;
        loop {
            let (nodes, _) = self
                .svc
                .list_nodes(ACCOUNT, pool, &|_| true, None, 10_000)
                .expect("List Nodes");
            let steady = self
                .svc
                .get_pool(ACCOUNT, pool)
                .expect("Get Pool")
                .pool
                .allocation_state
                == bluebatch_core::model::AllocationState::Steady;
            if steady
                && nodes.len() == count
                && nodes.iter().all(|n| n.node.state == NodeState::Idle)
            {
                return nodes.into_iter().map(|n| n.node.id).collect();
            }
            assert!(
                Instant::now() < until,
                "pool {pool} not steady with {count} idle nodes in {WAIT:?}: {:?}",
                nodes.iter().map(|n| n.node.state).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until the node is in `state`.
    pub async fn wait_state(&self, pool: &str, node: &str, state: NodeState) {
        let until = Instant::now() + WAIT;
        loop {
            let now = self
                .svc
                .get_node(ACCOUNT, pool, node)
                .expect("Get Node")
                .node
                .state;
            if now == state {
                return;
            }
            assert!(
                Instant::now() < until,
                "node still {now:?}, not {state:?}, after {WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The key the provider was given for a node (it learns it when the node starts).
    pub fn key_of(&self, node: &str) -> String {
        self.nodes
            .told()
            .iter()
            .map(|t| t.key().to_string())
            .find(|k| k.ends_with(&format!(".{node}")))
            .unwrap_or_else(|| panic!("the provider was never told of node {node}"))
    }

    pub async fn add(&self, pool: &str, node: &str, body: serde_json::Value) -> Result<Written> {
        let body = parse_add_user(body.to_string().as_bytes()).expect("a valid Add User body");
        let hash = hash_of(&body);
        self.svc.add_user(at(pool, node), body, hash).await
    }

    pub async fn update(
        &self,
        pool: &str,
        node: &str,
        name: &str,
        body: serde_json::Value,
    ) -> Result<Written> {
        let body =
            parse_update_user(body.to_string().as_bytes()).expect("a valid Update User body");
        let hash = hash_of(&body);
        self.svc.update_user(at(pool, node), name, body, hash).await
    }

    pub async fn delete(&self, pool: &str, node: &str, name: &str) -> Result<()> {
        self.svc.delete_user(at(pool, node), name).await
    }

    /// The node's users as the store holds them, by name.
    pub fn stored(&self, pool: &str, node: &str) -> BTreeMap<String, NodeUser> {
        self.svc
            .node_users(ACCOUNT, pool, node)
            .expect("node users")
            .stored
            .into_iter()
            .map(|u| (u.name.clone(), u))
            .collect()
    }

    /// The node's users revision as the store holds it.
    pub fn revision(&self, pool: &str, node: &str) -> u64 {
        self.svc
            .get_node(ACCOUNT, pool, node)
            .expect("Get Node")
            .node
            .users_revision
    }

    pub fn config(&self) -> &Config {
        &self.config
    }
}

pub type Result<T> = std::result::Result<T, BatchError>;

pub fn at<'a>(pool: &'a str, node: &'a str) -> UserAddr<'a> {
    UserAddr {
        account: ACCOUNT,
        pool,
        node,
        timeout: None,
    }
}

/// The caller's hash of the body's password, as the wire layer computes it.
pub fn hash_of(body: &UserBody) -> Option<String> {
    body.password
        .as_deref()
        .map(bluebatch_core::crypt::hash_password)
}

/// The error's code, or a panic naming what succeeded.
pub fn code<T: std::fmt::Debug>(r: Result<T>) -> Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.code,
    }
}

/// Asserts that `expected` occurs in `told`, in this order (other calls may come between).
pub fn assert_in_order(told: &[Told], expected: &[Told]) {
    let mut it = told.iter();
    for want in expected {
        assert!(
            it.any(|t| t == want),
            "{want:?} was not told (in order) in {told:#?}, expected order {expected:#?}"
        );
    }
}
