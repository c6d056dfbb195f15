//! Pool operations: Add, Get, List, Delete, Resize, Remove Nodes.

use crate::agents::{HostEntry, NodeRef};
use crate::state::{PoolEntry, node_record, pool_key, pool_record};
use crate::{Pending, Service, pool_not_found, put_json};
use bluebatch_core::error::{BatchError, Code, Result};
use bluebatch_core::model::{
    AllocationState, Node, NodeSource, NodeState, Os, Pool, PoolState, SchedulingState, new_etag,
};
use bluebatch_core::pools::{NewPool, Resize};
use bluebatch_protocol::ProviderKind;
use bluebatch_store::Op;
use rand::RngCore;
use std::collections::BTreeMap;
use std::ops::Bound;
use time::OffsetDateTime;

/// A pool as Get and List show it.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolView {
    pub pool: Pool,
    pub current_dedicated: u32,
    pub current_low_priority: u32,
}

impl PoolEntry {
    pub(crate) fn view(&self) -> PoolView {
        let (current_dedicated, current_low_priority) = self.current_nodes();
        PoolView {
            pool: self.pool.clone(),
            current_dedicated,
            current_low_priority,
        }
    }
}

/// A precondition on the pool (If-Match and friends), checked under the same lock as the write.
/// What a pool write reports for its answer (the pool's id as stored, its new ETag and
/// Last-Modified), so the answer needs no second lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolWritten {
    pub pool_id: String,
    pub etag: String,
    pub last_modified: OffsetDateTime,
}

impl PoolWritten {
    fn of(pool: &Pool) -> Self {
        Self {
            pool_id: pool.id.clone(),
            etag: pool.etag.clone(),
            last_modified: pool.last_modified,
        }
    }
}

pub type Precondition<'a> = &'a (dyn Fn(&Pool) -> Result<()> + Sync);

/// A fresh node in `creating`, with an id in Azure's current form.
pub(crate) fn new_node(dedicated: bool, now: OffsetDateTime) -> Node {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let id = format!("tvmps_{hex}_{}", if dedicated { 'd' } else { 'p' });
    Node {
        id,
        state: NodeState::Creating,
        scheduling_state: SchedulingState::Enabled,
        state_transition_time: now,
        allocation_time: now,
        last_boot_time: None,
        // A private address in 10.0.0.0/8, as a VNet would give; nothing listens there.
        ip_address: format!("10.{}.{}.{}", bytes[0], bytes[1], bytes[2].max(4)),
        is_dedicated: dedicated,
        ssh_port: None,
        users_revision: 0,
        applied_revision: None,
        host: None,
        slot: None,
        boot: 0,
        image: 0,
        state_before_unknown: None,
        etag: new_etag(now),
        last_modified: now,
    }
}

pub(crate) fn set_node_state(node: &mut Node, state: NodeState, now: OffsetDateTime) {
    node.state = state;
    node.state_transition_time = now;
    node.etag = new_etag(now);
    node.last_modified = now;
}

fn touch_pool(pool: &mut Pool, now: OffsetDateTime) {
    pool.etag = new_etag(now);
    pool.last_modified = now;
}

fn set_allocation(pool: &mut Pool, state: AllocationState, now: OffsetDateTime) {
    if pool.allocation_state != state {
        pool.allocation_state = state;
        pool.allocation_state_transition_time = now;
    }
}

/// A free slot of a joined host for a new node of the pool: hosts that poll first, then the
/// most free slots (spreading nodes), then the host id.
fn pick_slot(
    hosts: &BTreeMap<String, HostEntry>,
    account: &str,
    pool: &str,
    os: Os,
    source: NodeSource,
) -> Option<(String, u32)> {
    hosts
        .values()
        .filter(|h| h.takes(account, pool, os, source))
        .filter_map(|h| {
            let first = h.first_free()?;
            Some((h.away, std::cmp::Reverse(h.free_count()), &h.rec.id, first))
        })
        .min()
        .map(|(_, _, id, slot)| (id.clone(), slot))
}

