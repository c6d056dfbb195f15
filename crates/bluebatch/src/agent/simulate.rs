//! `bluebatch agent --simulate N`: N light SSH nodes (the embedded nodes of `bluebatch serve`,
//! `bluebatch_node::SshNodes`) served by the agent process, each on its own port of the
//! advertised address, all through one long poll. Windows-pool nodes have no endpoint (as
//! embedded Windows nodes) and are acknowledged at once.
//!
//! A reboot (the node's `boot` grew) stops and restarts the node's endpoint, ending its
//! sessions; a reimage (`image` grew) gives it a new host key and an empty home. A released
//! slot's node is removed (its directory, keys and homes deleted).

use super::provider::{Provider, names};
use super::state::{Memos, NodeMemo, StateDir};
use bluebatch_core::Clock;
use bluebatch_core::model::Os;
use bluebatch_node::{SshConfig, SshNodes};
use bluebatch_protocol::{DesiredState, NodeAck, NodeDesired, ProviderKind, UserFailure};
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use time::OffsetDateTime;

/// How many nodes are started (ports bound, host keys read or made) at once.
const PARALLEL: usize = 64;

/// The service clock as the service reports it: the wall clock plus its offset.
#[derive(Default)]
pub struct OffsetClock {
    offset_seconds: AtomicI64,
}

impl OffsetClock {
    pub fn set(&self, seconds: i64) {
        self.offset_seconds.store(seconds, Ordering::SeqCst);
    }
}

impl Clock for OffsetClock {
    fn now(&self) -> OffsetDateTime {
        let now = OffsetDateTime::now_utc();
        now.checked_add(time::Duration::seconds(
            self.offset_seconds.load(Ordering::SeqCst),
        ))
        .unwrap_or(now)
    }
}

pub struct Simulate {
    nodes: Arc<SshNodes>,
    clock: Arc<OffsetClock>,
    slots: u32,
    state: StateDir,
    /// What each node enforces, with its generation (one more at each change); shared with
    /// the background task that saves a change of revisions only (a user written) off the
    /// acknowledgement's path, latest wins.
    memos: Arc<std::sync::Mutex<(Memos, u64)>>,
    /// Wakes that task.
    saver: tokio::sync::watch::Sender<u64>,
    /// The generation last written (a save never overwrites a newer one).
    written: Arc<std::sync::Mutex<u64>>,
}

/// How long the background save waits after a change for more changes to save with it: a
/// host of 10 000 nodes is saved at most about once a second, whatever the rate of writes (a
/// revision lost to a crash meanwhile is only applied once more at the restart).
const SAVE_COALESCE: std::time::Duration = std::time::Duration::from_secs(1);

/// Writes `memos` of generation `g` unless a newer generation is written already.
fn save_generation(dir: &StateDir, written: &std::sync::Mutex<u64>, g: u64, memos: &Memos) {
    let mut w = written.lock().unwrap_or_else(|e| e.into_inner());
    if *w >= g {
        return;
    }
    match dir.save_memos(memos) {
        Ok(()) => *w = g,
        Err(e) => tracing::warn!(error = %e, "could not save what was applied"),
    }
}

/// Raises the soft descriptor limit to the hard one when `nodes` listeners (and their
/// sessions) need more than it allows; warns when even the hard limit is short.
fn raise_nofile(nodes: u32) {
    let want = u64::from(nodes) * 2 + 512;
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit write/read only the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 || r.rlim_cur >= want {
            return;
        }
        r.rlim_cur = r.rlim_max.min(want.max(r.rlim_cur));
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
    }
    // A listener per node, and room for the process itself and a few sessions.
    if r.rlim_cur < u64::from(nodes) + 1024 {
        tracing::warn!(
            limit = r.rlim_cur,
            wanted = want,
            "the descriptor limit is low for this many simulated nodes (raise LimitNOFILE or ulimit -n)"
        );
    }
}

impl Simulate {
    pub fn new(slots: u32, bind: IpAddr, ports: RangeInclusive<u16>, state: &StateDir) -> Self {
        raise_nofile(slots);
        let clock = Arc::new(OffsetClock::default());
        let nodes = SshNodes::new(
            SshConfig {
                bind_ip: bind,
                port_range: ports,
                data_dir: state.dir.join("nodes"),
                ..SshConfig::default()
            },
            clock.clone(),
        );
        let (saver, mut rx) = tokio::sync::watch::channel(0u64);
        let written = Arc::new(std::sync::Mutex::new(0u64));
        let memos = Arc::new(std::sync::Mutex::new((state.memos(), 0u64)));
        let (dir, w, shared) = (state.clone(), written.clone(), Arc::downgrade(&memos));
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                tokio::time::sleep(SAVE_COALESCE).await;
                rx.borrow_and_update();
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                // One copy per save, not per change.
                let (memos, g) = lock(&shared).clone();
                let (dir, w) = (dir.clone(), w.clone());
                let _ =
                    tokio::task::spawn_blocking(move || save_generation(&dir, &w, g, &memos)).await;
            }
        });
        Simulate {
            nodes,
            clock,
            slots,
            state: state.clone(),
            memos,
            saver,
            written,
        }
    }
}

