//! Nodes living a Batch node's life: each transitional state moves on after one configured step
//! (creating → starting → idle, rebooting → idle, reimaging → idle, leavingpool → gone), the pool's
//! allocation state follows, and a deleted pool goes once its nodes have left. After a restart the
//! same steps resume from what the store holds.
//!
//! Each node keeps its own due instant: a pool's timers fire for the pool, but a node moves on only
//! once its own step has passed since it entered its state (a node being rebooted or reimaged is
//! not due before its request has done its work), so one node's pending timer never cuts another
//! node's step short.
//!
//! Every state a Linux node takes is told to its node provider as it is taken (under the state
//! lock, in order), so logins follow the node's state whatever changed it.

use crate::pools::set_node_state;
use crate::state::{
    NodeEntry, node_key, node_record, node_users_prefix, pool_nodes_prefix, pool_record,
    pool_users_prefix,
};
use crate::{Service, put_json, snapshot_of};
use bluebatch_core::model::{AllocationState, NodeState, Os, PoolState};
use bluebatch_store::Op;
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use tokio::time::Instant;

/// Per node (fabric key): the transitional state it was stamped in and when it is due to leave it
/// (`None`: its own request is still at work, not due until that request schedules it).
pub(crate) type Due = Mutex<HashMap<String, (NodeState, Option<Instant>)>>;

/// See [`Service::step_after`].
pub(crate) struct StepAfter {
    svc: Service,
    account: String,
    pool_key: String,
    node_id: String,
}

impl Drop for StepAfter {
    fn drop(&mut self) {
        // Outside a runtime (the process is ending) there is nothing left to step.
        if tokio::runtime::Handle::try_current().is_ok() {
            self.svc
                .schedule_node(&self.account, &self.pool_key, &self.node_id);
        }
    }
}

/// An agent node between states that its host has not yet acknowledged in its current
/// revision and image.
fn awaiting_ack(n: &bluebatch_core::model::Node) -> bool {
    n.host.is_some()
        && matches!(
            n.state,
            NodeState::Starting | NodeState::Rebooting | NodeState::Reimaging
        )
        && n.applied_revision.is_none_or(|a| a < n.users_revision)
}

fn is_transitional(s: NodeState) -> bool {
    matches!(
        s,
        NodeState::Creating
            | NodeState::Starting
            | NodeState::WaitingForStartTask
            | NodeState::Rebooting
            | NodeState::Reimaging
            | NodeState::LeavingPool
    )
}

/// (account, pool, node), fabric key, port, users revision, accounts.
type Endpoint = (
    (String, String, String),
    String,
    Option<u16>,
    u64,
    std::sync::Arc<[bluebatch_core::NodeAccount]>,
);

/// How many node endpoints start at once (each may write and fsync a new host key).
const START_CONCURRENCY: usize = 64;

impl Service {
    /// Tells a Linux node's provider the node's state (Windows nodes have no endpoint); a node
    /// backed by a joined host reads it on its host's next poll, which is woken.
    pub(crate) fn push_state(&self, os: Os, host: Option<&str>, key: &str, state: NodeState) {
        if let Some(host) = host {
            self.inner.hub.notify_node(host, key);
        } else if os == Os::Linux {
            self.inner.nodes.set_state(key, state);
        }
    }

    /// Tells the provider the state of every Linux node of the pool.
    fn push_pool_states(&self, account: &str, pool_key: &str) {
        let st = self.lock();
        let Some(entry) = st.pool(account, pool_key) else {
            return;
        };
        for n in entry.nodes.values() {
            let key = node_key(account, &entry.pool.id, &n.node.id);
            if let Some(host) = &n.node.host {
                self.inner.hub.notify_node(host, &key);
            } else if entry.pool.os == Os::Linux {
                self.inner.nodes.set_state(&key, n.node.state);
            }
        }
    }