/// What [`converge`] did.
#[derive(Default)]
pub(crate) struct Converged {
    pub changed: bool,
    /// An agents pool found too few free hosts to meet its targets.
    pub short: bool,
}

/// Whether the pool's nodes are backed by joined hosts (agents pools, and sandbox pools, whose
/// hosts are the sandboxed nodes `serve --nodes sandbox` starts): capacity, resize timeout,
/// `resizeErrors` and the node lifecycle through the node protocol.
pub(crate) fn host_backed(source: NodeSource) -> bool {
    matches!(source, NodeSource::Agents | NodeSource::Sandbox)
}

/// How many nodes (dedicated, low-priority) a host-backed pool lacks to meet its targets, not
/// counting nodes leaving it; (0, 0) for a pool of embedded nodes.
pub(crate) fn missing(entry: &PoolEntry) -> (u32, u32) {
    if !host_backed(entry.pool.source) {
        return (0, 0);
    }
    let staying = |dedicated: bool| {
        entry
            .nodes
            .values()
            .filter(|n| n.node.is_dedicated == dedicated && n.node.state != NodeState::LeavingPool)
            .count() as u32
    };
    (
        entry.pool.target_dedicated.saturating_sub(staying(true)),
        entry
            .pool
            .target_low_priority
            .saturating_sub(staying(false)),
    )
}

/// Whether a host-backed pool has fewer nodes (not leaving) than its targets.
pub(crate) fn is_short(entry: &PoolEntry) -> bool {
    missing(entry) != (0, 0)
}

/// Brings the pool's nodes (those not leaving) to its targets: new nodes are created (for an
/// agents pool, each on a free slot of a joined host, dedicated first), surplus nodes leave (idle
/// ones first; their hosts' slots are released once they are gone).
pub(crate) fn converge(
    entry: &mut PoolEntry,
    account: &str,
    now: OffsetDateTime,
    ops: &mut Vec<Op>,
    hosts: &mut BTreeMap<String, HostEntry>,
) -> Converged {
    let pool_id = entry.pool.id.clone();
    let pkey = pool_key(&pool_id);
    let mut out = Converged::default();
    for (dedicated, target) in [
        (true, entry.pool.target_dedicated),
        (false, entry.pool.target_low_priority),
    ] {
        let staying = |e: &PoolEntry| {
            e.nodes
                .values()
                .filter(|n| {
                    n.node.is_dedicated == dedicated && n.node.state != NodeState::LeavingPool
                })
                .count() as u32
        };
        let have = staying(entry);
        for _ in have..target {
            let mut node = new_node(dedicated, now);
            if host_backed(entry.pool.source) {
                let Some((host, slot)) =
                    pick_slot(hosts, account, &pkey, entry.pool.os, entry.pool.source)
                else {
                    out.short = true;
                    break;
                };
                let h = hosts.get_mut(&host).expect("picked from the map");
                node.ip_address = h.rec.address.clone();
                node.ssh_port = match h.rec.provider {
                    ProviderKind::Linux | ProviderKind::Sandbox => h.rec.ssh_port,
                    // Each simulated node has its own port, acknowledged by the agent.
                    ProviderKind::Simulate => None,
                };
                node.host = Some(host);
                node.slot = Some(slot);
                h.slots.insert(
                    slot,
                    NodeRef {
                        account: account.to_string(),
                        pool: pkey.clone(),
                        node: node.id.clone(),
                    },
                );
            }
            ops.push(put_json(node_record(account, &pool_id, &node.id), &node));
            entry.nodes.insert(
                node.id.clone(),
                crate::state::NodeEntry {
                    node,
                    users: Default::default(),
                },
            );
            out.changed = true;
        }
        if have > target {
            let mut candidates: Vec<&mut crate::state::NodeEntry> = entry
                .nodes
                .values_mut()
                .filter(|n| {
                    n.node.is_dedicated == dedicated && n.node.state != NodeState::LeavingPool
                })
                .collect();
            candidates.sort_by_key(|n| {
                (
                    n.node.state != NodeState::Idle,
                    std::cmp::Reverse(n.node.allocation_time),
                )
            });
            for n in candidates.into_iter().take((have - target) as usize) {
                set_node_state(&mut n.node, NodeState::LeavingPool, now);
                ops.push(put_json(
                    node_record(account, &pool_id, &n.node.id),
                    &n.node,
                ));
                out.changed = true;
            }
        }
    }
    out
}

