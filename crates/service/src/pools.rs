//! Pool operations: Add, Get, List, Delete, Resize, Remove Nodes.

use crate::state::{PoolEntry, node_record, pool_key, pool_record};
use crate::{Pending, Service, pool_not_found, put_json};
use bluebatch_core::error::{BatchError, Code, Result};
use bluebatch_core::model::{
    AllocationState, Node, NodeState, Pool, PoolState, SchedulingState, new_etag,
};
use bluebatch_core::pools::{NewPool, Resize};
use bluebatch_store::Op;
use rand::RngCore;
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
pub type Precondition<'a> = &'a (dyn Fn(&Pool) -> Result<()> + Sync);

/// A fresh node in `creating`, with an id in Azure's current form.
fn new_node(dedicated: bool, now: OffsetDateTime) -> Node {
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

/// Brings the pool's nodes (those not leaving) to its targets: new nodes are created, surplus
/// nodes leave (idle ones first). Returns whether anything changed.
fn converge(entry: &mut PoolEntry, account: &str, now: OffsetDateTime, ops: &mut Vec<Op>) -> bool {
    let pool_id = entry.pool.id.clone();
    let mut changed = false;
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
            let node = new_node(dedicated, now);
            ops.push(put_json(node_record(account, &pool_id, &node.id), &node));
            entry.nodes.insert(
                node.id.clone(),
                crate::state::NodeEntry {
                    node,
                    users: Default::default(),
                },
            );
            changed = true;
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
                changed = true;
            }
        }
    }
    changed
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
        let now = self.now();
        let pkey = pool_key(&new.id);
        let pending = {
            let mut st = self.lock();
            let acct = st.accounts.entry(account.to_string()).or_default();
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
            };
            let mut entry = PoolEntry {
                pool,
                nodes: Default::default(),
            };
            let mut ops = Vec::new();
            if converge(&mut entry, account, now, &mut ops) {
                entry.pool.allocation_state = AllocationState::Resizing;
            }
            ops.insert(
                0,
                put_json(pool_record(account, &entry.pool.id), &entry.pool),
            );
            acct.pools.insert(pkey.clone(), entry);
            self.submit(ops)
        };
        self.durable_then_step(pending, account, &pkey).await
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
        let now = self.now();
        let pending = {
            let mut st = self.lock();
            let entry = st.pool_mut(account, pool).ok_or_else(pool_not_found)?;
            pre(&entry.pool)?;
            check_resizable(&entry.pool)?;
            entry.pool.target_dedicated = resize.target_dedicated;
            entry.pool.target_low_priority = resize.target_low_priority;
            touch_pool(&mut entry.pool, now);
            let mut ops = Vec::new();
            if converge(entry, account, now, &mut ops) {
                set_allocation(&mut entry.pool, AllocationState::Resizing, now);
            }
            ops.push(put_json(pool_record(account, &entry.pool.id), &entry.pool));
            self.submit(ops)
        };
        self.durable_then_step(pending, account, &pool_key(pool))
            .await
    }

    pub async fn remove_nodes(
        &self,
        account: &str,
        pool: &str,
        node_ids: &[String],
        pre: Precondition<'_>,
    ) -> Result<()> {
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
                set_allocation(&mut entry.pool, AllocationState::Resizing, now);
            }
            touch_pool(&mut entry.pool, now);
            ops.push(put_json(pool_record(account, &pool_id), &entry.pool));
            self.submit(ops)
        };
        self.durable_then_step(pending, account, &pool_key(pool))
            .await
    }
}

impl Service {
    /// Emulator control: forgets every pool, node and user of `account` at once (their
    /// endpoints go too). Other accounts are untouched.
    pub async fn reset_account(&self, account: &str) -> Result<()> {
        let (pending, keys) = {
            let mut st = self.lock();
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
