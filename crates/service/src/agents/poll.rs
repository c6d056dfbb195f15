//! The long poll: a host's whole desired state, the cursor that names it, and the wake-ups of
//! the polls waiting for it to change.

use super::{Hub, auth_failed, hex, lock};
use crate::Service;
use crate::state::node_key;
use bluebatch_core::error::Result;
use bluebatch_core::model::NodeState;
use bluebatch_protocol::{DesiredAccount, DesiredState, MAX_WAIT_SECONDS, NodeDesired};
use sha2::{Digest, Sha256};
use std::time::Duration;
use tokio::sync::watch;

impl Hub {
    /// The host's desired state may have changed: wake its long poll.
    pub fn notify(&self, host: &str) {
        let mut m = lock(&self.notify);
        if let Some(tx) = m.get(host) {
            tx.send_modify(|v| *v = v.wrapping_add(1));
        } else {
            m.insert(host.to_string(), watch::channel(0).0);
        }
    }

    pub fn notify_all(&self) {
        for tx in lock(&self.notify).values() {
            tx.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    fn subscribe(&self, host: &str) -> watch::Receiver<u64> {
        lock(&self.notify)
            .entry(host.to_string())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    pub(super) fn forget_host(&self, host: &str) {
        lock(&self.notify).remove(host);
    }
}

/// The digest a long poll compares its `after` with.
/// A node's accounts are named by its revision (every change of them takes the next one, a
/// reimage too), so the digest leaves them out.
fn cursor_of(nodes: &[NodeDesired], offset: i64, drained: bool) -> String {
    let mut h = Sha256::new();
    for n in nodes {
        for part in [
            n.key.as_str(),
            n.pool_id.as_str(),
            n.node_id.as_str(),
            n.state.as_str(),
        ] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        h.update([(n.os == bluebatch_core::model::Os::Linux) as u8]);
        for v in [u64::from(n.slot), n.revision, n.boot, n.image] {
            h.update(v.to_le_bytes());
        }
    }
    h.update(offset.to_le_bytes());
    h.update([drained as u8]);
    hex(&h.finalize()[..16])
}

impl Service {
    /// The whole desired state of the host's nodes (not those leaving their pools).
    fn host_snapshot(&self, host: &str) -> Result<(Vec<NodeDesired>, bool)> {
        let st = self.lock();
        let h = st
            .hub
            .hosts
            .get(host)
            .ok_or_else(|| auth_failed("The node credential is not valid."))?;
        let mut nodes = Vec::with_capacity(h.slots.len());
        for (slot, r) in &h.slots {
            let Some((p, n)) = st.node_of(r) else {
                continue;
            };
            if n.node.state == NodeState::LeavingPool {
                continue;
            }
            let mut accounts: Vec<DesiredAccount> = n
                .users
                .values()
                .map(|u| DesiredAccount::from_account(&u.to_account()))
                .collect();
            accounts.sort_by(|a, b| a.name.cmp(&b.name));
            nodes.push(NodeDesired {
                slot: *slot,
                key: node_key(&r.account, &p.pool.id, &r.node),
                pool_id: p.pool.id.clone(),
                node_id: r.node.clone(),
                os: p.pool.os,
                state: n.node.state,
                revision: n.node.users_revision,
                boot: n.node.boot,
                image: n.node.image,
                accounts,
            });
        }
        Ok((nodes, h.rec.drained))
    }

    /// The long poll: the host's whole desired state at once when it differs from `after`,
    /// else when it changes within `wait` (at most `MAX_WAIT_SECONDS`), else `changed: false`
    /// at the end of the wait. Counts as the host's liveness while it lasts.
    pub async fn desired(
        &self,
        host: &str,
        after: Option<&str>,
        wait: Duration,
    ) -> Result<DesiredState> {
        let wait = wait.min(Duration::from_secs(MAX_WAIT_SECONDS));
        let deadline = tokio::time::Instant::now() + wait;
        let guard = self.mark_seen(host, true).await?;
        let mut rx = self.inner.hub.subscribe(host);
        rx.borrow_and_update();
        loop {
            // On a shared store, what other replicas committed first.
            self.sync().await?;
            let (nodes, drained) = self.host_snapshot(host)?;
            let offset = self.inner.clock.offset().whole_seconds();
            let cursor = cursor_of(&nodes, offset, drained);
            let changed = after != Some(cursor.as_str());
            if changed || tokio::time::Instant::now() >= deadline {
                let credential = self.renew_credential(host).await?;
                drop(guard);
                return Ok(DesiredState {
                    cursor,
                    changed,
                    nodes,
                    clock_offset_seconds: offset,
                    drained,
                    credential,
                });
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) | Err(_) => {}
                // The host's channel went (revoked): the next snapshot says so.
                Ok(Err(_)) => rx = self.inner.hub.subscribe(host),
            }
        }
    }
}