/// Where the pool's nodes come from: its `bluebatch.nodes` metadata item, else the service's
/// default. Sandboxed nodes only where the service has their provider (`sandbox`); a sandboxed
/// node is a Linux machine, so a Windows pool that did not ask for them gets embedded nodes.
fn pool_source(
    spec: &serde_json::Map<String, serde_json::Value>,
    os: Os,
    default: NodeSource,
    sandbox: bool,
) -> Result<NodeSource> {
    let item = spec
        .get("metadata")
        .and_then(|m| m.as_array())
        .and_then(|items| {
            items.iter().find(|i| {
                i.get("name").and_then(|n| n.as_str()) == Some(bluebatch_protocol::NODES_METADATA)
            })
        });
    let source = match item {
        None if default == NodeSource::Sandbox && os == Os::Windows => NodeSource::Embedded,
        None => default,
        Some(i) => {
            let value = i.get("value").and_then(|v| v.as_str()).unwrap_or("");
            NodeSource::parse(value).ok_or_else(|| {
                BatchError::property(
                    Code::InvalidPropertyValue,
                    "metadata",
                    format!(
                        "The metadata item {} must be embedded, agents or sandbox, not '{value}'.",
                        bluebatch_protocol::NODES_METADATA
                    ),
                )
            })?
        }
    };
    if source == NodeSource::Sandbox && !sandbox {
        return Err(BatchError::property(
            Code::InvalidPropertyValue,
            "metadata",
            "This service has no sandbox node provider (start it with --nodes sandbox); use embedded or agents nodes.",
        ));
    }
    if source == NodeSource::Sandbox && os == Os::Windows {
        return Err(BatchError::property(
            Code::InvalidPropertyValue,
            "metadata",
            format!(
                "Sandboxed nodes are Linux machines: a Windows pool cannot have them. Set the metadata item {} to embedded or agents.",
                bluebatch_protocol::NODES_METADATA
            ),
        ));
    }
    Ok(source)
}

/// How long a host-backed pool waits for hosts before it reports the allocation it could not meet:
/// the `resizeTimeout` of its most recent resize (Add Pool or Resize), 15 minutes by default.
pub(crate) fn resize_timeout(pool: &Pool) -> time::Duration {
    pool.spec
        .get("resizeTimeout")
        .and_then(|v| v.as_str())
        .and_then(bluebatch_core::timefmt::parse_iso_duration)
        .and_then(|d| time::Duration::try_from(d).ok())
        .unwrap_or(time::Duration::minutes(15))
}

/// Resize and Remove Nodes need an active pool that is not already resizing.
fn check_resizable(pool: &Pool) -> Result<()> {
    if pool.state == PoolState::Deleting {
        return Err(BatchError::new(Code::PoolBeingDeleted));
    }
    if pool.allocation_state != AllocationState::Steady {
        return Err(BatchError::new(Code::PoolBeingResized));
    }
    Ok(())
}

impl Service {
    /// Every pool write ends alike: once durable, the pool's nodes take their next step.
    async fn durable_then_step(
        &self,
        pending: Pending,
        account: &str,
        pool_key: &str,
    ) -> Result<()> {
        pending.durable().await?;
        self.schedule(account, pool_key);
        Ok(())
    }

    pub async fn add_pool(&self, account: &str, new: NewPool) -> Result<()> {
        self.add_pool_written(account, new).await.map(|_| ())
    }

