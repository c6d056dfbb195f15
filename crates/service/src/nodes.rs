//! Compute node operations: Get, List, Get Remote Login Settings, Reboot, Reimage,
//! Disable/Enable Scheduling; and the emulator's node controls.

use crate::pools::set_node_state;
use crate::state::{NodeEntry, PoolEntry, node_key, node_record, node_users_prefix, pool_key};
use crate::{Service, node_not_found, pool_not_found, put_json};
use bluebatch_core::NodeAccount;
use bluebatch_core::error::{BatchError, Code, Result};
use bluebatch_core::model::{Node, NodeState, NodeUser, Os, SchedulingState};
use bluebatch_core::users::check_node_state_for_users;
use bluebatch_store::Op;
use serde_json::Value;
use std::ops::Bound;

/// A node as Get and List show it, with what it takes from its pool.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    pub node: Node,
    pub pool_id: String,
    pub os: Os,
    pub vm_size: String,
    /// The pool's `virtualMachineConfiguration.imageReference`, if any.
    pub image_reference: Option<Value>,
}

fn view(entry: &PoolEntry, n: &NodeEntry) -> NodeView {
    NodeView {
        node: n.node.clone(),
        pool_id: entry.pool.id.clone(),
        os: entry.pool.os,
        vm_size: entry.pool.vm_size.clone(),
        image_reference: entry
            .pool
            .spec
            .get("virtualMachineConfiguration")
            .and_then(|v| v.get("imageReference"))
            .cloned(),
    }
}

/// What a node write reports for its answer (the pool's id as stored, the node's id, its new
/// ETag and Last-Modified), so the answer needs no second lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeWritten {
    pub pool_id: String,
    pub node_id: String,
    pub etag: String,
    pub last_modified: time::OffsetDateTime,
}

impl NodeWritten {
    fn of(pool_id: &str, node: &Node) -> Self {
        Self {
            pool_id: pool_id.to_string(),
            node_id: node.id.clone(),
            etag: node.etag.clone(),
            last_modified: node.last_modified,
        }
    }
}

/// What Reboot and Reimage do besides the state change.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Restart {
    Reboot,
    Reimage,
}

/// A node's users as the emulator's inspect control shows them (never a password), with what
/// its SSH endpoint enforces besides: the state it was told and the sources it locks out.
#[derive(Debug, Clone)]
pub struct AppliedUsers {
    pub stored: Vec<NodeUser>,
    pub applied_revision: Option<u64>,
    pub applied: Vec<NodeAccount>,
    /// The state the node's provider enforces at login and whether it takes logins in it
    /// (`None`: no endpoint, e.g. Windows).
    pub login_state: Option<(NodeState, bool)>,
    pub login_lockouts: Vec<crate::LoginLockout>,
    /// (user, reason) of every account a joined host failed to apply in its last attempt.
    pub failures: Vec<(String, String)>,
}

impl Service {
    pub fn get_node(&self, account: &str, pool: &str, node: &str) -> Result<NodeView> {
        let st = self.lock();
        let entry = st.pool(account, pool).ok_or_else(pool_not_found)?;
        let n = entry.nodes.get(node).ok_or_else(node_not_found)?;
        Ok(view(entry, n))
    }

    /// Up to `max` nodes matching `keep`, in id order, after the node `after`; and whether more
    /// follow.
    pub fn list_nodes(
        &self,
        account: &str,
        pool: &str,
        keep: &dyn Fn(&NodeView) -> bool,
        after: Option<&str>,
        max: usize,
    ) -> Result<(Vec<NodeView>, bool)> {
        let st = self.lock();
        let entry = st.pool(account, pool).ok_or_else(pool_not_found)?;
        let mut out = Vec::new();
        // Continue right after the last id of the previous page (a range, not a scan).
        let iter = match after {
            Some(a) => entry
                .nodes
                .range::<str, _>((Bound::Excluded(a), Bound::Unbounded)),
            None => entry.nodes.range::<str, _>(..),
        };
        for (_, n) in iter {
            let v = view(entry, n);
            if keep(&v) {
                if out.len() == max {
                    return Ok((out, true));
                }
                out.push(v);
            }
        }
        Ok((out, false))
    }

