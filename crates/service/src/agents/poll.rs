//! The long poll: a host's desired state (whole, or what changed since the cursor this process
//! answered last), the cursor that names the whole of it, and the wake-ups of the polls waiting
//! for it to change.

use super::{HostEntry, Hub, NodeRef, auth_failed, lock};
use crate::Service;
use crate::state::node_key;
use bluebatch_core::error::Result;
use bluebatch_core::model::NodeState;
use bluebatch_protocol::{
    Cursor, DesiredAccount, DesiredState, MAX_WAIT_SECONDS, NodeDesired, NodeDigest, NodeFields,
};
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tokio::sync::watch;

impl Hub {
    /// The host's desired state may have changed (in a way not named by node): wake its long
    /// poll; its next poll looks at every node of the host again.
    pub fn notify(&self, host: &str) {
        if let Some(v) = lock(&self.answered).get_mut(host) {
            v.all = true;
        }
        self.wake(host);
    }

    /// The desired state of the host's node `key` may have changed (and nothing else of the
    /// host): wake its long poll; its next poll looks at that node only.
    pub fn notify_node(&self, host: &str, key: &str) {
        if let Some(v) = lock(&self.answered).get_mut(host)
            && !v.all
        {
            if v.dirty.len() >= MAX_DIRTY {
                v.all = true;
                v.dirty.clear();
            } else {
                v.dirty.insert(key.to_string());
            }
        }
        self.wake(host);
    }

    fn wake(&self, host: &str) {
        let mut m = lock(&self.notify);
        if let Some(tx) = m.get(host) {
            tx.send_modify(|v| *v = v.wrapping_add(1));
        } else {
            m.insert(host.to_string(), watch::channel(0).0);
        }
    }

    pub fn notify_all(&self) {
        for v in lock(&self.answered).values_mut() {
            v.all = true;
        }
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

    /// The slot of the host's node `key` as this process last saw it (a poll's view), if any.
    pub(super) fn slot_of(&self, host: &str, key: &str) -> Option<u32> {
        lock(&self.answered)
            .get(host)
            .and_then(|v| v.nodes.get(key))
            .map(|s| s.slot)
    }
}

/// Dirty nodes kept by name before a host's next poll looks at all of them instead.
const MAX_DIRTY: usize = 4096;

/// One node of a host's view: its slot and digest.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Seen {
    slot: u32,
    digest: NodeDigest,
}

/// What this process knows of a host's desired state, kept between polls so that a change of
/// one node costs one node's work:
/// - the view: each node's digest (by node key) and their sum (the cursor without the clock
///   offset and the drained flag), as last brought up to date, with what changed since (`all`:
///   something not named by node; `dirty`: these nodes);
/// - what the last answer to a delta-taking poll named: its cursor, and for every node whose
///   digest changed in the view since, the digest it had in that answer (`None`: not in it).
///   So the nodes a delta carries are exactly those whose digest differs from that answer's.
#[derive(Default)]
pub(crate) struct Answered {
    scanned: bool,
    all: bool,
    dirty: HashSet<String>,
    /// `h.slots.len()` at the last whole scan.
    slot_count: usize,
    nodes: HashMap<String, Seen>,
    sum: Cursor,
    cursor: String,
    since: HashMap<String, Option<NodeDigest>>,
}

/// The fields of the node a host's slot backs, and its key; `None`: the slot backs no node the
/// host serves (gone, or leaving its pool).
fn fields_of<'a>(
    st: &'a crate::state::State,
    slot: u32,
    r: &'a NodeRef,
) -> Option<(String, NodeFields<'a>, &'a crate::state::NodeEntry)> {
    let (p, n) = st.node_of(r)?;
    if n.node.state == NodeState::LeavingPool {
        return None;
    }
    Some((
        node_key(&r.account, &p.pool.id, &r.node),
        NodeFields {
            key: "",
            pool_id: &p.pool.id,
            node_id: &r.node,
            state: n.node.state,
            os: p.pool.os,
            slot,
            revision: n.node.users_revision,
            boot: n.node.boot,
            image: n.node.image,
        },
        n,
    ))
}

impl Answered {
    /// The view's node `key` becomes `now` (`None`: gone), remembering what the last answer had.
    fn set(&mut self, key: &str, now: Option<Seen>) {
        let was = self.nodes.get(key).copied();
        if was == now {
            return;
        }
        if let Some(w) = was {
            self.sum.remove(&w.digest);
        }
        match now {
            Some(s) => {
                self.sum.add(&s.digest);
                self.nodes.insert(key.to_string(), s);
            }
            None => {
                self.nodes.remove(key);
            }
        }
        // (Before any delta answer, there is no answer to remember.)
        if !self.cursor.is_empty() && !self.since.contains_key(key) {
            self.since.insert(key.to_string(), was.map(|w| w.digest));
        }
    }