    /// [`Service::add_pool`], reporting what its answer shows.
    pub async fn add_pool_written(&self, account: &str, new: NewPool) -> Result<PoolWritten> {
        let _gate = self.gate().await?;
        let now = self.now();
        let pkey = pool_key(&new.id);
        let source = pool_source(
            &new.spec,
            new.os,
            self.inner.config.default_nodes,
            self.inner.config.sandbox_nodes,
        )?;
        if self.shared().is_some() && source != crate::NodeSource::Agents {
            // Embedded nodes live inside one process; replicas share joined hosts only.
            return Err(BatchError::property(
                Code::InvalidPropertyValue,
                "metadata",
                format!(
                    "This service runs on a shared store (PostgreSQL), where nodes come from joined hosts only: the metadata item {} must be agents.",
                    bluebatch_protocol::NODES_METADATA
                ),
            ));
        }
        let pending = {
            let mut st = self.lock();
            let crate::state::State { accounts, hub, .. } = &mut *st;
            let acct = accounts.entry(account.to_string()).or_default();
            if let Some(existing) = acct.pools.get(&pkey) {
                return Err(BatchError::new(match existing.pool.state {
                    PoolState::Deleting => Code::PoolBeingDeleted,
                    PoolState::Active => Code::PoolExists,
                }));
            }
            let pool = Pool {
                id: new.id,
                spec: new.spec,
                os: new.os,
                cloud_service: new.cloud_service,
                vm_size: new.vm_size,
                state: PoolState::Active,
                allocation_state: AllocationState::Steady,
                target_dedicated: new.target_dedicated,
                target_low_priority: new.target_low_priority,
                etag: new_etag(now),
                last_modified: now,
                creation_time: now,
                state_transition_time: now,
                allocation_state_transition_time: now,
                source,
                resize_errors: Vec::new(),
            };
            let mut entry = PoolEntry {
                pool,
                nodes: Default::default(),
            };
            let mut ops = Vec::new();
            let done = converge(&mut entry, account, now, &mut ops, &mut hub.hosts);
            if done.changed || done.short {
                entry.pool.allocation_state = AllocationState::Resizing;
            }
            ops.insert(
                0,
                put_json(pool_record(account, &entry.pool.id), &entry.pool),
            );
            let written = PoolWritten::of(&entry.pool);
            acct.pools.insert(pkey.clone(), entry);
            (self.submit(ops), written)
        };
        let (pending, written) = pending;
        self.durable_then_step(pending, account, &pkey).await?;
        Ok(written)
    }

    pub fn get_pool(&self, account: &str, pool: &str) -> Result<PoolView> {
        let st = self.lock();
        st.pool(account, pool)
            .map(PoolEntry::view)
            .ok_or_else(pool_not_found)
    }

    /// Up to `max` pools matching `keep`, in id order (case-insensitive), after the pool whose
    /// key is `after`; and whether more follow.
    pub fn list_pools(
        &self,
        account: &str,
        keep: &dyn Fn(&PoolView) -> bool,
        after: Option<&str>,
        max: usize,
    ) -> (Vec<PoolView>, bool) {
        let st = self.lock();
        let Some(acct) = st.accounts.get(account) else {
            return (Vec::new(), false);
        };
        let start = after.map(|a| a.to_ascii_lowercase());
        let range = match &start {
            Some(a) => acct
                .pools
                .range::<str, _>((Bound::Excluded(a.as_str()), Bound::Unbounded)),
            None => acct.pools.range::<str, _>(..),
        };
        let mut out = Vec::new();
        for (_, entry) in range {
            let view = entry.view();
            if keep(&view) {
                if out.len() == max {
                    return (out, true);
                }
                out.push(view);
            }
        }
        (out, false)
    }

    pub async fn delete_pool(
        &self,
        account: &str,
        pool: &str,
        pre: Precondition<'_>,
    ) -> Result<()> {
        let _gate = self.gate().await?;
        let now = self.now();
        let pending = {
            let mut st = self.lock();
            let entry = st.pool_mut(account, pool).ok_or_else(pool_not_found)?;
            pre(&entry.pool)?;
            if entry.pool.state == PoolState::Deleting {
                return Err(BatchError::new(Code::PoolBeingDeleted));
            }
            entry.pool.state = PoolState::Deleting;
            entry.pool.state_transition_time = now;
            set_allocation(&mut entry.pool, AllocationState::Stopping, now);
            touch_pool(&mut entry.pool, now);
            let pool_id = entry.pool.id.clone();
            let mut ops = vec![put_json(pool_record(account, &pool_id), &entry.pool)];
            for n in entry.nodes.values_mut() {
                if n.node.state != NodeState::LeavingPool {
                    set_node_state(&mut n.node, NodeState::LeavingPool, now);
                    ops.push(put_json(
                        node_record(account, &pool_id, &n.node.id),
                        &n.node,
                    ));
                }
            }
            self.submit(ops)
        };
        self.durable_then_step(pending, account, &pool_key(pool))
            .await
    }