    /// [`Service::list_nodes`], on a shared store as a query of the database's node rows (in
    /// node-id order after `after`, only `state` when the filter names one); `keep` still
    /// decides. On the embedded store: [`Service::list_nodes`].
    pub async fn list_nodes_query(
        &self,
        account: &str,
        pool: &str,
        keep: &(dyn Fn(&NodeView) -> bool + Sync),
        after: Option<&str>,
        state: Option<&str>,
        max: usize,
    ) -> Result<(Vec<NodeView>, bool)> {
        let Some(sh) = self.shared() else {
            return self.list_nodes(account, pool, keep, after, max);
        };
        let backend = sh.backend.clone();
        // The pool's part of each view, from the cache (caught up before this request).
        let (shell, pkey) = {
            let st = self.lock();
            let entry = st.pool(account, pool).ok_or_else(pool_not_found)?;
            let shell = PoolEntry {
                pool: entry.pool.clone(),
                nodes: Default::default(),
            };
            (shell, crate::state::pool_key(pool))
        };
        const CHUNK: usize = 1000;
        let mut out = Vec::new();
        let mut cursor = after.map(str::to_string);
        loop {
            let rows = backend
                .pool_nodes(account, &pkey, cursor.as_deref(), state, CHUNK)
                .await
                .map_err(crate::shared::unavailable)?;
            let last_chunk = rows.len() < CHUNK;
            for value in rows {
                let Ok(node) = serde_json::from_slice::<bluebatch_core::model::Node>(&value) else {
                    continue;
                };
                cursor = Some(node.id.clone());
                let v = view(
                    &shell,
                    &NodeEntry {
                        node,
                        users: Default::default(),
                    },
                );
                if keep(&v) {
                    if out.len() == max {
                        return Ok((out, true));
                    }
                    out.push(v);
                }
            }
            if last_chunk {
                return Ok((out, false));
            }
        }
    }

    /// (address, port) to log in to a Linux node, or the RDP endpoint of a Windows VM node.
    pub fn remote_login_settings(
        &self,
        account: &str,
        pool: &str,
        node: &str,
    ) -> Result<(String, u16, NodeView)> {
        let st = self.lock();
        let entry = st.pool(account, pool).ok_or_else(pool_not_found)?;
        let n = entry.nodes.get(node).ok_or_else(node_not_found)?;
        if entry.pool.cloud_service {
            return Err(BatchError::new(Code::OperationNotValidOnPool).message(
                "Remote login settings are not available for cloudServiceConfiguration pools; use Get Remote Desktop.",
            ));
        }
        // A joined host's node is reached at the host's address.
        let ip = match &n.node.host {
            Some(_) => n.node.ip_address.clone(),
            None => self.inner.config.remote_login_ip.clone(),
        };
        let port = match entry.pool.os {
            Os::Linux => n.node.ssh_port.ok_or_else(|| {
                BatchError::new(Code::NodeBeingCreated)
                    .message("The node has no remote login endpoint yet; it is being created.")
            })?,
            Os::Windows => 3389,
        };
        Ok((ip, port, view(entry, n)))
    }

    pub async fn reboot_node(&self, account: &str, pool: &str, node: &str) -> Result<()> {
        self.reboot_node_written(account, pool, node)
            .await
            .map(|_| ())
    }

    pub async fn reimage_node(&self, account: &str, pool: &str, node: &str) -> Result<()> {
        self.reimage_node_written(account, pool, node)
            .await
            .map(|_| ())
    }

    /// [`Service::reboot_node`], reporting what its answer shows.
    pub async fn reboot_node_written(
        &self,
        account: &str,
        pool: &str,
        node: &str,
    ) -> Result<NodeWritten> {
        self.restart(account, pool, node, Restart::Reboot).await
    }

