//! The long poll: a host's desired state (whole, or what changed since the cursor this process
//! answered last), the cursor that names the whole of it, and the wake-ups of the polls waiting
//! for it to change.

use super::{Hub, auth_failed, lock};
use crate::Service;
use crate::state::node_key;
use bluebatch_core::error::Result;
use bluebatch_core::model::NodeState;
use bluebatch_protocol::{
    Cursor, DesiredAccount, DesiredState, MAX_WAIT_SECONDS, NodeDesired, NodeFields,
};
use std::collections::HashMap;
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
        lock(&self.answered).remove(host);
    }
}

/// What this process answered last to a host's delta-taking poll: the cursor and each node's
/// digest (by node key). A poll whose `after` is this cursor holds exactly these nodes (the
/// cursor names the whole state), so the nodes whose digest differs are all it lacks.
#[derive(Default)]
pub(crate) struct Answered {
    cursor: String,
    digests: HashMap<String, [u8; 16]>,
}

/// One answer's worth of a host's state.
struct Snapshot {
    cursor: String,
    drained: bool,
    /// `None`: not built (the state is what `after` names and the wait goes on).
    body: Option<(Vec<NodeDesired>, Vec<String>, bool)>,
}

impl Service {
    /// The host's state (not the nodes leaving their pools): its cursor always; its nodes when
    /// the cursor differs from `after` or `build` — only those that changed since `after` when
    /// `delta` and `after` is what this process answered last, else all of them. The digests
    /// are taken from the nodes' fields; a node's accounts are copied only when it is sent.
    fn host_snapshot(
        &self,
        host: &str,
        after: Option<&str>,
        delta: bool,
        offset: i64,
        build: bool,
    ) -> Result<Snapshot> {
        let st = self.lock();
        let h = st
            .hub
            .hosts
            .get(host)
            .ok_or_else(|| auth_failed("The node credential is not valid."))?;
        let mut present = Vec::with_capacity(h.slots.len());
        let mut whole = Cursor::default();
        for (slot, r) in &h.slots {
            let Some((p, n)) = st.node_of(r) else {
                continue;
            };
            if n.node.state == NodeState::LeavingPool {
                continue;
            }
            let key = node_key(&r.account, &p.pool.id, &r.node);
            let f = NodeFields {
                key: "",
                pool_id: &p.pool.id,
                node_id: &r.node,
                state: n.node.state,
                os: p.pool.os,
                slot: *slot,
                revision: n.node.users_revision,
                boot: n.node.boot,
                image: n.node.image,
            };
            whole.node(&NodeFields { key: &key, ..f });
            present.push((key, f, n));
        }
        let cursor = whole.finish(offset, h.rec.drained);
        let drained = h.rec.drained;
        if !build && after == Some(cursor.as_str()) {
            return Ok(Snapshot {
                cursor,
                drained,
                body: None,
            });
        }
        let desired = |key: &str, f: &NodeFields<'_>, n: &crate::state::NodeEntry| {
            let mut accounts: Vec<DesiredAccount> = n
                .users
                .values()
                .map(|u| DesiredAccount::from_account(&u.to_account()))
                .collect();
            accounts.sort_by(|a, b| a.name.cmp(&b.name));
            NodeDesired {
                slot: f.slot,
                key: key.to_string(),
                pool_id: f.pool_id.to_string(),
                node_id: f.node_id.to_string(),
                os: f.os,
                state: f.state,
                revision: f.revision,
                boot: f.boot,
                image: f.image,
                accounts,
            }
        };
        if !delta {
            let nodes = present.iter().map(|(k, f, n)| desired(k, f, n)).collect();
            return Ok(Snapshot {
                cursor,
                drained,
                body: Some((nodes, Vec::new(), false)),
            });
        }
        let digests: HashMap<String, [u8; 16]> = present
            .iter()
            .map(|(k, f, _)| (k.clone(), NodeFields { key: k, ..*f }.digest()))
            .collect();
        let mut answered = lock(&self.inner.hub.answered);
        let last = answered.entry(host.to_string()).or_default();
        let is_delta = after.is_some_and(|a| a == last.cursor);
        let (nodes, removed) = if is_delta {
            let nodes = present
                .iter()
                .filter(|(k, _, _)| last.digests.get(k) != digests.get(k))
                .map(|(k, f, n)| desired(k, f, n))
                .collect();
            let mut removed: Vec<String> = last
                .digests
                .keys()
                .filter(|k| !digests.contains_key(*k))
                .cloned()
                .collect();
            removed.sort();
            (nodes, removed)
        } else {
            (
                present.iter().map(|(k, f, n)| desired(k, f, n)).collect(),
                Vec::new(),
            )
        };
        last.cursor = cursor.clone();
        last.digests = digests;
        Ok(Snapshot {
            cursor,
            drained,
            body: Some((nodes, removed, is_delta)),
        })
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
        self.desired_delta(host, after, wait, false).await
    }

    /// [`Service::desired`] for a poll that takes a delta (`delta`): when `after` is the cursor
    /// this process answered last for the host, the answer holds only the nodes that changed
    /// since and the keys of those removed (`delta: true`); any other `after` (another
    /// replica's, one from before a restart, none) gets the whole state.
    pub async fn desired_delta(
        &self,
        host: &str,
        after: Option<&str>,
        wait: Duration,
        delta: bool,
    ) -> Result<DesiredState> {
        let wait = wait.min(Duration::from_secs(MAX_WAIT_SECONDS));
        let deadline = tokio::time::Instant::now() + wait;
        let guard = self.mark_seen(host, true).await?;
        let mut rx = self.inner.hub.subscribe(host);
        rx.borrow_and_update();
        loop {
            // On a shared store, what other replicas committed first.
            self.sync().await?;
            let offset = self.inner.clock.offset().whole_seconds();
            let at_deadline = tokio::time::Instant::now() >= deadline;
            let snap = self.host_snapshot(host, after, delta, offset, at_deadline)?;
            if let Some((nodes, removed, is_delta)) = snap.body {
                let changed = after != Some(snap.cursor.as_str());
                let credential = self.renew_credential(host).await?;
                drop(guard);
                return Ok(DesiredState {
                    cursor: snap.cursor,
                    changed,
                    nodes,
                    clock_offset_seconds: offset,
                    drained: snap.drained,
                    credential,
                    delta: is_delta,
                    removed,
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