    pub async fn resize_pool(
        &self,
        account: &str,
        pool: &str,
        resize: Resize,
        pre: Precondition<'_>,
    ) -> Result<()> {
        self.resize_pool_written(account, pool, resize, pre)
            .await
            .map(|_| ())
    }

    /// [`Service::resize_pool`], reporting what its answer shows.
    pub async fn resize_pool_written(
        &self,
        account: &str,
        pool: &str,
        resize: Resize,
        pre: Precondition<'_>,
    ) -> Result<PoolWritten> {
        let _gate = self.gate().await?;
        let now = self.now();
        let pending = {
            let mut st = self.lock();
            let crate::state::State { accounts, hub, .. } = &mut *st;
            let entry = accounts
                .get_mut(account)
                .and_then(|a| a.pools.get_mut(&pool_key(pool)))
                .ok_or_else(pool_not_found)?;
            pre(&entry.pool)?;
            check_resizable(&entry.pool)?;
            // The pool's `resizeTimeout` is that of its most recent resize (Azure's 15 minutes
            // when the Resize gives none): it bounds how long an agents pool waits for hosts.
            match resize.resize_timeout {
                Some(t) => {
                    entry
                        .pool
                        .spec
                        .insert("resizeTimeout".into(), serde_json::Value::String(t));
                }
                None => {
                    entry.pool.spec.remove("resizeTimeout");
                }
            }
            entry.pool.target_dedicated = resize.target_dedicated;
            entry.pool.target_low_priority = resize.target_low_priority;
            touch_pool(&mut entry.pool, now);
            let mut ops = Vec::new();
            // A new resize starts afresh: the last one's errors go.
            entry.pool.resize_errors.clear();
            let done = converge(entry, account, now, &mut ops, &mut hub.hosts);
            if done.changed || done.short {
                set_allocation(&mut entry.pool, AllocationState::Resizing, now);
            }
            ops.push(put_json(pool_record(account, &entry.pool.id), &entry.pool));
            (self.submit(ops), PoolWritten::of(&entry.pool))
        };
        let (pending, written) = pending;
        self.durable_then_step(pending, account, &pool_key(pool))
            .await?;
        Ok(written)
    }

    pub async fn remove_nodes(
        &self,
        account: &str,
        pool: &str,
        node_ids: &[String],
        pre: Precondition<'_>,
    ) -> Result<()> {
        self.remove_nodes_written(account, pool, node_ids, pre)
            .await
            .map(|_| ())
    }

    /// [`Service::remove_nodes`], reporting what its answer shows.
    pub async fn remove_nodes_written(
        &self,
        account: &str,
        pool: &str,
        node_ids: &[String],
        pre: Precondition<'_>,
    ) -> Result<PoolWritten> {
        let _gate = self.gate().await?;
        let now = self.now();
        let pending = {
            let mut st = self.lock();
            let entry = st.pool_mut(account, pool).ok_or_else(pool_not_found)?;
            pre(&entry.pool)?;
            check_resizable(&entry.pool)?;
            if let Some(missing) = node_ids.iter().find(|id| !entry.nodes.contains_key(*id)) {
                return Err(BatchError::new(Code::NodeNotFound).with("NodeId", missing.as_str()));
            }
            let pool_id = entry.pool.id.clone();
            let mut ops = Vec::new();
            for id in node_ids {
                let n = entry.nodes.get_mut(id).expect("checked above");
                if n.node.state == NodeState::LeavingPool {
                    continue;
                }
                if n.node.is_dedicated {
                    entry.pool.target_dedicated = entry.pool.target_dedicated.saturating_sub(1);
                } else {
                    entry.pool.target_low_priority =
                        entry.pool.target_low_priority.saturating_sub(1);
                }
                set_node_state(&mut n.node, NodeState::LeavingPool, now);
                ops.push(put_json(node_record(account, &pool_id, id), &n.node));
            }
            if !ops.is_empty() {
                entry.pool.resize_errors.clear();
                set_allocation(&mut entry.pool, AllocationState::Resizing, now);
            }
            touch_pool(&mut entry.pool, now);
            ops.push(put_json(pool_record(account, &pool_id), &entry.pool));
            (self.submit(ops), PoolWritten::of(&entry.pool))
        };
        let (pending, written) = pending;
        self.durable_then_step(pending, account, &pool_key(pool))
            .await?;
        Ok(written)
    }
}