    /// [`Service::reimage_node`], reporting what its answer shows.
    pub async fn reimage_node_written(
        &self,
        account: &str,
        pool: &str,
        node: &str,
    ) -> Result<NodeWritten> {
        self.restart(account, pool, node, Restart::Reimage).await
    }

    async fn restart(
        &self,
        account: &str,
        pool: &str,
        node: &str,
        how: Restart,
    ) -> Result<NodeWritten> {
        let _gate = self.gate().await?;
        let now = self.now();
        let (pending, key, linux, written) = {
            let mut st = self.lock();
            let (os, pool_id, n) = st.node_mut(account, pool, node)?;
            check_node_state_for_users(n.node.state)?;
            let key = node_key(account, &pool_id, node);
            let mut ops = Vec::new();
            let state = match how {
                Restart::Reboot => NodeState::Rebooting,
                Restart::Reimage => NodeState::Reimaging,
            };
            let agent = n.node.host.is_some();
            if agent {
                // Never a real reboot: the host ends the node's sessions (reboot) or wipes its
                // managed accounts (reimage) when the count grows, and acknowledges the
                // revision that carries it; the node is idle once it has.
                match how {
                    Restart::Reboot => n.node.boot += 1,
                    Restart::Reimage => n.node.image += 1,
                }
                if how == Restart::Reboot {
                    n.node.users_revision += 1;
                }
            }
            // Sessions end and logins are refused from now on, before the answer.
            self.push_state(os, n.node.host.as_deref(), &key, state);
            if how == Restart::Reimage {
                // A reimaged node comes back as a fresh image: no user accounts.
                n.node.users_revision += 1;
                n.users.clear();
                if os == Os::Linux && !agent {
                    self.inner.nodes.apply(
                        &key,
                        n.node.users_revision,
                        std::sync::Arc::from(Vec::new()),
                    );
                }
                if !agent {
                    n.node.applied_revision = Some(n.node.users_revision);
                }
                ops.push(Op::DeletePrefix {
                    prefix: node_users_prefix(account, &pool_id, node),
                });
            }
            set_node_state(&mut n.node, state, now);
            // Its step starts once this request has done the node's work (below).
            self.hold_step(&key, state);
            ops.push(put_json(node_record(account, &pool_id, node), &n.node));
            let written = NodeWritten::of(&pool_id, &n.node);
            (self.submit(ops), key, os == Os::Linux && !agent, written)
        };
        let step = self.step_after(account, &pool_key(pool), node);
        pending.durable().await?;
        if linux {
            // The reboot drops every session; the endpoint is back (same port) when the node is.
            let port = self
                .get_node(account, pool, node)
                .ok()
                .and_then(|v| v.node.ssh_port);
            self.inner.nodes.stop_node(&key).await;
            if how == Restart::Reimage
                && let Err(e) = self.inner.nodes.reimage_node(&key).await
            {
                tracing::warn!(node = %key, "reimage of the node's files failed: {e}");
            }
            if let Err(e) = self.inner.nodes.start_node(&key, port).await {
                tracing::warn!(node = %key, "node endpoint did not restart: {e}");
            }
        }
        drop(step); // the node's step starts now
        Ok(written)
    }

    pub async fn disable_scheduling(&self, account: &str, pool: &str, node: &str) -> Result<()> {
        self.set_scheduling(account, pool, node, SchedulingState::Disabled)
            .await
            .map(|_| ())
    }

    pub async fn enable_scheduling(&self, account: &str, pool: &str, node: &str) -> Result<()> {
        self.set_scheduling(account, pool, node, SchedulingState::Enabled)
            .await
            .map(|_| ())
    }