    /// Starts endpoints concurrently: (tag, fabric key, preferred port) → (tag, outcome).
    async fn start_endpoints<T: Send + 'static>(
        &self,
        nodes: Vec<(T, String, Option<u16>)>,
    ) -> Vec<(T, std::io::Result<std::net::SocketAddr>)> {
        let mut out = Vec::with_capacity(nodes.len());
        let mut set = tokio::task::JoinSet::new();
        for (tag, key, port) in nodes {
            if set.len() >= START_CONCURRENCY
                && let Some(Ok(done)) = set.join_next().await
            {
                out.push(done);
            }
            let fabric = self.inner.nodes.clone();
            set.spawn(async move {
                let r = fabric.start_node(&key, port).await;
                (tag, r)
            });
        }
        while let Some(done) = set.join_next().await {
            if let Ok(done) = done {
                out.push(done);
            }
        }
        out
    }

    fn due(&self) -> MutexGuard<'_, HashMap<String, (NodeState, Option<Instant>)>> {
        self.inner.due.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called under the state lock as a request puts a node into a transitional state whose work
    /// it does before it answers (reboot, reimage): the node is not due until that request calls
    /// [`Service::schedule_node`], whatever other timers of its pool fire meanwhile.
    pub(crate) fn hold_step(&self, key: &str, state: NodeState) {
        self.due().insert(key.to_string(), (state, None));
    }

    /// Tells the nodes their states now, then moves the pool's transitional nodes one step after
    /// `node_step`: each node newly between states is due one step from now, nodes already due
    /// keep their time. Every pool or node write that changes states ends here.
    pub(crate) fn schedule(&self, account: &str, pool_key: &str) {
        self.schedule_with(account, pool_key, None);
    }

    /// [`Service::schedule`] for a request that has just done a node's work (reboot, reimage):
    /// that node's step starts now.
    pub(crate) fn schedule_node(&self, account: &str, pool_key: &str, node_id: &str) {
        self.schedule_with(account, pool_key, Some(node_id));
    }

    /// For a node just held with [`Service::hold_step`]: schedules its step when dropped, at the
    /// end of its request or when the request is dropped midway (its connection gone), so a
    /// held node never stays between states.
    pub(crate) fn step_after(&self, account: &str, pool_key: &str, node_id: &str) -> StepAfter {
        StepAfter {
            svc: self.clone(),
            account: account.to_string(),
            pool_key: pool_key.to_string(),
            node_id: node_id.to_string(),
        }
    }

    fn schedule_with(&self, account: &str, pool_key: &str, restamp: Option<&str>) {
        self.push_pool_states(account, pool_key);
        // On a shared store the steps are the background lease holder's (it schedules the pools
        // it sees change).
        if !self.runs_background() {
            return;
        }
        let at = Instant::now() + self.inner.config.node_step;
        self.stamp_due(account, pool_key, at, restamp);
        let svc = self.clone();
        let (account, pool_key) = (account.to_string(), pool_key.to_string());
        tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            svc.advance_pool(&account, &pool_key).await;
        });
    }

    /// Gives the pool's transitional nodes that have no due time for their state `at` (and
    /// `restamp`, if it is between states, `at` whatever it had); forgets nodes not between states.
    fn stamp_due(&self, account: &str, pool_key: &str, at: Instant, restamp: Option<&str>) {
        let st = self.lock();
        let Some(entry) = st.pool(account, pool_key) else {
            return;
        };
        let mut due = self.due();
        for n in entry.nodes.values() {
            let key = node_key(account, &entry.pool.id, &n.node.id);
            if !is_transitional(n.node.state) {
                due.remove(&key);
                continue;
            }
            let fresh = restamp == Some(n.node.id.as_str());
            match due.get(&key) {
                Some((s, Some(_))) if *s == n.node.state && !fresh => {}
                Some((s, None)) if *s == n.node.state && !fresh => {}
                _ => {
                    due.insert(key, (n.node.state, Some(at)));
                }
            }
        }
    }

    /// Whether the node (between states) has spent its step in its current state.
    fn is_due(
        due: &HashMap<String, (NodeState, Option<Instant>)>,
        key: &str,
        state: NodeState,
        now: Instant,
    ) -> bool {
        matches!(due.get(key), Some((s, Some(t))) if *s == state && *t <= now)
    }

    /// Runs [`Service::advance_pool`] after `wait` (an agents pool's resize timeout).
    fn advance_later(&self, account: &str, pool_key: &str, wait: std::time::Duration) {
        let svc = self.clone();
        let (account, pool_key) = (account.to_string(), pool_key.to_string());
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            svc.advance_pool(&account, &pool_key).await;
        });
    }

    async fn advance_pool(&self, account: &str, pool_key: &str) {
        if !self.runs_background() {
            return;
        }
        let Ok(_gate) = self.gate().await else {
            return;
        };
        // Only nodes whose own step has passed move; other nodes wait for their own timers.
        let tick = Instant::now();
        // Linux nodes finishing `creating` get their SSH endpoint first (binding is async).
        let to_start: Vec<(String, String, Option<u16>)> = {
            let st = self.lock();
            let Some(entry) = st.pool(account, pool_key) else {
                return;
            };
            if entry.pool.os != Os::Linux {
                Vec::new()
            } else {
                let due = self.due();
                entry
                    .nodes
                    .values()
                    .filter(|n| {
                        n.node.host.is_none()
                            && n.node.state == NodeState::Creating
                            && Self::is_due(
                                &due,
                                &node_key(account, &entry.pool.id, &n.node.id),
                                NodeState::Creating,
                                tick,
                            )
                    })
                    .map(|n| {
                        (
                            n.node.id.clone(),
                            node_key(account, &entry.pool.id, &n.node.id),
                            n.node.ssh_port,
                        )
                    })
                    .collect()
            }
        };
        let mut ports = HashMap::new();
        for (id, started) in self.start_endpoints(to_start).await {
            match started {
                Ok(addr) => {
                    ports.insert(id, Some(addr.port()));
                }
                Err(e) => {
                    tracing::warn!(node = %id, "node endpoint did not start: {e}");
                    ports.insert(id, None);
                }
            }
        }
        let now = self.now();
        let (pending, removed, again, refill) = {
            let mut st = self.lock();
            let crate::state::State { accounts, hub, .. } = &mut *st;
            let Some(acct) = accounts.get_mut(account) else {
                return;
            };
            let Some(entry) = acct.pools.get_mut(pool_key) else {
                return;
            };
            let pool_id = entry.pool.id.clone();
            let linux = entry.pool.os == Os::Linux;
            let mut ops = Vec::new();
            let mut removed = Vec::new();
            let mut due = self.due();
            for n in entry.nodes.values_mut() {
                let key = node_key(account, &pool_id, &n.node.id);
                if !Self::is_due(&due, &key, n.node.state, tick) {
                    continue;
                }
                let agent = n.node.host.is_some();
                let next = match n.node.state {
                    // A joined host's node: its address and port come from the host.
                    NodeState::Creating if agent => NodeState::Starting,
                    // It is up once its host has acknowledged its current revision (a reboot
                    // or reimage takes a revision of its own); its acknowledgement schedules it.
                    NodeState::Starting | NodeState::Rebooting | NodeState::Reimaging
                        if agent && awaiting_ack(&n.node) =>
                    {
                        continue;
                    }
                    NodeState::Creating => match ports.get(&n.node.id) {
                        Some(None) => NodeState::Unusable,
                        Some(Some(port)) => {
                            n.node.ssh_port = Some(*port);
                            NodeState::Starting
                        }
                        // Windows: no endpoint. A Linux node due only after the endpoints
                        // were started waits for the next timer.
                        None if linux => continue,
                        None => NodeState::Starting,
                    },
                    NodeState::Starting
                    | NodeState::WaitingForStartTask
                    | NodeState::Rebooting
                    | NodeState::Reimaging => {
                        n.node.last_boot_time = Some(now);
                        NodeState::Idle
                    }
                    NodeState::LeavingPool => {
                        due.remove(&key);
                        removed.push(n.node.id.clone());
                        continue;
                    }
                    _ => continue,
                };
                due.remove(&key);
                set_node_state(&mut n.node, next, now);
                if let Some(host) = &n.node.host {
                    self.inner.hub.notify_node(host, &key);
                } else if linux {
                    self.inner.nodes.set_state(&key, next);
                }
                ops.push(put_json(
                    node_record(account, &pool_id, &n.node.id),
                    &n.node,
                ));
            }
            let mut released = Vec::new();
            for id in &removed {
                // A joined host's slot is free again: its desired state no longer has the node,
                // so the host removes its accounts.
                if let Some(n) = entry.nodes.get(id)
                    && let (Some(host), Some(slot)) = (&n.node.host, n.node.slot)
                {
                    if let Some(h) = hub.hosts.get_mut(host)
                        && h.slots.get(&slot).is_some_and(|r| r.node == *id)
                    {
                        h.slots.remove(&slot);
                    }
                    self.inner.hub.notify(host);
                    released.push(node_key(account, &pool_id, id));
                }
                entry.nodes.remove(id);
                ops.push(Op::Delete {
                    key: node_record(account, &pool_id, id),
                });
                ops.push(Op::DeletePrefix {
                    prefix: node_users_prefix(account, &pool_id, id),
                });
            }
            // Agent nodes waiting for their host's acknowledgement are scheduled by it.
            let again = entry
                .nodes
                .values()
                .any(|n| is_transitional(n.node.state) && !awaiting_ack(&n.node));
            let mut pool_gone = false;
            let short = crate::pools::is_short(entry);
            let deadline = entry.pool.allocation_state_transition_time
                + crate::pools::resize_timeout(&entry.pool);
            if !again {
                if entry.pool.state == PoolState::Deleting && entry.nodes.is_empty() {
                    pool_gone = true;
                } else if short
                    && entry.pool.state == PoolState::Active
                    && entry.pool.allocation_state == AllocationState::Resizing
                    && now < deadline
                {
                    // Too few joined hosts: the pool waits for more until its resize timeout.
                    let wait = (deadline - now).try_into().unwrap_or_default();
                    self.advance_later(account, pool_key, wait);
                } else if entry.pool.allocation_state != AllocationState::Steady {
                    if short && entry.pool.allocation_state == AllocationState::Resizing {
                        let why = if entry.pool.source == bluebatch_core::model::NodeSource::Sandbox
                        {
                            "too few sandboxed nodes started (see the service's log)"
                        } else {
                            "too few joined hosts were free"
                        };
                        entry.pool.resize_errors = vec![bluebatch_core::model::ResizeError {
                            code: "AllocationTimedout".into(),
                            message: format!(
                                "Desired number of dedicated nodes could not be allocated as the resize timeout was reached: {} dedicated and {} low-priority nodes were requested, {why}.",
                                entry.pool.target_dedicated, entry.pool.target_low_priority
                            ),
                        }];
                    }
                    entry.pool.allocation_state = AllocationState::Steady;
                    entry.pool.allocation_state_transition_time = now;
                    ops.push(put_json(pool_record(account, &pool_id), &entry.pool));
                }
            }
            if pool_gone {
                acct.pools.remove(pool_key);
                ops.push(Op::Delete {
                    key: pool_record(account, &pool_id),
                });
                ops.push(Op::DeletePrefix {
                    prefix: pool_nodes_prefix(account, &pool_id),
                });
                ops.push(Op::DeletePrefix {
                    prefix: pool_users_prefix(account, &pool_id),
                });
            }
            let removed: Vec<String> = removed
                .iter()
                .map(|id| node_key(account, &pool_id, id))
                .filter(|k| !released.contains(k))
                .collect();
            for key in &released {
                self.inner.hub.forget_node(key);
            }
            (self.submit(ops), removed, again, !released.is_empty())
        };
        for key in removed {
            self.inner.nodes.remove_node(&key).await;
        }
        // Nobody waits on these writes; a failure stops the process like any other.
        let _ = pending.durable().await;
        if again {
            self.schedule(account, pool_key);
        }
        if refill {
            // Freed host slots are capacity again: pools of the account still short take them.
            self.fill_short_pools(account).await;
        }
    }

    /// After a restart: every Linux node that has an endpoint gets it back, on its port, with
    /// its stored accounts; pools with nodes between states carry on.
    pub(crate) async fn recover(&self) {
        let mut endpoints = Vec::new();
        let mut pools = Vec::new();
        {
            let st = self.lock();
            for (account, acct) in &st.accounts {
                for (pkey, entry) in &acct.pools {
                    let busy = entry.pool.state == PoolState::Deleting
                        || entry.pool.allocation_state != AllocationState::Steady
                        || entry.nodes.values().any(|n| is_transitional(n.node.state));
                    if busy {
                        pools.push((account.clone(), pkey.clone()));
                    }
                    if entry.pool.os != Os::Linux {
                        continue;
                    }
                    for n in entry.nodes.values() {
                        // Joined hosts' nodes read the stored state on their next poll.
                        if n.node.host.is_some() {
                            continue;
                        }
                        let key = node_key(account, &entry.pool.id, &n.node.id);
                        self.inner.nodes.set_state(&key, n.node.state);
                        if n.node.ssh_port.is_some() && n.node.state != NodeState::LeavingPool {
                            endpoints.push(Self::endpoint_of(account, &entry.pool.id, n));
                        }
                    }
                }
            }
        }
        let starts = endpoints
            .iter()
            .enumerate()
            .map(|(i, (_, key, port, _, _))| (i, key.clone(), *port))
            .collect();
        let mut started: HashMap<usize, _> =
            self.start_endpoints(starts).await.into_iter().collect();
        for (i, (at, key, port, revision, accounts)) in endpoints.into_iter().enumerate() {
            let outcome = started
                .remove(&i)
                .unwrap_or_else(|| Err(std::io::Error::other("the start task failed")));
            match outcome {
                Ok(addr) if Some(addr.port()) != port => {
                    // The old port was taken meanwhile: record the new one.
                    let (account, pool_id, node_id) = at;
                    let pending = {
                        let mut st = self.lock();
                        st.pool_mut(&account, &pool_id)
                            .and_then(|p| p.nodes.get_mut(&node_id))
                            .map(|n| {
                                n.node.ssh_port = Some(addr.port());
                                self.submit(vec![put_json(
                                    node_record(&account, &pool_id, &node_id),
                                    &n.node,
                                )])
                            })
                    };
                    if let Some(p) = pending {
                        let _ = p.durable().await;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(node = %key, "node endpoint did not restart: {e}");
                    continue;
                }
            }
            self.inner.nodes.apply(&key, revision, accounts);
        }
        for (account, pkey) in pools {
            self.schedule(&account, &pkey);
        }
    }

    /// Whether the pool has steps to take: deleting, resizing, or nodes between states.
    pub(crate) fn is_busy(&self, account: &str, pool_key: &str) -> bool {
        let st = self.lock();
        st.pool(account, pool_key).is_some_and(|entry| {
            entry.pool.state == PoolState::Deleting
                || entry.pool.allocation_state != AllocationState::Steady
                || entry.nodes.values().any(|n| is_transitional(n.node.state))
        })
    }

    /// The background holder of a shared store takes over the steps of every busy pool (those
    /// another replica was taking when it went).
    pub(crate) fn resume_pools(&self) {
        let pools: Vec<(String, String)> = {
            let st = self.lock();
            st.accounts
                .iter()
                .flat_map(|(a, acct)| acct.pools.keys().map(move |p| (a.clone(), p.clone())))
                .collect()
        };
        for (account, pkey) in pools {
            if self.is_busy(&account, &pkey) {
                self.schedule(&account, &pkey);
            }
        }
    }

    fn endpoint_of(account: &str, pool_id: &str, n: &NodeEntry) -> Endpoint {
        (
            (account.to_string(), pool_id.to_string(), n.node.id.clone()),
            node_key(account, pool_id, &n.node.id),
            n.node.ssh_port,
            n.node.users_revision,
            snapshot_of(&n.users),
        )
    }
}