impl Provider for Simulate {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Simulate
    }
    fn slots(&self) -> u32 {
        self.slots
    }
    fn ssh_port(&self) -> Option<u16> {
        None
    }
    fn reserved_names(&self) -> Vec<String> {
        Vec::new()
    }

    async fn apply(&mut self, state: &DesiredState) -> Vec<NodeAck> {
        self.clock.set(state.clock_offset_seconds);
        // Released slots first: their ports are free for the nodes that come.
        let wanted: std::collections::HashSet<&str> =
            state.nodes.iter().map(|n| n.key.as_str()).collect();
        let gone: Vec<String> = lock(&self.memos)
            .0
            .keys()
            .filter(|k| !wanted.contains(k.as_str()))
            .cloned()
            .collect();
        let gone_any = self.remove(&gone).await;

        let mut acks = Vec::with_capacity(state.nodes.len());
        // A whole state carries every node of the host, but a change concerns few: a node that
        // already enforces this revision, boot and image, in this state, with its endpoint up,
        // is acknowledged as it was without being applied again (its sessions are still held
        // to the clock, as an apply would).
        let mut work = Vec::new();
        {
            let memos = lock(&self.memos);
            for n in &state.nodes {
                match memos.0.get(&n.key) {
                    Some(m) if already_in_force(&self.nodes, n, m) => {
                        if n.os != Os::Windows {
                            self.nodes.enforce(&n.key);
                        }
                        acks.push(NodeAck {
                            key: n.key.clone(),
                            revision: n.revision,
                            image: n.image,
                            ssh_port: if n.os == Os::Windows { None } else { m.port },
                            failures: Vec::new(),
                        });
                    }
                    _ => work.push(n),
                }
            }
        }
        self.apply_nodes(work, gone_any, &mut acks).await;
        acks
    }

    async fn apply_changes(
        &mut self,
        clock_offset_seconds: i64,
        changed: &[NodeDesired],
        removed: &[String],
    ) -> Option<Vec<NodeAck>> {
        self.clock.set(clock_offset_seconds);
        let gone_any = self.remove(removed).await;
        let mut acks = Vec::with_capacity(changed.len());
        self.apply_nodes(changed.iter().collect(), gone_any, &mut acks)
            .await;
        Some(acks)
    }

    async fn shutdown(&mut self) {
        // What a background save may not have written yet.
        {
            let mut m = lock(&self.memos);
            m.1 += 1;
            save_generation(&self.state, &self.written, m.1, &m.0);
        }
        self.nodes.shutdown().await;
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Simulate {
    /// Removes the nodes of released slots (keys, accounts and files); whether there were any.
    async fn remove(&mut self, gone: &[String]) -> bool {
        for key in gone {
            self.nodes.remove_node(key).await;
            lock(&self.memos).0.remove(key);
            tracing::info!(node = %key, "released: node removed with its accounts and files");
        }
        !gone.is_empty()
    }

    /// Applies the nodes of `work` (at most [`PARALLEL`] at once), pushing their
    /// acknowledgements, and saves what changed: a reboot, a reimage, a new node or a removal
    /// (`gone_any`) before the acknowledgement (so that a restart never does it twice), a new
    /// revision alone in the background just after.
    async fn apply_nodes(
        &mut self,
        work: Vec<&NodeDesired>,
        gone_any: bool,
        acks: &mut Vec<NodeAck>,
    ) {
        let changed = !work.is_empty();
        let at_once = {
            let memos = lock(&self.memos);
            work.iter().any(|n| {
                memos
                    .0
                    .get(&n.key)
                    .is_none_or(|m| m.boot != n.boot || m.image != n.image || m.slot != n.slot)
            })
        };
        let mut tasks = tokio::task::JoinSet::new();
        let mut pending = work.into_iter();
        loop {
            while tasks.len() < PARALLEL {
                let Some(n) = pending.next() else { break };
                let memo = lock(&self.memos).0.get(&n.key).cloned();
                tasks.spawn(apply_node(self.nodes.clone(), n.clone(), memo));
            }
            match tasks.join_next().await {
                Some(Ok((ack, memo))) => {
                    lock(&self.memos).0.insert(ack.key.clone(), memo);
                    acks.push(ack);
                }
                Some(Err(e)) => tracing::error!(error = %e, "applying a node failed"),
                None => break,
            }
        }
        let mut m = lock(&self.memos);
        if at_once || gone_any || changed {
            m.1 += 1;
        }
        if at_once || gone_any {
            save_generation(&self.state, &self.written, m.1, &m.0);
        } else if changed {
            let g = m.1;
            drop(m);
            self.saver.send_replace(g);
        }
    }
}

/// Whether node `n` is in force as `m` recorded it: same revision, boot and image, and (Linux)
/// its endpoint running on the recorded port in the state the service gives.
fn already_in_force(nodes: &SshNodes, n: &NodeDesired, m: &NodeMemo) -> bool {
    if m.slot != n.slot || m.revision != n.revision || m.boot != n.boot || m.image != n.image {
        return false;
    }
    if n.os == Os::Windows {
        return true;
    }
    m.port.is_some()
        && nodes.endpoint(&n.key).map(|a| a.port()) == m.port
        && nodes.state(&n.key) == Some(n.state)
}

async fn apply_node(
    nodes: Arc<SshNodes>,
    n: NodeDesired,
    memo: Option<NodeMemo>,
) -> (NodeAck, NodeMemo) {
    let mut next = NodeMemo {
        slot: n.slot,
        revision: n.revision,
        boot: n.boot,
        image: n.image,
        port: memo.as_ref().and_then(|m| m.port),
    };
    let changed = memo
        .as_ref()
        .is_none_or(|m| m.revision != n.revision || m.boot != n.boot || m.image != n.image);
    if n.os == Os::Windows {
        // A Windows node keeps its rules and has no endpoint.
        if changed {
            tracing::info!(node = %n.key, pool = %n.pool_id, id = %n.node_id, revision = n.revision,
                users = %names(&n.accounts), "applied (windows node, no endpoint)");
        }
        let ack = NodeAck {
            key: n.key,
            revision: n.revision,
            image: n.image,
            ssh_port: None,
            failures: Vec::new(),
        };
        return (ack, next);
    }
    let mut failures = Vec::new();
    // A node-wide fault fails every account; a node without accounts reports it as "(node)",
    // so that it is never acknowledged as serving.
    let fail = |failures: &mut Vec<UserFailure>, reason: String| {
        for a in &n.accounts {
            failures.push(UserFailure {
                name: a.name.clone(),
                reason: reason.clone(),
            });
        }
        if n.accounts.is_empty() {
            failures.push(UserFailure {
                name: "(node)".into(),
                reason,
            });
        }
    };
    if let Some(m) = &memo {
        if n.image > m.image {
            if let Err(e) = nodes.reimage_node(&n.key).await {
                tracing::error!(node = %n.key, error = %e, "reimage failed");
                fail(&mut failures, format!("reimage failed: {e}"));
                next.image = m.image;
            } else {
                tracing::info!(node = %n.key, image = n.image, "reimaged: new host key, empty home");
            }
        } else if n.boot > m.boot && nodes.endpoint(&n.key).is_some() {
            nodes.stop_node(&n.key).await;
            tracing::info!(node = %n.key, boot = n.boot, "rebooted: sessions ended");
        }
    }
    let accounts: Vec<_> = n.accounts.iter().map(|a| a.to_account()).collect();
    let applied = nodes.apply(
        &n.key,
        n.revision,
        bluebatch_node::AccountChange::ReplaceAll(accounts),
    );
    nodes.set_state(&n.key, n.state);
    let port = match nodes.start_node(&n.key, next.port).await {
        Ok(addr) => {
            next.port = Some(addr.port());
            Some(addr.port())
        }
        Err(e) => {
            tracing::error!(node = %n.key, error = %e, "the node's SSH endpoint did not start");
            fail(
                &mut failures,
                format!("the node's SSH endpoint did not start: {e}"),
            );
            None
        }
    };
    if !failures.is_empty() {
        // Retried: remember nothing as applied.
        next.revision = memo.as_ref().map_or(0, |m| m.revision);
    }
    if changed && failures.is_empty() {
        tracing::info!(node = %n.key, pool = %n.pool_id, id = %n.node_id, revision = applied,
            port = ?port, users = %names(&n.accounts), "applied");
    }
    let ack = NodeAck {
        key: n.key,
        revision: if failures.is_empty() {
            applied
        } else {
            n.revision
        },
        image: next.image,
        ssh_port: port,
        failures,
    };
    (ack, next)
}