    /// [`Service::disable_scheduling`] or (`to` enabled) [`Service::enable_scheduling`],
    /// reporting what its answer shows.
    pub async fn set_scheduling(
        &self,
        account: &str,
        pool: &str,
        node: &str,
        to: SchedulingState,
    ) -> Result<NodeWritten> {
        let _gate = self.gate().await?;
        let now = self.now();
        let pending = {
            let mut st = self.lock();
            let (os, pool_id, n) = st.node_mut(account, pool, node)?;
            if n.node.scheduling_state == to {
                return Err(BatchError::new(Code::NodeAlreadyInTargetSchedulingState));
            }
            n.node.scheduling_state = to;
            // With no task running, a node that may not take tasks is `offline`, and back.
            match (to, n.node.state) {
                (SchedulingState::Disabled, NodeState::Idle) => {
                    set_node_state(&mut n.node, NodeState::Offline, now)
                }
                (SchedulingState::Enabled, NodeState::Offline) => {
                    set_node_state(&mut n.node, NodeState::Idle, now)
                }
                _ => {
                    n.node.etag = bluebatch_core::model::new_etag(now);
                    n.node.last_modified = now;
                }
            }
            self.push_state(
                os,
                n.node.host.as_deref(),
                &node_key(account, &pool_id, node),
                n.node.state,
            );
            let written = NodeWritten::of(&pool_id, &n.node);
            (
                self.submit(vec![put_json(
                    node_record(account, &pool_id, node),
                    &n.node,
                )]),
                written,
            )
        };
        let (pending, written) = pending;
        pending.durable().await?;
        Ok(written)
    }

    /// Emulator control: puts a node into any state (it stays there until something moves it).
    pub async fn set_node_state(
        &self,
        account: &str,
        pool: &str,
        node: &str,
        state: NodeState,
    ) -> Result<()> {
        let _gate = self.gate().await?;
        let now = self.now();
        let pending = {
            let mut st = self.lock();
            let (os, pool_id, n) = st.node_mut(account, pool, node)?;
            set_node_state(&mut n.node, state, now);
            // Logins follow at once (and sessions end when the state takes none).
            self.push_state(
                os,
                n.node.host.as_deref(),
                &node_key(account, &pool_id, node),
                state,
            );
            self.submit(vec![put_json(
                node_record(account, &pool_id, node),
                &n.node,
            )])
        };
        pending.durable().await
    }

    /// Emulator control: a node's users as stored and as the node applies them.
    pub fn node_users(&self, account: &str, pool: &str, node: &str) -> Result<AppliedUsers> {
        let (stored, key, agent) = {
            let st = self.lock();
            let entry = st.pool(account, pool).ok_or_else(pool_not_found)?;
            let n = entry.nodes.get(node).ok_or_else(node_not_found)?;
            let agent = n.node.host.as_ref().map(|_| {
                (
                    n.node.applied_revision,
                    n.node.applied_revision == Some(n.node.users_revision),
                )
            });
            (
                n.users.values().cloned().collect::<Vec<NodeUser>>(),
                node_key(account, &entry.pool.id, node),
                agent,
            )
        };
        if let Some((applied_revision, current)) = agent {
            // A joined host acknowledges revisions, not account lists: what it enforces is the
            // stored set once it has acknowledged the current revision.
            let applied = if current {
                stored.iter().map(NodeUser::to_account).collect()
            } else {
                Vec::new()
            };
            return Ok(AppliedUsers {
                stored,
                applied_revision,
                applied,
                login_state: None,
                login_lockouts: Vec::new(),
                failures: self
                    .inner
                    .hub
                    .failures(&key)
                    .into_iter()
                    .map(|f| (f.name, f.reason))
                    .collect(),
            });
        }
        Ok(AppliedUsers {
            failures: Vec::new(),
            stored,
            applied_revision: self.inner.nodes.applied_revision(&key),
            applied: self.inner.nodes.accounts(&key),
            login_state: self.inner.nodes.login_state(&key),
            login_lockouts: self.inner.nodes.login_lockouts(&key),
        })
    }
}
