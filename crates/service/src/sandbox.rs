//! What the sandboxed nodes' manager (`serve --nodes sandbox`) reads of the service: how many
//! machines each sandbox pool still lacks, which sandboxed nodes' hosts back nothing any more,
//! and a watch that moves whenever either may have changed.
//!
//! A sandboxed node is a joined host of provider kind `sandbox`, scoped to its pool, one slot:
//! the manager starts a machine per missing node, its agent joins with a pool-scoped token and
//! the pool takes it at once (as any agents pool takes a host); a host that backs no node and
//! that no pool would take is idle, and the manager tears its machine down and revokes it.

use crate::Service;
use crate::pools::missing;
use bluebatch_core::model::{AllocationState, NodeSource, PoolState};
use bluebatch_protocol::ProviderKind;
use tokio::sync::watch;

/// A sandbox pool short of its targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxDemand {
    pub account: String,
    /// The pool's id, as given at Add Pool.
    pub pool_id: String,
    /// Nodes (dedicated and low-priority) the pool lacks: no host backs them yet.
    pub missing: u32,
}

impl Service {
    /// Every sandbox pool that is allocating nodes (active, `resizing`) and short of its
    /// targets, with how many nodes it lacks, in (account, pool) order. A pool that gave up at
    /// its resize timeout (`steady` with `AllocationTimedout`) asks for no more until it is
    /// resized again, as an Azure pool does; a host that joins it meanwhile is still taken.
    pub fn sandbox_demand(&self) -> Vec<SandboxDemand> {
        let st = self.lock();
        let mut out: Vec<SandboxDemand> = st
            .accounts
            .iter()
            .flat_map(|(account, acct)| {
                acct.pools.values().filter_map(move |e| {
                    if e.pool.source != NodeSource::Sandbox
                        || e.pool.state != PoolState::Active
                        || e.pool.allocation_state != AllocationState::Resizing
                    {
                        return None;
                    }
                    let (dedicated, low) = missing(e);
                    (dedicated + low > 0).then(|| SandboxDemand {
                        account: account.clone(),
                        pool_id: e.pool.id.clone(),
                        missing: dedicated + low,
                    })
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.account, &a.pool_id).cmp(&(&b.account, &b.pool_id)));
        out
    }

    /// (account, host id) of every sandboxed node's host (provider kind `sandbox`) that backs no
    /// node and that no pool would take now: its pool was deleted, shrunk, had nodes removed, or
    /// has all it needs. A host that backs a node leaving its pool is not idle until the node is
    /// gone; a host just joined is not idle while its pool is short (the pool takes it).
    pub fn idle_sandbox_hosts(&self) -> Vec<(String, String)> {
        let st = self.lock();
        st.hub
            .hosts
            .values()
            .filter(|h| h.rec.provider == ProviderKind::Sandbox && h.slots.is_empty())
            .filter(|h| {
                let Some(acct) = st.accounts.get(&h.rec.account) else {
                    return true;
                };
                // As `fill_short_pools` picks the pools that take a host.
                !acct.pools.iter().any(|(key, e)| {
                    e.pool.state == PoolState::Active
                        && e.pool.allocation_state != AllocationState::Stopping
                        && crate::pools::is_short(e)
                        && h.takes(&h.rec.account, key, e.pool.os, e.pool.source)
                })
            })
            .map(|h| (h.rec.account.clone(), h.rec.id.clone()))
            .collect()
    }

    /// A watch whose value grows on every change of the service's state (each write, as it is
    /// taken): whatever may change [`Service::sandbox_demand`] or
    /// [`Service::idle_sandbox_hosts`] moves it, so a manager waiting on `changed()` wakes at
    /// once. Several changes may be seen as one.
    pub fn capacity_changed(&self) -> watch::Receiver<u64> {
        self.inner.capacity.subscribe()
    }

    /// Moves [`Service::capacity_changed`] (under the state lock, after memory took a change).
    pub(crate) fn capacity_moved(&self) {
        self.inner.capacity.send_modify(|v| *v = v.wrapping_add(1));
    }
}