impl Service {
    /// Emulator control: forgets every pool, node and user of `account` at once (their
    /// endpoints go too). Other accounts are untouched.
    pub async fn reset_account(&self, account: &str) -> Result<()> {
        let _gate = self.gate().await?;
        let (pending, keys) = {
            let mut st = self.lock();
            // Joined hosts keep their place; the slots of the account's nodes are free again.
            for h in st.hub.hosts.values_mut() {
                let before = h.slots.len();
                h.slots.retain(|_, r| r.account != account);
                if h.slots.len() != before {
                    self.inner.hub.notify(&h.rec.id);
                }
            }
            let keys: Vec<String> = st
                .accounts
                .remove(account)
                .map(|a| {
                    a.pools
                        .values()
                        .flat_map(|p| {
                            p.nodes
                                .keys()
                                .map(|n| crate::state::node_key(account, &p.pool.id, n))
                                .collect::<Vec<_>>()
                        })
                        .collect()
                })
                .unwrap_or_default();
            let ops = ["pool", "node", "user"]
                .iter()
                .map(|kind| Op::DeletePrefix {
                    prefix: format!("{kind}/{account}/"),
                })
                .collect();
            (self.submit(ops), keys)
        };
        for key in keys {
            self.inner.nodes.remove_node(&key).await;
        }
        pending.durable().await
    }
}

impl Service {
    /// A host joined or came back: the account's agents pools short of their targets take its
    /// free slots at once (also those that gave up at their resize timeout: they resize again).
    pub(crate) async fn fill_short_pools(&self, account: &str) {
        let keys: Vec<String> = {
            let st = self.lock();
            let Some(acct) = st.accounts.get(account) else {
                return;
            };
            acct.pools
                .iter()
                .filter(|(_, e)| {
                    e.pool.state == PoolState::Active
                        && e.pool.allocation_state != AllocationState::Stopping
                        && is_short(e)
                })
                .map(|(k, _)| k.clone())
                .collect()
        };
        for k in keys {
            self.refill_pool(account, &k).await;
        }
    }

    /// Brings an agents pool to its targets again (a host joined, or one backing it was revoked).
    pub(crate) async fn refill_pool(&self, account: &str, pkey: &str) {
        let Ok(_gate) = self.gate().await else {
            return;
        };
        let now = self.now();
        let pending = {
            let mut st = self.lock();
            let crate::state::State { accounts, hub, .. } = &mut *st;
            let Some(entry) = accounts
                .get_mut(account)
                .and_then(|a| a.pools.get_mut(pkey))
            else {
                return;
            };
            if entry.pool.state != PoolState::Active {
                return;
            }
            let mut ops = Vec::new();
            let done = converge(entry, account, now, &mut ops, &mut hub.hosts);
            if done.changed || done.short {
                if entry.pool.allocation_state == AllocationState::Steady {
                    entry.pool.resize_errors.clear();
                }
                set_allocation(&mut entry.pool, AllocationState::Resizing, now);
                touch_pool(&mut entry.pool, now);
                ops.push(put_json(pool_record(account, &entry.pool.id), &entry.pool));
            }
            (!ops.is_empty()).then(|| self.submit(ops))
        };
        if let Some(p) = pending {
            let _ = p.durable().await;
            self.schedule(account, pkey);
        }
    }
}