    /// Brings the view up to date with every node of the host.
    fn scan_all(&mut self, st: &crate::state::State, h: &HostEntry) {
        let mut fresh: HashMap<String, Seen> = HashMap::with_capacity(h.slots.len());
        for (slot, r) in &h.slots {
            if let Some((key, f, _)) = fields_of(st, *slot, r) {
                let digest = NodeFields { key: &key, ..f }.digest();
                fresh.insert(
                    key,
                    Seen {
                        slot: *slot,
                        digest,
                    },
                );
            }
        }
        let gone: Vec<String> = self
            .nodes
            .keys()
            .filter(|k| !fresh.contains_key(*k))
            .cloned()
            .collect();
        for k in gone {
            self.set(&k, None);
        }
        for (k, s) in fresh {
            self.set(&k, Some(s));
        }
        self.scanned = true;
        self.all = false;
        self.dirty.clear();
        self.slot_count = h.slots.len();
        if self.since.len() > 2 * self.nodes.len() + MAX_DIRTY {
            // Too much churn since the last delta answer: the next answer is a whole one.
            self.cursor.clear();
            self.since.clear();
        }
    }

    /// Brings the view up to date: only the nodes marked changed when nothing else was.
    fn refresh(&mut self, st: &crate::state::State, h: &HostEntry, whole: bool) {
        if whole || !self.scanned || self.all || h.slots.len() != self.slot_count {
            return self.scan_all(st, h);
        }
        let dirty = std::mem::take(&mut self.dirty);
        for key in &dirty {
            // A node the view does not hold, or whose slot now backs another: look at all.
            let Some(seen) = self.nodes.get(key).copied() else {
                return self.scan_all(st, h);
            };
            let Some(r) = h.slots.get(&seen.slot) else {
                return self.scan_all(st, h);
            };
            match fields_of(st, seen.slot, r) {
                Some((k, f, _)) if k == *key => {
                    let digest = NodeFields { key: &k, ..f }.digest();
                    self.set(key, Some(Seen { digest, ..seen }));
                }
                Some(_) => return self.scan_all(st, h),
                None => self.set(key, None),
            }
        }
    }
}

/// The desired state of one node of a host (its accounts copied).
fn desired(key: String, f: &NodeFields<'_>, n: &crate::state::NodeEntry) -> NodeDesired {
    let mut accounts: Vec<DesiredAccount> = n
        .users
        .values()
        .map(|u| DesiredAccount::from_account(&u.to_account()))
        .collect();
    accounts.sort_by(|a, b| a.name.cmp(&b.name));
    NodeDesired {
        slot: f.slot,
        key,
        pool_id: f.pool_id.to_string(),
        node_id: f.node_id.to_string(),
        os: f.os,
        state: f.state,
        revision: f.revision,
        boot: f.boot,
        image: f.image,
        accounts,
    }
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
    /// `delta` and `after` is what this process answered last, else all of them. The view of
    /// the host kept between polls is brought up to date first: only the nodes marked changed
    /// since (a user written), or all of them (anything else, a whole answer, `build`).
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
        let drained = h.rec.drained;
        let mut answered = lock(&self.inner.hub.answered);
        let v = answered.entry(host.to_string()).or_default();
        // A first poll (or the end of a wait) looks at every node: exact whatever was missed.
        v.refresh(&st, h, after.is_none() || build);
        let is_delta = delta && after.is_some_and(|a| !v.cursor.is_empty() && a == v.cursor);
        let cursor = v.sum.finish(offset, drained);
        if !build && after == Some(cursor.as_str()) {
            return Ok(Snapshot {
                cursor,
                drained,
                body: None,
            });
        }
        let (nodes, removed) = if is_delta {
            let mut nodes = Vec::new();
            let mut removed = Vec::new();
            for (key, was) in &v.since {
                let now = v.nodes.get(key);
                if now.map(|s| s.digest) == *was {
                    continue;
                }
                match now {
                    Some(seen) => {
                        let built = h
                            .slots
                            .get(&seen.slot)
                            .and_then(|r| fields_of(&st, seen.slot, r));
                        if let Some((k, f, n)) = built {
                            nodes.push(desired(k, &f, n));
                        }
                    }
                    None => removed.push(key.clone()),
                }
            }
            nodes.sort_by_key(|n| n.slot);
            removed.sort();
            (nodes, removed)
        } else {
            let nodes = h
                .slots
                .iter()
                .filter_map(|(slot, r)| fields_of(&st, *slot, r))
                .map(|(k, f, n)| desired(k, &f, n))
                .collect();
            (nodes, Vec::new())
        };
        if delta {
            v.cursor = cursor.clone();
            v.since.clear();
        }
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
        self.desired_delta(host, after, wait, false, false).await
    }

    /// [`Service::desired`] for a poll that takes a delta (`delta`): when `after` is the cursor
    /// this process answered last for the host, the answer holds only the nodes that changed
    /// since and the keys of those removed (`delta: true`); any other `after` (another
    /// replica's, one from before a restart, none) gets the whole state. `synced`: the caller
    /// brought the cache up to the database's head after the request arrived (the HTTP layer
    /// does, to authenticate the host), so the first answer needs no second round trip.
    pub async fn desired_delta(
        &self,
        host: &str,
        after: Option<&str>,
        wait: Duration,
        delta: bool,
        mut synced: bool,
    ) -> Result<DesiredState> {
        let wait = wait.min(Duration::from_secs(MAX_WAIT_SECONDS));
        let deadline = tokio::time::Instant::now() + wait;
        let guard = self.mark_seen(host, true).await?;
        let mut rx = self.inner.hub.subscribe(host);
        rx.borrow_and_update();
        loop {
            // On a shared store, what other replicas committed first.
            if !std::mem::take(&mut synced) {
                self.sync().await?;
            }
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
